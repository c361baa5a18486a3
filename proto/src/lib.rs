//! Kerwen's wire contract: the `kerwen.v1` protobuf package and its tonic services.
//!
//! `Exchange` (publish/subscribe), `Admin` and `Access` (members, rights, discovery) are the
//! client API; `Raft` and `Peer` are
//! node-to-node only. The `.proto` files under `proto/kerwen/v1/` are the source of truth.

#[allow(clippy::all, missing_docs)]
pub mod v1 {
    tonic::include_proto!("kerwen.v1");
}

//! kerwen-broker: the library behind a Kerwen node.
//!
//! - [`access`]: caller identities, the member registry, access rights and quotas.
//! - [`cluster`]: the node registry and the placement planner (where replicas go).
//! - [`evidence`]: leaves, Merkle trees, signed batches, receipts and their offline checks.
//! - [`ids`]: X-Road identifiers and their validation.
//! - [`model`]: the replicated data model (Raft type config, commands, records).
//! - [`storage`]: the node's one RocksDB, Raft log storage with group commit, and the state
//!   machines of the metadata group and the data shards.
//! - [`delivery`]: leader-local leases of delivered messages.
//! - [`proposer`]: coalesces concurrent writes to a Raft group into one log entry.
//! - [`request`]: asynchronous request/reply: reserved headers and the checks on a reply.
//! - [`error`]: the broker's error type.
//!
//! Architecture invariant: this crate never touches tonic or the network. Transport is the
//! node's business; the broker only sees openraft traits and its own types.

pub mod access;
pub mod cluster;
pub mod delivery;
pub mod evidence;
pub mod error;
pub mod ids;
pub mod model;
pub mod proposer;
pub mod request;
pub mod storage;

pub use error::{BrokerError, Result};

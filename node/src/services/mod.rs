//! gRPC services of a node: the client API (`exchange`, `admin`, `access`) and node-to-node
//! (`internal`).

pub mod access;
pub mod admin;
pub mod exchange;
pub mod internal;
pub mod transfer;

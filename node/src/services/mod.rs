//! gRPC services of a node: the client API (`exchange`, `admin`) and node-to-node
//! (`internal`).

pub mod admin;
pub mod exchange;
pub mod internal;
pub mod transfer;

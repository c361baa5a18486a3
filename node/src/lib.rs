//! kerwen-node: the `kerwen` process — node and CLI.
//!
//! - [`config`]: `kerwen serve` settings (flags, env, TOML file).
//! - [`runtime`]: a running node: store, Raft groups, routing to leaders.
//! - [`transport`]: node-to-node gRPC (openraft network, forwarding, fault filter).
//! - [`services`]: the gRPC services (`Exchange`, `Admin`, internal `Raft`/`Peer`).
//! - [`server`]: wiring of the services into one tonic server.
//! - [`client`]: the Rust client (CLI, tests, load generator).
//! - [`cli`]: client commands; [`dev`]: the local development cluster.
//! - [`status`]: broker errors → gRPC status codes.
//! - [`testing`]: test hooks (fault injection).

pub mod cli;
pub mod client;
pub mod config;
pub mod dev;
pub mod runtime;
pub mod server;
pub mod services;
pub mod status;
pub mod testing;
pub mod transport;

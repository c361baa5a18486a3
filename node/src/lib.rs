//! kerwen-node: the `kerwen` process — node and CLI.
//!
//! - [`config`]: `kerwen serve` settings (flags, env, TOML file).
//! - [`runtime`]: a running node: store, Raft groups, routing to leaders.
//! - [`placement`]: the node registry, where replicas are, the move coordinator (join,
//!   drain, remove).
//! - [`transport`]: node-to-node gRPC (openraft network, forwarding, fault filter).
//! - [`services`]: the gRPC services (`Exchange`, `Admin`, internal `Raft`/`Peer`).
//! - [`server`]: wiring of the services into the client and peer servers.
//! - [`client`]: the Rust client (CLI, tests, load generator); [`request_reply`]: its
//!   asynchronous request/reply; [`sealed`]: payloads sealed to the recipient (HPKE).
//! - [`cli`]: client commands; [`profile`]: where the CLI finds the cluster and its certificate; [`dev`]: the local development cluster;
//!   [`scenario`]: exchange topologies (the built-in SMEV scenario) and applying them.
//! - [`tls`]: mutual TLS on both ports, certificate reload; [`pki`]: dev/test certificates.
//! - [`auth`]: the caller's identity and the access check at the edge; [`quota`]: publish
//!   rate limits per subsystem.
//! - [`signing`]: the node's evidence signing key, its publication and rotation;
//!   [`receipts`]: evidence receipts to and from their protobuf form.
//! - [`ops`]: the plain-HTTP operations port: probes and Prometheus metrics; [`opmon`]:
//!   operational monitoring (a record per exchange, service health, `kerwen opmon`).
//! - [`scheduling`]: how late the node's tasks run, measured for the group commit's gathering.
//! - [`status`]: broker errors → gRPC status codes.
//! - [`testing`]: test hooks (fault injection).

pub mod auth;
pub mod cli;
pub mod client;
pub mod config;
pub mod dev;
pub mod opmon;
pub mod ops;
pub mod pki;
pub mod placement;
pub mod profile;
pub mod quota;
pub mod receipts;
pub mod request_reply;
pub mod runtime;
pub mod scenario;
pub mod scheduling;
pub mod sealed;
pub mod server;
pub mod signing;
pub mod services;
pub mod status;
pub mod telemetry;
pub mod testing;
pub mod tls;
pub mod transport;

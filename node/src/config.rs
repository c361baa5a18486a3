//! Node configuration: flags, `KERWEN_*` environment variables and an optional TOML file
//! (`--config`), in that order of precedence.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::Args;
use kerwen_broker::model::NodeId;
use kerwen_broker::storage::cipher::Algorithm;
use serde::Deserialize;

pub use crate::tls::TlsFiles;

/// `kerwen serve` flags. Every flag can also come from the config file (same name with
/// underscores, e.g. `node_id = 1`) or the environment (`KERWEN_NODE_ID`).
#[derive(Debug, Clone, Default, Args, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServeArgs {
    /// TOML file with any of the settings below.
    #[arg(long, env = "KERWEN_CONFIG")]
    #[serde(skip)]
    pub config: Option<PathBuf>,
    /// This node's id (unique, > 0).
    #[arg(long, env = "KERWEN_NODE_ID")]
    pub node_id: Option<NodeId>,
    /// This node's ordinal in a StatefulSet (0, 1, ...): the node id becomes ordinal + 1.
    /// Only when `--node-id` is not given.
    #[arg(long, env = "KERWEN_NODE_ORDINAL")]
    pub node_ordinal: Option<u64>,
    /// Address of the client API (Exchange, Admin).
    #[arg(long, env = "KERWEN_LISTEN")]
    pub listen: Option<SocketAddr>,
    /// Address of the node-to-node API (Raft, forwarding) [default: the client port + 100].
    #[arg(long, env = "KERWEN_PEER_LISTEN")]
    pub peer_listen: Option<SocketAddr>,
    /// `host:port` at which clients reach this node's client API, published in the node
    /// registry so clients can send straight to shard leaders [default: the host of this
    /// node's peer address (in `--peers`) with the client port].
    #[arg(long, env = "KERWEN_ADVERTISE_CLIENT")]
    pub advertise_client: Option<String>,
    /// All cluster members including this node, at their peer addresses:
    /// `1=host:port,2=host:port,3=host:port`. A new cluster is formed from them; a node
    /// started with `--join` lists at least one existing node and itself. Nodes that join
    /// later are learned from the cluster's node registry.
    #[arg(long, env = "KERWEN_PEERS")]
    pub peers: Option<String>,
    /// Join an existing cluster instead of forming one with `--peers`: the node registers
    /// itself and takes the replicas the cluster moves onto it.
    #[arg(long, env = "KERWEN_JOIN")]
    #[serde(default)]
    pub join: bool,
    /// The nodes that form a new cluster, by id: `1,2,3` [default: every node of `--peers`].
    /// A node not among them joins instead (as with `--join`), so an orchestrator can give
    /// every node the same settings and still grow the cluster later.
    #[arg(long, env = "KERWEN_INITIAL_NODES")]
    pub initial_nodes: Option<String>,
    /// Replicas of each Raft group (metadata and data shards) [default: 3]. Same on every node.
    #[arg(long, env = "KERWEN_REPLICATION_FACTOR")]
    pub replication_factor: Option<usize>,
    /// This node's failure domain (a zone or rack): replicas of a group go to distinct zones.
    #[arg(long, env = "KERWEN_ZONE")]
    pub zone: Option<String>,
    /// Address of the plain-HTTP operations port: `/livez`, `/readyz`, `/metrics`
    /// (Prometheus). It serves no data. Off unless given.
    #[arg(long, env = "KERWEN_HTTP_LISTEN")]
    pub http_listen: Option<SocketAddr>,
    /// PEM bundle of the cluster CA: clients and nodes must present certificates it issued.
    #[arg(long, env = "KERWEN_TLS_CA")]
    pub tls_ca: Option<PathBuf>,
    /// PEM certificate (chain) of this node, with the URI SAN `kerwen-node:ID`. Reloaded when
    /// it changes on disk.
    #[arg(long, env = "KERWEN_TLS_CERT")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of this node's certificate.
    #[arg(long, env = "KERWEN_TLS_KEY")]
    pub tls_key: Option<PathBuf>,
    /// Plaintext without authentication or access control, for local experiments only:
    /// refused unless every address is loopback.
    #[arg(long, env = "KERWEN_INSECURE")]
    #[serde(default)]
    pub insecure: bool,
    /// Directory of the node's RocksDB.
    #[arg(long, env = "KERWEN_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// How stored values are encrypted with the node's data key (`DATA_DIR/data-key`, made on
    /// first start) [default: aes-256-gcm]. Changing it later keeps what was written readable.
    #[arg(long, env = "KERWEN_ENCRYPTION_AT_REST", value_parser = clap::builder::PossibleValuesParser::new(Algorithm::ALL.map(Algorithm::name)))]
    pub encryption_at_rest: Option<String>,
    /// Number of data shards (Raft groups besides the metadata group). Same on every node.
    #[arg(long, env = "KERWEN_SHARDS")]
    pub shards: Option<u32>,
    /// Partitions of a mailbox created without an explicit count.
    #[arg(long, env = "KERWEN_DEFAULT_PARTITIONS")]
    pub default_partitions: Option<u32>,
    /// Lease of a delivered message before it is redelivered, in milliseconds.
    #[arg(long, env = "KERWEN_LEASE_MS")]
    pub lease_ms: Option<u64>,
    /// Largest accepted payload in bytes.
    #[arg(long, env = "KERWEN_MAX_PAYLOAD_BYTES")]
    pub max_payload_bytes: Option<usize>,
    /// Largest accepted publish request (sum of payload bytes); one request becomes one Raft
    /// entry per shard, which must stay quick to replicate.
    #[arg(long, env = "KERWEN_MAX_BATCH_BYTES")]
    pub max_batch_bytes: Option<usize>,
    /// Bound on waiting for a leader or a quorum before answering UNAVAILABLE, in ms.
    #[arg(long, env = "KERWEN_REQUEST_TIMEOUT_MS")]
    pub request_timeout_ms: Option<u64>,
    /// Build a snapshot of a group (and purge its log) after this many applied entries.
    #[arg(long, env = "KERWEN_SNAPSHOT_AFTER_ENTRIES")]
    pub snapshot_after_entries: Option<u64>,
    /// Log entries a group may have proposed and not yet applied. Writes arriving meanwhile
    /// are coalesced into the next entry (one fsync for all of them).
    #[arg(long, env = "KERWEN_PROPOSALS_IN_FLIGHT")]
    pub proposals_in_flight: Option<usize>,
    /// Accept the test-only InjectFault RPC (network partitions in tests). Never in production.
    #[arg(long, env = "KERWEN_ENABLE_FAULT_INJECTION")]
    #[serde(default)]
    pub enable_fault_injection: bool,
    /// Do not sign messages and acks: publishes and deliveries carry no receipts. Only for
    /// measuring what signing costs; a cluster's nodes must agree on it.
    #[arg(long, env = "KERWEN_NO_EVIDENCE")]
    #[serde(default)]
    pub no_evidence: bool,
    /// Disk the evidence log (records kept after payloads are purged, and signed batches) may
    /// take on this node, in bytes. Past 80% the node warns; once reached it refuses publishes
    /// until retention frees space or the budget is raised [default: 100 GiB].
    #[arg(long, env = "KERWEN_EVIDENCE_BUDGET_BYTES")]
    pub evidence_budget_bytes: Option<u64>,
    /// On SIGTERM, how long the node may spend handing its groups' leadership to the other
    /// nodes (while still serving) before it stops; 0 stops at once, leaving the others to
    /// notice by election timeout [default: 5000]. Keep it plus 3 s under the orchestrator's
    /// grace period.
    #[arg(long, env = "KERWEN_SHUTDOWN_DRAIN_MS")]
    pub shutdown_drain_ms: Option<u64>,
    /// Operational-monitoring records (one per publish, delivery and ack this node handled)
    /// kept in memory for `kerwen opmon`, newest first; 0 keeps none [default: 100000].
    #[arg(long, env = "KERWEN_OPMON_RECORDS")]
    pub opmon_records: Option<usize>,
    /// Longest an operational-monitoring record is kept, in ms [default: 7 days].
    #[arg(long, env = "KERWEN_OPMON_RETENTION_MS")]
    pub opmon_retention_ms: Option<u64>,
}

/// A complete, validated node configuration.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    pub node_id: NodeId,
    pub listen: SocketAddr,
    pub peer_listen: SocketAddr,
    /// Where clients reach this node (`--advertise-client`), published in the node registry.
    pub advertise_client: Option<String>,
    /// The operations port (probes, metrics), if enabled.
    pub http_listen: Option<SocketAddr>,
    pub security: Security,
    pub peers: BTreeMap<NodeId, String>,
    /// Join an existing cluster rather than form one.
    pub join: bool,
    /// The nodes that form a new cluster (a subset of `peers`).
    pub initial_nodes: Vec<NodeId>,
    pub replication_factor: usize,
    pub zone: Option<String>,
    pub data_dir: PathBuf,
    pub encryption_at_rest: Algorithm,
    pub shards: u32,
    pub default_partitions: u32,
    pub lease: Duration,
    pub max_payload_bytes: usize,
    pub max_batch_bytes: usize,
    pub request_timeout: Duration,
    pub snapshot_after_entries: u64,
    pub proposals_in_flight: usize,
    pub enable_fault_injection: bool,
    /// Sign messages and acks (off only with `--no-evidence`).
    pub evidence: bool,
    pub evidence_budget_bytes: u64,
    pub shutdown_drain: Duration,
    pub opmon_records: usize,
    pub opmon_retention: Duration,
}

/// How a node protects its ports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Security {
    /// Mutual TLS 1.3 with these files.
    Tls(TlsFiles),
    /// Plaintext, no authentication, loopback only.
    Insecure,
}

/// The peer port used when `--peer-listen` is not given: the client port plus this.
pub const PEER_PORT_OFFSET: u16 = 100;

pub const DEFAULT_SHARDS: u32 = 3;
pub const DEFAULT_REPLICATION_FACTOR: usize = 3;
pub const DEFAULT_PARTITIONS: u32 = 4;
pub const DEFAULT_LEASE_MS: u64 = 30_000;
pub const DEFAULT_MAX_PAYLOAD_BYTES: usize = 4 * 1024 * 1024;
pub const DEFAULT_MAX_BATCH_BYTES: usize = 16 * 1024 * 1024;
pub const DEFAULT_REQUEST_TIMEOUT_MS: u64 = 10_000;
pub const DEFAULT_SNAPSHOT_AFTER_ENTRIES: u64 = 20_000;
pub const DEFAULT_PROPOSALS_IN_FLIGHT: usize = 2;
pub const DEFAULT_EVIDENCE_BUDGET_BYTES: u64 = 100 * 1024 * 1024 * 1024;
pub const DEFAULT_SHUTDOWN_DRAIN_MS: u64 = 5_000;
pub const DEFAULT_OPMON_RECORDS: usize = 100_000;
/// X-Road's default retention of operational data.
pub const DEFAULT_OPMON_RETENTION_MS: u64 = 7 * 24 * 60 * 60 * 1000;

/// The host part of `host:port` (`[v6]:port` keeps its brackets).
fn host_of(address: &str) -> Option<&str> {
    address.rsplit_once(':').map(|(host, _)| host).filter(|h| !h.is_empty())
}

/// Checks that `address` is `host:port` with a port above 0.
fn check_host_port(address: &str) -> anyhow::Result<&str> {
    let address = address.trim();
    match address.rsplit_once(':') {
        Some((host, port)) if !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p > 0) => Ok(address),
        _ => bail!("{address:?} is not host:port"),
    }
}

/// Parses `1=host:port,2=host:port`.
pub fn parse_peers(s: &str) -> anyhow::Result<BTreeMap<NodeId, String>> {
    let mut peers = BTreeMap::new();
    for item in s.split(',').map(str::trim).filter(|i| !i.is_empty()) {
        let (id, addr) = item.split_once('=').with_context(|| format!("peer {item:?} is not ID=HOST:PORT"))?;
        let id: NodeId = id.trim().parse().with_context(|| format!("peer id {id:?} is not a number"))?;
        if peers.insert(id, addr.trim().to_owned()).is_some() {
            bail!("peer id {id} appears twice");
        }
    }
    Ok(peers)
}

impl ServeArgs {
    /// Merges the config file (if any) under the flags and validates the result.
    pub fn resolve(self) -> anyhow::Result<NodeConfig> {
        let file: ServeArgs = match &self.config {
            Some(path) => {
                let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
                toml::from_str(&text).with_context(|| format!("parsing {}", path.display()))?
            }
            None => ServeArgs::default(),
        };
        let node_id = match (self.node_id.or(file.node_id), self.node_ordinal.or(file.node_ordinal)) {
            (Some(id), _) => id,
            (None, Some(ordinal)) => ordinal.checked_add(1).context("--node-ordinal is too large")?,
            (None, None) => bail!("--node-id (or --node-ordinal) is required"),
        };
        if node_id == 0 {
            bail!("--node-id must be greater than 0");
        }
        let listen = self.listen.or(file.listen).context("--listen is required")?;
        let peer_listen = match self.peer_listen.or(file.peer_listen) {
            Some(a) => a,
            None => match listen.port().checked_add(PEER_PORT_OFFSET) {
                Some(port) if listen.port() != 0 => SocketAddr::new(listen.ip(), port),
                _ => bail!("--peer-listen is required when the client port is 0 or above {}", u16::MAX - PEER_PORT_OFFSET),
            },
        };
        if peer_listen == listen {
            bail!("--peer-listen must differ from --listen: clients and nodes use separate ports");
        }
        let http_listen = self.http_listen.or(file.http_listen);
        if http_listen.is_some_and(|h| h == listen || h == peer_listen) {
            bail!("--http-listen must differ from --listen and --peer-listen");
        }
        let peers = match self.peers.or(file.peers) {
            Some(p) => parse_peers(&p)?,
            None => BTreeMap::from([(node_id, peer_listen.to_string())]),
        };
        let insecure = self.insecure || file.insecure;
        let tls = (self.tls_ca.or(file.tls_ca), self.tls_cert.or(file.tls_cert), self.tls_key.or(file.tls_key));
        let security = match (insecure, tls) {
            (false, (Some(ca), Some(cert), Some(key))) => Security::Tls(TlsFiles { ca, cert, key }),
            (false, (None, None, None)) => bail!(
                "give --tls-ca, --tls-cert and --tls-key (PEM files; `kerwen dev` makes a development set), \
                 or --insecure for a plaintext node on loopback"
            ),
            (false, _) => bail!("--tls-ca, --tls-cert and --tls-key go together"),
            (true, (None, None, None)) => {
                check_loopback(listen, peer_listen, &peers)?;
                Security::Insecure
            }
            (true, _) => bail!("--insecure excludes --tls-ca, --tls-cert and --tls-key"),
        };
        if !peers.contains_key(&node_id) {
            bail!("--peers must include this node ({node_id})");
        }
        let advertise_client = match self.advertise_client.or(file.advertise_client) {
            Some(address) => Some(check_host_port(&address).context("--advertise-client")?.to_owned()),
            None if listen.port() == 0 => None,
            None => peers.get(&node_id).and_then(|peer| host_of(peer)).map(|host| format!("{host}:{}", listen.port())),
        };
        let data_dir = self.data_dir.or(file.data_dir).context("--data-dir is required")?;
        // The flag is checked by clap; the config file's value only here.
        let encryption_at_rest = match self.encryption_at_rest.or(file.encryption_at_rest) {
            Some(name) => name.parse::<Algorithm>().context("--encryption-at-rest")?,
            None => Algorithm::default(),
        };
        let shards = self.shards.or(file.shards).unwrap_or(DEFAULT_SHARDS);
        if shards == 0 || shards > 1024 {
            bail!("--shards must be 1..=1024");
        }
        // Sorted: every node must place the groups alike.
        let mut initial_nodes: Vec<NodeId> = match self.initial_nodes.or(file.initial_nodes) {
            Some(list) => list
                .split(',')
                .map(|id| id.trim().parse::<NodeId>().with_context(|| format!("--initial-nodes: bad node id {id:?}")))
                .collect::<anyhow::Result<_>>()?,
            None => peers.keys().copied().collect(),
        };
        initial_nodes.sort_unstable();
        initial_nodes.dedup();
        if let Some(missing) = initial_nodes.iter().find(|id| !peers.contains_key(id)) {
            bail!("--initial-nodes names node {missing}, which --peers does not list");
        }
        let join = self.join || file.join || !initial_nodes.contains(&node_id);
        let replication_factor = self.replication_factor.or(file.replication_factor).unwrap_or(DEFAULT_REPLICATION_FACTOR);
        if replication_factor == 0 || replication_factor > 7 {
            bail!("--replication-factor must be 1..=7");
        }
        let default_partitions = self.default_partitions.or(file.default_partitions).unwrap_or(DEFAULT_PARTITIONS);
        if default_partitions == 0 || default_partitions > kerwen_broker::storage::state_machine::MAX_PARTITIONS {
            bail!("--default-partitions must be 1..=256");
        }
        let max_payload_bytes = self.max_payload_bytes.or(file.max_payload_bytes).unwrap_or(DEFAULT_MAX_PAYLOAD_BYTES);
        let max_batch_bytes = self.max_batch_bytes.or(file.max_batch_bytes).unwrap_or(DEFAULT_MAX_BATCH_BYTES);
        if max_payload_bytes == 0 || max_batch_bytes < max_payload_bytes {
            bail!("--max-payload-bytes must be at least 1 and at most --max-batch-bytes ({max_batch_bytes})");
        }
        let proposals_in_flight = self.proposals_in_flight.or(file.proposals_in_flight).unwrap_or(DEFAULT_PROPOSALS_IN_FLIGHT);
        if proposals_in_flight == 0 || proposals_in_flight > 64 {
            bail!("--proposals-in-flight must be 1..=64");
        }
        Ok(NodeConfig {
            node_id,
            listen,
            peer_listen,
            advertise_client,
            http_listen,
            security,
            peers,
            join,
            initial_nodes,
            replication_factor,
            zone: self.zone.or(file.zone),
            data_dir,
            encryption_at_rest,
            shards,
            default_partitions,
            lease: Duration::from_millis(self.lease_ms.or(file.lease_ms).unwrap_or(DEFAULT_LEASE_MS)),
            max_payload_bytes,
            max_batch_bytes,
            request_timeout: Duration::from_millis(
                self.request_timeout_ms.or(file.request_timeout_ms).unwrap_or(DEFAULT_REQUEST_TIMEOUT_MS),
            ),
            snapshot_after_entries: snapshot_after_entries(self.snapshot_after_entries.or(file.snapshot_after_entries))?,
            proposals_in_flight,
            enable_fault_injection: self.enable_fault_injection || file.enable_fault_injection,
            evidence: !(self.no_evidence || file.no_evidence),
            evidence_budget_bytes: self.evidence_budget_bytes.or(file.evidence_budget_bytes).unwrap_or(DEFAULT_EVIDENCE_BUDGET_BYTES),
            shutdown_drain: Duration::from_millis(
                self.shutdown_drain_ms.or(file.shutdown_drain_ms).unwrap_or(DEFAULT_SHUTDOWN_DRAIN_MS),
            ),
            opmon_records: self.opmon_records.or(file.opmon_records).unwrap_or(DEFAULT_OPMON_RECORDS),
            opmon_retention: Duration::from_millis(
                self.opmon_retention_ms.or(file.opmon_retention_ms).unwrap_or(DEFAULT_OPMON_RETENTION_MS),
            ),
        })
    }
}

/// `--insecure` must never expose plaintext beyond this machine.
fn check_loopback(listen: SocketAddr, peer_listen: SocketAddr, peers: &BTreeMap<NodeId, String>) -> anyhow::Result<()> {
    for addr in [listen, peer_listen] {
        if !addr.ip().is_loopback() {
            bail!("--insecure refuses to bind {addr}: only loopback addresses (127.0.0.0/8, ::1) are allowed without TLS");
        }
    }
    for (id, addr) in peers {
        let loopback = addr.parse::<SocketAddr>().map(|a| a.ip().is_loopback()).unwrap_or(false)
            || addr.rsplit_once(':').is_some_and(|(host, _)| host == "localhost");
        if !loopback {
            bail!("--insecure refuses to talk to peer {id} at {addr}: only loopback addresses are allowed without TLS");
        }
    }
    Ok(())
}

fn snapshot_after_entries(value: Option<u64>) -> anyhow::Result<u64> {
    let n = value.unwrap_or(DEFAULT_SNAPSHOT_AFTER_ENTRIES);
    if n == 0 {
        bail!("--snapshot-after-entries must be at least 1");
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_peer_lists() {
        let p = parse_peers("1=127.0.0.1:7001, 2=127.0.0.1:7002").unwrap();
        assert_eq!(p[&2], "127.0.0.1:7002");
        assert!(parse_peers("1=a,1=b").is_err());
        assert!(parse_peers("x=a").is_err());
        assert!(parse_peers("1").is_err());
    }

    #[test]
    fn flags_override_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("node.toml");
        std::fs::write(&path, "node_id = 2\nlisten = \"127.0.0.1:7002\"\ndata_dir = \"/tmp/x\"\nshards = 5\ninsecure = true\n").unwrap();
        let args = ServeArgs { config: Some(path), shards: Some(7), ..Default::default() };
        let cfg = args.resolve().unwrap();
        assert_eq!(cfg.node_id, 2);
        assert_eq!(cfg.shards, 7);
        assert_eq!(cfg.default_partitions, DEFAULT_PARTITIONS);
        assert_eq!(cfg.peer_listen, "127.0.0.1:7102".parse().unwrap());
        assert_eq!(cfg.peers[&2], "127.0.0.1:7102");
        assert_eq!(cfg.encryption_at_rest, Algorithm::Aes256Gcm, "encrypted unless told otherwise");
    }

    #[test]
    fn encryption_at_rest_comes_from_the_flag_or_the_file_and_bad_names_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("node.toml");
        let file = "node_id = 1\nlisten = \"127.0.0.1:7001\"\ndata_dir = \"/tmp/x\"\ninsecure = true\n";
        std::fs::write(&path, format!("{file}encryption_at_rest = \"chacha20-poly1305\"\n")).unwrap();
        let from_file = ServeArgs { config: Some(path.clone()), ..Default::default() };
        assert_eq!(from_file.clone().resolve().unwrap().encryption_at_rest, Algorithm::ChaCha20Poly1305);
        let flag = ServeArgs { encryption_at_rest: Some("none".into()), ..from_file };
        assert_eq!(flag.resolve().unwrap().encryption_at_rest, Algorithm::None);
        std::fs::write(&path, format!("{file}encryption_at_rest = \"rot13\"\n")).unwrap();
        let e = format!("{:#}", ServeArgs { config: Some(path), ..Default::default() }.resolve().unwrap_err());
        assert!(e.contains("--encryption-at-rest") && e.contains("aes-256-gcm"), "{e}");
    }

    #[test]
    fn clients_are_told_the_peer_host_with_the_client_port_unless_advertised() {
        let peers = Some("1=kerwen-0.kerwen-peers:7101,2=kerwen-1.kerwen-peers:7101".to_owned());
        let base = ServeArgs { peers, tls_ca: Some("ca".into()), tls_cert: Some("c".into()), tls_key: Some("k".into()), ..args("0.0.0.0:7001") };
        assert_eq!(base.clone().resolve().unwrap().advertise_client.as_deref(), Some("kerwen-0.kerwen-peers:7001"));
        let told = ServeArgs { advertise_client: Some("kerwen.example.gov.tm:443".into()), ..base.clone() };
        assert_eq!(told.resolve().unwrap().advertise_client.as_deref(), Some("kerwen.example.gov.tm:443"));
        for bad in ["kerwen", ":7001", "host:0", "host:x"] {
            assert!(ServeArgs { advertise_client: Some(bad.into()), ..base.clone() }.resolve().is_err(), "{bad}");
        }
    }

    fn args(listen: &str) -> ServeArgs {
        ServeArgs { node_id: Some(1), listen: Some(listen.parse().unwrap()), data_dir: Some("/tmp/x".into()), ..Default::default() }
    }

    #[test]
    fn a_node_outside_the_initial_nodes_joins() {
        let peers = Some("1=127.0.0.1:7101,2=127.0.0.1:7102,4=127.0.0.1:7104".to_owned());
        let base = ServeArgs { insecure: true, peers, ..args("127.0.0.1:7001") };
        let formed = base.clone().resolve().unwrap();
        assert_eq!((formed.join, formed.initial_nodes), (false, vec![1, 2, 4]), "default: every peer forms it");
        let later = ServeArgs { node_id: Some(4), initial_nodes: Some("2, 1".into()), listen: Some("127.0.0.1:7004".parse().unwrap()), ..base.clone() };
        let later = later.resolve().unwrap();
        assert_eq!((later.join, later.initial_nodes), (true, vec![1, 2]));
        let unknown = ServeArgs { initial_nodes: Some("1,3".into()), ..base.clone() }.resolve().unwrap_err();
        assert!(format!("{unknown:#}").contains("node 3"), "{unknown:#}");
        assert!(ServeArgs { replication_factor: Some(0), ..base }.resolve().is_err());
    }

    #[test]
    fn security_is_explicit_and_insecure_stays_on_loopback() {
        let e = args("127.0.0.1:7001").resolve().unwrap_err().to_string();
        assert!(e.contains("--insecure"), "{e}");
        assert!(ServeArgs { insecure: true, ..args("0.0.0.0:7001") }.resolve().is_err(), "wildcard bind");
        assert!(ServeArgs { insecure: true, ..args("10.1.2.3:7001") }.resolve().is_err());
        let remote_peer = ServeArgs { insecure: true, peers: Some("1=127.0.0.1:7101,2=10.0.0.2:7101".into()), ..args("127.0.0.1:7001") };
        assert!(remote_peer.resolve().is_err());
        assert_eq!(ServeArgs { insecure: true, ..args("127.0.0.1:7001") }.resolve().unwrap().security, Security::Insecure);
        let partial = ServeArgs { tls_ca: Some("/ca.pem".into()), ..args("0.0.0.0:7001") };
        assert!(partial.resolve().is_err());
        let tls = ServeArgs {
            tls_ca: Some("/ca.pem".into()),
            tls_cert: Some("/n.pem".into()),
            tls_key: Some("/n.key".into()),
            ..args("0.0.0.0:7001")
        };
        assert!(matches!(tls.resolve().unwrap().security, Security::Tls(_)));
    }

    #[test]
    fn a_statefulset_ordinal_names_the_node_and_the_operations_port_is_separate() {
        let ordinal = ServeArgs { node_id: None, node_ordinal: Some(2), insecure: true, peers: Some("3=127.0.0.1:7101".into()), ..args("127.0.0.1:7001") };
        assert_eq!(ordinal.clone().resolve().unwrap().node_id, 3, "ordinal 2 is node 3");
        assert_eq!(ordinal.clone().resolve().unwrap().http_listen, None, "off unless given");
        let explicit = ServeArgs { node_id: Some(3), node_ordinal: Some(7), ..ordinal.clone() };
        assert_eq!(explicit.resolve().unwrap().node_id, 3, "--node-id wins");
        let clash = ServeArgs { http_listen: Some("127.0.0.1:7101".parse().unwrap()), ..ordinal.clone() };
        assert!(clash.resolve().is_err(), "the operations port may not share a gRPC port");
        let neither = ServeArgs { node_id: None, node_ordinal: None, ..ordinal };
        assert!(neither.resolve().unwrap_err().to_string().contains("--node-ordinal"));
    }
}

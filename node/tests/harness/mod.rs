//! Cluster test harness, in the style of TiKV's `test_raftstore`: a [`Cluster`] trait that tests
//! drive (start, kill, stop, restart, partition, heal, find leaders, wait for health) and
//! [`ProcessCluster`], which implements it with real `kerwen serve` child processes on
//! 127.0.0.1.
//!
//! Every node runs in its own subdirectory of one temporary directory, with `--enable-fault-injection`
//! so that [`Cluster::partition`] can cut it off. Each node's stderr/stdout go to `node-N.log` in
//! its directory; when a test panics, the tail of every log is printed and the full logs are
//! copied to `$CARGO_TARGET_TMPDIR/kerwen-test-logs/<test name>/`. Dropping the cluster SIGKILLs
//! and reaps every child and removes the temporary directory (set `KERWEN_TEST_KEEP_DIR=1` to
//! keep it, `KERWEN_TEST_LOGS=1` to print the log tails even when the test passes). Children are
//! also started with `PR_SET_PDEATHSIG = SIGKILL` from a process-lifetime thread, so they die
//! with the test process even when no destructor runs.
//!
//! Security is on as in production: the cluster gets its own CA (`pki/` in the temporary
//! directory), every node its certificate, and clients a subsystem certificate. Clients act as
//! [`ClusterConfig::identity`] (registered by [`ClusterBuilder::start`]); admin work goes
//! through [`ProcessCluster::admin_client`], other identities through
//! [`ProcessCluster::client_as`].
//!
//! Used as `mod harness;` from each integration test file.
#![allow(dead_code)]

pub mod docker;
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, ensure, Context, Result};
use bytes::Bytes;
use kerwen_node::client::{Client, ClientTls, Event, Subscription};
use kerwen_node::pki::{self, IdentityFiles};
use kerwen_node::tls::TlsFiles;
use kerwen_proto::v1::{ClusterStatusResponse, Delivery, Message, Position, PublishResponse};
use tonic::{Code, Status};

/// Node ids are 1..=n.
pub type NodeId = u64;
/// Raft group ids: 0 is the metadata group, 1..=shards are data shards.
pub type GroupId = u32;

pub const METADATA_GROUP: GroupId = 0;

/// Bound for any single status/admin call the harness makes while polling.
const POLL_CALL_TIMEOUT: Duration = Duration::from_secs(3);
/// Pause between two polls.
const POLL_INTERVAL: Duration = Duration::from_millis(100);
/// How long a node may take to open its port after being spawned.
const START_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a node may take to exit after SIGTERM.
const STOP_TIMEOUT: Duration = Duration::from_secs(30);

// ---------------------------------------------------------------------------------------------
// The trait tests code against
// ---------------------------------------------------------------------------------------------

/// A cluster under test. Node-lifecycle methods act on one node (ids `1..=n`); query methods
/// poll with bounded timeouts and return an error (with context) instead of hanging.
#[allow(async_fn_in_trait)]
pub trait Cluster {
    /// All node ids of the cluster, running or not.
    fn node_ids(&self) -> Vec<NodeId>;
    /// Node ids whose process is currently running.
    fn running(&self) -> Vec<NodeId>;
    /// `host:port` of the node's client and internal gRPC port (stable across restarts).
    fn endpoint(&self, node: NodeId) -> String;

    /// Starts a stopped node from its data directory and waits until its port accepts
    /// connections. Re-applies the current partition, if any.
    async fn start(&self, node: NodeId) -> Result<()>;
    /// SIGKILL: the node dies at once, without any chance to flush.
    async fn kill(&self, node: NodeId) -> Result<()>;
    /// SIGTERM and wait for a clean exit (error if it does not exit in time or exits non-zero).
    async fn stop(&self, node: NodeId) -> Result<()>;
    /// `stop` then `start`.
    async fn restart(&self, node: NodeId) -> Result<()> {
        self.stop(node).await?;
        self.start(node).await
    }
    /// Starts every stopped node (all spawned first, then waited for).
    async fn start_all(&self) -> Result<()>;
    /// Stops every running node with SIGTERM (signals all first, then waits).
    async fn stop_all(&self) -> Result<()>;

    /// Cuts the given nodes off from all others (Raft and peer traffic in both directions; the
    /// isolated nodes can still talk among themselves and to clients). Replaces any previous
    /// partition.
    async fn partition(&self, isolated: &[NodeId]) -> Result<()>;
    /// Removes every partition.
    async fn heal(&self) -> Result<()>;
    /// Nodes isolated by the current partition.
    fn isolated(&self) -> Vec<NodeId>;

    /// A client bound to exactly this node (no failover to others).
    async fn client(&self, node: NodeId) -> Result<Client>;
    /// A client that knows all endpoints (fails over between them).
    async fn client_any(&self) -> Result<Client>;

    /// Waits until every group has a leader on which all running nodes agree, the leader is a
    /// running node and reports itself as leader. Only meaningful without a partition.
    async fn wait_healthy(&self, timeout: Duration) -> Result<()>;
    /// The agreed leader of `group` among the running nodes outside the current partition
    /// (waits up to 60 s for them to agree).
    async fn leader_of(&self, group: GroupId) -> Result<NodeId>;
}

// ---------------------------------------------------------------------------------------------
// Configuration / builder
// ---------------------------------------------------------------------------------------------

/// Options of a [`ProcessCluster`]; every field maps to a `kerwen serve` flag.
#[derive(Debug, Clone)]
pub struct ClusterConfig {
    pub nodes: u64,
    pub shards: u32,
    pub default_partitions: u32,
    pub lease_ms: u64,
    pub max_payload_bytes: u64,
    pub request_timeout_ms: u64,
    /// Extra command-line arguments appended to every node's command line.
    pub extra_args: Vec<String>,
    /// `RUST_LOG` for the nodes (default: the test's own `RUST_LOG`, else `info,openraft=warn`).
    pub rust_log: String,
    /// The subsystem [`Cluster::client`] acts as; registered when the cluster starts.
    pub identity: String,
    /// Extra environment variables of every node (OpenTelemetry's, for instance).
    pub env: Vec<(String, String)>,
    /// `--shutdown-drain-ms`: 0 by default, so that stopping a node in a test is quick; tests
    /// of graceful shutdown set the node's default (5000).
    pub shutdown_drain_ms: u64,
    /// Nodes prepared (ports, certificates, directories) but not started: ids after the
    /// founding `nodes`, started with `--join` by [`ProcessCluster::join`].
    pub spare_nodes: u64,
}

/// The subsystem test clients act as by default; mailboxes of the tests belong to it.
pub const TEST_SUBSYSTEM: &str = "TM/GOV/MINCOM/registry";

impl Default for ClusterConfig {
    fn default() -> Self {
        Self {
            nodes: 3,
            shards: 3,
            default_partitions: 4,
            lease_ms: 30_000,
            max_payload_bytes: 4 * 1024 * 1024,
            request_timeout_ms: 10_000,
            extra_args: Vec::new(),
            rust_log: std::env::var("RUST_LOG").unwrap_or_else(|_| "info,openraft=warn".to_owned()),
            identity: TEST_SUBSYSTEM.to_owned(),
            env: Vec::new(),
            shutdown_drain_ms: 0,
            spare_nodes: 0,
        }
    }
}

#[derive(Debug, Clone, Default)]
pub struct ClusterBuilder {
    config: ClusterConfig,
}

impl ClusterBuilder {
    pub fn nodes(mut self, n: u64) -> Self {
        self.config.nodes = n;
        self
    }
    pub fn shards(mut self, n: u32) -> Self {
        self.config.shards = n;
        self
    }
    pub fn default_partitions(mut self, n: u32) -> Self {
        self.config.default_partitions = n;
        self
    }
    pub fn lease_ms(mut self, ms: u64) -> Self {
        self.config.lease_ms = ms;
        self
    }
    pub fn max_payload_bytes(mut self, n: u64) -> Self {
        self.config.max_payload_bytes = n;
        self
    }
    pub fn request_timeout_ms(mut self, ms: u64) -> Self {
        self.config.request_timeout_ms = ms;
        self
    }
    pub fn arg(mut self, arg: impl Into<String>) -> Self {
        self.config.extra_args.push(arg.into());
        self
    }
    /// The subsystem [`Cluster::client`] acts as (default [`TEST_SUBSYSTEM`]).
    pub fn identity(mut self, subsystem: impl Into<String>) -> Self {
        self.config.identity = subsystem.into();
        self
    }

    /// Prepares `n` more nodes that join the running cluster later ([`ProcessCluster::join`]).
    pub fn spare_nodes(mut self, n: u64) -> Self {
        self.config.spare_nodes = n;
        self
    }

    pub fn shutdown_drain_ms(mut self, ms: u64) -> Self {
        self.config.shutdown_drain_ms = ms;
        self
    }

    /// Sets an environment variable of every node.
    pub fn env(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.config.env.push((key.into(), value.into()));
        self
    }

    pub fn rust_log(mut self, filter: impl Into<String>) -> Self {
        self.config.rust_log = filter.into();
        self
    }

    /// Creates the directories and reserves the ports; no process is started.
    pub fn build(self) -> Result<ProcessCluster> {
        ProcessCluster::new(self.config)
    }

    /// Builds, starts every node and waits (up to 60 s) until the cluster is healthy.
    pub async fn start(self) -> Result<ProcessCluster> {
        let cluster = self.build()?;
        trace(format!("starting cluster in {}", cluster.root().display()));
        let started = async {
            cluster.start_all().await?;
            cluster.wait_healthy(Duration::from_secs(60)).await?;
            let identity = cluster.config.identity.clone();
            cluster.register(&identity).await
        };
        if let Err(e) = started.await {
            let tails: Vec<String> = cluster.node_ids().into_iter().map(|id| cluster.log_tail(id, 60)).collect();
            return Err(e.context(format!("starting the cluster failed; node logs:\n{}", tails.join("\n"))));
        }
        trace("cluster healthy");
        Ok(cluster)
    }
}

// ---------------------------------------------------------------------------------------------
// ProcessCluster
// ---------------------------------------------------------------------------------------------

struct NodeProcess {
    id: NodeId,
    port: u16,
    peer_port: u16,
    /// The plain-HTTP operations port (probes, metrics).
    http_port: u16,
    dir: PathBuf,
    data_dir: PathBuf,
    log_path: PathBuf,
    child: Mutex<Option<Child>>,
}

/// A cluster of `kerwen serve` child processes on 127.0.0.1.
pub struct ProcessCluster {
    config: ClusterConfig,
    nodes: BTreeMap<NodeId, NodeProcess>,
    /// Current partition: node → nodes it must not talk to.
    blocked: Mutex<BTreeMap<NodeId, Vec<NodeId>>>,
    /// Nodes isolated by the current partition.
    isolated: Mutex<Vec<NodeId>>,
    /// Spare nodes that have joined (they count as cluster nodes from then on).
    joined: Mutex<BTreeSet<NodeId>>,
    tmp: Option<tempfile::TempDir>,
    /// The cluster's CA and certificates.
    pki_dir: PathBuf,
    admin: IdentityFiles,
}

impl ProcessCluster {
    pub fn builder() -> ClusterBuilder {
        ClusterBuilder::default()
    }

    pub fn config(&self) -> &ClusterConfig {
        &self.config
    }

    /// All group ids: 0 (metadata) and 1..=shards.
    pub fn groups(&self) -> Vec<GroupId> {
        (0..=self.config.shards).collect()
    }

    /// Data shard ids 1..=shards.
    pub fn shards(&self) -> Vec<GroupId> {
        (1..=self.config.shards).collect()
    }

    /// The temporary directory holding every node's data and log.
    pub fn root(&self) -> &Path {
        self.tmp.as_ref().expect("temp dir present until drop").path()
    }

    pub fn log_path(&self, node: NodeId) -> PathBuf {
        self.node(node).log_path.clone()
    }

    /// The node's `--data-dir` (its RocksDB, data key and signing key).
    pub fn data_dir(&self, node: NodeId) -> PathBuf {
        self.node(node).data_dir.clone()
    }

    fn new(config: ClusterConfig) -> Result<Self> {
        anyhow::ensure!(config.nodes >= 1, "a cluster needs at least one node");
        let tmp = tempfile::Builder::new().prefix("kerwen-test-").tempdir().context("creating the cluster temp dir")?;
        // Each node keeps its ports across restarts.
        let ports = reserve_ports(((config.nodes + config.spare_nodes) * 3) as usize)?;
        let mut nodes = BTreeMap::new();
        for (i, triple) in ports.chunks(3).enumerate() {
            let (port, peer_port, http_port) = (triple[0], triple[1], triple[2]);
            let id = i as NodeId + 1;
            let dir = tmp.path().join(format!("node-{id}"));
            let data_dir = dir.join("data");
            std::fs::create_dir_all(&data_dir).with_context(|| format!("creating {}", data_dir.display()))?;
            let log_path = dir.join(format!("node-{id}.log"));
            nodes.insert(id, NodeProcess { id, port, peer_port, http_port, dir, data_dir, log_path, child: Mutex::new(None) });
        }
        let pki_dir = tmp.path().join("pki");
        let ids: Vec<NodeId> = nodes.keys().copied().collect();
        let admin = pki::create_dev_pki(&pki_dir, &ids, &pki::loopback_hosts()).context("creating the cluster's certificates")?;
        Ok(Self {
            config,
            nodes,
            blocked: Mutex::new(BTreeMap::new()),
            isolated: Mutex::new(Vec::new()),
            joined: Mutex::new(BTreeSet::new()),
            tmp: Some(tmp),
            pki_dir,
            admin,
        })
    }

    /// The cluster's PKI directory (CA certificate and key, node and admin certificates).
    pub fn pki_dir(&self) -> &Path {
        &self.pki_dir
    }

    /// The `kerwen` CLI with `args` (which name the endpoints), as the cluster's administrator.
    pub fn admin_cli(&self, args: &[&str]) -> std::process::Command {
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_kerwen"));
        cmd.args(args)
            .arg("--tls-ca")
            .arg(self.pki_dir.join("ca.pem"))
            .arg("--tls-cert")
            .arg(self.pki_dir.join("admin.pem"))
            .arg("--tls-key")
            .arg(self.pki_dir.join("admin.key"));
        cmd
    }

    /// Where node `id`'s certificate and key are (a test may rotate them in place).
    pub fn node_cert(&self, id: NodeId) -> IdentityFiles {
        let stem = pki::node_file_stem(id);
        IdentityFiles { cert: self.pki_dir.join(format!("{stem}.pem")), key: self.pki_dir.join(format!("{stem}.key")) }
    }

    /// TLS settings presenting `files`' certificate and trusting the cluster CA.
    pub fn tls_for(&self, files: &IdentityFiles) -> Result<ClientTls> {
        ClientTls::from_files(&TlsFiles { ca: self.pki_dir.join(pki::CA_CERT), cert: files.cert.clone(), key: files.key.clone() })
    }

    /// TLS settings of `subsystem`'s client certificate (issued on first use).
    pub fn subsystem_tls(&self, subsystem: &str) -> Result<ClientTls> {
        let files = pki::subsystem_identity(&self.pki_dir, &subsystem.parse()?)?;
        self.tls_for(&files)
    }

    /// The plain-HTTP operations address of `node` (`/livez`, `/readyz`, `/metrics`).
    #[allow(dead_code)]
    pub fn http_endpoint(&self, node: NodeId) -> String {
        format!("127.0.0.1:{}", self.node(node).http_port)
    }

    /// The peer (node-to-node) address of `node`.
    pub fn peer_endpoint(&self, node: NodeId) -> String {
        format!("127.0.0.1:{}", self.node(node).peer_port)
    }

    /// A client of `node` presenting `tls`, bounded.
    pub async fn client_with(&self, nodes: &[NodeId], tls: ClientTls) -> Result<Client> {
        let endpoints: Vec<String> = nodes.iter().map(|n| self.endpoint(*n)).collect();
        match tokio::time::timeout(Duration::from_secs(10), Client::connect_with(&endpoints, Some(tls))).await {
            Ok(Ok(c)) => Ok(c),
            Ok(Err(s)) => bail!("connecting to {endpoints:?}: {s}"),
            Err(_) => bail!("connecting to {endpoints:?} timed out"),
        }
    }

    /// A client of `node` acting as the cluster's administrator.
    pub async fn admin_client(&self, node: NodeId) -> Result<Client> {
        self.client_with(&[node], self.tls_for(&self.admin)?).await
    }

    /// A client of `node` acting as `subsystem` (which must be registered to do anything).
    pub async fn client_as(&self, node: NodeId, subsystem: &str) -> Result<Client> {
        self.client_with(&[node], self.subsystem_tls(subsystem)?).await
    }

    /// Registers a subsystem through any running node (already registered is fine).
    pub async fn register(&self, subsystem: &str) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let node = *self.running().first().context("register: no node is running")?;
            let attempt = async { self.admin_client(node).await?.add_member(subsystem, None).await.map_err(|s| anyhow!("{s}")) };
            match tokio::time::timeout(POLL_CALL_TIMEOUT, attempt).await {
                Ok(Ok(_)) => return Ok(()),
                Ok(Err(e)) if e.to_string().contains("already registered") => return Ok(()),
                Ok(Err(e)) if Instant::now() > deadline => return Err(e.context(format!("registering {subsystem}"))),
                Err(_) if Instant::now() > deadline => bail!("registering {subsystem} timed out"),
                _ => tokio::time::sleep(POLL_INTERVAL).await,
            }
        }
    }

    fn node(&self, id: NodeId) -> &NodeProcess {
        self.nodes.get(&id).unwrap_or_else(|| panic!("no node {id} in this cluster"))
    }

    /// Whether `id` is a spare node (started with `--join`).
    fn is_spare(&self, id: NodeId) -> bool {
        id > self.config.nodes
    }

    /// `--peers` of a node: the founding nodes, and a spare node itself.
    fn peers_arg(&self, node: NodeId) -> String {
        self.nodes
            .values()
            .filter(|n| !self.is_spare(n.id) || n.id == node)
            .map(|n| format!("{}=127.0.0.1:{}", n.id, n.peer_port))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Starts spare node `id`, which joins the running cluster (`kerwen serve --join`).
    pub async fn join(&self, id: NodeId) -> Result<()> {
        anyhow::ensure!(self.is_spare(id) && self.nodes.contains_key(&id), "node {id} is not a spare node");
        self.joined.lock().unwrap().insert(id);
        trace(format!("node {id} joins"));
        self.start(id).await
    }

    fn command(&self, node: &NodeProcess) -> Result<Command> {
        let c = &self.config;
        let mut log = OpenOptions::new().create(true).append(true).open(&node.log_path)?;
        writeln!(log, "===== harness: starting node {} on port {} =====", node.id, node.port)?;
        let log_err = log.try_clone()?;
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_kerwen"));
        cmd.arg("serve")
            .arg("--node-id")
            .arg(node.id.to_string())
            .arg("--listen")
            .arg(format!("127.0.0.1:{}", node.port))
            .arg("--peer-listen")
            .arg(format!("127.0.0.1:{}", node.peer_port))
            .arg("--http-listen")
            .arg(format!("127.0.0.1:{}", node.http_port))
            .arg("--peers")
            .arg(self.peers_arg(node.id))
            .args(self.is_spare(node.id).then_some("--join"))
            .arg("--tls-ca")
            .arg(self.pki_dir.join(pki::CA_CERT))
            .arg("--tls-cert")
            .arg(self.node_cert(node.id).cert)
            .arg("--tls-key")
            .arg(self.node_cert(node.id).key)
            .arg("--data-dir")
            .arg(&node.data_dir)
            .arg("--shards")
            .arg(c.shards.to_string())
            .arg("--default-partitions")
            .arg(c.default_partitions.to_string())
            .arg("--lease-ms")
            .arg(c.lease_ms.to_string())
            .arg("--max-payload-bytes")
            .arg(c.max_payload_bytes.to_string())
            .arg("--request-timeout-ms")
            .arg(c.request_timeout_ms.to_string())
            .arg("--enable-fault-injection")
            .arg("--shutdown-drain-ms")
            .arg(c.shutdown_drain_ms.to_string())
            .args(&c.extra_args)
            .env("RUST_LOG", &c.rust_log)
            .env("NO_COLOR", "1")
            .current_dir(&node.dir)
            .stdin(Stdio::null())
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(log_err));
        // The node reads its settings from KERWEN_* variables too, and OpenTelemetry's from
        // OTEL_*: only the flags above and the configured variables count.
        for (key, _) in std::env::vars_os() {
            let key_text = key.to_string_lossy();
            if key_text.starts_with("KERWEN_") || key_text.starts_with("OTEL_") {
                cmd.env_remove(key);
            }
        }
        cmd.envs(c.env.iter().map(|(k, v)| (k, v)));
        // SAFETY: prctl is async-signal-safe and touches no memory of the parent.
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0) != 0 {
                    return Err(io::Error::last_os_error());
                }
                Ok(())
            });
        }
        Ok(cmd)
    }

    /// Spawns the node's process (no waiting).
    fn spawn(&self, id: NodeId) -> Result<()> {
        let node = self.node(id);
        let mut slot = node.child.lock().unwrap();
        if let Some(child) = slot.as_mut() {
            if child.try_wait()?.is_none() {
                bail!("node {id} is already running (pid {})", child.id());
            }
        }
        let cmd = self.command(node)?;
        let child = spawn_child(cmd).with_context(|| format!("spawning node {id}"))?;
        *slot = Some(child);
        Ok(())
    }

    /// Waits until the node's port accepts TCP connections; fails if the process exits first.
    async fn wait_listening(&self, id: NodeId, timeout: Duration) -> Result<()> {
        let node = self.node(id);
        let addr: SocketAddr = format!("127.0.0.1:{}", node.port).parse()?;
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.exit_status(id)? {
                bail!("node {id} exited during startup with {status}\n{}", self.log_tail(id, 40));
            }
            if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("node {id} did not open port {} within {timeout:?}\n{}", node.port, self.log_tail(id, 40));
            }
            tokio::time::sleep(POLL_INTERVAL).await;
        }
    }

    /// `Some(status)` if the node's process has exited (it stays recorded until restarted).
    fn exit_status(&self, id: NodeId) -> Result<Option<std::process::ExitStatus>> {
        let mut slot = self.node(id).child.lock().unwrap();
        match slot.as_mut() {
            None => Ok(None),
            Some(child) => Ok(child.try_wait()?),
        }
    }

    fn is_running(&self, id: NodeId) -> bool {
        let mut slot = self.node(id).child.lock().unwrap();
        match slot.as_mut() {
            None => false,
            Some(child) => matches!(child.try_wait(), Ok(None)),
        }
    }

    /// The running node's peak resident memory so far (`VmHWM`), in bytes.
    pub fn peak_rss_bytes(&self, id: NodeId) -> Result<u64> {
        let pid = {
            let mut slot = self.node(id).child.lock().unwrap();
            match slot.as_mut() {
                Some(child) => match child.try_wait() {
                    Ok(None) => child.id(),
                    _ => bail!("node {id} is not running"),
                },
                None => bail!("node {id} is not running"),
            }
        };
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).with_context(|| format!("reading node {id}'s status"))?;
        let kib = status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .ok_or_else(|| anyhow!("no VmHWM in /proc/{pid}/status"))?;
        Ok(kib * 1024)
    }

    /// Fails if a node that was started has died without the harness stopping it.
    pub fn check_no_crash(&self) -> Result<()> {
        for id in self.node_ids() {
            if let Some(status) = self.exit_status(id)? {
                bail!("node {id} died unexpectedly ({status})\n{}", self.log_tail(id, 60));
            }
        }
        Ok(())
    }

    /// Sends `signal` to the node's process. `Ok(false)` if it is not running (an exited
    /// process is reaped and forgotten).
    fn send_signal(&self, id: NodeId, signal: libc::c_int) -> Result<bool> {
        let mut slot = self.node(id).child.lock().unwrap();
        let Some(child) = slot.as_mut() else { return Ok(false) };
        if child.try_wait()?.is_some() {
            *slot = None;
            return Ok(false);
        }
        // SAFETY: plain kill(2) on our own, not yet reaped child.
        if unsafe { libc::kill(child.id() as libc::pid_t, signal) } != 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() != Some(libc::ESRCH) {
                return Err(e).with_context(|| format!("signalling node {id}"));
            }
        }
        Ok(true)
    }

    /// Waits for the node's process to exit and reaps it; SIGKILLs it (and fails) after
    /// `timeout`. `Ok(None)` if there was no process.
    async fn wait_exit(&self, id: NodeId, timeout: Duration) -> Result<Option<std::process::ExitStatus>> {
        let node = self.node(id);
        let deadline = Instant::now() + timeout;
        loop {
            {
                let mut slot = node.child.lock().unwrap();
                let Some(child) = slot.as_mut() else { return Ok(None) };
                if let Some(status) = child.try_wait()? {
                    *slot = None;
                    return Ok(Some(status));
                }
                if Instant::now() > deadline {
                    let _ = child.kill();
                    let status = child.wait()?;
                    *slot = None;
                    bail!("node {id} did not exit within {timeout:?} (SIGKILLed, {status})\n{}", self.log_tail(id, 40));
                }
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Re-applies the current partition to one (freshly started) node.
    async fn apply_blocked(&self, id: NodeId) -> Result<()> {
        let blocked = self.blocked.lock().unwrap().get(&id).cloned().unwrap_or_default();
        if !blocked.is_empty() {
            set_blocked(&self.peer_endpoint(id), &blocked, self.tls_for(&self.node_cert(id))?).await.with_context(|| format!("re-applying partition on node {id}"))?;
        }
        Ok(())
    }

    /// One `ClusterStatus` from `node`, bounded.
    pub async fn status(&self, node: NodeId) -> Result<ClusterStatusResponse> {
        let fut = async {
            let mut client = self.admin_client(node).await?;
            client.cluster_status().await.map_err(|s| anyhow!("{s}"))
        };
        match tokio::time::timeout(POLL_CALL_TIMEOUT, fut).await {
            Ok(r) => r.with_context(|| format!("ClusterStatus on node {node}")),
            Err(_) => bail!("ClusterStatus on node {node} timed out after {POLL_CALL_TIMEOUT:?}"),
        }
    }

    /// Checks, once, whether the nodes `among` agree on a leader of `group` that is one of
    /// them, is not in `exclude` and reports itself as leader.
    async fn agreed_leader(&self, group: GroupId, among: &[NodeId], exclude: &[NodeId]) -> Result<NodeId> {
        let mut seen: BTreeMap<NodeId, (Option<u64>, String, u64)> = BTreeMap::new();
        for &n in among {
            let st = self.status(n).await?;
            let g = st
                .groups
                .iter()
                .find(|g| g.group == group)
                .ok_or_else(|| anyhow!("node {n} does not report group {group}"))?;
            // A node without a replica of the group has no say.
            if g.local_role != "none" {
                seen.insert(n, (g.leader, g.local_role.clone(), g.term));
            }
        }
        let leaders: BTreeSet<Option<u64>> = seen.values().map(|v| v.0).collect();
        let describe = || format!("group {group}: (leader, role, term) per node {seen:?}");
        if leaders.len() != 1 {
            bail!("no agreement on the leader, {}", describe());
        }
        let Some(&Some(leader)) = leaders.iter().next() else { bail!("no leader, {}", describe()) };
        if !among.contains(&leader) || exclude.contains(&leader) {
            bail!("leader {leader} is not an eligible node, {}", describe());
        }
        let role = &seen[&leader].1;
        if !role.eq_ignore_ascii_case("leader") {
            bail!("node {leader} is named leader but reports role {role:?}, {}", describe());
        }
        Ok(leader)
    }

    /// Waits until the nodes `among` agree on a leader of `group` that is one of them and not
    /// in `exclude`.
    pub async fn wait_leader(&self, group: GroupId, among: &[NodeId], exclude: &[NodeId], timeout: Duration) -> Result<NodeId> {
        let deadline = Instant::now() + timeout;
        loop {
            self.check_no_crash()?;
            match self.agreed_leader(group, among, exclude).await {
                Ok(leader) => return Ok(leader),
                Err(e) if Instant::now() > deadline => {
                    return Err(e.context(format!("no agreed leader of group {group} among {among:?} within {timeout:?}")))
                }
                Err(_) => tokio::time::sleep(POLL_INTERVAL).await,
            }
        }
    }

    /// Waits until every group has an agreed leader among `among` (excluding `exclude`).
    pub async fn wait_leaders(&self, among: &[NodeId], exclude: &[NodeId], timeout: Duration) -> Result<BTreeMap<GroupId, NodeId>> {
        let deadline = Instant::now() + timeout;
        let mut leaders = BTreeMap::new();
        for g in self.groups() {
            let left = deadline.saturating_duration_since(Instant::now());
            leaders.insert(g, self.wait_leader(g, among, exclude, left).await?);
        }
        // Re-check all at once: a later group's election may have moved an earlier leader.
        loop {
            let mut all = BTreeMap::new();
            let mut err = None;
            for g in self.groups() {
                match self.agreed_leader(g, among, exclude).await {
                    Ok(l) => {
                        all.insert(g, l);
                    }
                    Err(e) => {
                        err = Some(e);
                        break;
                    }
                }
            }
            match err {
                None => return Ok(all),
                Some(e) if Instant::now() > deadline => return Err(e.context(format!("cluster not healthy within {timeout:?}"))),
                Some(_) => tokio::time::sleep(POLL_INTERVAL).await,
            }
        }
    }

    /// Waits until, for every group, all `among` nodes report the same last applied index (the
    /// replicas converged; call only while nothing is being written).
    pub async fn wait_converged(&self, among: &[NodeId], timeout: Duration) -> Result<()> {
        eventually("replicas converged (same last_applied_index per group)", timeout, || async {
            self.check_no_crash()?;
            let mut per_group: BTreeMap<GroupId, BTreeMap<NodeId, u64>> = BTreeMap::new();
            for &n in among {
                let st = self.status(n).await?;
                for g in &st.groups {
                    per_group.entry(g.group).or_default().insert(n, g.last_applied_index);
                }
            }
            for (g, applied) in &per_group {
                let distinct: BTreeSet<u64> = applied.values().copied().collect();
                if distinct.len() != 1 || applied.len() != among.len() {
                    bail!("group {g}: last_applied_index per node {applied:?}");
                }
            }
            Ok(Some(()))
        })
        .await
    }

    /// The last `lines` lines of a node's log (at most 16 KiB read).
    pub fn log_tail(&self, id: NodeId, lines: usize) -> String {
        let path = &self.node(id).log_path;
        let mut out = format!("----- tail of node {id} log ({}) -----\n", path.display());
        match read_tail(path, 16 * 1024) {
            Ok(text) => {
                let all: Vec<&str> = text.lines().collect();
                for l in &all[all.len().saturating_sub(lines)..] {
                    out.push_str(l);
                    out.push('\n');
                }
            }
            Err(e) => out.push_str(&format!("(cannot read: {e})\n")),
        }
        out
    }

    /// Lines of a node's log containing `needle` (for assertions on logged events).
    pub fn log_grep(&self, id: NodeId, needle: &str) -> Vec<String> {
        std::fs::read_to_string(&self.node(id).log_path)
            .map(|t| t.lines().filter(|l| l.contains(needle)).map(str::to_owned).collect())
            .unwrap_or_default()
    }

    fn save_logs_on_failure(&self) {
        let test = std::thread::current().name().unwrap_or("unknown").replace("::", "-");
        let dest = Path::new(env!("CARGO_TARGET_TMPDIR")).join("kerwen-test-logs").join(test);
        if std::fs::create_dir_all(&dest).is_err() {
            return;
        }
        for node in self.nodes.values() {
            let _ = std::fs::copy(&node.log_path, dest.join(format!("node-{}.log", node.id)));
        }
        eprintln!("harness: full node logs saved in {}", dest.display());
    }
}

impl Cluster for ProcessCluster {
    fn node_ids(&self) -> Vec<NodeId> {
        let joined = self.joined.lock().unwrap();
        self.nodes.keys().copied().filter(|id| !self.is_spare(*id) || joined.contains(id)).collect()
    }

    fn running(&self) -> Vec<NodeId> {
        self.nodes.keys().copied().filter(|&id| self.is_running(id)).collect()
    }

    fn endpoint(&self, node: NodeId) -> String {
        format!("127.0.0.1:{}", self.node(node).port)
    }

    async fn start(&self, node: NodeId) -> Result<()> {
        trace(format!("start node {node}"));
        // The port was free when reserved; if something grabbed it meanwhile the node exits at
        // once, so retry a few times before giving up.
        let mut attempt = 0;
        loop {
            attempt += 1;
            self.spawn(node)?;
            match self.wait_listening(node, START_TIMEOUT).await {
                Ok(()) => break,
                Err(e) if attempt < 5 && self.exit_status(node)?.is_some() => {
                    eprintln!("harness: node {node} failed to start (attempt {attempt}), retrying: {e:#}");
                    self.node(node).child.lock().unwrap().take();
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
                Err(e) => return Err(e),
            }
        }
        self.apply_blocked(node).await
    }

    async fn kill(&self, node: NodeId) -> Result<()> {
        trace(format!("SIGKILL node {node}"));
        anyhow::ensure!(self.send_signal(node, libc::SIGKILL)?, "kill: node {node} is not running");
        self.wait_exit(node, STOP_TIMEOUT).await?;
        Ok(())
    }

    async fn stop(&self, node: NodeId) -> Result<()> {
        trace(format!("SIGTERM node {node}"));
        anyhow::ensure!(self.send_signal(node, libc::SIGTERM)?, "stop: node {node} is not running");
        match self.wait_exit(node, STOP_TIMEOUT).await? {
            Some(status) if status.success() => Ok(()),
            Some(status) => bail!("node {node} exited with {status} after SIGTERM\n{}", self.log_tail(node, 40)),
            None => bail!("stop: node {node} is not running"),
        }
    }

    async fn start_all(&self) -> Result<()> {
        let stopped: Vec<NodeId> = self.node_ids().into_iter().filter(|&id| !self.is_running(id)).collect();
        trace(format!("start nodes {stopped:?}"));
        for &id in &stopped {
            self.spawn(id)?;
        }
        for &id in &stopped {
            if let Err(e) = self.wait_listening(id, START_TIMEOUT).await {
                if self.exit_status(id)?.is_some() {
                    // Port race: retry through the single-node path.
                    eprintln!("harness: node {id} failed to start, retrying: {e:#}");
                    self.node(id).child.lock().unwrap().take();
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    self.start(id).await?;
                    continue;
                }
                return Err(e);
            }
            self.apply_blocked(id).await?;
        }
        Ok(())
    }

    async fn stop_all(&self) -> Result<()> {
        let running = self.running();
        trace(format!("SIGTERM nodes {running:?}"));
        for &id in &running {
            self.send_signal(id, libc::SIGTERM)?;
        }
        let mut errors = Vec::new();
        for &id in &running {
            match self.wait_exit(id, STOP_TIMEOUT).await {
                Ok(Some(status)) if status.success() => {}
                Ok(Some(status)) => errors.push(format!("node {id} exited with {status} after SIGTERM\n{}", self.log_tail(id, 40))),
                Ok(None) => {}
                Err(e) => errors.push(format!("{e:#}")),
            }
        }
        if errors.is_empty() {
            Ok(())
        } else {
            bail!("stop_all: {}", errors.join("\n"))
        }
    }

    async fn partition(&self, isolated: &[NodeId]) -> Result<()> {
        let all = self.node_ids();
        let isolated_set: BTreeSet<NodeId> = isolated.iter().copied().collect();
        trace(format!("partition: isolating {isolated_set:?}"));
        let mut plan = BTreeMap::new();
        for &n in &all {
            let blocked: Vec<NodeId> = if isolated_set.contains(&n) {
                all.iter().copied().filter(|m| !isolated_set.contains(m)).collect()
            } else {
                isolated_set.iter().copied().collect()
            };
            plan.insert(n, blocked);
        }
        *self.blocked.lock().unwrap() = plan.clone();
        *self.isolated.lock().unwrap() = isolated_set.iter().copied().collect();
        for n in self.running() {
            set_blocked(&self.peer_endpoint(n), &plan[&n], self.tls_for(&self.node_cert(n))?).await.with_context(|| format!("partition: node {n}"))?;
        }
        Ok(())
    }

    async fn heal(&self) -> Result<()> {
        trace("heal");
        self.blocked.lock().unwrap().clear();
        self.isolated.lock().unwrap().clear();
        for n in self.running() {
            set_blocked(&self.peer_endpoint(n), &[], self.tls_for(&self.node_cert(n))?).await.with_context(|| format!("heal: node {n}"))?;
        }
        Ok(())
    }

    fn isolated(&self) -> Vec<NodeId> {
        self.isolated.lock().unwrap().clone()
    }

    async fn client(&self, node: NodeId) -> Result<Client> {
        self.client_with(&[node], self.subsystem_tls(&self.config.identity)?).await
    }

    async fn client_any(&self) -> Result<Client> {
        self.client_with(&self.node_ids(), self.subsystem_tls(&self.config.identity)?).await
    }

    async fn wait_healthy(&self, timeout: Duration) -> Result<()> {
        let running = self.running();
        anyhow::ensure!(!running.is_empty(), "wait_healthy: no node is running");
        let leaders = self.wait_leaders(&running, &[], timeout).await?;
        trace(format!("healthy: nodes {running:?}, leaders by group {leaders:?}"));
        Ok(())
    }

    async fn leader_of(&self, group: GroupId) -> Result<NodeId> {
        let isolated = self.isolated();
        let among: Vec<NodeId> = self.running().into_iter().filter(|n| !isolated.contains(n)).collect();
        self.wait_leader(group, &among, &[], Duration::from_secs(60)).await
    }
}

impl Drop for ProcessCluster {
    fn drop(&mut self) {
        for node in self.nodes.values() {
            let mut slot = node.child.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(mut child) = slot.take() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
        let failing = std::thread::panicking();
        if failing || std::env::var_os("KERWEN_TEST_LOGS").is_some() {
            for id in self.node_ids() {
                eprintln!("{}", self.log_tail(id, 60));
            }
        }
        if failing {
            self.save_logs_on_failure();
        }
        if let Some(tmp) = self.tmp.take() {
            if std::env::var_os("KERWEN_TEST_KEEP_DIR").is_some() {
                let path = tmp.keep();
                eprintln!("harness: kept cluster directory {}", path.display());
            }
            // Otherwise TempDir's drop removes everything.
        }
    }
}

/// Spawns children from one thread that lives as long as the test process, so that
/// `PR_SET_PDEATHSIG` (which fires when the *thread* that forked exits) kills them only when the
/// whole process goes away.
/// Ports below Linux's ephemeral range (32768-60999): the OS never hands these out to
/// outgoing connections, which took an OS-assigned port between its release here and the
/// node's bind often enough to fail a test now and then. The candidates start at a point
/// that differs per process and per call, and are held together until all are found, so
/// tests running side by side get distinct ports.
fn reserve_ports(count: usize) -> Result<Vec<u16>> {
    const FIRST: u32 = 20_000;
    const SPAN: u32 = 12_000;
    static CALLS: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.subsec_nanos()).unwrap_or(0);
    let seed = std::process::id().wrapping_mul(7_919) ^ nanos ^ CALLS.fetch_add(1, std::sync::atomic::Ordering::Relaxed).wrapping_mul(997);
    let mut held = Vec::with_capacity(count);
    for i in 0..SPAN {
        if held.len() == count {
            break;
        }
        let port = (FIRST + (seed.wrapping_add(i.wrapping_mul(13))) % SPAN) as u16;
        if let Ok(listener) = TcpListener::bind(("127.0.0.1", port)) {
            held.push(listener);
        }
    }
    ensure!(held.len() == count, "found only {} of {count} free ports in {FIRST}..{}", held.len(), FIRST + SPAN);
    held.iter().map(|l| Ok(l.local_addr()?.port())).collect()
}

fn spawn_child(cmd: Command) -> io::Result<Child> {
    type Request = (Command, std::sync::mpsc::Sender<io::Result<Child>>);
    static SPAWNER: OnceLock<std::sync::mpsc::Sender<Request>> = OnceLock::new();
    let spawner = SPAWNER.get_or_init(|| {
        let (tx, rx) = std::sync::mpsc::channel::<Request>();
        std::thread::Builder::new()
            .name("kerwen-harness-spawner".into())
            .spawn(move || {
                for (mut cmd, reply) in rx {
                    let _ = reply.send(cmd.spawn());
                }
            })
            .expect("spawning the spawner thread");
        tx
    });
    let (tx, rx) = std::sync::mpsc::channel();
    spawner.send((cmd, tx)).map_err(|_| io::Error::other("spawner thread gone"))?;
    rx.recv().map_err(|_| io::Error::other("spawner thread gone"))?
}

fn read_tail(path: &Path, max: u64) -> io::Result<String> {
    let mut f = File::open(path)?;
    let len = f.metadata()?.len();
    f.seek(SeekFrom::Start(len.saturating_sub(max)))?;
    let mut buf = Vec::new();
    f.read_to_end(&mut buf)?;
    Ok(String::from_utf8_lossy(&buf).into_owned())
}

/// Fault injection on one node, bounded in time.
async fn set_blocked(endpoint: &str, blocked: &[NodeId], tls: ClientTls) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let r = tokio::time::timeout(POLL_CALL_TIMEOUT, kerwen_node::testing::set_blocked_peers(endpoint, blocked, Some(tls.clone()))).await;
        match r {
            Ok(Ok(())) => return Ok(()),
            Ok(Err(e)) if Instant::now() > deadline => return Err(e.context(format!("set_blocked_peers({endpoint}, {blocked:?})"))),
            Err(_) if Instant::now() > deadline => bail!("set_blocked_peers({endpoint}, {blocked:?}) timed out"),
            _ => tokio::time::sleep(POLL_INTERVAL).await,
        }
    }
}

/// Prints a timestamped progress line (captured by the test harness: shown only when the test
/// fails or with `--nocapture`).
pub fn trace(msg: impl std::fmt::Display) {
    static START: OnceLock<Instant> = OnceLock::new();
    let start = *START.get_or_init(Instant::now);
    let thread = std::thread::current();
    eprintln!("[{:>8.3}s {}] {msg}", start.elapsed().as_secs_f64(), thread.name().unwrap_or("?"));
}

// ---------------------------------------------------------------------------------------------
// Helpers shared by the tests
// ---------------------------------------------------------------------------------------------

/// A message with the given id, recipient, ordering key and payload.
pub fn message(id: impl Into<String>, recipient: &str, ordering_key: Option<String>, payload: impl Into<Bytes>) -> Message {
    Message {
        id: id.into(),
        recipient: recipient.to_owned(),
        headers: HashMap::new(),
        payload: payload.into(),
        ordering_key,
        ttl_ms: None,
        sender: String::new(),
    }
}

/// `count` messages `{prefix}-{i}` (i from `start`), ordering keys `k{i % keys}`, small payloads.
pub fn batch(prefix: &str, recipient: &str, start: usize, count: usize, keys: usize) -> Vec<Message> {
    (start..start + count)
        .map(|i| {
            let id = format!("{prefix}-{i:06}");
            let payload = Bytes::from(format!("payload of {id}"));
            message(id, recipient, Some(format!("k{}", i % keys)), payload)
        })
        .collect()
}

/// Checks a publish response against its request: one result per message, same ids, in order.
pub fn check_publish_response(sent: &[Message], resp: &PublishResponse) -> Result<()> {
    anyhow::ensure!(
        resp.results.len() == sent.len(),
        "publish returned {} results for {} messages",
        resp.results.len(),
        sent.len()
    );
    for (m, r) in sent.iter().zip(&resp.results) {
        anyhow::ensure!(m.id == r.id, "publish result id {:?} does not match message id {:?}", r.id, m.id);
        anyhow::ensure!(r.position.is_some(), "publish result of {:?} has no position", r.id);
    }
    Ok(())
}

/// Polls `check` until it returns `Ok(Some(v))` or the timeout passes (the last error is
/// returned).
pub async fn eventually<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<Option<T>>>,
{
    let deadline = Instant::now() + timeout;
    let mut last: String;
    loop {
        match check().await {
            Ok(Some(v)) => return Ok(v),
            Ok(None) => last = "condition not met yet".to_owned(),
            Err(e) => last = format!("{e:#}"),
        }
        if Instant::now() > deadline {
            bail!("{what}: not reached within {timeout:?} (last: {last})");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Creates a mailbox through `node` and waits until every running node knows it.
pub async fn create_mailbox(cluster: &ProcessCluster, node: NodeId, service: &str, partitions: u32) -> Result<kerwen_proto::v1::MailboxInfo> {
    let mut client = cluster.client(node).await?;
    let info = client.create_mailbox(service, partitions).await.map_err(|s| anyhow!("CreateMailbox({service}): {s:?}"))?;
    trace(format!("mailbox {service} created: {info:?}"));
    wait_mailbox_known(cluster, service).await?;
    Ok(info)
}

/// Waits until every running node knows the mailbox.
pub async fn wait_mailbox_known(cluster: &ProcessCluster, service: &str) -> Result<()> {
    for n in cluster.running() {
        // As an administrator: the mailbox may belong to another subsystem than the test's.
        let c = cluster.admin_client(n).await?;
        eventually(&format!("mailbox {service} visible on node {n}"), Duration::from_secs(30), || {
            let mut c = c.clone();
            async move {
                match c.describe_mailbox(service).await {
                    Ok(_) => Ok(Some(())),
                    Err(s) if s.code() == Code::NotFound => Ok(None),
                    Err(s) => Err(anyhow!("DescribeMailbox: {s:?}")),
                }
            }
        })
        .await?;
    }
    trace(format!("mailbox {service} visible on all nodes"));
    Ok(())
}

/// Pending message count of a mailbox as seen through `node`.
pub async fn pending(cluster: &ProcessCluster, node: NodeId, service: &str) -> Result<u64> {
    let mut c = cluster.client(node).await?;
    let info = tokio::time::timeout(Duration::from_secs(15), c.describe_mailbox(service))
        .await
        .map_err(|_| anyhow!("DescribeMailbox timed out"))?
        .map_err(|s| anyhow!("DescribeMailbox({service}): {s:?}"))?;
    Ok(info.pending_messages)
}

/// Waits until the pending count of a mailbox seen through `node` equals `expected`.
pub async fn wait_pending(cluster: &ProcessCluster, node: NodeId, service: &str, expected: u64, timeout: Duration) -> Result<()> {
    eventually(&format!("pending({service}) == {expected}"), timeout, || async {
        let p = pending(cluster, node, service).await?;
        if p == expected {
            Ok(Some(()))
        } else {
            Err(anyhow!("pending is {p}"))
        }
    })
    .await
}

/// A consumer that keeps the server supplied with credits (a window of `window` outstanding
/// deliveries) and tracks ack confirmations.
pub struct Consumer {
    pub sub: Subscription,
    window: u64,
    granted: u64,
    received: u64,
    /// Positions whose acks the server confirmed.
    pub confirmed: BTreeSet<(u32, u64)>,
}

/// The cluster's published evidence signing keys, as a verifier would fetch them once and
/// trust them.
pub async fn trusted_keys(cluster: &ProcessCluster) -> Result<kerwen_broker::evidence::KeyRing> {
    Ok(cluster.client(1).await?.signing_key_ring().await?)
}

/// Files under `dir` (recursively) that contain `needle`; an error when there are no files.
pub fn files_containing(dir: &Path, needle: &[u8]) -> Result<Vec<String>> {
    let mut pending = vec![dir.to_path_buf()];
    let (mut found, mut files) = (Vec::new(), 0);
    while let Some(path) = pending.pop() {
        if path.is_dir() {
            for entry in std::fs::read_dir(&path).with_context(|| format!("listing {}", path.display()))? {
                pending.push(entry?.path());
            }
        } else {
            files += 1;
            let bytes = std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
            if bytes.windows(needle.len()).any(|w| w == needle) {
                found.push(path.display().to_string());
            }
        }
    }
    ensure!(files > 0, "no files under {}", dir.display());
    Ok(found)
}

pub fn pos_key(p: &Position) -> (u32, u64) {
    (p.partition, p.sequence)
}

impl Consumer {
    pub async fn open(client: &mut Client, mailbox: &str, window: u32) -> Result<Self> {
        let sub = tokio::time::timeout(Duration::from_secs(15), client.subscribe(mailbox, window))
            .await
            .map_err(|_| anyhow!("Subscribe({mailbox}) timed out"))?
            .map_err(|s| anyhow!("Subscribe({mailbox}): {s:?}"))?;
        Ok(Self { sub, window: window as u64, granted: window as u64, received: 0, confirmed: BTreeSet::new() })
    }

    async fn refill(&mut self) -> Result<()> {
        let outstanding = self.granted - self.received;
        if outstanding <= self.window / 2 {
            let more = self.window - outstanding;
            self.sub.credit(more as u32).await.map_err(|s| anyhow!("credit: {s:?}"))?;
            self.granted += more;
        }
        Ok(())
    }

    /// Next event within `timeout` (ack confirmations are also recorded in `confirmed`);
    /// `Ok(None)` on timeout, error if the stream fails or ends.
    pub async fn next_event(&mut self, timeout: Duration) -> Result<Option<Event>> {
        match self.sub.next_event(timeout).await {
            Ok(Some(Event::Delivery(d))) => {
                self.received += 1;
                self.refill().await?;
                Ok(Some(Event::Delivery(d)))
            }
            Ok(Some(Event::Acked(ps))) => {
                self.confirmed.extend(ps.iter().map(pos_key));
                Ok(Some(Event::Acked(ps)))
            }
            Ok(None) => bail!("the server ended the subscription"),
            Err(s) if s.code() == Code::DeadlineExceeded && s.message().contains("no event within") => Ok(None),
            Err(s) => bail!("subscription failed: {s:?}"),
        }
    }

    /// Next delivery within `timeout`; `Ok(None)` on timeout, error if the stream fails or ends.
    pub async fn next(&mut self, timeout: Duration) -> Result<Option<Delivery>> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match self.next_event(left).await? {
                Some(Event::Delivery(d)) => return Ok(Some(d)),
                Some(Event::Acked(_)) => continue,
                None => return Ok(None),
            }
        }
    }

    /// Receives exactly `n` deliveries (error if they do not all arrive within `timeout`).
    pub async fn take(&mut self, n: usize, timeout: Duration) -> Result<Vec<Delivery>> {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut out = Vec::with_capacity(n);
        while out.len() < n {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            if left.is_zero() {
                bail!("received only {} of {n} deliveries within {timeout:?}", out.len());
            }
            if let Some(d) = self.next(left).await? {
                out.push(d);
            }
        }
        Ok(out)
    }

    /// Collects deliveries until none arrives for `quiet`.
    pub async fn drain(&mut self, quiet: Duration) -> Result<Vec<Delivery>> {
        let mut out = Vec::new();
        while let Some(d) = self.next(quiet).await? {
            out.push(d);
        }
        Ok(out)
    }

    pub async fn ack(&mut self, positions: Vec<Position>) -> Result<()> {
        self.sub.ack(positions).await.map_err(|s| anyhow!("ack: {s:?}"))
    }

    /// Waits until every position in `positions` is confirmed acked; deliveries that arrive
    /// meanwhile are returned.
    pub async fn wait_confirmed(&mut self, positions: &[Position], timeout: Duration) -> Result<Vec<Delivery>> {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut extra = Vec::new();
        loop {
            let missing = positions.iter().filter(|p| !self.confirmed.contains(&pos_key(p))).count();
            if missing == 0 {
                return Ok(extra);
            }
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            if left.is_zero() {
                bail!("{missing} of {} acks not confirmed within {timeout:?}", positions.len());
            }
            if let Some(Event::Delivery(d)) = self.next_event(left).await? {
                extra.push(d);
            }
        }
    }
}

/// Status code of a call that is expected to fail.
pub fn expect_err<T: std::fmt::Debug>(what: &str, r: Result<T, Status>) -> Result<Status> {
    match r {
        Ok(v) => bail!("{what}: expected an error, got Ok({v:?})"),
        Err(s) => Ok(s),
    }
}

/// gRPC codes that say the request itself is wrong: retrying cannot help.
pub fn is_caller_error(code: Code) -> bool {
    matches!(
        code,
        Code::InvalidArgument
            | Code::NotFound
            | Code::AlreadyExists
            | Code::ResourceExhausted
            | Code::PermissionDenied
            | Code::Unauthenticated
            | Code::FailedPrecondition
            | Code::OutOfRange
            | Code::Unimplemented
    )
}

/// Publishes `messages` (same ids every time), retrying transient failures until `total` has
/// passed; each call is bounded by `call_timeout`. Returns the response and the number of
/// attempts (more than one means earlier attempts may or may not have been applied).
pub async fn publish_retry(
    client: &mut Client,
    messages: &[Message],
    call_timeout: Duration,
    total: Duration,
) -> Result<(PublishResponse, u32)> {
    let deadline = Instant::now() + total;
    let mut attempts = 0;
    loop {
        attempts += 1;
        let outcome = match tokio::time::timeout(call_timeout, client.publish(messages.to_vec())).await {
            Ok(Ok(resp)) => {
                check_publish_response(messages, &resp)?;
                return Ok((resp, attempts));
            }
            Ok(Err(s)) if is_caller_error(s.code()) => bail!("publish refused: {s:?}"),
            Ok(Err(s)) => format!("{:?}: {}", s.code(), s.message()),
            Err(_) => format!("no answer within {call_timeout:?}"),
        };
        if Instant::now() > deadline {
            bail!("publish still failing after {attempts} attempts over {total:?}; last: {outcome}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

pub fn delivered_id(d: &Delivery) -> Result<String> {
    Ok(d.message.as_ref().ok_or_else(|| anyhow!("delivery without message: {d:?}"))?.id.clone())
}

pub fn delivered_pos(d: &Delivery) -> Result<(u32, u64)> {
    Ok(pos_key(d.position.as_ref().ok_or_else(|| anyhow!("delivery without position: {d:?}"))?))
}

pub fn positions_of(ds: &[Delivery]) -> Vec<Position> {
    ds.iter().filter_map(|d| d.position).collect()
}

/// Consumes until every id of `expected` was delivered at least once, then until the stream is
/// quiet for `quiet`. Returns all deliveries in arrival order.
pub async fn consume_all_of(consumer: &mut Consumer, expected: &HashSet<String>, timeout: Duration, quiet: Duration) -> Result<Vec<Delivery>> {
    let deadline = tokio::time::Instant::now() + timeout;
    let mut seen = HashSet::new();
    let mut out = Vec::new();
    while !expected.iter().all(|id| seen.contains(id)) {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        if left.is_zero() {
            let missing: Vec<&String> = expected.iter().filter(|id| !seen.contains(*id)).take(20).collect();
            bail!(
                "after {timeout:?} {} of {} expected messages were never delivered (first missing: {missing:?})",
                expected.iter().filter(|id| !seen.contains(*id)).count(),
                expected.len()
            );
        }
        if let Some(d) = consumer.next(left).await? {
            seen.insert(delivered_id(&d)?);
            if std::env::var_os("KERWEN_TEST_TRACE_DELIVERIES").is_some() {
                trace(format!("delivery {} {:?} attempt {}", delivered_id(&d)?, d.position, d.attempt));
            }
            out.push(d);
        }
    }
    out.extend(consumer.drain(quiet).await?);
    Ok(out)
}

/// Acks every delivery and waits for the confirmations.
pub async fn ack_all(consumer: &mut Consumer, deliveries: &[Delivery]) -> Result<()> {
    let positions = positions_of(deliveries);
    for chunk in positions.chunks(500) {
        consumer.ack(chunk.to_vec()).await?;
    }
    let extra = consumer.wait_confirmed(&positions, Duration::from_secs(60)).await?;
    ensure!(extra.is_empty(), "{} unexpected deliveries while waiting for ack confirmations: {:?}", extra.len(), extra.first());
    Ok(())
}

/// `GET path` over HTTP/1.0 (the connection closes after the answer): (status, body).
/// Connecting is bounded by 3 s, the whole exchange by `timeout`.
pub async fn http_get(addr: &str, path: &str, timeout: Duration) -> Result<(u16, String)> {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let exchange = async {
        let mut stream = tokio::time::timeout(Duration::from_secs(3), tokio::net::TcpStream::connect(addr))
            .await
            .map_err(|_| anyhow!("connecting to {addr} timed out"))?
            .with_context(|| format!("connecting to {addr}"))?;
        stream.write_all(format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes()).await?;
        let mut response = String::new();
        stream.read_to_string(&mut response).await?;
        let (head, body) = response.split_once("\r\n\r\n").ok_or_else(|| anyhow!("no end of headers from {addr}"))?;
        let status: u16 = head.split_whitespace().nth(1).ok_or_else(|| anyhow!("no status from {addr}"))?.parse()?;
        Ok::<(u16, String), anyhow::Error>((status, body.to_owned()))
    };
    match tokio::time::timeout(timeout, exchange).await {
        Ok(r) => r,
        Err(_) => bail!("GET {path} on {addr}: no answer within {timeout:?}"),
    }
}

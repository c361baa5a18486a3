//! `--embedded`: a local 3-node cluster inside the load generator's process.
//!
//! Each node is a [`kerwen_node::server::serve`] task, configured like `kerwen serve` with
//! default settings, with its own data directory under one temporary directory and its own
//! 127.0.0.1 port (reserved by binding port 0 and releasing it). The nodes run on a dedicated tokio runtime of their own, so the load generator's timers
//! and the nodes' work are scheduled independently (they still share the machine's cores).
//! [`EmbeddedCluster::shutdown`] signals every node, waits for them to close their stores, and
//! removes the temporary directory.
//!
//! Security is as in production: the embedded cluster gets its own CA and certificates, and
//! the load runs as the registered subsystem [`BENCH_SUBSYSTEM`], which owns the mailboxes it
//! publishes to. Against a running cluster, [`external`] does the same with a client profile.

use std::collections::BTreeMap;
use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use kerwen_node::cli::ClientOpts;
use kerwen_node::client::{Client, ClientTls};
use kerwen_node::config::{ServeArgs, DEFAULT_MAX_PAYLOAD_BYTES};
use kerwen_node::pki;
use kerwen_node::tls::TlsFiles;
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// Nodes of the embedded cluster (replication factor 3).
pub const NODES: u64 = 3;
/// How long the cluster may take to elect a leader in every group.
const ELECTION_TIMEOUT: Duration = Duration::from_secs(60);
/// How long the nodes may take to stop after the shutdown signal.
const STOP_TIMEOUT: Duration = Duration::from_secs(30);

/// The subsystem the load runs as; the load's mailboxes are its services.
pub const BENCH_SUBSYSTEM: &str = "TM/GOV/LOAD/bench";

/// How the load's clients reach the cluster.
#[derive(Clone)]
pub struct Connection {
    /// Comma-separated client endpoints.
    pub endpoints: String,
    /// The bench subsystem's certificate (`None` on an insecure cluster).
    pub tls: Option<ClientTls>,
    /// An administrator's certificate: registers subsystems, applies topologies, reads status.
    pub admin: Option<ClientTls>,
    /// Where other subsystems' certificates come from (`None` on an insecure cluster).
    pub issuer: Option<Issuer>,
    /// Publish and subscribe through the endpoint (forwarded) instead of straight to the
    /// shard leaders.
    pub forwarded: bool,
}

/// A development CA on disk that issues subsystem certificates on first use.
#[derive(Clone)]
pub struct Issuer {
    pub ca: PathBuf,
    pub pki_dir: PathBuf,
}

impl Connection {
    pub async fn connect(&self) -> Result<Client, tonic::Status> {
        let client = Client::connect_list_with(&self.endpoints, self.tls.clone()).await?;
        Ok(if self.forwarded { client.without_direct_routing() } else { client })
    }

    pub async fn connect_admin(&self) -> Result<Client, tonic::Status> {
        Client::connect_list_with(&self.endpoints, self.admin.clone()).await
    }

    /// The same cluster, as `subsystem` (its certificate issued by the [`Issuer`] if missing).
    pub fn as_subsystem(&self, subsystem: &str) -> anyhow::Result<Connection> {
        let issuer = self.issuer.as_ref().context("acting as another subsystem needs TLS and a CA that issues its certificate")?;
        let id = pki::subsystem_identity(&issuer.pki_dir, &subsystem.parse()?)?;
        let tls = ClientTls::from_files(&TlsFiles { ca: issuer.ca.clone(), cert: id.cert, key: id.key })?;
        Ok(Connection { tls: Some(tls), ..self.clone() })
    }

    /// The key store of the subsystems' private encryption keys (beside the CA, as
    /// `kerwen keys` and `kerwen dev --scenario` keep it).
    pub fn keys_dir(&self) -> Option<PathBuf> {
        self.issuer.as_ref().map(|i| i.pki_dir.join(kerwen_node::sealed::KEY_STORE_DIR))
    }
}

/// Registers [`BENCH_SUBSYSTEM`] with an admin certificate, tolerating "already registered".
async fn register_bench(endpoints: &str, admin: Option<ClientTls>) -> anyhow::Result<()> {
    let mut client = Client::connect_list_with(endpoints, admin).await.map_err(|s| anyhow::anyhow!("connecting to {endpoints}: {}", s.message()))?;
    match client.add_member(BENCH_SUBSYSTEM, None).await {
        Ok(_) => Ok(()),
        Err(s) if s.code() == tonic::Code::AlreadyExists => Ok(()),
        Err(s) => bail!("registering {BENCH_SUBSYSTEM}: {} ({:?}); the profile must hold an admin certificate", s.message(), s.code()),
    }
}

/// A running cluster: plaintext with `insecure`, otherwise through a client profile whose
/// admin certificate registers the bench subsystem and whose PKI directory issues its
/// certificate (`kerwen dev` writes such a profile).
pub async fn external(endpoints: Option<String>, profile: Option<PathBuf>, insecure: bool) -> anyhow::Result<Connection> {
    let opts = ClientOpts { endpoint: endpoints, profile, insecure, ..ClientOpts::default() };
    let (endpoints, admin) = opts.resolve()?;
    // Mailboxes belong to registered subsystems, also on an insecure cluster.
    register_bench(&endpoints, admin.clone()).await?;
    if insecure {
        return Ok(Connection { endpoints, tls: None, admin: None, issuer: None, forwarded: false });
    }
    let issuer = opts.load_profile()?.and_then(|p| Some(Issuer { ca: p.ca, pki_dir: p.pki_dir? }));
    let (endpoints, tls) = ClientOpts { as_subsystem: Some(BENCH_SUBSYSTEM.to_owned()), ..opts }.resolve()?;
    Ok(Connection { endpoints, tls, admin, issuer, forwarded: false })
}

pub struct EmbeddedCluster {
    /// How the load reaches the nodes.
    pub connection: Connection,
    stop: watch::Sender<bool>,
    nodes: Vec<(u64, JoinHandle<anyhow::Result<()>>)>,
    runtime: Option<tokio::runtime::Runtime>,
    dir: Option<tempfile::TempDir>,
}

/// Reserves `n` distinct free ports on 127.0.0.1 (all bound at once, then released).
fn free_addresses(n: usize) -> anyhow::Result<Vec<SocketAddr>> {
    let listeners = (0..n)
        .map(|_| TcpListener::bind("127.0.0.1:0").context("reserving a local port"))
        .collect::<anyhow::Result<Vec<_>>>()?;
    listeners.iter().map(|l| l.local_addr().context("reading a reserved port")).collect()
}

impl EmbeddedCluster {
    /// Starts the nodes and waits until every Raft group has a leader.
    pub async fn start(shards: u32, max_payload_bytes: usize, insecure: bool, evidence: bool) -> anyhow::Result<EmbeddedCluster> {
        let dir = tempfile::Builder::new().prefix("kerwen-loadtest-").tempdir().context("creating a temporary directory")?;
        let addresses = free_addresses(2 * NODES as usize)?;
        let (client_addresses, peer_addresses) = addresses.split_at(NODES as usize);
        let endpoints = client_addresses.iter().map(|a| a.to_string()).collect::<Vec<_>>().join(",");
        let peers: BTreeMap<u64, String> = (1..=NODES).zip(peer_addresses.iter().map(|a| a.to_string())).collect();
        let peer_list = peers.iter().map(|(id, a)| format!("{id}={a}")).collect::<Vec<_>>().join(",");
        let pki_dir = dir.path().join("pki");
        let ids: Vec<u64> = (1..=NODES).collect();
        let admin_files = pki::create_dev_pki(&pki_dir, &ids, &pki::loopback_hosts())?;
        let ca = pki_dir.join(pki::CA_CERT);
        let admin = ClientTls::from_files(&TlsFiles { ca: ca.clone(), cert: admin_files.cert, key: admin_files.key })?;
        let bench = pki::subsystem_identity(&pki_dir, &BENCH_SUBSYSTEM.parse()?)?;
        let bench = ClientTls::from_files(&TlsFiles { ca: ca.clone(), cert: bench.cert, key: bench.key })?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .thread_name("kerwen-node")
            .enable_all()
            .build()
            .context("starting the embedded cluster's runtime")?;
        let (stop, stop_rx) = watch::channel(false);
        let mut nodes = Vec::new();
        for (id, (listen, peer_listen)) in (1..=NODES).zip(client_addresses.iter().zip(peer_addresses)) {
            let stem = pki::node_file_stem(id);
            // Through `ServeArgs` so that settings added to the node later get their defaults.
            let config = ServeArgs {
                node_id: Some(id),
                listen: Some(*listen),
                peer_listen: Some(*peer_listen),
                peers: Some(peer_list.clone()),
                tls_ca: (!insecure).then(|| ca.clone()),
                tls_cert: (!insecure).then(|| pki_dir.join(format!("{stem}.pem"))),
                tls_key: (!insecure).then(|| pki_dir.join(format!("{stem}.key"))),
                insecure,
                data_dir: Some(dir.path().join(format!("node-{id}"))),
                shards: Some(shards),
                max_payload_bytes: Some(max_payload_bytes.max(DEFAULT_MAX_PAYLOAD_BYTES)),
                no_evidence: !evidence,
                ..ServeArgs::default()
            }
            .resolve()
            .with_context(|| format!("configuring embedded node {id}"))?;
            let mut rx = stop_rx.clone();
            let shutdown = async move {
                let _ = rx.wait_for(|stop| *stop).await;
            };
            nodes.push((id, runtime.spawn(kerwen_node::server::serve(config, shutdown))));
        }
        let connection = if insecure {
            Connection { endpoints, tls: None, admin: None, issuer: None, forwarded: false }
        } else {
            Connection { endpoints, tls: Some(bench), admin: Some(admin), issuer: Some(Issuer { ca, pki_dir }), forwarded: false }
        };
        let mut cluster = EmbeddedCluster { connection, stop, nodes, runtime: Some(runtime), dir: Some(dir) };
        let ready = async {
            cluster.wait_for_leaders().await?;
            register_bench(&cluster.connection.endpoints, cluster.connection.admin.clone()).await
        };
        if let Err(e) = ready.await {
            cluster.shutdown().await;
            return Err(e);
        }
        Ok(cluster)
    }

    async fn wait_for_leaders(&mut self) -> anyhow::Result<()> {
        let deadline = Instant::now() + ELECTION_TIMEOUT;
        loop {
            if let Some(i) = self.nodes.iter().position(|(_, h)| h.is_finished()) {
                let (id, handle) = self.nodes.swap_remove(i);
                let why = match handle.await {
                    Ok(Ok(())) => "it exited".to_owned(),
                    Ok(Err(e)) => format!("{e:#}"),
                    Err(e) => format!("it panicked: {e}"),
                };
                bail!("embedded node {id} stopped while the cluster was starting: {why}");
            }
            let last = match self.connection.connect_admin().await {
                Ok(mut client) => match tokio::time::timeout(Duration::from_secs(3), client.cluster_status()).await {
                    Ok(Ok(status)) => {
                        match Client::leaderless_groups(&status) {
                            Some(leaderless) if leaderless.is_empty() => return Ok(()),
                            Some(leaderless) => format!("groups without a leader: {leaderless:?}"),
                            None => "no groups yet".to_owned(),
                        }
                    }
                    Ok(Err(s)) => format!("cluster status: {s}"),
                    Err(_) => "cluster status timed out".to_owned(),
                },
                Err(s) => format!("connect: {s}"),
            };
            if Instant::now() > deadline {
                bail!("the embedded cluster did not elect leaders within {ELECTION_TIMEOUT:?} ({last})");
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Signals every node, waits for them (bounded), then drops the runtime and the data.
    pub async fn shutdown(&mut self) {
        let _ = self.stop.send(true);
        for (id, handle) in std::mem::take(&mut self.nodes) {
            match tokio::time::timeout(STOP_TIMEOUT, handle).await {
                Ok(Ok(Ok(()))) => {}
                Ok(Ok(Err(e))) => eprintln!("embedded node {id} stopped with an error: {e:#}"),
                Ok(Err(e)) => eprintln!("embedded node {id} panicked: {e}"),
                Err(_) => eprintln!("embedded node {id} did not stop within {STOP_TIMEOUT:?}"),
            }
        }
        if let Some(runtime) = self.runtime.take() {
            // A runtime must not be shut down from inside another one's worker thread.
            let _ = tokio::task::spawn_blocking(move || runtime.shutdown_timeout(Duration::from_secs(5))).await;
        }
        if let Some(dir) = self.dir.take() {
            let path = dir.path().to_owned();
            if let Err(e) = dir.close() {
                eprintln!("could not remove {}: {e}", path.display());
            }
        }
    }

    /// Whether any node task has ended (a node should only end on shutdown).
    pub fn failed_node(&self) -> Option<u64> {
        self.nodes.iter().find(|(_, h)| h.is_finished()).map(|(id, _)| *id)
    }
}

impl Drop for EmbeddedCluster {
    fn drop(&mut self) {
        // Normal runs call `shutdown`; this only covers early returns. Dropping a runtime from
        // inside an async context panics, so hand it to a plain thread.
        let _ = self.stop.send(true);
        if let Some(runtime) = self.runtime.take() {
            let _ = std::thread::spawn(move || runtime.shutdown_timeout(Duration::from_secs(5))).join();
        }
    }
}

//! A Kerwen cluster in Docker containers, for the chaos tests (`tests/chaos.rs`).
//!
//! [`DockerCluster`] runs one container of the project's image (`kerwen:dev`, built by
//! `scripts/image`, or `$KERWEN_CHAOS_IMAGE`) per node on a private network made for the test
//! (`docker network create --internal`, so nothing leaves the host; no image is ever pulled).
//! Each container gets a fixed address on that network, so the host reaches the nodes' ports
//! directly through the bridge and a node keeps its address across restarts and reconnects.
//! Nodes name their peers by container name (Docker's embedded DNS resolves it); every node
//! certificate carries its container name as a DNS SAN and its address as an IP SAN, so both
//! the nodes and the host's clients verify it.
//!
//! Each node's data directory (`/var/lib/kerwen`) is a bind mount of a host directory owned by
//! the image's user (65532); one node's can be a small tmpfs mounted for the test, so that the
//! test can fill that disk from the host ([`DockerCluster::fill_disk`]). Certificates are
//! mounted read-only.
//!
//! Everything the cluster creates (containers, the network, tmpfs mounts, the temporary
//! directory) is named with a unique suffix (`$KERWEN_CHAOS_RUN`, else the test's pid) and is
//! removed by `Drop`, also when the test panics; then the containers' logs are printed (tails)
//! and saved under `$CARGO_TARGET_TMPDIR/kerwen-test-logs/chaos/`. Every Docker command and
//! every network call is bounded in time.

use std::collections::{BTreeMap, BTreeSet};
use std::ffi::CString;
use std::io::{self, Write};
use std::net::Ipv4Addr;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use kerwen_broker::access::Principal;
use kerwen_node::client::{Client, ClientTls};
use kerwen_node::pki::{self, CertificateAuthority, IdentityFiles};
use kerwen_node::tls::TlsFiles;
use kerwen_proto::v1::ClusterStatusResponse;

use super::{trace, GroupId, NodeId, TEST_SUBSYSTEM};

/// The image's user and group (node/Dockerfile): data and certificates must be theirs.
pub const IMAGE_UID: u32 = 65532;
/// Ports inside every container (the image's `EXPOSE`).
pub const CLIENT_PORT: u16 = 7000;
pub const PEER_PORT: u16 = 7100;
pub const HTTP_PORT: u16 = 7200;
/// Bound of one Docker CLI command (`docker stop -t 20` included).
const DOCKER_TIMEOUT: Duration = Duration::from_secs(60);
/// Bound of one Docker command while cleaning up.
const CLEANUP_TIMEOUT: Duration = Duration::from_secs(30);
/// Bound of one status call.
const CALL_TIMEOUT: Duration = Duration::from_secs(3);
/// Where certificates are mounted inside the containers.
const TLS_MOUNT: &str = "/etc/kerwen";
/// Label on every container and network, valued with the run's suffix (for manual cleanup:
/// `docker rm -f $(docker ps -aq --filter label=kerwen-chaos=SUFFIX)`).
pub const LABEL: &str = "kerwen-chaos";

/// Options of a [`DockerCluster`].
#[derive(Debug, Clone)]
pub struct DockerClusterBuilder {
    nodes: u64,
    shards: u32,
    image: String,
    /// The node whose data directory is a tmpfs of this many bytes.
    tmpfs: Option<(NodeId, u64)>,
    env: Vec<(String, String)>,
    identity: String,
    start_timeout: Duration,
}

impl Default for DockerClusterBuilder {
    fn default() -> Self {
        Self {
            nodes: 3,
            shards: 3,
            image: std::env::var("KERWEN_CHAOS_IMAGE").unwrap_or_else(|_| "kerwen:dev".to_owned()),
            tmpfs: None,
            env: Vec::new(),
            identity: TEST_SUBSYSTEM.to_owned(),
            start_timeout: Duration::from_secs(120),
        }
    }
}

impl DockerClusterBuilder {
    pub fn nodes(mut self, n: u64) -> Self {
        self.nodes = n;
        self
    }
    pub fn shards(mut self, n: u32) -> Self {
        self.shards = n;
        self
    }
    /// Puts `node`'s data directory on a tmpfs of `bytes` (mounted on the host for the test).
    pub fn tmpfs_data_dir(mut self, node: NodeId, bytes: u64) -> Self {
        self.tmpfs = Some((node, bytes));
        self
    }
    /// An environment variable of every node (`KERWEN_*` settings, `RUST_LOG`).
    pub fn env(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.env.push((key.into(), value.into()));
        self
    }
    /// The subsystem registered at start and used by [`DockerCluster::client_from`].
    pub fn identity(mut self, subsystem: impl Into<String>) -> Self {
        self.identity = subsystem.into();
        self
    }

    /// Creates everything, starts every container and waits until every node's `/readyz`
    /// answers 200, then registers the identity. On error, what was created is removed.
    pub async fn start(self) -> Result<DockerCluster> {
        let timeout = self.start_timeout;
        let cluster = DockerCluster::create(self).await?;
        let started = async {
            for id in cluster.node_ids() {
                cluster.run_container(id).await?;
            }
            cluster.wait_all_ready(timeout).await?;
            let identity = cluster.identity.clone();
            cluster.register(&identity).await
        };
        if let Err(e) = started.await {
            let mut tails = String::new();
            for id in cluster.node_ids() {
                tails.push_str(&cluster.log_tail(id, 40).await);
            }
            return Err(e.context(format!("starting the container cluster failed; node logs:\n{tails}")));
        }
        trace(format!("container cluster {} ready: {:?}", cluster.suffix, cluster.describe_nodes()));
        Ok(cluster)
    }
}

/// One node of the cluster.
#[derive(Debug, Clone)]
pub struct DockerNode {
    pub id: NodeId,
    /// Container name: also its host name on the network and its certificate's DNS SAN.
    pub name: String,
    pub ip: Ipv4Addr,
    /// Host directory mounted at `/var/lib/kerwen`.
    pub data_dir: PathBuf,
    /// Host directory mounted read-only at `/etc/kerwen` (CA, certificate, key).
    tls_dir: PathBuf,
    /// Size of the tmpfs holding `data_dir`, if it is one.
    pub tmpfs_bytes: Option<u64>,
}

/// A container's state as Docker reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContainerState {
    /// `created`, `running`, `paused`, `restarting`, `exited`, `dead`.
    pub status: String,
    pub exit_code: i64,
    pub oom_killed: bool,
}

impl ContainerState {
    pub fn running(&self) -> bool {
        self.status == "running"
    }
}

/// A Kerwen cluster of Docker containers. See the module documentation.
pub struct DockerCluster {
    suffix: String,
    image: String,
    network: String,
    subnet: Mutex<Option<String>>,
    nodes: BTreeMap<NodeId, DockerNode>,
    shards: u32,
    env: Vec<(String, String)>,
    identity: String,
    pki_dir: PathBuf,
    admin: IdentityFiles,
    /// What exists and must be removed on drop.
    network_created: Mutex<bool>,
    containers: Mutex<BTreeSet<String>>,
    mounts: Mutex<Vec<PathBuf>>,
    /// Filler files written by [`DockerCluster::fill_disk`], removed on drop too.
    fillers: Mutex<Vec<PathBuf>>,
    tmp: Option<tempfile::TempDir>,
}

impl DockerCluster {
    pub fn builder() -> DockerClusterBuilder {
        DockerClusterBuilder::default()
    }

    /// Is a Docker engine reachable, and does it have `image`? (`docker info` and
    /// `docker image inspect`, each bounded.)
    pub async fn engine_has_image(image: &str) -> Result<()> {
        docker(&["info", "--format", "{{.ServerVersion}}"], Duration::from_secs(20)).await.context("no Docker engine")?;
        docker(&["image", "inspect", "--format", "{{.Id}}", image], Duration::from_secs(20))
            .await
            .with_context(|| format!("image {image} is missing: run scripts/image"))?;
        Ok(())
    }

    /// Creates the temporary directory, the PKI, the data directories (and the tmpfs) and the
    /// network; no container yet. The returned value owns all of it from the first step on.
    async fn create(b: DockerClusterBuilder) -> Result<Self> {
        anyhow::ensure!((1..=200).contains(&b.nodes), "1..=200 nodes");
        let suffix = std::env::var("KERWEN_CHAOS_RUN")
            .ok()
            .filter(|s| !s.is_empty() && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '-'))
            .unwrap_or_else(|| std::process::id().to_string());
        let tmp = tempfile::Builder::new()
            .prefix(&format!("kerwen-chaos-{suffix}-"))
            .tempdir()
            .context("creating the cluster's temporary directory")?;
        let root = tmp.path().to_owned();
        // Ids, names and addresses are fixed now; the subnet's first three octets are filled in
        // once the network exists (below), since the certificates name the addresses.
        let network = format!("kerwen-chaos-{suffix}");
        let mut cluster = Self {
            suffix: suffix.clone(),
            image: b.image.clone(),
            network: network.clone(),
            subnet: Mutex::new(None),
            nodes: BTreeMap::new(),
            shards: b.shards,
            env: b.env.clone(),
            identity: b.identity.clone(),
            pki_dir: root.join("pki"),
            admin: IdentityFiles { cert: PathBuf::new(), key: PathBuf::new() },
            network_created: Mutex::new(false),
            containers: Mutex::new(BTreeSet::new()),
            mounts: Mutex::new(Vec::new()),
            fillers: Mutex::new(Vec::new()),
            tmp: Some(tmp),
        };
        let base = cluster.create_network().await?;
        for id in 1..=b.nodes {
            let name = format!("kerwen-chaos-{suffix}-n{id}");
            // .1 is the bridge (the host's side); nodes from .11 on.
            let ip = Ipv4Addr::new(base[0], base[1], base[2], 10 + id as u8);
            let data_dir = root.join(format!("node-{id}-data"));
            std::fs::create_dir_all(&data_dir).with_context(|| format!("creating {}", data_dir.display()))?;
            let tmpfs_bytes = b.tmpfs.filter(|(n, _)| *n == id).map(|(_, bytes)| bytes);
            if let Some(bytes) = tmpfs_bytes {
                cluster.mount_tmpfs(&data_dir, bytes)?;
            }
            chown_image_user(&data_dir)?;
            set_mode(&data_dir, 0o700)?;
            let tls_dir = root.join(format!("node-{id}-tls"));
            cluster.nodes.insert(id, DockerNode { id, name, ip, data_dir, tls_dir, tmpfs_bytes });
        }
        cluster.write_pki()?;
        Ok(cluster)
    }

    /// `docker network create --internal` on a free /24 (tried in turn; the engine refuses
    /// one that overlaps another network). Returns the subnet's first three octets.
    async fn create_network(&self) -> Result<[u8; 3]> {
        let pid = std::process::id();
        let mut last = String::new();
        for attempt in 0..40u32 {
            let third = ((pid + attempt * 37) % 250 + 1) as u8;
            let base = [10, 213, third];
            let subnet = format!("10.213.{third}.0/24");
            let label = format!("{LABEL}={}", self.suffix);
            let args: [&str; 10] =
                ["network", "create", "--internal", "--driver", "bridge", "--subnet", &subnet, "--label", &label, &self.network];
            match docker(&args, DOCKER_TIMEOUT).await {
                Ok(_) => {
                    *lock(&self.network_created) = true;
                    *lock(&self.subnet) = Some(subnet.clone());
                    trace(format!("network {} ({subnet}, internal) created", self.network));
                    return Ok(base);
                }
                Err(e) => {
                    let text = format!("{e:#}");
                    if !text.contains("overlap") {
                        return Err(e.context(format!("creating network {}", self.network)));
                    }
                    last = text;
                }
            }
        }
        bail!("no free /24 in 10.213.0.0/16 for the test network (last: {last})")
    }

    /// Mounts a tmpfs of `bytes` on `dir` (the test runs as root; the mount is undone on drop).
    fn mount_tmpfs(&self, dir: &Path, bytes: u64) -> Result<()> {
        let target = CString::new(dir.as_os_str().as_bytes())?;
        let fstype = CString::new("tmpfs")?;
        let data = CString::new(format!("size={bytes},mode=0700,uid={IMAGE_UID},gid={IMAGE_UID}"))?;
        // SAFETY: all pointers are valid NUL-terminated strings that outlive the call.
        let rc = unsafe { libc::mount(fstype.as_ptr(), target.as_ptr(), fstype.as_ptr(), 0, data.as_ptr().cast()) };
        if rc != 0 {
            return Err(io::Error::last_os_error())
                .with_context(|| format!("mounting a {bytes}-byte tmpfs on {} (needs root)", dir.display()));
        }
        lock(&self.mounts).push(dir.to_owned());
        trace(format!("tmpfs of {} MiB mounted on {}", bytes >> 20, dir.display()));
        Ok(())
    }

    /// The CA, one certificate per node (DNS SAN: its container name; IP SAN: its address),
    /// the admin's; each node's files copied into its own directory, readable by the image's
    /// user and mounted read-only.
    fn write_pki(&mut self) -> Result<()> {
        let ca = CertificateAuthority::generate("Kerwen chaos test CA")?;
        ca.save(&self.pki_dir)?;
        for node in self.nodes.values() {
            let hosts = vec![node.name.clone(), node.ip.to_string()];
            let stem = pki::node_file_stem(node.id);
            let (cert, key) = ca.issue_for(&Principal::Node(node.id), &hosts, pki::DEFAULT_VALIDITY)?.write(&self.pki_dir, &stem)?;
            std::fs::create_dir_all(&node.tls_dir).with_context(|| format!("creating {}", node.tls_dir.display()))?;
            for (from, to, mode) in [
                (self.pki_dir.join(pki::CA_CERT), "ca.pem", 0o444),
                (cert, "node.pem", 0o444),
                (key, "node.key", 0o400),
            ] {
                let dest = node.tls_dir.join(to);
                std::fs::copy(&from, &dest).with_context(|| format!("copying {} to {}", from.display(), dest.display()))?;
                chown_image_user(&dest)?;
                set_mode(&dest, mode)?;
            }
            chown_image_user(&node.tls_dir)?;
            set_mode(&node.tls_dir, 0o500)?;
        }
        let (cert, key) = ca.issue_for(&Principal::Admin("admin".into()), &[], pki::DEFAULT_VALIDITY)?.write(&self.pki_dir, "admin")?;
        self.admin = IdentityFiles { cert, key };
        Ok(())
    }

    /// `docker run -d` of one node (first start).
    async fn run_container(&self, id: NodeId) -> Result<()> {
        let node = self.node(id)?;
        let peers = self.nodes.values().map(|n| format!("{}={}:{PEER_PORT}", n.id, n.name)).collect::<Vec<_>>().join(",");
        let mut env: Vec<(String, String)> = vec![
            ("KERWEN_NODE_ID".into(), id.to_string()),
            ("KERWEN_LISTEN".into(), format!("0.0.0.0:{CLIENT_PORT}")),
            ("KERWEN_PEER_LISTEN".into(), format!("0.0.0.0:{PEER_PORT}")),
            ("KERWEN_HTTP_LISTEN".into(), format!("0.0.0.0:{HTTP_PORT}")),
            ("KERWEN_PEERS".into(), peers),
            ("KERWEN_TLS_CA".into(), format!("{TLS_MOUNT}/ca.pem")),
            ("KERWEN_TLS_CERT".into(), format!("{TLS_MOUNT}/node.pem")),
            ("KERWEN_TLS_KEY".into(), format!("{TLS_MOUNT}/node.key")),
            ("KERWEN_SHARDS".into(), self.shards.to_string()),
            ("RUST_LOG".into(), "info,openraft=warn".into()),
            ("NO_COLOR".into(), "1".into()),
        ];
        for (k, v) in &self.env {
            env.retain(|(key, _)| key != k);
            env.push((k.clone(), v.clone()));
        }
        let label = format!("{LABEL}={}", self.suffix);
        let ip = node.ip.to_string();
        let tls_mount = format!("{}:{TLS_MOUNT}:ro", node.tls_dir.display());
        let data_mount = format!("{}:/var/lib/kerwen", node.data_dir.display());
        let base: [&str; 10] = ["run", "-d", "--name", &node.name, "--hostname", &node.name, "--network", &self.network, "--ip", &ip];
        let mut args: Vec<String> = base.iter().map(|s| s.to_string()).collect();
        args.extend(["--label".into(), label, "-v".into(), tls_mount, "-v".into(), data_mount]);
        for (k, v) in env {
            args.push("-e".into());
            args.push(format!("{k}={v}"));
        }
        args.push(self.image.clone());
        // Recorded before the run: a run that times out may still have created it.
        lock(&self.containers).insert(node.name.clone());
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        docker(&refs, DOCKER_TIMEOUT).await.with_context(|| format!("starting node {id}'s container"))?;
        trace(format!("node {id}: container {} at {ip} started", node.name));
        Ok(())
    }

    // -----------------------------------------------------------------------------------------
    // Queries
    // -----------------------------------------------------------------------------------------

    pub fn suffix(&self) -> &str {
        &self.suffix
    }

    pub fn node_ids(&self) -> Vec<NodeId> {
        self.nodes.keys().copied().collect()
    }

    /// Data shard ids 1..=shards and the metadata group 0.
    pub fn groups(&self) -> Vec<GroupId> {
        (0..=self.shards).collect()
    }

    pub fn node(&self, id: NodeId) -> Result<&DockerNode> {
        self.nodes.get(&id).ok_or_else(|| anyhow!("no node {id} in this cluster"))
    }

    fn describe_nodes(&self) -> Vec<String> {
        self.nodes.values().map(|n| format!("{}={}@{}", n.id, n.name, n.ip)).collect()
    }

    /// `ip:7000`: the node's client port, reachable from the host through the bridge.
    pub fn endpoint(&self, id: NodeId) -> Result<String> {
        Ok(format!("{}:{CLIENT_PORT}", self.node(id)?.ip))
    }

    /// `ip:7200`: the node's operations port.
    pub fn http_endpoint(&self, id: NodeId) -> Result<String> {
        Ok(format!("{}:{HTTP_PORT}", self.node(id)?.ip))
    }

    /// Every client endpoint, starting with the `first`-th (0-based, wrapping): a client
    /// tries them in this order.
    pub fn endpoints_from(&self, first: usize) -> Vec<String> {
        let all: Vec<String> = self.nodes.values().map(|n| format!("{}:{CLIENT_PORT}", n.ip)).collect();
        let n = all.len().max(1);
        (0..all.len()).map(|i| all[(first + i) % n].clone()).collect()
    }

    pub fn pki_dir(&self) -> &Path {
        &self.pki_dir
    }

    pub fn tls_for(&self, files: &IdentityFiles) -> Result<ClientTls> {
        ClientTls::from_files(&TlsFiles { ca: self.pki_dir.join(pki::CA_CERT), cert: files.cert.clone(), key: files.key.clone() })
    }

    /// TLS settings of `subsystem`'s client certificate (issued on first use).
    pub fn subsystem_tls(&self, subsystem: &str) -> Result<ClientTls> {
        let files = pki::subsystem_identity(&self.pki_dir, &subsystem.parse()?)?;
        self.tls_for(&files)
    }

    /// A client knowing every node, trying them from the `first`-th on (it fails over on
    /// transport errors), acting as the cluster's identity. Bounded.
    pub async fn client_from(&self, first: usize) -> Result<Client> {
        self.connect(self.endpoints_from(first), self.subsystem_tls(&self.identity)?).await
    }

    /// A client of exactly `node` (no failover), acting as the cluster's identity. Bounded.
    pub async fn client_of(&self, node: NodeId) -> Result<Client> {
        self.connect(vec![self.endpoint(node)?], self.subsystem_tls(&self.identity)?).await
    }

    /// A client of exactly `node`, acting as the administrator. Bounded.
    pub async fn admin_client(&self, node: NodeId) -> Result<Client> {
        self.connect(vec![self.endpoint(node)?], self.tls_for(&self.admin)?).await
    }

    async fn connect(&self, endpoints: Vec<String>, tls: ClientTls) -> Result<Client> {
        match tokio::time::timeout(Duration::from_secs(10), Client::connect_with(&endpoints, Some(tls))).await {
            Ok(Ok(c)) => Ok(c),
            Ok(Err(s)) => bail!("connecting to {endpoints:?}: {s}"),
            Err(_) => bail!("connecting to {endpoints:?} timed out"),
        }
    }

    /// Registers a subsystem through any node (already registered is fine), within 60 s.
    pub async fn register(&self, subsystem: &str) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut turn = 0usize;
        loop {
            let ids = self.node_ids();
            let node = ids[turn % ids.len()];
            turn += 1;
            let attempt = async { self.admin_client(node).await?.add_member(subsystem, None).await.map_err(|s| anyhow!("{s}")) };
            match tokio::time::timeout(Duration::from_secs(10), attempt).await {
                Ok(Ok(_)) => return Ok(()),
                Ok(Err(e)) if e.to_string().contains("already registered") => return Ok(()),
                Ok(Err(e)) if Instant::now() > deadline => return Err(e.context(format!("registering {subsystem}"))),
                Err(_) if Instant::now() > deadline => bail!("registering {subsystem} timed out"),
                _ => tokio::time::sleep(Duration::from_millis(300)).await,
            }
        }
    }

    /// One `ClusterStatus` from `node`, bounded.
    pub async fn status(&self, node: NodeId) -> Result<ClusterStatusResponse> {
        let fut = async {
            let mut client = self.admin_client(node).await?;
            client.cluster_status().await.map_err(|s| anyhow!("{s}"))
        };
        match tokio::time::timeout(CALL_TIMEOUT, fut).await {
            Ok(r) => r.with_context(|| format!("ClusterStatus on node {node}")),
            Err(_) => bail!("ClusterStatus on node {node} timed out after {CALL_TIMEOUT:?}"),
        }
    }

    /// The leader of `group` that every node of `among` names and that calls itself leader,
    /// waited for up to `timeout`.
    pub async fn leader_of(&self, group: GroupId, among: &[NodeId], timeout: Duration) -> Result<NodeId> {
        let deadline = Instant::now() + timeout;
        loop {
            let attempt = async {
                let mut named = BTreeSet::new();
                let mut roles = BTreeMap::new();
                for &n in among {
                    let st = self.status(n).await?;
                    let g = st.groups.iter().find(|g| g.group == group).ok_or_else(|| anyhow!("node {n} does not report group {group}"))?;
                    named.insert(g.leader);
                    roles.insert(n, g.local_role.clone());
                }
                match named.into_iter().collect::<Vec<_>>().as_slice() {
                    [Some(l)] if roles.get(l).is_some_and(|r| r.eq_ignore_ascii_case("leader")) => Ok::<NodeId, anyhow::Error>(*l),
                    other => bail!("group {group}: leaders named {other:?}, roles {roles:?}"),
                }
            };
            match attempt.await {
                Ok(l) => return Ok(l),
                Err(e) if Instant::now() > deadline => return Err(e.context(format!("no agreed leader of group {group} within {timeout:?}"))),
                Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
            }
        }
    }

    /// `docker inspect` of the node's container.
    pub async fn state(&self, id: NodeId) -> Result<ContainerState> {
        let name = &self.node(id)?.name;
        let out = docker(&["inspect", "--format", "{{.State.Status}} {{.State.ExitCode}} {{.State.OOMKilled}}", name], DOCKER_TIMEOUT).await?;
        let mut parts = out.split_whitespace();
        let status = parts.next().ok_or_else(|| anyhow!("docker inspect {name}: empty answer"))?.to_owned();
        let exit_code = parts.next().and_then(|c| c.parse().ok()).ok_or_else(|| anyhow!("docker inspect {name}: no exit code in {out:?}"))?;
        let oom_killed = parts.next() == Some("true");
        Ok(ContainerState { status, exit_code, oom_killed })
    }

    /// `GET path` on the node's operations port: (status, body). Bounded by `timeout`.
    pub async fn http(&self, id: NodeId, path: &str, timeout: Duration) -> Result<(u16, String)> {
        super::http_get(&self.http_endpoint(id)?, path, timeout).await
    }

    /// Whether `/readyz` answers 200 now.
    pub async fn is_ready(&self, id: NodeId) -> bool {
        matches!(self.http(id, "/readyz", Duration::from_secs(3)).await, Ok((200, _)))
    }

    /// Waits until every node's `/readyz` answers 200 at the same time; returns how long it
    /// took. The error names each node's last answer.
    pub async fn wait_all_ready(&self, timeout: Duration) -> Result<Duration> {
        let started = Instant::now();
        let deadline = started + timeout;
        loop {
            let mut last = BTreeMap::new();
            for id in self.node_ids() {
                let answer = match self.http(id, "/readyz", Duration::from_secs(3)).await {
                    Ok((status, body)) => format!("{status} {}", body.trim()),
                    Err(e) => format!("{e:#}"),
                };
                last.insert(id, answer);
            }
            if last.values().all(|a| a.starts_with("200")) {
                return Ok(started.elapsed());
            }
            if Instant::now() > deadline {
                bail!("the cluster was not ready within {timeout:?}; /readyz per node: {last:?}");
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// Waits until one node's `/readyz` answers 200.
    pub async fn wait_ready(&self, id: NodeId, timeout: Duration) -> Result<Duration> {
        let started = Instant::now();
        loop {
            let last = match self.http(id, "/readyz", Duration::from_secs(3)).await {
                Ok((200, _)) => return Ok(started.elapsed()),
                Ok((status, body)) => format!("{status} {}", body.trim()),
                Err(e) => format!("{e:#}"),
            };
            if started.elapsed() > timeout {
                bail!("node {id} was not ready within {timeout:?} (last: {last})");
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// The last `lines` lines of the container's output (stdout and stderr), bounded.
    pub async fn log_tail(&self, id: NodeId, lines: usize) -> String {
        let Ok(node) = self.node(id) else { return format!("(no node {id})\n") };
        let n = lines.to_string();
        let out = docker_output(&["logs", "--tail", &n, &node.name], Duration::from_secs(20)).await;
        format!("----- tail of node {id} ({}) -----\n{}\n", node.name, out.unwrap_or_else(|e| format!("(no logs: {e:#})")))
    }

    // -----------------------------------------------------------------------------------------
    // Faults
    // -----------------------------------------------------------------------------------------

    /// `docker kill` (SIGKILL), then waits until the container is no longer running.
    pub async fn kill(&self, id: NodeId) -> Result<()> {
        trace(format!("docker kill node {id}"));
        docker(&["kill", &self.node(id)?.name], DOCKER_TIMEOUT).await?;
        self.wait_not_running(id, Duration::from_secs(30)).await
    }

    /// `docker stop -t GRACE` (SIGTERM, SIGKILL after the grace period); returns the exit
    /// code.
    pub async fn stop(&self, id: NodeId, grace: Duration) -> Result<i64> {
        trace(format!("docker stop -t {} node {id}", grace.as_secs()));
        let secs = grace.as_secs().to_string();
        docker(&["stop", "-t", &secs, &self.node(id)?.name], grace + DOCKER_TIMEOUT).await?;
        let state = self.state(id).await?;
        anyhow::ensure!(!state.running(), "node {id} still runs after docker stop: {state:?}");
        Ok(state.exit_code)
    }

    /// `docker start` of a stopped container (same network address, same mounts).
    pub async fn start(&self, id: NodeId) -> Result<()> {
        trace(format!("docker start node {id}"));
        docker(&["start", &self.node(id)?.name], DOCKER_TIMEOUT).await.map(|_| ())
    }

    /// `docker restart -t GRACE`.
    pub async fn restart(&self, id: NodeId, grace: Duration) -> Result<()> {
        trace(format!("docker restart node {id}"));
        let secs = grace.as_secs().to_string();
        docker(&["restart", "-t", &secs, &self.node(id)?.name], grace + DOCKER_TIMEOUT).await.map(|_| ())
    }

    /// `docker pause` (the cgroup freezer: every process of the container stops, SIGSTOP-like).
    pub async fn pause(&self, id: NodeId) -> Result<()> {
        trace(format!("docker pause node {id}"));
        docker(&["pause", &self.node(id)?.name], DOCKER_TIMEOUT).await.map(|_| ())
    }

    pub async fn unpause(&self, id: NodeId) -> Result<()> {
        trace(format!("docker unpause node {id}"));
        docker(&["unpause", &self.node(id)?.name], DOCKER_TIMEOUT).await.map(|_| ())
    }

    /// `docker network disconnect`: the node loses its only network, so it is cut off from the
    /// other nodes and from the host's clients.
    pub async fn disconnect(&self, id: NodeId) -> Result<()> {
        trace(format!("docker network disconnect node {id}"));
        docker(&["network", "disconnect", &self.network, &self.node(id)?.name], DOCKER_TIMEOUT).await.map(|_| ())
    }

    /// `docker network connect` back, at the node's fixed address.
    pub async fn connect_network(&self, id: NodeId) -> Result<()> {
        trace(format!("docker network connect node {id}"));
        let node = self.node(id)?;
        let ip = node.ip.to_string();
        docker(&["network", "connect", "--ip", &ip, &self.network, &node.name], DOCKER_TIMEOUT).await.map(|_| ())
    }

    async fn wait_not_running(&self, id: NodeId, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let state = self.state(id).await?;
            if !state.running() {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("node {id} still running after {timeout:?}: {state:?}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// `(used, size)` of the node's tmpfs data directory, from `statvfs`.
    pub fn disk_usage(&self, id: NodeId) -> Result<(u64, u64)> {
        let dir = &self.node(id)?.data_dir;
        let path = CString::new(dir.as_os_str().as_bytes())?;
        // SAFETY: statvfs writes into the zeroed struct we own; the path is NUL-terminated.
        let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
        if unsafe { libc::statvfs(path.as_ptr(), &mut st) } != 0 {
            return Err(io::Error::last_os_error()).with_context(|| format!("statvfs {}", dir.display()));
        }
        let size = st.f_blocks as u64 * st.f_frsize as u64;
        let free = st.f_bfree as u64 * st.f_frsize as u64;
        Ok((size - free.min(size), size))
    }

    /// Writes to a filler file in the node's (tmpfs) data directory until the disk answers
    /// ENOSPC; called again, tops it up (the node may have freed space meanwhile). Returns the
    /// filler's size. Only ENOSPC ends the filling; any other error is returned.
    pub fn fill_disk(&self, id: NodeId) -> Result<u64> {
        let node = self.node(id)?;
        anyhow::ensure!(node.tmpfs_bytes.is_some(), "node {id}'s data directory is not a test tmpfs: refusing to fill it");
        let path = node.data_dir.join("chaos-disk-filler");
        {
            let mut fillers = lock(&self.fillers);
            if !fillers.contains(&path) {
                fillers.push(path.clone());
            }
        }
        let mut file = std::fs::OpenOptions::new().create(true).append(true).open(&path).with_context(|| format!("opening {}", path.display()))?;
        let big = vec![0xA5u8; 1 << 20];
        // Large chunks first, then small ones for the last partial megabyte.
        for chunk in [&big[..], &big[..4096]] {
            loop {
                match file.write(chunk) {
                    Ok(0) => break,
                    Ok(_) => continue,
                    Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => break,
                    Err(e) => return Err(e).with_context(|| format!("filling {}", path.display())),
                }
            }
        }
        let len = file.metadata().with_context(|| format!("stat {}", path.display()))?.len();
        Ok(len)
    }

    /// How many lines of the container's output contain `needle` (bounded).
    pub async fn log_count(&self, id: NodeId, needle: &str) -> Result<usize> {
        let out = docker_output(&["logs", &self.node(id)?.name], Duration::from_secs(30)).await?;
        Ok(out.lines().filter(|l| l.contains(needle)).count())
    }

    /// Deletes the filler file.
    pub fn free_disk(&self, id: NodeId) -> Result<()> {
        let path = self.node(id)?.data_dir.join("chaos-disk-filler");
        match std::fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e).with_context(|| format!("removing {}", path.display())),
        }
    }

    // -----------------------------------------------------------------------------------------
    // Cleanup
    // -----------------------------------------------------------------------------------------

    fn save_logs(&self, print_tails: bool) {
        let dest = Path::new(env!("CARGO_TARGET_TMPDIR")).join("kerwen-test-logs").join("chaos");
        let saved = std::fs::create_dir_all(&dest).is_ok();
        for node in self.nodes.values() {
            if !lock(&self.containers).contains(&node.name) {
                continue;
            }
            let Ok(text) = docker_blocking(&["logs", &node.name], CLEANUP_TIMEOUT) else { continue };
            if saved {
                let _ = std::fs::write(dest.join(format!("node-{}.log", node.id)), &text);
            }
            if print_tails {
                let lines: Vec<&str> = text.lines().collect();
                eprintln!("----- tail of node {} ({}) -----", node.id, node.name);
                for l in &lines[lines.len().saturating_sub(40)..] {
                    eprintln!("{l}");
                }
            }
        }
        if saved {
            eprintln!("docker harness: node logs saved in {}", dest.display());
        }
    }
}

impl Drop for DockerCluster {
    fn drop(&mut self) {
        let failing = std::thread::panicking();
        if failing || std::env::var_os("KERWEN_TEST_LOGS").is_some() {
            self.save_logs(true);
        }
        let containers: Vec<String> = std::mem::take(&mut *lock(&self.containers)).into_iter().collect();
        for name in &containers {
            // A paused container must be thawed before it can be killed on older engines.
            let _ = docker_blocking(&["unpause", name], CLEANUP_TIMEOUT);
            if let Err(e) = docker_blocking(&["rm", "-f", "-v", name], CLEANUP_TIMEOUT) {
                if !format!("{e:#}").contains("No such container") {
                    eprintln!("docker harness: could not remove container {name}: {e:#}");
                }
            }
        }
        if std::mem::take(&mut *lock(&self.network_created)) {
            if let Err(e) = docker_blocking(&["network", "rm", &self.network], CLEANUP_TIMEOUT) {
                eprintln!("docker harness: could not remove network {}: {e:#}", self.network);
            }
        }
        for filler in std::mem::take(&mut *lock(&self.fillers)) {
            let _ = std::fs::remove_file(filler);
        }
        for mount in std::mem::take(&mut *lock(&self.mounts)).into_iter().rev() {
            let Ok(target) = CString::new(mount.as_os_str().as_bytes()) else { continue };
            // SAFETY: a valid NUL-terminated path. MNT_DETACH: a late reference (a container
            // the engine is still tearing down) cannot keep the mount, or this test, stuck.
            if unsafe { libc::umount2(target.as_ptr(), libc::MNT_DETACH) } != 0 {
                eprintln!("docker harness: could not unmount {}: {}", mount.display(), io::Error::last_os_error());
            }
        }
        if let Some(tmp) = self.tmp.take() {
            if std::env::var_os("KERWEN_TEST_KEEP_DIR").is_some() {
                let path = tmp.keep();
                eprintln!("docker harness: kept cluster directory {}", path.display());
            }
            // Otherwise TempDir's drop removes everything (root may delete the 65532-owned files).
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

/// A poisoned lock only means another thread panicked while holding it; the data (names of
/// things to clean up) is still right.
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn chown_image_user(path: &Path) -> Result<()> {
    std::os::unix::fs::chown(path, Some(IMAGE_UID), Some(IMAGE_UID)).with_context(|| format!("chown {} to {IMAGE_UID}", path.display()))
}

fn set_mode(path: &Path, mode: u32) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).with_context(|| format!("chmod {mode:o} {}", path.display()))
}

/// Runs `docker ARGS`, bounded by `timeout` (the process is killed when it runs over); the
/// trimmed stdout on success, an error with stderr otherwise.
pub async fn docker(args: &[&str], timeout: Duration) -> Result<String> {
    let mut cmd = tokio::process::Command::new("docker");
    cmd.args(args).stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).kill_on_drop(true);
    let out = match tokio::time::timeout(timeout, cmd.output()).await {
        Ok(r) => r.with_context(|| format!("running docker {}", args.join(" ")))?,
        Err(_) => bail!("docker {} did not finish within {timeout:?}", args.join(" ")),
    };
    if !out.status.success() {
        bail!("docker {} failed ({}): {}", args.join(" "), out.status, String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// Like [`docker`], but stdout and stderr together (for `docker logs`).
async fn docker_output(args: &[&str], timeout: Duration) -> Result<String> {
    let mut cmd = tokio::process::Command::new("docker");
    cmd.args(args).stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).kill_on_drop(true);
    let out = match tokio::time::timeout(timeout, cmd.output()).await {
        Ok(r) => r.with_context(|| format!("running docker {}", args.join(" ")))?,
        Err(_) => bail!("docker {} did not finish within {timeout:?}", args.join(" ")),
    };
    Ok(format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
}

/// The blocking form, for `Drop` (no runtime needed): stdout and stderr together.
fn docker_blocking(args: &[&str], timeout: Duration) -> Result<String> {
    let mut child = std::process::Command::new("docker")
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("running docker {}", args.join(" ")))?;
    // Read both pipes on threads so a chatty command cannot block on a full pipe.
    let mut stdout = child.stdout.take().ok_or_else(|| anyhow!("no stdout pipe"))?;
    let mut stderr = child.stderr.take().ok_or_else(|| anyhow!("no stderr pipe"))?;
    let out_reader = std::thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = io::Read::read_to_end(&mut stdout, &mut buf);
        buf
    });
    let err_reader = std::thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = io::Read::read_to_end(&mut stderr, &mut buf);
        buf
    });
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!("docker {} did not finish within {timeout:?}", args.join(" "));
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let out = out_reader.join().unwrap_or_default();
    let err = err_reader.join().unwrap_or_default();
    let text = format!("{}{}", String::from_utf8_lossy(&out), String::from_utf8_lossy(&err));
    if !status.success() {
        bail!("docker {} failed ({status}): {}", args.join(" "), text.trim());
    }
    Ok(text)
}

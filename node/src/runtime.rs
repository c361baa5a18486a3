//! A running node: its store, its Raft groups, and routing of every operation to the
//! group's leader — executed locally when this node leads, forwarded over the `Peer`
//! service otherwise. Every wait for a leader or a quorum is bounded by the request timeout
//! and ends in `UNAVAILABLE`, never a hang.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use kerwen_broker::access::{AccessControl, Action, Denied, Principal, SubsystemQuota};
use kerwen_broker::ids::SubsystemId;
use kerwen_broker::delivery::ConsumerId;
use kerwen_broker::model::{
    Command, CommandResult, DeliveryPolicy, GroupId, LargePayload, Leased, MailboxId, MailboxInfo, NodeId, PartitionStats, Position, ShardLimits,
    TypeConfig, METADATA_GROUP,
};
use kerwen_broker::evidence::{Archive, EvidenceSigner};
use kerwen_broker::proposer::{Proposer, ProposerConfig, Sealing, WriteOutcome};
use kerwen_broker::storage::cipher::{AtRestCipher, DataKey, DATA_KEY_FILE};
use kerwen_broker::storage::state_machine::DeadLetterSummary;
use kerwen_broker::storage::{MetaView, ShardView, StateMachine, Store};
use kerwen_broker::BrokerError;
use openraft::error::{InitializeError, RaftError};
use openraft::{BasicNode, Config, Raft, RaftMetrics, ServerState, SnapshotPolicy};
use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use crate::auth::Caller;
use crate::config::{NodeConfig, Security};
use crate::opmon::{OpMonitor, OpmonAnswer, OpmonQuery};
use crate::quota::RateLimiter;
use crate::signing::NodeSigningKey;
use crate::tls::NodeTls;
use crate::transport::{PeerMethod, Peers, RaftTransport};

/// How often a shard leader looks for messages to move to the dead-letter queue (time to
/// live run out, last attempt's lease expired).
const SWEEP_INTERVAL: Duration = Duration::from_millis(250);
/// How often a leader tells its followers it is alive (openraft's `heartbeat_interval`, sent
/// by `run_heartbeats` for every led group at once).
const HEARTBEAT_INTERVAL_MS: u64 = 500;
/// Most messages one sweep round moves per shard.
const SWEEP_BUDGET: usize = 1_024;
/// An upload not committed this long after it started is abandoned: its chunks are deleted.
const UPLOAD_MAX_AGE: Duration = Duration::from_secs(24 * 60 * 60);
/// Sweep rounds between two looks for abandoned uploads (about a minute).
const UPLOAD_SWEEP_EVERY: u64 = 240;
/// Sweep rounds between two looks at the evidence log's size (a second).
const EVIDENCE_CHECK_EVERY: u64 = 4;
/// Sweep rounds between two warnings of an evidence log near its budget (about a minute).
const EVIDENCE_WARN_EVERY: u64 = 240;

/// Arguments of a forwarded fetch (lease messages to a consumer).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FetchArgs {
    pub consumer: ConsumerId,
    pub mailbox: MailboxId,
    /// Partitions of the mailbox on this shard (dead-letter partitions to consume those).
    pub partitions: Vec<u32>,
    pub max: u32,
    /// The mailbox's delivery policy: lease length, redelivery, ordering.
    pub policy: DeliveryPolicy,
    /// How long the leader may wait for messages when none are deliverable.
    pub wait_ms: u64,
}

/// A publishing subsystem and its quota (`who` is `None` for admins and insecure callers,
/// whom no subsystem quota binds).
pub struct Publisher<'a> {
    who: Option<&'a SubsystemId>,
    quota: SubsystemQuota,
}

/// Reads served by a group's leader.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum ReadQuery {
    /// Metadata group: one mailbox by service id.
    Mailbox(String),
    /// Metadata group: all mailboxes.
    Mailboxes,
    /// Data shard: pending counts of a mailbox over some partitions.
    PartitionStats { mailbox: MailboxId, partitions: Vec<u32> },
    /// Data shard: dead letters of a mailbox (without payloads).
    DeadLetters { mailbox: MailboxId, partitions: Vec<u32>, limit: u32 },
    /// Data shard: the chunk of an upload holding a byte offset.
    Chunk { upload: u64, offset: u64 },
    /// Data shard: the chunked payload of a stored message.
    LargePayload { mailbox: MailboxId, position: Position },
    /// Metadata group: may `who` do `action`?
    Authorize { who: Principal, action: Action },
    /// Metadata group: the whole access-control state.
    Access,
    /// Data shard: the evidence of a mailbox's messages accepted in a time range.
    Evidence { mailbox: MailboxId, from_unix_ms: i64, to_unix_ms: i64 },
    /// Data shard: what a reply to request `id` of a mailbox is checked against.
    Request { mailbox: MailboxId, id: String },
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum ReadAnswer {
    Mailbox(Option<MailboxInfo>),
    Mailboxes(Vec<MailboxInfo>),
    PartitionStats(PartitionStats),
    DeadLetters(Vec<DeadLetterSummary>),
    /// The chunk's start offset and bytes; `None` past the end.
    Chunk(Option<(u64, bytes::Bytes)>),
    LargePayload(Option<LargePayload>),
    Authorized(Result<(), Denied>),
    Access(AccessControl),
    Evidence(Option<Archive>),
    Request(Option<kerwen_broker::request::RequestRecord>),
}

/// Most messages one shard exports in one archive.
pub const MAX_EXPORT_MESSAGES: usize = 100_000;

/// One Raft group hosted on this node.
pub struct Group<V> {
    pub raft: Raft<TypeConfig>,
    /// Every write to the group goes through it, so concurrent writes share log entries.
    pub proposer: Proposer,
    pub view: Arc<V>,
}

impl<V> Group<V> {
    fn new(id: GroupId, raft: Raft<TypeConfig>, view: Arc<V>, config: ProposerConfig, sealing: Option<Sealing>) -> Self {
        let proposer = Proposer::start_sealing(id, raft.clone(), config, sealing);
        Self { raft, proposer, view }
    }
}

/// The picks of one fetch, reserved on the leader while their lease command is in flight.
/// Dropping it frees them however the fetch ends, also when it is cancelled mid-write (its
/// consumer went away, or the node that forwarded it restarted): a reservation left behind
/// would hide its messages from this leader, redeliveries included, for the rest of its term.
/// A cancelled fetch counts as failed: should its lease still apply, the replicated delivery
/// state keeps the messages from being leased twice.
struct Reservation<'a> {
    view: &'a ShardView,
    mailbox: MailboxId,
    picked: &'a [Position],
    failed: bool,
}

impl Drop for Reservation<'_> {
    fn drop(&mut self) {
        self.view.unreserve(self.mailbox, self.picked, self.failed);
    }
}

/// Everything a node runs.
pub struct NodeRuntime {
    pub config: NodeConfig,
    pub store: Arc<Store>,
    pub peers: Arc<Peers>,
    pub meta: Group<MetaView>,
    /// Publish rate limits of the subsystems sending through this node.
    pub rate_limiter: RateLimiter,
    /// The key this node signs evidence with (published in the metadata group).
    pub signer: Arc<EvidenceSigner>,
    /// Held while the signing key is rotated.
    pub key_rotation: tokio::sync::Mutex<()>,
    /// The sweep round of the last warning that the evidence log nears its budget.
    evidence_warned: std::sync::atomic::AtomicU64,
    pub shards: BTreeMap<GroupId, Group<ShardView>>,
    /// Set by [`Self::drain_leadership`]: this node hands its groups over and leads none.
    draining: std::sync::atomic::AtomicBool,
    /// Subscriptions served here that have not yet released their leases. Leases are
    /// replicated, so one not released before the node stops would hold its messages until
    /// it expires: shutdown waits for these (bounded) before stopping the Raft groups.
    subscriptions: tokio::sync::watch::Sender<usize>,
    /// Set once the node is shutting down: open subscriptions end with a retryable status
    /// (so their consumers resubscribe through another node) and release their leases.
    stopping: tokio::sync::watch::Sender<bool>,
    /// Records of the exchanges this node handled (`kerwen opmon`).
    pub opmon: OpMonitor,
    /// Leaders of groups this node hosts no replica of, as other nodes told it.
    leader_hints: std::sync::Mutex<std::collections::HashMap<GroupId, NodeId>>,
    /// Groups whose leadership this node is handing over (it refuses leader work for them).
    pub(crate) handing_over: std::sync::Mutex<std::collections::HashSet<GroupId>>,
    /// Groups in which this node holds its elections for another's handover, by hold.
    pub(crate) election_holds: std::sync::Mutex<std::collections::HashMap<GroupId, u64>>,
    /// Moves this node coordinates (while it leads the metadata group), by group.
    pub(crate) moves: std::sync::Mutex<BTreeMap<GroupId, kerwen_broker::cluster::Move>>,
}

/// Held by a subscription until its leases are released.
pub struct SubscriptionGuard(Arc<NodeRuntime>);

impl Drop for SubscriptionGuard {
    fn drop(&mut self) {
        self.0.subscriptions.send_modify(|n| *n = n.saturating_sub(1));
    }
}

fn raft_config(node: &NodeConfig) -> anyhow::Result<Arc<Config>> {
    let config = Config {
        cluster_name: "kerwen".into(),
        // openraft 0.9 also uses the heartbeat interval as the AppendEntries timeout, which
        // includes the follower's fsync: on a loaded 2-core box 250 ms was too tight.
        heartbeat_interval: HEARTBEAT_INTERVAL_MS,
        // Heartbeats go out from the node's one ticker (`run_heartbeats`), every led group's
        // at the same moment, so that they share one replication call per peer instead of a
        // call per group at random times: with hundreds of shards those calls were most of
        // an idle node's CPU.
        enable_heartbeat: false,
        election_timeout_min: 1_500,
        election_timeout_max: 3_000,
        // Bytes per AppendEntries are capped by the transport (APPEND_ENTRIES_BUDGET_BYTES).
        max_payload_entries: 256,
        snapshot_policy: SnapshotPolicy::LogsSinceLast(node.snapshot_after_entries),
        // Keep some log behind the snapshot so briefly lagging followers catch up from it.
        max_in_snapshot_log_to_keep: (node.snapshot_after_entries / 20).clamp(1, 1_000),
        install_snapshot_timeout: 10_000,
        ..Default::default()
    };
    Ok(Arc::new(config.validate()?))
}

/// The node's store, every value sealed with its data key (`DATA_DIR/data-key`, made on first
/// start next to the database, never inside it: a copy of `db/` alone does not read).
fn open_store(config: &NodeConfig) -> anyhow::Result<Arc<Store>> {
    let key_path = config.data_dir.join(DATA_KEY_FILE);
    let db_dir = config.data_dir.join("db");
    // A new key would not read an existing database: refuse rather than fail on the first
    // record, and say what to do.
    if db_dir.join("CURRENT").exists() && !key_path.exists() {
        anyhow::bail!(
            "{} holds a database but {} is missing: without the data key it was written with, this \
             node's data cannot be read. Restore the file, or move {} away to rebuild this replica \
             from its peers",
            config.data_dir.display(),
            key_path.display(),
            db_dir.display()
        );
    }
    let key = DataKey::load_or_create(&key_path)?;
    let cipher = AtRestCipher::new(config.encryption_at_rest, &key)?;
    tracing::info!(encryption_at_rest = %config.encryption_at_rest, "opening the store");
    Ok(Store::open_with(&db_dir, cipher)?)
}

/// How long a node waits before initializing the groups another node should lead first.
const INITIALIZE_GRACE: Duration = Duration::from_secs(2);

/// Initializes `raft` with `members` as its voters; a group already initialized (by this node
/// before a restart, or by another node) is fine.
async fn initialize(raft: &Raft<TypeConfig>, members: &BTreeMap<NodeId, BasicNode>) -> anyhow::Result<()> {
    match raft.initialize(members.clone()).await {
        Ok(()) | Err(RaftError::APIError(InitializeError::NotAllowed(_))) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// Whether these metrics, read on `node`, say that `node` leads the group. A leader that
/// removed itself from the group's membership does not count: openraft keeps it in the leader
/// state, but the remaining replicas elect another leader it never hears from, so its view
/// goes stale (a fetch served there would long-poll a log nothing appends to any more).
pub fn leads_per(m: &RaftMetrics<NodeId, BasicNode>, node: NodeId) -> bool {
    openraft_leads_per(m, node) && hosts_per(m, node)
}

/// Whether openraft itself, by these metrics read on `node`, has `node` lead the group,
/// member or not (see [`leads_per`] for why that is not enough to serve as its leader).
pub fn openraft_leads_per(m: &RaftMetrics<NodeId, BasicNode>, node: NodeId) -> bool {
    m.state == ServerState::Leader && m.current_leader == Some(node)
}

/// `node`'s own view of the group's leader, when it has one worth passing on: `None` if it
/// hosts no replica, or if its replica is a leader that stepped down (it moved its voter
/// away and stays a learner until dropped) and, its vote still standing, keeps naming
/// itself. `Some(None)`: a replica that knows of no leader (an election is on).
pub fn own_leader_view_per(m: &RaftMetrics<NodeId, BasicNode>, node: NodeId) -> Option<Option<NodeId>> {
    let stepped_down = m.current_leader == Some(node) && !openraft_leads_per(m, node);
    (hosts_per(m, node) && !stepped_down).then_some(m.current_leader)
}

/// Whether `node` holds a replica (voter or learner) of the group, by these metrics.
pub fn hosts_per(m: &RaftMetrics<NodeId, BasicNode>, node: NodeId) -> bool {
    m.membership_config.membership().get_node(&node).is_some()
}

/// The log index `node` has matched, by the leader's metrics (`None` if it has not heard).
pub fn matched_per(m: &RaftMetrics<NodeId, BasicNode>, node: NodeId) -> Option<u64> {
    m.replication.as_ref()?.get(&node).copied().flatten().map(|l| l.index)
}

pub fn now_unix_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

impl NodeRuntime {
    /// Opens the store, starts every group and bootstraps the cluster membership if this is a
    /// fresh node (every node does it with the same membership, which openraft allows).
    pub async fn start(config: NodeConfig, tls: Option<Arc<NodeTls>>) -> anyhow::Result<Arc<Self>> {
        std::fs::create_dir_all(&config.data_dir)?;
        let store = open_store(&config)?;
        let peers = Peers::new(config.node_id, config.peers.clone(), config.enable_fault_injection, tls);
        let raft_config = raft_config(&config)?;
        let transport = |group| RaftTransport { group, peers: peers.clone() };
        let proposer_config = ProposerConfig { max_in_flight: config.proposals_in_flight, ..Default::default() };

        let (sm, view) = StateMachine::open_metadata(store.clone())?;
        let raft = Raft::new(config.node_id, raft_config.clone(), transport(METADATA_GROUP), store.log_store(METADATA_GROUP), sm).await?;
        let meta = Group::new(METADATA_GROUP, raft, view, proposer_config, None);

        let signing_key = NodeSigningKey::load_or_create(&config.data_dir, config.node_id)?;
        let public_key = signing_key.public_record();
        let signer = Arc::new(EvidenceSigner::new(signing_key.key_id, signing_key.key));
        let mut shards = BTreeMap::new();
        for group in 1..=config.shards {
            let (sm, view) = StateMachine::open_shard(store.clone(), group)?;
            let raft = Raft::new(config.node_id, raft_config.clone(), transport(group), store.log_store(group), sm).await?;
            let sealing = config.evidence.then(|| Sealing { signer: signer.clone(), view: view.clone() });
            shards.insert(group, Group::new(group, raft, view, proposer_config, sealing));
        }

        let subscriptions = tokio::sync::watch::channel(0).0;
        let opmon = OpMonitor::new(config.opmon_records, config.opmon_retention.as_millis() as u64);
        let runtime = Self {
            opmon,
            config,
            store,
            peers,
            meta,
            shards,
            subscriptions,
            rate_limiter: RateLimiter::default(),
            signer,
            key_rotation: tokio::sync::Mutex::new(()),
            evidence_warned: std::sync::atomic::AtomicU64::new(0),
            draining: std::sync::atomic::AtomicBool::new(false),
            stopping: tokio::sync::watch::Sender::new(false),
            leader_hints: Default::default(),
            handing_over: Default::default(),
            election_holds: Default::default(),
            moves: Default::default(),
        };
        let config = &runtime.config;
        tracing::info!(node = config.node_id, shards = config.shards, listen = %config.listen, join = config.join, "node started");
        let runtime = Arc::new(runtime);
        runtime.form_cluster().await?;
        runtime.run_sweeper();
        runtime.run_heartbeats();
        crate::scheduling::spawn_probe(Arc::downgrade(&runtime.store));
        crate::signing::spawn_registration(Arc::downgrade(&runtime), public_key);
        crate::placement::spawn(&runtime);
        Ok(runtime)
    }

    /// Forms a new cluster from `--peers`, unless this node already belongs to one or joins
    /// one (`--join`). Each group gets `replication_factor` voters (`initial_voters`), and
    /// its first voter initializes it at once and so most likely leads it first: a new
    /// cluster starts with its replicas and leaders spread over the nodes, not all on
    /// whichever node happened to initialize first. The other voters follow after
    /// INITIALIZE_GRACE, so a group still forms while its first voter is down. (Only the
    /// first initialization counts, the rest are refused as NotAllowed.)
    async fn form_cluster(self: &Arc<Self>) -> anyhow::Result<()> {
        let marker = self.config.data_dir.join(crate::placement::MEMBER_MARKER);
        if self.config.join || marker.exists() {
            std::fs::write(&marker, b"")?;
            return Ok(());
        }
        let ids = &self.config.initial_nodes;
        let me = self.node_id();
        let mut now = Vec::new();
        let mut deferred = Vec::new();
        for (group, _) in self.all_rafts() {
            let voters = kerwen_broker::cluster::initial_voters(group, ids, self.config.replication_factor);
            let members: BTreeMap<NodeId, BasicNode> =
                voters.iter().map(|id| (*id, BasicNode { addr: self.config.peers[id].clone() })).collect();
            match voters.iter().position(|v| *v == me) {
                Some(0) => now.push((group, members)),
                Some(_) => deferred.push((group, members)),
                None => {}
            }
        }
        for (group, members) in &now {
            initialize(self.raft(*group)?, members).await?;
        }
        let weak = Arc::downgrade(self);
        tokio::spawn(async move {
            tokio::time::sleep(INITIALIZE_GRACE).await;
            for (group, members) in deferred {
                let Some(runtime) = weak.upgrade() else { return };
                if let Ok(raft) = runtime.raft(group) {
                    if let Err(e) = initialize(raft, &members).await {
                        tracing::warn!(group, error = %e, "initializing the group failed");
                        return;
                    }
                }
            }
            if let Err(e) = std::fs::write(&marker, b"") {
                tracing::warn!(error = %e, path = %marker.display(), "cannot write the cluster-member marker");
            }
        });
        Ok(())
    }

    /// Registers a subscription; drop the guard once its leases are released.
    pub fn subscription_guard(self: &Arc<Self>) -> SubscriptionGuard {
        self.subscriptions.send_modify(|n| *n += 1);
        SubscriptionGuard(self.clone())
    }

    /// Ends every open subscription (with UNAVAILABLE: consumers resubscribe elsewhere).
    pub fn end_subscriptions(&self) {
        self.stopping.send_replace(true);
    }

    /// Resolves once [`Self::end_subscriptions`] was called.
    pub fn subscriptions_ending(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        let mut stopping = self.stopping.subscribe();
        async move {
            let _ = stopping.wait_for(|s| *s).await;
        }
    }

    /// Waits (at most `timeout`) until every ended subscription has released its leases.
    pub async fn wait_subscriptions_released(&self, timeout: Duration) {
        let mut count = self.subscriptions.subscribe();
        if tokio::time::timeout(timeout, count.wait_for(|n| *n == 0)).await.is_err() {
            tracing::warn!("subscriptions still releasing leases after {timeout:?}; their leases will expire instead");
        }
    }

    /// Stops every Raft group (the store closes when the last reference goes).
    pub async fn shutdown(&self) {
        for (_, raft) in self.all_rafts() {
            if let Err(e) = raft.shutdown().await {
                tracing::warn!(error = %e, "raft shutdown");
            }
        }
    }

    pub fn node_id(&self) -> NodeId {
        self.config.node_id
    }

    /// Resolves once a Raft group of this node has stopped on a fatal error (a failed disk
    /// write or sync: openraft stops a group rather than risk its log), with what stopped it.
    /// A stopped group never comes back in this process, so the node should exit and be
    /// restarted: it then recovers from what it had durably written.
    pub async fn stopped_group(&self) -> (GroupId, String) {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tick.tick().await;
            for (group, raft) in self.all_rafts() {
                if let Err(fatal) = &raft.metrics().borrow().running_state {
                    return (group, fatal.to_string());
                }
            }
        }
    }

    pub fn raft(&self, group: GroupId) -> Result<&Raft<TypeConfig>, BrokerError> {
        if group == METADATA_GROUP {
            return Ok(&self.meta.raft);
        }
        self.shards.get(&group).map(|g| &g.raft).ok_or_else(|| BrokerError::NotFound(format!("group {group} is not hosted here")))
    }

    fn proposer(&self, group: GroupId) -> Result<&Proposer, BrokerError> {
        if group == METADATA_GROUP {
            return Ok(&self.meta.proposer);
        }
        Ok(&self.shard(group)?.proposer)
    }

    pub fn shard(&self, group: GroupId) -> Result<&Group<ShardView>, BrokerError> {
        self.shards.get(&group).ok_or_else(|| BrokerError::NotFound(format!("shard {group} is not hosted here")))
    }

    pub fn all_rafts(&self) -> impl Iterator<Item = (GroupId, &Raft<TypeConfig>)> {
        std::iter::once((METADATA_GROUP, &self.meta.raft)).chain(self.shards.iter().map(|(id, g)| (*id, &g.raft)))
    }

    /// The leader of `group` as far as this node knows: its own replica's view, or for a
    /// group it hosts no replica of, what another node said (asked when nobody has yet).
    pub(crate) async fn leader_of(&self, group: GroupId) -> Result<Option<NodeId>, BrokerError> {
        // One look at the metrics: this runs on every routed request.
        let me = self.node_id();
        let local = own_leader_view_per(&self.raft(group)?.metrics().borrow(), me);
        let leader = if let Some(leader) = local {
            leader
        } else {
            let hint = self.leader_hints.lock().unwrap_or_else(|p| p.into_inner()).get(&group).copied();
            match hint {
                Some(leader) => Some(leader),
                None => {
                    let found = self.discover_leader(group).await;
                    if let Some(leader) = found {
                        self.leader_hints.lock().unwrap_or_else(|p| p.into_inner()).insert(group, leader);
                    }
                    found
                }
            }
        };
        // A draining leader is on its way out: wait for its successor rather than use it.
        Ok(leader.filter(|l| *l != me || !self.is_leaving(group)))
    }

    /// Whether this node is giving up the leadership of `group` (draining, or a handover).
    fn is_leaving(&self, group: GroupId) -> bool {
        self.is_draining() || self.handing_over.lock().unwrap_or_else(|p| p.into_inner()).contains(&group)
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Refuses work that only a leader does while this node drains: the caller retries and
    /// finds the successor.
    fn refuse_if_draining(&self, group: GroupId) -> Result<(), BrokerError> {
        if self.is_leaving(group) {
            return Err(BrokerError::NotLeader { group, leader: None });
        }
        Ok(())
    }

    /// Hands every group this node leads to another node before it stops (a rolling restart's
    /// preStop): from now on it never campaigns, stops heartbeats and refuses leader work, so
    /// the followers elect a successor within an election timeout (openraft 0.9 has no
    /// leadership transfer). Waits at most `timeout`; returns the groups still led then.
    pub async fn drain_leadership(&self, timeout: Duration) -> Vec<GroupId> {
        if !self.draining.swap(true, std::sync::atomic::Ordering::Relaxed) {
            tracing::info!(node = self.node_id(), "draining: handing leadership of every group to the other nodes");
        }
        // From now on `run_heartbeats` skips every group (`is_leaving`).
        for (_, raft) in self.all_rafts() {
            raft.runtime_config().elect(false);
        }
        let deadline = Instant::now() + timeout;
        loop {
            let led = self.led_groups();
            if led.is_empty() || Instant::now() >= deadline {
                return led;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The groups (metadata included) this node currently leads.
    pub fn led_groups(&self) -> Vec<GroupId> {
        self.all_rafts().filter(|(_, raft)| leads_per(&raft.metrics().borrow(), self.node_id())).map(|(group, _)| group).collect()
    }

    /// Whether this node leads `group` now.
    pub fn leads(&self, group: GroupId) -> bool {
        self.leading_term(group).is_ok()
    }

    /// This node's term if it currently leads `group`, else a `NotLeader` error.
    fn leading_term(&self, group: GroupId) -> Result<u64, BrokerError> {
        // Called on every fetch: read the fields in place rather than clone the metrics
        // (membership and replication maps included).
        let metrics = self.raft(group)?.metrics();
        let m = metrics.borrow();
        if leads_per(&m, self.node_id()) {
            Ok(m.current_term)
        } else {
            // A removed leader names itself; naming nobody makes the caller look elsewhere.
            Err(BrokerError::NotLeader { group, leader: m.current_leader.filter(|l| *l != self.node_id()) })
        }
    }

    /// Runs `local` if this node leads `group`, otherwise forwards `args` to the leader with
    /// `method`; retries while leadership is unknown or moving, until the request timeout.
    async fn route<A, R, F, Fut>(&self, group: GroupId, method: PeerMethod, args: &A, local: F) -> Result<R, BrokerError>
    where
        A: Serialize,
        R: serde::de::DeserializeOwned,
        F: Fn() -> Fut,
        Fut: std::future::Future<Output = Result<R, BrokerError>>,
    {
        let deadline = Instant::now() + self.config.request_timeout;
        let mut last_error = BrokerError::Unavailable(format!("group {group} has no leader"));
        // The leader a node that refused named: tried next, before this node's own view.
        let mut redirect: Option<NodeId> = None;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(BrokerError::Unavailable(format!(
                    "group {group}: no leader took the request within {:?} (no quorum?); last: {last_error}",
                    self.config.request_timeout
                )));
            }
            let leader = match redirect.take() {
                Some(leader) => Some(leader),
                None => self.leader_of(group).await?,
            };
            let attempt = match leader {
                Some(leader) if leader == self.node_id() => match tokio::time::timeout(left, local()).await {
                    Ok(r) => r,
                    Err(_) => {
                        return Err(BrokerError::Unavailable(format!(
                            "group {group}: no answer within {:?} (no quorum?)",
                            self.config.request_timeout
                        )))
                    }
                },
                Some(leader) => {
                    metrics::counter!("kerwen_requests_forwarded_total", "method" => method.as_str()).increment(1);
                    self.peers.call(leader, group, method, args, left).await
                }
                None => Err(BrokerError::NotLeader { group, leader: None }),
            };
            match attempt {
                Err(e) if e.is_retryable() => {
                    redirect = self.note_refusal(group, &e);
                    last_error = e;
                    tokio::time::sleep(Duration::from_millis(50).min(left)).await;
                }
                other => return other,
            }
        }
    }

    /// Remembers the leader a refusal named (tried next), or forgets the hint that failed.
    fn note_refusal(&self, group: GroupId, e: &BrokerError) -> Option<NodeId> {
        let mut hints = self.leader_hints.lock().unwrap_or_else(|p| p.into_inner());
        match e {
            BrokerError::NotLeader { leader: Some(named), .. } if *named != self.node_id() => {
                hints.insert(group, *named);
                Some(*named)
            }
            _ => {
                hints.remove(&group);
                None
            }
        }
    }

    /// Replicates `cmd` through `group`'s log (on its leader) and returns the committed log
    /// index and the command's result.
    pub async fn write(&self, group: GroupId, cmd: Command) -> WriteOutcome {
        self.route(group, PeerMethod::Write, &cmd, || self.write_local(group, cmd.clone())).await
    }

    /// `write` on this node, which must lead `group`.
    pub async fn write_local(&self, group: GroupId, cmd: Command) -> WriteOutcome {
        self.refuse_if_draining(group)?;
        self.proposer(group)?.write(cmd).await
    }

    /// Leases deliverable messages of one shard to a consumer (on the shard's leader).
    pub async fn fetch(&self, group: GroupId, args: FetchArgs) -> Result<Vec<Leased>, BrokerError> {
        self.route(group, PeerMethod::Fetch, &args, || self.fetch_local(group, args.clone())).await
    }

    /// `fetch` on this node, which must lead `group`. Long-polls up to `wait_ms`. With
    /// `max == 0` it leases nothing and returns (empty) as soon as something is deliverable.
    ///
    /// The leader picks the messages; the lease itself is a command through the shard's log,
    /// so attempt counts, lease ends and back-off survive a leader change.
    pub async fn fetch_local(&self, group: GroupId, args: FetchArgs) -> Result<Vec<Leased>, BrokerError> {
        self.refuse_if_draining(group)?;
        let shard = self.shard(group)?;
        let mut applied = shard.view.applied();
        let deadline = Instant::now() + Duration::from_millis(args.wait_ms);
        let ordered = args.policy.ordered;
        loop {
            let term = self.leading_term(group)?;
            let now = now_unix_ms();
            let answer = if args.max == 0 {
                let any = shard.view.select(term, args.mailbox, &args.partitions, 1, ordered, now, false)?;
                (!any.is_empty()).then(Vec::new)
            } else {
                let picked = shard.view.select(term, args.mailbox, &args.partitions, args.max as usize, ordered, now, true)?;
                if picked.is_empty() {
                    None
                } else {
                    let mut got = self.lease(group, &args, picked, now).await?;
                    for leased in &mut got {
                        leased.receipt = shard.view.message_receipt(&leased.message)?;
                    }
                    (!got.is_empty()).then_some(got)
                }
            };
            let left = deadline.saturating_duration_since(Instant::now());
            match answer {
                Some(got) => return Ok(got),
                None if left.is_zero() => return Ok(Vec::new()),
                None => {}
            }
            // New messages wake us; the short cap re-checks expired leases.
            let _ = tokio::time::timeout(left.min(Duration::from_millis(200)), applied.changed()).await;
        }
    }

    /// Proposes the lease of `picked` (chosen by this leader) and returns what was leased.
    async fn lease(&self, group: GroupId, args: &FetchArgs, picked: Vec<Position>, now: i64) -> Result<Vec<Leased>, BrokerError> {
        let view = &self.shard(group)?.view;
        let lease_ms = i64::try_from(args.policy.lease_ms).unwrap_or(i64::MAX);
        let cmd = Command::Lease {
            mailbox: args.mailbox,
            consumer: args.consumer,
            positions: picked.clone(),
            now_unix_ms: now,
            until_unix_ms: now.saturating_add(lease_ms),
            policy: args.policy.redelivery,
        };
        let mut reservation = Reservation { view, mailbox: args.mailbox, picked: &picked, failed: true };
        let outcome = self.write_local(group, cmd).await;
        reservation.failed = outcome.is_err();
        drop(reservation);
        match outcome?.1 {
            CommandResult::Leased(leased) => Ok(leased),
            CommandResult::Rejected(e) => Err(e),
            other => Err(BrokerError::Internal(format!("unexpected lease result {other:?}"))),
        }
    }

    /// Proposes moving expired and exhausted messages of the shards this node leads to their
    /// dead-letter queues (and, every `UPLOAD_SWEEP_EVERY` rounds, dropping abandoned
    /// uploads). Run periodically by [`Self::run_sweeper`].
    pub async fn sweep(&self, round: u64) {
        if round % UPLOAD_SWEEP_EVERY == 0 {
            self.abort_stale_uploads().await;
        }
        if round % EVIDENCE_CHECK_EVERY == 0 {
            self.check_evidence_budget(round);
            self.opmon.expire(now_unix_ms());
        }
        for (group, shard) in self.led_shards() {
            let now = now_unix_ms();
            let candidates = match shard.view.sweep_candidates(now, SWEEP_BUDGET) {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(group, error = %e, "dead-letter sweep could not read the shard");
                    continue;
                }
            };
            for (mailbox, positions) in candidates {
                let count = positions.len();
                match self.write_local(*group, Command::DeadLetter { mailbox, positions, now_unix_ms: now }).await {
                    Ok((_, CommandResult::Changed(n))) if n > 0 => {
                        tracing::debug!(group, mailbox, moved = n, candidates = count, "dead-lettered messages")
                    }
                    Ok(_) => {}
                    Err(e) => tracing::debug!(group, error = %e, "dead-letter sweep not applied; next round retries"),
                }
            }
        }
    }

    /// Warns (when it first happens, then once a minute) while the evidence log is past 80%
    /// of its budget; publishes are refused once it is reached (see [`Self::admit_evidence`]).
    fn check_evidence_budget(&self, round: u64) {
        use std::sync::atomic::Ordering::Relaxed;
        let (used, budget) = self.evidence_usage();
        let last = self.evidence_warned.load(Relaxed);
        let due = last == 0 || round.saturating_sub(last) >= EVIDENCE_WARN_EVERY;
        if used.saturating_mul(10) >= budget.saturating_mul(8) && due {
            self.evidence_warned.store(round, Relaxed);
            tracing::error!(
                used_bytes = used,
                budget_bytes = budget,
                "the evidence log uses {}% of its disk budget; at 100% publishes are refused. \
                 Raise --evidence-budget-bytes (with disk to match) or shorten mailboxes' evidence retention",
                used.saturating_mul(100) / budget.max(1)
            );
        }
    }

    /// Bytes the evidence log of this node's shards takes, and its budget.
    pub fn evidence_usage(&self) -> (u64, u64) {
        (self.shards.values().map(|g| g.view.evidence_bytes()).sum(), self.config.evidence_budget_bytes)
    }

    /// Refuses a publish once the evidence log has filled its disk budget: a message whose
    /// evidence could not be kept must not be accepted.
    pub fn admit_evidence(&self) -> Result<(), BrokerError> {
        let (used, budget) = self.evidence_usage();
        if self.config.evidence && used >= budget {
            return Err(BrokerError::ResourceExhausted(format!(
                "node {}: the evidence log has filled its disk budget ({used} of {budget} bytes); \
                 the operator must raise --evidence-budget-bytes or shorten evidence retention",
                self.node_id()
            )));
        }
        Ok(())
    }

    /// The evidence of `info`'s messages accepted in `[from, to]`: one archive per shard
    /// holding any, with the cluster's public keys.
    pub async fn export_evidence(&self, info: &MailboxInfo, from_unix_ms: i64, to_unix_ms: i64) -> Result<Vec<Archive>, BrokerError> {
        let keys = self.access().await?.signing_keys().clone();
        let mut archives = Vec::new();
        for shard in info.partitions_by_shard().into_keys() {
            let query = ReadQuery::Evidence { mailbox: info.id, from_unix_ms, to_unix_ms };
            match self.read(shard, query).await? {
                ReadAnswer::Evidence(Some(mut archive)) => {
                    // Only the keys that signed something here: a verifier needs no others.
                    let used: std::collections::BTreeSet<String> = archive.batches.iter().map(|b| b.header.key_id.clone()).collect();
                    archive.keys.keys = keys.keys.iter().filter(|(id, _)| used.contains(*id)).map(|(id, k)| (id.clone(), k.clone())).collect();
                    archives.push(archive);
                }
                ReadAnswer::Evidence(None) => {}
                other => return Err(BrokerError::Internal(format!("unexpected answer {other:?}"))),
            }
        }
        Ok(archives)
    }

    /// The data shards this node leads right now.
    pub fn led_shards(&self) -> impl Iterator<Item = (&GroupId, &Group<ShardView>)> {
        self.shards.iter().filter(|(group, _)| self.leading_term(**group).is_ok())
    }

    /// Aborts uploads older than `UPLOAD_MAX_AGE` on the shards this node leads, so chunks of
    /// an upload nobody resumes do not stay forever.
    async fn abort_stale_uploads(&self) {
        let started_before = now_unix_ms() - UPLOAD_MAX_AGE.as_millis() as i64;
        for (group, shard) in self.led_shards() {
            let stale = match shard.view.stale_uploads(started_before) {
                Ok(stale) => stale,
                Err(e) => {
                    tracing::warn!(group, error = %e, "could not list uploads");
                    continue;
                }
            };
            for (mailbox, id) in stale {
                tracing::info!(group, mailbox, id = %id, "aborting an upload abandoned for over {:?}", UPLOAD_MAX_AGE);
                if let Err(e) = self.write_local(*group, Command::UploadAbort { mailbox, id }).await {
                    tracing::debug!(group, error = %e, "abort not applied; next round retries");
                }
            }
        }
    }

    /// Every `HEARTBEAT_INTERVAL_MS`, has each group this node leads (and is not leaving)
    /// send its heartbeats, all in the same moment so that each peer's batch sender carries
    /// them in one call; until the runtime is dropped. A draining node and a group being
    /// handed over send none, so that their followers' leases run out.
    fn run_heartbeats(self: &Arc<Self>) {
        let runtime = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(HEARTBEAT_INTERVAL_MS));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let Some(runtime) = runtime.upgrade() else { return };
                let me = runtime.node_id();
                for (group, raft) in runtime.all_rafts() {
                    // openraft's own view of leadership, not `leads_per`: a leader that moved
                    // its replica away keeps sending heartbeats, as openraft's timer did, until
                    // it hears of its successor and steps down.
                    if !openraft_leads_per(&raft.metrics().borrow(), me) || runtime.is_leaving(group) {
                        continue;
                    }
                    if let Err(e) = raft.trigger().heartbeat().await {
                        tracing::debug!(group, error = %e, "the group's Raft has stopped; no heartbeat");
                    }
                }
            }
        });
    }

    /// Sweeps every `SWEEP_INTERVAL` until the runtime is dropped.
    fn run_sweeper(self: &Arc<Self>) {
        let runtime = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(SWEEP_INTERVAL);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            for round in 1.. {
                tick.tick().await;
                let Some(runtime) = runtime.upgrade() else { return };
                runtime.sweep(round).await;
            }
        });
    }

    /// A read served by `group`'s leader after confirming its leadership with a quorum.
    pub async fn read(&self, group: GroupId, query: ReadQuery) -> Result<ReadAnswer, BrokerError> {
        self.route(group, PeerMethod::Read, &query, || self.read_local(group, query.clone())).await
    }

    pub async fn read_local(&self, group: GroupId, query: ReadQuery) -> Result<ReadAnswer, BrokerError> {
        self.refuse_if_draining(group)?;
        let raft = self.raft(group)?;
        raft.ensure_linearizable().await.map_err(|e| match e {
            RaftError::APIError(openraft::error::CheckIsLeaderError::ForwardToLeader(f)) => {
                BrokerError::NotLeader { group, leader: f.leader_id }
            }
            other => BrokerError::Unavailable(format!("group {group}: {other}")),
        })?;
        match query {
            ReadQuery::Mailbox(service) => Ok(ReadAnswer::Mailbox(self.meta.view.mailbox(&service))),
            ReadQuery::Mailboxes => Ok(ReadAnswer::Mailboxes(self.meta.view.mailboxes())),
            ReadQuery::PartitionStats { mailbox, partitions } => {
                Ok(ReadAnswer::PartitionStats(self.shard(group)?.view.stats(mailbox, &partitions)?))
            }
            ReadQuery::Chunk { upload, offset } => Ok(ReadAnswer::Chunk(self.shard(group)?.view.read_chunk(upload, offset)?)),
            ReadQuery::LargePayload { mailbox, position } => {
                Ok(ReadAnswer::LargePayload(self.shard(group)?.view.large_payload(mailbox, position)?))
            }
            ReadQuery::DeadLetters { mailbox, partitions, limit } => {
                Ok(ReadAnswer::DeadLetters(self.shard(group)?.view.dead_letters(mailbox, &partitions, limit as usize)?))
            }
            ReadQuery::Authorize { who, action } => Ok(ReadAnswer::Authorized(self.meta.view.authorize(&who, &action))),
            ReadQuery::Access => Ok(ReadAnswer::Access(self.meta.view.access())),
            ReadQuery::Evidence { mailbox, from_unix_ms, to_unix_ms } => Ok(ReadAnswer::Evidence(
                self.shard(group)?.view.export(mailbox, from_unix_ms, to_unix_ms, MAX_EXPORT_MESSAGES)?,
            )),
            ReadQuery::Request { mailbox, id } => Ok(ReadAnswer::Request(self.shard(group)?.view.request(mailbox, &id)?)),
        }
    }

    /// Every node's operational-monitoring records matching `query`, merged (the newest
    /// `query.limit`), and the nodes that did not answer in time, with why.
    pub async fn opmon_cluster(&self, query: &OpmonQuery) -> (OpmonAnswer, Vec<String>) {
        let now = now_unix_ms();
        let mut answer = self.opmon.query(query, now);
        let me = self.node_id();
        let others = self.peers.addresses().into_keys().filter(|n| *n != me).map(|node| async move {
            let reply = self.peers.call::<_, OpmonAnswer>(node, METADATA_GROUP, PeerMethod::Opmon, query, self.config.request_timeout).await;
            (node, reply)
        });
        let mut unanswered = Vec::new();
        for (node, reply) in futures::future::join_all(others).await {
            match reply {
                Ok(other) => answer.merge(other, query.limit),
                Err(e) => unanswered.push(format!("node {node}: {e}")),
            }
        }
        (answer, unanswered)
    }

    /// Whether the node runs without TLS and access control (`--insecure`).
    pub fn insecure(&self) -> bool {
        self.config.security == Security::Insecure
    }

    pub fn meta_view(&self) -> &MetaView {
        &self.meta.view
    }

    /// The metadata leader's access decision (linearizable: sees every acknowledged change).
    pub async fn authorize_on_leader(&self, who: &Principal, action: &Action) -> Result<Result<(), Denied>, BrokerError> {
        match self.read(METADATA_GROUP, ReadQuery::Authorize { who: who.clone(), action: action.clone() }).await? {
            ReadAnswer::Authorized(decision) => Ok(decision),
            other => Err(BrokerError::Internal(format!("unexpected answer {other:?}"))),
        }
    }

    /// The publishing subsystem of `caller` and its quota, looked up once per request (a
    /// publish consults it for the rate and again for every shard it writes to).
    pub fn publisher<'a>(&self, caller: &'a Caller) -> Publisher<'a> {
        match caller {
            Caller::Authenticated(Principal::Subsystem(who)) => {
                Publisher { who: Some(who), quota: self.meta.view.member(who).map(|m| m.quota).unwrap_or_default() }
            }
            _ => Publisher { who: None, quota: SubsystemQuota::default() },
        }
    }

    /// Admits a publish under its subsystem's rate quota, or refuses it with a retry hint.
    pub fn admit_publish(&self, publisher: &Publisher<'_>, messages: u64, bytes: u64) -> Result<(), BrokerError> {
        let Some(who) = publisher.who else { return Ok(()) };
        self.rate_limiter.admit(who, &publisher.quota, messages, bytes).map_err(|t| {
            tracing::debug!(target: "kerwen::audit", caller = %who, limit = t.limit, "publish throttled");
            metrics::counter!("kerwen_quota_rejections_total", "sender" => who.to_string()).increment(1);
            BrokerError::RateLimited {
                message: format!("subsystem {who} is over its quota of {}", t.limit),
                retry_after_ms: u64::try_from(t.retry_after.as_millis()).unwrap_or(u64::MAX),
            }
        })
    }

    /// The limits `shard` enforces on a publish to `info`'s mailbox: the mailbox's share and
    /// the publisher's stored-bytes quota, spread evenly over the data shards.
    pub fn shard_limits(&self, publisher: &Publisher<'_>, info: &MailboxInfo, shard: GroupId) -> ShardLimits {
        let mut limits = info.shard_limits(shard);
        limits.sender_max_stored_bytes =
            publisher.quota.max_stored_bytes.map(|max| max.div_ceil(u64::from(self.config.shards)));
        limits
    }

    /// The access-control state as the metadata leader has it.
    pub async fn access(&self) -> Result<AccessControl, BrokerError> {
        match self.read(METADATA_GROUP, ReadQuery::Access).await? {
            ReadAnswer::Access(acl) => Ok(acl),
            other => Err(BrokerError::Internal(format!("unexpected answer {other:?}"))),
        }
    }

    /// Looks a mailbox up: locally when this node already knows it, otherwise on the
    /// metadata leader (a mailbox created a moment ago through another node may not have
    /// reached this one yet).
    pub async fn mailbox(&self, service: &str) -> Result<MailboxInfo, BrokerError> {
        if let Some(info) = self.meta.view.mailbox(service) {
            return Ok(info);
        }
        match self.read(METADATA_GROUP, ReadQuery::Mailbox(service.to_owned())).await? {
            ReadAnswer::Mailbox(Some(info)) => Ok(info),
            ReadAnswer::Mailbox(None) => Err(BrokerError::NotFound(format!("mailbox {service} does not exist"))),
            other => Err(BrokerError::Internal(format!("unexpected answer {other:?}"))),
        }
    }

    pub async fn mailboxes(&self) -> Result<Vec<MailboxInfo>, BrokerError> {
        match self.read(METADATA_GROUP, ReadQuery::Mailboxes).await? {
            ReadAnswer::Mailboxes(list) => Ok(list),
            other => Err(BrokerError::Internal(format!("unexpected answer {other:?}"))),
        }
    }

    /// Pending messages and bytes of a mailbox (or, with `dead_letters`, of its dead-letter
    /// queue), summed over its shards' leaders.
    pub async fn mailbox_stats(&self, info: &MailboxInfo, dead_letters: bool) -> Result<PartitionStats, BrokerError> {
        let mut total = PartitionStats::default();
        let by_shard = if dead_letters { info.dead_letter_partitions_by_shard() } else { info.partitions_by_shard() };
        for (shard, partitions) in by_shard {
            match self.read(shard, ReadQuery::PartitionStats { mailbox: info.id, partitions }).await? {
                ReadAnswer::PartitionStats(s) => {
                    total.messages += s.messages;
                    total.bytes += s.bytes;
                }
                other => return Err(BrokerError::Internal(format!("unexpected answer {other:?}"))),
            }
        }
        Ok(total)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(data_dir: &std::path::Path) -> NodeConfig {
        let args = crate::config::ServeArgs {
            node_id: Some(1),
            listen: Some("127.0.0.1:7001".parse().expect("address")),
            data_dir: Some(data_dir.to_path_buf()),
            insecure: true,
            ..Default::default()
        };
        args.resolve().expect("config")
    }

    #[test]
    fn a_database_without_its_data_key_is_refused_not_given_a_new_key() {
        let dir = tempfile::tempdir().expect("temp dir");
        drop(open_store(&config(dir.path())).expect("first start"));
        assert!(dir.path().join(DATA_KEY_FILE).exists());
        drop(open_store(&config(dir.path())).expect("restart with the same key"));
        std::fs::remove_file(dir.path().join(DATA_KEY_FILE)).expect("remove the key");
        let e = open_store(&config(dir.path())).err().expect("refused").to_string();
        assert!(e.contains("data-key is missing") && e.contains("rebuild this replica"), "{e}");
        assert!(!dir.path().join(DATA_KEY_FILE).exists(), "no new key was made");
    }
}

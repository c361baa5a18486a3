//! A running node: its store, its Raft groups, and routing of every operation to the
//! group's leader — executed locally when this node leads, forwarded over the `Peer`
//! service otherwise. Every wait for a leader or a quorum is bounded by the request timeout
//! and ends in `UNAVAILABLE`, never a hang.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use kerwen_broker::delivery::ConsumerId;
use kerwen_broker::model::{
    Command, GroupId, MailboxId, MailboxInfo, NodeId, PartitionStats, Position, TypeConfig,
    METADATA_GROUP,
};
use kerwen_broker::proposer::{Proposer, ProposerConfig, WriteOutcome};
use kerwen_broker::storage::state_machine::Leased;
use kerwen_broker::storage::{MetaView, ShardView, StateMachine, Store};
use kerwen_broker::BrokerError;
use openraft::error::{InitializeError, RaftError};
use openraft::{BasicNode, Config, Raft, ServerState, SnapshotPolicy};
use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use crate::config::NodeConfig;
use crate::transport::{PeerMethod, Peers, RaftTransport};

/// Arguments of a forwarded fetch (lease messages to a consumer).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FetchArgs {
    pub consumer: ConsumerId,
    pub mailbox: MailboxId,
    pub partitions: Vec<u32>,
    pub max: u32,
    pub lease_ms: u64,
    /// How long the leader may wait for messages when none are deliverable.
    pub wait_ms: u64,
}

/// Arguments of a forwarded release (give leases back).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ReleaseArgs {
    pub consumer: ConsumerId,
    pub mailbox: MailboxId,
    /// `None` releases every lease of the consumer on the mailbox.
    pub positions: Option<Vec<Position>>,
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
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum ReadAnswer {
    Mailbox(Option<MailboxInfo>),
    Mailboxes(Vec<MailboxInfo>),
    PartitionStats(PartitionStats),
}

/// One Raft group hosted on this node.
pub struct Group<V> {
    pub raft: Raft<TypeConfig>,
    /// Every write to the group goes through it, so concurrent writes share log entries.
    pub proposer: Proposer,
    pub view: Arc<V>,
}

impl<V> Group<V> {
    fn new(id: GroupId, raft: Raft<TypeConfig>, view: Arc<V>, config: ProposerConfig) -> Self {
        let proposer = Proposer::start(id, raft.clone(), config);
        Self { raft, proposer, view }
    }
}

/// Everything a node runs.
pub struct NodeRuntime {
    pub config: NodeConfig,
    pub store: Arc<Store>,
    pub peers: Arc<Peers>,
    pub meta: Group<MetaView>,
    pub shards: BTreeMap<GroupId, Group<ShardView>>,
}

fn raft_config(node: &NodeConfig) -> anyhow::Result<Arc<Config>> {
    let config = Config {
        cluster_name: "kerwen".into(),
        // openraft 0.9 also uses the heartbeat interval as the AppendEntries timeout, which
        // includes the follower's fsync: on a loaded 2-core box 250 ms was too tight.
        heartbeat_interval: 500,
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

pub fn now_unix_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

impl NodeRuntime {
    /// Opens the store, starts every group and bootstraps the cluster membership if this is a
    /// fresh node (every node does it with the same membership, which openraft allows).
    pub async fn start(config: NodeConfig) -> anyhow::Result<Arc<Self>> {
        std::fs::create_dir_all(&config.data_dir)?;
        let store = Store::open(&config.data_dir.join("db"))?;
        let peers = Peers::new(config.node_id, config.peers.clone(), config.enable_fault_injection);
        let raft_config = raft_config(&config)?;
        let transport = |group| RaftTransport { group, peers: peers.clone() };
        let proposer_config = ProposerConfig { max_in_flight: config.proposals_in_flight, ..Default::default() };

        let (sm, view) = StateMachine::open_metadata(store.clone())?;
        let raft = Raft::new(config.node_id, raft_config.clone(), transport(METADATA_GROUP), store.log_store(METADATA_GROUP), sm).await?;
        let meta = Group::new(METADATA_GROUP, raft, view, proposer_config);

        let mut shards = BTreeMap::new();
        for group in 1..=config.shards {
            let (sm, view) = StateMachine::open_shard(store.clone(), group)?;
            let raft = Raft::new(config.node_id, raft_config.clone(), transport(group), store.log_store(group), sm).await?;
            shards.insert(group, Group::new(group, raft, view, proposer_config));
        }

        let runtime = Self { config, store, peers, meta, shards };
        let members: BTreeMap<NodeId, BasicNode> =
            runtime.config.peers.iter().map(|(id, addr)| (*id, BasicNode { addr: addr.clone() })).collect();
        for (_, raft) in runtime.all_rafts() {
            match raft.initialize(members.clone()).await {
                Ok(()) | Err(RaftError::APIError(InitializeError::NotAllowed(_))) => {}
                Err(e) => return Err(e.into()),
            }
        }
        let config = &runtime.config;
        tracing::info!(node = config.node_id, shards = config.shards, listen = %config.listen, "node started");
        Ok(Arc::new(runtime))
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

    fn leader_of(&self, group: GroupId) -> Result<Option<NodeId>, BrokerError> {
        Ok(self.raft(group)?.metrics().borrow().current_leader)
    }

    /// This node's term if it currently leads `group`, else a `NotLeader` error.
    fn leading_term(&self, group: GroupId) -> Result<u64, BrokerError> {
        // Called on every fetch: read the fields in place rather than clone the metrics
        // (membership and replication maps included).
        let metrics = self.raft(group)?.metrics();
        let m = metrics.borrow();
        if m.state == ServerState::Leader && m.current_leader == Some(self.node_id()) {
            Ok(m.current_term)
        } else {
            Err(BrokerError::NotLeader { group, leader: m.current_leader })
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
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(BrokerError::Unavailable(format!(
                    "group {group}: no leader took the request within {:?} (no quorum?); last: {last_error}",
                    self.config.request_timeout
                )));
            }
            let attempt = match self.leader_of(group)? {
                Some(leader) if leader == self.node_id() => match tokio::time::timeout(left, local()).await {
                    Ok(r) => r,
                    Err(_) => {
                        return Err(BrokerError::Unavailable(format!(
                            "group {group}: no answer within {:?} (no quorum?)",
                            self.config.request_timeout
                        )))
                    }
                },
                Some(leader) => self.peers.call(leader, group, method, args, left).await,
                None => Err(BrokerError::NotLeader { group, leader: None }),
            };
            match attempt {
                Err(e) if e.is_retryable() => {
                    last_error = e;
                    tokio::time::sleep(Duration::from_millis(50).min(left)).await;
                }
                other => return other,
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
        self.proposer(group)?.write(cmd).await
    }

    /// Leases deliverable messages of one shard to a consumer (on the shard's leader).
    pub async fn fetch(&self, group: GroupId, args: FetchArgs) -> Result<Vec<Leased>, BrokerError> {
        self.route(group, PeerMethod::Fetch, &args, || self.fetch_local(group, args.clone())).await
    }

    /// `fetch` on this node, which must lead `group`. Long-polls up to `wait_ms`. With
    /// `max == 0` it leases nothing and returns (empty) as soon as something is deliverable.
    pub async fn fetch_local(&self, group: GroupId, args: FetchArgs) -> Result<Vec<Leased>, BrokerError> {
        let shard = self.shard(group)?;
        let mut applied = shard.view.applied();
        let deadline = Instant::now() + Duration::from_millis(args.wait_ms);
        loop {
            let term = self.leading_term(group)?;
            let answer = if args.max == 0 {
                shard.view.has_deliverable(term, args.mailbox, &args.partitions)?.then(Vec::new)
            } else {
                let lease = Duration::from_millis(args.lease_ms);
                let got = shard.view.fetch(term, args.consumer, args.mailbox, &args.partitions, args.max as usize, lease)?;
                (!got.is_empty()).then_some(got)
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

    pub async fn release(&self, group: GroupId, args: ReleaseArgs) -> Result<(), BrokerError> {
        self.route(group, PeerMethod::Release, &args, || async { self.release_local(group, &args) }).await
    }

    /// `release` on this node, which must lead `group`.
    pub fn release_local(&self, group: GroupId, args: &ReleaseArgs) -> Result<(), BrokerError> {
        self.leading_term(group)?;
        self.shard(group)?.view.release(args.consumer, args.mailbox, args.positions.as_deref());
        Ok(())
    }

    /// A read served by `group`'s leader after confirming its leadership with a quorum.
    pub async fn read(&self, group: GroupId, query: ReadQuery) -> Result<ReadAnswer, BrokerError> {
        self.route(group, PeerMethod::Read, &query, || self.read_local(group, query.clone())).await
    }

    pub async fn read_local(&self, group: GroupId, query: ReadQuery) -> Result<ReadAnswer, BrokerError> {
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

    /// Pending messages and bytes of a mailbox, summed over its shards' leaders.
    pub async fn mailbox_stats(&self, info: &MailboxInfo) -> Result<PartitionStats, BrokerError> {
        let mut total = PartitionStats::default();
        for (shard, partitions) in info.partitions_by_shard() {
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

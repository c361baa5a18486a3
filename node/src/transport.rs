//! Node-to-node transport: one lazily connected gRPC channel per peer, shared by every Raft
//! group and by request forwarding; openraft's `RaftNetwork` on top of it; and the fault
//! filter used by tests to partition nodes (and their wire tap).
//!
//! AppendEntries are batched across groups: each group's request joins its peer's queue, and
//! one task per peer sends everything queued as one `AppendEntriesBatch` call, the next call
//! leaving only when the previous one is answered. With hundreds of groups a node therefore
//! sends one replication call per peer per round, and the peer appends them all at once, so
//! its group commit covers the round with one sync (criterion: fsyncs do not grow with shards).
//!
//! Internal bodies are bincode of broker/openraft types (see `proto/kerwen/v1/internal.proto`).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex, RwLock, Weak};
use std::time::Duration;

use bytes::Bytes;
use kerwen_broker::model::{GroupId, NodeId, TypeConfig};
use kerwen_broker::BrokerError;
use kerwen_proto::v1::peer_client::PeerClient;
use kerwen_proto::v1::raft_client::RaftClient;
use kerwen_proto::v1::{PeerReply, PeerRequest, RaftBatchItem, RaftBatchRequest, RaftReply, RaftRequest};
use openraft::error::{InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, Unreachable};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse, VoteRequest,
    VoteResponse,
};
use openraft::{BasicNode, Entry, EntryPayload};
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tonic::transport::{Channel, Endpoint};

use crate::tls::NodeTls;

/// Largest internal message (Raft batches of large payloads, snapshot chunks).
pub const MAX_INTERNAL_MESSAGE_BYTES: usize = 1024 * 1024 * 1024;

/// Payload bytes sent in one AppendEntries at most (a single larger entry goes alone).
/// openraft 0.9 times AppendEntries out after the heartbeat interval, and the follower's
/// fsync of the whole payload happens inside that window: unbounded messages would time out,
/// back off and starve heartbeats until elections churn.
pub const APPEND_ENTRIES_BUDGET_BYTES: usize = kerwen_broker::storage::log_store::REPLICATION_READ_BUDGET_BYTES;

/// Keeps the longest prefix of `entries` within `budget` bytes (at least one entry).
/// Returns whether every entry was kept.
fn truncate_to_budget(entries: &mut Vec<Entry<TypeConfig>>, budget: usize) -> bool {
    let mut total = 0usize;
    for (i, entry) in entries.iter().enumerate() {
        total += match &entry.payload {
            EntryPayload::Normal(cmd) => cmd.approximate_size(),
            _ => 256,
        };
        if total > budget && i > 0 {
            entries.truncate(i);
            return false;
        }
    }
    true
}

pub fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>, BrokerError> {
    bincode::serialize(value).map_err(|e| BrokerError::Internal(format!("encoding internal message: {e}")))
}

pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, BrokerError> {
    bincode::deserialize(bytes).map_err(|e| BrokerError::Internal(format!("decoding internal message: {e}")))
}

/// Channels to the other nodes and the fault filter.
pub struct Peers {
    me: NodeId,
    addresses: RwLock<BTreeMap<NodeId, String>>,
    channels: Mutex<HashMap<NodeId, Channel>>,
    blocked: RwLock<HashSet<NodeId>>,
    fault_injection: bool,
    /// The node's TLS material (`None` with `--insecure`): peers are dialled with its
    /// certificate; a rotation drops the cached channels so new ones present the new one.
    tls: Option<Arc<NodeTls>>,
    /// Test hook, only with fault injection: the file named by [`WIRE_TAP_ENV`], to which
    /// every internal request body this node sends and every reply body it receives is
    /// appended, so a test can search what crossed the wire (inside the TLS records).
    wire_tap: Option<Mutex<std::fs::File>>,
    /// Per peer, the queue of AppendEntries waiting for its next batch call.
    append_queues: Mutex<HashMap<NodeId, mpsc::UnboundedSender<QueuedAppend>>>,
}

/// Bytes of AppendEntries bodies in one batch call at most; a single larger body goes alone.
/// The same budget as one AppendEntries: the follower writes and syncs the whole batch within
/// openraft's AppendEntries timeout (the heartbeat interval).
const APPEND_BATCH_BUDGET_BYTES: usize = APPEND_ENTRIES_BUDGET_BYTES;

/// One group's AppendEntries waiting for its peer's next batch call.
struct QueuedAppend {
    group: GroupId,
    /// bincode of the openraft request.
    body: Bytes,
    /// When openraft gives up on the request (its hard TTL).
    deadline: Instant,
    /// The bincode of the group's reply, or why the call failed.
    reply: oneshot::Sender<Result<Bytes, BrokerError>>,
}

/// Names the wire-tap file of a node started with `--enable-fault-injection`.
pub const WIRE_TAP_ENV: &str = "KERWEN_TEST_WIRE_TAP";

impl Peers {
    pub fn new(me: NodeId, addresses: BTreeMap<NodeId, String>, fault_injection: bool, tls: Option<Arc<NodeTls>>) -> Arc<Self> {
        let peers = Arc::new(Self {
            me,
            addresses: RwLock::new(addresses),
            channels: Mutex::new(HashMap::new()),
            blocked: RwLock::new(HashSet::new()),
            fault_injection,
            tls,
            wire_tap: fault_injection.then(open_wire_tap).flatten(),
            append_queues: Mutex::new(HashMap::new()),
        });
        if let Some(tls) = &peers.tls {
            let mut changes = tls.changes();
            let weak = Arc::downgrade(&peers);
            tokio::spawn(async move {
                while changes.changed().await.is_ok() {
                    let Some(peers) = weak.upgrade() else { return };
                    // Calls in flight keep their channel; the next call dials anew.
                    peers.channels.lock().unwrap_or_else(|p| p.into_inner()).clear();
                }
            });
        }
        peers
    }

    /// The node's TLS material (`None` with `--insecure`).
    pub fn tls(&self) -> Option<&Arc<NodeTls>> {
        self.tls.as_ref()
    }

    pub fn me(&self) -> NodeId {
        self.me
    }

    pub fn addresses(&self) -> BTreeMap<NodeId, String> {
        self.addresses.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub fn address(&self, node: NodeId) -> Option<String> {
        self.addresses.read().unwrap_or_else(|p| p.into_inner()).get(&node).cloned()
    }

    /// Sets (or changes) the peer address of `node`; a changed address drops its channel.
    pub fn set_address(&self, node: NodeId, address: &str) {
        let mut addresses = self.addresses.write().unwrap_or_else(|p| p.into_inner());
        if addresses.get(&node).map(String::as_str) == Some(address) {
            return;
        }
        tracing::info!(node, address, "peer address learned");
        addresses.insert(node, address.to_owned());
        drop(addresses);
        self.channels.lock().unwrap_or_else(|p| p.into_inner()).remove(&node);
    }

    /// Whether traffic with `node` is cut by the fault filter.
    pub fn is_blocked(&self, node: NodeId) -> bool {
        self.blocked.read().unwrap_or_else(|p| p.into_inner()).contains(&node)
    }

    /// Replaces the set of nodes whose traffic is dropped. Test hook.
    pub fn set_blocked(&self, nodes: Vec<NodeId>) -> Result<(), BrokerError> {
        if !self.fault_injection {
            return Err(BrokerError::InvalidArgument(
                "fault injection is disabled on this node (start it with --enable-fault-injection)".into(),
            ));
        }
        tracing::warn!(?nodes, "fault injection: blocking traffic with nodes");
        *self.blocked.write().unwrap_or_else(|p| p.into_inner()) = nodes.into_iter().collect();
        Ok(())
    }

    fn channel(&self, node: NodeId) -> Result<Channel, BrokerError> {
        let mut channels = self.channels.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(ch) = channels.get(&node) {
            return Ok(ch.clone());
        }
        let addr = self.address(node).ok_or_else(|| BrokerError::Unavailable(format!("unknown node {node}")))?;
        let bad_address = |e: tonic::transport::Error| BrokerError::InvalidArgument(format!("bad address of node {node}: {e}"));
        let mut endpoint = match &self.tls {
            Some(tls) => Endpoint::from_shared(format!("https://{addr}"))
                .and_then(|e| e.tls_config(tls.outgoing().tonic_config()))
                .map_err(bad_address)?,
            None => Endpoint::from_shared(format!("http://{addr}")).map_err(bad_address)?,
        };
        endpoint = endpoint
            .connect_timeout(Duration::from_secs(1))
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(5))
            .keep_alive_timeout(Duration::from_secs(5));
        let ch = endpoint.connect_lazy();
        channels.insert(node, ch.clone());
        Ok(ch)
    }

    fn tap(&self, bytes: &[u8]) {
        if let Some(file) = &self.wire_tap {
            let mut file = file.lock().unwrap_or_else(|p| p.into_inner());
            if let Err(e) = std::io::Write::write_all(&mut *file, bytes) {
                tracing::warn!(error = %e, "wire tap: write failed");
            }
        }
    }

    fn check_reachable(&self, node: NodeId) -> Result<(), BrokerError> {
        if self.is_blocked(node) {
            return Err(BrokerError::Unavailable(format!("node {node} is cut off (fault injection)")));
        }
        Ok(())
    }

    /// Calls a `Peer` method on `node` with a bincode body and decodes its bincode result.
    pub async fn call<Req: Serialize, Resp: DeserializeOwned>(
        &self,
        node: NodeId,
        group: GroupId,
        method: PeerMethod,
        body: &Req,
        timeout: Duration,
    ) -> Result<Resp, BrokerError> {
        self.check_reachable(node)?;
        let mut client = PeerClient::new(self.channel(node)?)
            .max_decoding_message_size(MAX_INTERNAL_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_INTERNAL_MESSAGE_BYTES);
        let body = encode(body)?;
        self.tap(&body);
        let mut request = tonic::Request::new(PeerRequest { group, from: self.me, body: body.into() });
        request.set_timeout(timeout);
        let reply: Result<tonic::Response<PeerReply>, tonic::Status> = match method {
            PeerMethod::Write => client.write(request).await,
            PeerMethod::Fetch => client.fetch(request).await,
            PeerMethod::Read => client.read(request).await,
            PeerMethod::Opmon => client.opmon(request).await,
            PeerMethod::Placement => client.placement(request).await,
        };
        let reply = reply.map_err(|s| BrokerError::Unavailable(format!("node {node}: {}", s.message())))?.into_inner();
        self.tap(&reply.body);
        decode::<Result<Resp, BrokerError>>(&reply.body)?
    }

    /// Sends one group's AppendEntries body with `node`'s next batch call and returns the
    /// group's reply body.
    async fn append(self: &Arc<Self>, node: NodeId, group: GroupId, body: Bytes, ttl: Duration) -> Result<Bytes, BrokerError> {
        let (reply, answer) = oneshot::channel();
        let item = QueuedAppend { group, body, deadline: Instant::now() + ttl, reply };
        let closing = || BrokerError::Unavailable("the node is shutting down".into());
        self.append_queue(node).send(item).map_err(|_| closing())?;
        answer.await.map_err(|_| closing())?
    }

    /// The queue of `node`'s batch sender, started on first use. The sender holds the peers
    /// weakly, so it ends once they are dropped (and with them its queue's only sender).
    fn append_queue(self: &Arc<Self>, node: NodeId) -> mpsc::UnboundedSender<QueuedAppend> {
        let mut queues = self.append_queues.lock().unwrap_or_else(|p| p.into_inner());
        queues
            .entry(node)
            .or_insert_with(|| {
                let (tx, rx) = mpsc::unbounded_channel();
                tokio::spawn(send_append_batches(Arc::downgrade(self), node, rx));
                tx
            })
            .clone()
    }

    /// One `AppendEntriesBatch` call with the bodies of `batch`; per item, the group's reply
    /// body or why the callee could not hand it to the group.
    async fn call_append_batch(&self, node: NodeId, batch: &[QueuedAppend]) -> Result<Vec<Result<Bytes, BrokerError>>, BrokerError> {
        self.check_reachable(node)?;
        let mut client = RaftClient::new(self.channel(node)?)
            .max_decoding_message_size(MAX_INTERNAL_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_INTERNAL_MESSAGE_BYTES);
        let items = batch
            .iter()
            .map(|item| {
                self.tap(&item.body);
                RaftBatchItem { group: item.group, body: item.body.clone() }
            })
            .collect();
        // The latest deadline: an item that waited long must not cut the call short for the
        // fresh ones (under a slow peer every batch would then time out); openraft drops the
        // older items' answers itself when their own time is up.
        let deadline = batch.iter().map(|item| item.deadline).max().unwrap_or_else(Instant::now);
        let mut request = tonic::Request::new(RaftBatchRequest { from: self.me, items });
        request.set_timeout(deadline.saturating_duration_since(Instant::now()));
        let reply = client
            .append_entries_batch(request)
            .await
            .map_err(|s| BrokerError::Unavailable(format!("node {node}: {}", s.message())))?
            .into_inner();
        if reply.items.len() != batch.len() {
            return Err(BrokerError::Internal(format!(
                "node {node} answered {} of {} batched AppendEntries",
                reply.items.len(),
                batch.len()
            )));
        }
        Ok(reply
            .items
            .into_iter()
            .map(|item| {
                if item.error.is_empty() {
                    self.tap(&item.body);
                    Ok(item.body)
                } else {
                    Err(BrokerError::Unavailable(format!("node {node}: {}", item.error)))
                }
            })
            .collect())
    }
}

/// Times a batch sender yields between its first item and taking the rest. One publish, ack
/// or replication batch wakes the Raft tasks of many shards together; yielding lets those
/// queued behind the sender run and add their AppendEntries, so one call carries them all
/// rather than the first alone. Measured with `scripts/shard-fsyncs 256 2000`: publish→ack
/// p50 43–48 ms with it, 64–74 ms without. On an idle node it costs microseconds.
const GATHER_YIELDS: u32 = 4;

/// The batch sender of one peer: takes everything queued (within the byte budget), sends it
/// as one call, hands each group its reply, and only then takes the next batch, so requests
/// that arrive during a call wait for the next and share it.
async fn send_append_batches(peers: Weak<Peers>, node: NodeId, mut queue: mpsc::UnboundedReceiver<QueuedAppend>) {
    let mut carried: Option<QueuedAppend> = None;
    loop {
        let first = match carried.take() {
            Some(item) => item,
            None => match queue.recv().await {
                Some(item) => item,
                None => return,
            },
        };
        let mut bytes = first.body.len();
        let mut batch = vec![first];
        for _ in 0..GATHER_YIELDS {
            tokio::task::yield_now().await;
        }
        while bytes < APPEND_BATCH_BUDGET_BYTES {
            match queue.try_recv() {
                Ok(item) if bytes + item.body.len() > APPEND_BATCH_BUDGET_BYTES => {
                    carried = Some(item);
                    break;
                }
                Ok(item) => {
                    bytes += item.body.len();
                    batch.push(item);
                }
                Err(_) => break,
            }
        }
        // openraft dropped these when its timeout fired; sending them would be wasted work.
        batch.retain(|item| !item.reply.is_closed());
        if batch.is_empty() {
            continue;
        }
        let Some(strong) = peers.upgrade() else { return };
        metrics::histogram!("kerwen_raft_groups_per_append_batch").record(batch.len() as f64);
        let replies = strong.call_append_batch(node, &batch).await;
        drop(strong);
        match replies {
            Ok(replies) => {
                for (item, reply) in batch.into_iter().zip(replies) {
                    // The group may have given up waiting; nothing to do then.
                    let _ = item.reply.send(reply);
                }
            }
            Err(e) => {
                for item in batch {
                    let _ = item.reply.send(Err(e.clone()));
                }
            }
        }
    }
}

fn open_wire_tap() -> Option<Mutex<std::fs::File>> {
    let path = std::env::var_os(WIRE_TAP_ENV)?;
    match std::fs::OpenOptions::new().create(true).append(true).open(&path) {
        Ok(file) => {
            tracing::warn!(path = %std::path::Path::new(&path).display(), "fault injection: internal traffic is copied to a wire tap");
            Some(Mutex::new(file))
        }
        Err(e) => {
            tracing::error!(error = %e, "fault injection: cannot open the wire tap");
            None
        }
    }
}

/// The forwarded operations of the `Peer` service.
#[derive(Debug, Clone, Copy)]
pub enum PeerMethod {
    Write,
    Fetch,
    Read,
    /// Answered by the node called, not forwarded to a leader.
    Opmon,
    /// Placement questions and moves (`crate::placement`).
    Placement,
}

impl PeerMethod {
    /// The metrics label.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Write => "write",
            Self::Fetch => "fetch",
            Self::Read => "read",
            Self::Opmon => "opmon",
            Self::Placement => "placement",
        }
    }
}

/// Creates openraft connections of one group.
#[derive(Clone)]
pub struct RaftTransport {
    pub group: GroupId,
    pub peers: Arc<Peers>,
}

impl RaftNetworkFactory<TypeConfig> for RaftTransport {
    type Network = RaftConnection;

    async fn new_client(&mut self, target: NodeId, node: &BasicNode) -> Self::Network {
        // A replica added by a move names its address in the group's membership.
        if self.peers.address(target).is_none() {
            self.peers.set_address(target, &node.addr);
        }
        RaftConnection { group: self.group, target, peers: self.peers.clone() }
    }
}

/// openraft's view of one peer in one group.
pub struct RaftConnection {
    group: GroupId,
    target: NodeId,
    peers: Arc<Peers>,
}

#[derive(Clone, Copy)]
enum RaftMethod {
    Vote,
    InstallSnapshot,
}

fn unreachable<E: std::error::Error>(e: BrokerError) -> RPCError<NodeId, BasicNode, RaftError<NodeId, E>> {
    RPCError::Unreachable(Unreachable::new(&e))
}

impl RaftConnection {
    async fn call<Req, Resp, E>(
        &self,
        method: RaftMethod,
        rpc: &Req,
        option: &RPCOption,
    ) -> Result<Resp, RPCError<NodeId, BasicNode, RaftError<NodeId, E>>>
    where
        Req: Serialize,
        Resp: DeserializeOwned,
        E: std::error::Error + DeserializeOwned,
    {
        self.peers.check_reachable(self.target).map_err(unreachable)?;
        let channel = self.peers.channel(self.target).map_err(unreachable)?;
        let mut client = RaftClient::new(channel)
            .max_decoding_message_size(MAX_INTERNAL_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_INTERNAL_MESSAGE_BYTES);
        let body = encode(rpc).map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        self.peers.tap(&body);
        let mut request = tonic::Request::new(RaftRequest { group: self.group, from: self.peers.me(), body: body.into() });
        request.set_timeout(option.hard_ttl());
        let reply: Result<tonic::Response<RaftReply>, tonic::Status> = match method {
            RaftMethod::Vote => client.vote(request).await,
            RaftMethod::InstallSnapshot => client.install_snapshot(request).await,
        };
        let reply = reply.map_err(|s| unreachable(BrokerError::Unavailable(s.message().to_owned())))?.into_inner();
        self.peers.tap(&reply.body);
        self.answer(&reply.body)
    }

    /// The callee's openraft result, from its bincode.
    fn answer<Resp, E>(&self, body: &[u8]) -> Result<Resp, RPCError<NodeId, BasicNode, RaftError<NodeId, E>>>
    where
        Resp: DeserializeOwned,
        E: std::error::Error + DeserializeOwned,
    {
        let result: Result<Resp, RaftError<NodeId, E>> = decode(body).map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        result.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e)))
    }
}

impl RaftNetwork<TypeConfig> for RaftConnection {
    async fn append_entries(
        &mut self,
        mut rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<NodeId>, RPCError<NodeId, BasicNode, RaftError<NodeId>>> {
        let sent_all = truncate_to_budget(&mut rpc.entries, APPEND_ENTRIES_BUDGET_BYTES);
        let last_sent = rpc.entries.last().map(|e| e.log_id);
        let body = encode(&rpc).map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        let reply = self.peers.append(self.target, self.group, body.into(), option.hard_ttl()).await.map_err(unreachable)?;
        match self.answer(&reply)? {
            // openraft sends the rest in the next round.
            AppendEntriesResponse::Success if !sent_all => Ok(AppendEntriesResponse::PartialSuccess(last_sent)),
            other => Ok(other),
        }
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<InstallSnapshotResponse<NodeId>, RPCError<NodeId, BasicNode, RaftError<NodeId, InstallSnapshotError>>>
    {
        self.call(RaftMethod::InstallSnapshot, &rpc, &option).await
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        option: RPCOption,
    ) -> Result<VoteResponse<NodeId>, RPCError<NodeId, BasicNode, RaftError<NodeId>>> {
        self.call(RaftMethod::Vote, &rpc, &option).await
    }
}

#[cfg(test)]
mod tests {
    use kerwen_broker::model::{Command, NewMessage, StoredMessage};
    use openraft::{CommittedLeaderId, LogId};

    use super::*;

    fn publish(index: u64, payload_bytes: usize) -> Entry<TypeConfig> {
        let message = StoredMessage {
            id: "m".into(),
            recipient: "TM/GOV/A/s/svc".into(),
            sender: String::new(),
            headers: vec![],
            payload: vec![0u8; payload_bytes].into(),
            payload_sha256: [0; 32],
            ordering_key: None,
            accepted_unix_ms: 0,
            ttl_ms: None,
            expires_unix_ms: None,
            dead_letter: None,
            large: None,
            signed_as: None,
            trace_context: None,
        };
        Entry {
            log_id: LogId::new(CommittedLeaderId::new(1, 1), index),
            payload: EntryPayload::Normal(Command::publish(vec![NewMessage { mailbox: 1, partition: 0, message }])),
        }
    }

    #[test]
    fn append_entries_are_cut_to_the_byte_budget_but_never_empty() {
        let mut entries: Vec<_> = (1..=10).map(|i| publish(i, 1_000)).collect();
        assert!(!truncate_to_budget(&mut entries, 3_500));
        assert_eq!(entries.len(), 3);
        let mut huge = vec![publish(1, 10_000), publish(2, 10)];
        assert!(!truncate_to_budget(&mut huge, 3_500));
        assert_eq!(huge.len(), 1, "one oversized entry still goes alone");
        let mut small: Vec<_> = (1..=3).map(|i| publish(i, 10)).collect();
        assert!(truncate_to_budget(&mut small, 3_500));
        assert_eq!(small.len(), 3);
    }
}

//! openraft state machines: the metadata group (mailboxes, shard map) and the data shards
//! (messages). Both persist their state in the `state` column family as they apply, so a
//! restart needs no replay beyond the last applied entry, and snapshots are a dump of the
//! group's key range.
//!
//! Applied state is written unsynced; it becomes durable with the next WAL sync. Before a
//! snapshot is handed to openraft (which then purges the log it covers) we wait for a sync,
//! so purged entries are always covered by durable state.
//!
//! Architecture invariant: `apply` reads no clock and draws no randomness.

mod access;
mod cluster;
mod delivery;
mod evidence;
mod upload;

pub use evidence::{AckEvidence, BatchRecord, ChainHead, EvidenceRecord};

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::Cursor;
use std::sync::{Arc, Mutex, MutexGuard, RwLock};

use openraft::storage::{RaftSnapshotBuilder, RaftStateMachine, Snapshot};
use openraft::{
    BasicNode, Entry, EntryPayload, LogId, OptionalSend, SnapshotMeta, StorageError, StorageIOError,
    StoredMembership,
};
use rocksdb::{Direction, IteratorMode, ReadOptions, WriteBatch};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use super::keys::{self, KIND_APPLIED, KIND_DELIVERY, KIND_MAILBOX, KIND_NEXT_MAILBOX_ID, KIND_SENDER, KIND_TTL, TAG_SNAPSHOT};
use super::{decode_plain, encode_plain, Store, CF_RAFT_META, CF_STATE};
use self::delivery::{LeaseRequest, PartitionCache, SettleRequest};
use crate::access::{AccessControl, Action, Denied, MemberRecord, Principal};
use crate::delivery::{DeliveryTracker, PartitionDelivery};
use crate::ids::{ServiceId, SubsystemId};
use crate::request::{RequestRecord, HEADER_REPLY_TO};
use crate::error::{BrokerError, Result};
use crate::model::{
    dead_letter_partition, is_dead_letter, Command, CommandResult, DeliveryPolicy, DeliveryState, GroupId, MailboxId,
    EvidenceRef, MailboxInfo, MailboxInfoV1, MailboxLimits, NewMessage, NodeId, PartitionStats, Position, Seal, ShardLimits, StoredMessage,
    TypeConfig, METADATA_GROUP,
};

type StorageResult<T> = std::result::Result<T, StorageError<NodeId>>;

/// Most partitions a mailbox may have.
pub const MAX_PARTITIONS: u32 = 256;

/// What a group has applied, stored under its `a` key in the same batch as the state.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct AppliedRecord {
    last_applied: Option<LogId<NodeId>>,
    membership: StoredMembership<NodeId, BasicNode>,
}

/// Per-partition counters kept next to the messages.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
struct PartitionState {
    next_seq: u64,
    stats: PartitionStats,
}

/// A snapshot: every key/value of the group's range, keys without the group prefix, values
/// opened (plaintext): it goes to other nodes, which seal each value with their own data key.
/// Stored in `raft_meta`, the whole snapshot is sealed with this node's key.
#[derive(Serialize, Deserialize)]
struct SnapshotPayload {
    records: Vec<(Vec<u8>, Vec<u8>)>,
}

/// Read-only view of the metadata group, shared with the node's services.
pub struct MetaView {
    mailboxes: RwLock<BTreeMap<String, MailboxInfo>>,
    access: RwLock<AccessControl>,
    /// The node registry (`R` keys).
    nodes: RwLock<BTreeMap<crate::model::NodeId, crate::cluster::NodeRecord>>,
}

impl MetaView {
    /// Allows or refuses an action by the state this node has applied.
    pub fn authorize(&self, who: &Principal, action: &Action) -> std::result::Result<(), Denied> {
        read(&self.access).authorize(who, action)
    }

    /// A registered subsystem's record (its quota).
    pub fn member(&self, subsystem: &SubsystemId) -> Option<MemberRecord> {
        read(&self.access).member(subsystem).cloned()
    }

    /// A published evidence signing key.
    pub fn signing_key(&self, key_id: &str) -> Option<crate::evidence::PublicKeyRecord> {
        read(&self.access).signing_keys().keys.get(key_id).cloned()
    }

    /// A copy of the whole access-control state (listings, discovery).
    pub fn access(&self) -> AccessControl {
        read(&self.access).clone()
    }

    pub fn mailbox(&self, service: &str) -> Option<MailboxInfo> {
        read(&self.mailboxes).get(service).cloned()
    }

    pub fn mailboxes(&self) -> Vec<MailboxInfo> {
        read(&self.mailboxes).values().cloned().collect()
    }

    /// The node registry.
    pub fn nodes(&self) -> BTreeMap<crate::model::NodeId, crate::cluster::NodeRecord> {
        read(&self.nodes).clone()
    }

    pub fn node(&self, id: crate::model::NodeId) -> Option<crate::cluster::NodeRecord> {
        read(&self.nodes).get(&id).cloned()
    }

    fn reload(&self, store: &Store) -> Result<()> {
        let mut map = BTreeMap::new();
        for_each_in_prefix(store, &keys::state_key(METADATA_GROUP, KIND_MAILBOX, &[]), |_, value| {
            // Records written before mailboxes could grow have one field less.
            let plain = store.open_bytes(value)?;
            let info = decode_plain::<MailboxInfo>(&plain).or_else(|_| decode_plain::<MailboxInfoV1>(&plain).map(MailboxInfo::from))?;
            map.insert(info.service.clone(), info);
            Ok(true)
        })?;
        *write(&self.mailboxes) = map;
        *write(&self.access) = access::load(store)?;
        *write(&self.nodes) = cluster::load(store)?;
        Ok(())
    }
}

/// View of one data shard shared with the node's services: pending messages, delivery leases.
pub struct ShardView {
    group: GroupId,
    store: Arc<Store>,
    partitions: Mutex<HashMap<(MailboxId, u32), PartitionState>>,
    tracker: Mutex<DeliveryTracker>,
    applied: watch::Sender<u64>,
    /// Per mailbox, where the next dedup purge scan starts (not replicated).
    dedup_purge_cursor: Mutex<HashMap<MailboxId, PurgeCursor>>,
    /// Payload bytes stored per sender subsystem, as persisted under `S` keys (a cache).
    senders: Mutex<HashMap<String, u64>>,
    /// The evidence chain's head as applied (mirrors the `H` key).
    chain: Mutex<ChainHead>,
    /// Recently used evidence batch trees, for receipts.
    trees: Mutex<evidence::TreeCache>,
    /// Bytes of the evidence log (mirrors the `Z` key).
    evidence_bytes: std::sync::atomic::AtomicU64,
}

impl ShardView {
    /// The request stored under `id` in `mailbox` on this shard, as its reply is checked
    /// against (`None`: no such request, or its id is no longer remembered).
    pub fn request(&self, mailbox: MailboxId, id: &str) -> Result<Option<RequestRecord>> {
        let record: Option<DedupRecord> = self.store.get(CF_STATE, &keys::dedup_key(self.group, mailbox, id))?;
        Ok(record.and_then(|r| r.request))
    }

    /// Index of the last applied entry; changes wake long-polling fetches.
    pub fn applied(&self) -> watch::Receiver<u64> {
        self.applied.subscribe()
    }

    fn partition_state(&self, cache: &mut HashMap<(MailboxId, u32), PartitionState>, mailbox: MailboxId, partition: u32) -> Result<PartitionState> {
        if let Some(ps) = cache.get(&(mailbox, partition)) {
            return Ok(*ps);
        }
        let ps = self
            .store
            .get::<PartitionState>(CF_STATE, &keys::partition_key(self.group, mailbox, partition))?
            .unwrap_or_default();
        cache.insert((mailbox, partition), ps);
        Ok(ps)
    }

    /// Pending messages and bytes of `mailbox` over the given partitions.
    pub fn stats(&self, mailbox: MailboxId, partitions: &[u32]) -> Result<PartitionStats> {
        let mut cache = lock(&self.partitions);
        let mut total = PartitionStats::default();
        for &p in partitions {
            let ps = self.partition_state(&mut cache, mailbox, p)?;
            total.messages += ps.stats.messages;
            total.bytes += ps.stats.bytes;
        }
        Ok(total)
    }

    /// Messages under an unexpired lease at `now`, per mailbox.
    pub fn in_flight_by_mailbox(&self, now_unix_ms: i64) -> HashMap<MailboxId, usize> {
        lock(&self.tracker).in_flight_by_mailbox(now_unix_ms)
    }

    /// Picks up to `max` messages of `mailbox` in `partitions` that may be leased at `now`,
    /// for the leader to propose in a `Lease` command: first redeliveries that are due, then
    /// messages never delivered, in sequence order per partition. In an ordered mailbox only
    /// the oldest stored message of each ordering key is eligible. With `reserve` the picks
    /// are held for this fetch until [`Self::unreserve`]; without, this only asks whether
    /// anything is deliverable. `term` is the caller's current leader term.
    #[allow(clippy::too_many_arguments)]
    pub fn select(
        &self,
        term: u64,
        mailbox: MailboxId,
        partitions: &[u32],
        max: usize,
        ordered: bool,
        now_unix_ms: i64,
        reserve: bool,
    ) -> Result<Vec<Position>> {
        let mut out = Vec::new();
        let mut tracker = lock(&self.tracker);
        tracker.start_term(term);
        for &partition in partitions {
            if out.len() >= max {
                break;
            }
            let wanted = max - out.len();
            let cursor = tracker.partition(mailbox, partition);
            let picked = if ordered && !is_dead_letter(partition) {
                self.select_ordered(cursor, mailbox, partition, wanted, now_unix_ms)?
            } else {
                self.select_unordered(cursor, mailbox, partition, wanted, now_unix_ms, reserve)?
            };
            if reserve {
                picked.iter().for_each(|seq| cursor.reserve(*seq));
            }
            out.extend(picked.into_iter().map(|sequence| Position { partition, sequence }));
        }
        Ok(out)
    }

    fn select_unordered(
        &self,
        cursor: &mut PartitionDelivery,
        mailbox: MailboxId,
        partition: u32,
        wanted: usize,
        now_unix_ms: i64,
        advance: bool,
    ) -> Result<Vec<u64>> {
        let mut picked: Vec<u64> = cursor.due(now_unix_ms).take(wanted).collect();
        if picked.len() >= wanted {
            return Ok(picked);
        }
        let prefix = keys::message_prefix(self.group, mailbox, partition);
        let from = keys::message_key(self.group, mailbox, partition, cursor.next_scan);
        let mut scanned_to = None;
        for_each_from(&self.store, &prefix, &from, |key, _| {
            let seq = keys::message_seq(key).ok_or_else(|| BrokerError::Storage("bad message key".into()))?;
            scanned_to = Some(seq);
            if !cursor.is_known(seq) {
                picked.push(seq);
            }
            Ok(picked.len() < wanted)
        })?;
        if let (true, Some(seq)) = (advance, scanned_to) {
            cursor.next_scan = seq + 1;
        }
        Ok(picked)
    }

    /// Ordered mailboxes: walks the partition from its oldest message and picks each ordering
    /// key's oldest message if it may be leased; a key whose oldest message is in flight or
    /// waiting for redelivery has nothing eligible.
    fn select_ordered(
        &self,
        cursor: &PartitionDelivery,
        mailbox: MailboxId,
        partition: u32,
        wanted: usize,
        now_unix_ms: i64,
    ) -> Result<Vec<u64>> {
        let prefix = keys::message_prefix(self.group, mailbox, partition);
        let mut seen_keys: HashSet<String> = HashSet::new();
        let mut picked = Vec::new();
        let mut scanned = 0usize;
        for_each_in_prefix(&self.store, &prefix, |key, value| {
            scanned += 1;
            let seq = keys::message_seq(key).ok_or_else(|| BrokerError::Storage("bad message key".into()))?;
            let message: StoredMessage = self.store.decode(value)?;
            let oldest_of_key = message.ordering_key.is_none_or(|k| seen_keys.insert(k));
            if oldest_of_key && cursor.may_lease(seq, now_unix_ms) {
                picked.push(seq);
            }
            Ok(picked.len() < wanted && scanned < ORDERED_SCAN_LIMIT)
        })?;
        Ok(picked)
    }

    /// A fetch's lease command was applied (or failed): its picks are free again.
    pub fn unreserve(&self, mailbox: MailboxId, positions: &[Position], failed: bool) {
        lock(&self.tracker).unreserve(mailbox, positions, failed);
    }

    /// What the leader should propose to dead-letter at `now`: messages whose time to live
    /// ran out and messages whose last allowed lease expired, at most `budget`.
    pub fn sweep_candidates(&self, now_unix_ms: i64, budget: usize) -> Result<BTreeMap<MailboxId, Vec<Position>>> {
        let mut out: BTreeMap<MailboxId, Vec<Position>> = BTreeMap::new();
        let prefix = keys::state_key(self.group, KIND_TTL, &[]);
        let mut found = 0usize;
        for_each_in_prefix(&self.store, &prefix, |key, _| {
            let Some((expires, mailbox, partition, sequence)) = keys::parse_ttl_rest(&key[prefix.len()..]) else {
                return Ok(true);
            };
            if expires > now_unix_ms || found >= budget {
                return Ok(false);
            }
            out.entry(mailbox).or_default().push(Position { partition, sequence });
            found += 1;
            Ok(true)
        })?;
        for (mailbox, position) in lock(&self.tracker).exhausted(now_unix_ms, budget.saturating_sub(found)) {
            out.entry(mailbox).or_default().push(position);
        }
        Ok(out)
    }

    /// Up to `limit` dead letters of `mailbox` in the given dead-letter partitions, oldest
    /// first per partition, without their payloads.
    pub fn dead_letters(&self, mailbox: MailboxId, partitions: &[u32], limit: usize) -> Result<Vec<DeadLetterSummary>> {
        let mut out = Vec::new();
        for &partition in partitions.iter().filter(|p| is_dead_letter(**p)) {
            let prefix = keys::message_prefix(self.group, mailbox, partition);
            for_each_in_prefix(&self.store, &prefix, |key, value| {
                if out.len() >= limit {
                    return Ok(false);
                }
                let sequence = keys::message_seq(key).ok_or_else(|| BrokerError::Storage("bad message key".into()))?;
                let message: StoredMessage = self.store.decode(value)?;
                if let Some(letter) = message.dead_letter {
                    out.push(DeadLetterSummary {
                        position: Position { partition, sequence },
                        id: message.id,
                        payload_bytes: message.payload.len() as u64,
                        ordering_key: message.ordering_key,
                        accepted_unix_ms: message.accepted_unix_ms,
                        letter,
                    });
                }
                Ok(true)
            })?;
        }
        Ok(out)
    }

    /// The chunk of an upload holding byte `offset`: its start and bytes (`None` past the end).
    pub fn read_chunk(&self, upload: u64, offset: u64) -> Result<Option<(u64, bytes::Bytes)>> {
        let prefix = keys::chunk_prefix(self.group, upload);
        let key = keys::chunk_key(self.group, upload, offset);
        let cf = self.store.cf(CF_STATE)?;
        let mut iter = self.store.db().raw_iterator_cf(&cf);
        iter.seek_for_prev(&key);
        let (Some(found), Some(data)) = (iter.key(), iter.value()) else {
            iter.status().map_err(BrokerError::storage)?;
            return Ok(None);
        };
        if !found.starts_with(&prefix) {
            return Ok(None);
        }
        let start = keys::message_seq(found).ok_or_else(|| BrokerError::Storage("bad chunk key".into()))?;
        let data = self.store.open_bytes(data)?;
        if offset >= start + data.len() as u64 {
            return Ok(None);
        }
        // A sealed chunk was opened into a buffer of its own, which becomes the `Bytes`.
        Ok(Some((start, bytes::Bytes::from(data.into_owned()))))
    }

    /// Uploads started before `started_before` (Unix ms) and never committed: `(mailbox, id)`.
    pub fn stale_uploads(&self, started_before: i64) -> Result<Vec<(MailboxId, String)>> {
        let prefix = keys::state_key(self.group, keys::KIND_UPLOAD, &[]);
        let mut out = Vec::new();
        for_each_in_prefix(&self.store, &prefix, |_, value| {
            let record: upload::UploadRecord = self.store.decode(value)?;
            let message = &record.state.message;
            if message.accepted_unix_ms < started_before {
                out.push((record.limits.mailbox, message.id.clone()));
            }
            Ok(true)
        })?;
        Ok(out)
    }

    /// The chunked payload of a stored message, if it has one.
    pub fn large_payload(&self, mailbox: MailboxId, position: Position) -> Result<Option<crate::model::LargePayload>> {
        let key = keys::message_key(self.group, mailbox, position.partition, position.sequence);
        Ok(self.store.get::<StoredMessage>(CF_STATE, &key)?.and_then(|m| m.large))
    }

    /// Rebuilds the in-memory mirror of the replicated delivery state from the store.
    fn rebuild_tracker(&self) -> Result<()> {
        let mut tracker = lock(&self.tracker);
        tracker.clear();
        let prefix = keys::state_key(self.group, KIND_DELIVERY, &[]);
        for_each_in_prefix(&self.store, &prefix, |key, value| {
            let (mailbox, partition, sequence) = keys::parse_position_rest(&key[prefix.len()..])
                .ok_or_else(|| BrokerError::Storage("bad delivery key".into()))?;
            tracker.set_state(mailbox, Position { partition, sequence }, Some(self.store.decode::<DeliveryState>(value)?));
            Ok(true)
        })
    }
}

/// Most messages an ordered fetch walks per partition looking for free ordering keys: a
/// backlog deeper than this behind busy keys waits until those drain.
const ORDERED_SCAN_LIMIT: usize = 4_096;

/// A dead letter as listed for operators: everything but the payload.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DeadLetterSummary {
    pub position: Position,
    pub id: String,
    pub payload_bytes: u64,
    pub ordering_key: Option<String>,
    pub accepted_unix_ms: i64,
    pub letter: crate::model::DeadLetter,
}

/// The group a state machine serves.
enum GroupKind {
    Metadata(Arc<MetaView>),
    Shard(Arc<ShardView>),
}

/// openraft state machine of one group.
pub struct StateMachine {
    group: GroupId,
    store: Arc<Store>,
    kind: GroupKind,
    applied: AppliedRecord,
}

impl StateMachine {
    /// The metadata group's state machine and its shared view.
    pub fn open_metadata(store: Arc<Store>) -> Result<(Self, Arc<MetaView>)> {
        let applied = load_applied(&store, METADATA_GROUP)?;
        let view = Arc::new(MetaView {
            mailboxes: RwLock::new(BTreeMap::new()),
            access: RwLock::new(AccessControl::default()),
            nodes: RwLock::new(BTreeMap::new()),
        });
        view.reload(&store)?;
        let sm = Self { group: METADATA_GROUP, store, kind: GroupKind::Metadata(view.clone()), applied };
        Ok((sm, view))
    }

    /// A data shard's state machine and its shared view.
    pub fn open_shard(store: Arc<Store>, group: GroupId) -> Result<(Self, Arc<ShardView>)> {
        if group == METADATA_GROUP {
            return Err(BrokerError::Internal("group 0 is the metadata group".into()));
        }
        let applied = load_applied(&store, group)?;
        let view = Arc::new(ShardView {
            group,
            store: store.clone(),
            partitions: Mutex::new(HashMap::new()),
            tracker: Mutex::new(DeliveryTracker::default()),
            applied: watch::channel(applied.last_applied.map(|l| l.index).unwrap_or(0)).0,
            dedup_purge_cursor: Mutex::new(HashMap::new()),
            senders: Mutex::new(HashMap::new()),
            chain: Mutex::new(ChainHead::default()),
            trees: Mutex::new(evidence::TreeCache::default()),
            evidence_bytes: std::sync::atomic::AtomicU64::new(0),
        });
        view.rebuild_tracker()?;
        view.load_chain_head()?;
        let sm = Self { group, store, kind: GroupKind::Shard(view.clone()), applied };
        Ok((sm, view))
    }

    fn apply_command(&mut self, batch: &mut WriteBatch, cmd: Command, scratch: &mut ApplyScratch) -> Result<CommandResult> {
        if let Command::Batch(commands) = cmd {
            // The scratch carries each command's effects to the next, as between entries.
            let results = commands.into_iter().map(|c| self.apply_command(batch, c, scratch)).collect::<Result<_>>()?;
            return Ok(CommandResult::Batch(results));
        }
        if let Command::Sealed { seal, commands } = cmd {
            return self.apply_sealed(batch, seal, commands, scratch);
        }
        let view = match (&self.kind, cmd) {
            (GroupKind::Metadata(view), Command::CreateMailbox { service, partitions, shard_count, created_unix_ms, limits, policy }) => {
                let new = NewMailbox { service, partitions, shard_count, created_unix_ms, limits, policy };
                return apply_create_mailbox(&self.store, view, batch, new, scratch);
            }
            (GroupKind::Metadata(view), Command::GrowMailbox { service, partitions, shard_count }) => {
                return apply_grow_mailbox(&self.store, view, batch, &service, partitions, shard_count);
            }
            (GroupKind::Metadata(view), Command::Access(cmd)) => return access::apply(&self.store, view, batch, cmd),
            (GroupKind::Metadata(view), Command::Cluster(cmd)) => return cluster::apply(&self.store, view, batch, cmd),
            (GroupKind::Shard(view), cmd) => (view.clone(), cmd),
            (_, cmd) => return Ok(self.misplaced(&cmd)),
        };
        let (view, cmd) = view;
        let mut cache = lock(&view.partitions);
        let cache = &mut *cache;
        match cmd {
            Command::Publish { messages, limits } => Ok(apply_publish(&view, batch, cache, messages, limits, scratch, None)?.0),
            Command::Ack { mailbox, positions, consumer, attempts } => {
                let ack = AckRequest { mailbox, consumer, positions, attempts, signed: HashMap::new() };
                apply_ack(&view, batch, cache, ack, scratch)
            }
            Command::Lease { mailbox, consumer, positions, now_unix_ms, until_unix_ms, policy } => {
                let request = LeaseRequest { mailbox, consumer, positions, now_unix_ms, until_unix_ms, policy };
                delivery::apply_lease(&view, batch, scratch, cache, request)
            }
            Command::Settle { mailbox, consumer, positions, now_unix_ms, action } => {
                let request = SettleRequest { mailbox, consumer, positions, now_unix_ms, action };
                delivery::apply_settle(&view, batch, scratch, cache, request)
            }
            Command::DeadLetter { mailbox, positions, now_unix_ms } => {
                delivery::apply_dead_letter(&view, batch, scratch, cache, mailbox, positions, now_unix_ms)
            }
            Command::Redrive { mailbox, positions, now_unix_ms } => {
                delivery::apply_redrive(&view, batch, scratch, cache, mailbox, positions, now_unix_ms)
            }
            Command::ReleaseConsumer { mailbox, consumer, now_unix_ms } => {
                delivery::apply_release_consumer(&view, batch, scratch, cache, mailbox, consumer, now_unix_ms)
            }
            Command::UploadBegin { new, total_bytes, sha256, limits } => {
                upload::apply_begin(&view, batch, scratch, cache, upload::BeginRequest { new, total_bytes, sha256, limits })
            }
            Command::UploadChunk { mailbox, id, offset, data } => upload::apply_chunk(&view, batch, scratch, mailbox, &id, offset, data),
            Command::UploadCommit { mailbox, id } => Ok(upload::apply_commit(&view, batch, scratch, cache, (mailbox, &id), None)?.0),
            Command::UploadAbort { mailbox, id } => upload::apply_abort(&view, batch, scratch, mailbox, &id),
            cmd @ (Command::CreateMailbox { .. }
            | Command::GrowMailbox { .. }
            | Command::Access(_)
            | Command::Cluster(_)
            | Command::Batch(_)
            | Command::Sealed { .. }) => {
                Ok(self.misplaced(&cmd))
            }
        }
    }

    /// Applies a sealed entry: the batch must extend the chain at this entry's position (else
    /// nothing is applied and the leader retries), then its commands run in order and each
    /// message and ack is filed with the leaf it was signed as.
    fn apply_sealed(&mut self, batch: &mut WriteBatch, seal: Seal, commands: Vec<Command>, scratch: &mut ApplyScratch) -> Result<CommandResult> {
        let view = match &self.kind {
            GroupKind::Shard(view) => view.clone(),
            GroupKind::Metadata(_) => return Ok(self.misplaced(&Command::Sealed { seal, commands })),
        };
        let Seal { batch: signed, leaves, acks, commits } = seal;
        let batch_no = signed.header.batch;
        let log_id = scratch.log_id;
        if let Some(refusal) = evidence::begin_seal(&view, batch, scratch, signed, leaves, log_id)? {
            return Ok(CommandResult::Rejected(refusal));
        }
        let message_leaves: u64 = commands
            .iter()
            .map(|c| if let Command::Publish { messages, .. } = c { messages.len() as u64 } else { 0 })
            .sum::<u64>()
            + commits.len() as u64;
        let mut next_leaf = 0u64;
        let mut results = Vec::with_capacity(commands.len());
        let mut refs = Vec::with_capacity(commands.len());
        for (i, cmd) in commands.into_iter().enumerate() {
            match cmd {
                Command::Publish { messages, limits } => {
                    let count = messages.len() as u64;
                    let (result, evidence) = {
                        let mut cache = lock(&view.partitions);
                        apply_publish(&view, batch, &mut cache, messages, limits, scratch, Some((batch_no, next_leaf)))?
                    };
                    next_leaf += count;
                    results.push(result);
                    refs.push(evidence);
                }
                Command::Ack { mailbox, positions, consumer, attempts } => {
                    let mut signed = HashMap::new();
                    let mut leaves = Vec::new();
                    for (j, ack) in acks.iter().enumerate().filter(|(_, a)| a.command as usize == i) {
                        let leaf = message_leaves + j as u64;
                        signed.insert(ack.position, AckEvidence { batch: batch_no, index: leaf, attempt: ack.attempt });
                        leaves.push(EvidenceRef::Leaf(leaf));
                    }
                    let mut cache = lock(&view.partitions);
                    let ack = AckRequest { mailbox, consumer, positions, attempts, signed };
                    results.push(apply_ack(&view, batch, &mut cache, ack, scratch)?);
                    refs.push(leaves);
                }
                Command::UploadCommit { mailbox, id } if commits.contains(&(i as u32)) => {
                    let (result, evidence) = {
                        let mut cache = lock(&view.partitions);
                        upload::apply_commit(&view, batch, scratch, &mut cache, (mailbox, &id), Some((batch_no, next_leaf)))?
                    };
                    next_leaf += 1;
                    results.push(result);
                    refs.push(evidence);
                }
                other => {
                    results.push(self.apply_command(batch, other, scratch)?);
                    refs.push(Vec::new());
                }
            }
        }
        Ok(CommandResult::Sealed { results, evidence: refs })
    }

    /// A command sent to a group that does not apply it: refused the same way everywhere.
    fn misplaced(&self, cmd: &Command) -> CommandResult {
        CommandResult::Rejected(BrokerError::Internal(format!(
            "command {} does not belong to group {}",
            command_name(cmd),
            self.group
        )))
    }

    fn reload_views(&mut self) -> Result<()> {
        let last = self.applied.last_applied.map(|l| l.index).unwrap_or(0);
        match &self.kind {
            GroupKind::Metadata(view) => view.reload(&self.store)?,
            GroupKind::Shard(view) => {
                lock(&view.partitions).clear();
                view.rebuild_tracker()?;
                lock(&view.dedup_purge_cursor).clear();
                lock(&view.senders).clear();
                view.load_chain_head()?;
                view.applied.send_replace(last);
            }
        }
        Ok(())
    }
}

/// State touched by one `apply` call, written once at its end.
#[derive(Default)]
struct ApplyScratch {
    dirty_partitions: HashMap<(MailboxId, u32), PartitionState>,
    deleted: HashSet<Vec<u8>>,
    /// Messages put by this batch: not in RocksDB yet, but a lease or ack later in the same
    /// batch (a follower catching up) must find them.
    puts: HashMap<Vec<u8>, StoredMessage>,
    /// Delivery states changed by this batch (`None`: removed), mirrored into the tracker
    /// once the batch is written.
    delivery: HashMap<(MailboxId, Position), Option<DeliveryState>>,
    /// Uploads changed by this batch (`None`: finished or aborted).
    uploads: HashMap<Vec<u8>, Option<upload::UploadRecord>>,
    /// Next upload number, once read.
    next_upload: Option<u64>,
    /// Next mailbox id, once read: later creations in the same batch must not reuse it.
    next_mailbox_id: Option<MailboxId>,
    /// Dedup records written by this batch (not in RocksDB yet).
    dedup: HashMap<Vec<u8>, DedupRecord>,
    /// Stored bytes per sender as this batch left them.
    dirty_senders: HashMap<String, u64>,
    /// The log id of the entry being applied.
    log_id: Option<LogId<NodeId>>,
    /// The evidence chain's head as this batch left it (`None`: unchanged).
    chain: Option<ChainHead>,
    /// The shard's evidence bytes as this batch left them (`None`: unchanged).
    evidence_bytes: Option<u64>,
}

impl ApplyScratch {
    /// A stored message as this batch left it so far.
    fn message(&self, view: &ShardView, mailbox: MailboxId, position: Position) -> Result<Option<StoredMessage>> {
        let key = keys::message_key(view.group, mailbox, position.partition, position.sequence);
        if self.deleted.contains(&key) {
            return Ok(None);
        }
        match self.puts.get(&key) {
            Some(message) => Ok(Some(message.clone())),
            None => view.store.get::<StoredMessage>(CF_STATE, &key),
        }
    }

    /// Looks at a message's delivery state as this batch left it so far (the tracker mirrors
    /// what earlier batches wrote), without copying it.
    fn with_delivery_state<R>(
        &self,
        view: &ShardView,
        mailbox: MailboxId,
        position: Position,
        f: impl FnOnce(Option<&DeliveryState>) -> R,
    ) -> R {
        match self.delivery.get(&(mailbox, position)) {
            Some(state) => f(state.as_ref()),
            None => f(lock(&view.tracker).state(mailbox, position)),
        }
    }

    /// A copy of a message's delivery state as this batch left it so far.
    fn delivery_state(&self, view: &ShardView, mailbox: MailboxId, position: Position) -> Option<DeliveryState> {
        self.with_delivery_state(view, mailbox, position, |s| s.cloned())
    }

    /// The dedup record under `key` as this batch left it so far.
    fn dedup_record(&self, view: &ShardView, key: &[u8]) -> Result<Option<DedupRecord>> {
        match self.dedup.get(key) {
            Some(record) => Ok(Some(record.clone())),
            None => view.store.get::<DedupRecord>(CF_STATE, key),
        }
    }

    /// What a shard holds of a mailbox against its quota, as this batch left it so far: its
    /// partitions here and their dead letters (a dead-letter queue nobody drains must not
    /// grow without bound).
    fn stored_against_quota(&self, view: &ShardView, cache: &mut PartitionCache, limits: &ShardLimits) -> Result<PartitionStats> {
        let mut stored = PartitionStats::default();
        for &partition in &limits.partitions {
            for p in [partition, dead_letter_partition(partition)] {
                let ps = self.partition(view, cache, limits.mailbox, p)?;
                stored.messages = stored.messages.saturating_add(ps.stats.messages);
                stored.bytes = stored.bytes.saturating_add(ps.stats.bytes);
            }
        }
        Ok(stored)
    }

    /// A partition's state as this batch left it so far.
    /// Payload bytes stored on this shard for `sender`, as this batch left them.
    fn sender_bytes(&self, view: &ShardView, sender: &str) -> Result<u64> {
        if let Some(b) = self.dirty_senders.get(sender) {
            return Ok(*b);
        }
        if let Some(b) = lock(&view.senders).get(sender) {
            return Ok(*b);
        }
        let stored = view.store.get::<u64>(CF_STATE, &keys::state_key(view.group, KIND_SENDER, sender.as_bytes()))?.unwrap_or(0);
        lock(&view.senders).insert(sender.to_owned(), stored);
        Ok(stored)
    }

    /// Counts `bytes` into (`added`) or out of `sender`'s stored total.
    fn account_sender(&mut self, view: &ShardView, sender: &str, bytes: u64, added: bool) -> Result<()> {
        if sender.is_empty() {
            return Ok(());
        }
        let now = self.sender_bytes(view, sender)?;
        let next = if added { now.saturating_add(bytes) } else { now.saturating_sub(bytes) };
        self.dirty_senders.insert(sender.to_owned(), next);
        Ok(())
    }

    /// The refusal of storing `bytes` more for `sender` past `limit` (its share on this shard).
    fn sender_over_quota(&self, view: &ShardView, sender: &str, limit: Option<u64>, bytes: u64) -> Result<Option<BrokerError>> {
        let Some(limit) = limit.filter(|_| !sender.is_empty()) else { return Ok(None) };
        let stored = self.sender_bytes(view, sender)?;
        if stored.saturating_add(bytes) <= limit {
            return Ok(None);
        }
        Ok(Some(BrokerError::ResourceExhausted(format!(
            "subsystem {sender} has {stored} bytes waiting on shard {} of the {limit} allowed there, and this adds {bytes}; \
             wait for the recipients to consume, then retry",
            view.group
        ))))
    }

    fn partition(
        &self,
        view: &ShardView,
        cache: &mut HashMap<(MailboxId, u32), PartitionState>,
        mailbox: MailboxId,
        partition: u32,
    ) -> Result<PartitionState> {
        match self.dirty_partitions.get(&(mailbox, partition)) {
            Some(ps) => Ok(*ps),
            None => view.partition_state(cache, mailbox, partition),
        }
    }
}

fn command_name(cmd: &Command) -> &'static str {
    match cmd {
        Command::CreateMailbox { .. } => "CreateMailbox",
        Command::GrowMailbox { .. } => "GrowMailbox",
        Command::Publish { .. } => "Publish",
        Command::Ack { .. } => "Ack",
        Command::Lease { .. } => "Lease",
        Command::Settle { .. } => "Settle",
        Command::DeadLetter { .. } => "DeadLetter",
        Command::Redrive { .. } => "Redrive",
        Command::ReleaseConsumer { .. } => "ReleaseConsumer",
        Command::UploadBegin { .. } => "UploadBegin",
        Command::UploadChunk { .. } => "UploadChunk",
        Command::UploadCommit { .. } => "UploadCommit",
        Command::UploadAbort { .. } => "UploadAbort",
        Command::Access(_) => "Access",
        Command::Cluster(_) => "Cluster",
        Command::Batch(_) => "Batch",
        Command::Sealed { .. } => "Sealed",
    }
}

/// The fields of a `CreateMailbox` command.
struct NewMailbox {
    service: String,
    partitions: u32,
    shard_count: u32,
    created_unix_ms: i64,
    limits: MailboxLimits,
    policy: DeliveryPolicy,
}

fn apply_create_mailbox(
    store: &Store,
    view: &MetaView,
    batch: &mut WriteBatch,
    new: NewMailbox,
    scratch: &mut ApplyScratch,
) -> Result<CommandResult> {
    let NewMailbox { service, partitions, shard_count, created_unix_ms, limits, policy } = new;
    if read(&view.mailboxes).contains_key(&service) {
        return Ok(CommandResult::Rejected(BrokerError::AlreadyExists(format!("mailbox {service} already exists"))));
    }
    let owner = match service.parse::<ServiceId>() {
        Ok(id) => id.subsystem,
        Err(e) => return Ok(CommandResult::Rejected(BrokerError::InvalidArgument(e.to_string()))),
    };
    if read(&view.access).member(&owner).is_none() {
        return Ok(CommandResult::Rejected(access::not_registered(&owner.to_string())));
    }
    if partitions == 0 || partitions > MAX_PARTITIONS || shard_count == 0 {
        return Ok(CommandResult::Rejected(BrokerError::InvalidArgument(format!(
            "partitions must be 1..={MAX_PARTITIONS}, got {partitions}"
        ))));
    }
    let cf = store.cf(CF_STATE)?;
    let counter_key = keys::state_key(METADATA_GROUP, KIND_NEXT_MAILBOX_ID, &[]);
    let id: MailboxId = match scratch.next_mailbox_id {
        Some(id) => id,
        None => store.get(CF_STATE, &counter_key)?.unwrap_or(1),
    };
    scratch.next_mailbox_id = Some(id + 1);
    let partition_shards = (0..partitions).map(|p| placed_shard(id, p, shard_count)).collect();
    let info = MailboxInfo { id, service: service.clone(), partitions, partition_shards, created_unix_ms, limits, policy, key_partitions: partitions };
    batch.put_cf(&cf, &counter_key, store.encode(&(id + 1))?);
    batch.put_cf(&cf, keys::state_key(METADATA_GROUP, KIND_MAILBOX, service.as_bytes()), store.encode(&info)?);
    write(&view.mailboxes).insert(service, info.clone());
    Ok(CommandResult::MailboxCreated(info))
}

/// The shard partition `partition` of mailbox `id` is placed on: consecutive partitions on
/// consecutive shards, starting at a shard that depends on the mailbox.
fn placed_shard(id: MailboxId, partition: u32, shard_count: u32) -> GroupId {
    1 + ((id + u64::from(partition)) % u64::from(shard_count.max(1))) as GroupId
}

/// Adds partitions to a mailbox (placed as creation places them). Its ordering keys keep
/// hashing over `key_partitions`, so no key changes partition.
fn apply_grow_mailbox(store: &Store, view: &MetaView, batch: &mut WriteBatch, service: &str, partitions: u32, shard_count: u32) -> Result<CommandResult> {
    let Some(mut info) = read(&view.mailboxes).get(service).cloned() else {
        return Ok(CommandResult::Rejected(BrokerError::NotFound(format!("mailbox {service} does not exist"))));
    };
    if partitions <= info.partitions || partitions > MAX_PARTITIONS || shard_count == 0 {
        return Ok(CommandResult::Rejected(BrokerError::InvalidArgument(format!(
            "mailbox {service} has {} partitions: it can grow to {}..={MAX_PARTITIONS}, not {partitions}",
            info.partitions,
            info.partitions + 1
        ))));
    }
    info.partition_shards.extend((info.partitions..partitions).map(|p| placed_shard(info.id, p, shard_count)));
    info.partitions = partitions;
    let cf = store.cf(CF_STATE)?;
    batch.put_cf(&cf, keys::state_key(METADATA_GROUP, KIND_MAILBOX, service.as_bytes()), store.encode(&info)?);
    write(&view.mailboxes).insert(service.to_owned(), info.clone());
    Ok(CommandResult::MailboxCreated(info))
}

/// Where a message id was first stored, for idempotent publishing; for a request, also what
/// its reply is checked against (see [`crate::request`]), for as long as the id is remembered.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct DedupRecord {
    position: Position,
    accepted_unix_ms: i64,
    /// Batch and leaf of the message's evidence, when it was signed.
    evidence: Option<(u64, u64)>,
    request: Option<RequestRecord>,
}

/// Expired dedup records one publish removes per mailbox, beyond one per message it stores:
/// expiry outpaces insertion while each apply's extra work stays bounded.
const DEDUP_PURGE_SLACK: usize = 64;

/// Every this many purges of a mailbox, the scan starts over from the oldest expiry entry.
/// In between it resumes right after the last entry it removed, so it does not walk the
/// tombstones of earlier purges (with a time-based restart point, a short window at a high
/// rate made every publish walk hundreds of thousands of them). The occasional full scan
/// finds entries that sort before the cursor: ids accepted by a node whose clock lagged.
const DEDUP_FULL_SCAN_EVERY: u32 = 4096;

/// Where a mailbox's next dedup purge starts.
#[derive(Default)]
struct PurgeCursor {
    /// The last expiry key removed; the next scan starts right after it.
    after: Option<Vec<u8>>,
    purges: u32,
}

/// What a publish does with one of its messages.
enum Slot {
    /// Seen within the dedup window: answer with the earlier position (and evidence).
    Earlier(Position, EvidenceRef),
    /// The same id earlier in this command: answer with that message's position.
    SameAs(usize),
    /// Store it; the id's dedup key, computed once.
    New(Vec<u8>),
}

fn within_window(earlier_ms: i64, now_ms: i64, window_ms: u64) -> bool {
    i128::from(now_ms) - i128::from(earlier_ms) < i128::from(window_ms)
}

/// Stores a publish's new messages. With `seal` (batch number, leaf of the first message),
/// the messages were signed as consecutive leaves of that batch and each new one gets its
/// evidence record. Returns the result and, per message, where its evidence is.
fn apply_publish(
    view: &ShardView,
    batch: &mut WriteBatch,
    cache: &mut PartitionCache,
    messages: Vec<NewMessage>,
    limits: Vec<ShardLimits>,
    scratch: &mut ApplyScratch,
    seal: Option<(u64, u64)>,
) -> Result<(CommandResult, Vec<EvidenceRef>)> {
    let cf = view.store.cf(CF_STATE)?;
    let limits: HashMap<MailboxId, ShardLimits> = limits.into_iter().map(|l| (l.mailbox, l)).collect();
    let window = |mailbox| limits.get(&mailbox).map_or(MailboxLimits::DEFAULT_DEDUP_WINDOW_MS, |l| l.dedup_window_ms);

    // First pass, no writes: which messages are new, and do they fit the quotas?
    let mut slots = Vec::with_capacity(messages.len());
    let mut first_in_command: HashMap<(MailboxId, &str), usize> = HashMap::new();
    let mut added: BTreeMap<MailboxId, PartitionStats> = BTreeMap::new();
    for (i, m) in messages.iter().enumerate() {
        if let Some(first) = first_in_command.get(&(m.mailbox, m.message.id.as_str())) {
            slots.push(Slot::SameAs(*first));
            continue;
        }
        let key = keys::dedup_key(view.group, m.mailbox, &m.message.id);
        match scratch.dedup_record(view, &key)? {
            Some(r) if within_window(r.accepted_unix_ms, m.message.accepted_unix_ms, window(m.mailbox)) => {
                let earlier = r.evidence.map_or(EvidenceRef::None, |(batch, index)| EvidenceRef::Stored {
                    batch,
                    index,
                    accepted_unix_ms: r.accepted_unix_ms,
                });
                slots.push(Slot::Earlier(r.position, earlier));
            }
            _ => {
                first_in_command.insert((m.mailbox, m.message.id.as_str()), i);
                let add = added.entry(m.mailbox).or_default();
                add.messages += 1;
                add.bytes += m.message.payload_len();
                slots.push(Slot::New(key));
            }
        }
    }
    for (mailbox, add) in &added {
        let Some(limit) = limits.get(mailbox) else { continue };
        let stored = scratch.stored_against_quota(view, cache, limit)?;
        if stored.messages.saturating_add(add.messages) > limit.max_messages
            || stored.bytes.saturating_add(add.bytes) > limit.max_bytes
        {
            return Ok((CommandResult::Rejected(BrokerError::ResourceExhausted(format!(
                "mailbox {} is full: its partitions on shard {} hold {} messages / {} bytes of the {} / {} \
                 allowed there, and this publish adds {} / {}; consume or wait, then retry",
                limit.service, view.group, stored.messages, stored.bytes, limit.max_messages, limit.max_bytes,
                add.messages, add.bytes
            ))), Vec::new()));
        }
    }
    // The sender's own quota: every limit of one command carries the same sender share.
    let sender_limit = limits.values().find_map(|l| l.sender_max_stored_bytes);
    let mut by_sender: BTreeMap<&str, u64> = BTreeMap::new();
    for (m, slot) in messages.iter().zip(&slots) {
        if matches!(slot, Slot::New(_)) {
            *by_sender.entry(m.message.sender.as_str()).or_default() += m.message.payload_len();
        }
    }
    for (sender, bytes) in by_sender {
        if let Some(refusal) = scratch.sender_over_quota(view, sender, sender_limit, bytes)? {
            return Ok((CommandResult::Rejected(refusal), Vec::new()));
        }
    }

    // Second pass: store the new messages and remember their ids.
    let mut positions: Vec<Position> = Vec::with_capacity(messages.len());
    let mut refs: Vec<EvidenceRef> = Vec::with_capacity(messages.len());
    let mut newest: BTreeMap<MailboxId, i64> = BTreeMap::new();
    for (i, (mut m, slot)) in messages.into_iter().zip(slots).enumerate() {
        let position = match slot {
            Slot::Earlier(position, earlier) => {
                refs.push(earlier);
                position
            }
            Slot::SameAs(first) => {
                refs.push(refs[first]);
                positions[first]
            }
            Slot::New(dedup_key) => {
                let accepted_unix_ms = m.message.accepted_unix_ms;
                let id = m.message.id.clone();
                let request = m.message.headers.iter().find(|(k, _)| k == HEADER_REPLY_TO).map(|(_, reply_to)| RequestRecord {
                    requester: m.message.sender.clone(),
                    reply_to: reply_to.clone(),
                    hash: m.message.leaf(),
                });
                let signed = seal.map(|(batch_no, first_leaf)| (batch_no, first_leaf + i as u64));
                m.message.signed_as = signed;
                refs.push(match signed {
                    Some((_, leaf)) => EvidenceRef::Leaf(leaf),
                    None => EvidenceRef::None,
                });
                let position = delivery::insert_message(view, batch, scratch, cache, m.mailbox, m.partition, m.message)?;
                let record = DedupRecord { position, accepted_unix_ms, evidence: signed, request };
                batch.put_cf(&cf, &dedup_key, view.store.encode(&record)?);
                scratch.dedup.insert(dedup_key, record);
                batch.put_cf(&cf, keys::dedup_expiry_key(view.group, m.mailbox, accepted_unix_ms, &id), []);
                let t = newest.entry(m.mailbox).or_insert(accepted_unix_ms);
                *t = (*t).max(accepted_unix_ms);
                position
            }
        };
        positions.push(position);
    }
    for (mailbox, now_ms) in newest {
        let budget = added.get(&mailbox).map_or(0, |a| a.messages as usize) + DEDUP_PURGE_SLACK;
        purge_expired_dedup(view, batch, scratch, mailbox, window(mailbox), now_ms, budget)?;
        if let Some(retention) = limits.get(&mailbox).map(|l| l.evidence_retention_ms) {
            let cutoff = now_ms.saturating_sub(i64::try_from(retention).unwrap_or(i64::MAX));
            evidence::purge_expired(view, batch, scratch, mailbox, cutoff, budget)?;
        }
    }
    Ok((CommandResult::Published(positions), refs))
}

/// Removes up to `budget` dedup records of `mailbox` that fell out of the window by `now_ms`,
/// oldest first. Only expired records go, so which ones a replica happens to remove does not
/// change any answer.
fn purge_expired_dedup(
    view: &ShardView,
    batch: &mut WriteBatch,
    scratch: &mut ApplyScratch,
    mailbox: MailboxId,
    window_ms: u64,
    now_ms: i64,
    budget: usize,
) -> Result<()> {
    let cf = view.store.cf(CF_STATE)?;
    let prefix = keys::dedup_expiry_prefix(view.group, mailbox);
    let start = {
        let mut cursors = lock(&view.dedup_purge_cursor);
        let cursor = cursors.entry(mailbox).or_default();
        cursor.purges = cursor.purges.wrapping_add(1);
        match &cursor.after {
            // The smallest key greater than the last one removed.
            Some(after) if cursor.purges % DEDUP_FULL_SCAN_EVERY != 0 => [after.as_slice(), &[0]].concat(),
            _ => prefix.clone(),
        }
    };
    let mut removed = 0usize;
    let mut last_removed = None;
    for_each_from(&view.store, &prefix, &start, |key, _| {
        if removed >= budget {
            return Ok(false);
        }
        let Some((accepted_ms, id)) = keys::parse_dedup_expiry(&key[prefix.len()..]) else { return Ok(true) };
        if within_window(accepted_ms, now_ms, window_ms) {
            return Ok(false);
        }
        if !scratch.deleted.insert(key.to_vec()) {
            return Ok(true);
        }
        batch.delete_cf(&cf, key);
        let dedup_key = keys::dedup_key(view.group, mailbox, id);
        let record = scratch.dedup_record(view, &dedup_key)?;
        // A newer publish of the same id owns the record now; its own expiry entry removes it.
        if record.is_some_and(|r| r.accepted_unix_ms == accepted_ms) {
            batch.delete_cf(&cf, &dedup_key);
            scratch.dedup.remove(&dedup_key);
        }
        removed += 1;
        last_removed = Some(key.to_vec());
        Ok(true)
    })?;
    if last_removed.is_some() {
        lock(&view.dedup_purge_cursor).entry(mailbox).or_default().after = last_removed;
    }
    Ok(())
}

/// An ack to apply: a `Command::Ack` and, when sealed, where each acked message's ack leaf is.
struct AckRequest {
    mailbox: MailboxId,
    consumer: Option<u64>,
    positions: Vec<Position>,
    attempts: Vec<u32>,
    signed: HashMap<Position, AckEvidence>,
}

/// Purges the acked messages whose ack is still current (see [`Command::Ack`]); each leaves
/// its evidence record with its signed ack.
fn apply_ack(
    view: &ShardView,
    batch: &mut WriteBatch,
    cache: &mut PartitionCache,
    ack: AckRequest,
    scratch: &mut ApplyScratch,
) -> Result<CommandResult> {
    let AckRequest { mailbox, consumer, positions, attempts, mut signed } = ack;
    let mut removed = 0;
    for (i, position) in positions.into_iter().enumerate() {
        let attempt = attempts.get(i).copied();
        let superseded = scratch.with_delivery_state(view, mailbox, position, |state| {
            let Some(state) = state else { return false };
            let other_holder = consumer.is_some_and(|c| state.lease().is_some_and(|(holder, _)| holder != c));
            other_holder || attempt.is_some_and(|a| a != state.attempts)
        });
        if superseded {
            continue;
        }
        let Some(message) = scratch.message(view, mailbox, position)? else { continue };
        delivery::purge_message(view, batch, scratch, cache, (mailbox, position), &message, signed.remove(&position))?;
        removed += 1;
    }
    Ok(CommandResult::Acked(removed))
}

impl RaftStateMachine<TypeConfig> for StateMachine {
    type SnapshotBuilder = SnapshotBuilder;

    async fn applied_state(&mut self) -> StorageResult<(Option<LogId<NodeId>>, StoredMembership<NodeId, BasicNode>)> {
        Ok((self.applied.last_applied, self.applied.membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> StorageResult<Vec<CommandResult>>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let mut batch = WriteBatch::default();
        let mut scratch = ApplyScratch::default();
        let mut results = Vec::new();
        for entry in entries {
            self.applied.last_applied = Some(entry.log_id);
            scratch.log_id = Some(entry.log_id);
            let result = match entry.payload {
                EntryPayload::Blank => CommandResult::Nothing,
                EntryPayload::Membership(m) => {
                    self.applied.membership = StoredMembership::new(Some(entry.log_id), m);
                    CommandResult::Nothing
                }
                EntryPayload::Normal(cmd) => self
                    .apply_command(&mut batch, cmd, &mut scratch)
                    .map_err(|e| StorageIOError::apply(entry.log_id, &e))?,
            };
            results.push(result);
        }
        let io = |e: BrokerError| StorageError::from(StorageIOError::write_state_machine(&e));
        let cf = self.store.cf(CF_STATE).map_err(io)?;
        if let GroupKind::Shard(view) = &self.kind {
            evidence::finish(view, &mut batch, &mut scratch).map_err(io)?;
            let mut cache = lock(&view.partitions);
            for ((mailbox, partition), ps) in scratch.dirty_partitions.drain() {
                batch.put_cf(&cf, keys::partition_key(self.group, mailbox, partition), self.store.encode(&ps).map_err(io)?);
                cache.insert((mailbox, partition), ps);
            }
            let mut senders = lock(&view.senders);
            for (sender, bytes) in scratch.dirty_senders.drain() {
                let key = keys::state_key(self.group, KIND_SENDER, sender.as_bytes());
                if bytes == 0 {
                    batch.delete_cf(&cf, key);
                } else {
                    batch.put_cf(&cf, key, self.store.encode(&bytes).map_err(io)?);
                }
                senders.insert(sender, bytes);
            }
        }
        batch.put_cf(&cf, keys::state_key(self.group, KIND_APPLIED, &[]), self.store.encode(&self.applied).map_err(io)?);
        self.store.write_unsynced(batch).map_err(io)?;
        if let GroupKind::Shard(view) = &self.kind {
            if !scratch.delivery.is_empty() {
                let mut tracker = lock(&view.tracker);
                for ((mailbox, position), state) in scratch.delivery.drain() {
                    tracker.set_state(mailbox, position, state);
                }
            }
            view.applied.send_replace(self.applied.last_applied.map(|l| l.index).unwrap_or(0));
        }
        Ok(results)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        SnapshotBuilder { group: self.group, store: self.store.clone() }
    }

    async fn begin_receiving_snapshot(&mut self) -> StorageResult<Box<Cursor<Vec<u8>>>> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<NodeId, BasicNode>,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> StorageResult<()> {
        let io = |e: BrokerError| StorageError::from(StorageIOError::write_snapshot(Some(meta.signature()), &e));
        let payload: SnapshotPayload = decode_plain(snapshot.get_ref()).map_err(io)?;
        let cf = self.store.cf(CF_STATE).map_err(io)?;
        let prefix = keys::group_prefix(self.group);
        let mut batch = WriteBatch::default();
        batch.delete_range_cf(&cf, prefix.as_slice(), keys::group_end(self.group).as_slice());
        for (key, value) in payload.records {
            let mut full = prefix.to_vec();
            full.extend_from_slice(&key);
            // Snapshots carry plaintext records (every node has its own data key): sealed with ours.
            batch.put_cf(&cf, full, self.store.seal_bytes(&value).map_err(io)?);
        }
        self.applied = AppliedRecord { last_applied: meta.last_log_id, membership: meta.last_membership.clone() };
        batch.put_cf(&cf, keys::state_key(self.group, KIND_APPLIED, &[]), self.store.encode(&self.applied).map_err(io)?);
        drop(cf);
        self.store.write_unsynced(batch).map_err(io)?;
        save_snapshot(&self.store, self.group, meta, snapshot.get_ref()).map_err(io)?;
        self.store.sync().await.map_err(io)?;
        self.reload_views().map_err(io)?;
        tracing::info!(group = self.group, snapshot = %meta.snapshot_id, "installed snapshot");
        Ok(())
    }

    async fn get_current_snapshot(&mut self) -> StorageResult<Option<Snapshot<TypeConfig>>> {
        let io = |e: BrokerError| StorageError::from(StorageIOError::read_snapshot(None, &e));
        let stored: Option<(SnapshotMeta<NodeId, BasicNode>, Vec<u8>)> =
            self.store.get(CF_RAFT_META, &keys::meta_key(self.group, TAG_SNAPSHOT)).map_err(io)?;
        Ok(stored.map(|(meta, data)| Snapshot { meta, snapshot: Box::new(Cursor::new(data)) }))
    }
}

/// Builds snapshots of one group from a consistent RocksDB snapshot of its key range.
pub struct SnapshotBuilder {
    group: GroupId,
    store: Arc<Store>,
}

impl RaftSnapshotBuilder<TypeConfig> for SnapshotBuilder {
    async fn build_snapshot(&mut self) -> StorageResult<Snapshot<TypeConfig>> {
        let io = |e: BrokerError| StorageError::from(StorageIOError::read_snapshot(None, &e));
        // The log this snapshot covers may be purged next: its state must be durable first.
        self.store.sync().await.map_err(io)?;
        let snapshot = build_snapshot(&self.store, self.group).map_err(io)?;
        save_snapshot(&self.store, self.group, &snapshot.meta, snapshot.snapshot.get_ref()).map_err(io)?;
        self.store.sync().await.map_err(io)?;
        Ok(snapshot)
    }
}

/// Dumps the group's key range, read from one consistent RocksDB snapshot.
fn build_snapshot(store: &Store, group: GroupId) -> Result<Snapshot<TypeConfig>> {
    let db = store.db();
    let snap = db.snapshot();
    let cf = store.cf(CF_STATE)?;
    let prefix = keys::group_prefix(group);
    let mut ro = ReadOptions::default();
    ro.set_snapshot(&snap);
    let mut records = Vec::new();
    let mut applied = AppliedRecord::default();
    let applied_key = keys::state_key(group, KIND_APPLIED, &[]);
    for item in db.iterator_cf_opt(&cf, ro, IteratorMode::From(&prefix, Direction::Forward)) {
        let (key, value) = item.map_err(BrokerError::storage)?;
        if !key.starts_with(&prefix) {
            break;
        }
        // Opened: the receiving node seals each record with its own data key.
        let value = store.open_bytes(&value)?.into_owned();
        if *key == *applied_key {
            applied = decode_plain(&value)?;
        }
        records.push((key[prefix.len()..].to_vec(), value));
    }
    let last = applied.last_applied;
    let meta = SnapshotMeta {
        last_log_id: last,
        last_membership: applied.membership.clone(),
        snapshot_id: match last {
            Some(l) => format!("g{}-t{}-i{}", group, l.leader_id.term, l.index),
            None => format!("g{}-empty", group),
        },
    };
    let data = encode_plain(&SnapshotPayload { records })?;
    Ok(Snapshot { meta, snapshot: Box::new(Cursor::new(data)) })
}

/// Keeps the snapshot (meta and data) for `get_current_snapshot`.
fn save_snapshot(store: &Store, group: GroupId, meta: &SnapshotMeta<NodeId, BasicNode>, data: &[u8]) -> Result<()> {
    let cf = store.cf(CF_RAFT_META)?;
    let mut batch = WriteBatch::default();
    batch.put_cf(&cf, keys::meta_key(group, TAG_SNAPSHOT), store.encode(&(meta, data))?);
    store.write_unsynced(batch)
}

fn load_applied(store: &Store, group: GroupId) -> Result<AppliedRecord> {
    Ok(store.get(CF_STATE, &keys::state_key(group, KIND_APPLIED, &[]))?.unwrap_or_default())
}

/// Calls `f(key, value)` for keys starting with `prefix`, from `from`, while it returns true.
/// Calls `f` on the keys starting with `prefix`, from `from` on, while it returns true.
fn for_each_from(store: &Store, prefix: &[u8], from: &[u8], mut f: impl FnMut(&[u8], &[u8]) -> Result<bool>) -> Result<()> {
    let cf = store.cf(CF_STATE)?;
    // The upper bound matters for speed, not correctness: without it, a scan that reaches the
    // end of its prefix walks on through the tombstones of acked messages that follow (every
    // other partition's), which made empty-mailbox polls the hottest code under load.
    let mut options = ReadOptions::default();
    if let Some(end) = keys::prefix_end(prefix) {
        options.set_iterate_upper_bound(end);
    }
    for item in store.db().iterator_cf_opt(&cf, options, IteratorMode::From(from, Direction::Forward)) {
        let (key, value) = item.map_err(BrokerError::storage)?;
        if !key.starts_with(prefix) || !f(&key, &value)? {
            break;
        }
    }
    Ok(())
}

fn for_each_in_prefix(store: &Store, prefix: &[u8], f: impl FnMut(&[u8], &[u8]) -> Result<bool>) -> Result<()> {
    for_each_from(store, prefix, prefix, f)
}

// A poisoned lock means a panic while holding it; the data is still the best we have.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}
fn read<T>(l: &RwLock<T>) -> std::sync::RwLockReadGuard<'_, T> {
    l.read().unwrap_or_else(|p| p.into_inner())
}
fn write<T>(l: &RwLock<T>) -> std::sync::RwLockWriteGuard<'_, T> {
    l.write().unwrap_or_else(|p| p.into_inner())
}

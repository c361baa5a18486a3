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

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::Cursor;
use std::sync::{Arc, Mutex, MutexGuard, RwLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use openraft::storage::{RaftSnapshotBuilder, RaftStateMachine, Snapshot};
use openraft::{
    BasicNode, Entry, EntryPayload, LogId, OptionalSend, SnapshotMeta, StorageError, StorageIOError,
    StoredMembership,
};
use rocksdb::{Direction, IteratorMode, ReadOptions, WriteBatch};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use super::keys::{self, KIND_APPLIED, KIND_MAILBOX, KIND_NEXT_MAILBOX_ID, TAG_SNAPSHOT};
use super::{decode, encode, Store, CF_RAFT_META, CF_STATE};
use crate::delivery::{ConsumerId, DeliveryTracker};
use crate::error::{BrokerError, Result};
use crate::model::{
    Command, CommandResult, GroupId, MailboxId, MailboxInfo, MailboxLimits, NewMessage, NodeId, PartitionStats,
    Position, ShardLimits, StoredMessage, TypeConfig, METADATA_GROUP,
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

/// A snapshot: every key/value of the group's range, keys without the group prefix.
#[derive(Serialize, Deserialize)]
struct SnapshotPayload {
    records: Vec<(Vec<u8>, Vec<u8>)>,
}

/// Read-only view of the metadata group, shared with the node's services.
pub struct MetaView {
    mailboxes: RwLock<BTreeMap<String, MailboxInfo>>,
}

impl MetaView {
    pub fn mailbox(&self, service: &str) -> Option<MailboxInfo> {
        read(&self.mailboxes).get(service).cloned()
    }

    pub fn mailboxes(&self) -> Vec<MailboxInfo> {
        read(&self.mailboxes).values().cloned().collect()
    }

    fn reload(&self, store: &Store) -> Result<()> {
        let mut map = BTreeMap::new();
        for_each_in_prefix(store, &keys::state_key(METADATA_GROUP, KIND_MAILBOX, &[]), |_, value| {
            let info: MailboxInfo = decode(value)?;
            map.insert(info.service.clone(), info);
            Ok(true)
        })?;
        *write(&self.mailboxes) = map;
        Ok(())
    }
}

/// One leased message handed to a consumer.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Leased {
    pub position: Position,
    pub message: StoredMessage,
    pub attempt: u32,
    pub lease_expires_unix_ms: i64,
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
}

impl ShardView {
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

    /// Leases up to `max` deliverable messages of `mailbox` from `partitions` to `consumer`:
    /// first redeliveries (released or expired leases), then messages never delivered in this
    /// term, each partition in sequence order. `term` is the caller's current leader term.
    pub fn fetch(
        &self,
        term: u64,
        consumer: ConsumerId,
        mailbox: MailboxId,
        partitions: &[u32],
        max: usize,
        lease: Duration,
    ) -> Result<Vec<Leased>> {
        let now = Instant::now();
        let expires = now + lease;
        let expires_unix_ms = unix_ms(SystemTime::now() + lease);
        let mut out = Vec::new();
        let mut tracker = lock(&self.tracker);
        tracker.start_term(term);
        for &partition in partitions {
            if out.len() >= max {
                break;
            }
            let cursor = tracker.cursor(mailbox, partition);
            cursor.expire(now);
            while out.len() < max {
                let Some((seq, attempts)) = cursor.pop_ready() else { break };
                let key = keys::message_key(self.group, mailbox, partition, seq);
                if let Some(message) = self.store.get::<StoredMessage>(CF_STATE, &key)? {
                    cursor.lease(seq, consumer, expires, attempts + 1);
                    out.push(Leased {
                        position: Position { partition, sequence: seq },
                        message,
                        attempt: attempts + 1,
                        lease_expires_unix_ms: expires_unix_ms,
                    });
                }
            }
            if out.len() >= max {
                break;
            }
            let prefix = keys::message_prefix(self.group, mailbox, partition);
            let from = keys::message_key(self.group, mailbox, partition, cursor.next_scan);
            let mut fresh = Vec::new();
            let wanted = max - out.len();
            for_each_from(&self.store, &prefix, &from, |key, value| {
                let seq = keys::message_seq(key).ok_or_else(|| BrokerError::Storage("bad message key".into()))?;
                fresh.push((seq, decode::<StoredMessage>(value)?));
                Ok(fresh.len() < wanted)
            })?;
            for (seq, message) in fresh {
                cursor.lease(seq, consumer, expires, 1);
                out.push(Leased {
                    position: Position { partition, sequence: seq },
                    message,
                    attempt: 1,
                    lease_expires_unix_ms: expires_unix_ms,
                });
            }
        }
        Ok(out)
    }

    /// Whether `fetch` would lease anything now: a redelivery is due or a message was never
    /// handed out in this term.
    pub fn has_deliverable(&self, term: u64, mailbox: MailboxId, partitions: &[u32]) -> Result<bool> {
        let now = Instant::now();
        let mut tracker = lock(&self.tracker);
        tracker.start_term(term);
        for &partition in partitions {
            let cursor = tracker.cursor(mailbox, partition);
            cursor.expire(now);
            if cursor.has_ready() {
                return Ok(true);
            }
            let prefix = keys::message_prefix(self.group, mailbox, partition);
            let from = keys::message_key(self.group, mailbox, partition, cursor.next_scan);
            let mut found = false;
            for_each_from(&self.store, &prefix, &from, |_, _| {
                found = true;
                Ok(false)
            })?;
            if found {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// Gives back leases of `consumer` on `mailbox` (all, or only `positions`) for redelivery.
    pub fn release(&self, consumer: ConsumerId, mailbox: MailboxId, positions: Option<&[Position]>) {
        lock(&self.tracker).release(consumer, mailbox, positions);
    }
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
        let view = Arc::new(MetaView { mailboxes: RwLock::new(BTreeMap::new()) });
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
        });
        let sm = Self { group, store, kind: GroupKind::Shard(view.clone()), applied };
        Ok((sm, view))
    }

    fn apply_command(&mut self, batch: &mut WriteBatch, cmd: Command, scratch: &mut ApplyScratch) -> Result<CommandResult> {
        if let Command::Batch(commands) = cmd {
            // The scratch carries each command's effects to the next, as between entries.
            let results = commands.into_iter().map(|c| self.apply_command(batch, c, scratch)).collect::<Result<_>>()?;
            return Ok(CommandResult::Batch(results));
        }
        match (&self.kind, cmd) {
            (GroupKind::Metadata(view), Command::CreateMailbox { service, partitions, shard_count, created_unix_ms, limits }) => {
                let new = NewMailbox { service, partitions, shard_count, created_unix_ms, limits };
                apply_create_mailbox(&self.store, view, batch, new, scratch)
            }
            (GroupKind::Shard(view), Command::Publish { messages, limits }) => apply_publish(view, batch, messages, limits, scratch),
            (GroupKind::Shard(view), Command::Ack { mailbox, positions }) => apply_ack(view, batch, mailbox, positions, scratch),
            (_, cmd) => Ok(CommandResult::Rejected(BrokerError::Internal(format!(
                "command {} does not belong to group {}",
                command_name(&cmd),
                self.group
            )))),
        }
    }

    fn reload_views(&mut self) -> Result<()> {
        let last = self.applied.last_applied.map(|l| l.index).unwrap_or(0);
        match &self.kind {
            GroupKind::Metadata(view) => view.reload(&self.store)?,
            GroupKind::Shard(view) => {
                lock(&view.partitions).clear();
                lock(&view.tracker).clear();
                lock(&view.dedup_purge_cursor).clear();
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
    /// Payload sizes of messages put by this batch: not in RocksDB yet, but an ack later in
    /// the same batch (a follower catching up) must find them.
    put_sizes: HashMap<Vec<u8>, u64>,
    acked: Vec<(MailboxId, Position)>,
    /// Next mailbox id, once read: later creations in the same batch must not reuse it.
    next_mailbox_id: Option<MailboxId>,
    /// Dedup records written by this batch (not in RocksDB yet).
    dedup: HashMap<Vec<u8>, DedupRecord>,
}

impl ApplyScratch {
    /// The dedup record under `key` as this batch left it so far.
    fn dedup_record(&self, view: &ShardView, key: &[u8]) -> Result<Option<DedupRecord>> {
        match self.dedup.get(key) {
            Some(record) => Ok(Some(*record)),
            None => view.store.get::<DedupRecord>(CF_STATE, key),
        }
    }

    /// A partition's state as this batch left it so far.
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
        Command::Publish { .. } => "Publish",
        Command::Ack { .. } => "Ack",
        Command::Batch(_) => "Batch",
    }
}

/// The fields of a `CreateMailbox` command.
struct NewMailbox {
    service: String,
    partitions: u32,
    shard_count: u32,
    created_unix_ms: i64,
    limits: MailboxLimits,
}

fn apply_create_mailbox(
    store: &Store,
    view: &MetaView,
    batch: &mut WriteBatch,
    new: NewMailbox,
    scratch: &mut ApplyScratch,
) -> Result<CommandResult> {
    let NewMailbox { service, partitions, shard_count, created_unix_ms, limits } = new;
    if read(&view.mailboxes).contains_key(&service) {
        return Ok(CommandResult::Rejected(BrokerError::AlreadyExists(format!("mailbox {service} already exists"))));
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
    let partition_shards = (0..partitions)
        .map(|p| 1 + ((id + u64::from(p)) % u64::from(shard_count)) as GroupId)
        .collect();
    let info = MailboxInfo { id, service: service.clone(), partitions, partition_shards, created_unix_ms, limits };
    batch.put_cf(&cf, &counter_key, encode(&(id + 1))?);
    batch.put_cf(&cf, keys::state_key(METADATA_GROUP, KIND_MAILBOX, service.as_bytes()), encode(&info)?);
    write(&view.mailboxes).insert(service, info.clone());
    Ok(CommandResult::MailboxCreated(info))
}

/// Where a message id was first stored, for idempotent publishing.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
struct DedupRecord {
    position: Position,
    accepted_unix_ms: i64,
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
    /// Seen within the dedup window: answer with the earlier position.
    Earlier(Position),
    /// The same id earlier in this command: answer with that message's position.
    SameAs(usize),
    /// Store it; the id's dedup key, computed once.
    New(Vec<u8>),
}

fn within_window(earlier_ms: i64, now_ms: i64, window_ms: u64) -> bool {
    i128::from(now_ms) - i128::from(earlier_ms) < i128::from(window_ms)
}

fn apply_publish(
    view: &ShardView,
    batch: &mut WriteBatch,
    messages: Vec<NewMessage>,
    limits: Vec<ShardLimits>,
    scratch: &mut ApplyScratch,
) -> Result<CommandResult> {
    let cf = view.store.cf(CF_STATE)?;
    let mut cache = lock(&view.partitions);
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
                slots.push(Slot::Earlier(r.position));
            }
            _ => {
                first_in_command.insert((m.mailbox, m.message.id.as_str()), i);
                let add = added.entry(m.mailbox).or_default();
                add.messages += 1;
                add.bytes += m.message.payload.len() as u64;
                slots.push(Slot::New(key));
            }
        }
    }
    for (mailbox, add) in &added {
        let Some(limit) = limits.get(mailbox) else { continue };
        let mut stored = PartitionStats::default();
        for partition in &limit.partitions {
            let ps = scratch.partition(view, &mut cache, *mailbox, *partition)?;
            stored.messages += ps.stats.messages;
            stored.bytes += ps.stats.bytes;
        }
        if stored.messages.saturating_add(add.messages) > limit.max_messages
            || stored.bytes.saturating_add(add.bytes) > limit.max_bytes
        {
            return Ok(CommandResult::Rejected(BrokerError::ResourceExhausted(format!(
                "mailbox {} is full: its partitions on shard {} hold {} messages / {} bytes of the {} / {} \
                 allowed there, and this publish adds {} / {}; consume or wait, then retry",
                limit.service, view.group, stored.messages, stored.bytes, limit.max_messages, limit.max_bytes,
                add.messages, add.bytes
            ))));
        }
    }

    // Second pass: store the new messages and remember their ids.
    let mut positions: Vec<Position> = Vec::with_capacity(messages.len());
    let mut newest: BTreeMap<MailboxId, i64> = BTreeMap::new();
    for (m, slot) in messages.into_iter().zip(slots) {
        let position = match slot {
            Slot::Earlier(position) => position,
            Slot::SameAs(first) => positions[first],
            Slot::New(dedup_key) => {
                let mut ps = scratch.partition(view, &mut cache, m.mailbox, m.partition)?;
                let position = Position { partition: m.partition, sequence: ps.next_seq };
                ps.next_seq += 1;
                ps.stats.messages += 1;
                ps.stats.bytes += m.message.payload.len() as u64;
                scratch.dirty_partitions.insert((m.mailbox, m.partition), ps);
                let key = keys::message_key(view.group, m.mailbox, m.partition, position.sequence);
                batch.put_cf(&cf, &key, encode(&m.message)?);
                scratch.put_sizes.insert(key, m.message.payload.len() as u64);

                let accepted_unix_ms = m.message.accepted_unix_ms;
                let record = DedupRecord { position, accepted_unix_ms };
                batch.put_cf(&cf, &dedup_key, encode(&record)?);
                scratch.dedup.insert(dedup_key, record);
                batch.put_cf(&cf, keys::dedup_expiry_key(view.group, m.mailbox, accepted_unix_ms, &m.message.id), []);
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
    }
    Ok(CommandResult::Published(positions))
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

fn apply_ack(view: &ShardView, batch: &mut WriteBatch, mailbox: MailboxId, positions: Vec<Position>, scratch: &mut ApplyScratch) -> Result<CommandResult> {
    let cf = view.store.cf(CF_STATE)?;
    let mut cache = lock(&view.partitions);
    let mut removed = 0;
    for pos in positions {
        let key = keys::message_key(view.group, mailbox, pos.partition, pos.sequence);
        if scratch.deleted.contains(&key) {
            continue;
        }
        let size = match scratch.put_sizes.remove(&key) {
            Some(size) => size,
            None => match view.store.get::<StoredMessage>(CF_STATE, &key)? {
                Some(message) => message.payload.len() as u64,
                None => continue,
            },
        };
        let mut ps = scratch.partition(view, &mut cache, mailbox, pos.partition)?;
        ps.stats.messages = ps.stats.messages.saturating_sub(1);
        ps.stats.bytes = ps.stats.bytes.saturating_sub(size);
        scratch.dirty_partitions.insert((mailbox, pos.partition), ps);
        batch.delete_cf(&cf, &key);
        scratch.deleted.insert(key);
        scratch.acked.push((mailbox, pos));
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
            let mut cache = lock(&view.partitions);
            for ((mailbox, partition), ps) in scratch.dirty_partitions.drain() {
                batch.put_cf(&cf, keys::partition_key(self.group, mailbox, partition), encode(&ps).map_err(io)?);
                cache.insert((mailbox, partition), ps);
            }
        }
        batch.put_cf(&cf, keys::state_key(self.group, KIND_APPLIED, &[]), encode(&self.applied).map_err(io)?);
        self.store.write_unsynced(batch).map_err(io)?;
        if let GroupKind::Shard(view) = &self.kind {
            if !scratch.acked.is_empty() {
                let mut tracker = lock(&view.tracker);
                for (mailbox, pos) in &scratch.acked {
                    tracker.forget(*mailbox, pos.partition, pos.sequence);
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
        let payload: SnapshotPayload = decode(snapshot.get_ref()).map_err(io)?;
        let cf = self.store.cf(CF_STATE).map_err(io)?;
        let prefix = keys::group_prefix(self.group);
        let mut batch = WriteBatch::default();
        batch.delete_range_cf(&cf, prefix.as_slice(), keys::group_end(self.group).as_slice());
        for (key, value) in payload.records {
            let mut full = prefix.to_vec();
            full.extend_from_slice(&key);
            batch.put_cf(&cf, full, value);
        }
        self.applied = AppliedRecord { last_applied: meta.last_log_id, membership: meta.last_membership.clone() };
        batch.put_cf(&cf, keys::state_key(self.group, KIND_APPLIED, &[]), encode(&self.applied).map_err(io)?);
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
        if *key == *applied_key {
            applied = decode(&value)?;
        }
        records.push((key[prefix.len()..].to_vec(), value.to_vec()));
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
    let data = encode(&SnapshotPayload { records })?;
    Ok(Snapshot { meta, snapshot: Box::new(Cursor::new(data)) })
}

/// Keeps the snapshot (meta and data) for `get_current_snapshot`.
fn save_snapshot(store: &Store, group: GroupId, meta: &SnapshotMeta<NodeId, BasicNode>, data: &[u8]) -> Result<()> {
    let cf = store.cf(CF_RAFT_META)?;
    let mut batch = WriteBatch::default();
    batch.put_cf(&cf, keys::meta_key(group, TAG_SNAPSHOT), encode(&(meta, data))?);
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

fn unix_ms(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
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

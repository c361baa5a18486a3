//! The replicated data model: the openraft type configuration, the commands a Raft group
//! applies, their results, and the records stored for mailboxes and messages.
//!
//! Architecture invariant: applying a [`Command`] is deterministic. Everything that depends on
//! clocks or randomness (timestamps, partition choice) is decided by the proposer and carried
//! inside the command.

use std::fmt;
// `declare_raft_types!` names the default snapshot type `Cursor` unqualified.
use std::io::Cursor;

use serde::{Deserialize, Serialize};

use crate::error::BrokerError;

/// Node identifier, unique in the cluster.
pub type NodeId = u64;
/// Raft group identifier: [`METADATA_GROUP`] or a data shard (1..).
pub type GroupId = u32;
/// Numeric mailbox identifier assigned by the metadata group.
pub type MailboxId = u64;
/// The metadata group: members, mailboxes and the shard map.
pub const METADATA_GROUP: GroupId = 0;

openraft::declare_raft_types!(
    /// openraft type configuration shared by every Raft group of a node.
    pub TypeConfig:
        D = Command,
        R = CommandResult,
        NodeId = NodeId,
        Node = openraft::BasicNode,
);

/// Where a message sits in its mailbox. FIFO order holds per partition.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Position {
    pub partition: u32,
    pub sequence: u64,
}

/// Partition numbers with this bit set hold a mailbox's dead letters: partition `p`'s
/// dead-letter queue is `p | DEAD_LETTER_BIT`. It lives on the same shard as `p`, so moving a
/// message there and back is one command of one Raft group.
pub const DEAD_LETTER_BIT: u32 = 1 << 31;

/// The dead-letter partition of a mailbox partition.
pub fn dead_letter_partition(partition: u32) -> u32 {
    partition | DEAD_LETTER_BIT
}

/// Whether a partition number names a dead-letter partition.
pub fn is_dead_letter(partition: u32) -> bool {
    partition & DEAD_LETTER_BIT != 0
}

/// FNV-1a: a stable hash, so a key maps to the same partition on every node, client and release.
fn stable_hash(key: &str) -> u64 {
    key.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3))
}

/// The partition a message goes to in a mailbox with `partitions` partitions, of which the
/// first `key_partitions` take ordering keys: a keyed message by its key among those (a key
/// keeps its partition, and so its order, when the mailbox grows), an unkeyed one by its id
/// among all (so a republished id meets its dedup record). The node that accepts a publish
/// decides; clients use it only to pick the node to send to.
pub fn partition_of(ordering_key: Option<&str>, id: &str, partitions: u32, key_partitions: u32) -> u32 {
    match ordering_key {
        Some(key) => (stable_hash(key) % u64::from(key_partitions.clamp(1, partitions.max(1)))) as u32,
        None => (stable_hash(id) % u64::from(partitions.max(1))) as u32,
    }
}

/// A message as the cluster stores it until it is acked.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredMessage {
    /// Client-chosen id (idempotency key).
    pub id: String,
    /// Recipient service id as published.
    pub recipient: String,
    /// The authenticated subsystem that published it (from its client certificate), never
    /// taken from the request. Empty only on a node run with `--insecure` and no identity.
    pub sender: String,
    pub headers: Vec<(String, String)>,
    /// Shared, reference-counted bytes: batches are cloned for retries without copying.
    pub payload: bytes::Bytes,
    /// SHA-256 of the payload (inline or chunked), computed by the accepting node: the
    /// message's evidence commits to it and outlives the payload.
    #[serde(with = "crate::evidence::hex_bytes")]
    pub payload_sha256: [u8; 32],
    pub ordering_key: Option<String>,
    /// When the accepting node received it (Unix ms), decided by the proposer.
    pub accepted_unix_ms: i64,
    /// Time to live the message was published with (its own or the mailbox default).
    pub ttl_ms: Option<u64>,
    /// When it expires (Unix ms): from then on it is never delivered, and it moves to the
    /// dead-letter queue as `expired`. A redrive restarts the clock with `ttl_ms`.
    pub expires_unix_ms: Option<i64>,
    /// Set while the message sits in its mailbox's dead-letter queue.
    pub dead_letter: Option<DeadLetter>,
    /// Set for a payload uploaded in chunks: `payload` is empty and the bytes are stored as
    /// the upload's chunks, streamed on download.
    pub large: Option<LargePayload>,
    /// Batch number and leaf index its evidence leaf was signed as, set when a sealed entry
    /// stores it (`None` when published without evidence): a delivery builds the receipt
    /// from it without reading the message's evidence record.
    pub signed_as: Option<(u64, u64)>,
    /// W3C `traceparent` of the publish, when the publisher sent one with the request or the
    /// accepting node traced it (a message's own `traceparent` header takes precedence):
    /// deliveries continue that trace. Not evidence, like every transport detail.
    pub trace_context: Option<String>,
}

/// Where a chunked payload's bytes are and what they must hash to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct LargePayload {
    /// The shard-local upload number its chunks are stored under.
    pub upload: u64,
    pub total_bytes: u64,
    #[serde(with = "crate::evidence::hex_bytes")]
    pub sha256: [u8; 32],
}

/// An upload in progress: chunks received so far of one large message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UploadState {
    pub upload: u64,
    pub partition: u32,
    /// The message as it will be stored, without its payload.
    pub message: StoredMessage,
    pub total_bytes: u64,
    #[serde(with = "crate::evidence::hex_bytes")]
    pub sha256: [u8; 32],
    /// Bytes stored so far (chunks are appended in order).
    pub received: u64,
}

/// Where an upload stands, the answer to every upload command.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum UploadProgress {
    /// Chunks up to `received` are stored; send the rest from there.
    Receiving { upload: u64, received: u64 },
    /// The message is stored (now, or by an earlier upload or publish of the same id).
    Stored(Position),
}

impl StoredMessage {
    /// Payload size, whether inline or chunked.
    pub fn payload_len(&self) -> u64 {
        self.large.map_or(self.payload.len() as u64, |l| l.total_bytes)
    }

    /// What the message's evidence leaf commits to (headers sorted, as the leaf hashes them).
    pub fn facts(&self) -> crate::evidence::MessageFacts {
        let mut headers = self.headers.clone();
        headers.sort();
        crate::evidence::MessageFacts {
            recipient: self.recipient.clone(),
            sender: self.sender.clone(),
            message_id: self.id.clone(),
            accepted_unix_ms: self.accepted_unix_ms,
            payload_sha256: self.payload_sha256,
            payload_len: self.payload_len(),
            ordering_key: self.ordering_key.clone(),
            headers,
        }
    }

    /// The message's evidence leaf, computed from borrowed fields.
    pub fn leaf(&self) -> crate::evidence::Hash {
        crate::evidence::leaf_of(&crate::evidence::MessageView {
            recipient: &self.recipient,
            sender: &self.sender,
            message_id: &self.id,
            accepted_unix_ms: self.accepted_unix_ms,
            payload_sha256: self.payload_sha256,
            payload_len: self.payload_len(),
            ordering_key: self.ordering_key.as_deref(),
            headers: &self.headers,
        })
    }

    /// Whether the message's time to live has run out at `now_unix_ms`.
    pub fn expired_at(&self, now_unix_ms: i64) -> bool {
        self.expires_unix_ms.is_some_and(|t| t <= now_unix_ms)
    }
}

/// Why a message was moved to the dead-letter queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum DeadLetterReason {
    /// Delivered `max_attempts` times without an ack.
    MaxAttempts,
    /// Its time to live ran out before it was acked.
    Expired,
}

impl DeadLetterReason {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::MaxAttempts => "max_attempts",
            Self::Expired => "expired",
        }
    }
}

/// How and when a message reached the dead-letter queue, with its delivery history.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeadLetter {
    pub reason: DeadLetterReason,
    /// Where it sat in the mailbox; a redrive puts it back on this partition.
    pub from: Position,
    pub dead_lettered_unix_ms: i64,
    /// Delivery attempts made, and the last of them (at most [`MAX_ATTEMPT_HISTORY`]).
    pub attempts: u32,
    pub history: Vec<Attempt>,
}

/// Most delivery attempts remembered per message (the count itself is exact).
pub const MAX_ATTEMPT_HISTORY: usize = 16;

/// One delivery of a message to a consumer and how it ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attempt {
    pub consumer: u64,
    pub leased_unix_ms: i64,
    pub outcome: AttemptOutcome,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum AttemptOutcome {
    /// Leased until this time (extended leases move it). Past it, the lease has expired.
    Leased { until_unix_ms: i64 },
    /// The consumer gave it back (nack) at this time.
    Nacked { at_unix_ms: i64 },
    /// The consumer's stream ended and gave it back at this time.
    Released { at_unix_ms: i64 },
    /// The lease ran out at this time without an ack.
    Expired { at_unix_ms: i64 },
}

impl AttemptOutcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Leased { .. } => "leased",
            Self::Nacked { .. } => "nacked",
            Self::Released { .. } => "released",
            Self::Expired { .. } => "expired",
        }
    }
}

/// Replicated delivery state of one message that has been delivered at least once (kept
/// until it is acked or dead-lettered). The node mirrors it in memory to choose deliveries.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeliveryState {
    /// Delivery attempts so far; the attempt number of the current or last delivery.
    pub attempts: u32,
    /// The latest attempts, oldest first (at most [`MAX_ATTEMPT_HISTORY`]).
    pub history: Vec<Attempt>,
    /// Earliest redelivery after a nack or release (Unix ms). After a lease expiry the
    /// earliest redelivery is computed from the lease end instead, see [`Self::ready_at`].
    pub not_before_unix_ms: i64,
    /// The redelivery policy the message was last leased under.
    pub policy: RedeliveryPolicy,
}

impl DeliveryState {
    /// The current lease: consumer and end time, if the last attempt is still leased (it may
    /// have expired by now; compare with the clock).
    pub fn lease(&self) -> Option<(u64, i64)> {
        match self.history.last()?.outcome {
            AttemptOutcome::Leased { until_unix_ms } => Some((self.history.last()?.consumer, until_unix_ms)),
            _ => None,
        }
    }

    /// Whether a consumer holds an unexpired lease at `now`.
    pub fn leased_at(&self, now_unix_ms: i64) -> bool {
        self.lease().is_some_and(|(_, until)| until > now_unix_ms)
    }

    /// Earliest time the message may be leased again: after an expired lease, its end plus
    /// the back-off for the attempts so far; otherwise `not_before_unix_ms`.
    pub fn ready_at(&self) -> i64 {
        match self.lease() {
            Some((_, until)) => until.saturating_add(self.policy.backoff_ms(self.attempts) as i64),
            None => self.not_before_unix_ms,
        }
    }

    /// Whether the message may not be delivered again: it has had all its attempts.
    pub fn exhausted(&self) -> bool {
        self.attempts >= self.policy.max_attempts
    }

    /// Ends the current lease (if any) with `outcome`.
    pub fn end_lease(&mut self, outcome: AttemptOutcome) {
        if let Some(last) = self.history.last_mut() {
            if matches!(last.outcome, AttemptOutcome::Leased { .. }) {
                last.outcome = outcome;
            }
        }
    }

    /// Records a new attempt leased to `consumer`.
    pub fn record_lease(&mut self, consumer: u64, now_unix_ms: i64, until_unix_ms: i64, policy: RedeliveryPolicy) {
        self.attempts = self.attempts.saturating_add(1);
        self.policy = policy;
        if self.history.len() >= MAX_ATTEMPT_HISTORY {
            self.history.remove(0);
        }
        self.history.push(Attempt { consumer, leased_unix_ms: now_unix_ms, outcome: AttemptOutcome::Leased { until_unix_ms } });
    }
}

/// How often and how soon a message is redelivered: part of a mailbox's [`DeliveryPolicy`],
/// copied into each lease command so applying needs nothing from outside the shard.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RedeliveryPolicy {
    /// Deliveries before the message moves to the dead-letter queue.
    pub max_attempts: u32,
    /// Delay before the redelivery after the first failed attempt; doubles with every
    /// further attempt up to `backoff_max_ms`.
    pub backoff_initial_ms: u64,
    pub backoff_max_ms: u64,
}

impl RedeliveryPolicy {
    /// For dead letters: delivered until acked, no back-off.
    pub const UNLIMITED: Self = Self { max_attempts: u32::MAX, backoff_initial_ms: 0, backoff_max_ms: 0 };

    /// Back-off before redelivering a message that has failed `attempts` times:
    /// `backoff_initial_ms * 2^(attempts - 1)`, at most `backoff_max_ms`.
    pub fn backoff_ms(&self, attempts: u32) -> u64 {
        let doublings = attempts.saturating_sub(1).min(63);
        self.backoff_initial_ms.saturating_mul(1u64 << doublings).min(self.backoff_max_ms)
    }
}

/// A mailbox's delivery settings, chosen at creation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeliveryPolicy {
    /// How long a delivery is leased to its consumer (consumers may extend it).
    pub lease_ms: u64,
    pub redelivery: RedeliveryPolicy,
    /// Time to live of messages published without their own; 0: they live until acked.
    pub default_ttl_ms: u64,
    /// Messages with the same ordering key are delivered one at a time, in publish order.
    pub ordered: bool,
}

impl DeliveryPolicy {
    pub const DEFAULT_LEASE_MS: u64 = 30_000;
    pub const DEFAULT_MAX_ATTEMPTS: u32 = 5;
    pub const DEFAULT_BACKOFF_INITIAL_MS: u64 = 1_000;
    pub const DEFAULT_BACKOFF_MAX_MS: u64 = 5 * 60 * 1_000;
}

impl Default for DeliveryPolicy {
    fn default() -> Self {
        Self {
            lease_ms: Self::DEFAULT_LEASE_MS,
            redelivery: RedeliveryPolicy {
                max_attempts: Self::DEFAULT_MAX_ATTEMPTS,
                backoff_initial_ms: Self::DEFAULT_BACKOFF_INITIAL_MS,
                backoff_max_ms: Self::DEFAULT_BACKOFF_MAX_MS,
            },
            default_ttl_ms: 0,
            ordered: false,
        }
    }
}

/// One message leased to a consumer: what a delivery carries.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Leased {
    pub position: Position,
    pub message: StoredMessage,
    /// 1 on the first delivery, counted across leader changes and restarts.
    pub attempt: u32,
    pub lease_expires_unix_ms: i64,
    /// The message's receipt, added by the shard leader when it hands the lease out
    /// (applying the lease leaves it `None`).
    pub receipt: Option<crate::evidence::Receipt>,
}

impl fmt::Debug for StoredMessage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StoredMessage")
            .field("id", &self.id)
            .field("recipient", &self.recipient)
            .field("payload_len", &self.payload.len())
            .finish_non_exhaustive()
    }
}

/// One message of a publish command, already routed to its partition.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NewMessage {
    pub mailbox: MailboxId,
    pub partition: u32,
    pub message: StoredMessage,
}

/// A mailbox: the durable queue of one service of one subsystem.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MailboxInfo {
    pub id: MailboxId,
    /// Service id naming the mailbox.
    pub service: String,
    pub partitions: u32,
    /// `partition_shards[p]` is the data shard (Raft group) that stores partition `p`.
    pub partition_shards: Vec<GroupId>,
    pub created_unix_ms: i64,
    pub limits: MailboxLimits,
    pub policy: DeliveryPolicy,
    /// The partitions ordering keys hash over: the count the mailbox was created with. Added
    /// partitions take unkeyed messages only, so every key keeps its partition and its order.
    pub key_partitions: u32,
}

/// [`MailboxInfo`] as written before mailboxes could grow (bincode has no optional trailing
/// fields): its keys hash over all its partitions.
#[derive(Debug, Clone, Deserialize)]
pub struct MailboxInfoV1 {
    pub id: MailboxId,
    pub service: String,
    pub partitions: u32,
    pub partition_shards: Vec<GroupId>,
    pub created_unix_ms: i64,
    pub limits: MailboxLimits,
    pub policy: DeliveryPolicy,
}

impl From<MailboxInfoV1> for MailboxInfo {
    fn from(v1: MailboxInfoV1) -> Self {
        let MailboxInfoV1 { id, service, partitions, partition_shards, created_unix_ms, limits, policy } = v1;
        Self { id, service, partitions, partition_shards, created_unix_ms, limits, policy, key_partitions: partitions }
    }
}

/// A mailbox's retention and idempotency settings, chosen at creation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct MailboxLimits {
    /// A message id published again within this window (measured between the two accept
    /// times) is answered with the first position and not stored twice.
    pub dedup_window_ms: u64,
    /// Most messages stored (published, not yet acked); publishing past it is refused.
    pub max_messages: u64,
    /// Most payload bytes stored; publishing past it is refused.
    pub max_bytes: u64,
    /// How long a message's evidence (everything but its payload) is kept after it was
    /// accepted, acked or not.
    pub evidence_retention_ms: u64,
}

impl MailboxLimits {
    /// Seven years, the usual retention of public-sector records.
    pub const DEFAULT_EVIDENCE_RETENTION_MS: u64 = 7 * 365 * 24 * 60 * 60 * 1000;
    pub const DEFAULT_DEDUP_WINDOW_MS: u64 = 24 * 60 * 60 * 1000;
    pub const DEFAULT_MAX_MESSAGES: u64 = 10_000_000;
    pub const DEFAULT_MAX_BYTES: u64 = 10 * 1024 * 1024 * 1024;
}

impl Default for MailboxLimits {
    fn default() -> Self {
        Self {
            dedup_window_ms: Self::DEFAULT_DEDUP_WINDOW_MS,
            max_messages: Self::DEFAULT_MAX_MESSAGES,
            max_bytes: Self::DEFAULT_MAX_BYTES,
            evidence_retention_ms: Self::DEFAULT_EVIDENCE_RETENTION_MS,
        }
    }
}

/// A mailbox's limits as one shard enforces them. The publishing node copies them from the
/// mailbox into the command, with the quotas scaled to the shard's share of the mailbox's
/// partitions, so applying needs nothing from outside the shard's own log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShardLimits {
    pub mailbox: MailboxId,
    /// The mailbox's service id, for error messages.
    pub service: String,
    pub dedup_window_ms: u64,
    pub max_messages: u64,
    pub max_bytes: u64,
    /// The mailbox's partitions stored on this shard (whose stored totals count).
    pub partitions: Vec<u32>,
    /// The publishing subsystem's quota of stored bytes, as this shard enforces it (an even
    /// share across the data shards, which its messages spread over); `None`: unlimited.
    #[serde(default)]
    pub sender_max_stored_bytes: Option<u64>,
    /// The mailbox's evidence retention: older evidence records are purged.
    pub evidence_retention_ms: u64,
}

impl MailboxInfo {
    /// The partition a message with this ordering key and id goes to (see [`partition_of`]).
    pub fn partition_for(&self, ordering_key: Option<&str>, id: &str) -> u32 {
        partition_of(ordering_key, id, self.partitions, self.key_partitions)
    }

    /// The shard storing `partition`, if the partition exists.
    pub fn shard_of(&self, partition: u32) -> Option<GroupId> {
        self.partition_shards.get(partition as usize).copied()
    }

    /// The limits `shard` enforces for this mailbox: quotas in proportion to the partitions it
    /// stores (rounded up, so the shards together never allow less than the mailbox limit).
    pub fn shard_limits(&self, shard: GroupId) -> ShardLimits {
        let partitions = self.partitions_by_shard().remove(&shard).unwrap_or_default();
        let share = |limit: u64| {
            let total = u128::from(self.partitions.max(1));
            let scaled = (u128::from(limit) * partitions.len() as u128).div_ceil(total);
            u64::try_from(scaled).unwrap_or(u64::MAX)
        };
        ShardLimits {
            mailbox: self.id,
            service: self.service.clone(),
            dedup_window_ms: self.limits.dedup_window_ms,
            max_messages: share(self.limits.max_messages),
            max_bytes: share(self.limits.max_bytes),
            partitions,
            sender_max_stored_bytes: None,
            evidence_retention_ms: self.limits.evidence_retention_ms,
        }
    }

    /// The mailbox's dead-letter partitions grouped by the shard that stores them.
    pub fn dead_letter_partitions_by_shard(&self) -> std::collections::BTreeMap<GroupId, Vec<u32>> {
        let mut by_shard = self.partitions_by_shard();
        for partitions in by_shard.values_mut() {
            partitions.iter_mut().for_each(|p| *p = dead_letter_partition(*p));
        }
        by_shard
    }

    /// The shard storing `partition` or its dead-letter partition.
    pub fn shard_of_any(&self, partition: u32) -> Option<GroupId> {
        self.shard_of(partition & !DEAD_LETTER_BIT)
    }

    /// The mailbox's partitions grouped by the shard that stores them.
    pub fn partitions_by_shard(&self) -> std::collections::BTreeMap<GroupId, Vec<u32>> {
        let mut by_shard: std::collections::BTreeMap<GroupId, Vec<u32>> = Default::default();
        for (partition, shard) in self.partition_shards.iter().enumerate() {
            by_shard.entry(*shard).or_default().push(partition as u32);
        }
        by_shard
    }
}

/// Pending (stored, unacked) messages of one mailbox partition.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartitionStats {
    pub messages: u64,
    pub bytes: u64,
}

/// A command replicated through one Raft group's log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Command {
    /// Metadata group: create a mailbox whose partitions are spread over `shard_count` shards.
    CreateMailbox {
        service: String,
        partitions: u32,
        shard_count: u32,
        created_unix_ms: i64,
        limits: MailboxLimits,
        policy: DeliveryPolicy,
    },
    /// Data shard: store a batch of messages (one Raft entry for the whole batch). `limits`
    /// holds one entry per mailbox of the batch; a mailbox without one gets the default
    /// dedup window and no quota.
    Publish { messages: Vec<NewMessage>, limits: Vec<ShardLimits> },
    /// Data shard: remove acked messages. With `consumer`, a message whose latest lease
    /// belongs to another consumer is left alone: its lease ran out and it went to someone
    /// else, who now holds it (in an ordered mailbox, removing it would let the key's next
    /// message overtake it). `None` removes unconditionally. `attempts`, when given, holds
    /// the attempt each position was delivered as (same order); an ack of an attempt that is
    /// no longer the latest is left alone too (the consumer got the message again meanwhile
    /// and that delivery is still in flight).
    Ack { mailbox: MailboxId, positions: Vec<Position>, consumer: Option<u64>, attempts: Vec<u32> },
    /// Data shard: lease messages chosen by the leader to `consumer` until `until_unix_ms`.
    /// Applying skips any that are gone, leased to someone else, or not due yet, and moves
    /// expired or exhausted ones to the dead-letter queue instead.
    Lease {
        mailbox: MailboxId,
        consumer: u64,
        positions: Vec<Position>,
        now_unix_ms: i64,
        until_unix_ms: i64,
        policy: RedeliveryPolicy,
    },
    /// Data shard: a consumer ends or extends its leases. Positions it does not hold are
    /// ignored.
    Settle { mailbox: MailboxId, consumer: u64, positions: Vec<Position>, now_unix_ms: i64, action: SettleAction },
    /// Data shard: move messages whose time to live ran out, or whose last lease expired
    /// after their last attempt, to the dead-letter queue (others are left alone).
    DeadLetter { mailbox: MailboxId, positions: Vec<Position>, now_unix_ms: i64 },
    /// Data shard: move dead letters back to the partitions they came from, as new messages
    /// with a fresh attempt count.
    Redrive { mailbox: MailboxId, positions: Vec<Position>, now_unix_ms: i64 },
    /// Data shard: a consumer's stream ended; every lease it holds on the mailbox is released
    /// (the replicated state says which).
    ReleaseConsumer { mailbox: MailboxId, consumer: u64, now_unix_ms: i64 },
    /// Data shard: start (or find, to resume) the upload of a large message. Answered with
    /// the stored position if the id was already stored within the dedup window.
    UploadBegin { new: NewMessage, total_bytes: u64, sha256: [u8; 32], limits: ShardLimits },
    /// Data shard: store the next chunk of an upload; a chunk not at the upload's current end
    /// is ignored (the answer says where to continue).
    UploadChunk { mailbox: MailboxId, id: String, offset: u64, data: bytes::Bytes },
    /// Data shard: all chunks are stored and verified: store the message.
    UploadCommit { mailbox: MailboxId, id: String },
    /// Data shard: drop an upload and its chunks (bad checksum).
    UploadAbort { mailbox: MailboxId, id: String },
    /// Metadata group: a change to the member registry, access rights or quotas.
    Access(crate::access::AccessCommand),
    /// Commands coalesced into one entry by the [`crate::proposer::Proposer`], applied in
    /// order; each gets its own result in [`CommandResult::Batch`].
    Batch(Vec<Command>),
    /// Data shard: commands coalesced into one entry together with the signed evidence batch
    /// covering them (see [`Seal`]). Applied only if the batch extends the shard's chain at
    /// exactly this entry's log position; otherwise nothing of it is applied.
    Sealed { seal: Seal, commands: Vec<Command> },
    /// Metadata group: a change to the node registry. (Last: bincode numbers variants by
    /// position, and logs written before it existed must still decode.)
    Cluster(crate::cluster::ClusterCommand),
    /// Metadata group: add partitions to a mailbox, up to `partitions` in all, placed over
    /// `shard_count` shards as creation places them. (After `Cluster`, for the same reason.)
    GrowMailbox { service: String, partitions: u32, shard_count: u32 },
}

/// The evidence of one [`Command::Sealed`] entry: the signed batch header and its leaves, in
/// this order: one per message of each `Publish` command and one per `UploadCommit` listed
/// in `commits` (commands in order), then one per entry of `acks`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Seal {
    pub batch: crate::evidence::SignedBatch,
    #[serde(with = "crate::evidence::hex_list")]
    pub leaves: Vec<crate::evidence::Hash>,
    pub acks: Vec<SealedAck>,
    /// Indexes of the `UploadCommit` commands signed (an upload the leader did not find, e.g.
    /// already committed, has no leaf).
    pub commits: Vec<u32>,
}

/// One ack the leader signed: which command of the entry acked which message. The signed
/// facts are not repeated here: the recipient, message id and leaf are the stored message's,
/// the ack time is the batch's, so every replica needs only the position and the attempt.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SealedAck {
    /// Index of the `Ack` command in the entry.
    pub command: u32,
    pub position: Position,
    /// The delivery attempt acked.
    pub attempt: u32,
}

/// Where the evidence of one message or ack of a sealed entry is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum EvidenceRef {
    /// Nothing signed (an unsealed entry, or a message stored before evidence existed).
    None,
    /// Leaf `n` of this entry's own seal.
    Leaf(u64),
    /// Leaf `index` of an earlier batch (a publish deduplicated against its first copy, which
    /// was accepted at `accepted_unix_ms`).
    Stored { batch: u64, index: u64, accepted_unix_ms: i64 },
}

/// A published message's receipt.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MessageReceipt {
    pub receipt: crate::evidence::Receipt,
    /// Set for a duplicate: the accept time of the first copy, which the receipt is of.
    pub first_accepted_unix_ms: Option<i64>,
}

impl Command {
    /// A publish without mailbox limits: the default dedup window and no quota.
    pub fn publish(messages: Vec<NewMessage>) -> Self {
        Command::Publish { messages, limits: Vec::new() }
    }

    /// Approximate encoded size in bytes, for bounding replication messages.
    pub fn approximate_size(&self) -> usize {
        const OVERHEAD: usize = 64;
        match self {
            Command::Publish { messages, .. } => messages
                .iter()
                .map(|m| {
                    let headers: usize = m.message.headers.iter().map(|(k, v)| k.len() + v.len() + 16).sum();
                    m.message.payload.len() + m.message.id.len() + m.message.recipient.len() + m.message.sender.len() + headers + OVERHEAD
                })
                .sum(),
            Command::Ack { positions, .. }
            | Command::Lease { positions, .. }
            | Command::Settle { positions, .. }
            | Command::DeadLetter { positions, .. }
            | Command::Redrive { positions, .. } => positions.len() * 12 + OVERHEAD,
            Command::ReleaseConsumer { .. } | Command::UploadCommit { .. } | Command::UploadAbort { .. } => OVERHEAD,
            Command::UploadBegin { new, .. } => new.message.id.len() + new.message.recipient.len() + OVERHEAD,
            Command::UploadChunk { data, id, .. } => data.len() + id.len() + OVERHEAD,
            Command::CreateMailbox { service, partitions, .. } | Command::GrowMailbox { service, partitions, .. } => {
                service.len() + *partitions as usize * 4 + OVERHEAD
            }
            Command::Access(_) | Command::Cluster(_) => OVERHEAD * 4,
            Command::Batch(commands) => commands.iter().map(Command::approximate_size).sum::<usize>() + OVERHEAD,
            Command::Sealed { seal, commands } => {
                commands.iter().map(Command::approximate_size).sum::<usize>() + seal.leaves.len() * 32 + seal.acks.len() * 64 + 4 * OVERHEAD
            }
        }
    }
}

/// What a consumer does with messages it holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum SettleAction {
    /// Give them back for redelivery after `delay_ms`, or after the back-off when `None`.
    /// The last allowed attempt goes to the dead-letter queue instead.
    Nack { delay_ms: Option<u64> },
    /// The consumer went away: redeliver at once (the attempt still counts).
    Release,
    /// Keep them longer: the leases end at `until_unix_ms` instead.
    Extend { until_unix_ms: i64 },
}

/// The outcome of applying a [`Command`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum CommandResult {
    /// Entries without an application command (membership, blank).
    Nothing,
    /// A mailbox created or grown: its record now.
    MailboxCreated(MailboxInfo),
    /// Positions of the published messages, in command order. A message deduplicated
    /// against an earlier publish gets the earlier position.
    Published(Vec<Position>),
    /// Number of messages actually removed (already-acked ones are not counted).
    Acked(u64),
    /// The messages actually leased, with their payloads.
    Leased(Vec<Leased>),
    /// How many positions a settle, dead-letter or redrive command changed.
    Changed(u64),
    Upload(UploadProgress),
    /// The command was refused deterministically on every replica.
    Rejected(BrokerError),
    /// One result per command of a [`Command::Batch`], in order.
    Batch(Vec<CommandResult>),
    /// One result per command of a [`Command::Sealed`], in order, and per command where its
    /// messages' (or acks') evidence is: one per message of a `Publish`, one per sealed ack
    /// of an `Ack` (in the seal's order), none for other commands.
    Sealed { results: Vec<CommandResult>, evidence: Vec<Vec<EvidenceRef>> },
    /// A command's result with its receipts, as the proposer answers a sealed command:
    /// `receipts` parallel to a publish's messages, `deliveries` one per signed ack.
    Receipted { result: Box<CommandResult>, receipts: Vec<Option<MessageReceipt>>, deliveries: Vec<(Position, crate::evidence::ArchivedDelivery)> },
}

impl CommandResult {
    /// The plain result and its receipts (none when the command was not sealed).
    pub fn split_receipts(self) -> (CommandResult, Vec<Option<MessageReceipt>>, Vec<(Position, crate::evidence::ArchivedDelivery)>) {
        match self {
            CommandResult::Receipted { result, receipts, deliveries } => (*result, receipts, deliveries),
            other => (other, Vec::new(), Vec::new()),
        }
    }
}

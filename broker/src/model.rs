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

/// A message as the cluster stores it until it is acked.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredMessage {
    /// Client-chosen id (idempotency key).
    pub id: String,
    /// Recipient service id as published.
    pub recipient: String,
    pub headers: Vec<(String, String)>,
    /// Shared, reference-counted bytes: batches are cloned for retries without copying.
    pub payload: bytes::Bytes,
    pub ordering_key: Option<String>,
    /// When the accepting node received it (Unix ms), decided by the proposer.
    pub accepted_unix_ms: i64,
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
}

impl MailboxLimits {
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
}

impl MailboxInfo {
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
        }
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
    CreateMailbox { service: String, partitions: u32, shard_count: u32, created_unix_ms: i64, limits: MailboxLimits },
    /// Data shard: store a batch of messages (one Raft entry for the whole batch). `limits`
    /// holds one entry per mailbox of the batch; a mailbox without one gets the default
    /// dedup window and no quota.
    Publish { messages: Vec<NewMessage>, limits: Vec<ShardLimits> },
    /// Data shard: remove acked messages.
    Ack { mailbox: MailboxId, positions: Vec<Position> },
    /// Commands coalesced into one entry by the [`crate::proposer::Proposer`], applied in
    /// order; each gets its own result in [`CommandResult::Batch`].
    Batch(Vec<Command>),
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
                    m.message.payload.len() + m.message.id.len() + m.message.recipient.len() + headers + OVERHEAD
                })
                .sum(),
            Command::Ack { positions, .. } => positions.len() * 12 + OVERHEAD,
            Command::CreateMailbox { service, partitions, .. } => service.len() + *partitions as usize * 4 + OVERHEAD,
            Command::Batch(commands) => commands.iter().map(Command::approximate_size).sum::<usize>() + OVERHEAD,
        }
    }
}

/// The outcome of applying a [`Command`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum CommandResult {
    /// Entries without an application command (membership, blank).
    Nothing,
    MailboxCreated(MailboxInfo),
    /// Positions of the published messages, in command order. A message deduplicated
    /// against an earlier publish gets the earlier position.
    Published(Vec<Position>),
    /// Number of messages actually removed (already-acked ones are not counted).
    Acked(u64),
    /// The command was refused deterministically on every replica.
    Rejected(BrokerError),
    /// One result per command of a [`Command::Batch`], in order.
    Batch(Vec<CommandResult>),
}

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
}

impl MailboxInfo {
    /// The shard storing `partition`, if the partition exists.
    pub fn shard_of(&self, partition: u32) -> Option<GroupId> {
        self.partition_shards.get(partition as usize).copied()
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
    CreateMailbox { service: String, partitions: u32, shard_count: u32, created_unix_ms: i64 },
    /// Data shard: store a batch of messages (one Raft entry for the whole batch).
    Publish { messages: Vec<NewMessage> },
    /// Data shard: remove acked messages.
    Ack { mailbox: MailboxId, positions: Vec<Position> },
}

impl Command {
    /// Approximate encoded size in bytes, for bounding replication messages.
    pub fn approximate_size(&self) -> usize {
        const OVERHEAD: usize = 64;
        match self {
            Command::Publish { messages } => messages
                .iter()
                .map(|m| {
                    let headers: usize = m.message.headers.iter().map(|(k, v)| k.len() + v.len() + 16).sum();
                    m.message.payload.len() + m.message.id.len() + m.message.recipient.len() + headers + OVERHEAD
                })
                .sum(),
            Command::Ack { positions, .. } => positions.len() * 12 + OVERHEAD,
            Command::CreateMailbox { service, partitions, .. } => service.len() + *partitions as usize * 4 + OVERHEAD,
        }
    }
}

/// The outcome of applying a [`Command`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum CommandResult {
    /// Entries without an application command (membership, blank).
    Nothing,
    MailboxCreated(MailboxInfo),
    /// Positions of the published messages, in command order.
    Published(Vec<Position>),
    /// Number of messages actually removed (already-acked ones are not counted).
    Acked(u64),
    /// The command was refused deterministically on every replica.
    Rejected(BrokerError),
}

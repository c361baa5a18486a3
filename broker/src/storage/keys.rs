//! Key layout of the node's RocksDB. Every key starts with the big-endian Raft group id, so
//! one group's data is one contiguous range (snapshots and deletes are range operations).
//!
//! | column family | key                                              | value                    |
//! |---------------|--------------------------------------------------|--------------------------|
//! | `raft_log`    | group u32, index u64                             | bincode `Entry`          |
//! | `raft_meta`   | group u32, tag u8 (vote, last purged, snapshot)  | bincode                  |
//! | `state`       | group u32, `a`                                   | applied log id + membership |
//! | `state`       | group u32, `x`, service id (metadata group)      | bincode `MailboxInfo`    |
//! | `state`       | group u32, `n` (metadata group)                  | next mailbox id          |
//! | `state`       | group u32, `p`, mailbox u64, partition u32       | partition state          |
//! | `state`       | group u32, `m`, mailbox u64, partition u32, seq u64 | bincode `StoredMessage` |
//! | `state`       | group u32, `d`, mailbox u64, message id          | bincode dedup record (position, accept time) |
//! | `state`       | group u32, `e`, mailbox u64, accept ms u64, message id | empty: dedup records in expiry order |
//! | `state`       | group u32, `l`, mailbox u64, partition u32, seq u64 | bincode `DeliveryState` (delivered at least once) |
//! | `state`       | group u32, `t`, expires ms u64, mailbox u64, partition u32, seq u64 | empty: messages with a time to live, in expiry order |
//! | `state`       | group u32, `u`, mailbox u64, message id          | bincode `UploadState` (upload in progress) |
//! | `state`       | group u32, `c`, upload u64, offset u64           | raw chunk bytes of a large payload |
//! | `state`       | group u32, `N`                                   | next upload number |
//! | `state`       | group u32, `E`, mailbox u64, accept ms u64, message id | bincode `EvidenceRecord` of an acked message (written by the ack that purges it) |
//! | `state`       | group u32, `B`, batch u64                        | bincode `BatchRecord` (signed header and leaves) |
//! | `state`       | group u32, `H`                                   | bincode `ChainHead` of the shard's evidence chain |
//! | `state`       | group u32, `Z`                                   | bytes of the shard's `E` and `B` records |
//! | `state`       | group u32, `R`, node u64 (metadata group)        | bincode `NodeRecord` (node registry) |
//!
//! Dead-letter partitions are partition numbers with the top bit set, so a mailbox's dead
//! letters sort after its live messages.

use crate::model::{GroupId, MailboxId};

pub const TAG_VOTE: u8 = b'v';
pub const TAG_PURGED: u8 = b'p';
/// The last snapshot built or installed (meta and data), served to lagging followers.
pub const TAG_SNAPSHOT: u8 = b's';

pub const KIND_APPLIED: u8 = b'a';
pub const KIND_MAILBOX: u8 = b'x';
pub const KIND_NEXT_MAILBOX_ID: u8 = b'n';
pub const KIND_PARTITION: u8 = b'p';
pub const KIND_MESSAGE: u8 = b'm';
pub const KIND_DEDUP: u8 = b'd';
pub const KIND_DEDUP_EXPIRY: u8 = b'e';
pub const KIND_DELIVERY: u8 = b'l';
pub const KIND_TTL: u8 = b't';
pub const KIND_UPLOAD: u8 = b'u';
pub const KIND_CHUNK: u8 = b'c';
pub const KIND_NEXT_UPLOAD: u8 = b'N';
/// Data shard: payload bytes stored for one sender subsystem (`S/sender`).
pub const KIND_SENDER: u8 = b'S';
/// Data shard: an acked message's evidence record (`E/mailbox/accept ms/id`), written at purge.
pub const KIND_EVIDENCE: u8 = b'E';
/// Data shard: a signed evidence batch and its leaves (`B/batch`).
pub const KIND_BATCH: u8 = b'B';
/// Data shard: the head of the shard's evidence chain (`H`).
pub const KIND_CHAIN_HEAD: u8 = b'H';
/// Data shard: bytes of its evidence records and batches (`Z`), for the disk budget.
pub const KIND_EVIDENCE_BYTES: u8 = b'Z';
/// Metadata group: a published evidence signing key (`K/key id`).
pub const KIND_SIGNING_KEY: u8 = b'K';
/// Metadata group: a subsystem's payload encryption key (`k/subsystem 0 key id`).
pub const KIND_ENCRYPTION_KEY: u8 = b'k';
/// Metadata group: a registered subsystem (`M/subsystem`).
pub const KIND_MEMBER: u8 = b'M';
/// Metadata group: a send grant (`g/service 0 grantee`).
pub const KIND_GRANT: u8 = b'g';
/// Metadata group: a subsystem's membership of a group (`G/group 0 subsystem`).
pub const KIND_GROUP: u8 = b'G';
/// Metadata group: a node of the registry (`R/node u64`).
pub const KIND_NODE: u8 = b'R';

/// The key of a pair of names (`first 0 second`): names never contain a zero byte.
pub fn pair_key(group: GroupId, kind: u8, first: &str, second: &str) -> Vec<u8> {
    let mut rest = Vec::with_capacity(first.len() + second.len() + 1);
    rest.extend_from_slice(first.as_bytes());
    rest.push(0);
    rest.extend_from_slice(second.as_bytes());
    state_key(group, kind, &rest)
}

/// Splits the rest of a [`pair_key`] (after group and kind).
pub fn parse_pair(rest: &[u8]) -> Option<(&str, &str)> {
    let zero = rest.iter().position(|b| *b == 0)?;
    Some((std::str::from_utf8(&rest[..zero]).ok()?, std::str::from_utf8(&rest[zero + 1..]).ok()?))
}

pub fn group_prefix(group: GroupId) -> [u8; 4] {
    group.to_be_bytes()
}

/// The first key after every key that starts with `prefix` (`None`: no such key).
pub fn prefix_end(prefix: &[u8]) -> Option<Vec<u8>> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < u8::MAX {
            end.push(last + 1);
            return Some(end);
        }
    }
    None
}

/// First key after every key of `group` (exclusive end of the group's range).
pub fn group_end(group: GroupId) -> Vec<u8> {
    match group.checked_add(1) {
        Some(next) => next.to_be_bytes().to_vec(),
        None => vec![0xff; 5],
    }
}

pub fn log_key(group: GroupId, index: u64) -> [u8; 12] {
    let mut k = [0u8; 12];
    k[..4].copy_from_slice(&group.to_be_bytes());
    k[4..].copy_from_slice(&index.to_be_bytes());
    k
}

/// Decodes a `raft_log` key into (group, index).
pub fn parse_log_key(key: &[u8]) -> Option<(GroupId, u64)> {
    if key.len() != 12 {
        return None;
    }
    let group = GroupId::from_be_bytes(key[..4].try_into().ok()?);
    let index = u64::from_be_bytes(key[4..].try_into().ok()?);
    Some((group, index))
}

pub fn meta_key(group: GroupId, tag: u8) -> [u8; 5] {
    let mut k = [0u8; 5];
    k[..4].copy_from_slice(&group.to_be_bytes());
    k[4] = tag;
    k
}

pub fn state_key(group: GroupId, kind: u8, rest: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(5 + rest.len());
    k.extend_from_slice(&group.to_be_bytes());
    k.push(kind);
    k.extend_from_slice(rest);
    k
}

pub fn partition_key(group: GroupId, mailbox: MailboxId, partition: u32) -> Vec<u8> {
    let mut rest = [0u8; 12];
    rest[..8].copy_from_slice(&mailbox.to_be_bytes());
    rest[8..].copy_from_slice(&partition.to_be_bytes());
    state_key(group, KIND_PARTITION, &rest)
}

/// Prefix of all messages of one mailbox partition, in sequence order.
pub fn message_prefix(group: GroupId, mailbox: MailboxId, partition: u32) -> Vec<u8> {
    let mut k = mailbox_messages_prefix(group, mailbox);
    k.extend_from_slice(&partition.to_be_bytes());
    k
}

/// Prefix of all of a mailbox's stored messages on a shard, dead letters included.
pub fn mailbox_messages_prefix(group: GroupId, mailbox: MailboxId) -> Vec<u8> {
    state_key(group, KIND_MESSAGE, &mailbox.to_be_bytes())
}

pub fn message_key(group: GroupId, mailbox: MailboxId, partition: u32, seq: u64) -> Vec<u8> {
    let mut k = message_prefix(group, mailbox, partition);
    k.extend_from_slice(&seq.to_be_bytes());
    k
}

/// The sequence number at the end of a message key.
pub fn message_seq(key: &[u8]) -> Option<u64> {
    let tail = key.len().checked_sub(8)?;
    Some(u64::from_be_bytes(key[tail..].try_into().ok()?))
}

/// The dedup record of a message id in a mailbox.
pub fn dedup_key(group: GroupId, mailbox: MailboxId, id: &str) -> Vec<u8> {
    let mut k = state_key(group, KIND_DEDUP, &mailbox.to_be_bytes());
    k.extend_from_slice(id.as_bytes());
    k
}

/// Prefix of a mailbox's dedup expiry index, ordered by accept time.
pub fn dedup_expiry_prefix(group: GroupId, mailbox: MailboxId) -> Vec<u8> {
    state_key(group, KIND_DEDUP_EXPIRY, &mailbox.to_be_bytes())
}

/// An entry of the dedup expiry index. Accept times before 1970 sort as 0.
pub fn dedup_expiry_key(group: GroupId, mailbox: MailboxId, accepted_unix_ms: i64, id: &str) -> Vec<u8> {
    timed_id_key(dedup_expiry_prefix(group, mailbox), accepted_unix_ms, id)
}

/// `prefix`, accept time, message id: a mailbox's messages in accept-time order.
fn timed_id_key(mut k: Vec<u8>, accepted_unix_ms: i64, id: &str) -> Vec<u8> {
    k.extend_from_slice(&u64::try_from(accepted_unix_ms).unwrap_or(0).to_be_bytes());
    k.extend_from_slice(id.as_bytes());
    k
}

/// Prefix of a mailbox's evidence records, ordered by accept time.
pub fn evidence_prefix(group: GroupId, mailbox: MailboxId) -> Vec<u8> {
    state_key(group, KIND_EVIDENCE, &mailbox.to_be_bytes())
}

/// The evidence record of a message (kept after its payload is purged). Its rest after
/// [`evidence_prefix`] parses with [`parse_dedup_expiry`].
pub fn evidence_key(group: GroupId, mailbox: MailboxId, accepted_unix_ms: i64, id: &str) -> Vec<u8> {
    timed_id_key(evidence_prefix(group, mailbox), accepted_unix_ms, id)
}

/// A signed evidence batch of the shard and its leaves.
pub fn batch_key(group: GroupId, batch: u64) -> Vec<u8> {
    state_key(group, KIND_BATCH, &batch.to_be_bytes())
}

/// Splits the rest of an expiry key after its prefix into (accept ms, message id).
pub fn parse_dedup_expiry(rest: &[u8]) -> Option<(i64, &str)> {
    let (time, id) = rest.split_at_checked(8)?;
    let time = i64::try_from(u64::from_be_bytes(time.try_into().ok()?)).ok()?;
    Some((time, std::str::from_utf8(id).ok()?))
}

/// The delivery state of a message that has been delivered at least once.
pub fn delivery_key(group: GroupId, mailbox: MailboxId, partition: u32, seq: u64) -> Vec<u8> {
    let mut rest = [0u8; 20];
    rest[..8].copy_from_slice(&mailbox.to_be_bytes());
    rest[8..12].copy_from_slice(&partition.to_be_bytes());
    rest[12..].copy_from_slice(&seq.to_be_bytes());
    state_key(group, KIND_DELIVERY, &rest)
}

/// Splits the rest of a delivery key after `group, l` into (mailbox, partition, seq).
pub fn parse_position_rest(rest: &[u8]) -> Option<(MailboxId, u32, u64)> {
    if rest.len() != 20 {
        return None;
    }
    let mailbox = MailboxId::from_be_bytes(rest[..8].try_into().ok()?);
    let partition = u32::from_be_bytes(rest[8..12].try_into().ok()?);
    let seq = u64::from_be_bytes(rest[12..].try_into().ok()?);
    Some((mailbox, partition, seq))
}

/// An entry of the shard's time-to-live index. Times before 1970 sort as 0.
pub fn ttl_key(group: GroupId, expires_unix_ms: i64, mailbox: MailboxId, partition: u32, seq: u64) -> Vec<u8> {
    let mut rest = [0u8; 28];
    rest[..8].copy_from_slice(&u64::try_from(expires_unix_ms).unwrap_or(0).to_be_bytes());
    rest[8..16].copy_from_slice(&mailbox.to_be_bytes());
    rest[16..20].copy_from_slice(&partition.to_be_bytes());
    rest[20..].copy_from_slice(&seq.to_be_bytes());
    state_key(group, KIND_TTL, &rest)
}

/// Splits the rest of a TTL key after `group, t` into (expires ms, mailbox, partition, seq).
pub fn parse_ttl_rest(rest: &[u8]) -> Option<(i64, MailboxId, u32, u64)> {
    let (time, position) = rest.split_at_checked(8)?;
    let time = i64::try_from(u64::from_be_bytes(time.try_into().ok()?)).ok()?;
    let (mailbox, partition, seq) = parse_position_rest(position)?;
    Some((time, mailbox, partition, seq))
}

/// The state of an upload in progress.
pub fn upload_key(group: GroupId, mailbox: MailboxId, id: &str) -> Vec<u8> {
    let mut k = state_key(group, KIND_UPLOAD, &mailbox.to_be_bytes());
    k.extend_from_slice(id.as_bytes());
    k
}

/// Prefix of one upload's chunks, in offset order.
pub fn chunk_prefix(group: GroupId, upload: u64) -> Vec<u8> {
    state_key(group, KIND_CHUNK, &upload.to_be_bytes())
}

/// The chunk of an upload starting at `offset`.
pub fn chunk_key(group: GroupId, upload: u64, offset: u64) -> Vec<u8> {
    let mut k = chunk_prefix(group, upload);
    k.extend_from_slice(&offset.to_be_bytes());
    k
}

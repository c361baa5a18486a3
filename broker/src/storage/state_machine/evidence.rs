//! A data shard's evidence log: the signed batches of its chain (`B` keys, with their leaves,
//! so receipts can be rebuilt at any time), the chain head (`H`), and one evidence record per
//! message that is gone (`E` keys): its facts, where its leaf was signed and, once acked, where
//! its ack was signed. While a message is stored, its own record (`m` key, with
//! [`StoredMessage::signed_as`]) is its evidence; the `E` record is written once, by the ack
//! that purges it, in the same write. So a publish writes no evidence record at all and an ack
//! writes one, and records are removed only after the mailbox's evidence retention.
//!
//! Applying a sealed entry checks that its batch extends the chain exactly at the entry's own
//! log position; a leader that raced a leadership change or mispredicted its log index gets a
//! retryable refusal and nothing of the entry is applied, so every replica holds the same chain.

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use openraft::LogId;
use rocksdb::WriteBatch;
use serde::{Deserialize, Serialize};

use super::{for_each_in_prefix, lock, ApplyScratch, ShardView};
use crate::error::{BrokerError, Result};
use crate::evidence::{message_leaf, AckFacts, Archive, ArchivedDelivery, ArchivedMessage, Hash, KeyRing, MerkleTree, MessageFacts, Receipt, SignedBatch};
use crate::model::{MailboxId, NodeId, Position, StoredMessage};
use crate::storage::keys::{self, KIND_CHAIN_HEAD, KIND_EVIDENCE_BYTES};
use crate::storage::CF_STATE;

/// The evidence of one message, kept after its payload is gone.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EvidenceRecord {
    pub facts: MessageFacts,
    /// Batch and leaf index of the message's leaf.
    pub batch: u64,
    pub index: u64,
    /// Where the ack that purged the message was signed (`None`: an unsigned ack).
    pub ack: Option<AckEvidence>,
}

/// Where the ack of a message was signed, and its attempt. The rest of the signed
/// [`AckFacts`] is rebuilt on export: recipient, message id and leaf from the message's
/// facts, the ack time from the batch.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AckEvidence {
    pub batch: u64,
    pub index: u64,
    pub attempt: u32,
}

/// A signed batch of the shard's chain with its leaves.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BatchRecord {
    pub batch: SignedBatch,
    #[serde(with = "crate::evidence::hex_list")]
    pub leaves: Vec<Hash>,
}

/// The last batch of a shard's chain: what the next one must extend.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChainHead {
    /// 0 before the first batch.
    pub batch: u64,
    /// [`SignedBatch::link`] of that batch (zeros before the first).
    #[serde(with = "crate::evidence::hex_bytes")]
    pub link: Hash,
}

/// Batch trees kept in memory for building receipts: deliveries mostly follow soon after
/// their publish, so the last few batches answer nearly every receipt.
const TREE_CACHE_BATCHES: usize = 64;

/// Recently used batch trees.
#[derive(Default)]
pub(super) struct TreeCache {
    entries: VecDeque<(u64, Arc<(MerkleTree, SignedBatch)>)>,
}

/// Checks that `signed` extends the chain at `log_id` and records it; `Some(refusal)` when
/// it does not (then the caller applies nothing of the entry).
pub(super) fn begin_seal(
    view: &ShardView,
    batch: &mut WriteBatch,
    scratch: &mut ApplyScratch,
    signed: SignedBatch,
    leaves: Vec<Hash>,
    log_id: Option<LogId<NodeId>>,
) -> Result<Option<BrokerError>> {
    let head = scratch.chain.unwrap_or_else(|| view.chain_head());
    let h = &signed.header;
    let reason = if h.shard != view.group {
        Some("another shard")
    } else if h.batch != head.batch + 1 {
        Some("not the next batch number")
    } else if h.prev != head.link {
        Some("does not link to the chain head")
    } else if log_id.is_none_or(|l| l.index != h.log_index || l.leader_id.term != h.log_term) {
        Some("signed for another log position")
    } else if h.leaf_count != leaves.len() as u64 {
        Some("leaf count differs from the leaves")
    } else {
        None
    };
    if let Some(reason) = reason {
        return Ok(Some(BrokerError::Unavailable(format!(
            "shard {}: evidence batch {} is out of date ({reason}); retry",
            view.group, h.batch
        ))));
    }
    let cf = view.store.cf(CF_STATE)?;
    let next = ChainHead { batch: h.batch, link: signed.link() };
    let record = view.store.encode(&BatchRecord { batch: signed, leaves })?;
    grow(view, scratch, record.len() as i64);
    batch.put_cf(&cf, keys::batch_key(view.group, next.batch), record);
    scratch.chain = Some(next);
    Ok(None)
}

/// Counts `delta` bytes into the shard's evidence total as this batch leaves it.
fn grow(view: &ShardView, scratch: &mut ApplyScratch, delta: i64) {
    let now = *scratch.evidence_bytes.get_or_insert_with(|| view.evidence_bytes());
    scratch.evidence_bytes = Some(now.saturating_add_signed(delta));
}

/// Writes the chain head and evidence total left by this apply call.
pub(super) fn finish(view: &ShardView, batch: &mut WriteBatch, scratch: &mut ApplyScratch) -> Result<()> {
    let cf = view.store.cf(CF_STATE)?;
    if let Some(head) = scratch.chain.take() {
        batch.put_cf(&cf, keys::state_key(view.group, KIND_CHAIN_HEAD, &[]), view.store.encode(&head)?);
        *lock(&view.chain) = head;
    }
    if let Some(bytes) = scratch.evidence_bytes.take() {
        batch.put_cf(&cf, keys::state_key(view.group, KIND_EVIDENCE_BYTES, &[]), view.store.encode(&bytes)?);
        view.evidence_bytes.store(bytes, Ordering::Relaxed);
    }
    Ok(())
}

/// Files the evidence record of a message the ack `ack` (if signed) purges, so its facts and
/// receipts outlive the payload. A message stored without evidence leaves no record.
pub(super) fn record_purged(
    view: &ShardView,
    batch: &mut WriteBatch,
    scratch: &mut ApplyScratch,
    mailbox: MailboxId,
    message: &StoredMessage,
    ack: Option<AckEvidence>,
) -> Result<()> {
    let Some((batch_no, index)) = message.signed_as else { return Ok(()) };
    let key = keys::evidence_key(view.group, mailbox, message.accepted_unix_ms, &message.id);
    let record = EvidenceRecord { facts: message.facts(), batch: batch_no, index, ack };
    let value = view.store.encode(&record)?;
    grow(view, scratch, value.len() as i64);
    batch.put_cf(&view.store.cf(CF_STATE)?, &key, value);
    Ok(())
}

/// Removes up to `budget` evidence records of `mailbox` accepted before `cutoff_unix_ms`,
/// oldest first. Only records past retention go, so replicas that purge at different moments
/// never answer differently (exports skip such records anyway).
pub(super) fn purge_expired(
    view: &ShardView,
    batch: &mut WriteBatch,
    scratch: &mut ApplyScratch,
    mailbox: MailboxId,
    cutoff_unix_ms: i64,
    budget: usize,
) -> Result<()> {
    let cf = view.store.cf(CF_STATE)?;
    let prefix = keys::evidence_prefix(view.group, mailbox);
    let mut removed = 0;
    for_each_in_prefix(&view.store, &prefix, |key, value| {
        let Some((accepted, _)) = keys::parse_dedup_expiry(&key[prefix.len()..]) else { return Ok(true) };
        if accepted >= cutoff_unix_ms || removed >= budget {
            return Ok(false);
        }
        if scratch.deleted.insert(key.to_vec()) {
            batch.delete_cf(&cf, key);
            grow(view, scratch, -(value.len() as i64));
            removed += 1;
        }
        Ok(true)
    })
}

impl ShardView {
    /// The head of the shard's chain as applied.
    pub fn chain_head(&self) -> ChainHead {
        *lock(&self.chain)
    }

    pub(super) fn load_chain_head(&self) -> Result<()> {
        let key = keys::state_key(self.group, KIND_CHAIN_HEAD, &[]);
        *lock(&self.chain) = self.store.get::<ChainHead>(CF_STATE, &key)?.unwrap_or_default();
        let key = keys::state_key(self.group, KIND_EVIDENCE_BYTES, &[]);
        self.evidence_bytes.store(self.store.get::<u64>(CF_STATE, &key)?.unwrap_or(0), Ordering::Relaxed);
        lock(&self.trees).entries.clear();
        Ok(())
    }

    /// The tree and signed header of batch `batch_no` (cached).
    fn batch_tree(&self, batch_no: u64) -> Result<Option<Arc<(MerkleTree, SignedBatch)>>> {
        if let Some((_, t)) = lock(&self.trees).entries.iter().find(|(b, _)| *b == batch_no) {
            return Ok(Some(t.clone()));
        }
        let Some(record) = self.store.get::<BatchRecord>(CF_STATE, &keys::batch_key(self.group, batch_no))? else {
            return Ok(None);
        };
        let tree = Arc::new((MerkleTree::build(record.leaves), record.batch));
        let mut cache = lock(&self.trees);
        if cache.entries.len() >= TREE_CACHE_BATCHES {
            cache.entries.pop_front();
        }
        cache.entries.push_back((batch_no, tree.clone()));
        Ok(Some(tree))
    }

    /// Bytes of the shard's evidence records and batches as stored (before RocksDB's
    /// compression, so at least what they take on disk), kept exactly by `apply`.
    pub fn evidence_bytes(&self) -> u64 {
        self.evidence_bytes.load(Ordering::Relaxed)
    }

    /// The receipt of leaf `index` of batch `batch_no`.
    pub fn receipt(&self, batch_no: u64, index: u64) -> Result<Option<Receipt>> {
        let Some(tree) = self.batch_tree(batch_no)? else { return Ok(None) };
        Ok(tree.0.receipt(usize::try_from(index).unwrap_or(usize::MAX), &tree.1))
    }

    /// The evidence record of a message.
    pub fn message_evidence(&self, mailbox: MailboxId, accepted_unix_ms: i64, id: &str) -> Result<Option<EvidenceRecord>> {
        self.store.get(CF_STATE, &keys::evidence_key(self.group, mailbox, accepted_unix_ms, id))
    }

    /// The receipt of a stored message (`None` when it was stored without evidence).
    pub fn message_receipt(&self, message: &StoredMessage) -> Result<Option<Receipt>> {
        match message.signed_as {
            Some((batch_no, index)) => self.receipt(batch_no, index),
            None => Ok(None),
        }
    }

    /// What the leader signs for an ack of the message at `position` (the ack time is the
    /// batch's): `None` when the message is gone.
    pub fn ack_claim(&self, mailbox: MailboxId, position: Position, attempt: Option<u32>) -> Result<Option<AckFacts>> {
        let key = keys::message_key(self.group, mailbox, position.partition, position.sequence);
        let Some(message) = self.store.get::<StoredMessage>(CF_STATE, &key)? else { return Ok(None) };
        let attempt = attempt.or_else(|| lock(&self.tracker).state(mailbox, position).map(|s| s.attempts)).unwrap_or(1);
        let facts = AckFacts {
            recipient: message.recipient.clone(),
            message_id: message.id.clone(),
            message_leaf: message.leaf(),
            acked_unix_ms: 0,
            attempt,
        };
        Ok(Some(facts))
    }

    /// The evidence of `mailbox`'s messages accepted in `[from, to]` (at most `limit`) as an
    /// archive of this shard with every batch from the first to the last one they need (the
    /// caller adds the keys). Acked messages come from their `E` records, messages still
    /// stored (dead letters included) from their own records. `None` when there are none.
    pub fn export(&self, mailbox: MailboxId, from_unix_ms: i64, to_unix_ms: i64, limit: usize) -> Result<Option<Archive>> {
        let too_many = || {
            BrokerError::ResourceExhausted(format!(
                "more than {limit} messages of this mailbox on shard {} in that time range; export a narrower range",
                self.group
            ))
        };
        // Stored messages first, acked ones second: a message acked between the two scans is
        // then found twice (its `E` record wins) rather than not at all.
        let mut records: BTreeMap<(i64, String), EvidenceRecord> = BTreeMap::new();
        for_each_in_prefix(&self.store, &keys::mailbox_messages_prefix(self.group, mailbox), |_, value| {
            let message = self.store.decode::<StoredMessage>(value)?;
            let Some((batch, index)) = message.signed_as else { return Ok(true) };
            if (from_unix_ms..=to_unix_ms).contains(&message.accepted_unix_ms) {
                if records.len() >= limit {
                    return Err(too_many());
                }
                let key = (message.accepted_unix_ms, message.id.clone());
                records.insert(key, EvidenceRecord { facts: message.facts(), batch, index, ack: None });
            }
            Ok(true)
        })?;
        let prefix = keys::evidence_prefix(self.group, mailbox);
        let start = keys::evidence_key(self.group, mailbox, from_unix_ms, "");
        super::for_each_from(&self.store, &prefix, &start, |key, value| {
            let Some((accepted, _)) = keys::parse_dedup_expiry(&key[prefix.len()..]) else { return Ok(true) };
            if accepted > to_unix_ms {
                return Ok(false);
            }
            let record = self.store.decode::<EvidenceRecord>(value)?;
            let key = (record.facts.accepted_unix_ms, record.facts.message_id.clone());
            if records.insert(key, record).is_none() && records.len() > limit {
                return Err(too_many());
            }
            Ok(true)
        })?;
        let records: Vec<EvidenceRecord> = records.into_values().collect();
        let batches_needed = records.iter().flat_map(|r| std::iter::once(r.batch).chain(r.ack.as_ref().map(|a| a.batch)));
        let (Some(first), Some(last)) = (batches_needed.clone().min(), batches_needed.max()) else { return Ok(None) };
        let mut batches = Vec::new();
        for n in first..=last {
            let tree = self
                .batch_tree(n)?
                .ok_or_else(|| BrokerError::Storage(format!("shard {}: evidence batch {n} is missing", self.group)))?;
            batches.push(tree.1.clone());
        }
        let receipt = |batch: u64, index: u64| {
            self.receipt(batch, index)?
                .ok_or_else(|| BrokerError::Storage(format!("shard {}: leaf {index} of batch {batch} is missing", self.group)))
        };
        let mut messages = Vec::with_capacity(records.len());
        for r in records {
            let delivery = match &r.ack {
                Some(a) => {
                    let acked_unix_ms = batches.get((a.batch - first) as usize).map_or(0, |b| b.header.timestamp_unix_ms);
                    let facts = AckFacts {
                        recipient: r.facts.recipient.clone(),
                        message_id: r.facts.message_id.clone(),
                        message_leaf: message_leaf(&r.facts),
                        acked_unix_ms,
                        attempt: a.attempt,
                    };
                    Some(ArchivedDelivery { facts, receipt: receipt(a.batch, a.index)? })
                }
                None => None,
            };
            messages.push(ArchivedMessage { receipt: receipt(r.batch, r.index)?, facts: r.facts, delivery });
        }
        let head = batches.last().map(SignedBatch::link).unwrap_or_default();
        Ok(Some(Archive { shard: self.group, first_batch: first, last_batch: last, head, keys: KeyRing::default(), batches, messages }))
    }
}

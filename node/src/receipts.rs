//! Receipts on the wire: the broker's evidence types ([`kerwen_broker::evidence`]) to and from
//! their protobuf form (`kerwen.v1.Receipt`, `AckReceipt`), for the services that hand them
//! out and the clients that keep and verify them.

use kerwen_broker::evidence::{AckFacts, ArchivedDelivery, BatchHeader, Hash, InclusionProof, MessageFacts, Receipt, SignedBatch};
use kerwen_broker::model::Position;
use kerwen_proto::v1 as pb;

/// Why a receipt from the wire cannot be read.
#[derive(Debug, thiserror::Error)]
pub enum ReceiptError {
    #[error("{field} must be {expected} bytes, got {got}")]
    Length { field: &'static str, expected: usize, got: usize },
    #[error("{0} is missing")]
    Missing(&'static str),
}

fn bytes<const N: usize>(field: &'static str, b: &[u8]) -> Result<[u8; N], ReceiptError> {
    b.try_into().map_err(|_| ReceiptError::Length { field, expected: N, got: b.len() })
}

pub fn to_proto_batch(b: &SignedBatch) -> pb::SignedBatch {
    let h = &b.header;
    pb::SignedBatch {
        version: u32::from(h.version),
        shard: h.shard,
        batch: h.batch,
        log_term: h.log_term,
        log_index: h.log_index,
        timestamp_unix_ms: h.timestamp_unix_ms,
        leaf_count: h.leaf_count,
        root: h.root.to_vec().into(),
        prev: h.prev.to_vec().into(),
        key_id: h.key_id.clone(),
        signature: b.signature.to_vec().into(),
    }
}

pub fn to_proto(r: &Receipt) -> pb::Receipt {
    ReceiptEncoder::default().encode(r)
}

/// Converts receipts to protobuf, the signed batch once per batch: the receipts of one
/// response or stream mostly share it, and on the hot path every copy counts.
#[derive(Default)]
pub struct ReceiptEncoder {
    last: Option<((u32, u64), pb::SignedBatch)>,
}

impl ReceiptEncoder {
    pub fn encode(&mut self, r: &Receipt) -> pb::Receipt {
        let id = (r.batch.header.shard, r.batch.header.batch);
        let batch = match &self.last {
            Some((last, batch)) if *last == id => batch.clone(),
            _ => {
                let batch = to_proto_batch(&r.batch);
                self.last = Some((id, batch.clone()));
                batch
            }
        };
        pb::Receipt { batch: Some(batch), ..without_batch(r) }
    }
}

/// A receipt's leaf and path, without its signed batch.
fn without_batch(r: &Receipt) -> pb::Receipt {
    pb::Receipt {
        leaf: r.leaf.to_vec().into(),
        index: r.proof.index,
        leaf_count: r.proof.leaf_count,
        path: r.proof.path.as_flattened().to_vec().into(),
        batch: None,
        batch_index: None,
    }
}

/// The receipts of one publish response: each signed batch once (`PublishResponse.batches`),
/// each receipt naming its batch by index.
#[derive(Default)]
pub struct BatchTable {
    index: std::collections::HashMap<(u32, u64), u32>,
    batches: Vec<pb::SignedBatch>,
}

impl BatchTable {
    pub fn encode(&mut self, r: &Receipt) -> pb::Receipt {
        let id = (r.batch.header.shard, r.batch.header.batch);
        let next = self.batches.len() as u32;
        let i = *self.index.entry(id).or_insert(next);
        if i == next {
            self.batches.push(to_proto_batch(&r.batch));
        }
        pb::Receipt { batch_index: Some(i), ..without_batch(r) }
    }

    pub fn into_batches(self) -> Vec<pb::SignedBatch> {
        self.batches
    }
}

/// Makes every receipt of a publish response self-contained again: its signed batch from the
/// response's table.
pub fn fill_batches(response: &mut pb::PublishResponse) {
    for r in response.results.iter_mut().filter_map(|r| r.receipt.as_mut()) {
        if r.batch.is_none() {
            r.batch = r.batch_index.and_then(|i| response.batches.get(i as usize)).cloned();
        }
    }
}

pub fn from_proto(r: &pb::Receipt) -> Result<Receipt, ReceiptError> {
    let b = r.batch.as_ref().ok_or(ReceiptError::Missing("receipt.batch"))?;
    let header = BatchHeader {
        version: u8::try_from(b.version).unwrap_or(u8::MAX),
        shard: b.shard,
        batch: b.batch,
        log_term: b.log_term,
        log_index: b.log_index,
        timestamp_unix_ms: b.timestamp_unix_ms,
        leaf_count: b.leaf_count,
        root: bytes("batch.root", &b.root)?,
        prev: bytes("batch.prev", &b.prev)?,
        key_id: b.key_id.clone(),
    };
    if r.path.len() % 32 != 0 {
        return Err(ReceiptError::Length { field: "path (a multiple of)", expected: 32, got: r.path.len() });
    }
    let path = r.path.chunks_exact(32).map(|h| bytes::<32>("path", h)).collect::<Result<Vec<Hash>, _>>()?;
    Ok(Receipt {
        leaf: bytes("leaf", &r.leaf)?,
        proof: InclusionProof { index: r.index, leaf_count: r.leaf_count, path },
        batch: SignedBatch { header, signature: bytes("batch.signature", &b.signature)? },
    })
}

pub fn to_proto_ack(encoder: &mut ReceiptEncoder, position: Position, d: &ArchivedDelivery) -> pb::AckReceipt {
    pb::AckReceipt {
        position: Some(pb::Position { partition: position.partition, sequence: position.sequence }),
        recipient: d.facts.recipient.clone(),
        message_id: d.facts.message_id.clone(),
        message_leaf: d.facts.message_leaf.to_vec().into(),
        acked_unix_ms: d.facts.acked_unix_ms,
        attempt: d.facts.attempt,
        receipt: Some(encoder.encode(&d.receipt)),
    }
}

pub fn ack_from_proto(a: &pb::AckReceipt) -> Result<ArchivedDelivery, ReceiptError> {
    let receipt = from_proto(a.receipt.as_ref().ok_or(ReceiptError::Missing("ack receipt"))?)?;
    let facts = AckFacts {
        recipient: a.recipient.clone(),
        message_id: a.message_id.clone(),
        message_leaf: bytes("message_leaf", &a.message_leaf)?,
        acked_unix_ms: a.acked_unix_ms,
        attempt: a.attempt,
    };
    Ok(ArchivedDelivery { facts, receipt })
}

/// The facts of a delivered message (inline payload, or chunked with its declared hash).
pub fn delivery_facts(d: &pb::Delivery) -> Result<MessageFacts, ReceiptError> {
    use sha2::Digest;
    let m = d.message.as_ref().ok_or(ReceiptError::Missing("delivery.message"))?;
    let (payload_sha256, payload_len) = match &d.large_payload {
        Some(large) => (bytes("large_payload.sha256", &large.sha256)?, large.total_bytes),
        None => (sha2::Sha256::digest(&m.payload).into(), m.payload.len() as u64),
    };
    let mut headers: Vec<(String, String)> = m.headers.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
    headers.sort();
    Ok(MessageFacts {
        recipient: m.recipient.clone(),
        sender: m.sender.clone(),
        message_id: m.id.clone(),
        accepted_unix_ms: d.accepted_unix_ms,
        payload_sha256,
        payload_len,
        ordering_key: m.ordering_key.clone(),
        headers,
    })
}

/// The facts of a published message, from what was sent and what the cluster answered.
pub fn publish_facts(sent: &pb::Message, result: &pb::PublishResult) -> Result<MessageFacts, ReceiptError> {
    facts_of(sent, sent.payload.len() as u64, result)
}

/// The facts of a message uploaded in chunks (`sent` without its payload).
pub fn upload_facts(sent: &pb::Message, total_bytes: u64, result: &pb::PublishResult) -> Result<MessageFacts, ReceiptError> {
    facts_of(sent, total_bytes, result)
}

fn facts_of(sent: &pb::Message, payload_len: u64, result: &pb::PublishResult) -> Result<MessageFacts, ReceiptError> {
    let mut headers: Vec<(String, String)> = sent.headers.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
    headers.sort();
    Ok(MessageFacts {
        recipient: sent.recipient.clone(),
        sender: result.sender.clone(),
        message_id: sent.id.clone(),
        accepted_unix_ms: result.accepted_unix_ms,
        payload_sha256: bytes("payload_sha256", &result.payload_sha256)?,
        payload_len,
        ordering_key: sent.ordering_key.clone(),
        headers,
    })
}

#[cfg(test)]
mod tests {
    use kerwen_broker::evidence::{seal, BatchHeader, EVIDENCE_VERSION};

    use super::*;

    fn batch(number: u64, leaves: u8) -> Vec<Receipt> {
        let header = BatchHeader {
            version: EVIDENCE_VERSION,
            shard: 1,
            batch: number,
            log_term: 1,
            log_index: number,
            timestamp_unix_ms: 0,
            leaf_count: 0,
            root: [0; 32],
            prev: [0; 32],
            key_id: "k".into(),
        };
        let key = ed25519_dalek::SigningKey::from_bytes(&[3; 32]);
        seal((0..leaves).map(|i| [i; 32]).collect(), header, &key).1
    }

    #[test]
    fn a_publish_response_carries_each_batch_once_and_fills_back_to_whole_receipts() {
        let receipts: Vec<Receipt> = batch(1, 3).into_iter().chain(batch(2, 2)).collect();
        let mut table = BatchTable::default();
        let results = receipts
            .iter()
            .map(|r| pb::PublishResult { receipt: Some(table.encode(r)), ..Default::default() })
            .collect();
        let mut response = pb::PublishResponse { results, batches: table.into_batches() };
        assert_eq!(response.batches.len(), 2, "one entry per batch");
        assert!(response.results.iter().all(|r| r.receipt.as_ref().is_some_and(|r| r.batch.is_none())));
        fill_batches(&mut response);
        for (r, original) in response.results.iter().zip(&receipts) {
            let whole = r.receipt.as_ref().expect("receipt");
            assert_eq!(from_proto(whole).expect("self-contained"), *original);
        }
    }
}

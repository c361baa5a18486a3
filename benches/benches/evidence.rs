//! Batch signing on the publish path: for a batch of `n` messages of 1 KiB, hash each
//! message into its leaf (SHA-256 of the payload, then the domain-separated leaf hash of its
//! header fields), build the Merkle tree and sign its root once with Ed25519
//! (`leaves_tree_sign`); `with_receipts` adds every message's inclusion path, as a publish
//! response carries receipts. Throughput is in messages, so the per-message cost is the
//! reciprocal; the target for `leaves_tree_sign` at 1,024 is under 1 µs.

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use ed25519_dalek::SigningKey;
use kerwen_broker::evidence::{leaf_of, seal, seal_batch, BatchHeader, Hash, MessageView, EVIDENCE_VERSION};
use sha2::{Digest, Sha256};

const SIZE: usize = 1024;

struct Input {
    recipient: String,
    sender: String,
    id: String,
    payload: Vec<u8>,
}

fn inputs(n: usize) -> Vec<Input> {
    (0..n)
        .map(|i| Input {
            recipient: "TM/GOV/MINFIN/tax/declarations".into(),
            sender: "TM/GOV/MINCOM/registry".into(),
            id: format!("decl-2026-{i:08}"),
            payload: (0..SIZE).map(|b| (b * 31 + i) as u8).collect(),
        })
        .collect()
}

fn leaves(messages: &[Input]) -> Vec<Hash> {
    messages
        .iter()
        .map(|m| {
            leaf_of(&MessageView {
                recipient: &m.recipient,
                sender: &m.sender,
                message_id: &m.id,
                accepted_unix_ms: 1_790_000_000_000,
                payload_sha256: Sha256::digest(&m.payload).into(),
                payload_len: m.payload.len() as u64,
                ordering_key: None,
                headers: &[],
            })
        })
        .collect()
}

fn header() -> BatchHeader {
    BatchHeader {
        version: EVIDENCE_VERSION,
        shard: 1,
        batch: 1,
        log_term: 1,
        log_index: 1,
        timestamp_unix_ms: 1_790_000_000_000,
        leaf_count: 0,
        root: [0; 32],
        prev: [0; 32],
        key_id: "node-1-2026".into(),
    }
}

fn sign_batch(c: &mut Criterion) {
    let key = SigningKey::from_bytes(&[7; 32]);
    let mut group = c.benchmark_group("evidence");
    for n in [1usize, 64, 1024, 8192] {
        let messages = inputs(n);
        group.throughput(Throughput::Elements(n as u64));
        // What the criterion measures: leaf hashing (payload included), tree, one signature.
        group.bench_with_input(BenchmarkId::new("leaves_tree_sign_1KiB", n), &messages, |b, messages| {
            b.iter(|| black_box(seal_batch(leaves(messages), header(), &key)))
        });
        // The same plus every message's receipt (path and a copy of the signed header).
        group.bench_with_input(BenchmarkId::new("with_receipts_1KiB", n), &messages, |b, messages| {
            b.iter(|| black_box(seal(leaves(messages), header(), &key)))
        });
    }
    group.finish();
}

criterion_group!(benches, sign_batch);
criterion_main!(benches);

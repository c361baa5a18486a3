//! Encode/decode cost of one publish batch (100 x 1 KiB) on its two hot paths:
//! - `wire`: the client's `PublishRequest` through prost (what every publish pays on the node);
//! - `raft_entry`: the Raft log entry through bincode (what every replica pays per append,
//!   and the leader again per follower when it reads the entry back for replication);
//! - `raft_entry_sealed`: the same entry as it is stored, bincode plus encryption at rest
//!   (what `Store::encode` and `Store::decode` do), per algorithm.
//! Throughput is reported in messages, so the per-message cost is the reciprocal.

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use kerwen_benches::{publish_entry, publish_request};
use kerwen_broker::model::TypeConfig;
use kerwen_broker::storage::cipher::{Algorithm, AtRestCipher};
use openraft::Entry;
use prost::Message;

const COUNT: usize = 100;
const SIZE: usize = 1024;

fn wire(c: &mut Criterion) {
    let request = publish_request(COUNT, SIZE);
    let bytes = request.encode_to_vec();
    let mut group = c.benchmark_group("wire");
    group.throughput(Throughput::Elements(COUNT as u64));
    group.bench_function("encode_publish_100x1KiB", |b| b.iter(|| black_box(&request).encode_to_vec()));
    group.bench_function("decode_publish_100x1KiB", |b| {
        b.iter(|| kerwen_proto::v1::PublishRequest::decode(black_box(bytes.as_slice())).expect("decodes"))
    });
    group.finish();
}

fn raft_entry(c: &mut Criterion) {
    let entry = publish_entry(1, COUNT, SIZE);
    let bytes = bincode::serialize(&entry).expect("encodes");
    let mut group = c.benchmark_group("raft_entry");
    group.throughput(Throughput::Elements(COUNT as u64));
    group.bench_function("encode_publish_100x1KiB", |b| b.iter(|| bincode::serialize(black_box(&entry)).expect("encodes")));
    group.bench_function("decode_publish_100x1KiB", |b| {
        b.iter(|| bincode::deserialize::<Entry<TypeConfig>>(black_box(&bytes)).expect("decodes"))
    });
    group.finish();
}

fn raft_entry_sealed(c: &mut Criterion) {
    let entry = publish_entry(1, COUNT, SIZE);
    let len = bincode::serialized_size(&entry).expect("sizes") as usize;
    let mut group = c.benchmark_group("raft_entry_sealed");
    group.throughput(Throughput::Elements(COUNT as u64));
    for algorithm in [Algorithm::Aes256Gcm, Algorithm::ChaCha20Poly1305] {
        let cipher = AtRestCipher::ephemeral(algorithm).expect("cipher");
        // As `Store::encode`: serialized straight into the buffer that is sealed in place.
        let seal = |entry: &Entry<TypeConfig>| {
            cipher
                .seal_with(len, |out| bincode::serialize_into(out, entry).map_err(|e| kerwen_broker::BrokerError::Internal(e.to_string())))
                .expect("seals")
        };
        let sealed = seal(&entry);
        group.bench_function(format!("encode_{algorithm}_100x1KiB"), |b| b.iter(|| seal(black_box(&entry))));
        group.bench_function(format!("decode_{algorithm}_100x1KiB"), |b| {
            b.iter(|| bincode::deserialize::<Entry<TypeConfig>>(&cipher.open(black_box(&sealed)).expect("opens")).expect("decodes"))
        });
    }
    group.finish();
}

criterion_group!(benches, wire, raft_entry, raft_entry_sealed);
criterion_main!(benches);

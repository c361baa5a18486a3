//! Raft log appends on a real RocksDB in a temp dir, acknowledged only after the WAL fsync
//! (exactly what a replica does before answering AppendEntries). One iteration appends one
//! publish batch (100 x 1 KiB messages) to each of `groups` Raft groups concurrently, so:
//! - `groups/1` is bounded by one fsync per batch;
//! - `groups/8` shows group commit: eight groups' appends share fsyncs, and throughput in
//!   messages per second should rise well above the single-group figure.
//! The fsyncs/iteration ratio printed at the end of each run tells how much sharing happened.
//! Disk timings on virtual disks swing with neighbours; compare runs made back to back.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use kerwen_benches::publish_entry;
use kerwen_broker::storage::Store;
use openraft::storage::RaftLogStorageExt;

const MESSAGES_PER_BATCH: usize = 100;

fn append(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    let mut group = c.benchmark_group("storage_append");
    group.sample_size(20).measurement_time(Duration::from_secs(10));
    for groups in [1u32, 8] {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = Store::open(dir.path()).expect("store");
        let mut next_index = 1u64;
        group.throughput(Throughput::Elements(u64::from(groups) * MESSAGES_PER_BATCH as u64));
        group.bench_with_input(BenchmarkId::new("groups", groups), &groups, |b, &groups| {
            b.iter_custom(|iters| {
                let start = Instant::now();
                runtime.block_on(async {
                    for _ in 0..iters {
                        let index = next_index;
                        next_index += 1;
                        let appends = (1..=groups).map(|g| {
                            let mut log = store.log_store(g);
                            async move { log.blocking_append(vec![publish_entry(index, MESSAGES_PER_BATCH, 1024)]).await }
                        });
                        for r in futures::future::join_all(appends).await {
                            r.expect("append");
                        }
                    }
                });
                start.elapsed()
            })
        });
        let stats = store.sync_stats();
        let syncs = stats.syncs.load(Ordering::Relaxed).max(1);
        let waiters = stats.waiters.load(Ordering::Relaxed);
        println!("storage_append groups={groups}: {syncs} fsyncs for {waiters} appends ({:.2} appends per fsync)", waiters as f64 / syncs as f64);
    }
    group.finish();
}

criterion_group!(benches, append);
criterion_main!(benches);

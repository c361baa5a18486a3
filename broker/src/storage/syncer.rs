//! Group commit: one thread makes the write-ahead log durable for everyone waiting.
//!
//! Writers put their batches into RocksDB without syncing (so the data is immediately
//! readable, as openraft requires) and then queue a waiter here. The thread takes every
//! waiter queued so far, issues one `fsync` of the WAL, and completes them all. Because the
//! WAL is sequential, that one sync covers every write that happened before the waiter was
//! queued — appends of every Raft group on the node, votes and state machine writes alike.
//!
//! Before syncing, the thread keeps gathering while waiters keep coming close together
//! ([`GATHER_QUIET`] apart, for at most [`GATHER_MAX`]): the appends of one replication batch,
//! or of one publish that touches many shards, come from many Raft tasks within microseconds,
//! and one sync should cover them all rather than the first alone.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use openraft::storage::LogFlushed;
use rocksdb::DB;

use crate::model::TypeConfig;

/// Someone waiting for the WAL to be durable.
pub enum SyncWaiter {
    /// openraft's log-append completion.
    LogFlushed(LogFlushed<TypeConfig>),
    /// Any other durable write (votes, snapshots).
    Notify(tokio::sync::oneshot::Sender<Result<(), String>>),
}

/// Counters for metrics and tests: how many syncs and how many waiters they covered.
#[derive(Debug, Default)]
pub struct SyncStats {
    pub syncs: AtomicU64,
    pub waiters: AtomicU64,
}

pub struct Syncer {
    /// `None` only while dropping.
    tx: Option<mpsc::Sender<SyncWaiter>>,
    thread: Option<std::thread::JoinHandle<()>>,
    pub stats: Arc<SyncStats>,
}

impl Syncer {
    pub fn start(db: Arc<DB>) -> std::io::Result<Self> {
        let (tx, rx) = mpsc::channel::<SyncWaiter>();
        let stats = Arc::new(SyncStats::default());
        let thread_stats = stats.clone();
        let thread = std::thread::Builder::new()
            .name("kerwen-wal-sync".into())
            .spawn(move || run(db, rx, thread_stats))?;
        Ok(Self { tx: Some(tx), thread: Some(thread), stats })
    }

    /// Queues a waiter. If the sync thread is gone (the store is closing) the waiter is
    /// failed immediately.
    pub fn submit(&self, waiter: SyncWaiter) {
        let Some(tx) = &self.tx else {
            return complete(waiter, Err("store is closed".to_owned()));
        };
        if let Err(mpsc::SendError(waiter)) = tx.send(waiter) {
            complete(waiter, Err("store is closed".to_owned()));
        }
    }
}

impl Drop for Syncer {
    /// Completes the waiters still queued and waits for the thread to let go of the
    /// database, so that a store is really closed (its RocksDB lock released) once dropped.
    fn drop(&mut self) {
        drop(self.tx.take());
        if let Some(thread) = self.thread.take() {
            if thread.join().is_err() {
                tracing::error!("the WAL sync thread panicked");
            }
        }
    }
}

fn complete(waiter: SyncWaiter, result: Result<(), String>) {
    match waiter {
        SyncWaiter::LogFlushed(cb) => cb.log_io_completed(result.map_err(std::io::Error::other)),
        SyncWaiter::Notify(tx) => {
            // The waiter may have given up; nothing to do then.
            let _ = tx.send(result);
        }
    }
}

/// Upper bound of waiters per sync, so one round never starves the first waiter.
const MAX_WAITERS_PER_SYNC: usize = 65_536;

/// A round keeps gathering while the next waiter comes within this time of the previous one.
pub const GATHER_QUIET: Duration = Duration::from_micros(100);
/// A round gathers for at most this long after its first waiter.
pub const GATHER_MAX: Duration = Duration::from_millis(1);

fn run(db: Arc<DB>, rx: mpsc::Receiver<SyncWaiter>, stats: Arc<SyncStats>) {
    let mut waiters = Vec::new();
    while let Ok(first) = rx.recv() {
        let gathering_since = Instant::now();
        waiters.push(first);
        while waiters.len() < MAX_WAITERS_PER_SYNC {
            let left = GATHER_MAX.saturating_sub(gathering_since.elapsed());
            match rx.recv_timeout(GATHER_QUIET.min(left)) {
                Ok(w) => waiters.push(w),
                Err(_) => break,
            }
        }
        let started = Instant::now();
        let result = db.flush_wal(true).map_err(|e| e.to_string());
        metrics::histogram!("kerwen_storage_fsync_duration_seconds").record(started.elapsed().as_secs_f64());
        metrics::counter!("kerwen_storage_fsyncs_total").increment(1);
        metrics::histogram!("kerwen_storage_entries_per_fsync").record(waiters.len() as f64);
        if let Err(e) = &result {
            tracing::error!(error = %e, "WAL sync failed");
        }
        stats.syncs.fetch_add(1, Ordering::Relaxed);
        stats.waiters.fetch_add(waiters.len() as u64, Ordering::Relaxed);
        for w in waiters.drain(..) {
            complete(w, result.clone());
        }
    }
}

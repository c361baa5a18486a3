//! Group commit: one thread makes the write-ahead log durable for everyone waiting.
//!
//! Writers put their batches into RocksDB without syncing (so the data is immediately
//! readable, as openraft requires) and then queue a waiter here. The thread takes every
//! waiter queued so far, issues one `fsync` of the WAL, and completes them all. Because the
//! WAL is sequential, that one sync covers every write that happened before the waiter was
//! queued — appends of every Raft group on the node, votes and state machine writes alike.
//!
//! Before syncing, the thread keeps gathering while waiters keep coming close together: the
//! appends of one replication batch, or of one publish, lease or ack that touches many
//! shards, come from many Raft tasks, and one sync should cover them all rather than the
//! first alone. How close is "close" follows how busy the node is ([`GatherWindow`]): on an
//! idle node those tasks run within microseconds of each other, so a round closes after
//! [`GATHER_QUIET_MIN`] without a new waiter and the lone publish is not kept waiting; on a
//! saturated node each of them waits its turn for a core, one burst's appends arrive
//! milliseconds apart, and a short quiet gap would split every burst into several syncs,
//! so that the number of syncs grew with the number of shards a burst touches. The node
//! measures how late its tasks run ([`Syncer::set_scheduling_delay`]) and the quiet gap
//! stretches with that delay, up to [`GATHER_QUIET_MAX`]. Waiting then costs no latency
//! worth the name: the tasks that would run after an early sync are queued anyway.

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
    /// The submitting tasks' scheduling delay in microseconds, as last reported.
    scheduling_delay_us: Arc<AtomicU64>,
}

impl Syncer {
    pub fn start(db: Arc<DB>) -> std::io::Result<Self> {
        let (tx, rx) = mpsc::channel::<SyncWaiter>();
        let stats = Arc::new(SyncStats::default());
        let scheduling_delay_us = Arc::new(AtomicU64::new(0));
        let (thread_stats, thread_delay) = (stats.clone(), scheduling_delay_us.clone());
        let thread = std::thread::Builder::new()
            .name("kerwen-wal-sync".into())
            .spawn(move || run(db, rx, thread_stats, thread_delay))?;
        Ok(Self { tx: Some(tx), thread: Some(thread), stats, scheduling_delay_us })
    }

    /// Reports how late the tasks that submit waiters currently run (a smoothed
    /// measurement; zero, the default, means "at once"). Later rounds gather accordingly.
    pub fn set_scheduling_delay(&self, delay: Duration) {
        self.scheduling_delay_us.store(u64::try_from(delay.as_micros()).unwrap_or(u64::MAX), Ordering::Relaxed);
    }

    /// The scheduling delay last reported.
    pub fn scheduling_delay(&self) -> Duration {
        Duration::from_micros(self.scheduling_delay_us.load(Ordering::Relaxed))
    }

    /// The window the next round gathers in.
    pub fn gather_window(&self) -> GatherWindow {
        GatherWindow::for_delay(self.scheduling_delay())
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

/// The shortest quiet gap that closes a round: an idle node's burst arrives within it.
pub const GATHER_QUIET_MIN: Duration = Duration::from_micros(100);
/// The longest quiet gap, however late tasks run.
pub const GATHER_QUIET_MAX: Duration = Duration::from_millis(3);
/// A round gathers for at least this long after its first waiter if waiters keep coming…
pub const GATHER_MAX_MIN: Duration = Duration::from_millis(1);
/// …and never longer than this, so one waiter's sync is never put off further.
pub const GATHER_MAX_MAX: Duration = Duration::from_millis(5);
/// The quiet gap per unit of scheduling delay. A burst of appends is spread over several
/// scheduling delays (its Raft tasks queue behind each other for two cores); measured with
/// `scripts/shard-fsyncs 256 2000` on the 2-core box, the sync rate fell from 254 to 195 to
/// 143 per second with factors 1, 3 and 6 (3 shards: 150 at every factor).
const QUIET_PER_DELAY: u32 = 6;

/// How a round gathers: it closes once no waiter came for `quiet`, or `max` after its first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GatherWindow {
    pub quiet: Duration,
    pub max: Duration,
}

impl GatherWindow {
    /// The window for tasks that run `delay` late: a quiet gap of [`QUIET_PER_DELAY`] delays
    /// and a round of at most twice that, each within its bounds.
    pub fn for_delay(delay: Duration) -> Self {
        let quiet = delay.saturating_mul(QUIET_PER_DELAY);
        Self {
            quiet: quiet.clamp(GATHER_QUIET_MIN, GATHER_QUIET_MAX),
            max: quiet.saturating_mul(2).clamp(GATHER_MAX_MIN, GATHER_MAX_MAX),
        }
    }
}

fn run(db: Arc<DB>, rx: mpsc::Receiver<SyncWaiter>, stats: Arc<SyncStats>, scheduling_delay_us: Arc<AtomicU64>) {
    let mut waiters = Vec::new();
    while let Ok(first) = rx.recv() {
        let gathering_since = Instant::now();
        let window = GatherWindow::for_delay(Duration::from_micros(scheduling_delay_us.load(Ordering::Relaxed)));
        waiters.push(first);
        while waiters.len() < MAX_WAITERS_PER_SYNC {
            let left = window.max.saturating_sub(gathering_since.elapsed());
            if left.is_zero() {
                break;
            }
            match rx.recv_timeout(window.quiet.min(left)) {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_idle_node_gathers_briefly_and_a_busy_one_longer_within_bounds() {
        let idle = GatherWindow::for_delay(Duration::ZERO);
        assert_eq!(idle, GatherWindow { quiet: GATHER_QUIET_MIN, max: GATHER_MAX_MIN });
        let busy = GatherWindow::for_delay(Duration::from_micros(300));
        assert_eq!(busy, GatherWindow { quiet: Duration::from_micros(1800), max: Duration::from_micros(3600) });
        let swamped = GatherWindow::for_delay(Duration::from_secs(1));
        assert_eq!(swamped, GatherWindow { quiet: GATHER_QUIET_MAX, max: GATHER_MAX_MAX });
        assert_eq!(GatherWindow::for_delay(Duration::MAX), swamped);
        let mut last = idle;
        for us in (0..2_000).step_by(10) {
            let w = GatherWindow::for_delay(Duration::from_micros(us));
            assert!(w.quiet >= last.quiet && w.max >= last.max && w.quiet <= w.max, "{us} µs: {w:?}");
            last = w;
        }
    }
}

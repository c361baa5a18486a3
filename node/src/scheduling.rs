//! How late this node's tasks run, measured for the group commit.
//!
//! Every [`PROBE_INTERVAL`] a task yields once and times how long the runtime takes to poll
//! it again: the time the tasks queued ahead of it take, which is how far apart the tasks of
//! one burst (the Raft tasks of the shards one replication batch, publish or ack touches)
//! get to run. The smoothed figure goes to the store, whose group commit gathers a round's
//! appends for longer the later tasks run (`kerwen_broker::storage::syncer::GatherWindow`),
//! so that a busy node does not split one burst into many fsyncs. The operations port
//! shows it as `kerwen_runtime_scheduling_delay_seconds`.

use std::sync::Weak;
use std::time::{Duration, Instant};

use kerwen_broker::storage::Store;

/// How often the probe measures.
pub const PROBE_INTERVAL: Duration = Duration::from_millis(10);
/// Weight of a new measurement in the moving average: the last eight or so count, 80 ms.
const SMOOTHING: f64 = 1.0 / 8.0;

/// Measures until the store is dropped.
pub fn spawn_probe(store: Weak<Store>) {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(PROBE_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut smoothed_secs = 0.0f64;
        loop {
            tick.tick().await;
            let started = Instant::now();
            tokio::task::yield_now().await;
            let delay = started.elapsed().as_secs_f64();
            smoothed_secs += (delay - smoothed_secs) * SMOOTHING;
            let Some(store) = store.upgrade() else { return };
            store.set_scheduling_delay(Duration::from_secs_f64(smoothed_secs));
        }
    });
}

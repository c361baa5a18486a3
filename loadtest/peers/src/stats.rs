//! What a run records and how it is reported.
//!
//! Every message carries a 16-byte header at the start of its payload: the run id (so that a
//! message left over from another run is recognised) and its *intended* send time in
//! nanoseconds since the run's start (`t0`, one monotonic clock shared by the producers and the
//! consumers of this process). A sample counts in the results when its intended send time falls
//! in the measure window `[warmup, warmup + duration)`.
//!
//! Latencies are kept in microseconds in HdrHistograms (3 significant digits, up to 1 hour).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;

/// Bytes at the start of each payload: run id (u64 LE), intended send time (u64 LE, ns since t0).
pub const HEADER_LEN: usize = 16;

/// Writes the header into `payload` (at least [`HEADER_LEN`] bytes long).
pub fn write_header(payload: &mut [u8], run_id: u64, intended_ns: u64) {
    payload[..8].copy_from_slice(&run_id.to_le_bytes());
    payload[8..16].copy_from_slice(&intended_ns.to_le_bytes());
}

/// Reads `(run id, intended send time in ns since t0)`; `None` if the payload is too short.
pub fn read_header(payload: &[u8]) -> Option<(u64, u64)> {
    let run = u64::from_le_bytes(payload.get(..8)?.try_into().ok()?);
    let sent = u64::from_le_bytes(payload.get(8..16)?.try_into().ok()?);
    Some((run, sent))
}

/// An open-loop schedule: producer `index` of `producers` sends message `k` at
/// `t0 + phase + k * producers / rate`, so that all producers together offer `rate` msg/s,
/// evenly staggered.
#[derive(Debug, Clone, Copy)]
pub struct Schedule {
    /// Nanoseconds between two messages of this producer, as the fraction `num / den`.
    num: u128,
    den: u128,
    phase_ns: u128,
}

impl Schedule {
    pub fn new(rate: u64, producers: usize, index: usize) -> Schedule {
        let p = producers.max(1) as u128;
        let num = p * 1_000_000_000;
        let den = u128::from(rate.max(1));
        Schedule {
            num,
            den,
            phase_ns: num * index as u128 / (den * p),
        }
    }

    /// Offset of message `k` from t0.
    pub fn offset(&self, k: u64) -> Duration {
        let ns = self.phase_ns + u128::from(k) * self.num / self.den;
        Duration::from_nanos(u64::try_from(ns).unwrap_or(u64::MAX))
    }
}

fn new_histogram() -> Histogram<u64> {
    // 1 µs .. 1 h, 3 significant digits: these bounds are valid, so this cannot fail.
    Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("valid histogram bounds")
}

/// Counters and histograms shared by all tasks of a run.
pub struct Recorder {
    pub run_id: u64,
    pub t0: Instant,
    pub warmup_end_ns: u64,
    pub end_ns: u64,
    /// publish -> ack, from the intended send time (µs).
    pub ack: Mutex<Histogram<u64>>,
    /// publish -> first delivery, from the intended send time (µs).
    pub e2e: Mutex<Histogram<u64>>,
    /// How late each publish actually left (open loop; µs).
    pub send_delay: Mutex<Histogram<u64>>,
    /// Publishes started in the measure window.
    pub sent_measured: AtomicU64,
    /// Positive acks of this run, all phases / measure window only.
    pub acked_all: AtomicU64,
    pub acked_measured: AtomicU64,
    /// Latest ack of a measured message (ns since t0).
    pub last_ack_ns: AtomicU64,
    /// First deliveries of this run's messages, all phases / measure window only.
    pub delivered_all: AtomicU64,
    pub delivered_measured: AtomicU64,
    pub last_delivery_ns: AtomicU64,
    pub redelivered: AtomicU64,
    /// Deliveries that are not from this run (left over from an earlier one).
    pub foreign: AtomicU64,
    /// Publishes whose ack never came before the end of the drain.
    pub unconfirmed: AtomicU64,
    /// Errors by kind ("publish: nack", "consume: ...").
    pub errors: Mutex<BTreeMap<String, u64>>,
}

impl Recorder {
    pub fn new(run_id: u64, t0: Instant, warmup: Duration, duration: Duration) -> Recorder {
        let warmup_end_ns = nanos(warmup);
        Recorder {
            run_id,
            t0,
            warmup_end_ns,
            end_ns: warmup_end_ns.saturating_add(nanos(duration)),
            ack: Mutex::new(new_histogram()),
            e2e: Mutex::new(new_histogram()),
            send_delay: Mutex::new(new_histogram()),
            sent_measured: AtomicU64::new(0),
            acked_all: AtomicU64::new(0),
            acked_measured: AtomicU64::new(0),
            last_ack_ns: AtomicU64::new(0),
            delivered_all: AtomicU64::new(0),
            delivered_measured: AtomicU64::new(0),
            last_delivery_ns: AtomicU64::new(0),
            redelivered: AtomicU64::new(0),
            foreign: AtomicU64::new(0),
            unconfirmed: AtomicU64::new(0),
            errors: Mutex::new(BTreeMap::new()),
        }
    }

    /// Nanoseconds since t0.
    pub fn now_ns(&self) -> u64 {
        nanos(self.t0.elapsed())
    }

    pub fn measured(&self, intended_ns: u64) -> bool {
        (self.warmup_end_ns..self.end_ns).contains(&intended_ns)
    }

    pub fn record_sent(&self, intended_ns: u64, sent_ns: u64) {
        if self.measured(intended_ns) {
            self.sent_measured.fetch_add(1, Ordering::Relaxed);
            record(&self.send_delay, sent_ns.saturating_sub(intended_ns));
        }
    }

    pub fn record_ack(&self, intended_ns: u64, done_ns: u64) {
        self.acked_all.fetch_add(1, Ordering::Relaxed);
        if self.measured(intended_ns) {
            self.acked_measured.fetch_add(1, Ordering::Relaxed);
            self.last_ack_ns.fetch_max(done_ns, Ordering::Relaxed);
            record(&self.ack, done_ns.saturating_sub(intended_ns));
        }
    }

    /// Records one delivery from its payload.
    pub fn record_delivery(&self, payload: &[u8], redelivered: bool) {
        let now = self.now_ns();
        match read_header(payload) {
            Some((run, intended)) if run == self.run_id => {
                if redelivered {
                    self.redelivered.fetch_add(1, Ordering::Relaxed);
                    return;
                }
                self.delivered_all.fetch_add(1, Ordering::Relaxed);
                if self.measured(intended) {
                    self.delivered_measured.fetch_add(1, Ordering::Relaxed);
                    self.last_delivery_ns.fetch_max(now, Ordering::Relaxed);
                    record(&self.e2e, now.saturating_sub(intended));
                }
            }
            _ => {
                self.foreign.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    pub fn record_error(&self, kind: impl Into<String>) {
        let mut errors = self.errors.lock().unwrap_or_else(|p| p.into_inner());
        *errors.entry(kind.into()).or_default() += 1;
    }
}

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

fn record(h: &Mutex<Histogram<u64>>, ns: u64) {
    let us = (ns / 1_000).max(1);
    h.lock()
        .unwrap_or_else(|p| p.into_inner())
        .saturating_record(us);
}

/// Milliseconds with a precision that suits the magnitude.
fn ms(us: u64) -> String {
    let v = us as f64 / 1_000.0;
    if v < 10.0 {
        format!("{v:.2}")
    } else if v < 100.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.0}")
    }
}

/// One line of percentiles (ms) of a histogram, or a dash if it is empty.
pub fn percentiles(h: &Mutex<Histogram<u64>>) -> String {
    let h = h.lock().unwrap_or_else(|p| p.into_inner());
    if h.is_empty() {
        return "-".to_owned();
    }
    format!(
        "p50 {}  p90 {}  p99 {}  p99.9 {}  max {} ms  (n={})",
        ms(h.value_at_quantile(0.50)),
        ms(h.value_at_quantile(0.90)),
        ms(h.value_at_quantile(0.99)),
        ms(h.value_at_quantile(0.999)),
        ms(h.max()),
        h.len()
    )
}

/// `(p50, p99)` in ms of a histogram, for the one-line summary.
pub fn p50_p99(h: &Mutex<Histogram<u64>>) -> (String, String) {
    let h = h.lock().unwrap_or_else(|p| p.into_inner());
    if h.is_empty() {
        return ("-".to_owned(), "-".to_owned());
    }
    (ms(h.value_at_quantile(0.50)), ms(h.value_at_quantile(0.99)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trips() {
        let mut p = vec![0u8; 32];
        write_header(&mut p, 7, 123_456);
        assert_eq!(read_header(&p), Some((7, 123_456)));
        assert_eq!(read_header(&p[..10]), None);
    }

    #[test]
    fn schedule_spreads_the_rate_over_producers() {
        // 1000 msg/s over 4 producers: each sends every 4 ms, staggered by 1 ms.
        let s = Schedule::new(1000, 4, 1);
        assert_eq!(s.offset(0), Duration::from_millis(1));
        assert_eq!(s.offset(1), Duration::from_millis(5));
        assert_eq!(s.offset(250), Duration::from_millis(1001));
    }

    #[test]
    fn only_the_measure_window_counts() {
        let r = Recorder::new(
            1,
            Instant::now(),
            Duration::from_secs(1),
            Duration::from_secs(2),
        );
        r.record_ack(500_000_000, 600_000_000);
        r.record_ack(1_500_000_000, 1_510_000_000);
        r.record_ack(3_000_000_000, 3_100_000_000);
        assert_eq!(r.acked_all.load(Ordering::Relaxed), 3);
        assert_eq!(r.acked_measured.load(Ordering::Relaxed), 1);
        let h = r.ack.lock().unwrap();
        assert_eq!(h.len(), 1);
        assert!(h.equivalent(h.value_at_quantile(0.5), 10_000));
    }
}

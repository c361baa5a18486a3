//! Measurement: latency histograms, counters, errors, the open-loop schedule and the
//! coordinated-omission arithmetic.
//!
//! Every producer and consumer task owns a [`Recorder`] behind its own mutex (locked once per
//! publish batch or delivery, and once a second by the reporter, so it is uncontended). A
//! recorder holds two [`Window`]s: `interval`, everything since the last one-second tick (warm-up
//! included; drained into the time series and the HdrHistogram log), and `total`, only the
//! *measured* samples — those whose intended send time falls after the warm-up — for the
//! summary.
//!
//! Latencies are recorded in microseconds. Publish→ack latency runs from the *intended* send
//! time to the arrival of the response; end-to-end latency from the intended send time (carried
//! in the [`SENT_HEADER`] header) to the delivery. In open loop the intended times follow a fixed
//! [`Schedule`], so a publish held back by a full window or a slow cluster still counts from when
//! it should have been sent (coordinated omission corrected, as in wrk2); the lag itself is
//! recorded as "send delay". In closed loop the intended time is the actual send time.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use hdrhistogram::Histogram;

/// Header carrying the intended send time of a message, in Unix nanoseconds.
pub const SENT_HEADER: &str = "kerwen-sent-unix-ns";

/// Significant figures of every histogram.
pub const SIGFIGS: u8 = 3;

/// Quantiles reported in the JSON file.
pub const QUANTILES: [f64; 9] = [0.5, 0.75, 0.9, 0.95, 0.99, 0.999, 0.9999, 0.99999, 1.0];

/// A fresh auto-resizing histogram of microseconds.
pub fn new_histogram() -> Histogram<u64> {
    // 3 significant figures cannot fail; auto-resize covers any latency.
    Histogram::new(SIGFIGS).expect("3 significant figures are valid")
}

/// Microseconds of `d`, saturating.
pub fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

/// Latencies of one completed publish, corrected for coordinated omission: publish→ack from the
/// intended send time, and the send delay (how late the request actually went out).
pub fn corrected_latency(intended: Instant, sent: Instant, completed: Instant) -> (Duration, Duration) {
    (completed.saturating_duration_since(intended), sent.saturating_duration_since(intended))
}

/// An open-loop sending schedule for one producer: batch `k` is due at
/// `start + phase + k * batch * producers / rate` seconds, so that all producers together send
/// `rate` msg/s, evenly staggered.
#[derive(Debug, Clone, Copy)]
pub struct Schedule {
    pub start: Instant,
    /// Nanoseconds between two batches of this producer, as a fraction `num / den`.
    num: u128,
    den: u128,
    /// This producer's offset within one period, in nanoseconds.
    phase_ns: u128,
}

impl Schedule {
    /// `rate` is the total over all `producers`; this is producer `index`'s schedule.
    pub fn new(start: Instant, rate: u64, producers: u32, index: u32, batch: u32) -> Schedule {
        let num = u128::from(batch) * u128::from(producers) * 1_000_000_000;
        let den = u128::from(rate.max(1));
        let phase_ns = num * u128::from(index) / (den * u128::from(producers.max(1)));
        Schedule { start, num, den, phase_ns }
    }

    /// Offset of batch `k` from the start.
    pub fn offset(&self, k: u64) -> Duration {
        let ns = self.phase_ns + u128::from(k) * self.num / self.den;
        Duration::from_nanos(u64::try_from(ns).unwrap_or(u64::MAX))
    }

    /// How many batches are due before `t` (offset from the start).
    pub fn due_before(&self, t: Duration) -> u64 {
        let t_ns = t.as_nanos();
        if t_ns <= self.phase_ns || self.num == 0 {
            return 0;
        }
        // Batch j is due before t iff phase + floor(j * num / den) < t, i.e. j < (t - phase) * den / num.
        let n = ((t_ns - self.phase_ns) * self.den).div_ceil(self.num);
        u64::try_from(n).unwrap_or(u64::MAX)
    }

    /// When batch `k` is due.
    pub fn intended(&self, k: u64) -> Instant {
        self.start + self.offset(k)
    }

    /// Time between two batches of this producer.
    #[cfg(test)]
    pub fn period(&self) -> Duration {
        Duration::from_nanos(u64::try_from(self.num / self.den).unwrap_or(u64::MAX))
    }
}

/// Converts between the monotonic clock used for scheduling and Unix time (for the header that
/// consumers compare against their own wall clock).
#[derive(Debug, Clone, Copy)]
pub struct Clock {
    base: Instant,
    base_unix_ns: u64,
}

impl Clock {
    pub fn new() -> Clock {
        Clock { base: Instant::now(), base_unix_ns: unix_ns_now() }
    }

    pub fn unix_ns(&self, t: Instant) -> u64 {
        let since = u64::try_from(t.saturating_duration_since(self.base).as_nanos()).unwrap_or(u64::MAX);
        self.base_unix_ns.saturating_add(since)
    }
}

impl Default for Clock {
    fn default() -> Self {
        Self::new()
    }
}

pub fn unix_ns_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)).unwrap_or(0)
}

/// Counters and histograms over some span of time.
#[derive(Debug, Clone)]
pub struct Window {
    /// Publish→ack latency of every acked message (µs).
    pub publish_ack: Histogram<u64>,
    /// Publish→delivery latency of every first delivery (µs).
    pub end_to_end: Histogram<u64>,
    /// How late each publish request went out relative to its schedule (µs), per request.
    pub send_delay: Histogram<u64>,
    pub published: u64,
    pub published_bytes: u64,
    pub publish_requests: u64,
    /// Messages of publish requests that failed.
    pub failed: u64,
    pub delivered: u64,
    pub delivered_bytes: u64,
    /// Deliveries with attempt > 1 (not in the end-to-end histogram).
    pub redelivered: u64,
    /// Deliveries of messages this run did not publish (left over in the mailbox).
    pub foreign: u64,
    /// Acks the cluster confirmed on consumer streams.
    pub acks_confirmed: u64,
    /// Failed calls by operation and gRPC status code, e.g. `publish` → `Unavailable` → 3.
    pub errors: BTreeMap<String, BTreeMap<String, u64>>,
    /// Last publish completion and last delivery in this window.
    pub last_ack: Option<Instant>,
    pub last_delivery: Option<Instant>,
}

impl Default for Window {
    fn default() -> Self {
        Window {
            publish_ack: new_histogram(),
            end_to_end: new_histogram(),
            send_delay: new_histogram(),
            published: 0,
            published_bytes: 0,
            publish_requests: 0,
            failed: 0,
            delivered: 0,
            delivered_bytes: 0,
            redelivered: 0,
            foreign: 0,
            acks_confirmed: 0,
            errors: BTreeMap::new(),
            last_ack: None,
            last_delivery: None,
        }
    }
}

fn later(a: Option<Instant>, b: Option<Instant>) -> Option<Instant> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.max(b)),
        (a, b) => a.or(b),
    }
}

impl Window {
    pub fn add(&mut self, other: &Window) {
        // Both are auto-resizing histograms of the same precision: adding cannot fail.
        let _ = self.publish_ack.add(&other.publish_ack);
        let _ = self.end_to_end.add(&other.end_to_end);
        let _ = self.send_delay.add(&other.send_delay);
        self.published += other.published;
        self.published_bytes += other.published_bytes;
        self.publish_requests += other.publish_requests;
        self.failed += other.failed;
        self.delivered += other.delivered;
        self.delivered_bytes += other.delivered_bytes;
        self.redelivered += other.redelivered;
        self.foreign += other.foreign;
        self.acks_confirmed += other.acks_confirmed;
        for (op, codes) in &other.errors {
            let mine = self.errors.entry(op.clone()).or_default();
            for (code, n) in codes {
                *mine.entry(code.clone()).or_default() += n;
            }
        }
        self.last_ack = later(self.last_ack, other.last_ack);
        self.last_delivery = later(self.last_delivery, other.last_delivery);
    }

    /// Empties the window, keeping the histograms' allocations.
    pub fn reset(&mut self) {
        let Window {
            publish_ack,
            end_to_end,
            send_delay,
            published,
            published_bytes,
            publish_requests,
            failed,
            delivered,
            delivered_bytes,
            redelivered,
            foreign,
            acks_confirmed,
            errors,
            last_ack,
            last_delivery,
        } = self;
        publish_ack.reset();
        end_to_end.reset();
        send_delay.reset();
        for counter in [published, published_bytes, publish_requests, failed, delivered, delivered_bytes, redelivered, foreign, acks_confirmed] {
            *counter = 0;
        }
        errors.clear();
        *last_ack = None;
        *last_delivery = None;
    }

    pub fn error_count(&self) -> u64 {
        self.errors.values().flat_map(|c| c.values()).sum()
    }

    pub fn record_error(&mut self, op: &str, code: tonic::Code) {
        *self.errors.entry(op.to_owned()).or_default().entry(code_name(code).to_owned()).or_default() += 1;
    }
}

/// The gRPC status code's canonical name (`UNAVAILABLE`).
pub fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code::*;
    match code {
        Ok => "OK",
        Cancelled => "CANCELLED",
        Unknown => "UNKNOWN",
        InvalidArgument => "INVALID_ARGUMENT",
        DeadlineExceeded => "DEADLINE_EXCEEDED",
        NotFound => "NOT_FOUND",
        AlreadyExists => "ALREADY_EXISTS",
        PermissionDenied => "PERMISSION_DENIED",
        ResourceExhausted => "RESOURCE_EXHAUSTED",
        FailedPrecondition => "FAILED_PRECONDITION",
        Aborted => "ABORTED",
        OutOfRange => "OUT_OF_RANGE",
        Unimplemented => "UNIMPLEMENTED",
        Internal => "INTERNAL",
        Unavailable => "UNAVAILABLE",
        DataLoss => "DATA_LOSS",
        Unauthenticated => "UNAUTHENTICATED",
    }
}

/// One task's measurements.
#[derive(Debug, Default)]
pub struct Recorder {
    /// Since the last tick, warm-up included.
    pub interval: Window,
    /// Measured samples only (intended send time after the warm-up).
    pub total: Window,
}

/// A shared handle on one task's [`Recorder`].
#[derive(Debug, Clone, Default)]
pub struct RecorderHandle(Arc<Mutex<Recorder>>);

impl RecorderHandle {
    pub fn lock(&self) -> MutexGuard<'_, Recorder> {
        // A panicking task cannot leave a recorder half-updated in a way that matters here.
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// All recorders of a run.
#[derive(Debug, Clone, Default)]
pub struct Registry(Arc<Mutex<Vec<RecorderHandle>>>);

impl Registry {
    pub fn register(&self) -> RecorderHandle {
        let handle = RecorderHandle::default();
        self.0.lock().unwrap_or_else(|e| e.into_inner()).push(handle.clone());
        handle
    }

    fn handles(&self) -> Vec<RecorderHandle> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Takes every recorder's interval window (leaving them empty) and sums them.
    pub fn drain_intervals(&self) -> Window {
        let mut sum = Window::default();
        for h in self.handles() {
            let mut r = h.lock();
            sum.add(&r.interval);
            r.interval.reset();
        }
        sum
    }

    /// Sum of every recorder's measured window.
    pub fn totals(&self) -> Window {
        let mut sum = Window::default();
        for h in self.handles() {
            sum.add(&h.lock().total);
        }
        sum
    }
}

/// Percentiles of a histogram in microseconds, as used by the time series.
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct Brief {
    pub count: u64,
    pub p50_us: u64,
    pub p90_us: u64,
    pub p99_us: u64,
    pub p999_us: u64,
    pub max_us: u64,
}

impl Brief {
    pub fn of(h: &Histogram<u64>) -> Brief {
        if h.is_empty() {
            return Brief::default();
        }
        Brief {
            count: h.len(),
            p50_us: h.value_at_quantile(0.5),
            p90_us: h.value_at_quantile(0.9),
            p99_us: h.value_at_quantile(0.99),
            p999_us: h.value_at_quantile(0.999),
            max_us: h.max(),
        }
    }
}

/// Phase of the run a time-series point belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Phase {
    Warmup,
    Measure,
    Drain,
}

/// One point of the per-second time series.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Point {
    /// Seconds since the start of the load (end of this interval).
    pub t_s: f64,
    pub interval_s: f64,
    pub phase: Phase,
    pub published: u64,
    pub publish_msgs_per_s: f64,
    pub publish_mb_per_s: f64,
    pub delivered: u64,
    pub deliver_msgs_per_s: f64,
    pub deliver_mb_per_s: f64,
    pub failed_messages: u64,
    pub errors: u64,
    pub redelivered: u64,
    /// Messages published (acked) so far minus first deliveries so far. It can dip below zero:
    /// a message may reach its consumer before the publish response reaches its producer.
    pub backlog: i64,
    pub publish_ack: Brief,
    pub end_to_end: Brief,
    pub send_delay: Brief,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedule_spreads_the_total_rate_over_producers() {
        let start = Instant::now();
        // 2000 msg/s over 4 producers in batches of 10: each producer sends 50 batches/s,
        // i.e. one every 20 ms, staggered by 5 ms.
        let s0 = Schedule::new(start, 2000, 4, 0, 10);
        let s1 = Schedule::new(start, 2000, 4, 1, 10);
        let s3 = Schedule::new(start, 2000, 4, 3, 10);
        assert_eq!(s0.period(), Duration::from_millis(20));
        assert_eq!(s0.offset(0), Duration::ZERO);
        assert_eq!(s0.offset(1), Duration::from_millis(20));
        assert_eq!(s1.offset(0), Duration::from_millis(5));
        assert_eq!(s3.offset(2), Duration::from_millis(55));
        // Over one second the four producers together schedule exactly 200 batches = 2000 msgs.
        let per_second: u64 = [0, 1, 2, 3]
            .iter()
            .map(|&i| {
                let s = Schedule::new(start, 2000, 4, i, 10);
                (0..).take_while(|&k| s.offset(k) < Duration::from_secs(1)).count() as u64
            })
            .sum();
        assert_eq!(per_second * 10, 2000);
    }

    #[test]
    fn counts_the_batches_due_before_a_time() {
        let start = Instant::now();
        for (rate, producers, index, batch) in [(2000, 4, 1, 10), (3, 1, 0, 1), (7, 3, 2, 2), (1_000_000, 2, 1, 100)] {
            let s = Schedule::new(start, rate, producers, index, batch);
            for t in [Duration::ZERO, Duration::from_millis(5), Duration::from_millis(999), Duration::from_secs(3)] {
                let brute = (0..).take_while(|&k| s.offset(k) < t).count() as u64;
                assert_eq!(s.due_before(t), brute, "rate {rate} producers {producers} index {index} t {t:?}");
            }
        }
    }

    #[test]
    fn schedule_does_not_drift_with_awkward_rates() {
        let s = Schedule::new(Instant::now(), 3, 1, 0, 1);
        // 1/3 s per message: after 3 million messages exactly a million seconds, no drift.
        assert_eq!(s.offset(3_000_000), Duration::from_secs(1_000_000));
        assert_eq!(s.offset(1), Duration::from_nanos(333_333_333));
    }

    #[test]
    fn latency_counts_from_the_intended_send_time() {
        let intended = Instant::now();
        // The request went out 40 ms late (window full) and was acked 5 ms after sending.
        let sent = intended + Duration::from_millis(40);
        let acked = sent + Duration::from_millis(5);
        let (latency, delay) = corrected_latency(intended, sent, acked);
        assert_eq!(latency, Duration::from_millis(45));
        assert_eq!(delay, Duration::from_millis(40));
        // On time: the latency is the service time; an early send never goes negative.
        let (latency, delay) = corrected_latency(sent, intended, acked);
        assert_eq!(latency, Duration::from_millis(5));
        assert_eq!(delay, Duration::ZERO);
    }

    #[test]
    fn coordinated_omission_shows_in_the_percentiles() {
        // A 1 s stall at 100 msg/s open loop, then 1 s of normal service (1 ms). The 100
        // requests due during the stall all wait for it, so their corrected latencies fall
        // linearly from ~1 s to ~11 ms; timed from the actual send, as a closed-loop tool does,
        // every request would look like 1 ms.
        let start = Instant::now();
        let s = Schedule::new(start, 100, 1, 0, 1);
        let stall_end = start + Duration::from_secs(1);
        let mut corrected = new_histogram();
        let mut naive = new_histogram();
        for k in 0..200 {
            let intended = s.intended(k);
            let sent = intended.max(stall_end);
            let done = sent + Duration::from_millis(1);
            let (latency, _) = corrected_latency(intended, sent, done);
            corrected.record(micros(latency)).unwrap();
            naive.record(micros(done - sent)).unwrap();
        }
        let q = |h: &Histogram<u64>, q: f64| h.value_at_quantile(q);
        assert!(q(&corrected, 0.25) < 1_100, "p25 {}", q(&corrected, 0.25));
        assert!(q(&corrected, 0.75) > 450_000, "p75 {}", q(&corrected, 0.75));
        assert!(q(&corrected, 0.99) > 950_000, "p99 {}", q(&corrected, 0.99));
        assert!(corrected.max() >= 1_000_000);
        assert!(q(&naive, 0.99) < 1_100, "the uncorrected p99 hides the stall");
    }

    #[test]
    fn windows_add_up() {
        let mut a = Window::default();
        a.publish_ack.record(100).unwrap();
        a.published = 1;
        a.record_error("publish", tonic::Code::Unavailable);
        let mut b = Window::default();
        b.publish_ack.record(300).unwrap();
        b.published = 2;
        b.record_error("publish", tonic::Code::Unavailable);
        b.record_error("subscribe", tonic::Code::NotFound);
        a.add(&b);
        assert_eq!(a.published, 3);
        assert_eq!(a.publish_ack.len(), 2);
        assert_eq!(a.errors["publish"]["UNAVAILABLE"], 2);
        assert_eq!(a.error_count(), 3);
        a.reset();
        assert_eq!(a.published, 0);
        assert!(a.publish_ack.is_empty());
        assert!(a.errors.is_empty());
    }

    #[test]
    fn clock_maps_instants_to_unix_time() {
        let c = Clock::new();
        let later = c.base + Duration::from_millis(1500);
        assert_eq!(c.unix_ns(later) - c.unix_ns(c.base), 1_500_000_000);
    }
}

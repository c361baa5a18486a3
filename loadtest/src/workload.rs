//! The load itself: mailbox setup, producers, consumers, and the run's phases.
//!
//! Timeline (t = 0 is the start of the load):
//!
//! - **warm-up** `[0, warmup)`: full load, samples kept out of the summary;
//! - **measure** `[warmup, warmup + duration)` (or until `--count` measured messages were
//!   published): samples whose intended send time falls here are the results;
//! - **drain**: publishing has stopped; consumers keep going until every acked message of this
//!   run was delivered or `--drain` runs out; then everything stops.
//!
//! Producers: each has its own connection and keeps up to `--inflight` publish requests of
//! `--batch` messages in flight. Closed loop sends the next request as soon as a slot frees;
//! open loop sends batch `k` at its [`Schedule`] time (waiting for a slot if needed — the lag
//! counts in the latency). Each batch goes to one mailbox, round robin. Every message carries
//! its intended send time in [`SENT_HEADER`] and an id `<run id>-<producer>-<sequence>`.
//!
//! Consumers: one subscription stream per (consumer, mailbox) assignment — at least one per
//! mailbox — acking every delivery (in batches of `--ack-batch`, or after 5 ms) and granting one
//! credit back per ack. Streams that fail are reopened.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use bytes::Bytes;
use futures::stream::{FuturesUnordered, StreamExt};
use futures::FutureExt;
use kerwen_node::client::{Client, Event, Subscription};
use kerwen_proto::v1::{Delivery, Message, Position, PublishResponse};
use rand::rngs::SmallRng;
use rand::{Rng, RngCore, SeedableRng};
use tokio::sync::watch;
use tonic::{Code, Status};

use crate::cluster::{Connection, EmbeddedCluster};
use crate::config::{format_duration, Config};
use crate::report::HdrLog;
use crate::stats::{self, corrected_latency, micros, Brief, Clock, Phase, Point, RecorderHandle, Registry, Schedule, Window, SENT_HEADER};

/// Acks wait at most this long for a full `--ack-batch`.
const ACK_FLUSH: Duration = Duration::from_millis(5);
/// Pause before reconnecting a failed producer or consumer.
const RETRY_PAUSE: Duration = Duration::from_millis(500);
/// Time between setup and the start of the load, for consumers to subscribe.
const START_DELAY: Duration = Duration::from_millis(500);
/// Extra random bytes in the payload pool, so payloads start at varying offsets.
const PAYLOAD_SLACK: usize = 4096;
/// How long consumers may take to stop after being told.
const CONSUMER_STOP_TIMEOUT: Duration = Duration::from_secs(5);

/// State shared by all tasks of a run.
pub struct Run {
    pub config: Arc<Config>,
    pub connection: Connection,
    /// Prefix of this run's message ids.
    pub run_id: String,
    pub clock: Clock,
    pub start: Instant,
    pub warmup_end: Instant,
    pub warmup_end_unix_ns: u64,
    /// End of publishing: warm-up plus duration.
    pub end: Instant,
    /// Set on Ctrl-C or a failed node: producers stop at once, no drain.
    stop: watch::Receiver<bool>,
    /// Set when consumers should stop (after the drain).
    consumers_stop: watch::Receiver<bool>,
    /// Messages of this run acked to producers (warm-up included).
    published_ok: AtomicU64,
    /// First deliveries of this run's messages.
    delivered_first: AtomicU64,
    /// Messages due by the schedule but never sent because the run ended first (open loop).
    unsent: AtomicU64,
    /// Random bytes payloads are sliced from.
    payload_pool: Bytes,
}

/// Resolves once `rx` holds `true` (or its sender is gone).
async fn stopped(rx: &mut watch::Receiver<bool>) {
    let _ = rx.wait_for(|s| *s).await;
}

/// Random bytes that payloads of up to `max_size` are sliced from (with some slack, so that
/// payloads start at varying offsets).
pub fn payload_pool(max_size: u64, rng: &mut SmallRng) -> anyhow::Result<Bytes> {
    let mut pool = vec![0u8; usize::try_from(max_size).context("payload size")? + PAYLOAD_SLACK];
    rng.fill_bytes(&mut pool);
    Ok(Bytes::from(pool))
}

/// `size` bytes (at most the whole pool) from a random offset of `pool`.
pub fn payload_slice(pool: &Bytes, size: u64, rng: &mut SmallRng) -> Bytes {
    let size = usize::try_from(size).unwrap_or(usize::MAX).min(pool.len());
    let offset = rng.random_range(0..=pool.len() - size);
    pool.slice(offset..offset + size)
}

impl Run {
    fn payload(&self, size: u64, rng: &mut SmallRng) -> Bytes {
        payload_slice(&self.payload_pool, size, rng)
    }

    fn is_ours(&self, id: &str) -> bool {
        id.len() > self.run_id.len() && id.starts_with(&self.run_id) && id.as_bytes()[self.run_id.len()] == b'-'
    }

    fn phase_at(&self, t: Instant) -> Phase {
        if t <= self.warmup_end && self.warmup_end > self.start {
            Phase::Warmup
        } else if t <= self.end {
            Phase::Measure
        } else {
            Phase::Drain
        }
    }
}

/// Messages producer `index` of `producers` publishes after the warm-up, when `count` bounds
/// the run: an even split, the remainder going to the first producers.
pub fn producer_quota(count: u64, producers: u32, index: u32) -> u64 {
    let producers = u64::from(producers.max(1));
    count / producers + u64::from(u64::from(index) < count % producers)
}

/// The mailbox stream `s` of `streams` consumes, and how many streams there are.
pub fn consumer_streams(consumers: u32, mailboxes: u32) -> u32 {
    if consumers == 0 {
        0
    } else {
        consumers.max(mailboxes)
    }
}

/// What a run produced.
pub struct Outcome {
    pub started_unix_ms: u64,
    pub finished_unix_ms: u64,
    /// Measured samples only.
    pub totals: Window,
    pub series: Vec<Point>,
    /// From the end of the warm-up to the last measured publish ack / delivery.
    pub publish_window: Duration,
    pub deliver_window: Duration,
    pub unsent: u64,
    pub published_all: u64,
    pub delivered_all: u64,
    pub interrupted: bool,
    /// Every acked message of the run was delivered before the end.
    pub drained: bool,
    pub notes: Vec<String>,
}

fn unix_ms_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

/// Creates the mailboxes (existing ones are fine) and checks their partitions.
async fn create_mailboxes(config: &Config, client: &Client) -> anyhow::Result<Vec<String>> {
    let names: Vec<String> = (0..config.mailboxes).map(|n| config.mailbox(n)).collect();
    let results: Vec<anyhow::Result<()>> = futures::stream::iter(names.clone())
        .map(|name| {
            let mut client = client.clone();
            let partitions = config.partitions;
            async move {
                match client.create_mailbox(&name, partitions).await {
                    Ok(_) => Ok(()),
                    Err(s) if s.code() == Code::AlreadyExists => {
                        let info = client.describe_mailbox(&name).await.with_context(|| format!("describing {name}"))?;
                        if partitions != 0 && info.partitions != partitions {
                            eprintln!(
                                "note: mailbox {name} already exists with {} partitions (asked for {partitions})",
                                info.partitions
                            );
                        }
                        if info.pending_messages > 0 {
                            eprintln!(
                                "note: mailbox {name} already holds {} messages; consumers will drain them too (counted as foreign)",
                                info.pending_messages
                            );
                        }
                        Ok(())
                    }
                    Err(s) => Err(anyhow::anyhow!("creating mailbox {name}: {} ({})", s.message(), stats::code_name(s.code()))),
                }
            }
        })
        .buffer_unordered(8)
        .collect()
        .await;
    for r in results {
        r?;
    }
    Ok(names)
}

/// Runs the whole load against the cluster and gathers the results.
pub async fn run(
    config: Arc<Config>,
    connection: Connection,
    cluster: Option<&EmbeddedCluster>,
    interrupt: watch::Receiver<bool>,
    mut hdr_log: Option<HdrLog>,
) -> anyhow::Result<Outcome> {
    let client = connection
        .connect()
        .await
        .map_err(|s| anyhow::anyhow!("connecting to {}: {}", connection.endpoints, s.message()))?;
    let mailboxes = Arc::new(create_mailboxes(&config, &client).await?);

    let mut rng = SmallRng::seed_from_u64(config.seed);
    let payload_pool = payload_pool(config.size.max(), &mut rng)?;

    let (stop_tx, stop_rx) = watch::channel(false);
    let (consumers_stop_tx, consumers_stop_rx) = watch::channel(false);
    let clock = Clock::new();
    let start = Instant::now() + START_DELAY;
    let warmup_end = start + config.warmup;
    let run = Arc::new(Run {
        config: config.clone(),
        connection,
        run_id: format!("lt{:x}", stats::unix_ns_now() / 1000),
        clock,
        start,
        warmup_end,
        warmup_end_unix_ns: clock.unix_ns(warmup_end),
        end: warmup_end + config.duration,
        stop: stop_rx,
        consumers_stop: consumers_stop_rx,
        published_ok: AtomicU64::new(0),
        delivered_first: AtomicU64::new(0),
        unsent: AtomicU64::new(0),
        payload_pool,
    });
    let registry = Registry::default();
    let started_unix_ms = unix_ms_now() + START_DELAY.as_millis() as u64;
    if let Some(log) = hdr_log.as_mut() {
        log.begin(SystemTime::now() + START_DELAY, &config)?;
    }

    let streams = consumer_streams(config.consumers, config.mailboxes);
    let consumers: Vec<_> = (0..streams)
        .map(|s| {
            let mailbox = mailboxes[(s % config.mailboxes) as usize].clone();
            tokio::spawn(consumer(run.clone(), mailbox, registry.register()))
        })
        .collect();
    let producers: Vec<_> = (0..config.producers)
        .map(|p| tokio::spawn(producer(run.clone(), p, mailboxes.clone(), registry.register())))
        .collect();

    let mode = match config.rate {
        Some(r) => format!("open loop at {r} msg/s"),
        None => "closed loop".to_owned(),
    };
    eprintln!(
        "load: {mode}, {} producers x {} in flight x batch {} ({}), {} consumer streams, {} mailbox(es), size {}; warm-up {}, measure {}{}",
        config.producers,
        config.inflight,
        config.batch,
        if config.forwarded { "forwarded by the endpoint" } else { "straight to shard leaders" },
        streams,
        config.mailboxes,
        config.size,
        format_duration(config.warmup),
        format_duration(config.duration),
        config.count.map(|c| format!(" or {c} messages")).unwrap_or_default()
    );

    // The reporter ticks once a second from the start of the load.
    let mut reporter = Reporter::new(run.clone(), registry.clone(), hdr_log);
    let mut notes = Vec::new();
    let mut interrupted = false;
    let mut interrupt = interrupt;
    let mut producers = producers;
    let mut next_tick = start + Duration::from_secs(1);
    tokio::time::sleep_until(start.into()).await;

    // Publishing phase.
    loop {
        let (finished, running): (Vec<_>, Vec<_>) = producers.into_iter().partition(|h| h.is_finished());
        producers = running;
        for handle in finished {
            if let Some(Err(e)) = handle.now_or_never() {
                notes.push(format!("a producer failed: {e}"));
            }
        }
        if producers.is_empty() {
            break;
        }
        if Instant::now() >= next_tick {
            reporter.tick(next_tick)?;
            next_tick += Duration::from_secs(1);
        }
        let wake = next_tick.min(Instant::now() + Duration::from_millis(50));
        tokio::select! {
            _ = tokio::time::sleep_until(wake.into()) => {}
            _ = stopped(&mut interrupt), if !interrupted => {
                interrupted = true;
                eprintln!("interrupted: stopping");
                let _ = stop_tx.send(true);
            }
        }
        if let Some(id) = cluster.and_then(|c| c.failed_node()) {
            if !interrupted {
                let note = format!("embedded node {id} stopped during the run; the load was aborted");
                eprintln!("{note}");
                notes.push(note);
                interrupted = true;
                let _ = stop_tx.send(true);
            }
        }
    }

    // Drain phase: wait until consumers have seen every acked message, bounded by --drain.
    let drain_deadline = Instant::now() + config.drain;
    let mut drained = streams == 0;
    if streams > 0 {
        loop {
            let published = run.published_ok.load(Ordering::Relaxed);
            if run.delivered_first.load(Ordering::Relaxed) >= published {
                drained = true;
                break;
            }
            if interrupted || Instant::now() >= drain_deadline {
                break;
            }
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(20)) => {}
                _ = stopped(&mut interrupt), if !interrupted => {
                    interrupted = true;
                    eprintln!("interrupted: stopping");
                }
            }
            if Instant::now() >= next_tick {
                reporter.tick(next_tick)?;
                next_tick += Duration::from_secs(1);
            }
        }
    }
    let _ = consumers_stop_tx.send(true);
    let _ = stop_tx.send(true);
    for handle in consumers {
        let abort = handle.abort_handle();
        if tokio::time::timeout(CONSUMER_STOP_TIMEOUT, handle).await.is_err() {
            abort.abort();
            notes.push("a consumer did not stop in time and was aborted".to_owned());
        }
    }
    let now = Instant::now();
    if now > reporter.last + Duration::from_millis(1) {
        reporter.tick(now)?;
    }
    let series = reporter.finish()?;

    let totals = registry.totals();
    let since_warmup = |t: Option<Instant>| t.map(|t| t.saturating_duration_since(run.warmup_end)).unwrap_or_default();
    let published_all = run.published_ok.load(Ordering::Relaxed);
    let delivered_all = run.delivered_first.load(Ordering::Relaxed);
    if streams > 0 && !drained {
        let when = if interrupted {
            "the run was interrupted, so there was no drain".to_owned()
        } else {
            format!("--drain {} after publishing stopped", format_duration(config.drain))
        };
        notes.push(format!(
            "{} acked messages of this run were not delivered by the end ({when})",
            published_all.saturating_sub(delivered_all),
        ));
    }
    let unsent = run.unsent.load(Ordering::Relaxed);
    if unsent > 0 {
        notes.push(format!(
            "{unsent} scheduled messages were never sent: the producers fell behind the requested rate \
             (their latency is not in the histograms; the rate was not sustained)"
        ));
    }
    Ok(Outcome {
        started_unix_ms,
        finished_unix_ms: unix_ms_now(),
        publish_window: since_warmup(totals.last_ack),
        deliver_window: since_warmup(totals.last_delivery),
        totals,
        series,
        unsent,
        published_all,
        delivered_all,
        interrupted,
        drained,
        notes,
    })
}

// ------------------------------------------------------------------------------------------
// Reporter: the per-second time series, progress lines and HdrHistogram log
// ------------------------------------------------------------------------------------------

struct Reporter {
    run: Arc<Run>,
    registry: Registry,
    hdr_log: Option<HdrLog>,
    last: Instant,
    series: Vec<Point>,
    published: u64,
    delivered: u64,
}

impl Reporter {
    fn new(run: Arc<Run>, registry: Registry, hdr_log: Option<HdrLog>) -> Reporter {
        let last = run.start;
        Reporter { run, registry, hdr_log, last, series: Vec::new(), published: 0, delivered: 0 }
    }

    fn tick(&mut self, now: Instant) -> anyhow::Result<()> {
        let w = self.registry.drain_intervals();
        let interval = now.saturating_duration_since(self.last);
        let secs = interval.as_secs_f64().max(1e-3);
        let t = now.saturating_duration_since(self.run.start);
        self.published += w.published;
        self.delivered += w.delivered;
        let phase = self.run.phase_at(now);
        let point = Point {
            t_s: t.as_secs_f64(),
            interval_s: interval.as_secs_f64(),
            phase,
            published: w.published,
            publish_msgs_per_s: w.published as f64 / secs,
            publish_mb_per_s: w.published_bytes as f64 / secs / 1e6,
            delivered: w.delivered,
            deliver_msgs_per_s: w.delivered as f64 / secs,
            deliver_mb_per_s: w.delivered_bytes as f64 / secs / 1e6,
            failed_messages: w.failed,
            errors: w.error_count(),
            redelivered: w.redelivered,
            backlog: self.published as i64 - self.delivered as i64,
            publish_ack: Brief::of(&w.publish_ack),
            end_to_end: Brief::of(&w.end_to_end),
            send_delay: Brief::of(&w.send_delay),
        };
        if !self.run.config.quiet {
            eprintln!("{}", progress_line(&point, &w));
        }
        if let Some(log) = self.hdr_log.as_mut() {
            let offset = self.last.saturating_duration_since(self.run.start);
            log.write_interval(offset, interval, &w)?;
        }
        self.series.push(point);
        self.last = now;
        Ok(())
    }

    fn finish(mut self) -> anyhow::Result<Vec<Point>> {
        if let Some(log) = self.hdr_log.take() {
            log.finish()?;
        }
        Ok(self.series)
    }
}

fn ms(us: u64) -> String {
    format!("{:.2}ms", us as f64 / 1000.0)
}

fn progress_line(p: &Point, w: &Window) -> String {
    let phase = match p.phase {
        Phase::Warmup => "warmup",
        Phase::Measure => "measure",
        Phase::Drain => "drain",
    };
    let mut line = format!(
        "[{:>5.1}s {phase:<7}] pub {:>8.0} msg/s {:>6.1} MB/s ack p50 {} p99 {} max {}",
        p.t_s,
        p.publish_msgs_per_s,
        p.publish_mb_per_s,
        ms(p.publish_ack.p50_us),
        ms(p.publish_ack.p99_us),
        ms(p.publish_ack.max_us),
    );
    line.push_str(&format!(
        " | dlv {:>8.0} msg/s e2e p50 {} p99 {} | backlog {}",
        p.deliver_msgs_per_s,
        ms(p.end_to_end.p50_us),
        ms(p.end_to_end.p99_us),
        p.backlog
    ));
    if p.send_delay.p99_us > 1000 {
        line.push_str(&format!(" | send delay p99 {}", ms(p.send_delay.p99_us)));
    }
    if p.errors > 0 {
        let detail: Vec<String> =
            w.errors.iter().flat_map(|(op, codes)| codes.iter().map(move |(c, n)| format!("{op} {c}: {n}"))).collect();
        line.push_str(&format!(" | errors {}", detail.join(", ")));
    }
    line
}

// ------------------------------------------------------------------------------------------
// Producers
// ------------------------------------------------------------------------------------------

/// One publish request in flight.
struct Sent {
    intended: Instant,
    sent: Instant,
    messages: u64,
    bytes: u64,
    measured: bool,
}

struct Completion {
    sent: Sent,
    done: Instant,
    result: Result<Result<PublishResponse, Status>, tokio::time::error::Elapsed>,
}

async fn publish(mut client: Client, messages: Vec<Message>, timeout: Duration, sent: Sent) -> Completion {
    let result = tokio::time::timeout(timeout, client.publish(messages)).await;
    Completion { sent, done: Instant::now(), result }
}

fn record_completion(run: &Run, recorder: &RecorderHandle, c: Completion) {
    let (latency, delay) = corrected_latency(c.sent.intended, c.sent.sent, c.done);
    let n = c.sent.messages;
    let mut r = recorder.lock();
    let r = &mut *r;
    let windows: &mut [&mut Window] =
        if c.sent.measured { &mut [&mut r.interval, &mut r.total] } else { &mut [&mut r.interval] };
    let ok = match &c.result {
        Ok(Ok(response)) => {
            if response.results.len() as u64 != n {
                for w in windows.iter_mut() {
                    w.record_error("publish (result count differs from batch size)", Code::Internal);
                }
            }
            true
        }
        _ => false,
    };
    for w in windows.iter_mut() {
        w.publish_requests += 1;
        let _ = w.send_delay.record(micros(delay));
        match &c.result {
            Ok(Ok(_)) => {
                let _ = w.publish_ack.record_n(micros(latency), n);
                w.published += n;
                w.published_bytes += c.sent.bytes;
                w.last_ack = Some(c.done);
            }
            Ok(Err(status)) => {
                w.failed += n;
                w.record_error("publish", status.code());
            }
            Err(_) => {
                w.failed += n;
                w.record_error("publish (client timeout)", Code::DeadlineExceeded);
            }
        }
    }
    if ok {
        run.published_ok.fetch_add(n, Ordering::Relaxed);
    }
}

async fn connect(run: &Run, recorder: &RecorderHandle, what: &str) -> Option<Client> {
    let mut stop = run.stop.clone();
    loop {
        if *stop.borrow() || Instant::now() >= run.end {
            return None;
        }
        match run.connection.connect().await {
            Ok(c) => return Some(c),
            Err(s) => {
                let mut r = recorder.lock();
                r.interval.record_error(what, s.code());
                r.total.record_error(what, s.code());
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(RETRY_PAUSE) => {}
            _ = stopped(&mut stop) => return None,
        }
    }
}

async fn producer(run: Arc<Run>, index: u32, mailboxes: Arc<Vec<String>>, recorder: RecorderHandle) {
    let config = run.config.clone();
    let Some(client) = connect(&run, &recorder, "connect").await else { return };
    tokio::time::sleep_until(run.start.into()).await;
    let schedule = config.rate.map(|rate| Schedule::new(run.start, rate, config.producers, index, config.batch));
    let quota = config.count.map(|c| producer_quota(c, config.producers, index));
    let mut rng = SmallRng::seed_from_u64(config.seed.wrapping_add(u64::from(index).wrapping_mul(0x9E37_79B9_7F4A_7C15)));
    let window = config.inflight as usize;
    let mut stop = run.stop.clone();
    let mut inflight = FuturesUnordered::new();
    let mut measured_sent = 0u64;
    let mut seq = 0u64;
    let mut k = 0u64;
    let mut mailbox = index as usize % mailboxes.len();

    'produce: loop {
        if *stop.borrow() || quota.is_some_and(|q| measured_sent >= q) {
            break;
        }
        let due = schedule.map(|s| s.intended(k));
        if due.is_some_and(|d| d >= run.end) {
            break;
        }
        // Wait until the batch is due and a slot is free.
        loop {
            let now = Instant::now();
            if now >= run.end {
                if let Some(s) = schedule {
                    // Behind schedule at the end: what was due but never sent.
                    let due = s.due_before(run.end.saturating_duration_since(run.start));
                    let mut unsent = due.saturating_sub(k).saturating_mul(u64::from(config.batch));
                    if let Some(q) = quota {
                        unsent = unsent.min(q.saturating_sub(measured_sent));
                    }
                    run.unsent.fetch_add(unsent, Ordering::Relaxed);
                }
                break 'produce;
            }
            let slot_free = inflight.len() < window;
            if slot_free && due.is_none_or(|d| now >= d) {
                break;
            }
            let wake = match due {
                Some(d) if slot_free => d,
                _ => run.end,
            };
            tokio::select! {
                biased;
                _ = stopped(&mut stop) => break 'produce,
                Some(done) = inflight.next(), if !inflight.is_empty() => record_completion(&run, &recorder, done),
                _ = tokio::time::sleep_until(wake.into()) => {}
            }
        }
        let sent_at = Instant::now();
        let intended = due.unwrap_or(sent_at);
        let measured = intended >= run.warmup_end;
        let mut n = u64::from(config.batch);
        if let (true, Some(q)) = (measured, quota) {
            n = n.min(q - measured_sent);
        }
        let intended_unix_ns = run.clock.unix_ns(intended).to_string();
        let recipient = &mailboxes[mailbox];
        let mut bytes = 0u64;
        let messages: Vec<Message> = (0..n)
            .map(|_| {
                let size = config.size.sample(&mut rng);
                bytes += size;
                seq += 1;
                Message {
                    id: format!("{}-{index}-{seq}", run.run_id),
                    recipient: recipient.clone(),
                    headers: [(SENT_HEADER.to_owned(), intended_unix_ns.clone())].into_iter().collect(),
                    payload: run.payload(size, &mut rng),
                    ordering_key: (config.ordering_keys > 0)
                        .then(|| format!("key-{}", rng.random_range(0..config.ordering_keys))),
                    ttl_ms: None,
                    sender: String::new(),
                }
            })
            .collect();
        if measured {
            measured_sent += n;
        }
        let sent = Sent { intended, sent: sent_at, messages: n, bytes, measured };
        inflight.push(publish(client.clone(), messages, config.request_timeout, sent));
        k += 1;
        mailbox = (mailbox + 1) % mailboxes.len();
    }
    // Let the requests in flight finish (each is bounded by the request timeout).
    while let Some(done) = inflight.next().await {
        record_completion(&run, &recorder, done);
    }
}

// ------------------------------------------------------------------------------------------
// Consumers
// ------------------------------------------------------------------------------------------

fn record_subscribe_error(recorder: &RecorderHandle, code: &str) {
    let mut r = recorder.lock();
    let r = &mut *r;
    for w in [&mut r.interval, &mut r.total] {
        *w.errors.entry("subscribe".to_owned()).or_default().entry(code.to_owned()).or_default() += 1;
    }
}

fn record_delivery(run: &Run, recorder: &RecorderHandle, d: Delivery) -> Option<Position> {
    let now_unix_ns = stats::unix_ns_now();
    let now = Instant::now();
    let position = d.position;
    let message = d.message.unwrap_or_default();
    let sent_ns = message.headers.get(SENT_HEADER).and_then(|v| v.parse::<u64>().ok());
    let mut r = recorder.lock();
    let r = &mut *r;
    match sent_ns {
        Some(sent_ns) if run.is_ours(&message.id) => {
            let measured = sent_ns >= run.warmup_end_unix_ns;
            let windows: &mut [&mut Window] = if measured { &mut [&mut r.interval, &mut r.total] } else { &mut [&mut r.interval] };
            if d.attempt > 1 {
                for w in windows.iter_mut() {
                    w.redelivered += 1;
                }
            } else {
                let latency = now_unix_ns.saturating_sub(sent_ns) / 1000;
                for w in windows.iter_mut() {
                    let _ = w.end_to_end.record(latency);
                    w.delivered += 1;
                    w.delivered_bytes += message.payload.len() as u64;
                    w.last_delivery = Some(now);
                }
                run.delivered_first.fetch_add(1, Ordering::Relaxed);
            }
        }
        _ => {
            r.interval.foreign += 1;
            r.total.foreign += 1;
        }
    }
    position
}

/// Acks the pending deliveries and grants as many credits back.
async fn flush(sub: &Subscription, pending: &mut Vec<Position>) -> Result<(), Status> {
    if pending.is_empty() {
        return Ok(());
    }
    let n = pending.len() as u32;
    sub.ack(std::mem::take(pending)).await?;
    sub.credit(n).await
}

async fn consumer(run: Arc<Run>, mailbox: String, recorder: RecorderHandle) {
    let config = run.config.clone();
    let mut stop = run.consumers_stop.clone();
    'subscribe: loop {
        if *stop.borrow() {
            return;
        }
        let opened = async {
            let mut client = run.connection.connect().await?;
            client.subscribe(&mailbox, config.credits).await
        };
        let mut sub = tokio::select! {
            r = opened => match r {
                Ok(sub) => sub,
                Err(s) => {
                    record_subscribe_error(&recorder, stats::code_name(s.code()));
                    tokio::select! {
                        _ = tokio::time::sleep(RETRY_PAUSE) => continue 'subscribe,
                        _ = stopped(&mut stop) => return,
                    }
                }
            },
            _ = stopped(&mut stop) => return,
        };
        let mut pending: Vec<Position> = Vec::new();
        let mut oldest = Instant::now();
        loop {
            let wait = if pending.is_empty() {
                Duration::from_millis(100)
            } else {
                ACK_FLUSH.saturating_sub(oldest.elapsed()).max(Duration::from_micros(100))
            };
            let event = tokio::select! {
                biased;
                _ = stopped(&mut stop) => {
                    let _ = flush(&sub, &mut pending).await;
                    return;
                }
                e = sub.next_event(wait) => e,
            };
            let failure = match event {
                Ok(Some(Event::Delivery(d))) => {
                    if let Some(p) = record_delivery(&run, &recorder, d) {
                        if pending.is_empty() {
                            oldest = Instant::now();
                        }
                        pending.push(p);
                    }
                    None
                }
                Ok(Some(Event::Acked(positions))) => {
                    let mut r = recorder.lock();
                    r.interval.acks_confirmed += positions.len() as u64;
                    r.total.acks_confirmed += positions.len() as u64;
                    None
                }
                Ok(None) => Some("STREAM_ENDED_BY_SERVER".to_owned()),
                Err(s) if s.code() == Code::DeadlineExceeded => None,
                Err(s) => Some(stats::code_name(s.code()).to_owned()),
            };
            if let Some(code) = failure {
                record_subscribe_error(&recorder, &code);
                tokio::select! {
                    _ = tokio::time::sleep(RETRY_PAUSE) => continue 'subscribe,
                    _ = stopped(&mut stop) => return,
                }
            }
            if !pending.is_empty() && (pending.len() >= config.ack_batch as usize || oldest.elapsed() >= ACK_FLUSH) {
                if let Err(s) = flush(&sub, &mut pending).await {
                    record_subscribe_error(&recorder, &format!("ack: {}", stats::code_name(s.code())));
                    continue 'subscribe;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::SizeDist;

    #[test]
    fn count_is_split_evenly_over_producers() {
        let quotas: Vec<u64> = (0..4).map(|i| producer_quota(10, 4, i)).collect();
        assert_eq!(quotas, vec![3, 3, 2, 2]);
        assert_eq!((0..3).map(|i| producer_quota(1_000_000, 3, i)).sum::<u64>(), 1_000_000);
    }

    #[test]
    fn every_mailbox_gets_a_consumer_stream() {
        assert_eq!(consumer_streams(0, 10), 0);
        assert_eq!(consumer_streams(4, 1), 4);
        assert_eq!(consumer_streams(4, 100), 100);
    }

    #[test]
    fn sizes_stay_in_range() {
        let mut rng = SmallRng::seed_from_u64(7);
        let d = SizeDist::Uniform { min: 512, max: 4096 };
        let samples: Vec<u64> = (0..10_000).map(|_| d.sample(&mut rng)).collect();
        assert!(samples.iter().all(|&s| (512..=4096).contains(&s)));
        let mean = samples.iter().sum::<u64>() as f64 / samples.len() as f64;
        assert!((mean - d.mean()).abs() < 60.0, "mean {mean}");
        assert_eq!(SizeDist::Fixed(1024).sample(&mut rng), 1024);
    }
}

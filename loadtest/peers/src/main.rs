//! `kerwen-peer-bench`: load client for Kerwen's peer brokers, measured with the same method as
//! `kerwen-loadtest` so that the figures can be put side by side.
//!
//! Peers: NATS JetStream (publish with acks, durable pull consumer with explicit acks) and
//! RabbitMQ over AMQP 0.9.1 (publisher confirms, quorum queue, manual consumer acks).
//!
//! Method (see `docs/performance.md`):
//!
//! - payloads of `--size` bytes (1 KiB by default); each starts with the run id and the message's
//!   *intended* send time ([`stats::HEADER_LEN`] bytes), the rest is filler;
//! - `--producers` connections publish; each keeps at most `--inflight` publishes awaiting their
//!   ack. **Closed loop** (default): the next publish leaves as soon as a slot frees, which finds
//!   the maximum rate. **Open loop** (`--rate N`): message `k` of each producer is due at a fixed
//!   schedule (all producers together offer N msg/s) and latencies are measured from that
//!   intended time, so a stall counts for every message that should have been sent meanwhile
//!   (no coordinated omission); `send delay` shows how late publishes actually left;
//! - `--consumers` connections consume concurrently and ack every delivery explicitly;
//! - timeline: warm-up `[0, warmup)` (excluded), measure `[warmup, warmup + duration)`, then a
//!   drain (at most `--drain`) that waits for outstanding acks and deliveries; only messages
//!   whose intended send time is in the measure window count;
//! - throughput = measured messages acked / (last measured ack − end of warm-up), the same
//!   definition as `kerwen-loadtest`; MB/s counts payload bytes (10^6 bytes per MB);
//! - publish→ack and end-to-end (publish→first delivery) percentiles come from HdrHistograms.
//!
//! Each run purges the stream / queue first (and recreates the JetStream consumer), so runs do
//! not see each other's messages.

mod amqp;
mod nats;
mod stats;

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context as _};
use bytes::Bytes;
use clap::{Parser, Subcommand};
use futures::future::BoxFuture;
use tokio::sync::Semaphore;

use crate::stats::{Recorder, Schedule, HEADER_LEN};

/// Resolves when the broker has acked one publish (JetStream PubAck, AMQP basic.ack confirm).
pub type AckFuture = BoxFuture<'static, anyhow::Result<()>>;

/// One producer connection.
pub trait Publisher: Send + 'static {
    /// Sends one message; the returned future resolves when the broker acks it.
    fn publish(&mut self, payload: Bytes) -> BoxFuture<'_, anyhow::Result<AckFuture>>;
}

/// One consumer connection, already subscribed.
pub trait Consumer: Send + 'static {
    /// Receives, records and acks deliveries until the subscription ends (or the task is aborted).
    fn run(self: Box<Self>, rec: Arc<Recorder>) -> BoxFuture<'static, ()>;
}

/// Pause after a failed publish, so a broken connection does not spin.
const ERROR_PAUSE: Duration = Duration::from_millis(50);
/// Time between connecting and the start of the load, for subscriptions to settle.
const START_DELAY: Duration = Duration::from_millis(500);
/// Default in-flight publishes per producer in open loop: high enough not to throttle the
/// schedule unless the broker stalls.
const OPEN_LOOP_INFLIGHT: usize = 4096;

#[derive(Parser, Debug)]
#[command(
    version,
    about = "Load client for Kerwen's peer brokers (NATS JetStream, RabbitMQ quorum queues)"
)]
struct Cli {
    #[command(subcommand)]
    peer: Peer,
    #[command(flatten)]
    load: Load,
}

#[derive(Subcommand, Debug)]
enum Peer {
    /// NATS JetStream: publish with acks, durable pull consumer with explicit acks.
    Nats(nats::Args),
    /// RabbitMQ (AMQP 0.9.1): publisher confirms, quorum queue, manual consumer acks.
    Amqp(amqp::Args),
}

/// The load, common to all peers.
#[derive(clap::Args, Debug, Clone)]
pub struct Load {
    /// Producer connections.
    #[arg(long, global = true, default_value_t = 4)]
    pub producers: usize,
    /// Publishes awaiting their ack per producer [default: 64 closed loop, 4096 open loop].
    #[arg(long, global = true)]
    pub inflight: Option<usize>,
    /// Consumer connections (0: publish only).
    #[arg(long, global = true, default_value_t = 4)]
    pub consumers: usize,
    /// Unacked deliveries per consumer (AMQP prefetch, max 65535; JetStream pull batch).
    #[arg(long, global = true, default_value_t = 1000)]
    pub prefetch: usize,
    /// Payload bytes per message (at least 16).
    #[arg(long, global = true, default_value_t = 1024)]
    pub size: usize,
    /// Length of the measure window.
    #[arg(long, global = true, default_value = "20s", value_parser = parse_duration)]
    pub duration: Duration,
    /// Warm-up before the measure window, excluded from the results.
    #[arg(long, global = true, default_value = "2s", value_parser = parse_duration)]
    pub warmup: Duration,
    /// After the measure window: longest wait for outstanding acks, then for deliveries.
    #[arg(long, global = true, default_value = "10s", value_parser = parse_duration)]
    pub drain: Duration,
    /// Open loop: total msg/s offered by all producers together. Without it: closed loop.
    #[arg(long, global = true)]
    pub rate: Option<u64>,
    /// Label for the one-line summary (e.g. nats-default).
    #[arg(long, global = true, default_value = "")]
    pub label: String,
    /// Only create (or check) the stream / queue, then exit.
    #[arg(long, global = true)]
    pub setup_only: bool,
}

impl Load {
    pub fn inflight(&self) -> usize {
        self.inflight
            .unwrap_or(if self.rate.is_some() {
                OPEN_LOOP_INFLIGHT
            } else {
                64
            })
            .max(1)
    }

    fn mode(&self) -> String {
        let shape = format!(
            "{} producers x {} in flight, {} consumers (prefetch {}), {} B",
            self.producers,
            self.inflight(),
            self.consumers,
            self.prefetch,
            self.size
        );
        match self.rate {
            Some(r) => format!("open loop {r} msg/s, {shape}"),
            None => format!("closed loop, {shape}"),
        }
    }
}

/// Parses `250ms`, `20s`, `2m` or a plain number of seconds.
fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, unit) = match s.find(|c: char| !(c.is_ascii_digit() || c == '.')) {
        Some(i) => (&s[..i], &s[i..]),
        None => (s, "s"),
    };
    let v: f64 = num.parse().map_err(|_| format!("bad duration {s:?}"))?;
    let secs = match unit {
        "ms" => v / 1_000.0,
        "s" => v,
        "m" => v * 60.0,
        _ => return Err(format!("bad duration unit in {s:?} (ms, s, m)")),
    };
    Duration::try_from_secs_f64(secs).map_err(|e| format!("bad duration {s:?}: {e}"))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let load = cli.load;
    if load.size < HEADER_LEN {
        bail!("--size must be at least {HEADER_LEN} bytes");
    }
    if load.producers == 0 {
        bail!("--producers must be at least 1");
    }
    let (peer, pubs, cons) = match cli.peer {
        Peer::Nats(args) => {
            let description = nats::setup(&args).await?;
            if load.setup_only {
                println!("{description}");
                return Ok(());
            }
            nats::reset(&args).await?;
            let pubs = nats::publishers(&args, load.producers).await?;
            let cons = nats::consumers(&args, load.consumers, load.prefetch).await?;
            (description, pubs, cons)
        }
        Peer::Amqp(args) => {
            let description = amqp::setup(&args).await?;
            if load.setup_only {
                println!("{description}");
                return Ok(());
            }
            amqp::reset(&args).await?;
            let pubs = amqp::publishers(&args, load.producers).await?;
            let cons = amqp::consumers(&args, load.consumers, load.prefetch).await?;
            (description, pubs, cons)
        }
    };
    run(&peer, Arc::new(load), pubs, cons).await
}

/// Runs the load and prints the report.
async fn run(
    peer: &str,
    load: Arc<Load>,
    pubs: Vec<Box<dyn Publisher>>,
    cons: Vec<Box<dyn Consumer>>,
) -> anyhow::Result<()> {
    let run_id = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .context("clock before 1970")?
        .as_nanos() as u64;
    let rec = Arc::new(Recorder::new(
        run_id,
        Instant::now() + START_DELAY,
        load.warmup,
        load.duration,
    ));
    eprintln!("peer: {peer}\nmode: {}", load.mode());

    let consumers: Vec<_> = cons
        .into_iter()
        .map(|c| tokio::spawn(c.run(rec.clone())))
        .collect();
    let ticker = tokio::spawn(progress(rec.clone()));
    let producers: Vec<_> = pubs
        .into_iter()
        .enumerate()
        .map(|(i, p)| tokio::spawn(produce(p, i, load.clone(), rec.clone())))
        .collect();
    for p in producers {
        p.await.context("producer task")?;
    }

    // Drain: wait until every acked message of this run was delivered once.
    if !consumers.is_empty() {
        let deadline = Instant::now() + load.drain;
        while rec.delivered_all.load(Ordering::Relaxed) < rec.acked_all.load(Ordering::Relaxed)
            && Instant::now() < deadline
        {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    for c in &consumers {
        c.abort();
    }
    ticker.abort();
    report(peer, &load, &rec);
    Ok(())
}

/// One producer: publishes until the end of the measure window, then waits for its acks.
async fn produce(mut p: Box<dyn Publisher>, index: usize, load: Arc<Load>, rec: Arc<Recorder>) {
    let inflight = load.inflight();
    let slots = Arc::new(Semaphore::new(inflight));
    let schedule = load.rate.map(|r| Schedule::new(r, load.producers, index));
    let end = rec.t0 + Duration::from_nanos(rec.end_ns);
    let mut payload = vec![0x5a_u8; load.size];
    tokio::time::sleep_until(rec.t0.into()).await;

    for k in 0u64.. {
        let due = schedule.map(|s| rec.t0 + s.offset(k));
        if let Some(due) = due {
            if due >= end {
                break;
            }
            tokio::time::sleep_until(due.into()).await;
        }
        let Ok(slot) = slots.clone().acquire_owned().await else {
            break;
        };
        // Closed loop: the message is meant to leave now that a slot is free.
        let intended = match due {
            Some(due) => due,
            None => {
                let now = Instant::now();
                if now >= end {
                    break;
                }
                now
            }
        };
        let intended_ns = u64::try_from(intended.saturating_duration_since(rec.t0).as_nanos())
            .unwrap_or(u64::MAX);
        stats::write_header(&mut payload, rec.run_id, intended_ns);
        rec.record_sent(intended_ns, rec.now_ns());
        match p.publish(Bytes::copy_from_slice(&payload)).await {
            Ok(ack) => {
                let rec = rec.clone();
                tokio::spawn(async move {
                    match ack.await {
                        Ok(()) => rec.record_ack(intended_ns, rec.now_ns()),
                        Err(e) => rec.record_error(short(&format!("publish ack: {e:#}"))),
                    }
                    drop(slot);
                });
            }
            Err(e) => {
                rec.record_error(short(&format!("publish: {e:#}")));
                drop(slot);
                tokio::time::sleep(ERROR_PAUSE).await;
            }
        }
    }

    // Wait for this producer's outstanding acks.
    let all = u32::try_from(inflight).unwrap_or(u32::MAX);
    let _ = tokio::time::timeout(load.drain, slots.acquire_many(all)).await;
    let missing = inflight.saturating_sub(slots.available_permits());
    rec.unconfirmed.fetch_add(missing as u64, Ordering::Relaxed);
}

/// Error messages can embed ids; keep the kind recognisable and the table short.
fn short(s: &str) -> String {
    s.chars().take(100).collect()
}

/// Prints acked and delivered messages per second to stderr.
async fn progress(rec: Arc<Recorder>) {
    tokio::time::sleep_until(rec.t0.into()).await;
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.tick().await;
    let (mut acked, mut delivered) = (0, 0);
    loop {
        tick.tick().await;
        let a = rec.acked_all.load(Ordering::Relaxed);
        let d = rec.delivered_all.load(Ordering::Relaxed);
        let errors: u64 = rec.errors.lock().map(|e| e.values().sum()).unwrap_or(0);
        eprintln!(
            "t={:>5.1}s  acked {:>7}/s  delivered {:>7}/s  errors {}",
            rec.t0.elapsed().as_secs_f64(),
            a - acked,
            d - delivered,
            errors
        );
        (acked, delivered) = (a, d);
    }
}

fn report(peer: &str, load: &Load, rec: &Recorder) {
    let window = |last_ns: u64| Duration::from_nanos(last_ns.saturating_sub(rec.warmup_end_ns));
    let rate = |n: u64, w: Duration| {
        if w.is_zero() {
            0.0
        } else {
            n as f64 / w.as_secs_f64()
        }
    };
    let acked = rec.acked_measured.load(Ordering::Relaxed);
    let delivered = rec.delivered_measured.load(Ordering::Relaxed);
    let ack_window = window(rec.last_ack_ns.load(Ordering::Relaxed));
    let del_window = window(rec.last_delivery_ns.load(Ordering::Relaxed));
    let sent = rec.sent_measured.load(Ordering::Relaxed);
    let bytes = load.size as f64;
    let pub_rate = rate(acked, ack_window);
    let errors = rec.errors.lock().unwrap_or_else(|p| p.into_inner()).clone();
    let error_total: u64 = errors.values().sum();

    println!("peer:      {peer}");
    println!("mode:      {}", load.mode());
    println!(
        "window:    warm-up {:?}, measure {:?}, drain <= {:?} (latencies from the intended send time)",
        load.warmup, load.duration, load.drain
    );
    println!(
        "published: {acked} acked of {sent} sent in window, {:.0} msg/s, {:.2} MB/s (over {:.2} s)",
        pub_rate,
        pub_rate * bytes / 1e6,
        ack_window.as_secs_f64()
    );
    println!(
        "delivered: {delivered} first deliveries, {:.0} msg/s, {:.2} MB/s (over {:.2} s)",
        rate(delivered, del_window),
        rate(delivered, del_window) * bytes / 1e6,
        del_window.as_secs_f64()
    );
    println!("publish->ack: {}", stats::percentiles(&rec.ack));
    println!("end-to-end:   {}", stats::percentiles(&rec.e2e));
    if load.rate.is_some() {
        println!("send delay:   {}", stats::percentiles(&rec.send_delay));
    }
    println!(
        "unconfirmed at end: {}, redelivered: {}, foreign: {}, errors: {}",
        rec.unconfirmed.load(Ordering::Relaxed),
        rec.redelivered.load(Ordering::Relaxed),
        rec.foreign.load(Ordering::Relaxed),
        error_total
    );
    for (kind, n) in &errors {
        println!("  {n:>8}  {kind}");
    }
    let (a50, a99) = stats::p50_p99(&rec.ack);
    let (e50, e99) = stats::p50_p99(&rec.e2e);
    println!(
        "SUMMARY label={} mode={} msg/s={:.0} MB/s={:.2} ack_p50_ms={a50} ack_p99_ms={a99} e2e_p50_ms={e50} e2e_p99_ms={e99} errors={error_total}",
        if load.label.is_empty() { "-" } else { &load.label },
        match load.rate {
            Some(r) => format!("open{r}"),
            None => format!("closed{}x{}", load.producers, load.inflight()),
        },
        pub_rate,
        pub_rate * bytes / 1e6,
    );
}

#[cfg(test)]
mod tests {
    use super::parse_duration;
    use std::time::Duration;

    #[test]
    fn durations_parse() {
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("20s"), Ok(Duration::from_secs(20)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert_eq!(parse_duration("3"), Ok(Duration::from_secs(3)));
        assert!(parse_duration("3h").is_err());
    }
}

//! Run configuration: command-line flags, TOML scenario files and their resolution into one
//! validated [`Config`].
//!
//! Every flag can also be set in a scenario file (`--scenario FILE`) under the same name with
//! underscores (`ordering_keys = 16`); flags given on the command line override the file.
//! Sizes are written like `1KiB`, `512B`, `4MB` or `uniform:512B..4KiB`; durations like `20s`,
//! `500ms`, `2m`.

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Args, Parser};
use kerwen_node::scenario::Topology;
use serde::Deserialize;

use crate::flows::{Exchange, FlowSpec};

/// Default endpoints: the three nodes of `kerwen dev`.
pub const DEFAULT_ENDPOINTS: &str = kerwen_node::client::DEFAULT_ENDPOINTS;
/// Prefix of the mailboxes the load generator uses; mailbox `n` is `<prefix><n>`.
pub const MAILBOX_PREFIX: &str = "TM/GOV/LOAD/bench/mailbox-";
/// Largest payload the tool will generate (the node's own limit is usually lower).
pub const MAX_SIZE_BYTES: u64 = 256 * 1024 * 1024;
/// Upper bound on the run when only `--count` bounds it.
pub const COUNT_ONLY_TIME_LIMIT: Duration = Duration::from_secs(600);

#[derive(Debug, Parser)]
#[command(
    name = "kerwen-loadtest",
    version,
    about = "Load generator for a Kerwen cluster: closed- or open-loop publishing, consuming, \
             coordinated-omission-corrected HdrHistogram latencies, JSON and HdrHistogram log reports."
)]
pub struct Cli {
    /// TOML scenario file with any of the settings below (flags override it).
    #[arg(long, value_name = "FILE")]
    pub scenario: Option<PathBuf>,
    #[command(flatten)]
    pub knobs: Knobs,
}

/// The tunable settings, shared by the command line and scenario files. `None` means "not
/// given here" so that a flag can override a file value and a file value a default.
#[derive(Debug, Clone, Default, Args, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Knobs {
    /// Name of the run (reported in the summary and the JSON report).
    #[arg(long)]
    pub name: Option<String>,
    /// Free-text description (scenario files only).
    #[arg(skip)]
    pub description: Option<String>,
    /// Comma-separated endpoints of a running cluster [default: the `kerwen dev` nodes].
    #[arg(long, value_name = "HOST:PORT,...", conflicts_with = "embedded")]
    pub endpoint: Option<String>,
    /// Start a local 3-node cluster inside this process (fresh temporary data directories).
    #[arg(long)]
    #[serde(default)]
    pub embedded: bool,
    /// Client profile of a running cluster: its endpoints, CA and an admin certificate, and
    /// the PKI directory where the load's subsystem (`TM/GOV/LOAD/bench`) gets its
    /// certificate [default: ~/.config/kerwen/profile.toml, as `kerwen dev` writes it].
    #[arg(long, conflicts_with = "embedded")]
    pub profile: Option<PathBuf>,
    /// Plaintext: for a cluster run with `--insecure`, or with `--embedded`, an embedded
    /// cluster without TLS (to measure what TLS costs).
    #[arg(long)]
    #[serde(default)]
    pub insecure: bool,
    /// With `--embedded`: nodes that sign no evidence (to measure what signing costs).
    #[arg(long, requires = "embedded")]
    #[serde(default)]
    pub no_evidence: bool,
    /// Send every publish and open every subscription at the client's endpoint, which
    /// forwards to the shard leaders, instead of going straight to the leaders (to measure
    /// what direct routing saves).
    #[arg(long)]
    #[serde(default)]
    pub forwarded: bool,
    /// Data shards of the embedded cluster [default: 3].
    #[arg(long)]
    pub shards: Option<u32>,
    /// Number of producer tasks (each with its own connection) [default: 4].
    #[arg(long)]
    pub producers: Option<u32>,
    /// Number of consumer tasks; 0 publishes only [default: 4].
    #[arg(long)]
    pub consumers: Option<u32>,
    /// Number of mailboxes (`TM/GOV/LOAD/bench/mailbox-<n>`) [default: 1].
    #[arg(long)]
    pub mailboxes: Option<u32>,
    /// Partitions of each mailbox created; 0 = the cluster default [default: 4].
    #[arg(long)]
    pub partitions: Option<u32>,
    /// Payload size: fixed (`1KiB`) or `uniform:MIN..MAX` [default: 1KiB].
    #[arg(long)]
    pub size: Option<String>,
    /// Messages per publish request [default: 100].
    #[arg(long)]
    pub batch: Option<u32>,
    /// Publish requests in flight per producer [default: 4].
    #[arg(long)]
    pub inflight: Option<u32>,
    /// Distinct ordering keys (`key-<n>`), 0 = no ordering key [default: 0].
    #[arg(long)]
    pub ordering_keys: Option<u32>,
    /// Open loop at this total rate in msg/s; 0 = closed loop, as fast as acks allow [default: 0].
    #[arg(long)]
    pub rate: Option<u64>,
    /// Warm-up excluded from the results [default: 2s].
    #[arg(long)]
    pub warmup: Option<String>,
    /// Measured duration after the warm-up [default: 60s, or 10m as a bound with --count].
    #[arg(long)]
    pub duration: Option<String>,
    /// Stop after this many measured messages (published after the warm-up).
    #[arg(long)]
    pub count: Option<u64>,
    /// How long consumers may take to drain the backlog after publishing stops [default: 10s].
    #[arg(long)]
    pub drain: Option<String>,
    /// Delivery credits each consumer stream keeps outstanding [default: 1000].
    #[arg(long)]
    pub credits: Option<u32>,
    /// Deliveries acked per ack request (also flushed after 5 ms) [default: 100].
    #[arg(long)]
    pub ack_batch: Option<u32>,
    /// Client-side timeout of one publish request [default: 30s].
    #[arg(long)]
    pub request_timeout: Option<String>,
    /// Seed of the payload and size generator [default: 1].
    #[arg(long)]
    pub seed: Option<u64>,
    /// Write the full JSON report to this file.
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,
    /// Write per-second histograms in HdrHistogram interval log format to this file.
    #[arg(long, value_name = "FILE")]
    pub hdr_log: Option<PathBuf>,
    /// No per-second progress lines on stderr.
    #[arg(long)]
    #[serde(default)]
    pub quiet: bool,
    /// Multiplies the rate of every flow of an exchange scenario (one with `[[flow]]`s, like
    /// `scenarios/smev.toml`) [default: 1].
    #[arg(long)]
    pub rate_scale: Option<f64>,
    /// An exchange scenario's topology (scenario files only; see `kerwen_node::scenario`).
    #[arg(skip)]
    pub topology: Option<Topology>,
    /// An exchange scenario's flows (scenario files only; see [`crate::flows`]).
    #[arg(skip)]
    #[serde(default)]
    pub flow: Vec<FlowSpec>,
}

impl Knobs {
    /// Fills every setting not given here from `file`.
    pub fn or(self, file: Knobs) -> Knobs {
        // A command-line endpoint overrides an embedded cluster from the file and vice versa.
        let (endpoint, embedded) = if self.endpoint.is_some() || self.embedded {
            (self.endpoint, self.embedded)
        } else {
            (file.endpoint, file.embedded)
        };
        Knobs {
            name: self.name.or(file.name),
            description: self.description.or(file.description),
            endpoint,
            embedded,
            shards: self.shards.or(file.shards),
            profile: self.profile.or(file.profile),
            insecure: self.insecure || file.insecure,
            no_evidence: self.no_evidence || file.no_evidence,
            forwarded: self.forwarded || file.forwarded,
            producers: self.producers.or(file.producers),
            consumers: self.consumers.or(file.consumers),
            mailboxes: self.mailboxes.or(file.mailboxes),
            partitions: self.partitions.or(file.partitions),
            size: self.size.or(file.size),
            batch: self.batch.or(file.batch),
            inflight: self.inflight.or(file.inflight),
            ordering_keys: self.ordering_keys.or(file.ordering_keys),
            rate: self.rate.or(file.rate),
            warmup: self.warmup.or(file.warmup),
            duration: self.duration.or(file.duration),
            count: self.count.or(file.count),
            drain: self.drain.or(file.drain),
            credits: self.credits.or(file.credits),
            ack_batch: self.ack_batch.or(file.ack_batch),
            request_timeout: self.request_timeout.or(file.request_timeout),
            seed: self.seed.or(file.seed),
            json: self.json.or(file.json),
            hdr_log: self.hdr_log.or(file.hdr_log),
            quiet: self.quiet || file.quiet,
            rate_scale: self.rate_scale.or(file.rate_scale),
            topology: self.topology.or(file.topology),
            flow: if self.flow.is_empty() { file.flow } else { self.flow },
        }
    }
}

/// Parses a scenario file's text.
pub fn parse_scenario(text: &str) -> anyhow::Result<Knobs> {
    Ok(toml::from_str(text)?)
}

/// Where the load goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// A running cluster: its endpoints (default: the profile's) and how to authenticate.
    Cluster { endpoints: Option<String>, profile: Option<PathBuf>, insecure: bool },
    /// A 3-node cluster started in this process (plaintext with `insecure`).
    Embedded { shards: u32, insecure: bool, evidence: bool },
}

/// A payload size: fixed, or drawn uniformly from an inclusive range.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SizeDist {
    Fixed(u64),
    Uniform { min: u64, max: u64 },
}

impl SizeDist {
    pub fn max(&self) -> u64 {
        match *self {
            SizeDist::Fixed(n) => n,
            SizeDist::Uniform { max, .. } => max,
        }
    }

    /// A size drawn from the distribution.
    pub fn sample(&self, rng: &mut impl rand::Rng) -> u64 {
        match *self {
            SizeDist::Fixed(n) => n,
            SizeDist::Uniform { min, max } => rng.random_range(min..=max),
        }
    }

    pub fn mean(&self) -> f64 {
        match *self {
            SizeDist::Fixed(n) => n as f64,
            SizeDist::Uniform { min, max } => (min as f64 + max as f64) / 2.0,
        }
    }
}

impl fmt::Display for SizeDist {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            SizeDist::Fixed(n) => write!(f, "{}", format_bytes(n)),
            SizeDist::Uniform { min, max } => write!(f, "uniform:{}..{}", format_bytes(min), format_bytes(max)),
        }
    }
}

impl std::str::FromStr for SizeDist {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> anyhow::Result<Self> {
        let s = s.trim();
        let dist = if let Some(range) = strip_prefix_ignore_case(s, "uniform:") {
            let (a, b) = range.split_once("..").with_context(|| format!("size {s:?}: expected uniform:MIN..MAX"))?;
            let (min, max) = (parse_bytes(a)?, parse_bytes(b)?);
            if min > max {
                bail!("size {s:?}: minimum is larger than maximum");
            }
            if min == max {
                SizeDist::Fixed(min)
            } else {
                SizeDist::Uniform { min, max }
            }
        } else if s.contains(':') {
            bail!("size {s:?}: unknown distribution (use a fixed size like 1KiB or uniform:MIN..MAX)");
        } else {
            SizeDist::Fixed(parse_bytes(s)?)
        };
        let min = match dist {
            SizeDist::Fixed(n) => n,
            SizeDist::Uniform { min, .. } => min,
        };
        if min == 0 {
            bail!("size {s:?}: payloads must not be empty");
        }
        if dist.max() > MAX_SIZE_BYTES {
            bail!("size {s:?}: at most {} per message", format_bytes(MAX_SIZE_BYTES));
        }
        Ok(dist)
    }
}

fn strip_prefix_ignore_case<'a>(s: &'a str, prefix: &str) -> Option<&'a str> {
    if s.len() >= prefix.len() && s.is_char_boundary(prefix.len()) && s[..prefix.len()].eq_ignore_ascii_case(prefix) {
        Some(&s[prefix.len()..])
    } else {
        None
    }
}

/// Splits `"12.5KiB"` into `("12.5", "KiB")`.
fn split_number(s: &str) -> (&str, &str) {
    let end = s.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(s.len());
    (&s[..end], s[end..].trim())
}

/// Parses a byte count: a number with an optional unit `B`, `KB`/`MB`/`GB` (powers of 1000)
/// or `KiB`/`MiB`/`GiB` (powers of 1024), case-insensitive; fractions are rounded.
pub fn parse_bytes(s: &str) -> anyhow::Result<u64> {
    let s = s.trim();
    let (number, unit) = split_number(s);
    if number.is_empty() {
        bail!("{s:?} is not a size (expected e.g. 1KiB, 512B, 4MB)");
    }
    let value: f64 = number.parse().with_context(|| format!("{s:?} is not a size"))?;
    let multiplier: f64 = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "kb" => 1e3,
        "mb" => 1e6,
        "gb" => 1e9,
        "kib" => 1024.0,
        "mib" => 1024.0 * 1024.0,
        "gib" => 1024.0 * 1024.0 * 1024.0,
        _ => bail!("{s:?}: unknown unit {unit:?} (use B, KB, MB, GB, KiB, MiB, GiB)"),
    };
    let bytes = (value * multiplier).round();
    if !bytes.is_finite() || bytes > u64::MAX as f64 / 2.0 {
        bail!("{s:?} is too large");
    }
    Ok(bytes as u64)
}

/// Formats a byte count with the largest binary unit that divides it, e.g. `1 KiB`, `1.5 MiB`.
pub fn format_bytes(n: u64) -> String {
    const UNITS: [(&str, u64); 3] = [("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)];
    for (unit, size) in UNITS {
        if n >= size {
            let v = n as f64 / size as f64;
            return if n % size == 0 { format!("{} {unit}", n / size) } else { format!("{v:.2} {unit}") };
        }
    }
    format!("{n} B")
}

/// Parses a duration: a number with unit `ns`, `us`, `ms`, `s`, `m` or `h` (a bare number means
/// seconds), e.g. `20s`, `1.5s`, `500ms`, `2m`.
pub fn parse_duration(s: &str) -> anyhow::Result<Duration> {
    let s = s.trim();
    let (number, unit) = split_number(s);
    if number.is_empty() {
        bail!("{s:?} is not a duration (expected e.g. 20s, 500ms, 2m)");
    }
    let value: f64 = number.parse().with_context(|| format!("{s:?} is not a duration"))?;
    let seconds = match unit.to_ascii_lowercase().as_str() {
        "ns" => value / 1e9,
        "us" | "µs" => value / 1e6,
        "ms" => value / 1e3,
        "" | "s" => value,
        "m" | "min" => value * 60.0,
        "h" => value * 3600.0,
        _ => bail!("{s:?}: unknown unit {unit:?} (use ms, s, m or h)"),
    };
    Duration::try_from_secs_f64(seconds).map_err(|_| anyhow::anyhow!("{s:?} is out of range"))
}

/// Formats a duration compactly (`2s`, `1.5s`, `250ms`).
pub fn format_duration(d: Duration) -> String {
    let ms = d.as_secs_f64() * 1e3;
    if ms < 1000.0 {
        format!("{}ms", trim_float(ms))
    } else {
        format!("{}s", trim_float(d.as_secs_f64()))
    }
}

fn trim_float(v: f64) -> String {
    let s = format!("{v:.3}");
    let s = s.trim_end_matches('0').trim_end_matches('.');
    s.to_owned()
}

/// A complete, validated run configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub name: String,
    pub description: Option<String>,
    pub scenario_file: Option<PathBuf>,
    pub target: Target,
    /// Publishes and subscriptions go through the endpoint (forwarded) rather than straight
    /// to shard leaders.
    pub forwarded: bool,
    pub producers: u32,
    pub consumers: u32,
    pub mailboxes: u32,
    pub partitions: u32,
    pub size: SizeDist,
    pub batch: u32,
    pub inflight: u32,
    pub ordering_keys: u32,
    /// `None`: closed loop; `Some(r)`: open loop at `r` msg/s in total.
    pub rate: Option<u64>,
    pub warmup: Duration,
    /// Measured duration (after the warm-up); with only `--count` given, the upper bound.
    pub duration: Duration,
    pub count: Option<u64>,
    pub drain: Duration,
    pub credits: u32,
    pub ack_batch: u32,
    pub request_timeout: Duration,
    pub seed: u64,
    pub json: Option<PathBuf>,
    pub hdr_log: Option<PathBuf>,
    pub quiet: bool,
    /// Set for an exchange scenario: its flows replace the producers and consumers above.
    pub exchange: Option<Exchange>,
}

impl Config {
    /// Mailbox `n`'s service id.
    pub fn mailbox(&self, n: u32) -> String {
        format!("{MAILBOX_PREFIX}{n}")
    }

    /// The largest payload the run sends (an exchange's sealed payloads carry a small envelope
    /// besides).
    pub fn largest_payload(&self) -> u64 {
        match &self.exchange {
            Some(e) => e.flows.iter().map(|f| f.size.max().max(f.reply_size.max())).max().unwrap_or(0) + 1024,
            None => self.size.max(),
        }
    }

    pub fn mode(&self) -> &'static str {
        if self.rate.is_some() {
            "open-loop"
        } else {
            "closed-loop"
        }
    }

    /// Reads `cli.scenario` (if any), applies the flags over it and validates the result.
    pub fn from_cli(cli: Cli) -> anyhow::Result<Config> {
        let file = match &cli.scenario {
            Some(path) => {
                let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
                parse_scenario(&text).with_context(|| format!("parsing scenario {}", path.display()))?
            }
            None => Knobs::default(),
        };
        let default_name = cli
            .scenario
            .as_ref()
            .and_then(|p| p.file_stem())
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| "adhoc".to_owned());
        let mut config = Config::resolve(cli.knobs.or(file), default_name)?;
        config.scenario_file = cli.scenario;
        Ok(config)
    }

    /// Applies the defaults to `k` and validates every value.
    pub fn resolve(k: Knobs, default_name: String) -> anyhow::Result<Config> {
        let target = match (k.endpoint, k.embedded) {
            (Some(_), true) => bail!("give either --endpoint or --embedded, not both"),
            (_, true) if k.profile.is_some() => bail!("--profile is for a running cluster, not --embedded"),
            (Some(e), false) => {
                if e.split(',').all(|p| p.trim().is_empty()) {
                    bail!("--endpoint is empty");
                }
                Target::Cluster { endpoints: Some(e), profile: k.profile, insecure: k.insecure }
            }
            (None, true) => Target::Embedded { shards: k.shards.unwrap_or(3), insecure: k.insecure, evidence: !k.no_evidence },
            (None, false) => Target::Cluster { endpoints: None, profile: k.profile, insecure: k.insecure },
        };
        if let Target::Embedded { shards, .. } = target {
            if shards == 0 || shards > 1024 {
                bail!("--shards must be 1..=1024");
            }
        }
        let positive = |v: Option<u32>, default: u32, what: &str, max: u32| -> anyhow::Result<u32> {
            let v = v.unwrap_or(default);
            if v == 0 || v > max {
                bail!("--{what} must be 1..={max}");
            }
            Ok(v)
        };
        let producers = positive(k.producers, 4, "producers", 10_000)?;
        let consumers = k.consumers.unwrap_or(4);
        if consumers > 10_000 {
            bail!("--consumers must be 0..=10000");
        }
        let mailboxes = positive(k.mailboxes, 1, "mailboxes", 100_000)?;
        let partitions = k.partitions.unwrap_or(4);
        if partitions > 256 {
            bail!("--partitions must be 0..=256 (0 = the cluster default)");
        }
        let size: SizeDist = k.size.as_deref().unwrap_or("1KiB").parse()?;
        let batch = positive(k.batch, 100, "batch", 100_000)?;
        let inflight = positive(k.inflight, 4, "inflight", 10_000)?;
        let rate = match k.rate.unwrap_or(0) {
            0 => None,
            r => Some(r),
        };
        let warmup = parse_duration(k.warmup.as_deref().unwrap_or("2s")).context("--warmup")?;
        let count = match k.count {
            Some(0) => bail!("--count must be greater than 0"),
            c => c,
        };
        let duration = match (&k.duration, count) {
            (Some(d), _) => parse_duration(d).context("--duration")?,
            (None, Some(_)) => COUNT_ONLY_TIME_LIMIT,
            (None, None) => Duration::from_secs(60),
        };
        if duration.is_zero() {
            bail!("--duration must be greater than 0");
        }
        if duration + warmup > Duration::from_secs(7 * 24 * 3600) {
            bail!("--duration plus --warmup must be at most a week");
        }
        let drain = parse_duration(k.drain.as_deref().unwrap_or("10s")).context("--drain")?;
        let credits = positive(k.credits, 1000, "credits", 1 << 20)?;
        let ack_batch = positive(k.ack_batch, 100, "ack-batch", 1 << 20)?;
        let request_timeout =
            parse_duration(k.request_timeout.as_deref().unwrap_or("30s")).context("--request-timeout")?;
        if request_timeout.is_zero() {
            bail!("--request-timeout must be greater than 0");
        }
        let exchange = match (k.topology, k.flow.is_empty()) {
            (Some(topology), false) => {
                if k.insecure {
                    bail!("an exchange scenario needs TLS: every system acts with its own certificate");
                }
                if k.no_evidence {
                    bail!("an exchange scenario verifies every receipt, so it needs nodes that sign evidence");
                }
                Some(Exchange::resolve(topology, k.flow, k.rate_scale.unwrap_or(1.0))?)
            }
            (None, false) => bail!("the scenario has [[flow]]s but no [topology]"),
            (Some(_), true) => bail!("the scenario has a [topology] but no [[flow]]s (apply a topology alone with `kerwen scenario apply`)"),
            (None, true) if k.rate_scale.is_some() => bail!("--rate-scale applies to the flows of an exchange scenario"),
            (None, true) => None,
        };
        Ok(Config {
            name: k.name.unwrap_or(default_name),
            description: k.description,
            scenario_file: None,
            target,
            forwarded: k.forwarded,
            producers,
            consumers,
            mailboxes,
            partitions,
            size,
            batch,
            inflight,
            ordering_keys: k.ordering_keys.unwrap_or(0),
            rate,
            warmup,
            duration,
            count,
            drain,
            credits,
            ack_batch,
            request_timeout,
            seed: k.seed.unwrap_or(1),
            json: k.json,
            hdr_log: k.hdr_log,
            quiet: k.quiet,
            exchange,
        })
    }

    /// The configuration as reported in the JSON file.
    pub fn to_json(&self) -> serde_json::Value {
        let (target, endpoints, shards) = match &self.target {
            Target::Cluster { endpoints, .. } => ("endpoints", Some(endpoints.clone().unwrap_or_else(|| DEFAULT_ENDPOINTS.to_owned())), None),
            Target::Embedded { shards, .. } => ("embedded", None, Some(*shards)),
        };
        let size = match self.size {
            SizeDist::Fixed(n) => serde_json::json!({ "distribution": "fixed", "bytes": n }),
            SizeDist::Uniform { min, max } => {
                serde_json::json!({ "distribution": "uniform", "min_bytes": min, "max_bytes": max })
            }
        };
        serde_json::json!({
            "name": self.name,
            "description": self.description,
            "scenario_file": self.scenario_file,
            "target": target,
            "endpoints": endpoints,
            "embedded_shards": shards,
            "mode": self.mode(),
            "rate_msgs_per_s": self.rate,
            "producers": self.producers,
            "consumers": self.consumers,
            "mailboxes": self.mailboxes,
            "mailbox_names": format!("{MAILBOX_PREFIX}0..{}", self.mailboxes - 1),
            "partitions_per_mailbox": self.partitions,
            "size": size,
            "size_text": self.size.to_string(),
            "mean_size_bytes": self.size.mean(),
            "batch": self.batch,
            "inflight_per_producer": self.inflight,
            "ordering_keys": self.ordering_keys,
            "warmup_s": self.warmup.as_secs_f64(),
            "duration_s": self.duration.as_secs_f64(),
            "count": self.count,
            "drain_s": self.drain.as_secs_f64(),
            "consumer_credits": self.credits,
            "ack_batch": self.ack_batch,
            "request_timeout_s": self.request_timeout.as_secs_f64(),
            "seed": self.seed,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_byte_sizes() {
        assert_eq!(parse_bytes("1KiB").unwrap(), 1024);
        assert_eq!(parse_bytes("1kib").unwrap(), 1024);
        assert_eq!(parse_bytes("512B").unwrap(), 512);
        assert_eq!(parse_bytes("512").unwrap(), 512);
        assert_eq!(parse_bytes("4KB").unwrap(), 4000);
        assert_eq!(parse_bytes("1 MiB").unwrap(), 1 << 20);
        assert_eq!(parse_bytes("1.5KiB").unwrap(), 1536);
        assert_eq!(parse_bytes("2GB").unwrap(), 2_000_000_000);
        for bad in ["", "KiB", "1XB", "-1KiB", "1..2KiB", "abc"] {
            assert!(parse_bytes(bad).is_err(), "{bad:?} should be rejected");
        }
    }

    #[test]
    fn parses_size_distributions() {
        assert_eq!("1KiB".parse::<SizeDist>().unwrap(), SizeDist::Fixed(1024));
        assert_eq!(
            "uniform:512B..4KiB".parse::<SizeDist>().unwrap(),
            SizeDist::Uniform { min: 512, max: 4096 }
        );
        assert_eq!("UNIFORM:1KiB..1KiB".parse::<SizeDist>().unwrap(), SizeDist::Fixed(1024));
        assert_eq!("uniform:512B..4KiB".parse::<SizeDist>().unwrap().mean(), 2304.0);
        for bad in ["0", "0B", "uniform:4KiB..512B", "uniform:1KiB", "normal:1KiB..2KiB", "uniform:0..1KiB", "1GiB"] {
            assert!(bad.parse::<SizeDist>().is_err(), "{bad:?} should be rejected");
        }
        assert_eq!(SizeDist::Fixed(1024).to_string(), "1 KiB");
        assert_eq!(SizeDist::Uniform { min: 512, max: 4096 }.to_string(), "uniform:512 B..4 KiB");
    }

    #[test]
    fn parses_durations() {
        assert_eq!(parse_duration("20s").unwrap(), Duration::from_secs(20));
        assert_eq!(parse_duration("20").unwrap(), Duration::from_secs(20));
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("1.5s").unwrap(), Duration::from_millis(1500));
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        assert_eq!(parse_duration("0s").unwrap(), Duration::ZERO);
        for bad in ["", "s", "1d", "-2s", "fast"] {
            assert!(parse_duration(bad).is_err(), "{bad:?} should be rejected");
        }
        assert_eq!(format_duration(Duration::from_millis(1500)), "1.5s");
        assert_eq!(format_duration(Duration::from_millis(250)), "250ms");
    }

    #[test]
    fn scenario_values_apply_and_flags_override_them() {
        let file = parse_scenario(
            "name = \"fixed\"\nembedded = true\nrate = 2000\nsize = \"uniform:512B..4KiB\"\nproducers = 2\nduration = \"30s\"\n",
        )
        .unwrap();
        let flags = Knobs { producers: Some(8), duration: Some("5s".into()), ..Default::default() };
        let c = Config::resolve(flags.or(file), "x".into()).unwrap();
        assert_eq!(c.name, "fixed");
        assert_eq!(c.target, Target::Embedded { shards: 3, insecure: false, evidence: true });
        assert_eq!(c.rate, Some(2000));
        assert_eq!(c.producers, 8);
        assert_eq!(c.duration, Duration::from_secs(5));
        assert_eq!(c.size, SizeDist::Uniform { min: 512, max: 4096 });
        assert_eq!(c.mode(), "open-loop");
        // Defaults.
        assert_eq!(c.batch, 100);
        assert_eq!(c.warmup, Duration::from_secs(2));
    }

    #[test]
    fn command_line_endpoint_overrides_an_embedded_scenario() {
        let file = parse_scenario("embedded = true\n").unwrap();
        let flags = Knobs { endpoint: Some("10.0.0.1:7001".into()), ..Default::default() };
        let c = Config::resolve(flags.or(file), "x".into()).unwrap();
        assert_eq!(c.target, Target::Cluster { endpoints: Some("10.0.0.1:7001".into()), profile: None, insecure: false });
        let c = Config::resolve(Knobs::default(), "x".into()).unwrap();
        assert_eq!(c.target, Target::Cluster { endpoints: None, profile: None, insecure: false });
        assert_eq!(c.mode(), "closed-loop");
    }

    #[test]
    fn rejects_bad_scenarios() {
        assert!(parse_scenario("producer = 3\n").is_err(), "unknown keys are errors");
        assert!(parse_scenario("producers = \"three\"\n").is_err());
        let bad = |toml: &str| Config::resolve(parse_scenario(toml).unwrap(), "x".into()).is_err();
        assert!(bad("producers = 0\n"));
        assert!(bad("batch = 0\n"));
        assert!(bad("size = \"0B\"\n"));
        assert!(bad("count = 0\n"));
        assert!(bad("duration = \"0s\"\n"));
        assert!(bad("warmup = \"soon\"\n"));
        assert!(bad("endpoint = \"a:1\"\nembedded = true\n"));
    }

    #[test]
    fn count_alone_is_bounded_in_time() {
        let c = Config::resolve(Knobs { count: Some(1000), ..Default::default() }, "x".into()).unwrap();
        assert_eq!(c.duration, COUNT_ONLY_TIME_LIMIT);
    }

    #[test]
    fn shipped_scenarios_parse() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("scenarios");
        let mut seen = 0;
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().and_then(|e| e.to_str()) != Some("toml") {
                continue;
            }
            let text = std::fs::read_to_string(&path).unwrap();
            let knobs = parse_scenario(&text).unwrap_or_else(|e| panic!("{}: {e:#}", path.display()));
            Config::resolve(knobs, "x".into()).unwrap_or_else(|e| panic!("{}: {e:#}", path.display()));
            seen += 1;
        }
        assert!(seen >= 4, "expected the four shipped scenarios, found {seen}");
    }
}

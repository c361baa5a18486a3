//! Reports: the summary table (stdout), the JSON report (`--json`) and the HdrHistogram
//! interval log (`--hdr-log`).
//!
//! The JSON report holds the full configuration, the environment (cores, fsync policy,
//! replication factor, signing), the summary (throughput in msg/s and MB/s, errors by gRPC
//! status code), every latency histogram — percentiles at [`QUANTILES`] plus the complete
//! histogram as a base64 V2-deflate HdrHistogram blob (the same encoding as interval logs, so
//! any HdrHistogram implementation can decode and merge it) — and the per-second time series.
//! Latencies are in microseconds throughout.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use anyhow::Context;
use base64::Engine;
use hdrhistogram::serialization::interval_log::{IntervalLogWriterBuilder, Tag};
use hdrhistogram::serialization::{Serializer, V2DeflateSerializer};
use hdrhistogram::Histogram;
use serde_json::json;

use crate::cluster;
use crate::config::{Config, Target};
use crate::stats::{Window, QUANTILES};
use crate::workload::Outcome;

/// Fsync policy of the nodes, as stated in reports.
pub const FSYNC_POLICY: &str = "fsync before ack (group commit)";
/// Replication factor of every Raft group.
pub const REPLICATION_FACTOR: u64 = 3;
/// Evidence signing on the hot path, as far as the load generator knows it.
fn signing(target: &Target) -> &'static str {
    match target {
        Target::Embedded { evidence: true, .. } => "on (one Ed25519 signature per Raft entry)",
        Target::Embedded { evidence: false, .. } => "off (--no-evidence)",
        Target::Cluster { .. } => "as the cluster runs (on unless its nodes run --no-evidence)",
    }
}

/// Histograms in the report, with their JSON/log names.
fn histograms(w: &Window) -> [(&'static str, &Histogram<u64>); 3] {
    [("publish_ack", &w.publish_ack), ("end_to_end", &w.end_to_end), ("send_delay", &w.send_delay)]
}

// ------------------------------------------------------------------------------------------
// Summary table
// ------------------------------------------------------------------------------------------

fn fmt_ms(us: u64) -> String {
    let ms = us as f64 / 1000.0;
    if ms >= 100.0 {
        format!("{ms:.0} ms")
    } else if ms >= 10.0 {
        format!("{ms:.1} ms")
    } else {
        format!("{ms:.2} ms")
    }
}

/// `1234567` → `1,234,567`.
pub fn group_digits(n: u64) -> String {
    let s = n.to_string();
    let mut out = String::with_capacity(s.len() + s.len() / 3);
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

fn rate(n: u64, window: Duration) -> f64 {
    if window.is_zero() {
        0.0
    } else {
        n as f64 / window.as_secs_f64()
    }
}

/// The human-readable summary printed at the end of a run.
pub fn summary(config: &Config, outcome: &Outcome) -> String {
    let t = &outcome.totals;
    let mut out = String::new();
    let target = match &config.target {
        Target::Embedded { shards, insecure, evidence } => format!(
            "embedded 3-node cluster, {shards} shards, {}, {}",
            if *insecure { "plaintext" } else { "mutual TLS" },
            if *evidence { "signing evidence" } else { "no evidence (--no-evidence)" }
        ),
        Target::Cluster { endpoints, insecure, .. } => format!(
            "{}{}",
            endpoints.as_deref().unwrap_or("the profile's endpoints"),
            if *insecure { " (plaintext)" } else { ", mutual TLS" }
        ),
    };
    let mode = match config.rate {
        Some(r) => format!("open loop, {} msg/s target", group_digits(r)),
        None => "closed loop (as fast as acks allow)".to_owned(),
    };
    out.push_str(&format!("\n== kerwen-loadtest: {} ==\n", config.name));
    out.push_str(&format!("target      {target}\n"));
    out.push_str(&format!(
        "load        {mode}; {} producers x {} in flight x batch {}; {} consumers; {} mailbox(es) x {} partitions; size {}{}\n",
        config.producers,
        config.inflight,
        config.batch,
        config.consumers,
        config.mailboxes,
        if config.partitions == 0 { "default".to_owned() } else { config.partitions.to_string() },
        config.size,
        if config.ordering_keys > 0 { format!("; {} ordering keys", config.ordering_keys) } else { String::new() }
    ));
    out.push_str(&format!(
        "cluster     replication factor {REPLICATION_FACTOR}, {FSYNC_POLICY}, signing {}; {} cores\n",
        signing(&config.target),
        cores()
    ));
    out.push_str(&format!(
        "measured    {:.1} s of publishing after {:.1} s warm-up{}\n\n",
        outcome.publish_window.as_secs_f64(),
        config.warmup.as_secs_f64(),
        if outcome.interrupted { " (interrupted)" } else { "" }
    ));
    out.push_str(&format!(
        "{:<18}{:>12}{:>11}{:>11}{:>11}{:>11}{:>11}{:>11}\n",
        "latency", "count", "p50", "p90", "p99", "p99.9", "max", "mean"
    ));
    for (label, h) in [
        ("publish -> ack", &t.publish_ack),
        ("end-to-end", &t.end_to_end),
        ("send delay (CO)", &t.send_delay),
    ] {
        if h.is_empty() {
            out.push_str(&format!("{label:<18}{:>12}{:>11}\n", 0, "-"));
            continue;
        }
        out.push_str(&format!(
            "{label:<18}{:>12}{:>11}{:>11}{:>11}{:>11}{:>11}{:>11}\n",
            group_digits(h.len()),
            fmt_ms(h.value_at_quantile(0.5)),
            fmt_ms(h.value_at_quantile(0.9)),
            fmt_ms(h.value_at_quantile(0.99)),
            fmt_ms(h.value_at_quantile(0.999)),
            fmt_ms(h.max()),
            fmt_ms(h.mean().round() as u64),
        ));
    }
    out.push_str("(latencies from the intended send time; send delay counts publish requests)\n\n");
    out.push_str(&format!(
        "{:<18}{:>12}{:>14}{:>11}{:>12}\n",
        "throughput", "messages", "msg/s", "MB/s", "window"
    ));
    for (label, n, bytes, window) in [
        ("publish (acked)", t.published, t.published_bytes, outcome.publish_window),
        ("consume", t.delivered, t.delivered_bytes, outcome.deliver_window),
    ] {
        out.push_str(&format!(
            "{label:<18}{:>12}{:>14}{:>11.2}{:>12}\n",
            group_digits(n),
            group_digits(rate(n, window).round() as u64),
            rate(bytes, window) / 1e6,
            format!("{:.1} s", window.as_secs_f64())
        ));
    }
    out.push('\n');
    if t.errors.is_empty() {
        out.push_str("errors      none\n");
    } else {
        for (op, codes) in &t.errors {
            for (code, n) in codes {
                out.push_str(&format!("errors      {op}: {code} x {}\n", group_digits(*n)));
            }
        }
        out.push_str(&format!("            {} messages in failed publish requests\n", group_digits(t.failed)));
    }
    if t.redelivered > 0 || t.foreign > 0 {
        out.push_str(&format!(
            "other       {} redeliveries, {} deliveries of messages from earlier runs\n",
            group_digits(t.redelivered),
            group_digits(t.foreign)
        ));
    }
    for note in &outcome.notes {
        out.push_str(&format!("note        {note}\n"));
    }
    out
}

// ------------------------------------------------------------------------------------------
// JSON
// ------------------------------------------------------------------------------------------

pub fn cores() -> usize {
    std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
}

fn first_line_with(path: &str, key: &str) -> Option<String> {
    let text = std::fs::read_to_string(path).ok()?;
    let line = text.lines().find(|l| l.starts_with(key))?;
    Some(line.split_once(':').map(|(_, v)| v).unwrap_or(line).trim().to_owned())
}

/// What the numbers were measured on.
pub fn environment(config: &Config) -> serde_json::Value {
    let cluster = match &config.target {
        Target::Embedded { shards, insecure, evidence } => json!({
            "kind": "embedded",
            "nodes": cluster::NODES,
            "shards": shards,
            "evidence": evidence,
            "note": "3 nodes inside the load generator's process, sharing its cores",
            "transport": if *insecure { "plaintext (--insecure)" } else { "mutual TLS 1.3" },
        }),
        Target::Cluster { endpoints, insecure, .. } => json!({
            "kind": "external",
            "endpoints": endpoints.clone().unwrap_or_else(|| crate::config::DEFAULT_ENDPOINTS.to_owned()),
            "transport": if *insecure { "plaintext (--insecure)" } else { "mutual TLS 1.3" },
        }),
    };
    json!({
        "cores": cores(),
        "cpu_model": first_line_with("/proc/cpuinfo", "model name"),
        "memory_total": first_line_with("/proc/meminfo", "MemTotal"),
        "load_average_at_start": std::fs::read_to_string("/proc/loadavg").ok().map(|s| s.trim().to_owned()),
        "os": std::env::consts::OS,
        "arch": std::env::consts::ARCH,
        "fsync_policy": FSYNC_POLICY,
        "replication_factor": REPLICATION_FACTOR,
        "signing": signing(&config.target),
        "cluster": cluster,
        "tool_version": env!("CARGO_PKG_VERSION"),
    })
}

/// A histogram as JSON: summary values, percentiles at [`QUANTILES`] and the encoded histogram.
pub fn histogram_json(h: &Histogram<u64>) -> anyhow::Result<serde_json::Value> {
    let mut buf = Vec::new();
    V2DeflateSerializer::new().serialize(h, &mut buf).map_err(|e| anyhow::anyhow!("serializing a histogram: {e}"))?;
    let percentiles: Vec<serde_json::Value> = QUANTILES
        .iter()
        .map(|&q| json!({ "quantile": q, "value_us": if h.is_empty() { 0 } else { h.value_at_quantile(q) } }))
        .collect();
    let empty = h.is_empty();
    Ok(json!({
        "unit": "microseconds",
        "count": h.len(),
        "min_us": if empty { 0 } else { h.min() },
        "max_us": if empty { 0 } else { h.max() },
        "mean_us": if empty { 0.0 } else { h.mean() },
        "stdev_us": if empty { 0.0 } else { h.stdev() },
        "significant_figures": h.sigfig(),
        "percentiles": percentiles,
        "hdr_v2_deflate_base64": base64::engine::general_purpose::STANDARD.encode(&buf),
    }))
}

/// The full JSON report.
pub fn json_report(config: &Config, environment: serde_json::Value, outcome: &Outcome) -> anyhow::Result<serde_json::Value> {
    let t = &outcome.totals;
    let mut hist = serde_json::Map::new();
    for (name, h) in histograms(t) {
        hist.insert(name.to_owned(), histogram_json(h)?);
    }
    Ok(json!({
        "tool": "kerwen-loadtest",
        "format_version": 1,
        "started_unix_ms": outcome.started_unix_ms,
        "finished_unix_ms": outcome.finished_unix_ms,
        "config": config.to_json(),
        "environment": environment,
        "summary": {
            "interrupted": outcome.interrupted,
            "drained": outcome.drained,
            "publish": {
                "messages": t.published,
                "bytes": t.published_bytes,
                "requests": t.publish_requests,
                "window_s": outcome.publish_window.as_secs_f64(),
                "msgs_per_s": rate(t.published, outcome.publish_window),
                "mb_per_s": rate(t.published_bytes, outcome.publish_window) / 1e6,
                "failed_messages": t.failed,
                "unsent_messages": outcome.unsent,
            },
            "consume": {
                "messages": t.delivered,
                "bytes": t.delivered_bytes,
                "window_s": outcome.deliver_window.as_secs_f64(),
                "msgs_per_s": rate(t.delivered, outcome.deliver_window),
                "mb_per_s": rate(t.delivered_bytes, outcome.deliver_window) / 1e6,
                "redelivered": t.redelivered,
                "foreign": t.foreign,
                "acks_confirmed": t.acks_confirmed,
            },
            "run_totals_including_warmup": {
                "published": outcome.published_all,
                "delivered": outcome.delivered_all,
            },
            "errors_by_status_code": t.errors,
            "error_count": t.error_count(),
            "notes": outcome.notes,
        },
        "histograms": hist,
        "time_series": outcome.series,
    }))
}

/// Creates the report file up front, so a bad path fails before the load runs.
pub fn create_file(path: &Path) -> anyhow::Result<File> {
    File::create(path).with_context(|| format!("creating {}", path.display()))
}

pub fn write_json(file: File, path: &Path, report: &serde_json::Value) -> anyhow::Result<()> {
    let mut w = BufWriter::new(file);
    serde_json::to_writer_pretty(&mut w, report).with_context(|| format!("writing {}", path.display()))?;
    w.write_all(b"\n")?;
    w.flush().with_context(|| format!("writing {}", path.display()))
}

// ------------------------------------------------------------------------------------------
// HdrHistogram interval log
// ------------------------------------------------------------------------------------------

/// An HdrHistogram interval log (the format of the Java `HistogramLogWriter`), written as the
/// run goes: one tagged histogram per latency kind per second, values in microseconds.
pub struct HdrLog {
    path: PathBuf,
    file: BufWriter<File>,
    serializer: V2DeflateSerializer,
}

impl HdrLog {
    pub fn create(path: &Path) -> anyhow::Result<HdrLog> {
        Ok(HdrLog { path: path.to_owned(), file: BufWriter::new(create_file(path)?), serializer: V2DeflateSerializer::new() })
    }

    /// Writes the header; interval timestamps are seconds since `start`.
    pub fn begin(&mut self, start: SystemTime, config: &Config) -> anyhow::Result<()> {
        let mut builder = IntervalLogWriterBuilder::new();
        builder
            .add_comment("[Histogram log format version 1.3]")
            .add_comment(&format!("[kerwen-loadtest {}: {}]", env!("CARGO_PKG_VERSION"), config.name))
            .add_comment("[Values in microseconds; tags: publish-ack, end-to-end, send-delay]")
            .with_start_time(start)
            .with_base_time(start);
        builder
            .begin_log_with(&mut self.file, &mut self.serializer)
            .with_context(|| format!("writing {}", self.path.display()))?;
        writeln!(self.file, "\"StartTimestamp\",\"Interval_Length\",\"Interval_Max\",\"Interval_Compressed_Histogram\"")
            .with_context(|| format!("writing {}", self.path.display()))?;
        Ok(())
    }

    pub fn write_interval(&mut self, offset: Duration, length: Duration, w: &Window) -> anyhow::Result<()> {
        // An empty builder writes no header lines, only the intervals.
        let mut writer = IntervalLogWriterBuilder::new()
            .begin_log_with(&mut self.file, &mut self.serializer)
            .with_context(|| format!("writing {}", self.path.display()))?;
        for (tag, h) in [("publish-ack", &w.publish_ack), ("end-to-end", &w.end_to_end), ("send-delay", &w.send_delay)] {
            writer
                .write_histogram(h, offset, length, Tag::new(tag))
                .map_err(|e| anyhow::anyhow!("writing {}: {e}", self.path.display()))?;
        }
        Ok(())
    }

    pub fn finish(mut self) -> anyhow::Result<()> {
        self.file.flush().with_context(|| format!("writing {}", self.path.display()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hdrhistogram::serialization::interval_log::{IntervalLogIterator, LogEntry};
    use hdrhistogram::serialization::Deserializer;

    #[test]
    fn groups_digits() {
        assert_eq!(group_digits(0), "0");
        assert_eq!(group_digits(999), "999");
        assert_eq!(group_digits(1000), "1,000");
        assert_eq!(group_digits(1234567), "1,234,567");
    }

    #[test]
    fn histogram_json_round_trips() {
        let mut h = crate::stats::new_histogram();
        for v in 1..=1000u64 {
            h.record(v * 10).unwrap();
        }
        let j = histogram_json(&h).unwrap();
        assert_eq!(j["count"], 1000);
        assert_eq!(j["percentiles"].as_array().unwrap().len(), QUANTILES.len());
        let blob = base64::engine::general_purpose::STANDARD.decode(j["hdr_v2_deflate_base64"].as_str().unwrap()).unwrap();
        let back: Histogram<u64> = Deserializer::new().deserialize(&mut &blob[..]).unwrap();
        assert_eq!(back, h);
    }

    #[test]
    fn hdr_log_is_readable() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("run.hlog");
        let config = crate::config::Config::resolve(Default::default(), "t".into()).unwrap();
        let mut log = HdrLog::create(&path).unwrap();
        log.begin(SystemTime::now(), &config).unwrap();
        let mut w = Window::default();
        w.publish_ack.record(1500).unwrap();
        log.write_interval(Duration::ZERO, Duration::from_secs(1), &w).unwrap();
        log.write_interval(Duration::from_secs(1), Duration::from_secs(1), &w).unwrap();
        log.finish().unwrap();
        let bytes = std::fs::read(&path).unwrap();
        let intervals: Vec<_> = IntervalLogIterator::new(&bytes)
            .map(|e| e.unwrap())
            .filter_map(|e| match e {
                LogEntry::Interval(i) => Some(i),
                _ => None,
            })
            .collect();
        assert_eq!(intervals.len(), 6);
        assert_eq!(intervals[0].tag().map(|t| t.as_str()), Some("publish-ack"));
        assert_eq!(intervals[3].start_timestamp(), Duration::from_secs(1));
    }
}

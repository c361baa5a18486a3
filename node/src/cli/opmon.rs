//! `kerwen opmon`: every node's operational-monitoring records (one per publish, delivery and
//! ack it handled) and per-service health, like X-Road's operational data queries.

use clap::Args;
use kerwen_proto::v1 as pb;
use serde_json::json;

use super::{connect, status_error, ClientOpts};
use crate::runtime::now_unix_ms;

#[derive(Debug, Args)]
pub struct OpmonArgs {
    /// Exchanges that ended in the last this many seconds [default: all kept].
    #[arg(long, conflicts_with = "from")]
    pub last_secs: Option<u64>,
    /// Exchanges that ended at or after this time (Unix ms).
    #[arg(long)]
    pub from: Option<i64>,
    /// Exchanges that ended at or before this time (Unix ms) [default: now].
    #[arg(long)]
    pub to: Option<i64>,
    /// Only this kind of exchange.
    #[arg(long, value_parser = ["publish", "deliver", "ack"])]
    pub kind: Option<String>,
    /// Only messages from this sender subsystem.
    #[arg(long)]
    pub sender: Option<String>,
    /// Only messages to this service.
    #[arg(long)]
    pub recipient: Option<String>,
    /// Only this message id.
    #[arg(long)]
    pub id: Option<String>,
    /// Only failed exchanges.
    #[arg(long)]
    pub failed: bool,
    /// The newest this many records [default: 1000].
    #[arg(long)]
    pub limit: Option<u32>,
}

pub async fn opmon(opts: &ClientOpts, args: OpmonArgs) -> anyhow::Result<()> {
    let from_unix_ms = match (args.last_secs, args.from) {
        (Some(secs), _) => now_unix_ms().saturating_sub(i64::try_from(secs.saturating_mul(1000)).unwrap_or(i64::MAX)),
        (None, Some(from)) => from,
        (None, None) => 0,
    };
    let request = pb::OperationalDataRequest {
        from_unix_ms,
        to_unix_ms: args.to.unwrap_or(0),
        kind: args.kind.unwrap_or_default(),
        sender: args.sender.unwrap_or_default(),
        recipient: args.recipient.unwrap_or_default(),
        message_id: args.id.unwrap_or_default(),
        failed_only: args.failed,
        limit: args.limit.unwrap_or(0),
    };
    let client = connect(opts).await?;
    let r = client.admin().operational_data(request).await.map_err(status_error)?.into_inner();
    if opts.json {
        let records: Vec<_> = r
            .records
            .iter()
            .map(|e| {
                json!({"kind": e.kind, "node": e.node, "at_unix_ms": e.at_unix_ms, "client": e.client, "sender": e.sender,
                       "recipient": e.recipient, "message_id": e.message_id, "payload_bytes": e.payload_bytes,
                       "accepted_unix_ms": e.accepted_unix_ms, "duration_ms": e.duration_ms, "attempt": e.attempt,
                       "duplicate": e.duplicate, "succeeded": e.succeeded, "fault": e.fault})
            })
            .collect();
        let health: Vec<_> = r
            .health
            .iter()
            .map(|h| {
                json!({"service": h.service, "successes": h.successes, "failures": h.failures,
                       "min_duration_ms": h.min_duration_ms, "average_duration_ms": h.average_duration_ms,
                       "max_duration_ms": h.max_duration_ms, "last_success_unix_ms": h.last_success_unix_ms,
                       "last_failure_unix_ms": h.last_failure_unix_ms})
            })
            .collect();
        println!("{}", json!({"records": records, "health": health, "truncated": r.truncated, "unanswered": r.unanswered}));
        return Ok(());
    }
    println!("{:<8} {:>4} {:>14} {:>8} {:>7} {:<10} {:<24} {:<32} {:<32}", "KIND", "NODE", "AT (ms)", "BYTES", "MS", "OUTCOME", "MESSAGE", "SENDER", "RECIPIENT");
    for e in &r.records {
        let outcome = if !e.succeeded { "failed" } else if e.duplicate { "duplicate" } else { "ok" };
        println!(
            "{:<8} {:>4} {:>14} {:>8} {:>7} {:<10} {:<24} {:<32} {:<32}",
            e.kind, e.node, e.at_unix_ms, e.payload_bytes, e.duration_ms, outcome, e.message_id, e.sender, e.recipient
        );
        if !e.succeeded {
            println!("         {}", e.fault);
        }
    }
    if r.truncated > 0 {
        println!("({} older matching records not shown; raise --limit or narrow the query)", r.truncated);
    }
    if !r.health.is_empty() {
        println!("\nservice health, last 600 s (publishes):");
        println!("{:<40} {:>9} {:>8} {:>7} {:>7} {:>7}", "SERVICE", "SUCCESSES", "FAILURES", "MIN ms", "AVG ms", "MAX ms");
        for h in &r.health {
            println!(
                "{:<40} {:>9} {:>8} {:>7} {:>7.1} {:>7}",
                h.service, h.successes, h.failures, h.min_duration_ms, h.average_duration_ms, h.max_duration_ms
            );
        }
    }
    for u in &r.unanswered {
        eprintln!("warning: {u} did not answer; its records are missing");
    }
    Ok(())
}

//! Client commands of the `kerwen` binary: mailboxes, publish, consume, status. Output is
//! for people by default and one JSON document (or one per line for streams) with `--json`.

use std::collections::HashMap;
use std::io::Read;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Args, Subcommand};
use kerwen_proto::v1 as pb;
use serde_json::json;

use crate::client::{Client, Event};

/// Where and how to talk to the cluster.
#[derive(Debug, Clone, Args)]
pub struct ClientOpts {
    /// Comma-separated node endpoints; the first reachable one is used.
    #[arg(long, env = "KERWEN_ENDPOINT", default_value = crate::client::DEFAULT_ENDPOINTS, global = true)]
    pub endpoint: String,
    /// Print machine-readable JSON instead of text.
    #[arg(long, global = true)]
    pub json: bool,
}

#[derive(Debug, Subcommand)]
pub enum MailboxCommand {
    /// Create the mailbox of a service: INSTANCE/CLASS/MEMBER/SUBSYSTEM/SERVICE[/VERSION].
    Create {
        service: String,
        /// Number of partitions (FIFO holds per partition); default: the cluster's.
        #[arg(long, default_value_t = 0)]
        partitions: u32,
        /// Most messages stored (published, not yet acked); default 10,000,000.
        #[arg(long, default_value_t = 0)]
        max_messages: u64,
        /// Most payload bytes stored; default 10 GiB.
        #[arg(long, default_value_t = 0)]
        max_bytes: u64,
        /// A message id published again within this many ms is not stored twice; default 24 h.
        #[arg(long, default_value_t = 0)]
        dedup_window_ms: u64,
    },
    /// List all mailboxes.
    List,
    /// Show a mailbox with its pending message count.
    Describe { service: String },
}

#[derive(Debug, Args)]
pub struct PublishArgs {
    /// Recipient service id (the mailbox).
    #[arg(long)]
    pub to: String,
    /// Payload given inline.
    #[arg(long, conflicts_with = "file")]
    pub data: Option<String>,
    /// Payload read from a file (default: standard input).
    #[arg(long)]
    pub file: Option<PathBuf>,
    /// Message id (idempotency key); default: a random one.
    #[arg(long)]
    pub id: Option<String>,
    /// Ordering key: messages with the same key keep their order.
    #[arg(long)]
    pub key: Option<String>,
    /// Header as NAME=VALUE (repeatable).
    #[arg(long = "header", value_name = "NAME=VALUE")]
    pub headers: Vec<String>,
}

#[derive(Debug, Args)]
pub struct ConsumeArgs {
    /// Mailbox (service id) to consume.
    #[arg(long)]
    pub from: String,
    /// Stop after this many messages (default: run until Ctrl-C).
    #[arg(long)]
    pub count: Option<u64>,
    /// Stop when no message arrived for this many seconds.
    #[arg(long)]
    pub timeout_secs: Option<u64>,
    /// Do not ack (messages are redelivered after the lease or on disconnect).
    #[arg(long)]
    pub no_ack: bool,
}

fn status_error(s: tonic::Status) -> anyhow::Error {
    anyhow::anyhow!("{:?}: {}", s.code(), s.message())
}

async fn connect(opts: &ClientOpts) -> anyhow::Result<Client> {
    Client::connect_list(&opts.endpoint).await.map_err(status_error)
}

fn mailbox_json(m: &pb::MailboxInfo) -> serde_json::Value {
    json!({
        "service": m.service,
        "id": m.id,
        "partitions": m.partitions,
        "partition_shards": m.partition_shards,
        "pending_messages": m.pending_messages,
        "pending_bytes": m.pending_bytes,
        "created_unix_ms": m.created_unix_ms,
        "dedup_window_ms": m.dedup_window_ms,
        "max_messages": m.max_messages,
        "max_bytes": m.max_bytes,
    })
}

pub async fn mailbox(opts: &ClientOpts, cmd: MailboxCommand) -> anyhow::Result<()> {
    let mut client = connect(opts).await?;
    match cmd {
        MailboxCommand::Create { service, partitions, max_messages, max_bytes, dedup_window_ms } => {
            let req = pb::CreateMailboxRequest { service, partitions, max_messages, max_bytes, dedup_window_ms };
            let m = client.create_mailbox_with(req).await.map_err(status_error)?;
            if opts.json {
                println!("{}", mailbox_json(&m));
            } else {
                println!("created mailbox {} ({} partitions)", m.service, m.partitions);
            }
        }
        MailboxCommand::List => {
            let list = client.list_mailboxes().await.map_err(status_error)?;
            if opts.json {
                println!("{}", serde_json::Value::Array(list.iter().map(mailbox_json).collect()));
            } else if list.is_empty() {
                println!("no mailboxes");
            } else {
                println!("{:<60} {:>10}", "MAILBOX", "PARTITIONS");
                for m in list {
                    println!("{:<60} {:>10}", m.service, m.partitions);
                }
            }
        }
        MailboxCommand::Describe { service } => {
            let m = client.describe_mailbox(&service).await.map_err(status_error)?;
            if opts.json {
                println!("{}", mailbox_json(&m));
            } else {
                println!("mailbox     {}", m.service);
                println!("partitions  {} (on shards {:?})", m.partitions, m.partition_shards);
                println!("pending     {} messages, {} bytes", m.pending_messages, m.pending_bytes);
                println!("limits      {} messages, {} bytes; dedup window {} ms", m.max_messages, m.max_bytes, m.dedup_window_ms);
            }
        }
    }
    Ok(())
}

fn random_id() -> String {
    format!("{:032x}", rand::random::<u128>())
}

pub async fn publish(opts: &ClientOpts, args: PublishArgs) -> anyhow::Result<()> {
    let payload = match (&args.data, &args.file) {
        (Some(data), _) => data.clone().into_bytes(),
        (None, Some(path)) => std::fs::read(path).with_context(|| format!("reading {}", path.display()))?,
        (None, None) => {
            let mut buf = Vec::new();
            std::io::stdin().read_to_end(&mut buf).context("reading standard input")?;
            buf
        }
    };
    let mut headers = HashMap::new();
    for h in &args.headers {
        let (k, v) = h.split_once('=').with_context(|| format!("header {h:?} is not NAME=VALUE"))?;
        headers.insert(k.to_owned(), v.to_owned());
    }
    let message = pb::Message {
        id: args.id.unwrap_or_else(random_id),
        recipient: args.to.clone(),
        headers,
        payload: payload.into(),
        ordering_key: args.key,
    };
    let mut client = connect(opts).await?;
    let response = client.publish(vec![message]).await.map_err(status_error)?;
    for r in response.results {
        let pos = r.position.unwrap_or_default();
        if opts.json {
            println!(
                "{}",
                json!({"id": r.id, "partition": pos.partition, "sequence": pos.sequence, "shard": r.shard, "commit_index": r.commit_index})
            );
        } else {
            println!("published {} to {} (partition {}, sequence {})", r.id, args.to, pos.partition, pos.sequence);
        }
    }
    Ok(())
}

fn print_delivery(json_output: bool, d: &pb::Delivery) {
    let m = d.message.clone().unwrap_or_default();
    let pos = d.position.unwrap_or_default();
    let text = std::str::from_utf8(&m.payload).ok();
    if json_output {
        let mut v = json!({
            "id": m.id,
            "recipient": m.recipient,
            "partition": pos.partition,
            "sequence": pos.sequence,
            "attempt": d.attempt,
            "headers": m.headers,
            "payload_len": m.payload.len(),
        });
        match text {
            Some(t) => v["payload_utf8"] = json!(t),
            None => v["payload_hex"] = json!(m.payload.iter().map(|b| format!("{b:02x}")).collect::<String>()),
        }
        println!("{v}");
    } else {
        let body = text.map(|t| t.trim_end().to_owned()).unwrap_or_else(|| format!("<{} bytes of binary>", m.payload.len()));
        println!("[partition {} seq {} attempt {}] {}: {}", pos.partition, pos.sequence, d.attempt, m.id, body);
    }
}

pub async fn consume(opts: &ClientOpts, args: ConsumeArgs) -> anyhow::Result<()> {
    if args.count == Some(0) {
        bail!("--count must be at least 1");
    }
    let credits = args.count.unwrap_or(256).min(256) as u32;
    let mut client = connect(opts).await?;
    let mut sub = client.subscribe(&args.from, credits).await.map_err(status_error)?;
    let idle = args.timeout_secs.map(Duration::from_secs).unwrap_or(Duration::from_secs(u64::MAX / 4));
    let mut received = 0u64;
    let mut acks_sent = 0u64;
    loop {
        if args.count.is_some_and(|c| received >= c) {
            break;
        }
        let event = tokio::select! {
            e = sub.next_event(idle) => e,
            _ = tokio::signal::ctrl_c() => break,
        };
        match event {
            Ok(Some(Event::Delivery(d))) => {
                received += 1;
                print_delivery(opts.json, &d);
                if !args.no_ack {
                    if let Some(pos) = d.position {
                        sub.ack(vec![pos]).await.map_err(status_error)?;
                        acks_sent += 1;
                    }
                }
                if args.count.is_none() || args.count.is_some_and(|c| received + u64::from(credits) <= c) {
                    sub.credit(1).await.map_err(status_error)?;
                }
            }
            Ok(Some(Event::Acked(_))) => {}
            Ok(None) => bail!("the server closed the subscription"),
            Err(s) if s.code() == tonic::Code::DeadlineExceeded => break,
            Err(s) => return Err(status_error(s)),
        }
    }
    // Only report success once the acks are committed: the messages are gone for good.
    sub.wait_acked(acks_sent, Duration::from_secs(30)).await.map_err(status_error)?;
    if !opts.json {
        eprintln!("{received} message(s) received, {acks_sent} acked");
    }
    Ok(())
}

pub async fn status(opts: &ClientOpts) -> anyhow::Result<()> {
    let mut client = connect(opts).await?;
    let s = client.cluster_status().await.map_err(status_error)?;
    if opts.json {
        let groups: Vec<_> = s
            .groups
            .iter()
            .map(|g| {
                json!({"group": g.group, "leader": g.leader, "term": g.term, "last_log_index": g.last_log_index,
                       "last_applied_index": g.last_applied_index, "voters": g.voters, "local_role": g.local_role})
            })
            .collect();
        let nodes: Vec<_> = s.nodes.iter().map(|n| json!({"id": n.id, "address": n.address})).collect();
        println!("{}", json!({"answered_by": s.node_id, "nodes": nodes, "groups": groups}));
        return Ok(());
    }
    println!("answered by node {} ({})", s.node_id, client.endpoint());
    println!("nodes:");
    for n in &s.nodes {
        println!("  {:>3}  {}", n.id, n.address);
    }
    println!("{:<10} {:>7} {:>6} {:>10} {:>10} {:<10} VOTERS", "GROUP", "LEADER", "TERM", "LAST LOG", "APPLIED", "THIS NODE");
    for g in &s.groups {
        let name = if g.group == 0 { "metadata".to_owned() } else { format!("shard {}", g.group) };
        let leader = g.leader.map(|l| l.to_string()).unwrap_or_else(|| "-".into());
        println!(
            "{:<10} {:>7} {:>6} {:>10} {:>10} {:<10} {:?}",
            name, leader, g.term, g.last_log_index, g.last_applied_index, g.local_role, g.voters
        );
    }
    Ok(())
}

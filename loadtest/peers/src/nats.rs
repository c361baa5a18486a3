//! NATS JetStream: each producer publishes to the stream's subject over its own connection and
//! awaits the PubAck (sent by the stream leader once the message is committed by a quorum of the
//! stream's Raft group; whether that implies an fsync is the server's `sync_interval` policy, not
//! the client's). Consumers share one durable pull consumer with explicit acks, each over its own
//! connection, and ack every message.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context as _};
use async_nats::jetstream::consumer::{pull, AckPolicy, PullConsumer};
use async_nats::jetstream::context::ContextBuilder;
use async_nats::jetstream::stream::{Config, DiscardPolicy, RetentionPolicy, StorageType};
use async_nats::jetstream::Context;
use async_nats::Subject;
use bytes::Bytes;
use futures::future::BoxFuture;
use futures::StreamExt;

use crate::stats::Recorder;
use crate::{AckFuture, Consumer, Publisher};

/// Name of the durable pull consumer, recreated by every run.
const CONSUMER: &str = "bench";
/// How long a publish may wait for its PubAck before it counts as an error.
const ACK_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(clap::Args, Debug, Clone)]
pub struct Args {
    /// Server URLs, comma-separated; connections are spread over them round robin.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "nats://127.0.0.1:4222,nats://127.0.0.1:4223,nats://127.0.0.1:4224"
    )]
    pub servers: Vec<String>,
    /// Stream name.
    #[arg(long, default_value = "BENCH")]
    pub stream: String,
    /// Subject the producers publish to (the stream's only subject).
    #[arg(long, default_value = "bench.msgs")]
    pub subject: String,
    /// Replicas when the stream is created (an existing stream must match).
    #[arg(long, default_value_t = 3)]
    pub replicas: usize,
    /// Retention when the stream is created: limits (a log) or workqueue (acked messages are removed).
    #[arg(long, default_value = "limits")]
    pub retention: String,
    /// Byte limit of the stream (oldest messages are discarded beyond it).
    #[arg(long, default_value_t = 8 << 30)]
    pub max_bytes: i64,
}

async fn connect(url: &str) -> anyhow::Result<Context> {
    let client = async_nats::connect(url)
        .await
        .with_context(|| format!("connecting to {url}"))?;
    Ok(ContextBuilder::new().timeout(ACK_TIMEOUT).build(client))
}

fn url(args: &Args, i: usize) -> anyhow::Result<&str> {
    match args.servers.len() {
        0 => bail!("--servers is empty"),
        n => Ok(&args.servers[i % n]),
    }
}

/// Creates the stream if it does not exist (R`replicas`, file storage) and checks it; returns
/// a description of it.
pub async fn setup(args: &Args) -> anyhow::Result<String> {
    let js = connect(url(args, 0)?).await?;
    let retention = match args.retention.as_str() {
        "limits" => RetentionPolicy::Limits,
        "workqueue" => RetentionPolicy::WorkQueue,
        other => bail!("--retention {other}: expected limits or workqueue"),
    };
    let mut stream = js
        .get_or_create_stream(Config {
            name: args.stream.clone(),
            subjects: vec![args.subject.clone()],
            storage: StorageType::File,
            num_replicas: args.replicas,
            retention,
            max_bytes: args.max_bytes,
            discard: DiscardPolicy::Old,
            ..Default::default()
        })
        .await
        .with_context(|| format!("creating stream {}", args.stream))?;
    let info = stream.info().await.context("stream info")?;
    let c = &info.config;
    if c.num_replicas != args.replicas || c.storage != StorageType::File {
        bail!(
            "stream {} exists with {} replicas and {:?} storage; delete it or pass matching options",
            c.name,
            c.num_replicas,
            c.storage
        );
    }
    let leader = info
        .cluster
        .as_ref()
        .and_then(|cl| cl.leader.clone())
        .unwrap_or_else(|| "-".into());
    Ok(format!(
        "NATS JetStream stream {} (subject {}): R{}, {:?} storage, {:?} retention, leader {leader}",
        c.name, args.subject, c.num_replicas, c.storage, c.retention
    ))
}

/// Purges the stream and recreates the durable pull consumer.
pub async fn reset(args: &Args) -> anyhow::Result<()> {
    let js = connect(url(args, 0)?).await?;
    let stream = js.get_stream(&args.stream).await.context("get stream")?;
    stream.purge().await.context("purge stream")?;
    // It may not exist yet; a real problem shows when creating it.
    let _ = stream.delete_consumer(CONSUMER).await;
    stream
        .create_consumer(pull::Config {
            durable_name: Some(CONSUMER.to_owned()),
            ack_policy: AckPolicy::Explicit,
            ack_wait: Duration::from_secs(30),
            max_ack_pending: 100_000,
            ..Default::default()
        })
        .await
        .context("create consumer")?;
    Ok(())
}

struct NatsPublisher {
    js: Context,
    subject: Subject,
}

impl Publisher for NatsPublisher {
    fn publish(&mut self, payload: Bytes) -> BoxFuture<'_, anyhow::Result<AckFuture>> {
        Box::pin(async move {
            let ack = self.js.publish(self.subject.clone(), payload).await?;
            let ack: AckFuture = Box::pin(async move {
                ack.await?;
                Ok(())
            });
            Ok(ack)
        })
    }
}

pub async fn publishers(args: &Args, n: usize) -> anyhow::Result<Vec<Box<dyn Publisher>>> {
    let mut out: Vec<Box<dyn Publisher>> = Vec::with_capacity(n);
    for i in 0..n {
        let js = connect(url(args, i)?).await?;
        out.push(Box::new(NatsPublisher {
            js,
            subject: Subject::from(args.subject.as_str()),
        }));
    }
    Ok(out)
}

struct NatsConsumer {
    messages: pull::Stream,
}

impl Consumer for NatsConsumer {
    fn run(mut self: Box<Self>, rec: Arc<Recorder>) -> BoxFuture<'static, ()> {
        Box::pin(async move {
            while let Some(m) = self.messages.next().await {
                match m {
                    Ok(m) => {
                        let redelivered = m.info().map(|i| i.delivered > 1).unwrap_or(false);
                        rec.record_delivery(&m.payload, redelivered);
                        if let Err(e) = m.ack().await {
                            rec.record_error(format!("consume ack: {e}"));
                        }
                    }
                    Err(e) => rec.record_error(format!("consume: {e}")),
                }
            }
        })
    }
}

pub async fn consumers(
    args: &Args,
    n: usize,
    prefetch: usize,
) -> anyhow::Result<Vec<Box<dyn Consumer>>> {
    let mut out: Vec<Box<dyn Consumer>> = Vec::with_capacity(n);
    for i in 0..n {
        let js = connect(url(args, i)?).await?;
        let stream = js.get_stream(&args.stream).await.context("get stream")?;
        let consumer: PullConsumer = stream
            .get_consumer(CONSUMER)
            .await
            .map_err(|e| anyhow::anyhow!("get consumer: {e}"))?;
        let messages = consumer
            .stream()
            .max_messages_per_batch(prefetch.max(1))
            .messages()
            .await
            .context("pull subscription")?;
        out.push(Box::new(NatsConsumer { messages }));
    }
    Ok(out)
}

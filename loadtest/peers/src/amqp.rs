//! RabbitMQ over AMQP 0.9.1: each producer publishes persistent messages to a quorum queue
//! (`x-queue-type: quorum`) through the default exchange on its own connection, with publisher
//! confirms on (the broker confirms once the message is committed by a quorum of the queue's Ra
//! group). Consumers each have their own connection, a per-consumer prefetch (`basic.qos`) and
//! ack every delivery individually (`basic.ack`, manual acknowledgement mode).

use std::sync::Arc;

use anyhow::{bail, Context as _};
use bytes::Bytes;
use futures::future::BoxFuture;
use futures::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicPublishOptions, BasicQosOptions,
    ConfirmSelectOptions, QueueDeclareOptions, QueuePurgeOptions,
};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};

use crate::stats::Recorder;
use crate::{AckFuture, Consumer, Publisher};

#[derive(clap::Args, Debug, Clone)]
pub struct Args {
    /// AMQP URIs, comma-separated; connections are spread over them round robin. The queue is
    /// declared through the first one (its leader starts there: `client-local` locator).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "amqp://guest:guest@127.0.0.1:5672/%2f,amqp://guest:guest@127.0.0.1:5673/%2f,amqp://guest:guest@127.0.0.1:5674/%2f"
    )]
    pub uris: Vec<String>,
    /// Queue name.
    #[arg(long, default_value = "bench")]
    pub queue: String,
}

fn uri(args: &Args, i: usize) -> anyhow::Result<&str> {
    match args.uris.len() {
        0 => bail!("--uris is empty"),
        n => Ok(&args.uris[i % n]),
    }
}

async fn connect(uri: &str) -> anyhow::Result<(Connection, Channel)> {
    let conn = Connection::connect(uri, ConnectionProperties::default())
        .await
        .with_context(|| format!("connecting to {uri}"))?;
    let channel = conn.create_channel().await.context("create channel")?;
    Ok((conn, channel))
}

fn quorum_args() -> FieldTable {
    let mut t = FieldTable::default();
    t.insert(
        "x-queue-type".into(),
        AMQPValue::LongString("quorum".into()),
    );
    t
}

/// Declares the durable quorum queue (idempotent; fails if the queue exists with another type).
pub async fn setup(args: &Args) -> anyhow::Result<String> {
    let (conn, channel) = connect(uri(args, 0)?).await?;
    let q = channel
        .queue_declare(
            args.queue.as_str().into(),
            QueueDeclareOptions {
                durable: true,
                ..Default::default()
            },
            quorum_args(),
        )
        .await
        .with_context(|| format!("declaring quorum queue {}", args.queue))?;
    let _ = conn.close(200, "setup done".into()).await;
    Ok(format!(
        "RabbitMQ quorum queue {} (x-queue-type quorum, durable, persistent messages), {} messages, {} consumers at setup",
        args.queue,
        q.message_count(),
        q.consumer_count()
    ))
}

/// Empties the queue.
pub async fn reset(args: &Args) -> anyhow::Result<()> {
    let (conn, channel) = connect(uri(args, 0)?).await?;
    channel
        .queue_purge(args.queue.as_str().into(), QueuePurgeOptions::default())
        .await
        .context("purge queue")?;
    let _ = conn.close(200, "reset done".into()).await;
    Ok(())
}

struct AmqpPublisher {
    _conn: Connection,
    channel: Channel,
    queue: ShortString,
}

impl Publisher for AmqpPublisher {
    fn publish(&mut self, payload: Bytes) -> BoxFuture<'_, anyhow::Result<AckFuture>> {
        Box::pin(async move {
            let confirm = self
                .channel
                .basic_publish(
                    "".into(),
                    self.queue.clone(),
                    BasicPublishOptions::default(),
                    &payload,
                    BasicProperties::default().with_delivery_mode(2),
                )
                .await?;
            let ack: AckFuture = Box::pin(async move {
                let c = confirm.await?;
                if c.is_ack() {
                    Ok(())
                } else if c.is_nack() {
                    bail!("basic.nack")
                } else {
                    bail!("no confirm (confirms not enabled)")
                }
            });
            Ok(ack)
        })
    }
}

pub async fn publishers(args: &Args, n: usize) -> anyhow::Result<Vec<Box<dyn Publisher>>> {
    let mut out: Vec<Box<dyn Publisher>> = Vec::with_capacity(n);
    for i in 0..n {
        let (conn, channel) = connect(uri(args, i)?).await?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .context("confirm.select")?;
        out.push(Box::new(AmqpPublisher {
            _conn: conn,
            channel,
            queue: args.queue.as_str().into(),
        }));
    }
    Ok(out)
}

struct AmqpConsumer {
    _conn: Connection,
    _channel: Channel,
    consumer: lapin::Consumer,
}

impl Consumer for AmqpConsumer {
    fn run(mut self: Box<Self>, rec: Arc<Recorder>) -> BoxFuture<'static, ()> {
        Box::pin(async move {
            while let Some(d) = self.consumer.next().await {
                match d {
                    Ok(d) => {
                        rec.record_delivery(&d.data, d.redelivered);
                        if let Err(e) = d.ack(BasicAckOptions::default()).await {
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
    let prefetch = u16::try_from(prefetch.clamp(1, 65_535)).unwrap_or(u16::MAX);
    let mut out: Vec<Box<dyn Consumer>> = Vec::with_capacity(n);
    for i in 0..n {
        let (conn, channel) = connect(uri(args, i)?).await?;
        channel
            .basic_qos(prefetch, BasicQosOptions::default())
            .await
            .context("basic.qos")?;
        let consumer = channel
            .basic_consume(
                args.queue.as_str().into(),
                format!("bench-{i}").into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await
            .context("basic.consume")?;
        out.push(Box::new(AmqpConsumer {
            _conn: conn,
            _channel: channel,
            consumer,
        }));
    }
    Ok(out)
}

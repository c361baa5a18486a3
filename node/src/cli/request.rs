//! `kerwen request` (send a request, wait for its reply) and `kerwen reply` (answer the
//! requests waiting in a mailbox): asynchronous request/reply, see [`crate::request_reply`].

use std::path::PathBuf;
use std::time::Duration;

use anyhow::bail;
use clap::Args;
use kerwen_proto::v1 as pb;

use super::{connect, print_delivery, random_id, read_payload, status_error, unseal, ClientOpts};
use crate::client::{Client, Event};

/// A payload from `--data`, `--file` or standard input.
#[derive(Debug, Args)]
pub struct PayloadArgs {
    /// Payload given inline.
    #[arg(long, conflicts_with = "file")]
    pub data: Option<String>,
    /// Payload read from a file (default: standard input).
    #[arg(long)]
    pub file: Option<PathBuf>,
    /// Seal the payload to the recipient subsystem's current encryption key.
    #[arg(long)]
    pub seal: bool,
}

impl PayloadArgs {
    fn read(&self) -> anyhow::Result<Vec<u8>> {
        read_payload(self.data.as_deref(), self.file.as_deref())
    }

    async fn for_recipient(&self, client: &mut Client, recipient: &str, payload: Vec<u8>) -> anyhow::Result<Vec<u8>> {
        if self.seal {
            return client.seal_for(recipient, &payload).await.map_err(status_error);
        }
        Ok(payload)
    }
}

#[derive(Debug, Args)]
pub struct RequestArgs {
    /// The provider's service (mailbox) the request goes to.
    #[arg(long)]
    pub to: String,
    /// The caller's own service (mailbox) the reply comes back to.
    #[arg(long)]
    pub reply_to: String,
    #[command(flatten)]
    pub payload: PayloadArgs,
    /// Request id (idempotency key); default: a random one.
    #[arg(long)]
    pub id: Option<String>,
    /// Give up waiting for the reply after this many seconds.
    #[arg(long, default_value_t = 60)]
    pub timeout_secs: u64,
}

#[derive(Debug, Args)]
pub struct ReplyArgs {
    /// The caller's mailbox whose requests are answered.
    #[arg(long)]
    pub from: String,
    /// The reply to every request (sealed to each requester with --seal).
    #[command(flatten)]
    pub payload: PayloadArgs,
    /// Stop after answering this many requests.
    #[arg(long)]
    pub count: Option<u64>,
    /// Stop when no request arrived for this many seconds.
    #[arg(long)]
    pub timeout_secs: Option<u64>,
}

pub async fn request(opts: &ClientOpts, args: RequestArgs) -> anyhow::Result<()> {
    let mut client = connect(opts).await?;
    let payload = args.payload.read()?;
    let payload = args.payload.for_recipient(&mut client, &args.to, payload).await?;
    let message = pb::Message {
        id: args.id.clone().unwrap_or_else(random_id),
        recipient: args.to.clone(),
        payload: payload.into(),
        ..Default::default()
    };
    let exchanged = client.request(message, &args.reply_to, Duration::from_secs(args.timeout_secs)).await.map_err(status_error)?;
    let mut reply = exchanged.reply;
    let keys = opts.key_store();
    let sealed = unseal(keys.as_ref(), &mut reply);
    print_delivery(opts.json, &reply, sealed.as_ref());
    Ok(())
}

pub async fn reply(opts: &ClientOpts, args: ReplyArgs) -> anyhow::Result<()> {
    if args.count == Some(0) {
        bail!("--count must be at least 1");
    }
    let answer = args.payload.read()?;
    let keys = opts.key_store();
    let mut client = connect(opts).await?;
    let mut replier = client.clone();
    let mut sub = client.subscribe(&args.from, 1).await.map_err(status_error)?;
    let idle = args.timeout_secs.map(Duration::from_secs).unwrap_or(Duration::from_secs(u64::MAX / 4));
    let mut answered = 0u64;
    while args.count.is_none_or(|c| answered < c) {
        let request = match sub.next_event(idle).await {
            Ok(Some(Event::Delivery(d))) => d,
            Ok(Some(Event::Acked(_))) => continue,
            Ok(None) => bail!("the server closed the subscription"),
            Err(s) if s.code() == tonic::Code::DeadlineExceeded => break,
            Err(s) => return Err(status_error(s)),
        };
        // The reply names the request's hash, over the bytes as delivered: open a copy.
        let mut shown = request.clone();
        let sealed = unseal(keys.as_ref(), &mut shown);
        print_delivery(opts.json, &shown, sealed.as_ref());
        let requester_reply_to = request.message.as_ref().and_then(|m| m.headers.get(kerwen_broker::request::HEADER_REPLY_TO)).cloned();
        let Some(reply_to) = requester_reply_to else {
            eprintln!("request asks for no reply; acked without one");
            sub.ack(request.position.into_iter().collect()).await.map_err(status_error)?;
            sub.credit(1).await.map_err(status_error)?;
            continue;
        };
        let payload = args.payload.for_recipient(&mut replier, &reply_to, answer.clone()).await?;
        let result = replier.reply(&request, payload, Duration::from_secs(30)).await.map_err(status_error)?;
        sub.ack(request.position.into_iter().collect()).await.map_err(status_error)?;
        sub.credit(1).await.map_err(status_error)?;
        answered += 1;
        if !opts.json {
            eprintln!("replied {} to {reply_to}", result.id);
        }
    }
    sub.wait_acked(answered, Duration::from_secs(30)).await.map_err(status_error)?;
    Ok(())
}

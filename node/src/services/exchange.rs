//! `kerwen.v1.Exchange`: publish and subscribe.
//!
//! Publish validates the whole batch first (nothing is stored if any message is bad), routes
//! each message to a partition (hash of its ordering key, else of its id, so a retry lands
//! where the first attempt did and is deduplicated there) and sends one Raft command per
//! shard, carrying the mailboxes' limits as that shard enforces them.
//!
//! Subscribe runs one pump task per shard of the mailbox (or of its dead-letter queue). Each
//! pump takes credits granted by the client, has the shard leader lease that many messages
//! (long-polling; the lease is a Raft command), and streams them. Acks, nacks and lease
//! extensions are replicated through the shard's Raft log; when the stream ends, the
//! consumer's remaining leases are released for redelivery.

use std::collections::{BTreeMap, BTreeSet};
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures::Stream;
use tracing::Instrument;
use sha2::{Digest, Sha256};
use kerwen_broker::access::Action;
use kerwen_broker::ids::ServiceId;
use kerwen_broker::request;
use kerwen_broker::model::{
    AttemptOutcome, Command, CommandResult, DeadLetter, GroupId, Leased, MailboxInfo, NewMessage, Position, SettleAction,
    StoredMessage,
};
use kerwen_broker::BrokerError;
use kerwen_proto::v1 as pb;
use kerwen_proto::v1::exchange_server::Exchange;
use pb::{subscribe_request, subscribe_response};
use tokio::sync::{mpsc, Semaphore};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::auth;
use crate::opmon::{ExchangeKind, OpRecord};
use crate::receipts;
use crate::runtime::{now_unix_ms, FetchArgs, NodeRuntime, ReadAnswer, ReadQuery};
use crate::status::to_status;
use crate::telemetry;

/// Longest accepted message id, in bytes.
pub const MAX_MESSAGE_ID_LEN: usize = 255;
/// Most deliveries one pump leases per fetch.
const MAX_FETCH: u32 = 256;
/// Most positions one ack or nack may carry.
const MAX_SETTLE_POSITIONS: usize = 4_096;
/// Ack writes in flight per subscription; more wait, which slows the stream's reader down.
const MAX_ACKS_IN_FLIGHT: usize = 64;
/// Most credits a consumer may have outstanding.
const MAX_OUTSTANDING_CREDITS: usize = 1 << 20;
/// How long a shard leader may hold a wait-for-messages call.
const FETCH_WAIT_MS: u64 = 1_000;
/// Longest time to live a message may ask for: one year.
const MAX_TTL_MS: u64 = 365 * 24 * 60 * 60 * 1000;
/// Longest nack delay or lease extension: 7 days.
const MAX_SETTLE_MS: u64 = 7 * 24 * 60 * 60 * 1000;

pub struct ExchangeService {
    runtime: Arc<NodeRuntime>,
}

impl ExchangeService {
    pub fn new(runtime: Arc<NodeRuntime>) -> Self {
        Self { runtime }
    }
}

/// How often an open subscription checks whether its mailbox grew.
const GROWTH_CHECK_INTERVAL: Duration = Duration::from_secs(1);

/// Response header of a publish that this node forwarded to another shard leader.
pub const ROUTE_STALE_HEADER: &str = "kerwen-route-stale";
/// Most mailboxes one `Routes` call may ask about.
const MAX_ROUTED_SERVICES: usize = 1024;

/// Checks everything of a message but its payload.
pub(crate) fn validate_header(m: &pb::Message, index: usize) -> Result<(), Status> {
    let bad = |what: String| Status::invalid_argument(format!("message {index}: {what}"));
    if m.id.is_empty() || m.id.len() > MAX_MESSAGE_ID_LEN {
        return Err(bad(format!("id must be 1..={MAX_MESSAGE_ID_LEN} bytes")));
    }
    if !m.id.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(bad("id must be printable ASCII without spaces".into()));
    }
    m.recipient.parse::<ServiceId>().map_err(|e| bad(format!("recipient: {e}")))?;
    if let Some(ttl) = m.ttl_ms {
        if ttl == 0 || ttl > MAX_TTL_MS {
            return Err(bad(format!("ttl_ms must be 1..={MAX_TTL_MS}, got {ttl}")));
        }
    }
    Ok(())
}

fn validate_message(m: &pb::Message, index: usize, max_payload: usize) -> Result<(), Status> {
    validate_header(m, index)?;
    if m.payload.is_empty() {
        return Err(Status::invalid_argument(format!("message {index}: payload is empty")));
    }
    if m.payload.len() > max_payload {
        return Err(Status::resource_exhausted(format!(
            "message {index}: payload of {} bytes exceeds the limit of {max_payload} bytes",
            m.payload.len()
        )));
    }
    Ok(())
}

/// Routes a validated message of `info`'s mailbox to its partition (hash of its ordering key,
/// else of its id) and shard, and makes the record to store.
pub(crate) fn routed_message(
    info: &MailboxInfo,
    m: pb::Message,
    sender: &str,
    accepted_unix_ms: i64,
    trace_context: Option<&str>,
) -> Result<(GroupId, NewMessage), Status> {
    let partition = info.partition_for(m.ordering_key.as_deref(), &m.id);
    let shard = info.shard_of(partition).ok_or_else(|| Status::internal("partition without shard"))?;
    let ttl_ms = m.ttl_ms.or((info.policy.default_ttl_ms > 0).then_some(info.policy.default_ttl_ms));
    let expires_unix_ms = ttl_ms.map(|ttl| accepted_unix_ms.saturating_add(i64::try_from(ttl).unwrap_or(i64::MAX)));
    // A message that carries its own creation context keeps it in its headers.
    let trace_context = trace_context.filter(|_| !m.headers.contains_key(telemetry::TRACEPARENT)).map(str::to_owned);
    let message = StoredMessage {
        id: m.id,
        recipient: m.recipient,
        sender: sender.to_owned(),
        headers: m.headers.into_iter().collect(),
        payload_sha256: Sha256::digest(&m.payload).into(),
        payload: m.payload,
        ordering_key: m.ordering_key,
        accepted_unix_ms,
        ttl_ms,
        expires_unix_ms,
        dead_letter: None,
        large: None,
        signed_as: None,
        trace_context,
    };
    Ok((shard, NewMessage { mailbox: info.id, partition, message }))
}

fn to_proto_message(m: StoredMessage) -> pb::Message {
    pb::Message {
        id: m.id,
        recipient: m.recipient,
        headers: m.headers.into_iter().collect(),
        payload: m.payload,
        ordering_key: m.ordering_key,
        ttl_ms: m.ttl_ms,
        sender: m.sender,
    }
}

pub(crate) fn to_proto_position(p: Position) -> pb::Position {
    pb::Position { partition: p.partition, sequence: p.sequence }
}

pub(crate) fn to_proto_dead_letter(d: &DeadLetter) -> pb::DeadLetterInfo {
    pb::DeadLetterInfo {
        reason: d.reason.as_str().to_owned(),
        from: Some(to_proto_position(d.from)),
        dead_lettered_unix_ms: d.dead_lettered_unix_ms,
        attempts: d.attempts,
        history: d
            .history
            .iter()
            .map(|a| pb::AttemptRecord {
                consumer: a.consumer,
                leased_unix_ms: a.leased_unix_ms,
                outcome: a.outcome.as_str().to_owned(),
                ended_unix_ms: match a.outcome {
                    AttemptOutcome::Leased { until_unix_ms } => until_unix_ms,
                    AttemptOutcome::Nacked { at_unix_ms }
                    | AttemptOutcome::Released { at_unix_ms }
                    | AttemptOutcome::Expired { at_unix_ms } => at_unix_ms,
                },
            })
            .collect(),
    }
}

fn to_delivery(l: Leased, encoder: &mut receipts::ReceiptEncoder) -> pb::SubscribeResponse {
    let dead_letter = l.message.dead_letter.as_ref().map(to_proto_dead_letter);
    let accepted_unix_ms = l.message.accepted_unix_ms;
    let expires_unix_ms = l.message.expires_unix_ms.unwrap_or(0);
    let large_payload =
        l.message.large.map(|p| pb::LargePayloadInfo { total_bytes: p.total_bytes, sha256: p.sha256.to_vec().into() });
    let receipt = l.receipt.as_ref().map(|r| encoder.encode(r));
    let traceparent = creation_context(&l.message).map(str::to_owned);
    pb::SubscribeResponse {
        event: Some(subscribe_response::Event::Delivery(pb::Delivery {
            message: Some(to_proto_message(l.message)),
            position: Some(to_proto_position(l.position)),
            attempt: l.attempt,
            lease_expires_unix_ms: l.lease_expires_unix_ms,
            dead_letter,
            accepted_unix_ms,
            expires_unix_ms,
            large_payload,
            receipt,
            traceparent,
        })),
    }
}

impl ExchangeService {
    /// Publish, inside its span; `trace_context` is stored with the messages. Also says, per
    /// message, whether it was a duplicate (known only when evidence is on).
    async fn publish_traced(
        &self,
        caller: Result<auth::Caller, Status>,
        request: Request<pb::PublishRequest>,
        trace_context: Option<String>,
    ) -> Result<(Response<pb::PublishResponse>, Vec<bool>), Status> {
        let caller = caller?;
        let messages = request.into_inner().messages;
        if messages.is_empty() {
            return Err(Status::invalid_argument("empty batch: publish at least one message"));
        }
        let max_payload = self.runtime.config.max_payload_bytes;
        for (i, m) in messages.iter().enumerate() {
            validate_message(m, i, max_payload)?;
        }
        let batch_bytes: usize = messages.iter().map(|m| m.payload.len()).sum();
        let max_batch = self.runtime.config.max_batch_bytes;
        if batch_bytes > max_batch {
            return Err(Status::resource_exhausted(format!(
                "batch of {batch_bytes} payload bytes exceeds the limit of {max_batch} bytes; split it"
            )));
        }
        let mut mailboxes: BTreeMap<String, MailboxInfo> = BTreeMap::new();
        // Messages and payload bytes per recipient, for the publish metrics.
        let mut per_mailbox: BTreeMap<String, (u64, u64)> = BTreeMap::new();
        let mut may_send: BTreeSet<String> = BTreeSet::new();
        for m in &messages {
            // A reply is allowed by the request it answers; anything else needs a grant.
            if !self.is_valid_reply(&caller, m).await? && !may_send.contains(&m.recipient) {
                auth::authorize(&self.runtime, &caller, Action::Send(auth::service_id("recipient", &m.recipient)?)).await?;
                may_send.insert(m.recipient.clone());
            }
            if let Some(reply_to) = request::reply_to_of(&m.headers, caller.subsystem()).map_err(to_status)? {
                self.runtime.mailbox(&reply_to.to_string()).await.map_err(to_status)?;
            }
            let bytes = m.payload.len() as u64;
            match per_mailbox.get_mut(&m.recipient) {
                Some(tally) => {
                    tally.0 += 1;
                    tally.1 += bytes;
                }
                None => {
                    let info = self.runtime.mailbox(&m.recipient).await.map_err(to_status)?;
                    mailboxes.insert(m.recipient.clone(), info);
                    per_mailbox.insert(m.recipient.clone(), (1, bytes));
                }
            }
        }

        let publisher = self.runtime.publisher(&caller);
        self.runtime.admit_publish(&publisher, messages.len() as u64, batch_bytes as u64).map_err(to_status)?;
        self.runtime.admit_evidence().map_err(to_status)?;
        let accepted_unix_ms = now_unix_ms();
        let started = std::time::Instant::now();
        let count = messages.len();
        let sender = caller.sender();
        let mut by_shard: BTreeMap<GroupId, (Vec<usize>, Vec<NewMessage>)> = BTreeMap::new();
        for (i, m) in messages.into_iter().enumerate() {
            let (shard, new) = routed_message(&mailboxes[&m.recipient], m, &sender, accepted_unix_ms, trace_context.as_deref())?;
            let entry = by_shard.entry(shard).or_default();
            entry.0.push(i);
            entry.1.push(new);
        }

        let shards: Vec<GroupId> = by_shard.keys().copied().collect();
        let writes = by_shard.into_iter().map(|(shard, (indices, batch))| {
            let runtime = self.runtime.clone();
            let limits = mailboxes
                .values()
                .filter(|info| batch.iter().any(|m| m.mailbox == info.id))
                .map(|info| runtime.shard_limits(&publisher, info, shard))
                .collect();
            async move {
                let facts: Vec<(String, [u8; 32])> = batch.iter().map(|m| (m.message.id.clone(), m.message.payload_sha256)).collect();
                let replicate = tracing::info_span!("replicate", shard, messaging.batch.message_count = batch.len());
                let (index, result) = runtime.write(shard, Command::Publish { messages: batch, limits }).instrument(replicate).await?;
                let (result, receipts, _) = result.split_receipts();
                match result {
                    CommandResult::Published(positions) if positions.len() == facts.len() => {
                        Ok::<_, BrokerError>((shard, index, indices, facts, positions, receipts))
                    }
                    CommandResult::Rejected(e) => Err(e),
                    other => Err(BrokerError::Internal(format!("unexpected publish result {other:?}"))),
                }
            }
        });
        let mut results: Vec<Option<pb::PublishResult>> = vec![None; count];
        let mut duplicates = vec![false; count];
        let mut encoder = receipts::BatchTable::default();
        for outcome in futures::future::join_all(writes).await {
            let (shard, index, indices, facts, positions, receipts) = outcome.map_err(to_status)?;
            let mut receipts = receipts.into_iter();
            for ((i, (id, payload_sha256)), pos) in indices.into_iter().zip(facts).zip(positions) {
                let receipt = receipts.next().flatten();
                duplicates[i] = receipt.as_ref().is_some_and(|r| r.first_accepted_unix_ms.is_some());
                results[i] = Some(pb::PublishResult {
                    id,
                    position: Some(to_proto_position(pos)),
                    shard,
                    commit_index: index,
                    // A duplicate answers with its first copy's receipt and accept time.
                    accepted_unix_ms: receipt.as_ref().and_then(|r| r.first_accepted_unix_ms).unwrap_or(accepted_unix_ms),
                    receipt: receipt.as_ref().map(|r| encoder.encode(&r.receipt)),
                    sender: sender.clone(),
                    payload_sha256: payload_sha256.to_vec().into(),
                });
            }
        }
        let results = results.into_iter().collect::<Option<Vec<_>>>().ok_or_else(|| Status::internal("missing result"))?;
        record_published(&sender, per_mailbox, started);
        let mut response = Response::new(pb::PublishResponse { results, batches: encoder.into_batches() });
        // A shard led elsewhere was forwarded to: a client sending straight to leaders should
        // refresh its routes.
        if shards.iter().any(|s| !self.runtime.leads(*s)) {
            response.metadata_mut().insert(ROUTE_STALE_HEADER, tonic::metadata::MetadataValue::from_static("1"));
        }
        Ok((response, duplicates))
    }

    /// Whether `m` is a reply (see [`kerwen_broker::request`]); an error when it claims to be
    /// one but does not answer a request the caller received, at the service it asked for.
    async fn is_valid_reply(&self, caller: &auth::Caller, m: &pb::Message) -> Result<bool, Status> {
        let Some(reply) = request::reply_ref(&m.headers).map_err(to_status)? else { return Ok(false) };
        // Administrators (and nodes) never send mail, replies included.
        if matches!(caller, auth::Caller::Authenticated(_)) && caller.subsystem().is_none() {
            return Err(Status::permission_denied(format!("{caller} may not send a reply: only the subsystem a request went to answers it")));
        }
        let info = self.runtime.mailbox(&reply.service.to_string()).await.map_err(to_status)?;
        let shard = info.shard_of(reply.partition).ok_or_else(|| {
            Status::invalid_argument(format!("{} has no partition {}", reply.service, reply.partition))
        })?;
        let query = ReadQuery::Request { mailbox: info.id, id: reply.id.clone() };
        let record = match self.runtime.read(shard, query).await.map_err(to_status)? {
            ReadAnswer::Request(record) => record,
            other => return Err(Status::internal(format!("unexpected answer {other:?}"))),
        };
        request::check_reply(record.as_ref(), &reply, caller.subsystem(), &m.recipient).map_err(to_status)?;
        Ok(true)
    }

    /// Files an operational record per message of a publish, accepted or refused.
    fn record_publish(
        &self,
        client: String,
        sent: Vec<SentMessage>,
        (started_unix_ms, started): (i64, std::time::Instant),
        outcome: &Result<(Response<pb::PublishResponse>, Vec<bool>), Status>,
    ) {
        let node = self.runtime.node_id();
        let duration_ms = started.elapsed().as_millis() as u64;
        let at_unix_ms = started_unix_ms.saturating_add(duration_ms as i64);
        let record = |(message_id, recipient, payload_bytes): SentMessage| OpRecord {
            kind: ExchangeKind::Publish,
            node,
            at_unix_ms,
            client: client.clone(),
            sender: client.clone(),
            recipient,
            message_id,
            payload_bytes,
            accepted_unix_ms: 0,
            duration_ms,
            attempt: 0,
            duplicate: false,
            fault: None,
        };
        match outcome {
            Ok((response, duplicates)) => {
                let results = &response.get_ref().results;
                self.runtime.opmon.record(sent.into_iter().zip(results.iter().zip(duplicates)).map(|(m, (r, duplicate))| OpRecord {
                    accepted_unix_ms: r.accepted_unix_ms,
                    duplicate: *duplicate,
                    ..record(m)
                }));
            }
            Err(status) => {
                let fault = format!("{:?}: {}", status.code(), status.message());
                self.runtime.opmon.record(sent.into_iter().map(|m| OpRecord { fault: Some(fault.clone()), ..record(m) }));
            }
        }
    }
}

/// A published message as the operational record needs it: id, recipient, payload bytes.
type SentMessage = (String, String, u64);

/// The W3C `traceparent` a message was created in (see [`StoredMessage::trace_context`]).
fn creation_context(m: &StoredMessage) -> Option<&str> {
    m.headers.iter().find(|(k, _)| k == telemetry::TRACEPARENT).map(|(_, v)| v.as_str()).or(m.trace_context.as_deref())
}

/// The span of one delivery, a child of the message's creation context (semantic
/// conventions allow the parent for a single message).
fn delivery_span(mailbox: &str, l: &Leased) -> tracing::Span {
    let span = tracing::info_span!(
        "deliver",
        otel.name = telemetry::operation_name("receive", mailbox).as_ref(),
        otel.kind = "server",
        messaging.system = telemetry::MESSAGING_SYSTEM,
        messaging.operation.type = "receive",
        messaging.operation.name = "receive",
        messaging.destination.name = mailbox,
        messaging.destination.partition.id = l.position.partition,
        messaging.message.id = l.message.id.as_str(),
        messaging.message.body.size = l.message.payload_len(),
        kerwen.attempt = l.attempt,
    );
    let tracestate = l.message.headers.iter().find(|(k, _)| k == telemetry::TRACESTATE).map(|(_, v)| v.as_str());
    telemetry::set_parent(&span, || creation_context(&l.message).and_then(|tp| telemetry::from_traceparent(tp, tracestate)));
    span
}

type SubscribeStream = Pin<Box<dyn Stream<Item = Result<pb::SubscribeResponse, Status>> + Send>>;

#[tonic::async_trait]
impl Exchange for ExchangeService {
    async fn publish(&self, request: Request<pb::PublishRequest>) -> Result<Response<pb::PublishResponse>, Status> {
        // Names are fixed when a span starts: work out the destination first.
        let messages = &request.get_ref().messages;
        let destination = if telemetry::enabled() { telemetry::single_destination(messages.iter().map(|m| m.recipient.as_str())) } else { "" };
        let span = tracing::info_span!(
            "publish",
            otel.name = telemetry::operation_name("send", destination).as_ref(),
            otel.kind = "server",
            messaging.system = telemetry::MESSAGING_SYSTEM,
            messaging.operation.type = "send",
            messaging.operation.name = "send",
            messaging.destination.name = destination,
            messaging.batch.message_count = messages.len(),
        );
        // The publisher's context (its send span) is the messages' creation context; without
        // one, this span is, when traced.
        let sent_context = request.metadata().get(telemetry::TRACEPARENT).and_then(|v| v.to_str().ok()).map(str::to_owned);
        telemetry::set_parent(&span, || telemetry::from_metadata(request.metadata()));
        let trace_context = sent_context.or_else(|| telemetry::traceparent_of(&span));
        let started = (now_unix_ms(), std::time::Instant::now());
        // The caller is read once, here: its records name it even when it is refused.
        let caller = auth::caller(&self.runtime, &request);
        let client = caller.as_ref().map(|c| c.sender()).unwrap_or_default();
        let sent: Vec<SentMessage> = messages.iter().map(|m| (m.id.clone(), m.recipient.clone(), m.payload.len() as u64)).collect();
        let outcome = self.publish_traced(caller, request, trace_context).instrument(span).await;
        self.record_publish(client, sent, started, &outcome);
        outcome.map(|(response, _)| response)
    }

    async fn routes(&self, request: Request<pb::RoutesRequest>) -> Result<Response<pb::RoutesResponse>, Status> {
        let caller = auth::caller(&self.runtime, &request)?;
        let services: BTreeSet<String> = request.into_inner().services.into_iter().collect();
        if services.len() > MAX_ROUTED_SERVICES {
            return Err(Status::invalid_argument(format!("ask for at most {MAX_ROUTED_SERVICES} mailboxes at once")));
        }
        let mut mailboxes = Vec::new();
        let mut shards = BTreeSet::new();
        for service in services {
            let Ok(id) = service.parse::<ServiceId>() else { continue };
            let usable = [Action::Send(id.clone()), Action::Consume(id)].iter().any(|a| auth::allowed_locally(&self.runtime, &caller, a));
            if !usable {
                continue;
            }
            let Ok(info) = self.runtime.mailbox(&service).await else { continue };
            shards.extend(info.partition_shards.iter().copied());
            let key_partitions = info.key_partitions;
            mailboxes.push(pb::MailboxRoute { service, partitions: info.partitions, partition_shards: info.partition_shards, key_partitions });
        }
        let registry = self.runtime.meta_view().nodes();
        let mut routes = Vec::with_capacity(shards.len());
        for shard in shards {
            let leader = self.runtime.leader_of(shard).await.ok().flatten();
            let client_address = leader.and_then(|l| registry.get(&l)).and_then(|n| n.client_address.clone()).unwrap_or_default();
            routes.push(pb::ShardRoute { shard, leader: leader.unwrap_or(0), client_address });
        }
        Ok(Response::new(pb::RoutesResponse { mailboxes, shards: routes }))
    }

    type SubscribeStream = SubscribeStream;
    type UploadStream = Pin<Box<dyn Stream<Item = Result<pb::UploadResponse, Status>> + Send>>;
    type DownloadStream = Pin<Box<dyn Stream<Item = Result<pb::DownloadChunk, Status>> + Send>>;

    async fn upload(&self, request: Request<Streaming<pb::UploadRequest>>) -> Result<Response<Self::UploadStream>, Status> {
        let caller = auth::caller(&self.runtime, &request)?;
        let (tx, rx) = mpsc::channel(16);
        tokio::spawn(super::transfer::upload(self.runtime.clone(), caller, request.into_inner(), tx));
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn download(&self, request: Request<pb::DownloadRequest>) -> Result<Response<Self::DownloadStream>, Status> {
        let caller = auth::caller(&self.runtime, &request)?;
        let req = request.into_inner();
        auth::authorize(&self.runtime, &caller, Action::Consume(auth::service_id("mailbox", &req.mailbox)?)).await?;
        // Two chunks in flight at most: memory stays bounded whatever the payload size.
        let (tx, rx) = mpsc::channel(2);
        tokio::spawn(super::transfer::download(self.runtime.clone(), req, tx));
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn subscribe(
        &self,
        request: Request<Streaming<pb::SubscribeRequest>>,
    ) -> Result<Response<Self::SubscribeStream>, Status> {
        let caller = auth::caller(&self.runtime, &request)?;
        let mut inbound = request.into_inner();
        let start = match inbound.message().await? {
            Some(pb::SubscribeRequest { request: Some(subscribe_request::Request::Start(start)) }) => start,
            _ => return Err(Status::invalid_argument("the first message of a subscription must be `start`")),
        };
        auth::authorize(&self.runtime, &caller, Action::Consume(auth::service_id("mailbox", &start.mailbox)?)).await?;
        let info = self.runtime.mailbox(&start.mailbox).await.map_err(to_status)?;
        let consumer: u64 = rand::random();
        let guard = self.runtime.subscription_guard();
        tracing::debug!(mailbox = %info.service, consumer, "subscription started");

        let (out_tx, out_rx) = mpsc::channel::<Result<pb::SubscribeResponse, Status>>(MAX_FETCH as usize);
        let credits = Arc::new(Semaphore::new((start.initial_credits as usize).min(MAX_OUTSTANDING_CREDITS)));
        let shards = if start.dead_letters { info.dead_letter_partitions_by_shard() } else { info.partitions_by_shard() };
        let delivered = Arc::new(Delivered { client: caller.sender(), mailbox: info.service.clone(), ..Default::default() });
        let mut pumps = Vec::new();
        for (shard, partitions) in &shards {
            let pump = Pump {
                runtime: self.runtime.clone(),
                mailbox: info.service.clone(),
                shard: *shard,
                args: FetchArgs {
                    consumer,
                    mailbox: info.id,
                    partitions: partitions.clone(),
                    max: 0,
                    policy: info.policy,
                    wait_ms: 0,
                },
                credits: credits.clone(),
                out: out_tx.clone(),
                delivered: delivered.clone(),
            };
            pumps.push(tokio::spawn(pump.run()));
        }

        let runtime = self.runtime.clone();
        let mailbox = info.id;
        let ack_slots = Arc::new(Semaphore::new(MAX_ACKS_IN_FLIGHT));
        let ending = self.runtime.subscriptions_ending();
        let mut growth_check = tokio::time::interval(GROWTH_CHECK_INTERVAL);
        growth_check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tokio::spawn(async move {
            tokio::pin!(ending);
            loop {
                let request = tokio::select! {
                    r = inbound.message() => match r {
                        Ok(Some(r)) => r.request,
                        Ok(None) | Err(_) => break,
                    },
                    () = &mut ending => {
                        let _ = out_tx.send(Err(Status::unavailable("this node is shutting down; subscribe again (through another node)"))).await;
                        break;
                    }
                    _ = growth_check.tick() => {
                        // The pumps cover the partitions the mailbox had when the stream began:
                        // a grown mailbox's stream ends, and the reopened one covers them all.
                        match runtime.meta_view().mailbox(&info.service) {
                            Some(now) if now.partitions > info.partitions => {
                                let message = format!("mailbox {} grew to {} partitions; subscribe again", info.service, now.partitions);
                                let _ = out_tx.send(Err(Status::unavailable(message))).await;
                                break;
                            }
                            _ => continue,
                        }
                    }
                };
                if let Err(status) = validate_settle(&request) {
                    let _ = out_tx.send(Err(status)).await;
                    break;
                }
                match request {
                    Some(subscribe_request::Request::Credits(n)) => {
                        // Outstanding credits are capped; more would only hold memory.
                        let room = MAX_OUTSTANDING_CREDITS.saturating_sub(credits.available_permits());
                        credits.add_permits((n as usize).min(room));
                    }
                    Some(subscribe_request::Request::Ack(settle)) => {
                        for (shard, (positions, attempts)) in group_acks(&info, settle) {
                            let Ok(slot) = ack_slots.clone().acquire_owned().await else { break };
                            let runtime = runtime.clone();
                            let out = out_tx.clone();
                            let delivered = delivered.clone();
                            tokio::spawn(async move {
                                let _slot = slot;
                                let cmd = Command::Ack { mailbox, positions: positions.clone(), consumer: Some(consumer), attempts };
                                let written = runtime.write(shard, cmd).await;
                                delivered.acked(&runtime, &positions, written.as_ref().err());
                                let event = match written {
                                    Ok((_, result)) => {
                                        let (_, _, deliveries) = result.split_receipts();
                                        let mut encoder = receipts::ReceiptEncoder::default();
                                        Ok(pb::SubscribeResponse {
                                            event: Some(subscribe_response::Event::Acked(pb::Settle {
                                                positions: positions.into_iter().map(to_proto_position).collect(),
                                                delay_ms: None,
                                                attempts: Vec::new(),
                                                receipts: deliveries.iter().map(|(p, d)| receipts::to_proto_ack(&mut encoder, *p, d)).collect(),
                                            })),
                                        })
                                    }
                                    Err(e) => Err(to_status(e)),
                                };
                                let _ = out.send(event).await;
                            });
                        }
                    }
                    Some(subscribe_request::Request::Nack(settle)) => {
                        delivered.forget(&settle.positions);
                        let action = SettleAction::Nack { delay_ms: settle.delay_ms };
                        settle_leases(&runtime, &info, consumer, group_positions(&info, settle.positions), action).await;
                    }
                    Some(subscribe_request::Request::Extend(extend)) => {
                        let until = now_unix_ms().saturating_add(extend.lease_ms as i64);
                        let action = SettleAction::Extend { until_unix_ms: until };
                        settle_leases(&runtime, &info, consumer, group_positions(&info, extend.positions), action).await;
                    }
                    Some(subscribe_request::Request::Start(_)) => {
                        let _ = out_tx.send(Err(Status::invalid_argument("subscription already started"))).await;
                        break;
                    }
                    None => {}
                }
            }
            for pump in pumps {
                pump.abort();
            }
            for shard in shards.keys() {
                let cmd = Command::ReleaseConsumer { mailbox, consumer, now_unix_ms: now_unix_ms() };
                if let Err(e) = runtime.write(*shard, cmd).await {
                    tracing::debug!(error = %e, shard, "release on disconnect failed; leases will expire");
                }
            }
            drop(guard);
            tracing::debug!(consumer, "subscription ended");
        });

        Ok(Response::new(Box::pin(ReceiverStream::new(out_rx))))
    }
}

/// Checks the size and bounds of an ack, nack or extension.
fn validate_settle(request: &Option<subscribe_request::Request>) -> Result<(), Status> {
    let (positions, millis) = match request {
        Some(subscribe_request::Request::Ack(s)) => {
            if !s.attempts.is_empty() && s.attempts.len() != s.positions.len() {
                return Err(Status::invalid_argument(format!(
                    "an ack's attempts must be absent or one per position: {} attempts for {} positions",
                    s.attempts.len(),
                    s.positions.len()
                )));
            }
            (s.positions.len(), None)
        }
        Some(subscribe_request::Request::Nack(s)) => (s.positions.len(), s.delay_ms),
        Some(subscribe_request::Request::Extend(e)) => (e.positions.len(), Some(e.lease_ms)),
        _ => return Ok(()),
    };
    if positions > MAX_SETTLE_POSITIONS {
        return Err(Status::invalid_argument(format!(
            "an ack, nack or extension may carry at most {MAX_SETTLE_POSITIONS} positions"
        )));
    }
    if millis.is_some_and(|ms| ms > MAX_SETTLE_MS) {
        return Err(Status::invalid_argument(format!("a nack delay or lease extension may be at most {MAX_SETTLE_MS} ms")));
    }
    Ok(())
}

/// Replicates a nack or lease extension per shard. A failure is logged, not fatal: the
/// lease then simply runs out and the message is redelivered.
async fn settle_leases(
    runtime: &NodeRuntime,
    info: &MailboxInfo,
    consumer: u64,
    by_shard: BTreeMap<GroupId, Vec<Position>>,
    action: SettleAction,
) {
    for (shard, positions) in by_shard {
        let cmd = Command::Settle { mailbox: info.id, consumer, positions, now_unix_ms: now_unix_ms(), action };
        if let Err(e) = runtime.write(shard, cmd).await {
            tracing::debug!(error = %e, shard, "settle not applied; the lease will run out instead");
        }
    }
}

fn group_positions(info: &MailboxInfo, positions: Vec<pb::Position>) -> BTreeMap<GroupId, Vec<Position>> {
    let settle = pb::Settle { positions, delay_ms: None, attempts: Vec::new(), receipts: Vec::new() };
    group_acks(info, settle).into_iter().map(|(shard, (positions, _))| (shard, positions)).collect()
}

/// An ack's positions per shard, each with its delivered attempt when the client gave them
/// (then the attempts list runs parallel to the positions; else it is empty).
fn group_acks(info: &MailboxInfo, settle: pb::Settle) -> BTreeMap<GroupId, (Vec<Position>, Vec<u32>)> {
    let with_attempts = settle.attempts.len() == settle.positions.len();
    let mut by_shard: BTreeMap<GroupId, (Vec<Position>, Vec<u32>)> = BTreeMap::new();
    for (i, p) in settle.positions.into_iter().enumerate() {
        if let Some(shard) = info.shard_of_any(p.partition) {
            let entry = by_shard.entry(shard).or_default();
            entry.0.push(Position { partition: p.partition, sequence: p.sequence });
            if with_attempts {
                entry.1.push(settle.attempts[i]);
            }
        }
    }
    by_shard
}

/// Counts an accepted publish (duplicates included: the publisher sent them).
fn record_published(sender: &str, per_mailbox: BTreeMap<String, (u64, u64)>, started: std::time::Instant) {
    metrics::histogram!("kerwen_publish_duration_seconds").record(started.elapsed().as_secs_f64());
    for (mailbox, (messages, bytes)) in per_mailbox {
        let labels = [("mailbox", mailbox), ("sender", sender.to_owned())];
        metrics::counter!("kerwen_publish_messages_total", &labels).increment(messages);
        metrics::counter!("kerwen_publish_bytes_total", &labels).increment(bytes);
    }
}

/// Most deliveries a subscription remembers until their ack, for its operational records.
const MAX_REMEMBERED_DELIVERIES: usize = MAX_OUTSTANDING_CREDITS;

/// What a subscription delivered and has not seen acked yet: its acks name positions only,
/// and their operational records, per-sender counters and end-to-end times need the rest.
#[derive(Default)]
struct Delivered {
    /// The consuming subsystem and the mailbox.
    client: String,
    mailbox: String,
    unacked: std::sync::Mutex<std::collections::HashMap<Position, DeliveredMessage>>,
}

#[derive(Clone)]
struct DeliveredMessage {
    sender: String,
    message_id: String,
    payload_bytes: u64,
    accepted_unix_ms: i64,
    attempt: u32,
}

impl Delivered {
    fn lock(&self) -> std::sync::MutexGuard<'_, std::collections::HashMap<Position, DeliveredMessage>> {
        self.unacked.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn record(&self, runtime: &NodeRuntime, kind: ExchangeKind, m: &DeliveredMessage, at_unix_ms: i64, fault: Option<String>) -> OpRecord {
        OpRecord {
            kind,
            node: runtime.node_id(),
            at_unix_ms,
            client: self.client.clone(),
            sender: m.sender.clone(),
            recipient: self.mailbox.clone(),
            message_id: m.message_id.clone(),
            payload_bytes: m.payload_bytes,
            accepted_unix_ms: m.accepted_unix_ms,
            duration_ms: at_unix_ms.saturating_sub(m.accepted_unix_ms).max(0) as u64,
            attempt: m.attempt,
            duplicate: false,
            fault,
        }
    }

    /// Records a fetch's deliveries and remembers them for their acks.
    fn delivering(&self, runtime: &NodeRuntime, leased: &[Leased]) {
        let now = now_unix_ms();
        let mut records = Vec::with_capacity(leased.len());
        let mut unacked = self.lock();
        for l in leased {
            let m = DeliveredMessage {
                sender: l.message.sender.clone(),
                message_id: l.message.id.clone(),
                payload_bytes: l.message.payload_len(),
                accepted_unix_ms: l.message.accepted_unix_ms,
                attempt: l.attempt,
            };
            records.push(self.record(runtime, ExchangeKind::Deliver, &m, now, None));
            if unacked.len() < MAX_REMEMBERED_DELIVERIES || unacked.contains_key(&l.position) {
                unacked.insert(l.position, m);
            }
        }
        drop(unacked);
        self.count(("kerwen_delivered_messages_total", "kerwen_delivered_bytes_total"), &records);
        runtime.opmon.record(records);
    }

    /// Records an ack of `positions` (failed with `error`, if any).
    fn acked(&self, runtime: &NodeRuntime, positions: &[Position], error: Option<&BrokerError>) {
        let now = now_unix_ms();
        let fault = error.map(|e| {
            let status = to_status(e.clone());
            format!("{:?}: {}", status.code(), status.message())
        });
        let mut unacked = self.lock();
        let acked: Vec<DeliveredMessage> = if fault.is_some() {
            // The message stays delivered: a retried ack may still settle it.
            positions.iter().filter_map(|p| unacked.get(p).cloned()).collect()
        } else {
            positions.iter().filter_map(|p| unacked.remove(p)).collect()
        };
        drop(unacked);
        let records: Vec<OpRecord> = acked.iter().map(|m| self.record(runtime, ExchangeKind::Ack, m, now, fault.clone())).collect();
        if fault.is_none() {
            for r in &records {
                metrics::histogram!("kerwen_end_to_end_seconds").record(r.duration_ms as f64 / 1000.0);
            }
            self.count(("kerwen_acked_messages_total", "kerwen_acked_bytes_total"), &records);
        }
        runtime.opmon.record(records);
    }

    /// Adds `records` to a pair of per-sender counters of this mailbox: messages and bytes.
    fn count(&self, (messages_family, bytes_family): (&'static str, &'static str), records: &[OpRecord]) {
        let mut per_sender: BTreeMap<&str, (u64, u64)> = BTreeMap::new();
        for r in records {
            let tally = per_sender.entry(&r.sender).or_default();
            tally.0 += 1;
            tally.1 += r.payload_bytes;
        }
        for (sender, (messages, bytes)) in per_sender {
            let labels = [("mailbox", self.mailbox.clone()), ("sender", sender.to_owned())];
            metrics::counter!(messages_family, &labels).increment(messages);
            metrics::counter!(bytes_family, &labels).increment(bytes);
        }
    }

    /// Forgets nacked deliveries (they come back as new deliveries).
    fn forget(&self, positions: &[pb::Position]) {
        let mut unacked = self.lock();
        for p in positions {
            unacked.remove(&Position { partition: p.partition, sequence: p.sequence });
        }
    }
}

/// Moves messages of one shard to one consumer stream as credits allow.
struct Pump {
    runtime: Arc<NodeRuntime>,
    /// The mailbox's service id, for metrics.
    mailbox: String,
    shard: GroupId,
    args: FetchArgs,
    credits: Arc<Semaphore>,
    out: mpsc::Sender<Result<pb::SubscribeResponse, Status>>,
    delivered: Arc<Delivered>,
}

impl Pump {
    /// Takes credits, leases that many messages without waiting, and streams them. When the
    /// shard has nothing, the credits go back at once (another shard's pump may use them) and
    /// the pump long-polls the leader for new messages without holding any.
    async fn run(self) {
        let mut encoder = receipts::ReceiptEncoder::default();
        loop {
            let Ok(first) = self.credits.acquire().await else { return };
            first.forget();
            let mut taken = 1u32;
            while taken < MAX_FETCH {
                match self.credits.try_acquire() {
                    Ok(p) => {
                        p.forget();
                        taken += 1;
                    }
                    Err(_) => break,
                }
            }
            let lease = FetchArgs { max: taken, wait_ms: 0, ..self.args.clone() };
            match self.runtime.fetch(self.shard, lease).await {
                Ok(leased) if !leased.is_empty() => {
                    self.credits.add_permits(taken as usize - leased.len().min(taken as usize));
                    self.delivered.delivering(&self.runtime, &leased);
                    for l in leased {
                        let span = if telemetry::enabled() { delivery_span(&self.mailbox, &l) } else { tracing::Span::none() };
                        if self.out.send(Ok(to_delivery(l, &mut encoder))).instrument(span).await.is_err() {
                            return;
                        }
                    }
                    continue;
                }
                Ok(_) => self.credits.add_permits(taken as usize),
                Err(e) => {
                    self.credits.add_permits(taken as usize);
                    if !self.retry_later(e).await {
                        return;
                    }
                    continue;
                }
            }
            let wait = FetchArgs { max: 0, wait_ms: FETCH_WAIT_MS, ..self.args.clone() };
            if let Err(e) = self.runtime.fetch(self.shard, wait).await {
                if !self.retry_later(e).await {
                    return;
                }
            }
            if self.out.is_closed() {
                return;
            }
        }
    }

    /// Pauses after a retryable error; reports any other error to the consumer and says stop.
    async fn retry_later(&self, e: BrokerError) -> bool {
        if e.is_retryable() {
            tokio::time::sleep(Duration::from_millis(100)).await;
            true
        } else {
            let _ = self.out.send(Err(to_status(e))).await;
            false
        }
    }
}

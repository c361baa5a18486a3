//! The Rust client used by the CLI, the tests and the load generator.
//!
//! A client is given several endpoints and uses the first that answers; calls that fail with
//! `UNAVAILABLE` are retried on the next endpoint (the cluster forwards everything else to the
//! right leader itself, so one healthy node is enough). A publish goes straight to the leader
//! of its messages' shard when the client knows it ([`routes`]), saving the forwarding hop,
//! and a subscription opens at the leader of most of its mailbox's shards.

mod routes;

use std::sync::Arc;
use std::time::Duration;

use kerwen_proto::v1::access_client::AccessClient;
use kerwen_proto::v1::admin_client::AdminClient;
use kerwen_broker::evidence::{KeyRing, PublicKeyRecord};
use kerwen_proto::v1::{
    AddMemberRequest, EncryptionKey, GrantRequest, ListEncryptionKeysRequest, ListSigningKeysRequest, Member, Quota, RegisterEncryptionKeyRequest,
};
use kerwen_proto::v1::exchange_client::ExchangeClient;
use kerwen_proto::v1::{
    subscribe_request, subscribe_response, ClusterStatusRequest, ClusterStatusResponse, CreateMailboxRequest, DeadLetter,
    DescribeMailboxRequest, Delivery, Extend, GrowMailboxRequest, ListDeadLettersRequest, ListMailboxesRequest, MailboxInfo, Message, Position,
    PublishRequest, PublishResponse, PublishResult, RedriveRequest, RoutesRequest, Settle, SubscribeRequest, SubscribeStart,
};
use kerwen_proto::v1::{upload_request, upload_response, DownloadChunk, DownloadRequest, UploadChunk, UploadRequest, UploadStart};
use tokio::sync::mpsc;
use tracing::Instrument;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Status, Streaming};

use crate::sealed::{KeyStore, SecretKey};
pub use crate::tls::ClientTls;

/// Largest message the client accepts or sends (payload limit plus framing).
pub const MAX_GRPC_MESSAGE_BYTES: usize = 256 * 1024 * 1024;

/// Default endpoints: the three nodes of `kerwen dev`.
pub const DEFAULT_ENDPOINTS: &str = "127.0.0.1:7001,127.0.0.1:7002,127.0.0.1:7003";

/// A connection to a Kerwen cluster.
#[derive(Clone)]
pub struct Client {
    endpoints: Vec<String>,
    current: usize,
    channel: Channel,
    tls: Option<ClientTls>,
    /// The shard map, shared by the clones of this client; `None` sends everything to the
    /// current endpoint.
    routes: Option<Arc<routes::Routes>>,
}

/// The key senders seal to, among a subsystem's registered keys: the newest not retired.
pub fn current_encryption_key(keys: &[EncryptionKey]) -> Option<&EncryptionKey> {
    keys.iter().filter(|k| k.valid_until_unix_ms.is_none()).max_by_key(|k| (k.valid_from_unix_ms, k.key_id.as_str()))
}

pub(crate) fn normalise(endpoint: &str, tls: bool) -> String {
    if endpoint.starts_with("http://") || endpoint.starts_with("https://") {
        endpoint.to_owned()
    } else if tls {
        format!("https://{endpoint}")
    } else {
        format!("http://{endpoint}")
    }
}

async fn open(endpoint: &str, tls: Option<&ClientTls>) -> Result<Channel, tonic::transport::Error> {
    let mut e = Endpoint::from_shared(normalise(endpoint, tls.is_some()))?;
    if let Some(tls) = tls {
        e = e.tls_config(tls.tonic_config())?;
    }
    e.connect_timeout(Duration::from_secs(2)).tcp_nodelay(true).connect().await
}

impl Client {
    /// Connects without TLS (a node run with `--insecure`) to the first reachable endpoint.
    pub async fn connect<S: AsRef<str>>(endpoints: &[S]) -> Result<Self, Status> {
        Self::connect_with(endpoints, None).await
    }

    /// Connects to the first reachable endpoint of `endpoints` (each `host:port` or a URL),
    /// over mutual TLS when `tls` is given.
    pub async fn connect_with<S: AsRef<str>>(endpoints: &[S], tls: Option<ClientTls>) -> Result<Self, Status> {
        let endpoints: Vec<String> = endpoints.iter().map(|e| e.as_ref().trim().to_owned()).filter(|e| !e.is_empty()).collect();
        if endpoints.is_empty() {
            return Err(Status::invalid_argument("no endpoint given"));
        }
        let mut last_error = String::new();
        for (i, endpoint) in endpoints.iter().enumerate() {
            match open(endpoint, tls.as_ref()).await {
                Ok(channel) => {
                    let routes = Some(Arc::new(routes::Routes::new(tls.clone())));
                    return Ok(Self { endpoints: endpoints.clone(), current: i, channel, tls, routes });
                }
                Err(e) => last_error = format!("{endpoint}: {}", error_chain(&e)),
            }
        }
        Err(Status::unavailable(format!("no endpoint reachable (last error: {last_error})")))
    }

    /// Parses a comma-separated endpoint list and connects without TLS.
    pub async fn connect_list(list: &str) -> Result<Self, Status> {
        Self::connect_list_with(list, None).await
    }

    /// Parses a comma-separated endpoint list and connects.
    pub async fn connect_list_with(list: &str, tls: Option<ClientTls>) -> Result<Self, Status> {
        let endpoints: Vec<&str> = list.split(',').collect();
        Self::connect_with(&endpoints, tls).await
    }

    /// Sends every publish and opens every subscription at the current endpoint, which
    /// forwards to the shard leaders, instead of going straight to the leaders (for clients
    /// that cannot reach the nodes' advertised addresses, to measure forwarding, or to use one
    /// node on purpose).
    pub fn without_direct_routing(mut self) -> Self {
        self.routes = None;
        self
    }

    /// The endpoint currently in use.
    pub fn endpoint(&self) -> &str {
        &self.endpoints[self.current]
    }

    pub fn exchange(&self) -> ExchangeClient<Channel> {
        ExchangeClient::new(self.channel.clone())
            .max_decoding_message_size(MAX_GRPC_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_GRPC_MESSAGE_BYTES)
    }

    pub fn admin(&self) -> AdminClient<Channel> {
        // Evidence exports can be large.
        AdminClient::new(self.channel.clone()).max_decoding_message_size(MAX_GRPC_MESSAGE_BYTES)
    }

    /// The channel to the current endpoint, for other gRPC clients (health checks).
    pub fn channel(&self) -> Channel {
        self.channel.clone()
    }

    pub fn access(&self) -> AccessClient<Channel> {
        AccessClient::new(self.channel.clone())
    }

    /// Registers a subsystem (admins).
    pub async fn add_member(&mut self, subsystem: &str, quota: Option<Quota>) -> Result<Member, Status> {
        let req = AddMemberRequest { subsystem: subsystem.to_owned(), quota };
        self.with_failover(|ch| {
            let req = req.clone();
            async move { AccessClient::new(ch).add_member(req).await.map(|r| r.into_inner()) }
        })
        .await
    }

    /// Lets `grantee` (a subsystem id or `group:NAME`) send to `service`.
    pub async fn grant(&mut self, service: &str, grantee: &str) -> Result<bool, Status> {
        let req = GrantRequest { service: service.to_owned(), grantee: grantee.to_owned() };
        self.with_failover(|ch| {
            let req = req.clone();
            async move { AccessClient::new(ch).grant(req).await.map(|r| r.into_inner().changed) }
        })
        .await
    }

    pub async fn revoke(&mut self, service: &str, grantee: &str) -> Result<bool, Status> {
        let req = GrantRequest { service: service.to_owned(), grantee: grantee.to_owned() };
        self.with_failover(|ch| {
            let req = req.clone();
            async move { AccessClient::new(ch).revoke(req).await.map(|r| r.into_inner().changed) }
        })
        .await
    }

    /// The encryption keys `subsystem` registered, current and retired.
    pub async fn encryption_keys(&mut self, subsystem: &str) -> Result<Vec<EncryptionKey>, Status> {
        let req = ListEncryptionKeysRequest { subsystem: subsystem.to_owned() };
        self.with_failover(|ch| {
            let req = req.clone();
            async move { AccessClient::new(ch).list_encryption_keys(req).await.map(|r| r.into_inner().keys) }
        })
        .await
    }

    /// The cluster's evidence signing keys, current and retired, as the ring receipts are
    /// verified against.
    pub async fn signing_key_ring(&mut self) -> Result<KeyRing, Status> {
        let keys = self
            .with_failover(|ch| async move { AccessClient::new(ch).list_signing_keys(ListSigningKeysRequest {}).await.map(|r| r.into_inner().keys) })
            .await?;
        let records = keys
            .into_iter()
            .map(|k| {
                let public_key: [u8; 32] =
                    k.public_key.as_ref().try_into().map_err(|_| Status::internal(format!("signing key {} is not 32 bytes", k.key_id)))?;
                Ok(PublicKeyRecord { key_id: k.key_id, public_key, valid_from_unix_ms: k.valid_from_unix_ms, valid_until_unix_ms: k.valid_until_unix_ms })
            })
            .collect::<Result<Vec<_>, Status>>()?;
        Ok(KeyRing::new(records))
    }

    /// Generates an encryption key pair for `subsystem` (the identity this client connects
    /// as), saves the private half in `store`, then registers the public half; in that order,
    /// because a registered key whose private half was lost would make every message sealed
    /// to it unreadable. The key id defaults to `k` + the current Unix time in milliseconds.
    pub async fn generate_encryption_key(&mut self, store: &mut KeyStore, subsystem: &str, key_id: Option<String>) -> anyhow::Result<EncryptionKey> {
        let now = crate::runtime::now_unix_ms();
        let key_id = key_id.unwrap_or_else(|| format!("k{now}"));
        let key = SecretKey::generate(subsystem, &key_id, now);
        let public_key = key.public_key;
        store.add(key).map_err(|e| anyhow::anyhow!("saving the private key {key_id}: {e}"))?;
        let req = RegisterEncryptionKeyRequest { subsystem: subsystem.to_owned(), key_id: key_id.clone(), public_key: public_key.to_vec().into() };
        self.with_failover(|ch| {
            let req = req.clone();
            async move { AccessClient::new(ch).register_encryption_key(req).await.map(|r| r.into_inner()) }
        })
        .await
        .map_err(|s| anyhow::anyhow!("registering the encryption key {key_id}: {} ({:?})", s.message(), s.code()))
    }

    /// Seals `payload` to the current encryption key of the subsystem that owns the service
    /// `recipient` (see [`crate::sealed`]). `FAILED_PRECONDITION` when it registered none.
    pub async fn seal_for(&mut self, recipient: &str, payload: &[u8]) -> Result<Vec<u8>, Status> {
        let service: kerwen_broker::ids::ServiceId =
            recipient.parse().map_err(|e| Status::invalid_argument(format!("recipient {recipient}: {e}")))?;
        let keys = self.encryption_keys(&service.subsystem.to_string()).await?;
        let key = current_encryption_key(&keys).ok_or_else(|| {
            Status::failed_precondition(format!("{} has no current encryption key (kerwen keys generate, as that subsystem)", service.subsystem))
        })?;
        let public_key: [u8; 32] =
            key.public_key.as_ref().try_into().map_err(|_| Status::internal(format!("encryption key {} is not 32 bytes", key.key_id)))?;
        crate::sealed::seal(recipient, &key.key_id, &public_key, payload).map_err(|e| Status::internal(e.to_string()))
    }

    /// Switches to the next reachable endpoint after the current one failed.
    async fn fail_over(&mut self) -> bool {
        for step in 1..self.endpoints.len() {
            let i = (self.current + step) % self.endpoints.len();
            if let Ok(channel) = open(&self.endpoints[i], self.tls.as_ref()).await {
                self.current = i;
                self.channel = channel;
                return true;
            }
        }
        false
    }

    /// Runs `call`, failing over to other endpoints while it returns `UNAVAILABLE` because the
    /// node itself is unreachable.
    async fn with_failover<T, F, Fut>(&mut self, mut call: F) -> Result<T, Status>
    where
        F: FnMut(Channel) -> Fut,
        Fut: std::future::Future<Output = Result<T, Status>>,
    {
        let mut attempts = self.endpoints.len();
        loop {
            match call(self.channel.clone()).await {
                Err(status) if status.code() == Code::Unavailable && is_transport_error(&status) && attempts > 1 => {
                    attempts -= 1;
                    if !self.fail_over().await {
                        return Err(status);
                    }
                }
                other => return other,
            }
        }
    }

    /// Creates a mailbox with the default limits.
    pub async fn create_mailbox(&mut self, service: &str, partitions: u32) -> Result<MailboxInfo, Status> {
        self.create_mailbox_with(CreateMailboxRequest { service: service.to_owned(), partitions, ..Default::default() }).await
    }

    pub async fn create_mailbox_with(&mut self, req: CreateMailboxRequest) -> Result<MailboxInfo, Status> {
        self.with_failover(|ch| {
            let req = req.clone();
            async move { AdminClient::new(ch).create_mailbox(req).await.map(|r| r.into_inner()) }
        })
        .await
    }

    /// Adds partitions to a mailbox, up to `partitions` in all.
    pub async fn grow_mailbox(&mut self, service: &str, partitions: u32) -> Result<MailboxInfo, Status> {
        let req = GrowMailboxRequest { service: service.to_owned(), partitions };
        self.with_failover(|ch| {
            let req = req.clone();
            async move { AdminClient::new(ch).grow_mailbox(req).await.map(|r| r.into_inner()) }
        })
        .await
    }

    pub async fn describe_mailbox(&mut self, service: &str) -> Result<MailboxInfo, Status> {
        let req = DescribeMailboxRequest { service: service.to_owned() };
        self.with_failover(|ch| {
            let req = req.clone();
            async move { AdminClient::new(ch).describe_mailbox(req).await.map(|r| r.into_inner()) }
        })
        .await
    }

    pub async fn list_mailboxes(&mut self) -> Result<Vec<MailboxInfo>, Status> {
        self.with_failover(|ch| async move {
            AdminClient::new(ch).list_mailboxes(ListMailboxesRequest {}).await.map(|r| r.into_inner().mailboxes)
        })
        .await
    }

    pub async fn cluster_status(&mut self) -> Result<ClusterStatusResponse, Status> {
        self.with_failover(|ch| async move {
            AdminClient::new(ch).cluster_status(ClusterStatusRequest {}).await.map(|r| r.into_inner())
        })
        .await
    }

    /// The Raft groups without a known leader in `status`, `None` while it lists no group yet.
    /// A group counts as led when the answering node knows its leader or the cluster-wide
    /// replica map has one: a node whose replica of a group was moved away no longer hears
    /// from that group's leader, so its own view alone would never look complete.
    pub fn leaderless_groups(status: &ClusterStatusResponse) -> Option<Vec<u32>> {
        let led: std::collections::HashSet<u32> = status.replicas.iter().filter(|r| r.leader != 0).map(|r| r.group).collect();
        let leaderless = status.groups.iter().filter(|g| g.leader.is_none() && !led.contains(&g.group)).map(|g| g.group).collect();
        (!status.groups.is_empty()).then_some(leaderless)
    }

    /// Registers a node (or re-admits a removed one) at its peer address.
    pub async fn join_node(&mut self, id: u64, address: String, zone: Option<String>) -> Result<(), Status> {
        let req = kerwen_proto::v1::JoinNodeRequest { id, address, zone };
        self.with_failover(|ch| {
            let req = req.clone();
            async move { AdminClient::new(ch).join_node(req).await.map(|_| ()) }
        })
        .await
    }

    /// Starts moving every replica off node `id`.
    pub async fn drain_node(&mut self, id: u64) -> Result<(), Status> {
        self.with_failover(|ch| async move {
            AdminClient::new(ch).drain_node(kerwen_proto::v1::DrainNodeRequest { id }).await.map(|_| ())
        })
        .await
    }

    /// Removes drained node `id` (refused while it holds replicas).
    pub async fn remove_node(&mut self, id: u64) -> Result<(), Status> {
        self.with_failover(|ch| async move {
            AdminClient::new(ch).remove_node(kerwen_proto::v1::RemoveNodeRequest { id }).await.map(|_| ())
        })
        .await
    }

    /// Publishes one batch; the response holds one result per message, in order, each
    /// receipt with its signed batch (filled in from the response's table).
    /// When the process exports traces, this is a producer span whose context travels with
    /// the request (`traceparent`), so deliveries of these messages join its trace.
    pub async fn publish(&mut self, messages: Vec<Message>) -> Result<PublishResponse, Status> {
        let destination = if crate::telemetry::enabled() {
            crate::telemetry::single_destination(messages.iter().map(|m| m.recipient.as_str()))
        } else {
            ""
        };
        let span = tracing::info_span!(
            "send",
            otel.name = crate::telemetry::operation_name("send", destination).as_ref(),
            otel.kind = "producer",
            messaging.system = crate::telemetry::MESSAGING_SYSTEM,
            messaging.operation.type = "send",
            messaging.operation.name = "send",
            messaging.destination.name = destination,
            messaging.batch.message_count = messages.len(),
        );
        self.publish_routed(messages).instrument(span).await.map(|mut response| {
            crate::receipts::fill_batches(&mut response);
            response
        })
    }

    /// Sends the batch to the node leading the shard of most of its messages, when the shard
    /// map knows it, else to the current endpoint.
    async fn publish_routed(&mut self, messages: Vec<Message>) -> Result<PublishResponse, Status> {
        let Some(routes) = self.routes.clone() else { return self.publish_here(messages).await };
        let wanted = routes.to_refresh(&messages);
        if !wanted.is_empty() {
            self.refresh_routes(&routes, wanted).await;
        }
        let Some((address, channel)) = routes.target(&messages) else { return self.publish_here(messages).await };
        let req = PublishRequest { messages };
        match send_publish(channel, req.clone()).await {
            Err(status) if status.code() == Code::Unavailable && is_transport_error(&status) => {
                routes.mark_unreachable(&address);
                self.publish_here(req.messages).await
            }
            other => other.map(|answer| routes.note(answer)),
        }
    }

    /// Publishes through the current endpoint (which forwards what it does not lead), failing
    /// over to the next endpoint when it is down.
    async fn publish_here(&mut self, messages: Vec<Message>) -> Result<PublishResponse, Status> {
        let req = PublishRequest { messages };
        let answer = self.with_failover(|ch| send_publish(ch, req.clone())).await?;
        Ok(match &self.routes {
            Some(routes) => routes.note(answer),
            None => answer.0,
        })
    }

    /// Fetches the routes of `services`; without them the publish simply goes through the
    /// current endpoint, and a node too old to answer turns direct routing off.
    async fn refresh_routes(&mut self, routes: &routes::Routes, services: Vec<String>) {
        let req = RoutesRequest { services };
        let answer = self
            .with_failover(|ch| {
                let req = req.clone();
                async move { ExchangeClient::new(ch).routes(req).await.map(|r| r.into_inner()) }
            })
            .await;
        match answer {
            Ok(answer) => routes.update(answer),
            Err(status) if status.code() == Code::Unimplemented => self.routes = None,
            Err(status) => tracing::debug!(error = %status, "fetching routes failed; publishing through the endpoint"),
        }
    }

    /// Dead letters of a mailbox (up to `limit`, 0 for the server's default), without payloads.
    pub async fn list_dead_letters(&mut self, mailbox: &str, limit: u32) -> Result<Vec<DeadLetter>, Status> {
        let req = ListDeadLettersRequest { mailbox: mailbox.to_owned(), limit };
        self.with_failover(|ch| {
            let req = req.clone();
            async move { AdminClient::new(ch).list_dead_letters(req).await.map(|r| r.into_inner().dead_letters) }
        })
        .await
    }

    /// Moves dead letters back into their mailbox (`positions`, or all of them); returns how
    /// many moved.
    pub async fn redrive(&mut self, mailbox: &str, positions: Vec<Position>, all: bool) -> Result<u64, Status> {
        let req = RedriveRequest { mailbox: mailbox.to_owned(), positions, all };
        self.with_failover(|ch| {
            let req = req.clone();
            async move { AdminClient::new(ch).redrive_dead_letters(req).await.map(|r| r.into_inner().redriven) }
        })
        .await
    }

    /// Publishes one message whose payload (`total_bytes`, hashing to `sha256`) is streamed
    /// in chunks of `chunk_bytes` read from `source(offset, len)`. If an earlier upload of the
    /// same message id was interrupted, the cluster says how much it already holds and only
    /// the rest is sent. One stream, no retry: on error, call again to resume.
    pub async fn upload<F>(&mut self, upload: Upload, mut source: F) -> Result<UploadOutcome, Status>
    where
        F: FnMut(u64, usize) -> std::io::Result<bytes::Bytes> + Send + 'static,
    {
        let Upload { message, total_bytes, sha256, chunk_bytes } = upload;
        let (tx, rx) = mpsc::channel::<UploadRequest>(4);
        let start = UploadStart { message: Some(message), total_bytes, sha256: sha256.to_vec().into() };
        tx.send(UploadRequest { request: Some(upload_request::Request::Start(start)) })
            .await
            .map_err(|_| Status::internal("upload stream closed"))?;
        let mut client = ExchangeClient::new(self.channel.clone());
        let mut responses = client.upload(ReceiverStream::new(rx)).await?.into_inner();
        let mut outcome = UploadOutcome { resumed_from: 0, stored: 0, result: None };
        let first = responses.message().await?.and_then(|r| r.event);
        let mut offset = match first {
            Some(upload_response::Event::NextOffset(next)) => next,
            Some(upload_response::Event::Published(result)) => {
                outcome.result = Some(result);
                return Ok(outcome);
            }
            other => return Err(Status::internal(format!("unexpected first upload answer {other:?}"))),
        };
        outcome.resumed_from = offset;
        // Chunks go out from a task (at most 4 queued) while answers are read here.
        let sender = tokio::spawn(async move {
            while offset < total_bytes {
                let len = chunk_bytes.min(usize::try_from(total_bytes - offset).unwrap_or(usize::MAX));
                let data = source(offset, len).map_err(|e| Status::internal(format!("reading the payload at {offset}: {e}")))?;
                if data.len() != len {
                    return Err(Status::internal(format!("payload source gave {} bytes at {offset}, wanted {len}", data.len())));
                }
                let chunk = UploadChunk { offset, data };
                if tx.send(UploadRequest { request: Some(upload_request::Request::Chunk(chunk)) }).await.is_err() {
                    break;
                }
                offset += len as u64;
            }
            Ok(())
        });
        let answer = loop {
            match responses.message().await {
                Ok(Some(r)) => match r.event {
                    Some(upload_response::Event::StoredOffset(stored)) => outcome.stored = stored,
                    Some(upload_response::Event::Published(result)) => {
                        outcome.stored = total_bytes;
                        outcome.result = Some(result);
                        break Ok(outcome);
                    }
                    _ => {}
                },
                Ok(None) => break Err(Status::unavailable(format!("upload stream ended at {} of {total_bytes} bytes", outcome.stored))),
                Err(s) => break Err(s),
            }
        };
        // A failure to read the payload explains a broken stream better than the stream does.
        if answer.is_err() && sender.is_finished() {
            if let Ok(Err(e)) = sender.await {
                return Err(e);
            }
        } else {
            sender.abort();
        }
        answer
    }

    /// Streams the chunked payload of a delivered message from byte `offset`.
    pub async fn download(&mut self, mailbox: &str, position: Position, offset: u64) -> Result<Streaming<DownloadChunk>, Status> {
        let req = DownloadRequest { mailbox: mailbox.to_owned(), position: Some(position), offset };
        let mut client = ExchangeClient::new(self.channel.clone()).max_decoding_message_size(MAX_GRPC_MESSAGE_BYTES);
        Ok(client.download(req).await?.into_inner())
    }

    /// Opens a consumer stream on `mailbox` with `credits` granted up front.
    pub async fn subscribe(&mut self, mailbox: &str, credits: u32) -> Result<Subscription, Status> {
        self.subscribe_to(mailbox, credits, false).await
    }

    /// Opens a consumer stream on the mailbox's dead-letter queue (`dead_letters`) or on the
    /// mailbox itself: at the node leading most of the mailbox's shards when the shard map knows
    /// it (fewer fetches and acks forwarded), else at the current endpoint.
    pub async fn subscribe_to(&mut self, mailbox: &str, credits: u32, dead_letters: bool) -> Result<Subscription, Status> {
        if let Some(routes) = self.routes.clone() {
            // Always asked afresh: subscriptions are long-lived and rare, and one reopened after
            // a failure should not go back to where a stale map says.
            self.refresh_routes(&routes, vec![mailbox.to_owned()]).await;
            if let Some((address, channel)) = routes.subscription_target(mailbox) {
                match open_subscription(channel, mailbox.to_owned(), credits, dead_letters).await {
                    Err(status) if status.code() == Code::Unavailable && is_transport_error(&status) => {
                        routes.mark_unreachable(&address);
                    }
                    other => return other,
                }
            }
        }
        self.with_failover(|ch| open_subscription(ch, mailbox.to_owned(), credits, dead_letters)).await
    }
}

/// Opens a consumer stream at the node behind `channel`.
async fn open_subscription(channel: Channel, mailbox: String, credits: u32, dead_letters: bool) -> Result<Subscription, Status> {
    let (tx, rx) = mpsc::channel(64);
    let start = SubscribeStart { mailbox, initial_credits: credits, dead_letters };
    let start = SubscribeRequest { request: Some(subscribe_request::Request::Start(start)) };
    tx.send(start).await.map_err(|_| Status::internal("request stream closed"))?;
    let mut client = ExchangeClient::new(channel).max_decoding_message_size(MAX_GRPC_MESSAGE_BYTES);
    let inbound = client.subscribe(ReceiverStream::new(rx)).await?.into_inner();
    Ok(Subscription { tx, inbound, acked: 0, received: Default::default(), ack_receipts: Vec::new() })
}

/// A large message to upload: the message without payload, and its payload's size and hash.
#[derive(Debug, Clone)]
pub struct Upload {
    pub message: Message,
    pub total_bytes: u64,
    pub sha256: [u8; 32],
    /// Bytes per chunk (at most 1 MiB).
    pub chunk_bytes: usize,
}

/// How an upload went.
#[derive(Debug, Clone)]
pub struct UploadOutcome {
    /// Where this stream started: more than 0 when an interrupted upload was resumed.
    pub resumed_from: u64,
    /// Bytes the cluster confirmed stored.
    pub stored: u64,
    /// Set once the whole message is stored.
    pub result: Option<PublishResult>,
}

/// tonic reports connection failures as UNAVAILABLE with the transport error as source;
/// a status sent by a node (e.g. no quorum) never has one, and must not trigger failover.
fn is_transport_error(status: &Status) -> bool {
    use std::error::Error;
    status.source().is_some()
}

/// What the server sent on a consumer stream.
#[derive(Debug)]
pub enum Event {
    Delivery(Delivery),
    /// These positions' acks are committed: the messages are gone from the cluster.
    Acked(Vec<Position>),
}

/// An open consumer stream.
pub struct Subscription {
    tx: mpsc::Sender<SubscribeRequest>,
    inbound: Streaming<kerwen_proto::v1::SubscribeResponse>,
    acked: u64,
    /// The attempt each position was last received as, until its ack is confirmed: acks
    /// name it, so an ack of an attempt the cluster has since redelivered is not applied.
    received: std::collections::HashMap<(u32, u64), u32>,
    /// Delivery receipts of confirmed acks, until taken.
    ack_receipts: Vec<kerwen_proto::v1::AckReceipt>,
}

impl Subscription {
    async fn send(&self, request: subscribe_request::Request) -> Result<(), Status> {
        self.tx
            .send(SubscribeRequest { request: Some(request) })
            .await
            .map_err(|_| Status::unavailable("subscription closed by the server"))
    }

    /// Grants `n` more deliveries.
    pub async fn credit(&self, n: u32) -> Result<(), Status> {
        self.send(subscribe_request::Request::Credits(n)).await
    }

    pub async fn ack(&self, positions: Vec<Position>) -> Result<(), Status> {
        let attempts: Option<Vec<u32>> =
            positions.iter().map(|p| self.received.get(&(p.partition, p.sequence)).copied()).collect();
        let attempts = attempts.unwrap_or_default();
        self.send(subscribe_request::Request::Ack(Settle { positions, delay_ms: None, attempts, receipts: Vec::new() })).await
    }

    /// Gives messages back for redelivery after the mailbox's back-off.
    pub async fn nack(&self, positions: Vec<Position>) -> Result<(), Status> {
        self.send(subscribe_request::Request::Nack(Settle { positions, delay_ms: None, attempts: Vec::new(), receipts: Vec::new() })).await
    }

    /// Gives messages back for redelivery no earlier than `delay` from now.
    pub async fn nack_after(&self, positions: Vec<Position>, delay: Duration) -> Result<(), Status> {
        let delay_ms = Some(delay.as_millis() as u64);
        self.send(subscribe_request::Request::Nack(Settle { positions, delay_ms, attempts: Vec::new(), receipts: Vec::new() })).await
    }

    /// Extends the leases of messages this stream holds to end `lease` from now.
    pub async fn extend(&self, positions: Vec<Position>, lease: Duration) -> Result<(), Status> {
        self.send(subscribe_request::Request::Extend(Extend { positions, lease_ms: lease.as_millis() as u64 })).await
    }

    /// Next event, `None` when the server ended the stream, `Err(DEADLINE_EXCEEDED)` when
    /// nothing arrived within `timeout`.
    pub async fn next_event(&mut self, timeout: Duration) -> Result<Option<Event>, Status> {
        loop {
            let msg = match tokio::time::timeout(timeout, self.inbound.message()).await {
                Ok(msg) => msg?,
                Err(_) => return Err(Status::deadline_exceeded("no event within the timeout")),
            };
            let Some(msg) = msg else { return Ok(None) };
            match msg.event {
                Some(subscribe_response::Event::Delivery(d)) => {
                    if let Some(p) = d.position {
                        self.received.insert((p.partition, p.sequence), d.attempt);
                    }
                    return Ok(Some(Event::Delivery(d)));
                }
                Some(subscribe_response::Event::Acked(s)) => {
                    for p in &s.positions {
                        self.received.remove(&(p.partition, p.sequence));
                    }
                    self.acked += s.positions.len() as u64;
                    self.ack_receipts.extend(s.receipts);
                    return Ok(Some(Event::Acked(s.positions)));
                }
                None => continue,
            }
        }
    }

    /// Next delivery, skipping ack confirmations.
    pub async fn next_delivery(&mut self, timeout: Duration) -> Result<Option<Delivery>, Status> {
        loop {
            match self.next_event(timeout).await? {
                Some(Event::Delivery(d)) => return Ok(Some(d)),
                Some(Event::Acked(_)) => continue,
                None => return Ok(None),
            }
        }
    }

    /// The delivery receipts of the acks confirmed since the last call.
    pub fn take_ack_receipts(&mut self) -> Vec<kerwen_proto::v1::AckReceipt> {
        std::mem::take(&mut self.ack_receipts)
    }

    /// Number of acks confirmed so far on this stream.
    pub fn acked(&self) -> u64 {
        self.acked
    }

    /// Waits until at least `n` acks are confirmed in total. Deliveries arriving meanwhile are
    /// returned so the caller can handle them.
    pub async fn wait_acked(&mut self, n: u64, timeout: Duration) -> Result<Vec<Delivery>, Status> {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut extra = Vec::new();
        while self.acked < n {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            if left.is_zero() {
                return Err(Status::deadline_exceeded(format!("only {} of {n} acks confirmed", self.acked)));
            }
            match self.next_event(left).await? {
                Some(Event::Delivery(d)) => extra.push(d),
                Some(Event::Acked(_)) => {}
                None => return Err(Status::unavailable("stream ended before acks were confirmed")),
            }
        }
        Ok(extra)
    }
}

/// An error with its causes, for messages where the outermost one says little
/// ("transport error") and the cause says what went wrong (a refused certificate).
/// One `Publish` call on `channel`, carrying the current trace context; also whether the node
/// forwarded some of it (it does not lead every shard the messages went to).
async fn send_publish(channel: Channel, req: PublishRequest) -> Result<(PublishResponse, bool), Status> {
    let mut request = tonic::Request::new(req);
    crate::telemetry::inject_current(request.metadata_mut());
    let response = ExchangeClient::new(channel).max_encoding_message_size(MAX_GRPC_MESSAGE_BYTES).publish(request).await?;
    let forwarded = response.metadata().contains_key(crate::services::exchange::ROUTE_STALE_HEADER);
    Ok((response.into_inner(), forwarded))
}

pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use kerwen_proto::v1::{GroupReplicas, GroupStatus};

    use super::*;

    fn local(group: u32, leader: Option<u64>) -> GroupStatus {
        GroupStatus { group, leader, ..Default::default() }
    }

    #[test]
    fn a_group_is_led_when_the_node_or_the_cluster_map_knows_its_leader() {
        let mut status = ClusterStatusResponse::default();
        assert_eq!(Client::leaderless_groups(&status), None, "no groups listed yet");
        status.groups = vec![local(0, Some(1)), local(1, None), local(2, None)];
        assert_eq!(Client::leaderless_groups(&status), Some(vec![1, 2]));
        // Group 1's replica moved off the answering node; the cluster map knows its leader.
        status.replicas = vec![GroupReplicas { group: 1, leader: 5, ..Default::default() }, GroupReplicas { group: 2, leader: 0, ..Default::default() }];
        assert_eq!(Client::leaderless_groups(&status), Some(vec![2]));
    }
}

//! Large payloads: `Exchange.Upload` and `Exchange.Download`.
//!
//! An upload is a stream of chunks, each replicated as its own Raft entry (so no entry grows
//! past a chunk and nothing holds the whole payload in memory) and appended to the upload's
//! state on the shard that will store the message. The node serving the stream hashes the
//! bytes as they pass; when the last one is stored and the hash matches the declared SHA-256,
//! the upload is committed as one message. A stream that breaks leaves the stored chunks in
//! place: the next `Upload` of the same message id, through any node, resumes after them
//! (re-hashing the stored prefix first).
//!
//! A download streams a stored message's chunks from the shard leader, one chunk at a time.

use std::sync::Arc;

use kerwen_broker::access::Action;
use kerwen_broker::BrokerError;
use kerwen_broker::model::{Command, CommandResult, GroupId, MessageReceipt, Position, UploadProgress};
use kerwen_proto::v1 as pb;
use sha2::{Digest, Sha256};
use tokio::sync::mpsc;
use tonic::{Status, Streaming};

use super::exchange::{routed_message, to_proto_position, validate_header};
use crate::auth::{self, Caller};
use crate::runtime::{NodeRuntime, Publisher, ReadAnswer, ReadQuery};
use crate::status::to_status;

/// Largest chunk a client may send or a download returns: one chunk is one Raft entry,
/// which must replicate well within the AppendEntries budget.
pub const MAX_CHUNK_BYTES: usize = 1024 * 1024;
/// Largest payload an upload may declare.
pub const MAX_UPLOAD_BYTES: u64 = 64 * 1024 * 1024 * 1024;

type UploadSender = mpsc::Sender<Result<pb::UploadResponse, Status>>;

fn event(e: pb::upload_response::Event) -> Result<pb::UploadResponse, Status> {
    Ok(pb::UploadResponse { event: Some(e) })
}

/// Serves one upload stream; the outcome (or error) goes to `out`.
pub async fn upload(runtime: Arc<NodeRuntime>, caller: Caller, inbound: Streaming<pb::UploadRequest>, out: UploadSender) {
    if let Err(status) = run_upload(&runtime, &caller, inbound, &out).await {
        let _ = out.send(Err(status)).await;
    }
}

async fn run_upload(runtime: &NodeRuntime, caller: &Caller, mut inbound: Streaming<pb::UploadRequest>, out: &UploadSender) -> Result<(), Status> {
    let start = match inbound.message().await? {
        Some(pb::UploadRequest { request: Some(pb::upload_request::Request::Start(start)) }) => start,
        _ => return Err(Status::invalid_argument("the first message of an upload must be `start`")),
    };
    let message = start.message.ok_or_else(|| Status::invalid_argument("start: message missing"))?;
    validate_header(&message, 0)?;
    auth::authorize(runtime, caller, Action::Send(auth::service_id("recipient", &message.recipient)?)).await?;
    let publisher = runtime.publisher(caller);
    runtime.admit_publish(&publisher, 1, 0).map_err(to_status)?;
    if !message.payload.is_empty() {
        return Err(Status::invalid_argument("start: the payload travels in chunks; message.payload must be empty"));
    }
    let sha256: [u8; 32] =
        start.sha256.as_ref().try_into().map_err(|_| Status::invalid_argument("start: sha256 must be 32 bytes"))?;
    let total = start.total_bytes;
    if total == 0 || total > MAX_UPLOAD_BYTES {
        return Err(Status::invalid_argument(format!("start: total_bytes must be 1..={MAX_UPLOAD_BYTES}, got {total}")));
    }
    let info = runtime.mailbox(&message.recipient).await.map_err(to_status)?;
    let id = message.id.clone();
    let (shard, new) = routed_message(&info, message, &caller.sender(), crate::runtime::now_unix_ms(), None)?;
    let mailbox = info.id;
    let limits = runtime.shard_limits(&publisher, &info, shard);
    let begin = Command::UploadBegin { new, total_bytes: total, sha256, limits };
    let sender = caller.sender();
    let done = Published { id: &id, shard, sender: &sender, sha256 };
    let (upload, mut stored) = match progress(runtime, shard, begin).await? {
        (_, UploadProgress::Stored(position)) => return done.send(out, 0, position, None).await,
        (_, UploadProgress::Receiving { upload, received }) => (upload, received),
    };

    // Resuming: the hash must cover the bytes stored by the earlier stream too.
    let mut hasher = Sha256::new();
    let mut offset = 0;
    while offset < stored {
        let data = read_from(runtime, shard, upload, offset).await?;
        let data = &data[..data.len().min(usize::try_from(stored - offset).unwrap_or(usize::MAX))];
        hasher.update(data);
        offset += data.len() as u64;
    }
    if stored > 0 {
        tracing::info!(id = %id, stored, total, "resuming an upload");
    }
    let _ = out.send(event(pb::upload_response::Event::NextOffset(stored))).await;

    while stored < total {
        let chunk = match inbound.message().await? {
            Some(pb::UploadRequest { request: Some(pb::upload_request::Request::Chunk(chunk)) }) => chunk,
            // The client went away: what is stored stays for a resumed upload.
            None => return Ok(()),
            Some(_) => return Err(Status::invalid_argument("after `start`, an upload carries only chunks")),
        };
        if chunk.offset != stored {
            return Err(Status::invalid_argument(format!("chunk at offset {}, expected {stored}", chunk.offset)));
        }
        if chunk.data.is_empty() || chunk.data.len() > MAX_CHUNK_BYTES {
            return Err(Status::invalid_argument(format!("chunks must be 1..={MAX_CHUNK_BYTES} bytes, got {}", chunk.data.len())));
        }
        throttle(runtime, &publisher, chunk.data.len() as u64).await;
        hasher.update(&chunk.data);
        let expected = stored + chunk.data.len() as u64;
        let write = Command::UploadChunk { mailbox, id: id.clone(), offset: stored, data: chunk.data };
        match progress(runtime, shard, write).await? {
            (_, UploadProgress::Receiving { received, .. }) if received == expected => stored = received,
            (_, other) => {
                return Err(Status::aborted(format!(
                    "another upload of message {id} is running (at {other:?}); retry to resume"
                )))
            }
        }
        if out.send(event(pb::upload_response::Event::StoredOffset(stored))).await.is_err() {
            return Ok(());
        }
    }

    if hasher.finalize().as_slice() != sha256 {
        let abort = Command::UploadAbort { mailbox, id: id.clone() };
        runtime.write(shard, abort).await.map_err(to_status)?;
        return Err(Status::invalid_argument(format!(
            "the payload of message {id} does not match its sha256; the upload was discarded"
        )));
    }
    let commit = runtime.write(shard, Command::UploadCommit { mailbox, id: id.clone() }).await.map_err(to_status)?;
    let (result, mut receipts, _) = commit.1.split_receipts();
    match upload_progress((commit.0, result))? {
        (index, UploadProgress::Stored(position)) => done.send(out, index, position, receipts.pop().flatten()).await,
        (_, other) => Err(Status::internal(format!("upload commit answered {other:?}"))),
    }
}

/// Holds an upload back while its sender is over its byte rate: a stream is slowed down
/// rather than broken off.
async fn throttle(runtime: &NodeRuntime, publisher: &Publisher<'_>, bytes: u64) {
    while let Err(BrokerError::RateLimited { retry_after_ms, .. }) = runtime.admit_publish(publisher, 0, bytes) {
        tokio::time::sleep(std::time::Duration::from_millis(retry_after_ms.min(1_000))).await;
    }
}

/// Runs an upload command; returns the commit index and the upload's progress.
async fn progress(runtime: &NodeRuntime, shard: GroupId, cmd: Command) -> Result<(u64, UploadProgress), Status> {
    upload_progress(runtime.write(shard, cmd).await.map_err(to_status)?)
}

fn upload_progress(written: (u64, CommandResult)) -> Result<(u64, UploadProgress), Status> {
    match written {
        (index, CommandResult::Upload(p)) => Ok((index, p)),
        (_, CommandResult::Rejected(e)) => Err(to_status(e)),
        (_, other) => Err(Status::internal(format!("unexpected upload result {other:?}"))),
    }
}

/// What the final `published` event of an upload says besides where the message is.
struct Published<'a> {
    id: &'a str,
    shard: GroupId,
    sender: &'a str,
    sha256: [u8; 32],
}

impl Published<'_> {
    /// Sends the event; `receipt` is the commit's (none when the message was stored before,
    /// by an earlier upload of the same id).
    async fn send(&self, out: &UploadSender, commit_index: u64, position: Position, receipt: Option<MessageReceipt>) -> Result<(), Status> {
        let result = pb::PublishResult {
            id: self.id.to_owned(),
            position: Some(to_proto_position(position)),
            shard: self.shard,
            commit_index,
            accepted_unix_ms: receipt.as_ref().and_then(|r| r.first_accepted_unix_ms).unwrap_or_default(),
            receipt: receipt.as_ref().map(|r| crate::receipts::to_proto(&r.receipt)),
            sender: self.sender.to_owned(),
            payload_sha256: self.sha256.to_vec().into(),
        };
        let _ = out.send(event(pb::upload_response::Event::Published(result))).await;
        Ok(())
    }
}

/// The stored payload bytes of an upload from `offset` to the end of the chunk holding it.
async fn read_from(runtime: &NodeRuntime, shard: GroupId, upload: u64, offset: u64) -> Result<bytes::Bytes, Status> {
    match runtime.read(shard, ReadQuery::Chunk { upload, offset }).await.map_err(to_status)? {
        ReadAnswer::Chunk(Some((start, data))) => {
            let from = usize::try_from(offset - start).map_err(|_| Status::internal("chunk offset"))?;
            Ok(data.slice(from..))
        }
        ReadAnswer::Chunk(None) => Err(Status::not_found(format!("byte {offset} of the payload is not stored (acked meanwhile?)"))),
        other => Err(Status::internal(format!("unexpected answer {other:?}"))),
    }
}

/// Streams a stored message's chunked payload from `req.offset` to `out`.
pub async fn download(runtime: Arc<NodeRuntime>, req: pb::DownloadRequest, out: mpsc::Sender<Result<pb::DownloadChunk, Status>>) {
    if let Err(status) = run_download(&runtime, req, &out).await {
        let _ = out.send(Err(status)).await;
    }
}

async fn run_download(runtime: &NodeRuntime, req: pb::DownloadRequest, out: &mpsc::Sender<Result<pb::DownloadChunk, Status>>) -> Result<(), Status> {
    let info = runtime.mailbox(&req.mailbox).await.map_err(to_status)?;
    let p = req.position.ok_or_else(|| Status::invalid_argument("position missing"))?;
    let position = Position { partition: p.partition, sequence: p.sequence };
    let shard = info.shard_of_any(p.partition).ok_or_else(|| Status::invalid_argument(format!("partition {} does not exist", p.partition)))?;
    let large = match runtime.read(shard, ReadQuery::LargePayload { mailbox: info.id, position }).await.map_err(to_status)? {
        ReadAnswer::LargePayload(Some(large)) => large,
        ReadAnswer::LargePayload(None) => {
            return Err(Status::not_found(format!(
                "no message with a chunked payload at {}:{} (acked, or sent inline)",
                p.partition, p.sequence
            )))
        }
        other => return Err(Status::internal(format!("unexpected answer {other:?}"))),
    };
    let mut offset = req.offset;
    while offset < large.total_bytes {
        let data = read_from(runtime, shard, large.upload, offset).await?;
        let len = data.len() as u64;
        if out.send(Ok(pb::DownloadChunk { offset, data })).await.is_err() {
            return Ok(());
        }
        offset += len;
    }
    Ok(())
}

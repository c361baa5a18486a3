//! Applying the upload commands of a data shard: a large payload arrives as a sequence of
//! chunk commands (each one Raft entry of at most a chunk), and becomes one stored message
//! when committed. Chunks are stored under a shard-local upload number, never assembled in
//! memory; the message refers to them and acking it deletes them.

use rocksdb::WriteBatch;

use super::delivery::PartitionCache;
use super::{apply_publish, keys, within_window, ApplyScratch, ShardView, CF_STATE};
use crate::error::{BrokerError, Result};
use crate::model::{
    CommandResult, EvidenceRef, LargePayload, MailboxId, NewMessage, ShardLimits, StoredMessage, UploadProgress,
    UploadState,
};

/// The arguments of an `UploadBegin` command.
pub(super) struct BeginRequest {
    pub new: NewMessage,
    pub total_bytes: u64,
    pub sha256: [u8; 32],
    pub limits: ShardLimits,
}

/// What is kept of an upload while its chunks arrive.
#[derive(Clone, serde::Serialize, serde::Deserialize)]
pub(super) struct UploadRecord {
    pub state: UploadState,
    pub limits: ShardLimits,
}

fn record(view: &ShardView, scratch: &ApplyScratch, key: &[u8]) -> Result<Option<UploadRecord>> {
    if let Some(r) = scratch.uploads.get(key) {
        return Ok(r.clone());
    }
    view.store.get(CF_STATE, key)
}

fn save(view: &ShardView, batch: &mut WriteBatch, scratch: &mut ApplyScratch, key: Vec<u8>, r: Option<UploadRecord>) -> Result<()> {
    let cf = view.store.cf(CF_STATE)?;
    match &r {
        Some(r) => batch.put_cf(&cf, &key, view.store.encode(r)?),
        None => batch.delete_cf(&cf, &key),
    }
    scratch.uploads.insert(key, r);
    Ok(())
}

pub(super) fn apply_begin(
    view: &ShardView,
    batch: &mut WriteBatch,
    scratch: &mut ApplyScratch,
    cache: &mut PartitionCache,
    request: BeginRequest,
) -> Result<CommandResult> {
    let BeginRequest { new, total_bytes, sha256, limits } = request;
    let rejected = |e| Ok(CommandResult::Rejected(e));
    let mailbox = new.mailbox;
    let id = new.message.id.clone();
    // Already stored within the dedup window (an earlier upload of this id was committed).
    let dedup_key = keys::dedup_key(view.group, mailbox, &id);
    if let Some(r) = scratch.dedup_record(view, &dedup_key)? {
        if within_window(r.accepted_unix_ms, new.message.accepted_unix_ms, limits.dedup_window_ms) {
            return Ok(CommandResult::Upload(UploadProgress::Stored(r.position)));
        }
    }
    let key = keys::upload_key(view.group, mailbox, &id);
    if let Some(existing) = record(view, scratch, &key)? {
        let s = &existing.state;
        if s.total_bytes != total_bytes || s.sha256 != sha256 || s.partition != new.partition {
            return rejected(BrokerError::AlreadyExists(format!(
                "an upload of message {id} with another size or checksum is in progress in mailbox {}",
                limits.service
            )));
        }
        return Ok(CommandResult::Upload(UploadProgress::Receiving { upload: s.upload, received: s.received }));
    }
    // Admission: the whole payload must fit the quota now (it is checked again at commit).
    let stored = scratch.stored_against_quota(view, cache, &limits)?.bytes;
    if stored.saturating_add(total_bytes) > limits.max_bytes {
        return rejected(BrokerError::ResourceExhausted(format!(
            "mailbox {} is full: its partitions on shard {} hold {stored} of the {} bytes allowed there, and this \
             upload needs {total_bytes}; consume or wait, then retry",
            limits.service, view.group, limits.max_bytes
        )));
    }
    if let Some(refusal) = scratch.sender_over_quota(view, &new.message.sender, limits.sender_max_stored_bytes, total_bytes)? {
        return rejected(refusal);
    }
    let cf = view.store.cf(CF_STATE)?;
    let counter = keys::state_key(view.group, keys::KIND_NEXT_UPLOAD, &[]);
    let upload = match scratch.next_upload {
        Some(n) => n,
        None => view.store.get::<u64>(CF_STATE, &counter)?.unwrap_or(1),
    };
    scratch.next_upload = Some(upload + 1);
    batch.put_cf(&cf, &counter, view.store.encode(&(upload + 1))?);
    let state = UploadState { upload, partition: new.partition, message: new.message, total_bytes, sha256, received: 0 };
    save(view, batch, scratch, key, Some(UploadRecord { state, limits }))?;
    Ok(CommandResult::Upload(UploadProgress::Receiving { upload, received: 0 }))
}

pub(super) fn apply_chunk(
    view: &ShardView,
    batch: &mut WriteBatch,
    scratch: &mut ApplyScratch,
    mailbox: MailboxId,
    id: &str,
    offset: u64,
    data: bytes::Bytes,
) -> Result<CommandResult> {
    let key = keys::upload_key(view.group, mailbox, id);
    let Some(mut r) = record(view, scratch, &key)? else {
        return Ok(CommandResult::Rejected(BrokerError::NotFound(format!("no upload of message {id} is in progress"))));
    };
    let s = &mut r.state;
    // A chunk sent again after a reconnect, or out of order: say where to continue.
    if offset != s.received || data.is_empty() {
        return Ok(CommandResult::Upload(UploadProgress::Receiving { upload: s.upload, received: s.received }));
    }
    if offset.saturating_add(data.len() as u64) > s.total_bytes {
        return Ok(CommandResult::Rejected(BrokerError::InvalidArgument(format!(
            "chunk at {offset} of {} bytes runs past the declared size of {}",
            data.len(),
            s.total_bytes
        ))));
    }
    let cf = view.store.cf(CF_STATE)?;
    batch.put_cf(&cf, keys::chunk_key(view.group, s.upload, offset), view.store.seal_bytes(&data)?);
    s.received += data.len() as u64;
    let progress = UploadProgress::Receiving { upload: s.upload, received: s.received };
    save(view, batch, scratch, key, Some(r))?;
    Ok(CommandResult::Upload(progress))
}

/// The message an upload becomes when committed.
pub(super) fn committed_message(s: &UploadState) -> StoredMessage {
    let large = LargePayload { upload: s.upload, total_bytes: s.total_bytes, sha256: s.sha256 };
    StoredMessage { large: Some(large), payload_sha256: s.sha256, ..s.message.clone() }
}

/// Stores a complete upload as its message; with `seal` (batch number, leaf), the message
/// was signed as that leaf. Returns the result and where the message's evidence is.
pub(super) fn apply_commit(
    view: &ShardView,
    batch: &mut WriteBatch,
    scratch: &mut ApplyScratch,
    cache: &mut PartitionCache,
    (mailbox, id): (MailboxId, &str),
    seal: Option<(u64, u64)>,
) -> Result<(CommandResult, Vec<EvidenceRef>)> {
    let key = keys::upload_key(view.group, mailbox, id);
    let Some(r) = record(view, scratch, &key)? else {
        return Ok((CommandResult::Rejected(BrokerError::NotFound(format!("no upload of message {id} is in progress"))), Vec::new()));
    };
    let s = &r.state;
    if s.received != s.total_bytes {
        let e = BrokerError::InvalidArgument(format!("upload of message {id} is incomplete: {} of {} bytes", s.received, s.total_bytes));
        return Ok((CommandResult::Rejected(e), Vec::new()));
    }
    let new = NewMessage { mailbox, partition: s.partition, message: committed_message(s) };
    match apply_publish(view, batch, cache, vec![new], vec![r.limits.clone()], scratch, seal)? {
        (CommandResult::Published(positions), refs) => {
            let position = positions.first().copied().ok_or_else(|| BrokerError::Internal("no position".into()))?;
            save(view, batch, scratch, key, None)?;
            Ok((CommandResult::Upload(UploadProgress::Stored(position)), refs))
        }
        other => Ok(other),
    }
}

impl ShardView {
    /// The evidence leaf and accept time of the message an upload in progress becomes when
    /// committed (`None` when there is no such upload).
    pub fn upload_leaf(&self, mailbox: MailboxId, id: &str) -> Result<Option<(crate::evidence::Hash, i64)>> {
        let record: Option<UploadRecord> = self.store.get(CF_STATE, &keys::upload_key(self.group, mailbox, id))?;
        Ok(record.map(|r| {
            let message = committed_message(&r.state);
            (message.leaf(), message.accepted_unix_ms)
        }))
    }
}

pub(super) fn apply_abort(view: &ShardView, batch: &mut WriteBatch, scratch: &mut ApplyScratch, mailbox: MailboxId, id: &str) -> Result<CommandResult> {
    let key = keys::upload_key(view.group, mailbox, id);
    let Some(r) = record(view, scratch, &key)? else { return Ok(CommandResult::Changed(0)) };
    delete_chunks(view, batch, r.state.upload)?;
    save(view, batch, scratch, key, None)?;
    Ok(CommandResult::Changed(1))
}

/// Deletes every chunk of an upload (one range tombstone).
pub(super) fn delete_chunks(view: &ShardView, batch: &mut WriteBatch, upload: u64) -> Result<()> {
    let cf = view.store.cf(CF_STATE)?;
    let prefix = keys::chunk_prefix(view.group, upload);
    let end = keys::prefix_end(&prefix).ok_or_else(|| BrokerError::Internal("chunk prefix has no end".into()))?;
    batch.delete_range_cf(&cf, prefix, end);
    Ok(())
}

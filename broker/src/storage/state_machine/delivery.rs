//! Applying the delivery commands of a data shard: leases, settles (nack, release, extend),
//! dead-lettering and redrive, and the message moves they share with publish and ack.
//!
//! Every decision uses only the command (which carries the proposer's clock reading) and the
//! replicated state, so each replica reaches the same one. The leader's in-memory
//! [`DeliveryTracker`](crate::delivery::DeliveryTracker) is updated from the scratch once the
//! apply batch is written.

use std::collections::HashMap;

use rocksdb::WriteBatch;

use super::{keys, lock, AckEvidence, ApplyScratch, PartitionState, ShardView, CF_STATE};
use crate::error::Result;
use crate::model::{
    dead_letter_partition, is_dead_letter, AttemptOutcome, CommandResult, DeadLetter, DeadLetterReason,
    DeliveryState, Leased, MailboxId, Position, RedeliveryPolicy, SettleAction, StoredMessage, DEAD_LETTER_BIT,
};

/// The partition-state cache `apply` holds locked for the whole batch.
pub(super) type PartitionCache = HashMap<(MailboxId, u32), PartitionState>;

/// Stores `message` as the next message of `partition` and indexes its expiry.
pub(super) fn insert_message(
    view: &ShardView,
    batch: &mut WriteBatch,
    scratch: &mut ApplyScratch,
    cache: &mut PartitionCache,
    mailbox: MailboxId,
    partition: u32,
    message: StoredMessage,
) -> Result<Position> {
    let cf = view.store.cf(CF_STATE)?;
    let mut ps = scratch.partition(view, cache, mailbox, partition)?;
    let position = Position { partition, sequence: ps.next_seq };
    ps.next_seq += 1;
    ps.stats.messages += 1;
    ps.stats.bytes += message.payload_len();
    scratch.dirty_partitions.insert((mailbox, partition), ps);
    scratch.account_sender(view, &message.sender, message.payload_len(), true)?;
    let key = keys::message_key(view.group, mailbox, partition, position.sequence);
    batch.put_cf(&cf, &key, view.store.encode(&message)?);
    if let (Some(expires), None) = (message.expires_unix_ms, &message.dead_letter) {
        batch.put_cf(&cf, keys::ttl_key(view.group, expires, mailbox, partition, position.sequence), []);
    }
    scratch.deleted.remove(&key);
    scratch.puts.insert(key, message);
    Ok(position)
}

/// Removes a stored message with its delivery state and expiry entry.
pub(super) fn remove_message(
    view: &ShardView,
    batch: &mut WriteBatch,
    scratch: &mut ApplyScratch,
    cache: &mut PartitionCache,
    mailbox: MailboxId,
    position: Position,
    message: &StoredMessage,
) -> Result<()> {
    let cf = view.store.cf(CF_STATE)?;
    let key = keys::message_key(view.group, mailbox, position.partition, position.sequence);
    let mut ps = scratch.partition(view, cache, mailbox, position.partition)?;
    ps.stats.messages = ps.stats.messages.saturating_sub(1);
    ps.stats.bytes = ps.stats.bytes.saturating_sub(message.payload_len());
    scratch.dirty_partitions.insert((mailbox, position.partition), ps);
    scratch.account_sender(view, &message.sender, message.payload_len(), false)?;
    batch.delete_cf(&cf, &key);
    scratch.puts.remove(&key);
    scratch.deleted.insert(key);
    if let (Some(expires), None) = (message.expires_unix_ms, &message.dead_letter) {
        batch.delete_cf(&cf, keys::ttl_key(view.group, expires, mailbox, position.partition, position.sequence));
    }
    if scratch.with_delivery_state(view, mailbox, position, |s| s.is_some()) {
        set_delivery_state(view, batch, scratch, mailbox, position, None)?;
    }
    Ok(())
}

/// Removes a message for good (acked by `ack`): with its chunks, if its payload was uploaded,
/// leaving its evidence record behind.
pub(super) fn purge_message(
    view: &ShardView,
    batch: &mut WriteBatch,
    scratch: &mut ApplyScratch,
    cache: &mut PartitionCache,
    (mailbox, position): (MailboxId, Position),
    message: &StoredMessage,
    ack: Option<AckEvidence>,
) -> Result<()> {
    super::evidence::record_purged(view, batch, scratch, mailbox, message, ack)?;
    remove_message(view, batch, scratch, cache, mailbox, position, message)?;
    if let Some(large) = message.large {
        super::upload::delete_chunks(view, batch, large.upload)?;
    }
    Ok(())
}

/// Writes (or, with `None`, deletes) a message's delivery state.
fn set_delivery_state(
    view: &ShardView,
    batch: &mut WriteBatch,
    scratch: &mut ApplyScratch,
    mailbox: MailboxId,
    position: Position,
    state: Option<DeliveryState>,
) -> Result<()> {
    let cf = view.store.cf(CF_STATE)?;
    let key = keys::delivery_key(view.group, mailbox, position.partition, position.sequence);
    match &state {
        Some(s) => batch.put_cf(&cf, key, view.store.encode(s)?),
        None => batch.delete_cf(&cf, key),
    }
    scratch.delivery.insert((mailbox, position), state);
    Ok(())
}

/// Why and when a message is dead-lettered, with its delivery state as the caller left it.
struct Letter {
    reason: DeadLetterReason,
    state: Option<DeliveryState>,
    now_unix_ms: i64,
}

/// Moves a message to its partition's dead-letter queue with its reason and history. A lease
/// still open in the history ends as expired (at its end, or now if that is earlier).
fn dead_letter(
    view: &ShardView,
    batch: &mut WriteBatch,
    scratch: &mut ApplyScratch,
    cache: &mut PartitionCache,
    (mailbox, position): (MailboxId, Position),
    message: StoredMessage,
    letter: Letter,
) -> Result<()> {
    let Letter { reason, mut state, now_unix_ms } = letter;
    if let Some(s) = &mut state {
        if let Some((_, until)) = s.lease() {
            s.end_lease(AttemptOutcome::Expired { at_unix_ms: until.min(now_unix_ms) });
        }
    }
    remove_message(view, batch, scratch, cache, mailbox, position, &message)?;
    let (attempts, history) = state.map(|s| (s.attempts, s.history)).unwrap_or_default();
    let letter = DeadLetter { reason, from: position, dead_lettered_unix_ms: now_unix_ms, attempts, history };
    let moved = StoredMessage { dead_letter: Some(letter), ..message };
    insert_message(view, batch, scratch, cache, mailbox, dead_letter_partition(position.partition), moved)?;
    Ok(())
}

/// The arguments of a `Lease` command.
pub(super) struct LeaseRequest {
    pub mailbox: MailboxId,
    pub consumer: u64,
    pub positions: Vec<Position>,
    pub now_unix_ms: i64,
    pub until_unix_ms: i64,
    pub policy: RedeliveryPolicy,
}

pub(super) fn apply_lease(
    view: &ShardView,
    batch: &mut WriteBatch,
    scratch: &mut ApplyScratch,
    cache: &mut PartitionCache,
    request: LeaseRequest,
) -> Result<CommandResult> {
    let LeaseRequest { mailbox, consumer, positions, now_unix_ms: now, until_unix_ms, policy } = request;
    let mut leased = Vec::with_capacity(positions.len());
    for position in positions {
        let Some(message) = scratch.message(view, mailbox, position)? else { continue };
        let previous = scratch.delivery_state(view, mailbox, position);
        if let Some(state) = &previous {
            if state.leased_at(now) || state.ready_at() > now {
                continue;
            }
        }
        let dead = is_dead_letter(position.partition);
        if !dead && message.expired_at(now) {
            let letter = Letter { reason: DeadLetterReason::Expired, state: previous, now_unix_ms: now };
            dead_letter(view, batch, scratch, cache, (mailbox, position), message, letter)?;
            continue;
        }
        // Dead letters are delivered until acked: the policy that sent them there is done.
        let policy = if dead { RedeliveryPolicy::UNLIMITED } else { policy };
        let mut state =
            previous.unwrap_or(DeliveryState { attempts: 0, history: Vec::new(), not_before_unix_ms: 0, policy });
        if let Some((_, until)) = state.lease() {
            state.end_lease(AttemptOutcome::Expired { at_unix_ms: until });
        }
        // A lower max_attempts set since the last delivery applies now.
        state.policy = policy;
        if state.exhausted() {
            let letter = Letter { reason: DeadLetterReason::MaxAttempts, state: Some(state), now_unix_ms: now };
            dead_letter(view, batch, scratch, cache, (mailbox, position), message, letter)?;
            continue;
        }
        state.record_lease(consumer, now, until_unix_ms, policy);
        let attempt = state.attempts;
        set_delivery_state(view, batch, scratch, mailbox, position, Some(state))?;
        leased.push(Leased { position, message, attempt, lease_expires_unix_ms: until_unix_ms, receipt: None });
    }
    Ok(CommandResult::Leased(leased))
}

/// The arguments of a `Settle` command.
pub(super) struct SettleRequest {
    pub mailbox: MailboxId,
    pub consumer: u64,
    pub positions: Vec<Position>,
    pub now_unix_ms: i64,
    pub action: SettleAction,
}

pub(super) fn apply_settle(
    view: &ShardView,
    batch: &mut WriteBatch,
    scratch: &mut ApplyScratch,
    cache: &mut PartitionCache,
    request: SettleRequest,
) -> Result<CommandResult> {
    let SettleRequest { mailbox, consumer, positions, now_unix_ms: now, action } = request;
    let mut changed = 0;
    for position in positions {
        let Some(mut state) = scratch.delivery_state(view, mailbox, position) else { continue };
        // Only the holder settles, and an extension needs a lease that has not run out.
        let Some((holder, until)) = state.lease() else { continue };
        if holder != consumer {
            continue;
        }
        match action {
            SettleAction::Extend { until_unix_ms } => {
                if until <= now {
                    continue;
                }
                if let Some(last) = state.history.last_mut() {
                    last.outcome = AttemptOutcome::Leased { until_unix_ms: until_unix_ms.max(until) };
                }
            }
            SettleAction::Nack { delay_ms } => {
                state.end_lease(AttemptOutcome::Nacked { at_unix_ms: now });
                let delay = delay_ms.unwrap_or_else(|| state.policy.backoff_ms(state.attempts));
                state.not_before_unix_ms = now.saturating_add(i64::try_from(delay).unwrap_or(i64::MAX));
            }
            SettleAction::Release => {
                state.end_lease(AttemptOutcome::Released { at_unix_ms: now });
                state.not_before_unix_ms = now;
            }
        }
        changed += 1;
        let ended = !matches!(action, SettleAction::Extend { .. });
        if ended && state.exhausted() {
            if let Some(message) = scratch.message(view, mailbox, position)? {
                let letter = Letter { reason: DeadLetterReason::MaxAttempts, state: Some(state), now_unix_ms: now };
                dead_letter(view, batch, scratch, cache, (mailbox, position), message, letter)?;
                continue;
            }
        }
        set_delivery_state(view, batch, scratch, mailbox, position, Some(state))?;
    }
    Ok(CommandResult::Changed(changed))
}

/// Moves expired and exhausted messages among `positions` to the dead-letter queue.
pub(super) fn apply_dead_letter(
    view: &ShardView,
    batch: &mut WriteBatch,
    scratch: &mut ApplyScratch,
    cache: &mut PartitionCache,
    mailbox: MailboxId,
    positions: Vec<Position>,
    now: i64,
) -> Result<CommandResult> {
    let mut changed = 0;
    for position in positions {
        if is_dead_letter(position.partition) {
            continue;
        }
        let Some(message) = scratch.message(view, mailbox, position)? else { continue };
        let state = scratch.delivery_state(view, mailbox, position);
        let reason = if message.expired_at(now) {
            DeadLetterReason::Expired
        } else if state.as_ref().is_some_and(|s| s.exhausted() && !s.leased_at(now)) {
            DeadLetterReason::MaxAttempts
        } else {
            continue;
        };
        dead_letter(view, batch, scratch, cache, (mailbox, position), message, Letter { reason, state, now_unix_ms: now })?;
        changed += 1;
    }
    Ok(CommandResult::Changed(changed))
}

/// Moves dead letters back to the partitions they came from, as new messages.
pub(super) fn apply_redrive(
    view: &ShardView,
    batch: &mut WriteBatch,
    scratch: &mut ApplyScratch,
    cache: &mut PartitionCache,
    mailbox: MailboxId,
    positions: Vec<Position>,
    now: i64,
) -> Result<CommandResult> {
    let mut changed = 0;
    for position in positions {
        if !is_dead_letter(position.partition) {
            continue;
        }
        let Some(message) = scratch.message(view, mailbox, position)? else { continue };
        // Someone consuming the dead-letter queue holds it: leave it with them.
        if scratch.delivery_state(view, mailbox, position).is_some_and(|s| s.leased_at(now)) {
            continue;
        }
        remove_message(view, batch, scratch, cache, mailbox, position, &message)?;
        let home = message.dead_letter.as_ref().map_or(position.partition & !DEAD_LETTER_BIT, |d| d.from.partition);
        let expires = message.ttl_ms.map(|ttl| now.saturating_add(i64::try_from(ttl).unwrap_or(i64::MAX)));
        let revived = StoredMessage { dead_letter: None, expires_unix_ms: expires, ..message };
        insert_message(view, batch, scratch, cache, mailbox, home, revived)?;
        changed += 1;
    }
    Ok(CommandResult::Changed(changed))
}

/// Ends every lease `consumer` holds on `mailbox` (its stream is gone).
pub(super) fn apply_release_consumer(
    view: &ShardView,
    batch: &mut WriteBatch,
    scratch: &mut ApplyScratch,
    cache: &mut PartitionCache,
    mailbox: MailboxId,
    consumer: u64,
    now: i64,
) -> Result<CommandResult> {
    // The mirror plus this batch's changes is the replicated state: every replica lists the
    // same positions.
    let mut positions = lock(&view.tracker).leases_of(mailbox, consumer);
    for ((mb, position), state) in &scratch.delivery {
        let holds = state.as_ref().is_some_and(|s| s.lease().is_some_and(|(c, _)| c == consumer));
        if *mb == mailbox && holds {
            positions.push(*position);
        }
    }
    positions.sort();
    positions.dedup();
    let request = SettleRequest { mailbox, consumer, positions, now_unix_ms: now, action: SettleAction::Release };
    apply_settle(view, batch, scratch, cache, request)
}

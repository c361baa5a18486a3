//! Write coalescing in front of one Raft group (group commit at the log level).
//!
//! openraft 0.9 appends each `client_write` to the log and awaits that append's fsync before
//! it looks at the next request (`RaftCore::append_to_log`), so N concurrent writes to a
//! group cost N fsyncs in series on its leader, and a 2-core box tops out at a few hundred
//! writes per second whatever their size. The [`Proposer`] queues the commands that arrive
//! while the group is busy and submits them together as one [`Command::Batch`] entry: one
//! append, one fsync, one replication round for all of them.
//!
//! At most `max_in_flight` entries are outstanding (submitted, not yet applied). While all
//! are outstanding, new commands wait in the queue and join the next entry, so batches grow
//! with load by themselves and an idle group still proposes a lone command at once.

use std::sync::Arc;

use openraft::error::{ClientWriteError, RaftError};
use openraft::Raft;
use tokio::sync::{mpsc, oneshot, Semaphore};

use crate::error::BrokerError;
use crate::model::{Command, CommandResult, GroupId, TypeConfig};

/// The result of one command: its entry's log index and what applying it returned.
pub type WriteOutcome = Result<(u64, CommandResult), BrokerError>;

/// How a [`Proposer`] coalesces.
#[derive(Debug, Clone, Copy)]
pub struct ProposerConfig {
    /// Entries submitted and not yet applied, at most.
    pub max_in_flight: usize,
    /// A batch stops growing at this many bytes ([`Command::approximate_size`]); a single
    /// larger command still travels alone.
    pub max_batch_bytes: usize,
    /// A batch stops growing at this many commands.
    pub max_batch_commands: usize,
}

impl Default for ProposerConfig {
    fn default() -> Self {
        Self { max_in_flight: 2, max_batch_bytes: 2 * 1024 * 1024, max_batch_commands: 1024 }
    }
}

struct Proposal {
    command: Command,
    reply: oneshot::Sender<WriteOutcome>,
}

/// The write entry point of one group. Cheap to share; the background task ends when the
/// proposer is dropped.
pub struct Proposer {
    group: GroupId,
    queue: mpsc::Sender<Proposal>,
}

/// Proposals waiting for a free slot, at most. Writers beyond it wait to enqueue (back
/// pressure reaches the gRPC callers instead of growing memory).
const QUEUE_CAPACITY: usize = 8 * 1024;

impl Proposer {
    /// Starts the coalescing task for `raft` (which must be group `group`) on the current
    /// tokio runtime.
    pub fn start(group: GroupId, raft: Raft<TypeConfig>, config: ProposerConfig) -> Self {
        let (queue, rx) = mpsc::channel(QUEUE_CAPACITY);
        tokio::spawn(run(group, raft, config, rx));
        Self { group, queue }
    }

    /// Replicates `command` and waits until it is applied. Errors are those of
    /// `Raft::client_write`, mapped: `NotLeader` when this node does not lead the group.
    pub async fn write(&self, command: Command) -> WriteOutcome {
        let (reply, answer) = oneshot::channel();
        let stopped = || BrokerError::Unavailable(format!("group {} is shutting down", self.group));
        self.queue.send(Proposal { command, reply }).await.map_err(|_| stopped())?;
        answer.await.map_err(|_| stopped())?
    }
}

async fn run(group: GroupId, raft: Raft<TypeConfig>, config: ProposerConfig, mut rx: mpsc::Receiver<Proposal>) {
    let slots = Arc::new(Semaphore::new(config.max_in_flight.max(1)));
    loop {
        // Take the slot first: while none is free, proposals pile up and join one batch.
        let Ok(slot) = slots.clone().acquire_owned().await else { return };
        let Some(first) = rx.recv().await else { return };
        let mut bytes = first.command.approximate_size();
        let mut batch = vec![first];
        while bytes < config.max_batch_bytes && batch.len() < config.max_batch_commands {
            match rx.try_recv() {
                Ok(next) => {
                    bytes += next.command.approximate_size();
                    batch.push(next);
                }
                Err(_) => break,
            }
        }
        let raft = raft.clone();
        tokio::spawn(async move {
            submit(group, &raft, batch).await;
            drop(slot);
        });
    }
}

/// Proposes `batch` as one entry and answers every proposal in it.
async fn submit(group: GroupId, raft: &Raft<TypeConfig>, mut batch: Vec<Proposal>) {
    if batch.len() == 1 {
        let Proposal { command, reply } = batch.remove(0);
        let _ = reply.send(client_write(group, raft, command).await);
        return;
    }
    let (commands, replies): (Vec<_>, Vec<_>) = batch.into_iter().map(|p| (p.command, p.reply)).unzip();
    let count = commands.len();
    match client_write(group, raft, Command::Batch(commands)).await {
        Ok((index, CommandResult::Batch(results))) if results.len() == count => {
            for (reply, result) in replies.into_iter().zip(results) {
                let _ = reply.send(Ok((index, result)));
            }
        }
        Ok((_, other)) => {
            let e = BrokerError::Internal(format!("batch of {count} commands answered with {other:?}"));
            replies.into_iter().for_each(|reply| drop(reply.send(Err(e.clone()))));
        }
        Err(e) => replies.into_iter().for_each(|reply| drop(reply.send(Err(e.clone())))),
    }
}

async fn client_write(group: GroupId, raft: &Raft<TypeConfig>, command: Command) -> WriteOutcome {
    match raft.client_write(command).await {
        Ok(resp) => Ok((resp.log_id.index, resp.data)),
        Err(RaftError::APIError(ClientWriteError::ForwardToLeader(f))) => Err(BrokerError::NotLeader { group, leader: f.leader_id }),
        Err(RaftError::APIError(e)) => Err(BrokerError::Internal(e.to_string())),
        Err(RaftError::Fatal(e)) => Err(BrokerError::Unavailable(format!("group {group} stopped: {e}"))),
    }
}

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
//!
//! **Sealing** (data shards with [`Sealing`]): an entry carrying messages or acks is signed
//! before it is submitted: one leaf per message and per ack, one Merkle tree, one Ed25519
//! signature over a header that extends the shard's evidence chain and names the log position
//! the entry will get. Entries are handed to openraft in order (`client_write_ff`), so that
//! position is known: the next after the last one this leader appended. When the prediction
//! fails (a leadership change, a membership entry in between), applying refuses the entry
//! with a retryable error, nothing of it is applied, and the proposer re-reads the chain
//! before sealing again. Signing adds no wait: an entry is sealed as soon as it is formed.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use openraft::error::{ClientWriteError, RaftError};
use openraft::raft::ClientWriteResponse;
use openraft::{Raft, ServerState};
use tokio::sync::{mpsc, oneshot, Semaphore};

use crate::error::BrokerError;
use crate::evidence::{ack_leaf, AckFacts, ArchivedDelivery, BatchHeader, Hash, MerkleTree, Receipt, SignedBatch, EvidenceSigner, EVIDENCE_VERSION};
use crate::model::{Command, CommandResult, EvidenceRef, GroupId, MessageReceipt, Position, Seal, SealedAck, TypeConfig, UploadProgress};
use crate::storage::ShardView;

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

/// What a data shard's proposer signs with, and where it reads the shard's evidence chain.
#[derive(Clone)]
pub struct Sealing {
    pub signer: Arc<EvidenceSigner>,
    pub view: Arc<ShardView>,
}

impl Proposer {
    /// Starts the coalescing task for `raft` (which must be group `group`) on the current
    /// tokio runtime.
    pub fn start(group: GroupId, raft: Raft<TypeConfig>, config: ProposerConfig) -> Self {
        Self::start_sealing(group, raft, config, None)
    }

    /// Like [`Self::start`], signing messages and acks with `sealing` when given.
    pub fn start_sealing(group: GroupId, raft: Raft<TypeConfig>, config: ProposerConfig, sealing: Option<Sealing>) -> Self {
        let (queue, rx) = mpsc::channel(QUEUE_CAPACITY);
        tokio::spawn(run(group, raft, config, sealing, rx));
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

/// Where this leader's next sealed entry goes: the chain's next batch and the log position.
struct ChainCursor {
    next_batch: u64,
    prev: Hash,
    next_index: u64,
    term: u64,
}

/// What the waiter of a sealed entry needs to turn evidence references into receipts.
struct SealedInfo {
    tree: MerkleTree,
    batch: SignedBatch,
    /// The acks signed, with the facts their leaves commit to.
    acks: Vec<(SealedAck, AckFacts)>,
    /// Signed upload commits: command index and the accept time their leaf commits to.
    commits: Vec<(u32, i64)>,
    view: Arc<ShardView>,
}

async fn run(group: GroupId, raft: Raft<TypeConfig>, config: ProposerConfig, sealing: Option<Sealing>, mut rx: mpsc::Receiver<Proposal>) {
    let max_in_flight = config.max_in_flight.max(1);
    let slots = Arc::new(Semaphore::new(max_in_flight));
    // Set by a waiter when an entry failed: the chain and log position must be read again.
    let stale = Arc::new(AtomicBool::new(true));
    let mut cursor: Option<ChainCursor> = None;
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
        let (commands, replies): (Vec<_>, Vec<_>) = batch.into_iter().map(|p| (p.command, p.reply)).unzip();
        let mut sealed = None;
        let entry = match &sealing {
            Some(s) if commands.iter().any(carries_evidence) => {
                if stale.swap(false, Ordering::SeqCst) {
                    cursor = None;
                }
                if cursor.is_none() {
                    // With every other entry settled, the applied chain head is current.
                    let others = slots.clone().acquire_many_owned(max_in_flight as u32 - 1).await;
                    match resync(group, &raft, &s.view).await {
                        Ok(c) => cursor = Some(c),
                        Err(e) => {
                            answer_all(replies, &e);
                            continue;
                        }
                    }
                    drop(others);
                }
                match cursor.as_mut() {
                    Some(c) => {
                        let (entry, info) = seal(group, s, c, commands);
                        sealed = info;
                        entry
                    }
                    None => plain(commands),
                }
            }
            _ => plain(commands),
        };
        if let Some(c) = cursor.as_mut() {
            c.next_index += 1;
        }
        let term = raft.metrics().borrow().current_term;
        match raft.client_write_ff(entry).await {
            Ok(answer) => {
                let (stale, raft) = (stale.clone(), raft.clone());
                tokio::spawn(async move {
                    let outcome = await_answer(group, &raft, term, answer).await;
                    answer_entry(group, outcome, replies, sealed, &stale);
                    drop(slot);
                });
            }
            Err(fatal) => {
                stale.store(true, Ordering::SeqCst);
                answer_all(replies, &BrokerError::Unavailable(format!("group {group} stopped: {fatal}")));
            }
        }
    }
}

/// How often an entry still waiting for its answer checks that this node leads its term.
const LEADERSHIP_CHECK: Duration = Duration::from_secs(1);

/// The answer to an entry this node appended as leader in `term`. openraft 0.9 answers an
/// entry once it is applied here, but a leader that steps down (it moved its replica away,
/// or lost an election) keeps the entries it had not yet applied unanswered, maybe for
/// ever: such an entry fails as soon as the node is seen not to lead that term any more.
/// Its fate is unknown then (the next leader may still commit it), as with any write that
/// times out; the error is retryable, and ids deduplicate the retry.
async fn await_answer<E>(
    group: GroupId,
    raft: &Raft<TypeConfig>,
    term: u64,
    answer: impl std::future::Future<Output = Result<Result<ClientWriteResponse<TypeConfig>, ClientWriteError<crate::model::NodeId, openraft::BasicNode>>, E>>,
) -> Result<ClientWriteResponse<TypeConfig>, BrokerError> {
    tokio::pin!(answer);
    loop {
        match tokio::time::timeout(LEADERSHIP_CHECK, &mut answer).await {
            Ok(Ok(Ok(response))) => return Ok(response),
            Ok(Ok(Err(e))) => return Err(write_error(group, RaftError::APIError(e))),
            Ok(Err(_)) => return Err(BrokerError::Unavailable(format!("group {group} is shutting down"))),
            Err(_) => {
                let metrics = raft.metrics();
                let m = metrics.borrow();
                if m.state != ServerState::Leader || m.current_term != term {
                    return Err(BrokerError::NotLeader { group, leader: None });
                }
            }
        }
    }
}

/// Whether a command produces leaves: messages to store or acks to sign.
fn carries_evidence(command: &Command) -> bool {
    match command {
        Command::Publish { messages, .. } => !messages.is_empty(),
        Command::Ack { positions, .. } => !positions.is_empty(),
        Command::UploadCommit { .. } => true,
        _ => false,
    }
}

/// One command alone, or several as a batch.
fn plain(mut commands: Vec<Command>) -> Command {
    if commands.len() == 1 {
        commands.remove(0)
    } else {
        Command::Batch(commands)
    }
}

/// Reads the applied chain head and this leader's log position (nothing of ours in flight).
async fn resync(group: GroupId, raft: &Raft<TypeConfig>, view: &ShardView) -> Result<ChainCursor, BrokerError> {
    raft.ensure_linearizable().await.map_err(|e| match e {
        RaftError::APIError(openraft::error::CheckIsLeaderError::ForwardToLeader(f)) => BrokerError::NotLeader { group, leader: f.leader_id },
        other => BrokerError::Unavailable(format!("group {group}: {other}")),
    })?;
    let (last_index, term) = {
        let metrics = raft.metrics();
        let m = metrics.borrow();
        if m.state != ServerState::Leader {
            return Err(BrokerError::NotLeader { group, leader: m.current_leader });
        }
        (m.last_log_index.unwrap_or(0), m.current_term)
    };
    let head = view.chain_head();
    tracing::debug!(group, batch = head.batch + 1, log_index = last_index + 1, term, "evidence chain cursor (re)read");
    Ok(ChainCursor { next_batch: head.batch + 1, prev: head.link, next_index: last_index + 1, term })
}

fn now_unix_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

/// Signs `commands` as the next batch of the chain: a leaf per published message, then a
/// leaf per ack of a message still stored. Without any leaf the entry goes unsealed.
fn seal(group: GroupId, sealing: &Sealing, cursor: &mut ChainCursor, commands: Vec<Command>) -> (Command, Option<SealedInfo>) {
    let mut message_leaves = Vec::new();
    let mut acks = Vec::new();
    let mut commits = Vec::new();
    for (i, command) in commands.iter().enumerate() {
        match command {
            Command::Publish { messages, .. } => message_leaves.extend(messages.iter().map(|m| m.message.leaf())),
            Command::UploadCommit { mailbox, id } => {
                if let Ok(Some((leaf, accepted_unix_ms))) = sealing.view.upload_leaf(*mailbox, id) {
                    message_leaves.push(leaf);
                    commits.push((i as u32, accepted_unix_ms));
                }
            }
            Command::Ack { mailbox, positions, attempts, .. } => {
                for (j, position) in positions.iter().enumerate() {
                    // A message gone meanwhile (acked twice) has nothing to sign.
                    if let Ok(Some(facts)) = sealing.view.ack_claim(*mailbox, *position, attempts.get(j).copied()) {
                        let ack = SealedAck { command: i as u32, position: *position, attempt: facts.attempt };
                        acks.push((ack, facts));
                    }
                }
            }
            _ => {}
        }
    }
    if message_leaves.is_empty() && acks.is_empty() {
        return (plain(commands), None);
    }
    let header = BatchHeader {
        version: EVIDENCE_VERSION,
        shard: group,
        batch: cursor.next_batch,
        log_term: cursor.term,
        log_index: cursor.next_index,
        timestamp_unix_ms: 0,
        leaf_count: 0,
        root: [0; 32],
        prev: cursor.prev,
        key_id: String::new(),
    };
    let (batch, tree) = sealing.signer.seal(now_unix_ms, |now| {
        let mut leaves = message_leaves;
        for (_, facts) in &mut acks {
            facts.acked_unix_ms = now;
            leaves.push(ack_leaf(facts));
        }
        (leaves, header)
    });
    cursor.next_batch += 1;
    cursor.prev = batch.link();
    metrics::counter!("kerwen_evidence_batches_total").increment(1);
    metrics::histogram!("kerwen_evidence_messages_per_signature").record(tree.leaves().len() as f64);
    let seal = Seal {
        batch: batch.clone(),
        leaves: tree.leaves().to_vec(),
        acks: acks.iter().map(|(ack, _)| ack.clone()).collect(),
        commits: commits.iter().map(|c| c.0).collect(),
    };
    let info = SealedInfo { tree, batch, acks, commits, view: sealing.view.clone() };
    (Command::Sealed { seal, commands }, Some(info))
}

fn answer_all(replies: Vec<oneshot::Sender<WriteOutcome>>, e: &BrokerError) {
    replies.into_iter().for_each(|reply| drop(reply.send(Err(e.clone()))));
}

/// Answers every proposal of one entry from its outcome; sealed commands get receipts.
fn answer_entry(
    group: GroupId,
    outcome: Result<ClientWriteResponse<TypeConfig>, BrokerError>,
    mut replies: Vec<oneshot::Sender<WriteOutcome>>,
    sealed: Option<SealedInfo>,
    stale: &AtomicBool,
) {
    let response = match outcome {
        Ok(r) => r,
        Err(e) => {
            tracing::debug!(group, error = %e, "entry failed; the chain cursor is re-read");
            stale.store(true, Ordering::SeqCst);
            return answer_all(replies, &e);
        }
    };
    let (index, count) = (response.log_id.index, replies.len());
    match (response.data, sealed) {
        (CommandResult::Sealed { results, evidence }, Some(info)) if results.len() == count && evidence.len() == count => {
            for (k, ((reply, result), refs)) in replies.into_iter().zip(results).zip(evidence).enumerate() {
                let _ = reply.send(Ok((index, with_receipts(&info, k, result, refs))));
            }
        }
        // A sealed entry refused as a whole: its batch no longer extends the chain there.
        (CommandResult::Rejected(e), Some(_)) => {
            tracing::debug!(group, error = %e, "sealed entry refused; the chain cursor is re-read");
            stale.store(true, Ordering::SeqCst);
            answer_all(replies, &e);
        }
        (result, None) if count == 1 => {
            if let Some(reply) = replies.pop() {
                let _ = reply.send(Ok((index, result)));
            }
        }
        (CommandResult::Batch(results), None) if results.len() == count => {
            for (reply, result) in replies.into_iter().zip(results) {
                let _ = reply.send(Ok((index, result)));
            }
        }
        (other, _) => {
            stale.store(true, Ordering::SeqCst);
            answer_all(replies, &BrokerError::Internal(format!("group {group}: {count} commands answered with {other:?}")));
        }
    }
}

/// Command `k`'s result with the receipts of its messages or acks.
fn with_receipts(info: &SealedInfo, k: usize, result: CommandResult, refs: Vec<EvidenceRef>) -> CommandResult {
    if refs.is_empty() {
        return result;
    }
    let receipt = |r: &EvidenceRef| -> Option<Receipt> {
        match *r {
            EvidenceRef::None => None,
            EvidenceRef::Leaf(i) => info.tree.receipt(usize::try_from(i).ok()?, &info.batch),
            EvidenceRef::Stored { batch, index, .. } => info.view.receipt(batch, index).ok().flatten(),
        }
    };
    match result {
        CommandResult::Published(_) | CommandResult::Upload(UploadProgress::Stored(_)) => {
            // An upload's message was accepted when the upload began, maybe in another request.
            let committed = info.commits.iter().find(|c| c.0 as usize == k).map(|c| c.1);
            let receipts = refs
                .iter()
                .map(|r| {
                    let first_accepted_unix_ms = match r {
                        EvidenceRef::Stored { accepted_unix_ms, .. } => Some(*accepted_unix_ms),
                        _ => committed,
                    };
                    Some(MessageReceipt { receipt: receipt(r)?, first_accepted_unix_ms })
                })
                .collect();
            CommandResult::Receipted { result: Box::new(result), receipts, deliveries: Vec::new() }
        }
        CommandResult::Acked(_) => {
            let acks = info.acks.iter().filter(|(a, _)| a.command as usize == k);
            let deliveries: Vec<(Position, ArchivedDelivery)> = acks
                .zip(&refs)
                .filter_map(|((a, facts), r)| Some((a.position, ArchivedDelivery { facts: facts.clone(), receipt: receipt(r)? })))
                .collect();
            CommandResult::Receipted { result: Box::new(result), receipts: Vec::new(), deliveries }
        }
        other => other,
    }
}

fn write_error(group: GroupId, e: RaftError<crate::model::NodeId, ClientWriteError<crate::model::NodeId, openraft::BasicNode>>) -> BrokerError {
    match e {
        RaftError::APIError(ClientWriteError::ForwardToLeader(f)) => BrokerError::NotLeader { group, leader: f.leader_id },
        RaftError::APIError(e) => BrokerError::Internal(e.to_string()),
        RaftError::Fatal(e) => BrokerError::Unavailable(format!("group {group} stopped: {e}")),
    }
}

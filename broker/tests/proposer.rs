//! The proposer coalesces concurrent writes into shared log entries: a single-node group
//! (its own quorum, on a real RocksDB) takes many concurrent publishes in far fewer entries,
//! and every writer still gets its own, correct result.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use kerwen_broker::model::{Command, CommandResult, NewMessage, Position, StoredMessage, TypeConfig};
use kerwen_broker::proposer::{Proposer, ProposerConfig};
use kerwen_broker::storage::{ShardView, StateMachine, Store};
use kerwen_broker::BrokerError;
use openraft::error::{InstallSnapshotError, RPCError, RaftError, Unreachable};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse, VoteRequest,
    VoteResponse,
};
use openraft::{BasicNode, Config, Raft};

/// A network for a group with one member: nothing is ever sent.
struct NoPeers;

fn no_peer<E: std::error::Error>() -> RPCError<u64, BasicNode, E> {
    RPCError::Unreachable(Unreachable::new(&std::io::Error::other("single-node group has no peers")))
}

impl RaftNetworkFactory<TypeConfig> for NoPeers {
    type Network = NoPeers;
    async fn new_client(&mut self, _target: u64, _node: &BasicNode) -> NoPeers {
        NoPeers
    }
}

impl RaftNetwork<TypeConfig> for NoPeers {
    async fn append_entries(
        &mut self,
        _rpc: AppendEntriesRequest<TypeConfig>,
        _option: RPCOption,
    ) -> Result<AppendEntriesResponse<u64>, RPCError<u64, BasicNode, RaftError<u64>>> {
        Err(no_peer())
    }
    async fn install_snapshot(
        &mut self,
        _rpc: InstallSnapshotRequest<TypeConfig>,
        _option: RPCOption,
    ) -> Result<InstallSnapshotResponse<u64>, RPCError<u64, BasicNode, RaftError<u64, InstallSnapshotError>>> {
        Err(no_peer())
    }
    async fn vote(
        &mut self,
        _rpc: VoteRequest<u64>,
        _option: RPCOption,
    ) -> Result<VoteResponse<u64>, RPCError<u64, BasicNode, RaftError<u64>>> {
        Err(no_peer())
    }
}

fn publish(id: usize) -> Command {
    let message = StoredMessage {
        id: format!("m{id}"),
        recipient: "TM/GOV/MINFIN/tax/declarations".into(),
        sender: String::new(),
        headers: Vec::new(),
        payload: vec![b'x'; 100].into(),
        payload_sha256: [0; 32],
        ordering_key: None,
        accepted_unix_ms: 1,
        ttl_ms: None,
        expires_unix_ms: None,
        dead_letter: None,
        large: None,
        signed_as: None,
        trace_context: None,
    };
    Command::publish(vec![NewMessage { mailbox: 1, partition: (id % 2) as u32, message }])
}

async fn single_node_leader(dir: &std::path::Path) -> Raft<TypeConfig> {
    single_node_shard(dir).await.0
}

async fn single_node_shard(dir: &std::path::Path) -> (Raft<TypeConfig>, Arc<ShardView>) {
    let store = Store::open(dir).expect("open store");
    let (sm, view) = StateMachine::open_shard(store.clone(), 1).expect("open shard");
    let config = Arc::new(Config { heartbeat_interval: 100, election_timeout_min: 300, election_timeout_max: 600, ..Default::default() }.validate().expect("config"));
    let raft = Raft::new(1, config, NoPeers, store.log_store(1), sm).await.expect("raft");
    raft.initialize(BTreeMap::from([(1, BasicNode::default())])).await.expect("initialize");
    raft.wait(Some(Duration::from_secs(30))).current_leader(1, "leader").await.expect("becomes leader");
    (raft, view)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_writes_share_entries_and_each_gets_its_result() {
    let dir = tempfile::tempdir().expect("temp dir");
    let raft = single_node_leader(dir.path()).await;
    let before = raft.metrics().borrow().last_log_index.unwrap_or(0);
    let proposer = Arc::new(Proposer::start(1, raft.clone(), ProposerConfig { max_in_flight: 1, ..Default::default() }));

    const WRITES: usize = 400;
    let writes: Vec<_> = (0..WRITES)
        .map(|i| {
            let proposer = proposer.clone();
            tokio::spawn(async move { (i, proposer.write(publish(i)).await) })
        })
        .collect();
    let mut positions = HashSet::new();
    for handle in writes {
        let (i, outcome) = handle.await.expect("writer task");
        match outcome {
            Ok((_, CommandResult::Published(p))) => {
                assert_eq!(p.len(), 1);
                assert_eq!(p[0].partition, (i % 2) as u32, "write {i} got another write's result");
                assert!(positions.insert(p[0]), "position {:?} handed out twice", p[0]);
            }
            other => panic!("write {i}: {other:?}"),
        }
    }
    let per_partition = |partition| (0..WRITES as u64 / 2).map(move |sequence| Position { partition, sequence });
    assert_eq!(positions, per_partition(0).chain(per_partition(1)).collect::<HashSet<_>>());

    let entries = raft.metrics().borrow().last_log_index.unwrap_or(0) - before;
    assert!(entries < WRITES as u64 / 4, "{WRITES} concurrent writes took {entries} log entries: not coalesced");
    raft.shutdown().await.expect("shutdown");
}

#[tokio::test]
async fn writes_to_a_follower_are_refused_with_not_leader() {
    let dir = tempfile::tempdir().expect("temp dir");
    let store = Store::open(dir.path()).expect("open store");
    let (sm, _view) = StateMachine::open_shard(store.clone(), 1).expect("open shard");
    let config = Arc::new(Config::default().validate().expect("config"));
    // Never initialised: it knows no leader.
    let raft = Raft::new(1, config, NoPeers, store.log_store(1), sm).await.expect("raft");
    let proposer = Proposer::start(1, raft.clone(), ProposerConfig::default());
    let outcome = proposer.write(publish(0)).await;
    assert!(matches!(outcome, Err(BrokerError::NotLeader { group: 1, leader: None })), "{outcome:?}");
    raft.shutdown().await.expect("shutdown");
}

/// With sealing, concurrent publishes each get a receipt that verifies against the signing
/// key, every sealed entry extends the shard's chain, and an entry signed for another log
/// position is refused as a whole (retryable) without storing anything.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sealed_writes_get_verifiable_receipts_and_a_mispositioned_batch_is_refused() {
    use ed25519_dalek::SigningKey;
    use kerwen_broker::evidence::{seal_batch, BatchHeader, KeyRing, PublicKeyRecord, EvidenceSigner, EVIDENCE_VERSION};
    use kerwen_broker::model::{MessageReceipt, Seal};
    use kerwen_broker::proposer::Sealing;

    let dir = tempfile::tempdir().expect("temp dir");
    let (raft, view) = single_node_shard(dir.path()).await;
    let key = SigningKey::from_bytes(&[5; 32]);
    let keys = KeyRing::new([PublicKeyRecord::of("node-1-test", &key, 0)]);
    let sealing = Sealing { signer: Arc::new(EvidenceSigner::new("node-1-test".into(), key.clone())), view: view.clone() };
    let proposer = Arc::new(Proposer::start_sealing(1, raft.clone(), ProposerConfig::default(), Some(sealing)));

    const WRITES: usize = 200;
    let writes: Vec<_> = (0..WRITES)
        .map(|i| {
            let proposer = proposer.clone();
            tokio::spawn(async move { (i, proposer.write(publish(i)).await) })
        })
        .collect();
    for handle in writes {
        let (i, outcome) = handle.await.expect("writer task");
        let Ok((_, result)) = outcome else { panic!("write {i}: {outcome:?}") };
        let (result, receipts, _) = result.split_receipts();
        assert!(matches!(result, CommandResult::Published(_)), "write {i}: {result:?}");
        let [Some(MessageReceipt { receipt, first_accepted_unix_ms: None })] = receipts.as_slice() else {
            panic!("write {i}: one receipt expected, got {receipts:?}")
        };
        let Command::Publish { messages, .. } = publish(i) else { unreachable!() };
        receipt.verify_message(&messages[0].message.facts(), &keys).unwrap_or_else(|e| panic!("write {i}: {e}"));
    }
    let head = view.chain_head();
    assert!(head.batch >= 1 && head.batch <= WRITES as u64, "chain head {head:?}");

    // A batch that names a log position other than its entry's is refused, nothing applied.
    let last = raft.metrics().borrow().last_log_index.unwrap_or(0);
    let header = BatchHeader {
        version: EVIDENCE_VERSION,
        shard: 1,
        batch: head.batch + 1,
        log_term: raft.metrics().borrow().current_term,
        log_index: last + 5,
        timestamp_unix_ms: 1,
        leaf_count: 0,
        root: [0; 32],
        prev: head.link,
        key_id: "node-1-test".into(),
    };
    let Command::Publish { messages, .. } = publish(WRITES) else { unreachable!() };
    let (batch, tree) = seal_batch(vec![messages[0].message.leaf()], header, &key);
    let seal = Seal { batch, leaves: tree.leaves().to_vec(), acks: Vec::new(), commits: Vec::new() };
    let response = raft.client_write(Command::Sealed { seal, commands: vec![publish(WRITES)] }).await.expect("write");
    assert!(matches!(response.data, CommandResult::Rejected(BrokerError::Unavailable(_))), "{:?}", response.data);
    assert_eq!(view.chain_head(), head, "the refused batch did not extend the chain");
    assert!(view.stats(1, &[0, 1]).expect("stats").messages == WRITES as u64, "the refused publish stored nothing");

    // The proposer's next entry, predicted where the foreign one went, is refused as
    // retryable too; it re-reads the chain and the retry (as the node's router does) lands.
    let mut attempts = 0;
    let result = loop {
        attempts += 1;
        match proposer.write(publish(WRITES + 1)).await {
            Ok((_, result)) => break result,
            Err(e) if e.is_retryable() && attempts < 5 => continue,
            Err(e) => panic!("write after a refusal, attempt {attempts}: {e}"),
        }
    };
    assert!(matches!(result, CommandResult::Receipted { .. }), "{result:?}");
    assert_eq!(view.chain_head().batch, head.batch + 1);
    raft.shutdown().await.expect("shutdown");
}

/// A message's evidence record is written by the ack that purges it (a publish writes none,
/// the stored message is its evidence meanwhile, and export finds it either way). Records
/// older than the mailbox's retention are purged by later publishes (oldest first), younger
/// ones stay, and the shard's evidence total follows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn evidence_is_filed_at_ack_and_purged_after_its_retention() {
    use ed25519_dalek::SigningKey;
    use kerwen_broker::evidence::EvidenceSigner;
    use kerwen_broker::model::{MailboxLimits, ShardLimits};
    use kerwen_broker::proposer::Sealing;

    let dir = tempfile::tempdir().expect("temp dir");
    let (raft, view) = single_node_shard(dir.path()).await;
    let sealing = Sealing { signer: Arc::new(EvidenceSigner::new("k".into(), SigningKey::from_bytes(&[6; 32]))), view: view.clone() };
    let proposer = Proposer::start_sealing(1, raft.clone(), ProposerConfig::default(), Some(sealing));
    let limits = ShardLimits {
        evidence_retention_ms: 10_000,
        ..kerwen_broker::model::MailboxInfo {
            id: 1,
            service: "TM/GOV/MINFIN/tax/declarations".into(),
            partitions: 2,
            partition_shards: vec![1, 1],
            key_partitions: 2,
            created_unix_ms: 0,
            limits: MailboxLimits::default(),
            policy: Default::default(),
        }
        .shard_limits(1)
    };
    let at = |id: usize, accepted_unix_ms: i64| {
        let Command::Publish { mut messages, .. } = publish(id) else { unreachable!() };
        messages[0].message.accepted_unix_ms = accepted_unix_ms;
        Command::Publish { messages, limits: vec![limits.clone()] }
    };
    let held = |id: usize, t: i64| view.message_evidence(1, t, &format!("m{id}")).expect("read").is_some();
    let exported = || -> Vec<(String, bool)> {
        let archive = view.export(1, 0, i64::MAX, 100).expect("export").expect("something to export");
        archive.messages.into_iter().map(|m| (m.facts.message_id, m.delivery.is_some())).collect()
    };
    let mut positions = Vec::new();
    for (id, t) in [(1, 1_000), (2, 5_000), (3, 9_000)] {
        let (_, result) = proposer.write(at(id, t)).await.expect("publish");
        let (CommandResult::Published(p), _, _) = result.split_receipts() else { panic!("not published") };
        positions.extend(p);
    }
    assert!(!held(1, 1_000) && !held(2, 5_000) && !held(3, 9_000), "a publish writes no evidence record");
    assert_eq!(exported(), [("m1".into(), false), ("m2".into(), false), ("m3".into(), false)], "stored messages are exported");
    let before = view.evidence_bytes();

    let ack = Command::Ack { mailbox: 1, positions, consumer: None, attempts: Vec::new() };
    let (_, result) = proposer.write(ack).await.expect("ack");
    let (acked, _, deliveries) = result.split_receipts();
    assert!(matches!(acked, CommandResult::Acked(3)), "{acked:?}");
    assert_eq!(deliveries.len(), 3, "each ack is signed");
    assert!(held(1, 1_000) && held(2, 5_000) && held(3, 9_000), "the ack files each message's record");
    assert_eq!(exported(), [("m1".into(), true), ("m2".into(), true), ("m3".into(), true)], "with its signed ack");
    assert!(view.evidence_bytes() > before);

    // At 14 s, everything accepted before 4 s is past the 10 s retention.
    let before = view.evidence_bytes();
    proposer.write(at(4, 14_000)).await.expect("publish");
    assert!(!held(1, 1_000), "evidence older than the retention is purged");
    assert!(held(2, 5_000) && held(3, 9_000), "younger evidence stays");
    assert_eq!(exported(), [("m2".into(), true), ("m3".into(), true), ("m4".into(), false)]);
    assert_ne!(view.evidence_bytes(), before, "the total follows the new batch and the purged record");
    raft.shutdown().await.expect("shutdown");
}

//! The proposer coalesces concurrent writes into shared log entries: a single-node group
//! (its own quorum, on a real RocksDB) takes many concurrent publishes in far fewer entries,
//! and every writer still gets its own, correct result.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use kerwen_broker::model::{Command, CommandResult, NewMessage, Position, StoredMessage, TypeConfig};
use kerwen_broker::proposer::{Proposer, ProposerConfig};
use kerwen_broker::storage::{StateMachine, Store};
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
        ordering_key: None,
        accepted_unix_ms: 1,
        ttl_ms: None,
        expires_unix_ms: None,
        dead_letter: None,
        large: None,
    };
    Command::publish(vec![NewMessage { mailbox: 1, partition: (id % 2) as u32, message }])
}

async fn single_node_leader(dir: &std::path::Path) -> Raft<TypeConfig> {
    let store = Store::open(dir).expect("open store");
    let (sm, _view) = StateMachine::open_shard(store.clone(), 1).expect("open shard");
    let config = Arc::new(Config { heartbeat_interval: 100, election_timeout_min: 300, election_timeout_max: 600, ..Default::default() }.validate().expect("config"));
    let raft = Raft::new(1, config, NoPeers, store.log_store(1), sm).await.expect("raft");
    raft.initialize(BTreeMap::from([(1, BasicNode::default())])).await.expect("initialize");
    raft.wait(Some(Duration::from_secs(30))).current_leader(1, "leader").await.expect("becomes leader");
    raft
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

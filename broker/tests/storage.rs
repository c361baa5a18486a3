//! Storage tests: openraft's own compliance suite against the RocksDB log store and state
//! machine, the shard state machine's message semantics (publish, fetch, ack, snapshot), and
//! encryption at rest (no payload byte readable in the database files).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use kerwen_broker::access::{AccessCommand, Action, MemberRecord, Principal, SubsystemQuota};
use kerwen_broker::ids::SubsystemId;
use kerwen_broker::model::{
    Command, CommandResult, DeadLetterReason, Leased, NewMessage, Position, RedeliveryPolicy, SettleAction, ShardLimits,
    StoredMessage, TypeConfig, UploadProgress, DEAD_LETTER_BIT,
};
use kerwen_broker::storage::cipher::{Algorithm, AtRestCipher, DataKey};
use kerwen_broker::storage::{LogStore, ShardView, StateMachine, Store};
use openraft::storage::{RaftLogStorage, RaftSnapshotBuilder, RaftStateMachine};
use openraft::testing::{StoreBuilder, Suite};
use openraft::{CommittedLeaderId, Entry, EntryPayload, LogId, StorageError};
use tempfile::TempDir;

struct Builder;

impl StoreBuilder<TypeConfig, LogStore, StateMachine, TempDir> for Builder {
    async fn build(&self) -> Result<(TempDir, LogStore, StateMachine), StorageError<u64>> {
        let dir = tempfile::tempdir().expect("temp dir");
        let store = Store::open(dir.path()).expect("open store");
        let (sm, _view) = StateMachine::open_shard(store.clone(), 7).expect("open shard");
        Ok((dir, store.log_store(7), sm))
    }
}

#[test]
fn openraft_storage_suite() {
    Suite::test_all(Builder).expect("openraft storage suite");
}

fn log_id(index: u64) -> LogId<u64> {
    LogId::new(CommittedLeaderId::new(1, 1), index)
}

fn entry(index: u64, cmd: Command) -> Entry<TypeConfig> {
    Entry { log_id: log_id(index), payload: EntryPayload::Normal(cmd) }
}

fn message(id: &str, partition: u32, payload: &str) -> NewMessage {
    NewMessage {
        mailbox: 1,
        partition,
        message: StoredMessage {
            id: id.into(),
            recipient: "TM/GOV/MINFIN/tax/declarations".into(),
            sender: String::new(),
            headers: vec![("traceparent".into(), "00-abc".into())],
            payload: payload.as_bytes().to_vec().into(),
            payload_sha256: [0; 32],
            ordering_key: None,
            accepted_unix_ms: 1,
            ttl_ms: None,
            expires_unix_ms: None,
            dead_letter: None,
            large: None,
            signed_as: None,
            trace_context: None,
        },
    }
}

/// The data key of the tests' stores: fixed, so a test can reopen what it wrote.
const TEST_KEY: [u8; 32] = [42; 32];

fn open_store_with(dir: &std::path::Path, algorithm: Algorithm, key: [u8; 32]) -> Arc<Store> {
    let cipher = AtRestCipher::new(algorithm, &DataKey::from_bytes(key)).expect("cipher");
    Store::open_with(dir, cipher).expect("open store")
}

fn open_store(dir: &std::path::Path) -> Arc<Store> {
    open_store_with(dir, Algorithm::Aes256Gcm, TEST_KEY)
}

fn open_shard(dir: &std::path::Path) -> (Arc<Store>, StateMachine, Arc<ShardView>) {
    shard_of(open_store(dir))
}

fn shard_of(store: Arc<Store>) -> (Arc<Store>, StateMachine, Arc<ShardView>) {
    let (sm, view) = StateMachine::open_shard(store.clone(), 1).expect("open shard");
    (store, sm, view)
}

/// The clock reading carried by the delivery commands of these tests (Unix ms).
const T0: i64 = 1_000_000;
const LEASE_MS: i64 = 60_000;
const TERM: u64 = 1;
const POLICY: RedeliveryPolicy = RedeliveryPolicy { max_attempts: 5, backoff_initial_ms: 1_000, backoff_max_ms: 60_000 };

/// Applies one command as the next log entry and returns its result.
async fn apply_one(sm: &mut StateMachine, cmd: Command) -> CommandResult {
    static INDEX: AtomicU64 = AtomicU64::new(1_000);
    sm.apply(vec![entry(INDEX.fetch_add(1, Ordering::Relaxed), cmd)]).await.unwrap().remove(0)
}

/// What a shard leader does on a fetch at `now`: pick, propose the lease, apply it.
async fn fetch_at(sm: &mut StateMachine, view: &ShardView, consumer: u64, partitions: &[u32], max: usize, now: i64) -> Vec<Leased> {
    fetch_with(sm, view, Fetch { consumer, partitions, max, now, policy: POLICY, ordered: false }).await
}

struct Fetch<'a> {
    consumer: u64,
    partitions: &'a [u32],
    max: usize,
    now: i64,
    policy: RedeliveryPolicy,
    ordered: bool,
}

async fn fetch_with(sm: &mut StateMachine, view: &ShardView, f: Fetch<'_>) -> Vec<Leased> {
    let Fetch { consumer, partitions, max, now, policy, ordered } = f;
    let picked = view.select(TERM, 1, partitions, max, ordered, now, true).unwrap();
    if picked.is_empty() {
        return Vec::new();
    }
    let cmd = Command::Lease {
        mailbox: 1,
        consumer,
        positions: picked.clone(),
        now_unix_ms: now,
        until_unix_ms: now + LEASE_MS,
        policy,
    };
    let result = apply_one(sm, cmd).await;
    view.unreserve(1, &picked, false);
    match result {
        CommandResult::Leased(leased) => leased,
        other => panic!("unexpected lease result {other:?}"),
    }
}

async fn fetch(sm: &mut StateMachine, view: &ShardView, consumer: u64, partitions: &[u32], max: usize) -> Vec<Leased> {
    fetch_at(sm, view, consumer, partitions, max, T0).await
}

#[tokio::test]
async fn publish_assigns_per_partition_sequences_and_ack_purges() {
    let dir = tempfile::tempdir().unwrap();
    let (_store, mut sm, view) = open_shard(dir.path());
    let results = sm
        .apply(vec![entry(1, Command::publish(vec![message("a", 0, "one"), message("b", 1, "two"), message("c", 0, "three")]))])
        .await
        .unwrap();
    assert_eq!(
        results,
        vec![CommandResult::Published(vec![
            Position { partition: 0, sequence: 0 },
            Position { partition: 1, sequence: 0 },
            Position { partition: 0, sequence: 1 },
        ])]
    );
    assert_eq!(view.stats(1, &[0, 1]).unwrap().messages, 3);

    let leased = fetch(&mut sm, &view, 42, &[0, 1], 10).await;
    let ids: Vec<&str> = leased.iter().map(|l| l.message.id.as_str()).collect();
    assert_eq!(ids, ["a", "c", "b"], "partition order, partition by partition");
    assert!(fetch(&mut sm, &view, 43, &[0, 1], 10).await.is_empty(), "all leased");

    let acked = sm
        .apply(vec![entry(2, Command::Ack { mailbox: 1, positions: vec![Position { partition: 0, sequence: 0 }], consumer: None, attempts: Vec::new() })])
        .await
        .unwrap();
    assert_eq!(acked, vec![CommandResult::Acked(1)]);
    // Acking twice removes nothing more.
    let again = sm
        .apply(vec![entry(3, Command::Ack { mailbox: 1, positions: vec![Position { partition: 0, sequence: 0 }], consumer: None, attempts: Vec::new() })])
        .await
        .unwrap();
    assert_eq!(again, vec![CommandResult::Acked(0)]);
    let stats = view.stats(1, &[0, 1]).unwrap();
    assert_eq!((stats.messages, stats.bytes), (2, 8));

    // A released consumer's leases are redelivered, with the attempt counted.
    let released = apply_one(&mut sm, Command::ReleaseConsumer { mailbox: 1, consumer: 42, now_unix_ms: T0 }).await;
    assert_eq!(released, CommandResult::Changed(2));
    let redelivered = fetch(&mut sm, &view, 43, &[0, 1], 10).await;
    assert_eq!(redelivered.len(), 2);
    assert!(redelivered.iter().all(|l| l.attempt == 2));
}

#[tokio::test]
async fn expired_leases_are_redelivered_after_the_backoff_and_survive_a_reopen() {
    let dir = tempfile::tempdir().unwrap();
    {
        let (store, mut sm, view) = open_shard(dir.path());
        sm.apply(vec![entry(1, Command::publish(vec![message("a", 0, "x")]))]).await.unwrap();
        assert_eq!(fetch(&mut sm, &view, 1, &[0], 10).await.len(), 1);
        store.sync().await.unwrap();
    }
    // A new leader (here: the reopened replica, a new term) knows the lease and the attempt.
    let (_store, mut sm, view) = open_shard(dir.path());
    let expiry = T0 + LEASE_MS;
    assert!(fetch_at(&mut sm, &view, 2, &[0], 10, expiry - 1).await.is_empty(), "still leased");
    assert!(fetch_at(&mut sm, &view, 2, &[0], 10, expiry + 999).await.is_empty(), "1 s back-off after attempt 1");
    let again = fetch_at(&mut sm, &view, 2, &[0], 10, expiry + 1_000).await;
    assert_eq!((again.len(), again[0].attempt), (1, 2), "expired lease is redelivered");
}

#[tokio::test]
async fn state_survives_reopen_and_travels_in_snapshots() {
    let dir = tempfile::tempdir().unwrap();
    {
        let (store, mut sm, _view) = open_shard(dir.path());
        sm.apply(vec![entry(1, Command::publish(vec![message("a", 0, "x"), message("b", 0, "y")]))])
            .await
            .unwrap();
        store.sync().await.unwrap();
    }
    let (_store, mut sm, view) = open_shard(dir.path());
    let (applied, _) = sm.applied_state().await.unwrap();
    assert_eq!(applied, Some(log_id(1)));
    assert_eq!(view.stats(1, &[0]).unwrap().messages, 2);
    // Sequences continue after a restart.
    let r = sm.apply(vec![entry(2, Command::publish(vec![message("c", 0, "z")]))]).await.unwrap();
    assert_eq!(r, vec![CommandResult::Published(vec![Position { partition: 0, sequence: 2 }])]);

    let mut builder = sm.get_snapshot_builder().await;
    let snapshot = builder.build_snapshot().await.unwrap();
    assert_eq!(snapshot.meta.last_log_id, Some(log_id(2)));

    // The follower has a data key of its own: the snapshot travels in plaintext records.
    let other = tempfile::tempdir().unwrap();
    let (_s2, mut follower, follower_view) = shard_of(open_store_with(other.path(), Algorithm::ChaCha20Poly1305, [43; 32]));
    follower.install_snapshot(&snapshot.meta, snapshot.snapshot).await.unwrap();
    assert_eq!(follower.applied_state().await.unwrap().0, Some(log_id(2)));
    let leased = fetch(&mut follower, &follower_view, 1, &[0], 10).await;
    let ids: Vec<&str> = leased.iter().map(|l| l.message.id.as_str()).collect();
    assert_eq!(ids, ["a", "b", "c"]);
    assert_eq!(&leased[0].message.payload[..], b"x");
}

#[tokio::test]
async fn log_survives_reopen_and_truncate_purge_leave_no_holes() {
    let dir = tempfile::tempdir().unwrap();
    let blank = |i| Entry::<TypeConfig> { log_id: log_id(i), payload: EntryPayload::Blank };
    {
        let store = open_store(dir.path());
        let mut log = store.log_store(3);
        // Another group's entries share the column family and must not leak into group 3.
        let mut other = store.log_store(4);
        for i in 1..=5 {
            append_blank(&mut log, blank(i)).await;
            append_blank(&mut other, blank(i)).await;
        }
        store.sync().await.unwrap();
    }
    let store = open_store(dir.path());
    let mut log = store.log_store(3);
    let state = log.get_log_state().await.unwrap();
    assert_eq!(state.last_log_id, Some(log_id(5)));
    log.truncate(log_id(4)).await.unwrap();
    log.purge(log_id(2)).await.unwrap();
    let state = log.get_log_state().await.unwrap();
    assert_eq!((state.last_purged_log_id, state.last_log_id), (Some(log_id(2)), Some(log_id(3))));
    use openraft::storage::RaftLogReader;
    let entries = log.try_get_log_entries(0..10).await.unwrap();
    assert_eq!(entries.iter().map(|e| e.log_id.index).collect::<Vec<_>>(), [3]);
    assert_eq!(store.log_store(4).try_get_log_entries(0..10).await.unwrap().len(), 5);
}

/// Appends one entry through openraft's storage API and waits for its flush callback.
async fn append_blank(log: &mut LogStore, entry: Entry<TypeConfig>) {
    use openraft::storage::RaftLogStorageExt;
    log.blocking_append(vec![entry]).await.unwrap();
}

/// A follower catching up applies a publish and the ack of the same message in one call: the
/// message must be gone afterwards, exactly as on the leader that applied them separately.
#[tokio::test]
async fn publish_and_ack_in_one_apply_batch_leave_nothing_behind() {
    let dir = tempfile::tempdir().unwrap();
    let (_store, mut sm, view) = open_shard(dir.path());
    let results = sm
        .apply(vec![
            entry(1, Command::publish(vec![message("a", 0, "x"), message("b", 0, "y")])),
            entry(2, Command::Ack { mailbox: 1, positions: vec![Position { partition: 0, sequence: 0 }], consumer: None, attempts: Vec::new() }),
        ])
        .await
        .unwrap();
    assert_eq!(results[1], CommandResult::Acked(1));
    let stats = view.stats(1, &[0]).unwrap();
    assert_eq!((stats.messages, stats.bytes), (1, 1));
    let left = fetch(&mut sm, &view, 1, &[0], 10).await;
    assert_eq!(left.iter().map(|l| l.message.id.as_str()).collect::<Vec<_>>(), ["b"]);
}

/// Two mailboxes created in one apply batch get distinct ids.
#[tokio::test]
async fn mailboxes_created_in_one_batch_get_distinct_ids() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let (mut sm, view) = StateMachine::open_metadata(store).unwrap();
    let create = |service: &str| Command::CreateMailbox {
        service: service.into(),
        partitions: 2,
        shard_count: 3,
        created_unix_ms: 5,
        limits: Default::default(),
        policy: Default::default(),
    };
    let r = sm
        .apply(vec![
            entry(1, create("TM/GOV/A/s/one")),
            entry(2, register("TM/GOV/A/s")),
            entry(3, create("TM/GOV/A/s/one")),
            entry(4, create("TM/GOV/A/s/two")),
            entry(5, create("TM/GOV/A/s/one")),
        ])
        .await
        .unwrap();
    assert!(
        matches!(&r[0], CommandResult::Rejected(kerwen_broker::BrokerError::NotFound(m)) if m.contains("not registered")),
        "a mailbox of an unregistered subsystem: {:?}",
        r[0]
    );
    let r = &r[2..];
    let ids: Vec<u64> = r[..2]
        .iter()
        .map(|r| match r {
            CommandResult::MailboxCreated(info) => info.id,
            other => panic!("unexpected {other:?}"),
        })
        .collect();
    assert_ne!(ids[0], ids[1]);
    assert!(matches!(&r[2], CommandResult::Rejected(kerwen_broker::BrokerError::AlreadyExists(_))));
    assert_eq!(view.mailboxes().len(), 2);
    assert!(view.mailbox("TM/GOV/A/s/two").unwrap().partition_shards.iter().all(|s| (1..=3).contains(s)));
}

fn register(subsystem: &str) -> Command {
    Command::Access(AccessCommand::AddMember(MemberRecord {
        subsystem: subsystem.parse().unwrap(),
        registered_unix_ms: 1,
        quota: SubsystemQuota::default(),
    }))
}

/// Members, grants and groups are applied deterministically, survive a reopen, and decide
/// what a caller may do.
#[tokio::test]
async fn access_rights_are_applied_and_survive_a_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let (mut sm, view) = StateMachine::open_metadata(store.clone()).unwrap();
    let owner: SubsystemId = "TM/GOV/MINFIN/tax".parse().unwrap();
    let sender: SubsystemId = "TM/GOV/MINCOM/registry".parse().unwrap();
    let mailbox = "TM/GOV/MINFIN/tax/declarations";
    let grant = |grantee: &str| Command::Access(AccessCommand::Grant { service: mailbox.into(), grantee: grantee.parse().unwrap() });
    let create = Command::CreateMailbox {
        service: mailbox.into(),
        partitions: 1,
        shard_count: 1,
        created_unix_ms: 1,
        limits: Default::default(),
        policy: Default::default(),
    };
    let r = sm
        .apply(vec![
            entry(1, register("TM/GOV/MINFIN/tax")),
            entry(2, register("TM/GOV/MINFIN/tax")),
            entry(3, grant("TM/GOV/MINCOM/registry")),
            entry(4, create),
            entry(5, grant("TM/GOV/MINCOM/registry")),
            entry(6, register("TM/GOV/MINCOM/registry")),
            entry(7, grant("group:ministries")),
            entry(8, Command::Access(AccessCommand::AddToGroup { group: "ministries".into(), subsystem: sender.clone() })),
            entry(9, grant("group:ministries")),
        ])
        .await
        .unwrap();
    assert_eq!(r[0], CommandResult::Changed(1));
    assert!(matches!(&r[1], CommandResult::Rejected(kerwen_broker::BrokerError::AlreadyExists(_))), "{:?}", r[1]);
    assert!(matches!(&r[2], CommandResult::Rejected(kerwen_broker::BrokerError::NotFound(_))), "no mailbox yet: {:?}", r[2]);
    assert!(matches!(&r[4], CommandResult::Rejected(kerwen_broker::BrokerError::NotFound(_))), "grantee unregistered: {:?}", r[4]);
    assert!(matches!(&r[6], CommandResult::Rejected(kerwen_broker::BrokerError::NotFound(_))), "no such group: {:?}", r[6]);
    assert_eq!(r[8], CommandResult::Changed(1));
    let send = Action::Send(mailbox.parse().unwrap());
    assert!(view.authorize(&Principal::Subsystem(sender.clone()), &send).is_ok(), "granted through the group");
    assert!(view.authorize(&Principal::Subsystem(owner.clone()), &Action::Consume(mailbox.parse().unwrap())).is_ok());
    drop((sm, view));

    let (mut sm, view) = StateMachine::open_metadata(store).unwrap();
    assert!(view.authorize(&Principal::Subsystem(sender.clone()), &send).is_ok(), "the grant survives a reopen");
    let r = sm
        .apply(vec![entry(10, Command::Access(AccessCommand::RemoveFromGroup { group: "ministries".into(), subsystem: sender.clone() }))])
        .await
        .unwrap();
    assert_eq!(r[0], CommandResult::Changed(1));
    assert!(view.authorize(&Principal::Subsystem(sender), &send).is_err(), "out of the group, no grant");
}

/// A node's advertised client address is kept across its re-registrations and a reopen; an
/// unregistered node cannot advertise one.
#[tokio::test]
async fn advertised_client_addresses_are_kept_by_the_registry() {
    use kerwen_broker::cluster::ClusterCommand;
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let (mut sm, view) = StateMachine::open_metadata(store.clone()).unwrap();
    let register = Command::Cluster(ClusterCommand::Register { id: 1, address: "n1:7101".into(), zone: None, admit: false });
    let advertise = |id| Command::Cluster(ClusterCommand::Advertise { id, client_address: format!("n{id}:7001") });
    let r = sm.apply(vec![entry(1, advertise(1)), entry(2, register.clone()), entry(3, advertise(1)), entry(4, register)]).await.unwrap();
    assert!(matches!(&r[0], CommandResult::Rejected(kerwen_broker::BrokerError::NotFound(_))), "{:?}", r[0]);
    assert_eq!((&r[1], &r[2], &r[3]), (&CommandResult::Changed(1), &CommandResult::Changed(1), &CommandResult::Changed(0)));
    assert_eq!(view.node(1).and_then(|n| n.client_address).as_deref(), Some("n1:7001"));
    drop((sm, view));
    let (_sm, view) = StateMachine::open_metadata(store).unwrap();
    assert_eq!(view.node(1).and_then(|n| n.client_address).as_deref(), Some("n1:7001"), "survives a reopen");
}

/// A coalesced entry applies its commands in order, each with its own result: a later
/// command sees an earlier one's effects, and a refused command does not spoil the others.
#[tokio::test]
async fn a_batch_entry_applies_each_command_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let (_store, mut sm, view) = open_shard(dir.path());
    let results = sm
        .apply(vec![entry(1, Command::Batch(vec![
            Command::publish(vec![message("a", 0, "x"), message("b", 0, "y")]),
            Command::CreateMailbox { service: "TM/GOV/A/s/one".into(), partitions: 1, shard_count: 1, created_unix_ms: 1, limits: Default::default(), policy: Default::default() },
            Command::Ack { mailbox: 1, positions: vec![Position { partition: 0, sequence: 0 }], consumer: None, attempts: Vec::new() },
            Command::publish(vec![message("c", 0, "z")]),
        ]))])
        .await
        .unwrap();
    let CommandResult::Batch(results) = &results[0] else { panic!("unexpected {results:?}") };
    assert_eq!(results[0], CommandResult::Published(vec![Position { partition: 0, sequence: 0 }, Position { partition: 0, sequence: 1 }]));
    assert!(matches!(results[1], CommandResult::Rejected(kerwen_broker::BrokerError::Internal(_))), "{:?}", results[1]);
    assert_eq!(results[2], CommandResult::Acked(1));
    assert_eq!(results[3], CommandResult::Published(vec![Position { partition: 0, sequence: 2 }]));
    let left = fetch(&mut sm, &view, 1, &[0], 10).await;
    assert_eq!(left.iter().map(|l| l.message.id.as_str()).collect::<Vec<_>>(), ["b", "c"]);
}

fn at(mut m: NewMessage, accepted_unix_ms: i64) -> NewMessage {
    m.message.accepted_unix_ms = accepted_unix_ms;
    m
}

fn limits(window_ms: u64, max_messages: u64, max_bytes: u64) -> Vec<ShardLimits> {
    vec![ShardLimits {
        sender_max_stored_bytes: None,
        evidence_retention_ms: kerwen_broker::model::MailboxLimits::DEFAULT_EVIDENCE_RETENTION_MS,
        mailbox: 1,
        service: "TM/GOV/MINFIN/tax/declarations".into(),
        dedup_window_ms: window_ms,
        max_messages,
        max_bytes,
        partitions: vec![0, 1],
    }]
}

fn publish_with(messages: Vec<NewMessage>, limits: Vec<ShardLimits>) -> Command {
    Command::Publish { messages, limits }
}

/// A message id seen within the window is answered with its first position and stored
/// once — also after it was acked, and also twice within one command; past the window the
/// id is new again and its old record is purged.
#[tokio::test]
async fn republished_ids_within_the_window_are_stored_once() {
    let dir = tempfile::tempdir().unwrap();
    let (store, mut sm, view) = open_shard(dir.path());
    let window = 10_000;
    let first = Position { partition: 0, sequence: 0 };
    let r = sm
        .apply(vec![entry(1, publish_with(vec![at(message("a", 0, "x"), 1_000), at(message("a", 0, "x"), 1_000)], limits(window, 100, 100)))])
        .await
        .unwrap();
    assert_eq!(r, vec![CommandResult::Published(vec![first, first])], "same id twice in one command");
    let r = sm.apply(vec![entry(2, publish_with(vec![at(message("a", 1, "x"), 5_000)], limits(window, 100, 100)))]).await.unwrap();
    assert_eq!(r, vec![CommandResult::Published(vec![first])], "a retry routed elsewhere still finds the first");
    assert_eq!(view.stats(1, &[0, 1]).unwrap().messages, 1);

    sm.apply(vec![entry(3, Command::Ack { mailbox: 1, positions: vec![first], consumer: None, attempts: Vec::new() })]).await.unwrap();
    let r = sm.apply(vec![entry(4, publish_with(vec![at(message("a", 0, "x"), 10_999)], limits(window, 100, 100)))]).await.unwrap();
    assert_eq!(r, vec![CommandResult::Published(vec![first])], "acked, still within the window");
    assert_eq!(view.stats(1, &[0, 1]).unwrap().messages, 0, "not stored again");

    let r = sm.apply(vec![entry(5, publish_with(vec![at(message("a", 0, "x"), 11_000)], limits(window, 100, 100)))]).await.unwrap();
    let second = Position { partition: 0, sequence: 1 };
    assert_eq!(r, vec![CommandResult::Published(vec![second])], "past the window the id is new");
    // Another id, much later: the purge removes the second record of "a" too.
    sm.apply(vec![entry(6, publish_with(vec![at(message("b", 0, "y"), 50_000)], limits(window, 100, 100)))]).await.unwrap();
    let r = sm.apply(vec![entry(7, publish_with(vec![at(message("a", 0, "x"), 50_001)], limits(window, 100, 100)))]).await.unwrap();
    assert_eq!(r, vec![CommandResult::Published(vec![Position { partition: 0, sequence: 3 }])]);
    let dedup_records = store
        .db()
        .prefix_iterator_cf(&store.db().cf_handle(kerwen_broker::storage::CF_STATE).unwrap(), [0, 0, 0, 1, b'd'])
        .filter_map(|item| item.ok())
        .take_while(|(k, _)| k.starts_with(&[0, 0, 0, 1, b'd']))
        .count();
    assert_eq!(dedup_records, 2, "only a's and b's live records are left");
}

/// Publishing past a mailbox's quota is refused as a whole and changes nothing; after an
/// ack there is room again. Duplicates do not count.
#[tokio::test]
async fn publish_past_the_quota_is_refused_and_stores_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let (_store, mut sm, view) = open_shard(dir.path());
    let quota = || limits(60_000, 2, 1_000);
    let r = sm.apply(vec![entry(1, publish_with(vec![message("a", 0, "x"), message("b", 1, "y")], quota()))]).await.unwrap();
    assert!(matches!(r[0], CommandResult::Published(_)));
    let r = sm.apply(vec![entry(2, publish_with(vec![message("a", 0, "x"), message("c", 0, "z")], quota()))]).await.unwrap();
    assert!(matches!(&r[0], CommandResult::Rejected(kerwen_broker::BrokerError::ResourceExhausted(m)) if m.contains("is full")), "{r:?}");
    let stats = view.stats(1, &[0, 1]).unwrap();
    assert_eq!((stats.messages, stats.bytes), (2, 2), "nothing of the refused publish was stored");
    let r = sm.apply(vec![entry(3, publish_with(vec![message("b", 1, "y")], quota()))]).await.unwrap();
    assert_eq!(r, vec![CommandResult::Published(vec![Position { partition: 1, sequence: 0 }])], "a duplicate needs no room");

    sm.apply(vec![entry(4, Command::Ack { mailbox: 1, positions: vec![Position { partition: 0, sequence: 0 }], consumer: None, attempts: Vec::new() })]).await.unwrap();
    let r = sm.apply(vec![entry(5, publish_with(vec![message("c", 0, "z")], quota()))]).await.unwrap();
    assert_eq!(r, vec![CommandResult::Published(vec![Position { partition: 0, sequence: 1 }])]);
    let big = sm.apply(vec![entry(6, publish_with(vec![message("d", 1, &"x".repeat(999))], limits(60_000, 100, 1_000)))]).await.unwrap();
    assert!(matches!(&big[0], CommandResult::Rejected(kerwen_broker::BrokerError::ResourceExhausted(_))), "byte quota: {big:?}");
}

/// A sender's stored-bytes quota counts its waiting messages across mailboxes, survives a
/// reopen, frees up on ack, and leaves other senders alone.
#[tokio::test]
async fn a_senders_stored_bytes_are_capped_and_freed_on_ack() {
    let dir = tempfile::tempdir().unwrap();
    let (store, mut sm, view) = open_shard(dir.path());
    let from = |sender: &str, id: &str, payload: &str| {
        let mut m = message(id, 0, payload);
        m.message.sender = sender.into();
        m
    };
    let capped = || {
        let mut l = limits(60_000, 100, 100_000);
        l[0].sender_max_stored_bytes = Some(10);
        l
    };
    let r = apply_one(&mut sm, publish_with(vec![from("A", "a1", "1234"), from("A", "a2", "5678")], capped())).await;
    assert!(matches!(r, CommandResult::Published(_)), "{r:?}");
    let r = apply_one(&mut sm, publish_with(vec![from("A", "a3", "9999")], capped())).await;
    assert!(matches!(&r, CommandResult::Rejected(kerwen_broker::BrokerError::ResourceExhausted(m)) if m.contains("subsystem A")), "{r:?}");
    let r = apply_one(&mut sm, publish_with(vec![from("B", "b1", "9999")], capped())).await;
    assert!(matches!(r, CommandResult::Published(_)), "another sender is not affected: {r:?}");
    drop((sm, view));

    let (mut sm, _view) = StateMachine::open_shard(store, 1).unwrap();
    let r = apply_one(&mut sm, publish_with(vec![from("A", "a3", "9999")], capped())).await;
    assert!(matches!(r, CommandResult::Rejected(_)), "the count survives a reopen: {r:?}");
    let ack = Command::Ack { mailbox: 1, positions: vec![Position { partition: 0, sequence: 0 }], consumer: None, attempts: Vec::new() };
    apply_one(&mut sm, ack).await;
    let r = apply_one(&mut sm, publish_with(vec![from("A", "a3", "9999")], capped())).await;
    assert!(matches!(r, CommandResult::Published(_)), "an ack frees room: {r:?}");
}

// ---- Delivery semantics: leases, nack, back-off, dead letters, TTL, ordering ----------------

fn settle(consumer: u64, positions: Vec<Position>, now_unix_ms: i64, action: SettleAction) -> Command {
    Command::Settle { mailbox: 1, consumer, positions, now_unix_ms, action }
}

fn ids(leased: &[Leased]) -> Vec<&str> {
    leased.iter().map(|l| l.message.id.as_str()).collect()
}

const DLQ0: u32 = DEAD_LETTER_BIT;

#[tokio::test]
async fn nack_delay_and_backoff_set_the_earliest_redelivery_then_max_attempts_dead_letters() {
    let dir = tempfile::tempdir().unwrap();
    let (_store, mut sm, view) = open_shard(dir.path());
    let policy = RedeliveryPolicy { max_attempts: 3, backoff_initial_ms: 1_000, backoff_max_ms: 60_000 };
    let at = |now| Fetch { consumer: 7, partitions: &[0], max: 10, now, policy, ordered: false };
    apply_one(&mut sm, Command::publish(vec![message("a", 0, "payload")])).await;

    let first = fetch_with(&mut sm, &view, at(T0)).await;
    assert_eq!((ids(&first), first[0].attempt), (vec!["a"], 1));
    let pos = first[0].position;
    // A nack from another consumer changes nothing.
    assert_eq!(apply_one(&mut sm, settle(8, vec![pos], T0, SettleAction::Nack { delay_ms: None })).await, CommandResult::Changed(0));
    // Nack with a delay: redelivered no earlier than the delay.
    apply_one(&mut sm, settle(7, vec![pos], T0 + 10, SettleAction::Nack { delay_ms: Some(5_000) })).await;
    assert!(fetch_with(&mut sm, &view, at(T0 + 5_009)).await.is_empty());
    let second = fetch_with(&mut sm, &view, at(T0 + 5_010)).await;
    assert_eq!(second[0].attempt, 2);
    // Nack without a delay: the back-off after attempt 2 is 2 x 1 s.
    let t = T0 + 6_000;
    apply_one(&mut sm, settle(7, vec![pos], t, SettleAction::Nack { delay_ms: None })).await;
    assert!(fetch_with(&mut sm, &view, at(t + 1_999)).await.is_empty());
    let third = fetch_with(&mut sm, &view, at(t + 2_000)).await;
    assert_eq!(third[0].attempt, 3);
    // The last allowed attempt is nacked: straight to the dead-letter queue.
    let t = t + 3_000;
    apply_one(&mut sm, settle(7, vec![pos], t, SettleAction::Nack { delay_ms: None })).await;
    assert!(fetch_with(&mut sm, &view, at(t + 3_600_000)).await.is_empty(), "never delivered from the mailbox again");
    assert_eq!(view.stats(1, &[0]).unwrap().messages, 0);
    assert_eq!(view.stats(1, &[DLQ0]).unwrap().messages, 1);
    let dead = view.dead_letters(1, &[DLQ0], 10).unwrap();
    assert_eq!(dead.len(), 1);
    let letter = &dead[0].letter;
    assert_eq!((letter.reason, letter.attempts, letter.from), (DeadLetterReason::MaxAttempts, 3, pos));
    let outcomes: Vec<&str> = letter.history.iter().map(|a| a.outcome.as_str()).collect();
    assert_eq!(outcomes, ["nacked", "nacked", "nacked"]);

    // Redrive: back on its partition as a new message, delivered from attempt 1.
    let redriven = apply_one(&mut sm, Command::Redrive { mailbox: 1, positions: vec![dead[0].position], now_unix_ms: t }).await;
    assert_eq!(redriven, CommandResult::Changed(1));
    assert!(view.dead_letters(1, &[DLQ0], 10).unwrap().is_empty());
    let back = fetch_with(&mut sm, &view, at(t + 1)).await;
    assert_eq!((ids(&back), back[0].attempt), (vec!["a"], 1));
    assert_eq!(back[0].position, Position { partition: 0, sequence: 1 });
    assert_eq!(&back[0].message.payload[..], b"payload");
    assert!(back[0].message.dead_letter.is_none());
}

#[tokio::test]
async fn expired_leases_count_as_attempts_and_the_last_one_is_swept_to_the_dead_letter_queue() {
    let dir = tempfile::tempdir().unwrap();
    let (_store, mut sm, view) = open_shard(dir.path());
    let policy = RedeliveryPolicy { max_attempts: 2, backoff_initial_ms: 500, backoff_max_ms: 500 };
    let at = |now| Fetch { consumer: 7, partitions: &[0], max: 10, now, policy, ordered: false };
    apply_one(&mut sm, Command::publish(vec![message("a", 0, "x")])).await;
    assert_eq!(fetch_with(&mut sm, &view, at(T0)).await[0].attempt, 1);
    let t2 = T0 + LEASE_MS + 500;
    assert_eq!(fetch_with(&mut sm, &view, at(t2)).await[0].attempt, 2);
    // The second lease has not ended: nothing to sweep.
    assert!(view.sweep_candidates(t2 + LEASE_MS - 1, 100).unwrap().is_empty());
    let candidates = view.sweep_candidates(t2 + LEASE_MS, 100).unwrap();
    let positions = candidates.get(&1).cloned().unwrap_or_default();
    assert_eq!(positions, vec![Position { partition: 0, sequence: 0 }]);
    // Applying re-checks: too early, nothing moves; at the lease end, it moves.
    let early = Command::DeadLetter { mailbox: 1, positions: positions.clone(), now_unix_ms: t2 + 1 };
    assert_eq!(apply_one(&mut sm, early).await, CommandResult::Changed(0));
    let due = Command::DeadLetter { mailbox: 1, positions, now_unix_ms: t2 + LEASE_MS };
    assert_eq!(apply_one(&mut sm, due).await, CommandResult::Changed(1));
    let dead = view.dead_letters(1, &[DLQ0], 10).unwrap();
    assert_eq!((dead[0].letter.reason, dead[0].letter.attempts), (DeadLetterReason::MaxAttempts, 2));
    let outcomes: Vec<&str> = dead[0].letter.history.iter().map(|a| a.outcome.as_str()).collect();
    assert_eq!(outcomes, ["expired", "expired"]);

    // The dead-letter queue is consumed like a mailbox, its messages carrying the letter.
    let from_dlq = fetch_with(&mut sm, &view, Fetch { partitions: &[DLQ0], ..at(t2 + LEASE_MS) }).await;
    assert_eq!(ids(&from_dlq), ["a"]);
    assert_eq!(from_dlq[0].message.dead_letter.as_ref().map(|d| d.reason), Some(DeadLetterReason::MaxAttempts));
    let acked = apply_one(&mut sm, Command::Ack { mailbox: 1, positions: vec![from_dlq[0].position], consumer: None, attempts: Vec::new() }).await;
    assert_eq!(acked, CommandResult::Acked(1));
    assert_eq!(view.stats(1, &[DLQ0]).unwrap().messages, 0);
}

fn with_ttl(mut m: NewMessage, expires_unix_ms: i64) -> NewMessage {
    m.message.ttl_ms = Some(100);
    m.message.expires_unix_ms = Some(expires_unix_ms);
    m
}

#[tokio::test]
async fn expired_messages_are_never_delivered_and_land_in_the_dead_letter_queue() {
    let dir = tempfile::tempdir().unwrap();
    let (_store, mut sm, view) = open_shard(dir.path());
    let expires = T0 + 100;
    apply_one(&mut sm, Command::publish(vec![with_ttl(message("a", 0, "x"), expires), with_ttl(message("b", 1, "y"), expires)])).await;
    // Before expiry it is delivered; a fetch at expiry moves it instead of leasing it.
    assert!(view.sweep_candidates(expires - 1, 100).unwrap().is_empty());
    assert!(fetch_at(&mut sm, &view, 1, &[0], 10, expires).await.is_empty());
    // The other one is found by the sweep.
    let candidates = view.sweep_candidates(expires, 100).unwrap();
    assert_eq!(candidates.get(&1).cloned().unwrap_or_default(), vec![Position { partition: 1, sequence: 0 }]);
    let sweep = Command::DeadLetter { mailbox: 1, positions: candidates[&1].clone(), now_unix_ms: expires };
    assert_eq!(apply_one(&mut sm, sweep).await, CommandResult::Changed(1));
    assert!(view.sweep_candidates(expires + 1_000, 100).unwrap().is_empty(), "the expiry index is emptied");
    let dead = view.dead_letters(1, &[DLQ0, DEAD_LETTER_BIT | 1], 10).unwrap();
    assert_eq!(dead.iter().map(|d| (d.id.as_str(), d.letter.reason)).collect::<Vec<_>>(), [
        ("a", DeadLetterReason::Expired),
        ("b", DeadLetterReason::Expired)
    ]);
    assert_eq!(view.stats(1, &[0, 1]).unwrap().messages, 0);
    // Redriven, the time to live starts over from the redrive.
    let redrive = Command::Redrive { mailbox: 1, positions: vec![dead[0].position], now_unix_ms: T0 + 10_000 };
    assert_eq!(apply_one(&mut sm, redrive).await, CommandResult::Changed(1));
    let back = fetch_at(&mut sm, &view, 1, &[0], 10, T0 + 10_050).await;
    assert_eq!(back[0].message.expires_unix_ms, Some(T0 + 10_100));
}

fn keyed(id: &str, key: &str) -> NewMessage {
    let mut m = message(id, 0, "x");
    m.message.ordering_key = Some(key.into());
    m
}

#[tokio::test]
async fn ordered_delivery_leases_one_message_per_key_in_publish_order() {
    let dir = tempfile::tempdir().unwrap();
    let (_store, mut sm, view) = open_shard(dir.path());
    let ordered = |consumer, now| Fetch { consumer, partitions: &[0], max: 10, now, policy: POLICY, ordered: true };
    apply_one(
        &mut sm,
        Command::publish(vec![keyed("k1-1", "k1"), keyed("k2-1", "k2"), keyed("k1-2", "k1"), keyed("k1-3", "k1"), keyed("k2-2", "k2")]),
    )
    .await;
    let heads = fetch_with(&mut sm, &view, ordered(1, T0)).await;
    assert_eq!(ids(&heads), ["k1-1", "k2-1"]);
    assert!(fetch_with(&mut sm, &view, ordered(2, T0)).await.is_empty(), "both keys are in flight");
    // Ack k1's head: its next message becomes eligible, k2 still waits.
    apply_one(&mut sm, Command::Ack { mailbox: 1, positions: vec![heads[0].position], consumer: None, attempts: Vec::new() }).await;
    assert_eq!(ids(&fetch_with(&mut sm, &view, ordered(2, T0)).await), ["k1-2"]);
    // A nacked head blocks its key until redelivered; it comes back before anything later.
    apply_one(&mut sm, settle(1, vec![heads[1].position], T0, SettleAction::Nack { delay_ms: Some(1_000) })).await;
    assert!(fetch_with(&mut sm, &view, ordered(3, T0 + 999)).await.is_empty());
    let again = fetch_with(&mut sm, &view, ordered(3, T0 + 1_000)).await;
    assert_eq!((ids(&again), again[0].attempt), (vec!["k2-1"], 2));
}

#[tokio::test]
async fn extending_a_lease_postpones_redelivery_and_only_the_holder_may_extend() {
    let dir = tempfile::tempdir().unwrap();
    let (_store, mut sm, view) = open_shard(dir.path());
    apply_one(&mut sm, Command::publish(vec![message("a", 0, "x")])).await;
    let leased = fetch(&mut sm, &view, 1, &[0], 10).await;
    let pos = leased[0].position;
    let longer = SettleAction::Extend { until_unix_ms: T0 + 2 * LEASE_MS };
    assert_eq!(apply_one(&mut sm, settle(2, vec![pos], T0 + 1, longer)).await, CommandResult::Changed(0));
    assert_eq!(apply_one(&mut sm, settle(1, vec![pos], T0 + 1, longer)).await, CommandResult::Changed(1));
    let after_first_lease = T0 + LEASE_MS + 60_000;
    assert!(fetch_at(&mut sm, &view, 3, &[0], 10, after_first_lease).await.is_empty());
    let later = T0 + 2 * LEASE_MS + 60_000;
    assert_eq!(fetch_at(&mut sm, &view, 3, &[0], 10, later).await[0].attempt, 2);
}

// ---- Large payloads: chunked uploads ------------------------------------------------------

#[tokio::test]
async fn an_upload_stores_chunks_in_order_commits_one_message_and_ack_deletes_the_chunks() {
    let dir = tempfile::tempdir().unwrap();
    let (_store, mut sm, view) = open_shard(dir.path());
    let new = message("big", 0, "");
    let begin = || Command::UploadBegin { new: new.clone(), total_bytes: 6, sha256: [7; 32], limits: limits(60_000, 100, 1_000).remove(0) };
    let chunk = |offset, data: &'static [u8]| Command::UploadChunk { mailbox: 1, id: "big".into(), offset, data: data.into() };
    let receiving = |received| CommandResult::Upload(UploadProgress::Receiving { upload: 1, received });
    assert_eq!(apply_one(&mut sm, begin()).await, receiving(0));
    assert_eq!(apply_one(&mut sm, chunk(0, b"abc")).await, receiving(3));
    // A chunk sent again, or ahead of the upload's end, is ignored: the answer says where to go on.
    assert_eq!(apply_one(&mut sm, chunk(0, b"abc")).await, receiving(3));
    assert_eq!(apply_one(&mut sm, chunk(5, b"f")).await, receiving(3));
    // Committing early is refused; beginning again resumes.
    let commit = || Command::UploadCommit { mailbox: 1, id: "big".into() };
    assert!(matches!(apply_one(&mut sm, commit()).await, CommandResult::Rejected(_)));
    assert_eq!(apply_one(&mut sm, begin()).await, receiving(3));
    assert_eq!(apply_one(&mut sm, chunk(3, b"def")).await, receiving(6));
    let stored = apply_one(&mut sm, commit()).await;
    let position = Position { partition: 0, sequence: 0 };
    assert_eq!(stored, CommandResult::Upload(UploadProgress::Stored(position)));
    assert_eq!(view.stats(1, &[0]).unwrap().bytes, 6, "the payload counts with its full size");
    assert_eq!(view.read_chunk(1, 4).unwrap().map(|(start, data)| (start, data.to_vec())), Some((3, b"def".to_vec())));
    // Beginning the same id again is answered with the stored position (dedup window).
    assert_eq!(apply_one(&mut sm, begin()).await, CommandResult::Upload(UploadProgress::Stored(position)));

    let leased = fetch(&mut sm, &view, 1, &[0], 10).await;
    assert_eq!(leased[0].message.large.map(|l| l.total_bytes), Some(6));
    apply_one(&mut sm, Command::Ack { mailbox: 1, positions: vec![position], consumer: None, attempts: Vec::new() }).await;
    assert_eq!(view.read_chunk(1, 0).unwrap(), None, "acking deleted the chunks");
    assert_eq!(view.stats(1, &[0]).unwrap().bytes, 0);
}

#[tokio::test]
async fn abandoned_uploads_are_listed_and_aborting_deletes_their_chunks() {
    let dir = tempfile::tempdir().unwrap();
    let (_store, mut sm, view) = open_shard(dir.path());
    let begin = Command::UploadBegin { new: at(message("big", 0, ""), 5_000), total_bytes: 10, sha256: [0; 32], limits: limits(60_000, 100, 1_000).remove(0) };
    apply_one(&mut sm, begin).await;
    apply_one(&mut sm, Command::UploadChunk { mailbox: 1, id: "big".into(), offset: 0, data: b"12345".to_vec().into() }).await;
    assert!(view.stale_uploads(5_000).unwrap().is_empty());
    assert_eq!(view.stale_uploads(5_001).unwrap(), vec![(1, "big".to_owned())]);
    assert_eq!(apply_one(&mut sm, Command::UploadAbort { mailbox: 1, id: "big".into() }).await, CommandResult::Changed(1));
    assert_eq!(view.read_chunk(1, 0).unwrap(), None);
    assert!(view.stale_uploads(i64::MAX).unwrap().is_empty());
    // Quota: an upload larger than the mailbox may hold is refused up front.
    let huge = Command::UploadBegin { new: message("huge", 0, ""), total_bytes: 10_000, sha256: [0; 32], limits: limits(60_000, 100, 1_000).remove(0) };
    assert!(matches!(apply_one(&mut sm, huge).await, CommandResult::Rejected(kerwen_broker::BrokerError::ResourceExhausted(_))));
}

#[tokio::test]
async fn an_ack_from_a_consumer_whose_lease_went_to_another_is_ignored() {
    let dir = tempfile::tempdir().unwrap();
    let (_store, mut sm, view) = open_shard(dir.path());
    apply_one(&mut sm, Command::publish(vec![keyed("k1-1", "k1"), keyed("k1-2", "k1")])).await;
    let ordered = |consumer, now| Fetch { consumer, partitions: &[0], max: 10, now, policy: POLICY, ordered: true };
    let first = fetch_with(&mut sm, &view, ordered(1, T0)).await;
    assert_eq!(ids(&first), ["k1-1"]);
    // Consumer 1's lease runs out; consumer 2 gets the message.
    let later = T0 + LEASE_MS + 1_000;
    assert_eq!(ids(&fetch_with(&mut sm, &view, ordered(2, later)).await), ["k1-1"]);
    // Consumer 1's late ack must not remove it from under consumer 2 (k1-2 would overtake).
    let stale = Command::Ack { mailbox: 1, positions: vec![first[0].position], consumer: Some(1), attempts: Vec::new() };
    assert_eq!(apply_one(&mut sm, stale).await, CommandResult::Acked(0));
    assert!(fetch_with(&mut sm, &view, ordered(3, later)).await.is_empty(), "k1-2 must wait for k1-1");
    let current = Command::Ack { mailbox: 1, positions: vec![first[0].position], consumer: Some(2), attempts: Vec::new() };
    assert_eq!(apply_one(&mut sm, current).await, CommandResult::Acked(1));
    assert_eq!(ids(&fetch_with(&mut sm, &view, ordered(3, later)).await), ["k1-2"]);
}

#[tokio::test]
async fn an_ack_of_an_attempt_that_was_redelivered_since_is_ignored() {
    let dir = tempfile::tempdir().unwrap();
    let (_store, mut sm, view) = open_shard(dir.path());
    apply_one(&mut sm, Command::publish(vec![keyed("k1-1", "k1"), keyed("k1-2", "k1")])).await;
    let ordered = |consumer, now| Fetch { consumer, partitions: &[0], max: 10, now, policy: POLICY, ordered: true };
    let first = fetch_with(&mut sm, &view, ordered(1, T0)).await;
    // The lease runs out and the same consumer stream gets the message again (attempt 2).
    let later = T0 + LEASE_MS + 1_000;
    let second = fetch_with(&mut sm, &view, ordered(1, later)).await;
    assert_eq!((ids(&second), second[0].attempt), (vec!["k1-1"], 2));
    // The late ack of attempt 1 must not remove it while attempt 2 is in flight.
    let pos = first[0].position;
    let stale = Command::Ack { mailbox: 1, positions: vec![pos], consumer: Some(1), attempts: vec![1] };
    assert_eq!(apply_one(&mut sm, stale).await, CommandResult::Acked(0));
    assert!(fetch_with(&mut sm, &view, ordered(3, later)).await.is_empty(), "k1-2 must wait for k1-1");
    let current = Command::Ack { mailbox: 1, positions: vec![pos], consumer: Some(1), attempts: vec![2] };
    assert_eq!(apply_one(&mut sm, current).await, CommandResult::Acked(1));
    assert_eq!(ids(&fetch_with(&mut sm, &view, ordered(3, later)).await), ["k1-2"]);
}

// ---- Encryption at rest --------------------------------------------------------------------

/// Whether `needle` occurs in any file under `dir` (RocksDB's WAL, SST files, manifest, ...).
fn found_in_files(dir: &std::path::Path, needle: &[u8]) -> bool {
    let mut pending = vec![dir.to_path_buf()];
    let mut files = 0;
    while let Some(path) = pending.pop() {
        if path.is_dir() {
            pending.extend(std::fs::read_dir(&path).expect("list dir").map(|e| e.expect("dir entry").path()));
        } else {
            files += 1;
            let bytes = std::fs::read(&path).expect("read file");
            if bytes.windows(needle.len()).any(|w| w == needle) {
                return true;
            }
        }
    }
    assert!(files > 0, "nothing to scan under {}", dir.display());
    false
}

/// Writes `canary` every way a payload reaches RocksDB: in Raft log entries (a publish, an
/// upload chunk), as a stored message (`m`), an upload chunk (`c`) and a snapshot kept in
/// `raft_meta`; part of it flushed to SST files, the rest left in the WAL. Installs the
/// snapshot on a second store (`follower_dir`, another key). Then checks that it all reads
/// back after a reopen.
async fn write_canaries(dir: &std::path::Path, follower_dir: &std::path::Path, algorithm: Algorithm, canary: &str) {
    let first = format!("{canary} in a published message");
    let chunk = format!("{canary} in an upload chunk");
    {
        let store = open_store_with(dir, algorithm, TEST_KEY);
        let (_, mut sm, _view) = shard_of(store.clone());
        let mut log = store.log_store(1);
        let new_upload = message("upload", 0, "");
        let upload_limits = limits(60_000, 100, 1_000).remove(0);
        let commands = [
            Command::publish(vec![message("m1", 0, &first)]),
            Command::UploadBegin { new: new_upload, total_bytes: chunk.len() as u64, sha256: [0; 32], limits: upload_limits },
            Command::UploadChunk { mailbox: 1, id: "upload".into(), offset: 0, data: chunk.clone().into_bytes().into() },
            Command::UploadCommit { mailbox: 1, id: "upload".into() },
        ];
        for (i, cmd) in commands.into_iter().enumerate() {
            let e = entry(i as u64 + 1, cmd);
            {
                use openraft::storage::RaftLogStorageExt;
                log.blocking_append(vec![e.clone()]).await.expect("append");
            }
            let result = sm.apply(vec![e]).await.expect("apply").remove(0);
            assert!(!matches!(result, CommandResult::Rejected(_)), "{result:?}");
        }
        let snapshot = sm.get_snapshot_builder().await.build_snapshot().await.expect("snapshot");
        for cf in [kerwen_broker::storage::CF_RAFT_LOG, kerwen_broker::storage::CF_RAFT_META, kerwen_broker::storage::CF_STATE] {
            store.db().flush_cf(&store.db().cf_handle(cf).expect("column family")).expect("flush");
        }
        // After the flush: in the WAL (and memtable) only.
        let later = entry(5, Command::publish(vec![message("m2", 1, &first)]));
        {
            use openraft::storage::RaftLogStorageExt;
            log.blocking_append(vec![later.clone()]).await.expect("append");
        }
        sm.apply(vec![later]).await.expect("apply");
        store.sync().await.expect("sync");

        let (follower_store, mut follower, _) = shard_of(open_store_with(follower_dir, algorithm, [43; 32]));
        follower.install_snapshot(&snapshot.meta, snapshot.snapshot).await.expect("install snapshot");
        follower_store.sync().await.expect("sync");
    }
    // Everything reads back under the same key.
    let (store, mut sm, view) = open_shard_with(dir, algorithm);
    let leased = fetch(&mut sm, &view, 1, &[0, 1], 10).await;
    let payloads: Vec<&[u8]> = leased.iter().filter(|l| l.message.large.is_none()).map(|l| &l.message.payload[..]).collect();
    assert_eq!(payloads, [first.as_bytes(), first.as_bytes()]);
    assert_eq!(view.read_chunk(1, 0).expect("read chunk").map(|(_, data)| data.to_vec()), Some(chunk.into_bytes()));
    use openraft::storage::RaftLogReader;
    assert_eq!(store.log_store(1).try_get_log_entries(1..6).await.expect("log").len(), 5);
    let (_, mut follower, follower_view) = shard_of(open_store_with(follower_dir, algorithm, [43; 32]));
    assert_eq!(follower.applied_state().await.expect("applied").0, Some(log_id(4)));
    assert_eq!(fetch(&mut follower, &follower_view, 1, &[0, 1], 10).await.len(), 2, "the message and the upload");
}

fn open_shard_with(dir: &std::path::Path, algorithm: Algorithm) -> (Arc<Store>, StateMachine, Arc<ShardView>) {
    shard_of(open_store_with(dir, algorithm, TEST_KEY))
}

fn canary() -> String {
    format!("KERWEN-AT-REST-CANARY-{:016x}", rand::random::<u64>())
}

#[tokio::test]
async fn no_payload_byte_is_readable_in_the_database_files() {
    for algorithm in [Algorithm::Aes256Gcm, Algorithm::ChaCha20Poly1305] {
        let (dir, follower_dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
        let canary = canary();
        write_canaries(dir.path(), follower_dir.path(), algorithm, &canary).await;
        for d in [dir.path(), follower_dir.path()] {
            assert!(!found_in_files(d, canary.as_bytes()), "{algorithm}: the canary is readable under {}", d.display());
            // Not even its random part on its own.
            assert!(!found_in_files(d, &canary.as_bytes()[canary.len() - 16..]), "{algorithm}: {}", d.display());
        }
    }
}

/// The same scan finds the canary when values are not encrypted: it can fail.
#[tokio::test]
async fn without_encryption_the_canary_is_found_in_the_files() {
    let (dir, follower_dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let canary = canary();
    write_canaries(dir.path(), follower_dir.path(), Algorithm::None, &canary).await;
    assert!(found_in_files(dir.path(), canary.as_bytes()));
    assert!(found_in_files(follower_dir.path(), canary.as_bytes()));
}

/// Switching the setting on an existing data dir keeps what was written before readable; a
/// different data key does not read it, and says so.
#[tokio::test]
async fn values_stay_readable_across_algorithm_changes_but_not_under_another_key() {
    let dir = tempfile::tempdir().unwrap();
    let mut index = 1;
    for (algorithm, id) in [(Algorithm::Aes256Gcm, "a"), (Algorithm::None, "b"), (Algorithm::ChaCha20Poly1305, "c")] {
        let (store, mut sm, _) = open_shard_with(dir.path(), algorithm);
        sm.apply(vec![entry(index, Command::publish(vec![message(id, 0, id)]))]).await.expect("apply");
        store.sync().await.expect("sync");
        index += 1;
    }
    let (_store, mut sm, view) = open_shard_with(dir.path(), Algorithm::Aes256Gcm);
    assert_eq!(ids(&fetch(&mut sm, &view, 1, &[0], 10).await), ["a", "b", "c"]);
    drop((sm, view, _store));
    let wrong = open_store_with(dir.path(), Algorithm::Aes256Gcm, [1; 32]);
    let e = StateMachine::open_shard(wrong, 1).err().expect("another key cannot read the store").to_string();
    assert!(e.contains("data key"), "{e}");
}

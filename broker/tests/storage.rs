//! Storage tests: openraft's own compliance suite against the RocksDB log store and state
//! machine, and the shard state machine's message semantics (publish, fetch, ack, snapshot).

use std::sync::Arc;
use std::time::Duration;

use kerwen_broker::model::{Command, CommandResult, NewMessage, Position, ShardLimits, StoredMessage, TypeConfig};
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
            headers: vec![("traceparent".into(), "00-abc".into())],
            payload: payload.as_bytes().to_vec().into(),
            ordering_key: None,
            accepted_unix_ms: 1,
        },
    }
}

fn open_shard(dir: &std::path::Path) -> (Arc<Store>, StateMachine, Arc<ShardView>) {
    let store = Store::open(dir).expect("open store");
    let (sm, view) = StateMachine::open_shard(store.clone(), 1).expect("open shard");
    (store, sm, view)
}

const LEASE: Duration = Duration::from_secs(60);

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

    let leased = view.fetch(1, 42, 1, &[0, 1], 10, LEASE).unwrap();
    let ids: Vec<&str> = leased.iter().map(|l| l.message.id.as_str()).collect();
    assert_eq!(ids, ["a", "c", "b"], "partition order, partition by partition");
    assert!(view.fetch(1, 43, 1, &[0, 1], 10, LEASE).unwrap().is_empty(), "all leased");

    let acked = sm
        .apply(vec![entry(2, Command::Ack { mailbox: 1, positions: vec![Position { partition: 0, sequence: 0 }] })])
        .await
        .unwrap();
    assert_eq!(acked, vec![CommandResult::Acked(1)]);
    // Acking twice removes nothing more.
    let again = sm
        .apply(vec![entry(3, Command::Ack { mailbox: 1, positions: vec![Position { partition: 0, sequence: 0 }] })])
        .await
        .unwrap();
    assert_eq!(again, vec![CommandResult::Acked(0)]);
    let stats = view.stats(1, &[0, 1]).unwrap();
    assert_eq!((stats.messages, stats.bytes), (2, 8));

    // A released consumer's leases are redelivered, with the attempt counted.
    view.release(42, 1, None);
    let redelivered = view.fetch(1, 43, 1, &[0, 1], 10, LEASE).unwrap();
    assert_eq!(redelivered.len(), 2);
    assert!(redelivered.iter().all(|l| l.attempt == 2));
}

#[tokio::test]
async fn expired_leases_are_redelivered_and_a_new_term_starts_over() {
    let dir = tempfile::tempdir().unwrap();
    let (_store, mut sm, view) = open_shard(dir.path());
    sm.apply(vec![entry(1, Command::publish(vec![message("a", 0, "x")]))]).await.unwrap();
    assert_eq!(view.fetch(1, 1, 1, &[0], 10, Duration::ZERO).unwrap().len(), 1);
    let again = view.fetch(1, 2, 1, &[0], 10, LEASE).unwrap();
    assert_eq!((again.len(), again[0].attempt), (1, 2), "expired lease is redelivered");
    assert!(view.fetch(1, 3, 1, &[0], 10, LEASE).unwrap().is_empty());
    // A new leader term forgets leases: everything stored is deliverable again.
    assert_eq!(view.fetch(2, 3, 1, &[0], 10, LEASE).unwrap().len(), 1);
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

    let other = tempfile::tempdir().unwrap();
    let (_s2, mut follower, follower_view) = open_shard(other.path());
    follower.install_snapshot(&snapshot.meta, snapshot.snapshot).await.unwrap();
    assert_eq!(follower.applied_state().await.unwrap().0, Some(log_id(2)));
    let leased = follower_view.fetch(1, 1, 1, &[0], 10, LEASE).unwrap();
    let ids: Vec<&str> = leased.iter().map(|l| l.message.id.as_str()).collect();
    assert_eq!(ids, ["a", "b", "c"]);
    assert_eq!(&leased[0].message.payload[..], b"x");
}

#[tokio::test]
async fn log_survives_reopen_and_truncate_purge_leave_no_holes() {
    let dir = tempfile::tempdir().unwrap();
    let blank = |i| Entry::<TypeConfig> { log_id: log_id(i), payload: EntryPayload::Blank };
    {
        let store = Store::open(dir.path()).unwrap();
        let mut log = store.log_store(3);
        // Another group's entries share the column family and must not leak into group 3.
        let mut other = store.log_store(4);
        for i in 1..=5 {
            append_blank(&mut log, blank(i)).await;
            append_blank(&mut other, blank(i)).await;
        }
        store.sync().await.unwrap();
    }
    let store = Store::open(dir.path()).unwrap();
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
            entry(2, Command::Ack { mailbox: 1, positions: vec![Position { partition: 0, sequence: 0 }] }),
        ])
        .await
        .unwrap();
    assert_eq!(results[1], CommandResult::Acked(1));
    let stats = view.stats(1, &[0]).unwrap();
    assert_eq!((stats.messages, stats.bytes), (1, 1));
    let left = view.fetch(1, 1, 1, &[0], 10, LEASE).unwrap();
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
    };
    let r = sm
        .apply(vec![entry(1, create("TM/GOV/A/s/one")), entry(2, create("TM/GOV/A/s/two")), entry(3, create("TM/GOV/A/s/one"))])
        .await
        .unwrap();
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

/// A coalesced entry applies its commands in order, each with its own result: a later
/// command sees an earlier one's effects, and a refused command does not spoil the others.
#[tokio::test]
async fn a_batch_entry_applies_each_command_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let (_store, mut sm, view) = open_shard(dir.path());
    let results = sm
        .apply(vec![entry(1, Command::Batch(vec![
            Command::publish(vec![message("a", 0, "x"), message("b", 0, "y")]),
            Command::CreateMailbox { service: "TM/GOV/A/s/one".into(), partitions: 1, shard_count: 1, created_unix_ms: 1, limits: Default::default() },
            Command::Ack { mailbox: 1, positions: vec![Position { partition: 0, sequence: 0 }] },
            Command::publish(vec![message("c", 0, "z")]),
        ]))])
        .await
        .unwrap();
    let CommandResult::Batch(results) = &results[0] else { panic!("unexpected {results:?}") };
    assert_eq!(results[0], CommandResult::Published(vec![Position { partition: 0, sequence: 0 }, Position { partition: 0, sequence: 1 }]));
    assert!(matches!(results[1], CommandResult::Rejected(kerwen_broker::BrokerError::Internal(_))), "{:?}", results[1]);
    assert_eq!(results[2], CommandResult::Acked(1));
    assert_eq!(results[3], CommandResult::Published(vec![Position { partition: 0, sequence: 2 }]));
    let left = view.fetch(1, 1, 1, &[0], 10, LEASE).unwrap();
    assert_eq!(left.iter().map(|l| l.message.id.as_str()).collect::<Vec<_>>(), ["b", "c"]);
}

fn at(mut m: NewMessage, accepted_unix_ms: i64) -> NewMessage {
    m.message.accepted_unix_ms = accepted_unix_ms;
    m
}

fn limits(window_ms: u64, max_messages: u64, max_bytes: u64) -> Vec<ShardLimits> {
    vec![ShardLimits {
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

    sm.apply(vec![entry(3, Command::Ack { mailbox: 1, positions: vec![first] })]).await.unwrap();
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

    sm.apply(vec![entry(4, Command::Ack { mailbox: 1, positions: vec![Position { partition: 0, sequence: 0 }] })]).await.unwrap();
    let r = sm.apply(vec![entry(5, publish_with(vec![message("c", 0, "z")], quota()))]).await.unwrap();
    assert_eq!(r, vec![CommandResult::Published(vec![Position { partition: 0, sequence: 1 }])]);
    let big = sm.apply(vec![entry(6, publish_with(vec![message("d", 1, &"x".repeat(999))], limits(60_000, 100, 1_000)))]).await.unwrap();
    assert!(matches!(&big[0], CommandResult::Rejected(kerwen_broker::BrokerError::ResourceExhausted(_))), "byte quota: {big:?}");
}

//! openraft log storage of one Raft group, in the shared `raft_log` column family.
//!
//! Durability: `append` writes the entries unsynced (so they are readable when it returns)
//! and hands openraft's flush callback to the group-commit thread, which calls it only after
//! the WAL is fsynced. Votes are acknowledged only after a sync as well.

use std::fmt::Debug;
use std::ops::{Bound, RangeBounds};
use std::sync::Arc;

use openraft::storage::{LogFlushed, LogState, RaftLogReader, RaftLogStorage};
use openraft::{Entry, LogId, OptionalSend, StorageError, StorageIOError, Vote};
use rocksdb::{Direction, IteratorMode, WriteBatch};

use super::keys::{self, TAG_PURGED, TAG_VOTE};
use super::syncer::SyncWaiter;
use super::{Store, CF_RAFT_LOG, CF_RAFT_META};
use crate::model::{GroupId, NodeId, TypeConfig};

type StorageResult<T> = Result<T, StorageError<NodeId>>;

/// Most bytes of entries read for one replication round (at least one entry is always read).
/// openraft asks for up to `max_payload_entries` entries at a time; with chunk-sized entries
/// (large payloads) reading them all would hold hundreds of MiB per follower.
pub const REPLICATION_READ_BUDGET_BYTES: usize = 4 * 1024 * 1024;

#[derive(Clone)]
pub struct LogStore {
    group: GroupId,
    store: Arc<Store>,
}

impl LogStore {
    pub fn new(group: GroupId, store: Arc<Store>) -> Self {
        Self { group, store }
    }

    fn last_entry_log_id(&self) -> StorageResult<Option<LogId<NodeId>>> {
        let cf = self.store.cf(CF_RAFT_LOG).map_err(|e| StorageIOError::read_logs(&e))?;
        let start = keys::log_key(self.group, u64::MAX);
        let mut iter = self.store.db().iterator_cf(&cf, IteratorMode::From(&start, Direction::Reverse));
        match iter.next() {
            Some(Ok((key, value))) => match keys::parse_log_key(&key) {
                Some((group, _)) if group == self.group => {
                    let entry: Entry<TypeConfig> = self.store.decode(&value).map_err(|e| StorageIOError::read_logs(&e))?;
                    Ok(Some(entry.log_id))
                }
                _ => Ok(None),
            },
            Some(Err(e)) => Err(StorageIOError::read_logs(&e).into()),
            None => Ok(None),
        }
    }
}

impl LogStore {
    /// Entries in `range`, stopping once `max_bytes` of encoded entries have been read.
    fn read_entries<RB: RangeBounds<u64>>(&self, range: RB, max_bytes: usize) -> StorageResult<Vec<Entry<TypeConfig>>> {
        let start = match range.start_bound() {
            Bound::Included(i) => *i,
            Bound::Excluded(i) => i.saturating_add(1),
            Bound::Unbounded => 0,
        };
        let cf = self.store.cf(CF_RAFT_LOG).map_err(|e| StorageIOError::read_logs(&e))?;
        let from = keys::log_key(self.group, start);
        let mut entries = Vec::new();
        let mut bytes = 0usize;
        for item in self.store.db().iterator_cf(&cf, IteratorMode::From(&from, Direction::Forward)) {
            let (key, value) = item.map_err(|e| StorageIOError::read_logs(&e))?;
            let Some((group, index)) = keys::parse_log_key(&key) else { break };
            if group != self.group || !range.contains(&index) || (!entries.is_empty() && bytes >= max_bytes) {
                break;
            }
            bytes += value.len();
            entries.push(self.store.decode(&value).map_err(|e| StorageIOError::read_logs(&e))?);
        }
        Ok(entries)
    }
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> StorageResult<Vec<Entry<TypeConfig>>> {
        self.read_entries(range, usize::MAX)
    }

    async fn limited_get_log_entries(&mut self, start: u64, end: u64) -> StorageResult<Vec<Entry<TypeConfig>>> {
        self.read_entries(start..end, REPLICATION_READ_BUDGET_BYTES)
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = Self;

    async fn get_log_state(&mut self) -> StorageResult<LogState<TypeConfig>> {
        let last_purged_log_id: Option<LogId<NodeId>> = self
            .store
            .get(CF_RAFT_META, &keys::meta_key(self.group, TAG_PURGED))
            .map_err(|e| StorageIOError::read_logs(&e))?;
        let last_log_id = self.last_entry_log_id()?.or(last_purged_log_id);
        Ok(LogState { last_purged_log_id, last_log_id })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<NodeId>) -> StorageResult<()> {
        let cf = self.store.cf(CF_RAFT_META).map_err(|e| StorageIOError::write_vote(&e))?;
        let mut batch = WriteBatch::default();
        batch.put_cf(&cf, keys::meta_key(self.group, TAG_VOTE), self.store.encode(vote).map_err(|e| StorageIOError::write_vote(&e))?);
        self.store.write_unsynced(batch).map_err(|e| StorageIOError::write_vote(&e))?;
        self.store.sync().await.map_err(|e| StorageIOError::write_vote(&e))?;
        Ok(())
    }

    async fn read_vote(&mut self) -> StorageResult<Option<Vote<NodeId>>> {
        Ok(self
            .store
            .get(CF_RAFT_META, &keys::meta_key(self.group, TAG_VOTE))
            .map_err(|e| StorageIOError::read_vote(&e))?)
    }

    async fn append<I>(&mut self, entries: I, callback: LogFlushed<TypeConfig>) -> StorageResult<()>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let cf = self.store.cf(CF_RAFT_LOG).map_err(|e| StorageIOError::write_logs(&e))?;
        let mut batch = WriteBatch::default();
        for entry in entries {
            let value = self.store.encode(&entry).map_err(|e| StorageIOError::write_logs(&e))?;
            batch.put_cf(&cf, keys::log_key(self.group, entry.log_id.index), value);
        }
        self.store.write_unsynced(batch).map_err(|e| StorageIOError::write_logs(&e))?;
        // Readable now; durable when the group-commit thread calls back.
        self.store.submit_sync(SyncWaiter::LogFlushed(callback));
        Ok(())
    }

    async fn truncate(&mut self, log_id: LogId<NodeId>) -> StorageResult<()> {
        let cf = self.store.cf(CF_RAFT_LOG).map_err(|e| StorageIOError::write_logs(&e))?;
        let mut batch = WriteBatch::default();
        batch.delete_range_cf(&cf, keys::log_key(self.group, log_id.index), keys::log_key(self.group, u64::MAX));
        // Durable with the next synced append, which always follows a truncation.
        self.store.write_unsynced(batch).map_err(|e| StorageIOError::write_logs(&e))?;
        Ok(())
    }

    async fn purge(&mut self, log_id: LogId<NodeId>) -> StorageResult<()> {
        let log_cf = self.store.cf(CF_RAFT_LOG).map_err(|e| StorageIOError::write_logs(&e))?;
        let meta_cf = self.store.cf(CF_RAFT_META).map_err(|e| StorageIOError::write_logs(&e))?;
        let mut batch = WriteBatch::default();
        batch.put_cf(
            &meta_cf,
            keys::meta_key(self.group, TAG_PURGED),
            self.store.encode(&log_id).map_err(|e| StorageIOError::write_logs(&e))?,
        );
        batch.delete_range_cf(&log_cf, keys::log_key(self.group, 0), keys::log_key(self.group, log_id.index + 1));
        self.store.write_unsynced(batch).map_err(|e| StorageIOError::write_logs(&e))?;
        Ok(())
    }
}

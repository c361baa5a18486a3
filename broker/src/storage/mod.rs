//! The node's one RocksDB and everything stored in it.
//!
//! - [`Store`]: opens the database (column families `raft_log`, `raft_meta`, `state`) and owns
//!   the group-commit [`syncer`].
//! - [`log_store`]: openraft log storage for one group, fsynced through group commit.
//! - [`state_machine`]: openraft state machine for one group (metadata or data shard),
//!   snapshots included.
//! - [`keys`]: the key layout.
//! - [`cipher`]: encryption at rest; every value goes through `Store::encode` / `seal_bytes`
//!   on the way in and `Store::decode` / `open_bytes` on the way out.

pub mod cipher;
pub mod keys;
pub mod log_store;
pub mod state_machine;
pub mod syncer;

use std::borrow::Cow;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use rocksdb::{BoundColumnFamily, ColumnFamilyDescriptor, Options, WriteBatch, WriteOptions, DB};
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::error::{BrokerError, Result};
use crate::model::GroupId;
use cipher::{Algorithm, AtRestCipher};
pub use log_store::LogStore;
pub use state_machine::{MetaView, ShardView, StateMachine};
use syncer::{SyncStats, SyncWaiter, Syncer};

pub const CF_RAFT_LOG: &str = "raft_log";
pub const CF_RAFT_META: &str = "raft_meta";
pub const CF_STATE: &str = "state";

/// WAL bytes kept before the column families holding the oldest ones are flushed.
const MAX_TOTAL_WAL_BYTES: u64 = 256 * 1024 * 1024;
/// Memtable bytes of all column families together before RocksDB flushes: without a cap,
/// a 1 GiB upload passing through both the log and the state column families filled two
/// 64 MiB memtables each (plus the immutable ones being flushed).
const MAX_MEMTABLE_BYTES: usize = 64 * 1024 * 1024;

/// The node's storage: one RocksDB shared by every Raft group on the node.
pub struct Store {
    // Field order matters: `db` is released first, then dropping `syncer` joins the sync
    // thread, which holds the last reference, so the database is closed when `Store` is gone.
    db: Arc<DB>,
    syncer: Syncer,
    cipher: AtRestCipher,
}

impl Store {
    /// Opens (or creates) the database under `dir` with a fresh random data key (AES-256-GCM):
    /// for tests and benchmarks whose store is never reopened, since nothing it wrote can be
    /// read under another key. A node uses [`Store::open_with`] and its data key file.
    pub fn open(dir: &Path) -> Result<Arc<Self>> {
        Self::open_with(dir, AtRestCipher::ephemeral(Algorithm::Aes256Gcm)?)
    }

    /// Opens (or creates) the database under `dir`; every value is sealed with `cipher`.
    pub fn open_with(dir: &Path, cipher: AtRestCipher) -> Result<Arc<Self>> {
        // Sealed values are random bytes to a compressor: LZ4 would spend CPU on every flush
        // and compaction to save nothing but some key bytes. Blocks written earlier under
        // another setting stay readable.
        let compression = match cipher.algorithm() {
            Algorithm::None => rocksdb::DBCompressionType::Lz4,
            _ => rocksdb::DBCompressionType::None,
        };
        let mut opts = Options::default();
        opts.create_if_missing(true);
        opts.create_missing_column_families(true);
        opts.set_compression_type(compression);
        opts.increase_parallelism(2);
        opts.set_max_background_jobs(2);
        // The raft_meta column family is written rarely, so its memtable would pin old WAL
        // files until the default limit (4x all memtables, ~1.5 GB); a 10-minute soak had
        // 735 MB of WAL per node. Past this total, RocksDB flushes the stale family instead.
        opts.set_max_total_wal_size(MAX_TOTAL_WAL_BYTES);
        opts.set_db_write_buffer_size(MAX_MEMTABLE_BYTES);
        // Syncs are issued explicitly by the group-commit thread.
        opts.set_manual_wal_flush(false);
        let cfs = [CF_RAFT_LOG, CF_RAFT_META, CF_STATE].map(|name| {
            let mut cf_opts = Options::default();
            cf_opts.set_compression_type(compression);
            // Every publish looks up each message id (dedup), nearly always a miss: a bloom
            // filter answers those without reading SST blocks.
            let mut table = rocksdb::BlockBasedOptions::default();
            table.set_bloom_filter(10.0, false);
            cf_opts.set_block_based_table_factory(&table);
            ColumnFamilyDescriptor::new(name, cf_opts)
        });
        let db = DB::open_cf_descriptors(&opts, dir, cfs)
            .map_err(|e| BrokerError::Storage(format!("opening RocksDB at {}: {e}", dir.display())))?;
        let db = Arc::new(db);
        let syncer = Syncer::start(db.clone()).map_err(BrokerError::storage)?;
        Ok(Arc::new(Self { db, syncer, cipher }))
    }

    /// The database itself. Its values are sealed: read them through the store, not raw.
    pub fn db(&self) -> &DB {
        &self.db
    }

    pub(crate) fn cf(&self, name: &str) -> Result<Arc<BoundColumnFamily<'_>>> {
        self.db
            .cf_handle(name)
            .ok_or_else(|| BrokerError::Storage(format!("column family {name} missing")))
    }

    /// Log storage of one Raft group.
    pub fn log_store(self: &Arc<Self>, group: GroupId) -> LogStore {
        LogStore::new(group, self.clone())
    }

    /// Writes a batch without waiting for durability (readable at once; durable at the next
    /// sync).
    pub(crate) fn write_unsynced(&self, batch: WriteBatch) -> Result<()> {
        let mut wo = WriteOptions::default();
        wo.set_sync(false);
        self.db.write_opt(batch, &wo).map_err(BrokerError::storage)
    }

    /// Waits until everything written so far is durable (shares the fsync with everyone
    /// else waiting).
    pub async fn sync(&self) -> Result<()> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.syncer.submit(SyncWaiter::Notify(tx));
        match rx.await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(BrokerError::Storage(format!("WAL sync: {e}"))),
            Err(_) => Err(BrokerError::Storage("WAL sync thread stopped".into())),
        }
    }

    pub(crate) fn submit_sync(&self, waiter: SyncWaiter) {
        self.syncer.submit(waiter);
    }

    /// Group-commit counters (syncs issued, waiters covered).
    pub fn sync_stats(&self) -> &SyncStats {
        &self.syncer.stats
    }

    /// Tells the group commit how late the node's tasks run, so it gathers each round's
    /// appends accordingly ([`syncer::GatherWindow`]).
    pub fn set_scheduling_delay(&self, delay: Duration) {
        self.syncer.set_scheduling_delay(delay);
    }

    /// The scheduling delay last reported with [`Self::set_scheduling_delay`].
    pub fn scheduling_delay(&self) -> Duration {
        self.syncer.scheduling_delay()
    }

    /// How the group commit's next round gathers.
    pub fn gather_window(&self) -> syncer::GatherWindow {
        self.syncer.gather_window()
    }

    pub(crate) fn get<T: DeserializeOwned>(&self, cf: &str, key: &[u8]) -> Result<Option<T>> {
        let cf = self.cf(cf)?;
        match self.db.get_pinned_cf(&cf, key).map_err(BrokerError::storage)? {
            Some(bytes) => self.decode(&bytes).map(Some),
            None => Ok(None),
        }
    }

    /// How this store seals new values.
    pub fn cipher(&self) -> &AtRestCipher {
        &self.cipher
    }

    /// A value as it is written to RocksDB: serialized straight into the sealing buffer.
    pub(crate) fn encode<T: Serialize>(&self, value: &T) -> Result<Vec<u8>> {
        let len = bincode::serialized_size(value).map_err(encoding_error)?;
        let len = usize::try_from(len).map_err(encoding_error)?;
        self.cipher.seal_with(len, |out| bincode::serialize_into(out, value).map_err(encoding_error))
    }

    /// A value read from RocksDB, opened and deserialized.
    pub(crate) fn decode<T: DeserializeOwned>(&self, sealed: &[u8]) -> Result<T> {
        decode_plain(&self.cipher.open(sealed)?)
    }

    /// Raw bytes (an upload chunk, a snapshot record) as they are written to RocksDB.
    pub(crate) fn seal_bytes(&self, plaintext: &[u8]) -> Result<Vec<u8>> {
        self.cipher.seal(plaintext)
    }

    /// Raw bytes read from RocksDB, opened.
    pub(crate) fn open_bytes<'a>(&self, sealed: &'a [u8]) -> Result<Cow<'a, [u8]>> {
        self.cipher.open(sealed)
    }
}

fn encoding_error(e: impl std::fmt::Display) -> BrokerError {
    BrokerError::Internal(format!("encoding: {e}"))
}

/// Serializes without sealing: only for what never lands in RocksDB as such (the snapshot
/// payload sent to other nodes, which re-seal each record with their own key).
pub(crate) fn encode_plain<T: Serialize>(value: &T) -> Result<Vec<u8>> {
    bincode::serialize(value).map_err(encoding_error)
}

/// The counterpart of [`encode_plain`], also used on opened values.
pub(crate) fn decode_plain<T: DeserializeOwned>(bytes: &[u8]) -> Result<T> {
    bincode::deserialize(bytes).map_err(|e| BrokerError::Storage(format!("corrupt record: {e}")))
}

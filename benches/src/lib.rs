//! Fixtures shared by Kerwen's criterion benchmarks (`benches/benches/*.rs`):
//!
//! - `codec`: a publish batch through the wire (prost) and through the Raft log (bincode).
//! - `storage_append`: Raft log appends on real RocksDB with fsync, one group and many
//!   groups sharing the group-commit thread.
//!
//! Run them with `cargo bench -p kerwen-benches` (release profile, real disk).

use bytes::Bytes;
use kerwen_broker::model::{Command, NewMessage, StoredMessage, TypeConfig};
use kerwen_proto::v1 as pb;
use openraft::{CommittedLeaderId, Entry, EntryPayload, LogId};

pub const RECIPIENT: &str = "TM/GOV/MINFIN/tax-registry/declarations";

/// A publish request of `count` messages of `size` payload bytes, as a client sends it.
pub fn publish_request(count: usize, size: usize) -> pb::PublishRequest {
    let payload = Bytes::from(vec![0x5au8; size]);
    pb::PublishRequest {
        messages: (0..count)
            .map(|i| pb::Message {
                id: format!("msg-{i:08}"),
                recipient: RECIPIENT.into(),
                headers: [("traceparent".to_owned(), "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".to_owned())]
                    .into_iter()
                    .collect(),
                payload: payload.clone(),
                ordering_key: Some(format!("key-{}", i % 16)),
                ttl_ms: None,
                sender: String::new(),
            })
            .collect(),
    }
}

/// The Raft entry a shard leader appends for such a batch.
pub fn publish_entry(index: u64, count: usize, size: usize) -> Entry<TypeConfig> {
    let payload = Bytes::from(vec![0x5au8; size]);
    let messages = (0..count)
        .map(|i| NewMessage {
            mailbox: 1,
            partition: (i % 4) as u32,
            message: StoredMessage {
                id: format!("msg-{i:08}"),
                recipient: RECIPIENT.into(),
                sender: String::new(),
                headers: vec![("traceparent".into(), "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01".into())],
                payload: payload.clone(),
                payload_sha256: [0; 32],
                ordering_key: Some(format!("key-{}", i % 16)),
                accepted_unix_ms: 1_700_000_000_000,
                ttl_ms: None,
                expires_unix_ms: None,
                dead_letter: None,
                large: None,
                signed_as: None,
                trace_context: None,
            },
        })
        .collect();
    Entry { log_id: LogId::new(CommittedLeaderId::new(1, 1), index), payload: EntryPayload::Normal(Command::publish(messages)) }
}

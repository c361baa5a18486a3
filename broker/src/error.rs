//! The broker's error type. It crosses node boundaries (forwarded requests) so it is
//! serialisable; the node maps each variant to one precise gRPC status at the edge.

use serde::{Deserialize, Serialize};

use crate::model::{GroupId, NodeId};

/// Everything that can go wrong in the broker, by what the caller should do about it.
/// `Display` describes this error only, never its cause chain.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
pub enum BrokerError {
    /// The request itself is wrong (malformed id, empty batch, ...). Retrying will not help.
    #[error("{0}")]
    InvalidArgument(String),
    /// A named thing (mailbox, ...) does not exist.
    #[error("{0}")]
    NotFound(String),
    /// Creating something that already exists.
    #[error("{0}")]
    AlreadyExists(String),
    /// A size or quota limit was hit.
    #[error("{0}")]
    ResourceExhausted(String),
    /// A rate limit was hit: the same request may succeed after `retry_after_ms`.
    #[error("{message}")]
    RateLimited { message: String, retry_after_ms: u64 },
    /// The caller is authenticated but not allowed to do this.
    #[error("{0}")]
    PermissionDenied(String),
    /// The cluster cannot serve this now (no leader, no quorum, shutting down). Retry later.
    #[error("{0}")]
    Unavailable(String),
    /// This node is not the leader of the group; `leader` is the best known one.
    #[error("node is not the leader of group {group}")]
    NotLeader { group: GroupId, leader: Option<NodeId> },
    /// The local store failed: the node is unhealthy.
    #[error("storage failure: {0}")]
    Storage(String),
    /// A bug or an impossible state.
    #[error("internal error: {0}")]
    Internal(String),
    /// The cluster is not in a state that allows this (a node still holding replicas cannot
    /// be removed). Retrying as is will not help; changing the state first will.
    #[error("{0}")]
    FailedPrecondition(String),
}

impl BrokerError {
    pub fn storage(e: impl std::fmt::Display) -> Self {
        Self::Storage(e.to_string())
    }
    /// True when the same request may succeed if retried (possibly elsewhere).
    pub fn is_retryable(&self) -> bool {
        matches!(self, Self::Unavailable(_) | Self::NotLeader { .. })
    }
}

pub type Result<T, E = BrokerError> = std::result::Result<T, E>;

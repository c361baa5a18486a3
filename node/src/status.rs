//! The edge of the broker's errors: each [`BrokerError`] becomes one precise gRPC status.

use kerwen_broker::BrokerError;
use tonic::Status;

pub fn to_status(e: BrokerError) -> Status {
    match e {
        BrokerError::InvalidArgument(m) => Status::invalid_argument(m),
        BrokerError::NotFound(m) => Status::not_found(m),
        BrokerError::AlreadyExists(m) => Status::already_exists(m),
        BrokerError::ResourceExhausted(m) => Status::resource_exhausted(m),
        BrokerError::RateLimited { message, retry_after_ms } => rate_limited(message, retry_after_ms),
        BrokerError::PermissionDenied(m) => Status::permission_denied(m),
        BrokerError::Unavailable(m) => Status::unavailable(m),
        e @ BrokerError::NotLeader { .. } => Status::unavailable(e.to_string()),
        e @ BrokerError::Storage(_) => Status::internal(e.to_string()),
        e @ BrokerError::Internal(_) => Status::internal(e.to_string()),
        BrokerError::FailedPrecondition(m) => Status::failed_precondition(m),
    }
}

/// Metadata key of the retry hint on a throttled request (milliseconds).
pub const RETRY_AFTER_MS: &str = "retry-after-ms";

/// `RESOURCE_EXHAUSTED` with the retry hint in the message and in `retry-after-ms`.
pub fn rate_limited(message: String, retry_after_ms: u64) -> Status {
    let mut status = Status::resource_exhausted(format!("{message}; retry after {retry_after_ms} ms"));
    if let Ok(v) = retry_after_ms.to_string().parse() {
        status.metadata_mut().insert(RETRY_AFTER_MS, v);
    }
    status
}

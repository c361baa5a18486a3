//! The edge of the broker's errors: each [`BrokerError`] becomes one precise gRPC status.

use kerwen_broker::BrokerError;
use tonic::Status;

pub fn to_status(e: BrokerError) -> Status {
    match e {
        BrokerError::InvalidArgument(m) => Status::invalid_argument(m),
        BrokerError::NotFound(m) => Status::not_found(m),
        BrokerError::AlreadyExists(m) => Status::already_exists(m),
        BrokerError::ResourceExhausted(m) => Status::resource_exhausted(m),
        BrokerError::Unavailable(m) => Status::unavailable(m),
        e @ BrokerError::NotLeader { .. } => Status::unavailable(e.to_string()),
        e @ BrokerError::Storage(_) => Status::internal(e.to_string()),
        e @ BrokerError::Internal(_) => Status::internal(e.to_string()),
    }
}

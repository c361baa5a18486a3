//! Asynchronous request/reply, X-Road's request and response made durable: a request names
//! the requester's reply service in a reserved header; the provider's reply names the request
//! (service, partition, id) and its hash (X-Road's `requestHash`) in reserved headers and goes
//! to that reply service. Headers are part of a message's evidence leaf, so a reply's
//! evidence binds it to its request.
//!
//! The shard that stores a request keeps a [`RequestRecord`] with the request's dedup record
//! (for the request mailbox's dedup window, 24 h by default), whether or not the request was
//! acked since. A reply is accepted only if that record exists, the replier owns the request's
//! service, the reply goes to the request's reply service and carries the request's hash:
//! replies to unknown or foreign requests are refused. The check is [`check_reply`]; the node
//! reads the record from the request's shard before it proposes the reply.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

use crate::error::BrokerError;
use crate::evidence::Hash;
use crate::ids::{ServiceId, SubsystemId};

/// Request header: the requester's service that receives the reply.
pub const HEADER_REPLY_TO: &str = "kerwen-reply-to";
/// Reply header: the service the request was sent to.
pub const HEADER_REQUEST_SERVICE: &str = "kerwen-request-service";
/// Reply header: the partition the request was stored in (decimal).
pub const HEADER_REQUEST_PARTITION: &str = "kerwen-request-partition";
/// Reply header: the request's message id.
pub const HEADER_REQUEST_ID: &str = "kerwen-request-id";
/// Reply header: the request's evidence leaf, lowercase hex (X-Road's `requestHash`).
pub const HEADER_REQUEST_HASH: &str = "kerwen-request-hash";

/// What the request's shard remembers of a request, for checking its reply.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RequestRecord {
    /// The subsystem that sent the request.
    pub requester: String,
    /// Where the reply must go (a service of the requester).
    pub reply_to: String,
    /// The request's evidence leaf.
    #[serde(with = "crate::evidence::hex_bytes")]
    pub hash: Hash,
}

/// The request a reply names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplyRef {
    pub service: ServiceId,
    pub partition: u32,
    pub id: String,
    pub hash: Hash,
}

fn header<'a>(headers: &'a HashMap<String, String>, name: &str) -> Option<&'a str> {
    headers.get(name).map(String::as_str)
}

fn bad(what: String) -> BrokerError {
    BrokerError::InvalidArgument(what)
}

/// The reply service a request names, checked: a service of the sender itself.
pub fn reply_to_of(headers: &HashMap<String, String>, sender: Option<&SubsystemId>) -> Result<Option<ServiceId>, BrokerError> {
    let Some(text) = header(headers, HEADER_REPLY_TO) else { return Ok(None) };
    let service: ServiceId = text.parse().map_err(|e| bad(format!("header {HEADER_REPLY_TO}: {e}")))?;
    if sender.is_some_and(|s| *s != service.subsystem) {
        return Err(BrokerError::PermissionDenied(format!(
            "header {HEADER_REPLY_TO}: replies can only be asked for to one of the sender's own services, not {service}"
        )));
    }
    Ok(Some(service))
}

/// The request a message replies to, if it is a reply (any of the reply headers makes it
/// one, and then all of them must be present and well formed).
pub fn reply_ref(headers: &HashMap<String, String>) -> Result<Option<ReplyRef>, BrokerError> {
    let names = [HEADER_REQUEST_SERVICE, HEADER_REQUEST_PARTITION, HEADER_REQUEST_ID, HEADER_REQUEST_HASH];
    if names.iter().all(|n| !headers.contains_key(*n)) {
        return Ok(None);
    }
    let get = |name: &str| header(headers, name).ok_or_else(|| bad(format!("a reply needs every one of the headers {names:?}; {name} is missing")));
    let service = get(HEADER_REQUEST_SERVICE)?.parse::<ServiceId>().map_err(|e| bad(format!("header {HEADER_REQUEST_SERVICE}: {e}")))?;
    let partition = get(HEADER_REQUEST_PARTITION)?
        .parse::<u32>()
        .map_err(|_| bad(format!("header {HEADER_REQUEST_PARTITION}: not a partition number")))?;
    let id = get(HEADER_REQUEST_ID)?.to_owned();
    let hash = crate::evidence::parse_hex(get(HEADER_REQUEST_HASH)?)
        .ok_or_else(|| bad(format!("header {HEADER_REQUEST_HASH}: expected 32 bytes of lowercase hex")))?;
    Ok(Some(ReplyRef { service, partition, id, hash }))
}

/// Whether a reply from `replier` to `recipient` may answer `request` (the record found for
/// `reply.id` in `reply.service`, if any).
pub fn check_reply(request: Option<&RequestRecord>, reply: &ReplyRef, replier: Option<&SubsystemId>, recipient: &str) -> Result<(), BrokerError> {
    if replier.is_some_and(|r| *r != reply.service.subsystem) {
        return Err(BrokerError::PermissionDenied(format!(
            "only {} answers requests sent to {}",
            reply.service.subsystem, reply.service
        )));
    }
    let Some(request) = request else {
        return Err(BrokerError::NotFound(format!(
            "no request {} in partition {} of {} (unknown, or older than the mailbox's dedup window)",
            reply.id, reply.partition, reply.service
        )));
    };
    if request.hash != reply.hash {
        return Err(BrokerError::InvalidArgument(format!("header {HEADER_REQUEST_HASH} is not the hash of request {}", reply.id)));
    }
    if request.reply_to != recipient {
        return Err(BrokerError::InvalidArgument(format!(
            "request {} asked for its reply at {}, not {recipient}",
            reply.id, request.reply_to
        )));
    }
    Ok(())
}

/// The headers a reply to a request carries (the caller adds its own).
pub fn reply_headers(service: &str, partition: u32, id: &str, hash: &Hash) -> [(String, String); 4] {
    [
        (HEADER_REQUEST_SERVICE.to_owned(), service.to_owned()),
        (HEADER_REQUEST_PARTITION.to_owned(), partition.to_string()),
        (HEADER_REQUEST_ID.to_owned(), id.to_owned()),
        (HEADER_REQUEST_HASH.to_owned(), hex::encode(hash)),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    const REQUESTER: &str = "TM/GOV/MINCOM/registry";
    const PROVIDER: &str = "TM/GOV/MINFIN/tax";

    fn record() -> RequestRecord {
        RequestRecord { requester: REQUESTER.into(), reply_to: format!("{REQUESTER}/replies"), hash: [7; 32] }
    }

    fn reply() -> ReplyRef {
        ReplyRef { service: format!("{PROVIDER}/declarations").parse().unwrap(), partition: 0, id: "r1".into(), hash: [7; 32] }
    }

    #[test]
    fn a_reply_must_answer_a_known_request_of_the_replier_to_its_reply_service() {
        let provider: SubsystemId = PROVIDER.parse().unwrap();
        let requester: SubsystemId = REQUESTER.parse().unwrap();
        let to = format!("{REQUESTER}/replies");
        assert!(check_reply(Some(&record()), &reply(), Some(&provider), &to).is_ok());
        assert!(matches!(check_reply(None, &reply(), Some(&provider), &to), Err(BrokerError::NotFound(_))));
        assert!(matches!(check_reply(Some(&record()), &reply(), Some(&requester), &to), Err(BrokerError::PermissionDenied(_))));
        let other_hash = ReplyRef { hash: [8; 32], ..reply() };
        assert!(matches!(check_reply(Some(&record()), &other_hash, Some(&provider), &to), Err(BrokerError::InvalidArgument(_))));
        assert!(check_reply(Some(&record()), &reply(), Some(&provider), &format!("{REQUESTER}/other")).is_err());
    }

    #[test]
    fn reply_headers_round_trip_and_partial_ones_are_refused() {
        let r = reply();
        let headers: HashMap<String, String> = reply_headers(&r.service.to_string(), r.partition, &r.id, &r.hash).into_iter().collect();
        assert_eq!(reply_ref(&headers).unwrap(), Some(r));
        assert_eq!(reply_ref(&HashMap::new()).unwrap(), None);
        let mut partial = headers.clone();
        partial.remove(HEADER_REQUEST_HASH);
        assert!(reply_ref(&partial).is_err());
        let mut upper = headers;
        upper.insert(HEADER_REQUEST_HASH.into(), hex::encode([0xabu8; 32]).to_uppercase());
        assert!(reply_ref(&upper).is_err());
    }

    #[test]
    fn a_request_asks_for_replies_at_its_own_service_only() {
        let requester: SubsystemId = REQUESTER.parse().unwrap();
        let own: HashMap<String, String> = [(HEADER_REPLY_TO.to_owned(), format!("{REQUESTER}/replies"))].into();
        assert_eq!(reply_to_of(&own, Some(&requester)).unwrap().map(|s| s.to_string()), Some(format!("{REQUESTER}/replies")));
        let foreign: HashMap<String, String> = [(HEADER_REPLY_TO.to_owned(), format!("{PROVIDER}/x"))].into();
        assert!(matches!(reply_to_of(&foreign, Some(&requester)), Err(BrokerError::PermissionDenied(_))));
        assert_eq!(reply_to_of(&HashMap::new(), Some(&requester)).unwrap(), None);
    }
}

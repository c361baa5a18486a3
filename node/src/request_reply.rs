//! Asynchronous request/reply for the Rust client (see [`kerwen_broker::request`] for the
//! protocol): [`Client::request`] publishes a request naming a reply service and waits for
//! the correlated reply; [`Client::reply`] answers a delivered request.
//!
//! Both survive a node going away: the request is published idempotently (the same id on
//! every retry), the reply's id is derived from the request's (`<request id>.reply`), so a
//! provider that replies again after a redelivery stores no second reply, and the waiting
//! side resubscribes through another node when its stream breaks.

use std::collections::HashMap;
use std::time::Duration;

use kerwen_broker::evidence::message_leaf;
use kerwen_broker::request::{reply_headers, HEADER_REPLY_TO, HEADER_REQUEST_ID, HEADER_REQUEST_SERVICE};
use kerwen_proto::v1::{Delivery, Message, PublishResult};
use tokio::time::Instant;
use tonic::{Code, Status};

use crate::client::{Client, Event};
use crate::services::exchange::MAX_MESSAGE_ID_LEN;
use crate::receipts::delivery_facts;

/// Pause before another attempt after a transient failure.
const RETRY_PAUSE: Duration = Duration::from_millis(200);
/// Replies to other requests found in the reply mailbox go back for this long.
const OTHERS_REPLY_DELAY: Duration = Duration::from_secs(1);

/// A request and the reply that answered it.
#[derive(Debug, Clone)]
pub struct Exchanged {
    pub request: PublishResult,
    pub reply: Delivery,
}

/// The id of the reply to request `id`.
pub fn reply_id(request_id: &str) -> String {
    format!("{request_id}.reply")
}

/// Whether a transient failure: another attempt (maybe through another node) may succeed.
fn transient(s: &Status) -> bool {
    matches!(s.code(), Code::Unavailable | Code::DeadlineExceeded | Code::Aborted | Code::Cancelled | Code::Unknown)
}

/// The reply to the delivered request `request`, carrying `payload` (already sealed, if it
/// should be). `FAILED_PRECONDITION` when the request asked for no reply.
pub fn reply_message(request: &Delivery, payload: Vec<u8>) -> Result<Message, Status> {
    let m = request.message.as_ref().ok_or_else(|| Status::invalid_argument("the delivery has no message"))?;
    let to = m.headers.get(HEADER_REPLY_TO).ok_or_else(|| Status::failed_precondition(format!("request {} asks for no reply", m.id)))?;
    let position = request.position.ok_or_else(|| Status::invalid_argument("the delivery has no position"))?;
    let facts = delivery_facts(request).map_err(|e| Status::invalid_argument(e.to_string()))?;
    let id = reply_id(&m.id);
    if id.len() > MAX_MESSAGE_ID_LEN {
        return Err(Status::invalid_argument(format!("request id {} is too long to derive a reply id from", m.id)));
    }
    let headers: HashMap<String, String> = reply_headers(&m.recipient, position.partition, &m.id, &message_leaf(&facts)).into_iter().collect();
    Ok(Message { id, recipient: to.clone(), headers, payload: payload.into(), ordering_key: None, ttl_ms: None, sender: String::new() })
}

impl Client {
    /// Publishes `message` until it is stored or `deadline` passes, retrying transient
    /// failures (the same id each time, so a retry never stores a second copy).
    pub async fn publish_until(&mut self, message: &Message, deadline: Instant) -> Result<PublishResult, Status> {
        loop {
            match self.publish(vec![message.clone()]).await {
                Ok(mut response) if response.results.len() == 1 => return Ok(response.results.remove(0)),
                Ok(response) => return Err(Status::internal(format!("{} results for one message", response.results.len()))),
                Err(s) if transient(&s) && Instant::now() + RETRY_PAUSE < deadline => tokio::time::sleep(RETRY_PAUSE).await,
                Err(s) => return Err(s),
            }
        }
    }

    /// Answers the delivered request `request` with `payload`; the caller acks the request
    /// afterwards (replying first means a crash in between leads to a redelivery and a
    /// duplicate reply the cluster drops, never to a request without its reply).
    pub async fn reply(&mut self, request: &Delivery, payload: Vec<u8>, timeout: Duration) -> Result<PublishResult, Status> {
        let message = reply_message(request, payload)?;
        self.publish_until(&message, Instant::now() + timeout).await
    }

    /// Sends `request` (its headers get `kerwen-reply-to: reply_to`, a service of the caller)
    /// and waits up to `timeout` for its reply in `reply_to`, which is acked before it is
    /// returned. Replies to other requests found meanwhile are given back for redelivery:
    /// one outstanding request per reply mailbox keeps that rare.
    pub async fn request(&mut self, mut request: Message, reply_to: &str, timeout: Duration) -> Result<Exchanged, Status> {
        let deadline = Instant::now() + timeout;
        request.headers.insert(HEADER_REPLY_TO.to_owned(), reply_to.to_owned());
        let (service, id) = (request.recipient.clone(), request.id.clone());
        let published = self.publish_until(&request, deadline).await?;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(Status::deadline_exceeded(format!("no reply to request {id} within {timeout:?}")));
            }
            match self.await_reply(reply_to, &service, &id, left).await {
                Ok(reply) => return Ok(Exchanged { request: published, reply }),
                Err(s) if transient(&s) && s.code() != Code::DeadlineExceeded => tokio::time::sleep(RETRY_PAUSE).await,
                Err(s) => return Err(s),
            }
        }
    }

    /// One subscription to `reply_to`, until the reply to `service`'s request `id` arrives
    /// and its ack is confirmed, or the stream fails.
    async fn await_reply(&mut self, reply_to: &str, service: &str, id: &str, timeout: Duration) -> Result<Delivery, Status> {
        let deadline = Instant::now() + timeout;
        let mut subscription = self.subscribe(reply_to, 16).await?;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let delivery = match subscription.next_event(left).await? {
                Some(Event::Delivery(d)) => d,
                Some(Event::Acked(_)) => continue,
                None => return Err(Status::unavailable("the reply subscription ended")),
            };
            let headers = delivery.message.as_ref().map(|m| &m.headers);
            let answers = headers.is_some_and(|h| {
                h.get(HEADER_REQUEST_ID).is_some_and(|v| v == id) && h.get(HEADER_REQUEST_SERVICE).is_some_and(|v| v == service)
            });
            let position = delivery.position.ok_or_else(|| Status::internal("a delivery without position"))?;
            if !answers {
                subscription.nack_after(vec![position], OTHERS_REPLY_DELAY).await?;
                subscription.credit(1).await?;
                continue;
            }
            let acked = subscription.acked() + 1;
            subscription.ack(vec![position]).await?;
            subscription.wait_acked(acked, deadline.saturating_duration_since(Instant::now())).await?;
            return Ok(delivery);
        }
    }
}

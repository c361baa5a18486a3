//! The client's shard map: which node leads the shard of each partition of the mailboxes it
//! publishes to, and where clients reach that node, so a publish goes straight to a leader
//! instead of through a node that forwards it, and a subscription opens at the node leading
//! most of its mailbox's shards.
//!
//! A batch is never split: it goes whole to the leader of most of its messages, which
//! validates it as one (the wire contract accepts or refuses a batch whole) and forwards any
//! part another node leads. The map is a cache and only ever picks the node: the node that
//! receives a publish routes every message itself, so a stale or missing entry costs a hop,
//! never a wrong placement. It is fetched with `Exchange.Routes` for the mailboxes a publish
//! names and refreshed when a node answers with the `kerwen-route-stale` header (it
//! forwarded), or after a leader could not be reached (which is then avoided for a while).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use kerwen_broker::model::{partition_of, GroupId};
use kerwen_proto::v1::{Message, RoutesResponse};
use tonic::transport::{Channel, Endpoint};

use super::{normalise, ClientTls};

/// A leader address that could not be reached is not tried again for this long.
const UNREACHABLE_FOR: Duration = Duration::from_secs(30);
/// Refreshes after a stale answer are at most this frequent.
const MIN_REFRESH_INTERVAL: Duration = Duration::from_millis(500);

struct MailboxRoute {
    partitions: u32,
    key_partitions: u32,
    partition_shards: Vec<GroupId>,
}

#[derive(Default)]
struct State {
    mailboxes: HashMap<String, MailboxRoute>,
    /// Where clients reach each shard's leader.
    leaders: HashMap<GroupId, String>,
    /// A node said it forwarded, or a leader was unreachable: refresh before the next publish.
    stale: bool,
    refreshed: Option<Instant>,
    channels: HashMap<String, Channel>,
    unreachable: HashMap<String, Instant>,
}

/// The shard map of one client and its clones.
pub(crate) struct Routes {
    tls: Option<ClientTls>,
    state: Mutex<State>,
}

impl Routes {
    pub(crate) fn new(tls: Option<ClientTls>) -> Self {
        Self { tls, state: Mutex::new(State::default()) }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The mailboxes whose routes should be (re)fetched before sending `messages`: those not
    /// cached, or every cached one with them once the map went stale.
    pub(crate) fn to_refresh(&self, messages: &[Message]) -> Vec<String> {
        let state = self.state();
        let stale = state.stale && state.refreshed.is_none_or(|at| at.elapsed() >= MIN_REFRESH_INTERVAL);
        let mut wanted: Vec<String> = messages
            .iter()
            .map(|m| &m.recipient)
            .filter(|service| stale || !state.mailboxes.contains_key(*service))
            .cloned()
            .collect();
        if !wanted.is_empty() && stale {
            wanted.extend(state.mailboxes.keys().cloned());
        }
        wanted.sort_unstable();
        wanted.dedup();
        wanted
    }

    /// Takes a `Routes` answer in.
    pub(crate) fn update(&self, answer: RoutesResponse) {
        let mut state = self.state();
        for m in answer.mailboxes {
            // 0: a node that predates growing mailboxes, whose keys hash over every partition.
            let key_partitions = if m.key_partitions == 0 { m.partitions } else { m.key_partitions };
            let route = MailboxRoute { partitions: m.partitions, key_partitions, partition_shards: m.partition_shards };
            state.mailboxes.insert(m.service, route);
        }
        for s in answer.shards {
            if s.client_address.is_empty() {
                state.leaders.remove(&s.shard);
            } else {
                state.leaders.insert(s.shard, s.client_address);
            }
        }
        state.stale = false;
        state.refreshed = Some(Instant::now());
    }

    /// A publish's answer: a node that forwarded some of it says so, and the map is then
    /// refreshed before the next publish (it missed a leader, or a leader moved).
    pub(crate) fn note<T>(&self, (answer, forwarded): (T, bool)) -> T {
        if forwarded {
            self.state().stale = true;
        }
        answer
    }

    /// Avoids `address` for a while (it did not answer) and refreshes the map.
    pub(crate) fn mark_unreachable(&self, address: &str) {
        let mut state = self.state();
        state.unreachable.insert(address.to_owned(), Instant::now() + UNREACHABLE_FOR);
        state.channels.remove(address);
        state.stale = true;
    }

    /// The node to send `messages` to: the leader of the shard most of them go to, if the map
    /// knows it and it is not being avoided. A batch always goes to one node, which validates
    /// it whole (accepted or refused as one) and forwards any part another node leads.
    pub(crate) fn target(&self, messages: &[Message]) -> Option<(String, Channel)> {
        let mut state = self.state();
        let shards: Vec<GroupId> = messages
            .iter()
            .filter_map(|m| {
                let route = state.mailboxes.get(&m.recipient)?;
                let partition = partition_of(m.ordering_key.as_deref(), &m.id, route.partitions, route.key_partitions);
                route.partition_shards.get(partition as usize).copied()
            })
            .collect();
        self.leader_of_most(&mut state, &shards)
    }

    /// The node to open a subscription to `service` at: the leader of most of its partitions'
    /// shards, whose pumps then lease locally, while the node forwards the fetches and acks of
    /// the other shards. A leader that moves later costs a hop per fetch, nothing more.
    pub(crate) fn subscription_target(&self, service: &str) -> Option<(String, Channel)> {
        let mut state = self.state();
        let shards = state.mailboxes.get(service)?.partition_shards.clone();
        self.leader_of_most(&mut state, &shards)
    }

    /// The reachable leader of most of `shards` (one entry per message or partition), and its
    /// channel; `None` when the map knows none of their leaders.
    fn leader_of_most(&self, state: &mut State, shards: &[GroupId]) -> Option<(String, Channel)> {
        let now = Instant::now();
        state.unreachable.retain(|_, until| *until > now);
        let mut counts: HashMap<&str, usize> = HashMap::new();
        let mut best: Option<(&str, usize)> = None;
        for shard in shards {
            let Some(address) = state.leaders.get(shard) else { continue };
            if state.unreachable.contains_key(address) {
                continue;
            }
            let count = counts.entry(address.as_str()).or_default();
            *count += 1;
            if best.is_none_or(|(_, most)| *count > most) {
                best = Some((address.as_str(), *count));
            }
        }
        let address = best?.0.to_owned();
        // An address that is no valid endpoint: the client's own endpoint takes the work.
        let channel = channel(state, &address, self.tls.as_ref())?;
        Some((address, channel))
    }
}

/// The channel to `address`, made on first use. It connects lazily, so an unreachable leader
/// shows as the first call's `UNAVAILABLE`.
fn channel(state: &mut State, address: &str, tls: Option<&ClientTls>) -> Option<Channel> {
    if let Some(c) = state.channels.get(address) {
        return Some(c.clone());
    }
    let mut endpoint = Endpoint::from_shared(normalise(address, tls.is_some())).ok()?;
    if let Some(tls) = tls {
        endpoint = endpoint.tls_config(tls.tonic_config()).ok()?;
    }
    let c = endpoint.connect_timeout(Duration::from_secs(2)).tcp_nodelay(true).connect_lazy();
    state.channels.insert(address.to_owned(), c.clone());
    Some(c)
}

#[cfg(test)]
mod tests {
    use kerwen_proto::v1::{MailboxRoute as PbMailboxRoute, ShardRoute};

    use super::*;

    fn message(id: &str, recipient: &str) -> Message {
        Message { id: id.into(), recipient: recipient.into(), payload: b"x".to_vec().into(), ..Default::default() }
    }

    #[tokio::test]
    async fn a_batch_goes_to_the_leader_of_most_of_its_messages() {
        let routes = Routes::new(None);
        let mail = |i: usize| message(&format!("m{i}"), "TM/X/Y/z/mail");
        let shard_of = |m: &Message| [1, 2, 3, 1][partition_of(None, &m.id, 4, 4) as usize];
        let batch: Vec<Message> = (0..40).map(mail).chain([message("o", "TM/X/Y/z/other")]).collect();
        assert_eq!(routes.to_refresh(&batch), vec!["TM/X/Y/z/mail".to_owned(), "TM/X/Y/z/other".to_owned()]);
        assert!(routes.target(&batch).is_none(), "nothing known: the client's endpoint");

        routes.update(RoutesResponse {
            mailboxes: vec![PbMailboxRoute { service: "TM/X/Y/z/mail".into(), partitions: 4, partition_shards: vec![1, 2, 3, 1], key_partitions: 4 }],
            shards: vec![
                ShardRoute { shard: 1, leader: 1, client_address: "n1:7001".into() },
                ShardRoute { shard: 2, leader: 2, client_address: "n2:7001".into() },
                ShardRoute { shard: 3, leader: 0, client_address: String::new() },
            ],
        });
        assert_eq!(routes.to_refresh(&batch), vec!["TM/X/Y/z/other".to_owned()], "only the unknown mailbox");
        let target = |batch: &[Message]| routes.target(batch).map(|(a, _)| a);
        let on = |shard: u32| (0..400).map(mail).filter(|m| shard_of(m) == shard).take(5).collect::<Vec<_>>();
        assert_eq!(target(&on(2)).as_deref(), Some("n2:7001"));
        assert_eq!(target(&[on(2), on(1), on(1)].concat()).as_deref(), Some("n1:7001"), "the leader of most of them");
        assert_eq!(target(&on(3)), None, "a shard whose leader has no address: the endpoint");
        assert_eq!(target(&[message("o", "TM/X/Y/z/other")]), None, "an unknown mailbox: the endpoint");

        routes.mark_unreachable("n2:7001");
        assert_eq!(target(&on(2)), None, "an unreachable leader is avoided");
        assert_eq!(routes.to_refresh(&batch), vec!["TM/X/Y/z/other".to_owned()], "stale, but refreshed a moment ago");
        tokio::time::sleep(MIN_REFRESH_INTERVAL).await;
        let again = routes.to_refresh(&batch);
        assert!(again.contains(&"TM/X/Y/z/mail".to_owned()), "stale: cached mailboxes are refreshed too: {again:?}");
    }

    #[tokio::test]
    async fn a_subscription_opens_at_the_leader_of_most_of_its_mailbox_shards() {
        let routes = Routes::new(None);
        assert!(routes.subscription_target("TM/X/Y/z/mail").is_none(), "nothing known: the client's endpoint");
        routes.update(RoutesResponse {
            mailboxes: vec![PbMailboxRoute { service: "TM/X/Y/z/mail".into(), partitions: 4, partition_shards: vec![1, 2, 3, 2], key_partitions: 4 }],
            shards: vec![
                ShardRoute { shard: 1, leader: 1, client_address: "n1:7001".into() },
                ShardRoute { shard: 2, leader: 2, client_address: "n2:7001".into() },
                ShardRoute { shard: 3, leader: 1, client_address: "n1:7001".into() },
            ],
        });
        let target = || routes.subscription_target("TM/X/Y/z/mail").map(|(a, _)| a);
        // n1 leads shards 1 and 3, n2 leads shard 2, which holds two of the four partitions:
        // the first to reach the most partitions wins the tie.
        assert_eq!(target().as_deref(), Some("n1:7001"));
        routes.mark_unreachable("n1:7001");
        assert_eq!(target().as_deref(), Some("n2:7001"), "an unreachable leader is avoided");
        assert!(routes.subscription_target("TM/X/Y/z/other").is_none(), "an unknown mailbox: the endpoint");
    }
}

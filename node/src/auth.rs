//! The edge of access control: who is calling (from the TLS client certificate of the
//! connection) and whether the metadata group's rights let them do what they ask. Every
//! refusal is written to the audit log (target `kerwen::audit`) with the caller's identity.

use kerwen_broker::access::{Action, Principal};
use kerwen_broker::ids::ServiceId;
use tonic::{Request, Status};

use crate::runtime::NodeRuntime;
use crate::tls::identity_of;

/// The caller of a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Caller {
    /// Authenticated by its client certificate.
    Authenticated(Principal),
    /// A node run with `--insecure`: nobody is authenticated and nothing is checked.
    Anonymous,
}

impl Caller {
    /// The subsystem calling (`None` for admins, nodes and anonymous callers).
    pub fn subsystem(&self) -> Option<&kerwen_broker::ids::SubsystemId> {
        match self {
            Caller::Authenticated(Principal::Subsystem(s)) => Some(s),
            _ => None,
        }
    }

    /// What a message published by this caller records as its sender.
    pub fn sender(&self) -> String {
        match self {
            Caller::Authenticated(Principal::Subsystem(s)) => s.to_string(),
            Caller::Authenticated(other) => other.uri(),
            Caller::Anonymous => String::new(),
        }
    }
}

impl std::fmt::Display for Caller {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Caller::Authenticated(p) => p.fmt(f),
            Caller::Anonymous => f.write_str("anonymous (insecure mode)"),
        }
    }
}

/// The caller of `request`: the identity of its connection's client certificate.
pub fn caller<T>(runtime: &NodeRuntime, request: &Request<T>) -> Result<Caller, Status> {
    if runtime.insecure() {
        return Ok(Caller::Anonymous);
    }
    let certs = request.peer_certs().ok_or_else(|| Status::unauthenticated("no client certificate"))?;
    let leaf = certs.first().ok_or_else(|| Status::unauthenticated("no client certificate"))?;
    // The handshake already checked this; a failure here means a bug, not an attacker.
    identity_of(leaf).map(Caller::Authenticated).map_err(|e| Status::unauthenticated(format!("{e:#}")))
}

/// Parses a service id from a request field.
pub fn service_id(field: &str, value: &str) -> Result<ServiceId, Status> {
    value.parse().map_err(|e| Status::invalid_argument(format!("{field}: {e}")))
}

/// Whether this node's metadata view allows `action` to `caller`, without asking the leader or
/// auditing: for answers that only leave things out (routes), never for the action itself.
pub fn allowed_locally(runtime: &NodeRuntime, caller: &Caller, action: &Action) -> bool {
    match caller {
        Caller::Authenticated(who) => runtime.meta_view().authorize(who, action).is_ok(),
        Caller::Anonymous => true,
    }
}

/// Checks `action` for `caller`; a refusal is audited and becomes `PERMISSION_DENIED`.
///
/// This node's metadata view may lag the group by a few entries: before refusing, the
/// decision is asked of the metadata leader, so a grant is usable through any node as soon as
/// it is acknowledged. (A revocation can take that same short while to reach a lagging node.)
pub async fn authorize(runtime: &NodeRuntime, caller: &Caller, action: Action) -> Result<(), Status> {
    let Caller::Authenticated(who) = caller else { return Ok(()) };
    if runtime.meta_view().authorize(who, &action).is_ok() {
        return Ok(());
    }
    match runtime.authorize_on_leader(who, &action).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(denied)) => {
            tracing::warn!(target: "kerwen::audit", caller = %who, action = %action, reason = %denied.reason, "permission denied");
            Err(Status::permission_denied(denied.to_string()))
        }
        Err(e) => Err(crate::status::to_status(e)),
    }
}

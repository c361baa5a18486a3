//! `kerwen.v1.Access`: the member registry, send grants, subsystem groups, the subsystems'
//! payload encryption keys (for sealed payloads, see `crate::sealed`), and discovery in
//! the manner of X-Road's metaservices (`listClients`, `listMethods`, `allowedMethods`).
//! Every change is a metadata-group command; every listing reads the metadata leader.

use std::sync::Arc;

use kerwen_broker::access::{AccessCommand, AccessControl, Action, Grantee, MemberRecord, Principal, SubsystemQuota};
use kerwen_broker::evidence::PublicKeyRecord;
use kerwen_broker::ids::{ServiceId, SubsystemId};
use kerwen_broker::model::{Command, CommandResult, METADATA_GROUP};
use kerwen_proto::v1 as pb;
use kerwen_proto::v1::access_server::Access;
use tonic::{Request, Response, Status};

use crate::auth::{self, Caller};
use crate::runtime::{now_unix_ms, NodeRuntime};
use crate::status::to_status;

pub struct AccessService {
    runtime: Arc<NodeRuntime>,
}

impl AccessService {
    pub fn new(runtime: Arc<NodeRuntime>) -> Self {
        Self { runtime }
    }

    /// Authenticates the caller of `request` and checks `action`.
    async fn allow<T>(&self, request: &Request<T>, action: impl FnOnce() -> Result<Action, Status>) -> Result<Caller, Status> {
        let caller = auth::caller(&self.runtime, request)?;
        auth::authorize(&self.runtime, &caller, action()?).await?;
        Ok(caller)
    }

    /// Proposes an access change; returns whether it changed anything.
    async fn change(&self, cmd: AccessCommand) -> Result<bool, Status> {
        match self.runtime.write(METADATA_GROUP, Command::Access(cmd)).await.map_err(to_status)?.1 {
            CommandResult::Changed(n) => Ok(n > 0),
            CommandResult::Rejected(e) => Err(to_status(e)),
            other => Err(Status::internal(format!("unexpected result {other:?}"))),
        }
    }

    /// Grants or revokes `send` on a service (its owner or admins).
    async fn change_grant(&self, request: Request<pb::GrantRequest>, grant: bool) -> Result<Response<pb::GrantResponse>, Status> {
        let service = auth::service_id("service", &request.get_ref().service)?;
        let caller = self.allow(&request, || Ok(Action::ManageAccess(service.clone()))).await?;
        let grantee = grantee(&request.get_ref().grantee)?;
        let (service_text, who) = (service.to_string(), grantee.clone());
        let cmd = if grant {
            AccessCommand::Grant { service: service_text, grantee: who }
        } else {
            AccessCommand::Revoke { service: service_text, grantee: who }
        };
        let changed = self.change(cmd).await?;
        tracing::info!(target: "kerwen::audit", %caller, %service, %grantee, granted = grant, "send right changed");
        Ok(Response::new(pb::GrantResponse { changed }))
    }

    /// Adds a subsystem to a group or removes it (admins).
    async fn change_group(&self, request: Request<pb::GroupRequest>, add: bool) -> Result<Response<pb::GroupResponse>, Status> {
        let caller = self.allow(&request, || Ok(Action::Administer)).await?;
        let req = request.into_inner();
        let (group, subsystem) = (group_name(&req.group)?, subsystem_id("subsystem", &req.subsystem)?);
        let cmd = if add {
            AccessCommand::AddToGroup { group: group.clone(), subsystem: subsystem.clone() }
        } else {
            AccessCommand::RemoveFromGroup { group: group.clone(), subsystem: subsystem.clone() }
        };
        let changed = self.change(cmd).await?;
        tracing::info!(target: "kerwen::audit", %caller, %group, %subsystem, added = add, "group changed");
        Ok(Response::new(pb::GroupResponse { changed }))
    }

    async fn acl(&self) -> Result<AccessControl, Status> {
        self.runtime.access().await.map_err(to_status)
    }

    async fn encryption_key(&self, subsystem: &SubsystemId, key_id: &str) -> Result<pb::EncryptionKey, Status> {
        let acl = self.acl().await?;
        let key = acl.encryption_keys(subsystem).find(|k| k.key_id == key_id);
        key.map(|k| to_proto_encryption_key(subsystem, k))
            .ok_or_else(|| Status::not_found(format!("{subsystem} has no encryption key {key_id}")))
    }

    async fn member(&self, subsystem: &SubsystemId) -> Result<pb::Member, Status> {
        let acl = self.acl().await?;
        acl.member(subsystem).map(to_proto_member).ok_or_else(|| Status::not_found(format!("subsystem {subsystem} is not registered")))
    }
}

fn subsystem_id(field: &str, value: &str) -> Result<SubsystemId, Status> {
    value.parse().map_err(|e| Status::invalid_argument(format!("{field}: {e}")))
}

fn grantee(value: &str) -> Result<Grantee, Status> {
    value.parse().map_err(|e| Status::invalid_argument(format!("grantee: {e}")))
}

fn group_name(value: &str) -> Result<String, Status> {
    kerwen_broker::access::validate_name(value).map_err(|e| Status::invalid_argument(format!("group: {e}")))?;
    Ok(value.to_owned())
}

fn key_id(value: &str) -> Result<String, Status> {
    kerwen_broker::access::validate_name(value).map_err(|e| Status::invalid_argument(format!("key_id: {e}")))?;
    Ok(value.to_owned())
}

fn to_proto_encryption_key(subsystem: &SubsystemId, k: &PublicKeyRecord) -> pb::EncryptionKey {
    pb::EncryptionKey {
        subsystem: subsystem.to_string(),
        key_id: k.key_id.clone(),
        public_key: k.public_key.to_vec().into(),
        valid_from_unix_ms: k.valid_from_unix_ms,
        valid_until_unix_ms: k.valid_until_unix_ms,
    }
}

fn quota(q: Option<pb::Quota>) -> SubsystemQuota {
    let q = q.unwrap_or_default();
    SubsystemQuota {
        publish_messages_per_second: q.publish_messages_per_second,
        publish_bytes_per_second: q.publish_bytes_per_second,
        max_stored_bytes: q.max_stored_bytes,
    }
}

fn to_proto_member(m: &MemberRecord) -> pb::Member {
    pb::Member {
        subsystem: m.subsystem.to_string(),
        registered_unix_ms: m.registered_unix_ms,
        quota: Some(pb::Quota {
            publish_messages_per_second: m.quota.publish_messages_per_second,
            publish_bytes_per_second: m.quota.publish_bytes_per_second,
            max_stored_bytes: m.quota.max_stored_bytes,
        }),
    }
}

#[tonic::async_trait]
impl Access for AccessService {
    async fn add_member(&self, request: Request<pb::AddMemberRequest>) -> Result<Response<pb::Member>, Status> {
        let caller = self.allow(&request, || Ok(Action::Administer)).await?;
        let req = request.into_inner();
        let subsystem = subsystem_id("subsystem", &req.subsystem)?;
        let record = MemberRecord { subsystem: subsystem.clone(), registered_unix_ms: now_unix_ms(), quota: quota(req.quota) };
        self.change(AccessCommand::AddMember(record.clone())).await?;
        tracing::info!(target: "kerwen::audit", %caller, %subsystem, "member registered");
        Ok(Response::new(to_proto_member(&record)))
    }

    async fn set_quota(&self, request: Request<pb::SetQuotaRequest>) -> Result<Response<pb::Member>, Status> {
        let caller = self.allow(&request, || Ok(Action::Administer)).await?;
        let req = request.into_inner();
        let subsystem = subsystem_id("subsystem", &req.subsystem)?;
        let quota = quota(req.quota);
        self.change(AccessCommand::SetQuota { subsystem: subsystem.clone(), quota }).await?;
        tracing::info!(target: "kerwen::audit", %caller, %subsystem, ?quota, "quota set");
        Ok(Response::new(self.member(&subsystem).await?))
    }

    async fn list_members(&self, request: Request<pb::ListMembersRequest>) -> Result<Response<pb::ListMembersResponse>, Status> {
        self.allow(&request, || Ok(Action::Discover)).await?;
        let acl = self.acl().await?;
        Ok(Response::new(pb::ListMembersResponse { members: acl.members().map(to_proto_member).collect() }))
    }

    async fn grant(&self, request: Request<pb::GrantRequest>) -> Result<Response<pb::GrantResponse>, Status> {
        self.change_grant(request, true).await
    }

    async fn revoke(&self, request: Request<pb::GrantRequest>) -> Result<Response<pb::GrantResponse>, Status> {
        self.change_grant(request, false).await
    }

    async fn list_grants(&self, request: Request<pb::ListGrantsRequest>) -> Result<Response<pb::ListGrantsResponse>, Status> {
        let service = request.get_ref().service.clone();
        self.allow(&request, || match service.as_str() {
            "" => Ok(Action::Administer),
            s => Ok(Action::ManageAccess(auth::service_id("service", s)?)),
        })
        .await?;
        let acl = self.acl().await?;
        let grants = acl
            .all_grants()
            .filter(|(s, _)| service.is_empty() || **s == service)
            .map(|(s, g)| pb::GrantInfo { service: s.clone(), grantee: g.to_string() })
            .collect();
        Ok(Response::new(pb::ListGrantsResponse { grants }))
    }

    async fn add_to_group(&self, request: Request<pb::GroupRequest>) -> Result<Response<pb::GroupResponse>, Status> {
        self.change_group(request, true).await
    }

    async fn remove_from_group(&self, request: Request<pb::GroupRequest>) -> Result<Response<pb::GroupResponse>, Status> {
        self.change_group(request, false).await
    }

    async fn list_groups(&self, request: Request<pb::ListGroupsRequest>) -> Result<Response<pb::ListGroupsResponse>, Status> {
        self.allow(&request, || Ok(Action::Discover)).await?;
        let acl = self.acl().await?;
        let groups = acl
            .groups()
            .iter()
            .map(|(g, members)| pb::GroupInfo { group: g.clone(), subsystems: members.iter().map(|s| s.to_string()).collect() })
            .collect();
        Ok(Response::new(pb::ListGroupsResponse { groups }))
    }

    async fn list_services(&self, request: Request<pb::ListServicesRequest>) -> Result<Response<pb::ListServicesResponse>, Status> {
        self.allow(&request, || Ok(Action::Discover)).await?;
        let subsystem = subsystem_id("subsystem", &request.get_ref().subsystem)?;
        let services = self
            .runtime
            .mailboxes()
            .await
            .map_err(to_status)?
            .into_iter()
            .filter(|m| m.service.parse::<ServiceId>().is_ok_and(|id| id.subsystem == subsystem))
            .map(|m| m.service)
            .collect();
        Ok(Response::new(pb::ListServicesResponse { services }))
    }

    async fn allowed_services(
        &self,
        request: Request<pb::AllowedServicesRequest>,
    ) -> Result<Response<pb::ListServicesResponse>, Status> {
        let asked = request.get_ref().subsystem.clone();
        let caller = self.allow(&request, || Ok(if asked.is_empty() { Action::Discover } else { Action::Administer })).await?;
        let subsystem = match (asked.as_str(), &caller) {
            ("", Caller::Authenticated(Principal::Subsystem(s))) => s.clone(),
            ("", _) => return Err(Status::invalid_argument("name the subsystem: the caller is not one")),
            (s, _) => subsystem_id("subsystem", s)?,
        };
        let acl = self.acl().await?;
        let mailboxes = self.runtime.mailboxes().await.map_err(to_status)?;
        let services = acl.allowed_services(&subsystem, mailboxes.iter().map(|m| m.service.as_str()));
        Ok(Response::new(pb::ListServicesResponse { services }))
    }

    async fn list_signing_keys(
        &self,
        request: Request<pb::ListSigningKeysRequest>,
    ) -> Result<Response<pb::ListSigningKeysResponse>, Status> {
        self.allow(&request, || Ok(Action::Discover)).await?;
        let acl = self.acl().await?;
        let keys = acl
            .signing_keys()
            .keys
            .values()
            .map(|k| pb::SigningKey {
                key_id: k.key_id.clone(),
                public_key: k.public_key.to_vec().into(),
                valid_from_unix_ms: k.valid_from_unix_ms,
                valid_until_unix_ms: k.valid_until_unix_ms,
            })
            .collect();
        Ok(Response::new(pb::ListSigningKeysResponse { keys }))
    }

    async fn register_encryption_key(
        &self,
        request: Request<pb::RegisterEncryptionKeyRequest>,
    ) -> Result<Response<pb::EncryptionKey>, Status> {
        let subsystem = subsystem_id("subsystem", &request.get_ref().subsystem)?;
        let caller = self.allow(&request, || Ok(Action::ManageKeys(subsystem.clone()))).await?;
        let req = request.into_inner();
        let key_id = key_id(&req.key_id)?;
        let public_key: [u8; 32] = req.public_key.as_ref().try_into().map_err(|_| {
            Status::invalid_argument(format!("public_key: an X25519 public key is 32 bytes, not {}", req.public_key.len()))
        })?;
        let key = PublicKeyRecord { key_id, public_key, valid_from_unix_ms: now_unix_ms(), valid_until_unix_ms: None };
        let changed = self.change(AccessCommand::RegisterEncryptionKey { subsystem: subsystem.clone(), key: key.clone() }).await?;
        tracing::info!(target: "kerwen::audit", %caller, %subsystem, key_id = %key.key_id, changed, "encryption key registered");
        self.encryption_key(&subsystem, &key.key_id).await.map(Response::new)
    }

    async fn retire_encryption_key(
        &self,
        request: Request<pb::RetireEncryptionKeyRequest>,
    ) -> Result<Response<pb::EncryptionKey>, Status> {
        let subsystem = subsystem_id("subsystem", &request.get_ref().subsystem)?;
        let caller = self.allow(&request, || Ok(Action::ManageKeys(subsystem.clone()))).await?;
        let key_id = key_id(&request.get_ref().key_id)?;
        let cmd = AccessCommand::RetireEncryptionKey { subsystem: subsystem.clone(), key_id: key_id.clone(), valid_until_unix_ms: now_unix_ms() };
        let changed = self.change(cmd).await?;
        tracing::info!(target: "kerwen::audit", %caller, %subsystem, %key_id, changed, "encryption key retired");
        self.encryption_key(&subsystem, &key_id).await.map(Response::new)
    }

    async fn list_encryption_keys(
        &self,
        request: Request<pb::ListEncryptionKeysRequest>,
    ) -> Result<Response<pb::ListEncryptionKeysResponse>, Status> {
        self.allow(&request, || Ok(Action::Discover)).await?;
        let subsystem = subsystem_id("subsystem", &request.get_ref().subsystem)?;
        let acl = self.acl().await?;
        let keys = acl.encryption_keys(&subsystem).map(|k| to_proto_encryption_key(&subsystem, k)).collect();
        Ok(Response::new(pb::ListEncryptionKeysResponse { keys }))
    }

    async fn who_am_i(&self, request: Request<pb::WhoAmIRequest>) -> Result<Response<pb::WhoAmIResponse>, Status> {
        let identity = match auth::caller(&self.runtime, &request)? {
            Caller::Authenticated(p) => p.uri(),
            Caller::Anonymous => String::new(),
        };
        Ok(Response::new(pb::WhoAmIResponse { identity }))
    }
}

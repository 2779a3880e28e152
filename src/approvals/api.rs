//! The approvals gRPC API (`proto/portcullis/approvals/v1/approvals.proto`), served on the
//! Portcullis gRPC listener next to ext_authz, plus the encoded descriptor for reflection.
//!
//! Callers authenticate with their JWT in the `authorization: Bearer <token>` metadata,
//! verified by the engine exactly as a Check's token is. Only this edge turns approval
//! errors into a `tonic::Status`; messages never contain the token.

use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use tonic::{Request, Response, Status};

use super::{ApprovalError, ApprovalState, Record};
use crate::engine::{Engine, unix_now};
use crate::identity::Identity;

/// Generated messages, client and server.
#[allow(
    clippy::all,
    clippy::pedantic,
    clippy::unwrap_used,
    clippy::expect_used,
    missing_docs
)]
pub mod pb {
    tonic::include_proto!("portcullis.approvals.v1");
}

/// The encoded `FileDescriptorSet` of the approvals API, for gRPC reflection.
pub const DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/approvals_descriptor.bin"));

/// The fully-qualified service name.
pub const SERVICE_NAME: &str = "portcullis.approvals.v1.Approvals";

/// The approvals service over the current engine (a config reload swaps it).
pub struct ApprovalsApi {
    engine: Arc<ArcSwap<Engine>>,
}

/// The largest approvals API request accepted.
const MAX_REQUEST_BYTES: usize = 64 * 1024;

impl ApprovalsApi {
    pub fn new(engine: Arc<ArcSwap<Engine>>) -> Self {
        Self { engine }
    }

    /// The gRPC server for this service.
    pub fn into_server(self) -> pb::approvals_server::ApprovalsServer<Self> {
        // Its requests are ids, reasons and a token in metadata: a few KiB at most. tonic's
        // default (4 MiB per message) let each of a few hundred streams buffer that much.
        pb::approvals_server::ApprovalsServer::new(self)
            .max_decoding_message_size(MAX_REQUEST_BYTES)
    }

    async fn caller<T>(
        &self,
        engine: &Engine,
        request: &Request<T>,
    ) -> Result<Arc<Identity>, Status> {
        let Some(value) = request.metadata().get("authorization") else {
            return Err(Status::unauthenticated(
                "send your token as `authorization: Bearer <token>` metadata",
            ));
        };
        let value = value
            .to_str()
            .map_err(|_| Status::unauthenticated("the authorization metadata is not text"))?;
        // The scheme is case-insensitive (RFC 9110 11.1), as on a Check.
        let token = value
            .trim()
            .split_once(' ')
            .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
            .map(|(_, token)| token.trim())
            .filter(|t| !t.is_empty())
            .ok_or_else(|| Status::unauthenticated("expected `authorization: Bearer <token>`"))?;
        engine
            .verify_bearer(token, unix_now())
            .await
            .map_err(|deny| Status::unauthenticated(deny.detail.to_string()))
    }

    /// `caller`, with a refusal audited (`kind: "admin"`, `event: "refused"`).
    async fn audited_caller<T>(
        &self,
        engine: &Engine,
        request: &Request<T>,
    ) -> Result<Arc<Identity>, Status> {
        self.caller(engine, request)
            .await
            .map_err(|refused| audit_refusal(engine, None, refused))
    }
}

/// Audits a refusal of who may act (a caller not verified, not an approver, approving their
/// own request) and hands the status back; other errors are not refusals.
fn audit_refusal(engine: &Engine, who: Option<&Identity>, refused: Status) -> Status {
    if matches!(
        refused.code(),
        tonic::Code::Unauthenticated | tonic::Code::PermissionDenied
    ) {
        let actor = who.map(|w| format!("{}:{}", w.issuer_name, w.subject));
        let mut event = crate::audit::AdminEvent::new("refused", "approvals", actor);
        event.detail = Some(refused.message().to_string());
        engine.audit.record_admin(event);
    }
    refused
}

/// The longest client-supplied text (an id, a ttl) echoed in an error: longer text is cut,
/// with `…`. A status message travels as the `grpc-message` header, and one echoing a
/// 100 KB id made the answer a header list over any client's limit: the caller saw a
/// transport error (`cannot reach portcullis`) instead of the reason.
const MAX_ECHOED_CHARS: usize = 80;

/// The longest status message sent, whatever it quotes (a backstop to `echoed`).
const MAX_MESSAGE_BYTES: usize = 1024;

/// `text` as quoted in an error message: cut after `MAX_ECHOED_CHARS` characters.
fn echoed(text: &str) -> std::borrow::Cow<'_, str> {
    match text.char_indices().nth(MAX_ECHOED_CHARS) {
        None => text.into(),
        Some((end, _)) => format!("{}…", &text[..end]).into(),
    }
}

/// `message` cut to at most `MAX_MESSAGE_BYTES` bytes (on a character boundary).
fn bounded(mut message: String) -> String {
    if message.len() > MAX_MESSAGE_BYTES {
        let mut end = MAX_MESSAGE_BYTES - '…'.len_utf8();
        while !message.is_char_boundary(end) {
            end -= 1;
        }
        message.truncate(end);
        message.push('…');
    }
    message
}

/// An id the caller sent that cannot name an approval (not `apr_` and 32 hex digits):
/// answered as unknown without asking the service, quoting the id cut short.
fn known_id(id: &str) -> Result<&str, Status> {
    if crate::approvals::valid_id(id) {
        Ok(id)
    } else {
        Err(Status::not_found(format!(
            "no approval request `{}`",
            echoed(id)
        )))
    }
}

fn status(e: ApprovalError) -> Status {
    let message = bounded(e.to_string());
    match e {
        ApprovalError::NotFound(_) => Status::not_found(message),
        ApprovalError::NotApprover(_) | ApprovalError::SelfApproval(_) => {
            Status::permission_denied(message)
        }
        ApprovalError::AlreadyDecided { .. }
        | ApprovalError::BeingDecided(_)
        | ApprovalError::Expired(_) => Status::failed_precondition(message),
        ApprovalError::InvalidTtl(_) => Status::invalid_argument(message),
        ApprovalError::State(_) => Status::unavailable(message),
    }
}

/// `r` as the API answers it; `uses_left` as `Approvals::uses_left` found it (listings), or
/// every use granted (an approval just given).
pub fn to_pb(r: &Record, uses_left: Option<u32>) -> pb::Approval {
    pb::Approval {
        id: r.id.clone(),
        state: r.state.as_str().to_string(),
        subject: r.subject.clone(),
        issuer: r.issuer_name.clone(),
        iss: r.token_iss().unwrap_or_default().to_string(),
        method: r.method.clone(),
        host: r.host.clone(),
        path: r.path.clone(),
        body_sha256: r.body_sha256.clone().unwrap_or_default(),
        query: r.query.clone().unwrap_or_default(),
        query_sha256: r.query_sha256.clone().unwrap_or_default(),
        justification: r.justification.clone().unwrap_or_default(),
        route: r.route.clone(),
        rule: r.rule.clone(),
        requested_at: r.requested_at,
        expires_at: match r.state {
            // 0: the pre-approval has no end (its record lapses on its own after an hour).
            ApprovalState::PreApproved => r.grant_expires_at.unwrap_or(0),
            _ => r.grant_expires_at.unwrap_or(r.expires_at),
        },
        decided_by: r.decided_by.clone().unwrap_or_default(),
        decided_at: r.decided_at.unwrap_or_default(),
        reason: r.reason.clone().unwrap_or_default(),
        uses: r.uses,
        uses_left,
    }
}

#[tonic::async_trait]
impl pb::approvals_server::Approvals for ApprovalsApi {
    async fn list(
        &self,
        request: Request<pb::ListRequest>,
    ) -> Result<Response<pb::ListResponse>, Status> {
        let engine = self.engine.load_full();
        let who = self.audited_caller(&engine, &request).await?;
        let now = unix_now();
        let records = engine
            .approvals
            .list(&who, request.get_ref().include_decided, now)
            .await
            .map_err(status)?;
        let left = engine
            .approvals
            .uses_left(&records, now)
            .await
            .map_err(status)?;
        // A request never decided is kept for a while after it expired (`--all` shows it):
        // listed as `expired`, not as `pending` it can no longer be.
        let listed = |(r, l): (&Record, Option<u32>)| {
            let mut a = to_pb(r, l);
            if r.state == ApprovalState::Pending && r.expires_at <= now {
                a.state = "expired".to_string();
            }
            a
        };
        Ok(Response::new(pb::ListResponse {
            approvals: records.iter().zip(left).map(listed).collect(),
        }))
    }

    async fn approve(
        &self,
        request: Request<pb::ApproveRequest>,
    ) -> Result<Response<pb::ApprovalReply>, Status> {
        let engine = self.engine.load_full();
        let who = self.audited_caller(&engine, &request).await?;
        let body = request.get_ref();
        let ttl: Option<Duration> = match body.ttl.trim() {
            "" => None,
            t => Some(humantime::parse_duration(t).map_err(|_| {
                Status::invalid_argument(format!("invalid ttl `{}`: write e.g. `5m`", echoed(t)))
            })?),
        };
        let record = engine
            .approvals
            .approve(&who, known_id(body.id.trim())?, ttl, unix_now())
            .await
            .map_err(|e| audit_refusal(&engine, Some(&who), status(e)))?;
        // Just granted: no use of it can have been taken yet.
        Ok(Response::new(pb::ApprovalReply {
            approval: Some(to_pb(&record, Some(record.uses))),
        }))
    }

    async fn reject(
        &self,
        request: Request<pb::RejectRequest>,
    ) -> Result<Response<pb::ApprovalReply>, Status> {
        let engine = self.engine.load_full();
        let who = self.audited_caller(&engine, &request).await?;
        let body = request.get_ref();
        let reason = Some(body.reason.clone()).filter(|r| !r.trim().is_empty());
        let record = engine
            .approvals
            .reject(&who, known_id(body.id.trim())?, reason, unix_now())
            .await
            .map_err(|e| audit_refusal(&engine, Some(&who), status(e)))?;
        Ok(Response::new(pb::ApprovalReply {
            approval: Some(to_pb(&record, None)),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::admin::metrics::Metrics;
    use pb::approvals_server::Approvals as _;

    /// A caller the approvals API turns away (a token that does not verify, a requester
    /// approving their own request) is audited: it was answered with a gRPC error and
    /// nothing else, so a probe of the approvals listener left no trace.
    #[tokio::test]
    async fn callers_turned_away_are_audited() {
        let captured = crate::audit::Captured::new();
        let sink = captured.sink.clone();
        let metrics = Arc::new(Metrics::new());
        let engine = crate::engine::tests::shipped_engine("", &metrics).with_audit(sink.clone());
        engine.keys.start().await;
        let alice = crate::engine::tests::dev_token(&engine, "alice", &["dba"], &[]);
        let api = ApprovalsApi::new(Arc::new(ArcSwap::from_pointee(engine)));
        let mut bad = Request::new(pb::ListRequest::default());
        bad.metadata_mut()
            .insert("authorization", "Bearer garbage".parse().unwrap());
        let refused = api.list(bad).await.unwrap_err();
        assert_eq!(refused.code(), tonic::Code::Unauthenticated);
        // alice's own request, which she may not approve.
        let headers = crate::engine::tests::bearer(&alice);
        let view = crate::engine::tests::request("DELETE", "/databases/prod", &headers);
        let d = api.engine.load().check(&view).await;
        assert_eq!(d.code, crate::authz::ReasonCode::ApprovalRequired, "{d:?}");
        let id = d
            .body_fields
            .iter()
            .find(|(k, _)| *k == "approval_id")
            .map(|(_, v)| v.to_string())
            .expect("an approval id");
        let mut own = Request::new(pb::ApproveRequest {
            id,
            ..Default::default()
        });
        own.metadata_mut()
            .insert("authorization", format!("Bearer {alice}").parse().unwrap());
        let refused = api.approve(own).await.unwrap_err();
        assert_eq!(refused.code(), tonic::Code::PermissionDenied);
        let text = captured.text();
        let admin: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
            .filter(|l| l["kind"] == "admin")
            .collect();
        assert_eq!(admin.len(), 2, "{text}");
        assert!(
            admin
                .iter()
                .all(|l| l["event"] == "refused" && l["api"] == "approvals")
        );
        assert_eq!(admin[0]["actor"], serde_json::Value::Null);
        assert_eq!(admin[1]["actor"], "dev:alice");
        assert!(!text.contains(&alice), "no token in the audit log");
    }
}

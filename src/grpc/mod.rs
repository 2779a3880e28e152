//! The Envoy ext_authz gRPC service. The only module that imports `envoy_types` or builds a
//! `CheckResponse`: it turns a CheckRequest into a `RequestView`, asks the `Engine`, records
//! the decision (metrics + audit), and turns the `Decision` into an explicit response.
//! `wire` is the CheckRequest as we decode it; `service` the gRPC method around it; `serve`
//! the port's accept loop (Check straight to `service`, other services through tonic).
//!
//! INVARIANT: `check` never returns a gRPC error and never an empty response. Envoy treats a
//! response without status as an allow and, under `failure_mode_allow`, a gRPC error too; so
//! every deny — including internal failures and panics — is a `CheckResponse` with a non-OK
//! status and a `DeniedHttpResponse`.

pub mod serve;
pub mod service;
pub mod wire;

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Instant;

use arc_swap::ArcSwap;
use envoy_types::ext_authz::v3::pb::{
    CheckResponse, DeniedHttpResponse, HeaderAppendAction, HeaderValue, HeaderValueOption,
    HttpResponse, HttpStatus, OkHttpResponse,
};
use envoy_types::pb::google::rpc;

pub use service::AuthorizationServer;
use wire::{CheckRequest, HeaderList};

use crate::admin::metrics::{DecisionLabels, Metrics, RouteLabel};
use crate::audit::{AuditEvent, AuditSink};
use crate::authz::{Decision, ReasonCode, RequestView};
use crate::engine::Engine;
use crate::identity::peer::PeerCertificate;
use crate::identity::{Identity, string_list};

/// gRPC status codes (google.rpc.Code) used in responses.
const RPC_OK: i32 = 0;
const RPC_PERMISSION_DENIED: i32 = 7;
const RPC_RESOURCE_EXHAUSTED: i32 = 8;
const RPC_UNAVAILABLE: i32 = 14;
const RPC_UNAUTHENTICATED: i32 = 16;

/// The ext_authz service. Holds the current engine behind an `ArcSwap` so a config reload
/// swaps it atomically while in-flight checks finish on the one they started with.
pub struct AuthzService {
    engine: Arc<ArcSwap<Engine>>,
    metrics: Arc<Metrics>,
    audit: AuditSink,
}

impl AuthzService {
    pub fn new(engine: Arc<ArcSwap<Engine>>, metrics: Arc<Metrics>, audit: AuditSink) -> Self {
        Self {
            engine,
            metrics,
            audit,
        }
    }

    /// Decides one CheckRequest. Public so tests and benchmarks can call it without a socket.
    pub async fn decide(&self, req: &CheckRequest) -> CheckResponse {
        let started = Instant::now();
        let engine = self.engine.load_full();
        let parts = RequestParts::from_check(req);
        // The forwarded client certificate, parsed once per request. One Envoy could not
        // send us is treated as absent: principal rules then fail and certificate-bound
        // tokens are refused (closed), never granted.
        let peer_certificate = parts.certificate.filter(|c| !c.is_empty()).and_then(|c| {
            match PeerCertificate::from_envoy(c) {
                Ok(p) => Some(p),
                Err(e) => {
                    tracing::warn!(error = %e, "ignoring the peer certificate Envoy forwarded");
                    None
                }
            }
        });
        let mut view = parts.view();
        view.peer_certificate = peer_certificate.as_ref();
        let request_id = parts.request_id();

        // A panic anywhere below must still produce a deny, never a dropped stream.
        let decision = {
            let fut = engine.check(&view);
            match futures_util::FutureExt::catch_unwind(std::panic::AssertUnwindSafe(fut)).await {
                Ok(d) => d,
                Err(_) => Decision::new(ReasonCode::Internal, "internal error while deciding"),
            }
        };
        let elapsed = started.elapsed();

        let response = to_response(&decision, &engine, request_id);
        self.record(&decision, &view, request_id, elapsed);
        response
    }

    /// The explicit deny for a Check that could not be read or decoded (fail closed: a gRPC
    /// error would be an allow under `failure_mode_allow`). Logged, counted and audited
    /// like any other decision.
    pub fn malformed(&self, detail: &str) -> CheckResponse {
        tracing::warn!(detail, "refusing a malformed CheckRequest");
        let engine = self.engine.load();
        let decision = Decision::new(ReasonCode::Internal, detail.to_string());
        let empty = CheckRequest::default();
        let parts = RequestParts::from_check(&empty);
        let response = to_response(&decision, &engine, "");
        self.record(&decision, &parts.view(), "", std::time::Duration::ZERO);
        response
    }

    fn record(
        &self,
        decision: &Decision,
        view: &RequestView<'_>,
        request_id: &str,
        elapsed: std::time::Duration,
    ) {
        self.metrics
            .decisions
            .get_or_create(&DecisionLabels {
                result: if decision.is_allow() { "allow" } else { "deny" },
                status: decision.http_status(),
                reason: decision.code.as_str(),
                route: RouteLabel(decision.route.clone()),
            })
            .inc();
        self.metrics.decision_seconds.observe(elapsed.as_secs_f64());
        self.audit
            .record(AuditEvent::new(decision, view, request_id, elapsed));
    }
}

/// The request headers, plus, when Envoy sent the request body (`with_request_body`), the
/// body's SHA-256 under an internal pseudo-header (approvals bind to it). A client can never
/// send a header starting with `:`, and any such entry is replaced or removed anyway.
fn request_headers(http: &wire::HttpRequest) -> HeaderList<'_> {
    use crate::approvals::BODY_SHA256_HEADER;
    let mut headers = HeaderList::from_http(http);
    let body: &[u8] = if http.raw_body.is_empty() {
        http.body.as_bytes()
    } else {
        &http.raw_body
    };
    if !body.is_empty() || crate::authz::Headers::entry(&headers, BODY_SHA256_HEADER).is_some() {
        let digest = (!body.is_empty()).then(|| crate::approvals::sha256_hex(body));
        headers.set(BODY_SHA256_HEADER, digest);
    }
    headers
}

/// The parts of a CheckRequest the core needs, borrowed.
struct RequestParts<'a> {
    http: Option<&'a wire::HttpRequest>,
    headers: HeaderList<'a>,
    source_ip: Option<IpAddr>,
    principal: &'a str,
    certificate: Option<&'a str>,
}

impl<'a> RequestParts<'a> {
    fn from_check(req: &'a CheckRequest) -> Self {
        let attrs = req.attributes.as_ref();
        let http = attrs
            .and_then(|a| a.request.as_ref())
            .and_then(|r| r.http.as_ref());
        let source = attrs.and_then(|a| a.source.as_ref());
        let source_ip = source
            .and_then(|s| s.address.as_ref())
            .and_then(|a| a.socket_address.as_ref())
            .and_then(|sa| sa.address.parse::<IpAddr>().ok());
        Self {
            http,
            headers: http.map(request_headers).unwrap_or_default(),
            source_ip,
            principal: source.map_or("", |s| s.principal.as_str()),
            certificate: source.map(|s| s.certificate.as_str()),
        }
    }

    fn header(&self, name: &str) -> Option<&str> {
        crate::authz::Headers::entry(&self.headers, name).map(|(_, v)| v)
    }

    /// Envoy's `x-request-id`, else the stream id Envoy reports.
    fn request_id(&self) -> &str {
        self.header("x-request-id")
            .or_else(|| self.http.map(|h| h.id.as_str()))
            .unwrap_or_default()
    }

    fn view(&self) -> RequestView<'_> {
        let http = self.http;
        // Envoy sends the `:authority` as `host`; fall back to the header for older Envoys.
        let host = http
            .map(|h| h.host.as_str())
            .filter(|h| !h.is_empty())
            .or_else(|| self.header(":authority"))
            .unwrap_or_default();
        RequestView {
            method: http.map_or("", |h| h.method.as_str()),
            host,
            path: http.map_or("", |h| h.path.as_str()),
            headers: &self.headers,
            source_ip: self.source_ip,
            source_principal: self.principal,
            scheme: http.map_or("", |h| h.scheme.as_str()),
            peer_certificate: None,
        }
    }
}

/// Turns a decision into Envoy's answer.
pub fn to_response(decision: &Decision, engine: &Engine, request_id: &str) -> CheckResponse {
    if decision.is_allow() {
        allow_response(decision.identity.as_deref(), engine)
    } else {
        deny_response(decision, request_id)
    }
}

fn allow_response(identity: Option<&Identity>, engine: &Engine) -> CheckResponse {
    let upstream = &engine.config.file.upstream;
    let mut headers = Vec::new();
    let mut remove = Vec::new();
    // Each identity header is either overwritten with our value or removed, so a copy the
    // client sent never reaches the upstream, whatever order Envoy applies the two lists in.
    for (name, claim) in &upstream.identity_headers {
        match identity.and_then(|id| identity_header_value(id, claim)) {
            Some(value) => headers.push(set_header(name, value)),
            None => remove.push(name.clone()),
        }
    }
    if upstream.strip_authorization {
        let mut names: Vec<&str> = engine
            .config
            .issuers
            .iter()
            .map(|i| i.header.as_str())
            .collect();
        if let Some(ak) = &engine.config.api_keys {
            names.push(ak.header.as_str());
        }
        names.sort_unstable();
        names.dedup();
        remove.extend(names.into_iter().map(str::to_string));
    }
    CheckResponse {
        status: Some(rpc::Status {
            code: RPC_OK,
            ..Default::default()
        }),
        http_response: Some(HttpResponse::OkResponse(OkHttpResponse {
            headers,
            headers_to_remove: remove,
            ..Default::default()
        })),
        ..Default::default()
    }
}

/// The header value for a claim: strings as they are, lists joined with a space (the `scope`
/// convention), numbers and booleans as JSON. Values with control characters are dropped.
fn identity_header_value(identity: &Identity, claim: &str) -> Option<String> {
    let value = identity.claim(claim)?;
    let text = match value {
        serde_json::Value::String(s) => s.clone(),
        serde_json::Value::Array(_) => string_list(Some(value), false).join(" "),
        serde_json::Value::Number(n) => n.to_string(),
        serde_json::Value::Bool(b) => b.to_string(),
        _ => return None,
    };
    (!text.is_empty() && !text.chars().any(|c| c.is_control())).then_some(text)
}

fn set_header(name: &str, value: String) -> HeaderValueOption {
    HeaderValueOption {
        header: Some(HeaderValue {
            key: name.to_string(),
            value,
            ..Default::default()
        }),
        append_action: HeaderAppendAction::OverwriteIfExistsOrAdd as i32,
        ..Default::default()
    }
}

fn deny_response(decision: &Decision, request_id: &str) -> CheckResponse {
    let status = decision.http_status();
    let mut headers = vec![
        set_header("content-type", "application/json".to_string()),
        set_header("cache-control", "no-store".to_string()),
    ];
    let own_challenge = decision
        .response_headers
        .iter()
        .any(|(name, _)| name == "www-authenticate");
    if !own_challenge && let Some(challenge) = www_authenticate(decision) {
        headers.push(set_header("www-authenticate", challenge));
    }
    for (name, value) in &decision.response_headers {
        headers.push(set_header(name, value.clone()));
    }
    let mut body = serde_json::json!({
        "error": decision.code.as_str(),
        "reason": decision.detail,
        "request_id": request_id,
    });
    for (name, value) in &decision.body_fields {
        body[*name] = serde_json::Value::String(value.clone());
    }
    let body = body.to_string();
    CheckResponse {
        status: Some(rpc::Status {
            code: match status {
                401 => RPC_UNAUTHENTICATED,
                429 => RPC_RESOURCE_EXHAUSTED,
                503 => RPC_UNAVAILABLE,
                _ => RPC_PERMISSION_DENIED,
            },
            message: decision.code.as_str().to_string(),
            ..Default::default()
        }),
        http_response: Some(HttpResponse::DeniedResponse(DeniedHttpResponse {
            status: Some(HttpStatus {
                code: i32::from(status),
            }),
            headers,
            body,
        })),
        ..Default::default()
    }
}

/// The RFC 6750 challenge: `invalid_token` for 401s, `insufficient_scope` for a valid
/// identity that no grant matched; none for path or routing denials.
pub fn www_authenticate(decision: &Decision) -> Option<String> {
    let error = match decision.http_status() {
        401 => "invalid_token",
        _ if matches!(
            decision.code,
            ReasonCode::InsufficientScope | ReasonCode::ResourceMismatch
        ) =>
        {
            "insufficient_scope"
        }
        _ => return None,
    };
    Some(format!(
        "Bearer realm=\"portcullis\", error=\"{error}\", error_description=\"{}\"",
        crate::authz::decision::challenge_text(&decision.detail)
    ))
}

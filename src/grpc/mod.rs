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

pub mod http;
pub mod serve;
pub mod service;
pub mod wire;

use std::borrow::Cow;
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
use wire::{CheckRequest, HeaderList, TooManyHeaders, Unreadable, text};

use crate::admin::metrics::{ApiKeyLabels, DecisionLabels, DryRunLabels, Metrics, RouteLabel};
use crate::audit::{AuditEvent, AuditSink};
use crate::authz::{Decision, ReasonCode, RequestView};
use crate::engine::Engine;
use crate::identity::Identity;
use crate::identity::peer::PeerCertificate;

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
        let parts = match RequestParts::from_check(req) {
            Ok(parts) => parts,
            Err(Unreadable::TooManyHeaders(e)) => {
                let request_id = wire::request_id_of(req);
                let decision = self.too_many_headers(e, request_id);
                return deny_response(&decision, request_id);
            }
            Err(Unreadable::NotUtf8(e)) => {
                return self.malformed(&format!("unreadable CheckRequest: {e}"));
            }
        };
        let (decision, engine, parts) = self.decide_parts(parts).await;
        to_response(&decision, &engine, parts.request_id())
    }

    /// Decides one request however it arrived (a CheckRequest, or Envoy's HTTP API), and
    /// records the decision (metrics + audit). Returns what the answer is built from.
    async fn decide_parts<'a>(
        &self,
        parts: RequestParts<'a>,
    ) -> (Decision, Arc<Engine>, RequestParts<'a>) {
        let started = Instant::now();
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
        if view.peer_certificate.is_none() && parts.certificate.is_some_and(|c| !c.is_empty()) {
            // Envoy's principal came from that certificate, and may be a DNS SAN or the
            // subject (see `RequestView::principals`): no principal either.
            view.source_principal = "";
        }
        let (decision, engine) = self
            .decide_view_since(&view, parts.request_id(), started)
            .await;
        (decision, engine, parts)
    }

    /// Decides a request that another front end turned into a `RequestView` (the Envoy
    /// dynamic-module prototype in `bench/module`), and records it (metrics + audit) like a
    /// Check. Returns the decision and the engine that made it (for the answer).
    pub async fn decide_view(
        &self,
        view: &RequestView<'_>,
        request_id: &str,
    ) -> (Decision, Arc<Engine>) {
        self.decide_view_since(view, request_id, Instant::now())
            .await
    }

    async fn decide_view_since(
        &self,
        view: &RequestView<'_>,
        request_id: &str,
        started: Instant,
    ) -> (Decision, Arc<Engine>) {
        let engine = self.engine.load_full();
        // A panic anywhere below must still produce a deny, never a dropped stream.
        let decision = {
            // Boxed: the engine's future is kilobytes (every step a decision may wait on),
            // and each front end boxes its per-request future, which holds this one. Inline,
            // it was copied whole into that box on every request (two ~4 KiB copies per
            // Check, a fifth of the instructions counted, bench/run.sh instructions).
            let fut = futures_util::FutureExt::catch_unwind(std::panic::AssertUnwindSafe(
                Box::pin(engine.check(view)),
            ));
            // One that waits (shared state, a key fetch) is cut at `decision_timeout` from
            // the request's arrival, so Envoy gets an explained deny, and the audit its
            // line, before its own timeout.
            let limit = engine.config.file.server.decision_timeout.get();
            let deadline = || tokio::time::Instant::from_std(started) + limit;
            match crate::listener::within(fut, deadline).await {
                Some(Ok(d)) => d,
                Some(Err(_)) => {
                    Decision::new(ReasonCode::Internal, "internal error while deciding")
                }
                None => Decision::new(
                    ReasonCode::StateUnavailable,
                    format!(
                        "the decision waited longer than `server.decision_timeout` ({}) on \
                         shared state or a key fetch",
                        humantime::format_duration(limit)
                    ),
                ),
            }
        };
        let hops = engine.config.file.network.trusted_proxy_hops;
        let decision = self.record(decision, view, request_id, Some(started.elapsed()), hops);
        (decision, engine)
    }

    /// The explicit deny for a Check that could not be read or decoded (fail closed: a gRPC
    /// error would be an allow under `failure_mode_allow`). Logged, counted and audited
    /// like any other decision.
    pub fn malformed(&self, detail: &str) -> CheckResponse {
        // Nothing of the request could be read: no request id either.
        let (decision, engine) = self.record_malformed(detail, "");
        to_response(&decision, &engine, "")
    }

    /// Logs, counts and audits the refusal of a request with more headers than Portcullis
    /// reads (any front end), and answers the deny (431 `request_header_fields_too_large`).
    /// Its headers are never read, so the audit line names no route or path.
    pub fn too_many_headers(&self, too_many: TooManyHeaders, request_id: &str) -> Decision {
        tracing::warn!(
            headers = too_many.0,
            "refusing a request with too many headers"
        );
        let decision = Decision::new(ReasonCode::RequestHeadersTooLarge, too_many.to_string());
        let parts = RequestParts::default();
        // No address was read: `trusted_hops` 0 writes `client_ip: null` and no `peer_ip`.
        self.record(decision, &parts.view(), request_id, None, 0)
    }

    /// Logs, counts and audits a request that could not be read (either API); `request_id`
    /// is its `x-request-id` when that much was readable (the HTTP API's headers arrive
    /// before its body), so the audit line can be matched with Envoy's access log.
    fn record_malformed(&self, detail: &str, request_id: &str) -> (Decision, Arc<Engine>) {
        tracing::warn!(detail, "refusing a malformed authorization request");
        let engine = self.engine.load_full();
        let decision = Decision::new(ReasonCode::Internal, detail.to_string());
        let parts = RequestParts::default();
        let decision = self.record(decision, &parts.view(), request_id, None, 0);
        (decision, engine)
    }

    /// Audits and counts a decision, and answers the decision that stands: `decision`, or,
    /// when the audit log is stuck and refused its record, an `audit_unavailable` deny (no
    /// allow goes unlogged; the deny is counted, not audited).
    fn record(
        &self,
        decision: Decision,
        view: &RequestView<'_>,
        request_id: &str,
        elapsed: Option<std::time::Duration>,
        trusted_hops: u32,
    ) -> Decision {
        let recorded = self.audit.record(AuditEvent::new(
            &decision,
            view,
            request_id,
            elapsed.unwrap_or_default(),
            trusted_hops,
        ));
        let decision = if recorded {
            decision
        } else {
            Decision::new(
                ReasonCode::AuditUnavailable,
                "the decision could not be recorded: the audit log is stuck",
            )
            .with_route(decision.route)
        };
        let result = if decision.is_allow() { "allow" } else { "deny" };
        self.metrics
            .decisions
            .get_or_create(&DecisionLabels {
                result,
                status: decision.http_status(),
                reason: decision.code.as_str(),
                route: RouteLabel(decision.route.clone()),
            })
            .inc();
        if let Some(key_id) = decision.identity.as_deref().and_then(|i| i.api_key_id()) {
            self.metrics
                .api_key_decisions
                .get_or_create(&ApiKeyLabels {
                    key_id: key_id.to_string(),
                    result,
                    reason: decision.code.as_str(),
                })
                .inc();
        }
        if let Some(would) = decision.dry_run.as_deref() {
            self.metrics
                .dry_run_decisions
                .get_or_create(&DryRunLabels {
                    live: result,
                    result: if would.is_allow() { "allow" } else { "deny" },
                    reason: would.code.as_str(),
                    route: RouteLabel(would.route.clone()),
                })
                .inc();
        }
        // A request refused before anything was decided (unreadable, too many headers) is
        // counted above but not timed: a 0 would pull the histogram's quantiles down.
        if let Some(elapsed) = elapsed {
            self.metrics.decision_seconds.observe(elapsed.as_secs_f64());
        }
        decision
    }
}

/// The request headers, plus, when Envoy sent the request body (`with_request_body`), the
/// body's SHA-256 under an internal pseudo-header (approvals bind to it). A client can never
/// send a header starting with `:`, and any such entry is replaced or removed anyway.
fn request_headers(http: &wire::HttpRequest) -> Result<HeaderList<'_>, Unreadable> {
    let mut headers = HeaderList::from_http(http)?;
    // The body is only hashed: its bytes as Envoy sent them, UTF-8 or not.
    let body: &[u8] = if http.raw_body.is_empty() {
        &http.body
    } else {
        &http.raw_body
    };
    set_body_digest(&mut headers, body);
    Ok(headers)
}

/// Records the body's SHA-256 under the internal pseudo-header approvals bind to, or removes
/// any entry of that name when there is no body.
fn set_body_digest(headers: &mut HeaderList<'_>, body: &[u8]) {
    use crate::approvals::BODY_SHA256_HEADER;
    if !body.is_empty() || crate::authz::Headers::entry(headers, BODY_SHA256_HEADER).is_some() {
        let digest = (!body.is_empty()).then(|| crate::approvals::sha256_hex(body));
        headers.set(BODY_SHA256_HEADER, digest);
    }
}

/// The parts of a request the core needs, borrowed from a CheckRequest or from the request
/// of Envoy's HTTP API (`http`).
#[derive(Default)]
struct RequestParts<'a> {
    method: &'a str,
    /// The `:authority`; empty when the request carried none.
    host: &'a str,
    path: &'a str,
    scheme: &'a str,
    /// Envoy's stream id, the request id when there is no `x-request-id`.
    stream_id: &'a str,
    headers: HeaderList<'a>,
    source_ip: Option<IpAddr>,
    principal: &'a str,
    certificate: Option<&'a str>,
}

impl<'a> RequestParts<'a> {
    /// The parts of a decoded CheckRequest; a text field the decision reads that is not
    /// UTF-8, or more headers than a request may carry, makes it unreadable.
    fn from_check(req: &'a CheckRequest) -> Result<Self, Unreadable> {
        let attrs = req.attributes.as_ref();
        let http = attrs
            .and_then(|a| a.request.as_ref())
            .and_then(|r| r.http.as_ref());
        let source = attrs.and_then(|a| a.source.as_ref());
        let source_ip = match source
            .and_then(|s| s.address.as_ref())
            .and_then(|a| a.socket_address.as_ref())
        {
            Some(sa) => text("attributes.source.address", &sa.address)?
                .parse::<IpAddr>()
                .ok(),
            None => None,
        };
        let field = |name: &'static str, pick: fn(&'a wire::HttpRequest) -> &'a bytes::Bytes| {
            http.map_or(Ok(""), |h| text(name, pick(h)))
        };
        Ok(Self {
            method: field("attributes.request.http.method", |h| &h.method)?,
            host: field("attributes.request.http.host", |h| &h.host)?,
            path: field("attributes.request.http.path", |h| &h.path)?,
            scheme: field("attributes.request.http.scheme", |h| &h.scheme)?,
            stream_id: field("attributes.request.http.id", |h| &h.id)?,
            headers: http.map(request_headers).transpose()?.unwrap_or_default(),
            source_ip,
            principal: source.map_or(Ok(""), |s| {
                text("attributes.source.principal", &s.principal)
            })?,
            certificate: source
                .map(|s| text("attributes.source.certificate", &s.certificate))
                .transpose()?,
        })
    }

    fn header(&self, name: &str) -> Option<&str> {
        crate::authz::Headers::entry(&self.headers, name).map(|(_, v)| v)
    }

    /// Envoy's `x-request-id`, else the stream id Envoy reports.
    fn request_id(&self) -> &str {
        self.header("x-request-id").unwrap_or(self.stream_id)
    }

    fn view(&self) -> RequestView<'_> {
        // Envoy sends the `:authority` as `host`; fall back to the header for older Envoys.
        let host = Some(self.host)
            .filter(|h| !h.is_empty())
            .or_else(|| self.header(":authority"))
            .unwrap_or_default();
        RequestView {
            method: self.method,
            host,
            path: self.path,
            headers: &self.headers,
            source_ip: self.source_ip,
            source_principal: self.principal,
            scheme: self.scheme,
            peer_certificate: None,
        }
    }
}

/// Turns a decision into Envoy's answer.
pub fn to_response(decision: &Decision, engine: &Engine, request_id: &str) -> CheckResponse {
    if decision.is_allow() {
        allow_response(decision, engine)
    } else {
        deny_response(decision, request_id)
    }
}

/// What an allow changes in the request the upstream receives, whichever API carries it.
pub struct UpstreamMutation {
    /// Identity headers to set, overwriting any copy the client sent.
    pub set: Vec<(String, String)>,
    /// Headers to remove: identity headers without a value, and credentials when
    /// `strip_authorization` is on.
    pub remove: Vec<String>,
}

impl UpstreamMutation {
    pub fn of(identity: Option<&Identity>, engine: &Engine) -> Self {
        let upstream = &engine.config.file.upstream;
        let mut set = Vec::new();
        let mut remove = Vec::new();
        // Each identity header is either overwritten with our value or removed, so a copy the
        // client sent never reaches the upstream, whatever order Envoy applies the two lists in.
        for (name, claim) in &upstream.identity_headers {
            match identity.and_then(|id| identity_header_value(id, claim)) {
                Some(value) => set.push((name.clone(), value)),
                None => remove.push(name.clone()),
            }
        }
        if upstream.strip_authorization {
            remove.extend(engine.config.credential_headers.iter().cloned());
        }
        Self { set, remove }
    }
}

fn allow_response(decision: &Decision, engine: &Engine) -> CheckResponse {
    let mutation = UpstreamMutation::of(decision.identity.as_deref(), engine);
    CheckResponse {
        status: Some(rpc::Status {
            code: RPC_OK,
            ..Default::default()
        }),
        http_response: Some(HttpResponse::OkResponse(OkHttpResponse {
            headers: mutation
                .set
                .into_iter()
                .map(|(name, value)| header_option(name, value))
                .collect(),
            headers_to_remove: mutation.remove,
            // Quota left (RateLimit fields), appended to the upstream's response: an upstream
            // that reports its own limits keeps its items in the same list.
            response_headers_to_add: decision
                .response_headers
                .iter()
                .map(|(name, value)| HeaderValueOption {
                    append_action: HeaderAppendAction::AppendIfExistsOrAdd as i32,
                    ..header_option(name.to_string(), value.clone())
                })
                .collect(),
            ..Default::default()
        })),
        ..Default::default()
    }
}

/// The header value for a claim: strings as they are, lists joined with a space (the `scope`
/// convention), numbers and booleans as JSON. Values with control characters, or with a
/// space at either end, are dropped (the header is removed): HTTP parsers trim edge spaces
/// (RFC 9110 5.5), so `" alice "`, granted as itself, would reach the upstream as `alice`.
/// So is a list that a space cannot join faithfully: an entry with whitespace in it
/// (`["orders:read", "orders:write admin"]`, whose entries are decided on whole, would read
/// as three scopes upstream), an empty entry, or one that is not a string.
fn identity_header_value(identity: &Identity, claim: &str) -> Option<String> {
    let value = identity.claim(claim)?;
    let text = match value {
        serde_json::Value::String(s) => s.clone(),
        serde_json::Value::Array(items) => items
            .iter()
            .map(|item| {
                item.as_str()
                    .filter(|s| !s.is_empty() && !s.chars().any(char::is_whitespace))
            })
            .collect::<Option<Vec<&str>>>()?
            .join(" "),
        serde_json::Value::Number(n) => n.to_string(),
        serde_json::Value::Bool(b) => b.to_string(),
        _ => return None,
    };
    let faithful = !text.is_empty()
        && !text.starts_with(' ')
        && !text.ends_with(' ')
        && !text.chars().any(|c| c.is_control());
    faithful.then_some(text)
}

/// A header Envoy sets, overwriting any copy of it.
fn header_option(key: String, value: String) -> HeaderValueOption {
    HeaderValueOption {
        header: Some(HeaderValue {
            key,
            value,
            ..Default::default()
        }),
        append_action: HeaderAppendAction::OverwriteIfExistsOrAdd as i32,
        ..Default::default()
    }
}

/// What the client receives on a deny, whichever API carries it.
pub struct DenyAnswer {
    pub status: u16,
    pub headers: Vec<(Cow<'static, str>, String)>,
    /// `{"error", "reason", "request_id", ...}` as JSON.
    pub body: String,
}

impl DenyAnswer {
    pub fn of(decision: &Decision, request_id: &str) -> Self {
        let mut headers = vec![
            ("content-type".into(), "application/json".to_string()),
            ("cache-control".into(), "no-store".to_string()),
        ];
        let own_challenge = decision
            .response_headers
            .iter()
            .any(|(name, _)| name == "www-authenticate");
        if !own_challenge && let Some(challenge) = www_authenticate(decision) {
            headers.push(("www-authenticate".into(), challenge));
        }
        headers.extend(decision.response_headers.iter().cloned());
        let mut body = serde_json::json!({
            "error": decision.code.as_str(),
            "reason": decision.detail,
            "request_id": request_id,
        });
        for (name, value) in &decision.body_fields {
            body[*name] = serde_json::Value::String(value.clone());
        }
        Self {
            status: decision.http_status(),
            headers,
            body: body.to_string(),
        }
    }
}

fn deny_response(decision: &Decision, request_id: &str) -> CheckResponse {
    let answer = DenyAnswer::of(decision, request_id);
    CheckResponse {
        status: Some(rpc::Status {
            code: match answer.status {
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
                code: i32::from(answer.status),
            }),
            headers: answer
                .headers
                .into_iter()
                .map(|(name, value)| header_option(name.into_owned(), value))
                .collect(),
            body: answer.body,
        })),
        ..Default::default()
    }
}

use crate::authz::decision::REALM;

/// The RFC 6750 challenge: bare when no credential was sent, `invalid_token` for other 401s,
/// `insufficient_scope` for a valid identity that no grant matched; none for path or routing
/// denials.
/// The `WWW-Authenticate` a deny carries: its own (DPoP, API key), else the default one.
pub fn challenge(decision: &Decision) -> Option<String> {
    decision
        .response_headers
        .iter()
        .find(|(name, _)| name == "www-authenticate")
        .map(|(_, v)| v.clone())
        .or_else(|| www_authenticate(decision))
}

pub fn www_authenticate(decision: &Decision) -> Option<String> {
    // RFC 6750 3.1: a request that carried no credential at all gets the bare challenge, no
    // error code or description (the JSON body still says `credential_missing` and why).
    if decision.code == ReasonCode::CredentialMissing {
        return Some(format!("Bearer realm=\"{REALM}\""));
    }
    // A caller known by an API key (revoked, say, or outside its endpoints) is not asked for
    // a Bearer token: its challenge is `ApiKey`, with RFC 6750's error codes.
    if decision
        .identity
        .as_deref()
        .is_some_and(|i| i.api_key_id().is_some())
    {
        let error = match decision.code {
            _ if decision.http_status() == 401 => "invalid_key",
            ReasonCode::InsufficientScope | ReasonCode::ResourceMismatch => "insufficient_scope",
            _ => return None,
        };
        return Some(crate::authz::decision::api_key_challenge_with(
            error,
            &decision.detail,
        ));
    }
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
        "Bearer realm=\"{REALM}\", error=\"{error}\", error_description=\"{}\"",
        crate::authz::decision::challenge_text(&decision.detail)
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An audit output that never takes a write (a stdout nobody reads).
    struct Stuck;

    impl std::io::Write for Stuck {
        fn write(&mut self, _: &[u8]) -> std::io::Result<usize> {
            loop {
                std::thread::park();
            }
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[tokio::test]
    async fn a_decision_the_stuck_audit_log_cannot_take_is_an_explicit_deny() {
        let metrics = Arc::new(Metrics::new());
        let engine = crate::engine::tests::shipped_engine("", &metrics);
        let engine = Arc::new(ArcSwap::from_pointee(engine));
        let audit = AuditSink::to_writer(|| Stuck).unwrap();
        let service = AuthzService::new(engine.clone(), metrics.clone(), audit);
        let headers = std::collections::HashMap::new();
        let view = crate::engine::tests::healthz(&headers);
        // The public route is allowed while the audit buffer takes records...
        let started = Instant::now();
        let mut allowed = 0u32;
        let denied = loop {
            let (d, _) = service.decide_view(&view, "req-1").await;
            if !d.is_allow() {
                break d;
            }
            allowed += 1;
            assert!(started.elapsed() < std::time::Duration::from_secs(120));
        };
        // ...and once it is full and the writer stuck, denied with a 503 that says why.
        assert!(allowed > 10_000, "{allowed}");
        assert_eq!(denied.code, ReasonCode::AuditUnavailable, "{denied:?}");
        assert_eq!(denied.http_status(), 503);
        let answer = to_response(&denied, &engine.load(), "req-1");
        let status = answer.status.unwrap();
        assert_ne!(status.code, RPC_OK);
        match answer.http_response {
            Some(HttpResponse::DeniedResponse(d)) => {
                assert_eq!(d.status.unwrap().code, 503);
            }
            other => panic!("not a denied response: {other:?}"),
        }
        let (d, _) = service.decide_view(&view, "req-2").await;
        assert_eq!(d.code, ReasonCode::AuditUnavailable);
        let counted = metrics
            .decisions
            .get_or_create(&DecisionLabels {
                result: "deny",
                status: 503,
                reason: "audit_unavailable",
                route: RouteLabel(Some("healthz".into())),
            })
            .get();
        assert_eq!(counted, 2);
    }

    /// A decision stuck on shared state (here a rate-limit bucket that never answers) is cut
    /// at `server.decision_timeout`: an explained 503, counted (and audited) like any other,
    /// before Envoy's own timeout would have answered a bare 403 with no audit line.
    #[tokio::test]
    async fn a_decision_waiting_past_decision_timeout_is_an_explained_503() {
        let metrics = Arc::new(Metrics::new());
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("config/portcullis.yaml");
        let text = std::fs::read_to_string(&path).unwrap().replacen(
            "server:\n",
            "server:\n  decision_timeout: 50ms\n",
            1,
        );
        let config = Arc::new(crate::config::from_str(&text, &path).unwrap());
        let keys = Arc::new(crate::server::key_store(&config, metrics.clone()));
        let store = Arc::new(crate::state::testing::TestStore {
            rate_check: crate::state::testing::Gate::after(0),
            ..crate::state::testing::TestStore::default()
        });
        let engine = Engine::new(config, keys, store, metrics.clone());
        engine.keys.start().await;
        let token = crate::engine::tests::dev_token(&engine, "alice", &[], &["orders:write"]);
        let service = AuthzService::new(
            Arc::new(ArcSwap::from_pointee(engine)),
            metrics.clone(),
            AuditSink::to_writer(std::io::sink).unwrap(),
        );
        let headers = crate::engine::tests::bearer(&token);
        let view = crate::engine::tests::request("POST", "/orders", &headers);
        let started = Instant::now();
        // Without the deadline the decision waits on the bucket for good.
        let (d, _) = tokio::time::timeout(
            std::time::Duration::from_secs(5),
            service.decide_view(&view, "req-1"),
        )
        .await
        .expect("answered within decision_timeout, not left waiting");
        let took = started.elapsed();
        assert_eq!(d.code, ReasonCode::StateUnavailable, "{d:?}");
        assert_eq!(d.http_status(), 503);
        assert!(
            d.detail.contains("`server.decision_timeout` (50ms)"),
            "{}",
            d.detail
        );
        assert!(
            took >= std::time::Duration::from_millis(50)
                && took < std::time::Duration::from_secs(2),
            "{took:?}"
        );
        let counted = metrics
            .decisions
            .get_or_create(&DecisionLabels {
                result: "deny",
                status: 503,
                reason: "state_unavailable",
                route: RouteLabel(None),
            })
            .get();
        assert_eq!(counted, 1);
    }

    /// A request of the HTTP API whose body cannot be read is an explicit deny, audited with
    /// the `x-request-id` its headers carried (the line said `request_id: ""`, so it could not
    /// be matched with Envoy's access log).
    #[tokio::test]
    async fn an_unreadable_http_request_is_audited_with_its_request_id() {
        let metrics = Arc::new(Metrics::new());
        let engine = crate::engine::tests::shipped_engine("", &metrics);
        let engine = Arc::new(ArcSwap::from_pointee(engine));
        let captured = crate::audit::Captured::new();
        let audit = captured.sink.clone();
        let service = Arc::new(AuthzService::new(engine, metrics, audit.clone()));
        let authorizer = http::HttpAuthorizer::new(service);
        let body = http_body_util::Full::new(bytes::Bytes::from(vec![b'x'; 5 << 20]));
        let request = hyper::Request::post("/healthz")
            .header("x-request-id", "req-too-big")
            .body(body)
            .unwrap();
        let answer = authorizer.answer(request).await;
        assert_eq!(answer.status(), hyper::StatusCode::FORBIDDEN);
        let text = captured.text();
        let line: serde_json::Value = serde_json::from_str(text.trim_end()).unwrap();
        assert_eq!(line["request_id"], "req-too-big", "{line}");
        assert_eq!(
            line["detail"], "request body unreadable or over 4 MiB",
            "{line}"
        );
    }

    /// Decides `view` through `service` and answers its reason code, HTTP status and every
    /// `www-authenticate` header value of the deny answer.
    async fn challenges(
        service: &AuthzService,
        view: &RequestView<'_>,
    ) -> (ReasonCode, u16, Vec<String>) {
        let (d, _) = service.decide_view(view, "req").await;
        let answer = DenyAnswer::of(&d, "req");
        let found = answer
            .headers
            .into_iter()
            .filter(|(n, _)| n == "www-authenticate")
            .map(|(_, v)| v)
            .collect();
        (d.code, answer.status, found)
    }

    /// The README's answer contract for API keys: a client that presented only API keys is
    /// challenged with `ApiKey` (a key outside its endpoints with `insufficient_scope`, a
    /// key in the query or two keys with `invalid_key`), one that also sent a token with
    /// `Bearer`. These got no challenge (the 403) or a Bearer one.
    #[tokio::test]
    async fn api_key_answers_carry_the_challenges_of_the_answer_contract() {
        const KEY: &str = "pck_5AEWWjqRmg8M1focDlwcCo0V_eMw631tr23y0JSA0bM";
        let metrics = Arc::new(Metrics::new());
        let engine = crate::engine::tests::shipped_engine("", &metrics);
        let engine = Arc::new(ArcSwap::from_pointee(engine));
        let service = AuthzService::new(engine.clone(), metrics, AuditSink::disabled());
        let answer = |method: &'static str, path: &'static str, headers: &[(&str, &str)]| {
            let headers: std::collections::HashMap<String, String> = headers
                .iter()
                .map(|(n, v)| (n.to_string(), v.to_string()))
                .collect();
            let service = &service;
            async move {
                let view = RequestView {
                    method,
                    path,
                    ..crate::engine::tests::healthz(&headers)
                };
                challenges(service, &view).await
            }
        };
        // The key works on its own endpoint.
        let (code, ..) = answer("GET", "/orders/42", &[("x-api-key", KEY)]).await;
        assert_eq!(code, ReasonCode::Allowed);
        // Outside its endpoints: 403 with the key's own challenge.
        let (code, status, found) = answer("POST", "/orders", &[("x-api-key", KEY)]).await;
        assert_eq!((code, status), (ReasonCode::InsufficientScope, 403));
        assert_eq!(found.len(), 1, "{found:?}");
        assert!(
            found[0].starts_with("ApiKey realm=\"portcullis\", error=\"insufficient_scope\""),
            "{found:?}"
        );
        // A key in the URL query.
        let url_key = Box::leak(format!("/orders/42?api_key={KEY}").into_boxed_str());
        let (code, status, found) = answer("GET", url_key, &[]).await;
        assert_eq!((code, status), (ReasonCode::InvalidToken, 401));
        assert_eq!(found.len(), 1, "{found:?}");
        assert!(
            found[0].starts_with("ApiKey realm=\"portcullis\", error=\"invalid_key\""),
            "{found:?}"
        );
        // Two keys: in two headers (joined by Envoy), or in the header and the query.
        let two = Box::leak(format!("{KEY}, {KEY}").into_boxed_str());
        let in_query = Box::leak(format!("/orders/42?api_key={KEY}").into_boxed_str());
        for (path, headers) in [
            ("/orders/42", vec![("x-api-key", &*two)]),
            (&*in_query, vec![("x-api-key", KEY)]),
        ] {
            let (code, status, found) = answer("GET", path, &headers).await;
            assert_eq!((code, status), (ReasonCode::MultipleCredentials, 401));
            assert_eq!(found.len(), 1, "{found:?}");
            assert!(
                found[0].starts_with("ApiKey realm=\"portcullis\", error=\"invalid_key\""),
                "{found:?}"
            );
        }
        // An empty key header.
        let (code, status, found) = answer("GET", "/orders/42", &[("x-api-key", "")]).await;
        assert_eq!((code, status), (ReasonCode::InvalidToken, 401));
        assert!(
            found[0].starts_with("ApiKey realm=\"portcullis\", error=\"invalid_key\""),
            "{found:?}"
        );
        // A key and a bearer token: the token's challenge, as before.
        let (code, status, found) = answer(
            "GET",
            "/orders/42",
            &[("x-api-key", KEY), ("authorization", "Bearer x.y.z")],
        )
        .await;
        assert_eq!((code, status), (ReasonCode::MultipleCredentials, 401));
        assert!(
            found[0].starts_with("Bearer realm=\"portcullis\", error=\"invalid_token\""),
            "{found:?}"
        );
    }

    #[tokio::test]
    async fn an_api_key_caller_is_challenged_for_an_api_key_not_a_bearer_token() {
        let metrics = Arc::new(Metrics::new());
        let engine = crate::engine::tests::shipped_engine("", &metrics);
        let engine = Arc::new(ArcSwap::from_pointee(engine));
        let service = AuthzService::new(engine.clone(), metrics, AuditSink::disabled());
        let challenge = |key: &str| {
            let headers: std::collections::HashMap<String, String> = (!key.is_empty())
                .then(|| ("x-api-key".to_string(), key.to_string()))
                .into_iter()
                .collect();
            let service = &service;
            async move {
                let view = RequestView {
                    path: "/orders/42",
                    ..crate::engine::tests::healthz(&headers)
                };
                challenges(service, &view).await
            }
        };
        // No credential where API keys are configured: both schemes are offered, bare.
        let (code, status, found) = challenge("").await;
        assert_eq!((code, status), (ReasonCode::CredentialMissing, 401));
        assert_eq!(
            found,
            vec!["Bearer realm=\"portcullis\", ApiKey realm=\"portcullis\"".to_string()]
        );
        // An unknown key.
        let (code, status, found) = challenge("pck_not-a-key-000000000000000000000000000000").await;
        assert_eq!((code, status), (ReasonCode::InvalidToken, 401));
        assert_eq!(found.len(), 1, "{found:?}");
        assert!(
            found[0].starts_with("ApiKey realm=\"portcullis\", error=\"invalid_key\""),
            "{found:?}"
        );
        // A valid key whose owner was revoked.
        engine
            .load()
            .runtime_revoked
            .apply("sub:reporting", Some(i64::MAX));
        let (code, status, found) =
            challenge("pck_5AEWWjqRmg8M1focDlwcCo0V_eMw631tr23y0JSA0bM").await;
        assert_eq!((code, status), (ReasonCode::Revoked, 401));
        assert_eq!(found.len(), 1, "{found:?}");
        assert!(
            found[0].starts_with("ApiKey realm=\"portcullis\""),
            "{found:?}"
        );
    }

    /// Only the schemes the route's rules take are offered: `POST /orders` takes tokens
    /// only, so a client is not sent for an API key there (it was, wherever keys were
    /// configured), while `GET /orders/{id}`, whose rules take both, offers both.
    #[tokio::test]
    async fn a_request_without_a_credential_is_offered_what_its_route_takes() {
        let metrics = Arc::new(Metrics::new());
        let engine = crate::engine::tests::shipped_engine("", &metrics);
        let engine = Arc::new(ArcSwap::from_pointee(engine));
        let service = AuthzService::new(engine, metrics, AuditSink::disabled());
        let headers = std::collections::HashMap::new();
        let create = RequestView {
            method: "POST",
            path: "/orders",
            ..crate::engine::tests::healthz(&headers)
        };
        let (code, status, found) = challenges(&service, &create).await;
        assert_eq!((code, status), (ReasonCode::CredentialMissing, 401));
        assert_eq!(found, vec!["Bearer realm=\"portcullis\"".to_string()]);
        let read = RequestView {
            path: "/orders/42",
            ..crate::engine::tests::healthz(&headers)
        };
        let (_, _, found) = challenges(&service, &read).await;
        assert_eq!(
            found,
            vec!["Bearer realm=\"portcullis\", ApiKey realm=\"portcullis\"".to_string()]
        );
    }

    /// A CheckRequest whose headers are `h0000`.. (`n` of them) and `x-request-id: rid`.
    fn check_with_headers(n: usize) -> CheckRequest {
        let mut headers: Vec<wire::MapEntry> = (0..n)
            .map(|i| wire::MapEntry {
                key: format!("h{i:04}").into(),
                value: "v".into(),
            })
            .collect();
        headers.push(wire::MapEntry {
            key: "x-request-id".into(),
            value: "rid".into(),
        });
        CheckRequest {
            attributes: Some(wire::AttributeContext {
                request: Some(wire::Request {
                    http: Some(wire::HttpRequest {
                        method: "GET".into(),
                        path: "/healthz".into(),
                        host: "localhost".into(),
                        headers,
                        ..Default::default()
                    }),
                }),
                ..Default::default()
            }),
        }
    }

    #[tokio::test]
    async fn a_check_with_more_headers_than_a_request_may_carry_is_refused_with_431() {
        let metrics = Arc::new(Metrics::new());
        let engine = crate::engine::tests::shipped_engine("", &metrics);
        let engine = Arc::new(ArcSwap::from_pointee(engine));
        let service = AuthzService::new(engine, metrics.clone(), AuditSink::disabled());
        // As many as a request may carry: decided as usual (the public health route).
        let at_cap = service
            .decide(&check_with_headers(wire::MAX_REQUEST_HEADERS - 1))
            .await;
        assert_eq!(
            at_cap.status.unwrap().code,
            RPC_OK,
            "{:?}",
            at_cap.http_response
        );
        // One more: an explicit deny that says why, with the request id.
        let over = service
            .decide(&check_with_headers(wire::MAX_REQUEST_HEADERS))
            .await;
        let status = over.status.unwrap();
        assert_eq!(status.code, RPC_PERMISSION_DENIED);
        assert_eq!(status.message, "request_header_fields_too_large");
        let Some(HttpResponse::DeniedResponse(denied)) = over.http_response else {
            panic!("not a denied response");
        };
        assert_eq!(denied.status.unwrap().code, 431);
        let body: serde_json::Value = serde_json::from_str(&denied.body).unwrap();
        assert_eq!(body["error"], "request_header_fields_too_large");
        assert_eq!(body["request_id"], "rid");
        let reason = body["reason"].as_str().unwrap();
        assert!(
            reason.contains("1001 headers, more than the 1000"),
            "{reason}"
        );
        let counted = metrics
            .decisions
            .get_or_create(&DecisionLabels {
                result: "deny",
                status: 431,
                reason: "request_header_fields_too_large",
                route: RouteLabel(None),
            })
            .get();
        assert_eq!(counted, 1);
    }
}

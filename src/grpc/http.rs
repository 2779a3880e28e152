//! Envoy's HTTP ext_authz API (`http_service`), on its own listener (`server.http_listen`).
//!
//! Envoy sends each request it checks as an HTTP request to Portcullis: the original
//! method, `:path` and `:authority`, the headers its `allowed_headers` lets through, and
//! the body with `with_request_body`. Portcullis decides it exactly as a CheckRequest and
//! answers:
//! - allow: `200`, the identity headers (Envoy copies the names its
//!   `allowed_upstream_headers` lists onto the upstream request, overwriting a client's
//!   copy), and `x-envoy-auth-headers-to-remove` naming every identity header without a
//!   value, `x-portcullis-source-address`, and the credentials under
//!   `strip_authorization`, so a spoofed copy never reaches the upstream;
//! - deny: the decision's status, JSON body and headers (challenge, `RateLimit`), which
//!   Envoy passes to the client.
//!
//! What this API cannot carry, and how that stays closed:
//! - Envoy treats a 5xx from the authorization server as the server failing, which
//!   `failure_mode_allow` turns into an allow; so a deny is never a 5xx here. The 503s
//!   (`state_unavailable`, `audit_unavailable`) are answered as 403 with the same body.
//! - There is no peer address: the client address is the `x-portcullis-source-address`
//!   header Envoy adds (`headers_to_add` with `%DOWNSTREAM_DIRECT_REMOTE_ADDRESS_WITHOUT_PORT%`,
//!   which overwrites any copy a client sent). Without it (or unparsable), network
//!   conditions deny.
//! - There is no peer certificate or principal: principal rules and certificate-bound
//!   tokens deny.
//! - The scheme (DPoP `htu`) is `x-forwarded-proto`, which Envoy sets at the edge.
//! - A request that cannot be read is an explicit 403 deny, never a reset.

use std::borrow::Cow;
use std::convert::Infallible;
use std::io;
use std::net::IpAddr;
use std::sync::Arc;

use bytes::Bytes;
use futures_util::{FutureExt, Stream};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::watch;

use crate::listener::{ConnPermit, H1_HEADER_READ_TIMEOUT, Marked, accept_loop};
use tonic::codegen::{BoxFuture, http};

use super::wire::{HeaderList, TooManyHeaders};
use super::{AuthzService, DenyAnswer, RequestParts, UpstreamMutation, set_body_digest};
use crate::authz::Decision;
use crate::engine::Engine;

/// The header Envoy adds with the downstream client's address (no port).
pub const SOURCE_ADDRESS_HEADER: &str = "x-portcullis-source-address";

/// The header that tells Envoy which request headers to remove on an allow.
pub const HEADERS_TO_REMOVE: &str = "x-envoy-auth-headers-to-remove";

/// The largest request body accepted (as on the gRPC API).
const MAX_BODY_BYTES: usize = 4 * 1024 * 1024;

/// Largest HTTP/2 header list accepted: above the 60 KiB Envoy forwards by default.
const MAX_HEADER_LIST_BYTES: u32 = 96 * 1024;

type Response = http::Response<Full<Bytes>>;

/// The HTTP authorization service: one `AuthzService` shared with the gRPC listener, so
/// both answer from the same engine, metrics and audit log.
#[derive(Clone)]
pub struct HttpAuthorizer {
    inner: Arc<AuthzService>,
}

impl HttpAuthorizer {
    pub fn new(inner: Arc<AuthzService>) -> Self {
        Self { inner }
    }

    /// Decides one request of Envoy's HTTP API.
    pub async fn answer<B>(&self, req: http::Request<B>) -> Response
    where
        B: http_body::Body<Data = bytes::Bytes>,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let (head, body) = req.into_parts();
        // Read from the head only where the request itself cannot be: the headers are there
        // before the body.
        let readable_request_id = || {
            head.headers
                .get("x-request-id")
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
        };
        let body = match crate::listener::read_body(body, MAX_BODY_BYTES).await {
            Ok(bytes) => bytes,
            Err(e) => {
                let detail = match e {
                    crate::listener::BodyError::TooLarge
                    | crate::listener::BodyError::Unreadable => {
                        "request body unreadable or over 4 MiB"
                    }
                    other => other.describe(),
                };
                let request_id = readable_request_id();
                let (decision, _) = self.inner.record_malformed(detail, request_id);
                return deny(&decision, request_id);
            }
        };
        let parts = match request_parts(&head, &body) {
            Ok(parts) => parts,
            Err(too_many) => {
                let request_id = readable_request_id();
                let decision = self.inner.too_many_headers(too_many, request_id);
                return deny(&decision, request_id);
            }
        };
        let (decision, engine, parts) = self.inner.decide_parts(parts).await;
        if decision.is_allow() {
            allow(&decision, &engine)
        } else {
            let mut answer = deny(&decision, parts.request_id());
            if head.method == http::Method::HEAD {
                // An answer to HEAD has no body, so no length of one either.
                *answer.body_mut() = Full::new(Bytes::new());
            }
            answer
        }
    }
}

impl hyper::service::Service<http::Request<Incoming>> for HttpAuthorizer {
    type Response = Response;
    type Error = Infallible;
    type Future = BoxFuture<Response, Infallible>;

    fn call(&self, req: http::Request<Incoming>) -> Self::Future {
        let this = self.clone();
        Box::pin(async move {
            // A panic anywhere in reading, deciding or answering is still an explicit 403: a
            // reset stream is an error to Envoy, an allow under `failure_mode_allow`.
            let answer = std::panic::AssertUnwindSafe(this.answer(req))
                .catch_unwind()
                .await;
            Ok(answer.unwrap_or_else(|_| {
                let (decision, _) = this
                    .inner
                    .record_malformed("internal error while answering the request", "");
                deny(&decision, "")
            }))
        })
    }
}

/// The request Envoy asked about, borrowed from the HTTP request that carries it; `Err` when
/// it carries more headers than a request may.
fn request_parts<'a>(
    head: &'a http::request::Parts,
    body: &[u8],
) -> Result<RequestParts<'a>, TooManyHeaders> {
    TooManyHeaders::check(head.headers.len())?;
    let mut pairs = Vec::with_capacity(head.headers.len());
    for (name, value) in &head.headers {
        let bytes = value.as_bytes();
        let value = match std::str::from_utf8(bytes) {
            Ok(text) => Cow::Borrowed(text),
            // A value that is not UTF-8 can match nothing a policy names; the replacement
            // characters keep it from matching by accident.
            Err(_) => String::from_utf8_lossy(bytes),
        };
        pairs.push((name.as_str(), value));
    }
    let mut headers = HeaderList::from_pairs(pairs);
    set_body_digest(&mut headers, body);
    let header = |name: &str| head.headers.get(name).and_then(|v| v.to_str().ok());
    // HTTP/2 carries the original `:authority`; HTTP/1.1 the `Host` header.
    let host = head
        .uri
        .authority()
        .map(|a| a.as_str())
        .or_else(|| header("host"))
        .unwrap_or_default();
    let path = head
        .uri
        .path_and_query()
        .map_or_else(|| head.uri.path(), |p| p.as_str());
    let scheme = forwarded_scheme(header("x-forwarded-proto")).unwrap_or_default();
    // One value only: two copies (joined by `,`) parse as no address, and network
    // conditions deny.
    let source_ip = source_address(&headers);
    Ok(RequestParts {
        method: head.method.as_str(),
        host,
        path,
        scheme,
        stream_id: "",
        headers,
        source_ip,
        principal: "",
        certificate: None,
    })
}

fn source_address(headers: &HeaderList<'_>) -> Option<IpAddr> {
    let value = crate::authz::Headers::entry(headers, SOURCE_ADDRESS_HEADER)?
        .1
        .trim();
    let bare = value
        .strip_prefix('[')
        .and_then(|v| v.strip_suffix(']'))
        .unwrap_or(value);
    bare.parse().ok()
}

/// `200` with the identity headers to set, the names Envoy must remove, and the headers for
/// the client's response (Envoy passes those named in `allowed_client_headers_on_success`).
fn allow(decision: &Decision, engine: &Engine) -> Response {
    let UpstreamMutation { set, mut remove } =
        UpstreamMutation::of(decision.identity.as_deref(), engine);
    // Envoy adds its copy to our request only; a copy the client sent stays in the upstream
    // request, where it could pass for ours.
    remove.push(SOURCE_ADDRESS_HEADER.to_string());
    let mut response = http::Response::new(Full::new(Bytes::new()));
    let headers = response.headers_mut();
    for (name, value) in set {
        match (
            http::HeaderName::from_bytes(name.as_bytes()),
            http::HeaderValue::from_str(&value),
        ) {
            (Ok(name), Ok(value)) => {
                headers.insert(name, value);
            }
            // A value HTTP cannot carry is not sent; the client's copy is removed instead.
            _ => remove.push(name),
        }
    }
    if !remove.is_empty()
        && let Ok(value) = http::HeaderValue::from_str(&remove.join(", "))
    {
        headers.insert(HEADERS_TO_REMOVE, value);
    }
    append_headers(headers, &decision.response_headers);
    response
}

fn append_headers(headers: &mut http::HeaderMap, list: &[(Cow<'static, str>, String)]) {
    for (name, value) in list {
        if let (Ok(name), Ok(value)) = (
            http::HeaderName::from_bytes(name.as_bytes()),
            http::HeaderValue::from_str(value),
        ) {
            headers.append(name, value);
        }
    }
}

/// The deny as an HTTP answer. Never 5xx: Envoy would read that as the authorizer failing.
fn deny(decision: &Decision, request_id: &str) -> Response {
    let answer = DenyAnswer::of(decision, request_id);
    let status = match answer.status {
        s if s >= 500 => http::StatusCode::FORBIDDEN,
        s => http::StatusCode::from_u16(s).unwrap_or(http::StatusCode::FORBIDDEN),
    };
    let mut response = http::Response::new(Full::new(Bytes::from(answer.body)));
    *response.status_mut() = status;
    append_headers(response.headers_mut(), &answer.headers);
    response
}

/// Serves Envoy's HTTP ext_authz API (HTTP/1.1 and HTTP/2) on each connection `incoming`
/// yields until `stop` turns true, then drains.
pub async fn serve<S, IO>(incoming: S, authorizer: HttpAuthorizer, stop: watch::Receiver<bool>)
where
    S: Stream<Item = io::Result<(IO, ConnPermit)>>,
    IO: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    // No `Date` on answers: one header less to build here and for Envoy to decode and match.
    builder.http1().auto_date_header(false);
    builder.http2().auto_date_header(false);
    // Envoy forwards requests with up to 60 KiB of headers (its default
    // `max_request_headers_kb`); hyper's own default of 16 KiB would refuse a long query plus a
    // large token at the HTTP/2 layer, before any decision (no JSON body, no audit line).
    builder.http2().max_header_list_size(MAX_HEADER_LIST_BYTES);
    // Idle or slow HTTP/1 connections are closed (see `crate::listener`).
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(H1_HEADER_READ_TIMEOUT)
        // hyper refuses more than 100 HTTP/1 headers with a bare 431 (no body, no audit
        // line); room past our own limit (a client's own headers come on top) lets the
        // decision refuse them as every front end does.
        .max_headers(2 * super::wire::MAX_REQUEST_HEADERS);
    accept_loop(incoming, stop, "http", None, |io, first| {
        builder
            .serve_connection(io, Marked::new(authorizer.clone(), first))
            .into_owned()
    })
    .await;
}

/// The request's scheme as Envoy states it in `x-forwarded-proto` (what a DPoP proof's `htu`
/// names): `https` or `http`, `None` for anything else. `explain` reads it the same way.
pub fn forwarded_scheme(value: Option<&str>) -> Option<&'static str> {
    match value {
        Some("https") => Some("https"),
        Some("http") => Some("http"),
        _ => None,
    }
}

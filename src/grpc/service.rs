//! The gRPC service for `envoy.service.auth.v3.Authorization`, written out by hand so a Check
//! costs one body read, one decode, one decision and one encode: the request decodes into
//! `wire::CheckRequest` (the fields the decision reads, not Envoy's whole message), and the
//! unary call is answered without tonic's streaming codec machinery (measured in bench/,
//! issue 4: that machinery cost more than the decision on a cached token). Answers are
//! Envoy's own `CheckResponse`. The other services on the port (health, approvals,
//! reflection) stay ordinary tonic services.
//!
//! INVARIANT (as for `AuthzService::decide`): a Check is always answered with a
//! `CheckResponse` and gRPC status OK. A request that cannot be read or decoded gets an
//! explicit deny, never a gRPC error (an allow under Envoy's `failure_mode_allow`).

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::{Buf, Bytes};
use envoy_types::ext_authz::v3::pb::CheckResponse;
use futures_util::FutureExt;
use http_body::Frame;
use prost::Message;
use tonic::codegen::{Body, BoxFuture, StdError, http};

use super::AuthzService;
use super::wire;

/// The one method of the service.
pub const CHECK_PATH: &str = "/envoy.service.auth.v3.Authorization/Check";

/// The largest CheckRequest accepted (tonic's default limit): room for whatever request body
/// an operator lets Envoy forward with `with_request_body`.
const MAX_REQUEST_BYTES: usize = 4 * 1024 * 1024;

/// gRPC frame header: a compression flag and a big-endian length.
const FRAME_HEADER: usize = 5;

/// The `Check` method, served by an `AuthzService`. `serve::Dispatch` sends it only
/// requests for `CHECK_PATH`; any other path is tonic's (which answers UNIMPLEMENTED).
#[derive(Clone)]
pub struct AuthorizationServer {
    inner: Arc<AuthzService>,
}

impl AuthorizationServer {
    pub fn new(inner: Arc<AuthzService>) -> Self {
        Self { inner }
    }
}

impl<B> tonic::codegen::Service<http::Request<B>> for AuthorizationServer
where
    B: Body<Data = Bytes> + Send + 'static,
    B::Error: Into<StdError> + Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let inner = self.inner.clone();
        Box::pin(async move {
            let answer = async {
                match read_message(req).await {
                    Ok(message) => match wire::CheckRequest::decode(message) {
                        Ok(check) => inner.decide(&check).await,
                        Err(e) => inner.malformed(&format!("undecodable CheckRequest: {e}")),
                    },
                    Err(detail) => inner.malformed(detail),
                }
            };
            // A panic anywhere in reading, deciding or answering is still an explicit deny:
            // a reset stream is an error to Envoy, an allow under `failure_mode_allow`.
            let response = std::panic::AssertUnwindSafe(answer).catch_unwind().await;
            let response = response
                .unwrap_or_else(|_| inner.malformed("internal error while answering the Check"));
            Ok(unary_response(&response))
        })
    }
}

/// The one length-prefixed message of a unary request's body.
async fn read_message<B>(req: http::Request<B>) -> Result<Bytes, &'static str>
where
    B: Body<Data = Bytes>,
    B::Error: Into<StdError>,
{
    // Envoy never compresses a Check; a compressed one is refused, not guessed at.
    if req
        .headers()
        .get("grpc-encoding")
        .is_some_and(|e| e.as_bytes() != b"identity")
    {
        return Err("compressed CheckRequest not supported");
    }
    let mut bytes =
        match crate::listener::read_body(req.into_body(), FRAME_HEADER + MAX_REQUEST_BYTES).await {
            Ok(bytes) => bytes,
            Err(crate::listener::BodyError::TooLarge | crate::listener::BodyError::Unreadable) => {
                return Err("CheckRequest body unreadable or over 4 MiB");
            }
            Err(e) => return Err(e.describe()),
        };
    if bytes.len() < FRAME_HEADER {
        return Err("CheckRequest body shorter than a gRPC frame");
    }
    let compressed = bytes.get_u8();
    let len = bytes.get_u32() as usize;
    if compressed != 0 {
        return Err("compressed CheckRequest not supported");
    }
    if len != bytes.len() {
        return Err("CheckRequest body is not exactly one gRPC message");
    }
    Ok(bytes)
}

/// A unary gRPC answer: `content-type`, one length-prefixed message, `grpc-status: 0`.
fn unary_response(message: &CheckResponse) -> http::Response<tonic::body::Body> {
    let len = message.encoded_len();
    let mut buf = Vec::with_capacity(FRAME_HEADER + len);
    buf.push(0);
    // A CheckResponse is a few hundred bytes; u32::MAX is never near.
    buf.extend_from_slice(&u32::try_from(len).unwrap_or(u32::MAX).to_be_bytes());
    message.encode_raw(&mut buf);
    let mut trailers = http::HeaderMap::with_capacity(1);
    trailers.insert(
        tonic::Status::GRPC_STATUS,
        http::HeaderValue::from_static("0"),
    );
    let body = UnaryBody {
        data: Some(Bytes::from(buf)),
        trailers: Some(trailers),
    };
    let mut response = http::Response::new(tonic::body::Body::new(body));
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        tonic::metadata::GRPC_CONTENT_TYPE,
    );
    response
}

/// A response body of one data frame then the trailers.
struct UnaryBody {
    data: Option<Bytes>,
    trailers: Option<http::HeaderMap>,
}

impl Body for UnaryBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        let frame = match self.data.take() {
            Some(data) => Some(Frame::data(data)),
            None => self.trailers.take().map(Frame::trailers),
        };
        Poll::Ready(frame.map(Ok))
    }

    fn is_end_stream(&self) -> bool {
        self.data.is_none() && self.trailers.is_none()
    }
}

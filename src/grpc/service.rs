//! The tonic service for `envoy.service.auth.v3.Authorization`, written out by hand (as
//! tonic's generator would) so a request decodes into `wire::CheckRequest`, the fields the
//! decision reads, instead of Envoy's whole message. Answers are Envoy's own
//! `CheckResponse`.

use std::convert::Infallible;
use std::sync::Arc;
use std::task::{Context, Poll};

use envoy_types::ext_authz::v3::pb::CheckResponse;
use tonic::codegen::{Body, BoxFuture, StdError, http};
use tonic::server::{Grpc, NamedService, UnaryService};

use super::AuthzService;
use super::wire;

/// The one method of the service.
pub const CHECK_PATH: &str = "/envoy.service.auth.v3.Authorization/Check";

/// `envoy.service.auth.v3.Authorization`, served by an `AuthzService`.
#[derive(Clone)]
pub struct AuthorizationServer {
    inner: Arc<AuthzService>,
}

impl AuthorizationServer {
    pub fn new(inner: AuthzService) -> Self {
        Self {
            inner: Arc::new(inner),
        }
    }
}

impl NamedService for AuthorizationServer {
    const NAME: &'static str = "envoy.service.auth.v3.Authorization";
}

impl<B> tonic::codegen::Service<http::Request<B>> for AuthorizationServer
where
    B: Body + Send + 'static,
    B::Error: Into<StdError> + Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        if req.uri().path() != CHECK_PATH {
            return Box::pin(async { Ok(unimplemented()) });
        }
        let method = Check(self.inner.clone());
        Box::pin(async move {
            let codec = tonic_prost::ProstCodec::<CheckResponse, wire::CheckRequest>::default();
            Ok(Grpc::new(codec).unary(method, req).await)
        })
    }
}

struct Check(Arc<AuthzService>);

impl UnaryService<wire::CheckRequest> for Check {
    type Response = CheckResponse;
    type Future = BoxFuture<tonic::Response<CheckResponse>, tonic::Status>;

    fn call(&mut self, request: tonic::Request<wire::CheckRequest>) -> Self::Future {
        let inner = self.0.clone();
        Box::pin(async move { Ok(tonic::Response::new(inner.decide(request.get_ref()).await)) })
    }
}

/// Any other method of this service: gRPC `UNIMPLEMENTED`, as generated servers answer.
fn unimplemented() -> http::Response<tonic::body::Body> {
    let mut response = http::Response::new(tonic::body::Body::default());
    let headers = response.headers_mut();
    headers.insert(
        tonic::Status::GRPC_STATUS,
        (tonic::Code::Unimplemented as i32).into(),
    );
    headers.insert(
        http::header::CONTENT_TYPE,
        tonic::metadata::GRPC_CONTENT_TYPE,
    );
    response
}

//! The approvals gRPC API in-process: the real server on 127.0.0.1:0 (memory state), the
//! ext_authz Check over gRPC, the approvals API with JWT metadata, and gRPC reflection (what
//! `grpcurl -plaintext 127.0.0.1:9191 list` uses).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use envoy_types::ext_authz::v3::pb::CheckResponse;
use envoy_types::pb::envoy::service::auth::v3::authorization_client::AuthorizationClient;
use portcullis::approvals::api::pb::{
    ApproveRequest, ListRequest, RejectRequest, approvals_client::ApprovalsClient,
};
use portcullis::server::Server;
use serde_json::{Value, json};
use support::inproc::{
    bearer_headers, channel, check_request, denied, scrape_metrics, start_server,
};
use support::jwt::{DEV_ISSUER, mint_dev};
use tonic::transport::Channel;

fn mint(sub: &str, roles: &[&str]) -> String {
    mint_dev(json!({ "sub": sub, "roles": roles }))
}

struct Harness {
    server: Server,
    _dir: tempfile::TempDir,
}

impl Harness {
    async fn start() -> Harness {
        Self::start_with("").await
    }

    /// `extra` is appended to the config (e.g. an `approvals:` section).
    async fn start_with(extra: &str) -> Harness {
        let dir = tempfile::tempdir().unwrap();
        let root = env!("CARGO_MANIFEST_DIR");
        let text = format!(
            r#"
server: {{ listen: "127.0.0.1:0", admin_listen: "127.0.0.1:0" }}
audit: {{ enabled: false }}
issuers:
  - name: dev
    issuer: {DEV_ISSUER}
    audiences: [portcullis-sample-api]
    algorithms: [RS256]
    keys: {{ file: {root}/config/dev/jwks.json }}
routes:
  - id: drop-database
    methods: [DELETE]
    path: /databases/{{db}}
    rules:
      - id: dba
        roles: [dba]
        approval: {{ approvers: {{ roles: [dba-lead] }}, ttl: 15m, uses: 1 }}
{extra}
"#
        );
        let server = start_server(dir.path(), "p.yaml", &text).await;
        Harness { server, _dir: dir }
    }

    async fn channel(&self) -> Channel {
        channel(self.server.grpc_addr).await
    }

    async fn check(&self, token: &str) -> CheckResponse {
        self.check_with_body(token, "").await
    }

    /// A Check as Envoy sends it with `with_request_body` (`body` empty: none sent).
    async fn check_with_body(&self, token: &str, body: &str) -> CheckResponse {
        let req = check_request(
            "DELETE",
            "/databases/orders",
            "db.example.com",
            None,
            bearer_headers(token),
            body,
        );
        AuthorizationClient::new(self.channel().await)
            .check(req)
            .await
            .unwrap()
            .into_inner()
    }

    async fn api(&self) -> ApprovalsClient<Channel> {
        ApprovalsClient::new(self.channel().await)
    }
}

fn authed<T>(body: T, token: &str) -> tonic::Request<T> {
    let mut r = tonic::Request::new(body);
    r.metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    r
}

/// The services a reflection `ListServices` call over `channel` names, asked in protocol
/// version `$v` (`v1`, or `v1alpha`, which older grpcurl and some GUIs still speak).
macro_rules! listed_services {
    ($v:ident, $channel:expr) => {{
        use tokio_stream::StreamExt;
        use tonic_reflection::pb::$v::ServerReflectionRequest;
        use tonic_reflection::pb::$v::server_reflection_client::ServerReflectionClient;
        use tonic_reflection::pb::$v::server_reflection_request::MessageRequest;
        use tonic_reflection::pb::$v::server_reflection_response::MessageResponse;
        let request = ServerReflectionRequest {
            host: String::new(),
            message_request: Some(MessageRequest::ListServices(String::new())),
        };
        let mut stream = ServerReflectionClient::new($channel)
            .server_reflection_info(tokio_stream::iter(vec![request]))
            .await
            .unwrap()
            .into_inner();
        let reply = stream.next().await.unwrap().unwrap();
        let Some(MessageResponse::ListServicesResponse(list)) = reply.message_response else {
            panic!("unexpected reflection reply: {reply:?}");
        };
        list.service
            .into_iter()
            .map(|s| s.name)
            .collect::<Vec<String>>()
    }};
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reflection_lists_the_approvals_service_and_health_in_both_versions() {
    let h = Harness::start().await;
    let v1 = listed_services!(v1, h.channel().await);
    let v1alpha = listed_services!(v1alpha, h.channel().await);
    for names in [&v1, &v1alpha] {
        for service in [
            portcullis::approvals::api::SERVICE_NAME,
            "grpc.health.v1.Health",
        ] {
            assert!(names.iter().any(|n| n == service), "{service}: {names:?}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_needs_a_valid_token_and_never_echoes_it() {
    let h = Harness::start().await;
    let mut api = h.api().await;
    let err = api.list(ListRequest::default()).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unauthenticated);
    let forged = format!("{}x", mint("bob", &["dba-lead"]));
    let err = api
        .list(authed(ListRequest::default(), &forged))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unauthenticated);
    assert!(!err.message().contains(&forged[..40]), "{}", err.message());
    // The scheme in any case, as on a Check (RFC 9110): a valid token is let in.
    let bob = mint("bob", &["dba-lead"]);
    for scheme in ["Bearer", "bearer", "BEARER"] {
        let mut r = tonic::Request::new(ListRequest::default());
        let value = format!("{scheme} {bob}").parse().unwrap();
        r.metadata_mut().insert("authorization", value);
        assert!(api.list(r).await.is_ok(), "{scheme}");
    }
    let mut r = tonic::Request::new(ListRequest::default());
    let value = format!("Basic {bob}").parse().unwrap();
    r.metadata_mut().insert("authorization", value);
    assert_eq!(
        api.list(r).await.unwrap_err().code(),
        tonic::Code::Unauthenticated
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_deny_carries_the_approval_id_and_an_approval_allows_one_check() {
    let h = Harness::start().await;
    let alice = mint("alice", &["dba"]);
    let bob = mint("bob", &["dba-lead"]);
    let (status, headers, body) = denied(&h.check(&alice).await);
    assert_eq!(status, 403);
    assert_eq!(body["error"], "approval_required");
    let id = body["approval_id"].as_str().unwrap().to_string();
    assert_eq!(headers.get("x-portcullis-approval-id"), Some(&id));
    assert!(
        body["reason"].as_str().unwrap().contains("pending"),
        "{body}"
    );

    let mut api = h.api().await;
    // Alice holds no approver role: she sees nothing and may not approve.
    let mine = api
        .list(authed(ListRequest::default(), &alice))
        .await
        .unwrap()
        .into_inner();
    assert!(mine.approvals.is_empty());
    let err = api
        .approve(authed(
            ApproveRequest {
                id: id.clone(),
                ttl: String::new(),
            },
            &alice,
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied);

    let listed = api
        .list(authed(ListRequest::default(), &bob))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.approvals.len(), 1);
    assert_eq!(listed.approvals[0].id, id);
    assert_eq!(listed.approvals[0].subject, "alice");
    // The issuer by its configured name, as in audit lines and `decided_by`; the claim beside.
    assert_eq!(listed.approvals[0].issuer, "dev");
    assert_eq!(listed.approvals[0].iss, DEV_ISSUER);
    assert_eq!(listed.approvals[0].path, "/databases/orders");
    assert_eq!(listed.approvals[0].uses_left, None, "a pending request");

    let err = api
        .approve(authed(
            ApproveRequest {
                id: id.clone(),
                ttl: "soon".into(),
            },
            &bob,
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    let approved = api
        .approve(authed(
            ApproveRequest {
                id: id.clone(),
                ttl: "5m".into(),
            },
            &bob,
        ))
        .await
        .unwrap()
        .into_inner()
        .approval
        .unwrap();
    assert_eq!(approved.state, "approved");
    assert_eq!(approved.decided_by, "dev:bob");
    // Nothing is used yet: the approver is told every granted use is left.
    assert_eq!(approved.uses_left, Some(approved.uses));
    let err = api
        .reject(authed(
            RejectRequest {
                id: id.clone(),
                reason: "late".into(),
            },
            &bob,
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::FailedPrecondition);

    // `list --all` says what the approval has left: its one use, then none.
    let uses_left = |api: &mut ApprovalsClient<Channel>| {
        let (mut api, bob, id) = (api.clone(), bob.clone(), id.clone());
        async move {
            let all = ListRequest {
                include_decided: true,
            };
            let listed = api.list(authed(all, &bob)).await.unwrap().into_inner();
            let a = listed.approvals.iter().find(|a| a.id == id).unwrap();
            (a.state.clone(), a.uses, a.uses_left)
        }
    };
    assert_eq!(uses_left(&mut api).await, ("approved".into(), 1, Some(1)));
    let allowed = h.check(&alice).await;
    assert_eq!(allowed.status.as_ref().unwrap().code, 0, "{allowed:?}");
    assert_eq!(uses_left(&mut api).await, ("approved".into(), 1, Some(0)));
    let (status, _, body) = denied(&h.check(&alice).await);
    assert_eq!(
        (status, body["error"].as_str()),
        (403, Some("approval_required"))
    );
    assert_ne!(body["approval_id"].as_str(), Some(id.as_str()));
    // Spent, still, once a newer request for the same action took its place.
    assert_eq!(uses_left(&mut api).await, ("approved".into(), 1, Some(0)));
}

/// A request nobody decided in time is listed by `--all` as `expired`: it was listed as
/// `pending`, with its end in the past, though approving it is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_that_expired_undecided_is_listed_as_expired() {
    let h = Harness::start_with("approvals: { request_ttl: 1s }").await;
    let alice = mint("alice", &["dba"]);
    let bob = mint("bob", &["dba-lead"]);
    let (_, _, body) = denied(&h.check(&alice).await);
    let id = body["approval_id"].as_str().unwrap().to_string();
    let mut api = h.api().await;
    let state = |include_decided: bool| {
        let (mut api, bob, id) = (api.clone(), bob.clone(), id.clone());
        async move {
            let listed = api
                .list(authed(ListRequest { include_decided }, &bob))
                .await
                .unwrap()
                .into_inner();
            listed
                .approvals
                .iter()
                .find(|a| a.id == id)
                .map(|a| a.state.clone())
        }
    };
    assert_eq!(state(false).await.as_deref(), Some("pending"));
    tokio::time::sleep(std::time::Duration::from_millis(2100)).await;
    assert_eq!(state(false).await, None, "no longer pending");
    assert_eq!(state(true).await.as_deref(), Some("expired"));
    let err = api
        .approve(authed(
            ApproveRequest {
                id: id.clone(),
                ..Default::default()
            },
            &bob,
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::FailedPrecondition);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_request_is_posted_to_the_webhook_with_retries() {
    use std::sync::{Arc, Mutex};
    // The hook fails its first delivery, so the second attempt is the retry.
    let received: Arc<Mutex<Vec<Value>>> = Arc::default();
    let attempts = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let (r, a) = (received.clone(), attempts.clone());
    let app = axum::Router::new().route(
        "/hook",
        axum::routing::post(move |body: String| {
            let (r, a) = (r.clone(), a.clone());
            async move {
                if a.fetch_add(1, std::sync::atomic::Ordering::SeqCst) == 0 {
                    return axum::http::StatusCode::SERVICE_UNAVAILABLE;
                }
                r.lock().unwrap().push(serde_json::from_str(&body).unwrap());
                axum::http::StatusCode::NO_CONTENT
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });

    let h = Harness::start_with(&format!(
        "approvals:\n  link_base: https://approvals.example.com/r\n  webhook: {{ url: 'http://{addr}/hook', timeout: 2s, retries: 3 }}"
    ))
    .await;
    let alice = mint("alice", &["dba"]);
    let (_, _, body) = denied(&h.check(&alice).await);
    let id = body["approval_id"].as_str().unwrap().to_string();
    // A repeat while pending is no new request: no second notification.
    denied(&h.check(&alice).await);

    let started = std::time::Instant::now();
    while received.lock().unwrap().is_empty() {
        assert!(
            started.elapsed() < std::time::Duration::from_secs(10),
            "no webhook delivery"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    tokio::time::sleep(std::time::Duration::from_millis(600)).await;
    let got = received.lock().unwrap().clone();
    assert_eq!(got.len(), 1, "{got:?}");
    assert_eq!(attempts.load(std::sync::atomic::Ordering::SeqCst), 2);
    let hook = &got[0];
    assert_eq!(hook["approval_id"], id.as_str());
    assert_eq!(
        hook["link"],
        format!("https://approvals.example.com/r/{id}").as_str()
    );
    assert!(
        hook["summary"].as_str().unwrap().contains("alice"),
        "{hook}"
    );
    assert_eq!(hook["method"], "DELETE");
    // Delivered on its retry: one notification, delivered, none failed.
    assert_webhook_notifications(&h, 1, 0).await;
}

/// The webhook's answer cannot send the notification elsewhere: a redirect is a failed
/// delivery (retried at the webhook's own URL), never followed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_webhook_never_follows_a_redirect() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    let (hooked, elsewhere) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let (h1, e1) = (hooked.clone(), elsewhere.clone());
    let app = axum::Router::new()
        .route(
            "/hook",
            axum::routing::post(move || {
                h1.fetch_add(1, Ordering::SeqCst);
                async {
                    (
                        axum::http::StatusCode::TEMPORARY_REDIRECT,
                        [("location", "/elsewhere")],
                    )
                }
            }),
        )
        .route(
            "/elsewhere",
            axum::routing::post(move || {
                e1.fetch_add(1, Ordering::SeqCst);
                async { axum::http::StatusCode::NO_CONTENT }
            }),
        );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    let h = Harness::start_with(&format!(
        "approvals:\n  webhook: {{ url: 'http://{addr}/hook', timeout: 2s, retries: 1 }}"
    ))
    .await;
    denied(&h.check(&mint("alice", &["dba"])).await);
    let started = std::time::Instant::now();
    while hooked.load(Ordering::SeqCst) < 2 {
        assert!(
            started.elapsed() < std::time::Duration::from_secs(10),
            "the webhook was not retried after the redirect"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    assert_eq!(
        elsewhere.load(Ordering::SeqCst),
        0,
        "the redirect was followed"
    );
    assert_eq!(hooked.load(Ordering::SeqCst), 2);
    // Both attempts redirected: the notification failed, and `/metrics` says so.
    assert_webhook_notifications(&h, 0, 1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_approval_binds_to_the_body_envoy_sent() {
    let h = Harness::start().await;
    let alice = mint("alice", &["dba"]);
    let bob = mint("bob", &["dba-lead"]);
    let (_, _, body) = denied(&h.check_with_body(&alice, r#"{"cascade":false}"#).await);
    let id = body["approval_id"].as_str().unwrap().to_string();
    // The same action with another body is another request.
    let (_, _, other) = denied(&h.check_with_body(&alice, r#"{"cascade":true}"#).await);
    assert_ne!(other["approval_id"].as_str(), Some(id.as_str()));

    let mut api = h.api().await;
    let listed = api
        .list(authed(ListRequest::default(), &bob))
        .await
        .unwrap()
        .into_inner();
    let record = listed.approvals.iter().find(|a| a.id == id).unwrap();
    assert_eq!(record.body_sha256.len(), 64, "{record:?}");
    api.approve(authed(
        ApproveRequest {
            id,
            ttl: String::new(),
        },
        &bob,
    ))
    .await
    .unwrap();
    // The approved body is not the other body.
    let (status, _, _) = denied(&h.check_with_body(&alice, r#"{"cascade":true}"#).await);
    assert_eq!(status, 403);
    let allowed = h.check_with_body(&alice, r#"{"cascade":false}"#).await;
    assert_eq!(allowed.status.as_ref().unwrap().code, 0, "{allowed:?}");
}

/// An id or ttl of any length is refused with its reason, quoting it cut short: the reason
/// travels in the `grpc-message` header, and a 100 KB one made the answer unreadable to the
/// client (a transport error instead of "no approval request").
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_overlong_id_or_ttl_is_refused_with_a_short_reason() {
    let h = Harness::start().await;
    let bob = mint("bob", &["dba-lead"]);
    let mut api = h.api().await;
    // Past the API's 64 KiB request limit, refused before it is decoded, also briefly.
    let err = api
        .approve(authed(
            ApproveRequest {
                id: format!("apr_{}", "a".repeat(100 * 1024)),
                ttl: String::new(),
            },
            &bob,
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::OutOfRange, "{err:?}");
    assert!(err.message().len() < 200, "{}", err.message().len());
    let long_id = format!("apr_{}", "a".repeat(60 * 1024));
    let err = api
        .approve(authed(
            ApproveRequest {
                id: long_id.clone(),
                ttl: String::new(),
            },
            &bob,
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::NotFound, "{err:?}");
    assert!(
        err.message().starts_with("no approval request `apr_aaa"),
        "{err:?}"
    );
    assert!(err.message().len() < 200, "{}", err.message().len());
    let err = api
        .reject(authed(
            RejectRequest {
                id: long_id,
                reason: String::new(),
            },
            &bob,
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::NotFound, "{err:?}");
    assert!(err.message().len() < 200, "{}", err.message().len());
    let err = api
        .approve(authed(
            ApproveRequest {
                id: format!("apr_{}", "0".repeat(32)),
                ttl: "x".repeat(60 * 1024),
            },
            &bob,
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument, "{err:?}");
    assert!(err.message().starts_with("invalid ttl `xxx"), "{err:?}");
    assert!(err.message().len() < 200, "{}", err.message().len());
}

/// `/metrics` counts `delivered` and `failed` approval webhook notifications.
async fn assert_webhook_notifications(h: &Harness, delivered: u32, failed: u32) {
    let metrics = scrape_metrics(h.server.admin_addr).await;
    let name = "portcullis_approval_webhook_notifications_total";
    for line in [
        format!("{name}{{result=\"delivered\"}} {delivered}"),
        format!("{name}{{result=\"failed\"}} {failed}"),
    ] {
        assert!(
            metrics.lines().any(|l| l == line),
            "no `{line}` in\n{metrics}"
        );
    }
}

//! End to end through a real Envoy running the shipped `envoy/envoy-mtls.yaml` (ports and
//! certificate paths rewritten only): clients present certificates to Envoy, Envoy talks to
//! the real `portcullis` binary over gRPC with mutual TLS (Portcullis accepts only Envoy's
//! certificate), and an upstream records what reaches it.
//!
//! Proves: a SPIFFE principal is granted by a `principals` rule with no token, a different
//! principal is refused; a DPoP-bound request is accepted, its replay and a bearer use of the
//! same token are refused with a DPoP challenge; a certificate whose granted URI SAN is its
//! second is granted too. The same cases run again with the shipped module filter
//! (`envoy/envoy-module.yaml`, `module/`) in place of the ext_authz filter, which reads the
//! client certificate from Envoy's connection attributes and `x-forwarded-client-cert`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::Value;
use support::ChildGuard;
use support::jwt::{
    E2E_AUDIENCE as AUDIENCE, E2E_ISSUER as ISSUER, Key, dpop_proof, dpop_proof_key as proof_key,
    dpop_proof_with_nonce, dpop_token, write_jwks,
};
use support::module::with_module;
use support::stack::{Envoy, Portcullis, UPSTREAM_MARKER, Upstream};

fn root() -> PathBuf {
    support::repo_root()
}

fn mtls(name: &str) -> PathBuf {
    root().join("tests/fixtures/mtls").join(name)
}

fn portcullis_config(jwks: &Path, grpc: u16, admin: u16) -> String {
    format!(
        "server:
  listen: 127.0.0.1:{grpc}
  admin_listen: 127.0.0.1:{admin}
  shutdown_grace: 1s
  tls:
    cert: '{cert}'
    key: '{key}'
    client_ca: '{ca}'
    allowed_client_principals: [spiffe://example.org/ns/edge/sa/envoy]
issuers:
  - name: e2e
    issuer: {ISSUER}
    audiences: [{AUDIENCE}]
    algorithms: [RS256]
    keys: {{file: '{jwks}'}}
    dpop: optional
routes:
  - id: stock
    methods: [GET]
    path: /internal/stock
    rules:
      - id: checkout-service
        principals: [spiffe://example.org/ns/shop/sa/checkout]
  - id: orders
    methods: [GET]
    path: /orders/{{id}}
    rules:
      - id: reader
        scopes: [orders:read]
",
        cert = mtls("server.crt").display(),
        key = mtls("server.key").display(),
        ca = mtls("ca.crt").display(),
        jwks = jwks.display(),
    )
}

/// Who decides for Envoy.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Authorizer {
    /// The `portcullis` binary over gRPC with mTLS (the shipped wiring).
    Service,
    /// The dynamic module inside Envoy, on the same Portcullis config.
    Module,
}

struct Stack {
    envoy_port: u16,
    upstream: Upstream,
    /// `None` with the module (Portcullis then runs inside Envoy).
    portcullis: Option<Portcullis>,
    envoy: ChildGuard,
    _dir: tempfile::TempDir,
}

impl Stack {
    async fn start(authorizer: Authorizer) -> Stack {
        Stack::start_with(authorizer, str::to_string).await
    }

    /// [`Stack::start`] with the Portcullis config passed through `edit` first.
    async fn start_with(authorizer: Authorizer, edit: impl Fn(&str) -> String) -> Stack {
        let dir = tempfile::tempdir().unwrap();
        let upstream = Upstream::start().await;
        let jwks = write_jwks(dir.path(), &[Key::A]);
        let config = dir.path().join("module.yaml");
        let portcullis = match authorizer {
            Authorizer::Service => Some(Portcullis::start(
                dir.path(),
                "portcullis",
                |grpc, admin| edit(&portcullis_config(&jwks, grpc, admin)),
            )),
            Authorizer::Module => {
                let text = edit(&portcullis_config(
                    &jwks,
                    support::free_port(),
                    support::free_port(),
                ));
                std::fs::write(&config, text).unwrap();
                None
            }
        };
        let authz_port = portcullis.as_ref().map_or(support::free_port(), |p| p.grpc);

        let envoy = Envoy::start_shipped(
            dir.path(),
            "envoy/envoy-mtls.yaml",
            10443,
            authz_port,
            upstream.port,
            |shipped| {
                // The shipped file names its example certificates relative to the repository
                // root.
                let certs = format!("{}/", root().join("envoy/certs-example").display());
                assert!(shipped.contains("envoy/certs-example/"));
                let shipped = shipped.replace("envoy/certs-example/", &certs);
                match authorizer {
                    Authorizer::Service => shipped,
                    // As README "Inside Envoy" says for mTLS: Envoy forwards the client
                    // certificate, so principal rules see every URI SAN.
                    Authorizer::Module => {
                        let sanitize = "forward_client_cert_details: SANITIZE\n";
                        assert!(shipped.contains(sanitize));
                        let shipped = shipped.replace(
                            sanitize,
                            "forward_client_cert_details: SANITIZE_SET\n                \
                             set_current_client_cert_details: {cert: true}\n",
                        );
                        with_module(&shipped, &config)
                    }
                }
            },
        );
        Stack {
            envoy_port: envoy.addr.port(),
            upstream,
            portcullis,
            envoy: envoy.process,
            _dir: dir,
        }
    }

    /// An HTTPS client trusting the test CA, presenting `identity`'s certificate.
    fn client(identity: Option<&str>) -> reqwest::Client {
        let ca = std::fs::read(mtls("ca.crt")).unwrap();
        let mut b = reqwest::Client::builder()
            .no_proxy()
            .timeout(Duration::from_secs(10))
            .tls_certs_only([reqwest::Certificate::from_pem(&ca).unwrap()]);
        if let Some(name) = identity {
            let mut pem = std::fs::read(mtls(&format!("{name}.crt"))).unwrap();
            pem.extend(std::fs::read(mtls(&format!("{name}.key"))).unwrap());
            b = b.identity(reqwest::Identity::from_pem(&pem).unwrap());
        }
        b.build().unwrap()
    }

    fn url(&self, path: &str) -> String {
        format!("https://127.0.0.1:{}{path}", self.envoy_port)
    }

    async fn get(&self, client: &reqwest::Client, path: &str, headers: &[(&str, &str)]) -> Answer {
        let mut request = client.get(self.url(path));
        for (n, v) in headers {
            request = request.header(*n, *v);
        }
        let response = request
            .send()
            .await
            .unwrap_or_else(|e| panic!("GET {path}: {e:?}\n{}", self.logs()));
        let status = response.status().as_u16();
        let upstream = response.headers().contains_key(UPSTREAM_MARKER);
        let header = |name: &str| {
            response
                .headers()
                .get(name)
                .map(|v| v.to_str().unwrap().to_string())
        };
        let challenge = header("www-authenticate");
        let dpop_nonce = header("dpop-nonce");
        let body = response.text().await.unwrap();
        Answer {
            status,
            upstream,
            challenge,
            dpop_nonce,
            body,
        }
    }

    fn logs(&self) -> String {
        let portcullis = self.portcullis.as_ref().map(Portcullis::logs);
        format!("{}\n{}", self.envoy.logs(), portcullis.unwrap_or_default())
    }
}

#[derive(Debug)]
struct Answer {
    status: u16,
    upstream: bool,
    challenge: Option<String>,
    /// The `DPoP-Nonce` header (RFC 9449 9), as the client received it.
    dpop_nonce: Option<String>,
    body: String,
}

impl Answer {
    fn error(&self) -> String {
        let v: Value = serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", self.body));
        v["error"].as_str().unwrap_or_default().to_string()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spiffe_principal_is_granted_over_mtls_and_another_principal_is_refused() {
    principals(Authorizer::Service).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_module_grants_the_same_principals() {
    principals(Authorizer::Module).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dpop_bound_request_is_accepted_and_its_replay_refused() {
    dpop(Authorizer::Service).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_module_accepts_dpop_bound_requests_and_refuses_replays() {
    dpop(Authorizer::Module).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_bound_token_works_only_with_its_certificate() {
    certificate_bound(Authorizer::Service).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_module_binds_tokens_to_the_same_certificate() {
    certificate_bound(Authorizer::Module).await;
}

/// RFC 8705: a token whose `cnf` names the checkout certificate's thumbprint is accepted
/// from that client only.
async fn certificate_bound(authorizer: Authorizer) {
    let stack = Stack::start(authorizer).await;
    let pem = std::fs::read(mtls("checkout.crt")).unwrap();
    let thumbprint = portcullis::identity::peer::PeerCertificate::from_pem(&pem)
        .unwrap()
        .thumbprint_s256;
    let token = Key::A.mint(
        "e2e-mtls",
        serde_json::json!({ "scope": "orders:read", "cnf": { "x5t#S256": thumbprint } }),
    );
    let auth = format!("Bearer {token}");
    let own = stack
        .get(
            &Stack::client(Some("checkout")),
            "/orders/42",
            &[("authorization", &auth)],
        )
        .await;
    assert_eq!(own.status, 200, "{own:?}\n{}", stack.logs());
    assert!(own.upstream);
    let stolen = stack
        .get(
            &Stack::client(Some("intruder")),
            "/orders/42",
            &[("authorization", &auth)],
        )
        .await;
    assert_eq!(stolen.status, 401, "{stolen:?}");
    assert!(!stolen.upstream);
    assert_eq!(stack.upstream.count(), 1);
}

/// The hex SHA-256 Envoy writes in `Hash=`, from an RFC 8705 thumbprint.
fn hex_of_thumbprint(thumbprint: &str) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(thumbprint)
        .unwrap()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

async fn principals(authorizer: Authorizer) {
    let stack = Stack::start(authorizer).await;

    let checkout = stack
        .get(&Stack::client(Some("checkout")), "/internal/stock", &[])
        .await;
    assert_eq!(checkout.status, 200, "{checkout:?}\n{}", stack.logs());
    assert!(checkout.upstream, "{checkout:?}");
    assert_eq!(stack.upstream.count(), 1);

    let intruder = stack
        .get(&Stack::client(Some("intruder")), "/internal/stock", &[])
        .await;
    assert_eq!(intruder.status, 403, "{intruder:?}");
    assert!(!intruder.upstream);
    assert_eq!(intruder.error(), "insufficient_scope", "{intruder:?}");

    // The checkout SPIFFE ID as a DNS SAN (no URI SAN), from the trusted CA: Envoy names it
    // as the connection's principal, but a DNS name is no SPIFFE ID and grants nothing.
    let dnsname = stack
        .get(&Stack::client(Some("dnsname")), "/internal/stock", &[])
        .await;
    assert_eq!(dnsname.status, 403, "{dnsname:?}\n{}", stack.logs());
    assert!(!dnsname.upstream);
    assert_eq!(dnsname.error(), "insufficient_scope", "{dnsname:?}");

    // A certificate whose granted URI SAN is its second: every SAN counts, not only the
    // first (the one Envoy names as the connection's principal).
    let migrating = stack
        .get(&Stack::client(Some("migrating")), "/internal/stock", &[])
        .await;
    assert_eq!(migrating.status, 200, "{migrating:?}\n{}", stack.logs());
    assert_eq!(stack.upstream.count(), 2);

    // The intruder claiming the checkout certificate in a header of its own.
    let checkout_pem = std::fs::read_to_string(mtls("checkout.crt")).unwrap();
    let checkout_hash =
        portcullis::identity::peer::PeerCertificate::from_pem(checkout_pem.as_bytes())
            .unwrap()
            .thumbprint_s256;
    let spoofed = format!(
        "Hash={};Cert=\"{}\";URI=spiffe://example.org/ns/shop/sa/checkout",
        hex_of_thumbprint(&checkout_hash),
        percent_encoding::utf8_percent_encode(&checkout_pem, percent_encoding::NON_ALPHANUMERIC)
    );
    let claimed = stack
        .get(
            &Stack::client(Some("intruder")),
            "/internal/stock",
            &[("x-forwarded-client-cert", &spoofed)],
        )
        .await;
    assert_eq!(claimed.status, 403, "{claimed:?}");
    assert!(!claimed.upstream);

    // The principal grants only its route: a token route still needs a token.
    let no_token = stack
        .get(&Stack::client(Some("checkout")), "/orders/42", &[])
        .await;
    assert_eq!(no_token.status, 401, "{no_token:?}");
    assert_eq!(no_token.error(), "credential_missing");

    // No client certificate: Envoy's listener refuses the connection itself.
    let anonymous = Stack::client(None)
        .get(stack.url("/internal/stock"))
        .send()
        .await;
    assert!(anonymous.is_err(), "{anonymous:?}");
    assert_eq!(stack.upstream.count(), 2);
}

async fn dpop(authorizer: Authorizer) {
    let stack = Stack::start(authorizer).await;
    let client = Stack::client(Some("checkout"));
    let (jwk, jkt) = proof_key();
    let token = dpop_token(&jkt);
    let auth = format!("DPoP {token}");
    let htu = stack.url("/orders/42");

    let proof = dpop_proof(&jwk, &token, &htu);
    let first = stack
        .get(
            &client,
            "/orders/42",
            &[("authorization", &auth), ("dpop", &proof)],
        )
        .await;
    assert_eq!(first.status, 200, "{first:?}\n{}", stack.logs());
    assert!(first.upstream);

    let replay = stack
        .get(
            &client,
            "/orders/42",
            &[("authorization", &auth), ("dpop", &proof)],
        )
        .await;
    assert_eq!(replay.status, 401, "{replay:?}");
    assert!(!replay.upstream);
    assert_eq!(replay.error(), "invalid_dpop_proof");
    let challenge = replay.challenge.clone().unwrap_or_default();
    assert!(
        challenge.starts_with("DPoP ") && challenge.contains("error=\"invalid_dpop_proof\""),
        "{challenge:?}"
    );

    // A fresh proof for the same token works again: only the used `jti` was refused.
    let fresh = dpop_proof(&jwk, &token, &htu);
    let again = stack
        .get(
            &client,
            "/orders/42",
            &[("authorization", &auth), ("dpop", &fresh)],
        )
        .await;
    assert_eq!(again.status, 200, "{again:?}");

    // The same DPoP-bound token as a bearer token is refused.
    let bearer = stack
        .get(
            &client,
            "/orders/42",
            &[("authorization", &format!("Bearer {token}"))],
        )
        .await;
    assert_eq!(bearer.status, 401, "{bearer:?}");
    assert!(
        bearer
            .challenge
            .as_deref()
            .unwrap_or_default()
            .starts_with("DPoP "),
        "{bearer:?}"
    );

    // A proof for another URL is refused.
    let elsewhere = dpop_proof(&jwk, &token, &stack.url("/orders/43"));
    let wrong = stack
        .get(
            &client,
            "/orders/42",
            &[("authorization", &auth), ("dpop", &elsewhere)],
        )
        .await;
    assert_eq!(wrong.status, 401, "{wrong:?}");
    assert_eq!(wrong.error(), "invalid_dpop_proof");
    assert_eq!(stack.upstream.count(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dpop_nonces_are_handed_out_required_and_renewed() {
    dpop_nonce(Authorizer::Service).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_module_hands_out_requires_and_renews_dpop_nonces() {
    dpop_nonce(Authorizer::Module).await;
}

/// With `dpop_nonce` on the issuer, a proof needs a nonce Portcullis handed out: the client
/// is told to use one (401 `use_dpop_nonce` with `DPoP-Nonce`, through Envoy), retries with
/// it, and is handed the next one on an allowed request when its own is about to expire.
async fn dpop_nonce(authorizer: Authorizer) {
    const LIFETIME: u64 = 5;
    let stack = Stack::start_with(authorizer, |config| {
        let line = "    dpop: optional\n";
        assert!(config.contains(line));
        config.replacen(
            line,
            &format!("{line}    dpop_nonce: {{ lifetime: {LIFETIME}s }}\n"),
            1,
        )
    })
    .await;
    let client = Stack::client(Some("checkout"));
    let (jwk, jkt) = proof_key();
    let token = dpop_token(&jkt);
    let auth = format!("DPoP {token}");
    let htu = stack.url("/orders/42");
    let send = |nonce: Option<String>| {
        let proof = dpop_proof_with_nonce(&jwk, &token, &htu, nonce.as_deref());
        let (stack, client, auth) = (&stack, &client, &auth);
        async move {
            stack
                .get(
                    client,
                    "/orders/42",
                    &[("authorization", auth), ("dpop", &proof)],
                )
                .await
        }
    };

    // No nonce: told to use one, and given it.
    let first = send(None).await;
    assert_eq!(first.status, 401, "{first:?}\n{}", stack.logs());
    assert_eq!(first.error(), "use_dpop_nonce");
    assert!(!first.upstream);
    let challenge = first.challenge.clone().unwrap_or_default();
    assert!(
        challenge.starts_with("DPoP ") && challenge.contains("error=\"use_dpop_nonce\""),
        "{challenge:?}"
    );
    let nonce = first
        .dpop_nonce
        .clone()
        .expect("a DPoP-Nonce to retry with");
    assert_eq!(nonce.len(), 32, "{nonce:?}");

    // A nonce Portcullis did not make: the same, with a real one.
    let forged = send(Some("A".repeat(32))).await;
    assert_eq!(forged.status, 401, "{forged:?}");
    assert_eq!(forged.error(), "use_dpop_nonce");
    assert!(forged.dpop_nonce.is_some(), "{forged:?}");

    // The retry with the nonce it was given passes.
    let retry = send(Some(nonce.clone())).await;
    assert_eq!(retry.status, 200, "{retry:?}\n{}", stack.logs());
    assert!(retry.upstream);

    // Once a new period has begun, the old nonce still passes and the answer hands the new
    // one, which passes too.
    let period = |t: i64| t / LIFETIME as i64;
    let issued = period(support::jwt::now());
    while period(support::jwt::now()) == issued {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let late = send(Some(nonce.clone())).await;
    assert_eq!(late.status, 200, "{late:?}\n{}", stack.logs());
    let next = late
        .dpop_nonce
        .clone()
        .expect("the next nonce on the allow");
    assert_ne!(next, nonce);
    let renewed = send(Some(next)).await;
    assert_eq!(renewed.status, 200, "{renewed:?}");
    assert_eq!(stack.upstream.count(), 3);
}

//! Portcullis inside Envoy (`module/`, README "Inside Envoy") loaded into the real, pinned
//! Envoy 1.40 by the shipped `envoy/envoy-module.yaml` (ports, the library's path and the
//! Portcullis config's path rewritten only), the module reading a Portcullis config whose
//! keys come from a loopback JWKS server.
//!
//! The module talks to Envoy through hand-written declarations of Envoy's C ABI, so these
//! cases are what proves them against the pinned binary: headers read (the credential, the
//! path, the request id), headers set and removed (identity headers, a spoofed copy), the
//! local reply (status, challenge, JSON body), the source address, a config that does not
//! load keeping Envoy from starting rather than letting requests through, and Envoy's
//! scheduler resuming a decision that waits (on a real Redis, on a key refetch) with the
//! request's body held meanwhile. `tests/e2e_mtls.rs` checks the connection attributes
//! (client certificate) on an mTLS listener.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::{Value, json};
use support::inproc::{e2e_config, scrape_metrics};
use support::jwks::JwksServer;
use support::jwt::Key;
use support::module::{
    GATEWAY, drain_helper, gateway_envoy_flags, gateway_envoy_with_flags,
    gateway_envoy_with_module, gateway_file, shipped_envoy_with_module, shipped_module_config,
};
use support::redis::RedisServer;
use support::stack::{Answer, Upstream, h1_client, send_to};
use support::{KeepAlive, envoy_binary, free_port};

fn mint(extra: Value) -> String {
    Key::A.mint("e2e-module", extra)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_module_decides_inside_envoy_like_the_service_does() {
    let dir = tempfile::tempdir().unwrap();
    let jwks = JwksServer::start(&[Key::A]).await;
    let upstream = Upstream::start().await;
    let config = dir.path().join("portcullis.yaml");
    std::fs::write(
        &config,
        e2e_config(free_port(), free_port(), &jwks.url(), |_| {}),
    )
    .unwrap();
    let envoy = shipped_envoy_with_module(dir.path(), upstream.port, &config);
    let client = h1_client();
    let get = |path: &'static str, headers: Vec<(&'static str, String)>| {
        let client = client.clone();
        let addr = envoy.addr;
        async move {
            let headers: Vec<(&str, &str)> =
                headers.iter().map(|(n, v)| (*n, v.as_str())).collect();
            send_to(&client, addr, false, "GET", path, &headers)
                .await
                .unwrap()
        }
    };

    // No credential: 401 with the bare challenge and the JSON body; the upstream never sees it.
    let answer: Answer = get("/orders/7", vec![]).await;
    assert_eq!(answer.status, 401, "{answer:?}");
    assert_eq!(
        answer.header("www-authenticate"),
        Some("Bearer realm=\"portcullis\", ApiKey realm=\"portcullis\"")
    );
    assert_eq!(answer.json()["error"], "credential_missing");
    assert!(!answer.answered_by_upstream());
    assert_eq!(upstream.count(), 0);

    // A malformed token: 401 invalid_token, never a crash.
    let answer = get(
        "/orders/7",
        vec![("authorization", "Bearer not.a.jwt".into())],
    )
    .await;
    assert_eq!(answer.status, 401, "{answer:?}");
    assert!(
        answer
            .header("www-authenticate")
            .unwrap()
            .contains("error=\"invalid_token\"")
    );

    // A reader: allowed, with Portcullis's identity headers replacing a spoofed copy; the
    // request id in a deny is Envoy's own `x-request-id`.
    let token = mint(json!({ "scope": "orders:read" }));
    let answer = get(
        "/orders/7",
        vec![
            ("authorization", format!("Bearer {token}")),
            ("x-portcullis-subject", "mallory".into()),
        ],
    )
    .await;
    assert_eq!(answer.status, 200, "{answer:?}");
    assert!(answer.answered_by_upstream());
    let seen = upstream.since(0);
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].path, "/orders/7");
    assert_eq!(seen[0].values("x-portcullis-subject"), vec!["alice"]);
    assert_eq!(seen[0].values("x-portcullis-scopes"), vec!["orders:read"]);

    // The same reader may not write: 403 insufficient_scope with the missing scope named.
    let answer = send_to(
        &client,
        envoy.addr,
        false,
        "POST",
        "/orders",
        &[("authorization", &format!("Bearer {token}"))],
    )
    .await
    .unwrap();
    assert_eq!(answer.status, 403, "{answer:?}");
    assert_eq!(answer.json()["error"], "insufficient_scope");
    assert!(
        answer.json()["request_id"]
            .as_str()
            .is_some_and(|id| !id.is_empty())
    );
    assert_eq!(upstream.count(), 1, "a denied request reached the upstream");

    // A header value that is not UTF-8 (Envoy passes obs-text through) is read with
    // replacement characters, as the gRPC and HTTP wirings read it: a Latin-1 `user-agent`
    // on a public route is allowed, and so is a reader with an odd header...
    let raw = raw_bytes(
        envoy.addr,
        b"GET /healthz HTTP/1.1\r\nHost: shop\r\nUser-Agent: Mozilla caf\xe9\r\nConnection: close\r\n\r\n",
    );
    assert!(raw.starts_with("HTTP/1.1 200"), "{raw}");
    let mut request =
        format!("GET /orders/7 HTTP/1.1\r\nHost: shop\r\nAuthorization: Bearer {token}\r\n")
            .into_bytes();
    request.extend_from_slice(b"X-Odd: \xff\r\nConnection: close\r\n\r\n");
    let raw = raw_bytes(envoy.addr, &request);
    assert!(raw.starts_with("HTTP/1.1 200"), "{raw}");
    assert_eq!(upstream.count(), 3);
    // ...while such a byte in the credential makes it an invalid token (401, not a 403
    // internal error), with Envoy's request id.
    let raw = raw_bytes(
        envoy.addr,
        b"GET /orders/7 HTTP/1.1\r\nHost: shop\r\nAuthorization: Bearer caf\xe9\r\nConnection: close\r\n\r\n",
    );
    assert!(raw.starts_with("HTTP/1.1 401"), "{raw}");
    assert!(raw.contains("\"error\":\"invalid_token\""), "{raw}");
    assert!(!raw.contains("\"request_id\":\"\""), "{raw}");
    assert_eq!(upstream.count(), 3, "a denied request reached the upstream");
}

/// A decision that has to wait inside Envoy (shared state on a real Redis, an unknown `kid`
/// fetched from the JWKS server) holds the request, body included, and resumes it on Envoy's
/// worker thread; and the module runs the config's whole server: admin, metrics, reload.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn decisions_that_wait_are_resumed_and_the_server_runs_inside_envoy() {
    let dir = tempfile::tempdir().unwrap();
    let redis = RedisServer::start();
    let jwks = JwksServer::start(&[Key::A]).await;
    let upstream = Upstream::start().await;
    let admin = free_port();
    let config = dir.path().join("portcullis.yaml");
    let redis_url = redis.url();
    let write_config = |subject_header: &str| {
        let text = e2e_config(free_port(), admin, &jwks.url(), |doc| {
            doc["state"] = serde_yaml::from_str(&format!(
                "{{backend: redis, redis_url: '{redis_url}', key_prefix: 'module:', timeout: 500ms}}"
            ))
            .unwrap();
            // Two POST /orders per subject, then 429.
            doc["rate_limits"][1]["requests"] = 2.into();
            doc["rate_limits"][1]["burst"] = 2.into();
            let headers = &mut doc["upstream"]["identity_headers"];
            let sub = headers
                .as_mapping_mut()
                .unwrap()
                .remove("x-portcullis-subject")
                .unwrap();
            headers[subject_header] = sub;
        });
        std::fs::write(&config, text).unwrap();
    };
    write_config("x-portcullis-subject");
    let envoy = shipped_envoy_with_module(dir.path(), upstream.port, &config);
    let client = h1_client();
    let post = |body: &'static str, auth: String| {
        let request = client
            .post(format!("http://{}/orders", envoy.addr))
            .header("authorization", auth)
            .body(body);
        async move { Answer::read(request.send().await.unwrap()).await }
    };

    // A first replica on a new Redis waits for other replicas' revocation write-back
    // (`revocation.reload`-bound) before it serves credentials: wait until it is ready.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let ready = client
            .get(format!("http://127.0.0.1:{admin}/readyz"))
            .send()
            .await
            .map(|r| r.status().as_u16());
        if ready.as_ref().is_ok_and(|s| *s == 200) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "never ready: {ready:?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }

    // Rate limits on Redis: each decision waits on a round trip. The allowed POSTs reach the
    // upstream with their bodies (held while the decision waited) and the quota headers.
    let writer = format!("Bearer {}", mint(json!({ "scope": "orders:write" })));
    for (i, body) in ["first order", "second order"].into_iter().enumerate() {
        let answer = post(body, writer.clone()).await;
        assert_eq!(answer.status, 200, "POST {i}: {answer:?}");
        assert_eq!(
            answer.header("ratelimit-policy"),
            Some("\"per-subject\";q=2;w=60"),
            "{answer:?}"
        );
        let left = format!("\"per-subject\";r={};t=", 1 - i);
        assert!(
            answer
                .header("ratelimit")
                .is_some_and(|v| v.starts_with(&left)),
            "POST {i}: {answer:?}"
        );
        let seen = upstream.since(i);
        assert_eq!(seen.len(), 1, "POST {i}");
        assert_eq!(
            (seen[0].method.as_str(), seen[0].body.as_slice()),
            ("POST", body.as_bytes())
        );
        assert_eq!(seen[0].values("x-portcullis-subject"), vec!["alice"]);
    }
    let answer = post("third order", writer.clone()).await;
    assert_eq!(answer.status, 429, "{answer:?}");
    assert_eq!(answer.json()["error"], "rate_limited");
    assert!(answer.header("retry-after").is_some(), "{answer:?}");
    assert_eq!(
        upstream.count(),
        2,
        "a request over the limit reached the upstream"
    );
    let counted = redis_keys(&redis, "module:*").await;
    assert!(!counted.is_empty(), "nothing was counted in Redis");

    // Redis hangs: a client that gives up while its decision waits (Envoy destroys the
    // filter mid-wait) leaves nothing behind, and one that waits gets a deny once the state
    // timeout passes (closed, never an allow), the upstream untouched.
    redis.freeze(true);
    let impatient = client
        .post(format!("http://{}/orders", envoy.addr))
        .header("authorization", writer.clone())
        .body("abandoned order")
        .timeout(std::time::Duration::from_millis(100))
        .send()
        .await;
    assert!(impatient.is_err(), "answered within 100ms: {impatient:?}");
    let answer = post("order while Redis is down", writer.clone()).await;
    assert_eq!(answer.status, 503, "{answer:?}");
    assert_eq!(
        upstream.count(),
        2,
        "a request reached the upstream without a decision"
    );
    redis.freeze(false);

    // A rotated key: the token's `kid` is not in the set the module started with, so the
    // decision waits for the JWKS refetch, then allows.
    jwks.serve(&[Key::A, Key::B]);
    let rotated = Key::B.mint("e2e-module", json!({ "scope": "orders:read" }));
    let answer = send_to(
        &client,
        envoy.addr,
        false,
        "GET",
        "/orders/7",
        &[("authorization", &format!("Bearer {rotated}"))],
    )
    .await
    .unwrap();
    assert_eq!(answer.status, 200, "{answer:?}");
    assert_eq!(upstream.count(), 3);

    // The config's admin listener runs inside Envoy and counts the module's decisions.
    let admin_url = format!("http://127.0.0.1:{admin}");
    let ready = client
        .get(format!("{admin_url}/readyz"))
        .send()
        .await
        .unwrap();
    assert_eq!(ready.status(), 200);
    let metrics = client
        .get(format!("{admin_url}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let decisions = |needle: &str| {
        metrics
            .lines()
            .filter(|l| l.starts_with("portcullis_decisions_total") && l.contains(needle))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum::<f64>()
    };
    assert_eq!(decisions("result=\"allow\""), 3.0, "{metrics}");
    assert_eq!(decisions("reason=\"rate_limited\""), 1.0, "{metrics}");

    // A changed config file is reloaded, as `portcullis serve` reloads it.
    write_config("x-portcullis-user");
    let reader = format!("Bearer {}", mint(json!({ "scope": "orders:read" })));
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
    loop {
        let before = upstream.count();
        let answer = send_to(
            &client,
            envoy.addr,
            false,
            "GET",
            "/orders/8",
            &[("authorization", &reader)],
        )
        .await
        .unwrap();
        assert_eq!(answer.status, 200, "{answer:?}");
        let seen = &upstream.since(before)[0];
        if seen.values("x-portcullis-user") == vec!["alice"] {
            assert!(seen.values("x-portcullis-subject").is_empty());
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the changed config was not reloaded"
        );
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
}

/// The keys matching `pattern` in the test's Redis.
async fn redis_keys(redis: &RedisServer, pattern: &str) -> Vec<String> {
    let client = ::redis::Client::open(redis.url()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    ::redis::cmd("KEYS")
        .arg(pattern)
        .query_async(&mut conn)
        .await
        .unwrap()
}

/// Sends `request` byte for byte (`\xff` stays one byte) and reads the whole answer.
fn raw_bytes(addr: std::net::SocketAddr, request: &[u8]) -> String {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(addr).unwrap();
    stream
        .set_read_timeout(Some(std::time::Duration::from_secs(5)))
        .unwrap();
    stream.write_all(request).unwrap();
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer).unwrap();
    String::from_utf8_lossy(&answer).into_owned()
}

/// The Kubernetes gateway (`deploy/kubernetes/module/`) as its pods run it: Envoy's config
/// and Portcullis's policy from its ConfigMap, only the issuer (to a loopback JWKS server),
/// ports and the app's address changed. Its routes and identity headers decide, and the
/// admin listener the probes use answers from inside Envoy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_kubernetes_gateway_decides_with_its_configmap() {
    let dir = tempfile::tempdir().unwrap();
    let jwks = JwksServer::start(&[Key::A]).await;
    let upstream = Upstream::start().await;
    let admin = free_port();
    let config = gateway_policy(dir.path(), &jwks.url(), admin);
    let envoy = gateway_envoy_with_module(dir.path(), upstream.port, &config);
    let client = h1_client();
    let send = |method: &'static str, path: &'static str, token: Option<&str>| {
        let client = client.clone();
        let auth = token.map(|t| format!("Bearer {t}"));
        async move {
            let mut headers = vec![("x-portcullis-subject", "mallory")];
            if let Some(auth) = &auth {
                headers.push(("authorization", auth));
            }
            send_to(&client, envoy.addr, false, method, path, &headers)
                .await
                .unwrap()
        }
    };

    // The probes' admin listener: ready once the policy and the issuer's keys are loaded.
    let ready = client
        .get(format!("http://127.0.0.1:{admin}/readyz"))
        .send()
        .await
        .unwrap();
    assert_eq!(ready.status(), 200);

    // The ConfigMap's public route and its deny by default.
    // A spoofed identity header never reaches the app, not even on a public route.
    let answer = send("GET", "/healthz", None).await;
    assert_eq!(answer.status, 200, "{answer:?}");
    assert!(answer.answered_by_upstream());
    assert!(
        upstream.since(0)[0]
            .values("x-portcullis-subject")
            .is_empty()
    );
    let answer = send("GET", "/orders/7", None).await;
    assert_eq!(answer.status, 401, "{answer:?}");
    assert_eq!(answer.json()["error"], "credential_missing");
    let answer = send("GET", "/internal", None).await;
    assert_eq!(answer.status, 403, "{answer:?}");
    assert_eq!(answer.json()["error"], "no_matching_route");
    assert_eq!(upstream.count(), 1, "a denied request reached the app");

    // A reader reads, with the ConfigMap's identity headers (the spoofed subject replaced),
    // and may not write.
    let reader = mint(json!({ "scope": "orders:read" }));
    let answer = send("GET", "/orders/7", Some(&reader)).await;
    assert_eq!(answer.status, 200, "{answer:?}");
    let seen = upstream.since(1);
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].values("x-portcullis-subject"), vec!["alice"]);
    assert_eq!(
        seen[0].values("x-portcullis-issuer"),
        vec![support::jwt::E2E_ISSUER]
    );
    assert_eq!(seen[0].values("x-portcullis-scopes"), vec!["orders:read"]);
    let answer = send("POST", "/orders", Some(&reader)).await;
    assert_eq!(answer.status, 403, "{answer:?}");
    assert_eq!(answer.json()["error"], "insufficient_scope");
    let admin_only = send("GET", "/admin/users", Some(&reader)).await;
    assert_eq!(admin_only.status, 403, "{admin_only:?}");
    assert_eq!(upstream.count(), 2, "a denied request reached the app");
}

/// The gateway ConfigMap's Portcullis config, written into `dir` with only the issuer (to
/// `jwks_url`), the gRPC port and the admin port (`admin`) changed; answers its path.
fn gateway_policy(dir: &Path, jwks_url: &str, admin: u16) -> PathBuf {
    let configmap = std::fs::read_to_string(support::repo_root().join(GATEWAY)).unwrap();
    let mut policy: serde_yaml::Value =
        serde_yaml::from_str(&gateway_file(&configmap, "portcullis.yaml")).unwrap();
    let test: serde_yaml::Value =
        serde_yaml::from_str(&e2e_config(free_port(), free_port(), jwks_url, |_| {})).unwrap();
    policy["issuers"] = test["issuers"].clone();
    policy["server"]["listen"] = test["server"]["listen"].clone();
    policy["server"]["admin_listen"] = format!("127.0.0.1:{admin}").into();
    let config = dir.join("portcullis.yaml");
    std::fs::write(&config, serde_yaml::to_string(&policy).unwrap()).unwrap();
    config
}

/// Runs the drain helper against Envoy's admin `admin` with `--wait 0 --timeout timeout`,
/// calling `meanwhile` once it has told Envoy to drain. Answers its exit code and output.
fn drain(admin: &str, timeout: u64, meanwhile: impl FnOnce()) -> (Option<i32>, String) {
    use std::io::{BufRead, Read};
    let mut helper = Command::new(drain_helper())
        .args([
            "--admin",
            admin,
            "--wait",
            "0",
            "--timeout",
            &timeout.to_string(),
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdout = std::io::BufReader::new(helper.stdout.take().unwrap());
    let mut output = String::new();
    stdout.read_line(&mut output).unwrap();
    if output.contains("draining") {
        meanwhile();
    }
    let status = helper.wait().unwrap();
    stdout.read_to_string(&mut output).unwrap();
    helper
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut output)
        .unwrap();
    (status.code(), output)
}

/// The gateway's `preStop` hook (`portcullis-envoy-drain`) against its Envoy, run with the
/// Deployment's flags. Envoy alone would reset every open connection on SIGTERM. Drained,
/// each connection is closed after its next answer, new ones are still served meanwhile,
/// and the hook returns once none is open (or says how many are when its timeout passes),
/// leaving Envoy running for Kubernetes to stop.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gateway_drain_hook_closes_connections_after_their_answers() {
    let dir = tempfile::tempdir().unwrap();
    let jwks = JwksServer::start(&[Key::A]).await;
    let upstream = Upstream::start().await;
    let config = gateway_policy(dir.path(), &jwks.url(), free_port());
    // The Deployment's flags, and a drain time that passes during the test: the hook must
    // leave Envoy running past it, for Kubernetes to stop.
    let mut flags = gateway_envoy_flags();
    flags.extend(["--drain-time-s".to_string(), "1".to_string()]);
    let mut envoy = gateway_envoy_with_flags(dir.path(), upstream.port, &config, &flags);
    let admin = envoy.admin.to_string();
    let get = "GET /healthz HTTP/1.1\r\nHost: gateway\r\n\r\n";

    // Before the drain, a kept-alive connection stays open after its answer.
    let mut kept = KeepAlive::connect(envoy.addr).unwrap();
    let answer = kept.send(get).unwrap();
    assert_eq!(answer.status, 200, "{answer:?}");
    assert_eq!(answer.header("connection"), None, "{answer:?}");
    // A connection that sends nothing keeps the drain waiting until the timeout.
    let idle = KeepAlive::connect(envoy.addr).unwrap();

    let (code, output) = drain(&admin, 2, || {
        // The kept-alive client's next request is answered with `Connection: close`, and
        // the client closes, as clients do.
        let answer = kept.send(get).unwrap();
        assert_eq!(answer.status, 200, "{answer:?}");
        assert_eq!(answer.header("connection"), Some("close"), "{answer:?}");
        drop(kept);
        // A new client is still served, and told the same.
        let answer = KeepAlive::connect(envoy.addr).unwrap().send(get).unwrap();
        assert_eq!(answer.status, 200, "{answer:?}");
        assert_eq!(answer.header("connection"), Some("close"), "{answer:?}");
    });
    assert_eq!(code, Some(1), "{output}");
    assert!(
        output.contains("1 connection(s) still open after"),
        "{output}"
    );

    // With the idle client gone, the hook returns as soon as nothing is open.
    drop(idle);
    let (code, output) = drain(&admin, 20, || {});
    assert_eq!(code, Some(0), "{output}");
    assert!(output.contains("drained in"), "{output}");
    // Envoy still runs (its drain time passed long ago) and serves until Kubernetes stops
    // it, closing every connection after its answer, itself when the client does not (its
    // drain timeout and delayed close).
    envoy.process.assert_running();
    let mut stubborn = KeepAlive::connect(envoy.addr).unwrap();
    let answer = stubborn.send(get).unwrap();
    assert_eq!(answer.status, 200, "{answer:?}");
    assert_eq!(answer.header("connection"), Some("close"), "{answer:?}");
    assert!(
        stubborn.closed_by_server(std::time::Duration::from_secs(15)),
        "Envoy left a drained connection open"
    );
    assert_eq!(upstream.count(), 4);

    // No Envoy admin there: a clear error, exit status 2.
    let nobody = format!("127.0.0.1:{}", free_port());
    let (code, output) = drain(&nobody, 1, || panic!("nothing to drain"));
    assert_eq!(code, Some(2), "{output}");
    assert!(
        output.contains(&format!("Envoy's admin at {nobody}")),
        "{output}"
    );
}

#[test]
fn a_config_that_does_not_load_keeps_envoy_from_starting() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("no-such-portcullis.yaml");
    let path = dir.path().join("envoy.yaml");
    std::fs::write(&path, shipped_module_config(&missing)).unwrap();
    let out = Command::new(envoy_binary())
        .arg("-c")
        .arg(&path)
        .args(["--mode", "validate", "--log-level", "error"])
        .output()
        .unwrap();
    let logs = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!out.status.success(), "Envoy accepted it:\n{logs}");
    assert!(
        logs.contains("no-such-portcullis.yaml"),
        "the error should name the config file:\n{logs}"
    );
}

/// `dry_run` routes inside Envoy: the module enforces the live routes and counts the
/// candidate's answers on the admin listener it runs, as the service does.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_module_reports_dry_run_routes_without_enforcing_them() {
    let dir = tempfile::tempdir().unwrap();
    let jwks = JwksServer::start(&[Key::A]).await;
    let upstream = Upstream::start().await;
    let admin = free_port();
    let config = dir.path().join("portcullis.yaml");
    let text = e2e_config(free_port(), admin, &jwks.url(), |doc| {
        doc["dry_run"] = serde_yaml::from_str(
            "routes:
  - {id: orders-read, methods: [GET], path: '/orders/{id}', rules: [{id: auditors, scopes: ['orders:audit']}]}
  - {id: healthz, methods: [GET], path: /healthz, rules: [{id: ops, roles: [ops]}]}",
        )
        .unwrap();
    });
    std::fs::write(&config, text).unwrap();
    let envoy = shipped_envoy_with_module(dir.path(), upstream.port, &config);
    let client = h1_client();
    let get = |path: &'static str, token: Option<String>| {
        let client = &client;
        async move {
            let bearer = token.map(|t| format!("Bearer {t}"));
            let headers: Vec<(&str, &str)> = bearer
                .iter()
                .map(|b| ("authorization", b.as_str()))
                .collect();
            send_to(client, envoy.addr, false, "GET", path, &headers)
                .await
                .unwrap()
        }
    };
    let reader = mint(json!({ "scope": "orders:read" }));
    let ops = mint(json!({ "roles": ["ops"] }));
    assert_eq!(get("/orders/1", Some(reader)).await.status, 200);
    assert_eq!(get("/healthz", None).await.status, 200);
    assert_eq!(get("/healthz", Some(ops)).await.status, 200);
    assert_eq!(get("/orders/1", None).await.status, 401);
    assert_eq!(upstream.count(), 3);

    let metrics = scrape_metrics(([127, 0, 0, 1], admin).into()).await;
    for (live, result, reason, route) in [
        ("allow", "deny", "insufficient_scope", "orders-read"),
        ("allow", "deny", "credential_missing", "healthz"),
        ("allow", "allow", "allowed", "healthz"),
        ("deny", "deny", "credential_missing", "orders-read"),
    ] {
        let series = format!(
            "portcullis_dry_run_decisions_total{{live=\"{live}\",result=\"{result}\",reason=\"{reason}\",route=\"{route}\"}} 1"
        );
        assert!(metrics.contains(&series), "no {series} in:\n{metrics}");
    }
}

//! `check` and `explain` as a user runs them, on a config with `dry_run` routes.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::path::Path;
use std::process::Command;

fn portcullis(args: &[&str], dir: &Path) -> (Option<i32>, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_portcullis"))
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code(), text)
}

/// A dry-run route identical to its live route changes nothing: `check` counts it apart (it
/// was counted as changed, beside the warning that it changes nothing).
#[test]
fn check_counts_a_dry_run_copy_of_a_live_route_as_unchanged() {
    let dir = tempfile::tempdir().unwrap();
    let root = support::repo_root();
    let shipped = std::fs::read_to_string(root.join("config/portcullis.yaml")).unwrap();
    let mut doc: serde_yaml::Value = serde_yaml::from_str(&shipped).unwrap();
    let first_route = doc["routes"][0].clone();
    doc["issuers"][0]["keys"]["file"] = root.join("config/dev/jwks.json").to_str().unwrap().into();
    doc["revocation"]["file"] = root
        .join("config/revocations.yaml")
        .to_str()
        .unwrap()
        .into();
    doc["dry_run"] = serde_yaml::from_str("{routes: []}").unwrap();
    doc["dry_run"]["routes"]
        .as_sequence_mut()
        .unwrap()
        .push(first_route);
    std::fs::write(
        dir.path().join("p.yaml"),
        serde_yaml::to_string(&doc).unwrap(),
    )
    .unwrap();
    let (code, out) = portcullis(&["check", "--config", "p.yaml"], dir.path());
    assert_eq!(code, Some(0), "{out}");
    assert!(
        out.contains("dry run: 0 route(s) changed, 0 added, 0 removed, 1 unchanged)"),
        "{out}"
    );
    assert!(out.contains("is the same as the live route"), "{out}");
}

#[test]
fn check_counts_and_explain_shows_the_dry_run_routes() {
    let dir = tempfile::tempdir().unwrap();
    let root = support::repo_root();
    let shipped = std::fs::read_to_string(root.join("config/portcullis.yaml")).unwrap();
    let config = shipped
        .replace("dev/jwks.json", root.join("config/dev/jwks.json").to_str().unwrap())
        .replace(
            "file: revocations.yaml",
            &format!("file: {}", root.join("config/revocations.yaml").display()),
        )
        + "
dry_run:
  routes:
    - {id: orders-read, methods: [GET], path: '/orders/{id}', rules: [{id: auditors, scopes: ['orders:audit']}]}
    - {id: reports, methods: [GET], path: '/reports/**', rules: [{id: analysts, scopes: ['reports:read']}]}
  remove: [admin]
";
    std::fs::write(dir.path().join("p.yaml"), config).unwrap();

    let (code, out) = portcullis(&["check", "--config", "p.yaml"], dir.path());
    assert_eq!(code, Some(0), "{out}");
    assert!(
        out.contains("7 route(s), dry run: 1 route(s) changed, 1 added, 1 removed)"),
        "{out}"
    );

    let minted = Command::new(env!("CARGO_BIN_EXE_portcullis"))
        .args(["token", "--sub", "alice", "--scope", "orders:read"])
        .current_dir(&root)
        .output()
        .unwrap();
    assert!(minted.status.success(), "{minted:?}");
    let token = String::from_utf8(minted.stdout).unwrap();
    let token = token.trim();
    let explain = |extra: &[&str]| {
        let mut args = vec!["explain", "--config", "p.yaml", "--path", "/orders/42"];
        args.extend(["--token", token]);
        args.extend(extra);
        portcullis(&args, dir.path())
    };
    let (code, out) = explain(&["--json"]);
    assert_eq!(code, Some(0), "{out}");
    let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(v["decision"], "allow", "{v}");
    assert_eq!(v["route"], "orders-read", "{v}");
    let dry = &v["dry_run"];
    assert_eq!(
        (
            &dry["decision"],
            &dry["status"],
            &dry["reason"],
            &dry["route"],
            &dry["rule"]
        ),
        (
            &"deny".into(),
            &403.into(),
            &"insufficient_scope".into(),
            &"orders-read".into(),
            &"auditors".into()
        ),
        "{v}"
    );
    assert!(!out.contains(token), "the token in explain's output");

    // Text output: one line for the dry run.
    let (_, text) = explain(&[]);
    assert!(
        text.contains("dry run:  DENY 403 insufficient_scope (missing scope `orders:audit`), route orders-read, rule auditors"),
        "{text}"
    );
}

/// `explain --path /orders/42` on the shipped config, with each of `headers` as a `--header`.
fn explain_orders(headers: &[&str]) -> (Option<i32>, String) {
    let mut args = vec!["explain", "--path", "/orders/42"];
    for h in headers {
        args.extend(["--header", h]);
    }
    portcullis(&args, &support::repo_root())
}

/// `explain` shows the challenge the server sends: an API key's own, not the Bearer one.
#[test]
fn explain_shows_the_challenge_the_server_would_send() {
    let (code, out) = explain_orders(&["x-api-key: pck_not-a-key-000000000000000000000000000000"]);
    assert_eq!(
        code,
        Some(0),
        "explain exits 0 for a deny it explains: {out}"
    );
    assert!(
        out.contains("www-authenticate: ApiKey realm=\"portcullis\", error=\"invalid_key\""),
        "{out}"
    );
}

/// A `--header` written without its `:` is refused without echoing it: it is most likely
/// `authorization Bearer <token>`, and stderr ends up in CI logs.
#[test]
fn explain_never_echoes_a_malformed_header() {
    let (code, out) = explain_orders(&[
        "accept: application/json",
        "authorization Bearer s3cr3t-token-value",
    ]);
    assert_ne!(code, Some(0), "{out}");
    assert!(out.contains("--header number 2 (of 2) has no `:`"), "{out}");
    assert!(!out.contains("s3cr3t"), "the credential echoed: {out}");
}

/// A config for `check` and `serve` in `dir`: one dev issuer, one route, ephemeral ports,
/// plus `extra` YAML.
fn small_config(dir: &Path, extra: &str) {
    let jwks = support::repo_root().join("config/dev/jwks.json");
    let text = format!(
        "server: {{listen: '127.0.0.1:0', admin_listen: '127.0.0.1:0'}}\naudit: {{enabled: false}}\nissuers: [{{name: dev, issuer: https://dev.test, audiences: [a], keys: {{file: '{}'}}}}]\nroutes: [{{id: r, methods: [GET], path: /r, rules: [{{id: x, scopes: [s]}}]}}]\n{extra}",
        jwks.display()
    );
    std::fs::write(dir.join("p.yaml"), text).unwrap();
}

/// `serve`'s verdict on the config in `dir`: its exit code and output when it exits within
/// a few seconds (`None` when it started serving: it is stopped then).
fn serve_fails(dir: &Path) -> Option<(Option<i32>, String)> {
    let mut child = Command::new(env!("CARGO_BIN_EXE_portcullis"))
        .args(["serve", "--config", "p.yaml"])
        .current_dir(dir)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while std::time::Instant::now() < deadline {
        if child.try_wait().unwrap().is_some() {
            let out = child.wait_with_output().unwrap();
            return Some((
                out.status.code(),
                String::from_utf8_lossy(&out.stderr).into(),
            ));
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
    None
}

/// `check` reads the revocation file as `serve` does at start: the docs' example (an entry
/// scoped to an issuer `partner` this config lacks), invalid YAML and a document of the
/// wrong shape fail both, and both name the field and the file. `check` used to print ok.
#[test]
fn check_and_serve_refuse_a_revocation_file_serve_cannot_load_naming_field_and_file() {
    let dir = tempfile::tempdir().unwrap();
    small_config(dir.path(), "revocation: {file: revoked.yaml}\n");
    let revoked = dir.path().join("revoked.yaml");
    std::fs::write(&revoked, "revoked:\n  - {sub: mallory}\n").unwrap();
    let (code, out) = portcullis(&["check", "--config", "p.yaml"], dir.path());
    assert_eq!(code, Some(0), "{out}");

    for (content, says) in [
        (
            "revoked:\n  - {sub: mallory}\n  - {sub: \"12345\", issuer: partner}\n",
            "entry 1: `issuer` `partner` names no issuer of the config",
        ),
        ("revoked: [\n", "invalid revocation file"),
        ("{foo: bar}\n", "invalid revocation file"),
    ] {
        std::fs::write(&revoked, content).unwrap();
        let (code, out) = portcullis(&["check", "--config", "p.yaml"], dir.path());
        assert_eq!(code, Some(2), "{content}: {out}");
        assert!(out.contains("p.yaml: revocation.file: "), "{out}");
        assert!(out.contains("revoked.yaml"), "{out}");
        assert!(out.contains(says), "{out}");
        let (code, out) = serve_fails(dir.path()).expect("serve must refuse it");
        assert_eq!(code, Some(2), "{out}");
        assert!(out.contains("p.yaml: revocation.file: "), "{out}");
        assert!(out.contains("revoked.yaml") && out.contains(says), "{out}");
    }
}

/// `check` loads the TLS certificate and key as the listener does: a key that is not the
/// certificate's, or a certificate file that is not PEM, fails `check` and `serve` alike,
/// naming the field, said once (serve used to repeat rustls's message); the field is the one
/// at fault even when one file is named by both `cert` and `key`.
#[test]
fn check_and_serve_refuse_tls_material_the_listener_cannot_use_naming_the_field() {
    let dir = tempfile::tempdir().unwrap();
    let pki = support::repo_root().join("tests/fixtures/mtls");
    let tls = |cert: &Path, key: &str| {
        format!(
            "  tls: {{cert: '{}', key: '{}', client_ca: '{}'}}\n",
            cert.display(),
            pki.join(key).display(),
            pki.join("ca.crt").display()
        )
    };
    let with = |tls: String| {
        let jwks = support::repo_root().join("config/dev/jwks.json");
        let text = format!(
            "server:\n  listen: '127.0.0.1:0'\n  admin_listen: '127.0.0.1:0'\n{tls}audit: {{enabled: false}}\nissuers: [{{name: dev, issuer: https://dev.test, audiences: [a], keys: {{file: '{}'}}}}]\nroutes: [{{id: r, methods: [GET], path: /r, rules: [{{id: x, scopes: [s]}}]}}]\n",
            jwks.display()
        );
        std::fs::write(dir.path().join("p.yaml"), text).unwrap();
    };
    with(tls(&pki.join("server.crt"), "server.key"));
    let (code, out) = portcullis(&["check", "--config", "p.yaml"], dir.path());
    assert_eq!(code, Some(0), "{out}");

    let not_pem = dir.path().join("not-pem.crt");
    std::fs::write(&not_pem, "this is not a certificate\n").unwrap();
    for (cert, key, field, says) in [
        (
            pki.join("server.crt"),
            "server2.key",
            "server.tls.key",
            "is not the key of the certificate",
        ),
        (
            not_pem.clone(),
            "server.key",
            "server.tls.cert",
            "holds no PEM certificate",
        ),
        // One file named as both (a bundle missing its key): the key is what is missing,
        // and the error named `cert` because the file was also the certificate's.
        (
            pki.join("server.crt"),
            "server.crt",
            "server.tls.key",
            "holds no PEM private key",
        ),
    ] {
        with(tls(&cert, key));
        let (code, out) = portcullis(&["check", "--config", "p.yaml"], dir.path());
        assert_eq!(code, Some(2), "{out}");
        assert!(out.contains(&format!("p.yaml: {field}: ")), "{out}");
        assert!(out.contains(says), "{out}");
        let (code, out) = serve_fails(dir.path()).expect("serve must refuse it");
        assert_eq!(code, Some(2), "{out}");
        assert!(out.contains(&format!("p.yaml: {field}: ")), "{out}");
        assert_eq!(out.matches(says).count(), 1, "said once: {out}");
    }
}

/// `check` reads `state.tls`'s files as `serve` does at start (the Redis store is built
/// from them): a CA file that is no PEM certificate, or a client key that is not the
/// certificate's, fails both naming the field; a good set passes `check`.
#[test]
fn check_and_serve_refuse_redis_tls_files_the_store_cannot_use_naming_the_field() {
    let dir = tempfile::tempdir().unwrap();
    let pki = support::repo_root().join("tests/fixtures/mtls");
    let not_pem = dir.path().join("not-pem.crt");
    std::fs::write(&not_pem, "this is not a certificate\n").unwrap();
    let state = |ca: &Path, key: &str| {
        format!(
            "state: {{backend: redis, redis_url: 'rediss://:s3cretPW@127.0.0.1:1/0', tls: {{ca_file: '{}', cert_file: '{}', key_file: '{}'}}}}\n",
            ca.display(),
            pki.join("envoy.crt").display(),
            pki.join(key).display()
        )
    };
    small_config(dir.path(), &state(&pki.join("ca.crt"), "envoy.key"));
    let (code, out) = portcullis(&["check", "--config", "p.yaml"], dir.path());
    assert_eq!(code, Some(0), "{out}");

    for (ca, key, field, says) in [
        (
            not_pem.clone(),
            "envoy.key",
            "state.tls.ca_file",
            "holds no PEM certificate",
        ),
        (
            pki.join("ca.crt"),
            "checkout.key",
            "state.tls.key_file",
            "is not the key of the certificate",
        ),
    ] {
        small_config(dir.path(), &state(&ca, key));
        let (code, out) = portcullis(&["check", "--config", "p.yaml"], dir.path());
        assert_eq!(code, Some(2), "{out}");
        assert!(out.contains(&format!("p.yaml: {field}: ")), "{out}");
        assert!(out.contains(says), "{out}");
        assert!(!out.contains("s3cretPW"), "{out}");
        let (code, out) = serve_fails(dir.path()).expect("serve must refuse it");
        assert_eq!(code, Some(2), "{out}");
        assert!(out.contains(&format!("p.yaml: {field}: ")), "{out}");
        assert!(out.contains(says), "{out}");
        assert!(!out.contains("s3cretPW"), "{out}");
    }
}

/// Listener addresses fail `check` (and so `serve`) naming the field, not only when binding.
#[test]
fn check_refuses_listener_addresses_serve_cannot_bind() {
    let dir = tempfile::tempdir().unwrap();
    for (server, field) in [
        ("{listen: localhost}", "server.listen"),
        ("{listen: '127.0.0.1:99999'}", "server.listen"),
        ("{admin_listen: '999.1.1.1:20191'}", "server.admin_listen"),
        (
            "{listen: '127.0.0.1:9191', admin_listen: '127.0.0.1:9191'}",
            "server.admin_listen",
        ),
    ] {
        let text = format!(
            "server: {server}\nroutes: [{{id: r, methods: [GET], path: /r, public: true}}]\n"
        );
        std::fs::write(dir.path().join("p.yaml"), text).unwrap();
        let (code, out) = portcullis(&["check", "--config", "p.yaml"], dir.path());
        assert_eq!(code, Some(2), "{out}");
        assert!(out.contains(&format!("p.yaml: {field}: ")), "{out}");
        let (code, out) = serve_fails(dir.path()).expect("serve must refuse it");
        assert_eq!(code, Some(2), "{out}");
        assert!(out.contains(&format!("p.yaml: {field}: ")), "{out}");
    }
}

/// `check --strict` with only warnings fails saying why, never "error: ...: ok".
#[test]
fn check_strict_says_it_fails_because_of_the_warnings() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("p.yaml"),
        "routes: [{id: orders, methods: [GET], path: /orders, rules: [{id: r, scopes: [s]}]}]\n",
    )
    .unwrap();
    let (code, out) = portcullis(&["check", "--config", "p.yaml"], dir.path());
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("p.yaml: ok ("), "{out}");
    assert!(
        out.contains("warning: no issuers are configured: route(s) `orders`"),
        "{out}"
    );
    let (code, out) = portcullis(&["check", "--strict", "--config", "p.yaml"], dir.path());
    assert_eq!(code, Some(2), "{out}");
    assert!(!out.contains("ok ("), "{out}");
    assert!(
        out.contains("error: p.yaml: fails because of 1 warning(s) (--strict treats warnings as errors):\nwarning: no issuers are configured"),
        "{out}"
    );
}

/// `--token` beside an `authorization` given with `--header` is a second credential, as the
/// server sees one: `--token` replaced the header, and a request the server refuses
/// (`multiple_credentials`) was explained as allowed.
#[test]
fn explain_with_a_token_and_an_authorization_header_sees_two_credentials() {
    let token = dev_token(&["--sub", "alice", "--scope", "orders:read"]);
    let (code, out) = portcullis(
        &[
            "explain",
            "--path",
            "/orders/42",
            "--token",
            &token,
            "--header",
            "authorization: Bearer garbage",
        ],
        &support::repo_root(),
    );
    assert_eq!(code, Some(0), "{out}");
    assert!(
        out.contains("status:   401") && out.contains("reason:   multiple_credentials"),
        "{out}"
    );
    assert!(!out.contains(&token), "the token in explain's output");
}

/// A development token for the shipped config's dev issuer.
fn dev_token(args: &[&str]) -> String {
    let minted = Command::new(env!("CARGO_BIN_EXE_portcullis"))
        .arg("token")
        .args(args)
        .current_dir(support::repo_root())
        .output()
        .unwrap();
    assert!(minted.status.success(), "{minted:?}");
    String::from_utf8(minted.stdout).unwrap().trim().to_string()
}

/// `explain` answers what the live server answers: a token revoked in the config's
/// revocation file is a 401 `revoked`, and a rule with `approval:` an `approval_required`
/// (no webhook called, no Redis needed, no approval id named that exists nowhere).
#[test]
fn explain_applies_the_revocation_file_and_the_approvals_gate() {
    let dir = tempfile::tempdir().unwrap();
    let root = support::repo_root();
    let shipped = std::fs::read_to_string(root.join("config/portcullis.yaml")).unwrap();
    let config = shipped
        .replace(
            "dev/jwks.json",
            root.join("config/dev/jwks.json").to_str().unwrap(),
        )
        // A webhook nobody listens on: explain must never call it.
        .replace(
            "  # webhook: {url: https://chat.example.com/hooks/approvals, timeout: 5s, retries: 3}",
            "  webhook: {url: http://127.0.0.1:9/hooks, timeout: 1s, retries: 0}",
        );
    std::fs::write(dir.path().join("p.yaml"), config).unwrap();
    std::fs::write(
        dir.path().join("revocations.yaml"),
        "revoked:\n  - {sub: mallory}\n",
    )
    .unwrap();
    let explain = |token: &str, method: &str, path: &str| {
        let args = [
            "explain", "--config", "p.yaml", "--method", method, "--path", path, "--token", token,
            "--json",
        ];
        let (code, out) = portcullis(&args, dir.path());
        assert_eq!(code, Some(0), "{out}");
        let v: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
        v
    };

    let mallory = dev_token(&["--sub", "mallory", "--scope", "orders:read"]);
    let v = explain(&mallory, "GET", "/orders/42");
    assert_eq!(
        (&v["decision"], &v["status"], &v["reason"]),
        (&"deny".into(), &401.into(), &"revoked".into()),
        "{v}"
    );
    let alice = dev_token(&["--sub", "alice", "--scope", "orders:read"]);
    assert_eq!(explain(&alice, "GET", "/orders/42")["decision"], "allow");

    let dba = dev_token(&["--sub", "alice", "--role", "dba"]);
    let v = explain(&dba, "DELETE", "/databases/staging");
    assert_eq!(
        (&v["decision"], &v["status"], &v["reason"], &v["rule"]),
        (
            &"deny".into(),
            &403.into(),
            &"approval_required".into(),
            &"dba".into()
        ),
        "{v}"
    );
    let detail = v["detail"].as_str().unwrap();
    assert!(detail.contains("role `dba-lead`"), "{detail}");
    assert!(
        !detail.contains("pending"),
        "names an approval that exists nowhere: {detail}"
    );
}

/// `token` refuses what would make another token than the one it announces: `--ttl 0s`
/// minted one expired at its issue, `--claim iss=...` one for an issuer it does not sign
/// for (under the dev issuer's banner), `--claim sub=...` one for another subject than
/// `--sub`. Each is a usage error naming the argument; no token is printed.
#[test]
fn token_refuses_what_would_make_another_token_than_announced() {
    let root = support::repo_root();
    for (args, said) in [
        (
            &["--ttl", "0s"][..],
            "--ttl `0s`: a token must live at least 1s",
        ),
        (
            &["--claim", "iss=https://evil.example"][..],
            "--claim `iss`",
        ),
        (&["--claim", "sub=bob"][..], "--claim `sub`"),
    ] {
        let mut all = vec!["token", "--sub", "alice"];
        all.extend(args);
        let (code, out) = portcullis(&all, &root);
        assert_eq!(code, Some(2), "{args:?}: {out}");
        assert!(out.contains(said), "{args:?}: {out}");
        assert!(!out.contains("eyJ"), "a token was printed: {out}");
    }
    let (code, out) = portcullis(
        &[
            "token",
            "--sub",
            "alice",
            "--ttl",
            "1s",
            "--claim",
            "tenants=[\"acme\"]",
        ],
        &root,
    );
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("eyJ"), "{out}");
}

/// `apikey new` prints the key once on stdout, then its config entry, and says on stderr
/// the step the entry alone does not: a rule of the route must name the key, or it is
/// refused everywhere (it said only "add this entry").
#[test]
fn apikey_new_says_a_rule_must_name_the_key() {
    let out = Command::new(env!("CARGO_BIN_EXE_portcullis"))
        .args([
            "apikey",
            "new",
            "--owner",
            "reporting",
            "--route",
            "GET /orders/{id}",
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let stdout = String::from_utf8(out.stdout).unwrap();
    let stderr = String::from_utf8(out.stderr).unwrap();
    let key = stdout.lines().next().unwrap();
    assert!(key.starts_with("pck_"), "{stdout}");
    assert!(!stderr.contains(key), "the key on stderr: {stderr}");
    let id = stdout
        .lines()
        .find_map(|l| l.strip_prefix("- id: "))
        .unwrap();
    assert!(id.starts_with("\"reporting-"), "{stdout}");
    assert!(
        stderr.contains(&format!("`api_keys: [{id}]`")) && stderr.contains("portcullis check"),
        "{stderr}"
    );
}

/// A file `token` cannot read is named with the reason once: the reason was also the error's
/// cause, which `main` prints after the message, so it read "No such file or directory
/// (os error 2): No such file or directory (os error 2)".
#[test]
fn token_names_an_unreadable_signing_key_with_its_reason_once() {
    let dir = tempfile::tempdir().unwrap();
    // The dev key set without the signing key beside it.
    std::fs::copy(
        support::repo_root().join("config/dev/jwks.json"),
        dir.path().join("jwks.json"),
    )
    .unwrap();
    std::fs::write(
        dir.path().join("p.yaml"),
        "issuers: [{name: dev, issuer: https://dev.portcullis.invalid, audiences: [a], keys: {file: jwks.json}}]\nroutes: [{id: r, methods: [GET], path: /r, rules: [{id: x, scopes: [s]}]}]\n",
    )
    .unwrap();
    let (code, out) = portcullis(
        &["token", "--config", "p.yaml", "--sub", "alice"],
        dir.path(),
    );
    assert_eq!(code, Some(2), "{out}");
    assert!(out.contains("signing-key.pem`: "), "{out}");
    assert_eq!(out.matches("os error 2").count(), 1, "said once: {out}");
}

/// `explain` takes the scheme from `x-forwarded-proto`, as Envoy's HTTP ext_authz API does:
/// it was always `http`, so a DPoP request to an `https` URL (a proof whose `htu` names it)
/// could only be explained as a 401 `htu` mismatch.
#[test]
fn explain_checks_a_dpop_proof_for_an_https_url() {
    use support::jwt::{E2E_AUDIENCE, E2E_ISSUER, Key, dpop_proof, dpop_proof_key, dpop_token};
    let dir = tempfile::tempdir().unwrap();
    support::jwt::write_jwks(dir.path(), &[Key::A]);
    std::fs::write(
        dir.path().join("p.yaml"),
        format!(
            "issuers: [{{name: e2e, issuer: '{E2E_ISSUER}', audiences: [{E2E_AUDIENCE}], keys: {{file: jwks.json}}, dpop: required}}]\nroutes: [{{id: orders, methods: [GET], path: /orders/**, rules: [{{id: read, scopes: ['orders:read']}}]}}]\n"
        ),
    )
    .unwrap();
    let (jwk, jkt) = dpop_proof_key();
    let token = dpop_token(&jkt);
    let explain = |htu: &str, proto: Option<&str>| {
        let authorization = format!("authorization: DPoP {token}");
        let proof = format!("dpop: {}", dpop_proof(&jwk, &token, htu));
        let mut args = vec![
            "explain",
            "--config",
            "p.yaml",
            "--host",
            "api.example.com",
            "--path",
            "/orders/1",
            "--header",
            &authorization,
            "--header",
            &proof,
        ];
        let forwarded = proto.map(|p| format!("x-forwarded-proto: {p}"));
        if let Some(h) = &forwarded {
            args.extend(["--header", h.as_str()]);
        }
        portcullis(&args, dir.path())
    };
    let (code, out) = explain("https://api.example.com/orders/1", Some("https"));
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("decision: ALLOW"), "{out}");
    // Without it the request is plain `http`, as before: an `https` proof does not match it.
    let (_, out) = explain("https://api.example.com/orders/1", None);
    assert!(out.contains("`htu` does not match"), "{out}");
    let (_, out) = explain("http://api.example.com/orders/1", None);
    assert!(out.contains("decision: ALLOW"), "{out}");
}

/// A local key file over `keys.max_bytes` fails `check` naming the field: `serve` reads it
/// under that cap and would never be ready. Sizes take units there, as elsewhere.
#[test]
fn check_refuses_a_key_file_over_its_max_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let jwks = concat!(env!("CARGO_MANIFEST_DIR"), "/config/dev/jwks.json");
    let write = |max: &str| {
        let text = format!(
            "issuers: [{{name: dev, issuer: https://dev.test, audiences: [a], keys: {{file: '{jwks}', max_bytes: {max}}}}}]\nroutes: [{{id: r, methods: [GET], path: /r, rules: [{{id: x, scopes: [s]}}]}}]\n"
        );
        std::fs::write(dir.path().join("p.yaml"), text).unwrap();
    };
    write("10");
    let (code, out) = portcullis(&["check", "--config", "p.yaml"], dir.path());
    assert_eq!(code, Some(2), "{out}");
    assert!(
        out.contains("issuers[0].keys.file") && out.contains("over `keys.max_bytes` (10)"),
        "{out}"
    );
    write("512KiB");
    let (code, out) = portcullis(&["check", "--config", "p.yaml"], dir.path());
    assert_eq!(code, Some(0), "{out}");
}

/// A port another process holds stops `serve` naming the config file, the field and what
/// to do (it said only "cannot listen on `addr`: Address already in use").
#[test]
fn serve_names_the_listener_whose_port_is_taken() {
    let dir = tempfile::tempdir().unwrap();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let text = format!(
        "server: {{listen: '127.0.0.1:0', admin_listen: '127.0.0.1:{port}'}}\nroutes: [{{id: r, methods: [GET], path: /r, public: true}}]\n"
    );
    std::fs::write(dir.path().join("p.yaml"), text).unwrap();
    let (code, out) = serve_fails(dir.path()).expect("serve must stop");
    assert_eq!(code, Some(2), "{out}");
    assert!(
        out.contains(&format!(
            "p.yaml: server.admin_listen: cannot listen on `127.0.0.1:{port}`"
        )),
        "{out}"
    );
    assert!(out.contains("another process holds the port"), "{out}");
}

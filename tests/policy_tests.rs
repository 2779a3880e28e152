//! `portcullis test` as a user runs it: the binary on YAML policy tests, its output and its
//! exit status (0 all pass, 1 a case fails, 2 a file cannot be used).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn portcullis_test(args: &[&str], dir: &Path) -> (Option<i32>, String) {
    let Output {
        status,
        stdout,
        stderr,
    } = Command::new(env!("CARGO_BIN_EXE_portcullis"))
        .arg("test")
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap();
    (
        status.code(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&stdout),
            String::from_utf8_lossy(&stderr)
        ),
    )
}

/// The shipped config's own policy tests, as the README tells users to run them.
#[test]
fn the_shipped_policy_passes_its_shipped_tests() {
    let (code, out) = portcullis_test(&["config/policy-tests.yaml"], &support::repo_root());
    assert_eq!(code, Some(0), "{out}");
    let cases = std::fs::read_to_string(support::repo_root().join("config/policy-tests.yaml"))
        .unwrap()
        .matches("\n  - name: ")
        .count();
    assert!(cases >= 15, "{cases} cases");
    assert!(
        out.contains(&format!("{cases} cases, {cases} passed, 0 failed")),
        "{out}"
    );
    assert!(
        out.contains("ok   a reader reads an order: allow 200 allowed"),
        "{out}"
    );
}

/// A test file beside a copy of the shipped config (so `config:` resolves in `dir`).
fn setup(dir: &Path, tests: &str) {
    let root = support::repo_root();
    let config = std::fs::read_to_string(root.join("config/portcullis.yaml")).unwrap();
    // The shipped config names its dev key set relative to itself.
    let jwks = root.join("config/dev/jwks.json");
    let config = config.replace("dev/jwks.json", jwks.to_str().unwrap());
    let revocations = root.join("config/revocations.yaml");
    let config = config.replace(
        "file: revocations.yaml",
        &format!("file: {}", revocations.display()),
    );
    std::fs::write(dir.join("portcullis.yaml"), config).unwrap();
    std::fs::write(dir.join("tests.yaml"), tests).unwrap();
}

/// Appends `yaml` to the config `setup` wrote; answers its path.
fn add_to_config(dir: &Path, yaml: &str) -> PathBuf {
    let config = dir.join("portcullis.yaml");
    let mut text = std::fs::read_to_string(&config).unwrap();
    text.push_str(yaml);
    std::fs::write(&config, text).unwrap();
    config
}

#[test]
fn a_failing_case_is_named_with_what_was_expected_and_what_came() {
    let dir = tempfile::tempdir().unwrap();
    setup(
        dir.path(),
        "config: portcullis.yaml
now: 2026-12-01T09:00:00Z
cases:
  - name: readers may write, or so I thought
    request: {method: POST, path: /orders}
    as: {claims: {sub: alice, scope: orders:read}}
    expect: {decision: allow, rule: orders-writer}
  - name: readers read
    request: {path: /orders/1}
    as: {claims: {sub: alice, scope: orders:read}}
    expect: {decision: allow}
",
    );
    let (code, out) = portcullis_test(&["tests.yaml"], dir.path());
    assert_eq!(code, Some(1), "{out}");
    assert!(
        out.contains("FAIL readers may write, or so I thought: deny 403 insufficient_scope"),
        "{out}"
    );
    assert!(out.contains("expected decision allow, got deny"), "{out}");
    assert!(out.contains("ok   readers read: allow 200"), "{out}");
    assert!(out.contains("2 cases, 1 passed, 1 failed"), "{out}");
}

#[test]
fn the_config_under_test_can_be_named_on_the_command_line() {
    let dir = tempfile::tempdir().unwrap();
    let tests = "now: 2026-12-01T09:00:00Z
cases:
  - name: readers read
    request: {path: /orders/1}
    as: {claims: {sub: alice, scope: orders:read}}
    expect: {decision: allow}
";
    setup(dir.path(), tests);
    let (code, out) = portcullis_test(&["--config", "portcullis.yaml", "tests.yaml"], dir.path());
    assert_eq!(code, Some(0), "{out}");
    // The same tests against a policy where reading needs another scope now fail.
    let stricter = std::fs::read_to_string(dir.path().join("portcullis.yaml"))
        .unwrap()
        .replace("scopes: [orders:read]", "scopes: [orders:read:all]");
    std::fs::write(dir.path().join("stricter.yaml"), stricter).unwrap();
    let (code, out) = portcullis_test(&["--config", "stricter.yaml", "tests.yaml"], dir.path());
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("missing scope `orders:read:all`"), "{out}");
}

#[test]
fn a_file_that_cannot_be_used_is_an_error_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    for (tests, says) in [
        (
            "cases:\n  - {name: a, request: {path: /}, expect: {decision: allow}}\n  - {name: a, request: {path: /}, expect: {decision: allow}}\n",
            "cases[1]: the name `a` is used twice",
        ),
        (
            "cases:\n  - {name: a, request: {path: /}, expect: {}}\n",
            "names nothing to check",
        ),
        (
            "cases:\n  - {name: a, request: {path: /}, expect: {decision: maybe}}\n",
            "unknown variant `maybe`",
        ),
        (
            "cases:\n  - {name: a, request: {path: /}, expects: {decision: allow}}\n",
            "unknown field `expects`",
        ),
        (
            "cases:\n  - {name: a, request: {path: /}, as: {api_key: k, claims: {}}, expect: {status: 200}}\n",
            "`as` takes either `api_key` or `issuer`/`claims`",
        ),
        (
            "cases:\n  - {name: a, request: {path: /}, as: {claim: {sub: a}}, expect: {status: 200}}\n",
            "unknown field `claim` in `as`",
        ),
        // The caller names what the config lacks: a mistake in the file, not a policy
        // failure (it used to be a failing case, exit 1).
        (
            "config: portcullis.yaml\ncases:\n  - {name: a, request: {path: /orders/1}, expect: {status: 200}}\n  - {name: b, request: {path: /orders/1}, as: {api_key: nope}, expect: {status: 200}}\n",
            "tests.yaml: cases[1] `b`: `as`: no API key `nope` in the config",
        ),
        (
            "config: portcullis.yaml\ncases:\n  - {name: a, request: {path: /orders/1}, as: {issuer: partner, claims: {sub: a}}, expect: {status: 200}}\n",
            "cases[0] `a`: `as`: no issuer named `partner` in the config",
        ),
        // A credential in the request without `as:` would be verified by the server; a
        // test cannot, and answering `credential_missing` would pass a wrong expectation.
        (
            "config: portcullis.yaml\ncases:\n  - {name: a, request: {path: /orders/1, headers: {x-api-key: pck_s3cr3t}}, expect: {decision: deny}}\n",
            "cases[0] `a`: `request.headers.x-api-key` carries a credential",
        ),
        (
            "config: portcullis.yaml\ncases:\n  - {name: a, request: {path: /orders/1, headers: {authorization: Bearer s3cr3t}}, expect: {decision: deny}}\n",
            "cases[0] `a`: `request.headers.authorization` carries a credential",
        ),
        (
            "config: no-such.yaml\ncases:\n  - {name: a, request: {path: /}, expect: {status: 200}}\n",
            "no-such.yaml",
        ),
    ] {
        setup(dir.path(), tests);
        let (code, out) = portcullis_test(&["tests.yaml"], dir.path());
        assert_eq!(code, Some(2), "{tests}\n{out}");
        assert!(out.contains(says), "{tests}\n{out}");
        assert!(!out.contains("s3cr3t"), "a credential echoed: {out}");
    }
    let (code, out) = portcullis_test(&["missing.yaml"], dir.path());
    assert_eq!(code, Some(2), "{out}");
    assert!(out.contains("cannot read missing.yaml"), "{out}");
}

/// Cases can say what the config's `dry_run` routes must answer, beside the live decision.
#[test]
fn cases_check_the_dry_run_routes_too() {
    let dir = tempfile::tempdir().unwrap();
    setup(
        dir.path(),
        "config: portcullis.yaml
now: 2026-12-01T09:00:00Z
cases:
  - name: readers keep reading for now, and will need orders:audit
    request: {path: /orders/1}
    as: {claims: {sub: alice, scope: orders:read}}
    expect: {decision: allow, dry_run: {decision: deny, reason: insufficient_scope, route: orders-read}}
  - name: auditors will read
    request: {path: /orders/1}
    as: {claims: {sub: carol, scope: orders:audit}}
    expect: {decision: deny, dry_run: {decision: allow, rule: auditors}}
  - name: health stays public in the candidate, or so I thought
    request: {path: /healthz}
    expect: {decision: allow, dry_run: {decision: allow}}
",
    );
    let config = add_to_config(
        dir.path(),
        "
dry_run:
  routes:
    - {id: healthz, methods: [GET], path: /healthz, rules: [{id: ops, roles: [ops]}]}
    - {id: orders-read, methods: [GET], path: '/orders/{id}', rules: [{id: auditors, scopes: ['orders:audit']}]}
",
    );
    let (code, out) = portcullis_test(&["tests.yaml"], dir.path());
    assert_eq!(code, Some(1), "{out}");
    assert!(
        out.contains(
            "ok   readers keep reading for now, and will need orders:audit: allow 200 allowed \
             (route orders-read, rule orders-reader); dry run: deny 403 insufficient_scope \
             (route orders-read, rule auditors)"
        ),
        "{out}"
    );
    assert!(out.contains("ok   auditors will read"), "{out}");
    assert!(
        out.contains("FAIL health stays public in the candidate, or so I thought")
            && out.contains("dry run: expected decision allow, got deny"),
        "{out}"
    );
    assert!(out.contains("3 cases, 2 passed, 1 failed"), "{out}");

    // Without `dry_run` in the config, such an expectation fails and says why.
    let plain = dir.path().join("plain.yaml");
    let text = std::fs::read_to_string(&config).unwrap();
    std::fs::write(&plain, &text[..text.find("\ndry_run:").unwrap()]).unwrap();
    let (code, out) = portcullis_test(&["--config", "plain.yaml", "tests.yaml"], dir.path());
    assert_eq!(code, Some(1), "{out}");
    assert!(
        out.contains("expected a dry-run decision, but the config has no `dry_run`"),
        "{out}"
    );
}

/// A dry run never opens or spends an approval, yet its answers meet approvals as the live
/// request would: the live outcome on the same rule, a pre-approval that holds, otherwise
/// `approval_required`; a rule whose approval the candidate drops allows.
#[test]
fn dry_run_answers_meet_approvals_as_the_live_request_would() {
    let dir = tempfile::tempdir().unwrap();
    setup(
        dir.path(),
        "config: portcullis.yaml
now: 2026-12-01T09:00:00Z
cases:
  - name: a dba still waits for an approver, live and in the candidate
    request: {method: DELETE, path: /databases/orders}
    as: {claims: {sub: dana, roles: [dba]}}
    expect: {decision: deny, reason: approval_required, dry_run: {decision: deny, reason: approval_required, rule: dba}}
  - name: an sre will be able to ask
    request: {method: DELETE, path: /databases/orders}
    as: {claims: {sub: sam, roles: [sre]}}
    expect: {reason: insufficient_scope, dry_run: {decision: deny, reason: approval_required, rule: sre}}
  - name: an sre on call will be pre-approved
    request: {method: DELETE, path: /databases/orders}
    as: {claims: {sub: sam, roles: [sre, oncall]}}
    expect: {reason: insufficient_scope, dry_run: {decision: allow, rule: sre}}
  - name: a dba lead will need no approval
    request: {method: DELETE, path: /databases/orders}
    as: {claims: {sub: lee, roles: [dba, dba-lead]}}
    expect: {reason: approval_required, dry_run: {decision: allow, rule: leads}}
",
    );
    add_to_config(
        dir.path(),
        "
dry_run:
  routes:
    - id: drop-database
      methods: [DELETE]
      path: /databases/{db}
      rules:
        - {id: leads, roles: [dba-lead]}
        - {id: dba, roles: [dba], approval: {approvers: {roles: [dba-lead]}}}
        - id: sre
          roles: [sre]
          approval: {approvers: {roles: [dba-lead]}, pre_approve: [{roles: [oncall]}]}
",
    );
    let (code, out) = portcullis_test(&["tests.yaml"], dir.path());
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("4 cases, 4 passed, 0 failed"), "{out}");
}

/// A case on a gated route opens an approval request in the test's own state: the configured
/// webhook (real approvers' chat) is never told of it.
#[test]
fn policy_tests_never_call_the_approvals_webhook() {
    let dir = tempfile::tempdir().unwrap();
    setup(
        dir.path(),
        "config: portcullis.yaml
now: 2026-12-01T09:00:00Z
cases:
  - name: a DBA asks to drop a database
    request: {method: DELETE, path: /databases/staging}
    as: {claims: {sub: alice, roles: [dba]}}
    expect: {status: 403, reason: approval_required}
",
    );
    let hook = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    hook.set_nonblocking(true).unwrap();
    let text = std::fs::read_to_string(dir.path().join("portcullis.yaml")).unwrap();
    let url = format!(
        "http://127.0.0.1:{}/hook",
        hook.local_addr().unwrap().port()
    );
    let with_hook = text.replace(
        "  # webhook: {url: https://chat.example.com/hooks/approvals, timeout: 5s, retries: 3}",
        &format!("  webhook: {{url: \"{url}\", timeout: 5s, retries: 0}}"),
    );
    assert_ne!(with_hook, text);
    std::fs::write(dir.path().join("portcullis.yaml"), with_hook).unwrap();

    let (code, out) = portcullis_test(&["tests.yaml"], dir.path());
    assert_eq!(code, Some(0), "{out}");
    // The process has exited: any notification would have connected by now.
    match hook.accept() {
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
        other => panic!("the webhook was called: {other:?}"),
    }
}

/// A caller the server would refuse at the case's `now` (its `exp` or `nbf`, a `cnf` it
/// cannot check, an expired API key) gets the server's 401 on the route: a case expecting
/// an allow fails, and one expecting the 401 passes. A public route never reads it.
#[test]
fn a_caller_the_server_would_refuse_gets_its_401() {
    let dir = tempfile::tempdir().unwrap();
    setup(
        dir.path(),
        "config: portcullis.yaml
now: 2026-12-01T09:00:00Z
cases:
  - name: an expired token reads an order
    request: {path: /orders/1}
    as: {claims: {sub: alice, scope: orders:read, exp: 1700000000}}
    expect: {decision: allow}
  - name: an expired token is refused
    request: {path: /orders/1}
    as: {claims: {sub: alice, scope: orders:read, exp: 1700000000}}
    expect: {decision: deny, status: 401, reason: invalid_token, route: orders-read}
  - name: a token not valid yet is refused
    request: {path: /orders/1}
    as: {claims: {sub: alice, scope: orders:read, nbf: 1900000000}}
    expect: {status: 401, reason: invalid_token}
  - name: a cnf the server cannot check is refused
    request: {path: /orders/1}
    as: {claims: {sub: alice, scope: orders:read, cnf: {x5u: 'https://example.com/c'}}}
    expect: {status: 401, reason: invalid_token}
  - name: an expired token on a public route
    request: {path: /healthz}
    as: {claims: {sub: alice, exp: 1700000000}}
    expect: {decision: allow}
  - name: an expired API key is refused
    now: 2028-01-01T00:00:00Z
    request: {path: /orders/1}
    as: {api_key: reporting-e0dd28}
    expect: {status: 401, reason: invalid_token, route: orders-read}
  - name: the same key the day before it expires
    now: 2027-11-22T06:48:42Z
    request: {path: /orders/1}
    as: {api_key: reporting-e0dd28}
    expect: {decision: allow}
  - name: a current token reads an order
    request: {path: /orders/1}
    as: {claims: {sub: alice, scope: orders:read, exp: 1900000000}}
    expect: {decision: allow}
",
    );
    let (code, out) = portcullis_test(&["tests.yaml"], dir.path());
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("8 cases, 7 passed, 1 failed"), "{out}");
    assert!(
        out.contains(
            "FAIL an expired token reads an order: deny 401 invalid_token (route orders-read): token has expired"
        ),
        "{out}"
    );
    assert!(out.contains("expected decision allow, got deny"), "{out}");
    assert!(
        out.contains("API key `reporting-e0dd28` has expired"),
        "{out}"
    );

    // The default times fit the issuer's `max_lifetime`: a case that writes none passes
    // under a short one, and one that writes a longer lifetime fails.
    let config = dir.path().join("portcullis.yaml");
    let text = std::fs::read_to_string(&config).unwrap();
    let short = text.replace(
        "    audiences: [portcullis-sample-api]\n",
        "    audiences: [portcullis-sample-api]\n    max_lifetime: 5m\n",
    );
    assert_ne!(short, text);
    std::fs::write(&config, short).unwrap();
    std::fs::write(
        dir.path().join("tests.yaml"),
        "config: portcullis.yaml
now: 2026-12-01T09:00:00Z
cases:
  - name: default times
    request: {path: /orders/1}
    as: {claims: {sub: alice, scope: orders:read}}
    expect: {decision: allow}
  - name: an hour-long token
    request: {path: /orders/1}
    as: {claims: {sub: alice, scope: orders:read, iat: 1796115000, exp: 1796118600}}
    expect: {decision: allow}
",
    )
    .unwrap();
    let (code, out) = portcullis_test(&["tests.yaml"], dir.path());
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("2 cases, 1 passed, 1 failed"), "{out}");
    assert!(out.contains("ok   default times"), "{out}");
    assert!(out.contains("longer than 300 seconds"), "{out}");
}

/// The caller given by `as:` stands for the request's credential: a request that carries
/// another one (a token or key in the query, an API key header, a repeated `authorization`)
/// is refused as the server refuses it.
#[test]
fn a_request_with_a_second_credential_is_refused_as_the_server_refuses_it() {
    let dir = tempfile::tempdir().unwrap();
    setup(
        dir.path(),
        "config: portcullis.yaml
cases:
  - name: a token in the query
    request: {path: /orders/42?access_token=abc}
    as: {claims: {sub: alice, scope: orders:read}}
    expect: {decision: deny, status: 401, reason: multiple_credentials}
  - name: a key in the query
    request: {path: /orders/42?api_key=abc}
    as: {claims: {sub: alice, scope: orders:read}}
    expect: {decision: deny, status: 401, reason: multiple_credentials}
  - name: an API key header too
    request: {path: /orders/42, headers: {x-api-key: pck_something}}
    as: {claims: {sub: alice, scope: orders:read}}
    expect: {decision: deny, status: 401, reason: multiple_credentials, route: orders-read}
  - name: two bearer tokens
    request: {path: /orders/42, headers: {authorization: 'Bearer a, Bearer b'}}
    as: {claims: {sub: alice, scope: orders:read}}
    expect: {decision: deny, status: 401, reason: multiple_credentials}
  - name: a key and an authorization header
    request: {path: /orders/42, headers: {authorization: 'Bearer a'}}
    as: {api_key: reporting-e0dd28}
    expect: {decision: deny, status: 401, reason: multiple_credentials}
  - name: the caller alone is fine
    request: {path: /orders/42?page=2}
    as: {claims: {sub: alice, scope: orders:read}}
    expect: {decision: allow, status: 200}
  - name: the key alone is fine
    request: {path: /orders/42}
    as: {api_key: reporting-e0dd28}
    now: 2026-12-01T09:00:00Z
    expect: {decision: allow, status: 200}
",
    );
    let (code, out) = portcullis_test(&["tests.yaml"], dir.path());
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("7 cases, 7 passed, 0 failed"), "{out}");
}

/// Claims the server's token checks refuse (a number for `sub`, a list for `jti`, a `cnf`
/// this server cannot check, a login in the future) get its 401 too: no allow.
#[test]
fn a_caller_the_server_would_refuse_for_its_claims_gets_its_401() {
    let dir = tempfile::tempdir().unwrap();
    setup(
        dir.path(),
        "config: portcullis.yaml
now: 2026-12-01T09:00:00Z
cases:
  - name: numeric sub
    request: {path: /orders/1}
    as: {claims: {sub: 123, scope: orders:read}}
    expect: {decision: allow}
  - name: list jti
    request: {path: /orders/1}
    as: {claims: {sub: alice, jti: [1], scope: orders:read}}
    expect: {decision: allow}
  - name: unusable cnf
    request: {path: /orders/1}
    as: {claims: {sub: alice, cnf: {jwk: {}}, scope: orders:read}}
    expect: {decision: allow}
  - name: login in the future
    request: {path: /orders/1}
    as: {claims: {sub: alice, auth_time: 4102444800, scope: orders:read}}
    expect: {decision: allow}
  - name: another audience
    request: {path: /orders/1}
    as: {claims: {sub: alice, aud: someone-else, scope: orders:read}}
    expect: {decision: allow}
  - name: a good caller
    request: {path: /orders/1}
    as: {claims: {sub: alice, scope: orders:read}}
    expect: {decision: allow}
",
    );
    let (code, out) = portcullis_test(&["tests.yaml"], dir.path());
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("6 cases, 1 passed, 5 failed"), "{out}");
    assert_eq!(
        out.matches(": deny 401 invalid_token (route orders-read): ")
            .count(),
        5,
        "{out}"
    );
    for why in [
        "token `sub` claim is not a string",
        "token `jti` claim is not a string",
        "`cnf` asks for a proof of possession",
        "`auth_time`) is in the future",
        "token `aud` does not name an accepted audience",
    ] {
        assert!(out.contains(why), "{why}: {out}");
    }
}

/// A token that must be bound (a `cnf`, an issuer with `dpop: required` or `cert_bound`)
/// gets the 401 the server gives a plain bearer request without a client certificate: the
/// test predicted an allow where the server refuses. `proven: true` says the request proves
/// the binding (a DPoP proof, a client certificate), which a test cannot send.
#[test]
fn a_caller_whose_token_must_be_bound_gets_the_servers_401_unless_proven() {
    let dir = tempfile::tempdir().unwrap();
    setup(
        dir.path(),
        "config: portcullis.yaml
now: 2026-12-01T09:00:00Z
cases:
  - name: a DPoP-bound token sent as a bearer one
    request: {path: /orders/1}
    as: {claims: {sub: alice, cnf: {jkt: abc}, scope: orders:read}}
    expect: {decision: allow}
  - name: a certificate-bound token without the certificate
    request: {path: /orders/1}
    as: {claims: {sub: alice, cnf: {x5t#S256: abc}, scope: orders:read}}
    expect: {decision: allow}
  - name: a certificate-bound token with its certificate
    request: {path: /orders/1}
    as: {claims: {sub: alice, cnf: {x5t#S256: abc}, scope: orders:read}, proven: true}
    expect: {decision: allow}
  - name: a plain caller
    request: {path: /orders/1}
    as: {claims: {sub: alice, scope: orders:read}}
    expect: {decision: allow}
",
    );
    let (code, out) = portcullis_test(&["tests.yaml"], dir.path());
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("4 cases, 2 passed, 2 failed"), "{out}");
    for why in [
        "the token is DPoP-bound (`cnf.jkt`) and this issuer does not accept DPoP",
        "the token is certificate-bound and the request has no client certificate",
    ] {
        assert!(out.contains(why), "{why}: {out}");
    }
    // An issuer that requires DPoP: every plain caller is refused, a proven one is not.
    let config = std::fs::read_to_string(dir.path().join("portcullis.yaml"))
        .unwrap()
        .replace("    leeway: 30s", "    leeway: 30s\n    dpop: required");
    assert!(config.contains("dpop: required"));
    std::fs::write(dir.path().join("portcullis.yaml"), config).unwrap();
    std::fs::write(
        dir.path().join("tests.yaml"),
        "config: portcullis.yaml
cases:
  - name: bearer
    request: {path: /orders/1}
    as: {claims: {sub: alice, scope: orders:read}}
    expect: {decision: deny, status: 401, reason: invalid_token}
  - name: with its proof
    request: {path: /orders/1}
    as: {claims: {sub: alice, scope: orders:read}, proven: true}
    expect: {decision: allow}
",
    )
    .unwrap();
    let (code, out) = portcullis_test(&["tests.yaml"], dir.path());
    assert_eq!(code, Some(0), "{out}");
}

/// A case without a caller is answered as a Check is: told the schemes its route takes
/// (`POST /orders` takes tokens only), not every scheme the config has.
#[test]
fn a_case_without_a_caller_is_told_what_its_route_takes() {
    let dir = tempfile::tempdir().unwrap();
    setup(
        dir.path(),
        "config: portcullis.yaml
cases:
  - name: create
    request: {method: POST, path: /orders}
    expect: {decision: deny, status: 401, reason: credential_missing}
  - name: read
    request: {path: /orders/1}
    expect: {decision: deny, status: 401, reason: credential_missing}
",
    );
    let (code, out) = portcullis_test(&["tests.yaml"], dir.path());
    assert_eq!(code, Some(0), "{out}");
    assert!(
        out.contains("(route orders-create): this route requires a bearer token\n"),
        "{out}"
    );
    assert!(
        out.contains("(route orders-read): this route requires a bearer token or an API key\n"),
        "{out}"
    );
}

/// A caller revoked in the config's revocation file is refused, 401 `revoked`.
#[test]
fn a_revoked_caller_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    setup(
        dir.path(),
        "config: portcullis.yaml
cases:
  - name: mallory is revoked
    request: {path: /orders/1}
    as: {claims: {sub: mallory, scope: orders:read}}
    expect: {decision: deny, status: 401, reason: revoked}
",
    );
    let config = std::fs::read_to_string(dir.path().join("portcullis.yaml")).unwrap();
    let revocations = dir.path().join("revocations.yaml");
    std::fs::write(&revocations, "revoked:\n  - {sub: mallory}\n").unwrap();
    let root_file = support::repo_root().join("config/revocations.yaml");
    let config = config.replace(
        &format!("file: {}", root_file.display()),
        &format!("file: {}", revocations.display()),
    );
    std::fs::write(dir.path().join("portcullis.yaml"), config).unwrap();
    let (code, out) = portcullis_test(&["tests.yaml"], dir.path());
    assert_eq!(code, Some(0), "{out}");
}

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

/// `explain` shows the challenge the server sends: an API key's own, not the Bearer one.
#[test]
fn explain_shows_the_challenge_the_server_would_send() {
    let root = support::repo_root();
    let (code, out) = portcullis(
        &[
            "explain",
            "--path",
            "/orders/42",
            "--header",
            "x-api-key: pck_not-a-key-000000000000000000000000000000",
        ],
        &root,
    );
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

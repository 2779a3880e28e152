//! The benchmark harness's Rust half (`bench/run.sh` drives it through `bench/harness.py`):
//! JWKS and token generation, pre-encoded CheckRequests for h2load, a no-op ext_authz server
//! (the floor of the gRPC hop), an open-loop HTTP/1.1 load generator, and a gRPC filler that
//! pushes distinct tokens through Portcullis for the memory measurement.
//!
//! It is a measuring tool, never part of the authorization path. It is built as a cargo
//! example so `cargo test` and clippy compile it in CI; benchmarks never fail CI on speed.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use envoy_types::ext_authz::v3::pb::{
    Authorization, AuthorizationServer, CheckRequest, CheckResponse, DeniedHttpResponse,
    HeaderAppendAction, HeaderValue, HeaderValueOption, HttpResponse, HttpStatus, OkHttpResponse,
};
use envoy_types::pb::envoy::service::auth::v3::AttributeContext;
use envoy_types::pb::envoy::service::auth::v3::attribute_context::{HttpRequest, Request};
use envoy_types::pb::envoy::service::auth::v3::authorization_client::AuthorizationClient;
use envoy_types::pb::google::rpc;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use prost::Message;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The same allocator as the portcullis binary, so the floor is not flattered or handicapped.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Debug, Parser)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Debug, clap::Args)]
struct Signer {
    /// Private key (PEM).
    #[arg(long)]
    key: PathBuf,
    /// RS256, PS256, ES256 or EdDSA.
    #[arg(long)]
    alg: String,
    #[arg(long)]
    kid: String,
    #[arg(long)]
    issuer: String,
    #[arg(long)]
    audience: String,
    /// Scope granted to allowed tokens.
    #[arg(long, default_value = "orders:read")]
    scope: String,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Writes a one-key JWKS for a private key.
    Jwks {
        #[arg(long)]
        key: PathBuf,
        #[arg(long)]
        alg: String,
        #[arg(long)]
        kid: String,
        #[arg(long)]
        out: PathBuf,
    },
    /// Writes `count` distinct signed tokens, one a line. With `--deny-every N`, every Nth
    /// token lacks the scope (a 403 in every scenario that checks grants).
    Tokens {
        #[command(flatten)]
        signer: Signer,
        #[arg(long)]
        count: usize,
        #[arg(long)]
        deny_every: Option<usize>,
        #[arg(long)]
        out: PathBuf,
    },
    /// Writes one gRPC-framed CheckRequest (for `h2load -d`) for the first token of a file.
    GrpcRequest {
        #[arg(long)]
        tokens: PathBuf,
        #[arg(long, default_value = "/orders/42")]
        path: String,
        #[arg(long)]
        out: PathBuf,
    },
    /// Sends one Check for the first token of a file and prints the gRPC status code.
    Check {
        #[arg(long)]
        addr: SocketAddr,
        #[arg(long)]
        tokens: PathBuf,
        #[arg(long, default_value = "/orders/42")]
        path: String,
    },
    /// The no-op ext_authz server: allows any request with an Authorization header.
    Noop {
        /// `HOST:PORT`, or `unix:/path` for a Unix domain socket.
        #[arg(long)]
        listen: String,
        /// Allow with the identity headers the benchmark's Portcullis config sets (subject
        /// and scopes, fixed values of the same length), so that Envoy's cost of applying
        /// an allow's header mutations is in the floor (scenario Fx).
        #[arg(long)]
        identity_headers: bool,
    },
    /// The no-op for Envoy's HTTP ext_authz API (`http_service`, HTTP/2 without TLS): 200
    /// for any request with an Authorization header, else 401. The floor of the HTTP hop,
    /// measured for comparison; Portcullis itself serves the gRPC API.
    NoopHttp {
        /// `HOST:PORT`.
        #[arg(long)]
        listen: SocketAddr,
    },
    /// How long this machine's caches keep a working set nobody touches: times a fixed pattern
    /// of random reads over `--kib` of memory, right after the previous pass and after leaving
    /// it untouched (spinning on a clock) for each gap. Prints one JSON line. Explains the
    /// open-loop figures: at partial load, Envoy's and the authorizer's code and data sit idle
    /// between requests, and on a shared VM other tenants evict them from the last-level cache.
    CacheDecay {
        /// Working sets in KiB, comma-separated (one that fits the core's L2, one that does not).
        #[arg(long, default_value = "1024,8192")]
        kib: String,
        /// Idle gaps in microseconds, comma-separated.
        #[arg(long, default_value = "0,100,500,2000")]
        gaps_us: String,
        /// Timed passes per (working set, gap).
        #[arg(long, default_value_t = 1500)]
        passes: usize,
    },
    /// Open-loop HTTP/1.1 GETs at a constant rate; prints one JSON line of results. With
    /// several `--addr`, the load moves from one to the next every `--slice` seconds (each
    /// connection keeps one keep-alive connection per address), and each address gets its
    /// own latencies: systems compared side by side meet the machine's stalls alike.
    OpenLoop {
        #[arg(long, required = true)]
        addr: Vec<SocketAddr>,
        /// Seconds the load stays on one address before moving to the next (several `--addr`).
        #[arg(long, default_value_t = 1.0)]
        slice: f64,
        #[arg(long, default_value = "/orders/42")]
        path: String,
        #[arg(long)]
        tokens: PathBuf,
        /// Requests per second, over all connections.
        #[arg(long)]
        rate: f64,
        /// Seconds.
        #[arg(long)]
        duration: f64,
        #[arg(long, default_value_t = 32)]
        connections: usize,
        /// Pace with the timer alone (millisecond resolution) instead of yielding up to the
        /// exact send instant.
        #[arg(long)]
        timer_only: bool,
    },
    /// Sends `count` Checks rotating through a file's tokens (the `i`th Check carries token
    /// `i mod n`), `concurrency` at a time; prints a JSON line. Drives an authorizer running
    /// under valgrind for `bench/run.sh instructions`.
    Replay {
        #[arg(long)]
        addr: SocketAddr,
        #[arg(long)]
        tokens: PathBuf,
        #[arg(long)]
        count: u64,
        #[arg(long, default_value_t = 16)]
        concurrency: usize,
    },
    /// Sends `count` Checks, each with a freshly signed distinct token; prints a JSON line.
    Fill {
        #[arg(long)]
        addr: SocketAddr,
        #[command(flatten)]
        signer: Signer,
        #[arg(long)]
        count: u64,
        #[arg(long, default_value_t = 64)]
        concurrency: usize,
    },
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Cmd::Jwks { key, alg, kid, out } => {
            let alg = parse_alg(&alg)?;
            let key = encoding_key(&key, alg)?;
            let mut jwk = jsonwebtoken::jwk::Jwk::from_encoding_key(&key, alg)?;
            jwk.common.key_id = Some(kid);
            let doc = serde_json::json!({ "keys": [jwk] });
            std::fs::write(&out, serde_json::to_string_pretty(&doc)?)
                .with_context(|| format!("cannot write `{}`", out.display()))?;
            Ok(())
        }
        Cmd::Tokens {
            signer,
            count,
            deny_every,
            out,
        } => {
            let s = TokenSigner::new(&signer)?;
            let mut text = String::with_capacity(count * 700);
            for i in 0..count {
                let allowed = deny_every.is_none_or(|n| i % n != n - 1);
                text.push_str(&s.sign(i as u64, allowed)?);
                text.push('\n');
            }
            std::fs::write(&out, text)
                .with_context(|| format!("cannot write `{}`", out.display()))?;
            Ok(())
        }
        Cmd::GrpcRequest { tokens, path, out } => {
            let token = first_token(&tokens)?;
            let body = check_request(&token, &path).encode_to_vec();
            let mut framed = Vec::with_capacity(body.len() + 5);
            framed.push(0);
            framed.extend_from_slice(&u32::try_from(body.len())?.to_be_bytes());
            framed.extend_from_slice(&body);
            std::fs::write(&out, framed)
                .with_context(|| format!("cannot write `{}`", out.display()))?;
            Ok(())
        }
        Cmd::Check { addr, tokens, path } => runtime()?.block_on(async move {
            let token = first_token(&tokens)?;
            let mut client = AuthorizationClient::connect(format!("http://{addr}")).await?;
            let resp = client
                .check(check_request(&token, &path))
                .await?
                .into_inner();
            println!("{}", resp.status.map_or(-1, |s| s.code));
            Ok(())
        }),
        Cmd::Noop {
            listen,
            identity_headers,
        } => runtime()?.block_on(async move {
            let server = tonic::transport::Server::builder()
                .add_service(AuthorizationServer::new(Noop { identity_headers }));
            if let Some(path) = listen.strip_prefix("unix:") {
                let _ = std::fs::remove_file(path);
                let uds = tokio::net::UnixListener::bind(path)
                    .with_context(|| format!("cannot listen on `{listen}`"))?;
                server
                    .serve_with_incoming(tokio_stream::wrappers::UnixListenerStream::new(uds))
                    .await?;
            } else {
                let addr: SocketAddr = listen.parse().context("bad --listen")?;
                let incoming = tonic::transport::server::TcpIncoming::bind(addr)
                    .map_err(|e| anyhow::anyhow!("cannot listen on `{listen}`: {e}"))?
                    .with_nodelay(Some(true));
                server.serve_with_incoming(incoming).await?;
            }
            Ok(())
        }),
        Cmd::NoopHttp { listen } => runtime()?.block_on(noop_http(listen)),
        Cmd::CacheDecay {
            kib,
            gaps_us,
            passes,
        } => cache_decay(&parse_list(&kib)?, &parse_list(&gaps_us)?, passes),
        Cmd::OpenLoop {
            addr,
            slice,
            path,
            tokens,
            rate,
            duration,
            connections,
            timer_only,
        } => {
            if !slice.is_finite() || slice <= 0.0 {
                bail!("--slice must be a positive number of seconds");
            }
            let tokens = read_tokens(&tokens)?;
            runtime()?.block_on(open_loop(
                OpenLoopTargets { addrs: addr, slice },
                path,
                tokens,
                rate,
                duration,
                connections,
                timer_only,
            ))
        }
        Cmd::Fill {
            addr,
            signer,
            count,
            concurrency,
        } => runtime()?.block_on(fill(addr, signer, count, concurrency)),
        Cmd::Replay {
            addr,
            tokens,
            count,
            concurrency,
        } => {
            let tokens = read_tokens(&tokens)?;
            runtime()?.block_on(send_checks(addr, count, concurrency, move |i| {
                Ok(tokens[(i % tokens.len() as u64) as usize].clone())
            }))
        }
    }
}

/// The load side runs on one core (`taskset`), so one thread is all it gets anyway.
fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?)
}

fn parse_alg(alg: &str) -> anyhow::Result<Algorithm> {
    Ok(match alg {
        "RS256" => Algorithm::RS256,
        "PS256" => Algorithm::PS256,
        "ES256" => Algorithm::ES256,
        "EdDSA" => Algorithm::EdDSA,
        other => bail!("unsupported algorithm `{other}` (RS256, PS256, ES256, EdDSA)"),
    })
}

fn encoding_key(path: &PathBuf, alg: Algorithm) -> anyhow::Result<EncodingKey> {
    let pem = std::fs::read(path).with_context(|| format!("cannot read `{}`", path.display()))?;
    Ok(match alg {
        Algorithm::ES256 => EncodingKey::from_ec_pem(&pem)?,
        Algorithm::EdDSA => EncodingKey::from_ed_pem(&pem)?,
        _ => EncodingKey::from_rsa_pem(&pem)?,
    })
}

struct TokenSigner {
    key: EncodingKey,
    header: Header,
    issuer: String,
    audience: String,
    scope: String,
    now: u64,
}

impl TokenSigner {
    fn new(s: &Signer) -> anyhow::Result<Self> {
        let alg = parse_alg(&s.alg)?;
        let mut header = Header::new(alg);
        header.kid = Some(s.kid.clone());
        Ok(Self {
            key: encoding_key(&s.key, alg)?,
            header,
            issuer: s.issuer.clone(),
            audience: s.audience.clone(),
            scope: s.scope.clone(),
            now: SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs(),
        })
    }

    /// Token `i`: a distinct subject; allowed tokens carry the scope, denied ones do not.
    fn sign(&self, i: u64, allowed: bool) -> anyhow::Result<String> {
        let scope = if allowed {
            format!("{} profile", self.scope)
        } else {
            "profile".to_string()
        };
        let claims = serde_json::json!({
            "iss": self.issuer,
            "aud": self.audience,
            "sub": format!("user-{i}"),
            "scope": scope,
            "tenants": ["t1", "t2"],
            "iat": self.now,
            "exp": self.now + 6 * 3600,
        });
        Ok(jsonwebtoken::encode(&self.header, &claims, &self.key)?)
    }
}

fn read_tokens(path: &PathBuf) -> anyhow::Result<Vec<String>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read `{}`", path.display()))?;
    let tokens: Vec<String> = text.lines().map(str::to_string).collect();
    if tokens.is_empty() {
        bail!("no tokens in `{}`", path.display());
    }
    Ok(tokens)
}

fn first_token(path: &PathBuf) -> anyhow::Result<String> {
    Ok(read_tokens(path)?.swap_remove(0))
}

/// The CheckRequest Envoy sends for `GET {path}` with a bearer token (the headers a default
/// Envoy ext_authz filter forwards for a wrk request).
fn check_request(token: &str, path: &str) -> CheckRequest {
    let headers: HashMap<String, String> = [
        (":authority", "127.0.0.1"),
        (":method", "GET"),
        (":path", path),
        (":scheme", "http"),
        ("x-forwarded-proto", "http"),
        ("x-request-id", "2f1d1a0e-7c55-4c4e-9d0b-6c1f0f9b7a11"),
        ("x-envoy-expected-rq-timeout-ms", "15000"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .chain([("authorization".to_string(), format!("Bearer {token}"))])
    .collect();
    CheckRequest {
        attributes: Some(AttributeContext {
            request: Some(Request {
                http: Some(HttpRequest {
                    id: "1".into(),
                    method: "GET".into(),
                    path: path.into(),
                    host: "127.0.0.1".into(),
                    scheme: "http".into(),
                    protocol: "HTTP/1.1".into(),
                    headers,
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }),
    }
}

/// Allows any request carrying an Authorization header, denies the rest: the cheapest
/// possible ext_authz server, so a scenario behind it measures only the hop. With
/// `identity_headers`, an allow carries the two headers Portcullis's allow carries in the
/// benchmark (`x-portcullis-subject`, `x-portcullis-scopes`), fixed values of the same
/// length, so the floor includes what Envoy spends applying them.
struct Noop {
    identity_headers: bool,
}

#[tonic::async_trait]
impl Authorization for Noop {
    async fn check(
        &self,
        request: tonic::Request<CheckRequest>,
    ) -> Result<tonic::Response<CheckResponse>, tonic::Status> {
        let has_auth = request
            .get_ref()
            .attributes
            .as_ref()
            .and_then(|a| a.request.as_ref())
            .and_then(|r| r.http.as_ref())
            .is_some_and(|h| h.headers.contains_key("authorization"));
        let resp = if has_auth {
            let identity = || OkHttpResponse {
                headers: [
                    ("x-portcullis-subject", "user-4242"),
                    ("x-portcullis-scopes", "orders:read profile"),
                ]
                .into_iter()
                .map(|(key, value)| HeaderValueOption {
                    header: Some(HeaderValue {
                        key: key.into(),
                        value: value.into(),
                        ..Default::default()
                    }),
                    append_action: HeaderAppendAction::OverwriteIfExistsOrAdd as i32,
                    ..Default::default()
                })
                .collect(),
                ..Default::default()
            };
            CheckResponse {
                status: Some(rpc::Status::default()),
                http_response: self
                    .identity_headers
                    .then(|| HttpResponse::OkResponse(identity())),
                ..Default::default()
            }
        } else {
            CheckResponse {
                status: Some(rpc::Status {
                    code: 16,
                    ..Default::default()
                }),
                http_response: Some(HttpResponse::DeniedResponse(DeniedHttpResponse {
                    status: Some(HttpStatus { code: 401 }),
                    ..Default::default()
                })),
                ..Default::default()
            }
        };
        Ok(tonic::Response::new(resp))
    }
}

async fn noop_http(listen: SocketAddr) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("cannot listen on `{listen}`"))?;
    let mut builder =
        hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new());
    builder.auto_date_header(false);
    loop {
        let (stream, _) = listener.accept().await?;
        stream.set_nodelay(true)?;
        let conn = builder.serve_connection(
            hyper_util::rt::TokioIo::new(stream),
            hyper::service::service_fn(|req: hyper::Request<hyper::body::Incoming>| async move {
                let status = if req.headers().contains_key("authorization") {
                    200
                } else {
                    401
                };
                let mut resp = hyper::Response::new(http_body_util::Empty::<bytes::Bytes>::new());
                *resp.status_mut() = hyper::StatusCode::from_u16(status)?;
                Ok::<_, anyhow::Error>(resp)
            }),
        );
        tokio::spawn(async move {
            let _ = conn.await;
        });
    }
}

#[derive(Default)]
struct ConnResult {
    latencies_us: Vec<u32>,
    ok: u64,
    non2xx: u64,
    errors: u64,
}

fn parse_list(list: &str) -> anyhow::Result<Vec<u64>> {
    list.split(',')
        .map(|x| {
            x.trim()
                .parse()
                .with_context(|| format!("`{x}` is not a number"))
        })
        .collect()
}

/// See `Cmd::CacheDecay`. Each pass makes 4096 reads at pseudo-random offsets (independent of
/// each other, like the lookups of many requests); the result is nanoseconds per read, the
/// median over the passes, for each working set and gap.
fn cache_decay(kibs: &[u64], gaps_us: &[u64], passes: usize) -> anyhow::Result<()> {
    const READS: u64 = 4096;
    let mut out = Vec::new();
    for &kib in kibs {
        let words = usize::try_from(kib * 1024 / 8).context("working set too large")?;
        if words == 0 {
            bail!("a working set of {kib} KiB is too small");
        }
        let set: Vec<u64> = (0..words as u64)
            .map(|i| i.wrapping_mul(0x9E37_79B9))
            .collect();
        let mut points = Vec::new();
        for &gap in gaps_us {
            let mut state = 0x2545_F491_4F6C_DD1D_u64;
            let mut sink = 0u64;
            let mut times = Vec::with_capacity(passes);
            // The first passes bring the set in; they are not timed.
            for pass in 0..passes + 20 {
                let t0 = Instant::now();
                for _ in 0..READS {
                    state = state
                        .wrapping_mul(6_364_136_223_846_793_005)
                        .wrapping_add(1_442_695_040_888_963_407);
                    sink = sink.wrapping_add(set[(state >> 24) as usize % words]);
                }
                if pass >= 20 {
                    times.push(t0.elapsed());
                }
                let idle_until = Instant::now() + Duration::from_micros(gap);
                while Instant::now() < idle_until {
                    std::hint::spin_loop();
                }
            }
            std::hint::black_box(sink);
            times.sort_unstable();
            let median = times[times.len() / 2];
            points.push(serde_json::json!({
                "gap_us": gap,
                "ns_per_read": (median.as_nanos() as f64 / READS as f64 * 100.0).round() / 100.0,
            }));
        }
        out.push(serde_json::json!({"kib": kib, "points": points}));
    }
    println!("{}", serde_json::json!({ "cache_decay": out }));
    Ok(())
}

/// Where an open loop sends: one address, or several taking turns of `slice` seconds.
struct OpenLoopTargets {
    addrs: Vec<SocketAddr>,
    slice: f64,
}

impl OpenLoopTargets {
    /// The address a request meant to be sent `secs` after the start goes to. (The nudge
    /// keeps a request due exactly at a turn's start in that turn: 120/200 s is
    /// 2.9999999999999996 turns of 0.2 s in floating point.)
    fn at(&self, secs: f64) -> usize {
        (secs / self.slice + 1e-9) as usize % self.addrs.len()
    }
}

/// Constant-rate load in the manner of wrk2: connection `k` of `C` sends request `i` at
/// `start + (i*C + k) / rate`. Latency counts from the intended send time when the previous
/// response on that connection came back late (the system was behind: no coordinated
/// omission), and from the actual send otherwise (so the load generator's own scheduling
/// slack is not blamed on the system under test). With several targets, each request goes
/// to the one whose turn its intended send time falls in, and "came back late" compares
/// with the previous response from that same target.
async fn open_loop(
    targets: OpenLoopTargets,
    path: String,
    tokens: Vec<String>,
    rate: f64,
    duration: f64,
    connections: usize,
    timer_only: bool,
) -> anyhow::Result<()> {
    let requests: Arc<Vec<Vec<u8>>> = Arc::new(
        tokens
            .iter()
            .map(|t| {
                format!(
                    "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {t}\r\n\r\n"
                )
                .into_bytes()
            })
            .collect(),
    );
    let targets = Arc::new(targets);
    let n_targets = targets.addrs.len();
    let start = Instant::now() + Duration::from_millis(50);
    let end = start + Duration::from_secs_f64(duration);
    let mut tasks = Vec::new();
    for k in 0..connections {
        let requests = requests.clone();
        let targets = targets.clone();
        tasks.push(tokio::spawn(async move {
            let mut results: Vec<ConnResult> =
                (0..n_targets).map(|_| ConnResult::default()).collect();
            let mut streams = Vec::with_capacity(n_targets);
            for (t, addr) in targets.addrs.iter().enumerate() {
                let Ok(stream) = tokio::net::TcpStream::connect(addr).await else {
                    results[t].errors += 1;
                    return results;
                };
                let _ = stream.set_nodelay(true);
                streams.push(stream);
            }
            let mut buf = vec![0u8; 16 * 1024];
            let mut prev_done = vec![start; n_targets];
            let mut i: u64 = 0;
            loop {
                let n = i * connections as u64 + k as u64;
                let intended = start + Duration::from_secs_f64(n as f64 / rate);
                if intended >= end {
                    break;
                }
                let t = targets.at(n as f64 / rate);
                let (stream, res) = (&mut streams[t], &mut results[t]);
                // The timer wheel has millisecond resolution and wakes every connection due in
                // the same millisecond together: a burst the system under test would have to
                // queue. Sleep to within a millisecond, then yield until the exact instant
                // (CPU 0 belongs to the load generator, so spinning there costs nothing).
                if timer_only {
                    tokio::time::sleep_until(intended.into()).await;
                } else {
                    if let Some(early) = intended.checked_sub(Duration::from_millis(1))
                        && early > Instant::now()
                    {
                        tokio::time::sleep_until(early.into()).await;
                    }
                    while Instant::now() < intended {
                        tokio::task::yield_now().await;
                    }
                }
                let sent = Instant::now();
                let from = if prev_done[t] > intended {
                    intended
                } else {
                    sent
                };
                let req = &requests[(n % requests.len() as u64) as usize];
                match roundtrip(stream, req, &mut buf).await {
                    Ok(status) => {
                        let done = Instant::now();
                        prev_done[t] = done;
                        res.latencies_us
                            .push(u32::try_from((done - from).as_micros()).unwrap_or(u32::MAX));
                        if (200..300).contains(&status) {
                            res.ok += 1;
                        } else {
                            res.non2xx += 1;
                        }
                    }
                    Err(_) => {
                        res.errors += 1;
                        break;
                    }
                }
                i += 1;
            }
            results
        }));
    }
    let mut all: Vec<ConnResult> = (0..n_targets).map(|_| ConnResult::default()).collect();
    for task in tasks {
        for (all, r) in all.iter_mut().zip(task.await?) {
            all.latencies_us.extend(r.latencies_us);
            all.ok += r.ok;
            all.non2xx += r.non2xx;
            all.errors += r.errors;
        }
    }
    // Each target had the load for its share of the turns.
    let seconds = duration / n_targets as f64;
    let mut reports: Vec<serde_json::Value> = all
        .iter_mut()
        .map(|all| open_loop_report(all, rate, seconds))
        .collect();
    if let [one] = reports.as_mut_slice() {
        println!("{}", one.take());
    } else {
        for (report, addr) in reports.iter_mut().zip(&targets.addrs) {
            report["addr"] = addr.to_string().into();
        }
        println!(
            "{}",
            serde_json::json!({ "rate": rate, "slice": targets.slice, "targets": reports })
        );
    }
    Ok(())
}

/// One target's latencies and answers as the open loop reports them.
fn open_loop_report(all: &mut ConnResult, rate: f64, seconds: f64) -> serde_json::Value {
    all.latencies_us.sort_unstable();
    let pct = |p: f64| -> u32 {
        let l = &all.latencies_us;
        if l.is_empty() {
            return 0;
        }
        let idx = ((p / 100.0) * (l.len() - 1) as f64).round() as usize;
        l[idx.min(l.len() - 1)]
    };
    let done = all.ok + all.non2xx;
    serde_json::json!({
        "rate": rate,
        "achieved_rps": done as f64 / seconds,
        "ok": all.ok,
        "non2xx": all.non2xx,
        "errors": all.errors,
        "p50_us": pct(50.0),
        "p99_us": pct(99.0),
        "p999_us": pct(99.9),
        "max_us": all.latencies_us.last().copied().unwrap_or(0),
    })
}

/// One HTTP/1.1 request/response on a keep-alive connection; returns the status code.
/// Only what Envoy's `direct_response` and local replies produce is handled: a
/// `content-length` body, no chunking.
async fn roundtrip(
    stream: &mut tokio::net::TcpStream,
    req: &[u8],
    buf: &mut [u8],
) -> anyhow::Result<u16> {
    stream.write_all(req).await?;
    let mut len = 0;
    loop {
        let n = stream.read(&mut buf[len..]).await?;
        if n == 0 {
            bail!("connection closed");
        }
        len += n;
        let Some(head_end) = find(&buf[..len], b"\r\n\r\n") else {
            if len == buf.len() {
                bail!("response head too large");
            }
            continue;
        };
        let head = std::str::from_utf8(&buf[..head_end])?;
        let status: u16 = head
            .split(' ')
            .nth(1)
            .context("no status")?
            .parse()
            .context("bad status")?;
        let body_len: usize = head
            .split("\r\n")
            .find_map(|l| {
                let (k, v) = l.split_once(':')?;
                k.eq_ignore_ascii_case("content-length")
                    .then(|| v.trim().parse().ok())
                    .flatten()
            })
            .unwrap_or(0);
        let total = head_end + 4 + body_len;
        while len < total {
            if total > buf.len() {
                bail!("response body too large");
            }
            let n = stream.read(&mut buf[len..total]).await?;
            if n == 0 {
                bail!("connection closed");
            }
            len += n;
        }
        return Ok(status);
    }
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// Pushes `count` distinct tokens through Portcullis (each signed here, just in time), so
/// its token cache sees `count` distinct entries.
async fn fill(
    addr: SocketAddr,
    signer: Signer,
    count: u64,
    concurrency: usize,
) -> anyhow::Result<()> {
    let signer = TokenSigner::new(&signer)?;
    send_checks(addr, count, concurrency, move |i| signer.sign(i, true)).await
}

/// Sends `count` Checks, the `i`th with the token `token(i)`, `concurrency` at a time over
/// one HTTP/2 connection; prints one JSON line (sent, allowed, denied, seconds).
async fn send_checks(
    addr: SocketAddr,
    count: u64,
    concurrency: usize,
    token: impl Fn(u64) -> anyhow::Result<String> + Send + Sync + 'static,
) -> anyhow::Result<()> {
    let token = Arc::new(token);
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))?
        .tcp_nodelay(true)
        .connect()
        .await?;
    let next = Arc::new(AtomicU64::new(0));
    let allowed = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..concurrency.max(1) {
        let (token, next, allowed) = (token.clone(), next.clone(), allowed.clone());
        let mut client = AuthorizationClient::new(channel.clone());
        tasks.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= count {
                    return anyhow::Ok(());
                }
                let token = token(i)?;
                let resp = client
                    .check(check_request(&token, "/orders/42"))
                    .await?
                    .into_inner();
                if resp.status.is_some_and(|s| s.code == 0) {
                    allowed.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }
    for t in tasks {
        t.await??;
    }
    let allowed = allowed.load(Ordering::Relaxed);
    println!(
        "{}",
        serde_json::json!({
            "sent": count,
            "allowed": allowed,
            "denied": count - allowed,
            "seconds": started.elapsed().as_secs_f64(),
        })
    );
    Ok(())
}

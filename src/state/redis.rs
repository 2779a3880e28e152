//! The Redis backend of `StateStore`: several replicas behind one Envoy share one Redis and
//! so agree on single-use records, use counters and rate-limit buckets.
//!
//! Every operation is one atomic Redis command or one Lua script (`SET NX PX` for
//! `insert_if_absent`, a script for `take_one` and the GCRA `rate_check`, which reads the
//! Redis server's clock so replicas with skewed clocks still share one bucket). Every
//! operation is bounded by the configured timeout: a dead or slow Redis is a `StateError`
//! within that time, and callers fail closed. The connection is made lazily and remade
//! automatically, so Portcullis starts while Redis is down and recovers when it returns.
//!
//! TLS (`rediss://`): rustls with the aws-lc-rs provider. The server certificate is verified
//! against `state.tls.ca_file` when set, else the system's trusted roots; never skipped
//! (`#insecure` is refused by the config, and the client is built without the feature that
//! would honour it). A handshake that fails is an outage like any other: operations fail
//! with a `StateError` (so decisions needing state fail closed) and the next one tries again.
//!
//! INVARIANT: the Redis URL (which may hold a password) never appears in an error or a log
//! line; errors name only what failed.

use std::path::Path;
use std::time::{Duration, Instant};

use ::redis::aio::{ConnectionManager, ConnectionManagerConfig};
use ::redis::{AsyncCommands, Script, Value};
use tokio::sync::Mutex;

use super::{RateLimit, RateOutcome, StateError, StateStore};

/// After a failed connect, new operations fail at once for this long instead of each
/// waiting for its own connect timeout; then the next operation tries again.
const RECONNECT_PAUSE: Duration = Duration::from_millis(250);

/// Returns the value after the decrement; -1 when missing, expired or zero; -2 when the value
/// is not an integer. `DECR` keeps the key's expiry.
const TAKE_ONE: &str = r"
local v = redis.call('GET', KEYS[1])
if not v then return -1 end
local n = tonumber(v)
if not n or n ~= math.floor(n) then return -2 end
if n <= 0 then return -1 end
return redis.call('DECR', KEYS[1])
";

/// GCRA on the server's clock, in microseconds, over every bucket of KEYS at once: each
/// counts the request only when all of them have room. ARGV: an emission interval and a
/// burst per key. Returns {0, then allowed (0/1), reset_us, retry_after_us per key}, or
/// {-2, i} when the value at KEYS[i] is not a number. A stored arrival time further ahead
/// than the limit can reach (left by a stricter limit under the same id) is read as full,
/// and kept so even when the request is refused.
const GCRA: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local out = {0}
local tats = {}
local clamped = {}
local all = true
for i = 1, #KEYS do
  local interval = tonumber(ARGV[2 * i - 1])
  local burst = tonumber(ARGV[2 * i])
  local stored = redis.call('GET', KEYS[i])
  local tat = now
  if stored then
    local parsed = tonumber(stored)
    if not parsed then return {-2, i} end
    if parsed > now then tat = parsed end
  end
  local cap = now + interval * burst
  if tat > cap then
    tat = cap
    clamped[i] = cap
  end
  local allow_at = tat - interval * (burst - 1)
  if allow_at > now then
    all = false
    table.insert(out, 0)
    table.insert(out, tat - now)
    table.insert(out, allow_at - now)
  else
    tats[i] = tat + interval
    table.insert(out, 1)
    table.insert(out, tat + interval - now)
    table.insert(out, 0)
  end
end
local function store(i, tat)
  redis.call('SET', KEYS[i], string.format('%.0f', tat), 'PX', math.floor((tat - now) / 1000) + 1)
end
if all then
  for i = 1, #KEYS do store(i, tats[i]) end
else
  for i, cap in pairs(clamped) do store(i, cap) end
end
return out
";

/// Removes ARGV[1] from the sorted set; returns 1 when it was there with an expiry (score)
/// after ARGV[2], else 0.
const INDEX_REMOVE: &str = r"
local score = redis.call('ZSCORE', KEYS[1], ARGV[1])
redis.call('ZREM', KEYS[1], ARGV[1])
if score and tonumber(score) > tonumber(ARGV[2]) then return 1 end
return 0
";

/// Drops the members of the sorted set expired for over ARGV[2] seconds, then lists those
/// expiring after ARGV[1] (the caller's clock). Prunes by the earlier of the caller's clock
/// and the Redis server's, so a replica whose clock runs fast cannot delete entries still in
/// force for the others. Returns {server time in seconds, flat member/score list}.
const INDEX_LIST: &str = r"
local t = redis.call('TIME')
local server = tonumber(t[1])
local cut = math.min(tonumber(ARGV[1]), server) - tonumber(ARGV[2])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', string.format('%d', cut))
return {server, redis.call('ZRANGEBYSCORE', KEYS[1], '(' .. ARGV[1], '+inf', 'WITHSCORES')}
";

/// Sets the member's score to ARGV[1] unless it already has a later one; returns the score
/// it has after.
const INDEX_ADD: &str = r"
redis.call('ZADD', KEYS[1], 'GT', ARGV[1], ARGV[2])
return redis.call('ZSCORE', KEYS[1], ARGV[2])
";

/// How far this replica's clock may be from the Redis server's before it is logged: expiries
/// of approvals and runtime revocations are read on each replica's own clock.
const CLOCK_SKEW_WARN_SECS: i64 = 30;

/// Shared state in Redis.
pub struct RedisStore {
    client: ::redis::Client,
    prefix: String,
    timeout: Duration,
    conn: Mutex<Conn>,
    take_one: Script,
    gcra: Script,
    index_remove: Script,
    index_list: Script,
    index_add: Script,
    /// True while the last listing found this replica's clock off the server's.
    skewed: std::sync::atomic::AtomicBool,
}

#[derive(Default)]
struct Conn {
    manager: Option<ConnectionManager>,
    failed_at: Option<Instant>,
}

impl RedisStore {
    /// A store for `url` (not connected yet: the first operation connects). `prefix` is put
    /// in front of every key. Errors never contain the URL.
    pub fn new(url: &str, prefix: &str, timeout: Duration) -> Result<Self, StateError> {
        Self::with_tls(url, None, prefix, timeout)
    }

    /// As `new`, for a `rediss://` URL with `state.tls`'s files (from `load_tls`): the
    /// server is verified against their CA instead of the system's roots, and the client
    /// certificate is presented. `None`: the system's roots, no client certificate.
    pub fn with_tls(
        url: &str,
        tls: Option<&RedisTls>,
        prefix: &str,
        timeout: Duration,
    ) -> Result<Self, StateError> {
        let client = match tls {
            None => ::redis::Client::open(url),
            Some(tls) => ::redis::Client::build_with_tls(url, tls.certificates()),
        }
        .map_err(|e| StateError::Unavailable(format!("invalid redis url ({})", e.category())))?;
        Ok(Self {
            client,
            prefix: prefix.to_string(),
            timeout,
            conn: Mutex::new(Conn::default()),
            take_one: Script::new(TAKE_ONE),
            gcra: Script::new(GCRA),
            index_remove: Script::new(INDEX_REMOVE),
            index_list: Script::new(INDEX_LIST),
            index_add: Script::new(INDEX_ADD),
            skewed: std::sync::atomic::AtomicBool::new(false),
        })
    }

    fn key(&self, key: &str) -> String {
        format!("{}{key}", self.prefix)
    }

    /// The shared connection, connecting first when there is none.
    async fn connection(&self) -> Result<ConnectionManager, StateError> {
        let mut conn = self.conn.lock().await;
        if let Some(m) = &conn.manager {
            return Ok(m.clone());
        }
        if conn
            .failed_at
            .is_some_and(|t| t.elapsed() < RECONNECT_PAUSE)
        {
            return Err(unavailable("redis is unreachable"));
        }
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(self.timeout)
            .set_response_timeout(self.timeout)
            // No retry inside the connect: a retry pushed an authentication failure past the
            // timeout below, reported as "timed out". The next operation after
            // `RECONNECT_PAUSE` tries again; the manager reconnects by itself later.
            .set_number_of_retries(0)
            .set_max_delay(200);
        let made = tokio::time::timeout(
            self.timeout,
            ConnectionManager::new_with_config(self.client.clone(), config),
        )
        .await;
        match made {
            Ok(Ok(m)) => {
                conn.manager = Some(m.clone());
                conn.failed_at = None;
                Ok(m)
            }
            Ok(Err(e)) => {
                conn.failed_at = Some(Instant::now());
                Err(redis_error(&e))
            }
            Err(_) => {
                conn.failed_at = Some(Instant::now());
                Err(unavailable("redis connect timed out"))
            }
        }
    }

    /// Runs a listing (many keys, or one large set) within ten operation timeouts.
    async fn listing<T>(
        &self,
        work: impl std::future::Future<Output = Result<T, ::redis::RedisError>>,
    ) -> Result<T, StateError> {
        match tokio::time::timeout(self.timeout * 10, work).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(redis_error(&e)),
            Err(_) => Err(unavailable("redis did not answer in time")),
        }
    }

    /// Logs when this replica's clock (`now`) strays from the Redis server's (`server`), and
    /// when it is back, not at every listing.
    fn note_clock(&self, now: i64, server: i64) {
        use std::sync::atomic::Ordering;
        let skew = now.saturating_sub(server);
        let off = skew.abs() > CLOCK_SKEW_WARN_SECS;
        if self.skewed.swap(off, Ordering::Relaxed) == off {
            return;
        }
        if off {
            tracing::warn!(
                skew_seconds = skew,
                "this replica's clock differs from the Redis server's: approvals and runtime revocations expire by each replica's own clock, so replicas disagree on them; synchronize the clocks (NTP)"
            );
        } else {
            tracing::info!("this replica's clock agrees with the Redis server's again");
        }
    }

    /// Runs one operation within the timeout. The connection manager reconnects by itself
    /// after a failure; a failed operation is never retried here (a retried `take_one` could
    /// spend two uses).
    async fn run<T, F, Fut>(&self, op: F) -> Result<T, StateError>
    where
        F: FnOnce(ConnectionManager) -> Fut,
        Fut: std::future::Future<Output = Result<T, ::redis::RedisError>>,
    {
        let conn = self.connection().await?;
        // Once sent, an operation that gets no answer may still run: a paused or slow Redis
        // runs it when it gets to it. Such failures are `Unconfirmed`, so that a write's
        // caller does not report it as not done.
        match tokio::time::timeout(self.timeout, op(conn)).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) if e.is_timeout() || e.is_connection_dropped() => {
                Err(match redis_error(&e) {
                    StateError::Unavailable(what) => StateError::Unconfirmed(what),
                    other => other,
                })
            }
            Ok(Err(e)) => Err(redis_error(&e)),
            Err(_) => Err(StateError::Unconfirmed(
                "redis did not answer in time".to_string(),
            )),
        }
    }
}

fn unavailable(what: &str) -> StateError {
    StateError::Unavailable(what.to_string())
}

/// A TLS failure, in fixed words: what to check, never the error's text (rustls names the
/// host it expected, and the certificate's names). `None` when `e` is no TLS failure.
///
/// The redis crate keeps the rustls error inside a private `io::Error`, reachable only as
/// text: that text is classified here, never shown.
fn tls_failure(e: &::redis::RedisError) -> Option<&'static str> {
    // TLS failures are I/O errors; a server's reply (which can quote keys) is never read here.
    if !e.is_io_error() {
        return None;
    }
    let text = e.to_string();
    let has = |s: &str| text.contains(s);
    Some(if has("invalid peer certificate") {
        if has("UnknownIssuer") {
            "redis TLS: the server's certificate is not signed by a trusted CA (`state.tls.ca_file`, or the system's roots without it)"
        } else if has("not valid for name") {
            "redis TLS: the server's certificate is not valid for the host in `state.redis_url`"
        } else if has("expired") || has("Expired") {
            "redis TLS: the server's certificate has expired"
        } else {
            "redis TLS: the server's certificate was refused"
        }
    } else if has("received fatal alert") {
        if has("CertificateRequired") {
            "redis TLS: the server requires a client certificate (`state.tls.cert_file`)"
        } else if has("BadCertificate") || has("UnknownCA") || has("CertificateUnknown") {
            "redis TLS: the server refused the client certificate (`state.tls.cert_file`)"
        } else {
            "redis TLS: the server ended the handshake"
        }
    } else if has("Fetch certs Error") {
        "redis TLS: the system's trusted roots could not be read (or set `state.tls.ca_file`)"
    } else if has("TLS error") || has("TLS Error") || has("peer is incompatible") {
        "redis TLS: the TLS connection could not be set up"
    } else {
        return None;
    })
}

/// A Redis error without its details (which can echo addresses or arguments).
fn redis_error(e: &::redis::RedisError) -> StateError {
    if let Some(what) = tls_failure(e) {
        return unavailable(what);
    }
    let what = if e.is_timeout() {
        "redis did not answer in time"
    } else if e.is_connection_refusal() || e.is_io_error() || e.is_connection_dropped() {
        "redis is unreachable"
    } else if e.code() == Some("WRONGTYPE") {
        // A Lua script's error carries the same code inside its message.
        "a key under `state.key_prefix` holds a value of another type (is something else writing under the prefix?)"
    } else if e.detail().is_some_and(|d| d.contains("WRONGTYPE")) {
        "a key under `state.key_prefix` holds a value of another type (is something else writing under the prefix?)"
    } else {
        // The error code (a fixed word such as NOAUTH or READONLY) names no argument.
        return StateError::Unavailable(match e.code() {
            Some(code) if code.bytes().all(|b| b.is_ascii_uppercase()) => {
                format!("redis refused the operation ({code})")
            }
            _ => format!("redis error ({})", e.category()),
        });
    };
    unavailable(what)
}

/// `state.tls`'s files, read and checked (`load_tls`): what the Redis client is built with.
pub struct RedisTls {
    ca: Option<Vec<u8>>,
    /// Certificate chain and key, both PEM.
    client: Option<(Vec<u8>, Vec<u8>)>,
}

impl RedisTls {
    fn certificates(&self) -> ::redis::TlsCertificates {
        ::redis::TlsCertificates {
            client_tls: self
                .client
                .as_ref()
                .map(|(cert, key)| ::redis::ClientTlsConfig {
                    client_cert: cert.clone(),
                    client_key: key.clone(),
                }),
            root_cert: self.ca.clone(),
        }
    }
}

/// Reads `state.tls`'s files as the server does at start (and `portcullis check`): a file
/// that cannot be read, holds no PEM certificate or key, a CA that rustls cannot use, or a
/// key that is not the certificate's is an error naming `config_file` and the field. `None`
/// without `state.tls` (or without the Redis backend). Never shows key material.
pub fn load_tls(
    config_file: &Path,
    state: &crate::config::schema::StateConfig,
) -> Result<Option<RedisTls>, crate::config::ConfigError> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let Some(tls) = &state.tls else {
        return Ok(None);
    };
    if state.backend != crate::config::schema::StateBackend::Redis {
        return Ok(None);
    }
    let base = config_file.parent().unwrap_or(Path::new(""));
    let err = |name: &str, message: String| crate::config::ConfigError {
        file: config_file.to_path_buf(),
        field: format!("state.tls.{name}"),
        message,
        hint: None,
    };
    let read = |name: &str, path: &Path| {
        let path = crate::keys::resolve_path(base, path);
        std::fs::read(&path)
            .map(|bytes| (path.clone(), bytes))
            .map_err(|e| err(name, format!("cannot read `{}`: {e}", path.display())))
    };
    let ca = match &tls.ca_file {
        None => None,
        Some(file) => {
            let (path, pem) = read("ca_file", file)?;
            let bad = |reason: &str| err("ca_file", format!("`{}` {reason}", path.display()));
            let mut roots = rustls::RootCertStore::empty();
            for cert in CertificateDer::pem_slice_iter(&pem) {
                let cert = cert.map_err(|_| bad("is not a PEM certificate list"))?;
                roots
                    .add(cert)
                    .map_err(|e| bad(&format!("holds an unusable CA certificate: {e}")))?;
            }
            if roots.is_empty() {
                return Err(bad("holds no PEM certificate"));
            }
            Some(pem)
        }
    };
    let client = match (&tls.cert_file, &tls.key_file) {
        (Some(cert_file), Some(key_file)) => {
            let (cert_path, cert_pem) = read("cert_file", cert_file)?;
            let (key_path, key_pem) = read("key_file", key_file)?;
            let certs = crate::tls::pem_certificates(&cert_pem).ok_or_else(|| {
                err(
                    "cert_file",
                    format!("`{}` holds no PEM certificate", cert_path.display()),
                )
            })?;
            let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|_| {
                err(
                    "key_file",
                    format!("`{}` holds no PEM private key", key_path.display()),
                )
            })?;
            let provider = rustls::crypto::aws_lc_rs::default_provider();
            rustls::sign::CertifiedKey::from_der(certs, key, &provider).map_err(|e| match e {
                rustls::Error::InconsistentKeys(rustls::InconsistentKeys::KeyMismatch) => err(
                    "key_file",
                    format!(
                        "the private key `{}` is not the key of the certificate `{}`",
                        key_path.display(),
                        cert_path.display()
                    ),
                ),
                e => err(
                    "cert_file",
                    format!(
                        "`{}` and its key make no client certificate: {e}",
                        cert_path.display()
                    ),
                ),
            })?;
            Some((cert_pem, key_pem))
        }
        // The config refuses one without the other.
        _ => None,
    };
    Ok(Some(RedisTls { ca, client }))
}

fn millis(ttl: Duration) -> u64 {
    u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX).max(1)
}

#[tonic::async_trait]
impl StateStore for RedisStore {
    async fn insert_if_absent(
        &self,
        key: &str,
        value: &str,
        ttl: Duration,
    ) -> Result<bool, StateError> {
        let key = self.key(key);
        let reply: Value = self
            .run(|mut c| async move {
                ::redis::cmd("SET")
                    .arg(&key)
                    .arg(value)
                    .arg("NX")
                    .arg("PX")
                    .arg(millis(ttl))
                    .query_async(&mut c)
                    .await
            })
            .await?;
        Ok(matches!(reply, Value::Okay | Value::SimpleString(_)))
    }

    async fn get(&self, key: &str) -> Result<Option<String>, StateError> {
        let key = self.key(key);
        self.run(|mut c| async move { c.get(&key).await }).await
    }

    async fn set(&self, key: &str, value: &str, ttl: Duration) -> Result<(), StateError> {
        let key = self.key(key);
        self.run(|mut c| async move {
            ::redis::cmd("SET")
                .arg(&key)
                .arg(value)
                .arg("PX")
                .arg(millis(ttl))
                .query_async(&mut c)
                .await
        })
        .await
    }

    async fn delete(&self, key: &str) -> Result<bool, StateError> {
        let key = self.key(key);
        let n: i64 = self.run(|mut c| async move { c.del(&key).await }).await?;
        Ok(n > 0)
    }

    async fn get_many(&self, keys: &[String]) -> Result<Vec<Option<String>>, StateError> {
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        let full: Vec<String> = keys.iter().map(|k| self.key(k)).collect();
        let conn = self.connection().await?;
        // A listing may read many keys: allow it several operation timeouts in total.
        let work = async move {
            let mut c = conn;
            let mut out = Vec::with_capacity(full.len());
            for chunk in full.chunks(500) {
                let values: Vec<Option<String>> =
                    ::redis::cmd("MGET").arg(chunk).query_async(&mut c).await?;
                out.extend(values);
            }
            Ok::<_, ::redis::RedisError>(out)
        };
        self.listing(work).await
    }

    async fn index_add(
        &self,
        index: &str,
        member: &str,
        expires_at: i64,
    ) -> Result<i64, StateError> {
        let key = self.key(index);
        let script = &self.index_add;
        let score: f64 = self
            .run(|mut c| async move {
                script
                    .key(&key)
                    .arg(expires_at)
                    .arg(member)
                    .invoke_async(&mut c)
                    .await
            })
            .await?;
        // Scores are whole seconds written here.
        Ok(score as i64)
    }

    async fn index_remove(&self, index: &str, member: &str, now: i64) -> Result<bool, StateError> {
        let key = self.key(index);
        let script = &self.index_remove;
        let live: i64 = self
            .run(|mut c| async move {
                script
                    .key(&key)
                    .arg(member)
                    .arg(now)
                    .invoke_async(&mut c)
                    .await
            })
            .await?;
        Ok(live == 1)
    }

    async fn index_list(&self, index: &str, now: i64) -> Result<Vec<(String, i64)>, StateError> {
        let key = self.key(index);
        let conn = self.connection().await?;
        let script = &self.index_list;
        let work = async move {
            let mut c = conn;
            script
                .key(&key)
                .arg(now)
                .arg(super::INDEX_PRUNE_AFTER)
                .invoke_async::<(i64, Vec<(String, f64)>)>(&mut c)
                .await
        };
        let (server, listed) = self.listing(work).await?;
        self.note_clock(now, server);
        let mut members: Vec<(String, i64)> = listed
            .into_iter()
            // Scores are whole seconds written by `index_add`.
            .map(|(m, score)| (m, score as i64))
            .collect();
        members.sort();
        Ok(members)
    }

    async fn take_one(&self, key: &str) -> Result<Option<i64>, StateError> {
        let full = self.key(key);
        let script = &self.take_one;
        let n: i64 = self
            .run(|mut c| async move { script.key(&full).invoke_async(&mut c).await })
            .await?;
        match n {
            -2 => Err(StateError::corrupt(key)),
            n if n < 0 => Ok(None),
            n => Ok(Some(n)),
        }
    }

    async fn rate_check_all(
        &self,
        buckets: &[(&str, RateLimit)],
    ) -> Result<Vec<RateOutcome>, StateError> {
        if buckets.is_empty() {
            return Ok(Vec::new());
        }
        let mut invocation = self.gcra.prepare_invoke();
        let mut limits = Vec::with_capacity(buckets.len());
        for (key, limit) in buckets {
            let interval_us = u64::try_from(limit.emission_interval().as_micros())
                .unwrap_or(u64::MAX)
                .max(1);
            let burst = limit.burst.max(1);
            invocation.key(self.key(key)).arg(interval_us).arg(burst);
            limits.push((interval_us, burst));
        }
        let invocation = &invocation;
        let reply: Vec<i64> = self
            .run(|mut c| async move { invocation.invoke_async(&mut c).await })
            .await?;
        let corrupt = |i: i64| {
            let at = usize::try_from(i - 1).ok();
            StateError::corrupt(at.and_then(|i| buckets.get(i)).map_or("?", |b| b.0))
        };
        match reply.first() {
            Some(0) if reply.len() == 1 + 3 * buckets.len() => {}
            Some(-2) => return Err(corrupt(reply.get(1).copied().unwrap_or(0))),
            _ => return Err(corrupt(0)),
        }
        let us = |v: i64| Duration::from_micros(u64::try_from(v).unwrap_or(0));
        Ok(reply[1..]
            .chunks_exact(3)
            .zip(limits)
            .map(|(r, (interval_us, burst))| {
                if r[0] == 1 {
                    RateOutcome::counted(burst, us(r[1]), Duration::from_micros(interval_us))
                } else {
                    RateOutcome::refused(burst, us(r[1]), us(r[2]))
                }
            })
            .collect())
    }

    async fn delete_if(&self, key: &str, value: &str) -> Result<bool, StateError> {
        /// Deletes KEYS[1] when it holds ARGV[1]; returns 1 when it did, else 0.
        const DELETE_IF: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
";
        let full = self.key(key);
        let script = Script::new(DELETE_IF);
        let n: i64 = self
            .run(|mut c| async move { script.key(&full).arg(value).invoke_async(&mut c).await })
            .await?;
        Ok(n == 1)
    }

    async fn ttl_left(&self, key: &str) -> Result<Option<Duration>, StateError> {
        let full = self.key(key);
        let ms: i64 = self
            .run(|mut c| async move { ::redis::cmd("PTTL").arg(&full).query_async(&mut c).await })
            .await?;
        // -2: no such key; -1: a key without a lifetime.
        Ok(match ms {
            -1 => Some(Duration::MAX),
            ms => u64::try_from(ms).ok().map(Duration::from_millis),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_invalid_url_error_does_not_echo_the_url() {
        let Err(e) = RedisStore::new("redis://:s3cret@[bad", "p:", Duration::from_millis(100))
        else {
            panic!("an invalid url was accepted");
        };
        assert!(!e.to_string().contains("s3cret"), "{e}");
    }

    /// A rustls error as the redis crate reports a failed handshake: inside an I/O error.
    fn handshake_error(e: rustls::Error) -> ::redis::RedisError {
        std::io::Error::new(std::io::ErrorKind::InvalidData, e).into()
    }

    /// TLS failures are named in fixed words: rustls's text names the host expected and the
    /// certificate's names, which are not shown.
    #[test]
    fn a_tls_failure_is_named_without_the_hosts() {
        use rustls::CertificateError;
        let name = rustls::pki_types::ServerName::try_from("redis.internal.example")
            .expect("a DNS name")
            .to_owned();
        let cases = [
            (
                rustls::Error::InvalidCertificate(CertificateError::NotValidForNameContext {
                    expected: name,
                    presented: vec!["DnsName(\"other.example\")".to_string()],
                }),
                "not valid for the host in `state.redis_url`",
            ),
            (
                rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer),
                "not signed by a trusted CA",
            ),
            (
                rustls::Error::InvalidCertificate(CertificateError::Expired),
                "has expired",
            ),
            (
                rustls::Error::AlertReceived(rustls::AlertDescription::CertificateRequired),
                "requires a client certificate",
            ),
            (
                rustls::Error::AlertReceived(rustls::AlertDescription::UnknownCA),
                "refused the client certificate",
            ),
        ];
        for (e, says) in cases {
            let StateError::Unavailable(m) = redis_error(&handshake_error(e)) else {
                panic!("not an outage");
            };
            assert!(m.contains(says), "{m}");
            assert!(!m.contains("example"), "{m}");
        }
        // Not TLS: as before.
        let refused: ::redis::RedisError =
            std::io::Error::from(std::io::ErrorKind::ConnectionRefused).into();
        assert_eq!(redis_error(&refused), unavailable("redis is unreachable"));
    }

    #[test]
    fn ttls_round_up_to_at_least_one_millisecond() {
        assert_eq!(millis(Duration::ZERO), 1);
        assert_eq!(millis(Duration::from_micros(1500)), 1);
        assert_eq!(millis(Duration::from_secs(2)), 2000);
    }
}

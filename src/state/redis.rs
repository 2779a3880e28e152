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
//! INVARIANT: the Redis URL (which may hold a password) never appears in an error or a log
//! line; errors name only what failed.

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

/// GCRA on the server's clock, in microseconds. ARGV: emission interval, burst.
/// Returns {allowed (0/1), reset_us, retry_after_us}.
const GCRA: &str = r"
local interval = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local stored = redis.call('GET', KEYS[1])
local tat = now
if stored then
  local parsed = tonumber(stored)
  if not parsed then return {-2, 0, 0} end
  if parsed > now then tat = parsed end
end
local tolerance = interval * (burst - 1)
local allow_at = tat - tolerance
if allow_at > now then
  return {0, tat - now, allow_at - now}
end
local new_tat = tat + interval
redis.call('SET', KEYS[1], string.format('%.0f', new_tat), 'PX', math.floor((new_tat - now) / 1000) + 1)
return {1, new_tat - now, 0}
";

/// Shared state in Redis.
pub struct RedisStore {
    client: ::redis::Client,
    prefix: String,
    timeout: Duration,
    conn: Mutex<Conn>,
    take_one: Script,
    gcra: Script,
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
        let client = ::redis::Client::open(url).map_err(|e| {
            StateError::Unavailable(format!("invalid redis url ({})", e.category()))
        })?;
        Ok(Self {
            client,
            prefix: prefix.to_string(),
            timeout,
            conn: Mutex::new(Conn::default()),
            take_one: Script::new(TAKE_ONE),
            gcra: Script::new(GCRA),
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
            .set_number_of_retries(1)
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

    /// Runs one operation within the timeout. The connection manager reconnects by itself
    /// after a failure; a failed operation is never retried here (a retried `take_one` could
    /// spend two uses).
    async fn run<T, F, Fut>(&self, op: F) -> Result<T, StateError>
    where
        F: FnOnce(ConnectionManager) -> Fut,
        Fut: std::future::Future<Output = Result<T, ::redis::RedisError>>,
    {
        let conn = self.connection().await?;
        match tokio::time::timeout(self.timeout, op(conn)).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(redis_error(&e)),
            Err(_) => Err(unavailable("redis did not answer in time")),
        }
    }
}

fn unavailable(what: &str) -> StateError {
    StateError::Unavailable(what.to_string())
}

/// A Redis error without its details (which can echo addresses or arguments).
fn redis_error(e: &::redis::RedisError) -> StateError {
    let what = if e.is_timeout() {
        "redis did not answer in time"
    } else if e.is_connection_refusal() || e.is_io_error() || e.is_connection_dropped() {
        "redis is unreachable"
    } else {
        return StateError::Unavailable(format!("redis error ({})", e.category()));
    };
    unavailable(what)
}

fn millis(ttl: Duration) -> u64 {
    u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX).max(1)
}

/// Characters SCAN's MATCH treats as patterns, escaped so a prefix matches literally.
fn glob_escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 1);
    for c in text.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out
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

    async fn scan(&self, prefix: &str) -> Result<Vec<(String, String)>, StateError> {
        let pattern = format!("{}*", glob_escape(&self.key(prefix)));
        let strip = self.prefix.len();
        let timeout = self.timeout;
        let conn = self.connection().await?;
        // A listing may walk many keys: allow it several operation timeouts in total.
        let work = async move {
            let mut c = conn;
            let mut keys: Vec<String> = Vec::new();
            let mut cursor: u64 = 0;
            loop {
                let (next, batch): (u64, Vec<String>) = ::redis::cmd("SCAN")
                    .arg(cursor)
                    .arg("MATCH")
                    .arg(&pattern)
                    .arg("COUNT")
                    .arg(500)
                    .query_async(&mut c)
                    .await?;
                keys.extend(batch);
                if next == 0 {
                    break;
                }
                cursor = next;
            }
            keys.sort();
            keys.dedup();
            let mut out = Vec::with_capacity(keys.len());
            for chunk in keys.chunks(500) {
                let values: Vec<Option<String>> =
                    ::redis::cmd("MGET").arg(chunk).query_async(&mut c).await?;
                for (k, v) in chunk.iter().zip(values) {
                    // A key that expired between SCAN and MGET is simply not live any more.
                    if let Some(v) = v {
                        out.push((k[strip..].to_string(), v));
                    }
                }
            }
            Ok::<_, ::redis::RedisError>(out)
        };
        match tokio::time::timeout(timeout * 10, work).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(redis_error(&e)),
            Err(_) => Err(unavailable("redis did not answer in time")),
        }
    }

    async fn take_one(&self, key: &str) -> Result<Option<i64>, StateError> {
        let full = self.key(key);
        let script = &self.take_one;
        let n: i64 = self
            .run(|mut c| async move { script.key(&full).invoke_async(&mut c).await })
            .await?;
        match n {
            -2 => Err(StateError::Corrupt(key.to_string())),
            n if n < 0 => Ok(None),
            n => Ok(Some(n)),
        }
    }

    async fn rate_check(&self, key: &str, limit: RateLimit) -> Result<RateOutcome, StateError> {
        let full = self.key(key);
        let interval = limit.emission_interval();
        let interval_us = u64::try_from(interval.as_micros())
            .unwrap_or(u64::MAX)
            .max(1);
        let burst = limit.burst.max(1);
        let script = &self.gcra;
        let (allowed, reset_us, retry_us): (i64, i64, i64) = self
            .run(|mut c| async move {
                script
                    .key(&full)
                    .arg(interval_us)
                    .arg(burst)
                    .invoke_async(&mut c)
                    .await
            })
            .await?;
        let us = |v: i64| Duration::from_micros(u64::try_from(v).unwrap_or(0));
        match allowed {
            1 => {
                let used = us(reset_us);
                let used_units = used.as_micros().div_ceil(u128::from(interval_us)) as u32;
                Ok(RateOutcome {
                    allowed: true,
                    limit: burst,
                    remaining: burst.saturating_sub(used_units),
                    reset: used,
                    retry_after: None,
                })
            }
            0 => Ok(RateOutcome {
                allowed: false,
                limit: burst,
                remaining: 0,
                reset: us(reset_us),
                retry_after: Some(us(retry_us)),
            }),
            _ => Err(StateError::Corrupt(key.to_string())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn glob_characters_in_a_prefix_match_literally() {
        assert_eq!(glob_escape("a*b?[c]\\"), "a\\*b\\?\\[c\\]\\\\");
        assert_eq!(glob_escape("portcullis:approval:"), "portcullis:approval:");
    }

    #[test]
    fn an_invalid_url_error_does_not_echo_the_url() {
        let Err(e) = RedisStore::new("redis://:s3cret@[bad", "p:", Duration::from_millis(100))
        else {
            panic!("an invalid url was accepted");
        };
        assert!(!e.to_string().contains("s3cret"), "{e}");
    }

    #[test]
    fn ttls_round_up_to_at_least_one_millisecond() {
        assert_eq!(millis(Duration::ZERO), 1);
        assert_eq!(millis(Duration::from_micros(1500)), 1);
        assert_eq!(millis(Duration::from_secs(2)), 2000);
    }
}

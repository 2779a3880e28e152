//! Shared state: the few atomic operations that replicas must agree on (single-use records,
//! use counters, rate-limit buckets, small keyed values), behind one trait.
//!
//! `MemoryStore` (one replica, the default; at most `MAX_MEMORY_BUCKETS` rate-limit buckets
//! and `MAX_MEMORY_ENTRIES` records, past which a new key fails closed) lives here; a Redis backend implements the same
//! trait so several replicas behind one Envoy agree. Callers that need shared state fail
//! closed when the store errors: a `StateError` is a deny with a reason, never an allow.
//!
//! Keys are namespaced by the caller (`dpop:jti:...`, `rate:...`, `approval:...`). Values are
//! small strings (JSON where structured). Listings never walk the keys: what must be listed
//! (runtime revocations, approval records) is also put in an index, a set with expiring
//! members (`index_add`/`index_list`), so a listing costs what it lists.

pub mod redis;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub use self::redis::RedisStore;

/// The store a config asks for: in memory (one replica) or Redis (shared by replicas).
/// `tls`: `state.tls`'s files, from `redis::load_tls`.
pub fn from_config(
    config: &crate::config::schema::StateConfig,
    tls: Option<&redis::RedisTls>,
) -> Result<Arc<dyn StateStore>, StateError> {
    use crate::config::schema::StateBackend;
    Ok(match config.backend {
        StateBackend::Memory => Arc::new(MemoryStore::new()),
        StateBackend::Redis => Arc::new(RedisStore::with_tls(
            &config.redis_url,
            tls,
            &config.key_prefix,
            config.timeout.get(),
        )?),
    })
}

/// Why the store could not answer. Callers deny with this as the reason.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StateError {
    #[error("shared state is unavailable: {0}")]
    Unavailable(String),
    /// The operation was sent, and no answer came (a timeout, or the connection dropped
    /// while waiting): the store may still have applied it, or apply it later (a paused
    /// Redis runs the queued command when it resumes). Reads and refusals treat it as
    /// `Unavailable`; a write's caller must not report the write as not done.
    #[error("shared state is unavailable: {0}")]
    Unconfirmed(String),
    /// The key is for the operator's log (`StateError::corrupt` logs it), never for the
    /// message a client reads: it can hold a caller's issuer and subject.
    #[error("shared state holds an unexpected value")]
    Corrupt(String),
}

impl StateError {
    /// True when a write that failed with this error may still have been applied (see
    /// `Unconfirmed`); false when the store surely did not apply it.
    pub fn outcome_unknown(&self) -> bool {
        matches!(self, StateError::Unconfirmed(_))
    }

    /// A corrupt value at `key`, logged here with the key the client is never told.
    pub fn corrupt(key: &str) -> Self {
        tracing::error!(state.key = key, "shared state holds an unexpected value");
        StateError::Corrupt(key.to_string())
    }
}

/// A token-bucket limit: `burst` requests at once, refilled at `requests` per `per`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateLimit {
    pub requests: u32,
    pub per: Duration,
    pub burst: u32,
}

impl RateLimit {
    /// Time to earn one request back.
    pub fn emission_interval(&self) -> Duration {
        self.per / self.requests.max(1)
    }
}

/// The outcome of one rate check (enough to build `Retry-After` and `RateLimit` headers).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateOutcome {
    pub allowed: bool,
    /// The bucket size.
    pub limit: u32,
    /// Requests left right now after this one.
    pub remaining: u32,
    /// Until the bucket is full again.
    pub reset: Duration,
    /// When denied: until one request is allowed again.
    pub retry_after: Option<Duration>,
}

/// How long after its expiry an index member may still be dropped by `index_list`: more
/// than any sane clock skew between replicas.
pub const INDEX_PRUNE_AFTER: i64 = 300;

/// The operations shared state offers. Every method is atomic on its key.
#[tonic::async_trait]
pub trait StateStore: Send + Sync {
    /// Stores `value` under `key` for `ttl` only when `key` is absent. True when this call
    /// stored it (first use of a DPoP `jti`, first request for an approval).
    async fn insert_if_absent(
        &self,
        key: &str,
        value: &str,
        ttl: Duration,
    ) -> Result<bool, StateError>;

    async fn get(&self, key: &str) -> Result<Option<String>, StateError>;

    /// Stores `value` under `key` for `ttl`, replacing any value.
    async fn set(&self, key: &str, value: &str, ttl: Duration) -> Result<(), StateError>;

    /// Removes `key`; true when it existed.
    async fn delete(&self, key: &str) -> Result<bool, StateError>;

    /// The values of `keys`, in order (`None` for a missing or expired key). For listings.
    async fn get_many(&self, keys: &[String]) -> Result<Vec<Option<String>>, StateError>;

    /// Puts `member` in the set `index` until `expires_at` (Unix seconds), or leaves it until
    /// its later expiry when it is there already (an entry is extended, never cut short, by
    /// a second add); returns the expiry it has now. Indexes are how listings find their
    /// entries: reading one costs what the set holds, never what the rest of the store holds.
    async fn index_add(
        &self,
        index: &str,
        member: &str,
        expires_at: i64,
    ) -> Result<i64, StateError>;

    /// Takes `member` out of `index`; true when it was there and expires after `now`.
    async fn index_remove(&self, index: &str, member: &str, now: i64) -> Result<bool, StateError>;

    /// The members of `index` that expire after `now` (Unix seconds), with their expiry,
    /// sorted by member; members expired for more than `INDEX_PRUNE_AFTER` seconds are
    /// dropped from the store on the way (not at once, and by the earlier of `now` and the
    /// store's own clock: `now` is the caller's clock, and a replica whose clock runs fast
    /// must not cut entries short for the others). For listings and background syncs,
    /// never per request.
    async fn index_list(&self, index: &str, now: i64) -> Result<Vec<(String, i64)>, StateError>;

    /// Atomically decrements the integer stored at `key` when it is above zero and returns
    /// the value after the decrement; `None` when the key is missing, expired or zero. Two
    /// concurrent callers can never both take the last use.
    async fn take_one(&self, key: &str) -> Result<Option<i64>, StateError>;

    /// Spends one request from each of the token buckets (GCRA) at once, atomically: when
    /// every bucket has room, each counts the request; when one is full, none does, so a
    /// request refused by one limit never drains another. Outcomes in the order given (the
    /// ones with room say so even when another refused and nothing was spent).
    ///
    /// A bucket whose arrival time lies further ahead than its limit can reach (left by a
    /// stricter or slower limit under the same id) is read as full under the limit given:
    /// raising a limit frees the clients the old one held within its new refill time.
    async fn rate_check_all(
        &self,
        buckets: &[(&str, RateLimit)],
    ) -> Result<Vec<RateOutcome>, StateError>;

    /// `rate_check_all` for one bucket.
    async fn rate_check(&self, key: &str, limit: RateLimit) -> Result<RateOutcome, StateError> {
        self.rate_check_all(&[(key, limit)])
            .await?
            .pop()
            .ok_or_else(|| StateError::corrupt(key))
    }

    /// Removes `key` only while it holds `value` (compare and delete, atomic); true when it
    /// did. For releasing what this caller wrote (a slot, a claim) without ever removing what
    /// another caller wrote since: after a timeout, a late write of this caller's lands first
    /// (writes on one connection are applied in order).
    async fn delete_if(&self, key: &str, value: &str) -> Result<bool, StateError>;

    /// How long `key` has left to live; `None` when it is missing or expired (a key stored
    /// without a lifetime reads as `Duration::MAX`).
    async fn ttl_left(&self, key: &str) -> Result<Option<Duration>, StateError>;
}

struct Entry {
    value: String,
    expires: Instant,
}

/// The most rate-limit buckets a `MemoryStore` holds: without a cap, a flood of distinct keys
/// (client addresses, subjects) grows the map without bound. A bucket costs about 150 bytes
/// (measured at ~144 requested per entry for 1M `rate:<id>:ip:<net>/64` keys: the key's ~36
/// bytes on the heap, its 24-byte `String` and a 16-byte `Instant` in the table, the table's
/// control byte and spare slots, plus allocator rounding), so the cap bounds it near 150 MB.
/// A bucket lives only until it is full again (its refill time after its last request), so a
/// million live buckets are a million distinct clients within one refill time, far more than
/// one replica serves; several replicas share Redis, whose own `maxmemory` applies.
pub const MAX_MEMORY_BUCKETS: usize = 1_000_000;

/// Below this many buckets the map is never swept: a pass costs more than the memory it frees.
const BUCKET_SWEEP_FLOOR: usize = 100_000;

/// At the cap, the least time between two sweeps. A sweep is a pass over the whole map (about
/// 10 ms for a million buckets) under the lock every rate check takes: a flood of new keys
/// must not make it one pass per request.
const FULL_SWEEP_PAUSE: Duration = Duration::from_secs(1);

/// What a rate check for a new key meets when the buckets are at their cap. It names no key:
/// the detail of a 503 reaches the client.
const BUCKETS_FULL: &str = "the in-memory rate-limit buckets are at their cap";

/// The GCRA buckets of a `MemoryStore`: theoretical arrival times by key, at most `cap`.
///
/// INVARIANT: a bucket is only ever forgotten once its arrival time has passed (it is full
/// again, so forgetting it changes no answer). At the cap a new key is refused instead of
/// evicting a live bucket: that would refill the budget of a client being limited.
struct Buckets {
    tats: HashMap<String, Instant>,
    cap: usize,
    /// A new key sweeps first when `tats` holds this many: twice what the last sweep left (at
    /// least `BUCKET_SWEEP_FLOOR`, at most `cap`), so sweeping costs O(1) per new bucket,
    /// amortized.
    sweep_at: usize,
    /// At the cap, no sweep before this: one ran less than `FULL_SWEEP_PAUSE` ago, or (the
    /// map having been full of live buckets since) none expires sooner.
    no_sweep_before: Option<Instant>,
}

impl Default for Buckets {
    fn default() -> Self {
        Self::with_cap(MAX_MEMORY_BUCKETS)
    }
}

impl Buckets {
    fn with_cap(cap: usize) -> Self {
        Self {
            tats: HashMap::new(),
            cap,
            sweep_at: BUCKET_SWEEP_FLOOR.min(cap),
            no_sweep_before: None,
        }
    }

    /// Spends one request from the bucket at `key` at `now`.
    #[cfg(test)]
    fn check(
        &mut self,
        key: &str,
        limit: RateLimit,
        now: Instant,
    ) -> Result<RateOutcome, StateError> {
        let mut outcomes = self.check_all(&[(key, limit)], now)?;
        Ok(outcomes.remove(0))
    }

    /// Spends one request from every bucket at `now`, or from none when one is full (see
    /// `StateStore::rate_check_all`). New keys fail closed (`StateError::Unavailable`) when
    /// they do not fit under the cap and nothing has expired; keys that have a bucket keep
    /// being counted.
    fn check_all(
        &mut self,
        buckets: &[(&str, RateLimit)],
        now: Instant,
    ) -> Result<Vec<RateOutcome>, StateError> {
        let new_keys = buckets
            .iter()
            .filter(|(key, _)| !self.tats.contains_key(*key))
            .count();
        if new_keys > 0 && !self.room_for(new_keys, now) {
            return Err(StateError::Unavailable(BUCKETS_FULL.to_string()));
        }
        let (tats, outcomes): (Vec<Instant>, Vec<RateOutcome>) = buckets
            .iter()
            .map(|(key, limit)| gcra(self.tats.get(*key).copied(), now, *limit))
            .unzip();
        let all = outcomes.iter().all(|o| o.allowed);
        for ((key, _), tat) in buckets.iter().zip(tats) {
            // Refused, a bucket changes only when its limit cut its arrival time short (see
            // `gcra`), so the next check starts from there.
            match self.tats.get_mut(*key) {
                Some(stored) if !all => *stored = (*stored).min(tat),
                _ if !all => {}
                Some(stored) => *stored = tat,
                None => {
                    self.tats.insert((*key).to_string(), tat);
                }
            }
        }
        Ok(outcomes)
    }

    /// True when `n` more buckets fit, sweeping the expired ones first when it is time to.
    fn room_for(&mut self, n: usize, now: Instant) -> bool {
        if self.tats.len() + n <= self.sweep_at {
            return true;
        }
        if self.tats.len() >= self.cap && self.no_sweep_before.is_some_and(|t| now < t) {
            return false;
        }
        let mut next_expiry: Option<Instant> = None;
        self.tats.retain(|_, tat| {
            let live = *tat > now;
            if live {
                next_expiry = Some(next_expiry.map_or(*tat, |e| e.min(*tat)));
            }
            live
        });
        let len = self.tats.len();
        self.sweep_at = (2 * len).clamp(BUCKET_SWEEP_FLOOR.min(self.cap), self.cap);
        let pause = now + FULL_SWEEP_PAUSE;
        if len < self.cap {
            self.no_sweep_before = Some(pause);
            return true;
        }
        // Full of live buckets, and no new one until a sweep: none frees a slot sooner.
        self.no_sweep_before = Some(next_expiry.map_or(pause, |e| e.max(pause)));
        tracing::warn!(
            cap = self.cap,
            "the in-memory rate-limit buckets are at their cap: requests that need a new bucket \
             are refused (503 state_unavailable) until buckets expire; with this many clients, \
             use the Redis state backend"
        );
        false
    }
}

/// The most records (`insert_if_absent`, `set`: DPoP proof `jti`s, approval records and their
/// slots) a `MemoryStore` holds. Without a cap, a caller with one valid DPoP-bound token could
/// grow the map without bound by sending a fresh proof with every request (each `jti` is kept
/// for twice the proof window and more). An entry costs about 200 bytes (its key of up to
/// ~100 bytes and value on the heap, the `Entry` and the table's share), so the cap bounds
/// the map near 200 MB. Past it, a new key is refused (the request gets a 503
/// `state_unavailable`); nothing live is evicted, as forgetting a `jti` would let its proof
/// be replayed.
pub const MAX_MEMORY_ENTRIES: usize = 1_000_000;

/// What a write of a new key meets when the records are at their cap. It names no key.
const ENTRIES_FULL: &str = "the in-memory state records are at their cap";
/// The lifetime of an entry whose own one does not fit an `Instant` (about 31 years).
const FOREVER: Duration = Duration::from_secs(1 << 30);

/// The records of a `MemoryStore`, at most `cap`.
///
/// INVARIANT: every read treats an entry past `expires` as absent; sweeping only reclaims
/// memory and never changes an answer.
struct Entries {
    map: HashMap<String, Entry>,
    cap: usize,
    /// At the cap, no sweep before this: the last one, less than `FULL_SWEEP_PAUSE` ago, left
    /// the map full of live entries.
    no_sweep_before: Option<Instant>,
}

impl Default for Entries {
    fn default() -> Self {
        Self::with_cap(MAX_MEMORY_ENTRIES)
    }
}

impl Entries {
    fn with_cap(cap: usize) -> Self {
        Self {
            map: HashMap::new(),
            cap,
            no_sweep_before: None,
        }
    }

    /// Writes `key` (new, or replacing a live or expired entry); a new key fails closed when
    /// the map is at its cap and a sweep frees nothing.
    fn put(
        &mut self,
        key: &str,
        value: &str,
        ttl: Duration,
        now: Instant,
    ) -> Result<(), StateError> {
        if !self.map.contains_key(key) && !self.room_for_one(now) {
            return Err(StateError::Unavailable(ENTRIES_FULL.to_string()));
        }
        self.map.insert(
            key.to_string(),
            Entry {
                value: value.to_string(),
                // Far beyond any bounded lifetime: never a panic on an overflowing instant.
                expires: now.checked_add(ttl).unwrap_or(now + FOREVER),
            },
        );
        Ok(())
    }

    /// True when one more entry fits, sweeping the expired ones first when the map is full
    /// (at most once per `FULL_SWEEP_PAUSE` while it stays full: a sweep is a pass over the
    /// whole map under the lock every write takes).
    fn room_for_one(&mut self, now: Instant) -> bool {
        if self.map.len() < self.cap {
            return true;
        }
        if self.no_sweep_before.is_some_and(|t| now < t) {
            return false;
        }
        self.map.retain(|_, e| e.expires > now);
        if self.map.len() < self.cap {
            self.no_sweep_before = None;
            return true;
        }
        self.no_sweep_before = Some(now + FULL_SWEEP_PAUSE);
        tracing::warn!(
            cap = self.cap,
            "the in-memory state records are at their cap: requests that need a new record \
             (a DPoP proof, an approval) are refused (503 state_unavailable) until records \
             expire; with this many, use the Redis state backend"
        );
        false
    }
}

/// In-process state: the default for a single replica.
#[derive(Default)]
pub struct MemoryStore {
    entries: Mutex<Entries>,
    /// GCRA theoretical arrival times per bucket, at most `MAX_MEMORY_BUCKETS`.
    buckets: Mutex<Buckets>,
    /// Sets for listings: member -> expiry (Unix seconds), per index.
    indexes: Mutex<HashMap<String, std::collections::BTreeMap<String, i64>>>,
    ops: std::sync::atomic::AtomicU64,
}

impl MemoryStore {
    pub fn new() -> Self {
        Self::default()
    }

    /// A store holding at most `cap` rate-limit buckets (`MAX_MEMORY_BUCKETS` is too many to
    /// fill in a test).
    #[cfg(test)]
    pub(crate) fn with_bucket_cap(cap: usize) -> Self {
        Self {
            buckets: Mutex::new(Buckets::with_cap(cap)),
            ..Self::default()
        }
    }

    /// A store holding at most `cap` records (`MAX_MEMORY_ENTRIES` is too many to fill in a
    /// test).
    #[cfg(test)]
    pub(crate) fn with_entry_cap(cap: usize) -> Self {
        Self {
            entries: Mutex::new(Entries::with_cap(cap)),
            ..Self::default()
        }
    }

    fn entries(&self) -> std::sync::MutexGuard<'_, Entries> {
        // A poisoned lock only means another thread panicked mid-update of a plain map;
        // the data is still a valid map, so keep serving rather than failing every request.
        self.entries
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn indexes(
        &self,
    ) -> std::sync::MutexGuard<'_, HashMap<String, std::collections::BTreeMap<String, i64>>> {
        // As `entries`: a poisoned plain map is still a valid map.
        self.indexes
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Every 4096 operations, drop expired entries so memory stays bounded by live data.
    fn maybe_sweep(&self, entries: &mut Entries, now: Instant) {
        let n = self.ops.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        if n.is_multiple_of(4096) {
            entries.map.retain(|_, e| e.expires > now);
        }
    }
}

/// The entry under `key` while it lives (present and not expired at `now`).
fn live_entry<'m>(map: &'m HashMap<String, Entry>, key: &str, now: Instant) -> Option<&'m Entry> {
    map.get(key).filter(|e| e.expires > now)
}

#[tonic::async_trait]
impl StateStore for MemoryStore {
    async fn insert_if_absent(
        &self,
        key: &str,
        value: &str,
        ttl: Duration,
    ) -> Result<bool, StateError> {
        let now = Instant::now();
        let mut entries = self.entries();
        self.maybe_sweep(&mut entries, now);
        if live_entry(&entries.map, key, now).is_some() {
            return Ok(false);
        }
        entries.put(key, value, ttl, now)?;
        Ok(true)
    }

    async fn get(&self, key: &str) -> Result<Option<String>, StateError> {
        let now = Instant::now();
        let entries = self.entries();
        Ok(live_entry(&entries.map, key, now).map(|e| e.value.clone()))
    }

    async fn set(&self, key: &str, value: &str, ttl: Duration) -> Result<(), StateError> {
        let now = Instant::now();
        let mut entries = self.entries();
        self.maybe_sweep(&mut entries, now);
        entries.put(key, value, ttl, now)
    }

    async fn delete(&self, key: &str) -> Result<bool, StateError> {
        let now = Instant::now();
        let mut entries = self.entries();
        Ok(entries.map.remove(key).is_some_and(|e| e.expires > now))
    }

    async fn get_many(&self, keys: &[String]) -> Result<Vec<Option<String>>, StateError> {
        let now = Instant::now();
        let entries = self.entries();
        Ok(keys
            .iter()
            .map(|k| live_entry(&entries.map, k, now).map(|e| e.value.clone()))
            .collect())
    }

    async fn index_add(
        &self,
        index: &str,
        member: &str,
        expires_at: i64,
    ) -> Result<i64, StateError> {
        let mut indexes = self.indexes();
        let kept = indexes
            .entry(index.to_string())
            .or_default()
            .entry(member.to_string())
            .and_modify(|e| *e = (*e).max(expires_at))
            .or_insert(expires_at);
        Ok(*kept)
    }

    async fn index_remove(&self, index: &str, member: &str, now: i64) -> Result<bool, StateError> {
        let mut indexes = self.indexes();
        let removed = indexes.get_mut(index).and_then(|set| set.remove(member));
        Ok(removed.is_some_and(|expires_at| expires_at > now))
    }

    async fn index_list(&self, index: &str, now: i64) -> Result<Vec<(String, i64)>, StateError> {
        let mut indexes = self.indexes();
        let Some(set) = indexes.get_mut(index) else {
            return Ok(Vec::new());
        };
        set.retain(|_, expires_at| *expires_at > now.saturating_sub(INDEX_PRUNE_AFTER));
        Ok(set
            .iter()
            .filter(|(_, e)| **e > now)
            .map(|(m, e)| (m.clone(), *e))
            .collect())
    }

    async fn take_one(&self, key: &str) -> Result<Option<i64>, StateError> {
        let now = Instant::now();
        let mut entries = self.entries();
        let Some(entry) = entries.map.get_mut(key).filter(|e| e.expires > now) else {
            return Ok(None);
        };
        let n: i64 = entry.value.parse().map_err(|_| StateError::corrupt(key))?;
        if n <= 0 {
            return Ok(None);
        }
        entry.value = (n - 1).to_string();
        Ok(Some(n - 1))
    }

    async fn rate_check_all(
        &self,
        buckets: &[(&str, RateLimit)],
    ) -> Result<Vec<RateOutcome>, StateError> {
        self.buckets
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .check_all(buckets, Instant::now())
    }

    async fn delete_if(&self, key: &str, value: &str) -> Result<bool, StateError> {
        let now = Instant::now();
        let mut entries = self.entries();
        if live_entry(&entries.map, key, now).is_none_or(|e| e.value != value) {
            return Ok(false);
        }
        entries.map.remove(key);
        Ok(true)
    }

    async fn ttl_left(&self, key: &str) -> Result<Option<Duration>, StateError> {
        let now = Instant::now();
        let entries = self.entries();
        Ok(live_entry(&entries.map, key, now).map(|e| e.expires - now))
    }
}

/// A store that is down: every operation fails with `StateError::Unavailable`, as an
/// unreachable Redis does. For proving that callers fail closed; counts the calls it saw.
#[derive(Debug)]
pub struct UnavailableStore {
    reason: String,
    calls: std::sync::atomic::AtomicUsize,
}

impl UnavailableStore {
    pub fn new(reason: impl Into<String>) -> Self {
        Self {
            reason: reason.into(),
            calls: std::sync::atomic::AtomicUsize::new(0),
        }
    }

    /// How many operations were attempted.
    pub fn calls(&self) -> usize {
        self.calls.load(std::sync::atomic::Ordering::SeqCst)
    }

    fn fail<T>(&self) -> Result<T, StateError> {
        self.calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        Err(StateError::Unavailable(self.reason.clone()))
    }
}

#[tonic::async_trait]
impl StateStore for UnavailableStore {
    async fn insert_if_absent(&self, _: &str, _: &str, _: Duration) -> Result<bool, StateError> {
        self.fail()
    }
    async fn get(&self, _: &str) -> Result<Option<String>, StateError> {
        self.fail()
    }
    async fn set(&self, _: &str, _: &str, _: Duration) -> Result<(), StateError> {
        self.fail()
    }
    async fn delete(&self, _: &str) -> Result<bool, StateError> {
        self.fail()
    }
    async fn get_many(&self, _: &[String]) -> Result<Vec<Option<String>>, StateError> {
        self.fail()
    }
    async fn index_add(&self, _: &str, _: &str, _: i64) -> Result<i64, StateError> {
        self.fail()
    }
    async fn index_remove(&self, _: &str, _: &str, _: i64) -> Result<bool, StateError> {
        self.fail()
    }
    async fn index_list(&self, _: &str, _: i64) -> Result<Vec<(String, i64)>, StateError> {
        self.fail()
    }
    async fn take_one(&self, _: &str) -> Result<Option<i64>, StateError> {
        self.fail()
    }
    async fn rate_check_all(
        &self,
        _: &[(&str, RateLimit)],
    ) -> Result<Vec<RateOutcome>, StateError> {
        self.fail()
    }
    async fn delete_if(&self, _: &str, _: &str) -> Result<bool, StateError> {
        self.fail()
    }
    async fn ttl_left(&self, _: &str) -> Result<Option<Duration>, StateError> {
        self.fail()
    }
}

impl RateOutcome {
    /// Counted: `used` of the bucket's time is taken, one request per `interval` of it.
    pub fn counted(limit: u32, used: Duration, interval: Duration) -> Self {
        let used_units = used.as_nanos().div_ceil(interval.as_nanos().max(1)) as u32;
        Self {
            allowed: true,
            limit,
            remaining: limit.saturating_sub(used_units),
            reset: used,
            retry_after: None,
        }
    }

    /// Refused: full for `reset`, one more request fits after `retry_after`.
    pub fn refused(limit: u32, reset: Duration, retry_after: Duration) -> Self {
        Self {
            allowed: false,
            limit,
            remaining: 0,
            reset,
            retry_after: Some(retry_after),
        }
    }
}

/// Generic cell rate algorithm: returns the new theoretical arrival time and the outcome.
pub fn gcra(tat: Option<Instant>, now: Instant, limit: RateLimit) -> (Instant, RateOutcome) {
    let interval = limit.emission_interval();
    let burst = limit.burst.max(1);
    let tolerance = interval * (burst - 1);
    // Never further ahead than this limit can put it: an arrival time left by a stricter
    // limit under the same id holds a client at most one refill of the current one.
    let tat = tat
        .filter(|t| *t > now)
        .unwrap_or(now)
        .min(now + interval * burst);
    let new_tat = tat + interval;
    let allow_at = new_tat.checked_sub(interval + tolerance).unwrap_or(now);
    if allow_at > now {
        let reset = tat.saturating_duration_since(now);
        return (tat, RateOutcome::refused(burst, reset, allow_at - now));
    }
    let used = new_tat.saturating_duration_since(now);
    (new_tat, RateOutcome::counted(burst, used, interval))
}

/// A memory store with faults and pauses for tests of callers: `index_add` can fail, `set`,
/// `delete` (and `delete_if`) and `get` can fail for keys with given prefixes, writes to
/// keys with given prefixes can land and then fail (a timeout), and `index_list`, `rate_check` and
/// `index_add` can be held at a gate until the test lets them go.
#[cfg(test)]
pub mod testing {
    use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};

    use super::*;

    /// Lets `free` calls through, then holds each one: it signals `reached` and waits for
    /// `release`.
    pub struct Gate {
        free: AtomicU32,
        pub reached: tokio::sync::Notify,
        pub release: tokio::sync::Notify,
    }

    impl Gate {
        pub fn after(free: u32) -> Self {
            Self {
                free: AtomicU32::new(free),
                reached: tokio::sync::Notify::new(),
                release: tokio::sync::Notify::new(),
            }
        }

        pub fn open() -> Self {
            Self::after(u32::MAX)
        }

        async fn pass(&self) {
            let free = self.free.load(Ordering::SeqCst);
            if free == 0 {
                self.reached.notify_one();
                self.release.notified().await;
            } else if free != u32::MAX {
                self.free.fetch_sub(1, Ordering::SeqCst);
            }
        }
    }

    pub struct TestStore {
        pub inner: MemoryStore,
        pub fail_index_add: AtomicBool,
        /// `set` fails for keys starting with any of these.
        pub fail_set: Mutex<Vec<String>>,
        /// `delete` fails for keys starting with any of these.
        pub fail_delete: Mutex<Vec<String>>,
        /// `get` fails for keys starting with any of these.
        pub fail_get: Mutex<Vec<String>>,
        /// `insert_if_absent` and `set` to keys starting with any of these land, then report
        /// a failure: a Redis timeout after Redis applied the write.
        pub land_then_fail: Mutex<Vec<String>>,
        pub index_list: Gate,
        pub rate_check: Gate,
        /// Held after the write, before `index_add` returns.
        pub index_add: Gate,
        /// `index_add` and `index_remove` land, then report a timeout (`Unconfirmed`): a
        /// paused Redis that runs the command after the caller gave up.
        pub index_land_then_time_out: AtomicBool,
    }

    impl Default for TestStore {
        fn default() -> Self {
            Self {
                inner: MemoryStore::new(),
                fail_index_add: AtomicBool::new(false),
                fail_set: Mutex::default(),
                fail_delete: Mutex::default(),
                fail_get: Mutex::default(),
                land_then_fail: Mutex::default(),
                index_list: Gate::open(),
                rate_check: Gate::open(),
                index_add: Gate::open(),
                index_land_then_time_out: AtomicBool::new(false),
            }
        }
    }

    fn fails(prefixes: &Mutex<Vec<String>>, op: &str, key: &str) -> Result<(), StateError> {
        let prefixes = prefixes.lock().unwrap_or_else(|e| e.into_inner());
        match prefixes.iter().any(|p| key.starts_with(p.as_str())) {
            true => Err(StateError::Unavailable(format!("{op} fails"))),
            false => Ok(()),
        }
    }

    impl TestStore {
        fn timed_out(&self) -> Result<(), StateError> {
            match self.index_land_then_time_out.load(Ordering::SeqCst) {
                true => Err(StateError::Unconfirmed(
                    "redis did not answer in time".into(),
                )),
                false => Ok(()),
            }
        }
    }

    #[tonic::async_trait]
    impl StateStore for TestStore {
        async fn insert_if_absent(
            &self,
            k: &str,
            v: &str,
            t: Duration,
        ) -> Result<bool, StateError> {
            let inserted = self.inner.insert_if_absent(k, v, t).await;
            fails(&self.land_then_fail, "insert_if_absent", k)?;
            inserted
        }
        async fn get(&self, k: &str) -> Result<Option<String>, StateError> {
            fails(&self.fail_get, "get", k)?;
            self.inner.get(k).await
        }
        async fn set(&self, k: &str, v: &str, t: Duration) -> Result<(), StateError> {
            fails(&self.fail_set, "set", k)?;
            let stored = self.inner.set(k, v, t).await;
            fails(&self.land_then_fail, "set", k)?;
            stored
        }
        async fn delete(&self, k: &str) -> Result<bool, StateError> {
            fails(&self.fail_delete, "delete", k)?;
            self.inner.delete(k).await
        }
        async fn get_many(&self, k: &[String]) -> Result<Vec<Option<String>>, StateError> {
            self.inner.get_many(k).await
        }
        async fn index_add(&self, i: &str, m: &str, e: i64) -> Result<i64, StateError> {
            if self.fail_index_add.load(Ordering::SeqCst) {
                return Err(StateError::Unavailable("index_add fails".into()));
            }
            let added = self.inner.index_add(i, m, e).await;
            self.index_add.pass().await;
            self.timed_out()?;
            added
        }
        async fn index_remove(&self, i: &str, m: &str, now: i64) -> Result<bool, StateError> {
            let removed = self.inner.index_remove(i, m, now).await;
            self.timed_out()?;
            removed
        }
        async fn index_list(&self, i: &str, now: i64) -> Result<Vec<(String, i64)>, StateError> {
            let listed = self.inner.index_list(i, now).await;
            self.index_list.pass().await;
            listed
        }
        async fn take_one(&self, k: &str) -> Result<Option<i64>, StateError> {
            self.inner.take_one(k).await
        }
        async fn rate_check_all(
            &self,
            b: &[(&str, RateLimit)],
        ) -> Result<Vec<RateOutcome>, StateError> {
            let outcome = self.inner.rate_check_all(b).await;
            self.rate_check.pass().await;
            outcome
        }
        async fn delete_if(&self, k: &str, v: &str) -> Result<bool, StateError> {
            fails(&self.fail_delete, "delete_if", k)?;
            self.inner.delete_if(k, v).await
        }
        async fn ttl_left(&self, k: &str) -> Result<Option<Duration>, StateError> {
            self.inner.ttl_left(k).await
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn insert_if_absent_is_single_use() {
        let s = MemoryStore::new();
        assert!(
            s.insert_if_absent("k", "v", Duration::from_secs(60))
                .await
                .unwrap()
        );
        assert!(
            !s.insert_if_absent("k", "w", Duration::from_secs(60))
                .await
                .unwrap()
        );
        assert_eq!(s.get("k").await.unwrap().as_deref(), Some("v"));
    }

    /// A lifetime beyond what `Instant` holds is a long-lived entry, not a panic (the config
    /// bounds every lifetime; this is the store's own guard).
    #[tokio::test]
    async fn an_enormous_lifetime_is_kept_not_a_panic() {
        let s = MemoryStore::new();
        s.set("k", "v", Duration::MAX).await.unwrap();
        assert!(s.insert_if_absent("j", "w", Duration::MAX).await.unwrap());
        assert_eq!(s.get("k").await.unwrap().as_deref(), Some("v"));
        assert_eq!(s.get("j").await.unwrap().as_deref(), Some("w"));
    }

    #[tokio::test]
    async fn expired_entries_are_absent() {
        let s = MemoryStore::new();
        s.set("k", "v", Duration::from_millis(1)).await.unwrap();
        std::thread::sleep(Duration::from_millis(5));
        assert_eq!(s.get("k").await.unwrap(), None);
        assert!(
            s.insert_if_absent("k", "again", Duration::from_secs(1))
                .await
                .unwrap()
        );
    }

    #[tokio::test]
    async fn take_one_never_goes_below_zero() {
        let s = std::sync::Arc::new(MemoryStore::new());
        s.set("uses", "1", Duration::from_secs(60)).await.unwrap();
        let mut tasks = Vec::new();
        for _ in 0..16 {
            let s = s.clone();
            tasks.push(tokio::spawn(
                async move { s.take_one("uses").await.unwrap() },
            ));
        }
        let mut taken = 0;
        for t in tasks {
            if t.await.unwrap().is_some() {
                taken += 1;
            }
        }
        assert_eq!(taken, 1, "a single use was spent more than once");
        assert_eq!(s.take_one("missing").await.unwrap(), None);
    }

    #[tokio::test]
    async fn an_index_lists_its_live_members_only() {
        let s = MemoryStore::new();
        s.index_add("i", "b", 200).await.unwrap();
        s.index_add("i", "a", 150).await.unwrap();
        s.index_add("i", "old", 90).await.unwrap();
        s.index_add("other", "x", 500).await.unwrap();
        assert_eq!(
            s.index_list("i", 100).await.unwrap(),
            vec![("a".to_string(), 150), ("b".to_string(), 200)]
        );
        // A later add extends the expiry, an earlier one keeps it; an expired member is gone
        // for good.
        assert_eq!(s.index_add("i", "a", 300).await.unwrap(), 300);
        assert_eq!(s.index_add("i", "a", 250).await.unwrap(), 300);
        assert_eq!(
            s.index_list("i", 160).await.unwrap(),
            vec![("a".to_string(), 300), ("b".to_string(), 200)]
        );
        assert!(s.index_remove("i", "b", 160).await.unwrap());
        assert!(!s.index_remove("i", "b", 160).await.unwrap());
        assert!(!s.index_remove("i", "a", 300).await.unwrap(), "expired");
        assert_eq!(s.index_list("missing", 0).await.unwrap(), vec![]);
    }

    #[tokio::test]
    async fn get_many_answers_each_key_in_order() {
        let s = MemoryStore::new();
        s.set("a", "1", Duration::from_secs(60)).await.unwrap();
        s.set("gone", "2", Duration::from_millis(1)).await.unwrap();
        std::thread::sleep(Duration::from_millis(5));
        let keys = ["gone", "a", "missing"].map(String::from);
        assert_eq!(
            s.get_many(&keys).await.unwrap(),
            vec![None, Some("1".to_string()), None]
        );
    }

    /// One request an hour, five at once: a bucket lives an hour per request spent.
    const SLOW: RateLimit = RateLimit {
        requests: 1,
        per: Duration::from_secs(3600),
        burst: 5,
    };

    #[test]
    fn at_the_cap_new_keys_fail_closed_and_live_buckets_keep_their_count() {
        let mut b = Buckets::with_cap(3);
        let t0 = Instant::now();
        // `limited` spends its whole burst; two more clients take the other slots.
        for _ in 0..5 {
            assert!(b.check("limited", SLOW, t0).unwrap().allowed);
        }
        assert!(!b.check("limited", SLOW, t0).unwrap().allowed);
        assert!(b.check("a", SLOW, t0).unwrap().allowed);
        assert!(b.check("b", SLOW, t0).unwrap().allowed);
        // A new key is refused (the caller answers 503), naming no key.
        let e = b.check("rate:l:ip:203.0.113.9", SLOW, t0).unwrap_err();
        assert_eq!(e, StateError::Unavailable(BUCKETS_FULL.to_string()));
        assert!(!e.to_string().contains("203.0.113.9"), "{e}");
        assert_eq!(b.tats.len(), 3);
        // Nothing was evicted: the limited client is still limited, the others still count.
        assert!(!b.check("limited", SLOW, t0).unwrap().allowed);
        assert_eq!(b.check("a", SLOW, t0).unwrap().remaining, 3);
        // Later, with every bucket still live, still no room.
        let later = t0 + Duration::from_secs(600);
        assert!(b.check("c", SLOW, later).is_err());
        assert!(!b.check("limited", SLOW, later).unwrap().allowed);
    }

    #[test]
    fn expired_buckets_make_room_at_the_cap() {
        let quick = RateLimit {
            requests: 1,
            per: Duration::from_secs(10),
            burst: 1,
        };
        let mut b = Buckets::with_cap(2);
        let t0 = Instant::now();
        assert!(b.check("a", quick, t0).unwrap().allowed);
        assert!(b.check("b", SLOW, t0).unwrap().allowed);
        assert!(b.check("c", quick, t0).is_err());
        // `a` is full again after 10s: the sweep forgets it (not `b`), and `c` gets its slot.
        let t10 = t0 + Duration::from_secs(10);
        assert!(b.check("c", quick, t10).unwrap().allowed);
        assert_eq!(b.tats.len(), 2);
        assert!(b.tats.contains_key("b") && !b.tats.contains_key("a"));
        // An expired bucket still in the map is reused, never refused.
        let t20 = t0 + Duration::from_secs(20);
        assert!(b.check("c", quick, t20).unwrap().allowed);
    }

    #[test]
    fn at_the_cap_a_flood_of_new_keys_sweeps_at_most_once_a_second() {
        let brief = RateLimit {
            requests: 10,
            per: Duration::from_secs(1),
            burst: 1,
        };
        let mut b = Buckets::with_cap(2);
        let t0 = Instant::now();
        assert!(b.check("a", brief, t0).unwrap().allowed);
        assert!(b.check("b", SLOW, t0).unwrap().allowed);
        assert!(b.check("c", brief, t0).is_err());
        // `a` is full again after 100ms, but the last sweep ran at t0: no pass over the map
        // before t0 + 1s, so `c` is refused without one (`a` is still held).
        let t500ms = t0 + Duration::from_millis(500);
        assert!(b.check("c", brief, t500ms).is_err());
        assert!(b.tats.contains_key("a"));
        assert!(b.check("c", brief, t0 + FULL_SWEEP_PAUSE).unwrap().allowed);
        assert!(!b.tats.contains_key("a"));
    }

    #[test]
    fn below_the_cap_expired_buckets_are_swept_once_the_map_has_doubled() {
        let quick = RateLimit {
            requests: 1,
            per: Duration::from_secs(1),
            burst: 1,
        };
        let mut b = Buckets::with_cap(BUCKET_SWEEP_FLOOR * 4);
        let t0 = Instant::now();
        for i in 0..BUCKET_SWEEP_FLOOR {
            b.check(&format!("k{i}"), quick, t0).unwrap();
        }
        // At the floor, a new key sweeps the expired buckets first.
        let t1 = t0 + Duration::from_secs(1);
        b.check("new", SLOW, t1).unwrap();
        assert_eq!(b.tats.len(), 1);
        assert_eq!(b.sweep_at, BUCKET_SWEEP_FLOOR);
    }

    #[tokio::test]
    async fn a_full_memory_store_refuses_through_the_trait() {
        let s = MemoryStore::with_bucket_cap(1);
        assert!(s.rate_check("a", SLOW).await.unwrap().allowed);
        assert!(matches!(
            s.rate_check("b", SLOW).await,
            Err(StateError::Unavailable(_))
        ));
        assert!(s.rate_check("a", SLOW).await.unwrap().allowed);
    }

    #[test]
    fn at_the_cap_new_records_fail_closed_and_live_ones_are_kept() {
        let mut e = Entries::with_cap(2);
        let t0 = Instant::now();
        let hour = Duration::from_secs(3600);
        e.put("dpop:jti:a", "1", hour, t0).unwrap();
        e.put("dpop:jti:b", "1", Duration::from_secs(10), t0)
            .unwrap();
        // A new key is refused, naming no key; nothing live was evicted.
        let err = e.put("dpop:jti:secret-c", "1", hour, t0).unwrap_err();
        assert_eq!(err, StateError::Unavailable(ENTRIES_FULL.to_string()));
        assert!(!err.to_string().contains("secret-c"), "{err}");
        assert_eq!(e.map.len(), 2);
        // A key already held is written again whatever the count.
        e.put("dpop:jti:a", "2", hour, t0).unwrap();
        assert_eq!(e.map["dpop:jti:a"].value, "2");
        // A sweep just before `b` expires finds the map full of live records; within a
        // second of it there is no new pass over the map, so `b`, expired meanwhile, is still
        // held and `c` still refused.
        let ms = |n| t0 + Duration::from_millis(n);
        assert!(e.put("dpop:jti:c", "1", hour, ms(9_900)).is_err());
        assert!(e.put("dpop:jti:c", "1", hour, ms(10_500)).is_err());
        assert!(e.map.contains_key("dpop:jti:b"));
        // Once the pause is over, the sweep forgets the expired `b` (not `a`) and `c` fits.
        e.put("dpop:jti:c", "1", hour, ms(10_900)).unwrap();
        assert!(e.map.contains_key("dpop:jti:a") && !e.map.contains_key("dpop:jti:b"));
    }

    #[tokio::test]
    async fn a_memory_store_full_of_records_refuses_new_ones_through_the_trait() {
        let s = MemoryStore::with_entry_cap(1);
        let ttl = Duration::from_secs(60);
        assert!(s.insert_if_absent("a", "x", ttl).await.unwrap());
        // A replayed record is still told apart from a new one at the cap.
        assert!(!s.insert_if_absent("a", "x", ttl).await.unwrap());
        assert!(matches!(
            s.insert_if_absent("b", "x", ttl).await,
            Err(StateError::Unavailable(_))
        ));
        assert!(matches!(
            s.set("b", "x", ttl).await,
            Err(StateError::Unavailable(_))
        ));
        s.set("a", "y", ttl).await.unwrap();
        assert_eq!(s.get("a").await.unwrap().as_deref(), Some("y"));
        // Deleting one makes room.
        assert!(s.delete("a").await.unwrap());
        assert!(s.insert_if_absent("b", "x", ttl).await.unwrap());
    }

    #[test]
    fn gcra_allows_the_burst_then_denies_with_retry_after() {
        let limit = RateLimit {
            requests: 10,
            per: Duration::from_secs(10),
            burst: 3,
        };
        let now = Instant::now();
        let mut tat = None;
        let mut remaining = Vec::new();
        for _ in 0..3 {
            let (t, o) = gcra(tat, now, limit);
            assert!(o.allowed);
            remaining.push(o.remaining);
            tat = Some(t);
        }
        assert_eq!(remaining, vec![2, 1, 0]);
        let (_, denied) = gcra(tat, now, limit);
        assert!(!denied.allowed);
        let retry = denied.retry_after.unwrap();
        assert!(
            retry > Duration::ZERO && retry <= Duration::from_secs(1),
            "{retry:?}"
        );
        // One emission interval later one more request fits.
        let (_, later) = gcra(tat, now + Duration::from_secs(1), limit);
        assert!(later.allowed);
    }
}

//! Issuers' key sets: loading from files, fetching JWKS URLs (directly or through OIDC
//! discovery), caching, background refresh, unknown-`kid` refetch with rate limiting, and
//! stale-while-failing up to `max_stale`. The only outbound network I/O in Portcullis.
//!
//! The hot path (`KeyStore::get`) is one hash lookup, one `ArcSwap` load and one `Arc` clone:
//! no lock, no allocation. Everything slow (fetching, scheduling, rate limiting) happens in
//! spawned tasks that write a new snapshot when a fetch ends. Fails closed: past `max_stale`
//! after the last good fetch, before the first one, or while the issuer publishes no usable
//! key, `get` returns an error and `ready()` is false. Never logs key material; metrics go only through `Metrics::record_jwks_fetch`.
//!
//! Policy, per issuer:
//! - Refresh: after a good fetch, at 90% of the response's Cache-Control `max-age` (`no-cache`
//!   and `no-store` count as 0; no header counts as 5 minutes), clamped into
//!   `[min_refresh, max_refresh]`, minus up to 10% jitter (never below `min_refresh`). Key
//!   files are re-read every `min_refresh`. A load is never scheduled more than `MAX_REFRESH`
//!   (a day) ahead; the config refuses longer intervals.
//! - Retry: after a failed load, 1 s, doubling, capped at `min_refresh`; the last good set stays
//!   in use until `max_stale` after the last good load, then `get` fails with `Stale`.
//! - No usable key: a well-formed key set in which every key is dropped (or none is listed) is
//!   the issuer's answer, not a failure: it replaces the set in force with an empty one (`get`
//!   fails with `NoUsableKeys`, `ready()` is false), because that is how an issuer withdraws a
//!   compromised key. Before a first good load it leaves the issuer not loaded. Retried like a
//!   failure, so keys published again arrive within `min_refresh`.
//! - Single flight: at most one load per issuer at a time; everyone else joins it.
//! - Unknown `kid`: at most one load *started* for it per `unknown_kid_interval`; joining a load
//!   already running is free.
//! - Transport: HTTPS unless the host is loopback or `allow_http` is set (also checked for a
//!   discovered `jwks_uri`), at most 3 redirects and only within the same origin, `max_bytes`
//!   enforced while streaming, `fetch_timeout` per GET (discovery is two GETs). Remote hosts
//!   go through the environment's proxy (`HTTPS_PROXY`, `HTTP_PROXY`, `ALL_PROXY`, minus
//!   `NO_PROXY`), loopback hosts never do.
//!
//! Must never touch: token verification (`identity`), decisions (`authz`, `decide`).

mod fetch;
mod schedule;

pub use schedule::MAX_REFRESH;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant, SystemTime};

use arc_swap::ArcSwap;
use tokio::sync::watch;

use crate::admin::metrics::Metrics;
use crate::config::schema::KeySourceConfig;
use crate::identity::KeySet;
use fetch::{Loaded, SourceKind};

/// What the store needs to know about one issuer.
#[derive(Debug, Clone)]
pub struct IssuerKeySource {
    /// Configured issuer name (the key for lookups and metrics).
    pub name: Arc<str>,
    /// The issuer URL (`iss`), used for OIDC discovery.
    pub issuer: String,
    /// Key source settings; `file` is already resolved against the config file's folder.
    pub source: KeySourceConfig,
}

/// Why an issuer's keys cannot be used right now.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    #[error("issuer `{0}` is not configured")]
    UnknownIssuer(String),
    #[error("keys for issuer `{issuer}` are not loaded yet: {reason}")]
    NotLoaded { issuer: String, reason: String },
    #[error("keys for issuer `{issuer}` are stale (last good fetch {age_secs}s ago): {reason}")]
    Stale {
        issuer: String,
        age_secs: u64,
        reason: String,
    },
    /// The issuer's last answer was a well-formed key set without a usable key: the keys it
    /// published before are withdrawn.
    #[error("keys for issuer `{issuer}` are unusable: {reason}")]
    NoUsableKeys { issuer: String, reason: String },
}

/// Per-issuer status for readiness and metrics.
#[derive(Debug, Clone)]
pub struct IssuerKeyStatus {
    pub name: Arc<str>,
    pub usable: bool,
    pub key_count: usize,
    pub last_good: Option<SystemTime>,
    pub last_error: Option<String>,
    /// The latest answer was a well-formed key set with no usable key: the issuer's (or the
    /// key file's) own withdrawal of its keys, not a failure to load them.
    pub withdrawn: bool,
}

/// What `get` reads: replaced as a whole after every load attempt.
#[derive(Default)]
struct Snapshot {
    set: Option<Arc<KeySet>>,
    /// Wall-clock time of the last good load, for status and the "seconds since" gauge.
    last_good: Option<SystemTime>,
    /// Monotonic time of the last good load; staleness is measured from it.
    last_good_at: Option<Instant>,
    /// The error of the most recent attempt; `None` when it succeeded or none finished yet.
    last_error: Option<Arc<str>>,
    /// The most recent answer was a key set with no usable key (see `IssuerKeyStatus`).
    withdrawn: bool,
}

/// Fetch bookkeeping, touched only off the hot path.
struct Flight {
    /// INVARIANT: at most one load per issuer runs at a time; whoever sets this spawns the load,
    /// and the load's `FlightGuard` clears it.
    in_flight: bool,
    /// When an unknown `kid` last triggered a load (the rate limit's clock).
    last_unknown_kid: Option<Instant>,
    /// When the background task should load next.
    next_due: Instant,
    /// Consecutive failed loads, for the retry backoff.
    failures: u32,
}

/// One issuer: its source, its current snapshot and its fetch state.
struct Slot {
    name: Arc<str>,
    issuer: String,
    cfg: KeySourceConfig,
    kind: SourceKind,
    state: ArcSwap<Snapshot>,
    flight: Mutex<Flight>,
    /// Bumped after every finished load; waiters subscribe before starting or joining one.
    done: watch::Sender<u64>,
}

impl Slot {
    fn flight(&self) -> MutexGuard<'_, Flight> {
        // A panic while holding this lock cannot leave `Flight` inconsistent (plain fields
        // written one at a time), so a poisoned lock is used as is.
        self.flight.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn max_stale(&self) -> Duration {
        self.cfg.max_stale.get()
    }
}

/// What spawned tasks share with the store.
struct Shared {
    client: Result<fetch::Clients, String>,
    metrics: Arc<Metrics>,
}

/// All issuers' keys. Cheap to share behind an `Arc`.
///
/// Background tasks hold only the issuer slots, never the store: dropping the last `Arc` of
/// the store (or calling `shutdown`) stops them. A load already in progress still finishes
/// (bounded by `fetch_timeout`) and updates a snapshot nobody reads.
pub struct KeyStore {
    slots: HashMap<Arc<str>, Arc<Slot>>,
    /// Configuration order, for `status` and `start`.
    order: Vec<Arc<Slot>>,
    shared: Arc<Shared>,
    started: AtomicBool,
    /// `true` asks background tasks to exit; dropping it (with the store) does the same.
    stop: watch::Sender<bool>,
}

impl KeyStore {
    pub fn new(sources: Vec<IssuerKeySource>, metrics: Arc<Metrics>) -> Self {
        let now = Instant::now();
        let order: Vec<Arc<Slot>> = sources
            .into_iter()
            .map(|s| {
                Arc::new(Slot {
                    kind: SourceKind::of(&s.source),
                    name: s.name,
                    issuer: s.issuer,
                    cfg: s.source,
                    state: ArcSwap::from_pointee(Snapshot::default()),
                    flight: Mutex::new(Flight {
                        in_flight: false,
                        last_unknown_kid: None,
                        next_due: now,
                        failures: 0,
                    }),
                    done: watch::Sender::new(0),
                })
            })
            .collect();
        let slots = order.iter().map(|s| (s.name.clone(), s.clone())).collect();
        Self {
            slots,
            order,
            shared: Arc::new(Shared {
                client: fetch::build_clients(),
                metrics,
            }),
            started: AtomicBool::new(false),
            stop: watch::Sender::new(false),
        }
    }

    /// Loads every issuer once (files now, URLs fetched) and spawns the background refresh
    /// tasks on the current tokio runtime. Returns when the first attempt for every issuer has
    /// finished (successfully or not); readiness tells which. A second call does nothing.
    pub async fn start(self: &Arc<Self>) {
        if self.started.swap(true, Ordering::SeqCst) {
            return;
        }
        let mut waits = Vec::with_capacity(self.order.len());
        for slot in &self.order {
            let mut done = slot.done.subscribe();
            done.mark_unchanged();
            if begin(slot) {
                spawn_load(slot.clone(), self.shared.clone());
            }
            waits.push(done);
        }
        for mut done in waits {
            // The sender lives in the slot, which we hold: this cannot fail.
            let _ = done.changed().await;
        }
        for slot in &self.order {
            tokio::spawn(refresh_loop(
                slot.clone(),
                self.shared.clone(),
                self.stop.subscribe(),
            ));
        }
    }

    /// Stops the background refresh tasks. `get` keeps answering from the last snapshot (and
    /// turns stale on schedule); used when a config reload replaces the store.
    pub fn shutdown(&self) {
        self.stop.send_replace(true);
    }

    /// The current usable key set for an issuer, or why there is none.
    pub fn get(&self, issuer: &str) -> Result<Arc<KeySet>, KeyError> {
        let Some(slot) = self.slots.get(issuer) else {
            return Err(KeyError::UnknownIssuer(issuer.to_string()));
        };
        let snap = slot.state.load();
        match (&snap.set, snap.last_good_at) {
            (Some(set), Some(at)) => {
                let age = at.elapsed();
                if age >= slot.max_stale() {
                    Err(KeyError::Stale {
                        issuer: slot.name.to_string(),
                        age_secs: age.as_secs(),
                        reason: reason(&snap),
                    })
                } else if set.is_empty() {
                    Err(KeyError::NoUsableKeys {
                        issuer: slot.name.to_string(),
                        reason: reason(&snap),
                    })
                } else {
                    Ok(set.clone())
                }
            }
            // Never loaded, and its answer was a well-formed set with no usable key (a key
            // file emptied to `{"keys":[]}` and reloaded): say so, not "not loaded yet".
            _ if snap.withdrawn => Err(KeyError::NoUsableKeys {
                issuer: slot.name.to_string(),
                reason: reason(&snap),
            }),
            _ => Err(KeyError::NotLoaded {
                issuer: slot.name.to_string(),
                reason: reason(&snap),
            }),
        }
    }

    /// Called when a token names a `kid` the current set lacks. Triggers at most one refetch
    /// per issuer per `unknown_kid_interval` (single-flight), and waits at most `wait` for it.
    /// Returns the new set when a refetch completed within `wait` and changed the set.
    ///
    /// A load already in progress (background refresh or another caller's) is joined rather
    /// than repeated, and joining does not use up the interval. Only loads started here count
    /// against it. The load itself runs in its own task, so it completes (and updates the
    /// store for later requests) even when this caller stops waiting.
    pub async fn refresh_for_unknown_kid(
        &self,
        issuer: &str,
        wait: Duration,
    ) -> Option<Arc<KeySet>> {
        let slot = self.slots.get(issuer)?;
        let before = slot.state.load().set.clone();
        let mut done = slot.done.subscribe();
        done.mark_unchanged();
        {
            let mut f = slot.flight();
            if !f.in_flight {
                let interval = slot.cfg.unknown_kid_interval.get();
                if f.last_unknown_kid.is_some_and(|t| t.elapsed() < interval) {
                    return None;
                }
                f.last_unknown_kid = Some(Instant::now());
                f.in_flight = true;
                drop(f);
                spawn_load(slot.clone(), self.shared.clone());
            }
        }
        tokio::time::timeout(wait, done.changed())
            .await
            .ok()?
            .ok()?;
        let after = self.get(issuer).ok()?;
        match before {
            Some(b) if Arc::ptr_eq(&b, &after) => None,
            _ => Some(after),
        }
    }

    /// True when every issuer has a usable key set.
    pub fn ready(&self) -> bool {
        self.order.iter().all(|s| self.get(&s.name).is_ok())
    }

    /// True when the issuer's most recent key load failed (the keys in force are older).
    pub fn refresh_failing(&self, issuer: &str) -> bool {
        self.slots
            .get(issuer)
            .is_some_and(|slot| slot.state.load().last_error.is_some())
    }

    /// Per-issuer status, in configuration order.
    pub fn status(&self) -> Vec<IssuerKeyStatus> {
        self.order
            .iter()
            .map(|slot| {
                let snap = slot.state.load();
                IssuerKeyStatus {
                    name: slot.name.clone(),
                    usable: self.get(&slot.name).is_ok(),
                    key_count: snap.set.as_ref().map_or(0, |s| s.len()),
                    last_good: snap.last_good,
                    last_error: snap.last_error.as_deref().map(str::to_string),
                    withdrawn: snap.withdrawn,
                }
            })
            .collect()
    }
}

fn reason(snap: &Snapshot) -> String {
    match &snap.last_error {
        Some(e) => e.to_string(),
        None if snap.set.is_some() => "no fetch has failed".to_string(),
        None => "no load has finished yet".to_string(),
    }
}

/// Claims the issuer's single load slot. `true`: the caller must spawn the load.
fn begin(slot: &Slot) -> bool {
    let mut f = slot.flight();
    if f.in_flight {
        false
    } else {
        f.in_flight = true;
        true
    }
}

/// Clears `in_flight` and wakes waiters when a load ends, even if its task panics or is
/// cancelled, so an issuer can never be left with a load that never finishes.
struct FlightGuard(Arc<Slot>);

impl Drop for FlightGuard {
    fn drop(&mut self) {
        self.0.flight().in_flight = false;
        self.0.done.send_modify(|n| *n = n.wrapping_add(1));
    }
}

/// Runs one load in its own task. The caller has set `in_flight`.
fn spawn_load(slot: Arc<Slot>, shared: Arc<Shared>) {
    tokio::spawn(async move {
        let guard = FlightGuard(slot);
        load_once(&guard.0, &shared).await;
    });
}

/// One load attempt: publish the result, record the metric, log, and schedule the next one.
async fn load_once(slot: &Slot, shared: &Shared) {
    let result = fetch::load(&slot.kind, &slot.issuer, &slot.cfg, &shared.client).await;
    let old = slot.state.load_full();
    match result {
        Ok(loaded) if loaded.keys.set.is_empty() => no_usable_key(slot, shared, &old, loaded),
        Ok(loaded) => {
            shared.metrics.record_jwks_fetch(&slot.name, "ok");
            let delay = match slot.kind {
                // A local file has no Cache-Control; re-reading it is cheap.
                SourceKind::File(_) => slot.cfg.min_refresh.get(),
                _ => schedule::jittered(
                    schedule::after_success(
                        loaded.max_age,
                        slot.cfg.min_refresh.get(),
                        slot.cfg.max_refresh.get(),
                    ),
                    slot.cfg.min_refresh.get(),
                    random(),
                ),
            };
            let set = publishable(slot, old.set.as_ref(), loaded);
            slot.state.store(Arc::new(Snapshot {
                set: Some(set),
                last_good: Some(SystemTime::now()),
                last_good_at: Some(Instant::now()),
                last_error: None,
                withdrawn: false,
            }));
            let mut f = slot.flight();
            f.failures = 0;
            f.next_due = schedule::due_after(Instant::now(), delay);
        }
        Err(failure) => {
            let code = failure.error.code();
            shared.metrics.record_jwks_fetch(&slot.name, code);
            let delay = schedule_retry(slot);
            let stale = old
                .last_good_at
                .is_some_and(|at| at.elapsed() >= slot.max_stale());
            if stale {
                tracing::error!(
                    issuer = %slot.name,
                    url = %failure.target,
                    error.class = code,
                    error = %failure.error,
                    "key load failed and the last good key set is past max_stale: failing closed"
                );
            } else {
                tracing::warn!(
                    issuer = %slot.name,
                    url = %failure.target,
                    error.class = code,
                    error = %failure.error,
                    retry_in_ms = delay.as_millis() as u64,
                    has_keys = old.set.as_ref().is_some_and(|s| !s.is_empty()),
                    "key load failed"
                );
            }
            slot.state.store(Arc::new(Snapshot {
                set: old.set.clone(),
                last_good: old.last_good,
                last_good_at: old.last_good_at,
                last_error: Some(failure.error.to_string().into()),
                withdrawn: old.withdrawn,
            }));
        }
    }
}

/// Counts a failed load and schedules the retry (1 s, doubling, capped at `min_refresh`).
fn schedule_retry(slot: &Slot) -> Duration {
    let mut f = slot.flight();
    f.failures = f.failures.saturating_add(1);
    let delay = schedule::after_failure(f.failures, slot.cfg.min_refresh.get());
    f.next_due = schedule::due_after(Instant::now(), delay);
    delay
}

/// A well-formed key set (file, URL or discovery) in which no key is usable: every key was
/// dropped, or none is listed. This is the issuer's answer, not a failed fetch, and it is how an
/// issuer withdraws a compromised key, so it replaces the keys in force with none: the issuer's
/// tokens are refused (`KeyError::NoUsableKeys`) instead of the withdrawn keys being trusted
/// until `max_stale`. The first load of an issuer stays "not loaded" as for any failure. Either
/// way the next load comes as after a failure (within `min_refresh`), so keys the issuer
/// publishes again are picked up soon.
fn no_usable_key(slot: &Slot, shared: &Shared, old: &Snapshot, loaded: Loaded) {
    let Loaded { keys, target, .. } = loaded;
    let error = fetch::FetchError::NoKeys(keys.dropped.len());
    shared.metrics.record_jwks_fetch(&slot.name, error.code());
    let delay = schedule_retry(slot);
    // Each reason names the key by index and (shortened) kid, never its material; `?` quotes
    // and escapes what the issuer wrote.
    let dropped = &keys.dropped;
    let withdrawn = old.set.as_ref().map(|previous| previous.len());
    let message = match withdrawn {
        None => "the issuer's key set has no usable key: none is loaded, its tokens are refused",
        Some(0) => {
            "the issuer's key set still has no usable key: its tokens are refused until it \
             publishes a usable one"
        }
        Some(_) => {
            "the issuer's key set has no usable key: the keys it published before are \
             withdrawn, its tokens are refused until it publishes a usable one"
        }
    };
    tracing::error!(
        issuer = %slot.name,
        url = %target,
        error.class = error.code(),
        error = %error,
        dropped = ?dropped,
        withdrawn_keys = withdrawn.unwrap_or(0),
        retry_in_ms = delay.as_millis() as u64,
        "{message}"
    );
    let Some(previous) = &old.set else {
        slot.state.store(Arc::new(Snapshot {
            set: None,
            last_good: old.last_good,
            last_good_at: old.last_good_at,
            last_error: Some(error.to_string().into()),
            withdrawn: true,
        }));
        return;
    };
    // The same (empty) `Arc` while nothing changes, so an unknown-`kid` refetch sees "unchanged".
    let set = if previous.is_empty() {
        previous.clone()
    } else {
        Arc::new(keys.set)
    };
    slot.state.store(Arc::new(Snapshot {
        set: Some(set),
        last_good: Some(SystemTime::now()),
        last_good_at: Some(Instant::now()),
        last_error: Some(error.to_string().into()),
        withdrawn: true,
    }));
}

/// The set to publish after a good load: the current `Arc` when the keys are the same (so
/// `refresh_for_unknown_kid` can tell "unchanged" by pointer), otherwise the new set.
fn publishable(slot: &Slot, current: Option<&Arc<KeySet>>, loaded: Loaded) -> Arc<KeySet> {
    let Loaded { keys, target, .. } = loaded;
    if let Some(cur) = current
        && same_keys(cur, &keys.set)
    {
        for why in &keys.dropped {
            tracing::debug!(issuer = %slot.name, url = %target, dropped = %why, "key dropped");
        }
        return cur.clone();
    }
    for why in &keys.dropped {
        tracing::warn!(issuer = %slot.name, url = %target, dropped = %why, "key dropped");
    }
    let kids: Vec<&str> = keys
        .set
        .keys
        .iter()
        .map(|k| k.kid.as_deref().unwrap_or("-"))
        .collect();
    tracing::info!(
        issuer = %slot.name,
        url = %target,
        key_count = keys.set.len(),
        kids = ?kids,
        "key set loaded"
    );
    Arc::new(keys.set)
}

/// A random number for jitter; `RandomState` is seeded randomly per thread and advanced per call.
fn random() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    std::collections::hash_map::RandomState::new()
        .build_hasher()
        .finish()
}

/// Same keys in the same order, with the same `kid` and `alg` (a changed `kid` on the same key
/// material changes which tokens find it).
fn same_keys(a: &KeySet, b: &KeySet) -> bool {
    a.len() == b.len()
        && a.keys.iter().zip(&b.keys).all(|(x, y)| {
            x.fingerprint == y.fingerprint && x.kid == y.kid && x.alg == y.alg && x.kty == y.kty
        })
}

/// One issuer's background refresh: sleep until the next load is due, load (or join a load in
/// progress), repeat. A load finished by someone else (unknown `kid`) reschedules the sleep.
async fn refresh_loop(slot: Arc<Slot>, shared: Arc<Shared>, mut stop: watch::Receiver<bool>) {
    loop {
        if *stop.borrow_and_update() {
            return;
        }
        // Subscribe before reading `next_due`, so a load ending in between is not missed.
        let mut done = slot.done.subscribe();
        done.mark_unchanged();
        let due = slot.flight().next_due;
        tokio::select! {
            () = tokio::time::sleep_until(due.into()) => {
                if begin(&slot) {
                    spawn_load(slot.clone(), shared.clone());
                }
                tokio::select! {
                    r = done.changed() => if r.is_err() { return },
                    _ = stop.changed() => return,
                }
            }
            r = done.changed() => if r.is_err() { return },
            _ = stop.changed() => return,
        }
    }
}

/// Resolves a key file path relative to the config file's folder.
pub fn resolve_path(config_dir: &std::path::Path, file: &std::path::Path) -> PathBuf {
    if file.is_absolute() {
        file.to_path_buf()
    } else {
        config_dir.join(file)
    }
}

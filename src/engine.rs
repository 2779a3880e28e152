//! The decision shell: the pure `decide` pipeline plus the verified-token cache and the
//! unknown-`kid` refetch. Owns the clock. No wire types here (`grpc` converts), no metrics
//! or audit output (the caller records the `Decision`).
//!
//! INVARIANT: a cache hit decides exactly as a miss would at the same `now` and key sets:
//! the time checks and every grant run again, and the entry is honoured only while the key
//! that verified it is still in its issuer's key set.

use std::cell::Cell;
use std::collections::HashSet;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use moka::sync::Cache;

use crate::admin::metrics::Metrics;
use crate::authz::{Decision, ReasonCode, RequestView, RouteMatch};
use crate::config::Config;
use crate::decide::{self, Credential};
use crate::identity::{Identity, jwt};
use crate::keys::KeyStore;
use crate::revocation::Revocations;
use crate::state::StateStore;

/// Seconds since the Unix epoch, as the core takes `now`.
pub fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// Bytes a token-cache entry costs besides the token and the identity: the cache's node,
/// its queues and timer wheel, the `Arc` headers, allocator slack. Calibrated by the memory
/// run in bench/ (RSS growth per cached token, issue 4).
const CACHE_ENTRY_OVERHEAD: usize = 600;

/// The verified-token cache: identities by token.
struct TokenCache {
    entries: Cache<Arc<str>, Arc<Identity>, foldhash::fast::RandomState>,
    /// Entries being refreshed (see `TokenExpiry::expire_after_read`).
    refreshing: Refreshing,
}

type Refreshing = Arc<Mutex<HashSet<Arc<str>>>>;

thread_local! {
    /// Set during a cache read on this thread when the entry read is due for a refresh and
    /// this read won the right to start it; taken right after the read by `Engine::cached`.
    static REFRESH_DUE: Cell<bool> = const { Cell::new(false) };
}

/// The right to refresh one entry. Dropping it (refresh done, failed or not started) lets
/// a later read claim it again.
struct RefreshClaim {
    refreshing: Refreshing,
    token: Arc<str>,
}

impl Drop for RefreshClaim {
    fn drop(&mut self) {
        let mut set = self.refreshing.lock().unwrap_or_else(|e| e.into_inner());
        set.remove(&self.token);
    }
}

/// Per-entry lifetime: until the token expires, capped by the configured maximum. And
/// refresh-ahead: a read within `max_ttl / 10` (at least a second) of its entry's expiry
/// has the token verified again on a background task, so a token in use is not left to
/// expire and be verified on the Check path (in the module: on Envoy's worker thread, where
/// bursts of expiries showed as latency spikes). A twentieth was tried first: a third of
/// tokens read every 2.3 s with `max_ttl: 30s` slipped through its 1.5 s window.
struct TokenExpiry {
    max_ttl: Duration,
    /// How close to its expiry a read refreshes an entry; `None` when `max_ttl` is too short
    /// for it to matter.
    refresh_window: Option<Duration>,
    refreshing: Refreshing,
}

impl TokenExpiry {
    fn new(max_ttl: Duration, refreshing: Refreshing) -> Self {
        let refresh_window =
            (max_ttl >= Duration::from_secs(2)).then(|| (max_ttl / 10).max(Duration::from_secs(1)));
        Self {
            max_ttl,
            refresh_window,
            refreshing,
        }
    }
}

impl moka::Expiry<Arc<str>, Arc<Identity>> for TokenExpiry {
    fn expire_after_create(
        &self,
        key: &Arc<str>,
        value: &Arc<Identity>,
        _created_at: Instant,
    ) -> Option<Duration> {
        let left = value.expires_at.saturating_sub(unix_now()).max(0) as u64;
        Some(entry_ttl(self.max_ttl, key, left))
    }

    /// Called by moka on every hit: the cheap part (one comparison) runs on every Check, the
    /// rest only within the refresh window.
    fn expire_after_read(
        &self,
        key: &Arc<str>,
        value: &Arc<Identity>,
        _read_at: Instant,
        left: Option<Duration>,
        _last_modified_at: Instant,
    ) -> Option<Duration> {
        if let (Some(window), Some(left)) = (self.refresh_window, left)
            && left <= window
            // Only an entry that ends before its token does: verifying the token again
            // would otherwise only find the same `exp`.
            && value.expires_at.saturating_sub(unix_now()) > left.as_secs() as i64 + 1
            && self
                .refreshing
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(key.clone())
        {
            REFRESH_DUE.set(true);
        }
        left
    }

    /// A refreshed entry gets a whole new life (moka's default keeps the old expiry).
    fn expire_after_update(
        &self,
        key: &Arc<str>,
        value: &Arc<Identity>,
        updated_at: Instant,
        _left: Option<Duration>,
    ) -> Option<Duration> {
        self.expire_after_create(key, value, updated_at)
    }
}

/// How long a verified token stays cached: until it expires, and at most `max_ttl` less up
/// to a tenth of it, a share that differs from token to token. Tokens first seen together
/// (a burst of new clients, a restart under load) would otherwise all expire in the same
/// instant and all be verified again at once (10 000 RS256 tokens: ~250 ms of CPU falling
/// due together on the thread that answers Checks). The latency effect could not be told
/// apart from the benchmark VM's own stalls (docs/performance.md). The spread only ever
/// shortens an entry's life.
fn entry_ttl(max_ttl: Duration, token: &str, seconds_left: u64) -> Duration {
    use std::hash::BuildHasher;
    const STEPS: u32 = 1024;
    let step = (foldhash::fast::FixedState::default().hash_one(token) % u64::from(STEPS)) as u32;
    // Saturating: the config bounds `max_ttl` to a day, but a tenth of an enormous one times
    // `step` overflowed `Duration` and panicked inside Check.
    let cap = max_ttl.saturating_sub((max_ttl / 10).saturating_mul(step) / STEPS);
    cap.min(Duration::from_secs(seconds_left))
}

/// Who `check_verified` decides for.
pub enum GivenCaller {
    /// A caller taken as verified, sending its token as a plain bearer token without a
    /// client certificate: a token that must be bound (DPoP, certificate) gets the 401 the
    /// server gives such a request.
    Verified(Arc<Identity>),
    /// A caller taken as verified whose request also proves the token's binding (its DPoP
    /// proof, its client certificate).
    Proven(Arc<Identity>),
    /// A credential the server refuses when it verifies it (claims, or an API key, that it
    /// does not accept at that time), with the server's 401; sent where `issuer`'s tokens
    /// are read (`None`: where API keys are read).
    Refused {
        issuer: Option<Arc<str>>,
        deny: Decision,
    },
}

/// A request's headers with one more credential header (`check_verified`'s caller).
#[derive(Debug)]
struct WithCredential<'a> {
    inner: &'a dyn crate::authz::request::Headers,
    name: &'a str,
    value: String,
}

impl crate::authz::request::Headers for WithCredential<'_> {
    fn entry(&self, name: &str) -> Option<(&str, &str)> {
        if name == self.name {
            Some((self.name, &self.value))
        } else {
            self.inner.entry(name)
        }
    }
}

/// One loaded configuration with its keys and token cache. A config reload builds a new one.
pub struct Engine {
    pub config: Arc<Config>,
    pub keys: Arc<KeyStore>,
    /// Shared state (revocations, rate limits, DPoP replay, approvals).
    /// Just-in-time approvals (rules with `approval:`), on `state`.
    pub approvals: crate::approvals::Approvals,
    pub state: Arc<dyn StateStore>,
    /// The file-based revocation list (runtime entries live in `state`).
    pub revocations: Arc<Revocations>,
    /// Runtime revocations mirrored from `state` (kept across config reloads).
    pub runtime_revoked: Arc<crate::revocation::RuntimeRevocations>,
    /// Where approval events go (kept across config reloads).
    pub audit: crate::audit::AuditSink,
    cache: Option<TokenCache>,
    metrics: Arc<Metrics>,
    key_wait: Duration,
}

impl Engine {
    pub fn new(
        config: Arc<Config>,
        keys: Arc<KeyStore>,
        state: Arc<dyn StateStore>,
        metrics: Arc<Metrics>,
    ) -> Self {
        let cache_cfg = &config.file.tokens.cache;
        let cache = (cache_cfg.capacity > 0).then(|| {
            let refreshing = Refreshing::default();
            let budget = cache_cfg.max_bytes.get();
            // Entries weigh their estimated bytes, and at least budget/capacity, so the cache
            // holds at most `capacity` entries and about `max_bytes` bytes.
            let floor = budget.div_ceil(cache_cfg.capacity).min(u64::from(u32::MAX));
            let entries = Cache::builder()
                .max_capacity(budget)
                .weigher(move |token: &Arc<str>, identity: &Arc<Identity>| -> u32 {
                    let bytes =
                        (token.len() + identity.approx_bytes() + CACHE_ENTRY_OVERHEAD) as u64;
                    u32::try_from(bytes.max(floor)).unwrap_or(u32::MAX)
                })
                .expire_after(TokenExpiry::new(
                    cache_cfg.max_ttl.get(),
                    refreshing.clone(),
                ))
                // Keys are whole tokens (~1 KiB): a fast, per-process seeded hash. Only
                // verified tokens are inserted, so nobody can choose what the table holds.
                .build_with_hasher(foldhash::fast::RandomState::default());
            TokenCache {
                entries,
                refreshing,
            }
        });
        let key_wait = config.file.server.key_fetch_wait.get();
        let revocations = Arc::new(Revocations::load(
            config.revocation_file.clone(),
            crate::revocation::issuer_names(&config),
        ));
        let mut approvals = crate::approvals::Approvals::new(&config, state.clone());
        approvals.count_webhook_in(&metrics);
        Self {
            revocations,
            runtime_revoked: Arc::default(),
            audit: crate::audit::AuditSink::disabled(),
            approvals,
            config,
            keys,
            state,
            cache,
            metrics,
            key_wait,
        }
    }

    /// Uses `revocations` (e.g. the previous engine's, on a config reload that keeps the same
    /// `revocation.file`) instead of the list loaded by `new`.
    pub fn with_revocations(mut self, revocations: Arc<Revocations>) -> Self {
        self.revocations = revocations;
        self
    }

    /// Uses an existing mirror of runtime revocations (the previous engine's, on a reload).
    pub fn with_runtime_revocations(
        mut self,
        runtime: Arc<crate::revocation::RuntimeRevocations>,
    ) -> Self {
        self.runtime_revoked = runtime;
        self
    }

    /// Tells no approver of the requests it opens (no webhook): for policy tests.
    pub fn without_approval_webhook(mut self) -> Self {
        self.approvals.without_webhook();
        self
    }

    /// Sends approval events (requested, used, ...) to the audit log.
    pub fn with_audit(mut self, audit: crate::audit::AuditSink) -> Self {
        self.approvals.set_audit(audit.clone());
        self.audit = audit;
        self
    }

    /// Verifies a bearer token as a Check would (same issuers, keys and cache), for callers
    /// of the approvals API. The token is looked up as if sent in `authorization`.
    pub async fn verify_bearer(&self, token: &str, now: i64) -> Result<Arc<Identity>, Decision> {
        let cred = Credential {
            token,
            header: "authorization",
            dpop: false,
        };
        let identity = self.identity(&cred, now).await?;
        // A revoked approver must not approve anything.
        self.not_revoked(&identity, now)?;
        // Held to its bindings as on a Check: this API has no client certificate and takes
        // no DPoP proof, so a certificate- or DPoP-bound token (or one from an issuer that
        // requires either) is refused, never taken as a plain bearer token.
        let headers = std::collections::HashMap::new();
        let req = RequestView {
            method: "POST",
            host: "",
            path: "/",
            headers: &headers,
            source_ip: None,
            source_principal: "",
            scheme: "",
            peer_certificate: None,
        };
        decide::binding_checks(&self.config, &req, &cred, &identity, now).map_err(|deny| {
            // The Check's reason ("send it with the DPoP scheme", "the request has no client
            // certificate") would send an approver after a proof or a certificate this API
            // never reads, even when the CLI did present a client certificate.
            if deny.code == ReasonCode::InvalidToken {
                Decision::new(
                    ReasonCode::InvalidToken,
                    "this token is bound to a key (`cnf`), or its issuer requires that \
                     (`cert_bound: true`, `dpop: required`), and the approvals API checks no \
                     binding: it takes no DPoP proof and does not bind tokens to the client \
                     certificate; approve with an unbound token",
                )
            } else {
                deny
            }
        })?;
        Ok(identity)
    }

    /// Number of cached verified tokens (approximate, for metrics).
    pub fn cached_tokens(&self) -> u64 {
        self.cache.as_ref().map_or(0, |c| c.entries.entry_count())
    }

    /// Runs the token cache's pending maintenance (evictions over budget, expiries), so the
    /// figures below are current.
    pub fn sync_cache(&self) {
        if let Some(cache) = &self.cache {
            cache.entries.run_pending_tasks();
        }
    }

    /// Estimated bytes held by the token cache (its weighted size).
    pub fn cached_bytes(&self) -> u64 {
        self.cache.as_ref().map_or(0, |c| c.entries.weighted_size())
    }

    /// Decides one request at the current time.
    pub async fn check(&self, req: &RequestView<'_>) -> Decision {
        self.check_at(req, unix_now()).await
    }

    /// Decides one request at `now`, and, with `dry_run` routes, what they would answer.
    pub async fn check_at(&self, req: &RequestView<'_>, now: i64) -> Decision {
        let Some(candidate) = &self.config.dry_run else {
            return self.check_live(req, now, None).await;
        };
        let mut caller = None;
        let live = self.check_live(req, now, Some(&mut caller)).await;
        let caller = || match caller {
            Some(caller) => caller,
            // The live routes answered without reading the credential (public, or no route)
            // and the candidate's route needs it.
            None => self.unread_caller(req, now),
        };
        // The candidate is never enforced: whatever happens to it, the live answer stands.
        let would = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            #[cfg(test)]
            tests::FAIL_DRY_RUN.with(|fail| assert!(!fail.get(), "dry run made to fail"));
            let would = decide::dry_run(&self.config, candidate, req, now, caller);
            self.dry_run_after_grant(req, &live, would, now)
        }));
        match would {
            Ok(would) => live.with_dry_run(would),
            Err(_) => {
                self.metrics.dry_run_failures.inc();
                tracing::error!("the dry run failed (panicked); the live decision stands");
                live
            }
        }
    }

    /// The caller of `req` for the `dry_run` routes when the live check did not read the
    /// credential: verified against the keys at hand (no token cache, no key refetch, so the
    /// live answer never waits for it), revocation and bindings checked, except the single
    /// use of a DPoP proof, which would spend it.
    fn unread_caller(&self, req: &RequestView<'_>, now: i64) -> decide::Caller {
        let cred = decide::extract_credential(&self.config, req)?;
        let keys = |issuer: &str| self.keys.get(issuer);
        let identity = decide::verify_credential(&self.config, &cred, &keys, now)?;
        self.not_revoked(&identity, now)?;
        decide::binding_checks(&self.config, req, &cred, &identity, now)?;
        Ok(identity)
    }

    /// Decides one request at `now` with the live routes. `caller`, when given, receives the
    /// caller once the credential checks have run.
    async fn check_live(
        &self,
        req: &RequestView<'_>,
        now: i64,
        mut caller: Option<&mut Option<decide::Caller>>,
    ) -> Decision {
        let mut note = |c: &dyn Fn() -> decide::Caller| {
            if let Some(slot) = caller.as_deref_mut() {
                *slot = Some(c());
            }
        };
        let m = match self.matched(req).await {
            Ok(m) => m,
            Err(answer) => return answer,
        };
        let route = Some(m.route_id.clone());
        let cred = match decide::extract_credential(&self.config, req) {
            Ok(c) => c,
            Err(deny) => {
                let deny = decide::missing_credential(&self.config, &m, deny);
                note(&|| Err(deny.clone()));
                return self.without_credential(req, &m, deny, now).await;
            }
        };
        // A client that sent its token with the DPoP scheme is challenged in that scheme.
        let challenged = |d: Decision| {
            if cred.dpop {
                decide::dpop_scheme_challenge(&self.config, &cred, d)
            } else {
                d
            }
        };
        let identity = match self.identity(&cred, now).await {
            Ok(id) => id,
            Err(deny) => {
                note(&|| Err(deny.clone()));
                return challenged(deny.with_route(route));
            }
        };
        let next_nonce = match self.identity_checks(req, &cred, &identity, now).await {
            Ok(next_nonce) => next_nonce,
            Err(deny) => {
                note(&|| Err(deny.clone()));
                return challenged(deny.with_route(route).with_identity(Some(identity.clone())));
            }
        };
        note(&|| Ok(identity.clone()));
        let decision = challenged(self.grant(req, &m, &identity, now).await);
        // The client's DPoP nonce is about to expire: hand it the next one, allowed or not.
        match next_nonce {
            Some(nonce) => decision.with_header(decide::DPOP_NONCE_HEADER, nonce),
            None => decision,
        }
    }

    /// An engine for one-off decisions outside the server (`explain`, policy tests): fresh
    /// in-memory state, the config's key sources (not started), the revocation file read as
    /// the server reads it, no runtime revocations (they live in the shared store) and no
    /// approvals webhook (no approver is told of a request that exists nowhere else).
    pub fn offline(config: Arc<Config>) -> Self {
        let metrics = Arc::new(Metrics::new());
        let keys = Arc::new(crate::server::key_store(&config, metrics.clone()));
        let state = Arc::new(crate::state::MemoryStore::new());
        Engine::new(config, keys, state, metrics).without_approval_webhook()
    }

    /// Ready to decide as configured: every issuer's keys usable, the runtime revocations
    /// read from shared state, and the audit log taking records (while it refuses them,
    /// every decision is a 503 `audit_unavailable`, so a replica in that state is taken out
    /// of rotation rather than kept in it denying everything). `/readyz` and gRPC health.
    pub fn ready(&self) -> bool {
        self.keys.ready() && self.runtime_revoked.synced() && !self.audit.refusing()
    }

    /// The revocation file's and the runtime list's refusal of `identity`, if any. Both
    /// judge issuer scopes by this config's issuer names (`Revocations::issuers`): a runtime
    /// entry scoped to a name the config lacks names every issuer's tokens.
    fn not_revoked(&self, identity: &Identity, now: i64) -> Result<(), Decision> {
        self.revocations.check(identity, now)?;
        self.runtime_revoked
            .check(identity, self.revocations.issuers())
    }

    /// Decides `req` at `now` for a given caller (`None`: no credential): the steps of
    /// `check_at` with the token's verification taken as done. Policy tests (`policytest`)
    /// run their cases through it.
    pub async fn check_verified(
        &self,
        req: &RequestView<'_>,
        caller: Option<&GivenCaller>,
        now: i64,
    ) -> Decision {
        let missing = || {
            let missing = decide::extract_credential(&self.config, req).err();
            missing.unwrap_or_else(|| Decision::new(ReasonCode::CredentialMissing, "no credential"))
        };
        let checked = caller.map(|given| self.given_caller(req, given, now));
        let live = match (self.matched(req).await, &checked) {
            (Err(answer), _) => answer,
            (Ok(m), Some(Ok(identity))) => self.grant(req, &m, identity, now).await,
            (Ok(m), Some(Err(deny))) => deny.clone().with_route(Some(m.route_id.clone())),
            (Ok(m), None) => {
                // The challenge a live Check answers on this route (`check_live`).
                let deny = decide::missing_credential(&self.config, &m, missing());
                self.without_credential(req, &m, deny, now).await
            }
        };
        let Some(candidate) = &self.config.dry_run else {
            return live;
        };
        let caller = || checked.unwrap_or_else(|| Err(missing()));
        let would = decide::dry_run(&self.config, candidate, req, now, caller);
        let would = self.dry_run_after_grant(req, &live, would, now);
        live.with_dry_run(would)
    }

    /// The checks a Check runs on the credential of a caller `check_verified` is given, in
    /// the server's order. The caller stands for a credential sent where its issuer's tokens
    /// (or API keys) are read, beside what the request itself carries, and is extracted as a
    /// Check extracts it: a second credential (another credential header, the same header
    /// again, a token or key in the query) is refused just the same. Then a refused caller
    /// gets its 401, as verification would answer; then the revocation lists, and a `cnf`
    /// the server cannot check. The request's DPoP proof and client certificate are not
    /// checked: a caller given as verified has no token to bind them to.
    fn given_caller(
        &self,
        req: &RequestView<'_>,
        caller: &GivenCaller,
        now: i64,
    ) -> decide::Caller {
        const GIVEN: &str = "verified-caller";
        let issuer = match caller {
            GivenCaller::Verified(identity) | GivenCaller::Proven(identity)
                if identity.api_key_id().is_some() =>
            {
                None
            }
            GivenCaller::Verified(identity) | GivenCaller::Proven(identity) => {
                Some(&identity.issuer_name)
            }
            GivenCaller::Refused { issuer, .. } => issuer.as_ref(),
        };
        let (header, value) = match issuer {
            None => match &self.config.api_keys {
                Some(keys) => (keys.header.as_str(), GIVEN.to_string()),
                None => {
                    return Err(Decision::new(
                        ReasonCode::Internal,
                        "no `api_keys` configured",
                    ));
                }
            },
            Some(name) => match self.config.issuers.iter().find(|i| i.name == *name) {
                Some(i) if i.scheme.is_empty() => (i.header.as_str(), GIVEN.to_string()),
                Some(i) => (i.header.as_str(), format!("{} {GIVEN}", i.scheme)),
                None => {
                    return Err(Decision::new(
                        ReasonCode::Internal,
                        "the caller's issuer is not part of this configuration",
                    ));
                }
            },
        };
        // Repeated headers reach a Check joined with `,`.
        let value = match req.headers.entry(header) {
            Some((_, sent)) => format!("{sent},{value}"),
            None => value,
        };
        let headers = WithCredential {
            inner: req.headers,
            name: header,
            value,
        };
        let view = RequestView {
            headers: &headers,
            ..*req
        };
        let cred = decide::extract_credential(&self.config, &view)?;
        let (identity, proven) = match caller {
            GivenCaller::Verified(identity) => (identity, false),
            GivenCaller::Proven(identity) => (identity, true),
            GivenCaller::Refused { deny, .. } => return Err(deny.clone()),
        };
        let refused = |deny: Decision| deny.with_identity(Some(identity.clone()));
        self.not_revoked(identity, now).map_err(refused)?;
        if identity.api_key_id().is_none() {
            decide::confirmation(identity).map_err(refused)?;
            // As the server checks a bearer request without a client certificate (no DPoP
            // proof's single use is spent: a bearer request has none).
            if !proven {
                decide::binding_checks(&self.config, &view, &cred, identity, now)
                    .map_err(refused)?;
            }
        }
        Ok(identity.clone())
    }

    /// The stateful steps after a grant, for an allow of the `dry_run` candidate. They are
    /// never run for it (they spend shared state), so it meets them as the `live` request
    /// did where that says how they would go: a request a configured limit refused (its
    /// answer names the limit, `rate_limit`) is rate-limited on the same route whatever the
    /// rule (limits count per route and caller); a live `state_unavailable` is the
    /// candidate's too where a limit selects its route (the store it would count in is the
    /// one that failed); and an approval goes as the live one went on the same route, rule
    /// and approval policy (`Approvals::dry_run_gate`, which also owns the approvals' own
    /// 429). A candidate allow on another route is not rate-limited.
    fn dry_run_after_grant(
        &self,
        req: &RequestView<'_>,
        live: &Decision,
        would: Decision,
        now: i64,
    ) -> Decision {
        if !would.is_allow() {
            return would;
        }
        let by_limit = live.is_configured_rate_limit();
        let store_down = live.code == ReasonCode::StateUnavailable
            && would.route.as_deref().is_some_and(|route| {
                !crate::ratelimit::applicable(&self.config, req, route, would.identity.as_deref())
                    .is_empty()
            });
        if (by_limit && live.route == would.route) || store_down {
            return Decision {
                code: live.code,
                detail: live.detail.clone(),
                ..would
            };
        }
        self.approvals.dry_run_gate(live, would, now)
    }

    /// The route `req` matches. `Err` is the whole answer: a deny, or a public route's
    /// allow (public routes need no identity, but their rate limits still apply).
    async fn matched(&self, req: &RequestView<'_>) -> Result<RouteMatch<'_>, Decision> {
        let m = self.config.policy.match_route(req)?;
        if m.public {
            let allow = decide::public_allow(&m);
            return Err(
                crate::ratelimit::enforce(&*self.state, &self.config, req, &m, allow).await,
            );
        }
        Ok(m)
    }

    /// A request without a usable credential (`deny` says why): a service grant by its peer
    /// identity, then rate limits and approvals; otherwise `deny`.
    async fn without_credential(
        &self,
        req: &RequestView<'_>,
        m: &RouteMatch<'_>,
        deny: Decision,
        now: i64,
    ) -> Decision {
        let principals = req.principals();
        let d = decide::peer_grant(
            &self.config,
            &self.config.policy,
            req,
            m,
            deny,
            &principals,
            now,
        )
        .with_route(Some(m.route_id.clone()));
        if d.is_allow() {
            self.after_grant(req, m, d, now).await
        } else {
            d
        }
    }

    /// The grant for a verified identity, then rate limits and approvals.
    async fn grant(
        &self,
        req: &RequestView<'_>,
        m: &RouteMatch<'_>,
        identity: &Arc<Identity>,
        now: i64,
    ) -> Decision {
        let principals = req.principals();
        let policy = &self.config.policy;
        let decision = decide::authorize(&self.config, policy, req, m, identity, &principals, now);
        self.after_grant(req, m, decision, now).await
    }

    /// Checks on a verified identity that need more than the token: revocation, DPoP proof
    /// and replay, certificate binding. They run on cache hits and misses alike. Answers the
    /// next DPoP nonce to hand the client, if its proof's is about to expire.
    async fn identity_checks(
        &self,
        req: &RequestView<'_>,
        cred: &Credential<'_>,
        identity: &Arc<Identity>,
        now: i64,
    ) -> Result<Option<String>, Decision> {
        self.not_revoked(identity, now)?;
        let guard = decide::binding_checks(&self.config, req, cred, identity, now)?;
        if let Some(guard) = guard {
            // A DPoP proof is single-use: the first request to record its `jti` wins, every
            // later one (here or on another replica sharing the store) is a replay.
            match self
                .state
                .insert_if_absent(&guard.key, "1", guard.ttl)
                .await
            {
                Ok(true) => {}
                Ok(false) => return Err(guard.replayed),
                Err(e) => return Err(Decision::new(ReasonCode::StateUnavailable, e.to_string())),
            }
            return Ok(guard.next_nonce);
        }
        Ok(None)
    }

    /// Stateful limits applied to a granted request: rate limits and quotas, just-in-time
    /// approvals. A deny passes through unchanged.
    async fn after_grant(
        &self,
        req: &RequestView<'_>,
        m: &RouteMatch<'_>,
        decision: Decision,
        now: i64,
    ) -> Decision {
        // Rate limits first: a flood is refused before it can file approval requests.
        let decision =
            crate::ratelimit::enforce(&*self.state, &self.config, req, m, decision).await;
        self.approvals.gate(req, decision, now).await
    }

    /// The verified identity for a credential: from the cache when still valid, else verified
    /// (refetching keys once, within `key_fetch_wait`, when the token names an unknown `kid`).
    async fn identity(&self, cred: &Credential<'_>, now: i64) -> Result<Arc<Identity>, Decision> {
        // API keys are a hash lookup: no cache, no key fetch.
        if let Some(result) = decide::verify_api_key(&self.config, cred, now) {
            return result;
        }
        // INVARIANT: only tokens within the size cap are looked up and cached.
        let cache = self
            .cache
            .as_ref()
            .filter(|_| cred.token.len() <= self.config.file.tokens.max_bytes);
        if let Some(cache) = cache {
            if let Some(hit) = self.cached(cache, cred, now)? {
                self.metrics.token_cache_hits.inc();
                return Ok(hit);
            }
            self.metrics.token_cache_misses.inc();
        }

        let (issuer, token) = decide::select_issuer(&self.config, cred)?;
        let set = match self.keys.get(&issuer.name) {
            Ok(set) => set,
            // No usable keys (withdrawn, never loaded, stale): a token for this issuer asks
            // for a load now, as an unknown `kid` does (same single flight, same
            // `unknown_kid_interval`), so keys published again are in force at the first
            // token rather than at the next scheduled refresh.
            Err(e) => self
                .keys
                .refresh_for_unknown_kid(&issuer.name, self.key_wait)
                .await
                .ok_or_else(|| decide::keys_unavailable(e))?,
        };
        let jwt = match token.verify(&issuer.rules, &set, now) {
            Ok(v) => v,
            Err(e) if e.is_unknown_kid() => {
                match self
                    .keys
                    .refresh_for_unknown_kid(&issuer.name, self.key_wait)
                    .await
                {
                    Some(fresh) => jwt::verify(cred.token, &issuer.rules, &fresh, now)
                        .map_err(decide::invalid_token)?,
                    // A background refresh may have swapped the set between our `get` and the
                    // refetch request: verify once more against whatever is current now.
                    None => match self.keys.get(&issuer.name) {
                        Ok(current) if !Arc::ptr_eq(&current, &set) => {
                            jwt::verify(cred.token, &issuer.rules, &current, now)
                                .map_err(decide::invalid_token)?
                        }
                        _ => {
                            let mut deny = decide::invalid_token(e);
                            // Not necessarily a forged `kid`: the refetch that could have
                            // found it failed. Why is for operators (`/readyz`), not clients.
                            if self.keys.refresh_failing(&issuer.name) {
                                deny.detail = format!(
                                    "{} (the key set could not be refreshed just now)",
                                    deny.detail
                                )
                                .into();
                            }
                            return Err(deny);
                        }
                    },
                }
            }
            Err(e) => return Err(decide::invalid_token(e)),
        };
        let verified = Arc::new(Identity::from_verified(
            issuer.name.clone(),
            jwt,
            &issuer.claims,
        ));

        if let Some(cache) = cache {
            cache
                .entries
                .insert(Arc::from(cred.token), verified.clone());
        }
        Ok(verified)
    }

    /// Verifies a cached token again on a task of the current runtime (not the thread that
    /// answers this Check) and replaces its entry; drops the entry when the token no longer
    /// verifies (the next Check then goes the whole way, key refetch included, and gets the
    /// deny itself). Without a runtime nothing happens: the entry simply expires.
    fn refresh(&self, cache: &TokenCache, claim: RefreshClaim, cred: &Credential<'_>) {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let (entries, config) = (cache.entries.clone(), self.config.clone());
        let (keys, metrics) = (self.keys.clone(), self.metrics.clone());
        let (header, dpop): (Box<str>, bool) = (cred.header.into(), cred.dpop);
        runtime.spawn(async move {
            let now = unix_now();
            let cred = Credential {
                token: &claim.token,
                header: &header,
                dpop,
            };
            let verified = decide::select_issuer(&config, &cred)
                .ok()
                .and_then(|(issuer, jwt)| {
                    let set = keys.get(&issuer.name).ok()?;
                    let jwt = jwt.verify(&issuer.rules, &set, now).ok()?;
                    Some(Identity::from_verified(
                        issuer.name.clone(),
                        jwt,
                        &issuer.claims,
                    ))
                });
            match verified {
                Some(identity) => {
                    metrics.token_cache_refreshes.inc();
                    entries.insert(claim.token.clone(), Arc::new(identity));
                }
                None => entries.invalidate(&claim.token),
            }
            drop(claim);
        });
    }

    /// A cache hit that is still valid at `now`: same header as its issuer expects, time checks
    /// pass again, and the issuer's current key set would still pick the verifying key for
    /// the token's `kid` and `alg` (a key republished under another `kid`, or for another
    /// `alg`, no longer verifies the token).
    /// `Ok(None)` is a miss; `Err` is a deny the hit itself proves (e.g. expired).
    fn cached(
        &self,
        cache: &TokenCache,
        cred: &Credential<'_>,
        now: i64,
    ) -> Result<Option<Arc<Identity>>, Decision> {
        let hit = cache.entries.get(cred.token);
        // Taken whatever happens next: a claim not used is dropped, and so released.
        let refresh = REFRESH_DUE.replace(false).then(|| RefreshClaim {
            refreshing: cache.refreshing.clone(),
            token: Arc::from(cred.token),
        });
        let Some(hit) = hit else {
            return Ok(None);
        };
        let Some(issuer) = self
            .config
            .issuers
            .iter()
            .find(|i| i.name == hit.issuer_name && i.header == cred.header)
        else {
            return Ok(None);
        };
        jwt::check_times(
            hit.expires_at,
            hit.not_before,
            hit.issued_at,
            &issuer.rules,
            now,
        )
        .map_err(decide::invalid_token)?;
        // Without usable keys the miss path decides: it asks for a load first, and answers
        // `keys_unavailable` when none comes.
        let Ok(set) = self.keys.get(&issuer.name) else {
            return Ok(None);
        };
        // As a verification would pick it: among at most MAX_CANDIDATE_KEYS candidates.
        let still_picked = match hit.key_alg {
            Some(alg) => {
                let (mut seen, mut found) = (0usize, false);
                for k in set.candidates(hit.key_kid.as_deref(), alg) {
                    seen += 1;
                    found |= k.fingerprint == hit.key_fingerprint;
                }
                found && seen <= jwt::MAX_CANDIDATE_KEYS
            }
            None => set.contains(&hit.key_fingerprint),
        };
        if !still_picked {
            // The miss path verifies again: an unknown `kid` refetches the keys, and the
            // deny (or allow) is the one a fresh verification gives.
            cache.entries.invalidate(cred.token);
            return Ok(None);
        }
        if let Some(claim) = refresh {
            self.refresh(cache, claim, cred);
        }
        Ok(Some(hit))
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// An engine on the shipped config with `extra` YAML appended, in-memory state.
    pub(crate) fn shipped_engine(extra: &str, metrics: &Arc<Metrics>) -> Engine {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("config/portcullis.yaml");
        let text = format!("{}\n{extra}\n", std::fs::read_to_string(&path).unwrap());
        let config = Arc::new(crate::config::from_str(&text, &path).unwrap());
        let keys = Arc::new(crate::server::key_store(&config, metrics.clone()));
        let state = Arc::new(crate::state::MemoryStore::new());
        Engine::new(config, keys, state, metrics.clone())
    }

    /// `GET /healthz` (a public route of the shipped config) with `headers`.
    pub(crate) fn healthz(headers: &std::collections::HashMap<String, String>) -> RequestView<'_> {
        RequestView {
            method: "GET",
            host: "api.example.com",
            path: "/healthz",
            headers,
            source_ip: None,
            source_principal: "",
            scheme: "https",
            peer_certificate: None,
        }
    }

    thread_local! {
        /// Makes this thread's dry runs panic, to test that the live decision stands.
        pub(super) static FAIL_DRY_RUN: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
    }

    #[tokio::test]
    async fn a_failed_dry_run_leaves_the_live_decision_and_is_counted() {
        let metrics = Arc::new(Metrics::new());
        let engine = shipped_engine("dry_run: {remove: [healthz]}", &metrics);
        let headers = std::collections::HashMap::new();
        let req = healthz(&headers);
        let d = engine.check_at(&req, 1_800_000_000).await;
        let would = d.dry_run.as_deref().map(|w| w.code);
        assert_eq!(
            (d.code, would),
            (ReasonCode::Public, Some(ReasonCode::NoRoute))
        );
        assert_eq!(metrics.dry_run_failures.get(), 0);

        FAIL_DRY_RUN.with(|f| f.set(true));
        let d = engine.check_at(&req, 1_800_000_000).await;
        FAIL_DRY_RUN.with(|f| f.set(false));
        assert_eq!(d.code, ReasonCode::Public);
        assert!(d.dry_run.is_none(), "{d:?}");
        assert_eq!(metrics.dry_run_failures.get(), 1);
    }

    #[test]
    fn cached_tokens_seen_together_do_not_expire_together() {
        let max = Duration::from_secs(300);
        let ttls: Vec<Duration> = (0..2000)
            .map(|i| entry_ttl(max, &format!("header.payload-{i}.signature"), 86_400))
            .collect();
        let (min, top) = (ttls.iter().min().unwrap(), ttls.iter().max().unwrap());
        // Within the last tenth of max_ttl, never beyond it...
        assert!(*min >= max - max / 10 && *top <= max, "{min:?}..{top:?}");
        // ...and spread over most of that tenth, not bunched.
        assert!(*top - *min >= Duration::from_secs(25), "{min:?}..{top:?}");
        let distinct: std::collections::HashSet<_> = ttls.iter().collect();
        assert!(
            distinct.len() > 500,
            "only {} distinct lifetimes",
            distinct.len()
        );
    }

    #[test]
    fn an_enormous_max_ttl_does_not_panic() {
        for i in 0..200 {
            let token = format!("t{i}");
            assert_eq!(
                entry_ttl(Duration::MAX, &token, 3600),
                Duration::from_secs(3600)
            );
            assert!(entry_ttl(Duration::MAX, &token, u64::MAX) >= Duration::MAX / 10 * 9);
        }
    }

    #[test]
    fn a_cached_token_never_outlives_its_exp() {
        let max = Duration::from_secs(300);
        for i in 0..200 {
            let token = format!("t{i}");
            assert_eq!(entry_ttl(max, &token, 7), Duration::from_secs(7));
            assert_eq!(entry_ttl(max, &token, 0), Duration::ZERO);
        }
        // The same token always gets the same share (the spread is per token, not per call).
        assert_eq!(
            entry_ttl(max, "same", 86_400),
            entry_ttl(max, "same", 86_400)
        );
    }

    /// A dev token for `sub` with `roles` and `scopes`, valid an hour.
    pub(crate) fn dev_token(engine: &Engine, sub: &str, roles: &[&str], scopes: &[&str]) -> String {
        let args = crate::cli::TokenArgs {
            config: "config/portcullis.yaml".into(),
            sub: sub.into(),
            scopes: scopes.iter().map(|s| s.to_string()).collect(),
            roles: roles.iter().map(|r| r.to_string()).collect(),
            claims: vec![],
            ttl: "1h".into(),
        };
        crate::cli::mint_dev_token(&engine.config, &args, unix_now(), 3600).unwrap()
    }

    pub(crate) fn request<'a>(
        method: &'a str,
        path: &'a str,
        headers: &'a std::collections::HashMap<String, String>,
    ) -> RequestView<'a> {
        RequestView {
            method,
            host: "localhost",
            path,
            headers,
            source_ip: None,
            source_principal: "",
            scheme: "https",
            peer_certificate: None,
        }
    }

    pub(crate) fn bearer(token: &str) -> std::collections::HashMap<String, String> {
        [("authorization".to_string(), format!("Bearer {token}"))].into()
    }

    /// The approvals' cap on new requests (a 429 without `rate_limit`) belongs to the
    /// approval: a candidate that drops the approval from the rule still allows once the
    /// caller reaches the cap, as it did before.
    #[tokio::test]
    async fn a_dry_run_without_the_approval_is_not_held_to_the_approvals_cap() {
        let metrics = Arc::new(Metrics::new());
        let candidate = "dry_run:\n  routes:\n    - {id: drop-database, methods: [DELETE], path: '/databases/{db}', rules: [{id: dba, roles: [dba]}]}\n";
        let engine = shipped_engine(candidate, &metrics);
        engine.keys.start().await;
        let headers = bearer(&dev_token(&engine, "alice", &["dba"], &[]));
        let now = unix_now();
        let n = engine.config.file.approvals.max_new_requests;
        for i in 0..=n {
            let path = format!("/databases/db{i}");
            let d = engine
                .check_at(&request("DELETE", &path, &headers), now)
                .await;
            let would = d.dry_run.as_deref().unwrap();
            let live = if i < n {
                ReasonCode::ApprovalRequired
            } else {
                ReasonCode::RateLimited
            };
            assert_eq!(d.code, live, "{i}: {}", d.detail);
            assert_eq!(would.code, ReasonCode::Allowed, "{i}: {}", would.detail);
        }
    }

    /// A candidate that adds a pre-approval holding for the caller reports the allow it
    /// would give; one that keeps the live approval reports the live outcome.
    #[tokio::test]
    async fn a_dry_run_reports_its_own_pre_approval() {
        let metrics = Arc::new(Metrics::new());
        let candidate = "dry_run:\n  routes:\n    - {id: drop-database, methods: [DELETE], path: '/databases/{db}', rules: [{id: dba, roles: [dba], approval: {approvers: {roles: [dba-lead]}, pre_approve: [{roles: [dba]}]}}]}\n";
        let engine = shipped_engine(candidate, &metrics);
        engine.keys.start().await;
        let headers = bearer(&dev_token(&engine, "alice", &["dba"], &[]));
        let d = engine
            .check_at(&request("DELETE", "/databases/x", &headers), unix_now())
            .await;
        assert_eq!(d.code, ReasonCode::ApprovalRequired);
        let would = d.dry_run.as_deref().unwrap();
        assert_eq!(would.code, ReasonCode::Allowed, "{}", would.detail);
        assert!(would.detail.contains("pre-approved"), "{}", would.detail);
    }

    /// While the store is down, a route with a rate limit is `state_unavailable` live; a
    /// candidate that leaves that route alone meets the same store and says the same,
    /// instead of reporting an allow for the whole outage.
    #[tokio::test]
    async fn a_dry_run_meets_the_store_the_live_request_found_down() {
        let metrics = Arc::new(Metrics::new());
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("config/portcullis.yaml");
        let text = format!(
            "{}\ndry_run: {{remove: [healthz]}}\n",
            std::fs::read_to_string(&path).unwrap()
        );
        let config = Arc::new(crate::config::from_str(&text, &path).unwrap());
        assert!(!config.rate_limits.is_empty());
        let keys = Arc::new(crate::server::key_store(&config, metrics.clone()));
        let dead = crate::state::RedisStore::new(
            "redis://127.0.0.1:1/0",
            "p:",
            Duration::from_millis(100),
        )
        .unwrap();
        let engine = Engine::new(config, keys, Arc::new(dead), metrics.clone());
        engine.keys.start().await;
        let headers = bearer(&dev_token(&engine, "alice", &[], &["orders:write"]));
        let d = engine
            .check_at(&request("POST", "/orders", &headers), unix_now())
            .await;
        assert_eq!(d.code, ReasonCode::StateUnavailable, "{}", d.detail);
        let would = d.dry_run.as_deref().unwrap();
        assert_eq!(would.code, ReasonCode::StateUnavailable, "{}", would.detail);
        // The same on a gated route without a limit: the approval gate found it down.
        let headers = bearer(&dev_token(&engine, "alice", &["dba"], &[]));
        let d = engine
            .check_at(&request("DELETE", "/databases/x", &headers), unix_now())
            .await;
        assert_eq!(d.code, ReasonCode::StateUnavailable, "{}", d.detail);
        let would = d.dry_run.as_deref().unwrap();
        assert_eq!(would.code, ReasonCode::StateUnavailable, "{}", would.detail);
    }
}

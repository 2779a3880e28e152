//! Hot reload of the policy file and the issuers' key files, on change (polled) and on
//! SIGHUP. A new config is validated in full and swapped atomically; an invalid one is
//! rejected with an error log line and a `config_reloads{result="error"}` count while the
//! last good config stays in force. In-flight checks finish on the engine they started with
//! (they hold an `Arc` to it).
//!
//! INVARIANT: nothing here ever installs a config that failed to load: an empty, deleted or
//! unparsable file is an error, never "no routes" and never allow-all.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use tokio::sync::watch;

use crate::admin::metrics::{Metrics, ResultLabels};
use crate::config::{self, Config};
use crate::engine::Engine;

/// How often the watched files are compared with what was last loaded.
pub const POLL_INTERVAL: Duration = Duration::from_secs(1);

/// How often a refused config is tried again with nothing watched changed: what it lacked
/// may have come since (a key or API key file it names, which only the config in force has
/// watched; a runtime revocation it waited on deleted; keys at a URL reachable again).
pub const RETRY_REFUSED_INTERVAL: Duration = Duration::from_secs(10);

/// What a reload attempt did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReloadOutcome {
    /// The new config is in force.
    Applied,
    /// The files did not change (nothing to do).
    Unchanged,
    /// The files changed since the last read: loaded once a read finds them the same again
    /// (`Reloader::tick`).
    Settling,
    /// The new config was refused; the reason names file and field.
    Rejected(String),
}

/// Watches a config file and its key files; swaps the engine when they change.
pub struct Reloader {
    path: PathBuf,
    engine: Arc<ArcSwap<Engine>>,
    metrics: Arc<Metrics>,
    /// Contents of every watched file at the last attempt (`None`: missing or unreadable).
    seen: Vec<(PathBuf, Option<Vec<u8>>)>,
    /// Registered at construction: once a `Reloader` exists, SIGHUP reloads instead of
    /// terminating the process (its default action).
    hangup: Hangup,
    /// After a refused reload: the revocation file of the config that was refused, and its
    /// content then. A refusal can be fixed in that file (an entry naming an issuer the new
    /// config renamed), which is not otherwise watched: its edit alone retries the config.
    retry_on: Option<(PathBuf, Option<Vec<u8>>)>,
    /// The watched files as the last tick read them, when they differed from `seen`.
    settling: Option<Vec<(PathBuf, Option<Vec<u8>>)>>,
    /// The last attempt's refusal and when it was made: tried again every `retry_every`,
    /// and reported again only when the reason changes.
    refused: Option<(String, Instant)>,
    retry_every: Duration,
}

impl Reloader {
    pub fn new(path: PathBuf, engine: Arc<ArcSwap<Engine>>, metrics: Arc<Metrics>) -> Self {
        let mut r = Self {
            path,
            engine,
            metrics,
            seen: Vec::new(),
            hangup: hangup_signal(),
            retry_on: None,
            settling: None,
            refused: None,
            retry_every: RETRY_REFUSED_INTERVAL,
        };
        r.seen = r.snapshot();
        r
    }

    /// Tries a refused config again this often (default `RETRY_REFUSED_INTERVAL`).
    pub fn retry_refused_every(mut self, every: Duration) -> Self {
        self.retry_every = every;
        self
    }

    /// The config file plus every local key file of the config in force.
    fn watched(&self) -> Vec<PathBuf> {
        let engine = self.engine.load();
        let mut files = vec![self.path.clone()];
        files.extend(
            engine
                .config
                .issuers
                .iter()
                .filter_map(|i| i.keys.file.clone()),
        );
        files.extend(engine.config.api_keys.as_ref().and_then(|k| k.file.clone()));
        files.extend(
            engine
                .config
                .issuers
                .iter()
                .filter_map(|i| i.dpop.nonce.as_ref().and_then(|n| n.source.clone())),
        );
        files
    }

    /// True when a JWKS file of an issuer changed. Other watched files (the config, an API
    /// key file) never force a refetch of remote key sets, so editing them works even while
    /// an identity provider is down.
    fn issuer_key_files_changed(&self, now: &[(PathBuf, Option<Vec<u8>>)]) -> bool {
        let engine = self.engine.load();
        let issuer_files: Vec<&PathBuf> = engine
            .config
            .issuers
            .iter()
            .filter_map(|i| i.keys.file.as_ref())
            .collect();
        let pick = |set: &[(PathBuf, Option<Vec<u8>>)]| -> Vec<(PathBuf, Option<Vec<u8>>)> {
            set.iter()
                .filter(|(p, _)| issuer_files.contains(&p))
                .cloned()
                .collect()
        };
        pick(&self.seen) != pick(now)
    }

    fn snapshot(&self) -> Vec<(PathBuf, Option<Vec<u8>>)> {
        self.watched()
            .into_iter()
            .map(|p| {
                let bytes = std::fs::read(&p).ok();
                (p, bytes)
            })
            .collect()
    }

    /// The periodic check: reloads a change only once two reads a tick apart find the same
    /// contents. A config written in place and slowly (a pause mid-write, a copy over a slow
    /// link) can be valid YAML halfway through: a policy cut short before a rule's
    /// `approval:` or its conditions loaded as a rule that grants more, until the rest
    /// arrived. Costs a change one more tick before it is in force; SIGHUP (`poll(true)`)
    /// still loads at once.
    pub async fn tick(&mut self) -> ReloadOutcome {
        let now = self.snapshot();
        if now != self.seen && self.settling.as_ref() != Some(&now) {
            self.settling = Some(now);
            return ReloadOutcome::Settling;
        }
        self.settling = None;
        self.poll_with(now, false).await
    }

    /// Reloads when a watched file changed since the last attempt, or always with `force`.
    pub async fn poll(&mut self, force: bool) -> ReloadOutcome {
        let now = self.snapshot();
        self.poll_with(now, force).await
    }

    /// `poll` on the watched files' contents `now`.
    async fn poll_with(
        &mut self,
        now: Vec<(PathBuf, Option<Vec<u8>>)>,
        force: bool,
    ) -> ReloadOutcome {
        let retry = self
            .retry_on
            .as_ref()
            .is_some_and(|(path, then)| std::fs::read(path).ok() != *then);
        let changed = force || retry || now != self.seen;
        let due = (self.refused.as_ref()).is_some_and(|(_, at)| at.elapsed() >= self.retry_every);
        if !changed && !due {
            return ReloadOutcome::Unchanged;
        }
        let keys_changed = force || self.issuer_key_files_changed(&now);
        // Remember this state even when it is rejected: a bad file is reported once, not
        // every second, and the next edit is tried again.
        self.seen = now.clone();
        // Nothing changed: only the refusal's retry, reported only if it now goes otherwise.
        let outcome = self.reload(keys_changed, !changed).await;
        // The files as read BEFORE the load, not again now: an edit saved while the load ran
        // (it may wait on key fetches) then differs from them and is loaded at the next poll,
        // where a fresh read would mark it seen without ever loading it. A file the new
        // config watches for the first time is read now (recording it as unread would make
        // the next poll reload, and refetch every issuer's keys, for nothing).
        self.seen = self
            .watched()
            .into_iter()
            .map(|p| match now.iter().find(|(q, _)| *q == p) {
                Some((_, bytes)) => (p, bytes.clone()),
                None => {
                    let bytes = std::fs::read(&p).ok();
                    (p, bytes)
                }
            })
            .collect();
        outcome
    }

    /// Loads and applies the config. A `quiet` attempt (a refused config's periodic retry)
    /// that is refused for the same reason as before says nothing and counts nothing.
    async fn reload(&mut self, reload_keys: bool, quiet: bool) -> ReloadOutcome {
        self.retry_on = None;
        let result = match config::load(&self.path) {
            Ok(new) => {
                let revocations = new.revocation_file.clone();
                let result = self.apply(new, reload_keys, !quiet).await;
                if result.is_err() {
                    self.retry_on = revocations.map(|p| {
                        let bytes = std::fs::read(&p).ok();
                        (p, bytes)
                    });
                }
                result
            }
            Err(e) => Err(e.to_string()),
        };
        let before = match &result {
            Ok(()) => self.refused.take(),
            Err(reason) => self.refused.replace((reason.clone(), Instant::now())),
        };
        if let Err(reason) = &result
            && quiet
            && before.is_some_and(|(was, _)| was == *reason)
        {
            return ReloadOutcome::Unchanged;
        }
        let label = match &result {
            Ok(()) => "ok",
            Err(_) => "error",
        };
        self.metrics
            .config_reloads
            .get_or_create(&ResultLabels { result: label })
            .inc();
        match result {
            Ok(()) => ReloadOutcome::Applied,
            Err(reason) => {
                tracing::error!(
                    config = %self.path.display(),
                    error = %reason,
                    "config reload rejected; the last good config stays in force"
                );
                ReloadOutcome::Rejected(reason)
            }
        }
    }

    /// Swaps in `new` unless it is refused; its warnings are logged when `announce`.
    async fn apply(&self, new: Config, reload_keys: bool, announce: bool) -> Result<(), String> {
        let old = self.engine.load_full();
        // A quiet retry tells its warnings only if it is applied.
        let warnings = new.warnings.clone();
        let warn = |warnings: &[String]| {
            for warning in warnings {
                tracing::warn!(config = %self.path.display(), "{warning}");
            }
        };
        if announce {
            warn(&warnings);
        }
        let listeners_changed = new.file.server.listen != old.config.file.server.listen
            || new.file.server.admin_listen != old.config.file.server.admin_listen
            || new.file.server.http_listen != old.config.file.server.http_listen
            || new.file.server.approvals_listen != old.config.file.server.approvals_listen
            || new.file.server.max_connections != old.config.file.server.max_connections;
        let tell_listeners = || {
            tracing::warn!(
                config = %self.path.display(),
                "listener addresses or `server.max_connections` changed; they take effect \
                 only after a restart"
            );
        };
        if listeners_changed && announce {
            tell_listeners();
        }
        // The store is built once, at start; a reload keeps it. Taking a changed `state` as
        // reloaded would leave each replica on a store it was told to leave (on separate
        // memory stores, every single-use approval or DPoP proof works once per replica):
        // refuse, so the error says a restart is needed.
        if new.file.state != old.config.file.state {
            return Err(format!(
                "{}: state: the shared-state settings (backend, redis_url, tls, key_prefix, \
                 timeout) changed; they take effect only after a restart, and the config in \
                 force stays until then",
                self.path.display()
            ));
        }
        // The audit sink is chosen at start; a reload keeps it. Taking `audit.enabled: true` as
        // reloaded would leave every decision unlogged while the operator believes it is.
        if new.file.audit != old.config.file.audit {
            return Err(format!(
                "{}: audit: the audit settings (enabled) changed; they take effect only after \
                 a restart, and the config in force stays until then",
                self.path.display()
            ));
        }
        // The gRPC listener's TLS settings are read once, at start (its reloader re-reads only
        // the files' contents). Taking a changed allow-list as reloaded would keep admitting
        // a principal the operator just removed: refuse, so the error says a restart is
        // needed.
        let tls_sections = [
            (
                "server.tls",
                &new.file.server.tls,
                &old.config.file.server.tls,
            ),
            (
                "server.approvals_tls",
                &new.file.server.approvals_tls,
                &old.config.file.server.approvals_tls,
            ),
        ];
        for (section, new_tls, old_tls) in tls_sections {
            if new_tls != old_tls {
                return Err(format!(
                    "{}: {section}: the gRPC listener's TLS settings (files, client_ca, \
                     require_client_cert, allowed_client_principals) changed; they take \
                     effect only after a restart, and the config in force stays until then \
                     (the files' contents are reloaded without one)",
                    self.path.display()
                ));
            }
        }
        let keys = if !reload_keys && same_key_sources(&old.config, &new) {
            old.keys.clone()
        } else {
            let store = Arc::new(crate::server::key_store(&new, self.metrics.clone()));
            store.start().await;
            // Never trade usable keys for keys that failed to load: a reload that would leave
            // an issuer without keys is refused while the config in force still has them.
            // A key set that loaded with no usable key (`{"keys":[]}` in a key file) is the
            // operator's or the issuer's withdrawal, not a failure: it is taken, as the
            // running store takes it, so a compromised key stops working at once.
            let failed: Vec<_> = store
                .status()
                .into_iter()
                .filter(|s| !s.usable && !s.withdrawn)
                .collect();
            if !failed.is_empty() && old.keys.ready() {
                let missing: Vec<String> = failed
                    .into_iter()
                    .map(|s| {
                        format!(
                            "`{}`: {}",
                            s.name,
                            s.last_error.unwrap_or_else(|| "not loaded".into())
                        )
                    })
                    .collect();
                store.shutdown();
                return Err(format!(
                    "{}: keys unavailable for issuer(s) {}",
                    self.path.display(),
                    missing.join(", ")
                ));
            }
            store
        };
        // Runtime revocations scoped to an issuer renamed by this config would no longer be
        // scoped to it (its tokens now carry another name; such entries name every issuer's
        // tokens, see `RuntimeRevocations::check`): refuse until they are deleted. An issuer
        // removed outright (no issuer of the new config takes its `iss`) is not refused: its
        // tokens are refused now, entries scoped to it then name every issuer's tokens (fail
        // closed, warned about at each sync), and refusing kept a removed (perhaps
        // compromised) identity provider trusted, also whenever shared state was down.
        let names = crate::revocation::issuer_names(&new);
        let renamed = renamed_issuers(&old.config, &new);
        // When an issuer is renamed, read the shared entries first: one another replica
        // added a moment ago is not in this replica's copy until its next sync, and would
        // otherwise be orphaned by a reload that looked only at the copy.
        if !renamed.is_empty()
            && let Err(e) = old
                .runtime_revoked
                .sync(&*old.state, crate::engine::unix_now())
                .await
        {
            return Err(format!(
                "{}: an issuer is renamed, and the runtime revocations that could name it \
                 cannot be read from shared state ({e}); the config in force stays until they \
                 can",
                self.path.display()
            ));
        }
        let orphaned: Vec<String> = old
            .runtime_revoked
            .scoped_issuers()
            .into_iter()
            .filter(|i| !names.contains(i) && renamed.contains(i))
            .map(|i| format!("`{i}`"))
            .collect();
        if !orphaned.is_empty() {
            return Err(format!(
                "{}: runtime revocations name issuer(s) {} that this config does not have: they \
                 would stop matching. Delete them (`DELETE /revocations?sub=...&issuer=...`) or \
                 keep the issuer's name",
                self.path.display(),
                orphaned.join(", ")
            ));
        }
        let routes = new.file.routes.len();
        // The same file read against the same issuer names: an entry scoped to an issuer the
        // new config lacks must fail the reload, not go quietly unmatched.
        let same_revocations = new.revocation_file == old.config.revocation_file
            && crate::revocation::issuer_names(&new) == old.revocations.issuers();
        let mut engine = Engine::new(Arc::new(new), keys, old.state.clone(), self.metrics.clone())
            .with_runtime_revocations(old.runtime_revoked.clone())
            .with_audit(old.audit.clone());
        if same_revocations {
            // The revocation watcher keeps the list current; a fresh load would only lose a
            // last-good list that a broken file is currently shadowing.
            engine = engine.with_revocations(old.revocations.clone());
        } else if let Some(e) = engine.revocations.startup_error() {
            // A new revocation file that does not load would deny every token: refuse.
            return Err(crate::config::revocation_error(&engine.config, e).to_string());
        }
        self.engine.store(Arc::new(engine));
        if !announce {
            warn(&warnings);
            if listeners_changed {
                tell_listeners();
            }
        }
        tracing::info!(config = %self.path.display(), routes, "config reloaded");
        Ok(())
    }

    /// Runs until `stop`: polls every `interval` and reloads on change or SIGHUP.
    pub async fn run(mut self, interval: Duration, mut stop: watch::Receiver<bool>) {
        let mut hangup = std::mem::take(&mut self.hangup);
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let force = tokio::select! {
                _ = tick.tick() => false,
                _ = recv_hangup(&mut hangup) => {
                    tracing::info!(config = %self.path.display(), "SIGHUP: reloading");
                    true
                }
                _ = stop.wait_for(|s| *s) => return,
            };
            if force {
                self.settling = None;
                self.poll(true).await;
            } else {
                self.tick().await;
            }
        }
    }
}

/// True when both configs fetch the same keys the same way, so the key store can be kept.
fn same_key_sources(old: &Config, new: &Config) -> bool {
    old.issuers.len() == new.issuers.len()
        && old.issuers.iter().zip(&new.issuers).all(|(a, b)| {
            a.name == b.name
                && a.rules.issuer == b.rules.issuer
                && format!("{:?}", a.keys) == format!("{:?}", b.keys)
        })
}

#[cfg(unix)]
type Hangup = Option<tokio::signal::unix::Signal>;
#[cfg(not(unix))]
type Hangup = ();

#[cfg(unix)]
fn hangup_signal() -> Hangup {
    tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok()
}
#[cfg(not(unix))]
fn hangup_signal() -> Hangup {}

#[cfg(unix)]
async fn recv_hangup(h: &mut Hangup) {
    match h {
        Some(sig) => {
            if sig.recv().await.is_none() {
                std::future::pending::<()>().await;
            }
        }
        None => std::future::pending().await,
    }
}
#[cfg(not(unix))]
async fn recv_hangup(_: &mut Hangup) {
    std::future::pending().await
}

/// The issuer names `old` has and `new` lacks while `new` still has an issuer with the same
/// `iss`: renamed, so their tokens now verify under another name.
fn renamed_issuers(old: &crate::config::Config, new: &crate::config::Config) -> Vec<String> {
    old.issuers
        .iter()
        .filter(|o| {
            !new.issuers.iter().any(|n| n.name == o.name)
                && new.issuers.iter().any(|n| n.rules.issuer == o.rules.issuer)
        })
        .map(|o| o.name.to_string())
        .collect()
}

//! The revocation list: tokens (`jti`), sessions (`sid`) and subjects (`sub`) denied at once,
//! on the token-cache fast path too. OWNER: context helper.
//!
//! Two sources, both checked for every request that carries a token:
//! - the file `revocation.file`, kept in memory and reloaded when its content changes (polled
//!   every `revocation.reload`) and on SIGHUP. A deleted, empty or unparsable file never clears
//!   the list: the last good one stays in force, and the error is logged and counted. A list
//!   that could not be loaded even once denies every token (fail closed).
//! - runtime entries added through the admin API, kept in the shared `StateStore`'s index
//!   `revoked:index` until the named tokens would have expired, so a shared backend (Redis)
//!   makes every replica see them; each replica checks a local mirror of it.
//!
//! An entry names any issuer's tokens, or with `issuer` (a name from `issuers`) only that
//! issuer's: `sub` values in particular are only unique within one issuer. A runtime entry
//! whose `issuer` names no issuer of the config in force (the issuer was renamed or removed
//! after it was added) names every issuer's tokens until it is deleted: a rename must never
//! make a revoked token valid again (fail closed).
//!
//! This is shell code (file I/O, tokio tasks, logging); the decision core never sees it.

use std::collections::HashMap;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use serde::Deserialize;
use tokio::sync::watch;

use crate::admin::metrics::{Metrics, ResultLabels};
use crate::authz::{Decision, ReasonCode};
use crate::engine::Engine;
use crate::identity::Identity;
use crate::state::StateStore;

/// Which identifier an entry names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RevokedKind {
    Jti,
    Sid,
    Sub,
}

impl RevokedKind {
    pub const ALL: [RevokedKind; 3] = [RevokedKind::Jti, RevokedKind::Sid, RevokedKind::Sub];

    pub const fn as_str(self) -> &'static str {
        match self {
            RevokedKind::Jti => "jti",
            RevokedKind::Sid => "sid",
            RevokedKind::Sub => "sub",
        }
    }

    /// The identity's value for this kind, if it has one.
    pub fn of(self, id: &Identity) -> Option<&str> {
        let v = match self {
            RevokedKind::Jti => id.claims.get("jti").and_then(serde_json::Value::as_str),
            RevokedKind::Sid => id.claims.get("sid").and_then(serde_json::Value::as_str),
            RevokedKind::Sub => Some(id.subject.as_str()),
        };
        v.filter(|s| !s.is_empty())
    }

    /// The prefix of this kind's members in the shared-state index (`jti:<value>`).
    pub const fn member_prefix(self) -> &'static str {
        match self {
            RevokedKind::Jti => "jti:",
            RevokedKind::Sid => "sid:",
            RevokedKind::Sub => "sub:",
        }
    }

    /// This kind's member for `value` in the shared-state index: `<kind>:<value>` for every
    /// issuer's tokens, `<kind>@<issuer length>:<issuer>:<value>` for one issuer's (issuer
    /// names may hold `:`; the length keeps the two apart).
    pub fn member(self, issuer: Option<&str>, value: &str) -> String {
        let mut member = String::new();
        self.write_member(&mut member, issuer, value);
        member
    }

    fn write_member(self, out: &mut String, issuer: Option<&str>, value: &str) {
        use std::fmt::Write as _;
        out.clear();
        match issuer {
            None => out.push_str(self.member_prefix()),
            Some(name) => {
                out.push_str(self.as_str());
                let _ = write!(out, "@{}:{name}:", name.len());
            }
        }
        out.push_str(value);
    }

    /// The kind, issuer and value a member of the shared-state index names.
    pub fn parse_member(member: &str) -> Option<(RevokedKind, Option<&str>, &str)> {
        Self::ALL.into_iter().find_map(|k| {
            if let Some(value) = member.strip_prefix(k.member_prefix()) {
                return Some((k, None, value));
            }
            let rest = member.strip_prefix(k.as_str())?.strip_prefix('@')?;
            let (len, rest) = rest.split_once(':')?;
            let len: usize = len.parse().ok()?;
            let issuer = rest.get(..len)?;
            let value = rest.get(len..)?.strip_prefix(':')?;
            Some((k, Some(issuer), value))
        })
    }
}

/// The shared-state index of runtime revocations: one sorted set, member `<kind>:<value>`,
/// expiry (Unix seconds) as its score. Replicas read this set and nothing else, so a sync
/// costs what the revocations hold, however many other keys share the store.
pub const RUNTIME_INDEX: &str = "revoked:index";

/// The prefix of the index's generation marker: one member, `epoch:<random>`, that never
/// expires. It lives in the same set as the entries, so it is lost with them: a replica that
/// finds a marker other than the one it last saw knows the store lost the set (a Redis
/// restarted without persistence, flushed, or evicting) and writes back the entries it holds.
const EPOCH_PREFIX: &str = "epoch:";

/// The marker's score: 9999-12-31T23:59:59Z, beyond every entry's expiry (400 days at most).
const EPOCH_EXPIRES_AT: i64 = 253_402_300_799;

/// How far apart replicas' clocks may be when one reads the creation time another wrote
/// into a marker (replicas log a warning past 30 s from Redis's clock).
const MARKER_CLOCK_SLACK: i64 = 60;

/// A new marker, `epoch:<Unix seconds>:<random>`: its time tells a replica that starts how
/// long ago the set was (re)created, so it knows whether the others have had the time to
/// write back what a store lost. Markers of the same age sort by time.
fn new_marker(now: i64) -> String {
    format!("{EPOCH_PREFIX}{now}:{}", crate::approvals::new_id())
}

/// When `marker` was made; `None` for a marker of an older release (no time: taken as old).
fn marker_time(marker: &str) -> Option<i64> {
    let (secs, _) = marker.strip_prefix(EPOCH_PREFIX)?.split_once(':')?;
    secs.parse().ok()
}

impl RevokedKind {}

/// Why a revocation file or entry is unusable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RevocationError {
    #[error("cannot read the revocation file `{path}`: {message}")]
    Read { path: String, message: String },
    #[error("the revocation file `{0}` is empty: an empty list is written `revoked: []`")]
    Empty(String),
    #[error("invalid revocation file `{path}`: {message}")]
    Parse { path: String, message: String },
    #[error("entry {index}: exactly one of `jti`, `sid` or `sub` is required")]
    EntryKind { index: usize },
    #[error(
        "entry {index}: `issuer` `{name}` names no issuer of the config (use an `issuers[].name`, or `api-key` for API keys, or leave it out for every issuer; delete the entry if its issuer was removed, rename it with its issuer)"
    )]
    UnknownIssuer { index: usize, name: String },
    #[error(
        "entry {index}: invalid `expires` `{value}` (use RFC 3339, e.g. `2026-12-01T00:00:00Z`)"
    )]
    Expires { index: usize, value: String },
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileDoc {
    /// `revoked:` with nothing under it (every entry commented out, or a write caught half
    /// done) reads as null in YAML: refused like an empty file, so the last good list stays
    /// in force. No entries at all is written `revoked: []`.
    #[serde(deserialize_with = "written_out")]
    revoked: Vec<FileEntry>,
}

fn written_out<'de, D>(d: D) -> Result<Vec<FileEntry>, D::Error>
where
    D: serde::Deserializer<'de>,
{
    Option::<Vec<FileEntry>>::deserialize(d)?.ok_or_else(|| {
        serde::de::Error::custom(
            "`revoked` has nothing under it (every entry commented out?): no entries at all is \
             written `revoked: []`",
        )
    })
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileEntry {
    #[serde(default)]
    jti: Option<String>,
    #[serde(default)]
    sid: Option<String>,
    #[serde(default)]
    sub: Option<String>,
    /// Only this issuer's tokens (an `issuers[].name`); absent: every issuer's.
    #[serde(default)]
    issuer: Option<String>,
    /// RFC 3339. Absent: in force while the entry is in the file.
    #[serde(default)]
    expires: Option<String>,
}

/// Value -> expiry (seconds since the epoch; `None` = no expiry).
type Entries = HashMap<String, Option<i64>>;

/// One parsed list, per kind: entries for every issuer, and entries scoped to one issuer
/// (by issuer name).
#[derive(Debug, Default, Clone)]
pub struct RevocationList {
    maps: [Entries; 3],
    scoped: [HashMap<String, Entries>; 3],
}

impl RevocationList {
    /// Parses the file's text; `issuers` are the names an entry's `issuer` may use. An empty
    /// document is an error, never an empty list.
    pub fn parse(text: &str, path: &Path, issuers: &[String]) -> Result<Self, RevocationError> {
        let shown = path.display().to_string();
        if text.trim().is_empty() {
            return Err(RevocationError::Empty(shown));
        }
        let doc: FileDoc = serde_yaml::from_str(text).map_err(|e| RevocationError::Parse {
            path: shown.clone(),
            message: e.to_string(),
        })?;
        let mut list = RevocationList::default();
        for (index, e) in doc.revoked.into_iter().enumerate() {
            let (kind, value) = match (e.jti, e.sid, e.sub) {
                (Some(v), None, None) => (RevokedKind::Jti, v),
                (None, Some(v), None) => (RevokedKind::Sid, v),
                (None, None, Some(v)) => (RevokedKind::Sub, v),
                _ => return Err(RevocationError::EntryKind { index }),
            };
            if value.is_empty() {
                return Err(RevocationError::EntryKind { index });
            }
            if let Some(name) = &e.issuer
                && !issuers.contains(name)
            {
                return Err(RevocationError::UnknownIssuer {
                    index,
                    name: name.chars().take(64).collect(),
                });
            }
            let expires = match e.expires {
                None => None,
                Some(t) => {
                    Some(parse_time(&t).ok_or(RevocationError::Expires { index, value: t })?)
                }
            };
            list.insert(kind, e.issuer, value, expires);
        }
        Ok(list)
    }

    /// Adds an entry (for one issuer's tokens, or every issuer's); of two entries for one
    /// value, the later expiry wins.
    pub fn insert(
        &mut self,
        kind: RevokedKind,
        issuer: Option<String>,
        value: String,
        expires: Option<i64>,
    ) {
        let map = match issuer {
            None => &mut self.maps[kind as usize],
            Some(name) => self.scoped[kind as usize].entry(name).or_default(),
        };
        let slot = map.entry(value).or_insert(expires);
        *slot = match (*slot, expires) {
            (None, _) | (_, None) => None,
            (Some(a), Some(b)) => Some(a.max(b)),
        };
    }

    /// The first kind under which the identity is revoked at `now`. One map lookup per kind,
    /// no allocation.
    pub fn lookup(&self, id: &Identity, now: i64) -> Option<RevokedKind> {
        let live = |map: &Entries, value: &str| {
            map.get(value)
                .is_some_and(|exp| exp.is_none_or(|e| now < e))
        };
        RevokedKind::ALL.into_iter().find(|k| {
            let any = &self.maps[*k as usize];
            let scoped = &self.scoped[*k as usize];
            // An empty kind costs nothing: the identity's claims are not even looked at
            // (with many cached tokens they are cold in the CPU cache).
            if any.is_empty() && scoped.is_empty() {
                return false;
            }
            let Some(value) = k.of(id) else {
                return false;
            };
            live(any, value)
                || scoped
                    .get(&*id.issuer_name)
                    .is_some_and(|map| live(map, value))
        })
    }

    pub fn len(&self) -> usize {
        let scoped: usize = self
            .scoped
            .iter()
            .flat_map(HashMap::values)
            .map(HashMap::len)
            .sum();
        self.maps.iter().map(HashMap::len).sum::<usize>() + scoped
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Every entry (kind, issuer, value, expiry), sorted, for listings.
    pub fn entries(&self) -> Vec<(RevokedKind, Option<String>, String, Option<i64>)> {
        let mut out = Vec::new();
        for k in RevokedKind::ALL {
            for (v, e) in &self.maps[k as usize] {
                out.push((k, None, v.clone(), *e));
            }
            for (issuer, map) in &self.scoped[k as usize] {
                for (v, e) in map {
                    out.push((k, Some(issuer.clone()), v.clone(), *e));
                }
            }
        }
        out.sort_by(|a, b| (a.0.as_str(), &a.1, &a.2).cmp(&(b.0.as_str(), &b.1, &b.2)));
        out
    }
}

/// The names a revocation entry's `issuer` may use: the config's issuers, and `api-key`
/// (API keys' owners).
pub fn issuer_names(config: &crate::config::Config) -> Vec<String> {
    let mut names: Vec<String> = config.issuers.iter().map(|i| i.name.to_string()).collect();
    names.push(crate::identity::apikey::API_KEY_ISSUER.to_string());
    names
}

/// An RFC 3339 time as seconds since the epoch.
pub fn parse_time(text: &str) -> Option<i64> {
    text.trim()
        .parse::<jiff::Timestamp>()
        .ok()
        .map(|t| t.as_second())
}

/// What one reload attempt did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReloadOutcome {
    /// No file is configured.
    NoFile,
    /// The content is the same as last time (good or bad).
    Unchanged,
    /// A new list is in force, with this many entries.
    Reloaded(usize),
    /// The file is unusable; the previous list stays in force.
    Failed(RevocationError),
}

/// The file-based list of one configuration, with its reload state.
pub struct Revocations {
    path: Option<PathBuf>,
    list: ArcSwap<RevocationList>,
    /// Hash of the content last looked at, so an unchanged file is neither re-parsed nor
    /// re-reported. Also serializes reloads.
    seen: Mutex<Option<u64>>,
    /// Whether any load ever succeeded. Read on every request, so an atomic, not the mutex.
    loaded: AtomicBool,
    /// Why the first load failed, if it did.
    first_error: Option<RevocationError>,
    /// The issuer names an entry's `issuer` may use (the config's, and `api-key`).
    issuers: Vec<String>,
}

impl Revocations {
    /// No file configured: only runtime entries apply.
    pub fn none() -> Self {
        Revocations {
            path: None,
            list: ArcSwap::from_pointee(RevocationList::default()),
            seen: Mutex::new(None),
            loaded: AtomicBool::new(true),
            first_error: None,
            issuers: Vec::new(),
        }
    }

    /// Loads the configured file now; entries may be scoped to one of `issuers`. A failure
    /// leaves the list "never loaded": `check` then denies every token and `startup_error`
    /// says why (the server refuses to start on it).
    pub fn load(path: Option<PathBuf>, issuers: Vec<String>) -> Self {
        let Some(path) = path else {
            return Self {
                issuers,
                ..Self::none()
            };
        };
        let mut r = Revocations {
            path: Some(path),
            list: ArcSwap::from_pointee(RevocationList::default()),
            seen: Mutex::new(None),
            loaded: AtomicBool::new(false),
            first_error: None,
            issuers,
        };
        if let ReloadOutcome::Failed(e) = r.reload(true) {
            r.first_error = Some(e);
        }
        r
    }

    /// Why the list could not be loaded at startup, while it still has never been loaded.
    pub fn startup_error(&self) -> Option<&RevocationError> {
        self.first_error.as_ref().filter(|_| !self.loaded())
    }

    /// The configured file.
    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    /// The issuer names entries may be scoped to.
    pub fn issuers(&self) -> &[String] {
        &self.issuers
    }

    fn seen(&self) -> std::sync::MutexGuard<'_, Option<u64>> {
        self.seen
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// True once a list was loaded (always true without a file).
    pub fn loaded(&self) -> bool {
        self.loaded.load(Ordering::Acquire)
    }

    /// The list in force.
    pub fn current(&self) -> Arc<RevocationList> {
        self.list.load_full()
    }

    /// Re-reads the file; `force` re-parses (and re-reports) even unchanged content.
    pub fn reload(&self, force: bool) -> ReloadOutcome {
        let Some(path) = &self.path else {
            return ReloadOutcome::NoFile;
        };
        let read = std::fs::read_to_string(path);
        let mut h = DefaultHasher::new();
        match &read {
            Ok(text) => text.hash(&mut h),
            Err(e) => e.kind().hash(&mut h),
        }
        let hash = h.finish();
        let mut seen = self.seen();
        if !force && *seen == Some(hash) {
            return ReloadOutcome::Unchanged;
        }
        *seen = Some(hash);
        let parsed = read
            .map_err(|e| RevocationError::Read {
                path: path.display().to_string(),
                message: e.to_string(),
            })
            .and_then(|text| RevocationList::parse(&text, path, &self.issuers));
        match parsed {
            Ok(list) => {
                let n = list.len();
                self.list.store(Arc::new(list));
                self.loaded.store(true, Ordering::Release);
                ReloadOutcome::Reloaded(n)
            }
            Err(e) => ReloadOutcome::Failed(e),
        }
    }

    /// Denies a revoked identity (401 `revoked`), or every identity while no list was ever
    /// loaded (503 `state_unavailable`: fail closed).
    pub fn check(&self, id: &Identity, now: i64) -> Result<(), Decision> {
        if !self.loaded() {
            return Err(Decision::new(
                ReasonCode::StateUnavailable,
                "the revocation list could not be loaded",
            ));
        }
        match self.list.load().lookup(id, now) {
            Some(kind) => Err(revoked(kind, id)),
            None => Ok(()),
        }
    }
}

/// The deny for a revoked identity. Names the credential and the kind, never the value.
pub fn revoked(kind: RevokedKind, id: &Identity) -> Decision {
    let what = if id.api_key_id().is_some() {
        "API key"
    } else {
        "token"
    };
    Decision::new(
        ReasonCode::Revoked,
        format!("the {what} has been revoked (by `{}`)", kind.as_str()),
    )
}

/// Runtime revocations (added through the admin API, possibly on another replica), mirrored
/// from shared state. The hot path reads this snapshot and never waits on the store: a Check
/// costs no Redis round trip, and a Redis outage keeps the last known list in force instead
/// of failing every request. The watcher re-syncs it every `revocation.reload`; the admin
/// API updates it at once on the replica that took the call.
pub struct RuntimeRevocations {
    /// Members (`<kind>:<value>`, see `RUNTIME_INDEX`) of live entries, with their expiry,
    /// and the scopes of scoped entries by value.
    members: ArcSwap<Mirror>,
    /// The snapshot holds the store's entries: it was synced at least once (or nothing
    /// needs syncing). Until then every identity is refused: a replica that starts while an
    /// entry is in Redis must not accept the token it names.
    synced: AtomicBool,
    /// Changes this replica made, numbered, that a sync which read the store before them
    /// must not undo (see `sync`). Writers of `members` hold this lock.
    local: Mutex<LocalChanges>,
    /// How long a replica that has never synced waits, after it first sees a marker made
    /// less than this long ago (it may have made it itself), before it trusts the set: the
    /// time the replicas holding entries a store lost need to notice and write them back.
    /// Zero for a store no other replica shares.
    writeback_wait: Duration,
}

/// One snapshot of the runtime entries.
#[derive(Default)]
struct Mirror {
    /// Member -> expiry.
    members: HashMap<String, i64>,
    /// For each value that scoped entries name, by its unscoped member (`<kind>:<value>`):
    /// the issuers they are scoped to. A check looks here for an entry scoped to an issuer
    /// the engine's config lacks, which then names every issuer's tokens.
    scoped: HashMap<String, Vec<String>>,
}

impl Mirror {
    fn new(members: HashMap<String, i64>) -> Self {
        let mut scoped: HashMap<String, Vec<String>> = HashMap::new();
        for member in members.keys() {
            if let Some((kind, Some(issuer), value)) = RevokedKind::parse_member(member) {
                scoped
                    .entry(kind.member(None, value))
                    .or_default()
                    .push(issuer.to_string());
            }
        }
        Self { members, scoped }
    }
}

#[derive(Default)]
struct LocalChanges {
    /// The number the next change gets.
    next: u64,
    /// (number, member, expiry; `None` when removed) of changes newer than the last sync's
    /// read.
    changes: Vec<(u64, String, Option<i64>)>,
    /// The index's generation marker as last read (see `EPOCH_PREFIX`).
    epoch: Option<String>,
    /// A young marker this replica, never synced, waits on, and when it first saw it.
    waiting: Option<(String, std::time::Instant)>,
}

/// Complete and empty: for engines no store feeds (policy tests, `explain`).
impl Default for RuntimeRevocations {
    fn default() -> Self {
        Self {
            members: ArcSwap::default(),
            synced: AtomicBool::new(true),
            local: Mutex::default(),
            writeback_wait: Duration::ZERO,
        }
    }
}

impl RuntimeRevocations {
    /// A mirror of a store not read yet: every identity is refused (503) until the first
    /// successful `sync`.
    pub fn unsynced() -> Self {
        Self {
            synced: AtomicBool::new(false),
            ..Self::default()
        }
    }

    /// `unsynced`, for a store other replicas share, polled every `interval`: a set found
    /// new (the store lost it, or this is the first replica) is trusted only once the
    /// replicas polling at that interval have had two polls to write back what they hold
    /// (polls over 15 s apart are counted as 15 s: a replica is not kept out for hours).
    pub fn unsynced_shared(interval: Duration) -> Self {
        Self {
            writeback_wait: interval.min(Duration::from_secs(15)) * 2 + Duration::from_secs(1),
            ..Self::unsynced()
        }
    }

    /// True once the mirror holds the store's entries.
    pub fn synced(&self) -> bool {
        self.synced.load(Ordering::Acquire)
    }

    fn local(&self) -> std::sync::MutexGuard<'_, LocalChanges> {
        // A poisoned lock only means a panic mid-push; the log is still a valid list.
        self.local
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The kind under which the identity is revoked, if any; a refusal while the store was
    /// never read. `issuers` are the issuer names of the config the check runs under (see
    /// `issuer_names`).
    ///
    /// INVARIANT: an entry scoped to an issuer name that `issuers` lacks matches every
    /// issuer's tokens. A config that renamed the issuer (a restart on it, or a reload that
    /// removed the issuer and one that added it back under a new name) gives its tokens
    /// another name: matching none would accept a revoked token again. The entry stays
    /// that broad until it is deleted or its issuer's name is back.
    pub fn check(&self, id: &Identity, issuers: &[String]) -> Result<(), Decision> {
        if !self.synced() {
            return Err(Decision::new(
                ReasonCode::StateUnavailable,
                "the runtime revocation list has not been read from shared state yet",
            ));
        }
        let mirror = self.members.load();
        if mirror.members.is_empty() {
            return Ok(());
        }
        let mut member = String::with_capacity(64);
        for kind in RevokedKind::ALL {
            let Some(value) = kind.of(id) else {
                continue;
            };
            kind.write_member(&mut member, Some(&*id.issuer_name), value);
            if mirror.members.contains_key(&member) {
                return Err(revoked(kind, id));
            }
            kind.write_member(&mut member, None, value);
            if mirror.members.contains_key(&member) {
                return Err(revoked(kind, id));
            }
            // Scoped to an issuer this config does not have: every issuer's (see above).
            if mirror
                .scoped
                .get(&member)
                .is_some_and(|names| names.iter().any(|n| !issuers.contains(n)))
            {
                return Err(revoked(kind, id));
            }
        }
        Ok(())
    }

    /// Replaces the snapshot with the live entries of the shared-state index. On a store
    /// error the previous snapshot stays in force.
    ///
    /// INVARIANT: a change `apply`'d after this sync began survives it. The read may predate
    /// the change (an admin call on this replica landing mid-sync), so the changes made since
    /// the read started are replayed onto what it found; older ones are in what it found.
    ///
    /// INVARIANT: a revocation outlives a store that loses its data. When the index's
    /// generation marker is not the one this replica last saw, the set was lost (or never
    /// existed): the live entries this replica holds are written back before the snapshot
    /// is replaced, so no revoked token is accepted again because Redis restarted empty.
    ///
    /// INVARIANT: a replica that has never synced does not trust a set the store lost until
    /// the others have written it back. It cannot tell a set that never existed from one
    /// lost with its marker (restarted together with a Redis that came back empty), so a
    /// marker younger than `writeback_wait` (plus clock slack) keeps it unsynced until that
    /// long after it first saw the marker; the watcher's next syncs then find the entries.
    pub async fn sync(
        &self,
        state: &dyn StateStore,
        now: i64,
    ) -> Result<usize, crate::state::StateError> {
        let started = self.local().next;
        let mut listed = state.index_list(RUNTIME_INDEX, now).await?;
        let mut markers: Vec<String> = Vec::new();
        listed.retain(|(m, _)| {
            let marker = m.starts_with(EPOCH_PREFIX);
            if marker {
                markers.push(m.clone());
            }
            !marker
        });
        markers.sort();
        let epoch = match markers.first() {
            Some(e) => e.clone(),
            None => {
                let fresh = new_marker(now);
                state
                    .index_add(RUNTIME_INDEX, &fresh, EPOCH_EXPIRES_AT)
                    .await?;
                fresh
            }
        };
        // Two replicas that found no marker at once each wrote one: keep the first.
        for extra in markers.iter().skip(1) {
            let _ = state.index_remove(RUNTIME_INDEX, extra, now).await;
        }
        let known = self.local().epoch.clone();
        if known.as_ref().is_some_and(|k| *k != epoch) {
            let present: std::collections::HashSet<String> =
                listed.iter().map(|(m, _)| m.clone()).collect();
            let held = self.members.load_full();
            let mut restored = 0usize;
            for (member, expires_at) in held.members.iter() {
                if *expires_at > now && !present.contains(member) {
                    let kept = state.index_add(RUNTIME_INDEX, member, *expires_at).await?;
                    listed.push((member.clone(), kept));
                    restored += 1;
                }
            }
            if restored > 0 {
                tracing::warn!(
                    restored,
                    "shared state lost the runtime revocations (Redis restarted without persistence, flushed, or evicted them): wrote back the entries this replica held; run Redis with persistence (appendonly yes) and without eviction of these keys"
                );
            }
        }
        let mut members: std::collections::HashMap<String, i64> = listed.into_iter().collect();
        let mut local = self.local();
        let young = !self.writeback_wait.is_zero()
            && !self.synced()
            && marker_time(&epoch).is_some_and(|made| {
                now - made < self.writeback_wait.as_secs() as i64 + 1 + MARKER_CLOCK_SLACK
            });
        let hold = young
            && {
                let first_seen = match &local.waiting {
                    Some((marker, seen)) if *marker == epoch => *seen,
                    _ => {
                        tracing::info!(
                            wait = %humantime::format_duration(self.writeback_wait),
                            "the runtime revocations in shared state are new (a first replica, or Redis lost them): requests with a credential are refused until the other replicas have had the time to write back the entries they hold"
                        );
                        let seen = std::time::Instant::now();
                        local.waiting = Some((epoch.clone(), seen));
                        seen
                    }
                };
                first_seen.elapsed() < self.writeback_wait
            };
        local.epoch = Some(epoch);
        local.changes.retain(|(n, _, _)| *n >= started);
        for (_, member, expires_at) in &local.changes {
            match expires_at {
                Some(e) => {
                    members.insert(member.clone(), *e);
                }
                None => {
                    members.remove(member);
                }
            }
        }
        let n = members.len();
        self.members
            .store(std::sync::Arc::new(Mirror::new(members)));
        if !hold {
            local.waiting = None;
            self.synced.store(true, Ordering::Release);
        }
        Ok(n)
    }

    /// Adds `member` until `expires_at` (`Some`), or removes it (`None`), locally, right
    /// after the store accepted the change.
    pub fn apply(&self, member: &str, expires_at: Option<i64>) {
        let mut local = self.local();
        let n = local.next;
        local.next += 1;
        local.changes.push((n, member.to_string(), expires_at));
        let mut next = self.members.load().members.clone();
        match expires_at {
            Some(e) => {
                next.insert(member.to_string(), e);
            }
            None => {
                next.remove(member);
            }
        }
        self.members.store(std::sync::Arc::new(Mirror::new(next)));
    }

    pub fn len(&self) -> usize {
        self.members.load().members.len()
    }

    /// The members in force here (`<kind>:<value>`, see `RUNTIME_INDEX`) with their expiry,
    /// sorted: what `/revocations` shows when shared state cannot be read.
    pub fn snapshot(&self) -> Vec<(String, i64)> {
        let mut members: Vec<(String, i64)> = self
            .members
            .load()
            .members
            .iter()
            .map(|(m, e)| (m.clone(), *e))
            .collect();
        members.sort();
        members
    }

    /// The scopes (`None`: every issuer) of this replica's entries for `kind` and `value`.
    pub fn scopes_of(&self, kind: RevokedKind, value: &str) -> Vec<Option<String>> {
        let mut scopes: Vec<Option<String>> = self
            .members
            .load()
            .members
            .keys()
            .filter_map(|m| {
                let (k, issuer, v) = RevokedKind::parse_member(m)?;
                (k == kind && v == value).then(|| issuer.map(str::to_string))
            })
            .collect();
        scopes.sort();
        scopes
    }

    /// The issuers that scoped entries name.
    pub fn scoped_issuers(&self) -> std::collections::BTreeSet<String> {
        self.members
            .load()
            .scoped
            .values()
            .flatten()
            .cloned()
            .collect()
    }

    pub fn is_empty(&self) -> bool {
        self.members.load().members.is_empty()
    }

    /// The issuers that scoped entries name but `issuers` (this config's) lacks: such entries
    /// name every issuer's tokens here (see `check`). Another replica may have added them
    /// under an issuer this one no longer has (a rolling rename), so they are reported, not
    /// refused.
    pub fn unknown_issuers(&self, issuers: &[String]) -> std::collections::BTreeSet<String> {
        let mut named = self.scoped_issuers();
        named.retain(|n| !issuers.contains(n));
        named
    }
}

/// Records and logs one reload outcome.
pub fn report(outcome: &ReloadOutcome, metrics: &Metrics, trigger: &'static str) {
    match outcome {
        ReloadOutcome::NoFile | ReloadOutcome::Unchanged => {}
        ReloadOutcome::Reloaded(n) => {
            metrics
                .revocation_reloads
                .get_or_create(&ResultLabels { result: "ok" })
                .inc();
            metrics
                .revocation_entries
                .set(i64::try_from(*n).unwrap_or(i64::MAX));
            tracing::info!(revocation.entries = n, trigger, "revocation list reloaded");
        }
        ReloadOutcome::Failed(e) => {
            metrics
                .revocation_reloads
                .get_or_create(&ResultLabels { result: "error" })
                .inc();
            tracing::error!(error = %e, trigger, "revocation list not reloaded; the previous list stays in force");
        }
    }
}

/// Keeps the current engine's file-based list fresh: polls every `revocation.reload` and
/// reloads at once on SIGHUP, until `stop`.
pub fn spawn_watcher(
    engine: Arc<ArcSwap<Engine>>,
    metrics: Arc<Metrics>,
    mut stop: watch::Receiver<bool>,
) {
    // INVARIANT: the SIGHUP handler is installed before this returns, so a SIGHUP sent once the
    // server is up reloads instead of taking the default action (terminating the process).
    let mut hup = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
        Ok(s) => Some(s),
        Err(e) => {
            tracing::warn!(error = %e, "cannot listen for SIGHUP; the revocation file is still polled");
            None
        }
    };
    tokio::spawn(async move {
        let mut sync_failing = false;
        // Issuers runtime entries name that this config lacks, as last warned about.
        let mut warned_unknown = std::collections::BTreeSet::new();
        loop {
            let mut interval = engine.load().config.file.revocation.reload.get();
            // Not synced yet (the store down, or a new set waited on): try again soon, so
            // the replica serves once it can rather than one whole interval later.
            if !engine.load().runtime_revoked.synced() {
                interval = interval.min(Duration::from_millis(250));
            }
            let hangup = async {
                match hup.as_mut() {
                    Some(s) => s.recv().await,
                    None => std::future::pending().await,
                }
            };
            let (force, trigger) = tokio::select! {
                _ = tokio::time::sleep(interval.max(Duration::from_millis(100))) => (false, "poll"),
                _ = hangup => (true, "sighup"),
                _ = stop.wait_for(|s| *s) => return,
            };
            let current = engine.load_full();
            let synced = current
                .runtime_revoked
                .sync(&*current.state, crate::engine::unix_now())
                .await;
            if synced.is_ok() {
                let unknown = current
                    .runtime_revoked
                    .unknown_issuers(current.revocations.issuers());
                if unknown != warned_unknown {
                    if !unknown.is_empty() {
                        let names = unknown.iter().cloned().collect::<Vec<_>>().join(", ");
                        tracing::warn!(
                            issuers = %names,
                            "runtime revocations in shared state name issuers this config does not have (renamed or removed, or added by a replica on another config): until they are deleted they apply to every issuer's tokens here (fail closed); delete them (`DELETE /revocations?sub=...&issuer=<old name>`), after revoking again under the issuer's current name if still needed"
                        );
                    }
                    warned_unknown = unknown;
                }
            }
            metrics
                .runtime_revocation_entries
                .set(i64::try_from(current.runtime_revoked.len()).unwrap_or(i64::MAX));
            let result = if synced.is_ok() { "ok" } else { "error" };
            metrics
                .revocation_syncs
                .get_or_create(&ResultLabels { result })
                .inc();
            // Logged when it starts and stops failing, not every interval.
            match (synced, sync_failing) {
                (Err(e), false) if current.runtime_revoked.synced() => {
                    tracing::warn!(error = %e, "runtime revocations not synced from shared state; the last snapshot stays in force");
                    sync_failing = true;
                }
                (Err(e), false) => {
                    tracing::warn!(error = %e, "runtime revocations still not read from shared state; requests with a credential are refused");
                    sync_failing = true;
                }
                (Ok(_), true) => {
                    tracing::info!("runtime revocations synced from shared state again");
                    sync_failing = false;
                }
                _ => {}
            }
            let revocations = current.revocations.clone();
            // File reads block; keep them off the async workers.
            let outcome = match tokio::task::spawn_blocking(move || revocations.reload(force)).await
            {
                Ok(o) => o,
                Err(_) => continue,
            };
            report(&outcome, &metrics, trigger);
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn id(claims: serde_json::Value) -> Identity {
        let claims = claims.as_object().cloned().unwrap_or_default();
        Identity {
            issuer_name: Arc::from("dev"),
            issuer: "i".to_string(),
            subject: claims
                .get("sub")
                .and_then(|v| v.as_str())
                .unwrap_or_default()
                .to_string(),
            scopes: Vec::new(),
            roles: Vec::new(),
            expires_at: 0,
            not_before: None,
            issued_at: None,
            key_fingerprint: Arc::from("k"),
            key_kid: None,
            key_alg: None,
            claims,
        }
    }

    /// The issuer names of the config the tests' mirrors check under (`id` makes tokens of
    /// `dev`).
    fn known() -> Vec<String> {
        ["dev", "partner", "api-key"].map(String::from).to_vec()
    }

    const FILE: &str = r#"
revoked:
  - {jti: t-1}
  - {sid: s-1, expires: "2027-01-15T08:00:00Z"}
  - {sub: mallory, expires: "2027-01-15T08:00:00+01:00"}
"#;

    /// A revoked API key's owner is told about their key, not about a token.
    #[test]
    fn the_deny_names_the_credential_revoked() {
        let token = id(json!({"sub": "alice"}));
        let mut key = id(json!({"sub": "alice", "api_key_id": "reporting"}));
        key.issuer_name = Arc::from(crate::identity::apikey::API_KEY_ISSUER);
        assert_eq!(
            revoked(RevokedKind::Sub, &token).detail,
            "the token has been revoked (by `sub`)"
        );
        assert_eq!(
            revoked(RevokedKind::Sub, &key).detail,
            "the API key has been revoked (by `sub`)"
        );
    }

    #[test]
    fn lookup_by_each_kind_until_expiry() {
        let l = RevocationList::parse(FILE, Path::new("r.yaml"), &[]).unwrap();
        assert_eq!(l.len(), 3);
        let exp = parse_time("2027-01-15T08:00:00Z").unwrap();
        let now = exp - 10;
        assert_eq!(
            l.lookup(&id(json!({"jti": "t-1"})), now),
            Some(RevokedKind::Jti)
        );
        assert_eq!(l.lookup(&id(json!({"jti": "t-2"})), now), None);
        assert_eq!(
            l.lookup(&id(json!({"sid": "s-1"})), now),
            Some(RevokedKind::Sid)
        );
        assert_eq!(
            l.lookup(&id(json!({"sid": "s-1"})), exp),
            None,
            "expired entry"
        );
        assert_eq!(
            l.lookup(&id(json!({"sub": "mallory"})), exp - 3600 - 1),
            Some(RevokedKind::Sub)
        );
        assert_eq!(
            l.lookup(&id(json!({"sub": "mallory"})), exp - 3600),
            None,
            "offset honoured"
        );
        assert_eq!(
            l.lookup(&id(json!({"jti": "t-1"})), i64::MAX),
            Some(RevokedKind::Jti)
        );
        // A value of another kind never matches.
        assert_eq!(
            l.lookup(&id(json!({"jti": "s-1", "sub": "t-1"})), now),
            None
        );
    }

    #[test]
    fn members_name_their_issuer_unambiguously() {
        for (issuer, value) in [
            (None, "alice"),
            (Some("dev"), "alice"),
            (Some("https://login.example.com:443/"), "x:y@3:z"),
            (Some(""), ""),
        ] {
            let member = RevokedKind::Sub.member(issuer, value);
            assert_eq!(
                RevokedKind::parse_member(&member),
                Some((RevokedKind::Sub, issuer, value)),
                "{member}"
            );
        }
        // A value that looks scoped stays a value of the unscoped entry.
        assert_eq!(
            RevokedKind::parse_member("sub:sub@3:dev:alice"),
            Some((RevokedKind::Sub, None, "sub@3:dev:alice"))
        );
        assert_eq!(RevokedKind::parse_member("sub@9:dev:alice"), None);
        assert_eq!(RevokedKind::parse_member("other:alice"), None);
    }

    #[test]
    fn a_scoped_entry_matches_its_issuers_tokens_only() {
        let issuers = ["dev".to_string(), "partner".to_string()];
        let text = "revoked:\n  - {sub: alice, issuer: partner}\n  - {jti: t-1, issuer: dev}\n";
        let l = RevocationList::parse(text, Path::new("r.yaml"), &issuers).unwrap();
        assert_eq!(l.len(), 2);
        // `id` makes tokens of the issuer named `dev`.
        assert_eq!(l.lookup(&id(json!({"sub": "alice"})), 0), None);
        assert_eq!(
            l.lookup(&id(json!({"sub": "bob", "jti": "t-1"})), 0),
            Some(RevokedKind::Jti)
        );
        let partner = Identity {
            issuer_name: Arc::from("partner"),
            ..id(json!({"sub": "alice", "jti": "t-1"}))
        };
        assert_eq!(l.lookup(&partner, 0), Some(RevokedKind::Sub));
        assert_eq!(
            l.entries()[0].1.as_deref(),
            Some("dev"),
            "listed with its issuer"
        );
        let e = RevocationList::parse(text, Path::new("r.yaml"), &issuers[..1]).unwrap_err();
        assert!(
            matches!(&e, RevocationError::UnknownIssuer { index: 0, name } if name == "partner"),
            "{e}"
        );

        // The runtime mirror scopes the same way.
        let mirror = RuntimeRevocations::default();
        mirror.apply(
            &RevokedKind::Sub.member(Some("partner"), "alice"),
            Some(i64::MAX),
        );
        assert!(mirror.check(&id(json!({"sub": "alice"})), &known()).is_ok());
        assert_eq!(
            mirror.check(&partner, &known()).map_err(|d| d.code),
            Err(ReasonCode::Revoked)
        );
    }

    /// An entry scoped to an issuer the config no longer has (renamed: a restart on the new
    /// config, or a reload that removed it and one that added it back under another name)
    /// names every issuer's tokens, not none: the revoked token must stay refused.
    #[test]
    fn a_runtime_entry_scoped_to_an_issuer_the_config_lacks_names_every_issuer() {
        let mirror = RuntimeRevocations::default();
        mirror.apply(
            &RevokedKind::Sub.member(Some("dev"), "hank"),
            Some(i64::MAX),
        );
        mirror.apply(
            &RevokedKind::Jti.member(Some("gone"), "j-7"),
            Some(i64::MAX),
        );
        let renamed = |claims| Identity {
            issuer_name: Arc::from("dev-renamed"),
            ..id(claims)
        };
        let now_named = ["dev-renamed".to_string(), "api-key".to_string()];
        // `dev` is known: the entry names only `dev`'s tokens.
        let with_dev = ["dev".to_string(), "dev-renamed".to_string()];
        assert!(
            mirror
                .check(&renamed(json!({"sub": "hank"})), &with_dev)
                .is_ok()
        );
        assert_eq!(
            mirror
                .check(&id(json!({"sub": "hank"})), &with_dev)
                .map_err(|d| d.code),
            Err(ReasonCode::Revoked)
        );
        // `dev` is gone: the renamed issuer's token of the same subject is refused.
        assert_eq!(
            mirror
                .check(&renamed(json!({"sub": "hank"})), &now_named)
                .map_err(|d| d.code),
            Err(ReasonCode::Revoked)
        );
        assert_eq!(
            mirror
                .check(&renamed(json!({"sub": "ivy", "jti": "j-7"})), &now_named)
                .map_err(|d| d.code),
            Err(ReasonCode::Revoked),
            "every kind"
        );
        assert!(
            mirror
                .check(&renamed(json!({"sub": "ivy", "jti": "j-8"})), &now_named)
                .is_ok(),
            "other values are not affected"
        );
        // Until deleted.
        mirror.apply(&RevokedKind::Sub.member(Some("dev"), "hank"), None);
        assert!(
            mirror
                .check(&renamed(json!({"sub": "hank"})), &now_named)
                .is_ok()
        );
    }

    #[tokio::test]
    async fn a_synced_entry_scoped_to_an_issuer_the_config_lacks_names_every_issuer() {
        let store = crate::state::MemoryStore::new();
        store
            .index_add(
                RUNTIME_INDEX,
                &RevokedKind::Sub.member(Some("dev"), "hank"),
                500,
            )
            .await
            .unwrap();
        let mirror = RuntimeRevocations::unsynced();
        mirror.sync(&store, 100).await.unwrap();
        let renamed = Identity {
            issuer_name: Arc::from("dev-renamed"),
            ..id(json!({"sub": "hank"}))
        };
        assert_eq!(
            mirror
                .check(&renamed, &["dev-renamed".to_string()])
                .map_err(|d| d.code),
            Err(ReasonCode::Revoked)
        );
    }

    #[test]
    fn bad_files_are_errors_not_empty_lists() {
        let p = Path::new("r.yaml");
        assert!(matches!(
            RevocationList::parse("", p, &[]),
            Err(RevocationError::Empty(_))
        ));
        assert!(matches!(
            RevocationList::parse("  \n", p, &[]),
            Err(RevocationError::Empty(_))
        ));
        assert!(matches!(
            RevocationList::parse("revoked: [", p, &[]),
            Err(RevocationError::Parse { .. })
        ));
        assert!(matches!(
            RevocationList::parse("revokd: []", p, &[]),
            Err(RevocationError::Parse { .. })
        ));
        // The key with every entry commented out (or a write that got no further) is not
        // an empty list: that would lift every revocation.
        for text in [
            "revoked:\n",
            "revoked:\n  # - {sub: mallory}\n",
            "revoked: ~",
        ] {
            match RevocationList::parse(text, p, &[]) {
                Err(RevocationError::Parse { message, .. }) => {
                    assert!(message.contains("revoked: []"), "{text:?}: {message}")
                }
                other => panic!("{text:?}: {other:?}"),
            }
        }
        assert!(matches!(
            RevocationList::parse("revoked: [{jti: a, sub: b}]", p, &[]),
            Err(RevocationError::EntryKind { index: 0 })
        ));
        assert!(matches!(
            RevocationList::parse("revoked: [{jti: a, expires: tomorrow}]", p, &[]),
            Err(RevocationError::Expires { .. })
        ));
        assert!(
            RevocationList::parse("revoked: []", p, &[])
                .unwrap()
                .is_empty()
        );
    }

    #[test]
    fn a_broken_or_deleted_file_keeps_the_last_good_list() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("revoked.yaml");
        std::fs::write(&path, FILE).unwrap();
        let r = Revocations::load(Some(path.clone()), Vec::new());
        assert!(r.startup_error().is_none());
        let mallory = id(json!({"jti": "t-1"}));
        assert_eq!(r.check(&mallory, 0).unwrap_err().code, ReasonCode::Revoked);
        assert_eq!(r.reload(false), ReloadOutcome::Unchanged);
        for broken in ["", "revoked: [", "{}"] {
            std::fs::write(&path, broken).unwrap();
            assert!(
                matches!(r.reload(false), ReloadOutcome::Failed(_)),
                "{broken:?}"
            );
            assert_eq!(r.check(&mallory, 0).unwrap_err().code, ReasonCode::Revoked);
        }
        std::fs::remove_file(&path).unwrap();
        assert!(matches!(
            r.reload(false),
            ReloadOutcome::Failed(RevocationError::Read { .. })
        ));
        assert_eq!(
            r.reload(false),
            ReloadOutcome::Unchanged,
            "the same error is reported once"
        );
        assert_eq!(r.check(&mallory, 0).unwrap_err().code, ReasonCode::Revoked);
        std::fs::write(&path, "revoked: []").unwrap();
        assert_eq!(r.reload(false), ReloadOutcome::Reloaded(0));
        assert!(r.check(&mallory, 0).is_ok());
    }

    #[test]
    fn a_list_never_loaded_denies_every_token() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("revoked.yaml");
        std::fs::write(&path, "revoked: nope").unwrap();
        let r = Revocations::load(Some(path.clone()), Vec::new());
        assert!(r.startup_error().is_some());
        assert_eq!(
            r.check(&id(json!({})), 0).unwrap_err().code,
            ReasonCode::StateUnavailable
        );
        std::fs::write(&path, "revoked: []").unwrap();
        assert_eq!(r.reload(false), ReloadOutcome::Reloaded(0));
        assert!(r.check(&id(json!({})), 0).is_ok());
        assert!(r.startup_error().is_none());
    }

    #[tokio::test]
    async fn runtime_entries_are_mirrored_from_state_and_survive_a_store_outage() {
        let store = crate::state::MemoryStore::new();
        let mirror = RuntimeRevocations::default();
        let who = id(json!({"sub": "bob", "sid": "s-9"}));
        assert!(mirror.check(&who, &known()).is_ok());
        store
            .index_add(RUNTIME_INDEX, "sid:s-9", 160)
            .await
            .unwrap();
        // Not in force until synced (or applied by the admin API on this replica).
        assert!(mirror.check(&who, &known()).is_ok());
        assert_eq!(mirror.sync(&store, 100).await.unwrap(), 1);
        let d = mirror.check(&who, &known()).unwrap_err();
        assert_eq!((d.code, d.http_status()), (ReasonCode::Revoked, 401));
        assert!(!d.detail.contains("s-9"), "the value is never echoed");

        // A store that fails keeps the last snapshot in force.
        assert!(
            mirror
                .sync(&crate::state::UnavailableStore::new("down"), 100)
                .await
                .is_err()
        );
        assert_eq!(
            mirror.check(&who, &known()).unwrap_err().code,
            ReasonCode::Revoked
        );

        // An expired entry disappears at the next sync; `apply` works at once.
        mirror.sync(&store, 160).await.unwrap();
        assert!(mirror.check(&who, &known()).is_ok());
        mirror.apply(&RevokedKind::Sub.member(None, "bob"), Some(i64::MAX));
        assert_eq!(
            mirror.check(&who, &known()).unwrap_err().code,
            ReasonCode::Revoked
        );
        mirror.apply(&RevokedKind::Sub.member(None, "bob"), None);
        assert!(mirror.check(&who, &known()).is_ok());
    }

    /// Redis came back empty and a replica restarted with it: the restarted one must not
    /// take the empty set as the truth before the replica that still holds the entries has
    /// written them back.
    #[tokio::test]
    async fn a_replica_starting_on_a_set_the_store_lost_waits_for_the_write_back() {
        let who = id(json!({"sub": "mallory"}));
        let member = RevokedKind::Sub.member(None, "mallory");
        let before = crate::state::MemoryStore::new();
        let holder = RuntimeRevocations::default();
        before
            .index_add(RUNTIME_INDEX, &member, i64::MAX / 2)
            .await
            .unwrap();
        holder.sync(&before, 100).await.unwrap();
        assert_eq!(
            holder.check(&who, &known()).unwrap_err().code,
            ReasonCode::Revoked
        );

        // The store lost everything; a replica starts on it before the holder's next poll.
        let emptied = crate::state::MemoryStore::new();
        let wait = Duration::from_millis(300);
        let restarted = RuntimeRevocations {
            writeback_wait: wait,
            ..RuntimeRevocations::unsynced()
        };
        assert_eq!(restarted.sync(&emptied, 200).await.unwrap(), 0);
        let d = restarted.check(&who, &known()).unwrap_err();
        assert_eq!(d.code, ReasonCode::StateUnavailable, "{d:?}");
        // The holder's poll writes the entry back; the restarted replica still waits out
        // the time the others may need.
        holder.sync(&emptied, 200).await.unwrap();
        restarted.sync(&emptied, 200).await.unwrap();
        assert_eq!(
            restarted.check(&who, &known()).unwrap_err().code,
            ReasonCode::StateUnavailable
        );
        tokio::time::sleep(wait).await;
        restarted.sync(&emptied, 200).await.unwrap();
        assert_eq!(
            restarted.check(&who, &known()).unwrap_err().code,
            ReasonCode::Revoked
        );

        // A replica that starts long after the set was made trusts it at once.
        let later = RuntimeRevocations {
            writeback_wait: wait,
            ..RuntimeRevocations::unsynced()
        };
        later.sync(&emptied, 200 + 3_600).await.unwrap();
        assert_eq!(
            later.check(&who, &known()).unwrap_err().code,
            ReasonCode::Revoked
        );
    }

    #[test]
    fn entries_naming_an_issuer_the_config_lacks_are_reported() {
        let mirror = RuntimeRevocations::default();
        mirror.apply(
            &RevokedKind::Sub.member(Some("corp"), "bob"),
            Some(i64::MAX),
        );
        mirror.apply(
            &RevokedKind::Sub.member(Some("corp-old"), "bob"),
            Some(i64::MAX),
        );
        mirror.apply(&RevokedKind::Jti.member(None, "j-1"), Some(i64::MAX));
        let issuers = ["corp".to_string(), "partners".to_string()];
        let unknown: Vec<String> = mirror.unknown_issuers(&issuers).into_iter().collect();
        assert_eq!(
            unknown,
            ["corp-old"],
            "unscoped entries and known issuers are fine"
        );
        mirror.apply(&RevokedKind::Sub.member(Some("corp-old"), "bob"), None);
        assert!(mirror.unknown_issuers(&issuers).is_empty());
    }

    #[tokio::test]
    async fn a_sync_that_read_the_store_before_an_admin_call_does_not_undo_it() {
        // Every listing is held until the test lets it go: a sync that read the store
        // before an admin call on this replica stores its snapshot after it.
        let store = std::sync::Arc::new(crate::state::testing::TestStore {
            index_list: crate::state::testing::Gate::after(0),
            ..Default::default()
        });
        let mirror = std::sync::Arc::new(RuntimeRevocations::unsynced());
        let (bob, carol) = (
            id(json!({"sub": "bob"})),
            id(json!({"sub": "carol", "jti": "j-1"})),
        );
        // carol's jti was revoked before; it is in the store when the sync reads it.
        store
            .inner
            .index_add(RUNTIME_INDEX, "jti:j-1", 500)
            .await
            .unwrap();
        mirror.apply("jti:j-1", Some(i64::MAX));
        let sync = tokio::spawn({
            let (mirror, store) = (mirror.clone(), store.clone());
            async move { mirror.sync(&*store, 100).await }
        });
        store.index_list.reached.notified().await;
        // Meanwhile the admin API revokes bob and un-revokes carol's jti on this replica:
        // written to the store after the listing was read, then applied locally.
        store
            .inner
            .index_add(RUNTIME_INDEX, "sub:bob", 500)
            .await
            .unwrap();
        mirror.apply("sub:bob", Some(i64::MAX));
        assert!(
            store
                .inner
                .index_remove(RUNTIME_INDEX, "jti:j-1", 100)
                .await
                .unwrap()
        );
        mirror.apply("jti:j-1", None);
        store.index_list.release.notify_one();
        assert_eq!(sync.await.unwrap().unwrap(), 1);
        assert_eq!(
            mirror.check(&bob, &known()).map_err(|d| d.code),
            Err(ReasonCode::Revoked),
            "the sync's older read undid a revocation made during it"
        );
        assert!(
            mirror.check(&carol, &known()).is_ok(),
            "the sync's older read undid a removal made during it"
        );
        // The next sync reads both changes from the store, and the local log is spent.
        let again = tokio::spawn({
            let (mirror, store) = (mirror.clone(), store.clone());
            async move { mirror.sync(&*store, 100).await }
        });
        store.index_list.reached.notified().await;
        store.index_list.release.notify_one();
        assert_eq!(again.await.unwrap().unwrap(), 1);
        assert!(mirror.local().changes.is_empty());
        assert_eq!(
            mirror.check(&bob, &known()).unwrap_err().code,
            ReasonCode::Revoked
        );
        assert!(mirror.check(&carol, &known()).is_ok());
    }
}

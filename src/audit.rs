//! The audit log: one JSON line per decision on stdout, written by a dedicated thread so a
//! Check never blocks on the terminal or a pipe. Never contains a token, a query string, a
//! path parameter or a header value other than the request id; the fields the client writes
//! (request id, method, host, path) are capped in length.
//!
//! A Check serializes its event straight from the decision (borrowed fields, no per-event
//! allocation) and appends the line to a shared byte buffer; the writer thread swaps the
//! buffer out and writes it with one syscall per batch. Measured in bench/ (issue 4): the
//! previous design (an owned event with a dozen `String`s sent through a channel, serialized
//! on the writer thread) cost about 1.9 us of Portcullis CPU and as much again of Envoy's per
//! Check on a shared core.

use std::cell::RefCell;
use std::io::Write;
use std::net::IpAddr;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant, SystemTime};

use serde::Serialize;

use crate::authz::{Decision, DryRun, RequestView};

/// One decision, as logged. Borrows everything from the decision and the request; written
/// by `write_json` (the only encoding: the Check path pays for no generic serializer).
#[derive(Debug, Clone)]
pub struct AuditEvent<'a> {
    pub time: SystemTime,
    pub kind: &'static str,
    pub request_id: &'a str,
    pub decision: &'static str,
    pub status: u16,
    pub reason: &'static str,
    pub detail: &'a str,
    pub route: Option<&'a str>,
    pub rule: Option<&'a str>,
    pub subject: Option<&'a str>,
    /// The configured issuer name (`issuers[].name`, or `api-key`): the name rules use.
    pub issuer: Option<&'a str>,
    /// The token's `iss` claim, for a JWT caller; the field is left out otherwise (an API
    /// key, a peer principal, nobody).
    pub iss: Option<&'a str>,
    /// The API key id (never the key) when the caller used one; the field is left out
    /// otherwise.
    pub api_key: Option<&'a str>,
    /// The client address the decision used (source conditions, `client_ip` limits): the TCP
    /// peer Envoy reports, or with `network.trusted_proxy_hops` the address the trusted
    /// proxies wrote (`None` when that chain is unreadable).
    pub client_ip: Option<IpAddr>,
    /// The TCP peer Envoy reports, when it is not the client by definition (trusted proxies
    /// in front); the field is left out otherwise.
    pub peer_ip: Option<IpAddr>,
    pub method: &'a str,
    pub host: &'a str,
    /// The path without its query string (queries may carry secrets) and path parameters
    /// (`;jsessionid=...`: they carry session ids).
    pub path: &'a str,
    pub decision_us: u64,
    /// What the `dry_run` routes would have answered; the field is left out without them.
    pub dry_run: Option<&'a DryRun>,
}

impl<'a> AuditEvent<'a> {
    /// The line for `decision` on `view`; `trusted_hops` is `network.trusted_proxy_hops`.
    pub fn new(
        decision: &'a Decision,
        view: &'a RequestView<'_>,
        request_id: &'a str,
        elapsed: Duration,
        trusted_hops: u32,
    ) -> Self {
        // A path with `;` is always refused (path hygiene), but its deny is audited: cut
        // there too, or `/x;jsessionid=...` logs the session.
        let path = view.path.split(['?', '#', ';']).next().unwrap_or_default();
        let identity = decision.identity.as_deref();
        Self {
            time: SystemTime::now(),
            kind: "decision",
            request_id,
            decision: if decision.is_allow() { "allow" } else { "deny" },
            status: decision.http_status(),
            reason: decision.code.as_str(),
            detail: &decision.detail,
            route: decision.route.as_deref(),
            rule: decision.rule.as_deref(),
            subject: identity.map(|i| i.subject.as_str()),
            issuer: identity.map(|i| &*i.issuer_name),
            iss: identity.and_then(|i| i.token_iss()),
            api_key: identity.and_then(|i| i.api_key_id()),
            client_ip: crate::authz::context::client_ip(view, trusted_hops),
            peer_ip: view.source_ip.filter(|_| trusted_hops > 0),
            method: view.method,
            host: view.host,
            path,
            decision_us: u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX),
            dry_run: decision.dry_run.as_deref(),
        }
    }
}

impl AuditEvent<'_> {
    /// The event as one JSON object, keys in a fixed order, strings escaped by serde_json.
    /// Written by hand because it runs on the Check path.
    fn write_json(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(b"{\"time\":\"");
        // RFC 3339 is digits and `-:.TZ`: nothing to escape.
        let _ = write!(out, "{}", humantime::format_rfc3339_micros(self.time));
        out.push(b'"');
        let text = [
            ("kind", Some(self.kind)),
            (
                "request_id",
                Some(&*capped(self.request_id, MAX_SHORT_FIELD)),
            ),
            ("decision", Some(self.decision)),
        ];
        write_fields(out, &text);
        let _ = write!(out, ",\"status\":{}", self.status);
        let text = [
            ("reason", Some(self.reason)),
            ("detail", Some(self.detail)),
            ("route", self.route),
            ("rule", self.rule),
            ("subject", self.subject),
            ("issuer", self.issuer),
        ];
        write_fields(out, &text);
        if let Some(iss) = self.iss {
            write_fields(out, &[("iss", Some(iss))]);
        }
        if let Some(key) = self.api_key {
            write_fields(out, &[("api_key", Some(key))]);
        }
        match self.client_ip {
            // An address's text is digits, hex, `.` and `:`: nothing to escape.
            Some(ip) => {
                let _ = write!(out, ",\"client_ip\":\"{ip}\"");
            }
            None => out.extend_from_slice(b",\"client_ip\":null"),
        }
        if let Some(ip) = self.peer_ip {
            let _ = write!(out, ",\"peer_ip\":\"{ip}\"");
        }
        let text = [
            ("method", Some(&*capped(self.method, MAX_SHORT_FIELD))),
            ("host", Some(&*capped(self.host, MAX_SHORT_FIELD))),
            ("path", Some(&*capped(self.path, MAX_PATH_FIELD))),
        ];
        write_fields(out, &text);
        let _ = write!(out, ",\"decision_us\":{}", self.decision_us);
        if let Some(would) = self.dry_run {
            out.extend_from_slice(b",\"dry_run\":{\"decision\":\"");
            out.extend_from_slice(if would.is_allow() { b"allow" } else { b"deny" });
            let _ = write!(out, "\",\"status\":{}", would.code.http_status());
            let text = [
                ("reason", Some(would.code.as_str())),
                ("detail", Some(&*would.detail)),
                ("route", would.route.as_deref()),
                ("rule", would.rule.as_deref()),
            ];
            write_fields(out, &text);
            // Who the candidate would have answered, when the line does not say it already
            // (the live route was public or absent and never read the credential).
            if let Some(who) = would.identity.as_deref().filter(|_| self.subject.is_none()) {
                let text = [
                    ("subject", Some(who.subject.as_str())),
                    ("issuer", Some(&*who.issuer_name)),
                ];
                write_fields(out, &text);
                if let Some(iss) = who.token_iss() {
                    write_fields(out, &[("iss", Some(iss))]);
                }
                if let Some(key) = who.api_key_id() {
                    write_fields(out, &[("api_key", Some(key))]);
                }
            }
            out.push(b'}');
        }
        out.push(b'}');
    }
}

/// Most bytes of the request's path an audit line holds, `CUT` included.
pub const MAX_PATH_FIELD: usize = 1024;
/// Most bytes of the request id, method and host an audit line holds, `CUT` included.
pub const MAX_SHORT_FIELD: usize = 256;
/// Ends a field that was cut, so a reader sees it is not whole.
pub const CUT: &str = "…";

/// `text`, or when it is longer than `max` bytes its start (cut on a character boundary)
/// and `CUT`, `max` bytes at most. These fields come from the client: a 40 KB request id or
/// a 20 KB path made a line that container runtimes split (at 16 KiB), and so unreadable as
/// JSON, besides filling the log. Allocates only for a field that is cut.
fn capped(text: &str, max: usize) -> std::borrow::Cow<'_, str> {
    if text.len() <= max {
        return text.into();
    }
    let mut end = max - CUT.len();
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}{CUT}", &text[..end]).into()
}

/// `,"key":"value"` for each pair (`null` for `None`). Keys are plain identifiers.
fn write_fields(out: &mut Vec<u8>, fields: &[(&str, Option<&str>)]) {
    for (key, value) in fields {
        out.extend_from_slice(b",\"");
        out.extend_from_slice(key.as_bytes());
        out.extend_from_slice(b"\":");
        match value {
            // Writing a string to a Vec cannot fail; serde_json escapes it.
            Some(v) => {
                let _ = serde_json::to_writer(&mut *out, v);
            }
            None => out.extend_from_slice(b"null"),
        }
    }
}

/// One step of a just-in-time approval (`kind: "approval"`): requested, approved, rejected,
/// used, expired, pre_approved.
#[derive(Debug, Clone, Serialize)]
pub struct ApprovalEvent {
    pub time: String,
    pub kind: &'static str,
    pub event: &'static str,
    pub approval_id: String,
    /// The requester.
    pub subject: String,
    /// The requester's configured issuer name (`issuers[].name`), as in a decision line.
    pub issuer: String,
    /// The requester's token `iss` claim; left out for an API key.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub iss: Option<String>,
    /// Who approved or rejected (`policy:pre_approve[N]` for a pre-approval).
    pub actor: Option<String>,
    pub method: String,
    pub host: String,
    /// Without the query string.
    pub path: String,
    pub route: String,
    pub rule: String,
    pub reason: Option<String>,
    pub uses_left: Option<i64>,
}

impl ApprovalEvent {
    pub fn new(event: &'static str, record: &crate::approvals::Record) -> Self {
        Self {
            time: humantime::format_rfc3339_micros(SystemTime::now()).to_string(),
            kind: "approval",
            event,
            approval_id: record.id.clone(),
            subject: record.subject.clone(),
            issuer: record.issuer_name.clone(),
            iss: record.token_iss().map(str::to_string),
            actor: None,
            method: record.method.clone(),
            host: record.host.clone(),
            path: record.path.clone(),
            route: record.route.clone(),
            rule: record.rule.clone(),
            reason: None,
            uses_left: None,
        }
    }
}

/// A change made, or refused, through an administrative API (`kind: "admin"`): a runtime
/// revocation added or removed on the admin listener (`api: "revocations"`), a caller the
/// admin listener or the approvals API turned away (`event: "refused"`). Decisions on
/// traffic are `AuditEvent`s; approval steps are `ApprovalEvent`s.
#[derive(Debug, Clone, Serialize)]
pub struct AdminEvent {
    pub time: String,
    pub kind: &'static str,
    /// `revocation_added`, `revocation_removed`, `refused`; `revocation_add_unconfirmed`
    /// and `revocation_remove_unconfirmed` for a change shared state did not confirm (a
    /// timeout: it may have been applied, or be applied later), with `detail` saying so.
    pub event: &'static str,
    /// `revocations` or `approvals`.
    pub api: &'static str,
    /// Who made the call as far as it was established (the approvals API's verified caller,
    /// `issuer:subject`; `admin-secret` or `loopback` for the revocations API), never a
    /// credential.
    pub actor: Option<String>,
    /// The revocation's kind (`jti`, `sid`, `sub`), value, issuer scope and expiry.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub revocation: Option<serde_json::Value>,
    /// Why a call was refused.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

impl AdminEvent {
    pub fn new(event: &'static str, api: &'static str, actor: Option<String>) -> Self {
        Self {
            time: humantime::format_rfc3339_micros(SystemTime::now()).to_string(),
            kind: "admin",
            event,
            api,
            actor,
            revocation: None,
            detail: None,
        }
    }
}

/// An audit sink whose output tests read back.
#[cfg(test)]
pub(crate) struct Captured {
    pub sink: AuditSink,
    out: Arc<Mutex<Vec<u8>>>,
}

#[cfg(test)]
impl Captured {
    pub fn new() -> Self {
        #[derive(Clone)]
        struct Into(Arc<Mutex<Vec<u8>>>);
        impl Write for Into {
            fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
                self.0.lock().unwrap().extend_from_slice(buf);
                Ok(buf.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let out = Arc::new(Mutex::new(Vec::new()));
        let writer = Into(out.clone());
        let sink = AuditSink::to_writer(move || writer).unwrap();
        Self { sink, out }
    }

    /// Everything recorded so far, once written.
    pub fn text(&self) -> String {
        assert!(self.sink.flush(Duration::from_secs(5)), "flush timed out");
        String::from_utf8(self.out.lock().unwrap().clone()).unwrap()
    }
}

/// Where audit events go. Cloning shares the writer thread; when the last clone is dropped
/// the writer writes what is left and ends.
#[derive(Clone)]
pub struct AuditSink {
    handle: Option<Arc<Handle>>,
}

/// The events not yet written: JSON lines, newline-terminated, in the order recorded.
struct Pending {
    lines: Vec<u8>,
    /// Callers of `flush` waiting for everything recorded before them to be written.
    flushes: Vec<std::sync::mpsc::Sender<()>>,
    /// The writer is waiting for work (it must be woken for the first line of a batch).
    writer_idle: bool,
    /// A Check is waiting for room (the writer must wake it after a write).
    full_waiters: usize,
    /// Every sink is gone: write what is left and end.
    closed: bool,
    /// The writer made no room within `AUDIT_FULL_WAIT`: records are refused at once until
    /// it takes the next batch.
    stuck: bool,
    /// The output refuses writes (a closed stdout, a full disk): records are refused at once
    /// until a retried write goes through.
    failing: bool,
    /// Records taken, and records written out whole: the difference is what an output
    /// that stopped taking writes holds back (pending, or in the writer's batch).
    taken: u64,
    written: u64,
    /// Records in `lines`.
    in_lines: u64,
}

struct Shared {
    pending: Mutex<Pending>,
    /// Wakes the writer: first line after idling, a flush request, shutdown.
    work: Condvar,
    /// Wakes Checks waiting for room in a full buffer.
    room: Condvar,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Pending> {
        // A panic while holding the lock leaves whole lines behind: keep going.
        self.pending.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Held by the sinks only: its drop tells the writer that no more events will come.
struct Handle {
    shared: Arc<Shared>,
    /// Events refused (`append` returned false): never written.
    lost: prometheus_client::metrics::counter::Counter,
}

impl Drop for Handle {
    fn drop(&mut self) {
        let mut pending = self.shared.lock();
        pending.closed = true;
        drop(pending);
        self.shared.work.notify_one();
    }
}

/// How long the writer lets events accumulate before a write: one wake-up and one syscall
/// per batch instead of per event. Each wake-up of the writer on the core that Envoy and the
/// Checks share costs far more than its own few microseconds (measured in bench/, issue 4,
/// under Envoy with 10k tokens: Envoy + Portcullis CPU per Check 55.3 us with a 5 ms window,
/// 53.8 us with 50 ms, 52.7 us with no audit at all). Records reach stdout at most this late;
/// shutdown flushes them (`flush`).
const AUDIT_BATCH_WINDOW: Duration = Duration::from_millis(50);

/// Past this many bytes waiting, a Check waits for the writer (up to `AUDIT_FULL_WAIT`)
/// rather than dropping an audit record: a slow stdout slows decisions down instead of losing
/// the log.
const AUDIT_MAX_PENDING: usize = 16 * 1024 * 1024;

/// How long a record waits for room in a full buffer. A writer that makes none in that time
/// is stuck (a blocked stdout): from then until it writes again, records are refused at once
/// and their decisions denied (`audit_unavailable`), so no allow goes unlogged and the thread
/// that decides (a tokio worker, or Envoy's own worker thread for the module) is never
/// parked for longer than this.
const AUDIT_FULL_WAIT: Duration = Duration::from_secs(1);

/// While the output refuses writes, how often the writer tries again.
const AUDIT_RETRY: Duration = Duration::from_millis(200);

/// A batch buffer larger than this is not kept for reuse after a burst.
const AUDIT_KEEP_CAPACITY: usize = 1024 * 1024;

thread_local! {
    /// Each thread's serialization scratch space, so the lock is held for a copy only.
    static SCRATCH: RefCell<Vec<u8>> = RefCell::new(Vec::with_capacity(1024));
}

impl AuditSink {
    /// Audit disabled.
    pub fn disabled() -> Self {
        Self { handle: None }
    }

    /// JSON lines on stdout from a background thread.
    pub fn stdout() -> std::io::Result<Self> {
        Self::to_writer(|| std::io::stdout().lock())
    }

    /// JSON lines written to what `open` returns, from a background thread.
    pub(crate) fn to_writer<W, F>(open: F) -> std::io::Result<Self>
    where
        W: Write,
        F: FnOnce() -> W + Send + 'static,
    {
        let shared = Arc::new(Shared {
            pending: Mutex::new(Pending {
                lines: Vec::with_capacity(64 * 1024),
                flushes: Vec::new(),
                writer_idle: false,
                full_waiters: 0,
                closed: false,
                stuck: false,
                failing: false,
                taken: 0,
                written: 0,
                in_lines: 0,
            }),
            work: Condvar::new(),
            room: Condvar::new(),
        });
        let writer = shared.clone();
        std::thread::Builder::new()
            .name("portcullis-audit".into())
            .spawn(move || write_lines(&writer, &mut open()))?;
        Ok(Self {
            handle: Some(Arc::new(Handle {
                shared,
                lost: Default::default(),
            })),
        })
    }

    /// Records a decision. When the writer falls far behind, the Check waits for it (at
    /// most `AUDIT_FULL_WAIT`) rather than dropping an audit record. False when the record
    /// could not be kept because the writer is stuck: the decision must not stand.
    #[must_use = "a decision whose record was refused must not stand"]
    pub fn record(&self, event: AuditEvent<'_>) -> bool {
        self.append(|line| event.write_json(line))
    }

    /// True while records are refused (the output fails, or the writer is stuck): a step
    /// that spends something only an allow should spend (a single-use approval) asks first,
    /// since the allow's own record would then be refused and the request denied.
    pub fn refusing(&self) -> bool {
        self.handle.as_ref().is_some_and(|handle| {
            let pending = handle.shared.lock();
            pending.failing || pending.stuck
        })
    }

    /// The count of events this sink refused (never written), for `/metrics`; `None` for a
    /// disabled sink.
    pub fn lost_events(&self) -> Option<prometheus_client::metrics::counter::Counter> {
        self.handle.as_ref().map(|h| h.lost.clone())
    }

    /// Records one approval step (lost, and logged as such, while the writer is stuck).
    pub fn record_approval(&self, event: ApprovalEvent) {
        let kept = self.append(|line| {
            // An approval event is plain strings and numbers: it always serializes.
            let _ = serde_json::to_writer(&mut *line, &event);
        });
        if !kept {
            tracing::error!(approval.event = event.event, approval.id = %event.approval_id, "approval event not audited: the audit log is stuck");
        }
    }

    /// Records one administrative change or refusal (lost, and logged as such, while the
    /// writer is stuck).
    pub fn record_admin(&self, event: AdminEvent) {
        let kept = self.append(|line| {
            // Plain strings and a JSON value: it always serializes.
            let _ = serde_json::to_writer(&mut *line, &event);
        });
        if !kept {
            tracing::error!(
                admin.event = event.event,
                admin.api = event.api,
                "admin event not audited: the audit log is stuck"
            );
        }
    }

    /// Waits (at most `timeout`) until every event recorded before this call is written.
    /// Called on shutdown, so the last decisions are never lost when the process exits.
    pub fn flush(&self, timeout: Duration) -> bool {
        let Some(handle) = &self.handle else {
            return true;
        };
        let (ack, done) = std::sync::mpsc::channel();
        let mut pending = handle.shared.lock();
        pending.flushes.push(ack);
        drop(pending);
        handle.shared.work.notify_one();
        done.recv_timeout(timeout).is_ok()
    }

    /// Records taken but not yet written out (pending, or in a write the output has not
    /// taken): at shutdown, what an output that stopped taking writes loses.
    pub fn unwritten(&self) -> u64 {
        self.handle.as_ref().map_or(0, |handle| {
            let pending = handle.shared.lock();
            pending.taken.saturating_sub(pending.written)
        })
    }

    /// Appends the line that `write` writes (plus the newline) to the pending batch. False
    /// when the buffer is full and the writer stuck (see `AUDIT_FULL_WAIT`).
    fn append(&self, write: impl FnOnce(&mut Vec<u8>)) -> bool {
        let Some(handle) = &self.handle else {
            return true;
        };
        SCRATCH.with_borrow_mut(|line| {
            // A line from a rare huge event is not kept as every later event's scratch.
            if line.capacity() > 64 * 1024 {
                *line = Vec::with_capacity(1024);
            }
            line.clear();
            write(line);
            line.push(b'\n');
            let kept = Self::push(&handle.shared, line);
            if !kept {
                handle.lost.inc();
            }
            kept
        })
    }

    /// Appends `line` to the pending batch, waiting for room (see `append`).
    fn push(shared: &Shared, line: &[u8]) -> bool {
        let mut pending = shared.lock();
        if pending.failing {
            return false;
        }
        // Read the clock only once the buffer is full, not on every record.
        let mut deadline = None;
        while pending.lines.len() >= AUDIT_MAX_PENDING && !pending.closed {
            let deadline = *deadline.get_or_insert_with(|| Instant::now() + AUDIT_FULL_WAIT);
            let left = deadline.saturating_duration_since(Instant::now());
            if pending.stuck || left.is_zero() {
                if !pending.stuck {
                    pending.stuck = true;
                    tracing::error!(
                        "the audit log is stuck (its output takes no writes): decisions are denied (audit_unavailable) until it moves again"
                    );
                }
                return false;
            }
            pending.full_waiters += 1;
            pending = shared
                .room
                .wait_timeout(pending, left)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
            pending.full_waiters -= 1;
        }
        let wake = pending.writer_idle && pending.lines.is_empty();
        pending.lines.extend_from_slice(line);
        pending.taken += 1;
        pending.in_lines += 1;
        drop(pending);
        if wake {
            shared.work.notify_one();
        }
        true
    }
}

/// The writer thread: waits for a first line, lets a batch gather for the window, writes it
/// with one call, acknowledges flushes; ends once every sink is gone and all is written.
///
/// A write the output refuses (a closed stdout, a full disk) keeps what it could not write
/// and retries it every `AUDIT_RETRY`; meanwhile `failing` makes every record refused (its
/// decision becomes an `audit_unavailable` deny: no allow goes unlogged), and flushes are
/// not acknowledged. The first successful retry ends it.
fn write_lines(shared: &Shared, out: &mut impl Write) {
    let mut batch = Vec::with_capacity(64 * 1024);
    // Records in `batch` (a write the output cut short leaves some behind).
    let mut in_batch = 0u64;
    let mut failing = false;
    let mut pending = shared.lock();
    loop {
        if pending.lines.is_empty() && pending.flushes.is_empty() && !failing {
            if pending.closed {
                break;
            }
            pending.writer_idle = true;
            pending = shared
                .work
                .wait(pending)
                .unwrap_or_else(PoisonError::into_inner);
            pending.writer_idle = false;
            continue;
        }
        if failing && pending.closed {
            // Every sink is gone and the output still refuses: nothing more can be done.
            break;
        }
        // Let events pile up instead of being woken for each one (a flush request or the
        // last sink going away ends the wait early); while the output refuses writes, wait
        // for the next retry.
        let window = if failing {
            AUDIT_RETRY
        } else {
            AUDIT_BATCH_WINDOW
        };
        let deadline = Instant::now() + window;
        while (failing || pending.flushes.is_empty()) && !pending.closed {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            pending = shared
                .work
                .wait_timeout(pending, left)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
        if batch.is_empty() {
            std::mem::swap(&mut batch, &mut pending.lines);
        } else {
            batch.extend_from_slice(&pending.lines);
            pending.lines.clear();
        }
        in_batch += std::mem::take(&mut pending.in_lines);
        let flushes = std::mem::take(&mut pending.flushes);
        let wake_full = pending.full_waiters > 0;
        let unstuck = std::mem::replace(&mut pending.stuck, false);
        drop(pending);
        if unstuck {
            tracing::warn!("the audit log moves again: decisions are recorded and enforced");
        }
        if wake_full {
            shared.room.notify_all();
        }
        let (written, error) = write_some(out, &batch);
        // Whole records written: all of them, or (a write cut short) those it finished.
        let lines = if written == batch.len() {
            in_batch
        } else {
            batch[..written].iter().filter(|&&b| b == b'\n').count() as u64
        };
        in_batch -= lines;
        batch.drain(..written);
        match error {
            None if failing => {
                failing = false;
                shared.lock().failing = false;
                tracing::warn!(
                    "the audit log takes writes again: decisions are recorded and enforced"
                );
            }
            None => {}
            Some(e) if !failing => {
                failing = true;
                shared.lock().failing = true;
                tracing::error!(
                    error = %e,
                    "the audit log's output refuses writes: decisions are denied (audit_unavailable) until it takes them again"
                );
            }
            Some(_) => {}
        }
        pending = shared.lock();
        pending.written += lines;
        if failing {
            // Not written yet: whoever waits for a flush keeps waiting (or times out).
            pending.flushes.extend(flushes);
        } else {
            for ack in flushes {
                let _ = ack.send(());
            }
        }
        if batch.capacity() > AUDIT_KEEP_CAPACITY && batch.is_empty() {
            batch = Vec::with_capacity(64 * 1024);
        }
    }
}

/// Writes as much of `batch` as `out` takes, then flushes: the bytes written, and the error
/// that stopped it. What was written is never written again, so a retry cannot repeat part
/// of a line.
fn write_some(out: &mut impl Write, batch: &[u8]) -> (usize, Option<std::io::Error>) {
    let mut done = 0;
    while done < batch.len() {
        match out.write(&batch[done..]) {
            Ok(0) => return (done, Some(std::io::ErrorKind::WriteZero.into())),
            Ok(n) => done += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return (done, Some(e)),
        }
    }
    (done, out.flush().err())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A writer whose bytes the test can read back; `gate` blocks writes until released.
    #[derive(Clone, Default)]
    struct Capture(Arc<Mutex<Vec<u8>>>, Option<Arc<Mutex<()>>>);

    impl Write for Capture {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            let _gate = self.1.as_ref().map(|g| g.lock().unwrap());
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl Capture {
        fn lines(&self) -> Vec<serde_json::Value> {
            let bytes = self.0.lock().unwrap().clone();
            String::from_utf8(bytes)
                .unwrap()
                .lines()
                .map(|l| serde_json::from_str(l).unwrap())
                .collect()
        }
    }

    /// A verified caller with just an issuer and a subject.
    fn caller(issuer: &str, subject: &str) -> crate::identity::Identity {
        crate::identity::Identity {
            issuer_name: "dev".into(),
            issuer: issuer.to_string(),
            subject: subject.to_string(),
            claims: serde_json::Map::new(),
            scopes: Vec::new(),
            roles: Vec::new(),
            expires_at: 0,
            not_before: None,
            issued_at: None,
            key_fingerprint: "test".into(),
            key_kid: None,
            key_alg: None,
        }
    }

    fn event(request_id: &str) -> AuditEvent<'_> {
        AuditEvent {
            time: SystemTime::UNIX_EPOCH + Duration::from_micros(1_764_000_000_123_456),
            kind: "decision",
            request_id,
            decision: "deny",
            status: 403,
            reason: "insufficient_scope",
            detail: "missing scope \"orders:write\"",
            route: Some("orders-create"),
            rule: None,
            subject: Some("alice"),
            issuer: Some("dev"),
            iss: Some("https://dev.portcullis.invalid"),
            api_key: None,
            client_ip: Some(IpAddr::from([192, 0, 2, 7])),
            peer_ip: None,
            method: "POST",
            host: "api.example.com",
            path: "/orders",
            decision_us: 12,
            dry_run: None,
        }
    }

    #[test]
    fn a_decision_is_one_json_line_with_every_field() {
        let out = Capture::default();
        let writer = out.clone();
        let sink = AuditSink::to_writer(move || writer).unwrap();
        assert!(sink.record(event("req-1")));
        assert!(sink.flush(Duration::from_secs(5)), "flush timed out");
        let lines = out.lines();
        assert_eq!(lines.len(), 1);
        let expected = serde_json::json!({
            "time": "2025-11-24T16:00:00.123456Z",
            "kind": "decision",
            "request_id": "req-1",
            "decision": "deny",
            "status": 403,
            "reason": "insufficient_scope",
            "detail": "missing scope \"orders:write\"",
            "route": "orders-create",
            "rule": null,
            "subject": "alice",
            "issuer": "dev",
            "iss": "https://dev.portcullis.invalid",
            "client_ip": "192.0.2.7",
            "method": "POST",
            "host": "api.example.com",
            "path": "/orders",
            "decision_us": 12,
        });
        assert_eq!(lines[0], expected);
    }

    /// What a JSON reader must get back from a line: every field, by name.
    fn expected(e: &AuditEvent<'_>) -> serde_json::Value {
        let mut v = serde_json::json!({
            "time": humantime::format_rfc3339_micros(e.time).to_string(),
            "kind": e.kind,
            "request_id": e.request_id,
            "decision": e.decision,
            "status": e.status,
            "reason": e.reason,
            "detail": e.detail,
            "route": e.route,
            "rule": e.rule,
            "subject": e.subject,
            "issuer": e.issuer,
            "client_ip": e.client_ip.map(|ip| ip.to_string()),
            "method": e.method,
            "host": e.host,
            "path": e.path,
            "decision_us": e.decision_us,
        });
        if let Some(iss) = e.iss {
            v["iss"] = iss.into();
        }
        if let Some(peer) = e.peer_ip {
            v["peer_ip"] = peer.to_string().into();
        }
        if let Some(key) = e.api_key {
            v["api_key"] = key.into();
        }
        if let Some(would) = e.dry_run {
            v["dry_run"] = serde_json::json!({
                "decision": if would.is_allow() { "allow" } else { "deny" },
                "status": would.code.http_status(),
                "reason": would.code.as_str(),
                "detail": would.detail,
                "route": would.route.as_deref(),
                "rule": would.rule.as_deref(),
            });
            if let Some(who) = would.identity.as_deref().filter(|_| e.subject.is_none()) {
                v["dry_run"]["subject"] = who.subject.as_str().into();
                v["dry_run"]["issuer"] = (&*who.issuer_name).into();
                if let Some(iss) = who.token_iss() {
                    v["dry_run"]["iss"] = iss.into();
                }
                if let Some(key) = who.api_key_id() {
                    v["dry_run"]["api_key"] = key.into();
                }
            }
        }
        v
    }

    #[test]
    fn every_line_reads_back_as_its_event_whatever_the_strings_hold() {
        let tricky = "quote \" backslash \\ newline \n tab \t nul \u{0} bell \u{7} é 🦀";
        let base = event("req-1");
        let would_deny = crate::authz::DryRun {
            code: crate::authz::ReasonCode::InsufficientScope,
            detail: tricky.to_string().into(),
            route: Some(tricky.into()),
            rule: None,
            identity: Some(Arc::new(caller(tricky, tricky))),
        };
        let would_allow = crate::authz::DryRun {
            code: crate::authz::ReasonCode::Allowed,
            detail: "granted".into(),
            route: Some("orders-read".into()),
            rule: Some("readers".into()),
            identity: would_deny.identity.clone(),
        };
        let cases = [
            base.clone(),
            AuditEvent {
                request_id: tricky,
                detail: tricky,
                route: None,
                rule: Some(tricky),
                subject: None,
                issuer: None,
                iss: Some(tricky),
                api_key: Some("ci-deployer"),
                client_ip: Some("2001:db8::1".parse().unwrap()),
                peer_ip: Some("2001:db8::2".parse().unwrap()),
                host: tricky,
                path: "/a%20b/\"c\"",
                status: 200,
                decision: "allow",
                decision_us: u64::MAX,
                dry_run: Some(&would_deny),
                ..base.clone()
            },
            AuditEvent {
                dry_run: Some(&would_allow),
                ..base.clone()
            },
            AuditEvent {
                client_ip: None,
                time: SystemTime::UNIX_EPOCH,
                ..base
            },
        ];
        for case in cases {
            let mut line = Vec::new();
            case.write_json(&mut line);
            let text = String::from_utf8(line).unwrap();
            assert!(!text.contains('\n'), "a line break inside the line: {text}");
            let back: serde_json::Value = serde_json::from_str(&text).unwrap();
            assert_eq!(back, expected(&case), "{text}");
        }
    }

    /// The request id, method, host and path come from the client: a 40 KB request id or a
    /// 20 KB path was logged whole, and container runtimes split such a line (at 16 KiB)
    /// into pieces no JSON reader takes. Each is cut on a character boundary and ends with
    /// `…`; a field within its limit is untouched.
    #[test]
    fn client_fields_are_cut_to_their_limit_with_a_marker() {
        let request_id = "r".repeat(40_000);
        // Two-byte characters after an odd start: the limit falls inside one.
        let path = format!("/x{}", "é".repeat(10_000));
        let host = format!("{}.example.com", "h".repeat(5_000));
        let method = "M".repeat(1_000);
        let long = AuditEvent {
            request_id: &request_id,
            method: &method,
            host: &host,
            path: &path,
            ..event("req-1")
        };
        let mut out = Vec::new();
        long.write_json(&mut out);
        assert!(out.len() < 4096, "a {} byte line", out.len());
        let line: serde_json::Value = serde_json::from_slice(&out).unwrap();
        for (field, whole, max) in [
            ("request_id", &request_id, MAX_SHORT_FIELD),
            ("method", &method, MAX_SHORT_FIELD),
            ("host", &host, MAX_SHORT_FIELD),
            ("path", &path, MAX_PATH_FIELD),
        ] {
            let shown = line[field].as_str().unwrap();
            assert!(shown.len() <= max, "{field}: {} bytes", shown.len());
            assert!(shown.len() > max - 8, "{field}: only {} bytes", shown.len());
            let kept = shown
                .strip_suffix(CUT)
                .unwrap_or_else(|| panic!("{field}: {shown}"));
            assert!(whole.starts_with(kept), "{field}: {shown}");
        }
        // At the limit exactly, nothing is cut.
        let exact = "x".repeat(MAX_SHORT_FIELD);
        let mut out = Vec::new();
        AuditEvent {
            request_id: &exact,
            ..event("req-1")
        }
        .write_json(&mut out);
        let line: serde_json::Value = serde_json::from_slice(&out).unwrap();
        assert_eq!(line["request_id"], exact.as_str());
    }

    /// The audited path stops at the query, the fragment and the first path parameter: a
    /// path with `;` is refused, and its deny logged `/x;jsessionid=...` whole.
    #[test]
    fn the_path_is_logged_without_query_fragment_or_path_parameters() {
        let decision = Decision::new(crate::authz::ReasonCode::PathRejected, "path rejected");
        let headers = std::collections::HashMap::new();
        for (sent, logged) in [
            ("/x;jsessionid=SECRET", "/x"),
            ("/a/b;v=SECRET/c?q=SECRET", "/a/b"),
            ("/a?q=SECRET;x", "/a"),
            ("/a#SECRET", "/a"),
            ("/orders/42", "/orders/42"),
        ] {
            let view = RequestView {
                path: sent,
                ..crate::engine::tests::healthz(&headers)
            };
            let mut out = Vec::new();
            AuditEvent::new(&decision, &view, "r", Duration::ZERO, 0).write_json(&mut out);
            let line: serde_json::Value = serde_json::from_slice(&out).unwrap();
            assert_eq!(line["path"], logged, "{sent}");
        }
    }

    /// Behind trusted proxies, `client_ip` is the client the decision saw (what source
    /// conditions and `client_ip` limits used), not the proxy Envoy's TCP peer is; the proxy
    /// is `peer_ip`. Without them the line is as it was: `client_ip` is the peer, and no
    /// `peer_ip`.
    #[test]
    fn client_ip_is_the_address_the_decision_used() {
        let headers = std::collections::HashMap::from([(
            "x-forwarded-for".to_string(),
            "203.0.113.9, 198.51.100.7, 10.0.0.5".to_string(),
        )]);
        let view = RequestView {
            source_ip: Some(IpAddr::from([10, 0, 0, 5])),
            ..crate::engine::tests::healthz(&headers)
        };
        let decision = Decision::new(crate::authz::ReasonCode::Public, "route is public");
        let line = |hops: u32| {
            let mut out = Vec::new();
            AuditEvent::new(&decision, &view, "r", Duration::ZERO, hops).write_json(&mut out);
            serde_json::from_slice::<serde_json::Value>(&out).unwrap()
        };
        let behind = line(1);
        assert_eq!(behind["client_ip"], "198.51.100.7", "{behind}");
        assert_eq!(behind["peer_ip"], "10.0.0.5", "{behind}");
        let direct = line(0);
        assert_eq!(direct["client_ip"], "10.0.0.5", "{direct}");
        assert!(direct.get("peer_ip").is_none(), "{direct}");
        // A chain the trusted proxies did not write as configured: no client address.
        let unreadable = line(3);
        assert!(unreadable["client_ip"].is_null(), "{unreadable}");
        assert_eq!(unreadable["peer_ip"], "10.0.0.5", "{unreadable}");
    }

    /// `issuer` is the configured issuer name for every caller (what rules, `explain`, the
    /// approvals and the metrics name); the token's `iss` claim is beside it, for JWT callers
    /// only.
    #[test]
    fn issuer_is_the_configured_name_and_iss_the_tokens_claim() {
        let line = |identity: Option<crate::identity::Identity>| {
            let decision = Decision::new(crate::authz::ReasonCode::Allowed, "granted")
                .with_identity(identity.map(Arc::new));
            let headers = std::collections::HashMap::new();
            let view = RequestView {
                path: "/orders/42",
                source_principal: "spiffe://example.org/ns/shop/sa/checkout",
                ..crate::engine::tests::healthz(&headers)
            };
            let mut out = Vec::new();
            AuditEvent::new(&decision, &view, "r", Duration::ZERO, 0).write_json(&mut out);
            serde_json::from_slice::<serde_json::Value>(&out).unwrap()
        };
        // A token: the issuer's name, and its `iss`.
        let jwt = line(Some(caller("https://dev.portcullis.invalid", "alice")));
        assert_eq!(jwt["issuer"], "dev", "{jwt}");
        assert_eq!(jwt["iss"], "https://dev.portcullis.invalid", "{jwt}");
        // An API key: `api-key`, and no `iss` (a key has no token).
        let mut key = caller(crate::identity::apikey::API_KEY_ISSUER, "reporting");
        key.issuer_name = crate::identity::apikey::API_KEY_ISSUER.into();
        key.claims.insert(
            crate::identity::apikey::KEY_ID_CLAIM.into(),
            "reporting-bot".into(),
        );
        let key = line(Some(key));
        assert_eq!(key["issuer"], "api-key", "{key}");
        assert_eq!(key["api_key"], "reporting-bot", "{key}");
        assert!(key.get("iss").is_none(), "{key}");
        // A peer principal (or nobody): neither.
        let peer = line(None);
        assert_eq!(peer["issuer"], serde_json::Value::Null, "{peer}");
        assert!(peer.get("iss").is_none(), "{peer}");
    }

    #[test]
    fn a_dry_run_names_its_caller_when_the_line_has_none() {
        let carol = caller("https://dev.test", "carol");
        let would = crate::authz::DryRun {
            code: crate::authz::ReasonCode::InsufficientScope,
            detail: "missing scope `reports:read`".into(),
            route: Some("reports".into()),
            rule: None,
            identity: Some(Arc::new(carol)),
        };
        let line = |e: AuditEvent<'_>| {
            let mut out = Vec::new();
            e.write_json(&mut out);
            serde_json::from_slice::<serde_json::Value>(&out).unwrap()
        };
        // A public live route: the line says nobody, the dry run says who it would refuse.
        let public = line(AuditEvent {
            decision: "allow",
            status: 200,
            reason: "public_route",
            subject: None,
            issuer: None,
            iss: None,
            dry_run: Some(&would),
            ..event("r1")
        });
        assert_eq!(public["subject"], serde_json::Value::Null, "{public}");
        assert_eq!(public["dry_run"]["subject"], "carol", "{public}");
        assert_eq!(public["dry_run"]["issuer"], "dev", "{public}");
        assert_eq!(public["dry_run"]["iss"], "https://dev.test", "{public}");
        // The live decision named the caller: the dry run does not repeat it.
        let named = line(AuditEvent {
            dry_run: Some(&would),
            ..event("r2")
        });
        assert_eq!(named["subject"], "alice", "{named}");
        assert!(named["dry_run"].get("subject").is_none(), "{named}");
    }

    #[test]
    fn events_keep_their_order_and_flush_waits_for_all_of_them() {
        let out = Capture::default();
        let writer = out.clone();
        let sink = AuditSink::to_writer(move || writer).unwrap();
        let ids: Vec<String> = (0..2000).map(|i| format!("req-{i}")).collect();
        for id in &ids {
            assert!(sink.record(event(id)));
        }
        assert!(sink.flush(Duration::from_secs(5)), "flush timed out");
        let got: Vec<String> = out
            .lines()
            .iter()
            .map(|l| l["request_id"].as_str().unwrap().to_string())
            .collect();
        assert_eq!(got, ids);
    }

    #[test]
    fn a_slow_writer_slows_checks_down_but_loses_no_record() {
        let gate = Arc::new(Mutex::new(()));
        let out = Capture(Arc::default(), Some(gate.clone()));
        let writer = out.clone();
        let held = gate.lock().unwrap();
        let sink = AuditSink::to_writer(move || writer).unwrap();
        // More than twice AUDIT_MAX_PENDING bytes while the writer cannot write: the writer
        // may take one full batch before it blocks, and the rest still overflows.
        let mut sample = Vec::new();
        event("req-0000000").write_json(&mut sample);
        let line_len = sample.len() + 1;
        let count = 2 * (AUDIT_MAX_PENDING / line_len) + 1000;
        let producer = {
            let sink = sink.clone();
            std::thread::spawn(move || {
                for i in 0..count {
                    assert!(
                        sink.record(event(&format!("req-{i:07}"))),
                        "record {i} refused"
                    );
                }
            })
        };
        // The producer must end up waiting for room, with the buffer at its limit.
        let shared = sink.handle.as_ref().unwrap().shared.clone();
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        loop {
            let pending = shared.lock();
            if pending.full_waiters > 0 {
                assert!(pending.lines.len() < AUDIT_MAX_PENDING + line_len);
                break;
            }
            drop(pending);
            assert!(
                !producer.is_finished(),
                "records were accepted past the limit"
            );
            assert!(
                std::time::Instant::now() < deadline,
                "producer never waited"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        drop(held);
        producer.join().unwrap();
        assert!(sink.flush(Duration::from_secs(10)), "flush timed out");
        assert_eq!(out.lines().len(), count);
    }

    /// What an output that takes no writes holds back is counted, in the writer's batch as
    /// in the pending buffer, so a shutdown that cannot flush says how many records it
    /// loses (it said only "not fully flushed").
    #[test]
    fn records_an_output_holds_back_are_counted_until_written() {
        let gate = Arc::new(Mutex::new(()));
        let out = Capture(Arc::default(), Some(gate.clone()));
        let writer = out.clone();
        let held = gate.lock().unwrap();
        let sink = AuditSink::to_writer(move || writer).unwrap();
        for i in 0..3 {
            assert!(sink.record(event(&format!("first-{i}"))));
        }
        // The writer takes that batch and blocks in the write.
        assert!(!sink.flush(Duration::from_millis(300)));
        for i in 0..2 {
            assert!(sink.record(event(&format!("then-{i}"))));
        }
        assert_eq!(sink.unwritten(), 5);
        drop(held);
        assert!(sink.flush(Duration::from_secs(10)), "flush timed out");
        assert_eq!(sink.unwritten(), 0);
        assert_eq!(out.lines().len(), 5);
    }

    #[test]
    fn a_stuck_writer_gets_records_refused_at_once_until_it_moves_again() {
        let gate = Arc::new(Mutex::new(()));
        let out = Capture(Arc::default(), Some(gate.clone()));
        let writer = out.clone();
        let held = gate.lock().unwrap();
        let sink = AuditSink::to_writer(move || writer).unwrap();
        // Fill the buffer while the writer cannot write, until a record is refused.
        let mut accepted = 0usize;
        let started = Instant::now();
        let refused_after = loop {
            let t = Instant::now();
            if !sink.record(event(&format!("req-{accepted:07}"))) {
                break t.elapsed();
            }
            accepted += 1;
            assert!(started.elapsed() < Duration::from_secs(30), "never refused");
        };
        // The first refusal waited for room, at most about AUDIT_FULL_WAIT...
        assert!(
            refused_after >= AUDIT_FULL_WAIT && refused_after < AUDIT_FULL_WAIT * 5,
            "{refused_after:?}"
        );
        let shared = sink.handle.as_ref().unwrap().shared.clone();
        assert!(shared.lock().lines.len() >= AUDIT_MAX_PENDING);
        // ...and the next ones do not wait at all while the writer stays stuck.
        let t = Instant::now();
        for i in 0..100 {
            assert!(!sink.record(event(&format!("late-{i}"))));
        }
        assert!(t.elapsed() < AUDIT_FULL_WAIT / 2, "{:?}", t.elapsed());
        // Once it writes again, records are kept again, and every kept one is written.
        drop(held);
        let deadline = Instant::now() + Duration::from_secs(10);
        while shared.lock().stuck {
            assert!(Instant::now() < deadline, "still stuck");
            std::thread::sleep(Duration::from_millis(5));
        }
        assert!(sink.record(event("after")));
        assert!(sink.flush(Duration::from_secs(10)), "flush timed out");
        let lines = out.lines();
        assert_eq!(lines.len(), accepted + 1);
        assert_eq!(lines[accepted]["request_id"], "after");
    }

    /// An output that refuses writes while `broken` is set (as a closed stdout or a full
    /// disk does), and takes at most `chunk` bytes a call.
    #[derive(Clone, Default)]
    struct Refusing {
        out: Capture,
        broken: Arc<std::sync::atomic::AtomicBool>,
        chunk: usize,
    }

    impl Write for Refusing {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            if self.broken.load(std::sync::atomic::Ordering::SeqCst) {
                return Err(std::io::ErrorKind::BrokenPipe.into());
            }
            let n = buf.len().min(self.chunk);
            // Half of one call goes through, then the output breaks: a line cut in two.
            self.out.write(&buf[..n])
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn an_output_that_refuses_writes_gets_records_refused_until_it_takes_them_again() {
        let broken = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let out = Refusing {
            broken: broken.clone(),
            chunk: 1 << 20,
            ..Default::default()
        };
        let writer = out.clone();
        let sink = AuditSink::to_writer(move || writer).unwrap();
        assert!(sink.record(event("before")));
        assert!(sink.flush(Duration::from_secs(10)));
        broken.store(true, std::sync::atomic::Ordering::SeqCst);
        // The first record after the break is accepted (nobody knows yet); once the writer
        // has met the refusal, records are refused at once: their decisions must not stand.
        assert!(sink.record(event("lost-in-flight")));
        let shared = sink.handle.as_ref().unwrap().shared.clone();
        let deadline = Instant::now() + Duration::from_secs(10);
        while !shared.lock().failing {
            assert!(Instant::now() < deadline, "never noticed the refusal");
            std::thread::sleep(Duration::from_millis(5));
        }
        let lost = sink.lost_events().unwrap();
        assert_eq!(lost.get(), 0);
        let t = Instant::now();
        for i in 0..100 {
            assert!(!sink.record(event(&format!("refused-{i}"))));
        }
        // Every refused record is counted for `/metrics`; the one in flight is not lost.
        assert_eq!(lost.get(), 100);
        assert!(
            t.elapsed() < Duration::from_millis(500),
            "{:?}",
            t.elapsed()
        );
        assert!(
            !sink.flush(Duration::from_millis(300)),
            "nothing was written"
        );
        // The output takes writes again: the kept record is written after all, records are
        // accepted again, and no refused one appears.
        broken.store(false, std::sync::atomic::Ordering::SeqCst);
        while shared.lock().failing {
            assert!(Instant::now() < deadline, "never recovered");
            std::thread::sleep(Duration::from_millis(5));
        }
        assert!(sink.record(event("after")));
        assert!(sink.flush(Duration::from_secs(10)));
        let ids: Vec<String> = out
            .out
            .lines()
            .iter()
            .map(|l| l["request_id"].as_str().unwrap().to_string())
            .collect();
        assert_eq!(ids, ["before", "lost-in-flight", "after"]);
    }

    #[test]
    fn write_some_reports_what_was_written_before_the_output_refused() {
        let mut out = Refusing {
            chunk: 10,
            ..Default::default()
        };
        let (written, error) = write_some(&mut out, b"0123456789abcdef\n");
        assert_eq!((written, error.map(|e| e.kind())), (17, None));
        out.broken.store(true, std::sync::atomic::Ordering::SeqCst);
        let (written, error) = write_some(&mut out, b"xyz\n");
        assert_eq!(written, 0);
        assert_eq!(
            error.map(|e| e.kind()),
            Some(std::io::ErrorKind::BrokenPipe)
        );
        assert_eq!(out.out.0.lock().unwrap().as_slice(), b"0123456789abcdef\n");
    }

    #[test]
    fn dropping_every_sink_writes_what_is_left() {
        let out = Capture::default();
        let writer = out.clone();
        let sink = AuditSink::to_writer(move || writer).unwrap();
        assert!(sink.record(event("last")));
        drop(sink);
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while out.lines().is_empty() && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(out.lines().len(), 1);
    }

    #[test]
    fn a_disabled_sink_records_nothing_and_flushes_at_once() {
        let sink = AuditSink::disabled();
        assert!(
            sink.record(event("nobody")),
            "a disabled sink never refuses"
        );
        assert!(sink.flush(Duration::ZERO));
    }
}

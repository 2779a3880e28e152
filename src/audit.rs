//! The audit log: one JSON line per decision on stdout, written by a dedicated thread so a
//! Check never blocks on the terminal or a pipe. Never contains a token, a query string or a
//! header value other than the request id.

use std::io::Write;
use std::sync::mpsc::{Receiver, SyncSender, TrySendError, sync_channel};
use std::time::{Duration, SystemTime};

use serde::Serialize;

use crate::authz::{Decision, RequestView};

/// One decision, as logged.
#[derive(Debug, Serialize)]
pub struct AuditEvent {
    pub time: String,
    pub kind: &'static str,
    pub request_id: String,
    pub decision: &'static str,
    pub status: u16,
    pub reason: &'static str,
    pub detail: String,
    pub route: Option<String>,
    pub rule: Option<String>,
    pub subject: Option<String>,
    pub issuer: Option<String>,
    pub client_ip: Option<String>,
    pub method: String,
    pub host: String,
    /// The path without its query string (queries may carry secrets).
    pub path: String,
    pub decision_us: u64,
}

impl AuditEvent {
    pub fn new(
        decision: &Decision,
        view: &RequestView<'_>,
        request_id: &str,
        elapsed: Duration,
    ) -> Self {
        let path = view.path.split(['?', '#']).next().unwrap_or_default();
        Self {
            time: humantime::format_rfc3339_micros(SystemTime::now()).to_string(),
            kind: "decision",
            request_id: request_id.to_string(),
            decision: if decision.is_allow() { "allow" } else { "deny" },
            status: decision.http_status(),
            reason: decision.code.as_str(),
            detail: decision.detail.to_string(),
            route: decision.route.as_deref().map(str::to_string),
            rule: decision.rule.as_deref().map(str::to_string),
            subject: decision.identity.as_ref().map(|i| i.subject.clone()),
            issuer: decision.identity.as_ref().map(|i| i.issuer.clone()),
            client_ip: view.source_ip.map(|ip| ip.to_string()),
            method: view.method.to_string(),
            host: view.host.to_string(),
            path: path.to_string(),
            decision_us: u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX),
        }
    }
}

/// Where audit events go. Cloning shares the writer thread.
#[derive(Clone)]
pub struct AuditSink {
    tx: Option<SyncSender<AuditEvent>>,
}

impl AuditSink {
    /// Audit disabled.
    pub fn disabled() -> Self {
        Self { tx: None }
    }

    /// JSON lines on stdout from a background thread.
    pub fn stdout() -> std::io::Result<Self> {
        let (tx, rx) = sync_channel::<AuditEvent>(65_536);
        std::thread::Builder::new()
            .name("portcullis-audit".into())
            .spawn(move || write_lines(rx, std::io::stdout()))?;
        Ok(Self { tx: Some(tx) })
    }

    /// Records an event. When the writer falls far behind, the Check waits for it rather
    /// than dropping an audit record.
    pub fn record(&self, event: AuditEvent) {
        let Some(tx) = &self.tx else { return };
        match tx.try_send(event) {
            Ok(()) | Err(TrySendError::Disconnected(_)) => {}
            Err(TrySendError::Full(event)) => {
                let _ = tx.send(event);
            }
        }
    }
}

fn write_lines(rx: Receiver<AuditEvent>, out: std::io::Stdout) {
    let mut out = std::io::BufWriter::new(out.lock());
    while let Ok(event) = rx.recv() {
        write_one(&mut out, &event);
        // Drain what is queued, then flush once: one syscall per burst, not per event.
        while let Ok(event) = rx.try_recv() {
            write_one(&mut out, &event);
        }
        let _ = out.flush();
        // Let events pile up for a moment instead of being woken for each one: under load a
        // wake-up per decision costs a context switch per Check (measured in bench/: about a
        // third of a cached decision's CPU on one core). Records are delayed by at most this.
        std::thread::sleep(AUDIT_BATCH_WINDOW);
    }
}

/// How long the writer lets events accumulate between bursts.
const AUDIT_BATCH_WINDOW: std::time::Duration = std::time::Duration::from_millis(2);

fn write_one(out: &mut impl Write, event: &AuditEvent) {
    if serde_json::to_writer(&mut *out, event).is_ok() {
        let _ = out.write_all(b"\n");
    }
}

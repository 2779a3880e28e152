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
    /// The API key id (never the key) when the caller used one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub api_key: Option<String>,
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
            api_key: decision
                .identity
                .as_ref()
                .and_then(|i| i.api_key_id())
                .map(str::to_string),
            client_ip: view.source_ip.map(|ip| ip.to_string()),
            method: view.method.to_string(),
            host: view.host.to_string(),
            path: path.to_string(),
            decision_us: u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX),
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
    pub issuer: String,
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
            issuer: record.issuer.clone(),
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

/// A line of the audit log.
#[derive(Debug, Serialize)]
#[serde(untagged)]
enum Line {
    Decision(AuditEvent),
    Approval(ApprovalEvent),
    /// Not a line: asks the writer to write everything queued before it, then acknowledge.
    #[serde(skip)]
    Flush(std::sync::mpsc::Sender<()>),
}

/// Where audit events go. Cloning shares the writer thread.
#[derive(Clone)]
pub struct AuditSink {
    tx: Option<SyncSender<Line>>,
}

impl AuditSink {
    /// Audit disabled.
    pub fn disabled() -> Self {
        Self { tx: None }
    }

    /// JSON lines on stdout from a background thread.
    pub fn stdout() -> std::io::Result<Self> {
        let (tx, rx) = sync_channel::<Line>(65_536);
        std::thread::Builder::new()
            .name("portcullis-audit".into())
            .spawn(move || write_lines(rx, std::io::stdout()))?;
        Ok(Self { tx: Some(tx) })
    }

    /// Records an event. When the writer falls far behind, the Check waits for it rather
    /// than dropping an audit record.
    pub fn record(&self, event: AuditEvent) {
        self.send(Line::Decision(event));
    }

    /// Records one approval step.
    pub fn record_approval(&self, event: ApprovalEvent) {
        self.send(Line::Approval(event));
    }

    /// Waits (at most `timeout`) until every event recorded before this call is written.
    /// Called on shutdown, so the last decisions are never lost when the process exits.
    pub fn flush(&self, timeout: std::time::Duration) -> bool {
        let Some(tx) = &self.tx else { return true };
        let (ack, done) = std::sync::mpsc::channel();
        if tx.send(Line::Flush(ack)).is_err() {
            return false;
        }
        done.recv_timeout(timeout).is_ok()
    }

    fn send(&self, event: Line) {
        let Some(tx) = &self.tx else { return };
        match tx.try_send(event) {
            Ok(()) | Err(TrySendError::Disconnected(_)) => {}
            Err(TrySendError::Full(event)) => {
                let _ = tx.send(event);
            }
        }
    }
}

fn write_lines(rx: Receiver<Line>, out: std::io::Stdout) {
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

fn write_one(out: &mut impl Write, event: &Line) {
    if let Line::Flush(ack) = event {
        let _ = out.flush();
        let _ = ack.send(());
        return;
    }
    if serde_json::to_writer(&mut *out, event).is_ok() {
        let _ = out.write_all(b"\n");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A writer whose bytes the test can read back.
    #[derive(Clone, Default)]
    struct Shared(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

    impl Write for Shared {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn flush_line_writes_nothing_and_acknowledges() {
        let mut out = Shared::default();
        let (ack, done) = std::sync::mpsc::channel();
        write_one(&mut out, &Line::Flush(ack));
        assert!(done.try_recv().is_ok(), "flush was not acknowledged");
        assert!(out.0.lock().unwrap().is_empty());
    }
}

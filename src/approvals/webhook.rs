//! Tells a webhook about each new approval request: one JSON POST, retried with exponential
//! backoff, from a background task so a Check never waits for it.
//!
//! The webhook URL may itself be a secret (chat webhooks often are): it is never logged.

use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use serde_json::json;

use super::Record;
use crate::config::schema::WebhookConfig;

#[derive(Clone)]
pub struct Webhook {
    url: String,
    timeout: Duration,
    retries: u32,
    link_base: Option<String>,
    client: Option<reqwest::Client>,
    /// Notifications delivered, and failed after every attempt (`count_in`).
    delivered: Counter,
    failed: Counter,
}

impl Webhook {
    pub fn new(config: &WebhookConfig, link_base: Option<String>) -> Self {
        // No redirects: a 307/308 would send the request (subject, path, justification) on to
        // wherever the webhook's answer points. A redirect is a failed delivery, retried.
        let client = reqwest::Client::builder()
            .timeout(config.timeout.get())
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .ok();
        Self {
            url: config.url.clone(),
            timeout: config.timeout.get(),
            retries: config.retries,
            link_base,
            client,
            delivered: Counter::default(),
            failed: Counter::default(),
        }
    }

    /// Counts this webhook's outcomes in `metrics` (`approval_webhook_notifications`).
    pub fn count_in(&mut self, metrics: &crate::admin::metrics::Metrics) {
        let family = &metrics.approval_webhook_notifications;
        let counter = |result| {
            family
                .get_or_create(&crate::admin::metrics::ResultLabels { result })
                .clone()
        };
        self.delivered = counter("delivered");
        self.failed = counter("failed");
    }

    /// The JSON sent for a new request.
    pub fn payload(&self, record: &Record) -> serde_json::Value {
        let link = self
            .link_base
            .as_deref()
            .map(|base| format!("{}/{}", base.trim_end_matches('/'), record.id));
        json!({
            "event": "approval_requested",
            "approval_id": record.id,
            // What a chat tool renders: a subject or host that is not plain text is shown
            // quoted and escaped (`shown`), never as a second line or reordered.
            "summary": format!(
                "{}:{} asks to {} {}{} (route `{}`, rule `{}`)",
                record.issuer_name,
                super::shown(&record.subject),
                record.method,
                super::shown(&record.host),
                record.path,
                record.route,
                record.rule
            ),
            "subject": super::shown(&record.subject),
            "issuer": record.issuer_name,
            "iss": record.token_iss(),
            "method": record.method,
            "host": record.host,
            "path": record.path,
            "query": record.query,
            "query_sha256": record.query_sha256,
            "body_sha256": record.body_sha256,
            "route": record.route,
            "rule": record.rule,
            "justification": record.justification,
            "requested_at": record.requested_at,
            "expires_at": record.expires_at,
            "link": link,
            "approve_with": format!("portcullis approvals approve {}", record.id),
        })
    }

    /// Posts the payload in the background: up to `1 + retries` attempts, waiting 250 ms,
    /// 500 ms, 1 s, ... between them. Needs a running tokio runtime.
    pub fn notify(&self, record: &Record) {
        let Some(client) = self.client.clone() else {
            tracing::warn!(approval.id = %record.id, "approval webhook client unavailable");
            self.failed.inc();
            return;
        };
        let body = self.payload(record).to_string();
        let url = self.url.clone();
        let retries = self.retries;
        let timeout = self.timeout;
        let id = record.id.clone();
        let (delivered, failed) = (self.delivered.clone(), self.failed.clone());
        let Ok(handle) = tokio::runtime::Handle::try_current() else {
            failed.inc();
            return;
        };
        handle.spawn(async move {
            let mut pause = Duration::from_millis(250);
            for attempt in 0..=retries {
                let sent = client
                    .post(&url)
                    .timeout(timeout)
                    .header("content-type", "application/json")
                    .body(body.clone())
                    .send()
                    .await;
                match sent {
                    Ok(r) if r.status().is_success() => {
                        delivered.inc();
                        return;
                    }
                    Ok(r) => tracing::warn!(
                        approval.id = %id,
                        attempt,
                        status = r.status().as_u16(),
                        "approval webhook refused the notification"
                    ),
                    Err(e) => tracing::warn!(
                        approval.id = %id,
                        attempt,
                        error = %e.without_url(),
                        "approval webhook unreachable"
                    ),
                }
                if attempt < retries {
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(Duration::from_secs(30));
                }
            }
            failed.inc();
            tracing::warn!(
                approval.id = %id,
                attempts = retries + 1,
                "approval webhook notification failed after every attempt: approvers were not told"
            );
        });
    }
}

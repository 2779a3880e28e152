//! Prometheus metrics (prometheus-client). One `Metrics` per process, shared by `Arc`.

use std::sync::Arc;

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DecisionLabels {
    pub result: &'static str,
    pub status: u16,
    pub reason: &'static str,
    pub route: RouteLabel,
}

/// A decision made for a configured API key (only verified keys: an unknown key sent by a
/// client never becomes a label value).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ApiKeyLabels {
    pub key_id: String,
    pub result: &'static str,
    pub reason: &'static str,
}

/// A decision of the `dry_run` routes (`result`, `reason`, `route` are theirs) beside the
/// live one's result: `live != result` is a request the candidate policy would answer
/// differently.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DryRunLabels {
    pub live: &'static str,
    pub result: &'static str,
    pub reason: &'static str,
    pub route: RouteLabel,
}

/// The route id as a label value (empty when no route matched). Shares the decision's
/// `Arc<str>`, so counting a decision allocates nothing.
#[derive(Clone, Debug, Default, Hash, PartialEq, Eq)]
pub struct RouteLabel(pub Option<Arc<str>>);

impl EncodeLabelValue for RouteLabel {
    fn encode(&self, encoder: &mut LabelValueEncoder<'_>) -> Result<(), std::fmt::Error> {
        std::fmt::Write::write_str(encoder, self.0.as_deref().unwrap_or(""))
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct IssuerResultLabels {
    pub issuer: String,
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct IssuerLabels {
    pub issuer: String,
}

/// A listener by name (`grpc`, `http`, `approvals`, `admin`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ListenerLabels {
    pub listener: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    pub result: &'static str,
}

pub struct Metrics {
    pub decisions: Family<DecisionLabels, Counter>,
    /// Decisions for requests carrying a valid API key, by key id.
    pub api_key_decisions: Family<ApiKeyLabels, Counter>,
    /// What the `dry_run` routes would have answered, beside the live result.
    pub dry_run_decisions: Family<DryRunLabels, Counter>,
    /// Dry runs that failed (a panic, caught): the live decision stood, uncounted above.
    pub dry_run_failures: Counter,
    pub decision_seconds: Histogram,
    pub token_cache_hits: Counter,
    pub token_cache_misses: Counter,
    /// Cached tokens verified again ahead of their entry's expiry, off the Check path.
    pub token_cache_refreshes: Counter,
    pub token_cache_entries: Gauge,
    /// Estimated bytes held by the token cache (its budget is `tokens.cache.max_bytes`).
    pub token_cache_bytes: Gauge,
    pub jwks_fetches: Family<IssuerResultLabels, Counter>,
    pub jwks_seconds_since_success: Family<IssuerLabels, Gauge<f64, std::sync::atomic::AtomicU64>>,
    pub config_reloads: Family<ResultLabels, Counter>,
    /// Revocation file loads by result (`ok`, `error`).
    pub revocation_reloads: Family<ResultLabels, Counter>,
    /// Syncs of the runtime revocation mirror from shared state, by result (`ok`, `error`).
    pub revocation_syncs: Family<ResultLabels, Counter>,
    /// Entries in the revocation file in force.
    pub revocation_entries: Gauge,
    /// Runtime revocations (added through `/revocations`) in this replica's mirror.
    pub runtime_revocation_entries: Gauge,
    /// Connections open per listener (`crate::listener`).
    pub connections_open: Family<ListenerLabels, Gauge>,
    /// Connections closed on arrival because their listener had its maximum open.
    pub connections_refused: Family<ListenerLabels, Counter>,
    /// Audit events that were never written: the output refused writes or the writer was
    /// stuck (`crate::audit`). Shared with the audit sink, which counts them.
    pub audit_events_lost: Counter,
    /// 1 while the audit log refuses records (decisions are then denied `audit_unavailable`).
    pub audit_refusing: Gauge,
    /// New approval requests told to the webhook, by final result (`delivered`, `failed`:
    /// every attempt refused or unreachable).
    pub approval_webhook_notifications: Family<ResultLabels, Counter>,
}

impl Metrics {
    pub fn new() -> Self {
        let metrics = Self::empty();
        // Outcome counters exist at 0 from the start: an alert on `result="error"` sees 0,
        // not "no data", until the first reload or sync.
        for family in [
            &metrics.config_reloads,
            &metrics.revocation_reloads,
            &metrics.revocation_syncs,
        ] {
            for result in ["ok", "error"] {
                drop(family.get_or_create(&ResultLabels { result }));
            }
        }
        for result in ["delivered", "failed"] {
            drop(
                metrics
                    .approval_webhook_notifications
                    .get_or_create(&ResultLabels { result }),
            );
        }
        metrics
    }

    fn empty() -> Self {
        Self {
            decisions: Family::default(),
            api_key_decisions: Family::default(),
            dry_run_decisions: Family::default(),
            dry_run_failures: Counter::default(),
            decision_seconds: Histogram::new([
                0.000_025, 0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01,
                0.025, 0.05, 0.1, 0.25,
            ]),
            token_cache_hits: Counter::default(),
            token_cache_misses: Counter::default(),
            token_cache_refreshes: Counter::default(),
            token_cache_entries: Gauge::default(),
            token_cache_bytes: Gauge::default(),
            jwks_fetches: Family::default(),
            jwks_seconds_since_success: Family::default(),
            config_reloads: Family::default(),
            revocation_reloads: Family::default(),
            revocation_syncs: Family::default(),
            revocation_entries: Gauge::default(),
            runtime_revocation_entries: Gauge::default(),
            connections_open: Family::default(),
            connections_refused: Family::default(),
            audit_events_lost: Counter::default(),
            audit_refusing: Gauge::default(),
            approval_webhook_notifications: Family::default(),
        }
    }

    /// Records the outcome of one JWKS (or discovery) fetch: `result` is a short code such as
    /// `ok`, `timeout`, `refused`, `http_status`, `not_json`, `no_keys`, `too_large`, `redirect`,
    /// `tls`.
    pub fn record_jwks_fetch(&self, issuer: &str, result: &'static str) {
        self.jwks_fetches
            .get_or_create(&IssuerResultLabels {
                issuer: issuer.to_string(),
                result,
            })
            .inc();
    }

    /// A registry holding every metric, for the text encoder.
    pub fn registry(&self) -> Registry {
        let mut r = Registry::with_prefix("portcullis");
        r.register(
            "decisions",
            "Authorization decisions by result, HTTP status, reason and route",
            self.decisions.clone(),
        );
        r.register(
            "api_key_decisions",
            "Decisions for requests with a valid API key, by key id, result and reason",
            self.api_key_decisions.clone(),
        );
        r.register(
            "dry_run_decisions",
            "What the dry_run candidate policy would have answered (result, reason, route), by live result",
            self.dry_run_decisions.clone(),
        );
        r.register(
            "dry_run_failures",
            "Dry runs that failed (the live decision stood and was enforced)",
            self.dry_run_failures.clone(),
        );
        r.register(
            "decision_duration_seconds",
            "Time to decide one request (gRPC Check, HTTP API or the Envoy module), from the \
             request read to the decision recorded; requests refused unread are not timed",
            self.decision_seconds.clone(),
        );
        r.register(
            "token_cache_hits",
            "Verified-token cache hits",
            self.token_cache_hits.clone(),
        );
        r.register(
            "token_cache_misses",
            "Verified-token cache misses",
            self.token_cache_misses.clone(),
        );
        r.register(
            "token_cache_refreshes",
            "Cached tokens verified again before their entry expired, off the Check path",
            self.token_cache_refreshes.clone(),
        );
        r.register(
            "token_cache_entries",
            "Verified tokens currently cached",
            self.token_cache_entries.clone(),
        );
        r.register(
            "token_cache_bytes",
            "Estimated bytes held by the verified-token cache",
            self.token_cache_bytes.clone(),
        );
        r.register(
            "jwks_fetches",
            "JWKS and discovery fetches by issuer and result",
            self.jwks_fetches.clone(),
        );
        r.register(
            "jwks_seconds_since_last_success",
            "Seconds since the issuer's key set was last fetched successfully",
            self.jwks_seconds_since_success.clone(),
        );
        r.register(
            "config_reloads",
            "Configuration loads by result",
            self.config_reloads.clone(),
        );
        r.register(
            "revocation_syncs",
            "Syncs of the runtime revocation list from shared state, by result",
            self.revocation_syncs.clone(),
        );
        r.register(
            "revocation_reloads",
            "Revocation file loads by result",
            self.revocation_reloads.clone(),
        );
        r.register(
            "revocation_entries",
            "Entries in the revocation file in force",
            self.revocation_entries.clone(),
        );
        r.register(
            "runtime_revocation_entries",
            "Runtime revocations (added through the admin API) in this replica's mirror of shared state",
            self.runtime_revocation_entries.clone(),
        );
        r.register(
            "connections_open",
            "Connections open, by listener",
            self.connections_open.clone(),
        );
        r.register(
            "connections_refused",
            "Connections closed on arrival because their listener had its maximum open \
             (server.max_connections for grpc and http), by listener",
            self.connections_refused.clone(),
        );
        r.register(
            "audit_events_lost",
            "Audit events never written because the audit output refused writes or its writer \
             was stuck (a decision among them was denied as audit_unavailable)",
            self.audit_events_lost.clone(),
        );
        r.register(
            "audit_refusing",
            "1 while the audit log refuses records: every decision is then denied (audit_unavailable)",
            self.audit_refusing.clone(),
        );
        r.register(
            "approval_webhook_notifications",
            "New approval requests told to the approvals webhook, by final result (delivered, or \
             failed after every retry)",
            self.approval_webhook_notifications.clone(),
        );
        r
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outcome_counters_are_exported_at_zero_before_anything_happened() {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &Metrics::new().registry()).unwrap();
        for name in [
            "portcullis_config_reloads_total",
            "portcullis_revocation_reloads_total",
            "portcullis_revocation_syncs_total",
        ] {
            for result in ["ok", "error"] {
                let line = format!("{name}{{result=\"{result}\"}} 0");
                assert!(text.lines().any(|l| l == line), "no `{line}` in\n{text}");
            }
        }
        for line in [
            "portcullis_approval_webhook_notifications_total{result=\"delivered\"} 0",
            "portcullis_approval_webhook_notifications_total{result=\"failed\"} 0",
            "portcullis_audit_events_lost_total 0",
            "portcullis_audit_refusing 0",
        ] {
            assert!(text.lines().any(|l| l == line), "no `{line}` in\n{text}");
        }
    }
}

//! The approval flow on top of the shared `StateStore`: the per-request gate the engine runs
//! after a grant, and the approve / reject / list operations of the approvals API.
//!
//! INVARIANT: every state-store failure on the way to an allow is a deny
//! (`state_unavailable`), never an allow; a use is spent with the store's atomic `take_one`,
//! so two concurrent retries never both spend a single-use approval.

use std::sync::Arc;
use std::time::Duration;

use crate::audit::{ApprovalEvent, AuditSink};
use crate::authz::{Decision, ReasonCode, RequestView};
use crate::config::Config;
use crate::identity::Identity;
use crate::state::{RateLimit, StateError, StateStore};

use super::{
    APPROVAL_ID_HEADER, ApprovalPolicy, ApprovalState, BODY_SHA256_HEADER, PARTIAL_BODY_HEADER,
    Policies, Record, display_path, displayable, fingerprint, is_self, justification, new_id,
    normal_host, query_of, query_shape, sha256_hex, valid_id,
};

/// Decided records are kept this long past their last relevant time, for listings and for
/// the expiry sweep.
pub(super) const RECORD_GRACE: Duration = Duration::from_secs(3600);

/// A request slot whose record is still missing this long after it was taken is adopted by
/// the next retry (at least this, and ten store timeouts: longer than any opener takes from
/// its slot to its record).
/// The `reason` of a `requested` line whose record the store may or may not hold.
const UNCONFIRMED_REQUEST: &str = "unconfirmed: the store failed while this request was \
     written and again when it was withdrawn, so it may be listed; the requester was refused \
     with 503";

pub(super) const ADOPT_AFTER: Duration = Duration::from_secs(10);

/// Why an approve / reject / list call failed. Messages are safe to return to the caller.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ApprovalError {
    #[error("no approval request `{0}`")]
    NotFound(String),
    #[error("you may not decide approval `{0}`: you hold none of its approver roles or subjects")]
    NotApprover(String),
    #[error("nobody approves their own request (`{0}`)")]
    SelfApproval(String),
    #[error("approval `{id}` is already {state}")]
    AlreadyDecided { id: String, state: &'static str },
    /// Another decision of the request has claimed it and not written its outcome yet.
    #[error(
        "approval `{0}` is being decided (another decision of it has not finished); list it \
         again for the outcome (a decision that never finishes is taken over after a few \
         seconds)"
    )]
    BeingDecided(String),
    #[error("approval request `{0}` has expired")]
    Expired(String),
    #[error("invalid ttl: {0}")]
    InvalidTtl(String),
    #[error(transparent)]
    State(#[from] StateError),
}

/// The approval flow for one loaded config.
pub struct Approvals {
    state: Arc<dyn StateStore>,
    policies: Policies,
    /// The `dry_run` candidate's approval policies: those of `dry_run.routes` (by route id,
    /// in `dry_run_routes`), the live ones for the routes it leaves as they are.
    dry_run_policies: Policies,
    dry_run_routes: Vec<String>,
    request_ttl: Duration,
    /// New requests one caller may open per `request_ttl` (a GCRA bucket in shared state).
    max_new_requests: u32,
    /// A slot without its record for this long was left by an opener that failed after it
    /// landed (a timeout): a retry adopts it (see `gate`).
    adopt_after: Duration,
    audit: AuditSink,
    webhook: Option<super::webhook::Webhook>,
}

fn key_req(fp: &str) -> String {
    format!("approval:req:{fp}")
}
/// The shared-state index of approval records (member: the record's id; expiry: the
/// record's), which `list` and `sweep` read instead of walking the store's keys.
const APPROVAL_INDEX: &str = "approval:index";

/// The record id of an action's pre-approvals: the same for every request of the action.
fn pre_approval_id(fp: &str) -> String {
    let digest = sha256_hex(format!("pre-approval\n{fp}").as_bytes());
    format!("apr_{}", &digest[..32])
}

fn key_rec(id: &str) -> String {
    format!("approval:rec:{id}")
}
fn key_decided(id: &str) -> String {
    format!("approval:decided:{id}")
}
fn key_grant(fp: &str) -> String {
    format!("approval:grant:{fp}")
}
fn key_grant_id(fp: &str) -> String {
    format!("approval:grantid:{fp}")
}
fn key_expired(id: &str) -> String {
    format!("approval:expired:{id}")
}

fn secs(d: Duration) -> i64 {
    i64::try_from(d.as_secs()).unwrap_or(i64::MAX)
}

/// `decision` (a grant) refused with `code`: same route, rule and caller.
fn refused(
    decision: Decision,
    code: ReasonCode,
    detail: impl Into<std::borrow::Cow<'static, str>>,
) -> Decision {
    let Decision {
        route,
        rule,
        identity,
        ..
    } = decision;
    Decision::new(code, detail)
        .with_route(route)
        .with_rule(rule)
        .with_identity(identity)
}

/// `decision` (a grant) let through by `pre_approve[index]`, as its detail says.
fn allowed_by_pre_approval(decision: Decision, index: usize) -> Decision {
    let detail = format!(
        "{}; pre-approved by policy (pre_approve[{index}])",
        decision.detail
    );
    Decision {
        detail: detail.into(),
        ..decision
    }
}

fn state_deny(decision: Decision, e: &StateError) -> Decision {
    let detail = format!(
        "this action needs approval and the approval state cannot be checked ({e}); denied"
    );
    refused(decision, ReasonCode::StateUnavailable, detail)
}

fn approval_deny(decision: Decision, id: &str, detail: String) -> Decision {
    refused(decision, ReasonCode::ApprovalRequired, detail)
        .with_header(APPROVAL_ID_HEADER, id.to_string())
        .with_body_field("approval_id", id.to_string())
}

impl Approvals {
    pub fn new(config: &Config, state: Arc<dyn StateStore>) -> Self {
        Self {
            state,
            policies: super::compile(&config.file.routes),
            dry_run_policies: config
                .file
                .dry_run
                .as_ref()
                .map(|d| super::compile(&d.routes))
                .unwrap_or_default(),
            dry_run_routes: config
                .file
                .dry_run
                .iter()
                .flat_map(|d| d.routes.iter().map(|r| r.id.clone()))
                .collect(),
            request_ttl: config.file.approvals.request_ttl.get(),
            max_new_requests: config.file.approvals.max_new_requests,
            adopt_after: ADOPT_AFTER
                .max(config.file.state.timeout.get().saturating_mul(10))
                .min(config.file.approvals.request_ttl.get() / 2),
            audit: AuditSink::disabled(),
            webhook: config
                .file
                .approvals
                .webhook
                .as_ref()
                .map(|w| super::webhook::Webhook::new(w, config.file.approvals.link_base.clone())),
        }
    }

    /// Counts the webhook's notifications in `metrics`.
    pub fn count_webhook_in(&mut self, metrics: &crate::admin::metrics::Metrics) {
        if let Some(hook) = &mut self.webhook {
            hook.count_in(metrics);
        }
    }

    /// Never notify the webhook (policy tests open requests that nobody should be told of).
    pub fn without_webhook(&mut self) {
        self.webhook = None;
    }

    /// Sends approval events to `audit`.
    pub fn set_audit(&mut self, audit: AuditSink) {
        self.audit = audit;
    }

    /// True when some rule requires approval.
    pub fn any(&self) -> bool {
        !self.policies.is_empty()
    }

    pub fn policy(&self, route: &str, rule: &str) -> Option<&Arc<ApprovalPolicy>> {
        self.policies.get(&(route.to_string(), rule.to_string()))
    }

    /// The approval stage for an allow of the `dry_run` candidate (`would`), without touching
    /// state: a dry run neither opens an approval request nor spends one. When the live
    /// request went through the same approval (same route and rule, both with `approval:`),
    /// its outcome is the candidate's; otherwise a pre-approval that holds lets it pass, and
    /// anything else is `approval_required`.
    pub fn dry_run_gate(&self, live: &Decision, would: Decision, now: i64) -> Decision {
        if would.code != ReasonCode::Allowed {
            return would;
        }
        let (Some(route), Some(rule)) = (would.route.as_deref(), would.rule.as_deref()) else {
            return would;
        };
        let candidate = match self.dry_run_routes.iter().any(|id| id == route) {
            true => self
                .dry_run_policies
                .get(&(route.to_string(), rule.to_string())),
            false => self.policy(route, rule),
        };
        let Some(policy) = candidate.cloned() else {
            return would;
        };
        let pre_approved = would
            .identity
            .as_deref()
            .and_then(|who| policy.pre_approved(who, now));
        if let Some(index) = pre_approved {
            return allowed_by_pre_approval(would, index);
        }
        // The live request met the same requirement (same route, rule and approval policy,
        // whose pre-approvals then did not hold for this caller either): the candidate
        // meets it as the live request did, an approval used, a request opened, or the cap
        // on new requests (a 429 without a configured limit's `rate_limit`).
        let same = live.route == would.route
            && live.rule == would.rule
            && self.policy(route, rule).is_some_and(|p| **p == *policy);
        let live_cap = live.code == ReasonCode::RateLimited && !live.is_configured_rate_limit();
        // A store or audit log the live gate found refusing refuses the candidate too.
        if same
            && (matches!(
                live.code,
                ReasonCode::Allowed
                    | ReasonCode::ApprovalRequired
                    | ReasonCode::StateUnavailable
                    | ReasonCode::AuditUnavailable
            ) || live_cap)
        {
            return Decision {
                code: live.code,
                detail: live.detail.clone(),
                ..would
            };
        }
        let detail = format!(
            "this action needs approval by {} (a dry run requests none)",
            policy.approvers_text()
        );
        refused(would, ReasonCode::ApprovalRequired, detail)
    }

    /// The stage after a grant: an allow by a rule with `approval:` passes only when a
    /// pre-approval holds or an approval has a use left; otherwise it becomes a deny that
    /// carries the (new or pending) approval id.
    pub async fn gate(&self, req: &RequestView<'_>, decision: Decision, now: i64) -> Decision {
        if decision.code != ReasonCode::Allowed {
            return decision;
        }
        let (Some(route), Some(rule)) = (decision.route.as_deref(), decision.rule.as_deref())
        else {
            return decision;
        };
        let Some(policy) = self.policy(route, rule).cloned() else {
            return decision;
        };
        let Some(identity) = decision.identity.clone() else {
            return Decision::new(ReasonCode::Internal, "approval without an identity")
                .with_route(decision.route.clone());
        };
        if identity.subject.is_empty() {
            let detail = "this action needs approval, which needs a token with a subject (`sub`)";
            return refused(decision, ReasonCode::ApprovalRequired, detail);
        }
        let body = req.header(BODY_SHA256_HEADER);
        let fp = fingerprint(&identity, &policy, req, body);

        if let Some(index) = policy.pre_approved(&identity, now) {
            self.record_pre_approval(&policy, &identity, req, &fp, index, now)
                .await;
            return allowed_by_pre_approval(decision, index);
        }
        // An approval binds the body's digest. Of a body cut short, it would bind only the
        // part Envoy sent, and cover every body that starts the same way: nothing is opened.
        // (A client sending the header itself only refuses its own request.)
        if req
            .header(PARTIAL_BODY_HEADER)
            .is_some_and(|v| v.trim().eq_ignore_ascii_case("true"))
        {
            let detail = "this action needs approval, and an approval covers the whole request \
                          body, but only part of it reached the authorizer (the body is larger \
                          than the gateway forwards)";
            return refused(decision, ReasonCode::ApprovalRequired, detail);
        }

        // An approval is spent only on a request that can be allowed: while the audit log
        // refuses records, the allow would become an `audit_unavailable` deny after the use
        // was taken, and the approver would have to approve again.
        if self.audit.refusing() {
            return refused(
                decision,
                ReasonCode::AuditUnavailable,
                "the audit log takes no records, so no approval is spent on this request; \
                 retry once it does",
            );
        }
        match self.state.take_one(&key_grant(&fp)).await {
            Ok(Some(left)) => {
                // The use is spent and the request allowed whatever this read answers; only
                // the approval's name for the audit log is at stake. Never an empty one.
                let id = match self.state.get(&key_grant_id(&fp)).await {
                    Ok(Some(id)) => id,
                    outcome => {
                        let why = match outcome {
                            Err(e) => e.to_string(),
                            Ok(_) => "no id is recorded for the grant".to_string(),
                        };
                        tracing::warn!(
                            error = %why,
                            "an approval was used but its id could not be read; audited as `unknown`"
                        );
                        "unknown".to_string()
                    }
                };
                let mut record = self.record_for(&policy, &identity, req, &fp, now);
                record.id = id.clone();
                let mut event = ApprovalEvent::new("used", &record);
                event.uses_left = Some(left);
                self.audit.record_approval(event);
                if left == 0 {
                    // Spent, so it ends here: the sweep must not also log it as `expired`
                    // when its time is up (best effort: at worst that event is written).
                    // Outlives the record, which the sweep reads until it is gone.
                    let _ = self
                        .state
                        .insert_if_absent(&key_expired(&id), "1", policy.ttl + RECORD_GRACE * 2)
                        .await;
                }
                let detail = format!("{}; approved (`{id}`, {left} use(s) left)", decision.detail);
                return Decision {
                    detail: detail.into(),
                    ..decision
                };
            }
            Ok(None) => {}
            Err(e) => return state_deny(decision, &e),
        }

        // No usable approval: find the pending request for this action, or open one.
        let fresh = new_id();
        for _ in 0..3 {
            match self
                .state
                .insert_if_absent(&key_req(&fp), &fresh, self.request_ttl)
                .await
            {
                Ok(true) => {
                    if let Some(refusal) = self
                        .over_new_request_cap(&decision, &identity, &fp, &fresh)
                        .await
                    {
                        return refusal;
                    }
                    let mut record = self.record_for(&policy, &identity, req, &fp, now);
                    record.id = fresh.clone();
                    match self
                        .open(&decision, &policy, &record, self.request_ttl, now)
                        .await
                    {
                        Some(answer) => return answer,
                        None => continue,
                    }
                }
                Ok(false) => {}
                Err(e) => {
                    // The slot may have been taken all the same (a timeout after Redis wrote
                    // it): released if it still holds this id (best effort: a write on the
                    // same connection lands after the late one), else adopted by a retry.
                    let _ = self.state.delete_if(&key_req(&fp), &fresh).await;
                    return state_deny(decision, &e);
                }
            }
            let id = match self.state.get(&key_req(&fp)).await {
                Ok(Some(id)) => id,
                // Decided or expired between the two calls: try to open a new one.
                Ok(None) => continue,
                Err(e) => return state_deny(decision, &e),
            };
            let record = match self.state.get(&key_rec(&id)).await {
                Ok(r) => r.as_deref().and_then(Record::from_json),
                Err(e) => return state_deny(decision, &e),
            };
            let Some(record) = record else {
                // The slot is taken but its record is not written: either another request
                // for this action is opening it (the record is written right after the slot,
                // and outlives it), and may still be refused (the cap, a store error), or
                // its opener failed after the slot landed (a timeout) and will never write
                // it. The first is short: name no id that may never exist. A slot older
                // than any opening takes is the second: adopt it, or the action would be
                // refused, with no request anyone can approve, until the slot expires.
                let left = match self.state.ttl_left(&key_req(&fp)).await {
                    Ok(Some(left)) => left,
                    Ok(None) => continue,
                    Err(e) => return state_deny(decision, &e),
                };
                if self.request_ttl.saturating_sub(left) >= self.adopt_after {
                    if let Some(refusal) = self
                        .over_new_request_cap(&decision, &identity, &fp, &id)
                        .await
                    {
                        return refusal;
                    }
                    let mut record = self.record_for(&policy, &identity, req, &fp, now);
                    record.id = id.clone();
                    record.expires_at = now.saturating_add(secs(left));
                    match self.open(&decision, &policy, &record, left, now).await {
                        Some(answer) => return answer,
                        None => continue,
                    }
                }
                let detail = format!(
                    "this action needs approval by {}; a request for it is being opened, retry \
                     in a moment for its id",
                    policy.approvers_text()
                );
                return refused(decision, ReasonCode::ApprovalRequired, detail);
            };
            let detail = match record {
                r if r.state == ApprovalState::Rejected => format!(
                    "approval `{id}` was rejected by `{}`{}; a new request can be made after it expires",
                    super::shown(r.decided_by.as_deref().unwrap_or("an approver")),
                    r.reason
                        .as_deref()
                        .map(|why| format!(": {why}"))
                        .unwrap_or_default()
                ),
                _ => format!(
                    "this action needs approval by {}; request `{id}` is pending",
                    policy.approvers_text()
                ),
            };
            return approval_deny(decision, &id, detail);
        }
        state_deny(
            decision,
            &StateError::Unavailable("approval request keeps changing".to_string()),
        )
    }

    /// Spends one of the caller's new requests; `Some` refusal (a 429, or a 503 when the
    /// store fails) when none is left, after releasing the request slot of `fp` (when it
    /// still holds `id`).
    async fn over_new_request_cap(
        &self,
        decision: &Decision,
        identity: &Identity,
        fp: &str,
        id: &str,
    ) -> Option<Decision> {
        let n = self.max_new_requests.max(1);
        let limit = RateLimit {
            requests: n,
            per: self.request_ttl,
            burst: n,
        };
        let key = format!(
            "approval:new:{}",
            sha256_hex(format!("{}\n{}", identity.issuer_name, identity.subject).as_bytes())
        );
        let refusal = match self.state.rate_check(&key, limit).await {
            Ok(o) if o.allowed => return None,
            Ok(o) => {
                let retry = o.retry_after.unwrap_or(Duration::from_secs(1));
                let secs = crate::ratelimit::ceil_secs(retry).max(1);
                let detail = format!(
                    "this caller opened {n} approval requests within {}; a new one can be made \
                     in {}s, or ask an approver about the pending ones",
                    humantime::format_duration(self.request_ttl),
                    secs
                );
                refused(decision.clone(), ReasonCode::RateLimited, detail)
                    .with_header("retry-after", secs.to_string())
            }
            Err(e) => state_deny(decision.clone(), &e),
        };
        // Best effort: a slot left behind is adopted by a later retry.
        let _ = self.state.delete_if(&key_req(fp), id).await;
        Some(refusal)
    }

    /// Writes the pending `record` of a request whose slot this caller holds (just taken, or
    /// adopted), for `left` (what its slot has left) and then `RECORD_GRACE`, and answers with
    /// its id. Its `requested` event and the webhook come once: from the caller whose write
    /// stored the record. `None` when another caller stored it first (look again: it may be
    /// decided by now).
    async fn open(
        &self,
        decision: &Decision,
        policy: &ApprovalPolicy,
        record: &Record,
        left: Duration,
        now: i64,
    ) -> Option<Decision> {
        let ttl = left + RECORD_GRACE;
        let json = record.to_json();
        // Listed first, so a record is never stored unlisted.
        let stored = match self
            .state
            .index_add(
                APPROVAL_INDEX,
                &record.id,
                now.saturating_add(secs(ttl)).saturating_add(1),
            )
            .await
        {
            Ok(_) => {
                self.state
                    .insert_if_absent(&key_rec(&record.id), &json, ttl)
                    .await
            }
            Err(e) => Err(e),
        };
        match stored {
            Ok(true) => {}
            Ok(false) => return None,
            Err(e) => {
                // Best effort, each only if it is still this caller's write (a late one lands
                // first): a record that landed would be a request nobody was told of, a slot
                // left behind would name a request no approver can see (until a retry
                // adopts it).
                if self
                    .state
                    .delete_if(&key_rec(&record.id), &json)
                    .await
                    .is_err()
                {
                    // Neither written for sure nor withdrawn: the record may be listed and
                    // approved, so it gets its `requested` line, saying what is known. An
                    // extra line for a request that never landed beats an approval of one
                    // the log never saw requested.
                    let mut event = ApprovalEvent::new("requested", record);
                    event.reason = Some(UNCONFIRMED_REQUEST.to_string());
                    self.audit.record_approval(event);
                }
                let _ = self
                    .state
                    .delete_if(&key_req(&record.fingerprint), &record.id)
                    .await;
                return Some(state_deny(decision.clone(), &e));
            }
        }
        self.audit
            .record_approval(ApprovalEvent::new("requested", record));
        if let Some(hook) = &self.webhook {
            hook.notify(record);
        }
        let detail = format!(
            "this action needs approval by {}; request `{}` is pending",
            policy.approvers_text(),
            record.id
        );
        Some(approval_deny(decision.clone(), &record.id, detail))
    }

    fn record_for(
        &self,
        policy: &ApprovalPolicy,
        identity: &Identity,
        req: &RequestView<'_>,
        fp: &str,
        now: i64,
    ) -> Record {
        let query = query_of(req.path);
        Record {
            id: String::new(),
            state: ApprovalState::Pending,
            fingerprint: fp.to_string(),
            issuer_name: identity.issuer_name.to_string(),
            issuer: identity.issuer.clone(),
            subject: identity.subject.clone(),
            method: req.method.to_string(),
            host: normal_host(req.host),
            path: display_path(req.path).to_string(),
            body_sha256: req.header(BODY_SHA256_HEADER).map(str::to_string),
            query: query.map(query_shape),
            query_sha256: query.map(|q| sha256_hex(q.as_bytes())),
            justification: justification(req),
            route: policy.route.to_string(),
            rule: policy.rule.to_string(),
            requested_at: now,
            expires_at: now.saturating_add(secs(self.request_ttl)),
            decided_by: None,
            decided_at: None,
            reason: None,
            uses: policy.uses,
            grant_expires_at: None,
        }
    }

    /// A pre-approval is recorded in the audit log for every request it allows, and (best
    /// effort: the allow does not depend on shared state) as a listed record: one per action
    /// (fingerprint) per `RECORD_GRACE`, so steady pre-approved traffic costs one write that
    /// changes nothing, not a record per request.
    async fn record_pre_approval(
        &self,
        policy: &ApprovalPolicy,
        identity: &Identity,
        req: &RequestView<'_>,
        fp: &str,
        index: usize,
        now: i64,
    ) {
        let mut record = self.record_for(policy, identity, req, fp, now);
        record.id = pre_approval_id(fp);
        record.state = ApprovalState::PreApproved;
        record.decided_by = Some(format!("policy:pre_approve[{index}]"));
        record.decided_at = Some(now);
        // What a listing shows as "until": when the pre-approval stops allowing this action
        // (its window's end; none when open-ended). It was `now`, a past time in any listing.
        record.grant_expires_at = policy.pre_approve.get(index).and_then(|p| p.until);
        let mut event = ApprovalEvent::new("pre_approved", &record);
        event.actor = record.decided_by.clone();
        self.audit.record_approval(event);
        let first = self
            .state
            .insert_if_absent(&key_rec(&record.id), &record.to_json(), RECORD_GRACE)
            .await;
        if first == Ok(true) {
            let expires_at = now.saturating_add(secs(RECORD_GRACE)).saturating_add(1);
            let listed = self
                .state
                .index_add(APPROVAL_INDEX, &record.id, expires_at)
                .await;
            if listed.is_err() {
                // Never a record nobody can list: the next request writes both again.
                let _ = self.state.delete(&key_rec(&record.id)).await;
            }
        }
    }

    /// Writes a record for `ttl`, and lists it in the index `list` and `sweep` read (first,
    /// so a record is never stored unlisted; a listed id whose record is gone is skipped).
    async fn store_record(
        &self,
        record: &Record,
        ttl: Duration,
        now: i64,
    ) -> Result<(), StateError> {
        self.state
            .index_add(
                APPROVAL_INDEX,
                &record.id,
                now.saturating_add(secs(ttl)).saturating_add(1),
            )
            .await?;
        self.state
            .set(&key_rec(&record.id), &record.to_json(), ttl)
            .await
    }

    /// The records the index lists that are still stored.
    async fn records(&self, now: i64) -> Result<Vec<Record>, StateError> {
        let ids: Vec<String> = self
            .state
            .index_list(APPROVAL_INDEX, now)
            .await?
            .into_iter()
            .map(|(id, _)| key_rec(&id))
            .collect();
        Ok(self
            .state
            .get_many(&ids)
            .await?
            .into_iter()
            .flatten()
            .filter_map(|v| Record::from_json(&v))
            .collect())
    }

    async fn load(&self, id: &str) -> Result<Record, ApprovalError> {
        if !valid_id(id) {
            return Err(ApprovalError::NotFound(id.to_string()));
        }
        let text = self
            .state
            .get(&key_rec(id))
            .await?
            .ok_or_else(|| ApprovalError::NotFound(id.to_string()))?;
        Record::from_json(&text).ok_or_else(|| StateError::corrupt(&key_rec(id)).into())
    }

    /// Checks that `who` may decide `record` now, and claims the one decision it gets.
    /// Returns the policy and the claim: the value stored for this attempt only, which
    /// `release` needs to remove it.
    async fn claim(
        &self,
        record: &Record,
        who: &Identity,
        now: i64,
    ) -> Result<(Arc<ApprovalPolicy>, String), ApprovalError> {
        let id = record.id.clone();
        let policy = self
            .policy(&record.route, &record.rule)
            .cloned()
            .ok_or_else(|| ApprovalError::NotApprover(id.clone()))?;
        if !policy.is_approver(who) {
            return Err(ApprovalError::NotApprover(id));
        }
        if is_self(record, who) {
            return Err(ApprovalError::SelfApproval(id));
        }
        if record.state != ApprovalState::Pending {
            return Err(ApprovalError::AlreadyDecided {
                id,
                state: record.state.as_str(),
            });
        }
        if record.expires_at <= now {
            return Err(ApprovalError::Expired(id));
        }
        // INVARIANT: exactly one approve or reject wins per request, across replicas.
        // The claim names its attempt, so releasing it never removes another's.
        let claim = format!("{} {}", actor(who), new_id());
        if self.take_claim(&id, &claim).await? {
            return Ok((policy, claim));
        }
        // Name the state the record is in: still pending means the other decision has not
        // written it yet, or never will.
        match self.load(&id).await?.state {
            ApprovalState::Pending => {}
            state => {
                return Err(ApprovalError::AlreadyDecided {
                    id,
                    state: state.as_str(),
                });
            }
        }
        // A decision whose claim is older than `adopt_after` with the request still pending
        // never finished (its process died or its call was cancelled, or it failed and could
        // not release the claim while the store was down): a decision takes a few store
        // operations, each bounded by the store's timeout. Taken over, or the request could
        // be decided by nobody until it expired. Only the claim read here is removed, so of
        // several approvers taking over at once one wins. The claim's age is read from the
        // store's clock (what its lifetime has left), as for an orphaned request slot: a
        // replica whose clock runs ahead must never find a fresh claim stale.
        let key = key_decided(&id);
        let held = self.state.get(&key).await?;
        let lifetime = self.request_ttl + RECORD_GRACE;
        let stale = match self.state.ttl_left(&key).await? {
            Some(left) => lifetime.saturating_sub(left) >= self.adopt_after,
            None => false,
        };
        if let Some(held) = held.filter(|_| stale)
            && self.state.delete_if(&key, &held).await?
        {
            let holder = held.rsplit_once(' ').map_or("", |(actor, _)| actor);
            tracing::warn!(
                approval.id = %id,
                holder,
                "took over the decision of a pending approval request whose earlier decision never finished"
            );
            if self.take_claim(&id, &claim).await? {
                return Ok((policy, claim));
            }
        }
        Err(ApprovalError::BeingDecided(id))
    }

    /// Claims the decision of request `id` with `claim`: `true` when this call got it.
    async fn take_claim(&self, id: &str, claim: &str) -> Result<bool, ApprovalError> {
        match self
            .state
            .insert_if_absent(&key_decided(id), claim, self.request_ttl + RECORD_GRACE)
            .await
        {
            Ok(first) => Ok(first),
            Err(e) => {
                // The claim may have landed all the same (a timeout after Redis wrote it):
                // released, or the request would be "being decided" until it is taken over.
                self.release(id, claim).await;
                Err(e.into())
            }
        }
    }

    /// Releases the decision of request `id` when `claim` still holds it (best effort; a
    /// write on the same connection lands after a late claim), so it can be decided again.
    async fn release(&self, id: &str, claim: &str) {
        let _ = self.state.delete_if(&key_decided(id), claim).await;
    }

    /// Approves a pending request: the requester's same action is allowed `uses` times
    /// within `ttl` (the rule's, or a shorter one).
    pub async fn approve(
        &self,
        who: &Identity,
        id: &str,
        ttl: Option<Duration>,
        now: i64,
    ) -> Result<Record, ApprovalError> {
        let mut record = self.load(id).await?;
        if let (Some(asked), Some(policy)) = (ttl, self.policy(&record.route, &record.rule)) {
            if asked.is_zero() {
                return Err(ApprovalError::InvalidTtl("must be greater than 0".into()));
            }
            if asked > policy.ttl {
                return Err(ApprovalError::InvalidTtl(format!(
                    "`{}` is longer than the rule's {}",
                    humantime::format_duration(asked),
                    humantime::format_duration(policy.ttl)
                )));
            }
        }
        let (policy, claim) = self.claim(&record, who, now).await?;
        let ttl = ttl.unwrap_or(policy.ttl).max(Duration::from_secs(1));
        let fp = record.fingerprint.clone();
        let pending = record.clone();
        record.state = ApprovalState::Approved;
        record.decided_by = Some(actor(who));
        record.decided_at = Some(now);
        record.uses = policy.uses;
        record.grant_expires_at = Some(now.saturating_add(secs(ttl)));
        // INVARIANT: the record first, the usable grant last. Until the grant is written,
        // nothing allows; a step that fails is undone (best effort) back to a pending request
        // whose decision is released, so the approver (or another) can decide it again.
        if let Err(e) = self.store_record(&record, ttl + RECORD_GRACE, now).await {
            self.undo_decision(&pending, &claim, now).await;
            return Err(e.into());
        }
        if let Err(e) = self.state.set(&key_grant_id(&fp), &record.id, ttl).await {
            let _ = self.state.delete(&key_grant_id(&fp)).await;
            self.undo_decision(&pending, &claim, now).await;
            return Err(e.into());
        }
        if let Err(e) = self
            .state
            .set(&key_grant(&fp), &policy.uses.to_string(), ttl)
            .await
        {
            // The write may have landed all the same (a timeout after Redis applied it).
            if self.state.delete(&key_grant(&fp)).await.is_err() {
                // It may be usable and cannot be taken back: leave the request approved,
                // as its record says, and log the approval, so nothing that may be used
                // goes unlisted or unaudited.
                self.approved(&record, policy.uses).await;
                return Err(e.into());
            }
            let _ = self.state.delete(&key_grant_id(&fp)).await;
            self.undo_decision(&pending, &claim, now).await;
            return Err(e.into());
        }
        self.approved(&record, policy.uses).await;
        Ok(record)
    }

    /// The approval `record` is in force: its `approved` event, and its action's pending
    /// slot released, so the next request after the uses are spent asks anew (best effort:
    /// the approval is in force and logged whatever this answers).
    async fn approved(&self, record: &Record, uses: u32) {
        let mut event = ApprovalEvent::new("approved", record);
        event.actor = record.decided_by.clone();
        event.uses_left = Some(i64::from(uses));
        self.audit.record_approval(event);
        let _ = self
            .state
            .delete_if(&key_req(&record.fingerprint), &record.id)
            .await;
    }

    /// Best effort, after an approval failed before its grant was written or a rejection
    /// failed to be stored: `pending` is stored again (the decided record may have been
    /// written, or land late: writes on one connection are applied in order, so this one
    /// lands after it) and the decision `claim` is released, so the request can be decided
    /// again.
    async fn undo_decision(&self, pending: &Record, claim: &str, now: i64) {
        let left = Duration::from_secs(u64::try_from(pending.expires_at - now).unwrap_or(0).max(1));
        let _ = self.store_record(pending, left + RECORD_GRACE, now).await;
        self.release(&pending.id, claim).await;
    }

    /// Rejects a pending request: retries are refused (naming the rejection) until the
    /// request expires.
    pub async fn reject(
        &self,
        who: &Identity,
        id: &str,
        reason: Option<String>,
        now: i64,
    ) -> Result<Record, ApprovalError> {
        let mut record = self.load(id).await?;
        let (_, claim) = self.claim(&record, who, now).await?;
        let pending = record.clone();
        record.state = ApprovalState::Rejected;
        record.decided_by = Some(actor(who));
        record.decided_at = Some(now);
        record.reason = reason
            .map(|r| r.chars().filter(|&c| displayable(c)).take(500).collect())
            .filter(|r: &String| !r.trim().is_empty());
        let left = Duration::from_secs(u64::try_from(record.expires_at - now).unwrap_or(1));
        if let Err(e) = self.store_record(&record, left + RECORD_GRACE, now).await {
            // The rejected record may have been written all the same (a timeout after Redis
            // applied it), and would be in force unaudited: the pending one is written back
            // and the decision released (best effort), so the request is left pending, as
            // the caller is told, and can be rejected again, or approved.
            self.undo_decision(&pending, &claim, now).await;
            return Err(e.into());
        }
        let mut event = ApprovalEvent::new("rejected", &record);
        event.actor = record.decided_by.clone();
        event.reason = record.reason.clone();
        self.audit.record_approval(event);
        Ok(record)
    }

    /// Requests `who` may decide (never their own): pending ones, or all when
    /// `include_decided`. Oldest first.
    pub async fn list(
        &self,
        who: &Identity,
        include_decided: bool,
        now: i64,
    ) -> Result<Vec<Record>, ApprovalError> {
        let mut out: Vec<Record> = self
            .records(now)
            .await?
            .into_iter()
            .filter(|r| {
                self.policy(&r.route, &r.rule)
                    .is_some_and(|p| p.is_approver(who))
                    && !is_self(r, who)
                    && (include_decided
                        || (r.state == ApprovalState::Pending && r.expires_at > now))
            })
            .collect();
        out.sort_by(|a, b| (a.requested_at, &a.id).cmp(&(b.requested_at, &b.id)));
        Ok(out)
    }

    /// The uses each of `records` has left, for an approval whose grant is in force (its
    /// time not up): what its grant counter holds, 0 once a newer approval of the same action
    /// took the counter (one opens only after this one's uses are spent). `None` for any
    /// other record, and where the counter is gone while the record says it is in force (a
    /// store that lost it; an approval being written). One read of shared state for all.
    pub async fn uses_left(
        &self,
        records: &[Record],
        now: i64,
    ) -> Result<Vec<Option<u32>>, ApprovalError> {
        let in_force = |r: &Record| {
            r.state == ApprovalState::Approved && r.grant_expires_at.is_some_and(|t| t > now)
        };
        let keys: Vec<String> = records
            .iter()
            .filter(|r| in_force(r))
            .flat_map(|r| [key_grant_id(&r.fingerprint), key_grant(&r.fingerprint)])
            .collect();
        if keys.is_empty() {
            return Ok(vec![None; records.len()]);
        }
        let mut values = self.state.get_many(&keys).await?.into_iter();
        Ok(records
            .iter()
            .map(|r| {
                if !in_force(r) {
                    return None;
                }
                let (id, left) = (values.next().flatten(), values.next().flatten());
                match id {
                    Some(id) if id == r.id => left.and_then(|l| l.parse().ok()),
                    Some(_) => Some(0),
                    None => None,
                }
            })
            .collect())
    }

    /// Writes an `expired` audit event, once across replicas, for each pending request and
    /// each approval whose time is up with uses left. Run periodically by the server.
    pub async fn sweep(&self, now: i64) -> Result<usize, StateError> {
        let mut n = 0;
        for r in self.records(now).await? {
            let over = match r.state {
                ApprovalState::Pending => r.expires_at <= now,
                ApprovalState::Approved => r.grant_expires_at.is_some_and(|t| t <= now),
                _ => false,
            };
            if over
                && self
                    .state
                    .insert_if_absent(&key_expired(&r.id), "1", RECORD_GRACE * 2)
                    .await?
            {
                self.audit
                    .record_approval(ApprovalEvent::new("expired", &r));
                n += 1;
            }
        }
        Ok(n)
    }
}

/// How an approver is named in records: `issuer-name:sub`.
fn actor(who: &Identity) -> String {
    format!("{}:{}", who.issuer_name, who.subject)
}

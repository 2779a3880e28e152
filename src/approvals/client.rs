//! `portcullis approvals list|approve|reject`: a gRPC client of the approvals API. The
//! token is sent as `authorization: Bearer` metadata and never printed.

use clap::{Args, Subcommand};

use super::api::pb::{self, approvals_client::ApprovalsClient};

#[derive(Debug, Args)]
pub struct ApprovalsArgs {
    /// The Portcullis gRPC listener.
    #[arg(long, global = true, default_value = "127.0.0.1:9191")]
    pub server: String,
    /// Your bearer token (an identity holding an approver role).
    #[arg(long, global = true, env = "PORTCULLIS_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// Print JSON instead of text.
    #[arg(long, global = true)]
    pub json: bool,
    #[command(subcommand)]
    pub action: ApprovalsAction,
}

#[derive(Debug, Subcommand)]
pub enum ApprovalsAction {
    /// Requests you may decide (pending ones; `--all` for decided ones too).
    List {
        #[arg(long)]
        all: bool,
    },
    /// Approve one request, optionally for less time than the rule allows.
    Approve {
        id: String,
        /// e.g. `5m`; at most the rule's ttl.
        #[arg(long)]
        ttl: Option<String>,
    },
    /// Reject one request.
    Reject {
        id: String,
        #[arg(long)]
        reason: Option<String>,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("{0}")]
    Usage(String),
    #[error("cannot reach portcullis at `{server}`: {message}")]
    Connect { server: String, message: String },
    #[error("{code}: {message}")]
    Refused { code: String, message: String },
}

/// Runs one approvals command and returns what to print.
pub async fn run(args: &ApprovalsArgs) -> Result<String, ClientError> {
    let token = args
        .token
        .as_deref()
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .ok_or_else(|| ClientError::Usage("pass --token (or set PORTCULLIS_TOKEN)".to_string()))?;
    let url = if args.server.contains("://") {
        args.server.clone()
    } else {
        format!("http://{}", args.server)
    };
    let mut client = ApprovalsClient::connect(url)
        .await
        .map_err(|e| ClientError::Connect {
            server: args.server.clone(),
            message: e.to_string(),
        })?;
    let auth: tonic::metadata::MetadataValue<tonic::metadata::Ascii> = format!("Bearer {token}")
        .parse()
        .map_err(|_| ClientError::Usage("the token is not valid metadata text".to_string()))?;
    fn authed<T>(
        body: T,
        auth: &tonic::metadata::MetadataValue<tonic::metadata::Ascii>,
    ) -> tonic::Request<T> {
        let mut r = tonic::Request::new(body);
        r.metadata_mut().insert("authorization", auth.clone());
        r
    }
    let refused = |s: tonic::Status| ClientError::Refused {
        code: format!("{:?}", s.code()),
        message: s.message().to_string(),
    };
    match &args.action {
        ApprovalsAction::List { all } => {
            let reply = client
                .list(authed(
                    pb::ListRequest {
                        include_decided: *all,
                    },
                    &auth,
                ))
                .await
                .map_err(refused)?
                .into_inner();
            if args.json {
                let items: Vec<_> = reply.approvals.iter().map(to_json).collect();
                return Ok(format!("{}\n", serde_json::Value::Array(items)));
            }
            if reply.approvals.is_empty() {
                return Ok("no approval requests\n".to_string());
            }
            Ok(reply.approvals.iter().map(line).collect())
        }
        ApprovalsAction::Approve { id, ttl } => {
            let reply = client
                .approve(authed(
                    pb::ApproveRequest {
                        id: id.clone(),
                        ttl: ttl.clone().unwrap_or_default(),
                    },
                    &auth,
                ))
                .await
                .map_err(refused)?
                .into_inner();
            Ok(show(args.json, "approved", reply.approval))
        }
        ApprovalsAction::Reject { id, reason } => {
            let reply = client
                .reject(authed(
                    pb::RejectRequest {
                        id: id.clone(),
                        reason: reason.clone().unwrap_or_default(),
                    },
                    &auth,
                ))
                .await
                .map_err(refused)?
                .into_inner();
            Ok(show(args.json, "rejected", reply.approval))
        }
    }
}

fn show(json: bool, verb: &str, approval: Option<pb::Approval>) -> String {
    match approval {
        Some(a) if json => format!("{}\n", to_json(&a)),
        Some(a) => format!("{verb}: {}", line(&a)),
        None => format!("{verb}\n"),
    }
}

fn line(a: &pb::Approval) -> String {
    let mut out = format!(
        "{}  {:<12} {} {} {}{}  (route {}, rule {}, uses {}, until {})",
        a.id,
        a.state,
        a.subject,
        a.method,
        a.host,
        a.path,
        a.route,
        a.rule,
        a.uses,
        time(a.expires_at)
    );
    if !a.query.is_empty() {
        out.push_str(&format!(
            "\n    query: ?{}  (values hidden; sha256 of the query: {})",
            a.query, a.query_sha256
        ));
    }
    if !a.body_sha256.is_empty() {
        out.push_str(&format!("\n    body sha256: {}", a.body_sha256));
    }
    if !a.justification.is_empty() {
        out.push_str(&format!("\n    justification: {}", a.justification));
    }
    if !a.decided_by.is_empty() {
        out.push_str(&format!("\n    decided by: {}", a.decided_by));
    }
    if !a.reason.is_empty() {
        out.push_str(&format!("\n    reason: {}", a.reason));
    }
    out.push('\n');
    out
}

fn time(unix: i64) -> String {
    let t =
        std::time::UNIX_EPOCH + std::time::Duration::from_secs(u64::try_from(unix).unwrap_or(0));
    humantime::format_rfc3339_seconds(t).to_string()
}

fn to_json(a: &pb::Approval) -> serde_json::Value {
    serde_json::json!({
        "id": a.id, "state": a.state, "subject": a.subject, "issuer": a.issuer,
        "method": a.method, "host": a.host, "path": a.path, "body_sha256": a.body_sha256,
        "query": a.query, "query_sha256": a.query_sha256,
        "justification": a.justification, "route": a.route, "rule": a.rule,
        "requested_at": a.requested_at, "expires_at": a.expires_at,
        "decided_by": a.decided_by, "decided_at": a.decided_at, "reason": a.reason,
        "uses": a.uses,
    })
}

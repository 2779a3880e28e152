//! `portcullis approvals list|approve|reject`: a gRPC client of the approvals API. The
//! token is sent as `authorization: Bearer` metadata and never printed. Over TLS
//! (`--ca-cert`, and `--cert`/`--key` for a listener that verifies clients) when the
//! listener has `server.tls`.

use std::path::{Path, PathBuf};

use clap::{Args, Subcommand};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

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
    /// CA certificate(s), PEM, that sign the listener's certificate: connect with TLS (for a
    /// listener with `server.tls`). Implied by an `https://` server.
    #[arg(long, global = true, value_name = "FILE")]
    pub ca_cert: Option<PathBuf>,
    /// Client certificate chain, PEM, for a listener that verifies clients
    /// (`server.tls.client_ca`); with `--key`.
    #[arg(long, global = true, value_name = "FILE", requires = "key")]
    pub cert: Option<PathBuf>,
    /// The client certificate's private key, PEM.
    #[arg(long, global = true, value_name = "FILE", requires = "cert")]
    pub key: Option<PathBuf>,
    /// The name the listener's certificate must carry (default: the host of `--server`).
    #[arg(long, global = true, value_name = "NAME")]
    pub tls_server_name: Option<String>,
    #[command(subcommand)]
    pub action: ApprovalsAction,
}

#[derive(Debug, Subcommand)]
pub enum ApprovalsAction {
    /// Requests you may decide (pending ones; `--all` for decided ones too).
    List {
        /// Also list what is no longer pending: expired requests, approvals (in force,
        /// spent or expired), rejections and pre-approvals. A record is kept until about an
        /// hour after its request or approval expired; your own requests are never listed.
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

/// Reads a PEM file the user named; the error names the file, never its contents.
fn read_pem(flag: &str, file: &Path) -> Result<Vec<u8>, ClientError> {
    std::fs::read(file)
        .map_err(|e| ClientError::Usage(format!("--{flag} `{}`: {e}", file.display())))
}

/// The certificates of a PEM file the user named, refused here naming the flag: handed to
/// the TLS client as they are, an unusable file only made the connection fail with
/// "transport error" (or, for the CA, with the server's certificate called untrusted).
fn check_certificates(
    flag: &str,
    file: &Path,
    pem: &[u8],
) -> Result<Vec<CertificateDer<'static>>, ClientError> {
    crate::tls::pem_certificates(pem).ok_or_else(|| {
        ClientError::Usage(format!(
            "--{flag} `{}` holds no PEM certificate",
            file.display()
        ))
    })
}

/// `--cert` and `--key`: a certificate chain, a private key, and the key is the
/// certificate's. Errors name the flag and the file, never key material.
fn check_identity(cert: (&Path, &[u8]), key: (&Path, &[u8])) -> Result<(), ClientError> {
    let certs = check_certificates("cert", cert.0, cert.1)?;
    let der = PrivateKeyDer::from_pem_slice(key.1).map_err(|_| {
        ClientError::Usage(format!(
            "--key `{}` holds no PEM private key",
            key.0.display()
        ))
    })?;
    let provider = rustls::crypto::aws_lc_rs::default_provider();
    rustls::sign::CertifiedKey::from_der(certs, der, &provider).map_err(|e| {
        ClientError::Usage(match e {
            rustls::Error::InconsistentKeys(_) => format!(
                "--key `{}` is not the private key of the certificate in --cert `{}`",
                key.0.display(),
                cert.0.display()
            ),
            _ => format!("--key `{}`: an unusable private key", key.0.display()),
        })
    })?;
    Ok(())
}

fn uses_tls(args: &ApprovalsArgs) -> bool {
    args.ca_cert.is_some() || args.cert.is_some() || args.server.starts_with("https://")
}

/// The channel to `--server`: plain HTTP/2, or TLS when a CA is given or the URL says
/// `https://`.
async fn connect(args: &ApprovalsArgs) -> Result<tonic::transport::Channel, ClientError> {
    use tonic::transport::{Certificate, ClientTlsConfig, Endpoint, Identity};
    let tls = uses_tls(args);
    let url = match args.server.split_once("://") {
        Some(("http", _)) if tls => {
            return Err(ClientError::Usage(
                "TLS options were given for an `http://` server: use `https://` or leave the \
                 scheme out"
                    .to_string(),
            ));
        }
        Some(_) => args.server.clone(),
        None if tls => format!("https://{}", args.server),
        None => format!("http://{}", args.server),
    };
    let unreachable = |message: String| ClientError::Connect {
        server: args.server.clone(),
        message,
    };
    let mut endpoint =
        Endpoint::from_shared(url).map_err(|e| ClientError::Usage(format!("--server: {e}")))?;
    if tls {
        let Some(ca) = &args.ca_cert else {
            return Err(ClientError::Usage(
                "TLS needs --ca-cert FILE: the CA that signs the listener's certificate"
                    .to_string(),
            ));
        };
        let ca_pem = read_pem("ca-cert", ca)?;
        check_certificates("ca-cert", ca, &ca_pem)?;
        let mut config = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(ca_pem));
        if let (Some(cert), Some(key)) = (&args.cert, &args.key) {
            let (cert_pem, key_pem) = (read_pem("cert", cert)?, read_pem("key", key)?);
            check_identity((cert, &cert_pem), (key, &key_pem))?;
            config = config.identity(Identity::from_pem(cert_pem, key_pem));
        }
        if let Some(name) = &args.tls_server_name {
            config = config.domain_name(name.clone());
        }
        endpoint = endpoint
            .tls_config(config)
            .map_err(|e| unreachable(e.to_string()))?;
    }
    endpoint.connect().await.map_err(|e| {
        let mut message = with_causes(&e.to_string(), &e);
        // A plain listener answers a TLS hello with HTTP/2 bytes.
        if tls && message.contains("InvalidContentType") {
            message
                .push_str(" (the listener does not speak TLS: leave out --ca-cert, --cert, --key)");
        }
        unreachable(message)
    })
}

/// `message` followed by the error's causes: tonic's transport errors alone say only
/// "transport error".
fn with_causes(message: &str, error: &dyn std::error::Error) -> String {
    let mut out = message.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let text = cause.to_string();
        if !out.contains(&text) {
            out.push_str(&format!(": {text}"));
        }
        source = cause.source();
    }
    out
}

/// Runs one approvals command and returns what to print.
pub async fn run(args: &ApprovalsArgs) -> Result<String, ClientError> {
    let token = args
        .token
        .as_deref()
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .ok_or_else(|| ClientError::Usage("pass --token (or set PORTCULLIS_TOKEN)".to_string()))?;
    let channel = connect(args).await?;
    // A listing holds every live record (each at most a few KiB): room for thousands.
    let mut client = ApprovalsClient::new(channel).max_decoding_message_size(64 << 20);
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
    let plain = !uses_tls(args);
    let refused = |s: tonic::Status| {
        // A status made by the client's transport (the connection failed or was refused
        // during the call, e.g. a TLS alert), not by Portcullis: name its causes.
        if std::error::Error::source(&s).is_some() || s.message().contains("h2 protocol error") {
            let mut message = with_causes(s.message(), &s);
            if plain {
                // A TLS listener answers plain HTTP/2 with a TLS alert, which the HTTP/2
                // client reads as a protocol error.
                message.push_str(
                    " (a listener with `server.tls` needs --ca-cert, and --cert/--key when it \
                     verifies clients)",
                );
            } else if args.cert.is_none() {
                // With TLS 1.3 a listener refusing a client without a certificate does so
                // after the handshake, so the client only sees the connection close.
                message.push_str(
                    " (a listener that verifies clients needs --cert and --key, from a CA in \
                     its `client_ca`)",
                );
            } else {
                // The same for a certificate the listener refuses: signed by a CA not in its
                // `client_ca`, or carrying none of its `allowed_client_principals`.
                message.push_str(
                    " (the listener refused this client certificate: it takes one from a CA in \
                     its `client_ca` whose URI SAN matches one of its \
                     `allowed_client_principals`, when it lists any; its log says which)",
                );
            }
            return ClientError::Connect {
                server: args.server.clone(),
                message,
            };
        }
        let mut message = s.message().to_string();
        if s.code() == tonic::Code::Unimplemented {
            let hint = "this listener does not serve the approvals API: when the config sets \
                        `server.approvals_listen`, point --server there";
            message = if message.is_empty() {
                hint.to_string()
            } else {
                format!("{message} ({hint})")
            };
        }
        ClientError::Refused {
            code: format!("{:?}", s.code()),
            message,
        }
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
        "{}  {:<12} {} {} {}{}  (route {}, rule {}{}, {})",
        a.id,
        a.state,
        requester(a),
        a.method,
        super::shown(&a.host),
        super::shown(&a.path),
        a.route,
        a.rule,
        uses(a),
        until(a)
    );
    if !a.query.is_empty() {
        out.push_str(&format!(
            "\n    query: ?{}  (values hidden; sha256 of the query: {})",
            super::shown(&a.query),
            a.query_sha256
        ));
    }
    if !a.body_sha256.is_empty() {
        out.push_str(&format!("\n    body sha256: {}", a.body_sha256));
    }
    if !a.justification.is_empty() {
        out.push_str(&format!("\n    justification: {}", a.justification));
    }
    if !a.decided_by.is_empty() {
        out.push_str(&format!(
            "\n    decided by: {}",
            super::shown(&a.decided_by)
        ));
    }
    if !a.reason.is_empty() {
        out.push_str(&format!("\n    reason: {}", a.reason));
    }
    out.push('\n');
    out
}

/// Who asked, as `decided_by` and the config's `issuer:sub` entries name people: the same
/// `sub` from two issuers is two people. A server older than the `issuer` name sends the
/// `iss` URL there, so only a name is put in front.
fn requester(a: &pb::Approval) -> String {
    let subject = super::shown(&a.subject);
    if a.issuer.is_empty() || a.issuer.contains('/') {
        subject.into_owned()
    } else {
        format!("{}:{subject}", a.issuer)
    }
}

/// The uses part of a line: what a pending request would grant, what an approval has left
/// (when the server said: an approval in force), else what it granted. Nothing for a
/// rejection or a pre-approval (neither grants counted uses).
fn uses(a: &pb::Approval) -> String {
    match (a.state.as_str(), a.uses_left) {
        ("pending", _) => format!(", uses {}", a.uses),
        ("approved", Some(0)) => format!(", uses 0/{} left: spent", a.uses),
        ("approved", Some(left)) => format!(", uses {left}/{} left", a.uses),
        ("approved", None) => format!(", {} use(s) granted", a.uses),
        _ => String::new(),
    }
}

/// When a line's record stops counting: a pre-approval without an end says so, rather than
/// showing the epoch.
fn until(a: &pb::Approval) -> String {
    if a.state == "pre_approved" && a.expires_at == 0 {
        "no end".to_string()
    } else {
        format!("until {}", time(a.expires_at))
    }
}

fn time(unix: i64) -> String {
    let t =
        std::time::UNIX_EPOCH + std::time::Duration::from_secs(u64::try_from(unix).unwrap_or(0));
    humantime::format_rfc3339_seconds(t).to_string()
}

/// An approval as `--json` prints it. What the record does not have is `null`, as in the
/// webhook's payload (the gRPC message can only say `""` or `0`): no query, body or
/// justification, no `iss` (an API key), not decided yet, a pre-approval with no end.
fn to_json(a: &pb::Approval) -> serde_json::Value {
    let text = |s: &str| (!s.is_empty()).then(|| s.to_string());
    let time = |t: i64| (t != 0).then_some(t);
    serde_json::json!({
        "id": a.id, "state": a.state, "subject": a.subject, "issuer": a.issuer,
        "iss": text(&a.iss),
        "method": a.method, "host": a.host, "path": a.path, "body_sha256": text(&a.body_sha256),
        "query": text(&a.query), "query_sha256": text(&a.query_sha256),
        "justification": text(&a.justification), "route": a.route, "rule": a.rule,
        "requested_at": a.requested_at, "expires_at": time(a.expires_at),
        "decided_by": text(&a.decided_by), "decided_at": time(a.decided_at),
        "reason": text(&a.reason), "uses": a.uses, "uses_left": a.uses_left,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A `--ca-cert`, `--cert` or `--key` file the CLI cannot use is refused naming the flag
    /// and the file, before connecting. It used to reach the TLS client as it was, and the
    /// user read "cannot reach portcullis: transport error" (or, for a CA file that holds no
    /// certificate, that the server's certificate has an unknown issuer).
    #[tokio::test]
    async fn unusable_tls_files_are_refused_naming_the_flag() {
        let pki = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/mtls");
        let dir = tempfile::tempdir().unwrap();
        let junk = dir.path().join("junk.pem");
        std::fs::write(&junk, "not a PEM file\n").unwrap();
        let args = |ca: &Path, cert: &Path, key: &Path| ApprovalsArgs {
            // Nothing listens there: every case must fail before connecting.
            server: "127.0.0.1:1".into(),
            token: Some("t".into()),
            json: false,
            ca_cert: Some(ca.to_path_buf()),
            cert: Some(cert.to_path_buf()),
            key: Some(key.to_path_buf()),
            tls_server_name: None,
            action: ApprovalsAction::List { all: false },
        };
        let (ca, cert, key) = (
            pki.join("ca.crt"),
            pki.join("envoy.crt"),
            pki.join("envoy.key"),
        );
        for (args, says) in [
            (args(&junk, &cert, &key), "--ca-cert `"),
            (args(&ca, &junk, &key), "--cert `"),
            (args(&ca, &key, &key), "--cert `"),
            (args(&ca, &cert, &junk), "--key `"),
            (args(&ca, &cert, &cert), "--key `"),
            (
                args(&ca, &cert, &pki.join("checkout.key")),
                "is not the private key of the certificate in --cert `",
            ),
        ] {
            let got = match connect(&args).await {
                Ok(_) => panic!("connected with {args:?}"),
                Err(e) => e.to_string(),
            };
            assert!(got.contains(says), "{args:?}: {got}");
            assert!(!got.contains("transport error"), "{args:?}: {got}");
            assert!(!got.contains("BEGIN"), "no file contents: {got}");
        }
    }

    fn approval(state: &str, uses: u32, uses_left: Option<u32>) -> pb::Approval {
        pb::Approval {
            id: "apr_1".into(),
            state: state.into(),
            subject: "alice".into(),
            issuer: "corp".into(),
            method: "DELETE".into(),
            host: "localhost".into(),
            path: "/databases/staging".into(),
            route: "drop-database".into(),
            rule: "dba".into(),
            uses,
            uses_left,
            expires_at: 1_800_000_000,
            ..Default::default()
        }
    }

    /// A spent approval reads differently from an unused one; where the server did not say
    /// what is left, the line says only what was granted.
    #[test]
    fn a_line_says_what_an_approval_has_left() {
        let uses = |state, n, left| {
            let text = line(&approval(state, n, left));
            let inside = text.split_once("rule dba").unwrap().1;
            inside.split_once(", until").unwrap().0.to_string()
        };
        assert_eq!(uses("pending", 1, None), ", uses 1");
        assert_eq!(uses("approved", 2, Some(2)), ", uses 2/2 left");
        assert_eq!(uses("approved", 1, Some(0)), ", uses 0/1 left: spent");
        assert_eq!(uses("approved", 1, None), ", 1 use(s) granted");
        assert_eq!(uses("rejected", 1, None), "");
        assert_eq!(uses("pre_approved", 1, None), "");
        // An open-ended pre-approval (expires_at 0) says so instead of showing 1970.
        let open_ended = pb::Approval {
            expires_at: 0,
            ..approval("pre_approved", 1, None)
        };
        assert!(
            line(&open_ended).contains("rule dba, no end)"),
            "{}",
            line(&open_ended)
        );
        assert!(
            line(&approval("pre_approved", 1, None))
                .contains("rule dba, until 2027-01-15T08:00:00Z)")
        );
        assert!(
            line(&approval("pending", 1, None)).contains(" pending      corp:alice DELETE "),
            "the requester is named with their issuer"
        );
        // A subject or approver that is not plain text is quoted and escaped: a newline in
        // it printed a second, made-up line.
        let odd = pb::Approval {
            subject: "mallory\napr_0  approved".into(),
            decided_by: "corp:bob\u{202e}".into(),
            ..approval("approved", 1, Some(1))
        };
        let text = line(&odd);
        assert_eq!(text.lines().count(), 2, "{text}");
        assert!(
            text.contains(" corp:\"mallory\\u{a}apr_0  approved\" DELETE ")
                && text.contains("decided by: \"corp:bob\\u{202e}\""),
            "{text}"
        );
        let json = to_json(&approval("approved", 1, Some(0)));
        assert_eq!(
            (json["uses"].clone(), json["uses_left"].clone()),
            (1.into(), 0.into())
        );
    }

    /// `--json` says `null` for what a record does not have, as the webhook does, where it
    /// printed the gRPC message's `""` and `0` (a pre-approval with no end read as expiring
    /// in 1970); what it has is printed as it is.
    #[test]
    fn json_says_null_for_what_the_record_lacks() {
        let absent = [
            "iss",
            "body_sha256",
            "query",
            "query_sha256",
            "justification",
            "decided_by",
            "decided_at",
            "reason",
            "uses_left",
        ];
        let mut open_ended = approval("pre_approved", 1, None);
        open_ended.expires_at = 0;
        let json = to_json(&open_ended);
        for key in absent.iter().chain(&["expires_at"]) {
            assert_eq!(json[key], serde_json::Value::Null, "{key}: {json}");
        }
        assert_eq!(json["subject"], "alice");

        let full = pb::Approval {
            iss: "https://idp.example".into(),
            body_sha256: "ab".into(),
            query: "force=…".into(),
            query_sha256: "cd".into(),
            justification: "INC-1".into(),
            decided_by: "corp:bob".into(),
            decided_at: 1_800_000_100,
            reason: "freeze".into(),
            ..approval("approved", 1, Some(1))
        };
        let json = to_json(&full);
        for key in absent {
            assert!(
                !json[key].is_null() && json[key] != "" && json[key] != 0,
                "{key}: {json}"
            );
        }
        assert_eq!(json["decided_at"], 1_800_000_100);
        assert_eq!(json["expires_at"], 1_800_000_000);
    }
}

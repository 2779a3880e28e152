//! A tiny upstream for trying Portcullis behind Envoy: every request is answered with a JSON
//! document `{method, path, headers}` describing exactly what arrived, so you can see which
//! identity headers Envoy forwarded and that client-sent copies were removed.
//!
//! It is a demonstration tool, not part of the authorization path: it trusts nothing and
//! decides nothing.
//!
//! ```text
//! cargo run --example echo_upstream -- --listen 127.0.0.1:8080
//! ```

use std::net::SocketAddr;

use axum::Router;
use axum::extract::Request;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use clap::Parser;

/// Answers every request with the method, path and headers it received, as JSON.
#[derive(Debug, Parser)]
struct Args {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:8080")]
    listen: SocketAddr,
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let listener = tokio::net::TcpListener::bind(args.listen).await?;
    eprintln!(
        "echo_upstream listening on http://{}",
        listener.local_addr()?
    );
    let app = Router::new().fallback(echo);
    axum::serve(listener, app).await?;
    Ok(())
}

async fn echo(request: Request) -> Response {
    // A header sent twice becomes a list rather than being silently merged, so two copies of
    // an identity header (one from the client, one from Portcullis) would be visible.
    let mut headers = serde_json::Map::new();
    for (name, value) in request.headers() {
        let value = serde_json::Value::String(String::from_utf8_lossy(value.as_bytes()).into());
        match headers.get_mut(name.as_str()) {
            Some(serde_json::Value::Array(values)) => values.push(value),
            Some(first) => *first = serde_json::Value::Array(vec![first.take(), value]),
            None => {
                headers.insert(name.as_str().to_string(), value);
            }
        }
    }
    let body = serde_json::json!({
        "method": request.method().as_str(),
        "path": request
            .uri()
            .path_and_query()
            .map(|p| p.as_str())
            .unwrap_or("/"),
        "headers": headers,
    });
    let text = serde_json::to_string_pretty(&body).unwrap_or_else(|_| "{}".to_string());
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, "application/json")],
        text + "\n",
    )
        .into_response()
}

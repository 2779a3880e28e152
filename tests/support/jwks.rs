//! A loopback JWKS server (`GET /jwks.json`) whose document can be swapped while it runs, and
//! which can be stopped (its port then refuses connections, as a crashed identity provider's
//! does) and started again on the same address.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::http::{HeaderName, HeaderValue};
use axum::response::IntoResponse;

use super::jwt::{Key, jwks};

pub struct JwksServer {
    pub addr: SocketAddr,
    body: Arc<Mutex<String>>,
    /// How many times the document was fetched.
    pub hits: Arc<AtomicUsize>,
    /// Headers set on every answer (over the default `text/plain` content type).
    headers: &'static [(&'static str, &'static str)],
    running: Option<(
        tokio::sync::oneshot::Sender<()>,
        tokio::task::JoinHandle<std::io::Result<()>>,
    )>,
}

impl JwksServer {
    /// Serves the end-to-end `keys`.
    pub async fn start(keys: &[Key]) -> JwksServer {
        JwksServer::start_with(jwks(keys), &[]).await
    }

    /// Serves `body` with `headers` on every answer.
    pub async fn start_with(
        body: String,
        headers: &'static [(&'static str, &'static str)],
    ) -> JwksServer {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut server = JwksServer {
            addr: listener.local_addr().unwrap(),
            body: Arc::new(Mutex::new(body)),
            hits: Arc::new(AtomicUsize::new(0)),
            headers,
            running: None,
        };
        server.serve_on(listener);
        server
    }

    fn serve_on(&mut self, listener: tokio::net::TcpListener) {
        let (b, h, extra) = (self.body.clone(), self.hits.clone(), self.headers);
        let app = axum::Router::new().route(
            "/jwks.json",
            axum::routing::get(move || {
                let (b, h) = (b.clone(), h.clone());
                async move {
                    h.fetch_add(1, Ordering::SeqCst);
                    let mut response = b.lock().unwrap().clone().into_response();
                    for (name, value) in extra {
                        response.headers_mut().insert(
                            HeaderName::from_static(name),
                            HeaderValue::from_static(value),
                        );
                    }
                    response
                }
            }),
        );
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            axum::serve(listener, app)
                .with_graceful_shutdown(async move {
                    let _ = stopped.await;
                })
                .await
        });
        self.running = Some((stop, task));
    }

    /// Stops listening and closes every connection (keep-alive ones included).
    pub async fn stop(&mut self) {
        let (stop, task) = self.running.take().expect("JWKS server is running");
        let _ = stop.send(());
        tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .expect("JWKS server stops within 5s")
            .unwrap()
            .unwrap();
        assert!(
            tokio::net::TcpStream::connect(self.addr).await.is_err(),
            "the stopped JWKS server still accepts connections"
        );
    }

    /// Listens again on the same address.
    pub async fn restart(&mut self) {
        let listener = tokio::net::TcpListener::bind(self.addr).await.unwrap();
        self.serve_on(listener);
    }

    pub fn url(&self) -> String {
        format!("http://{}/jwks.json", self.addr)
    }

    /// Serves `body` from now on.
    pub fn set(&self, body: String) {
        *self.body.lock().unwrap() = body;
    }

    /// Serves the end-to-end `keys` from now on.
    pub fn serve(&self, keys: &[Key]) {
        self.set(jwks(keys));
    }
}

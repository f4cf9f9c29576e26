//! The HTTP listener (`[http]`, default `127.0.0.1:8080`): the admin API
//! (`POST /api/v1`, [`api`]), the operator console (`/`, [`console`]), the
//! live event strip (`GET /api/events`, [`sse`]) and Prometheus metrics
//! (`GET /metrics`, [`metrics`]); logins and sessions in [`auth`].
//!
//! axum's router served by hyper's HTTP/1.1 connections on the broker's
//! tokio runtime, plain and (optionally) TLS with the MQTT listeners'
//! certificate loading. The address is bound without `SO_REUSEPORT`, so a
//! second broker (or anything else) on the same address is refused at
//! start with a message naming it.

pub mod api;
pub mod auth;
pub mod console;
pub mod metrics;
pub mod sse;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use axum::routing::{get, post};
use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinHandle;
use tokio_rustls::TlsAcceptor;

use crate::admin::{Accounts, AdminContext};
use crate::config::HttpSection;
use crate::events::EventBus;
use crate::gate::Gate;
use crate::gateway::{Gateway, TlsConfig};

/// Connections served at once per listener; more wait in the backlog.
const MAX_CONNECTIONS: usize = 1024;
/// Time a client has to send a request's headers (and the TLS handshake).
const HEADER_TIMEOUT: Duration = Duration::from_secs(30);

/// What the handlers share.
pub struct HttpState {
    pub admin: AdminContext,
    pub accounts: Arc<Accounts>,
    pub gate: Arc<Gate>,
    pub events: EventBus,
    pub gateway: Gateway,
    pub config: HttpSection,
    pub sessions: auth::Sessions,
    pub logins: auth::LoginSlots,
}

impl HttpState {
    pub fn new(
        admin: AdminContext,
        accounts: Arc<Accounts>,
        gate: Arc<Gate>,
        events: EventBus,
        gateway: Gateway,
        config: HttpSection,
    ) -> Self {
        let sessions = auth::Sessions::new(Duration::from_secs(config.session_secs));
        HttpState {
            admin,
            accounts,
            gate,
            events,
            gateway,
            config,
            sessions,
            logins: auth::LoginSlots::default(),
        }
    }
}

pub type Shared = Arc<HttpState>;

/// The peer of the connection a request came on.
#[derive(Debug, Clone, Copy)]
pub struct Peer {
    pub addr: SocketAddr,
    /// Came over TLS (cookies are marked `Secure`).
    pub tls: bool,
}

/// Every route.
pub fn router(state: Shared) -> Router {
    let mut r = Router::new()
        .route("/api/v1", post(api::handle))
        .route("/api/login", post(auth::login))
        .route("/api/logout", post(auth::logout))
        .route("/api/session", get(auth::session))
        .route("/api/events", get(sse::events));
    if state.config.metrics {
        r = r.route("/metrics", get(metrics::scrape));
    }
    // Every body extractor (the login's included) stops at the limit;
    // `POST /api/v1` reads its body itself and answers 413 in the envelope.
    let limit = axum::extract::DefaultBodyLimit::max(state.config.max_body_bytes);
    r.merge(console::routes()).layer(limit).with_state(state)
}

/// Bound, not yet serving, HTTP listeners.
pub struct HttpBinding {
    listeners: Vec<(std::net::TcpListener, Option<TlsAcceptor>)>,
}

/// The running HTTP listeners; dropping it stops them.
pub struct HttpServer {
    addrs: Vec<SocketAddr>,
    stop: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
}

impl HttpServer {
    /// Binds `config.bind` (and `config.tls`'s address), so that a taken
    /// address refuses the start before anything else listens.
    pub fn bind(config: &HttpSection) -> anyhow::Result<HttpBinding> {
        let mut binds = vec![(config.bind, None)];
        if let Some(t) = &config.tls {
            let tls = crate::gateway::load_tls(&TlsConfig {
                cert_path: t.cert.clone(),
                key_path: t.key.clone(),
            })
            .with_context(|| format!("http.tls on {}", t.bind))?;
            binds.push((t.bind, Some(tls)));
        }
        let mut listeners = Vec::new();
        for (addr, tls) in binds {
            let l = bind(addr).with_context(|| format!("http listener on {addr}"))?;
            listeners.push((l, tls));
        }
        Ok(HttpBinding { listeners })
    }

    /// Serves the bound listeners.
    pub async fn serve(binding: HttpBinding, state: HttpState) -> anyhow::Result<HttpServer> {
        metrics::install();
        let app = router(Arc::new(state));
        let (stop, _) = watch::channel(false);
        let mut addrs = Vec::new();
        let mut tasks = Vec::new();
        for (l, tls) in binding.listeners {
            let listener = TcpListener::from_std(l)?;
            let local = listener.local_addr()?;
            tracing::info!(addr = %local, tls = tls.is_some(), "http listener ready (admin API /api/v1, console /, metrics /metrics)");
            addrs.push(local);
            tasks.push(tokio::spawn(accept_loop(
                listener,
                app.clone(),
                tls,
                stop.subscribe(),
            )));
        }
        Ok(HttpServer { addrs, stop, tasks })
    }

    /// The plain listener's address.
    pub fn local_addr(&self) -> SocketAddr {
        self.addrs[0]
    }

    /// The TLS listener's address, if configured.
    pub fn tls_addr(&self) -> Option<SocketAddr> {
        self.addrs.get(1).copied()
    }

    /// Stops accepting and closes every connection.
    pub fn shutdown(&self) {
        let _ = self.stop.send(true);
        for t in &self.tasks {
            t.abort();
        }
    }
}

impl Drop for HttpServer {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// A listening socket without `SO_REUSEPORT`: while one process listens
/// on the address, another's bind fails (a second broker is refused).
fn bind(addr: SocketAddr) -> anyhow::Result<std::net::TcpListener> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    // TIME_WAIT connections of an earlier run do not count as in use.
    socket.set_reuse_address(true)?;
    socket.set_nodelay(true)?;
    socket.bind(&addr.into()).map_err(|e| {
        if e.kind() == std::io::ErrorKind::AddrInUse {
            anyhow::anyhow!("the address is already in use by another process (another broker?)")
        } else {
            e.into()
        }
    })?;
    socket.listen(1024)?;
    socket.set_nonblocking(true)?;
    Ok(socket.into())
}

async fn accept_loop(
    listener: TcpListener,
    app: Router,
    tls: Option<TlsAcceptor>,
    mut stop: watch::Receiver<bool>,
) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let Ok(permit) = slots.clone().acquire_owned().await else {
            return;
        };
        let (stream, addr) = tokio::select! {
            r = listener.accept() => match r {
                Ok(s) => s,
                Err(e) => {
                    // Out of descriptors, say: let connections end first.
                    tracing::warn!(error = %e, "http accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = stop.changed() => return,
        };
        let peer = Peer {
            addr,
            tls: tls.is_some(),
        };
        let (app, tls, stop) = (app.clone(), tls.clone(), stop.clone());
        tokio::spawn(async move {
            let _permit = permit;
            serve_connection(stream, peer, app, tls, stop).await;
        });
    }
}

async fn serve_connection(
    stream: TcpStream,
    peer: Peer,
    app: Router,
    tls: Option<TlsAcceptor>,
    mut stop: watch::Receiver<bool>,
) {
    let service = hyper::service::service_fn(move |mut req: hyper::Request<_>| {
        req.extensions_mut().insert(peer);
        tower::ServiceExt::oneshot(app.clone(), req)
    });
    let builder = {
        let mut b = hyper::server::conn::http1::Builder::new();
        b.timer(TokioTimer::new())
            .header_read_timeout(HEADER_TIMEOUT);
        b
    };
    match tls {
        Some(acceptor) => {
            let Ok(Ok(stream)) =
                tokio::time::timeout(HEADER_TIMEOUT, acceptor.accept(stream)).await
            else {
                return;
            };
            let conn = builder.serve_connection(TokioIo::new(stream), service);
            tokio::select! {
                _ = conn => {}
                _ = stop.changed() => {}
            }
        }
        None => {
            let conn = builder.serve_connection(TokioIo::new(stream), service);
            tokio::select! {
                _ = conn => {}
                _ = stop.changed() => {}
            }
        }
    }
}

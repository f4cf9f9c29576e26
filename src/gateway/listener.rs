//! Listening sockets: claim the address for this process (refused if
//! another process holds it), bind one `SO_REUSEPORT` socket per I/O
//! thread with socket2 (large backlog, non-blocking) and hand it to tokio,
//! then an accept loop that never sleeps between accepts and spawns one
//! task per connection. In
//! that task, never in the accept loop: the PROXY protocol v2 header if the
//! listener expects one (its source is the client's address from then on),
//! the per-source cap on connections without CONNECT, and the TLS
//! handshake, if configured, under the CONNECT timeout.

use std::io::BufReader;
use std::net::SocketAddr;
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::UnixListener;
use std::sync::Arc;
use std::time::Duration;

use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_rustls::rustls;
use tokio_rustls::TlsAcceptor;

use super::connection::{self, ListenerCtx, ListenerMetrics};
use super::limits::{Guarded, Pending};
use super::proxy;
use super::{Authenticator, GatewayError, Listener, ListenerConfig, Shared, TlsConfig};

const TCP_KEEPALIVE_IDLE: Duration = Duration::from_secs(120);
const TCP_KEEPALIVE_INTERVAL: Duration = Duration::from_secs(30);

pub(crate) async fn start(
    gw: Arc<Shared>,
    config: ListenerConfig,
    auth: Arc<dyn Authenticator>,
) -> Result<Listener, GatewayError> {
    let tls = match &config.tls {
        Some(t) => Some(load_tls(t)?),
        None => None,
    };
    let threads = match config.io_threads {
        0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
        n => n,
    };
    let bind_err = |addr: SocketAddr| move |source| GatewayError::Bind { addr, source };
    // SO_REUSEPORT lets any process of the same user bind the port too and
    // take part of the traffic: the address is claimed for this process
    // first (a lock, then a probe bind without SO_REUSEPORT), so a second
    // broker is refused instead of sharing silently.
    let claim = match config.bind.port() {
        0 => None,
        _ => Some(claim_address(config.bind).map_err(bind_err(config.bind))?),
    };
    // One socket per I/O thread on the same port (SO_REUSEPORT: the kernel
    // spreads connections over them); port 0 is resolved by the first.
    let first = bind(config.bind, config.backlog, threads > 1).map_err(bind_err(config.bind))?;
    let local_addr = first.local_addr().map_err(bind_err(config.bind))?;
    let claim = match claim {
        Some(c) => c,
        None => Arc::new(lock_address(local_addr).map_err(bind_err(local_addr))?),
    };
    let mut sockets = vec![first];
    for _ in 1..threads {
        sockets.push(bind(local_addr, config.backlog, true).map_err(bind_err(local_addr))?);
    }
    let name = config.name.clone();
    let pending = Pending::new(config.max_pending_per_source);
    let auth = Arc::new(Guarded {
        inner: auth,
        timeout: config.auth_timeout,
        pending: pending.clone(),
    });
    let ctx = Arc::new(ListenerCtx {
        metrics: ListenerMetrics::new(&config.name),
        tls: tls.is_some(),
        links: tokio::sync::Semaphore::new(config.max_concurrent_links.max(1)),
        config,
        auth,
        gw,
    });
    let (state_tx, state_rx) = watch::channel(State::Serving);
    for (i, socket) in sockets.into_iter().enumerate() {
        let (ctx, tls, state) = (ctx.clone(), tls.clone(), state_rx.clone());
        let (pending, claim) = (pending.clone(), claim.clone());
        std::thread::Builder::new()
            .name(format!("{name}-io-{i}"))
            .spawn(move || {
                io_thread(socket, ctx, tls, pending, state);
                // The address is free again when its last thread ends.
                drop(claim);
            })
            .map_err(bind_err(local_addr))?;
    }
    tracing::info!(listener = %name, %local_addr, tls = ctx.tls, io_threads = threads, "listening");
    Ok(Listener {
        name,
        local_addr,
        state: state_tx,
    })
}

/// What a listener's I/O threads are told.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum State {
    Serving,
    /// Accept no more; serve established connections until they end.
    StopAccepting,
    /// Accept no more and drop every connection.
    Close,
}

/// One I/O thread: a single-threaded runtime that accepts on its own socket
/// and runs its connections, so a connection never moves between threads
/// and accepting one wakes no other thread.
fn io_thread(
    socket: std::net::TcpListener,
    ctx: Arc<ListenerCtx>,
    tls: Option<TlsAcceptor>,
    pending: Arc<Pending>,
    mut state: watch::Receiver<State>,
) {
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            tracing::error!(listener = %ctx.config.name, error = %e, "cannot start an I/O thread");
            return;
        }
    };
    rt.block_on(async move {
        let listener = match TcpListener::from_std(socket) {
            Ok(l) => l,
            Err(e) => {
                tracing::error!(listener = %ctx.config.name, error = %e, "cannot register the listening socket");
                return;
            }
        };
        // Every connection task holds a clone.
        let live = Arc::new(());
        // A dropped `Listener` leaves its threads serving for good.
        tokio::select! {
            _ = accept_loop(listener, ctx, tls, pending, live.clone()) => {}
            Ok(_) = state.wait_for(|s| *s != State::Serving) => {}
        }
        let mut open = true;
        loop {
            if *state.borrow() == State::Close || Arc::strong_count(&live) == 1 {
                return;
            }
            tokio::select! {
                r = state.changed(), if open => open = r.is_ok(),
                _ = tokio::time::sleep(Duration::from_millis(100)) => {}
            }
        }
    });
}

/// Claims `addr` (a port other than 0) for this process: its lock, then a
/// probe bind without `SO_REUSEPORT`, which fails while any socket of
/// another process listens on an overlapping address (a wildcard and a
/// specific address of one port, say).
fn claim_address(addr: SocketAddr) -> std::io::Result<Arc<UnixListener>> {
    let lock = lock_address(addr)?;
    let probe = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    // TIME_WAIT connections of an earlier run do not count as in use.
    probe.set_reuse_address(true)?;
    probe.bind(&addr.into()).map_err(in_use)?;
    Ok(Arc::new(lock))
}

/// The per-address lock: an abstract Unix socket named after the address.
/// Abstract names live in the network namespace, like ports, and vanish
/// with the process that holds them (kill -9 included): no stale lock file.
fn lock_address(addr: SocketAddr) -> std::io::Result<UnixListener> {
    let name = format!("activation-broker/listen/{addr}");
    let abstract_addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes())?;
    UnixListener::bind_addr(&abstract_addr).map_err(in_use)
}

fn in_use(e: std::io::Error) -> std::io::Error {
    if e.kind() == std::io::ErrorKind::AddrInUse {
        std::io::Error::new(
            e.kind(),
            "the address is already in use by another process (another broker?)",
        )
    } else {
        e
    }
}

fn bind(
    addr: SocketAddr,
    backlog: u32,
    reuse_port: bool,
) -> std::io::Result<std::net::TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    if reuse_port {
        socket.set_reuse_port(true)?;
    }
    // Inherited by every accepted socket. TCP keepalive finds peers that
    // vanished without a FIN even when their MQTT keepalive is 0 (none).
    socket.set_nodelay(true)?;
    socket.set_tcp_keepalive(
        &socket2::TcpKeepalive::new()
            .with_time(TCP_KEEPALIVE_IDLE)
            .with_interval(TCP_KEEPALIVE_INTERVAL),
    )?;
    socket.bind(&addr.into())?;
    socket.listen(i32::try_from(backlog).unwrap_or(i32::MAX))?;
    socket.set_nonblocking(true)?;
    Ok(socket.into())
}

async fn accept_loop(
    listener: TcpListener,
    ctx: Arc<ListenerCtx>,
    tls: Option<TlsAcceptor>,
    pending: Arc<Pending>,
    live: Arc<()>,
) {
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => {
                // TCP_NODELAY and TCP keepalive come from the listening
                // socket (Linux copies them to accepted sockets): no
                // system calls per accept.
                let (ctx, tls, pending, live) =
                    (ctx.clone(), tls.clone(), pending.clone(), live.clone());
                tokio::spawn(async move {
                    accepted(stream, peer, ctx, tls, pending).await;
                    drop(live);
                });
            }
            Err(e) => {
                // Out of file descriptors and similar: back off briefly
                // instead of spinning; per-connection errors (ECONNABORTED)
                // just continue.
                tracing::warn!(listener = %ctx.config.name, error = %e, "accept failed");
                if is_resource_exhaustion(&e) {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }
        }
    }
}

/// One accepted connection: its PROXY header (if the listener expects
/// one), its source's quota of connections without CONNECT, the TLS
/// handshake (if any), then the MQTT connection.
///
/// This is the connection task's future, as large as its largest state for
/// the connection's whole life: what only some connections need (the PROXY
/// header, TLS) runs boxed, so a plain connection's task holds little more
/// than `connection::serve`'s loop.
async fn accepted(
    mut stream: TcpStream,
    peer: SocketAddr,
    ctx: Arc<ListenerCtx>,
    tls: Option<TlsAcceptor>,
    pending: Arc<Pending>,
) {
    let peer = if ctx.config.proxy_protocol {
        match Box::pin(proxy_source(&mut stream, peer, ctx.config.connect_timeout)).await {
            Some(source) => source,
            None => return,
        }
    } else {
        peer
    };
    // Given back at the CONNECT (by `Guarded`) or when the connection ends.
    let Some(_slot) = pending.enter(peer) else {
        tracing::debug!(
            %peer,
            max = ctx.config.max_pending_per_source,
            "too many connections without CONNECT from this source; closed"
        );
        return;
    };
    match tls {
        None => connection::serve(stream, peer, ctx).await,
        Some(acceptor) => Box::pin(serve_tls(stream, peer, ctx, acceptor)).await,
    }
}

/// The client's address from the PROXY header, read under the CONNECT
/// timeout; `None` (logged) closes the connection.
async fn proxy_source(
    stream: &mut TcpStream,
    peer: SocketAddr,
    deadline: Duration,
) -> Option<SocketAddr> {
    match tokio::time::timeout(deadline, proxy::read_source(stream, peer)).await {
        Ok(Ok(source)) => Some(source),
        Ok(Err(why)) => {
            tracing::debug!(%peer, why, "connection closed");
            None
        }
        Err(_) => {
            tracing::debug!(%peer, "no PROXY header in time; connection closed");
            None
        }
    }
}

/// The TLS handshake under the CONNECT timeout, then the MQTT connection.
async fn serve_tls(
    stream: TcpStream,
    peer: SocketAddr,
    ctx: Arc<ListenerCtx>,
    acceptor: TlsAcceptor,
) {
    let deadline = ctx.config.connect_timeout;
    let tls_stream = match tokio::time::timeout(deadline, acceptor.accept(stream)).await {
        Ok(Ok(tls_stream)) => tls_stream,
        Ok(Err(e)) => return tracing::debug!(%peer, error = %e, "TLS handshake failed"),
        Err(_) => return tracing::debug!(%peer, "TLS handshake timed out"),
    };
    connection::serve(tls_stream, peer, ctx).await;
}

fn is_resource_exhaustion(e: &std::io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EMFILE) | Some(libc::ENFILE) | Some(libc::ENOBUFS) | Some(libc::ENOMEM)
    )
}

/// The TLS acceptor of a certificate and key (PEM files); also used by the
/// HTTP listener.
pub fn load_tls(cfg: &TlsConfig) -> Result<TlsAcceptor, GatewayError> {
    let open = |p: &std::path::Path| {
        std::fs::File::open(p)
            .map(BufReader::new)
            .map_err(|e| GatewayError::Tls(format!("{}: {e}", p.display())))
    };
    let certs: Vec<_> = rustls_pemfile::certs(&mut open(&cfg.cert_path)?)
        .collect::<Result<_, _>>()
        .map_err(|e| GatewayError::Tls(format!("{}: {e}", cfg.cert_path.display())))?;
    if certs.is_empty() {
        return Err(GatewayError::Tls(format!(
            "{}: no certificate found",
            cfg.cert_path.display()
        )));
    }
    let key = rustls_pemfile::private_key(&mut open(&cfg.key_path)?)
        .map_err(|e| GatewayError::Tls(format!("{}: {e}", cfg.key_path.display())))?
        .ok_or_else(|| {
            GatewayError::Tls(format!("{}: no private key found", cfg.key_path.display()))
        })?;
    // rustls 0.23 ignores an IP address sent as SNI (clients such as
    // mosquitto_pub -h 127.0.0.1 send one, which RFC 6066 forbids; 0.22
    // refused the handshake) and serves clients without SNI: one cert.
    let config = rustls::ServerConfig::builder()
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| GatewayError::Tls(e.to_string()))?;
    Ok(TlsAcceptor::from(Arc::new(config)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn accepted_sockets_inherit_nodelay_and_keepalive() {
        let listener = TcpListener::from_std(
            bind("127.0.0.1:0".parse().expect("addr"), 16, false).expect("bind"),
        )
        .expect("register");
        let addr = listener.local_addr().expect("addr");
        let _client = tokio::net::TcpStream::connect(addr).await.expect("connect");
        let (stream, _) = listener.accept().await.expect("accept");
        let sock = socket2::SockRef::from(&stream);
        assert!(sock.nodelay().expect("nodelay"));
        assert!(sock.keepalive().expect("keepalive"));
        assert_eq!(sock.keepalive_time().expect("idle"), TCP_KEEPALIVE_IDLE);
        assert_eq!(
            sock.keepalive_interval().expect("interval"),
            TCP_KEEPALIVE_INTERVAL
        );
    }
}

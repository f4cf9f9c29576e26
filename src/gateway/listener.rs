//! Listening sockets: bind with socket2 (large backlog, reuse-address,
//! non-blocking) and hand the socket to tokio, then an accept loop that
//! never sleeps between accepts and spawns one task per connection (TLS
//! handshake, if configured, happens in that task under the CONNECT
//! timeout, never in the accept loop).

use std::io::BufReader;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::TcpListener;
use tokio_rustls::rustls;
use tokio_rustls::TlsAcceptor;

use super::connection::{self, ListenerCtx};
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
    let listener = bind(config.bind, config.backlog).map_err(|source| GatewayError::Bind {
        addr: config.bind,
        source,
    })?;
    let local_addr = listener.local_addr().map_err(|source| GatewayError::Bind {
        addr: config.bind,
        source,
    })?;
    let name = config.name.clone();
    let ctx = Arc::new(ListenerCtx {
        tls: tls.is_some(),
        links: tokio::sync::Semaphore::new(config.max_concurrent_links.max(1)),
        config,
        auth,
        gw,
    });
    tracing::info!(listener = %name, %local_addr, tls = ctx.tls, "listening");
    let accept = tokio::spawn(accept_loop(listener, ctx, tls));
    Ok(Listener {
        name,
        local_addr,
        accept,
    })
}

fn bind(addr: SocketAddr, backlog: u32) -> std::io::Result<TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
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
    TcpListener::from_std(socket.into())
}

async fn accept_loop(listener: TcpListener, ctx: Arc<ListenerCtx>, tls: Option<TlsAcceptor>) {
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => {
                // TCP_NODELAY and TCP keepalive come from the listening
                // socket (Linux copies them to accepted sockets): no
                // system calls per accept.
                let ctx = ctx.clone();
                match &tls {
                    None => {
                        tokio::spawn(connection::serve(stream, peer, ctx));
                    }
                    Some(acceptor) => {
                        let acceptor = acceptor.clone();
                        tokio::spawn(async move {
                            let deadline = ctx.config.connect_timeout;
                            match tokio::time::timeout(deadline, acceptor.accept(stream)).await {
                                Ok(Ok(tls_stream)) => {
                                    connection::serve(tls_stream, peer, ctx).await
                                }
                                Ok(Err(e)) => {
                                    tracing::debug!(%peer, error = %e, "TLS handshake failed")
                                }
                                Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
                            }
                        });
                    }
                }
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

fn is_resource_exhaustion(e: &std::io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EMFILE) | Some(libc::ENFILE) | Some(libc::ENOBUFS) | Some(libc::ENOMEM)
    )
}

fn load_tls(cfg: &TlsConfig) -> Result<TlsAcceptor, GatewayError> {
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
        let listener = bind("127.0.0.1:0".parse().expect("addr"), 16).expect("bind");
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

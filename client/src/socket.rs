//! TCP connections from a chosen source address, so that one machine can
//! open more connections to a broker than one address has ephemeral ports.

use std::net::{IpAddr, SocketAddr};

use tokio::net::{TcpSocket, TcpStream};

/// A TCP connection (TCP_NODELAY) to `addr`, from `source` when given. The
/// source port is picked at connect(2) for the whole 4-tuple
/// (`IP_BIND_ADDRESS_NO_PORT`), not at bind(2), so one source address
/// serves many destinations.
pub async fn connect_from(addr: SocketAddr, source: Option<IpAddr>) -> std::io::Result<TcpStream> {
    let socket = match addr {
        SocketAddr::V4(_) => TcpSocket::new_v4()?,
        SocketAddr::V6(_) => TcpSocket::new_v6()?,
    };
    socket.set_nodelay(true)?;
    if let Some(ip) = source {
        socket.set_reuseaddr(true)?;
        bind_address_no_port(&socket);
        socket.bind(SocketAddr::new(ip, 0))?;
    }
    socket.connect(addr).await
}

/// Failure only means the port is picked at bind(2) instead.
fn bind_address_no_port(socket: &TcpSocket) {
    use std::os::fd::AsRawFd as _;
    let one: libc::c_int = 1;
    // SAFETY: setsockopt reads `one` (a c_int of the given size) on a valid socket.
    unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::IPPROTO_IP,
            libc::IP_BIND_ADDRESS_NO_PORT,
            (&one as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn connects_from_another_loopback_address() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let source: IpAddr = "127.0.0.2".parse().expect("ip");
        let (client, accepted) = tokio::join!(connect_from(addr, Some(source)), listener.accept());
        let client = client.expect("connect");
        let (_, peer) = accepted.expect("accept");
        assert_eq!(peer.ip(), source);
        assert_eq!(client.local_addr().expect("local").ip(), source);
    }
}

//! PROXY protocol v2 (HAProxy's binary header), optional per listener: a
//! load balancer in front of the broker writes the client's address before
//! the client's bytes, so rate limits, bans, events and logs see the real
//! source instead of the balancer. Parsed with the `ppp` crate; exactly the
//! header's bytes are read, so the MQTT stream that follows is untouched.

use std::net::SocketAddr;

use ppp::v2::{Addresses, Command, Header, PROTOCOL_PREFIX};
use tokio::io::{AsyncRead, AsyncReadExt};

/// The fixed part: 12-byte signature, version/command, family/protocol,
/// 2-byte length of what follows.
const FIXED: usize = 16;
/// Most bytes of addresses and TLVs accepted after the fixed part (IPv6
/// addresses are 36 bytes; balancers add a few TLVs).
const MAX_PAYLOAD: usize = 2048;

/// Reads the PROXY v2 header at the start of `stream` and returns the
/// client's address: the header's source for `PROXY` over TCP/UDP, `peer`
/// itself for `LOCAL` (the balancer's own health checks) and for address
/// families without an IP (UNSPEC, UNIX). Anything else is an error saying
/// what was wrong; the caller closes the connection.
pub(crate) async fn read_source<S: AsyncRead + Unpin>(
    stream: &mut S,
    peer: SocketAddr,
) -> Result<SocketAddr, String> {
    let mut buf = vec![0u8; FIXED];
    stream
        .read_exact(&mut buf)
        .await
        .map_err(|e| format!("no complete PROXY protocol v2 header: {e}"))?;
    if !buf.starts_with(PROTOCOL_PREFIX) {
        return Err("the connection does not start with a PROXY protocol v2 header".into());
    }
    let len = usize::from(u16::from_be_bytes([buf[14], buf[15]]));
    if len > MAX_PAYLOAD {
        return Err(format!(
            "PROXY header announces {len} bytes of addresses and TLVs (at most {MAX_PAYLOAD})"
        ));
    }
    buf.resize(FIXED + len, 0);
    stream
        .read_exact(&mut buf[FIXED..])
        .await
        .map_err(|e| format!("PROXY header cut short: {e}"))?;
    let header = Header::try_from(buf.as_slice()).map_err(|e| format!("PROXY header: {e}"))?;
    Ok(match (header.command, header.addresses) {
        (Command::Proxy, Addresses::IPv4(a)) => SocketAddr::from((a.source_address, a.source_port)),
        (Command::Proxy, Addresses::IPv6(a)) => SocketAddr::from((a.source_address, a.source_port)),
        _ => peer,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use ppp::v2::{Builder, Protocol, Version};

    fn header(src: &str, dst: &str) -> Vec<u8> {
        let src: SocketAddr = src.parse().expect("addr");
        let dst: SocketAddr = dst.parse().expect("addr");
        Builder::with_addresses(Version::Two | Command::Proxy, Protocol::Stream, (src, dst))
            .build()
            .expect("header")
    }

    #[tokio::test]
    async fn reads_exactly_the_header_and_its_source() {
        let peer: SocketAddr = "10.9.9.9:1".parse().expect("addr");
        for (src, dst) in [
            ("203.0.113.7:40000", "192.0.2.1:1883"),
            ("[2001:db8::7]:40000", "[2001:db8::1]:1883"),
        ] {
            let mut bytes = header(src, dst);
            bytes.extend_from_slice(b"\x10MQTT");
            let mut r = bytes.as_slice();
            assert_eq!(
                read_source(&mut r, peer).await,
                Ok(src.parse().expect("addr"))
            );
            assert_eq!(r, b"\x10MQTT", "the MQTT bytes are left in the stream");
        }
        let local = Builder::new(Version::Two | Command::Local, 0)
            .build()
            .expect("header");
        assert_eq!(read_source(&mut local.as_slice(), peer).await, Ok(peer));
    }

    #[tokio::test]
    async fn refuses_what_is_not_a_v2_header() {
        let peer: SocketAddr = "10.9.9.9:1".parse().expect("addr");
        let mqtt = b"\x10\x10\x00\x04MQTT\x04\x02\x00\x3c\x00\x00xxxxxxxx".to_vec();
        assert!(read_source(&mut mqtt.as_slice(), peer).await.is_err());
        let v1 = b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r\n".to_vec();
        assert!(read_source(&mut v1.as_slice(), peer).await.is_err());
        let mut cut = header("203.0.113.7:4", "192.0.2.1:1883");
        cut.truncate(20);
        assert!(read_source(&mut cut.as_slice(), peer).await.is_err());
        let mut huge = header("203.0.113.7:4", "192.0.2.1:1883");
        huge[14] = 0xFF;
        assert!(read_source(&mut huge.as_slice(), peer).await.is_err());
    }
}

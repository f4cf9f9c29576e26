//! The wire: MQTT 3.1.1 / 5.0 detection from the first packet, reading and
//! writing packets with rumqttd's codecs (made safe for untrusted input and
//! for MQTT 3.1.1's lack of properties), and timed writes.

use std::pin::Pin;
use std::task::Poll;
use std::time::Duration;

use bytes::BytesMut;
use rumqttd::protocol::{self, v4::V4, v5::V5, Packet, Protocol, SubscribeReasonCode};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::time::timeout;

use super::ProtocolVersion;

/// Encoder/decoder of the connection's protocol version.
pub(crate) enum Codec {
    V4(V4),
    V5(V5),
}

impl Codec {
    pub(crate) fn new(version: ProtocolVersion) -> Self {
        match version {
            ProtocolVersion::V4 => Codec::V4(V4),
            ProtocolVersion::V5 => Codec::V5(V5),
        }
    }

    pub(crate) fn version(&self) -> ProtocolVersion {
        match self {
            Codec::V4(_) => ProtocolVersion::V4,
            Codec::V5(_) => ProtocolVersion::V5,
        }
    }

    pub(crate) fn read(
        &mut self,
        buf: &mut BytesMut,
        max: usize,
    ) -> Result<Packet, protocol::Error> {
        // rumqttd's v5 decoder has no arm for CONNACK (2) and UNSUBACK (11)
        // and panics on them; neither may come from a client anyway.
        if let (Codec::V5(_), Some(b)) = (&*self, buf.first()) {
            if matches!(b >> 4, 2 | 11) && buf.len() >= 2 {
                return Err(protocol::Error::InvalidPacketType(b >> 4));
            }
        }
        // Defence in depth: input is untrusted and the decoder is not ours;
        // a panic in it must end this connection cleanly, not the task.
        let res = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| match self {
            Codec::V4(p) => p.read_mut(buf, max),
            Codec::V5(p) => p.read_mut(buf, max),
        }));
        res.unwrap_or(Err(protocol::Error::MalformedPacket))
    }

    pub(crate) fn write(&self, packet: Packet, out: &mut BytesMut) {
        let res = match self {
            Codec::V4(p) => p.write(for_v4(packet), out),
            Codec::V5(p) => p.write(packet, out),
        };
        if let Err(e) = res {
            tracing::warn!(error = %e, "cannot encode packet; dropped");
        }
    }
}

/// MQTT 3.1.1 has no properties and fewer SUBACK codes; rumqttd's v4
/// encoder panics on properties, so strip them.
fn for_v4(packet: Packet) -> Packet {
    match packet {
        Packet::Connect(c, _, w, _, l) => Packet::Connect(c, None, w, None, l),
        Packet::ConnAck(a, _) => Packet::ConnAck(a, None),
        Packet::Publish(p, _) => Packet::Publish(p, None),
        Packet::PubAck(a, _) => Packet::PubAck(a, None),
        Packet::PubRec(a, _) => Packet::PubRec(a, None),
        Packet::PubRel(a, _) => Packet::PubRel(a, None),
        Packet::PubComp(a, _) => Packet::PubComp(a, None),
        Packet::Subscribe(s, _) => Packet::Subscribe(s, None),
        Packet::SubAck(mut s, _) => {
            for c in s.return_codes.iter_mut() {
                if !matches!(
                    c,
                    SubscribeReasonCode::QoS0
                        | SubscribeReasonCode::QoS1
                        | SubscribeReasonCode::QoS2
                        | SubscribeReasonCode::Success(_)
                ) {
                    *c = SubscribeReasonCode::Failure;
                }
            }
            Packet::SubAck(s, None)
        }
        Packet::Unsubscribe(u, _) => Packet::Unsubscribe(u, None),
        Packet::UnsubAck(u, _) => Packet::UnsubAck(u, None),
        Packet::Disconnect(d, _) => Packet::Disconnect(d, None),
        other => other,
    }
}

/// What the first packet of a connection is.
pub(crate) enum First {
    /// A CONNECT, and the codec of its protocol level.
    Connect(Codec, Box<Packet>),
    /// "MQTT" with another protocol level (or MQIsdp): CONNACK 0x01.
    UnsupportedVersion,
    /// Not MQTT, a malformed CONNECT, or the socket closed: no answer.
    Invalid,
}

enum Sniff {
    NeedMore,
    NotConnect,
    Unsupported,
    Version(ProtocolVersion),
}

/// Looks at the start of the first packet for the protocol level.
fn sniff(buf: &[u8], max: usize) -> Sniff {
    let Some(&byte1) = buf.first() else {
        return Sniff::NeedMore;
    };
    if byte1 != 0x10 {
        return Sniff::NotConnect;
    }
    let mut i = None;
    let mut remaining = 0usize;
    for k in 1..=4 {
        let Some(&b) = buf.get(k) else {
            return Sniff::NeedMore;
        };
        remaining |= usize::from(b & 0x7F) << (7 * (k - 1));
        if b & 0x80 == 0 {
            i = Some(k + 1);
            break;
        }
    }
    let Some(i) = i else {
        return Sniff::NotConnect;
    };
    if remaining > max {
        return Sniff::NotConnect;
    }
    let (Some(&h), Some(&l)) = (buf.get(i), buf.get(i + 1)) else {
        return Sniff::NeedMore;
    };
    let n = usize::from(u16::from_be_bytes([h, l]));
    if n > 6 {
        return Sniff::NotConnect;
    }
    let Some(&level) = buf.get(i + 2 + n) else {
        return Sniff::NeedMore;
    };
    match (&buf[i + 2..i + 2 + n], level) {
        (b"MQTT", 4) => Sniff::Version(ProtocolVersion::V4),
        (b"MQTT", 5) => Sniff::Version(ProtocolVersion::V5),
        (b"MQTT", _) | (b"MQIsdp", _) => Sniff::Unsupported,
        _ => Sniff::NotConnect,
    }
}

/// Reads until the first packet is known, leaving what follows it in `buf`.
pub(crate) async fn read_first<S: AsyncRead + Unpin>(
    stream: &mut S,
    buf: &mut BytesMut,
    max: usize,
) -> First {
    loop {
        match sniff(buf, max) {
            Sniff::NeedMore => {}
            Sniff::NotConnect => return First::Invalid,
            Sniff::Unsupported => return First::UnsupportedVersion,
            Sniff::Version(v) => {
                let mut codec = Codec::new(v);
                match codec.read(buf, max) {
                    Ok(p @ Packet::Connect(..)) => return First::Connect(codec, Box::new(p)),
                    Ok(_) => return First::Invalid,
                    Err(protocol::Error::InsufficientBytes(_)) => {}
                    Err(e) => {
                        tracing::debug!(error = %e, "bad CONNECT");
                        return First::Invalid;
                    }
                }
            }
        }
        match read_some(stream, buf).await {
            Ok(0) | Err(_) => return First::Invalid,
            Ok(_) => {}
        }
    }
}

/// Bytes read from the socket at once (through the stack: an idle
/// connection holds no read buffer).
const READ_CHUNK: usize = 8 * 1024;

/// Reads what the socket has into `rbuf` through a stack buffer, so no
/// buffer is held while waiting. Cancel safe.
pub(crate) async fn read_some<S: AsyncRead + Unpin>(
    stream: &mut S,
    rbuf: &mut BytesMut,
) -> std::io::Result<usize> {
    std::future::poll_fn(|cx| {
        // Uninitialised: a poll that finds nothing to read (most of them,
        // for an idle device) costs no zeroing of the chunk.
        let mut chunk = [std::mem::MaybeUninit::<u8>::uninit(); READ_CHUNK];
        let mut buf = ReadBuf::uninit(&mut chunk);
        match Pin::new(&mut *stream).poll_read(cx, &mut buf) {
            Poll::Ready(Ok(())) => {
                rbuf.extend_from_slice(buf.filled());
                Poll::Ready(Ok(buf.filled().len()))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => Poll::Pending,
        }
    })
    .await
}

/// QoS and packet id of the PUBLISH at the front of `buf` (rumqttd keeps
/// them crate-private in its `Publish`).
pub(crate) fn peek_publish(buf: &[u8]) -> Option<(u8, u16)> {
    let byte1 = *buf.first()?;
    if byte1 >> 4 != 3 {
        return None;
    }
    let qos = (byte1 >> 1) & 0b11;
    let mut i = 1;
    loop {
        let b = *buf.get(i)?;
        i += 1;
        if b & 0x80 == 0 {
            break;
        }
        if i > 4 {
            return None;
        }
    }
    if qos == 0 {
        return Some((0, 0));
    }
    let topic_len = usize::from(u16::from_be_bytes([*buf.get(i)?, *buf.get(i + 1)?]));
    let p = i + 2 + topic_len;
    Some((qos, u16::from_be_bytes([*buf.get(p)?, *buf.get(p + 1)?])))
}

/// Writes and flushes `buf` (then empties it) within `limit`.
pub(crate) async fn write_out<S: AsyncWrite + Unpin>(
    stream: &mut S,
    buf: &mut BytesMut,
    limit: Duration,
) -> Result<(), ()> {
    if buf.is_empty() {
        return Ok(());
    }
    let res = timeout(limit, async {
        stream.write_all(buf).await?;
        stream.flush().await
    })
    .await;
    buf.clear();
    match res {
        Ok(Ok(())) => Ok(()),
        _ => Err(()),
    }
}

/// Shuts the socket down (bounded: a peer that reads nothing cannot hold it).
pub(crate) async fn close<S: AsyncWrite + Unpin>(stream: &mut S) {
    let _ = timeout(Duration::from_secs(1), stream.shutdown()).await;
}

/// Closes our side, then reads and discards what the client still sends
/// until it closes too (at most `limit` and 64 KiB): closing a socket with
/// unread input makes the kernel reset the connection, and the client may
/// then lose the DISCONNECT we just sent (or fail writing its acks).
pub(crate) async fn close_lingering<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    limit: Duration,
) {
    close(stream).await;
    let _ = timeout(limit, async {
        let mut sink = BytesMut::new();
        let mut total = 0;
        while total < 64 * 1024 {
            match read_some(stream, &mut sink).await {
                Ok(0) | Err(_) => break,
                Ok(n) => total += n,
            }
            sink.clear();
        }
    })
    .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sniffs_protocol_level() {
        // CONNECT, remaining length 12, "MQTT", level 4 / 5 / 3
        let mut v4 = vec![0x10, 12, 0, 4, b'M', b'Q', b'T', b'T', 4];
        assert!(matches!(
            sniff(&v4, 1024),
            Sniff::Version(ProtocolVersion::V4)
        ));
        v4[8] = 5;
        assert!(matches!(
            sniff(&v4, 1024),
            Sniff::Version(ProtocolVersion::V5)
        ));
        v4[8] = 3;
        assert!(matches!(sniff(&v4, 1024), Sniff::Unsupported));
        assert!(matches!(sniff(&v4[..5], 1024), Sniff::NeedMore));
        assert!(matches!(sniff(&[0x30, 0], 1024), Sniff::NotConnect));
        assert!(matches!(
            sniff(&[0x10, 0xff, 0xff, 0xff, 0xff, 0], 1024),
            Sniff::NotConnect
        ));
        assert!(matches!(sniff(b"GET / HTTP/1.1", 1024), Sniff::NotConnect));
        // Announces 1 MiB: refused before it arrives.
        assert!(matches!(
            sniff(&[0x10, 0x80, 0x80, 0x40], 1024),
            Sniff::NotConnect
        ));
    }

    #[test]
    fn peeks_publish_qos_and_id() {
        // PUBLISH QoS 1, topic "a/b", pkid 0x1234, payload "x"
        let p = [0x32, 8, 0, 3, b'a', b'/', b'b', 0x12, 0x34, b'x'];
        assert_eq!(peek_publish(&p), Some((1, 0x1234)));
        let p0 = [0x30, 6, 0, 3, b'a', b'/', b'b', b'x'];
        assert_eq!(peek_publish(&p0), Some((0, 0)));
        assert_eq!(peek_publish(&[0x82, 0]), None);
    }
}

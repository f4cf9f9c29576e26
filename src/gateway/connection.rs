//! One client connection, from the first byte to the close.
//!
//! 1. CONNECT: read under the CONNECT timeout; the protocol level byte picks
//!    MQTT 3.1.1 or 5.0 (other levels get CONNACK 0x01). Anything else
//!    first closes the socket.
//! 2. Admission: the listener's [`Authenticator`] decides. A refusal is
//!    answered with its CONNACK code (MQTT 5: with Reason String) and the
//!    socket closed; no router link is created, nothing is registered.
//! 3. Session: registered in the online registry (telling an older
//!    connection with the same client id to leave with 0x8E; refused with
//!    0x88 when the registry is full) under one per-client-id lock, then
//!    CONNACK. Persistent sessions are linked to the router at once (under
//!    the same lock); clean sessions when they first SUBSCRIBE or PUBLISH
//!    (only while still the registered session of their client id). From then on
//!    packets flow socket → ACL → router and router → socket. PINGREQ and
//!    UNSUBACK are answered here. PUBLISH outside the ACL is dropped: MQTT 5
//!    gets PUBACK/PUBREC 0x87; MQTT 3.1.1 gets a plain PUBACK/PUBREC (and
//!    PUBCOMP for its PUBREL) so it does not retry — 3.1.1 has no way to say
//!    "refused" and closing would make misconfigured devices reconnect in
//!    a loop. SUBSCRIBE filters outside the ACL get 0x87 (MQTT 5) / 0x80
//!    (3.1.1) in the SUBACK, the others go to the router and the codes are
//!    merged back in order.
//! 4. End: client DISCONNECT (no will, unless MQTT 5 reason 0x04), socket
//!    closed or broken, keepalive expiry (1.5 × keepalive, 0 = none),
//!    protocol violation, oversized packet, or an order from the online
//!    registry. The router link is closed with a DISCONNECT (so stored
//!    sessions are kept by the router); then, unless the session was taken
//!    over, `lingering.rs` publishes the will (none after a normal
//!    DISCONNECT) now or after its delay, and discards the stored session
//!    now or at its expiry.

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use rumqttd::local::{LinkRx, LinkTx};
use rumqttd::protocol::{
    self, v4::V4, v5::V5, ConnAck, ConnAckProperties, Disconnect, DisconnectReasonCode, Packet,
    PingResp, Protocol, PubAck, PubAckProperties, PubAckReason, PubComp, PubCompReason, PubRec,
    PubRecProperties, PubRecReason, Publish, PublishProperties, SubAck, Subscribe,
    SubscribeProperties, SubscribeReasonCode, UnsubAck, UnsubAckReason,
};
use rumqttd::Notification;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, Semaphore};
use tokio::time::{timeout, Instant};

use super::acl::{valid_topic_name, Acl, SubscribeVerdict};
use super::codes::{self, DisconnectReason, RefusalCode};
use super::lingering::{Ended, SessionExpiry};
use super::online::{Control, SessionInfo};
use super::{
    Authenticator, ConnectInfo, GatewayError, Identity, ListenerConfig, ProtocolVersion,
    Registration, Shared,
};
use crate::events::{Event, EventKind};

/// What every connection of one listener shares.
pub(crate) struct ListenerCtx {
    pub(crate) tls: bool,
    pub(crate) config: ListenerConfig,
    pub(crate) auth: Arc<dyn Authenticator>,
    pub(crate) gw: Arc<Shared>,
    /// Bounds concurrent link creations (each holds a blocking thread).
    pub(crate) links: Semaphore,
}

/// Encoder/decoder of the connection's protocol version.
enum Codec {
    V4(V4),
    V5(V5),
}

impl Codec {
    fn version(&self) -> ProtocolVersion {
        match self {
            Codec::V4(_) => ProtocolVersion::V4,
            Codec::V5(_) => ProtocolVersion::V5,
        }
    }

    fn read(&mut self, buf: &mut BytesMut, max: usize) -> Result<Packet, protocol::Error> {
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

    fn write(&self, packet: Packet, out: &mut BytesMut) {
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

enum First {
    Connect(Codec, Box<Packet>),
    UnsupportedVersion,
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

async fn read_first<S: AsyncRead + Unpin>(stream: &mut S, buf: &mut BytesMut, max: usize) -> First {
    loop {
        match sniff(buf, max) {
            Sniff::NeedMore => {}
            Sniff::NotConnect => return First::Invalid,
            Sniff::Unsupported => return First::UnsupportedVersion,
            Sniff::Version(v) => {
                let mut codec = match v {
                    ProtocolVersion::V4 => Codec::V4(V4),
                    ProtocolVersion::V5 => Codec::V5(V5),
                };
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
        match stream.read_buf(buf).await {
            Ok(0) | Err(_) => return First::Invalid,
            Ok(_) => {}
        }
    }
}

/// QoS and packet id of the PUBLISH at the front of `buf` (rumqttd keeps
/// them crate-private in its `Publish`).
fn peek_publish(buf: &[u8]) -> Option<(u8, u16)> {
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

async fn write_out<S: AsyncWrite + Unpin>(
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

async fn close<S: AsyncWrite + Unpin>(stream: &mut S) {
    let _ = timeout(Duration::from_secs(1), stream.shutdown()).await;
}

fn valid_client_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 65_535
        && !id
            .chars()
            .any(|c| matches!(c, '+' | '#' | '/' | '$') || c.is_control())
}

fn assign_client_id() -> String {
    use rand::Rng;
    format!("auto-{:016x}", rand::thread_rng().gen::<u64>())
}

/// Serves one accepted connection to its end.
pub(crate) async fn serve<S>(mut stream: S, peer: SocketAddr, ctx: Arc<ListenerCtx>)
where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    let cfg = &ctx.config;
    let mut rbuf = BytesMut::with_capacity(1024);
    let first = match timeout(
        cfg.connect_timeout,
        read_first(&mut stream, &mut rbuf, cfg.max_packet_size),
    )
    .await
    {
        Ok(f) => f,
        Err(_) => {
            tracing::debug!(%peer, "no CONNECT in time");
            return;
        }
    };
    let (codec, packet) = match first {
        First::Connect(codec, packet) => (codec, packet),
        First::UnsupportedVersion => {
            let mut w = BytesMut::new();
            Codec::V4(V4).write(codes::unsupported_protocol_connack(), &mut w);
            let _ = write_out(&mut stream, &mut w, cfg.write_timeout).await;
            close(&mut stream).await;
            return;
        }
        First::Invalid => return,
    };
    let Packet::Connect(connect, props, will, will_props, login) = *packet else {
        return;
    };
    let version = codec.version();
    let mut wbuf = BytesMut::with_capacity(256);

    macro_rules! refuse {
        ($code:expr, $reason:expr) => {{
            let reason: &str = $reason;
            tracing::debug!(%peer, client_id = %connect.client_id, code = ?$code, reason, "CONNECT refused");
            codec.write(codes::refusal_connack(version, $code, reason), &mut wbuf);
            let _ = write_out(&mut stream, &mut wbuf, cfg.write_timeout).await;
            close(&mut stream).await;
            return;
        }};
    }

    if connect.client_id.is_empty() && !connect.clean_session {
        refuse!(
            RefusalCode::ClientIdNotValid,
            "an empty client id requires a clean session"
        );
    }
    if let Some(w) = &will {
        if !std::str::from_utf8(&w.topic).is_ok_and(valid_topic_name) {
            // A malformed CONNECT: close without CONNACK.
            return;
        }
    }

    let info = ConnectInfo {
        client_id: connect.client_id.clone(),
        clean_session: connect.clean_session,
        username: login.as_ref().map(|l| l.username.clone()),
        password: login.as_ref().map(|l| Bytes::from(l.password.clone())),
        peer,
        protocol: version,
        keep_alive: connect.keep_alive,
        will_topic: will
            .as_ref()
            .and_then(|w| std::str::from_utf8(&w.topic).ok())
            .map(str::to_owned),
        listener: cfg.name.clone(),
        tls: ctx.tls,
    };
    let admission = match ctx.auth.authenticate(info).await {
        Ok(a) => a,
        Err(rejection) => refuse!(rejection.code, &rejection.reason),
    };

    let assigned = admission.client_id.is_empty();
    let client_id = if assigned {
        assign_client_id()
    } else {
        admission.client_id.clone()
    };
    if !valid_client_id(&client_id) {
        refuse!(
            RefusalCode::ClientIdNotValid,
            "client id must not contain '+', '#', '/', '$' or control characters"
        );
    }
    if let Some(w) = &will {
        if !std::str::from_utf8(&w.topic).is_ok_and(|t| admission.acl.may_publish(t)) {
            refuse!(
                RefusalCode::NotAuthorized,
                "the will topic is outside the topics this client may publish to"
            );
        }
    }

    // Register (and link, for sessions the router must know from the
    // start), serialised per client id so the registry and the router see
    // competing connections of one client id in the same order. A clean
    // session gets its router link when it first needs one (SUBSCRIBE or
    // PUBLISH): an idle device costs no router state.
    let gw = ctx.gw.clone();
    let (ctrl_tx, ctrl_rx) = mpsc::unbounded_channel();
    let session_expiry = match version {
        ProtocolVersion::V4 if connect.clean_session => SessionExpiry::WithConnection,
        ProtocolVersion::V4 => SessionExpiry::Never,
        ProtocolVersion::V5 => {
            SessionExpiry::from_interval(props.as_ref().and_then(|p| p.session_expiry_interval))
        }
    };
    let session = SessionInfo {
        client_id: client_id.clone(),
        identity: admission.identity.clone(),
        peer,
        protocol: version,
        listener: cfg.name.clone(),
        clean_session: connect.clean_session,
        session_expiry,
        keep_alive: connect.keep_alive,
        connected_at: gw.clock.now(),
    };
    let stored = session.stored();
    let (seq, link) = match gw.register_unlinked(session, ctrl_tx) {
        Registration::Registered(seq) => (seq, None),
        Registration::Full(n) => refuse!(
            RefusalCode::ServerUnavailable,
            &format!("the broker holds its maximum of {n} sessions")
        ),
        Registration::MustLink(pending) => {
            let (session, ctrl_tx) = *pending;
            let built = {
                let Ok(_permit) = ctx.links.acquire().await else {
                    refuse!(RefusalCode::ServerUnavailable, "listener is shutting down");
                };
                gw.router.wait_for_room().await;
                let gw = gw.clone();
                tokio::task::spawn_blocking(move || gw.register_linked(session, ctrl_tx)).await
            };
            match built {
                Ok(Ok((seq, link))) => (seq, Some(link)),
                Ok(Err(e @ GatewayError::Full(_))) => {
                    refuse!(RefusalCode::ServerUnavailable, &e.to_string())
                }
                Ok(Err(e)) => {
                    tracing::warn!(%client_id, error = %e, "router refused the link");
                    refuse!(RefusalCode::ServerUnavailable, "broker unavailable");
                }
                Err(e) => {
                    tracing::warn!(%client_id, error = %e, "link task failed");
                    refuse!(RefusalCode::ServerUnavailable, "broker unavailable");
                }
            }
        }
    };
    let (link_tx, link_rx, ack) = match link {
        Some((tx, rx, ack)) => (Some(tx), Some(rx), Some(ack)),
        None => (None, None, None),
    };

    // From here on the session exists in the registry (and maybe the
    // router); the guard undoes both should this task unwind.
    let mut guard = SessionGuard {
        gw: gw.clone(),
        client_id: client_id.clone(),
        seq,
        link_tx,
    };

    let session_present = match ack.and_then(Option::<Packet>::from) {
        Some(Packet::ConnAck(a, _)) => a.session_present,
        _ => false,
    };
    let connack_props = match version {
        ProtocolVersion::V4 => None,
        ProtocolVersion::V5 => Some(ConnAckProperties {
            max_packet_size: u32::try_from(cfg.max_packet_size.saturating_add(5)).ok(),
            topic_alias_max: (cfg.topic_alias_max > 0).then_some(cfg.topic_alias_max),
            retain_available: Some(1),
            wildcard_subscription_available: Some(1),
            shared_subscription_available: Some(1),
            // MQTT 5 §3.2.2.3.7: only for a zero-length client id. A client
            // that named itself must not get one (libmosquitto treats it as
            // a protocol error), even if the session's id differs (accounts).
            assigned_client_identifier: connect.client_id.is_empty().then(|| client_id.clone()),
            ..codes::empty_connack_properties()
        }),
    };
    codec.write(
        Packet::ConnAck(
            ConnAck {
                session_present,
                code: protocol::ConnectReturnCode::Success,
            },
            connack_props,
        ),
        &mut wbuf,
    );
    let connack_sent = write_out(&mut stream, &mut wbuf, cfg.write_timeout)
        .await
        .is_ok();

    tracing::debug!(%peer, %client_id, protocol = version.as_str(), session_present, "connected");
    if let Identity::Device {
        product_key,
        device_key,
    } = &admission.identity
    {
        gw.events.publish(
            Event::new(EventKind::DeviceConnected, gw.clock.now())
                .device(product_key, device_key)
                .with("ClientId", client_id.as_str())
                .with("Protocol", version.as_str())
                .with("Ip", peer.ip().to_string()),
        );
    }

    let mut conn = Conn {
        codec,
        acl: &admission.acl,
        cfg,
        gw: &gw,
        links: &ctx.links,
        wbuf,
        to_router: Vec::new(),
        aliases: HashMap::new(),
        pending_subacks: HashMap::new(),
        denied_qos2: HashSet::new(),
        linked: link_rx.is_some(),
        session_expiry,
    };
    let end = if connack_sent {
        conn.run(
            &mut stream,
            rbuf,
            &mut guard,
            link_rx,
            ctrl_rx,
            connect.keep_alive,
        )
        .await
    } else {
        End::closed("connection lost before CONNACK")
    };

    // Tell an MQTT 5 client why, then close.
    if let Some((reason, message)) = &end.notify {
        if let Some(p) = codes::disconnect_packet(version, *reason, message) {
            conn.codec.write(p, &mut conn.wbuf);
        }
    }
    let _ = write_out(&mut stream, &mut conn.wbuf, Duration::from_secs(1)).await;
    close(&mut stream).await;

    guard.finish(end.link_gone).await;
    if !end.taken_over {
        gw.connection_ended(Ended {
            client_id: client_id.clone(),
            stored,
            expiry: conn.session_expiry,
            will: will.filter(|_| end.will).map(|w| (w, will_props)),
        })
        .await;
    }

    tracing::debug!(%peer, %client_id, reason = %end.reason, "disconnected");
    if let Identity::Device {
        product_key,
        device_key,
    } = &admission.identity
    {
        gw.events.publish(
            Event::new(EventKind::DeviceDisconnected, gw.clock.now())
                .device(product_key, device_key)
                .with("ClientId", client_id.as_str())
                .with("Reason", end.reason.as_str()),
        );
    }
}

/// Ends a session in the router and the registry: normally through
/// [`SessionGuard::finish`], or on drop if the task unwinds before that.
struct SessionGuard {
    gw: Arc<Shared>,
    client_id: String,
    seq: u64,
    link_tx: Option<LinkTx>,
}

/// Closes a router link (a stored session is kept by the router).
pub(crate) fn router_disconnect_packet() -> Packet {
    Packet::Disconnect(
        Disconnect {
            reason_code: DisconnectReasonCode::NormalDisconnection,
        },
        None,
    )
}

fn router_disconnect() -> Vec<Packet> {
    vec![router_disconnect_packet()]
}

impl SessionGuard {
    async fn finish(&mut self, link_gone: bool) {
        if let Some(mut tx) = self.link_tx.take() {
            if !link_gone {
                let _ = push_router(&self.gw, &mut tx, &mut router_disconnect()).await;
            }
            self.gw.unlinked();
        }
        self.gw.online.unregister(&self.client_id, self.seq);
    }
}

impl Drop for SessionGuard {
    fn drop(&mut self) {
        self.gw.online.unregister(&self.client_id, self.seq);
        let Some(mut tx) = self.link_tx.take() else {
            return;
        };
        self.gw.unlinked();
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            let gw = self.gw.clone();
            rt.spawn(async move {
                let _ = push_router(&gw, &mut tx, &mut router_disconnect()).await;
            });
        }
    }
}

/// Bytes of router output gathered before they are written out.
const MAX_WRITE_BATCH: usize = 1024 * 1024;

/// Packets a connection may have waiting for the router before it stops
/// reading its socket (TCP backpressure for publish floods).
const MAX_PENDING_TO_ROUTER: usize = 1024;

/// Hands `packets` to the router: all but the last straight into the
/// link's buffer, the last with the notification.
async fn push_router(gw: &Shared, link_tx: &mut LinkTx, packets: &mut Vec<Packet>) -> bool {
    let Some(last) = packets.pop() else {
        return true;
    };
    // Bounded wait: a link the router has dropped never drains.
    for _ in 0..1000 {
        if link_tx.buffer().len() < MAX_PENDING_TO_ROUTER {
            break;
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    gw.router.wait_for_room().await;
    link_tx.buffer().extend(packets.drain(..));
    link_tx.send(last).await.is_ok()
}

/// How a session ended.
struct End {
    /// For logs and the `device/disconnected` event.
    reason: String,
    /// Whether the will is due (if the session was not taken over).
    will: bool,
    /// Another connection took the session over (it goes on there, so no
    /// will and no session end).
    taken_over: bool,
    /// The router already dropped the link.
    link_gone: bool,
    /// DISCONNECT to send to an MQTT 5 client.
    notify: Option<(DisconnectReason, String)>,
}

impl End {
    fn client(with_will: bool) -> Self {
        End {
            reason: String::from("client disconnected"),
            will: with_will,
            taken_over: false,
            link_gone: false,
            notify: None,
        }
    }

    fn closed(why: impl std::fmt::Display) -> Self {
        End {
            reason: why.to_string(),
            will: true,
            taken_over: false,
            link_gone: false,
            notify: None,
        }
    }

    fn violation(reason: DisconnectReason, message: impl Into<String>) -> Self {
        let message = message.into();
        End {
            reason: format!("{}: {message}", reason.as_str()),
            will: true,
            taken_over: false,
            link_gone: false,
            notify: Some((reason, message)),
        }
    }

    fn ordered(reason: DisconnectReason, message: String) -> Self {
        End {
            reason: if message.is_empty() {
                reason.as_str().to_owned()
            } else {
                format!("{}: {message}", reason.as_str())
            },
            will: true,
            taken_over: reason == DisconnectReason::SessionTakenOver,
            link_gone: false,
            notify: Some((reason, message)),
        }
    }

    fn router(why: &str) -> Self {
        End {
            reason: why.to_owned(),
            will: true,
            taken_over: false,
            link_gone: true,
            notify: None,
        }
    }
}

// Lives on the stack for one loop turn; boxing would allocate per packet.
#[allow(clippy::large_enum_variant)]
enum Wake {
    Ctrl(Option<Control>),
    Read(std::io::Result<usize>),
    Router(Result<Option<Notification>, ()>),
    KeepAlive,
}

/// Per-session state of an admitted connection.
struct Conn<'a> {
    codec: Codec,
    acl: &'a Acl,
    cfg: &'a ListenerConfig,
    gw: &'a Arc<Shared>,
    wbuf: BytesMut,
    to_router: Vec<Packet>,
    /// MQTT 5 topic aliases set by the client (resolved here so the ACL
    /// sees real topics; the router never sees an alias).
    aliases: HashMap<u16, Bytes>,
    /// SUBSCRIBEs partly refused: the codes already decided (`Some`) and
    /// the slots the router's SUBACK fills (`None`), by packet id.
    pending_subacks: HashMap<u16, Vec<Option<SubscribeReasonCode>>>,
    /// QoS 2 PUBLISHes dropped by the ACL whose PUBREL we answer ourselves.
    denied_qos2: HashSet<u16>,
    /// Bounds concurrent link creations of the listener.
    links: &'a Semaphore,
    /// Whether the session has its router link (clean sessions get it on
    /// their first SUBSCRIBE or PUBLISH).
    linked: bool,
    /// From the CONNECT; an MQTT 5 DISCONNECT may change it.
    session_expiry: SessionExpiry,
}

/// The next notification of the router link, if there is one.
async fn next_notification(rx: &mut Option<LinkRx>) -> Result<Option<Notification>, ()> {
    match rx {
        Some(rx) => rx.next().await.map_err(drop),
        None => std::future::pending().await,
    }
}

impl Conn<'_> {
    fn v5(&self) -> bool {
        self.codec.version() == ProtocolVersion::V5
    }

    fn write(&mut self, packet: Packet) {
        self.codec.write(packet, &mut self.wbuf);
    }

    async fn run<S>(
        &mut self,
        stream: &mut S,
        mut rbuf: BytesMut,
        session: &mut SessionGuard,
        mut link_rx: Option<LinkRx>,
        mut ctrl_rx: mpsc::UnboundedReceiver<Control>,
        keep_alive: u16,
    ) -> End
    where
        S: AsyncRead + AsyncWrite + Unpin + Send,
    {
        let ka = (keep_alive > 0).then(|| Duration::from_millis(u64::from(keep_alive) * 1500));
        let ka_sleep = tokio::time::sleep(ka.unwrap_or(Duration::from_secs(3600)));
        tokio::pin!(ka_sleep);
        let max = self.cfg.max_packet_size;
        let write_timeout = self.cfg.write_timeout;

        // Bytes that arrived right behind the CONNECT.
        let mut pending_input = !rbuf.is_empty();
        loop {
            let wake = if pending_input {
                pending_input = false;
                Wake::Read(Ok(rbuf.len()))
            } else {
                tokio::select! {
                    biased;
                    c = ctrl_rx.recv() => Wake::Ctrl(c),
                    r = stream.read_buf(&mut rbuf) => Wake::Read(r),
                    n = next_notification(&mut link_rx) => Wake::Router(n),
                    _ = &mut ka_sleep, if ka.is_some() => Wake::KeepAlive,
                }
            };
            match wake {
                Wake::Ctrl(Some(Control::Disconnect { reason, message })) => {
                    return End::ordered(reason, message);
                }
                Wake::Ctrl(None) => {
                    return End::ordered(DisconnectReason::ServerShuttingDown, String::new());
                }
                Wake::KeepAlive => {
                    return End::violation(
                        DisconnectReason::KeepAliveTimeout,
                        "no packet within 1.5 times the keepalive",
                    );
                }
                Wake::Read(Ok(0)) => return End::closed("connection closed by client"),
                Wake::Read(Err(e)) => return End::closed(format!("network error: {e}")),
                Wake::Read(Ok(_)) => {
                    if let Some(ka) = ka {
                        ka_sleep.as_mut().reset(Instant::now() + ka);
                    }
                    let mut end = None;
                    loop {
                        let peeked = peek_publish(&rbuf);
                        match self.codec.read(&mut rbuf, max) {
                            Ok(packet) => {
                                if let Some(e) = self.on_packet(packet, peeked) {
                                    end = Some(e);
                                    break;
                                }
                            }
                            Err(protocol::Error::InsufficientBytes(_)) => break,
                            Err(protocol::Error::PayloadSizeLimitExceeded(n)) => {
                                end = Some(End::violation(
                                    DisconnectReason::PacketTooLarge,
                                    format!("packet of {n} bytes exceeds the maximum of {max}"),
                                ));
                                break;
                            }
                            Err(e) => {
                                end = Some(End::violation(
                                    DisconnectReason::MalformedPacket,
                                    e.to_string(),
                                ));
                                break;
                            }
                        }
                    }
                    // Packets read before an end are still delivered.
                    if !self.to_router.is_empty() && !self.linked {
                        match self.open_link(session, &mut ctrl_rx).await {
                            Ok(rx) => link_rx = Some(rx),
                            Err(e) => end = end.or(Some(e)),
                        }
                    }
                    if let Some(link_tx) = session.link_tx.as_mut() {
                        if !push_router(self.gw, link_tx, &mut self.to_router).await {
                            end = end.or(Some(End::router("router link closed")));
                        }
                    } else {
                        self.to_router.clear();
                    }
                    if write_out(stream, &mut self.wbuf, write_timeout)
                        .await
                        .is_err()
                    {
                        end = end.or(Some(End::closed("write failed or timed out")));
                    }
                    if let Some(e) = end {
                        return e;
                    }
                    if rbuf.capacity() > 64 * 1024 && rbuf.is_empty() {
                        rbuf = BytesMut::with_capacity(1024);
                    }
                }
                Wake::Router(first) => {
                    let mut unschedule = false;
                    let mut end = None;
                    let mut next = Some(first);
                    let mut budget = 512;
                    while let Some(n) = next.take() {
                        match n {
                            Ok(Some(n)) => end = self.on_notification(n, &mut unschedule),
                            Ok(None) => {}
                            Err(_) => {
                                end = Some(self.router_gone(&mut ctrl_rx));
                            }
                        }
                        budget -= 1;
                        if end.is_some() || budget == 0 || self.wbuf.len() > MAX_WRITE_BATCH {
                            break;
                        }
                        // Take whatever else is ready without waiting.
                        next = tokio::select! {
                            biased;
                            n = next_notification(&mut link_rx) => Some(n),
                            _ = std::future::ready(()) => None,
                        };
                    }
                    if write_out(stream, &mut self.wbuf, write_timeout)
                        .await
                        .is_err()
                    {
                        end = end.or(Some(End::closed("write failed or timed out")));
                    }
                    if let Some(e) = end {
                        return e;
                    }
                    if let (true, Some(rx)) = (unschedule, link_rx.as_mut()) {
                        if rx.wake().await.is_err() {
                            return self.router_gone(&mut ctrl_rx);
                        }
                    }
                }
            }
        }
    }

    /// Opens the router link of a clean session that has none yet. The
    /// socket is not read meanwhile; packets keep their order.
    async fn open_link(
        &mut self,
        session: &mut SessionGuard,
        ctrl_rx: &mut mpsc::UnboundedReceiver<Control>,
    ) -> Result<LinkRx, End> {
        let unavailable = |why: String| {
            tracing::warn!(client_id = %session.client_id, error = %why, "cannot link to the router");
            End::violation(DisconnectReason::UnspecifiedError, "broker unavailable")
        };
        let built = {
            let Ok(_permit) = self.links.acquire().await else {
                return Err(End::ordered(
                    DisconnectReason::ServerShuttingDown,
                    String::new(),
                ));
            };
            self.gw.router.wait_for_room().await;
            let gw = self.gw.clone();
            let cid = session.client_id.clone();
            let seq = session.seq;
            tokio::task::spawn_blocking(move || gw.link_registered(&cid, seq)).await
        };
        match built {
            Ok(Ok(Some((tx, rx, _ack)))) => {
                session.link_tx = Some(tx);
                self.linked = true;
                Ok(rx)
            }
            // Another connection took the client id over meanwhile; its
            // order is on the way (or here).
            Ok(Ok(None)) => Err(match ctrl_rx.try_recv() {
                Ok(Control::Disconnect { reason, message }) => End::ordered(reason, message),
                Err(_) => End::ordered(
                    DisconnectReason::SessionTakenOver,
                    String::from("another connection took over this session"),
                ),
            }),
            Ok(Err(e)) => Err(unavailable(e.to_string())),
            Err(e) => Err(unavailable(e.to_string())),
        }
    }

    /// The router dropped our link: a takeover it saw first, or a router
    /// decision.
    fn router_gone(&self, ctrl_rx: &mut mpsc::UnboundedReceiver<Control>) -> End {
        let mut end = match ctrl_rx.try_recv() {
            Ok(Control::Disconnect { reason, message }) => End::ordered(reason, message),
            Err(_) => End::router("router closed the session"),
        };
        end.link_gone = true;
        end
    }

    /// Queues `packet` for the router; without a link (nothing was ever
    /// sent to the router) acks of router traffic have nothing to ack.
    fn forward_if_linked(&mut self, packet: Packet) {
        if self.linked {
            self.to_router.push(packet);
        }
    }

    fn on_packet(&mut self, packet: Packet, peeked: Option<(u8, u16)>) -> Option<End> {
        match packet {
            Packet::Publish(publish, props) => self.on_publish(publish, props, peeked),
            Packet::PubAck(a, _) => {
                self.forward_if_linked(Packet::PubAck(a, None));
                None
            }
            Packet::PubRec(a, _) => {
                self.forward_if_linked(Packet::PubRec(a, None));
                None
            }
            Packet::PubRel(r, _) => {
                let denied = self.denied_qos2.remove(&r.pkid);
                if denied || !self.linked {
                    // Unlinked, the router never saw this packet id.
                    let reason = if denied || !self.v5() {
                        PubCompReason::Success
                    } else {
                        PubCompReason::PacketIdentifierNotFound
                    };
                    self.write(Packet::PubComp(
                        PubComp {
                            pkid: r.pkid,
                            reason,
                        },
                        None,
                    ));
                } else {
                    // The router only recognises PUBREL without properties.
                    self.to_router.push(Packet::PubRel(r, None));
                }
                None
            }
            Packet::PubComp(c, _) => {
                self.forward_if_linked(Packet::PubComp(c, None));
                None
            }
            Packet::Subscribe(s, props) => self.on_subscribe(s, props),
            Packet::Unsubscribe(u, _) => {
                // Answered here: the router acks only filters it knows,
                // one UNSUBACK per filter.
                let reasons = vec![UnsubAckReason::Success; u.filters.len()];
                self.write(Packet::UnsubAck(
                    UnsubAck {
                        pkid: u.pkid,
                        reasons,
                    },
                    None,
                ));
                self.forward_if_linked(Packet::Unsubscribe(u, None));
                None
            }
            Packet::PingReq(_) => {
                self.write(Packet::PingResp(PingResp));
                None
            }
            Packet::Disconnect(d, props) => {
                if let Some(n) = props.and_then(|p| p.session_expiry_interval) {
                    if self.session_expiry == SessionExpiry::WithConnection && n != 0 {
                        return Some(End::violation(
                            DisconnectReason::ProtocolError,
                            "a Session Expiry Interval of 0 at CONNECT cannot be raised at DISCONNECT",
                        ));
                    }
                    self.session_expiry = SessionExpiry::from_interval(Some(n));
                }
                Some(End::client(
                    d.reason_code == DisconnectReasonCode::DisconnectWithWillMessage,
                ))
            }
            Packet::Connect(..) => Some(End::violation(
                DisconnectReason::ProtocolError,
                "second CONNECT",
            )),
            Packet::ConnAck(..)
            | Packet::SubAck(..)
            | Packet::UnsubAck(..)
            | Packet::PingResp(_) => Some(End::violation(
                DisconnectReason::ProtocolError,
                "packet type not allowed from a client",
            )),
        }
    }

    fn on_publish(
        &mut self,
        mut publish: Publish,
        mut props: Option<PublishProperties>,
        peeked: Option<(u8, u16)>,
    ) -> Option<End> {
        if let Some(p) = props.as_mut() {
            if !p.subscription_identifiers.is_empty() {
                return Some(End::violation(
                    DisconnectReason::ProtocolError,
                    "PUBLISH from a client must not carry subscription identifiers",
                ));
            }
            if let Some(alias) = p.topic_alias.take() {
                if alias == 0 || alias > self.cfg.topic_alias_max {
                    return Some(End::violation(
                        DisconnectReason::TopicAliasInvalid,
                        format!("topic alias {alias} out of range"),
                    ));
                }
                if publish.topic.is_empty() {
                    match self.aliases.get(&alias) {
                        Some(t) => publish.topic = t.clone(),
                        None => {
                            return Some(End::violation(
                                DisconnectReason::ProtocolError,
                                format!("topic alias {alias} is not set"),
                            ))
                        }
                    }
                } else {
                    self.aliases.insert(alias, publish.topic.clone());
                }
            }
        }
        let Ok(topic) = std::str::from_utf8(&publish.topic) else {
            return Some(End::violation(
                DisconnectReason::MalformedPacket,
                "topic is not UTF-8",
            ));
        };
        if !valid_topic_name(topic) {
            return Some(End::violation(
                DisconnectReason::TopicNameInvalid,
                "topic name is empty or contains wildcards",
            ));
        }
        if self.acl.may_publish(topic) {
            self.to_router.push(Packet::Publish(publish, props));
            return None;
        }
        tracing::debug!(topic, "PUBLISH outside the ACL dropped");
        let (qos, pkid) = peeked.unwrap_or((0, 0));
        let reason = format!("not authorized to publish to {topic}");
        let v5 = self.v5();
        match qos {
            1 => self.write(Packet::PubAck(
                PubAck {
                    pkid,
                    reason: if v5 {
                        PubAckReason::NotAuthorized
                    } else {
                        PubAckReason::Success
                    },
                },
                v5.then(|| PubAckProperties {
                    reason_string: Some(reason),
                    user_properties: Vec::new(),
                }),
            )),
            2 => {
                self.denied_qos2.insert(pkid);
                self.write(Packet::PubRec(
                    PubRec {
                        pkid,
                        reason: if v5 {
                            PubRecReason::NotAuthorized
                        } else {
                            PubRecReason::Success
                        },
                    },
                    v5.then(|| PubRecProperties {
                        reason_string: Some(reason),
                        user_properties: Vec::new(),
                    }),
                ));
            }
            _ => {}
        }
        None
    }

    fn on_subscribe(&mut self, sub: Subscribe, props: Option<SubscribeProperties>) -> Option<End> {
        if props.as_ref().and_then(|p| p.id) == Some(0) {
            return Some(End::violation(
                DisconnectReason::ProtocolError,
                "subscription identifier 0",
            ));
        }
        let v5 = self.v5();
        let mut slots = Vec::with_capacity(sub.filters.len());
        let mut allowed = Vec::with_capacity(sub.filters.len());
        for f in sub.filters {
            match self.acl.check_subscribe(&f.path) {
                SubscribeVerdict::Allowed => {
                    slots.push(None);
                    allowed.push(f);
                }
                SubscribeVerdict::NotAuthorized => {
                    tracing::debug!(filter = %f.path, "SUBSCRIBE outside the ACL refused");
                    slots.push(Some(if v5 {
                        SubscribeReasonCode::NotAuthorized
                    } else {
                        SubscribeReasonCode::Failure
                    }));
                }
                SubscribeVerdict::Invalid => slots.push(Some(if v5 {
                    SubscribeReasonCode::TopicFilterInvalid
                } else {
                    SubscribeReasonCode::Failure
                })),
            }
        }
        if allowed.is_empty() {
            self.write(Packet::SubAck(
                SubAck {
                    pkid: sub.pkid,
                    return_codes: slots.into_iter().flatten().collect(),
                },
                None,
            ));
            return None;
        }
        if allowed.len() != slots.len() {
            self.pending_subacks.insert(sub.pkid, slots);
        }
        self.to_router.push(Packet::Subscribe(
            Subscribe {
                pkid: sub.pkid,
                filters: allowed,
            },
            props,
        ));
        None
    }

    fn on_notification(&mut self, n: Notification, unschedule: &mut bool) -> Option<End> {
        if matches!(n, Notification::Unschedule) {
            *unschedule = true;
            return None;
        }
        match Option::<Packet>::from(n) {
            None => None,
            // Answered here already.
            Some(Packet::ConnAck(..) | Packet::UnsubAck(..) | Packet::PingResp(_)) => None,
            Some(Packet::SubAck(mut ack, props)) => {
                if let Some(slots) = self.pending_subacks.remove(&ack.pkid) {
                    let mut from_router = ack.return_codes.into_iter();
                    ack.return_codes = slots
                        .into_iter()
                        .map(|s| {
                            s.or_else(|| from_router.next())
                                .unwrap_or(SubscribeReasonCode::Unspecified)
                        })
                        .collect();
                }
                self.write(Packet::SubAck(ack, props));
                None
            }
            Some(Packet::Disconnect(d, props)) => {
                let why = format!("router disconnected the session: {:?}", d.reason_code);
                if self.v5() {
                    self.write(Packet::Disconnect(d, props));
                }
                Some(End::router(&why))
            }
            Some(p) => {
                self.write(p);
                None
            }
        }
    }
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

    #[test]
    fn client_ids() {
        assert!(valid_client_id("pk.dev:1"));
        assert!(!valid_client_id(""));
        assert!(!valid_client_id("a/b"));
        assert!(!valid_client_id("a#"));
        assert!(!valid_client_id("$SYS"));
        assert!(!valid_client_id("\0gateway-wills"));
    }
}

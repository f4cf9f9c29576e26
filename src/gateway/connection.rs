//! One client connection, from the first byte to the close.
//!
//! 1. Handshake (`handshake.rs`): the CONNECT, room, admission and
//!    registration; a refusal is answered here with its CONNACK code (MQTT
//!    5: with Reason String) and the socket closed.
//! 2. CONNACK, then the loop: packets flow socket → session (`session.rs`:
//!    ACL, aliases, acks answered here) → router, and router → socket.
//!    Clean sessions get their router link when they first SUBSCRIBE or
//!    PUBLISH (only while still the registered session of their client id).
//! 3. End: client DISCONNECT (no will, unless MQTT 5 reason 0x04), socket
//!    closed or broken, keepalive expiry (1.5 × keepalive, 0 = none),
//!    protocol violation, oversized packet, or an order from the online
//!    registry. The router link is closed with a DISCONNECT (so stored
//!    sessions are kept by the router); then, unless the session was taken
//!    over, `lingering.rs` publishes the will (none after a normal
//!    DISCONNECT) now or after its delay, and discards the stored session
//!    now or at its expiry.
//!
//! An idle connection holds no read or write buffer: bytes are read through
//! a stack buffer into `rbuf` only when they arrive, and both buffers are
//! released once empty.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use rumqttd::protocol::{self, ConnAck, ConnAckProperties, Packet};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::Semaphore;
use tokio::time::Instant;

use super::codec::{close, close_lingering, peek_publish, read_some, write_out, Codec};
use super::codes::{self, DisconnectReason};
use super::control::{Control, ControlRx};
use super::handshake::{handshake, Admitted, Refusal};
use super::lingering::{Ended, Will};
use super::router_link::{LinkClosed, RouterLink};
use super::session::{End, Session};
use super::{Authenticator, Identity, ListenerConfig, ProtocolVersion, Shared};
use crate::events::{Event, EventKind};

/// What every connection of one listener shares.
pub(crate) struct ListenerCtx {
    pub(crate) tls: bool,
    pub(crate) config: ListenerConfig,
    pub(crate) auth: Arc<dyn Authenticator>,
    pub(crate) gw: Arc<Shared>,
    /// Bounds concurrent link creations (router Connect events in flight).
    pub(crate) links: Semaphore,
    pub(crate) metrics: ListenerMetrics,
}

/// The metrics every accepted connection touches, registered once per
/// listener (the `metrics` macros look their key up at every call). Made
/// after the process's recorder is installed (`Broker::start`), or they
/// record nothing.
pub(crate) struct ListenerMetrics {
    accepted: metrics::Counter,
    connack_seconds: metrics::Histogram,
    online_devices: metrics::Gauge,
}

impl ListenerMetrics {
    pub(crate) fn new(listener: &str) -> Self {
        let name = listener.to_owned();
        ListenerMetrics {
            accepted: connects_counter(listener, "accepted"),
            connack_seconds: metrics::histogram!("activation_connack_seconds", "listener" => name),
            online_devices: metrics::gauge!("activation_online_devices"),
        }
    }
}

/// `activation_connects_total` of one listener and result.
fn connects_counter(listener: &str, result: &'static str) -> metrics::Counter {
    metrics::counter!("activation_connects_total", "listener" => listener.to_owned(), "result" => result)
}

/// Bytes of router output gathered before they are written out.
const MAX_WRITE_BATCH: usize = 1024 * 1024;

/// Serves one accepted connection to its end.
///
/// The task's future is as large as the largest state it may be in, and an
/// idle connection sits in the loop's state for its whole life: every other
/// phase (handshake, CONNACK, refusal, end) runs as a boxed future, so only
/// what the loop needs stays allocated per idle connection.
pub(crate) async fn serve<S>(mut stream: S, peer: SocketAddr, ctx: Arc<ListenerCtx>)
where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    let cfg = &ctx.config;
    let started = std::time::Instant::now();
    let mut rbuf = BytesMut::new();
    let admitted = match Box::pin(handshake(&mut stream, peer, &ctx, &mut rbuf)).await {
        Ok(a) => a,
        Err(refusal) => return Box::pin(refuse(&mut stream, peer, &ctx, refusal, started)).await,
    };
    let Admitted {
        codec,
        connect,
        will,
        client_id,
        admission,
        session_expiry,
        stored,
        seq,
        link,
        ctrl_rx,
        limits,
    } = admitted;
    let gw = ctx.gw.clone();
    if rbuf.is_empty() {
        // The CONNECT's read buffer is not kept by an idle connection.
        rbuf = BytesMut::new();
    }

    // From here on the session exists in the registry (and maybe the
    // router); the guard undoes both should this task unwind.
    let mut guard = SessionGuard {
        gw: gw.clone(),
        client_id,
        seq,
        link,
    };
    let mut session = Session::new(
        codec,
        &admission.acl,
        cfg,
        BytesMut::new(),
        guard.link.is_some(),
        session_expiry,
        limits,
    );
    let keep_alive = Box::pin(connack(
        &mut stream,
        &mut session,
        &connect,
        &guard,
        &admission.identity,
        peer,
        &ctx,
        started,
    ))
    .await;
    let end = match keep_alive {
        Some(keep_alive) => {
            let mut conn = Connection {
                stream: &mut stream,
                rbuf,
                guard: &mut guard,
                ctrl_rx,
                cfg,
            };
            conn.run(&mut session, keep_alive).await
        }
        None => End::closed("connection lost before CONNACK"),
    };
    Box::pin(finish(
        &mut stream,
        session,
        guard,
        end,
        &admission.identity,
        will,
        stored,
        peer,
        &ctx.metrics,
    ))
    .await;
}

/// Sends the CONNACK of an admitted session and tells who is online: the
/// keepalive in force, or `None` if the CONNACK could not be written.
#[allow(clippy::too_many_arguments)]
async fn connack<S>(
    stream: &mut S,
    session: &mut Session<'_>,
    connect: &rumqttd::protocol::Connect,
    guard: &SessionGuard,
    identity: &Identity,
    peer: SocketAddr,
    ctx: &ListenerCtx,
    started: std::time::Instant,
) -> Option<u16>
where
    S: AsyncWrite + Unpin,
{
    let cfg = &ctx.config;
    let version = session.codec.version();
    let client_id = &guard.client_id;
    let session_present = guard.link.as_ref().is_some_and(RouterLink::session_present);
    // MQTT 5: a keepalive above the listener's longest (or none) is
    // replaced by it, told in the CONNACK. MQTT 3.1.1 cannot be told.
    let max_ka = cfg.max_keep_alive_secs;
    let keep_alive = match version {
        ProtocolVersion::V5
            if max_ka > 0 && (connect.keep_alive == 0 || connect.keep_alive > max_ka) =>
        {
            max_ka
        }
        _ => connect.keep_alive,
    };
    let connack_props = match version {
        ProtocolVersion::V4 => None,
        ProtocolVersion::V5 => Some(ConnAckProperties {
            server_keep_alive: (keep_alive != connect.keep_alive).then_some(keep_alive),
            receive_max: (cfg.receive_maximum < u16::MAX).then_some(cfg.receive_maximum),
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
    session.write(Packet::ConnAck(
        ConnAck {
            session_present,
            code: protocol::ConnectReturnCode::Success,
        },
        connack_props,
    ));
    let connack_sent = flush(stream, &mut session.wbuf, cfg.write_timeout)
        .await
        .is_ok();
    ctx.metrics.accepted.increment(1);
    ctx.metrics
        .connack_seconds
        .record(started.elapsed().as_secs_f64());

    tracing::debug!(%peer, %client_id, protocol = version.as_str(), session_present, "connected");
    if let Identity::Device {
        product_key,
        device_key,
    } = identity
    {
        let gw = &guard.gw;
        ctx.metrics.online_devices.increment(1);
        if gw.events.wants(EventKind::DeviceConnected) {
            gw.events.publish(
                Event::new(EventKind::DeviceConnected, gw.clock.now())
                    .device(product_key, device_key)
                    .with("ClientId", client_id.as_str())
                    .with("Protocol", version.as_str())
                    .with("Ip", peer.ip().to_string()),
            );
        }
    }
    connack_sent.then_some(keep_alive)
}

/// Ends a session: tells an MQTT 5 client why, closes the socket, ends the
/// session in the router and the registry, hands its will and stored
/// session to `lingering.rs` (unless taken over) and tells who left.
#[allow(clippy::too_many_arguments)]
async fn finish<S>(
    stream: &mut S,
    mut session: Session<'_>,
    mut guard: SessionGuard,
    end: End,
    identity: &Identity,
    will: Option<Box<Will>>,
    stored: bool,
    peer: SocketAddr,
    metrics: &ListenerMetrics,
) where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let version = session.codec.version();
    if let Some((reason, message)) = &end.notify {
        if let Some(p) = codes::disconnect_packet(version, *reason, message) {
            session.write(p);
        }
    }
    let _ = flush(stream, &mut session.wbuf, Duration::from_secs(1)).await;
    if end.linger {
        close_lingering(stream, Duration::from_secs(1)).await;
    } else {
        close(stream).await;
    }

    let gw = guard.gw.clone();
    let _ending = super::shutdown::Ending::start(&gw);
    guard.finish(end.link_gone).await;
    let client_id = &guard.client_id;
    if !end.taken_over {
        gw.connection_ended(Ended {
            client_id: client_id.clone(),
            stored,
            expiry: session.session_expiry,
            will: will.filter(|_| end.will).map(|w| *w),
        })
        .await;
    }

    tracing::debug!(%peer, %client_id, reason = %end.reason, "disconnected");
    if let Identity::Device {
        product_key,
        device_key,
    } = identity
    {
        metrics.online_devices.decrement(1);
        if gw.events.wants(EventKind::DeviceDisconnected) {
            gw.events.publish(
                Event::new(EventKind::DeviceDisconnected, gw.clock.now())
                    .device(product_key, device_key)
                    .with("ClientId", client_id.as_str())
                    .with("Reason", end.reason.as_str()),
            );
        }
    }
}

/// Answers a refused handshake and closes the socket.
async fn refuse<S>(
    stream: &mut S,
    peer: SocketAddr,
    ctx: &ListenerCtx,
    refusal: Refusal,
    started: std::time::Instant,
) where
    S: AsyncWrite + Unpin,
{
    let cfg = &ctx.config;
    let mut w = BytesMut::new();
    let result = match &refusal {
        Refusal::Close(_) => None,
        Refusal::UnsupportedVersion => Some("unsupported_protocol"),
        Refusal::Connack { rejection, .. } => Some(rejection.code.metric_result()),
    };
    match refusal {
        Refusal::Close(why) => {
            tracing::debug!(%peer, why, "connection closed before CONNACK");
            return;
        }
        Refusal::UnsupportedVersion => {
            Codec::new(ProtocolVersion::V4).write(codes::unsupported_protocol_connack(), &mut w);
        }
        Refusal::Connack {
            version,
            client_id,
            rejection,
        } => {
            tracing::debug!(%peer, %client_id, code = ?rejection.code, reason = %rejection.reason, "CONNECT refused");
            Codec::new(version).write(
                codes::refusal_connack(version, rejection.code, &rejection.reason),
                &mut w,
            );
        }
    }
    let _ = write_out(stream, &mut w, cfg.write_timeout).await;
    // Counted in `activation_connects_total` by result (a refusal's
    // counter is looked up here: refusals are the rare case), and timed
    // from the accepted connection in `activation_connack_seconds`.
    if let Some(result) = result {
        connects_counter(&cfg.name, result).increment(1);
        ctx.metrics
            .connack_seconds
            .record(started.elapsed().as_secs_f64());
    }
    close(stream).await;
}

/// [`write_out`], then gives the emptied buffer's memory back.
async fn flush<S: AsyncWrite + Unpin>(
    stream: &mut S,
    buf: &mut BytesMut,
    limit: Duration,
) -> Result<(), ()> {
    let res = write_out(stream, buf, limit).await;
    *buf = BytesMut::new();
    res
}

/// Ends a session in the router and the registry: normally through
/// [`SessionGuard::finish`], or on drop if the task unwinds before that.
struct SessionGuard {
    gw: Arc<Shared>,
    client_id: String,
    seq: u64,
    link: Option<RouterLink>,
}

impl SessionGuard {
    async fn finish(&mut self, link_gone: bool) {
        if let Some(link) = self.link.take() {
            if !link_gone {
                let _ = link.close().await;
            }
            self.gw.unlinked();
        }
        self.gw.online.unregister(&self.client_id, self.seq);
    }
}

impl Drop for SessionGuard {
    fn drop(&mut self) {
        self.gw.online.unregister(&self.client_id, self.seq);
        let Some(link) = self.link.take() else {
            return;
        };
        self.gw.unlinked();
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move {
                let _ = link.close().await;
            });
        }
    }
}

/// What woke the connection loop. Small: it and the futures of the loop's
/// wait are what an idle connection's task holds.
enum Wake {
    Ctrl(Option<Control>),
    Read(std::io::Result<usize>),
    /// The router link has notifications (or was closed).
    Router(Result<(), LinkClosed>),
    KeepAlive,
}

/// The I/O side of an admitted connection.
struct Connection<'a, S> {
    stream: &'a mut S,
    /// Bytes read and not yet decoded (released when empty).
    rbuf: BytesMut,
    guard: &'a mut SessionGuard,
    ctrl_rx: ControlRx,
    cfg: &'a ListenerConfig,
}

/// Waits until the router link has notifications, if there is a link.
async fn link_ready(link: &mut Option<RouterLink>) -> Result<(), LinkClosed> {
    match link {
        Some(link) => link.rx().ready().await,
        None => std::future::pending().await,
    }
}

impl<S> Connection<'_, S>
where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    async fn run(&mut self, session: &mut Session<'_>, keep_alive: u16) -> End {
        let ka = (keep_alive > 0).then(|| Duration::from_millis(u64::from(keep_alive) * 1500));
        let ka_sleep = tokio::time::sleep(ka.unwrap_or(Duration::from_secs(3600)));
        tokio::pin!(ka_sleep);

        // Bytes that arrived right behind the CONNECT.
        let mut pending_input = !self.rbuf.is_empty();
        loop {
            let wake = if pending_input {
                pending_input = false;
                Wake::Read(Ok(self.rbuf.len()))
            } else {
                tokio::select! {
                    biased;
                    c = self.ctrl_rx.recv() => Wake::Ctrl(c),
                    r = read_some(self.stream, &mut self.rbuf) => Wake::Read(r),
                    n = link_ready(&mut self.guard.link) => Wake::Router(n),
                    _ = &mut ka_sleep, if ka.is_some() => Wake::KeepAlive,
                }
            };
            let end = match wake {
                Wake::Ctrl(Some(Control::Disconnect { reason, message })) => {
                    Some(End::ordered(reason, message))
                }
                Wake::Ctrl(None) => Some(End::ordered(
                    DisconnectReason::ServerShuttingDown,
                    String::new(),
                )),
                Wake::KeepAlive => Some(End::violation(
                    DisconnectReason::KeepAliveTimeout,
                    "no packet within 1.5 times the keepalive",
                )),
                Wake::Read(Ok(0)) => Some(End::closed("connection closed by client")),
                Wake::Read(Err(e)) => Some(End::closed(format!("network error: {e}"))),
                Wake::Read(Ok(_)) => {
                    if let Some(ka) = ka {
                        ka_sleep.as_mut().reset(Instant::now() + ka);
                    }
                    // Boxed (like `on_router`): their states are large and
                    // short-lived, the loop's waiting state small and
                    // long-lived (an idle connection's memory).
                    Box::pin(self.on_input(session)).await
                }
                Wake::Router(first) => Box::pin(self.on_router(session, first)).await,
            };
            if let Some(end) = end {
                return end;
            }
        }
    }

    /// Decodes and handles every complete packet in `rbuf`, hands what is
    /// for the router to it, writes the answers out.
    async fn on_input(&mut self, session: &mut Session<'_>) -> Option<End> {
        let max = self.cfg.max_packet_size;
        let mut end = None;
        loop {
            let peeked = peek_publish(&self.rbuf);
            match session.codec.read(&mut self.rbuf, max) {
                Ok(packet) => {
                    if let Some(e) = session.on_packet(packet, peeked) {
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
        if self.rbuf.is_empty() {
            self.rbuf = BytesMut::new();
        }
        // Packets read before an end are still delivered.
        if !session.to_router.is_empty() && !session.linked {
            if let Err(e) = Box::pin(self.open_link(session)).await {
                end = end.or(Some(e));
            }
        }
        let sent = self.send_and_flush(session).await;
        end.or(sent)
    }

    /// Hands the router what the session queued for it (nothing if the
    /// link is not open) and writes out what it queued for the client; the
    /// first failure, if any.
    async fn send_and_flush(&mut self, session: &mut Session<'_>) -> Option<End> {
        let mut end = None;
        if let Some(link) = self.guard.link.as_mut() {
            if link.tx().send(&mut session.to_router).await.is_err() {
                end = Some(End::router("router link closed"));
            }
        }
        // Emptied by the send; its memory goes back too.
        session.to_router = Vec::new();
        if flush(self.stream, &mut session.wbuf, self.cfg.write_timeout)
            .await
            .is_err()
        {
            end = end.or(Some(End::closed("write failed or timed out")));
        }
        end
    }

    /// Handles what the router link has ready and whatever else it gets
    /// meanwhile (bounded), writes it out, then wakes the link if the router
    /// unscheduled it.
    async fn on_router(
        &mut self,
        session: &mut Session<'_>,
        ready: Result<(), LinkClosed>,
    ) -> Option<End> {
        let mut unschedule = false;
        let mut end = None;
        let mut ready = Some(ready);
        let mut budget = 512;
        'batch: while let Some(r) = ready.take() {
            let Some(link) = self.guard.link.as_mut() else {
                break;
            };
            if r.is_err() {
                end = Some(self.router_gone());
                break;
            }
            while let Some(n) = link.rx().try_next() {
                end = session.on_notification(n, &mut unschedule);
                budget -= 1;
                if end.is_some() || budget == 0 || session.wbuf.len() > MAX_WRITE_BATCH {
                    break 'batch;
                }
            }
            // Take whatever else is ready without waiting.
            ready = tokio::select! {
                biased;
                r = link.rx().ready() => Some(r),
                _ = std::future::ready(()) => None,
            };
        }
        // Acks the session gave on the client's behalf (withheld
        // deliveries) go to the router before the writes go out.
        let sent = self.send_and_flush(session).await;
        end = end.or(sent);
        if end.is_some() {
            return end;
        }
        if let (true, Some(link)) = (unschedule, self.guard.link.as_mut()) {
            if link.rx().wake().await.is_err() {
                return Some(self.router_gone());
            }
        }
        None
    }

    /// Opens the router link of a clean session that has none yet, carrying
    /// what the session queued for the router (the router takes both
    /// together). The link is quiet: once its Connect is in the router's
    /// channel, what the session answered for those packets (a SUBACK) goes
    /// out, and no ConnAck or SubAck comes back to wake this connection.
    async fn open_link(&mut self, session: &mut Session<'_>) -> Result<(), End> {
        let built = self
            .guard
            .gw
            .link_registered(
                &self.guard.client_id,
                self.guard.seq,
                &mut session.to_router,
            )
            .await;
        match built {
            Ok(Some(link)) => {
                self.guard.link = Some(link);
                session.linked = true;
                Ok(())
            }
            // Another connection took the client id over meanwhile; its
            // order is on the way (or here).
            Ok(None) => Err(match self.ctrl_rx.try_recv() {
                Some(Control::Disconnect { reason, message }) => End::ordered(reason, message),
                None => End::ordered(
                    DisconnectReason::SessionTakenOver,
                    String::from("another connection took over this session"),
                ),
            }),
            Err(e) => {
                tracing::warn!(client_id = %self.guard.client_id, error = %e, "cannot link to the router");
                Err(End::violation(
                    DisconnectReason::UnspecifiedError,
                    "broker unavailable",
                ))
            }
        }
    }

    /// The router dropped our link: a takeover it saw first, or a router
    /// decision.
    fn router_gone(&mut self) -> End {
        let mut end = match self.ctrl_rx.try_recv() {
            Some(Control::Disconnect { reason, message }) => End::ordered(reason, message),
            None => End::router("router closed the session"),
        };
        end.link_gone = true;
        end
    }
}

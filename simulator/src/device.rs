//! One device's connection: CONNECT with signed credentials, the timed
//! CONNACK, then a [`Session`] that keeps the connection alive, publishes,
//! and ends cleanly (DISCONNECT) or abruptly (socket dropped).
//!
//! Two clients: rumqttc's `AsyncClient`/`EventLoop` (v4 and v5), and for
//! `--source-ip` the simulator's own client on a tokio socket bound to the
//! source address, encoding and decoding packets with `rumqttc::mqttbytes`
//! (rumqttc 0.25 can bind a device name but not a local address).

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use activation_broker::clock::Clock;
use activation_client::connack::{v4_code, v5_code};
use activation_client::credentials::{client_id, device_credentials};
use bytes::BytesMut;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::OwnedWriteHalf;
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::devices::Device;
use crate::report::Stats;

/// Largest packet the simulator reads or writes.
const MAX_PACKET: usize = 1024 * 1024;
/// Most unacknowledged QoS 1 publishes per rumqttc client.
const INFLIGHT: u16 = 100;

/// Where and how devices connect.
#[derive(Debug, Clone)]
pub struct Target {
    pub host: String,
    pub port: u16,
    /// 4 (MQTT 3.1.1) or 5.
    pub protocol: u8,
    /// Keep alive in seconds (0 = off).
    pub keepalive: u16,
    /// CONNACK timeout, TCP connect included.
    pub timeout: Duration,
    /// Use the bound-socket client instead of rumqttc's event loop.
    pub own_socket: bool,
    /// Send an empty Client Identifier (the broker assigns one).
    pub empty_client_id: bool,
    /// Added to the credential timestamp, in milliseconds.
    pub clock_skew_ms: i64,
}

/// The result of one CONNECT.
pub enum Outcome {
    Accepted(Session),
    Refused { code: u8, reason: Option<String> },
    Error(String),
    Timeout,
}

/// One connect attempt and its CONNACK latency (time to the CONNACK or to
/// the error).
pub struct Attempt {
    pub outcome: Outcome,
    pub latency: Duration,
}

impl Attempt {
    /// Counts the attempt in `stats` (the attempt itself is counted by the
    /// caller before connecting).
    pub fn record(&self, stats: &Stats) {
        match &self.outcome {
            Outcome::Accepted(_) => stats.accepted(self.latency),
            Outcome::Refused { code, reason } => {
                stats.refused_because(*code, reason.as_deref(), self.latency)
            }
            Outcome::Error(e) => stats.error(e),
            Outcome::Timeout => stats.timeout(),
        }
    }
}

impl std::fmt::Display for SessionEnd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SessionEnd::Disconnected => write!(f, "disconnected"),
            SessionEnd::ClosedByServer(r) => write!(f, "closed by broker: {r}"),
            SessionEnd::Failed(r) => write!(f, "failed: {r}"),
        }
    }
}

/// How a session ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SessionEnd {
    /// We sent DISCONNECT.
    Disconnected,
    /// The broker closed the connection (or sent DISCONNECT).
    ClosedByServer(String),
    /// Network or protocol error.
    Failed(String),
}

enum Backend {
    V4(rumqttc::AsyncClient),
    V5(rumqttc::v5::AsyncClient),
    Own(mpsc::Sender<Command>),
}

enum Command {
    Publish {
        topic: String,
        payload: Vec<u8>,
        qos1: bool,
    },
    Disconnect,
}

/// An accepted connection, driven by its own task.
pub struct Session {
    backend: Backend,
    driver: Option<JoinHandle<SessionEnd>>,
    ended: Option<SessionEnd>,
    sent: u64,
    acked: Arc<AtomicU64>,
}

impl Session {
    fn new(backend: Backend, driver: JoinHandle<SessionEnd>, acked: Arc<AtomicU64>) -> Self {
        Session {
            backend,
            driver: Some(driver),
            ended: None,
            sent: 0,
            acked,
        }
    }

    /// QoS 1 messages sent on this session.
    pub fn sent_qos1(&self) -> u64 {
        self.sent
    }

    /// PUBACKs received on this session (success or failure reason).
    pub fn acked(&self) -> u64 {
        self.acked.load(Ordering::Relaxed)
    }

    /// How the session ended, if it has.
    pub fn ended(&self) -> Option<&SessionEnd> {
        self.ended.as_ref()
    }

    /// How the session ended, if its connection is already gone (does not
    /// wait).
    pub async fn check_ended(&mut self) -> Option<SessionEnd> {
        if self.ended.is_none() && self.driver.as_ref().is_some_and(|d| d.is_finished()) {
            return Some(self.join().await);
        }
        self.ended.clone()
    }

    async fn join(&mut self) -> SessionEnd {
        if let Some(end) = &self.ended {
            return end.clone();
        }
        let end = match self.driver.take() {
            Some(h) => h
                .await
                .unwrap_or_else(|e| SessionEnd::Failed(format!("session task: {e}"))),
            None => SessionEnd::Failed("session task gone".into()),
        };
        self.ended = Some(end.clone());
        end
    }

    /// Keeps the connection for `d`; returns early with the end if the
    /// connection ends first.
    pub async fn hold(&mut self, d: Duration) -> Option<SessionEnd> {
        if let Some(end) = &self.ended {
            return Some(end.clone());
        }
        let Some(driver) = self.driver.as_mut() else {
            return Some(SessionEnd::Failed("session task gone".into()));
        };
        tokio::select! {
            _ = tokio::time::sleep(d) => None,
            res = driver => {
                self.driver = None;
                let end = res.unwrap_or_else(|e| SessionEnd::Failed(format!("session task: {e}")));
                self.ended = Some(end.clone());
                Some(end)
            }
        }
    }

    /// Queues a message; `Err` if the connection is gone.
    pub async fn publish(
        &mut self,
        topic: &str,
        payload: Vec<u8>,
        qos1: bool,
    ) -> Result<(), String> {
        if let Some(end) = &self.ended {
            return Err(format!("connection ended: {end:?}"));
        }
        let res = match &self.backend {
            Backend::V4(c) => {
                let qos = if qos1 {
                    rumqttc::QoS::AtLeastOnce
                } else {
                    rumqttc::QoS::AtMostOnce
                };
                c.publish(topic, qos, false, payload)
                    .await
                    .map_err(|e| e.to_string())
            }
            Backend::V5(c) => {
                let qos = if qos1 {
                    rumqttc::v5::mqttbytes::QoS::AtLeastOnce
                } else {
                    rumqttc::v5::mqttbytes::QoS::AtMostOnce
                };
                c.publish(topic, qos, false, payload)
                    .await
                    .map_err(|e| e.to_string())
            }
            Backend::Own(tx) => tx
                .send(Command::Publish {
                    topic: topic.to_owned(),
                    payload,
                    qos1,
                })
                .await
                .map_err(|_| "connection closed".to_owned()),
        };
        if res.is_ok() && qos1 {
            self.sent += 1;
        }
        res
    }

    /// Sends DISCONNECT and waits (at most `grace`) for the connection to
    /// close; past that the socket is dropped.
    pub async fn disconnect(mut self, grace: Duration) -> SessionEnd {
        if let Some(end) = &self.ended {
            return end.clone();
        }
        let sent = match &self.backend {
            Backend::V4(c) => c.try_disconnect().is_ok(),
            Backend::V5(c) => c.try_disconnect().is_ok(),
            Backend::Own(tx) => tx.try_send(Command::Disconnect).is_ok(),
        };
        if !sent {
            // The request queue is full or closed: close the hard way.
            self.abort();
            return SessionEnd::Failed("could not queue DISCONNECT".into());
        }
        match tokio::time::timeout(grace, self.join()).await {
            Ok(end) => end,
            Err(_) => {
                self.abort();
                SessionEnd::Failed("DISCONNECT not written in time".into())
            }
        }
    }

    /// Drops the connection without DISCONNECT (the broker sees the TCP
    /// connection close).
    pub fn drop_abruptly(mut self) {
        self.abort();
    }

    fn abort(&mut self) {
        if let Some(h) = self.driver.take() {
            h.abort();
        }
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        self.abort();
    }
}

/// Connects `device`, timing the CONNACK.
pub async fn connect(
    device: &Device,
    target: &Target,
    source_ip: Option<IpAddr>,
    stats: &Arc<Stats>,
) -> Attempt {
    let started = Instant::now();
    let now_ms = Clock::system().now().saturating_add(target.clock_skew_ms);
    let (user, password) = device_credentials(
        &device.product_key,
        &device.device_key,
        &device.secret,
        now_ms,
    );
    let id = if target.empty_client_id {
        String::new()
    } else {
        client_id(&device.product_key, &device.device_key)
    };
    let creds = Credentials { id, user, password };
    let fut = async {
        if target.own_socket || source_ip.is_some() {
            own::connect(creds, target, source_ip, stats.clone()).await
        } else if target.protocol == 5 {
            rumq5::connect(creds, target, stats.clone()).await
        } else {
            rumq4::connect(creds, target, stats.clone()).await
        }
    };
    let outcome = match tokio::time::timeout(target.timeout, fut).await {
        Ok(o) => o,
        Err(_) => Outcome::Timeout,
    };
    Attempt {
        outcome,
        latency: started.elapsed(),
    }
}

struct Credentials {
    id: String,
    user: String,
    password: String,
}

fn network_timeout_secs(target: &Target) -> u64 {
    // rumqttc's own connect timeout must not fire before ours.
    target.timeout.as_secs() + 2
}

mod rumq4 {
    use super::*;
    use rumqttc::{
        AsyncClient, ConnectionError, Event, EventLoop, MqttOptions, NetworkOptions, Outgoing,
        Packet,
    };

    pub(super) async fn connect(c: Credentials, target: &Target, stats: Arc<Stats>) -> Outcome {
        let mut opts = MqttOptions::new(c.id, target.host.clone(), target.port);
        opts.set_credentials(c.user, c.password);
        opts.set_keep_alive(Duration::from_secs(u64::from(target.keepalive)));
        opts.set_clean_session(true);
        opts.set_max_packet_size(MAX_PACKET, MAX_PACKET);
        opts.set_inflight(INFLIGHT);
        let (client, mut eventloop) = AsyncClient::new(opts, 64);
        let mut net = NetworkOptions::new();
        net.set_connection_timeout(network_timeout_secs(target));
        net.set_tcp_nodelay(true);
        eventloop.set_network_options(net);
        match eventloop.poll().await {
            Ok(Event::Incoming(Packet::ConnAck(_))) => {
                let acked = Arc::new(AtomicU64::new(0));
                let driver = tokio::spawn(drive(eventloop, stats, acked.clone()));
                Outcome::Accepted(Session::new(Backend::V4(client), driver, acked))
            }
            Ok(other) => Outcome::Error(format!("expected CONNACK, got {other:?}")),
            Err(ConnectionError::ConnectionRefused(code)) => Outcome::Refused {
                code: v4_code(code),
                reason: None,
            },
            Err(ConnectionError::NetworkTimeout) => Outcome::Timeout,
            Err(e) => Outcome::Error(error_kind(&e.to_string())),
        }
    }

    async fn drive(mut el: EventLoop, stats: Arc<Stats>, acked: Arc<AtomicU64>) -> SessionEnd {
        loop {
            match el.poll().await {
                Ok(Event::Incoming(Packet::PubAck(_))) => {
                    acked.fetch_add(1, Ordering::Relaxed);
                    stats.msg_acked();
                }
                Ok(Event::Incoming(Packet::Disconnect)) => {
                    return SessionEnd::ClosedByServer("DISCONNECT".into())
                }
                Ok(Event::Outgoing(Outgoing::Disconnect)) => return SessionEnd::Disconnected,
                Ok(_) => {}
                Err(e) => return end_from_error(&e.to_string()),
            }
        }
    }
}

mod rumq5 {
    use super::*;
    use rumqttc::v5::mqttbytes::v5::{Packet, PubAckReason};
    use rumqttc::v5::{AsyncClient, ConnectionError, Event, EventLoop, MqttOptions, StateError};
    use rumqttc::{NetworkOptions, Outgoing};

    pub(super) fn puback_ok(r: &PubAckReason) -> bool {
        matches!(
            r,
            PubAckReason::Success | PubAckReason::NoMatchingSubscribers
        )
    }

    pub(super) async fn connect(c: Credentials, target: &Target, stats: Arc<Stats>) -> Outcome {
        let mut opts = MqttOptions::new(c.id, target.host.clone(), target.port);
        opts.set_credentials(c.user, c.password);
        opts.set_keep_alive(Duration::from_secs(u64::from(target.keepalive)));
        opts.set_clean_start(true);
        opts.set_max_packet_size(Some(MAX_PACKET as u32));
        // rumqttc preallocates one slot per allowed in-flight publish, and
        // its v5 default (65535) costs megabytes per client.
        opts.set_outgoing_inflight_upper_limit(INFLIGHT);
        opts.set_connection_timeout(network_timeout_secs(target));
        let mut net = NetworkOptions::new();
        net.set_connection_timeout(network_timeout_secs(target));
        net.set_tcp_nodelay(true);
        opts.set_network_options(net);
        let (client, mut eventloop) = AsyncClient::new(opts, 64);
        match eventloop.poll().await {
            Ok(Event::Incoming(Packet::ConnAck(_))) => {
                let acked = Arc::new(AtomicU64::new(0));
                let driver = tokio::spawn(drive(eventloop, stats, acked.clone()));
                Outcome::Accepted(Session::new(Backend::V5(client), driver, acked))
            }
            Ok(other) => Outcome::Error(format!("expected CONNACK, got {other:?}")),
            Err(ConnectionError::ConnectionRefused(c)) => Outcome::Refused {
                code: v5_code(c),
                reason: None,
            },
            Err(ConnectionError::Timeout(_)) => Outcome::Timeout,
            Err(e) => Outcome::Error(error_kind(&e.to_string())),
        }
    }

    async fn drive(mut el: EventLoop, stats: Arc<Stats>, acked: Arc<AtomicU64>) -> SessionEnd {
        loop {
            match el.poll().await {
                Ok(Event::Incoming(Packet::PubAck(ack))) => {
                    acked.fetch_add(1, Ordering::Relaxed);
                    if puback_ok(&ack.reason) {
                        stats.msg_acked();
                    } else {
                        stats.msg_rejected();
                    }
                }
                Ok(Event::Incoming(Packet::Disconnect(d))) => {
                    let reason = d
                        .properties
                        .and_then(|p| p.reason_string)
                        .unwrap_or_default();
                    return SessionEnd::ClosedByServer(format!(
                        "DISCONNECT {:?} {reason}",
                        d.reason_code
                    ));
                }
                Ok(Event::Outgoing(Outgoing::Disconnect)) => return SessionEnd::Disconnected,
                Ok(_) => {}
                // rumqttc reports the broker's DISCONNECT as an error.
                Err(ConnectionError::MqttState(StateError::ServerDisconnect {
                    reason_code,
                    reason_string,
                })) => {
                    return SessionEnd::ClosedByServer(format!(
                        "DISCONNECT {reason_code:?} {}",
                        reason_string.unwrap_or_default()
                    ))
                }
                Err(e) => return end_from_error(&e.to_string()),
            }
        }
    }
}

/// Short, groupable error text (drops per-connection details).
fn error_kind(e: &str) -> String {
    let e = e.trim();
    if e.len() > 120 {
        let mut cut = 120;
        while !e.is_char_boundary(cut) {
            cut -= 1;
        }
        format!("{}...", &e[..cut])
    } else {
        e.to_owned()
    }
}

fn end_from_error(e: &str) -> SessionEnd {
    let lower = e.to_ascii_lowercase();
    if lower.contains("reset")
        || lower.contains("closed")
        || lower.contains("eof")
        || lower.contains("broken pipe")
    {
        SessionEnd::ClosedByServer(error_kind(e))
    } else {
        SessionEnd::Failed(error_kind(e))
    }
}

/// The simulator's own client on a (bound) tokio socket.
mod own {
    use super::*;
    use rumqttc::mqttbytes::v4;
    use rumqttc::v5::mqttbytes::v5;

    /// Packets the session cares about, either protocol.
    #[derive(Debug)]
    pub(super) enum In {
        ConnAck { code: u8, reason: Option<String> },
        PubAck { ok: bool },
        Disconnect(String),
        Other,
    }

    pub(super) struct Codec {
        pub protocol: u8,
        pkid: u16,
    }

    impl Codec {
        pub(super) fn new(protocol: u8) -> Self {
            Codec { protocol, pkid: 0 }
        }

        pub(super) fn connect(
            &self,
            c: &Credentials,
            keepalive: u16,
            buf: &mut BytesMut,
        ) -> Result<(), String> {
            if self.protocol == 5 {
                let connect = v5::Connect {
                    keep_alive: keepalive,
                    client_id: c.id.clone(),
                    clean_start: true,
                    properties: None,
                };
                let login = v5::Login::new(c.user.clone(), c.password.clone());
                v5::Packet::Connect(connect, None, Some(login))
                    .write(buf, Some(MAX_PACKET as u32))
                    .map(|_| ())
                    .map_err(|e| e.to_string())
            } else {
                let mut connect = v4::Connect::new(c.id.clone());
                connect.keep_alive = keepalive;
                connect.clean_session = true;
                connect.login = Some(v4::Login::new(c.user.clone(), c.password.clone()));
                v4::Packet::Connect(connect)
                    .write(buf, MAX_PACKET)
                    .map(|_| ())
                    .map_err(|e| e.to_string())
            }
        }

        pub(super) fn publish(
            &mut self,
            topic: &str,
            payload: Vec<u8>,
            qos1: bool,
            buf: &mut BytesMut,
        ) -> Result<(), String> {
            let pkid = if qos1 {
                self.pkid = self.pkid.checked_add(1).unwrap_or(1);
                self.pkid
            } else {
                0
            };
            if self.protocol == 5 {
                let qos = if qos1 {
                    rumqttc::v5::mqttbytes::QoS::AtLeastOnce
                } else {
                    rumqttc::v5::mqttbytes::QoS::AtMostOnce
                };
                let mut p = v5::Publish::new(topic, qos, payload, None);
                p.pkid = pkid;
                v5::Packet::Publish(p)
                    .write(buf, Some(MAX_PACKET as u32))
                    .map(|_| ())
                    .map_err(|e| e.to_string())
            } else {
                let qos = if qos1 {
                    rumqttc::QoS::AtLeastOnce
                } else {
                    rumqttc::QoS::AtMostOnce
                };
                let mut p = v4::Publish::new(topic, qos, payload);
                p.pkid = pkid;
                v4::Packet::Publish(p)
                    .write(buf, MAX_PACKET)
                    .map(|_| ())
                    .map_err(|e| e.to_string())
            }
        }

        pub(super) fn ping(&self, buf: &mut BytesMut) -> Result<(), String> {
            if self.protocol == 5 {
                v5::Packet::PingReq(v5::PingReq)
                    .write(buf, Some(MAX_PACKET as u32))
                    .map(|_| ())
                    .map_err(|e| e.to_string())
            } else {
                v4::Packet::PingReq
                    .write(buf, MAX_PACKET)
                    .map(|_| ())
                    .map_err(|e| e.to_string())
            }
        }

        pub(super) fn disconnect(&self, buf: &mut BytesMut) -> Result<(), String> {
            if self.protocol == 5 {
                v5::Packet::Disconnect(v5::Disconnect::new(
                    v5::DisconnectReasonCode::NormalDisconnection,
                ))
                .write(buf, Some(MAX_PACKET as u32))
                .map(|_| ())
                .map_err(|e| e.to_string())
            } else {
                v4::Packet::Disconnect
                    .write(buf, MAX_PACKET)
                    .map(|_| ())
                    .map_err(|e| e.to_string())
            }
        }

        /// The next complete packet in `buf`, `Ok(None)` if more bytes are
        /// needed.
        pub(super) fn decode(&self, buf: &mut BytesMut) -> Result<Option<In>, String> {
            if buf.is_empty() {
                return Ok(None);
            }
            if self.protocol == 5 {
                match v5::Packet::read(buf, Some(MAX_PACKET as u32)) {
                    Ok(v5::Packet::ConnAck(a)) => Ok(Some(In::ConnAck {
                        code: v5_code(a.code),
                        reason: a.properties.and_then(|p| p.reason_string),
                    })),
                    Ok(v5::Packet::PubAck(a)) => Ok(Some(In::PubAck {
                        ok: super::rumq5::puback_ok(&a.reason),
                    })),
                    Ok(v5::Packet::Disconnect(d)) => Ok(Some(In::Disconnect(format!(
                        "DISCONNECT {:?} {}",
                        d.reason_code,
                        d.properties
                            .and_then(|p| p.reason_string)
                            .unwrap_or_default()
                    )))),
                    Ok(_) => Ok(Some(In::Other)),
                    Err(rumqttc::v5::mqttbytes::Error::InsufficientBytes(_)) => Ok(None),
                    Err(rumqttc::v5::mqttbytes::Error::InvalidConnectReturnCode(c)) => {
                        // An unknown code still refuses the connection.
                        buf.clear();
                        Ok(Some(In::ConnAck {
                            code: c,
                            reason: None,
                        }))
                    }
                    Err(e) => Err(e.to_string()),
                }
            } else {
                match v4::Packet::read(buf, MAX_PACKET) {
                    Ok(v4::Packet::ConnAck(a)) => Ok(Some(In::ConnAck {
                        code: v4_code(a.code),
                        reason: None,
                    })),
                    Ok(v4::Packet::PubAck(_)) => Ok(Some(In::PubAck { ok: true })),
                    Ok(v4::Packet::Disconnect) => Ok(Some(In::Disconnect("DISCONNECT".into()))),
                    Ok(_) => Ok(Some(In::Other)),
                    Err(rumqttc::mqttbytes::Error::InsufficientBytes(_)) => Ok(None),
                    Err(rumqttc::mqttbytes::Error::InvalidConnectReturnCode(c)) => {
                        buf.clear();
                        Ok(Some(In::ConnAck {
                            code: c,
                            reason: None,
                        }))
                    }
                    Err(e) => Err(e.to_string()),
                }
            }
        }
    }

    async fn resolve(host: &str, port: u16, source: Option<IpAddr>) -> Result<SocketAddr, String> {
        let addrs = tokio::net::lookup_host((host, port))
            .await
            .map_err(|e| format!("resolving {host}: {e}"))?;
        let mut addrs = addrs;
        addrs
            .find(|a| source.is_none_or(|ip| ip.is_ipv4() == a.is_ipv4()))
            .ok_or_else(|| format!("{host} has no address of the source address's family"))
    }

    pub(super) async fn connect(
        c: Credentials,
        target: &Target,
        source: Option<IpAddr>,
        stats: Arc<Stats>,
    ) -> Outcome {
        let addr = match resolve(&target.host, target.port, source).await {
            Ok(a) => a,
            Err(e) => return Outcome::Error(e),
        };
        let mut stream = match activation_client::socket::connect_from(addr, source).await {
            Ok(s) => s,
            Err(e) => return Outcome::Error(error_kind(&format!("I/O: {e}"))),
        };
        let codec = Codec::new(target.protocol);
        let mut out = BytesMut::with_capacity(256);
        if let Err(e) = codec.connect(&c, target.keepalive, &mut out) {
            return Outcome::Error(e);
        }
        if let Err(e) = stream.write_all(&out).await {
            return Outcome::Error(error_kind(&format!("I/O: {e}")));
        }
        let mut buf = BytesMut::with_capacity(256);
        loop {
            match codec.decode(&mut buf) {
                Ok(Some(In::ConnAck { code: 0, .. })) => break,
                Ok(Some(In::ConnAck { code, reason })) => {
                    return Outcome::Refused { code, reason };
                }
                Ok(Some(other)) => {
                    return Outcome::Error(format!("expected CONNACK, got {other:?}"))
                }
                Ok(None) => {}
                Err(e) => return Outcome::Error(error_kind(&e)),
            }
            match stream.read_buf(&mut buf).await {
                Ok(0) => return Outcome::Error("connection closed before CONNACK".into()),
                Ok(_) => {}
                Err(e) => return Outcome::Error(error_kind(&format!("I/O: {e}"))),
            }
        }
        let (tx, rx) = mpsc::channel(64);
        let acked = Arc::new(AtomicU64::new(0));
        let driver = tokio::spawn(drive(
            stream,
            buf,
            codec,
            target.keepalive,
            rx,
            stats,
            acked.clone(),
        ));
        Outcome::Accepted(Session::new(Backend::Own(tx), driver, acked))
    }

    async fn write(wr: &mut OwnedWriteHalf, out: &mut BytesMut) -> Result<(), SessionEnd> {
        let res = wr.write_all(out).await;
        out.clear();
        res.map_err(|e| end_from_error(&format!("I/O: {e}")))
    }

    async fn drive(
        stream: TcpStream,
        mut buf: BytesMut,
        mut codec: Codec,
        keepalive: u16,
        mut rx: mpsc::Receiver<Command>,
        stats: Arc<Stats>,
        acked: Arc<AtomicU64>,
    ) -> SessionEnd {
        let (mut rd, mut wr) = stream.into_split();
        let mut out = BytesMut::with_capacity(256);
        // Keep alive: a PINGREQ every `keepalive` seconds (an hour when off,
        // which never sends one within any realistic run).
        let period = Duration::from_secs(if keepalive == 0 {
            3600
        } else {
            u64::from(keepalive)
        });
        let mut ping = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
        loop {
            tokio::select! {
                cmd = rx.recv() => {
                    let res = match cmd {
                        Some(Command::Publish { topic, payload, qos1 }) => {
                            codec.publish(&topic, payload, qos1, &mut out)
                        }
                        Some(Command::Disconnect) => {
                            if let Err(e) = codec.disconnect(&mut out) {
                                return SessionEnd::Failed(e);
                            }
                            if let Err(end) = write(&mut wr, &mut out).await {
                                return end;
                            }
                            let _ = wr.shutdown().await;
                            return SessionEnd::Disconnected;
                        }
                        // The session was dropped: close without DISCONNECT.
                        None => return SessionEnd::Failed("session dropped".into()),
                    };
                    if let Err(e) = res {
                        return SessionEnd::Failed(e);
                    }
                    if let Err(end) = write(&mut wr, &mut out).await {
                        return end;
                    }
                }
                _ = ping.tick(), if keepalive > 0 => {
                    if let Err(e) = codec.ping(&mut out) {
                        return SessionEnd::Failed(e);
                    }
                    if let Err(end) = write(&mut wr, &mut out).await {
                        return end;
                    }
                }
                n = rd.read_buf(&mut buf) => {
                    match n {
                        Ok(0) => return SessionEnd::ClosedByServer("connection closed".into()),
                        Ok(_) => {}
                        Err(e) => return end_from_error(&format!("I/O: {e}")),
                    }
                    loop {
                        match codec.decode(&mut buf) {
                            Ok(Some(In::PubAck { ok })) => {
                                acked.fetch_add(1, Ordering::Relaxed);
                                if ok {
                                    stats.msg_acked();
                                } else {
                                    stats.msg_rejected();
                                }
                            }
                            Ok(Some(In::Disconnect(reason))) => {
                                return SessionEnd::ClosedByServer(reason);
                            }
                            Ok(Some(_)) => {}
                            Ok(None) => break,
                            Err(e) => return SessionEnd::Failed(e),
                        }
                    }
                }
            }
        }
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn encodes_connect_and_decodes_connack() {
            for protocol in [4u8, 5] {
                let codec = Codec::new(protocol);
                let c = Credentials {
                    id: "pk.dk".into(),
                    user: "pk&dk&1".into(),
                    password: "ab".into(),
                };
                let mut buf = BytesMut::new();
                codec.connect(&c, 30, &mut buf).expect("encode");
                // The protocol level byte follows "MQTT".
                let pos = buf
                    .windows(4)
                    .position(|w| w == b"MQTT")
                    .expect("protocol name");
                assert_eq!(buf[pos + 4], protocol);
                let mut partial = BytesMut::from(&[0x20u8][..]);
                assert!(matches!(codec.decode(&mut partial), Ok(None)));
            }
            let codec = Codec::new(5);
            // CONNACK, remaining length 3, flags 0, reason 0x97, no properties.
            let mut buf = BytesMut::from(&[0x20u8, 0x03, 0x00, 0x97, 0x00][..]);
            match codec.decode(&mut buf) {
                Ok(Some(In::ConnAck { code, .. })) => assert_eq!(code, 0x97),
                other => panic!("{other:?}"),
            }
            // With a Reason String, as the activation broker sends them.
            let ack = v5::ConnAck {
                session_present: false,
                code: v5::ConnectReturnCode::QuotaExceeded,
                properties: Some(v5::ConnAckProperties {
                    session_expiry_interval: None,
                    receive_max: None,
                    max_qos: None,
                    retain_available: None,
                    max_packet_size: None,
                    assigned_client_identifier: None,
                    topic_alias_max: None,
                    reason_string: Some("no activation code available for product P".into()),
                    user_properties: Vec::new(),
                    wildcard_subscription_available: None,
                    subscription_identifiers_available: None,
                    shared_subscription_available: None,
                    server_keep_alive: None,
                    response_information: None,
                    server_reference: None,
                    authentication_method: None,
                    authentication_data: None,
                }),
            };
            let mut buf = BytesMut::new();
            v5::Packet::ConnAck(ack)
                .write(&mut buf, None)
                .expect("encode");
            match codec.decode(&mut buf) {
                Ok(Some(In::ConnAck { code, reason })) => {
                    assert_eq!(code, 0x97);
                    assert_eq!(
                        reason.as_deref(),
                        Some("no activation code available for product P")
                    );
                }
                other => panic!("{other:?}"),
            }
            let codec = Codec::new(4);
            let mut buf = BytesMut::from(&[0x20u8, 0x02, 0x00, 0x05][..]);
            match codec.decode(&mut buf) {
                Ok(Some(In::ConnAck { code, .. })) => assert_eq!(code, 0x05),
                other => panic!("{other:?}"),
            }
        }
    }
}

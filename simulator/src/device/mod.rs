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

mod rumq4;

mod rumq5;

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

mod own;

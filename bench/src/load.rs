//! The MQTT load client: `concurrency` workers on one tokio runtime, each
//! opening a socket, writing a pre-encoded MQTT 3.1.1 CONNECT
//! (`rumqttc::mqttbytes`), reading the CONNACK and, for a device with a
//! subscription, then writing its SUBSCRIBE and reading the SUBACK. Latency
//! is socket open → CONNACK, or → SUBACK when the device subscribes.
//! Accepted connections are held open (idle) until released.

use std::cell::Cell;
use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::anyhow;
use bytes::{Bytes, BytesMut};
use hdrhistogram::Histogram;
use rumqttc::mqttbytes::v4::{Connect, Packet, SubscribeReasonCode};
use rumqttc::mqttbytes::{self, Protocol, QoS};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::child::PerfGuard;
use super::procfs::{cpu_secs, listen_drops, open_fds, settle, smaps_summary};
use super::{check_stop, stopped};
use activation_client::credentials::{client_id, device_credentials};

/// Keepalive in every CONNECT: longer than any phase, so idle held
/// connections need no PINGREQ.
pub const KEEPALIVE_SECS: u16 = 600;
/// Largest packet the client reads.
const MAX_PACKET: usize = 64 * 1024;

/// What one device sends: its CONNECT, and the SUBSCRIBE it sends after
/// its CONNACK (if any).
pub struct Device {
    pub connect: Bytes,
    pub subscribe: Option<Bytes>,
}

/// A held connection and the index of its device in the phase.
pub type Held = Vec<(usize, TcpStream)>;

/// A measured connect (and subscribe) phase.
pub struct Phase {
    pub label: String,
    /// Connections in flight at once.
    pub in_flight: usize,
    /// Connections that got CONNACK 0 (and, if they subscribed, a
    /// successful SUBACK).
    pub accepted: u64,
    /// CONNACK return code → count, for refused CONNECTs.
    pub refused: BTreeMap<u8, u64>,
    /// SUBACKs with a failure return code.
    pub sub_refused: u64,
    pub errors: u64,
    pub first_error: Option<String>,
    /// Latency of accepted connections, microseconds.
    pub hist: Histogram<u64>,
    /// SUBSCRIBE written → SUBACK read of accepted connections that
    /// subscribed, microseconds (empty if none did).
    pub sub_hist: Histogram<u64>,
    pub elapsed: Duration,
    /// TcpExt ListenDrops during the phase (SYNs or handshakes dropped
    /// because an accept queue was full; the client retries after 1 s).
    /// Counted for the whole network namespace.
    pub listen_drops: u64,
    /// CPU seconds (user + system) the server and this client used.
    pub server_cpu: f64,
    pub client_cpu: f64,
}

impl Phase {
    pub fn rate(&self) -> f64 {
        self.accepted as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    /// Latency quantile `q` in milliseconds.
    pub fn ms(&self, q: f64) -> f64 {
        self.hist.value_at_quantile(q) as f64 / 1000.0
    }

    /// SUBSCRIBE → SUBACK latency quantile `q` in milliseconds, if the
    /// phase subscribed.
    pub fn sub_ms(&self, q: f64) -> Option<f64> {
        (!self.sub_hist.is_empty()).then(|| self.sub_hist.value_at_quantile(q) as f64 / 1000.0)
    }

    pub fn failures(&self) -> u64 {
        self.errors + self.sub_refused + self.refused.values().sum::<u64>()
    }

    /// Server CPU microseconds per accepted connection.
    pub fn server_us(&self) -> f64 {
        self.server_cpu * 1e6 / self.accepted.max(1) as f64
    }

    /// A sentence on its failures, if it had any.
    pub fn failure_note(&self) -> Option<String> {
        (self.failures() > 0).then(|| {
            format!(
                "{} ({} in flight): {} refused by CONNACK {:?}, {} SUBACK failures, {} errors (first: {})",
                self.label,
                self.in_flight,
                self.refused.values().sum::<u64>(),
                self.refused,
                self.sub_refused,
                self.errors,
                self.first_error.as_deref().unwrap_or("-")
            )
        })
    }
}

/// Runs phases against one server at a time and reads its RSS.
pub struct Load<'a> {
    pub rt: &'a tokio::runtime::Runtime,
    /// Allowed for one connection to get its CONNACK (and SUBACK).
    pub timeout: Duration,
    /// Print where the server's RSS is at every settle.
    pub smaps: bool,
    /// Record each phase with `perf record -g -p SERVER` into this dir.
    pub perf: Option<PathBuf>,
    /// The next phase's source network (127.N.x.y).
    next_net: Cell<u8>,
}

impl<'a> Load<'a> {
    pub fn new(rt: &'a tokio::runtime::Runtime, timeout: Duration) -> Self {
        Load {
            rt,
            timeout,
            smaps: false,
            perf: None,
            next_net: Cell::new(10),
        }
    }

    /// A source network (127.N.x.y) no earlier phase used, so no phase
    /// meets the TIME_WAIT sockets of another.
    pub fn source_net(&self) -> u8 {
        let n = self.next_net.get();
        self.next_net.set(n.checked_add(1).unwrap_or(10));
        n
    }

    /// [`settle`], and with `smaps` where the RSS is.
    pub fn settle(&self, pid: u32) -> anyhow::Result<(u64, usize)> {
        let r = settle(pid)?;
        if self.smaps {
            eprintln!("{}", smaps_summary(pid));
        }
        Ok(r)
    }

    /// Connects every device with `concurrency` in flight and holds the
    /// accepted connections.
    pub fn phase(
        &self,
        label: &str,
        concurrency: usize,
        server: u32,
        addr: SocketAddr,
        devices: Vec<Device>,
    ) -> anyhow::Result<(Phase, Held)> {
        check_stop()?;
        eprintln!(
            "{label}: {} connections to {addr}, {concurrency} in flight ...",
            devices.len()
        );
        let perf = match &self.perf {
            Some(dir) => Some(PerfGuard::start(dir, label, server)?),
            None => None,
        };
        let drops_before = listen_drops();
        let server_before = cpu_secs(server);
        let client_before = cpu_secs(std::process::id());
        let (mut phase, held) = self.rt.block_on(connect_all(
            label,
            addr,
            Arc::new(devices),
            concurrency,
            self.source_net(),
            self.timeout,
        ))?;
        phase.listen_drops = listen_drops().saturating_sub(drops_before);
        phase.server_cpu = cpu_secs(server) - server_before;
        phase.client_cpu = cpu_secs(std::process::id()) - client_before;
        drop(perf);
        eprintln!(
            "{label}: {} accepted in {:.2} s ({:.0}/s), {} failed",
            phase.accepted,
            phase.elapsed.as_secs_f64(),
            phase.rate(),
            phase.failures()
        );
        check_stop()?;
        Ok((phase, held))
    }

    /// Sends DISCONNECT on every held connection, closes it, and waits
    /// (at most 30 s) until the server has closed its side: its open
    /// descriptors are back to `fds_idle`.
    pub fn release(&self, held: Held, pid: u32, fds_idle: usize) {
        self.rt.block_on(async move {
            for (_, mut s) in held {
                let _ = s.write_all(&[0xE0, 0x00]).await;
            }
        });
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline && !stopped() {
            match open_fds(pid) {
                Some(f) if f > fds_idle + 2 => std::thread::sleep(Duration::from_millis(50)),
                _ => break,
            }
        }
    }
}

/// The worker pool of one phase.
async fn connect_all(
    label: &str,
    addr: SocketAddr,
    devices: Arc<Vec<Device>>,
    concurrency: usize,
    source_net: u8,
    timeout: Duration,
) -> anyhow::Result<(Phase, Held)> {
    let next = Arc::new(AtomicUsize::new(0));
    let start = Instant::now();
    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..concurrency.clamp(1, devices.len().max(1)) {
        let next = next.clone();
        let devices = devices.clone();
        workers.spawn(async move {
            let mut w = Worker::new()?;
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= devices.len() || stopped() {
                    break;
                }
                let source = source_ip(source_net, i);
                let t0 = Instant::now();
                match tokio::time::timeout(timeout, connect_one(addr, source, &devices[i])).await {
                    Ok(Ok((stream, Outcome::Accepted(sub_us)))) => {
                        let us = t0.elapsed().as_micros().max(1) as u64;
                        w.hist.saturating_record(us);
                        if let Some(sub_us) = sub_us {
                            w.sub_hist.saturating_record(sub_us);
                        }
                        w.accepted += 1;
                        w.held.push((i, stream));
                    }
                    Ok(Ok((_, Outcome::Refused(code)))) => *w.refused.entry(code).or_default() += 1,
                    Ok(Ok((_, Outcome::SubscribeRefused))) => w.sub_refused += 1,
                    Ok(Err(e)) => w.error(e.to_string()),
                    Err(_) => w.error(format!("no answer within {} s", timeout.as_secs())),
                }
            }
            anyhow::Ok(w)
        });
    }
    let mut total = Worker::new()?;
    while let Some(w) = workers.join_next().await {
        let w = w??;
        total.hist.add(&w.hist)?;
        total.sub_hist.add(&w.sub_hist)?;
        total.accepted += w.accepted;
        total.errors += w.errors;
        total.sub_refused += w.sub_refused;
        for (c, k) in w.refused {
            *total.refused.entry(c).or_default() += k;
        }
        if total.first_error.is_none() {
            total.first_error = w.first_error;
        }
        total.held.extend(w.held);
    }
    let elapsed = start.elapsed();
    Ok((
        Phase {
            label: label.to_owned(),
            in_flight: concurrency,
            accepted: total.accepted,
            refused: total.refused,
            sub_refused: total.sub_refused,
            errors: total.errors,
            first_error: total.first_error,
            hist: total.hist,
            sub_hist: total.sub_hist,
            elapsed,
            listen_drops: 0,
            server_cpu: 0.0,
            client_cpu: 0.0,
        },
        total.held,
    ))
}

struct Worker {
    hist: Histogram<u64>,
    sub_hist: Histogram<u64>,
    accepted: u64,
    refused: BTreeMap<u8, u64>,
    sub_refused: u64,
    errors: u64,
    first_error: Option<String>,
    held: Held,
}

impl Worker {
    fn new() -> anyhow::Result<Self> {
        Ok(Worker {
            hist: latency_histogram()?,
            sub_hist: latency_histogram()?,
            accepted: 0,
            refused: BTreeMap::new(),
            sub_refused: 0,
            errors: 0,
            first_error: None,
            held: Vec::new(),
        })
    }

    fn error(&mut self, e: String) {
        self.errors += 1;
        if self.first_error.is_none() {
            self.first_error = Some(e);
        }
    }
}

/// 1 µs .. 120 s, 3 significant digits.
pub fn latency_histogram() -> anyhow::Result<Histogram<u64>> {
    Ok(Histogram::new_with_bounds(1, 120_000_000, 3)?)
}

/// Source address of connection `i` of a phase: 127.`net`.x.y, a new
/// address every 20,000 connections, so no phase runs short of ephemeral
/// ports.
pub fn source_ip(net: u8, i: usize) -> Ipv4Addr {
    let k = i / 20_000 + 1;
    Ipv4Addr::new(127, net, (k >> 8) as u8, (k & 0xff) as u8)
}

enum Outcome {
    /// With the SUBSCRIBE → SUBACK latency (µs) if the device subscribed.
    Accepted(Option<u64>),
    Refused(u8),
    SubscribeRefused,
}

/// One device: socket → CONNECT → CONNACK (→ SUBSCRIBE → SUBACK).
async fn connect_one(
    addr: SocketAddr,
    source: Ipv4Addr,
    device: &Device,
) -> std::io::Result<(TcpStream, Outcome)> {
    let mut stream = open(addr, source).await?;
    stream.write_all(&device.connect).await?;
    let mut buf = BytesMut::with_capacity(64);
    match read_packet(&mut stream, &mut buf).await? {
        Packet::ConnAck(ack) if ack.code as u8 != 0 => {
            return Ok((stream, Outcome::Refused(ack.code as u8)))
        }
        Packet::ConnAck(_) => {}
        other => return Err(invalid(format!("expected CONNACK, got {other:?}"))),
    }
    let Some(subscribe) = &device.subscribe else {
        return Ok((stream, Outcome::Accepted(None)));
    };
    stream.write_all(subscribe).await?;
    let sent = Instant::now();
    let answer = read_packet(&mut stream, &mut buf).await?;
    let sub_us = sent.elapsed().as_micros().max(1) as u64;
    match answer {
        Packet::SubAck(ack)
            if ack
                .return_codes
                .iter()
                .all(|c| matches!(c, SubscribeReasonCode::Success(_))) =>
        {
            Ok((stream, Outcome::Accepted(Some(sub_us))))
        }
        Packet::SubAck(_) => Ok((stream, Outcome::SubscribeRefused)),
        other => Err(invalid(format!("expected SUBACK, got {other:?}"))),
    }
}

/// A TCP connection from `source` (any port) to `addr`, TCP_NODELAY.
pub async fn open(addr: SocketAddr, source: Ipv4Addr) -> std::io::Result<TcpStream> {
    activation_client::socket::connect_from(addr, Some(source.into())).await
}

/// The next whole packet from `stream` (bytes after it stay in `buf`).
pub async fn read_packet(stream: &mut TcpStream, buf: &mut BytesMut) -> std::io::Result<Packet> {
    loop {
        match Packet::read(buf, MAX_PACKET) {
            Ok(p) => return Ok(p),
            Err(mqttbytes::Error::InsufficientBytes(_)) => {}
            Err(e) => return Err(invalid(format!("bad packet: {e:?}"))),
        }
        if stream.read_buf(buf).await? == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "closed by the server",
            ));
        }
    }
}

pub fn invalid(msg: String) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, msg)
}

/// A device CONNECT with SPEC §3 credentials (client id `{pk}.{dk}`).
pub fn signed_connect(pk: &str, dk: &str, secret: &str, now: i64) -> anyhow::Result<Bytes> {
    let (user, pass) = device_credentials(pk, dk, secret, now);
    plain_connect(&client_id(pk, dk), Some((user, pass)))
}

/// A clean-session MQTT 3.1.1 CONNECT.
pub fn plain_connect(client: &str, login: Option<(String, String)>) -> anyhow::Result<Bytes> {
    let mut c = Connect::new(client);
    c.protocol = Protocol::V4;
    c.keep_alive = KEEPALIVE_SECS;
    c.clean_session = true;
    if let Some((u, p)) = login {
        c.set_login(u, p);
    }
    let mut buf = BytesMut::new();
    c.write(&mut buf)
        .map_err(|e| anyhow!("encoding CONNECT: {e:?}"))?;
    Ok(buf.freeze())
}

/// A SUBSCRIBE to one filter at QoS 1, packet id 1.
pub fn subscribe(filter: &str) -> anyhow::Result<Bytes> {
    let mut s = rumqttc::mqttbytes::v4::Subscribe::new(filter, QoS::AtLeastOnce);
    s.pkid = 1;
    let mut buf = BytesMut::new();
    s.write(&mut buf)
        .map_err(|e| anyhow!("encoding SUBSCRIBE: {e:?}"))?;
    Ok(buf.freeze())
}

/// The topic a device receives commands on (SPEC namespace).
pub fn command_topic(pk: &str, dk: &str) -> String {
    format!("devices/{pk}/{dk}/command")
}

/// The topic a device publishes telemetry to.
pub fn telemetry_topic(pk: &str, dk: &str) -> String {
    format!("devices/{pk}/{dk}/telemetry")
}

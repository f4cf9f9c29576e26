//! Telemetry load: QoS 1 publishers, each keeping `inflight` PUBLISHes
//! unacknowledged, and a backend subscriber that acknowledges and counts
//! every message it receives. A message's payload names its run, its
//! publisher and its sequence number, so the backend counts distinct
//! messages and duplicates.

use std::collections::{HashSet, VecDeque};
use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail};
use bytes::{BufMut, Bytes, BytesMut};
use hdrhistogram::Histogram;
use rumqttc::mqttbytes::v4::{Packet, PubAck, Publish, SubscribeReasonCode};
use rumqttc::mqttbytes::QoS;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::watch;

use super::load::{invalid, latency_histogram, open, plain_connect, read_packet, subscribe};
use super::procfs::cpu_secs;
use super::stopped;

/// Bytes of a payload that identify the message: run (u16), publisher
/// (u32), sequence number (u64).
const KEY_LEN: usize = 14;

/// A connected device that publishes to `topic`.
pub struct Publisher {
    pub index: u32,
    pub topic: String,
    pub stream: TcpStream,
}

/// Settings of one telemetry measurement.
#[derive(Clone, Copy)]
pub struct Settings {
    /// Unacknowledged PUBLISHes per publisher.
    pub inflight: usize,
    /// Payload bytes per message (at least the 14-byte key).
    pub payload: usize,
    /// How long publishers publish.
    pub window: Duration,
    /// How long to wait for the last PUBACKs, and for the backend to
    /// receive the last messages, after the window.
    pub drain: Duration,
}

/// The figures of one telemetry measurement.
pub struct Telemetry {
    pub label: String,
    pub publishers: usize,
    pub settings: Settings,
    /// PUBLISHes written, and PUBACKs received for them.
    pub sent: u64,
    pub acked: u64,
    /// PUBACKs received within the window.
    pub acked_in_window: u64,
    /// Publish → PUBACK, microseconds.
    pub hist: Histogram<u64>,
    pub errors: u64,
    pub first_error: Option<String>,
    /// Distinct messages of this run the backend received, and copies of
    /// messages it had already received.
    pub received: u64,
    pub duplicates: u64,
    pub server_cpu: f64,
    /// CPU seconds of this client over the measurement.
    pub client_cpu: f64,
    /// Wall time of the measurement (window and drain).
    pub elapsed: Duration,
}

impl Telemetry {
    /// PUBACKs per second within the window.
    pub fn rate(&self) -> f64 {
        self.acked_in_window as f64 / self.settings.window.as_secs_f64().max(1e-9)
    }

    pub fn ms(&self, q: f64) -> f64 {
        self.hist.value_at_quantile(q) as f64 / 1000.0
    }

    /// Server CPU microseconds per acknowledged message.
    pub fn server_us(&self) -> f64 {
        self.server_cpu * 1e6 / self.acked.max(1) as f64
    }
}

/// Publishes from every publisher for `settings.window`, waits for the
/// PUBACKs and for `backend` (if any) to receive the messages, and
/// measures.
/// Returns the publishers that are still connected.
pub fn measure(
    rt: &tokio::runtime::Runtime,
    label: &str,
    run: u16,
    server: u32,
    publishers: Vec<Publisher>,
    backend: Option<&Backend>,
    settings: Settings,
) -> anyhow::Result<(Telemetry, Vec<Publisher>)> {
    eprintln!(
        "{label}: {} publishers, {} s ...",
        publishers.len(),
        settings.window.as_secs_f64()
    );
    let n = publishers.len();
    let cpu_before = cpu_secs(server);
    let client_before = cpu_secs(std::process::id());
    let began = Instant::now();
    let counts = |b: Option<&Backend>| b.map_or((0, 0), |b| (b.distinct(), b.duplicates()));
    let (received_before, dups_before) = counts(backend);
    let mut t = rt.block_on(async {
        let start = Instant::now();
        let mut tasks = tokio::task::JoinSet::new();
        for p in publishers {
            tasks.spawn(publish(p, run, start, settings, latency_histogram()?));
        }
        let mut total = Telemetry {
            label: label.to_owned(),
            publishers: n,
            settings,
            sent: 0,
            acked: 0,
            acked_in_window: 0,
            hist: latency_histogram()?,
            errors: 0,
            first_error: None,
            received: 0,
            duplicates: 0,
            server_cpu: 0.0,
            client_cpu: 0.0,
            elapsed: Duration::ZERO,
        };
        let mut kept = Vec::new();
        while let Some(r) = tasks.join_next().await {
            let r = r?;
            total.sent += r.sent;
            total.acked += r.acked;
            total.acked_in_window += r.acked_in_window;
            total.hist.add(&r.hist)?;
            match r.outcome {
                Ok(p) => kept.push(p),
                Err(e) => {
                    total.errors += 1;
                    total.first_error.get_or_insert(e.to_string());
                }
            }
        }
        if let Some(b) = backend {
            b.wait_for(received_before + total.sent, settings.drain)
                .await;
        }
        anyhow::Ok((total, kept))
    })?;
    t.0.server_cpu = cpu_secs(server) - cpu_before;
    t.0.client_cpu = cpu_secs(std::process::id()) - client_before;
    t.0.elapsed = began.elapsed();
    let (received, duplicates) = counts(backend);
    t.0.received = received - received_before;
    t.0.duplicates = duplicates - dups_before;
    if let Some(e) = backend.and_then(Backend::error) {
        bail!("the backend subscriber failed: {e}");
    }
    eprintln!(
        "{label}: {:.0} msgs/s acked, {} sent, {} acked, backend received {}",
        t.0.rate(),
        t.0.sent,
        t.0.acked,
        t.0.received
    );
    Ok(t)
}

struct Published {
    sent: u64,
    acked: u64,
    acked_in_window: u64,
    hist: Histogram<u64>,
    outcome: anyhow::Result<Publisher>,
}

/// One publisher's loop: keep `inflight` PUBLISHes unacknowledged until
/// the window ends, then wait for the rest of the PUBACKs.
async fn publish(
    mut p: Publisher,
    run: u16,
    start: Instant,
    s: Settings,
    hist: Histogram<u64>,
) -> Published {
    let mut r = Published {
        sent: 0,
        acked: 0,
        acked_in_window: 0,
        hist,
        outcome: Err(anyhow!("not run")),
    };
    let window_end = start + s.window;
    let deadline = window_end + s.drain;
    let mut pending: VecDeque<(u16, Instant)> = VecDeque::new();
    let mut pkid: u16 = 0;
    let mut out = BytesMut::new();
    let mut buf = BytesMut::with_capacity(4096);
    let result: anyhow::Result<()> = async {
        loop {
            let now = Instant::now();
            if now < window_end && !stopped() {
                while pending.len() < s.inflight {
                    pkid = pkid.checked_add(1).unwrap_or(1);
                    let mut m = Publish::from_bytes(
                        p.topic.clone(),
                        QoS::AtLeastOnce,
                        payload(run, p.index, r.sent, s.payload),
                    );
                    m.pkid = pkid;
                    m.write(&mut out)
                        .map_err(|e| anyhow!("encoding PUBLISH: {e:?}"))?;
                    pending.push_back((pkid, now));
                    r.sent += 1;
                }
                p.stream.write_all(&out).await?;
                out.clear();
            } else if pending.is_empty() {
                return Ok(());
            }
            let read = tokio::time::timeout_at(deadline.into(), p.stream.read_buf(&mut buf)).await;
            match read {
                Err(_) => bail!(
                    "{} PUBACKs missing {} s after the window",
                    pending.len(),
                    s.drain.as_secs()
                ),
                Ok(Ok(0)) => bail!("closed by the server"),
                Ok(r) => {
                    r?;
                }
            }
            let now = Instant::now();
            loop {
                match Packet::read(&mut buf, 64 * 1024) {
                    Ok(Packet::PubAck(ack)) => {
                        let Some(at) = pending.iter().position(|(id, _)| *id == ack.pkid) else {
                            bail!("PUBACK for unknown packet id {}", ack.pkid);
                        };
                        if let Some((_, t0)) = pending.remove(at) {
                            r.hist.saturating_record(
                                    now.duration_since(t0).as_micros().max(1) as u64
                                );
                        }
                        r.acked += 1;
                        if now < window_end {
                            r.acked_in_window += 1;
                        }
                    }
                    Ok(other) => bail!("expected PUBACK, got {other:?}"),
                    Err(rumqttc::mqttbytes::Error::InsufficientBytes(_)) => break,
                    Err(e) => bail!("bad packet: {e:?}"),
                }
            }
        }
    }
    .await;
    r.outcome = result.map(|()| p);
    r
}

fn payload(run: u16, publisher: u32, seq: u64, len: usize) -> Bytes {
    let mut b = BytesMut::with_capacity(len.max(KEY_LEN));
    b.put_u16(run);
    b.put_u32(publisher);
    b.put_u64(seq);
    b.resize(len.max(KEY_LEN), 0);
    b.freeze()
}

/// A subscriber that acknowledges (QoS 1) and counts every message.
pub struct Backend {
    counts: watch::Receiver<Counts>,
    task: tokio::task::JoinHandle<()>,
}

#[derive(Clone, Default)]
struct Counts {
    distinct: u64,
    duplicates: u64,
    error: Option<String>,
}

impl Backend {
    /// Connects with `login`, subscribes to `filter` at QoS 1 and starts
    /// counting. An error if the CONNECT or the SUBSCRIBE is refused.
    pub async fn connect(
        addr: SocketAddr,
        source: Ipv4Addr,
        client: &str,
        login: (String, String),
        filter: &str,
    ) -> anyhow::Result<Backend> {
        let mut stream = open(addr, source).await?;
        stream
            .write_all(&plain_connect(client, Some(login))?)
            .await?;
        let mut buf = BytesMut::new();
        match read_packet(&mut stream, &mut buf).await? {
            Packet::ConnAck(a) if a.code as u8 == 0 => {}
            other => bail!("backend CONNECT refused: {other:?}"),
        }
        stream.write_all(&subscribe(filter)?).await?;
        match read_packet(&mut stream, &mut buf).await? {
            Packet::SubAck(a)
                if a.return_codes
                    .iter()
                    .all(|c| matches!(c, SubscribeReasonCode::Success(_))) => {}
            other => bail!("backend SUBSCRIBE to {filter} refused: {other:?}"),
        }
        let (tx, counts) = watch::channel(Counts::default());
        let task = tokio::spawn(async move {
            let error = receive(stream, buf, &tx).await;
            tx.send_modify(|c| c.error = Some(error.to_string()));
        });
        Ok(Backend { counts, task })
    }

    pub fn distinct(&self) -> u64 {
        self.counts.borrow().distinct
    }

    pub fn duplicates(&self) -> u64 {
        self.counts.borrow().duplicates
    }

    pub fn error(&self) -> Option<String> {
        self.counts.borrow().error.clone()
    }

    /// Waits until `distinct` messages were received, the backend failed,
    /// or `quiet` passed without a new message.
    pub async fn wait_for(&self, distinct: u64, quiet: Duration) {
        let mut rx = self.counts.clone();
        loop {
            {
                let c = rx.borrow_and_update();
                if c.distinct >= distinct || c.error.is_some() {
                    return;
                }
            }
            if tokio::time::timeout(quiet, rx.changed()).await.is_err() || stopped() {
                return;
            }
        }
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Reads, acknowledges and counts until the connection fails.
async fn receive(
    mut stream: TcpStream,
    mut buf: BytesMut,
    tx: &watch::Sender<Counts>,
) -> anyhow::Error {
    let mut seen: HashSet<[u8; KEY_LEN]> = HashSet::new();
    let mut out = BytesMut::new();
    loop {
        let (mut distinct, mut dups) = (0u64, 0u64);
        loop {
            match Packet::read(&mut buf, 1024 * 1024) {
                Ok(Packet::Publish(p)) => {
                    let Some(key) = p
                        .payload
                        .get(..KEY_LEN)
                        .and_then(|k| <[u8; KEY_LEN]>::try_from(k).ok())
                    else {
                        return anyhow!(
                            "a message of {} bytes on {} is not the bench's",
                            p.payload.len(),
                            p.topic
                        );
                    };
                    if seen.insert(key) {
                        distinct += 1;
                    } else {
                        dups += 1;
                    }
                    if p.qos != QoS::AtMostOnce {
                        if let Err(e) = PubAck::new(p.pkid).write(&mut out) {
                            return anyhow!("encoding PUBACK: {e:?}");
                        }
                    }
                }
                Ok(Packet::PingResp) => {}
                Ok(other) => return anyhow!("backend: unexpected {other:?}"),
                Err(rumqttc::mqttbytes::Error::InsufficientBytes(_)) => break,
                Err(e) => return invalid(format!("backend: bad packet: {e:?}")).into(),
            }
        }
        if distinct + dups > 0 {
            tx.send_modify(|c| {
                c.distinct += distinct;
                c.duplicates += dups;
            });
        }
        if !out.is_empty() {
            if let Err(e) = stream.write_all(&out).await {
                return e.into();
            }
            out.clear();
        }
        match stream.read_buf(&mut buf).await {
            Ok(0) => return anyhow!("backend: closed by the server"),
            Ok(_) => {}
            Err(e) => return e.into(),
        }
    }
}

//! Hostile input against the whole broker (gate and ledger included) over
//! real sockets: every bad client gets a clear refusal or a close, the
//! broker keeps serving a good device afterwards, and nothing stored
//! changes. tests/it/gateway/ covers the connection layer alone with a
//! stand-in authenticator; these run the real gate and check the ledger.

use crate::common;

use std::time::{Duration, Instant};

use activation_broker::clock::Clock;
use activation_broker::config::Config;
use activation_broker::credentials::device_credentials;
use common::broker::{start_broker, TestBroker};
use common::child::{open_offline, prepare_store, write_config, ChildBroker};
use common::wire::{
    connack_code, packet, raise_nofile, read_packet, send_and_close, snapshot, still_serving,
    until_closed, RawConnect, Snapshot,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const WAIT: Duration = Duration::from_secs(10);
const PK: &str = "h";

struct Fixture {
    t: TestBroker,
    secret: String,
    before: Snapshot,
}

/// A broker with product `h` (100 codes) whose device `good` is already
/// activated, so its later reconnects consume nothing.
async fn fixture(tweak: impl FnOnce(&mut Config)) -> Fixture {
    let t = start_broker(|c| {
        c.gate.source_rate = 0.0;
        c.gate.device_rate = 0.0;
        c.gate.ban_after_failures = 0;
        tweak(c)
    })
    .await;
    let secret = t.product(PK, 100, 86_400).await;
    still_serving(&t, PK, "good", &secret).await;
    let before = snapshot(&t.broker.ledger);
    assert_eq!(before.counters.1, 1);
    Fixture { t, secret, before }
}

impl Fixture {
    /// A well-formed CONNECT of device `dk` with valid credentials.
    fn connect(&self, level: u8, dk: &str) -> RawConnect {
        let (u, p) = self.t.creds(PK, dk, &self.secret);
        RawConnect::new(level, &format!("{PK}.{dk}"), &u, &p)
    }

    /// The good device still gets in and nothing stored changed.
    async fn unchanged(&self) {
        still_serving(&self.t, PK, "good", &self.secret).await;
        assert_eq!(
            snapshot(&self.t.broker.ledger),
            self.before,
            "ledger changed"
        );
    }

    fn absent(&self, dk: &str) {
        assert!(
            self.t.broker.ledger.device(PK, dk).is_err(),
            "device {dk} must not exist"
        );
    }
}

/// Closed with nothing sent, or refused with a non-zero CONNACK code.
fn refused_or_closed(what: &str, (bytes, closed): (Vec<u8>, bool)) {
    assert!(closed, "{what}: not closed in time");
    if !bytes.is_empty() {
        let code = connack_code(&bytes);
        assert!(
            matches!(code, Some(c) if c != 0),
            "{what}: expected a refusal or a plain close, got {bytes:?}"
        );
    }
}

#[tokio::test]
async fn a_silent_socket_is_closed_by_the_connect_timeout() {
    let f = fixture(|c| c.devices.connect_timeout_secs = 1).await;
    let mut s = TcpStream::connect(f.t.addr()).await.expect("connect");
    let start = Instant::now();
    let (bytes, closed) = until_closed(&mut s, WAIT).await;
    assert!(closed && bytes.is_empty(), "{bytes:?}");
    assert!(
        start.elapsed() >= Duration::from_millis(900),
        "closed too early"
    );
    eprintln!(
        "RELIABILITY: silent socket closed by the broker {} ms after it opened, nothing sent to it (connect timeout 1 s)",
        start.elapsed().as_millis()
    );
    f.unchanged().await;
    eprintln!(
        "RELIABILITY: good device admitted after; ledger counters (total, consumed, available, unassigned, forfeited) {:?} before and after",
        f.before.counters
    );
}

#[tokio::test]
async fn a_connect_trickled_one_byte_per_second_is_closed_by_the_connect_timeout() {
    let f = fixture(|c| c.devices.connect_timeout_secs = 2).await;
    // Valid credentials of a fresh device: if the broker waited for the
    // whole packet it would consume a code.
    let bytes = f.connect(4, "trickle").encode();
    let mut s = TcpStream::connect(f.t.addr()).await.expect("connect");
    let start = Instant::now();
    let mut sent = 0;
    let mut closed = false;
    let mut reply = Vec::new();
    for b in &bytes {
        if s.write_all(&[*b]).await.is_err() {
            closed = true;
            break;
        }
        sent += 1;
        // Pace the writes at one byte per second, noticing a close at once.
        let mut buf = [0u8; 64];
        match tokio::time::timeout(Duration::from_secs(1), s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => {
                closed = true;
                break;
            }
            Ok(Ok(n)) => reply.extend_from_slice(&buf[..n]),
            Err(_) => {}
        }
    }
    let elapsed = start.elapsed();
    assert!(closed, "the trickled CONNECT was never cut off");
    assert!(
        reply.is_empty(),
        "no CONNACK for an incomplete CONNECT: {reply:?}"
    );
    assert!(sent < bytes.len(), "closed only after the whole packet");
    assert!(
        elapsed < Duration::from_secs(5),
        "closed after {elapsed:?}, {sent} of {} bytes",
        bytes.len()
    );
    f.absent("trickle");
    f.unchanged().await;
    eprintln!(
        "RELIABILITY: valid CONNECT trickled 1 byte/s: closed after {} ms, {sent} of {} bytes sent, no CONNACK, no device created (connect timeout 2 s)",
        elapsed.as_millis(),
        bytes.len()
    );
    eprintln!(
        "RELIABILITY: good device admitted after; ledger counters (total, consumed, available, unassigned, forfeited) {:?} before and after",
        f.before.counters
    );
}

#[tokio::test]
async fn oversized_and_malformed_remaining_lengths_are_closed() {
    let f = fixture(|c| c.devices.max_packet_size = 1024).await;
    let addr = f.t.addr();
    // CONNECT claiming 1 MiB; a five-byte remaining length (malformed).
    for bytes in [
        vec![0x10, 0x80, 0x80, 0x40],
        vec![0x10, 0xff, 0xff, 0xff, 0xff, 0x01],
        vec![0x10, 0xff, 0xff, 0xff, 0x7f],
    ] {
        let (reply, closed) = send_and_close(addr, &bytes, WAIT).await;
        assert!(closed && reply.is_empty(), "{bytes:?} → {reply:?}");
    }
    // A complete, validly signed CONNECT of 1,025+ bytes (the password
    // padded): closed before it is read, no code consumed.
    let mut c = f.connect(5, "big");
    c.properties = vec![0x26, 0x03, 0x00, 0x01, b'k'];
    c.properties
        .extend([0x26, 0x03, 0x00, 0x01, b'k'].repeat(200));
    let bytes = c.encode();
    assert!(bytes.len() > 1024);
    let mut s = TcpStream::connect(addr).await.expect("connect");
    let _ = s.write_all(&bytes).await;
    refused_or_closed("oversized CONNECT", until_closed(&mut s, WAIT).await);
    f.absent("big");
    // After CONNECT (MQTT 5): a 2 KiB PUBLISH → DISCONNECT 0x95.
    let mut s = TcpStream::connect(addr).await.expect("connect");
    s.write_all(&f.connect(5, "good").encode())
        .await
        .expect("send");
    let ack = read_packet(&mut s, WAIT).await.expect("CONNACK");
    assert_eq!(connack_code(&ack), Some(0));
    let mut body = Vec::new();
    let topic = format!("devices/{PK}/good/x");
    body.extend_from_slice(&(topic.len() as u16).to_be_bytes());
    body.extend_from_slice(topic.as_bytes());
    body.push(0);
    body.resize(2048, 0);
    s.write_all(&packet(0x30, &body)).await.expect("send");
    let (reply, closed) = until_closed(&mut s, WAIT).await;
    assert!(closed);
    assert_eq!(reply.first(), Some(&0xE0), "DISCONNECT: {reply:?}");
    assert_eq!(reply.get(2), Some(&0x95), "Packet too large: {reply:?}");
    f.unchanged().await;
    eprintln!(
        "RELIABILITY: 3 CONNECTs with a 1 MiB or malformed remaining length closed with no reply; a {}-byte signed CONNECT over the 1024-byte limit refused or closed, no device created; a 2048-byte PUBLISH after CONNACK got DISCONNECT 0x{:02X}",
        bytes.len(),
        reply[2]
    );
    eprintln!(
        "RELIABILITY: good device admitted after; ledger counters (total, consumed, available, unassigned, forfeited) {:?} before and after",
        f.before.counters
    );
}

#[tokio::test]
async fn invalid_utf8_in_client_id_or_user_name_is_refused_or_closed() {
    let f = fixture(|_| {}).await;
    let bad: [&[u8]; 4] = [
        &[0xff, 0xfe],
        &[0xc3, 0x28],
        &[0xed, 0xa0, 0x80], // a UTF-16 surrogate
        &[0xc0, 0xaf],       // overlong '/'
    ];
    for level in [4u8, 5] {
        for b in bad {
            // In the client id, with otherwise valid credentials.
            let mut c = f.connect(level, "utf8a");
            c.client_id = [format!("{PK}.").as_bytes(), b].concat();
            refused_or_closed(
                &format!("v{level} client id {b:?}"),
                send_and_close(f.t.addr(), &c.encode(), WAIT).await,
            );
            // In the user name (device key part), signed over those bytes.
            let mut c = f.connect(level, "utf8b");
            let user = [format!("{PK}&utf8b").as_bytes(), b, b"&1767225600000"].concat();
            c.user = Some(user);
            refused_or_closed(
                &format!("v{level} user name {b:?}"),
                send_and_close(f.t.addr(), &c.encode(), WAIT).await,
            );
            // A NUL in the client id (MQTT forbids U+0000).
            let mut c = f.connect(level, "utf8c");
            c.client_id = format!("{PK}.utf8c\0").into_bytes();
            refused_or_closed(
                &format!("v{level} NUL client id"),
                send_and_close(f.t.addr(), &c.encode(), WAIT).await,
            );
        }
    }
    for dk in ["utf8a", "utf8b", "utf8c"] {
        f.absent(dk);
    }
    f.unchanged().await;
    eprintln!(
        "RELIABILITY: {} CONNECTs (v4, v5) with {} invalid UTF-8 sequences in the client id or the user name, or a NUL in the client id: all refused or closed, no device created",
        2 * bad.len() * 3,
        bad.len()
    );
    eprintln!(
        "RELIABILITY: good device admitted after; ledger counters (total, consumed, available, unassigned, forfeited) {:?} before and after",
        f.before.counters
    );
}

#[tokio::test]
async fn protocol_levels_other_than_4_and_5_get_connack_0x01() {
    let f = fixture(|_| {}).await;
    for (name, level) in [
        (&b"MQIsdp"[..], 3u8),
        (b"MQTT", 3),
        (b"MQTT", 6),
        (b"MQTT", 0),
        (b"MQTT", 255),
    ] {
        let mut c = f.connect(level, "levels");
        c.protocol_name = name.to_vec();
        let (reply, closed) = send_and_close(f.t.addr(), &c.encode(), WAIT).await;
        assert!(closed, "level {level}: not closed");
        assert_eq!(
            reply,
            vec![0x20, 0x02, 0x00, 0x01],
            "level {level}: CONNACK 0x01 (unacceptable protocol version)"
        );
    }
    f.absent("levels");
    f.unchanged().await;
    eprintln!(
        "RELIABILITY: 5 CONNECTs (MQIsdp level 3; MQTT levels 3, 6, 0, 255): each answered CONNACK 0x01 and closed, no device created"
    );
    eprintln!(
        "RELIABILITY: good device admitted after; ledger counters (total, consumed, available, unassigned, forfeited) {:?} before and after",
        f.before.counters
    );
}

#[tokio::test]
async fn a_second_connect_is_a_protocol_error_and_consumes_nothing() {
    let f = fixture(|_| {}).await;
    for level in [5u8, 4] {
        let mut s = TcpStream::connect(f.t.addr()).await.expect("connect");
        s.write_all(&f.connect(level, "good").encode())
            .await
            .expect("send");
        let ack = read_packet(&mut s, WAIT).await.expect("CONNACK");
        assert_eq!(connack_code(&ack), Some(0));
        // The second CONNECT carries another, fresh device's valid credentials.
        let second = f.connect(level, &format!("second{level}")).encode();
        s.write_all(&second).await.expect("send");
        let (reply, closed) = until_closed(&mut s, WAIT).await;
        assert!(closed);
        if level == 5 {
            assert_eq!(reply.first(), Some(&0xE0), "DISCONNECT: {reply:?}");
            assert_eq!(reply.get(2), Some(&0x82), "Protocol error: {reply:?}");
        } else {
            assert!(reply.is_empty(), "{reply:?}");
        }
        f.absent(&format!("second{level}"));
    }
    f.unchanged().await;
    eprintln!(
        "RELIABILITY: a second CONNECT carrying a fresh device's valid credentials: v5 DISCONNECT 0x82, v4 closed without reply; neither fresh device created"
    );
    eprintln!(
        "RELIABILITY: good device admitted after; ledger counters (total, consumed, available, unassigned, forfeited) {:?} before and after",
        f.before.counters
    );
}

#[tokio::test]
async fn packets_before_connect_are_closed() {
    let f = fixture(|_| {}).await;
    let topic = format!("devices/{PK}/good/t");
    let mut publish = (topic.len() as u16).to_be_bytes().to_vec();
    publish.extend_from_slice(topic.as_bytes());
    publish.extend_from_slice(b"hi");
    for bytes in [
        packet(0x30, &publish),
        packet(0x82, &[0, 1, 0, 1, b'#', 0]),
        vec![0xC0, 0x00],
        vec![0xE0, 0x00],
        packet(0x20, &[0, 0]),
        b"GET / HTTP/1.1\r\n\r\n".to_vec(),
    ] {
        let (reply, closed) = send_and_close(f.t.addr(), &bytes, WAIT).await;
        assert!(closed && reply.is_empty(), "{bytes:?} → {reply:?}");
    }
    f.unchanged().await;
    eprintln!(
        "RELIABILITY: 6 connections opening with PUBLISH, SUBSCRIBE, PINGREQ, DISCONNECT, CONNACK or an HTTP GET: each closed with no reply"
    );
    eprintln!(
        "RELIABILITY: good device admitted after; ledger counters (total, consumed, available, unassigned, forfeited) {:?} before and after",
        f.before.counters
    );
}

/// How many idle sockets: 15,000 where the hard open-file limit allows
/// (client sockets and the margin over the broker's limit live in this
/// process), fewer elsewhere — printed.
fn idle_budget(hard: u64) -> (usize, usize) {
    let extra = 1_000usize;
    let idle = 15_000usize.min((hard as usize).saturating_sub(extra + 1_000));
    (idle, extra)
}

/// 15,000 sockets connect and say nothing. The broker (a child process
/// with its own open-file limit) keeps admitting a good device while they
/// hang; pushed past its limit it stays up, backs off, and serves again
/// once they go. Only the good device's one code is consumed.
#[test]
fn fifteen_thousand_idle_sockets_do_not_stop_the_broker() {
    let hard = raise_nofile();
    let (idle, extra) = idle_budget(hard);
    assert!(
        idle >= 1_000,
        "open-file limit {hard} too low for this test"
    );
    eprintln!(
        "open-file limit {hard}: {idle} idle sockets, then {extra} more past the broker's limit"
    );
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    let secret = prepare_store(&data, PK, 10, 86_400);
    let config = write_config(dir.path(), 300);
    // The broker may hold the idle sockets plus a little; `extra` more exhaust it.
    let broker_limit = idle as u64 + 300;
    let mut broker = ChildBroker::start(
        &common::child::broker_bin(),
        &config,
        &data,
        Some(broker_limit),
    );
    let addr = broker.addr;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let good = |dk: &'static str| {
        let secret = secret.clone();
        async move {
            let (u, p) = device_credentials(PK, dk, &secret, Clock::system().now());
            let c = RawConnect::new(4, &format!("{PK}.{dk}"), &u, &p).encode();
            let mut s = TcpStream::connect(addr).await.expect("connect");
            s.write_all(&c).await.expect("send");
            let ack = read_packet(&mut s, Duration::from_secs(60)).await;
            ack.and_then(|a| connack_code(&a))
        }
    };
    rt.block_on(async {
        let mut held = Vec::with_capacity(idle + extra);
        let start = Instant::now();
        let mut pending = tokio::task::JoinSet::new();
        for i in 0..idle {
            pending.spawn(TcpStream::connect(addr));
            if pending.len() >= 256 || i + 1 == idle {
                while let Some(r) = pending.join_next().await {
                    held.push(r.expect("task").expect("idle socket connects"));
                }
            }
        }
        // Wait (bounded) until the broker has accepted them all.
        let deadline = Instant::now() + Duration::from_secs(60);
        while broker.open_fds() < idle && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let fds = broker.open_fds();
        eprintln!(
            "{} idle sockets open after {:?}; broker holds {fds} fds",
            held.len(),
            start.elapsed()
        );
        assert!(fds >= idle, "broker accepted only {fds} of {idle}");
        // It still serves while they hang.
        assert_eq!(
            good("g1").await,
            Some(0),
            "a good device is admitted beside {idle} idle sockets"
        );
        // Past its limit: the broker cannot accept; it must not die.
        for _ in 0..extra {
            match TcpStream::connect(addr).await {
                Ok(s) => held.push(s),
                Err(_) => break,
            }
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        while broker.open_fds() + 5 < broker_limit as usize && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        eprintln!(
            "past the limit: broker holds {} of {broker_limit} fds",
            broker.open_fds()
        );
        eprintln!("RELIABILITY: {idle} idle sockets held, a good device admitted beside them; then {extra} more past the broker's {broker_limit}-fd limit: broker stays up and serves the queued device once they go");
        let waiting = tokio::spawn(good("g1"));
        // Wait until the broker reports the failing accepts (it backs off).
        let deadline = Instant::now() + Duration::from_secs(30);
        while !broker.log_tail().contains("accept failed") && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(
            broker.log_tail().contains("accept failed"),
            "never reached the limit"
        );
        assert!(
            broker.alive(),
            "broker died at its open-file limit:\n{}",
            broker.log_tail()
        );
        drop(held);
        // Once they are gone the queued good device is served (a reconnect:
        // nothing consumed).
        assert_eq!(
            waiting.await.expect("task"),
            Some(0),
            "served after the flood"
        );
        assert_eq!(good("g2").await, Some(0));
    });
    assert!(broker.alive());
    broker.stop(Duration::from_secs(10));
    let ledger = open_offline(&data);
    ledger.check_invariants().expect("invariants");
    let c = ledger.counters();
    assert_eq!((c.total, c.consumed), (10, 2), "only g1 and g2 consumed");
}

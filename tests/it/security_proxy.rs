//! PROXY protocol v2 on the device listener: behind a load
//! balancer every connection comes from the balancer's address; with
//! `proxy_protocol = true` the gate's bans and rate limits, and the
//! events, see the client's address from the header instead. Tested with
//! raw sockets that write a v2 header then MQTT, and with rumqttc behind a
//! small in-test balancer that prepends the header to each connection.

use crate::common;

use std::net::SocketAddr;

use activation_broker::credentials::sign;
use activation_broker::events::EventKind;
use common::broker::{next_event, start_broker, v4, TestBroker, WAIT};
use common::haproxy::{haproxy_bin, Haproxy};
use common::wire::{read_packet, until_closed, RawConnect};
use ppp::v2::{Builder, Command, Protocol, Version};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};

const PK: &str = "px";

fn header(src: &str, dst: SocketAddr) -> Vec<u8> {
    let src: SocketAddr = src.parse().expect("addr");
    Builder::with_addresses(Version::Two | Command::Proxy, Protocol::Stream, (src, dst))
        .build()
        .expect("PROXY header")
}

/// A v2 header from `src` (none if `None`), then `connect`; the CONNACK
/// code (`None`: closed without one).
async fn via_proxy(t: &TestBroker, src: Option<&str>, connect: &RawConnect) -> Option<u8> {
    let mut s = TcpStream::connect(t.addr()).await.expect("tcp connect");
    let mut bytes = src.map(|src| header(src, t.addr())).unwrap_or_default();
    bytes.extend_from_slice(&connect.encode());
    s.write_all(&bytes).await.expect("send");
    read_packet(&mut s, WAIT)
        .await
        .and_then(|p| (p.first() == Some(&0x20)).then(|| p[3]))
}

async fn proxied_broker() -> (TestBroker, String) {
    let t = start_broker(|c| {
        c.devices.proxy_protocol = true;
        c.gate.source_rate = 0.0;
        c.gate.device_rate = 0.0;
        c.gate.ban_after_failures = 3;
    })
    .await;
    let secret = t.product(PK, 20, 86_400).await;
    (t, secret)
}

#[tokio::test]
async fn bans_and_events_see_the_source_from_the_proxy_header() {
    let (t, secret) = proxied_broker().await;
    let mut events = t.broker.events.subscribe();
    // Three failures from 203.0.113.7 ban it ...
    let (u, _) = t.creds(PK, "a", &secret);
    let forged = RawConnect::new(4, "px.a", &u, &sign("wrong", &u));
    for n in 0..3 {
        assert_eq!(
            via_proxy(&t, Some("203.0.113.7:5000"), &forged).await,
            Some(0x04),
            "{n}"
        );
    }
    let rejected = next_event(&mut events, EventKind::DeviceRejected).await;
    assert_eq!(rejected.to_json()["Source"], "203.0.113.7");
    let (u, p) = t.creds(PK, "a", &secret);
    let good = RawConnect::new(5, "px.a", &u, &p);
    assert_eq!(
        via_proxy(&t, Some("203.0.113.7:5001"), &good).await,
        Some(0x8A),
        "banned source"
    );
    // ... not another client behind the same balancer (same TCP peer).
    assert_eq!(
        via_proxy(&t, Some("198.51.100.9:6000"), &good).await,
        Some(0)
    );
    let connected = next_event(&mut events, EventKind::DeviceConnected).await;
    assert_eq!(connected.to_json()["Ip"], "198.51.100.9");
    // IPv6 sources too.
    let (u, p) = t.creds(PK, "b", &secret);
    let good6 = RawConnect::new(4, "px.b", &u, &p);
    let mut s = TcpStream::connect(t.addr()).await.expect("tcp connect");
    let dst: SocketAddr = "[2001:db8::1]:1883".parse().expect("addr");
    let mut bytes = header("[2001:db8::42]:7000", dst);
    bytes.extend_from_slice(&good6.encode());
    s.write_all(&bytes).await.expect("send");
    let ack = read_packet(&mut s, WAIT).await.expect("CONNACK");
    assert_eq!(ack[3], 0);
    let connected = next_event(&mut events, EventKind::DeviceConnected).await;
    assert_eq!(connected.to_json()["Ip"], "2001:db8::42");
}

#[tokio::test]
async fn a_connection_without_a_valid_header_is_closed() {
    let (t, secret) = proxied_broker().await;
    let (u, p) = t.creds(PK, "a", &secret);
    let good = RawConnect::new(4, "px.a", &u, &p);
    // Plain MQTT: no header.
    assert_eq!(via_proxy(&t, None, &good).await, None);
    // A PROXY v1 (text) header.
    let mut s = TcpStream::connect(t.addr()).await.expect("tcp connect");
    let mut bytes = b"PROXY TCP4 203.0.113.7 127.0.0.1 5000 1883\r\n".to_vec();
    bytes.extend_from_slice(&good.encode());
    s.write_all(&bytes).await.expect("send");
    let (sent, closed) = until_closed(&mut s, WAIT).await;
    assert!(closed && sent.is_empty(), "v1 header: {sent:?}");
    // A v2 header cut short, then the end of the stream.
    let mut s = TcpStream::connect(t.addr()).await.expect("tcp connect");
    let mut bytes = header("203.0.113.7:5000", t.addr());
    bytes.truncate(20);
    s.write_all(&bytes).await.expect("send");
    s.shutdown().await.expect("half-close");
    let (sent, closed) = until_closed(&mut s, WAIT).await;
    assert!(closed && sent.is_empty(), "cut header: {sent:?}");
    // A LOCAL header (the balancer's health check) keeps the TCP peer.
    let local = Builder::new(Version::Two | Command::Local, 0)
        .build()
        .expect("header");
    let mut s = TcpStream::connect(t.addr()).await.expect("tcp connect");
    let mut bytes = local;
    bytes.extend_from_slice(&good.encode());
    s.write_all(&bytes).await.expect("send");
    let ack = read_packet(&mut s, WAIT).await.expect("CONNACK");
    assert_eq!(ack[3], 0);
}

/// A minimal balancer: accepts on a free port and forwards each connection
/// to `backend` after a v2 header naming `client` as the source.
async fn balancer(backend: SocketAddr, client: &'static str) -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = l.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((mut inbound, _)) = l.accept().await {
            tokio::spawn(async move {
                let Ok(mut outbound) = TcpStream::connect(backend).await else {
                    return;
                };
                if outbound.write_all(&header(client, backend)).await.is_err() {
                    return;
                }
                let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
            });
        }
    });
    addr
}

#[tokio::test]
async fn rumqttc_behind_a_balancer_is_seen_with_its_own_address() {
    let (t, secret) = proxied_broker().await;
    let mut events = t.broker.events.subscribe();
    let lb = balancer(t.addr(), "192.0.2.55:41000").await;
    let (u, p) = t.creds(PK, "r", &secret);
    let (c, mut el) = v4::connect(lb, "px.r", &u, &p)
        .await
        .unwrap_or_else(|code| panic!("CONNACK {code}"));
    let connected = next_event(&mut events, EventKind::DeviceConnected).await;
    assert_eq!(connected.to_json()["Ip"], "192.0.2.55");
    let session = t.broker.gateway.online().get("px.r").expect("online");
    assert_eq!(
        session.peer,
        "192.0.2.55:41000".parse::<SocketAddr>().expect("addr")
    );
    c.subscribe("devices/px/r/#", rumqttc::QoS::AtLeastOnce)
        .await
        .expect("queued");
    tokio::time::timeout(WAIT, async {
        loop {
            if let Ok(rumqttc::Event::Incoming(rumqttc::Packet::SubAck(_))) = el.poll().await {
                break;
            }
        }
    })
    .await
    .expect("SUBACK through the balancer");
}

/// A raw CONNECT from `local` (a loopback address of ours) to `front`.
async fn connect_from(
    local: &str,
    front: SocketAddr,
    connect: &RawConnect,
) -> (Option<u8>, SocketAddr, TcpStream) {
    let sock = tokio::net::TcpSocket::new_v4().expect("socket");
    sock.bind(format!("{local}:0").parse().expect("addr"))
        .expect("bind a loopback address");
    let mut s = sock.connect(front).await.expect("connect to HAProxy");
    let me = s.local_addr().expect("addr");
    s.write_all(&connect.encode()).await.expect("send");
    let code = read_packet(&mut s, WAIT)
        .await
        .and_then(|p| (p.first() == Some(&0x20)).then(|| p[3]));
    (code, me, s)
}

/// HAProxy itself in front of the broker (`send-proxy-v2`): bans follow
/// the client's address, not HAProxy's. Skipped, saying so, where HAProxy
/// is not installed (.ci/run installs it).
#[tokio::test]
async fn behind_a_real_haproxy_bans_follow_the_client() {
    let Some(bin) = haproxy_bin() else {
        eprintln!("SKIPPED: haproxy is not installed (apt-get install haproxy)");
        return;
    };
    let (t, secret) = proxied_broker().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let front = SocketAddr::from((
        [127, 0, 0, 1],
        activation_client::child::free_port().expect("free port"),
    ));
    let cfg = dir.path().join("haproxy.cfg");
    std::fs::write(
        &cfg,
        format!(
            "global\n    maxconn 200\ndefaults\n    mode tcp\n    timeout connect 5s\n    \
             timeout client 60s\n    timeout server 60s\nfrontend mqtt\n    bind {front}\n    \
             default_backend broker\nbackend broker\n    server b1 {} send-proxy-v2\n",
            t.addr()
        ),
    )
    .expect("write haproxy.cfg");
    let _haproxy = Haproxy::start(&bin, &cfg, front).await;
    let (u, _) = t.creds(PK, "h", &secret);
    let forged = RawConnect::new(4, "px.h", &u, &sign("wrong", &u));
    for n in 0..3 {
        assert_eq!(
            connect_from("127.0.0.3", front, &forged).await.0,
            Some(0x04),
            "{n}"
        );
    }
    let (u, p) = t.creds(PK, "h", &secret);
    let good = RawConnect::new(4, "px.h", &u, &p);
    assert_eq!(
        connect_from("127.0.0.3", front, &good).await.0,
        Some(0x05),
        "127.0.0.3 is banned"
    );
    // The stream stays open while the session is looked up: dropping it
    // would end the session.
    let (code, me, _open) = connect_from("127.0.0.2", front, &good).await;
    assert_eq!(code, Some(0), "127.0.0.2 behind the same HAProxy is not");
    let session = t.broker.gateway.online().get("px.h").expect("online");
    assert_eq!(session.peer, me, "the broker sees the client's own address");
}

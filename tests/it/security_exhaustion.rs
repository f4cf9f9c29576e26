//! Exhaustion, against a real broker and real sockets: one
//! account cannot hoard sessions, a device flood cannot lock the operators
//! out, one source cannot hold unlimited connections without CONNECT, the
//! authentication step has a deadline, and logins never queue without bound.

use crate::common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use activation_broker::admin::accounts::{AccountConfig, RoleConfig};
use activation_broker::clock::Clock;
use activation_broker::events::EventBus;
use activation_broker::gateway::{
    router_config, AuthFuture, Authenticator, ConnectInfo, Gateway, ListenerConfig, RouterHandle,
};
use common::broker::{account, start_broker, TestBroker, WAIT};
use common::wire::{read_connack, read_packet, until_closed, RawConnect};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

const PK: &str = "exh";

fn ops_account() -> AccountConfig {
    account("ops", "ops-pw", RoleConfig::Named("viewer".into()), false)
}

/// Sends `connect` on a new socket; the CONNACK code (`None`: closed
/// without one) and the socket, still open.
async fn send_connect(addr: SocketAddr, connect: &RawConnect) -> (Option<u8>, TcpStream) {
    let mut s = TcpStream::connect(addr).await.expect("tcp connect");
    s.write_all(&connect.encode()).await.expect("send CONNECT");
    let code = read_connack(&mut s).await;
    (code, s)
}

fn login(level: u8, client_id: &str, password: &str, clean: bool) -> RawConnect {
    let mut c = RawConnect::new(level, client_id, "ops", password);
    if !clean {
        c.flags &= !0b10;
    }
    c
}

/// An account holds at most `max_sessions_per_account` client ids, live
/// or stored by the router; one more is refused with 0x97 (3.1.1: 0x05),
/// its own stored sessions stay reachable.
#[tokio::test]
async fn one_account_cannot_hoard_stored_sessions() {
    let t = start_broker(|c| {
        c.accounts = vec![ops_account()];
        c.account_limits.max_sessions_per_account = 3;
    })
    .await;
    let addr = t.broker.accounts_addr();
    // Three stored sessions (clean session off), their connections closed.
    for id in ["s1", "s2", "s3"] {
        let (code, s) = send_connect(addr, &login(4, id, "ops-pw", false)).await;
        assert_eq!(code, Some(0), "{id}");
        drop(s);
    }
    for (level, refused) in [(4u8, 0x05), (5, 0x97)] {
        let (code, _) = send_connect(addr, &login(level, "s4", "ops-pw", false)).await;
        assert_eq!(code, Some(refused), "a fourth client id (v{level})");
        let (code, _) = send_connect(addr, &login(level, "s5", "ops-pw", true)).await;
        assert_eq!(code, Some(refused), "a fourth, clean (v{level})");
    }
    // Its own sessions are still reachable.
    let (code, _s1) = send_connect(addr, &login(4, "s1", "ops-pw", false)).await;
    assert_eq!(code, Some(0), "resuming s1");
}

/// `reserved_for_accounts` of the router's sessions are the operators':
/// devices are refused (0x03) once they hold the rest, accounts still log in.
#[tokio::test]
async fn a_device_flood_cannot_lock_the_operators_out() {
    let t = start_broker(|c| {
        c.accounts = vec![ops_account()];
        c.router.max_connections = 20;
        c.router.reserved_for_accounts = 5;
        c.gate.source_rate = 0.0;
        c.gate.device_rate = 0.0;
    })
    .await;
    let secret = t.product(PK, 40, 86_400).await;
    let mut held = Vec::new();
    let mut refused = None;
    for n in 0..20 {
        let dk = format!("d{n}");
        let (u, p) = t.creds(PK, &dk, &secret);
        let (code, s) =
            send_connect(t.addr(), &RawConnect::new(4, &format!("{PK}.{dk}"), &u, &p)).await;
        match code {
            Some(0) => held.push(s),
            other => {
                refused = other;
                break;
            }
        }
    }
    assert_eq!(held.len(), 15, "devices admitted");
    assert_eq!(refused, Some(0x03), "the 16th device");
    let mut ops = Vec::new();
    for n in 0..5 {
        let (code, s) = send_connect(
            t.broker.accounts_addr(),
            &login(5, &format!("o{n}"), "ops-pw", true),
        )
        .await;
        assert_eq!(
            code,
            Some(0),
            "operator session {n} beside the device flood"
        );
        ops.push(s);
    }
}

async fn connect_idle(t: &TestBroker) -> TcpStream {
    TcpStream::connect(t.addr()).await.expect("tcp connect")
}

/// One source holds at most `max_pending_per_source` connections that
/// have not sent CONNECT; the next is closed at once, and a CONNECT gives
/// its slot back.
#[tokio::test]
async fn one_source_cannot_hold_unlimited_connections_without_connect() {
    let t = start_broker(|c| {
        c.devices.max_pending_per_source = 4;
        c.devices.io_threads = 1;
        c.devices.connect_timeout_secs = 60;
    })
    .await;
    let secret = t.product(PK, 10, 86_400).await;
    let mut idle = Vec::new();
    for _ in 0..4 {
        idle.push(connect_idle(&t).await);
    }
    let mut fifth = connect_idle(&t).await;
    let (sent, closed) = until_closed(&mut fifth, WAIT).await;
    assert!(closed && sent.is_empty(), "the fifth is closed at once");
    // One of the four sends its CONNECT: admitted, and its slot is free.
    let (u, p) = t.creds(PK, "d1", &secret);
    let mut first = idle.remove(0);
    first
        .write_all(&RawConnect::new(4, "exh.d1", &u, &p).encode())
        .await
        .expect("send");
    let ack = read_packet(&mut first, WAIT).await.expect("CONNACK");
    assert_eq!(ack[3], 0);
    let (u, p) = t.creds(PK, "d2", &secret);
    let (code, _s) = send_connect(t.addr(), &RawConnect::new(4, "exh.d2", &u, &p)).await;
    assert_eq!(code, Some(0), "a new connection fits again");
}

/// An authenticator that never decides.
struct Stalls;

impl Authenticator for Stalls {
    fn authenticate(&self, _info: ConnectInfo) -> AuthFuture {
        Box::pin(std::future::pending())
    }
}

/// The authentication step has a deadline: an authenticator that never
/// answers gets the client CONNACK 0x89 Server busy (3.1.1: 0x03).
#[tokio::test]
async fn a_stalled_authentication_is_answered_server_busy() {
    let router = RouterHandle::spawn(0, router_config(100));
    let gateway = Gateway::start(router, EventBus::new(1024), Clock::system())
        .await
        .expect("gateway");
    let mut cfg = ListenerConfig::new("stalls", "127.0.0.1:0".parse().expect("addr"));
    cfg.auth_timeout = Duration::from_secs(1);
    let listener = gateway.listen(cfg, Arc::new(Stalls)).await.expect("listen");
    for (level, code) in [(4u8, 0x03), (5, 0x89)] {
        let (got, _) = send_connect(
            listener.local_addr(),
            &RawConnect::new(level, "c", "u", "p"),
        )
        .await;
        assert_eq!(got, Some(code), "v{level}");
    }
    listener.close();
}

/// Logins verifying or waiting for argon2 are bounded: with room for one,
/// a burst of 48 gets some 0x89 at once instead of queueing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_login_flood_is_refused_server_busy_instead_of_queueing() {
    let t = start_broker(|c| {
        c.accounts = vec![ops_account()];
        c.account_limits.max_pending_logins = 1;
    })
    .await;
    let addr = t.broker.accounts_addr();
    // All sockets first, then every CONNECT at once.
    let mut socks = Vec::new();
    for _ in 0..48 {
        socks.push(TcpStream::connect(addr).await.expect("tcp connect"));
    }
    let bytes = login(5, "", "wrong", true).encode();
    for s in socks.iter_mut() {
        s.write_all(&bytes).await.expect("send");
    }
    let mut codes = std::collections::BTreeMap::new();
    for mut s in socks {
        let code = read_packet(&mut s, WAIT)
            .await
            .and_then(|p| (p.first() == Some(&0x20)).then(|| p[3]));
        *codes.entry(code).or_insert(0) += 1;
    }
    eprintln!("48 concurrent logins, room for 1: {codes:?}");
    assert!(codes.contains_key(&Some(0x89)), "{codes:?}");
    assert!(codes.contains_key(&Some(0x86)), "{codes:?}");
    assert_eq!(codes.len(), 2, "{codes:?}");
}

//! Connection and subscription rates of the connection layer (ignored:
//! run by hand; settings printed, nothing asserted about time or memory).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use activation_broker::events::{EventBus, EventKind};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::common::gateway::*;

/// Connection rate: `cargo test --release --test it -- --ignored
/// --nocapture gateway::rates::connect_rate`. Holds every connection open until the end.
#[tokio::test(flavor = "multi_thread")]
#[ignore]
async fn connect_rate() {
    const N: usize = 8000;
    const CONCURRENCY: usize = 256;
    let bus = EventBus::new(65536);
    let mut events = bus.subscribe();
    let (gateway, listener) = accept_all_gateway(N + 10, bus).await;
    let (held, secs) = flood(listener.local_addr(), "d", N, CONCURRENCY, 60, false).await;
    let total = held.len();
    println!(
        "{total} connections in {secs:.2} s: {:.0} CONNACKs/s, {} online",
        total as f64 / secs,
        gateway.online().len()
    );
    let mut reasons: HashMap<String, usize> = HashMap::new();
    while let Ok(e) = events.try_recv() {
        if e.kind == EventKind::DeviceDisconnected {
            *reasons
                .entry(e.to_json()["Reason"].to_string())
                .or_default() += 1;
        }
    }
    assert!(reasons.is_empty(), "sessions ended early: {reasons:?}");
    assert_eq!(total, N);
    assert_eq!(gateway.online().len(), N);
}

/// Connects `n` devices `p.{prefix}{i}` (keep alive `keep_alive` s) through
/// `concurrency` workers, each waiting for its CONNACK and, with `subscribe`, then subscribing to its
/// command topic (QoS 1) and waiting for the SUBACK. Returns the held
/// sockets and the seconds taken.
async fn flood(
    addr: SocketAddr,
    prefix: &str,
    n: usize,
    concurrency: usize,
    keep_alive: u16,
    subscribe: bool,
) -> (Vec<TcpStream>, f64) {
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let start = std::time::Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..concurrency {
        let (next, prefix) = (next.clone(), prefix.to_owned());
        tasks.push(tokio::spawn(async move {
            let mut held = Vec::new();
            loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if i >= n {
                    return held;
                }
                let dk = format!("{prefix}{i}");
                let mut s = raw(addr).await;
                s.write_all(&connect_bytes(
                    4,
                    &format!("p.{dk}"),
                    &format!("p&{dk}"),
                    keep_alive,
                    None,
                ))
                .await
                .expect("send");
                let mut ack = [0u8; 4];
                s.read_exact(&mut ack).await.expect("CONNACK");
                assert_eq!(ack, [0x20, 0x02, 0x00, 0x00]);
                if subscribe {
                    let filter = format!("devices/p/{dk}/command");
                    let mut body = vec![0x00, 0x01];
                    body.extend_from_slice(
                        &u16::try_from(filter.len()).expect("short").to_be_bytes(),
                    );
                    body.extend_from_slice(filter.as_bytes());
                    body.push(0x01);
                    let mut packet = vec![0x82, u8::try_from(body.len()).expect("short")];
                    packet.extend_from_slice(&body);
                    s.write_all(&packet).await.expect("SUBSCRIBE");
                    let mut suback = [0u8; 5];
                    s.read_exact(&mut suback).await.expect("SUBACK");
                    assert_eq!(suback, [0x90, 0x03, 0x00, 0x01, 0x01]);
                }
                held.push(s);
            }
        }));
    }
    let mut held = Vec::new();
    for t in tasks {
        held.extend(t.await.expect("task"));
    }
    (held, start.elapsed().as_secs_f64())
}

/// VmRSS of this process in KB.
fn rss_kb() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

/// Connection rate and memory of idle connections, connect alone or with a
/// SUBSCRIBE, one configuration per process run:
/// `RATE_SUBSCRIBE=0|1 RATE_DEVICES=5000 cargo test --release --test it
/// -- --ignored --nocapture gateway::rates::connect_and_subscribe_rate`. Settings are
/// printed; nothing is asserted about time or memory.
#[tokio::test(flavor = "multi_thread")]
#[ignore]
async fn connect_and_subscribe_rate() {
    let env = |k: &str, d: usize| {
        std::env::var(k)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(d)
    };
    let n = env("RATE_DEVICES", 5000);
    let subscribe = env("RATE_SUBSCRIBE", 1) == 1;
    const CONCURRENCY: usize = 50;
    println!(
        "settings: {n} devices, {CONCURRENCY} in flight, MQTT 3.1.1, in-process gateway \
         (AcceptAll authenticator, no ledger), default ListenerConfig, client in the same \
         process on the same runtime, {} CPUs, subscribe: {subscribe}",
        std::thread::available_parallelism().map_or(1, |p| p.get())
    );
    let (gateway, listener) = accept_all_gateway(n + 10, EventBus::new(65536)).await;
    let before = rss_kb();
    let (held, secs) = flood(listener.local_addr(), "d", n, CONCURRENCY, 600, subscribe).await;
    // Measurement only: let the RSS settle (bounded).
    let mut rss = rss_kb();
    for _ in 0..20 {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let now = rss_kb();
        if now.abs_diff(rss) < 64 {
            rss = now;
            break;
        }
        rss = now;
    }
    println!(
        "{}: {} devices in {secs:.2} s: {:.0}/s; RSS {before} KB -> {rss} KB: {:.2} KB per idle device \
         (client sockets included); {} linked",
        if subscribe { "connect + SUBSCRIBE" } else { "connect alone" },
        held.len(),
        held.len() as f64 / secs,
        (rss.saturating_sub(before)) as f64 / held.len() as f64,
        gateway.linked_sessions()
    );
    assert_eq!(gateway.online().len(), n);
    listener.close();
}

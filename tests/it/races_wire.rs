//! Races over the wire: a real broker on port 0, real sockets, rumqttc
//! clients all connecting at once. SPEC §2 exactly-once: N devices racing
//! for K codes get exactly K acceptances; concurrent CONNECTs of one device
//! consume at most one code; assignments racing with connects never
//! over-assign. Rate limits are off (0 = unlimited) so only the ledger decides.

use crate::common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use activation_broker::credentials::device_credentials;
use activation_broker::ledger::{AuthMode, Command, LedgerError, Outcome};
use common::broker::{start_broker, TestBroker};
use common::wire::{raise_nofile, snapshot};
use rumqttc::v5::mqttbytes::v5::Packet;
use rumqttc::v5::{AsyncClient, Event, EventLoop, MqttOptions};

/// Generous: 2,000 debug-build clients share two cores.
const CONNACK_WAIT: Duration = Duration::from_secs(60);

fn unlimited(t: &mut activation_broker::config::Config) {
    t.gate.source_rate = 0.0;
    t.gate.device_rate = 0.0;
    t.gate.ban_after_failures = 0;
    t.devices.max_concurrent_links = 256;
}

/// The CONNACK code of one MQTT 5 connect attempt (`None`: no CONNACK, the
/// connection failed). An accepted client is returned to be held open.
async fn attempt(
    addr: SocketAddr,
    id: &str,
    user: &str,
    pass: &str,
) -> (Option<u8>, Option<(AsyncClient, EventLoop)>) {
    let mut o = MqttOptions::new(id, addr.ip().to_string(), addr.port());
    o.set_credentials(user, pass);
    o.set_keep_alive(Duration::from_secs(60));
    o.set_connection_timeout(60);
    // rumqttc v5 preallocates a slot per allowed in-flight publish (65,535
    // by default, megabytes per client): 2,000 clients would need ~23 GB.
    o.set_outgoing_inflight_upper_limit(10);
    let (c, mut el) = AsyncClient::new(o, 8);
    let r = tokio::time::timeout(CONNACK_WAIT, async {
        loop {
            match el.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(a))) => {
                    return Some(common::broker::v5::code(a.code))
                }
                Ok(_) => {}
                Err(rumqttc::v5::ConnectionError::ConnectionRefused(c)) => {
                    return Some(common::broker::v5::code(c))
                }
                Err(e) => {
                    eprintln!("{id}: {e}");
                    return None;
                }
            }
        }
    })
    .await
    .unwrap_or(None);
    match r {
        Some(0) => (Some(0), Some((c, el))),
        other => (other, None),
    }
}

fn creds(t: &TestBroker, pk: &str, dk: &str, secret: &str) -> (String, String, String) {
    let (u, p) = device_credentials(pk, dk, secret, t.clock.now());
    (format!("{pk}.{dk}"), u, p)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_thousand_devices_racing_for_500_codes_get_exactly_500() {
    raise_nofile();
    let t = start_broker(unlimited).await;
    let secret = t.product("race", 500, 86_400).await;
    let addr = t.addr();
    let gate = Arc::new(tokio::sync::Barrier::new(2_000));
    let mut tasks = Vec::new();
    for n in 0..2_000 {
        let (id, u, p) = creds(&t, "race", &format!("d{n}"), &secret);
        let gate = gate.clone();
        tasks.push(tokio::spawn(async move {
            gate.wait().await;
            let (code, held) = attempt(addr, &id, &u, &p).await;
            // Hold accepted sessions until every CONNACK is in, so
            // nothing is torn down mid-race.
            (code, held)
        }));
    }
    let mut held = Vec::new();
    let (mut accepted, mut quota, mut other) = (0, 0, Vec::new());
    for task in tasks {
        let (code, h) = task.await.expect("task");
        match code {
            Some(0) => accepted += 1,
            Some(0x97) => quota += 1,
            c => other.push(c),
        }
        held.extend(h);
    }
    assert!(other.is_empty(), "unexpected outcomes: {other:?}");
    eprintln!("RELIABILITY: 2000 devices at once for 500 codes: {accepted} CONNACK 0, {quota} CONNACK 0x97, {} other", other.len());
    assert_eq!((accepted, quota), (500, 1_500));
    let s = snapshot(&t.broker.ledger);
    assert_eq!(s.counters.1, 500, "consumed == accepted");
    assert_eq!(
        t.broker
            .ledger
            .product("race")
            .expect("product")
            .available(),
        0
    );
    drop(held);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_connections_of_one_device_consume_one_code() {
    raise_nofile();
    let t = start_broker(unlimited).await;
    let secret = t.product("one", 10, 86_400).await;
    let addr = t.addr();
    let gate = Arc::new(tokio::sync::Barrier::new(50));
    let mut tasks = Vec::new();
    for _ in 0..50 {
        let (id, u, p) = creds(&t, "one", "dev", &secret);
        let gate = gate.clone();
        tasks.push(tokio::spawn(async move {
            gate.wait().await;
            attempt(addr, &id, &u, &p).await
        }));
    }
    let mut codes = Vec::new();
    let mut held = Vec::new();
    for task in tasks {
        let (code, h) = task.await.expect("task");
        codes.push(code);
        held.extend(h);
    }
    // Every one had valid credentials and a code exists: all are admitted
    // (later sessions take over earlier ones), and exactly one code is gone.
    assert!(codes.iter().all(|c| *c == Some(0)), "{codes:?}");
    let s = snapshot(&t.broker.ledger);
    eprintln!(
        "RELIABILITY: 50 connections of one device at once: {} CONNACK 0, {} code(s) consumed",
        codes.iter().filter(|c| **c == Some(0)).count(),
        s.counters.1
    );
    assert_eq!(s.counters.1, 1, "exactly one consumption");
    let d = t.broker.ledger.device("one", "dev").expect("device");
    assert_eq!(d.codes.len(), 1);
    drop(held);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn assignments_racing_with_connects_never_over_assign() {
    const DEVICES: usize = 400;
    const UNASSIGNED: u64 = 300;
    const CHUNK: u64 = 20;
    raise_nofile();
    let t = Arc::new(start_broker(unlimited).await);
    let Outcome::ProductCreated(p) = t
        .run(Command::CreateProduct {
            product_key: "late".into(),
            name: "Late".into(),
            auth_mode: AuthMode::ProductSecret,
        })
        .await
    else {
        panic!("no product")
    };
    // A pool bought without a product: every code must come through AssignCodes.
    t.run(Command::CreateOrder {
        order_id: Some("pool".into()),
        quantity: UNASSIGNED,
        validity_secs: 86_400,
        product_key: None,
    })
    .await;
    let addr = t.addr();
    // Devices retry on 0x97 each time more codes are assigned, and stop
    // once the assigner is done and they are refused again.
    let (progress_tx, progress_rx) = tokio::sync::watch::channel((0u64, false));
    let mut devices = Vec::new();
    for n in 0..DEVICES {
        let t = t.clone();
        let secret = p.secret.clone();
        let mut rx = progress_rx.clone();
        devices.push(tokio::spawn(async move {
            let dk = format!("d{n}");
            let mut attempts = 0;
            loop {
                let (_, done) = *rx.borrow_and_update();
                let (id, u, pw) = creds(&t, "late", &dk, &secret);
                attempts += 1;
                match attempt(addr, &id, &u, &pw).await {
                    (Some(0), held) => return (true, attempts, held),
                    (Some(0x97), _) if !done => {
                        if rx.changed().await.is_err() {
                            return (false, attempts, None);
                        }
                    }
                    (Some(0x97), _) => return (false, attempts, None),
                    (other, _) => panic!("{dk}: unexpected outcome {other:?}"),
                }
            }
        }));
    }
    let assigner = {
        let t = t.clone();
        tokio::spawn(async move {
            let mut assigned = 0u64;
            let mut refused = 0;
            loop {
                let r = t
                    .broker
                    .ledger
                    .execute(
                        Command::AssignCodes {
                            product_key: "late".into(),
                            quantity: CHUNK,
                            validity_secs: Some(86_400),
                        },
                        None,
                    )
                    .await;
                match r {
                    Ok(Outcome::CodesAssigned(a)) => {
                        assigned += CHUNK;
                        assert_eq!(a.quantity, CHUNK);
                        let _ = progress_tx.send((assigned, false));
                    }
                    Err(LedgerError::InsufficientCodes { available, .. }) => {
                        assert_eq!(available, 0, "a chunk of {CHUNK} divides the pool");
                        refused += 1;
                        break;
                    }
                    other => panic!("unexpected {other:?}"),
                }
            }
            let _ = progress_tx.send((assigned, true));
            (assigned, refused)
        })
    };
    let (assigned, refused) = assigner.await.expect("assigner");
    assert_eq!((assigned, refused), (UNASSIGNED, 1));
    let mut accepted = 0;
    let mut attempts = 0;
    let mut held = Vec::new();
    for d in devices {
        let (ok, n, h) = d.await.expect("device");
        accepted += usize::from(ok);
        attempts += n;
        held.extend(h);
    }
    let s = snapshot(&t.broker.ledger);
    let product = t.broker.ledger.product("late").expect("product");
    eprintln!(
        "RELIABILITY: {DEVICES} devices retrying while {UNASSIGNED} codes are assigned in chunks of {CHUNK}: {attempts} connects, {accepted} accepted, {} consumed, product total {}, {refused} over-assignment refused",
        s.counters.1, product.total
    );
    assert_eq!(
        accepted as u64, UNASSIGNED,
        "every assigned code is used once"
    );
    assert_eq!(s.counters.1, accepted as u64, "consumed == accepted");
    assert_eq!(s.counters.0, UNASSIGNED, "total unchanged");
    assert_eq!(s.counters.3, 0, "nothing left unassigned");
    assert_eq!(product.total, UNASSIGNED, "never over-assigned");
    assert_eq!(product.available(), 0);
    drop(held);
}

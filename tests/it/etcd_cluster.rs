//! Several broker nodes on one activation ledger in etcd: a real 3-member
//! etcd cluster and broker binaries as child processes, devices speaking
//! MQTT through rumqttc.

use crate::common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use activation_broker::clock::Clock;
use activation_broker::credentials::device_credentials;
use common::child::ChildBroker;
use common::etcd::{admin, counter, EtcdCluster};
use common::flood::connack_code;
use serde_json::json;
use tokio::sync::Semaphore;

const PK: &str = "fleet";
const YEAR: u64 = 365 * 24 * 3600;
/// MQTT 3.1.1 "server unavailable": the store could not decide; retry.
const UNAVAILABLE: u8 = 3;

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
}

/// Connects until the answer is not "unavailable" (at most 20 tries): the
/// final CONNACK code, `None` if a try got none.
async fn activate(addr: SocketAddr, dk: &str, secret: &str) -> Option<u8> {
    for _ in 0..20 {
        match connack_code(addr, PK, dk, secret).await {
            Some(UNAVAILABLE) => continue,
            other => return other,
        }
    }
    Some(UNAVAILABLE)
}

/// The node's `Consumed` once it reaches `want` (its replica follows
/// etcd's watch), or the last value seen after 20 s.
async fn consumed_reaches(node: &ChildBroker, want: u64) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let s = admin(node, json!({"Action": "DescribeActivationSummary"})).await;
        let consumed = s["Consumed"]
            .as_u64()
            .or_else(|| s["Data"]["Consumed"].as_u64())
            .unwrap_or_else(|| panic!("no Consumed in {s}"));
        if consumed == want || Instant::now() > deadline {
            return consumed;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Devices `d0..d{devices}` activate, `in_flight` at a time, on the two
/// nodes in turn (`pattern[i % len]` is device `i`'s node); each one's
/// CONNACK code.
async fn flood_alternating(
    addrs: [SocketAddr; 2],
    pattern: &[usize],
    devices: usize,
    in_flight: usize,
    secret: &str,
) -> Vec<Option<u8>> {
    let gate = Arc::new(Semaphore::new(in_flight));
    let mut tasks = Vec::new();
    for i in 0..devices {
        let (gate, secret) = (gate.clone(), secret.to_owned());
        let addr = addrs[pattern[i % pattern.len()]];
        tasks.push(tokio::spawn(async move {
            let _p = gate.acquire_owned().await.expect("semaphore");
            activate(addr, &format!("d{i}"), &secret).await
        }));
    }
    let mut codes = Vec::new();
    for t in tasks {
        codes.push(t.await.expect("task"));
    }
    codes
}

/// How many were accepted, and the other answers (each once, sorted).
fn tally(codes: &[Option<u8>]) -> (usize, Vec<&Option<u8>>) {
    let accepted = codes.iter().filter(|c| **c == Some(0)).count();
    let mut other: Vec<_> = codes.iter().filter(|c| **c != Some(0)).collect();
    other.sort();
    other.dedup();
    (accepted, other)
}

#[test]
fn two_nodes_give_out_exactly_the_codes_there_are() {
    const CODES: u64 = 500;
    const DEVICES: usize = 2_000;
    let cluster = EtcdCluster::start(3);
    let secret = cluster.prepare(PK, CODES, YEAR);
    let nodes = [cluster.broker("a"), cluster.broker("b")];
    let addrs = [nodes[0].addr, nodes[1].addr];
    let rt = runtime();
    // Node a reserves its lane first (half the pool); then three devices
    // in four go to node b, which drains the pool and then must take
    // codes from a's lane: the last codes are given out through steals.
    let first = rt.block_on(activate(addrs[0], "first", &secret));
    assert_eq!(first, Some(0));
    let codes = rt.block_on(flood_alternating(
        addrs,
        &[0, 1, 1, 1],
        DEVICES - 1,
        50,
        &secret,
    ));
    let (accepted, other) = tally(&codes);
    assert_eq!(
        accepted + 1,
        CODES as usize,
        "{accepted} devices accepted for {CODES} codes; other answers {other:?}"
    );
    // Everyone else was refused for want of a code (3.1.1: 0x05), not
    // left undecided.
    assert_eq!(other, vec![&Some(5)], "refusals other than 'no code'");
    rt.block_on(async {
        for node in &nodes {
            assert_eq!(consumed_reaches(node, CODES).await, CODES);
        }
        assert!(
            counter(&nodes[1], "activation_ledger_lane_steals_total").await > 0,
            "node b never took codes from node a's lane"
        );
    });
    // Both nodes consumed through their lanes, and nothing is left in any.
    let lanes = cluster.ledger("observer").lanes();
    for node in ["a", "b"] {
        let lane = lanes
            .iter()
            .find(|l| l.product_key == PK && l.node == node)
            .unwrap_or_else(|| panic!("no lane of node {node}: {lanes:?}"));
        assert!(lane.consumed > 0 && lane.available() == 0, "{lane:?}");
    }
    assert_eq!(lanes.iter().map(|l| l.consumed).sum::<u64>(), CODES);
}

/// An admin answer without its `RequestId`.
async fn described(node: &ChildBroker, action: &str) -> serde_json::Value {
    let mut v = admin(node, json!({ "Action": action })).await;
    if let Some(o) = v.as_object_mut() {
        o.remove("RequestId");
    }
    v
}

#[test]
fn two_busy_nodes_catch_up_after_conflicts_without_reloading() {
    const CODES: u64 = 5_000;
    const DEVICES: usize = 3_000;
    let cluster = EtcdCluster::start(3);
    let secret = cluster.prepare(PK, CODES, YEAR);
    // Lanes of 4 codes: the nodes reserve from the pool all the time.
    let nodes = [
        cluster.broker_configured("a", false, 4),
        cluster.broker_configured("b", false, 4),
    ];
    let addrs = [nodes[0].addr, nodes[1].addr];
    let rt = runtime();
    // Both nodes busy at once: each commits batches while the other does;
    // their lanes keep activations apart, but their reservations from the
    // pool (blocks of 4 codes) both write the product, so those batches
    // are refused as stale over and over.
    let codes = rt.block_on(flood_alternating(addrs, &[0, 1], DEVICES, 128, &secret));
    let (accepted, other) = tally(&codes);
    assert_eq!(
        accepted, DEVICES,
        "{accepted} of {DEVICES} devices accepted ({CODES} codes); other answers {other:?}"
    );
    // (a) Exactly one code per device in etcd, and the invariants hold.
    let acked: Vec<String> = (0..DEVICES).map(|i| format!("d{i}")).collect();
    let consumed = cluster.check(PK, CODES, &acked, "after the flood");
    assert_eq!(consumed, DEVICES as u64, "codes consumed in etcd");
    let truth = cluster.ledger("check").counters();
    rt.block_on(async {
        // (b) Stale refusals happened, and none of them reloaded a replica.
        let mut conflicts = 0;
        for node in &nodes {
            conflicts += counter(node, "activation_ledger_commit_conflicts_total").await;
            let reloads = counter(node, "activation_ledger_replica_reloads_total").await;
            assert_eq!(reloads, 0, "full replica reloads:\n{}", node.log_tail());
        }
        assert!(conflicts > 0, "the two nodes never conflicted");
        eprintln!("stale refusals (both nodes): {conflicts}, full reloads: 0");
        // (c) Both replicas agree with etcd and with each other.
        for node in &nodes {
            assert_eq!(consumed_reaches(node, DEVICES as u64).await, DEVICES as u64);
            let s = described(node, "DescribeActivationSummary").await;
            let s = if s.get("Data").is_some() {
                &s["Data"]
            } else {
                &s
            };
            for (field, want) in [
                ("Total", truth.total),
                ("Consumed", truth.consumed),
                ("Available", truth.available),
                ("Unassigned", truth.unassigned),
                ("Forfeited", truth.forfeited),
            ] {
                assert_eq!(s[field].as_u64(), Some(want), "{field} on a node: {s}");
            }
        }
        assert_eq!(
            described(&nodes[0], "DescribeProducts").await,
            described(&nodes[1], "DescribeProducts").await,
            "the nodes describe the product differently"
        );
    });
}

#[test]
fn one_device_on_two_nodes_at_once_consumes_one_code() {
    const DEVICES: usize = 100;
    let cluster = EtcdCluster::start(3);
    let secret = cluster.prepare(PK, 1_000, YEAR);
    let nodes = [cluster.broker("a"), cluster.broker("b")];
    let (a, b) = (nodes[0].addr, nodes[1].addr);
    let rt = runtime();
    rt.block_on(async {
        for i in 0..DEVICES {
            let dk = format!("twin{i}");
            let (ra, rb) = tokio::join!(activate(a, &dk, &secret), activate(b, &dk, &secret));
            assert_eq!((ra, rb), (Some(0), Some(0)), "device {dk}");
        }
        for node in &nodes {
            assert_eq!(consumed_reaches(node, DEVICES as u64).await, DEVICES as u64);
        }
    });
    // Each device holds exactly one code, whichever node consumed it.
    let ledger = cluster.ledger("check");
    for i in 0..DEVICES {
        let d = ledger
            .device(PK, &format!("twin{i}"))
            .expect("device record");
        assert_eq!(d.codes.len(), 1, "device twin{i} consumed {:?}", d.codes);
    }
}

#[test]
fn a_device_activated_on_one_node_reconnects_on_another_for_free() {
    let cluster = EtcdCluster::start(3);
    let secret = cluster.prepare(PK, 10, YEAR);
    let nodes = [cluster.broker("a"), cluster.broker("b")];
    let rt = runtime();
    rt.block_on(async {
        assert_eq!(activate(nodes[0].addr, "roamer", &secret).await, Some(0));
        assert_eq!(consumed_reaches(&nodes[1], 1).await, 1);
        for _ in 0..3 {
            assert_eq!(activate(nodes[1].addr, "roamer", &secret).await, Some(0));
        }
        for node in &nodes {
            assert_eq!(
                consumed_reaches(node, 1).await,
                1,
                "one code, on every node"
            );
        }
    });
}

#[test]
fn a_device_deleted_through_one_node_is_disconnected_from_another() {
    let cluster = EtcdCluster::start(3);
    let secret = cluster.prepare(PK, 10, YEAR);
    let nodes = [cluster.broker("a"), cluster.broker("b")];
    let rt = runtime();
    rt.block_on(async {
        // The device stays connected to node b.
        let b = nodes[1].addr;
        let (u, p) = device_credentials(PK, "victim", &secret, Clock::system().now());
        let mut o = rumqttc::MqttOptions::new(format!("{PK}.victim"), b.ip().to_string(), b.port());
        o.set_credentials(u, p);
        o.set_keep_alive(Duration::from_secs(30));
        let (_client, mut el) = rumqttc::AsyncClient::new(o, 4);
        loop {
            match tokio::time::timeout(Duration::from_secs(10), el.poll()).await {
                Ok(Ok(rumqttc::Event::Incoming(rumqttc::Packet::ConnAck(a)))) => {
                    assert_eq!(a.code, rumqttc::ConnectReturnCode::Success);
                    break;
                }
                Ok(Ok(_)) => continue,
                other => panic!("no CONNACK from node b: {other:?}"),
            }
        }
        // Deleted through node a's admin API.
        let r = admin(
            &nodes[0],
            json!({"Action": "DeleteDevice", "ProductKey": PK, "DeviceKey": "victim"}),
        )
        .await;
        assert!(r.get("Code").is_none_or(|c| c == "OK"), "{r}");
        // Node b ends the connection.
        let ended = tokio::time::timeout(Duration::from_secs(15), async {
            loop {
                match el.poll().await {
                    Ok(rumqttc::Event::Incoming(rumqttc::Packet::Disconnect)) | Err(_) => return,
                    Ok(_) => continue,
                }
            }
        })
        .await;
        assert!(
            ended.is_ok(),
            "node b kept the deleted device connected:\n{}",
            nodes[1].log_tail()
        );
    });
}

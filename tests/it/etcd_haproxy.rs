//! The shipped `config/haproxy.cfg` in front of two broker nodes on one
//! etcd ledger: a real HAProxy hashes each device's MQTT client
//! identifier to one node, every time, and activation through it is
//! exactly once. Skipped, saying so, where HAProxy is not installed
//! (scripts/test installs it).

use crate::common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use common::child::ChildBroker;
use common::etcd::{counter, EtcdCluster};
use common::flood::connack_code;
use common::haproxy::{haproxy_bin, Haproxy};

const PK: &str = "fleet";
const YEAR: u64 = 365 * 24 * 3600;

/// `config/haproxy.cfg` with its frontend bound on `front` and its servers
/// replaced by `nodes`; every other line (the hash, consistent hashing,
/// `send-proxy-v2`) as shipped.
fn shipped_config(front: SocketAddr, nodes: &[(&str, SocketAddr)]) -> String {
    let shipped = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("config/haproxy.cfg"),
    )
    .expect("read config/haproxy.cfg");
    let mut out = String::new();
    for line in shipped.lines() {
        let t = line.trim_start();
        if t.starts_with("bind ") {
            out.push_str(&format!("    bind {front}\n"));
        } else if t.starts_with("server ") {
            if t.starts_with("server node-1 ") {
                for (name, addr) in nodes {
                    out.push_str(&format!("    server {name} {addr} send-proxy-v2\n"));
                }
            }
        } else if t.starts_with("maxconn ") {
            // The shipped value needs an open-file limit this machine may
            // not grant.
            out.push_str("    maxconn 1000\n");
        } else if t.starts_with("log ") || t.starts_with("option tcplog") {
            // No log output in the test.
        } else {
            out.push_str(line);
            out.push('\n');
        }
    }
    out
}

/// CONNACKs counted by the node's `/metrics`.
async fn connects(node: &ChildBroker) -> u64 {
    counter(node, "activation_connects_total").await
}

#[test]
fn haproxy_sends_a_device_to_one_node_and_activation_stays_exactly_once() {
    let Some(bin) = haproxy_bin() else {
        eprintln!("SKIPPED: haproxy is not installed (apt-get install haproxy)");
        return;
    };
    let cluster = EtcdCluster::start(3);
    let secret = cluster.prepare(PK, 1_000, YEAR);
    let nodes = [
        cluster.broker_with("a", true),
        cluster.broker_with("b", true),
    ];
    let front = SocketAddr::from((
        [127, 0, 0, 1],
        activation_client::child::free_port().expect("free port"),
    ));
    let cfg = cluster.dir.path().join("haproxy.cfg");
    std::fs::write(
        &cfg,
        shipped_config(
            front,
            &[("node-a", nodes[0].addr), ("node-b", nodes[1].addr)],
        ),
    )
    .expect("write haproxy.cfg");
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(async {
        let _haproxy = Haproxy::start(&bin, &cfg, front).await;
        const DEVICES: usize = 20;
        const TIMES: u64 = 3;
        let mut used = [0usize; 2];
        for i in 0..DEVICES {
            let dk = format!("d{i}");
            let before = [connects(&nodes[0]).await, connects(&nodes[1]).await];
            for n in 0..TIMES {
                assert_eq!(
                    connack_code(front, PK, &dk, &secret).await,
                    Some(0),
                    "{dk}, connection {n} through HAProxy"
                );
            }
            // A node counts a CONNACK just after sending it: wait (bounded)
            // until the counters hold all of them.
            let deadline = Instant::now() + Duration::from_secs(10);
            let delta = loop {
                let after = [connects(&nodes[0]).await, connects(&nodes[1]).await];
                let delta = [after[0] - before[0], after[1] - before[1]];
                if delta[0] + delta[1] >= TIMES || Instant::now() > deadline {
                    break delta;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            };
            assert!(
                delta == [TIMES, 0] || delta == [0, TIMES],
                "{dk}'s {TIMES} connections went to both nodes: {delta:?}"
            );
            used[usize::from(delta[1] == TIMES)] += 1;
        }
        assert!(
            used[0] > 0 && used[1] > 0,
            "the hash sent every device to one node: {used:?}"
        );
    });
    // One code per device, whichever node and however often it connected.
    let acked: Vec<String> = (0..20).map(|i| format!("d{i}")).collect();
    assert_eq!(cluster.check(PK, 1_000, &acked, "behind HAProxy"), 20);
}

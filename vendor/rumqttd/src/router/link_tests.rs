//! The router's subscription index, retained store and quotas through real
//! `LinkBuilder` links on a running router: what each subscriber receives is
//! checked against the linear matcher (`protocol::matches`) as an oracle.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use bytes::Bytes;
use proptest::prelude::*;

use crate::local::{LinkBuilder, LinkRx, LinkTx};
use crate::protocol::{
    matches, Disconnect, DisconnectReasonCode, Packet, PubAckReason, PubRecReason, PubRel,
    PubRelReason, Publish, QoS,
};
use crate::{Notification, Router, RouterConfig};

const WAIT: Duration = Duration::from_secs(10);

fn config() -> RouterConfig {
    RouterConfig {
        max_connections: 100,
        max_outgoing_packet_count: 200,
        max_segment_size: 1024 * 1024,
        max_segment_count: 4,
        ..RouterConfig::default()
    }
}

/// Opens links to one running router.
type Connect = Box<dyn Fn(&str) -> Client>;

fn router(config: RouterConfig) -> Connect {
    let tx = Router::new(0, config).spawn();
    Box::new(move |id: &str| {
        let (tx, rx, _connack) = LinkBuilder::new(id, tx.clone())
            .dynamic_filters(true)
            .build()
            .expect("link");
        Client {
            tx,
            rx,
            pending: VecDeque::new(),
        }
    })
}

struct Client {
    tx: LinkTx,
    rx: LinkRx,
    /// Packets received while waiting for another one
    pending: VecDeque<Packet>,
}

fn block_on<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime")
        .block_on(f)
}

impl Client {
    fn send(&mut self, packet: Packet) {
        block_on(self.tx.send(packet)).expect("send to router");
    }

    fn publish(&mut self, topic: &str, payload: &[u8], qos: QoS, retain: bool, pkid: u16) {
        let publish = Publish {
            dup: false,
            qos,
            retain,
            topic: Bytes::copy_from_slice(topic.as_bytes()),
            pkid,
            payload: Bytes::copy_from_slice(payload),
        };
        self.send(Packet::Publish(publish, None));
    }

    /// The next packet from the router (set aside ones first).
    fn next(&mut self) -> Packet {
        match self.pending.pop_front() {
            Some(packet) => packet,
            None => self.recv(),
        }
    }

    /// The next notification converted to a packet.
    fn recv(&mut self) -> Packet {
        let deadline = Instant::now() + WAIT;
        loop {
            match self
                .rx
                .recv_deadline(deadline)
                .expect("notification in time")
            {
                Some(Notification::Forward(f)) => return Packet::Publish(f.publish, f.properties),
                Some(Notification::DeviceAck(ack)) => return ack.into(),
                Some(Notification::Unschedule) => self.rx.ready().expect("ready"),
                Some(other) => panic!("unexpected notification {other:?}"),
                None => {}
            }
        }
    }

    /// Forwarded topics until `fence` arrives (acks skipped).
    fn topics_until(&mut self, fence: &str) -> Vec<String> {
        let mut topics = Vec::new();
        loop {
            if let Packet::Publish(p, _) = self.next() {
                let topic = String::from_utf8(p.topic.to_vec()).expect("utf-8 topic");
                if topic == fence {
                    return topics;
                }
                topics.push(topic);
            }
        }
    }
}

fn puback_reason(packet: Packet) -> PubAckReason {
    match packet {
        Packet::PubAck(ack, _) => ack.reason,
        other => panic!("expected PUBACK, got {other:?}"),
    }
}

/// Next PUBACK (forwards in between are ignored).
fn next_puback(c: &mut Client) -> PubAckReason {
    loop {
        match c.next() {
            Packet::Publish(..) | Packet::SubAck(..) => continue,
            other => return puback_reason(other),
        }
    }
}

/// Subscribes and waits for the SUBACK, setting aside what comes before.
fn subscribe(c: &mut Client, filter: &str) {
    c.tx.subscribe(filter).expect("subscribe");
    let mut before = VecDeque::new();
    loop {
        match c.recv() {
            Packet::SubAck(..) => break,
            other => before.push_back(other),
        }
    }
    c.pending.extend(before);
}

fn sorted(mut v: Vec<String>) -> Vec<String> {
    v.sort();
    v
}

/// Publishing to endless distinct topics nobody subscribes to is accepted
/// and routed like any publish (it leaves no state in the router: see
/// `logs::test::unmatched_topics_leave_no_state`); subscribed topics still
/// flow.
#[test]
fn endless_distinct_topics_are_acked_and_routed() {
    let connect = router(config());
    let mut sub = connect("sub");
    subscribe(&mut sub, "t/1");
    let mut device = connect("device");
    for i in 0..5_000u16 {
        device.publish(
            &format!("t/x{i}"),
            b"a",
            QoS::AtLeastOnce,
            false,
            i % 100 + 1,
        );
        assert_eq!(next_puback(&mut device), PubAckReason::Success);
    }
    device.publish("t/1", b"fence", QoS::AtLeastOnce, false, 1);
    assert_eq!(next_puback(&mut device), PubAckReason::Success);
    assert_eq!(receive_n(&mut sub, 1), vec!["t/1=fence"]);
}

#[test]
fn retained_caps_per_client_and_in_total() {
    let connect = router(RouterConfig {
        max_retained_per_client: 2,
        max_retained_bytes: 4 + 3 + 10 + 4 + 3 + 10 + 4 + 3 + 10,
        ..config()
    });
    let mut device = connect("device");
    let ten = b"0123456789";
    device.publish("r/1", ten, QoS::AtLeastOnce, true, 1);
    assert_eq!(next_puback(&mut device), PubAckReason::Success);
    device.publish("r/2", ten, QoS::AtLeastOnce, true, 2);
    assert_eq!(next_puback(&mut device), PubAckReason::Success);
    // A third retained message of the same client: over its cap.
    device.publish("r/3", ten, QoS::AtLeastOnce, true, 3);
    assert_eq!(next_puback(&mut device), PubAckReason::QuotaExceeded);
    // Replacing one of its own is fine; so is clearing one.
    device.publish("r/1", b"9876543210", QoS::AtLeastOnce, true, 4);
    assert_eq!(next_puback(&mut device), PubAckReason::Success);
    device.publish("r/2", b"", QoS::AtLeastOnce, true, 5);
    assert_eq!(next_puback(&mut device), PubAckReason::Success);
    device.publish("r/3", ten, QoS::AtLeastOnce, true, 6);
    assert_eq!(next_puback(&mut device), PubAckReason::Success);

    // Another client: its own cap is free, but the total is reached at 3.
    let mut other = connect("other");
    other.publish("r/4", ten, QoS::AtLeastOnce, true, 1);
    assert_eq!(next_puback(&mut other), PubAckReason::Success);
    other.publish("r/5", ten, QoS::AtLeastOnce, true, 2);
    assert_eq!(next_puback(&mut other), PubAckReason::QuotaExceeded);
    // Its non-retained traffic goes on.
    other.publish("r/5", ten, QoS::AtLeastOnce, false, 3);
    assert_eq!(next_puback(&mut other), PubAckReason::Success);

    let mut sub = connect("sub");
    sub.tx.subscribe("r/+").unwrap();
    let mut got = Vec::new();
    while got.len() < 3 {
        if let Packet::Publish(p, _) = sub.next() {
            got.push(format!(
                "{}={}",
                String::from_utf8_lossy(&p.topic),
                String::from_utf8_lossy(&p.payload)
            ));
        }
    }
    assert_eq!(
        sorted(got),
        vec!["r/1=9876543210", "r/3=0123456789", "r/4=0123456789"]
    );
}

#[test]
fn qos2_over_the_cap_gets_pubrec_0x97_and_its_pubrel_completes() {
    let connect = router(RouterConfig {
        max_retained_per_client: 1,
        ..config()
    });
    let mut device = connect("device");
    let release = |device: &mut Client, pkid: u16| {
        device.send(Packet::PubRel(
            PubRel {
                pkid,
                reason: PubRelReason::Success,
            },
            None,
        ));
        match device.next() {
            Packet::PubComp(comp, _) => assert_eq!(comp.pkid, pkid),
            other => panic!("expected PUBCOMP, got {other:?}"),
        }
    };
    device.publish("q/1", b"a", QoS::ExactlyOnce, true, 1);
    match device.next() {
        Packet::PubRec(rec, _) => assert_eq!(rec.reason, PubRecReason::Success),
        other => panic!("expected PUBREC, got {other:?}"),
    }
    release(&mut device, 1);
    device.publish("q/2", b"b", QoS::ExactlyOnce, true, 2);
    match device.next() {
        Packet::PubRec(rec, _) => {
            assert_eq!(rec.pkid, 2);
            assert_eq!(rec.reason, PubRecReason::QuotaExceeded)
        }
        other => panic!("expected PUBREC, got {other:?}"),
    }
    // A 3.1.1 client releases it anyway: completed, nothing appended.
    release(&mut device, 2);
    device.publish("q/1", b"c", QoS::AtLeastOnce, false, 3);
    assert_eq!(next_puback(&mut device), PubAckReason::Success);

    let mut sub = connect("sub");
    sub.tx.subscribe("q/#").unwrap();
    assert_eq!(receive_n(&mut sub, 1), vec!["q/1=a"]);
}

#[test]
fn exempt_clients_skip_the_per_client_caps() {
    let connect = router(RouterConfig {
        max_retained_per_client: 1,
        quota_exempt_clients: vec!["internal".to_owned()],
        ..config()
    });
    let mut internal = connect("internal");
    for (pkid, topic) in [(1, "w/1"), (2, "w/2"), (3, "w/3")] {
        internal.publish(topic, b"will", QoS::AtLeastOnce, true, pkid);
        assert_eq!(next_puback(&mut internal), PubAckReason::Success);
    }
}

#[test]
fn a_disconnection_leaves_other_subscribers_of_its_filters_alone() {
    let connect = router(config());
    let mut a = connect("a");
    let mut b = connect("b");
    for c in [&mut a, &mut b] {
        subscribe(c, "d/x");
        subscribe(c, "$share/g/d/+");
    }
    a.send(Packet::Disconnect(
        Disconnect {
            reason_code: DisconnectReasonCode::NormalDisconnection,
        },
        None,
    ));
    let mut publisher = connect("p");
    publisher.publish("d/x", b"1", QoS::AtMostOnce, false, 0);
    publisher.publish("d/x", b"2", QoS::AtMostOnce, false, 0);
    publisher.publish("d/x", b"fence", QoS::AtMostOnce, false, 0);
    // b alone: each message by `d/x` and by the group it is now alone in.
    let mut got = Vec::new();
    while got.iter().filter(|p| *p == "fence").count() < 2 {
        if let Packet::Publish(p, _) = b.next() {
            got.push(String::from_utf8_lossy(&p.payload).into_owned());
        }
    }
    assert_eq!(sorted(got), vec!["1", "1", "2", "2", "fence", "fence"]);
}

fn level() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("a".to_owned()),
        Just("b".to_owned()),
        Just(String::new()),
        Just("$x".to_owned()),
        Just("+".to_owned()),
        Just("#".to_owned()),
    ]
}

fn path() -> impl Strategy<Value = String> {
    prop::collection::vec(level(), 1..4).prop_map(|l| l.join("/"))
}

/// A topic (wildcard characters are not published).
fn topic() -> impl Strategy<Value = String> {
    path().prop_map(|p| p.replace(['+', '#'], "c"))
}

/// A filter a client may subscribe to: not starting with `$`, sometimes
/// shared (`$share/g/...`).
fn filter() -> impl Strategy<Value = String> {
    (path(), any::<bool>()).prop_map(|(p, shared)| {
        let p = if p.starts_with('$') {
            format!("a/{p}")
        } else {
            p
        };
        if shared {
            format!("$share/g/{p}")
        } else {
            p
        }
    })
}

/// The filter a `$share/{group}/` subscription matches with.
fn bare(filter: &str) -> &str {
    match filter.strip_prefix("$share/") {
        Some(rest) => rest.split_once('/').map_or(rest, |(_, f)| f),
        None => filter,
    }
}

/// Gives client `n` its own share groups, so each group has one member
/// (which then receives every message of the group's filter).
fn own_groups(n: usize, filters: &[String]) -> Vec<String> {
    filters
        .iter()
        .map(|f| f.replacen("$share/g/", &format!("$share/g{n}/"), 1))
        .collect()
}

#[derive(Debug, Clone)]
struct Case {
    /// (topic, payload; empty clears) published retained before subscribing
    retained: Vec<(String, bool)>,
    /// Filters of each subscriber, and which of them it unsubscribes
    subscribers: Vec<(Vec<String>, Vec<prop::sample::Index>)>,
    /// Topics published after
    topics: Vec<String>,
}

fn case() -> impl Strategy<Value = Case> {
    (
        prop::collection::vec((topic(), any::<bool>()), 0..8),
        prop::collection::vec(
            (
                prop::collection::btree_set(filter(), 1..6).prop_map(|s| s.into_iter().collect()),
                prop::collection::vec(any::<prop::sample::Index>(), 0..3),
            ),
            1..4,
        ),
        prop::collection::vec(topic(), 0..12),
    )
        .prop_map(|(retained, subscribers, topics)| Case {
            retained,
            subscribers,
            topics,
        })
}

/// Receives forwards until `fences` copies of payload `fence` arrived;
/// returns every forward as `topic=payload`.
fn receive_until(c: &mut Client, fence: &str, fences: usize) -> Vec<String> {
    let mut got = Vec::new();
    let mut seen = 0;
    while seen < fences {
        if let Packet::Publish(p, _) = c.next() {
            let payload = String::from_utf8_lossy(&p.payload).into_owned();
            seen += usize::from(payload == fence);
            got.push(format!("{}={payload}", String::from_utf8_lossy(&p.topic)));
        }
    }
    got
}

/// The next `n` forwards as `topic=payload` (a missing one times out; an
/// unexpected one takes the place of an expected one, or shows in the next
/// phase, as the messages differ).
fn receive_n(c: &mut Client, n: usize) -> Vec<String> {
    let mut got = Vec::new();
    while got.len() < n {
        if let Packet::Publish(p, _) = c.next() {
            got.push(format!(
                "{}={}",
                String::from_utf8_lossy(&p.topic),
                String::from_utf8_lossy(&p.payload)
            ));
        }
    }
    got
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// Through real links, each subscriber receives exactly what the linear
    /// matcher says: retained messages matching its (non-shared) filters at
    /// subscription, then one copy per matching filter of each publish,
    /// none after it unsubscribed a filter; `$` topics reach no one. (A
    /// shared subscription forwards one message per round, so its messages
    /// may come after the fence: each phase waits for the expected count.)
    #[test]
    fn subscribers_receive_what_the_linear_matcher_says(case in case()) {
        let connect = router(config());
        let mut publisher = connect("publisher");

        // Retained messages; the oracle keeps the last one per topic.
        let mut retained: Vec<(String, String)> = Vec::new();
        for (i, (topic, keep)) in case.retained.iter().enumerate() {
            let payload = if *keep { format!("r{i}") } else { String::new() };
            publisher.publish(topic, payload.as_bytes(), QoS::AtMostOnce, true, 0);
            retained.retain(|(t, _)| t != topic);
            if *keep {
                retained.push((topic.clone(), payload));
            }
        }

        let fence_topic = "fence";
        let subscribers: Vec<(Vec<String>, Vec<prop::sample::Index>)> = case
            .subscribers
            .iter()
            .enumerate()
            .map(|(n, (filters, removed))| (own_groups(n, filters), removed.clone()))
            .collect();
        let mut clients = Vec::new();
        for (n, (filters, _)) in subscribers.iter().enumerate() {
            let mut c = connect(&format!("sub{n}"));
            for f in filters {
                subscribe(&mut c, f);
            }
            subscribe(&mut c, fence_topic);
            clients.push(c);
        }

        // Phase 1: retained messages at subscription.
        publisher.publish(fence_topic, b"fence1", QoS::AtMostOnce, false, 0);
        for (c, (filters, _)) in clients.iter_mut().zip(&subscribers) {
            let fences = 1 + filters.iter().filter(|f| matches(fence_topic, bare(f))).count();
            let mut expected: Vec<String> = filters
                .iter()
                .filter(|f| !f.starts_with("$share/"))
                .flat_map(|f| {
                    retained
                        .iter()
                        .filter(move |(t, _)| matches(t, f))
                        .map(|(t, p)| format!("{t}={p}"))
                })
                .collect();
            expected.extend(std::iter::repeat(format!("{fence_topic}=fence1")).take(fences));
            let got = receive_n(c, expected.len());
            prop_assert_eq!(sorted(got), sorted(expected));
        }

        // Unsubscribe some filters, then publish.
        let mut active: Vec<Vec<String>> = Vec::new();
        for (c, (filters, removed)) in clients.iter_mut().zip(&subscribers) {
            let mut filters = filters.clone();
            for r in removed {
                if filters.is_empty() {
                    break;
                }
                let f = filters.remove(r.index(filters.len()));
                c.tx.unsubscribe(f).expect("unsubscribe");
            }
            active.push(filters);
        }
        for (i, topic) in case.topics.iter().enumerate() {
            publisher.publish(topic, format!("m{i}").as_bytes(), QoS::AtMostOnce, false, 0);
        }
        publisher.publish(fence_topic, b"fence2", QoS::AtMostOnce, false, 0);

        // Phase 2: one copy per matching active filter.
        for (c, filters) in clients.iter_mut().zip(&active) {
            let fences = 1 + filters.iter().filter(|f| matches(fence_topic, bare(f))).count();
            let mut expected: Vec<String> = Vec::new();
            for (i, topic) in case.topics.iter().enumerate() {
                let copies = filters.iter().filter(|f| matches(topic, bare(f))).count();
                expected.extend(std::iter::repeat(format!("{topic}=m{i}")).take(copies));
            }
            expected.extend(std::iter::repeat(format!("{fence_topic}=fence2")).take(fences));
            let got = receive_n(c, expected.len());
            prop_assert_eq!(sorted(got), sorted(expected));
        }
    }
}

/// A share group is its name and its filter (MQTT 5 4.8.2): `$share/g/a`
/// and `$share/g/+` are two groups, each delivering its filter's messages.
#[test]
fn one_share_name_on_two_filters_makes_two_groups() {
    let connect = router(config());
    let mut a = connect("a");
    let mut any = connect("any");
    subscribe(&mut a, "$share/g/a");
    subscribe(&mut any, "$share/g/+");
    let mut publisher = connect("p");
    publisher.publish("a", b"1", QoS::AtMostOnce, false, 0);
    publisher.publish("b", b"2", QoS::AtMostOnce, false, 0);
    assert_eq!(receive_until(&mut a, "1", 1), vec!["a=1"]);
    assert_eq!(sorted(receive_until(&mut any, "2", 1)), vec!["a=1", "b=2"]);
}

#[path = "flow_tests.rs"]
mod flow_tests;

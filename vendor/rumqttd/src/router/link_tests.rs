//! The router's subscription index, retained store and quotas through real
//! `LinkBuilder` links on a running router: what each subscriber receives is
//! checked against the linear matcher (`protocol::matches`) as an oracle.

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
        Client { tx, rx }
    })
}

struct Client {
    tx: LinkTx,
    rx: LinkRx,
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

    /// The next notification converted to a packet (skipping none).
    fn next(&mut self) -> Packet {
        let deadline = Instant::now() + WAIT;
        loop {
            match self.rx.recv_deadline(deadline).expect("notification in time") {
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

fn subscribe(c: &mut Client, filter: &str) {
    c.tx.subscribe(filter).expect("subscribe");
    loop {
        if let Packet::SubAck(..) = c.next() {
            return;
        }
    }
}

fn sorted(mut v: Vec<String>) -> Vec<String> {
    v.sort();
    v
}

#[test]
fn distinct_topics_over_the_cap_get_quota_exceeded_and_are_not_stored() {
    let connect = router(RouterConfig {
        max_topics_per_client: 2,
        ..config()
    });
    let mut sub = connect("sub");
    subscribe(&mut sub, "t/#");
    let mut device = connect("device");

    device.publish("t/1", b"a", QoS::AtLeastOnce, false, 1);
    assert_eq!(next_puback(&mut device), PubAckReason::Success);
    device.publish("t/2", b"b", QoS::AtLeastOnce, false, 2);
    assert_eq!(next_puback(&mut device), PubAckReason::Success);
    device.publish("t/3", b"c", QoS::AtLeastOnce, false, 3);
    assert_eq!(next_puback(&mut device), PubAckReason::QuotaExceeded);
    // QoS 0 over the cap: dropped silently; known topics still flow.
    device.publish("t/4", b"d", QoS::AtMostOnce, false, 0);
    device.publish("t/1", b"e", QoS::AtLeastOnce, false, 4);
    assert_eq!(next_puback(&mut device), PubAckReason::Success);
    device.publish("t/2", b"fence", QoS::AtMostOnce, false, 0);

    let mut got = Vec::new();
    loop {
        if let Packet::Publish(p, _) = sub.next() {
            let payload = p.payload.to_vec();
            got.push(String::from_utf8(p.topic.to_vec()).unwrap());
            if payload == b"fence" {
                break;
            }
        }
    }
    assert_eq!(got, vec!["t/1", "t/2", "t/1", "t/2"]);
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
        max_topics_per_client: 1,
        ..config()
    });
    let mut device = connect("device");
    device.publish("q/1", b"a", QoS::ExactlyOnce, false, 1);
    match device.next() {
        Packet::PubRec(rec, _) => assert_eq!(rec.reason, PubRecReason::Success),
        other => panic!("expected PUBREC, got {other:?}"),
    }
    device.publish("q/2", b"b", QoS::ExactlyOnce, false, 2);
    match device.next() {
        Packet::PubRec(rec, _) => {
            assert_eq!(rec.pkid, 2);
            assert_eq!(rec.reason, PubRecReason::QuotaExceeded)
        }
        other => panic!("expected PUBREC, got {other:?}"),
    }
    // A 3.1.1 client releases it anyway: completed, nothing appended.
    for pkid in [2, 1] {
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
    }
    device.publish("q/1", b"c", QoS::AtLeastOnce, false, 3);
    assert_eq!(next_puback(&mut device), PubAckReason::Success);
}

#[test]
fn exempt_clients_skip_the_per_client_caps() {
    let connect = router(RouterConfig {
        max_topics_per_client: 1,
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

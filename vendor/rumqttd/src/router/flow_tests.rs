//! Flow control (`routing/flow.rs`) through real links: a QoS 1 reader
//! that lags by a whole log pauses the publishers into its filter instead
//! of losing messages; a stalled reader is jumped after the stall; a
//! disconnect resumes the publishers; QoS 0 readers never pause anyone.
//!
//! Logs here hold about 20 messages: segments of 1 KiB (the minimum), 2
//! segments, 107 bytes per message (4 + topic + 100 payload bytes).

use std::time::{Duration, Instant};

use super::*;
use crate::protocol::{Filter, PubAck, RetainForwardRule, Subscribe};

const TOPIC: &str = "t/x";
const MESSAGES: u64 = 100;
/// What a log holds before its next append drops a segment.
const LOG_HOLDS: usize = 20;
const WINDOW: u16 = 5;

fn flow_config(stall_ms: u64) -> RouterConfig {
    RouterConfig {
        max_segment_size: 1024,
        max_segment_count: 2,
        max_outgoing_inflight: WINDOW,
        max_publisher_stall_ms: stall_ms,
        ..config()
    }
}

fn subscribe_qos(c: &mut Client, filter: &str, qos: QoS) {
    let filters = vec![Filter {
        path: filter.to_owned(),
        qos,
        nolocal: false,
        preserve_retain: false,
        retain_forward_rule: RetainForwardRule::Never,
    }];
    c.send(Packet::Subscribe(Subscribe { pkid: 1, filters }, None));
    loop {
        if let Packet::SubAck(..) = c.next() {
            return;
        }
    }
}

/// Publishes `MESSAGES` QoS 1 messages numbered 0.. (all handed to the
/// link at once).
fn publish_all(publisher: &mut Client) {
    for seq in 0..MESSAGES {
        let mut payload = seq.to_be_bytes().to_vec();
        payload.resize(100, 0);
        publisher.publish(TOPIC, &payload, QoS::AtLeastOnce, false, seq as u16 + 1);
    }
}

fn seq(payload: &[u8]) -> u64 {
    u64::from_be_bytes(payload[..8].try_into().expect("8 bytes"))
}

/// The next packet, or None if nothing comes within `quiet`.
fn next_within(c: &mut Client, quiet: Duration) -> Option<Packet> {
    if let Some(p) = c.pending.pop_front() {
        return Some(p);
    }
    let deadline = Instant::now() + quiet;
    loop {
        match c.rx.recv_deadline(deadline) {
            Ok(Some(Notification::Forward(f))) => {
                return Some(Packet::Publish(f.publish, f.properties))
            }
            Ok(Some(Notification::DeviceAck(ack))) => return Some(ack.into()),
            Ok(Some(Notification::Unschedule)) => c.rx.ready().expect("ready"),
            Ok(Some(other)) => panic!("unexpected notification {other:?}"),
            Ok(None) => {}
            Err(_) => return None,
        }
    }
}

/// PUBACKs the publisher gets until none comes for `quiet`.
fn pubacks_until_quiet(publisher: &mut Client, quiet: Duration) -> usize {
    let mut n = 0;
    while let Some(p) = next_within(publisher, quiet) {
        assert_eq!(puback_reason(p), PubAckReason::Success);
        n += 1;
    }
    n
}

fn pubacks(publisher: &mut Client, n: usize) {
    for _ in 0..n {
        assert_eq!(next_puback(publisher), PubAckReason::Success);
    }
}

/// The reader acknowledges every message it gets until `last`; returns
/// their sequence numbers.
fn read_and_ack_until(reader: &mut Client, last: u64) -> Vec<u64> {
    let mut got = Vec::new();
    loop {
        if let Packet::Publish(p, _) = reader.next() {
            got.push(seq(&p.payload));
            reader.send(Packet::PubAck(
                PubAck {
                    pkid: p.pkid,
                    reason: PubAckReason::Success,
                },
                None,
            ));
            if got.last() == Some(&last) {
                return got;
            }
        }
    }
}

#[test]
fn a_slow_qos1_reader_receives_every_message_and_its_publishers_wait() {
    slow_reader("t/+");
}

#[test]
fn a_slow_share_group_receives_every_message_and_its_publishers_wait() {
    slow_reader("$share/g/t/+");
}

fn slow_reader(filter: &str) {
    let connect = router(flow_config(60_000));
    let mut reader = connect("reader");
    subscribe_qos(&mut reader, filter, QoS::AtLeastOnce);
    let mut publisher = connect("publisher");
    publish_all(&mut publisher);

    // The reader takes its window and acknowledges nothing yet: the log
    // fills and the publisher is paused with the rest in its link.
    let acked = pubacks_until_quiet(&mut publisher, Duration::from_millis(300));
    assert!(acked <= LOG_HOLDS, "{acked} stored past a full log");
    assert!(
        !publisher.tx.buffer().is_empty(),
        "the rest waits in the link"
    );

    // As it reads on, the publisher resumes; nothing is lost or repeated.
    let got = read_and_ack_until(&mut reader, MESSAGES - 1);
    assert_eq!(got, (0..MESSAGES).collect::<Vec<_>>());
    pubacks(&mut publisher, MESSAGES as usize - acked);
}

#[test]
fn a_stalled_reader_is_jumped_after_the_stall() {
    let connect = router(flow_config(200));
    let mut reader = connect("reader");
    subscribe_qos(&mut reader, "t/+", QoS::AtLeastOnce);
    let mut publisher = connect("publisher");
    publish_all(&mut publisher);

    // The reader acknowledges nothing: after the stall its oldest messages
    // are dropped and every publish is stored (the reader, fallen off the
    // log, holds nobody back any more).
    pubacks(&mut publisher, MESSAGES as usize);

    // Reading on, it jumps past what it lost and gets the latest.
    let got = read_and_ack_until(&mut reader, MESSAGES - 1);
    assert!(
        got.len() < MESSAGES as usize,
        "the stalled reader lost none"
    );
    assert!(got.windows(2).all(|w| w[0] < w[1]), "out of order: {got:?}");
}

#[test]
fn a_disconnect_of_the_lagging_reader_resumes_its_publishers() {
    let connect = router(flow_config(60_000));
    let mut reader = connect("reader");
    subscribe_qos(&mut reader, "t/+", QoS::AtLeastOnce);
    let mut publisher = connect("publisher");
    publish_all(&mut publisher);
    let acked = pubacks_until_quiet(&mut publisher, Duration::from_millis(300));
    assert!(acked <= LOG_HOLDS, "{acked} stored past a full log");

    // Long before the stall ends.
    reader.send(Packet::Disconnect(
        Disconnect {
            reason_code: DisconnectReasonCode::NormalDisconnection,
        },
        None,
    ));
    pubacks(&mut publisher, MESSAGES as usize - acked);
}

#[test]
fn a_qos0_reader_never_pauses_publishers() {
    let connect = router(flow_config(60_000));
    let mut reader = connect("reader");
    subscribe_qos(&mut reader, "t/+", QoS::AtMostOnce);
    let mut publisher = connect("publisher");
    publish_all(&mut publisher);
    // The reader reads nothing meanwhile.
    pubacks(&mut publisher, MESSAGES as usize);
}

// A paused publisher's SUBSCRIBE is not held with its publishes: it is in
// effect for what the router takes next (an embedding server may answer
// the SUBACK itself once the packet is sent).
#[test]
fn a_paused_publishers_subscribe_takes_effect_at_once() {
    let connect = router(flow_config(60_000));
    let mut reader = connect("reader");
    subscribe_qos(&mut reader, "t/+", QoS::AtLeastOnce);
    let mut publisher = connect("publisher");
    publish_all(&mut publisher);
    let acked = pubacks_until_quiet(&mut publisher, Duration::from_millis(300));
    assert!(
        !publisher.tx.buffer().is_empty(),
        "the publisher is paused ({acked} stored)"
    );

    subscribe_qos(&mut publisher, "cmd/publisher", QoS::AtMostOnce);
    let mut commander = connect("commander");
    commander.publish("cmd/publisher", b"go", QoS::AtMostOnce, false, 0);
    loop {
        match publisher.next() {
            Packet::Publish(p, _) if p.topic == "cmd/publisher" => break,
            Packet::PubAck(..) => panic!("the paused publisher went on"),
            _ => {}
        }
    }
    assert!(
        !publisher.tx.buffer().is_empty(),
        "its publishes still wait"
    );
}

//! Malformed and hostile input to the connection layer: garbage, packets
//! out of order, oversized packets, silent sockets, bad filters and topics,
//! random bytes after CONNECT, topic aliases resolved before the ACL.

use std::time::Duration;

use activation_broker::events::{EventBus, EventKind};
use bytes::{BufMut, BytesMut};
use tokio::io::AsyncWriteExt;

use crate::common::gateway::*;

#[tokio::test]
async fn garbage_bytes_close_the_connection() {
    let b = broker().await;
    let mut s = raw(b.addr).await;
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .expect("send");
    assert!(until_closed(&mut s).await.is_empty());
    let mut s = raw(b.addr).await;
    s.write_all(&[0x10, 0xff, 0xff, 0xff, 0xff, 0x01])
        .await
        .expect("send");
    assert!(until_closed(&mut s).await.is_empty());
    still_serving(b.addr).await;
}

#[tokio::test]
async fn publish_before_connect_closes_the_connection() {
    let b = broker().await;
    let mut s = raw(b.addr).await;
    s.write_all(&[0x30, 0x05, 0x00, 0x01, b'a', b'h', b'i'])
        .await
        .expect("send");
    assert!(until_closed(&mut s).await.is_empty());
    still_serving(b.addr).await;
}

#[tokio::test]
async fn second_connect_closes_the_connection() {
    let b = broker().await;
    let mut s = raw_connected(b.addr, 5, "a", 30, None).await;
    s.write_all(&connect_bytes(5, "p.a", "p&a", 30, None))
        .await
        .expect("send");
    let bytes = until_closed(&mut s).await;
    assert_eq!(bytes.first(), Some(&0xE0), "MQTT 5 DISCONNECT");
    assert_eq!(bytes.get(2), Some(&0x82), "protocol error");
    let mut s = raw_connected(b.addr, 4, "b", 30, None).await;
    s.write_all(&connect_bytes(4, "p.b", "p&b", 30, None))
        .await
        .expect("send");
    assert!(until_closed(&mut s).await.is_empty());
    still_serving(b.addr).await;
}

#[tokio::test]
async fn oversized_packets_close_the_connection() {
    let b = broker_with(|c| c.max_packet_size = 1024).await;
    // Before CONNECT: a CONNECT claiming 1 MiB.
    let mut s = raw(b.addr).await;
    s.write_all(&[0x10, 0x80, 0x80, 0x40]).await.expect("send");
    assert!(until_closed(&mut s).await.is_empty());

    // After CONNECT, MQTT 5: DISCONNECT 0x95.
    let mut s = raw_connected(b.addr, 5, "a", 30, None).await;
    let mut p = BytesMut::new();
    p.put_u8(0x30);
    p.put_slice(&[0x80, 0x10]); // remaining length 2048
    p.put_u16(13);
    p.put_slice(b"devices/p/a/x");
    p.put_slice(&[0u8; 2048 - 15]);
    s.write_all(&p).await.expect("send");
    let bytes = until_closed(&mut s).await;
    assert_eq!(bytes.first(), Some(&0xE0));
    assert_eq!(bytes.get(2), Some(&0x95));

    // MQTT 3.1.1: closed.
    let mut s = raw_connected(b.addr, 4, "b", 30, None).await;
    s.write_all(&p).await.expect("send");
    assert!(until_closed(&mut s).await.is_empty());
    still_serving(b.addr).await;
}

#[tokio::test]
async fn connect_timeout_closes_silent_sockets() {
    let b = broker_with(|c| c.connect_timeout = Duration::from_millis(300)).await;
    let mut silent = raw(b.addr).await;
    let mut partial = raw(b.addr).await;
    partial.write_all(&[0x10, 0x20, 0x00]).await.expect("send");
    assert!(until_closed(&mut silent).await.is_empty());
    assert!(until_closed(&mut partial).await.is_empty());
    still_serving(b.addr).await;
}

#[tokio::test]
async fn unsupported_protocol_level_gets_connack_0x01() {
    let b = broker().await;
    let mut s = raw(b.addr).await;
    let mut c = connect_bytes(4, "p.a", "p&a", 30, None);
    c[8] = 3; // protocol level
    s.write_all(&c).await.expect("send");
    assert_eq!(until_closed(&mut s).await, vec![0x20, 0x02, 0x00, 0x01]);
    still_serving(b.addr).await;
}

#[tokio::test]
async fn invalid_filters_and_topics() {
    let b = broker().await;
    // SUBSCRIBE pkid 1, no properties, filter "a/#/x" QoS 0 → SUBACK 0x8F
    // (rumqttc refuses to send such a filter, so raw bytes).
    let mut s = raw_connected(b.addr, 5, "a", 30, None).await;
    s.write_all(&[
        0x82, 0x0B, 0x00, 0x01, 0x00, 0x00, 0x05, b'a', b'/', b'#', b'/', b'x', 0x00,
    ])
    .await
    .expect("send");
    match read_v5(&mut s).await {
        Some(v5::Packet::SubAck(ack)) => {
            assert_eq!(ack.pkid, 1);
            assert_eq!(
                ack.return_codes,
                vec![v5::SubscribeReasonCode::TopicFilterInvalid]
            );
        }
        other => panic!("expected SUBACK, got {other:?}"),
    }
    // A PUBLISH with a wildcard topic ends the session with 0x90.
    let mut s = raw_connected(b.addr, 5, "b", 30, None).await;
    s.write_all(&[
        0x30, 0x0B, 0x00, 0x08, b'd', b'e', b'v', b'/', b'+', b'/', b'x', b'y', 0x00,
    ])
    .await
    .expect("send");
    let bytes = until_closed(&mut s).await;
    assert_eq!(bytes.get(2), Some(&0x90));
    still_serving(b.addr).await;
}

#[tokio::test]
async fn server_only_packets_from_a_client_close_the_connection() {
    let mut b = broker().await;
    // CONNACK and UNSUBACK from an MQTT 5 client (rumqttd's decoder has no
    // arm for them), then SUBACK and PINGRESP from 3.1.1 clients.
    for (version, dk, bytes) in [
        (5u8, "a", vec![0x20, 0x03, 0x00, 0x00, 0x00]),
        (5, "b", vec![0xB0, 0x03, 0x00, 0x01, 0x00]),
        (4, "c", vec![0x90, 0x03, 0x00, 0x01, 0x00]),
        (4, "w", vec![0xD0, 0x00]),
    ] {
        let mut s = raw_connected(b.addr, version, dk, 30, None).await;
        wait_event(&mut b.events, EventKind::DeviceConnected, dk).await;
        s.write_all(&bytes).await.expect("send");
        until_closed(&mut s).await;
        wait_event(&mut b.events, EventKind::DeviceDisconnected, dk).await;
        assert!(!b.gateway.online().is_online(&format!("p.{dk}")));
    }
    still_serving(b.addr).await;
}

#[tokio::test]
async fn random_bytes_after_connect_never_leak_sessions() {
    use rand::{Rng, SeedableRng};
    let bus = EventBus::new(65_536);
    let mut events = bus.subscribe();
    let (gateway, listener) = accept_all_gateway(1000, bus).await;
    let addr = listener.local_addr();
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    const N: usize = 300;
    for i in 0..N {
        let version = if i % 2 == 0 { 4 } else { 5 };
        let mut s = raw_connected(addr, version, &format!("f{i}"), 30, None).await;
        let len = rng.gen_range(1..200);
        let mut junk: Vec<u8> = (0..len).map(|_| rng.gen()).collect();
        // Often start with a plausible packet type byte.
        if i % 3 == 0 {
            junk[0] = [
                0x30, 0x32, 0x34, 0x82, 0xA2, 0x62, 0x40, 0x50, 0x70, 0x20, 0xB0,
            ][i % 11];
        }
        let _ = s.write_all(&junk).await;
        drop(s);
    }
    let mut ended = 0;
    tokio::time::timeout(WAIT, async {
        while ended < N {
            match events.recv().await {
                Ok(e) if e.kind == EventKind::DeviceDisconnected => ended += 1,
                Ok(_) => {}
                Err(e) => panic!("event bus: {e}"),
            }
        }
    })
    .await
    .expect("every session ends");
    assert!(gateway.online().is_empty());
    let c = v4::connect(v4::opts(addr, "p.ok", "p&ok"))
        .await
        .expect("still serving");
    c.client.disconnect().await.expect("queued");
}

#[tokio::test]
async fn topic_aliases_are_resolved_before_the_acl() {
    let b = broker().await;
    let mut ob = observer(b.addr, "devices/p/a/#").await;
    let mut s = raw_connected(b.addr, 5, "a", 30, None).await;
    let mut p = BytesMut::new();
    // PUBLISH "devices/p/a/t", Topic Alias 1, payload "1".
    p.put_slice(&[0x30, 20, 0x00, 13]);
    p.put_slice(b"devices/p/a/t");
    p.put_slice(&[0x03, 0x23, 0x00, 0x01, b'1']);
    // PUBLISH "" with Topic Alias 1, payload "2".
    p.put_slice(&[0x30, 7, 0x00, 0x00, 0x03, 0x23, 0x00, 0x01, b'2']);
    s.write_all(&p).await.expect("send");
    for payload in [b"1", b"2"] {
        let m = ob.publish().await;
        assert_eq!(m.topic, "devices/p/a/t");
        assert_eq!(&m.payload[..], payload);
    }
    // An alias above the advertised maximum (32) ends the session with 0x94.
    s.write_all(&[0x30, 7, 0x00, 0x00, 0x03, 0x23, 0x00, 99, b'3'])
        .await
        .expect("send");
    let bytes = until_closed(&mut s).await;
    assert_eq!(bytes.get(2), Some(&0x94), "{bytes:?}");

    // An alias cannot smuggle a topic past the ACL: it resolves to the real
    // topic, which is checked (PUBACK 0x87 for QoS 1).
    let mut s = raw_connected(b.addr, 5, "b", 30, None).await;
    let mut p = BytesMut::new();
    // PUBLISH QoS 1 "admin/x" pkid 5, alias 1.
    p.put_slice(&[0x32, 15, 0x00, 7]);
    p.put_slice(b"admin/x");
    p.put_slice(&[0x00, 0x05, 0x03, 0x23, 0x00, 0x01, b'x']);
    s.write_all(&p).await.expect("send");
    match read_v5(&mut s).await {
        Some(v5::Packet::PubAck(ack)) => {
            assert_eq!(ack.pkid, 5);
            assert_eq!(ack.reason, v5::PubAckReason::NotAuthorized);
        }
        other => panic!("expected PUBACK, got {other:?}"),
    }
}

//! A QoS 1 backend subscriber that falls behind loses nothing: the devices
//! publishing into its filter are paused (their PUBACKs wait) until it reads
//! on, instead of the router dropping what it has not read (the router's
//! flow control, vendor/rumqttd/PATCHES.md §9).
//!
//! The backend stops reading its socket while a device publishes more than
//! the router's log for the filter holds (4 segments of 1 MiB) plus what
//! TCP buffers and the inflight window take; then it reads everything.

use crate::common;

use std::time::Duration;

use activation_broker::admin::accounts::RoleConfig;
use common::broker::*;
use rumqttc::{AsyncClient, Event, EventLoop, Packet, QoS};
use tokio::sync::watch;

const MESSAGES: u64 = 30_000;
const PAYLOAD: usize = 1_000;

fn payload(seq: u64) -> Vec<u8> {
    let mut p = seq.to_be_bytes().to_vec();
    p.resize(PAYLOAD, b'x');
    p
}

/// Publishes every message at QoS 1 from a task; the count of PUBACKs is
/// watched.
fn publish_all(dev: AsyncClient, mut el: EventLoop) -> watch::Receiver<u64> {
    let (tx, acked) = watch::channel(0u64);
    tokio::spawn(async move {
        for seq in 0..MESSAGES {
            dev.publish(
                "devices/p1/d1/telemetry",
                QoS::AtLeastOnce,
                false,
                payload(seq),
            )
            .await
            .expect("queue");
        }
    });
    tokio::spawn(async move {
        loop {
            match el.poll().await {
                Ok(Event::Incoming(Packet::PubAck(_))) => tx.send_modify(|n| *n += 1),
                Ok(_) => {}
                Err(e) => panic!("device connection ended: {e}"),
            }
        }
    });
    acked
}

/// PUBACKs once none came for `quiet`.
async fn acked_when_quiet(acked: &mut watch::Receiver<u64>, quiet: Duration) -> u64 {
    tokio::time::timeout(WAIT, async {
        while tokio::time::timeout(quiet, acked.changed()).await.is_ok() {}
    })
    .await
    .expect("PUBACKs settle in time");
    *acked.borrow()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backend_that_falls_behind_receives_every_message() {
    let t = start_broker(|c| {
        let mut app = account("app", "pw-app", RoleConfig::Named("none".into()), false);
        app.subscribe = vec!["devices/+/+/telemetry".into()];
        c.accounts = vec![app];
        // The backend does not read for longer than the default stall.
        c.router.max_publisher_stall_ms = 600_000;
    })
    .await;
    let secret = t.product("p1", 1, 3600).await;
    let (app, mut app_el) = v4::connect(t.broker.accounts_addr(), "backend", "app", "pw-app")
        .await
        .expect("backend login");
    app.subscribe("devices/+/+/telemetry", QoS::AtLeastOnce)
        .await
        .expect("queue");
    let suback = tokio::time::timeout(WAIT, async {
        loop {
            match app_el.poll().await {
                Ok(Event::Incoming(Packet::SubAck(a))) => return a,
                Ok(_) => {}
                Err(e) => panic!("backend connection ended: {e}"),
            }
        }
    })
    .await
    .expect("SUBACK in time");
    assert_eq!(
        suback.return_codes,
        vec![rumqttc::SubscribeReasonCode::Success(QoS::AtLeastOnce)]
    );

    let (u, p) = t.creds("p1", "d1", &secret);
    let (dev, dev_el) = v4::connect(t.addr(), "p1.d1", &u, &p)
        .await
        .expect("device");
    let mut acked = publish_all(dev, dev_el);

    // The backend reads nothing: the device is paused, part acknowledged.
    let before = acked_when_quiet(&mut acked, Duration::from_millis(1_000)).await;
    assert!(
        before < MESSAGES,
        "every publish acknowledged, none held back"
    );

    // The backend reads on: every message, once, in order; the device is
    // acknowledged for all of them.
    let mut next = 0u64;
    tokio::time::timeout(Duration::from_secs(120), async {
        while next < MESSAGES {
            match app_el.poll().await {
                Ok(Event::Incoming(Packet::Publish(m))) => {
                    let seq = u64::from_be_bytes(m.payload[..8].try_into().expect("8 bytes"));
                    assert_eq!(seq, next, "a message lost or repeated");
                    next += 1;
                }
                Ok(_) => {}
                Err(e) => panic!("backend connection ended: {e}"),
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("the backend got {next} of {MESSAGES}"));
    tokio::time::timeout(WAIT, acked.wait_for(|n| *n == MESSAGES))
        .await
        .expect("every PUBACK in time")
        .expect("device task alive");
}

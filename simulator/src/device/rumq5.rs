//! rumqttc's MQTT 5 client.

use super::*;
use rumqttc::v5::mqttbytes::v5::{Packet, PubAckReason};
use rumqttc::v5::{AsyncClient, ConnectionError, Event, EventLoop, MqttOptions, StateError};
use rumqttc::{NetworkOptions, Outgoing};

pub(super) fn puback_ok(r: &PubAckReason) -> bool {
    matches!(
        r,
        PubAckReason::Success | PubAckReason::NoMatchingSubscribers
    )
}

pub(super) async fn connect(c: Credentials, target: &Target, stats: Arc<Stats>) -> Outcome {
    let mut opts = MqttOptions::new(c.id, target.host.clone(), target.port);
    opts.set_credentials(c.user, c.password);
    opts.set_keep_alive(Duration::from_secs(u64::from(target.keepalive)));
    opts.set_clean_start(true);
    opts.set_max_packet_size(Some(MAX_PACKET as u32));
    // rumqttc preallocates one slot per allowed in-flight publish, and
    // its v5 default (65535) costs megabytes per client.
    opts.set_outgoing_inflight_upper_limit(INFLIGHT);
    opts.set_connection_timeout(network_timeout_secs(target));
    let mut net = NetworkOptions::new();
    net.set_connection_timeout(network_timeout_secs(target));
    net.set_tcp_nodelay(true);
    opts.set_network_options(net);
    let (client, mut eventloop) = AsyncClient::new(opts, 64);
    match eventloop.poll().await {
        Ok(Event::Incoming(Packet::ConnAck(_))) => {
            let acked = Arc::new(AtomicU64::new(0));
            let driver = tokio::spawn(drive(eventloop, stats, acked.clone()));
            Outcome::Accepted(Session::new(Backend::V5(client), driver, acked))
        }
        Ok(other) => Outcome::Error(format!("expected CONNACK, got {other:?}")),
        Err(ConnectionError::ConnectionRefused(c)) => Outcome::Refused {
            code: v5_code(c),
            reason: None,
        },
        Err(ConnectionError::Timeout(_)) => Outcome::Timeout,
        Err(e) => Outcome::Error(error_kind(&e.to_string())),
    }
}

async fn drive(mut el: EventLoop, stats: Arc<Stats>, acked: Arc<AtomicU64>) -> SessionEnd {
    loop {
        match el.poll().await {
            Ok(Event::Incoming(Packet::PubAck(ack))) => {
                acked.fetch_add(1, Ordering::Relaxed);
                if puback_ok(&ack.reason) {
                    stats.msg_acked();
                } else {
                    stats.msg_rejected();
                }
            }
            Ok(Event::Incoming(Packet::Disconnect(d))) => {
                let reason = d
                    .properties
                    .and_then(|p| p.reason_string)
                    .unwrap_or_default();
                return SessionEnd::ClosedByServer(format!(
                    "DISCONNECT {:?} {reason}",
                    d.reason_code
                ));
            }
            Ok(Event::Outgoing(Outgoing::Disconnect)) => return SessionEnd::Disconnected,
            Ok(_) => {}
            // rumqttc reports the broker's DISCONNECT as an error.
            Err(ConnectionError::MqttState(StateError::ServerDisconnect {
                reason_code,
                reason_string,
            })) => {
                return SessionEnd::ClosedByServer(format!(
                    "DISCONNECT {reason_code:?} {}",
                    reason_string.unwrap_or_default()
                ))
            }
            Err(e) => return end_from_error(&e.to_string()),
        }
    }
}

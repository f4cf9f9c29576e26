//! rumqttc's MQTT 3.1.1 client.

use super::*;
use rumqttc::{
    AsyncClient, ConnectionError, Event, EventLoop, MqttOptions, NetworkOptions, Outgoing, Packet,
};

pub(super) async fn connect(c: Credentials, target: &Target, stats: Arc<Stats>) -> Outcome {
    let mut opts = MqttOptions::new(c.id, target.host.clone(), target.port);
    opts.set_credentials(c.user, c.password);
    opts.set_keep_alive(Duration::from_secs(u64::from(target.keepalive)));
    opts.set_clean_session(true);
    opts.set_max_packet_size(MAX_PACKET, MAX_PACKET);
    opts.set_inflight(INFLIGHT);
    let (client, mut eventloop) = AsyncClient::new(opts, 64);
    let mut net = NetworkOptions::new();
    net.set_connection_timeout(network_timeout_secs(target));
    net.set_tcp_nodelay(true);
    eventloop.set_network_options(net);
    match eventloop.poll().await {
        Ok(Event::Incoming(Packet::ConnAck(_))) => {
            let acked = Arc::new(AtomicU64::new(0));
            let driver = tokio::spawn(drive(eventloop, stats, acked.clone()));
            Outcome::Accepted(Session::new(Backend::V4(client), driver, acked))
        }
        Ok(other) => Outcome::Error(format!("expected CONNACK, got {other:?}")),
        Err(ConnectionError::ConnectionRefused(code)) => Outcome::Refused {
            code: v4_code(code),
            reason: None,
        },
        Err(ConnectionError::NetworkTimeout) => Outcome::Timeout,
        Err(e) => Outcome::Error(error_kind(&e.to_string())),
    }
}

async fn drive(mut el: EventLoop, stats: Arc<Stats>, acked: Arc<AtomicU64>) -> SessionEnd {
    loop {
        match el.poll().await {
            Ok(Event::Incoming(Packet::PubAck(_))) => {
                acked.fetch_add(1, Ordering::Relaxed);
                stats.msg_acked();
            }
            Ok(Event::Incoming(Packet::Disconnect)) => {
                return SessionEnd::ClosedByServer("DISCONNECT".into())
            }
            Ok(Event::Outgoing(Outgoing::Disconnect)) => return SessionEnd::Disconnected,
            Ok(_) => {}
            Err(e) => return end_from_error(&e.to_string()),
        }
    }
}

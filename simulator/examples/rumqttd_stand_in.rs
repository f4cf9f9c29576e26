//! A stand-in broker for trying activation-sim before the activation broker
//! runs: rumqttd's stock broker with an auth handler that checks the signed
//! device credentials (SPEC §3) against one ProductSecret. There is no
//! activation gate: every correctly signed device is accepted, and a wrong
//! signature is dropped without CONNACK (rumqttd's behaviour).
//!
//! cargo run -p activation-simulator --example rumqttd_stand_in -- [V4_PORT] [V5_PORT] [SECRET]

use activation_broker::credentials::{parse_user_name, verify};

fn main() {
    let mut args = std::env::args().skip(1);
    let v4: u16 = args.next().and_then(|s| s.parse().ok()).unwrap_or(1883);
    let v5: u16 = args.next().and_then(|s| s.parse().ok()).unwrap_or(1885);
    let secret = args.next().unwrap_or_else(|| "secret".to_owned());
    let text = format!(
        r#"
id = 0
[router]
id = 0
max_connections = 200000
max_outgoing_packet_count = 200
max_segment_size = 104857600
max_segment_count = 10
[v4.1]
name = "v4-1"
listen = "127.0.0.1:{v4}"
next_connection_delay_ms = 0
    [v4.1.connections]
    connection_timeout_ms = 60000
    max_payload_size = 1048576
    max_inflight_count = 100
    dynamic_filters = true
[v5.1]
name = "v5-1"
listen = "127.0.0.1:{v5}"
next_connection_delay_ms = 0
    [v5.1.connections]
    connection_timeout_ms = 60000
    max_payload_size = 1048576
    max_inflight_count = 100
"#
    );
    let mut config: rumqttd::Config = match toml::from_str(&text) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("bad rumqttd config: {e}");
            std::process::exit(1);
        }
    };
    let check = move |_id: String, user: String, pass: String| {
        let secret = secret.clone();
        async move {
            let Ok(u) = parse_user_name(&user) else {
                return false;
            };
            let now = chrono::Utc::now().timestamp_millis();
            verify(
                &secret,
                &user,
                u.timestamp_ms,
                pass.as_bytes(),
                now,
                300_000,
            )
            .is_ok()
        }
    };
    for servers in [config.v4.as_mut(), config.v5.as_mut()]
        .into_iter()
        .flatten()
    {
        for s in servers.values_mut() {
            s.set_auth_handler(check.clone());
        }
    }
    eprintln!("rumqttd stand-in: MQTT 3.1.1 on 127.0.0.1:{v4}, MQTT 5 on 127.0.0.1:{v5}");
    if let Err(e) = rumqttd::Broker::new(config).start() {
        eprintln!("rumqttd: {e}");
        std::process::exit(1);
    }
}

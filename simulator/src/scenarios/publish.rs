//! `publish`: devices connect (at --rate) and publish telemetry to
//! `devices/{ProductKey}/{DeviceKey}/telemetry`.

use std::sync::Arc;
use std::time::Duration;

use activation_broker::clock::Clock;
use anyhow::Result;
use tokio::task::JoinSet;

use super::{secs, Ctx, DISCONNECT_GRACE};
use crate::cli::PublishArgs;
use crate::device::Outcome;
use crate::report::{Report, Stats};

/// A JSON telemetry message padded to `size` bytes (when larger than the
/// bare object).
pub fn telemetry_payload(device_key: &str, seq: u64, size: usize) -> Vec<u8> {
    let ts = Clock::system().now();
    let bare = format!(r#"{{"device":"{device_key}","seq":{seq},"ts":{ts},"pad":""}}"#);
    let pad = size.saturating_sub(bare.len());
    format!(
        r#"{{"device":"{device_key}","seq":{seq},"ts":{ts},"pad":"{}"}}"#,
        "x".repeat(pad)
    )
    .into_bytes()
}

pub async fn run(ctx: Arc<Ctx>, args: &PublishArgs) -> Result<Report> {
    let stats = Arc::new(Stats::new());
    let n = ctx.devices.len();
    let messages = args.messages;
    let interval = Duration::from_millis(args.interval.max(1));
    let qos1 = args.qos == 1;
    let size = args.payload_size;
    let ack_timeout = secs(args.ack_timeout);
    let topic_template: Arc<str> = Arc::from(args.topic.as_str());
    let ticker = ctx.ticker("publish", Some(n as u64), &stats);
    let mut tasks = JoinSet::new();
    for idx in 0..n {
        let Some(permit) = ctx.admit(true).await else {
            break;
        };
        let ctx = ctx.clone();
        let stats = stats.clone();
        let topic_template = topic_template.clone();
        tasks.spawn(async move {
            let attempt = ctx.connect(idx, &stats).await;
            drop(permit);
            let Outcome::Accepted(mut session) = attempt.outcome else {
                return;
            };
            let device = &ctx.devices[idx];
            let topic = topic_template
                .replace("{ProductKey}", &device.product_key)
                .replace("{DeviceKey}", &device.device_key);
            let mut tick = tokio::time::interval(interval);
            let mut lost = false;
            for seq in 0..messages {
                tokio::select! {
                    _ = tick.tick() => {}
                    _ = ctx.stop.wait() => break,
                }
                let payload = telemetry_payload(&device.device_key, seq, size);
                match session.publish(&topic, payload, qos1).await {
                    Ok(()) => stats.msg_sent(),
                    Err(_) => {
                        // The rest of this device's messages are lost too.
                        for _ in seq..messages {
                            stats.msg_failed();
                        }
                        lost = true;
                        break;
                    }
                }
            }
            if qos1 {
                // Wait for the outstanding PUBACKs.
                let wait_until = tokio::time::Instant::now() + ack_timeout;
                while session.acked() < session.sent_qos1()
                    && session.ended().is_none()
                    && tokio::time::Instant::now() < wait_until
                {
                    if session.hold(Duration::from_millis(20)).await.is_some() {
                        break;
                    }
                }
                let missing = session.sent_qos1().saturating_sub(session.acked());
                for _ in 0..missing {
                    stats.msg_failed();
                }
            }
            if let Some(end) = session.check_ended().await {
                stats.server_disconnect(&end.to_string());
                return;
            }
            if !lost {
                session.disconnect(DISCONNECT_GRACE).await;
            }
        });
        while tasks.try_join_next().is_some() {}
    }
    while tasks.join_next().await.is_some() {}
    ticker.finish(stats.progress());
    Ok(stats.report("publish", ctx.target.protocol, true))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payload_is_json_of_the_requested_size() {
        let p = telemetry_payload("dev-1", 3, 200);
        assert_eq!(p.len(), 200);
        let v: serde_json::Value = serde_json::from_slice(&p).expect("json");
        assert_eq!(v["device"], "dev-1");
        assert_eq!(v["seq"], 3);
        // Smaller than the bare object: no padding, still valid.
        let small = telemetry_payload("dev-1", 3, 1);
        serde_json::from_slice::<serde_json::Value>(&small).expect("json");
    }
}

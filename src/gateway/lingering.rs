//! What happens to a session after its connection ends: the will (now, or
//! after the MQTT 5 Will Delay Interval) and the router's stored state
//! (kept, discarded now, or discarded after the Session Expiry Interval).
//!
//! A session outlives its connection when the router keeps it
//! ([`SessionInfo::stored`](super::SessionInfo::stored)). While a delayed will or an
//! expiry is pending the session is *lingering*: one task per session waits
//! for the earlier deadline. A new connection with the same client id ends
//! the wait (under the client id's stripe lock, after it is registered):
//! resuming the session (clean start off) cancels the will; a clean start
//! ends the old session, so its will goes out at once (MQTT 5 §3.1.2.5).
//!
//! Invariant: a lingering client id is in `Shared::persistent` (only a
//! session the router keeps can linger), so its next CONNECT always takes
//! the linked registration path, which settles the lingering entry.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use rumqttd::protocol::{LastWill, LastWillProperties, Packet, Publish, PublishProperties};
use tokio::sync::oneshot;
use tokio::time::Instant;

use super::Shared;

/// A will message as it came in the CONNECT.
pub(crate) type Will = (LastWill, Option<LastWillProperties>);

/// How long the router keeps a session after its connection ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SessionExpiry {
    /// Ends with the connection (MQTT 3.1.1 clean session; MQTT 5 interval 0).
    WithConnection,
    /// This many seconds after the connection ends (MQTT 5).
    After(u32),
    /// Kept until a clean session of the same client id (MQTT 3.1.1 clean
    /// session off; MQTT 5 interval 0xFFFFFFFF).
    Never,
}

impl SessionExpiry {
    /// From the MQTT 5 Session Expiry Interval (absent = 0).
    pub fn from_interval(seconds: Option<u32>) -> Self {
        match seconds.unwrap_or(0) {
            0 => SessionExpiry::WithConnection,
            u32::MAX => SessionExpiry::Never,
            n => SessionExpiry::After(n),
        }
    }

    fn delay(self) -> Option<Duration> {
        match self {
            SessionExpiry::WithConnection => Some(Duration::ZERO),
            SessionExpiry::After(n) => Some(Duration::from_secs(u64::from(n))),
            SessionExpiry::Never => None,
        }
    }
}

/// The end of a connection that was not taken over by another one.
pub(crate) struct Ended {
    pub(crate) client_id: String,
    /// The router keeps the session's state after the link closes.
    pub(crate) stored: bool,
    pub(crate) expiry: SessionExpiry,
    /// The will to publish (absent after a normal DISCONNECT).
    pub(crate) will: Option<Will>,
}

/// What a new connection decided for a lingering session.
enum Fate {
    /// Clean start off: the session goes on; no will.
    Resumed,
    /// Clean start: the old session is over; its will goes out now.
    Ended,
    /// The server stops: the session ends with it, its will goes out now;
    /// told when it is out.
    ServerStopping(oneshot::Sender<()>),
}

pub(crate) struct Lingering {
    token: u64,
    will_pending: bool,
    fate: oneshot::Sender<Fate>,
}

impl Shared {
    /// Called when a connection ends (after its router link is closed).
    /// Publishes the will now or schedules it; discards the router's copy
    /// of the session now or schedules that.
    pub(crate) async fn connection_ended(self: &Arc<Self>, ended: Ended) {
        let Ended {
            client_id,
            stored,
            expiry,
            will,
        } = ended;
        let will_delay = will
            .as_ref()
            .and_then(|(_, p)| p.as_ref())
            .and_then(|p| p.delay_interval)
            .map_or(Duration::ZERO, |s| Duration::from_secs(u64::from(s)));
        let expires_in = if stored {
            expiry.delay()
        } else {
            Some(Duration::ZERO)
        };
        let will_in = match expires_in {
            // The server stops: the session ends with it, and so its will's wait.
            _ if self.stopping.load(Ordering::SeqCst) => Duration::ZERO,
            Some(e) => will_delay.min(e),
            None => will_delay,
        };
        let mut will = will;
        if will_in.is_zero() {
            if let Some(w) = will.take() {
                publish_will(self, w).await;
            }
        }
        if !stored {
            return;
        }
        if expires_in == Some(Duration::ZERO) {
            self.end_stored(client_id, None, true).await;
            return;
        }
        if will.is_none() && expires_in.is_none() {
            return;
        }
        // Linger: register the wait unless the client id is back already.
        let token = self.lingering_seq.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        {
            let mut lingering = self.lingering.lock();
            if self.online.is_online(&client_id) {
                return;
            }
            lingering.insert(
                client_id.clone(),
                Lingering {
                    token,
                    will_pending: will.is_some(),
                    fate: tx,
                },
            );
        }
        let now = Instant::now();
        let will_at = will.map(|w| (w, deadline(now, will_in)));
        let expire_at = expires_in.map(|e| deadline(now, e));
        self.runtime.spawn(linger(
            self.clone(),
            client_id,
            token,
            will_at,
            expire_at,
            rx,
        ));
    }

    /// Settles the lingering session of `client_id`, if any, for a new
    /// connection that has just registered. Under the stripe lock.
    pub(crate) fn settle_lingering(&self, client_id: &str, clean_start: bool) {
        if let Some(l) = self.lingering.lock().remove(client_id) {
            let _ = l.fate.send(if clean_start {
                Fate::Ended
            } else {
                Fate::Resumed
            });
        }
    }

    /// At a graceful stop: every lingering session still waiting out a
    /// will delay ends now and publishes its will; each receiver resolves
    /// when its will is handed to the router.
    pub(crate) fn end_delayed_wills(&self) -> Vec<oneshot::Receiver<()>> {
        let mut lingering = self.lingering.lock();
        let pending: Vec<String> = lingering
            .iter()
            .filter(|(_, l)| l.will_pending)
            .map(|(id, _)| id.clone())
            .collect();
        let mut done = Vec::with_capacity(pending.len());
        for id in pending {
            if let Some(l) = lingering.remove(&id) {
                let (tx, rx) = oneshot::channel();
                if l.fate.send(Fate::ServerStopping(tx)).is_ok() {
                    done.push(rx);
                }
            }
        }
        done
    }

    /// Whether lingering session `token` of `client_id` still waits for its
    /// will; marks the will as gone.
    fn will_due(&self, client_id: &str, token: u64) -> bool {
        match self.lingering.lock().get_mut(client_id) {
            Some(l) if l.token == token && l.will_pending => {
                l.will_pending = false;
                true
            }
            _ => false,
        }
    }

    /// Ends the stored session of `client_id` whose connection is gone:
    /// takes its lingering entry `token` (if given; nothing happens if a new
    /// connection settled it first) and, if `discard`, makes the router
    /// forget it unless the client id is online again.
    async fn end_stored(self: &Arc<Self>, client_id: String, token: Option<u64>, discard: bool) {
        let _guard = self.stripe(&client_id).await;
        if let Some(token) = token {
            let mut lingering = self.lingering.lock();
            match lingering.get(&client_id) {
                Some(l) if l.token == token => lingering.remove(&client_id),
                _ => return,
            };
        }
        if discard && !self.online.is_online(&client_id) {
            if let Err(e) = self.discard_locked(&client_id).await {
                tracing::warn!(%client_id, error = %e, "cannot discard session");
            }
        }
    }

    /// Sessions whose connection ended and that wait for a delayed will or
    /// their expiry.
    pub(crate) fn lingering_counts(&self) -> (usize, usize) {
        let lingering = self.lingering.lock();
        let wills = lingering.values().filter(|l| l.will_pending).count();
        (lingering.len(), wills)
    }
}

/// `now + after`, saturating far in the future (intervals come from
/// clients, up to 136 years).
fn deadline(now: Instant, after: Duration) -> Instant {
    now.checked_add(after)
        .or_else(|| now.checked_add(Duration::from_secs(100 * 365 * 86_400)))
        .unwrap_or(now)
}

/// Waits out a lingering session: the will at `will_at`, the expiry at
/// `expire_at` (none: the router keeps it), unless a new connection settles
/// it first.
async fn linger(
    gw: Arc<Shared>,
    client_id: String,
    token: u64,
    will_at: Option<(Will, Instant)>,
    expire_at: Option<Instant>,
    mut fate: oneshot::Receiver<Fate>,
) {
    if let Some((will, at)) = will_at {
        // None: the delay passed with the session still lingering.
        let settled = tokio::select! {
            _ = tokio::time::sleep_until(at) => {
                if gw.will_due(&client_id, token) {
                    None
                } else {
                    Some((&mut fate).await)
                }
            }
            f = &mut fate => Some(f),
        };
        let was_settled = settled.is_some();
        match settled {
            None | Some(Ok(Fate::Ended)) => publish_will(&gw, will).await,
            Some(Ok(Fate::ServerStopping(done))) => {
                publish_will(&gw, will).await;
                let _ = done.send(());
            }
            Some(Ok(Fate::Resumed)) | Some(Err(_)) => {}
        }
        if was_settled {
            return;
        }
    }
    let discard = match expire_at {
        Some(at) => {
            tokio::select! {
                _ = tokio::time::sleep_until(at) => true,
                _ = &mut fate => return,
            }
        }
        // Nothing left to wait for: the router keeps the session.
        None => false,
    };
    gw.end_stored(client_id, Some(token), discard).await;
}

/// Publishes a will through the gateway's own link (QoS 0 into the router;
/// the router delivers at each subscription's QoS).
pub(crate) async fn publish_will(gw: &Shared, (will, props): Will) {
    let publish = Publish::new(will.topic, will.message, will.retain);
    let properties = props.map(|p| PublishProperties {
        payload_format_indicator: p.payload_format_indicator,
        message_expiry_interval: p.message_expiry_interval,
        topic_alias: None,
        response_topic: p.response_topic,
        correlation_data: p.correlation_data,
        user_properties: p.user_properties,
        subscription_identifiers: Vec::new(),
        content_type: p.content_type,
    });
    let mut tx = gw.wills.lock().await;
    match tx
        .send(&mut vec![Packet::Publish(publish, properties)])
        .await
    {
        Ok(()) => {
            gw.wills_published.fetch_add(1, Ordering::SeqCst);
        }
        Err(e) => tracing::warn!(error = %e, "cannot publish will"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expiry_from_the_mqtt5_interval() {
        assert_eq!(
            SessionExpiry::from_interval(None),
            SessionExpiry::WithConnection
        );
        assert_eq!(
            SessionExpiry::from_interval(Some(0)),
            SessionExpiry::WithConnection
        );
        assert_eq!(
            SessionExpiry::from_interval(Some(30)),
            SessionExpiry::After(30)
        );
        assert_eq!(
            SessionExpiry::from_interval(Some(u32::MAX)),
            SessionExpiry::Never
        );
        assert_eq!(SessionExpiry::Never.delay(), None);
        let now = Instant::now();
        assert!(deadline(now, Duration::from_secs(u64::from(u32::MAX))) > now);
        assert!(deadline(now, Duration::MAX) > now);
        assert_eq!(
            SessionExpiry::After(2).delay(),
            Some(Duration::from_secs(2))
        );
    }
}

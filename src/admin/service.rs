//! The admin service: an in-process client of rumqttd's router.
//!
//! It subscribes to `admin/v1/+/request` over a local link. The `{account}`
//! segment of a request's topic is the requester (the accounts listener's
//! ACL lets an account publish only to its own request topic, and devices
//! never reach `admin/#`). Each request is served by [`super::handle`] on
//! its own task and answered on `admin/v1/{account}/response`, or on the
//! MQTT 5 Response Topic of the request when the account may receive there
//! ([`Account::may_receive_on`](super::accounts::Account::may_receive_on)), with the Correlation Data copied. Every
//! event of the [`EventBus`](crate::events::EventBus) is relayed to
//! `admin/v1/events/{kind}`.
//!
//! All publishing goes through one link from one task, so events keep their
//! order; the link's sends await room in the router's channel without
//! blocking a thread (`gateway::router_link`). rumqttd lets local links
//! publish only at QoS 0; responses and events are QoS 0 from the router to
//! subscribers.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, Context};
use bytes::Bytes;
use rumqttd::protocol::{Packet, Publish, PublishProperties};
use rumqttd::Notification;
use tokio::sync::{broadcast, mpsc, Semaphore};
use tokio::task::JoinHandle;

use super::accounts::{response_topic, valid_account_name, Accounts};
use super::{handle, respond, AdminContext, AdminError};
use crate::events::{Event, EventBus, KindsReceiver};
use crate::gateway::{RouterLink, RouterLinkRx};

/// Client id of the service's router link. Contains NUL, which no accepted
/// client id may contain (the gateway refuses it), so no client can take
/// over the admin session; rumqttd refuses `$`, `+`, `#` and `/` in ids.
pub const ADMIN_CLIENT_ID: &str = "\0admin-service";
/// What the service subscribes to.
pub const REQUEST_FILTER: &str = "admin/v1/+/request";
pub use activation_client::admin::EVENTS_PREFIX;
/// The filter of every event topic (`{EVENTS_PREFIX}#`).
pub const EVENTS_FILTER: &str = "admin/v1/events/#";
/// Requests served at once; more wait for a slot.
const MAX_CONCURRENT_REQUESTS: usize = 64;
/// Batches of publishes queued for the router (a response is a batch of
/// one, events come in batches of up to [`PUBLISH_BATCH`]); events beyond
/// it are dropped (and counted), responses wait.
const OUTGOING_QUEUE: usize = 4096;
/// How long the relay lets events gather after the first one, so the
/// relay's thread and the router wake once per batch rather than once per
/// event under a connection flood (at 10,000 connects a second, a batch of
/// about 100). Events are at most this much later; after a full batch the
/// relay takes the next at once.
const EVENT_LINGER: Duration = Duration::from_millis(10);
/// How long `start` waits for the router to acknowledge the subscription.
const SUBACK_TIMEOUT: Duration = Duration::from_secs(10);

/// Opens a local link to the router (e.g. `RouterHandle::link_blocking`,
/// or a `(LinkTx, LinkRx)` from rumqttd's `LinkBuilder`). It may block; the
/// service calls it on the blocking pool. The link must have dynamic
/// filters on: publishing to a topic nobody subscribes to would otherwise
/// disconnect it.
pub type LinkFn = dyn FnOnce(&str) -> anyhow::Result<RouterLink> + Send;

/// A publish for the router.
struct Outgoing {
    topic: String,
    payload: Vec<u8>,
    properties: Option<PublishProperties>,
}

impl Outgoing {
    fn into_packet(self) -> Packet {
        let publish = Publish::new(Bytes::from(self.topic), Bytes::from(self.payload), false);
        Packet::Publish(publish, self.properties)
    }
}

/// Most publishes handed to the router at once.
const PUBLISH_BATCH: usize = 256;

/// Counters of the service.
#[derive(Debug, Default)]
pub struct AdminStats {
    pub requests: AtomicU64,
    pub events_relayed: AtomicU64,
    /// Events lost: the relay fell behind the event bus, or the router queue was full.
    pub events_dropped: AtomicU64,
}

/// The running admin service; dropping it stops it.
pub struct AdminService {
    tasks: Vec<JoinHandle<()>>,
    stats: Arc<AdminStats>,
}

impl AdminService {
    /// Opens the link (`link(ADMIN_CLIENT_ID)`), subscribes to
    /// `admin/v1/+/request`, waits for the router's acknowledgement, and
    /// starts serving requests and relaying `ctx.ledger.events()`.
    pub async fn start<F, L>(
        ctx: AdminContext,
        accounts: Arc<Accounts>,
        link: F,
    ) -> anyhow::Result<AdminService>
    where
        F: FnOnce(&str) -> anyhow::Result<L> + Send + 'static,
        L: Into<RouterLink> + Send + 'static,
    {
        // Subscribe to the bus first: no event after `start` returns is missed.
        // It takes events only while some MQTT session subscribes to them
        // (`EventBus::mqtt_interest`, raised by the gateway before that
        // SUBACK) or someone else wants them.
        let bus = ctx.ledger.events().clone();
        let events = bus.subscribe_to(&[]);
        let mut link: RouterLink = tokio::task::spawn_blocking(move || link(ADMIN_CLIENT_ID))
            .await
            .context("starting the admin link")??
            .into();
        link.subscribe(REQUEST_FILTER)
            .await
            .map_err(|e| anyhow!("subscribing to {REQUEST_FILTER}: {e}"))?;
        let (mut tx, mut rx) = link.split();
        tokio::time::timeout(SUBACK_TIMEOUT, async {
            loop {
                match rx.next().await? {
                    Notification::DeviceAck(_) => return Ok(()),
                    Notification::Unschedule => rx.wake().await?,
                    _ => {}
                }
            }
        })
        .await
        .map_err(|_| anyhow!("no SUBACK from the router within {SUBACK_TIMEOUT:?}"))?
        .map_err(|e: crate::gateway::LinkClosed| anyhow!("waiting for the router's SUBACK: {e}"))?;

        let stats = Arc::new(AdminStats::default());
        let (out_tx, mut out_rx) = mpsc::channel::<Vec<Outgoing>>(OUTGOING_QUEUE);
        let publisher = tokio::spawn(async move {
            // Whatever queued up meanwhile goes to the router in one batch:
            // one wake-up of the router per batch, not per event.
            let mut batch = Vec::with_capacity(PUBLISH_BATCH);
            while let Some(first) = out_rx.recv().await {
                batch.extend(first.into_iter().map(Outgoing::into_packet));
                while batch.len() < PUBLISH_BATCH {
                    match out_rx.try_recv() {
                        Ok(more) => batch.extend(more.into_iter().map(Outgoing::into_packet)),
                        Err(_) => break,
                    }
                }
                if let Err(e) = tx.send(&mut batch).await {
                    tracing::error!(error = %e, "admin service: router link closed");
                    break;
                }
            }
        });

        let reader = tokio::spawn(serve(ctx, accounts, rx, out_tx.clone(), stats.clone()));
        let relay = tokio::spawn(relay(bus, events, out_tx, stats.clone()));
        Ok(AdminService {
            tasks: vec![reader, relay, publisher],
            stats,
        })
    }

    pub fn stats(&self) -> &AdminStats {
        &self.stats
    }

    /// Stops serving and relaying.
    pub fn shutdown(&self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

impl Drop for AdminService {
    fn drop(&mut self) {
        self.shutdown();
    }
}

async fn serve(
    ctx: AdminContext,
    accounts: Arc<Accounts>,
    mut rx: RouterLinkRx,
    out: mpsc::Sender<Vec<Outgoing>>,
    stats: Arc<AdminStats>,
) {
    let slots = Arc::new(Semaphore::new(MAX_CONCURRENT_REQUESTS));
    let reply_topics = Arc::new(ReplyTopics::default());
    loop {
        let notification = match rx.next().await {
            Ok(n) => n,
            Err(e) => {
                tracing::error!(error = %e, "admin service: router link closed");
                return;
            }
        };
        let forward = match notification {
            Notification::Forward(f) => f,
            Notification::Unschedule => {
                if let Err(e) = rx.wake().await {
                    tracing::error!(error = %e, "admin service: router link closed");
                    return;
                }
                continue;
            }
            _ => continue,
        };
        let Ok(permit) = slots.clone().acquire_owned().await else {
            return;
        };
        stats.requests.fetch_add(1, Ordering::Relaxed);
        let (ctx, accounts, out) = (ctx.clone(), accounts.clone(), out.clone());
        let reply_topics = reply_topics.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let props = forward.properties.unwrap_or_default();
            if let Some(o) = serve_one(
                &ctx,
                &accounts,
                &reply_topics,
                &forward.publish.topic,
                &forward.publish.payload,
                props,
            )
            .await
            {
                // Fails only when the publisher is gone (shutting down).
                let _ = out.send(vec![o]).await;
            }
        });
    }
}

/// Distinct MQTT 5 Response Topics honoured per account. rumqttd keeps a
/// filter for every topic published to without a matching subscription,
/// forever; this bounds what one account can make it keep.
pub const MAX_REPLY_TOPICS_PER_ACCOUNT: usize = 64;

/// The Response Topics each account has used.
#[derive(Default)]
struct ReplyTopics {
    used: parking_lot::Mutex<std::collections::HashMap<String, std::collections::HashSet<String>>>,
}

impl ReplyTopics {
    /// Whether `topic` may be used by `account`: known, or new within the cap.
    fn admit(&self, account: &str, topic: &str) -> bool {
        let mut used = self.used.lock();
        let set = used.entry(account.to_owned()).or_default();
        if set.contains(topic) {
            return true;
        }
        if set.len() >= MAX_REPLY_TOPICS_PER_ACCOUNT {
            return false;
        }
        set.insert(topic.to_owned());
        true
    }
}

/// The response to one request, or `None` when there is nobody to answer.
async fn serve_one(
    ctx: &AdminContext,
    accounts: &Accounts,
    reply_topics: &ReplyTopics,
    topic: &[u8],
    payload: &[u8],
    props: PublishProperties,
) -> Option<Outgoing> {
    let topic = std::str::from_utf8(topic).ok()?;
    let name = match topic.split('/').collect::<Vec<_>>().as_slice() {
        ["admin", "v1", name, "request"] => (*name).to_owned(),
        _ => return None,
    };
    if !valid_account_name(&name) {
        tracing::warn!(topic, "admin request on a topic of no possible account");
        return None;
    }
    let (response, reply_topic) = match accounts.get(&name) {
        Some(account) => {
            let reply_topic = match &props.response_topic {
                Some(t) if account.may_receive_on(t) && reply_topics.admit(&name, t) => t.clone(),
                Some(t) => {
                    tracing::debug!(account = %name, topic = %t, "Response Topic not allowed; answering on the default topic");
                    account.response_topic()
                }
                None => account.response_topic(),
            };
            (handle(ctx, &account, payload).await, reply_topic)
        }
        None => (
            respond(
                super::new_request_id(),
                Err(AdminError::forbidden(format!("unknown account {name}"))),
            ),
            response_topic(&name),
        ),
    };
    Some(Outgoing {
        topic: reply_topic,
        payload: super::envelope_text(&response, false).into_bytes(),
        properties: Some(PublishProperties {
            payload_format_indicator: Some(1),
            content_type: Some("application/json".into()),
            correlation_data: props.correlation_data,
            ..PublishProperties::default()
        }),
    })
}

async fn relay(
    bus: EventBus,
    mut events: KindsReceiver,
    out: mpsc::Sender<Vec<Outgoing>>,
    stats: Arc<AdminStats>,
) {
    let lagged = |n: u64| {
        stats.events_dropped.fetch_add(n, Ordering::Relaxed);
        tracing::warn!(dropped = n, "admin event relay fell behind the event bus");
    };
    // The last batch was full: the bus is busy, take the next at once.
    let mut full = false;
    loop {
        let first = match events.recv().await {
            Ok(e) => e,
            Err(broadcast::error::RecvError::Lagged(n)) => {
                lagged(n);
                continue;
            }
            Err(broadcast::error::RecvError::Closed) => return,
        };
        // Sent for another receiver (the console's stream) while no MQTT
        // session subscribes to events: nobody to publish it to.
        if !bus.mqtt_wanted() {
            continue;
        }
        let mut batch = vec![event_publish(&first)];
        if !full {
            tokio::time::sleep(EVENT_LINGER).await;
        }
        let mut closed = false;
        while batch.len() < PUBLISH_BATCH {
            match events.try_recv() {
                Ok(e) => batch.push(event_publish(&e)),
                Err(broadcast::error::TryRecvError::Lagged(n)) => lagged(n),
                Err(broadcast::error::TryRecvError::Empty) => break,
                Err(broadcast::error::TryRecvError::Closed) => {
                    closed = true;
                    break;
                }
            }
        }
        full = batch.len() >= PUBLISH_BATCH;
        let n = batch.len() as u64;
        match out.try_send(batch) {
            Ok(()) => {
                stats.events_relayed.fetch_add(n, Ordering::Relaxed);
            }
            Err(mpsc::error::TrySendError::Full(_)) => {
                stats.events_dropped.fetch_add(n, Ordering::Relaxed);
            }
            Err(mpsc::error::TrySendError::Closed(_)) => return,
        }
        if closed {
            return;
        }
    }
}

/// The publish of one event on `admin/v1/events/{kind}`.
fn event_publish(event: &Event) -> Outgoing {
    Outgoing {
        topic: format!("{EVENTS_PREFIX}{}", event.kind.as_str()),
        payload: event.render().into_bytes(),
        properties: Some(PublishProperties {
            payload_format_indicator: Some(1),
            content_type: Some("application/json".into()),
            ..PublishProperties::default()
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_events_filter_is_the_events_prefix_and_everything_under_it() {
        assert_eq!(EVENTS_FILTER, format!("{EVENTS_PREFIX}#"));
    }
}

//! rumqttd's router and the links to it: every quirk of rumqttd's local
//! links is handled here, for the gateway and the admin plane alike.
//!
//! - The router runs on its own thread in the `SCHED_BATCH` class
//!   (`crate::sched`): waking it does not preempt the waking I/O thread.
//! - A device's clean session is linked quietly
//!   ([`RouterHandle::connect_quiet`], rumqttd's `connect_quiet_with`):
//!   the link is usable once its Connect, carrying its first packets, is in
//!   the router's channel, and the router sends it no ConnAck, SubAck or
//!   UnsubAck (the gateway answers those itself), so linking and
//!   subscribing never wake the connection.
//! - Other links (stored sessions, accounts, the broker's own): creating
//!   one is one Connect event and the router's ConnAck,
//!   awaited without holding a thread (`LinkBuilder::build_async`, patched
//!   into the vendored rumqttd); a router without a free slot drops the link.
//!   A link made for its first packets carries them with its Connect
//!   (`connect_async_with`): the router takes them right after the ConnAck,
//!   in the same pass. Creation comes in two halves
//!   ([`RouterHandle::connect_with`], then
//!   [`PendingRouterLink::established`]): once the Connect is in the
//!   router's channel, its first packets are ahead of whatever any link
//!   sends later, so a device's SUBACK goes out before the router's ConnAck
//!   comes back.
//! - Sending: all packets but the last go straight into the link's buffer
//!   and the last one with the notification, so the router wakes once per
//!   batch. `LinkTx::send` awaits room in the router's bounded event
//!   channel (patched: upstream blocks the thread). While the router has
//!   not taken earlier packets of this link, a sender waits, which is the
//!   TCP backpressure of a publish flood and of the router's flow control
//!   (a publisher paused for a lagging QoS 1/2 subscriber, for at most
//!   `[router] max_publisher_stall_ms`); it stops waiting when the router
//!   drops the link.
//! - Receiving: after `Notification::Unschedule` the router sends nothing
//!   more on the link until it is woken ([`RouterLinkRx::wake`]); a
//!   connection wakes it once what it received is written out.
//! - Slots: the router holds at most `max_connections` links;
//!   [`INTERNAL_LINKS`] of them are kept for the broker's own links, the
//!   rest ([`RouterHandle::sessions`]) is what the online registry admits.
//! - Links have dynamic filters: rumqttd disconnects a publisher whose topic
//!   no subscription matches otherwise.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use rumqttd::local::{LinkBuilder, LinkError, LinkRx, LinkTx, PendingLink};
use rumqttd::protocol::{
    Disconnect, DisconnectReasonCode, Filter, Packet, Publish, QoS, RetainForwardRule, Subscribe,
};
use rumqttd::{Notification, Router, RouterConfig};

use super::{GatewayError, WILL_LINK_ID};

/// Router slots kept for the broker's own links (the gateway's will link,
/// the admin plane's links).
pub const INTERNAL_LINKS: usize = 16;

/// Packets a link may have waiting in the router before its sender waits
/// (TCP backpressure for publish floods).
const MAX_PENDING_TO_ROUTER: usize = 1024;

/// Longest pause between two looks at a waiting link's backlog.
const BACKLOG_POLL: Duration = Duration::from_millis(16);

type ConnectFuture = Pin<Box<dyn Future<Output = Result<PendingRouterLink, GatewayError>> + Send>>;
type ConnectFn = dyn Fn(String, bool, Vec<Packet>) -> ConnectFuture + Send + Sync;
type QuietFuture = Pin<Box<dyn Future<Output = Result<RouterLink, GatewayError>> + Send>>;
type QuietFn = dyn Fn(String, Vec<Packet>) -> QuietFuture + Send + Sync;
type BuildBlockingFn = dyn Fn(&str, bool) -> Result<RouterLink, GatewayError> + Send + Sync;

/// Every link of the broker: dynamic filters (publishing to a topic nobody
/// subscribes to must not disconnect the publisher), no topic aliases
/// towards our clients. (A macro: the router's channel type is not
/// nameable outside rumqttd.)
macro_rules! link_builder {
    ($client_id:expr, $router_tx:expr, $clean:expr) => {
        LinkBuilder::new($client_id, $router_tx)
            .clean_session($clean)
            .dynamic_filters(true)
            .topic_alias_max(0)
    };
}

/// A running rumqttd router and the means to open links to it.
#[derive(Clone)]
pub struct RouterHandle {
    connect: Arc<ConnectFn>,
    connect_quiet: Arc<QuietFn>,
    build_blocking: Arc<BuildBlockingFn>,
    /// Client sessions the router has room for (its `max_connections`
    /// less [`INTERNAL_LINKS`]).
    sessions: usize,
}

impl std::fmt::Debug for RouterHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RouterHandle")
            .field("sessions", &self.sessions)
            .finish()
    }
}

impl RouterHandle {
    /// Starts rumqttd's router on its own thread.
    pub fn spawn(router_id: usize, config: RouterConfig) -> Self {
        let sessions = config.max_connections.saturating_sub(INTERNAL_LINKS).max(1);
        let tx = Router::new(router_id, config).spawn_with(crate::sched::batch_this_thread);
        let tx_blocking = tx.clone();
        let tx_quiet = tx.clone();
        let connect_quiet = move |client_id: String, first: Vec<Packet>| -> QuietFuture {
            let tx = tx_quiet.clone();
            Box::pin(async move {
                link_builder!(&client_id, tx, true)
                    .connect_quiet_with(first)
                    .await
                    .map(RouterLink::from)
                    .map_err(router_error)
            })
        };
        let connect =
            move |client_id: String, clean_session: bool, first: Vec<Packet>| -> ConnectFuture {
                let tx = tx.clone();
                Box::pin(async move {
                    link_builder!(&client_id, tx, clean_session)
                        .connect_async_with(first)
                        .await
                        .map(PendingRouterLink)
                        .map_err(router_error)
                })
            };
        let build_blocking = move |client_id: &str, clean_session: bool| {
            let (link_tx, link_rx, ack) =
                link_builder!(client_id, tx_blocking.clone(), clean_session)
                    .build()
                    .map_err(router_error)?;
            Ok(RouterLink::with_ack(link_tx, link_rx, &ack))
        };
        RouterHandle {
            connect: Arc::new(connect),
            connect_quiet: Arc::new(connect_quiet),
            build_blocking: Arc::new(build_blocking),
            sessions,
        }
    }

    /// Client sessions the router has room for.
    pub fn sessions(&self) -> usize {
        self.sessions
    }

    /// Opens a link for `client_id`: a clean one, or one whose session the
    /// router keeps after it closes (and resumes, if it has one).
    pub async fn link(
        &self,
        client_id: &str,
        clean_session: bool,
    ) -> Result<RouterLink, GatewayError> {
        self.link_with(client_id, clean_session, &mut Vec::new())
            .await
    }

    /// [`Self::link`] carrying `first` (emptied), which the router takes
    /// right after it accepts the link: one round trip for both. Lost if
    /// the link cannot be made.
    pub async fn link_with(
        &self,
        client_id: &str,
        clean_session: bool,
        first: &mut Vec<Packet>,
    ) -> Result<RouterLink, GatewayError> {
        self.connect_with(client_id, clean_session, first)
            .await?
            .established()
            .await
    }

    /// The first half of [`Self::link_with`]: returns once the link's
    /// Connect event, carrying `first` (emptied), is in the router's event
    /// channel. The router handles its events in order and takes `first`
    /// with the Connect, so whatever any link sends after this returns is
    /// handled after them: a SUBSCRIBE in `first` is in effect for every
    /// later publish (the gateway answers SUBACK itself from here on).
    pub async fn connect_with(
        &self,
        client_id: &str,
        clean_session: bool,
        first: &mut Vec<Packet>,
    ) -> Result<PendingRouterLink, GatewayError> {
        (self.connect)(client_id.to_owned(), clean_session, std::mem::take(first)).await
    }

    /// A clean link for `client_id` whose CONNACK, SUBACK and UNSUBACK the
    /// gateway answers itself (rumqttd's quiet link): the router sends it no
    /// ConnAck, SubAck or UnsubAck, so neither linking nor subscribing wakes
    /// the connection. Returns once the link's Connect, carrying `first`
    /// (emptied), is in the router's event channel, ordered as with
    /// [`Self::connect_with`]. A router without a free slot drops the link:
    /// its [`RouterLinkRx::ready`] then fails.
    pub async fn connect_quiet(
        &self,
        client_id: &str,
        first: &mut Vec<Packet>,
    ) -> Result<RouterLink, GatewayError> {
        (self.connect_quiet)(client_id.to_owned(), std::mem::take(first)).await
    }

    /// [`Self::link`] for a thread outside any runtime (blocks it).
    pub fn link_blocking(
        &self,
        client_id: &str,
        clean_session: bool,
    ) -> Result<RouterLink, GatewayError> {
        (self.build_blocking)(client_id, clean_session)
    }
}

/// A link whose Connect event is in the router's channel
/// ([`RouterHandle::connect_with`]).
pub struct PendingRouterLink(PendingLink);

impl PendingRouterLink {
    /// Awaits the router's ConnAck: the link, or an error if the router
    /// refused it (no free slot).
    pub async fn established(self) -> Result<RouterLink, GatewayError> {
        let (link_tx, link_rx, ack) = self.0.established().await.map_err(router_error)?;
        Ok(RouterLink::with_ack(link_tx, link_rx, &ack))
    }
}

fn router_error(e: LinkError) -> GatewayError {
    GatewayError::Router(e.to_string())
}

/// A router configuration suitable for the broker: room for
/// `max_connections` client sessions (plus [`INTERNAL_LINKS`]), small in-memory
/// segments per subscribed filter (4 × 1 MiB per filter bounds what a
/// persistent session can have queued), the default caps of `[router]`.
pub fn router_config(max_connections: usize) -> RouterConfig {
    router_config_with(&crate::config::RouterSection {
        max_connections,
        ..Default::default()
    })
}

/// [`router_config`] with the caps of `section` (`[router]` in the config).
/// The gateway's own links publish for many clients: exempt from the
/// per-client caps.
pub fn router_config_with(section: &crate::config::RouterSection) -> RouterConfig {
    RouterConfig {
        max_connections: section.max_connections.saturating_add(INTERNAL_LINKS),
        max_outgoing_packet_count: 200,
        max_segment_size: 1024 * 1024,
        max_segment_count: 4,
        custom_segment: None,
        initialized_filters: None,
        shared_subscriptions_strategy: Default::default(),
        max_retained_per_client: section.max_retained_per_client,
        max_retained_bytes: section.max_retained_bytes,
        max_outgoing_inflight: section.max_inflight_per_session.max(1),
        max_publisher_stall_ms: section.max_publisher_stall_ms,
        quota_exempt_clients: vec![
            WILL_LINK_ID.to_owned(),
            crate::admin::service::ADMIN_CLIENT_ID.to_owned(),
        ],
        // Admin topics behave like `$` topics: `#` never reaches them.
        wildcard_excluded_levels: super::acl::WILDCARD_EXCLUDED_LEVELS
            .iter()
            .map(|l| (*l).to_owned())
            .collect(),
    }
}

/// The router has dropped the link (or has stopped).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the router closed the link")]
pub struct LinkClosed;

/// One link to the router: its sending and its receiving half.
pub struct RouterLink {
    tx: RouterLinkTx,
    rx: RouterLinkRx,
    session_present: bool,
}

impl RouterLink {
    /// Wraps a link built with `LinkBuilder` (dynamic filters on).
    pub fn new(tx: LinkTx, rx: LinkRx) -> Self {
        RouterLink {
            tx: RouterLinkTx { tx },
            rx: RouterLinkRx { rx },
            session_present: false,
        }
    }

    fn with_ack(tx: LinkTx, rx: LinkRx, ack: &Notification) -> Self {
        let mut link = RouterLink::new(tx, rx);
        if let Some(Packet::ConnAck(a, _)) = Option::<Packet>::from(ack.clone()) {
            link.session_present = a.session_present;
        }
        link
    }

    /// Whether the router resumed a session it kept for this client id.
    pub fn session_present(&self) -> bool {
        self.session_present
    }

    pub fn tx(&mut self) -> &mut RouterLinkTx {
        &mut self.tx
    }

    pub fn rx(&mut self) -> &mut RouterLinkRx {
        &mut self.rx
    }

    /// The two halves, to send and receive from different tasks.
    pub fn split(self) -> (RouterLinkTx, RouterLinkRx) {
        (self.tx, self.rx)
    }

    /// Subscribes the link to `filter` (QoS 0); the router answers with a
    /// `DeviceAck` notification.
    pub async fn subscribe(&mut self, filter: &str) -> Result<(), LinkClosed> {
        let filters = vec![Filter {
            path: filter.to_owned(),
            qos: QoS::AtMostOnce,
            nolocal: false,
            preserve_retain: false,
            retain_forward_rule: RetainForwardRule::Never,
        }];
        let subscribe = Packet::Subscribe(Subscribe { pkid: 0, filters }, None);
        self.tx.send(&mut vec![subscribe]).await
    }

    /// Closes the link with a DISCONNECT: a session the router stores is
    /// kept (a clean one ends). It does not wait for a backlog: the router
    /// takes a DISCONNECT even from a paused publisher (what it held, never
    /// acknowledged, is dropped).
    pub async fn close(self) -> Result<(), LinkClosed> {
        let mut tx = self.tx.tx;
        tx.send(disconnect_packet())
            .await
            .map(drop)
            .map_err(|_| LinkClosed)
    }
}

impl From<(LinkTx, LinkRx)> for RouterLink {
    fn from((tx, rx): (LinkTx, LinkRx)) -> Self {
        RouterLink::new(tx, rx)
    }
}

/// The DISCONNECT that closes a link.
fn disconnect_packet() -> Packet {
    Packet::Disconnect(
        Disconnect {
            reason_code: DisconnectReasonCode::NormalDisconnection,
        },
        None,
    )
}

/// The sending half of a [`RouterLink`].
pub struct RouterLinkTx {
    tx: LinkTx,
}

impl RouterLinkTx {
    /// Hands `packets` (emptied) to the router in one batch: all but the
    /// last straight into the link's buffer, the last with the
    /// notification. Waits while the router has more than
    /// `MAX_PENDING_TO_ROUTER` packets of this link still to take (as long
    /// as the router holds the link: a paused publisher) and for room in
    /// its event channel; never blocks the thread.
    pub async fn send(&mut self, packets: &mut Vec<Packet>) -> Result<(), LinkClosed> {
        let Some(last) = packets.pop() else {
            return Ok(());
        };
        let mut pause = Duration::from_millis(1);
        while self.tx.buffer().len() >= MAX_PENDING_TO_ROUTER {
            if !self.tx.is_linked() {
                return Err(LinkClosed);
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(BACKLOG_POLL);
        }
        self.tx.buffer().extend(packets.drain(..));
        self.tx.send(last).await.map(drop).map_err(|_| LinkClosed)
    }
}

impl RouterLinkTx {
    /// Publishes `payload` on `topic` at QoS 0 (the only QoS rumqttd takes
    /// from a local link), not retained.
    pub async fn publish(
        &mut self,
        topic: impl Into<Bytes>,
        payload: impl Into<Bytes>,
    ) -> Result<(), LinkClosed> {
        let publish = Publish::new(topic.into(), payload.into(), false);
        self.send(&mut vec![Packet::Publish(publish, None)]).await
    }
}

/// The receiving half of a [`RouterLink`].
pub struct RouterLinkRx {
    rx: LinkRx,
}

impl RouterLinkRx {
    /// The router's next notification. After `Notification::Unschedule`
    /// nothing more comes until [`Self::wake`]. Cancel safe.
    pub async fn next(&mut self) -> Result<Notification, LinkClosed> {
        loop {
            match self.rx.next().await {
                Ok(Some(n)) => return Ok(n),
                // A wake-up with nothing in the buffer.
                Ok(None) => {}
                Err(_) => return Err(LinkClosed),
            }
        }
    }

    /// Waits until notifications are ready to be taken with
    /// [`Self::try_next`] (a wake-up may bring none). Cancel safe; its
    /// future holds no notification, so a connection waiting on an idle
    /// link stays small.
    pub async fn ready(&mut self) -> Result<(), LinkClosed> {
        self.rx
            .wait_for_notifications()
            .await
            .map_err(|_| LinkClosed)
    }

    /// The next notification already received, without waiting.
    pub fn try_next(&mut self) -> Option<Notification> {
        self.rx.try_next()
    }

    /// Tells the router this link takes notifications again (after
    /// `Notification::Unschedule`).
    pub async fn wake(&self) -> Result<(), LinkClosed> {
        self.rx.wake().await.map_err(|_| LinkClosed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const WAIT: Duration = Duration::from_secs(10);

    /// The next notification that is not a wake-up request (answered).
    async fn next(rx: &mut RouterLinkRx) -> Notification {
        loop {
            let n = tokio::time::timeout(WAIT, rx.next())
                .await
                .expect("notification in time")
                .expect("link open");
            match n {
                Notification::Unschedule => rx.wake().await.expect("wake"),
                n => return n,
            }
        }
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_batch_arrives_in_order_and_a_stored_session_is_resumed() {
        let router = RouterHandle::spawn(0, router_config(4));
        assert_eq!(router.sessions(), 4);
        let mut sub = router.link("sub", false).await.expect("link");
        assert!(!sub.session_present());
        sub.subscribe("t/#").await.expect("subscribe");
        assert!(matches!(next(sub.rx()).await, Notification::DeviceAck(_)));

        let mut publisher = router.link("pub", true).await.expect("link");
        let mut batch: Vec<Packet> = (0..3)
            .map(|i| Packet::Publish(Publish::new(format!("t/{i}"), "x".to_owned(), false), None))
            .collect();
        publisher.tx().send(&mut batch).await.expect("sent");
        assert!(batch.is_empty());
        for i in 0..3 {
            match next(sub.rx()).await {
                Notification::Forward(f) => assert_eq!(f.publish.topic, format!("t/{i}")),
                other => panic!("expected a forward, got {other:?}"),
            }
        }

        // Closed with DISCONNECT, the stored session waits for its client id.
        sub.close().await.expect("closed");
        let again = tokio::time::timeout(WAIT, async {
            loop {
                let link = router.link("sub", false).await.expect("link");
                if link.session_present() {
                    return link;
                }
                // The router had not processed the DISCONNECT yet.
                link.close().await.expect("closed");
            }
        })
        .await
        .expect("resumed in time");
        assert!(again.session_present());
    }
}

//! Registration in the online registry and creation of router links, in
//! one order per client id.
//!
//! Both happen under the client id's stripe lock (an async mutex: link
//! creation awaits room in the router's channel, and for a link made at
//! CONNECT the router's ConnAck, without holding a thread), so the
//! registry and the router see competing connections of one client id in
//! the same order. A clean session is linked lazily, and only while its
//! registration is still current. A client id whose last link was stored
//! (`Shared::persistent`) is linked at CONNECT, so a clean session makes the
//! router discard the stored one.

use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::sync::atomic::Ordering;

use rumqttd::protocol::Packet;
use tokio::sync::MutexGuard;

use super::control::ControlTx;
use super::online::{OnlineRegistry, Reservation, SessionInfo};
use super::router_link::RouterLink;
use super::{GatewayError, Identity, Shared};

/// A session that must be linked to the router at registration.
pub(crate) type PendingLink = (SessionInfo, ControlTx, Reservation);

/// The outcome of [`Shared::register_unlinked`].
pub(crate) enum Registration {
    Registered(u64),
    MustLink(Box<PendingLink>),
    Full(usize),
}

/// Undoes a registration unless defused (a link that could not be made, or
/// a task dropped while it waited for the router).
struct Unregister<'a> {
    online: &'a OnlineRegistry,
    client_id: &'a str,
    seq: Option<u64>,
}

impl Drop for Unregister<'_> {
    fn drop(&mut self) {
        if let Some(seq) = self.seq {
            self.online.unregister(self.client_id, seq);
        }
    }
}

impl Shared {
    /// The lock serialising registration and linking of `client_id`.
    pub(crate) async fn stripe(&self, client_id: &str) -> MutexGuard<'_, ()> {
        let mut h = DefaultHasher::new();
        client_id.hash(&mut h);
        self.stripes[(h.finish() as usize) % self.stripes.len()]
            .lock()
            .await
    }

    /// Registers a clean session that needs no router link yet (the client
    /// id has no stored session in the router). A session that must be
    /// linked at once is handed back: stored sessions, and accounts (few,
    /// and subscribing at once: linked at CONNECT, their first SUBSCRIBE
    /// reaches the router without a link's round trip before it, in order
    /// with other clients' packets that follow it).
    pub(crate) async fn register_unlinked(
        &self,
        session: SessionInfo,
        ctrl: ControlTx,
        reservation: Reservation,
    ) -> Registration {
        let _guard = self.stripe(&session.client_id).await;
        let account = matches!(session.identity, Identity::Account { .. });
        if account || session.stored() || self.persistent.lock().contains(&session.client_id) {
            return Registration::MustLink(Box::new((session, ctrl, reservation)));
        }
        match self.online.register_reserved(session, ctrl, reservation) {
            Some(seq) => Registration::Registered(seq),
            None => Registration::Full(self.online.capacity()),
        }
    }

    /// Registers `session` and links it to the router.
    pub(crate) async fn register_linked(
        &self,
        (session, ctrl, reservation): PendingLink,
    ) -> Result<(u64, RouterLink), GatewayError> {
        let cid = session.client_id.clone();
        let clean_start = session.clean_session;
        let stored = session.stored();
        let _guard = self.stripe(&cid).await;
        let seq = self
            .online
            .register_reserved(session, ctrl, reservation)
            .ok_or(GatewayError::Full(self.online.capacity()))?;
        let mut undo = Unregister {
            online: &self.online,
            client_id: &cid,
            seq: Some(seq),
        };
        self.settle_lingering(&cid, clean_start);
        if clean_start && stored && self.persistent.lock().contains(&cid) {
            // A fresh session that the router will store: drop the old one
            // first (a stored link would resume it).
            self.discard_locked(&cid).await?;
        }
        let link = self.link_locked(&cid, !stored, &mut Vec::new()).await?;
        undo.seq = None;
        Ok((seq, link))
    }

    /// Links the registered clean session `seq` of `client_id` to the
    /// router with `first` (emptied: the packets it is linked for, which
    /// the router takes with the link), unless another connection has taken
    /// the client id over (then `None`, and `first` is dropped). The link
    /// is quiet (the router sends it no ConnAck, SubAck or UnsubAck: the
    /// session answers those itself) and is returned once its Connect is in
    /// the router's channel, in order with competing connections of the
    /// client id; a router that refuses it drops it, which the connection
    /// sees as the router closing the link.
    pub(crate) async fn link_registered(
        &self,
        client_id: &str,
        seq: u64,
        first: &mut Vec<Packet>,
    ) -> Result<Option<RouterLink>, GatewayError> {
        let _guard = self.stripe(client_id).await;
        if !self.online.is_current(client_id, seq) {
            first.clear();
            return Ok(None);
        }
        let link = self.router.connect_quiet(client_id, first).await?;
        self.persistent.lock().remove(client_id);
        // Counted from here: the router has the link once it takes the
        // Connect (uncounted when the connection ends, refused or not).
        self.linked.fetch_add(1, Ordering::Relaxed);
        Ok(Some(link))
    }

    /// A session's link is closed (or dropped by the router).
    pub(crate) fn unlinked(&self) {
        self.linked.fetch_sub(1, Ordering::Relaxed);
    }

    /// Makes the router forget the stored session of `client_id` (a clean
    /// link's CONNECT discards it; its DISCONNECT stores nothing). Under the
    /// stripe lock of `client_id`.
    pub(crate) async fn discard_locked(&self, client_id: &str) -> Result<(), GatewayError> {
        let link = self.router.link(client_id, true).await?;
        self.persistent.lock().remove(client_id);
        link.close()
            .await
            .map_err(|e| GatewayError::Router(e.to_string()))
    }

    /// Under the stripe lock of `client_id`.
    async fn link_locked(
        &self,
        client_id: &str,
        clean: bool,
        first: &mut Vec<Packet>,
    ) -> Result<RouterLink, GatewayError> {
        let link = self.router.link_with(client_id, clean, first).await?;
        self.linked.fetch_add(1, Ordering::Relaxed);
        let mut persistent = self.persistent.lock();
        if clean {
            persistent.remove(client_id);
        } else if !persistent.contains(client_id) {
            persistent.insert(client_id.to_owned());
        }
        Ok(link)
    }
}

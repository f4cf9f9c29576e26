//! The online registry: which client ids hold a live session on this broker,
//! and a handle to end any of them with a reason (MQTT 5 DISCONNECT with a
//! reason code and Reason String; MQTT 3.1.1 connections are just closed).
//! Session takeover goes through here too: registering a client id that is
//! already online tells the older connection to close with 0x8E.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;

use super::codes::DisconnectReason;
#[cfg(test)]
use super::control::control_channel;
pub(crate) use super::control::{Control, ControlTx};
use super::lingering::SessionExpiry;
use super::{Identity, ProtocolVersion};
use crate::clock::Millis;

/// What is known about one live session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionInfo {
    pub client_id: String,
    pub identity: Identity,
    pub peer: SocketAddr,
    pub protocol: ProtocolVersion,
    /// Name of the listener that accepted it.
    pub listener: String,
    /// Clean session (MQTT 3.1.1) / clean start (MQTT 5).
    pub clean_session: bool,
    /// How long the router keeps the session once the connection ends.
    pub session_expiry: SessionExpiry,
    pub keep_alive: u16,
    /// When its CONNACK was sent (unix ms, from the gateway's clock).
    pub connected_at: Millis,
}

impl SessionInfo {
    /// Whether the router keeps this session's state when its link closes:
    /// to resume it (clean start off) or for a later connection (expiry).
    pub fn stored(&self) -> bool {
        !self.clean_session || self.session_expiry != SessionExpiry::WithConnection
    }
}

struct Entry {
    seq: u64,
    info: SessionInfo,
    ctrl: ControlTx,
}

/// Live sessions by client id. Cheap to query; all methods are
/// non-blocking and safe from any thread or task.
pub struct OnlineRegistry {
    sessions: Mutex<HashMap<String, Entry>>,
    seq: AtomicU64,
    /// Most sessions at once.
    capacity: usize,
    /// Of `capacity`, how many only accounts may use.
    reserved_for_accounts: AtomicUsize,
    /// Slots held by CONNECTs being authenticated ([`Reservation`]); they
    /// count against `capacity`. Raised only under the `sessions` lock.
    reserved: AtomicUsize,
}

/// A registry slot held for a CONNECT while it is authenticated, so a
/// CONNECT that passes authentication (which may consume an activation
/// code) finds room. Released on drop, or handed to
/// [`OnlineRegistry::register_reserved`].
pub(crate) struct Reservation {
    registry: Arc<OnlineRegistry>,
    /// False when the client id was online at reservation: a takeover
    /// needs no new slot.
    holds_slot: bool,
}

impl Drop for Reservation {
    fn drop(&mut self) {
        if self.holds_slot {
            self.registry.reserved.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

impl Default for OnlineRegistry {
    fn default() -> Self {
        OnlineRegistry::with_capacity(usize::MAX)
    }
}

impl std::fmt::Debug for OnlineRegistry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OnlineRegistry")
            .field("online", &self.len())
            .finish()
    }
}

impl OnlineRegistry {
    pub fn new() -> Self {
        OnlineRegistry::default()
    }

    /// A registry holding at most `capacity` sessions.
    pub fn with_capacity(capacity: usize) -> Self {
        OnlineRegistry {
            sessions: Mutex::default(),
            seq: AtomicU64::new(0),
            capacity,
            reserved_for_accounts: AtomicUsize::new(0),
            reserved: AtomicUsize::new(0),
        }
    }

    /// Holds a slot for a CONNECT naming `client_id` until it registers (or
    /// gives up): `None` if the registry is full (for a listener whose
    /// sessions are not accounts: all but the capacity kept for accounts),
    /// unless `client_id` is online (its takeover needs no new slot).
    pub(crate) fn reserve(self: &Arc<Self>, client_id: &str, account: bool) -> Option<Reservation> {
        let sessions = self.sessions.lock();
        if !client_id.is_empty() && sessions.contains_key(client_id) {
            return Some(Reservation {
                registry: self.clone(),
                holds_slot: false,
            });
        }
        if sessions.len() + self.reserved.load(Ordering::Relaxed) >= self.limit(account) {
            return None;
        }
        self.reserved.fetch_add(1, Ordering::Relaxed);
        Some(Reservation {
            registry: self.clone(),
            holds_slot: true,
        })
    }

    /// [`Self::register`] into the slot `reservation` holds.
    pub(crate) fn register_reserved(
        &self,
        info: SessionInfo,
        ctrl: ControlTx,
        mut reservation: Reservation,
    ) -> Option<u64> {
        self.insert(info, ctrl, Some(&mut reservation))
    }

    /// Most sessions at once.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Keeps `n` of the capacity for account sessions: other sessions are
    /// refused once `capacity - n` sessions are registered, so a flood of
    /// devices cannot lock the operators out.
    pub fn reserve_for_accounts(&self, n: usize) {
        self.reserved_for_accounts.store(n, Ordering::Relaxed);
    }

    /// Sessions an account (or any other session) may find room within.
    fn limit(&self, account: bool) -> usize {
        if account {
            self.capacity
        } else {
            self.capacity
                .saturating_sub(self.reserved_for_accounts.load(Ordering::Relaxed))
        }
    }

    /// The client ids of the live sessions for which `select` is true.
    pub fn client_ids_where(&self, select: impl Fn(&SessionInfo) -> bool) -> Vec<String> {
        self.sessions
            .lock()
            .values()
            .filter(|e| select(&e.info))
            .map(|e| e.info.client_id.clone())
            .collect()
    }

    /// Registers a session and returns its registration number, or `None`
    /// if the registry is full (for sessions other than accounts: all but
    /// the capacity kept for accounts). A session already registered under the same
    /// client id is told to close with 0x8E Session taken over (a takeover
    /// succeeds even when full).
    #[cfg(test)]
    pub(crate) fn register(&self, info: SessionInfo, ctrl: ControlTx) -> Option<u64> {
        self.insert(info, ctrl, None)
    }

    fn insert(
        &self,
        info: SessionInfo,
        ctrl: ControlTx,
        reservation: Option<&mut Reservation>,
    ) -> Option<u64> {
        let seq = self.seq.fetch_add(1, Ordering::Relaxed) + 1;
        let client_id = info.client_id.clone();
        let limit = self.limit(matches!(info.identity, Identity::Account { .. }));
        let old = {
            let mut sessions = self.sessions.lock();
            if let Some(r) = reservation {
                if std::mem::take(&mut r.holds_slot) {
                    // The slot becomes the session's (or is given back).
                    self.reserved.fetch_sub(1, Ordering::Relaxed);
                }
            }
            let taken = sessions.len() + self.reserved.load(Ordering::Relaxed);
            if taken >= limit && !sessions.contains_key(&client_id) {
                return None;
            }
            sessions.insert(client_id, Entry { seq, info, ctrl })
        };
        if let Some(old) = old {
            let _ = old.ctrl.send(Control::Disconnect {
                reason: DisconnectReason::SessionTakenOver,
                message: String::from("another connection took over this session"),
            });
        }
        Some(seq)
    }

    /// Removes the registration `seq` of `client_id`, unless a newer session
    /// has replaced it. Returns whether it was removed.
    pub(crate) fn unregister(&self, client_id: &str, seq: u64) -> bool {
        let mut sessions = self.sessions.lock();
        match sessions.get(client_id) {
            Some(e) if e.seq == seq => {
                sessions.remove(client_id);
                true
            }
            _ => false,
        }
    }

    /// Whether registration `seq` is still the live session of `client_id`.
    pub(crate) fn is_current(&self, client_id: &str, seq: u64) -> bool {
        self.sessions
            .lock()
            .get(client_id)
            .is_some_and(|e| e.seq == seq)
    }

    /// Whether `client_id` has a live session.
    pub fn is_online(&self, client_id: &str) -> bool {
        self.sessions.lock().contains_key(client_id)
    }

    /// The live session of `client_id`.
    pub fn get(&self, client_id: &str) -> Option<SessionInfo> {
        self.sessions.lock().get(client_id).map(|e| e.info.clone())
    }

    /// Every live session (a snapshot).
    pub fn list(&self) -> Vec<SessionInfo> {
        self.sessions
            .lock()
            .values()
            .map(|e| e.info.clone())
            .collect()
    }

    pub fn len(&self) -> usize {
        self.sessions.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Ends the session of `client_id`: MQTT 5 clients get DISCONNECT with
    /// `reason` and `message` as Reason String, then the socket is closed.
    /// Returns false if it is not online. The session's end is reported by
    /// the `device/disconnected` event (for devices).
    pub fn disconnect(&self, client_id: &str, reason: DisconnectReason, message: &str) -> bool {
        match self.sessions.lock().get(client_id) {
            Some(e) => e
                .ctrl
                .send(Control::Disconnect {
                    reason,
                    message: message.to_owned(),
                })
                .is_ok(),
            None => false,
        }
    }

    /// Ends every session for which `select` is true (e.g. all devices of a
    /// deleted product). Returns how many were told to close.
    pub fn disconnect_matching(
        &self,
        select: impl Fn(&SessionInfo) -> bool,
        reason: DisconnectReason,
        message: &str,
    ) -> usize {
        let sessions = self.sessions.lock();
        let mut n = 0;
        for e in sessions.values().filter(|e| select(&e.info)) {
            if e.ctrl
                .send(Control::Disconnect {
                    reason,
                    message: message.to_owned(),
                })
                .is_ok()
            {
                n += 1;
            }
        }
        n
    }

    /// Ends the session of device `product_key`/`device_key`, whatever its
    /// client id. Returns whether one was online.
    pub fn disconnect_device(
        &self,
        product_key: &str,
        device_key: &str,
        reason: DisconnectReason,
        message: &str,
    ) -> bool {
        self.disconnect_matching(
            |s| s.identity.is_device(product_key, device_key),
            reason,
            message,
        ) > 0
    }

    /// Ends every session of devices of `product_key`.
    pub fn disconnect_product(
        &self,
        product_key: &str,
        reason: DisconnectReason,
        message: &str,
    ) -> usize {
        self.disconnect_matching(
            |s| s.identity.product_key() == Some(product_key),
            reason,
            message,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(id: &str) -> SessionInfo {
        SessionInfo {
            client_id: id.to_owned(),
            identity: Identity::Device {
                product_key: "p".into(),
                device_key: id.into(),
            },
            peer: "127.0.0.1:1".parse().expect("addr"),
            protocol: ProtocolVersion::V4,
            listener: "devices".into(),
            clean_session: true,
            session_expiry: SessionExpiry::WithConnection,
            keep_alive: 60,
            connected_at: 0,
        }
    }

    #[test]
    fn takeover_and_unregister() {
        let reg = OnlineRegistry::new();
        let (tx1, mut rx1) = control_channel();
        let (tx2, mut rx2) = control_channel();
        let s1 = reg.register(info("a"), tx1).expect("room");
        assert!(reg.is_online("a"));
        let s2 = reg.register(info("a"), tx2).expect("room");
        assert!(matches!(
            rx1.try_recv(),
            Some(Control::Disconnect {
                reason: DisconnectReason::SessionTakenOver,
                ..
            })
        ));
        assert!(
            !reg.unregister("a", s1),
            "old registration cannot remove new"
        );
        assert!(reg.is_online("a"));
        assert!(reg.disconnect("a", DisconnectReason::AdministrativeAction, "bye"));
        assert!(matches!(rx2.try_recv(), Some(Control::Disconnect { .. })));
        assert!(reg.disconnect_device("p", "a", DisconnectReason::NotAuthorized, ""));
        assert_eq!(reg.list().len(), 1);
        assert!(reg.unregister("a", s2));
        assert!(!reg.is_online("a"));
        assert!(!reg.disconnect("a", DisconnectReason::AdministrativeAction, "bye"));
    }

    #[test]
    fn reserved_capacity_is_for_accounts_only() {
        let reg = OnlineRegistry::with_capacity(3);
        reg.reserve_for_accounts(1);
        let (tx, _rx) = control_channel();
        assert!(reg.register(info("a"), control_channel().0).is_some());
        assert!(reg.register(info("b"), control_channel().0).is_some());
        assert_eq!(
            reg.register(info("c"), control_channel().0),
            None,
            "device past the rest"
        );
        let mut ops = info("acct:ops:1");
        ops.identity = Identity::Account { name: "ops".into() };
        assert!(reg.register(ops.clone(), control_channel().0).is_some());
        assert_eq!(
            reg.client_ids_where(|s| matches!(s.identity, Identity::Account { .. })),
            vec!["acct:ops:1".to_owned()]
        );
        ops.client_id = "acct:ops:2".into();
        assert_eq!(reg.register(ops, tx), None, "full");
    }

    #[test]
    fn device_reservations_leave_the_accounts_share() {
        let reg = Arc::new(OnlineRegistry::with_capacity(3));
        reg.reserve_for_accounts(1);
        let _a = reg.reserve("a", false).expect("room");
        let _b = reg.reserve("b", false).expect("room");
        assert!(reg.reserve("c", false).is_none(), "device past the rest");
        assert!(reg.reserve("acct:ops:1", true).is_some(), "account share");
    }

    #[test]
    fn full_registry_refuses_new_ids_but_allows_takeover() {
        let reg = OnlineRegistry::with_capacity(1);
        let (tx, _rx) = control_channel();
        let first = reg.register(info("a"), control_channel().0).expect("room");
        assert_eq!(reg.register(info("b"), control_channel().0), None);
        let again = reg
            .register(info("a"), control_channel().0)
            .expect("takeover");
        assert!(again > first);
        assert!(reg.unregister("a", again));
        assert!(reg.register(info("b"), tx).is_some());
    }

    #[test]
    fn reservations_count_against_capacity() {
        let reg = Arc::new(OnlineRegistry::with_capacity(2));
        let (tx, _rx) = control_channel();
        let a = reg.reserve("a", false).expect("room");
        let b = reg.reserve("b", false).expect("room");
        assert!(reg.reserve("c", false).is_none(), "two slots held");
        assert_eq!(reg.register(info("c"), control_channel().0), None);
        drop(b);
        let sa = reg
            .register_reserved(info("a"), control_channel().0, a)
            .expect("its slot");
        let b = reg.reserve("b", false).expect("room again");
        assert!(reg.reserve("c", false).is_none());
        // A takeover of an online id needs no slot, even when full.
        let again = reg.reserve("a", false).expect("takeover");
        let sa2 = reg
            .register_reserved(info("a"), control_channel().0, again)
            .expect("takeover");
        assert!(sa2 > sa);
        assert!(reg.register_reserved(info("b"), tx, b).is_some());
        assert_eq!(reg.len(), 2);
        assert!(reg.reserve("c", false).is_none());
    }
}

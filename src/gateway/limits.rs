//! What a listener allows before a session exists: how many connections one
//! source address may hold open without having sent its CONNECT (more are
//! closed at once), and how long the authenticator may take to decide on a
//! CONNECT (then CONNACK 0x89 Server busy / 3.1.1 0x03).

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;

use super::{AuthFuture, Authenticator, ConnectInfo, RefusalCode, Rejection};

/// Connections without CONNECT, per source address.
pub(crate) struct Pending {
    /// Most per source address (0 = unlimited).
    max: usize,
    state: Mutex<PendingState>,
}

#[derive(Default)]
struct PendingState {
    by_source: HashMap<IpAddr, usize>,
    /// Open slots per connection address (normally one; a PROXY header
    /// may repeat an address, which only shares the slot's release).
    by_peer: HashMap<SocketAddr, usize>,
}

/// A connection's place among its source's connections without CONNECT;
/// given back at its CONNECT or when it ends, whichever is first.
pub(crate) struct Slot {
    pending: Arc<Pending>,
    peer: SocketAddr,
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.pending.leave(self.peer);
    }
}

impl Pending {
    pub(crate) fn new(max: usize) -> Arc<Pending> {
        Arc::new(Pending {
            max,
            state: Mutex::default(),
        })
    }

    /// A slot for a new connection from `peer`, or `None` when its source
    /// already holds the most connections without CONNECT.
    pub(crate) fn enter(self: &Arc<Self>, peer: SocketAddr) -> Option<Slot> {
        if self.max > 0 {
            let mut st = self.state.lock();
            let n = st.by_source.entry(peer.ip()).or_insert(0);
            if *n >= self.max {
                return None;
            }
            *n += 1;
            *st.by_peer.entry(peer).or_insert(0) += 1;
        }
        Some(Slot {
            pending: self.clone(),
            peer,
        })
    }

    /// The connection from `peer` sent its CONNECT (or ended).
    fn leave(&self, peer: SocketAddr) {
        if self.max == 0 {
            return;
        }
        let mut st = self.state.lock();
        let Some(k) = st.by_peer.get_mut(&peer) else {
            return;
        };
        *k -= 1;
        if *k == 0 {
            st.by_peer.remove(&peer);
        }
        if let Some(n) = st.by_source.get_mut(&peer.ip()) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                st.by_source.remove(&peer.ip());
            }
        }
    }

    /// Connections from `ip` without CONNECT.
    #[cfg(test)]
    fn of(&self, ip: IpAddr) -> usize {
        self.state.lock().by_source.get(&ip).copied().unwrap_or(0)
    }
}

/// The listener's authenticator as connections see it: a CONNECT gives its
/// connection's slot back, and the decision has a deadline.
pub(crate) struct Guarded {
    pub(crate) inner: Arc<dyn Authenticator>,
    pub(crate) timeout: Duration,
    pub(crate) pending: Arc<Pending>,
}

impl Authenticator for Guarded {
    fn admits_accounts(&self) -> bool {
        self.inner.admits_accounts()
    }

    fn authenticate(&self, info: ConnectInfo) -> AuthFuture {
        self.pending.leave(info.peer);
        let decision = self.inner.authenticate(info);
        let limit = self.timeout;
        Box::pin(async move {
            match tokio::time::timeout(limit, decision).await {
                Ok(d) => d,
                Err(_) => Err(Rejection::new(
                    RefusalCode::ServerBusy,
                    format!(
                        "the broker could not authenticate the CONNECT within {} s; try again later",
                        limit.as_secs_f32()
                    ),
                )),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_per_source_come_back_once() {
        let p = Pending::new(2);
        let a: SocketAddr = "10.0.0.1:1".parse().expect("addr");
        let b: SocketAddr = "10.0.0.1:2".parse().expect("addr");
        let c: SocketAddr = "10.0.0.1:3".parse().expect("addr");
        let other: SocketAddr = "10.0.0.2:1".parse().expect("addr");
        let sa = p.enter(a).expect("first");
        let sb = p.enter(b).expect("second");
        assert!(p.enter(c).is_none(), "third from the same source");
        let _so = p.enter(other).expect("another source");
        p.leave(a); // its CONNECT
        assert_eq!(p.of(a.ip()), 1);
        drop(sa); // its end: nothing more to give back
        assert_eq!(p.of(a.ip()), 1);
        let _sc = p.enter(c).expect("room again");
        drop(sb);
        assert_eq!(p.of(a.ip()), 1);
        assert!(p.enter(b).is_some());
        let unlimited = Pending::new(0);
        let slots: Vec<_> = (0..100).filter_map(|_| unlimited.enter(a)).collect();
        assert_eq!(slots.len(), 100);
    }
}

//! A graceful stop of every session (SIGTERM/SIGINT): connections end as
//! the protocol says for a server that goes away, and their wills reach
//! the subscribers still connected.
//!
//! 1. Device sessions are told to end: MQTT 5 clients get DISCONNECT 0x8B
//!    "Server shutting down", MQTT 3.1.1 connections are closed; neither
//!    sent DISCONNECT, so each will is published (MQTT 3.1.1 §3.1.2.5,
//!    MQTT 5 §3.1.2.5). Wills still waiting out an MQTT 5 Will Delay
//!    Interval go out now too, and from now on a connection that ends
//!    publishes its will without waiting: the session ends with the server. This
//!    phase ends when no device is online, no connection is still ending
//!    and every such will is handed to the router (or at the deadline).
//! 2. If wills went out and accounts (backends) are still connected, they
//!    stay connected for [`WILL_DELIVERY`] so that the router forwards the
//!    wills to them and their connections write them out.
//! 3. Every other session is told to end the same way, and the stop waits
//!    for them to end (or for the deadline).
//!
//! The listeners stop accepting before this and close after it.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::oneshot;
use tokio::time::Instant;

use super::{DisconnectReason, Gateway, Identity, Shared};

/// How long accounts stay connected after the devices' wills were handed to
/// the router, for it to forward them.
pub const WILL_DELIVERY: Duration = Duration::from_millis(500);
/// How often the stop checks whether its sessions have ended.
const POLL: Duration = Duration::from_millis(20);
const MESSAGE: &str = "server shutting down";

/// Counts a connection from the moment it starts ending (unregistered) to
/// the moment its will is handed to the router.
pub(crate) struct Ending(Arc<Shared>);

impl Ending {
    pub(crate) fn start(gw: &Arc<Shared>) -> Ending {
        gw.ending.fetch_add(1, Ordering::SeqCst);
        Ending(gw.clone())
    }
}

impl Drop for Ending {
    fn drop(&mut self) {
        self.0.ending.fetch_sub(1, Ordering::SeqCst);
    }
}

/// What a graceful stop did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Stopped {
    /// Device sessions told to end.
    pub devices: usize,
    /// Other sessions (accounts) told to end.
    pub others: usize,
    /// Wills published during the stop.
    pub wills: u64,
    /// Whether every session ended before the deadline.
    pub complete: bool,
}

fn is_device(identity: &Identity) -> bool {
    matches!(identity, Identity::Device { .. })
}

impl Gateway {
    /// Ends every session gracefully within `limit` (see the module docs).
    /// Call after the listeners stopped accepting.
    pub async fn stop_sessions(&self, limit: Duration) -> Stopped {
        let gw = &self.shared;
        let deadline = Instant::now() + limit;
        let wills_before = gw.wills_published.load(Ordering::SeqCst);
        // From here a connection that ends publishes its will at once.
        gw.stopping.store(true, Ordering::SeqCst);
        let online = gw.online.clone();
        let devices = online.disconnect_matching(
            |s| is_device(&s.identity),
            DisconnectReason::ServerShuttingDown,
            MESSAGE,
        );
        // Delayed wills go out now. Each turn looks again: a session may have
        // started lingering just before `stopping` was set. A handshake in
        // flight may register a device after the first call.
        let mut delayed = Vec::new();
        let mut complete = wait(deadline, || {
            delayed.extend(gw.end_delayed_wills());
            delayed.retain_mut(|done| {
                matches!(done.try_recv(), Err(oneshot::error::TryRecvError::Empty))
            });
            online.disconnect_matching(
                |s| is_device(&s.identity),
                DisconnectReason::ServerShuttingDown,
                MESSAGE,
            );
            // A session stays registered until its end has begun (`Ending`).
            online
                .client_ids_where(|s| is_device(&s.identity))
                .is_empty()
                && gw.ending.load(Ordering::SeqCst) == 0
                && delayed.is_empty()
        })
        .await;
        let wills = gw.wills_published.load(Ordering::SeqCst) - wills_before;
        if wills > 0 && !online.is_empty() {
            tokio::time::sleep_until(deadline.min(Instant::now() + WILL_DELIVERY)).await;
        }
        let others =
            online.disconnect_matching(|_| true, DisconnectReason::ServerShuttingDown, MESSAGE);
        complete &= wait(deadline, || {
            online.disconnect_matching(|_| true, DisconnectReason::ServerShuttingDown, MESSAGE);
            online.is_empty() && gw.ending.load(Ordering::SeqCst) == 0
        })
        .await;
        Stopped {
            devices,
            others,
            wills: gw.wills_published.load(Ordering::SeqCst) - wills_before,
            complete,
        }
    }
}

/// Polls `done` until it holds (true) or the deadline passes (false).
async fn wait(deadline: Instant, mut done: impl FnMut() -> bool) -> bool {
    loop {
        if done() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(POLL).await;
    }
}

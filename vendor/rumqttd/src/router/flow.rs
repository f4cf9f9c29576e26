//! Lossless flow control for online QoS 1/2 readers (PATCHES.md, section 9).
//!
//! A filter's log keeps `max_segment_count` segments in memory; an append to
//! a full log drops the oldest segment, and 0.20.0 then jumped every reader
//! still in it to the new head, losing what it had not read. Now, when the
//! next append to a filter would drop a segment that an online QoS 1/2
//! reader has not finished, the publishing connection is paused instead: the
//! publish and everything after it stay in its link's buffer (acks of what
//! it receives still pass, see [`passes_pause`]), so its sender waits and
//! TCP pushes back on the client. Its publishers resume when no such reader
//! is left in that segment (it read on, unsubscribed or disconnected), or
//! once the filter has held publishers for `max_publisher_stall_ms`: then
//! the readers still there are treated like offline ones — the segment is
//! dropped, their cursor jumps and the jump is logged with the count lost.
//! A reader whose cursor has already fallen off the log (jumped, and not
//! read since) holds nobody back until it reads again, so a stalled reader
//! costs publishers one stall, not one per segment. Offline sessions and
//! QoS 0 readers never hold publishers back.
//!
//! Cost: two comparisons per filter a publish matches; the readers of a
//! filter are looked at only when its log is full (about once per segment
//! appended) and while publishers wait for it.

use std::collections::{HashMap, HashSet, VecDeque};
use std::time::{Duration, Instant};

use tracing::{info, warn};

use super::{extract_group, Router};
use crate::protocol::Packet;
use crate::router::scheduler::Scheduler;
use crate::router::shared_subs::SharedGroup;
use crate::router::{DataRequest, FilterIdx, FleetMap};
use crate::{ConnectionId, Filter};

/// Publishers paused on the filters they publish into.
pub(super) struct Flow {
    max_stall: Duration,
    /// Filters whose next append waits for a reader, and who waits
    blocked: HashMap<FilterIdx, Blocked>,
    /// Paused publishers and the filter each waits for
    paused: HashMap<ConnectionId, FilterIdx>,
    /// Filters whose stall expired: their next append drops a segment
    /// whoever still reads it
    forced: HashSet<FilterIdx>,
    /// A reader of a blocked filter advanced, or a connection left
    recheck: bool,
}

struct Blocked {
    since: Instant,
    publishers: Vec<ConnectionId>,
}

/// Whether a packet of a paused connection is handled at once: the acks of
/// what the router sends it (a publisher may also be the reader everyone
/// waits for), pings, SUBSCRIBE and UNSUBSCRIBE (in effect for every
/// publish the router takes after the packet that carried them, so an
/// embedding server may acknowledge them itself once they are sent: a
/// held PUBLISH of the same client is matched against them when it goes
/// on), and a DISCONNECT (which drops the held packets; nothing held was
/// acknowledged).
pub(super) fn passes_pause(packet: &Packet) -> bool {
    matches!(
        packet,
        Packet::PubAck(..)
            | Packet::PubRec(..)
            | Packet::PubComp(..)
            | Packet::PingReq(..)
            | Packet::Subscribe(..)
            | Packet::Unsubscribe(..)
            | Packet::Disconnect(..)
    )
}

impl Flow {
    pub(super) fn new(max_stall_ms: u64) -> Flow {
        Flow {
            max_stall: Duration::from_millis(max_stall_ms),
            blocked: HashMap::new(),
            paused: HashMap::new(),
            forced: HashSet::new(),
            recheck: false,
        }
    }

    pub(super) fn is_paused(&self, id: ConnectionId) -> bool {
        !self.paused.is_empty() && self.paused.contains_key(&id)
    }

    /// A reader of `idx` read from it: look at the filter again if it
    /// holds publishers back.
    pub(super) fn advanced(&mut self, idx: FilterIdx) {
        if !self.blocked.is_empty() && self.blocked.contains_key(&idx) {
            self.recheck = true;
        }
    }

    /// A reader may have gone (unsubscribe).
    pub(super) fn reader_left(&mut self) {
        self.recheck |= !self.blocked.is_empty();
    }

    /// Connection `id` is gone: it waits for nothing, and it may have been
    /// the reader others wait for.
    pub(super) fn forget(&mut self, id: ConnectionId) {
        if let Some(idx) = self.paused.remove(&id) {
            if let Some(b) = self.blocked.get_mut(&idx) {
                b.publishers.retain(|p| *p != id);
            }
        }
        self.reader_left();
    }

    /// Pauses publisher `id` until the next append to `idx` loses nothing.
    pub(super) fn pause(&mut self, id: ConnectionId, idx: FilterIdx, filter: &str) {
        let since = Instant::now();
        let blocked = self.blocked.entry(idx).or_insert_with(|| {
            info!(
                filter,
                "Publishers into {filter} paused: an online QoS 1/2 reader has not read the oldest segment of its full log"
            );
            Blocked {
                since,
                publishers: Vec::new(),
            }
        });
        blocked.publishers.push(id);
        self.paused.insert(id, idx);
    }

    /// Whether the next append to `idx` may drop its oldest segment
    /// (`at_risk`: readers that would lose entries).
    pub(super) fn may_drop(&mut self, idx: FilterIdx, at_risk: impl FnOnce() -> usize) -> bool {
        if !self.forced.is_empty() && self.forced.remove(&idx) {
            return true;
        }
        if !self.blocked.is_empty() && self.blocked.contains_key(&idx) {
            // Others wait already; they go first when it resumes
            return false;
        }
        at_risk() == 0
    }

    /// When the router must look at the blocked filters even if nothing
    /// happens: the earliest end of a stall.
    pub(super) fn deadline(&self) -> Option<Instant> {
        self.blocked
            .values()
            .map(|b| b.since + self.max_stall)
            .min()
    }

    fn due(&self, now: Instant) -> bool {
        self.recheck || self.deadline().is_some_and(|d| d <= now)
    }
}

/// Where the requests of online readers are: `Router::scheduler`'s
/// trackers, and `Router::notifications` (woken from the waiters by an
/// append of the batch being handled). A request parked in the waiters has
/// read everything: any append wakes it.
pub(super) struct Readers<'a> {
    pub(super) scheduler: &'a Scheduler,
    pub(super) woken: &'a VecDeque<(ConnectionId, DataRequest)>,
    pub(super) shared: &'a HashMap<String, SharedGroup>,
    pub(super) subscriptions: &'a FleetMap<Filter, HashSet<ConnectionId>>,
}

impl Readers<'_> {
    /// The pending QoS 1/2 requests on filter `idx` in connection `id`'s
    /// tracker.
    fn tracked(&self, id: ConnectionId, idx: FilterIdx) -> impl Iterator<Item = &DataRequest> {
        self.scheduler
            .trackers
            .get(id)
            .into_iter()
            .flat_map(|t| t.data_requests.iter())
            .filter(move |r| r.filter_idx == idx && r.qos > 0)
    }

    /// The woken QoS 1/2 requests on filter `idx`.
    fn woken(&self, idx: FilterIdx) -> impl Iterator<Item = &DataRequest> {
        self.woken
            .iter()
            .map(|(_, r)| r)
            .filter(move |r| r.filter_idx == idx && r.qos > 0)
    }
}

/// Online QoS 1/2 readers of filter `idx` (`filter`) whose cursor is in
/// the segment the next append drops (`(head, end)`, see
/// `CommitLog::next_append_drops`), shared groups counted once. Costs the
/// filter's subscribers, the woken requests and the share groups.
pub(super) fn readers_at_risk(
    readers: &Readers<'_>,
    idx: FilterIdx,
    filter: &str,
    (head, end): (u64, u64),
) -> usize {
    let Readers {
        shared,
        subscriptions,
        ..
    } = readers;
    let at_risk = |cursor: (u64, u64)| cursor.0 == head && cursor.1 < end;
    let mut n = readers
        .woken(idx)
        .filter(|r| r.group.is_none() && at_risk(r.cursor))
        .count();
    if let Some(ids) = subscriptions.get(filter) {
        for id in ids {
            n += readers
                .tracked(*id, idx)
                .filter(|r| r.group.is_none() && at_risk(r.cursor))
                .count();
        }
    }
    if shared.is_empty() {
        return n;
    }
    // Share groups on this filter with an online QoS 1/2 member
    let woken_groups: HashSet<&str> = readers
        .woken(idx)
        .filter(|r| r.group.is_some())
        .map(|r| r.filter.as_str())
        .collect();
    for (key, group) in shared.iter() {
        if !at_risk(group.cursor) || !extract_group(key).is_some_and(|(_, f)| f == filter) {
            continue;
        }
        let online = woken_groups.contains(key.as_str())
            || subscriptions.get(key).is_some_and(|ids| {
                ids.iter()
                    .any(|id| readers.tracked(*id, idx).any(|r| r.filter == *key))
            });
        if online {
            n += 1;
        }
    }
    n
}

impl Router {
    /// Resumes the publishers of every blocked filter that no reader holds
    /// back any more, or whose stall expired (its readers then jump).
    pub(super) fn resume_publishers(&mut self) {
        let now = Instant::now();
        if !self.flow.due(now) {
            return;
        }
        self.flow.recheck = false;
        let idxs: Vec<FilterIdx> = self.flow.blocked.keys().copied().collect();
        let mut resumed = Vec::new();
        for idx in idxs {
            let (risk, filter) = match self.datalog.native.get(idx) {
                Some(data) => {
                    let readers = Readers {
                        scheduler: &self.scheduler,
                        woken: &self.notifications,
                        shared: &self.shared_subscriptions,
                        subscriptions: &self.subscription_map,
                    };
                    let risk = data.log.next_append_drops().map_or(0, |drop| {
                        readers_at_risk(&readers, idx, data.filter(), drop)
                    });
                    (risk, data.filter().to_owned())
                }
                None => (0, String::new()),
            };
            let Some(blocked) = self.flow.blocked.get(&idx) else {
                continue;
            };
            let stalled = now.duration_since(blocked.since);
            if risk > 0 && stalled < self.flow.max_stall {
                continue;
            }
            if risk > 0 {
                warn!(
                    filter,
                    readers = risk,
                    stalled_ms = stalled.as_millis() as u64,
                    "Readers of {filter} stalled its publishers for {} ms: they are treated as offline (their cursor jumps, the loss is logged when they read)",
                    stalled.as_millis()
                );
                self.flow.forced.insert(idx);
            } else {
                info!(filter, "Publishers into {filter} resumed");
            }
            if let Some(blocked) = self.flow.blocked.remove(&idx) {
                resumed.extend(blocked.publishers);
            }
        }
        for id in resumed {
            self.flow.paused.remove(&id);
            if self.ibufs.contains(id) {
                // What it sent meanwhile waits in its link's buffer
                self.handle_device_payload(id);
            }
        }
    }
}

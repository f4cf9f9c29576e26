//! The single writer of a node on the etcd store: group commit over the
//! network. It drains pending requests, first takes in what other nodes
//! committed (the watch's changes), applies the requests to the replica
//! with the same rules as on sled (consuming through this node's lanes,
//! `lanes.rs`), and commits the batch's records in one etcd transaction
//! guarded by the revisions of the keys it wrote and read (`etcd_fence.rs`).
//! Answers, the fast view and events follow only a committed transaction.
//! When another node's liveness key goes (its lease expired), its lanes
//! are returned to the pool, guarded by their revisions and the key's
//! absence.
//!
//! - Refused as stale (another node changed a key the batch wrote or
//!   read): the batch is undone in the replica from its records'
//!   pre-images, read right after the refusal (`undo.rs`); the replica
//!   catches up to the newest revision of the guarded keys from the
//!   watch's queued changes (a bounded wait), and the same requests are decided again, a few
//!   times at most. Cost: the batch and the commits missed, not the
//!   ledger. The whole replica is reloaded only if the watch does not
//!   deliver in time, lost changes (compaction), or the pre-images are
//!   gone (compacted).
//! - Outcome unknown (timeout, leader change, lost connection): nothing
//!   that consumed a code is answered with success (the device gets
//!   "unavailable" and retries; the retry is idempotent: committed or
//!   not, the replica reloaded from etcd decides it again), and the
//!   replica, which may hold the batch, is reloaded (all of it: unknown
//!   outcomes are rare) before the next decision.
//!
//! Unlike sled, a failure is not final: every later batch tries again.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::RwLock;
use tokio::sync::{broadcast, mpsc, oneshot};

use super::backup::Snapshot;
use super::etcd::{Commit, EtcdStore, Remote};
use super::etcd_fence::{self, Position};
use super::fast::FastView;
use super::records::{Removal, Write};
use super::state::{Dirty, LaneMode, State};
use super::writer::{answer_unavailable, apply_one, finish_with, publish_fast, Answer, Request};
use super::{LedgerError, LedgerOptions};
use crate::clock::Clock;
use crate::events::{Event, EventBus};

#[path = "etcd_reclaim.rs"]
mod reclaim;

/// Most records one transaction writes (etcd runs with `--max-txn-ops
/// 1024`: a transaction compares about as many keys as it writes, and
/// after a refusal one read takes every guarded key and every written
/// record's pre-image).
const MAX_WRITES: usize = 400;
/// Most requests decided in one batch.
const MAX_BATCH: usize = 256;
/// Stale refusals in a row before a batch is answered "unavailable" (also
/// answered so once the store's timeout has passed since the first try).
/// A retry costs the batch and the commits missed, not a reload: a node
/// that keeps losing to a busy one retries often, so it wins a turn.
const MAX_ATTEMPTS: usize = 64;

pub struct EtcdContext {
    pub store: EtcdStore,
    /// Where the replica stands in etcd's history.
    pub pos: Position,
    /// How this node consumes: its lanes.
    pub lanes: LaneMode,
    /// Nodes whose liveness key exists.
    pub live_nodes: BTreeSet<String>,
    /// Set when a node may have died holding codes in its lanes.
    pub reclaim: bool,
    pub read_only: Arc<AtomicBool>,
    pub state: Arc<RwLock<State>>,
    pub fast: Arc<FastView>,
    pub clock: Clock,
    pub events: EventBus,
    pub options: LedgerOptions,
    /// Devices and products other nodes deleted, for the enforcer.
    pub removals: broadcast::Sender<Removal>,
}

pub fn run(mut ctx: EtcdContext, mut rx: mpsc::Receiver<Request>) {
    let max_batch = ctx.options.max_batch.clamp(1, MAX_BATCH);
    // Set while the replica may differ from etcd: reloaded before deciding.
    let mut stale = false;
    while let Some(first) = rx.blocking_recv() {
        let mut requests = Vec::new();
        let mut next = Some(first);
        while let Some(r) = next.take() {
            match r {
                Request::Remote(change) => ctx.take_remote(change, &mut stale),
                Request::Snapshot { reply } => refuse_snapshot(reply),
                other => requests.push(other),
            }
            if requests.len() < max_batch {
                next = rx.try_recv().ok();
            }
        }
        if ctx.reclaim && !stale {
            ctx.reclaim_dead(&mut stale);
        }
        if requests.is_empty() {
            continue;
        }
        if stale {
            match ctx.reload() {
                Ok(()) => stale = false,
                Err(e) => {
                    for r in requests {
                        answer_unavailable(r, &e);
                    }
                    continue;
                }
            }
        }
        if ctx.read_only.load(Ordering::SeqCst) {
            let e = LedgerError::Unavailable("the ledger is read-only".into());
            for r in requests {
                answer_unavailable(r, &e);
            }
            continue;
        }
        ctx.commit_requests(requests, &mut rx, &mut stale);
    }
}

impl EtcdContext {
    /// Takes in another node's commit (or reloads when told to).
    fn take_remote(&mut self, change: Remote, stale: &mut bool) {
        let (revision, writes) = match change {
            Remote::Reload(why) => {
                tracing::info!(
                    node = self.store.node(),
                    why,
                    "reloading the ledger replica"
                );
                *stale = true;
                return;
            }
            Remote::Changes { revision, writes } => (revision, writes),
        };
        if *stale || revision <= self.pos.seen() {
            // Read by a reload, or a reload will read it.
            return;
        }
        if self.pos.is_own(revision) {
            // This node's own commit: already in the replica.
            self.pos.advance(revision);
            return;
        }
        let (nodes, writes): (Vec<Write>, Vec<Write>) = writes
            .into_iter()
            .partition(|(k, _)| etcd_fence::liveness(k).is_some());
        for (k, v) in nodes {
            let Some(node) = etcd_fence::liveness(&k) else {
                continue;
            };
            if v.is_some() {
                self.live_nodes.insert(node);
            } else {
                tracing::info!(
                    node = self.store.node(),
                    dead = node,
                    "a node's lease expired"
                );
                self.live_nodes.remove(&node);
                self.reclaim = true;
            }
        }
        let mut st = self.state.write();
        let mut touched = Dirty::default();
        match st.apply_remote(&writes, &mut touched) {
            Ok(removed) => {
                self.pos.advance(revision);
                publish_fast(&self.fast, &st, &touched);
                drop(st);
                for r in removed {
                    let _ = self.removals.send(r);
                }
            }
            Err(e) => {
                tracing::warn!(node = self.store.node(), error = %e, "a remote change did not apply; reloading");
                *stale = true;
            }
        }
    }

    /// Reads the whole ledger from etcd into the replica.
    fn reload(&mut self) -> Result<(), LedgerError> {
        metrics::counter!("activation_ledger_replica_reloads_total").increment(1);
        let loaded = self.store.load()?;
        let mut fresh = State::from_records(loaded.records.into_iter().map(Ok))?;
        fresh.set_lane_mode(self.lanes.clone());
        let mut st = self.state.write();
        let removed = removals_between(&st, &fresh);
        *st = fresh;
        self.pos = Position::new(loaded.revision);
        self.live_nodes = loaded.live_nodes;
        self.reclaim = true;
        self.fast.refresh_all(&st);
        drop(st);
        for r in removed {
            let _ = self.removals.send(r);
        }
        Ok(())
    }

    /// Decides and commits `requests`, as several transactions if their
    /// records would not fit in one.
    fn commit_requests(
        &mut self,
        requests: Vec<Request>,
        rx: &mut mpsc::Receiver<Request>,
        stale: &mut bool,
    ) {
        let mut queue = requests;
        while !queue.is_empty() {
            let mut attempt = 0;
            let give_up = Instant::now() + self.store.timeout();
            loop {
                attempt += 1;
                match self.try_commit(&mut queue) {
                    Ok(()) => break,
                    Err(Failed::Stale(refusal)) => {
                        if let Err(e) = self.catch_up(refusal, rx, &mut queue, stale) {
                            tracing::warn!(node = self.store.node(), error = %e, "catching up with etcd failed");
                            *stale = true;
                            return fail_all(queue, &e);
                        }
                        if attempt >= MAX_ATTEMPTS || Instant::now() > give_up {
                            tracing::warn!(
                                node = self.store.node(),
                                attempts = attempt,
                                requests = queue.len(),
                                "refused as stale every time; the batch is answered unavailable"
                            );
                            let e = LedgerError::Unavailable(
                                "other nodes committed first every time; try again".into(),
                            );
                            return fail_all(queue, &e);
                        }
                        // Nodes refused in turn would go on colliding: a
                        // short random pause, growing with the attempts,
                        // parts them.
                        let cap = 1u64 << attempt.min(4);
                        let pause = rand::Rng::gen_range(&mut rand::thread_rng(), 0..=cap);
                        std::thread::sleep(Duration::from_millis(pause));
                        // Commits that arrived during the pause: taken in
                        // now, so the next try is decided on them.
                        self.drain(rx, &mut queue, stale);
                        if *stale {
                            if let Err(e) = self.reload() {
                                return fail_all(queue, &e);
                            }
                            *stale = false;
                        }
                    }
                    Err(Failed::Unknown) => {
                        // The replica may hold a batch etcd does not.
                        if let Err(e) = self.reload() {
                            tracing::warn!(error = %e, "reloading the replica failed");
                            *stale = true;
                        }
                        break;
                    }
                }
            }
        }
    }

    /// After a stale refusal (the batch already undone, or not): brings
    /// the replica up to the revision that refused the batch, from the watch's changes
    /// (waiting for them at most the store's timeout); reloads the whole
    /// replica only if they do not come, the watch lost changes, or the
    /// batch could not be undone. Requests that arrive meanwhile join
    /// `queue`.
    fn catch_up(
        &mut self,
        refusal: StaleRefusal,
        rx: &mut mpsc::Receiver<Request>,
        queue: &mut Vec<Request>,
        stale: &mut bool,
    ) -> Result<(), LedgerError> {
        if !refusal.undone {
            *stale = true;
        }
        let deadline = Instant::now() + self.store.timeout();
        while !*stale && self.pos.seen() < refusal.wait {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.store.wait_for(left, rx.recv()) {
                Some(Some(r)) => self.take(r, queue, stale),
                Some(None) => {
                    return Err(LedgerError::Unavailable("the ledger is closing".into()));
                }
                None => {
                    tracing::warn!(
                        node = self.store.node(),
                        at = self.pos.seen(),
                        wait = refusal.wait,
                        "the watch did not bring the replica up to the refusing commit in time; reloading"
                    );
                    *stale = true;
                }
            }
        }
        if *stale {
            self.reload()?;
            *stale = false;
        } else {
            debug_check(&self.state.read(), "catching up after a stale refusal");
        }
        Ok(())
    }

    /// Takes in everything already queued: other nodes' commits, and
    /// requests (into `queue`).
    fn drain(
        &mut self,
        rx: &mut mpsc::Receiver<Request>,
        queue: &mut Vec<Request>,
        stale: &mut bool,
    ) {
        while let Ok(r) = rx.try_recv() {
            self.take(r, queue, stale);
        }
    }

    fn take(&mut self, r: Request, queue: &mut Vec<Request>, stale: &mut bool) {
        match r {
            Request::Remote(change) => self.take_remote(change, stale),
            Request::Snapshot { reply } => refuse_snapshot(reply),
            other => queue.push(other),
        }
    }

    /// Decides the head of `queue` (as many requests as fit in one
    /// transaction) and commits it. On success or unknown outcome those
    /// requests are answered and taken off the queue; when stale, nothing
    /// is answered and the caller reloads and tries again.
    fn try_commit(&mut self, queue: &mut Vec<Request>) -> Result<(), Failed> {
        let now = self.clock.now();
        let pool_low = self.options.pool_low_threshold;
        let mut events: Vec<Event> = Vec::new();
        let mut answers: Vec<Answer> = Vec::new();
        let mut st = self.state.write();
        for r in queue.iter() {
            answers.push(apply_one(&mut st, r, now, &mut events, pool_low));
            if st.dirty.len() >= MAX_WRITES {
                break;
            }
        }
        let n = answers.len();
        let mut writes = Vec::with_capacity(st.dirty.len());
        let dirty = match st.drain_dirty(&mut |w| writes.push(w)) {
            Ok(d) => d,
            Err(e) => {
                drop(st);
                for (r, a) in queue.drain(..n).zip(answers) {
                    r.fail(a, &e);
                }
                return Err(Failed::Unknown);
            }
        };
        let (guards, head) = etcd_fence::guards(&self.pos, &st, &writes, &answers[..n]);
        if guards.is_empty() {
            // Nothing written, nothing read that another node changes.
            drop(st);
            let mut done: Vec<Request> = queue.drain(..n).collect();
            finish_with(&self.events, &mut done, answers, events);
            return Ok(());
        }
        let pre: Vec<i64> = writes
            .iter()
            .map(|(k, _)| self.pos.pre_image_at(k))
            .collect();
        let mut keys: Vec<Vec<u8>> = writes.iter().map(|(k, _)| k.clone()).collect();
        if head {
            keys.push(super::etcd::HEAD.to_vec());
        }
        let wrote = !writes.is_empty();
        let started = std::time::Instant::now();
        match self.store.commit(writes, &pre, &guards, head) {
            Commit::Done(revision) => {
                if wrote {
                    metrics::histogram!("activation_ledger_commit_seconds")
                        .record(started.elapsed().as_secs_f64());
                    metrics::histogram!("activation_ledger_batch_size").record(n as f64);
                    self.pos.committed(revision, keys);
                }
                publish_fast(&self.fast, &st, &dirty);
                drop(st);
                let mut done: Vec<Request> = queue.drain(..n).collect();
                finish_with(&self.events, &mut done, answers, events);
                Ok(())
            }
            Commit::Stale(refused) => {
                metrics::counter!("activation_ledger_commit_conflicts_total").increment(1);
                let undone = match &refused.before {
                    Some(before) => {
                        let mut touched = Dirty::default();
                        match st.undo(before, &mut touched) {
                            Ok(()) => {
                                debug_check(&st, "undoing a refused batch");
                                true
                            }
                            Err(e) => {
                                tracing::warn!(node = self.store.node(), error = %e, "undoing a refused batch failed; reloading");
                                false
                            }
                        }
                    }
                    None => false,
                };
                Err(Failed::Stale(StaleRefusal {
                    wait: refused.wait,
                    undone,
                }))
            }
            Commit::Unknown(why) => {
                drop(st);
                tracing::warn!(node = self.store.node(), reason = %why, "etcd commit outcome unknown; the batch's devices retry");
                let e = LedgerError::Unavailable(format!(
                    "the ledger commit's outcome is unknown ({why}); try again"
                ));
                for (r, a) in queue.drain(..n).zip(answers) {
                    r.fail(a, &e);
                }
                Err(Failed::Unknown)
            }
        }
    }
}

/// A backup of an etcd ledger is etcd's.
fn refuse_snapshot(reply: oneshot::Sender<Result<Snapshot, LedgerError>>) {
    let _ = reply.send(Err(LedgerError::Unavailable(
        "an etcd ledger is backed up with etcd's own snapshots \
         (etcdctl snapshot save), not by the broker"
            .into(),
    )));
}

enum Failed {
    Stale(StaleRefusal),
    Unknown,
}

/// A stale refusal, as the writer goes on from it.
struct StaleRefusal {
    /// The newest revision of the keys that refused the batch: the
    /// replica catches up to it.
    wait: i64,
    /// Whether the replica is back where the batch started; if not, the
    /// whole replica is reloaded.
    undone: bool,
}

/// In debug builds: the replica's invariants hold after `after`.
pub(super) fn debug_check(st: &State, after: &str) {
    if cfg!(debug_assertions) {
        if let Err(e) = st.check_invariants() {
            panic!("the ledger replica is inconsistent after {after}: {e}");
        }
    }
}

fn fail_all(queue: Vec<Request>, e: &LedgerError) {
    for r in queue {
        answer_unavailable(r, e);
    }
}

/// Devices and products live in `old` and deleted in `new`.
fn removals_between(old: &State, new: &State) -> Vec<Removal> {
    let mut out = Vec::new();
    let mut gone_products = BTreeSet::new();
    for (pk, p) in &old.products {
        let deleted = new.products.get(pk).is_none_or(|n| n.deleted_at.is_some());
        if p.deleted_at.is_none() && deleted {
            gone_products.insert(pk.clone());
            out.push(Removal::Product {
                product_key: pk.clone(),
            });
        }
    }
    for (id, d) in &old.devices {
        if d.deleted_at.is_some() || gone_products.contains(&id.0) {
            continue;
        }
        if new.devices.get(id).is_none_or(|n| n.deleted_at.is_some()) {
            out.push(Removal::Device {
                product_key: id.0.clone(),
                device_key: id.1.clone(),
            });
        }
    }
    out
}

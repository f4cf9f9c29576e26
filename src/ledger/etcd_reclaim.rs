//! Returning a dead node's lanes (etcd store): once another node's
//! liveness key is gone (its lease expired), the codes of its lanes go
//! back to their products' pools, in one transaction guarded by those
//! lanes' revisions and the key's absence, so a node that comes back and
//! commits first keeps them, and one that commits after is refused.

use super::super::etcd::Commit;
use super::super::etcd_fence;
use super::super::state::Dirty;
use super::super::writer::publish_fast;
use super::{debug_check, EtcdContext};

impl EtcdContext {
    /// Returns the codes in the lanes of dead nodes (no liveness key) to
    /// their products' pools, in one transaction guarded by those lanes'
    /// revisions and the liveness keys' absence. Refused: undone, tried
    /// again after the next change the watch brings.
    pub(super) fn reclaim_dead(&mut self, stale: &mut bool) {
        let mut st = self.state.write();
        let dead: Vec<String> = st
            .nodes_holding_codes()
            .into_iter()
            .filter(|n| *n != self.lanes.node && !self.live_nodes.contains(n))
            .collect();
        if dead.is_empty() {
            self.reclaim = false;
            return;
        }
        let mut moved = 0;
        for node in &dead {
            moved += st.reclaim_lanes(node);
        }
        let mut writes = Vec::new();
        let dirty = match st.drain_dirty(&mut |w| writes.push(w)) {
            Ok(d) => d,
            Err(e) => {
                tracing::warn!(error = %e, "returning a dead node's lanes failed; reloading");
                *stale = true;
                return;
            }
        };
        let (mut guards, _) = etcd_fence::guards(&self.pos, &st, &writes, &[]);
        guards.extend(dead.iter().map(|n| etcd_fence::dead(n)));
        let pre: Vec<i64> = writes
            .iter()
            .map(|(k, _)| self.pos.pre_image_at(k))
            .collect();
        let keys: Vec<Vec<u8>> = writes.iter().map(|(k, _)| k.clone()).collect();
        match self.store.commit(writes, &pre, &guards, false) {
            Commit::Done(revision) => {
                self.pos.committed(revision, keys);
                publish_fast(&self.fast, &st, &dirty);
                debug_check(&st, "returning a dead node's lanes");
                self.reclaim = false;
                metrics::counter!("activation_ledger_lane_codes_reclaimed_total").increment(moved);
                tracing::info!(node = self.store.node(), dead = ?dead, codes = moved, "returned dead nodes' lanes to the pool");
            }
            Commit::Stale(refused) => {
                let undone = refused
                    .before
                    .as_ref()
                    .is_some_and(|before| st.undo(before, &mut Dirty::default()).is_ok());
                if undone {
                    debug_check(&st, "undoing a refused return of lanes");
                } else {
                    *stale = true;
                }
            }
            Commit::Unknown(why) => {
                tracing::warn!(node = self.store.node(), reason = %why, "returning a dead node's lanes: outcome unknown; reloading");
                *stale = true;
            }
        }
    }
}

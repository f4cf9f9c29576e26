//! Lanes (etcd store): a node moves a block of a product's codes from the
//! pool to its own lane and consumes from it, so that batches of
//! different nodes write different keys and do not conflict. Blocks
//! shrink as the pool runs low; with the pool empty a node takes codes
//! from another node's lane; a dead node's lanes go back to the pool.
//! Every move keeps the product's counts whole: `Total = Consumed (pool's
//! and lanes') + Available (pool's and lanes') + Forfeited`.

use super::model::*;
use super::state::{LaneMode, State};

/// Moves up to `k` codes, oldest lot first, from `from` to the end of `to`.
fn move_codes(from: &mut Vec<Lot>, to: &mut Vec<Lot>, mut k: u64) {
    while k > 0 {
        let Some(lot) = from.first_mut() else { return };
        let n = lot.remaining.min(k);
        lot.remaining -= n;
        k -= n;
        let order_id = lot.order_id.clone();
        if lot.remaining == 0 {
            from.remove(0);
        }
        match to.last_mut() {
            Some(last) if last.order_id == order_id => last.remaining += n,
            _ => to.push(Lot {
                order_id,
                remaining: n,
            }),
        }
    }
}

impl State {
    fn lane_mut(&mut self, pk: &str, node: &str) -> &mut Lane {
        self.lanes
            .entry((pk.to_owned(), node.to_owned()))
            .or_insert_with(|| Lane {
                product_key: pk.to_owned(),
                node: node.to_owned(),
                lots: Vec::new(),
                consumed: 0,
                next_code: 0,
                end_code: 0,
            })
    }

    /// How many codes one reservation moves: `block`, shrinking as the
    /// pool runs low (`pool / (2 × nodes)`, nodes counted by the product's
    /// lanes), at least 1.
    pub(super) fn block_size(&self, pk: &str, mode: &LaneMode, pool: u64) -> u64 {
        let own = (pk.to_owned(), mode.node.clone());
        let nodes = self.lanes_of(pk).count() as u64 + u64::from(!self.lanes.contains_key(&own));
        mode.block.min(pool / (2 * nodes.max(1))).max(1).min(pool)
    }

    /// Takes one code for product `pk` from this node's lane, filling the
    /// lane first if it is empty (from the pool, else from another node's
    /// lane) and reserving code ids if it has none left. Returns the
    /// code's order and id. The caller has checked that the product has
    /// a code somewhere.
    pub(super) fn take_from_lane(&mut self, pk: &str, mode: &LaneMode) -> (String, u64) {
        let key = (pk.to_owned(), mode.node.clone());
        if self.lanes.get(&key).map_or(0, Lane::available) == 0 {
            self.fill_lane(pk, mode);
        }
        let next_free = self.code_ids.max(self.codes.len() as u64 + 1);
        let lane = self.lane_mut(pk, &mode.node);
        let mut reserved = None;
        if lane.next_code >= lane.end_code {
            let end = next_free + mode.block.max(1);
            lane.next_code = next_free;
            lane.end_code = end;
            reserved = Some(end);
        }
        let order_id = take_oldest(&mut lane.lots);
        lane.consumed += 1;
        let id = lane.next_code;
        lane.next_code += 1;
        if let Some(end) = reserved {
            self.code_ids = end;
            self.dirty.code_ids = true;
        }
        self.dirty.lanes.insert(key);
        (order_id, id)
    }

    /// Fills this node's empty lane of `pk`: a block from the pool, or,
    /// with the pool empty, half of the fullest other lane.
    fn fill_lane(&mut self, pk: &str, mode: &LaneMode) {
        let pool = self.products.get(pk).map_or(0, Product::available);
        if pool > 0 {
            let k = self.block_size(pk, mode, pool);
            let mut lots = Vec::new();
            if let Some(p) = self.products.get_mut(pk) {
                move_codes(&mut p.pool, &mut lots, k);
            }
            self.dirty.products.insert(pk.to_owned());
            let lane = self.lane_mut(pk, &mode.node);
            move_codes(&mut lots, &mut lane.lots, u64::MAX);
            self.dirty.lanes.insert((pk.to_owned(), mode.node.clone()));
            return;
        }
        let Some(victim) = self
            .lanes_of(pk)
            .filter(|l| l.node != mode.node && l.available() > 0)
            .max_by_key(|l| l.available())
            .map(|l| l.node.clone())
        else {
            return;
        };
        self.steal(pk, &victim, &mode.node);
    }

    /// Moves half (rounded up) of `victim`'s lane of `pk` to `node`'s.
    pub(super) fn steal(&mut self, pk: &str, victim: &str, node: &str) {
        let vkey = (pk.to_owned(), victim.to_owned());
        let mut lots = Vec::new();
        if let Some(v) = self.lanes.get_mut(&vkey) {
            let k = v.available().div_ceil(2);
            move_codes(&mut v.lots, &mut lots, k);
        }
        self.dirty.lanes.insert(vkey);
        metrics::counter!("activation_ledger_lane_steals_total").increment(1);
        let lane = self.lane_mut(pk, node);
        move_codes(&mut lots, &mut lane.lots, u64::MAX);
        self.dirty.lanes.insert((pk.to_owned(), node.to_owned()));
    }

    /// Every lane of `node` holding codes, as `(ProductKey, node)`.
    pub fn lanes_holding(&self, node: &str) -> Vec<(String, String)> {
        self.lanes
            .iter()
            .filter(|((_, n), l)| n == node && l.available() > 0)
            .map(|(k, _)| k.clone())
            .collect()
    }

    /// The nodes whose lanes hold codes.
    pub fn nodes_holding_codes(&self) -> std::collections::BTreeSet<String> {
        self.lanes
            .iter()
            .filter(|(_, l)| l.available() > 0)
            .map(|((_, n), _)| n.clone())
            .collect()
    }

    /// Returns every code of `node`'s lanes to their products' pools (a
    /// dead node's lanes). Returns how many codes moved.
    pub fn reclaim_lanes(&mut self, node: &str) -> u64 {
        let mut moved = 0;
        for key in self.lanes_holding(node) {
            let mut lots = Vec::new();
            if let Some(l) = self.lanes.get_mut(&key) {
                moved += l.available();
                lots = std::mem::take(&mut l.lots);
            }
            if let Some(p) = self.products.get_mut(&key.0) {
                move_codes(&mut lots, &mut p.pool, u64::MAX);
            }
            self.dirty.products.insert(key.0.clone());
            self.dirty.lanes.insert(key);
        }
        moved
    }

    /// Empties every lane of `pk` (the product is deleted); returns how
    /// many codes they held.
    pub(super) fn forfeit_lanes(&mut self, pk: &str) -> u64 {
        let keys: Vec<(String, String)> = self
            .lanes_of(pk)
            .filter(|l| l.available() > 0)
            .map(|l| (l.product_key.clone(), l.node.clone()))
            .collect();
        let mut n = 0;
        for key in keys {
            if let Some(l) = self.lanes.get_mut(&key) {
                n += l.available();
                l.lots.clear();
            }
            self.dirty.lanes.insert(key);
        }
        n
    }
}

#[cfg(test)]
#[path = "lanes_tests.rs"]
mod tests;

//! `State::check_invariants`: every SPEC §2 invariant and index recomputed
//! from the records (tests, restore, recovery).
use std::collections::BTreeMap;

use super::model::*;
use super::state::*;
use crate::clock::Millis;

impl State {
    /// Recomputes every counter from the records and checks the SPEC §2
    /// invariants and the indexes. Used by tests and after recovery.
    pub fn check_invariants(&self) -> Result<(), String> {
        let total: u64 = self.orders.values().map(|o| o.quantity).sum();
        let unassigned: u64 = self.orders.values().map(|o| o.unassigned).sum();
        let forfeited: u64 = self.products.values().map(|p| p.forfeited).sum();
        let mut available_assigned = 0;
        for p in self.products.values() {
            let consumed = self
                .codes_by_product
                .get(&p.product_key)
                .map_or(0, Vec::len) as u64;
            let (p_consumed, p_available) = (self.product_consumed(p), self.product_available(p));
            if consumed != p_consumed {
                return Err(format!(
                    "product {}: consumed {} (lanes included) but {} code records",
                    p.product_key, p_consumed, consumed
                ));
            }
            if p.total != p_consumed + p_available + p.forfeited {
                return Err(format!(
                    "product {}: Total {} != Consumed {} + Available {} (+ Forfeited {}), lanes included",
                    p.product_key, p.total, p_consumed, p_available, p.forfeited
                ));
            }
            if p.deleted_at.is_none() {
                available_assigned += p_available;
            } else if p_available != 0 {
                return Err(format!("deleted product {} still has codes", p.product_key));
            }
        }
        self.check_lanes()?;
        let c = self.counters();
        let recomputed = Counters {
            total,
            consumed: self.all_codes().count() as u64,
            available: unassigned + available_assigned,
            unassigned,
            forfeited,
        };
        if c != recomputed {
            return Err(format!("counters {c:?} != recomputed {recomputed:?}"));
        }
        if c.total != c.consumed + c.available + c.forfeited {
            return Err(format!(
                "Total {} != Consumed {} + Available {} + Forfeited {}",
                c.total, c.consumed, c.available, c.forfeited
            ));
        }
        let mut by_allowance: BTreeMap<Allowance, u64> = BTreeMap::new();
        for o in self.orders.values() {
            if o.unassigned > 0 {
                *by_allowance.entry(o.allowance).or_default() += o.unassigned;
            }
        }
        let nonzero: BTreeMap<Allowance, u64> = self
            .unassigned
            .iter()
            .filter(|(_, n)| **n > 0)
            .map(|(a, n)| (*a, *n))
            .collect();
        if by_allowance != nonzero {
            return Err("unassigned index differs from orders".into());
        }
        for d in self.devices.values() {
            let mut per_period: Option<Millis> = None;
            for id in &d.codes {
                let Some(code) = self.code(*id) else {
                    return Err(format!("device {} lists missing code {id}", d.device_key));
                };
                if code.device_key != d.device_key || code.product_key != d.product_key {
                    return Err(format!("code {id} belongs to another device"));
                }
                if let Some(prev_expiry) = per_period {
                    if code.activate_at < prev_expiry {
                        return Err(format!(
                            "device {}/{} consumed code {id} while its previous code was valid",
                            d.product_key, d.device_key
                        ));
                    }
                }
                per_period = Some(code.expire_at);
            }
            if d.current_code != d.codes.last().copied() {
                return Err(format!("device {} current code mismatch", d.device_key));
            }
            let indexed = d.expire_at.is_some_and(|e| {
                self.current_expiry
                    .contains(&(e, d.product_key.clone(), d.device_key.clone()))
            });
            if indexed != (self.device_is_live(d) && d.expire_at.is_some()) {
                return Err(format!("expiry index wrong for {}", d.device_key));
            }
        }
        Ok(())
    }

    /// Every lane belongs to a product; the code ids lanes reserved do
    /// not overlap, and none is below a code another lane holds.
    fn check_lanes(&self) -> Result<(), String> {
        let mut ranges = Vec::new();
        for ((pk, node), l) in &self.lanes {
            if *pk != l.product_key || *node != l.node {
                return Err(format!("lane {pk}/{node} is stored under another key"));
            }
            if !self.products.contains_key(pk) {
                return Err(format!("lane {pk}/{node} of no product"));
            }
            if l.lots.iter().any(|x| x.remaining == 0) {
                return Err(format!("lane {pk}/{node} holds an empty lot"));
            }
            if l.next_code > l.end_code {
                return Err(format!("lane {pk}/{node} used ids past its reservation"));
            }
            if l.end_code > l.next_code {
                if self.code_ids < l.end_code {
                    return Err(format!(
                        "lane {pk}/{node} holds ids up to {} past the reserved {}",
                        l.end_code, self.code_ids
                    ));
                }
                ranges.push((l.next_code, l.end_code, format!("{pk}/{node}")));
                if let Some(c) = (l.next_code..l.end_code).find_map(|id| self.code(id)) {
                    return Err(format!("lane {pk}/{node} would reuse code id {}", c.id));
                }
            }
        }
        ranges.sort();
        for w in ranges.windows(2) {
            if w[0].1 > w[1].0 {
                return Err(format!(
                    "lanes {} and {} reserved the same code ids",
                    w[0].2, w[1].2
                ));
            }
        }
        Ok(())
    }
}

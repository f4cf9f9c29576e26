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
            if consumed != p.consumed {
                return Err(format!(
                    "product {}: consumed {} but {} code records",
                    p.product_key, p.consumed, consumed
                ));
            }
            if p.total != p.consumed + p.available() + p.forfeited {
                return Err(format!(
                    "product {}: Total {} != Consumed {} + Available {} (+ Forfeited {})",
                    p.product_key,
                    p.total,
                    p.consumed,
                    p.available(),
                    p.forfeited
                ));
            }
            if p.deleted_at.is_none() {
                available_assigned += p.available();
            } else if p.available() != 0 {
                return Err(format!("deleted product {} still has codes", p.product_key));
            }
        }
        let c = self.counters();
        let recomputed = Counters {
            total,
            consumed: self.codes.len() as u64,
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
}

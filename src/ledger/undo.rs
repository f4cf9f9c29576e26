//! `State::undo`: puts back the records of a batch that was decided on the
//! replica but not committed (etcd refused it as stale), from their
//! pre-images, keeping every index and counter current — the same paths
//! that take in another node's records (`records.rs`), plus the removal of
//! the records the batch created. The cost follows the batch, not the
//! ledger.

use std::collections::BTreeSet;

use super::model::*;
use super::records::{put_dense, Write};
use super::state::{dev_id, Dirty, State};
use super::store::{self, decode};
use super::LedgerError;

fn corrupt(msg: impl Into<String>) -> LedgerError {
    LedgerError::Corrupt(format!("undoing a refused batch: {}", msg.into()))
}

fn str_of(k: &[u8]) -> Result<String, LedgerError> {
    k.get(1..)
        .and_then(|s| std::str::from_utf8(s).ok())
        .map(str::to_owned)
        .ok_or_else(|| corrupt("a key is not UTF-8"))
}

fn id_of(k: &[u8]) -> Result<u64, LedgerError> {
    k.get(1..)
        .and_then(|s| <[u8; 8]>::try_from(s).ok())
        .map(u64::from_be_bytes)
        .ok_or_else(|| corrupt("an id key is not 8 bytes"))
}

fn pair_of(k: &[u8]) -> Result<(String, String), LedgerError> {
    store::split_pair(k).ok_or_else(|| corrupt("a pair key does not split"))
}

impl State {
    /// Puts every record of `before` back: `(key, Some(record))` as it
    /// was, `(key, None)` a record the batch created (removed). The
    /// products and devices it touched are added to `touched`. An `Err`
    /// means the pre-images do not fit this state: the caller reloads.
    pub fn undo(&mut self, before: &[Write], touched: &mut Dirty) -> Result<(), LedgerError> {
        let mut revived = BTreeSet::new();
        let (mut codes, mut assignments, mut audit) = (Vec::new(), Vec::new(), Vec::new());
        // Products first: a device's liveness follows its product's.
        for (k, v) in before
            .iter()
            .filter(|(k, _)| k.first() == Some(&store::PRODUCT))
        {
            let pk = str_of(k)?;
            let was_live = self
                .products
                .get(&pk)
                .is_some_and(|p| p.deleted_at.is_none());
            match v {
                Some(v) => {
                    let p: Product = decode(v)?;
                    if !was_live && p.deleted_at.is_none() {
                        revived.insert(pk.clone());
                    }
                    self.remote_product(p);
                }
                None => self.drop_product(&pk),
            }
            touched.products.insert(pk);
        }
        for (k, v) in before {
            match (k.first(), v) {
                (Some(&store::PRODUCT), _) => {}
                (Some(&store::ORDER), Some(v)) => self.remote_order(decode(v)?),
                (Some(&store::ORDER), None) => self.drop_order(&str_of(k)?),
                (Some(&store::DEVICE), v) => {
                    let id = pair_of(k)?;
                    match v {
                        Some(v) => {
                            let d: Device = decode(v)?;
                            if dev_id(&d.product_key, &d.device_key) != id {
                                return Err(corrupt("a device record under another key"));
                            }
                            self.remote_device(d);
                        }
                        None => self.drop_device(&id),
                    }
                    touched.devices.insert(id);
                }
                (Some(&store::CODE), Some(v)) => {
                    let c: CodeRecord = decode(v)?;
                    if self.code(c.id).is_none() {
                        return Err(corrupt(format!("code {} to put back is missing", c.id)));
                    }
                    self.put_code(c);
                }
                (Some(&store::LANE), v) => {
                    let (pk, node) = pair_of(k)?;
                    match v {
                        Some(v) => self.remote_lane(decode(v)?),
                        None => self.drop_lane(&pk, &node),
                    }
                    touched.products.insert(pk);
                }
                (Some(&store::CODE_IDS), v) => {
                    self.code_ids = match v {
                        Some(v) => decode(v)?,
                        None => 0,
                    };
                }
                (Some(&store::CODE), None) => codes.push(id_of(k)?),
                (Some(&store::ASSIGNMENT), Some(v)) => {
                    let a: Assignment = decode(v)?;
                    put_dense(&mut self.assignments, a.id, a, "assignment")?;
                }
                (Some(&store::ASSIGNMENT), None) => assignments.push(id_of(k)?),
                (Some(&store::AUDIT), Some(v)) => {
                    let a: AuditRecord = decode(v)?;
                    put_dense(&mut self.audit, a.id, a, "audit")?;
                }
                (Some(&store::AUDIT), None) => audit.push(id_of(k)?),
                (Some(&store::BLACKLIST), v) => {
                    let id = pair_of(k)?;
                    if v.is_some() {
                        self.blacklist.insert(id);
                    } else {
                        self.blacklist.remove(&id);
                    }
                }
                (Some(&store::TOKEN), Some(v)) => {
                    self.tokens.insert(str_of(k)?, decode(v)?);
                }
                (Some(&store::TOKEN), None) => {
                    self.tokens.remove(&str_of(k)?);
                }
                _ => {
                    return Err(corrupt(format!(
                        "unknown record key {:?}",
                        String::from_utf8_lossy(k)
                    )))
                }
            }
        }
        // Created records had the newest ids: removed newest first.
        codes.sort_unstable();
        for id in codes.into_iter().rev() {
            self.drop_code(id)?;
        }
        drop_tail(&mut self.assignments, assignments, "assignment")?;
        drop_tail(&mut self.audit, audit, "audit")?;
        // A product the batch deleted took its devices out of the expiry
        // index without touching their records: they go back in.
        for pk in revived {
            let back: Vec<_> = self
                .devices
                .range((pk.clone(), String::new())..)
                .take_while(|((dpk, _), _)| *dpk == pk)
                .filter(|(_, d)| d.deleted_at.is_none())
                .filter_map(|((dpk, dk), d)| d.expire_at.map(|e| (e, dpk.clone(), dk.clone())))
                .collect();
            self.current_expiry.extend(back);
        }
        Ok(())
    }

    fn drop_product(&mut self, pk: &str) {
        let Some(p) = self.products.remove(pk) else {
            return;
        };
        self.forfeited = self.forfeited.saturating_sub(p.forfeited);
        if p.deleted_at.is_none() {
            let in_lanes: u64 = self.lanes_of(pk).map(Lane::available).sum();
            self.available_assigned = self
                .available_assigned
                .saturating_sub(p.available() + in_lanes);
        }
        let gone: Vec<_> = self
            .current_expiry
            .iter()
            .filter(|(_, dpk, _)| dpk == pk)
            .cloned()
            .collect();
        for e in gone {
            self.current_expiry.remove(&e);
        }
    }

    fn drop_order(&mut self, order_id: &str) {
        let Some(o) = self.orders.remove(order_id) else {
            return;
        };
        self.total = self.total.saturating_sub(o.quantity);
        if let Some(n) = self.unassigned.get_mut(&o.allowance) {
            *n -= o.unassigned.min(*n);
            if *n == 0 {
                self.unassigned.remove(&o.allowance);
            }
        }
        self.order_seq.retain(|id| id != order_id);
    }

    fn drop_device(&mut self, id: &(String, String)) {
        if let Some(d) = self.devices.remove(id) {
            if let Some(e) = d.expire_at {
                self.current_expiry.remove(&(e, id.0.clone(), id.1.clone()));
            }
        }
    }

    fn drop_lane(&mut self, pk: &str, node: &str) {
        let before = self.live_available(pk);
        self.lanes.remove(&(pk.to_owned(), node.to_owned()));
        self.available_assigned = self.available_assigned - before + self.live_available(pk);
    }

    /// Removes code `id` (a code the batch created) and its index entries.
    fn drop_code(&mut self, id: u64) -> Result<(), LedgerError> {
        let Some(c) = (id as usize)
            .checked_sub(1)
            .and_then(|i| self.codes.get_mut(i))
            .and_then(Option::take)
        else {
            return Err(corrupt(format!("created code {id} is not there")));
        };
        self.code_count -= 1;
        while self.codes.last().is_some_and(Option::is_none) {
            self.codes.pop();
        }
        for ids in [
            self.codes_by_product.get_mut(&c.product_key),
            self.codes_by_order.get_mut(&c.order_id),
        ]
        .into_iter()
        .flatten()
        {
            // The newest code is the last of its lists.
            if ids.last() == Some(&id) {
                ids.pop();
            } else {
                ids.retain(|x| *x != id);
            }
        }
        if self
            .codes_by_product
            .get(&c.product_key)
            .is_some_and(Vec::is_empty)
        {
            self.codes_by_product.remove(&c.product_key);
        }
        if self
            .codes_by_order
            .get(&c.order_id)
            .is_some_and(Vec::is_empty)
        {
            self.codes_by_order.remove(&c.order_id);
        }
        self.codes_by_expiry.remove(&(c.expire_at, id));
        self.codes_by_activation.remove(&(c.activate_at, id));
        Ok(())
    }
}

/// Removes the records with `ids` from the end of a dense list (ids from
/// 1): they must be its newest.
fn drop_tail<T>(v: &mut Vec<T>, mut ids: Vec<u64>, what: &str) -> Result<(), LedgerError> {
    ids.sort_unstable();
    for id in ids.into_iter().rev() {
        if id != v.len() as u64 {
            return Err(corrupt(format!("created {what} {id} is not the newest")));
        }
        v.pop();
    }
    Ok(())
}

#[cfg(test)]
pub(super) mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::ledger::{AuditEntry, AuthMode, Command};

    pub(in crate::ledger) const NOW: i64 = 1_700_000_000_000;
    pub(in crate::ledger) const YEAR: u64 = 365 * 24 * 3600;

    /// Every record, index and counter of `st`, comparable.
    fn fingerprint(st: &State) -> String {
        let sorted = |m: &std::collections::HashMap<String, Vec<u64>>| {
            m.iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect::<BTreeMap<_, _>>()
        };
        let tokens: BTreeMap<_, _> = st.tokens.iter().collect();
        format!(
            "{:?}",
            (
                (&st.orders, &st.order_seq, &st.products, &st.devices),
                (&st.codes, &st.assignments, &st.blacklist, tokens, &st.audit),
                (sorted(&st.codes_by_product), sorted(&st.codes_by_order)),
                (&st.codes_by_expiry, &st.codes_by_activation),
                (&st.current_expiry, &st.unassigned),
                (st.total, st.available_assigned, st.forfeited),
                (&st.lanes, st.code_ids, st.code_count),
            )
        )
    }

    pub(in crate::ledger) fn run(st: &mut State, c: Command) {
        let mut events = Vec::new();
        st.apply(&c, NOW, &mut events)
            .unwrap_or_else(|e| panic!("{c:?}: {e}"));
    }

    pub(in crate::ledger) fn product(st: &mut State, pk: &str, codes: u64) {
        run(
            st,
            Command::CreateProduct {
                product_key: pk.into(),
                name: pk.into(),
                auth_mode: AuthMode::ProductSecret,
            },
        );
        run(
            st,
            Command::CreateOrder {
                order_id: None,
                quantity: codes,
                validity_secs: YEAR,
                product_key: Some(pk.into()),
            },
        );
    }

    fn connect(st: &mut State, pk: &str, dk: &str) {
        let mut events = Vec::new();
        st.connect(pk, dk, NOW, &mut events, 0)
            .unwrap_or_else(|e| panic!("connect {pk}/{dk}: {e:?}"));
    }

    /// Drains the dirty records into `store`; returns the batch's writes.
    pub(in crate::ledger) fn commit(
        st: &mut State,
        store: &mut BTreeMap<Vec<u8>, Vec<u8>>,
    ) -> Vec<Write> {
        let mut writes = Vec::new();
        st.drain_dirty(&mut |w| writes.push(w)).expect("drain");
        for (k, v) in &writes {
            match v {
                Some(v) => store.insert(k.clone(), v.clone()),
                None => store.remove(k),
            };
        }
        writes
    }

    #[test]
    fn a_refused_batch_is_undone_exactly() {
        let mut st = State::default();
        let mut store = BTreeMap::new();
        product(&mut st, "p1", 100);
        product(&mut st, "p2", 20);
        run(
            &mut st,
            Command::CreateOrder {
                order_id: Some("spare".into()),
                quantity: 50,
                validity_secs: YEAR,
                product_key: None,
            },
        );
        for i in 0..10 {
            connect(&mut st, "p1", &format!("d{i}"));
            connect(&mut st, "p2", &format!("e{i}"));
        }
        commit(&mut st, &mut store);
        let committed = fingerprint(&st);

        // A batch touching every kind of record, as one writer decides it.
        for i in 10..20 {
            connect(&mut st, "p1", &format!("d{i}"));
        }
        product(&mut st, "p3", 5);
        connect(&mut st, "p3", "f0");
        run(
            &mut st,
            Command::AssignCodes {
                product_key: "p1".into(),
                quantity: 10,
                validity_secs: Some(YEAR),
            },
        );
        run(
            &mut st,
            Command::AddBlacklist {
                product_key: "p1".into(),
                device_keys: vec!["d2".into(), "nobody".into()],
            },
        );
        run(
            &mut st,
            Command::DeleteDevice {
                product_key: "p1".into(),
                device_key: "d1".into(),
            },
        );
        run(
            &mut st,
            Command::DeleteProduct {
                product_key: "p2".into(),
            },
        );
        st.append_audit(
            AuditEntry {
                account: "admin".into(),
                action: "DeleteProduct".into(),
                parameters: "{}".into(),
                code_of: |_| "Refused",
            },
            "OK".into(),
            String::new(),
            NOW,
        );
        let mut writes = Vec::new();
        st.drain_dirty(&mut |w| writes.push(w)).expect("drain");
        assert_ne!(fingerprint(&st), committed, "the batch changed nothing");

        // Refused: every written key as the store holds it.
        let before: Vec<Write> = writes
            .into_iter()
            .map(|(k, _)| {
                let v = store.get(&k).cloned();
                (k, v)
            })
            .collect();
        let mut touched = Dirty::default();
        st.undo(&before, &mut touched).expect("undo");
        st.check_invariants().expect("invariants after undo");
        assert_eq!(fingerprint(&st), committed);
        assert!(touched.products.contains("p2") && touched.devices.contains(&dev_id("p1", "d1")));
        // And the replica goes on from there as if the batch never was.
        connect(&mut st, "p1", "d10");
        commit(&mut st, &mut store);
        let reloaded = State::from_records(store.iter().map(|(k, v)| Ok((k.clone(), v.clone()))))
            .expect("reload");
        assert_eq!(fingerprint(&reloaded), fingerprint(&st));
    }

    #[test]
    fn pre_images_that_do_not_fit_are_refused() {
        let mut st = State::default();
        product(&mut st, "p1", 10);
        connect(&mut st, "p1", "d0");
        let mut touched = Dirty::default();
        // Code 5 was never the newest: undoing it would leave a gap.
        let r = st.undo(&[(store::id_key(store::CODE, 5), None)], &mut touched);
        assert!(matches!(r, Err(LedgerError::Corrupt(_))), "{r:?}");
    }
}

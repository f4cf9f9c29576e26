//! What an etcd transaction of this node must be guarded by: the
//! replica's position (`Position`: the last revision the watch brought in
//! order, and this node's own commits past it) and the keys a batch wrote
//! or read (`guards`). A key the replica holds unchanged has a mod revision
//! at most the position, or exactly the revision of this node's own commit
//! that wrote it; a new key none. So a batch decided on a stale replica is
//! refused, and batches of different nodes that touch different keys are
//! not.

use std::collections::{BTreeSet, HashMap};

use super::etcd::{Expect, Guard, HEAD, NODE};
use super::records::Write;
use super::state::State;
use super::store;
use super::writer::Answer;
use super::Refusal;
use crate::ledger::model::CodeKind;

/// Where the replica stands in etcd's history.
#[derive(Debug, Default)]
pub struct Position {
    /// Every commit up to this revision is in the replica.
    seen: i64,
    /// This node's commits past `seen` (already in the replica).
    own: BTreeSet<i64>,
    /// The keys those commits wrote, with the revision of the last.
    own_keys: HashMap<Vec<u8>, i64>,
}

impl Position {
    pub fn new(seen: i64) -> Position {
        Position {
            seen,
            ..Position::default()
        }
    }

    pub fn seen(&self) -> i64 {
        self.seen
    }

    /// What a guard on `key` expects.
    pub fn expect(&self, key: &[u8]) -> Expect {
        match self.own_keys.get(key) {
            Some(rev) => Expect::Exactly(*rev),
            None => Expect::AtMost(self.seen),
        }
    }

    /// The revision the replica's `key` is read at (its pre-image).
    pub fn pre_image_at(&self, key: &[u8]) -> i64 {
        self.own_keys.get(key).copied().unwrap_or(self.seen)
    }

    /// This node committed `keys` at `revision`.
    pub fn committed(&mut self, revision: i64, keys: impl IntoIterator<Item = Vec<u8>>) {
        if revision <= self.seen {
            return;
        }
        self.own.insert(revision);
        for k in keys {
            self.own_keys.insert(k, revision);
        }
    }

    /// Whether the watch's commit at `revision` is this node's own (already
    /// in the replica).
    pub fn is_own(&self, revision: i64) -> bool {
        self.own.contains(&revision)
    }

    /// The watch brought the replica to `revision`.
    pub fn advance(&mut self, revision: i64) {
        if revision <= self.seen {
            return;
        }
        self.seen = revision;
        self.own = self.own.split_off(&(revision + 1));
        if !self.own_keys.is_empty() {
            self.own_keys.retain(|_, r| *r > revision);
        }
    }
}

fn product_key(pk: &str) -> Vec<u8> {
    store::str_key(store::PRODUCT, pk)
}

/// The guards of a batch: every key it writes; what its decisions read
/// that another node could change: a renewed device's product (auto
/// renewal) and blacklist entry, the product of any other device written
/// (a deleted device back within its validity); for each "no code"
/// refusal the product and every lane of it (so the refusal holds only if
/// one read at one revision shows them all as the replica does), for "no
/// such product/device" the record. A first activation from this node's
/// lane is not guarded by its product: what it reads there does not
/// change while the lane holds codes (the allowance is fixed once the
/// product has codes; a deletion empties the lane, a write the lane's
/// guard sees), so another node's reservation from the pool does not
/// refuse it. Admin commands (`head`) are also guarded by the head key,
/// which they put.
pub fn guards(
    pos: &Position,
    st: &State,
    writes: &[Write],
    answers: &[Answer],
) -> (Vec<Guard>, bool) {
    let mut keys: BTreeSet<Vec<u8>> = BTreeSet::new();
    let mut head = false;
    let first_activations: BTreeSet<(&str, &str)> = answers
        .iter()
        .filter_map(|a| match a {
            Answer::Connect(Ok(admitted)) => admitted.consumed.as_ref(),
            _ => None,
        })
        .filter(|c| c.kind == CodeKind::Activation)
        .map(|c| (c.product_key.as_str(), c.device_key.as_str()))
        .collect();
    // Codes consumed here: their ids come from this node's lane (guarded),
    // so no other node writes them.
    let new_codes: BTreeSet<Vec<u8>> = answers
        .iter()
        .filter_map(|a| match a {
            Answer::Connect(Ok(admitted)) => admitted.consumed.as_ref(),
            _ => None,
        })
        .map(|c| store::id_key(store::CODE, c.id))
        .collect();
    for (k, _) in writes {
        if !new_codes.contains(k) {
            keys.insert(k.clone());
        }
        match k.first() {
            Some(&store::DEVICE) => {
                if let Some((pk, dk)) = store::split_pair(k) {
                    if !first_activations.contains(&(pk.as_str(), dk.as_str())) {
                        keys.insert(product_key(&pk));
                    }
                }
            }
            Some(&store::ORDER)
            | Some(&store::ASSIGNMENT)
            | Some(&store::AUDIT)
            | Some(&store::TOKEN)
            | Some(&store::BLACKLIST) => head = true,
            _ => {}
        }
    }
    for a in answers {
        match a {
            Answer::Command(_) | Answer::Audit => head = true,
            Answer::Connect(Ok(admitted)) => {
                if let Some(c) = admitted
                    .consumed
                    .as_ref()
                    .filter(|c| c.kind == CodeKind::Renewal)
                {
                    keys.insert(product_key(&c.product_key));
                    keys.insert(store::pair_key(
                        store::BLACKLIST,
                        &c.product_key,
                        &c.device_key,
                    ));
                }
            }
            Answer::Connect(Err(Refusal::NoCodeAvailable(pk))) => {
                keys.insert(product_key(pk));
                for l in st.lanes_of(pk) {
                    keys.insert(store::pair_key(store::LANE, pk, &l.node));
                }
            }
            Answer::Connect(Err(Refusal::UnknownProduct(pk))) => {
                keys.insert(product_key(pk));
            }
            Answer::Connect(Err(Refusal::UnknownDevice(pk, dk))) => {
                keys.insert(product_key(pk));
                keys.insert(store::pair_key(store::DEVICE, pk, dk));
            }
            _ => {}
        }
    }
    // A batch with nothing to write that read nothing another node
    // changes needs no round trip.
    if writes.is_empty() && keys.is_empty() {
        return (Vec::new(), false);
    }
    if head && !writes.is_empty() {
        keys.insert(HEAD.to_vec());
    } else {
        head = false;
    }
    let guards = keys
        .into_iter()
        .map(|key| {
            let expect = pos.expect(&key);
            Guard { key, expect }
        })
        .collect();
    (guards, head)
}

/// The guard that `node` is dead: its liveness key is absent.
pub fn dead(node: &str) -> Guard {
    Guard {
        key: [NODE, node.as_bytes()].concat(),
        expect: Expect::Absent,
    }
}

/// The node a liveness key names, if `key` is one.
pub fn liveness(key: &[u8]) -> Option<String> {
    key.strip_prefix(NODE)
        .map(|n| String::from_utf8_lossy(n).into_owned())
}

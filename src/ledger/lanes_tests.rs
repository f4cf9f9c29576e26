//! The lane accounting against the invariants: random reservations,
//! consumptions, steals, returns of dead nodes' lanes, assignments and
//! deletions by several nodes on one replica; every step keeps `Total =
//! Consumed + Available + Forfeited` per product and for the broker, code
//! ids unique, and "no code" only when pool and every lane are empty.
//! Then the records reload to the same state, and a batch undone from its
//! pre-images leaves the state as it was.

use std::collections::BTreeMap;

use rand::{Rng, SeedableRng};

use super::super::records::Write;
use super::super::state::{Dirty, LaneMode, State};
use super::super::undo::tests::{commit, product, run, NOW, YEAR};
use super::super::{Command, Refusal};

const NODES: [&str; 3] = ["n1", "n2", "n3"];

fn as_node(st: &mut State, node: &str, block: u64) {
    st.set_lane_mode(LaneMode {
        node: node.into(),
        block,
    });
}

fn reload(store: &BTreeMap<Vec<u8>, Vec<u8>>) -> State {
    State::from_records(store.iter().map(|(k, v)| Ok((k.clone(), v.clone())))).expect("reload")
}

/// What the admin plane and the invariants see of a state.
fn view(st: &State) -> String {
    let products: Vec<_> = st
        .products
        .values()
        .map(|p| {
            (
                st.product_view(p).consumed,
                st.product_available(p),
                p.forfeited,
            )
        })
        .collect();
    format!(
        "{:?}",
        (
            st.counters(),
            products,
            &st.lanes,
            st.all_codes().collect::<Vec<_>>(),
            &st.devices,
        )
    )
}

#[test]
fn lanes_keep_every_count_whole() {
    for seed in 0..40u64 {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let mut st = State::default();
        let mut store = BTreeMap::new();
        product(&mut st, "p1", rng.gen_range(1..60));
        product(&mut st, "p2", rng.gen_range(1..60));
        commit(&mut st, &mut store);
        let mut accepted = 0u64;
        for step in 0..300 {
            let node = NODES[rng.gen_range(0..NODES.len())];
            as_node(&mut st, node, rng.gen_range(1..20));
            let pk = if rng.gen_bool(0.5) { "p1" } else { "p2" };
            match rng.gen_range(0..100) {
                0..=79 => {
                    let live = st.live_product(pk).is_ok();
                    let had = st.products.get(pk).map_or(0, |p| st.product_available(p));
                    let mut events = Vec::new();
                    let dk = format!("d{step}");
                    match st.connect(pk, &dk, NOW, &mut events, 0) {
                        Ok((_, Some(code))) => {
                            accepted += 1;
                            assert!(had > 0, "seed {seed}: consumed from nothing");
                            assert_eq!(code.device_key, dk);
                            assert!(!code.order_id.is_empty(), "the code names its order");
                        }
                        Ok((_, None)) => panic!("seed {seed}: a new device consumed nothing"),
                        Err(Refusal::NoCodeAvailable(_)) => {
                            assert_eq!(had, 0, "seed {seed}: refused with codes in lanes")
                        }
                        Err(Refusal::UnknownProduct(_)) => assert!(!live),
                        Err(e) => panic!("seed {seed}: {e:?}"),
                    }
                }
                80..=89 => {
                    let dead = NODES[rng.gen_range(0..NODES.len())];
                    st.reclaim_lanes(dead);
                    assert!(st.lanes_holding(dead).is_empty());
                }
                90..=95 => {
                    if st.live_product(pk).is_ok() {
                        run(
                            &mut st,
                            Command::CreateOrder {
                                order_id: None,
                                quantity: rng.gen_range(1..10),
                                validity_secs: YEAR,
                                product_key: Some(pk.into()),
                            },
                        );
                    }
                }
                _ => {
                    if st.live_product(pk).is_ok() && rng.gen_bool(0.3) {
                        run(
                            &mut st,
                            Command::DeleteProduct {
                                product_key: pk.into(),
                            },
                        );
                        assert!(st.lanes_of(pk).all(|l| l.available() == 0));
                    }
                }
            }
            st.check_invariants()
                .unwrap_or_else(|e| panic!("seed {seed} step {step}: {e}"));
            assert_eq!(st.counters().consumed, accepted);
            if rng.gen_bool(0.2) {
                commit(&mut st, &mut store);
                let again = reload(&store);
                again.check_invariants().expect("reloaded");
                assert_eq!(view(&again), view(&st), "seed {seed}: reload differs");
            }
        }
    }
}

#[test]
fn a_steal_takes_half_of_the_fullest_lane_and_no_code_means_none_anywhere() {
    let mut st = State::default();
    product(&mut st, "p", 10);
    as_node(&mut st, "a", 8);
    let mut events = Vec::new();
    // a's first block: min(8, 10 / (2 × 1)) = 5.
    st.connect("p", "d0", NOW, &mut events, 0).expect("a");
    let a = st.lanes.get(&("p".into(), "a".into())).expect("lane a");
    assert_eq!((a.available(), a.consumed), (4, 1));
    assert_eq!(st.products["p"].available(), 5);
    as_node(&mut st, "b", 8);
    for i in 1..7 {
        st.connect("p", &format!("d{i}"), NOW, &mut events, 0)
            .expect("b");
    }
    // b drained the pool (blocks shrink to 1), then took half of a's.
    assert_eq!(st.products["p"].available(), 0);
    let a = &st.lanes[&("p".to_owned(), "a".to_owned())];
    assert_eq!(a.available(), 2, "b took half of a's lane");
    let left = st.product_available(&st.products["p"]);
    for i in 0..left {
        st.connect("p", &format!("e{i}"), NOW, &mut events, 0)
            .expect("codes left somewhere");
    }
    assert_eq!(
        st.connect("p", "late", NOW, &mut events, 0),
        Err(Refusal::NoCodeAvailable("p".into()))
    );
    assert_eq!(st.counters().consumed, 10);
    st.check_invariants().expect("invariants");
    // Code ids never collide across lanes.
    let mut ids: Vec<u64> = st.all_codes().map(|c| c.id).collect();
    ids.dedup();
    assert_eq!(ids.len(), 10);
}

#[test]
fn a_refused_lane_batch_is_undone_exactly() {
    let mut st = State::default();
    let mut store = BTreeMap::new();
    product(&mut st, "p", 30);
    as_node(&mut st, "a", 4);
    let mut events = Vec::new();
    for i in 0..3 {
        st.connect("p", &format!("d{i}"), NOW, &mut events, 0)
            .expect("a");
    }
    commit(&mut st, &mut store);
    let committed = view(&st);
    // Reserve again, steal, take code ids, return lanes, delete.
    for i in 3..9 {
        st.connect("p", &format!("d{i}"), NOW, &mut events, 0)
            .expect("a");
    }
    as_node(&mut st, "b", 4);
    st.connect("p", "x", NOW, &mut events, 0).expect("b");
    st.reclaim_lanes("a");
    run(
        &mut st,
        Command::DeleteProduct {
            product_key: "p".into(),
        },
    );
    let mut writes = Vec::new();
    st.drain_dirty(&mut |w| writes.push(w)).expect("drain");
    let before: Vec<Write> = writes
        .into_iter()
        .map(|(k, _)| {
            let v = store.get(&k).cloned();
            (k, v)
        })
        .collect();
    st.undo(&before, &mut Dirty::default()).expect("undo");
    st.check_invariants().expect("invariants after undo");
    assert_eq!(view(&st), committed);
}

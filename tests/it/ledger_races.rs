//! Exactly-once under concurrency: many requesters race through the
//! group-commit writer.

use crate::common;

use std::collections::HashSet;

use common::*;

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_all()
        .build()
        .expect("runtime")
}

#[test]
fn two_thousand_devices_race_for_five_hundred_codes() {
    let t = open_ledger();
    t.stocked("p1", 500, 3600);
    let rt = runtime();
    let _guard = rt.enter();
    let mut tasks = Vec::new();
    for i in 0..2000 {
        let l = t.ledger.clone();
        tasks.push(tokio::spawn(async move {
            l.connect("p1", &format!("d{i}")).await
        }));
    }
    let mut accepted = HashSet::new();
    let mut refused = 0;
    for (i, task) in tasks.into_iter().enumerate() {
        match rt.block_on(task).expect("join") {
            Ok(a) => {
                assert!(a.consumed.is_some());
                accepted.insert(i);
            }
            Err(activation_broker::ledger::Refusal::NoCodeAvailable(_)) => refused += 1,
            Err(e) => panic!("unexpected refusal {e}"),
        }
    }
    assert_eq!((accepted.len(), refused), (500, 1500));
    let c = t.ledger.counters();
    assert_eq!((c.consumed, c.available), (500, 0));
    t.invariants();
}

/// Connects device `p1/same` `n` times at once; how many consumed a code.
fn consuming_connects(t: &TestLedger, n: usize) -> usize {
    let rt = runtime();
    let _guard = rt.enter();
    let tasks: Vec<_> = (0..n)
        .map(|_| {
            let l = t.ledger.clone();
            tokio::spawn(async move { l.connect("p1", "same").await })
        })
        .collect();
    tasks
        .into_iter()
        .map(|task| rt.block_on(task).expect("join").expect("admitted"))
        .filter(|a| a.consumed.is_some())
        .count()
}

#[test]
fn a_hundred_concurrent_connects_of_one_device_consume_one_code() {
    let t = open_ledger();
    t.stocked("p1", 50, 3600);
    assert_eq!(consuming_connects(&t, 100), 1);
    assert_eq!(t.ledger.counters().consumed, 1);
    t.invariants();
}

#[test]
fn renewals_of_one_expired_device_race_to_one_code() {
    let t = open_ledger();
    t.stocked("p1", 50, 60);
    t.ledger.connect_blocking("p1", "same").expect("first");
    t.advance_secs(61);
    assert_eq!(consuming_connects(&t, 100), 1);
    assert_eq!(t.ledger.counters().consumed, 2);
    t.invariants();
}

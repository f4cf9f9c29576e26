//! One test per rule of SPEC §2, against a real sled-backed ledger with a
//! manual clock.

use crate::common;

use activation_broker::clock::format_time;
use activation_broker::events::EventKind;
use activation_broker::ledger::*;
use common::*;

const DAY: u64 = 24 * 3600;

fn order(t: &TestLedger, qty: u64, validity: u64, pk: Option<&str>) -> Order {
    match t.run(Command::CreateOrder {
        order_id: None,
        quantity: qty,
        validity_secs: validity,
        product_key: pk.map(Into::into),
    }) {
        Outcome::OrderCreated { order, .. } => order,
        o => panic!("{o:?}"),
    }
}

fn assign(
    t: &TestLedger,
    pk: &str,
    qty: u64,
    validity: Option<u64>,
) -> Result<Outcome, LedgerError> {
    t.ledger.execute_blocking(
        Command::AssignCodes {
            product_key: pk.into(),
            quantity: qty,
            validity_secs: validity,
        },
        None,
    )
}

fn page() -> PageRequest {
    PageRequest::default()
}

#[test]
fn order_assigned_at_purchase_gives_codes_to_the_product() {
    let t = open_ledger();
    t.product("p1", AuthMode::ProductSecret);
    let o = order(&t, 10, 3600, Some("p1"));
    assert_eq!(o.unassigned, 0);
    assert_eq!(o.product_key.as_deref(), Some("p1"));
    let p = t.ledger.product("p1").expect("product");
    assert_eq!((p.total, p.consumed, p.available()), (10, 0, 10));
    assert_eq!(
        p.allowance,
        Some(Allowance {
            validity_secs: 3600
        })
    );
    let c = t.ledger.counters();
    assert_eq!((c.total, c.available, c.unassigned), (10, 10, 0));
    t.invariants();
}

#[test]
fn order_without_product_is_unassigned() {
    let t = open_ledger();
    let o = order(&t, 7, 3600, None);
    assert_eq!(o.unassigned, 7);
    let c = t.ledger.counters();
    assert_eq!(
        (c.total, c.available, c.unassigned, c.consumed),
        (7, 7, 7, 0)
    );
    let groups = t.ledger.unassigned();
    assert_eq!(groups.len(), 1);
    assert_eq!(groups[0].quantity, 7);
    assert_eq!(groups[0].orders[0].order_id, o.order_id);
    t.invariants();
}

#[test]
fn codes_with_equal_allowances_are_interchangeable() {
    let t = open_ledger();
    t.product("p1", AuthMode::ProductSecret);
    let a = order(&t, 3, 3600, None);
    let b = order(&t, 4, 3600, None);
    let out = assign(&t, "p1", 5, Some(3600)).expect("assign across two orders");
    let Outcome::CodesAssigned(asg) = out else {
        panic!()
    };
    assert_eq!(
        asg.orders,
        vec![
            Lot {
                order_id: a.order_id.clone(),
                remaining: 3
            },
            Lot {
                order_id: b.order_id.clone(),
                remaining: 2
            },
        ]
    );
    assert_eq!(t.ledger.order(&b.order_id).expect("order").unassigned, 2);
    t.invariants();
}

#[test]
fn product_has_exactly_one_allowance_set_by_its_first_assignment() {
    let t = open_ledger();
    t.product("p1", AuthMode::ProductSecret);
    order(&t, 5, 3600, None);
    order(&t, 5, 7200, None);
    assert!(t.ledger.product("p1").expect("p").allowance.is_none());
    // Without an allowance the validity must be named.
    assert_eq!(
        assign(&t, "p1", 1, None).map(|_| ()).unwrap_err().code(),
        "InvalidParameter"
    );
    assign(&t, "p1", 2, Some(7200)).expect("first assignment sets the allowance");
    assert_eq!(
        t.ledger.product("p1").expect("p").allowance,
        Some(Allowance {
            validity_secs: 7200
        })
    );
    // Later assignments must match it, with or without ValiditySeconds.
    let err = assign(&t, "p1", 1, Some(3600)).unwrap_err();
    assert!(matches!(
        err,
        LedgerError::AllowanceMismatch {
            product_validity_secs: 7200,
            requested_validity_secs: 3600,
            ..
        }
    ));
    assign(&t, "p1", 1, None).expect("matching allowance implied");
    // An order assigned at purchase must match too.
    let err = t
        .ledger
        .execute_blocking(
            Command::CreateOrder {
                order_id: None,
                quantity: 1,
                validity_secs: 3600,
                product_key: Some("p1".into()),
            },
            None,
        )
        .unwrap_err();
    assert_eq!(err.code(), "AllowanceMismatch");
    t.invariants();
}

#[test]
fn max_assignable_is_the_unassigned_codes_with_a_matching_allowance() {
    let t = open_ledger();
    t.product("p1", AuthMode::ProductSecret);
    order(&t, 5, 3600, None);
    order(&t, 9, 7200, None);
    let preview = t
        .ledger
        .preview_assignment("p1", 6, Some(3600))
        .expect("preview");
    assert_eq!(preview.max_assignable, 5);
    assert_eq!(
        preview.error.as_ref().map(LedgerError::code),
        Some("InsufficientActivationCodes")
    );
    let err = assign(&t, "p1", 6, Some(3600)).unwrap_err();
    assert_eq!(
        err,
        LedgerError::InsufficientCodes {
            requested: 6,
            available: 5
        }
    );
    let preview = t
        .ledger
        .preview_assignment("p1", 5, Some(3600))
        .expect("preview");
    assert!(preview.error.is_none());
    // A dry run changes nothing.
    assert_eq!(t.ledger.counters().unassigned, 14);
    assign(&t, "p1", 5, Some(3600)).expect("assign all");
    assert_eq!(
        t.ledger
            .preview_assignment("p1", 1, None)
            .expect("preview")
            .max_assignable,
        0
    );
    t.invariants();
}

#[test]
fn assignment_is_irrevocable_and_recorded_in_the_history() {
    let t = open_ledger();
    t.product("p1", AuthMode::ProductSecret);
    t.product("p2", AuthMode::ProductSecret);
    order(&t, 10, 3600, None);
    assign(&t, "p1", 4, Some(3600)).expect("assign");
    order(&t, 2, 3600, Some("p2"));
    let all = t.ledger.assignments(&AssignmentFilter::default(), page());
    assert_eq!(all.total, 2);
    let by_pk = t.ledger.assignments(
        &AssignmentFilter {
            product_key: Some("p1".into()),
            ..Default::default()
        },
        page(),
    );
    assert_eq!(by_pk.items.len(), 1);
    assert_eq!(by_pk.items[0].quantity, 4);
    let by_name = t.ledger.assignments(
        &AssignmentFilter {
            product_name: Some("PRODUCT P2".into()),
            ..Default::default()
        },
        page(),
    );
    assert_eq!(by_name.items[0].product_key, "p2");
    // There is no command that moves codes back: the enum has none, and the
    // codes stay with the product after everything else.
    assert_eq!(t.ledger.product("p1").expect("p").total, 4);
    t.invariants();
}

#[test]
fn counters_hold_the_invariants() {
    let t = open_ledger();
    t.stocked("p1", 5, 60);
    order(&t, 3, 60, None);
    for i in 0..3 {
        t.ledger
            .connect_blocking("p1", &format!("d{i}"))
            .expect("admit");
    }
    let c = t.ledger.counters();
    assert_eq!(
        (c.total, c.consumed, c.available, c.unassigned, c.forfeited),
        (8, 3, 5, 3, 0)
    );
    assert_eq!(c.total, c.consumed + c.available + c.forfeited);
    let p = t.ledger.product("p1").expect("p");
    assert_eq!(p.total, p.consumed + p.available());
    t.invariants();
}

#[test]
fn first_connect_consumes_one_code_valid_from_that_moment() {
    let t = open_ledger();
    t.stocked("p1", 2, 3600);
    let a = t.ledger.connect_blocking("p1", "d1").expect("admitted");
    let code = a.consumed.expect("consumed");
    assert_eq!(code.kind, CodeKind::Activation);
    assert_eq!(code.activate_at, T0);
    assert_eq!(code.expire_at, T0 + 3_600_000);
    assert_eq!(a.expire_at, code.expire_at);
    assert_eq!(t.ledger.product("p1").expect("p").available(), 1);
    t.invariants();
}

#[test]
fn reconnect_while_valid_consumes_nothing() {
    let t = open_ledger();
    t.stocked("p1", 2, 3600);
    t.ledger.connect_blocking("p1", "d1").expect("first");
    t.advance_secs(3599);
    let again = t.ledger.connect_blocking("p1", "d1").expect("again");
    assert!(again.consumed.is_none());
    assert_eq!(t.ledger.valid_until("p1", "d1"), Some(T0 + 3_600_000));
    assert_eq!(t.ledger.counters().consumed, 1);
    t.invariants();
}

#[test]
fn expired_code_is_renewed_automatically() {
    let t = open_ledger();
    t.stocked("p1", 2, 3600);
    t.ledger.connect_blocking("p1", "d1").expect("first");
    t.advance_secs(3600);
    assert_eq!(
        t.ledger.valid_until("p1", "d1"),
        None,
        "expired at ExpireAt"
    );
    let a = t.ledger.connect_blocking("p1", "d1").expect("renewed");
    let code = a.consumed.expect("renewal consumes");
    assert_eq!(code.kind, CodeKind::Renewal);
    assert_eq!(code.activate_at, T0 + 3_600_000);
    assert_eq!(t.ledger.counters().consumed, 2);
    t.invariants();
}

#[test]
fn renewal_is_refused_when_automatic_renewal_is_off() {
    let t = open_ledger();
    t.stocked("p1", 5, 60);
    assert!(t.ledger.auto_renewal("p1").expect("ar").0, "on by default");
    t.ledger.connect_blocking("p1", "d1").expect("first");
    t.run(Command::SetAutoRenewal {
        product_key: "p1".into(),
        enabled: false,
    });
    // Still valid: admitted.
    t.ledger.connect_blocking("p1", "d1").expect("valid");
    // First activation of another device is not a renewal: allowed.
    t.ledger
        .connect_blocking("p1", "d2")
        .expect("first activation");
    t.advance_secs(60);
    assert_eq!(
        t.ledger.connect_blocking("p1", "d1"),
        Err(Refusal::RenewalDisabled("p1".into()))
    );
    assert_eq!(t.ledger.counters().consumed, 2);
    t.run(Command::SetAutoRenewal {
        product_key: "p1".into(),
        enabled: true,
    });
    assert!(t
        .ledger
        .connect_blocking("p1", "d1")
        .expect("renewed")
        .consumed
        .is_some());
    t.invariants();
}

#[test]
fn renewal_is_refused_for_a_blacklisted_device() {
    let t = open_ledger();
    t.stocked("p1", 5, 60);
    t.ledger.connect_blocking("p1", "d1").expect("first");
    t.ledger.connect_blocking("p1", "d2").expect("first");
    let out = t.run(Command::AddBlacklist {
        product_key: "p1".into(),
        device_keys: vec!["d1".into()],
    });
    assert_eq!(
        out,
        Outcome::BlacklistChanged {
            product_key: "p1".into(),
            changed: vec!["d1".into()]
        }
    );
    assert_eq!(
        t.ledger.auto_renewal("p1").expect("ar").1,
        vec!["d1".to_string()]
    );
    t.advance_secs(61);
    assert_eq!(
        t.ledger.connect_blocking("p1", "d1"),
        Err(Refusal::Blacklisted("p1".into(), "d1".into()))
    );
    assert!(t
        .ledger
        .connect_blocking("p1", "d2")
        .expect("other renews")
        .consumed
        .is_some());
    t.run(Command::RemoveBlacklist {
        product_key: "p1".into(),
        device_keys: vec!["d1".into()],
    });
    assert!(t
        .ledger
        .connect_blocking("p1", "d1")
        .expect("renews")
        .consumed
        .is_some());
    t.invariants();
}

#[test]
fn no_available_code_refuses_the_connect() {
    let t = open_ledger();
    t.stocked("p1", 1, 60);
    t.ledger.connect_blocking("p1", "d1").expect("first");
    assert_eq!(
        t.ledger.connect_blocking("p1", "d2"),
        Err(Refusal::NoCodeAvailable("p1".into()))
    );
    t.advance_secs(60);
    assert_eq!(
        t.ledger.connect_blocking("p1", "d1"),
        Err(Refusal::NoCodeAvailable("p1".into()))
    );
    // A refused first connect leaves no device behind.
    assert!(t.ledger.device("p1", "d2").is_err());
    t.invariants();
}

#[test]
fn every_device_consumes_at_least_one_code_and_offline_devices_consume_none() {
    let t = open_ledger();
    t.stocked("p1", 10, 60);
    t.ledger.connect_blocking("p1", "d1").expect("first");
    // Time passes with nobody connecting: nothing is consumed.
    t.advance_secs(10 * 60);
    assert_eq!(t.ledger.counters().consumed, 1);
    t.invariants();
}

#[test]
fn deleting_a_device_keeps_its_code_and_a_valid_reconnect_consumes_nothing() {
    let t = open_ledger();
    t.stocked("p1", 5, 3600);
    t.ledger.connect_blocking("p1", "d1").expect("first");
    t.run(Command::DeleteDevice {
        product_key: "p1".into(),
        device_key: "d1".into(),
    });
    assert_eq!(
        t.ledger.device("p1", "d1").unwrap_err().code(),
        "NotFound.Device"
    );
    assert_eq!(
        t.ledger.valid_until("p1", "d1"),
        None,
        "a deleted device is not on the fast path"
    );
    let c = t.ledger.counters();
    assert_eq!(
        (c.consumed, c.available),
        (1, 4),
        "the code is not returned"
    );
    let back = t
        .ledger
        .connect_blocking("p1", "d1")
        .expect("reconnect within validity");
    assert!(back.consumed.is_none());
    assert!(t.ledger.device("p1", "d1").is_ok(), "the device is back");
    assert_eq!(t.ledger.counters().consumed, 1);
    // Deleting twice is an error naming the device.
    t.run(Command::DeleteDevice {
        product_key: "p1".into(),
        device_key: "d1".into(),
    });
    let err = t
        .ledger
        .execute_blocking(
            Command::DeleteDevice {
                product_key: "p1".into(),
                device_key: "d1".into(),
            },
            None,
        )
        .unwrap_err();
    assert_eq!(err, LedgerError::DeviceNotFound("p1".into(), "d1".into()));
    t.invariants();
}

#[test]
fn deleting_a_product_forfeits_its_available_codes() {
    let t = open_ledger();
    t.stocked("p1", 5, 3600);
    order(&t, 2, 3600, None);
    t.ledger.connect_blocking("p1", "d1").expect("first");
    let out = t.run(Command::DeleteProduct {
        product_key: "p1".into(),
    });
    assert_eq!(
        out,
        Outcome::ProductDeleted {
            product_key: "p1".into(),
            forfeited: 4,
            devices: vec!["d1".into()]
        }
    );
    let c = t.ledger.counters();
    assert_eq!(
        (c.total, c.consumed, c.available, c.unassigned, c.forfeited),
        (7, 1, 2, 2, 4)
    );
    assert_eq!(
        t.ledger.connect_blocking("p1", "d1"),
        Err(Refusal::UnknownProduct("p1".into()))
    );
    assert_eq!(
        t.ledger.secret_for("p1", "d1"),
        SecretLookup::UnknownProduct
    );
    let again = t.ledger.execute_blocking(
        Command::CreateProduct {
            product_key: "p1".into(),
            name: "again".into(),
            auth_mode: AuthMode::ProductSecret,
        },
        None,
    );
    assert_eq!(
        again.unwrap_err().code(),
        "Conflict",
        "a ProductKey is never reused"
    );
    t.invariants();
}

#[test]
fn device_secret_products_admit_only_registered_devices() {
    let t = open_ledger();
    let product_secret = t.product("p1", AuthMode::DeviceSecret);
    order(&t, 3, 3600, Some("p1"));
    assert_eq!(t.ledger.secret_for("p1", "d1"), SecretLookup::UnknownDevice);
    assert_eq!(
        t.ledger.connect_blocking("p1", "d1"),
        Err(Refusal::UnknownDevice("p1".into(), "d1".into()))
    );
    let Outcome::DevicesRegistered { devices, .. } = t.run(Command::RegisterDevices {
        product_key: "p1".into(),
        device_keys: vec!["d1".into(), "d2".into()],
    }) else {
        panic!()
    };
    let d1_secret = devices[0].1.clone().expect("device secret");
    assert_ne!(d1_secret, product_secret);
    assert_eq!(
        t.ledger.secret_for("p1", "d1"),
        SecretLookup::Secret(d1_secret.as_str().into())
    );
    t.ledger
        .connect_blocking("p1", "d1")
        .expect("registered device admitted");
    let dup = t.ledger.execute_blocking(
        Command::RegisterDevices {
            product_key: "p1".into(),
            device_keys: vec!["d1".into()],
        },
        None,
    );
    assert_eq!(dup.unwrap_err().code(), "Conflict");
    t.invariants();
}

#[test]
fn product_secret_products_let_any_device_self_register() {
    let t = open_ledger();
    let secret = t.product("p1", AuthMode::ProductSecret);
    order(&t, 3, 3600, Some("p1"));
    assert_eq!(
        t.ledger.secret_for("p1", "anything"),
        SecretLookup::Secret(secret.as_str().into())
    );
    t.ledger
        .connect_blocking("p1", "anything")
        .expect("self-registers");
    assert!(t.ledger.device("p1", "anything").is_ok());
}

#[test]
fn near_expiry_lists_devices_whose_code_expires_within_the_window() {
    let t = open_ledger();
    t.stocked("p1", 10, 40 * DAY);
    t.stocked("p2", 10, 10 * DAY);
    t.ledger.connect_blocking("p1", "a").expect("a");
    t.ledger.connect_blocking("p2", "b").expect("b");
    t.advance_secs(DAY);
    t.ledger.connect_blocking("p2", "c").expect("c");
    let window = 30 * DAY as i64 * 1000;
    let all = t.ledger.near_expiry(window, &CodeFilter::default(), page());
    let keys: Vec<_> = all.items.iter().map(|c| c.device_key.as_str()).collect();
    assert_eq!(keys, vec!["b", "c"], "soonest first; a expires in 39 days");
    assert_eq!(t.ledger.summary(window).near_expiry, 2);
    let by_pk = t.ledger.near_expiry(
        window,
        &CodeFilter {
            device_key: Some("c".into()),
            ..Default::default()
        },
        page(),
    );
    assert_eq!(by_pk.total, 1);
    let by_name = t.ledger.near_expiry(
        window,
        &CodeFilter {
            product_name: Some("p1".into()),
            ..Default::default()
        },
        page(),
    );
    assert_eq!(by_name.total, 0);
    let by_activation = t.ledger.near_expiry(
        window,
        &CodeFilter {
            activate_from: Some(T0 + 1),
            ..Default::default()
        },
        page(),
    );
    assert_eq!(by_activation.items[0].device_key, "c");
    let by_expiry = t.ledger.near_expiry(
        window,
        &CodeFilter {
            expire_to: Some(T0 + 10 * DAY as i64 * 1000),
            ..Default::default()
        },
        page(),
    );
    assert_eq!(by_expiry.total, 1);
    let wider = t
        .ledger
        .near_expiry(40 * DAY as i64 * 1000, &CodeFilter::default(), page());
    assert_eq!(wider.total, 3);
    // Expired codes are no longer near expiry.
    t.advance_secs(10 * DAY);
    assert_eq!(
        t.ledger
            .near_expiry(window, &CodeFilter::default(), page())
            .total,
        1
    );
}

#[test]
fn near_expiry_is_announced_once_per_code() {
    let t = open_ledger();
    t.stocked("p1", 10, 100);
    t.ledger.connect_blocking("p1", "a").expect("a");
    let rt = tokio::runtime::Runtime::new().expect("rt");
    let mut rx = t.events.subscribe();
    let first = rt.block_on(t.ledger.take_expiring(200_000)).expect("take");
    assert_eq!(first.len(), 1);
    assert_eq!(
        rx.try_recv().expect("event").kind,
        EventKind::DeviceExpiring
    );
    assert!(rt
        .block_on(t.ledger.take_expiring(200_000))
        .expect("take")
        .is_empty());
    t.advance_secs(100);
    t.ledger.connect_blocking("p1", "a").expect("renewed");
    assert_eq!(
        rt.block_on(t.ledger.take_expiring(200_000))
            .expect("take")
            .len(),
        1,
        "the new code is announced too"
    );
}

#[test]
fn activation_history_lists_every_code_of_a_device_in_order() {
    let t = open_ledger();
    t.stocked("p1", 10, 60);
    for _ in 0..3 {
        t.ledger.connect_blocking("p1", "d1").expect("admit");
        t.advance_secs(60);
    }
    t.ledger.connect_blocking("p1", "d2").expect("other");
    let h = t.ledger.history("p1", "d1", page()).expect("history");
    assert_eq!(h.total, 3);
    let kinds: Vec<_> = h.items.iter().map(|c| c.kind).collect();
    assert_eq!(
        kinds,
        vec![CodeKind::Activation, CodeKind::Renewal, CodeKind::Renewal]
    );
    assert!(h
        .items
        .windows(2)
        .all(|w| w[0].expire_at <= w[1].activate_at));
    assert_eq!(
        t.ledger.history("p1", "nobody", page()).unwrap_err().code(),
        "NotFound.Device"
    );
}

#[test]
fn consumed_code_records_carry_every_field() {
    let t = open_ledger();
    t.product("p1", AuthMode::ProductSecret);
    t.run(Command::CreateOrder {
        order_id: Some("ORDER-1".into()),
        quantity: 2,
        validity_secs: 90,
        product_key: Some("p1".into()),
    });
    t.ledger.connect_blocking("p1", "d1").expect("admit");
    let codes = t.ledger.codes(&CodeFilter::default(), page());
    let c = &codes.items[0];
    assert_eq!(c.id, 1);
    assert_eq!(
        (
            c.product_key.as_str(),
            c.device_key.as_str(),
            c.order_id.as_str()
        ),
        ("p1", "d1", "ORDER-1")
    );
    assert_eq!(c.kind, CodeKind::Activation);
    assert_eq!(
        (c.activate_at, c.expire_at, c.created, c.modified),
        (T0, T0 + 90_000, T0, T0)
    );
    assert_eq!(format_time(c.activate_at), "2026-01-01 00:00:00");
}

#[test]
fn code_lists_filter_and_paginate_in_a_stable_order() {
    let t = open_ledger();
    t.product("p1", AuthMode::ProductSecret);
    t.run(Command::CreateOrder {
        order_id: Some("A".into()),
        quantity: 150,
        validity_secs: 60,
        product_key: Some("p1".into()),
    });
    t.stocked("p2", 10, 60);
    for i in 0..120 {
        t.ledger
            .connect_blocking("p1", &format!("d{i:03}"))
            .expect("admit");
        if i == 59 {
            t.advance_secs(30);
        }
    }
    t.ledger.connect_blocking("p2", "x").expect("admit");
    assert_eq!(
        PageRequest::new(1, 101).unwrap_err().code(),
        "InvalidParameter"
    );
    assert_eq!(
        PageRequest::new(0, 10).unwrap_err().code(),
        "InvalidParameter"
    );
    let f = CodeFilter {
        product_key: Some("p1".into()),
        ..Default::default()
    };
    let p1 = t.ledger.codes(&f, PageRequest::new(1, 100).expect("page"));
    let p2 = t.ledger.codes(&f, PageRequest::new(2, 100).expect("page"));
    assert_eq!((p1.total, p1.items.len(), p2.items.len()), (120, 100, 20));
    assert!(p1
        .items
        .iter()
        .chain(&p2.items)
        .map(|c| c.id)
        .collect::<Vec<_>>()
        .windows(2)
        .all(|w| w[0] < w[1]));
    assert!(t
        .ledger
        .codes(&f, PageRequest::new(99, 100).expect("page"))
        .items
        .is_empty());
    let by_order = t.ledger.codes(
        &CodeFilter {
            order_id: Some("A".into()),
            ..Default::default()
        },
        page(),
    );
    assert_eq!(by_order.total, 120);
    let late = t.ledger.codes(
        &CodeFilter {
            product_key: Some("p1".into()),
            activate_from: Some(T0 + 1),
            ..Default::default()
        },
        page(),
    );
    assert_eq!(late.total, 60);
    let late_any = t.ledger.codes(
        &CodeFilter {
            activate_from: Some(T0 + 1),
            ..Default::default()
        },
        page(),
    );
    assert_eq!(late_any.total, 61);
    let early_expiry = t.ledger.codes(
        &CodeFilter {
            expire_to: Some(T0 + 60_000),
            ..Default::default()
        },
        page(),
    );
    assert_eq!(early_expiry.total, 60);
    let one = t.ledger.codes(
        &CodeFilter {
            product_key: Some("p1".into()),
            device_key: Some("d007".into()),
            ..Default::default()
        },
        page(),
    );
    assert_eq!(one.items.len(), 1);
    let all = t.ledger.codes(
        &CodeFilter::default(),
        PageRequest::new(2, 100).expect("page"),
    );
    assert_eq!((all.total, all.items.len()), (121, 21));
}

#[test]
fn client_token_makes_mutations_idempotent() {
    let t = open_ledger();
    let create = Command::CreateProduct {
        product_key: "p1".into(),
        name: "One".into(),
        auth_mode: AuthMode::ProductSecret,
    };
    let a = t
        .ledger
        .execute_blocking(create.clone(), Some("tok-1".into()))
        .expect("first");
    let b = t
        .ledger
        .execute_blocking(create, Some("tok-1".into()))
        .expect("retry");
    assert_eq!(a, b, "same token, same answer (and the same secret)");
    let buy = Command::CreateOrder {
        order_id: None,
        quantity: 5,
        validity_secs: 60,
        product_key: Some("p1".into()),
    };
    let o1 = t
        .ledger
        .execute_blocking(buy.clone(), Some("tok-2".into()))
        .expect("buy");
    let o2 = t
        .ledger
        .execute_blocking(buy, Some("tok-2".into()))
        .expect("retry");
    assert_eq!(o1, o2);
    assert_eq!(t.ledger.counters().total, 5, "no second effect");
    let other = Command::CreateOrder {
        order_id: None,
        quantity: 6,
        validity_secs: 60,
        product_key: Some("p1".into()),
    };
    let err = t
        .ledger
        .execute_blocking(other, Some("tok-2".into()))
        .unwrap_err();
    assert_eq!(err.code(), "Conflict");
    t.invariants();
}

#[test]
fn the_ledger_survives_a_reopen() {
    let t = open_ledger();
    t.stocked("p1", 5, 3600);
    order(&t, 3, 60, None);
    t.ledger.connect_blocking("p1", "d1").expect("admit");
    t.run(Command::AddBlacklist {
        product_key: "p1".into(),
        device_keys: vec!["d9".into()],
    });
    let before = t.ledger.counters();
    let dir = t.dir;
    drop(t.ledger);
    let (clock, _h) = activation_broker::clock::Clock::manual(T0);
    let reopened = Ledger::open(
        dir.path(),
        LedgerOptions::default(),
        clock,
        Default::default(),
    )
    .expect("reopen");
    assert_eq!(reopened.counters(), before);
    assert_eq!(reopened.valid_until("p1", "d1"), Some(T0 + 3_600_000));
    assert_eq!(
        reopened.auto_renewal("p1").expect("ar").1,
        vec!["d9".to_string()]
    );
    reopened.check_invariants().expect("invariants");
}

#[test]
fn invalid_parameters_are_refused_with_a_clear_error() {
    let t = open_ledger();
    let bad = |c: Command| t.ledger.execute_blocking(c, None).unwrap_err();
    assert_eq!(
        bad(Command::CreateProduct {
            product_key: "bad key".into(),
            name: "x".into(),
            auth_mode: AuthMode::ProductSecret
        })
        .code(),
        "InvalidParameter"
    );
    assert_eq!(
        bad(Command::CreateOrder {
            order_id: None,
            quantity: 0,
            validity_secs: 60,
            product_key: None
        })
        .code(),
        "InvalidParameter"
    );
    assert_eq!(
        bad(Command::CreateOrder {
            order_id: None,
            quantity: 1,
            validity_secs: 0,
            product_key: None
        })
        .code(),
        "InvalidParameter"
    );
    assert_eq!(
        bad(Command::CreateOrder {
            order_id: None,
            quantity: 1,
            validity_secs: 60,
            product_key: Some("nope".into())
        })
        .code(),
        "NotFound.Product"
    );
    assert_eq!(
        bad(Command::SetAutoRenewal {
            product_key: "nope".into(),
            enabled: true
        })
        .code(),
        "NotFound.Product"
    );
    t.product("p1", AuthMode::ProductSecret);
    assert_eq!(
        bad(Command::AddBlacklist {
            product_key: "p1".into(),
            device_keys: vec!["a/b".into()]
        })
        .code(),
        "InvalidParameter"
    );
    assert_eq!(
        bad(Command::RegisterDevices {
            product_key: "p1".into(),
            device_keys: vec!["a".into(), "a".into()]
        })
        .code(),
        "InvalidParameter"
    );
    assert_eq!(t.ledger.order("nope").unwrap_err().code(), "NotFound.Order");
    assert_eq!(t.ledger.counters().total, 0);
    t.invariants();
}

#[test]
fn events_follow_the_mutations_after_they_are_durable() {
    let t = open_ledger_with(LedgerOptions {
        pool_low_threshold: 2,
        ..Default::default()
    });
    let mut rx = t.events.subscribe();
    t.stocked("p1", 3, 60);
    t.ledger.connect_blocking("p1", "d1").expect("a");
    t.ledger.connect_blocking("p1", "d2").expect("b");
    t.advance_secs(60);
    t.ledger.connect_blocking("p1", "d1").expect("renew");
    t.run(Command::DeleteDevice {
        product_key: "p1".into(),
        device_key: "d2".into(),
    });
    t.run(Command::DeleteProduct {
        product_key: "p1".into(),
    });
    let mut kinds = Vec::new();
    while let Ok(e) = rx.try_recv() {
        kinds.push(e.kind);
    }
    assert_eq!(
        kinds,
        vec![
            EventKind::CodesPurchased,
            EventKind::CodesAssigned,
            EventKind::DeviceActivated,
            EventKind::DeviceActivated,
            EventKind::PoolLow,
            EventKind::DeviceRenewed,
            EventKind::DeviceDeleted,
            EventKind::ProductDeleted,
        ]
    );
}

#[test]
fn the_audit_log_records_every_mutation_with_its_result() {
    let t = open_ledger();
    let rt = tokio::runtime::Runtime::new().expect("rt");
    let entry = |action: &str| AuditEntry {
        account: "ops".into(),
        action: action.into(),
        parameters: "{\"ProductKey\":\"p1\"}".into(),
    };
    rt.block_on(t.ledger.execute_audited(
        Command::CreateProduct {
            product_key: "p1".into(),
            name: "One".into(),
            auth_mode: AuthMode::ProductSecret,
        },
        None,
        Some(entry("CreateProduct")),
    ))
    .expect("created");
    let err = rt.block_on(t.ledger.execute_audited(
        Command::DeleteProduct {
            product_key: "nope".into(),
        },
        None,
        Some(entry("DeleteProduct")),
    ));
    assert!(err.is_err());
    let log = t.ledger.audit_log(&AuditFilter::default(), page());
    assert_eq!(log.total, 2);
    assert_eq!(
        (log.items[0].action.as_str(), log.items[0].code.as_str()),
        ("DeleteProduct", "NotFound.Product")
    );
    assert_eq!(
        (log.items[1].action.as_str(), log.items[1].code.as_str()),
        ("CreateProduct", "OK")
    );
    assert_eq!(log.items[1].account, "ops");
    let only = t.ledger.audit_log(
        &AuditFilter {
            action: Some("CreateProduct".into()),
            ..Default::default()
        },
        page(),
    );
    assert_eq!(only.total, 1);
}

#[test]
fn a_read_only_ledger_refuses_writes_but_admits_valid_devices() {
    let t = open_ledger();
    t.stocked("p1", 5, 3600);
    t.ledger.connect_blocking("p1", "d1").expect("first");
    t.ledger.set_read_only(true);
    assert!(matches!(
        t.ledger.connect_blocking("p1", "d2"),
        Err(Refusal::StoreUnavailable(_))
    ));
    assert!(t
        .ledger
        .connect_blocking("p1", "d1")
        .expect("fast path")
        .consumed
        .is_none());
    let e = t
        .ledger
        .execute_blocking(
            Command::SetAutoRenewal {
                product_key: "p1".into(),
                enabled: false,
            },
            None,
        )
        .unwrap_err();
    assert_eq!(e.code(), "ServiceUnavailable");
    t.ledger.set_read_only(false);
    t.ledger
        .connect_blocking("p1", "d2")
        .expect("writable again");
    t.invariants();
}

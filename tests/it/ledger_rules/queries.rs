//! Near expiry, activation history, consumed-code records, code lists
//! and client tokens.

use super::*;

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

//! Orders, allowances and assignment of codes to products; the counters'
//! invariants.

use super::*;

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

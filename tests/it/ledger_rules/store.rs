//! The ledger as a store: reopen, invalid parameters, events after
//! durability, the audit log, read-only mode.

use super::*;

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
        code_of: activation_broker::admin::error_code,
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

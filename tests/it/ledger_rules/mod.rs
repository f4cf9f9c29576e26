//! One test per rule of SPEC §2, against a real sled-backed ledger with a
//! manual clock.

mod assignment;
mod connect;
mod queries;
mod store;

use crate::common;
use crate::common::ApiCode;

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

//! Model test: random sequences of operations against the real ledger and
//! a plain in-memory model of SPEC §2, checking every answer, the counters
//! and the invariants after every step (and across reopens).

use crate::common;
use crate::common::ApiCode;

use std::collections::{BTreeMap, BTreeSet};

use activation_broker::clock::Clock;
use activation_broker::ledger::*;
use common::T0;
use proptest::prelude::*;

const PRODUCTS: usize = 3;
const DEVICES: usize = 5;
const VALIDITIES: [u64; 2] = [60, 120];

#[derive(Debug, Clone)]
enum Op {
    CreateProduct {
        p: usize,
    },
    Order {
        qty: u64,
        v: usize,
        p: Option<usize>,
    },
    Assign {
        p: usize,
        qty: u64,
        v: Option<usize>,
    },
    Register {
        p: usize,
        d: usize,
    },
    Connect {
        p: usize,
        d: usize,
    },
    Advance {
        secs: u64,
    },
    DeleteDevice {
        p: usize,
        d: usize,
    },
    DeleteProduct {
        p: usize,
    },
    AutoRenewal {
        p: usize,
        on: bool,
    },
    Blacklist {
        p: usize,
        d: usize,
        add: bool,
    },
    Reopen,
}

fn op() -> impl Strategy<Value = Op> {
    let p = 0..PRODUCTS;
    let d = 0..DEVICES;
    prop_oneof![
        2 => p.clone().prop_map(|p| Op::CreateProduct { p }),
        3 => (0..5u64, 0..2usize, prop::option::of(0..PRODUCTS)).prop_map(|(qty, v, p)| Op::Order { qty, v, p }),
        3 => (p.clone(), 0..5u64, prop::option::of(0..2usize)).prop_map(|(p, qty, v)| Op::Assign { p, qty, v }),
        1 => (p.clone(), d.clone()).prop_map(|(p, d)| Op::Register { p, d }),
        10 => (p.clone(), d.clone()).prop_map(|(p, d)| Op::Connect { p, d }),
        4 => (0..150u64).prop_map(|secs| Op::Advance { secs }),
        1 => (p.clone(), d.clone()).prop_map(|(p, d)| Op::DeleteDevice { p, d }),
        1 => p.clone().prop_map(|p| Op::DeleteProduct { p }),
        1 => (p.clone(), any::<bool>()).prop_map(|(p, on)| Op::AutoRenewal { p, on }),
        1 => (p, d, any::<bool>()).prop_map(|(p, d, add)| Op::Blacklist { p, d, add }),
        1 => Just(Op::Reopen),
    ]
}

fn pk(p: usize) -> String {
    format!("p{p}")
}
fn dk(d: usize) -> String {
    format!("d{d}")
}

#[derive(Default, Clone)]
struct MProduct {
    deleted: bool,
    device_secret: bool,
    allowance: Option<u64>,
    pool: u64,
    total: u64,
    consumed: u64,
    renewal_off: bool,
    forfeited: u64,
}

#[derive(Default, Clone)]
struct MDevice {
    deleted: bool,
    expire: Option<i64>,
}

#[derive(Default)]
struct Model {
    now: i64,
    products: BTreeMap<usize, MProduct>,
    devices: BTreeMap<(usize, usize), MDevice>,
    unassigned: BTreeMap<u64, u64>,
    blacklist: BTreeSet<(usize, usize)>,
    total: u64,
}

/// What the model expects of an operation: `Ok(consumed)` / error code.
type Expect = Result<bool, &'static str>;

impl Model {
    fn live(&self, p: usize) -> Option<&MProduct> {
        self.products.get(&p).filter(|x| !x.deleted)
    }

    fn apply(&mut self, op: &Op) -> Expect {
        match *op {
            Op::CreateProduct { p } => {
                if self.products.contains_key(&p) {
                    return Err("Conflict");
                }
                self.products.insert(
                    p,
                    MProduct {
                        device_secret: p == 2,
                        ..Default::default()
                    },
                );
                Ok(false)
            }
            Op::Order { qty, v, p } => {
                let validity = VALIDITIES[v];
                if qty == 0 {
                    return Err("InvalidParameter");
                }
                if let Some(p) = p {
                    let Some(prod) = self.live(p) else {
                        return Err("NotFound.Product");
                    };
                    if prod.allowance.is_some_and(|a| a != validity) {
                        return Err("AllowanceMismatch");
                    }
                    let prod = self.products.get_mut(&p).expect("live");
                    prod.allowance = Some(validity);
                    prod.pool += qty;
                    prod.total += qty;
                } else {
                    *self.unassigned.entry(validity).or_default() += qty;
                }
                self.total += qty;
                Ok(false)
            }
            Op::Assign { p, qty, v } => {
                let Some(prod) = self.live(p) else {
                    return Err("NotFound.Product");
                };
                let requested = v.map(|v| VALIDITIES[v]);
                let allowance = match (prod.allowance, requested) {
                    (Some(a), Some(r)) if a != r => return Err("AllowanceMismatch"),
                    (Some(a), _) => a,
                    (None, Some(r)) => r,
                    (None, None) => return Err("InvalidParameter"),
                };
                if qty == 0 {
                    return Err("InvalidParameter");
                }
                let avail = self.unassigned.get(&allowance).copied().unwrap_or(0);
                if qty > avail {
                    return Err("InsufficientActivationCodes");
                }
                *self.unassigned.entry(allowance).or_default() -= qty;
                let prod = self.products.get_mut(&p).expect("live");
                prod.allowance = Some(allowance);
                prod.pool += qty;
                prod.total += qty;
                Ok(false)
            }
            Op::Register { p, d } => {
                if self.live(p).is_none() {
                    return Err("NotFound.Product");
                }
                match self.devices.get_mut(&(p, d)) {
                    Some(dev) if !dev.deleted => Err("Conflict"),
                    Some(dev) => {
                        dev.deleted = false;
                        Ok(false)
                    }
                    None => {
                        self.devices.insert((p, d), MDevice::default());
                        Ok(false)
                    }
                }
            }
            Op::Connect { p, d } => {
                let Some(prod) = self.live(p).cloned() else {
                    return Err("UnknownProduct");
                };
                let dev = self.devices.get(&(p, d)).cloned();
                if prod.device_secret && dev.as_ref().is_none_or(|x| x.deleted) {
                    return Err("UnknownDevice");
                }
                let renewal = match dev.as_ref().and_then(|x| x.expire) {
                    Some(e) if e > self.now => {
                        self.devices.get_mut(&(p, d)).expect("dev").deleted = false;
                        return Ok(false);
                    }
                    Some(_) => true,
                    None => false,
                };
                if renewal && prod.renewal_off {
                    return Err("RenewalDisabled");
                }
                if renewal && self.blacklist.contains(&(p, d)) {
                    return Err("Blacklisted");
                }
                if prod.pool == 0 {
                    return Err("NoCodeAvailable");
                }
                let prod = self.products.get_mut(&p).expect("live");
                prod.pool -= 1;
                prod.consumed += 1;
                let expire = self.now + prod.allowance.expect("has codes") as i64 * 1000;
                let dev = self.devices.entry((p, d)).or_default();
                dev.deleted = false;
                dev.expire = Some(expire);
                Ok(true)
            }
            Op::Advance { secs } => {
                self.now += secs as i64 * 1000;
                Ok(false)
            }
            Op::DeleteDevice { p, d } => {
                if self.live(p).is_none() {
                    return Err("NotFound.Product");
                }
                match self.devices.get_mut(&(p, d)) {
                    Some(dev) if !dev.deleted => {
                        dev.deleted = true;
                        Ok(false)
                    }
                    _ => Err("NotFound.Device"),
                }
            }
            Op::DeleteProduct { p } => {
                let Some(_) = self.live(p) else {
                    return Err("NotFound.Product");
                };
                let prod = self.products.get_mut(&p).expect("live");
                prod.forfeited = prod.pool;
                prod.pool = 0;
                prod.deleted = true;
                Ok(false)
            }
            Op::AutoRenewal { p, on } => {
                let Some(_) = self.live(p) else {
                    return Err("NotFound.Product");
                };
                self.products.get_mut(&p).expect("live").renewal_off = !on;
                Ok(false)
            }
            Op::Blacklist { p, d, add } => {
                let Some(_) = self.live(p) else {
                    return Err("NotFound.Product");
                };
                if add {
                    self.blacklist.insert((p, d));
                } else {
                    self.blacklist.remove(&(p, d));
                }
                Ok(false)
            }
            Op::Reopen => Ok(false),
        }
    }

    fn counters(&self) -> (u64, u64, u64, u64, u64) {
        let unassigned: u64 = self.unassigned.values().sum();
        let consumed: u64 = self.products.values().map(|p| p.consumed).sum();
        let assigned_avail: u64 = self
            .products
            .values()
            .filter(|p| !p.deleted)
            .map(|p| p.pool)
            .sum();
        let forfeited: u64 = self.products.values().map(|p| p.forfeited).sum();
        (
            self.total,
            consumed,
            unassigned + assigned_avail,
            unassigned,
            forfeited,
        )
    }
}

fn command(op: &Op) -> Option<Command> {
    Some(match *op {
        Op::CreateProduct { p } => Command::CreateProduct {
            product_key: pk(p),
            name: format!("Product {p}"),
            auth_mode: if p == 2 {
                AuthMode::DeviceSecret
            } else {
                AuthMode::ProductSecret
            },
        },
        Op::Order { qty, v, p } => Command::CreateOrder {
            order_id: None,
            quantity: qty,
            validity_secs: VALIDITIES[v],
            product_key: p.map(pk),
        },
        Op::Assign { p, qty, v } => Command::AssignCodes {
            product_key: pk(p),
            quantity: qty,
            validity_secs: v.map(|v| VALIDITIES[v]),
        },
        Op::Register { p, d } => Command::RegisterDevices {
            product_key: pk(p),
            device_keys: vec![dk(d)],
        },
        Op::DeleteDevice { p, d } => Command::DeleteDevice {
            product_key: pk(p),
            device_key: dk(d),
        },
        Op::DeleteProduct { p } => Command::DeleteProduct { product_key: pk(p) },
        Op::AutoRenewal { p, on } => Command::SetAutoRenewal {
            product_key: pk(p),
            enabled: on,
        },
        Op::Blacklist { p, d, add: true } => Command::AddBlacklist {
            product_key: pk(p),
            device_keys: vec![dk(d)],
        },
        Op::Blacklist { p, d, add: false } => Command::RemoveBlacklist {
            product_key: pk(p),
            device_keys: vec![dk(d)],
        },
        _ => return None,
    })
}

fn refusal_name(r: &Refusal) -> &'static str {
    match r {
        Refusal::UnknownProduct(_) => "UnknownProduct",
        Refusal::UnknownDevice(..) => "UnknownDevice",
        Refusal::NoCodeAvailable(_) => "NoCodeAvailable",
        Refusal::RenewalDisabled(_) => "RenewalDisabled",
        Refusal::Blacklisted(..) => "Blacklisted",
        Refusal::StoreUnavailable(_) => "StoreUnavailable",
    }
}

fn run_case(ops: &[Op]) -> Result<(), TestCaseError> {
    let dir = tempfile::tempdir().expect("tempdir");
    let (clock, handle) = Clock::manual(T0);
    let open = || {
        Ledger::open(
            dir.path(),
            LedgerOptions::default(),
            clock.clone(),
            Default::default(),
        )
        .expect("open")
    };
    let mut ledger = open();
    let mut model = Model {
        now: T0,
        ..Default::default()
    };
    for (step, op) in ops.iter().enumerate() {
        let expected = model.apply(op);
        let actual: Expect = match op {
            Op::Connect { p, d } => match ledger.connect_blocking(&pk(*p), &dk(*d)) {
                Ok(a) => Ok(a.consumed.is_some()),
                Err(r) => Err(refusal_name(&r)),
            },
            Op::Advance { secs } => {
                handle.advance(std::time::Duration::from_secs(*secs));
                Ok(false)
            }
            Op::Reopen => {
                drop(ledger);
                ledger = open();
                Ok(false)
            }
            other => match ledger.execute_blocking(command(other).expect("a command"), None) {
                Ok(_) => Ok(false),
                Err(e) => Err(e.code()),
            },
        };
        prop_assert_eq!(actual, expected, "step {} {:?}", step, op);
        let c = ledger.counters();
        prop_assert_eq!(
            (c.total, c.consumed, c.available, c.unassigned, c.forfeited),
            model.counters(),
            "counters after step {} {:?}",
            step,
            op
        );
        if let Err(e) = ledger.check_invariants() {
            return Err(TestCaseError::fail(format!("step {step} {op:?}: {e}")));
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, max_shrink_iters: 2000, ..ProptestConfig::default() })]
    #[test]
    fn ledger_matches_the_model(ops in prop::collection::vec(op(), 1..80)) {
        run_case(&ops)?;
    }
}

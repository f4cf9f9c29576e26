//! Durable records of the ledger. Each is stored bincode-encoded under a
//! typed key prefix in one sled tree (see `store.rs`).

use serde::{Deserialize, Serialize};

use crate::clock::Millis;

/// The package allowance. Codes with equal allowances are interchangeable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Allowance {
    pub validity_secs: u64,
}

impl Allowance {
    pub fn validity_ms(self) -> Millis {
        (self.validity_secs as i64).saturating_mul(1000)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum AuthMode {
    ProductSecret,
    DeviceSecret,
}

impl AuthMode {
    pub fn as_str(self) -> &'static str {
        match self {
            AuthMode::ProductSecret => "product-secret",
            AuthMode::DeviceSecret => "device-secret",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "product-secret" => Some(AuthMode::ProductSecret),
            "device-secret" => Some(AuthMode::DeviceSecret),
            _ => None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum CodeKind {
    Activation,
    Renewal,
}

impl CodeKind {
    pub fn as_str(self) -> &'static str {
        match self {
            CodeKind::Activation => "Activation",
            CodeKind::Renewal => "Renewal",
        }
    }
}

/// A purchase of `quantity` codes with one allowance.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Order {
    pub order_id: String,
    pub quantity: u64,
    pub allowance: Allowance,
    /// Assigned at purchase.
    pub product_key: Option<String>,
    /// Codes of this order not yet given to any product.
    pub unassigned: u64,
    pub created: Millis,
}

/// A run of codes from one order sitting in a product's pool.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lot {
    pub order_id: String,
    pub remaining: u64,
}

/// Takes one code from the oldest of `lots` (a lot left empty is dropped);
/// returns its order id (empty when there is none).
pub fn take_oldest(lots: &mut Vec<Lot>) -> String {
    let Some(lot) = lots.first_mut() else {
        return String::new();
    };
    lot.remaining -= 1;
    let order_id = lot.order_id.clone();
    if lot.remaining == 0 {
        lots.remove(0);
    }
    order_id
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Product {
    pub product_key: String,
    pub name: String,
    pub auth_mode: AuthMode,
    pub secret: String,
    pub allowance: Option<Allowance>,
    pub auto_renewal: bool,
    /// Codes ever given to the product.
    pub total: u64,
    pub consumed: u64,
    /// Available codes, oldest lot first; their sum is `total - consumed`
    /// while the product lives.
    pub pool: Vec<Lot>,
    pub created: Millis,
    /// Set when deleted; a deleted product is a tombstone.
    pub deleted_at: Option<Millis>,
    /// Codes lost when the product was deleted.
    pub forfeited: u64,
}

impl Product {
    pub fn available(&self) -> u64 {
        self.pool.iter().map(|l| l.remaining).sum()
    }
}

/// A node's lane of a product (etcd store only): codes the node moved
/// from the product's pool to consume locally, and the code ids reserved
/// for them, so that batches of different nodes touch different keys.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lane {
    pub product_key: String,
    pub node: String,
    /// Codes held, oldest lot first (each still names its order).
    pub lots: Vec<Lot>,
    /// Codes consumed from this lane, ever.
    pub consumed: u64,
    /// Code ids reserved for this lane: `next_code..end_code`.
    pub next_code: u64,
    pub end_code: u64,
}

impl Lane {
    pub fn available(&self) -> u64 {
        self.lots.iter().map(|l| l.remaining).sum()
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Device {
    pub product_key: String,
    pub device_key: String,
    /// Present for pre-registered devices (`device-secret` products).
    pub secret: Option<String>,
    pub created: Millis,
    /// Set while the device is deleted; the tombstone keeps its validity.
    pub deleted_at: Option<Millis>,
    /// Id of the device's latest consumed code.
    pub current_code: Option<u64>,
    pub expire_at: Option<Millis>,
    /// Every code the device consumed, oldest first.
    pub codes: Vec<u64>,
}

/// A consumed code.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CodeRecord {
    pub id: u64,
    pub product_key: String,
    pub device_key: String,
    pub order_id: String,
    pub kind: CodeKind,
    pub activate_at: Millis,
    pub expire_at: Millis,
    pub created: Millis,
    pub modified: Millis,
    pub name: Option<String>,
    pub description: Option<String>,
    /// Set once the `device/expiring` event has been sent for this code.
    pub expiring_notified: bool,
}

/// An assignment of unassigned codes to a product (or at purchase).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Assignment {
    pub id: u64,
    pub product_key: String,
    pub product_name: String,
    pub quantity: u64,
    pub allowance: Allowance,
    /// Orders the codes came from, with how many from each.
    pub orders: Vec<Lot>,
    pub at: Millis,
}

/// A stored answer to a mutation carrying a `ClientToken`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenRecord {
    /// The encoded command; a retry with other parameters is a conflict.
    pub command: Vec<u8>,
    pub outcome: Vec<u8>,
    pub at: Millis,
}

/// One operator mutation, as the audit log keeps it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditRecord {
    pub id: u64,
    pub at: Millis,
    pub account: String,
    pub action: String,
    /// The request's parameters as JSON text.
    pub parameters: String,
    /// `OK` or the error code.
    pub code: String,
    pub message: String,
}

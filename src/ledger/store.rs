//! On-disk layout: one sled tree, typed key prefixes, bincode-encoded
//! values. Keeping everything in one tree makes every group-commit batch a
//! single atomic `Batch`.

use serde::de::DeserializeOwned;
use serde::Serialize;

use super::LedgerError;

pub const TREE: &str = "ledger";

pub const ORDER: u8 = b'o';
pub const PRODUCT: u8 = b'p';
pub const DEVICE: u8 = b'd';
pub const CODE: u8 = b'c';
pub const ASSIGNMENT: u8 = b'a';
pub const BLACKLIST: u8 = b'b';
pub const TOKEN: u8 = b't';
pub const AUDIT: u8 = b'l';
/// `LANE ProductKey 0x00 node`: a node's lane of a product (etcd only).
pub const LANE: u8 = b'n';
/// The one record holding the next code id no lane reserved (etcd only).
pub const CODE_IDS: u8 = b'i';

fn config() -> bincode::config::Configuration {
    bincode::config::standard()
}

pub fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>, LedgerError> {
    bincode::serde::encode_to_vec(value, config())
        .map_err(|e| LedgerError::Corrupt(format!("encoding a record: {e}")))
}

pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, LedgerError> {
    bincode::serde::decode_from_slice(bytes, config())
        .map(|(v, _)| v)
        .map_err(|e| LedgerError::Corrupt(format!("a record does not decode: {e}")))
}

pub fn str_key(prefix: u8, s: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(1 + s.len());
    k.push(prefix);
    k.extend_from_slice(s.as_bytes());
    k
}

/// `prefix ProductKey 0x00 DeviceKey`: identifiers never contain 0x00, so
/// the keys of one product form one contiguous range.
pub fn pair_key(prefix: u8, pk: &str, dk: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(2 + pk.len() + dk.len());
    k.push(prefix);
    k.extend_from_slice(pk.as_bytes());
    k.push(0);
    k.extend_from_slice(dk.as_bytes());
    k
}

pub fn split_pair(key: &[u8]) -> Option<(String, String)> {
    let rest = key.get(1..)?;
    let nul = rest.iter().position(|&b| b == 0)?;
    let pk = std::str::from_utf8(&rest[..nul]).ok()?;
    let dk = std::str::from_utf8(&rest[nul + 1..]).ok()?;
    Some((pk.to_owned(), dk.to_owned()))
}

pub fn id_key(prefix: u8, id: u64) -> Vec<u8> {
    let mut k = Vec::with_capacity(9);
    k.push(prefix);
    k.extend_from_slice(&id.to_be_bytes());
    k
}

/// Every record of a sled tree, as the ledger's state loads them.
pub fn tree_records(
    tree: &sled::Tree,
) -> impl Iterator<Item = Result<(Vec<u8>, Vec<u8>), LedgerError>> + '_ {
    tree.iter().map(|r| {
        r.map(|(k, v)| (k.to_vec(), v.to_vec()))
            .map_err(LedgerError::from)
    })
}

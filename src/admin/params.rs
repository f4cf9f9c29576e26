//! Typed access to a request's parameters, shared by every action. Each
//! getter removes the parameter it reads; [`Params::finish`] then refuses
//! whatever is left, so a misspelt parameter is an error, not a silent
//! default. `null` counts as absent. Every error is `InvalidParameter`
//! naming the parameter.

use serde_json::{Map, Value};

use super::AdminError;
use crate::clock::{parse_time, Millis};
use crate::credentials::{valid_device_key, valid_product_key};
use crate::ledger::PageRequest;

/// Most DeviceKeys one request may name (the ledger's limit).
pub use crate::ledger::MAX_KEYS_PER_REQUEST as MAX_KEYS;
/// Longest free-text parameter (names, filters).
pub const MAX_TEXT_LEN: usize = 128;
/// Largest page (the ledger's).
pub use crate::ledger::MAX_PAGE_SIZE;
pub const DEFAULT_PAGE_SIZE: u64 = 30;
/// Largest PageNumber; beyond it every list is empty anyway.
pub const MAX_PAGE_NUMBER: u64 = 1_000_000_000;

pub struct Params {
    map: Map<String, Value>,
}

impl Params {
    pub fn new(map: Map<String, Value>) -> Self {
        Params { map }
    }

    fn take(&mut self, name: &str) -> Option<Value> {
        match self.map.remove(name) {
            None | Some(Value::Null) => None,
            Some(v) => Some(v),
        }
    }

    /// Refuses parameters no getter asked for.
    pub fn finish(self) -> Result<(), AdminError> {
        match self.map.keys().next() {
            None => Ok(()),
            Some(k) => Err(AdminError::invalid(
                &k.chars().take(64).collect::<String>(),
                "unknown parameter for this action",
            )),
        }
    }

    pub fn opt_str(&mut self, name: &str) -> Result<Option<String>, AdminError> {
        match self.take(name) {
            None => Ok(None),
            Some(Value::String(s)) => {
                if s.chars().count() > MAX_TEXT_LEN {
                    Err(AdminError::invalid(
                        name,
                        format!("must be at most {MAX_TEXT_LEN} characters"),
                    ))
                } else {
                    Ok(Some(s))
                }
            }
            Some(v) => Err(AdminError::invalid(
                name,
                format!("must be a string, not {}", type_name(&v)),
            )),
        }
    }

    pub fn str(&mut self, name: &str) -> Result<String, AdminError> {
        self.opt_str(name)?.ok_or_else(|| missing(name))
    }

    pub fn opt_product_key(&mut self, name: &str) -> Result<Option<String>, AdminError> {
        match self.opt_str(name)? {
            Some(pk) if !valid_product_key(&pk) => {
                Err(AdminError::invalid(name, "must match [A-Za-z0-9_-]{1,32}"))
            }
            v => Ok(v),
        }
    }

    pub fn product_key(&mut self) -> Result<String, AdminError> {
        self.opt_product_key("ProductKey")?
            .ok_or_else(|| missing("ProductKey"))
    }

    pub fn opt_device_key(&mut self, name: &str) -> Result<Option<String>, AdminError> {
        match self.opt_str(name)? {
            Some(dk) if !valid_device_key(&dk) => {
                Err(AdminError::invalid(name, "must match [A-Za-z0-9_:-]{1,64}"))
            }
            v => Ok(v),
        }
    }

    pub fn device_key(&mut self) -> Result<String, AdminError> {
        self.opt_device_key("DeviceKey")?
            .ok_or_else(|| missing("DeviceKey"))
    }

    /// A list of DeviceKeys: a JSON array of strings, or one string of
    /// comma-separated keys. 1 to [`MAX_KEYS`] distinct, valid keys.
    pub fn device_keys(&mut self, name: &str) -> Result<Vec<String>, AdminError> {
        let keys: Vec<String> = match self.take(name) {
            None => return Err(missing(name)),
            Some(Value::String(s)) => s
                .split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(str::to_owned)
                .collect(),
            Some(Value::Array(items)) => {
                if items.len() > MAX_KEYS {
                    return Err(AdminError::invalid(
                        name,
                        format!("may name at most {MAX_KEYS} devices"),
                    ));
                }
                let mut keys = Vec::with_capacity(items.len());
                for (i, item) in items.into_iter().enumerate() {
                    match item {
                        Value::String(s) => keys.push(s),
                        v => {
                            return Err(AdminError::invalid(
                                &format!("{name}[{i}]"),
                                format!("must be a string, not {}", type_name(&v)),
                            ))
                        }
                    }
                }
                keys
            }
            Some(v) => {
                return Err(AdminError::invalid(
                    name,
                    format!("must be an array of strings, not {}", type_name(&v)),
                ))
            }
        };
        if keys.is_empty() {
            return Err(AdminError::invalid(name, "must name at least one device"));
        }
        if keys.len() > MAX_KEYS {
            return Err(AdminError::invalid(
                name,
                format!("may name at most {MAX_KEYS} devices"),
            ));
        }
        let mut seen = std::collections::BTreeSet::new();
        for (i, dk) in keys.iter().enumerate() {
            if !valid_device_key(dk) {
                return Err(AdminError::invalid(
                    &format!("{name}[{i}]"),
                    "must match [A-Za-z0-9_:-]{1,64}",
                ));
            }
            if !seen.insert(dk.as_str()) {
                return Err(AdminError::invalid(name, format!("{dk} is listed twice")));
            }
        }
        Ok(keys)
    }

    /// A whole number in `min..=max`.
    pub fn opt_u64(&mut self, name: &str, min: u64, max: u64) -> Result<Option<u64>, AdminError> {
        let range = || format!("must be a whole number between {min} and {max}");
        match self.take(name) {
            None => Ok(None),
            Some(Value::Number(n)) => match n.as_u64() {
                Some(v) if (min..=max).contains(&v) => Ok(Some(v)),
                _ => Err(AdminError::invalid(name, range())),
            },
            Some(v) => Err(AdminError::invalid(
                name,
                format!("{}, not {}", range(), type_name(&v)),
            )),
        }
    }

    pub fn u64(&mut self, name: &str, min: u64, max: u64) -> Result<u64, AdminError> {
        self.opt_u64(name, min, max)?.ok_or_else(|| missing(name))
    }

    pub fn opt_bool(&mut self, name: &str) -> Result<Option<bool>, AdminError> {
        match self.take(name) {
            None => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(b)),
            Some(v) => Err(AdminError::invalid(
                name,
                format!("must be true or false, not {}", type_name(&v)),
            )),
        }
    }

    pub fn bool(&mut self, name: &str) -> Result<bool, AdminError> {
        self.opt_bool(name)?.ok_or_else(|| missing(name))
    }

    /// A time `YYYY-MM-DD HH:MM:SS` (UTC) or a date `YYYY-MM-DD`.
    pub fn opt_time(&mut self, name: &str) -> Result<Option<Millis>, AdminError> {
        let why = "must be a time YYYY-MM-DD HH:MM:SS (UTC) or a date YYYY-MM-DD";
        match self.take(name) {
            None => Ok(None),
            Some(Value::String(s)) => parse_time(&s)
                .map(Some)
                .ok_or_else(|| AdminError::invalid(name, why)),
            Some(_) => Err(AdminError::invalid(name, why)),
        }
    }

    /// `PageNumber` (from 1, default 1) and `PageSize` (1..=100, default 30).
    pub fn page(&mut self) -> Result<PageRequest, AdminError> {
        let number = self.opt_u64("PageNumber", 1, MAX_PAGE_NUMBER)?.unwrap_or(1);
        let size = self
            .opt_u64("PageSize", 1, MAX_PAGE_SIZE)?
            .unwrap_or(DEFAULT_PAGE_SIZE);
        PageRequest::new(number, size).map_err(AdminError::from)
    }
}

fn missing(name: &str) -> AdminError {
    AdminError::invalid(name, "is required")
}

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn params(v: Value) -> Params {
        match v {
            Value::Object(m) => Params::new(m),
            _ => Params::new(Map::new()),
        }
    }

    #[test]
    fn numbers_are_range_checked_and_typed() {
        let mut p = params(json!({"A": -1, "B": 1.5, "C": "7", "D": 7, "E": 1e300}));
        assert!(p.opt_u64("A", 0, 10).is_err());
        assert!(p.opt_u64("B", 0, 10).is_err());
        assert!(p.opt_u64("C", 0, 10).is_err());
        assert_eq!(p.opt_u64("D", 0, 10), Ok(Some(7)));
        let e = p.opt_u64("E", 0, 10).unwrap_err();
        assert!(e.message.starts_with("E:"), "{e}");
        p.finish().expect("all read");
    }

    #[test]
    fn leftovers_are_refused_by_name() {
        let mut p = params(json!({"ProductKey": "p1", "Typo": 1}));
        assert_eq!(p.product_key().as_deref(), Ok("p1"));
        let e = p.finish().unwrap_err();
        assert_eq!(e.code, "InvalidParameter");
        assert!(e.message.starts_with("Typo:"), "{e}");
    }

    #[test]
    fn device_keys_accept_arrays_and_comma_lists() {
        let mut p = params(json!({"A": ["a", "b"], "B": "c, d", "C": ["a", "a"], "D": [1]}));
        assert_eq!(p.device_keys("A"), Ok(vec!["a".into(), "b".into()]));
        assert_eq!(p.device_keys("B"), Ok(vec!["c".into(), "d".into()]));
        assert!(p.device_keys("C").is_err());
        assert!(p.device_keys("D").unwrap_err().message.starts_with("D[0]"));
    }

    #[test]
    fn pages_are_bounded() {
        assert!(params(json!({"PageSize": 100})).page().is_ok());
        assert!(params(json!({"PageSize": 101})).page().is_err());
        assert!(params(json!({"PageSize": 0})).page().is_err());
        assert!(params(json!({"PageNumber": 0})).page().is_err());
        assert!(params(json!({"PageSize": 1_000_000_000u64}))
            .page()
            .is_err());
        assert_eq!(
            params(json!({})).page(),
            Ok(PageRequest {
                number: 1,
                size: 30
            })
        );
    }
}

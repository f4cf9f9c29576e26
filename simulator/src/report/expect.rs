//! `--expect` assertions on a report.

use super::*;

pub(super) fn parse_code(s: &str) -> Option<u8> {
    let s = s.trim();
    if let Some(hex) = s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        u8::from_str_radix(hex, 16).ok()
    } else {
        s.parse().ok()
    }
}

/// What an `--expect` assertion looks at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExpectKey {
    Attempted,
    Accepted,
    /// All refusals, or those with one code.
    Refused(Option<u8>),
    Errors,
    Timeouts,
    ServerDisconnects,
    MessagesAcked,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExpectOp {
    Eq,
    AtLeast,
    AtMost,
}

/// `--expect accepted=100`, `refused:0x97=5`, `errors<=0`, `timeouts>=1`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Expectation {
    pub key: ExpectKey,
    pub op: ExpectOp,
    pub value: u64,
}

impl FromStr for Expectation {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let (lhs, op, rhs) = if let Some((l, r)) = s.split_once(">=") {
            (l, ExpectOp::AtLeast, r)
        } else if let Some((l, r)) = s.split_once("<=") {
            (l, ExpectOp::AtMost, r)
        } else if let Some((l, r)) = s.split_once('=') {
            (l, ExpectOp::Eq, r)
        } else {
            return Err(format!(
                "expectation {s:?} must look like accepted=N, refused:0x97=N, errors<=N"
            ));
        };
        let value: u64 = rhs
            .trim()
            .parse()
            .map_err(|_| format!("expectation {s:?}: {rhs:?} is not a count"))?;
        let lhs = lhs.trim().to_ascii_lowercase();
        let key = match lhs.as_str() {
            "attempted" => ExpectKey::Attempted,
            "accepted" => ExpectKey::Accepted,
            "refused" => ExpectKey::Refused(None),
            "errors" => ExpectKey::Errors,
            "timeouts" => ExpectKey::Timeouts,
            "server_disconnects" => ExpectKey::ServerDisconnects,
            "messages_acked" => ExpectKey::MessagesAcked,
            other => match other.strip_prefix("refused:") {
                Some(code) => ExpectKey::Refused(Some(parse_code(code).ok_or_else(|| {
                    format!("expectation {s:?}: {code:?} is not a CONNACK code like 0x97")
                })?)),
                None => {
                    return Err(format!(
                        "expectation {s:?}: unknown counter {lhs:?} (attempted, accepted, \
                         refused, refused:0xNN, errors, timeouts, server_disconnects, \
                         messages_acked)"
                    ))
                }
            },
        };
        Ok(Expectation { key, op, value })
    }
}

impl std::fmt::Display for Expectation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let key = match self.key {
            ExpectKey::Attempted => "attempted".to_owned(),
            ExpectKey::Accepted => "accepted".to_owned(),
            ExpectKey::Refused(None) => "refused".to_owned(),
            ExpectKey::Refused(Some(c)) => format!("refused:{}", code_key(c)),
            ExpectKey::Errors => "errors".to_owned(),
            ExpectKey::Timeouts => "timeouts".to_owned(),
            ExpectKey::ServerDisconnects => "server_disconnects".to_owned(),
            ExpectKey::MessagesAcked => "messages_acked".to_owned(),
        };
        let op = match self.op {
            ExpectOp::Eq => "=",
            ExpectOp::AtLeast => ">=",
            ExpectOp::AtMost => "<=",
        };
        write!(f, "{key}{op}{}", self.value)
    }
}

impl Expectation {
    pub fn actual(&self, r: &Report) -> u64 {
        match self.key {
            ExpectKey::Attempted => r.attempted,
            ExpectKey::Accepted => r.accepted,
            ExpectKey::Refused(None) => r.refused_total(),
            ExpectKey::Refused(Some(c)) => r.refused_with(c),
            ExpectKey::Errors => r.errors,
            ExpectKey::Timeouts => r.timeouts,
            ExpectKey::ServerDisconnects => r.server_disconnects,
            ExpectKey::MessagesAcked => r.messages.as_ref().map(|m| m.acked).unwrap_or(0),
        }
    }

    pub fn holds(&self, r: &Report) -> bool {
        let a = self.actual(r);
        match self.op {
            ExpectOp::Eq => a == self.value,
            ExpectOp::AtLeast => a >= self.value,
            ExpectOp::AtMost => a <= self.value,
        }
    }
}

/// Failed expectations as messages (empty: all hold).
pub fn check_expectations(report: &Report, expectations: &[Expectation]) -> Vec<String> {
    expectations
        .iter()
        .filter(|e| !e.holds(report))
        .map(|e| format!("expected {e}, got {}", e.actual(report)))
        .collect()
}

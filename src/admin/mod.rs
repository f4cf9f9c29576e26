//! The admin plane (SPEC §4): operator and application accounts manage the
//! activation-code pools and watch events over MQTT topics.
//!
//! - [`accounts`]: accounts from the config (`[[accounts]]`), password
//!   hashing, roles, the first-start `admin` bootstrap and the topic rules
//!   the accounts listener enforces.
//! - [`handle`]: the request dispatcher — JSON envelope, role check,
//!   parameter parsing ([`params`]), one module per action ([`actions`]),
//!   rendering ([`render`]).
//! - [`service`]: the in-process router client that serves
//!   `admin/v1/{account}/request` and relays the event bus to
//!   `admin/v1/events/{kind}`.
//! - [`announcer`]: the near-expiry announcer (`device/expiring`).
//! - [`cli`]: `activation-broker admin ...`, the operator CLI over MQTT.
//!
//! Wiring (in `serve`, next to the gateway):
//! ```ignore
//! // config: `#[serde(default)] pub accounts: Vec<admin::accounts::AccountConfig>`
//! let accounts = Arc::new(Accounts::load(&config.accounts, &config.data_dir)?);
//! let ctx = AdminContext::new(ledger.clone(), config.ledger.near_expiry_days);
//! let r = router.clone(); // gateway::RouterHandle (its links have dynamic filters)
//! let admin = AdminService::start(ctx, accounts.clone(), move |id: &str| {
//!     Ok(r.link_blocking(id, true)?)
//! }).await?;
//! let announcer = Announcer::new(ledger.clone(), config.ledger.near_expiry_days,
//!                                config.ledger.expiring_scan_secs).spawn();
//! // accounts listener: log in with `accounts.authenticate(user, password)`,
//! // enforce `account.topic_rules()` (publish / subscribe filter lists).
//! ```
//!
//! Nothing here touches the ledger's internals: mutations go through
//! [`Ledger::execute_audited`] and queries through its Describe* reads.

pub mod accounts;
pub mod actions;
pub mod announcer;
pub mod cli;
pub mod params;
pub mod render;
pub mod service;

use std::sync::Arc;

use serde_json::{Map, Value};

use crate::clock::Millis;
use crate::gate::Gate;
use crate::ledger::{AuditEntry, Command, Ledger, LedgerError, Outcome};

pub use accounts::{Account, Accounts, Role, TopicRules};
pub use actions::{Access, ACTIONS};
pub use params::Params;

/// Largest request payload the dispatcher parses.
pub const MAX_PAYLOAD_BYTES: usize = 256 * 1024;
/// Longest `RequestId` / `ClientToken`.
pub const MAX_REQUEST_ID_LEN: usize = 128;
pub const MAX_CLIENT_TOKEN_LEN: usize = 64;

pub const DAY_MS: Millis = 24 * 3600 * 1000;

/// What the actions need: the ledger and the configured defaults.
#[derive(Clone)]
pub struct AdminContext {
    pub ledger: Ledger,
    /// DescribeNearExpiryDevices' default window and the summary's NearExpiry.
    pub near_expiry_days: u64,
    /// The activation gate, for DescribeBans and RemoveBan.
    pub gate: Option<Arc<Gate>>,
    /// Where BackupLedger writes its files.
    pub backup_dir: Option<std::path::PathBuf>,
}

impl AdminContext {
    pub fn new(ledger: Ledger, near_expiry_days: u64) -> Self {
        AdminContext {
            ledger,
            near_expiry_days,
            gate: None,
            backup_dir: None,
        }
    }

    /// With the directory BackupLedger writes its files to.
    pub fn with_backup_dir(mut self, dir: std::path::PathBuf) -> Self {
        self.backup_dir = Some(dir);
        self
    }

    /// The backup directory, or `ServiceUnavailable` if this context has none.
    pub fn backup_dir(&self) -> Result<&std::path::Path, AdminError> {
        self.backup_dir
            .as_deref()
            .ok_or_else(|| AdminError::unavailable("no backup directory in this admin context"))
    }

    /// With the gate whose bans DescribeBans and RemoveBan see.
    pub fn with_gate(mut self, gate: Arc<Gate>) -> Self {
        self.gate = Some(gate);
        self
    }

    /// The gate, or `ServiceUnavailable` if this context has none.
    pub fn gate(&self) -> Result<&Gate, AdminError> {
        self.gate
            .as_deref()
            .ok_or_else(|| AdminError::unavailable("no activation gate in this admin context"))
    }

    /// The request as the audit log records it.
    pub fn audit_entry(call: &Call) -> AuditEntry {
        AuditEntry {
            account: call.account.clone(),
            action: call.action.clone(),
            parameters: call.audit_parameters.clone(),
            code_of: error_code,
        }
    }

    /// Records `call` and its outcome in the audit log (for actions whose
    /// outcome is not a ledger command, which the ledger audits itself),
    /// then hands the outcome back.
    pub async fn audited(
        &self,
        call: &Call,
        result: Result<render::Data, AdminError>,
    ) -> Result<render::Data, AdminError> {
        let (code, message) = match &result {
            Ok(_) => ("OK", String::new()),
            Err(e) => (e.code, e.message.clone()),
        };
        self.ledger
            .record_audit(Self::audit_entry(call), code, &message)
            .await?;
        result
    }

    pub fn near_expiry_window_ms(&self) -> Millis {
        days_ms(self.near_expiry_days)
    }

    /// Runs a read of the ledger on the blocking pool: queries take the
    /// ledger's read lock, which may wait for a flush.
    pub async fn query<T, F>(&self, f: F) -> Result<T, AdminError>
    where
        T: Send + 'static,
        F: FnOnce(&Ledger) -> Result<T, LedgerError> + Send + 'static,
    {
        let ledger = self.ledger.clone();
        match tokio::task::spawn_blocking(move || f(&ledger)).await {
            Ok(r) => r.map_err(AdminError::from),
            Err(e) => Err(AdminError::unavailable(format!("query failed: {e}"))),
        }
    }

    /// Applies a mutation with the request's ClientToken and audit entry.
    pub async fn execute(&self, call: &Call, command: Command) -> Result<Outcome, AdminError> {
        let audit = AdminContext::audit_entry(call);
        // Tokens are per account: two accounts never collide on one.
        let token = call
            .client_token
            .as_ref()
            .map(|t| format!("{}/{}", call.account, t));
        self.ledger
            .execute_audited(command, token, Some(audit))
            .await
            .map_err(AdminError::from)
    }

    pub fn now(&self) -> Millis {
        self.ledger.clock().now()
    }
}

/// Days as milliseconds, saturating.
pub fn days_ms(days: u64) -> Millis {
    (days.min(i64::MAX as u64) as i64).saturating_mul(DAY_MS)
}

/// The request being served, as the actions see it.
#[derive(Debug, Clone)]
pub struct Call {
    pub account: String,
    pub action: String,
    pub client_token: Option<String>,
    /// The parameters as JSON text, for the audit log (no secrets).
    pub audit_parameters: String,
}

/// An error response: its code, message and optional data (e.g. a dry
/// run's `MaxAssignable`).
#[derive(Debug, Clone, PartialEq)]
pub struct AdminError {
    pub code: &'static str,
    pub message: String,
    pub data: Map<String, Value>,
}

impl AdminError {
    pub fn new(code: &'static str, message: impl Into<String>) -> Self {
        AdminError {
            code,
            message: message.into(),
            data: Map::new(),
        }
    }

    /// `InvalidParameter`, naming the parameter.
    pub fn invalid(param: &str, why: impl std::fmt::Display) -> Self {
        AdminError::new("InvalidParameter", format!("{param}: {why}"))
    }

    pub fn forbidden(message: impl Into<String>) -> Self {
        AdminError::new("Forbidden", message)
    }

    pub fn unavailable(message: impl Into<String>) -> Self {
        AdminError::new("ServiceUnavailable", message)
    }

    pub fn with_data(mut self, data: Map<String, Value>) -> Self {
        self.data = data;
        self
    }
}

/// The admin API's error code (`docs/PROTOCOL.md`) for a ledger refusal.
pub fn error_code(e: &LedgerError) -> &'static str {
    match e {
        LedgerError::InvalidParameter(_) => "InvalidParameter",
        LedgerError::ProductNotFound(_) => "NotFound.Product",
        LedgerError::DeviceNotFound(..) => "NotFound.Device",
        LedgerError::OrderNotFound(_) => "NotFound.Order",
        LedgerError::InsufficientCodes { .. } => "InsufficientActivationCodes",
        LedgerError::AllowanceMismatch { .. } => "AllowanceMismatch",
        LedgerError::Conflict(_) => "Conflict",
        LedgerError::Unavailable(_) | LedgerError::Io(_) | LedgerError::Corrupt(_) => {
            "ServiceUnavailable"
        }
    }
}

impl From<LedgerError> for AdminError {
    fn from(e: LedgerError) -> Self {
        AdminError::new(error_code(&e), e.to_string())
    }
}

impl std::fmt::Display for AdminError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.code, self.message)
    }
}

pub use activation_client::admin::new_request_id;

/// Serves one request of `account`: `{"Action": ..., "RequestId": ...,
/// "ClientToken": ..., ...params}` → `{"RequestId", "Code", "Message", ...data}`.
/// Never panics on client input and always answers.
pub async fn handle(ctx: &AdminContext, account: &Account, payload: &[u8]) -> Value {
    let (request_id, result) = match parse_envelope(account, payload) {
        Ok((request_id, call, action)) => (request_id, action.apply(ctx, &call).await),
        Err((request_id, e)) => (request_id, Err(e)),
    };
    respond(request_id.unwrap_or_else(new_request_id), result)
}

/// The response envelope.
pub fn respond(request_id: String, result: Result<Map<String, Value>, AdminError>) -> Value {
    let mut m = Map::new();
    m.insert("RequestId".into(), Value::String(request_id));
    let data = match result {
        Ok(data) => {
            m.insert("Code".into(), "OK".into());
            m.insert("Message".into(), "OK".into());
            data
        }
        Err(e) => {
            m.insert("Code".into(), e.code.into());
            m.insert("Message".into(), e.message.into());
            e.data
        }
    };
    for (k, v) in data {
        if !m.contains_key(&k) {
            m.insert(k, v);
        }
    }
    Value::Object(m)
}

/// A response as JSON text with `RequestId`, `Code` and `Message` first
/// (the rest in key order), pretty or compact.
pub fn envelope_text(response: &Value, pretty: bool) -> String {
    #[derive(serde::Serialize)]
    struct Envelope<'a> {
        #[serde(rename = "RequestId", skip_serializing_if = "Option::is_none")]
        request_id: Option<&'a Value>,
        #[serde(rename = "Code", skip_serializing_if = "Option::is_none")]
        code: Option<&'a Value>,
        #[serde(rename = "Message", skip_serializing_if = "Option::is_none")]
        message: Option<&'a Value>,
        #[serde(flatten)]
        rest: std::collections::BTreeMap<&'a str, &'a Value>,
    }
    let Value::Object(m) = response else {
        return response.to_string();
    };
    let head = ["RequestId", "Code", "Message"];
    let e = Envelope {
        request_id: m.get("RequestId"),
        code: m.get("Code"),
        message: m.get("Message"),
        rest: m
            .iter()
            .filter(|(k, _)| !head.contains(&k.as_str()))
            .map(|(k, v)| (k.as_str(), v))
            .collect(),
    };
    let text = if pretty {
        serde_json::to_string_pretty(&e)
    } else {
        serde_json::to_string(&e)
    };
    text.unwrap_or_else(|_| response.to_string())
}

type EnvelopeError = (Option<String>, AdminError);

fn parse_envelope(
    account: &Account,
    payload: &[u8],
) -> Result<(Option<String>, Call, actions::Action), EnvelopeError> {
    if payload.len() > MAX_PAYLOAD_BYTES {
        return Err((
            None,
            AdminError::new(
                "InvalidParameter",
                format!(
                    "request: payload of {} bytes exceeds the limit of {MAX_PAYLOAD_BYTES} bytes",
                    payload.len()
                ),
            ),
        ));
    }
    // serde_json refuses nesting deeper than 128 levels with an error.
    let value: Value = serde_json::from_slice(payload).map_err(|e| {
        (
            None,
            AdminError::new("InvalidParameter", format!("request: not valid JSON: {e}")),
        )
    })?;
    let Value::Object(mut map) = value else {
        return Err((
            None,
            AdminError::new("InvalidParameter", "request: must be a JSON object"),
        ));
    };
    // The RequestId is echoed even when the rest of the request is wrong.
    let request_id = match map.remove("RequestId") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) if !s.is_empty() && s.len() <= MAX_REQUEST_ID_LEN => Some(s),
        Some(_) => {
            return Err((
                None,
                AdminError::invalid(
                    "RequestId",
                    format!("must be a string of 1 to {MAX_REQUEST_ID_LEN} characters"),
                ),
            ))
        }
    };
    let fail = |e: AdminError| (request_id.clone(), e);
    let action_name = match map.remove("Action") {
        Some(Value::String(s)) => s,
        None | Some(Value::Null) => return Err(fail(AdminError::invalid("Action", "is required"))),
        Some(_) => return Err(fail(AdminError::invalid("Action", "must be a string"))),
    };
    let client_token = match map.remove("ClientToken") {
        None | Some(Value::Null) => None,
        Some(Value::String(s))
            if !s.is_empty()
                && s.len() <= MAX_CLIENT_TOKEN_LEN
                && s.bytes().all(|b| b.is_ascii_graphic()) =>
        {
            Some(s)
        }
        Some(_) => {
            return Err(fail(AdminError::invalid(
                "ClientToken",
                format!("must be 1 to {MAX_CLIENT_TOKEN_LEN} printable ASCII characters"),
            )))
        }
    };
    let Some(access) = actions::access_of(&action_name) else {
        return Err(fail(AdminError::invalid(
            "Action",
            format!(
                "unknown action {:?}",
                action_name.chars().take(64).collect::<String>()
            ),
        )));
    };
    if !account.may(&action_name) {
        tracing::warn!(account = %account.name, action = %action_name, "admin action refused: role");
        return Err(fail(AdminError::forbidden(format!(
            "account {} may not call {action_name} ({} access)",
            account.name,
            access.as_str()
        ))));
    }
    let audit_parameters = audit_parameters(&map);
    let mut params = Params::new(map);
    let action = actions::Action::parse(&action_name, &mut params)
        .and_then(|a| params.finish().map(|()| a))
        .map_err(fail)?;
    Ok((
        request_id,
        Call {
            account: account.name.clone(),
            action: action_name,
            client_token,
            audit_parameters,
        },
        action,
    ))
}

/// The parameters as the audit log keeps them: secrets are never logged.
fn audit_parameters(params: &Map<String, Value>) -> String {
    let kept: Map<String, Value> = params
        .iter()
        .filter(|(k, _)| {
            let k = k.to_ascii_lowercase();
            !(k.contains("secret") || k.contains("password"))
        })
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    Value::Object(kept).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn envelope_comes_first() {
        let v = json!({"Zeta": 1, "Code": "OK", "Alpha": 2, "RequestId": "r", "Message": "m"});
        assert_eq!(
            envelope_text(&v, false),
            r#"{"RequestId":"r","Code":"OK","Message":"m","Alpha":2,"Zeta":1}"#
        );
        assert_eq!(envelope_text(&json!([1]), false), "[1]");
    }

    #[test]
    fn request_ids_are_unique_and_uuid_sized() {
        let a = new_request_id();
        let b = new_request_id();
        assert_ne!(a, b);
        assert_eq!(a.len(), 32);
        assert!(a.bytes().all(|c| c.is_ascii_hexdigit()));
    }
}

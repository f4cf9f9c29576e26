//! Help for each action, from its module's own documentation (the `//!`
//! lines at the top of its file, which name its parameters) and the format
//! and limits of every parameter it names.

use super::backup_ledger::MAX_FILE_NAME;
use super::create_order::{MAX_QUANTITY, MAX_VALIDITY_SECS};
use super::describe_near_expiry_devices::MAX_DAYS;
use crate::admin::params::{MAX_KEYS, MAX_PAGE_NUMBER, MAX_PAGE_SIZE, MAX_TEXT_LEN};

/// Every parameter name an action may take (besides `RequestId`).
pub fn parameter_names() -> Vec<&'static str> {
    formats().into_iter().map(|(name, _)| name).collect()
}

/// Parameter name → its format and limits (the names used across actions).
fn formats() -> Vec<(&'static str, String)> {
    let time = "time, UTC: \"YYYY-MM-DD HH:MM:SS\" or a date \"YYYY-MM-DD\" (midnight UTC)";
    vec![
        (
            "ProductKey",
            "string [A-Za-z0-9_-], 1 to 32 characters".into(),
        ),
        (
            "DeviceKey",
            "string [A-Za-z0-9_:-], 1 to 64 characters".into(),
        ),
        (
            "DeviceKeys",
            format!("list of DeviceKeys (JSON array or comma-separated), 1 to {MAX_KEYS}"),
        ),
        (
            "DeviceKeyPrefix",
            format!("string, at most {MAX_TEXT_LEN} characters"),
        ),
        (
            "OrderId",
            "string [A-Za-z0-9_:-], 1 to 64 characters".into(),
        ),
        ("Name", format!("string, 1 to {MAX_TEXT_LEN} characters")),
        (
            "ProductName",
            format!("string, at most {MAX_TEXT_LEN} characters"),
        ),
        (
            "Account",
            format!("string, at most {MAX_TEXT_LEN} characters"),
        ),
        (
            "ActionName",
            format!("string, at most {MAX_TEXT_LEN} characters"),
        ),
        ("AuthMode", "\"product-secret\" or \"device-secret\"".into()),
        ("Quantity", format!("integer, 1 to {MAX_QUANTITY}")),
        (
            "ValiditySeconds",
            format!("integer seconds, 1 to {MAX_VALIDITY_SECS} (100 years)"),
        ),
        ("WithinDays", format!("integer days, 1 to {MAX_DAYS}")),
        (
            "PageNumber",
            format!("integer, 1 to {MAX_PAGE_NUMBER} (default 1)"),
        ),
        (
            "PageSize",
            format!("integer, 1 to {MAX_PAGE_SIZE} (default 30)"),
        ),
        ("DryRun", "boolean (the flag alone means true)".into()),
        ("Confirm", "boolean, must be true".into()),
        ("Enabled", "boolean".into()),
        ("UnassignedOnly", "boolean".into()),
        ("Source", "IP address (IPv4 or IPv6)".into()),
        (
            "FileName",
            format!(
                "file name [A-Za-z0-9._-], 1 to {MAX_FILE_NAME} characters, not starting with '.'"
            ),
        ),
        ("ActivateFrom", time.into()),
        ("ActivateTo", time.into()),
        ("ExpireFrom", time.into()),
        ("ExpireTo", time.into()),
        ("From", time.into()),
        ("To", time.into()),
        (
            "ClientToken",
            "string, at most 64 characters: a retry with the same token has no second effect"
                .into(),
        ),
    ]
}

/// The `//!` lines at the top of a source file, without the markers.
fn module_doc(source: &str) -> String {
    source
        .lines()
        .take_while(|l| l.starts_with("//!"))
        .map(|l| l.trim_start_matches("//!").trim_start())
        .collect::<Vec<_>>()
        .join("\n")
}

/// The first sentence-ish line of an action's doc, for `admin actions`.
pub fn summary(source: &str) -> String {
    module_doc(source)
        .split("\n\n")
        .next()
        .unwrap_or_default()
        .replace('\n', " ")
}

/// The help of an action whose module source is `source`: its doc, then
/// the format of each parameter it names (paging for list actions).
pub fn help(name: &str, source: &str, list: bool) -> String {
    let doc = module_doc(source);
    let mut words: Vec<String> = doc
        .split(|c: char| !c.is_ascii_alphanumeric())
        .filter(|w| !w.is_empty())
        .map(str::to_owned)
        .collect();
    // "ActivateFrom/To" names ActivateTo, not To.
    for i in 1..words.len() {
        if words[i] == "To" {
            if let Some(prefix) = words[i - 1].strip_suffix("From") {
                words[i] = format!("{prefix}To");
            }
        }
    }
    let mut out = format!("{doc}\n\nParameters (--Name value):\n");
    let mut any = false;
    for (param, format) in formats() {
        let paging = list && (param == "PageNumber" || param == "PageSize");
        // Every ledger mutation is idempotent with a ClientToken.
        let mutation_token = param == "ClientToken"
            && !list
            && !name.starts_with("Describe")
            && name != "RemoveBan"
            && name != "BackupLedger";
        if words.iter().any(|w| w == param) || paging || mutation_token {
            out.push_str(&format!("  --{param:<18} {format}\n"));
            any = true;
        }
    }
    if !any {
        out.push_str("  (none)\n");
    }
    out
}

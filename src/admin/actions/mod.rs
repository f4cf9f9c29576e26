//! One module per admin action (SPEC §4), each with `parse` (from the
//! request's [`Params`]) and `apply` (against the ledger, rendering the
//! response data). The table below is the single list of actions: names,
//! access levels, parsing and dispatch are generated from it.

use serde_json::{Map, Value};

use super::params::{Params, MAX_TEXT_LEN};
use super::{AdminContext, AdminError, Call};
use crate::ledger::CodeFilter;

mod add_auto_renewal_blacklist;
mod assign_activation_codes;
mod backup_ledger;
mod create_order;
mod create_product;
mod delete_device;
mod delete_product;
mod describe_activation_codes;
mod describe_activation_history;
mod describe_activation_summary;
mod describe_assignment_history;
mod describe_audit_log;
mod describe_auto_renewal;
mod describe_bans;
mod describe_device;
mod describe_devices;
mod describe_near_expiry_devices;
mod describe_orders;
mod describe_products;
mod describe_unassigned_activation_codes;
mod help;

pub use help::parameter_names;
mod register_devices;
mod remove_auto_renewal_blacklist;
mod remove_ban;
mod set_auto_renewal;

/// Access level of an action (SPEC §4). `viewer` accounts may call
/// `Get` and `List` actions (the Describe* ones).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    Get,
    List,
    Create,
    Update,
    Delete,
}

impl Access {
    pub fn as_str(self) -> &'static str {
        match self {
            Access::Get => "get",
            Access::List => "list",
            Access::Create => "create",
            Access::Update => "update",
            Access::Delete => "delete",
        }
    }

    pub fn is_read(self) -> bool {
        matches!(self, Access::Get | Access::List)
    }
}

macro_rules! actions {
    ($( $name:ident => $module:ident, $access:ident; )*) => {
        /// Every action with its access level.
        pub const ACTIONS: &[(&str, Access)] = &[ $( (stringify!($name), Access::$access), )* ];

        /// Every action's module source, whose `//!` doc is its help.
        const SOURCES: &[(&str, &str)] =
            &[ $( (stringify!($name), include_str!(concat!(stringify!($module), ".rs"))), )* ];

        /// A parsed request.
        #[derive(Debug)]
        pub enum Action { $( $name($module::$name), )* }

        impl Action {
            /// Parses the parameters of action `name` (which must be in [`ACTIONS`]).
            pub fn parse(name: &str, p: &mut Params) -> Result<Action, AdminError> {
                match name {
                    $( stringify!($name) => Ok(Action::$name($module::$name::parse(p)?)), )*
                    _ => Err(AdminError::invalid("Action", format!("unknown action {name:?}"))),
                }
            }

            pub async fn apply(
                self,
                ctx: &AdminContext,
                call: &Call,
            ) -> Result<Map<String, Value>, AdminError> {
                match self { $( Action::$name(a) => a.apply(ctx, call).await, )* }
            }
        }
    };
}

actions! {
    DescribeActivationSummary => describe_activation_summary, Get;
    DescribeUnassignedActivationCodes => describe_unassigned_activation_codes, List;
    DescribeProducts => describe_products, List;
    DescribeActivationCodes => describe_activation_codes, List;
    DescribeActivationHistory => describe_activation_history, List;
    DescribeNearExpiryDevices => describe_near_expiry_devices, List;
    DescribeAssignmentHistory => describe_assignment_history, List;
    DescribeOrders => describe_orders, List;
    DescribeDevices => describe_devices, List;
    DescribeDevice => describe_device, Get;
    DescribeAutoRenewal => describe_auto_renewal, Get;
    DescribeAuditLog => describe_audit_log, List;
    DescribeBans => describe_bans, List;
    CreateProduct => create_product, Create;
    RegisterDevices => register_devices, Create;
    CreateOrder => create_order, Create;
    AssignActivationCodes => assign_activation_codes, Update;
    SetAutoRenewal => set_auto_renewal, Update;
    AddAutoRenewalBlacklist => add_auto_renewal_blacklist, Update;
    RemoveAutoRenewalBlacklist => remove_auto_renewal_blacklist, Update;
    DeleteDevice => delete_device, Delete;
    DeleteProduct => delete_product, Delete;
    RemoveBan => remove_ban, Delete;
    BackupLedger => backup_ledger, Create;
}

/// `admin <Action> --help`: what the action does and the format and
/// limits of each of its parameters; `None` for an unknown action.
pub fn help(name: &str) -> Option<String> {
    let (_, source) = SOURCES.iter().find(|(n, _)| *n == name)?;
    let access = access_of(name)?;
    Some(format!(
        "{}
Access: {} (role admin{})
",
        help::help(name, source, access == Access::List),
        access.as_str(),
        if access.is_read() { " or viewer" } else { "" }
    ))
}

/// One line per action for `admin actions`: name, access, summary.
pub fn list() -> String {
    ACTIONS
        .iter()
        .map(|(name, access)| {
            let summary = SOURCES
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, s)| help::summary(s))
                .unwrap_or_default();
            let summary = summary
                .strip_prefix(&format!("{name} [{}]: ", access.as_str()))
                .unwrap_or(&summary)
                .to_owned();
            format!("{name} [{}]\n    {summary}\n", access.as_str())
        })
        .collect()
}

/// The access level of a known action.
pub fn access_of(name: &str) -> Option<Access> {
    ACTIONS.iter().find(|(n, _)| *n == name).map(|(_, a)| *a)
}

/// The consumed-code filters shared by DescribeActivationCodes and
/// DescribeNearExpiryDevices: ProductKey, ProductName, DeviceKey, OrderId,
/// ActivateFrom/To, ExpireFrom/To (bounds inclusive).
fn code_filter(p: &mut Params) -> Result<CodeFilter, AdminError> {
    let f = CodeFilter {
        product_key: p.opt_product_key("ProductKey")?,
        product_name: p.opt_str("ProductName")?,
        device_key: p.opt_device_key("DeviceKey")?,
        order_id: p.opt_device_key("OrderId")?,
        activate_from: p.opt_time("ActivateFrom")?,
        activate_to: p.opt_time("ActivateTo")?,
        expire_from: p.opt_time("ExpireFrom")?,
        expire_to: p.opt_time("ExpireTo")?,
    };
    if let (Some(a), Some(b)) = (f.activate_from, f.activate_to) {
        if a > b {
            return Err(AdminError::invalid("ActivateTo", "is before ActivateFrom"));
        }
    }
    if let (Some(a), Some(b)) = (f.expire_from, f.expire_to) {
        if a > b {
            return Err(AdminError::invalid("ExpireTo", "is before ExpireFrom"));
        }
    }
    Ok(f)
}

/// The product name for a new product: 1 to 128 characters.
fn product_name(p: &mut Params) -> Result<Option<String>, AdminError> {
    match p.opt_str("Name")? {
        Some(n) if n.trim().is_empty() => Err(AdminError::invalid(
            "Name",
            format!("must be 1 to {MAX_TEXT_LEN} characters"),
        )),
        n => Ok(n),
    }
}

/// A ledger outcome that does not belong to the command (never expected).
fn unexpected(outcome: &crate::ledger::Outcome) -> AdminError {
    AdminError::unavailable(format!("unexpected ledger outcome {outcome:?}"))
}

//! JSON renderings of ledger records, with the PascalCase field names of
//! SPEC §4 and times as `YYYY-MM-DD HH:MM:SS` UTC.

use serde_json::{json, Map, Value};

use crate::clock::{format_time, Millis};
use crate::ledger::{
    Allowance, Assignment, AuditRecord, CodeRecord, Device, Lot, Order, Page, Product,
};

/// A response's data, built key by key.
pub type Data = Map<String, Value>;

pub fn time(ms: Millis) -> Value {
    Value::String(format_time(ms))
}

pub fn opt_time(ms: Option<Millis>) -> Value {
    ms.map_or(Value::Null, time)
}

/// `Items`, `PageNumber`, `PageSize`, `PageRecordCount`, `TotalRecordCount`.
pub fn page<T>(page: &Page<T>, item: impl Fn(&T) -> Value) -> Data {
    let mut m = Data::new();
    m.insert(
        "Items".into(),
        Value::Array(page.items.iter().map(item).collect()),
    );
    m.insert("PageNumber".into(), page.page_number.into());
    m.insert("PageSize".into(), page.page_size.into());
    m.insert("PageRecordCount".into(), (page.items.len() as u64).into());
    m.insert("TotalRecordCount".into(), page.total.into());
    m
}

pub fn allowance(a: Option<Allowance>) -> Value {
    a.map_or(
        Value::Null,
        |a| json!({ "ValiditySeconds": a.validity_secs }),
    )
}

pub fn lots(lots: &[Lot]) -> Value {
    Value::Array(
        lots.iter()
            .map(|l| json!({ "OrderId": l.order_id, "Quantity": l.remaining }))
            .collect(),
    )
}

pub fn code(c: &CodeRecord) -> Value {
    json!({
        "Id": c.id,
        "ProductKey": c.product_key,
        "DeviceKey": c.device_key,
        "OrderId": c.order_id,
        "Kind": c.kind.as_str(),
        "ActivateAt": time(c.activate_at),
        "ExpireAt": time(c.expire_at),
        "GmtCreated": time(c.created),
        "GmtModified": time(c.modified),
        "Name": c.name,
        "Description": c.description,
    })
}

pub fn product(p: &Product) -> Value {
    json!({
        "ProductKey": p.product_key,
        "Name": p.name,
        "AuthMode": p.auth_mode.as_str(),
        "Total": p.total,
        "Consumed": p.consumed,
        "Available": p.available(),
        "Allowance": allowance(p.allowance),
        "AutoRenewal": p.auto_renewal,
        "GmtCreated": time(p.created),
    })
}

pub fn order(o: &Order) -> Value {
    json!({
        "OrderId": o.order_id,
        "Quantity": o.quantity,
        "Allowance": allowance(Some(o.allowance)),
        "ProductKey": o.product_key,
        "Unassigned": o.unassigned,
        "GmtCreated": time(o.created),
    })
}

pub fn assignment(a: &Assignment) -> Value {
    json!({
        "Id": a.id,
        "ProductKey": a.product_key,
        "ProductName": a.product_name,
        "Quantity": a.quantity,
        "Allowance": allowance(Some(a.allowance)),
        "Orders": lots(&a.orders),
        "GmtCreated": time(a.at),
    })
}

/// `Inactive` (never activated), `Active` (valid code) or `Expired`.
pub fn device_status(d: &Device, now: Millis) -> &'static str {
    match d.expire_at {
        None => "Inactive",
        Some(e) if e > now => "Active",
        Some(_) => "Expired",
    }
}

pub fn device(d: &Device, now: Millis) -> Value {
    json!({
        "ProductKey": d.product_key,
        "DeviceKey": d.device_key,
        "Status": device_status(d, now),
        "CurrentCodeId": d.current_code,
        "ExpireAt": opt_time(d.expire_at),
        "CodeCount": d.codes.len() as u64,
        "GmtCreated": time(d.created),
    })
}

pub fn audit(a: &AuditRecord) -> Value {
    let parameters =
        serde_json::from_str::<Value>(&a.parameters).unwrap_or(Value::String(a.parameters.clone()));
    json!({
        "Id": a.id,
        "GmtCreated": time(a.at),
        "Account": a.account,
        "Action": a.action,
        "Parameters": parameters,
        "Code": a.code,
        "Message": a.message,
    })
}

/// Moves the fields of a JSON object into `data`.
pub fn merge(data: &mut Data, v: Value) {
    if let Value::Object(m) = v {
        data.extend(m);
    }
}

/// A one-object response.
pub fn object(v: Value) -> Data {
    let mut d = Data::new();
    merge(&mut d, v);
    d
}

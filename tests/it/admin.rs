//! The admin plane end to end through rumqttd's real router: operator
//! clients are local links publishing to `admin/v1/{account}/request` and
//! reading `admin/v1/{account}/response` and `admin/v1/events/#`, against a
//! real ledger in a tempdir with a manual clock. No sleeps: every wait is
//! for a message, with a timeout.

use crate::common;

use std::sync::Arc;
use std::time::Duration;

use activation_broker::admin::accounts::{Account, Accounts, Role};
use activation_broker::admin::announcer::Announcer;
use activation_broker::admin::service::AdminService;
use activation_broker::admin::{AdminContext, ACTIONS};
use activation_broker::events::{Event, EventKind};
use activation_broker::ledger::LedgerOptions;
use bytes::Bytes;
use common::*;
use rumqttd::local::{LinkBuilder, LinkRx, LinkTx};
use rumqttd::protocol::{Packet, Publish, PublishProperties};
use rumqttd::{Notification, Router, RouterConfig};
use serde_json::{json, Value};

const WAIT: Duration = Duration::from_secs(20);
const DAY: u64 = 24 * 3600;

type LinkFactory = Arc<dyn Fn(&str) -> (LinkTx, LinkRx) + Send + Sync>;

fn router_config() -> RouterConfig {
    RouterConfig {
        max_connections: 64,
        max_outgoing_packet_count: 200,
        max_segment_size: 4 * 1024 * 1024,
        max_segment_count: 10,
        custom_segment: None,
        initialized_filters: None,
        shared_subscriptions_strategy: Default::default(),
        ..Default::default()
    }
}

struct Harness {
    t: TestLedger,
    links: LinkFactory,
    _service: AdminService,
}

/// A client of the router: a local link with what it received.
struct Client {
    tx: LinkTx,
    rx: LinkRx,
    account: String,
}

impl Harness {
    async fn start() -> Harness {
        Harness::start_with(LedgerOptions::default()).await
    }

    async fn start_with(options: LedgerOptions) -> Harness {
        let t = open_ledger_with(options);
        let router_tx = Router::new(0, router_config()).spawn();
        let links: LinkFactory = Arc::new(move |id: &str| {
            let (tx, rx, _ack) = LinkBuilder::new(id, router_tx.clone())
                .dynamic_filters(true)
                .build()
                .expect("router link");
            (tx, rx)
        });
        let mut accounts = Accounts::default();
        let mut ops = Account::new("ops", Role::Admin);
        ops.events = true;
        ops.publish = vec!["devices/+/+/command/#".into()];
        accounts.insert(ops);
        accounts.insert(Account::new("viewer", Role::Viewer));
        accounts.insert(Account::new("nobody", Role::None));
        accounts.insert(Account::new(
            "buyer",
            Role::Actions(["CreateOrder".to_owned()].into()),
        ));
        let ctx = AdminContext::new(t.ledger.clone(), 30);
        let l = links.clone();
        let service = AdminService::start(ctx, Arc::new(accounts), move |id: &str| Ok(l(id)))
            .await
            .expect("admin service starts");
        Harness {
            t,
            links,
            _service: service,
        }
    }

    /// A client of `account` subscribed to `filters`.
    async fn client(&self, account: &str, filters: &[&str]) -> Client {
        let links = self.links.clone();
        let id = format!("{account}-client-{}", rand::random::<u32>());
        let filters: Vec<String> = filters.iter().map(|f| (*f).to_owned()).collect();
        let account = account.to_owned();
        tokio::task::spawn_blocking(move || {
            let (mut tx, mut rx) = links(&id);
            for f in &filters {
                tx.subscribe(f.clone()).expect("subscribe");
                let deadline = std::time::Instant::now() + WAIT;
                loop {
                    match rx.recv_deadline(deadline).expect("suback in time") {
                        Some(Notification::DeviceAck(_)) => break,
                        Some(Notification::Unschedule) => rx.ready().expect("ready"),
                        _ => {}
                    }
                }
            }
            Client { tx, rx, account }
        })
        .await
        .expect("client link")
    }

    /// An operator client of `account` reading its response topic.
    async fn operator(&self, account: &str) -> Client {
        self.client(account, &[&format!("admin/v1/{account}/response")])
            .await
    }

    /// A client reading every event.
    async fn events(&self) -> Client {
        self.client("ops", &["admin/v1/events/#"]).await
    }
}

impl Client {
    async fn send_raw(&mut self, payload: impl Into<Bytes>, props: Option<PublishProperties>) {
        let topic = format!("admin/v1/{}/request", self.account);
        let publish = Publish::new(Bytes::from(topic), payload.into(), false);
        self.tx
            .send(Packet::Publish(publish, props))
            .await
            .expect("publish");
    }

    /// The next message this client receives: `(topic, payload, properties)`.
    async fn next(&mut self) -> (String, Value, Option<PublishProperties>) {
        let fut = async {
            loop {
                match self.rx.next().await.expect("link alive") {
                    Some(Notification::Forward(f)) => {
                        let topic = String::from_utf8_lossy(&f.publish.topic).into_owned();
                        let v: Value =
                            serde_json::from_slice(&f.publish.payload).expect("JSON payload");
                        return (topic, v, f.properties);
                    }
                    Some(Notification::Unschedule) => self.rx.wake().await.expect("wake"),
                    _ => {}
                }
            }
        };
        tokio::time::timeout(WAIT, fut)
            .await
            .expect("message in time")
    }

    async fn call_raw(&mut self, payload: impl Into<Bytes>) -> Value {
        self.send_raw(payload, None).await;
        let (topic, v, _) = self.next().await;
        assert_eq!(topic, format!("admin/v1/{}/response", self.account));
        v
    }

    async fn call(&mut self, request: Value) -> Value {
        self.call_raw(request.to_string()).await
    }

    /// Calls and asserts the response Code.
    async fn expect(&mut self, code: &str, request: Value) -> Value {
        let r = self.call(request.clone()).await;
        assert_eq!(r["Code"], code, "{request} → {r:#}");
        r
    }

    async fn ok(&mut self, request: Value) -> Value {
        self.expect("OK", request).await
    }

    /// The next event: `(kind, payload)`.
    async fn event(&mut self) -> (String, Value) {
        let (topic, v, _) = self.next().await;
        let kind = topic
            .strip_prefix("admin/v1/events/")
            .unwrap_or_else(|| panic!("not an event topic: {topic}"))
            .to_owned();
        assert_eq!(v["Event"], kind.as_str());
        (kind, v)
    }
}

fn invalid_naming(r: &Value, param: &str) {
    assert_eq!(r["Code"], "InvalidParameter", "{r:#}");
    let msg = r["Message"].as_str().unwrap_or_default();
    assert!(msg.starts_with(&format!("{param}:")), "{msg}");
}

#[tokio::test(flavor = "multi_thread")]
async fn every_action_happy_path() {
    let h = Harness::start().await;
    let mut ops = h.operator("ops").await;

    let r = ops
        .ok(json!({"Action": "CreateProduct", "ProductKey": "p1", "Name": "Thermostat", "RequestId": "r-1"}))
        .await;
    assert_eq!(r["RequestId"], "r-1");
    assert_eq!(r["ProductKey"], "p1");
    assert_eq!(r["AuthMode"], "product-secret");
    assert!(r["ProductSecret"].as_str().map(str::len).unwrap_or(0) > 8);
    let r = ops
        .ok(json!({"Action": "CreateProduct", "ProductKey": "p2", "AuthMode": "device-secret"}))
        .await;
    assert_eq!(r["Name"], "p2");
    assert_eq!(r["RequestId"].as_str().map(str::len), Some(32));

    let r = ops
        .ok(json!({"Action": "RegisterDevices", "ProductKey": "p2", "DeviceKeys": ["d1", "d2"]}))
        .await;
    let secrets = r["DeviceSecrets"].as_array().expect("DeviceSecrets");
    assert_eq!(secrets.len(), 2);
    assert_eq!(secrets[0]["DeviceKey"], "d1");
    assert!(secrets[0]["DeviceSecret"].is_string());

    let r = ops
        .ok(json!({"Action": "CreateOrder", "OrderId": "o-1", "Quantity": 10, "ValiditySeconds": 40 * DAY}))
        .await;
    assert_eq!(r["OrderId"], "o-1");
    assert_eq!(r["Unassigned"], 10);
    assert_eq!(r["Allowance"]["ValiditySeconds"], 40 * DAY);
    assert_eq!(r["GmtCreated"], "2026-01-01 00:00:00");
    assert!(r["Assignment"].is_null());
    let r = ops
        .ok(json!({"Action": "CreateOrder", "Quantity": 5, "ValiditySeconds": 40 * DAY, "ProductKey": "p2"}))
        .await;
    assert_eq!(r["Assignment"]["Quantity"], 5);

    let r = ops
        .ok(json!({"Action": "DescribeUnassignedActivationCodes"}))
        .await;
    assert_eq!(r["TotalQuantity"], 10);
    assert_eq!(r["Items"][0]["Quantity"], 10);
    assert_eq!(r["Items"][0]["Orders"][0]["OrderId"], "o-1");

    let r = ops
        .ok(json!({"Action": "AssignActivationCodes", "ProductKey": "p1", "Quantity": 4, "ValiditySeconds": 40 * DAY}))
        .await;
    assert_eq!(r["Quantity"], 4);
    assert_eq!(r["Orders"], json!([{"OrderId": "o-1", "Quantity": 4}]));

    let r = ops
        .ok(json!({"Action": "DescribeAssignmentHistory", "ProductName": "thermo"}))
        .await;
    assert_eq!(r["TotalRecordCount"], 1);
    assert_eq!(r["Items"][0]["ProductName"], "Thermostat");

    let r = ops
        .ok(json!({"Action": "DescribeProducts", "Name": "THERMO"}))
        .await;
    assert_eq!(r["TotalRecordCount"], 1);
    let p = &r["Items"][0];
    assert_eq!(
        (
            p["ProductKey"].clone(),
            p["Total"].clone(),
            p["Available"].clone(),
            p["AutoRenewal"].clone()
        ),
        (json!("p1"), json!(4), json!(4), json!(true))
    );
    assert!(p.get("ProductSecret").is_none(), "secrets are never listed");

    let r = ops
        .ok(json!({"Action": "DescribeOrders", "UnassignedOnly": true}))
        .await;
    assert_eq!(r["TotalRecordCount"], 1);
    assert_eq!(r["Items"][0]["Unassigned"], 6);
    let r = ops
        .ok(json!({"Action": "DescribeOrders", "OrderId": "o-1"}))
        .await;
    assert_eq!(r["Items"][0]["OrderId"], "o-1");
    ops.expect(
        "NotFound.Order",
        json!({"Action": "DescribeOrders", "OrderId": "nope"}),
    )
    .await;

    // A device activates: its code shows everywhere.
    h.t.ledger.connect("p1", "dev-a").await.expect("admitted");
    h.t.advance_secs(3600);
    let r = ops
        .ok(json!({"Action": "DescribeActivationCodes", "ProductKey": "p1"}))
        .await;
    assert_eq!(r["TotalRecordCount"], 1);
    let c = &r["Items"][0];
    for key in [
        "Id",
        "ProductKey",
        "DeviceKey",
        "OrderId",
        "Kind",
        "ActivateAt",
        "ExpireAt",
        "GmtCreated",
        "GmtModified",
        "Name",
        "Description",
    ] {
        assert!(c.get(key).is_some(), "code record lacks {key}: {c}");
    }
    assert_eq!(c["Kind"], "Activation");
    assert_eq!(c["ActivateAt"], "2026-01-01 00:00:00");
    assert_eq!(c["ExpireAt"], "2026-02-10 00:00:00");
    let r = ops
        .ok(json!({"Action": "DescribeActivationCodes", "ActivateFrom": "2026-01-01", "ActivateTo": "2026-01-01 00:00:00"}))
        .await;
    assert_eq!(r["TotalRecordCount"], 1);
    let r = ops
        .ok(json!({"Action": "DescribeActivationCodes", "ExpireFrom": "2026-03-01"}))
        .await;
    assert_eq!(r["TotalRecordCount"], 0);

    let r = ops
        .ok(json!({"Action": "DescribeActivationHistory", "ProductKey": "p1", "DeviceKey": "dev-a"}))
        .await;
    assert_eq!(r["Items"][0]["DeviceKey"], "dev-a");

    // 40-day code: not near expiry with 30 days, near expiry with 45.
    let r = ops.ok(json!({"Action": "DescribeNearExpiryDevices"})).await;
    assert_eq!(
        (r["WithinDays"].clone(), r["TotalRecordCount"].clone()),
        (json!(30), json!(0))
    );
    let r = ops
        .ok(json!({"Action": "DescribeNearExpiryDevices", "WithinDays": 45, "ProductKey": "p1"}))
        .await;
    assert_eq!(r["TotalRecordCount"], 1);

    let r = ops.ok(json!({"Action": "DescribeActivationSummary"})).await;
    assert_eq!(
        r,
        json!({
            "RequestId": r["RequestId"], "Code": "OK", "Message": "OK",
            "Total": 15, "Consumed": 1, "Available": 14, "Unassigned": 6, "Forfeited": 0,
            "NearExpiry": 0, "NearExpiryWithinDays": 30, "Products": 2,
        })
    );

    let r = ops
        .ok(json!({"Action": "DescribeDevices", "ProductKey": "p1"}))
        .await;
    assert_eq!(r["Items"][0]["Status"], "Active");
    let r = ops
        .ok(json!({"Action": "DescribeDevices", "ProductKey": "p2", "DeviceKeyPrefix": "d"}))
        .await;
    assert_eq!(r["TotalRecordCount"], 2);
    assert_eq!(r["Items"][0]["Status"], "Inactive");
    let r = ops
        .ok(json!({"Action": "DescribeDevice", "ProductKey": "p1", "DeviceKey": "dev-a"}))
        .await;
    assert_eq!(r["CurrentCode"]["DeviceKey"], "dev-a");
    assert_eq!(r["Blacklisted"], false);

    let r = ops
        .ok(json!({"Action": "SetAutoRenewal", "ProductKey": "p1", "Enabled": false}))
        .await;
    assert_eq!(r["Enabled"], false);
    let r = ops
        .ok(json!({"Action": "AddAutoRenewalBlacklist", "ProductKey": "p1", "DeviceKeys": "dev-a,dev-b"}))
        .await;
    assert_eq!(r["Changed"], json!(["dev-a", "dev-b"]));
    let r = ops
        .ok(json!({"Action": "RemoveAutoRenewalBlacklist", "ProductKey": "p1", "DeviceKeys": ["dev-b", "dev-c"]}))
        .await;
    assert_eq!(r["Changed"], json!(["dev-b"]));
    let r = ops
        .ok(json!({"Action": "DescribeAutoRenewal", "ProductKey": "p1"}))
        .await;
    assert_eq!(
        (r["Enabled"].clone(), r["Blacklist"].clone()),
        (json!(false), json!(["dev-a"]))
    );

    let r = ops
        .ok(json!({"Action": "DeleteDevice", "ProductKey": "p1", "DeviceKey": "dev-a"}))
        .await;
    assert_eq!(r["DeviceKey"], "dev-a");
    ops.expect(
        "NotFound.Device",
        json!({"Action": "DescribeDevice", "ProductKey": "p1", "DeviceKey": "dev-a"}),
    )
    .await;
    let r = ops
        .call(json!({"Action": "DeleteProduct", "ProductKey": "p1"}))
        .await;
    invalid_naming(&r, "Confirm");
    let r = ops
        .ok(json!({"Action": "DeleteProduct", "ProductKey": "p1", "Confirm": true}))
        .await;
    assert_eq!(r["Forfeited"], 3);
    ops.expect(
        "NotFound.Product",
        json!({"Action": "DescribeAutoRenewal", "ProductKey": "p1"}),
    )
    .await;
    let r = ops.ok(json!({"Action": "DescribeActivationSummary"})).await;
    assert_eq!(
        (r["Forfeited"].clone(), r["Products"].clone()),
        (json!(3), json!(1))
    );
    h.t.invariants();
}

#[tokio::test(flavor = "multi_thread")]
async fn ledger_errors_come_back_with_their_codes() {
    let h = Harness::start().await;
    let mut ops = h.operator("ops").await;
    ops.expect(
        "NotFound.Product",
        json!({"Action": "AssignActivationCodes", "ProductKey": "nope", "Quantity": 1, "ValiditySeconds": 60}),
    )
    .await;
    ops.ok(json!({"Action": "CreateProduct", "ProductKey": "p1"}))
        .await;
    ops.expect(
        "Conflict",
        json!({"Action": "CreateProduct", "ProductKey": "p1"}),
    )
    .await;
    ops.ok(json!({"Action": "CreateOrder", "Quantity": 2, "ValiditySeconds": 60}))
        .await;
    ops.ok(json!({"Action": "CreateOrder", "Quantity": 2, "ValiditySeconds": 120}))
        .await;
    ops.expect(
        "InsufficientActivationCodes",
        json!({"Action": "AssignActivationCodes", "ProductKey": "p1", "Quantity": 3, "ValiditySeconds": 60}),
    )
    .await;
    ops.ok(json!({"Action": "AssignActivationCodes", "ProductKey": "p1", "Quantity": 1, "ValiditySeconds": 60}))
        .await;
    ops.expect(
        "AllowanceMismatch",
        json!({"Action": "AssignActivationCodes", "ProductKey": "p1", "Quantity": 1, "ValiditySeconds": 120}),
    )
    .await;
    let r = ops
        .call(json!({"Action": "AssignActivationCodes", "ProductKey": "p1", "Quantity": 1}))
        .await;
    assert_eq!(r["Code"], "OK", "the product's allowance is implied: {r}");
    ops.expect(
        "NotFound.Device",
        json!({"Action": "DescribeActivationHistory", "ProductKey": "p1", "DeviceKey": "ghost"}),
    )
    .await;
    ops.expect(
        "NotFound.Device",
        json!({"Action": "DeleteDevice", "ProductKey": "p1", "DeviceKey": "ghost"}),
    )
    .await;
    h.t.invariants();
}

#[tokio::test(flavor = "multi_thread")]
async fn roles_gate_every_action() {
    let h = Harness::start().await;
    let mut ops = h.operator("ops").await;
    ops.ok(json!({"Action": "CreateProduct", "ProductKey": "p1"}))
        .await;
    let mut viewer = h.operator("viewer").await;
    let mut nobody = h.operator("nobody").await;
    for (action, access) in ACTIONS {
        let r = viewer.call(json!({"Action": action})).await;
        if access.is_read() {
            assert_ne!(r["Code"], "Forbidden", "viewer may call {action}: {r}");
        } else {
            assert_eq!(r["Code"], "Forbidden", "viewer may not call {action}: {r}");
        }
        let r = nobody.call(json!({"Action": action})).await;
        assert_eq!(r["Code"], "Forbidden", "{action}: {r}");
    }
    // Refused before any effect, even with valid parameters.
    viewer
        .expect(
            "Forbidden",
            json!({"Action": "DeleteProduct", "ProductKey": "p1", "Confirm": true}),
        )
        .await;
    ops.ok(json!({"Action": "DescribeProducts", "ProductKey": "p1"}))
        .await;
    // An explicit action list.
    let mut buyer = h.operator("buyer").await;
    buyer
        .ok(json!({"Action": "CreateOrder", "Quantity": 1, "ValiditySeconds": 60}))
        .await;
    buyer
        .expect("Forbidden", json!({"Action": "DescribeOrders"}))
        .await;
    // A request on the topic of an unknown account is answered, refused.
    let mut ghost = h.operator("ghost").await;
    let r = ghost.call(json!({"Action": "DescribeProducts"})).await;
    assert_eq!(r["Code"], "Forbidden");
}

#[tokio::test(flavor = "multi_thread")]
async fn pagination_boundaries() {
    let h = Harness::start().await;
    let mut ops = h.operator("ops").await;
    ops.ok(json!({"Action": "CreateProduct", "ProductKey": "p1", "AuthMode": "device-secret"}))
        .await;
    let keys: Vec<String> = (0..250).map(|i| format!("d{i:03}")).collect();
    ops.ok(json!({"Action": "RegisterDevices", "ProductKey": "p1", "DeviceKeys": keys}))
        .await;
    let page = |n: u64, s: u64| json!({"Action": "DescribeDevices", "ProductKey": "p1", "PageNumber": n, "PageSize": s});

    let r = ops
        .ok(json!({"Action": "DescribeDevices", "ProductKey": "p1"}))
        .await;
    assert_eq!(
        (
            r["PageNumber"].clone(),
            r["PageSize"].clone(),
            r["PageRecordCount"].clone(),
            r["TotalRecordCount"].clone()
        ),
        (json!(1), json!(30), json!(30), json!(250))
    );
    let r = ops.ok(page(1, 100)).await;
    assert_eq!(r["PageRecordCount"], 100);
    assert_eq!(r["Items"][0]["DeviceKey"], "d000");
    assert_eq!(r["Items"][99]["DeviceKey"], "d099");
    let r = ops.ok(page(3, 100)).await;
    assert_eq!(r["PageRecordCount"], 50, "last page");
    assert_eq!(r["Items"][49]["DeviceKey"], "d249");
    let r = ops.ok(page(4, 100)).await;
    assert_eq!(
        (
            r["PageRecordCount"].clone(),
            r["TotalRecordCount"].clone(),
            r["Items"].clone()
        ),
        (json!(0), json!(250), json!([])),
        "beyond the last page"
    );
    let r = ops.ok(page(1_000_000, 100)).await;
    assert_eq!(r["Items"], json!([]));
    invalid_naming(&ops.call(page(1, 101)).await, "PageSize");
    invalid_naming(&ops.call(page(1, 0)).await, "PageSize");
    invalid_naming(&ops.call(page(0, 10)).await, "PageNumber");
    invalid_naming(&ops.call(page(1, 1_000_000_000)).await, "PageSize");
    invalid_naming(
        &ops.call(json!({"Action": "DescribeProducts", "PageSize": -1}))
            .await,
        "PageSize",
    );
    invalid_naming(
        &ops.call(json!({"Action": "DescribeProducts", "PageNumber": "2"}))
            .await,
        "PageNumber",
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn client_token_makes_retries_idempotent() {
    let h = Harness::start().await;
    let mut ops = h.operator("ops").await;
    let order = json!({"Action": "CreateOrder", "Quantity": 7, "ValiditySeconds": 3600, "ClientToken": "buy-1"});
    let first = ops.ok(order.clone()).await;
    let again = ops.ok(order.clone()).await;
    let strip = |mut v: Value| {
        v.as_object_mut().map(|m| m.remove("RequestId"));
        v
    };
    assert_eq!(strip(first.clone()), strip(again), "same response");
    let r = ops.ok(json!({"Action": "DescribeActivationSummary"})).await;
    assert_eq!(r["Total"], 7, "one effect");
    let r = ops
        .call(json!({"Action": "CreateOrder", "Quantity": 8, "ValiditySeconds": 3600, "ClientToken": "buy-1"}))
        .await;
    assert_eq!(r["Code"], "Conflict", "{r}");
    // Tokens belong to the account: another account's same token is its own.
    let mut buyer = h.operator("buyer").await;
    let other = buyer
        .ok(json!({"Action": "CreateOrder", "Quantity": 8, "ValiditySeconds": 3600, "ClientToken": "buy-1"}))
        .await;
    assert_ne!(other["OrderId"], first["OrderId"]);
    let r = ops.ok(json!({"Action": "DescribeActivationSummary"})).await;
    assert_eq!(r["Total"], 15);
    invalid_naming(
        &ops.call(
            json!({"Action": "CreateOrder", "Quantity": 1, "ValiditySeconds": 1, "ClientToken": 5}),
        )
        .await,
        "ClientToken",
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn dry_run_changes_nothing() {
    let h = Harness::start().await;
    let mut ops = h.operator("ops").await;
    ops.ok(json!({"Action": "CreateProduct", "ProductKey": "p1"}))
        .await;
    ops.ok(json!({"Action": "CreateOrder", "OrderId": "a", "Quantity": 3, "ValiditySeconds": 60}))
        .await;
    ops.ok(json!({"Action": "CreateOrder", "OrderId": "b", "Quantity": 4, "ValiditySeconds": 60}))
        .await;
    ops.ok(json!({"Action": "CreateOrder", "OrderId": "c", "Quantity": 9, "ValiditySeconds": 120}))
        .await;
    let r = ops
        .ok(json!({"Action": "AssignActivationCodes", "ProductKey": "p1", "Quantity": 5, "ValiditySeconds": 60, "DryRun": true}))
        .await;
    assert_eq!(r["DryRun"], true);
    assert_eq!(r["MaxAssignable"], 7);
    assert_eq!(
        r["Orders"],
        json!([{"OrderId": "a", "Quantity": 3}, {"OrderId": "b", "Quantity": 2}])
    );
    let r = ops
        .expect(
            "InsufficientActivationCodes",
            json!({"Action": "AssignActivationCodes", "ProductKey": "p1", "Quantity": 8, "ValiditySeconds": 60, "DryRun": true}),
        )
        .await;
    assert_eq!(r["MaxAssignable"], 7);
    let r = ops.ok(json!({"Action": "DescribeActivationSummary"})).await;
    assert_eq!(r["Unassigned"], 16, "nothing moved");
    let r = ops
        .ok(json!({"Action": "DescribeProducts", "ProductKey": "p1"}))
        .await;
    assert_eq!(
        (
            r["Items"][0]["Total"].clone(),
            r["Items"][0]["Allowance"].clone()
        ),
        (json!(0), Value::Null)
    );
    let r = ops.ok(json!({"Action": "DescribeAssignmentHistory"})).await;
    assert_eq!(r["TotalRecordCount"], 0);
    let r = ops
        .ok(json!({"Action": "DescribeAuditLog", "ActionName": "AssignActivationCodes"}))
        .await;
    assert_eq!(r["TotalRecordCount"], 0, "a dry run is no mutation");
}

#[tokio::test(flavor = "multi_thread")]
async fn malformed_requests_get_clear_errors() {
    let h = Harness::start().await;
    let mut ops = h.operator("ops").await;
    let r = ops.call_raw("{not json").await;
    assert_eq!(r["Code"], "InvalidParameter");
    assert!(
        r["Message"]
            .as_str()
            .unwrap_or_default()
            .contains("not valid JSON"),
        "{r}"
    );
    assert!(r["RequestId"].is_string());
    let r = ops.call_raw(&b"\xff\xfe"[..]).await;
    assert_eq!(r["Code"], "InvalidParameter");
    let r = ops.call_raw("[1, 2]").await;
    assert!(
        r["Message"]
            .as_str()
            .unwrap_or_default()
            .contains("JSON object"),
        "{r}"
    );
    let r = ops.call(json!({"RequestId": "x"})).await;
    invalid_naming(&r, "Action");
    assert_eq!(r["RequestId"], "x", "the RequestId is echoed on errors");
    invalid_naming(&ops.call(json!({"Action": 5})).await, "Action");
    let r = ops
        .call(json!({"Action": "DropAllTables", "RequestId": "y"}))
        .await;
    invalid_naming(&r, "Action");
    assert_eq!(r["RequestId"], "y");
    invalid_naming(
        &ops.call(json!({"Action": "DescribeProducts", "RequestId": 7}))
            .await,
        "RequestId",
    );
    invalid_naming(
        &ops.call(json!({"Action": "CreateProduct", "ProductKey": 42}))
            .await,
        "ProductKey",
    );
    invalid_naming(
        &ops.call(json!({"Action": "CreateProduct", "ProductKey": "bad key!"}))
            .await,
        "ProductKey",
    );
    invalid_naming(
        &ops.call(json!({"Action": "CreateProduct"})).await,
        "ProductKey",
    );
    invalid_naming(
        &ops.call(json!({"Action": "CreateProduct", "ProductKey": "p", "AuthMode": "magic"}))
            .await,
        "AuthMode",
    );
    invalid_naming(
        &ops.call(json!({"Action": "CreateOrder", "Quantity": -5, "ValiditySeconds": 60}))
            .await,
        "Quantity",
    );
    invalid_naming(
        &ops.call(json!({"Action": "CreateOrder", "Quantity": 1e30, "ValiditySeconds": 60}))
            .await,
        "Quantity",
    );
    invalid_naming(
        &ops.call(json!({"Action": "CreateOrder", "Quantity": 18446744073709551615u64, "ValiditySeconds": 60})).await,
        "Quantity",
    );
    invalid_naming(
        &ops.call(json!({"Action": "CreateOrder", "Quantity": 1, "ValiditySeconds": 0}))
            .await,
        "ValiditySeconds",
    );
    invalid_naming(
        &ops.call(json!({"Action": "SetAutoRenewal", "ProductKey": "p", "Enabled": "yes"}))
            .await,
        "Enabled",
    );
    invalid_naming(
        &ops.call(json!({"Action": "DescribeActivationCodes", "ActivateFrom": "yesterday"}))
            .await,
        "ActivateFrom",
    );
    invalid_naming(
        &ops.call(json!({"Action": "DescribeActivationCodes", "ActivateFrom": "2026-02-01", "ActivateTo": "2026-01-01"})).await,
        "ActivateTo",
    );
    invalid_naming(
        &ops.call(json!({"Action": "DescribeNearExpiryDevices", "WithinDays": 1_000_000_000}))
            .await,
        "WithinDays",
    );
    invalid_naming(
        &ops.call(json!({"Action": "DescribeProducts", "Colour": "blue"}))
            .await,
        "Colour",
    );
    invalid_naming(
        &ops.call(json!({"Action": "RegisterDevices", "ProductKey": "p", "DeviceKeys": [1]}))
            .await,
        "DeviceKeys[0]",
    );
    invalid_naming(
        &ops.call(json!({"Action": "RegisterDevices", "ProductKey": "p", "DeviceKeys": []}))
            .await,
        "DeviceKeys",
    );
    let many: Vec<String> = (0..1001).map(|i| format!("d{i}")).collect();
    invalid_naming(
        &ops.call(json!({"Action": "RegisterDevices", "ProductKey": "p", "DeviceKeys": many}))
            .await,
        "DeviceKeys",
    );
    // Deep nesting: refused by the parser, not a stack overflow.
    let deep = format!(
        "{{\"Action\": \"DescribeProducts\", \"Name\": {}{}}}",
        "[".repeat(100_000),
        "]".repeat(100_000)
    );
    let r = ops.call_raw(deep).await;
    assert_eq!(r["Code"], "InvalidParameter", "{r}");
    let nested = json!({"Action": "DescribeProducts", "Name": {"a": {"b": [[[]]]}}});
    invalid_naming(&ops.call(nested).await, "Name");
    // A huge payload.
    let huge = format!(
        "{{\"Action\": \"DescribeProducts\", \"Name\": \"{}\"}}",
        "x".repeat(300 * 1024)
    );
    let r = ops.call_raw(huge).await;
    assert_eq!(r["Code"], "InvalidParameter");
    assert!(
        r["Message"]
            .as_str()
            .unwrap_or_default()
            .contains("exceeds"),
        "{r}"
    );
    // Still serving.
    ops.ok(json!({"Action": "DescribeActivationSummary"})).await;
    let r = ops.ok(json!({"Action": "DescribeAuditLog"})).await;
    assert_eq!(
        r["TotalRecordCount"], 0,
        "refused requests are no mutations"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn mqtt5_response_topic_and_correlation_data() {
    let h = Harness::start().await;
    let mut ops = h
        .client(
            "ops",
            // `.../response/#` matches `.../response` too.
            &["admin/v1/ops/response/#", "devices/p/d/command/reply"],
        )
        .await;
    for (asked, answered) in [
        (
            "admin/v1/ops/response/cli-42",
            "admin/v1/ops/response/cli-42",
        ),
        ("devices/p/d/command/reply", "devices/p/d/command/reply"),
        // Not the account's: answered on its own response topic.
        ("admin/v1/viewer/response", "admin/v1/ops/response"),
        ("admin/v1/ops/request", "admin/v1/ops/response"),
        ("admin/v1/events/device/activated", "admin/v1/ops/response"),
    ] {
        let corr = Bytes::from(format!("corr-{asked}"));
        let props = PublishProperties {
            response_topic: Some(asked.to_owned()),
            correlation_data: Some(corr.clone()),
            ..PublishProperties::default()
        };
        ops.send_raw(
            json!({"Action": "DescribeActivationSummary"}).to_string(),
            Some(props),
        )
        .await;
        let (topic, v, props) = ops.next().await;
        assert_eq!(topic, answered, "asked for {asked}");
        assert_eq!(v["Code"], "OK");
        let props = props.expect("response properties");
        assert_eq!(props.correlation_data, Some(corr));
        assert_eq!(props.content_type.as_deref(), Some("application/json"));
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn audit_log_lists_mutations() {
    let h = Harness::start().await;
    let mut ops = h.operator("ops").await;
    ops.ok(json!({"Action": "CreateProduct", "ProductKey": "p1"}))
        .await;
    ops.ok(json!({"Action": "DescribeProducts"})).await;
    ops.expect(
        "Conflict",
        json!({"Action": "CreateProduct", "ProductKey": "p1"}),
    )
    .await;
    ops.ok(json!({"Action": "CreateOrder", "Quantity": 2, "ValiditySeconds": 60, "ProductKey": "p1", "ClientToken": "t"}))
        .await;
    let mut buyer = h.operator("buyer").await;
    buyer
        .ok(json!({"Action": "CreateOrder", "Quantity": 1, "ValiditySeconds": 60}))
        .await;
    let r = ops.ok(json!({"Action": "DescribeAuditLog"})).await;
    assert_eq!(r["TotalRecordCount"], 4, "{r:#}");
    let items = r["Items"].as_array().expect("items");
    let rows: Vec<(Value, Value, Value)> = items
        .iter()
        .map(|i| (i["Account"].clone(), i["Action"].clone(), i["Code"].clone()))
        .collect();
    assert_eq!(
        rows,
        vec![
            (json!("buyer"), json!("CreateOrder"), json!("OK")),
            (json!("ops"), json!("CreateOrder"), json!("OK")),
            (json!("ops"), json!("CreateProduct"), json!("Conflict")),
            (json!("ops"), json!("CreateProduct"), json!("OK")),
        ],
        "newest first"
    );
    assert_eq!(
        items[1]["Parameters"],
        json!({"Quantity": 2, "ValiditySeconds": 60, "ProductKey": "p1"})
    );
    assert_eq!(items[0]["GmtCreated"], "2026-01-01 00:00:00");
    let r = ops
        .ok(json!({"Action": "DescribeAuditLog", "Account": "buyer"}))
        .await;
    assert_eq!(r["TotalRecordCount"], 1);
    let r = ops
        .ok(json!({"Action": "DescribeAuditLog", "ActionName": "CreateProduct", "PageSize": 1, "PageNumber": 2}))
        .await;
    assert_eq!(r["Items"][0]["Code"], "OK");
}

#[tokio::test(flavor = "multi_thread")]
async fn lifecycle_events_in_order() {
    let h = Harness::start_with(LedgerOptions {
        pool_low_threshold: 2,
        ..LedgerOptions::default()
    })
    .await;
    let mut events = h.events().await;
    let mut ops = h.operator("ops").await;
    let announcer = Announcer::new(h.t.ledger.clone(), 30, 60).spawn();

    ops.ok(json!({"Action": "CreateProduct", "ProductKey": "p1"}))
        .await;
    ops.ok(json!({"Action": "CreateOrder", "OrderId": "o1", "Quantity": 3, "ValiditySeconds": 40 * DAY}))
        .await;
    let (kind, e) = events.event().await;
    assert_eq!(
        (kind.as_str(), e["OrderId"].clone(), e["Quantity"].clone()),
        ("codes/purchased", json!("o1"), json!(3))
    );
    ops.ok(json!({"Action": "AssignActivationCodes", "ProductKey": "p1", "Quantity": 3, "ValiditySeconds": 40 * DAY}))
        .await;
    let (kind, e) = events.event().await;
    assert_eq!(
        (kind.as_str(), e["ProductKey"].clone()),
        ("codes/assigned", json!("p1"))
    );

    // The device activates.
    h.t.ledger.connect("p1", "d1").await.expect("activates");
    let (kind, e) = events.event().await;
    assert_eq!(kind, "device/activated");
    assert_eq!(
        (e["ProductKey"].clone(), e["DeviceKey"].clone()),
        (json!("p1"), json!("d1"))
    );
    assert_eq!(e["At"], "2026-01-01 00:00:00");
    assert_eq!(e["ExpireAt"], "2026-02-10 00:00:00");

    // Eleven days later its code is within 30 days of expiry: announced once.
    h.t.advance_secs(11 * DAY);
    let (kind, e) = events.event().await;
    assert_eq!(kind, "device/expiring");
    assert_eq!(e["DeviceKey"], "d1");
    assert_eq!(e["ExpireAt"], "2026-02-10 00:00:00");

    // It expires; its next connect renews (2 → 1 available: pool/low).
    h.t.advance_secs(30 * DAY);
    let admitted = h.t.ledger.connect("p1", "d1").await.expect("renews");
    assert!(admitted.consumed.is_some());
    let (kind, e) = events.event().await;
    assert_eq!(
        (kind.as_str(), e["DeviceKey"].clone()),
        ("device/renewed", json!("d1"))
    );
    let (kind, e) = events.event().await;
    assert_eq!(kind, "pool/low");
    assert_eq!(
        (e["ProductKey"].clone(), e["Available"].clone()),
        (json!("p1"), json!(1))
    );
    // The renewed code enters the window later and is announced too.
    h.t.advance_secs(11 * DAY);
    let (kind, e) = events.event().await;
    assert_eq!(
        (kind.as_str(), e["Kind"].clone(), e["DeviceKey"].clone()),
        ("device/expiring", Value::Null, json!("d1"))
    );

    // Blacklisted: once expired, refused.
    ops.ok(json!({"Action": "AddAutoRenewalBlacklist", "ProductKey": "p1", "DeviceKeys": ["d1"]}))
        .await;
    h.t.advance_secs(30 * DAY);
    let refusal = h.t.ledger.connect("p1", "d1").await.expect_err("refused");
    // The gate publishes device/rejected for refusals; the relay carries it.
    h.t.events.publish(
        Event::new(EventKind::DeviceRejected, h.t.clock.now())
            .device("p1", "d1")
            .with("Reason", refusal.to_string()),
    );
    let (kind, e) = events.event().await;
    assert_eq!(kind, "device/rejected");
    assert!(
        e["Reason"]
            .as_str()
            .unwrap_or_default()
            .contains("blacklist"),
        "{e}"
    );

    ops.ok(json!({"Action": "DeleteDevice", "ProductKey": "p1", "DeviceKey": "d1"}))
        .await;
    let (kind, e) = events.event().await;
    assert_eq!(
        (kind.as_str(), e["DeviceKey"].clone()),
        ("device/deleted", json!("d1"))
    );
    ops.ok(json!({"Action": "DeleteProduct", "ProductKey": "p1", "Confirm": true}))
        .await;
    let (kind, e) = events.event().await;
    assert_eq!(
        (kind.as_str(), e["Forfeited"].clone()),
        ("product/deleted", json!(1))
    );

    let r = ops
        .ok(json!({"Action": "DescribeActivationCodes", "DeviceKey": "d1"}))
        .await;
    assert_eq!(r["TotalRecordCount"], 2, "the history outlives the product");
    announcer.abort();
    h.t.invariants();
}

#[tokio::test(flavor = "multi_thread")]
async fn response_topics_per_account_are_bounded() {
    use activation_broker::admin::service::MAX_REPLY_TOPICS_PER_ACCOUNT;
    let h = Harness::start().await;
    let mut ops = h.client("ops", &["admin/v1/ops/response/#"]).await;
    for i in 0..=MAX_REPLY_TOPICS_PER_ACCOUNT {
        let asked = format!("admin/v1/ops/response/t{i}");
        let props = PublishProperties {
            response_topic: Some(asked.clone()),
            ..PublishProperties::default()
        };
        ops.send_raw(
            json!({"Action": "DescribeActivationSummary"}).to_string(),
            Some(props),
        )
        .await;
        let (topic, v, _) = ops.next().await;
        assert_eq!(v["Code"], "OK");
        if i < MAX_REPLY_TOPICS_PER_ACCOUNT {
            assert_eq!(topic, asked);
        } else {
            assert_eq!(topic, "admin/v1/ops/response", "beyond the cap");
        }
    }
    // A topic already used stays usable.
    let props = PublishProperties {
        response_topic: Some("admin/v1/ops/response/t0".into()),
        ..PublishProperties::default()
    };
    ops.send_raw(
        json!({"Action": "DescribeProducts"}).to_string(),
        Some(props),
    )
    .await;
    assert_eq!(ops.next().await.0, "admin/v1/ops/response/t0");
}

//! Every admin action through the router: happy paths, the ledger's
//! errors with their codes, roles, pagination, client tokens, dry runs.

use super::*;

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

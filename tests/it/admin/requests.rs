//! Admin requests and what they cause: malformed requests, MQTT 5
//! response topics, the audit log, lifecycle events, response topics per
//! account.

use super::*;

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

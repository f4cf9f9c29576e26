//! The admin plane through the whole broker: the accounts listener (argon2
//! login, per-account topic rules), the admin service on the router, the
//! operator CLI, MQTT 3.1.1 and 5 operators, and events caused by real
//! device connections.

use crate::common;

use activation_broker::admin::accounts::RoleConfig;
use activation_broker::admin::cli::{self, AdminCliArgs, AdminCommand, EXIT_FAILURE, EXIT_NOT_OK};
use activation_broker::credentials::client_id;
use activation_broker::ledger::Command;
use activation_client::child::free_port;
use bytes::Bytes;
use common::broker::v5::{incoming, puback, suback};
use common::broker::*;
use rumqttc::v5::mqttbytes::v5::{Packet, PubAckReason, PublishProperties, SubscribeReasonCode};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::{AsyncClient, EventLoop};
use serde_json::{json, Map, Value};
use std::time::Duration;

async fn broker() -> TestBroker {
    start_broker(|c| {
        let mut ops = account("ops", "ops-pw", RoleConfig::Named("admin".into()), true);
        ops.subscribe = vec!["devices/#".into()];
        ops.publish = vec!["devices/+/+/command/#".into()];
        c.accounts = vec![
            ops,
            account("dash", "dash-pw", RoleConfig::Named("viewer".into()), false),
        ];
    })
    .await
}

fn cli_args(
    b: &TestBroker,
    account: &str,
    password: &str,
    action: &str,
    params: &[&str],
) -> AdminCliArgs {
    let addr = b.broker.accounts_addr();
    let (host, port) = (addr.ip().to_string(), addr.port().to_string());
    let mut argv = vec![
        "--host",
        &host,
        "--port",
        &port,
        "--account",
        account,
        "--password",
        password,
        "--timeout",
        "10",
        action,
    ];
    argv.extend_from_slice(params);
    AdminCliArgs::try_parse_from(argv).expect("admin arguments")
}

async fn publish_in(el: &mut EventLoop) -> (String, Value, Option<PublishProperties>) {
    loop {
        if let Packet::Publish(p) = incoming(el).await {
            let topic = String::from_utf8_lossy(&p.topic).into_owned();
            let v = serde_json::from_slice(&p.payload).expect("JSON");
            return (topic, v, p.properties);
        }
    }
}

async fn operator(b: &TestBroker, name: &str, password: &str) -> (AsyncClient, EventLoop) {
    v5::connect(
        b.broker.accounts_addr(),
        &format!("{name}-test"),
        name,
        password,
    )
    .await
    .unwrap_or_else(|c| panic!("{name} logs in: CONNACK {c:#x}"))
}

/// The operator CLI: in process (`cli::request`, `cli::run` and its exit
/// codes) and as the broker binary's `admin` command (options after the
/// action, the password from the environment, JSON on stdout).
#[tokio::test(flavor = "multi_thread")]
async fn the_operator_cli_drives_a_running_broker() {
    let b = broker().await;
    let a = cli_args(
        &b,
        "ops",
        "ops-pw",
        "CreateProduct",
        &["--ProductKey", "p1"],
    );
    let AdminCommand::Action { mut params, .. } = a.command.clone() else {
        panic!("an action");
    };
    params.insert("Action".into(), json!("CreateProduct"));
    let r = cli::request(&a, params).await.expect("response");
    assert_eq!(r["Code"], "OK", "{r}");
    assert_eq!(r["ProductKey"], "p1");
    let code = cli::run(cli_args(
        &b,
        "ops",
        "ops-pw",
        "CreateOrder",
        &[
            "--Quantity",
            "20",
            "--ValiditySeconds",
            "3600",
            "--ProductKey",
            "p1",
            "--ClientToken",
            "cli-1",
        ],
    ))
    .await
    .expect("runs");
    assert_eq!(code, 0);
    assert_eq!(b.broker.ledger.counters().total, 20);
    // A viewer reads; the request id comes back.
    let a = cli_args(&b, "dash", "dash-pw", "DescribeActivationSummary", &[]);
    let mut params = Map::new();
    params.insert("Action".into(), json!("DescribeActivationSummary"));
    params.insert("RequestId".into(), json!("cli-test"));
    let r = cli::request(&a, params).await.expect("response");
    assert_eq!(r["RequestId"], "cli-test");
    assert_eq!(r["Products"], 1);
    assert_eq!(
        (
            r["Code"].clone(),
            r["Total"].clone(),
            r["Available"].clone()
        ),
        (json!("OK"), json!(20), json!(20))
    );

    // The binary: options after the action, password from the environment.
    b.run(Command::CreateOrder {
        order_id: Some("O-1".into()),
        quantity: 7,
        validity_secs: 60,
        product_key: None,
    })
    .await;
    let port = b.broker.accounts_addr().port().to_string();
    let bin = move |args: &[&str]| {
        let mut c = std::process::Command::new(env!("CARGO_BIN_EXE_activation-broker"));
        c.arg("admin")
            .args(args)
            .args(["--port", port.as_str(), "--account", "ops"])
            .env("ACTIVATION_ADMIN_PASSWORD", "ops-pw");
        c
    };
    let out = tokio::task::spawn_blocking(move || {
        (
            bin(&["DescribeUnassignedActivationCodes"]).output(),
            bin(&["DeleteProduct", "--ProductKey", "nope", "--Confirm", "true"]).output(),
        )
    })
    .await
    .expect("join");
    let ok = out.0.expect("runs");
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    let body: Value = serde_json::from_slice(&ok.stdout).expect("JSON response");
    assert_eq!(body["Code"], "OK");
    assert!(body.to_string().contains("O-1"), "{body}");
    let err = out.1.expect("runs");
    assert!(!err.status.success());
    let body: Value = serde_json::from_slice(&err.stdout).expect("JSON response");
    assert_eq!(body["Code"], "NotFound.Product");

    // Exit codes: OK → 0, another Code → 1, no response → 2.
    let code = cli::run(cli_args(
        &b,
        "ops",
        "ops-pw",
        "DescribeDevice",
        &["--ProductKey", "p1", "--DeviceKey", "x"],
    ))
    .await
    .expect("runs");
    assert_eq!(code, EXIT_NOT_OK);
    // The viewer is refused mutations; wrong passwords never get in.
    let code = cli::run(cli_args(
        &b,
        "dash",
        "dash-pw",
        "DeleteProduct",
        &["--ProductKey", "p1", "--Confirm"],
    ))
    .await
    .expect("runs");
    assert_eq!(code, EXIT_NOT_OK);
    assert_eq!(
        b.broker.ledger.product("p1").expect("still there").total,
        20
    );
    let code = cli::run(cli_args(&b, "dash", "ops-pw", "DescribeProducts", &[]))
        .await
        .expect("runs");
    assert_eq!(code, EXIT_FAILURE);
    let code = cli::run(cli_args(&b, "mallory", "x", "DescribeProducts", &[]))
        .await
        .expect("runs");
    assert_eq!(code, EXIT_FAILURE);
    let mut nobody = cli_args(&b, "ops", "ops-pw", "DescribeProducts", &[]);
    nobody.connection.port = free_port().expect("free port");
    let code = cli::run(nobody).await.expect("runs");
    assert_eq!(code, EXIT_FAILURE, "nothing listening");
    let code = cli::run(cli_args(&b, "ops", "ops-pw", "describe", &[]))
        .await
        .expect("runs");
    assert_eq!(code, EXIT_FAILURE, "not an action");
}

/// `admin --http URL`: the same action over `POST /api/v1` gives the same
/// response and exit codes as over MQTT; a refused login is exit code 2.
#[tokio::test(flavor = "multi_thread")]
async fn the_operator_cli_over_http() {
    let b = broker().await;
    let url = format!("http://{}", b.broker.http_addr().expect("http listener"));
    let over_http = |account: &str, password: &str, action: &str, params: &[&str]| {
        let mut a = cli_args(&b, account, password, action, params);
        a.connection.http = Some(url.clone());
        a
    };
    let a = over_http("ops", "ops-pw", "CreateProduct", &["--ProductKey", "p1"]);
    let AdminCommand::Action { mut params, .. } = a.command.clone() else {
        panic!("an action");
    };
    params.insert("Action".into(), json!("CreateProduct"));
    let r = cli::request(&a, params).await.expect("response");
    assert_eq!(
        (r["Code"].clone(), r["ProductKey"].clone()),
        (json!("OK"), json!("p1")),
        "{r}"
    );
    assert!(
        b.broker.ledger.product("p1").is_ok(),
        "created through HTTP"
    );

    // The same question over both: the same answer.
    let ask = |a: AdminCliArgs| async move {
        let mut params = Map::new();
        params.insert("Action".into(), json!("DescribeActivationSummary"));
        params.insert("RequestId".into(), json!("same"));
        cli::request(&a, params).await.expect("response")
    };
    let http = ask(over_http(
        "dash",
        "dash-pw",
        "DescribeActivationSummary",
        &[],
    ))
    .await;
    let mqtt = ask(cli_args(
        &b,
        "dash",
        "dash-pw",
        "DescribeActivationSummary",
        &[],
    ))
    .await;
    assert_eq!(http, mqtt);

    // Exit codes: OK → 0, another Code → 1, no response or login → 2.
    let run = |a| async move { cli::run(a).await.expect("runs") };
    assert_eq!(
        run(over_http("ops", "ops-pw", "DescribeProducts", &[])).await,
        0
    );
    let refused = over_http(
        "dash",
        "dash-pw",
        "DeleteProduct",
        &["--ProductKey", "p1", "--Confirm"],
    );
    assert_eq!(run(refused).await, EXIT_NOT_OK);
    assert_eq!(
        run(over_http("dash", "ops-pw", "DescribeProducts", &[])).await,
        EXIT_FAILURE
    );
    let r = cli::request(
        &over_http("dash", "ops-pw", "DescribeProducts", &[]),
        Map::new(),
    )
    .await
    .expect_err("refused");
    assert!(format!("{r:#}").contains("login as dash refused"), "{r:#}");
    let mut nobody = over_http("ops", "ops-pw", "DescribeProducts", &[]);
    nobody.connection.http = Some(format!(
        "http://127.0.0.1:{}",
        free_port().expect("free port")
    ));
    assert_eq!(run(nobody).await, EXIT_FAILURE, "nothing listening");
    let events = over_http("ops", "ops-pw", "events", &["--count", "1"]);
    assert_eq!(run(events).await, EXIT_FAILURE, "events are MQTT only");

    // The binary: `--http` after the action, JSON on stdout.
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(env!("CARGO_BIN_EXE_activation-broker"))
            .args([
                "admin",
                "DescribeProducts",
                "--http",
                &url,
                "--account",
                "ops",
            ])
            .env("ACTIVATION_ADMIN_PASSWORD", "ops-pw")
            .output()
    })
    .await
    .expect("join")
    .expect("runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let body: Value = serde_json::from_slice(&out.stdout).expect("JSON response");
    assert_eq!(body["Code"], "OK");
    assert!(body.to_string().contains("p1"), "{body}");
}

#[tokio::test(flavor = "multi_thread")]
async fn cli_events_prints_relayed_events() {
    use activation_broker::events::{Event, EventKind};
    let b = broker().await;
    let mut watcher = tokio::spawn(cli::run(cli_args(
        &b,
        "ops",
        "ops-pw",
        "events",
        &["--kind", "pool/low", "--count", "1"],
    )));
    // The watcher subscribes at some point; publish until it has seen one.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let code = loop {
        b.broker.events.publish(
            Event::new(EventKind::PoolLow, b.clock.now())
                .with("ProductKey", "p1")
                .with("Available", 1),
        );
        match tokio::time::timeout(Duration::from_millis(50), &mut watcher).await {
            Ok(joined) => break joined.expect("joined").expect("runs"),
            Err(_) => assert!(tokio::time::Instant::now() < deadline, "no event seen"),
        }
    };
    assert_eq!(code, 0);
    let code = cli::run(cli_args(&b, "ops", "ops-pw", "events", &["--kind", "nope"]))
        .await
        .expect("runs");
    assert_eq!(code, EXIT_FAILURE);
}

#[tokio::test(flavor = "multi_thread")]
async fn accounts_reach_only_their_own_admin_topics() {
    let b = broker().await;
    let (dash, mut dash_el) = operator(&b, "dash", "dash-pw").await;
    // Another account's response topic and the events (events = false): refused.
    for filter in [
        "admin/v1/ops/response",
        "admin/v1/events/#",
        "admin/#",
        "devices/#",
    ] {
        dash.subscribe(filter, QoS::AtLeastOnce)
            .await
            .expect("queued");
        let code = suback(&mut dash_el).await;
        assert!(
            !matches!(code, SubscribeReasonCode::Success(_)),
            "dash may not subscribe to {filter}: {code:?}"
        );
    }
    dash.subscribe("admin/v1/dash/response", QoS::AtLeastOnce)
        .await
        .expect("queued");
    assert!(matches!(
        suback(&mut dash_el).await,
        SubscribeReasonCode::Success(_)
    ));
    // Publishing as another account: dropped with PUBACK 0x87.
    dash.publish(
        "admin/v1/ops/request",
        QoS::AtLeastOnce,
        false,
        json!({"Action": "CreateProduct", "ProductKey": "evil"}).to_string(),
    )
    .await
    .expect("queued");
    assert_eq!(puback(&mut dash_el).await, PubAckReason::NotAuthorized);
    // Its own request is served.
    dash.publish(
        "admin/v1/dash/request",
        QoS::AtLeastOnce,
        false,
        json!({"Action": "DescribeProducts", "RequestId": "mine"}).to_string(),
    )
    .await
    .expect("queued");
    let (topic, v, _) = publish_in(&mut dash_el).await;
    assert_eq!(topic, "admin/v1/dash/response");
    assert_eq!(
        (v["RequestId"].clone(), v["Code"].clone()),
        (json!("mine"), json!("OK"))
    );
    assert!(
        b.broker.ledger.product("evil").is_err(),
        "the forged request had no effect"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn mqtt5_response_topic_through_the_listener() {
    let b = broker().await;
    let (ops, mut el) = operator(&b, "ops", "ops-pw").await;
    ops.subscribe("admin/v1/ops/response/#", QoS::AtLeastOnce)
        .await
        .expect("queued");
    assert!(matches!(
        suback(&mut el).await,
        SubscribeReasonCode::Success(_)
    ));
    let props = PublishProperties {
        response_topic: Some("admin/v1/ops/response/session-7".into()),
        correlation_data: Some(Bytes::from_static(b"\x00\x01corr")),
        ..PublishProperties::default()
    };
    ops.publish_with_properties(
        "admin/v1/ops/request",
        QoS::AtLeastOnce,
        false,
        json!({"Action": "DescribeActivationSummary"}).to_string(),
        props,
    )
    .await
    .expect("queued");
    let (topic, v, props) = publish_in(&mut el).await;
    assert_eq!(topic, "admin/v1/ops/response/session-7");
    assert_eq!(v["Code"], "OK");
    assert_eq!(
        props.and_then(|p| p.correlation_data),
        Some(Bytes::from_static(b"\x00\x01corr"))
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn mqtt311_operator_uses_the_default_response_topic() {
    use rumqttc::{Event as E4, Packet as P4, QoS as Q4};
    let b = broker().await;
    let (c, mut el) = v4::connect(b.broker.accounts_addr(), "ops-v4", "ops", "ops-pw")
        .await
        .expect("logs in");
    c.subscribe("admin/v1/ops/response", Q4::AtLeastOnce)
        .await
        .expect("queued");
    c.publish(
        "admin/v1/ops/request",
        Q4::AtLeastOnce,
        false,
        json!({"Action": "CreateProduct", "ProductKey": "v4p", "RequestId": "v4"}).to_string(),
    )
    .await
    .expect("queued");
    let v: Value = tokio::time::timeout(WAIT, async {
        loop {
            match el.poll().await {
                Ok(E4::Incoming(P4::Publish(p))) => {
                    return serde_json::from_slice(&p.payload).expect("JSON")
                }
                Ok(_) => {}
                Err(e) => panic!("connection failed: {e}"),
            }
        }
    })
    .await
    .expect("response in time");
    assert_eq!(
        (v["RequestId"].clone(), v["Code"].clone()),
        (json!("v4"), json!("OK"))
    );
    assert!(v["ProductSecret"].is_string());
}

#[tokio::test(flavor = "multi_thread")]
async fn device_connections_show_on_the_event_topics() {
    let b = broker().await;
    let (ops, mut el) = operator(&b, "ops", "ops-pw").await;
    ops.subscribe("admin/v1/events/#", QoS::AtLeastOnce)
        .await
        .expect("queued");
    assert!(matches!(
        suback(&mut el).await,
        SubscribeReasonCode::Success(_)
    ));
    // Ten codes: the first activation takes the pool below the threshold (10).
    let secret = b.product("p1", 10, 3600).await;
    let (topic, v, _) = publish_in(&mut el).await;
    assert_eq!(topic, "admin/v1/events/codes/purchased");
    assert_eq!(v["Quantity"], 10);
    let (topic, _, _) = publish_in(&mut el).await;
    assert_eq!(topic, "admin/v1/events/codes/assigned");

    let (user, pass) = b.creds("p1", "d1", &secret);
    let (_dev, _dev_el) = v5::connect(b.addr(), &client_id("p1", "d1"), &user, &pass)
        .await
        .expect("device admitted");
    let mut seen = Vec::new();
    while seen.len() < 3 {
        let (topic, v, _) = publish_in(&mut el).await;
        assert_eq!(v["ProductKey"], "p1", "{v}");
        seen.push(topic);
    }
    assert_eq!(
        seen,
        vec![
            "admin/v1/events/device/activated",
            "admin/v1/events/pool/low",
            "admin/v1/events/device/connected",
        ]
    );
    // A device of a product without codes is refused, and that is an event.
    let secret = b.product("p2", 0, 3600).await;
    let (user, pass) = b.creds("p2", "d2", &secret);
    let refused = v5::connect(b.addr(), &client_id("p2", "d2"), &user, &pass).await;
    assert_eq!(refused.err(), Some(0x97));
    let (topic, v, _) = publish_in(&mut el).await;
    assert_eq!(topic, "admin/v1/events/device/rejected");
    assert_eq!(v["DeviceKey"], "d2");
}

/// Debian's `mosquitto_rr` (MQTT 5 request/response: Response Topic and
/// Correlation Data) against the accounts listener.
#[tokio::test(flavor = "multi_thread")]
async fn mosquitto_rr_interoperates() {
    let b = broker().await;
    let port = b.broker.accounts_addr().port().to_string();
    let run = |request: Value, response_topic: &'static str| {
        let port = port.clone();
        async move {
            let out = tokio::process::Command::new("mosquitto_rr")
                .args([
                    "-h",
                    "127.0.0.1",
                    "-p",
                    &port,
                    "-i",
                    "rr-client",
                    "-u",
                    "ops",
                    "-P",
                    "ops-pw",
                    "-t",
                    "admin/v1/ops/request",
                    "-e",
                    response_topic,
                    "-W",
                    "10",
                    "-m",
                    &request.to_string(),
                ])
                .output()
                .await
                .expect("mosquitto_rr (apt-get install mosquitto-clients)");
            assert!(out.status.success(), "{out:?}");
            serde_json::from_slice::<Value>(&out.stdout).expect("a JSON response")
        }
    };
    let r = run(
        json!({"Action": "CreateProduct", "ProductKey": "rr1", "RequestId": "rr"}),
        "admin/v1/ops/response",
    )
    .await;
    assert_eq!(
        (r["RequestId"].clone(), r["Code"].clone()),
        (json!("rr"), json!("OK"))
    );
    let r = run(
        json!({"Action": "DescribeProducts"}),
        "admin/v1/ops/response/rr-session",
    )
    .await;
    assert_eq!(r["Items"][0]["ProductKey"], "rr1");
}

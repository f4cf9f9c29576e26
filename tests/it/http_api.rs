//! The HTTP admin API (`POST /api/v1`) against the MQTT admin plane: every
//! action answers the same JSON over both, through the same dispatcher,
//! roles and audit log. Plus what only HTTP has: 401 without credentials,
//! status codes, body and content-type limits, sessions from the console's
//! login (the listener itself: `http_listener`).

use crate::common;

use std::collections::BTreeSet;

use activation_broker::admin::accounts::RoleConfig;
use activation_broker::admin::ACTIONS;
use activation_broker::credentials::{client_id, device_credentials};
use activation_broker::http::api::status_of;
use common::broker::*;
use common::http::{basic, Http};
use rumqttc::v5::mqttbytes::v5::Packet;
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::{AsyncClient, EventLoop};
use serde_json::{json, Value};

pub(crate) async fn broker(
    tweak: impl FnOnce(&mut activation_broker::config::Config),
) -> TestBroker {
    start_broker(|c| {
        c.accounts = vec![
            account("ops", "ops-pw", RoleConfig::Named("admin".into()), true),
            account("dash", "dash-pw", RoleConfig::Named("viewer".into()), false),
        ];
        tweak(c);
    })
    .await
}

pub(crate) fn http(b: &TestBroker) -> Http {
    Http::new(b.broker.http_addr().expect("http listener"))
}

/// An operator session on the accounts listener, subscribed to its
/// response topic.
pub(crate) struct Mqtt {
    client: AsyncClient,
    el: EventLoop,
    account: String,
}

impl Mqtt {
    pub(crate) async fn login(b: &TestBroker, account: &str, password: &str) -> Mqtt {
        let (client, mut el) = v5::connect(
            b.broker.accounts_addr(),
            &format!("{account}-cmp"),
            account,
            password,
        )
        .await
        .unwrap_or_else(|c| panic!("{account} logs in: {c:#x}"));
        client
            .subscribe(format!("admin/v1/{account}/response"), QoS::AtLeastOnce)
            .await
            .expect("queued");
        v5::suback(&mut el).await;
        Mqtt {
            client,
            el,
            account: account.into(),
        }
    }

    /// Publishes `payload` as a request and returns the response.
    pub(crate) async fn call(&mut self, payload: &[u8]) -> Value {
        self.client
            .publish(
                format!("admin/v1/{}/request", self.account),
                QoS::AtLeastOnce,
                false,
                payload.to_vec(),
            )
            .await
            .expect("queued");
        loop {
            if let Packet::Publish(p) = v5::incoming(&mut self.el).await {
                return serde_json::from_slice(&p.payload).expect("JSON response");
            }
        }
    }
}

/// The answer without what differs between two brokers by design: fresh
/// secrets, request ids the broker generated, and a backup's path (each
/// broker has its own data directory) and digest (its records hold the
/// secrets).
fn comparable(mut v: Value, generated_id: bool) -> Value {
    fn mask(v: &mut Value) {
        match v {
            Value::Object(m) => {
                for (k, x) in m.iter_mut() {
                    if k.ends_with("Secret") {
                        *x = json!("<secret>");
                    } else if k == "Path" || k == "Sha256" {
                        *x = json!("<per broker>");
                    } else {
                        mask(x);
                    }
                }
            }
            Value::Array(a) => a.iter_mut().for_each(mask),
            _ => {}
        }
    }
    mask(&mut v);
    if generated_id {
        v["RequestId"] = json!("<generated>");
    }
    v
}

/// Connects device `pk`/`dk` to `b` and leaves it online.
async fn device(
    b: &TestBroker,
    pk: &str,
    dk: &str,
    secret: &str,
) -> (rumqttc::AsyncClient, rumqttc::EventLoop) {
    let (user, pass) = device_credentials(pk, dk, secret, b.clock.now());
    let c = v4::connect(b.addr(), &client_id(pk, dk), &user, &pass)
        .await
        .unwrap_or_else(|c| panic!("{pk}/{dk} connects: {c}"));
    b.wait_online(pk, dk, true).await;
    c
}

fn secret_of(answer: &Value, key: &str) -> String {
    answer[key]
        .as_str()
        .unwrap_or_else(|| panic!("{key} in {answer}"))
        .to_owned()
}

#[tokio::test(flavor = "multi_thread")]
async fn every_action_answers_the_same_over_http_and_mqtt() {
    // Two brokers on the same manual clock and the same script: one asked
    // over MQTT, the other over HTTP.
    let over_mqtt = broker(|_| {}).await;
    let over_http = broker(|_| {}).await;
    let web = http(&over_http);
    let mut ops = Mqtt::login(&over_mqtt, "ops", "ops-pw").await;
    let mut dash = Mqtt::login(&over_mqtt, "dash", "dash-pw").await;
    let mut called = BTreeSet::new();
    let mut n = 0;

    // One step: the same payload to both; the answers must be equal.
    macro_rules! step {
        ($who:expr, $mqtt:expr, $payload:expr) => {{
            n += 1;
            let raw: Vec<u8> = $payload;
            let parsed: Option<Value> = serde_json::from_slice(&raw).ok();
            if let Some(a) = parsed.as_ref().and_then(|v| v["Action"].as_str()) {
                called.insert(a.to_owned());
            }
            let generated = parsed.as_ref().is_none_or(|v| v.get("RequestId").is_none());
            let m = $mqtt.call(&raw).await;
            let pw = format!("{}-pw", $who);
            let h = web
                .request(
                    "POST",
                    "/api/v1",
                    &[
                        ("authorization", basic($who, &pw).as_str()),
                        ("content-type", "application/json"),
                    ],
                    raw.clone(),
                )
                .await;
            let code = m["Code"].as_str().unwrap_or("").to_owned();
            assert_eq!(
                h.status,
                status_of(&code).as_u16(),
                "step {n} status: {}",
                h.text()
            );
            assert_eq!(h.header("content-type"), Some("application/json"));
            let hv = h.json().expect("JSON");
            assert_eq!(
                comparable(hv.clone(), generated),
                comparable(m.clone(), generated),
                "step {n}: {}",
                String::from_utf8_lossy(&raw)
            );
            (m, hv)
        }};
    }
    macro_rules! both {
        ($v:expr) => {
            step!("ops", ops, $v.to_string().into_bytes())
        };
    }

    both!(json!({"Action": "DescribeActivationSummary", "RequestId": "s0"}));
    let (m1, h1) = both!(
        json!({"Action": "CreateProduct", "RequestId": "p1", "ProductKey": "p1", "Name": "Lamp"})
    );
    let (m2, h2) = both!(
        json!({"Action": "CreateProduct", "RequestId": "p2", "ProductKey": "p2", "Name": "Valve", "AuthMode": "device-secret"})
    );
    let (m3, h3) = both!(
        json!({"Action": "RegisterDevices", "RequestId": "r1", "ProductKey": "p2", "DeviceKeys": ["d1", "d2"]})
    );
    both!(
        json!({"Action": "CreateOrder", "RequestId": "o1", "OrderId": "o1", "Quantity": 10, "ValiditySeconds": 31_536_000})
    );
    both!(
        json!({"Action": "CreateOrder", "RequestId": "o2", "OrderId": "o2", "Quantity": 5, "ValiditySeconds": 864_000, "ProductKey": "p1"})
    );
    // The same ClientToken twice: one order, the same answer.
    both!(
        json!({"Action": "CreateOrder", "ClientToken": "once", "OrderId": "o3", "Quantity": 2, "ValiditySeconds": 31_536_000})
    );
    both!(
        json!({"Action": "CreateOrder", "ClientToken": "once", "OrderId": "o3", "Quantity": 2, "ValiditySeconds": 31_536_000})
    );
    both!(json!({"Action": "DescribeUnassignedActivationCodes", "RequestId": "u"}));
    both!(
        json!({"Action": "AssignActivationCodes", "RequestId": "a0", "ProductKey": "p2", "Quantity": 99, "ValiditySeconds": 31_536_000, "DryRun": true})
    );
    both!(
        json!({"Action": "AssignActivationCodes", "RequestId": "a1", "ProductKey": "p2", "Quantity": 3, "ValiditySeconds": 31_536_000, "DryRun": true})
    );
    both!(
        json!({"Action": "AssignActivationCodes", "RequestId": "a2", "ProductKey": "p2", "Quantity": 3, "ValiditySeconds": 31_536_000})
    );
    both!(
        json!({"Action": "AssignActivationCodes", "RequestId": "a3", "ProductKey": "p1", "Quantity": 1, "ValiditySeconds": 31_536_000})
    );

    // Real devices consume codes on both brokers.
    let _m_lamp = device(&over_mqtt, "p1", "lamp-1", &secret_of(&m1, "ProductSecret")).await;
    let _h_lamp = device(&over_http, "p1", "lamp-1", &secret_of(&h1, "ProductSecret")).await;
    let d1 = |v: &Value| {
        v["DeviceSecrets"][0]["DeviceSecret"]
            .as_str()
            .expect("secret")
            .to_owned()
    };
    let _m_d1 = device(&over_mqtt, "p2", "d1", &d1(&m3)).await;
    let _h_d1 = device(&over_http, "p2", "d1", &d1(&h3)).await;
    let _ = (m2, h2);

    both!(json!({"Action": "DescribeActivationSummary", "RequestId": "s1"}));
    both!(json!({"Action": "DescribeProducts", "RequestId": "dp"}));
    both!(json!({"Action": "DescribeProducts", "RequestId": "dp2", "Name": "lam"}));
    both!(json!({"Action": "DescribeActivationCodes", "RequestId": "c1", "ProductKey": "p1"}));
    both!(
        json!({"Action": "DescribeActivationCodes", "RequestId": "c2", "DeviceKey": "d1", "ActivateFrom": "2026-01-01"})
    );
    both!(
        json!({"Action": "DescribeActivationHistory", "RequestId": "h", "ProductKey": "p1", "DeviceKey": "lamp-1"})
    );
    both!(json!({"Action": "DescribeNearExpiryDevices", "RequestId": "ne", "WithinDays": 30}));
    both!(json!({"Action": "DescribeAssignmentHistory", "RequestId": "ah", "ProductKey": "p2"}));
    both!(json!({"Action": "DescribeOrders", "RequestId": "do"}));
    both!(json!({"Action": "DescribeDevices", "RequestId": "dd", "ProductKey": "p2"}));
    both!(
        json!({"Action": "DescribeDevice", "RequestId": "d", "ProductKey": "p1", "DeviceKey": "lamp-1"})
    );
    both!(
        json!({"Action": "SetAutoRenewal", "RequestId": "ar", "ProductKey": "p1", "Enabled": false})
    );
    both!(
        json!({"Action": "AddAutoRenewalBlacklist", "RequestId": "bl", "ProductKey": "p2", "DeviceKeys": ["d2"]})
    );
    both!(json!({"Action": "DescribeAutoRenewal", "RequestId": "da", "ProductKey": "p2"}));
    both!(
        json!({"Action": "RemoveAutoRenewalBlacklist", "RequestId": "rb", "ProductKey": "p2", "DeviceKeys": ["d2"]})
    );
    both!(json!({"Action": "DescribeBans", "RequestId": "db"}));
    both!(json!({"Action": "RemoveBan", "RequestId": "rm", "Source": "10.9.9.9"}));
    both!(
        json!({"Action": "DeleteDevice", "RequestId": "del", "ProductKey": "p1", "DeviceKey": "lamp-1"})
    );
    both!(json!({"Action": "DeleteProduct", "RequestId": "dpr", "ProductKey": "p2"}));
    both!(
        json!({"Action": "DeleteProduct", "RequestId": "dpr2", "ProductKey": "p2", "Confirm": true})
    );
    both!(json!({"Action": "DescribeActivationSummary", "RequestId": "s2"}));

    // Refusals answer alike too: unknown action and parameter, bad JSON,
    // not an object, a role that may not.
    both!(json!({"Action": "Nope", "RequestId": "x1"}));
    both!(json!({"Action": "DescribeProducts", "RequestId": "x2", "Typo": 1}));
    step!("ops", ops, b"{not json".to_vec());
    step!("ops", ops, b"[1, 2]".to_vec());
    step!(
        "dash",
        dash,
        json!({"Action": "CreateOrder", "RequestId": "f", "Quantity": 1, "ValiditySeconds": 60})
            .to_string()
            .into_bytes()
    );
    step!(
        "dash",
        dash,
        json!({"Action": "DescribeProducts", "RequestId": "v"})
            .to_string()
            .into_bytes()
    );

    let (m_backup, _) =
        both!(json!({"Action": "BackupLedger", "RequestId": "b1", "FileName": "walk.backup"}));
    assert!(m_backup["Records"].as_u64().unwrap_or(0) > 0, "{m_backup}");

    // The audit log holds the same entries, whichever plane they came by.
    both!(json!({"Action": "DescribeAuditLog", "RequestId": "log", "PageSize": 100}));

    let all: BTreeSet<String> = ACTIONS.iter().map(|(a, _)| (*a).to_owned()).collect();
    let missing: Vec<_> = all.difference(&called).collect();
    assert!(missing.is_empty(), "actions not walked: {missing:?}");
    over_mqtt
        .broker
        .ledger
        .check_invariants()
        .expect("invariants");
}

#[tokio::test(flavor = "multi_thread")]
async fn credentials_status_codes_limits_and_sessions() {
    let b = broker(|c| c.http.max_body_bytes = 4096).await;
    let web = http(&b);
    let summary = json!({"Action": "DescribeActivationSummary"}).to_string();

    // No credentials: 401 with a Basic challenge (none for the console's own requests).
    let r = web
        .request(
            "POST",
            "/api/v1",
            &[("content-type", "application/json")],
            summary.clone(),
        )
        .await;
    assert_eq!(r.status, 401, "{}", r.text());
    assert!(r
        .header("www-authenticate")
        .is_some_and(|h| h.starts_with("Basic")));
    assert_eq!(r.json().expect("JSON")["Code"], "Forbidden");
    let r = web
        .request(
            "POST",
            "/api/v1",
            &[
                ("content-type", "application/json"),
                ("x-requested-with", "console"),
            ],
            summary.clone(),
        )
        .await;
    assert_eq!(r.status, 401);
    assert!(r.header("www-authenticate").is_none());

    // A viewer may read, not write: 403 Forbidden naming the action.
    let r = web
        .api("dash", "dash-pw", &json!({"Action": "DescribeProducts"}))
        .await;
    assert_eq!(
        (r.status, r.json().expect("JSON")["Code"].clone()),
        (200, json!("OK"))
    );
    let r = web
        .api(
            "dash",
            "dash-pw",
            &json!({"Action": "CreateProduct", "ProductKey": "x"}),
        )
        .await;
    assert_eq!(r.status, 403);
    assert_eq!(r.json().expect("JSON")["Code"], "Forbidden");
    assert!(r.json().expect("JSON")["Message"]
        .as_str()
        .expect("message")
        .contains("CreateProduct"));

    // Bad JSON: InvalidParameter (400). Wrong content type: 415. Too big: 413.
    let auth = basic("ops", "ops-pw");
    let r = web
        .request(
            "POST",
            "/api/v1",
            &[
                ("authorization", &auth),
                ("content-type", "application/json"),
            ],
            "{\"Action\":",
        )
        .await;
    assert_eq!(
        (r.status, r.json().expect("JSON")["Code"].clone()),
        (400, json!("InvalidParameter"))
    );
    let r = web
        .request(
            "POST",
            "/api/v1",
            &[("authorization", &auth), ("content-type", "text/plain")],
            summary.clone(),
        )
        .await;
    assert_eq!(
        (r.status, r.json().expect("JSON")["Code"].clone()),
        (415, json!("InvalidParameter"))
    );
    let big = json!({"Action": "DescribeProducts", "Name": "x".repeat(5000)}).to_string();
    let r = web
        .request(
            "POST",
            "/api/v1",
            &[
                ("authorization", &auth),
                ("content-type", "application/json"),
            ],
            big,
        )
        .await;
    assert_eq!(
        (r.status, r.json().expect("JSON")["Code"].clone()),
        (413, json!("InvalidParameter"))
    );
    assert!(r.text().contains("4096"), "{}", r.text());
    let r = web
        .request(
            "POST",
            "/api/login",
            &[("content-type", "application/json")],
            "x".repeat(5000),
        )
        .await;
    assert_eq!(r.status, 413, "the login's body is limited too");
    // NotFound.* is 404 with the same envelope.
    let r = web
        .api(
            "ops",
            "ops-pw",
            &json!({"Action": "DescribeDevice", "ProductKey": "nope", "DeviceKey": "d"}),
        )
        .await;
    assert_eq!(r.status, 404);
    assert!(r.json().expect("JSON")["Code"]
        .as_str()
        .expect("code")
        .starts_with("NotFound"));

    // The console's login: a session cookie that then works alone; logout ends it.
    let r = web
        .request(
            "POST",
            "/api/login",
            &[("content-type", "application/json")],
            json!({"Account": "ops", "Password": "nope"}).to_string(),
        )
        .await;
    assert_eq!(r.status, 401);
    assert!(r.header("set-cookie").is_none());
    let r = web
        .request(
            "POST",
            "/api/login",
            &[("content-type", "application/json")],
            json!({"Account": "dash", "Password": "dash-pw"}).to_string(),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json().expect("JSON")["Role"], "viewer");
    let actions = r.json().expect("JSON")["Actions"]
        .as_array()
        .expect("actions")
        .clone();
    assert!(
        actions.contains(&json!("DescribeProducts")) && !actions.contains(&json!("CreateOrder"))
    );
    let cookie = r.header("set-cookie").expect("cookie").to_owned();
    assert!(
        cookie.contains("HttpOnly") && cookie.contains("SameSite=Strict"),
        "{cookie}"
    );
    let cookie = cookie.split(';').next().expect("pair").to_owned();
    let with_cookie = |body: String| {
        let cookie = cookie.clone();
        let web = &web;
        async move {
            web.request(
                "POST",
                "/api/v1",
                &[("cookie", &cookie), ("content-type", "application/json")],
                body,
            )
            .await
        }
    };
    let r = with_cookie(summary.clone()).await;
    assert_eq!(
        (r.status, r.json().expect("JSON")["Code"].clone()),
        (200, json!("OK")),
        "{}",
        r.text()
    );
    let r = with_cookie(
        json!({"Action": "CreateOrder", "Quantity": 1, "ValiditySeconds": 60}).to_string(),
    )
    .await;
    assert_eq!(r.status, 403, "the session has the account's role");
    let r = web
        .request("GET", "/api/session", &[("cookie", &cookie)], "")
        .await;
    assert_eq!(r.json().expect("JSON")["Account"], "dash");
    web.request("POST", "/api/logout", &[("cookie", &cookie)], "")
        .await;
    let r = with_cookie(summary.clone()).await;
    assert_eq!(r.status, 401, "logged out");

    // Requests over HTTP are in the audit log under their account.
    let r = web
        .api(
            "ops",
            "ops-pw",
            &json!({"Action": "CreateProduct", "ProductKey": "audited"}),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    let r = web
        .api(
            "ops",
            "ops-pw",
            &json!({"Action": "DescribeAuditLog", "Account": "ops"}),
        )
        .await;
    let items = r.json().expect("JSON")["Items"]
        .as_array()
        .expect("items")
        .clone();
    assert!(
        items
            .iter()
            .any(|i| i["Action"] == "CreateProduct" && i["Code"] == "OK" && i["Account"] == "ops"),
        "{items:?}"
    );
}

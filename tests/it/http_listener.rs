//! The HTTP listener beyond the admin actions: server-sent events, failed
//! logins feeding the gate's bans, the address claim, and TLS.

use crate::common;
use crate::http_api::{broker, http, Mqtt};

use common::broker::*;
use common::http::basic;
use serde_json::{json, Value};

/// `GET /api/events`: server-sent events for accounts that may read
/// events, 403 for the others; an order's `codes/purchased` arrives as an
/// SSE message whose data is the event's JSON.
#[tokio::test(flavor = "multi_thread")]
async fn events_stream_as_server_sent_events() {
    let b = broker(|_| {}).await;
    let web = http(&b);
    let dash = basic("dash", "dash-pw");
    let r = web
        .request("GET", "/api/events", &[("authorization", &dash)], "")
        .await;
    assert_eq!(r.status, 403, "{}", r.text());
    assert_eq!(r.json().expect("JSON")["Code"], "Forbidden");

    let ops = basic("ops", "ops-pw");
    let mut events = web
        .open("GET", "/api/events", &[("authorization", &ops)])
        .await;
    assert_eq!(events.status, 200);
    assert!(events
        .header("content-type")
        .is_some_and(|c| c.starts_with("text/event-stream")));
    let r = web
        .api(
            "ops",
            "ops-pw",
            &json!({"Action": "CreateOrder", "OrderId": "sse", "Quantity": 3, "ValiditySeconds": 60}),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    // Messages are `event: kind` and `data: json` lines ending in a blank line.
    let mut text = String::new();
    let data = loop {
        if let Some(end) = text.find("\n\n") {
            let message: String = text.drain(..end + 2).collect();
            if message.lines().any(|l| l == "event: codes/purchased") {
                let data = message
                    .lines()
                    .find_map(|l| l.strip_prefix("data: "))
                    .expect("a data line");
                break serde_json::from_str::<Value>(data).expect("JSON data");
            }
            continue;
        }
        let chunk = events
            .next_chunk(WAIT)
            .await
            .expect("the stream goes on")
            .expect("not ended");
        text.push_str(std::str::from_utf8(&chunk).expect("UTF-8"));
    };
    assert_eq!(data["Event"], "codes/purchased", "{data}");
    assert!(data.to_string().contains("sse"), "{data}");
}

#[tokio::test(flavor = "multi_thread")]
async fn failed_http_logins_ban_the_source_like_failed_device_logins() {
    let b = broker(|c| {
        c.gate.ban_after_failures = 3;
        c.gate.ban_window_secs = 600;
        c.gate.ban_secs = 3600;
    })
    .await;
    let web = http(&b);
    let q = json!({"Action": "DescribeBans"});
    for _ in 0..3 {
        assert_eq!(web.api("ops", "wrong", &q).await.status, 401);
    }
    // Banned: refused before any password is checked, the right one included.
    let before = b.broker.accounts.verifications();
    let r = web.api("ops", "ops-pw", &q).await;
    assert_eq!(r.status, 403, "{}", r.text());
    assert!(r.json().expect("JSON")["Message"]
        .as_str()
        .expect("msg")
        .contains("banned"));
    assert_eq!(b.broker.accounts.verifications(), before);
    // The same ban as devices get: it shows in DescribeBans (over MQTT) and
    // RemoveBan lifts it.
    let mut ops = Mqtt::login(&b, "ops", "ops-pw").await;
    let bans = ops.call(q.to_string().as_bytes()).await;
    assert_eq!(bans["TotalCount"], 1, "{bans}");
    assert_eq!(bans["Items"][0]["Source"], "127.0.0.1");
    let lifted = ops
        .call(
            json!({"Action": "RemoveBan", "Source": "127.0.0.1"})
                .to_string()
                .as_bytes(),
        )
        .await;
    assert_eq!(lifted["Code"], "OK", "{lifted}");
    let r = web.api("ops", "ops-pw", &q).await;
    assert_eq!(
        (r.status, r.json().expect("JSON")["TotalCount"].clone()),
        (200, json!(0))
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_second_broker_on_the_same_http_address_is_refused() {
    let first = broker(|_| {}).await;
    let addr = first.broker.http_addr().expect("http");
    let dir = tempfile::tempdir().expect("tempdir");
    let mut config = activation_broker::config::Config::on_loopback(dir.path());
    config.http.bind = addr;
    let (clock, _) = activation_broker::clock::Clock::manual(common::T0);
    let e = activation_broker::server::Broker::start(config.clone(), clock.clone())
        .await
        .err()
        .expect("refused");
    let text = format!("{e:#}");
    assert!(
        text.contains(&addr.to_string()) && text.contains("already in use"),
        "{text}"
    );
    // The first one still serves.
    let r = http(&first)
        .api("ops", "ops-pw", &json!({"Action": "DescribeProducts"}))
        .await;
    assert_eq!(r.status, 200);
    // Disabled: no listener at all.
    config.http.enabled = false;
    let b = activation_broker::server::Broker::start(config, clock)
        .await
        .expect("starts");
    assert!(b.http_addr().is_none());
}

#[tokio::test(flavor = "multi_thread")]
async fn the_api_over_tls() {
    use http_body_util::{BodyExt, Full};
    use hyper_util::rt::TokioIo;
    use std::sync::Arc;

    let certs = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data");
    let b = broker(|c| {
        c.http.tls = Some(activation_broker::config::TlsSection {
            bind: "127.0.0.1:0".parse().expect("addr"),
            cert: certs.join("server.pem"),
            key: certs.join("server.key"),
        });
    })
    .await;
    let addr = b
        .broker
        .http
        .as_ref()
        .and_then(|h| h.tls_addr())
        .expect("https listener");
    let mut roots = tokio_rustls::rustls::RootCertStore::empty();
    let pem = std::fs::read(certs.join("ca.pem")).expect("ca");
    for cert in rustls_pemfile::certs(&mut pem.as_slice()) {
        roots.add(cert.expect("pem")).expect("root");
    }
    let config = tokio_rustls::rustls::ClientConfig::builder()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect("localhost".try_into().expect("name"), tcp)
        .await
        .expect("TLS handshake");
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .expect("HTTP/1.1");
    tokio::spawn(conn);
    let req = hyper::Request::post("/api/v1")
        .header("host", "localhost")
        .header("authorization", basic("ops", "ops-pw"))
        .header("content-type", "application/json")
        .body(Full::new(bytes::Bytes::from(
            json!({"Action": "DescribeActivationSummary", "RequestId": "tls"}).to_string(),
        )))
        .expect("request");
    let resp = tokio::time::timeout(WAIT, send.send_request(req))
        .await
        .expect("in time")
        .expect("answer");
    assert_eq!(resp.status(), 200);
    let body = resp.into_body().collect().await.expect("body").to_bytes();
    let v: Value = serde_json::from_slice(&body).expect("JSON");
    assert_eq!(
        (v["RequestId"].clone(), v["Code"].clone()),
        (json!("tls"), json!("OK"))
    );
}

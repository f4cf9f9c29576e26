//! `GET /metrics` after a flood of real device connections agrees with the
//! admin plane's DescribeActivationSummary and DescribeProducts, and counts
//! every CONNACK by result. The metrics recorder is the process's: the test
//! runs in a process of its own.

use crate::common;

use std::collections::HashMap;

use activation_broker::admin::accounts::RoleConfig;
use common::broker::*;
use common::http::Http;
use serde_json::{json, Value};
use tokio::task::JoinSet;

/// The samples of a Prometheus text page: `name{labels}` → value.
fn samples(text: &str) -> HashMap<String, f64> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(|l| {
            let (k, v) = l.rsplit_once(' ')?;
            Some((k.to_owned(), v.parse().ok()?))
        })
        .collect()
}

fn get(s: &HashMap<String, f64>, key: &str) -> f64 {
    *s.get(key).unwrap_or_else(|| {
        let mut keys: Vec<_> = s.keys().collect();
        keys.sort();
        panic!("no sample {key} in {keys:?}")
    })
}

async fn scrape(web: &Http) -> HashMap<String, f64> {
    let r = web.get("/metrics").await;
    assert_eq!(r.status, 200);
    assert!(r
        .header("content-type")
        .is_some_and(|c| c.starts_with("text/plain")));
    samples(&r.text())
}

#[tokio::test(flavor = "multi_thread")]
async fn metrics_agree_with_the_summary_after_a_flood() {
    if !common::in_own_process("http_metrics::metrics_agree_with_the_summary_after_a_flood") {
        return;
    }
    let b = start_broker(|c| {
        c.accounts = vec![account(
            "ops",
            "ops-pw",
            RoleConfig::Named("admin".into()),
            false,
        )];
    })
    .await;
    let web = Http::new(b.broker.http_addr().expect("http"));
    const DEVICES: usize = 200;
    const CODES: u64 = 150;
    const BAD: usize = 20;
    let secret = b.product("fl", CODES, 86_400).await;
    b.product("idle", 7, 3600).await;
    let api = |v: Value| {
        let web = &web;
        async move {
            let r = web.api("ops", "ops-pw", &v).await;
            assert_eq!(r.json().expect("JSON")["Code"], "OK", "{}", r.text());
            r.json().expect("JSON")
        }
    };
    api(json!({"Action": "CreateOrder", "Quantity": 30, "ValiditySeconds": 60})).await;

    // The flood: DEVICES devices at once for CODES codes, and BAD with a
    // wrong password.
    let addr = b.addr();
    let mut set = JoinSet::new();
    for i in 0..DEVICES + BAD {
        let dk = format!("dev-{i}");
        let (user, mut pass) = b.creds("fl", &dk, &secret);
        if i >= DEVICES {
            pass = "0".repeat(pass.len());
        }
        set.spawn(async move {
            let id = activation_broker::credentials::client_id("fl", &dk);
            (i, v4::connect(addr, &id, &user, &pass).await)
        });
    }
    let mut online = Vec::new();
    let mut refused: HashMap<u8, usize> = HashMap::new();
    while let Some(r) = set.join_next().await {
        match r.expect("task") {
            (_, Ok(conn)) => online.push(conn),
            (_, Err(code)) => *refused.entry(code).or_default() += 1,
        }
    }
    assert_eq!(online.len() as u64, CODES, "refused: {refused:?}");

    let summary = api(json!({"Action": "DescribeActivationSummary"})).await;
    let products = api(json!({"Action": "DescribeProducts"})).await;
    let s = scrape(&web).await;
    for (state, key) in [
        ("total", "Total"),
        ("consumed", "Consumed"),
        ("available", "Available"),
        ("unassigned", "Unassigned"),
        ("forfeited", "Forfeited"),
    ] {
        assert_eq!(
            get(&s, &format!("activation_codes{{state=\"{state}\"}}")),
            summary[key].as_f64().expect("number"),
            "{state}"
        );
    }
    for p in products["Items"].as_array().expect("items") {
        let pk = p["ProductKey"].as_str().expect("pk");
        for (state, key) in [
            ("total", "Total"),
            ("consumed", "Consumed"),
            ("available", "Available"),
        ] {
            assert_eq!(
                get(
                    &s,
                    &format!("activation_codes{{product=\"{pk}\",state=\"{state}\"}}")
                ),
                p[key].as_f64().expect("number"),
                "{pk} {state}"
            );
        }
    }
    assert_eq!(
        get(&s, "activation_codes{state=\"consumed\"}"),
        CODES as f64
    );
    assert_eq!(get(&s, "activation_products"), 2.0);

    // Every CONNACK counted by result.
    let connects = |result: &str| {
        s.get(&format!(
            "activation_connects_total{{listener=\"devices\",result=\"{result}\"}}"
        ))
        .copied()
        .unwrap_or(0.0)
    };
    assert_eq!(connects("accepted"), CODES as f64);
    assert_eq!(connects("no_code"), (DEVICES as u64 - CODES) as f64);
    assert_eq!(connects("bad_credentials"), BAD as f64);
    assert_eq!(
        get(&s, "activation_connack_seconds_count{listener=\"devices\"}"),
        (DEVICES + BAD) as f64
    );
    assert!(s.contains_key("activation_connack_seconds_bucket{listener=\"devices\",le=\"0.005\"}"));
    assert_eq!(get(&s, "activation_online_devices"), CODES as f64);
    assert_eq!(
        get(&s, "activation_sessions{state=\"online\"}"),
        CODES as f64
    );
    // Group commit: at least one batch, each consumption in one.
    assert!(get(&s, "activation_ledger_commit_seconds_count") >= 1.0);
    assert!(get(&s, "activation_ledger_batch_size_sum") >= CODES as f64);
    assert!(get(&s, "process_resident_memory_bytes") > 0.0);
    assert!(get(&s, "process_open_fds") > 0.0);

    // Devices leaving: the online gauge follows.
    let gone = 50;
    for (c, el) in online.drain(..gone) {
        let _ = c.disconnect().await;
        drop(el);
    }
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let s = scrape(&web).await;
        if get(&s, "activation_online_devices") == (CODES as usize - gone) as f64 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "online gauge never fell"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

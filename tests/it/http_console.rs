//! The operator console in a real headless browser (Debian's `chromium`
//! driven through `chromedriver` with fantoccini): log in, read the
//! counters after real devices connect, assign codes through the dialog's
//! dry run, find a device's codes by DeviceKey, toggle automatic renewal —
//! each checked against the ledger through admin actions. Without chromium
//! or chromedriver the test prints a SKIPPED line and passes.
//!
//! `CONSOLE_SCREENSHOT=path.png` saves a screenshot of the console at the
//! end (the README's `docs/console.png` comes from here).

use crate::common;

use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use activation_broker::admin::accounts::RoleConfig;
use common::broker::*;
use common::http::Http;
use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::{json, Value};

const CHROMIUM: &str = "chromium";
const CHROMEDRIVER: &str = "chromedriver";

fn installed(bin: &str) -> bool {
    Command::new(bin)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// chromedriver on a free port, killed on drop.
struct Driver {
    child: Child,
    port: u16,
}

impl Driver {
    fn start() -> Driver {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("free port")
            .port();
        let child = Command::new(CHROMEDRIVER)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("chromedriver starts");
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_err() {
            assert!(
                std::time::Instant::now() < deadline,
                "chromedriver never listened"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        Driver { child, port }
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn browser(driver: &Driver, profile: &std::path::Path) -> Client {
    let mut caps = serde_json::Map::new();
    caps.insert(
        "goog:chromeOptions".into(),
        json!({
            "binary": which(CHROMIUM),
            "args": [
                "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1400,1000", "--no-first-run", "--disable-extensions",
                format!("--user-data-dir={}", profile.display()),
            ]
        }),
    );
    ClientBuilder::rustls()
        .expect("rustls")
        .capabilities(caps)
        .connect(&format!("http://127.0.0.1:{}", driver.port))
        .await
        .expect("a browser session")
}

fn which(bin: &str) -> String {
    let out = Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {bin}"))
        .output()
        .expect("sh");
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// Waits until the text of `css` satisfies `ok`; returns it.
async fn wait_text(c: &Client, css: &str, ok: impl Fn(&str) -> bool) -> String {
    let deadline = tokio::time::Instant::now() + WAIT;
    let mut last = String::new();
    loop {
        if let Ok(e) = c.find(Locator::Css(css)).await {
            if let Ok(t) = e.text().await {
                if ok(&t) {
                    return t;
                }
                last = t;
            }
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{css} never got the expected text; last {last:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits until `css` is displayed.
async fn wait_shown(c: &Client, css: &str) -> fantoccini::elements::Element {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        if let Ok(e) = c.find(Locator::Css(css)).await {
            if e.is_displayed().await.unwrap_or(false) {
                return e;
            }
        }
        assert!(tokio::time::Instant::now() < deadline, "{css} never shown");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn click(c: &Client, css: &str) {
    wait_shown(c, css)
        .await
        .click()
        .await
        .unwrap_or_else(|e| panic!("click {css}: {e}"));
}

async fn type_into(c: &Client, css: &str, text: &str) {
    let e = wait_shown(c, css).await;
    e.clear().await.expect("clear");
    e.send_keys(text).await.expect("type");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_console_in_a_real_browser() {
    if !installed(CHROMIUM) || !installed(CHROMEDRIVER) {
        println!("SKIPPED: the console's browser test needs `chromium` and `chromedriver` (apt-get install chromium chromium-driver; scripts/test installs them)");
        return;
    }
    let b = start_broker(|c| {
        c.accounts = vec![account(
            "ops",
            "ops-pw",
            RoleConfig::Named("admin".into()),
            true,
        )];
    })
    .await;
    let web = Http::new(b.broker.http_addr().expect("http"));
    let api = |v: Value| {
        let web = &web;
        async move {
            let r = web.api("ops", "ops-pw", &v).await;
            assert_eq!(r.json().expect("JSON")["Code"], "OK", "{}", r.text());
            r.json().expect("JSON")
        }
    };
    let secret = b.product("lamps", 5, 86_400).await;
    api(json!({"Action": "CreateProduct", "ProductKey": "pumps", "Name": "Pumps"})).await;
    api(json!({"Action": "CreateOrder", "OrderId": "spring", "Quantity": 20, "ValiditySeconds": 31_536_000})).await;

    let driver = Driver::start();
    let profile = tempfile::tempdir().expect("profile dir");
    let c = browser(&driver, profile.path()).await;
    let base = format!("http://{}", b.broker.http_addr().expect("http"));

    // Log in (a wrong password first).
    c.goto(&format!("{base}/")).await.expect("console");
    type_into(&c, "#login-account", "ops").await;
    type_into(&c, "#login-password", "nope").await;
    click(&c, "#login-submit").await;
    wait_text(&c, "#login-error", |t| t.contains("wrong password")).await;
    type_into(&c, "#login-password", "ops-pw").await;
    click(&c, "#login-submit").await;
    wait_shown(&c, "#app").await;
    wait_text(&c, "#who-name", |t| t == "ops").await;

    // Counters after real devices connect (the live strip refreshes them).
    let mut devices = Vec::new();
    for i in 1..=3 {
        let dk = format!("lamp-{i}");
        let (user, pass) = b.creds("lamps", &dk, &secret);
        let id = activation_broker::credentials::client_id("lamps", &dk);
        devices.push(
            v4::connect(b.addr(), &id, &user, &pass)
                .await
                .expect("device connects"),
        );
    }
    wait_text(&c, "#card-consumed", |t| t == "3").await;
    let s = api(json!({"Action": "DescribeActivationSummary"})).await;
    for (card, key) in [
        ("#card-total", "Total"),
        ("#card-consumed", "Consumed"),
        ("#card-available", "Available"),
        ("#card-unassigned", "Unassigned"),
        ("#card-near-expiry", "NearExpiry"),
    ] {
        let want = s[key].to_string();
        wait_text(&c, card, |t| t == want).await;
    }
    wait_text(&c, "#events", |t| {
        t.contains("device/activated") && t.contains("lamp-3")
    })
    .await;

    // Assign through the dialog: the dry run shows the maximum assignable;
    // too many is refused before anything happens; then confirm.
    click(&c, "#assign-open").await;
    wait_shown(&c, "#assign-dialog").await;
    c.find(Locator::Css("#assign-product"))
        .await
        .expect("select")
        .select_by_value("pumps")
        .await
        .expect("pick pumps");
    type_into(&c, "#assign-quantity", "25").await;
    type_into(&c, "#assign-validity", "31536000").await;
    click(&c, "#assign-dry-run").await;
    wait_text(&c, "#assign-max", |t| t == "20").await;
    wait_text(&c, "#assign-error", |t| {
        t.contains("InsufficientActivationCodes")
    })
    .await;
    let confirm = c
        .find(Locator::Css("#assign-confirm"))
        .await
        .expect("confirm");
    assert!(
        !confirm.is_enabled().await.expect("enabled?"),
        "no confirm after a refused dry run"
    );
    type_into(&c, "#assign-quantity", "12").await;
    click(&c, "#assign-dry-run").await;
    wait_text(&c, "#assign-max", |t| t == "20").await;
    let deadline = tokio::time::Instant::now() + WAIT;
    while !confirm.is_enabled().await.expect("enabled?") {
        assert!(
            tokio::time::Instant::now() < deadline,
            "confirm never enabled"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let before = api(json!({"Action": "DescribeProducts", "ProductKey": "pumps"})).await;
    assert_eq!(
        before["Items"][0]["Total"], 0,
        "the dry run assigned nothing"
    );
    click(&c, "#assign-confirm").await;
    wait_text(&c, "#assign-result", |t| t.contains("Assigned 12")).await;
    let after = api(json!({"Action": "DescribeProducts", "ProductKey": "pumps"})).await;
    assert_eq!(after["Items"][0]["Total"], 12);
    let history = api(json!({"Action": "DescribeAssignmentHistory", "ProductKey": "pumps"})).await;
    assert_eq!(history["TotalRecordCount"], 1);
    assert_eq!(history["Items"][0]["Quantity"], 12);
    click(&c, "#assign-cancel").await;
    wait_text(&c, "#card-unassigned", |t| t == "8").await;

    // The assignment history tab shows it.
    click(&c, "#tab-assignments").await;
    wait_text(&c, "#assignments-table tbody", |t| {
        t.contains("pumps") && t.contains("12")
    })
    .await;

    // Details of lamps: find lamp-2 by DeviceKey; its activation history.
    click(&c, "#tab-products").await;
    click(&c, "#products-table button[data-product=\"lamps\"]").await;
    wait_shown(&c, "#pane-details").await;
    wait_text(&c, "#details-codes tbody", |t| {
        t.contains("lamp-1") && t.contains("lamp-3")
    })
    .await;
    type_into(&c, "#details-device-key", "lamp-2").await;
    click(&c, "#details-search").await;
    wait_text(&c, "#details-codes tbody", |t| {
        t.contains("lamp-2") && !t.contains("lamp-1")
    })
    .await;
    let rows = c
        .find_all(Locator::Css("#details-codes tbody tr[data-device]"))
        .await
        .expect("rows");
    let codes = api(
        json!({"Action": "DescribeActivationCodes", "ProductKey": "lamps", "DeviceKey": "lamp-2"}),
    )
    .await;
    assert_eq!(
        rows.len() as u64,
        codes["TotalRecordCount"].as_u64().expect("count")
    );
    let id = codes["Items"][0]["Id"].to_string();
    let first = rows[0].text().await.expect("row text");
    assert!(first.contains(id.trim_matches('"')), "{first} vs {id}");
    click(&c, "#details-codes tbody tr[data-device=\"lamp-2\"] button").await;
    wait_text(&c, "#history-table tbody", |t| t.contains("Activation")).await;

    // Automatic renewal off with the switch, then on again: the ledger follows.
    let sw = wait_shown(&c, "#details-auto-renewal").await;
    assert!(sw.is_selected().await.expect("checked?"), "on by default");
    for want in [false, true] {
        sw.click().await.expect("toggle");
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            let r = api(json!({"Action": "DescribeAutoRenewal", "ProductKey": "lamps"})).await;
            if r["Enabled"] == want {
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "renewal never became {want}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        wait_text(&c, "#details-renewal-state", |t| {
            t == if want { "on" } else { "off" }
        })
        .await;
    }
    // The blacklist: add a device.
    type_into(&c, "#blacklist-device", "lamp-1").await;
    click(&c, "#blacklist-add").await;
    wait_text(&c, "#blacklist", |t| t.contains("lamp-1")).await;
    let r = api(json!({"Action": "DescribeAutoRenewal", "ProductKey": "lamps"})).await;
    assert_eq!(r["Blacklist"], json!(["lamp-1"]));

    if let Ok(path) = std::env::var("CONSOLE_SCREENSHOT") {
        click(&c, "#tab-products").await;
        wait_text(&c, "#products-table tbody", |t| t.contains("pumps")).await;
        let png = c.screenshot().await.expect("screenshot");
        std::fs::write(&path, png).expect("write screenshot");
        println!("screenshot: {path}");
    }
    c.close().await.expect("close the browser");
    drop(devices);
}

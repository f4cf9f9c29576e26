//! `GET /metrics`: Prometheus text format.
//!
//! Counters and histograms are recorded where things happen, through the
//! `metrics` facade (a counter increment or a histogram observation, no
//! I/O, no lock held): `activation_connects_total{listener,result}` and
//! `activation_connack_seconds{listener}` in the gateway's connection
//! (`gateway/connection.rs`), `activation_online_devices` beside the
//! `device/connected` and `device/disconnected` events there,
//! `activation_ledger_commit_seconds` and `activation_ledger_batch_size` in
//! the ledger's writer (`ledger/writer.rs`). `metrics-exporter-prometheus`
//! is the process's recorder and renders them; `metrics-process` adds the
//! process metrics (CPU, memory, descriptors, threads).
//!
//! The activation-code gauges are read from the ledger at each scrape, the
//! same counters `DescribeActivationSummary` and `DescribeProducts` answer:
//! `activation_codes{state}` for the broker (total, consumed, available,
//! unassigned, forfeited) and `activation_codes{product,state}` per live
//! product (total, consumed, available), plus `activation_products` and
//! `activation_near_expiry_devices`. Session counts come from the gateway
//! at each scrape.

use std::fmt::Write as _;
use std::sync::OnceLock;

use axum::extract::State;
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

use super::Shared;
use crate::ledger::{PageRequest, ProductFilter};

/// Latency buckets, seconds.
const SECONDS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];
/// Batch size buckets, requests.
const BATCH: &[f64] = &[
    1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 2048.0, 4096.0,
];

struct Installed {
    handle: PrometheusHandle,
    process: metrics_process::Collector,
}

static INSTALLED: OnceLock<Option<Installed>> = OnceLock::new();

/// Installs the process's recorder (once; later calls do nothing). If
/// another recorder was installed first, `/metrics` serves the ledger's
/// gauges only and says so in the log.
pub fn install() {
    INSTALLED.get_or_init(|| {
        let builder = PrometheusBuilder::new()
            .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), SECONDS)
            .and_then(|b| {
                b.set_buckets_for_metric(Matcher::Full("activation_ledger_batch_size".into()), BATCH)
            });
        let handle = match builder.map(PrometheusBuilder::install_recorder) {
            Ok(Ok(h)) => h,
            Ok(Err(e)) | Err(e) => {
                tracing::warn!(error = %e, "metrics recorder not installed: /metrics serves the ledger's gauges only");
                return None;
            }
        };
        describe();
        let process = metrics_process::Collector::default();
        process.describe();
        Some(Installed { handle, process })
    });
}

fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
    describe_counter!(
        "activation_connects_total",
        "CONNECTs answered with a CONNACK, by listener and result (accepted, no_code, expired, bad_credentials, rate_limited, banned, unavailable)"
    );
    describe_histogram!(
        "activation_connack_seconds",
        Unit::Seconds,
        "From an accepted connection (TLS done) to its CONNACK written, by listener"
    );
    describe_gauge!("activation_online_devices", "Devices connected now");
    describe_histogram!(
        "activation_ledger_commit_seconds",
        Unit::Seconds,
        "Durable write of one group-commit batch (sled batch, flush, fdatasync)"
    );
    describe_histogram!(
        "activation_ledger_batch_size",
        "Requests in one group-commit batch that changed the store"
    );
    describe_counter!(
        "activation_ledger_commit_conflicts_total",
        "etcd store: batches refused as stale (another node changed a key they wrote or read); each is undone and decided again"
    );
    describe_counter!(
        "activation_ledger_lane_steals_total",
        "etcd store: takings of codes from another node's lane (the pool empty), as decided by this node (a refused batch may decide one again)"
    );
    describe_counter!(
        "activation_ledger_lane_codes_reclaimed_total",
        "etcd store: codes this node returned to the pool from dead nodes' lanes"
    );
    describe_counter!(
        "activation_ledger_replica_reloads_total",
        "etcd store: reads of the whole ledger into this node's replica after it started (watch behind compaction, unknown commit outcome, catch-up timed out)"
    );
    // Shown from the start (0), so a scrape tells "none" from "not counted".
    metrics::counter!("activation_ledger_commit_conflicts_total").increment(0);
    metrics::counter!("activation_ledger_replica_reloads_total").increment(0);
    metrics::counter!("activation_ledger_lane_steals_total").increment(0);
    metrics::counter!("activation_ledger_lane_codes_reclaimed_total").increment(0);
    describe_gauge!(
        "activation_sessions",
        "Sessions: online (devices and accounts), router_linked (holding a router link), lingering (ended, waiting for a delayed will or expiry)"
    );
}

/// Prometheus text of everything.
pub async fn render(st: &Shared) -> Result<String, crate::admin::AdminError> {
    let gw = &st.gateway;
    let (lingering, _) = gw.lingering_sessions();
    let online = gw.online().len();
    let linked = gw.linked_sessions();
    let mut out = String::new();
    if let Some(Some(i)) = INSTALLED.get() {
        metrics::gauge!("activation_sessions", "state" => "online").set(online as f64);
        metrics::gauge!("activation_sessions", "state" => "router_linked").set(linked as f64);
        metrics::gauge!("activation_sessions", "state" => "lingering").set(lingering as f64);
        i.process.collect();
        i.handle.run_upkeep();
        out = i.handle.render();
    }
    let window = st.admin.near_expiry_window_ms();
    let (summary, products) = st
        .admin
        .query(move |l| {
            let summary = l.summary(window);
            let mut products = Vec::new();
            let all = ProductFilter::default();
            for number in 1.. {
                let page = l.products(&all, PageRequest { number, size: 100 });
                let done = page.items.len() < 100;
                products.extend(
                    page.items
                        .into_iter()
                        .map(|p| (p.product_key.clone(), p.total, p.consumed, p.available())),
                );
                if done {
                    break;
                }
            }
            Ok((summary, products))
        })
        .await?;
    let _ = writeln!(
        out,
        "# HELP activation_codes Activation codes by state; without a product label the whole broker (total = consumed + available + forfeited; unassigned is part of available)"
    );
    let _ = writeln!(out, "# TYPE activation_codes gauge");
    for (state, v) in [
        ("total", summary.total),
        ("consumed", summary.consumed),
        ("available", summary.available),
        ("unassigned", summary.unassigned),
        ("forfeited", summary.forfeited),
    ] {
        let _ = writeln!(out, "activation_codes{{state=\"{state}\"}} {v}");
    }
    for (pk, total, consumed, available) in &products {
        let pk = escape(pk);
        for (state, v) in [
            ("total", total),
            ("consumed", consumed),
            ("available", available),
        ] {
            let _ = writeln!(
                out,
                "activation_codes{{product=\"{pk}\",state=\"{state}\"}} {v}"
            );
        }
    }
    let _ = writeln!(out, "# HELP activation_products Live products");
    let _ = writeln!(out, "# TYPE activation_products gauge");
    let _ = writeln!(out, "activation_products {}", summary.products);
    let _ = writeln!(
        out,
        "# HELP activation_near_expiry_devices Devices whose code expires within the near-expiry window ([ledger] near_expiry_days)"
    );
    let _ = writeln!(out, "# TYPE activation_near_expiry_devices gauge");
    let _ = writeln!(
        out,
        "activation_near_expiry_devices {}",
        summary.near_expiry
    );
    Ok(out)
}

/// A label value in the text format: `\`, `"` and newlines escaped.
fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

pub async fn scrape(State(st): State<Shared>) -> Response {
    match render(&st).await {
        Ok(text) => {
            let mut r = text.into_response();
            r.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
            );
            r
        }
        Err(e) => (StatusCode::SERVICE_UNAVAILABLE, e.to_string()).into_response(),
    }
}

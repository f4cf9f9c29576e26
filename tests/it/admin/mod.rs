//! The admin plane end to end through rumqttd's real router: operator
//! clients are local links publishing to `admin/v1/{account}/request` and
//! reading `admin/v1/{account}/response` and `admin/v1/events/#`, against a
//! real ledger in a tempdir with a manual clock. No sleeps: every wait is
//! for a message, with a timeout.

mod actions;
mod requests;

use crate::common;

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use activation_broker::admin::accounts::{Account, Accounts, Role};
use activation_broker::admin::announcer::Announcer;
use activation_broker::admin::service::{AdminService, EVENTS_FILTER};
use activation_broker::admin::{AdminContext, ACTIONS};
use activation_broker::events::{Event, EventKind};
use activation_broker::gateway::acl;
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
        // These links reach the router without the gateway, which in the
        // broker raises the bus's flag for a SUBSCRIBE to the event topics
        // before its SUBACK: so does this harness.
        if filters
            .iter()
            .any(|f| acl::subscription_overlaps(f, EVENTS_FILTER))
        {
            self.t
                .ledger
                .events()
                .mqtt_interest()
                .store(true, Ordering::SeqCst);
        }
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

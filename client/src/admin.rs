//! The admin request client: an account's MQTT 5 connection to the
//! accounts listener that publishes requests to `admin/v1/{account}/request`
//! and reads their responses on `admin/v1/{account}/response`, matched by
//! correlation data or RequestId (docs/PROTOCOL.md §4).

use std::collections::HashMap;
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use bytes::Bytes;
use rumqttc::v5::mqttbytes::v5::{Packet, PublishProperties, SubscribeReasonCode};
use rumqttc::v5::mqttbytes::QoS;
use rumqttc::v5::{AsyncClient, ConnectionError, Event, EventLoop, MqttOptions};
use serde_json::{Map, Value};
use tokio::sync::mpsc;

/// Every event topic.
pub const EVENTS_FILTER: &str = "admin/v1/events/#";
/// Prefix of the event topics: `admin/v1/events/{kind}`.
pub const EVENTS_PREFIX: &str = "admin/v1/events/";

/// Where `account` publishes its requests.
pub fn request_topic(account: &str) -> String {
    format!("admin/v1/{account}/request")
}

/// Where `account` reads its responses.
pub fn response_topic(account: &str) -> String {
    format!("admin/v1/{account}/response")
}

/// A fresh request id (32 hex digits, UUID-sized).
pub fn new_request_id() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static SEQ: AtomicU64 = AtomicU64::new(0);
    let seq = SEQ.fetch_add(1, Ordering::Relaxed);
    let r: u64 = rand::random();
    format!("{r:016x}{seq:016x}")
}

/// Where and as whom to connect.
#[derive(Debug, Clone)]
pub struct Login {
    pub host: String,
    pub port: u16,
    pub account: String,
    pub password: String,
    /// For the connection, the subscription and each response.
    pub timeout: Duration,
}

impl Login {
    /// An MQTT 5 clean-start session of the account (client id
    /// `{account}-{tag}-{random}`) and its event loop, not yet polled.
    pub fn session(&self, tag: &str) -> (AsyncClient, EventLoop) {
        let client_id = format!("{}-{tag}-{}", self.account, &new_request_id()[..12]);
        let mut opts = MqttOptions::new(client_id, self.host.clone(), self.port);
        opts.set_credentials(self.account.clone(), self.password.clone())
            .set_keep_alive(Duration::from_secs(30))
            .set_clean_start(true)
            .set_connection_timeout(self.timeout.as_secs().max(1))
            .set_max_packet_size(Some(16 * 1024 * 1024));
        AsyncClient::new(opts, 16)
    }

    /// The next packet from the broker; a refused login or a lost
    /// connection as an error naming the listener.
    pub async fn next_packet(&self, el: &mut EventLoop) -> anyhow::Result<Packet> {
        loop {
            match el.poll().await {
                Ok(Event::Incoming(p)) => return Ok(p),
                Ok(Event::Outgoing(_)) => {}
                Err(ConnectionError::ConnectionRefused(code)) => bail!(
                    "login as {} refused by {}:{}: {code:?}",
                    self.account,
                    self.host,
                    self.port
                ),
                Err(e) => bail!("connection to {}:{} failed: {e}", self.host, self.port),
            }
        }
    }

    /// Waits for the CONNACK, then subscribes to `filter` and waits for its
    /// SUBACK, within the timeout.
    pub async fn connect_and_subscribe(
        &self,
        client: &AsyncClient,
        el: &mut EventLoop,
        filter: &str,
    ) -> anyhow::Result<()> {
        let work = async {
            while !matches!(self.next_packet(el).await?, Packet::ConnAck(_)) {}
            client
                .subscribe(filter, QoS::AtLeastOnce)
                .await
                .map_err(|e| anyhow!("subscribing to {filter}: {e}"))?;
            loop {
                if let Packet::SubAck(ack) = self.next_packet(el).await? {
                    return match ack.return_codes.first() {
                        Some(SubscribeReasonCode::Success(_)) => Ok(()),
                        other => Err(anyhow!(
                            "subscription to {filter} refused: {other:?} (may this account read it?)"
                        )),
                    };
                }
            }
        };
        tokio::time::timeout(self.timeout, work)
            .await
            .map_err(|_| {
                anyhow!(
                    "no connection to {}:{} within {} s",
                    self.host,
                    self.port,
                    self.timeout.as_secs()
                )
            })?
    }
}

/// A connected admin client; requests may follow one another.
pub struct AdminClient {
    client: AsyncClient,
    login: Login,
    /// Responses with their request's id.
    responses: mpsc::Receiver<anyhow::Result<(Option<String>, Value)>>,
    /// Responses that arrived for another request of this client.
    stash: HashMap<String, Value>,
    driver: tokio::task::JoinHandle<()>,
}

impl AdminClient {
    /// Logs in and subscribes to the account's response topic.
    pub async fn connect(login: &Login) -> anyhow::Result<AdminClient> {
        let (client, mut el) = login.session("admin");
        let reply = response_topic(&login.account);
        login
            .connect_and_subscribe(&client, &mut el, &reply)
            .await?;
        let (tx, responses) = mpsc::channel(64);
        let reader = login.clone();
        let driver = tokio::spawn(async move {
            loop {
                let v = match reader.next_packet(&mut el).await {
                    Ok(Packet::Publish(p)) if p.topic == reply.as_bytes() => {
                        let Ok(v) = serde_json::from_slice::<Value>(&p.payload) else {
                            continue;
                        };
                        let correlation = p
                            .properties
                            .and_then(|pp| pp.correlation_data)
                            .map(|c| String::from_utf8_lossy(&c).into_owned());
                        Ok((request_id_of(&v, correlation), v))
                    }
                    Ok(Packet::Disconnect(d)) => {
                        Err(anyhow!("the broker disconnected: {:?}", d.reason_code))
                    }
                    Ok(_) => continue,
                    Err(e) => Err(e),
                };
                let end = v.is_err();
                if tx.send(v).await.is_err() || end {
                    return;
                }
            }
        });
        Ok(AdminClient {
            client,
            login: login.clone(),
            responses,
            stash: HashMap::new(),
            driver,
        })
    }

    /// Sends one request (`Action` and parameters; a RequestId is added
    /// unless given) and returns its response, whatever its Code.
    pub async fn request(&mut self, mut params: Map<String, Value>) -> anyhow::Result<Value> {
        let request_id = match params.get("RequestId") {
            Some(Value::String(id)) => id.clone(),
            _ => {
                let id = new_request_id();
                params.insert("RequestId".into(), Value::String(id.clone()));
                id
            }
        };
        let action = params
            .get("Action")
            .and_then(Value::as_str)
            .unwrap_or("the request")
            .to_owned();
        let props = PublishProperties {
            response_topic: Some(response_topic(&self.login.account)),
            correlation_data: Some(Bytes::from(request_id.clone().into_bytes())),
            content_type: Some("application/json".into()),
            payload_format_indicator: Some(1),
            ..PublishProperties::default()
        };
        self.client
            .publish_with_properties(
                request_topic(&self.login.account),
                QoS::AtLeastOnce,
                false,
                Value::Object(params).to_string(),
                props,
            )
            .await
            .with_context(|| format!("sending {action}"))?;
        if let Some(v) = self.stash.remove(&request_id) {
            return Ok(v);
        }
        let deadline = tokio::time::Instant::now() + self.login.timeout;
        loop {
            let (id, v) = tokio::time::timeout_at(deadline, self.responses.recv())
                .await
                .map_err(|_| {
                    anyhow!(
                        "no response from {}:{} within {} s",
                        self.login.host,
                        self.login.port,
                        self.login.timeout.as_secs()
                    )
                })?
                .ok_or_else(|| anyhow!("admin connection closed while waiting for {action}"))??;
            match id {
                Some(id) if id == request_id => return Ok(v),
                Some(id) => {
                    self.stash.insert(id, v);
                }
                None => {}
            }
        }
    }

    /// Sends `request` (a JSON object with `Action`) and returns its
    /// response; an error naming the Code and Message unless it is OK.
    pub async fn call(&mut self, request: Value) -> anyhow::Result<Value> {
        let Value::Object(params) = request else {
            bail!("a request is a JSON object");
        };
        let action = params
            .get("Action")
            .and_then(Value::as_str)
            .unwrap_or("?")
            .to_owned();
        let response = self.request(params).await?;
        match response.get("Code").and_then(Value::as_str) {
            Some("OK") => Ok(response),
            code => bail!(
                "{action} failed: {} {}",
                code.unwrap_or("(no Code)"),
                response
                    .get("Message")
                    .and_then(Value::as_str)
                    .unwrap_or("")
            ),
        }
    }

    /// Disconnects and waits (briefly) for the connection to end.
    pub async fn close(self) {
        let _ = self.client.disconnect().await;
        let _ = tokio::time::timeout(Duration::from_secs(2), self.driver).await;
    }
}

/// The request a response answers: its correlation data, else its
/// RequestId.
fn request_id_of(v: &Value, correlation: Option<String>) -> Option<String> {
    correlation.or_else(|| {
        v.get("RequestId")
            .and_then(Value::as_str)
            .map(str::to_owned)
    })
}

/// Connects, sends one request, returns its response and disconnects.
pub async fn request_once(login: &Login, params: Map<String, Value>) -> anyhow::Result<Value> {
    let mut client = AdminClient::connect(login).await?;
    let response = client.request(params).await;
    client.close().await;
    response
}

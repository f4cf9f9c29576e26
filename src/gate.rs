//! The activation gate (SPEC §3): the decision a device CONNECT meets before
//! its CONNACK, cheapest checks first so an unauthenticated client can never
//! burn a code: identifier syntax → source ban and rate limit → timestamp
//! and signature (with the product or device secret) → the device's rate
//! limit → consume or renew (durable). Only authenticated attempts are
//! charged to a device, so naming a device cannot lock it out.
//!
//! Transport-agnostic: it takes the CONNECT's client id, user name,
//! password and source address, and answers with an admission or a typed
//! refusal that the connection layer maps to a CONNACK code.

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::net::IpAddr;
use std::time::Duration;

use parking_lot::Mutex;
use serde::Deserialize;

use crate::clock::{Clock, Millis};
use crate::credentials::{self, IdentityError};
use crate::ledger::{CodeRecord, Ledger, Refusal, SecretLookup};

mod bans;
pub use bans::Ban;
use bans::Bans;

/// Gate settings (`[gate]` in the config file).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GateConfig {
    /// Accepted clock skew of a credential's timestamp, in seconds.
    pub timestamp_window_secs: u64,
    /// Sustained CONNECT attempts per second from one source address (0 = unlimited).
    pub source_rate: f64,
    /// Burst of CONNECT attempts one source address may make at once.
    pub source_burst: f64,
    /// Sustained CONNECT attempts per second of one device that carry a
    /// valid signature (0 = unlimited); failed attempts count only against
    /// their source.
    pub device_rate: f64,
    /// Burst of CONNECT attempts of one device.
    pub device_burst: f64,
    /// Failed credential checks from one source within `ban_window_secs`
    /// that ban the source (0 = never ban).
    pub ban_after_failures: u32,
    pub ban_window_secs: u64,
    /// How long a banned source is refused.
    pub ban_secs: u64,
}

impl Default for GateConfig {
    fn default() -> Self {
        GateConfig {
            timestamp_window_secs: 300,
            source_rate: 2_000.0,
            source_burst: 10_000.0,
            device_rate: 1.0,
            device_burst: 10.0,
            ban_after_failures: 100,
            ban_window_secs: 60,
            ban_secs: 300,
        }
    }
}

/// What a refused CONNECT gets; each is one row of SPEC §3's table (the
/// connection layer's `RefusalCode` carries the wire codes).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GateRefusal {
    /// Malformed identifiers.
    ClientIdNotValid(String),
    /// Bad signature, stale timestamp, unknown product or device.
    BadCredentials(String),
    /// Source banned after repeated failures.
    Banned(String),
    /// Too many attempts.
    RateExceeded(String),
    /// No available code.
    QuotaExceeded(String),
    /// Expired, and renewal is off or the device is blacklisted.
    NotAuthorized(String),
    /// Store unavailable.
    Unavailable(String),
}

impl GateRefusal {
    /// The reason string (MQTT 5 Reason String, event reason).
    pub fn reason(&self) -> &str {
        match self {
            GateRefusal::ClientIdNotValid(r)
            | GateRefusal::BadCredentials(r)
            | GateRefusal::Banned(r)
            | GateRefusal::RateExceeded(r)
            | GateRefusal::QuotaExceeded(r)
            | GateRefusal::NotAuthorized(r)
            | GateRefusal::Unavailable(r) => r,
        }
    }
}

/// An admitted device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Admission {
    pub product_key: String,
    pub device_key: String,
    /// `{ProductKey}.{DeviceKey}`, also when the CONNECT sent an empty id.
    pub client_id: String,
    pub expire_at: Millis,
    /// The code consumed by this connect (activation or renewal), if any.
    pub consumed: Option<CodeRecord>,
}

/// A CONNECT as the gate sees it.
#[derive(Debug, Clone, Copy)]
pub struct ConnectAttempt<'a> {
    pub client_id: &'a str,
    pub user_name: Option<&'a str>,
    pub password: Option<&'a [u8]>,
    pub source: IpAddr,
}

/// A token bucket per key, sharded; idle buckets are dropped once full.
struct Limiter<K> {
    rate: f64,
    burst: f64,
    shards: Vec<Mutex<HashMap<K, (f64, Millis)>>>,
}

impl<K: Hash + Eq + Clone> Limiter<K> {
    fn new(rate: f64, burst: f64) -> Self {
        Limiter {
            rate,
            burst: burst.max(1.0),
            shards: (0..32).map(|_| Mutex::new(HashMap::new())).collect(),
        }
    }

    fn shard(&self, key: &K) -> &Mutex<HashMap<K, (f64, Millis)>> {
        let mut h = std::collections::hash_map::DefaultHasher::new();
        key.hash(&mut h);
        &self.shards[(h.finish() as usize) % self.shards.len()]
    }

    /// Takes one token; false when the bucket is empty.
    fn allow(&self, key: &K, now: Millis) -> bool {
        if self.rate <= 0.0 {
            return true;
        }
        let mut map = self.shard(key).lock();
        if map.len() > 100_000 {
            // Forget buckets that have refilled completely: they carry no state.
            let full_after = (self.burst / self.rate * 1000.0) as Millis;
            map.retain(|_, (_, at)| now - *at < full_after);
        }
        let (tokens, at) = map.entry(key.clone()).or_insert((self.burst, now));
        let elapsed = (now - *at).max(0) as f64 / 1000.0;
        *tokens = (*tokens + elapsed * self.rate).min(self.burst);
        *at = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

pub struct Gate {
    ledger: Ledger,
    clock: Clock,
    window_ms: Millis,
    sources: Limiter<IpAddr>,
    devices: Limiter<(String, String)>,
    bans: Bans,
}

fn secs_ms(s: u64) -> Millis {
    Duration::from_secs(s).as_millis().min(i64::MAX as u128) as Millis
}

impl Gate {
    pub fn new(ledger: Ledger, config: &GateConfig) -> Gate {
        Gate {
            clock: ledger.clock().clone(),
            ledger,
            window_ms: secs_ms(config.timestamp_window_secs),
            sources: Limiter::new(config.source_rate, config.source_burst),
            devices: Limiter::new(config.device_rate, config.device_burst),
            bans: Bans::new(
                config.ban_after_failures,
                secs_ms(config.ban_window_secs),
                secs_ms(config.ban_secs),
            ),
        }
    }

    pub fn ledger(&self) -> &Ledger {
        &self.ledger
    }

    /// Decides a CONNECT, cheapest checks first.
    pub async fn admit(&self, a: ConnectAttempt<'_>) -> Result<Admission, GateRefusal> {
        let now = self.clock.now();
        // 1. Identifier syntax.
        let Some(user_name) = a.user_name else {
            return Err(GateRefusal::BadCredentials(
                "user name ProductKey&DeviceKey&timestamp is required".into(),
            ));
        };
        let user = credentials::parse_user_name(user_name).map_err(|e| match e {
            IdentityError::Timestamp => GateRefusal::BadCredentials(e.to_string()),
            _ => GateRefusal::ClientIdNotValid(e.to_string()),
        })?;
        credentials::check_client_id(a.client_id, &user)
            .map_err(|e| GateRefusal::ClientIdNotValid(e.to_string()))?;
        // 2. Bans and the source's rate limit.
        if self.bans.banned(a.source, now) {
            return Err(GateRefusal::Banned(format!(
                "source {} is banned after repeated failed logins",
                a.source
            )));
        }
        if !self.sources.allow(&a.source, now) {
            return Err(GateRefusal::RateExceeded(format!(
                "too many connection attempts from {}",
                a.source
            )));
        }
        // 3. Timestamp and signature, with the secret of 4. product/device.
        let Some(password) = a.password else {
            return Err(self.failed(a.source, now, "password is required".into()));
        };
        let secret = match self.ledger.secret_for(&user.product_key, &user.device_key) {
            SecretLookup::Secret(s) => s,
            SecretLookup::UnknownProduct => {
                let why = format!("unknown product {}", user.product_key);
                return Err(self.failed(a.source, now, why));
            }
            SecretLookup::UnknownDevice => {
                let why = format!(
                    "device {} is not registered in product {}",
                    user.device_key, user.product_key
                );
                return Err(self.failed(a.source, now, why));
            }
        };
        if let Err(e) = credentials::verify(
            &secret,
            user_name,
            user.timestamp_ms,
            password,
            now,
            self.window_ms,
        ) {
            let why = match e {
                credentials::SignatureError::Stale => format!(
                    "credential timestamp is more than {} s away from the broker's clock",
                    self.window_ms / 1000
                ),
                credentials::SignatureError::Mismatch => "signature does not match".into(),
            };
            return Err(self.failed(a.source, now, why));
        }
        // Only an attempt that proved the device's secret counts against the
        // device: unauthenticated attempts cost their source alone, so nobody
        // can lock a device out by naming it.
        let dev = (user.product_key.clone(), user.device_key.clone());
        if !self.devices.allow(&dev, now) {
            return Err(GateRefusal::RateExceeded(format!(
                "too many connection attempts of device {}",
                user.device_key
            )));
        }
        // 5. Consume or renew, durably.
        let admitted = self
            .ledger
            .connect(&user.product_key, &user.device_key)
            .await
            .map_err(|r| match r {
                Refusal::UnknownProduct(pk) => {
                    GateRefusal::BadCredentials(format!("unknown product {pk}"))
                }
                Refusal::UnknownDevice(pk, dk) => GateRefusal::BadCredentials(format!(
                    "device {dk} is not registered in product {pk}"
                )),
                r @ Refusal::NoCodeAvailable(_) => GateRefusal::QuotaExceeded(r.to_string()),
                r @ (Refusal::RenewalDisabled(_) | Refusal::Blacklisted(..)) => {
                    GateRefusal::NotAuthorized(r.to_string())
                }
                r @ Refusal::StoreUnavailable(_) => GateRefusal::Unavailable(r.to_string()),
            })?;
        Ok(Admission {
            client_id: credentials::client_id(&user.product_key, &user.device_key),
            product_key: user.product_key,
            device_key: user.device_key,
            expire_at: admitted.expire_at,
            consumed: admitted.consumed,
        })
    }

    /// A failed credential check of `source`: counted towards its ban.
    fn failed(&self, source: IpAddr, now: Millis, why: String) -> GateRefusal {
        self.bans.failed(source, now, &why);
        GateRefusal::BadCredentials(why)
    }

    /// Why `source` is refused now, if it is banned. For other login paths
    /// (the HTTP listener) that share the devices' bans.
    pub fn banned(&self, source: IpAddr) -> Option<String> {
        self.bans
            .banned(source, self.clock.now())
            .then(|| format!("source {source} is banned after repeated failed logins"))
    }

    /// Counts a failed login of `source` (another login path, e.g. an HTTP
    /// account login) towards its ban, like a failed device credential.
    pub fn login_failed(&self, source: IpAddr, why: &str) {
        self.bans.failed(source, self.clock.now(), why);
    }

    /// The sources banned now.
    pub fn bans(&self) -> Vec<Ban> {
        self.bans.list(self.clock.now())
    }

    /// Lifts the ban of `source`; the ban lifted, or `None` if it is not
    /// banned. `by` names who lifted it, for the log.
    pub fn remove_ban(&self, source: IpAddr, by: &str) -> Option<Ban> {
        self.bans.lift(source, self.clock.now(), by)
    }

    /// Renews an online device whose code expired (or confirms it is still
    /// valid). The refusal says why it must be disconnected.
    pub async fn renew_online(&self, pk: &str, dk: &str) -> Result<Admission, GateRefusal> {
        match self.ledger.connect(pk, dk).await {
            Ok(a) => Ok(Admission {
                client_id: credentials::client_id(pk, dk),
                product_key: pk.to_owned(),
                device_key: dk.to_owned(),
                expire_at: a.expire_at,
                consumed: a.consumed,
            }),
            Err(Refusal::NoCodeAvailable(p)) => Err(GateRefusal::QuotaExceeded(format!(
                "activation code expired and no code is available for product {p}"
            ))),
            Err(r @ (Refusal::RenewalDisabled(_) | Refusal::Blacklisted(..))) => {
                Err(GateRefusal::NotAuthorized(r.to_string()))
            }
            Err(r @ (Refusal::UnknownProduct(_) | Refusal::UnknownDevice(..))) => {
                Err(GateRefusal::NotAuthorized(r.to_string()))
            }
            Err(r @ Refusal::StoreUnavailable(_)) => Err(GateRefusal::Unavailable(r.to_string())),
        }
    }
}

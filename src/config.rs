//! The broker's configuration file (TOML). Every key has a default; the
//! embedded `config/activation-broker.toml` documents each one and is what
//! `serve` runs on without `--config`. Unknown keys and bad values are
//! errors naming the key.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::admin::accounts::AccountConfig;
use crate::gate::GateConfig;
use crate::gateway::{AclTemplate, ListenerConfig, TlsConfig};

/// The documented default configuration, embedded in the binary.
pub const DEFAULT_CONFIG: &str = include_str!("../config/activation-broker.toml");

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Directory of the sled store (and the generated accounts file).
    pub data_dir: PathBuf,
    pub devices: ListenerSection,
    pub accounts_listener: ListenerSection,
    /// Device topic namespace templates (`{ProductKey}`, `{DeviceKey}`).
    pub namespace: NamespaceSection,
    pub gate: GateConfig,
    pub ledger: LedgerSection,
    pub router: RouterSection,
    pub events: EventsSection,
    pub account_limits: AccountLimits,
    /// The HTTP listener: admin API, console, metrics (`[http]`).
    pub http: HttpSection,
    /// The log's level and format (`[log]`).
    pub log: crate::logging::LogSection,
    /// Operator and application accounts (`[[accounts]]`). None: the first
    /// start creates `admin` with a random password in `data_dir`.
    pub accounts: Vec<AccountConfig>,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ListenerSection {
    pub bind: SocketAddr,
    /// Optional TLS listener beside the plain one.
    pub tls: Option<TlsSection>,
    pub backlog: u32,
    pub connect_timeout_secs: u64,
    pub max_packet_size: usize,
    pub write_timeout_secs: u64,
    pub topic_alias_max: u16,
    pub max_concurrent_links: usize,
    /// Threads serving the listener (0: one per CPU).
    pub io_threads: usize,
    /// Seconds the authentication of a CONNECT may take (then 0x89 / 0x03).
    pub auth_timeout_secs: u64,
    /// Connections from one source address without CONNECT (0 = unlimited).
    pub max_pending_per_source: usize,
    /// Connections start with a PROXY protocol v2 header (load balancer).
    pub proxy_protocol: bool,
    /// Longest keepalive granted (MQTT 5 Server Keep Alive); 0 = the client's.
    pub max_keep_alive_secs: u16,
    /// Unacknowledged QoS 1/2 PUBLISHes an MQTT 5 client may have in flight.
    pub receive_maximum: u16,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsSection {
    pub bind: SocketAddr,
    pub cert: PathBuf,
    pub key: PathBuf,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NamespaceSection {
    pub publish: Vec<String>,
    pub subscribe: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LedgerSection {
    /// Most requests committed with one flush (1 = flush per request).
    pub max_batch: usize,
    /// `pool/low` fires when a product's available codes fall below this.
    pub pool_low_threshold: u64,
    /// Near-expiry window in days (DescribeNearExpiryDevices default,
    /// `device/expiring` events).
    pub near_expiry_days: u64,
    /// How often the near-expiry announcer looks for codes entering the window.
    pub expiring_scan_secs: u64,
    /// Where the ledger's records live.
    pub store: LedgerStore,
    /// The etcd cluster, when `store = "etcd"`.
    pub etcd: EtcdSection,
}

/// `sled`: embedded, in the data directory (one node). `etcd`: shared by
/// several broker nodes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LedgerStore {
    Sled,
    Etcd,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EtcdSection {
    /// Client URLs of the etcd members.
    pub endpoints: Vec<String>,
    /// This broker node's name, unique among the nodes.
    pub node: String,
    /// Every ledger key starts with it.
    pub prefix: String,
    /// Longest wait for one etcd call (past it a commit's outcome is unknown).
    pub timeout_ms: u64,
    /// Most codes one node moves from a product's pool to its lane at once
    /// (fewer as the pool runs low).
    pub lane_block: u64,
    /// Time to live of the node's lease; this long after a node stopped,
    /// the other nodes return the codes of its lanes to the pool.
    pub lease_ttl_secs: u64,
}

impl Default for EtcdSection {
    fn default() -> Self {
        EtcdSection {
            endpoints: vec!["http://127.0.0.1:2379".into()],
            node: "node-1".into(),
            prefix: "activation/".into(),
            timeout_ms: 5_000,
            lane_block: 256,
            lease_ttl_secs: 10,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RouterSection {
    /// Most sessions (devices and accounts) the router holds.
    pub max_connections: usize,
    /// Of those, how many only accounts may use (devices get the rest).
    pub reserved_for_accounts: usize,
    /// Retained messages one client id may hold (over it: PUBACK 0x97).
    pub max_retained_per_client: usize,
    /// Bytes all retained messages may take (over it: PUBACK 0x97).
    pub max_retained_bytes: usize,
    /// QoS 1/2 messages the router sends one session before it must
    /// acknowledge (1–65535).
    pub max_inflight_per_session: u16,
    /// Milliseconds publishers may be paused for an online QoS 1/2
    /// subscriber that lags by a whole filter log; past it the subscriber
    /// loses the oldest messages (logged) and the publishers resume.
    pub max_publisher_stall_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AccountLimits {
    /// Sessions one account may hold, live or stored (0 = unlimited).
    pub max_sessions_per_account: usize,
    /// Logins being verified (argon2) or waiting for it, all accounts together.
    pub max_pending_logins: usize,
}

impl Default for AccountLimits {
    fn default() -> Self {
        AccountLimits {
            max_sessions_per_account: 64,
            max_pending_logins: 64,
        }
    }
}

/// `[http]`: the admin API (`POST /api/v1`), the console (`/`) and
/// Prometheus metrics (`/metrics`).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpSection {
    /// Off: no HTTP listener at all.
    pub enabled: bool,
    pub bind: SocketAddr,
    /// Optional HTTPS listener beside the plain one.
    pub tls: Option<TlsSection>,
    /// Largest request body accepted, in bytes (then 413).
    pub max_body_bytes: usize,
    /// Seconds a console login stays valid.
    pub session_secs: u64,
    /// Serve `/metrics` (without credentials, like most exporters).
    pub metrics: bool,
}

impl Default for HttpSection {
    fn default() -> Self {
        HttpSection {
            enabled: true,
            bind: SocketAddr::from(([127, 0, 0, 1], 8080)),
            tls: None,
            max_body_bytes: 256 * 1024,
            session_secs: 8 * 3600,
            metrics: true,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EventsSection {
    /// Events buffered for each reader of the internal event stream.
    pub capacity: usize,
}

impl Default for EventsSection {
    fn default() -> Self {
        EventsSection { capacity: 65_536 }
    }
}

impl Default for Config {
    fn default() -> Self {
        Config {
            data_dir: PathBuf::from("./data"),
            devices: ListenerSection::default(),
            accounts_listener: ListenerSection {
                bind: SocketAddr::from(([127, 0, 0, 1], 1884)),
                ..ListenerSection::default()
            },
            namespace: NamespaceSection::default(),
            gate: GateConfig::default(),
            ledger: LedgerSection::default(),
            router: RouterSection::default(),
            events: EventsSection::default(),
            account_limits: AccountLimits::default(),
            http: HttpSection::default(),
            log: crate::logging::LogSection::default(),
            accounts: Vec::new(),
        }
    }
}

impl Default for ListenerSection {
    fn default() -> Self {
        ListenerSection {
            bind: SocketAddr::from(([0, 0, 0, 0], 1883)),
            tls: None,
            backlog: 8192,
            connect_timeout_secs: 10,
            max_packet_size: 256 * 1024,
            write_timeout_secs: 30,
            topic_alias_max: 32,
            max_concurrent_links: 64,
            io_threads: 0,
            auth_timeout_secs: 10,
            max_pending_per_source: 1024,
            proxy_protocol: false,
            max_keep_alive_secs: 0,
            receive_maximum: 65535,
        }
    }
}

impl Default for NamespaceSection {
    fn default() -> Self {
        let t = vec![crate::gateway::DEFAULT_DEVICE_TEMPLATE.to_owned()];
        NamespaceSection {
            publish: t.clone(),
            subscribe: t,
        }
    }
}

impl Default for LedgerSection {
    fn default() -> Self {
        LedgerSection {
            max_batch: 4096,
            pool_low_threshold: 10,
            near_expiry_days: 30,
            expiring_scan_secs: 60,
            store: LedgerStore::Sled,
            etcd: EtcdSection::default(),
        }
    }
}

impl Default for RouterSection {
    fn default() -> Self {
        RouterSection {
            max_connections: 200_000,
            reserved_for_accounts: 1_000,
            max_retained_per_client: 100,
            max_retained_bytes: 64 * 1024 * 1024,
            max_inflight_per_session: 1_000,
            max_publisher_stall_ms: 5_000,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{origin}: {message}")]
    Invalid { origin: String, message: String },
}

impl Config {
    /// The defaults with the store in `data_dir` and every listener on
    /// 127.0.0.1 port 0 (the system picks free ports; the running broker
    /// tells which): a broker embedded in a test or another program.
    pub fn on_loopback(data_dir: &Path) -> Config {
        let mut config = Config {
            data_dir: data_dir.to_owned(),
            ..Config::default()
        };
        let any_port = std::net::SocketAddr::from(([127, 0, 0, 1], 0));
        config.devices.bind = any_port;
        config.accounts_listener.bind = any_port;
        config.http.bind = any_port;
        config
    }

    /// Parses TOML text; `origin` names it in errors.
    pub fn parse(text: &str, origin: &str) -> Result<Config, ConfigError> {
        let config: Config = toml::from_str(text).map_err(|e| ConfigError::Invalid {
            origin: origin.to_owned(),
            message: e.to_string(),
        })?;
        config.validate().map_err(|message| ConfigError::Invalid {
            origin: origin.to_owned(),
            message,
        })?;
        Ok(config)
    }

    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Config::parse(&text, &path.display().to_string())
    }

    /// The embedded default.
    pub fn embedded() -> Result<Config, ConfigError> {
        Config::parse(DEFAULT_CONFIG, "embedded default configuration")
    }

    /// Checks values serde cannot: ranges and templates. Names the key.
    fn validate(&self) -> Result<(), String> {
        self.log.validate()?;
        for (name, l) in [
            ("devices", &self.devices),
            ("accounts_listener", &self.accounts_listener),
        ] {
            if l.connect_timeout_secs == 0 {
                return Err(format!("{name}.connect_timeout_secs must be at least 1"));
            }
            if !(64..=268_435_455).contains(&l.max_packet_size) {
                return Err(format!(
                    "{name}.max_packet_size must be between 64 and 268435455 bytes"
                ));
            }
            if l.backlog == 0 {
                return Err(format!("{name}.backlog must be at least 1"));
            }
            if l.max_concurrent_links == 0 {
                return Err(format!("{name}.max_concurrent_links must be at least 1"));
            }
            if l.write_timeout_secs == 0 {
                return Err(format!("{name}.write_timeout_secs must be at least 1"));
            }
            if l.auth_timeout_secs == 0 {
                return Err(format!("{name}.auth_timeout_secs must be at least 1"));
            }
        }
        self.device_namespace()
            .validate(&["ProductKey", "DeviceKey"])
            .map_err(|e| format!("namespace: {e}"))?;
        for (key, list) in [
            ("namespace.publish", &self.namespace.publish),
            ("namespace.subscribe", &self.namespace.subscribe),
        ] {
            for t in list {
                let pattern = crate::gateway::acl::template_pattern(t);
                if crate::admin::accounts::template_reaches_admin_topics(&pattern) {
                    return Err(format!(
                        "{key}: {t:?} could reach the admin topics (admin/#) or $-topics; \
                         start each template with a literal level other than \"admin\", \
                         e.g. \"devices/{{ProductKey}}/{{DeviceKey}}/#\""
                    ));
                }
            }
        }
        if self.namespace.publish.is_empty() && self.namespace.subscribe.is_empty() {
            return Err("namespace: at least one publish or subscribe template is needed".into());
        }
        let g = &self.gate;
        if g.timestamp_window_secs == 0 {
            return Err("gate.timestamp_window_secs must be at least 1".into());
        }
        for (k, v) in [
            ("gate.source_rate", g.source_rate),
            ("gate.source_burst", g.source_burst),
            ("gate.device_rate", g.device_rate),
            ("gate.device_burst", g.device_burst),
        ] {
            if !v.is_finite() || v < 0.0 {
                return Err(format!("{k} must be a number >= 0"));
            }
        }
        if self.ledger.max_batch == 0 {
            return Err("ledger.max_batch must be at least 1".into());
        }
        if self.ledger.near_expiry_days == 0 || self.ledger.near_expiry_days > 3650 {
            return Err("ledger.near_expiry_days must be between 1 and 3650".into());
        }
        if self.ledger.expiring_scan_secs == 0 {
            return Err("ledger.expiring_scan_secs must be at least 1".into());
        }
        if self.ledger.store == LedgerStore::Etcd {
            let e = &self.ledger.etcd;
            if e.endpoints.is_empty() {
                return Err("ledger.etcd.endpoints must name at least one etcd member".into());
            }
            if e.node.is_empty() || e.prefix.is_empty() {
                return Err("ledger.etcd.node and ledger.etcd.prefix must not be empty".into());
            }
            if e.timeout_ms == 0 {
                return Err("ledger.etcd.timeout_ms must be at least 1".into());
            }
            if !e
                .node
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
            {
                return Err(
                    "ledger.etcd.node may hold only letters, digits, '-', '_' and '.'".into(),
                );
            }
            if e.lane_block == 0 {
                return Err("ledger.etcd.lane_block must be at least 1".into());
            }
            if e.lease_ttl_secs < 2 {
                return Err("ledger.etcd.lease_ttl_secs must be at least 2".into());
            }
        }
        if !(16..=16_777_216).contains(&self.events.capacity) {
            return Err("events.capacity must be between 16 and 16777216".into());
        }
        if self.router.max_connections == 0 {
            return Err("router.max_connections must be at least 1".into());
        }
        if self.router.reserved_for_accounts >= self.router.max_connections {
            return Err("router.reserved_for_accounts must be below router.max_connections".into());
        }
        if !(1024..=crate::admin::MAX_PAYLOAD_BYTES).contains(&self.http.max_body_bytes) {
            return Err(format!(
                "http.max_body_bytes must be between 1024 and {}",
                crate::admin::MAX_PAYLOAD_BYTES
            ));
        }
        if self.http.session_secs == 0 {
            return Err("http.session_secs must be at least 1".into());
        }
        if self.router.max_inflight_per_session == 0 {
            return Err("router.max_inflight_per_session must be between 1 and 65535".into());
        }
        if !(1..=3_600_000).contains(&self.router.max_publisher_stall_ms) {
            return Err("router.max_publisher_stall_ms must be between 1 and 3600000".into());
        }
        if self.account_limits.max_pending_logins == 0 {
            return Err("account_limits.max_pending_logins must be at least 1".into());
        }
        Ok(())
    }

    pub fn device_namespace(&self) -> AclTemplate {
        AclTemplate {
            publish: self.namespace.publish.clone(),
            subscribe: self.namespace.subscribe.clone(),
        }
    }
}

impl ListenerSection {
    /// The plain listener and, if configured, the TLS one.
    pub fn listeners(&self, name: &str) -> Vec<ListenerConfig> {
        let base = |bind: SocketAddr, tls: Option<TlsConfig>, suffix: &str| {
            let mut l = ListenerConfig::new(&format!("{name}{suffix}"), bind);
            l.tls = tls;
            l.backlog = self.backlog;
            l.connect_timeout = std::time::Duration::from_secs(self.connect_timeout_secs);
            l.max_packet_size = self.max_packet_size;
            l.write_timeout = std::time::Duration::from_secs(self.write_timeout_secs);
            l.topic_alias_max = self.topic_alias_max;
            l.max_concurrent_links = self.max_concurrent_links;
            l.io_threads = self.io_threads;
            l.auth_timeout = std::time::Duration::from_secs(self.auth_timeout_secs);
            l.max_pending_per_source = self.max_pending_per_source;
            l.proxy_protocol = self.proxy_protocol;
            l.max_keep_alive_secs = self.max_keep_alive_secs;
            l.receive_maximum = self.receive_maximum;
            l
        };
        let mut out = vec![base(self.bind, None, "")];
        if let Some(t) = &self.tls {
            out.push(base(
                t.bind,
                Some(TlsConfig {
                    cert_path: t.cert.clone(),
                    key_path: t.key.clone(),
                }),
                "-tls",
            ));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_embedded_file_documents_exactly_the_defaults() {
        assert_eq!(Config::embedded().expect("parses"), Config::default());
    }

    #[test]
    fn unknown_keys_and_bad_values_name_the_key() {
        let e = Config::parse("[gate]\ntimestamp_windw_secs = 3\n", "test.toml").unwrap_err();
        assert!(e.to_string().contains("timestamp_windw_secs"), "{e}");
        let e = Config::parse("[devices]\nbind = \"nonsense\"\n", "test.toml").unwrap_err();
        assert!(e.to_string().contains("bind"), "{e}");
        let e = Config::parse("[ledger]\nmax_batch = 0\n", "test.toml").unwrap_err();
        assert!(e.to_string().contains("ledger.max_batch"), "{e}");
        let e = Config::parse("[namespace]\npublish = [\"devices/{Nope}/#\"]\n", "t").unwrap_err();
        assert!(e.to_string().contains("Nope"), "{e}");
        for (key, t) in [
            ("namespace.publish", "#"),
            ("namespace.publish", "{ProductKey}/{DeviceKey}/#"),
            ("namespace.subscribe", "+/v1/#"),
            ("namespace.subscribe", "admin/v1/{DeviceKey}/request"),
            ("namespace.publish", "$SYS/{DeviceKey}"),
        ] {
            let e =
                Config::parse(&format!("[namespace]\n{}= [{t:?}]\n", &key[10..]), "t").unwrap_err();
            assert!(e.to_string().contains(key), "{e}");
            assert!(e.to_string().contains("admin topics"), "{e}");
        }
        let e = Config::parse("[gate]\nsource_rate = -1.0\n", "t").unwrap_err();
        assert!(e.to_string().contains("gate.source_rate"), "{e}");
        let e = Config::parse("[http]\nmax_body_bytes = 10\n", "t").unwrap_err();
        assert!(e.to_string().contains("http.max_body_bytes"), "{e}");
        let e = Config::parse("[http]\nbind = \"localhost\"\n", "t").unwrap_err();
        assert!(e.to_string().contains("bind"), "{e}");
        let c = Config::parse("[http]\nenabled = false\n", "t").expect("parses");
        assert!(!c.http.enabled);
    }
}

//! Starts the whole broker: ledger, router, gateway listeners, the gate and
//! the online enforcer. Used by `activation-broker serve` and by the tests,
//! which start it in-process on port 0 with a manual clock.

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context;

use crate::account_auth::AccountAuthenticator;
use crate::admin::announcer::Announcer;
use crate::admin::service::{AdminService, EVENTS_FILTER};
use crate::admin::{Accounts, AdminContext};
use crate::clock::Clock;
use crate::config::Config;
use crate::config::LedgerStore;
use crate::device_auth::DeviceAuthenticator;
use crate::enforcer::Enforcer;
use crate::events::EventBus;
use crate::gate::Gate;
use crate::gateway::{router_config_with, Gateway, Listener, RouterHandle, SubscribeWatch};
use crate::http::{HttpServer, HttpState};
use crate::ledger::{EtcdOptions, Ledger, LedgerOptions};

/// Opens the ledger on the configured store (off the async workers).
async fn open_ledger(
    config: &Config,
    options: LedgerOptions,
    clock: Clock,
    events: EventBus,
) -> anyhow::Result<Ledger> {
    match config.ledger.store {
        LedgerStore::Sled => {
            let path = config.data_dir.join(LEDGER_DIR);
            tokio::task::spawn_blocking(move || Ledger::open(&path, options, clock, events))
                .await?
                .with_context(|| format!("opening the ledger in {}", config.data_dir.display()))
        }
        LedgerStore::Etcd => {
            let e = &config.ledger.etcd;
            let etcd = EtcdOptions {
                endpoints: e.endpoints.clone(),
                node: e.node.clone(),
                prefix: e.prefix.clone(),
                timeout: std::time::Duration::from_millis(e.timeout_ms),
                lane_block: e.lane_block,
                lease_ttl: std::time::Duration::from_secs(e.lease_ttl_secs),
            };
            let what = format!(
                "opening the ledger on etcd {} (prefix {:?}, node {})",
                e.endpoints.join(","),
                e.prefix,
                e.node
            );
            tokio::task::spawn_blocking(move || Ledger::open_etcd(etcd, options, clock, events))
                .await?
                .context(what)
        }
    }
}

/// The ledger's store, in the data directory.
pub const LEDGER_DIR: &str = "ledger";

/// Where `BackupLedger` writes, in the data directory.
pub const BACKUP_DIR: &str = "backups";

/// A running broker.
pub struct Broker {
    pub config: Config,
    pub ledger: Ledger,
    pub gate: Arc<Gate>,
    pub gateway: Gateway,
    pub events: EventBus,
    pub clock: Clock,
    /// Device listeners: plain first, then TLS if configured.
    pub device_listeners: Vec<Listener>,
    /// Accounts listeners: plain first, then TLS if configured.
    pub account_listeners: Vec<Listener>,
    pub accounts: Arc<Accounts>,
    /// The HTTP listener (admin API, console, metrics), unless `[http]
    /// enabled = false`.
    pub http: Option<HttpServer>,
    admin: AdminService,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Broker {
    /// Starts the broker. With no account configured, the first start
    /// creates `admin` and prints `admin password: …` once on stdout.
    pub async fn start(config: Config, clock: Clock) -> anyhow::Result<Broker> {
        let data_dir = config.data_dir.clone();
        // 0700: the ledger and accounts.toml hold secrets.
        crate::ledger::create_private_dir(&data_dir)
            .with_context(|| format!("creating {}", data_dir.display()))?;
        let configured = config.accounts.clone();
        let dir = data_dir.clone();
        let accounts =
            tokio::task::spawn_blocking(move || Accounts::load(&configured, &dir)).await??;
        log_accounts(&accounts, !config.accounts.is_empty(), &data_dir);
        Broker::start_with_accounts(config, clock, Arc::new(accounts)).await
    }

    /// Starts the broker with these accounts.
    pub async fn start_with_accounts(
        config: Config,
        clock: Clock,
        accounts: Arc<Accounts>,
    ) -> anyhow::Result<Broker> {
        // Claimed first: a taken HTTP address refuses the start before any
        // other listener is up.
        let http_binding = if config.http.enabled {
            Some(HttpServer::bind(&config.http)?)
        } else {
            None
        };
        if http_binding.is_some() {
            // Before the listeners, which register their metrics once.
            crate::http::metrics::install();
        }
        let events = EventBus::new(config.events.capacity);
        let options = LedgerOptions {
            max_batch: config.ledger.max_batch,
            pool_low_threshold: config.ledger.pool_low_threshold,
            ..LedgerOptions::default()
        };
        let ledger = open_ledger(&config, options, clock.clone(), events.clone()).await?;
        let router = RouterHandle::spawn(0, router_config_with(&config.router));
        let gateway = Gateway::start(router, events.clone(), clock.clone()).await?;
        gateway
            .online()
            .reserve_for_accounts(config.router.reserved_for_accounts);
        let gate = Arc::new(Gate::new(ledger.clone(), &config.gate));
        let auth = Arc::new(DeviceAuthenticator::new(
            gate.clone(),
            config.device_namespace(),
        ));
        // Events are made only once someone may receive them: a session
        // subscribing to the event topics raises the bus's flag before
        // its SUBACK (devices never may; watched on every listener anyway).
        let watch = SubscribeWatch {
            filter: EVENTS_FILTER,
            seen: events.mqtt_interest(),
        };
        let mut device_listeners = Vec::new();
        for mut l in config.devices.listeners("devices") {
            l.subscribe_watch = Some(watch.clone());
            device_listeners.push(gateway.listen(l, auth.clone()).await?);
        }
        let account_auth = Arc::new(
            AccountAuthenticator::new(accounts.clone())
                .with_limits(gateway.clone(), config.account_limits.clone()),
        );
        let mut account_listeners = Vec::new();
        for mut l in config.accounts_listener.listeners("accounts") {
            l.subscribe_watch = Some(watch.clone());
            account_listeners.push(gateway.listen(l, account_auth.clone()).await?);
        }
        let router = gateway.router().clone();
        let admin_ctx = AdminContext::new(ledger.clone(), config.ledger.near_expiry_days)
            .with_gate(gate.clone())
            .with_backup_dir(config.data_dir.join(BACKUP_DIR));
        let admin = AdminService::start(admin_ctx.clone(), accounts.clone(), move |id| {
            Ok(router.link_blocking(id, true)?)
        })
        .await?;
        let http = if let Some(binding) = http_binding {
            Some(
                HttpServer::serve(
                    binding,
                    HttpState::new(
                        admin_ctx,
                        accounts.clone(),
                        gate.clone(),
                        events.clone(),
                        gateway.clone(),
                        config.http.clone(),
                    ),
                )
                .await?,
            )
        } else {
            None
        };
        let enforcer = Enforcer {
            gate: gate.clone(),
            online: gateway.online(),
            clock: clock.clone(),
        };
        let announcer = Announcer::new(
            ledger.clone(),
            config.ledger.near_expiry_days,
            config.ledger.expiring_scan_secs,
        );
        let tasks = vec![tokio::spawn(enforcer.run()), announcer.spawn()];
        Ok(Broker {
            config,
            ledger,
            gate,
            gateway,
            events,
            clock,
            device_listeners,
            account_listeners,
            accounts,
            http,
            admin,
            tasks,
        })
    }

    /// The plain device listener's address.
    pub fn device_addr(&self) -> SocketAddr {
        self.device_listeners[0].local_addr()
    }

    /// The plain accounts listener's address.
    pub fn accounts_addr(&self) -> SocketAddr {
        self.account_listeners[0].local_addr()
    }

    /// The plain HTTP listener's address, if it is enabled.
    pub fn http_addr(&self) -> Option<SocketAddr> {
        self.http.as_ref().map(HttpServer::local_addr)
    }

    /// Stops gracefully (SIGTERM/SIGINT): stops accepting, ends every
    /// session as the protocol says for a server going away (MQTT 5:
    /// DISCONNECT 0x8B; MQTT 3.1.1: the socket closed) so that their wills
    /// go out, devices first while accounts still receive them
    /// (`gateway/shutdown.rs`), then [`Broker::shutdown`]. Sessions still
    /// open after `limit` are dropped.
    pub async fn stop(&self, limit: std::time::Duration) -> crate::gateway::Stopped {
        for l in self.device_listeners.iter().chain(&self.account_listeners) {
            l.shutdown();
        }
        let stopped = self.gateway.stop_sessions(limit).await;
        self.shutdown();
        stopped
    }

    /// Stops accepting, drops every connection (their I/O threads end) and
    /// ends background tasks.
    pub fn shutdown(&self) {
        for l in self.device_listeners.iter().chain(&self.account_listeners) {
            l.close();
        }
        if let Some(h) = &self.http {
            h.shutdown();
        }
        self.admin.shutdown();
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// Names the accounts in force and where they come from; warns when
/// `[[accounts]]` leave a generated `admin` unused.
fn log_accounts(accounts: &Accounts, configured: bool, data_dir: &std::path::Path) {
    let names = accounts
        .iter()
        .map(|a| format!("{} ({})", a.name, role_name(&a.role)))
        .collect::<Vec<_>>()
        .join(", ");
    let generated = data_dir.join(crate::admin::accounts::GENERATED_FILE);
    if configured {
        tracing::info!(accounts = %names, from = "[[accounts]] of the config", "accounts in force");
        if generated.exists() {
            tracing::warn!(
                file = %generated.display(),
                "[[accounts]] are configured, so the generated accounts in this file are not used"
            );
        }
    } else {
        tracing::info!(accounts = %names, from = %generated.display(), "accounts in force (generated)");
    }
}

fn role_name(role: &crate::admin::accounts::Role) -> String {
    use crate::admin::accounts::Role;
    match role {
        Role::Admin => "admin".into(),
        Role::Viewer => "viewer".into(),
        Role::None => "no actions".into(),
        Role::Actions(set) => set.iter().cloned().collect::<Vec<_>>().join("|"),
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        self.shutdown();
    }
}

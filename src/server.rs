//! Starts the whole broker: ledger, router, gateway listeners, the gate and
//! the online enforcer. Used by `activation-broker serve` and by the tests,
//! which start it in-process on port 0 with a manual clock.

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context;

use crate::clock::Clock;
use crate::config::Config;
use crate::device_auth::DeviceAuthenticator;
use crate::enforcer::Enforcer;
use crate::events::EventBus;
use crate::gate::Gate;
use crate::gateway::{router_config, Gateway, Listener, RouterHandle};
use crate::ledger::{Ledger, LedgerOptions};

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
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Broker {
    pub async fn start(config: Config, clock: Clock) -> anyhow::Result<Broker> {
        let events = EventBus::default();
        let options = LedgerOptions {
            max_batch: config.ledger.max_batch,
            pool_low_threshold: config.ledger.pool_low_threshold,
            ..LedgerOptions::default()
        };
        let path = config.data_dir.join("ledger");
        let (c, e) = (clock.clone(), events.clone());
        let ledger = tokio::task::spawn_blocking(move || Ledger::open(&path, options, c, e))
            .await?
            .with_context(|| format!("opening the ledger in {}", config.data_dir.display()))?;
        let router = RouterHandle::spawn(0, router_config(config.router.max_connections));
        let gateway = Gateway::start(router, events.clone(), clock.clone()).await?;
        let gate = Arc::new(Gate::new(ledger.clone(), &config.gate));
        let auth = Arc::new(DeviceAuthenticator::new(
            gate.clone(),
            config.device_namespace(),
        ));
        let mut device_listeners = Vec::new();
        for l in config.devices.listeners("devices") {
            device_listeners.push(gateway.listen(l, auth.clone()).await?);
        }
        let enforcer = Enforcer {
            gate: gate.clone(),
            online: gateway.online(),
            clock: clock.clone(),
        };
        let tasks = vec![tokio::spawn(enforcer.run())];
        Ok(Broker {
            config,
            ledger,
            gate,
            gateway,
            events,
            clock,
            device_listeners,
            tasks,
        })
    }

    /// The plain device listener's address.
    pub fn device_addr(&self) -> SocketAddr {
        self.device_listeners[0].local_addr()
    }

    /// Stops accepting and ends background tasks. Sessions are closed by
    /// dropping the runtime.
    pub fn shutdown(&self) {
        for l in &self.device_listeners {
            l.shutdown();
        }
        for t in &self.tasks {
            t.abort();
        }
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        self.shutdown();
    }
}

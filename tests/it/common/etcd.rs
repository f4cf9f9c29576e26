//! A real etcd cluster for tests: `/usr/bin/etcd` members as child
//! processes on loopback ports, in a temporary directory, killed on drop;
//! and broker nodes (`ChildBroker`) configured for `store = "etcd"`.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command as Process, Stdio};
use std::time::{Duration, Instant};

use activation_broker::clock::Clock;
use activation_broker::ledger::{EtcdOptions, Ledger, LedgerError, LedgerOptions};
use activation_client::child::free_port;

use super::child::{broker_bin, ChildBroker};

/// The admin account every test broker node has.
pub const ADMIN: &str = "admin";
pub const ADMIN_PASSWORD: &str = "etcd-test-password";
/// The nodes' lease in tests: a stopped node's lanes return this long after.
pub const LEASE_TTL_SECS: u64 = 3;

/// The HTTP listener's address of a child broker, from its log.
pub fn http_addr(broker: &ChildBroker) -> std::net::SocketAddr {
    broker
        .log_tail()
        .lines()
        .filter(|l| l.contains("http listener ready"))
        .find_map(|l| {
            l.split_whitespace()
                .find_map(|w| w.strip_prefix("addr="))
                .and_then(|a| a.parse().ok())
        })
        .unwrap_or_else(|| panic!("no http listener in the log:\n{}", broker.log_tail()))
}

/// One admin API call to a child broker over HTTP; the JSON answer.
pub async fn admin(broker: &ChildBroker, body: serde_json::Value) -> serde_json::Value {
    let http = super::http::Http::new(http_addr(broker));
    http.api(ADMIN, ADMIN_PASSWORD, &body)
        .await
        .json()
        .expect("the admin API answers JSON")
}

/// The etcd binary (`ETCD_BIN` overrides it).
pub fn etcd_bin() -> PathBuf {
    std::env::var_os("ETCD_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/bin/etcd"))
}

pub struct Member {
    pub name: String,
    pub client_url: String,
    peer_url: String,
    data: PathBuf,
    child: Option<Child>,
}

pub struct EtcdCluster {
    pub dir: tempfile::TempDir,
    pub members: Vec<Member>,
    initial: String,
}

impl EtcdCluster {
    /// Starts `n` members and waits until the cluster answers.
    pub fn start(n: usize) -> EtcdCluster {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut members = Vec::new();
        for i in 0..n {
            let name = format!("m{i}");
            members.push(Member {
                client_url: format!("http://127.0.0.1:{}", free_port().expect("port")),
                peer_url: format!("http://127.0.0.1:{}", free_port().expect("port")),
                data: dir.path().join(&name),
                name,
                child: None,
            });
        }
        let initial = members
            .iter()
            .map(|m| format!("{}={}", m.name, m.peer_url))
            .collect::<Vec<_>>()
            .join(",");
        let mut cluster = EtcdCluster {
            dir,
            members,
            initial,
        };
        for i in 0..n {
            cluster.start_member(i);
        }
        cluster.wait_ready(Duration::from_secs(60));
        cluster
    }

    /// (Re)starts member `i` on its data directory.
    pub fn start_member(&mut self, i: usize) {
        let initial = self.initial.clone();
        let m = &mut self.members[i];
        let log = std::fs::File::create(self.dir.path().join(format!("{}.log", m.name)))
            .expect("etcd log");
        let child = Process::new(etcd_bin())
            .args(["--name", &m.name])
            .arg("--data-dir")
            .arg(&m.data)
            .args(["--listen-client-urls", &m.client_url])
            .args(["--advertise-client-urls", &m.client_url])
            .args(["--listen-peer-urls", &m.peer_url])
            .args(["--initial-advertise-peer-urls", &m.peer_url])
            .args(["--initial-cluster", &initial])
            .args(["--initial-cluster-state", "new"])
            .args(["--initial-cluster-token", "activation-test"])
            .args(["--max-txn-ops", "1024"])
            .args(["--heartbeat-interval", "50", "--election-timeout", "500"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn etcd (is etcd-server installed?)");
        m.child = Some(child);
    }

    /// SIGKILL of member `i`.
    pub fn kill(&mut self, i: usize) {
        if let Some(mut c) = self.members[i].child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// The index of the member that leads the cluster now.
    pub fn leader(&self) -> usize {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async {
            let mut ids = Vec::new();
            let mut leader = 0;
            for m in &self.members {
                let mut c = etcd_client::Client::connect([m.client_url.clone()], None)
                    .await
                    .expect("connect to a member");
                let s = c.status().await.expect("member status");
                ids.push(s.header().map_or(0, |h| h.member_id()));
                leader = s.leader();
            }
            ids.iter()
                .position(|id| *id == leader)
                .expect("the leader is a member")
        })
    }

    /// Checks the ledger in etcd: the invariants hold, the order's `codes`
    /// are all accounted for, and every device in `acked` (CONNACK 0)
    /// holds exactly one code. Returns the codes consumed.
    pub fn check(&self, pk: &str, codes: u64, acked: &[String], what: &str) -> u64 {
        let ledger = self.ledger("check");
        ledger
            .check_invariants()
            .unwrap_or_else(|e| panic!("{what}: {e}"));
        let c = ledger.counters();
        assert_eq!(c.total, codes, "{what}: the order's codes");
        assert_eq!(c.total, c.consumed + c.available + c.forfeited, "{what}");
        for dk in acked {
            let d = ledger
                .device(pk, dk)
                .unwrap_or_else(|e| panic!("{what}: acknowledged device {dk} not in etcd: {e}"));
            assert_eq!(d.codes.len(), 1, "{what}: {dk} holds exactly one code");
        }
        assert!(c.consumed >= acked.len() as u64, "{what}");
        c.consumed
    }

    pub fn endpoints(&self) -> Vec<String> {
        self.members.iter().map(|m| m.client_url.clone()).collect()
    }

    /// Waits until a write through the cluster succeeds.
    pub fn wait_ready(&self, limit: Duration) {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        let endpoints = self.endpoints();
        let deadline = Instant::now() + limit;
        rt.block_on(async {
            loop {
                let ok = async {
                    let opts = etcd_client::ConnectOptions::new()
                        .with_connect_timeout(Duration::from_secs(1))
                        .with_timeout(Duration::from_secs(2));
                    let mut c = etcd_client::Client::connect(endpoints.clone(), Some(opts))
                        .await
                        .ok()?;
                    c.put("ready-probe", "1", None).await.ok()
                }
                .await;
                if ok.is_some() {
                    return;
                }
                assert!(
                    Instant::now() < deadline,
                    "the etcd cluster did not become ready within {limit:?} (logs in {})",
                    self.dir.path().display()
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        });
    }

    /// The ledger options of a node of this cluster.
    pub fn options(&self, node: &str) -> EtcdOptions {
        EtcdOptions {
            endpoints: self.endpoints(),
            node: node.into(),
            prefix: "activation/".into(),
            timeout: Duration::from_secs(5),
            lane_block: 256,
            lease_ttl: Duration::from_secs(LEASE_TTL_SECS),
        }
    }

    /// A ledger node in this process (the operator's tool, or node "A").
    /// Opening it is tried again for up to 60 s while etcd answers
    /// "unavailable": after members were killed and started again, a
    /// member that is still catching up may time a read out although the
    /// cluster takes writes.
    pub fn ledger(&self, node: &str) -> Ledger {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            match Ledger::open_etcd(
                self.options(node),
                LedgerOptions::default(),
                Clock::system(),
                Default::default(),
            ) {
                Ok(l) => return l,
                Err(LedgerError::Unavailable(e)) if Instant::now() < deadline => {
                    eprintln!("opening the ledger on etcd again: {e}");
                    // A refused connection fails at once: no busy loop.
                    std::thread::sleep(Duration::from_millis(200));
                }
                Err(e) => panic!("open the ledger on etcd: {e:?}"),
            }
        }
    }

    /// Creates product `pk` (product-secret) with `codes` codes valid
    /// `validity` seconds; returns its secret.
    pub fn prepare(&self, pk: &str, codes: u64, validity: u64) -> String {
        super::child::stock_product(&self.ledger("setup"), pk, codes, validity)
    }

    /// A config for broker node `node` on this cluster: every listener on
    /// 127.0.0.1 port 0, rate limits off.
    pub fn write_broker_config(&self, dir: &Path, node: &str) -> PathBuf {
        self.write_broker_config_with(dir, node, false, 256)
    }

    /// As `write_broker_config`; `proxy`: the device listener expects the
    /// PROXY protocol (behind HAProxy); `lane_block`: `[ledger.etcd]`'s.
    pub fn write_broker_config_with(
        &self,
        dir: &Path,
        node: &str,
        proxy: bool,
        lane_block: u64,
    ) -> PathBuf {
        let endpoints = self
            .endpoints()
            .iter()
            .map(|e| format!("{e:?}"))
            .collect::<Vec<_>>()
            .join(", ");
        let path = dir.join(format!("{node}.toml"));
        std::fs::write(
            &path,
            format!(
                "[devices]\nbind = \"127.0.0.1:0\"\nmax_pending_per_source = 0\n\
                 proxy_protocol = {proxy}\n\
                 [accounts_listener]\nbind = \"127.0.0.1:0\"\n\
                 [http]\nbind = \"127.0.0.1:0\"\n\
                 [gate]\nsource_rate = 0.0\ndevice_rate = 0.0\nban_after_failures = 0\n\
                 [ledger]\nstore = \"etcd\"\n\
                 [ledger.etcd]\nendpoints = [{endpoints}]\nnode = \"{node}\"\n\
                 prefix = \"activation/\"\ntimeout_ms = 3000\n\
                 lease_ttl_secs = {LEASE_TTL_SECS}\nlane_block = {lane_block}\n\
                 [[accounts]]\nname = \"{ADMIN}\"\npassword_hash = \"{hash}\"\nrole = \"admin\"\n",
                hash = activation_broker::admin::accounts::hash_password(ADMIN_PASSWORD)
            ),
        )
        .expect("write config");
        path
    }

    /// Starts broker node `node` (its data directory under this cluster's).
    pub fn broker(&self, node: &str) -> ChildBroker {
        self.broker_with(node, false)
    }

    /// Starts broker node `node`; `proxy` as in `write_broker_config_with`.
    pub fn broker_with(&self, node: &str, proxy: bool) -> ChildBroker {
        self.broker_configured(node, proxy, 256)
    }

    /// Starts broker node `node`; `proxy`, `lane_block` as in
    /// `write_broker_config_with`.
    pub fn broker_configured(&self, node: &str, proxy: bool, lane_block: u64) -> ChildBroker {
        let dir = self.dir.path().join(format!("broker-{node}"));
        std::fs::create_dir_all(&dir).expect("broker dir");
        let config = self.write_broker_config_with(&dir, node, proxy, lane_block);
        ChildBroker::start(&broker_bin(), &config, &dir.join("data"), None)
    }
}

impl Drop for EtcdCluster {
    fn drop(&mut self) {
        for i in 0..self.members.len() {
            self.kill(i);
        }
    }
}

/// The sum of a counter's samples on the node's `/metrics` (0 if absent:
/// never incremented).
pub async fn counter(node: &ChildBroker, name: &str) -> u64 {
    let reply = super::http::Http::new(http_addr(node))
        .get("/metrics")
        .await;
    reply
        .text()
        .lines()
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with(' ') || rest.starts_with('{'))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

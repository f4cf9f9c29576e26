//! A flood of first activations against a broker child, recording every
//! DeviceKey that got CONNACK 0 in an "accepted file", one per line:
//! `activation-sim flood --accepted-file` when the simulator is built
//! beside the broker binary, otherwise a small rumqttc loop in this process.
//! Also what the crash and power-loss cycles share: starting one cycle's
//! flood and checking the store offline after it.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command as Process, Stdio};
use std::time::{Duration, Instant};

use activation_broker::clock::Clock;
use activation_broker::credentials::device_credentials;

use rand::Rng;

use super::child::{broker_bin, open_offline, ChildBroker};

/// The environment variable `name` as a number, or `default`.
pub fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// What floods: `"activation-sim"` or the in-process stand-in.
pub fn flood_name(sim: Option<&Path>) -> &'static str {
    if sim.is_some() {
        "activation-sim"
    } else {
        "in-process rumqttc"
    }
}

/// Prints which broker binary runs and what floods it.
pub fn print_setup(bin: &Path, sim: Option<&Path>) {
    eprintln!(
        "broker {}, flood by {}",
        bin.display(),
        sim.map(|p| p.display().to_string())
            .unwrap_or_else(|| "the in-process rumqttc loop".into())
    );
}

/// One crash/power-loss cycle's flood, running, and the random moment to
/// interrupt it.
pub struct CycleFlood {
    pub flood: Flood,
    /// The accepted file, `accepted-{cycle}.txt`.
    pub file: PathBuf,
    /// How long after the first acknowledgement it was interrupted.
    pub delay_ms: u64,
}

/// What every cycle of a crash/power-loss test floods.
pub struct Cycles<'a> {
    /// Where the accepted files go.
    pub dir: &'a Path,
    pub pk: &'a str,
    pub secret: &'a str,
    pub prefix: &'a str,
    pub per_cycle: u64,
    /// Connects per second.
    pub rate: u64,
    pub sim: Option<&'a Path>,
}

impl Cycles<'_> {
    /// Starts cycle `cycle`'s flood of `per_cycle` devices
    /// `{prefix}{start..}` against `broker`: half the range was used by the
    /// cycle before (reconnects: they must consume nothing), half is new
    /// (`next` moves on); MQTT 5 on even cycles, 3.1.1 on odd ones. Waits
    /// (bounded) for the first acknowledgement, then sleeps a random
    /// 0–1500 ms: the moment to interrupt.
    pub fn flood(
        &self,
        broker: &ChildBroker,
        cycle: u64,
        next: &mut u64,
        rng: &mut impl Rng,
    ) -> CycleFlood {
        let file = self.dir.join(format!("accepted-{cycle}.txt"));
        let start = next.saturating_sub(self.per_cycle / 2).max(1);
        *next = start + self.per_cycle;
        let flood = Flood::start(
            &FloodSpec {
                addr: broker.addr,
                pk: self.pk,
                secret: self.secret,
                prefix: self.prefix,
                start,
                devices: self.per_cycle,
                rate: self.rate,
                protocol: if cycle.is_multiple_of(2) { "5" } else { "4" },
                accepted_file: &file,
            },
            self.sim,
        );
        assert!(
            wait_first_ack(&file),
            "cycle {cycle}: no device was admitted\n{}",
            broker.log_tail()
        );
        let delay_ms = rng.gen_range(0..1_500u64);
        std::thread::sleep(Duration::from_millis(delay_ms));
        CycleFlood {
            flood,
            file,
            delay_ms,
        }
    }
}

/// Opens the store at `data` offline after a crash or power failure and
/// checks it: product `pk` is there, the SPEC invariants hold, all `codes`
/// of its order are accounted for, and every acknowledged device holds
/// exactly one code. Returns the codes consumed.
pub fn check_store(data: &Path, pk: &str, codes: u64, acked: &HashSet<String>, what: &str) -> u64 {
    let ledger = open_offline(data);
    let product = ledger
        .product(pk)
        .unwrap_or_else(|e| panic!("{what}: the product is gone after the failure: {e}"));
    assert_eq!(product.product_key, pk);
    ledger
        .check_invariants()
        .unwrap_or_else(|e| panic!("{what}: {e}"));
    let c = ledger.counters();
    assert_eq!(c.total, codes, "{what}: the order's codes are gone");
    assert_eq!(c.total, c.consumed + c.available + c.forfeited, "{what}");
    for dk in acked {
        let d = ledger
            .device(pk, dk)
            .unwrap_or_else(|e| panic!("{what}: acknowledged device {dk} lost: {e}"));
        assert_eq!(d.codes.len(), 1, "{what}: {dk} holds exactly one code");
    }
    assert!(c.consumed >= acked.len() as u64, "{what}");
    c.consumed
}

/// `activation-sim` beside the broker binary (same target directory), if
/// built; `ACTIVATION_SIM_BIN` overrides it.
pub fn sim_bin() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("ACTIVATION_SIM_BIN") {
        return Some(PathBuf::from(p));
    }
    let dir = broker_bin().parent()?.to_owned();
    let p = dir.join("activation-sim");
    p.exists().then_some(p)
}

/// Complete lines of the accepted file (a line cut by the end of the
/// writer is not an acknowledgement).
pub fn accepted(path: &Path) -> Vec<String> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let complete = match text.rfind('\n') {
        Some(i) => &text[..=i],
        None => "",
    };
    complete.lines().map(str::to_owned).collect()
}

/// What floods devices `{prefix}{start..start+devices}` of product `pk`.
pub struct FloodSpec<'a> {
    pub addr: SocketAddr,
    pub pk: &'a str,
    pub secret: &'a str,
    pub prefix: &'a str,
    pub start: u64,
    pub devices: u64,
    /// Connects per second (the simulator's pacing; the in-process loop is
    /// paced by its 64 connections at a time).
    pub rate: u64,
    /// `"4"` or `"5"`.
    pub protocol: &'a str,
    pub accepted_file: &'a Path,
}

pub enum Flood {
    Sim(Child),
    InProcess(std::thread::JoinHandle<()>),
}

impl Flood {
    /// Starts the flood with `sim` if given, else in this process.
    pub fn start(spec: &FloodSpec<'_>, sim: Option<&Path>) -> Flood {
        match sim {
            Some(sim) => Flood::Sim(
                Process::new(sim)
                    .args(["flood", "--host", "127.0.0.1", "--port"])
                    .arg(spec.addr.port().to_string())
                    .args(["--protocol", spec.protocol, "--product-key", spec.pk])
                    .arg("--product-secret")
                    .arg(spec.secret)
                    .arg("--prefix")
                    .arg(spec.prefix)
                    .arg("--start")
                    .arg(spec.start.to_string())
                    .arg("--devices")
                    .arg(spec.devices.to_string())
                    .arg("--rate")
                    .arg(spec.rate.to_string())
                    .args([
                        "--concurrency",
                        "200",
                        "--hold",
                        "0",
                        "--timeout",
                        "5",
                        "--quiet",
                    ])
                    .arg("--accepted-file")
                    .arg(spec.accepted_file)
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .spawn()
                    .expect("spawn activation-sim"),
            ),
            None => Flood::InProcess(in_process_flood(
                spec.addr,
                spec.pk.to_owned(),
                spec.secret.to_owned(),
                spec.prefix.to_owned(),
                spec.start,
                spec.devices,
                spec.accepted_file.to_owned(),
            )),
        }
    }

    /// Waits (bounded) for the flood to end; it ends on its own once the
    /// broker is gone.
    pub fn finish(self) {
        match self {
            Flood::Sim(mut child) => {
                let deadline = Instant::now() + Duration::from_secs(30);
                while matches!(child.try_wait(), Ok(None)) && Instant::now() < deadline {
                    std::thread::sleep(Duration::from_millis(20));
                }
                let _ = child.kill();
                let _ = child.wait();
            }
            Flood::InProcess(h) => {
                let _ = h.join();
            }
        }
    }
}

/// Waits (bounded, 30 s) until `file` records at least one acknowledgement.
pub fn wait_first_ack(file: &Path) -> bool {
    let deadline = Instant::now() + Duration::from_secs(30);
    while accepted(file).is_empty() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    !accepted(file).is_empty()
}

/// The fallback flood: devices `{prefix}{start..start+n}` connect (rumqttc
/// v4, 64 at a time) and each CONNACK 0 is appended to `file`.
fn in_process_flood(
    addr: SocketAddr,
    pk: String,
    secret: String,
    prefix: String,
    start: u64,
    n: u64,
    file: PathBuf,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async move {
            use std::io::Write;
            let log = std::sync::Arc::new(std::sync::Mutex::new(
                std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&file)
                    .expect("accepted file"),
            ));
            let sem = std::sync::Arc::new(tokio::sync::Semaphore::new(64));
            let mut tasks = Vec::new();
            for i in start..start + n {
                let permit = sem.clone().acquire_owned().await.expect("sem");
                let (pk, secret, log) = (pk.clone(), secret.clone(), log.clone());
                let dk = format!("{prefix}{i}");
                tasks.push(tokio::spawn(async move {
                    let _permit = permit;
                    if connack_code(addr, &pk, &dk, &secret).await == Some(0) {
                        let _ = log
                            .lock()
                            .map(|mut f| f.write_all(format!("{dk}\n").as_bytes()));
                    }
                }));
            }
            for t in tasks {
                let _ = t.await;
            }
        });
    })
}

/// Connects device `dk` of product-secret product `pk` (MQTT 3.1.1) and
/// returns its CONNACK code, `None` if none came within 5 s.
pub async fn connack_code(addr: SocketAddr, pk: &str, dk: &str, secret: &str) -> Option<u8> {
    let (u, p) = device_credentials(pk, dk, secret, Clock::system().now());
    let mut o = rumqttc::MqttOptions::new(format!("{pk}.{dk}"), addr.ip().to_string(), addr.port());
    o.set_credentials(u, p);
    let (_c, mut el) = rumqttc::AsyncClient::new(o, 4);
    loop {
        match tokio::time::timeout(Duration::from_secs(5), el.poll()).await {
            Ok(Ok(rumqttc::Event::Incoming(rumqttc::Packet::ConnAck(a)))) => {
                return Some(a.code as u8)
            }
            Ok(Ok(_)) => continue,
            Ok(Err(rumqttc::ConnectionError::ConnectionRefused(code))) => return Some(code as u8),
            _ => return None,
        }
    }
}

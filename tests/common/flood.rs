//! A flood of first activations against a broker child, recording every
//! DeviceKey that got CONNACK 0 in an "accepted file", one per line:
//! `activation-sim flood --accepted-file` when the simulator is built
//! beside the broker binary, otherwise a small rumqttc loop in this process.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command as Process, Stdio};
use std::time::{Duration, Instant};

use activation_broker::clock::Clock;
use activation_broker::credentials::device_credentials;

use super::child::broker_bin;

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

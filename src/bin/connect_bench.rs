//! Connection benchmark (issue 3): connects/s and CONNACK latency p50/p99 of
//! (a) first activations through the gate (durable), (b) reconnects of
//! active devices, (c) rumqttd's stock `Server` listener on the same router
//! configuration with no auth, (d) Mosquitto with a password file and
//! Mosquitto anonymous (if `/usr/sbin/mosquitto` is installed), plus RSS per
//! idle connected device. Every target runs as a child process on loopback,
//! one at a time, and is measured with the same client: `--concurrency`
//! workers on one tokio runtime, each opening a socket, writing a
//! pre-encoded MQTT 3.1.1 CONNECT (`rumqttc::mqttbytes`) and reading the
//! CONNACK; latency is socket open → CONNACK. Prints two markdown tables
//! from one run.
//!
//! ```sh
//! cargo build --release --bins
//! target/release/connect-bench [--devices 10000] [--concurrency 500] [--skip-mosquitto]
//! ```

use std::collections::BTreeMap;
use std::io::Write as _;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use activation_broker::clock::Clock;
use activation_broker::credentials::{client_id, device_credentials, sign};
use activation_broker::ledger::{self, AuthMode, Ledger, LedgerOptions, Outcome};
use anyhow::{anyhow, bail, Context};
use bytes::{Bytes, BytesMut};
use clap::Parser;
use hdrhistogram::Histogram;
use rumqttc::mqttbytes::v4::{Connect, Packet};
use rumqttc::mqttbytes::{self, Protocol};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

#[derive(Parser)]
#[command(
    about = "Benchmark device connections: the activation broker against rumqttd and Mosquitto"
)]
struct Args {
    /// Devices connected in every phase (and held, for RSS).
    #[arg(long, default_value_t = 10_000)]
    devices: usize,
    /// Connections in flight at once (client workers).
    #[arg(long, default_value_t = 500)]
    concurrency: usize,
    /// Worker threads of the client runtime.
    #[arg(long, default_value_t = 1)]
    client_threads: usize,
    /// `[devices] io_threads` of the activation broker (0: its default, one
    /// per CPU).
    #[arg(long, default_value_t = 0)]
    io_threads: usize,
    /// Skip (c).
    #[arg(long)]
    skip_rumqttd: bool,
    /// Skip (d) and Mosquitto anonymous.
    #[arg(long)]
    skip_mosquitto: bool,
    /// The activation-broker binary (default: next to this one).
    #[arg(long)]
    broker_bin: Option<PathBuf>,
    /// The Mosquitto binary.
    #[arg(long, default_value = "/usr/sbin/mosquitto")]
    mosquitto_bin: PathBuf,
    /// Seconds allowed for one connection to get its CONNACK.
    #[arg(long, default_value_t = 30)]
    timeout_secs: u64,
    /// Print where each measured process's RSS is (from /proc/PID/smaps).
    #[arg(long)]
    smaps: bool,
    /// Record each phase with `perf record -g -p SERVER` into `DIR/<phase>.data`.
    #[arg(long, value_name = "DIR")]
    perf: Option<PathBuf>,
    /// Internal: run rumqttd's stock v4 `Server` (no auth) on this address
    /// and nothing else; the bench starts itself with it for target (c).
    #[arg(long, hide = true)]
    serve_stock_rumqttd: Option<SocketAddr>,
}

/// Set by Ctrl-C: phases stop, and every child and temp dir is cleaned up.
static STOP: AtomicBool = AtomicBool::new(false);

const PRODUCT: &str = "bench";
/// Keepalive in every CONNECT: longer than any phase, so idle held
/// connections need no PINGREQ.
const KEEPALIVE_SECS: u16 = 600;

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if let Some(addr) = args.serve_stock_rumqttd {
        return serve_stock_rumqttd(addr);
    }
    if let Err(e) = activation_broker::limits::raise_open_file_limit() {
        eprintln!("warning: cannot raise the open-file limit: {e}");
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.client_threads.max(1))
        .enable_all()
        .build()?;
    rt.spawn(async {
        if tokio::signal::ctrl_c().await.is_ok() {
            STOP.store(true, Ordering::SeqCst);
            eprintln!("interrupted: cleaning up");
        }
    });
    let result = run(&args, &rt);
    // Held sockets are closed before the runtime goes.
    drop(rt);
    result
}

/// A measured connect phase.
struct Phase {
    label: String,
    accepted: u64,
    /// CONNACK return code → count, for refusals.
    refused: BTreeMap<u8, u64>,
    errors: u64,
    first_error: Option<String>,
    /// CONNACK latency of accepted connections, microseconds.
    hist: Histogram<u64>,
    elapsed: Duration,
    /// TcpExt ListenDrops during the phase (SYNs or handshakes dropped
    /// because an accept queue was full; the client retries after 1 s).
    /// Counted for the whole network namespace.
    listen_drops: u64,
    /// CPU seconds (user + system) the server and this client used.
    server_cpu: f64,
    client_cpu: f64,
}

impl Phase {
    fn rate(&self) -> f64 {
        self.accepted as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    fn ms(&self, q: f64) -> f64 {
        self.hist.value_at_quantile(q) as f64 / 1000.0
    }

    fn failures(&self) -> u64 {
        self.errors + self.refused.values().sum::<u64>()
    }
}

struct Rss {
    label: String,
    devices: usize,
    idle_kb: u64,
    loaded_kb: u64,
}

impl Rss {
    fn per_device_kb(&self) -> f64 {
        self.loaded_kb.saturating_sub(self.idle_kb) as f64 / self.devices.max(1) as f64
    }
}

struct Report {
    phases: Vec<Phase>,
    rss: Vec<Rss>,
    notes: Vec<String>,
}

fn run(args: &Args, rt: &tokio::runtime::Runtime) -> anyhow::Result<()> {
    let n = args.devices;
    if n == 0 {
        bail!("--devices must be at least 1");
    }
    let broker_bin = match &args.broker_bin {
        Some(p) => p.clone(),
        None => std::env::current_exe()?.with_file_name("activation-broker"),
    };
    if !broker_bin.is_file() {
        bail!(
            "{} not found: build it first (cargo build --release --bins) or pass --broker-bin",
            broker_bin.display()
        );
    }
    let tmp = TempDir::new("connect-bench")?;
    println!(
        "connect-bench: {n} devices per phase, {} in flight, {} client thread(s), MQTT 3.1.1, loopback; {} CPUs",
        args.concurrency,
        args.client_threads.max(1),
        std::thread::available_parallelism().map_or(0, |p| p.get())
    );
    let mut report = Report {
        phases: Vec::new(),
        rss: Vec::new(),
        notes: Vec::new(),
    };
    let bench = Bench { args, rt };

    // (a) and (b): the activation broker.
    bench.activation_broker(&broker_bin, tmp.path(), &mut report)?;
    check_stop()?;
    // (c): rumqttd's stock listener.
    if args.skip_rumqttd {
        report.notes.push("(c) skipped: --skip-rumqttd".into());
    } else {
        bench.stock_rumqttd(tmp.path(), &mut report)?;
    }
    check_stop()?;
    // (d) and Mosquitto anonymous.
    if args.skip_mosquitto {
        report.notes.push("(d) skipped: --skip-mosquitto".into());
    } else if !args.mosquitto_bin.is_file() {
        report.notes.push(format!(
            "(d) skipped: {} is not installed (apt-get install mosquitto)",
            args.mosquitto_bin.display()
        ));
    } else {
        bench.mosquitto(tmp.path(), &mut report)?;
    }
    print_report(&report);
    Ok(())
}

struct Bench<'a> {
    args: &'a Args,
    rt: &'a tokio::runtime::Runtime,
}

impl Bench<'_> {
    /// [`settle`], and with `--smaps` where the RSS is.
    fn settle(&self, pid: u32) -> anyhow::Result<(u64, usize)> {
        let r = settle(pid)?;
        if self.args.smaps {
            eprintln!("{}", smaps_summary(pid));
        }
        Ok(r)
    }

    /// Connects every packet in `packets` with bounded concurrency; holds
    /// the accepted connections in `held` (closing the previous ones first
    /// with DISCONNECT) so RSS can be read with them idle.
    fn phase(
        &self,
        label: &str,
        server: u32,
        addr: SocketAddr,
        packets: Vec<Bytes>,
        source_net: u8,
        held: &mut Vec<TcpStream>,
    ) -> anyhow::Result<Phase> {
        check_stop()?;
        eprintln!("{label}: {} connections to {addr} ...", packets.len());
        let timeout = Duration::from_secs(self.args.timeout_secs);
        let perf = match &self.args.perf {
            Some(dir) => Some(PerfGuard::start(dir, label, server)?),
            None => None,
        };
        let drops_before = listen_drops();
        let server_before = cpu_secs(server);
        let client_before = cpu_secs(std::process::id());
        let (mut phase, streams) = self.rt.block_on(connect_all(
            label,
            addr,
            Arc::new(packets),
            self.args.concurrency,
            source_net,
            timeout,
        ))?;
        phase.listen_drops = listen_drops().saturating_sub(drops_before);
        phase.server_cpu = cpu_secs(server) - server_before;
        phase.client_cpu = cpu_secs(std::process::id()) - client_before;
        drop(perf);
        eprintln!(
            "{label}: {} accepted in {:.2} s ({:.0}/s), {} failed",
            phase.accepted,
            phase.elapsed.as_secs_f64(),
            phase.rate(),
            phase.failures()
        );
        *held = streams;
        check_stop()?;
        Ok(phase)
    }

    /// Sends DISCONNECT on every held connection, closes it, and waits
    /// until the server has closed its side (its open descriptors are back
    /// to `fds_idle`).
    fn release(&self, held: &mut Vec<TcpStream>, pid: u32, fds_idle: usize) {
        let streams = std::mem::take(held);
        self.rt.block_on(async move {
            for mut s in streams {
                let _ = s.write_all(&[0xE0, 0x00]).await;
            }
        });
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline && !STOP.load(Ordering::Relaxed) {
            match open_fds(pid) {
                Some(f) if f > fds_idle + 2 => std::thread::sleep(Duration::from_millis(50)),
                _ => break,
            }
        }
        // Let the server finish its bookkeeping (session removal).
        std::thread::sleep(Duration::from_millis(500));
    }

    fn activation_broker(&self, bin: &Path, tmp: &Path, report: &mut Report) -> anyhow::Result<()> {
        let n = self.args.devices;
        let dir = tmp.join("activation-broker");
        let data = dir.join("data");
        std::fs::create_dir_all(&data)?;
        // Product and exactly N codes, created in the data dir before the
        // broker opens it (dropping the ledger releases sled's lock).
        let secret = {
            let l = Ledger::open(
                &data.join("ledger"),
                LedgerOptions::default(),
                Clock::system(),
                Default::default(),
            )?;
            let secret = match l.execute_blocking(
                ledger::Command::CreateProduct {
                    product_key: PRODUCT.into(),
                    name: "connect-bench".into(),
                    auth_mode: AuthMode::ProductSecret,
                },
                None,
            )? {
                Outcome::ProductCreated(p) => p.secret,
                other => bail!("unexpected outcome creating the product: {other:?}"),
            };
            l.execute_blocking(
                ledger::Command::CreateOrder {
                    order_id: None,
                    quantity: n as u64,
                    validity_secs: 365 * 24 * 3600,
                    product_key: Some(PRODUCT.into()),
                },
                None,
            )?;
            secret
        };
        let port = free_port()?;
        let accounts_port = free_port()?;
        // The embedded defaults, except: loopback ports, and the gate's rate
        // limits and bans off (every CONNECT comes from 127.x addresses).
        let config = dir.join("broker.toml");
        std::fs::write(
            &config,
            format!(
                r#"data_dir = "{data}"
[devices]
bind = "127.0.0.1:{port}"
io_threads = {io_threads}
[accounts_listener]
bind = "127.0.0.1:{accounts_port}"
[gate]
source_rate = 0.0
device_rate = 0.0
ban_after_failures = 0
"#,
                data = data.display(),
                io_threads = self.args.io_threads,
            ),
        )?;
        let mut cmd = Command::new(bin);
        cmd.arg("serve")
            .arg("--config")
            .arg(&config)
            .arg("--data")
            .arg(&data);
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let mut broker = ChildGuard::spawn("activation-broker", cmd, &dir)?;
        broker.wait_ready(addr)?;
        let pid = broker.pid();
        let (idle_kb, fds_idle) = self.settle(pid)?;

        let mut held = Vec::new();
        let now = Clock::system().now();
        let packets = (0..n)
            .map(|i| signed_connect(&format!("dev-{i}"), &secret, now))
            .collect::<anyhow::Result<Vec<_>>>()?;
        let a = self.phase(
            "(a) first activations, durable",
            pid,
            addr,
            packets,
            10,
            &mut held,
        )?;
        let (loaded_a, _) = self.settle(pid)?;
        report.rss.push(Rss {
            label: "activation broker, after (a)".into(),
            devices: held.len(),
            idle_kb,
            loaded_kb: loaded_a,
        });
        broker.check_alive()?;
        let devices_a = held.len();
        self.release(&mut held, pid, fds_idle);
        // The same devices, activated but disconnected: what stays is the
        // ledger's share (and whatever the allocator keeps).
        let (released_kb, _) = self.settle(pid)?;
        report.rss.push(Rss {
            label: "activation broker, (a) devices disconnected again".into(),
            devices: devices_a,
            idle_kb,
            loaded_kb: released_kb,
        });

        let now = Clock::system().now();
        let packets = (0..n)
            .map(|i| signed_connect(&format!("dev-{i}"), &secret, now))
            .collect::<anyhow::Result<Vec<_>>>()?;
        let b = self.phase(
            "(b) reconnects of active devices",
            pid,
            addr,
            packets,
            11,
            &mut held,
        )?;
        let (loaded_b, _) = self.settle(pid)?;
        report.rss.push(Rss {
            label: "activation broker, after (b)".into(),
            devices: held.len(),
            idle_kb,
            loaded_kb: loaded_b,
        });
        report.rss.push(Rss {
            label: "activation broker, connections only: after (b) − disconnected".into(),
            devices: held.len(),
            idle_kb: released_kb,
            loaded_kb: loaded_b,
        });
        broker.check_alive()?;
        self.release(&mut held, pid, fds_idle);
        broker.interrupt_and_wait()?;

        // Durability: the stopped broker's store holds exactly the
        // activations it acknowledged, and (b) consumed nothing.
        let l = Ledger::open(
            &data.join("ledger"),
            LedgerOptions::default(),
            Clock::system(),
            Default::default(),
        )?;
        let p = l.product(PRODUCT)?;
        l.check_invariants().map_err(anyhow::Error::msg)?;
        drop(l);
        if p.consumed != a.accepted {
            bail!(
                "store has {} consumed codes but (a) saw {} CONNACK 0",
                p.consumed,
                a.accepted
            );
        }
        report.notes.push(format!(
            "(a) consumed {} codes, durable: the store reopened after the broker stopped holds {} consumed, {} available; (b) consumed none.",
            a.accepted,
            p.consumed,
            p.available()
        ));
        report.phases.push(a);
        report.phases.push(b);
        Ok(())
    }

    fn stock_rumqttd(&self, tmp: &Path, report: &mut Report) -> anyhow::Result<()> {
        let n = self.args.devices;
        let dir = tmp.join("rumqttd");
        std::fs::create_dir_all(&dir)?;
        let port = free_port()?;
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let mut cmd = Command::new(std::env::current_exe()?);
        cmd.arg("--serve-stock-rumqttd").arg(addr.to_string());
        let mut child = ChildGuard::spawn("rumqttd-stock", cmd, &dir)?;
        child.wait_ready(addr)?;
        let pid = child.pid();
        let (idle_kb, _) = self.settle(pid)?;
        let packets = (0..n)
            .map(|i| plain_connect(&format!("dev-{i}"), None))
            .collect::<anyhow::Result<Vec<_>>>()?;
        let mut held = Vec::new();
        let c = self.phase(
            "(c) rumqttd stock Server, no auth",
            pid,
            addr,
            packets,
            12,
            &mut held,
        )?;
        let (loaded, _) = self.settle(pid)?;
        report.rss.push(Rss {
            label: "(c) rumqttd stock Server".into(),
            devices: held.len(),
            idle_kb,
            loaded_kb: loaded,
        });
        child.check_alive()?;
        drop(held);
        child.kill();
        report.phases.push(c);
        Ok(())
    }

    fn mosquitto(&self, tmp: &Path, report: &mut Report) -> anyhow::Result<()> {
        let n = self.args.devices;
        let bin = &self.args.mosquitto_bin;
        let version = Command::new(bin)
            .arg("-h")
            .output()
            .ok()
            .and_then(|o| {
                String::from_utf8_lossy(&o.stdout)
                    .lines()
                    .next()
                    .map(|l| l.trim_start_matches("mosquitto version ").to_owned())
            })
            .unwrap_or_default();
        let name = format!("Mosquitto {version}").trim().to_owned();
        // (d): one user per device, hashed by mosquitto_passwd -U
        // (sha512-pbkdf2, its default).
        let dir = tmp.join("mosquitto");
        std::fs::create_dir_all(&dir)?;
        let passwd = dir.join("passwd");
        let password = |dk: &str| sign("mosquitto-bench", dk)[..32].to_owned();
        {
            let mut f = std::io::BufWriter::new(std::fs::File::create(&passwd)?);
            for i in 0..n {
                let dk = format!("dev-{i}");
                writeln!(f, "{dk}:{}", password(&dk))?;
            }
            f.flush()?;
        }
        let passwd_tool = bin
            .parent()
            .and_then(Path::parent)
            .map(|p| p.join("bin/mosquitto_passwd"))
            .filter(|p| p.is_file())
            .unwrap_or_else(|| PathBuf::from("mosquitto_passwd"));
        let st = Command::new(&passwd_tool)
            .arg("-U")
            .arg(&passwd)
            .status()
            .with_context(|| format!("running {}", passwd_tool.display()))?;
        if !st.success() {
            bail!("{} -U failed: {st}", passwd_tool.display());
        }
        let limit = nofile_limit();
        report.notes.push(format!(
            "{name} runs with max_connections -1, persistence false, log_dest none, and RLIMIT_NOFILE {limit} inherited from the bench."
        ));

        let run = |label: &str, anonymous: bool, source_net: u8| -> anyhow::Result<(Phase, Rss)> {
            let port = free_port()?;
            let addr = SocketAddr::from(([127, 0, 0, 1], port));
            let conf = dir.join(if anonymous {
                "anon.conf"
            } else {
                "passwd.conf"
            });
            let auth = if anonymous {
                "allow_anonymous true\n".to_owned()
            } else {
                format!(
                    "allow_anonymous false\npassword_file {}\n",
                    passwd.display()
                )
            };
            std::fs::write(
                &conf,
                format!(
                    "user root\nper_listener_settings false\nlistener {port} 127.0.0.1\n{auth}max_connections -1\npersistence false\nlog_dest none\nset_tcp_nodelay true\n"
                ),
            )?;
            let mut cmd = Command::new(bin);
            cmd.arg("-c").arg(&conf);
            let mut child = ChildGuard::spawn("mosquitto", cmd, &dir)?;
            child.wait_ready(addr)?;
            let pid = child.pid();
            let (idle_kb, _) = self.settle(pid)?;
            let packets = (0..n)
                .map(|i| {
                    let dk = format!("dev-{i}");
                    let login = (!anonymous).then(|| (dk.clone(), password(&dk)));
                    plain_connect(&dk, login)
                })
                .collect::<anyhow::Result<Vec<_>>>()?;
            let mut held = Vec::new();
            let phase = self.phase(label, pid, addr, packets, source_net, &mut held)?;
            let (loaded, _) = self.settle(pid)?;
            let rss = Rss {
                label: label.to_owned(),
                devices: held.len(),
                idle_kb,
                loaded_kb: loaded,
            };
            child.check_alive()?;
            drop(held);
            child.kill();
            Ok((phase, rss))
        };
        let (d, d_rss) = run(&format!("(d) {name}, password file"), false, 13)?;
        check_stop()?;
        let (anon, anon_rss) = run(&format!("{name}, anonymous"), true, 14)?;
        report.phases.push(d);
        report.phases.push(anon);
        report.rss.push(d_rss);
        report.rss.push(anon_rss);
        Ok(())
    }
}

/// The worker pool of one phase.
async fn connect_all(
    label: &str,
    addr: SocketAddr,
    packets: Arc<Vec<Bytes>>,
    concurrency: usize,
    source_net: u8,
    timeout: Duration,
) -> anyhow::Result<(Phase, Vec<TcpStream>)> {
    let next = Arc::new(AtomicUsize::new(0));
    let start = Instant::now();
    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..concurrency.clamp(1, packets.len()) {
        let next = next.clone();
        let packets = packets.clone();
        workers.spawn(async move {
            let mut w = Worker::new()?;
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= packets.len() || STOP.load(Ordering::Relaxed) {
                    break;
                }
                let source = source_ip(source_net, i);
                let t0 = Instant::now();
                match tokio::time::timeout(timeout, connect_one(addr, source, &packets[i])).await {
                    Ok(Ok((stream, 0))) => {
                        let us = t0.elapsed().as_micros().max(1) as u64;
                        w.hist.saturating_record(us);
                        w.accepted += 1;
                        w.held.push(stream);
                    }
                    Ok(Ok((_, code))) => *w.refused.entry(code).or_default() += 1,
                    Ok(Err(e)) => w.error(e.to_string()),
                    Err(_) => w.error(format!("no CONNACK within {} s", timeout.as_secs())),
                }
            }
            anyhow::Ok(w)
        });
    }
    let mut total = Worker::new()?;
    while let Some(w) = workers.join_next().await {
        let w = w??;
        total.hist.add(&w.hist)?;
        total.accepted += w.accepted;
        total.errors += w.errors;
        for (c, k) in w.refused {
            *total.refused.entry(c).or_default() += k;
        }
        if total.first_error.is_none() {
            total.first_error = w.first_error;
        }
        total.held.extend(w.held);
    }
    let elapsed = start.elapsed();
    Ok((
        Phase {
            label: label.to_owned(),
            accepted: total.accepted,
            refused: total.refused,
            errors: total.errors,
            first_error: total.first_error,
            hist: total.hist,
            elapsed,
            listen_drops: 0,
            server_cpu: 0.0,
            client_cpu: 0.0,
        },
        total.held,
    ))
}

struct Worker {
    hist: Histogram<u64>,
    accepted: u64,
    refused: BTreeMap<u8, u64>,
    errors: u64,
    first_error: Option<String>,
    held: Vec<TcpStream>,
}

impl Worker {
    fn new() -> anyhow::Result<Self> {
        Ok(Worker {
            // 1 µs .. 120 s, 3 significant digits.
            hist: Histogram::new_with_bounds(1, 120_000_000, 3)?,
            accepted: 0,
            refused: BTreeMap::new(),
            errors: 0,
            first_error: None,
            held: Vec::new(),
        })
    }

    fn error(&mut self, e: String) {
        self.errors += 1;
        if self.first_error.is_none() {
            self.first_error = Some(e);
        }
    }
}

/// Source address of connection `i` of a phase: 127.`net`.x.y, a new
/// address every 20,000 connections, so no phase runs short of ephemeral
/// ports or meets the TIME_WAIT sockets of an earlier one.
fn source_ip(net: u8, i: usize) -> Ipv4Addr {
    let k = i / 20_000 + 1;
    Ipv4Addr::new(127, net, (k >> 8) as u8, (k & 0xff) as u8)
}

/// One connection: socket → CONNECT → CONNACK. Returns the stream and the
/// CONNACK return code.
async fn connect_one(
    addr: SocketAddr,
    source: Ipv4Addr,
    packet: &[u8],
) -> std::io::Result<(TcpStream, u8)> {
    let socket = TcpSocket::new_v4()?;
    // The port is picked at connect(2) for the full 4-tuple, not at bind.
    socket2::SockRef::from(&socket).set_reuse_address(true)?;
    set_bind_address_no_port(&socket);
    socket.bind(SocketAddr::V4(SocketAddrV4::new(source, 0)))?;
    let mut stream = socket.connect(addr).await?;
    stream.set_nodelay(true)?;
    stream.write_all(packet).await?;
    let mut buf = BytesMut::with_capacity(16);
    loop {
        if stream.read_buf(&mut buf).await? == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "closed before CONNACK",
            ));
        }
        match Packet::read(&mut buf, 1024) {
            Ok(Packet::ConnAck(ack)) => return Ok((stream, ack.code as u8)),
            Ok(other) => {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!("expected CONNACK, got {other:?}"),
                ))
            }
            Err(mqttbytes::Error::InsufficientBytes(_)) => continue,
            Err(e) => {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!("bad CONNACK: {e:?}"),
                ))
            }
        }
    }
}

fn set_bind_address_no_port(socket: &TcpSocket) {
    use std::os::fd::AsRawFd as _;
    let one: libc::c_int = 1;
    // SAFETY: setsockopt reads `one` (a c_int of the given size) on a valid socket.
    unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::IPPROTO_IP,
            libc::IP_BIND_ADDRESS_NO_PORT,
            (&one as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        );
    }
}

/// A device CONNECT with SPEC §3 credentials.
fn signed_connect(dk: &str, secret: &str, now: i64) -> anyhow::Result<Bytes> {
    let (user, pass) = device_credentials(PRODUCT, dk, secret, now);
    plain_connect(dk, Some((user, pass)))
}

/// A clean-session CONNECT with client id `bench.{dk}`.
fn plain_connect(dk: &str, login: Option<(String, String)>) -> anyhow::Result<Bytes> {
    let mut c = Connect::new(client_id(PRODUCT, dk));
    c.protocol = Protocol::V4;
    c.keep_alive = KEEPALIVE_SECS;
    c.clean_session = true;
    if let Some((u, p)) = login {
        c.set_login(u, p);
    }
    let mut buf = BytesMut::new();
    c.write(&mut buf)
        .map_err(|e| anyhow!("encoding CONNECT: {e:?}"))?;
    Ok(buf.freeze())
}

/// A child process killed (and reaped) on drop, with its output in a file.
struct ChildGuard {
    name: &'static str,
    child: Option<Child>,
    log: PathBuf,
}

impl ChildGuard {
    fn spawn(name: &'static str, mut cmd: Command, dir: &Path) -> anyhow::Result<Self> {
        let log = dir.join(format!("{name}.log"));
        let out = std::fs::File::create(&log)?;
        cmd.stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out);
        // SAFETY: prctl is async-signal-safe; the child dies with the bench
        // even if the bench is killed with SIGKILL. Children are spawned from
        // the main thread, which lives as long as the bench.
        unsafe {
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        let child = cmd
            .spawn()
            .with_context(|| format!("starting {name} ({:?})", cmd.get_program()))?;
        Ok(ChildGuard {
            name,
            child: Some(child),
            log,
        })
    }

    fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    fn output(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }

    fn check_alive(&mut self) -> anyhow::Result<()> {
        if let Some(c) = self.child.as_mut() {
            if let Some(st) = c.try_wait()? {
                self.child = None;
                bail!("{} exited ({st}):\n{}", self.name, self.output());
            }
        }
        Ok(())
    }

    /// Waits until `addr` accepts connections.
    fn wait_ready(&mut self, addr: SocketAddr) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            self.check_alive()?;
            check_stop()?;
            if std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "{} did not listen on {addr} within 30 s:\n{}",
                    self.name,
                    self.output()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// SIGINT (graceful shutdown), then SIGKILL after 20 s.
    fn interrupt_and_wait(&mut self) -> anyhow::Result<()> {
        let Some(mut c) = self.child.take() else {
            return Ok(());
        };
        if let Ok(pid) = libc::pid_t::try_from(c.id()) {
            // SAFETY: signals our own child, which we have not reaped yet.
            unsafe {
                libc::kill(pid, libc::SIGINT);
            }
        }
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Some(st) = c.try_wait()? {
                if !st.success() {
                    bail!("{} exited with {st}:\n{}", self.name, self.output());
                }
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = c.kill();
        let _ = c.wait();
        bail!("{} did not stop within 20 s of SIGINT", self.name)
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A temporary directory removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new(prefix: &str) -> anyhow::Result<Self> {
        let p = std::env::temp_dir().join(format!("{prefix}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p)?;
        Ok(TempDir(p))
    }

    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn check_stop() -> anyhow::Result<()> {
    if STOP.load(Ordering::Relaxed) {
        bail!("interrupted");
    }
    Ok(())
}

/// A free loopback port (bound and released; the child binds it next).
fn free_port() -> anyhow::Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(l.local_addr()?.port())
}

/// Waits until the process's RSS is stable (allocators return freed memory
/// gradually), then returns its VmRSS in KB and its open descriptor count.
/// Stable: three readings 1 s apart within 0.5 % of the first; at most 30 s.
fn settle(pid: u32) -> anyhow::Result<(u64, usize)> {
    let read = || rss_kb(pid).ok_or_else(|| anyhow!("cannot read /proc/{pid}/status"));
    let mut window = std::collections::VecDeque::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut last = read()?;
    while Instant::now() < deadline && !STOP.load(Ordering::Relaxed) {
        std::thread::sleep(Duration::from_millis(1000));
        last = read()?;
        window.push_back(last);
        if window.len() > 3 {
            window.pop_front();
        }
        if window.len() == 3 {
            let (lo, hi) = (
                window.iter().copied().min().unwrap_or(0),
                window.iter().copied().max().unwrap_or(0),
            );
            if (hi - lo) * 200 <= hi {
                break;
            }
        }
    }
    let fds = open_fds(pid).unwrap_or(0);
    Ok((last, fds))
}

fn rss_kb(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

/// RSS by mapping kind, and the largest anonymous mappings, of `pid`.
fn smaps_summary(pid: u32) -> String {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps")).unwrap_or_default();
    let mut by_kind: BTreeMap<String, (u64, u64, u64)> = BTreeMap::new();
    let mut anon: Vec<(u64, u64, String)> = Vec::new();
    let (mut name, mut size, mut range) = (String::new(), 0u64, String::new());
    for line in text.lines() {
        let mut f = line.split_whitespace();
        let first = f.next().unwrap_or_default();
        if first.contains('-') && !first.ends_with(':') {
            range = first.to_owned();
            name = f.nth(4).unwrap_or("[anon]").to_owned();
            if name.starts_with('/') {
                name = "file".into();
            }
        } else if first == "Size:" {
            size = f.next().and_then(|v| v.parse().ok()).unwrap_or(0);
        } else if first == "Rss:" {
            let rss: u64 = f.next().and_then(|v| v.parse().ok()).unwrap_or(0);
            let e = by_kind.entry(name.clone()).or_default();
            e.0 += 1;
            e.1 += size;
            e.2 += rss;
            if name == "[anon]" || name == "[heap]" {
                anon.push((rss, size, range.clone()));
            }
        }
    }
    anon.sort_unstable_by(|a, b| b.cmp(a));
    let mut out = format!("smaps of {pid} (mappings, size KB, RSS KB):");
    for (k, (n, sz, rss)) in &by_kind {
        out += &format!("\n  {k}: {n} mappings, {sz} KB, RSS {rss} KB");
    }
    for (rss, sz, r) in anon.iter().take(8) {
        out += &format!("\n  anon {r}: {sz} KB, RSS {rss} KB");
    }
    out
}

/// User + system CPU seconds of process `pid` (0 if unreadable).
fn cpu_secs(pid: u32) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0.0;
    };
    let Some((_, rest)) = stat.rsplit_once(')') else {
        return 0.0;
    };
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    // Fields 14 and 15 of stat(5); `rest` starts at field 3.
    (ticks(11) + ticks(12)) as f64 / hz
}

/// `perf record` attached to a server for one phase; stopped on drop.
struct PerfGuard(Option<Child>);

impl PerfGuard {
    fn start(dir: &Path, label: &str, pid: u32) -> anyhow::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let tag: String = label
            .chars()
            .filter(|c| c.is_ascii_alphanumeric())
            .take(12)
            .collect();
        let child = Command::new("perf")
            .args(["record", "-F", "999", "-g", "-p", &pid.to_string(), "-o"])
            .arg(dir.join(format!("{tag}.data")))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting perf")?;
        std::thread::sleep(Duration::from_millis(500));
        Ok(PerfGuard(Some(child)))
    }
}

impl Drop for PerfGuard {
    fn drop(&mut self) {
        if let Some(mut c) = self.0.take() {
            if let Ok(pid) = libc::pid_t::try_from(c.id()) {
                // SAFETY: signals our own child, not yet reaped.
                unsafe {
                    libc::kill(pid, libc::SIGINT);
                }
            }
            let _ = c.wait();
        }
    }
}

/// TcpExt ListenDrops of this network namespace.
fn listen_drops() -> u64 {
    let text = std::fs::read_to_string("/proc/net/netstat").unwrap_or_default();
    let mut lines = text.lines();
    while let (Some(names), Some(values)) = (lines.next(), lines.next()) {
        if !names.starts_with("TcpExt:") {
            continue;
        }
        for (n, v) in names.split_whitespace().zip(values.split_whitespace()) {
            if n == "ListenDrops" {
                return v.parse().unwrap_or(0);
            }
        }
    }
    0
}

fn open_fds(pid: u32) -> Option<usize> {
    Some(std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?.count())
}

fn nofile_limit() -> u64 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes the struct we pass.
    unsafe {
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim);
    }
    lim.rlim_cur
}

fn print_report(r: &Report) {
    let find = |prefix: &str| r.phases.iter().find(|p| p.label.starts_with(prefix));
    let (a, b, c, d) = (find("(a)"), find("(b)"), find("(c)"), find("(d)"));
    let anon = r.phases.iter().find(|p| p.label.ends_with("anonymous"));
    let ratio = |x: &Phase, y: Option<&Phase>| -> Option<f64> {
        y.filter(|y| y.rate() > 0.0).map(|y| x.rate() / y.rate())
    };
    let fmt = |v: Option<f64>, what: &str| v.map_or(String::new(), |v| format!("{v:.2}x {what}"));
    println!();
    println!("| target | connections | failed | seconds | connects/s | p50 ms | p99 ms | listen drops | server CPU µs/connect | vs (c) | vs Mosquitto |");
    println!("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for p in &r.phases {
        let vs_c = fmt(ratio(p, c), "");
        let vs_m = if p.label.starts_with("(a)") {
            fmt(ratio(p, d), "(d)")
        } else if p.label.starts_with("(b)") {
            fmt(ratio(p, anon), "(anon)")
        } else {
            String::new()
        };
        println!(
            "| {} | {} | {} | {:.2} | {:.0} | {:.2} | {:.2} | {} | {:.0} | {} | {} |",
            p.label,
            p.accepted,
            p.failures(),
            p.elapsed.as_secs_f64(),
            p.rate(),
            p.ms(0.5),
            p.ms(0.99),
            p.listen_drops,
            p.server_cpu * 1e6 / p.accepted.max(1) as f64,
            vs_c.trim(),
            vs_m
        );
    }
    println!();
    println!("| RSS | devices | before MB | with devices MB | KB per device |");
    println!("|---|---:|---:|---:|---:|");
    for s in &r.rss {
        println!(
            "| {} | {} | {:.1} | {:.1} | {:.1} |",
            s.label,
            s.devices,
            s.idle_kb as f64 / 1024.0,
            s.loaded_kb as f64 / 1024.0,
            s.per_device_kb()
        );
    }
    println!();
    let verdict = |ok: bool| if ok { "met" } else { "MISSED" };
    let mut targets = Vec::new();
    if let (Some(a), Some(c)) = (a, c) {
        let x = a.rate() / c.rate().max(1e-9);
        targets.push(format!("(a) ≥ 10x (c): {x:.2}x, {}", verdict(x >= 10.0)));
    }
    if let (Some(a), Some(d)) = (a, d) {
        let x = a.rate() / d.rate().max(1e-9);
        targets.push(format!("(a) ≥ 1.0x (d): {x:.2}x, {}", verdict(x >= 1.0)));
    }
    if let (Some(b), Some(m)) = (b, anon) {
        let x = b.rate() / m.rate().max(1e-9);
        targets.push(format!(
            "(b) ≥ 1.0x Mosquitto anonymous: {x:.2}x, {}",
            verdict(x >= 1.0)
        ));
    }
    if let Some(s) = r.rss.first() {
        let kb = s.per_device_kb();
        let conn = r
            .rss
            .iter()
            .find(|s| s.label.contains("connections only"))
            .map_or(String::new(), |c| {
                format!(" (connections alone: {:.1} KB)", c.per_device_kb())
            });
        targets.push(format!(
            "RSS per idle connected device ≤ 25 KB: {kb:.1} KB with its ledger records{conn}, {}",
            verdict(kb <= 25.0)
        ));
    }
    for t in targets {
        println!("- {t}");
    }
    for p in &r.phases {
        if p.failures() > 0 {
            println!(
                "- {}: {} refused by CONNACK {:?}, {} errors (first: {})",
                p.label,
                p.refused.values().sum::<u64>(),
                p.refused,
                p.errors,
                p.first_error.as_deref().unwrap_or("-")
            );
        }
    }
    for n in &r.notes {
        println!("- {n}");
    }
    let client_cpu: f64 = r.phases.iter().map(|p| p.client_cpu).sum();
    let secs: f64 = r.phases.iter().map(|p| p.elapsed.as_secs_f64()).sum();
    println!("- server CPU µs/connect: user + system CPU of the server process during the phase / accepted connections (the client used {:.0} % of one core on average).", 100.0 * client_cpu / secs.max(1e-9));
    println!("- listen drops: TcpExt ListenDrops during the phase (connections whose SYN or handshake a full accept queue dropped; the client retransmits after 1 s), counted for the whole machine.");
    println!("- RSS per device = (VmRSS with the devices connected and idle − VmRSS before the first connect) / devices, read once stable; for the activation broker this includes the devices' ledger records, and \"connections only\" subtracts the RSS with the same devices activated but disconnected.");
}

/// Target (c): rumqttd's stock v4 `Server` with no auth on the router
/// configuration our gateway uses, in this process.
fn serve_stock_rumqttd(addr: SocketAddr) -> anyhow::Result<()> {
    use std::collections::HashMap;
    let mut v4 = HashMap::new();
    v4.insert(
        "1".to_owned(),
        rumqttd::ServerSettings {
            name: "v4-1".into(),
            listen: addr,
            tls: None,
            // rumqttd's accept loop sleeps this long after every accept.
            next_connection_delay_ms: 0,
            connections: rumqttd::ConnectionSettings {
                connection_timeout_ms: 60_000,
                max_payload_size: 256 * 1024,
                max_inflight_count: 100,
                auth: None,
                external_auth: None,
                dynamic_filters: true,
            },
        },
    );
    let config = rumqttd::Config {
        id: 0,
        router: activation_broker::gateway::router_config(200_000),
        v4: Some(v4),
        ..Default::default()
    };
    rumqttd::Broker::new(config)
        .start()
        .map_err(|e| anyhow!("rumqttd: {e}"))
}

//! Fuzzing on stable Rust: a proptest-driven generational and mutational
//! byte fuzzer (no coverage feedback; nightly `cargo fuzz` is unavailable
//! here) that feeds every input to a real in-process broker over a real
//! socket, or to the admin entry point, and checks for hangs, panics,
//! a broker that stops serving, and stored state that changes.
//!
//! Targets:
//! - `connect`: the first packet. Byte 0 picks raw bytes (the rest is sent
//!   as is) or a structured CONNECT decoded from the rest: protocol name
//!   and level, flags, keep alive, MQTT 5 properties, client id, will,
//!   user name and password (which may be correctly signed for an already
//!   activated device, so replays are deterministic with any secret).
//! - `packets`: after a successful CONNECT of an activated device (byte 0
//!   picks MQTT 3.1.1 or 5), the rest is sent as packets.
//! - `admin`: a JSON request through the admin dispatcher
//!   (`admin::handle`, what serves `admin/v1/{account}/request`) for an
//!   account allowed every action: SPEC §4 actions with arbitrary
//!   parameters, any JSON, deep nesting, raw bytes; every request must be
//!   answered with a `Code` and the ledger's invariants must hold after it.
//!
//! `cargo test --test it fuzz::` replays `fuzz/corpus/<target>/` (the broker
//! keeps serving, the ledger is unchanged / its invariants hold). A full
//! run is `FUZZ_SECS=600 FUZZ_SAVE=1 cargo test --release --test it --
//! --ignored --nocapture fuzz::fuzz_connect` (likewise `fuzz_packets`,
//! `fuzz_admin`); see scripts/reliability.sh. Hangs are written to
//! `fuzz/findings/<target>/`.

mod corpus;
mod generate;
mod panics;

use corpus::*;
use generate::*;
use panics::*;

use crate::common;

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Once};
use std::time::{Duration, Instant};

use activation_broker::admin::{self, Account, AdminContext, Role};
use activation_broker::credentials::sign;
use common::broker::{start_broker, TestBroker, WAIT};
use common::wire::{
    packet, raise_nofile, read_packet, remaining_length, snapshot, still_serving, until_closed,
    RawConnect, Snapshot,
};
use common::T0;
use proptest::prelude::*;
use proptest::strategy::ValueTree;
use proptest::test_runner::{Config as PtConfig, RngAlgorithm, TestRng, TestRunner};
use rand::{Rng, SeedableRng};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

const PK: &str = "fz";
/// A case that neither finishes nor is closed by the broker within this is a hang.
const HANG: Duration = Duration::from_secs(15);

// ------------------------------------------------------------- harness

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Target {
    Connect,
    Packets,
    Admin,
}

impl Target {
    fn name(self) -> &'static str {
        match self {
            Target::Connect => "connect",
            Target::Packets => "packets",
            Target::Admin => "admin",
        }
    }
}

struct Harness {
    t: TestBroker,
    secret: String,
    before: Snapshot,
}

fn good(w: usize) -> String {
    format!("good{w}")
}

/// A broker with rate limits off, product `fz` and `workers` devices
/// already activated (their reconnects consume nothing).
async fn harness(workers: usize) -> Harness {
    install_panic_hook();
    raise_nofile();
    let t = start_broker(|c| {
        c.gate.source_rate = 0.0;
        c.gate.device_rate = 0.0;
        c.gate.ban_after_failures = 0;
        c.devices.connect_timeout_secs = 5;
        c.devices.max_packet_size = 64 * 1024;
    })
    .await;
    let secret = t.product(PK, 1_000, 86_400).await;
    for w in 0..workers.max(1) {
        still_serving(&t, PK, &good(w), &secret).await;
    }
    let before = snapshot(&t.broker.ledger);
    Harness { t, secret, before }
}

impl Harness {
    async fn check(&self, workers: usize) {
        for w in 0..workers.max(1) {
            still_serving(&self.t, PK, &good(w), &self.secret).await;
        }
        assert_eq!(
            snapshot(&self.t.broker.ledger),
            self.before,
            "the ledger changed"
        );
    }
}

/// Reads the fuzz input as a stream of choices; past its end every read is 0.
struct Input<'a> {
    data: &'a [u8],
    pos: usize,
}

impl<'a> Input<'a> {
    fn new(data: &'a [u8]) -> Self {
        Input { data, pos: 0 }
    }
    fn u8(&mut self) -> u8 {
        let b = self.data.get(self.pos).copied().unwrap_or(0);
        self.pos += 1;
        b
    }
    fn u16(&mut self) -> u16 {
        u16::from_be_bytes([self.u8(), self.u8()])
    }
    /// Up to `max` bytes, length from the input.
    fn bytes(&mut self, max: usize) -> Vec<u8> {
        let n = usize::from(self.u8()) % (max + 1);
        let start = self.pos.min(self.data.len());
        let end = (start + n).min(self.data.len());
        self.pos = start + n;
        self.data[start..end].to_vec()
    }
    fn rest(&mut self) -> Vec<u8> {
        let start = self.pos.min(self.data.len());
        self.pos = self.data.len();
        self.data[start..].to_vec()
    }
}

/// The first packet(s) the `connect` target sends for `input`.
fn connect_bytes(h: &Harness, w: usize, input: &[u8]) -> Vec<u8> {
    let mut r = Input::new(input);
    let mode = r.u8();
    if mode.is_multiple_of(4) {
        return r.rest();
    }
    let level = match r.u8() % 8 {
        0..=2 => 4,
        3..=5 => 5,
        6 => 3,
        _ => r.u8(),
    };
    let protocol_name = match r.u8() % 10 {
        0 => b"MQIsdp".to_vec(),
        1 => r.bytes(8),
        _ => b"MQTT".to_vec(),
    };
    let flags = match r.u8() % 3 {
        0 => r.u8(),
        _ => 0b1100_0010 | (r.u8() & 0b0011_1100),
    };
    let keep_alive = r.u16();
    let properties = match r.u8() % 4 {
        0 => r.bytes(48),
        1 => {
            // Known property ids with values from the input.
            let mut p = Vec::new();
            for _ in 0..(r.u8() % 4) {
                let id =
                    [0x11, 0x21, 0x22, 0x27, 0x17, 0x19, 0x15, 0x16, 0x26][usize::from(r.u8() % 9)];
                p.push(id);
                match id {
                    0x11 | 0x27 => p.extend_from_slice(&[r.u8(), r.u8(), r.u8(), r.u8()]),
                    0x21 | 0x22 => p.extend_from_slice(&[r.u8(), r.u8()]),
                    0x17 | 0x19 => p.push(r.u8()),
                    0x26 => {
                        let k = r.bytes(8);
                        let v = r.bytes(8);
                        p.extend_from_slice(&(k.len() as u16).to_be_bytes());
                        p.extend_from_slice(&k);
                        p.extend_from_slice(&(v.len() as u16).to_be_bytes());
                        p.extend_from_slice(&v);
                    }
                    _ => {
                        let v = r.bytes(16);
                        p.extend_from_slice(&(v.len() as u16).to_be_bytes());
                        p.extend_from_slice(&v);
                    }
                }
            }
            p
        }
        _ => Vec::new(),
    };
    let dk = good(w);
    let client_id = match r.u8() % 6 {
        0 => r.bytes(40),
        1 => Vec::new(),
        2 => format!("{PK}.other").into_bytes(),
        _ => format!("{PK}.{dk}").into_bytes(),
    };
    let will = match r.u8() % 5 {
        0 => Some((r.bytes(40), r.bytes(16))),
        1 => Some((format!("devices/{PK}/{dk}/will").into_bytes(), r.bytes(8))),
        _ => None,
    };
    let user = match r.u8() % 6 {
        0 => Some(r.bytes(64)),
        1 => None,
        2 => {
            let skew = i64::from(r.u16() as i16) * 1000;
            Some(format!("{PK}&{dk}&{}", T0 + skew).into_bytes())
        }
        3 => Some(format!("{PK}&{}&{T0}", String::from_utf8_lossy(&r.bytes(16))).into_bytes()),
        _ => Some(format!("{PK}&{dk}&{T0}").into_bytes()),
    };
    // Only the activated device's user names are signed with the real
    // secret: a correctly signed new DeviceKey would be a legitimate
    // self-registration and consume a code.
    let own = user.as_deref().is_some_and(|u| {
        std::str::from_utf8(u).is_ok_and(|u| u.starts_with(&format!("{PK}&{dk}&")))
    });
    let key = if own {
        h.secret.as_str()
    } else {
        "not-the-secret"
    };
    let pass = match r.u8() % 5 {
        0 => Some(r.bytes(70)),
        1 => None,
        2 => {
            let mut p = sign(
                key,
                &String::from_utf8_lossy(user.as_deref().unwrap_or(b"")),
            );
            p.push('0');
            Some(p.into_bytes())
        }
        _ => Some(
            sign(
                key,
                &String::from_utf8_lossy(user.as_deref().unwrap_or(b"")),
            )
            .into_bytes(),
        ),
    };
    let c = RawConnect {
        protocol_name,
        level,
        flags,
        keep_alive,
        properties,
        client_id,
        will,
        user,
        pass,
    };
    let mut bytes = c.encode();
    // Trailing bytes after the CONNECT (a second packet, garbage).
    bytes.extend(r.rest());
    bytes
}

/// What a case produced: the kind of answer, to keep one input per kind.
type Signature = String;

fn signature(target: &str, reply: &[u8], closed: bool) -> Signature {
    let head: Vec<String> = reply.iter().take(4).map(|b| format!("{b:02x}")).collect();
    let kinds: Vec<u8> = {
        // Packet types in the reply, in order, up to 8.
        let mut v = Vec::new();
        let mut i = 0;
        while i < reply.len() && v.len() < 8 {
            v.push(reply[i] >> 4);
            let mut len = 0usize;
            let mut k = i + 1;
            let mut shift = 0;
            while k < reply.len() && k <= i + 4 {
                len |= usize::from(reply[k] & 0x7F) << shift;
                shift += 7;
                k += 1;
                if reply[k - 1] & 0x80 == 0 {
                    break;
                }
            }
            i = k + len;
        }
        v
    };
    format!("{target}:{}:{kinds:?}:{closed}", head.join(""))
}

async fn run_connect(h: &Harness, w: usize, input: &[u8]) -> Result<Signature, String> {
    let bytes = connect_bytes(h, w, input);
    let mut s = TcpStream::connect(h.t.addr())
        .await
        .map_err(|e| format!("tcp connect: {e}"))?;
    let _ = s.write_all(&bytes).await;
    let _ = s.shutdown().await;
    let (reply, closed) = until_closed(&mut s, HANG).await;
    if !closed {
        return Err(format!("hang: not closed within {HANG:?}"));
    }
    Ok(signature("connect", &reply, closed))
}

async fn run_packets(h: &Harness, w: usize, input: &[u8]) -> Result<Signature, String> {
    let level = if input.first().copied().unwrap_or(0) % 2 == 0 {
        4
    } else {
        5
    };
    let dk = good(w);
    let user = format!("{PK}&{dk}&{T0}");
    let pass = sign(&h.secret, &user);
    let c = RawConnect::new(level, &format!("{PK}.{dk}"), &user, &pass).encode();
    let mut s = TcpStream::connect(h.t.addr())
        .await
        .map_err(|e| format!("tcp connect: {e}"))?;
    s.write_all(&c).await.map_err(|e| format!("send: {e}"))?;
    match read_packet(&mut s, HANG).await {
        Some(ack) if ack.first() == Some(&0x20) && ack.get(3) == Some(&0) => {}
        other => return Err(format!("the good device was not admitted: {other:?}")),
    }
    let _ = s.write_all(input.get(1..).unwrap_or(&[])).await;
    let _ = s.shutdown().await;
    let (reply, closed) = until_closed(&mut s, HANG).await;
    if !closed {
        return Err(format!("hang: not closed within {HANG:?}"));
    }
    Ok(signature(&format!("packets-v{level}"), &reply, closed))
}

/// The admin target: one request through the admin dispatcher.
async fn run_admin(h: &Harness, input: &[u8]) -> Result<Signature, String> {
    // The real admin entry point: the dispatcher that serves
    // `admin/v1/{account}/request`, for an account allowed every action.
    let ctx = AdminContext::new(h.t.broker.ledger.clone(), 30);
    let account = Account::new("fuzz", Role::Admin);
    let response = tokio::time::timeout(HANG, admin::handle(&ctx, &account, input))
        .await
        .map_err(|_| format!("hang: request not answered within {HANG:?}"))?;
    let code = response
        .get("Code")
        .and_then(|c| c.as_str())
        .ok_or_else(|| format!("response without a Code: {response}"))?
        .to_owned();
    let action = serde_json::from_slice::<serde_json::Value>(input)
        .ok()
        .and_then(|v| v.get("Action").and_then(|a| a.as_str()).map(str::to_owned))
        .unwrap_or_default();
    h.t.broker
        .ledger
        .check_invariants()
        .map_err(|e| format!("invariant broken after {action}: {e}"))?;
    Ok(format!("admin:{action}:{code}"))
}

async fn run_case(
    target: Target,
    h: &Harness,
    w: usize,
    input: &[u8],
) -> Result<Signature, String> {
    match target {
        Target::Connect => run_connect(h, w, input).await,
        Target::Packets => run_packets(h, w, input).await,
        Target::Admin => run_admin(h, input).await,
    }
}

// ------------------------------------------------------------- runs

struct Shared {
    corpus: Mutex<Vec<Vec<u8>>>,
    seen: Mutex<HashSet<Signature>>,
    cases: AtomicU64,
    saved: AtomicU64,
    failures: Mutex<Vec<String>>,
}

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Runs `target` for FUZZ_SECS (default 30) with FUZZ_WORKERS (default 2)
/// concurrent clients; FUZZ_SAVE=1 keeps one input per new kind of answer
/// in the corpus (at most FUZZ_CORPUS_MAX, default 150, files).
fn fuzz(target: Target) {
    let secs = env_u64("FUZZ_SECS", 30);
    let workers = env_u64("FUZZ_WORKERS", 2) as usize;
    let seed = env_u64("FUZZ_SEED", rand::random());
    let save = std::env::var("FUZZ_SAVE").is_ok_and(|v| v == "1");
    let corpus_max = env_u64("FUZZ_CORPUS_MAX", 150);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let started = Instant::now();
    let (cases, saved, failures, corpus_files, kinds) = rt.block_on(async {
        let h = Arc::new(harness(workers).await);
        let existing = load_corpus(target);
        let shared = Arc::new(Shared {
            corpus: Mutex::new(existing.iter().map(|(_, b)| b.clone()).collect()),
            seen: Mutex::new(HashSet::new()),
            cases: AtomicU64::new(0),
            saved: AtomicU64::new(0),
            failures: Mutex::new(Vec::new()),
        });
        let existing_files = existing.len() as u64;
        // Learn the answers the corpus already covers.
        for (_, input) in &existing {
            if let Ok(sig) = run_case(target, &h, 0, input).await {
                shared.seen.lock().expect("seen").insert(sig);
            }
        }
        let deadline = Instant::now() + Duration::from_secs(secs);
        let mut tasks = Vec::new();
        let handle = tokio::runtime::Handle::current();
        for w in 0..workers.max(1) {
            let h = h.clone();
            let shared = shared.clone();
            let handle = handle.clone();
            // proptest's strategies are not Send: each worker generates on
            // its own thread and runs its cases on the broker's runtime.
            tasks.push(
                std::thread::Builder::new()
                    .name(format!("worker-{w}"))
                    .spawn(move || {
                        let mut runner = TestRunner::new_with_rng(
                            PtConfig::default(),
                            TestRng::from_seed(RngAlgorithm::ChaCha, &{
                                let mut s = [0u8; 32];
                                s[..8].copy_from_slice(&seed.to_le_bytes());
                                s[8] = w as u8;
                                s
                            }),
                        );
                        let mut rng = rand::rngs::StdRng::seed_from_u64(seed ^ (w as u64) << 32);
                        let strategy = match target {
                            Target::Connect => connect_input(),
                            Target::Packets => packets_input(),
                            Target::Admin => admin_input(),
                        };
                        let mut n = 0u64;
                        let mut recent: Vec<Vec<u8>> = Vec::new();
                        let mut panics_seen = 0;
                        while Instant::now() < deadline {
                            // A panic somewhere in the broker (its router thread included):
                            // keep the inputs that led to it.
                            let panics = all_panics().len();
                            if panics > panics_seen {
                                panics_seen = panics;
                                let dir = findings_dir(target).join(format!("panic-{n}-w{w}"));
                                let _ = std::fs::create_dir_all(&dir);
                                for (i, r) in recent.iter().enumerate() {
                                    let _ = std::fs::write(dir.join(format!("{i:02}")), r);
                                }
                            }
                            let corpus = shared.corpus.lock().expect("corpus").clone();
                            let input = if !corpus.is_empty() && rng.gen_bool(0.5) {
                                let base = &corpus[rng.gen_range(0..corpus.len())];
                                mutate(&mut rng, &corpus, base)
                            } else {
                                match strategy.new_tree(&mut runner) {
                                    Ok(t) => t.current(),
                                    Err(_) => continue,
                                }
                            };
                            n += 1;
                            shared.cases.fetch_add(1, Ordering::Relaxed);
                            recent.push(input.clone());
                            if recent.len() > 32 {
                                recent.remove(0);
                            }
                            match handle.block_on(run_case(target, &h, w, &input)) {
                                Ok(sig) => {
                                    let new = shared.seen.lock().expect("seen").insert(sig);
                                    if new {
                                        let mut c = shared.corpus.lock().expect("corpus");
                                        c.push(input.clone());
                                        if save
                                            && existing_files + shared.saved.load(Ordering::Relaxed)
                                                < corpus_max
                                        {
                                            let dir = corpus_dir(target);
                                            let _ = std::fs::create_dir_all(&dir);
                                            let _ =
                                                std::fs::write(dir.join(file_name(&input)), &input);
                                            shared.saved.fetch_add(1, Ordering::Relaxed);
                                        }
                                    }
                                }
                                Err(why) => {
                                    let dir = findings_dir(target);
                                    let _ = std::fs::create_dir_all(&dir);
                                    let name = file_name(&input);
                                    let _ = std::fs::write(dir.join(&name), &input);
                                    shared
                                        .failures
                                        .lock()
                                        .expect("failures")
                                        .push(format!("{name}: {why}"));
                                }
                            }
                            if n.is_multiple_of(500) && target != Target::Admin {
                                handle.block_on(still_serving(&h.t, PK, &good(w), &h.secret));
                            }
                        }
                    })
                    .expect("worker thread"),
            );
        }
        let joined =
            tokio::task::spawn_blocking(move || tasks.into_iter().all(|t| t.join().is_ok()))
                .await
                .expect("join");
        assert!(joined, "a worker panicked; panics: {:#?}", all_panics());
        if target != Target::Admin {
            h.check(workers).await;
        } else {
            h.t.broker.ledger.check_invariants().expect("invariants");
        }
        let failures = shared.failures.lock().expect("failures").clone();
        let kinds = shared.seen.lock().expect("seen").len();
        (
            shared.cases.load(Ordering::Relaxed),
            shared.saved.load(Ordering::Relaxed),
            failures,
            existing_files + shared.saved.load(Ordering::Relaxed),
            kinds,
        )
    });
    let elapsed = started.elapsed().as_secs_f64();
    let panics = unexpected_panics();
    let caught = all_panics().len() - panics.len();
    let report = serde_json::json!({
        "target": target.name(),
        "seconds": (elapsed * 10.0).round() / 10.0,
        "cases": cases,
        "workers": workers,
        "seed": seed,
        "failures": failures.len(),
        "unexpected_panics": panics.len(),
        "caught_decoder_panics": caught,
        "answer_kinds": kinds,
        "corpus_files": corpus_files,
        "saved": saved,
        "profile": if cfg!(debug_assertions) { "debug" } else { "release" },
    });
    eprintln!("{report}");
    if let Ok(out) = std::env::var("FUZZ_REPORT") {
        let _ = std::fs::write(out, report.to_string());
    }
    assert!(
        failures.is_empty(),
        "findings (inputs in fuzz/findings): {failures:#?}"
    );
    assert!(panics.is_empty(), "panics: {panics:#?}");
}

#[test]
#[ignore = "long: FUZZ_SECS=600 cargo test --release --test it -- --ignored fuzz::fuzz_connect"]
fn fuzz_connect() {
    fuzz(Target::Connect);
}

#[test]
#[ignore = "long: FUZZ_SECS=600 cargo test --release --test it -- --ignored fuzz::fuzz_packets"]
fn fuzz_packets() {
    fuzz(Target::Packets);
}

#[test]
#[ignore = "long: FUZZ_SECS=600 cargo test --release --test it -- --ignored fuzz::fuzz_admin"]
fn fuzz_admin() {
    fuzz(Target::Admin);
}

/// Every corpus file of every target, replayed: no hang, no panic, the
/// broker keeps serving and (device targets) the ledger is unchanged.
#[test]
fn corpus_replays_cleanly() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        for target in [Target::Connect, Target::Packets, Target::Admin] {
            let h = harness(1).await;
            let corpus = load_corpus(target);
            for (path, input) in &corpus {
                if let Err(why) = run_case(target, &h, 0, input).await {
                    panic!("{}: {why}", path.display());
                }
            }
            if target == Target::Admin {
                h.t.broker.ledger.check_invariants().expect("invariants");
                // Admin inputs may legitimately delete the fuzz product (a
                // DeleteProduct of it is in the corpus): the broker must still
                // serve a device of a product created afterwards.
                let secret = h.t.product("fzcheck", 10, 3600).await;
                still_serving(&h.t, "fzcheck", &good(0), &secret).await;
            } else {
                h.check(1).await;
            }
            eprintln!("{}: {} corpus files replayed", target.name(), corpus.len());
        }
    });
    let panics = unexpected_panics();
    assert!(panics.is_empty(), "panics: {panics:#?}");
    let _ = WAIT;
}

/// Replays the files of FUZZ_REPLAY_DIR in name order against one broker
/// (FUZZ_TARGET picks the target, default `packets`), then checks that it
/// still serves: for bisecting a finding.
#[test]
#[ignore = "FUZZ_REPLAY_DIR=fuzz/findings/packets/panic-... cargo test --test it -- --ignored fuzz::fuzz_replay_dir"]
fn fuzz_replay_dir() {
    let Ok(dir) = std::env::var("FUZZ_REPLAY_DIR") else {
        return;
    };
    let target = match std::env::var("FUZZ_TARGET").as_deref() {
        Ok("connect") => Target::Connect,
        Ok("admin") => Target::Admin,
        _ => Target::Packets,
    };
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .expect("dir")
        .flatten()
        .map(|e| e.path())
        .collect();
    files.sort();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let h = harness(1).await;
        for f in &files {
            let input = std::fs::read(f).expect("read");
            let r = run_case(target, &h, 0, &input).await;
            eprintln!("{}: {r:?}", f.display());
        }
        h.check(1).await;
    });
    let panics = all_panics();
    assert!(panics.is_empty(), "panics: {panics:#?}");
}

//! Crash test: a child process performs activations and reports each one
//! the ledger acknowledged; it is killed with SIGKILL at a random moment,
//! the store is reopened, and every acknowledged activation must be there,
//! with the invariants holding. `LEDGER_CRASH_CYCLES` sets the number of
//! cycles (default 8; the full run uses 25).

use std::collections::HashSet;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command as Process, Stdio};
use std::time::{Duration, Instant};

use activation_broker::clock::Clock;
use activation_broker::ledger::{AuthMode, Command, Ledger, LedgerOptions, Refusal};
use rand::Rng;

const CHILD_DIR: &str = "LEDGER_CRASH_CHILD_DIR";
const CODES: u64 = 1_000_000;

fn open(dir: &Path) -> Ledger {
    Ledger::open(
        dir,
        LedgerOptions::default(),
        Clock::system(),
        Default::default(),
    )
    .expect("open")
}

/// The child: activates new devices from 64 concurrent requesters and
/// prints `ACK <DeviceKey>` once each activation is acknowledged.
#[test]
#[ignore = "run by crash_kill9_keeps_every_acknowledged_activation as a child process"]
fn crash_child_process() {
    let Ok(dir) = std::env::var(CHILD_DIR) else {
        return;
    };
    let ledger = open(Path::new(&dir));
    if ledger.product("crash").is_err() {
        ledger
            .execute_blocking(
                Command::CreateProduct {
                    product_key: "crash".into(),
                    name: "Crash".into(),
                    auth_mode: AuthMode::ProductSecret,
                },
                Some("setup-product".into()),
            )
            .expect("product");
        ledger
            .execute_blocking(
                Command::CreateOrder {
                    order_id: Some("crash-order".into()),
                    quantity: CODES,
                    validity_secs: 86_400,
                    product_key: Some("crash".into()),
                },
                Some("setup-order".into()),
            )
            .expect("order");
    }
    let run_id: u64 = rand::thread_rng().gen();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("rt");
    println!("READY");
    rt.block_on(async move {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<String>();
        for w in 0..64u64 {
            let l = ledger.clone();
            let tx = tx.clone();
            tokio::spawn(async move {
                for n in 0.. {
                    let dk = format!("r{run_id:x}-w{w}-{n}");
                    match l.connect("crash", &dk).await {
                        Ok(a) if a.consumed.is_some() => {
                            if tx.send(dk).is_err() {
                                return;
                            }
                        }
                        Ok(_) => {}
                        Err(Refusal::NoCodeAvailable(_)) => return,
                        Err(e) => panic!("{e}"),
                    }
                }
            });
        }
        drop(tx);
        use std::io::Write;
        let mut out = std::io::stdout().lock();
        while let Some(dk) = rx.recv().await {
            let _ = writeln!(out, "ACK {dk}");
            let _ = out.flush();
        }
    });
}

/// The next newline-terminated line; a line cut short by the kill is not
/// an acknowledgement and is dropped.
fn complete_line(r: &mut impl BufRead) -> Option<String> {
    let mut line = String::new();
    match r.read_line(&mut line) {
        Ok(n) if n > 0 && line.ends_with('\n') => {
            line.pop();
            Some(line)
        }
        _ => None,
    }
}

#[test]
fn crash_kill9_keeps_every_acknowledged_activation() {
    let cycles: usize = std::env::var("LEDGER_CRASH_CYCLES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(8);
    let dir = tempfile::tempdir().expect("tempdir");
    let exe = std::env::current_exe().expect("test binary");
    let mut acked: HashSet<String> = HashSet::new();
    let mut rng = rand::thread_rng();
    for cycle in 0..cycles {
        let mut child = Process::new(&exe)
            .args([
                "--exact",
                "ledger_crash::crash_child_process",
                "--include-ignored",
                "--nocapture",
                "--test-threads",
                "1",
            ])
            .env(CHILD_DIR, dir.path())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn child");
        let stdout = child.stdout.take().expect("stdout");
        let mut reader = BufReader::new(stdout);
        // Wait until the child is running, then kill it after a random
        // number of acknowledgements or a random time, whichever first.
        let kill_after = rng.gen_range(1..3000usize);
        let deadline = Instant::now() + Duration::from_millis(rng.gen_range(50..1500));
        let mut seen = 0usize;
        let mut ready = false;
        while let Some(line) = complete_line(&mut reader) {
            // libtest prints its own header before the child's first line.
            if line.ends_with("READY") {
                ready = true;
                continue;
            }
            if let Some(dk) = line.strip_prefix("ACK ") {
                acked.insert(dk.to_owned());
                seen += 1;
            }
            if ready && (seen >= kill_after || Instant::now() > deadline) {
                break;
            }
        }
        assert!(ready, "cycle {cycle}: child never became ready");
        child.kill().expect("SIGKILL");
        // Lines already written by the child before it died were
        // acknowledged too.
        while let Some(line) = complete_line(&mut reader) {
            if let Some(dk) = line.strip_prefix("ACK ") {
                acked.insert(dk.to_owned());
            }
        }
        child.wait().expect("reap");
        let ledger = open(dir.path());
        ledger
            .check_invariants()
            .unwrap_or_else(|e| panic!("cycle {cycle}: {e}"));
        let c = ledger.counters();
        for dk in &acked {
            let d = ledger
                .device("crash", dk)
                .unwrap_or_else(|e| panic!("cycle {cycle}: acknowledged {dk} lost: {e}"));
            assert_eq!(d.codes.len(), 1, "{dk} holds exactly one code");
        }
        assert!(c.consumed >= acked.len() as u64);
        assert_eq!(c.total, CODES);
        eprintln!(
            "cycle {cycle}: {} acknowledged so far, {} consumed",
            acked.len(),
            c.consumed
        );
    }
    assert!(!acked.is_empty());
}

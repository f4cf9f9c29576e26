//! The store on disk: a failed flush stops every write (fail-stop) and is
//! published; a store whose files cannot be read is an error naming the
//! path, never a new, empty store; the data directory and every file in it
//! are readable by their owner only.

use crate::common;
use crate::common::ApiCode;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Command as Process, Stdio};
use std::time::{Duration, Instant};

use activation_broker::clock::Clock;
use activation_broker::ledger::{
    Command, Ledger, LedgerError, LedgerOptions, Refusal, SyncFault, DIR_MODE, FILE_MODE,
};
use common::child::{broker_bin, open_offline, prepare_store, write_config, ChildBroker};
use common::{open_ledger_with, T0};

fn reopen(dir: &Path) -> Result<Ledger, LedgerError> {
    let (clock, _) = Clock::manual(T0);
    Ledger::open(dir, LedgerOptions::default(), clock, Default::default())
}

#[test]
fn a_failed_flush_stops_every_write_and_is_published() {
    let fault = SyncFault::default();
    let t = open_ledger_with(LedgerOptions {
        sync_fault: Some(fault.clone()),
        ..LedgerOptions::default()
    });
    t.stocked("p", 10, 3600);
    t.ledger.connect_blocking("p", "d1").expect("d1 admitted");
    assert_eq!(t.ledger.failure(), None);

    // The disk fails under the batch that consumes d2's code.
    fault.set(true);
    let r = t.ledger.connect_blocking("p", "d2");
    assert!(
        matches!(&r, Err(Refusal::StoreUnavailable(m)) if m.contains("injected fault")),
        "{r:?}"
    );
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let failure = rt
        .block_on(async { tokio::time::timeout(Duration::from_secs(10), t.ledger.failed()).await })
        .expect("the failure is published");
    assert_eq!(failure.code(), "ServiceUnavailable");
    assert_eq!(t.ledger.failure(), Some(failure));

    // Fail-stop: the disk "recovers", yet nothing is written any more, as
    // nothing says what it holds.
    fault.set(false);
    let r = t.ledger.connect_blocking("p", "d3");
    assert!(
        matches!(&r, Err(Refusal::StoreUnavailable(m)) if m.contains("no more writes")),
        "{r:?}"
    );
    let r = t.ledger.execute_blocking(
        Command::AssignCodes {
            product_key: "p".into(),
            quantity: 1,
            validity_secs: None,
        },
        None,
    );
    assert!(matches!(r, Err(LedgerError::Unavailable(_))), "{r:?}");
    // A device holding a valid, durable code still connects (no write).
    let a = t.ledger.connect_blocking("p", "d1").expect("d1 reconnects");
    assert!(a.consumed.is_none());

    // A restart reads what the disk holds.
    let common::TestLedger { ledger, dir, .. } = t;
    drop(ledger);
    let l = reopen(dir.path()).expect("reopen");
    l.check_invariants().expect("invariants");
    assert_eq!(l.device("p", "d1").expect("d1").codes.len(), 1);
    assert!(matches!(
        l.device("p", "d3"),
        Err(LedgerError::DeviceNotFound(..))
    ));
    let c = l.counters();
    // d2's batch reached sled's log before the sync step failed; whether
    // it survives is up to the disk. d2 was refused either way.
    assert!((1..=2).contains(&c.consumed), "{c:?}");
    assert_eq!(c.total, 10);
}

#[test]
fn a_store_whose_settings_file_was_lost_is_refused_naming_the_path() {
    let t = open_ledger_with(LedgerOptions::default());
    t.stocked("p", 10, 3600);
    t.ledger.connect_blocking("p", "d1").expect("d1");
    let common::TestLedger { ledger, dir, .. } = t;
    drop(ledger);
    let conf = dir.path().join("conf");
    let db = dir.path().join("db");
    let db_len = std::fs::metadata(&db).expect("db").len();
    // What a power failure left of an unsynced settings file.
    std::fs::write(&conf, b"").expect("truncate conf");
    let e = reopen(dir.path()).err().expect("refused").to_string();
    assert!(e.contains(&conf.display().to_string()), "{e}");
    assert!(e.contains("empty or cut short"), "{e}");
    assert!(e.contains("restore it from a backup"), "{e}");
    // Refusing wrote nothing.
    assert_eq!(std::fs::metadata(&db).expect("db").len(), db_len);
    assert_eq!(std::fs::metadata(&conf).expect("conf").len(), 0);

    std::fs::remove_file(&conf).expect("rm conf");
    let e = reopen(dir.path()).err().expect("refused").to_string();
    assert!(e.contains("is missing"), "{e}");
}

#[test]
fn the_broker_will_not_start_on_a_store_it_cannot_read() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    prepare_store(&data, "p", 10, 3600);
    let conf = data.join("ledger").join("conf");
    std::fs::write(&conf, b"").expect("truncate conf");
    let config = write_config(dir.path(), 10);
    let mut child = Process::new(broker_bin())
        .arg("serve")
        .arg("--config")
        .arg(&config)
        .arg("--data")
        .arg(&data)
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn the broker");
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(s) = child.try_wait().expect("wait") {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("the broker started on a store it cannot read");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut stderr = String::new();
    use std::io::Read;
    child
        .stderr
        .take()
        .expect("stderr")
        .read_to_string(&mut stderr)
        .expect("read stderr");
    assert!(!status.success(), "{status}");
    assert!(stderr.contains(&conf.display().to_string()), "{stderr}");
    assert_eq!(std::fs::metadata(&conf).expect("conf").len(), 0);
}

/// Every directory and file under `dir`, with its mode.
fn modes(dir: &Path, out: &mut Vec<(String, bool, u32)>) {
    for e in std::fs::read_dir(dir).expect("read_dir") {
        let e = e.expect("entry");
        let meta = e.metadata().expect("metadata");
        let mode = meta.permissions().mode() & 0o777;
        out.push((e.path().display().to_string(), meta.is_dir(), mode));
        if meta.is_dir() {
            modes(&e.path(), out);
        }
    }
}

#[test]
fn the_data_directory_and_every_file_in_it_are_private() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    // An operator-made directory open to everyone is narrowed.
    std::fs::create_dir(&data).expect("data dir");
    std::fs::set_permissions(&data, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let secret = prepare_store(&data, "p", 100, 3600);
    let config = write_config(dir.path(), 10);
    let broker = ChildBroker::start(&broker_bin(), &config, &data, None);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    for i in 0..20 {
        let code = rt.block_on(common::flood::connack_code(
            broker.addr,
            "p",
            &format!("d{i}"),
            &secret,
        ));
        assert_eq!(code, Some(0), "d{i}");
    }
    broker.stop(Duration::from_secs(30));
    assert!(
        data.join("accounts.toml").is_file(),
        "the generated accounts file"
    );
    let mut all = vec![(data.display().to_string(), true, 0)];
    all[0].2 = std::fs::metadata(&data).expect("data").permissions().mode() & 0o777;
    modes(&data, &mut all);
    assert!(all.len() >= 5, "{all:?}");
    let open: Vec<_> = all
        .iter()
        .filter(|(_, is_dir, mode)| *mode != if *is_dir { DIR_MODE } else { FILE_MODE })
        .collect();
    assert!(open.is_empty(), "readable by others: {open:?}");
    println!(
        "RELIABILITY: {} entries under the data directory after a broker run: directories {:o}, files {:o}",
        all.len(),
        DIR_MODE,
        FILE_MODE
    );
    drop(open_offline(&data));
}

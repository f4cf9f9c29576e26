//! Backup and restore of the ledger, and the store's format version,
//! black-box against the broker binary: `admin BackupLedger`
//! while devices activate, `activation-broker restore` into a fresh
//! directory and over a live or a stopped store, `activation-broker backup`
//! of a stopped store, damaged backups refused, a store of an unknown
//! format version refused at start.

use crate::common;

use std::path::{Path, PathBuf};
use std::process::{Command as Process, Stdio};
use std::time::Duration;

use common::child::{broker_bin, prepare_store, ChildBroker};
use common::flood::connack_code;
use serde_json::Value;

const STOP: Duration = Duration::from_secs(30);
const PASSWORD: &str = "ops-pw";

/// Runs `activation-broker ARGS…`; its success, stdout and stderr.
fn cli(args: &[&str]) -> (bool, String, String) {
    let (status, out, err) = common::child::cli(args);
    (status.success(), out, err)
}

/// A config with an admin account `ops` (every listener on a free port,
/// read back with `ChildBroker::listener`) and rate limits off.
fn config(dir: &Path) -> PathBuf {
    let (ok, hash, err) = cli(&["hash-password", "--password", PASSWORD]);
    assert!(ok, "hash-password: {err}");
    let path = dir.join("broker.toml");
    std::fs::write(
        &path,
        format!(
            "[devices]\nbind = \"127.0.0.1:0\"\n\
             [accounts_listener]\nbind = \"127.0.0.1:0\"\n\
             [http]\nbind = \"127.0.0.1:0\"\n\
             [gate]\nsource_rate = 0.0\ndevice_rate = 0.0\nban_after_failures = 0\n\
             [[accounts]]\nname = \"ops\"\npassword_hash = \"{}\"\nrole = \"admin\"\n",
            hash.trim()
        ),
    )
    .expect("write config");
    path
}

/// The child broker's accounts (admin) listener port.
fn accounts_port(broker: &ChildBroker) -> u16 {
    broker.listener("accounts").port()
}

/// `admin ACTION…` as `ops`; the JSON response (the action must succeed).
fn admin(port: u16, action: &[&str]) -> Value {
    let port = port.to_string();
    let mut args = vec![
        "admin",
        "--port",
        &port,
        "--account",
        "ops",
        "--password",
        PASSWORD,
    ];
    args.extend_from_slice(action);
    let (ok, out, err) = cli(&args);
    assert!(ok, "admin {action:?}: {out}{err}");
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("admin {action:?}: {e}: {out}"))
}

/// Activates devices `first..last` of product `p` at once; each must get
/// CONNACK 0.
fn activate(
    rt: &tokio::runtime::Runtime,
    broker: &ChildBroker,
    secret: &str,
    first: u32,
    last: u32,
) {
    let addr = broker.addr;
    rt.block_on(async {
        let tasks: Vec<_> = (first..last)
            .map(|i| {
                let secret = secret.to_owned();
                tokio::spawn(async move {
                    (i, connack_code(addr, "p", &format!("d{i}"), &secret).await)
                })
            })
            .collect();
        for t in tasks {
            let (i, code) = t.await.expect("task");
            assert_eq!(code, Some(0), "device d{i}");
        }
    });
}

/// The devices product `p` holds and the codes consumed, as the broker says.
fn devices_and_consumed(port: u16) -> (Vec<String>, u64) {
    let devices = admin(
        port,
        &["DescribeDevices", "--ProductKey", "p", "--PageSize", "100"],
    );
    let mut keys: Vec<String> = devices["Items"]
        .as_array()
        .unwrap_or_else(|| panic!("Items: {devices}"))
        .iter()
        .map(|d| d["DeviceKey"].as_str().unwrap_or_default().to_owned())
        .collect();
    keys.sort();
    let summary = admin(port, &["DescribeActivationSummary"]);
    let consumed = summary["Consumed"]
        .as_u64()
        .unwrap_or_else(|| panic!("Consumed: {summary}"));
    (keys, consumed)
}

fn names(range: std::ops::Range<u32>) -> Vec<String> {
    let mut v: Vec<String> = range.map(|i| format!("d{i}")).collect();
    v.sort();
    v
}

fn stop(mut broker: ChildBroker) {
    let status = broker.signal(libc::SIGTERM, STOP);
    assert!(
        status.is_some_and(|s| s.success()),
        "stop: {status:?}\n{}",
        broker.log_tail()
    );
}

/// Devices activate, `admin BackupLedger` takes a snapshot while the broker
/// runs, more devices activate; a restore over the running broker's store
/// is refused (with `--force` too), damaged backups are refused without
/// touching anything, a restore into a fresh directory gives a broker with
/// exactly the snapshot's devices and codes, and a forced restore over the
/// stopped original moves its store aside. `activation-broker backup` of a
/// stopped store is refused while a broker runs on it and gives the same
/// records.
#[test]
fn backup_while_running_and_restore() {
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    let secret = prepare_store(&data, "p", 100, 3600);
    let config = config(dir.path());
    let broker = ChildBroker::start(&broker_bin(), &config, &data, None);
    let acc = accounts_port(&broker);

    activate(&rt, &broker, &secret, 0, 20);
    let backup = admin(acc, &["BackupLedger", "--FileName", "snap.backup"]);
    let path = PathBuf::from(
        backup["Path"]
            .as_str()
            .unwrap_or_else(|| panic!("{backup}")),
    );
    assert_eq!(path, data.join("backups/snap.backup"), "{backup}");
    assert_eq!(backup["FormatVersion"], 1, "{backup}");
    assert_eq!(
        backup["Bytes"].as_u64(),
        Some(std::fs::metadata(&path).expect("backup file").len()),
        "{backup}"
    );
    let again = Process::new(broker_bin())
        .args([
            "admin",
            "--port",
            &acc.to_string(),
            "--account",
            "ops",
            "--password",
            PASSWORD,
        ])
        .args(["BackupLedger", "--FileName", "snap.backup"])
        .output()
        .expect("admin");
    let again = String::from_utf8_lossy(&again.stdout);
    assert!(
        again.contains("Conflict"),
        "an existing file is kept: {again}"
    );
    activate(&rt, &broker, &secret, 20, 30);
    let (live_devices, live_consumed) = devices_and_consumed(acc);
    assert_eq!(live_devices, names(0..30));
    assert_eq!(live_consumed, 30);

    // Over the running broker's store: refused, forced or not.
    let p = path.to_str().expect("utf-8 path");
    let d = data.to_str().expect("utf-8 path");
    for force in [false, true] {
        let mut args = vec!["restore", "--from", p, "--data-dir", d];
        if force {
            args.push("--force");
        }
        let (ok, out, err) = cli(&args);
        assert!(!ok, "restore over a live store: {out}{err}");
        assert!(
            err.contains("is in use by a running broker"),
            "force {force}: {err}"
        );
    }
    let offline = dir.path().join("offline.backup");
    let offline = offline.to_str().expect("utf-8 path");
    let (ok, _, err) = cli(&["backup", "--data-dir", d, "--out", offline]);
    assert!(
        !ok && err.contains("is in use by a running broker"),
        "{err}"
    );

    // Damaged backups: refused before anything is created.
    let bytes = std::fs::read(&path).expect("read backup");
    let fresh = dir.path().join("fresh");
    let f = fresh.to_str().expect("utf-8 path");
    for (what, damaged, expect) in [
        (
            "truncated",
            bytes[..bytes.len() / 2].to_vec(),
            "checksum does not match",
        ),
        (
            "flipped",
            {
                let mut b = bytes.clone();
                let at = b.len() / 2;
                b[at] ^= 0x40;
                b
            },
            "checksum does not match",
        ),
        (
            "foreign",
            b"not a backup at all".to_vec(),
            "not an activation-broker ledger backup",
        ),
    ] {
        let bad = dir.path().join(what);
        std::fs::write(&bad, damaged).expect("write");
        let (ok, out, err) = cli(&[
            "restore",
            "--from",
            bad.to_str().expect("utf-8"),
            "--data-dir",
            f,
        ]);
        assert!(!ok, "{what}: {out}");
        assert!(err.contains(expect), "{what}: {err}");
        assert!(!fresh.exists(), "{what}: nothing is created");
    }

    stop(broker);

    // Into a fresh directory: exactly the snapshot.
    let (ok, out, err) = cli(&["restore", "--from", p, "--data-dir", f]);
    assert!(ok, "restore: {out}{err}");
    assert!(out.contains("restored"), "{out}");
    let restored = ChildBroker::start(&broker_bin(), &config, &fresh, None);
    let acc = accounts_port(&restored);
    let (devices, consumed) = devices_and_consumed(acc);
    assert_eq!(devices, names(0..20), "the snapshot's devices");
    assert_eq!(consumed, 20, "the snapshot's codes");
    // A device of the snapshot reconnects on its code; one after it is new.
    activate(&rt, &restored, &secret, 0, 1);
    assert_eq!(
        devices_and_consumed(acc).1,
        20,
        "a reconnect consumes nothing"
    );
    stop(restored);

    // Over the stopped original: refused without --force, then moved aside.
    let (ok, _, err) = cli(&["restore", "--from", p, "--data-dir", d]);
    assert!(
        !ok && err.contains("already holds a store") && err.contains("--force"),
        "{err}"
    );
    let (ok, out, err) = cli(&["restore", "--from", p, "--data-dir", d, "--force"]);
    assert!(ok, "forced restore: {out}{err}");
    assert!(out.contains("moved to"), "{out}");
    let aside = std::fs::read_dir(&data)
        .expect("ls")
        .filter_map(|e| e.ok())
        .find(|e| {
            e.file_name()
                .to_string_lossy()
                .starts_with("ledger.replaced-")
        })
        .expect("the replaced store is kept");
    assert!(aside.path().join("db").is_file());

    // `backup` of a stopped store: the same records as the snapshot.
    let (ok, out_text, err) = cli(&["backup", "--data-dir", d, "--out", offline]);
    assert!(ok, "backup: {out_text}{err}");
    assert!(
        out_text.contains(&format!("backed up {} records", backup["Records"])),
        "{out_text} vs {backup}"
    );
    let broker = ChildBroker::start(&broker_bin(), &config, &data, None);
    let (devices, consumed) = devices_and_consumed(accounts_port(&broker));
    assert_eq!((devices, consumed), (names(0..20), 20));
    stop(broker);
}

/// Opens the store with sled once the ledger just dropped in this process
/// has let go of it: sled's background I/O threads hold the store's file
/// lock for a moment after the last handle is dropped.
fn open_released(store: &Path) -> sled::Db {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        match sled::open(store) {
            Ok(db) => return db,
            Err(sled::Error::Io(e))
                if e.to_string().contains("could not acquire lock")
                    && std::time::Instant::now() < deadline =>
            {
                std::thread::sleep(std::time::Duration::from_millis(10))
            }
            Err(e) => panic!("open the store {}: {e}", store.display()),
        }
    }
}

/// A store whose recorded format version is newer than this broker reads
/// is refused at start, naming both; a store without one (made before
/// versions were recorded) is version 1 and gets it written.
#[test]
fn an_unknown_store_format_version_is_refused_at_start() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    prepare_store(&data, "p", 1, 3600);
    let store = data.join("ledger");
    {
        let db = open_released(&store);
        let meta = db.open_tree("meta").expect("meta");
        assert_eq!(
            meta.get("format_version").expect("get").as_deref(),
            Some(&1u32.to_be_bytes()[..]),
            "a new store records its version"
        );
        meta.insert("format_version", &99u32.to_be_bytes())
            .expect("insert");
        db.flush().expect("flush");
    }
    let config = dir.path().join("c.toml");
    std::fs::write(
        &config,
        "[devices]\nbind = \"127.0.0.1:0\"\n[accounts_listener]\nbind = \"127.0.0.1:0\"\n\
         [http]\nbind = \"127.0.0.1:0\"\n",
    )
    .expect("config");
    let out = Process::new(broker_bin())
        .args(["serve", "--config"])
        .arg(&config)
        .arg("--data")
        .arg(&data)
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .output()
        .expect("serve");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "started on a version 99 store: {err}"
    );
    let expect = format!(
        "the store in {} has format version 99, and activation-broker {} reads format versions 1 to 1",
        store.display(),
        env!("CARGO_PKG_VERSION")
    );
    assert!(err.contains(&expect), "{err}");

    // A store from before versions were recorded opens and gets version 1.
    {
        let db = open_released(&store);
        db.drop_tree("meta").expect("drop meta");
        db.flush().expect("flush");
    }
    let ledger = common::child::open_offline(&data);
    assert!(ledger.product("p").is_ok());
    drop(ledger);
    let db = open_released(&store);
    let v = db
        .open_tree("meta")
        .expect("meta")
        .get("format_version")
        .expect("get");
    assert_eq!(v.as_deref(), Some(&1u32.to_be_bytes()[..]));
}

/// Backups taken while devices activate concurrently are each one instant
/// of the ledger: every one restores (the restore loads it and checks the
/// counters' invariants), holds as many devices as consumed codes, and the
/// consumptions they hold never go backwards; the one taken after the
/// flood holds all of it.
#[test]
fn backups_under_concurrent_activations_are_consistent() {
    const TASKS: u32 = 8;
    const PER_TASK: u32 = 200;
    let t = common::open_ledger();
    t.stocked("p", u64::from(TASKS * PER_TASK), 3600);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let dir = tempfile::tempdir().expect("tempdir");
    let paths: Vec<PathBuf> = (0..6).map(|i| dir.path().join(format!("b{i}"))).collect();
    rt.block_on(async {
        let flood: Vec<_> = (0..TASKS)
            .map(|task| {
                let ledger = t.ledger.clone();
                tokio::spawn(async move {
                    for i in 0..PER_TASK {
                        let dk = format!("d{task}-{i}");
                        ledger.connect("p", &dk).await.expect("admitted");
                    }
                })
            })
            .collect();
        for path in &paths[..5] {
            t.ledger.backup(path).await.expect("backup");
        }
        for f in flood {
            f.await.expect("flood task");
        }
        t.ledger.backup(&paths[5]).await.expect("backup");
    });
    let mut last = 0;
    for (i, path) in paths.iter().enumerate() {
        let data = dir.path().join(format!("restored{i}"));
        let store = data.join("ledger");
        activation_broker::ledger::restore(path, &store, false)
            .unwrap_or_else(|e| panic!("backup {i}: {e}"));
        let ledger = common::child::open_offline(&data);
        ledger
            .check_invariants()
            .unwrap_or_else(|e| panic!("backup {i}: {e}"));
        let consumed = ledger.counters().consumed;
        let filter = activation_broker::ledger::DeviceFilter {
            product_key: "p".into(),
            device_key_prefix: None,
        };
        let page = activation_broker::ledger::PageRequest::new(1, 1).expect("page");
        let devices = ledger
            .devices(&filter, page)
            .unwrap_or_else(|e| panic!("backup {i}: {e}"))
            .total;
        assert_eq!(consumed, devices, "backup {i}");
        assert!(consumed >= last, "backup {i}: {consumed} after {last}");
        last = consumed;
    }
    assert_eq!(
        last,
        u64::from(TASKS * PER_TASK),
        "the last backup holds the whole flood"
    );
}

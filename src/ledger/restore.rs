//! Restoring a backup into a store directory, and backing up a stopped
//! store (`activation-broker restore` / `backup`).
//!
//! A restore checks the backup whole before touching anything, refuses a
//! store a running broker holds (sled's lock on its `db` file), refuses any
//! other existing store unless forced (it is then moved aside, never
//! deleted), builds the new store next to its place, loads it as the broker
//! would (every record decodes, the code counts add up), makes it durable
//! and private, and only then renames it into place.

use std::fs::{self, File};
use std::io;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use super::backup::{self, io_error, BackupError, BackupInfo, Snapshot};
use super::durable::{self, StoreFiles};
use super::state::State;
use super::{store, version};
use crate::clock::Millis;

/// sled's log, which sled holds an exclusive `flock` on while the store is open.
const DB: &str = "db";

/// What a restore did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Restored {
    pub records: u64,
    pub format_version: u32,
    pub taken_at: Millis,
    /// Where the store that was replaced went (`--force`).
    pub moved_aside: Option<PathBuf>,
}

/// The lock sled takes on an open store, held by us meanwhile.
struct StoreLock(#[allow(dead_code)] File);

/// Takes sled's lock on the store in `dir` (none if it has no log); a store
/// a running broker holds is refused.
fn lock(dir: &Path) -> Result<Option<StoreLock>, BackupError> {
    let db = dir.join(DB);
    let file = match File::open(&db) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io_error("opening", &db, e)),
    };
    // SAFETY: flock on a descriptor this function owns.
    let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if rc != 0 {
        let e = io::Error::last_os_error();
        if e.kind() == io::ErrorKind::WouldBlock {
            return Err(BackupError(format!(
                "the store in {} is in use by a running broker (its lock on {} is held); \
                 stop that broker first (a running broker is backed up with the admin \
                 action BackupLedger)",
                dir.display(),
                db.display()
            )));
        }
        return Err(io_error("locking", &db, e));
    }
    Ok(Some(StoreLock(file)))
}

/// Restores the backup in `from` as the store in `dir` (see the module docs).
pub fn restore(from: &Path, dir: &Path, force: bool) -> Result<Restored, BackupError> {
    let snap = backup::read(from)?;
    let exists = durable::holds_store(dir).map_err(|e| io_error("reading", dir, e))?;
    let _lock = if exists { lock(dir)? } else { None };
    if exists && !force {
        return Err(BackupError(format!(
            "{} already holds a store; restoring would replace it. Pass --force to move it \
             aside (it is kept, renamed) and restore the backup in its place",
            dir.display()
        )));
    }
    let staging = sibling(dir, "restoring")?;
    match fs::remove_dir_all(&staging) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => {
            return Err(io_error("removing the leftover", &staging, e))
        }
        _ => {}
    }
    build(&snap, &staging)?;
    let parent = parent_of(dir);
    let moved_aside = if exists {
        let stamp = chrono::Utc::now().format("%Y%m%dT%H%M%SZ");
        let aside = sibling(dir, &format!("replaced-{stamp}"))?;
        fs::rename(dir, &aside).map_err(|e| io_error("moving aside", dir, e))?;
        Some(aside)
    } else {
        // An empty directory (or one holding only sled's empty blobs/).
        match fs::remove_dir_all(dir) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => {
                return Err(io_error("removing the empty", dir, e))
            }
            _ => None,
        }
    };
    fs::rename(&staging, dir).map_err(|e| io_error("renaming the restored store to", dir, e))?;
    File::open(&parent)
        .and_then(|d| d.sync_all())
        .map_err(|e| io_error("syncing the directory", &parent, e))?;
    Ok(Restored {
        records: snap.records.len() as u64,
        format_version: snap.format_version,
        taken_at: snap.taken_at,
        moved_aside,
    })
}

/// Writes the snapshot's records as a new store in `dir`, checks that it
/// loads, and makes it durable and private.
fn build(snap: &Snapshot, dir: &Path) -> Result<(), BackupError> {
    durable::create_private_dir(dir).map_err(|e| io_error("creating", dir, e))?;
    {
        let db = sled::Config::new()
            .path(dir)
            .flush_every_ms(None)
            .open()
            .map_err(|e| BackupError(format!("creating a store in {}: {e}", dir.display())))?;
        version::record(&db, snap.format_version)?;
        let tree = db.open_tree(store::TREE)?;
        let mut batch = sled::Batch::default();
        for (k, v) in &snap.records {
            batch.insert(k.clone(), v.clone());
        }
        tree.apply_batch(batch)?;
        db.flush()?;
        let state = State::from_records(store::tree_records(&tree)).map_err(|e| {
            BackupError(format!("the backup's records do not load as a ledger: {e}"))
        })?;
        state.check_invariants().map_err(|e| {
            BackupError(format!(
                "the backup's records break the ledger's invariants: {e}"
            ))
        })?;
    }
    StoreFiles::open(dir, None)?;
    Ok(())
}

/// Backs up the stopped store in `dir` to `out`.
pub fn backup_stopped(dir: &Path, out: &Path) -> Result<BackupInfo, BackupError> {
    if !durable::holds_store(dir).map_err(|e| io_error("reading", dir, e))? {
        return Err(BackupError(format!(
            "there is no store in {}",
            dir.display()
        )));
    }
    durable::check_existing(dir)?;
    // Refused while a broker runs; released before sled takes it.
    drop(lock(dir)?);
    let db = sled::Config::new()
        .path(dir)
        .flush_every_ms(None)
        .open()
        .map_err(|e| BackupError(format!("opening the store in {}: {e}", dir.display())))?;
    let format_version = version::recorded(&db)?.unwrap_or(1);
    version::check(format_version, dir)?;
    let tree = db.open_tree(store::TREE)?;
    let snap = Snapshot::of(&tree, format_version, crate::clock::Clock::system().now())?;
    backup::write(out, &snap)
}

fn parent_of(dir: &Path) -> PathBuf {
    match dir.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_owned(),
        _ => PathBuf::from("."),
    }
}

/// `dir` with `.suffix` appended to its name, in the same parent.
fn sibling(dir: &Path, suffix: &str) -> Result<PathBuf, BackupError> {
    let name = dir
        .file_name()
        .ok_or_else(|| BackupError(format!("{} is not a directory name", dir.display())))?;
    Ok(parent_of(dir).join(format!("{}.{suffix}", name.to_string_lossy())))
}

//! The store's files on disk: durable and private.
//!
//! sled 0.34.7 makes a flush "durable" with `sync_file_range`
//! (`pagecache/iobuf.rs`), which writes no file metadata and is no
//! durability barrier; it never fsyncs its `conf` file, its blob files
//! (`blobs/<lsn>`) or a directory after creating or renaming an entry in it
//! (`snap.<lsn>` is renamed into place). And when `conf` is missing or
//! empty it logs "empty/corrupt configuration file found" and starts a
//! new, empty store over whatever else is there.
//!
//! So, around sled:
//! - before opening, a directory holding store files that cannot be read
//!   as a sled store is an error naming the path ([`check_existing`]);
//! - after opening, every file is fdatasynced and every directory of the
//!   store (and the one holding it) fsynced ([`StoreFiles::open`]);
//! - after every flush of the writer's group commit, `db` is fdatasynced,
//!   and if sled created, renamed or removed a file since the last batch
//!   (a snapshot, a blob), the new files are fdatasynced and their
//!   directory fsynced ([`StoreFiles::sync`]): one round of syncs per batch,
//!   shared by every request in it;
//! - the directories are 0700 and the files 0600: the store holds
//!   ProductSecrets and DeviceSecrets.

use std::collections::BTreeSet;
use std::fs::{self, File, Permissions};
use std::io::{self, Read};
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;

use super::LedgerError;

/// Mode of every directory the broker keeps data in.
pub const DIR_MODE: u32 = 0o700;
/// Mode of every file the broker keeps data in.
pub const FILE_MODE: u32 = 0o600;

/// sled's files: its settings, its log, its blob directory, its snapshots.
const CONF: &str = "conf";
const DB: &str = "db";
const BLOBS: &str = "blobs";
/// sled's settings file: the settings, then a little-endian crc32 of them;
/// sled treats 8 bytes or fewer as "empty/corrupt".
const CONF_MIN_LEN: u64 = 9;

/// Creates `path` (and missing parents) readable by its owner only, or
/// narrows an existing directory to that.
pub fn create_private_dir(path: &Path) -> io::Result<()> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(DIR_MODE)
        .create(path)?;
    private(path, DIR_MODE)
}

fn private(path: &Path, mode: u32) -> io::Result<()> {
    let meta = fs::symlink_metadata(path)?;
    if meta.permissions().mode() & 0o777 != mode {
        fs::set_permissions(path, Permissions::from_mode(mode))?;
    }
    Ok(())
}

fn io_error(what: &str, path: &Path, e: io::Error) -> LedgerError {
    LedgerError::Unavailable(format!("{what} {}: {e}", path.display()))
}

/// Refuses a store directory whose files sled could not read as a store
/// (it would silently start a new, empty one): anything in it besides an
/// empty `blobs/` needs a readable `conf` whose checksum holds, and `db`.
pub fn check_existing(dir: &Path) -> Result<(), LedgerError> {
    let entries = match fs::read_dir(dir) {
        Ok(d) => d,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(io_error("reading the store directory", dir, e)),
    };
    let mut names = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| io_error("reading the store directory", dir, e))?;
        names.push(entry.file_name());
    }
    if is_fresh(dir, &names) {
        return Ok(());
    }
    let refuse = |why: String| {
        LedgerError::Unavailable(format!(
            "{why}; the store in {} cannot be read, and starting a new, empty store over it \
             would lose every record: restore it from a backup, or move it away to start anew",
            dir.display()
        ))
    };
    let conf = dir.join(CONF);
    let mut bytes = Vec::new();
    match File::open(&conf).and_then(|mut f| f.read_to_end(&mut bytes)) {
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Err(refuse(format!("{} is missing", conf.display())))
        }
        Err(e) => return Err(refuse(format!("{} cannot be read: {e}", conf.display()))),
    }
    if (bytes.len() as u64) < CONF_MIN_LEN {
        return Err(refuse(format!(
            "{} is empty or cut short ({} bytes)",
            conf.display(),
            bytes.len()
        )));
    }
    let (body, crc) = bytes.split_at(bytes.len() - 4);
    let expected = u32::from_le_bytes([crc[0], crc[1], crc[2], crc[3]]);
    if crc32fast::hash(body) != expected {
        return Err(refuse(format!(
            "{} is corrupt (checksum mismatch)",
            conf.display()
        )));
    }
    let db = dir.join(DB);
    if !db.is_file() {
        return Err(refuse(format!("{} is missing", db.display())));
    }
    Ok(())
}

/// Whether the directory with these entries holds no store: nothing, or
/// only sled's empty `blobs/`.
fn is_fresh(dir: &Path, names: &[std::ffi::OsString]) -> bool {
    let blobs_empty = fs::read_dir(dir.join(BLOBS))
        .map(|mut d| d.next().is_none())
        .unwrap_or(true);
    names.iter().all(|n| n == BLOBS) && blobs_empty
}

/// Whether `dir` holds a store (readable or not): anything besides an empty
/// `blobs/`. A missing directory holds none.
pub fn holds_store(dir: &Path) -> io::Result<bool> {
    let names = match fs::read_dir(dir) {
        Ok(d) => d
            .map(|e| e.map(|e| e.file_name()))
            .collect::<io::Result<Vec<_>>>()?,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(e),
    };
    Ok(!is_fresh(dir, &names))
}

/// A switch that makes the next durability steps fail as a failing disk
/// would: the writer's fault-injection point (tests, drills).
#[derive(Debug, Clone, Default)]
pub struct SyncFault(Arc<AtomicBool>);

impl SyncFault {
    pub fn set(&self, failing: bool) {
        self.0.store(failing, Ordering::SeqCst);
    }

    fn check(&self) -> io::Result<()> {
        if self.0.load(Ordering::SeqCst) {
            return Err(io::Error::other("injected fault: fdatasync failed"));
        }
        Ok(())
    }
}

/// The store directory's entries: a file or directory name relative to it.
type Listing = BTreeSet<PathBuf>;

/// The store's files, kept durable and private (see the module docs).
pub struct StoreFiles {
    dir: PathBuf,
    /// Our own descriptor of sled's log: fdatasync reaches the file
    /// whichever descriptor wrote it.
    db: File,
    /// The entries already synced and made private.
    known: Mutex<Listing>,
    fault: Option<SyncFault>,
}

impl StoreFiles {
    /// After sled opened the store in `dir`: makes every file private and
    /// durable, and every directory entry down to `dir` itself.
    pub fn open(dir: &Path, fault: Option<SyncFault>) -> Result<StoreFiles, LedgerError> {
        let db_path = dir.join(DB);
        let db = File::open(&db_path).map_err(|e| io_error("opening", &db_path, e))?;
        let files = StoreFiles {
            dir: dir.to_owned(),
            db,
            known: Mutex::new(Listing::new()),
            fault,
        };
        private(dir, DIR_MODE).map_err(|e| io_error("restricting", dir, e))?;
        let listing = files.list()?;
        for entry in &listing {
            files.secure_new(entry)?;
        }
        sync_dir(&dir.join(BLOBS))?;
        sync_dir(dir)?;
        if let Some(parent) = dir.parent().filter(|p| !p.as_os_str().is_empty()) {
            sync_dir(parent)?;
        }
        *files.known.lock() = listing;
        Ok(files)
    }

    /// After sled's flush: makes everything it wrote durable. Called by
    /// the writer once per batch, before any waiter of the batch is answered.
    pub fn sync(&self) -> Result<(), LedgerError> {
        if let Some(f) = &self.fault {
            f.check().map_err(|e| io_error("syncing", &self.dir, e))?;
        }
        self.db
            .sync_data()
            .map_err(|e| io_error("syncing", &self.dir.join(DB), e))?;
        let listing = self.list()?;
        let mut known = self.known.lock();
        if *known == listing {
            return Ok(());
        }
        for entry in listing.difference(&known) {
            self.secure_new(entry)?;
        }
        let blobs = Path::new(BLOBS);
        let changed: BTreeSet<&Path> = listing
            .symmetric_difference(&known)
            .map(|e| e.parent().unwrap_or(Path::new("")))
            .collect();
        if changed.iter().any(|p| *p == blobs) {
            sync_dir(&self.dir.join(BLOBS))?;
        }
        sync_dir(&self.dir)?;
        *known = listing;
        Ok(())
    }

    /// Every entry of the store directory and of `blobs/`.
    fn list(&self) -> Result<Listing, LedgerError> {
        let mut out = Listing::new();
        for (sub, path) in [
            (PathBuf::new(), self.dir.clone()),
            (PathBuf::from(BLOBS), self.dir.join(BLOBS)),
        ] {
            let entries = match fs::read_dir(&path) {
                Ok(d) => d,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(io_error("listing", &path, e)),
            };
            for entry in entries {
                let entry = entry.map_err(|e| io_error("listing", &path, e))?;
                out.insert(sub.join(entry.file_name()));
            }
        }
        Ok(out)
    }

    /// Makes a new entry private and, for a file, its contents durable. An
    /// entry sled removed meanwhile (a snapshot being generated) is skipped.
    fn secure_new(&self, entry: &Path) -> Result<(), LedgerError> {
        let path = self.dir.join(entry);
        let meta = match fs::symlink_metadata(&path) {
            Ok(m) => m,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(io_error("inspecting", &path, e)),
        };
        let mode = if meta.is_dir() { DIR_MODE } else { FILE_MODE };
        match private(&path, mode) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            r => r.map_err(|e| io_error("restricting", &path, e))?,
        }
        if meta.is_file() {
            match File::open(&path).and_then(|f| f.sync_data()) {
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                r => r.map_err(|e| io_error("syncing", &path, e))?,
            }
        }
        Ok(())
    }
}

/// fsync of a directory: its entries (created, renamed, removed) are durable.
fn sync_dir(path: &Path) -> Result<(), LedgerError> {
    match File::open(path).and_then(|d| d.sync_all()) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        r => r.map_err(|e| io_error("syncing the directory", path, e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_empty_or_missing_directory_is_a_new_store() {
        let d = tempfile::tempdir().expect("tempdir");
        assert_eq!(check_existing(&d.path().join("none")), Ok(()));
        assert_eq!(check_existing(d.path()), Ok(()));
        fs::create_dir(d.path().join(BLOBS)).expect("blobs");
        assert_eq!(check_existing(d.path()), Ok(()));
    }

    #[test]
    fn store_files_without_a_readable_conf_are_refused_naming_the_path() {
        let d = tempfile::tempdir().expect("tempdir");
        fs::write(d.path().join(DB), b"log").expect("db");
        let e = check_existing(d.path()).expect_err("no conf").to_string();
        assert!(
            e.contains(&d.path().join(CONF).display().to_string()),
            "{e}"
        );
        assert!(e.contains("is missing"), "{e}");
        fs::write(d.path().join(CONF), b"").expect("conf");
        let e = check_existing(d.path())
            .expect_err("empty conf")
            .to_string();
        assert!(e.contains("empty or cut short (0 bytes)"), "{e}");
        fs::write(d.path().join(CONF), b"0123456789abcdef").expect("conf");
        let e = check_existing(d.path()).expect_err("bad crc").to_string();
        assert!(e.contains("checksum mismatch"), "{e}");
        let body = b"settings";
        let mut good = body.to_vec();
        good.extend_from_slice(&crc32fast::hash(body).to_le_bytes());
        fs::write(d.path().join(CONF), &good).expect("conf");
        assert_eq!(check_existing(d.path()), Ok(()));
        fs::remove_file(d.path().join(DB)).expect("rm db");
        fs::write(d.path().join("snap.0000000000000000"), b"s").expect("snap");
        let e = check_existing(d.path()).expect_err("no db").to_string();
        assert!(e.contains(&d.path().join(DB).display().to_string()), "{e}");
    }

    #[test]
    fn private_dirs_are_0700() {
        let d = tempfile::tempdir().expect("tempdir");
        let p = d.path().join("a/b");
        create_private_dir(&p).expect("create");
        let mode = |p: &Path| fs::metadata(p).expect("meta").permissions().mode() & 0o777;
        assert_eq!(mode(&p), DIR_MODE);
        fs::set_permissions(&p, Permissions::from_mode(0o755)).expect("chmod");
        create_private_dir(&p).expect("again");
        assert_eq!(mode(&p), DIR_MODE);
    }
}

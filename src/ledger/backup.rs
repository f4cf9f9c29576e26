//! The backup file: every record of the ledger at one instant, in a file
//! that says what it is and proves it is whole.
//!
//! Layout (integers little-endian):
//! ```text
//! magic "ACTBROKER-LEDGER\n" (17 bytes)
//! u32 backup file format (1)
//! u32 the store's format version (`version.rs`)
//! i64 taken at (ms since the epoch, UTC)
//! u64 number of records
//! per record: u32 key length, key, u32 value length, value
//! 32 bytes: SHA-256 of everything before it
//! ```
//! The records are the ledger tree's keys and values as stored (`store.rs`),
//! so a restore writes them back unchanged. A file is written to a
//! temporary name in its directory (0600), fsynced, linked to its name
//! (never over an existing file) and the directory fsynced: a backup that
//! exists is complete. A file is read whole and checked (magic, checksum,
//! versions, lengths) before anything is done with it.

use std::fs::{self, File, OpenOptions};
use std::io::{self, BufWriter, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use super::durable::FILE_MODE;
use super::version;
use crate::clock::Millis;

const MAGIC: &[u8] = b"ACTBROKER-LEDGER\n";
/// The layout above.
const BACKUP_FORMAT: u32 = 1;
const HASH_LEN: usize = 32;
const HEADER_LEN: usize = MAGIC.len() + 4 + 4 + 8 + 8;

/// A failed backup or restore, said in full.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct BackupError(pub String);

impl From<super::LedgerError> for BackupError {
    fn from(e: super::LedgerError) -> Self {
        BackupError(e.to_string())
    }
}

impl From<sled::Error> for BackupError {
    fn from(e: sled::Error) -> Self {
        BackupError(e.to_string())
    }
}

pub(super) fn io_error(what: &str, path: &Path, e: io::Error) -> BackupError {
    BackupError(format!("{what} {}: {e}", path.display()))
}

/// Every record of the ledger tree at one instant.
pub struct Snapshot {
    pub format_version: u32,
    pub taken_at: Millis,
    pub records: Vec<(sled::IVec, sled::IVec)>,
}

impl Snapshot {
    /// Reads every record of `tree`; the caller makes sure nothing writes
    /// to it meanwhile (the writer, between two batches; or a stopped store).
    pub fn of(tree: &sled::Tree, format_version: u32, taken_at: Millis) -> sled::Result<Self> {
        let records = tree.iter().collect::<sled::Result<Vec<_>>>()?;
        Ok(Snapshot {
            format_version,
            taken_at,
            records,
        })
    }
}

/// What a written backup holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackupInfo {
    pub path: PathBuf,
    pub bytes: u64,
    pub records: u64,
    pub format_version: u32,
    pub taken_at: Millis,
    /// SHA-256 of the file's contents before the checksum, hex.
    pub sha256: String,
}

/// A writer that hashes what goes through it.
struct Hashing<W> {
    inner: W,
    hash: Sha256,
    bytes: u64,
}

impl<W: Write> Write for Hashing<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hash.update(&buf[..n]);
        self.bytes += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

fn len32(n: usize, what: &str) -> io::Result<[u8; 4]> {
    u32::try_from(n)
        .map(u32::to_le_bytes)
        .map_err(|_| io::Error::other(format!("{what} of {n} bytes is too long for a backup")))
}

/// Writes `snap` to `path`, which must not exist yet (see the module docs).
pub fn write(path: &Path, snap: &Snapshot) -> Result<BackupInfo, BackupError> {
    if path.exists() {
        return Err(BackupError(format!(
            "{} already exists; a backup never replaces a file",
            path.display()
        )));
    }
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_owned(),
        _ => PathBuf::from("."),
    };
    let name = path
        .file_name()
        .ok_or_else(|| BackupError(format!("{} is not a file name", path.display())))?;
    let tmp = dir.join(format!(
        ".{}.tmp-{}",
        name.to_string_lossy(),
        std::process::id()
    ));
    let result = write_tmp(&tmp, snap).and_then(|(bytes, sha256)| {
        fs::hard_link(&tmp, path).map_err(|e| io_error("naming the backup", path, e))?;
        Ok((bytes, sha256))
    });
    let _ = fs::remove_file(&tmp);
    let (bytes, sha256) = result?;
    File::open(&dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| io_error("syncing the directory", &dir, e))?;
    Ok(BackupInfo {
        path: path.to_owned(),
        bytes,
        records: snap.records.len() as u64,
        format_version: snap.format_version,
        taken_at: snap.taken_at,
        sha256,
    })
}

fn write_tmp(tmp: &Path, snap: &Snapshot) -> Result<(u64, String), BackupError> {
    let file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(FILE_MODE)
        .open(tmp)
        .map_err(|e| io_error("creating", tmp, e))?;
    let mut w = Hashing {
        inner: BufWriter::with_capacity(1 << 20, file),
        hash: Sha256::new(),
        bytes: 0,
    };
    let body = (|| -> io::Result<()> {
        w.write_all(MAGIC)?;
        w.write_all(&BACKUP_FORMAT.to_le_bytes())?;
        w.write_all(&snap.format_version.to_le_bytes())?;
        w.write_all(&snap.taken_at.to_le_bytes())?;
        w.write_all(&(snap.records.len() as u64).to_le_bytes())?;
        for (k, v) in &snap.records {
            w.write_all(&len32(k.len(), "a key")?)?;
            w.write_all(k)?;
            w.write_all(&len32(v.len(), "a record")?)?;
            w.write_all(v)?;
        }
        Ok(())
    })();
    body.map_err(|e| io_error("writing", tmp, e))?;
    let digest = w.hash.finalize();
    let bytes = w.bytes + HASH_LEN as u64;
    let mut inner = w.inner;
    inner
        .write_all(&digest)
        .and_then(|_| inner.flush())
        .map_err(|e| io_error("writing", tmp, e))?;
    let file = inner
        .into_inner()
        .map_err(|e| io_error("writing", tmp, e.into_error()))?;
    file.sync_all().map_err(|e| io_error("syncing", tmp, e))?;
    Ok((bytes, hex::encode(digest)))
}

/// Reads and checks the backup in `path`: nothing is trusted before its
/// checksum holds, and a store format this broker does not read is refused.
pub fn read(path: &Path) -> Result<Snapshot, BackupError> {
    let data = fs::read(path).map_err(|e| io_error("reading the backup", path, e))?;
    let bad =
        |why: String| BackupError(format!("{} is not a usable backup: {why}", path.display()));
    if data.len() < MAGIC.len() || &data[..MAGIC.len()] != MAGIC {
        return Err(bad("it is not an activation-broker ledger backup".into()));
    }
    if data.len() < HEADER_LEN + HASH_LEN {
        return Err(bad(format!("it is cut short ({} bytes)", data.len())));
    }
    let (body, sum) = data.split_at(data.len() - HASH_LEN);
    if Sha256::digest(body).as_slice() != sum {
        return Err(bad(
            "its checksum does not match (the file is truncated or corrupt)".into(),
        ));
    }
    let mut r = Reader {
        data: body,
        at: MAGIC.len(),
    };
    let format = r.u32()?;
    if format != BACKUP_FORMAT {
        return Err(bad(format!(
            "its file format is {format}, and this activation-broker reads backup file format \
             {BACKUP_FORMAT}"
        )));
    }
    let format_version = r.u32()?;
    version::check(format_version, path).map_err(|e| bad(e.to_string()))?;
    let taken_at = r.i64()?;
    let count = r.u64()?;
    let mut records = Vec::with_capacity(usize::try_from(count).unwrap_or(0).min(1 << 20));
    for _ in 0..count {
        let k = r.bytes()?;
        let v = r.bytes()?;
        records.push((sled::IVec::from(k), sled::IVec::from(v)));
    }
    if r.at != body.len() {
        return Err(bad(format!(
            "{} bytes follow its {count} records",
            body.len() - r.at
        )));
    }
    Ok(Snapshot {
        format_version,
        taken_at,
        records,
    })
}

/// Bounds-checked reads from a checked backup.
struct Reader<'a> {
    data: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], BackupError> {
        let end = self.at.checked_add(n).filter(|&e| e <= self.data.len());
        let Some(end) = end else {
            return Err(BackupError(format!(
                "the backup's records overrun it at byte {}",
                self.at
            )));
        };
        let out = &self.data[self.at..end];
        self.at = end;
        Ok(out)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], BackupError> {
        let mut out = [0; N];
        out.copy_from_slice(self.take(N)?);
        Ok(out)
    }

    fn u32(&mut self) -> Result<u32, BackupError> {
        Ok(u32::from_le_bytes(self.array()?))
    }

    fn u64(&mut self) -> Result<u64, BackupError> {
        Ok(u64::from_le_bytes(self.array()?))
    }

    fn i64(&mut self) -> Result<i64, BackupError> {
        Ok(i64::from_le_bytes(self.array()?))
    }

    fn bytes(&mut self) -> Result<&'a [u8], BackupError> {
        let n = self.u32()? as usize;
        self.take(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snap() -> Snapshot {
        Snapshot {
            format_version: version::FORMAT_VERSION,
            taken_at: 1_700_000_000_000,
            records: vec![
                (b"pa".to_vec().into(), b"one".to_vec().into()),
                (b"pb".to_vec().into(), vec![7u8; 100].into()),
            ],
        }
    }

    #[test]
    fn a_backup_reads_back_and_is_private_and_never_overwritten() {
        use std::os::unix::fs::PermissionsExt;
        let d = tempfile::tempdir().expect("tempdir");
        let path = d.path().join("b.backup");
        let info = write(&path, &snap()).expect("write");
        assert_eq!(info.records, 2);
        assert_eq!(
            info.bytes,
            fs::metadata(&path).expect("meta").len(),
            "{info:?}"
        );
        let mode = fs::metadata(&path).expect("meta").permissions().mode() & 0o777;
        assert_eq!(mode, FILE_MODE);
        let back = read(&path).expect("read");
        assert_eq!(back.records, snap().records);
        assert_eq!(back.taken_at, snap().taken_at);
        let e = write(&path, &snap()).expect_err("exists").to_string();
        assert!(e.contains("already exists"), "{e}");
        assert_eq!(
            fs::read_dir(d.path()).expect("ls").count(),
            1,
            "no temp file left"
        );
    }

    #[test]
    fn truncated_corrupt_foreign_and_newer_files_are_refused() {
        let d = tempfile::tempdir().expect("tempdir");
        let path = d.path().join("b.backup");
        write(&path, &snap()).expect("write");
        let good = fs::read(&path).expect("read");
        let check = |bytes: &[u8], expect: &str| {
            let p = d.path().join("x");
            fs::write(&p, bytes).expect("write");
            let e = read(&p).err().expect("refused").to_string();
            assert!(e.contains(expect), "{e}");
            fs::remove_file(&p).expect("rm");
        };
        check(&good[..good.len() - 1], "checksum does not match");
        check(&good[..MAGIC.len() + 3], "cut short");
        let mut flipped = good.clone();
        flipped[HEADER_LEN + 2] ^= 1;
        check(&flipped, "checksum does not match");
        check(
            b"PK\x03\x04 a zip file",
            "not an activation-broker ledger backup",
        );
        let mut newer = snap();
        newer.format_version = version::FORMAT_VERSION + 1;
        let p = d.path().join("newer");
        write(&p, &newer).expect("write");
        let e = read(&p).err().expect("refused").to_string();
        assert!(
            e.contains(&format!("format version {}", version::FORMAT_VERSION + 1)),
            "{e}"
        );
    }
}

//! The store's format version: how its records are laid out (`store.rs`,
//! `model.rs`). It lives in its own sled tree (`meta`), apart from the
//! ledger's records, so that reading it never depends on the layout it
//! names. A store created before the version was recorded is version 1 and
//! gets it written at its next start. A store of a version this broker does
//! not read (made by a newer broker) is refused before anything is read or
//! written, naming both versions.

use std::path::Path;

use super::LedgerError;

/// The format version this broker writes.
pub const FORMAT_VERSION: u32 = 1;
/// The oldest format version this broker reads.
pub const OLDEST_READABLE: u32 = 1;

/// The tree holding the store's metadata.
const META_TREE: &str = "meta";
const VERSION_KEY: &[u8] = b"format_version";

/// The store's recorded format version, `None` if it has none yet.
pub fn recorded(db: &sled::Db) -> Result<Option<u32>, LedgerError> {
    let meta = db.open_tree(META_TREE)?;
    match meta.get(VERSION_KEY)? {
        None => Ok(None),
        Some(v) => {
            let bytes: [u8; 4] = v.as_ref().try_into().map_err(|_| {
                LedgerError::Unavailable(format!(
                    "the store's format version record is corrupt ({} bytes, expected 4)",
                    v.len()
                ))
            })?;
            Ok(Some(u32::from_be_bytes(bytes)))
        }
    }
}

/// Checks that this broker reads `version`; the refusal names the store,
/// its version and the versions this broker reads.
pub fn check(version: u32, path: &Path) -> Result<(), LedgerError> {
    if (OLDEST_READABLE..=FORMAT_VERSION).contains(&version) {
        return Ok(());
    }
    let hint = if version > FORMAT_VERSION {
        "it was written by a newer activation-broker: run that version (or newer), \
         or restore a backup taken by this version"
    } else {
        "it is too old for this activation-broker: open it with an older version first"
    };
    Err(LedgerError::Unavailable(format!(
        "the store in {} has format version {version}, and activation-broker {} reads \
         format versions {OLDEST_READABLE} to {FORMAT_VERSION}; {hint}",
        path.display(),
        env!("CARGO_PKG_VERSION"),
    )))
}

/// At open: refuses a version this broker does not read; records the
/// version of a store that has none (a new store, or one from before
/// versions were recorded: version 1). Returns the store's version. The
/// caller flushes.
pub fn check_and_record(db: &sled::Db, path: &Path) -> Result<u32, LedgerError> {
    match recorded(db)? {
        Some(v) => {
            check(v, path)?;
            Ok(v)
        }
        None => {
            record(db, FORMAT_VERSION)?;
            Ok(FORMAT_VERSION)
        }
    }
}

/// Writes `version` as the store's format version (not flushed).
pub fn record(db: &sled::Db, version: u32) -> Result<(), LedgerError> {
    db.open_tree(META_TREE)?
        .insert(VERSION_KEY, &version.to_be_bytes())?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_store_without_a_version_gets_the_current_one_and_a_newer_one_is_refused() {
        let d = tempfile::tempdir().expect("tempdir");
        let db = sled::open(d.path()).expect("open");
        assert_eq!(recorded(&db), Ok(None));
        assert_eq!(check_and_record(&db, d.path()), Ok(FORMAT_VERSION));
        assert_eq!(recorded(&db), Ok(Some(FORMAT_VERSION)));
        record(&db, FORMAT_VERSION + 1).expect("record");
        let e = check_and_record(&db, d.path())
            .expect_err("newer")
            .to_string();
        assert!(
            e.contains(&format!("format version {}", FORMAT_VERSION + 1)),
            "{e}"
        );
        assert!(
            e.contains(&format!(
                "reads format versions {OLDEST_READABLE} to {FORMAT_VERSION}"
            )),
            "{e}"
        );
        assert!(e.contains("newer activation-broker"), "{e}");
    }
}

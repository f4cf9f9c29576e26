//! BackupLedger [create]: FileName (default `ledger-<UTC time>.backup`).
//! Writes a consistent snapshot of the whole ledger to that file in
//! `<data_dir>/backups` while the broker runs.
//!
//! The snapshot is taken by the ledger's writer between two commits; the
//! directory is 0700, the file 0600. Returns Path, Bytes, Records,
//! FormatVersion, TakenAt (UTC) and Sha256. An existing file is never
//! replaced: `Conflict`. Restore it with `activation-broker restore --from
//! FILE --data-dir DIR` on a stopped broker. Recorded in the audit log
//! (after the snapshot: the backup does not hold its own entry).

use serde_json::json;

use crate::admin::params::Params;
use crate::admin::render::{self, Data};
use crate::admin::{AdminContext, AdminError, Call};

/// Longest backup file name.
pub const MAX_FILE_NAME: usize = 128;

#[derive(Debug)]
pub struct BackupLedger {
    file_name: Option<String>,
}

impl BackupLedger {
    pub fn parse(p: &mut Params) -> Result<Self, AdminError> {
        let file_name = p.opt_str("FileName")?;
        if let Some(n) = &file_name {
            let ok = !n.is_empty()
                && n.len() <= MAX_FILE_NAME
                && !n.starts_with('.')
                && n.chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
            if !ok {
                return Err(AdminError::invalid(
                    "FileName",
                    format!(
                        "{n:?} is not a file name: [A-Za-z0-9._-], 1 to {MAX_FILE_NAME} \
                         characters, not starting with '.'"
                    ),
                ));
            }
        }
        Ok(BackupLedger { file_name })
    }

    pub async fn apply(self, ctx: &AdminContext, call: &Call) -> Result<Data, AdminError> {
        let result = self.backup(ctx).await;
        ctx.audited(call, result).await
    }

    async fn backup(self, ctx: &AdminContext) -> Result<Data, AdminError> {
        let dir = ctx.backup_dir()?.to_owned();
        let name = self.file_name.unwrap_or_else(|| {
            let now = chrono::Utc::now().format("%Y%m%dT%H%M%S%.3fZ");
            format!("ledger-{now}.backup")
        });
        let path = dir.join(&name);
        let create = dir.clone();
        tokio::task::spawn_blocking(move || crate::ledger::create_private_dir(&create))
            .await
            .map_err(|e| AdminError::unavailable(e.to_string()))?
            .map_err(|e| AdminError::unavailable(format!("creating {}: {e}", dir.display())))?;
        if path.exists() {
            return Err(AdminError::new(
                "Conflict",
                format!(
                    "{} already exists; a backup never replaces a file",
                    path.display()
                ),
            ));
        }
        let info = ctx
            .ledger
            .backup(&path)
            .await
            .map_err(|e| AdminError::unavailable(e.to_string()))?;
        let mut data = Data::new();
        data.insert("Path".into(), json!(info.path.display().to_string()));
        data.insert("Bytes".into(), json!(info.bytes));
        data.insert("Records".into(), json!(info.records));
        data.insert("FormatVersion".into(), json!(info.format_version));
        data.insert("TakenAt".into(), render::time(info.taken_at));
        data.insert("Sha256".into(), json!(info.sha256));
        Ok(data)
    }
}

//! The activation ledger: the durable store that decides, exactly once,
//! whether a device may connect, and answers every operator query.
//!
//! It knows nothing of MQTT. One writer thread owns every mutation and does
//! group commit (drain pending requests → one atomic sled batch → one flush →
//! answer every waiter). Reads of the connect fast path go to a concurrent
//! view that is only ever updated after a flush, so they never wait for the
//! writer and never see anything that is not durable. Operator queries read
//! the in-memory state and its indexes under a read lock; the writer holds
//! the write lock until its batch is flushed, so queries never see
//! non-durable data either.

mod assignment;
mod backup;
mod commands;
mod connect;
mod durable;
mod etcd;
mod etcd_fence;
mod etcd_writer;
mod fast;
mod invariants;
mod lanes;
mod model;
mod query;
mod records;
mod restore;
mod state;
mod store;
mod undo;
mod version;
mod writer;

use std::path::Path;
use std::sync::Arc;

use parking_lot::RwLock;
use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;

pub use model::{
    Allowance, Assignment, AuditRecord, AuthMode, CodeKind, CodeRecord, Device, Lane, Lot, Order,
    Product,
};
pub use query::{
    AssignmentFilter, AuditFilter, CodeFilter, DeviceFilter, OrderFilter, Page, PageRequest,
    ProductFilter, Summary, UnassignedGroup, MAX_PAGE_SIZE,
};
pub use state::{MAX_KEYS_PER_REQUEST, MAX_ORDER_QUANTITY, MAX_VALIDITY_SECS};

use crate::clock::{Clock, Millis};
use crate::events::EventBus;
pub use backup::{BackupError, BackupInfo};
use durable::StoreFiles;
pub use durable::{create_private_dir, SyncFault, DIR_MODE, FILE_MODE};
pub use etcd::EtcdOptions;
use fast::FastView;
pub use records::Removal;
pub use restore::{backup_stopped, restore, Restored};
use state::State;
pub use version::{FORMAT_VERSION, OLDEST_READABLE};
use writer::{Request, WriterHandle};

/// Tunables of the ledger.
#[derive(Debug, Clone)]
pub struct LedgerOptions {
    /// Most requests applied in one atomic batch with one flush. `1` is the
    /// flush-per-request baseline.
    pub max_batch: usize,
    /// `pool/low` is published when a product's available codes fall below this.
    pub pool_low_threshold: u64,
    /// Pending requests the writer queue holds before callers wait.
    pub queue_depth: usize,
    /// Fault injection: while this switch is on, making a batch durable
    /// fails as a failing disk would (tests, drills). `None` in service.
    pub sync_fault: Option<SyncFault>,
}

impl Default for LedgerOptions {
    fn default() -> Self {
        LedgerOptions {
            max_batch: 4096,
            pool_low_threshold: 10,
            queue_depth: 65_536,
            sync_fault: None,
        }
    }
}

/// Errors of ledger operations; `code()` is the admin API error code.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
pub enum LedgerError {
    #[error("{0}")]
    InvalidParameter(String),
    #[error("product {0} does not exist")]
    ProductNotFound(String),
    #[error("device {1} of product {0} does not exist")]
    DeviceNotFound(String, String),
    #[error("order {0} does not exist")]
    OrderNotFound(String),
    #[error(
        "requested {requested} codes but only {available} unassigned codes match the allowance"
    )]
    InsufficientCodes { requested: u64, available: u64 },
    #[error("product {product_key} has allowance of {product_validity_secs} s; codes of {requested_validity_secs} s cannot be assigned to it")]
    AllowanceMismatch {
        product_key: String,
        product_validity_secs: u64,
        requested_validity_secs: u64,
    },
    #[error("{0}")]
    Conflict(String),
    /// The store cannot take or answer requests now (stopped, read-only,
    /// failed, etcd without quorum): retry later.
    #[error("store unavailable: {0}")]
    Unavailable(String),
    /// Reading or writing the store failed.
    #[error("store I/O failed: {0}")]
    Io(String),
    /// The store holds records that do not decode or do not fit together.
    #[error("corrupt store: {0}")]
    Corrupt(String),
}

/// How long `Ledger::open` waits for a store whose file lock is held: a
/// ledger just closed in this process lets go of it when sled's background
/// I/O threads end, a moment after its last handle is dropped. Held by
/// another process (a running broker), it is still refused after this.
const LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

fn open_sled(path: &Path) -> Result<sled::Db, LedgerError> {
    let deadline = std::time::Instant::now() + LOCK_WAIT;
    loop {
        let opened = sled::Config::new()
            .path(path)
            .cache_capacity(256 * 1024 * 1024)
            .mode(sled::Mode::HighThroughput)
            // The writer flushes after every batch; no background flusher.
            .flush_every_ms(None)
            .open();
        match opened {
            Ok(db) => return Ok(db),
            // sled reports it as an `Other` I/O error with this text.
            Err(sled::Error::Io(e))
                if e.to_string().contains("could not acquire lock")
                    && std::time::Instant::now() < deadline =>
            {
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            Err(e) => {
                return Err(LedgerError::Unavailable(format!(
                    "opening the store in {}: {e}",
                    path.display()
                )))
            }
        }
    }
}

impl From<sled::Error> for LedgerError {
    fn from(e: sled::Error) -> Self {
        match e {
            sled::Error::Corruption { .. } => LedgerError::Corrupt(e.to_string()),
            sled::Error::Io(_) => LedgerError::Io(e.to_string()),
            other => LedgerError::Unavailable(other.to_string()),
        }
    }
}

/// Every mutation an operator (or the broker itself) can make.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Command {
    CreateProduct {
        product_key: String,
        name: String,
        auth_mode: AuthMode,
    },
    RegisterDevices {
        product_key: String,
        device_keys: Vec<String>,
    },
    CreateOrder {
        order_id: Option<String>,
        quantity: u64,
        validity_secs: u64,
        product_key: Option<String>,
    },
    AssignCodes {
        product_key: String,
        quantity: u64,
        validity_secs: Option<u64>,
    },
    SetAutoRenewal {
        product_key: String,
        enabled: bool,
    },
    AddBlacklist {
        product_key: String,
        device_keys: Vec<String>,
    },
    RemoveBlacklist {
        product_key: String,
        device_keys: Vec<String>,
    },
    DeleteDevice {
        product_key: String,
        device_key: String,
    },
    DeleteProduct {
        product_key: String,
    },
}

/// What a successful [`Command`] did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Outcome {
    ProductCreated(Product),
    /// `(DeviceKey, DeviceSecret)`; the secret is `None` for product-secret products.
    DevicesRegistered {
        product_key: String,
        devices: Vec<(String, Option<String>)>,
    },
    OrderCreated {
        order: Order,
        assignment: Option<Assignment>,
    },
    CodesAssigned(Assignment),
    AutoRenewalSet {
        product_key: String,
        enabled: bool,
    },
    /// DeviceKeys whose membership actually changed.
    BlacklistChanged {
        product_key: String,
        changed: Vec<String>,
    },
    DeviceDeleted {
        product_key: String,
        device_key: String,
    },
    ProductDeleted {
        product_key: String,
        forfeited: u64,
        devices: Vec<String>,
    },
}

/// Who asked for a mutation, for the audit log.
#[derive(Debug, Clone)]
pub struct AuditEntry {
    pub account: String,
    pub action: String,
    /// The request's parameters as JSON text.
    pub parameters: String,
    /// How the caller names a refusal in the audit log's result code (the
    /// ledger knows no API codes; the admin plane's is `admin::error_code`).
    pub code_of: fn(&LedgerError) -> &'static str,
}

/// What an assignment would do, without doing it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AssignPreview {
    pub product_key: String,
    pub allowance: Option<Allowance>,
    pub max_assignable: u64,
    pub quantity: u64,
    pub orders: Vec<Lot>,
    pub error: Option<LedgerError>,
}

/// Where the gate finds the secret to check a device's signature.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SecretLookup {
    UnknownProduct,
    /// The product is in device-secret mode and this device is not registered.
    UnknownDevice,
    Secret(Arc<str>),
}

/// An admitted device: valid until `expire_at`. `consumed` is set when the
/// connect consumed a code (and carries its record), unset for a reconnect.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Admitted {
    pub expire_at: Millis,
    pub consumed: Option<CodeRecord>,
}

/// Why a device may not connect.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("product {0} does not exist")]
    UnknownProduct(String),
    #[error("device {1} is not registered in product {0}")]
    UnknownDevice(String, String),
    #[error("no activation code available for product {0}")]
    NoCodeAvailable(String),
    #[error("activation code expired and automatic renewal is off for product {0}")]
    RenewalDisabled(String),
    #[error(
        "activation code expired and device {1} is on the auto-renewal blacklist of product {0}"
    )]
    Blacklisted(String, String),
    #[error("store unavailable: {0}")]
    StoreUnavailable(String),
}

fn writer_stopped() -> Refusal {
    Refusal::StoreUnavailable("ledger writer stopped".into())
}

/// A handle to the ledger; cheap to clone.
#[derive(Clone)]
pub struct Ledger {
    inner: Arc<Inner>,
}

/// Where the records live.
enum Backing {
    Sled {
        db: sled::Db,
        files: Arc<StoreFiles>,
    },
    /// Shared with other nodes; etcd makes every commit durable.
    Etcd,
}

struct Inner {
    read_only: Arc<std::sync::atomic::AtomicBool>,
    state: Arc<RwLock<State>>,
    fast: Arc<FastView>,
    writer: WriterHandle,
    clock: Clock,
    events: EventBus,
    backing: Backing,
    removals: tokio::sync::broadcast::Sender<Removal>,
    failure: tokio::sync::watch::Receiver<Option<LedgerError>>,
}

impl Ledger {
    /// Opens (or creates) the ledger stored in directory `path`, which is
    /// made readable by its owner only. A directory holding files that
    /// cannot be read as a store is an error naming the path, never a new,
    /// empty store. Once open, the store's files and directory entries are
    /// durable.
    pub fn open(
        path: &Path,
        options: LedgerOptions,
        clock: Clock,
        events: EventBus,
    ) -> Result<Ledger, LedgerError> {
        durable::check_existing(path)?;
        create_private_dir(path)
            .map_err(|e| LedgerError::Unavailable(format!("creating {}: {e}", path.display())))?;
        let db = open_sled(path)?;
        version::check_and_record(&db, path)?;
        let tree = db.open_tree(store::TREE)?;
        db.flush()?;
        let files = Arc::new(StoreFiles::open(path, options.sync_fault.clone())?);
        let state = State::from_records(store::tree_records(&tree))?;
        let fast = Arc::new(FastView::build(&state));
        let state = Arc::new(RwLock::new(state));
        let read_only = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (failed, failure) = tokio::sync::watch::channel(None);
        let writer = writer::spawn(writer::WriterContext {
            read_only: read_only.clone(),
            db: db.clone(),
            tree,
            files: files.clone(),
            failed,
            state: state.clone(),
            fast: fast.clone(),
            clock: clock.clone(),
            events: events.clone(),
            options,
        })?;
        Ok(Ledger {
            inner: Arc::new(Inner {
                read_only,
                state,
                fast,
                writer,
                clock,
                events,
                backing: Backing::Sled { db, files },
                removals: tokio::sync::broadcast::channel(1).0,
                failure,
            }),
        })
    }

    /// Opens the ledger several broker nodes share on etcd (see
    /// `etcd.rs`): connects, reads every record into this node's replica,
    /// and keeps it current through a watch. Fails if etcd does not answer.
    pub fn open_etcd(
        etcd_options: EtcdOptions,
        options: LedgerOptions,
        clock: Clock,
        events: EventBus,
    ) -> Result<Ledger, LedgerError> {
        let lanes = state::LaneMode {
            node: etcd_options.node.clone(),
            block: etcd_options.lane_block.max(1),
        };
        let store = etcd::EtcdStore::connect(etcd_options)?;
        store.hold_lease()?;
        let loaded = store.load()?;
        let watch_from = loaded.revision + 1;
        let mut state = State::from_records(loaded.records.into_iter().map(Ok))?;
        state.set_lane_mode(lanes.clone());
        let fast = Arc::new(FastView::build(&state));
        let state = Arc::new(RwLock::new(state));
        let read_only = Arc::new(std::sync::atomic::AtomicBool::new(false));
        // Nothing fails for good on etcd: the sender stays silent (held by
        // the writer thread, so `failed` waits as long as the writer runs).
        let (failed, failure) = tokio::sync::watch::channel(None);
        let (removals, _) = tokio::sync::broadcast::channel(4096);
        let (tx, rx) = tokio::sync::mpsc::channel(options.queue_depth.max(1));
        store.watch(watch_from, tx.downgrade());
        let ctx = etcd_writer::EtcdContext {
            store,
            pos: etcd_fence::Position::new(loaded.revision),
            lanes,
            live_nodes: loaded.live_nodes,
            reclaim: true,
            read_only: read_only.clone(),
            state: state.clone(),
            fast: fast.clone(),
            clock: clock.clone(),
            events: events.clone(),
            options,
            removals: removals.clone(),
        };
        let writer = writer::spawn_with(tx, rx, move |rx| {
            let _failed = failed;
            etcd_writer::run(ctx, rx)
        })?;
        Ok(Ledger {
            inner: Arc::new(Inner {
                read_only,
                state,
                fast,
                writer,
                clock,
                events,
                backing: Backing::Etcd,
                removals,
                failure,
            }),
        })
    }

    /// Devices and products that another node deleted (etcd store), as
    /// this node's replica learns it: their connections here must end.
    pub fn replica_removals(&self) -> tokio::sync::broadcast::Receiver<Removal> {
        self.inner.removals.subscribe()
    }

    /// The store failure that stopped every write, if one happened. After
    /// a failed flush nothing the disk holds is known any more: the writer
    /// refuses every write from then on (fail-stop) and the process should
    /// exit, so that a restart reads what the disk really holds.
    pub fn failure(&self) -> Option<LedgerError> {
        self.inner.failure.borrow().clone()
    }

    /// Waits until the store fails (see [`Ledger::failure`]).
    pub async fn failed(&self) -> LedgerError {
        let mut rx = self.inner.failure.clone();
        loop {
            if let Some(e) = rx.borrow_and_update().clone() {
                return e;
            }
            if rx.changed().await.is_err() {
                return LedgerError::Unavailable("ledger writer stopped".into());
            }
        }
    }

    pub fn clock(&self) -> &Clock {
        &self.inner.clock
    }

    /// The device generation: a number that changes whenever device records
    /// (activations, renewals, deletions, registrations) change, after the
    /// change is committed and readable. Watchers of the expiry index
    /// re-read it only when this moved, and wake when it does.
    pub fn device_changes(&self) -> tokio::sync::watch::Receiver<u64> {
        self.inner.fast.watch_generation()
    }

    pub fn events(&self) -> &EventBus {
        &self.inner.events
    }

    /// The secret that signs this device's credentials. Never waits for the writer.
    pub fn secret_for(&self, product_key: &str, device_key: &str) -> SecretLookup {
        self.inner.fast.secret_for(product_key, device_key)
    }

    /// The connect decision: valid → admitted with no write (fast path,
    /// never waits for the writer); never activated → consume; expired →
    /// renew if allowed; otherwise the precise refusal. A consumption is
    /// answered only after it is flushed.
    pub async fn connect(&self, product_key: &str, device_key: &str) -> Result<Admitted, Refusal> {
        let (request, rx) = match self.connect_request(product_key, device_key) {
            Ok(admitted) => return Ok(admitted),
            Err(pending) => pending,
        };
        self.inner
            .writer
            .send(request)
            .await
            .map_err(|e| Refusal::StoreUnavailable(e.to_string()))?;
        rx.await.map_err(|_| writer_stopped())?
    }

    /// The connect decision for a caller that is not async (tests, tools).
    pub fn connect_blocking(
        &self,
        product_key: &str,
        device_key: &str,
    ) -> Result<Admitted, Refusal> {
        let (request, rx) = match self.connect_request(product_key, device_key) {
            Ok(admitted) => return Ok(admitted),
            Err(pending) => pending,
        };
        self.inner
            .writer
            .send_blocking(request)
            .map_err(|e| Refusal::StoreUnavailable(e.to_string()))?;
        rx.blocking_recv().map_err(|_| writer_stopped())?
    }

    /// The fast path's admission, or the request for the writer and where
    /// its answer will come.
    #[allow(clippy::type_complexity, clippy::result_large_err)]
    fn connect_request(
        &self,
        product_key: &str,
        device_key: &str,
    ) -> Result<Admitted, (Request, oneshot::Receiver<Result<Admitted, Refusal>>)> {
        let now = self.inner.clock.now();
        if let Some(expire_at) = self.inner.fast.valid_until(product_key, device_key, now) {
            return Ok(Admitted {
                expire_at,
                consumed: None,
            });
        }
        let (tx, rx) = oneshot::channel();
        Err((
            Request::Connect {
                product_key: product_key.to_owned(),
                device_key: device_key.to_owned(),
                reply: tx,
            },
            rx,
        ))
    }

    /// Only the fast-path check: `Some(expire_at)` if the device holds a
    /// valid code now. Never waits for the writer.
    pub fn valid_until(&self, product_key: &str, device_key: &str) -> Option<Millis> {
        self.inner
            .fast
            .valid_until(product_key, device_key, self.inner.clock.now())
    }

    /// Applies a mutation. With a `client_token`, a retry with the same
    /// command returns the first outcome without a second effect, and a
    /// retry with another command is a `Conflict`.
    pub async fn execute(
        &self,
        command: Command,
        client_token: Option<String>,
    ) -> Result<Outcome, LedgerError> {
        self.execute_audited(command, client_token, None).await
    }

    /// [`Ledger::execute`], recording the request and its result in the
    /// audit log in the same atomic batch as its effect.
    pub async fn execute_audited(
        &self,
        command: Command,
        client_token: Option<String>,
        audit: Option<AuditEntry>,
    ) -> Result<Outcome, LedgerError> {
        let (tx, rx) = oneshot::channel();
        self.inner
            .writer
            .send(Request::Command {
                command,
                client_token,
                audit,
                reply: tx,
            })
            .await?;
        rx.await
            .map_err(|_| LedgerError::Unavailable("ledger writer stopped".into()))?
    }

    /// Records, durably, an operator action that is not a ledger mutation
    /// (e.g. lifting a ban) in the audit log with its result code and message.
    pub async fn record_audit(
        &self,
        entry: AuditEntry,
        code: &str,
        message: &str,
    ) -> Result<(), LedgerError> {
        let (tx, rx) = oneshot::channel();
        self.inner
            .writer
            .send(Request::Audit {
                entry,
                code: code.to_owned(),
                message: message.to_owned(),
                reply: tx,
            })
            .await?;
        rx.await
            .map_err(|_| LedgerError::Unavailable("ledger writer stopped".into()))?
    }

    /// [`Ledger::execute`] for callers that are not async.
    pub fn execute_blocking(
        &self,
        command: Command,
        client_token: Option<String>,
    ) -> Result<Outcome, LedgerError> {
        let (tx, rx) = oneshot::channel();
        self.inner.writer.send_blocking(Request::Command {
            command,
            client_token,
            audit: None,
            reply: tx,
        })?;
        rx.blocking_recv()
            .map_err(|_| LedgerError::Unavailable("ledger writer stopped".into()))?
    }

    /// Marks, durably, every current code that expires within `window_ms`
    /// of now and has not been announced yet; returns them (oldest expiry
    /// first) so the caller announces each exactly once.
    pub async fn take_expiring(&self, window_ms: Millis) -> Result<Vec<CodeRecord>, LedgerError> {
        let (tx, rx) = oneshot::channel();
        self.inner
            .writer
            .send(Request::TakeExpiring {
                window_ms,
                reply: tx,
            })
            .await?;
        rx.await
            .map_err(|_| LedgerError::Unavailable("ledger writer stopped".into()))?
    }

    /// Backs up the ledger to `path` (a new file): the writer takes the
    /// snapshot between two batches (it is the only writer, so the snapshot
    /// holds every batch before it whole and nothing of the next); the file
    /// is written off the writer, on the blocking pool.
    pub async fn backup(&self, path: &Path) -> Result<BackupInfo, BackupError> {
        let (tx, rx) = oneshot::channel();
        self.inner
            .writer
            .send(Request::Snapshot { reply: tx })
            .await?;
        let snap = rx
            .await
            .map_err(|_| LedgerError::Unavailable("ledger writer stopped".into()))??;
        let path = path.to_owned();
        tokio::task::spawn_blocking(move || backup::write(&path, &snap))
            .await
            .map_err(|e| BackupError(format!("writing the backup failed: {e}")))?
    }

    /// Read-only mode (maintenance, disk trouble drills): every write —
    /// activations, renewals, operator mutations — is refused as
    /// unavailable, while devices holding a valid code still reconnect and
    /// every query still answers.
    pub fn set_read_only(&self, on: bool) {
        self.inner
            .read_only
            .store(on, std::sync::atomic::Ordering::SeqCst);
    }

    /// Flushes the store to disk, durably.
    pub fn flush(&self) -> Result<(), LedgerError> {
        match &self.inner.backing {
            Backing::Sled { db, files } => {
                db.flush()?;
                files.sync()
            }
            Backing::Etcd => Ok(()),
        }
    }

    pub(crate) fn read(&self) -> parking_lot::RwLockReadGuard<'_, State> {
        self.inner.state.read()
    }
}

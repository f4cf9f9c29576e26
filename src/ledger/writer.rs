//! The single writer: group commit. It drains every pending request, applies
//! them in order to the in-memory state, puts every touched record into one
//! atomic sled `Batch`, flushes once, and only then updates the fast view,
//! answers every waiter and publishes the events. "Flushes" is sled's flush
//! followed by fdatasync of the files it wrote (`durable.rs`). If the store
//! fails, every waiter of the batch gets a typed error and the writer stops
//! taking writes for good (fail-stop): the in-memory state and sled's tree
//! hold a batch the disk may not, and after a failed fsync nothing says
//! what the disk holds; only a restart that reads it can know. The failure
//! is published for the process to exit on ([`super::Ledger::failed`]).

use std::sync::Arc;
use std::thread;

use parking_lot::RwLock;
use tokio::sync::{mpsc, oneshot};

use super::backup::Snapshot;
use super::durable::StoreFiles;
use super::fast::FastView;
use super::model::{CodeRecord, TokenRecord};
use super::state::State;
use super::store::{decode, encode};
use super::{Admitted, AuditEntry, Command, LedgerError, LedgerOptions, Outcome, Refusal};
use crate::clock::{Clock, Millis};
use crate::events::{Event, EventBus};

pub enum Request {
    Connect {
        product_key: String,
        device_key: String,
        reply: oneshot::Sender<Result<Admitted, Refusal>>,
    },
    Command {
        command: Command,
        client_token: Option<String>,
        audit: Option<AuditEntry>,
        reply: oneshot::Sender<Result<Outcome, LedgerError>>,
    },
    TakeExpiring {
        window_ms: Millis,
        reply: oneshot::Sender<Result<Vec<CodeRecord>, LedgerError>>,
    },
    /// Every record as of now, for a backup: taken after every request
    /// before it is committed and before any after it is applied.
    Snapshot {
        reply: oneshot::Sender<Result<Snapshot, LedgerError>>,
    },
    /// An operator action outside the ledger, for the audit log alone.
    Audit {
        entry: AuditEntry,
        code: String,
        message: String,
        reply: oneshot::Sender<Result<(), LedgerError>>,
    },
}

pub struct WriterContext {
    /// While set, every write is refused as unavailable (reads go on).
    pub read_only: Arc<std::sync::atomic::AtomicBool>,
    pub db: sled::Db,
    pub tree: sled::Tree,
    /// Made durable after every flush.
    pub files: Arc<StoreFiles>,
    /// Where the failure that stopped the writer is published.
    pub failed: tokio::sync::watch::Sender<Option<LedgerError>>,
    pub state: Arc<RwLock<State>>,
    pub fast: Arc<FastView>,
    pub clock: Clock,
    pub events: EventBus,
    pub options: LedgerOptions,
}

/// The sending side of the writer queue. Dropping the last handle stops
/// the writer once it has answered every pending request, and waits for it,
/// so the store is closed (and its file lock released) when drop returns.
pub struct WriterHandle {
    tx: Option<mpsc::Sender<Request>>,
    thread: Option<thread::JoinHandle<()>>,
}

impl Drop for WriterHandle {
    fn drop(&mut self) {
        self.tx.take();
        if let Some(t) = self.thread.take() {
            if t.thread().id() != thread::current().id() {
                let _ = t.join();
            }
        }
    }
}

impl WriterHandle {
    fn sender(&self) -> Result<&mpsc::Sender<Request>, LedgerError> {
        self.tx
            .as_ref()
            .ok_or_else(|| LedgerError::Unavailable("ledger writer stopped".into()))
    }

    pub async fn send(&self, r: Request) -> Result<(), LedgerError> {
        self.sender()?
            .send(r)
            .await
            .map_err(|_| LedgerError::Unavailable("ledger writer stopped".into()))
    }

    pub fn send_blocking(&self, r: Request) -> Result<(), LedgerError> {
        self.sender()?
            .blocking_send(r)
            .map_err(|_| LedgerError::Unavailable("ledger writer stopped".into()))
    }
}

pub fn spawn(ctx: WriterContext) -> Result<WriterHandle, LedgerError> {
    let (tx, rx) = mpsc::channel(ctx.options.queue_depth.max(1));
    let thread = thread::Builder::new()
        .name("ledger-writer".into())
        .spawn(move || run(ctx, rx))
        .map_err(|e| LedgerError::Unavailable(format!("starting the ledger writer: {e}")))?;
    Ok(WriterHandle {
        tx: Some(tx),
        thread: Some(thread),
    })
}

/// An answer held back until the batch is durable.
enum Reply {
    Connect(
        oneshot::Sender<Result<Admitted, Refusal>>,
        Result<Admitted, Refusal>,
    ),
    Command(
        oneshot::Sender<Result<Outcome, LedgerError>>,
        Result<Outcome, LedgerError>,
    ),
    Expiring(
        oneshot::Sender<Result<Vec<CodeRecord>, LedgerError>>,
        Result<Vec<CodeRecord>, LedgerError>,
    ),
    Audit(oneshot::Sender<Result<(), LedgerError>>),
}

impl Reply {
    fn fail(self, e: &LedgerError) {
        match self {
            Reply::Connect(tx, r) => {
                let _ = tx.send(match r {
                    // A refusal wrote nothing; it stays true.
                    Err(refusal) => Err(refusal),
                    Ok(_) => Err(Refusal::StoreUnavailable(e.to_string())),
                });
            }
            Reply::Command(tx, r) => {
                let _ = tx.send(r.and(Err(e.clone())));
            }
            Reply::Expiring(tx, _) => {
                let _ = tx.send(Err(e.clone()));
            }
            Reply::Audit(tx) => {
                let _ = tx.send(Err(e.clone()));
            }
        }
    }

    fn send(self) {
        match self {
            Reply::Connect(tx, r) => {
                let _ = tx.send(r);
            }
            Reply::Command(tx, r) => {
                let _ = tx.send(r);
            }
            Reply::Expiring(tx, r) => {
                let _ = tx.send(r);
            }
            Reply::Audit(tx) => {
                let _ = tx.send(Ok(()));
            }
        }
    }
}

fn run(ctx: WriterContext, mut rx: mpsc::Receiver<Request>) {
    let max_batch = ctx.options.max_batch.max(1);
    let mut pending = Vec::with_capacity(max_batch.min(65_536));
    let mut poisoned: Option<LedgerError> = None;
    while let Some(first) = rx.blocking_recv() {
        pending.push(first);
        // A snapshot ends the batch: it follows the batch's commit.
        while pending.len() < max_batch && !is_snapshot(pending.last()) {
            match rx.try_recv() {
                Ok(r) => pending.push(r),
                Err(_) => break,
            }
        }
        let snapshot = match pending.pop() {
            Some(Request::Snapshot { reply }) => Some(reply),
            Some(other) => {
                pending.push(other);
                None
            }
            None => None,
        };
        if let Some(e) = &poisoned {
            for r in pending.drain(..) {
                answer_unavailable(r, e);
            }
        } else if ctx.read_only.load(std::sync::atomic::Ordering::SeqCst) {
            let e = LedgerError::Unavailable("the ledger is read-only".into());
            for r in pending.drain(..) {
                answer_unavailable(r, &e);
            }
        } else if let Err(stopped) = commit_batch(&ctx, &mut pending) {
            poisoned = Some(stopped);
        }
        if let Some(reply) = snapshot {
            let _ = reply.send(match &poisoned {
                // What the disk holds is unknown: no backup of it.
                Some(e) => Err(e.clone()),
                None => take_snapshot(&ctx),
            });
        }
    }
}

fn is_snapshot(r: Option<&Request>) -> bool {
    matches!(r, Some(Request::Snapshot { .. }))
}

/// Every record of the tree, with the store's format version: the writer
/// is between two batches, so nothing changes meanwhile.
fn take_snapshot(ctx: &WriterContext) -> Result<Snapshot, LedgerError> {
    let version = super::version::recorded(&ctx.db)?.unwrap_or(super::version::FORMAT_VERSION);
    Ok(Snapshot::of(&ctx.tree, version, ctx.clock.now())?)
}

/// Stops the writer for good after the store failed with `e`: logs it and
/// publishes it (after the failed batch's waiters have their answers, so
/// that a process exiting on it lets those answers out first), and returns
/// the error every later write gets.
fn fail_stop(ctx: &WriterContext, e: &LedgerError) -> LedgerError {
    tracing::error!(
        error = %e,
        "ledger store failed; refusing every write from now on (fail-stop)"
    );
    let stopped = LedgerError::Unavailable(format!(
        "the store failed and takes no more writes until a restart: {e}"
    ));
    ctx.failed.send_replace(Some(stopped.clone()));
    stopped
}

fn answer_unavailable(r: Request, e: &LedgerError) {
    match r {
        Request::Connect { reply, .. } => {
            let _ = reply.send(Err(Refusal::StoreUnavailable(e.to_string())));
        }
        Request::Command { reply, .. } => {
            let _ = reply.send(Err(e.clone()));
        }
        Request::TakeExpiring { reply, .. } => {
            let _ = reply.send(Err(e.clone()));
        }
        Request::Audit { reply, .. } => {
            let _ = reply.send(Err(e.clone()));
        }
        Request::Snapshot { reply } => {
            let _ = reply.send(Err(e.clone()));
        }
    }
}

/// Applies, commits and answers one batch. Waiters are answered in every
/// case; an `Err` means the store failed (the in-memory state holds what
/// may not be on disk) and carries the error for every later write.
fn commit_batch(ctx: &WriterContext, pending: &mut Vec<Request>) -> Result<(), LedgerError> {
    let now = ctx.clock.now();
    let mut replies = Vec::with_capacity(pending.len());
    let mut events: Vec<Event> = Vec::new();
    let mut st = ctx.state.write();
    for req in pending.drain(..) {
        match req {
            Request::Connect {
                product_key,
                device_key,
                reply,
            } => {
                let r = st
                    .connect(
                        &product_key,
                        &device_key,
                        now,
                        &mut events,
                        ctx.options.pool_low_threshold,
                    )
                    .map(|(expire_at, consumed)| Admitted {
                        expire_at,
                        consumed,
                    });
                replies.push(Reply::Connect(reply, r));
            }
            Request::Command {
                command,
                client_token,
                audit,
                reply,
            } => {
                let r = apply_command(&mut st, &command, client_token, now, &mut events);
                if let Some(entry) = audit {
                    st.record_audit(entry, &r, now);
                }
                replies.push(Reply::Command(reply, r));
            }
            Request::TakeExpiring { window_ms, reply } => {
                let r = st.take_expiring(now, window_ms, &mut events);
                replies.push(Reply::Expiring(reply, Ok(r)));
            }
            Request::Audit {
                entry,
                code,
                message,
                reply,
            } => {
                st.append_audit(entry, code, message, now);
                replies.push(Reply::Audit(reply));
            }
            // `run` takes a snapshot out of its batch (it ends one).
            Request::Snapshot { reply } => {
                let _ = reply.send(Err(LedgerError::Unavailable(
                    "a snapshot was taken into a batch".into(),
                )));
            }
        }
    }
    if st.dirty.is_empty() {
        drop(st);
        finish(ctx, replies, events);
        return Ok(());
    }
    let mut batch = sled::Batch::default();
    let started = std::time::Instant::now();
    let written = st.drain_dirty(&mut batch).and_then(|dirty| {
        ctx.tree.apply_batch(batch)?;
        ctx.db.flush()?;
        ctx.files.sync()?;
        Ok(dirty)
    });
    if written.is_ok() {
        // Metrics facade: an observation each, no I/O (src/http/metrics.rs).
        metrics::histogram!("activation_ledger_commit_seconds")
            .record(started.elapsed().as_secs_f64());
        metrics::histogram!("activation_ledger_batch_size").record(replies.len() as f64);
    }
    match written {
        Ok(dirty) => {
            for pk in &dirty.products {
                if let Some(p) = st.products.get(pk) {
                    ctx.fast.put_product(p);
                }
            }
            for id in &dirty.devices {
                if let Some(d) = st.devices.get(id) {
                    ctx.fast.put_device(d);
                }
            }
            if !dirty.devices.is_empty() {
                ctx.fast.devices_changed();
            }
            drop(st);
            finish(ctx, replies, events);
            Ok(())
        }
        Err(e) => {
            for r in replies {
                r.fail(&e);
            }
            Err(fail_stop(ctx, &e))
        }
    }
}

/// Publishes the batch's events, then answers: whoever sees an answer can
/// rely on its events being out.
fn finish(ctx: &WriterContext, replies: Vec<Reply>, events: Vec<Event>) {
    for e in events {
        ctx.events.publish(e);
    }
    for r in replies {
        r.send();
    }
}

/// Applies one command with `ClientToken` idempotency.
fn apply_command(
    st: &mut State,
    command: &Command,
    client_token: Option<String>,
    now: Millis,
    events: &mut Vec<Event>,
) -> Result<Outcome, LedgerError> {
    let Some(token) = client_token else {
        return st.apply(command, now, events);
    };
    if token.is_empty() || token.len() > 128 {
        return Err(LedgerError::InvalidParameter(
            "ClientToken must be 1 to 128 characters".into(),
        ));
    }
    let encoded = encode(command)?;
    if let Some(rec) = st.tokens.get(&token) {
        if rec.command != encoded {
            return Err(LedgerError::Conflict(format!(
                "ClientToken {token} was used for a different request"
            )));
        }
        return decode(&rec.outcome);
    }
    let outcome = st.apply(command, now, events)?;
    st.tokens.insert(
        token.clone(),
        TokenRecord {
            command: encoded,
            outcome: encode(&outcome)?,
            at: now,
        },
    );
    st.dirty.tokens.insert(token);
    Ok(outcome)
}

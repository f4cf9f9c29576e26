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
use super::state::{Dirty, State};
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
    /// What another node committed (etcd store only).
    Remote(super::etcd::Remote),
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
    spawn_with(tx, rx, move |rx| run(ctx, rx))
}

/// Starts a writer thread running `body` on the queue's receiving end.
pub fn spawn_with(
    tx: mpsc::Sender<Request>,
    rx: mpsc::Receiver<Request>,
    body: impl FnOnce(mpsc::Receiver<Request>) + Send + 'static,
) -> Result<WriterHandle, LedgerError> {
    let thread = thread::Builder::new()
        .name("ledger-writer".into())
        .spawn(move || body(rx))
        .map_err(|e| LedgerError::Unavailable(format!("starting the ledger writer: {e}")))?;
    Ok(WriterHandle {
        tx: Some(tx),
        thread: Some(thread),
    })
}

/// A request's answer, held back until the batch is durable.
pub enum Answer {
    Connect(Result<Admitted, Refusal>),
    Command(Result<Outcome, LedgerError>),
    Expiring(Result<Vec<CodeRecord>, LedgerError>),
    Audit,
    /// A snapshot has no place in a batch (`run` ends a batch with it).
    Misplaced,
}

impl Request {
    /// Sends the answer of a committed batch.
    pub fn answer(self, a: Answer) {
        match (self, a) {
            (Request::Connect { reply, .. }, Answer::Connect(r)) => {
                let _ = reply.send(r);
            }
            (Request::Command { reply, .. }, Answer::Command(r)) => {
                let _ = reply.send(r);
            }
            (Request::TakeExpiring { reply, .. }, Answer::Expiring(r)) => {
                let _ = reply.send(r);
            }
            (Request::Audit { reply, .. }, Answer::Audit) => {
                let _ = reply.send(Ok(()));
            }
            (r, _) => answer_unavailable(
                r,
                &LedgerError::Unavailable("a snapshot was taken into a batch".into()),
            ),
        }
    }

    /// Answers a request whose batch was not committed: a refusal wrote
    /// nothing and stays true; everything else is `e`.
    pub fn fail(self, a: Answer, e: &LedgerError) {
        match (self, a) {
            (Request::Connect { reply, .. }, Answer::Connect(Err(refusal))) => {
                let _ = reply.send(Err(refusal));
            }
            (Request::Command { reply, .. }, Answer::Command(Err(err))) => {
                let _ = reply.send(Err(err));
            }
            (r, _) => answer_unavailable(r, e),
        }
    }
}

/// Applies one request to the state: its answer, its records marked
/// dirty, its events pushed.
pub fn apply_one(
    st: &mut State,
    req: &Request,
    now: Millis,
    events: &mut Vec<Event>,
    pool_low: u64,
) -> Answer {
    match req {
        Request::Connect {
            product_key,
            device_key,
            ..
        } => Answer::Connect(
            st.connect(product_key, device_key, now, events, pool_low)
                .map(|(expire_at, consumed)| Admitted {
                    expire_at,
                    consumed,
                }),
        ),
        Request::Command {
            command,
            client_token,
            audit,
            ..
        } => {
            let r = apply_command(st, command, client_token.clone(), now, events);
            if let Some(entry) = audit {
                st.record_audit(entry.clone(), &r, now);
            }
            Answer::Command(r)
        }
        Request::TakeExpiring { window_ms, .. } => {
            Answer::Expiring(Ok(st.take_expiring(now, *window_ms, events)))
        }
        Request::Audit {
            entry,
            code,
            message,
            ..
        } => {
            st.append_audit(entry.clone(), code.clone(), message.clone(), now);
            Answer::Audit
        }
        Request::Snapshot { .. } | Request::Remote(_) => Answer::Misplaced,
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

pub fn answer_unavailable(r: Request, e: &LedgerError) {
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
        Request::Remote(_) => {}
    }
}

/// Applies, commits and answers one batch. Waiters are answered in every
/// case; an `Err` means the store failed (the in-memory state holds what
/// may not be on disk) and carries the error for every later write.
fn commit_batch(ctx: &WriterContext, pending: &mut Vec<Request>) -> Result<(), LedgerError> {
    let now = ctx.clock.now();
    let mut events: Vec<Event> = Vec::new();
    let mut st = ctx.state.write();
    let pool_low = ctx.options.pool_low_threshold;
    let answers: Vec<Answer> = pending
        .iter()
        .map(|r| apply_one(&mut st, r, now, &mut events, pool_low))
        .collect();
    if st.dirty.is_empty() {
        drop(st);
        finish(ctx, pending, answers, events);
        return Ok(());
    }
    let mut batch = sled::Batch::default();
    let started = std::time::Instant::now();
    let written = st
        .drain_dirty(&mut |(k, v)| match v {
            Some(v) => batch.insert(k, v),
            None => batch.remove(k),
        })
        .and_then(|dirty| {
            ctx.tree.apply_batch(batch)?;
            ctx.db.flush()?;
            ctx.files.sync()?;
            Ok(dirty)
        });
    if written.is_ok() {
        // Metrics facade: an observation each, no I/O (src/http/metrics.rs).
        metrics::histogram!("activation_ledger_commit_seconds")
            .record(started.elapsed().as_secs_f64());
        metrics::histogram!("activation_ledger_batch_size").record(answers.len() as f64);
    }
    match written {
        Ok(dirty) => {
            publish_fast(&ctx.fast, &st, &dirty);
            drop(st);
            finish(ctx, pending, answers, events);
            Ok(())
        }
        Err(e) => {
            for (r, a) in pending.drain(..).zip(answers) {
                r.fail(a, &e);
            }
            Err(fail_stop(ctx, &e))
        }
    }
}

/// Puts a committed batch's products and devices into the fast view.
pub fn publish_fast(fast: &FastView, st: &State, dirty: &Dirty) {
    for pk in &dirty.products {
        if let Some(p) = st.products.get(pk) {
            fast.put_product(p);
        }
    }
    for id in &dirty.devices {
        if let Some(d) = st.devices.get(id) {
            fast.put_device(d);
        }
    }
    if !dirty.devices.is_empty() {
        fast.devices_changed();
    }
}

/// Publishes the batch's events, then answers: whoever sees an answer can
/// rely on its events being out.
pub fn finish_with(
    events_bus: &EventBus,
    pending: &mut Vec<Request>,
    answers: Vec<Answer>,
    events: Vec<Event>,
) {
    for e in events {
        events_bus.publish(e);
    }
    for (r, a) in pending.drain(..).zip(answers) {
        r.answer(a);
    }
}

fn finish(
    ctx: &WriterContext,
    pending: &mut Vec<Request>,
    answers: Vec<Answer>,
    events: Vec<Event>,
) {
    finish_with(&ctx.events, pending, answers, events);
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

//! The etcd store: the ledger's records as etcd keys `prefix + store key`
//! (`store.rs`'s layout), shared by every broker node. Every commit is one
//! etcd transaction guarded by the mod revisions of the keys it writes and
//! of those its decision read (`Guard`): a key unchanged since the
//! replica saw it has a mod revision at most the replica's position (or
//! exactly the revision of this node's own commit), and a new key none.
//! Batches of different nodes that touch different keys (each node
//! consumes from its own lanes, `lanes.rs`) commit side by side; a batch
//! decided on a stale replica is refused, never applied. Admin commands
//! also put the `prefix + "!head"` key under the same guard, so they are
//! serialized among themselves.
//!
//! Every node holds a lease with its liveness key `prefix + "!node/" +
//! node`, kept alive on the client's runtime (a new lease when the old one
//! expired); a node whose key is gone is dead and its lanes go back to the
//! pool.
//!
//! Every node keeps its replica current through a watch on the prefix
//! (`watch`); a watch that falls behind compaction asks for a reload.
//! The client runs on its own small runtime; the ledger writer, a plain
//! thread, blocks on it (never an I/O thread).

use std::collections::BTreeSet;
use std::time::Duration;

use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, EventType, GetOptions, Txn, TxnOp, TxnOpResponse,
    WatchOptions,
};
use tokio::runtime::Runtime;
use tokio::sync::mpsc;

use super::records::Write;
use super::writer::Request;
use super::LedgerError;

/// Where the etcd store is and who this node is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EtcdOptions {
    pub endpoints: Vec<String>,
    /// Unique per broker node (logs, the head's value).
    pub node: String,
    /// Every key of the ledger starts with it.
    pub prefix: String,
    /// Longest wait for one etcd call; past it the outcome is unknown.
    pub timeout: Duration,
    /// Most codes (and code ids) one lane reservation takes.
    pub lane_block: u64,
    /// The liveness lease's time to live.
    pub lease_ttl: Duration,
}

/// Records read at one revision.
pub struct Loaded {
    pub records: Vec<(Vec<u8>, Vec<u8>)>,
    /// The nodes whose liveness key exists.
    pub live_nodes: BTreeSet<String>,
    /// The revision they were read at: a watch takes over after it.
    pub revision: i64,
}

/// What a transaction expects of one key's mod revision (a key absent
/// has none: 0).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expect {
    /// Unchanged since the replica's position: at most this revision.
    AtMost(i64),
    /// Last written by this node's own commit at this revision.
    Exactly(i64),
    /// Absent (a dead node's liveness key).
    Absent,
}

/// One key a transaction is guarded by (a store key, without the prefix).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Guard {
    pub key: Vec<u8>,
    pub expect: Expect,
}

/// How a commit ended.
pub enum Commit {
    /// Committed at this revision.
    Done(i64),
    /// Another node committed first: nothing was written.
    Stale(Refused),
    /// Timeout, lost connection, leader change: written or not, unknown.
    Unknown(String),
}

/// What the watch tells the writer.
pub enum Remote {
    /// The records one commit at `revision` wrote.
    Changes { revision: i64, writes: Vec<Write> },
    /// The watch missed changes (compaction, a broken stream): reload.
    Reload(String),
}

/// What was read right after a refusal, at one revision, so the writer
/// catches up without reading the whole ledger.
pub struct Refused {
    /// The newest mod revision of the guarded keys now: the replica holds
    /// what refused the batch once the watch brought it there; 0 if
    /// unknown.
    pub wait: i64,
    /// The records the batch wrote as they were when the batch was
    /// decided (`None`: absent), in the batch's order; `None` when etcd no
    /// longer holds that revision (compacted): reload.
    pub before: Option<Vec<Write>>,
}

/// The key admin commands put (and are guarded by).
pub const HEAD: &[u8] = b"!head";
/// Liveness keys: `!node/<node>`, under each node's lease.
pub const NODE: &[u8] = b"!node/";
const PAGE: i64 = 5_000;

#[path = "etcd_lease.rs"]
mod lease;

pub struct EtcdStore {
    rt: Runtime,
    client: Client,
    prefix: Vec<u8>,
    options: EtcdOptions,
}

fn unavailable(what: &str, e: impl std::fmt::Display) -> LedgerError {
    LedgerError::Unavailable(format!("etcd: {what}: {e}"))
}

/// The first key after every key starting with `prefix`.
fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

impl EtcdStore {
    /// Connects to the cluster (fails if no endpoint answers in time).
    pub fn connect(options: EtcdOptions) -> Result<EtcdStore, LedgerError> {
        if options.endpoints.is_empty() {
            return Err(LedgerError::InvalidParameter(
                "ledger.etcd.endpoints names no endpoint".into(),
            ));
        }
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("etcd-client")
            .enable_all()
            .build()
            .map_err(|e| unavailable("starting the client runtime", e))?;
        let connect = ConnectOptions::new()
            .with_connect_timeout(options.timeout)
            .with_timeout(options.timeout)
            .with_keep_alive(Duration::from_secs(2), options.timeout)
            .with_require_leader(true);
        let endpoints = options.endpoints.clone();
        let client = rt
            .block_on(async {
                tokio::time::timeout(options.timeout, Client::connect(endpoints, Some(connect)))
                    .await
            })
            .map_err(|_| unavailable("connecting", "timed out"))?
            .map_err(|e| unavailable("connecting", e))?;
        Ok(EtcdStore {
            rt,
            client,
            prefix: options.prefix.as_bytes().to_vec(),
            options,
        })
    }

    pub fn node(&self) -> &str {
        &self.options.node
    }

    /// The longest wait for one etcd call.
    pub fn timeout(&self) -> Duration {
        self.options.timeout
    }

    fn full_key(&self, key: &[u8]) -> Vec<u8> {
        [self.prefix.as_slice(), key].concat()
    }

    /// Every record of the ledger at one revision, page by page.
    pub fn load(&self) -> Result<Loaded, LedgerError> {
        let mut kv = self.client.kv_client();
        let end = prefix_end(&self.prefix);
        let timeout = self.options.timeout;
        self.rt.block_on(async move {
            let mut records = Vec::new();
            let mut live_nodes = BTreeSet::new();
            let mut from = self.prefix.clone();
            let mut revision = 0;
            loop {
                let opts = GetOptions::new()
                    .with_range(end.clone())
                    .with_limit(PAGE)
                    .with_revision(revision);
                let mut resp = tokio::time::timeout(timeout, kv.get(from.clone(), Some(opts)))
                    .await
                    .map_err(|_| unavailable("reading the ledger", "timed out"))?
                    .map_err(|e| unavailable("reading the ledger", e))?;
                if revision == 0 {
                    revision = resp.header().map_or(0, |h| h.revision());
                }
                let more = resp.more();
                let kvs = resp.take_kvs();
                let Some(last) = kvs.last().map(|k| k.key().to_vec()) else {
                    break;
                };
                for item in kvs {
                    let (k, v) = item.into_key_value();
                    let k = k[self.prefix.len()..].to_vec();
                    if let Some(node) = k.strip_prefix(NODE) {
                        live_nodes.insert(String::from_utf8_lossy(node).into_owned());
                    } else if k != HEAD {
                        records.push((k, v));
                    }
                }
                if !more {
                    break;
                }
                from = last;
                from.push(0);
            }
            Ok(Loaded {
                records,
                live_nodes,
                revision,
            })
        })
    }

    /// One transaction: if every guard holds, every write (and, with
    /// `head`, the head key, which the caller guards). `pre[i]` is the
    /// revision write `i`'s pre-image is read at if refused (0: the key
    /// did not exist). If refused, a second read takes each guarded key's
    /// mod revision now and the pre-images. With no writes
    /// it only checks the guards (a refusal decided on the replica holds
    /// only if they do).
    pub fn commit(&self, writes: Vec<Write>, pre: &[i64], guards: &[Guard], head: bool) -> Commit {
        let mut compares = Vec::with_capacity(guards.len());
        let mut reads = Vec::with_capacity(guards.len() + writes.len());
        for g in guards {
            let key = self.full_key(&g.key);
            compares.push(match g.expect {
                Expect::AtMost(r) => Compare::mod_revision(key.clone(), CompareOp::Less, r + 1),
                Expect::Exactly(r) => Compare::mod_revision(key.clone(), CompareOp::Equal, r),
                Expect::Absent => Compare::version(key.clone(), CompareOp::Equal, 0),
            });
            reads.push(TxnOp::get(key, Some(GetOptions::new().with_keys_only())));
        }
        let mut ops = Vec::with_capacity(writes.len() + 1);
        let mut keys = Vec::with_capacity(writes.len());
        for (i, (k, v)) in writes.into_iter().enumerate() {
            let key = self.full_key(&k);
            let at = pre.get(i).copied().unwrap_or(0);
            if at > 0 {
                reads.push(TxnOp::get(
                    key.clone(),
                    Some(GetOptions::new().with_revision(at)),
                ));
            }
            ops.push(match v {
                Some(v) => TxnOp::put(key, v, None),
                None => TxnOp::delete(key, None),
            });
            keys.push((k, at));
        }
        if head {
            ops.push(TxnOp::put(
                self.full_key(HEAD),
                self.options.node.as_bytes().to_vec(),
                None,
            ));
        }
        // The reads go in a second round trip, only when refused (rare):
        // a transaction is replicated whole, its failure branch too.
        let txn = Txn::new().when(compares).and_then(ops);
        let mut kv = self.client.kv_client();
        let timeout = self.options.timeout;
        let r = self
            .rt
            .block_on(async move { tokio::time::timeout(timeout, kv.txn(txn)).await });
        match r {
            Err(_) => Commit::Unknown(format!("no answer from etcd within {timeout:?}")),
            Ok(Err(e)) => Commit::Unknown(e.to_string()),
            Ok(Ok(resp)) if resp.succeeded() => {
                Commit::Done(resp.header().map_or(0, |h| h.revision()))
            }
            Ok(Ok(_)) => Commit::Stale(self.read_refused(reads, guards.len(), keys)),
        }
    }

    /// After a refusal: the guarded keys' revisions now and the written
    /// records' pre-images, in one read at one revision. Unreadable
    /// (compacted, etcd gone): no pre-images, so the writer reloads.
    fn read_refused(&self, reads: Vec<TxnOp>, guards: usize, keys: Vec<(Vec<u8>, i64)>) -> Refused {
        let mut kv = self.client.kv_client();
        let timeout = self.options.timeout;
        let txn = Txn::new().and_then(reads);
        let r = self
            .rt
            .block_on(async move { tokio::time::timeout(timeout, kv.txn(txn)).await });
        match r {
            Ok(Ok(resp)) => refused(&resp, guards, keys),
            Ok(Err(e)) if refused_compacted(&e) => Refused {
                wait: 0,
                before: None,
            },
            Ok(Err(e)) => {
                tracing::warn!(node = self.options.node, error = %e, "reading a refused batch's keys failed");
                Refused {
                    wait: 0,
                    before: None,
                }
            }
            Err(_) => Refused {
                wait: 0,
                before: None,
            },
        }
    }

    /// Runs `f` on the client's runtime for at most `wait`; `None` if it
    /// did not finish in time.
    pub fn wait_for<F: std::future::Future>(&self, wait: Duration, f: F) -> Option<F::Output> {
        self.rt
            .block_on(async move { tokio::time::timeout(wait, f).await.ok() })
    }

    /// Watches the ledger's keys from revision `from` on, sending each
    /// commit's records (in revision order) to the writer until it stops.
    /// A broken stream is watched again from where it stopped; one that
    /// fell behind compaction asks the writer to reload.
    pub fn watch(&self, from: i64, tx: mpsc::WeakSender<Request>) {
        let client = self.client.clone();
        let prefix = self.prefix.clone();
        let node = self.options.node.clone();
        self.rt.spawn(async move {
            let mut next = from;
            loop {
                match watch_once(&client, &prefix, &mut next, &tx).await {
                    Ok(()) => return,
                    Err(WatchEnd::Broken(why)) => {
                        tracing::warn!(node, reason = %why, "etcd watch broken; watching again");
                    }
                    Err(WatchEnd::Compacted(rev, why)) => {
                        tracing::warn!(node, reason = %why, "etcd watch behind compaction; reloading the replica");
                        let Some(tx) = tx.upgrade() else { return };
                        if tx.send(Request::Remote(Remote::Reload(why))).await.is_err() {
                            return;
                        }
                        next = rev;
                    }
                }
                // Not a synchronisation: a pause before watching again a
                // cluster that just failed.
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        });
    }
}

/// A refused transaction's reads: `guards` keys' mod revisions now, then
/// the pre-image of each written key read at its revision (`at` 0: none).
fn refused(resp: &etcd_client::TxnResponse, guards: usize, keys: Vec<(Vec<u8>, i64)>) -> Refused {
    let mut gets = resp.op_responses().into_iter().map(|r| match r {
        TxnOpResponse::Get(g) => Some(g),
        _ => None,
    });
    let mut wait = 0;
    for _ in 0..guards {
        let Some(g) = gets.next().flatten() else {
            return Refused {
                wait: 0,
                before: None,
            };
        };
        if let Some(kv) = g.kvs().first() {
            wait = wait.max(kv.mod_revision());
        }
    }
    let mut before = Vec::with_capacity(keys.len());
    for (k, at) in keys {
        if at == 0 {
            before.push((k, None));
            continue;
        }
        let Some(g) = gets.next().flatten() else {
            return Refused { wait, before: None };
        };
        let v = g.kvs().first().map(|kv| kv.value().to_vec());
        before.push((k, v));
    }
    Refused {
        wait,
        before: Some(before),
    }
}

/// etcd refuses a transaction whose taken branch reads a compacted
/// revision as a whole: nothing was written.
fn refused_compacted(e: &etcd_client::Error) -> bool {
    e.to_string()
        .contains("required revision has been compacted")
}

enum WatchEnd {
    Broken(String),
    Compacted(i64, String),
}

/// Runs one watch stream until it fails or the writer is gone (`Ok`).
async fn watch_once(
    client: &Client,
    prefix: &[u8],
    next: &mut i64,
    tx: &mpsc::WeakSender<Request>,
) -> Result<(), WatchEnd> {
    let mut wc = client.watch_client();
    let mut opts = WatchOptions::new().with_range(prefix_end(prefix));
    if *next > 0 {
        opts = opts.with_start_revision(*next);
    }
    let mut stream = wc
        .watch(prefix.to_vec(), Some(opts))
        .await
        .map_err(|e| WatchEnd::Broken(format!("starting the watch: {e}")))?;
    let head: Vec<u8> = [prefix, HEAD].concat();
    loop {
        let resp = match stream.message().await {
            Ok(Some(r)) => r,
            Ok(None) => return Err(WatchEnd::Broken("the watch stream closed".into())),
            Err(e) => return Err(WatchEnd::Broken(format!("the watch failed: {e}"))),
        };
        if resp.canceled() {
            let why = format!(
                "the watch was cancelled (compacted at revision {}): {}",
                resp.compact_revision(),
                resp.cancel_reason()
            );
            return Err(if resp.compact_revision() > 0 {
                WatchEnd::Compacted(resp.compact_revision(), why)
            } else {
                WatchEnd::Broken(why)
            });
        }
        let mut current: Option<(i64, Vec<Write>)> = None;
        for ev in resp.events() {
            let Some(kv) = ev.kv() else { continue };
            let rev = kv.mod_revision();
            if current.as_ref().is_some_and(|(r, _)| *r != rev) {
                if let Some((revision, writes)) = current.take() {
                    if !send(tx, Remote::Changes { revision, writes }).await {
                        return Ok(());
                    }
                }
            }
            let entry = current.get_or_insert_with(|| (rev, Vec::new()));
            *next = rev + 1;
            if kv.key() == head.as_slice() {
                continue;
            }
            let key = kv.key()[prefix.len()..].to_vec();
            entry.1.push(match ev.event_type() {
                EventType::Put => (key, Some(kv.value().to_vec())),
                EventType::Delete => (key, None),
            });
        }
        if let Some((revision, writes)) = current {
            if !send(tx, Remote::Changes { revision, writes }).await {
                return Ok(());
            }
        }
    }
}

/// Hands a change to the writer; `false` once the writer is gone (the
/// watch holds no strong sender, so it never keeps the writer alive).
async fn send(tx: &mpsc::WeakSender<Request>, change: Remote) -> bool {
    match tx.upgrade() {
        Some(tx) => tx.send(Request::Remote(change)).await.is_ok(),
        None => false,
    }
}

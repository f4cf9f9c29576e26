//! The node's lease (etcd store): a liveness key `prefix + "!node/" +
//! node` under a lease kept alive on the client's runtime; when the lease
//! is found expired (the node was paused past it) a new one is taken.
//! Other nodes return a node's lanes to the pool once its key is gone.

use std::time::Duration;

use etcd_client::{Client, PutOptions};

use super::{unavailable, EtcdStore, NODE};
use crate::ledger::LedgerError;

/// The longest a node waits at start-up for its first lease.
const FIRST_LEASE_WAIT: Duration = Duration::from_secs(30);

impl EtcdStore {
    /// Takes a lease and puts this node's liveness key under it, then
    /// keeps it alive on the client's runtime; when the lease is found
    /// expired (the node was paused past it) a new one is taken. Fails if
    /// the first lease cannot be had.
    pub fn hold_lease(&self) -> Result<(), LedgerError> {
        let ttl = self.options.lease_ttl.as_secs().max(1) as i64;
        let key = self.full_key(&[NODE, self.options.node.as_bytes()].concat());
        let client = self.client.clone();
        let timeout = self.options.timeout;
        // A cluster that just elected a leader may not know a lease it
        // granted yet ("lease not found"): tried again until the deadline.
        let first = self.rt.block_on(async {
            // At start-up the cluster may be electing a leader or catching
            // up a restarted member: the first lease is asked for up to
            // `FIRST_LEASE_WAIT` (or the call timeout, if longer).
            let deadline = tokio::time::Instant::now() + timeout.max(FIRST_LEASE_WAIT);
            loop {
                let left = deadline.saturating_duration_since(tokio::time::Instant::now());
                let e = match tokio::time::timeout(left, grant(&client, &key, ttl)).await {
                    Ok(Ok(id)) => return Ok(id),
                    Ok(Err(e)) => e.to_string(),
                    Err(_) => "timed out".to_owned(),
                };
                if tokio::time::Instant::now() + Duration::from_millis(200) >= deadline {
                    return Err(unavailable("taking the node's lease", e));
                }
                // Not a synchronisation: a pause before asking again.
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        })?;
        let node = self.options.node.clone();
        self.rt.spawn(async move {
            let mut lease = first;
            loop {
                match keep_alive(&client, lease, ttl).await {
                    Ok(()) => tracing::warn!(node, "the node's lease expired; taking a new one"),
                    Err(e) => {
                        tracing::warn!(node, error = %e, "keeping the node's lease alive failed")
                    }
                }
                loop {
                    match grant(&client, &key, ttl).await {
                        Ok(id) => {
                            lease = id;
                            break;
                        }
                        Err(e) => {
                            tracing::warn!(node, error = %e, "taking a new lease failed");
                            // Not a synchronisation: a pause before asking a
                            // cluster that just failed again.
                            tokio::time::sleep(Duration::from_millis(500)).await;
                        }
                    }
                }
            }
        });
        Ok(())
    }
}

/// A new lease with the liveness key `key` put under it.
async fn grant(client: &Client, key: &[u8], ttl: i64) -> Result<i64, etcd_client::Error> {
    let mut leases = client.lease_client();
    let id = leases.grant(ttl, None).await?.id();
    let mut kv = client.kv_client();
    kv.put(
        key.to_vec(),
        Vec::new(),
        Some(PutOptions::new().with_lease(id)),
    )
    .await?;
    Ok(id)
}

/// Keeps lease `id` alive (a third of its time to live between two
/// renewals); `Ok` once etcd says it expired.
async fn keep_alive(client: &Client, id: i64, ttl: i64) -> Result<(), etcd_client::Error> {
    let mut leases = client.lease_client();
    let (mut keeper, mut stream) = leases.keep_alive(id).await?;
    let every = Duration::from_millis((ttl as u64 * 1000 / 3).max(100));
    loop {
        keeper.keep_alive().await?;
        match stream.message().await? {
            Some(r) if r.ttl() > 0 => {}
            Some(_) => return Ok(()),
            None => {
                return Err(etcd_client::Error::LeaseKeepAliveError(
                    "the keep-alive stream closed".into(),
                ))
            }
        }
        // The renewal period, not a synchronisation.
        tokio::time::sleep(every).await;
    }
}

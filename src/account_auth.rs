//! Glue for the accounts listener: an [`Authenticator`] that checks an
//! operator's or application's user name and argon2 password and gives the
//! session its topic rules. Account sessions get client ids of their own
//! (`acct:{name}:{id}`) so they can never take over a device's session:
//! device client ids are `{ProductKey}.{DeviceKey}` and a ProductKey cannot
//! contain `:`.
//!
//! Limits: at most `max_pending_logins` logins verify or wait for argon2
//! at once (more get 0x89 Server busy at once, never an unbounded queue),
//! and one account holds at most `max_sessions_per_account` client ids,
//! live or stored by the router (one more gets 0x97 Quota exceeded).

use std::collections::HashSet;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use tokio::sync::Semaphore;

use crate::admin::Accounts;
use crate::config::AccountLimits;
use crate::gateway::{
    Acl, Admission, AuthFuture, Authenticator, ConnectInfo, Gateway, Identity, RefusalCode,
    Rejection,
};

/// argon2 verifications at once: each costs tens of milliseconds of CPU,
/// so a flood of logins must not starve the device path.
const CONCURRENT_VERIFICATIONS: usize = 2;

pub struct AccountAuthenticator {
    accounts: Arc<Accounts>,
    verifying: Arc<Semaphore>,
    /// Logins verifying or waiting to.
    pending: Arc<AtomicUsize>,
    limits: AccountLimits,
    /// Where live and stored sessions are counted (none: no session cap).
    gateway: Option<Gateway>,
    seq: AtomicU64,
}

impl AccountAuthenticator {
    /// With the default [`AccountLimits`] and no session cap.
    pub fn new(accounts: Arc<Accounts>) -> Self {
        AccountAuthenticator {
            accounts,
            verifying: Arc::new(Semaphore::new(CONCURRENT_VERIFICATIONS)),
            pending: Arc::new(AtomicUsize::new(0)),
            limits: AccountLimits::default(),
            gateway: None,
            seq: AtomicU64::new(0),
        }
    }

    /// Applies `limits`, counting each account's sessions in `gateway`.
    pub fn with_limits(mut self, gateway: Gateway, limits: AccountLimits) -> Self {
        self.gateway = Some(gateway);
        self.limits = limits;
        self
    }
}

fn bad_login() -> Rejection {
    Rejection::new(
        RefusalCode::BadUserNameOrPassword,
        "unknown account or wrong password",
    )
}

/// One login among the pending ones; counted out on drop.
struct PendingLogin(Arc<AtomicUsize>);

impl Drop for PendingLogin {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Refuses `client_id` if `account` already holds `max` other client ids,
/// live or stored (0 = no cap). Reconnecting to one of them is allowed.
fn check_session_cap(
    gateway: &Gateway,
    account: &str,
    client_id: &str,
    max: usize,
) -> Result<(), Rejection> {
    if max == 0 {
        return Ok(());
    }
    let prefix = format!("acct:{account}:");
    let mut held: HashSet<String> = gateway.stored_client_ids(&prefix).into_iter().collect();
    held.extend(gateway.online().client_ids_where(
        |s| matches!(&s.identity, Identity::Account { name } if name == account),
    ));
    if held.len() >= max && !held.contains(client_id) {
        return Err(Rejection::new(
            RefusalCode::QuotaExceeded,
            format!(
                "account {account} holds its maximum of {max} sessions (live or stored); \
                 reuse a client id or end a stored session with a clean one"
            ),
        ));
    }
    Ok(())
}

impl Authenticator for AccountAuthenticator {
    fn admits_accounts(&self) -> bool {
        true
    }

    fn authenticate(&self, info: ConnectInfo) -> AuthFuture {
        let accounts = self.accounts.clone();
        let verifying = self.verifying.clone();
        let gateway = self.gateway.clone();
        let max_sessions = self.limits.max_sessions_per_account;
        let n = self.seq.fetch_add(1, Ordering::Relaxed);
        // Counted in before anything else: a login flood is refused at
        // once instead of queueing without bound.
        let queued = self.pending.fetch_add(1, Ordering::Relaxed);
        let pending = PendingLogin(self.pending.clone());
        let max_pending = self.limits.max_pending_logins;
        Box::pin(async move {
            let _pending = pending;
            if queued >= max_pending {
                return Err(Rejection::new(
                    RefusalCode::ServerBusy,
                    format!("{max_pending} logins are being verified; try again later"),
                ));
            }
            let name = info.username.clone().ok_or_else(bad_login)?;
            let password = info
                .password
                .as_deref()
                .and_then(|p| std::str::from_utf8(p).ok())
                .map(str::to_owned)
                .ok_or_else(bad_login)?;
            let _permit = verifying
                .acquire_owned()
                .await
                .map_err(|_| Rejection::new(RefusalCode::ServerUnavailable, "shutting down"))?;
            let account =
                tokio::task::spawn_blocking(move || accounts.authenticate(&name, &password))
                    .await
                    .map_err(|e| Rejection::new(RefusalCode::ServerUnavailable, e.to_string()))?
                    .ok_or_else(bad_login)?;
            let rules = account.topic_rules();
            let own = if info.client_id.is_empty() {
                format!("s{n}")
            } else {
                info.client_id.clone()
            };
            let client_id = format!("acct:{}:{own}", account.name);
            if let Some(gw) = &gateway {
                check_session_cap(gw, &account.name, &client_id, max_sessions)?;
            }
            Ok(Admission {
                client_id,
                identity: Identity::Account {
                    name: account.name.clone(),
                },
                acl: Acl {
                    publish: rules.publish,
                    subscribe: rules.subscribe,
                    deny_publish: rules.deny_publish,
                    deny_subscribe: rules.deny_subscribe,
                },
            })
        })
    }
}

//! Glue for the accounts listener: an [`Authenticator`] that checks an
//! operator's or application's user name and argon2 password and gives the
//! session its topic rules. Account sessions get client ids of their own
//! (`acct:{name}:{id}`) so they can never take over a device's session:
//! device client ids are `{ProductKey}.{DeviceKey}` and a ProductKey cannot
//! contain `:`.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use tokio::sync::Semaphore;

use crate::admin::Accounts;
use crate::gateway::{
    Acl, Admission, AuthFuture, Authenticator, ConnectInfo, Identity, RefusalCode, Rejection,
};

/// argon2 verifications at once: each costs tens of milliseconds of CPU,
/// so a flood of logins must not starve the device path.
const CONCURRENT_VERIFICATIONS: usize = 2;

pub struct AccountAuthenticator {
    accounts: Arc<Accounts>,
    verifying: Arc<Semaphore>,
    seq: AtomicU64,
}

impl AccountAuthenticator {
    pub fn new(accounts: Arc<Accounts>) -> Self {
        AccountAuthenticator {
            accounts,
            verifying: Arc::new(Semaphore::new(CONCURRENT_VERIFICATIONS)),
            seq: AtomicU64::new(0),
        }
    }
}

fn bad_login() -> Rejection {
    Rejection::new(
        RefusalCode::BadUserNameOrPassword,
        "unknown account or wrong password",
    )
}

impl Authenticator for AccountAuthenticator {
    fn authenticate(&self, info: ConnectInfo) -> AuthFuture {
        let accounts = self.accounts.clone();
        let verifying = self.verifying.clone();
        let n = self.seq.fetch_add(1, Ordering::Relaxed);
        Box::pin(async move {
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
            Ok(Admission {
                client_id: format!("acct:{}:{own}", account.name),
                identity: Identity::Account {
                    name: account.name.clone(),
                },
                acl: Acl {
                    publish: rules.publish,
                    subscribe: rules.subscribe,
                    deny: Vec::new(),
                },
            })
        })
    }
}

//! Operator and application accounts (SPEC §4).
//!
//! Configured as `[[accounts]]` tables in the broker's TOML config:
//!
//! ```toml
//! [[accounts]]
//! name = "ops"
//! password_hash = "$argon2id$v=19$..."   # activation-broker admin hash-password
//! role = "admin"            # "admin" | "viewer" | "none" | ["DescribeProducts", ...]
//! publish = ["devices/+/+/command/#"]
//! subscribe = ["#"]         # every data topic: `#` never reaches admin/…
//! deny_subscribe = ["devices/+/+/secrets/#"]   # checked before `subscribe`
//! deny_publish = []                            # checked before `publish`
//! events = true             # may read admin/v1/events/#
//! ```
//!
//! Admin topics behave like MQTT's `$` topics: a filter whose first level
//! is a wildcard never matches `admin/…` (see `gateway::acl`), so `#` and
//! `+/+` are data-topic rights; a right naming `admin/…` is refused.
//!
//! With no account configured, the first start creates `admin` (role admin,
//! events) with a random password, prints `admin password: <password>`
//! once and keeps only its argon2 hash in `<data>/accounts.toml`, which
//! later starts load.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

use anyhow::{bail, Context};
use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::Argon2;
use rand::distributions::{Alphanumeric, DistString};
use rand::RngCore;
use serde::{Deserialize, Serialize};

use super::actions::{access_of, Access, ACTIONS};
use crate::gateway::acl::{filters_overlap, topic_matches, valid_filter};

/// File under the data dir holding the generated `admin` account.
pub const GENERATED_FILE: &str = "accounts.toml";
/// Name of the generated account.
pub const BOOTSTRAP_ACCOUNT: &str = "admin";
/// Length of the generated password (alphanumeric: ~143 bits).
const GENERATED_PASSWORD_LEN: usize = 24;
/// Longest topic filter in an account's lists.
const MAX_FILTER_LEN: usize = 256;

/// Argon2id PHC string of `plain` with a random salt.
pub fn hash_password(plain: &str) -> String {
    let mut salt = [0u8; 16];
    rand::rngs::OsRng.fill_bytes(&mut salt);
    let hashed = SaltString::encode_b64(&salt).and_then(|salt| {
        Argon2::default()
            .hash_password(plain.as_bytes(), &salt)
            .map(|h| h.to_string())
    });
    match hashed {
        Ok(h) => h,
        // Only reachable with invalid argon2 parameters, which the defaults
        // are not; an unusable hash verifies nothing.
        Err(e) => format!("!invalid hash: {e}"),
    }
}

/// Whether `plain` matches the PHC string `hash`. A malformed hash matches
/// nothing.
pub fn verify_password(hash: &str, plain: &str) -> bool {
    match PasswordHash::new(hash) {
        Ok(parsed) => Argon2::default()
            .verify_password(plain.as_bytes(), &parsed)
            .is_ok(),
        Err(_) => false,
    }
}

/// An account as written in the config.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AccountConfig {
    pub name: String,
    pub password_hash: String,
    #[serde(default)]
    pub role: RoleConfig,
    #[serde(default)]
    pub publish: Vec<String>,
    #[serde(default)]
    pub subscribe: Vec<String>,
    /// Topics carved out of `publish` (checked first).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub deny_publish: Vec<String>,
    /// Topics carved out of `subscribe` (checked first): no subscription
    /// inside them, no delivery from them through a wider one.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub deny_subscribe: Vec<String>,
    #[serde(default)]
    pub events: bool,
}

/// `role = "admin" | "viewer" | "none"` or a list of action names.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum RoleConfig {
    Named(String),
    Actions(Vec<String>),
}

impl Default for RoleConfig {
    fn default() -> Self {
        RoleConfig::Named("none".into())
    }
}

/// What admin actions an account may call.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Role {
    /// Every action.
    Admin,
    /// Describe* actions only.
    Viewer,
    /// No action.
    None,
    /// Exactly these actions.
    Actions(BTreeSet<String>),
}

impl Role {
    fn from_config(role: &RoleConfig, account: &str) -> anyhow::Result<Role> {
        match role {
            RoleConfig::Named(n) => match n.as_str() {
                "admin" => Ok(Role::Admin),
                "viewer" => Ok(Role::Viewer),
                "none" => Ok(Role::None),
                other => bail!(
                    "accounts.role of account {account}: {other:?} is not admin, viewer, none or a list of actions"
                ),
            },
            RoleConfig::Actions(list) => {
                let mut set = BTreeSet::new();
                for a in list {
                    if access_of(a).is_none() {
                        bail!("accounts.role of account {account}: unknown action {a:?}");
                    }
                    set.insert(a.clone());
                }
                Ok(Role::Actions(set))
            }
        }
    }

    fn allows(&self, action: &str) -> bool {
        match self {
            Role::Admin => access_of(action).is_some(),
            Role::Viewer => access_of(action).is_some_and(Access::is_read),
            Role::None => false,
            Role::Actions(set) => set.contains(action),
        }
    }
}

/// A loaded account.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Account {
    pub name: String,
    pub password_hash: String,
    pub role: Role,
    /// Extra topic filters it may publish to (data topics).
    pub publish: Vec<String>,
    /// Extra topic filters it may subscribe to (data topics).
    pub subscribe: Vec<String>,
    /// Topics it may not publish to, whatever `publish` says.
    pub deny_publish: Vec<String>,
    /// Topics it may not subscribe to or receive, whatever `subscribe` says.
    pub deny_subscribe: Vec<String>,
    /// May read `admin/v1/events/#`.
    pub events: bool,
}

/// The topic filters an account may use on the accounts listener.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicRules {
    pub publish: Vec<String>,
    pub subscribe: Vec<String>,
    pub deny_publish: Vec<String>,
    pub deny_subscribe: Vec<String>,
}

impl Account {
    /// An account with no usable password (tests, tools).
    pub fn new(name: &str, role: Role) -> Account {
        Account {
            name: name.to_owned(),
            password_hash: String::new(),
            role,
            publish: Vec::new(),
            subscribe: Vec::new(),
            deny_publish: Vec::new(),
            deny_subscribe: Vec::new(),
            events: false,
        }
    }

    fn from_config(c: &AccountConfig) -> anyhow::Result<Account> {
        if !valid_account_name(&c.name) {
            bail!(
                "accounts.name {:?}: must match [A-Za-z0-9_-]{{1,32}} and not be \"events\"",
                c.name
            );
        }
        if PasswordHash::new(&c.password_hash).is_err() {
            bail!(
                "accounts.password_hash of account {}: not an argon2 PHC string (make one with `activation-broker admin hash-password`)",
                c.name
            );
        }
        for (key, list) in [
            ("publish", &c.publish),
            ("subscribe", &c.subscribe),
            ("deny_publish", &c.deny_publish),
            ("deny_subscribe", &c.deny_subscribe),
        ] {
            for f in list {
                if let Err(why) = check_filter(f) {
                    bail!("accounts.{key} of account {}: {f:?} {why}", c.name);
                }
                if !key.starts_with("deny") && reaches_admin_topics(f) {
                    bail!(
                        "accounts.{key} of account {}: {f:?} names the admin topics (admin/…) or a $-topic; \
                         list data topics only (wildcards such as \"#\" never match admin/…)",
                        c.name
                    );
                }
            }
        }
        Ok(Account {
            name: c.name.clone(),
            password_hash: c.password_hash.clone(),
            role: Role::from_config(&c.role, &c.name)?,
            publish: c.publish.clone(),
            subscribe: c.subscribe.clone(),
            deny_publish: c.deny_publish.clone(),
            deny_subscribe: c.deny_subscribe.clone(),
            events: c.events,
        })
    }

    /// Whether the account may call `action`.
    pub fn may(&self, action: &str) -> bool {
        self.role.allows(action)
    }

    pub fn verify(&self, password: &str) -> bool {
        verify_password(&self.password_hash, password)
    }

    pub fn request_topic(&self) -> String {
        request_topic(&self.name)
    }

    pub fn response_topic(&self) -> String {
        response_topic(&self.name)
    }

    /// What it may do on the accounts listener: publish its request topic
    /// and its `publish` list; subscribe its response topic (and below it,
    /// for MQTT 5 Response Topics), `admin/v1/events/#` if `events`, and
    /// its `subscribe` list.
    pub fn topic_rules(&self) -> TopicRules {
        let mut publish = vec![self.request_topic()];
        publish.extend(self.publish.iter().cloned());
        let mut subscribe = vec![
            self.response_topic(),
            format!("{}/#", self.response_topic()),
        ];
        if self.events {
            subscribe.push(EVENTS_FILTER.to_owned());
        }
        subscribe.extend(self.subscribe.iter().cloned());
        TopicRules {
            publish,
            subscribe,
            deny_publish: self.deny_publish.clone(),
            deny_subscribe: self.deny_subscribe.clone(),
        }
    }

    /// Whether the admin service may answer on `topic`, an MQTT 5 Response
    /// Topic this account asked for: its own response topic (or below it),
    /// or a data topic it may publish to itself. Never another admin topic.
    pub fn may_receive_on(&self, topic: &str) -> bool {
        if topic.is_empty()
            || topic.len() > MAX_FILTER_LEN
            || topic.contains(['+', '#', '\0'])
            || topic.starts_with('$')
        {
            return false;
        }
        let own = self.response_topic();
        if topic == own
            || topic
                .strip_prefix(own.as_str())
                .is_some_and(|r| r.starts_with('/'))
        {
            return true;
        }
        !topic.starts_with("admin/")
            && !self.deny_publish.iter().any(|f| topic_matches(topic, f))
            && self.publish.iter().any(|f| topic_matches(topic, f))
    }
}

pub use activation_client::admin::{request_topic, response_topic, EVENTS_FILTER};

/// Every admin topic (requests, responses, events).
pub const ADMIN_FILTER: &str = "admin/#";

/// Whether topic filter `f` (valid) could reach an admin topic or a
/// `$`-topic: the data-topic lists of accounts must not. Filters starting
/// with a wildcard never do (they skip `admin/…` as they skip `$…`).
pub fn reaches_admin_topics(f: &str) -> bool {
    f.starts_with('$') || filters_overlap(f, ADMIN_FILTER)
}

/// Whether a device namespace template's pattern (placeholder levels as
/// `+`, see `gateway::acl::template_pattern`) could reach an admin topic
/// once rendered: a placeholder at the first level could render as `admin`.
pub fn template_reaches_admin_topics(pattern: &str) -> bool {
    pattern.starts_with('+') || pattern.starts_with('#') || reaches_admin_topics(pattern)
}

/// `[A-Za-z0-9_-]{1,32}`, and not `events` (whose topics are the event stream).
pub fn valid_account_name(name: &str) -> bool {
    (1..=32).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
        && name != "events"
}

fn check_filter(f: &str) -> Result<(), &'static str> {
    if f.is_empty() || f.len() > MAX_FILTER_LEN {
        return Err("must be 1 to 256 characters");
    }
    if f.contains('\0') {
        return Err("contains NUL");
    }
    if !valid_filter(f) {
        return Err("may use # only as the whole last level and + only as a whole level");
    }
    Ok(())
}

/// The accounts file format: `[[accounts]]` tables.
#[derive(Debug, Default, Serialize, Deserialize)]
struct AccountsFile {
    #[serde(default)]
    accounts: Vec<AccountConfig>,
}

/// Every account, by name.
#[derive(Debug, Clone, Default)]
pub struct Accounts {
    by_name: BTreeMap<String, Arc<Account>>,
    /// argon2 verifications made by [`Accounts::authenticate`].
    verifications: Arc<AtomicU64>,
}

/// The hash an unknown account name is verified against, so that a login
/// costs one argon2 verification whether or not the name exists (its
/// timing says nothing about which names do). Same parameters as
/// [`hash_password`]; its password is random and thrown away.
fn dummy_hash() -> &'static str {
    static DUMMY: OnceLock<String> = OnceLock::new();
    DUMMY.get_or_init(|| {
        hash_password(&Alphanumeric.sample_string(&mut rand::rngs::OsRng, GENERATED_PASSWORD_LEN))
    })
}

impl Accounts {
    /// Validates configured accounts (names unique, roles and filters valid).
    pub fn from_configs(configs: &[AccountConfig]) -> anyhow::Result<Accounts> {
        let mut by_name = BTreeMap::new();
        for c in configs {
            let a = Account::from_config(c)?;
            if by_name.insert(a.name.clone(), Arc::new(a)).is_some() {
                bail!("accounts.name {:?} is configured twice", c.name);
            }
        }
        // Hashed now rather than at the first login with an unknown name.
        let _ = dummy_hash();
        Ok(Accounts {
            by_name,
            verifications: Arc::default(),
        })
    }

    /// The `[[accounts]]` of a TOML document (e.g. the whole config file;
    /// other keys are ignored).
    pub fn configs_from_toml(text: &str) -> anyhow::Result<Vec<AccountConfig>> {
        Ok(parse_accounts_toml(text)?.accounts)
    }

    /// The configured accounts, or — with none configured — the generated
    /// ones of `<data_dir>/accounts.toml`, creating `admin` on the first
    /// start and printing its password once to stdout.
    pub fn load(configured: &[AccountConfig], data_dir: &Path) -> anyhow::Result<Accounts> {
        let stdout = std::io::stdout();
        let mut out = stdout.lock();
        Accounts::load_with_output(configured, data_dir, &mut out)
    }

    /// [`Accounts::load`], printing the generated password to `out`.
    pub fn load_with_output(
        configured: &[AccountConfig],
        data_dir: &Path,
        out: &mut dyn Write,
    ) -> anyhow::Result<Accounts> {
        if !configured.is_empty() {
            return Accounts::from_configs(configured);
        }
        let path = data_dir.join(GENERATED_FILE);
        match std::fs::read_to_string(&path) {
            Ok(text) => {
                let file = parse_accounts_toml(&text)
                    .with_context(|| format!("reading {}", path.display()))?;
                if file.accounts.is_empty() {
                    bail!(
                        "{} holds no [[accounts]]; delete it to generate a new admin account",
                        path.display()
                    );
                }
                Accounts::from_configs(&file.accounts)
                    .with_context(|| format!("reading {}", path.display()))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => bootstrap(data_dir, &path, out),
            Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
        }
    }

    pub fn get(&self, name: &str) -> Option<Arc<Account>> {
        self.by_name.get(name).cloned()
    }

    /// The account if `password` is its password. Always one argon2
    /// verification: an unknown name is verified against a dummy hash.
    pub fn authenticate(&self, name: &str, password: &str) -> Option<Arc<Account>> {
        let account = self.get(name);
        let hash: &str = match &account {
            Some(a) => &a.password_hash,
            None => dummy_hash(),
        };
        let ok = self.verify_counted(hash, password);
        account.filter(|_| ok)
    }

    /// [`verify_password`], counting each argon2 verification it runs.
    fn verify_counted(&self, hash: &str, plain: &str) -> bool {
        match PasswordHash::new(hash) {
            Ok(parsed) => {
                self.verifications.fetch_add(1, Ordering::Relaxed);
                Argon2::default()
                    .verify_password(plain.as_bytes(), &parsed)
                    .is_ok()
            }
            Err(_) => false,
        }
    }

    /// argon2 verifications run by [`Accounts::authenticate`] so far (one
    /// per login attempt, known name or not).
    pub fn verifications(&self) -> u64 {
        self.verifications.load(Ordering::Relaxed)
    }

    pub fn iter(&self) -> impl Iterator<Item = &Arc<Account>> {
        self.by_name.values()
    }

    pub fn len(&self) -> usize {
        self.by_name.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_name.is_empty()
    }

    /// Adds (or replaces) an account.
    pub fn insert(&mut self, account: Account) {
        self.by_name.insert(account.name.clone(), Arc::new(account));
    }
}

fn parse_accounts_toml(text: &str) -> anyhow::Result<AccountsFile> {
    // Only `accounts` is read; the rest of a config file is someone else's.
    let doc: toml::Table = toml::from_str(text).context("not valid TOML")?;
    match doc.get("accounts") {
        None => Ok(AccountsFile::default()),
        Some(v) => {
            let accounts: Vec<AccountConfig> = v
                .clone()
                .try_into()
                .map_err(|e: toml::de::Error| anyhow::anyhow!("accounts: {}", e.message()))?;
            Ok(AccountsFile { accounts })
        }
    }
}

fn bootstrap(data_dir: &Path, path: &Path, out: &mut dyn Write) -> anyhow::Result<Accounts> {
    let password = Alphanumeric.sample_string(&mut rand::rngs::OsRng, GENERATED_PASSWORD_LEN);
    let config = AccountConfig {
        name: BOOTSTRAP_ACCOUNT.into(),
        password_hash: hash_password(&password),
        role: RoleConfig::Named("admin".into()),
        publish: Vec::new(),
        subscribe: Vec::new(),
        deny_publish: Vec::new(),
        deny_subscribe: Vec::new(),
        events: true,
    };
    let file = AccountsFile {
        accounts: vec![config],
    };
    let text = format!(
        "# Generated on the first start because no account was configured.\n\
         # Only the argon2 hash of the password is kept. Add [[accounts]] to the\n\
         # broker config to replace this file; delete it to generate a new password.\n\n{}",
        toml::to_string(&file).context("encoding the generated account")?
    );
    std::fs::create_dir_all(data_dir)
        .with_context(|| format!("creating {}", data_dir.display()))?;
    write_private(path, &text).with_context(|| format!("writing {}", path.display()))?;
    writeln!(out, "admin password: {password}").context("printing the admin password")?;
    out.flush().context("printing the admin password")?;
    Accounts::from_configs(&file.accounts)
}

/// Writes a file readable only by its owner, atomically (temp + rename).
fn write_private(path: &Path, text: &str) -> std::io::Result<()> {
    let tmp = path.with_extension("toml.tmp");
    {
        let mut opts = std::fs::OpenOptions::new();
        opts.write(true).create(true).truncate(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt;
            opts.mode(0o600);
        }
        let mut f = opts.open(&tmp)?;
        f.write_all(text.as_bytes())?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)
}

/// Every known action name (for help texts).
pub fn action_names() -> impl Iterator<Item = &'static str> {
    ACTIONS.iter().map(|(n, _)| *n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wildcard_rights_are_data_rights() {
        let mut c = AccountConfig {
            name: "app".into(),
            password_hash: hash_password("pw"),
            role: RoleConfig::default(),
            publish: vec!["#".into()],
            subscribe: vec!["#".into(), "+/+".into(), "+/C".into()],
            deny_publish: vec!["test/ro".into()],
            deny_subscribe: vec!["test/nosubscribe".into()],
            events: false,
        };
        let a = Account::from_config(&c).expect("# is a data right");
        assert!(a.may_receive_on("data/x"));
        assert!(!a.may_receive_on("test/ro"));
        for bad in ["admin/#", "admin/v1/other/request", "$SYS/#", "a/#/b"] {
            c.subscribe = vec![bad.into()];
            assert!(Account::from_config(&c).is_err(), "{bad}");
        }
        c.subscribe = vec!["#".into()];
        c.deny_subscribe = vec!["a/#/b".into()];
        assert!(Account::from_config(&c).is_err());
        assert!(!template_reaches_admin_topics("devices/+/+/#"));
        assert!(template_reaches_admin_topics("+/+/#"));
        assert!(template_reaches_admin_topics("admin/+/#"));
    }

    #[test]
    fn unknown_names_are_verified_against_a_hash_like_any_other() {
        let dummy = PasswordHash::new(dummy_hash()).expect("a PHC string");
        let real_hash = hash_password("pw");
        let real = PasswordHash::new(&real_hash).expect("a PHC string");
        assert_eq!(dummy.algorithm, real.algorithm);
        assert_eq!(dummy.version, real.version);
        assert_eq!(dummy.params, real.params);
        let mut accounts = Accounts::default();
        let mut a = Account::new("ops", Role::Admin);
        a.password_hash = real_hash;
        accounts.insert(a);
        assert!(accounts.authenticate("nobody", "pw").is_none());
        assert!(accounts.authenticate("ops", "wrong").is_none());
        assert!(accounts.authenticate("ops", "pw").is_some());
        assert_eq!(accounts.verifications(), 3);
    }

    #[test]
    fn roles_gate_actions() {
        let viewer = Account::new("v", Role::Viewer);
        assert!(viewer.may("DescribeProducts"));
        assert!(viewer.may("DescribeAuditLog"));
        assert!(!viewer.may("CreateProduct"));
        let admin = Account::new("a", Role::Admin);
        assert!(admin.may("DeleteProduct"));
        assert!(!admin.may("NoSuchAction"));
        let none = Account::new("n", Role::None);
        assert!(!none.may("DescribeProducts"));
        let list = Account::new("l", Role::Actions(["CreateOrder".to_owned()].into()));
        assert!(list.may("CreateOrder"));
        assert!(!list.may("DescribeProducts"));
    }

    #[test]
    fn response_topics_are_confined() {
        let mut a = Account::new("ops", Role::Admin);
        a.publish = vec!["devices/+/+/command/#".into()];
        assert!(a.may_receive_on("admin/v1/ops/response"));
        assert!(a.may_receive_on("admin/v1/ops/response/abc"));
        assert!(!a.may_receive_on("admin/v1/ops/responses"));
        assert!(!a.may_receive_on("admin/v1/other/response"));
        assert!(!a.may_receive_on("admin/v1/ops/request"));
        assert!(!a.may_receive_on("admin/v1/events/device/activated"));
        assert!(a.may_receive_on("devices/p/d/command/x"));
        assert!(!a.may_receive_on("devices/p/d/telemetry"));
        assert!(!a.may_receive_on("admin/v1/ops/response/#"));
    }
}

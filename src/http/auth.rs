//! Who is calling: HTTP Basic with an account, or the console's session
//! cookie from `POST /api/login`. Passwords are verified with argon2 on the
//! blocking pool, at most [`CONCURRENT_VERIFICATIONS`] at once (more wait
//! for a slot, up to [`MAX_WAITING_LOGINS`], then 503). A failed login
//! counts towards its source's ban in the activation gate, the same bans
//! devices get (`[gate] ban_after_failures`): a banned source is refused
//! before any password is checked, and `DescribeBans` / `RemoveBan` list
//! and lift it.
//!
//! Sessions live in memory (a restart logs everyone out), last
//! `[http] session_secs`, and their cookie is `HttpOnly; SameSite=Strict`
//! (and `Secure` over TLS). `POST /api/v1` also requires a JSON content
//! type, so no cross-site form can ride on a session.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use base64::Engine;
use parking_lot::Mutex;
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::sync::Semaphore;

use super::{Peer, Shared};
use crate::admin::accounts::action_names;
use crate::admin::{Account, Accounts, Role};

/// The console's session cookie.
pub const COOKIE: &str = "ab_session";
/// argon2 verifications at once (each costs tens of milliseconds of CPU).
pub const CONCURRENT_VERIFICATIONS: usize = 2;
/// Logins waiting for a verification slot; more get 503 at once.
pub const MAX_WAITING_LOGINS: usize = 64;
/// Sessions kept at once; the oldest go first.
const MAX_SESSIONS: usize = 10_000;

/// Live console sessions: token → account name and expiry.
pub struct Sessions {
    ttl: Duration,
    map: Mutex<HashMap<String, (String, Instant)>>,
}

impl Sessions {
    pub fn new(ttl: Duration) -> Self {
        Sessions {
            ttl,
            map: Mutex::new(HashMap::new()),
        }
    }

    /// A new session of `account`: its token (128 random bits, hex).
    pub fn create(&self, account: &str) -> String {
        let token = format!("{:032x}", rand::random::<u128>());
        let now = Instant::now();
        let mut map = self.map.lock();
        if map.len() >= MAX_SESSIONS {
            map.retain(|_, (_, until)| *until > now);
            if map.len() >= MAX_SESSIONS {
                if let Some(oldest) = map
                    .iter()
                    .min_by_key(|(_, (_, u))| *u)
                    .map(|(k, _)| k.clone())
                {
                    map.remove(&oldest);
                }
            }
        }
        map.insert(token.clone(), (account.to_owned(), now + self.ttl));
        token
    }

    /// The account name of a live session.
    pub fn get(&self, token: &str) -> Option<String> {
        let mut map = self.map.lock();
        match map.get(token) {
            Some((name, until)) if *until > Instant::now() => Some(name.clone()),
            Some(_) => {
                map.remove(token);
                None
            }
            None => None,
        }
    }

    pub fn remove(&self, token: &str) {
        self.map.lock().remove(token);
    }

    pub fn ttl(&self) -> Duration {
        self.ttl
    }
}

/// The argon2 verification slots.
pub struct LoginSlots {
    verifying: Arc<Semaphore>,
    waiting: AtomicUsize,
}

impl Default for LoginSlots {
    fn default() -> Self {
        LoginSlots {
            verifying: Arc::new(Semaphore::new(CONCURRENT_VERIFICATIONS)),
            waiting: AtomicUsize::new(0),
        }
    }
}

/// A refusal: its HTTP status and the admin-envelope-shaped JSON body.
pub fn refusal(status: StatusCode, code: &'static str, message: &str) -> Response {
    let answer = crate::admin::respond(
        crate::admin::new_request_id(),
        Err(crate::admin::AdminError::new(code, message)),
    );
    let mut r = (status, crate::admin::envelope_text(&answer, false)).into_response();
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r
}

fn unauthorized(headers: &HeaderMap, message: &str) -> Response {
    let mut r = refusal(StatusCode::UNAUTHORIZED, "Forbidden", message);
    // Scripts get the Basic challenge; the console's own requests do not
    // (a browser would open its password dialog over the console's login).
    if !headers.contains_key("x-requested-with") {
        r.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            HeaderValue::from_static("Basic realm=\"activation-broker\", charset=\"UTF-8\""),
        );
    }
    r
}

/// The session token of the request's cookie, if any.
pub fn session_token(headers: &HeaderMap) -> Option<&str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == COOKIE)
        .map(|(_, v)| v)
}

/// The user name and password of an `Authorization: Basic` header; `Err`
/// when the header is there but malformed.
fn basic(headers: &HeaderMap) -> Result<Option<(String, String)>, &'static str> {
    let Some(v) = headers.get(header::AUTHORIZATION) else {
        return Ok(None);
    };
    let v = v.to_str().map_err(|_| "malformed Authorization header")?;
    let Some(b64) = v
        .split_once(' ')
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("basic"))
        .map(|(_, rest)| rest.trim())
    else {
        return Err("only Basic authorization is supported");
    };
    let raw = base64::engine::general_purpose::STANDARD
        .decode(b64)
        .map_err(|_| "Basic credentials are not base64")?;
    let text = String::from_utf8(raw).map_err(|_| "Basic credentials are not UTF-8")?;
    let (user, pass) = text
        .split_once(':')
        .ok_or("Basic credentials need user:password")?;
    Ok(Some((user.to_owned(), pass.to_owned())))
}

/// Verifies `password` of `name` from `source`: refused at once while the
/// source is banned; a failure counts towards its ban.
pub async fn verify(
    st: &Shared,
    source: IpAddr,
    name: &str,
    password: &str,
) -> Result<Arc<Account>, Response> {
    if let Some(why) = st.gate.banned(source) {
        return Err(refusal(StatusCode::FORBIDDEN, "Forbidden", &why));
    }
    if st.logins.waiting.fetch_add(1, Ordering::Relaxed) >= MAX_WAITING_LOGINS {
        st.logins.waiting.fetch_sub(1, Ordering::Relaxed);
        return Err(refusal(
            StatusCode::SERVICE_UNAVAILABLE,
            "ServiceUnavailable",
            "too many logins being verified; try again",
        ));
    }
    let permit = st.logins.verifying.clone().acquire_owned().await;
    st.logins.waiting.fetch_sub(1, Ordering::Relaxed);
    let Ok(permit) = permit else {
        return Err(refusal(
            StatusCode::SERVICE_UNAVAILABLE,
            "ServiceUnavailable",
            "shutting down",
        ));
    };
    let accounts: Arc<Accounts> = st.accounts.clone();
    let (n, p) = (name.to_owned(), password.to_owned());
    let found = tokio::task::spawn_blocking(move || {
        let _permit = permit;
        accounts.authenticate(&n, &p)
    })
    .await
    .ok()
    .flatten();
    match found {
        Some(a) => Ok(a),
        None => {
            let why = format!("HTTP login as {name:?}: unknown account or wrong password");
            tracing::warn!(%source, account = %name, "http login failed");
            st.gate.login_failed(source, &why);
            Err(refusal(
                StatusCode::UNAUTHORIZED,
                "Forbidden",
                "unknown account or wrong password",
            ))
        }
    }
}

/// The account of a request: its session cookie, else its Basic
/// credentials; 401 without either.
pub async fn account(
    st: &Shared,
    headers: &HeaderMap,
    peer: Peer,
) -> Result<Arc<Account>, Response> {
    if let Some(token) = session_token(headers) {
        if let Some(a) = st.sessions.get(token).and_then(|n| st.accounts.get(&n)) {
            return Ok(a);
        }
    }
    match basic(headers) {
        Ok(Some((user, pass))) => verify(st, peer.addr.ip(), &user, &pass).await,
        Ok(None) => Err(unauthorized(
            headers,
            "log in: HTTP Basic with an account, or a session from POST /api/login",
        )),
        Err(why) => Err(unauthorized(headers, why)),
    }
}

/// What the console shows of the account.
fn describe(a: &Account) -> Value {
    let role = match &a.role {
        Role::Admin => "admin",
        Role::Viewer => "viewer",
        Role::None => "none",
        Role::Actions(_) => "actions",
    };
    let actions: Vec<&str> = action_names().filter(|n| a.may(n)).collect();
    json!({ "Account": a.name, "Role": role, "Actions": actions, "Events": a.events })
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase", deny_unknown_fields)]
pub struct Login {
    account: String,
    password: String,
}

/// `POST /api/login` `{"Account", "Password"}`: a session cookie.
pub async fn login(
    State(st): State<Shared>,
    Extension(peer): Extension<Peer>,
    body: axum::body::Bytes,
) -> Response {
    let login: Login = match serde_json::from_slice(&body) {
        Ok(l) => l,
        Err(e) => {
            return refusal(
                StatusCode::BAD_REQUEST,
                "InvalidParameter",
                &format!("login: expected {{\"Account\": ..., \"Password\": ...}}: {e}"),
            )
        }
    };
    let account = match verify(&st, peer.addr.ip(), &login.account, &login.password).await {
        Ok(a) => a,
        Err(r) => return r,
    };
    let token = st.sessions.create(&account.name);
    tracing::info!(account = %account.name, source = %peer.addr.ip(), "console login");
    let cookie = format!(
        "{COOKIE}={token}; Path=/; HttpOnly; SameSite=Strict; Max-Age={}{}",
        st.sessions.ttl().as_secs(),
        if peer.tls { "; Secure" } else { "" }
    );
    let mut body = describe(&account);
    body["Code"] = "OK".into();
    let mut r = Json(body).into_response();
    if let Ok(v) = HeaderValue::from_str(&cookie) {
        r.headers_mut().insert(header::SET_COOKIE, v);
    }
    r
}

/// `POST /api/logout`: ends the session.
pub async fn logout(State(st): State<Shared>, headers: HeaderMap) -> Response {
    if let Some(token) = session_token(&headers) {
        st.sessions.remove(token);
    }
    let mut r = Json(json!({"Code": "OK"})).into_response();
    r.headers_mut().insert(
        header::SET_COOKIE,
        HeaderValue::from_static("ab_session=; Path=/; HttpOnly; SameSite=Strict; Max-Age=0"),
    );
    r
}

/// `GET /api/session`: the logged-in account, or 401.
pub async fn session(
    State(st): State<Shared>,
    Extension(peer): Extension<Peer>,
    headers: HeaderMap,
) -> Response {
    match account(&st, &headers, peer).await {
        Ok(a) => {
            let mut body = describe(&a);
            body["Code"] = "OK".into();
            Json(body).into_response()
        }
        Err(r) => r,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cookie_and_basic_headers() {
        let mut h = HeaderMap::new();
        h.insert(
            header::COOKIE,
            HeaderValue::from_static("a=1; ab_session=xyz; b=2"),
        );
        assert_eq!(session_token(&h), Some("xyz"));
        h.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("Basic b3BzOnMzY3I6dA=="),
        );
        assert_eq!(basic(&h), Ok(Some(("ops".into(), "s3cr:t".into()))));
        h.insert(header::AUTHORIZATION, HeaderValue::from_static("Bearer x"));
        assert!(basic(&h).is_err());
        h.insert(header::AUTHORIZATION, HeaderValue::from_static("Basic !!"));
        assert!(basic(&h).is_err());
    }

    #[test]
    fn sessions_expire_and_are_removed() {
        let s = Sessions::new(Duration::from_secs(60));
        let t = s.create("ops");
        assert_eq!(s.get(&t).as_deref(), Some("ops"));
        s.remove(&t);
        assert_eq!(s.get(&t), None);
        let s = Sessions::new(Duration::ZERO);
        let t = s.create("ops");
        assert_eq!(s.get(&t), None);
    }
}

//! The handshake: from an accepted socket to a registered session, or a
//! [`Refusal`] the connection turns into its CONNACK.
//!
//! 1. CONNECT: read under the CONNECT timeout; the protocol level byte picks
//!    MQTT 3.1.1 or 5.0 (other levels get CONNACK 0x01). Anything else
//!    first closes the socket.
//! 2. The CONNECT itself: an empty client id needs a clean session; a will
//!    topic must be a topic name.
//! 3. Room: a slot of the online registry (which admits no more sessions
//!    than the router has link slots) is reserved for the client id before
//!    anyone decides on the CONNECT, so a broker without room refuses with
//!    0x88 before the authenticator may consume anything (an activation
//!    code). A takeover of an online client id needs no new slot.
//! 4. Admission: the listener's [`Authenticator`] decides; then the session's
//!    client id and its will topic (inside the admitted ACL) are checked.
//! 5. Registration in the online registry (telling an older connection with
//!    the same client id to leave with 0x8E) under one per-client-id lock;
//!    sessions the router stores are linked to it at once, under the same
//!    lock.
//!
//! A refusal leaves nothing behind: no registration, no router link.

use std::net::SocketAddr;

use bytes::{Bytes, BytesMut};
use rumqttd::protocol::{Connect, ConnectProperties, Packet};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::time::timeout;

use super::acl::valid_topic_name;
use super::codec::{read_first, Codec, First};
use super::codes::RefusalCode;
use super::connection::ListenerCtx;
use super::control::{control_channel, ControlRx};
use super::delivery::ClientLimits;
use super::lingering::{SessionExpiry, Will};
use super::linking::Registration;
use super::online::SessionInfo;
use super::router_link::RouterLink;
use super::{Admission, ConnectInfo, GatewayError, ProtocolVersion, Rejection};

/// Why a connection ends before its session exists.
#[derive(Debug)]
pub(crate) enum Refusal {
    /// Close without a CONNACK (not MQTT, a malformed CONNECT, no CONNECT
    /// in time).
    Close(&'static str),
    /// CONNACK 0x01 (MQTT 3.1.1 encoding): an unsupported protocol level.
    UnsupportedVersion,
    /// CONNACK with this code (MQTT 5: and Reason String), then close.
    Connack {
        version: ProtocolVersion,
        client_id: String,
        rejection: Rejection,
    },
}

/// A registered session, ready for its CONNACK.
pub(crate) struct Admitted {
    pub(crate) codec: Codec,
    pub(crate) connect: Connect,
    /// Boxed: kept for the whole connection, rarely there.
    pub(crate) will: Option<Box<Will>>,
    /// The session's client id (assigned when the client sent none).
    pub(crate) client_id: String,
    pub(crate) admission: Admission,
    pub(crate) session_expiry: SessionExpiry,
    /// The router keeps the session after the connection ends.
    pub(crate) stored: bool,
    /// Registration number in the online registry.
    pub(crate) seq: u64,
    /// Sessions the router stores are linked at once.
    pub(crate) link: Option<RouterLink>,
    pub(crate) ctrl_rx: ControlRx,
    /// What an MQTT 5 client said it can receive.
    pub(crate) limits: ClientLimits,
}

/// Reads the CONNECT (under the CONNECT timeout) and admits and registers
/// the session, or says why not. Bytes that came right behind the CONNECT
/// stay in `rbuf`.
pub(crate) async fn handshake<S>(
    stream: &mut S,
    peer: SocketAddr,
    ctx: &ListenerCtx,
    rbuf: &mut BytesMut,
) -> Result<Admitted, Refusal>
where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    let cfg = &ctx.config;
    let first = timeout(
        cfg.connect_timeout,
        read_first(stream, rbuf, cfg.max_packet_size),
    )
    .await
    .map_err(|_| Refusal::Close("no CONNECT in time"))?;
    let (codec, packet) = match first {
        First::Connect(codec, packet) => (codec, packet),
        First::UnsupportedVersion => return Err(Refusal::UnsupportedVersion),
        First::Invalid => return Err(Refusal::Close("not an MQTT CONNECT")),
    };
    let Packet::Connect(connect, props, will, will_props, login) = *packet else {
        return Err(Refusal::Close("not an MQTT CONNECT"));
    };
    let version = codec.version();
    let refuse = |code: RefusalCode, reason: String| Refusal::Connack {
        version,
        client_id: connect.client_id.clone(),
        rejection: Rejection::new(code, reason),
    };

    if connect.client_id.is_empty() && !connect.clean_session {
        return Err(refuse(
            RefusalCode::ClientIdNotValid,
            "an empty client id requires a clean session".into(),
        ));
    }
    let will_topic = match &will {
        Some(w) => match std::str::from_utf8(&w.topic) {
            Ok(t) if valid_topic_name(t) => Some(t.to_owned()),
            _ => return Err(Refusal::Close("malformed will topic")),
        },
        None => None,
    };

    let gw = &ctx.gw;
    let Some(reservation) = gw
        .online
        .reserve(&connect.client_id, ctx.auth.admits_accounts())
    else {
        return Err(refuse(
            RefusalCode::ServerUnavailable,
            GatewayError::Full(gw.online.capacity()).to_string(),
        ));
    };

    let info = ConnectInfo {
        client_id: connect.client_id.clone(),
        clean_session: connect.clean_session,
        username: login.as_ref().map(|l| l.username.clone()),
        password: login.map(|l| Bytes::from(l.password)),
        peer,
        protocol: version,
        keep_alive: connect.keep_alive,
        will_topic: will_topic.clone(),
        listener: cfg.name.clone(),
        tls: ctx.tls,
    };
    let admission = ctx
        .auth
        .authenticate(info)
        .await
        .map_err(|r| refuse(r.code, r.reason))?;

    let client_id = if admission.client_id.is_empty() {
        assign_client_id()
    } else {
        admission.client_id.clone()
    };
    if !valid_client_id(&client_id) {
        return Err(refuse(
            RefusalCode::ClientIdNotValid,
            "client id must not contain '+', '#', '/', '$' or control characters".into(),
        ));
    }
    if will_topic.is_some_and(|t| !admission.acl.may_publish(&t)) {
        return Err(refuse(
            RefusalCode::NotAuthorized,
            "the will topic is outside the topics this client may publish to".into(),
        ));
    }

    let session_expiry = match version {
        ProtocolVersion::V4 if connect.clean_session => SessionExpiry::WithConnection,
        ProtocolVersion::V4 => SessionExpiry::Never,
        ProtocolVersion::V5 => SessionExpiry::from_interval(
            props
                .as_ref()
                .and_then(|p: &ConnectProperties| p.session_expiry_interval),
        ),
    };
    let session = SessionInfo {
        client_id: client_id.clone(),
        identity: admission.identity.clone(),
        peer,
        protocol: version,
        listener: cfg.name.clone(),
        clean_session: connect.clean_session,
        session_expiry,
        keep_alive: connect.keep_alive,
        connected_at: gw.clock.now(),
    };
    let stored = session.stored();
    let limits = match props.as_ref() {
        Some(p) if version == ProtocolVersion::V5 => ClientLimits {
            receive_maximum: p.receive_maximum.unwrap_or(u16::MAX),
            max_packet_size: p.max_packet_size.and_then(|n| usize::try_from(n).ok()),
            topic_alias_max: p.topic_alias_max.unwrap_or(0),
        },
        _ => ClientLimits::NONE,
    };

    // Register (and link, for sessions the router must know from the
    // start), serialised per client id so the registry and the router see
    // competing connections of one client id in the same order. A clean
    // session gets its router link when it first needs one (SUBSCRIBE or
    // PUBLISH): an idle device costs no router state.
    let (ctrl_tx, ctrl_rx) = control_channel();
    let (seq, link) = match gw.register_unlinked(session, ctrl_tx, reservation).await {
        Registration::Registered(seq) => (seq, None),
        Registration::Full(n) => {
            return Err(refuse(
                RefusalCode::ServerUnavailable,
                GatewayError::Full(n).to_string(),
            ))
        }
        Registration::MustLink(pending) => {
            let Ok(_permit) = ctx.links.acquire().await else {
                return Err(refuse(
                    RefusalCode::ServerUnavailable,
                    "listener is shutting down".into(),
                ));
            };
            match gw.register_linked(*pending).await {
                Ok((seq, link)) => (seq, Some(link)),
                Err(e @ GatewayError::Full(_)) => {
                    return Err(refuse(RefusalCode::ServerUnavailable, e.to_string()))
                }
                Err(e) => {
                    tracing::warn!(%client_id, error = %e, "router refused the link");
                    return Err(refuse(
                        RefusalCode::ServerUnavailable,
                        "broker unavailable".into(),
                    ));
                }
            }
        }
    };
    Ok(Admitted {
        codec,
        connect,
        will: will.map(|w| Box::new((w, will_props))),
        client_id,
        admission,
        session_expiry,
        stored,
        seq,
        link,
        ctrl_rx,
        limits,
    })
}

fn valid_client_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 65_535
        && !id
            .chars()
            .any(|c| matches!(c, '+' | '#' | '/' | '$') || c.is_control())
}

fn assign_client_id() -> String {
    use rand::Rng;
    format!("auto-{:016x}", rand::thread_rng().gen::<u64>())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_ids() {
        assert!(valid_client_id("pk.dev:1"));
        assert!(!valid_client_id(""));
        assert!(!valid_client_id("a/b"));
        assert!(!valid_client_id("a#"));
        assert!(!valid_client_id("$SYS"));
        assert!(!valid_client_id("\0gateway-wills"));
    }
}

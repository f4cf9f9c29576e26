//! Glue between the connection layer and the activation gate: an
//! [`Authenticator`] for the device listener that asks the [`Gate`],
//! renders the device's topic namespace, maps refusals to CONNACK codes and
//! publishes `device/rejected`.

use std::sync::Arc;

use crate::admin::accounts::ADMIN_FILTER;
use crate::events::{Event, EventBus, EventKind};
use crate::gate::{ConnectAttempt, Gate, GateRefusal};
use crate::gateway::{
    Acl, AclError, AclTemplate, Admission, AuthFuture, Authenticator, ConnectInfo, Identity,
    RefusalCode, Rejection,
};

/// The CONNACK row of a gate refusal.
pub fn refusal_code(r: &GateRefusal) -> RefusalCode {
    match r {
        GateRefusal::ClientIdNotValid(_) => RefusalCode::ClientIdNotValid,
        GateRefusal::BadCredentials(_) => RefusalCode::BadUserNameOrPassword,
        GateRefusal::Banned(_) => RefusalCode::Banned,
        GateRefusal::RateExceeded(_) => RefusalCode::ConnectionRateExceeded,
        GateRefusal::QuotaExceeded(_) => RefusalCode::QuotaExceeded,
        GateRefusal::NotAuthorized(_) => RefusalCode::NotAuthorized,
        GateRefusal::Unavailable(_) => RefusalCode::ServerUnavailable,
    }
}

/// The ACL of device `pk`/`dk`: its namespace, never the admin topics
/// whatever the templates say (the config refuses such templates; this
/// holds for any caller).
fn render(namespace: &AclTemplate, pk: &str, dk: &str) -> Result<Acl, AclError> {
    Ok(namespace
        .render(&[("ProductKey", pk), ("DeviceKey", dk)])?
        .denying(&[ADMIN_FILTER]))
}

pub struct DeviceAuthenticator {
    gate: Arc<Gate>,
    namespace: Arc<AclTemplate>,
    events: EventBus,
}

impl DeviceAuthenticator {
    /// `namespace` templates may use `{ProductKey}` and `{DeviceKey}`.
    pub fn new(gate: Arc<Gate>, namespace: AclTemplate) -> Self {
        let events = gate.ledger().events().clone();
        DeviceAuthenticator {
            gate,
            namespace: Arc::new(namespace),
            events,
        }
    }

    async fn decide(
        gate: &Gate,
        namespace: &AclTemplate,
        info: &ConnectInfo,
    ) -> Result<Admission, GateRefusal> {
        // A will outside the device's namespace is refused before anything
        // reaches the ledger (a malformed user name is left to the gate).
        if let (Some(topic), Some(user)) = (
            info.will_topic.as_deref(),
            info.username
                .as_deref()
                .and_then(|u| crate::credentials::parse_user_name(u).ok()),
        ) {
            let allowed = render(namespace, &user.product_key, &user.device_key)
                .is_ok_and(|acl| acl.may_publish(topic));
            if !allowed {
                return Err(GateRefusal::NotAuthorized(format!(
                    "will topic {topic} is outside the device's namespace"
                )));
            }
        }
        let attempt = ConnectAttempt {
            client_id: &info.client_id,
            user_name: info.username.as_deref(),
            password: info.password.as_deref(),
            source: info.peer.ip(),
        };
        let a = gate.admit(attempt).await?;
        let acl = render(namespace, &a.product_key, &a.device_key)
            .map_err(|e| GateRefusal::NotAuthorized(format!("device namespace: {e}")))?;
        Ok(Admission {
            client_id: a.client_id,
            identity: Identity::Device {
                product_key: a.product_key,
                device_key: a.device_key,
            },
            acl,
        })
    }
}

impl Authenticator for DeviceAuthenticator {
    fn authenticate(&self, info: ConnectInfo) -> AuthFuture {
        let gate = self.gate.clone();
        let namespace = self.namespace.clone();
        let events = self.events.clone();
        Box::pin(async move {
            match Self::decide(&gate, &namespace, &info).await {
                Ok(a) => Ok(a),
                Err(refusal) => {
                    let code = refusal_code(&refusal);
                    if events.wants(EventKind::DeviceRejected) {
                        events.publish(rejected_event(&gate, &info, &refusal, code));
                    }
                    Err(Rejection::new(code, refusal.reason()))
                }
            }
        })
    }
}

/// `device/rejected` for a refused CONNECT.
fn rejected_event(
    gate: &Gate,
    info: &ConnectInfo,
    refusal: &GateRefusal,
    code: RefusalCode,
) -> Event {
    let mut ev = Event::new(EventKind::DeviceRejected, gate.ledger().clock().now())
        .with("Reason", refusal.reason())
        .with("ReasonCode", format!("0x{:02X}", code.v5_code()))
        .with("ReturnCode", format!("0x{:02X}", code.v4_code()))
        .with("Source", info.peer.ip().to_string())
        .with("ClientId", info.client_id.as_str());
    if let Some(user) = info
        .username
        .as_deref()
        .and_then(|u| crate::credentials::parse_user_name(u).ok())
    {
        ev = ev.device(&user.product_key, &user.device_key);
    }
    ev
}

//! Reason codes on the wire: how a refusal becomes a CONNACK (SPEC §3 table)
//! and how a server-side disconnect becomes an MQTT 5 DISCONNECT, in both
//! protocol versions. Pure mapping, no I/O.

use rumqttd::protocol::{
    ConnAck, ConnAckProperties, ConnectReturnCode, Disconnect, DisconnectProperties,
    DisconnectReasonCode, Packet,
};

use super::ProtocolVersion;

/// Why a CONNECT is refused. The authenticator picks one; the gateway turns
/// it into the CONNACK code of the client's protocol version.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RefusalCode {
    /// Malformed identifiers: MQTT 5 0x85, MQTT 3.1.1 0x02.
    ClientIdNotValid,
    /// Bad signature, stale timestamp, unknown product or device: 0x86 / 0x04.
    BadUserNameOrPassword,
    /// Device or source banned: 0x8A / 0x05.
    Banned,
    /// Too many attempts: 0x9F / 0x05.
    ConnectionRateExceeded,
    /// No available activation code for the product: 0x97 / 0x05.
    QuotaExceeded,
    /// Code expired and renewal disabled or blacklisted, or not permitted: 0x87 / 0x05.
    NotAuthorized,
    /// Store unavailable: 0x88 / 0x03.
    ServerUnavailable,
    /// Too busy to decide now (authentication queue full or too slow): 0x89 / 0x03.
    ServerBusy,
}

impl RefusalCode {
    /// The `result` label of `activation_connects_total` (the activation
    /// gate's refusals on the device listener; the same codes elsewhere).
    pub fn metric_result(self) -> &'static str {
        match self {
            RefusalCode::ClientIdNotValid | RefusalCode::BadUserNameOrPassword => "bad_credentials",
            RefusalCode::Banned => "banned",
            RefusalCode::ConnectionRateExceeded => "rate_limited",
            RefusalCode::QuotaExceeded => "no_code",
            RefusalCode::NotAuthorized => "expired",
            RefusalCode::ServerUnavailable | RefusalCode::ServerBusy => "unavailable",
        }
    }

    /// The MQTT 5 CONNACK reason code byte.
    pub fn v5_code(self) -> u8 {
        match self {
            RefusalCode::ClientIdNotValid => 0x85,
            RefusalCode::BadUserNameOrPassword => 0x86,
            RefusalCode::Banned => 0x8A,
            RefusalCode::ConnectionRateExceeded => 0x9F,
            RefusalCode::QuotaExceeded => 0x97,
            RefusalCode::NotAuthorized => 0x87,
            RefusalCode::ServerUnavailable => 0x88,
            RefusalCode::ServerBusy => 0x89,
        }
    }

    /// The MQTT 3.1.1 CONNACK return code byte.
    pub fn v4_code(self) -> u8 {
        match self {
            RefusalCode::ClientIdNotValid => 0x02,
            RefusalCode::BadUserNameOrPassword => 0x04,
            RefusalCode::Banned
            | RefusalCode::ConnectionRateExceeded
            | RefusalCode::QuotaExceeded
            | RefusalCode::NotAuthorized => 0x05,
            RefusalCode::ServerUnavailable | RefusalCode::ServerBusy => 0x03,
        }
    }

    /// Short, stable name (for logs and `device/rejected` events).
    pub fn as_str(self) -> &'static str {
        match self {
            RefusalCode::ClientIdNotValid => "ClientIdNotValid",
            RefusalCode::BadUserNameOrPassword => "BadUserNameOrPassword",
            RefusalCode::Banned => "Banned",
            RefusalCode::ConnectionRateExceeded => "ConnectionRateExceeded",
            RefusalCode::QuotaExceeded => "QuotaExceeded",
            RefusalCode::NotAuthorized => "NotAuthorized",
            RefusalCode::ServerUnavailable => "ServerUnavailable",
            RefusalCode::ServerBusy => "ServerBusy",
        }
    }

    /// The rumqttd return code that its encoder writes as the right byte for
    /// `version` (its v4 encoder only knows the six 3.1.1 codes).
    pub(crate) fn return_code(self, version: ProtocolVersion) -> ConnectReturnCode {
        match version {
            ProtocolVersion::V5 => match self {
                RefusalCode::ClientIdNotValid => ConnectReturnCode::ClientIdentifierNotValid,
                RefusalCode::BadUserNameOrPassword => ConnectReturnCode::BadUserNamePassword,
                RefusalCode::Banned => ConnectReturnCode::Banned,
                RefusalCode::ConnectionRateExceeded => ConnectReturnCode::ConnectionRateExceeded,
                RefusalCode::QuotaExceeded => ConnectReturnCode::QuotaExceeded,
                RefusalCode::NotAuthorized => ConnectReturnCode::NotAuthorized,
                RefusalCode::ServerUnavailable => ConnectReturnCode::ServerUnavailable,
                RefusalCode::ServerBusy => ConnectReturnCode::ServerBusy,
            },
            ProtocolVersion::V4 => match self.v4_code() {
                0x02 => ConnectReturnCode::ClientIdentifierNotValid,
                0x03 => ConnectReturnCode::ServiceUnavailable,
                0x04 => ConnectReturnCode::BadUserNamePassword,
                _ => ConnectReturnCode::NotAuthorized,
            },
        }
    }
}

/// The refusing CONNACK for `version`; MQTT 5 carries `reason` as its
/// Reason String property.
pub(crate) fn refusal_connack(version: ProtocolVersion, code: RefusalCode, reason: &str) -> Packet {
    let ack = ConnAck {
        session_present: false,
        code: code.return_code(version),
    };
    match version {
        ProtocolVersion::V4 => Packet::ConnAck(ack, None),
        ProtocolVersion::V5 => {
            let props = (!reason.is_empty()).then(|| ConnAckProperties {
                reason_string: Some(reason.to_owned()),
                ..empty_connack_properties()
            });
            Packet::ConnAck(ack, props)
        }
    }
}

/// CONNACK 0x01 (3.1.1 "unacceptable protocol version"), written in the 3.1.1
/// format whatever level the client asked for, as MQTT 5 §3.1.2.2 allows.
pub(crate) fn unsupported_protocol_connack() -> Packet {
    Packet::ConnAck(
        ConnAck {
            session_present: false,
            code: ConnectReturnCode::RefusedProtocolVersion,
        },
        None,
    )
}

pub(crate) fn empty_connack_properties() -> ConnAckProperties {
    ConnAckProperties {
        session_expiry_interval: None,
        receive_max: None,
        max_qos: None,
        retain_available: None,
        max_packet_size: None,
        assigned_client_identifier: None,
        topic_alias_max: None,
        reason_string: None,
        user_properties: Vec::new(),
        wildcard_subscription_available: None,
        subscription_identifiers_available: None,
        shared_subscription_available: None,
        server_keep_alive: None,
        response_information: None,
        server_reference: None,
        authentication_method: None,
        authentication_data: None,
    }
}

/// Why the server ends an established session (MQTT 5 DISCONNECT reason
/// code; MQTT 3.1.1 has no server DISCONNECT, the socket is just closed).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DisconnectReason {
    /// 0x87: e.g. the activation code expired and could not be renewed.
    NotAuthorized,
    /// 0x8E: another connection with the same client id took the session.
    SessionTakenOver,
    /// 0x98: e.g. the device or its product was deleted.
    AdministrativeAction,
    /// 0x8B: the broker is stopping.
    ServerShuttingDown,
    /// 0x97: an administrative or implementation limit was exceeded.
    QuotaExceeded,
    /// 0x8D: no packet within 1.5 × keepalive.
    KeepAliveTimeout,
    /// 0x81: undecodable packet.
    MalformedPacket,
    /// 0x82: out-of-order or forbidden packet.
    ProtocolError,
    /// 0x90: PUBLISH topic not a valid topic name.
    TopicNameInvalid,
    /// 0x94: topic alias 0 or above the maximum.
    TopicAliasInvalid,
    /// 0x95: packet above the maximum packet size.
    PacketTooLarge,
    /// 0x93: more unacknowledged QoS 1/2 PUBLISHes than the Receive Maximum.
    ReceiveMaximumExceeded,
    /// 0x80: anything else.
    UnspecifiedError,
}

impl DisconnectReason {
    /// The MQTT 5 DISCONNECT reason code byte.
    pub fn code(self) -> u8 {
        match self {
            DisconnectReason::NotAuthorized => 0x87,
            DisconnectReason::SessionTakenOver => 0x8E,
            DisconnectReason::AdministrativeAction => 0x98,
            DisconnectReason::ServerShuttingDown => 0x8B,
            DisconnectReason::QuotaExceeded => 0x97,
            DisconnectReason::KeepAliveTimeout => 0x8D,
            DisconnectReason::MalformedPacket => 0x81,
            DisconnectReason::ProtocolError => 0x82,
            DisconnectReason::TopicNameInvalid => 0x90,
            DisconnectReason::TopicAliasInvalid => 0x94,
            DisconnectReason::PacketTooLarge => 0x95,
            DisconnectReason::ReceiveMaximumExceeded => 0x93,
            DisconnectReason::UnspecifiedError => 0x80,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            DisconnectReason::NotAuthorized => "NotAuthorized",
            DisconnectReason::SessionTakenOver => "SessionTakenOver",
            DisconnectReason::AdministrativeAction => "AdministrativeAction",
            DisconnectReason::ServerShuttingDown => "ServerShuttingDown",
            DisconnectReason::QuotaExceeded => "QuotaExceeded",
            DisconnectReason::KeepAliveTimeout => "KeepAliveTimeout",
            DisconnectReason::MalformedPacket => "MalformedPacket",
            DisconnectReason::ProtocolError => "ProtocolError",
            DisconnectReason::TopicNameInvalid => "TopicNameInvalid",
            DisconnectReason::TopicAliasInvalid => "TopicAliasInvalid",
            DisconnectReason::PacketTooLarge => "PacketTooLarge",
            DisconnectReason::ReceiveMaximumExceeded => "ReceiveMaximumExceeded",
            DisconnectReason::UnspecifiedError => "UnspecifiedError",
        }
    }

    fn reason_code(self) -> DisconnectReasonCode {
        match self {
            DisconnectReason::NotAuthorized => DisconnectReasonCode::NotAuthorized,
            DisconnectReason::SessionTakenOver => DisconnectReasonCode::SessionTakenOver,
            DisconnectReason::AdministrativeAction => DisconnectReasonCode::AdministrativeAction,
            DisconnectReason::ServerShuttingDown => DisconnectReasonCode::ServerShuttingDown,
            DisconnectReason::QuotaExceeded => DisconnectReasonCode::QuotaExceeded,
            DisconnectReason::KeepAliveTimeout => DisconnectReasonCode::KeepAliveTimeout,
            DisconnectReason::MalformedPacket => DisconnectReasonCode::MalformedPacket,
            DisconnectReason::ProtocolError => DisconnectReasonCode::ProtocolError,
            DisconnectReason::TopicNameInvalid => DisconnectReasonCode::TopicNameInvalid,
            DisconnectReason::TopicAliasInvalid => DisconnectReasonCode::TopicAliasInvalid,
            DisconnectReason::PacketTooLarge => DisconnectReasonCode::PacketTooLarge,
            DisconnectReason::ReceiveMaximumExceeded => {
                DisconnectReasonCode::ReceiveMaximumExceeded
            }
            DisconnectReason::UnspecifiedError => DisconnectReasonCode::UnspecifiedError,
        }
    }
}

/// The server DISCONNECT for an MQTT 5 client, `None` for MQTT 3.1.1.
pub(crate) fn disconnect_packet(
    version: ProtocolVersion,
    reason: DisconnectReason,
    message: &str,
) -> Option<Packet> {
    match version {
        ProtocolVersion::V4 => None,
        ProtocolVersion::V5 => {
            let props = (!message.is_empty()).then(|| DisconnectProperties {
                session_expiry_interval: None,
                reason_string: Some(message.to_owned()),
                user_properties: Vec::new(),
                server_reference: None,
            });
            Some(Packet::Disconnect(
                Disconnect {
                    reason_code: reason.reason_code(),
                },
                props,
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::BytesMut;
    use rumqttd::protocol::{v4::V4, v5::V5, Protocol};

    const ALL: [RefusalCode; 7] = [
        RefusalCode::ClientIdNotValid,
        RefusalCode::BadUserNameOrPassword,
        RefusalCode::Banned,
        RefusalCode::ConnectionRateExceeded,
        RefusalCode::QuotaExceeded,
        RefusalCode::NotAuthorized,
        RefusalCode::ServerUnavailable,
    ];

    #[test]
    fn connack_bytes_match_the_spec_table() {
        let v5 = [0x85, 0x86, 0x8A, 0x9F, 0x97, 0x87, 0x88];
        let v4 = [0x02, 0x04, 0x05, 0x05, 0x05, 0x05, 0x03];
        for (i, code) in ALL.iter().enumerate() {
            assert_eq!(code.v5_code(), v5[i]);
            assert_eq!(code.v4_code(), v4[i]);

            let mut buf = BytesMut::new();
            V4.write(refusal_connack(ProtocolVersion::V4, *code, "x"), &mut buf)
                .expect("v4 encodes");
            assert_eq!(&buf[..], &[0x20, 0x02, 0x00, v4[i]]);

            let mut buf = BytesMut::new();
            V5.write(refusal_connack(ProtocolVersion::V5, *code, "why"), &mut buf)
                .expect("v5 encodes");
            assert_eq!(buf[0], 0x20);
            assert_eq!(buf[3], v5[i], "{code:?}");
            // Reason String property (0x1F) with "why".
            assert!(buf
                .windows(6)
                .any(|w| w == [0x1F, 0x00, 0x03, b'w', b'h', b'y']));
        }
    }

    #[test]
    fn disconnect_codes_encode() {
        let mut buf = BytesMut::new();
        let p = disconnect_packet(ProtocolVersion::V5, DisconnectReason::SessionTakenOver, "")
            .expect("v5 has disconnect");
        V5.write(p, &mut buf).expect("encodes");
        assert_eq!(buf[0], 0xE0);
        assert_eq!(buf[2], 0x8E);
        assert!(
            disconnect_packet(ProtocolVersion::V4, DisconnectReason::NotAuthorized, "").is_none()
        );
    }
}

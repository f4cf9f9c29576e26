//! CONNACK codes: rumqttc's return codes as the bytes on the wire, and the
//! specification's name of every byte, for MQTT 3.1.1 (`protocol` 4) and 5.

use rumqttc::v5::mqttbytes::v5::ConnectReturnCode as Code5;
use rumqttc::ConnectReturnCode as Code4;

/// The MQTT 3.1.1 CONNACK byte of `c`.
pub fn v4_code(c: Code4) -> u8 {
    match c {
        Code4::Success => 0x00,
        Code4::RefusedProtocolVersion => 0x01,
        Code4::BadClientId => 0x02,
        Code4::ServiceUnavailable => 0x03,
        Code4::BadUserNamePassword => 0x04,
        Code4::NotAuthorized => 0x05,
    }
}

/// The MQTT 5 CONNACK reason code of `c`. rumqttc's variants named after
/// 3.1.1 codes (never decoded from an MQTT 5 packet) map to their MQTT 5
/// equivalents: a bad client id is 0x85, as the broker sends it.
pub fn v5_code(c: Code5) -> u8 {
    use Code5::*;
    match c {
        Success => 0x00,
        UnspecifiedError => 0x80,
        MalformedPacket => 0x81,
        ProtocolError => 0x82,
        ImplementationSpecificError => 0x83,
        UnsupportedProtocolVersion | RefusedProtocolVersion => 0x84,
        ClientIdentifierNotValid | BadClientId => 0x85,
        BadUserNamePassword => 0x86,
        NotAuthorized => 0x87,
        ServerUnavailable | ServiceUnavailable => 0x88,
        ServerBusy => 0x89,
        Banned => 0x8A,
        BadAuthenticationMethod => 0x8C,
        TopicNameInvalid => 0x90,
        PacketTooLarge => 0x95,
        QuotaExceeded => 0x97,
        PayloadFormatInvalid => 0x99,
        RetainNotSupported => 0x9A,
        QoSNotSupported => 0x9B,
        UseAnotherServer => 0x9C,
        ServerMoved => 0x9D,
        ConnectionRateExceeded => 0x9F,
    }
}

/// The name of CONNACK code `code` in protocol `protocol` (4 or 5).
pub fn name(protocol: u8, code: u8) -> &'static str {
    if protocol == 5 {
        match code {
            0x00 => "Success",
            0x80 => "Unspecified error",
            0x81 => "Malformed Packet",
            0x82 => "Protocol Error",
            0x83 => "Implementation specific error",
            0x84 => "Unsupported Protocol Version",
            0x85 => "Client Identifier not valid",
            0x86 => "Bad User Name or Password",
            0x87 => "Not authorized",
            0x88 => "Server unavailable",
            0x89 => "Server busy",
            0x8A => "Banned",
            0x8C => "Bad authentication method",
            0x90 => "Topic Name invalid",
            0x95 => "Packet too large",
            0x97 => "Quota exceeded",
            0x99 => "Payload format invalid",
            0x9A => "Retain not supported",
            0x9B => "QoS not supported",
            0x9C => "Use another server",
            0x9D => "Server moved",
            0x9F => "Connection rate exceeded",
            _ => "unknown",
        }
    } else {
        match code {
            0x00 => "connection accepted",
            0x01 => "unacceptable protocol version",
            0x02 => "identifier rejected",
            0x03 => "server unavailable",
            0x04 => "bad user name or password",
            0x05 => "not authorized",
            _ => "unknown",
        }
    }
}

/// `0x97`: a code as reports key it.
pub fn key(code: u8) -> String {
    format!("0x{code:02X}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_and_names_agree() {
        assert_eq!(v5_code(Code5::QuotaExceeded), 0x97);
        assert_eq!(v5_code(Code5::BadClientId), 0x85);
        assert_eq!(v4_code(Code4::BadClientId), 0x02);
        assert_eq!(
            name(5, v5_code(Code5::ClientIdentifierNotValid)),
            "Client Identifier not valid"
        );
        assert_eq!(name(4, 0x02), "identifier rejected");
        assert_eq!(name(5, 0x42), "unknown");
        assert_eq!(key(0x05), "0x05");
    }
}

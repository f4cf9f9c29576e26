//! The simulator's own client on a (bound) tokio socket.

use super::*;
use rumqttc::mqttbytes::v4;
use rumqttc::v5::mqttbytes::v5;

/// Packets the session cares about, either protocol.
#[derive(Debug)]
pub(super) enum In {
    ConnAck { code: u8, reason: Option<String> },
    PubAck { ok: bool },
    Disconnect(String),
    Other,
}

pub(super) struct Codec {
    pub protocol: u8,
    pkid: u16,
}

impl Codec {
    pub(super) fn new(protocol: u8) -> Self {
        Codec { protocol, pkid: 0 }
    }

    pub(super) fn connect(
        &self,
        c: &Credentials,
        keepalive: u16,
        buf: &mut BytesMut,
    ) -> Result<(), String> {
        if self.protocol == 5 {
            let connect = v5::Connect {
                keep_alive: keepalive,
                client_id: c.id.clone(),
                clean_start: true,
                properties: None,
            };
            let login = v5::Login::new(c.user.clone(), c.password.clone());
            v5::Packet::Connect(connect, None, Some(login))
                .write(buf, Some(MAX_PACKET as u32))
                .map(|_| ())
                .map_err(|e| e.to_string())
        } else {
            let mut connect = v4::Connect::new(c.id.clone());
            connect.keep_alive = keepalive;
            connect.clean_session = true;
            connect.login = Some(v4::Login::new(c.user.clone(), c.password.clone()));
            v4::Packet::Connect(connect)
                .write(buf, MAX_PACKET)
                .map(|_| ())
                .map_err(|e| e.to_string())
        }
    }

    pub(super) fn publish(
        &mut self,
        topic: &str,
        payload: Vec<u8>,
        qos1: bool,
        buf: &mut BytesMut,
    ) -> Result<(), String> {
        let pkid = if qos1 {
            self.pkid = self.pkid.checked_add(1).unwrap_or(1);
            self.pkid
        } else {
            0
        };
        if self.protocol == 5 {
            let qos = if qos1 {
                rumqttc::v5::mqttbytes::QoS::AtLeastOnce
            } else {
                rumqttc::v5::mqttbytes::QoS::AtMostOnce
            };
            let mut p = v5::Publish::new(topic, qos, payload, None);
            p.pkid = pkid;
            v5::Packet::Publish(p)
                .write(buf, Some(MAX_PACKET as u32))
                .map(|_| ())
                .map_err(|e| e.to_string())
        } else {
            let qos = if qos1 {
                rumqttc::QoS::AtLeastOnce
            } else {
                rumqttc::QoS::AtMostOnce
            };
            let mut p = v4::Publish::new(topic, qos, payload);
            p.pkid = pkid;
            v4::Packet::Publish(p)
                .write(buf, MAX_PACKET)
                .map(|_| ())
                .map_err(|e| e.to_string())
        }
    }

    pub(super) fn ping(&self, buf: &mut BytesMut) -> Result<(), String> {
        if self.protocol == 5 {
            v5::Packet::PingReq(v5::PingReq)
                .write(buf, Some(MAX_PACKET as u32))
                .map(|_| ())
                .map_err(|e| e.to_string())
        } else {
            v4::Packet::PingReq
                .write(buf, MAX_PACKET)
                .map(|_| ())
                .map_err(|e| e.to_string())
        }
    }

    pub(super) fn disconnect(&self, buf: &mut BytesMut) -> Result<(), String> {
        if self.protocol == 5 {
            v5::Packet::Disconnect(v5::Disconnect::new(
                v5::DisconnectReasonCode::NormalDisconnection,
            ))
            .write(buf, Some(MAX_PACKET as u32))
            .map(|_| ())
            .map_err(|e| e.to_string())
        } else {
            v4::Packet::Disconnect
                .write(buf, MAX_PACKET)
                .map(|_| ())
                .map_err(|e| e.to_string())
        }
    }

    /// The next complete packet in `buf`, `Ok(None)` if more bytes are
    /// needed.
    pub(super) fn decode(&self, buf: &mut BytesMut) -> Result<Option<In>, String> {
        if buf.is_empty() {
            return Ok(None);
        }
        if self.protocol == 5 {
            match v5::Packet::read(buf, Some(MAX_PACKET as u32)) {
                Ok(v5::Packet::ConnAck(a)) => Ok(Some(In::ConnAck {
                    code: v5_code(a.code),
                    reason: a.properties.and_then(|p| p.reason_string),
                })),
                Ok(v5::Packet::PubAck(a)) => Ok(Some(In::PubAck {
                    ok: super::rumq5::puback_ok(&a.reason),
                })),
                Ok(v5::Packet::Disconnect(d)) => Ok(Some(In::Disconnect(format!(
                    "DISCONNECT {:?} {}",
                    d.reason_code,
                    d.properties
                        .and_then(|p| p.reason_string)
                        .unwrap_or_default()
                )))),
                Ok(_) => Ok(Some(In::Other)),
                Err(rumqttc::v5::mqttbytes::Error::InsufficientBytes(_)) => Ok(None),
                Err(rumqttc::v5::mqttbytes::Error::InvalidConnectReturnCode(c)) => {
                    // An unknown code still refuses the connection.
                    buf.clear();
                    Ok(Some(In::ConnAck {
                        code: c,
                        reason: None,
                    }))
                }
                Err(e) => Err(e.to_string()),
            }
        } else {
            match v4::Packet::read(buf, MAX_PACKET) {
                Ok(v4::Packet::ConnAck(a)) => Ok(Some(In::ConnAck {
                    code: v4_code(a.code),
                    reason: None,
                })),
                Ok(v4::Packet::PubAck(_)) => Ok(Some(In::PubAck { ok: true })),
                Ok(v4::Packet::Disconnect) => Ok(Some(In::Disconnect("DISCONNECT".into()))),
                Ok(_) => Ok(Some(In::Other)),
                Err(rumqttc::mqttbytes::Error::InsufficientBytes(_)) => Ok(None),
                Err(rumqttc::mqttbytes::Error::InvalidConnectReturnCode(c)) => {
                    buf.clear();
                    Ok(Some(In::ConnAck {
                        code: c,
                        reason: None,
                    }))
                }
                Err(e) => Err(e.to_string()),
            }
        }
    }
}

async fn resolve(host: &str, port: u16, source: Option<IpAddr>) -> Result<SocketAddr, String> {
    let addrs = tokio::net::lookup_host((host, port))
        .await
        .map_err(|e| format!("resolving {host}: {e}"))?;
    let mut addrs = addrs;
    addrs
        .find(|a| source.is_none_or(|ip| ip.is_ipv4() == a.is_ipv4()))
        .ok_or_else(|| format!("{host} has no address of the source address's family"))
}

pub(super) async fn connect(
    c: Credentials,
    target: &Target,
    source: Option<IpAddr>,
    stats: Arc<Stats>,
) -> Outcome {
    let addr = match resolve(&target.host, target.port, source).await {
        Ok(a) => a,
        Err(e) => return Outcome::Error(e),
    };
    let mut stream = match activation_client::socket::connect_from(addr, source).await {
        Ok(s) => s,
        Err(e) => return Outcome::Error(error_kind(&format!("I/O: {e}"))),
    };
    let codec = Codec::new(target.protocol);
    let mut out = BytesMut::with_capacity(256);
    if let Err(e) = codec.connect(&c, target.keepalive, &mut out) {
        return Outcome::Error(e);
    }
    if let Err(e) = stream.write_all(&out).await {
        return Outcome::Error(error_kind(&format!("I/O: {e}")));
    }
    let mut buf = BytesMut::with_capacity(256);
    loop {
        match codec.decode(&mut buf) {
            Ok(Some(In::ConnAck { code: 0, .. })) => break,
            Ok(Some(In::ConnAck { code, reason })) => {
                return Outcome::Refused { code, reason };
            }
            Ok(Some(other)) => return Outcome::Error(format!("expected CONNACK, got {other:?}")),
            Ok(None) => {}
            Err(e) => return Outcome::Error(error_kind(&e)),
        }
        match stream.read_buf(&mut buf).await {
            Ok(0) => return Outcome::Error("connection closed before CONNACK".into()),
            Ok(_) => {}
            Err(e) => return Outcome::Error(error_kind(&format!("I/O: {e}"))),
        }
    }
    let (tx, rx) = mpsc::channel(64);
    let acked = Arc::new(AtomicU64::new(0));
    let driver = tokio::spawn(drive(
        stream,
        buf,
        codec,
        target.keepalive,
        rx,
        stats,
        acked.clone(),
    ));
    Outcome::Accepted(Session::new(Backend::Own(tx), driver, acked))
}

async fn write(wr: &mut OwnedWriteHalf, out: &mut BytesMut) -> Result<(), SessionEnd> {
    let res = wr.write_all(out).await;
    out.clear();
    res.map_err(|e| end_from_error(&format!("I/O: {e}")))
}

async fn drive(
    stream: TcpStream,
    mut buf: BytesMut,
    mut codec: Codec,
    keepalive: u16,
    mut rx: mpsc::Receiver<Command>,
    stats: Arc<Stats>,
    acked: Arc<AtomicU64>,
) -> SessionEnd {
    let (mut rd, mut wr) = stream.into_split();
    let mut out = BytesMut::with_capacity(256);
    // Keep alive: a PINGREQ every `keepalive` seconds (an hour when off,
    // which never sends one within any realistic run).
    let period = Duration::from_secs(if keepalive == 0 {
        3600
    } else {
        u64::from(keepalive)
    });
    let mut ping = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
    loop {
        tokio::select! {
            cmd = rx.recv() => {
                let res = match cmd {
                    Some(Command::Publish { topic, payload, qos1 }) => {
                        codec.publish(&topic, payload, qos1, &mut out)
                    }
                    Some(Command::Disconnect) => {
                        if let Err(e) = codec.disconnect(&mut out) {
                            return SessionEnd::Failed(e);
                        }
                        if let Err(end) = write(&mut wr, &mut out).await {
                            return end;
                        }
                        let _ = wr.shutdown().await;
                        return SessionEnd::Disconnected;
                    }
                    // The session was dropped: close without DISCONNECT.
                    None => return SessionEnd::Failed("session dropped".into()),
                };
                if let Err(e) = res {
                    return SessionEnd::Failed(e);
                }
                if let Err(end) = write(&mut wr, &mut out).await {
                    return end;
                }
            }
            _ = ping.tick(), if keepalive > 0 => {
                if let Err(e) = codec.ping(&mut out) {
                    return SessionEnd::Failed(e);
                }
                if let Err(end) = write(&mut wr, &mut out).await {
                    return end;
                }
            }
            n = rd.read_buf(&mut buf) => {
                match n {
                    Ok(0) => return SessionEnd::ClosedByServer("connection closed".into()),
                    Ok(_) => {}
                    Err(e) => return end_from_error(&format!("I/O: {e}")),
                }
                loop {
                    match codec.decode(&mut buf) {
                        Ok(Some(In::PubAck { ok })) => {
                            acked.fetch_add(1, Ordering::Relaxed);
                            if ok {
                                stats.msg_acked();
                            } else {
                                stats.msg_rejected();
                            }
                        }
                        Ok(Some(In::Disconnect(reason))) => {
                            return SessionEnd::ClosedByServer(reason);
                        }
                        Ok(Some(_)) => {}
                        Ok(None) => break,
                        Err(e) => return SessionEnd::Failed(e),
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encodes_connect_and_decodes_connack() {
        for protocol in [4u8, 5] {
            let codec = Codec::new(protocol);
            let c = Credentials {
                id: "pk.dk".into(),
                user: "pk&dk&1".into(),
                password: "ab".into(),
            };
            let mut buf = BytesMut::new();
            codec.connect(&c, 30, &mut buf).expect("encode");
            // The protocol level byte follows "MQTT".
            let pos = buf
                .windows(4)
                .position(|w| w == b"MQTT")
                .expect("protocol name");
            assert_eq!(buf[pos + 4], protocol);
            let mut partial = BytesMut::from(&[0x20u8][..]);
            assert!(matches!(codec.decode(&mut partial), Ok(None)));
        }
        let codec = Codec::new(5);
        // CONNACK, remaining length 3, flags 0, reason 0x97, no properties.
        let mut buf = BytesMut::from(&[0x20u8, 0x03, 0x00, 0x97, 0x00][..]);
        match codec.decode(&mut buf) {
            Ok(Some(In::ConnAck { code, .. })) => assert_eq!(code, 0x97),
            other => panic!("{other:?}"),
        }
        // With a Reason String, as the activation broker sends them.
        let ack = v5::ConnAck {
            session_present: false,
            code: v5::ConnectReturnCode::QuotaExceeded,
            properties: Some(v5::ConnAckProperties {
                session_expiry_interval: None,
                receive_max: None,
                max_qos: None,
                retain_available: None,
                max_packet_size: None,
                assigned_client_identifier: None,
                topic_alias_max: None,
                reason_string: Some("no activation code available for product P".into()),
                user_properties: Vec::new(),
                wildcard_subscription_available: None,
                subscription_identifiers_available: None,
                shared_subscription_available: None,
                server_keep_alive: None,
                response_information: None,
                server_reference: None,
                authentication_method: None,
                authentication_data: None,
            }),
        };
        let mut buf = BytesMut::new();
        v5::Packet::ConnAck(ack)
            .write(&mut buf, None)
            .expect("encode");
        match codec.decode(&mut buf) {
            Ok(Some(In::ConnAck { code, reason })) => {
                assert_eq!(code, 0x97);
                assert_eq!(
                    reason.as_deref(),
                    Some("no activation code available for product P")
                );
            }
            other => panic!("{other:?}"),
        }
        let codec = Codec::new(4);
        let mut buf = BytesMut::from(&[0x20u8, 0x02, 0x00, 0x05][..]);
        match codec.decode(&mut buf) {
            Ok(Some(In::ConnAck { code, .. })) => assert_eq!(code, 0x05),
            other => panic!("{other:?}"),
        }
    }
}

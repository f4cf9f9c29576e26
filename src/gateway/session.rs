//! The protocol state of one admitted session: topic aliases, the ACL,
//! PUBLISH / SUBSCRIBE / UNSUBSCRIBE / PING / DISCONNECT from the client and
//! notifications from the router. No I/O: packets for the client go into
//! `wbuf`, packets for the router into `to_router`; the connection loop
//! (`connection.rs`) moves them.
//!
//! - PINGREQ, SUBACK and UNSUBACK are answered here (the router's own are
//!   dropped). A SUBACK goes out only once its SUBSCRIBE is in the router's
//!   event channel (the connection loop sends before it writes), where it
//!   is ahead of every publish sent after: no device waits for the router
//!   thread to subscribe.
//! - PUBLISH outside the ACL is dropped: MQTT 5 gets PUBACK/PUBREC 0x87;
//!   MQTT 3.1.1 gets a plain PUBACK/PUBREC (and PUBCOMP for its PUBREL) so
//!   it does not retry — 3.1.1 has no way to say "refused" and closing
//!   would make misconfigured devices reconnect in a loop.
//! - SUBSCRIBE filters outside the ACL get 0x87 (MQTT 5) / 0x80 (3.1.1) in
//!   the SUBACK, the others go to the router, granted the QoS asked for.

use std::collections::{HashMap, HashSet};

use bytes::{Bytes, BytesMut};
use rumqttd::protocol::{
    DisconnectReasonCode, Packet, PingResp, PubAck, PubAckReason, PubComp, PubCompReason, PubRec,
    PubRecReason, Publish, PublishProperties, QoS, SubAck, Subscribe, SubscribeProperties,
    SubscribeReasonCode, UnsubAck, UnsubAckReason,
};
use rumqttd::Notification;

use super::acl::{valid_topic_name, Acl, SubscribeVerdict};
use super::codec::Codec;
use super::codes::DisconnectReason;
use super::delivery::{ClientLimits, Delivery, Out};
use super::lingering::SessionExpiry;
use super::{ListenerConfig, ProtocolVersion};

/// How a session ended.
pub(crate) struct End {
    /// For logs and the `device/disconnected` event.
    pub(crate) reason: String,
    /// Whether the will is due (if the session was not taken over).
    pub(crate) will: bool,
    /// Another connection took the session over (it goes on there, so no
    /// will and no session end).
    pub(crate) taken_over: bool,
    /// The router already dropped the link.
    pub(crate) link_gone: bool,
    /// DISCONNECT to send to an MQTT 5 client.
    pub(crate) notify: Option<(DisconnectReason, String)>,
    /// The client broke the protocol: drain its input briefly after the
    /// DISCONNECT so that it reads it (see `codec::close_lingering`).
    pub(crate) linger: bool,
}

impl End {
    pub(crate) fn client(with_will: bool) -> Self {
        End {
            reason: String::from("client disconnected"),
            will: with_will,
            taken_over: false,
            link_gone: false,
            notify: None,
            linger: false,
        }
    }

    pub(crate) fn closed(why: impl std::fmt::Display) -> Self {
        End {
            reason: why.to_string(),
            will: true,
            taken_over: false,
            link_gone: false,
            notify: None,
            linger: false,
        }
    }

    pub(crate) fn violation(reason: DisconnectReason, message: impl Into<String>) -> Self {
        let message = message.into();
        End {
            reason: format!("{}: {message}", reason.as_str()),
            will: true,
            taken_over: false,
            link_gone: false,
            notify: Some((reason, message)),
            // A silent client is likely gone: nothing to drain.
            linger: reason != DisconnectReason::KeepAliveTimeout,
        }
    }

    pub(crate) fn ordered(reason: DisconnectReason, message: String) -> Self {
        End {
            reason: if message.is_empty() {
                reason.as_str().to_owned()
            } else {
                format!("{}: {message}", reason.as_str())
            },
            will: true,
            taken_over: reason == DisconnectReason::SessionTakenOver,
            link_gone: false,
            notify: Some((reason, message)),
            linger: false,
        }
    }

    pub(crate) fn router(why: &str) -> Self {
        End {
            reason: why.to_owned(),
            will: true,
            taken_over: false,
            link_gone: true,
            notify: None,
            linger: false,
        }
    }
}

/// Per-session state of an admitted connection.
pub(crate) struct Session<'a> {
    pub(crate) codec: Codec,
    acl: &'a Acl,
    cfg: &'a ListenerConfig,
    /// Encoded packets for the client.
    pub(crate) wbuf: BytesMut,
    /// Packets for the router.
    pub(crate) to_router: Vec<Packet>,
    /// MQTT 5 topic aliases set by the client (resolved here so the ACL
    /// sees real topics; the router never sees an alias).
    aliases: HashMap<u16, Bytes>,
    /// QoS 2 PUBLISHes dropped by the ACL whose PUBREL we answer ourselves.
    denied_qos2: HashSet<u16>,
    /// Deliveries from the router on their way to the client.
    delivery: Delivery,
    /// QoS 1/2 PUBLISHes of an MQTT 5 client not yet acked to it (its
    /// count is bounded by the listener's Receive Maximum; kept only when
    /// that is below 65535, the most packet ids there are).
    /// (Boxed: 8 bytes in every idle session instead of a set's 48.)
    #[allow(clippy::box_collection)]
    inbound: Option<Box<HashSet<u16>>>,
    /// Whether the session has its router link (clean sessions get it on
    /// their first SUBSCRIBE or PUBLISH).
    pub(crate) linked: bool,
    /// From the CONNECT; an MQTT 5 DISCONNECT may change it.
    pub(crate) session_expiry: SessionExpiry,
}

impl<'a> Session<'a> {
    pub(crate) fn new(
        codec: Codec,
        acl: &'a Acl,
        cfg: &'a ListenerConfig,
        wbuf: BytesMut,
        linked: bool,
        session_expiry: SessionExpiry,
        limits: ClientLimits,
    ) -> Self {
        Session {
            codec,
            acl,
            cfg,
            wbuf,
            to_router: Vec::new(),
            aliases: HashMap::new(),
            denied_qos2: HashSet::new(),
            delivery: Delivery::new(limits, !acl.deny_subscribe.is_empty()),
            inbound: None,
            linked,
            session_expiry,
        }
    }

    fn v5(&self) -> bool {
        self.codec.version() == ProtocolVersion::V5
    }

    pub(crate) fn write(&mut self, packet: Packet) {
        self.codec.write(packet, &mut self.wbuf);
    }

    /// Queues `packet` for the router; without a link (nothing was ever
    /// sent to the router) acks of router traffic have nothing to ack.
    fn forward_if_linked(&mut self, packet: Packet) {
        if self.linked {
            self.to_router.push(packet);
        }
    }

    pub(crate) fn on_packet(&mut self, packet: Packet, peeked: Option<(u8, u16)>) -> Option<End> {
        match packet {
            Packet::Publish(publish, props) => self.on_publish(publish, props, peeked),
            Packet::PubAck(a, _) => {
                let pkid = a.pkid;
                self.forward_if_linked(Packet::PubAck(a, None));
                self.deliver(|d, out| d.client_acked(pkid, true, out));
                None
            }
            Packet::PubRec(a, _) => {
                let pkid = a.pkid;
                // A PUBREC with an error code ends the exchange (MQTT 5 4.9).
                let done = !matches!(
                    a.reason,
                    PubRecReason::Success | PubRecReason::NoMatchingSubscribers
                );
                self.forward_if_linked(Packet::PubRec(a, None));
                self.deliver(|d, out| d.client_acked(pkid, done, out));
                None
            }
            Packet::PubRel(r, _) => {
                let denied = self.denied_qos2.remove(&r.pkid);
                if denied || !self.linked {
                    // Unlinked, the router never saw this packet id.
                    let reason = if denied || !self.v5() {
                        PubCompReason::Success
                    } else {
                        PubCompReason::PacketIdentifierNotFound
                    };
                    self.write(Packet::PubComp(
                        PubComp {
                            pkid: r.pkid,
                            reason,
                        },
                        None,
                    ));
                } else {
                    // The router only recognises PUBREL without properties.
                    self.to_router.push(Packet::PubRel(r, None));
                }
                None
            }
            Packet::PubComp(c, _) => {
                let pkid = c.pkid;
                self.forward_if_linked(Packet::PubComp(c, None));
                self.deliver(|d, out| d.client_completed(pkid, out));
                None
            }
            Packet::Subscribe(s, props) => self.on_subscribe(s, props),
            Packet::Unsubscribe(u, _) => {
                // Answered here: the router acks only filters it knows,
                // one UNSUBACK per filter.
                let reasons = vec![UnsubAckReason::Success; u.filters.len()];
                self.write(Packet::UnsubAck(
                    UnsubAck {
                        pkid: u.pkid,
                        reasons,
                    },
                    None,
                ));
                self.forward_if_linked(Packet::Unsubscribe(u, None));
                None
            }
            Packet::PingReq(_) => {
                self.write(Packet::PingResp(PingResp));
                None
            }
            Packet::Disconnect(d, props) => {
                if let Some(n) = props.and_then(|p| p.session_expiry_interval) {
                    if self.session_expiry == SessionExpiry::WithConnection && n != 0 {
                        return Some(End::violation(
                            DisconnectReason::ProtocolError,
                            "a Session Expiry Interval of 0 at CONNECT cannot be raised at DISCONNECT",
                        ));
                    }
                    self.session_expiry = SessionExpiry::from_interval(Some(n));
                }
                Some(End::client(
                    d.reason_code == DisconnectReasonCode::DisconnectWithWillMessage,
                ))
            }
            Packet::Connect(..) => Some(End::violation(
                DisconnectReason::ProtocolError,
                "second CONNECT",
            )),
            Packet::ConnAck(..)
            | Packet::SubAck(..)
            | Packet::UnsubAck(..)
            | Packet::PingResp(_) => Some(End::violation(
                DisconnectReason::ProtocolError,
                "packet type not allowed from a client",
            )),
        }
    }

    fn on_publish(
        &mut self,
        mut publish: Publish,
        mut props: Option<PublishProperties>,
        peeked: Option<(u8, u16)>,
    ) -> Option<End> {
        if let Some(p) = props.as_mut() {
            if !p.subscription_identifiers.is_empty() {
                return Some(End::violation(
                    DisconnectReason::ProtocolError,
                    "PUBLISH from a client must not carry subscription identifiers",
                ));
            }
            if let Some(alias) = p.topic_alias.take() {
                if alias == 0 || alias > self.cfg.topic_alias_max {
                    return Some(End::violation(
                        DisconnectReason::TopicAliasInvalid,
                        format!("topic alias {alias} out of range"),
                    ));
                }
                if publish.topic.is_empty() {
                    match self.aliases.get(&alias) {
                        Some(t) => publish.topic = t.clone(),
                        None => {
                            return Some(End::violation(
                                DisconnectReason::ProtocolError,
                                format!("topic alias {alias} is not set"),
                            ))
                        }
                    }
                } else {
                    self.aliases.insert(alias, publish.topic.clone());
                }
            }
        }
        let Ok(topic) = std::str::from_utf8(&publish.topic) else {
            return Some(End::violation(
                DisconnectReason::MalformedPacket,
                "topic is not UTF-8",
            ));
        };
        if !valid_topic_name(topic) {
            return Some(End::violation(
                DisconnectReason::TopicNameInvalid,
                "topic name is empty or contains wildcards",
            ));
        }
        if self.acl.may_publish(topic) {
            let max = self.cfg.receive_maximum;
            if let (true, true, Some((1 | 2, pkid))) = (self.v5(), max < u16::MAX, peeked) {
                let inbound = self.inbound.get_or_insert_with(Box::default);
                inbound.insert(pkid);
                if inbound.len() > usize::from(max) {
                    return Some(End::violation(
                        DisconnectReason::ReceiveMaximumExceeded,
                        format!(
                            "more than {} QoS 1/2 PUBLISHes awaiting their acks",
                            self.cfg.receive_maximum
                        ),
                    ));
                }
            }
            self.to_router.push(Packet::Publish(publish, props));
            return None;
        }
        // The reason code says it (0x87); no Reason String, which some
        // clients' PUBACK parsers refuse (e.g. the Paho test suite's).
        tracing::debug!(topic, "PUBLISH outside the ACL dropped");
        let (qos, pkid) = peeked.unwrap_or((0, 0));
        let v5 = self.v5();
        match qos {
            1 => self.write(Packet::PubAck(
                PubAck {
                    pkid,
                    reason: if v5 {
                        PubAckReason::NotAuthorized
                    } else {
                        PubAckReason::Success
                    },
                },
                None,
            )),
            2 => {
                self.denied_qos2.insert(pkid);
                self.write(Packet::PubRec(
                    PubRec {
                        pkid,
                        reason: if v5 {
                            PubRecReason::NotAuthorized
                        } else {
                            PubRecReason::Success
                        },
                    },
                    None,
                ));
            }
            _ => {}
        }
        None
    }

    fn on_subscribe(&mut self, sub: Subscribe, props: Option<SubscribeProperties>) -> Option<End> {
        if props.as_ref().and_then(|p| p.id) == Some(0) {
            return Some(End::violation(
                DisconnectReason::ProtocolError,
                "subscription identifier 0",
            ));
        }
        let v5 = self.v5();
        let mut return_codes = Vec::with_capacity(sub.filters.len());
        let mut allowed = Vec::with_capacity(sub.filters.len());
        for f in sub.filters {
            let code = match self.acl.check_subscribe(&f.path) {
                // What the router grants: the QoS asked for (it refuses
                // nothing the ACL allows: `$` filters but `$share/` ones
                // and subscription identifier 0 never get here).
                SubscribeVerdict::Allowed => {
                    if let Some(w) = &self.cfg.subscribe_watch {
                        w.note(&f.path);
                    }
                    let granted = match f.qos {
                        QoS::AtMostOnce => SubscribeReasonCode::QoS0,
                        QoS::AtLeastOnce => SubscribeReasonCode::QoS1,
                        QoS::ExactlyOnce => SubscribeReasonCode::QoS2,
                    };
                    allowed.push(f);
                    granted
                }
                SubscribeVerdict::NotAuthorized => {
                    tracing::debug!(filter = %f.path, "SUBSCRIBE outside the ACL refused");
                    if v5 {
                        SubscribeReasonCode::NotAuthorized
                    } else {
                        SubscribeReasonCode::Failure
                    }
                }
                SubscribeVerdict::Invalid => {
                    if v5 {
                        SubscribeReasonCode::TopicFilterInvalid
                    } else {
                        SubscribeReasonCode::Failure
                    }
                }
            };
            return_codes.push(code);
        }
        // Answered here, not by the router: the connection writes this out
        // only once the SUBSCRIBE is in the router's channel, where it is
        // ahead of every publish sent after it (`RouterHandle::connect_quiet`;
        // rumqttd handles a link's SUBSCRIBE even while it holds the link's
        // publishes back). A quiet link gets no SUBACK from the router;
        // another link's is dropped.
        self.write(Packet::SubAck(
            SubAck {
                pkid: sub.pkid,
                return_codes,
            },
            None,
        ));
        if !allowed.is_empty() {
            self.to_router.push(Packet::Subscribe(
                Subscribe {
                    pkid: sub.pkid,
                    filters: allowed,
                },
                props,
            ));
        }
        None
    }

    pub(crate) fn on_notification(
        &mut self,
        n: Notification,
        unschedule: &mut bool,
    ) -> Option<End> {
        if matches!(n, Notification::Unschedule) {
            *unschedule = true;
            return None;
        }
        match Option::<Packet>::from(n) {
            None => None,
            // Answered here already.
            Some(
                Packet::ConnAck(..)
                | Packet::SubAck(..)
                | Packet::UnsubAck(..)
                | Packet::PingResp(_),
            ) => None,
            Some(Packet::Disconnect(d, props)) => {
                let why = format!("router disconnected the session: {:?}", d.reason_code);
                if self.v5() {
                    self.write(Packet::Disconnect(d, props));
                }
                Some(End::router(&why))
            }
            Some(Packet::Publish(publish, props)) => {
                let receivable = self.may_receive(&publish.topic);
                self.deliver(|d, out| d.publish(publish, props, receivable, out));
                None
            }
            Some(Packet::PubRel(rel, props)) => {
                self.deliver(|d, out| d.pubrel(rel, props, out));
                None
            }
            Some(Packet::PubAck(ack, props)) => {
                if let Some(inbound) = self.inbound.as_mut() {
                    inbound.remove(&ack.pkid);
                }
                self.write(Packet::PubAck(ack, props));
                None
            }
            Some(Packet::PubComp(comp, props)) => {
                if let Some(inbound) = self.inbound.as_mut() {
                    inbound.remove(&comp.pkid);
                }
                self.write(Packet::PubComp(comp, props));
                None
            }
            // A refused QoS 2 PUBLISH (e.g. 0x97 over a retained quota)
            // ends at its PUBREC.
            Some(Packet::PubRec(rec, props))
                if !matches!(
                    rec.reason,
                    PubRecReason::Success | PubRecReason::NoMatchingSubscribers
                ) =>
            {
                if let Some(inbound) = self.inbound.as_mut() {
                    inbound.remove(&rec.pkid);
                }
                self.write(Packet::PubRec(rec, props));
                None
            }
            Some(p) => {
                self.write(p);
                None
            }
        }
    }

    /// Whether a message on `topic` may be delivered (`deny_subscribe`
    /// carves topics out of wider subscriptions).
    fn may_receive(&self, topic: &[u8]) -> bool {
        self.acl.deny_subscribe.is_empty()
            || std::str::from_utf8(topic).is_ok_and(|t| self.acl.may_receive(t))
    }

    /// Runs `f` on the delivery state with this session's outputs.
    fn deliver(&mut self, f: impl FnOnce(&mut Delivery, &mut Out<'_>)) {
        let mut out = Out {
            codec: &self.codec,
            wbuf: &mut self.wbuf,
            to_router: &mut self.to_router,
        };
        f(&mut self.delivery, &mut out);
    }
}

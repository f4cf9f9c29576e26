//! The protocol state of one admitted session: topic aliases, the ACL,
//! PUBLISH / SUBSCRIBE / UNSUBSCRIBE / PING / DISCONNECT from the client and
//! notifications from the router. No I/O: packets for the client go into
//! `wbuf`, packets for the router into `to_router`; the connection loop
//! (`connection.rs`) moves them.
//!
//! - PINGREQ and UNSUBACK are answered here.
//! - PUBLISH outside the ACL is dropped: MQTT 5 gets PUBACK/PUBREC 0x87;
//!   MQTT 3.1.1 gets a plain PUBACK/PUBREC (and PUBCOMP for its PUBREL) so
//!   it does not retry — 3.1.1 has no way to say "refused" and closing
//!   would make misconfigured devices reconnect in a loop.
//! - SUBSCRIBE filters outside the ACL get 0x87 (MQTT 5) / 0x80 (3.1.1) in
//!   the SUBACK, the others go to the router and the codes are merged back
//!   in order.

use std::collections::{HashMap, HashSet, VecDeque};

use bytes::{Bytes, BytesMut};
use rumqttd::protocol::{
    DisconnectReasonCode, Packet, PingResp, PubAck, PubAckProperties, PubAckReason, PubComp,
    PubCompReason, PubRec, PubRecProperties, PubRecReason, Publish, PublishProperties, QoS, SubAck,
    Subscribe, SubscribeProperties, SubscribeReasonCode, UnsubAck, UnsubAckReason,
};
use rumqttd::Notification;

use super::acl::{valid_topic_name, Acl, SubscribeVerdict};
use super::codec::Codec;
use super::codes::DisconnectReason;
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
}

impl End {
    pub(crate) fn client(with_will: bool) -> Self {
        End {
            reason: String::from("client disconnected"),
            will: with_will,
            taken_over: false,
            link_gone: false,
            notify: None,
        }
    }

    pub(crate) fn closed(why: impl std::fmt::Display) -> Self {
        End {
            reason: why.to_string(),
            will: true,
            taken_over: false,
            link_gone: false,
            notify: None,
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
        }
    }

    pub(crate) fn router(why: &str) -> Self {
        End {
            reason: why.to_owned(),
            will: true,
            taken_over: false,
            link_gone: true,
            notify: None,
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
    /// SUBSCRIBEs partly refused: the codes already decided (`Some`) and
    /// the slots the router's SUBACK fills (`None`), by packet id.
    pending_subacks: HashMap<u16, Vec<Option<SubscribeReasonCode>>>,
    /// QoS 2 PUBLISHes dropped by the ACL whose PUBREL we answer ourselves.
    denied_qos2: HashSet<u16>,
    /// QoS 1/2 deliveries of the router awaiting their PUBACK/PUBREC, in
    /// the router's order (it takes acks only in that order); `Some(qos)`
    /// for one withheld by `deny_subscribe`, acked here once its turn comes.
    /// Kept only for sessions with a `deny_subscribe` list.
    await_ack: VecDeque<(u16, Option<QoS>)>,
    /// The router's PUBRELs awaiting PUBCOMP, in its order; `true` for a
    /// withheld delivery's, completed here once its turn comes.
    await_comp: VecDeque<(u16, bool)>,
    /// Withheld QoS 2 deliveries whose PUBREL is still to come.
    withheld_qos2: HashSet<u16>,
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
    ) -> Self {
        Session {
            codec,
            acl,
            cfg,
            wbuf,
            to_router: Vec::new(),
            aliases: HashMap::new(),
            pending_subacks: HashMap::new(),
            denied_qos2: HashSet::new(),
            await_ack: VecDeque::new(),
            await_comp: VecDeque::new(),
            withheld_qos2: HashSet::new(),
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
                self.acked(pkid);
                None
            }
            Packet::PubRec(a, _) => {
                let pkid = a.pkid;
                self.forward_if_linked(Packet::PubRec(a, None));
                self.acked(pkid);
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
                if self.await_comp.front().is_some_and(|(p, _)| *p == pkid) {
                    self.await_comp.pop_front();
                    self.release_comps();
                }
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
            self.to_router.push(Packet::Publish(publish, props));
            return None;
        }
        tracing::debug!(topic, "PUBLISH outside the ACL dropped");
        let (qos, pkid) = peeked.unwrap_or((0, 0));
        let reason = format!("not authorized to publish to {topic}");
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
                v5.then(|| PubAckProperties {
                    reason_string: Some(reason),
                    user_properties: Vec::new(),
                }),
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
                    v5.then(|| PubRecProperties {
                        reason_string: Some(reason),
                        user_properties: Vec::new(),
                    }),
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
        let mut slots = Vec::with_capacity(sub.filters.len());
        let mut allowed = Vec::with_capacity(sub.filters.len());
        for f in sub.filters {
            match self.acl.check_subscribe(&f.path) {
                SubscribeVerdict::Allowed => {
                    slots.push(None);
                    allowed.push(f);
                }
                SubscribeVerdict::NotAuthorized => {
                    tracing::debug!(filter = %f.path, "SUBSCRIBE outside the ACL refused");
                    slots.push(Some(if v5 {
                        SubscribeReasonCode::NotAuthorized
                    } else {
                        SubscribeReasonCode::Failure
                    }));
                }
                SubscribeVerdict::Invalid => slots.push(Some(if v5 {
                    SubscribeReasonCode::TopicFilterInvalid
                } else {
                    SubscribeReasonCode::Failure
                })),
            }
        }
        if allowed.is_empty() {
            self.write(Packet::SubAck(
                SubAck {
                    pkid: sub.pkid,
                    return_codes: slots.into_iter().flatten().collect(),
                },
                None,
            ));
            return None;
        }
        if allowed.len() != slots.len() {
            self.pending_subacks.insert(sub.pkid, slots);
        }
        self.to_router.push(Packet::Subscribe(
            Subscribe {
                pkid: sub.pkid,
                filters: allowed,
            },
            props,
        ));
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
            Some(Packet::ConnAck(..) | Packet::UnsubAck(..) | Packet::PingResp(_)) => None,
            Some(Packet::SubAck(mut ack, props)) => {
                if let Some(slots) = self.pending_subacks.remove(&ack.pkid) {
                    let mut from_router = ack.return_codes.into_iter();
                    ack.return_codes = slots
                        .into_iter()
                        .map(|s| {
                            s.or_else(|| from_router.next())
                                .unwrap_or(SubscribeReasonCode::Unspecified)
                        })
                        .collect();
                }
                self.write(Packet::SubAck(ack, props));
                None
            }
            Some(Packet::Disconnect(d, props)) => {
                let why = format!("router disconnected the session: {:?}", d.reason_code);
                if self.v5() {
                    self.write(Packet::Disconnect(d, props));
                }
                Some(End::router(&why))
            }
            Some(Packet::Publish(publish, _)) if !self.may_receive(&publish.topic) => {
                self.withhold(&publish);
                None
            }
            Some(Packet::Publish(publish, props)) => {
                if publish.qos() != QoS::AtMostOnce && !self.acl.deny_subscribe.is_empty() {
                    self.await_ack.push_back((publish.pkid(), None));
                }
                self.write(Packet::Publish(publish, props));
                None
            }
            Some(Packet::PubRel(rel, props)) => {
                let withheld = self.withheld_qos2.remove(&rel.pkid);
                if !self.acl.deny_subscribe.is_empty() {
                    self.await_comp.push_back((rel.pkid, withheld));
                }
                if withheld {
                    self.release_comps();
                } else {
                    self.write(Packet::PubRel(rel, props));
                }
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

    /// The client acked delivery `pkid`: withheld deliveries right behind
    /// it are acked now.
    fn acked(&mut self, pkid: u16) {
        if self.await_ack.front().is_some_and(|(p, _)| *p == pkid) {
            self.await_ack.pop_front();
            self.release_acks();
        }
    }

    /// Acks to the router the withheld deliveries at the head of the queue.
    fn release_acks(&mut self) {
        while let Some(&(pkid, Some(qos))) = self.await_ack.front() {
            self.await_ack.pop_front();
            if qos == QoS::AtLeastOnce {
                self.to_router.push(Packet::PubAck(
                    PubAck {
                        pkid,
                        reason: PubAckReason::Success,
                    },
                    None,
                ));
            } else {
                self.withheld_qos2.insert(pkid);
                self.to_router.push(Packet::PubRec(
                    PubRec {
                        pkid,
                        reason: PubRecReason::Success,
                    },
                    None,
                ));
            }
        }
    }

    /// Completes to the router the withheld deliveries at the head of the
    /// PUBREL queue.
    fn release_comps(&mut self) {
        while let Some(&(pkid, true)) = self.await_comp.front() {
            self.await_comp.pop_front();
            self.to_router.push(Packet::PubComp(
                PubComp {
                    pkid,
                    reason: PubCompReason::Success,
                },
                None,
            ));
        }
    }

    /// Drops a delivery the session may not receive, acknowledging it to
    /// the router as the client would have, in the router's order.
    fn withhold(&mut self, publish: &Publish) {
        tracing::debug!(topic = %String::from_utf8_lossy(&publish.topic), pkid = publish.pkid(), "delivery withheld by deny_subscribe");
        if publish.qos() != QoS::AtMostOnce {
            self.await_ack
                .push_back((publish.pkid(), Some(publish.qos())));
            self.release_acks();
        }
    }
}

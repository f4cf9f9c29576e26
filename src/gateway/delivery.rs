//! What the router delivers to one session, on its way to the client:
//!
//! - **Withheld deliveries**: a message the session may not receive (its
//!   topic is in the ACL's `deny_subscribe`, reached through a wider
//!   subscription such as `#`) or larger than the client's MQTT 5 Maximum
//!   Packet Size is not sent; the router gets the acks the client would
//!   have given. The router takes acks only in the order it sent its
//!   PUBLISHes (and PUBRELs), so a withheld delivery is acked once every
//!   delivery before it has been.
//! - **Receive Maximum** (MQTT 5 flow control): at most that many QoS 1/2
//!   PUBLISHes unacknowledged by the client; the next wait here, in order,
//!   until a PUBACK or PUBCOMP frees a slot. They are bounded by the
//!   router's own in-flight limit per link.
//! - **Server topic aliases**: to a client that accepts them (Topic Alias
//!   Maximum in its CONNECT), the first topics delivered get an alias each;
//!   later PUBLISHes on them carry the alias and an empty topic.
//!
//! No I/O: packets for the client go into a write buffer, acks for the
//! router into a packet list (see `session.rs`).

use std::collections::{HashMap, HashSet, VecDeque};

use bytes::{Bytes, BytesMut};
use rumqttd::protocol::{
    Packet, PubAck, PubAckReason, PubComp, PubCompReason, PubRec, PubRecReason, PubRel,
    PubRelProperties, Publish, PublishProperties, QoS,
};

use super::codec::Codec;

/// What the client said it can take (MQTT 5 CONNECT properties).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ClientLimits {
    /// QoS 1/2 PUBLISHes it accepts unacknowledged.
    pub(crate) receive_maximum: u16,
    /// Largest packet it accepts, whole (fixed header included).
    pub(crate) max_packet_size: Option<usize>,
    /// Topic aliases it accepts from the server.
    pub(crate) topic_alias_max: u16,
}

impl ClientLimits {
    /// MQTT 3.1.1 and MQTT 5 defaults: no limit, no aliases.
    pub(crate) const NONE: ClientLimits = ClientLimits {
        receive_maximum: u16::MAX,
        max_packet_size: None,
        topic_alias_max: 0,
    };
}

/// The packets a delivery step produced: for the client and for the router.
pub(crate) struct Out<'a> {
    pub(crate) codec: &'a Codec,
    pub(crate) wbuf: &'a mut BytesMut,
    pub(crate) to_router: &'a mut Vec<Packet>,
}

pub(crate) struct Delivery {
    limits: ClientLimits,
    /// Whether deliveries may be withheld (a deny list or a packet size
    /// limit): only then is the router's order of acks recorded.
    track: bool,
    /// Allocated at the first delivery that needs it: an idle session
    /// (most devices) carries none of it.
    state: Option<Box<State>>,
}

#[derive(Default)]
struct State {
    /// QoS 1/2 deliveries awaiting PUBACK/PUBREC, in the router's order;
    /// `Some(qos)` for a withheld one, acked here when its turn comes.
    await_ack: VecDeque<(u16, Option<QoS>)>,
    /// The router's PUBRELs awaiting PUBCOMP, in its order; `true` for a
    /// withheld delivery's, completed here when its turn comes.
    await_comp: VecDeque<(u16, bool)>,
    /// Withheld QoS 2 deliveries whose PUBREL is still to come.
    withheld_qos2: HashSet<u16>,
    /// QoS 1/2 PUBLISHes written and not yet PUBACKed / PUBCOMPed.
    in_flight: usize,
    /// QoS 1/2 PUBLISHes waiting for a Receive Maximum slot.
    held: VecDeque<(Publish, Option<PublishProperties>)>,
    /// Server topic aliases by topic.
    aliases: HashMap<Bytes, u16>,
}

impl Delivery {
    /// `withholds`: the session has a deny list for deliveries.
    pub(crate) fn new(limits: ClientLimits, withholds: bool) -> Self {
        Delivery {
            limits,
            track: withholds || limits.max_packet_size.is_some(),
            state: None,
        }
    }

    fn state(&mut self) -> &mut State {
        self.state.get_or_insert_with(Box::default)
    }

    /// A PUBLISH from the router; `receivable` is the ACL's verdict on its
    /// topic.
    pub(crate) fn publish(
        &mut self,
        publish: Publish,
        props: Option<PublishProperties>,
        receivable: bool,
        out: &mut Out<'_>,
    ) {
        let qos = publish.qos();
        let too_big = self
            .limits
            .max_packet_size
            .is_some_and(|max| encoded_len(out.codec, &publish, &props) + self.alias_room() > max);
        if !receivable || too_big {
            tracing::debug!(
                topic = %String::from_utf8_lossy(&publish.topic),
                too_big,
                "delivery withheld"
            );
            if qos != QoS::AtMostOnce {
                let state = self.state();
                state.await_ack.push_back((publish.pkid(), Some(qos)));
                state.release_acks(out);
            }
            return;
        }
        if qos == QoS::AtMostOnce {
            self.write(publish, props, out);
            return;
        }
        let (track, max) = (self.track, usize::from(self.limits.receive_maximum));
        let state = self.state();
        if track {
            state.await_ack.push_back((publish.pkid(), None));
        }
        if state.in_flight >= max || !state.held.is_empty() {
            state.held.push_back((publish, props));
        } else {
            self.write(publish, props, out);
        }
    }

    /// A PUBREL from the router (QoS 2 delivery, second step).
    pub(crate) fn pubrel(
        &mut self,
        rel: PubRel,
        props: Option<PubRelProperties>,
        out: &mut Out<'_>,
    ) {
        let Some(state) = self.state.as_mut() else {
            out.codec.write(Packet::PubRel(rel, props), out.wbuf);
            return;
        };
        let withheld = state.withheld_qos2.remove(&rel.pkid);
        if self.track {
            state.await_comp.push_back((rel.pkid, withheld));
        }
        if withheld {
            state.release_comps(out);
        } else {
            out.codec.write(Packet::PubRel(rel, props), out.wbuf);
        }
    }

    /// The client's PUBACK (QoS 1 done) or PUBREC (QoS 2 received).
    pub(crate) fn client_acked(&mut self, pkid: u16, done: bool, out: &mut Out<'_>) {
        let Some(state) = self.state.as_mut() else {
            return;
        };
        if state.await_ack.front().is_some_and(|(p, _)| *p == pkid) {
            state.await_ack.pop_front();
            state.release_acks(out);
        }
        if done {
            self.slot_freed(out);
        }
    }

    /// The client's PUBCOMP (QoS 2 done).
    pub(crate) fn client_completed(&mut self, pkid: u16, out: &mut Out<'_>) {
        let Some(state) = self.state.as_mut() else {
            return;
        };
        if state.await_comp.front().is_some_and(|(p, _)| *p == pkid) {
            state.await_comp.pop_front();
            state.release_comps(out);
        }
        self.slot_freed(out);
    }

    /// Bytes a topic alias property may add.
    fn alias_room(&self) -> usize {
        if self.limits.topic_alias_max > 0 {
            3
        } else {
            0
        }
    }

    fn slot_freed(&mut self, out: &mut Out<'_>) {
        let max = usize::from(self.limits.receive_maximum);
        let state = self.state();
        state.in_flight = state.in_flight.saturating_sub(1);
        while self.state().in_flight < max {
            let Some((publish, props)) = self.state().held.pop_front() else {
                break;
            };
            self.write(publish, props, out);
        }
        // Back to idle: the memory goes back too.
        if self.state.as_ref().is_some_and(|s| s.is_idle()) {
            self.state = None;
        }
    }

    fn write(
        &mut self,
        mut publish: Publish,
        mut props: Option<PublishProperties>,
        out: &mut Out<'_>,
    ) {
        if publish.qos() != QoS::AtMostOnce {
            self.state().in_flight += 1;
        }
        if let Some(p) = props.as_mut() {
            // Aliases are this connection's, never the router's.
            p.topic_alias = None;
        }
        let alias_max = usize::from(self.limits.topic_alias_max);
        if alias_max > 0 {
            let aliases = &mut self.state().aliases;
            let alias = match aliases.get(&publish.topic) {
                Some(&a) => {
                    publish.topic = Bytes::new();
                    Some(a)
                }
                None if aliases.len() < alias_max => {
                    let a = aliases.len() as u16 + 1;
                    aliases.insert(publish.topic.clone(), a);
                    Some(a)
                }
                None => None,
            };
            if alias.is_some() {
                props
                    .get_or_insert_with(PublishProperties::default)
                    .topic_alias = alias;
            }
        }
        out.codec.write(Packet::Publish(publish, props), out.wbuf);
    }
}

impl State {
    fn is_idle(&self) -> bool {
        self.in_flight == 0
            && self.await_ack.is_empty()
            && self.await_comp.is_empty()
            && self.withheld_qos2.is_empty()
            && self.held.is_empty()
            && self.aliases.is_empty()
    }

    /// Acks to the router the withheld deliveries at the head of the queue.
    fn release_acks(&mut self, out: &mut Out<'_>) {
        while let Some(&(pkid, Some(qos))) = self.await_ack.front() {
            self.await_ack.pop_front();
            if qos == QoS::AtLeastOnce {
                let ack = PubAck {
                    pkid,
                    reason: PubAckReason::Success,
                };
                out.to_router.push(Packet::PubAck(ack, None));
            } else {
                self.withheld_qos2.insert(pkid);
                let rec = PubRec {
                    pkid,
                    reason: PubRecReason::Success,
                };
                out.to_router.push(Packet::PubRec(rec, None));
            }
        }
    }

    /// Completes to the router the withheld deliveries at the head of the
    /// PUBREL queue.
    fn release_comps(&mut self, out: &mut Out<'_>) {
        while let Some(&(pkid, true)) = self.await_comp.front() {
            self.await_comp.pop_front();
            let comp = PubComp {
                pkid,
                reason: PubCompReason::Success,
            };
            out.to_router.push(Packet::PubComp(comp, None));
        }
    }
}

/// Bytes of `publish` on the wire (fixed header included).
fn encoded_len(codec: &Codec, publish: &Publish, props: &Option<PublishProperties>) -> usize {
    let mut scratch = BytesMut::new();
    codec.write(
        Packet::Publish(publish.clone(), props.clone()),
        &mut scratch,
    );
    scratch.len()
}

use super::Ack;
use slab::Slab;
use tracing::{info, trace};

use crate::protocol::{
    matches, ConnAck, ConnAckProperties, PingResp, PubAck, PubComp, PubRec, PubRel, Publish,
    PublishProperties, SubAck, UnsubAck,
};
use crate::router::index::{is_exact, FilterIndex};
use crate::router::retained::{RetainRefusal, RetainedStore};
use crate::router::{DataRequest, FilterIdx, FleetMap, SubscriptionMeter, Waiters};
use crate::{ConnectionId, Filter, Offset, RouterConfig};

use crate::segments::{CommitLog, Position};
use crate::Storage;
use std::collections::VecDeque;
use std::io;
use std::time::Instant;

type PubWithProp = (Publish, Option<PublishProperties>);

#[derive(Clone)]
pub struct PublishData {
    pub publish: Publish,
    pub properties: Option<PublishProperties>,
    pub timestamp: Instant,
    /// The connection that published it (for No Local subscriptions).
    pub origin: Option<ConnectionId>,
}

impl From<PubWithProp> for PublishData {
    fn from((publish, properties): PubWithProp) -> Self {
        PublishData {
            publish,
            properties,
            timestamp: Instant::now(),
            origin: None,
        }
    }
}

/// A publish read from a commit log: the message, its publisher's
/// connection, its offset.
pub type ReadPublish = (PubWithProp, Option<ConnectionId>, Offset);

// TODO: remove this from here
impl Storage for PublishData {
    // TODO: calculate size of publish properties as well!
    fn size(&self) -> usize {
        let publish = &self.publish;
        4 + publish.topic.len() + publish.payload.len()
    }
}

/// Stores 'device' data and 'actions' data in native commitlog
/// organized by subscription filter. Device data is replicated
/// while actions data is not
pub struct DataLog {
    pub config: RouterConfig,
    /// Native commitlog data organized by subscription. Contains
    /// device data and actions data logs.
    ///
    /// Device data is replicated while actions data is not.
    /// Also has waiters used to wake connections/replicator tracker
    /// which are caught up with all the data on 'Filter' and waiting
    /// for new data
    pub native: Slab<Data<PublishData>>,
    /// Map of subscription filter name to filter index; a publish finds
    /// the filters without wildcards here, by its topic
    filter_indexes: FleetMap<Filter, FilterIdx>,
    /// The filters with a `+` or `#` level by topic level, to find those
    /// matching a topic
    index: FilterIndex,
    /// Retained messages by topic level
    retained: RetainedStore,
}

impl DataLog {
    pub fn new(config: RouterConfig) -> io::Result<DataLog> {
        // Sized for a filter per connection, as `Router::new` sizes the
        // connection slabs: growing a fleet-sized slab copies all of it
        // into fresh pages. (A slab fills from the front: unused room is
        // never paged in.)
        let mut native = Slab::with_capacity(config.max_connections);
        let mut filter_indexes = FleetMap::default();
        let mut index = FilterIndex::with_excluded_levels(&config.wildcard_excluded_levels);
        let retained =
            RetainedStore::new(config.max_retained_per_client, config.max_retained_bytes)
                .with_excluded_levels(&config.wildcard_excluded_levels);

        if let Some(warmup_filters) = config.initialized_filters.clone() {
            for filter in warmup_filters {
                if filter_indexes.contains_key(&filter) {
                    continue;
                }
                let data = Data::new(&filter, &config);

                // Add commitlog to datalog and add datalog index to filter to
                // datalog index map
                let idx = native.insert(data);
                if !is_exact(&filter) {
                    index.insert(&filter, idx);
                }
                filter_indexes.insert(filter, idx);
            }
        }

        Ok(DataLog {
            config,
            native,
            filter_indexes,
            index,
            retained,
        })
    }

    pub fn meter(&mut self, filter: &str) -> Option<&mut SubscriptionMeter> {
        let data = self.native.get_mut(*self.filter_indexes.get(filter)?)?;
        Some(&mut data.meter)
    }

    pub fn waiters(&self, filter: &Filter) -> Option<&Waiters<DataRequest>> {
        self.native
            .get(*self.filter_indexes.get(filter)?)
            .map(|data| &data.waiters)
    }

    /// Index of `filter` (without a `$share/group/` prefix), if it has a log
    pub fn filter_idx(&self, filter: &str) -> Option<FilterIdx> {
        self.filter_indexes.get(filter).copied()
    }

    /// Removes the parked request of connection `id` on `filter_idx` for
    /// `group` (None: not a shared subscription)
    pub fn remove_waiters_for_id(
        &mut self,
        id: ConnectionId,
        filter_idx: FilterIdx,
        group: Option<String>,
    ) -> Option<DataRequest> {
        self.native.get_mut(filter_idx)?.waiters.remove(id, group)
    }

    /// Index of every filter matching `topic`, in time proportional to the
    /// topic's levels and the matches (not to the number of filters)
    pub fn matches(&self, topic: &str) -> Vec<usize> {
        let mut v = Vec::new();
        // A filter without wildcards matches the topic equal to it: one
        // lookup (a topic with a `+` or `#` level can only equal a filter
        // the trie holds, and finds it there)
        if !topic.starts_with('$') {
            if let Some(&idx) = self.filter_indexes.get(topic) {
                if is_exact(topic) {
                    v.push(idx);
                }
            }
        }
        self.index.matches(topic, &mut v);
        v
    }

    pub fn next_native_offset(&mut self, filter: &str) -> (FilterIdx, Offset) {
        let (filter_idx, data) = match self.filter_indexes.get(filter) {
            Some(idx) => (*idx, &self.native[*idx]),
            None => {
                let data = Data::new(filter, &self.config);

                // Add commitlog to datalog and add datalog index to filter to
                // datalog index map
                let idx = self.native.insert(data);
                self.filter_indexes.insert(filter.to_owned(), idx);
                if !is_exact(filter) {
                    self.index.insert(filter, idx);
                }

                (idx, &self.native[idx])
            }
        };

        (filter_idx, data.log.next_offset())
    }
    pub fn native_readv(
        &self,
        filter_idx: FilterIdx,
        offset: Offset,
        len: u64,
    ) -> io::Result<(Position, Vec<ReadPublish>)> {
        // unwrap to get index of `self.native` is fine here, because when a new subscribe packet
        // arrives in `Router::handle_device_payload`, it first calls the function
        // `next_native_offset` which creates a new commitlog if one doesn't exist. So any new
        // reads will definitely happen on a valid filter.
        let data = self.native.get(filter_idx).unwrap();
        let mut o = Vec::new();
        // TODO: `readv` is infallible but its current return type does not
        // reflect that. Consequently, this method is also infallible.
        // Encoding this information is important so that calling function
        // has more information on how this method behaves.
        let next = data.log.readv(offset, len, &mut o)?;

        let now = Instant::now();
        o.retain_mut(|(pubdata, _)| {
            // Keep data if no properties exists, which implies no message expiry!
            let Some(properties) = pubdata.properties.as_mut() else {
                return true;
            };

            // Keep data if there is no message_expiry_interval
            let Some(message_expiry_interval) = properties.message_expiry_interval.as_mut() else {
                return true;
            };

            let time_spent = (now - pubdata.timestamp).as_secs() as u32;

            let is_valid = time_spent < *message_expiry_interval;

            // ignore expired messages
            if is_valid {
                // set message_expiry_interval to (original value - time spent waiting in server)
                // ref: https://docs.oasis-open.org/mqtt/mqtt/v5.0/os/mqtt-v5.0-os.html#_Toc3901112
                *message_expiry_interval -= time_spent;
            }

            is_valid
        });

        // no need to include timestamp when returning
        let o = o
            .into_iter()
            .map(|(pubdata, offset)| {
                (
                    (pubdata.publish, pubdata.properties),
                    pubdata.origin,
                    offset,
                )
            })
            .collect();

        Ok((next, o))
    }

    pub fn shadow(&mut self, filter: &str) -> Option<PubWithProp> {
        let data = self.native.get_mut(*self.filter_indexes.get(filter)?)?;
        data.log.last().map(|p| (p.publish, p.properties))
    }

    /// This method is called when the subscriber has caught up with the commit log. In which case,
    /// instead of actively checking for commits in each `Router::run_inner` iteration, we instead
    /// wait and only try reading again when new messages have been added to the commit log. This
    /// methods converts a `DataRequest` (which actively reads the commit log in `Router::consume`)
    /// to a `Waiter` (which only reads when notified).
    pub fn park(&mut self, id: ConnectionId, request: DataRequest) {
        // calling unwrap on index here is fine, because only place this function is called is in
        // `Router::consume` method, when the status after reading from commit log of the same
        // filter as `request` is "done", that is, the subscriber has caught up. In other words,
        // there has been atleast 1 call to `native_readv` for the same filter, which means if
        // `native_readv` hasn't paniced, so this won't panic either.
        let data = self.native.get_mut(request.filter_idx).unwrap();
        data.waiters.register(id, request.group.clone(), request);
    }

    /// Cleanup a connection from the waiters of its own subscriptions
    /// (`(filter index, group)` pairs)
    pub fn clean(
        &mut self,
        id: ConnectionId,
        subscriptions: impl IntoIterator<Item = (FilterIdx, Option<String>)>,
    ) -> Vec<DataRequest> {
        subscriptions
            .into_iter()
            .filter_map(|(idx, group)| self.remove_waiters_for_id(id, idx, group))
            .collect()
    }

    /// Whether `owner` may store a retained message of `size` bytes at
    /// `topic`
    pub fn check_retained(
        &self,
        topic: &str,
        size: usize,
        owner: &str,
        exempt: bool,
    ) -> Result<(), RetainRefusal> {
        self.retained.check(topic, size, owner, exempt)
    }

    pub fn insert_to_retained_publishes(
        &mut self,
        publish: Publish,
        publish_properties: Option<PublishProperties>,
        topic: &str,
        owner: &str,
        exempt: bool,
    ) -> Result<(), RetainRefusal> {
        self.retained
            .insert(topic, publish, publish_properties, owner, exempt)
    }

    pub fn remove_from_retained_publishes(&mut self, topic: &str) {
        self.retained.remove(topic);
    }

    /// Retained messages matching `filter` stored up to stamp `up_to`
    /// (expired ones are dropped), in time proportional to what the filter
    /// matches
    pub fn read_retained_messages(&mut self, filter: &str, up_to: u64) -> Vec<PubWithProp> {
        trace!(info = "reading retain msg", filter = &filter);
        self.retained.matching(filter, Instant::now(), up_to)
    }

    pub fn retained(&self) -> &RetainedStore {
        &self.retained
    }
}

pub struct Data<T> {
    filter: Filter,
    pub log: CommitLog<T>,
    pub waiters: Waiters<DataRequest>,
    meter: SubscriptionMeter,
}

impl<T> Data<T>
where
    T: Storage + Clone,
{
    pub fn new(filter: &str, router_config: &RouterConfig) -> Data<T> {
        let mut max_segment_size = router_config.max_segment_size;
        let mut max_mem_segments = router_config.max_segment_count;

        // Override segment config for selected filter
        if let Some(config) = &router_config.custom_segment {
            for (f, segment_config) in config {
                if matches(filter, f) {
                    info!("Overriding segment config for filter: {}", filter);
                    max_segment_size = segment_config.max_segment_size;
                    max_mem_segments = segment_config.max_segment_count;
                }
            }
        }

        // max_segment_size: usize, max_mem_segments: usize
        let log = CommitLog::new(max_segment_size, max_mem_segments).unwrap();

        let waiters = Waiters::new();
        let metrics = SubscriptionMeter::default();
        Data {
            filter: filter.to_owned(),
            log,
            waiters,
            meter: metrics,
        }
    }

    /// The filter this log holds the publishes of
    pub fn filter(&self) -> &str {
        &self.filter
    }

    /// Writes to all the filters that are mapped to this publish topic
    /// and wakes up consumers that are matching this topic (if they exist)
    pub fn append(
        &mut self,
        item: T,
        notifications: &mut VecDeque<(ConnectionId, DataRequest)>,
    ) -> (Offset, &Filter) {
        let size = item.size();
        let offset = self.log.append(item);
        self.waiters.drain_into(notifications);

        self.meter.count += 1;
        self.meter.total_size += size;

        (offset, &self.filter)
    }
}

/// Acks log for a subscription
#[derive(Debug)]
pub struct AckLog {
    // Committed acks per connection. First pkid, last pkid, data
    committed: VecDeque<Ack>,
    // Recorded qos 2 publishes by pkid; None: refused (PUBREC with an
    // error reason), its PUBREL (if any) completes with nothing to append
    recorded: VecDeque<(u16, Option<PubWithProp>)>,
}

impl AckLog {
    /// New log
    pub fn new() -> AckLog {
        AckLog {
            committed: VecDeque::new(),
            recorded: VecDeque::new(),
        }
    }

    pub fn connack(&mut self, id: ConnectionId, ack: ConnAck, props: Option<ConnAckProperties>) {
        let ack = Ack::ConnAck(id, ack, props);
        self.committed.push_back(ack);
    }

    pub fn suback(&mut self, ack: SubAck) {
        let ack = Ack::SubAck(ack);
        self.committed.push_back(ack);
    }

    pub fn puback(&mut self, ack: PubAck) {
        let ack = Ack::PubAck(ack);
        self.committed.push_back(ack);
    }

    pub fn pubrec(&mut self, publish: Publish, props: Option<PublishProperties>, ack: PubRec) {
        self.record(ack.pkid, Some((publish, props)));
        self.committed.push_back(Ack::PubRec(ack));
    }

    /// A QoS 2 publish refused with `ack` (an error reason): nothing is
    /// recorded to append at its PUBREL
    pub fn pubrec_refused(&mut self, ack: PubRec) {
        self.record(ack.pkid, None);
        self.committed.push_back(Ack::PubRec(ack));
    }

    /// Records the publish of `pkid`, replacing an earlier record of the
    /// same pkid (a resent PUBLISH, or a refusal its client never released)
    fn record(&mut self, pkid: u16, publish: Option<PubWithProp>) {
        if let Some(i) = self.recorded.iter().position(|(p, _)| *p == pkid) {
            self.recorded.remove(i);
        }
        self.recorded.push_back((pkid, publish));
    }

    pub fn pubrel(&mut self, ack: PubRel) {
        let ack = Ack::PubRel(ack);
        self.committed.push_back(ack);
    }

    /// Completes the QoS 2 exchange of `ack.pkid`: Err if no PUBLISH of
    /// that pkid was recorded, Ok(None) if it was refused
    pub fn pubcomp(&mut self, ack: PubComp) -> Result<Option<PubWithProp>, ()> {
        let i = self
            .recorded
            .iter()
            .position(|(p, _)| *p == ack.pkid)
            .ok_or(())?;
        self.committed.push_back(Ack::PubComp(ack));
        let (_, publish) = self.recorded.remove(i).ok_or(())?;
        Ok(publish)
    }

    pub fn pingresp(&mut self, ack: PingResp) {
        let ack = Ack::PingResp(ack);
        self.committed.push_back(ack);
    }

    pub fn unsuback(&mut self, ack: UnsubAck) {
        let ack = Ack::UnsubAck(ack);
        self.committed.push_back(ack);
    }

    pub fn readv(&mut self) -> &mut VecDeque<Ack> {
        &mut self.committed
    }
}

#[cfg(test)]
mod test {
    use super::DataLog;
    use crate::router::index::test::{oracle, path};
    use crate::RouterConfig;
    use proptest::prelude::*;

    fn config() -> RouterConfig {
        RouterConfig {
            max_segment_size: 1024,
            max_connections: 10,
            max_segment_count: 10,
            max_outgoing_packet_count: 1024,
            ..RouterConfig::default()
        }
    }

    fn matched(data: &DataLog, topic: &str) -> Vec<usize> {
        let mut v = data.matches(topic);
        v.sort_unstable();
        v
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(1000))]

        /// Filters without wildcards (found by their text) and with them
        /// (in the trie) together match what the linear matcher matches.
        #[test]
        fn matches_agree_with_linear_matcher(
            filters in prop::collection::btree_set(path(), 0..40),
            topics in prop::collection::vec(path(), 1..20),
        ) {
            let mut data = DataLog::new(config()).unwrap();
            let filters: Vec<(String, usize)> = filters
                .into_iter()
                .map(|f| {
                    let (idx, _) = data.next_native_offset(&f);
                    (f, idx)
                })
                .collect();
            for t in &topics {
                prop_assert_eq!(matched(&data, t), oracle(&filters, t), "topic {}", t);
            }
        }
    }

    #[test]
    fn exact_filters_are_found_by_their_text_outside_the_trie() {
        let mut data = DataLog::new(RouterConfig {
            wildcard_excluded_levels: vec!["admin".to_owned()],
            ..config()
        })
        .unwrap();
        let mut idx = |f: &str| data.next_native_offset(f).0;
        let d1 = idx("devices/p1/d1/command");
        idx("devices/p1/d2/command");
        let admin = idx("admin/events");
        idx("$SYS/x");
        let odd = idx("a/b+/c#");
        assert!(data.index.is_empty());
        let wildcard = data.next_native_offset("devices/+/+/command").0;
        assert_eq!(data.index.len(), 1);
        assert_eq!(matched(&data, "devices/p1/d1/command"), vec![d1, wildcard]);
        assert_eq!(matched(&data, "devices/p1/d1"), Vec::<usize>::new());
        assert_eq!(matched(&data, "admin/events"), vec![admin]);
        assert_eq!(matched(&data, "$SYS/x"), Vec::<usize>::new());
        assert_eq!(matched(&data, "a/b+/c#"), vec![odd]);
        // A topic equal to a wildcard filter's text is matched once
        assert_eq!(matched(&data, "devices/+/+/command"), vec![wildcard]);
    }

    #[test]
    fn the_filter_slab_has_room_for_a_filter_per_connection() {
        let config = RouterConfig {
            max_connections: 5000,
            ..config()
        };
        let mut data = DataLog::new(config).unwrap();
        let native = data.native.capacity();
        assert!(native >= 5000, "{native}");
        for i in 0..5000 {
            data.next_native_offset(&format!("devices/p/d{i}/command"));
        }
        // Filled to the configured size without growing
        assert_eq!(data.native.capacity(), native);
        assert_eq!(data.matches("devices/p/d4999/command").len(), 1);
    }

    #[test]
    fn publish_filters_updating_correctly_on_new_topic_subscription() {
        let mut data = DataLog::new(config()).unwrap();
        let (a, _) = data.next_native_offset("topic/a");
        assert_eq!(data.matches("topic/a"), vec![a]);

        let (wild, _) = data.next_native_offset("topic/+");

        let mut matched = data.matches("topic/a");
        matched.sort_unstable();
        assert_eq!(matched, vec![a, wild]);
    }

    #[test]
    fn publish_filters_updating_correctly_on_new_publish() {
        let mut data = DataLog::new(config()).unwrap();
        let (idx, _) = data.next_native_offset("+/+");

        assert_eq!(data.matches("topic/a"), vec![idx]);
        assert!(data.matches("topic/a/b").is_empty());
    }

    #[test]
    fn unmatched_topics_leave_no_state() {
        let mut data = DataLog::new(config()).unwrap();
        data.next_native_offset("devices/1/command");
        for i in 0..1000 {
            assert!(data.matches(&format!("devices/{i}/telemetry")).is_empty());
        }
        assert_eq!(data.native.len(), 1);
    }

    //     #[test]
    //     fn appends_are_written_to_correct_commitlog() {
    //         pretty_env_logger::init();
    //         let config = RouterConfig {
    //             instant_ack: true,
    //             max_segment_size: 1024,
    //             max_connections: 10,
    //             max_mem_segments: 10,
    //             max_disk_segments: 0,
    //             max_read_len: 1024,
    //             log_dir: None,
    //             dynamic_log: true,
    //         };

    //         let mut data = DataLog::new(config).unwrap();
    //         data.next_native_offset("/devices/2321/actions");
    //         for i in 0..2 {
    //             let publish = Publish::new("/devices/2321/events/imu/jsonarray", QoS::AtLeastOnce, vec![1, 2, 3]);
    //             let v = data.native_append(publish);
    //             dbg!(v);
    //         }

    //         for i in 0..2 {
    //             let publish = Publish::new("/devices/2321/actions", QoS::AtLeastOnce, vec![1, 2, 3]);
    //             let v = data.native_append(publish);
    //             dbg!(v);
    //         }
    //     }
}

//! What a fetch asks for, partition by partition: the topic's name, its upstream leader, and
//! the answer for partitions that cannot be read.

use kafka_protocol::messages::BrokerId;
use kafka_protocol::messages::fetch_request::FetchPartition;
use kafka_protocol::messages::fetch_response::PartitionData;
use kafka_protocol::protocol::StrBytes;

use crate::protocol::{TopicRef, codes};
use crate::upstream::topology::Topology;

/// A partition as the client names its topic (by name before v13, by id from v13).
pub type Key = (TopicRef, i32);

/// Where and how a poll asked for a partition: the offset and the two epochs the broker
/// checks (KIP-320). An answer kept from the poll answers only a fetch that asks the same:
/// with other epochs the broker could have answered differently (fenced, diverging).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Asked {
    pub offset: i64,
    pub current_leader_epoch: i32,
    pub last_fetched_epoch: i32,
}

impl Asked {
    pub fn of(part: &FetchPartition) -> Self {
        Self {
            offset: part.fetch_offset,
            current_leader_epoch: part.current_leader_epoch,
            last_fetched_epoch: part.last_fetched_epoch,
        }
    }
}

/// The partition leader epoch of the last whole batch in `records` (None: no whole v2 batch).
pub fn last_batch_epoch(records: &bytes::Bytes) -> Option<i32> {
    let mut pos = 0usize;
    let mut epoch = None;
    while records.len() >= pos + 17 {
        let len = i32::from_be_bytes(records[pos + 8..pos + 12].try_into().expect("4 bytes"));
        if len < 0 || pos + 12 + len as usize > records.len() || records[pos + 16] != 2 {
            break;
        }
        epoch = Some(i32::from_be_bytes(
            records[pos + 12..pos + 16].try_into().expect("4 bytes"),
        ));
        pos += 12 + len as usize;
    }
    epoch
}

/// The offsets upstream reported for a partition with its last answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Marks {
    pub high_watermark: i64,
    pub last_stable_offset: i64,
    pub log_start_offset: i64,
}

impl Marks {
    pub fn of(p: &PartitionData) -> Self {
        Self {
            high_watermark: p.high_watermark,
            last_stable_offset: p.last_stable_offset,
            log_start_offset: p.log_start_offset,
        }
    }

    pub const UNKNOWN: Marks = Marks {
        high_watermark: -1,
        last_stable_offset: -1,
        log_start_offset: -1,
    };
}

/// One requested partition.
#[derive(Debug, Clone)]
pub struct Want {
    pub key: Key,
    pub part: FetchPartition,
    /// The topic's name, when known.
    pub name: Option<StrBytes>,
    /// The upstream broker leading it, or the error to answer.
    pub leader: Result<i32, i16>,
}

/// Resolves names and leaders; `loaded`: whether the shard maps are loaded (until then a
/// managed topic's gates would not apply, so nothing is read).
pub fn resolve(
    topo: &Topology,
    parts: Vec<(Key, FetchPartition)>,
    by_id: bool,
    loaded: bool,
) -> Vec<Want> {
    parts
        .into_iter()
        .map(|(key, part)| {
            let name = if by_id {
                topo.topic_name(&key.0.id).cloned()
            } else {
                Some(key.0.name.clone())
            };
            let leader = match name.as_ref().and_then(|n| topo.leader(n, part.partition)) {
                Some(_) if !loaded => Err(codes::NOT_LEADER_OR_FOLLOWER),
                Some(b) => Ok(b),
                None => Err(match &name {
                    _ if !loaded => codes::NOT_LEADER_OR_FOLLOWER,
                    None if by_id => codes::UNKNOWN_TOPIC_ID,
                    Some(n) if topo.topics.contains_key(n) => codes::NOT_LEADER_OR_FOLLOWER,
                    _ => codes::UNKNOWN_TOPIC_OR_PARTITION,
                }),
            };
            Want {
                key,
                part,
                name,
                leader,
            }
        })
        .collect()
}

/// Partitions of topics the client may not READ are answered TOPIC_AUTHORIZATION_FAILED.
pub fn refuse_unreadable(access: &crate::proxy::authorize::Access, wants: &mut [Want]) {
    let mut names: Vec<&str> = wants
        .iter()
        .filter_map(|w| w.name.as_ref().map(|n| n.as_str()))
        .collect();
    names.dedup();
    let denied: Vec<String> = access
        .denied_topics(crate::auth::acl::Operation::Read, &names)
        .into_iter()
        .map(str::to_string)
        .collect();
    if denied.is_empty() {
        return;
    }
    for w in wants.iter_mut() {
        if w.name
            .as_ref()
            .is_some_and(|n| denied.iter().any(|d| d == n.as_str()))
        {
            w.leader = Err(codes::TOPIC_AUTHORIZATION_FAILED);
        }
    }
}

/// Whether any partition lacks a known leader (worth one topology refresh before answering).
pub fn any_unknown(wants: &[Want]) -> bool {
    wants.iter().any(|w| w.leader.is_err())
}

/// The answer for a partition that cannot be read. Records are empty, not null, as Kafka
/// sends them: librdkafka takes a null record set for a malformed response and retries at
/// once, without surfacing the error.
pub fn error_answer(partition: i32, code: i16) -> PartitionData {
    PartitionData::default()
        .with_partition_index(partition)
        .with_error_code(code)
        .with_high_watermark(-1)
        .with_last_stable_offset(-1)
        .with_log_start_offset(-1)
        .with_preferred_read_replica(BrokerId(-1))
        .with_records(Some(Default::default()))
}

/// The answer for a partition with nothing new: the offsets upstream last reported.
pub fn empty_answer(partition: i32, marks: Marks) -> PartitionData {
    PartitionData::default()
        .with_partition_index(partition)
        .with_high_watermark(marks.high_watermark)
        .with_last_stable_offset(marks.last_stable_offset)
        .with_log_start_offset(marks.log_start_offset)
        .with_preferred_read_replica(BrokerId(-1))
        .with_records(Some(Default::default()))
}

/// Upstream's answer made safe for the client: it must never point at a real broker.
pub fn scrub(p: &mut PartitionData) {
    p.preferred_read_replica = BrokerId(-1);
    p.current_leader = Default::default();
}

/// Record batches (magic v2) of `records` that fit in `limit` bytes, and the offset the next
/// fetch starts from after them (`None` when none fits). A partial batch at the end (a
/// broker's cut at max_bytes) never counts as fitting.
pub fn batches_within(records: &bytes::Bytes, limit: usize) -> (usize, Option<i64>) {
    let mut pos = 0usize;
    let mut next = None;
    while records.len() >= pos + 27 {
        let base = i64::from_be_bytes(records[pos..pos + 8].try_into().expect("8 bytes"));
        let len = i32::from_be_bytes(records[pos + 8..pos + 12].try_into().expect("4 bytes"));
        if len < 0 {
            break;
        }
        let end = pos + 12 + len as usize;
        if end > records.len() || end > limit {
            break;
        }
        let last_delta =
            i32::from_be_bytes(records[pos + 23..pos + 27].try_into().expect("4 bytes"));
        next = Some(base + last_delta as i64 + 1);
        pos = end;
    }
    (pos, next)
}

/// Whether `p` holds at least one whole record batch.
pub fn whole_batch(p: &PartitionData) -> bool {
    p.records
        .as_ref()
        .is_some_and(|r| batches_within(r, usize::MAX).1.is_some())
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::{BufMut, Bytes, BytesMut};

    /// A fake batch: header fields that matter here, `len` bytes after the length field.
    fn batch(base: i64, last_delta: i32, len: usize) -> Vec<u8> {
        batch_of_epoch(base, last_delta, len, 0)
    }

    fn batch_of_epoch(base: i64, last_delta: i32, len: usize, epoch: i32) -> Vec<u8> {
        let mut b = BytesMut::new();
        b.put_i64(base);
        b.put_i32(len as i32);
        b.put_i32(epoch); // leader epoch
        b.put_i8(2); // magic
        b.put_u32(0); // crc
        b.put_i16(0); // attributes
        b.put_i32(last_delta);
        b.resize(12 + len, 0);
        b.to_vec()
    }

    #[test]
    fn batches_are_cut_at_whole_batches() {
        let mut all = batch(10, 4, 100);
        all.extend(batch(15, 9, 100));
        all.extend(batch(25, 0, 100));
        let all = Bytes::from(all);
        assert_eq!(batches_within(&all, 112), (112, Some(15)));
        assert_eq!(batches_within(&all, 300), (224, Some(25)));
        assert_eq!(batches_within(&all, 336), (336, Some(26)));
        assert_eq!(batches_within(&all, 50), (0, None));
        // A cut batch at the end never fits.
        let cut = all.slice(..300);
        assert_eq!(batches_within(&cut, 1000), (224, Some(25)));
    }

    #[test]
    fn the_last_whole_batch_names_the_epoch_a_client_fetches_next_with() {
        let mut all = batch_of_epoch(10, 4, 100, 3);
        all.extend(batch_of_epoch(15, 9, 100, 5));
        let all = Bytes::from(all);
        assert_eq!(last_batch_epoch(&all), Some(5));
        // A cut last batch does not count.
        assert_eq!(last_batch_epoch(&all.slice(..150)), Some(3));
        assert_eq!(last_batch_epoch(&Bytes::new()), None);
    }
}

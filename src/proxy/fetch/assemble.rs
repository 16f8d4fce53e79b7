//! The response: every partition in request (or session) order, max_bytes kept over the
//! whole response, only news for incremental sessions, records passed on without a copy.

use std::collections::HashMap;

use kafka_protocol::messages::fetch_response::{FetchableTopicResponse, PartitionData};
use kafka_protocol::messages::{ApiKey, FetchResponse, TopicName};

use super::plan::{self, Key, Marks, Want};
use super::session::Kind;
use super::{Fetch, HandlerError, Reply};
use crate::protocol::splice::encode_response_pieces;

/// Per partition that got records: the offset the client will fetch next, and the records
/// (a reference to the buffer the response is written from).
pub(super) type Delivered = HashMap<Key, (i64, bytes::Bytes)>;

pub(super) fn answer(
    fetch: &mut Fetch<'_>,
    wants: &[Want],
    kind: Kind,
    max_bytes: i32,
    version: i16,
    correlation_id: i32,
) -> Result<(Reply, Delivered), HandlerError> {
    let state = &fetch.client.fetch;
    let mut answers: Vec<(Key, PartitionData)> = wants
        .iter()
        .map(|w| {
            let p = fetch.got.remove(&w.key).unwrap_or_else(|| {
                plan::empty_answer(w.key.1, state.seen(&w.key).unwrap_or(Marks::UNKNOWN))
            });
            (w.key.clone(), p)
        })
        .collect();
    // Partitions whose records were taken but are not delivered go back to the read-ahead:
    // the client's next fetch asks for them again.
    let offsets = |k: &Key| {
        wants
            .iter()
            .find(|w| &w.key == k)
            .map(|w| w.part.fetch_offset)
    };
    // Not everything fits: the consumer's preferred content first (rank.rs).
    if fetch.ctx.settings.raw.prefetch.predictive() && over(&answers, max_bytes) {
        let parts: Vec<(&str, i32)> = wants
            .iter()
            .map(|w| (w.name.as_ref().map_or("", |n| n.as_str()), w.key.1))
            .collect();
        let scores = fetch.ctx.profiles.affinities(fetch.client.id, &parts);
        let waits = state.waits(answers.iter().map(|(k, _)| k));
        if super::rank::order(&mut answers, max_bytes, &scores, &waits) {
            metrics::counter!("shardgate_prefetch_ranked_responses_total").increment(1);
        }
    }
    let isolation = fetch.template.body.isolation_level;
    let mut cut = Vec::new();
    keep_max_bytes(&mut answers, max_bytes, |k, offset, rest| {
        if offset.is_none() {
            cut.push(k.clone()); // nothing of it delivered
        }
        let charge = fetch
            .ctx
            .budget
            .charge(rest.records.as_ref().map_or(0, |r| r.len()));
        state.put(
            k.clone(),
            offset.or_else(|| offsets(k)).unwrap_or(-1),
            None,
            isolation,
            rest,
            Some(charge),
        );
    });
    state.note_cuts(
        cut.iter(),
        answers
            .iter()
            .filter(|(_, p)| p.records.as_ref().is_some_and(|r| !r.is_empty()))
            .map(|(k, _)| k),
    );
    // Where the client will fetch next, and the bytes it got, for partitions that got records.
    let advanced: Delivered = answers
        .iter()
        .filter_map(|(k, p)| {
            let r = p.records.as_ref().filter(|r| !r.is_empty())?;
            plan::batches_within(r, usize::MAX)
                .1
                .map(|next| (k.clone(), (next, r.clone())))
        })
        .collect();
    fetch.ctx.fetch_sessions.select(kind, &mut answers);

    let mut resp = FetchResponse::default()
        .with_throttle_time_ms(fetch.throttle_ms)
        .with_session_id(kind.session_id());
    let by_id = version >= 13;
    let mut records = Vec::new();
    for (key, p) in answers {
        if let Some(r) = &p.records {
            records.push(r.clone());
        }
        let same = resp
            .responses
            .last()
            .is_some_and(|t: &FetchableTopicResponse| {
                if by_id {
                    t.topic_id == key.0.id
                } else {
                    t.topic.0 == key.0.name
                }
            });
        if !same {
            resp.responses.push(
                FetchableTopicResponse::default()
                    .with_topic(TopicName(key.0.name.clone()))
                    .with_topic_id(key.0.id),
            );
        }
        resp.responses
            .last_mut()
            .expect("pushed above")
            .partitions
            .push(p);
    }
    let pieces = encode_response_pieces(ApiKey::Fetch, version, correlation_id, &resp, records)?;
    Ok((Reply::Pieces(pieces), advanced))
}

/// The length of the first record batch of `records` (0: not even its header).
fn first_batch_len(records: &bytes::Bytes) -> usize {
    records.get(8..12).map_or(0, |b| {
        12 + i32::from_be_bytes(b.try_into().expect("4 bytes")).max(0) as usize
    })
}

/// Whether the records of `answers` hold more than `max_bytes` together.
fn over(answers: &[(Key, PartitionData)], max_bytes: i32) -> bool {
    let total: usize = answers
        .iter()
        .map(|(_, p)| p.records.as_ref().map_or(0, |r| r.len()))
        .sum();
    total > max_bytes.max(0) as usize
}

/// Cuts the answers to `max_bytes` in total at whole record batches. The first partition with
/// records is kept whole (upstream already limited it; a first batch above the limit must
/// still go out, or the consumer could never progress). What is cut goes to `rest(key,
/// next offset, answer)`: `None` as offset means the partition's own fetch offset (nothing
/// of it was delivered).
pub(super) fn keep_max_bytes(
    answers: &mut [(Key, PartitionData)],
    max_bytes: i32,
    mut rest: impl FnMut(&Key, Option<i64>, PartitionData),
) {
    let max = max_bytes.max(0) as usize;
    let mut total = 0usize;
    for (key, p) in answers.iter_mut() {
        let Some(records) = p.records.clone() else {
            continue;
        };
        if records.is_empty() {
            continue;
        }
        if total + records.len() <= max {
            total += records.len();
            continue;
        }
        // The first partition with records keeps at least its first batch whole, as Kafka
        // sends it (else the consumer could never progress).
        let room = if total == 0 {
            max.max(first_batch_len(&records))
        } else {
            max.saturating_sub(total)
        };
        let (fit, next) = plan::batches_within(&records, room);
        if fit == records.len() || (fit == 0 && total == 0) {
            // All of it (one batch larger than max_bytes), or not even one whole batch (a
            // broker's partial one): as it came.
            total += records.len();
            continue;
        }
        let mut left = p.clone();
        left.records = Some(records.slice(fit..));
        rest(key, next, left);
        p.records = Some(records.slice(..fit));
        total += fit;
        metrics::counter!("shardgate_fetch_trimmed_total").increment(1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::TopicRef;
    use bytes::{BufMut, Bytes, BytesMut};

    fn batches(base: i64, n: usize, len: usize) -> Bytes {
        let mut b = BytesMut::new();
        for i in 0..n {
            b.put_i64(base + i as i64);
            b.put_i32(len as i32);
            b.put_i32(0);
            b.put_i8(2);
            b.put_u32(0);
            b.put_i16(0);
            b.put_i32(0);
            b.resize(b.len() + len - 15, 0);
        }
        b.freeze()
    }

    fn answer(p: i32, records: Bytes) -> (Key, PartitionData) {
        (
            (
                TopicRef {
                    name: "t".into(),
                    id: uuid::Uuid::nil(),
                },
                p,
            ),
            PartitionData::default()
                .with_partition_index(p)
                .with_records(Some(records)),
        )
    }

    #[test]
    fn max_bytes_holds_for_the_whole_response() {
        // Three partitions of 10 batches of 1,012 bytes each (10,120 bytes); max 15,000.
        let mut a: Vec<_> = (0..3).map(|p| answer(p, batches(100, 10, 1000))).collect();
        let mut cut = Vec::new();
        keep_max_bytes(&mut a, 15_000, |k, next, rest| cut.push((k.1, next, rest)));
        let sizes: Vec<usize> = a
            .iter()
            .map(|(_, p)| p.records.as_ref().unwrap().len())
            .collect();
        assert_eq!(sizes, vec![10_120, 4_048, 0]);
        assert!(sizes.iter().sum::<usize>() <= 15_000);
        assert_eq!(cut.len(), 2);
        assert_eq!((cut[0].0, cut[0].1), (1, Some(104)));
        assert_eq!(cut[0].2.records.as_ref().unwrap().len(), 6 * 1012);
        assert_eq!((cut[1].0, cut[1].1), (2, None));
    }

    #[test]
    fn the_first_partition_is_cut_to_max_bytes_but_keeps_one_whole_batch() {
        // Ten batches of 1,012 bytes, max 2,500: two go out, the rest waits (as Kafka cuts).
        let mut a = vec![answer(0, batches(0, 10, 1000))];
        let mut cut = Vec::new();
        keep_max_bytes(&mut a, 2_500, |k, next, rest| cut.push((k.1, next, rest)));
        assert_eq!(a[0].1.records.as_ref().unwrap().len(), 2 * 1012);
        assert_eq!((cut[0].0, cut[0].1), (0, Some(2)));
    }

    #[test]
    fn a_first_batch_above_max_bytes_still_goes_out() {
        let mut a = vec![
            answer(0, batches(0, 1, 5000)),
            answer(1, batches(0, 1, 100)),
        ];
        let mut cut = 0;
        keep_max_bytes(&mut a, 1000, |_, _, _| cut += 1);
        assert_eq!(a[0].1.records.as_ref().unwrap().len(), 5012);
        assert_eq!(a[1].1.records.as_ref().unwrap().len(), 0);
        assert_eq!(cut, 1);
    }
}

//! When the records of a response do not all fit its max_bytes: which partitions go first.
//! Kafka fills a response in request order (rotated by fetch sessions). With prefetch
//! `predictive`, shardgate puts first the partitions whose recent records are closest to what
//! the consumer was delivered (cosine similarity of embedding centroids and of routing-value
//! histograms from sampled records, `prefetch::profiles`), but partitions the connection's
//! previous responses cut go before all of them, the longest waiting first, so every
//! partition gets its turn. Partitions of one topic stay together (one topic entry each). The records themselves are untouched;
//! only the order of partitions changes, which Kafka's protocol leaves to the broker.

use kafka_protocol::messages::fetch_response::PartitionData;

use super::plan::Key;

/// Reorders the partitions of `answers` that carry records (the others keep their places),
/// when they hold more than `max_bytes` together: by `waits` (responses in a row that cut
/// the partition; most first), then by `scores` (highest first; unknown as 0), ties in the
/// original order, and then topic by topic in the order of each topic's first partition
/// (`scores` and `waits` go with `answers` index by index). Returns whether the order
/// changed.
pub(super) fn order(
    answers: &mut [(Key, PartitionData)],
    max_bytes: i32,
    scores: &[Option<f32>],
    waits: &[u32],
) -> bool {
    let with_records: Vec<usize> = answers
        .iter()
        .enumerate()
        .filter(|(_, (_, p))| p.records.as_ref().is_some_and(|r| !r.is_empty()))
        .map(|(i, _)| i)
        .collect();
    let total: usize = with_records
        .iter()
        .map(|&i| answers[i].1.records.as_ref().map_or(0, |r| r.len()))
        .sum();
    if with_records.len() < 2 || total <= max_bytes.max(0) as usize {
        return false;
    }
    let mut ranked = with_records.clone();
    ranked.sort_by(|&a, &b| {
        let ka = (waits[a], scores[a].unwrap_or(0.0));
        let kb = (waits[b], scores[b].unwrap_or(0.0));
        kb.0.cmp(&ka.0).then(kb.1.total_cmp(&ka.1))
    });
    // One entry per topic: each topic where its best partition ranks (a stable sort).
    let mut topics: Vec<&crate::protocol::TopicRef> = Vec::new();
    for &i in &ranked {
        if !topics.contains(&&answers[i].0.0) {
            topics.push(&answers[i].0.0);
        }
    }
    let rank_of = |i: usize| topics.iter().position(|t| **t == answers[i].0.0);
    let mut grouped = ranked.clone();
    grouped.sort_by_key(|&i| rank_of(i));
    let ranked = grouped;
    if ranked == with_records {
        return false;
    }
    let moved: Vec<(Key, PartitionData)> = ranked.iter().map(|&i| answers[i].clone()).collect();
    for (slot, entry) in with_records.into_iter().zip(moved) {
        answers[slot] = entry;
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::TopicRef;

    fn answer(p: i32, bytes: usize) -> (Key, PartitionData) {
        (
            (
                TopicRef {
                    name: kafka_protocol::protocol::StrBytes::from_static_str("t"),
                    id: uuid::Uuid::nil(),
                },
                p,
            ),
            PartitionData::default()
                .with_partition_index(p)
                .with_records(Some(bytes::Bytes::from(vec![0u8; bytes]))),
        )
    }

    fn partitions(a: &[(Key, PartitionData)]) -> Vec<i32> {
        a.iter().map(|(k, _)| k.1).collect()
    }

    #[test]
    fn preferred_content_goes_first_only_when_not_everything_fits() {
        let scores = [Some(0.1), None, Some(0.9), Some(0.5)];
        let mut a = vec![answer(0, 100), answer(1, 0), answer(2, 100), answer(3, 100)];
        let none = [0u32; 4];
        assert!(!order(&mut a, 300, &scores, &none), "everything fits");
        assert_eq!(partitions(&a), [0, 1, 2, 3]);
        assert!(order(&mut a, 250, &scores, &none));
        // The partition without records keeps its place.
        assert_eq!(partitions(&a), [2, 1, 3, 0]);
    }

    #[test]
    fn partitions_cut_longest_go_first_so_every_one_gets_its_turn() {
        // Room for one partition; A > B > C > D by content.
        let scores = [Some(0.9), Some(0.5), Some(0.3), Some(0.1)];
        let mut waits = [0u32; 4];
        let mut delivered = Vec::new();
        for _ in 0..4 {
            let mut a = vec![
                answer(0, 100),
                answer(1, 100),
                answer(2, 100),
                answer(3, 100),
            ];
            let w: Vec<u32> = a.iter().map(|(k, _)| waits[k.1 as usize]).collect();
            let s: Vec<Option<f32>> = a.iter().map(|(k, _)| scores[k.1 as usize]).collect();
            order(&mut a, 100, &s, &w);
            let first = a[0].0.1;
            delivered.push(first);
            for (p, w) in waits.iter_mut().enumerate() {
                *w = if p as i32 == first { 0 } else { *w + 1 };
            }
        }
        delivered.sort();
        assert_eq!(
            delivered,
            [0, 1, 2, 3],
            "each partition once in four responses"
        );
    }

    #[test]
    fn partitions_of_a_topic_stay_together() {
        let mut other = answer(0, 100);
        other.0.0.name = kafka_protocol::protocol::StrBytes::from_static_str("u");
        let mut a = vec![other, answer(0, 100), answer(1, 100)];
        // u's partition ranks between t's two: t's go together, first (its best ranks first).
        assert!(order(
            &mut a,
            100,
            &[Some(0.5), Some(0.9), Some(0.1)],
            &[0, 0, 0]
        ));
        let names: Vec<(&str, i32)> = a.iter().map(|(k, _)| (k.0.name.as_str(), k.1)).collect();
        assert_eq!(names, [("t", 0), ("t", 1), ("u", 0)]);
    }

    #[test]
    fn a_partition_cut_last_time_goes_before_any_preferred_one() {
        let scores = [Some(0.9), Some(-0.2), Some(0.5)];
        let mut a = vec![answer(0, 100), answer(1, 100), answer(2, 100)];
        assert!(order(&mut a, 150, &scores, &[0, 1, 0]));
        assert_eq!(partitions(&a), [1, 0, 2]);
    }
}

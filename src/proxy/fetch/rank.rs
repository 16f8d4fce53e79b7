//! When the records of a response do not all fit its max_bytes: which partitions go first.
//! Kafka fills a response in request order (rotated by fetch sessions). With prefetch
//! `predictive`, shardgate puts first the partitions whose recent content is closest to what
//! the consumer was delivered (cosine similarity of embedding centroids from sampled records,
//! `prefetch::profiles`), but every partition cut from the connection's previous response
//! before all of them: none waits more than one response behind the preferred ones. The
//! records themselves are untouched; only the order of partitions changes, which Kafka's
//! protocol leaves to the broker.

use kafka_protocol::messages::fetch_response::PartitionData;

use super::plan::Key;

/// Reorders the partitions of `answers` that carry records (the others keep their places),
/// when they hold more than `max_bytes` together: first those `cut_before` marks, then by
/// `scores` (highest first; unknown as 0), ties in the original order (`scores` and
/// `cut_before` go with `answers` index by index). Returns whether the order changed.
pub(super) fn order(
    answers: &mut [(Key, PartitionData)],
    max_bytes: i32,
    scores: &[Option<f32>],
    cut_before: &[bool],
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
        let ka = (cut_before[a], scores[a].unwrap_or(0.0));
        let kb = (cut_before[b], scores[b].unwrap_or(0.0));
        kb.0.cmp(&ka.0).then(kb.1.total_cmp(&ka.1))
    });
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
        let none = [false; 4];
        assert!(!order(&mut a, 300, &scores, &none), "everything fits");
        assert_eq!(partitions(&a), [0, 1, 2, 3]);
        assert!(order(&mut a, 250, &scores, &none));
        // The partition without records keeps its place.
        assert_eq!(partitions(&a), [2, 1, 3, 0]);
    }

    #[test]
    fn a_partition_cut_last_time_goes_before_any_preferred_one() {
        let scores = [Some(0.9), Some(-0.2), Some(0.5)];
        let mut a = vec![answer(0, 100), answer(1, 100), answer(2, 100)];
        assert!(order(&mut a, 150, &scores, &[false, true, false]));
        assert_eq!(partitions(&a), [1, 0, 2]);
    }
}

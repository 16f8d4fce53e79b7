//! Unit tests of `readahead.rs` (the per-connection queue).
use super::*;

fn key() -> Key {
    (
        TopicRef {
            name: kafka_protocol::protocol::StrBytes::from_static_str("t"),
            id: uuid::Uuid::nil(),
        },
        0,
    )
}

fn entry(t: Took) -> bool {
    matches!(t, Took::Entry(_))
}

fn asked(offset: i64, current: i32, last: i32) -> Asked {
    Asked {
        offset,
        current_leader_epoch: current,
        last_fetched_epoch: last,
    }
}

#[test]
fn a_polls_answer_serves_only_a_fetch_with_the_same_offset_and_epochs() {
    let f = ConnFetch::default();
    let data = || PartitionData::default().with_high_watermark(20);
    f.put(key(), 10, Some(asked(10, 5, 4)), 0, data(), None);
    assert!(
        !entry(f.take(&key(), asked(10, 5, 5), 0)),
        "other last epoch"
    );
    f.put(key(), 10, Some(asked(10, 5, 4)), 0, data(), None);
    assert!(
        !entry(f.take(&key(), asked(10, 6, 4), 0)),
        "other leader epoch"
    );
    f.put(key(), 10, Some(asked(10, 5, 4)), 0, data(), None);
    assert!(!entry(f.take(&key(), asked(11, 5, 4), 0)), "other offset");
    f.put(key(), 10, Some(asked(10, 5, 4)), 0, data(), None);
    assert!(entry(f.take(&key(), asked(10, 5, 4), 0)));
    // The rest of a checked answer continues whatever the epochs.
    f.put(key(), 10, None, 0, data(), None);
    assert!(entry(f.take(&key(), asked(10, 7, 7), 0)));
}

fn batch(base: i64, last_delta: i32, epoch: i32) -> bytes::Bytes {
    use bytes::BufMut;
    let mut b = bytes::BytesMut::new();
    b.put_i64(base);
    b.put_i32(100);
    b.put_i32(epoch);
    b.put_i8(2);
    b.put_u32(0);
    b.put_i16(0);
    b.put_i32(last_delta);
    b.resize(112, 0);
    b.freeze()
}

/// Files an answer of `records` to a poll of `key` from `asked` (sent ahead).
fn land(f: &ConnFetch, asked: Asked, records: bytes::Bytes) {
    use futures::FutureExt;
    use kafka_protocol::messages::FetchResponse;
    use kafka_protocol::messages::fetch_response::FetchableTopicResponse;
    let resp = FetchResponse::default().with_responses(vec![
        FetchableTopicResponse::default()
            .with_topic(kafka_protocol::messages::TopicName(key().0.name))
            .with_partitions(vec![
                PartitionData::default()
                    .with_high_watermark(1000)
                    .with_records(Some(records)),
            ]),
    ]);
    let result = Arc::new(SubResult {
        broker: 1,
        seq: 0,
        asked: vec![(key(), asked)],
        isolation: 0,
        outcome: Ok(resp),
    });
    let seq = std::cell::Cell::new(0);
    let started = f
        .start_if_idle(1, PollKind::ReadAhead, HashMap::new(), |s| {
            seq.set(s);
            futures::future::ready(result.clone()).boxed().shared()
        })
        .expect("idle");
    drop(started);
    let result = SubResult {
        broker: 1,
        seq: seq.get(),
        asked: result.asked.clone(),
        isolation: 0,
        outcome: result.outcome.clone(),
    };
    f.fold(&result, |_| None);
}

#[test]
fn a_queue_serves_contiguous_reads_in_order_and_a_seek_drops_it() {
    let f = ConnFetch::default();
    // The client fetches the partition (read-ahead follows only what it fetches).
    assert!(!entry(f.take(&key(), asked(10, 5, 4), 0)));
    land(&f, asked(10, 5, 4), batch(10, 9, 5)); // 10..=19
    assert_eq!(f.tail(&key()), Tail::At(20, Some(5)));
    land(&f, asked(20, 5, 5), batch(20, 4, 5)); // 20..=24, read from where the first ends
    assert_eq!(f.tail(&key()), Tail::At(25, Some(5)));
    assert_eq!(f.ready_len(), 2);
    assert_eq!(f.queued_bytes(), 224);
    let Took::Entry(first) = f.take(&key(), asked(10, 5, 4), 0) else {
        panic!("first read")
    };
    assert!(first.ahead);
    assert_eq!(f.queued_bytes(), 112);
    // The client asks from the end of what it got, with its last batch's epoch.
    assert!(entry(f.take(&key(), asked(20, 5, 5), 0)), "second read");
    assert_eq!((f.ready_len(), f.queued_bytes()), (0, 0));

    land(&f, asked(25, 5, 5), batch(25, 4, 5));
    land(&f, asked(30, 5, 5), batch(30, 4, 5));
    // A read that does not continue the queue replaces it.
    land(&f, asked(50, 5, 5), batch(50, 4, 5));
    assert_eq!(f.ready_len(), 1);
    // Another isolation level does not take it.
    assert!(!entry(f.take(&key(), asked(50, 5, 5), 1)));
    land(&f, asked(50, 5, 5), batch(50, 4, 5));
    // A seek drops what is queued.
    assert!(!entry(f.take(&key(), asked(40, 5, 5), 0)));
    assert_eq!((f.ready_len(), f.queued_bytes()), (0, 0));
    assert_eq!(f.tail(&key()), Tail::Empty);
}

/// Partitions 0 and 1 of "t" fetched (an empty queue answers nothing, but the fetch is
/// noted), then one record batch (112 bytes) queued for each; partition 1's key.
fn two_queued(f: &ConnFetch) -> Key {
    let other: Key = (key().0, 1);
    let data = || PartitionData::default().with_records(Some(batch(0, 0, 1)));
    for k in [key(), other.clone()] {
        assert!(!entry(f.take(&k, asked(0, -1, -1), 0)));
        f.put(k, 0, None, 0, data(), None);
    }
    other
}

#[test]
fn a_partition_the_client_stopped_fetching_neither_starves_the_others_nor_stays() {
    let f = ConnFetch::default();
    let other = two_queued(&f);
    assert_eq!(f.queued_recent(RECENT), 224);
    let last_asked = |ago: Duration| {
        let at = Instant::now().checked_sub(ago).expect("uptime");
        f.inner.lock().unwrap().asked.insert(other.clone(), at);
    };
    // Revoked in a rebalance: no longer counted against the rate target, still held.
    last_asked(Duration::from_secs(2));
    assert_eq!(f.queued_recent(RECENT), 112);
    assert_eq!(f.queued_bytes(), 224);
    f.expire();
    assert_eq!(f.queued_bytes(), 224, "kept while it may come back");
    // Not fetched for UNASKED_TTL: dropped; the partition still fetched keeps its queue.
    last_asked(UNASKED_TTL + Duration::from_secs(1));
    f.expire();
    assert_eq!(f.queued_bytes(), 112);
    assert!(entry(f.take(&key(), asked(0, -1, -1), 0)));
    assert_eq!(f.queued_bytes(), 0);
}

#[test]
fn a_poll_that_brought_only_part_of_a_batch_queues_nothing() {
    let f = ConnFetch::default();
    assert!(!entry(f.take(&key(), asked(10, 5, 4), 0)));
    // The broker's bytes ran out inside the first batch: nothing a client could read.
    land(&f, asked(10, 5, 4), batch(10, 9, 5).slice(..60));
    assert_eq!((f.ready_len(), f.queued_bytes()), (0, 0));
    assert_eq!(f.tail(&key()), Tail::Empty, "read again from where it was");
    // A whole batch and the start of the next: queued (the fetch reads the whole one).
    let mut two = batch(10, 9, 5).to_vec();
    two.extend_from_slice(&batch(20, 4, 5)[..60]);
    land(&f, asked(10, 5, 4), bytes::Bytes::from(two));
    assert_eq!(f.ready_len(), 1);
    assert_eq!(f.tail(&key()), Tail::At(20, Some(5)));
    // The rest of an answer cut at max_bytes that is only that partial batch: not kept.
    let partial = PartitionData::default().with_records(Some(batch(20, 4, 5).slice(..60)));
    f.put(key(), 20, None, 0, partial, None);
    assert_eq!(f.ready_len(), 1);
}

#[test]
fn a_partition_revoked_from_the_member_loses_its_queue_at_once() {
    let f = ConnFetch::default();
    two_queued(&f);
    assert_eq!(f.asked_keys().len(), 2);
    // The new assignment holds partition 0 only: partition 1's queue goes, and the chain no
    // longer reads it (it is not asked for any more); partition 0 keeps its queue.
    f.retain_assigned(|k| k.1 == 0);
    assert_eq!(f.queued_bytes(), 112);
    assert_eq!(f.asked_keys(), vec![key()]);
    assert!(entry(f.take(&key(), asked(0, -1, -1), 0)));
}

#[test]
fn an_answer_a_gate_holds_counts_against_the_bound_but_not_the_rate_target() {
    let f = ConnFetch::default();
    let budget = crate::proxy::budget::MemoryBudget::new(1 << 20);
    let records = PartitionData::default().with_records(Some(batch(10, 9, 5)));
    assert!(!entry(f.take(&key(), asked(10, 5, 4), 0)));
    f.hold(key(), 10, asked(10, 5, 4), 0, records, budget.charge(112));
    assert_eq!(f.queued_bytes(), 112);
    assert_eq!(
        f.queued_recent(RECENT),
        0,
        "the client's answer, not read ahead"
    );
    // Read ahead behind it: counted.
    land(&f, asked(20, 5, 5), batch(20, 4, 5));
    assert_eq!((f.queued_bytes(), f.queued_recent(RECENT)), (224, 112));
    // Taken (the gate opened): the held answer first, at its offset.
    assert!(entry(f.take(&key(), asked(10, 5, 4), 0)));
    assert!(entry(f.take(&key(), asked(20, 5, 5), 0)));
}

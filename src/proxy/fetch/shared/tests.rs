//! Shared reads without I/O: lookups, epochs, transactions, sharing.

use super::*;
use bytes::{BufMut, Bytes, BytesMut};
use kafka_protocol::messages::fetch_response::AbortedTransaction;

/// The key a fetch's want has, for matching pre-reads in tests.
fn key_of(name: &str, partition: i32) -> plan::Key {
    (
        TopicRef {
            name: name.to_string().into(),
            id: uuid::Uuid::nil(),
        },
        partition,
    )
}

/// A fetch of partition `key` from `offset`, client leader epoch `epoch`, no last epoch.
fn want_at(key: plan::Key, offset: i64, epoch: i32) -> Want {
    Want {
        key,
        part: FetchPartition::default()
            .with_partition(0)
            .with_fetch_offset(offset)
            .with_current_leader_epoch(epoch)
            .with_last_fetched_epoch(-1)
            .with_partition_max_bytes(1 << 20),
        name: Some("t".to_string().into()),
        leader: Ok(1),
    }
}

fn batch(base: i64, count: i32, len: usize) -> Vec<u8> {
    let mut b = BytesMut::new();
    b.put_i64(base);
    b.put_i32((len - 12) as i32);
    b.put_i32(0);
    b.put_i8(2);
    b.put_i32(0);
    b.put_i16(0);
    b.put_i32(count - 1);
    b.resize(len, 0);
    b.to_vec()
}

fn data(batches: &[Vec<u8>], aborted: &[i64]) -> PartitionData {
    let mut r = Vec::new();
    for b in batches {
        r.extend_from_slice(b);
    }
    PartitionData::default()
        .with_records(Some(Bytes::from(r)))
        .with_aborted_transactions(Some(
            aborted
                .iter()
                .map(|o| AbortedTransaction::default().with_first_offset(*o))
                .collect(),
        ))
}

/// A store holding `p`, read at offset 10, read_committed, under leader epoch `epoch`
/// with last fetched epoch `last_epoch`.
fn holding(p: PartitionData, epoch: i32, last_epoch: i32) -> SharedReads {
    let store = SharedReads::new(Duration::from_secs(10), 1 << 26, true);
    let bytes = p.records.as_ref().map_or(0, |r| r.len());
    store.lock().insert(
        ("t".into(), 0),
        vec![Slot {
            generation: 0,
            topic_id: uuid::Uuid::nil(),
            offset: 10,
            isolation: 1,
            epoch,
            last_epoch,
            leader_epoch: epoch,
            at: Instant::now(),
            state: State::Ready(Box::new(p)),
            bytes,
            unserved: true,
        }],
    );
    store.count.store(1, std::sync::atomic::Ordering::Relaxed);
    store
}

#[test]
fn a_cut_keeps_whole_batches_within_the_limit() {
    let p = data(
        &[batch(0, 10, 100), batch(10, 10, 100), batch(20, 5, 100)],
        &[5, 15, 22],
    );
    let c = cut(&p, 250).unwrap();
    assert_eq!(c.records.as_ref().unwrap().len(), 200);
    assert_eq!(
        c.aborted_transactions
            .unwrap()
            .iter()
            .map(|a| a.first_offset)
            .collect::<Vec<_>>(),
        vec![5, 15]
    );
    assert!(
        cut(&p, 10).is_none(),
        "a first batch above the limit goes upstream"
    );
    let c = cut(&p, 100).unwrap();
    assert_eq!(c.records.as_ref().unwrap().len(), 100);
    assert_eq!(c.aborted_transactions.unwrap().len(), 1);
    let c = cut(&p, usize::MAX).unwrap();
    assert_eq!(c.records.as_ref().unwrap().len(), 300);
}

#[test]
fn only_offsets_within_the_read_at_its_isolation_and_epoch_match() {
    let store = holding(data(&[batch(10, 5, 100)], &[]), 4, -1);
    let want = |offset: i64, epoch: i32| want_at(key_of("t", 0), offset, epoch);
    assert!(matches!(
        store.find(1, &want(10, 4), 1, uuid::Uuid::nil(), -1),
        Found::Ready(_)
    ));
    let mut last = want(10, 4);
    last.part.last_fetched_epoch = 3;
    assert!(
        matches!(
            store.find(1, &last, 1, uuid::Uuid::nil(), -1),
            Found::Nothing
        ),
        "a last fetched epoch other than the read's: Kafka checks for divergence"
    );
    last.part.last_fetched_epoch = 4;
    assert!(matches!(
        store.find(1, &last, 1, uuid::Uuid::nil(), -1),
        Found::Ready(_)
    ));
    assert!(
        matches!(
            store.find(1, &want(10, 4), 1, uuid::Uuid::from_u128(7), -1),
            Found::Nothing
        ),
        "a topic created again under the same name"
    );
    assert!(matches!(
        store.find(1, &want(10, -1), 1, uuid::Uuid::nil(), -1),
        Found::Ready(_)
    ));
    assert!(
        matches!(
            store.find(1, &want(10, 5), 1, uuid::Uuid::nil(), -1),
            Found::Nothing
        ),
        "another epoch"
    );
    assert!(
        matches!(
            store.find(1, &want(10, 4), 0, uuid::Uuid::nil(), -1),
            Found::Nothing
        ),
        "another isolation"
    );
    assert!(
        matches!(
            store.find(1, &want(11, 4), 1, uuid::Uuid::nil(), -1),
            Found::Ready(_)
        ),
        "an offset inside the answer"
    );
    for outside in [9, 15] {
        assert!(
            matches!(
                store.find(1, &want(outside, 4), 1, uuid::Uuid::nil(), -1),
                Found::Nothing
            ),
            "an offset outside the answer"
        );
    }
}

/// A v2 batch header with the fields `from_offset` reads, `len` bytes in all.
fn batch_of(base: i64, count: i32, len: usize, epoch: i32, control: bool, pid: i64) -> Vec<u8> {
    let mut b = BytesMut::new();
    b.put_i64(base);
    b.put_i32((len - 12) as i32);
    b.put_i32(epoch);
    b.put_i8(2);
    b.put_i32(0);
    b.put_i16(if control { 0x30 } else { 0x10 });
    b.put_i32(count - 1);
    b.put_i64(0);
    b.put_i64(0);
    b.put_i64(pid);
    b.resize(len, 0);
    b.to_vec()
}

fn aborted(list: &[(i64, i64)]) -> Vec<(i64, i64)> {
    list.to_vec()
}

fn aborted_of(p: &PartitionData) -> Vec<(i64, i64)> {
    p.aborted_transactions
        .iter()
        .flatten()
        .map(|a| (a.producer_id.0, a.first_offset))
        .collect()
}

fn txn_data() -> PartitionData {
    // pid 7 writes 10..13 and aborts at 14; pid 8 writes 15..19 and aborts at 20.
    let batches = [
        batch_of(10, 4, 100, 3, false, 7),
        batch_of(14, 1, 80, 3, true, 7),
        batch_of(15, 5, 100, 4, false, 8),
        batch_of(20, 1, 80, 4, true, 8),
    ];
    let mut p = data(&batches, &[]);
    p.aborted_transactions = Some(
        aborted(&[(7, 10), (8, 15)])
            .into_iter()
            .map(|(pid, first)| {
                AbortedTransaction::default()
                    .with_producer_id(kafka_protocol::messages::ProducerId(pid))
                    .with_first_offset(first)
            })
            .collect(),
    );
    p
}

#[test]
fn from_inside_an_answer_the_batches_and_open_transactions_from_there() {
    let p = txn_data();
    let (inside, epoch) = from_offset(&p, 16).unwrap();
    assert_eq!(inside.records.as_ref().unwrap().len(), 180);
    assert_eq!(&inside.records.as_ref().unwrap()[..8], &15i64.to_be_bytes());
    assert_eq!(epoch, 4);
    assert_eq!(
        aborted_of(&inside),
        vec![(8, 15)],
        "pid 7's transaction ended before 15: a consumer would skip pid 7's next batches"
    );
    let (inside, epoch) = from_offset(&p, 12).unwrap();
    assert_eq!(inside.records.as_ref().unwrap().len(), 360);
    assert_eq!(epoch, 3);
    assert_eq!(aborted_of(&inside), vec![(7, 10), (8, 15)]);
    assert!(from_offset(&p, 21).is_none(), "beyond the answer");
}

#[test]
fn a_fetch_inside_an_answer_needs_a_divergence_check_that_holds() {
    let store = holding(txn_data(), 5, 3);
    let want = |offset: i64, last: i32| Want {
        key: key_of("t", 0),
        part: FetchPartition::default()
            .with_partition(0)
            .with_fetch_offset(offset)
            .with_current_leader_epoch(5)
            .with_last_fetched_epoch(last)
            .with_partition_max_bytes(1 << 20),
        name: Some("t".to_string().into()),
        leader: Ok(1),
    };
    let served = |w: Want| match store.find(2, &w, 1, uuid::Uuid::nil(), -1) {
        Found::Ready(p) => Some(p),
        _ => None,
    };
    assert!(served(want(10, 3)).is_some(), "the read's own check");
    assert!(
        served(want(10, 4)).is_none(),
        "another epoch at the read's offset"
    );
    assert!(served(want(15, -1)).is_some());
    assert!(
        served(want(15, 4)).is_some(),
        "the first batch served has epoch 4"
    );
    assert!(
        served(want(15, 5)).is_some(),
        "the leader's epoch at the read"
    );
    assert!(
        served(want(15, 3)).is_none(),
        "epoch 3 may end before 15 upstream"
    );
    let p = served(want(17, -1)).unwrap();
    assert_eq!(aborted_of(&p), vec![(8, 15)]);
    assert!(served(want(9, -1)).is_none(), "before the answer");
    assert!(served(want(21, -1)).is_none(), "after the answer");
}

#[tokio::test]
async fn a_partition_two_connections_read_is_read_once_for_both() {
    use kafka_protocol::messages::FetchResponse;
    use kafka_protocol::messages::fetch_response::FetchableTopicResponse;
    let store = Arc::new(SharedReads::new(Duration::from_secs(10), 1 << 26, true));
    // Asked by topic id (Fetch v13): the key has no name, the answer names no topic.
    let id = uuid::Uuid::from_u128(42);
    let by_id = (
        TopicRef {
            name: Default::default(),
            id,
        },
        0,
    );
    let want = want_at(by_id.clone(), 10, -1);
    let poll = |seq: u64| -> SubFuture {
        let answer = FetchResponse::default().with_responses(vec![
            FetchableTopicResponse::default()
                .with_topic_id(id)
                .with_partitions(vec![
                    data(&[batch(10, 5, 100), batch(15, 5, 100)], &[]).with_high_watermark(20),
                ]),
        ]);
        let r = Arc::new(SubResult {
            broker: 1,
            seq,
            asked: vec![(
                by_id.clone(),
                crate::proxy::fetch::plan::Asked::of(&want.part),
            )],
            isolation: 0,
            outcome: Ok(answer),
        });
        futures::future::ready(r).boxed().shared()
    };
    let ids = [(&want, id, -1)];
    // One reader: its poll is its own.
    let first = store.poll_started(1, 0, 1, &ids, poll(1));
    assert!(matches!(store.find(3, &want, 0, id, -1), Found::Nothing));
    first.await;
    assert!(matches!(store.find(3, &want, 0, id, -1), Found::Nothing));
    // A second connection reads it: its poll is registered, then kept.
    let second = store.poll_started(2, 0, 1, &ids, poll(2));
    assert!(matches!(
        store.find(3, &want, 0, id, -1),
        Found::InFlight(_)
    ));
    second.await;
    let Found::Ready(p) = store.find(3, &want, 0, id, -1) else {
        panic!("the second poll's answer is kept");
    };
    assert_eq!(p.records.as_ref().unwrap().len(), 200);
    let mut inside = want.clone();
    inside.part.fetch_offset = 16;
    let Found::Ready(p) = store.find(3, &inside, 0, id, -1) else {
        panic!("a consumer behind, inside the answer");
    };
    assert_eq!(p.records.as_ref().unwrap().len(), 100);
    assert!(
        matches!(store.find(3, &want, 1, id, -1), Found::Nothing),
        "another isolation level"
    );
    // A poll waiting for more than a byte is not waited on by others.
    let third = store.poll_started(4, 0, 1024, &ids, poll(3));
    third.await;
    assert_eq!(store.bytes.load(std::sync::atomic::Ordering::Relaxed), 200);
    store.sweep();
    assert_eq!(store.count.load(std::sync::atomic::Ordering::Relaxed), 1);
}

#[tokio::test]
async fn a_partition_two_groups_were_assigned_is_shared_from_the_first_fetch() {
    let store = Arc::new(SharedReads::new(Duration::from_secs(10), 1 << 26, true));
    let want = want_at(key_of("t", 0), 0, -1);
    let pending: SubFuture = futures::future::pending().boxed().shared();
    let ids = [(&want, uuid::Uuid::nil(), -1)];
    let parts = [("t".to_string(), 0)];
    store.assigned("g1", &parts);
    store.assigned("g1", &parts);
    drop(store.poll_started(1, 0, 1, &ids, pending.clone()));
    assert!(
        matches!(
            store.find(2, &want, 0, uuid::Uuid::nil(), -1),
            Found::Nothing
        ),
        "one group (assigned twice) and its connection: not shared"
    );
    store.assigned("g2", &parts);
    drop(store.poll_started(1, 0, 1, &ids, pending));
    assert!(matches!(
        store.find(2, &want, 0, uuid::Uuid::nil(), -1),
        Found::InFlight(_)
    ));
}

#[test]
fn answers_read_under_an_older_leader_epoch_go_when_the_topology_learns_a_newer_one() {
    let store = holding(data(&[batch(10, 5, 100)], &[]), 4, -1);
    // `holding` files the slot without counting its bytes: count them here.
    store.bytes.store(100, Relaxed);
    let want = want_at(key_of("t", 0), 10, -1);
    // The topology knows the same epoch, or none: served.
    assert!(matches!(
        store.find(1, &want, 1, uuid::Uuid::nil(), 4),
        Found::Ready(_)
    ));
    assert!(matches!(
        store.find(1, &want, 1, uuid::Uuid::nil(), -1),
        Found::Ready(_)
    ));
    // A later one: dropped (an unclean election could have lost what the old leader gave).
    assert!(matches!(
        store.find(1, &want, 1, uuid::Uuid::nil(), 5),
        Found::Nothing
    ));
    assert_eq!(store.bytes.load(Relaxed), 0);
    assert!(matches!(
        store.find(1, &want, 1, uuid::Uuid::nil(), 4),
        Found::Nothing
    ));
}

#[test]
fn a_full_store_evicts_its_oldest_answers_for_new_ones_and_never_exceeds_its_cap() {
    // Room for three 100-byte answers.
    let store = SharedReads::new(Duration::from_secs(10), 300, true);
    let slot = |offset: i64| Slot {
        generation: offset as u64,
        topic_id: uuid::Uuid::nil(),
        offset,
        isolation: 1,
        epoch: -1,
        last_epoch: -1,
        leader_epoch: -1,
        at: Instant::now(),
        state: State::Ready(Box::new(data(&[batch(offset, 1, 100)], &[]))),
        bytes: 100,
        unserved: false,
    };
    for (i, offset) in [10, 20, 30].into_iter().enumerate() {
        let mut slots = store.lock();
        assert!(store.make_room(&mut slots, 100));
        slots
            .entry(("t".into(), i as i32))
            .or_default()
            .push(slot(offset));
        store.bytes.fetch_add(100, Relaxed);
        drop(slots);
        std::thread::sleep(Duration::from_millis(2));
    }
    assert_eq!(store.bytes.load(Relaxed), 300);
    // A fourth: the oldest (partition 0) goes, the cap holds.
    let mut slots = store.lock();
    assert!(store.make_room(&mut slots, 100));
    assert!(!slots.contains_key(&("t".to_string(), 0)));
    assert_eq!(store.bytes.load(Relaxed), 200);
    // More than the cap can never fit; reads in flight are never evicted.
    assert!(!store.make_room(&mut slots, 301));
    for entries in slots.values_mut() {
        for s in entries.iter_mut() {
            s.state = State::InFlight(futures::future::pending().boxed().shared());
        }
    }
    assert!(!store.make_room(&mut slots, 200));
    assert_eq!(store.bytes.load(Relaxed), 200);
    // One answer ready again, one read in flight: 200 bytes can never be freed for a
    // 250-byte read, so the ready answer is not thrown away for a refusal.
    let first = slots.values_mut().next().unwrap();
    first[0].state = State::Ready(Box::new(data(&[batch(20, 1, 100)], &[])));
    assert!(!store.make_room(&mut slots, 250));
    assert_eq!(
        slots.values().flatten().count(),
        2,
        "nothing evicted for a refusal"
    );
    assert!(store.make_room(&mut slots, 200));
    assert_eq!(store.bytes.load(Relaxed), 100);
}

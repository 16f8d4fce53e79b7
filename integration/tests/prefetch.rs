//! Prefetch (issue 11): a member assigned partitions finds them read from its group's commits
//! before its first fetch (a rebalance pre-read), and what it gets is exactly what Kafka
//! gives a consumer at those offsets: the same records, with read_committed and aborted
//! transactions in the data.

mod common;

use std::time::{Duration, Instant};

use common::*;
use kafka_protocol::messages::{ApiKey, FetchRequest, FetchResponse};
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::message::{Headers, Message};
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};

const PARTITIONS: i32 = 3;

/// `txns` transactions of `per_txn` records spread over the partitions; every third one is
/// aborted. Returns how many records were committed.
fn produce_transactions(topic: &str, wave: &str, txns: usize, per_txn: usize) -> usize {
    let producer: BaseProducer = ClientConfig::new()
        .set("bootstrap.servers", kafka())
        .set("transactional.id", unique("prefetch-txn"))
        .create()
        .unwrap();
    let t = Duration::from_secs(30);
    producer.init_transactions(t).unwrap();
    let mut committed = 0;
    for n in 0..txns {
        producer.begin_transaction().unwrap();
        for i in 0..per_txn {
            let key = format!("{wave}-k{i}");
            let value = format!("{wave} txn {n} record {i}");
            let h = rdkafka::message::OwnedHeaders::new().insert(rdkafka::message::Header {
                key: "wave",
                value: Some(wave),
            });
            producer
                .send(
                    BaseRecord::to(topic)
                        .partition((i % PARTITIONS as usize) as i32)
                        .key(&key)
                        .payload(&value)
                        .headers(h),
                )
                .unwrap();
        }
        producer.flush(t).unwrap();
        if n % 3 == 2 {
            producer.abort_transaction(t).unwrap();
        } else {
            producer.commit_transaction(t).unwrap();
            committed += per_txn;
        }
    }
    committed
}

type Rec = (
    i32,
    i64,
    Option<Vec<u8>>,
    Option<Vec<u8>>,
    Vec<(String, Vec<u8>)>,
    i64,
);

fn rec(m: &rdkafka::message::BorrowedMessage<'_>) -> Rec {
    let headers = m
        .headers()
        .map(|h| {
            h.iter()
                .map(|x| (x.key.to_string(), x.value.unwrap_or_default().to_vec()))
                .collect()
        })
        .unwrap_or_default();
    (
        m.partition(),
        m.offset(),
        m.key().map(|k| k.to_vec()),
        m.payload().map(|v| v.to_vec()),
        headers,
        m.timestamp().to_millis().unwrap_or(-1),
    )
}

fn group_member(bootstrap: &str, group: &str, client_id: &str) -> BaseConsumer {
    let c: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", group)
        .set("client.id", client_id)
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        .set("isolation.level", "read_committed")
        .create()
        .unwrap();
    c
}

/// Polls until `n` records came (or panics after `limit`).
fn consume(c: &BaseConsumer, n: usize, limit: Duration) -> Vec<Rec> {
    let started = Instant::now();
    let mut out = Vec::new();
    while out.len() < n {
        assert!(
            started.elapsed() < limit,
            "consumed {} of {n} within {limit:?}",
            out.len()
        );
        if let Some(m) = c.poll(Duration::from_millis(100)) {
            out.push(rec(&m.unwrap()));
        }
    }
    // Nothing more arrives (aborted records must not).
    let quiet = Instant::now();
    while quiet.elapsed() < Duration::from_secs(2) {
        if let Some(m) = c.poll(Duration::from_millis(100)) {
            panic!("an extra record: {:?}", rec(&m.unwrap()));
        }
    }
    out.sort();
    out
}

#[test]
#[ignore = "needs the testbed: integration/run-tests"]
fn a_rejoining_member_finds_its_partitions_read_from_its_commits_exactly() {
    let topic = unique("prefetch-rejoin");
    create_topic(&topic, PARTITIONS);
    let first = produce_transactions(&topic, "w1", 6, 30);
    let group = unique("g-prefetch");
    let client_id = "prefetch-member";

    // A member reads the first wave through shardgate, commits and leaves.
    let a = group_member(&proxy(), &group, client_id);
    a.subscribe(&[&topic]).unwrap();
    let got = consume(&a, first, Duration::from_secs(60));
    assert_eq!(got.len(), first);
    a.commit_consumer_state(CommitMode::Sync).unwrap();
    let committed: Vec<(i32, i64)> = a
        .committed(Duration::from_secs(10))
        .unwrap()
        .elements()
        .iter()
        .map(|e| (e.partition(), e.offset().to_raw().unwrap_or(-1)))
        .collect();
    a.unsubscribe();
    drop(a);

    // More records while no member runs.
    let second = produce_transactions(&topic, "w2", 6, 30);
    let reads = metric("shardgate_prefetch_reads_total", &["reason=\"rebalance\""]);
    let hits = metric("shardgate_prefetch_hits_total", &[]);
    let delivered = metric("shardgate_prefetch_delivered_records_total", &[]);

    // The member rejoins: its assignment passes through shardgate, which reads its
    // partitions from the commits it saw before the member asks for them.
    let b = group_member(&proxy(), &group, client_id);
    b.subscribe(&[&topic]).unwrap();
    let through = consume(&b, second, Duration::from_secs(60));
    let reads = metric("shardgate_prefetch_reads_total", &["reason=\"rebalance\""]) - reads;
    let hits = metric("shardgate_prefetch_hits_total", &[]) - hits;
    let delivered = metric("shardgate_prefetch_delivered_records_total", &[]) - delivered;
    drop(b);

    // The control: straight from Kafka, from the same committed offsets.
    let direct: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", kafka())
        .set("group.id", unique("g-prefetch-direct"))
        .set("enable.auto.commit", "false")
        .set("isolation.level", "read_committed")
        .create()
        .unwrap();
    let mut tpl = TopicPartitionList::new();
    for (p, o) in &committed {
        tpl.add_partition_offset(&topic, *p, Offset::Offset(*o))
            .unwrap();
    }
    direct.assign(&tpl).unwrap();
    let straight = consume(&direct, second, Duration::from_secs(60));

    eprintln!(
        "rejoin: committed {committed:?}; {second} records of the second wave; pre-reads sent {reads}, partitions answered from them {hits}, records delivered from them {delivered}"
    );
    assert_eq!(through.len(), straight.len());
    assert!(
        through == straight,
        "records through shardgate differ from Kafka's at the same offsets"
    );
    assert!(
        through
            .iter()
            .all(|r| r.3.as_ref().is_some_and(|v| v.starts_with(b"w2"))),
        "a record of the first wave or an aborted one came back"
    );
    assert!(reads >= 1.0, "no pre-read was sent at the rejoin");
    assert!(
        hits >= 1.0,
        "the member's first fetches did not use the pre-read"
    );
    assert!(delivered > 0.0);
}

/// A rejoining member's committed offsets are read by shardgate when the leader's SyncGroup
/// passes (a round trip before the member asks) and its OffsetFetch is answered from that
/// read: Kafka's commits, not what shardgate saw. A commit made straight at Kafka while the
/// group was empty, which shardgate never saw, is where the member resumes.
#[test]
#[ignore = "needs the testbed: integration/run-tests"]
fn a_rejoining_member_gets_kafkas_committed_offsets_a_round_trip_sooner() {
    let topic = unique("prefetch-offsets");
    create_topic(&topic, PARTITIONS);
    produce_plain(&topic, "w1", 40);
    let group = unique("g-offsets");
    let client_id = "offsets-member";

    // Through shardgate: all 40 read and committed (shardgate sees offset 40), then it leaves.
    let a = group_member(&proxy(), &group, client_id);
    a.subscribe(&[&topic]).unwrap();
    assert_eq!(consume(&a, 40, Duration::from_secs(60)).len(), 40);
    a.commit_consumer_state(CommitMode::Sync).unwrap();
    a.unsubscribe();
    drop(a);

    // Straight at Kafka while the group is empty: partition 0 back to offset 25.
    commit_direct(&group, &topic, 25);

    let answered = metric(
        "shardgate_prefetch_offset_answers_total",
        &["outcome=\"answered\""],
    );
    let b = group_member(&proxy(), &group, client_id);
    b.subscribe(&[&topic]).unwrap();
    let got = consume(&b, 15, Duration::from_secs(60));
    let answered = metric(
        "shardgate_prefetch_offset_answers_total",
        &["outcome=\"answered\""],
    ) - answered;
    drop(b);

    let offsets: Vec<(i32, i64)> = got.iter().map(|r| (r.0, r.1)).collect();
    let expected: Vec<(i32, i64)> = (25..40).map(|o| (0, o)).collect();
    eprintln!(
        "rejoin offsets: resumed at {:?}; OffsetFetch answered from the rebalance read {answered}",
        offsets.first()
    );
    assert_eq!(
        offsets, expected,
        "the member did not resume from Kafka's commit"
    );
    assert!(
        got.iter()
            .zip(25..)
            .all(|(r, i)| r.3.as_deref() == Some(format!("w1-{i}").as_bytes())),
        "records differ from what was produced at those offsets"
    );
    assert!(
        answered >= 1.0,
        "the member's OffsetFetch was not answered from the read made at the rebalance"
    );
}

/// Plain records, directly to Kafka, on partition 0: `{wave}-{i}`.
fn produce_plain(topic: &str, wave: &str, n: usize) {
    let producer: BaseProducer = ClientConfig::new()
        .set("bootstrap.servers", kafka())
        .create()
        .unwrap();
    for i in 0..n {
        let v = format!("{wave}-{i}");
        producer
            .send(BaseRecord::<(), _>::to(topic).partition(0).payload(&v))
            .unwrap();
    }
    producer.flush(Duration::from_secs(30)).unwrap();
}

fn delete_topic(topic: &str) {
    run_ok(
        std::process::Command::new(bin("kafka-topics")).args([
            "--bootstrap-server",
            &kafka(),
            "--delete",
            "--topic",
            topic,
        ]),
        Duration::from_secs(60),
    );
}

#[test]
#[ignore = "needs the testbed: integration/run-tests"]
fn a_pre_read_of_a_deleted_topic_never_answers_the_topic_created_after_it() {
    let topic = unique("prefetch-recreate");
    create_topic(&topic, 1);
    produce_plain(&topic, "old", 100);
    let group = unique("g-recreate");
    let client_id = "prefetch-recreate";
    // A member commits offset 50 and leaves; the next one's assignment pre-reads from 50.
    let a = group_member(&proxy(), &group, client_id);
    a.subscribe(&[&topic]).unwrap();
    // It reads a little first: its fetches tell shardgate the isolation level this client
    // uses, which the pre-read then uses too.
    let started = Instant::now();
    let mut read = 0;
    while read < 10 {
        assert!(started.elapsed() < Duration::from_secs(30), "nothing read");
        if let Some(m) = a.poll(Duration::from_millis(50)) {
            m.unwrap();
            read += 1;
        }
    }
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(&topic, 0, Offset::Offset(50))
        .unwrap();
    a.commit(&tpl, CommitMode::Sync).unwrap();
    drop(a);
    let reads = metric("shardgate_prefetch_reads_total", &["reason=\"rebalance\""]);
    let hits = metric("shardgate_prefetch_hits_total", &[]);
    let pre_read_at = Instant::now();
    let b = group_member(&proxy(), &group, client_id);
    b.subscribe(&[&topic]).unwrap();
    let got = consume(&b, 50, Duration::from_secs(30));
    assert_eq!(got[0].1, 50);
    drop(b);
    assert!(
        metric("shardgate_prefetch_reads_total", &["reason=\"rebalance\""]) > reads,
        "no pre-read at the rejoin"
    );
    assert!(
        metric("shardgate_prefetch_hits_total", &[]) > hits,
        "the rejoining member did not use the pre-read"
    );

    // Within the pre-read's lifetime (10 s): the topic goes, a new one of the same name
    // comes with other records at the same offsets.
    let gone = Instant::now();
    delete_topic(&topic);
    eventually("the topic created again", Duration::from_secs(30), || {
        std::process::Command::new(bin("kafka-topics"))
            .args([
                "--bootstrap-server",
                &kafka(),
                "--create",
                "--topic",
                &topic,
                "--partitions",
                "1",
                "--replication-factor",
                &rf().to_string(),
            ])
            .output()
            .is_ok_and(|o| o.status.success())
    });
    produce_plain(&topic, "new", 100);
    let c: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", proxy())
        .set("group.id", unique("g-recreate-reader"))
        .set("client.id", client_id)
        .set("enable.auto.commit", "false")
        .set("isolation.level", "read_committed")
        .create()
        .unwrap();
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(&topic, 0, Offset::Offset(50))
        .unwrap();
    c.assign(&tpl).unwrap();
    let first = loop {
        assert!(
            gone.elapsed() < Duration::from_secs(60),
            "no record of the new topic"
        );
        if let Some(m) = c.poll(Duration::from_millis(100)) {
            break rec(&m.unwrap());
        }
    };
    eprintln!(
        "recreate: first record at offset 50 of the new topic {:.1} s after the delete: {:?}",
        gone.elapsed().as_secs_f64(),
        String::from_utf8_lossy(first.3.as_deref().unwrap_or_default())
    );
    assert_eq!(
        first.3.as_deref(),
        Some(&b"new-50"[..]),
        "a record of the deleted topic was served"
    );
    // Otherwise the pre-read was gone (prefetch.ttl_ms, 10 s) before the new topic was read
    // and nothing was provoked.
    assert!(
        pre_read_at.elapsed() < Duration::from_secs(9),
        "the new topic was read {:.1} s after the pre-read: too late to tell",
        pre_read_at.elapsed().as_secs_f64()
    );
}

#[test]
#[ignore = "needs the testbed: integration/run-tests"]
fn a_kip_848_member_rejoining_finds_its_partition_read_from_its_commits() {
    // group.protocol=consumer: the assignment comes in a ConsumerGroupHeartbeat answer.
    let topic = unique("prefetch-848");
    create_topic(&topic, 1);
    produce_plain(&topic, "r", 200);
    let group = unique("g-848-prefetch");
    let kip848 = ["group.protocol=consumer", "client.id=prefetch-java"];
    let first = java_consume(&topic, &group, 80, &kip848);
    assert_eq!(first.len(), 80);
    let reads = metric("shardgate_prefetch_reads_total", &["reason=\"rebalance\""]);
    let hits = metric("shardgate_prefetch_hits_total", &[]);
    let second = java_consume(&topic, &group, 120, &kip848);
    let reads = metric("shardgate_prefetch_reads_total", &["reason=\"rebalance\""]) - reads;
    let hits = metric("shardgate_prefetch_hits_total", &[]) - hits;
    eprintln!("kip-848 rejoin: pre-reads {reads}, partitions answered from them {hits}");
    let want: Vec<String> = (80..200).map(|i| format!("r-{i}")).collect();
    assert_eq!(second, want, "the second run resumes exactly at the commit");
    assert!(reads >= 1.0, "no pre-read at the KIP-848 assignment");
    assert!(
        hits >= 1.0,
        "the member's first fetch did not use the pre-read"
    );
}

/// Three groups read the same partitions at once, each with its own partition fetch size (so
/// one asks from inside another's answers), read_committed over aborted transactions. Each
/// gets exactly what a direct consumer gets, and upstream reads far less than three times
/// what one group alone needs: the groups share reads (`prefetch.share_reads`).
#[test]
#[ignore = "needs the testbed: integration/run-tests"]
fn groups_reading_the_same_partitions_share_reads_and_each_gets_exactly_kafkas_records() {
    let topic = unique("prefetch-shared");
    create_topic(&topic, PARTITIONS);
    let committed = produce_transactions(&topic, "s", 60, 60);
    let member = |bootstrap: &str, group: &str, max_partition_bytes: usize| {
        let c: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", bootstrap)
            .set("group.id", group)
            .set("auto.offset.reset", "earliest")
            .set("enable.auto.commit", "false")
            .set("isolation.level", "read_committed")
            .set("max.partition.fetch.bytes", max_partition_bytes.to_string())
            .create()
            .unwrap();
        c.subscribe(&[&topic]).unwrap();
        c
    };
    let limit = Duration::from_secs(90);
    let expected = consume(
        &member(&kafka(), &unique("g-direct"), 4096),
        committed,
        limit,
    );
    assert_eq!(expected.len(), committed);

    let upstream_bytes = || metric("shardgate_upstream_fetch_bytes_total", &[]);
    let before = upstream_bytes();
    let alone = consume(
        &member(&proxy(), &unique("g-alone"), 4096),
        committed,
        limit,
    );
    let one_group = upstream_bytes() - before;
    assert_eq!(alone, expected, "one group through shardgate");

    let hits_before = metric("shardgate_prefetch_hits_total", &[]);
    let before = upstream_bytes();
    let got: Vec<Vec<Rec>> = std::thread::scope(|s| {
        let handles: Vec<_> = [4096usize, 6000, 10_000]
            .into_iter()
            .map(|size| {
                let c = member(&proxy(), &unique("g-shared"), size);
                s.spawn(move || consume(&c, committed, limit))
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let three_groups = upstream_bytes() - before;
    let hits = metric("shardgate_prefetch_hits_total", &[]) - hits_before;
    eprintln!(
        "upstream record bytes: one group {one_group}, three groups together {three_groups} \
         ({:.2}x one group); shared hits {hits}; reads registered {}, evicted (ttl/replaced/crowded) {}/{}/{}, refused {}",
        three_groups / one_group,
        metric("shardgate_prefetch_reads_total", &["reason=\"shared\""]),
        metric("shardgate_prefetch_evictions_total", &["reason=\"ttl\""]),
        metric(
            "shardgate_prefetch_evictions_total",
            &["reason=\"replaced\""]
        ),
        metric(
            "shardgate_prefetch_evictions_total",
            &["reason=\"crowded\""]
        ),
        metric("shardgate_prefetch_refused_total", &[]),
    );
    for (i, g) in got.iter().enumerate() {
        assert_eq!(g.len(), expected.len(), "group {i}");
        for (a, b) in g.iter().zip(&expected) {
            assert_eq!(a, b, "group {i}");
        }
    }
    assert!(hits > 0.0, "no fetch was answered from a shared read");
    // Without sharing each group reads everything itself: 3x.
    assert!(
        three_groups < 2.0 * one_group,
        "three groups read {three_groups} bytes upstream, one alone {one_group}"
    );
}

/// A compacted topic (batches with offset gaps inside, offsets that no longer exist) read by
/// groups sharing reads, one of which then seeks back into what the others' reads hold: every
/// record is what a direct consumer gets at those offsets.
#[test]
#[ignore = "needs the testbed: integration/run-tests"]
fn shared_reads_of_a_compacted_topic_and_a_seek_back_answer_exactly_what_kafka_does() {
    let topic = unique("prefetch-compacted");
    create_topic_direct(
        &topic,
        &[
            "--partitions",
            &PARTITIONS.to_string(),
            "--replication-factor",
            &rf().to_string(),
            "--config",
            "cleanup.policy=compact",
            "--config",
            "segment.ms=100",
            "--config",
            "min.cleanable.dirty.ratio=0.01",
        ],
    );
    // Every key once, then the even ones again: compaction leaves the odd keys' first values
    // and the even keys' second ones, gaps all through the log.
    const KEYS: usize = 3000;
    let producer: BaseProducer = ClientConfig::new()
        .set("bootstrap.servers", kafka())
        .set("linger.ms", "5")
        .create()
        .unwrap();
    let send = |key: &str, value: &str, partition: i32| {
        producer
            .send(
                BaseRecord::to(&topic)
                    .partition(partition)
                    .key(key)
                    .payload(value),
            )
            .unwrap();
    };
    for round in 0..2 {
        for k in (0..KEYS).filter(|k| round == 0 || k % 2 == 0) {
            send(
                &format!("k{k}"),
                &format!("round {round} of key {k}, some text to make it longer"),
                (k % PARTITIONS as usize) as i32,
            );
        }
        producer.flush(Duration::from_secs(30)).unwrap();
        std::thread::sleep(Duration::from_millis(300));
    }
    // A last record per partition rolls the segment holding the rest: all of it cleanable.
    for p in 0..PARTITIONS {
        send(&format!("roll-{p}"), "roll", p);
    }
    producer.flush(Duration::from_secs(30)).unwrap();
    let compacted = KEYS + PARTITIONS as usize;
    let direct_read = |limit: Duration| -> Vec<Rec> {
        let c = group_member(&kafka(), &unique("g-direct"), "compacted-direct");
        c.subscribe(&[&topic]).unwrap();
        let started = Instant::now();
        let mut out = Vec::new();
        let mut quiet = Instant::now();
        while quiet.elapsed() < Duration::from_secs(3) && started.elapsed() < limit {
            if let Some(m) = c.poll(Duration::from_millis(100)) {
                out.push(rec(&m.unwrap()));
                quiet = Instant::now();
            }
        }
        out.sort();
        out
    };
    // The cleaner runs every 15 s or so: wait until the log is compacted all through.
    let started = Instant::now();
    let expected = loop {
        let got = direct_read(Duration::from_secs(30));
        if got.len() == compacted {
            break got;
        }
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "the log was not compacted within 120 s: {} records, {compacted} expected",
            got.len()
        );
        std::thread::sleep(Duration::from_secs(2));
    };
    let gaps = expected
        .windows(2)
        .filter(|w| w[0].0 == w[1].0 && w[1].1 > w[0].1 + 1)
        .count();
    assert!(gaps > 1000, "the compacted log has {gaps} gaps");

    let member = |size: usize| {
        let c: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", proxy())
            .set("group.id", unique("g-compacted"))
            .set("auto.offset.reset", "earliest")
            .set("enable.auto.commit", "false")
            .set("max.partition.fetch.bytes", size.to_string())
            .create()
            .unwrap();
        c.subscribe(&[&topic]).unwrap();
        c
    };
    let limit = Duration::from_secs(90);
    let hits_before = metric("shardgate_prefetch_hits_total", &[]);
    let (got, reread) = std::thread::scope(|s| {
        let others: Vec<_> = [3000usize, 7000]
            .into_iter()
            .map(|size| {
                let c = member(size);
                s.spawn(move || consume(&c, compacted, limit))
            })
            .collect();
        // This one reads it all, then seeks back to the middle of every partition (inside
        // answers the others' reads left) and reads to the end again.
        let c = member(5000);
        let first = consume(&c, compacted, limit);
        let middle = |p: i32| {
            let offsets: Vec<i64> = first.iter().filter(|r| r.0 == p).map(|r| r.1).collect();
            // An offset compaction removed, where there is one: Kafka answers from the next.
            let o = offsets[offsets.len() / 2];
            if offsets.contains(&(o + 1)) { o } else { o + 1 }
        };
        let from: Vec<(i32, i64)> = (0..PARTITIONS).map(|p| (p, middle(p))).collect();
        for (p, o) in &from {
            c.seek(&topic, *p, Offset::Offset(*o), Duration::from_secs(10))
                .unwrap();
        }
        let want = first
            .iter()
            .filter(|r| from.iter().any(|(p, o)| r.0 == *p && r.1 >= *o))
            .count();
        let again = consume(&c, want, limit);
        let mut got: Vec<Vec<Rec>> = others.into_iter().map(|h| h.join().unwrap()).collect();
        got.push(first);
        (got, (from, again))
    });
    for (i, g) in got.iter().enumerate() {
        assert_eq!(g.len(), expected.len(), "group {i}");
        for (a, b) in g.iter().zip(&expected) {
            assert_eq!(a, b, "group {i}");
        }
    }
    let (from, again) = reread;
    let want: Vec<Rec> = expected
        .iter()
        .filter(|r| from.iter().any(|(p, o)| r.0 == *p && r.1 >= *o))
        .cloned()
        .collect();
    assert_eq!(again, want, "after the seek back to {from:?}");
    let hits = metric("shardgate_prefetch_hits_total", &[]) - hits_before;
    eprintln!("compacted: {gaps} gaps; seek back to {from:?}; shared hits {hits}");
    assert!(hits > 0.0, "no fetch was answered from a shared read");
}

/// Polls `c` until `n` records came, in the order they were delivered (panics after `limit`).
fn consume_in_order(c: &BaseConsumer, n: usize, limit: Duration) -> Vec<Rec> {
    let started = Instant::now();
    let mut out: Vec<Rec> = Vec::new();
    while out.len() < n {
        if started.elapsed() > limit {
            let mut per: std::collections::BTreeMap<i32, (usize, i64, i64)> = Default::default();
            for r in &out {
                let e = per.entry(r.0).or_insert((0, i64::MAX, -1));
                *e = (e.0 + 1, e.1.min(r.1), e.2.max(r.1));
            }
            panic!(
                "consumed {} of {n} within {limit:?}; per partition (count, first, last offset): {per:?}; position {:?}",
                out.len(),
                c.position().ok()
            );
        }
        if let Some(m) = c.poll(Duration::from_millis(100)) {
            out.push(rec(&m.unwrap()));
        }
    }
    out
}

/// A split with a gate while groups share reads of a managed topic: group A has read
/// everything before the split, group B a tenth of it. After the split A and a third group
/// read on (the new partition's reads are kept for others), then B comes back: it is held at
/// the gate, and gets its keys' old records before their new ones, every record exactly once,
/// each byte for byte what Kafka holds at its offset, while fetches are answered from shared
/// reads.
#[test]
#[ignore = "needs the testbed: integration/run-tests"]
fn a_split_gate_holds_a_group_behind_it_even_when_answers_are_shared() {
    let topic = unique("prefetch-gate");
    let (code, body) = admin_post(
        "/api/v1/topics",
        &serde_json::json!({
            "name": topic, "route_by": ["key"], "initial_shards": 1, "pool": 4,
            "replication_factor": rf(), "autoscale": {"enabled": false}
        }),
    );
    assert_eq!(code, 201, "{body}");
    // `n` records over 50 keys; record i is key i % 50's number i / 50.
    let produce = |from: usize, n: usize| {
        let p: BaseProducer = ClientConfig::new()
            .set("bootstrap.servers", proxy())
            .set("linger.ms", "5")
            .create()
            .unwrap();
        for i in from..from + n {
            let key = format!("k{}", i % 50);
            let value = format!("{key}:{}", i / 50);
            loop {
                // A full local queue: let it drain and send again.
                match p.send(BaseRecord::to(&topic).key(&key).payload(&value)) {
                    Ok(()) => break,
                    Err(_) => {
                        p.poll(Duration::from_millis(10));
                    }
                }
            }
            p.poll(Duration::ZERO);
        }
        p.flush(Duration::from_secs(60)).unwrap();
    };
    produce(0, 3000);
    let (group_a, group_b) = (unique("g-gate-a"), unique("g-gate-b"));
    // Each group is its own application (client id): shardgate links fetch connections to
    // groups by address and client id, and groups it cannot tell apart must all pass a gate.
    // Before the split they commit by hand (B exactly what it got), after it every second.
    // Partition fetches of 32 KiB: B needs several fetches to read its old records.
    let member = |group: &str, auto_commit: bool| {
        let c: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", proxy())
            .set("group.id", group)
            .set("client.id", group)
            .set("auto.offset.reset", "earliest")
            .set("enable.auto.commit", auto_commit.to_string())
            .set("auto.commit.interval.ms", "1000")
            .set("max.partition.fetch.bytes", "32768")
            .create()
            .unwrap();
        c.subscribe(&[&topic]).unwrap();
        c
    };
    let limit = Duration::from_secs(120);
    let hits_before = metric("shardgate_prefetch_hits_total", &[]);
    // Before the split, together: A reads all, B a tenth, both commit and leave.
    let b_first: Vec<Rec> = std::thread::scope(|s| {
        let a = s.spawn(|| {
            let c = member(&group_a, false);
            consume_in_order(&c, 3000, limit);
            c.commit_consumer_state(CommitMode::Sync).unwrap();
        });
        let b = s.spawn(|| {
            let c = member(&group_b, false);
            let got = consume_in_order(&c, 300, limit);
            // Commit exactly what was delivered (the client may hold more).
            let mut tpl = TopicPartitionList::new();
            let last = got.iter().map(|r| r.1).max().unwrap();
            tpl.add_partition_offset(&topic, got[0].0, Offset::Offset(last + 1))
                .unwrap();
            c.commit(&tpl, CommitMode::Sync).unwrap();
            got
        });
        a.join().unwrap();
        b.join().unwrap()
    });
    let (_, map) = admin_get(&format!("/api/v1/topics/{topic}/shards"));
    let id = active(&map)[0]["id"].as_u64().unwrap();
    let (code, body) = admin_post(
        &format!("/api/v1/topics/{topic}/shards/{id}/split"),
        &serde_json::json!({}),
    );
    assert_eq!(code, 200, "split: {body}");
    produce(3000, 3000);
    // After it: A (past the seal) reads the new records at once, next to a third group C
    // reading from the start (two groups assigned the new partition: its reads are kept for
    // others). Then B comes back and asks the new partition from offset 0, which A's kept
    // read answers: B must finish its old partition before that answer gives it anything.
    let group_c = unique("g-gate-c");
    let stop = std::sync::atomic::AtomicBool::new(false);
    let b_rest: Vec<Rec> = std::thread::scope(|s| {
        let (assigned_tx, assigned) = std::sync::mpsc::channel();
        let (stop, member, group_c) = (&stop, &member, &group_c);
        let c = s.spawn(move || {
            let c = member(group_c, true);
            let mut told = false;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let _ = c.poll(Duration::from_millis(100));
                if !told && c.assignment().is_ok_and(|a| a.count() > 0) {
                    told = assigned_tx.send(()).is_ok();
                }
            }
        });
        // C is assigned first, so A's first read of the new partition is already kept.
        assigned
            .recv_timeout(Duration::from_secs(30))
            .expect("group C assigned");
        consume_in_order(&member(&group_a, true), 3000, limit);
        let b = consume_in_order(&member(&group_b, true), 5700, limit);
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        c.join().unwrap();
        b
    });
    let hits = metric("shardgate_prefetch_hits_total", &[]) - hits_before;
    let held = metric(
        "shardgate_gate_held_fetches_total",
        &[&format!("topic=\"{topic}\"")],
    );
    // Per key, B's records come in order, each once, from where it left off to the end.
    let mut next: std::collections::HashMap<String, usize> = Default::default();
    for r in b_first.iter().chain(&b_rest) {
        let v = String::from_utf8(r.3.clone().unwrap()).unwrap();
        let (key, n) = v.split_once(':').unwrap();
        let n: usize = n.parse().unwrap();
        let want = next.entry(key.to_string()).or_insert(0);
        assert_eq!(
            n, *want,
            "group B got {key}'s record {n} while expecting {want} (partition {}, offset {})",
            r.0, r.1
        );
        *want += 1;
    }
    assert_eq!(next.values().sum::<usize>(), 6000, "every record once");
    // Byte for byte what a direct consumer reads at the same offsets.
    let direct = direct_consumer();
    let mut tpl = TopicPartitionList::new();
    for p in 0..4 {
        tpl.add_partition_offset(&topic, p, Offset::Beginning)
            .unwrap();
    }
    direct.assign(&tpl).unwrap();
    let all: std::collections::HashMap<(i32, i64), Rec> = consume_in_order(&direct, 6000, limit)
        .into_iter()
        .map(|r| ((r.0, r.1), r))
        .collect();
    for r in b_first.iter().chain(&b_rest) {
        assert_eq!(Some(r), all.get(&(r.0, r.1)), "record at {}:{}", r.0, r.1);
    }
    eprintln!(
        "group B: {} + {} records in key order, all as Kafka holds them; fetches answered from shared reads: {hits}; held at the gate: {held}",
        b_first.len(),
        b_rest.len()
    );
    assert!(hits > 0.0, "no fetch was answered from a shared read");
    assert!(held > 0.0, "group B was never held at the gate");
}

// ---------------------------------------------------------------------------------------
// A consumer behind: its connection's queue

/// One Fetch v12 on an open connection.
fn fetch_on(s: &mut std::net::TcpStream, correlation_id: i32, req: &FetchRequest) -> FetchResponse {
    use kafka_protocol::protocol::Decodable as _;
    use std::io::Write as _;
    s.write_all(&frame(ApiKey::Fetch, 12, correlation_id, req))
        .unwrap();
    let mut b = bytes::Bytes::from(read_frame(s).expect("a fetch answer"));
    let header = kafka_protocol::messages::ResponseHeader::decode(
        &mut b,
        ApiKey::Fetch.response_header_version(12),
    )
    .unwrap();
    assert_eq!(header.correlation_id, correlation_id);
    FetchResponse::decode(&mut b, 12).unwrap()
}

/// The broker leading each partition of `topic` (host:port), from Kafka's metadata.
fn leaders_direct(topic: &str) -> std::collections::HashMap<i32, String> {
    let md = metadata_direct(topic);
    let brokers: std::collections::HashMap<i32, String> = md
        .brokers()
        .iter()
        .map(|b| (b.id(), format!("{}:{}", b.host(), b.port())))
        .collect();
    md.topics()[0]
        .partitions()
        .iter()
        .map(|p| (p.id(), brokers[&p.leader()].clone()))
        .collect()
}

/// The offset after the last whole batch of `records`.
fn next_offset(records: &[u8]) -> Option<i64> {
    let (mut pos, mut next) = (0usize, None);
    while pos + 27 <= records.len() {
        let base = i64::from_be_bytes(records[pos..pos + 8].try_into().unwrap());
        let len = i32::from_be_bytes(records[pos + 8..pos + 12].try_into().unwrap()) as usize;
        if pos + 12 + len > records.len() {
            break;
        }
        let delta = i32::from_be_bytes(records[pos + 23..pos + 27].try_into().unwrap());
        next = Some(base + delta as i64 + 1);
        pos += 12 + len;
    }
    next
}

/// A consumer reading a backlog more slowly than shardgate can read it (a raw Fetch every
/// 20 ms on one connection, 16 KiB per partition) is answered from its connection's queue:
/// each answer holds byte for byte what Kafka gives a fetch from that offset (or, read when
/// the queue had less room, its beginning: at least one whole batch), with a high
/// watermark never ahead of Kafka's; at least 90 % of the partitions answered with records
/// were in memory when asked (hits), and the queue stays within `prefetch.queue_bytes` (plus
/// one poll's answer) while the backlog is far larger, refilling as the consumer takes.
/// `n` records of about 210 bytes on each of partitions 0..`parts` of `topic`, in batches of
/// 20, straight to Kafka; record `i` of partition `p` is `"{p}-{i:06}-xxx.."` at offset `i`
/// (idempotent: a retried first batch cannot land after the second, as right after the
/// topic's creation it did).
fn fill_partitions(topic: &str, parts: i32, n: usize) {
    let producer: BaseProducer = ClientConfig::new()
        .set("bootstrap.servers", kafka())
        .set("enable.idempotence", "true")
        .set("batch.num.messages", "20")
        .set("linger.ms", "1")
        .create()
        .unwrap();
    let pad = "x".repeat(200);
    for i in 0..n {
        for p in 0..parts {
            let v = format!("{p}-{i:06}-{pad}");
            while producer
                .send(BaseRecord::<(), _>::to(topic).partition(p).payload(&v))
                .is_err()
            {
                producer.poll(Duration::from_millis(10));
            }
        }
    }
    producer.flush(Duration::from_secs(60)).unwrap();
}

#[test]
#[ignore = "needs the testbed: integration/run-tests"]
fn a_consumer_behind_is_answered_from_its_queue_byte_for_byte_within_its_bound() {
    const QUEUE: usize = 256 * 1024;
    const PART_MAX: i32 = 16 * 1024;
    let topic = unique("prefetch-queue");
    create_topic(&topic, 2);
    fill_partitions(&topic, 2, 6000);
    let ends: Vec<i64> = (0..2).map(|p| watermarks_direct(&topic, p).1).collect();
    assert_eq!(ends, vec![6000, 6000]);
    let leaders = leaders_direct(&topic);

    let (client, admin) = ("127.0.0.1:29155", "127.0.0.1:29255");
    let _sg = own_instance(
        "prefetch-queue",
        client,
        admin,
        "",
        &format!("[prefetch]\nqueue_bytes = {QUEUE}\n"),
    );
    let mut s = std::net::TcpStream::connect(client).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut offsets = [0i64, 0];
    let (mut answers, mut peak, mut correlation, mut whole) = (0usize, 0f64, 0, 0usize);
    let started = Instant::now();
    while offsets.iter().zip(&ends).any(|(o, e)| o < e) {
        assert!(
            started.elapsed() < Duration::from_secs(180),
            "stuck at {offsets:?}"
        );
        correlation += 1;
        let parts: Vec<(i32, i64)> = (0..2).map(|p| (p, offsets[p as usize])).collect();
        let resp = fetch_on(
            &mut s,
            correlation,
            &fetch_v12(&topic, &parts, PART_MAX, 4 * PART_MAX),
        );
        assert_eq!(resp.error_code, 0);
        for p in resp.responses.iter().flat_map(|t| &t.partitions) {
            assert_eq!(p.error_code, 0, "partition {}", p.partition_index);
            let Some(records) = p.records.as_ref().filter(|r| !r.is_empty()) else {
                continue;
            };
            let i = p.partition_index;
            let at = offsets[i as usize];
            // What Kafka answers a fetch from the same offset with the same limit.
            let mut direct = std::net::TcpStream::connect(&leaders[&i]).unwrap();
            direct
                .set_read_timeout(Some(Duration::from_secs(30)))
                .unwrap();
            let kafka_resp = fetch_on(
                &mut direct,
                1,
                &fetch_v12(&topic, &[(i, at)], PART_MAX, 4 * PART_MAX),
            );
            let kp = &kafka_resp.responses[0].partitions[0];
            assert_eq!(kp.error_code, 0);
            // Kafka's records from that offset: all of them, or (a read-ahead poll asks no
            // more than its queue has room for) their beginning, at least one whole batch.
            let kafka = kp.records.clone().unwrap_or_default();
            assert!(
                kafka.starts_with(records),
                "partition {i} from {at}: {} bytes through shardgate, not Kafka's first {} bytes",
                records.len(),
                kafka.len()
            );
            assert!(p.high_watermark <= kp.high_watermark && p.high_watermark > at);
            // Only a broker's partial batch (a poll with little room left): the client asks
            // again from the same offset; not counted as delivered.
            let Some(next) = next_offset(records) else {
                continue;
            };
            whole += usize::from(kafka.len() == records.len());
            offsets[i as usize] = next;
            answers += 1;
        }
        peak = peak.max(metric_of(admin, "shardgate_prefetch_queue_bytes", &[]));
        std::thread::sleep(Duration::from_millis(20));
    }
    let hits = metric_of(admin, "shardgate_prefetch_hits_total", &[]);
    let late = metric_of(admin, "shardgate_prefetch_late_total", &[]);
    let misses = metric_of(admin, "shardgate_prefetch_misses_total", &[]);
    let full = metric_of(admin, "shardgate_prefetch_queue_full_total", &[]);
    eprintln!(
        "{answers} partition answers ({whole} all of what Kafka sends for the fetch): hits {hits}, late {late}, misses {misses}; queue peak {peak} bytes, full {full} times"
    );
    assert_eq!(hits + late + misses, answers as f64);
    assert!(
        hits >= 0.9 * answers as f64,
        "hit ratio {}",
        hits / answers as f64
    );
    assert!(full > 0.0, "the queue never reached its bound");
    // Deeper than one poll's answer (at most 64 KiB here): several polls ahead.
    assert!(peak >= (QUEUE / 2) as f64, "queue peaked at {peak} bytes");
    assert!(
        peak <= (QUEUE + 4 * PART_MAX as usize) as f64,
        "queue peaked at {peak} bytes for a bound of {QUEUE}"
    );
    // What operators read of it: every record delivered, nearly all from memory (coverage),
    // fetches that needed no upstream poll of their own, and nothing read for nothing.
    let all = metric_of(admin, "shardgate_fetch_delivered_records_total", &[]);
    let covered = metric_of(admin, "shardgate_prefetch_delivered_records_total", &[]);
    let saved = metric_of(admin, "shardgate_prefetch_fetches_saved_total", &[]);
    let wasted = || metric_of(admin, "shardgate_prefetch_wasted_bytes_total", &[]);
    eprintln!(
        "records delivered {all}, from memory {covered}; {saved} of {correlation} fetches saved an upstream poll; wasted {} bytes",
        wasted()
    );
    assert_eq!(all, 12000.0);
    assert!(covered >= 0.9 * all, "coverage {}", covered / all);
    assert!(
        saved >= 0.8 * correlation as f64,
        "{saved} of {correlation} fetches saved"
    );
    assert_eq!(wasted(), 0.0, "the consumer took everything read ahead");
    // A consumer that goes away with records queued: they were read for nothing. (A topic
    // of its own: partitions another connection fetched lately are shared reads.)
    let other = unique("prefetch-queue-gone");
    create_topic(&other, 1);
    fill_partitions(&other, 1, 3000);
    let mut s = std::net::TcpStream::connect(client).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    fetch_on(
        &mut s,
        1,
        &fetch_v12(&other, &[(0, 0)], PART_MAX, 4 * PART_MAX),
    );
    let queue = || metric_of(admin, "shardgate_prefetch_queue_bytes", &[]);
    eventually("a queue read ahead", Duration::from_secs(10), || {
        queue() > 0.0
    });
    std::thread::sleep(Duration::from_millis(300));
    let held = queue();
    drop(s);
    eventually(
        "the queue dropped with its connection",
        Duration::from_secs(10),
        || queue() == 0.0,
    );
    eprintln!(
        "a connection closed with {held} bytes queued: wasted {} bytes",
        wasted()
    );
    assert!(
        held > 0.0 && wasted() >= held,
        "{} bytes counted wasted of {held} dropped",
        wasted()
    );
}

/// Sentences about pets or markets (the two kinds of content the ranking test tells apart).
fn sentence(pets: bool, i: usize) -> String {
    const PETS: [&str; 10] = [
        "cat", "dog", "kitten", "puppy", "sofa", "purrs", "barks", "fur", "leash", "whiskers",
    ];
    const MARKETS: [&str; 10] = [
        "stock",
        "market",
        "shares",
        "index",
        "investors",
        "bond",
        "yield",
        "earnings",
        "dividend",
        "inflation",
    ];
    let words = if pets { PETS } else { MARKETS };
    let picked: Vec<&str> = (0..20).map(|k| words[(i * 7 + k * 3) % 10]).collect();
    format!("The {}", picked.join(" "))
}

/// A consumer connection that was delivered records about pets, fetching four partitions
/// whose queued records do not fit its max_bytes (three about markets, one about pets, the
/// pets one last in its request): the response puts the pets partition first, whole, and
/// the others only as far as the bytes allow; the records are Kafka's own.
#[test]
#[ignore = "needs the testbed: integration/run-tests"]
fn a_consumer_gets_the_content_it_prefers_first_when_not_everything_fits() {
    preferred_first(false);
}

/// The same with the preference in a routing value (`prefetch.routing_fields`, a header)
/// and the same text in every record: the routing-value histograms decide.
#[test]
#[ignore = "needs the testbed: integration/run-tests"]
fn a_consumer_gets_the_routing_value_it_prefers_first_when_not_everything_fits() {
    preferred_first(true);
}

/// `routing`: pets and markets told apart by a `type` header instead of the text.
fn preferred_first(routing: bool) {
    const PART_MAX: i32 = 2048;
    let (warm, topic) = (unique("prefetch-warm"), unique("prefetch-rank"));
    create_topic_direct(&warm, &["--replica-assignment", "1"]);
    create_topic_direct(&topic, &["--replica-assignment", "1,1,1,1"]);
    let producer: BaseProducer = ClientConfig::new()
        .set("bootstrap.servers", kafka())
        .set("batch.num.messages", "5")
        .set("acks", "1") // replication factor 1 on a testbed asking 2 in sync
        .create()
        .unwrap();
    let send = |t: &str, p: i32, pets: bool, i: usize| {
        let (text, kind) = match routing {
            false => (sentence(pets, i), None),
            true => (
                sentence(false, i),
                Some(if pets { "pets" } else { "markets" }),
            ),
        };
        let headers = kind.map(|k| {
            rdkafka::message::OwnedHeaders::new().insert(rdkafka::message::Header {
                key: "type",
                value: Some(k),
            })
        });
        loop {
            let mut r = BaseRecord::<(), _>::to(t).partition(p).payload(&text);
            if let Some(h) = headers.clone() {
                r = r.headers(h);
            }
            if producer.send(r).is_ok() {
                break;
            }
            producer.poll(Duration::from_millis(10));
        }
    };
    for i in 0..300 {
        send(&warm, 0, true, i);
        for p in 0..4 {
            send(&topic, p, p == 3, i);
        }
    }
    producer.flush(Duration::from_secs(60)).unwrap();

    let (name, client, admin, extra) = match routing {
        false => ("prefetch-rank", "127.0.0.1:29156", "127.0.0.1:29256", ""),
        true => (
            "prefetch-rank-routing",
            "127.0.0.1:29158",
            "127.0.0.1:29258",
            "routing_fields = [\"header:type\"]\n",
        ),
    };
    let _sg = own_instance(
        name,
        client,
        admin,
        "",
        &format!("[prefetch]\nsamples_per_sec = 100000\n{extra}"),
    );
    let mut s = std::net::TcpStream::connect(client).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut correlation = 0;
    let mut fetch = |s: &mut std::net::TcpStream, t: &str, parts: &[(i32, i64)], max: i32| {
        correlation += 1;
        let resp = fetch_on(s, correlation, &fetch_v12(t, parts, PART_MAX, max));
        assert_eq!(resp.error_code, 0);
        resp
    };
    // What this connection is delivered: pets.
    let mut at = 0;
    while at < 300 {
        let resp = fetch(&mut s, &warm, &[(0, at)], 64 * 1024);
        let p = &resp.responses[0].partitions[0];
        at = p.records.as_deref().and_then(next_offset).unwrap_or(at);
    }
    // The read-ahead of the warm-up topic ends with a poll at its end, held for the fetch's
    // max wait (500 ms), and a connection has one poll per broker at a time.
    std::thread::sleep(Duration::from_secs(1));
    // A first look at each partition (one at a time: nothing cut), so that each has content
    // sampled and a queue read ahead of where this connection is.
    let mut offsets = [0i64; 4];
    for p in 0..4 {
        let resp = fetch(&mut s, &topic, &[(p, 0)], 64 * 1024);
        let records = resp.responses[0].partitions[0].records.clone();
        offsets[p as usize] = records.as_deref().and_then(next_offset).unwrap_or_else(|| {
            panic!(
                "no records from partition {p}: {:?}",
                resp.responses[0].partitions[0]
            )
        });
    }
    std::thread::sleep(Duration::from_secs(2)); // samples embedded, queues filled
    let ranked_before = metric_of(admin, "shardgate_prefetch_ranked_responses_total", &[]);
    // All four, pets last in the request, 3 KiB for everything: not all of it fits.
    let parts: Vec<(i32, i64)> = (0..4).map(|p| (p, offsets[p as usize])).collect();
    let resp = fetch(&mut s, &topic, &parts, 3 * 1024);
    let with_records: Vec<(i32, bytes::Bytes)> = resp.responses[0]
        .partitions
        .iter()
        .filter_map(|p| {
            let r = p.records.clone().filter(|r| !r.is_empty())?;
            Some((p.partition_index, r))
        })
        .collect();
    assert_eq!(
        with_records.first().map(|(p, _)| *p),
        Some(3),
        "the pets partition first: {:?}",
        resp.responses[0]
            .partitions
            .iter()
            .map(|p| (p.partition_index, p.records.as_ref().map_or(0, |r| r.len())))
            .collect::<Vec<_>>()
    );
    assert!(metric_of(admin, "shardgate_prefetch_ranked_responses_total", &[]) > ranked_before);
    let total: usize = with_records.iter().map(|(_, r)| r.len()).sum();
    assert!(total <= 3 * 1024 + PART_MAX as usize, "{total} bytes");
    // Each partition's records are Kafka's from the offset asked.
    let leaders = leaders_direct(&topic);
    for (p, records) in &with_records {
        let mut direct = std::net::TcpStream::connect(&leaders[p]).unwrap();
        direct
            .set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        let at = offsets[*p as usize];
        let k = fetch_on(
            &mut direct,
            1,
            &fetch_v12(&topic, &[(*p, at)], PART_MAX, 64 * 1024),
        );
        let kafka = k.responses[0].partitions[0].records.clone().unwrap();
        assert!(
            kafka.starts_with(records),
            "partition {p} from {at}: not a prefix of Kafka's answer"
        );
    }
}

/// A classic-protocol member on a raw connection to shardgate: joins `group` for `topic`,
/// leads it, assigns itself partition 0 with its SyncGroup (shardgate starts its read of the
/// group's committed offsets then) and returns (generation, member id).
fn lead_group_raw(s: &mut std::net::TcpStream, group: &str, topic: &str) -> (i32, String) {
    lead_group_raw_with(s, group, topic, None, &[0])
}

/// `lead_group_raw` with the member id of an earlier join (a rejoin: one JoinGroup) and the
/// partitions the member assigns itself.
fn lead_group_raw_with(
    s: &mut std::net::TcpStream,
    group: &str,
    topic: &str,
    rejoin: Option<&str>,
    partitions: &[i32],
) -> (i32, String) {
    use bytes::BufMut;
    use kafka_protocol::messages::*;
    use kafka_protocol::protocol::{Encodable, StrBytes};
    let versioned = |body: &dyn Fn(&mut bytes::BytesMut)| {
        let mut b = bytes::BytesMut::new();
        b.put_i16(0);
        body(&mut b);
        b.freeze()
    };
    let subscription = versioned(&|b| {
        ConsumerProtocolSubscription::default()
            .with_topics(vec![StrBytes::from_string(topic.to_string())])
            .encode(b, 0)
            .unwrap()
    });
    let join = |member: &str| {
        JoinGroupRequest::default()
            .with_group_id(GroupId(StrBytes::from_string(group.to_string())))
            .with_session_timeout_ms(10_000)
            .with_rebalance_timeout_ms(10_000)
            .with_member_id(StrBytes::from_string(member.to_string()))
            .with_protocol_type(StrBytes::from_static_str("consumer"))
            .with_protocols(vec![
                join_group_request::JoinGroupRequestProtocol::default()
                    .with_name(StrBytes::from_static_str("range"))
                    .with_metadata(subscription.clone()),
            ])
    };
    let member = match rejoin {
        Some(m) => m.to_string(),
        None => {
            // A coordinator still loading (a new instance, a new group) answers 14-16 first.
            let started = std::time::Instant::now();
            let first = loop {
                let r: JoinGroupResponse = ask_on(s, ApiKey::JoinGroup, 5, 1, &join("")).unwrap();
                if !(14..=16).contains(&r.error_code) || started.elapsed() > Duration::from_secs(30)
                {
                    break r;
                }
                std::thread::sleep(Duration::from_millis(200));
            };
            assert_eq!(first.error_code, 79, "MEMBER_ID_REQUIRED first: {first:?}");
            first.member_id.to_string()
        }
    };
    let joined: JoinGroupResponse = ask_on(s, ApiKey::JoinGroup, 5, 2, &join(&member)).unwrap();
    assert_eq!(joined.error_code, 0, "{joined:?}");
    assert_eq!(joined.leader.as_str(), member, "the only member leads");
    let assignment = versioned(&|b| {
        ConsumerProtocolAssignment::default()
            .with_assigned_partitions(vec![
                consumer_protocol_assignment::TopicPartition::default()
                    .with_topic(TopicName(StrBytes::from_string(topic.to_string())))
                    .with_partitions(partitions.to_vec()),
            ])
            .encode(b, 0)
            .unwrap()
    });
    let sync = SyncGroupRequest::default()
        .with_group_id(GroupId(StrBytes::from_string(group.to_string())))
        .with_generation_id(joined.generation_id)
        .with_member_id(StrBytes::from_string(member.clone()))
        .with_assignments(vec![
            sync_group_request::SyncGroupRequestAssignment::default()
                .with_member_id(StrBytes::from_string(member.clone()))
                .with_assignment(assignment),
        ]);
    let synced: SyncGroupResponse = ask_on(s, ApiKey::SyncGroup, 3, 3, &sync).unwrap();
    assert_eq!(synced.error_code, 0, "{synced:?}");
    (joined.generation_id, member)
}

/// Partition 0's committed offset as an OffsetFetch v7 on `s` answers it.
fn offset_fetch_raw(s: &mut std::net::TcpStream, group: &str, topic: &str) -> i64 {
    use kafka_protocol::messages::*;
    use kafka_protocol::protocol::StrBytes;
    let req = OffsetFetchRequest::default()
        .with_group_id(GroupId(StrBytes::from_string(group.to_string())))
        .with_topics(Some(vec![
            offset_fetch_request::OffsetFetchRequestTopic::default()
                .with_name(TopicName(StrBytes::from_string(topic.to_string())))
                .with_partition_indexes(vec![0]),
        ]))
        .with_require_stable(true);
    let r: OffsetFetchResponse = ask_on(s, ApiKey::OffsetFetch, 7, 10, &req).unwrap();
    assert_eq!(r.error_code, 0, "{r:?}");
    let p = &r.topics[0].partitions[0];
    assert_eq!(p.error_code, 0, "{r:?}");
    p.committed_offset
}

/// Commits `offset` for partition 0 straight at Kafka, outside any generation.
fn commit_direct(group: &str, topic: &str, offset: i64) {
    let direct: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", kafka())
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .create()
        .unwrap();
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(topic, 0, Offset::Offset(offset))
        .unwrap();
    direct.commit(&tpl, CommitMode::Sync).unwrap();
}

/// The offsets read when the leader's SyncGroup passed are what Kafka would answer only until
/// the group commits again: a commit between the member's SyncGroup and its OffsetFetch
/// (here on the same raw connection, so it certainly lands in that window) drops the read
/// and the OffsetFetch gets Kafka's new commit. The control group, with no commit in
/// between, is answered from the read (so the path is live here).
#[test]
#[ignore = "needs the testbed: integration/run-tests"]
fn a_commit_after_the_rebalance_read_is_what_the_members_offset_fetch_gets() {
    let topic = unique("prefetch-recommit");
    create_topic(&topic, 1);
    produce_plain(&topic, "w", 20);
    let answered = || {
        metric(
            "shardgate_prefetch_offset_answers_total",
            &["outcome=\"answered\""],
        )
    };

    // Control: committed 5 at Kafka; the member's OffsetFetch is answered from the read.
    let control = unique("g-recommit-control");
    commit_direct(&control, &topic, 5);
    let before = answered();
    let mut s = std::net::TcpStream::connect(proxy()).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    lead_group_raw(&mut s, &control, &topic);
    assert_eq!(offset_fetch_raw(&mut s, &control, &topic), 5);
    assert_eq!(
        answered() - before,
        1.0,
        "the control OffsetFetch was not answered from the rebalance read"
    );

    // The same, with the member committing 9 in its new generation before it asks.
    let group = unique("g-recommit");
    commit_direct(&group, &topic, 5);
    let before = answered();
    let mut s = std::net::TcpStream::connect(proxy()).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let (generation, member) = lead_group_raw(&mut s, &group, &topic);
    {
        use kafka_protocol::messages::*;
        use kafka_protocol::protocol::StrBytes;
        let commit = OffsetCommitRequest::default()
            .with_group_id(GroupId(StrBytes::from_string(group.clone())))
            .with_generation_id_or_member_epoch(generation)
            .with_member_id(StrBytes::from_string(member))
            .with_topics(vec![
                offset_commit_request::OffsetCommitRequestTopic::default()
                    .with_name(TopicName(StrBytes::from_string(topic.clone())))
                    .with_partitions(vec![
                        offset_commit_request::OffsetCommitRequestPartition::default()
                            .with_partition_index(0)
                            .with_committed_offset(9),
                    ]),
            ]);
        let r: OffsetCommitResponse = ask_on(&mut s, ApiKey::OffsetCommit, 7, 4, &commit).unwrap();
        assert_eq!(r.topics[0].partitions[0].error_code, 0, "{r:?}");
    }
    let got = offset_fetch_raw(&mut s, &group, &topic);
    eprintln!(
        "recommit: control answered from the read with 5; after a commit of 9 the member got {got}"
    );
    assert_eq!(
        got, 9,
        "the member got the offset read before its own commit"
    );
    assert_eq!(
        answered() - before,
        0.0,
        "an OffsetFetch after a commit was answered from the read"
    );
}

/// Partitions revoked from a member at a rebalance lose their read-ahead at the member's next
/// fetch after its new assignment (`shardgate_prefetch_evictions_total{reason="unassigned"}`),
/// not 10 s later when they would expire unasked. One raw connection is the member (it leads
/// its group and assigns itself partitions 0 and 1, then, rejoining, only 0) and fetches.
#[test]
#[ignore = "needs the testbed: integration/run-tests"]
fn partitions_revoked_at_a_rebalance_lose_their_read_ahead_at_the_next_fetch() {
    let topic = unique("prefetch-revoke");
    create_topic(&topic, 2);
    fill_partitions(&topic, 2, 3000);
    let (client, admin) = ("127.0.0.1:29157", "127.0.0.1:29257");
    let _sg = own_instance("prefetch-revoke", client, admin, "", "");
    let unassigned = || {
        metric_of(
            admin,
            "shardgate_prefetch_evictions_total",
            &["reason=\"unassigned\""],
        )
    };
    let mut s = std::net::TcpStream::connect(client).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let group = unique("g-revoke");
    let (_, member) = lead_group_raw_with(&mut s, &group, &topic, None, &[0, 1]);
    let mut offsets = [0i64, 0];
    let mut correlation = 100;
    let mut fetch = |s: &mut std::net::TcpStream, parts: &[i32], offsets: &mut [i64; 2]| {
        correlation += 1;
        let asked: Vec<(i32, i64)> = parts.iter().map(|p| (*p, offsets[*p as usize])).collect();
        let resp = fetch_on(
            s,
            correlation,
            &fetch_v12(&topic, &asked, 16 * 1024, 64 * 1024),
        );
        for p in resp.responses.iter().flat_map(|t| &t.partitions) {
            assert_eq!(p.error_code, 0, "partition {}", p.partition_index);
            if let Some(next) = p.records.as_deref().and_then(next_offset) {
                offsets[p.partition_index as usize] = next;
            }
        }
    };
    // Both partitions fetched a few times (far from their ends: 3,000 records each), until
    // read-ahead is queued.
    let started = Instant::now();
    for n in 1.. {
        fetch(&mut s, &[0, 1], &mut offsets);
        std::thread::sleep(Duration::from_millis(20));
        let queued = metric_of(admin, "shardgate_prefetch_queue_bytes", &[]);
        if n >= 5 && queued > 0.0 && offsets.iter().all(|o| *o > 0) {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "nothing read ahead"
        );
    }
    assert_eq!(unassigned(), 0.0, "evicted while both were assigned");
    // A rebalance: the member keeps partition 0 only.
    lead_group_raw_with(&mut s, &group, &topic, Some(&member), &[0]);
    let revoked_at = Instant::now();
    std::thread::sleep(Duration::from_millis(1100));
    fetch(&mut s, &[0], &mut offsets);
    let evicted = unassigned();
    let queued = metric_of(admin, "shardgate_prefetch_queue_bytes", &[]);
    eprintln!(
        "revoked partition 1 at offset {}: {evicted} queued answers evicted as unassigned {:.1}s after the new assignment; {queued} bytes queued after",
        offsets[1],
        revoked_at.elapsed().as_secs_f64()
    );
    assert!(
        evicted > 0.0,
        "partition 1's read-ahead was not evicted at the next fetch"
    );
}

/// Children of a split are read ahead when their gate is about to open, and only then. A
/// managed topic is split (parent p, child q behind a gate) with about 300 KiB of q's
/// records waiting. Member B of a group (same client id as member A) is assigned q and a
/// plain topic's partition: while A has not read p at all, B reads the plain partition
/// through and q's gate holds everything, and shardgate keeps no more of q than the answer
/// the gate holds (before: read ahead as deep as B's queue, to expire unread). Then A reads
/// p past the seal without committing: the gate is about to open, and q is read ahead beyond
/// the held answer before it opens. A commits, the gate opens, and B gets q's records from
/// memory first, each exactly what Kafka holds at its offset.
#[test]
#[ignore = "needs the testbed: integration/run-tests"]
fn a_child_is_read_ahead_when_its_gate_is_about_to_open_and_not_before() {
    const PART_MAX: usize = 16 * 1024;
    let (client, admin) = ("127.0.0.1:29159", "127.0.0.1:29259");
    let _sg = own_instance("prefetch-opening", client, admin, "", "");
    let admin_url = format!("http://{admin}");
    let post = |path: &str, body: serde_json::Value| {
        let (code, text) =
            shardgate::admin::http_request(&admin_url, "POST", path, Some(&body.to_string()))
                .unwrap();
        assert!(code == 200 || code == 201, "{path}: {code} {text}");
    };
    let topic = unique("prefetch-opening");
    post(
        "/api/v1/topics",
        serde_json::json!({
            "name": topic, "route_by": ["key"], "initial_shards": 1, "pool": 2,
            "replication_factor": rf(), "autoscale": {"enabled": false}
        }),
    );
    let produce = |from: usize, n: usize| {
        let p: BaseProducer = ClientConfig::new()
            .set("bootstrap.servers", client)
            .set("batch.num.messages", "20")
            .set("linger.ms", "1")
            .create()
            .unwrap();
        let pad = "y".repeat(200);
        for i in from..from + n {
            let key = format!("k{}", i % 50);
            let value = format!("{key}:{i:06}:{pad}");
            while p
                .send(BaseRecord::to(&topic).key(&key).payload(&value))
                .is_err()
            {
                p.poll(Duration::from_millis(10));
            }
            p.poll(Duration::ZERO);
        }
        p.flush(Duration::from_secs(60)).unwrap();
    };
    produce(0, 400);
    let shards = || {
        let (_, text) = shardgate::admin::http_request(
            &admin_url,
            "GET",
            &format!("/api/v1/topics/{topic}/shards"),
            None,
        )
        .unwrap();
        serde_json::from_str::<serde_json::Value>(&text).unwrap()
    };
    let id = active(&shards())[0]["id"].as_u64().unwrap();
    post(
        &format!("/api/v1/topics/{topic}/shards/{id}/split"),
        serde_json::json!({}),
    );
    let mut gate = serde_json::Value::Null;
    eventually(
        "the split's gate is sealed",
        Duration::from_secs(40),
        || {
            gate = shards()["gates"][0].clone();
            gate["after"][0]["seal_offset"].is_i64()
        },
    );
    let (parent, child) = (
        gate["after"][0]["partition"].as_i64().unwrap() as i32,
        gate["partition"].as_i64().unwrap() as i32,
    );
    let from = gate["from_offset"].as_i64().unwrap();
    produce(400, 3000);
    let plain = unique("prefetch-opening-plain");
    create_topic_direct(&plain, &["--partitions", "1"]);
    fill_partitions(&plain, 1, 3000);
    let parent_end = watermarks_direct(&topic, parent).1;
    let child_end = watermarks_direct(&topic, child).1;
    let waiting = (child_end - from) as usize;
    assert!(waiting > 1000, "only {waiting} records went to the child");

    let member = |group: &str| {
        let c: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", client)
            .set("group.id", group)
            .set("client.id", "opening-app")
            .set("enable.auto.commit", "false")
            .set("max.partition.fetch.bytes", PART_MAX.to_string())
            .create()
            .unwrap();
        c
    };
    let assign = |c: &BaseConsumer, parts: &[(&str, i32, i64)]| {
        let mut tpl = TopicPartitionList::new();
        for (t, p, o) in parts {
            tpl.add_partition_offset(t, *p, Offset::Offset(*o)).unwrap();
        }
        c.assign(&tpl).unwrap();
    };
    let group = unique("g-opening");
    // A's commit at 0 links the application's client id to the group, far behind the seal.
    let a = member(&group);
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(&topic, parent, Offset::Offset(0))
        .unwrap();
    a.commit(&tpl, CommitMode::Sync).unwrap();
    let b = member(&group);
    assign(&b, &[(&topic, child, from), (&plain, 0, 0)]);
    let mut got_child: Vec<Rec> = Vec::new();
    let mut plain_got = 0usize;
    let mut poll_b = |for_: Duration, got_child: &mut Vec<Rec>| {
        let until = Instant::now() + for_;
        while Instant::now() < until {
            if let Some(m) = b.poll(Duration::from_millis(50)) {
                let m = m.unwrap();
                if m.topic() == plain {
                    plain_got += 1;
                } else {
                    got_child.push(rec(&m));
                }
            }
        }
        plain_got
    };
    let started = Instant::now();
    while poll_b(Duration::from_millis(200), &mut got_child) < 3000 {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "B read {plain_got} of 3000"
        );
    }
    poll_b(Duration::from_millis(1500), &mut got_child);
    assert!(
        got_child.is_empty(),
        "the gate let {} records through",
        got_child.len()
    );
    let queue = || metric_of(admin, "shardgate_prefetch_queue_bytes", &[]);
    let opening = || metric_of(admin, "shardgate_prefetch_opening_reads_total", &[]);
    let far = queue();
    // The answer the gate holds: what Kafka gives a fetch of q from the gate's offset (one
    // whole batch at least, however large shardgate's writers made it).
    let held = {
        let mut s = std::net::TcpStream::connect(&leaders_direct(&topic)[&child]).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        let r = fetch_on(
            &mut s,
            1,
            &fetch_v12(&topic, &[(child, from)], PART_MAX as i32, 50 << 20),
        );
        r.responses[0].partitions[0]
            .records
            .as_ref()
            .map_or(0, |r| r.len())
    };
    eprintln!(
        "gate far: queues hold {far} bytes (the held answer {held}), opening reads {}",
        opening()
    );
    assert!(
        far <= held as f64,
        "with the group far behind the seal shardgate keeps {far} bytes beyond q's held answer of {held}"
    );
    assert_eq!(opening(), 0.0);

    // A reads the parent through (past the seal) and does not commit yet.
    assign(&a, &[(&topic, parent, 0)]);
    let mut parent_got = 0i64;
    let started = Instant::now();
    while parent_got < parent_end {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "A read {parent_got} of {parent_end}"
        );
        if let Some(m) = a.poll(Duration::from_millis(100)) {
            m.unwrap();
            parent_got += 1;
        }
        poll_b(Duration::ZERO, &mut got_child);
    }
    poll_b(Duration::from_secs(2), &mut got_child);
    assert!(
        got_child.is_empty(),
        "the gate let {} records through before the commit",
        got_child.len()
    );
    let near = queue();
    let reads = opening();
    eprintln!("gate about to open: queues hold {near} bytes, opening reads {reads}");
    assert!(
        reads >= 1.0,
        "q was not read ahead while its gate was about to open"
    );
    assert!(near > far, "the queue did not grow ({far} -> {near} bytes)");

    // A commits: the gate opens, and B drains q, first from memory.
    let counts = || {
        [
            "shardgate_prefetch_hits_total",
            "shardgate_prefetch_late_total",
            "shardgate_prefetch_misses_total",
        ]
        .map(|m| metric_of(admin, m, &[]))
    };
    let before = counts();
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(&topic, parent, Offset::Offset(parent_end))
        .unwrap();
    a.commit(&tpl, CommitMode::Sync).unwrap();
    let committed = Instant::now();
    let mut first = None;
    while got_child.len() < waiting {
        assert!(
            committed.elapsed() < Duration::from_secs(60),
            "B got {} of q's {waiting} records",
            got_child.len()
        );
        poll_b(Duration::from_millis(50), &mut got_child);
        if first.is_none() && !got_child.is_empty() {
            first = Some(committed.elapsed());
        }
    }
    let after = counts();
    let [hits, late, misses] = [0, 1, 2].map(|i| after[i] - before[i]);
    eprintln!(
        "gate opened: first of q's records {first:?} after the commit; hits {hits}, late {late}, misses {misses}"
    );
    assert!(
        hits >= 2.0,
        "the held answer and the one read ahead: {hits} hits"
    );

    // Exactly Kafka's records of q from the gate's offset.
    let direct = direct_consumer();
    assign(&direct, &[(&topic, child, from)]);
    let kafka_child = consume(&direct, waiting, Duration::from_secs(60));
    got_child.sort();
    assert_eq!(got_child.len(), kafka_child.len());
    for (s, k) in got_child.iter().zip(&kafka_child) {
        assert_eq!(s, k, "q at offset {}", k.1);
    }
}

/// Several consumers behind at once stay within the process's cap on read-ahead
/// (`prefetch.max_bytes`), below what their own queues would take together: four raw
/// connections each read two partitions of a backlog (16 KiB a partition every 20 ms), each
/// allowed a 768 KiB queue (3 MiB together) under a 1 MiB cap (the least it may be). Every answer is still
/// exactly Kafka's records from its offset, and read-ahead still answers most fetches.
#[test]
#[ignore = "needs the testbed: integration/run-tests"]
fn consumers_behind_together_stay_within_the_read_ahead_cap() {
    const QUEUE: usize = 768 * 1024;
    const CAP: usize = 1024 * 1024;
    const PART_MAX: i32 = 16 * 1024;
    const CONNS: i32 = 4;
    let topic = unique("prefetch-cap");
    create_topic(&topic, 2 * CONNS);
    fill_partitions(&topic, 2 * CONNS, 3000);
    let (client, admin) = ("127.0.0.1:29160", "127.0.0.1:29260");
    let _sg = own_instance(
        "prefetch-cap",
        client,
        admin,
        "",
        &format!("[prefetch]\nqueue_bytes = {QUEUE}\nmax_bytes = {CAP}\n"),
    );
    let peak = std::sync::Mutex::new(0f64);
    let done = std::sync::atomic::AtomicBool::new(false);
    let answers: usize = std::thread::scope(|s| {
        let watcher = s.spawn(|| {
            let started = Instant::now();
            // Bounded: a reader that panics never sets `done`.
            while !done.load(std::sync::atomic::Ordering::Relaxed)
                && started.elapsed() < Duration::from_secs(200)
            {
                let q = metric_of(admin, "shardgate_prefetch_queue_bytes", &[]);
                let mut p = peak.lock().unwrap();
                *p = p.max(q);
                drop(p);
                std::thread::sleep(Duration::from_millis(10));
            }
        });
        let readers: Vec<_> = (0..CONNS)
            .map(|c| {
                let topic = &topic;
                s.spawn(move || {
                    let mut s = std::net::TcpStream::connect(client).unwrap();
                    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
                    let parts = [2 * c, 2 * c + 1];
                    let mut offsets = [0i64; 2];
                    let (mut correlation, mut answers) = (0, 0usize);
                    let started = Instant::now();
                    while offsets.iter().any(|o| *o < 3000) {
                        assert!(
                            started.elapsed() < Duration::from_secs(180),
                            "stuck at {offsets:?}"
                        );
                        correlation += 1;
                        let asked: Vec<(i32, i64)> =
                            parts.iter().zip(offsets).map(|(p, o)| (*p, o)).collect();
                        let resp = fetch_on(
                            &mut s,
                            correlation,
                            &fetch_v12(topic, &asked, PART_MAX, 4 * PART_MAX),
                        );
                        assert_eq!(resp.error_code, 0);
                        for p in resp.responses.iter().flat_map(|t| &t.partitions) {
                            assert_eq!(p.error_code, 0);
                            let i = parts.iter().position(|x| *x == p.partition_index).unwrap();
                            let Some(next) = p.records.as_ref().and_then(|r| next_offset(r)) else {
                                continue;
                            };
                            // Records are "{partition}-{index}-pad" with index = offset.
                            let text = String::from_utf8_lossy(p.records.as_ref().unwrap());
                            assert!(
                                text.contains(&format!("{}-{:06}-", p.partition_index, offsets[i])),
                                "partition {} from {}: not Kafka's records from that offset: {:?}",
                                p.partition_index,
                                offsets[i],
                                &text[..text.len().min(300)]
                            );
                            offsets[i] = next;
                            answers += 1;
                        }
                        std::thread::sleep(Duration::from_millis(20));
                    }
                    answers
                })
            })
            .collect();
        let n = readers.into_iter().map(|r| r.join().unwrap()).sum();
        done.store(true, std::sync::atomic::Ordering::Relaxed);
        watcher.join().unwrap();
        n
    });
    let peak = *peak.lock().unwrap();
    let hits = metric_of(admin, "shardgate_prefetch_hits_total", &[]);
    eprintln!(
        "{answers} partition answers, {hits} from memory; read-ahead queues peaked at {peak} bytes (cap {CAP}, queues {CONNS} x {QUEUE})"
    );
    assert!(
        peak <= (CAP + CONNS as usize * 2 * PART_MAX as usize) as f64,
        "queues together peaked at {peak} bytes for a cap of {CAP}"
    );
    assert!(
        peak >= (CAP / 2) as f64,
        "the cap was never approached: {peak} bytes"
    );
    assert!(
        hits >= 0.5 * answers as f64,
        "{hits} of {answers} answers from memory"
    );
}

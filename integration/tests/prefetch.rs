//! Prefetch (issue 11): a member assigned partitions finds them read from its group's commits
//! before its first fetch (a rebalance pre-read), and what it gets is exactly what Kafka
//! gives a consumer at those offsets: the same records, with read_committed and aborted
//! transactions in the data.

mod common;

use std::time::{Duration, Instant};

use common::*;
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

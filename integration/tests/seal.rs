//! The seal offset under acks=1 with a lagging follower (issue 8): one shardgate instance (the
//! testbed's), replication factor 3 on the parent partition, acks=1 producers and a live
//! consumer group, a follower of the parent paused (`kill -STOP`) during a split so that the
//! parent's high watermark lags its log end.
//!
//! The seal protocol promises that no record of a moved key lands on the parent at or after the
//! seal offset. With acks=1, shardgate's writer lanes have records acknowledged between the
//! high watermark and the log end; a seal read with ListOffsets(latest) (the high watermark)
//! leaves those records behind the seal, and the gate opens before the group has them.
//!
//! Checks, both must hold: (1) reading the topic directly from Kafka after the run, no record of
//! a key that moved to the new partition sits on the parent at or after the seal offset; (2) the
//! group saw no key go backwards. The follower is resumed (`kill -CONT`) when the test ends,
//! also when it fails.
//!
//! Layout: the upstream topic is created here with a replica assignment, then adopted by
//! shardgate: every partition on brokers [1,2,3] with leader 1, so no fetch or produce waits for
//! the paused broker. The paused broker is the follower that is not the group's coordinator.

mod common;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::producer::FutureProducer;
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use serde_json::{Value, json};

const POOL: i32 = 8;
const KEYS: usize = 200;

/// The real (upstream) coordinator of `group`, from the Java tool's `--state` output.
fn coordinator(group: &str) -> Option<usize> {
    let out = Command::new(bin("kafka-consumer-groups"))
        .args([
            "--bootstrap-server",
            &kafka(),
            "--describe",
            "--group",
            group,
            "--state",
        ])
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    // "GROUP  COORDINATOR (ID)  ..." then "<group>  127.0.0.1:19093 (2)  ..."
    text.lines()
        .find(|l| l.starts_with(group))?
        .split('(')
        .nth(1)?
        .split(')')
        .next()?
        .trim()
        .parse()
        .ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "needs the 3-broker testbed: integration/run-tests"]
async fn seal_covers_records_acknowledged_above_the_high_watermark() {
    assert!(brokers() >= 3, "needs 3 brokers (testbed up --brokers 3)");
    let topic = unique("seal");
    // Kafka wants one replication factor for all partitions of a topic, so the child's high
    // watermark lags too while the follower is paused; the check in Kafka below does not
    // depend on it.
    let assignment: Vec<String> = (0..POOL).map(|_| "1:2:3".to_string()).collect();
    run_ok(
        Command::new(bin("kafka-topics")).args([
            "--bootstrap-server",
            &kafka(),
            "--create",
            "--topic",
            &topic,
            "--replica-assignment",
            &assignment.join(","),
        ]),
        Duration::from_secs(60),
    );
    let (code, created) = admin_post(
        "/api/v1/topics",
        &json!({"name": topic, "initial_shards": 1, "pool": POOL,
                "autoscale": {"enabled": false, "balance_interval_secs": 0}}),
    );
    assert_eq!(code, 201, "adopt: {created}");

    let stop = Arc::new(AtomicBool::new(false));
    let group = format!("{topic}-g");
    let order: Arc<Mutex<Vec<String>>> = Arc::default();
    let consumer = {
        let (topic, group, order, stop) =
            (topic.clone(), group.clone(), order.clone(), stop.clone());
        std::thread::spawn(move || {
            let c: BaseConsumer = ClientConfig::new()
                .set("bootstrap.servers", proxy())
                .set("group.id", &group)
                .set("client.id", &group)
                .set("auto.offset.reset", "earliest")
                .set("enable.auto.commit", "true")
                .set("auto.commit.interval.ms", "500")
                .create()
                .unwrap();
            c.subscribe(&[&topic]).unwrap();
            while !stop.load(Ordering::SeqCst) {
                if let Some(Ok(m)) = c.poll(Duration::from_millis(100)) {
                    order.lock().unwrap().push(
                        String::from_utf8_lossy(m.payload().unwrap_or_default()).into_owned(),
                    );
                }
            }
        })
    };

    let produce_stop = Arc::new(AtomicBool::new(false));
    let acked: Arc<Mutex<Vec<String>>> = Arc::default();
    let producer = {
        let (topic, acked, stop) = (topic.clone(), acked.clone(), produce_stop.clone());
        tokio::spawn(async move {
            let p: FutureProducer = ClientConfig::new()
                .set("bootstrap.servers", proxy())
                .set("acks", "1")
                .set("enable.idempotence", "false")
                .set("max.in.flight.requests.per.connection", "1")
                .set("linger.ms", "5")
                .create()
                .unwrap();
            produce_keyed_sequences(p, &topic, "k", KEYS, &stop, &acked).await;
        })
    };

    // The group must be formed to know its coordinator, which must stay up.
    eventually("the group consumes", Duration::from_secs(60), || {
        !order.lock().unwrap().is_empty()
    });
    let coord = coordinator(&group);
    let paused_broker = if coord == Some(3) { 2 } else { 3 };
    eprintln!("group coordinator: broker {coord:?}; pausing follower broker {paused_broker}");
    // Paused for at most ~6 s: below broker.session.timeout.ms (9 s), after which the KRaft
    // controller would fence the broker and move leaderships, disturbing the tests that follow
    // in run-tests; and below replica.lag.time.max.ms (30 s), so the follower stays in the ISR
    // and the high watermark stays behind for the whole pause.
    let paused_at = Instant::now();
    let paused = Frozen::stop(Frozen::pid_of(&format!("kafka-{paused_broker}.pid")));
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (code, split) = admin_post(
        &format!("/api/v1/topics/{topic}/shards/0/split"),
        &json!({}),
    );
    let rest = Duration::from_secs(6).saturating_sub(paused_at.elapsed());
    tokio::time::sleep(rest.max(Duration::from_millis(500))).await;
    drop(paused);
    eprintln!(
        "follower paused for {:.1}s",
        paused_at.elapsed().as_secs_f64()
    );
    assert_eq!(code, 200, "split: {split}");
    tokio::time::sleep(Duration::from_secs(4)).await;
    produce_stop.store(true, Ordering::SeqCst);
    producer.await.unwrap();
    let want: BTreeSet<String> = acked.lock().unwrap().iter().cloned().collect();
    let delivered = || -> BTreeSet<String> { order.lock().unwrap().iter().cloned().collect() };
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline && !want.is_subset(&delivered()) {
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    stop.store(true, Ordering::SeqCst);
    consumer.join().unwrap();

    // The gate of the split and its seal.
    let (_, map) = admin_get(&format!("/api/v1/topics/{topic}/shards"));
    let gate: Value = map["gates"]
        .as_array()
        .and_then(|g| g.iter().find(|g| g["after"][0]["partition"] == 0).cloned())
        .unwrap_or_else(|| panic!("no gate after partition 0 in {map}"));
    let child = gate["partition"].as_i64().unwrap() as i32;
    let from = gate["from_offset"].as_i64().unwrap();
    let seal = gate["after"][0]["seal_offset"].as_i64().unwrap();

    // Read partition 0 and the child directly from Kafka.
    let direct: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", kafka())
        .set("group.id", format!("{topic}-direct"))
        .set("enable.auto.commit", "false")
        .create()
        .unwrap();
    let mut ends = BTreeMap::new();
    let mut tpl = TopicPartitionList::new();
    for p in [0, child] {
        ends.insert(
            p,
            direct
                .fetch_watermarks(&topic, p, Duration::from_secs(10))
                .unwrap()
                .1,
        );
        tpl.add_partition_offset(&topic, p, Offset::Beginning)
            .unwrap();
    }
    direct.assign(&tpl).unwrap();
    let mut records: HashMap<i32, Vec<(i64, String)>> = HashMap::new();
    let total: i64 = ends.values().sum();
    let mut read = 0;
    let read_deadline = Instant::now() + Duration::from_secs(60);
    while read < total && Instant::now() < read_deadline {
        if let Some(Ok(m)) = direct.poll(Duration::from_millis(200)) {
            read += 1;
            let v = String::from_utf8_lossy(m.payload().unwrap_or_default()).into_owned();
            records
                .entry(m.partition())
                .or_default()
                .push((m.offset(), v));
        }
    }
    let key = |v: &str| v.rsplit_once(':').unwrap().0.to_string();
    let moved: BTreeSet<String> = records
        .get(&child)
        .map(|r| {
            r.iter()
                .filter(|(o, _)| *o >= from)
                .map(|(_, v)| key(v))
                .collect()
        })
        .unwrap_or_default();
    let behind_seal: Vec<&(i64, String)> = records
        .get(&0)
        .map(|r| {
            r.iter()
                .filter(|(o, v)| *o >= seal && moved.contains(&key(v)))
                .collect()
        })
        .unwrap_or_default();

    // Per-key order as the group received it.
    let mut max: HashMap<String, i64> = HashMap::new();
    let mut firsts = BTreeSet::new();
    let mut backwards = Vec::new();
    for v in order.lock().unwrap().iter() {
        if !firsts.insert(v.clone()) {
            continue;
        }
        let (k, s) = v.rsplit_once(':').unwrap();
        let s: i64 = s.parse().unwrap();
        let m = max.entry(k.to_string()).or_insert(-1);
        if s < *m {
            backwards.push(format!("{k}: {s} after {m}"));
        }
        *m = (*m).max(s);
    }
    let undelivered = want.difference(&delivered()).count();
    eprintln!(
        "seal {seal} on p0 (end now {:?}), gate on p{child} from {from}; moved keys {}; records of moved keys on p0 at/after the seal: {} (offsets {:?}..{:?}); acked {}, undelivered {undelivered}; keys backwards {} {:?}",
        ends.get(&0),
        moved.len(),
        behind_seal.len(),
        behind_seal.first().map(|r| r.0),
        behind_seal.last().map(|r| r.0),
        want.len(),
        backwards.len(),
        &backwards[..backwards.len().min(5)]
    );
    assert!(
        behind_seal.is_empty(),
        "{} records of moved keys landed on the parent at or after its seal offset {seal} (first: {:?})",
        behind_seal.len(),
        behind_seal.first()
    );
    assert!(
        backwards.is_empty(),
        "{} keys went backwards: {:?}",
        backwards.len(),
        &backwards[..backwards.len().min(10)]
    );
}

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

/// Kafka's error code when the preferred replica leads already.
const ELECTION_NOT_NEEDED: i16 = 84;

/// `partition`'s replicas reordered to `replicas` and its preferred replica elected, asked of
/// `broker` directly (Kafka's admin APIs, as an operator's tools would; retried for 15 s while
/// the controller takes the order in, or while a new controller takes over).
fn reorder_and_elect(broker: &str, topic: &str, partition: i32, replicas: &[i32]) {
    use kafka_protocol::messages::alter_partition_reassignments_request::{
        ReassignablePartition, ReassignableTopic,
    };
    use kafka_protocol::messages::elect_leaders_request::TopicPartitions;
    use kafka_protocol::messages::{
        AlterPartitionReassignmentsRequest, AlterPartitionReassignmentsResponse, ApiKey, BrokerId,
        ElectLeadersRequest, ElectLeadersResponse, TopicName,
    };
    use kafka_protocol::protocol::StrBytes;
    let name = || TopicName(StrBytes::from_string(topic.to_string()));
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut reordered = false;
    loop {
        if !reordered {
            let req = AlterPartitionReassignmentsRequest::default()
                .with_timeout_ms(10_000)
                .with_topics(vec![
                    ReassignableTopic::default()
                        .with_name(name())
                        .with_partitions(vec![
                            ReassignablePartition::default()
                                .with_partition_index(partition)
                                .with_replicas(Some(
                                    replicas.iter().map(|b| BrokerId(*b)).collect(),
                                )),
                        ]),
                ]);
            let r: AlterPartitionReassignmentsResponse =
                ask(broker, ApiKey::AlterPartitionReassignments, 0, &req);
            let code = r
                .responses
                .iter()
                .flat_map(|t| &t.partitions)
                .map(|p| p.error_code)
                .find(|c| *c != 0)
                .unwrap_or(r.error_code);
            reordered = code == 0;
            assert!(
                reordered || Instant::now() < deadline,
                "reorder: error {code}"
            );
        }
        if reordered {
            let req = ElectLeadersRequest::default()
                .with_election_type(0)
                .with_timeout_ms(10_000)
                .with_topic_partitions(Some(vec![
                    TopicPartitions::default()
                        .with_topic(name())
                        .with_partitions(vec![partition]),
                ]));
            let r: ElectLeadersResponse = ask(broker, ApiKey::ElectLeaders, 2, &req);
            let code = r
                .replica_election_results
                .iter()
                .flat_map(|t| &t.partition_result)
                .map(|p| p.error_code)
                .find(|c| *c != 0)
                .unwrap_or(r.error_code);
            if code == 0 || code == ELECTION_NOT_NEEDED {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "preferred election: error {code}"
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// A leadership move shardgate makes itself (placement spreading active shards over brokers)
/// must not lose records its writers acknowledged with acks=1. Such a record may so far be on
/// the old leader alone; when the new leader is elected without it, the old leader truncates
/// it on following. Provoked here: the broker placement will pick as the new leader is paused
/// (`kill -STOP`, 7 s: below broker.session.timeout.ms, so it stays eligible, and below
/// replica.lag.time.max.ms, so it stays in the ISR) while acks=1 records keep arriving on the
/// partition that will move, and the pile-up that makes placement act is created just before
/// the pause. Expected: shardgate waits (writers on acks=all, the election only once the high
/// watermark covers what was acknowledged), so every acknowledged record is read back from
/// Kafka afterwards. The test's own leadership change (shard 1, to make the pile-up) is made
/// with no record in flight, so it cannot lose any itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "needs the 3-broker testbed: integration/run-tests"]
async fn a_leadership_move_to_a_lagging_replica_loses_no_acks1_record() {
    assert!(brokers() >= 3, "needs 3 brokers (testbed up --brokers 3)");
    const POOL: i32 = 6;
    let topic = unique("leadmove");
    // Shards 0, 1, 2 led by brokers 1, 3, 2 (balanced: placement has nothing to do yet).
    let assignment: Vec<&str> = (0..POOL)
        .map(|p| ["1:2:3", "3:1:2", "2:3:1"][p as usize % 3])
        .collect();
    create_topic_direct(&topic, &["--replica-assignment", &assignment.join(",")]);
    let (code, created) = admin_post(
        "/api/v1/topics",
        &json!({"name": topic, "initial_shards": 3, "pool": POOL,
                "autoscale": {"enabled": false, "balance_interval_secs": 2}}),
    );
    assert_eq!(code, 201, "adopt: {created}");
    let moves = || {
        metric(
            "shardgate_leader_moves_total",
            &[&format!("topic=\"{topic}\"")],
        )
    };
    let moves_before = moves();
    let acked: Arc<Mutex<Vec<String>>> = Arc::default();
    let produce = |prefix: &'static str, stop: Arc<AtomicBool>| {
        let (topic, acked) = (topic.clone(), acked.clone());
        tokio::spawn(async move {
            let p: FutureProducer = ClientConfig::new()
                .set("bootstrap.servers", proxy())
                .set("acks", "1")
                .set("enable.idempotence", "false")
                .set("linger.ms", "5")
                .create()
                .unwrap();
            produce_keyed_sequences(p, &topic, prefix, KEYS, &stop, &acked).await;
        })
    };
    let first = Arc::new(AtomicBool::new(false));
    let producer = produce("a", first.clone());
    eventually("records acknowledged", Duration::from_secs(60), || {
        acked.lock().unwrap().len() >= 300
    });
    first.store(true, Ordering::SeqCst);
    producer.await.unwrap();
    // Followers fetch continuously: a second without writes leaves nothing on a leader alone.
    tokio::time::sleep(Duration::from_secs(1)).await;

    // Shard 1's leadership moved from broker 3 to broker 1, then broker 3 paused at once.
    // Broker 1 then leads two active shards and broker 3 none: placement moves shard 0 (the
    // lowest on the busiest broker) to broker 3, the least loaded in-sync replica.
    let broker1 = kafka().split(',').next().unwrap().to_string();
    reorder_and_elect(&broker1, &topic, 1, &[1, 3, 2]);
    let paused_at = Instant::now();
    let paused = Frozen::stop(Frozen::pid_of("kafka-3.pid"));
    let second = Arc::new(AtomicBool::new(false));
    let producer = produce("b", second.clone());
    let acked_at_pause = acked.lock().unwrap().len();
    let mut moved_while_paused = None;
    while paused_at.elapsed() < Duration::from_secs(7) {
        if moved_while_paused.is_none() && moves() > moves_before {
            moved_while_paused = Some(paused_at.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let acked_in_pause = acked.lock().unwrap().len() - acked_at_pause;
    drop(paused);
    eprintln!(
        "broker 3 paused {:.1}s; leader moved while paused: {moved_while_paused:?}; records acknowledged during the pause: {acked_in_pause}",
        paused_at.elapsed().as_secs_f64(),
    );
    eventually(
        "shardgate's leadership move",
        Duration::from_secs(60),
        || moves() > moves_before,
    );
    tokio::time::sleep(Duration::from_secs(3)).await;
    second.store(true, Ordering::SeqCst);
    producer.await.unwrap();

    let want: std::collections::HashSet<String> = acked.lock().unwrap().iter().cloned().collect();
    let found = read_values_direct(&topic, POOL, &want);
    let mut lost: Vec<&String> = want.difference(&found).collect();
    lost.sort();
    let leaders = partition_leaders(&topic, 3);
    eprintln!(
        "acknowledged {}, read back from Kafka {}, lost {} (e.g. {:?}); leader moves {}; leaders of shards 0-2 now {leaders:?}",
        want.len(),
        found.len(),
        lost.len(),
        &lost[..lost.len().min(5)],
        moves() - moves_before
    );
    assert!(
        lost.is_empty(),
        "{} acknowledged records lost across shardgate's leadership move, e.g. {:?}",
        lost.len(),
        &lost[..lost.len().min(10)]
    );
}

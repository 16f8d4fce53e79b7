//! Consumer profiles (issue 11, part 1): `GET /api/v1/consumers` shows each consumer as the
//! group protocol and its fetches describe it: group, member, client id, assigned partitions,
//! positions, commits, rate. Classic groups (two librdkafka members sharing one client id,
//! told apart by their assignments) and a KIP-848 member (Kafka's Java consumer with
//! group.protocol=consumer), whose profile goes when it leaves.

mod common;

use std::collections::BTreeMap;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use rdkafka::ClientConfig;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::message::Message;
use rdkafka::producer::{FutureProducer, FutureRecord};
use serde_json::Value;

const PARTITIONS: i32 = 4;
const PER_PARTITION: i64 = 250;

/// Partitions 0 and 1 carry orders, 2 and 3 payments: each member of a two-member range
/// assignment reads one kind.
fn kind_of(partition: i32) -> (&'static str, &'static str) {
    if partition < 2 {
        (
            "order",
            r#"{"type":"order","n":{i},"text":"customer ordered running shoes size 42 in blue"}"#,
        )
    } else {
        (
            "payment",
            r#"{"type":"payment","n":{i},"text":"bank transfer settled to the merchant account"}"#,
        )
    }
}

async fn produce(topic: &str) {
    let p: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", kafka())
        .set("linger.ms", "5")
        .create()
        .unwrap();
    let mut acks = Vec::new();
    for partition in 0..PARTITIONS {
        for i in 0..PER_PARTITION {
            let value = kind_of(partition).1.replace("{i}", &i.to_string());
            let key = format!("k{i}");
            let rec = FutureRecord::to(topic)
                .partition(partition)
                .key(&key)
                .payload(&value);
            acks.push(p.send_result(rec).unwrap());
        }
    }
    for a in acks {
        a.await.unwrap().unwrap();
    }
}

fn consumers_of(group: &str) -> Vec<Value> {
    let (status, body) = admin_get("/api/v1/consumers");
    assert_eq!(status, 200, "{body}");
    body["consumers"]
        .as_array()
        .unwrap_or_else(|| panic!("no consumers array: {body}"))
        .iter()
        .filter(|c| c["group"].as_str() == Some(group))
        .cloned()
        .collect()
}

fn partitions_of(c: &Value) -> BTreeMap<i32, (i64, i64)> {
    c["partitions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            (
                p["partition"].as_i64().unwrap() as i32,
                (
                    p["position"].as_i64().unwrap(),
                    p["committed"].as_i64().unwrap(),
                ),
            )
        })
        .collect()
}

#[tokio::test]
#[ignore = "needs the testbed: integration/run-tests"]
async fn two_members_sharing_a_client_id_each_show_their_partitions_positions_and_commits() {
    let topic = unique("profiles");
    create_topic(&topic, PARTITIONS);
    let group = unique("g-profiles");
    // One client id for both, as two librdkafka consumers in one process with defaults have.
    let member = || -> BaseConsumer {
        let c: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", proxy())
            .set("group.id", &group)
            .set("client.id", "profiles-shared-id")
            .set("auto.offset.reset", "earliest")
            .set("enable.auto.commit", "false")
            .set("fetch.wait.max.ms", "100")
            .set("partition.assignment.strategy", "range")
            .create()
            .unwrap();
        c.subscribe(&[&topic]).unwrap();
        c
    };
    // a joins alone and fetches every partition (empty yet) before b joins and takes half:
    // a's connections fetched partitions that moved, and must still be linked to a.
    let a = member();
    let started = Instant::now();
    while a.assignment().map_or(0, |t| t.count()) != PARTITIONS as usize {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "the first member was not assigned within 60 s"
        );
        assert!(a.poll(Duration::from_millis(50)).is_none());
    }
    for _ in 0..10 {
        assert!(a.poll(Duration::from_millis(50)).is_none());
    }
    let b = member();
    // Records only once both hold their share: a member that fetched a partition before the
    // rebalance moved it would count those records too.
    let started = Instant::now();
    while [&a, &b]
        .iter()
        .map(|c| c.assignment().map_or(0, |t| t.count()))
        .sum::<usize>()
        != PARTITIONS as usize
        || [&a, &b]
            .iter()
            .any(|c| c.assignment().map_or(0, |t| t.count()) == 0)
    {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "the two members were not assigned within 60 s"
        );
        for c in [&a, &b] {
            assert!(c.poll(Duration::from_millis(50)).is_none());
        }
    }
    produce(&topic).await;
    let total = (PARTITIONS as i64 * PER_PARTITION) as usize;
    let mut got = 0usize;
    let mut rate_seen = 0.0f64;
    let started = Instant::now();
    while got < total {
        assert!(
            started.elapsed() < Duration::from_secs(90),
            "consumed {got} of {total} in 90 s"
        );
        for c in [&a, &b] {
            if let Some(m) = c.poll(Duration::from_millis(50)) {
                let m = m.unwrap();
                assert!(m.payload().is_some());
                got += 1;
            }
        }
        if got > total / 2 && rate_seen == 0.0 {
            rate_seen = consumers_of(&group)
                .iter()
                .map(|c| c["records_per_sec"].as_f64().unwrap_or(0.0))
                .sum();
        }
    }
    a.commit_consumer_state(CommitMode::Sync).unwrap();
    b.commit_consumer_state(CommitMode::Sync).unwrap();

    let mut seen;
    let started = Instant::now();
    while !{
        seen = consumers_of(&group);
        seen.len() == 2
            && seen.iter().all(|c| {
                let parts = partitions_of(c);
                parts.len() == 2
                    && parts.values().all(|(pos, committed)| {
                        *pos == PER_PARTITION && *committed == PER_PARTITION
                    })
                    && c["content_samples"].as_u64().unwrap_or(0) > 0
            })
    } {
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "both members with their commits and content samples, within 20 s: {}",
            serde_json::to_string_pretty(
                &admin_get("/api/v1/consumers").1["consumers"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter(|c| c["group"].as_str() == Some(&group)
                        || c["client_id"] == "profiles-shared-id")
                    .collect::<Vec<_>>()
            )
            .unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    eprintln!(
        "profiles: {}",
        serde_json::to_string_pretty(&seen).unwrap_or_default()
    );
    let mut all: Vec<i32> = seen
        .iter()
        .flat_map(|c| partitions_of(c).into_keys())
        .collect();
    all.sort();
    assert_eq!(all, (0..PARTITIONS).collect::<Vec<_>>(), "{seen:?}");
    for c in &seen {
        assert_eq!(c["client_id"], "profiles-shared-id");
        assert_eq!(c["protocol"], "classic");
        assert!(c["member"].as_str().is_some_and(|m| !m.is_empty()));
        let conns = c["connections"].as_array().unwrap();
        assert!(
            !conns.is_empty(),
            "a member's fetch connections were not linked to it: {c}"
        );
        assert_eq!(
            c["delivered_records"].as_u64(),
            Some(2 * PER_PARTITION as u64),
            "{c}"
        );
    }
    // What each read: its partitions' kind tops its routing values (prefetch.routing_fields
    // defaults to json:/type and json:/subject), and its partitions' content is close to
    // its centroid.
    for c in &seen {
        let first = *partitions_of(c).keys().next().unwrap();
        let kind = kind_of(first).0;
        assert_eq!(
            c["top_routing_values"]["json:/type"][0][0], kind,
            "top routing values: {c}"
        );
        for p in c["partitions"].as_array().unwrap() {
            if let Some(s) = p["content_similarity"].as_f64() {
                assert!(s > 0.5, "content similarity {s} of its own partition: {c}");
            }
        }
    }
    // The two members' connections are distinct (each linked by its own assignment).
    assert_ne!(seen[0]["connections"], seen[1]["connections"]);
    assert!(rate_seen > 0.0, "no consumption rate while consuming");
}

#[test]
#[ignore = "needs the testbed: integration/run-tests"]
fn a_kip_848_member_shows_its_assignment_and_goes_when_it_leaves() {
    let topic = unique("profiles-848");
    create_topic(&topic, PARTITIONS);
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(produce(&topic));
    let group = unique("g-848");
    let total = PARTITIONS as i64 * PER_PARTITION;
    // Reads everything, then waits (no more records) until the timeout; it leaves the group
    // when it exits.
    let mut consumer = Command::new(bin("kafka-console-consumer"))
        .args([
            "--bootstrap-server",
            &proxy(),
            "--topic",
            &topic,
            "--group",
            &group,
            "--from-beginning",
            "--timeout-ms",
            "15000",
            "--consumer-property",
            "group.protocol=consumer",
            "--consumer-property",
            "client.id=profiles-java",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut seen = Vec::new();
    eventually(
        "the KIP-848 member with every partition, consumed to the end",
        Duration::from_secs(60),
        || {
            seen = consumers_of(&group);
            seen.len() == 1
                && seen[0]["protocol"] == "consumer"
                && partitions_of(&seen[0]).len() == PARTITIONS as usize
                && partitions_of(&seen[0])
                    .values()
                    .all(|(pos, _)| *pos == PER_PARTITION)
        },
    );
    eprintln!(
        "kip-848 profile: {}",
        serde_json::to_string_pretty(&seen).unwrap_or_default()
    );
    assert_eq!(seen[0]["client_id"], "profiles-java");
    assert_eq!(seen[0]["delivered_records"].as_i64(), Some(total));
    let status = consumer.wait().unwrap();
    assert!(status.success(), "console consumer: {status}");
    eventually(
        "the member gone after it left",
        Duration::from_secs(10),
        || consumers_of(&group).is_empty(),
    );
}

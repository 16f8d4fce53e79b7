//! Compatibility suite: real clients round-trip keyed records through shardgate in front of
//! the real Kafka testbed (3 brokers in CI), under every compression codec, with consumer
//! groups, commits and resumption from committed offsets.
//!
//! Every round trip works the same way: produce `PER_CODEC` keyed records per codec with
//! acks=all, consume half of them in a group (committing what was processed), stop the
//! consumer, start it again in the same group, consume the rest, and check that the two runs
//! together saw every record exactly once.

mod common;

use std::collections::BTreeSet;
use std::process::Command;
use std::time::Duration;

use common::*;

const PER_CODEC: usize = 200;
const PARTITIONS: i32 = 6;

/// The values a producer wrote for `codec`: "<codec>-<i>".
fn expected(codecs: &[&str]) -> BTreeSet<String> {
    codecs
        .iter()
        .flat_map(|c| (0..PER_CODEC).map(move |i| format!("{c}-{i}")))
        .collect()
}

/// Checks that two consecutive runs of one group saw every value exactly once.
fn assert_exactly_once(first: &[String], second: &[String], want: &BTreeSet<String>, who: &str) {
    let mut seen = BTreeSet::new();
    for v in first.iter().chain(second) {
        assert!(
            seen.insert(v.clone()),
            "{who}: {v} delivered twice (resume did not start at the committed offset)"
        );
    }
    let missing: Vec<_> = want.difference(&seen).take(5).collect();
    assert!(
        missing.is_empty(),
        "{who}: {} records missing, e.g. {missing:?}",
        want.len() - seen.len().min(want.len())
    );
    assert_eq!(seen.len(), want.len(), "{who}: unexpected extra records");
}

// ---------------------------------------------------------------------------------------
// librdkafka: the rdkafka crate

mod rdkafka_client {
    use super::*;
    use rdkafka::ClientConfig;
    use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
    use rdkafka::message::Message;
    use rdkafka::producer::{FutureProducer, FutureRecord};
    use rdkafka::topic_partition_list::{Offset, TopicPartitionList};

    pub async fn produce(topic: &str, codec: &str) {
        let p: FutureProducer = ClientConfig::new()
            .set("bootstrap.servers", proxy())
            .set("acks", "all")
            .set("enable.idempotence", "true")
            .set("compression.type", codec)
            .set("linger.ms", "5")
            .create()
            .unwrap();
        let sends = (0..PER_CODEC).map(|i| {
            let p = p.clone();
            let key = format!("key-{i}");
            let value = format!("{codec}-{i}");
            async move {
                p.send(
                    FutureRecord::to(topic).key(&key).payload(&value),
                    Duration::from_secs(30),
                )
                .await
                .map_err(|(e, _)| e)
            }
        });
        for r in futures::future::join_all(sends).await {
            r.expect("record acknowledged");
        }
    }

    /// Consumes up to `n` records in `group`, committing synchronously what it processed.
    pub fn consume(topic: &str, group: &str, n: usize) -> Vec<String> {
        let c: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", proxy())
            .set("group.id", group)
            .set("auto.offset.reset", "earliest")
            .set("enable.auto.commit", "false")
            .create()
            .unwrap();
        c.subscribe(&[topic]).unwrap();
        let mut out = Vec::new();
        let deadline = std::time::Instant::now() + Duration::from_secs(90);
        while out.len() < n && std::time::Instant::now() < deadline {
            let Some(m) = c.poll(Duration::from_millis(500)) else {
                continue;
            };
            let m = m.expect("no consume error");
            out.push(String::from_utf8_lossy(m.payload().unwrap()).into_owned());
            let mut tpl = TopicPartitionList::new();
            tpl.add_partition_offset(m.topic(), m.partition(), Offset::Offset(m.offset() + 1))
                .unwrap();
            c.commit(&tpl, CommitMode::Sync).expect("commit");
        }
        c.unsubscribe();
        out
    }
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "needs the testbed: integration/run-tests"]
async fn rdkafka_round_trip_every_codec() {
    let topic = unique("compat-rdkafka");
    create_topic(&topic, PARTITIONS);
    for codec in CODECS {
        rdkafka_client::produce(&topic, codec).await;
    }
    let want = expected(&CODECS);
    let group = unique("g-rdkafka");
    let t = topic.clone();
    let g = group.clone();
    let half = want.len() / 2;
    let first = tokio::task::spawn_blocking(move || rdkafka_client::consume(&t, &g, half))
        .await
        .unwrap();
    assert_eq!(first.len(), half);
    let t = topic.clone();
    let rest = want.len() - half;
    let second = tokio::task::spawn_blocking(move || rdkafka_client::consume(&t, &group, rest))
        .await
        .unwrap();
    assert_exactly_once(&first, &second, &want, "rdkafka");
}

// ---------------------------------------------------------------------------------------
// kcat (librdkafka CLI from Debian)

fn kcat_produce(topic: &str, codec: &str) {
    let input: String = (0..PER_CODEC)
        .map(|i| format!("key-{i}:{codec}-{i}\n"))
        .collect();
    let path = std::env::temp_dir().join(format!("{topic}-{codec}.txt"));
    std::fs::write(&path, input).unwrap();
    run_ok(
        Command::new("kcat").args([
            "-P",
            "-b",
            &proxy(),
            "-t",
            &topic,
            "-K",
            ":",
            "-z",
            codec,
            "-X",
            "acks=all",
            "-X",
            "enable.idempotence=true",
            "-l",
            path.to_str().unwrap(),
        ]),
        Duration::from_secs(60),
    );
}

fn kcat_consume(topic: &str, group: &str, n: usize) -> Vec<String> {
    // High-level balanced consumer; commits synchronously after each message is printed?
    // kcat commits with auto-commit; `-c n` stops after n messages and commits on close.
    let out = run_ok(
        Command::new("kcat").args([
            "-b",
            &proxy(),
            "-G",
            group,
            topic,
            "-c",
            &n.to_string(),
            "-f",
            "%s\n",
            "-q",
            "-X",
            "auto.offset.reset=earliest",
            "-X",
            "enable.auto.offset.store=true",
        ]),
        Duration::from_secs(90),
    );
    out.lines().map(str::to_string).collect()
}

#[test]
#[ignore = "needs the testbed: integration/run-tests"]
fn kcat_round_trip_every_codec() {
    let topic = unique("compat-kcat");
    create_topic(&topic, PARTITIONS);
    for codec in CODECS {
        kcat_produce(&topic, codec);
    }
    let want = expected(&CODECS);
    // kcat consumes one group run to the end: resumption is covered by the other clients.
    let group = unique("g-kcat");
    let all = kcat_consume(&topic, &group, want.len());
    assert_exactly_once(&all, &[], &want, "kcat");
}

// ---------------------------------------------------------------------------------------
// kafka-python and confluent-kafka (PyPI), through integration/clients/py/kclient.py

fn py(lib: &str, args: &[&str]) -> serde_json::Value {
    let script = repo().join("integration/clients/py/kclient.py");
    let out = run_ok(
        Command::new(python())
            .arg(script)
            .args(["--lib", lib])
            .args(args),
        Duration::from_secs(180),
    );
    serde_json::from_str(out.trim())
        .unwrap_or_else(|e| panic!("{lib} printed no JSON ({e}): {out}"))
}

fn values(v: &serde_json::Value) -> Vec<String> {
    v["records"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r[1].as_str().unwrap().to_string())
        .collect()
}

fn python_round_trip(lib: &str) {
    let topic = unique(&format!("compat-{lib}"));
    let proxy = proxy();
    let r = py(
        lib,
        &[
            "admin",
            "create",
            "--brokers",
            &proxy,
            "--topic",
            &topic,
            "--partitions",
            &PARTITIONS.to_string(),
            "--rf",
            &rf().to_string(),
        ],
    );
    assert_eq!(r["created"], topic.as_str());
    // The topic's leaders may take a moment to be known everywhere.
    eventually("topic visible", Duration::from_secs(30), || {
        py(
            lib,
            &["admin", "describe", "--brokers", &proxy, "--topic", &topic],
        )["partitions"]
            == PARTITIONS
    });
    for codec in CODECS {
        let r = py(
            lib,
            &[
                "produce",
                "--brokers",
                &proxy,
                "--topic",
                &topic,
                "--count",
                &PER_CODEC.to_string(),
                "--codec",
                codec,
                "--key-prefix",
                "key-",
                "--value-prefix",
                &format!("{codec}-"),
            ],
        );
        assert_eq!(r["acked"], PER_CODEC, "{lib} {codec}: {r}");
    }
    let want = expected(&CODECS);
    let group = unique(&format!("g-{lib}"));
    let half = (want.len() / 2).to_string();
    let first = values(&py(
        lib,
        &[
            "consume",
            "--brokers",
            &proxy,
            "--topic",
            &topic,
            "--group",
            &group,
            "--count",
            &half,
        ],
    ));
    let rest = (want.len() - first.len()).to_string();
    let second = values(&py(
        lib,
        &[
            "consume",
            "--brokers",
            &proxy,
            "--topic",
            &topic,
            "--group",
            &group,
            "--count",
            &rest,
        ],
    ));
    assert_exactly_once(&first, &second, &want, lib);
    let r = py(
        lib,
        &["admin", "delete", "--brokers", &proxy, "--topic", &topic],
    );
    assert_eq!(r["deleted"], topic.as_str());
}

#[test]
#[ignore = "needs the testbed: integration/run-tests"]
fn kafka_python_round_trip_every_codec_and_admin() {
    python_round_trip("kafka-python");
}

#[test]
#[ignore = "needs the testbed: integration/run-tests"]
fn confluent_kafka_round_trip_every_codec_and_admin() {
    python_round_trip("confluent");
}

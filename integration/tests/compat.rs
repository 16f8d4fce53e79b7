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
            topic,
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
    // High-level balanced consumer (-G) with auto-commit; `-c n` stops after n messages.
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
    // Debian's kcat is built without libzstd ("libzstd not available at build time"); zstd
    // through librdkafka is covered by the rdkafka crate test.
    let codecs = ["none", "gzip", "snappy", "lz4"];
    for codec in codecs {
        kcat_produce(&topic, codec);
    }
    let want = expected(&codecs);
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

// ---------------------------------------------------------------------------------------
// franz-go (Go module proxy), through integration/clients/franz

fn franz(args: &[&str]) -> String {
    run_ok(
        Command::new(bin("franz-client")).args(args),
        Duration::from_secs(180),
    )
}

/// Keys of the records a `franz-client consume --print` run printed.
fn franz_keys(out: &str) -> Vec<String> {
    out.lines()
        .filter(|l| !l.starts_with("consumed="))
        .filter_map(|l| l.split_whitespace().next().map(str::to_string))
        .collect()
}

#[test]
#[ignore = "needs the testbed: integration/run-tests"]
fn franz_go_round_trip_every_codec_and_admin() {
    let topic = unique("compat-franz");
    let proxy = proxy();
    franz(&[
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
    ]);
    // Metadata reaches every broker a moment after creation: describe until it does.
    eventually(
        "franz-go sees the new topic",
        Duration::from_secs(30),
        || {
            let out = run(
                Command::new(bin("franz-client")).args([
                    "admin",
                    "describe",
                    "--brokers",
                    &proxy,
                    "--topic",
                    &topic,
                ]),
                Duration::from_secs(60),
            );
            out.status.success() && String::from_utf8_lossy(&out.stdout).contains(&topic)
        },
    );
    for codec in CODECS {
        let out = franz(&[
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
            &format!("{codec}-"),
        ]);
        assert!(
            out.contains(&format!("acked={PER_CODEC}")),
            "{codec}: {out}"
        );
    }
    let want = expected(&CODECS);
    let group = unique("g-franz");
    let half = want.len() / 2;
    let first = franz_keys(&franz(&[
        "consume",
        "--brokers",
        &proxy,
        "--topic",
        &topic,
        "--group",
        &group,
        "--count",
        &half.to_string(),
        "--timeout",
        "90",
        "--print",
    ]));
    let rest = want.len() - first.len();
    let second = franz_keys(&franz(&[
        "consume",
        "--brokers",
        &proxy,
        "--topic",
        &topic,
        "--group",
        &group,
        "--count",
        &rest.to_string(),
        "--timeout",
        "90",
        "--print",
    ]));
    assert_exactly_once(&first, &second, &want, "franz-go");
    franz(&["admin", "delete", "--brokers", &proxy, "--topic", &topic]);
}

// ---------------------------------------------------------------------------------------
// The Java client: Kafka's own console and perf tools from the same jars

fn java_produce(topic: &str, codec: &str) {
    let input: String = (0..PER_CODEC)
        .map(|i| format!("{codec}-{i}:{codec}-{i}\n"))
        .collect();
    let path = std::env::temp_dir().join(format!("{topic}-{codec}.java.txt"));
    std::fs::write(&path, input).unwrap();
    let out = run(
        Command::new("sh").arg("-c").arg(format!(
            "{} --bootstrap-server {} --topic {topic} --property parse.key=true \
             --property key.separator=: --producer-property compression.type={codec} \
             --producer-property acks=all < {}",
            bin("kafka-console-producer").display(),
            proxy(),
            path.display()
        )),
        Duration::from_secs(120),
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "console producer failed: {stderr}");
    // The Java producer is idempotent by default: any sequence trouble shows up here.
    for bad in [
        "ERROR",
        "OutOfOrderSequence",
        "DuplicateSequence",
        "Exception",
    ] {
        assert!(
            !stderr.contains(bad),
            "console producer ({codec}) logged {bad}:\n{stderr}"
        );
    }
}

#[test]
#[ignore = "needs the testbed: integration/run-tests"]
fn java_console_tools_round_trip_every_codec_with_default_idempotence() {
    let topic = unique("compat-java");
    create_topic(&topic, PARTITIONS);
    for codec in CODECS {
        java_produce(&topic, codec);
    }
    let want = expected(&CODECS);
    let group = unique("g-java");
    // The console consumer commits on close (auto-commit), so the second run resumes.
    let half = want.len() / 2;
    let first = java_consume(&topic, &group, half, &[]);
    assert_eq!(first.len(), half);
    let second = java_consume(&topic, &group, want.len() - half, &[]);
    assert_exactly_once(&first, &second, &want, "java console");
    // Describe and delete through the Java admin client.
    let d = run_ok(
        Command::new(bin("kafka-topics")).args([
            "--bootstrap-server",
            &proxy(),
            "--describe",
            "--topic",
            &topic,
        ]),
        Duration::from_secs(60),
    );
    assert!(d.contains(&format!("PartitionCount: {PARTITIONS}")), "{d}");
    run_ok(
        Command::new(bin("kafka-topics")).args([
            "--bootstrap-server",
            &proxy(),
            "--delete",
            "--topic",
            &topic,
        ]),
        Duration::from_secs(60),
    );
}

#[test]
#[ignore = "needs the testbed: integration/run-tests"]
fn java_perf_tools_run_through_the_proxy() {
    let topic = unique("compat-perf");
    create_topic(&topic, PARTITIONS);
    let n = 20_000;
    let out = run_ok(
        Command::new(bin("kafka-producer-perf-test")).args([
            "--topic",
            &topic,
            "--num-records",
            &n.to_string(),
            "--record-size",
            "1024",
            "--throughput",
            "-1",
            "--producer-props",
            &format!("bootstrap.servers={}", proxy()),
            "acks=all",
        ]),
        Duration::from_secs(180),
    );
    assert!(out.contains(&format!("{n} records sent")), "{out}");
    let out = run_ok(
        Command::new(bin("kafka-consumer-perf-test")).args([
            "--bootstrap-server",
            &proxy(),
            "--topic",
            &topic,
            "--messages",
            &n.to_string(),
            "--group",
            &unique("g-perf"),
            "--timeout",
            "60000",
        ]),
        Duration::from_secs(180),
    );
    // Data line: start, end, MB, MB/s, nMsg, nMsg/s, ...: the consumer read all n records.
    let data = out.lines().last().unwrap_or("");
    let fields: Vec<&str> = data.split(',').map(str::trim).collect();
    assert!(
        fields.len() > 4 && fields[4] == n.to_string(),
        "consumer perf output: {out}"
    );
}

#[test]
#[ignore = "needs the testbed: integration/run-tests"]
fn java_consumer_with_the_kip_848_group_protocol_resumes_from_its_commits() {
    // group.protocol=consumer: ConsumerGroupHeartbeat instead of JoinGroup/SyncGroup.
    let topic = unique("compat-kip848");
    create_topic(&topic, PARTITIONS);
    kcat_produce(&topic, "none");
    let want = expected(&["none"]);
    let group = unique("g-kip848");
    let consume = |n: usize| java_consume(&topic, &group, n, &["group.protocol=consumer"]);
    let first = consume(want.len() / 2);
    let second = consume(want.len() - first.len());
    assert_exactly_once(&first, &second, &want, "java KIP-848 consumer");
}

/// Kafka's config tool against the virtual cluster: a virtual broker's configuration is a real
/// broker's, without anything naming a real node (addresses, controllers, rack, directories,
/// ids); changing one virtual broker's config is refused with a
/// message; topic configs pass through both ways.
#[test]
#[ignore = "needs the testbed: integration/run-tests"]
fn java_config_tool_sees_virtual_brokers_and_topics() {
    let configs = |args: &[&str]| {
        run(
            Command::new(bin("kafka-configs"))
                .args(["--bootstrap-server", &proxy()])
                .args(args),
            Duration::from_secs(60),
        )
    };
    let out = configs(&[
        "--describe",
        "--entity-type",
        "brokers",
        "--entity-name",
        "0",
        "--all",
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("All configs for broker 0 are:"), "{stdout}");
    assert!(stdout.contains("num.partitions="), "{stdout}");
    let listeners = stdout
        .lines()
        .find(|l| l.trim_start().starts_with("advertised.listeners="))
        .unwrap_or_else(|| panic!("no advertised.listeners in {stdout}"));
    assert!(
        listeners.contains(&proxy()) && !listeners.contains(":1909"),
        "a real broker's address leaked: {listeners}"
    );
    // Nothing names a real node: no address any broker listens on, advertises or votes at
    // (read from the testbed's own server.properties), no data directory, no node id, rack or
    // controller setting. Identity keys show the virtual id.
    let mut secrets = Vec::new();
    for n in 1..=brokers() {
        let props = cache().join(format!("run/kafka-{n}/server.properties"));
        let text =
            std::fs::read_to_string(&props).unwrap_or_else(|e| panic!("{}: {e}", props.display()));
        for line in text.lines() {
            let Some((key, value)) = line.split_once('=') else {
                continue;
            };
            match key {
                "listeners" | "advertised.listeners" | "controller.quorum.voters" => {
                    for item in value.split(',') {
                        let addr = item.rsplit_once("://").map_or(item, |(_, a)| a);
                        secrets.push(addr.split_once('@').map_or(addr, |(_, a)| a).to_string());
                    }
                }
                "log.dirs" => secrets.push(value.to_string()),
                _ => {}
            }
        }
    }
    assert!(secrets.len() >= 4 * brokers(), "{secrets:?}");
    let described: Vec<&str> = stdout
        .lines()
        .skip_while(|l| !l.contains("All configs for broker 0 are:"))
        .skip(1)
        .collect();
    // Every leak at once (not just the first), so a failure shows the whole picture.
    let mut leaks = Vec::new();
    for line in &described {
        let key = line.trim_start().split('=').next().unwrap_or("");
        let named = secrets.iter().any(|s| line.contains(s.as_str()));
        let node_setting = key.starts_with("listener.name.")
            || [
                "controller.quorum.voters",
                "controller.quorum.bootstrap.servers",
                "controller.listener.names",
                "process.roles",
                "broker.rack",
                "log.dirs",
                "log.dir",
                "metadata.log.dir",
                "inter.broker.listener.name",
            ]
            .contains(&key);
        if named || node_setting {
            leaks.push(line.trim());
        }
    }
    assert!(
        leaks.is_empty(),
        "{} settings name a real node:\n{}",
        leaks.len(),
        leaks.join("\n")
    );
    for id_key in ["broker.id=0 ", "node.id=0 "] {
        assert!(
            described.iter().any(|l| l.trim_start().starts_with(id_key)),
            "{id_key}missing: {stdout}"
        );
    }

    let out = configs(&[
        "--alter",
        "--entity-type",
        "brokers",
        "--entity-name",
        "0",
        "--add-config",
        "log.cleaner.threads=2",
    ]);
    let all = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!out.status.success(), "{all}");
    assert!(all.contains("is a shardgate instance"), "{all}");

    let topic = unique("compat-configs");
    create_topic(&topic, 1);
    let out = configs(&[
        "--alter",
        "--entity-type",
        "topics",
        "--entity-name",
        &topic,
        "--add-config",
        "retention.ms=3600000",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = configs(&[
        "--describe",
        "--entity-type",
        "topics",
        "--entity-name",
        &topic,
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("retention.ms=3600000"), "{stdout}");
}

/// ApiVersions through shardgate offers only what every broker supports, and every broker was
/// asked. All testbed brokers run the same Kafka, so brokers of different versions (a rolling
/// upgrade) cannot be shown here: the intersection itself is unit-tested
/// (`upstream::topology`); this checks that each real broker's answer is in and bounds the offer.
#[test]
#[ignore = "needs the testbed: integration/run-tests"]
fn api_versions_are_what_every_broker_supports() {
    use kafka_protocol::messages::{ApiKey, ApiVersionsRequest, ApiVersionsResponse};
    use kafka_protocol::protocol::StrBytes;
    eventually(
        "every broker's ApiVersions answer is in",
        Duration::from_secs(30),
        || metric("shardgate_upstream_api_versions_brokers", &[]) == brokers() as f64,
    );
    // Kafka refuses an empty software name (INVALID_REQUEST).
    let req = ApiVersionsRequest::default()
        .with_client_software_name(StrBytes::from_static_str("compat-test"))
        .with_client_software_version(StrBytes::from_static_str("1"));
    let offered: ApiVersionsResponse = ask(&proxy(), ApiKey::ApiVersions, 3, &req);
    assert_eq!(offered.error_code, 0);
    assert!(offered.api_keys.len() > 20, "{offered:?}");
    for broker in kafka().split(',') {
        let own: ApiVersionsResponse = ask(broker, ApiKey::ApiVersions, 3, &req);
        assert_eq!(own.error_code, 0, "{broker}");
        for k in &offered.api_keys {
            let b = own
                .api_keys
                .iter()
                .find(|b| b.api_key == k.api_key)
                .unwrap_or_else(|| panic!("{broker} lacks api {} offered", k.api_key));
            assert!(
                b.min_version <= k.min_version && k.max_version <= b.max_version,
                "api {}: offered {}..={}, {broker} has {}..={}",
                k.api_key,
                k.min_version,
                k.max_version,
                b.min_version,
                b.max_version
            );
        }
        // Levels, not the epoch: a KRaft broker reports its metadata offset there.
        let levels = |r: &ApiVersionsResponse| {
            let mut l: Vec<(String, i16)> = r
                .finalized_features
                .iter()
                .map(|f| (f.name.to_string(), f.max_version_level))
                .collect();
            l.sort();
            l
        };
        assert!(!levels(&own).is_empty());
        assert_eq!(
            levels(&offered),
            levels(&own),
            "feature levels pass through"
        );
    }
}

//! The fetch path (issue 10): what a consumer costs the brokers and what it gets back. An idle
//! consumer costs no more upstream fetches than its own; a response keeps the client's
//! max_bytes however many brokers its partitions live on; a Java consumer of 1,000 partitions
//! uses incremental fetch sessions (KIP-227), gets the same records as straight from Kafka and
//! the records produced while its sessions are incremental in small incremental responses;
//! a record on one broker reaches a consumer without waiting for the long-polls of idle ones.
//! Each scenario runs straight to Kafka too, as the control.
//!
//! Ports: 127.0.0.1:29185/29285 (idle consumer), 29186/29286 (fetch sessions).

mod common;

use std::collections::{BTreeSet, HashMap, HashSet};
use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use common::*;
use kafka_protocol::messages::{ApiKey, FetchRequest, FetchResponse, ResponseHeader};
use kafka_protocol::protocol::Decodable as _;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::producer::{FutureProducer, FutureRecord};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};

const KIB: usize = 1024;
const MIB: usize = 1024 * 1024;

/// The sum of a metric's series (with all `labels`) on the admin HTTP of an instance; None
/// when the instance exports no such series (a metric it does not have, or one never touched
/// yet), so that a missing metric is never read as a zero that passes.
fn series(admin: &str, name: &str, labels: &[&str]) -> Option<f64> {
    let (_, body) = shardgate::admin::http_request(admin, "GET", "/metrics", None)
        .unwrap_or_else(|e| panic!("{admin}/metrics: {e}"));
    let values: Vec<f64> = body
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| {
            let s = l.split_whitespace().next().unwrap_or("");
            s.split('{').next() == Some(name) && labels.iter().all(|x| s.contains(x))
        })
        .filter_map(|l| l.split_whitespace().last()?.parse::<f64>().ok())
        .collect();
    (!values.is_empty()).then(|| values.iter().sum())
}

/// Fetch requests shardgate sent upstream, as its upstream latency histogram counts them (the
/// figure today's binary has; the new path's own counter is `shardgate_upstream_fetches_total`).
fn upstream_fetch_histogram(admin: &str) -> f64 {
    series(
        admin,
        "shardgate_upstream_request_duration_seconds_count",
        &["api=\"Fetch\""],
    )
    .unwrap_or(0.0)
}

fn create_with_assignment(topic: &str, assignment: &str) {
    create_topic_direct(topic, &["--replica-assignment", assignment]);
}

/// An rdkafka consumer through `bootstrap`, assigned partitions 0..`partitions` of `topic` at
/// their ends, with `fetch.wait.max.ms` = `wait_ms`.
fn assigned_consumer(
    bootstrap: &str,
    group: &str,
    wait_ms: u32,
    topic: &str,
    partitions: i32,
) -> BaseConsumer {
    let c: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", unique(group))
        .set("enable.auto.commit", "false")
        .set("fetch.wait.max.ms", wait_ms.to_string())
        .create()
        .unwrap();
    let mut tpl = TopicPartitionList::new();
    for p in 0..partitions {
        tpl.add_partition_offset(topic, p, Offset::End).unwrap();
    }
    c.assign(&tpl).unwrap();
    c
}

fn now_micros() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_micros() as u64
}

// ---------------------------------------------------------------------------------------
// 1. Idle consumers

/// One consumer of 6 empty partitions on one broker, fetch.wait.max.ms = 500 (about 2 fetches
/// a second of its own), through an instance that serves nobody else. Polling upstream with
/// max_wait 0 until the client's wait runs out costs the broker ~13 fetches per client fetch;
/// one upstream long-poll per client wait costs one.
#[test]
#[ignore = "needs the testbed: integration/run-tests"]
fn an_idle_consumer_costs_no_more_upstream_fetches_than_its_own() {
    let (client, admin) = ("127.0.0.1:29185", "127.0.0.1:29285");
    let admin_url = format!("http://{admin}");
    let _sg = own_instance("fetch-idle", client, admin, "", "");
    let topic = unique("fetch-idle");
    create_with_assignment(&topic, &["1"; 6].join(","));

    let c = assigned_consumer(client, "fetch-idle", 500, &topic, 6);
    let poll_for = |d: Duration| {
        let until = Instant::now() + d;
        while Instant::now() < until {
            if let Some(Err(e)) = c.poll(Duration::from_millis(100)) {
                panic!("consumer error: {e}");
            }
        }
    };
    // Warm up: metadata, offsets, the first fetches.
    let own = || series(&admin_url, "shardgate_requests_total", &["api=\"Fetch\""]);
    let warm_until = Instant::now() + Duration::from_secs(20);
    while own().unwrap_or(0.0) < 2.0 {
        assert!(
            Instant::now() < warm_until,
            "the consumer sent no fetches through shardgate within 20 s"
        );
        poll_for(Duration::from_millis(200));
    }
    poll_for(Duration::from_secs(2));

    let upstream = || series(&admin_url, "shardgate_upstream_fetches_total", &[]);
    let (own0, up0, hist0) = (
        own().unwrap(),
        upstream(),
        upstream_fetch_histogram(&admin_url),
    );
    let started = Instant::now();
    poll_for(Duration::from_secs(10));
    let secs = started.elapsed().as_secs_f64();
    let (own1, up1, hist1) = (
        own().unwrap(),
        upstream(),
        upstream_fetch_histogram(&admin_url),
    );
    let own_rate = (own1 - own0) / secs;
    let hist_rate = (hist1 - hist0) / secs;
    println!(
        "idle consumer (6 empty partitions on broker 1, fetch.wait.max.ms 500) over {secs:.1} s: its own fetches {:.0} ({own_rate:.2}/s); upstream fetches: shardgate_upstream_fetches_total {}, upstream latency histogram {:.0} ({hist_rate:.2}/s)",
        own1 - own0,
        match (up0, up1) {
            (_, None) => "not exported".to_string(),
            (a, Some(b)) => format!(
                "{:.0} ({:.2}/s)",
                b - a.unwrap_or(0.0),
                (b - a.unwrap_or(0.0)) / secs
            ),
        },
        hist1 - hist0,
    );
    assert!(
        own1 - own0 >= 5.0,
        "the consumer fetched only {:.0} times in {secs:.1} s",
        own1 - own0
    );
    let Some(up1) = up1 else {
        panic!(
            "shardgate exports no shardgate_upstream_fetches_total; its upstream latency histogram counted {:.0} upstream fetches ({hist_rate:.2}/s) for the consumer's own {:.0} ({own_rate:.2}/s)",
            hist1 - hist0,
            own1 - own0
        );
    };
    let up = up1 - up0.unwrap_or(0.0);
    // One upstream fetch per client fetch, give or take the one in flight at either end of the
    // window.
    assert!(
        up <= own1 - own0 + 1.0,
        "an idle consumer made shardgate send {up:.0} fetches upstream ({:.2}/s) for its own {:.0} ({own_rate:.2}/s)",
        up / secs,
        own1 - own0
    );
}

// ---------------------------------------------------------------------------------------
// 2. max_bytes over several brokers

/// Sends `req` on a fresh connection to `addr`: the response frame's size (length prefix
/// included) and the response.
fn fetch_raw(addr: &str, req: &FetchRequest) -> (usize, FetchResponse) {
    let mut s = TcpStream::connect(addr).unwrap_or_else(|e| panic!("{addr}: {e}"));
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    s.write_all(&frame(ApiKey::Fetch, 12, 1, req)).unwrap();
    let body = read_frame(&mut s).expect("a fetch answer");
    let size = body.len() + 4;
    let mut b = bytes::Bytes::from(body);
    ResponseHeader::decode(&mut b, ApiKey::Fetch.response_header_version(12)).unwrap();
    (size, FetchResponse::decode(&mut b, 12).unwrap())
}

/// What one partition's records hold: complete batches (bytes, largest, the offset after the
/// last), as a consumer reads them (a trailing partial batch is ignored).
#[derive(Debug, Default, Clone, Copy)]
struct Batches {
    bytes: usize,
    largest: usize,
    next_offset: Option<i64>,
}

fn batches(records: &[u8]) -> Batches {
    let mut out = Batches::default();
    let mut pos = 0;
    while pos + 12 <= records.len() {
        let base = i64::from_be_bytes(records[pos..pos + 8].try_into().unwrap());
        let len = i32::from_be_bytes(records[pos + 8..pos + 12].try_into().unwrap()) as usize;
        let total = 12 + len;
        if pos + total > records.len() || len < 49 {
            break;
        }
        // baseOffset 8, batchLength 4, partitionLeaderEpoch 4, magic 1, crc 4, attributes 2.
        let delta = i32::from_be_bytes(records[pos + 23..pos + 27].try_into().unwrap()) as i64;
        out.bytes += total;
        out.largest = out.largest.max(total);
        out.next_offset = Some(base + delta + 1);
        pos += total;
    }
    out
}

/// (partition, batches) of a response; panics on an error code.
fn partitions(resp: &FetchResponse, who: &str) -> Vec<(i32, Batches)> {
    assert_eq!(resp.error_code, 0, "{who}: fetch error {}", resp.error_code);
    resp.responses
        .iter()
        .flat_map(|t| &t.partitions)
        .map(|p| {
            assert_eq!(
                p.error_code, 0,
                "{who}: partition {} error {}",
                p.partition_index, p.error_code
            );
            (
                p.partition_index,
                batches(p.records.as_deref().unwrap_or_default()),
            )
        })
        .collect()
}

/// A topic of 3 partitions, one led by each broker, ~3 MiB in each (1 KiB records in batches
/// of at most 64 KiB). A raw Fetch through shardgate for all three, max_bytes 1 MiB (and 1 MiB
/// per partition), over a few rounds advancing the offsets: no response may exceed 1 MiB plus
/// one batch (Kafka's rule: the first batch may exceed max_bytes so the consumer progresses)
/// plus the response's headers. Control: each broker, asked for its own partition alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs the 3-broker testbed: integration/run-tests"]
async fn a_response_never_exceeds_max_bytes_plus_one_batch() {
    assert!(brokers() >= 3, "needs 3 brokers");
    const RECORDS: usize = 3000;
    const HEADERS: usize = 16 * KIB;
    let topic = unique("fetch-maxbytes");
    create_with_assignment(&topic, "1,2,3");
    let p: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", kafka())
        .set("acks", "1")
        .set("linger.ms", "20")
        .set("batch.size", (64 * KIB).to_string())
        .set("compression.type", "none")
        .create()
        .unwrap();
    let filled = Instant::now();
    let value = vec![b'x'; KIB];
    let mut sends = Vec::with_capacity(3 * RECORDS);
    for i in 0..RECORDS {
        for part in 0..3 {
            let key = format!("k{part}-{i}");
            let rec = FutureRecord::to(&topic)
                .partition(part)
                .key(&key)
                .payload(&value);
            sends.push(p.send_result(rec).map_err(|(e, _)| e).expect("queued"));
        }
    }
    for r in futures::future::join_all(sends).await {
        r.expect("delivery reported")
            .map_err(|(e, _)| e)
            .expect("record acknowledged");
    }
    let fill_secs = filled.elapsed().as_secs_f64();

    // Each partition's leader, as Kafka lists it.
    let direct: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", kafka())
        .create()
        .unwrap();
    let md = direct
        .fetch_metadata(Some(&topic), Duration::from_secs(10))
        .unwrap();
    let addr_of = |id: i32| {
        md.brokers()
            .iter()
            .find(|b| b.id() == id)
            .map(|b| format!("{}:{}", b.host(), b.port()))
            .unwrap()
    };
    let leaders: Vec<(i32, String)> = md.topics()[0]
        .partitions()
        .iter()
        .map(|p| (p.id(), addr_of(p.leader())))
        .collect();
    assert_eq!(leaders.len(), 3);

    let max = MIB as i32;
    let mut offsets = [0i64; 3];
    let mut largest = 0usize;
    let mut through = Vec::new(); // (round, frame size, per-partition record bytes)
    let mut control = Vec::new(); // (round, partition, frame size)
    for round in 0..3 {
        let parts: Vec<(i32, i64)> = (0..3).map(|p| (p, offsets[p as usize])).collect();
        for (part, addr) in &leaders {
            let (size, resp) =
                fetch_raw(addr, &fetch_v12(&topic, &[parts[*part as usize]], max, max));
            for (_, b) in partitions(&resp, "direct") {
                largest = largest.max(b.largest);
            }
            control.push((round, *part, size));
        }
        // Through shardgate; it may need a moment to learn the new topic's leaders.
        let mut tries = 0;
        let (size, got) = loop {
            let (size, resp) = fetch_raw(&proxy(), &fetch_v12(&topic, &parts, max, max));
            let unknown = resp
                .responses
                .iter()
                .flat_map(|t| &t.partitions)
                .any(|p| p.error_code == 3 || p.error_code == 6);
            if unknown && round == 0 && tries < 20 {
                tries += 1;
                std::thread::sleep(Duration::from_millis(500));
                continue;
            }
            break (size, partitions(&resp, "shardgate"));
        };
        let mut per_part = [0usize; 3];
        for (part, b) in got {
            largest = largest.max(b.largest);
            per_part[part as usize] = b.bytes;
            if let Some(next) = b.next_offset {
                offsets[part as usize] = next;
            }
        }
        through.push((round, size, per_part));
    }
    let bound = MIB + largest + HEADERS;
    let kib = |b: usize| format!("{:.1} KiB", b as f64 / KIB as f64);
    println!(
        "max_bytes 1 MiB over 3 brokers ({RECORDS} x 1 KiB records per partition, filled in {fill_secs:.1} s); largest batch {}, bound {}",
        kib(largest),
        kib(bound)
    );
    for (round, size, per) in &through {
        println!(
            "  round {round} through shardgate: response {} (complete batches per partition: {}, {}, {})",
            kib(*size),
            kib(per[0]),
            kib(per[1]),
            kib(per[2])
        );
    }
    for (round, part, size) in &control {
        println!(
            "  round {round} direct, partition {part} from its leader: response {}",
            kib(*size)
        );
    }
    for (round, part, size) in &control {
        assert!(
            *size <= bound,
            "control: partition {part}'s leader answered round {round} with {} (bound {})",
            kib(*size),
            kib(bound)
        );
    }
    let carried: usize = through
        .iter()
        .map(|(_, _, per)| per.iter().sum::<usize>())
        .sum();
    assert!(carried > 0, "shardgate's responses carried no records");
    for (round, size, per) in &through {
        assert!(
            *size <= bound,
            "round {round}: shardgate answered a fetch with max_bytes 1 MiB with {} ({} + {} + {} of records from the 3 partitions); bound 1 MiB + largest batch {} + {} headers = {}",
            kib(*size),
            kib(per[0]),
            kib(per[1]),
            kib(per[2]),
            kib(largest),
            kib(HEADERS),
            kib(bound)
        );
    }
}

// ---------------------------------------------------------------------------------------
// 3. Fetch sessions

const SESSION_PARTITIONS: i32 = 1000;
const PER_PARTITION: usize = 10;
/// The Java consumer exits after this long without a record: the idle phase during which a
/// session consumer sends incremental fetches listing nothing.
const IDLE_MS: u64 = 10_000;
/// The idle phase is measured from this long after the last record: by then the consumer has
/// fetched again every partition it drained from its buffer (listing each once, as changed).
const SETTLE: Duration = Duration::from_secs(2);

/// Session metrics of an instance: (full, incremental, sessionless, request partitions,
/// response partitions); None for the series it does not export.
#[derive(Debug, Clone, Copy)]
struct Sessions {
    client_fetches: f64,
    full: Option<f64>,
    incremental: Option<f64>,
    sessionless: Option<f64>,
    req_partitions: Option<f64>,
    resp_partitions: Option<f64>,
    /// shardgate's own polls of the brokers: how many, by session use, and the partitions
    /// they listed and got back.
    up_fetches: Option<f64>,
    up_incremental: Option<f64>,
    up_listed: Option<f64>,
    up_answered: Option<f64>,
}

fn sessions(admin: &str) -> Sessions {
    let kind = |k: &str| {
        series(
            admin,
            "shardgate_fetch_session_requests_total",
            &[&format!("kind=\"{k}\"")],
        )
    };
    let dir = |d: &str| {
        series(
            admin,
            "shardgate_fetch_session_partitions_total",
            &[&format!("direction=\"{d}\"")],
        )
    };
    Sessions {
        client_fetches: series(admin, "shardgate_requests_total", &["api=\"Fetch\""])
            .unwrap_or(0.0),
        full: kind("full"),
        incremental: kind("incremental"),
        sessionless: kind("sessionless"),
        req_partitions: dir("request"),
        resp_partitions: dir("response"),
        up_fetches: series(admin, "shardgate_upstream_fetches_total", &[]),
        up_incremental: series(
            admin,
            "shardgate_upstream_fetch_polls_total",
            &["session=\"incremental\""],
        ),
        up_listed: series(admin, "shardgate_upstream_fetch_partitions_total", &[]),
        up_answered: series(
            admin,
            "shardgate_upstream_fetch_answered_partitions_total",
            &[],
        ),
    }
}

/// later - earlier of an optional counter (a series not yet exported counts as 0 before).
fn delta(earlier: Option<f64>, later: Option<f64>) -> Option<f64> {
    later.map(|l| l - earlier.unwrap_or(0.0))
}

fn show(v: Option<f64>) -> String {
    v.map_or("not exported".to_string(), |v| format!("{v:.0}"))
}

/// The burst phase: BURSTS bursts, BURST_GAP apart, of PER_BURST records to each of
/// BURST_PARTITIONS (spread over the brokers' leaderships), produced straight to Kafka while
/// the consumer is in its incremental phase.
const BURST_PARTITIONS: [i32; 5] = [0, 250, 500, 750, 999];
const BURSTS: usize = 3;
const PER_BURST: usize = 7;
const BURST_GAP: Duration = Duration::from_secs(1);

/// A record: partition, offset (from its delivery report, or as the console consumer prints
/// it), key, value.
type Rec = (i32, i64, String, String);

/// Produces `records` (partition, key, value) straight to Kafka and waits until each is
/// acknowledged: the records with their offsets.
fn produce_direct(
    rt: &tokio::runtime::Runtime,
    p: &FutureProducer,
    topic: &str,
    records: Vec<(i32, String, String)>,
) -> Vec<Rec> {
    rt.block_on(async {
        let sends: Vec<_> = records
            .iter()
            .map(|(part, key, value)| {
                let rec = FutureRecord::to(topic)
                    .partition(*part)
                    .key(key)
                    .payload(value);
                p.send_result(rec).map_err(|(e, _)| e).expect("queued")
            })
            .collect();
        let acks = futures::future::join_all(sends).await;
        records
            .into_iter()
            .zip(acks)
            .map(|((part, key, value), ack)| {
                let d = ack
                    .expect("delivery reported")
                    .map_err(|(e, _)| e)
                    .expect("record acknowledged");
                assert_eq!(d.partition, part, "{key} delivered to another partition");
                (part, d.offset, key, value)
            })
            .collect()
    })
}

/// A line of the console consumer ("Partition:P\tOffset:O\tkey\tvalue") as a record; None
/// when it is not one.
fn parse_line(line: &str) -> Option<Rec> {
    let mut f = line.split('\t');
    let part = f.next()?.strip_prefix("Partition:")?.parse().ok()?;
    let offset = f.next()?.strip_prefix("Offset:")?.parse().ok()?;
    let (key, value) = (f.next()?.to_string(), f.next()?.to_string());
    f.next().is_none().then_some((part, offset, key, value))
}

/// How `lines` differ from `expected`, each record exactly once: None when they match.
fn mismatch(lines: &[String], expected: &[Rec]) -> Option<String> {
    let mut got: HashMap<Rec, usize> = HashMap::new();
    let mut unparsable = Vec::new();
    for l in lines {
        match parse_line(l) {
            Some(r) => *got.entry(r).or_default() += 1,
            None => unparsable.push(l),
        }
    }
    let want: HashSet<&Rec> = expected.iter().collect();
    let missing: Vec<&Rec> = expected.iter().filter(|r| !got.contains_key(*r)).collect();
    let mut twice: Vec<(&Rec, usize)> = got
        .iter()
        .filter(|(_, n)| **n > 1)
        .map(|(r, n)| (r, *n))
        .collect();
    let mut unexpected: Vec<&Rec> = got.keys().filter(|r| !want.contains(r)).collect();
    if missing.is_empty() && twice.is_empty() && unexpected.is_empty() && unparsable.is_empty() {
        return None;
    }
    twice.sort();
    unexpected.sort();
    let missing_parts: BTreeSet<i32> = missing.iter().map(|r| r.0).collect();
    Some(format!(
        "{} lines for {} records produced: {} missing (on {} partitions, e.g. {:?}), {} read more than once (e.g. {:?}), {} never produced (e.g. {:?}), {} unparsable (e.g. {:?})",
        lines.len(),
        expected.len(),
        missing.len(),
        missing_parts.len(),
        missing.iter().take(5).collect::<Vec<_>>(),
        twice.len(),
        twice.iter().take(5).collect::<Vec<_>>(),
        unexpected.len(),
        unexpected.iter().take(5).collect::<Vec<_>>(),
        unparsable.len(),
        unparsable.iter().take(3).collect::<Vec<_>>(),
    ))
}

/// Runs the Java console consumer on `topic` in a new group through `bootstrap`, from the
/// beginning, until it has had no record for IDLE_MS (or for at most 180 s); `progress(n)` is
/// called as it prints its n-th line. Its output lines, its stderr and how long it ran.
fn java_consume(
    bootstrap: &str,
    topic: &str,
    progress: impl Fn(usize) + Send + 'static,
) -> (Vec<String>, String, Duration) {
    let started = Instant::now();
    let mut child = Command::new(bin("kafka-console-consumer"))
        .args(["--bootstrap-server", bootstrap, "--topic", topic])
        .args(["--group", &unique("fetch-sessions")])
        .args(["--from-beginning", "--timeout-ms", &IDLE_MS.to_string()])
        .args(["--property", "print.partition=true"])
        .args(["--property", "print.offset=true"])
        .args(["--property", "print.key=true"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("kafka-console-consumer starts");
    let stdout = child.stdout.take().unwrap();
    let mut stderr = child.stderr.take().unwrap();
    let err = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = std::io::Read::read_to_string(&mut stderr, &mut s);
        s
    });
    let reader = std::thread::spawn(move || {
        let mut lines = Vec::new();
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            lines.push(line);
            progress(lines.len());
        }
        lines
    });
    let limit = Duration::from_secs(180);
    loop {
        if child.try_wait().unwrap().is_some() {
            break;
        }
        if started.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            panic!("kafka-console-consumer via {bootstrap} did not finish within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let lines = reader.join().unwrap();
    (lines, err.join().unwrap(), started.elapsed())
}

/// One run of the Java console consumer in the sessions scenario.
struct SessionRun<T> {
    lines: Vec<String>,
    stderr: String,
    took: Duration,
    /// The records its burst phase produced.
    burst: Vec<Rec>,
    /// From the first burst sent until the consumer printed its last expected line.
    burst_read: Option<Duration>,
    /// `snap()` at the start of the burst phase and at its end (the start of the idle phase);
    /// None when the consumer exited before.
    bursting: Option<T>,
    caught_up: Option<T>,
}

/// Runs the Java console consumer through `bootstrap` on `topic`, which holds `present`
/// records. SETTLE after it printed the last of them (it is then fetching incrementally, with
/// nothing new), `snap()`, and the bursts go to Kafka (keys numbered from `next_key` on);
/// SETTLE after it printed the last burst record, `snap()` again; then it idles out.
fn session_run<T>(
    bootstrap: &str,
    topic: &str,
    present: usize,
    next_key: usize,
    produce: impl Fn(Vec<(i32, String, String)>) -> Vec<Rec>,
    snap: impl Fn() -> T,
) -> SessionRun<T> {
    let total = present + BURSTS * PER_BURST * BURST_PARTITIONS.len();
    let (tx, rx) = std::sync::mpsc::channel();
    let consumer = {
        let (bootstrap, topic) = (bootstrap.to_string(), topic.to_string());
        std::thread::spawn(move || {
            java_consume(&bootstrap, &topic, move |n| {
                if n == present || n == total {
                    let _ = tx.send((n, Instant::now()));
                }
            })
        })
    };
    // When the consumer printed its n-th line; None when it exited first.
    let reached = |n: usize| loop {
        match rx.recv() {
            Ok((m, at)) if m == n => return Some(at),
            Ok(_) => {}
            Err(_) => return None,
        }
    };
    let (mut burst, mut burst_read, mut bursting, mut caught_up) = (Vec::new(), None, None, None);
    if reached(present).is_some() {
        std::thread::sleep(SETTLE);
        bursting = Some(snap());
        let first = Instant::now();
        for b in 0..BURSTS {
            if b > 0 {
                std::thread::sleep(BURST_GAP);
            }
            let records = BURST_PARTITIONS
                .iter()
                .flat_map(|&part| {
                    (0..PER_BURST).map(move |j| {
                        let i = next_key + b * PER_BURST + j;
                        (part, format!("k{part}-{i}"), format!("v{part}-{i}"))
                    })
                })
                .collect();
            burst.extend(produce(records));
        }
        if let Some(at) = reached(total) {
            burst_read = Some(at.duration_since(first));
            std::thread::sleep(SETTLE);
            caught_up = Some(snap());
        }
    }
    let (lines, stderr, took) = consumer
        .join()
        .unwrap_or_else(|e| std::panic::resume_unwind(e));
    SessionRun {
        lines,
        stderr,
        took,
        burst,
        burst_read,
        bursting,
        caught_up,
    }
}

/// Client fetches, incremental fetches, and partitions in their requests and in their
/// responses between two snapshots.
#[derive(Debug, Clone, Copy)]
struct Phase {
    fetches: f64,
    full: Option<f64>,
    incremental: Option<f64>,
    req: Option<f64>,
    resp: Option<f64>,
    up_fetches: Option<f64>,
    up_incremental: Option<f64>,
    up_listed: Option<f64>,
    up_answered: Option<f64>,
}

fn phase(a: &Sessions, b: &Sessions) -> Phase {
    Phase {
        fetches: b.client_fetches - a.client_fetches,
        full: delta(a.full, b.full),
        incremental: delta(a.incremental, b.incremental),
        req: delta(a.req_partitions, b.req_partitions),
        resp: delta(a.resp_partitions, b.resp_partitions),
        up_fetches: delta(a.up_fetches, b.up_fetches),
        up_incremental: delta(a.up_incremental, b.up_incremental),
        up_listed: delta(a.up_listed, b.up_listed),
        up_answered: delta(a.up_answered, b.up_answered),
    }
}

fn mean(parts: Option<f64>, n: Option<f64>) -> Option<f64> {
    match (parts, n) {
        (Some(p), Some(n)) if n > 0.0 => Some(p / n),
        _ => None,
    }
}

fn show_mean(m: Option<f64>) -> String {
    m.map_or("n/a".to_string(), |m| format!("{m:.1}"))
}

impl Phase {
    fn describe(&self) -> String {
        format!(
            "{:.0} client fetches, full {}, incremental {}; partitions in incremental requests {} (mean {}), in their responses {} (mean {}); upstream polls {} (incremental {}), partitions listed {} (mean {}), answered {} (mean {})",
            self.fetches,
            show(self.full),
            show(self.incremental),
            show(self.req),
            show_mean(mean(self.req, self.incremental)),
            show(self.resp),
            show_mean(mean(self.resp, self.incremental)),
            show(self.up_fetches),
            show(self.up_incremental),
            show(self.up_listed),
            show_mean(mean(self.up_listed, self.up_fetches)),
            show(self.up_answered),
            show_mean(mean(self.up_answered, self.up_fetches)),
        )
    }
}

/// 1,000 partitions of 10 records each, read by Kafka's Java console consumer (which uses
/// fetch sessions when the broker offers them) once straight from Kafka and once through an
/// instance that serves nobody else. Once a run has read them all and fetches incrementally,
/// 3 bursts, 1 s apart, of 7 records to each of 5 partitions go straight to Kafka: each run
/// reads every record produced before its end exactly once (through shardgate the same as
/// direct, plus its own bursts); through shardgate, incremental fetches list only what
/// changed: the burst records come in incremental responses listing a few partitions, and in
/// the idle phase after the last record nothing; shardgate's own polls of the brokers, in
/// sessions of their own, then list and get back next to nothing as well.
#[test]
#[ignore = "needs the testbed: integration/run-tests"]
fn a_java_consumer_of_1000_partitions_uses_incremental_fetch_sessions() {
    let (client, admin) = ("127.0.0.1:29186", "127.0.0.1:29286");
    let admin_url = format!("http://{admin}");
    let _sg = own_instance("fetch-sessions", client, admin, "", "");
    let topic = unique("fetch-sessions");
    create_topic_direct(
        &topic,
        &[
            "--partitions",
            &SESSION_PARTITIONS.to_string(),
            "--replication-factor",
            "1",
        ],
    );
    let rt = tokio::runtime::Runtime::new().unwrap();
    let p: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", kafka())
        .set("acks", "1")
        .set("linger.ms", "5")
        .create()
        .unwrap();
    let produce = |records| produce_direct(&rt, &p, &topic, records);
    let produced = Instant::now();
    let initial = produce(
        (0..SESSION_PARTITIONS)
            .flat_map(|part| {
                (0..PER_PARTITION)
                    .map(move |i| (part, format!("k{part}-{i}"), format!("v{part}-{i}")))
            })
            .collect(),
    );
    let produce_secs = produced.elapsed().as_secs_f64();

    let direct = session_run(
        &kafka(),
        &topic,
        initial.len(),
        PER_PARTITION,
        produce,
        || (),
    );
    let mut direct_expected = initial.clone();
    direct_expected.extend(direct.burst.iter().cloned());
    if let Some(m) = mismatch(&direct.lines, &direct_expected) {
        panic!(
            "control: the Java consumer straight from Kafka read {m}; stderr:\n{}",
            direct.stderr
        );
    }

    // Through shardgate the topic holds the direct run's burst records too.
    let before = sessions(&admin_url);
    let through = session_run(
        client,
        &topic,
        direct_expected.len(),
        PER_PARTITION + BURSTS * PER_BURST,
        produce,
        || sessions(&admin_url),
    );
    let after = sessions(&admin_url);
    let mut expected = direct_expected.clone();
    expected.extend(through.burst.iter().cloned());
    let exact = mismatch(&through.lines, &expected);
    // The same records as direct: all but those of its own bursts.
    let own: HashSet<&str> = through.burst.iter().map(|r| r.2.as_str()).collect();
    let mut shared: Vec<&String> = through
        .lines
        .iter()
        .filter(|l| parse_line(l).is_none_or(|r| !own.contains(r.2.as_str())))
        .collect();
    let mut direct_lines: Vec<&String> = direct.lines.iter().collect();
    shared.sort();
    direct_lines.sort();
    let same = direct_lines == shared;
    let differing = direct_lines
        .iter()
        .zip(&shared)
        .find(|(a, b)| a != b)
        .map(|(a, b)| format!("direct {a:?} vs shardgate {b:?}"));

    let whole = phase(&before, &after);
    let bursting = through.bursting.as_ref().map(|b| {
        let end = through.caught_up.as_ref().unwrap_or(&after);
        phase(b, end)
    });
    let idle = through.caught_up.as_ref().map(|c| phase(c, &after));
    let burst_records = BURSTS * PER_BURST * BURST_PARTITIONS.len();
    println!(
        "{} records on {SESSION_PARTITIONS} partitions (produced in {produce_secs:.1} s), then per run {BURSTS} bursts of {PER_BURST} records to each of partitions {BURST_PARTITIONS:?} ({burst_records} records), {BURST_GAP:?} apart; Java console consumer direct {:.1?} ({} records; burst records all read {:.1?} after the first burst was sent), through shardgate {:.1?} ({} records; burst records all read {:.1?} after the first burst), each ending with {IDLE_MS} ms idle; every record exactly once through shardgate: {}; same records as direct: {same}",
        initial.len(),
        direct.took,
        direct.lines.len(),
        direct.burst_read.unwrap_or_default(),
        through.took,
        through.lines.len(),
        through.burst_read.unwrap_or_default(),
        exact.is_none(),
    );
    println!(
        "  through shardgate, whole run: {:.0} client fetches; by session kind: full {}, incremental {}, sessionless {}; partitions in incremental requests {} (mean {}), in their responses {} (mean {})",
        whole.fetches,
        show(whole.full),
        show(whole.incremental),
        show(delta(before.sessionless, after.sessionless)),
        show(whole.req),
        show_mean(mean(whole.req, whole.incremental)),
        show(whole.resp),
        show_mean(mean(whole.resp, whole.incremental)),
    );
    if let Some(b) = &bursting {
        println!(
            "  burst phase ({SETTLE:?} after the first {} records until {SETTLE:?} after the last burst record): {}",
            direct_expected.len(),
            b.describe()
        );
    }
    if let Some(i) = &idle {
        println!(
            "  idle phase ({SETTLE:?} after the last record until exit): {}",
            i.describe()
        );
    }

    if let Some(m) = exact {
        panic!(
            "the Java consumer through shardgate read {m}; stderr:\n{}",
            through.stderr
        );
    }
    assert!(
        same,
        "the Java consumer read different records through shardgate: {} vs {} lines, first difference {}",
        shared.len(),
        direct_lines.len(),
        differing.unwrap_or_default()
    );
    let Some(incremental) = whole.incremental.filter(|n| *n > 0.0) else {
        panic!(
            "no incremental fetch session request through shardgate (incremental {}; full {}, sessionless {}; {:.0} client fetches)",
            show(whole.incremental),
            show(whole.full),
            show(delta(before.sessionless, after.sessionless)),
            whole.fetches
        );
    };
    let req = whole
        .req
        .expect("shardgate_fetch_session_partitions_total{direction=\"request\"} exported");
    let whole_mean = req / incremental;
    // A sessionless consumer lists all 1,000 in every fetch. With a session, the Java consumer
    // lists a partition when it changed: when it is added back to the session after its
    // buffered records were consumed (it leaves the session while they are buffered), i.e.
    // each partition once or twice over the run, spread over ~30 fetches. The burst and idle
    // phases below are the sharp checks.
    assert!(
        whole_mean < 200.0,
        "incremental fetches listed {whole_mean:.1} of the {SESSION_PARTITIONS} partitions on average ({req:.0} in {incremental:.0})"
    );

    // Every record was read, so both snapshots were taken.
    let (bursting, idle) = (bursting.unwrap(), idle.unwrap());
    let burst_incremental = bursting.incremental.unwrap_or(0.0);
    assert!(
        burst_incremental > 0.0,
        "no incremental fetch in the burst phase ({})",
        bursting.describe()
    );
    let burst_resp = bursting
        .resp
        .expect("shardgate_fetch_session_partitions_total{direction=\"response\"} exported");
    assert!(
        burst_resp > 0.0,
        "the {burst_records} burst records were read, but no incremental response carried a partition ({})",
        bursting.describe()
    );
    // Records came to BURST_PARTITIONS.len() partitions; a few more may be listed for a
    // moved high watermark.
    let burst_resp_mean = burst_resp / burst_incremental;
    let burst_req_mean = bursting.req.unwrap_or(0.0) / burst_incremental;
    assert!(
        burst_resp_mean <= 10.0,
        "incremental responses in the burst phase carried {burst_resp_mean:.1} partitions on average, while records came to {}: a session answers only what changed ({})",
        BURST_PARTITIONS.len(),
        bursting.describe()
    );
    assert!(
        burst_req_mean < 20.0,
        "incremental requests in the burst phase listed {burst_req_mean:.1} partitions on average ({})",
        bursting.describe()
    );

    let idle_incremental = idle.incremental.unwrap_or(0.0);
    assert!(
        idle_incremental >= 3.0,
        "only {idle_incremental:.0} incremental fetches in the idle phase ({IDLE_MS} ms less {SETTLE:?})"
    );
    let idle_req = idle.req.unwrap_or(0.0) / idle_incremental;
    let idle_resp = idle
        .resp
        .expect("shardgate_fetch_session_partitions_total{direction=\"response\"} exported")
        / idle_incremental;
    assert!(
        idle_req < 10.0 && idle_resp < 10.0,
        "idle incremental fetches listed {idle_req:.1} partitions and were answered with {idle_resp:.1} on average: a session sends and receives only what changed"
    );
    // shardgate's own polls of the brokers are in fetch sessions too: idle, they list and get
    // back next to nothing (without a session each would list every partition of its broker,
    // hundreds here).
    let up_incremental = idle.up_incremental.unwrap_or(0.0);
    assert!(
        up_incremental > 0.0,
        "no upstream poll in a fetch session in the idle phase ({})",
        idle.describe()
    );
    let up_listed = mean(idle.up_listed, idle.up_fetches).unwrap_or(f64::MAX);
    let up_answered = mean(idle.up_answered, idle.up_fetches).unwrap_or(f64::MAX);
    assert!(
        up_listed < 10.0 && up_answered < 10.0,
        "idle upstream polls listed {up_listed:.1} partitions and got {up_answered:.1} back on average ({})",
        idle.describe()
    );
}

// ---------------------------------------------------------------------------------------
// 4. No waiting for idle brokers

/// (latency of each record, produced at 100 ms intervals to partition 0 of `topic`, as seen
/// by a consumer of all 3 partitions through `bootstrap` with fetch.wait.max.ms = 2000).
async fn latency_scenario(bootstrap: &str, topic: &str, label: &str) -> Vec<Duration> {
    const RECORDS: usize = 50;
    let stop = Arc::new(AtomicBool::new(false));
    let ready = Arc::new(AtomicBool::new(false));
    let consumer = {
        let (bootstrap, topic, stop, ready) = (
            bootstrap.to_string(),
            topic.to_string(),
            stop.clone(),
            ready.clone(),
        );
        let label = label.to_string();
        std::thread::spawn(move || {
            let c = assigned_consumer(&bootstrap, "fetch-latency", 2000, &topic, 3);
            let mut out = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                match c.poll(Duration::from_millis(50)) {
                    Some(Ok(m)) => {
                        let at = now_micros();
                        let payload = std::str::from_utf8(m.payload().unwrap()).unwrap();
                        if payload == "warm" {
                            ready.store(true, Ordering::Relaxed);
                            continue;
                        }
                        let sent: u64 = payload.parse().unwrap();
                        out.push(Duration::from_micros(at.saturating_sub(sent)));
                        if out.len() == RECORDS {
                            break;
                        }
                    }
                    Some(Err(e)) => panic!("{label}: consumer error: {e}"),
                    None => {}
                }
            }
            out
        })
    };
    let p: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", kafka())
        .set("acks", "1")
        .set("linger.ms", "0")
        .create()
        .unwrap();
    // Until the consumer gets a record (it starts at the end offsets once it has them).
    let started = Instant::now();
    while !ready.load(Ordering::Relaxed) {
        assert!(
            started.elapsed() < Duration::from_secs(30) && !consumer.is_finished(),
            "{label}: the consumer received nothing within 30 s"
        );
        p.send(
            FutureRecord::<(), _>::to(topic)
                .partition(0)
                .payload("warm"),
            Duration::from_secs(30),
        )
        .await
        .map_err(|(e, _)| e)
        .expect("delivered");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    // A few long-polls in, so the consumer is in its steady state.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let mut next = Instant::now();
    for _ in 0..RECORDS {
        let v = now_micros().to_string();
        p.send(
            FutureRecord::<(), _>::to(topic).partition(0).payload(&v),
            Duration::from_secs(30),
        )
        .await
        .map_err(|(e, _)| e)
        .expect("delivered");
        next += Duration::from_millis(100);
        tokio::time::sleep_until(next.into()).await;
    }
    let waited = Instant::now();
    while !consumer.is_finished() && waited.elapsed() < Duration::from_secs(10) {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    stop.store(true, Ordering::Relaxed);
    let got = consumer.join().unwrap();
    assert_eq!(
        got.len(),
        RECORDS,
        "{label}: the consumer received {} of {RECORDS} records",
        got.len()
    );
    got
}

fn percentile(v: &[Duration], pct: usize) -> Duration {
    let mut v = v.to_vec();
    v.sort();
    v[(v.len() * pct / 100).min(v.len() - 1)]
}

/// A consumer of 3 partitions, one on each broker, through shardgate with fetch.wait.max.ms
/// 2000; one record every 100 ms to partition 0 only (produced straight to Kafka, so no
/// produce through shardgate can wake the fetch). The record must not wait for the long-polls
/// of the two idle brokers: end-to-end p50 well below the 2 s wait.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs the 3-broker testbed: integration/run-tests"]
async fn a_consumer_over_three_brokers_gets_data_without_waiting_for_idle_ones() {
    assert!(brokers() >= 3, "needs 3 brokers");
    let topic = unique("fetch-latency");
    create_with_assignment(&topic, "1,2,3");
    let direct = latency_scenario(&kafka(), &topic, "direct").await;
    let through = latency_scenario(&proxy(), &topic, "shardgate").await;
    let (d50, d99) = (percentile(&direct, 50), percentile(&direct, 99));
    let (s50, s99) = (percentile(&through, 50), percentile(&through, 99));
    println!(
        "one record per 100 ms to partition 0 (broker 1) of 3, fetch.wait.max.ms 2000: produce-to-consume p50 {s50:.1?}, p99 {s99:.1?} through shardgate; direct p50 {d50:.1?}, p99 {d99:.1?}"
    );
    assert!(
        s50 < Duration::from_millis(300),
        "through shardgate a record took {s50:.1?} (p50; p99 {s99:.1?}) to reach a consumer whose other partitions are idle; direct p50 {d50:.1?}"
    );
}

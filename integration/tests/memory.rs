//! Memory and shutdown under hostile or stuck clients (issue 9): 2,000 hostile connections
//! keep shardgate's RSS within its memory budget plus a stated overhead while another client
//! keeps producing, and SIGTERM answers every request already read before the process exits.
//! Ports: 127.0.0.1:29181/29281 (memory), 29182/29282 (drain), 29183/29283 (drain timeout).

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::*;

const MIB: u64 = 1 << 20;
const BUDGET: u64 = 64 * MIB;
const MAX_FRAME: u64 = 8 * MIB;
const IDLE_HANDSHAKES: usize = 1000;
const SLOW_PRODUCERS: usize = 1000;
/// A slow producer sends its request but this tail, which it trickles: the harshest slow
/// request for memory (a frame that only trickles from its start touches few pages of its
/// buffer, so RSS would stay low even without a budget).
const WITHHELD: usize = 64 * 1024;
/// Trickle per slow producer once its body (but the tail) is sent: far below the withheld tail
/// over the test's length, so no request completes.
const TRICKLE_BYTES_PER_SEC: usize = 200;

/// RSS allowed above the idle baseline besides the budget itself: what each hostile connection
/// costs outside the budget (its task, TLS state, the 16 KiB read-ahead of a connection that
/// sent a frame size, rustls' record buffers), measured on this machine (debug build) at 42-44
/// KiB per connection; bounded at 64 KiB x 2,000 connections = 125 MiB.
const OVERHEAD: u64 = 64 * 1024 * (IDLE_HANDSHAKES + SLOW_PRODUCERS) as u64;

fn rss(pid: i32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .expect("VmRSS in /proc/PID/status");
    kib * 1024
}

fn mib(b: u64) -> f64 {
    b as f64 / MIB as f64
}

/// A CA and a P-256 server certificate for 127.0.0.1 signed by it (ECDSA: a thousand
/// handshakes cost little CPU). Returns (ca, cert, key).
fn certificates(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
    std::fs::create_dir_all(dir).unwrap();
    let p = |n: &str| dir.join(n);
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    let openssl = |args: &[&str]| {
        run_ok(
            Command::new("openssl").args(args).current_dir(dir),
            Duration::from_secs(30),
        )
    };
    openssl(
        &[
            &["req", "-x509"][..],
            &ec,
            &["-days", "1", "-subj", "/CN=memory-test-ca"],
            &["-keyout", "ca.key", "-out", "ca.pem"],
        ]
        .concat(),
    );
    openssl(
        &[
            &["req"][..],
            &ec,
            &[
                "-subj",
                "/CN=127.0.0.1",
                "-keyout",
                "key.pem",
                "-out",
                "server.csr",
            ],
        ]
        .concat(),
    );
    std::fs::write(p("san.ext"), "subjectAltName=IP:127.0.0.1\n").unwrap();
    openssl(&[
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-days",
        "1",
        "-extfile",
        "san.ext",
        "-out",
        "cert.pem",
    ]);
    (p("ca.pem"), p("cert.pem"), p("key.pem"))
}

/// Raises this process's soft open-files limit to the hard one (shardgate inherits it).
fn raise_nofile(need: u64) {
    let mut l = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    unsafe {
        assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut l), 0);
        l.rlim_cur = l.rlim_max;
        assert_eq!(libc::setrlimit(libc::RLIMIT_NOFILE, &l), 0);
    }
    assert!(
        l.rlim_cur >= need,
        "open-files limit {} is below the {need} this test needs",
        l.rlim_cur
    );
}

/// Produces `count` records over TLS with confluent-kafka (librdkafka); (acked, seconds).
fn tls_produce(ca: &Path, brokers: &str, topic: &str, count: usize) -> (u64, f64) {
    let started = Instant::now();
    let out = run_ok(
        Command::new(python())
            .arg(repo().join("integration/clients/py/kclient.py"))
            .args(["--lib", "confluent", "--ca"])
            .arg(ca)
            .args(["produce", "--brokers", brokers, "--topic", topic])
            .args(["--count", &count.to_string()]),
        Duration::from_secs(120),
    );
    let secs = started.elapsed().as_secs_f64();
    let r: serde_json::Value = serde_json::from_str(out.trim()).unwrap();
    assert_eq!(r["errors"], serde_json::json!([]), "{r}");
    (r["acked"].as_u64().unwrap(), secs)
}

/// One sample of shardgate's RSS and budget gauge.
#[derive(Clone, Copy, Debug)]
struct Sample {
    at: Instant,
    rss: u64,
    budget_used: u64,
}

/// Samples every 500 ms until `stop`; the samples so far are readable while it runs.
fn sampler(
    pid: i32,
    admin: String,
    stop: Arc<AtomicBool>,
) -> (
    Arc<std::sync::Mutex<Vec<Sample>>>,
    std::thread::JoinHandle<()>,
) {
    let samples = Arc::new(std::sync::Mutex::new(Vec::new()));
    let handle = std::thread::spawn({
        let samples = samples.clone();
        move || {
            while !stop.load(Ordering::Relaxed) {
                let budget_used =
                    metric_of(&admin, "shardgate_memory_budget_used_bytes", &[]) as u64;
                samples.lock().unwrap().push(Sample {
                    at: Instant::now(),
                    rss: rss(pid),
                    budget_used,
                });
                std::thread::sleep(Duration::from_millis(500));
            }
        }
    });
    (samples, handle)
}

/// A Produce v9 request header announcing a frame of `MAX_FRAME` bytes (length prefix
/// included), the start of a request that then arrives slowly.
fn slow_produce_head() -> Vec<u8> {
    use kafka_protocol::protocol::Encodable as _;
    let header = kafka_protocol::messages::RequestHeader::default()
        .with_request_api_key(0)
        .with_request_api_version(9)
        .with_correlation_id(1)
        .with_client_id(Some(kafka_protocol::protocol::StrBytes::from_static_str(
            "slow-producer",
        )));
    let mut buf = bytes::BytesMut::new();
    header.encode(&mut buf, 2).unwrap();
    let mut out = (MAX_FRAME as u32).to_be_bytes().to_vec();
    out.extend_from_slice(&buf);
    out
}

/// 2,000 hostile connections against one instance with a 64 MiB budget: 1,000 TLS handshakes
/// that never finish and 1,000 clients that send a maximum-size (8 MiB) Produce request but
/// its last 64 KiB, then trickle. Another client produces 2,000 records over TLS meanwhile.
/// Without the budget, shardgate would hold 1,000 x 8 MiB; with it, large frames hold at most
/// half of 64 MiB and the rest wait unread.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs the testbed: integration/run-tests"]
async fn two_thousand_hostile_connections_stay_within_the_budget() {
    use tokio::io::AsyncWriteExt;

    raise_nofile(3 * (IDLE_HANDSHAKES + SLOW_PRODUCERS) as u64);
    let (client, admin) = ("127.0.0.1:29181", "http://127.0.0.1:29281");
    let dir = cache().join("run").join("memory-test");
    let _ = std::fs::remove_dir_all(&dir);
    let (ca, cert, key) = certificates(&dir.join("tls"));
    // MEMTEST_LIMITS replaces the budget lines below. With "memory_budget_bytes = 4294967296"
    // and "max_frame_bytes = 1073741824" (no effective budget) the test failed within 5 s, RSS
    // 675 MiB and climbing.
    let limits = std::env::var("MEMTEST_LIMITS").unwrap_or_else(|_| {
        format!("memory_budget_bytes = {BUDGET}\nmax_frame_bytes = {MAX_FRAME}")
    });
    let bootstrap: Vec<String> = kafka().split(',').map(|b| format!("\"{b}\"")).collect();
    let config = format!(
        r#"
[listener]
bind = "{client}"
[listener.tls]
cert = "{cert}"
key = "{key}"

[upstream]
bootstrap = [{bootstrap}]

[admin]
bind = "127.0.0.1:29281"

[store]
path = "{store}"

[limits]
{limits}
# Longer than the test: every hostile connection stays open until the test closes it.
handshake_timeout_ms = 120000
request_read_timeout_ms = 120000
max_connections = 2200
"#,
        cert = cert.display(),
        key = key.display(),
        bootstrap = bootstrap.join(", "),
        store = dir.join("data").display(),
    );
    let sg = start_shardgate(&dir, "memory", &config, admin);
    let pid = sg.pid();

    let topic = unique("memory");
    run_ok(
        Command::new(bin("kafka-topics")).args([
            "--bootstrap-server",
            &kafka(),
            "--create",
            "--topic",
            &topic,
            "--partitions",
            "3",
            "--replication-factor",
            &rf().to_string(),
        ]),
        Duration::from_secs(60),
    );
    // Control: the same load before any hostile connection (also warms shardgate up: upstream
    // connections, topology).
    let (acked, control_secs) = tls_produce(&ca, client, &topic, 2000);
    assert_eq!(acked, 2000);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let baseline = rss(pid);

    let stop_sampling = Arc::new(AtomicBool::new(false));
    let (samples, sampling) = sampler(pid, admin.to_string(), stop_sampling.clone());
    let bound = baseline + BUDGET + OVERHEAD;
    let check_bound = |what: &str| {
        let peak = samples.lock().unwrap().iter().map(|s| s.rss).max();
        if let Some(peak) = peak {
            assert!(
                peak <= bound,
                "{what}: shardgate RSS {:.1} MiB exceeds baseline {:.1} + budget {:.0} + overhead {:.0} MiB",
                mib(peak),
                mib(baseline),
                mib(BUDGET),
                mib(OVERHEAD)
            );
        }
    };
    let hostile_started = Instant::now();

    // Idle TLS handshakes: half send nothing, half the first 5 bytes of a ClientHello record.
    let mut idle = Vec::with_capacity(IDLE_HANDSHAKES);
    for i in 0..IDLE_HANDSHAKES {
        let mut s = tokio::net::TcpStream::connect(client).await.unwrap();
        if i % 2 == 1 {
            s.write_all(&[0x16, 0x03, 0x01, 0x02, 0x00]).await.unwrap();
        }
        idle.push(s);
    }

    // Slow producers.
    let connector = shardgate::tls::connector(&ca, None).unwrap();
    let head = Arc::new(slow_produce_head());
    let body = Arc::new(vec![0u8; 64 * 1024]);
    let handshaken = Arc::new(AtomicUsize::new(0));
    let sent_but_tail = Arc::new(AtomicUsize::new(0));
    let failures = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let mut slow = Vec::with_capacity(SLOW_PRODUCERS);
    for _ in 0..SLOW_PRODUCERS {
        let (connector, head, body) = (connector.clone(), head.clone(), body.clone());
        let (handshaken, sent_but_tail, failures) =
            (handshaken.clone(), sent_but_tail.clone(), failures.clone());
        slow.push(tokio::spawn(async move {
            let r: std::io::Result<()> = async {
                let sock = tokio::net::TcpSocket::new_v4()?;
                // A small send buffer: what shardgate does not read waits in the kernel, not
                // in a few MiB of autotuned buffer per connection.
                sock.set_send_buffer_size(64 * 1024)?;
                let tcp = sock.connect(client.parse().unwrap()).await?;
                let name =
                    tokio_rustls::rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
                let mut tls = connector.connect(name, tcp).await?;
                handshaken.fetch_add(1, Ordering::Relaxed);
                tls.write_all(&head).await?;
                let mut left = MAX_FRAME as usize + 4 - head.len() - WITHHELD;
                while left > 0 {
                    let n = left.min(body.len());
                    tls.write_all(&body[..n]).await?;
                    left -= n;
                }
                tls.flush().await?;
                sent_but_tail.fetch_add(1, Ordering::Relaxed);
                loop {
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    tls.write_all(&body[..TRICKLE_BYTES_PER_SEC]).await?;
                    tls.flush().await?;
                }
            }
            .await;
            if let Err(e) = r {
                failures.lock().unwrap().push(e.to_string());
            }
        }));
    }
    eventually(
        "every slow producer's TLS handshake",
        Duration::from_secs(60),
        || {
            check_bound("while connecting");
            let f = failures.lock().unwrap();
            assert!(
                f.is_empty(),
                "slow producers failed: {:?}",
                &f[..f.len().min(5)]
            );
            handshaken.load(Ordering::Relaxed) == SLOW_PRODUCERS
        },
    );
    let connected_secs = hostile_started.elapsed().as_secs_f64();
    let open = metric_of(admin, "shardgate_connections", &[]);
    assert!(
        open >= (IDLE_HANDSHAKES + SLOW_PRODUCERS) as f64,
        "only {open} connections open"
    );

    // Another client produces over TLS meanwhile; the hostile connections stay open for at
    // least 10 s of sampling whatever its speed.
    let measure_from = samples.lock().unwrap().len();
    let producing = tokio::task::spawn_blocking({
        let (ca, topic) = (ca.clone(), topic.clone());
        move || tls_produce(&ca, client, &topic, 2000)
    });
    let measuring = Instant::now();
    while measuring.elapsed() < Duration::from_secs(10) || !producing.is_finished() {
        check_bound("while hostile connections were open");
        assert!(
            measuring.elapsed() < Duration::from_secs(90),
            "the TLS producer did not finish within 90 s"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let (acked, hostile_secs) = producing.await.unwrap();
    let f = failures.lock().unwrap().clone();
    assert!(
        f.is_empty(),
        "slow producers failed: {:?}",
        &f[..f.len().min(5)]
    );
    let open = metric_of(admin, "shardgate_connections", &[]);
    assert!(
        open >= (IDLE_HANDSHAKES + SLOW_PRODUCERS) as f64,
        "hostile connections closed during the measurement: {open} open"
    );
    let reads = sent_but_tail.load(Ordering::Relaxed);
    let waits = metric_of(admin, "shardgate_memory_budget_waits_total", &[]) as u64;
    let hostile: Vec<Sample> = samples.lock().unwrap()[measure_from..].to_vec();
    let peak_rss = hostile.iter().map(|s| s.rss).max().unwrap();
    let peak_gauge = samples
        .lock()
        .unwrap()
        .iter()
        .map(|s| s.budget_used)
        .max()
        .unwrap();
    check_bound("while hostile connections were open");

    // They leave.
    for t in &slow {
        t.abort();
    }
    for t in slow {
        let _ = t.await;
    }
    drop(idle);
    let left_at = Instant::now();
    eventually(
        "hostile connections gone and the budget released",
        Duration::from_secs(15),
        || {
            metric_of(admin, "shardgate_connections", &[]) == 0.0
                && metric_of(admin, "shardgate_memory_budget_used_bytes", &[]) == 0.0
        },
    );
    let released_secs = left_at.elapsed().as_secs_f64();
    // Freed memory goes back to the system a little later (shardgate trims the allocator's
    // arenas every few seconds after connections left).
    let mut after = rss(pid);
    let trimmed = Instant::now();
    while after > baseline + RECOVERY_SLACK && trimmed.elapsed() < Duration::from_secs(15) {
        tokio::time::sleep(Duration::from_millis(500)).await;
        after = rss(pid);
    }
    let rss_back_secs = left_at.elapsed().as_secs_f64();
    // The figure reported: once more than a trim period later, so it is a settled one.
    tokio::time::sleep(Duration::from_millis(3500)).await;
    let after = rss(pid);
    stop_sampling.store(true, Ordering::Relaxed);
    sampling.join().unwrap();
    let n = (IDLE_HANDSHAKES + SLOW_PRODUCERS) as u64;
    eprintln!(
        "memory: budget {:.0} MiB, max frame {:.0} MiB; {IDLE_HANDSHAKES} idle TLS handshakes + {SLOW_PRODUCERS} slow 8 MiB produces ({reads} got their body but the tail out, {waits} budget waits ended) connected in {connected_secs:.1} s; \
         RSS baseline {:.1} MiB, peak {:.1} MiB over {} samples ({:.1} KiB per hostile connection above baseline + budget gauge peak), budget gauge peak {:.1} MiB; \
         TLS producer 2000 records acked {acked} in {hostile_secs:.1} s (control without hostile connections {control_secs:.1} s); \
         after they left: budget at 0 in {released_secs:.1} s, RSS within baseline + {:.0} MiB {rss_back_secs:.1} s after, {:.1} MiB 3.5 s later",
        mib(BUDGET),
        mib(MAX_FRAME),
        mib(baseline),
        mib(peak_rss),
        hostile.len(),
        (peak_rss.saturating_sub(baseline + peak_gauge)) as f64 / 1024.0 / n as f64,
        mib(peak_gauge),
        mib(RECOVERY_SLACK),
        mib(after),
    );
    // A sample takes 500 ms plus a scrape, longer on a loaded machine: judge the span.
    let span = match (hostile.first(), hostile.last()) {
        (Some(a), Some(b)) => b.at.duration_since(a.at),
        _ => Duration::ZERO,
    };
    assert!(
        span >= Duration::from_secs(9) && hostile.len() >= 10,
        "sampling covered {span:?} in {} samples, not 10 s",
        hostile.len()
    );
    assert_eq!(acked, 2000, "the TLS producer's records were not all acked");
    assert!(
        hostile_secs <= 60.0,
        "2000 records took {hostile_secs:.1} s beside the hostile connections"
    );
    // Only request and response bytes are charged; responses charged by force are the small
    // produce answers of the TLS producer.
    assert!(
        peak_gauge <= BUDGET,
        "budget gauge {:.1} MiB above the budget",
        mib(peak_gauge)
    );
    assert!(
        after <= baseline + RECOVERY_SLACK,
        "RSS {:.1} MiB after the hostile connections left, baseline {:.1} MiB",
        mib(after),
        mib(baseline)
    );
}

/// RSS allowed above the baseline once the hostile connections are gone.
const RECOVERY_SLACK: u64 = 32 * MIB;

/// An acks=1 Produce v9 request of `records` small records for partition 0 of `topic`.
fn produce_request(topic: &str, correlation_id: i32, records: usize) -> Vec<u8> {
    use kafka_protocol::messages::produce_request::{PartitionProduceData, TopicProduceData};
    use kafka_protocol::messages::{ApiKey, ProduceRequest, TopicName};
    use kafka_protocol::protocol::StrBytes;
    use kafka_protocol::records::{
        Compression, Record, RecordBatchEncoder, RecordEncodeOptions, TimestampType,
    };
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    let batch: Vec<Record> = (0..records)
        .map(|i| Record {
            transactional: false,
            control: false,
            delete_horizon: false,
            partition_leader_epoch: -1,
            producer_id: -1,
            producer_epoch: -1,
            timestamp_type: TimestampType::Creation,
            offset: i as i64,
            // The encoder starts a new batch wherever offset - sequence changes; Kafka takes
            // one batch per partition. Base sequence -1: no producer id.
            sequence: i as i32 - 1,
            timestamp: now,
            key: Some(bytes::Bytes::from(format!("k{correlation_id}-{i}"))),
            value: Some(bytes::Bytes::from(format!("v{correlation_id}-{i}"))),
            headers: Default::default(),
        })
        .collect();
    let mut buf = bytes::BytesMut::new();
    RecordBatchEncoder::encode(
        &mut buf,
        &batch,
        &RecordEncodeOptions {
            version: 2,
            compression: Compression::None,
        },
    )
    .unwrap();
    let req = ProduceRequest::default()
        .with_acks(1)
        .with_timeout_ms(30_000)
        .with_topic_data(vec![
            TopicProduceData::default()
                .with_name(TopicName(StrBytes::from_string(topic.to_string())))
                .with_partition_data(vec![
                    PartitionProduceData::default()
                        .with_index(0)
                        .with_records(Some(buf.freeze())),
                ]),
        ]);
    frame(ApiKey::Produce, 9, correlation_id, &req)
}

/// (correlation id, partition error code) of a Produce v9 response.
fn produce_answer(body: Vec<u8>) -> (i32, i16) {
    use kafka_protocol::messages::{ApiKey, ProduceResponse, ResponseHeader};
    use kafka_protocol::protocol::Decodable as _;
    let mut b = bytes::Bytes::from(body);
    let h = ResponseHeader::decode(&mut b, ApiKey::Produce.response_header_version(9)).unwrap();
    let r = ProduceResponse::decode(&mut b, 9).unwrap();
    (
        h.correlation_id,
        r.responses[0].partition_responses[0].error_code,
    )
}

/// A plain instance with the given drain timeout, a one-partition topic on broker `n` alone,
/// and a raw connection on which one record was produced (so shardgate knows the topic's
/// leader and has its upstream connection).
fn drain_setup(
    name: &str,
    client: &str,
    admin: &str,
    drain_ms: u64,
) -> (Shardgate, String, TcpStream, i32) {
    let sg = own_instance(
        name,
        client,
        admin,
        "",
        &format!("[limits]\ndrain_timeout_ms = {drain_ms}"),
    );
    let broker = brokers() as i32;
    let topic = unique(name);
    run_ok(
        Command::new(bin("kafka-topics")).args([
            "--bootstrap-server",
            &kafka(),
            "--create",
            "--topic",
            &topic,
            "--replica-assignment",
            &broker.to_string(),
        ]),
        Duration::from_secs(60),
    );
    let mut s = TcpStream::connect(client).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    // Until shardgate's topology has the new topic's leader.
    eventually("a first record produced", Duration::from_secs(30), || {
        s.write_all(&produce_request(&topic, 1, 1)).unwrap();
        let (_, code) = produce_answer(read_frame(&mut s).unwrap());
        code == 0 || {
            std::thread::sleep(Duration::from_millis(200));
            false
        }
    });
    (sg, topic, s, broker)
}

/// Sends `n` produce requests (correlation ids 10..) and waits until shardgate has read them.
fn send_while_paused(s: &mut TcpStream, topic: &str, admin: &str, n: i32) {
    let bytes_in = || metric_of(&format!("http://{admin}"), "shardgate_bytes_in_total", &[]);
    let before = bytes_in();
    let mut sent = 0;
    for c in 10..10 + n {
        let f = produce_request(topic, c, 3);
        sent += f.len();
        s.write_all(&f).unwrap();
    }
    eventually(
        "shardgate read the requests",
        Duration::from_secs(10),
        || bytes_in() >= before + sent as f64,
    );
}

/// SIGTERM while produce requests wait for a paused broker: no new connection is accepted,
/// every request already read is answered (successfully, once the broker resumes), then the
/// connection closes and the process exits with status 0; the records are in Kafka.
#[test]
#[ignore = "needs the testbed: integration/run-tests"]
fn sigterm_answers_what_was_read_before_exiting() {
    let (client, admin) = ("127.0.0.1:29182", "127.0.0.1:29282");
    let (mut sg, topic, mut s, broker) = drain_setup("drain", client, admin, 20_000);
    let frozen = Frozen::stop(Frozen::pid_of(&format!("kafka-{broker}.pid")));
    send_while_paused(&mut s, &topic, admin, 5);
    let term = Instant::now();
    assert_eq!(unsafe { libc::kill(sg.pid(), libc::SIGTERM) }, 0);
    eventually(
        "new connections refused after SIGTERM",
        Duration::from_secs(2),
        || {
            TcpStream::connect(client)
                .is_err_and(|e| e.kind() == std::io::ErrorKind::ConnectionRefused)
        },
    );
    let refused_after = term.elapsed();
    std::thread::sleep(Duration::from_secs(2).saturating_sub(term.elapsed()));
    // Nothing may be answered while the broker is paused: the answers must be Kafka's.
    s.set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    let mut probe = [0u8; 1];
    assert!(
        s.peek(&mut probe).is_err(),
        "shardgate answered before the broker resumed"
    );
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    drop(frozen);
    let resumed = Instant::now();
    for c in 10..15 {
        let (id, code) = produce_answer(read_frame(&mut s).expect("an answer after SIGTERM"));
        assert_eq!((id, code), (c, 0), "answer to produce {c}");
    }
    let answered = resumed.elapsed();
    let mut rest = Vec::new();
    s.read_to_end(&mut rest)
        .expect("the connection closes cleanly");
    assert!(
        rest.is_empty(),
        "{} bytes after the last answer",
        rest.len()
    );
    let status = sg
        .wait_exit(Duration::from_secs(10))
        .expect("shardgate exits once everything read is answered");
    let exited = term.elapsed();
    assert!(status.success(), "shardgate exited with {status}");
    use rdkafka::consumer::{BaseConsumer, Consumer};
    let c: BaseConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", kafka())
        .create()
        .unwrap();
    let (_, end) = c
        .fetch_watermarks(&topic, 0, Duration::from_secs(10))
        .unwrap();
    assert_eq!(end, 1 + 5 * 3, "records in Kafka");
    eprintln!(
        "drain: new connections refused {refused_after:?} after SIGTERM; broker resumed 2 s after it; 5 produces answered {answered:?} later, then EOF; exit status 0 {exited:?} after SIGTERM; end offset {end}"
    );
}

/// SIGTERM while the broker stays paused beyond `limits.drain_timeout_ms` (3 s): the process
/// exits after about 3 s anyway and the client sees its connection close without any part of
/// an answer.
#[test]
#[ignore = "needs the testbed: integration/run-tests"]
fn sigterm_exits_after_the_drain_timeout_when_upstream_does_not_answer() {
    let (client, admin) = ("127.0.0.1:29183", "127.0.0.1:29283");
    let (mut sg, topic, mut s, broker) = drain_setup("drain-timeout", client, admin, 3_000);
    let _frozen = Frozen::stop(Frozen::pid_of(&format!("kafka-{broker}.pid")));
    send_while_paused(&mut s, &topic, admin, 3);
    let term = Instant::now();
    assert_eq!(unsafe { libc::kill(sg.pid(), libc::SIGTERM) }, 0);
    let status = sg
        .wait_exit(Duration::from_secs(10))
        .expect("shardgate exits after the drain timeout");
    let exited = term.elapsed();
    let mut rest = Vec::new();
    let read = s.read_to_end(&mut rest);
    eprintln!(
        "drain timeout 3 s: exited {exited:?} after SIGTERM with {status}; client read {:?}, {} bytes",
        read.as_ref().map_err(|e| e.kind()),
        rest.len()
    );
    assert!(
        exited >= Duration::from_millis(2900) && exited < Duration::from_secs(5),
        "exit {exited:?} after SIGTERM, drain timeout 3 s"
    );
    assert!(status.success(), "shardgate exited with {status}");
    assert!(rest.is_empty(), "a partial answer: {} bytes", rest.len());
}

/// Bounded work: a fetch asking to wait i32::MAX ms for more bytes than will ever come keeps a
/// task busy only while its client is there. When the client disconnects, the request is
/// cancelled (`shardgate_requests_in_progress` falls back) instead of polling upstream for
/// the 24 days it asked for.
#[test]
#[ignore = "needs the testbed: integration/run-tests"]
fn a_fetch_whose_client_left_leaves_no_work() {
    use kafka_protocol::messages::fetch_request::{FetchPartition, FetchTopic};
    use kafka_protocol::messages::{ApiKey, FetchRequest, TopicName};
    let topic = unique("mem-longpoll");
    create_topic(&topic, 1);
    let in_progress = || metric("shardgate_requests_in_progress", &[]);
    let before = in_progress();
    let fetch = FetchRequest::default()
        .with_replica_id(kafka_protocol::messages::BrokerId(-1))
        .with_max_wait_ms(i32::MAX)
        .with_min_bytes(1 << 30)
        .with_max_bytes(1 << 20)
        .with_topics(vec![
            FetchTopic::default()
                .with_topic(TopicName(kafka_protocol::protocol::StrBytes::from_string(
                    topic.clone(),
                )))
                .with_partitions(vec![
                    FetchPartition::default()
                        .with_partition(0)
                        .with_fetch_offset(0)
                        .with_partition_max_bytes(1 << 20),
                ]),
        ]);
    let mut s = TcpStream::connect(proxy()).unwrap();
    s.write_all(&frame(ApiKey::Fetch, 12, 1, &fetch)).unwrap();
    eventually(
        "the long fetch is being worked on",
        Duration::from_secs(10),
        || in_progress() >= before + 1.0,
    );
    std::thread::sleep(Duration::from_secs(1));
    assert!(
        in_progress() >= before + 1.0,
        "the fetch must still be waiting for its bytes"
    );
    let left = Instant::now();
    drop(s);
    eventually(
        "the fetch of a client that left is cancelled",
        Duration::from_secs(5),
        || in_progress() <= before,
    );
    eprintln!(
        "a fetch with max_wait_ms = i32::MAX was cancelled {:?} after its client left",
        left.elapsed()
    );
}

/// The deadlines and the per-source limit, each provoked: a connection that never sends a
/// request is closed after `handshake_timeout_ms`, one whose request stops half-way after
/// `request_read_timeout_ms`, and a connection beyond `max_connections_per_source` at once;
/// each is counted. (The TLS handshake deadline shares the first of these settings.)
#[test]
#[ignore = "needs the testbed: integration/run-tests"]
fn silent_slow_and_excess_connections_are_closed() {
    let (client, admin) = ("127.0.0.1:29184", "127.0.0.1:29284");
    let _sg = own_instance(
        "deadlines",
        client,
        admin,
        "",
        "[limits]\nhandshake_timeout_ms = 1000\nrequest_read_timeout_ms = 1000\nmax_connections_per_source = 3",
    );
    let admin_url = format!("http://{admin}");
    let closed_reason = |r: &str| metric_of(&admin_url, "shardgate_connections_closed_total", &[r]);
    // Closed by shardgate: the read ends (EOF or reset) well before the test's own timeout.
    let closed_within = |s: &mut TcpStream, limit: Duration| {
        s.set_read_timeout(Some(limit)).unwrap();
        let started = Instant::now();
        let mut buf = [0u8; 16];
        let r = s.read(&mut buf);
        assert!(
            matches!(r, Ok(0))
                || matches!(&r, Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset),
            "expected the connection closed by shardgate, got {r:?}"
        );
        started.elapsed()
    };

    let silent_before = closed_reason("reason=\"no_first_request\"");
    let mut silent = TcpStream::connect(client).unwrap();
    let took = closed_within(&mut silent, Duration::from_secs(5));
    assert!(
        took < Duration::from_secs(3),
        "silent connection closed after {took:?}"
    );
    eventually("counted", Duration::from_secs(5), || {
        closed_reason("reason=\"no_first_request\"") > silent_before
    });

    let slow_before = closed_reason("reason=\"slow_request\"");
    let mut slow = TcpStream::connect(client).unwrap();
    // A 1,000-byte request of which only the size and 10 bytes ever come.
    slow.write_all(&1000u32.to_be_bytes()).unwrap();
    slow.write_all(&[0u8; 10]).unwrap();
    let took = closed_within(&mut slow, Duration::from_secs(5));
    assert!(
        took < Duration::from_secs(3),
        "slow request closed after {took:?}"
    );
    eventually("counted", Duration::from_secs(5), || {
        closed_reason("reason=\"slow_request\"") > slow_before
    });

    let rejected = || {
        metric_of(
            &admin_url,
            "shardgate_connections_rejected_total",
            &["reason=\"per_source\""],
        )
    };
    let before = rejected();
    // Three are allowed from 127.0.0.1 (silent: they stay open for the 1 s first-request
    // deadline, longer than this check takes).
    let open: Vec<TcpStream> = (0..3)
        .map(|_| TcpStream::connect(client).unwrap())
        .collect();
    std::thread::sleep(Duration::from_millis(200));
    let mut fourth = TcpStream::connect(client).unwrap();
    let took = closed_within(&mut fourth, Duration::from_secs(5));
    assert!(
        took < Duration::from_millis(900),
        "the fourth connection was served for {took:?}"
    );
    assert!(rejected() > before, "the refusal is counted");
    drop(open);
    eprintln!(
        "deadlines: silent connection and half-sent request closed after about 1 s each; the 4th connection from one address refused at once"
    );
}

//! Shared helpers for the integration tests. They run against the testbed that
//! `integration/run-tests` starts (real Kafka brokers and shardgate on fixed loopback ports);
//! every test is `#[ignore]`d so that a plain `cargo test` runs only the unit tests.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

pub fn var(name: &str, default: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| default.to_string())
}

/// Client address of shardgate.
pub fn proxy() -> String {
    var("SHARDGATE_BOOTSTRAP", "127.0.0.1:29092")
}

/// Direct address(es) of the Kafka brokers.
pub fn kafka() -> String {
    var("KAFKA_BOOTSTRAP", "127.0.0.1:19092")
}

pub fn admin() -> String {
    var("SHARDGATE_ADMIN", "http://127.0.0.1:29100")
}

pub fn cache() -> PathBuf {
    PathBuf::from(var(
        "SHARDGATE_CACHE",
        &format!("{}/.cache/shardgate", var("HOME", "/root")),
    ))
}

pub fn brokers() -> usize {
    kafka().split(',').count()
}

/// Replication factor for test topics: 3 on the 3-broker testbed.
pub fn rf() -> i32 {
    brokers().min(3) as i32
}

pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

pub fn bin(name: &str) -> PathBuf {
    cache().join("bin").join(name)
}

pub fn python() -> PathBuf {
    cache().join("venv/bin/python")
}

/// A topic or group name no earlier run used.
pub fn unique(prefix: &str) -> String {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!("{prefix}-{}", nanos % 1_000_000_000_000)
}

/// Runs a command to completion with a time limit; panics with its output on failure.
pub fn run(cmd: &mut Command, limit: Duration) -> Output {
    let desc = format!("{cmd:?}");
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {desc}: {e}"));
    let mut stdout = child.stdout.take().unwrap();
    let mut stderr = child.stderr.take().unwrap();
    let out_t = std::thread::spawn(move || {
        let mut b = Vec::new();
        let _ = stdout.read_to_end(&mut b);
        b
    });
    let err_t = std::thread::spawn(move || {
        let mut b = Vec::new();
        let _ = stderr.read_to_end(&mut b);
        b
    });
    let started = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if started.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "{desc} did not finish within {limit:?}; stderr:\n{}",
                String::from_utf8_lossy(&err_t.join().unwrap())
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Output {
        status,
        stdout: out_t.join().unwrap(),
        stderr: err_t.join().unwrap(),
    }
}

pub fn run_ok(cmd: &mut Command, limit: Duration) -> String {
    let desc = format!("{cmd:?}");
    let out = run(cmd, limit);
    assert!(
        out.status.success(),
        "{desc} failed ({}):\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// GET on the admin port, without an HTTP client dependency: status code and body.
pub fn http_get(path: &str) -> (u16, String) {
    let base = admin();
    let hostport = base.trim_start_matches("http://").trim_end_matches('/');
    http_get_at(hostport, path).expect("admin port reachable")
}

/// GET `path` from `hostport` (HTTP/1.0): status code and body; None when nothing listens.
pub fn http_get_at(hostport: &str, path: &str) -> Option<(u16, String)> {
    let mut s = TcpStream::connect(hostport).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(s, "GET {path} HTTP/1.0\r\nHost: {hostport}\r\n\r\n").unwrap();
    let mut resp = String::new();
    s.read_to_string(&mut resp).ok()?;
    let status = resp
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = resp
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Some((status, body))
}

/// Sum of a Prometheus counter/gauge over the series whose labels contain all `labels`
/// (e.g. `kind="too_large"`), on the testbed's instance.
pub fn metric(name: &str, labels: &[&str]) -> f64 {
    metric_of(&admin(), name, labels)
}

/// `metric` on the admin HTTP at `admin` (a URL); NaN when it does not answer.
pub fn metric_of(admin: &str, name: &str, labels: &[&str]) -> f64 {
    let Ok((_, body)) = shardgate::admin::http_request(admin, "GET", "/metrics", None) else {
        return f64::NAN;
    };
    body.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| {
            let series = l.split_whitespace().next().unwrap_or("");
            series.split('{').next() == Some(name) && labels.iter().all(|x| series.contains(x))
        })
        .filter_map(|l| l.split_whitespace().last()?.parse::<f64>().ok())
        .sum()
}

/// Waits until `f` holds, polling; panics with `what` after `limit`.
pub fn eventually(what: &str, limit: Duration, mut f: impl FnMut() -> bool) {
    let started = Instant::now();
    while !f() {
        assert!(started.elapsed() < limit, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Creates a topic through shardgate with the Java admin tool.
pub fn create_topic(topic: &str, partitions: i32) {
    run_ok(
        Command::new(bin("kafka-topics")).args([
            "--bootstrap-server",
            &proxy(),
            "--create",
            "--topic",
            topic,
            "--partitions",
            &partitions.to_string(),
            "--replication-factor",
            &rf().to_string(),
        ]),
        Duration::from_secs(60),
    );
}

/// Creates a topic straight in Kafka with the Java admin tool; `args` follow `--topic NAME`
/// (e.g. `--replica-assignment 1,2,3`, or `--partitions 3 --replication-factor 1`).
pub fn create_topic_direct(topic: &str, args: &[&str]) {
    let mut all = vec!["--bootstrap-server", "", "--create", "--topic", topic];
    let boot = kafka();
    all[1] = &boot;
    all.extend_from_slice(args);
    run_ok(
        Command::new(bin("kafka-topics")).args(all),
        Duration::from_secs(120),
    );
}

pub const CODECS: [&str; 5] = ["none", "gzip", "snappy", "lz4", "zstd"];

/// A shardgate process started by a test (beside the testbed's), killed when dropped.
pub struct Shardgate(std::process::Child);

impl Shardgate {
    pub fn pid(&self) -> i32 {
        self.0.id() as i32
    }

    /// Waits up to `limit` for the process to exit on its own: its status, or None.
    pub fn wait_exit(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        let started = Instant::now();
        loop {
            if let Some(s) = self.0.try_wait().unwrap() {
                return Some(s);
            }
            if started.elapsed() > limit {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// A process stopped with SIGSTOP, continued (SIGCONT) when dropped — also when the test
/// panics, so a shared testbed is never left with a frozen broker or instance.
pub struct Frozen(pub i32);

impl Frozen {
    pub fn stop(pid: i32) -> Self {
        assert_eq!(
            unsafe { libc::kill(pid, libc::SIGSTOP) },
            0,
            "kill -STOP {pid}"
        );
        Frozen(pid)
    }

    /// The pid in a testbed pid file under $SHARDGATE_CACHE/run (e.g. "kafka-3.pid").
    pub fn pid_of(file: &str) -> i32 {
        let path = cache().join("run").join(file);
        std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
            .trim()
            .parse()
            .unwrap()
    }
}

impl Drop for Frozen {
    fn drop(&mut self) {
        unsafe { libc::kill(self.0, libc::SIGCONT) };
    }
}

impl Drop for Shardgate {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Writes `config` to `dir/<name>.toml`, starts shardgate with it (log in `dir/<name>.log`) and
/// waits until `admin_url/readyz` answers 200.
pub fn start_shardgate(
    dir: &std::path::Path,
    name: &str,
    config: &str,
    admin_url: &str,
) -> Shardgate {
    let sg = spawn_shardgate(dir, name, config);
    eventually(&format!("{name} ready"), Duration::from_secs(60), || {
        shardgate::admin::http_request(admin_url, "GET", "/readyz", None)
            .is_ok_and(|(c, _)| c == 200)
    });
    sg
}

/// A shardgate of the test's own (embedded store under the run directory) in front of the
/// testbed's brokers, ready: `upstream` lines go into its `[upstream]` section, `extra` (whole
/// sections, e.g. `[limits]`) after the rest.
pub fn own_instance(
    name: &str,
    client: &str,
    admin: &str,
    upstream: &str,
    extra: &str,
) -> Shardgate {
    let bootstrap: Vec<String> = kafka().split(',').map(|b| format!("\"{b}\"")).collect();
    let config = format!(
        "[listener]\nbind = \"{client}\"\n\n[upstream]\nbootstrap = [{}]\n{upstream}\n\n[admin]\nbind = \"{admin}\"\n\n[store]\npath = \"{}\"\n\n{extra}\n",
        bootstrap.join(", "),
        cache().join(format!("run/{name}-store")).display(),
    );
    start_shardgate(
        &cache().join("run"),
        name,
        &config,
        &format!("http://{admin}"),
    )
}

/// Writes `config` to `dir/<name>.toml` and starts shardgate with it (log in
/// `dir/<name>.log`), without waiting for it to be ready.
pub fn spawn_shardgate(dir: &std::path::Path, name: &str, config: &str) -> Shardgate {
    std::fs::create_dir_all(dir).unwrap();
    let path = dir.join(format!("{name}.toml"));
    std::fs::write(&path, config).unwrap();
    let log = std::fs::File::create(dir.join(format!("{name}.log"))).unwrap();
    let bin = std::env::var("SHARDGATE_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|_| repo().join("target/debug/shardgate"));
    let child = Command::new(bin)
        .args(["run", "--config"])
        .arg(&path)
        .env("NO_COLOR", "1")
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    Shardgate(child)
}

/// A request frame (length prefix included) with client id "bad-input-test".
pub fn frame(
    api: kafka_protocol::messages::ApiKey,
    version: i16,
    correlation_id: i32,
    body: &impl kafka_protocol::protocol::Encodable,
) -> Vec<u8> {
    use kafka_protocol::protocol::Encodable as _;
    let header = kafka_protocol::messages::RequestHeader::default()
        .with_request_api_key(api as i16)
        .with_request_api_version(version)
        .with_correlation_id(correlation_id)
        .with_client_id(Some(kafka_protocol::protocol::StrBytes::from_static_str(
            "bad-input-test",
        )));
    let mut buf = bytes::BytesMut::new();
    header
        .encode(&mut buf, api.request_header_version(version))
        .unwrap();
    body.encode(&mut buf, version).unwrap();
    let mut out = (buf.len() as u32).to_be_bytes().to_vec();
    out.extend_from_slice(&buf);
    out
}

/// Reads one response frame (without its length prefix).
pub fn read_frame(s: &mut TcpStream) -> std::io::Result<Vec<u8>> {
    let mut len = [0u8; 4];
    s.read_exact(&mut len)?;
    let mut body = vec![0u8; u32::from_be_bytes(len) as usize];
    s.read_exact(&mut body)?;
    Ok(body)
}

/// One typed request on a fresh connection to `addr` (shardgate or a broker), its typed answer.
pub fn ask<Req, Resp>(
    addr: &str,
    api: kafka_protocol::messages::ApiKey,
    version: i16,
    req: &Req,
) -> Resp
where
    Req: kafka_protocol::protocol::Encodable,
    Resp: kafka_protocol::protocol::Decodable,
{
    use kafka_protocol::protocol::Decodable as _;
    let mut s = TcpStream::connect(addr).unwrap_or_else(|e| panic!("{addr}: {e}"));
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(&frame(api, version, 1, req)).unwrap();
    let mut b = bytes::Bytes::from(read_frame(&mut s).expect("an answer"));
    kafka_protocol::messages::ResponseHeader::decode(&mut b, api.response_header_version(version))
        .unwrap();
    Resp::decode(&mut b, version).unwrap()
}

/// POST to shardgate's admin API: (status, JSON body or the text as a JSON string).
pub fn admin_post(path: &str, body: &serde_json::Value) -> (u16, serde_json::Value) {
    let (code, text) =
        shardgate::admin::http_request(&admin(), "POST", path, Some(&body.to_string())).unwrap();
    (
        code,
        serde_json::from_str(&text).unwrap_or(serde_json::Value::String(text)),
    )
}

/// GET from shardgate's admin API.
pub fn admin_get(path: &str) -> (u16, serde_json::Value) {
    let (code, text) = shardgate::admin::http_request(&admin(), "GET", path, None).unwrap();
    (
        code,
        serde_json::from_str(&text).unwrap_or(serde_json::Value::String(text)),
    )
}

/// Produces keyed records whose values carry a per-key sequence number (`{prefix}{k}:{seq}`,
/// keys `{prefix}0..keys`), about 5 every 10 ms, until `stop`; the acknowledged values are
/// pushed to `acked` (in acknowledgement order). Returns when every send has been answered.
pub async fn produce_keyed_sequences(
    p: rdkafka::producer::FutureProducer,
    topic: &str,
    prefix: &str,
    keys: usize,
    stop: &std::sync::atomic::AtomicBool,
    acked: &std::sync::Arc<std::sync::Mutex<Vec<String>>>,
) {
    use std::sync::atomic::Ordering;
    let mut seq = vec![0u64; keys];
    let mut i = 0usize;
    let mut pending = Vec::new();
    while !stop.load(Ordering::SeqCst) {
        for _ in 0..5 {
            let k = i % keys;
            let key = format!("{prefix}{k}");
            let value = format!("{key}:{}", seq[k]);
            if let Ok(d) = p.send_result(
                rdkafka::producer::FutureRecord::to(topic)
                    .key(&key)
                    .payload(&value),
            ) {
                seq[k] += 1;
                i += 1;
                let acked = acked.clone();
                pending.push(tokio::spawn(async move {
                    if let Ok(Ok(_)) = d.await {
                        acked.lock().unwrap().push(value);
                    }
                }));
            }
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    for h in pending {
        let _ = h.await;
    }
}

/// Kafka's console consumer through shardgate in `group`: the next `n` records from the
/// group's commits (earliest without), one value per line; it commits what it read when it
/// exits. `extra`: more consumer properties.
pub fn java_consume(topic: &str, group: &str, n: usize, extra: &[&str]) -> Vec<String> {
    let out = run_ok(
        Command::new(bin("kafka-console-consumer"))
            .args([
                "--bootstrap-server",
                &proxy(),
                "--topic",
                topic,
                "--group",
                group,
                "--max-messages",
                &n.to_string(),
                "--timeout-ms",
                "60000",
                "--consumer-property",
                "auto.offset.reset=earliest",
            ])
            .args(extra.iter().flat_map(|p| ["--consumer-property", p])),
        Duration::from_secs(120),
    );
    out.lines().map(str::to_string).collect()
}

/// A shard map's active shards (`GET /api/v1/topics/{t}/shards`), in hash-range order.
#[allow(dead_code)]
pub fn active(map: &serde_json::Value) -> Vec<serde_json::Value> {
    let mut v: Vec<serde_json::Value> = map["shards"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| s["state"] == "active")
        .cloned()
        .collect();
    v.sort_by_key(|s| s["start"].as_str().unwrap().parse::<u128>().unwrap());
    v
}

/// A SASL credentials file at `path` for `users` (user, password), written by
/// `shardgate credentials USER [extra]` with each password on standard input (never on a
/// command line).
pub fn write_credentials(path: &std::path::Path, users: &[(&str, &str)], extra: &[&str]) {
    use std::io::Write as _;
    let bin = std::env::var("SHARDGATE_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|_| repo().join("target/debug/shardgate"));
    let mut text = String::new();
    for (user, pw) in users {
        let mut child = Command::new(&bin)
            .arg("credentials")
            .arg(user)
            .args(extra)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        writeln!(child.stdin.take().unwrap(), "{pw}").unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success(), "shardgate credentials {user}");
        text.push_str(&String::from_utf8(out.stdout).unwrap());
    }
    for (_, pw) in users {
        assert!(!text.contains(pw), "a password in the credentials file");
    }
    std::fs::write(path, text).unwrap();
}

/// One step of `integration/clients/py/kclient.py` with the client library `lib` ("confluent",
/// "kafka-python"), `sec` its security arguments, `password` given through the environment:
/// its JSON answer.
pub fn kclient(lib: &str, sec: &[&str], password: &str, args: &[&str]) -> serde_json::Value {
    let out = run(
        Command::new(python())
            .arg(repo().join("integration/clients/py/kclient.py"))
            .args(["--lib", lib])
            .args(sec)
            .args(args)
            .env("KCLIENT_PASSWORD", password),
        Duration::from_secs(120),
    );
    let text = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(text.trim()).unwrap_or_else(|e| {
        panic!(
            "kclient {args:?}: {e}: {text}; stderr {}",
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

/// A shardgate of the test's own whose upstream is the brokers' listeners at
/// `listener_base + n` (the testbed's SASL_SSL 19691, OAUTH 19891: TLS with the testbed CA),
/// logging in with `sasl` (the lines of `[upstream.sasl]`); client and admin at `ports`. Not
/// waited for: the caller checks readiness (or its absence).
pub fn upstream_login_instance(
    dir: &std::path::Path,
    name: &str,
    ports: (u16, u16),
    listener_base: u16,
    sasl: &str,
) -> (Shardgate, String, String) {
    let (client, admin) = (
        format!("127.0.0.1:{}", ports.0),
        format!("127.0.0.1:{}", ports.1),
    );
    let bootstrap: Vec<String> = (1..=brokers())
        .map(|i| format!("\"127.0.0.1:{}\"", listener_base as usize + i))
        .collect();
    // Metadata every second: the instance keeps using (and so replacing) its connections.
    let config = format!(
        "[listener]\nbind = \"{client}\"\n[upstream]\nbootstrap = [{}]\nconnect_timeout_ms = 3000\nmetadata_refresh_ms = 1000\n[upstream.tls]\nca = \"{}\"\n[upstream.sasl]\n{sasl}\n[admin]\nbind = \"{admin}\"\n[store]\npath = \"{}\"\n",
        bootstrap.join(", "),
        cache().join("run/tls/ca.pem").display(),
        dir.join(format!("data-{name}")).display()
    );
    let sg = spawn_shardgate(dir, name, &config);
    (sg, client, format!("http://{admin}"))
}

/// `count` records at `rate`/s from an idempotent confluent-kafka producer through `client`,
/// all acknowledged, then all consumed in a new group, each partition in the order produced.
pub fn produce_and_consume_in_order(client: &str, topic: &str, count: u64, rate: u64) {
    let p = kclient(
        "confluent",
        &[],
        "",
        &[
            "produce",
            "--brokers",
            client,
            "--topic",
            topic,
            "--count",
            &count.to_string(),
            "--rate",
            &rate.to_string(),
        ],
    );
    assert_eq!(p["acked"], count, "produce through {client}: {p}");
    assert_eq!(p["errors"], serde_json::json!([]), "{p}");
    let r = kclient(
        "confluent",
        &[],
        "",
        &[
            "consume",
            "--brokers",
            client,
            "--topic",
            topic,
            "--group",
            &unique("in-order-g"),
            "--count",
            &count.to_string(),
            "--timeout",
            "90",
        ],
    );
    assert_eq!(r["consumed"], count, "consume through {client}");
    let mut last: std::collections::HashMap<i64, i64> = Default::default();
    for rec in r["records"].as_array().unwrap() {
        let i: i64 = rec[1]
            .as_str()
            .unwrap()
            .trim_start_matches("v-")
            .parse()
            .unwrap();
        let part = rec[2].as_i64().unwrap();
        let prev = last.insert(part, i).unwrap_or(-1);
        assert!(i > prev, "partition {part}: v-{i} after v-{prev}");
    }
}

/// PLAIN by hand on a raw socket: (the answer's session lifetime, the socket).
pub fn raw_plain(addr: &str, user: &str, pw: &str) -> (i64, std::net::TcpStream) {
    use kafka_protocol::messages::{
        ApiKey, SaslAuthenticateRequest, SaslAuthenticateResponse, SaslHandshakeRequest,
    };
    use kafka_protocol::protocol::{Decodable as _, StrBytes};
    use std::io::Write as _;
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(&frame(
        ApiKey::SaslHandshake,
        1,
        1,
        &SaslHandshakeRequest::default().with_mechanism(StrBytes::from_static_str("PLAIN")),
    ))
    .unwrap();
    read_frame(&mut s).unwrap();
    let token = format!("\0{user}\0{pw}");
    s.write_all(&frame(
        ApiKey::SaslAuthenticate,
        1,
        2,
        &SaslAuthenticateRequest::default().with_auth_bytes(bytes::Bytes::from(token)),
    ))
    .unwrap();
    let mut b = bytes::Bytes::from(read_frame(&mut s).unwrap());
    kafka_protocol::messages::ResponseHeader::decode(
        &mut b,
        ApiKey::SaslAuthenticate.response_header_version(1),
    )
    .unwrap();
    let r = SaslAuthenticateResponse::decode(&mut b, 1).unwrap();
    assert_eq!(r.error_code, 0, "raw PLAIN: {:?}", r.error_message);
    (r.session_lifetime_ms, s)
}

/// One typed request on an open connection, its typed answer (None: the connection closed or
/// did not answer).
pub fn ask_on<Req, Resp>(
    s: &mut TcpStream,
    api: kafka_protocol::messages::ApiKey,
    version: i16,
    correlation_id: i32,
    req: &Req,
) -> Option<Resp>
where
    Req: kafka_protocol::protocol::Encodable,
    Resp: kafka_protocol::protocol::Decodable,
{
    use kafka_protocol::protocol::Decodable as _;
    s.write_all(&frame(api, version, correlation_id, req))
        .ok()?;
    let mut b = bytes::Bytes::from(read_frame(s).ok()?);
    kafka_protocol::messages::ResponseHeader::decode(&mut b, api.response_header_version(version))
        .unwrap();
    Some(Resp::decode(&mut b, version).unwrap())
}

/// A partition's (low, high) watermarks, asked of the brokers directly.
pub fn watermarks_direct(topic: &str, partition: i32) -> (i64, i64) {
    use rdkafka::consumer::{BaseConsumer, Consumer as _};
    let c: BaseConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", kafka())
        .create()
        .unwrap();
    c.fetch_watermarks(topic, partition, Duration::from_secs(10))
        .unwrap()
}

/// A Fetch v12 (topic names) of `parts` (partition, offset) of `topic`: each partition at most
/// `part_max` bytes, the whole answer `max_bytes`, max wait 500 ms, min bytes 1, no session.
pub fn fetch_v12(
    topic: &str,
    parts: &[(i32, i64)],
    part_max: i32,
    max_bytes: i32,
) -> kafka_protocol::messages::FetchRequest {
    use kafka_protocol::messages::fetch_request::{FetchPartition, FetchTopic};
    use kafka_protocol::messages::{BrokerId, FetchRequest, TopicName};
    FetchRequest::default()
        .with_replica_id(BrokerId(-1))
        .with_max_wait_ms(500)
        .with_min_bytes(1)
        .with_max_bytes(max_bytes)
        .with_session_id(0)
        .with_session_epoch(-1)
        .with_topics(vec![
            FetchTopic::default()
                .with_topic(TopicName(kafka_protocol::protocol::StrBytes::from_string(
                    topic.to_string(),
                )))
                .with_partitions(
                    parts
                        .iter()
                        .map(|&(p, offset)| {
                            FetchPartition::default()
                                .with_partition(p)
                                .with_fetch_offset(offset)
                                .with_partition_max_bytes(part_max)
                        })
                        .collect(),
                ),
        ])
}

/// Every value of `want` found in `topic` read straight from Kafka from the beginning (up
/// to 60 s).
pub fn read_values_direct(
    topic: &str,
    partitions: i32,
    want: &std::collections::HashSet<String>,
) -> std::collections::HashSet<String> {
    let c: rdkafka::consumer::BaseConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", kafka())
        .set("group.id", unique("direct-check"))
        .set("enable.auto.commit", "false")
        .create()
        .unwrap();
    let mut tpl = rdkafka::TopicPartitionList::new();
    for p in 0..partitions {
        tpl.add_partition_offset(topic, p, rdkafka::Offset::Beginning)
            .unwrap();
    }
    rdkafka::consumer::Consumer::assign(&c, &tpl).unwrap();
    let mut found = std::collections::HashSet::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while found.len() < want.len() && Instant::now() < deadline {
        if let Some(Ok(m)) = c.poll(Duration::from_millis(200))
            && let Some(v) = rdkafka::message::Message::payload(&m)
            && let Ok(s) = std::str::from_utf8(v)
            && want.contains(s)
        {
            found.insert(s.to_string());
        }
    }
    found
}

/// A consumer straight at Kafka (a group of its own, no commits), to check what shardgate
/// delivered against what Kafka holds.
pub fn direct_consumer() -> rdkafka::consumer::BaseConsumer {
    rdkafka::ClientConfig::new()
        .set("bootstrap.servers", kafka())
        .set("group.id", unique("direct-check"))
        .set("enable.auto.commit", "false")
        .create()
        .unwrap()
}

/// Kafka's own metadata of `topic` (asked of the brokers directly).
pub fn metadata_direct(topic: &str) -> rdkafka::metadata::Metadata {
    use rdkafka::consumer::{BaseConsumer, Consumer as _};
    let c: BaseConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", kafka())
        .create()
        .unwrap();
    c.fetch_metadata(Some(topic), Duration::from_secs(10))
        .unwrap()
}

/// Partition → (leader, replicas) of `topic`, from Kafka directly.
pub fn partition_layout(topic: &str) -> std::collections::BTreeMap<i32, (i32, Vec<i32>)> {
    metadata_direct(topic).topics()[0]
        .partitions()
        .iter()
        .map(|p| (p.id(), (p.leader(), p.replicas().to_vec())))
        .collect()
}

/// The leader (broker id) of each of the first `n` partitions of `topic`, from Kafka directly.
pub fn partition_leaders(topic: &str, n: usize) -> Vec<i32> {
    partition_layout(topic)
        .values()
        .take(n)
        .map(|(leader, _)| *leader)
        .collect()
}

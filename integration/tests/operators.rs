//! The operators' view. The Grafana dashboards (grafana/): the JSON is what
//! grafana/generate.py writes, panel ids
//! are unique, every query uses the provisioned Prometheus datasource, every variable is
//! defined and used, and every metric a query names is one shardgate exports. The check
//! against a real Prometheus (every expression parses and returns data from a shardgate
//! under load) is `every_dashboard_expression_returns_data_from_prometheus`. The docker
//! compose stack (docker/) is checked statically by docker/check.py.

mod common;

use std::collections::{BTreeSet, HashSet};
use std::process::Command;
use std::time::Duration;

use common::*;
use serde_json::Value;

const DASHBOARDS: [&str; 2] = ["shardgate-shards.json", "shardgate-proxy.json"];

fn dashboard(name: &str) -> Value {
    let path = repo().join("grafana/dashboards").join(name);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path:?}: {e}"));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{path:?} is not JSON: {e}"))
}

/// Every PromQL expression of a dashboard: panel targets, variable queries, annotations.
pub fn expressions(d: &Value) -> Vec<String> {
    let mut out = Vec::new();
    for p in d["panels"].as_array().unwrap() {
        for t in p["targets"].as_array().into_iter().flatten() {
            out.push(t["expr"].as_str().unwrap().to_string());
        }
    }
    for a in d["annotations"]["list"].as_array().into_iter().flatten() {
        out.push(a["expr"].as_str().unwrap().to_string());
    }
    out
}

/// `shardgate_*` names in a text (histogram series suffixes dropped).
fn metric_names(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut rest = text;
    while let Some(i) = rest.find("shardgate_") {
        let tail = &rest[i..];
        let end = tail
            .find(|c: char| !(c.is_ascii_lowercase() || c == '_'))
            .unwrap_or(tail.len());
        let name = &tail[..end];
        let base = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| name.strip_suffix(s))
            .unwrap_or(name);
        out.insert(base.to_string());
        rest = &tail[end..];
    }
    out
}

/// Metric names the source code records (`counter!`, `gauge!`, `histogram!`) or renders at
/// scrape time (the names a file writing `# TYPE` lines spells out).
fn exported() -> HashSet<String> {
    let mut out = HashSet::new();
    let mut dirs = vec![repo().join("src")];
    while let Some(dir) = dirs.pop() {
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                dirs.push(p);
            } else if p.extension().is_some_and(|x| x == "rs") {
                let text = std::fs::read_to_string(&p).unwrap();
                if text.contains("# TYPE {name}") {
                    for (i, _) in text.match_indices("\"shardgate_") {
                        let name = &text[i + 1..];
                        out.insert(name[..name.find('"').unwrap()].to_string());
                    }
                }
                for macro_ in ["counter!(", "gauge!(", "histogram!("] {
                    for (i, _) in text.match_indices(macro_) {
                        let after = text[i + macro_.len()..].trim_start();
                        if let Some(name) = after.strip_prefix('"') {
                            out.insert(name[..name.find('"').unwrap()].to_string());
                        }
                    }
                }
            }
        }
    }
    out
}

#[test]
fn the_committed_json_is_what_the_generator_writes() {
    let out = Command::new("python3")
        .arg(repo().join("grafana/generate.py"))
        .arg("--check")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
#[ignore = "needs the testbed's venv (PyYAML): integration/run-tests"]
fn the_docker_compose_stack_is_consistent_with_its_configs_and_the_readme() {
    let out = Command::new(python())
        .arg(repo().join("docker/check.py"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
#[ignore = "needs the testbed's promtool: integration/run-tests"]
fn the_alerting_rules_pass_promtool_and_name_only_exported_metrics() {
    let rules = repo().join("docker/alerts.yml");
    let out = run_ok(
        Command::new(cache().join("bin/promtool"))
            .arg("check")
            .arg("rules")
            .arg(&rules),
        Duration::from_secs(60),
    );
    assert!(out.contains("SUCCESS"), "{out}");
    let exported = exported();
    let text = std::fs::read_to_string(rules).unwrap();
    for m in metric_names(&text) {
        assert!(
            exported.contains(&m),
            "alerts.yml names {m}, which shardgate does not record"
        );
    }
}

#[test]
fn dashboards_are_consistent_and_name_only_exported_metrics() {
    let provisioned =
        std::fs::read_to_string(repo().join("grafana/provisioning/datasources/prometheus.yaml"))
            .unwrap();
    assert!(provisioned.contains("uid: prometheus"), "{provisioned}");
    let exported = exported();
    assert!(
        exported.len() > 50,
        "only {} metrics found in src",
        exported.len()
    );
    for name in DASHBOARDS {
        let d = dashboard(name);
        assert!(
            d["uid"].as_str().is_some_and(|u| !u.is_empty()),
            "{name}: no uid"
        );
        let panels = d["panels"].as_array().unwrap();
        let mut ids = HashSet::new();
        for p in panels {
            let id = p["id"]
                .as_u64()
                .unwrap_or_else(|| panic!("{name}: a panel without id"));
            assert!(ids.insert(id), "{name}: panel id {id} twice");
            if p["type"] == "row" {
                continue;
            }
            assert_eq!(
                p["datasource"]["uid"], "prometheus",
                "{name}: {}",
                p["title"]
            );
            let targets = p["targets"].as_array().unwrap();
            assert!(!targets.is_empty(), "{name}: {} has no query", p["title"]);
            for t in targets {
                assert_eq!(
                    t["datasource"]["uid"], "prometheus",
                    "{name}: {}",
                    p["title"]
                );
            }
            let g = &p["gridPos"];
            assert!(
                g["x"].as_u64().unwrap() + g["w"].as_u64().unwrap() <= 24,
                "{name}: {} is wider than the grid",
                p["title"]
            );
        }
        // Variables: each defined one is used, each used one is defined.
        let vars: Vec<&Value> = d["templating"]["list"].as_array().unwrap().iter().collect();
        let defined: HashSet<String> = vars
            .iter()
            .map(|v| v["name"].as_str().unwrap().to_string())
            .collect();
        let exprs = expressions(&d);
        let all = exprs.join("\n");
        for v in &defined {
            assert!(
                all.contains(&format!("${v}")),
                "{name}: variable {v} is never used"
            );
        }
        for (i, _) in all.match_indices('$') {
            let used: String = all[i + 1..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            assert!(
                used.starts_with("__") || defined.contains(&used),
                "{name}: ${used} is not a variable of the dashboard"
            );
        }
        for v in vars {
            assert_eq!(
                v["datasource"]["uid"], "prometheus",
                "{name}: variable {}",
                v["name"]
            );
            for m in metric_names(v["definition"].as_str().unwrap()) {
                assert!(exported.contains(&m), "{name}: variable query names {m}");
            }
        }
        for e in &exprs {
            let names = metric_names(e);
            assert!(!names.is_empty(), "{name}: {e} names no shardgate metric");
            for m in names {
                assert!(
                    exported.contains(&m),
                    "{name}: {m} (in {e}) is not a metric shardgate records"
                );
            }
        }
    }
}

/// A Prometheus process started by the test (the testbed installs the binary), killed when
/// dropped.
struct Prometheus(std::process::Child, std::path::PathBuf);

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
        let _ = std::fs::remove_dir_all(&self.1);
    }
}

const PROMETHEUS: &str = "127.0.0.1:29390";

fn start_prometheus() -> Prometheus {
    let target = admin().trim_start_matches("http://").to_string();
    start_prometheus_for(&target, &repo().join("docker/alerts.yml"))
}

/// Prometheus scraping one shardgate admin address every second, with `rules` loaded.
fn start_prometheus_for(target: &str, rules: &std::path::Path) -> Prometheus {
    let dir = cache().join(format!("run/prometheus-{}", unique("t")));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("prometheus.yml"),
        format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
             rule_files:\n  - {}\n\
             scrape_configs:\n  - job_name: shardgate\n    static_configs:\n      \
             - targets: ['{target}']\n",
            rules.display()
        ),
    )
    .unwrap();
    let log = std::fs::File::create(dir.join("prometheus.log")).unwrap();
    let child = Command::new(cache().join("bin/prometheus"))
        .arg(format!(
            "--config.file={}",
            dir.join("prometheus.yml").display()
        ))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.join("data").display()
        ))
        .arg(format!("--web.listen-address={PROMETHEUS}"))
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .expect("prometheus (integration/testbed install puts it in the cache)");
    let p = Prometheus(child, dir);
    eventually("prometheus ready", Duration::from_secs(30), || {
        http_get_at(PROMETHEUS, "/-/ready").is_some_and(|r| r.0 == 200)
    });
    p
}

fn query(expr: &str) -> Value {
    let mut q = String::new();
    for b in expr.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            q.push(b as char);
        } else {
            q.push_str(&format!("%{b:02X}"));
        }
    }
    let (status, body) =
        http_get_at(PROMETHEUS, &format!("/api/v1/query?query={q}")).expect("prometheus answers");
    serde_json::from_str(&body).unwrap_or_else(|e| panic!("{status} {body}: {e} ({expr})"))
}

/// A managed topic under load with a split and a merge, a consumer group, one malformed
/// frame: then every expression of both dashboards, evaluated by Prometheus scraping this
/// shardgate, parses and returns data.
#[test]
#[ignore = "needs the testbed: integration/run-tests"]
fn every_dashboard_expression_returns_data_from_prometheus() {
    use rdkafka::ClientConfig;
    use rdkafka::consumer::{BaseConsumer, Consumer};
    use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
    let _prometheus = start_prometheus();
    let topic = unique("dashboards");
    let (code, body) = admin_post(
        "/api/v1/topics",
        &serde_json::json!({
            "name": topic, "route_by": ["key"], "initial_shards": 2, "pool": 6,
            "replication_factor": rf(), "autoscale": {"enabled": false}
        }),
    );
    assert_eq!(code, 201, "{body}");
    let stop = std::sync::atomic::AtomicBool::new(false);
    std::thread::scope(|s| {
        s.spawn(|| {
            let p: BaseProducer = ClientConfig::new()
                .set("bootstrap.servers", proxy())
                .set("linger.ms", "5")
                .create()
                .unwrap();
            let mut i = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let key = format!("k{}", i % 50);
                let v = format!("{{\"type\":\"t{}\",\"n\":{i}}}", i % 3);
                let _ = p.send(BaseRecord::to(&topic).key(&key).payload(&v));
                p.poll(Duration::ZERO);
                i += 1;
                if i.is_multiple_of(200) {
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
            p.flush(Duration::from_secs(30)).unwrap();
        });
        s.spawn(|| {
            let c: BaseConsumer = ClientConfig::new()
                .set("bootstrap.servers", proxy())
                .set("group.id", unique("g-dashboards"))
                .set("auto.offset.reset", "earliest")
                .create()
                .unwrap();
            c.subscribe(&[&topic]).unwrap();
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let _ = c.poll(Duration::from_millis(100));
            }
        });
        // Load stops however this ends (else the scope would wait for it forever).
        struct Stop<'a>(&'a std::sync::atomic::AtomicBool);
        impl Drop for Stop<'_> {
            fn drop(&mut self) {
                self.0.store(true, std::sync::atomic::Ordering::Relaxed);
            }
        }
        let _stop = Stop(&stop);
        let ids = || -> Vec<u64> {
            let (_, map) = admin_get(&format!("/api/v1/topics/{topic}/shards"));
            active(&map)
                .iter()
                .map(|s| s["id"].as_u64().unwrap())
                .collect()
        };
        // Prometheus has seen the topic's split and merge counters at 0 (a counter first
        // seen at 1 shows no change, and the annotations look for changes).
        eventually(
            "the topic's counters scraped at 0",
            Duration::from_secs(30),
            || {
                [
                    "shardgate_shard_splits_total",
                    "shardgate_shard_merges_total",
                ]
                .iter()
                .all(|m| {
                    let r = query(&format!("{m}{{topic=\"{topic}\",reason=\"api\"}} == 0"));
                    r["data"]["result"]
                        .as_array()
                        .is_some_and(|a| !a.is_empty())
                })
            },
        );
        std::thread::sleep(Duration::from_secs(3));
        let (code, body) = admin_post(
            &format!("/api/v1/topics/{topic}/shards/{}/split", ids()[0]),
            &serde_json::json!({}),
        );
        assert_eq!(code, 200, "split: {body}");
        std::thread::sleep(Duration::from_secs(5));
        // Two shards next to each other in the hash space.
        let adjacent = ids();
        let (code, body) = admin_post(
            &format!("/api/v1/topics/{topic}/merge"),
            &serde_json::json!({"shards": [adjacent[0], adjacent[1]]}),
        );
        assert_eq!(code, 200, "merge: {body}");
        // A frame of an API that does not exist, and a Metadata request whose body does
        // not decode: frame and request errors.
        {
            use std::io::Write;
            let mut s = std::net::TcpStream::connect(proxy()).unwrap();
            let _ = s.write_all(&[0, 0, 0, 8, 0xff, 0xff, 0xff, 0xff, 0, 0, 0, 1]);
            let mut s = std::net::TcpStream::connect(proxy()).unwrap();
            let mut f = vec![0, 3, 0, 12, 0, 0, 0, 5, 0xff, 0xff, 0];
            f.extend_from_slice(&[0xff, 0xff, 0xff, 0xff, 0x0f, 1, 2, 3]);
            let mut out = (f.len() as u32).to_be_bytes().to_vec();
            out.extend_from_slice(&f);
            let _ = s.write_all(&out);
            std::thread::sleep(Duration::from_millis(200));
        }
        std::thread::sleep(Duration::from_secs(15));
    });
    let mut empty = Vec::new();
    let mut checked = 0;
    for name in DASHBOARDS {
        let d = dashboard(name);
        let mut exprs = expressions(&d);
        for v in d["templating"]["list"].as_array().unwrap() {
            // label_values(m, l) is Grafana's, not PromQL: its series must exist.
            let def = v["definition"].as_str().unwrap();
            let inner = def
                .trim_start_matches("label_values(")
                .split(',')
                .next()
                .unwrap()
                .to_string();
            exprs.push(inner);
        }
        for e in exprs {
            let q = e.replace("$topic", &topic).replace("$instance", ".*");
            let r = query(&q);
            assert_eq!(r["status"], "success", "{name}: {q} did not evaluate: {r}");
            checked += 1;
            if r["data"]["result"].as_array().is_none_or(|a| a.is_empty()) {
                empty.push(format!("{name}: {q}"));
            }
        }
    }
    // The alerting rules were loaded and evaluate without error.
    let (_, body) = http_get_at(PROMETHEUS, "/api/v1/rules").expect("prometheus answers");
    let rules: Value = serde_json::from_str(&body).unwrap();
    let loaded: Vec<&Value> = rules["data"]["groups"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|g| g["rules"].as_array().unwrap())
        .collect();
    assert_eq!(loaded.len(), 9, "{body}");
    for r in &loaded {
        assert_eq!(
            r["health"], "ok",
            "rule {} evaluates with an error: {r}",
            r["name"]
        );
    }
    assert!(
        empty.is_empty(),
        "{} of {checked} expressions returned no data:\n{}",
        empty.len(),
        empty.join("\n")
    );
    eprintln!("{checked} dashboard expressions evaluated by Prometheus, all with data");
    // Per-shard gauges name active shards only: the split's and the merge's sealed shards
    // left the output (recorded gauges would keep their last values forever).
    let (_, map) = admin_get(&format!("/api/v1/topics/{topic}/shards"));
    let active_ids: BTreeSet<String> = active(&map)
        .iter()
        .map(|s| s["id"].as_u64().unwrap().to_string())
        .collect();
    let (_, text) = http_get_at(admin().trim_start_matches("http://"), "/metrics").unwrap();
    let shown: BTreeSet<String> = text
        .lines()
        .filter(|l| {
            l.starts_with("shardgate_shard_range_start_fraction{")
                && l.contains(&format!("topic=\"{topic}\""))
        })
        .map(|l| {
            l.split("shard=\"")
                .nth(1)
                .unwrap()
                .split('"')
                .next()
                .unwrap()
                .to_string()
        })
        .collect();
    assert_eq!(shown, active_ids, "range gauges vs active shards:\n{text}");
}

/// An admin API call to `base` (`http://host:port`): the status and the JSON body (Null when
/// the body is not JSON).
fn call_at(base: &str, method: &str, path: &str, body: Value) -> (u16, Value) {
    let text = (!body.is_null()).then(|| body.to_string());
    let (code, text) = shardgate::admin::http_request(base, method, path, text.as_deref()).unwrap();
    (code, serde_json::from_str(&text).unwrap_or(Value::Null))
}

/// Creates the managed topic `topic` (routed by key) through the admin API at `base`.
fn create_managed_at(base: &str, topic: &str, shards: u32, pool: u32, autoscale: Value) {
    let (code, body) = call_at(
        base,
        "POST",
        "/api/v1/topics",
        serde_json::json!({
            "name": topic, "route_by": ["key"], "initial_shards": shards, "pool": pool,
            "replication_factor": rf(), "autoscale": autoscale
        }),
    );
    assert_eq!(code, 201, "creating {topic}: {body}");
}

/// The active shards of `topic` as the admin API at `base` lists them.
fn active_at(base: &str, topic: &str) -> Vec<Value> {
    let (code, map) = call_at(
        base,
        "GET",
        &format!("/api/v1/topics/{topic}/shards"),
        Value::Null,
    );
    assert_eq!(code, 200, "{map}");
    active(&map)
}

/// Producers writing to topics through a bootstrap address (one thread each; key `key(i)` for
/// the i-th record, a pause after each) until dropped.
struct Load {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Load {
    fn start(
        bootstrap: &str,
        topics: &[&str],
        settings: &[(&str, &str)],
        key: fn(u64) -> String,
        pause: Duration,
    ) -> Load {
        use rdkafka::ClientConfig;
        use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let threads = topics
            .iter()
            .map(|t| {
                let mut config = ClientConfig::new();
                config
                    .set("bootstrap.servers", bootstrap)
                    .set("linger.ms", "5");
                for (k, v) in settings {
                    config.set(*k, *v);
                }
                let (stop, topic) = (stop.clone(), t.to_string());
                std::thread::spawn(move || {
                    let p: BaseProducer = config.create().unwrap();
                    let mut i = 0u64;
                    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                        let v = format!("{{\"type\":\"t{}\",\"n\":{i}}}", i % 3);
                        let _ = p.send(BaseRecord::to(&topic).key(&key(i)).payload(&v));
                        p.poll(Duration::ZERO);
                        i += 1;
                        std::thread::sleep(pause);
                    }
                    let _ = p.flush(Duration::from_secs(30));
                })
            })
            .collect();
        Load { stop, threads }
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// (id, start, end, partition) of each active shard, in hash order.
fn shard_tuples(shards: &[Value]) -> Vec<(u64, String, String, i64)> {
    let mut v: Vec<_> = shards
        .iter()
        .filter(|s| s["state"] == "active")
        .map(|s| {
            (
                s["id"].as_u64().unwrap(),
                s["start"].as_str().unwrap().to_string(),
                s["end"].as_str().unwrap().to_string(),
                s["partition"].as_i64().unwrap(),
            )
        })
        .collect();
    v.sort_by_key(|t| t.1.parse::<u128>().unwrap());
    v
}

/// The shard page at the admin root, in headless Chromium (Debian's package) driven by
/// playwright-core (integration/clients/browser/shard_page.cjs): it draws exactly the active
/// shards `GET /api/v1/topics/{t}/shards` returns, and after a split it redraws itself (no
/// reload) with the new ones. The screenshot stays in $SHARDGATE_CACHE/artifacts.
#[test]
#[ignore = "needs the testbed (Chromium, playwright-core): integration/run-tests"]
fn the_shard_page_draws_the_shards_the_api_has_before_and_after_a_split() {
    use std::io::{BufRead, Write};
    use std::process::Stdio;
    use std::sync::mpsc;
    let topic = unique("page");
    create_managed_at(
        &admin(),
        &topic,
        2,
        6,
        serde_json::json!({"enabled": false}),
    );
    let api = || shard_tuples(&active_at(&admin(), &topic));
    // Load, uneven over the hash space, so the page has rates to colour; a group reads part
    // of the topic, commits and leaves, so the split's gate stays closed for it.
    let skewed = |i: u64| format!("k{}", if i.is_multiple_of(3) { i % 40 } else { i % 4 });
    let load = Load::start(&proxy(), &[&topic], &[], skewed, Duration::from_millis(2));
    consume_commit_and_leave(&proxy(), &topic, &unique("g-page"), 100);
    // The autoscaler's samples (every 2 s by default) give the page its rates.
    std::thread::sleep(Duration::from_secs(5));
    let artifacts = cache().join("artifacts");
    std::fs::create_dir_all(&artifacts).unwrap();
    let shot = artifacts.join("shard-page.png");
    let _ = std::fs::remove_file(&shot);
    let mut node = Command::new("node")
        .arg(repo().join("integration/clients/browser/shard_page.cjs"))
        .args([&admin(), &topic, shot.to_str().unwrap()])
        .env(
            "PLAYWRIGHT_CORE",
            cache().join("node/node_modules/playwright-core"),
        )
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("node (integration/testbed install puts playwright-core in the cache)");
    struct Kill(std::process::Child);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let stdout = node.stdout.take().unwrap();
    let mut stdin = node.stdin.take().unwrap();
    let mut node = Kill(node);
    let (tx, rx) = mpsc::channel::<String>();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut errors = Vec::new();
    let mut next_shards = || -> Vec<(u64, String, String, i64)> {
        loop {
            let line = rx
                .recv_timeout(Duration::from_secs(60))
                .expect("the page driver prints the shards it sees within 60 s");
            if let Some(e) = line.strip_prefix("PAGE_ERRORS ") {
                errors.push(e.to_string());
            } else if let Some(j) = line.strip_prefix("SHARDS ") {
                let shown: Vec<Value> = serde_json::from_str(j).unwrap();
                return shard_tuples(&shown);
            }
        }
    };
    let before = next_shards();
    assert_eq!(before.len(), 2, "{before:?}");
    assert_eq!(before, api(), "the page draws the API's shards");
    let (code, body) = admin_post(
        &format!("/api/v1/topics/{topic}/shards/{}/split", before[0].0),
        &serde_json::json!({}),
    );
    assert_eq!(code, 200, "split: {body}");
    writeln!(stdin, "split").unwrap();
    let after = next_shards();
    assert_eq!(after.len(), 3, "{after:?}");
    assert_eq!(
        after,
        api(),
        "after the split the page draws the API's new shards"
    );
    let status = loop {
        if let Some(s) = node.0.try_wait().unwrap() {
            break s;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(status.success(), "page driver: {status}");
    let size = std::fs::metadata(&shot).map(|m| m.len()).unwrap_or(0);
    assert!(size > 10_000, "screenshot {shot:?}: {size} bytes");
    while let Ok(line) = rx.try_recv() {
        if let Some(e) = line.strip_prefix("PAGE_ERRORS ") {
            errors.push(e.to_string());
        }
    }
    assert!(errors.is_empty(), "the page logged errors: {errors:?}");
    drop(load);
    eprintln!("shard page: {before:?} -> {after:?}; screenshot {shot:?}");
}

/// Names of the alerts Prometheus reports firing.
fn firing() -> BTreeSet<String> {
    let Some((_, body)) = http_get_at(PROMETHEUS, "/api/v1/alerts") else {
        return BTreeSet::new();
    };
    let v: Value = serde_json::from_str(&body).unwrap_or_default();
    v["data"]["alerts"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|a| a["state"] == "firing")
        .map(|a| a["labels"]["alertname"].as_str().unwrap_or("").to_string())
        .collect()
}

/// A consumer group that reads at least `n` records of `topic` through `bootstrap`, commits
/// and leaves: its committed offsets stay where it stopped.
fn consume_commit_and_leave(bootstrap: &str, topic: &str, group: &str, n: usize) {
    use rdkafka::ClientConfig;
    use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
    let c: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", group)
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        .create()
        .unwrap();
    c.subscribe(&[topic]).unwrap();
    let started = std::time::Instant::now();
    let mut got = 0;
    while got < n {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "group {group} read {got} of {n} records of {topic} in 60 s"
        );
        if let Some(Ok(_)) = c.poll(Duration::from_millis(200)) {
            got += 1;
        }
    }
    c.commit_consumer_state(CommitMode::Sync).unwrap();
    c.unsubscribe();
}

/// The alerting rules of docker/alerts.yml, loaded with every `for:` cut to 1 s, fire when
/// their faults happen: an ordering gate holding a group (it read part of a topic, committed
/// and left; then the shard split), the shard-map store unreachable (Consul stopped), upstream
/// errors (the broker holding a topic paused with `kill -STOP`, 6 s at a time, while clients
/// produce to it), a hot shard at max_shards, and an instance configured but missing from the
/// registry. All of it on an instance of the test's own (Consul store), which Prometheus
/// scrapes.
#[test]
#[ignore = "needs the testbed with Consul: integration/run-tests"]
fn alerts_fire_for_a_held_gate_a_dead_store_upstream_errors_a_blocked_split_and_a_missing_instance()
{
    let consul = std::env::var("CONSUL_HTTP_ADDR")
        .expect("CONSUL_HTTP_ADDR: start the testbed with --consul (integration/run-tests does)");
    let (client, admin_addr) = ("127.0.0.1:29197", "127.0.0.1:29297");
    let bootstrap: Vec<String> = kafka().split(',').map(|b| format!("\"{b}\"")).collect();
    // Instance 2 is configured and never started: the registry lists instance 1 only. Short
    // upstream timeouts make a paused broker's errors come quickly.
    let config = format!(
        r#"
[listener]
bind = "{client}"
node_id = 1

[[instances]]
node_id = 1
advertised = "{client}"

[[instances]]
node_id = 2
advertised = "127.0.0.1:29198"

[upstream]
bootstrap = [{bootstrap}]
request_timeout_ms = 300
connect_timeout_ms = 300

[admin]
bind = "{admin_addr}"

[store]
kind = "consul"
consul_addr = "{consul}"
cluster = "{cluster}"
"#,
        bootstrap = bootstrap.join(", "),
        cluster = unique("alerts"),
    );
    let admin_url = format!("http://{admin_addr}");
    let _sg = start_shardgate(&cache().join("run"), "alerts", &config, &admin_url);
    let mut cut = 0;
    let rules_text: String = std::fs::read_to_string(repo().join("docker/alerts.yml"))
        .unwrap()
        .lines()
        .map(|l| {
            if l.trim_start().starts_with("for: ") {
                cut += 1;
                format!("{}for: 1s\n", &l[..l.len() - l.trim_start().len()])
            } else {
                format!("{l}\n")
            }
        })
        .collect();
    assert_eq!(cut, 9, "every rule has a for: duration");
    let rules = cache().join(format!("run/{}.yml", unique("alerts-rules")));
    std::fs::write(&rules, rules_text).unwrap();
    let _prometheus = start_prometheus_for(admin_addr, &rules);
    // The sum over a metric's series on this instance.
    let metric = |name: &str| -> Option<f64> {
        let (_, text) = shardgate::admin::http_request(&admin_url, "GET", "/metrics", None).ok()?;
        let values: Vec<f64> = text
            .lines()
            .filter(|l| {
                l.starts_with(name) && matches!(l.as_bytes().get(name.len()), Some(b' ' | b'{'))
            })
            .filter_map(|l| l.rsplit(' ').next()?.parse().ok())
            .collect();
        (!values.is_empty()).then(|| values.iter().sum())
    };
    eventually(
        "the registry's view (1 live of 2 configured)",
        Duration::from_secs(30),
        || metric("shardgate_instances_live") == Some(1.0),
    );
    // A hot shard that may not split: max_shards 1, threshold 20 records/s.
    let hot = unique("alerts-hot");
    let autoscale = serde_json::json!({"enabled": true, "split_records_per_sec": 20.0,
        "sustain_secs": 2, "max_shards": 1, "sample_interval_ms": 500});
    create_managed_at(&admin_url, &hot, 1, 2, autoscale);
    // The gate's topic: a group reads part of it, commits, leaves; then a split.
    let gated = unique("alerts-gate");
    create_managed_at(
        &admin_url,
        &gated,
        1,
        4,
        serde_json::json!({"enabled": false}),
    );
    // Upstream errors: a plain topic whose partitions all live on the last broker, and eight
    // producers to it: each of their upstream requests times out or is cut with its socket
    // (the rule wants more than 0.1 errors/s over 5 min).
    let b = brokers();
    let paused_topic = unique("alerts-paused");
    create_topic_direct(
        &paused_topic,
        &["--replica-assignment", &vec![b.to_string(); 3].join(",")],
    );
    let mut topics = vec![hot.as_str(), gated.as_str()];
    topics.extend(std::iter::repeat_n(paused_topic.as_str(), 8));
    let by_40 = |i: u64| format!("k{}", i % 40);
    let retry_fast = [
        ("message.timeout.ms", "60000"),
        ("reconnect.backoff.max.ms", "200"),
    ];
    let _load = Load::start(
        client,
        &topics,
        &retry_fast,
        by_40,
        Duration::from_millis(5),
    );
    consume_commit_and_leave(client, &gated, &unique("g-alerts"), 100);
    std::thread::sleep(Duration::from_secs(2));
    let id = active_at(&admin_url, &gated)[0]["id"].as_u64().unwrap();
    let split = format!("/api/v1/topics/{gated}/shards/{id}/split");
    let (code, body) = call_at(&admin_url, "POST", &split, serde_json::json!({}));
    // This instance's 300 ms request timeout also bounds the wait for produces of the old
    // epoch (acks=all over 3 replicas may take longer): the split is then made and its seal
    // finished later, which is fine here (an unsealed gate is closed too).
    assert!(
        code == 200 || body.to_string().contains("seal is retried later"),
        "split: {code} {body}"
    );
    eventually("the split in the map", Duration::from_secs(30), || {
        active_at(&admin_url, &gated).len() == 2
    });
    // The broker of `paused_topic` stops answering for 6 s at a time (under KRaft's broker
    // session timeout, so nothing fails over): every produce to it times out. Until the
    // errors exceed what the rule needs (30), at most 8 times.
    let mut pauses = 0;
    while pauses < 8 && metric("shardgate_upstream_errors_total").unwrap_or(0.0) < 40.0 {
        let frozen = Frozen::stop(Frozen::pid_of(&format!("kafka-{b}.pid")));
        std::thread::sleep(Duration::from_secs(6));
        drop(frozen);
        pauses += 1;
        std::thread::sleep(Duration::from_secs(3));
    }
    // The store: Consul stopped until the store alert fires.
    let status = Command::new(repo().join("integration/testbed"))
        .arg("stop-consul")
        .status()
        .unwrap();
    assert!(status.success());
    struct Restart;
    impl Drop for Restart {
        fn drop(&mut self) {
            let _ = Command::new(repo().join("integration/testbed"))
                .arg("start-consul")
                .status();
        }
    }
    let _restart = Restart;
    let want: BTreeSet<String> = [
        "ShardgateGateClosedLong",
        "ShardgateStoreErrors",
        "ShardgateUpstreamErrors",
        "ShardgateSplitBlocked",
        "ShardgateInstanceMissing",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let started = std::time::Instant::now();
    let mut seen = BTreeSet::new();
    while !want.is_subset(&seen) && started.elapsed() < Duration::from_secs(60) {
        seen.extend(firing());
        std::thread::sleep(Duration::from_millis(500));
    }
    let missing: Vec<_> = want.difference(&seen).collect();
    let (upstream, store) = (
        metric("shardgate_upstream_errors_total"),
        metric("shardgate_store_errors_total"),
    );
    assert!(
        missing.is_empty(),
        "alerts not seen firing: {missing:?} (firing: {seen:?}; upstream errors {upstream:?} after {pauses} pauses, store errors {store:?})",
    );
    eprintln!(
        "firing within {:.1} s of Consul stopping: {seen:?} (upstream errors {upstream:?} after {pauses} pauses, store errors {store:?})",
        started.elapsed().as_secs_f64(),
    );
    let _ = std::fs::remove_file(&rules);
}

/// With `[log] format = "json"` every line shardgate writes is one JSON object, and each
/// split, merge and gate decision is one line with its reason: a group reads part of a
/// managed topic, commits and leaves; the shard splits (reason `api`); the group comes back:
/// the new partition is held (`behind_seal`) until it has read its old partition past the
/// seal, then opened (`passed`, or `fallback`); two shards merge (`api`).
#[test]
#[ignore = "needs the testbed: integration/run-tests"]
fn json_logs_have_one_line_per_split_merge_and_gate_decision_with_its_reason() {
    use rdkafka::ClientConfig;
    use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
    let (client, admin_addr) = ("127.0.0.1:29196", "127.0.0.1:29296");
    let sg = own_instance(
        "jsonlogs",
        client,
        admin_addr,
        "",
        "[log]\nformat = \"json\"\n",
    );
    let admin_url = format!("http://{admin_addr}");
    let topic = unique("jsonlogs");
    create_managed_at(
        &admin_url,
        &topic,
        2,
        6,
        serde_json::json!({"enabled": false}),
    );
    let produce = |from: u64, n: u64| {
        let p: BaseProducer = ClientConfig::new()
            .set("bootstrap.servers", client)
            .create()
            .unwrap();
        for i in from..from + n {
            let key = format!("k{}", i % 30);
            p.send(BaseRecord::to(&topic).key(&key).payload(&i.to_string()))
                .unwrap();
            p.poll(Duration::ZERO);
        }
        p.flush(Duration::from_secs(30)).unwrap();
    };
    produce(0, 600);
    let group = unique("g-jsonlogs");
    consume_commit_and_leave(client, &topic, &group, 100);
    let first = active_at(&admin_url, &topic)[0]["id"].as_u64().unwrap();
    let split = format!("/api/v1/topics/{topic}/shards/{first}/split");
    let (code, body) = call_at(&admin_url, "POST", &split, serde_json::json!({}));
    assert_eq!(code, 200, "split: {body}");
    produce(600, 300);
    // The group is back and reads everything left (800 records).
    consume_commit_and_leave(client, &topic, &group, 800);
    let ids: Vec<u64> = active_at(&admin_url, &topic)
        .iter()
        .map(|s| s["id"].as_u64().unwrap())
        .collect();
    let merge = format!("/api/v1/topics/{topic}/merge");
    let (code, body) = call_at(
        &admin_url,
        "POST",
        &merge,
        serde_json::json!({"shards": [ids[0], ids[1]]}),
    );
    assert_eq!(code, 200, "merge: {body}");
    drop(sg);
    let log = std::fs::read_to_string(cache().join("run/jsonlogs.log")).unwrap();
    let mut lines = Vec::new();
    for l in log.lines().filter(|l| !l.trim().is_empty()) {
        let v: Value =
            serde_json::from_str(l).unwrap_or_else(|e| panic!("a log line is not JSON ({e}): {l}"));
        assert!(
            v["timestamp"].is_string() && v["level"].is_string() && v["message"].is_string(),
            "{l}"
        );
        lines.push(v);
    }
    let find = |message: &str, reasons: &[&str]| {
        lines.iter().any(|v| {
            v["message"] == message
                && reasons.iter().any(|r| v["reason"] == *r)
                && v["topic"].as_str() == Some(topic.as_str())
        })
    };
    // The group commits only when it is done, so its gate opens either when that commit
    // passes the seal or, held since the split for gate_fallback_secs (30 s), by its fetch
    // positions.
    let decisions: [(&str, &[&str]); 4] = [
        ("shard split", &["api"]),
        ("gate holds a consumer", &["behind_seal"]),
        ("gate opened", &["passed", "fallback"]),
        ("shards merged", &["api"]),
    ];
    for (message, reasons) in decisions {
        assert!(
            find(message, reasons),
            "no JSON line {message:?} with reason in {reasons:?} for {topic}; lines:\n{log}"
        );
    }
    eprintln!(
        "{} JSON log lines; decisions found: {decisions:?}",
        lines.len()
    );
}

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

/// Metric names the source code records (`counter!`, `gauge!`, `histogram!`).
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
    let dir = cache().join(format!("run/prometheus-{}", unique("t")));
    std::fs::create_dir_all(&dir).unwrap();
    let target = admin().trim_start_matches("http://").to_string();
    std::fs::write(
        dir.join("prometheus.yml"),
        format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n\
             rule_files:\n  - {}\n\
             scrape_configs:\n  - job_name: shardgate\n    static_configs:\n      \
             - targets: ['{target}']\n",
            repo().join("docker/alerts.yml").display()
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
    assert_eq!(loaded.len(), 8, "{body}");
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
}

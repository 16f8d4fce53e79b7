//! Admin HTTP: health, readiness, Prometheus metrics, the shard-map API and the shard page
//! (`/`, `shard_page.html`: plain HTML and JS, no external resources) on one port.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::json;

use metrics_exporter_prometheus::PrometheusHandle;

use crate::config::{Settings, TopicConfig};
use crate::shards::controller::{ControlError, Controller, ShardLoad};
use crate::shards::gates::GroupTracker;
use crate::shards::registry::Registry;
use crate::shards::{HASH_END, ShardMap};
use crate::upstream::topology::TopologyHandle;

mod auth;
mod placement;
mod serve;

pub use serve::serve;

/// What the admin API reads and drives.
#[derive(Clone)]
pub struct AdminState {
    pub settings: Settings,
    pub topology: Arc<TopologyHandle>,
    pub shards: Arc<Registry>,
    pub groups: Arc<GroupTracker>,
    pub profiles: Arc<crate::prefetch::Profiles>,
    pub controller: Arc<Controller>,
    pub prometheus: PrometheusHandle,
    /// Whom to trust when forwarding to the leader's admin API over HTTPS (`[admin.tls]`).
    pub forward_trust: Option<crate::http::Trust>,
}

pub fn router(state: AdminState) -> Router {
    Router::new()
        .route("/", get(shard_page))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/api/v1/topics", get(list_topics).post(create_topic))
        .route("/api/v1/topics/{topic}/shards", get(get_shards))
        .route("/api/v1/topics/{topic}/load", get(get_load))
        .route("/api/v1/topics/{topic}/shards/{id}/split", post(split))
        .route("/api/v1/topics/{topic}/merge", post(merge))
        .route(
            "/api/v1/topics/{topic}/placement",
            get(placement::get_placement),
        )
        .route(
            "/api/v1/topics/{topic}/placement/moves",
            post(placement::post_move),
        )
        .route(
            "/api/v1/topics/{topic}/placement/moves/{partition}",
            axum::routing::delete(placement::delete_move),
        )
        .route("/api/v1/consumers", get(consumers))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            auth::require,
        ))
        .with_state(state)
}

/// Ready when a full upstream topology refresh succeeded recently.
async fn readyz(State(s): State<AdminState>) -> (StatusCode, String) {
    if !s.shards.loaded() {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: shard maps not loaded yet\n".to_string(),
        );
    }
    let topo = s.topology.load();
    let fresh_for = Duration::from_millis(s.settings.raw.upstream.metadata_refresh_ms * 3);
    match topo.refreshed_at {
        Some(t) if t.elapsed() <= fresh_for && !topo.brokers.is_empty() => (
            StatusCode::OK,
            format!("ready: {} upstream brokers\n", topo.brokers.len()),
        ),
        Some(t) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "not ready: last upstream refresh {} s ago\n",
                t.elapsed().as_secs()
            ),
        ),
        None => (
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: upstream not reached yet\n".to_string(),
        ),
    }
}

async fn metrics(State(s): State<AdminState>) -> String {
    metrics::gauge!("shardgate_huge_allocations").set(crate::alloc::huge_allocations() as f64);
    let mut text = s.prometheus.render();
    shard_gauges(&s, &mut text);
    placement::placement_gauges(&s, &mut text);
    text
}

/// Gauges of each active shard, from the current maps (and, on the leader, the autoscaler's
/// last samples): range bounds as fractions of the hash space, records/s, bytes/s and the
/// most-behind group's lag. Rendered here rather than recorded, so a shard sealed by a split
/// or merge leaves the output with its series instead of keeping its last values.
fn shard_gauges(s: &AdminState, out: &mut String) {
    use std::fmt::Write;
    type Value = fn(&crate::shards::Shard, Option<&ShardLoad>) -> Option<f64>;
    let families: [(&str, &str, Value); 5] = [
        (
            "shardgate_shard_range_start_fraction",
            "Start of an active shard's hash range, as a fraction of the hash space",
            |sh, _| Some(sh.start as f64 / HASH_END as f64),
        ),
        (
            "shardgate_shard_range_end_fraction",
            "End (exclusive) of an active shard's hash range, as a fraction of the hash space",
            |sh, _| Some(sh.end as f64 / HASH_END as f64),
        ),
        (
            "shardgate_shard_records_per_second",
            "Records/s of an active shard (the leader's autoscaler samples)",
            |_, l| l.map(|l| l.records_per_sec),
        ),
        (
            "shardgate_shard_bytes_per_second",
            "Stored bytes/s of an active shard (the leader's autoscaler samples)",
            |_, l| l.map(|l| l.bytes_per_sec),
        ),
        (
            "shardgate_shard_consumer_lag",
            "Records the most-behind live group has not committed on an active shard",
            |_, l| l.map(|l| l.lag as f64),
        ),
    ];
    let topics = s.shards.all();
    let loads: Vec<_> = topics
        .iter()
        .map(|m| s.controller.loads(&m.config.name))
        .collect();
    for (name, help, value) in families {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge");
        for (m, loads) in topics.iter().zip(&loads) {
            for sh in m.active() {
                if let Some(v) = value(sh, loads.get(&sh.partition)) {
                    let _ = writeln!(
                        out,
                        "{name}{{topic=\"{}\",shard=\"{}\",partition=\"{}\"}} {v}",
                        label(&m.config.name),
                        sh.id,
                        sh.partition
                    );
                }
            }
        }
    }
    let name = "shardgate_shard_group_lag";
    let _ = writeln!(
        out,
        "# HELP {name} Records a live group has not committed on an active shard (the 20 most behind per shard)\n# TYPE {name} gauge"
    );
    for (m, loads) in topics.iter().zip(&loads) {
        for sh in m.active() {
            for (group, lag) in loads.get(&sh.partition).map_or(&[][..], |l| &l.groups) {
                let _ = writeln!(
                    out,
                    "{name}{{topic=\"{}\",shard=\"{}\",partition=\"{}\",group=\"{}\"}} {lag}",
                    label(&m.config.name),
                    sh.id,
                    sh.partition,
                    label(group)
                );
            }
        }
    }
}

/// A Prometheus label value, escaped.
fn label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

fn error(status: u16, message: impl std::fmt::Display) -> Response {
    let code = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    (code, Json(json!({ "error": message.to_string() }))).into_response()
}

fn control_error(e: ControlError) -> Response {
    metrics::counter!("shardgate_admin_errors_total", "status" => e.status().to_string())
        .increment(1);
    tracing::warn!(error = %e, "admin request refused");
    error(e.status(), e)
}

fn map_json(map: &ShardMap) -> serde_json::Value {
    // The map's own serde shape is the contract: bounds as decimal strings, end exclusive.
    serde_json::to_value(map).unwrap_or_else(|e| json!({ "error": e.to_string() }))
}

/// Map changes are made by the leader; another instance forwards the request to it.
async fn forward_to_leader(
    s: &AdminState,
    method: &'static str,
    path: String,
    body: String,
) -> Option<Response> {
    if s.controller.is_leader() {
        return None;
    }
    let leader = match s.controller.store.leader().await {
        Ok(Some(l)) if l.node_id != s.settings.node_id => l,
        Ok(_) => {
            return Some(error(
                503,
                "no leader elected yet (is the shard store reachable?); retry",
            ));
        }
        Err(e) => return Some(error(503, format!("cannot find the leader: {e}"))),
    };
    let admin = leader.admin.clone();
    if s.forward_trust.is_some() && !admin.starts_with("https://") {
        // The token would cross the network in clear (a leader not yet on TLS, or a
        // tampered registry entry).
        return Some(error(
            503,
            format!(
                "leader {} advertises {admin}, not HTTPS: not forwarding",
                leader.node_id
            ),
        ));
    }
    // This instance's own credential, not the caller's.
    let token = s.settings.admin_auth.forward.clone();
    let trust = s.forward_trust.clone();
    let result = tokio::task::spawn_blocking(move || {
        http_request_tls(
            &admin,
            method,
            &path,
            Some(&body),
            token.as_deref(),
            trust.as_ref(),
        )
    })
    .await;
    Some(match result {
        Ok(Ok((status, text))) => {
            let code = StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_GATEWAY);
            (code, [("content-type", "application/json")], text).into_response()
        }
        Ok(Err(e)) => error(
            502,
            format!(
                "leader {} at {} unreachable: {e}",
                leader.node_id, leader.admin
            ),
        ),
        Err(e) => error(500, e),
    })
}

async fn list_topics(State(s): State<AdminState>) -> Response {
    let topics: Vec<_> = s
        .shards
        .all()
        .iter()
        .map(|m| {
            json!({
                "name": m.config.name,
                "route_by": m.config.route_by,
                "pool": m.map.pool,
                "max_pool": m.config.max_pool,
                "epoch": m.map.epoch,
                "active_shards": m.active().len(),
                "gates": m.map.gates.len(),
                "autoscale": m.config.autoscale,
            })
        })
        .collect();
    Json(json!({ "topics": topics })).into_response()
}

async fn create_topic(
    State(s): State<AdminState>,
    body: Result<Json<TopicConfig>, JsonRejection>,
) -> Response {
    let Json(cfg) = match body {
        Ok(b) => b,
        Err(e) => return error(400, format!("bad topic JSON: {}", e.body_text())),
    };
    let text = serde_json::to_string(&cfg).unwrap_or_default();
    if let Some(r) = forward_to_leader(&s, "POST", "/api/v1/topics".into(), text).await {
        return r;
    }
    match s.controller.create_topic(cfg).await {
        Ok(map) => (StatusCode::CREATED, Json(map_json(&map))).into_response(),
        Err(e) => control_error(e),
    }
}

async fn get_shards(State(s): State<AdminState>, Path(topic): Path<String>) -> Response {
    match s.shards.get(&topic) {
        Some(m) => Json(map_json(&m.map)).into_response(),
        None => error(404, format!("topic {topic} is not managed")),
    }
}

async fn shard_page() -> Response {
    (
        [
            ("content-type", "text/html; charset=utf-8"),
            ("cache-control", "no-store"),
        ],
        include_str!("shard_page.html"),
    )
        .into_response()
}

/// Per shard of a managed topic: its load as the leader's autoscaler last sampled it, and per
/// gate whether it is closed (some consumer group has not passed a parent's seal). Another
/// instance forwards this to the leader, which holds the samples.
async fn get_load(State(s): State<AdminState>, Path(topic): Path<String>) -> Response {
    let Some(m) = s.shards.get(&topic) else {
        return error(404, format!("topic {topic} is not managed"));
    };
    let path = format!("/api/v1/topics/{topic}/load");
    if let Some(r) = forward_to_leader(&s, "GET", path, String::new()).await {
        return r;
    }
    let loads = s.controller.loads(&topic);
    let shards: Vec<_> = m
        .active()
        .iter()
        .map(|sh| {
            let l = loads.get(&sh.partition);
            json!({
                "id": sh.id,
                "partition": sh.partition,
                "records_per_sec": l.map(|l| l.records_per_sec),
                "bytes_per_sec": l.map(|l| l.bytes_per_sec),
                "lag": l.map(|l| l.lag),
            })
        })
        .collect();
    let gates: Vec<_> = m
        .map
        .gates
        .iter()
        .map(|g| {
            let sealed = g.from_offset.is_some() && g.after.iter().all(|a| a.seal_offset.is_some());
            json!({
                "partition": g.partition,
                "after": g.after.iter().map(|a| a.partition).collect::<Vec<_>>(),
                "sealed": sealed,
                "closed": s.groups.gate_closed(&topic, g),
            })
        })
        .collect();
    Json(json!({ "topic": topic, "epoch": m.map.epoch, "shards": shards, "gates": gates }))
        .into_response()
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct SplitBody {
    at: Option<String>,
}

async fn split(
    State(s): State<AdminState>,
    Path((topic, id)): Path<(String, String)>,
    body: Option<Json<serde_json::Value>>,
) -> Response {
    let Ok(id) = id.parse::<u32>() else {
        return error(400, format!("shard id {id:?} is not a number"));
    };
    let body: SplitBody = match body {
        None => SplitBody::default(),
        Some(Json(v)) => match serde_json::from_value(v) {
            Ok(b) => b,
            Err(e) => {
                return error(
                    400,
                    format!("bad split body: {e}; expected {{\"at\": \"<u64>\"}}"),
                );
            }
        },
    };
    let at = match body.at.as_deref().map(str::parse::<u128>) {
        None => None,
        Some(Ok(v)) if v < HASH_END => Some(v),
        Some(_) => return error(400, "`at` must be a decimal string within 0..2^64"),
    };
    let text = json!({ "at": body.at }).to_string();
    let path = format!("/api/v1/topics/{topic}/shards/{id}/split");
    if let Some(r) = forward_to_leader(&s, "POST", path, text).await {
        return r;
    }
    match s.controller.split(&topic, id, at, "api").await {
        Ok(map) => Json(map_json(&map)).into_response(),
        Err(e) => control_error(e),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct MergeBody {
    shards: [u32; 2],
}

async fn merge(
    State(s): State<AdminState>,
    Path(topic): Path<String>,
    body: Result<Json<MergeBody>, JsonRejection>,
) -> Response {
    let Json(body) = match body {
        Ok(b) => b,
        Err(e) => {
            return error(
                400,
                format!(
                    "bad merge body: {}; expected {{\"shards\": [a, b]}}",
                    e.body_text()
                ),
            );
        }
    };
    let text = json!({ "shards": body.shards }).to_string();
    if let Some(r) =
        forward_to_leader(&s, "POST", format!("/api/v1/topics/{topic}/merge"), text).await
    {
        return r;
    }
    match s
        .controller
        .merge(&topic, body.shards[0], body.shards[1], "api")
        .await
    {
        Ok(map) => Json(map_json(&map)).into_response(),
        Err(e) => control_error(e),
    }
}

async fn consumers(State(s): State<AdminState>) -> Response {
    let topics: Vec<String> = s
        .shards
        .all()
        .iter()
        .map(|m| m.config.name.clone())
        .collect();
    let groups: serde_json::Map<String, serde_json::Value> = topics
        .iter()
        .map(|t| (t.clone(), json!(s.groups.groups_on(t))))
        .collect();
    Json(json!({
        "consumers": s.profiles.snapshot(),
        "gates": { "groups_by_topic": groups, "committed": s.groups.snapshot() },
    }))
    .into_response()
}

/// One admin API call (the CLI's `shardgate shards ...`, tests): `base` is
/// `http://host:port`; the status and the body.
pub fn http_request(
    base: &str,
    method: &str,
    path: &str,
    body: Option<&str>,
) -> std::io::Result<(u16, String)> {
    http_request_tls(base, method, path, body, None, None)
}

/// `http_request` with a bearer token.
pub fn http_request_as(
    base: &str,
    method: &str,
    path: &str,
    body: Option<&str>,
    token: Option<&str>,
) -> std::io::Result<(u16, String)> {
    http_request_tls(base, method, path, body, token, None)
}

/// `http_request_as` that can also reach an `https://` base, trusting `trust`.
pub fn http_request_tls(
    base: &str,
    method: &str,
    path: &str,
    body: Option<&str>,
    token: Option<&str>,
    trust: Option<&crate::http::Trust>,
) -> std::io::Result<(u16, String)> {
    let auth = token.map(|t| format!("Bearer {t}"));
    let headers: Vec<(&str, &str)> = auth
        .as_deref()
        .map(|a| ("Authorization", a))
        .into_iter()
        .collect();
    let url = format!("{}{path}", base.trim_end_matches('/'));
    crate::http::send(
        &crate::http::Request {
            method,
            url: &url,
            headers: &headers,
            body: body.map(|b| ("application/json", b.as_bytes())),
            timeout: Duration::from_secs(60),
        },
        trust,
    )
}

//! The placement endpoints: what sits on which broker and what is moving
//! (`GET /api/v1/topics/{t}/placement`), a replica move by hand
//! (`POST /api/v1/topics/{t}/placement/moves {"partition": p, "to": [b, ...]}`), and its
//! cancellation (`DELETE /api/v1/topics/{t}/placement/moves/{p}`). All answered by the
//! leader instance (others forward).

use axum::Json;
use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, State};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::json;

use super::{AdminState, control_error, error, forward_to_leader};

pub(super) async fn get_placement(
    State(s): State<AdminState>,
    Path(topic): Path<String>,
) -> Response {
    if s.shards.get(&topic).is_none() {
        return error(404, format!("topic {topic} is not managed"));
    }
    let path = format!("/api/v1/topics/{topic}/placement");
    if let Some(r) = forward_to_leader(&s, "GET", path, String::new()).await {
        return r;
    }
    match s.controller.placement_view(&topic) {
        Ok(v) => Json(v).into_response(),
        Err(e) => control_error(e),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct MoveBody {
    partition: i32,
    to: Vec<i32>,
}

pub(super) async fn post_move(
    State(s): State<AdminState>,
    Path(topic): Path<String>,
    body: Result<Json<MoveBody>, JsonRejection>,
) -> Response {
    let Json(body) = match body {
        Ok(b) => b,
        Err(e) => {
            return error(
                400,
                format!("bad move body: {e}; expected {{\"partition\": 0, \"to\": [2]}}"),
            );
        }
    };
    let text = json!({ "partition": body.partition, "to": body.to }).to_string();
    let path = format!("/api/v1/topics/{topic}/placement/moves");
    if let Some(r) = forward_to_leader(&s, "POST", path, text).await {
        return r;
    }
    match s
        .controller
        .start_move(&topic, body.partition, body.to, "api")
        .await
    {
        Ok(m) => (axum::http::StatusCode::ACCEPTED, Json(json!(m))).into_response(),
        Err(e) => control_error(e),
    }
}

pub(super) async fn delete_move(
    State(s): State<AdminState>,
    Path((topic, partition)): Path<(String, String)>,
) -> Response {
    let Ok(p) = partition.parse::<i32>() else {
        return error(400, format!("partition {partition:?} is not a number"));
    };
    let path = format!("/api/v1/topics/{topic}/placement/moves/{p}");
    if let Some(r) = forward_to_leader(&s, "DELETE", path, String::new()).await {
        return r;
    }
    match s.controller.cancel_move(&topic, p, "api").await {
        Ok(()) => Json(json!({ "cancelled": p })).into_response(),
        Err(e) => control_error(e),
    }
}

/// Placement gauges of each managed topic, rendered at scrape time on the leader instance
/// (the only one with load samples and copy progress): per broker its active-shard load,
/// records/s and active shards; per move under way its kind and the bytes copied so far.
/// A gauge family: name, help, and its value from one JSON entry of the placement view.
type Family = (
    &'static str,
    &'static str,
    fn(&serde_json::Value) -> Option<f64>,
);

pub(super) fn placement_gauges(s: &AdminState, out: &mut String) {
    use std::fmt::Write;
    if !s.controller.is_leader() {
        return;
    }
    let views: Vec<serde_json::Value> = s
        .shards
        .all()
        .iter()
        .filter_map(|m| s.controller.placement_view(&m.config.name).ok())
        .collect();
    let per_broker: [Family; 3] = [
        (
            "shardgate_broker_shard_load",
            "Sum of the active shards' loads a broker leads, in split thresholds",
            |b| b["load"].as_f64(),
        ),
        (
            "shardgate_broker_shard_records_per_second",
            "Records/s of the active shards a broker leads",
            |b| b["records_per_sec"].as_f64(),
        ),
        (
            "shardgate_broker_active_shards",
            "Active shards a broker leads",
            |b| b["active_partitions"].as_array().map(|a| a.len() as f64),
        ),
    ];
    for (name, help, value) in per_broker {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge");
        for v in &views {
            for b in v["brokers"].as_array().into_iter().flatten() {
                if let Some(x) = value(b) {
                    let _ = writeln!(
                        out,
                        "{name}{{topic=\"{}\",broker=\"{}\"}} {x}",
                        v["topic"].as_str().unwrap_or_default(),
                        b["broker"]
                    );
                }
            }
        }
    }
    let moving: [Family; 2] = [
        (
            "shardgate_reassignment_in_progress",
            "1 for each pool partition whose replicas are moving",
            |_| Some(1.0),
        ),
        (
            "shardgate_reassignment_copied_bytes",
            "Bytes the new replica of a moving partition holds so far",
            |m| m["copied_bytes"].as_f64(),
        ),
    ];
    for (name, help, value) in moving {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge");
        for v in &views {
            for m in v["moving"].as_array().into_iter().flatten() {
                if let Some(x) = value(m) {
                    let _ = writeln!(
                        out,
                        "{name}{{topic=\"{}\",partition=\"{}\",kind=\"{}\"}} {x}",
                        v["topic"].as_str().unwrap_or_default(),
                        m["partition"],
                        m["kind"].as_str().unwrap_or_default()
                    );
                }
            }
        }
    }
}

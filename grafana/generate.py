#!/usr/bin/env python3
"""Writes the two shardgate dashboards (grafana/dashboards/*.json) from the panel lists below.

    python3 grafana/generate.py          # rewrite the JSON files
    python3 grafana/generate.py --check  # fail if the committed JSON differs from this script

Every query uses the provisioned Prometheus datasource (uid "prometheus", see
grafana/provisioning/datasources/prometheus.yaml). The `dashboards` integration test checks
the JSON (unique ids, datasource references, variables used, metric names that shardgate
exports) and evaluates every expression against a real Prometheus scraping shardgate.
"""
import json
import pathlib
import sys

DS = {"type": "prometheus", "uid": "prometheus"}
HERE = pathlib.Path(__file__).resolve().parent


def target(expr, legend="", ref="A"):
    return {"datasource": DS, "expr": expr, "legendFormat": legend, "refId": ref}


def panel(title, targets, unit="short", kind="timeseries", w=12, h=8, desc="", stack=False):
    p = {
        "type": kind,
        "title": title,
        "description": desc,
        "datasource": DS,
        "targets": [target(e, l, chr(ord("A") + i)) for i, (e, l) in enumerate(targets)],
        "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
        "options": {},
        "gridPos": {"w": w, "h": h},
    }
    if kind == "timeseries":
        p["fieldConfig"]["defaults"]["custom"] = {
            "lineInterpolation": "stepAfter" if stack == "step" else "linear",
            "stacking": {"mode": "normal" if stack is True else "none"},
        }
    return p


def row(title):
    return {"type": "row", "title": title, "collapsed": False, "panels": [], "gridPos": {"w": 24, "h": 1}}


def layout(panels):
    x = y = 0
    line_h = 0
    for i, p in enumerate(panels, start=1):
        p["id"] = i
        w, h = p["gridPos"]["w"], p["gridPos"]["h"]
        if x + w > 24:
            x, y = 0, y + line_h
            line_h = 0
        p["gridPos"].update({"x": x, "y": y})
        x += w
        line_h = max(line_h, h)
        if p["type"] == "row":
            x, y, line_h = 0, y + h, 0
    return panels


def dashboard(uid, title, panels, variables, annotations=()):
    return {
        "uid": uid,
        "title": title,
        "tags": ["shardgate"],
        "timezone": "browser",
        "schemaVersion": 39,
        "version": 1,
        "editable": True,
        "refresh": "10s",
        "time": {"from": "now-1h", "to": "now"},
        "templating": {"list": list(variables)},
        "annotations": {"list": list(annotations)},
        "panels": layout(panels),
    }


def query_var(name, label, query, multi=True):
    return {
        "name": name,
        "label": label,
        "type": "query",
        "datasource": DS,
        "query": {"query": query, "refId": "PrometheusVariableQueryEditor-VariableQuery"},
        "definition": query,
        "refresh": 2,
        "multi": multi,
        "includeAll": True,
        "allValue": ".*",
        "current": {"selected": True, "text": ["All"], "value": ["$__all"]},
        "sort": 1,
    }


T = 'topic=~"$topic"'


def shards():
    panels = [
        row("Shards of $topic"),
        panel("Active shards", [(f"sum by (topic) (shardgate_shards_active{{{T}}})", "{{topic}}")],
              w=6, desc="Shards taking writes, per managed topic."),
        panel("Shard map epoch", [(f"max by (topic) (shardgate_shard_map_epoch{{{T}}})", "{{topic}}")],
              w=6, desc="Bumped by every split and merge."),
        panel("Hash-range map (start of each shard's range, fraction of the hash space)",
              [(f"max by (topic, shard, partition) (shardgate_shard_range_start_fraction{{{T}}})",
                "{{topic}} shard {{shard}} → p{{partition}}")],
              unit="percentunit", w=12, stack="step",
              desc="Each line is a shard; its range runs from its value to the next line up. "
                   "A split adds a line inside a range, a merge removes one."),
        row("Load per shard"),
        panel("Records/s per shard (autoscaler's measure)",
              [(f"max by (topic, shard) (shardgate_shard_records_per_second{{{T}}})", "{{topic}} shard {{shard}}")],
              unit="ops"),
        panel("Bytes/s per shard (autoscaler's measure)",
              [(f"max by (topic, shard) (shardgate_shard_bytes_per_second{{{T}}})", "{{topic}} shard {{shard}}")],
              unit="Bps"),
        panel("Records in per shard (through this proxy)",
              [(f"sum by (topic, shard) (rate(shardgate_shard_records_in_total{{{T}}}[1m]))", "{{topic}} shard {{shard}}")],
              unit="ops", stack=True),
        panel("Consumer lag per shard (records, most behind group)",
              [(f"max by (topic, shard) (shardgate_shard_consumer_lag{{{T}}})", "{{topic}} shard {{shard}}")]),
        panel("Consumer lag per group per shard (records)",
              [(f"max by (topic, shard, group) (shardgate_shard_group_lag{{{T}}})", "{{group}} shard {{shard}}")],
              desc="Per live group with commits on the topic (the 20 most behind per shard), "
                   "as the leader last sampled Kafka's committed offsets."),
        row("Splits, merges and ordering gates"),
        panel("Splits and merges by reason",
              [(f"sum by (topic, reason) (increase(shardgate_shard_splits_total{{{T}}}[5m]))", "split {{topic}} {{reason}}"),
               (f"sum by (topic, reason) (increase(shardgate_shard_merges_total{{{T}}}[5m]))", "merge {{topic}} {{reason}}")],
              kind="timeseries", w=8),
        panel("Split / merge duration p99",
              [(f"histogram_quantile(0.99, sum by (le, op) (rate(shardgate_shard_change_seconds_bucket{{{T}}}[5m])))", "{{op}}")],
              unit="s", w=8),
        panel("Closed ordering gates",
              [(f"sum by (topic) (shardgate_gate_closed{{{T}}})", "{{topic}}")],
              w=8, desc="Partitions whose records wait until every group passed the parent's seal."),
        panel("Gate wait p50 / p99",
              [(f"histogram_quantile(0.5, sum by (le) (rate(shardgate_gate_wait_seconds_bucket{{{T}}}[5m])))", "p50"),
               (f"histogram_quantile(0.99, sum by (le) (rate(shardgate_gate_wait_seconds_bucket{{{T}}}[5m])))", "p99")],
              unit="s", w=8),
        panel("Fetches held at gates, fallback openings",
              [(f"sum by (topic) (rate(shardgate_gate_held_fetches_total{{{T}}}[1m]))", "held {{topic}}"),
               (f"sum by (topic) (increase(shardgate_gate_fallback_opens_total{{{T}}}[5m]))", "fallback {{topic}}")],
              w=8),
        panel("Pool nudges and growth",
              [(f"sum by (topic) (increase(shardgate_pool_nudges_total{{{T}}}[5m]))", "nudges {{topic}}"),
               ("sum(increase(shardgate_pool_grown_total[5m]))", "pool grown")],
              w=8),
        row("Prefetch"),
        panel("Prefetch hit ratio (partitions delivered from reads made ahead)",
              [("sum(rate(shardgate_prefetch_hits_total[5m])) / clamp_min(sum(rate(shardgate_prefetch_hits_total[5m])) + sum(rate(shardgate_prefetch_misses_total[5m])), 1e-9)", "hit ratio")],
              unit="percentunit", w=8),
        panel("Prefetch precision (prefetched records later delivered)",
              [("sum(rate(shardgate_prefetch_delivered_records_total[5m])) / clamp_min(sum(rate(shardgate_prefetch_prefetched_records_total[5m])), 1e-9)", "precision")],
              unit="percentunit", w=8),
        panel("Prefetch memory and reads",
              [("sum(shardgate_prefetch_bytes)", "bytes held"),
               ("sum by (reason) (rate(shardgate_prefetch_reads_total[5m]))", "reads {{reason}}/s"),
               ("sum by (reason) (rate(shardgate_prefetch_evictions_total[5m]))", "evictions {{reason}}/s")],
              w=8),
        panel("Prefetch coverage (records delivered from memory)",
              [("sum(rate(shardgate_prefetch_delivered_records_total[5m])) / clamp_min(sum(rate(shardgate_fetch_delivered_records_total[5m])), 1e-9)", "coverage")],
              unit="percentunit", w=8),
        panel("Upstream fetches saved and spent by prefetch",
              [("sum(rate(shardgate_prefetch_fetches_saved_total[5m]))", "saved/s"),
               ("sum(rate(shardgate_fetch_readahead_polls_total[5m]))", "read-ahead polls/s"),
               ("sum(rate(shardgate_prefetch_opening_reads_total[5m]))", "gate-opening reads/s")],
              w=8),
        panel("Prefetch bytes read for nothing",
              [("sum(rate(shardgate_prefetch_wasted_bytes_total[5m]))", "wasted bytes/s"),
               ("sum(shardgate_prefetch_queue_bytes)", "queued bytes")],
              unit="bytes", w=8),
    ]
    annotations = [
        {
            "name": "Splits",
            "datasource": DS,
            "enable": True,
            "iconColor": "orange",
            "expr": f"changes(shardgate_shard_splits_total{{{T}}}[1m]) > 0",
            "titleFormat": "split {{topic}}",
            "textFormat": "reason {{reason}}",
            "step": "30s",
        },
        {
            "name": "Merges",
            "datasource": DS,
            "enable": True,
            "iconColor": "blue",
            "expr": f"changes(shardgate_shard_merges_total{{{T}}}[1m]) > 0",
            "titleFormat": "merge {{topic}}",
            "textFormat": "reason {{reason}}",
            "step": "30s",
        },
    ]
    return dashboard(
        "shardgate-shards",
        "shardgate — shards",
        panels,
        [query_var("topic", "Topic", "label_values(shardgate_shards_active, topic)")],
        annotations,
    )


def proxy():
    I = 'instance=~"$instance"'
    panels = [
        row("Clients"),
        panel("Open connections", [(f"sum by (instance) (shardgate_connections{{{I}}})", "{{instance}}")], w=8),
        panel("Connections accepted / refused / closed",
              [(f"sum(rate(shardgate_connections_total{{{I}}}[1m]))", "accepted/s"),
               (f"sum by (reason) (rate(shardgate_connections_rejected_total{{{I}}}[1m]))", "refused {{reason}}/s"),
               (f"sum by (reason) (rate(shardgate_connections_closed_total{{{I}}}[1m]))", "closed {{reason}}/s")],
              w=8),
        panel("Bytes in / out", [(f"sum(rate(shardgate_bytes_in_total{{{I}}}[1m]))", "in"),
                                  (f"sum(rate(shardgate_bytes_out_total{{{I}}}[1m]))", "out")], unit="Bps", w=8),
        row("Requests"),
        panel("Requests per API", [(f"sum by (api) (rate(shardgate_requests_total{{{I}}}[1m]))", "{{api}}")], unit="reqps"),
        panel("Errors per API", [(f"sum by (api, kind) (rate(shardgate_request_errors_total{{{I}}}[1m]))", "{{api}} {{kind}}")], unit="reqps"),
        panel("Latency p50 per API",
              [(f"histogram_quantile(0.5, sum by (le, api) (rate(shardgate_request_duration_seconds_bucket{{{I}}}[5m])))", "{{api}}")],
              unit="s"),
        panel("Latency p99 per API",
              [(f"histogram_quantile(0.99, sum by (le, api) (rate(shardgate_request_duration_seconds_bucket{{{I}}}[5m])))", "{{api}}")],
              unit="s"),
        panel("Frame errors (malformed, oversized, unknown versions)",
              [(f"sum by (kind) (rate(shardgate_frame_errors_total{{{I}}}[5m]))", "{{kind}}")], w=8),
        panel("Requests in progress, abandoned",
              [(f"sum(shardgate_requests_in_progress{{{I}}})", "in progress"),
               (f"sum(rate(shardgate_requests_abandoned_total{{{I}}}[5m]))", "abandoned/s")], w=8),
        panel("Memory budget", [(f"sum(shardgate_memory_budget_used_bytes{{{I}}})", "used"),
                                (f"sum(shardgate_memory_budget_waiting{{{I}}})", "reads waiting")], unit="bytes", w=8),
        row("Upstream (Kafka)"),
        panel("Upstream latency p99 per API",
              [(f"histogram_quantile(0.99, sum by (le, api) (rate(shardgate_upstream_request_duration_seconds_bucket{{{I}}}[5m])))", "{{api}}")],
              unit="s"),
        panel("Upstream errors",
              [(f"sum by (kind) (rate(shardgate_upstream_errors_total{{{I}}}[5m]))", "{{kind}}"),
               (f"sum(rate(shardgate_upstream_timeouts_closed_total{{{I}}}[5m]))", "timed-out sockets closed")]),
        panel("Upstream connects", [(f"sum by (result) (rate(shardgate_upstream_connects_total{{{I}}}[5m]))", "{{result}}")], w=8),
        panel("Brokers answering ApiVersions", [(f"min(shardgate_upstream_api_versions_brokers{{{I}}})", "brokers")], w=8),
        panel("Upstream fetches and bytes",
              [(f"sum(rate(shardgate_upstream_fetches_total{{{I}}}[1m]))", "fetches/s"),
               (f"sum(rate(shardgate_upstream_fetch_bytes_total{{{I}}}[1m]))", "record bytes/s")], w=8),
        row("Store and control"),
        panel("Controller leader", [(f"max by (instance) (shardgate_controller_leader{{{I}}})", "{{instance}}")], w=8,
              desc="1 on the instance that runs splits, merges and gates."),
        panel("Store errors", [(f"sum by (op) (rate(shardgate_store_errors_total{{{I}}}[5m]))", "{{op}}")], w=8,
              desc="Consul (or file store) operations that failed: watch, report, campaign."),
        panel("Topology refreshes", [(f"sum(rate(shardgate_topology_refreshes_total{{{I}}}[5m]))", "refreshes/s")], w=8),
        panel("Store reachable, instances live / configured",
              [(f"min by (instance) (shardgate_store_reachable{{{I}}})", "store reachable {{instance}}"),
               (f"max by (instance) (shardgate_instances_live{{{I}}})", "live {{instance}}"),
               (f"max by (instance) (shardgate_instances_configured{{{I}}})", "configured {{instance}}")], w=8,
              desc="1 while the instance's last report to the shard-map store succeeded (every 3 s); "
                   "the virtual cluster's instances alive in the store's registry vs configured."),
    ]
    return dashboard(
        "shardgate-proxy",
        "shardgate — proxy",
        panels,
        [query_var("instance", "Instance", "label_values(shardgate_connections, instance)")],
    )


def main():
    out = {
        HERE / "dashboards" / "shardgate-shards.json": shards(),
        HERE / "dashboards" / "shardgate-proxy.json": proxy(),
    }
    check = "--check" in sys.argv
    stale = []
    for path, d in out.items():
        text = json.dumps(d, indent=2, ensure_ascii=False) + "\n"
        if check:
            if not path.exists() or path.read_text() != text:
                stale.append(str(path))
        else:
            path.write_text(text)
    if stale:
        raise SystemExit(f"out of date (run python3 grafana/generate.py): {stale}")


if __name__ == "__main__":
    main()

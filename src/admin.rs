//! Admin HTTP: health, readiness and Prometheus metrics on one port.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use metrics_exporter_prometheus::PrometheusHandle;

use crate::proxy::Ctx;

#[derive(Clone)]
struct AdminState {
    ctx: Arc<Ctx>,
    prometheus: PrometheusHandle,
}

pub fn router(ctx: Arc<Ctx>, prometheus: PrometheusHandle) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(AdminState { ctx, prometheus })
}

/// Ready when a full upstream topology refresh succeeded recently.
async fn readyz(State(s): State<AdminState>) -> (StatusCode, String) {
    let topo = s.ctx.topology().load();
    let fresh_for = Duration::from_millis(s.ctx.settings.raw.upstream.metadata_refresh_ms * 3);
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
    s.prometheus.render()
}

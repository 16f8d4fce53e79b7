//! Bearer tokens on the admin API (`[[admin.tokens]]`): a read token may GET, an operator
//! token may also change shard maps. Health and readiness stay open (probes), so do the
//! shard page's HTML (it holds no data; its calls carry the token given in the page
//! address's `#token=` fragment) and, with `admin.public_metrics`, `/metrics`. Without
//! tokens the API is open, which the configuration allows on a loopback address only.

use std::net::SocketAddr;

use axum::extract::{ConnectInfo, Request, State};
use axum::http::{Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use serde_json::json;

use super::AdminState;
use crate::config::AdminRole;

pub async fn require(
    State(s): State<AdminState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    req: Request,
    next: Next,
) -> Response {
    let auth = &s.settings.admin_auth;
    let path = req.uri().path();
    let open =
        matches!(path, "/" | "/healthz" | "/readyz") || (path == "/metrics" && auth.public_metrics);
    if auth.tokens.is_empty() || open {
        return next.run(req).await;
    }
    let reading = matches!(*req.method(), Method::GET | Method::HEAD);
    let presented = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            let (scheme, token) = v.split_once(' ')?;
            scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
        });
    let Some(presented) = presented else {
        return refuse(peer, &req, "missing", None);
    };
    let Some(token) = auth
        .tokens
        .iter()
        .find(|t| crate::auth::same(t.secret.as_bytes(), presented.as_bytes()))
    else {
        return refuse(peer, &req, "invalid", None);
    };
    if !reading && token.role == AdminRole::Read {
        return refuse(peer, &req, "forbidden", Some(&token.name));
    }
    next.run(req).await
}

fn refuse(peer: SocketAddr, req: &Request, reason: &'static str, token: Option<&str>) -> Response {
    metrics::counter!("shardgate_admin_auth_failures_total", "reason" => reason).increment(1);
    tracing::warn!(
        %peer,
        method = %req.method(),
        path = %req.uri().path(),
        reason,
        token = token.unwrap_or(""),
        "admin request refused"
    );
    let (status, message) = match reason {
        "forbidden" => (
            StatusCode::FORBIDDEN,
            "this token has the read role; changes need an operator token",
        ),
        "missing" => (
            StatusCode::UNAUTHORIZED,
            "an admin token is required: send `Authorization: Bearer <token>`",
        ),
        _ => (StatusCode::UNAUTHORIZED, "the admin token is not valid"),
    };
    let mut r = (status, axum::Json(json!({ "error": message }))).into_response();
    if status == StatusCode::UNAUTHORIZED {
        r.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            header::HeaderValue::from_static("Bearer realm=\"shardgate\""),
        );
    }
    r
}

//! Admin APIs any broker serves (KRaft brokers forward controller-bound requests), and
//! ListGroups fanned out to every broker (each knows only the groups it coordinates).

use kafka_protocol::messages::*;

use super::connection::ClientConn;
use super::forward::{any_broker, typed_reply};
use super::{Ctx, HandlerError, Reply};
use crate::protocol::{RequestFrame, codes, decode_response, encode_request};
use crate::upstream::UpstreamError;

/// Admin APIs any broker serves (KRaft brokers forward controller-bound requests).
pub async fn forward_to_any(
    ctx: &Ctx,
    client: &ClientConn,
    req: &RequestFrame,
) -> Result<Reply, HandlerError> {
    let broker = any_broker(ctx, client)?;
    let (socket, timeout) = super::sockets::for_admin(client);
    let resp = ctx
        .pool
        .send(
            broker,
            socket,
            req.api_key,
            req.frame.clone(),
            true,
            timeout,
        )
        .await?
        .wait()
        .await?
        .ok_or(UpstreamError::Protocol("no response".into()))?;
    if matches!(
        req.api_key,
        ApiKey::CreateTopics | ApiKey::DeleteTopics | ApiKey::CreatePartitions
    ) {
        // Leaders of new partitions must be known before clients produce to them.
        ctx.topology().request_refresh();
    }
    Ok(Reply::Forwarded {
        correlation_id: req.correlation_id(),
        upstream: resp,
    })
}

/// ListGroups: each broker knows only the groups it coordinates.
pub async fn list_groups(
    ctx: &Ctx,
    client: &ClientConn,
    req: &RequestFrame,
) -> Result<Reply, HandlerError> {
    let body: ListGroupsRequest = req.decode_body()?;
    let brokers: Vec<i32> = ctx.topology().load().brokers.keys().copied().collect();
    if brokers.is_empty() {
        return Err(UpstreamError::NoBroker.into());
    }
    let frame = encode_request(
        req.api_key,
        req.api_version,
        req.header.client_id.clone(),
        &body,
    )?;
    let calls = brokers.iter().map(|b| {
        let frame = frame.clone();
        async move {
            let raw = ctx
                .pool
                .call_raw(*b, client.pin(), req.api_key, frame)
                .await?;
            Ok::<ListGroupsResponse, HandlerError>(decode_response(
                req.api_key,
                req.api_version,
                raw,
            )?)
        }
    });
    let mut merged = ListGroupsResponse::default();
    for r in futures::future::join_all(calls).await {
        match r {
            Ok(r) => {
                merged.throttle_time_ms = merged.throttle_time_ms.max(r.throttle_time_ms);
                if merged.error_code == 0 {
                    merged.error_code = r.error_code;
                }
                merged.groups.extend(r.groups);
            }
            Err(e) => {
                tracing::warn!(error = %e, "ListGroups: a broker did not answer");
                merged.error_code = codes::COORDINATOR_NOT_AVAILABLE;
            }
        }
    }
    typed_reply(req, &merged)
}

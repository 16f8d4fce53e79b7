//! The cluster view: Metadata, FindCoordinator and DescribeCluster, answered with upstream
//! data rewritten to the virtual cluster (brokers = shardgate instances).

use kafka_protocol::messages::*;

use super::connection::ClientConn;
use super::forward::{any_broker, call_typed, typed_reply};
use super::{Ctx, HandlerError, Reply};
use crate::protocol::RequestFrame;

pub async fn cluster_view(
    ctx: &Ctx,
    client: &ClientConn,
    req: &RequestFrame,
) -> Result<Reply, HandlerError> {
    let broker = any_broker(ctx, client)?;
    match req.api_key {
        ApiKey::Metadata => {
            let body: MetadataRequest = req.decode_body()?;
            let all = body.topics.is_none()
                || (req.api_version == 0 && body.topics.as_ref().is_some_and(|t| t.is_empty()));
            let mut resp: MetadataResponse = call_typed(ctx, client, broker, req, &body).await?;
            ctx.topology().absorb(&resp, all);
            ctx.cluster.rewrite_metadata(&mut resp);
            typed_reply(req, &resp)
        }
        ApiKey::FindCoordinator => {
            let body: FindCoordinatorRequest = req.decode_body()?;
            let mut resp: FindCoordinatorResponse =
                call_typed(ctx, client, broker, req, &body).await?;
            if resp.coordinators.is_empty() {
                if resp.error_code == 0 {
                    ctx.coordinators
                        .put(body.key_type, &body.key, resp.node_id.0);
                }
            } else {
                for c in &resp.coordinators {
                    if c.error_code == 0 {
                        ctx.coordinators.put(body.key_type, &c.key, c.node_id.0);
                    }
                }
            }
            ctx.cluster
                .rewrite_find_coordinator(&mut resp, body.key_type, &body.key);
            typed_reply(req, &resp)
        }
        ApiKey::DescribeCluster => {
            let body: DescribeClusterRequest = req.decode_body()?;
            let mut resp: DescribeClusterResponse =
                call_typed(ctx, client, broker, req, &body).await?;
            ctx.cluster.rewrite_describe_cluster(&mut resp);
            typed_reply(req, &resp)
        }
        other => Err(HandlerError::Protocol(
            crate::protocol::ProtocolError::Decode {
                what: format!("{other:?}"),
                message: "not a cluster-view API".into(),
            },
        )),
    }
}

//! Config APIs where a resource names a broker. Clients see shardgate instances as brokers, so
//! a broker resource names a virtual node id that the real cluster does not know.
//!
//! - DescribeConfigs of a virtual broker answers with the configuration of one real broker
//!   (the lowest id: brokers of one cluster normally share their static configuration),
//!   labelled with the virtual id the client asked for.
//! - AlterConfigs / IncrementalAlterConfigs of a named broker are refused with a message: a
//!   virtual broker is no single real broker to change. Cluster-wide broker defaults (an empty
//!   broker name) and every other resource pass through unchanged.

use kafka_protocol::messages::describe_configs_request::DescribeConfigsResource;
use kafka_protocol::messages::describe_configs_response::DescribeConfigsResult;
use kafka_protocol::messages::incremental_alter_configs_response::AlterConfigsResourceResponse as IncrementalAnswer;
use kafka_protocol::messages::{
    AlterConfigsRequest, AlterConfigsResponse, ApiKey, DescribeConfigsRequest,
    DescribeConfigsResponse, IncrementalAlterConfigsRequest, IncrementalAlterConfigsResponse,
};
use kafka_protocol::protocol::StrBytes;

use super::connection::ClientConn;
use super::{Ctx, HandlerError, Reply};
use crate::protocol::{RequestFrame, codes, encode_response};
use crate::upstream::UpstreamError;

/// Resources with their position in the client's request.
type Indexed = Vec<(usize, DescribeConfigsResource)>;

const BROKER: i8 = 4;
const BROKER_LOGGER: i8 = 8;

fn names_a_broker(resource_type: i8, name: &str) -> bool {
    matches!(resource_type, BROKER | BROKER_LOGGER) && !name.is_empty()
}

pub async fn handle(
    ctx: &Ctx,
    client: &ClientConn,
    req: &RequestFrame,
) -> Result<Reply, HandlerError> {
    match req.api_key {
        ApiKey::DescribeConfigs => describe(ctx, client, req).await,
        ApiKey::AlterConfigs => alter(ctx, client, req).await,
        _ => incremental_alter(ctx, client, req).await,
    }
}

fn reply<T: kafka_protocol::protocol::Encodable>(
    req: &RequestFrame,
    resp: &T,
) -> Result<Reply, HandlerError> {
    Ok(Reply::Frame(encode_response(
        req.api_key,
        req.api_version,
        req.correlation_id(),
        resp,
    )?))
}

async fn describe(
    ctx: &Ctx,
    client: &ClientConn,
    req: &RequestFrame,
) -> Result<Reply, HandlerError> {
    let body: DescribeConfigsRequest = req.decode_body()?;
    if !body
        .resources
        .iter()
        .any(|r| names_a_broker(r.resource_type, &r.resource_name))
    {
        return super::coordinator::forward_to_any(ctx, client, req).await;
    }
    let topo = ctx.topology().load();
    let real = *topo.brokers.keys().next().ok_or(UpstreamError::NoBroker)?;
    let virtual_ids: Vec<i32> = ctx.cluster.instances().iter().map(|(id, _)| *id).collect();
    // One request for the named brokers (to the representative real broker, which answers
    // only for itself) and one for everything else; answers go back in the client's order.
    let (named, rest): (Indexed, Indexed) = body
        .resources
        .iter()
        .cloned()
        .enumerate()
        .partition(|(_, r)| names_a_broker(r.resource_type, &r.resource_name));
    let mut answers: Vec<Option<DescribeConfigsResult>> = vec![None; body.resources.len()];
    let mut throttle = 0;
    for (target, group) in [(Some(real), named), (None, rest)] {
        if group.is_empty() {
            continue;
        }
        let mut sub = body.clone();
        sub.resources = group
            .iter()
            .map(|(_, r)| {
                let mut r = r.clone();
                if target.is_some() {
                    r.resource_name = StrBytes::from_string(real.to_string());
                }
                r
            })
            .collect();
        // Unknown virtual ids are answered here, as a broker would for another id.
        let broker = match target {
            Some(b) => b,
            None => topo.any_broker(client.id).ok_or(UpstreamError::NoBroker)?,
        };
        let resp: DescribeConfigsResponse = ctx
            .pool
            .call(
                broker,
                client.pin(),
                req.api_key,
                req.api_version,
                req.header.client_id.clone(),
                &sub,
            )
            .await?;
        throttle = throttle.max(resp.throttle_time_ms);
        for ((i, asked), mut result) in group.into_iter().zip(resp.results) {
            if target.is_some() {
                let known = asked
                    .resource_name
                    .parse::<i32>()
                    .is_ok_and(|id| virtual_ids.contains(&id));
                if !known {
                    result = DescribeConfigsResult::default()
                        .with_error_code(codes::INVALID_REQUEST)
                        .with_error_message(Some(StrBytes::from_string(format!(
                            "broker {} is not a node of this cluster (nodes: {virtual_ids:?})",
                            asked.resource_name
                        ))));
                }
                result.resource_type = asked.resource_type;
                result.resource_name = asked.resource_name.clone();
                if let Ok(id) = asked.resource_name.parse::<i32>() {
                    hide_real_listeners(ctx, id, &mut result);
                }
            }
            answers[i] = Some(result);
        }
    }
    let resp = DescribeConfigsResponse::default()
        .with_throttle_time_ms(throttle)
        .with_results(
            answers
                .into_iter()
                .zip(&body.resources)
                .map(|(a, r)| {
                    a.unwrap_or_else(|| {
                        DescribeConfigsResult::default()
                            .with_error_code(codes::UNKNOWN_SERVER_ERROR)
                            .with_resource_type(r.resource_type)
                            .with_resource_name(r.resource_name.clone())
                    })
                })
                .collect(),
        );
    reply(req, &resp)
}

/// The representative broker's own addresses would point clients past shardgate: its
/// listener settings are shown as the virtual node's address instead.
fn hide_real_listeners(ctx: &Ctx, virtual_id: i32, result: &mut DescribeConfigsResult) {
    let instances = ctx.cluster.instances();
    let Some((_, addr)) = instances.iter().find(|(id, _)| *id == virtual_id) else {
        return;
    };
    let scheme = if ctx.settings.raw.listener.tls.is_some() {
        "SSL"
    } else {
        "PLAINTEXT"
    };
    let shown = StrBytes::from_string(format!("{scheme}://{}:{}", addr.host, addr.port));
    for c in &mut result.configs {
        if matches!(c.name.as_str(), "advertised.listeners" | "listeners") {
            c.value = Some(shown.clone());
            c.synonyms.clear();
        }
    }
}

fn refusal(name: &str) -> String {
    format!(
        "broker {name} is a shardgate instance, not a Kafka broker: per-broker configs are \
         changed on Kafka directly; cluster-wide broker defaults (empty broker name) pass through"
    )
}

async fn alter(ctx: &Ctx, client: &ClientConn, req: &RequestFrame) -> Result<Reply, HandlerError> {
    let body: AlterConfigsRequest = req.decode_body()?;
    let named = |r: &kafka_protocol::messages::alter_configs_request::AlterConfigsResource| {
        names_a_broker(r.resource_type, &r.resource_name)
    };
    if !body.resources.iter().any(named) {
        return super::coordinator::forward_to_any(ctx, client, req).await;
    }
    let mut sub = body.clone();
    sub.resources.retain(|r| !named(r));
    let mut forwarded = if sub.resources.is_empty() {
        AlterConfigsResponse::default()
    } else {
        call_any::<_, AlterConfigsResponse>(ctx, client, req, &sub).await?
    };
    let mut rest = std::mem::take(&mut forwarded.responses).into_iter();
    forwarded.responses = body
        .resources
        .iter()
        .map(|r| {
            if named(r) {
                kafka_protocol::messages::alter_configs_response::AlterConfigsResourceResponse::default()
                    .with_error_code(codes::INVALID_REQUEST)
                    .with_error_message(Some(StrBytes::from_string(refusal(&r.resource_name))))
                    .with_resource_type(r.resource_type)
                    .with_resource_name(r.resource_name.clone())
            } else {
                rest.next().unwrap_or_default()
            }
        })
        .collect();
    reply(req, &forwarded)
}

async fn incremental_alter(
    ctx: &Ctx,
    client: &ClientConn,
    req: &RequestFrame,
) -> Result<Reply, HandlerError> {
    let body: IncrementalAlterConfigsRequest = req.decode_body()?;
    let named =
        |r: &kafka_protocol::messages::incremental_alter_configs_request::AlterConfigsResource| {
            names_a_broker(r.resource_type, &r.resource_name)
        };
    if !body.resources.iter().any(named) {
        return super::coordinator::forward_to_any(ctx, client, req).await;
    }
    let mut sub = body.clone();
    sub.resources.retain(|r| !named(r));
    let mut forwarded = if sub.resources.is_empty() {
        IncrementalAlterConfigsResponse::default()
    } else {
        call_any::<_, IncrementalAlterConfigsResponse>(ctx, client, req, &sub).await?
    };
    let mut rest = std::mem::take(&mut forwarded.responses).into_iter();
    forwarded.responses = body
        .resources
        .iter()
        .map(|r| {
            if named(r) {
                IncrementalAnswer::default()
                    .with_error_code(codes::INVALID_REQUEST)
                    .with_error_message(Some(StrBytes::from_string(refusal(&r.resource_name))))
                    .with_resource_type(r.resource_type)
                    .with_resource_name(r.resource_name.clone())
            } else {
                rest.next().unwrap_or_default()
            }
        })
        .collect();
    reply(req, &forwarded)
}

async fn call_any<Req, Resp>(
    ctx: &Ctx,
    client: &ClientConn,
    req: &RequestFrame,
    body: &Req,
) -> Result<Resp, HandlerError>
where
    Req: kafka_protocol::protocol::Encodable + kafka_protocol::protocol::HeaderVersion,
    Resp: kafka_protocol::protocol::Decodable,
{
    let broker = ctx
        .topology()
        .load()
        .any_broker(client.id)
        .ok_or(UpstreamError::NoBroker)?;
    Ok(ctx
        .pool
        .call(
            broker,
            client.pin(),
            req.api_key,
            req.api_version,
            req.header.client_id.clone(),
            body,
        )
        .await?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_named_brokers_are_mapped() {
        assert!(names_a_broker(BROKER, "0"));
        assert!(names_a_broker(BROKER_LOGGER, "3"));
        assert!(
            !names_a_broker(BROKER, ""),
            "cluster-wide defaults pass through"
        );
        assert!(!names_a_broker(2, "orders"), "topics pass through");
    }
}

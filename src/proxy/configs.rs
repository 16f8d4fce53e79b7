//! Config APIs where a resource names a broker. Clients see shardgate instances as brokers, so
//! a broker resource names a virtual node id that the real cluster does not know.
//!
//! - DescribeConfigs of a virtual broker answers with the configuration of one real broker
//!   (the lowest id: brokers of one cluster normally share their static configuration),
//!   labelled with the virtual id the client asked for, with every setting that names a real
//!   broker, controller, rack or directory rewritten or dropped (`config_view`).
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
use kafka_protocol::protocol::{Decodable, Encodable, HeaderVersion, StrBytes};

use super::config_view::{VirtualNode, rewrite};
use super::connection::ClientConn;
use super::forward::{any_broker, call_typed, typed_reply};
use super::{Ctx, HandlerError, Reply};
use crate::protocol::{RequestFrame, codes};
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
        ApiKey::AlterConfigs => alter::<AlterConfigsRequest>(ctx, client, req).await,
        _ => alter::<IncrementalAlterConfigsRequest>(ctx, client, req).await,
    }
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
        return super::admin_apis::forward_to_any(ctx, client, req).await;
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
            None => any_broker(ctx, client)?,
        };
        let resp: DescribeConfigsResponse = call_typed(ctx, client, broker, req, &sub).await?;
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
                    virtual_view(ctx, id, &mut result);
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
    typed_reply(req, &resp)
}

/// The representative broker's answer shown as the virtual node's: nothing in it may name a
/// real broker, controller, rack or directory (`config_view` says what is rewritten, what
/// dropped).
fn virtual_view(ctx: &Ctx, virtual_id: i32, result: &mut DescribeConfigsResult) {
    let instances = ctx.cluster.instances();
    let Some((_, addr)) = instances.iter().find(|(id, _)| *id == virtual_id) else {
        return;
    };
    let scheme = if ctx.settings.raw.listener.tls.is_some() {
        "SSL"
    } else {
        "PLAINTEXT"
    };
    let real: Vec<String> = ctx
        .topology()
        .load()
        .brokers
        .values()
        .map(|b| format!("{}:{}", b.host, b.port))
        .collect();
    let node = VirtualNode {
        id: virtual_id,
        scheme,
        host: &addr.host,
        port: addr.port,
    };
    rewrite(result, &node, &real);
}

fn refusal(name: &str) -> String {
    format!(
        "broker {name} is a shardgate instance, not a Kafka broker: per-broker configs are \
         changed on Kafka directly; cluster-wide broker defaults (empty broker name) pass through"
    )
}

/// AlterConfigs and IncrementalAlterConfigs differ only in their types: named brokers are
/// answered here, everything else is forwarded, answers merged in the client's order.
trait BrokerAlter: Encodable + Decodable + HeaderVersion + Clone {
    type Resource;
    type Response: Decodable + Encodable + Default;
    type Answer: Default;
    fn resources(&mut self) -> &mut Vec<Self::Resource>;
    fn named(r: &Self::Resource) -> bool;
    fn refuse(r: &Self::Resource) -> Self::Answer;
    fn answers(resp: &mut Self::Response) -> &mut Vec<Self::Answer>;
}

macro_rules! broker_alter {
    ($req:ty, $resource:ty, $resp:ty, $answer:ty) => {
        impl BrokerAlter for $req {
            type Resource = $resource;
            type Response = $resp;
            type Answer = $answer;
            fn resources(&mut self) -> &mut Vec<$resource> {
                &mut self.resources
            }
            fn named(r: &$resource) -> bool {
                names_a_broker(r.resource_type, &r.resource_name)
            }
            fn refuse(r: &$resource) -> $answer {
                <$answer>::default()
                    .with_error_code(codes::INVALID_REQUEST)
                    .with_error_message(Some(StrBytes::from_string(refusal(&r.resource_name))))
                    .with_resource_type(r.resource_type)
                    .with_resource_name(r.resource_name.clone())
            }
            fn answers(resp: &mut $resp) -> &mut Vec<$answer> {
                &mut resp.responses
            }
        }
    };
}

broker_alter!(
    AlterConfigsRequest,
    kafka_protocol::messages::alter_configs_request::AlterConfigsResource,
    AlterConfigsResponse,
    kafka_protocol::messages::alter_configs_response::AlterConfigsResourceResponse
);
broker_alter!(
    IncrementalAlterConfigsRequest,
    kafka_protocol::messages::incremental_alter_configs_request::AlterConfigsResource,
    IncrementalAlterConfigsResponse,
    IncrementalAnswer
);

async fn alter<A: BrokerAlter>(
    ctx: &Ctx,
    client: &ClientConn,
    req: &RequestFrame,
) -> Result<Reply, HandlerError> {
    let mut body: A = req.decode_body()?;
    if !body.resources().iter().any(A::named) {
        return super::admin_apis::forward_to_any(ctx, client, req).await;
    }
    let mut sub = body.clone();
    sub.resources().retain(|r| !A::named(r));
    let mut forwarded = if sub.resources().is_empty() {
        A::Response::default()
    } else {
        let broker = any_broker(ctx, client)?;
        call_typed::<A, A::Response>(ctx, client, broker, req, &sub).await?
    };
    let mut rest = std::mem::take(A::answers(&mut forwarded)).into_iter();
    *A::answers(&mut forwarded) = body
        .resources()
        .iter()
        .map(|r| {
            if A::named(r) {
                A::refuse(r)
            } else {
                rest.next().unwrap_or_default()
            }
        })
        .collect();
    typed_reply(req, &forwarded)
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

//! The controller's typed admin calls to Kafka for placement: reassignments (start, cancel,
//! list), preferred elections, replication throttles (broker and topic configs). All go on
//! the controller's own connection (`ADMIN_SOCKET`), each answer's error codes checked.

use kafka_protocol::messages::describe_configs_request::DescribeConfigsResource;
use kafka_protocol::messages::incremental_alter_configs_request::{
    AlterConfigsResource, AlterableConfig,
};
use kafka_protocol::messages::list_partition_reassignments_request::ListPartitionReassignmentsTopics;
use kafka_protocol::messages::{
    DescribeConfigsRequest, DescribeConfigsResponse, IncrementalAlterConfigsRequest,
    IncrementalAlterConfigsResponse, ListPartitionReassignmentsRequest,
    ListPartitionReassignmentsResponse,
};

use super::*;

/// Config resource types (DescribeConfigs, IncrementalAlterConfigs).
pub(super) const TOPIC_RESOURCE: i8 = 2;
pub(super) const BROKER_RESOURCE: i8 = 4;
/// IncrementalAlterConfigs operations.
pub(super) const SET: i8 = 0;
pub(super) const DELETE: i8 = 1;
pub(super) const APPEND: i8 = 2;
pub(super) const SUBTRACT: i8 = 3;
/// `config_source` of a broker's own dynamic config (set for that broker id).
pub(super) const DYNAMIC_BROKER_CONFIG: i8 = 1;

pub(super) const LEADER_RATE: &str = "leader.replication.throttled.rate";
pub(super) const FOLLOWER_RATE: &str = "follower.replication.throttled.rate";
pub(super) const LEADER_REPLICAS: &str = "leader.replication.throttled.replicas";
pub(super) const FOLLOWER_REPLICAS: &str = "follower.replication.throttled.replicas";

/// Kafka error codes these calls tolerate or act on.
pub(super) const UNKNOWN_TOPIC_OR_PARTITION: i16 = 3;
pub(super) const ELECTION_NOT_NEEDED: i16 = 84;
pub(super) const NO_REASSIGNMENT_IN_PROGRESS: i16 = 85;

fn name(topic: &str) -> TopicName {
    TopicName(StrBytes::from_string(topic.to_string()))
}

/// One config change of IncrementalAlterConfigs.
pub(super) fn op(key: &str, operation: i8, value: Option<String>) -> AlterableConfig {
    AlterableConfig::default()
        .with_name(StrBytes::from_string(key.to_string()))
        .with_config_operation(operation)
        .with_value(value.map(StrBytes::from_string))
}

impl Controller {
    pub(super) fn admin_broker(&self) -> Result<i32, ControlError> {
        self.pool
            .topology
            .load()
            .any_broker(0)
            .ok_or(ControlError::Upstream(UpstreamError::NoBroker))
    }

    /// AlterPartitionReassignments v0 for one partition: `Some(replicas)` starts (or
    /// re-targets) a reassignment, None cancels the one running. Kafka's error code.
    pub(super) async fn alter_reassignment(
        &self,
        topic: &str,
        partition: i32,
        replicas: Option<&[i32]>,
    ) -> Result<i16, ControlError> {
        let req = AlterPartitionReassignmentsRequest::default()
            .with_timeout_ms(ADMIN_TIMEOUT_MS)
            .with_topics(vec![
                ReassignableTopic::default()
                    .with_name(name(topic))
                    .with_partitions(vec![
                        ReassignablePartition::default()
                            .with_partition_index(partition)
                            .with_replicas(
                                replicas.map(|r| r.iter().map(|b| BrokerId(*b)).collect()),
                            ),
                    ]),
            ]);
        let resp: AlterPartitionReassignmentsResponse = self
            .pool
            .call_on(
                self.admin_broker()?,
                ADMIN_SOCKET,
                ApiKey::AlterPartitionReassignments,
                0,
                None,
                &req,
            )
            .await?;
        Ok(resp
            .responses
            .iter()
            .flat_map(|t| &t.partitions)
            .map(|p| p.error_code)
            .find(|c| *c != 0)
            .unwrap_or(resp.error_code))
    }

    /// The partitions of `topic` Kafka is reassigning now, with the replica set it reports
    /// (old and new replicas together). A topic Kafka does not know is left out, no error.
    pub(super) async fn list_reassignments(
        &self,
        topic: &str,
        partitions: &[i32],
    ) -> Result<HashMap<i32, Vec<i32>>, ControlError> {
        let req = ListPartitionReassignmentsRequest::default()
            .with_timeout_ms(ADMIN_TIMEOUT_MS)
            .with_topics(Some(vec![
                ListPartitionReassignmentsTopics::default()
                    .with_name(name(topic))
                    .with_partition_indexes(partitions.to_vec()),
            ]));
        let resp: ListPartitionReassignmentsResponse = self
            .pool
            .call_on(
                self.admin_broker()?,
                ADMIN_SOCKET,
                ApiKey::ListPartitionReassignments,
                0,
                None,
                &req,
            )
            .await?;
        if resp.error_code != 0 {
            return Err(ControlError::Kafka(format!(
                "ListPartitionReassignments {topic}: error {}",
                resp.error_code
            )));
        }
        Ok(resp
            .topics
            .iter()
            .filter(|t| t.name.0.as_str() == topic)
            .flat_map(|t| &t.partitions)
            .map(|p| (p.partition_index, p.replicas.iter().map(|b| b.0).collect()))
            .collect())
    }

    /// All reassignments Kafka runs, by topic (to see an operator's).
    pub(super) async fn list_all_reassignments(
        &self,
    ) -> Result<HashMap<String, Vec<i32>>, ControlError> {
        let req = ListPartitionReassignmentsRequest::default()
            .with_timeout_ms(ADMIN_TIMEOUT_MS)
            .with_topics(None);
        let resp: ListPartitionReassignmentsResponse = self
            .pool
            .call_on(
                self.admin_broker()?,
                ADMIN_SOCKET,
                ApiKey::ListPartitionReassignments,
                0,
                None,
                &req,
            )
            .await?;
        Ok(resp
            .topics
            .iter()
            .map(|t| {
                (
                    t.name.0.to_string(),
                    t.partitions.iter().map(|p| p.partition_index).collect(),
                )
            })
            .collect())
    }

    /// Preferred leader election for one partition, retried while the controller has not
    /// taken in the new replica order (up to 10 s). Election not needed counts as done.
    pub(super) async fn elect_preferred(
        &self,
        topic: &str,
        partition: i32,
    ) -> Result<(), ControlError> {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let req = ElectLeadersRequest::default()
                .with_election_type(0)
                .with_timeout_ms(10_000)
                .with_topic_partitions(Some(vec![
                    TopicPartitions::default()
                        .with_topic(name(topic))
                        .with_partitions(vec![partition]),
                ]));
            let resp: ElectLeadersResponse = self
                .pool
                .call_on(
                    self.admin_broker()?,
                    ADMIN_SOCKET,
                    ApiKey::ElectLeaders,
                    2,
                    None,
                    &req,
                )
                .await?;
            let code = resp
                .replica_election_results
                .iter()
                .flat_map(|r| &r.partition_result)
                .map(|p| p.error_code)
                .find(|c| *c != 0 && *c != ELECTION_NOT_NEEDED)
                .unwrap_or(if resp.error_code == ELECTION_NOT_NEEDED {
                    0
                } else {
                    resp.error_code
                });
            if code == 0 {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(ControlError::Kafka(format!(
                    "ElectLeaders {topic}/{partition}: error {code}"
                )));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// DescribeConfigs v4 of `keys` of one resource, asked of `broker` (a broker resource
    /// must be asked of that broker: a KRaft broker describes only its own id). Key →
    /// (value, config_source).
    pub(super) async fn describe_configs(
        &self,
        broker: i32,
        resource_type: i8,
        resource: &str,
        keys: &[&str],
    ) -> Result<HashMap<String, (Option<String>, i8)>, ControlError> {
        let req = DescribeConfigsRequest::default().with_resources(vec![
            DescribeConfigsResource::default()
                .with_resource_type(resource_type)
                .with_resource_name(StrBytes::from_string(resource.to_string()))
                .with_configuration_keys(Some(
                    keys.iter()
                        .map(|k| StrBytes::from_string(k.to_string()))
                        .collect(),
                )),
        ]);
        let resp: DescribeConfigsResponse = self
            .pool
            .call_on(broker, ADMIN_SOCKET, ApiKey::DescribeConfigs, 4, None, &req)
            .await?;
        let mut out = HashMap::new();
        for r in &resp.results {
            if r.error_code != 0 {
                return Err(ControlError::Kafka(format!(
                    "DescribeConfigs {resource}: error {}",
                    r.error_code
                )));
            }
            for c in &r.configs {
                out.insert(
                    c.name.to_string(),
                    (c.value.as_ref().map(|v| v.to_string()), c.config_source),
                );
            }
        }
        Ok(out)
    }

    /// IncrementalAlterConfigs v1 of one resource, sent to `broker`. Kafka's error code.
    pub(super) async fn alter_configs(
        &self,
        broker: i32,
        resource_type: i8,
        resource: &str,
        configs: Vec<AlterableConfig>,
    ) -> Result<i16, ControlError> {
        let req = IncrementalAlterConfigsRequest::default().with_resources(vec![
            AlterConfigsResource::default()
                .with_resource_type(resource_type)
                .with_resource_name(StrBytes::from_string(resource.to_string()))
                .with_configs(configs),
        ]);
        let resp: IncrementalAlterConfigsResponse = self
            .pool
            .call_on(
                broker,
                ADMIN_SOCKET,
                ApiKey::IncrementalAlterConfigs,
                1,
                None,
                &req,
            )
            .await?;
        Ok(resp
            .responses
            .iter()
            .map(|r| r.error_code)
            .find(|c| *c != 0)
            .unwrap_or(0))
    }

    /// The size of `topic`/`partition` on `broker` (DescribeLogDirs asked of it: the copy a
    /// new replica has made so far); 0 when it has none yet.
    pub(super) async fn replica_size(
        &self,
        broker: i32,
        topic: &str,
        partition: i32,
    ) -> Result<i64, ControlError> {
        Ok(
            sampler::log_sizes_on(&self.pool, broker, topic, &[partition])
                .await?
                .get(&partition)
                .copied()
                .unwrap_or(0),
        )
    }
}

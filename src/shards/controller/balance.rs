//! Leader balancing: when active shards pile up on one broker, move one partition's
//! leadership (replica reorder + preferred election).

use super::*;

impl Controller {
    /// Moves the leadership of one active shard partition off the busiest broker when active
    /// shards pile up there: its replicas are reordered (AlterPartitionReassignments, same
    /// replica set, so no data moves) to make an in-sync replica on a less loaded broker the
    /// preferred leader, then a preferred election runs (ElectLeaders).
    pub async fn balance_leaders(&self, topic: &str) -> Result<Option<String>, ControlError> {
        let (_, map) = self.current(topic)?;
        let active: Vec<i32> = map.active().iter().map(|s| s.partition).collect();
        let view = self.partition_views(&map);
        let topo = self.pool.topology.load();
        let brokers: Vec<i32> = topo.brokers.keys().copied().collect();
        let Some((partition, to)) = placement::leader_move(&active, &view, &brokers) else {
            return Ok(None);
        };
        let Some(info) = topo
            .topics
            .get(topic.as_bytes())
            .and_then(|t| t.partitions.get(partition as usize))
            .cloned()
        else {
            return Ok(None);
        };
        let mut replicas = info.replicas.clone();
        replicas.retain(|b| *b != to);
        replicas.insert(0, to);
        let broker = topo.any_broker(0).ok_or(UpstreamError::NoBroker)?;
        let name = TopicName(StrBytes::from_string(topic.to_string()));
        let req = AlterPartitionReassignmentsRequest::default()
            .with_timeout_ms(ADMIN_TIMEOUT_MS)
            .with_topics(vec![
                ReassignableTopic::default()
                    .with_name(name.clone())
                    .with_partitions(vec![
                        ReassignablePartition::default()
                            .with_partition_index(partition)
                            .with_replicas(Some(replicas.iter().map(|b| BrokerId(*b)).collect())),
                    ]),
            ]);
        let resp: AlterPartitionReassignmentsResponse = self
            .pool
            .call_on(
                broker,
                ADMIN_SOCKET,
                ApiKey::AlterPartitionReassignments,
                0,
                None,
                &req,
            )
            .await?;
        let code = resp
            .responses
            .iter()
            .flat_map(|t| &t.partitions)
            .map(|p| p.error_code)
            .find(|c| *c != 0)
            .unwrap_or(resp.error_code);
        if code != 0 {
            return Err(ControlError::Kafka(format!(
                "AlterPartitionReassignments {topic}/{partition} to {replicas:?}: error {code}"
            )));
        }
        // The preferred election needs the controller to have the new order; it is applied at
        // once for a reorder, but the broker may still answer "not available" for a moment.
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let req = ElectLeadersRequest::default()
                .with_election_type(0)
                .with_timeout_ms(10_000)
                .with_topic_partitions(Some(vec![
                    TopicPartitions::default()
                        .with_topic(name.clone())
                        .with_partitions(vec![partition]),
                ]));
            let resp: ElectLeadersResponse = self
                .pool
                .call_on(broker, ADMIN_SOCKET, ApiKey::ElectLeaders, 2, None, &req)
                .await?;
            // 84 ELECTION_NOT_NEEDED: the preferred replica leads already.
            let code = resp
                .replica_election_results
                .iter()
                .flat_map(|r| &r.partition_result)
                .map(|p| p.error_code)
                .find(|c| *c != 0 && *c != 84)
                .unwrap_or(if resp.error_code == 84 {
                    0
                } else {
                    resp.error_code
                });
            if code == 0 {
                break;
            }
            if Instant::now() > deadline {
                return Err(ControlError::Kafka(format!(
                    "ElectLeaders {topic}/{partition}: error {code}"
                )));
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        self.pool.topology.request_refresh();
        metrics::counter!("shardgate_leader_moves_total", "topic" => topic.to_string())
            .increment(1);
        Ok(Some(format!(
            "partition {partition}: leader {} -> {to} (active shards of the topic per broker were uneven)",
            info.leader
        )))
    }
}

//! End offsets of shard partitions (ListOffsets on each leader), retried across leader moves.

use super::*;

impl Controller {
    /// Latest offsets of `partitions` of `topic`, retrying retriable errors (a fresh topic's
    /// leaders, a leader moving) for a few seconds.
    pub async fn end_offsets(
        &self,
        topic: &str,
        partitions: &[i32],
    ) -> Result<BTreeMap<i32, i64>, ControlError> {
        let mut wait = Duration::from_millis(50);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match self.end_offsets_once(topic, partitions).await {
                Ok(o) => return Ok(o),
                Err(e) if Instant::now() < deadline => {
                    tracing::debug!(topic, error = %e, "ListOffsets retry");
                    let v = self.pool.topology.load().version;
                    self.pool.topology.refresh_after(v, wait).await;
                    tokio::time::sleep(wait).await;
                    wait = (wait * 2).min(Duration::from_secs(1));
                }
                Err(e) => return Err(e),
            }
        }
    }

    pub(super) async fn end_offsets_once(
        &self,
        topic: &str,
        partitions: &[i32],
    ) -> Result<BTreeMap<i32, i64>, ControlError> {
        let topo = self.pool.topology.load();
        let mut by_leader: BTreeMap<i32, Vec<i32>> = BTreeMap::new();
        for p in partitions {
            let leader = topo
                .leader(topic, *p)
                .ok_or_else(|| ControlError::Kafka(format!("{topic}-{p} has no leader")))?;
            by_leader.entry(leader).or_default().push(*p);
        }
        let mut out = BTreeMap::new();
        for (broker, parts) in by_leader {
            let req = ListOffsetsRequest::default()
                .with_replica_id(BrokerId(-1))
                .with_topics(vec![
                    ListOffsetsTopic::default()
                        .with_name(TopicName(StrBytes::from_string(topic.to_string())))
                        .with_partitions(
                            parts
                                .iter()
                                .map(|p| {
                                    ListOffsetsPartition::default()
                                        .with_partition_index(*p)
                                        .with_timestamp(-1)
                                })
                                .collect(),
                        ),
                ]);
            let resp: ListOffsetsResponse = self
                .pool
                .call(broker, 0, ApiKey::ListOffsets, 7, None, &req)
                .await?;
            for t in resp.topics {
                for p in t.partitions {
                    if p.error_code != 0 {
                        self.pool.topology.request_refresh();
                        return Err(ControlError::Kafka(format!(
                            "ListOffsets {topic}-{}: error {}",
                            p.partition_index, p.error_code
                        )));
                    }
                    out.insert(p.partition_index, p.offset);
                }
            }
        }
        Ok(out)
    }
}

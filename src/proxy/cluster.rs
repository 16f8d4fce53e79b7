//! The virtual cluster clients see: its brokers are the shardgate instances. Partition
//! leadership and group coordination are spread over instances by rendezvous hashing, and every
//! response field that could name a real broker is rewritten here, in one place.

use kafka_protocol::messages::describe_cluster_response::DescribeClusterBroker;
use kafka_protocol::messages::metadata_response::MetadataResponseBroker;
use kafka_protocol::messages::{
    BrokerId, DescribeClusterResponse, FindCoordinatorResponse, MetadataResponse,
};
use kafka_protocol::protocol::StrBytes;
use xxhash_rust::xxh3::xxh3_64_with_seed;

use std::sync::Arc;

use arc_swap::ArcSwap;

use crate::config::HostPort;

pub struct VirtualCluster {
    pub self_id: i32,
    /// The configured instances: the membership until a store registry says who is live.
    configured: Vec<(i32, HostPort)>,
    /// Live instances, sorted by node id (swapped when the registry changes).
    live: ArcSwap<Vec<(i32, HostPort)>>,
}

impl VirtualCluster {
    pub fn new(self_id: i32, instances: Vec<(i32, HostPort)>) -> Self {
        // Configured vs live instances: alert ShardgateInstanceMissing compares the two.
        metrics::gauge!("shardgate_instances_configured").set(instances.len() as f64);
        metrics::gauge!("shardgate_instances_live").set(instances.len() as f64);
        Self {
            self_id,
            live: ArcSwap::from_pointee(instances.clone()),
            configured: instances,
        }
    }

    pub fn instances(&self) -> Arc<Vec<(i32, HostPort)>> {
        self.live.load_full()
    }

    /// Membership from the store's registry: instances whose sessions are alive (this one
    /// always included, so a registry that has not seen us yet cannot empty the cluster).
    pub fn set_live(&self, mut live: Vec<(i32, HostPort)>) {
        if !live.iter().any(|(id, _)| *id == self.self_id)
            && let Some(me) = self.configured.iter().find(|(id, _)| *id == self.self_id)
        {
            live.push(me.clone());
        }
        live.sort_by_key(|(id, _)| *id);
        live.dedup_by_key(|(id, _)| *id);
        metrics::gauge!("shardgate_instances_live").set(live.len() as f64);
        if *self.live.load_full() != live {
            tracing::info!(instances = ?live.iter().map(|(i, _)| *i).collect::<Vec<_>>(), "virtual cluster membership changed");
            self.live.store(Arc::new(live));
        }
    }

    /// Highest-random-weight choice among instances: stable while instances stay, and only the
    /// keys of a leaving instance move.
    fn rendezvous(&self, key: &[u8]) -> i32 {
        self.instances()
            .iter()
            .max_by_key(|(id, _)| xxh3_64_with_seed(key, *id as u64))
            .map(|(id, _)| *id)
            .unwrap_or(self.self_id)
    }

    pub fn leader_for(&self, topic: &str, partition: i32) -> i32 {
        let mut key = Vec::with_capacity(topic.len() + 5);
        key.extend_from_slice(topic.as_bytes());
        key.push(0);
        key.extend_from_slice(&partition.to_be_bytes());
        self.rendezvous(&key)
    }

    pub fn coordinator_for(&self, key_type: i8, key: &str) -> i32 {
        let mut k = Vec::with_capacity(key.len() + 2);
        k.push(key_type as u8);
        k.push(0);
        k.extend_from_slice(key.as_bytes());
        self.rendezvous(&k)
    }

    /// The instance that plays "controller" for clients (the lowest node id).
    pub fn controller_id(&self) -> i32 {
        self.instances()
            .first()
            .map(|(id, _)| *id)
            .unwrap_or(self.self_id)
    }

    fn address(&self, id: i32) -> HostPort {
        let all = self.instances();
        all.iter()
            .find(|(i, _)| *i == id)
            .or_else(|| all.first())
            .map(|(_, a)| a.clone())
            .unwrap_or_else(|| HostPort {
                host: "127.0.0.1".into(),
                port: 9092,
            })
    }

    /// Virtual replica list: the leader first, then other instances, as many as upstream has
    /// replicas (bounded by the number of instances).
    fn replicas(&self, leader: i32, upstream_count: usize) -> Vec<BrokerId> {
        let mut out = vec![BrokerId(leader)];
        for (id, _) in self.instances().iter() {
            if out.len() >= upstream_count {
                break;
            }
            if *id != leader {
                out.push(BrokerId(*id));
            }
        }
        out
    }

    pub fn rewrite_metadata(&self, resp: &mut MetadataResponse) {
        resp.brokers = self
            .instances()
            .iter()
            .map(|(id, a)| {
                MetadataResponseBroker::default()
                    .with_node_id(BrokerId(*id))
                    .with_host(StrBytes::from_string(a.host.clone()))
                    .with_port(a.port as i32)
                    .with_rack(None)
            })
            .collect();
        resp.controller_id = BrokerId(self.controller_id());
        for t in &mut resp.topics {
            let name = t.name.as_ref().map(|n| n.0.to_string()).unwrap_or_default();
            for p in &mut t.partitions {
                let upstream_replicas = p.replica_nodes.len().max(1);
                let upstream_isr = p.isr_nodes.len();
                if p.leader_id.0 < 0 {
                    // No upstream leader (election under way): clients must wait, as with Kafka.
                    p.replica_nodes =
                        self.replicas(self.leader_for(&name, p.partition_index), upstream_replicas);
                    p.isr_nodes.clear();
                } else {
                    let leader = self.leader_for(&name, p.partition_index);
                    p.leader_id = BrokerId(leader);
                    p.replica_nodes = self.replicas(leader, upstream_replicas);
                    p.isr_nodes = self.replicas(leader, upstream_isr.max(1));
                }
                p.offline_replicas.clear();
            }
        }
    }

    pub fn rewrite_find_coordinator(
        &self,
        resp: &mut FindCoordinatorResponse,
        key_type: i8,
        single_key: &str,
    ) {
        if resp.error_code == 0 && resp.coordinators.is_empty() {
            let id = self.coordinator_for(key_type, single_key);
            let a = self.address(id);
            resp.node_id = BrokerId(id);
            resp.host = StrBytes::from_string(a.host.clone());
            resp.port = a.port as i32;
        } else if resp.coordinators.is_empty() {
            resp.node_id = BrokerId(-1);
            resp.host = StrBytes::default();
            resp.port = -1;
        }
        for c in &mut resp.coordinators {
            if c.error_code == 0 {
                let id = self.coordinator_for(key_type, &c.key);
                let a = self.address(id);
                c.node_id = BrokerId(id);
                c.host = StrBytes::from_string(a.host.clone());
                c.port = a.port as i32;
            } else {
                c.node_id = BrokerId(-1);
                c.host = StrBytes::default();
                c.port = -1;
            }
        }
    }

    pub fn rewrite_describe_cluster(&self, resp: &mut DescribeClusterResponse) {
        resp.brokers = self
            .instances()
            .iter()
            .map(|(id, a)| {
                DescribeClusterBroker::default()
                    .with_broker_id(BrokerId(*id))
                    .with_host(StrBytes::from_string(a.host.clone()))
                    .with_port(a.port as i32)
                    .with_rack(None)
            })
            .collect();
        resp.controller_id = BrokerId(self.controller_id());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kafka_protocol::messages::TopicName;
    use kafka_protocol::messages::metadata_response::{
        MetadataResponsePartition, MetadataResponseTopic,
    };

    fn hp(port: u16) -> HostPort {
        HostPort {
            host: "127.0.0.1".into(),
            port,
        }
    }

    fn three() -> VirtualCluster {
        VirtualCluster::new(1, vec![(1, hp(1)), (2, hp(2)), (3, hp(3))])
    }

    #[test]
    fn leaders_spread_over_instances_and_are_stable() {
        let c = three();
        let mut counts = [0; 4];
        for p in 0..300 {
            let l = c.leader_for("t", p);
            assert_eq!(l, c.leader_for("t", p));
            counts[l as usize] += 1;
        }
        for (id, n) in counts.iter().enumerate().skip(1) {
            assert!(*n > 60, "instance {id} leads {n} of 300");
        }
    }

    #[test]
    fn removing_an_instance_moves_only_its_partitions() {
        let c = three();
        let two = VirtualCluster::new(1, vec![(1, hp(1)), (2, hp(2))]);
        for p in 0..200 {
            let before = c.leader_for("t", p);
            if before != 3 {
                assert_eq!(before, two.leader_for("t", p));
            }
        }
    }

    #[test]
    fn metadata_rewrite_leaks_no_upstream_broker() {
        let c = three();
        let mut resp = MetadataResponse::default();
        resp.brokers.push(
            MetadataResponseBroker::default()
                .with_node_id(BrokerId(7))
                .with_host(StrBytes::from_static_str("kafka-7.internal"))
                .with_port(9092),
        );
        resp.controller_id = BrokerId(7);
        let mut t = MetadataResponseTopic::default()
            .with_name(Some(TopicName(StrBytes::from_static_str("t"))));
        for i in 0..6 {
            t.partitions.push(
                MetadataResponsePartition::default()
                    .with_partition_index(i)
                    .with_leader_id(BrokerId(7))
                    .with_leader_epoch(5)
                    .with_replica_nodes(vec![BrokerId(7), BrokerId(8), BrokerId(9)])
                    .with_isr_nodes(vec![BrokerId(7), BrokerId(8)])
                    .with_offline_replicas(vec![BrokerId(9)]),
            );
        }
        resp.topics.push(t);
        c.rewrite_metadata(&mut resp);
        let ids = [1, 2, 3];
        assert!(resp.brokers.iter().all(|b| ids.contains(&b.node_id.0)));
        assert!(ids.contains(&resp.controller_id.0));
        for p in &resp.topics[0].partitions {
            assert!(ids.contains(&p.leader_id.0));
            assert_eq!(p.leader_epoch, 5, "leader epochs pass through");
            assert_eq!(p.replica_nodes.len(), 3);
            assert_eq!(p.isr_nodes.len(), 2);
            assert!(
                p.replica_nodes
                    .iter()
                    .chain(&p.isr_nodes)
                    .all(|r| ids.contains(&r.0))
            );
            assert!(p.offline_replicas.is_empty());
        }
    }
}

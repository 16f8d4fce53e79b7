//! Unit tests of the gate decision and the group tracker.

use super::*;
use crate::shards::map::GateParent;
use bytes::{BufMut, BytesMut};
use std::net::Ipv4Addr;

fn batch(base: i64, len: usize) -> Vec<u8> {
    let mut b = BytesMut::new();
    b.put_i64(base);
    b.put_i32(len as i32);
    b.put_slice(&vec![0u8; len]);
    b.to_vec()
}

fn gate(seal: Option<i64>) -> Gate {
    Gate {
        partition: 5,
        from_offset: Some(100),
        after: vec![GateParent {
            partition: 0,
            seal_offset: seal,
        }],
        created_epoch: 1,
        created_at_ms: 0,
    }
}

#[test]
fn gate_opens_only_after_every_linked_group_passed_the_seal() {
    let t = GroupTracker::default();
    let ip = IpAddr::V4(Ipv4Addr::LOCALHOST);
    t.link(ip, "c1", "g1");
    let who = t.consumer(ip, "c1", 9);
    assert_eq!(who, Consumer::Groups(vec!["g1".into()]));
    assert!(
        !t.gate_open(&who, 9, "t", &gate(None), None),
        "closed until sealed"
    );
    assert!(!t.gate_open(&who, 9, "t", &gate(Some(50)), None));
    t.fetched(&who, 9, "t", 0, 70);
    assert!(
        !t.gate_open(&who, 9, "t", &gate(Some(50)), None),
        "a fetch position is not consumption (clients prefetch)"
    );
    t.committed("g1", "t", 0, 49);
    assert!(!t.gate_open(&who, 9, "t", &gate(Some(50)), None));
    t.committed("g1", "t", 0, 50);
    assert!(t.gate_open(&who, 9, "t", &gate(Some(50)), None));
    // A second group behind the same client id that also consumes the topic: the link
    // is ambiguous, so both must have drained.
    t.link(ip, "c1", "g2");
    let both = t.consumer(ip, "c1", 9);
    assert!(
        t.gate_open(&both, 9, "t", &gate(Some(50)), None),
        "g2 is not known on t"
    );
    t.committed("g2", "t", 0, 10);
    assert!(!t.gate_open(&both, 9, "t", &gate(Some(50)), None));
    t.committed("g2", "t", 0, 55);
    assert!(t.gate_open(&both, 9, "t", &gate(Some(50)), None));
}

#[test]
fn an_unlinked_connection_is_judged_by_the_groups_kafka_says_own_the_partition() {
    // Two instances: this one sees the fetches, the other one the group's commits.
    let t = GroupTracker::default();
    let who = t.consumer(IpAddr::V4(Ipv4Addr::LOCALHOST), "c1", 9);
    assert_eq!(who, Consumer::Connection(9));
    assert!(!t.gate_open(&who, 9, "t", &gate(Some(50)), None));
    assert_eq!(
        t.demand().wanted(),
        vec!["t".to_string()],
        "a held fetch asks"
    );
    let mut state = TopicGroups::default();
    state.owners.insert(5, vec!["g1".into()]);
    state.committed.insert(("g1".into(), 0), 49);
    t.absorb_kafka("t", state.clone());
    t.fetched(&who, 9, "t", 0, 80);
    assert!(
        !t.gate_open(&who, 9, "t", &gate(Some(50)), None),
        "g1 committed 49 < seal 50; the connection's own fetch position does not count"
    );
    state.committed.insert(("g1".into(), 0), 50);
    t.absorb_kafka("t", state);
    assert!(t.gate_open(&who, 9, "t", &gate(Some(50)), None));
    // Kafka's owners also narrow an ambiguous local link.
    let ip = IpAddr::V4(Ipv4Addr::LOCALHOST);
    t.link(ip, "shared", "g1");
    t.link(ip, "shared", "g2");
    t.committed("g2", "t", 0, 1);
    let both = t.consumer(ip, "shared", 10);
    assert!(
        t.gate_open(&both, 10, "t", &gate(Some(50)), None),
        "g2 lags but Kafka says only g1 owns partition 5"
    );
}

#[test]
fn a_group_that_never_commits_is_judged_by_its_fetches_after_the_fallback() {
    let t = GroupTracker::default();
    let ip = IpAddr::V4(Ipv4Addr::LOCALHOST);
    t.link(ip, "c1", "g1");
    let who = t.consumer(ip, "c1", 9);
    t.fetched(&who, 9, "t", 0, 70);
    let now = Some(Duration::ZERO);
    let later = Some(Duration::from_secs(3600));
    assert!(
        !t.gate_open(&who, 9, "t", &gate(Some(50)), now),
        "the first hold starts the clock"
    );
    assert!(
        !t.gate_open(&who, 9, "t", &gate(Some(50)), later),
        "before the fallback time only commits count"
    );
    assert!(t.gate_open(&who, 9, "t", &gate(Some(50)), now));
    assert!(
        t.gate_open(&who, 9, "t", &gate(Some(50)), later),
        "once let through by the fallback it stays open"
    );
    assert!(
        !t.gate_open(&who, 9, "t", &gate(Some(51)), None),
        "no fallback configured"
    );
    // Fetches of a connection linked to two groups count for neither.
    t.link(ip, "c2", "g2");
    t.link(ip, "c2", "g3");
    let both = t.consumer(ip, "c2", 10);
    t.fetched(&both, 10, "t", 0, 70);
    assert!(!t.gate_open(&both, 10, "t", &gate(Some(50)), now));
    assert!(!t.gate_open(&both, 10, "t", &gate(Some(50)), now));
}

#[test]
fn known_assignments_narrow_an_ambiguous_link() {
    let t = GroupTracker::default();
    let ip = IpAddr::V4(Ipv4Addr::LOCALHOST);
    t.link(ip, "rdkafka", "g1");
    t.link(ip, "rdkafka", "g2");
    let who = t.consumer(ip, "rdkafka", 9);
    t.committed("g1", "t", 0, 60);
    t.committed("g2", "t", 0, 10);
    assert!(
        !t.gate_open(&who, 9, "t", &gate(Some(50)), None),
        "both groups could own the fetch"
    );
    // g2's member holds partition 4, not the gated 5: it does not own this fetch.
    t.assigned("g2", 1, "m2", vec![("t".into(), 5)]);
    t.assigned("g1", 1, "m1", vec![("t".into(), 5), ("t".into(), 0)]);
    // A rebalance moved 5 away from g2's member: the old generation is forgotten.
    t.assigned("g2", 2, "m3", vec![("t".into(), 4)]);
    t.assigned("g2", 1, "m2", vec![("t".into(), 5)]);
    assert!(t.gate_open(&who, 9, "t", &gate(Some(50)), None));
    // A fetch of partition 0 by the ambiguous connection is g1's own (only g1 holds 0).
    t.fetched(&who, 9, "t", 0, 70);
    assert_eq!(t.group_fetch_position("g1", "t", 0), 70);
    assert_eq!(t.group_fetch_position("g2", "t", 0), -1);
}

#[test]
fn unlinked_connections_no_group_owns_are_judged_by_their_own_fetches() {
    let t = GroupTracker::default();
    let who = t.consumer(IpAddr::V4(Ipv4Addr::LOCALHOST), "solo", 3);
    assert_eq!(who, Consumer::Connection(3));
    t.fetched(&who, 3, "t", 0, 60);
    assert!(
        !t.gate_open(&who, 3, "t", &gate(Some(50)), None),
        "closed until Kafka's view says whether a group owns the partition"
    );
    t.absorb_kafka("t", TopicGroups::default());
    assert!(t.gate_open(&who, 3, "t", &gate(Some(50)), None));
    assert!(
        !t.gate_open(&who, 4, "t", &gate(Some(50)), None),
        "another connection"
    );
}

#[test]
fn records_are_cut_at_the_first_batch_at_or_after_the_gate() {
    let mut all = batch(90, 20);
    all.extend(batch(95, 20));
    all.extend(batch(100, 20));
    all.extend(batch(120, 20));
    let b = Bytes::from(all);
    assert_eq!(records_before(&b, 100).len(), 64);
    assert_eq!(records_before(&b, 90).len(), 0);
    assert_eq!(records_before(&b, 1000).len(), b.len());
}

#[test]
fn a_gate_is_about_to_open_once_the_group_was_delivered_every_parent_up_to_its_seal() {
    let t = GroupTracker::default();
    let ip = IpAddr::V4(Ipv4Addr::LOCALHOST);
    assert!(
        !t.gate_opening(&Consumer::Connection(3), 3, "t", &gate(Some(50))),
        "nothing delivered"
    );
    t.link(ip, "app", "g1");
    let who = t.consumer(ip, "app", 9);
    assert!(!t.gate_opening(&who, 9, "t", &gate(None)), "not sealed");
    t.committed("g1", "t", 0, 10);
    assert!(!t.gate_opening(&who, 9, "t", &gate(Some(50))), "far behind");
    // Another connection of the group (the member holding the parent) reads past the seal:
    // the group has everything before it and only has to commit.
    t.fetched(&who, 4, "t", 0, 30);
    assert!(!t.gate_opening(&who, 9, "t", &gate(Some(50))));
    t.fetched(&who, 4, "t", 0, 60);
    assert!(t.gate_opening(&who, 9, "t", &gate(Some(50))));
    assert!(
        !t.gate_open(&who, 9, "t", &gate(Some(50)), None),
        "about to open is no reason to let records through"
    );
    // A second group behind the same address and client id that is far behind: not yet.
    t.link(ip, "app", "g2");
    t.committed("g2", "t", 0, 5);
    let both = t.consumer(ip, "app", 9);
    assert!(!t.gate_opening(&both, 9, "t", &gate(Some(50))));
    // A connection linked to no group: its own fetch positions.
    let alone = Consumer::Connection(7);
    t.fetched(&alone, 7, "t", 0, 49);
    assert!(!t.gate_opening(&alone, 7, "t", &gate(Some(50))));
    t.fetched(&alone, 7, "t", 0, 50);
    assert!(t.gate_opening(&alone, 7, "t", &gate(Some(50))));
}

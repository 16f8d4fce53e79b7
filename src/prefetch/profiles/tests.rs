//! Profiles without I/O: linking, generations, bounds.

use super::*;

fn ip(last: u8) -> IpAddr {
    IpAddr::from([127, 0, 0, last])
}

fn f(topic: &str, partition: i32, from: i64, next: Option<i64>, bytes: usize) -> Fetched<'_> {
    Fetched {
        topic,
        partition,
        from,
        next,
        bytes,
    }
}

fn tps(list: &[(&str, i32)]) -> Vec<Tp> {
    list.iter().map(|(t, p)| (t.to_string(), *p)).collect()
}

#[test]
fn a_fetch_connection_joins_the_member_of_its_address_and_client_id() {
    let p = Profiles::new(100);
    p.assigned(
        "g",
        "m1",
        "c",
        ip(1),
        Protocol::Classic,
        1,
        tps(&[("t", 0)]),
    );
    p.committed("g", "t", 0, 5);
    p.fetched(
        7,
        ip(1),
        "c",
        0,
        Instant::now(),
        [f("t", 0, 5, Some(9), 100)],
    );
    p.fetched(8, ip(2), "c", 0, Instant::now(), [f("t", 1, 0, None, 0)]);
    let s = p.snapshot();
    assert_eq!(s.len(), 2);
    assert_eq!(s[0].member.as_deref(), Some("m1"));
    assert_eq!(s[0].connections, vec![7]);
    assert_eq!(
        s[0].partitions,
        vec![PartitionView {
            topic: "t".into(),
            partition: 0,
            position: 9,
            committed: 5,
            content_similarity: None
        }]
    );
    assert_eq!(s[0].delivered_records, 4);
    assert!(
        s[0].records_per_sec > 0.0,
        "records of a connection's only fetch count in its rate"
    );
    assert_eq!(s[1].group, None);
    assert_eq!(s[1].connections, vec![8]);
}

#[test]
fn members_sharing_a_client_id_are_told_apart_by_their_assignments() {
    let p = Profiles::new(100);
    p.assigned(
        "g",
        "a",
        "rdkafka",
        ip(1),
        Protocol::Classic,
        3,
        tps(&[("t", 0)]),
    );
    p.assigned(
        "g",
        "b",
        "rdkafka",
        ip(1),
        Protocol::Classic,
        3,
        tps(&[("t", 1)]),
    );
    p.fetched(
        1,
        ip(1),
        "rdkafka",
        0,
        Instant::now(),
        [f("t", 1, 0, Some(2), 10)],
    );
    let s = p.snapshot();
    let b = s.iter().find(|c| c.member.as_deref() == Some("b")).unwrap();
    assert_eq!(b.connections, vec![1]);
    let a = s.iter().find(|c| c.member.as_deref() == Some("a")).unwrap();
    assert!(a.connections.is_empty());
}

#[test]
fn a_connection_that_fetched_partitions_before_a_rebalance_moved_them_stays_linked() {
    // Member a held every partition first (it joined alone) and fetched them all; then b
    // joined and took half. a's connection fetched partitions it no longer owns, but only
    // before its current assignment: what it fetched since decides.
    let p = Profiles::new(100);
    let all = tps(&[("t", 0), ("t", 1), ("t", 2), ("t", 3)]);
    p.assigned("g", "a", "c", ip(1), Protocol::Classic, 1, all);
    p.fetched(
        1,
        ip(1),
        "c",
        0,
        Instant::now(),
        (0..4).map(|i| f("t", i, 0, None, 0)).collect::<Vec<_>>(),
    );
    // A long poll asked before the rebalance is answered after it.
    let asked_before = Instant::now();
    std::thread::sleep(Duration::from_millis(2));
    p.assigned(
        "g",
        "a",
        "c",
        ip(1),
        Protocol::Classic,
        2,
        tps(&[("t", 0), ("t", 1)]),
    );
    p.assigned(
        "g",
        "b",
        "c",
        ip(1),
        Protocol::Classic,
        2,
        tps(&[("t", 2), ("t", 3)]),
    );
    p.fetched(
        1,
        ip(1),
        "c",
        0,
        asked_before,
        (0..4).map(|i| f("t", i, 0, None, 0)).collect::<Vec<_>>(),
    );
    std::thread::sleep(Duration::from_millis(2));
    p.fetched(
        1,
        ip(1),
        "c",
        0,
        Instant::now(),
        [f("t", 0, 0, Some(5), 50), f("t", 1, 0, Some(5), 50)],
    );
    p.fetched(
        2,
        ip(1),
        "c",
        0,
        Instant::now(),
        [f("t", 2, 0, Some(5), 50), f("t", 3, 0, Some(5), 50)],
    );
    let s = p.snapshot();
    let a = s.iter().find(|c| c.member.as_deref() == Some("a")).unwrap();
    assert_eq!(a.connections, vec![1], "{s:?}");
    assert!(a.partitions.iter().all(|v| v.position == 5), "{s:?}");
    let b = s.iter().find(|c| c.member.as_deref() == Some("b")).unwrap();
    assert_eq!(b.connections, vec![2], "{s:?}");
    assert_eq!(s.len(), 2, "no connection left unlinked: {s:?}");
}

#[test]
fn a_connection_asks_for_a_first_sample_until_one_is_taken() {
    let p = Profiles::new(100);
    assert!(
        !p.fetched(1, ip(1), "c", 0, Instant::now(), [f("t", 0, 0, None, 0)]),
        "nothing delivered"
    );
    assert!(p.fetched(
        1,
        ip(1),
        "c",
        0,
        Instant::now(),
        [f("t", 0, 0, Some(3), 30)]
    ));
    // The sampler's queue was full: the next delivery asks again.
    assert!(p.fetched(
        1,
        ip(1),
        "c",
        0,
        Instant::now(),
        [f("t", 0, 3, Some(6), 30)]
    ));
    p.sampled(1);
    assert!(!p.fetched(
        1,
        ip(1),
        "c",
        0,
        Instant::now(),
        [f("t", 0, 6, Some(9), 30)]
    ));
}

#[test]
fn a_new_classic_generation_drops_the_old_members_and_old_answers_are_ignored() {
    let p = Profiles::new(100);
    p.assigned("g", "a", "c", ip(1), Protocol::Classic, 1, tps(&[("t", 0)]));
    p.assigned("g", "b", "c", ip(1), Protocol::Classic, 2, tps(&[("t", 1)]));
    let s = p.snapshot();
    assert_eq!(s.len(), 1);
    assert_eq!(s[0].member.as_deref(), Some("b"));
    p.assigned("g", "b", "c", ip(1), Protocol::Classic, 1, tps(&[("t", 9)]));
    assert_eq!(p.snapshot()[0].partitions[0].partition, 1);
    p.left("g", "b");
    assert!(p.snapshot().is_empty());
}

#[test]
fn members_are_bounded() {
    let p = Profiles::new(10);
    for i in 0..50 {
        p.assigned(
            "g",
            &format!("m{i}"),
            "c",
            ip(1),
            Protocol::Consumer,
            i,
            vec![],
        );
    }
    assert_eq!(p.sizes().0, 10);
    for i in 0..20_000 {
        p.committed("g", "t", i, 1);
    }
    assert!(p.lock().committed["g"].len() <= MAX_COMMITTED_PER_GROUP);
}

#[test]
fn partitions_rank_by_routing_values_and_content_together() {
    let p = Profiles::new(100);
    p.fetched(
        7,
        ip(1),
        "c",
        0,
        Instant::now(),
        [f("t", 0, 0, Some(1), 10)],
    );
    // Delivered on connection 7: mostly pets (a warm-up topic).
    for _ in 0..20 {
        p.routed(7, "warm", 0, "header:type", "pets");
    }
    // Partition 1 carries pets, partition 2 markets; partition 3 nothing sampled.
    for _ in 0..5 {
        p.routed(7, "t", 1, "header:type", "pets");
        p.routed(7, "t", 2, "header:type", "markets");
    }
    let a = p.affinities(7, &[("t", 1), ("t", 2), ("t", 3)]);
    assert!(a[0].unwrap() > 0.9 && a[1].unwrap() < 0.3, "{a:?}");
    assert_eq!(a[2], None);
    // Content too: the mean of both (markets content that matches perfectly lifts p2 by half).
    p.content(7, "warm", 0, &[0.0, 1.0]);
    p.content(7, "t", 2, &[0.0, 1.0]);
    let b = p.affinities(7, &[("t", 1), ("t", 2)]);
    assert_eq!(b[0], a[0], "no content sampled for p1: routing alone");
    assert!(
        (b[1].unwrap() - (a[1].unwrap() + 1.0) / 2.0).abs() < 1e-3,
        "{b:?}"
    );
    // An unknown connection ranks nothing.
    assert_eq!(p.affinities(99, &[("t", 1)]), vec![None]);
}

#!/usr/bin/env python3
"""Time to first record after a rebalance (bench/prefetch): a group member commits an offset
on every partition and leaves; a member with the same client id joins and the time from its
assignment (on_assign) to its first record is measured. Each round uses offsets no earlier
round used, so nothing read before can answer it.

    rejoin_first_record.py BOOTSTRAP TOPIC PARTITIONS FIRST_OFFSET ROUNDS STEP

Prints one line per round: `first_record_ms=<float>` and a summary line.
"""
import statistics
import sys
import time
import uuid

from confluent_kafka import Consumer, TopicPartition


def member(bootstrap, group):
    return Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": group,
            "client.id": "bench-rejoin",
            "enable.auto.commit": False,
            "auto.offset.reset": "earliest",
            "isolation.level": "read_uncommitted",
            "session.timeout.ms": 10000,
        }
    )


def main():
    bootstrap, topic = sys.argv[1], sys.argv[2]
    partitions, first, rounds, step = (int(x) for x in sys.argv[3:7])
    times = []
    for r in range(rounds):
        group = "bench-rejoin-" + uuid.uuid4().hex[:12]
        offset = first + r * step
        # The first member commits where the next one starts, then leaves.
        a = member(bootstrap, group)
        a.subscribe([topic])
        a_start = time.perf_counter()
        while not a.assignment():
            a.poll(0.05)
            if time.perf_counter() - a_start > 30:
                raise SystemExit("first member not assigned")
        a.commit(
            offsets=[TopicPartition(topic, p, offset) for p in range(partitions)],
            asynchronous=False,
        )
        a.close()
        # The member that rejoins: assignment → first record.
        b = member(bootstrap, group)
        t_assign = []
        b.subscribe(
            [topic], on_assign=lambda _c, parts: t_assign.append(time.perf_counter())
        )
        start = time.perf_counter()
        while True:
            m = b.poll(0.001)
            if m is not None and m.error() is None:
                t_first = time.perf_counter()
                if m.offset() < offset:
                    raise SystemExit("record below the committed offset")
                break
            if time.perf_counter() - start > 30:
                raise SystemExit("no record within 30 s of joining")
        if not t_assign:
            raise SystemExit("a record came without an assignment")
        ms = (t_first - t_assign[0]) * 1000.0
        times.append(ms)
        print("first_record_ms=%.2f" % ms, flush=True)
        b.close()
    print(
        "summary rounds=%d median_ms=%.2f min_ms=%.2f max_ms=%.2f"
        % (len(times), statistics.median(times), min(times), max(times)),
        flush=True,
    )


if __name__ == "__main__":
    main()

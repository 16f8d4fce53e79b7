#!/usr/bin/env python3
"""Several groups reading the same partitions at once (bench/prefetch-groups): GROUPS
consumers, each in a group of its own, start together and read TOTAL records of TOPIC from the
beginning. Prints per group the seconds it took, then a summary line.

    groups_read.py BOOTSTRAP TOPIC GROUPS TOTAL
"""
import sys
import threading
import time
import uuid

from confluent_kafka import Consumer


def read(bootstrap, topic, total, out, i, start):
    c = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": "bench-groups-" + uuid.uuid4().hex[:12],
            "enable.auto.commit": False,
            "auto.offset.reset": "earliest",
        }
    )
    c.subscribe([topic])
    start.wait()
    began = time.perf_counter()
    got = 0
    while got < total:
        if time.perf_counter() - began > 120:
            raise SystemExit(f"group {i}: {got} of {total} records in 120 s")
        for m in c.consume(num_messages=10000, timeout=0.2):
            if m.error() is None:
                got += 1
    out[i] = time.perf_counter() - began
    c.close()


def main():
    bootstrap, topic = sys.argv[1], sys.argv[2]
    groups, total = int(sys.argv[3]), int(sys.argv[4])
    out = [None] * groups
    start = threading.Event()
    threads = [
        threading.Thread(target=read, args=(bootstrap, topic, total, out, i, start))
        for i in range(groups)
    ]
    for t in threads:
        t.start()
    start.set()
    for t in threads:
        t.join()
    if any(x is None for x in out):
        raise SystemExit("a group did not finish")
    for i, s in enumerate(out):
        print(f"group {i} seconds={s:.3f}")
    print(f"summary groups={groups} records={total} slowest_s={max(out):.3f}")


if __name__ == "__main__":
    main()

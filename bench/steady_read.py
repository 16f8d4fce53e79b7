#!/usr/bin/env python3
"""Steady consumers (bench/prefetch-steady): a producer writes RATE records/s to TOPIC directly
at Kafka (PRODUCE_BOOTSTRAP) for SECONDS, each value carrying its send time; CONSUMERS members of
one new group read the topic through BOOTSTRAP from the end at start. Prints per member the
records read, then a summary line: records, end-to-end latency (send to receipt) p50/p99, and
the consumers' request round trip to their fetch brokers (librdkafka statistics, `rtt`: mostly
fetches) p50/p99, averaged over 1 s windows.

With BACKLOG > 0 the producer first writes BACKLOG records, and the members read from the
beginning (consumers behind, catching up while new records keep coming): the summary adds
the time from the group's first record to the last backlog record read (`catchup_s`), and the
latencies are those of the records sent after the backlog.

With PACE > 0 (and a backlog) each member handles at most PACE records/s, with a small local
queue (librdkafka's `queued.max.messages.kbytes` 256, fetches of 64 KiB): a consumer that works
through what is already there at its own steady rate and fetches as its queue drains (like the
Java consumer, which fetches a partition again once it has handed out what it had). It stays
behind the log end for the whole run if the backlog lasts: PACE is per member, and librdkafka
may take one partition's records far faster than the other's, so BACKLOG / PARTITIONS above
SECONDS x (PACE - RATE / PARTITIONS) keeps every partition behind; the summary gives the
records read, the fetch round trips (what prefetch can shorten here) and `tail_members`, the
members whose fetching reached a partition's log end during the window (their fetches there
wait for new records: no read-ahead has them), no end-to-end latency (the records waited in
the backlog by design).

With SHARDGATE_METRICS set (a shardgate's /metrics URL), its prefetch counters are also read
at two moments of the steady part of the run: a third of SECONDS after the producer started
and just before the members stop; the `window` line gives their differences. Precision over
the whole run counts what is still queued when the members stop as never delivered (a
read-ahead of SECONDS at most); the window shows the steady state.

    steady_read.py BOOTSTRAP PRODUCE_BOOTSTRAP TOPIC CONSUMERS RATE SECONDS [BACKLOG [PACE]]
"""
import json
import os
import statistics
import sys
import threading
import time
import urllib.request
import uuid

from confluent_kafka import Consumer, Producer

WINDOW = {
    "hits": "shardgate_prefetch_hits_total",
    "misses": "shardgate_prefetch_misses_total",
    "late": "shardgate_prefetch_late_total",
    "prefetched": "shardgate_prefetch_prefetched_records_total",
    "delivered": "shardgate_prefetch_delivered_records_total",
}


def counters(url):
    """Each WINDOW counter summed over its series, and the time it was read."""
    text = urllib.request.urlopen(url, timeout=5).read().decode()
    got = dict.fromkeys(WINDOW, 0.0)
    for line in text.splitlines():
        name = line.split("{")[0].split(" ")[0]
        for k, metric in WINDOW.items():
            if name == metric:
                got[k] += float(line.rsplit(" ", 1)[1])
    return time.time(), got


def percentile(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))] if xs else float("nan")


def consume(bootstrap, topic, group, stop, e2e, rtts, counts, i, ready, backlog, progress, pace):
    def stats(text):
        s = json.loads(text)
        if pace and progress["window"]:
            # A paced member meant to stay behind: did its fetching reach the log end of a
            # partition during the window (then its fetches there wait for new records, which
            # no read-ahead can have)?
            for t in s.get("topics", {}).values():
                for p in t.get("partitions", {}).values():
                    if (p.get("partition", -1) >= 0 and p.get("fetch_state") == "active"
                            and 0 <= p.get("hi_offset", -1) <= p.get("next_offset", -1)):
                        progress["tails"].add(i)
        for b in s.get("brokers", {}).values():
            # Broker handles of the cluster (fetches), not the coordinator or bootstrap ones.
            if b.get("nodeid", -1) >= 0 and b.get("rtt", {}).get("cnt", 0) > 0:
                rtts.append((b["rtt"]["p50"] / 1000.0, b["rtt"]["p99"] / 1000.0))

    config = {
        "bootstrap.servers": bootstrap,
        "group.id": group,
        "enable.auto.commit": True,
        "auto.offset.reset": "earliest" if backlog else "latest",
        "statistics.interval.ms": 1000,
        "stats_cb": stats,
    }
    if pace:
        config.update(
            {
                "fetch.max.bytes": 65536,
                "message.max.bytes": 65536,
                "max.partition.fetch.bytes": 65536,
                "queued.max.messages.kbytes": 256,
                "fetch.queue.backoff.ms": 10,
            }
        )
    c = Consumer(config)
    c.subscribe([topic], on_assign=lambda *_: ready.release())
    got = 0
    due = None
    while not stop.is_set():
        # poll, not consume(num_messages=N): consume waits for N records or its timeout,
        # which would add up to that timeout to every record's latency.
        m = c.poll(0.1)
        if m is not None and m.error() is None:
            got += 1
            if pace:
                due = (due or time.monotonic()) + 1.0 / pace
                wait = due - time.monotonic()
                if wait > 0:
                    time.sleep(wait)
                continue
            if backlog:
                now = time.time()
                with progress["lock"]:
                    progress["first"] = progress["first"] or now
                    if m.value()[20:21] == b"b":
                        progress["backlog"] += 1
                        if progress["backlog"] == backlog:
                            progress["caught_up"] = now
                        continue
            e2e.append(time.time() - float(m.value()[:20]))
    counts[i] = got
    c.close()


def main():
    bootstrap, produce_bootstrap, topic = sys.argv[1], sys.argv[2], sys.argv[3]
    consumers, rate, seconds = int(sys.argv[4]), int(sys.argv[5]), float(sys.argv[6])
    backlog = int(sys.argv[7]) if len(sys.argv) > 7 else 0
    pace = float(sys.argv[8]) if len(sys.argv) > 8 else 0.0
    if pace and not backlog:
        raise SystemExit("PACE needs a BACKLOG to work through")
    progress = {"lock": threading.Lock(), "first": None, "backlog": 0, "caught_up": None,
                "window": False, "tails": set()}
    pad = b"x" * 180
    if backlog:
        # Spread evenly over the partitions (round robin; librdkafka's sticky partitioner put
        # uneven runs of it on each, and a member whose partitions got little caught up within
        # seconds) in batches of 16 KiB, the Java producer's default (librdkafka's 1 MB
        # batches are each answered whole, one fetch per 5 s at PACE 1000).
        p = Producer({"bootstrap.servers": produce_bootstrap, "linger.ms": 5, "acks": 1,
                      "batch.size": 16384})
        parts = len(p.list_topics(topic, timeout=20).topics[topic].partitions)
        for n in range(backlog):
            while True:
                try:
                    p.produce(topic, value=f"{time.time():20.6f}".encode() + b"b" + pad[1:],
                              partition=n % parts)
                    break
                except BufferError:
                    p.poll(0.01)
        p.flush(60)
    group = "bench-steady-" + uuid.uuid4().hex[:12]
    stop = threading.Event()
    e2e, rtts, counts = [], [], [0] * consumers
    ready = threading.Semaphore(0)
    threads = [
        threading.Thread(
            target=consume,
            args=(bootstrap, topic, group, stop, e2e, rtts, counts, i, ready, backlog, progress, pace),
        )
        for i in range(consumers)
    ]
    for t in threads:
        t.start()
    # Every member assigned (first callback each) before records flow.
    for _ in range(consumers):
        if not ready.acquire(timeout=60):
            raise SystemExit("the group did not form within 60 s")
    if not backlog:
        time.sleep(1.0)
    p = Producer({"bootstrap.servers": produce_bootstrap, "linger.ms": 1, "acks": 1})
    began = time.time()
    sent = 0
    metrics_url = os.environ.get("SHARDGATE_METRICS")
    window = []
    while time.time() - began < seconds:
        if metrics_url and not window and time.time() - began >= seconds / 3:
            window.append(counters(metrics_url))
            progress["window"] = True
        due = int((time.time() - began) * rate)
        while sent < due:
            p.produce(topic, value=f"{time.time():20.6f}".encode() + pad)
            sent += 1
        p.poll(0)
        time.sleep(0.002)
    p.flush(30)
    time.sleep(2.0)  # the last records reach the consumers
    while backlog and not pace and progress["caught_up"] is None and time.time() - began < seconds + 120:
        time.sleep(0.5)
    if window:
        window.append(counters(metrics_url))
    progress["window"] = False
    stop.set()
    for t in threads:
        t.join()
    for i, n in enumerate(counts):
        print(f"member {i} records={n}")
    ms = [x * 1000 for x in e2e]
    rtt50 = statistics.mean(r[0] for r in rtts) if rtts else float("nan")
    rtt99 = statistics.mean(r[1] for r in rtts) if rtts else float("nan")
    if len(window) == 2:
        (t0, a), (t1, b) = window
        print(
            f"window seconds={t1 - t0:.1f} "
            + " ".join(f"{k}={b[k] - a[k]:.0f}" for k in WINDOW)
        )
    if pace:
        print(
            f"summary sent={sent} records={sum(counts)} e2e_p50_ms=nan e2e_p99_ms=nan "
            f"rtt_p50_ms={rtt50:.2f} rtt_p99_ms={rtt99:.2f} catchup_s=nan "
            f"tail_members={len(progress['tails'])}"
        )
        return
    print(
        f"summary sent={sent} records={len(e2e) + progress['backlog']} e2e_p50_ms={percentile(ms, 0.5):.2f} "
        f"e2e_p99_ms={percentile(ms, 0.99):.2f} rtt_p50_ms={rtt50:.2f} rtt_p99_ms={rtt99:.2f}"
        + (
            f" catchup_s={progress['caught_up'] - progress['first']:.3f}"
            if backlog and progress["caught_up"]
            else (" catchup_s=nan" if backlog else "")
        )
    )


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""A small CLI over kafka-python and confluent-kafka, so the integration tests can drive both
Python clients the same way as kcat, franz-go and the Java tools.

  kclient.py --lib kafka-python|confluent produce --brokers B --topic T --count N
             [--codec none|gzip|snappy|lz4|zstd] [--key-prefix P] [--value-prefix V]
             [--keys K --rate R]   (K keys, value "<key>:<seq>" with a per-key sequence, R records/s)
  kclient.py --lib ... consume --brokers B --topic T --group G --count N [--timeout S] [--idle S]
  kclient.py --lib ... admin create|describe|delete --brokers B --topic T [--partitions P] [--rf R]
  kclient.py --lib ... probe --brokers B     (connect and read metadata: {"ok": ..., "error": ...})

Security (before the command): --ca PEM (TLS), --sasl MECHANISM --user U (SASL; the password
from the environment variable KCLIENT_PASSWORD, so it is not on a command line).

Every command prints one JSON object on stdout. `consume` commits exactly the offsets it
processed (synchronously, before exiting), so a second run resumes right after them.
"""
import argparse
import json
import os
import sys
import time


def kp_tls(a):
    """kafka-python TLS and SASL settings (--ca, --sasl)."""
    s = {"security_protocol": "SSL", "ssl_cafile": a.ca} if a.ca else {}
    if a.sasl:
        s["security_protocol"] = "SASL_SSL" if a.ca else "SASL_PLAINTEXT"
        s.update(sasl_mechanism=a.sasl, sasl_plain_username=a.user,
                 sasl_plain_password=os.environ.get("KCLIENT_PASSWORD", ""))
    return s


def ck_tls(a):
    """confluent-kafka TLS and SASL settings (--ca, --sasl)."""
    s = {"security.protocol": "ssl", "ssl.ca.location": a.ca} if a.ca else {}
    if a.sasl:
        s["security.protocol"] = "sasl_ssl" if a.ca else "sasl_plaintext"
        s["sasl.mechanism"] = a.sasl
        if a.sasl == "OAUTHBEARER":
            s.update({"enable.sasl.oauthbearer.unsecure.jwt": True,
                      "sasl.oauthbearer.config": f"principal={a.user}"})
        else:
            s.update({"sasl.username": a.user,
                      "sasl.password": os.environ.get("KCLIENT_PASSWORD", "")})
    return s


def probe_kafka_python(a):
    from kafka.admin import KafkaAdminClient
    try:
        adm = KafkaAdminClient(bootstrap_servers=a.brokers, request_timeout_ms=10000,
                               **kp_tls(a))
        topics = adm.list_topics()
        adm.close()
        return {"ok": True, "topics": len(topics)}
    except Exception as e:  # noqa: BLE001 - the error is the result
        return {"ok": False, "error": repr(e)}


def probe_confluent(a):
    from confluent_kafka import Producer
    errors = []
    p = Producer({"bootstrap.servers": a.brokers, **ck_tls(a),
                  "error_cb": lambda e: errors.append(str(e))})
    try:
        md = p.list_topics(timeout=8)
        return {"ok": True, "topics": len(md.topics), "errors": errors[:5]}
    except Exception as e:  # noqa: BLE001 - the error is the result
        # Error callbacks (the broker's reason) are served by poll.
        for _ in range(10):
            p.poll(0.2)
        return {"ok": False, "error": str(e), "errors": errors[:5]}


def record(a, i):
    """Key and value of record i: one key per record, or K keys with per-key sequences."""
    if a.keys:
        key = f"{a.key_prefix}{i % a.keys}"
        return key, f"{key}:{i // a.keys}"
    return f"{a.key_prefix}{i}", f"{a.value_prefix}{i}"


def pace(a, i, started):
    """Sleeps so that record i leaves at the requested rate."""
    if a.rate:
        ahead = started + i / a.rate - time.time()
        if ahead > 0:
            time.sleep(ahead)


def produce_kafka_python(a):
    from kafka import KafkaProducer
    codec = None if a.codec == "none" else a.codec
    # max_in_flight 1 keeps per-key order across retries (kafka-python has no idempotence).
    p = KafkaProducer(bootstrap_servers=a.brokers, acks="all", compression_type=codec,
                      retries=10, linger_ms=5, max_in_flight_requests_per_connection=1,
                      **kp_tls(a))
    futures = []
    started = time.time()
    for i in range(a.count):
        pace(a, i, started)
        k, v = record(a, i)
        futures.append(p.send(a.topic, key=k.encode(), value=v.encode()))
    acked = 0
    errors = []
    for f in futures:
        try:
            f.get(timeout=60)
            acked += 1
        except Exception as e:  # noqa: BLE001 - report every failure
            errors.append(repr(e))
    p.flush()
    p.close()
    return {"acked": acked, "errors": errors[:5]}


def produce_confluent(a):
    from confluent_kafka import Producer
    p = Producer({"bootstrap.servers": a.brokers, "acks": "all", "compression.type": a.codec,
                  "enable.idempotence": True, "linger.ms": 5, **ck_tls(a)})
    state = {"acked": 0, "errors": []}

    def cb(err, _msg):
        if err is None:
            state["acked"] += 1
        else:
            state["errors"].append(str(err))

    started = time.time()
    for i in range(a.count):
        pace(a, i, started)
        k, v = record(a, i)
        while True:
            try:
                p.produce(a.topic, key=k, value=v, on_delivery=cb)
                break
            except BufferError:
                p.poll(0.1)
        p.poll(0)
    remaining = p.flush(60)
    if remaining:
        state["errors"].append(f"{remaining} not delivered after 60 s")
    state["errors"] = state["errors"][:5]
    return state


def consume_kafka_python(a):
    from kafka import KafkaConsumer, TopicPartition
    from kafka.structs import OffsetAndMetadata
    c = KafkaConsumer(a.topic, bootstrap_servers=a.brokers, group_id=a.group,
                      client_id=f"kclient-{a.group}", **kp_tls(a),
                      auto_offset_reset="earliest", enable_auto_commit=False,
                      max_poll_records=100)
    records = []
    deadline = time.time() + a.timeout
    last = time.time()
    while len(records) < a.count and time.time() < deadline:
        if a.idle and records and time.time() - last > a.idle:
            break
        batch = c.poll(timeout_ms=500)
        if batch:
            last = time.time()
        offsets = {}
        for tp, msgs in batch.items():
            for m in msgs:
                if len(records) >= a.count:
                    break
                records.append([m.key.decode() if m.key else None, m.value.decode(), tp.partition, m.offset])
                offsets[TopicPartition(tp.topic, tp.partition)] = OffsetAndMetadata(m.offset + 1, "", -1)
        if offsets:
            c.commit(offsets)
    c.close(autocommit=False)
    return {"consumed": len(records), "records": records}


def consume_confluent(a):
    from confluent_kafka import Consumer, TopicPartition
    c = Consumer({"bootstrap.servers": a.brokers, "group.id": a.group,
                  "client.id": f"kclient-{a.group}", **ck_tls(a),
                  "auto.offset.reset": "earliest", "enable.auto.commit": False})
    c.subscribe([a.topic])
    records = []
    deadline = time.time() + a.timeout
    last = time.time()
    while len(records) < a.count and time.time() < deadline:
        if a.idle and records and time.time() - last > a.idle:
            break
        msgs = c.consume(num_messages=100, timeout=0.5)
        if msgs:
            last = time.time()
        offsets = {}
        for m in msgs:
            if m.error():
                continue
            if len(records) >= a.count:
                break
            records.append([m.key().decode() if m.key() else None, m.value().decode(), m.partition(), m.offset()])
            offsets[(m.topic(), m.partition())] = m.offset() + 1
        if offsets:
            c.commit(offsets=[TopicPartition(t, p, o) for (t, p), o in offsets.items()], asynchronous=False)
    c.close()
    return {"consumed": len(records), "records": records}


def admin_kafka_python(a):
    from kafka.admin import KafkaAdminClient, NewTopic
    adm = KafkaAdminClient(bootstrap_servers=a.brokers, **kp_tls(a))
    try:
        if a.action == "create":
            adm.create_topics([NewTopic(a.topic, a.partitions, a.rf)])
            return {"created": a.topic}
        if a.action == "delete":
            adm.delete_topics([a.topic])
            return {"deleted": a.topic}
        d = adm.describe_topics([a.topic])[0]
        return {"topic": a.topic, "partitions": len(d["partitions"]), "error": d["error_code"]}
    finally:
        adm.close()


def admin_confluent(a):
    from confluent_kafka.admin import AdminClient, NewTopic
    adm = AdminClient({"bootstrap.servers": a.brokers, **ck_tls(a)})
    if a.action == "create":
        adm.create_topics([NewTopic(a.topic, a.partitions, a.rf)])[a.topic].result(30)
        return {"created": a.topic}
    if a.action == "delete":
        adm.delete_topics([a.topic])[a.topic].result(30)
        return {"deleted": a.topic}
    md = adm.list_topics(a.topic, timeout=30)
    t = md.topics[a.topic]
    return {"topic": a.topic, "partitions": len(t.partitions),
            "error": t.error.code() if t.error else 0}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--lib", choices=["kafka-python", "confluent"], required=True)
    ap.add_argument("--ca", help="CA certificate (PEM): connect with TLS")
    ap.add_argument("--sasl", help="SASL mechanism (PLAIN, SCRAM-SHA-256, SCRAM-SHA-512, OAUTHBEARER)")
    ap.add_argument("--user", default="")
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("produce")
    p.add_argument("--brokers", required=True)
    p.add_argument("--topic", required=True)
    p.add_argument("--count", type=int, required=True)
    p.add_argument("--codec", default="none", choices=["none", "gzip", "snappy", "lz4", "zstd"])
    p.add_argument("--key-prefix", default="k-")
    p.add_argument("--value-prefix", default="v-")
    p.add_argument("--keys", type=int, default=0)
    p.add_argument("--rate", type=float, default=0)
    c = sub.add_parser("consume")
    c.add_argument("--brokers", required=True)
    c.add_argument("--topic", required=True)
    c.add_argument("--group", required=True)
    c.add_argument("--count", type=int, required=True)
    c.add_argument("--timeout", type=float, default=60)
    c.add_argument("--idle", type=float, default=0, help="stop after this many seconds without records")
    d = sub.add_parser("admin")
    d.add_argument("action", choices=["create", "describe", "delete"])
    d.add_argument("--brokers", required=True)
    d.add_argument("--topic", required=True)
    d.add_argument("--partitions", type=int, default=6)
    d.add_argument("--rf", type=int, default=1)
    q = sub.add_parser("probe")
    q.add_argument("--brokers", required=True)
    a = ap.parse_args()
    lib = "kafka_python" if a.lib == "kafka-python" else "confluent"
    fn = globals()[f"{a.cmd}_{lib}"]
    print(json.dumps(fn(a)))
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python3
"""Runs Kafka operations as one SASL user with confluent-kafka (librdkafka) and prints, for
each, what Kafka's answer was: "OK" (with a detail) or the error's name, so the authorization
tests can check every rule, allowed and denied, through a real client.

  authz.py --brokers B [--user U [--mechanism SCRAM-SHA-256]] [--ca PEM [--cert PEM --key PEM]] STEP...

With --user the client authenticates with SASL (password from the environment variable
KCLIENT_PASSWORD); with --ca over TLS, with --cert/--key presenting a client certificate. Steps (":"-separated):
  produce:T:N  idempotent:T:N   N records (keys k0..), acks=all
  fetch:T:P:G                   assign partitions 0..P-1 from offset 0 (G: group.id, no commits)
  consume:T:G:N                 subscribe in group G, read N, commit them
  topics:PREFIX                 list topics (Metadata for all topics) starting with PREFIX
  describe:T                    Metadata for T by name
  create:T (waits until listed)  delete:T  partitions:T:N  acl:T  delete_records:T:OFFSET
  groups:PREFIX  describe_group:G  configs:T  alter_configs:T
Prints one JSON object: {"<step>": "OK..." | "ERROR_NAME[,OTHER]"}.
"""
import argparse
import json
import os
import sys
import time

from confluent_kafka import Consumer, KafkaException, Producer, TopicPartition
from confluent_kafka.admin import (AclBinding, AclOperation, AclPermissionType, AdminClient,
                                   ConfigResource, NewPartitions, NewTopic, ResourcePatternType,
                                   ResourceType)



def err_name(e):
    if isinstance(e, KafkaException) and e.args:
        e = e.args[0]
    name = getattr(e, "name", None)
    return name() if callable(name) else repr(e)


def result(fut, timeout=30):
    try:
        return "OK", fut.result(timeout)
    except Exception as e:  # noqa: BLE001 - the error is the result
        return err_name(e), None


def produce(conf, topic, n, idempotent):
    errs, done = set(), [0]

    def cb(err, _msg):
        if err:
            errs.add(err.name())
        else:
            done[0] += 1
    p = Producer({**conf, "acks": "all", "enable.idempotence": idempotent,
                  "message.timeout.ms": 15000})
    for i in range(n):
        p.produce(topic, key=f"k{i}", value=f"v{i}", on_delivery=cb)
        p.poll(0)
    p.flush(30)
    return f"OK:{done[0]}" if not errs else ",".join(sorted(errs))


def drain(c, want, limit):
    got, errs = 0, set()
    deadline = time.time() + limit
    while got < want and time.time() < deadline:
        for m in c.consume(num_messages=100, timeout=0.5):
            if m.error():
                if m.error().name() != "_PARTITION_EOF":
                    errs.add(m.error().name())
            else:
                got += 1
        if errs and got == 0 and time.time() > deadline - limit + 5:
            break
    return got, errs


def fetch(conf, topic, parts, group):
    c = Consumer({**conf, "group.id": group, "enable.auto.commit": False,
                  "enable.auto.offset.store": False})
    c.assign([TopicPartition(topic, p, 0) for p in range(parts)])
    got, errs = drain(c, 1_000_000, 12)
    c.close()
    return f"OK:{got}" if not errs else ",".join(sorted(errs))


def consume(conf, topic, group, n):
    c = Consumer({**conf, "group.id": group, "enable.auto.commit": False,
                  "auto.offset.reset": "earliest"})
    c.subscribe([topic])
    got, errs = drain(c, n, 40)
    if got and not errs:
        try:
            c.commit(asynchronous=False)
        except KafkaException as e:
            errs.add(err_name(e))
    c.close()
    return f"OK:{got}" if not errs else ",".join(sorted(errs))


def step(conf, adm, s):
    kind, *args = s.split(":")
    if kind in ("produce", "idempotent"):
        return produce(conf, args[0], int(args[1]), kind == "idempotent")
    if kind == "fetch":
        return fetch(conf, args[0], int(args[1]), args[2])
    if kind == "consume":
        return consume(conf, args[0], args[1], int(args[2]))
    if kind == "topics":
        md = adm.list_topics(timeout=20)
        return "OK:" + ",".join(sorted(t for t in md.topics if t.startswith(args[0])))
    if kind == "describe":
        try:
            md = adm.list_topics(topic=args[0], timeout=20)
        except KafkaException as e:
            return err_name(e)
        t = md.topics.get(args[0])
        return "OK" if t is not None and t.error is None else (t.error.name() if t else "MISSING")
    if kind == "create":
        got = result(adm.create_topics([NewTopic(args[0], 1, int(os.environ.get("RF", "1")))])[args[0]])[0]
        if got == "OK":
            # Kafka answers CreateTopics once the controller has it; each broker's metadata follows
            # a moment later, so a listing right after may not have it yet (seen in CI).
            deadline = time.time() + 15
            while args[0] not in adm.list_topics(timeout=20).topics and time.time() < deadline:
                time.sleep(0.2)
        return got
    if kind == "delete":
        return result(adm.delete_topics([args[0]])[args[0]])[0]
    if kind == "partitions":
        return result(adm.create_partitions([NewPartitions(args[0], int(args[1]))])[args[0]])[0]
    if kind == "acl":
        b = AclBinding(ResourceType.TOPIC, args[0], ResourcePatternType.LITERAL, "User:nobody", "*",
                       AclOperation.READ, AclPermissionType.ALLOW)
        return result(adm.create_acls([b])[b])[0]
    if kind == "delete_records":
        tp = TopicPartition(args[0], 0, int(args[1]))
        code, r = result(adm.delete_records([tp])[tp])
        return f"OK:{r.low_watermark}" if code == "OK" else code
    if kind == "groups":
        code, r = result(adm.list_consumer_groups())
        if code != "OK":
            return code
        return "OK:" + ",".join(sorted(g.group_id for g in r.valid if g.group_id.startswith(args[0])))
    if kind == "describe_group":
        code, r = result(adm.describe_consumer_groups([args[0]])[args[0]])
        return f"OK:{r.state.name}" if code == "OK" else code
    if kind == "configs":
        res = ConfigResource(ConfigResource.Type.TOPIC, args[0])
        code, r = result(adm.describe_configs([res])[res])
        return f"OK:{len(r)}" if code == "OK" else code
    if kind == "alter_configs":
        from confluent_kafka.admin import AlterConfigOpType, ConfigEntry
        res = ConfigResource(ConfigResource.Type.TOPIC, args[0], incremental_configs=[
            ConfigEntry("retention.ms", "3600000", incremental_operation=AlterConfigOpType.SET)])
        return result(adm.incremental_alter_configs([res])[res])[0]
    raise SystemExit(f"unknown step {s}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--brokers", required=True)
    ap.add_argument("--user", default="", help="SASL user (none: no SASL)")
    ap.add_argument("--mechanism", default="SCRAM-SHA-256")
    ap.add_argument("--ca", help="TLS: the listener's CA (PEM)")
    ap.add_argument("--cert", help="TLS: this client's certificate (PEM), for mTLS")
    ap.add_argument("--key", help="TLS: this client's key (PEM)")
    ap.add_argument("steps", nargs="+")
    a = ap.parse_args()
    conf = {"bootstrap.servers": a.brokers,
            "security.protocol": ("sasl_" if a.user else "") + ("ssl" if a.ca else "plaintext")}
    if a.user:
        conf.update({"sasl.mechanism": a.mechanism, "sasl.username": a.user,
                     "sasl.password": os.environ.get("KCLIENT_PASSWORD", "")})
    if a.ca:
        conf["ssl.ca.location"] = a.ca
    if a.cert:
        conf.update({"ssl.certificate.location": a.cert, "ssl.key.location": a.key})
    adm = AdminClient(conf)
    out = {}
    for s in a.steps:
        out[s] = step(conf, adm, s)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())

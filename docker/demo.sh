#!/bin/bash
# docker/compose.yaml's load generator: a managed topic (4 shards, autoscaling on) through the
# admin API of shardgate-1, keyed records produced through shardgate-1 without end, and a
# consumer group reading through shardgate-2.
set -euo pipefail
admin=http://shardgate-1:9100
# The Kafka image has busybox wget, not curl.
until wget -q -O /dev/null "$admin/readyz"; do sleep 1; done
wget -q -O- --header 'content-type: application/json' \
  --post-data '{"name":"demo","route_by":["key"],"initial_shards":4,"pool":16,"replication_factor":3}' \
  "$admin/api/v1/topics" || true # already created by an earlier run
/opt/kafka/bin/kafka-console-consumer.sh --bootstrap-server shardgate-2:9092 --topic demo \
  --group demo-readers >/dev/null &
i=0
while true; do
  for _ in $(seq 1000); do echo "user-$((RANDOM % 500)):{\"type\":\"order\",\"n\":$i}"; i=$((i + 1)); done
  sleep 1
done | /opt/kafka/bin/kafka-console-producer.sh --bootstrap-server shardgate-1:9092 --topic demo \
  --property parse.key=true --property key.separator=:

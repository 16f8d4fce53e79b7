# Sourced by bench scripts. Topics are created and deleted in batches through the Python
# admin client of the testbed's venv (one JVM start per topic would cost seconds each):
#   bench_admin BOOTSTRAP PARTITIONS RF create|delete TOPIC...
bench_admin() {
  "$VENV/bin/python" - "$@" <<'PY'
import sys
from confluent_kafka.admin import AdminClient, NewTopic
boot, parts, rf, op, names = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5:]
a = AdminClient({"bootstrap.servers": boot})
if op == "create":
    fs = a.create_topics([NewTopic(n, parts, rf) for n in names], operation_timeout=30)
else:
    fs = a.delete_topics(names, operation_timeout=30)
for n, f in fs.items():
    f.result()
PY
}

#!/usr/bin/env python3
"""Static check of docker/compose.yaml (no Docker engine needed): it parses, every file it
mounts or builds from exists, and ports and addresses agree with the shardgate configs it
mounts, the Prometheus and Grafana configs, and README's "Docker" section. Exit 1 with the
list of problems. Needs PyYAML (the testbed's venv has it).

    python3 docker/check.py
"""
import pathlib
import re
import sys
import tomllib

import yaml

HERE = pathlib.Path(__file__).resolve().parent
ROOT = HERE.parent
problems = []


def check(cond, what):
    if not cond:
        problems.append(what)


compose = yaml.safe_load((HERE / "compose.yaml").read_text())
services = compose["services"]
names = set(services)
for want in ["kafka-1", "kafka-2", "kafka-3", "consul", "shardgate-1", "shardgate-2",
             "prometheus", "grafana", "demo"]:
    check(want in names, f"no service {want}")


def host_ports(svc):
    out = {}
    for p in svc.get("ports", []):
        host, container = str(p).split(":")
        out[int(container)] = int(host)
    return out


# Mounted files and build inputs exist.
for name, svc in services.items():
    for v in svc.get("volumes", []):
        src = v.split(":")[0]
        check((HERE / src).exists(), f"{name}: mounted {src} does not exist")
    b = svc.get("build")
    if b:
        ctx = (HERE / b["context"]).resolve()
        check((ctx / b["dockerfile"]).exists(), f"{name}: no {b['dockerfile']} in {ctx}")
    for dep in svc.get("depends_on", []) or []:
        check(dep in names, f"{name}: depends on unknown service {dep}")

# Kafka: three KRaft voters, each advertising its own service name.
voters = None
for i in (1, 2, 3):
    env = services[f"kafka-{i}"]["environment"]
    check(str(env["KAFKA_NODE_ID"]) == str(i), f"kafka-{i}: node id {env['KAFKA_NODE_ID']}")
    check(env["KAFKA_ADVERTISED_LISTENERS"] == f"PLAINTEXT://kafka-{i}:9092",
          f"kafka-{i}: advertises {env['KAFKA_ADVERTISED_LISTENERS']}")
    check(len(env["CLUSTER_ID"]) == 22, "CLUSTER_ID is not a 22-character base64 uuid")
    voters = env["KAFKA_CONTROLLER_QUORUM_VOTERS"]
check(voters == "1@kafka-1:9093,2@kafka-2:9093,3@kafka-3:9093", f"voters {voters}")

# shardgate: each mounts its own config; the config's addresses are the compose names.
admin_ports = {}
for n in (1, 2):
    name = f"shardgate-{n}"
    svc = services[name]
    mount = [v for v in svc["volumes"] if v.split(":")[1] == "/etc/shardgate/shardgate.toml"]
    check(len(mount) == 1, f"{name}: config not mounted at /etc/shardgate/shardgate.toml")
    cfg = tomllib.loads((HERE / mount[0].split(":")[0]).read_text())
    check(cfg["listener"]["advertised"] == f"{name}:9092", f"{name}: advertises {cfg['listener']['advertised']}")
    check(cfg["listener"]["bind"].endswith(":9092"), f"{name}: listener bind")
    check(cfg["listener"]["node_id"] == n, f"{name}: node_id")
    check([i["advertised"] for i in cfg["instances"]] == ["shardgate-1:9092", "shardgate-2:9092"],
          f"{name}: instances")
    for b in cfg["upstream"]["bootstrap"]:
        host, port = b.split(":")
        check(host in names and host.startswith("kafka-") and port == "9092", f"{name}: bootstrap {b}")
    admin_port = int(cfg["admin"]["bind"].split(":")[1])
    ports = host_ports(svc)
    check(admin_port in ports, f"{name}: admin port {admin_port} not published")
    admin_ports[name] = (admin_port, ports.get(admin_port))
    store = cfg["store"]
    check(store.get("kind") == "consul" and store["consul_addr"] == "http://consul:8500",
          f"{name}: store {store}")

# Prometheus scrapes both admin ports; Grafana's datasource is that Prometheus.
prom = yaml.safe_load((HERE / "prometheus.yml").read_text())
targets = prom["scrape_configs"][0]["static_configs"][0]["targets"]
check(sorted(targets) == sorted(f"{n}:{p}" for n, (p, _) in admin_ports.items()),
      f"prometheus targets {targets}")
check(host_ports(services["prometheus"]).get(9090) == 9090, "prometheus port")
mounted = {v.split(":")[1]: v.split(":")[0] for v in services["prometheus"]["volumes"]}
for rules in prom.get("rule_files", []):
    check(rules in mounted and (HERE / mounted[rules]).exists(),
          f"prometheus rule file {rules} is not mounted from the repository")
ds = yaml.safe_load((ROOT / "grafana/provisioning/datasources/prometheus.yaml").read_text())
check(ds["datasources"][0]["url"] == "http://prometheus:9090", "grafana datasource url")
prov = yaml.safe_load((ROOT / "grafana/provisioning/dashboards/shardgate.yaml").read_text())
dash_path = prov["providers"][0]["options"]["path"]
check(any(v.endswith(":" + dash_path + ":ro") and "grafana/dashboards" in v
          for v in services["grafana"]["volumes"]), "grafana dashboards not mounted where provisioned")

# README's Docker section names the published ports.
readme = (ROOT / "README.md").read_text()
section = re.search(r"^## Docker\n(.*?)(?=^## )", readme, re.S | re.M)
check(section is not None, "README has no '## Docker' section")
if section:
    text = section.group(1)
    for n, (_, host) in admin_ports.items():
        check(str(host) in text, f"README's Docker section does not name {n}'s admin port {host}")
    for port in ("9090", "3000"):
        check(port in text, f"README's Docker section does not name port {port}")
    check("docker compose -f docker/compose.yaml up" in text, "README's Docker section has no run command")

if problems:
    print("\n".join(problems))
    sys.exit(1)
print(f"compose ok: {len(services)} services, {sum(len(s.get('volumes', [])) for s in services.values())} mounts")

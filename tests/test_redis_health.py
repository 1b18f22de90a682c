"""Redis's health for Prometheus and Grafana: the exporter under the stack, the scrape config, the alerts."""
import contextlib
import json
import re
import subprocess

import pytest
import redis
import requests

from prometheus_client.parser import text_string_to_metric_families

from conftest import ROOT, free_port, stop_process, wait_until
from deployment import ResumingClient

ALERTS = (ROOT / "deploy/alerts.yml").read_text()

METRIC = re.compile(r"\b((?:redis|haproxy|scalechat)_\w+)")


def named_metrics(promql):
    """The redis_, haproxy_ and scalechat_ series a PromQL text names (not its labels)."""
    without_labels = re.sub(r"\{[^}]*\}|\b(?:by|without|on|ignoring)\s*\([^)]*\)|\$labels\.\w+", "",
                            promql)
    return set(METRIC.findall(without_labels))


def settings(stack):
    return dict(line.split("=", 1) for line in (stack.var / "stack.env").read_text().splitlines()
                if not line.startswith("#"))


def metric_names(text):
    """Every series name in a Prometheus text exposition, with its family from # TYPE."""
    names = set()
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            family, kind = line.split()[2:4]
            names.add(family)
            suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_count", "_sum"],
                        "summary": ["_count", "_sum"]}.get(kind, [])
            names.update(family + suffix for suffix in suffixes)
        elif line and not line.startswith("#"):
            names.add(re.split(r"[{ ]", line, maxsplit=1)[0])
    return names


def exporter(stack, path="/metrics", **params):
    return requests.get(f"http://127.0.0.1:{stack.env['REDIS_EXPORTER_PORT']}{path}", params=params,
                        timeout=10).text


@contextlib.contextmanager
def replica_of(stack, directory):
    """A Redis replicating the stack's, with its password, as a node of a Sentinel set would."""
    password = settings(stack)["REDIS_PASSWORD"]
    port = free_port()
    proc = subprocess.Popen(
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--dir", str(directory),
         "--save", "", "--appendonly", "no", "--replicaof", "127.0.0.1", stack.env["REDIS_PORT"]],
        stdin=subprocess.PIPE, stdout=subprocess.DEVNULL)
    try:
        client = redis.Redis(port=port)

        def linked():
            try:
                return client.info("replication").get("master_link_status") == "up"
            except redis.ConnectionError:
                assert proc.poll() is None, "the replica exited"
                return False
        wait_until(lambda: client_ready(client, proc), what="the replica to listen")
        # the password goes in by command, not the command line
        client.config_set("masterauth", password)
        client.config_set("requirepass", password)
        client = redis.Redis(port=port, password=password)
        wait_until(linked, timeout=60, what="the replica's link to the stack's Redis")
        yield port
    finally:
        stop_process(proc)


def client_ready(client, proc):
    try:
        return client.ping()
    except redis.ConnectionError:
        assert proc.poll() is None, "redis-server exited"
        return False


def test_the_alert_rules_and_the_scrape_config_check():
    rules = subprocess.run(["promtool", "check", "rules", str(ROOT / "deploy/alerts.yml")],
                           capture_output=True, text=True, timeout=60)
    assert rules.returncode == 0, rules.stdout + rules.stderr
    config = subprocess.run(["promtool", "check", "config", str(ROOT / "deploy/prometheus.yml")],
                            capture_output=True, text=True, timeout=60)
    assert config.returncode == 0, config.stdout + config.stderr
    assert "1 rule files found" in config.stdout


def test_the_exporter_runs_under_the_stack_without_showing_the_password(stack):
    metrics = exporter(stack)
    assert "\nredis_up 1\n" in metrics
    samples = {sample.name: sample for family in text_string_to_metric_families(metrics)
               for sample in family.samples}
    assert samples["redis_memory_max_bytes"].value == 512 << 20  # REDIS_MAXMEMORY's default
    assert 'redis_instance_info{' in metrics and 'role="master"' in metrics
    pid = int(stack.ctl("pid", "redis-exporter").strip())
    command_line = open(f"/proc/{pid}/cmdline", "rb").read().decode()
    assert settings(stack)["REDIS_PASSWORD"] not in command_line
    assert f"127.0.0.1:{stack.env['REDIS_EXPORTER_PORT']}" in command_line
    listening = subprocess.run(["ss", "-Htlnp"], capture_output=True, text=True).stdout
    exporter_sockets = [line.split()[3] for line in listening.splitlines() if f"pid={pid}," in line]
    assert exporter_sockets == [f"127.0.0.1:{stack.env['REDIS_EXPORTER_PORT']}"]


def charted_and_alerted():
    """The series the Grafana dashboard charts and the alerts name."""
    dashboard = json.loads((ROOT / "deploy/grafana-dashboard.json").read_text())
    return {name for panel in dashboard["panels"] for target in panel["targets"]
            for name in named_metrics(target["expr"])} | named_metrics(ALERTS)


CLUSTER_ONLY = {name for name in charted_and_alerted() if name.startswith("redis_cluster_")}


def test_the_dashboard_and_the_alerts_only_name_metrics_that_exist(stack, service_tmp, room):
    """Every redis_, haproxy_ and scalechat_ series named is scraped from the running stack: the
    exporter on the master and on a replica, HAProxy, and scalechat after some chat."""
    alice = ResumingClient("alice", stack).start()
    try:
        alice.enter(room)
        alice.send_reliably(room, "hello")
        assert alice.call("message", {"room": "not-joined", "text": "x", "client_id": "y"})["ok"] is False
    finally:
        alice.close()
    with replica_of(stack, service_tmp) as replica:
        scraped = (exporter(stack) + exporter(stack, "/scrape", target=f"redis://127.0.0.1:{replica}")
                   + requests.get(f"http://127.0.0.1:{stack.env['STATS_PORT']}/metrics", timeout=10).text
                   + requests.get(f"http://127.0.0.1:{stack.env['METRICS_PORT']}/metrics", timeout=10).text)
    exposed = metric_names(scraped)
    dashboard = json.loads((ROOT / "deploy/grafana-dashboard.json").read_text())
    charted = {name for panel in dashboard["panels"] for target in panel["targets"]
               for name in named_metrics(target["expr"])}
    alerted = named_metrics(ALERTS)
    assert {"redis_up", "redis_instance_info", "redis_master_link_up", "haproxy_server_status",
            "scalechat_error_acks_total"} <= alerted
    assert {"redis_memory_used_bytes", "redis_memory_max_bytes", "redis_connected_slave_lag_seconds",
            "redis_master_link_up", "redis_pubsub_channels", "redis_db_keys"} <= charted
    # a single Redis has no cluster: test_cluster_stack.py finds those on the cluster's nodes
    assert sorted(charted - exposed - CLUSTER_ONLY) == []
    assert sorted(alerted - exposed - CLUSTER_ONLY) == []


def redis_labels(instance, **extra):
    return {"job": "scalechat-redis", "instance": instance, "redis_set": "scalechat", **extra}


def series(name, labels):
    return name + "{" + ",".join(f'{key}="{value}"' for key, value in labels.items()) + "}"


MASTER = redis_labels("redis://10.0.0.1:6380")
REPLICA = redis_labels("redis://10.0.0.2:6380")
LAG = {**MASTER, "slave_ip": "10.0.0.2", "slave_port": "6380"}
WORKER_DOWN = {"proxy": "workers", "server": "worker-01", "state": "DOWN", "host": "chat-1"}
WORKERS = {"proxy": "workers", "host": "chat-1"}
SET = {"redis_set": "scalechat"}
CLUSTER = {"redis_cluster": "scalechat"}
CLUSTER_MASTER = {"job": "scalechat-redis", "instance": "redis://10.0.1.1:6380", **CLUSTER}
CLUSTER_REPLICA = {"job": "scalechat-redis", "instance": "redis://10.0.1.2:6380", **CLUSTER}
OTHER_MASTER = {"job": "scalechat-redis", "instance": "redis://10.0.1.3:6380", **CLUSTER}
HEALTHY_CLUSTER = [  # a shard of a Redis Cluster, a master and its replica, and another master
    ("redis_up", CLUSTER_MASTER, "1x40"), ("redis_up", CLUSTER_REPLICA, "1x40"),
    ("redis_instance_info", {**CLUSTER_MASTER, "role": "master", "redis_mode": "cluster"}, "1x40"),
    ("redis_instance_info", {**CLUSTER_REPLICA, "role": "slave", "redis_mode": "cluster"}, "1x40"),
    ("redis_connected_slaves", CLUSTER_MASTER, "1x40"), ("redis_connected_slaves", CLUSTER_REPLICA, "0x40"),
    ("redis_master_link_up", CLUSTER_REPLICA, "1x40"),
    ("redis_cluster_state", CLUSTER_MASTER, "1x40"), ("redis_cluster_state", CLUSTER_REPLICA, "1x40"),
    ("redis_cluster_slots_fail", CLUSTER_MASTER, "0x40"), ("redis_cluster_slots_pfail", CLUSTER_MASTER, "0x40"),
    ("redis_cluster_known_nodes", CLUSTER_MASTER, "3x40"), ("redis_cluster_known_nodes", CLUSTER_REPLICA, "3x40"),
    ("redis_up", OTHER_MASTER, "1x40"), ("redis_connected_slaves", OTHER_MASTER, "1x40"),
    ("redis_instance_info", {**OTHER_MASTER, "role": "master", "redis_mode": "cluster"}, "1x40")]
HEALTHY = [*HEALTHY_CLUSTER, ("redis_up", MASTER, "1x40"), ("redis_up", REPLICA, "1x40"),
           ("redis_instance_info", {**MASTER, "role": "master"}, "1x40"),
           ("redis_instance_info", {**REPLICA, "role": "slave"}, "1x40"),
           ("redis_memory_used_bytes", MASTER, "100x40"), ("redis_memory_max_bytes", MASTER, "1000x40"),
           ("redis_master_link_up", REPLICA, "1x40"), ("redis_connected_slave_lag_seconds", LAG, "0x40"),
           ("haproxy_backend_active_servers", WORKERS, "2x40"),
           ("haproxy_server_status", WORKER_DOWN, "0x40")]


def changed(*replacements):
    """HEALTHY with some series' values replaced: (name, labels, values)."""
    replaced = {(name, tuple(labels.items())): values for name, labels, values in replacements}
    return [(name, labels, replaced.pop((name, tuple(labels.items())), values))
            for name, labels, values in HEALTHY] + [
        (name, dict(labels), values) for (name, labels), values in replaced.items()]


def without_annotations(rules):
    """The rules file without its annotations, which promtool would otherwise match word for word."""
    kept, skipping = [], None
    for line in rules.splitlines():
        indent = len(line) - len(line.lstrip())
        if skipping is not None and (not line.strip() or indent > skipping):
            continue
        skipping = indent if line.strip() == "annotations:" else None
        if skipping is None:
            kept.append(line)
    return "\n".join(kept) + "\n"


@pytest.mark.parametrize("case", [
    {"name": "a healthy master and replica", "series": HEALTHY, "fires": {}},
    {"name": "the master goes down", "series": changed(
        ("redis_up", MASTER, "1 0x40"), ("redis_instance_info", {**MASTER, "role": "master"}, "1 stale"),
        ("redis_master_link_up", REPLICA, "1 0x40")),
     "fires": {"RedisDown": [MASTER], "RedisMasterMissing": [SET], "RedisReplicaLinkDown": [REPLICA]}},
    {"name": "an old master is back beside the new one", "series": changed(
        ("redis_instance_info", {**REPLICA, "role": "slave"}, "stale"),
        ("redis_instance_info", {**REPLICA, "role": "master"}, "1x40")),
     "fires": {"RedisSeveralMasters": [SET]}},
    {"name": "memory near maxmemory, a lagging replica", "series": changed(
        ("redis_memory_used_bytes", MASTER, "950x40"), ("redis_connected_slave_lag_seconds", LAG, "30x40")),
     "fires": {"RedisMemoryNearBound": [MASTER], "RedisReplicaLagHigh": [LAG]}},
    {"name": "a worker fails its checks, then every worker", "series": changed(
        ("haproxy_server_status", WORKER_DOWN, "1x40"),
        ("haproxy_backend_active_servers", WORKERS, "1x5 0x35")),
     "fires": {"ScalechatWorkerNotReady": [WORKER_DOWN], "ScalechatNoWorkerReady": [WORKERS]}},
    {"name": "the exporter cannot be scraped", "series": changed(
        ("up", {"job": "scalechat-redis", "instance": "redis://10.0.0.1:6380"}, "0x40")),
     "fires": {"RedisExporterDown": [{"job": "scalechat-redis", "instance": "redis://10.0.0.1:6380"}]}},
    {"name": "a cluster master is lost and its replica takes over", "series": changed(
        ("redis_up", CLUSTER_MASTER, "1 0x40"),
        ("redis_instance_info", {**CLUSTER_MASTER, "role": "master", "redis_mode": "cluster"}, "1 stale"),
        ("redis_connected_slaves", CLUSTER_MASTER, "1 stale"), ("redis_cluster_state", CLUSTER_MASTER, "1 stale"),
        ("redis_cluster_known_nodes", CLUSTER_MASTER, "3 stale"),
        ("redis_cluster_slots_fail", CLUSTER_MASTER, "0 stale"), ("redis_cluster_slots_pfail", CLUSTER_MASTER, "0 stale"),
        ("redis_instance_info", {**CLUSTER_REPLICA, "role": "slave", "redis_mode": "cluster"}, "1x2 stale"),
        ("redis_instance_info", {**CLUSTER_REPLICA, "role": "master", "redis_mode": "cluster"}, "_x3 1x37"),
        ("redis_master_link_up", CLUSTER_REPLICA, "1 0 stale"),
        ("redis_cluster_state", CLUSTER_REPLICA, "1 0 0 1x37")),
     "fires": {"RedisDown": [CLUSTER_MASTER], "RedisClusterNodeDown": [CLUSTER],
               "RedisClusterShardWithoutReplica": [CLUSTER_REPLICA]}},
    {"name": "a cluster that serves no longer all its slots", "series": changed(
        ("redis_cluster_state", CLUSTER_MASTER, "1 0x39"), ("redis_cluster_slots_fail", CLUSTER_MASTER, "0 5461x39"),
        ("redis_cluster_slots_pfail", CLUSTER_MASTER, "0 5461x39")),
     "fires": {"RedisClusterStateNotOk": [CLUSTER_MASTER], "RedisClusterSlotsFailed": [CLUSTER_MASTER],
               "RedisClusterSlotsPFail": [CLUSTER_MASTER]}},
], ids=lambda case: case["name"])
def test_the_alerts_fire_when_they_should_and_only_then(tmp_path, case):
    """`promtool test rules` on deploy/alerts.yml: six minutes of made-up samples, then which
    alerts fire, with which labels (every other alert must stay silent)."""
    severities = dict(re.findall(r"- alert: (\w+)\n.*?severity: (\w+)", ALERTS, re.S))
    assert len(severities) == ALERTS.count("- alert: ")
    checks = [{"alertname": alert, "eval_time": "6m",
               "exp_alerts": [{"exp_labels": {**labels, "severity": severity}}
                              for labels in case["fires"].get(alert, [])]}
              for alert, severity in sorted(severities.items())]
    (tmp_path / "alerts.yml").write_text(without_annotations(ALERTS))
    (tmp_path / "tests.yml").write_text(json.dumps({  # JSON is YAML too
        "rule_files": ["alerts.yml"], "evaluation_interval": "15s",
        "tests": [{"interval": "15s", "alert_rule_test": checks,
                   "input_series": [{"series": series(name, labels), "values": values}
                                    for name, labels, values in case["series"]]}]}))
    result = subprocess.run(["promtool", "test", "rules", str(tmp_path / "tests.yml")],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.fixture
def prometheus(stack, service_tmp):
    """Prometheus with deploy/prometheus.yml and deploy/alerts.yml, pointed at this stack's ports."""
    def start(extra_redis_targets=()):
        config = (ROOT / "deploy/prometheus.yml").read_text()
        redis_targets = ", ".join(f'"{target}"' for target in
                                  [f"redis://127.0.0.1:{stack.env['REDIS_PORT']}", *extra_redis_targets])
        for old, new in [("scrape_interval: 15s", "scrape_interval: 2s"),
                         ("evaluation_interval: 15s", "evaluation_interval: 2s"),
                         ('"127.0.0.1:9105"', f'"127.0.0.1:{stack.env["METRICS_PORT"]}"'),
                         ('"127.0.0.1:8404"', f'"127.0.0.1:{stack.env["STATS_PORT"]}"'),
                         ('["redis://127.0.0.1:6380"]', f"[{redis_targets}]"),
                         ("replacement: 127.0.0.1:9122",
                          f"replacement: 127.0.0.1:{stack.env['REDIS_EXPORTER_PORT']}")]:
            assert config.count(old) == 1, old
            config = config.replace(old, new)
        directory = service_tmp / "prometheus"
        directory.mkdir()
        (directory / "prometheus.yml").write_text(config)
        (directory / "alerts.yml").write_text(ALERTS)
        url = f"http://127.0.0.1:{free_port()}"
        proc = subprocess.Popen(["prometheus", f"--config.file={directory}/prometheus.yml",
                                 f"--storage.tsdb.path={directory}/data",
                                 f"--web.listen-address={url.removeprefix('http://')}"],
                                stdout=subprocess.DEVNULL, stderr=open(directory / "log", "w"))
        started.append(proc)

        def ready():
            assert proc.poll() is None, (directory / "log").read_text()[-2000:]
            try:
                return requests.get(url + "/-/ready", timeout=2).ok
            except requests.ConnectionError:
                return False
        wait_until(ready, timeout=60, what="Prometheus to start")
        return url
    started = []
    yield start
    for proc in started:
        stop_process(proc)


def query(url, expr):
    answer = requests.get(url + "/api/v1/query", params={"query": expr}, timeout=10).json()
    assert answer["status"] == "success", (expr, answer)
    return answer["data"]["result"]


def test_prometheus_scrapes_every_node_through_one_exporter(stack, service_tmp, prometheus):
    """deploy/prometheus.yml as shipped, plus a replica as a second node of the Redis set: every
    target is up, the dashboard's queries run, and a healthy stack fires no alert."""
    with replica_of(stack, service_tmp) as replica:
        url = prometheus([f"redis://127.0.0.1:{replica}"])

        def all_up():
            targets = requests.get(url + "/api/v1/targets", timeout=10).json()["data"]["activeTargets"]
            return len(targets) == 4 and all(target["health"] == "up" for target in targets) and targets
        targets = wait_until(all_up, timeout=60, what="every target up")
        assert {target["labels"]["job"] for target in targets} == {
            "scalechat", "scalechat-haproxy", "scalechat-redis"}

        def roles():
            return {sample["metric"]["instance"]: sample["metric"]["role"]
                    for sample in query(url, 'redis_instance_info{job="scalechat-redis"}')}
        wait_until(lambda: len(roles()) == 2, timeout=30, what="both Redis nodes scraped")
        assert roles() == {f"redis://127.0.0.1:{stack.env['REDIS_PORT']}": "master",
                           f"redis://127.0.0.1:{replica}": "slave"}
        memory = query(url, 'redis_memory_max_bytes{job="scalechat-redis"}')
        assert {float(sample["value"][1]) for sample in memory} >= {float(512 << 20)}
        wait_until(lambda: query(url, "redis_master_link_up"), timeout=30, what="the replica's link")
        assert [sample["value"][1] for sample in query(url, "redis_master_link_up")] == ["1"]

        dashboard = json.loads((ROOT / "deploy/grafana-dashboard.json").read_text())
        for panel in dashboard["panels"]:
            for target in panel["targets"]:
                query(url, target["expr"])
        for expr in ('redis_memory_used_bytes{job="scalechat-redis"}',
                     'rate(redis_commands_processed_total{job="scalechat-redis"}[1m])',
                     'redis_connected_slave_lag_seconds{job="scalechat-redis"}'):
            wait_until(lambda: query(url, expr), timeout=30, what=expr)

        # a scrape that times out on a busy host may make an alert pending for a moment: a
        # healthy stack settles with every rule evaluated and none pending or firing
        def rules():
            groups = requests.get(url + "/api/v1/rules", timeout=10).json()["data"]["groups"]
            return [rule for group in groups for rule in group["rules"]]

        def quiet():
            evaluated = rules()
            return len(evaluated) == ALERTS.count("- alert: ") and all(
                rule["health"] == "ok" and rule["state"] == "inactive" for rule in evaluated)
        try:
            wait_until(quiet, timeout=60, what="every alert rule evaluated and inactive")
        except AssertionError:
            raise AssertionError([(rule["name"], rule["health"], rule["state"]) for rule in rules()
                                  if rule["health"] != "ok" or rule["state"] != "inactive"])

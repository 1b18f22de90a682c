"""What operators see: metrics for the whole host, readiness behind HAProxy, logs, announcements."""
import json
import os
import re
import signal
import socket
import subprocess

import pytest
import requests
import socketio
from prometheus_client.parser import text_string_to_metric_families

from conftest import BIN, ROOT, free_port, stop_process, wait_until
from deployment import free_port_run


class Exporter:
    """`scalechat serve-metrics` on a free port, over the metrics directory its workers share."""

    def __init__(self, metrics_dir):
        self.env = {"PROMETHEUS_MULTIPROC_DIR": str(metrics_dir)}
        port = free_port()
        self.url = f"http://127.0.0.1:{port}/metrics"
        self.proc = subprocess.Popen(
            [str(BIN / "scalechat"), "serve-metrics", "--host", "127.0.0.1", "--port", str(port)],
            env={**os.environ, **self.env}, stdout=subprocess.DEVNULL)

        def answers():
            assert self.proc.poll() is None, "scalechat serve-metrics exited"
            try:
                return requests.get(self.url, timeout=1).ok
            except requests.ConnectionError:
                return False
        wait_until(answers, what="scalechat serve-metrics")

    def text(self):
        return requests.get(self.url, timeout=5).text

    def scrape(self):
        """Return {(metric name, frozen labels): value} from one scrape."""
        return {(sample.name, frozenset(sample.labels.items())): sample.value
                for family in text_string_to_metric_families(self.text())
                for sample in family.samples}


@pytest.fixture
def exporter(tmp_path):
    metrics_dir = tmp_path / "metrics"
    metrics_dir.mkdir()
    started = Exporter(metrics_dir)
    yield started
    stop_process(started.proc)


def total(samples, name, **labels):
    return sum(value for (sample, sample_labels), value in samples.items()
               if sample == name and set(labels.items()) <= sample_labels)


def test_one_scrape_counts_every_worker_and_forgets_dead_ones(worker_factory, clients, room,
                                                               exporter):
    env = exporter.env
    w1 = worker_factory("m1", **env)
    w2 = worker_factory("m2", **env)
    people = [clients(name).connect(worker) for name, worker in
              (("alice", w1), ("bob", w1), ("carol", w2))]
    for person in people:
        person.join(room)
    for n in range(4):
        assert people[n % 3].send(room, f"m{n}", client_id=f"c{n}")["ok"]
    assert people[0].send(room, "m0", client_id="c0")["ok"]  # a retry: received, not stored
    assert people[2].call("message", {"room": "elsewhere", "text": "x", "client_id": "y"})["error"] == "not_member"
    for person in people:
        person.wait_for("message", lambda got: len(got) >= 4)

    def flushed():  # the per-message counts reach the samples within a second
        return total(exporter.scrape(), "scalechat_deliveries_total") == 12
    wait_until(flushed, timeout=5, what="every delivery counted")
    samples = exporter.scrape()
    assert total(samples, "scalechat_connected_clients") == 3
    assert total(samples, "scalechat_connected_clients", worker="m1") == 2
    assert total(samples, "scalechat_connects_total") == 3
    assert total(samples, "scalechat_joins_total") == 3
    assert total(samples, "scalechat_messages_received_total") == 5
    assert total(samples, "scalechat_messages_stored_total") == 4
    assert total(samples, "scalechat_deliveries_total") == 12
    assert total(samples, "scalechat_deliveries_total", worker="m2") == 4
    assert total(samples, "scalechat_error_acks_total", error="not_member") == 1
    assert total(samples, "scalechat_handler_seconds_count", event="message") == 6
    # one round trip a send (one, on a Redis new to the store script, to be told to load it)
    assert total(samples, "scalechat_redis_seconds_count", operation="append") in (5, 6)

    w1.stop(signal.SIGKILL)
    worker_factory("m1", **env)  # as supervisord would restart it
    samples = exporter.scrape()
    assert total(samples, "scalechat_connected_clients") == 1, "the dead worker's clients linger"
    assert total(samples, "scalechat_connects_total") == 3
    assert total(samples, "scalechat_messages_stored_total") == 4
    assert total(samples, "scalechat_deliveries_total") == 12


def test_haproxy_routes_around_a_worker_that_is_not_ready(worker_factory, service_tmp):
    tmp_path = service_tmp  # deploy/configure checks that the stack's user can reach var/
    base = free_port_run(2)
    worker_factory("ready", port=base)
    worker_factory("not-ready", port=base + 1, redis_url="redis://127.0.0.1:1/0",
                   wait_healthy=False)
    env = {**os.environ, "SCALECHAT_VAR": str(tmp_path / "var"), "WORKERS": "2",
           "WORKER_PORT_BASE": str(base), "PORT": str(free_port()), "STATS_PORT": str(free_port()),
           "REDIS_PORT": str(free_port())}
    subprocess.run([str(ROOT / "deploy/configure")], env=env, check=True, capture_output=True)
    proxy = subprocess.Popen(["haproxy", "-W", "-db", "-f", str(tmp_path / "var/haproxy.cfg")],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        url = f"http://127.0.0.1:{env['PORT']}"

        def backends():
            try:
                stats = requests.get(f"http://127.0.0.1:{env['STATS_PORT']}/;csv", timeout=2).text
            except requests.ConnectionError:
                return {}  # not listening yet
            return {row.split(",")[1]: row.split(",")[17] for row in stats.splitlines()
                    if row.startswith("workers,worker-")}
        wait_until(lambda: backends() == {"worker-00": "UP", "worker-01": "DOWN"}, timeout=15,
                   what="HAProxy to see worker-01 not ready")
        landed = {requests.get(url + "/healthz", timeout=5).headers["X-Scalechat-Worker"]
                  for _ in range(10)}
        assert landed == {"ready"}
        assert requests.get(url + "/metrics", timeout=5).status_code == 404
    finally:
        stop_process(proxy)


def test_announcements_reach_clients_on_every_worker(workers, clients, room, redis_server):
    in_room = [clients("alice").connect(workers[0]), clients("bob").connect(workers[1])]
    for client in in_room:
        client.join(room)
    outside = clients("carol").connect(workers[1])

    def announce(*args):
        result = subprocess.run([str(BIN / "scalechat"), "announce", *args],
                                env={**os.environ, "REDIS_URL": redis_server.url},
                                capture_output=True, text=True, timeout=30)
        assert result.returncode == 0, result.stderr
    announce("--room", room, "tea in the kitchen")
    for client in in_room:
        got = client.wait_for("announcement", lambda got: got)
        assert got[0]["room"] == room and got[0]["text"] == "tea in the kitchen"
    announce("--all", "maintenance in 5 minutes")
    for client in [*in_room, outside]:
        got = client.wait_for("announcement", lambda got: any(a["room"] is None for a in got))
        assert got[-1]["text"] == "maintenance in 5 minutes"
    assert [a["text"] for a in outside.events["announcement"]] == ["maintenance in 5 minutes"]


def test_announce_refuses_a_bad_room():
    result = subprocess.run([str(BIN / "scalechat"), "announce", "--room", "Bad Room", "hi"],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode != 0 and "room must be" in result.stderr


def test_the_admin_ui_namespace_needs_the_password(worker_factory):
    admin = worker_factory("admin", SCALECHAT_ADMIN_PASSWORD="s3cret")

    def connect(password):
        client = socketio.Client(reconnection=False)
        try:
            client.connect(admin.url, namespaces=["/admin"], transports=["websocket"],
                           auth={"username": "admin", "password": password}, wait_timeout=5)
            return client.connected
        except socketio.exceptions.ConnectionError:
            return False
        finally:
            client.disconnect()
    assert connect("wrong") is False
    assert connect("s3cret") is True


def test_the_admin_ui_is_off_by_default(workers):
    client = socketio.Client(reconnection=False)
    with pytest.raises(socketio.exceptions.ConnectionError):
        client.connect(workers[0].url, namespaces=["/admin"], transports=["websocket"],
                       auth={"username": "admin", "password": ""}, wait_timeout=5)


def test_logs_are_json_lines_naming_the_worker(worker_factory, clients, room):
    worker = worker_factory("logger")
    alice = clients("alice").connect(worker)
    alice.join(room)
    alice.close()
    wait_until(lambda: '"disconnect"' in worker.log_path.read_text(), what="the disconnect log")
    records = [json.loads(line) for line in worker.log_path.read_text().splitlines() if line]
    assert all(record["worker"] == "logger" for record in records)
    events = {record["message"]: record for record in records}
    assert events["connect"]["user"]["name"] == "alice" and events["connect"]["sid"]
    assert events["join"]["room"] == room
    assert events["disconnect"]["rooms"] == [room]


def test_the_dashboard_only_charts_metrics_that_exist(worker_factory, clients, room, exporter):
    dashboard = json.loads((ROOT / "deploy/grafana-dashboard.json").read_text())
    wanted = {name for panel in dashboard["panels"] for target in panel["targets"]
              for name in re.findall(r"scalechat_\w+", target["expr"])}
    worker = worker_factory("charted", **exporter.env)
    alice = clients("alice").connect(worker)  # a connect, a join, a message and an error ack
    alice.join(room)
    assert alice.send(room, "hello")["ok"]
    assert alice.call("leave", {"room": "not-joined-room"})["error"] == "not_member"
    exposed = exporter.text()
    assert wanted and all(f"\n{name}" in exposed or f"# TYPE {name.removesuffix('_bucket')}" in exposed
                          for name in wanted), wanted


METRICS_SPELLINGS = ["/metrics", "//metrics", "/metrics/", "/%6Detrics", "/METRICS", "/./metrics",
                     "/metrics?x=1", "/static/../metrics"]


def raw_get(url, path):
    """GET `path` exactly as spelled (HTTP clients tidy paths up); return (status, head, body)."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as conn:
        conn.sendall(f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nConnection: close\r\n\r\n"
                     .encode())
        response = b""
        while chunk := conn.recv(65536):
            response += chunk
    head, _, body = response.partition(b"\r\n\r\n")
    location = re.search(rb"\r\nLocation: ([^\r]+)", head, re.IGNORECASE)
    if location:  # a tidied-up path: follow it, as a scraper would
        return raw_get(url, location.group(1).decode().removeprefix(url))
    return int(head.split()[1]), head, body


def serves_metrics(url, path):
    status, _, body = raw_get(url, path)
    return status == 200 and (b"# TYPE" in body or b"scalechat_" in body)


def test_no_spelling_of_metrics_is_served_by_a_worker_or_the_proxy(workers, stack):
    served = {}
    for name, url in (("worker", workers[0].url), ("proxy", stack.url)):
        assert raw_get(url, "/healthz")[0] == 200
        served[name] = [path for path in METRICS_SPELLINGS if serves_metrics(url, path)]
    assert served == {"worker": [], "proxy": []}
    # and the proxy refuses each spelling itself, without asking a worker
    for path in METRICS_SPELLINGS:
        status, head, _ = raw_get(stack.url, path)
        assert status == 404 and b"x-scalechat-worker" not in head.lower(), path
    for path in ("/rooms/metrics", "/api/rooms/metrics/messages", "/metrics-of-rooms"):
        assert b"x-scalechat-worker" in raw_get(stack.url, path)[1].lower(), path  # a room's pages

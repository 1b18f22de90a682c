"""scalechat on three hosts, each started by the deploy scripts in its role, and one lost.

Hosts A and B run workers only (`WORKER_HOST` their address, `PROXY_SERVERS=none`, a Redis
Cluster's `REDIS_URL`, acknowledging a message once a replica has it); host C runs the proxy only
(`WORKERS=0`, `PROXY_SERVERS` A's and B's workers). The Cluster's nine nodes are spread so that
losing any host leaves every shard a master and a replica: each shard's master on its own host,
its replicas on the other two; the room lives on A's shard. Clients reach nothing but C's proxy.
They chat, stuck to A's worker or B's; then A's link goes down: a replica on B or C takes over
the room's shard, the proxy finds A's worker gone, and A's clients reconnect through it to B and
resume from the last message they saw. At the end every client holds the room's stream in Redis
exactly: nothing acknowledged lost, doubled or reordered.
"""
import contextlib
import os
import threading
import time
import uuid

import pytest

from conftest import wait_until
from deployment import ResumingClient, service_dir
from flask_app.keys import Keys
from flask_app.store import id_order
from hosts import HostedCluster, HostStack, three_hosts  # noqa: F401 (a fixture)
from test_faults import Conversation

pytestmark = pytest.mark.hosts

CLIENTS = 8  # half stuck to A's worker, half to B's
SECRET_KEY = "one-secret-key-for-every-host-of-the-test"


def on_each(stacks, name):
    """deploy/<name> on several hosts at once; return the results, or raise the first failure."""
    results, failures = {}, []

    def run(stack):
        try:
            results[stack.host] = stack.script(name, check=name != "stop")
        except BaseException as exc:  # noqa: BLE001 (raised again in the test's thread)
            failures.append(exc)
    threads = [threading.Thread(target=run, args=(stack,)) for stack in stacks]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if failures:
        raise failures[0]
    return results


@contextlib.contextmanager
def deployed(hosts, redis_url):
    """Workers on A and B, the proxy on C, each started by deploy/run in its namespace and
    stopped by deploy/stop afterwards, whatever happened, leaving no process behind."""
    with service_dir() as path:
        for host in hosts.names:
            (path / host).mkdir(mode=0o755)
        host_a, host_b = (HostStack(hosts, host, path / host / "var", WORKERS=1, REDIS_URL=redis_url,
                                    WORKER_HOST=hosts.address(host), PROXY_SERVERS="none",
                                    SECRET_KEY=SECRET_KEY, SCALECHAT_MIN_REPLICAS="1")
                          for host in ("a", "b"))
        proxy = HostStack(hosts, "c", path / "c" / "var", WORKERS=0, PUBLIC_BIND=hosts.address("c"),
                          SECRET_KEY=SECRET_KEY)
        stacks, pids = (host_a, host_b, proxy), []
        try:
            on_each((host_a, host_b), "run")  # the proxy waits for a worker ready behind it
            # the proxy first in front of A alone, then B added as an operator adds a host
            proxy.env["PROXY_SERVERS"] = ",".join(host_a.worker_servers())
            on_each((proxy,), "run")
            proxy.env["PROXY_SERVERS"] = ",".join(host_a.worker_servers() + host_b.worker_servers())
            assert "HAProxy reloaded with the new configuration" in proxy.script("run").stdout
            pids = [pid for stack in stacks for pid in stack.pids().values()]
            yield host_a, host_b, proxy
        except BaseException:
            for stack in stacks:  # why, for whoever reads the failure
                print(f"--- host {stack.host}'s logs\n{stack.program_logs(lines=30)}")
            raise
        finally:
            stopped = on_each(stacks, "stop")
        for host, result in stopped.items():
            assert result.returncode == 0, f"deploy/stop on {host}: {result.stdout}\n{result.stderr}"
        alive = [pid for pid in pids if os.path.exists(f"/proc/{pid}")]
        assert not alive, f"processes left after deploy/stop: {alive}"


def status(stack):
    return stack.script("status", check=False)


def address_of(client):
    return client.connection_pool.connection_kwargs["host"]


class ClusterOverHosts:
    """The nine-node Cluster over A, B and C, and a room on the shard whose master is on A."""

    def __init__(self, hosts, directory):
        self.hosts = hosts
        self.cluster = HostedCluster(hosts, directory)
        self.url = self.cluster.url

    def start(self):
        self.cluster.start()
        for _ in range(1000):
            self.room = "room-" + uuid.uuid4().hex[:12]
            self.stream_key = Keys("scalechat:").room_stream(self.room)
            if address_of(self.master_seen_from("a")) == self.hosts.address("a"):
                return self
        raise AssertionError("no room found on A's shard")

    def master_seen_from(self, host):
        return self.cluster.master_of(self.stream_key, seen_from=self.cluster.masters[host])

    def master_without_a(self):
        """A client of the room's master once B knows it is not on A, else None."""
        master = self.master_seen_from("b")
        return None if address_of(master) == self.hosts.address("a") else master

    def stop(self):
        self.cluster.stop()


@pytest.fixture
def redis_cluster(three_hosts, tmp_path):
    """The Cluster over the three hosts, stopped afterwards whatever happened."""
    cluster = ClusterOverHosts(three_hosts, tmp_path)
    try:
        yield cluster.start()
    finally:
        cluster.stop()


@pytest.fixture
def three_roles(three_hosts, redis_cluster):
    """Workers on A and B and the proxy on C, each host healthy by its deploy/status."""
    with deployed(three_hosts, redis_cluster.url) as (host_a, host_b, proxy):
        reports = {stack.host: status(stack) for stack in (host_a, host_b, proxy)}
        for host, report in reports.items():
            assert report.returncode == 0, f"deploy/status on {host}:\n{report.stdout}{report.stderr}"
        servers = reports["c"].stdout
        assert f"{host_a.address}:8001" in servers and f"{host_b.address}:8001" in servers
        assert "== redis: Redis Cluster (REDIS_URL)" in reports["b"].stdout
        yield host_a, host_b, proxy


def test_a_host_lost_behind_the_proxy_of_another_loses_no_message(three_hosts, redis_cluster, three_roles):
    room, stream_key = redis_cluster.room, redis_cluster.stream_key
    host_a, host_b, proxy = three_roles
    on_a = f"worker-00@{host_a.address}"
    on_b = f"worker-00@{host_b.address}"
    clients = []
    try:
        clients = [ResumingClient(f"c{n}", proxy).start() for n in range(CLIENTS)]
        for client in clients:
            client.enter(room)
        assert sorted(c.workers_seen[0] for c in clients) == [on_a] * 4 + [on_b] * 4
        moved = [c for c in clients if c.workers_seen[0] == on_a]
        timings = {}

        def lose_a():
            timings["cut"] = time.monotonic()
            three_hosts.cut("a")
            wait_until(lambda: proxy.server_stats(f"{host_a.address}:8001")["status"] == "DOWN",
                       timeout=15, what="the proxy to see A's worker down")
            timings["down"] = time.monotonic()
            wait_until(redis_cluster.master_without_a, timeout=30,
                       what="a replica on B or C to take over the room's master")
            timings["promoted"] = time.monotonic()
            wait_until(lambda: all(c.workers_seen[-1] == on_b for c in moved), timeout=30,
                       what="A's clients to resume on B's worker through the proxy")
            timings["moved"] = time.monotonic()

        with Conversation(clients, room) as conversation:
            conversation.around(lose_a)
        master = wait_until(redis_cluster.master_without_a, what="the room's master after A")
        stream = [entry_id.decode() if isinstance(entry_id, bytes) else entry_id
                  for entry_id, _ in master.xrange(stream_key)]
        assert len(stream) == len(set(stream)), "a message is stored twice"
        assert sorted(conversation.acked, key=id_order) == stream, "an acknowledged message is missing"
        for client in clients:
            client.wait_for("message", lambda got: set(stream) <= set(client.ids), timeout=30)
            assert client.ids == stream, f"{client.name} differs from the stream"
            assert client.out_of_order == 0, f"{client.name} saw messages out of order"

        report = status(proxy)
        assert report.returncode == 1, report.stdout
        assert f"{host_a.address}:8001" in report.stdout and "DOWN" in report.stdout
        report = status(host_b)  # the cluster serves without A's nodes, and names them down
        assert report.returncode == 1, report.stdout
        assert "cluster_state:ok" in report.stdout
        assert sum(line.startswith(f"down     {three_hosts.address('a')}:")
                   for line in report.stdout.splitlines()) == 3, report.stdout
        since_cut = {event: f"{t - timings['cut']:.1f} s" for event, t in timings.items()}
        print(f"\nA cut off: the proxy saw its worker DOWN after {since_cut['down']}, the room had "
              f"a new master by {since_cut['promoted']}, A's {len(moved)} clients resumed on B "
              f"after {since_cut['moved']}; {len(stream)} messages, "
              f"{sum(c.resends for c in clients)} re-sends, "
              f"{sum(c.connects - 1 for c in clients)} reconnects; 0 acknowledged lost")
    finally:
        for client in clients:
            client.close()

"""A Redis Cluster for tests: 3 masters and 3 replicas on free ports of 127.0.0.1, with a password.

Nodes refuse writes without a replica (`min-replicas-to-write 1`) and keep serving their slots
while another shard fails over (`cluster-require-full-coverage no`) as the deployed ones do, and
a master is failed over 1 s after it stops answering (`cluster-node-timeout 1000`) so that a
test of a failover stays short.
"""
import os
import signal
import subprocess
import time

import pytest
import redis

from conftest import free_port, stop_process, wait_until

PASSWORD = "cluster-test-password"
NODE_TIMEOUT_MS = 1000


class ClusterNode:
    """One redis-server of the cluster, in its own directory."""

    def __init__(self, directory, name):
        self.directory = directory / name
        self.directory.mkdir()
        self.name = name
        self.port = free_port()
        self.bus_port = free_port()  # not port + 10000, which may be taken or past 65535
        self.proc = None

    def start(self):
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1",
             "--dir", str(self.directory), "--save", "", "--appendonly", "no",
             "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
             "--cluster-port", str(self.bus_port), "--cluster-require-full-coverage", "no",
             "--cluster-node-timeout", str(NODE_TIMEOUT_MS),
             "--requirepass", PASSWORD, "--masterauth", PASSWORD,
             "--min-replicas-to-write", "1", "--min-replicas-max-lag", "10",
             "--repl-diskless-sync-delay", "0"],
            stdout=open(self.directory / "redis.log", "ab"), stderr=subprocess.STDOUT)
        wait_until(self._answers, what=f"redis {self.name}")
        return self

    def client(self, **options):
        return redis.Redis(port=self.port, password=PASSWORD, socket_timeout=5, **options)

    def _answers(self):
        try:
            return self.client().ping()
        except redis.ConnectionError:
            assert self.proc.poll() is None, f"redis {self.name} exited"
            return False

    def node_id(self):
        return self.client().execute_command("CLUSTER", "MYID").decode()

    def kill(self):
        """kill -9: the node vanishes without a word to its clients or replicas."""
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait()

    def stop(self):
        if self.proc is not None and self.proc.poll() is None:
            stop_process(self.proc)


class RedisCluster:
    """Six nodes made into a cluster by redis-cli, as deploy/run does."""

    def __init__(self, directory):
        self.nodes = [ClusterNode(directory, f"node-{n}") for n in range(6)]
        self.url = "redis+cluster://:{}@{}".format(
            PASSWORD, ",".join(f"127.0.0.1:{node.port}" for node in self.nodes))

    def start(self):
        for node in self.nodes:
            node.start()
        created = subprocess.run(
            ["redis-cli", "--cluster", "create",
             *(f"127.0.0.1:{node.port}" for node in self.nodes),
             "--cluster-replicas", "1", "--cluster-yes"],
            capture_output=True, text=True, timeout=60, env={**os.environ, "REDISCLI_AUTH": PASSWORD})
        assert created.returncode == 0, created.stdout + created.stderr
        wait_until(self.healthy, timeout=30, what="the cluster to cover every slot")
        return self

    def healthy(self):
        """Every living node sees the cluster ok, and every master has a replica linked."""
        living = self.living()
        try:
            if not all(b"cluster_state:ok" in node.client().execute_command("CLUSTER", "INFO")
                       for node in living):
                return False
            return all(node.client().info("replication")["connected_slaves"] >= 1
                       for node in living if self.role(node) == "master")
        except redis.RedisError:
            return False

    def role(self, node):
        return node.client().role()[0].decode()

    def master_of(self, key):
        """The node that serves `key`'s slot now, as a living node sees it."""
        node = self.living()[0]
        slot = node.client().cluster("keyslot", key)
        by_port = {n.port: n for n in self.nodes}
        for start, end, master, *_ in node.client().execute_command("CLUSTER", "SLOTS"):
            if start <= slot <= end:
                return by_port[int(master[1])]
        raise AssertionError(f"no master serves {key}")

    def living(self):
        return [node for node in self.nodes if node.proc.poll() is None]

    def masters(self):
        return [node for node in self.living() if self.role(node) == "master"]

    def move_slot(self, key, target):
        """Migrate `key`'s slot, with its keys, to the master `target`, as redis-cli's reshard
        does one slot at a time; the old master tells its shard subscribers (SUNSUBSCRIBE)."""
        source = self.master_of(key)
        slot = source.client().cluster("keyslot", key)
        source_id, target_id = source.node_id(), target.node_id()
        target.client().execute_command("CLUSTER", "SETSLOT", slot, "IMPORTING", source_id)
        source.client().execute_command("CLUSTER", "SETSLOT", slot, "MIGRATING", target_id)
        while keys := source.client().execute_command("CLUSTER", "GETKEYSINSLOT", slot, 100):
            source.client().execute_command("MIGRATE", "127.0.0.1", target.port, "", 0, 5000,
                                            "AUTH", PASSWORD, "KEYS", *keys)
        for node in self.masters():
            node.client().execute_command("CLUSTER", "SETSLOT", slot, "NODE", target_id)
        wait_until(lambda: self.master_of(key) is target, what="every node to agree on the move")

    def rooms_on_every_master(self, keys, prefix="room"):
        """One room name whose slot each master serves, in the masters' order."""
        rooms = {}
        for n in range(10_000):
            room = f"{prefix}-{n}"
            owner = self.master_of(keys.room_stream(room))
            rooms.setdefault(owner.name, room)
            if len(rooms) == 3:
                return [rooms[node.name] for node in self.masters()]
        raise AssertionError("no room found on some master")

    def stop(self):
        for node in self.nodes:
            node.stop()


@pytest.fixture
def redis_cluster(tmp_path):
    cluster = RedisCluster(tmp_path)
    try:
        yield cluster.start()
    finally:
        cluster.stop()


def wait_for_failover(cluster, killed):
    """Wait until a replica of `killed` is master of its slots and the cluster is ok again."""
    started = time.monotonic()
    wait_until(lambda: cluster.masters() and len(cluster.masters()) == 3 and all(
        b"cluster_state:ok" in node.client().execute_command("CLUSTER", "INFO")
        for node in cluster.living()),
        timeout=30, what=f"a replica of {killed.name} to take its slots")
    return time.monotonic() - started

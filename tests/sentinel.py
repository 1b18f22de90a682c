"""A Sentinel set for tests: 1 master, 2 replicas and 3 Sentinels (quorum 2) on free ports of 127.0.0.1.

The Redis nodes refuse writes without a replica (`min-replicas-to-write 1`, lag at most 10 s)
and start a replica's full resynchronisation at once (`repl-diskless-sync-delay 0`: after a
failover the new master has no replica until then), as the deployed ones do; the Sentinels
fail over quickly (down after 1 s) so that a test of a failover stays short.
"""
import os
import signal
import subprocess

import pytest
import redis

from conftest import free_port, stop_process, wait_until

SERVICE = "scalechat"
DOWN_AFTER_MS = 1000
FAILOVER_TIMEOUT_MS = 5000
QUORUM = 2


class Node:
    """One redis-server of the set, in its own directory, restartable on its port."""

    def __init__(self, directory, name):
        self.directory = directory / name
        self.directory.mkdir()
        self.name = name
        self.port = free_port()
        self.proc = None

    def start(self, replica_of=None):
        args = ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1",
                "--dir", str(self.directory), "--save", "", "--appendonly", "no",
                "--min-replicas-to-write", "1", "--min-replicas-max-lag", "10",
                "--repl-diskless-sync-delay", "0"]
        if replica_of is not None:
            args += ["--replicaof", "127.0.0.1", str(replica_of)]
        self.proc = subprocess.Popen(args, stdout=open(self.directory / "redis.log", "ab"),
                                     stderr=subprocess.STDOUT)
        wait_until(lambda: answers(self.client(), self.proc), what=f"redis {self.name}")
        return self

    def client(self, **options):
        return redis.Redis(port=self.port, socket_timeout=5, **options)

    def role(self):
        return self.client().role()[0].decode()

    def kill(self):
        """kill -9: the node vanishes without a word to its clients or replicas."""
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait()

    def stop(self):
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGCONT)  # a stopped process cannot take its SIGTERM
            stop_process(self.proc)


class SentinelSet:
    """1 master + 2 replicas watched by 3 Sentinels; `url` is the REDIS_URL naming them."""

    def __init__(self, directory):
        self.directory = directory
        self.nodes = [Node(directory, name) for name in ("redis-a", "redis-b", "redis-c")]
        self.sentinel_ports = [free_port() for _ in range(3)]
        self.sentinel_procs = []
        self.url = "redis+sentinel://" + ",".join(
            f"127.0.0.1:{port}" for port in self.sentinel_ports) + f"/0/{SERVICE}"

    def start(self):
        first, *others = self.nodes
        first.start()
        for node in others:
            node.start(replica_of=first.port)
        wait_until(lambda: len(first.client().role()[2]) == len(others) and all(
            n.client().info("replication")["master_link_status"] == "up" for n in others),
            what="the replicas to follow the master")
        for n, port in enumerate(self.sentinel_ports):
            conf = self.directory / f"sentinel-{n}.conf"  # Sentinel rewrites its file
            conf.write_text(
                f"port {port}\nbind 127.0.0.1\ndir {self.directory}\n"
                f"sentinel monitor {SERVICE} 127.0.0.1 {first.port} {QUORUM}\n"
                f"sentinel down-after-milliseconds {SERVICE} {DOWN_AFTER_MS}\n"
                f"sentinel failover-timeout {SERVICE} {FAILOVER_TIMEOUT_MS}\n")
            self.sentinel_procs.append(subprocess.Popen(
                ["redis-server", str(conf), "--sentinel"],
                stdout=open(self.directory / f"sentinel-{n}.log", "ab"), stderr=subprocess.STDOUT))
        wait_until(self._settled, timeout=30, what="the Sentinels to know the whole set")
        return self

    def sentinels(self):
        return [redis.Redis(port=port, socket_timeout=5, decode_responses=True)
                for port in self.sentinel_ports]

    def _settled(self):
        """Every Sentinel sees the master, both replicas and the other two Sentinels."""
        for proc, sentinel in zip(self.sentinel_procs, self.sentinels()):
            if not answers(sentinel, proc):
                return False
            state = sentinel.sentinel_master(SERVICE)
            if not (state["is_master"] and state["num-slaves"] == 2
                    and state["num-other-sentinels"] == 2
                    and not state["is_sdown"] and not state["is_odown"]):
                return False
            if any(replica["is_sdown"] or replica["master-link-status"] != "ok"
                   for replica in sentinel.sentinel_slaves(SERVICE)):
                return False
        return True

    def master_port(self):
        """The master's port, as the first Sentinel that answers names it."""
        for sentinel in self.sentinels():
            try:
                return int(sentinel.sentinel_get_master_addr_by_name(SERVICE)[1])
            except redis.ConnectionError:
                continue
        raise AssertionError("no Sentinel answers")

    def node(self, port):
        return next(node for node in self.nodes if node.port == port)

    def master(self):
        return self.node(self.master_port())

    def replicas(self):
        master = self.master_port()
        return [node for node in self.nodes if node.port != master]

    def wait_for_new_master(self, old_port, timeout=30):
        """Wait until every Sentinel names a master other than `old_port` that has a replica in
        sync and takes writes; return that node."""
        def promoted():
            ports = set()
            for sentinel in self.sentinels():
                try:
                    ports.add(int(sentinel.sentinel_get_master_addr_by_name(SERVICE)[1]))
                except redis.ConnectionError:
                    return None
            if len(ports) != 1 or old_port in ports:
                return None
            node = self.node(ports.pop())
            role = node.client().role()
            return node if role[0] == b"master" and role[2] else None
        return wait_until(promoted, timeout=timeout, what="Sentinel to promote a replica")

    def settle(self, timeout=60):
        """Wait until the set is whole again: a master and two replicas in sync, all seen."""
        wait_until(self._settled, timeout=timeout, what="the Sentinel set to settle")

    def stop(self):
        for proc in self.sentinel_procs:
            stop_process(proc)
        for node in self.nodes:
            node.stop()


def answers(client, proc):
    try:
        return client.ping()
    except redis.ConnectionError:
        assert proc.poll() is None, "a redis-server exited"
        return False


@pytest.fixture(scope="module")
def sentinel_set(tmp_path_factory):
    """A Sentinel set shared by a module's tests, which leave it as they found it."""
    sentinels = SentinelSet(tmp_path_factory.mktemp("sentinel"))
    try:
        yield sentinels.start()
    finally:
        sentinels.stop()


@pytest.fixture
def own_sentinel_set(tmp_path):
    """A Sentinel set of this test's own, to fail over."""
    sentinels = SentinelSet(tmp_path)
    try:
        yield sentinels.start()
    finally:
        sentinels.stop()

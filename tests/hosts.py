"""Hosts on this machine for tests: network namespaces on a private network, cut off at will.

Each host is a namespace with `lo` and `eth0`, an address in a /24 of 10.x chosen for the run,
and its `eth0` on a bridge in a namespace of its own (the network between the hosts). The
tests' own namespace reaches every host over a second link per host (the clients' way in), so
`cut(host)` separates a host from the other hosts while its clients still reach it, as in a
partition between data centres; `restore(host)` joins it again. Processes started with
`run(host, argv)` see only that host's network. `close()` kills what is left in the
namespaces by PID and deletes them, their links and the bridge.
"""
import ipaddress
import random
import socket
import subprocess
import threading
import uuid

import pytest
import redis
from redis.crc import key_slot

from conftest import BIN, ROOT, Worker, wait_until
from deployment import Stack

HOST_NAMES = "abcdefgh"


def ip(*args):
    """Run `ip` with `args`; fail the test with its message if it refuses."""
    result = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=10)
    assert result.returncode == 0, f"ip {' '.join(args)}: {result.stderr.strip()}"
    return result.stdout


def free_subnet():
    """A /24 of 10.x that nothing on this machine routes to yet (other runs included)."""
    routes = ip("-4", "route", "show", "table", "all") + ip("-4", "-o", "addr", "show")
    for _ in range(100):
        subnet = ipaddress.ip_network(f"10.{random.randint(100, 250)}.{random.randint(0, 255)}.0/24")
        if f"10.{subnet.network_address.packed[1]}.{subnet.network_address.packed[2]}." not in routes:
            return subnet
    raise AssertionError("no free /24 of 10.100-250.x.x for the test's hosts")


class Hosts:
    """`count` hosts named a, b, c... (`hosts.address("a")`), each a network namespace."""

    def __init__(self, count):
        self.tag = "sc" + uuid.uuid4().hex[:6]  # unique per run; interface names stay <= 15 chars
        self.subnet = free_subnet()
        self.names = list(HOST_NAMES[:count])
        self.switch = f"{self.tag}-net"
        self.client_address = str(self.subnet.network_address + 1)  # this namespace's, on each link
        self.created = []  # namespaces, to delete

    def namespace(self, host):
        return f"{self.tag}-{host}"

    def address(self, host):
        return str(self.subnet.network_address + 10 + self.names.index(host))

    def port(self, host):
        """The bridge's port of `host`, in the network's namespace."""
        return f"port-{host}"

    def start(self):
        ip("netns", "add", self.switch)
        self.created.append(self.switch)
        ip("-n", self.switch, "link", "set", "lo", "up")
        ip("-n", self.switch, "link", "add", "br0", "type", "bridge")
        ip("-n", self.switch, "link", "set", "br0", "up")
        for host in self.names:
            ns = self.namespace(host)
            ip("netns", "add", ns)
            self.created.append(ns)
            ip("-n", ns, "link", "set", "lo", "up")
            ip("-n", ns, "link", "add", "eth0", "type", "veth",
               "peer", "name", self.port(host), "netns", self.switch)
            ip("-n", self.switch, "link", "set", self.port(host), "master", "br0", "up")
            ip("-n", ns, "addr", "add", f"{self.address(host)}/{self.subnet.prefixlen}", "dev", "eth0")
            ip("-n", ns, "link", "set", "eth0", "up")
            outside = f"{self.tag}-{host}"  # this namespace's end of the clients' link
            ip("link", "add", outside, "type", "veth", "peer", "name", "client0", "netns", ns)
            ip("addr", "add", f"{self.client_address}/32", "dev", outside)
            ip("link", "set", outside, "up")
            ip("-n", ns, "link", "set", "client0", "up")
            ip("route", "add", f"{self.address(host)}/32", "dev", outside, "src", self.client_address)
            ip("-n", ns, "route", "add", f"{self.client_address}/32", "dev", "client0")
        return self

    def run(self, host, argv, **popen):
        """Start `argv` on `host`; `ip netns exec` execs it, so the PID is the program's own."""
        return subprocess.Popen(["ip", "netns", "exec", self.namespace(host), *argv], **popen)

    def cut(self, host):
        """Take `host` off the network between the hosts: it and its clients still talk."""
        ip("-n", self.switch, "link", "set", self.port(host), "down")

    def restore(self, host):
        ip("-n", self.switch, "link", "set", self.port(host), "up")

    def close(self):
        """Kill what still runs in the hosts, by PID; delete the namespaces and their links."""
        for ns in self.created:
            pids = subprocess.run(["ip", "netns", "pids", ns], capture_output=True,
                                  text=True, timeout=10).stdout.split()
            for pid in pids:
                try:
                    subprocess.run(["kill", "-KILL", pid], timeout=10)
                except subprocess.SubprocessError:
                    pass
        for host in self.names:  # at once: a namespace's links go with it in the background
            subprocess.run(["ip", "link", "del", f"{self.tag}-{host}"], capture_output=True, timeout=10)
        for ns in reversed(self.created):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=10)


@pytest.fixture
def three_hosts():
    """Hosts a, b and c, deleted after the test whatever happened."""
    hosts = Hosts(3)
    try:
        yield hosts.start()
    finally:
        hosts.close()


class Balancer:
    """A TCP proxy on 127.0.0.1 in front of one worker, as a load balancer that moves its
    clients: `move_to(worker)` sends new connections there and drops the ones it has."""

    def __init__(self, worker):
        self.worker = worker
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self.connections = []
        self.lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def token(self, name):
        return self.worker.token(name)

    def move_to(self, worker):
        with self.lock:
            self.worker = worker
            dropped, self.connections = self.connections, []
        for sock in dropped:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()

    def _accept(self):
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            with self.lock:
                upstream = self.worker
            try:
                server = socket.create_connection((upstream.host, upstream.port), timeout=5)
            except OSError:
                client.close()
                continue
            server.settimeout(None)
            with self.lock:
                self.connections += [client, server]
            for source, target in ((client, server), (server, client)):
                threading.Thread(target=self._pump, args=(source, target), daemon=True).start()

    @staticmethod
    def _pump(source, target):
        while True:
            try:
                chunk = source.recv(65536)
                if not chunk:
                    break
                target.sendall(chunk)
            except OSError:
                break
        for sock in (source, target):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def close(self):
        self.listener.close()
        self.move_to(self.worker)


class HostWorker(Worker):
    """A `scalechat-worker` on a host, listening on the host's address."""

    def __init__(self, hosts, host, redis_url, worker_id, log_dir, port=8000, **env):
        super().__init__(redis_url, worker_id, log_dir, port=port, **env)
        self.hosts, self.host_name = hosts, host
        self.host = hosts.address(host)
        self.url = f"http://{self.host}:{port}"

    def start(self, wait_healthy=True):
        self.log = open(self.log_path, "ab")
        self.proc = self.hosts.run(
            self.host_name, [str(BIN / "scalechat-worker"), "--host", self.host, "--port", str(self.port)],
            env=self.env, stdout=self.log, stderr=subprocess.STDOUT, cwd=ROOT)
        wait_until(self._answers if wait_healthy else self._listening, timeout=20,
                   what=f"worker {self.worker_id} on {self.host}:{self.port}")
        return self


class HostStack(Stack):
    """A host's part of the stack, run by the deploy scripts inside the host's namespace, with
    its own var/ and the ports of a host of its own."""

    PORTS = {"PORT": "8000", "WORKER_PORT_BASE": "8001", "STATS_PORT": "8404",
             "METRICS_PORT": "9105", "REDIS_EXPORTER_PORT": "9122", "REDIS_PORT": "6380",
             "SENTINEL_PORT": "26380"}

    def __init__(self, hosts, host, var, **settings):
        super().__init__(var, workers=int(settings.pop("WORKERS", 1)))
        self.hosts, self.host = hosts, host
        self.env.update(self.PORTS, WORKERS=str(self.workers), **settings)
        self.address = hosts.address(host)
        self.url = f"http://{self.address}:{self.env['PORT']}"

    def command(self, name, *args):
        return ["ip", "netns", "exec", self.hosts.namespace(self.host), *super().command(name, *args)]

    def worker_servers(self):
        """This host's workers as a proxy on another host lists them (PROXY_SERVERS)."""
        base = int(self.env["WORKER_PORT_BASE"])
        return [f"{self.address}:{base + n}" for n in range(self.workers)]


class HostedCluster:
    """A Redis Cluster over hosts a, b and c: shard N's master on the Nth host (port 7000), its
    two replicas on the other two (ports 7001, 7002), so that any one host lost leaves every
    shard a master and a replica. Nodes refuse writes without a replica, as deployed ones do;
    a small node timeout keeps a failover short."""

    MASTER_PORT = 7000
    NODE_TIMEOUT_MS = 2000

    def __init__(self, hosts, directory):
        self.hosts, self.directory = hosts, directory
        self.masters = {host: (host, self.MASTER_PORT) for host in hosts.names}
        self.replicas = {}  # (host, port) of a replica -> (host, port) of its first master
        for n, host in enumerate(hosts.names):
            others = [hosts.names[(n + k) % 3] for k in (1, 2)]
            for port, other in zip((self.MASTER_PORT + 1, self.MASTER_PORT + 2), others):
                self.replicas[(other, port)] = (host, self.MASTER_PORT)
        self.procs = []
        self.url = "redis+cluster://" + ",".join(
            f"{hosts.address(host)}:{self.MASTER_PORT}" for host in hosts.names)

    def client(self, node):
        host, port = node
        return redis.Redis(host=self.hosts.address(host), port=port, socket_timeout=5,
                           socket_connect_timeout=2, decode_responses=True)

    def nodes(self):
        return [*self.masters.values(), *self.replicas]

    def start(self):
        for host, port in self.nodes():
            directory = self.directory / f"redis-{host}-{port}"
            directory.mkdir()
            self.procs.append(self.hosts.run(host, [
                "redis-server", "--port", str(port), "--bind", self.hosts.address(host),
                "--protected-mode", "no", "--dir", str(directory), "--save", "", "--appendonly", "no",
                "--cluster-enabled", "yes", "--cluster-node-timeout", str(self.NODE_TIMEOUT_MS),
                "--min-replicas-to-write", "1", "--min-replicas-max-lag", "10",
                "--repl-diskless-sync-delay", "0"],
                stdout=open(directory / "redis.log", "ab"), stderr=subprocess.STDOUT))
        for node in self.nodes():
            wait_until(lambda: self._answers(node), what=f"redis {node}")
        created = subprocess.run(
            ["redis-cli", "--cluster", "create", "--cluster-replicas", "0", "--cluster-yes",
             *(f"{self.hosts.address(host)}:{port}" for host, port in self.masters.values())],
            capture_output=True, text=True, timeout=60)
        assert created.returncode == 0, created.stdout + created.stderr
        first = self.client(self.masters[self.hosts.names[0]])
        for replica, master in self.replicas.items():
            master_id = self.client(master).execute_command("CLUSTER", "MYID")
            node = self.client(replica)
            node.execute_command("CLUSTER", "MEET", self.hosts.address(master[0]), master[1])
            wait_until(lambda: master_id in node.execute_command("CLUSTER", "NODES"),
                       what=f"{replica} to learn of {master}")
            node.execute_command("CLUSTER", "REPLICATE", master_id)
        wait_until(lambda: self.settled(), timeout=30, what="every shard to have two replicas in sync")
        assert first.cluster("info")["cluster_state"] == "ok"
        return self

    def _answers(self, node):
        try:
            return self.client(node).ping()
        except redis.ConnectionError:
            return False

    def settled(self):
        """Every node sees the cluster ok, and every master two online replicas."""
        try:
            if any(self.client(node).cluster("info")["cluster_state"] != "ok" for node in self.nodes()):
                return False
            for master in self.masters.values():
                replication = self.client(master).info("replication")
                online = [value for key, value in replication.items()
                          if key.startswith("slave") and isinstance(value, dict)
                          and value.get("state") == "online"]
                if replication["role"] != "master" or len(online) != 2:
                    return False
        except redis.RedisError:
            return False
        return True

    def master_of(self, key, seen_from):
        """The client of the node `seen_from` names master of `key`'s slot."""
        slot = key_slot(key.encode())
        for start, end, (address, port, *_), *_ in self.client(seen_from).execute_command("CLUSTER", "SLOTS"):
            if start <= slot <= end:
                return redis.Redis(host=address, port=port, socket_timeout=5, decode_responses=True)
        raise AssertionError(f"no node serves slot {slot}")

    def stop(self):
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()

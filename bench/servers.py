"""The servers under test: a fresh Redis (or Redis Cluster) and the workers of scalechat or a peer.

Every process started here is recorded by PID and stopped by PID (SIGTERM, then SIGKILL)
by `stop_all`, which bench.run calls on exit, Ctrl-C and errors alike.
"""
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
PEERS = BENCH / "peers"
SERVERS = ("scalechat", "node", "node_sharded", "python_stock")
# what each server can run on: "single" is one redis-server, "cluster" 3 masters + 3 replicas
TOPOLOGIES = ("single", "cluster")
CLUSTER_SERVERS = ("scalechat", "node_sharded")
CLUSTER_PASSWORD = "bench"
CLUSTER_NODES = 6
HOST = "127.0.0.1"
CLK_TCK = os.sysconf("SC_CLK_TCK")

_started = {}  # pid -> Popen, every process this run started and has not reaped


def free_port():
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def cpu_seconds(pid):
    """utime + stime of a process (all its threads), in seconds, from /proc/<pid>/stat."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def rss_kb(pid):
    """Resident set size of a process in KiB, from /proc/<pid>/status."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def spawn(argv, log_path, env=None, cwd=None):
    """Start a process in its own session (Ctrl-C reaches only us), logging to a file."""
    log = open(log_path, "ab")
    try:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                env=env, cwd=cwd, start_new_session=True)
    finally:
        log.close()
    _started[proc.pid] = proc
    return proc


def stop(proc, timeout=5.0):
    """Stop one process we started: SIGTERM, then SIGKILL after `timeout` seconds."""
    if proc.poll() is None:
        try:
            os.kill(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            try:
                os.kill(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait(5)
    _started.pop(proc.pid, None)


def is_redis(name):
    """Whether a process name of a Stack is a redis-server (one, or each node of a cluster)."""
    return name.startswith("redis")


def stop_all():
    for proc in list(_started.values()):
        stop(proc, timeout=3.0)


def node_ready():
    """Install the Node peer's packages with `npm ci` when they are missing."""
    node_dir = PEERS / "node"
    if (node_dir / "node_modules" / "socket.io").is_dir() and \
            (node_dir / "node_modules" / "@socket.io" / "redis-adapter").is_dir():
        return
    npm = shutil.which("npm")
    if npm is None:
        raise RuntimeError("npm is not installed: the node peer needs Node.js 18+ and npm")
    subprocess.run([npm, "ci", "--no-audit", "--no-fund"], cwd=node_dir, check=True,
                   stdout=subprocess.DEVNULL, timeout=600)


def _git(*args):
    return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=30).stdout.strip()


def snapshot_scalechat(dest, ref=None):
    """Copy scalechat's code (flask_app/, wsgi.py) into `dest` and describe what was copied.

    Without `ref`, the working tree as it is now, uncommitted changes included; with a git
    ref, that commit. Every run of one invocation then measures the same code, even while
    the working tree changes under it.
    """
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    if ref is None:
        shutil.copytree(ROOT / "flask_app", dest / "flask_app",
                        ignore=shutil.ignore_patterns("__pycache__"))
        shutil.copy2(ROOT / "wsgi.py", dest / "wsgi.py")
        commit = _git("rev-parse", "--short", "HEAD")
        dirty = bool(_git("status", "--porcelain", "--", "flask_app", "wsgi.py"))
    else:
        archive = subprocess.run(["git", "archive", ref, "flask_app", "wsgi.py"], cwd=ROOT,
                                 capture_output=True, check=True, timeout=60).stdout
        subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True, timeout=60)
        commit = _git("rev-parse", "--short", ref)
        dirty = False
    return {"commit": commit, "uncommitted_changes": dirty, "path": str(dest)}


def scalechat_refuses(code, redis_url):
    """Why the scalechat in `code` would refuse `redis_url` at start-up, or None if it takes it."""
    env = dict(os.environ, REDIS_URL=redis_url, SECRET_KEY="bench")
    probe = subprocess.run([sys.executable, "-c", "from flask_app.config import Config; "
                            "Config.from_env()"], cwd=code or ROOT, env=env,
                           capture_output=True, text=True, timeout=60)
    if probe.returncode == 0:
        return None
    lines = probe.stderr.strip().splitlines()
    return lines[-1] if lines else f"exit status {probe.returncode}"


def cluster_url(ports):
    """The REDIS_URL of a cluster, as scalechat and the Node peer read it: every node a seed."""
    nodes = ",".join(f"{HOST}:{port}" for port in ports)
    return f"redis+cluster://:{CLUSTER_PASSWORD}@{nodes}"


class Stack:
    """Redis (one server, or a cluster of 3 masters and 3 replicas) plus the workers of one
    server, on free ports of 127.0.0.1."""

    def __init__(self, server, logdir, workers=2, redis="single", aof=False, scalechat_code=None):
        if server not in SERVERS:
            raise ValueError(f"unknown server {server!r}; one of {', '.join(SERVERS)}")
        if redis not in TOPOLOGIES:
            raise ValueError(f"unknown Redis topology {redis!r}; one of {', '.join(TOPOLOGIES)}")
        if redis == "cluster" and server not in CLUSTER_SERVERS:
            raise ValueError(f"{server} does not run on a Redis Cluster; "
                             f"only {', '.join(CLUSTER_SERVERS)} do")
        self.server = server
        self.logdir = Path(logdir)
        self.workers = workers
        self.redis = redis
        self.aof = aof
        self.scalechat_code = scalechat_code  # a snapshot_scalechat() directory, or the tree
        self.procs = {}
        self.ports = []
        self.redis_ports = []
        self.metrics_dir = self.logdir / "metrics"

    @property
    def pids(self):
        return {name: proc.pid for name, proc in self.procs.items()}

    @property
    def worker_pids(self):
        return {name: proc.pid for name, proc in self.procs.items() if not is_redis(name)}

    @property
    def worker_names(self):
        return [f"w{i}" for i in range(len(self.ports))]

    @property
    def redis_url(self):
        if self.redis == "cluster":
            return cluster_url(self.redis_ports)
        return f"redis://{HOST}:{self.redis_ports[0]}/0"

    def start(self, timeout=60.0):
        self.logdir.mkdir(parents=True, exist_ok=True)
        try:
            if self.redis == "cluster":
                self._start_cluster(timeout)
            else:
                self._start_redis("redis", timeout)
            for i in range(self.workers):
                port = free_port()
                self.ports.append(port)
                self.procs[f"w{i}"] = self._start_worker(i, port)
            for i, port in enumerate(self.ports):
                self._wait_healthy(f"w{i}", port, timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _start_redis(self, name, timeout, extra=(), password=None):
        port = free_port()
        self.redis_ports.append(port)
        datadir = self.logdir / f"redis-{port}"
        datadir.mkdir(parents=True, exist_ok=True)
        persistence = (["--appendonly", "yes", "--appendfsync", "everysec"] if self.aof
                       else ["--appendonly", "no"])
        argv = [shutil.which("redis-server") or "redis-server",
                "--port", str(port), "--bind", HOST, "--save", "",
                *persistence, "--dir", str(datadir), "--daemonize", "no",
                "--maxclients", "10000", "--protected-mode", "yes", *extra]
        self.procs[name] = spawn(argv, self.logdir / f"{name}.log")
        auth = b"" if password is None else f"AUTH {password}\r\n".encode()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self._check_alive(name)
            try:
                with socket.create_connection((HOST, port), timeout=1) as s:
                    s.sendall(auth + b"PING\r\n")
                    if s.recv(64).endswith(b"+PONG\r\n"):
                        return port
            except OSError:
                pass
            time.sleep(0.05)
        raise RuntimeError(f"redis-server {name} did not answer PING in time")

    def _start_cluster(self, timeout):
        """Six redis-servers in cluster mode, joined by `redis-cli --cluster create` into 3
        masters with a replica each; returns when every node sees all slots covered and every
        replica is in sync."""
        import redis as redis_py
        password = ["--requirepass", CLUSTER_PASSWORD, "--masterauth", CLUSTER_PASSWORD]
        for i in range(CLUSTER_NODES):
            # the bus port is chosen too: the default (port + 10000) may be taken or too high
            cluster = ["--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
                       "--cluster-port", str(free_port()), "--cluster-node-timeout", "5000"]
            self._start_redis(f"redis{i}", timeout, [*password, *cluster], CLUSTER_PASSWORD)
        create = subprocess.run(
            [shutil.which("redis-cli") or "redis-cli", "-a", CLUSTER_PASSWORD, "--no-auth-warning",
             "--cluster", "create", *(f"{HOST}:{p}" for p in self.redis_ports),
             "--cluster-replicas", "1", "--cluster-yes"],
            capture_output=True, text=True, timeout=timeout)
        (self.logdir / "cluster-create.log").write_text(create.stdout + create.stderr)
        if create.returncode != 0:
            raise RuntimeError(f"redis-cli --cluster create failed; see {self.logdir}")
        nodes = [redis_py.Redis(host=HOST, port=p, password=CLUSTER_PASSWORD, socket_timeout=2)
                 for p in self.redis_ports]
        deadline = time.monotonic() + timeout
        try:
            while time.monotonic() < deadline:
                for name in self.procs:
                    self._check_alive(name)
                if all(self._cluster_node_ready(node) for node in nodes):
                    return
                time.sleep(0.2)
        finally:
            for node in nodes:
                node.close()
        raise RuntimeError(f"the Redis Cluster was not ready in {timeout:.0f}s; see {self.logdir}")

    @staticmethod
    def _cluster_node_ready(node):
        info = node.execute_command("CLUSTER", "INFO")
        info = info.decode() if isinstance(info, bytes) else info
        if "cluster_state:ok" not in info or "cluster_slots_ok:16384" not in info:
            return False
        replication = node.info("replication")
        if replication["role"] == "master":
            return replication.get("connected_slaves", 0) == 1 and \
                replication.get("slave0", {}).get("state") == "online"
        return replication.get("master_link_status") == "up"

    def _start_worker(self, i, port):
        env = dict(os.environ)
        log = self.logdir / f"{self.server}-w{i}.log"
        if self.server == "scalechat":
            self.metrics_dir.mkdir(parents=True, exist_ok=True)
            env.update(REDIS_URL=self.redis_url, SECRET_KEY="bench", SCALECHAT_WORKER_ID=f"w{i}",
                       SCALECHAT_RATE_LIMIT="100000", SCALECHAT_RATE_BURST="100000",
                       PROMETHEUS_MULTIPROC_DIR=str(self.metrics_dir))
            if self.scalechat_code is None:
                script = Path(sys.executable).parent / "scalechat-worker"
                return spawn([str(script), "--host", HOST, "--port", str(port)], log, env, cwd=ROOT)
            # the snapshot comes first on sys.path, before the editable install of the tree
            env["SCALECHAT_NODE_MODULES"] = str(ROOT / "node_modules")
            return spawn([sys.executable, "-c", "from wsgi import main; main()",
                          "--host", HOST, "--port", str(port)], log, env, cwd=self.scalechat_code)
        if self.server == "python_stock":
            env.update(REDIS_URL=self.redis_url, WORKER_ID=f"w{i}")
            return spawn([sys.executable, str(PEERS / "python_stock" / "server.py"),
                          "--host", HOST, "--port", str(port)], log, env, cwd=ROOT)
        node_ready()
        env.update(REDIS_URL=self.redis_url, WORKER_ID=f"w{i}", HOST=HOST, PORT=str(port),
                   NODE_ENV="production",
                   ADAPTER="sharded" if self.server == "node_sharded" else "classic")
        node = shutil.which("node") or "node"
        return spawn([node, str(PEERS / "node" / "server.js")], log, env, cwd=PEERS / "node")

    def _check_alive(self, name):
        proc = self.procs[name]
        if proc.poll() is not None:
            raise RuntimeError(f"{self.server} {name} exited with {proc.returncode}; "
                               f"see {self.logdir}")

    def _wait_healthy(self, name, port, timeout):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self._check_alive(name)
            try:
                with urllib.request.urlopen(f"http://{HOST}:{port}/healthz", timeout=2) as resp:
                    if resp.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"{self.server} {name} did not answer /healthz in {timeout:.0f}s")

    def cpu(self):
        """CPU seconds of every process of the stack, by name."""
        return {name: cpu_seconds(pid) for name, pid in self.pids.items()}

    def rss(self):
        return {name: rss_kb(pid) for name, pid in self.pids.items()}

    def pubsub_received(self):
        """Pub/sub messages each worker's listener has received so far, by worker name.

        scalechat's come from its Prometheus counter `scalechat_pubsub_messages_total`
        (the workers write it to PROMETHEUS_MULTIPROC_DIR); a scalechat without that counter
        gives None. The peers count in their subscriber and answer GET /metrics.
        """
        if self.server == "scalechat":
            return self._scalechat_pubsub()
        counts = {}
        for name, port in zip(self.worker_names, self.ports):
            with urllib.request.urlopen(f"http://{HOST}:{port}/metrics", timeout=5) as resp:
                counts[name] = _prometheus_value(resp.read().decode(),
                                                 "bench_pubsub_messages_total")
        return counts

    def _scalechat_pubsub(self):
        from prometheus_client import CollectorRegistry, multiprocess
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry, path=str(self.metrics_dir))
        counts = {}
        for family in registry.collect():
            for sample in family.samples:
                if sample.name == "scalechat_pubsub_messages_total":
                    worker = sample.labels.get("worker")
                    counts[worker] = counts.get(worker, 0) + sample.value
        if not counts:
            return None
        return {name: counts.get(name, 0) for name in self.worker_names}

    def check_alive(self):
        for name in self.procs:
            self._check_alive(name)

    def stop(self):
        # workers first, so they do not log a lost Redis while stopping
        for name in sorted(self.procs, key=is_redis):
            stop(self.procs[name])
        self.procs.clear()


def _prometheus_value(text, metric):
    """The value of a metric's one sample in Prometheus' text format."""
    for line in text.splitlines():
        if line.startswith(metric + "{") or line.startswith(metric + " "):
            return float(line.rsplit(" ", 1)[1])
    raise RuntimeError(f"no {metric} in the /metrics answer")

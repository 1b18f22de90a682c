"""The servers under test: a fresh Redis and two worker processes of scalechat or a peer.

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
SERVERS = ("scalechat", "node", "python_stock")
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


class Stack:
    """Redis plus two workers of one server, on free ports of 127.0.0.1."""

    def __init__(self, server, logdir, aof=False, scalechat_code=None):
        if server not in SERVERS:
            raise ValueError(f"unknown server {server!r}; one of {', '.join(SERVERS)}")
        self.server = server
        self.logdir = Path(logdir)
        self.aof = aof
        self.scalechat_code = scalechat_code  # a snapshot_scalechat() directory, or the tree
        self.procs = {}
        self.ports = []
        self.redis_port = None

    @property
    def pids(self):
        return {name: proc.pid for name, proc in self.procs.items()}

    @property
    def worker_pids(self):
        return {name: proc.pid for name, proc in self.procs.items() if name != "redis"}

    def start(self, timeout=60.0):
        self.logdir.mkdir(parents=True, exist_ok=True)
        try:
            self._start_redis(timeout)
            for i in range(2):
                port = free_port()
                self.ports.append(port)
                self.procs[f"w{i}"] = self._start_worker(i, port)
            for i, port in enumerate(self.ports):
                self._wait_healthy(f"w{i}", port, timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _start_redis(self, timeout):
        self.redis_port = free_port()
        datadir = self.logdir / f"redis-{self.redis_port}"
        datadir.mkdir(parents=True, exist_ok=True)
        persistence = (["--appendonly", "yes", "--appendfsync", "everysec"] if self.aof
                       else ["--appendonly", "no"])
        argv = [shutil.which("redis-server") or "redis-server",
                "--port", str(self.redis_port), "--bind", HOST, "--save", "",
                *persistence, "--dir", str(datadir), "--daemonize", "no",
                "--maxclients", "10000", "--protected-mode", "yes"]
        self.procs["redis"] = spawn(argv, self.logdir / "redis.log")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self._check_alive("redis")
            try:
                with socket.create_connection((HOST, self.redis_port), timeout=1) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(64).startswith(b"+PONG"):
                        return
            except OSError:
                pass
            time.sleep(0.05)
        raise RuntimeError("redis-server did not answer PING in time")

    def _start_worker(self, i, port):
        redis_url = f"redis://{HOST}:{self.redis_port}/0"
        env = dict(os.environ)
        log = self.logdir / f"{self.server}-w{i}.log"
        if self.server == "scalechat":
            env.update(REDIS_URL=redis_url, SECRET_KEY="bench", SCALECHAT_WORKER_ID=f"w{i}",
                       SCALECHAT_RATE_LIMIT="100000", SCALECHAT_RATE_BURST="100000")
            if self.scalechat_code is None:
                script = Path(sys.executable).parent / "scalechat-worker"
                return spawn([str(script), "--host", HOST, "--port", str(port)], log, env, cwd=ROOT)
            # the snapshot comes first on sys.path, before the editable install of the tree
            env["SCALECHAT_NODE_MODULES"] = str(ROOT / "node_modules")
            return spawn([sys.executable, "-c", "from wsgi import main; main()",
                          "--host", HOST, "--port", str(port)], log, env, cwd=self.scalechat_code)
        if self.server == "python_stock":
            env.update(REDIS_URL=redis_url, WORKER_ID=f"p{i}")
            return spawn([sys.executable, str(PEERS / "python_stock" / "server.py"),
                          "--host", HOST, "--port", str(port)], log, env, cwd=ROOT)
        node_ready()
        env.update(REDIS_URL=redis_url, WORKER_ID=f"n{i}", HOST=HOST, PORT=str(port),
                   NODE_ENV="production")
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

    def check_alive(self):
        for name in self.procs:
            self._check_alive(name)

    def stop(self):
        # workers first, so they do not log a lost Redis while stopping
        for name in sorted(self.procs, key=lambda n: n == "redis"):
            stop(self.procs[name])
        self.procs.clear()

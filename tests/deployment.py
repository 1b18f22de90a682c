"""The deployed stack for tests: deploy/run under a temp var/, and clients that resume like browsers."""
import contextlib
import os
import resource
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

import pytest
import requests

from conftest import HANDED_OUT, ROOT, ChatClient, InOrderClient, free_port


def free_port_run(count):
    """Return the first of `count` consecutive free ports, none given before in this run."""
    while True:
        base = free_port()
        run = range(base, base + count)
        if base + count < 65000 and all(port == base or port not in HANDED_OUT for port in run) \
                and all(port_is_free(port) for port in run):
            HANDED_OUT.update(run)
            return base


def port_is_free(port):
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def cluster_bus_free(first):
    """True when the cluster bus ports of six nodes from `first` (each port + 10000) are free."""
    return first + 5 + 10000 <= 65535 and all(port_is_free(first + n + 10000) for n in range(6))


@contextlib.contextmanager
def service_dir():
    """A temp dir that the stack's service user can enter (pytest's own are closed to it)."""
    path = Path(tempfile.mkdtemp(prefix="scalechat-test-"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def service_tmp():
    with service_dir() as path:
        yield path


class Stack:
    """The whole stack started by deploy/run from supervisord.conf, under a temp var/."""

    def __init__(self, var, workers=2, open_files=None, as_user=None, topology="single",
                 **settings):
        self.var = var
        self.env = {key: value for key, value in os.environ.items()
                    if not key.startswith(("SCALECHAT_", "REDIS_", "PROXY_")) and key not in (
                        "WORKERS", "PORT", "SECRET_KEY", "PUBLIC_BIND", "STATS_PORT",
                        "METRICS_PORT", "PROMETHEUS_MULTIPROC_DIR", "RUN_USER", "SENTINEL_PORT")}
        # with Sentinel: 3 Redis nodes, then 3 Sentinels; a cluster: 6 nodes and their bus ports
        # (a stack may be configured again as a cluster)
        redis_port = free_port_run(6)
        while not cluster_bus_free(redis_port):
            redis_port = free_port_run(6)
        self.env.update(SCALECHAT_VAR=str(var), WORKERS=str(workers), PORT=str(free_port()),
                        STATS_PORT=str(free_port()), REDIS_PORT=str(redis_port),
                        REDIS_TOPOLOGY=topology, SENTINEL_PORT=str(redis_port + 3),
                        METRICS_PORT=str(free_port()), REDIS_EXPORTER_PORT=str(free_port()),
                        WORKER_PORT_BASE=str(free_port_run(workers + 1)),
                        SCALECHAT_PRESENCE_TTL="5", SCALECHAT_RATE_LIMIT="200",
                        SCALECHAT_RATE_BURST="400", **settings)
        self.url = f"http://127.0.0.1:{self.env['PORT']}"
        self.workers = workers
        self.open_files = open_files
        self.as_user = as_user

    def command(self, name, *args):
        """The command line of deploy/<name>: where and how the stack's scripts run."""
        return [str(ROOT / "deploy" / name), *args]

    def script(self, name, *args, check=True, timeout=180):
        """Run deploy/<name> (as `as_user`, under an `open_files` limit, when the stack has them)."""
        command = self.command(name, *args)
        if self.as_user:
            command = ["setpriv", f"--reuid={self.as_user}", f"--regid={self.as_user}",
                       "--init-groups", "--", *command]
        limit = self.open_files and (lambda: resource.setrlimit(
            resource.RLIMIT_NOFILE, (self.open_files, self.open_files)))
        result = subprocess.run(command, env=self.env, cwd=ROOT, capture_output=True, text=True,
                                timeout=timeout, preexec_fn=limit or None)
        if check:
            assert result.returncode == 0, \
                f"deploy/{name}: {result.stdout}\n{result.stderr}\n{self.program_logs()}"
        return result

    def program_logs(self, lines=5):
        """The last lines of each program's log: why a program exited too quickly."""
        return "\n".join(f"{log.name}: ...{' | '.join(log.read_text(errors='replace').splitlines()[-lines:])}"
                         for log in sorted((self.var / "log").glob("*.log")))

    def ctl(self, *args):
        return subprocess.run(
            [str(ROOT / ".venv/bin/supervisorctl"), "-c", str(ROOT / "supervisord.conf"),
             "-s", f"unix://{self.var}/run/supervisor.sock", *args],
            # beyond supervisord's own bound on a stop (stopwaitsecs, 30 s for Redis)
            capture_output=True, text=True, timeout=45).stdout

    def states(self):
        return dict(line.split()[:2] for line in self.ctl("status").splitlines() if line.strip())

    def pids(self):
        return {name: int(self.ctl("pid", name).strip()) for name in self.states()}

    def server_stats(self, server, proxy="workers"):
        """HAProxy's `show stat` row for a worker (or FRONTEND of proxy `public`), as a dict."""
        out = subprocess.run(["socat", "-t", "5", "stdio", f"unix-connect:{self.var}/run/haproxy.sock"],
                             input="show stat\n", capture_output=True, text=True, timeout=10).stdout
        lines = out.splitlines()
        header = lines[0].lstrip("# ").split(",")
        for line in lines[1:]:
            row = dict(zip(header, line.split(",")))
            if row.get("pxname") == proxy and row.get("svname") == server:
                return row
        raise AssertionError(f"no HAProxy row for {proxy}/{server}")

    def token(self, name):
        return requests.post(self.url + "/api/session", json={"name": name}, timeout=5).json()["token"]


@contextlib.contextmanager
def running(stack):
    """Start `stack`, and stop it after, even when it did not start, checking that none of its
    processes is left."""
    pids = {}
    try:
        stack.script("run")
        pids = stack.pids()
        yield stack
    finally:
        stopped = stack.script("stop", check=False)
    assert stopped.returncode == 0, f"deploy/stop: {stopped.stdout}\n{stopped.stderr}"
    alive = [pid for pid in pids.values() if os.path.exists(f"/proc/{pid}")]
    assert not alive, f"processes left after deploy/stop: {alive}"


@pytest.fixture(scope="module")
def stack():
    with service_dir() as path, running(Stack(path / "var")) as started:
        yield started


class ResumingClient(ChatClient):
    """A client through the proxy that reconnects, re-joins and fills any gap from history."""

    def __init__(self, name, stack, transports=("websocket",)):
        super().__init__(name)
        self.http = requests.Session()
        self.sio = InOrderClient(reconnection=True, reconnection_delay=0.2,
                                reconnection_delay_max=1, http_session=self.http)
        self.sio.on("message", self._on_message)
        self.sio.on("announcement", self._recorder("announcement"))
        self.sio.on("connect", self._on_connect)
        self.stack = stack
        self.transports = list(transports)
        self.rooms = set()
        self.ids = []
        self.out_of_order = 0
        self._last_live = None
        self.connects = 0
        self.resends = 0
        self.workers_seen = []

    def start(self):
        self.sio.connect(self.stack.url, auth={"token": self.stack.token(self.name)},
                         transports=self.transports, wait_timeout=10)
        return self

    def _on_message(self, message):
        with self._changed:
            order = tuple(map(int, message["id"].split("-")))
            if self._last_live is not None and order <= self._last_live:
                self.out_of_order += 1
            self._last_live = order
            if message["id"] not in self.ids:
                self.ids.append(message["id"])
            self._changed.notify_all()

    def _on_connect(self):
        self.connects += 1
        self._last_live = None  # a new connection may repeat what history already gave
        if self.connects > 1:
            self.sio.start_background_task(self._resume)

    def _resume(self):
        for room in list(self.rooms):
            try:
                self.enter(room)
            except Exception:
                return  # disconnected again: the next connect resumes

    def enter(self, room):
        """Join `room` and load what was missed since the last message seen."""
        after = self.ids[-1] if self.ids else None  # before live messages flow again
        ack = self.join(room)
        self.rooms.add(room)
        self.workers_seen.append(ack["worker"])
        while True:
            page = self.call("history", {"room": room, "after": after, "limit": 200}
                             if after else {"room": room, "limit": 200})
            assert page["ok"], page
            with self._changed:
                for message in page["messages"]:
                    if message["id"] not in self.ids:
                        self.ids.append(message["id"])
                self.ids.sort(key=lambda i: tuple(map(int, i.split("-"))))
            if len(page["messages"]) < 200:
                return ack
            after = page["messages"][-1]["id"]

    def send_reliably(self, room, text, timeout=60):
        """Send until acknowledged, re-sending the same client_id across reconnects."""
        client_id = uuid.uuid4().hex
        deadline = time.monotonic() + timeout
        attempts = 0
        while time.monotonic() < deadline:
            attempts += 1
            self.resends += attempts > 1
            try:
                ack = self.sio.call("message", {"room": room, "text": text, "client_id": client_id},
                                    timeout=3)
            except Exception:
                time.sleep(0.2)
                continue
            if ack.get("ok"):
                return ack["id"]
            time.sleep(0.2)  # e.g. not_member while re-joining, unavailable while Redis restarts
        raise AssertionError(f"{self.name}: message never acknowledged")


@contextlib.contextmanager
def clients_in(stack, room, count):
    """`count` resuming clients in `room`, on both workers; closed afterwards."""
    clients = [ResumingClient(f"c{n:02d}", stack).start() for n in range(count)]
    try:
        for client in clients:
            client.enter(room)
        assert {c.workers_seen[0] for c in clients} == {"worker-00", "worker-01"}
        yield clients
    finally:
        for client in clients:
            client.close()


def check_clients_hear_each_other(resuming, room):
    """Four clients land on both workers through the proxy, and each gets everyone's message."""
    clients = [resuming(f"ws{n}") for n in range(4)]
    for client in clients:
        client.enter(room)
    assert {c.workers_seen[0] for c in clients} == {"worker-00", "worker-01"}
    sent = [client.send_reliably(room, f"from {client.name}") for client in clients]
    for client in clients:
        client.wait_for("message", lambda got: len(client.ids) >= 4)
        assert client.ids == sent


@pytest.fixture
def resuming(stack):
    made = []

    def make(name, **kwargs):
        client = ResumingClient(name, stack, **kwargs).start()
        made.append(client)
        return client
    yield make
    for client in made:
        client.close()


def stream_ids(stack, room):
    """Every message id of the room's stream, oldest first, read through the proxy."""
    headers = {"Authorization": f"Bearer {stack.token('auditor')}"}
    ids, params = [], {"limit": 200, "after": "0-0"}
    while True:
        page = requests.get(f"{stack.url}/api/rooms/{room}/messages", params=params,
                            headers=headers, timeout=10).json()["messages"]
        ids += [m["id"] for m in page]
        if len(page) < 200:
            return ids
        params["after"] = ids[-1]

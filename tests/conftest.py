"""Real services for the tests: redis-server, worker processes, Socket.IO clients."""
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import engineio
import pytest
import redis
import requests
import socketio

pytest_plugins = ["deployment"]  # the stack fixtures

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
SECRET_KEY = "test-secret-key"


HANDED_OUT = set()  # every port free_port has given in this run


def free_port():
    """A port nothing listens on, never given before in this run.

    The kernel may answer two binds to port 0 in a row with the same port when nothing holds
    the first yet: two servers of one test (a Sentinel and its master, HAProxy's two
    listeners) then collide.
    """
    while True:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        if port not in HANDED_OUT:
            HANDED_OUT.add(port)
            return port


def wait_until(predicate, timeout=10.0, what="condition"):
    """Poll `predicate` until it returns a true value, or fail naming `what`."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.05)


def stop_process(proc, sig=signal.SIGTERM, timeout=10):
    """Stop a child by its PID, killing it if it does not exit in time."""
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class RedisServer:
    """A redis-server child on a free port in its own directory."""

    def __init__(self, directory, port=None):
        self.directory = directory
        self.port = port or free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc = None

    def start(self):
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1",
             "--dir", str(self.directory), "--save", "", "--appendonly", "no"],
            stdout=subprocess.DEVNULL)
        client = redis.Redis.from_url(self.url)

        def answers():
            try:
                return client.ping()
            except redis.ConnectionError:
                assert self.proc.poll() is None, "redis-server exited"
                return False
        wait_until(answers, what=f"redis-server on port {self.port}")
        return self

    def stop(self):
        stop_process(self.proc)


class HoldingProxy:
    """A TCP proxy in front of Redis that can hold one chosen command until told to go on, or
    silence the subscriptions it carries.

    `hold(match)` arms it: the next chunk a client sends for which `match(chunk)` is true waits
    (`holding` is set) until `release()`; `answered` is set once Redis has replied to it.
    `mute_subscriptions()` drops from then on what Redis sends to the connections that have
    subscribed (SSUBSCRIBE) so far, keeping them open.
    """

    def __init__(self, upstream_port):
        self.upstream_port = upstream_port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.match = None
        self.holding, self.released, self.answered = (threading.Event() for _ in range(3))
        self.subscribed, self.muted = [], set()
        self.sockets = [self.listener]
        threading.Thread(target=self._accept, daemon=True).start()

    def hold(self, match):
        self.match = match

    def release(self):
        self.released.set()

    def mute_subscriptions(self):
        self.muted.update(self.subscribed)

    def _accept(self):
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            server = socket.create_connection(("127.0.0.1", self.upstream_port))
            self.sockets += [client, server]
            held = threading.Event()  # this connection carried the held command
            threading.Thread(target=self._pump, args=(client, server, held, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client, held, False), daemon=True).start()

    def _pump(self, source, target, held, to_redis):
        while True:
            try:
                chunk = source.recv(65536)
                if not chunk:
                    break
                if to_redis and self.match is not None and self.match(chunk):
                    self.match = None
                    held.set()
                    self.holding.set()
                    self.released.wait()
                if to_redis and b"SSUBSCRIBE" in chunk.upper():
                    self.subscribed.append(source)
                if to_redis or target not in self.muted:
                    target.sendall(chunk)
                if not to_redis and held.is_set() and self.released.is_set():
                    self.answered.set()
            except OSError:
                break
        for sock in (source, target):
            sock.close()

    def close(self):
        for sock in self.sockets:
            sock.close()


class Worker:
    """A `scalechat-worker` process on a free port."""

    def __init__(self, redis_url, worker_id, log_dir, port=None, **env):
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.worker_id = worker_id
        self.env = {**os.environ, "REDIS_URL": redis_url, "SECRET_KEY": SECRET_KEY,
                    "SCALECHAT_WORKER_ID": worker_id, "SCALECHAT_ENV": "test",
                    "SCALECHAT_PRESENCE_TTL": "3", "SCALECHAT_RATE_LIMIT": "1000",
                    "SCALECHAT_RATE_BURST": "1000", **env}
        self.log_path = Path(log_dir) / f"{worker_id}.log"
        self.proc = None

    def start(self, wait_healthy=True):
        self.log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [str(BIN / "scalechat-worker"), "--host", "127.0.0.1", "--port", str(self.port)],
            env=self.env, stdout=self.log, stderr=subprocess.STDOUT, cwd=ROOT)
        wait_until(self._answers if wait_healthy else self._listening, timeout=20,
                   what=f"worker {self.worker_id} on port {self.port}")
        return self

    def _listening(self):
        assert self.proc.poll() is None, f"worker exited: {self.log_path.read_text()}"
        try:
            requests.get(self.url + "/healthz", timeout=1)
            return True
        except requests.ConnectionError:
            return False

    def _answers(self):
        return self._listening() and requests.get(self.url + "/readyz", timeout=2).ok

    def stop(self, sig=signal.SIGTERM):
        stop_process(self.proc, sig)
        self.log.close()

    def sign_in(self, name):
        """Sign in as a new guest; return {"token", "user", "user_id"}."""
        response = requests.post(self.url + "/api/session", json={"name": name}, timeout=5)
        response.raise_for_status()
        return response.json()

    def token(self, name):
        return self.sign_in(name)["token"]


class InOrderEngineIOClient(engineio.Client):
    """python-engineio's client, handing received messages to the handler one at a time, in order.

    The stock client starts a thread for each message it receives, so two messages that
    arrive together may be handled in either order: events of one room would seem reordered.
    Here one thread per client handles them in the order they arrived.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.inbox = queue.SimpleQueue()
        self.inbox_thread = None

    def _trigger_event(self, event, *args, run_async=False, **kwargs):
        if event != "message" or not run_async:
            return super()._trigger_event(event, *args, run_async=run_async, **kwargs)
        if self.inbox_thread is None:
            self.inbox_thread = threading.Thread(target=self._handle_inbox, daemon=True)
            self.inbox_thread.start()
        self.inbox.put(args)
        return None

    def _handle_inbox(self):
        while True:
            super()._trigger_event("message", *self.inbox.get())


class InOrderClient(socketio.Client):
    """python-socketio's client on InOrderEngineIOClient: events arrive in the order sent."""

    def _engineio_client_class(self):
        return InOrderEngineIOClient


class ChatClient:
    """A python-socketio client that records every event it receives, in the order sent."""

    def __init__(self, name):
        self.name = name
        self.sio = InOrderClient(reconnection=False)
        self.events = {"message": [], "presence": [], "online": [], "typing": [],
                       "announcement": []}
        self.connect_error = None
        self.token = self.user_id = None
        self._changed = threading.Condition()
        for event in self.events:
            self.sio.on(event, self._recorder(event))
        self.sio.on("connect_error", self._record_connect_error)

    def _recorder(self, event):
        def record(data):
            with self._changed:
                self.events[event].append(data)
                self._changed.notify_all()
        return record

    def _record_connect_error(self, data):
        self.connect_error = data

    def connect(self, worker, token=None, transports=("websocket",), **kwargs):
        """Connect with `token`, or as a new guest under this client's name."""
        if token is None:
            guest = worker.sign_in(self.name)
            token, self.user_id = guest["token"], guest["user_id"]
        self.token = token
        self.sio.connect(worker.url, auth={"token": token}, transports=list(transports),
                         wait_timeout=10, **kwargs)
        return self

    def call(self, event, *args):
        """Emit `event` with each of `args` as one Socket.IO argument; return the ack."""
        data = args[0] if len(args) == 1 else (tuple(args) or None)
        return self.sio.call(event, data, timeout=10)

    def join(self, room, **extra):
        ack = self.call("join", {"room": room, **extra})
        assert ack["ok"], ack
        return ack

    def send(self, room, text, client_id=None):
        return self.call("message", {"room": room, "text": text,
                                     "client_id": client_id or uuid.uuid4().hex})

    def wait_for(self, event, predicate, timeout=10):
        """Wait until `predicate(list of received `event` payloads)` is true."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while not predicate(self.events[event]):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise AssertionError(
                        f"{self.name}: timed out waiting on {event}: {self.events[event]}")
                self._changed.wait(remaining)
        return self.events[event]

    def messages(self, room):
        return [m for m in self.events["message"] if m["room"] == room]

    def close(self):
        if self.sio.connected:
            self.sio.disconnect()


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory):
    server = RedisServer(tmp_path_factory.mktemp("redis")).start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def workers(redis_server, tmp_path_factory):
    """Two worker processes sharing the session's Redis."""
    log_dir = tmp_path_factory.mktemp("workers")
    pair = [Worker(redis_server.url, f"w{n}", log_dir).start() for n in (1, 2)]
    yield pair
    for worker in pair:
        worker.stop()


@pytest.fixture
def worker_factory(redis_server, tmp_path):
    """Start extra workers for one test; they are stopped afterwards."""
    started = []

    def start(worker_id, redis_url=None, wait_healthy=True, port=None, **env):
        worker = Worker(redis_url or redis_server.url, worker_id, tmp_path, port=port, **env)
        started.append(worker)
        return worker.start(wait_healthy=wait_healthy)
    yield start
    for worker in started:
        worker.stop(signal.SIGKILL)


@pytest.fixture
def clients():
    """Make ChatClients; every one is disconnected after the test."""
    made = []

    def make(name):
        client = ChatClient(name)
        made.append(client)
        return client
    yield make
    for client in made:
        client.close()


@pytest.fixture
def room():
    """A room name no other test uses."""
    return "room-" + uuid.uuid4().hex[:12]


@pytest.fixture(scope="session")
def chromium():
    """Debian's headless Chromium driven by Playwright (Playwright's own browser builds are not used)."""
    from playwright.sync_api import sync_playwright
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path="/usr/bin/chromium", headless=True,
            args=["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update",
                  "--disable-sync"])
        yield browser
        browser.close()

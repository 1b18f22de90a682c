"""The deployed stack: supervisord, the embedded Redis, the workers and HAProxy, for real."""
import os
import signal
import socket
import subprocess
import threading
import time
import uuid

import pytest
import requests
import socketio

from conftest import ROOT, ChatClient, free_port, wait_until


def free_port_run(count):
    """Return the first of `count` consecutive free ports."""
    while True:
        base = free_port()
        if base + count < 65000 and all(port_is_free(base + n) for n in range(count)):
            return base


def port_is_free(port):
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


class Stack:
    """The whole stack started by deploy/run from supervisord.conf, under a temp var/."""

    def __init__(self, var, workers=2):
        self.var = var
        self.env = {key: value for key, value in os.environ.items()
                    if not key.startswith(("SCALECHAT_", "REDIS_")) and key not in (
                        "WORKERS", "PORT", "SECRET_KEY", "PUBLIC_BIND", "STATS_PORT")}
        self.env.update(SCALECHAT_VAR=str(var), WORKERS=str(workers), PORT=str(free_port()),
                        STATS_PORT=str(free_port()), REDIS_PORT=str(free_port()),
                        WORKER_PORT_BASE=str(free_port_run(workers + 1)),
                        SCALECHAT_PRESENCE_TTL="5", SCALECHAT_RATE_LIMIT="200",
                        SCALECHAT_RATE_BURST="400")
        self.url = f"http://127.0.0.1:{self.env['PORT']}"
        self.workers = workers

    def script(self, name, *args, check=True, timeout=180):
        result = subprocess.run([str(ROOT / "deploy" / name), *args], env=self.env, cwd=ROOT,
                                capture_output=True, text=True, timeout=timeout)
        if check:
            assert result.returncode == 0, f"deploy/{name}: {result.stdout}\n{result.stderr}"
        return result

    def ctl(self, *args):
        return subprocess.run(
            [str(ROOT / ".venv/bin/supervisorctl"), "-c", str(ROOT / "supervisord.conf"),
             "-s", f"unix://{self.var}/run/supervisor.sock", *args],
            capture_output=True, text=True, timeout=30).stdout

    def states(self):
        return dict(line.split()[:2] for line in self.ctl("status").splitlines() if line.strip())

    def pids(self):
        return {name: int(self.ctl("pid", name).strip()) for name in self.states()}

    def server_stats(self, server):
        """HAProxy's `show stat` row for a worker, as a dict."""
        out = subprocess.run(["socat", "-t", "5", "stdio", f"unix-connect:{self.var}/run/haproxy.sock"],
                             input="show stat\n", capture_output=True, text=True, timeout=10).stdout
        lines = out.splitlines()
        header = lines[0].lstrip("# ").split(",")
        for line in lines[1:]:
            row = dict(zip(header, line.split(",")))
            if row.get("pxname") == "workers" and row.get("svname") == server:
                return row
        raise AssertionError(f"no HAProxy row for {server}")

    def token(self, name):
        return requests.post(self.url + "/api/session", json={"name": name}, timeout=5).json()["token"]


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    stack = Stack(tmp_path_factory.mktemp("var"))
    stack.script("run")
    pids = stack.pids()
    yield stack
    stack.script("stop")
    alive = [pid for pid in pids.values() if os.path.exists(f"/proc/{pid}")]
    assert not alive, f"processes left after deploy/stop: {alive}"


class ResumingClient(ChatClient):
    """A client through the proxy that reconnects, re-joins and fills any gap from history."""

    def __init__(self, name, stack, transports=("websocket",)):
        super().__init__(name)
        self.http = requests.Session()
        self.sio = socketio.Client(reconnection=True, reconnection_delay=0.2,
                                   reconnection_delay_max=1, http_session=self.http)
        self.sio.on("message", self._on_message)
        self.sio.on("connect", self._on_connect)
        self.stack = stack
        self.transports = list(transports)
        self.rooms = set()
        self.ids = []
        self.connects = 0
        self.workers_seen = []

    def start(self):
        self.sio.connect(self.stack.url, auth={"token": self.stack.token(self.name)},
                         transports=self.transports, wait_timeout=10)
        return self

    def _on_message(self, message):
        with self._changed:
            if message["id"] not in self.ids:
                self.ids.append(message["id"])
            self._changed.notify_all()

    def _on_connect(self):
        self.connects += 1
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
        while time.monotonic() < deadline:
            try:
                ack = self.sio.call("message", {"room": room, "text": text, "client_id": client_id},
                                    timeout=3)
            except Exception:
                time.sleep(0.2)
                continue
            if ack.get("ok"):
                return ack["id"]
            time.sleep(0.2)  # e.g. not_member while re-joining after a reconnect
        raise AssertionError(f"{self.name}: message never acknowledged")


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
    response = requests.get(f"{stack.url}/api/rooms/{room}/messages", params={"limit": 200},
                            headers={"Authorization": f"Bearer {stack.token('auditor')}"}, timeout=5)
    return [m["id"] for m in response.json()["messages"]]


def test_every_program_of_the_stack_is_running(stack):
    states = stack.states()
    assert set(states) == {"redis", "haproxy", "worker-00", "worker-01"}
    assert set(states.values()) == {"RUNNING"}
    status = stack.script("status")
    assert "worker-00 " in status.stdout and "UP" in status.stdout


def test_polling_through_the_proxy_relies_on_the_sticky_cookie(stack, resuming, room):
    """Long-polling sends each request of a session separately: only the worker that opened
    the Engine.IO session knows its sid, so without the cookie HAProxy's round robin would
    send the next poll to the other worker, which answers 400 and the session breaks."""
    alice = resuming("alice", transports=("polling",))
    bob = resuming("bob", transports=("polling",))
    alice.enter(room)
    bob.enter(room)
    assert "SCALECHAT_WORKER" in alice.http.cookies
    sent = [alice.send_reliably(room, "hi bob"), bob.send_reliably(room, "hi alice")]
    for client in (alice, bob):
        client.wait_for("message", lambda got: False or len(client.ids) >= 2)
        assert client.ids == sent
    assert alice.connects == bob.connects == 1


def test_polling_without_the_cookie_reaches_a_worker_that_does_not_know_the_session(stack):
    handshake = requests.get(stack.url + "/socket.io/", params={"EIO": "4", "transport": "polling"},
                             timeout=5)
    owner = handshake.headers["X-Scalechat-Worker"]
    sid = handshake.text.split('"sid":"')[1].split('"')[0]
    poll = {"EIO": "4", "transport": "polling", "sid": sid}

    def post(data, cookies):
        response = requests.post(stack.url + "/socket.io/", params=poll, data=data,
                                 cookies=cookies, timeout=5)
        return response.headers["X-Scalechat-Worker"], response.status_code
    token = stack.token("poller")
    assert post('40{"token":"%s"}' % token, handshake.cookies) == (owner, 200)
    typing = '42["typing",{"room":"lobby"}]'
    assert {post(typing, handshake.cookies) for _ in range(6)} == {(owner, 200)}
    without_cookie = {post(typing, None) for _ in range(6)}
    assert (owner, 200) in without_cookie
    assert any(worker != owner and status == 400 for worker, status in without_cookie)


def test_websocket_clients_spread_over_workers_and_hear_each_other(stack, resuming, room):
    clients = [resuming(f"ws{n}") for n in range(4)]
    for client in clients:
        client.enter(room)
    assert {c.workers_seen[0] for c in clients} == {"worker-00", "worker-01"}
    sent = [client.send_reliably(room, f"from {client.name}") for client in clients]
    for client in clients:
        client.wait_for("message", lambda got: len(client.ids) >= 4)
        assert client.ids == sent


def test_a_killed_worker_is_restarted_and_its_clients_keep_chatting(stack, resuming, room):
    clients = [resuming(f"k{n}") for n in range(4)]
    for client in clients:
        client.enter(room)
    victim = "worker-00"
    old_pid = stack.pids()[victim]
    downs = int(stack.server_stats(victim)["chkdown"])
    os.kill(old_pid, signal.SIGKILL)
    # a request pinned to the dead worker by its cookie is served by the other one
    response = requests.get(stack.url + "/healthz", cookies={"SCALECHAT_WORKER": "w00"}, timeout=5)
    assert response.status_code == 200 and response.headers["X-Scalechat-Worker"] == "worker-01"

    wait_until(lambda: stack.states()[victim] == "RUNNING" and stack.pids()[victim] != old_pid,
               timeout=30, what="supervisord to restart the worker")
    wait_until(lambda: int(stack.server_stats(victim)["chkdown"]) > downs, timeout=10,
               what="HAProxy to mark the worker down")
    wait_until(lambda: stack.server_stats(victim)["status"] == "UP", timeout=30,
               what="HAProxy to mark the worker up again")
    sent = [client.send_reliably(room, f"after the crash from {client.name}") for client in clients]
    for client in clients:
        client.wait_for("message", lambda got: set(sent) <= set(client.ids), timeout=30)
    assert any(client.connects > 1 for client in clients)


def test_scaling_keeps_the_other_workers_connections(stack, resuming, room):
    stayers = [resuming(f"stay{n}") for n in range(2)]
    for client in stayers:
        client.enter(room)
    before = stack.pids()
    stack.script("scale", "3")
    assert stack.states()["worker-02"] == "RUNNING"
    wait_until(lambda: stack.server_stats("worker-02")["status"] == "UP", timeout=15,
               what="HAProxy to send clients to the new worker")
    movers = [resuming(f"mover{n}") for n in range(3)]
    for client in movers:
        client.enter(room)
    assert "worker-02" in {client.workers_seen[0] for client in movers}

    stack.script("scale", "2")
    assert "worker-02" not in stack.states()
    after = stack.pids()
    assert {name: after[name] for name in before} == before
    sent = [client.send_reliably(room, f"after scaling, {client.name}") for client in stayers + movers]
    for client in stayers + movers:
        client.wait_for("message", lambda got: set(sent) <= set(client.ids), timeout=30)
    assert [client.connects for client in stayers] == [1, 1]
    assert any(client.connects > 1 for client in movers)


def test_rolling_restart_loses_no_message(stack, resuming, room):
    listeners = [resuming(f"listener{n}") for n in range(4)]
    senders = [resuming(f"sender{n}") for n in range(2)]
    for client in listeners + senders:
        client.enter(room)
    acked = []
    restarting = threading.Event()
    restarting.set()

    def chat(sender):
        n = 0
        while restarting.is_set() and n < 2000:
            acked.append(sender.send_reliably(room, f"{sender.name} #{n}"))
            n += 1
            time.sleep(0.02)
    threads = [threading.Thread(target=chat, args=(sender,)) for sender in senders]
    for thread in threads:
        thread.start()
    try:
        time.sleep(0.5)
        before = stack.pids()
        stack.script("rolling-restart", "--drain-seconds", "1")
        after = stack.pids()
        time.sleep(0.5)
    finally:
        restarting.clear()
        for thread in threads:
            thread.join()
    assert before["worker-00"] != after["worker-00"] and before["worker-01"] != after["worker-01"]
    assert before["redis"] == after["redis"] and before["haproxy"] == after["haproxy"]

    stored = stream_ids(stack, room) if len(acked) < 200 else None
    for client in listeners + senders:
        client.wait_for("message", lambda got: set(acked) <= set(client.ids), timeout=30)
        if stored is not None:
            assert client.ids == stored, client.name
    assert len(set(acked)) == len(acked) > 20
    assert all(client.connects > 1 for client in listeners + senders)


@pytest.fixture(scope="module")
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


def test_two_browsers_chat_through_the_proxy(stack, chromium, room, tmp_path):
    pages = []
    for name in ("Alice", "Bob"):
        page = chromium.new_context().new_page()
        page.goto(stack.url + "/")
        page.fill("#name", name)
        page.click("button[type=submit]")
        page.fill("#room", room)
        page.click("text=Go")
        page.wait_for_url(f"**/rooms/{room}")
        page.wait_for_selector("#status:text('online')")
        pages.append(page)
    alice, bob = pages
    alice.wait_for_selector("#members li:text('Bob')")

    alice.fill("#text", "hello from Alice")
    alice.press("#text", "Enter")
    bob.fill("#text", "hi Alice, Bob here")
    bob.click("#send button")
    for page in pages:
        page.wait_for_selector("#messages li:has-text('hello from Alice')")
        page.wait_for_selector("#messages li:has-text('Bob here')")
    for page, name in zip(pages, ("alice", "bob")):
        texts = page.locator("#messages .text").all_text_contents()
        assert texts == ["hello from Alice", "hi Alice, Bob here"]
        page.screenshot(path=str(tmp_path / f"{name}.png"))
    assert (tmp_path / "alice.png").stat().st_size > 0


def test_a_taken_port_stops_the_start_with_its_name(tmp_path):
    blocker = socket.socket()
    blocker.bind(("127.0.0.1", 0))
    blocker.listen()
    try:
        stack = Stack(tmp_path / "var")
        stack.env["STATS_PORT"] = str(blocker.getsockname()[1])
        result = stack.script("run", check=False)
    finally:
        blocker.close()
    assert result.returncode != 0
    assert f"port {stack.env['STATS_PORT']} for the HAProxy stats page (STATS_PORT)" in result.stderr
    assert not (tmp_path / "var" / "run" / "supervisord.pid").exists()


@pytest.mark.parametrize("name", ["install", "configure", "run", "stop", "status",
                                  "rolling-restart", "scale"])
def test_every_deploy_script_explains_itself(name):
    result = subprocess.run([str(ROOT / "deploy" / name), "--help"], capture_output=True,
                            text=True, timeout=10)
    assert result.returncode == 0 and result.stdout.startswith("Usage: deploy/" + name)

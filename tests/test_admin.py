"""The Socket.IO Admin UI: an operator signed in on any worker sees every worker's chat."""
import inspect
import os
import socket
import subprocess
import threading
import time

import pytest
import requests
import socketio

from conftest import BIN, free_port, stop_process, wait_until

PASSWORD = "admin-test-password"


class AdminClient:
    """A python-socketio client on /admin recording what the Admin UI is told, in order."""

    def __init__(self):
        self.sio = socketio.Client(reconnection=False)
        self.records = []
        self._changed = threading.Condition()
        self.sio.on("*", self._record, namespace="/admin")

    def _record(self, kind, *args):
        with self._changed:
            self.records.append((kind, args))
            self._changed.notify_all()

    def connect(self, worker, password=PASSWORD, username="admin", **kwargs):
        self.sio.connect(worker.url, namespaces=["/admin"], wait_timeout=10,
                         auth={"username": username, "password": password},
                         transports=kwargs.pop("transports", ["websocket"]), **kwargs)
        return self

    def of(self, kind):
        with self._changed:
            return [args for recorded, args in self.records if recorded == kind]

    def wait_for(self, kind, predicate, what, timeout=15):
        """Wait until one `kind` record's arguments satisfy `predicate`; return them."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                for recorded, args in self.records:
                    if recorded == kind and predicate(*args):
                        return args
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise AssertionError(f"no {kind} record with {what}; got "
                                         f"{[r for r in self.records if r[0] == kind][-5:]}")
                self._changed.wait(remaining)

    def close(self):
        if self.sio.connected:
            self.sio.disconnect()


@pytest.fixture
def admins():
    made = []

    def make():
        made.append(AdminClient())
        return made[-1]
    yield make
    for client in made:
        client.close()


@pytest.fixture
def ui_port():
    return free_port()


@pytest.fixture
def admin_workers(worker_factory, ui_port):
    """Two workers with the Admin UI on, accepting pages served on `ui_port`."""
    env = {"SCALECHAT_ADMIN_PASSWORD": PASSWORD, "SCALECHAT_ADMIN_UI_PORT": str(ui_port)}
    return [worker_factory("admin-a", **env), worker_factory("admin-b", **env)]


def connect_then_upgrade(worker, token):
    """Join `/` over long-polling, then move to WebSocket, as browsers' default client does."""
    import json

    import websocket
    polling = worker.url + "/socket.io/?EIO=4&transport=polling"
    opened = requests.get(polling, timeout=5).text
    eio_sid = json.loads(opened[1:])["sid"]
    polling += "&sid=" + eio_sid
    assert requests.post(polling, data="40" + json.dumps({"token": token}), timeout=5).ok
    connected = requests.get(polling, timeout=5).text
    assert connected.startswith("40"), connected
    ws = websocket.create_connection(
        worker.url.replace("http", "ws") + f"/socket.io/?EIO=4&transport=websocket&sid={eio_sid}",
        timeout=5)
    ws.send("2probe")
    assert ws.recv() == "3probe"
    ws.send("5")
    return json.loads(connected[2:])["sid"], ws


def stats_of(admin, worker_id):
    """The namespaces' socket counts in a worker's latest server_stats."""
    stats = [args[0] for args in admin.of("server_stats") if args[0]["serverId"] == worker_id]
    return stats and {n["name"]: n["socketsCount"] for n in stats[-1]["namespaces"]}


def test_an_admin_on_one_worker_sees_the_chat_of_every_worker(admin_workers, clients, admins,
                                                               room):
    w1, w2 = admin_workers
    watcher = admins().connect(w1)
    assert watcher.wait_for("config", lambda config: True, "features")[0]["supportedFeatures"] \
        == ["AGGREGATED_EVENTS", "ALL_EVENTS", "DISCONNECT"]
    alice = clients("alice").connect(w1)
    bob = clients("bob").connect(w2, transports=("polling", "websocket"))
    carol = clients("carol").connect(w2, headers={"Cookie": "tracking=carols-secret"})
    sids = {client.name: client.sio.get_sid("/") for client in (alice, bob, carol)}
    for client in (alice, bob, carol):
        client.join(room)
    assert alice.send(room, "hello admins")["ok"]

    wait_until(lambda: stats_of(watcher, "admin-a") == {"/": 1, "/admin": 1}
               and stats_of(watcher, "admin-b") == {"/": 2, "/admin": 0},
               timeout=15, what="server_stats of both workers counting their chat sockets")
    for name, sid in sids.items():
        socket_record = watcher.wait_for("socket_connected", lambda s, at: s["id"] == sid,
                                         f"{name}'s socket")[0]
        assert socket_record["nsp"] == "/" and socket_record["data"]["user"] == name
        assert "cookie" not in socket_record["handshake"]["headers"]
        watcher.wait_for("room_joined", lambda nsp, joined, who, at: (nsp, joined, who)
                         == ("/", room, sid), f"{name} joining {room}")
        watcher.wait_for("event_sent", lambda nsp, to, args, at: to == sid
                         and args[0] == "message" and args[1]["text"] == "hello admins",
                         f"the message delivered to {name}")
    watcher.wait_for("event_received", lambda nsp, sid, args, at: sid == sids["alice"]
                     and args[0] == "message"
                     and {"room": room, "text": "hello admins"}.items() <= args[1].items(),
                     "alice's message")
    dave_sid, dave = connect_then_upgrade(w2, w2.token("dave"))
    try:
        watcher.wait_for("socket_connected", lambda s, at: s["id"] == dave_sid
                         and s["transport"] == "polling", "dave's socket, on polling")
        watcher.wait_for("socket_updated", lambda update: update == {
            "id": dave_sid, "nsp": "/", "transport": "websocket"}, "dave's move to WebSocket")
    finally:
        dave.close()

    # an admin arriving later is told of every socket there is, with its rooms
    late = admins().connect(w2)
    listed = late.wait_for("all_sockets", lambda sockets: True, "a list")[0]
    assert {(s["id"], s["data"]["user"]) for s in listed} == {(sids["bob"], "bob"),
                                                             (sids["carol"], "carol")}
    assert all(room in s["rooms"] and s["transport"] == "websocket" for s in listed)
    elsewhere = late.wait_for("socket_connected", lambda s, at: s["id"] == sids["alice"],
                              "alice's socket, from the other worker")[0]
    assert room in elsewhere["rooms"] and elsewhere["handshake"]["time"]

    alice.close()
    watcher.wait_for("socket_disconnected", lambda nsp, sid, reason, at: sid == sids["alice"],
                     "alice leaving")
    late.wait_for("room_left", lambda nsp, left, who, at: (left, who) == (room, sids["alice"]),
                  "alice's room left")

    # the UI's one write: disconnect a socket, here one on the other worker
    watcher.sio.emit("_disconnect", ("/", False, sids["carol"]), namespace="/admin")
    wait_until(lambda: not carol.sio.connected, what="carol disconnected by the admin")
    late.wait_for("socket_disconnected", lambda nsp, sid, reason, at: sid == sids["carol"],
                  "carol's disconnection")


def test_the_admin_namespace_refuses_a_wrong_password(admin_workers):
    for username, password in (("admin", "wrong"), ("root", PASSWORD), ("admin", None)):
        refused = AdminClient()
        with pytest.raises(socketio.exceptions.ConnectionError):
            refused.connect(admin_workers[0], username=username, password=password)
        assert not refused.sio.connected
    AdminClient().connect(admin_workers[0]).close()


def test_the_uis_origin_may_open_the_admin_namespace_only(admin_workers, clients, workers,
                                                          ui_port):
    ui_origin = f"http://127.0.0.1:{ui_port}"
    handshake = "/socket.io/?EIO=4&transport=polling"
    answer = requests.get(admin_workers[0].url + handshake, headers={"Origin": ui_origin},
                          timeout=5)
    assert answer.status_code == 200
    assert answer.headers["Access-Control-Allow-Origin"] == ui_origin
    assert requests.get(admin_workers[0].url + handshake, timeout=5,
                        headers={"Origin": f"http://127.0.0.1:{ui_port + 1}"}).status_code == 403
    assert requests.get(workers[0].url + handshake, headers={"Origin": ui_origin},
                        timeout=5).status_code == 403, "the UI's origin without the Admin UI"

    AdminClient().connect(admin_workers[0], headers={"Origin": ui_origin},
                          transports=["polling"]).close()
    chat = clients("mallory")
    with pytest.raises(socketio.exceptions.ConnectionError):
        chat.connect(admin_workers[0], headers={"Origin": ui_origin}, transports=("polling",))
    assert chat.connect_error == {"message": "unauthorized"}
    clients("alice").connect(admin_workers[0], headers={"Origin": admin_workers[0].url},
                             transports=("polling",))


def test_without_the_admin_ui_the_chat_runs_on_its_own_classes(redis_server):
    from flask_app import create_app
    from flask_app.wire.engine import ChatServer, ChatSocket
    from flask_app.redis.manager import ChatRedisManager
    sio = create_app({"redis_url": redis_server.url}).extensions["socketio"]
    assert type(sio) is ChatServer and type(sio.manager) is ChatRedisManager
    assert type(sio.eio).socket_class is ChatSocket
    assert "/admin" not in sio.handlers


def test_the_library_internals_the_admin_ui_builds_on():
    """Pinned in setup.cfg: an upgrade that changes any of these fails here first."""
    from engineio import base_server
    from socketio import admin, base_manager, pubsub_manager, server

    from flask_app.admin import AdminRedisManager, AdminReports

    def params(function):
        return list(inspect.signature(function).parameters)

    def code(function):
        """The function's source without whitespace, so that only a change of code matters."""
        return "".join(inspect.getsource(function).split())

    def before(function, first, then):
        source = code(function)
        return -1 < source.find("".join(first.split())) < source.rfind("".join(then.split()))

    # InstrumentedServer calls instrument() from __init__, and starts server_stats on the
    # first Engine.IO connection, through the state that our start() shares
    assert params(admin.InstrumentedServer.__init__) == [
        "self", "sio", "auth", "mode", "read_only", "server_id", "namespace",
        "server_stats_interval"]
    assert before(admin.InstrumentedServer.__init__, "self.event_buffer = EventBuffer()",
                  "self.instrument()")
    assert before(admin.InstrumentedServer.__init__, "self.stats_task = None",
                  "self.instrument()")
    assert before(admin.InstrumentedServer._handle_eio_connect, "if self.stats_task is None:",
                  "self.stats_task = self.sio.start_background_task(self._emit_server_stats)")
    assert "self.sio._handle_eio_connect(eio_sid,environ)" in code(
        admin.InstrumentedServer._handle_eio_connect)
    assert "self.sio._handle_eio_disconnect(eio_sid,reason)" in code(
        admin.InstrumentedServer._handle_eio_disconnect)
    assert params(admin.EventBuffer.push) == ["self", "type", "count"]
    # our server overrides the dispatch of every event; connect and disconnect pass these
    assert params(server.Server._trigger_event) == ["self", "event", "namespace", "args"]
    assert "'connect',namespace,sid,self.environ[eio_sid],data)" in code(
        server.Server._handle_connect)
    assert before(server.Server._handle_connect, "packet.CONNECT, {'sid': sid}",
                  "self.manager.connect(sid, namespace)"), "CONNECT is sent before connect()"
    assert "self._trigger_event('disconnect',namespace,sid,reason" in code(
        server.Server._handle_disconnect)
    # deliveries from Redis and from this worker end in the Manager.emit after PubSubManager
    assert "super().emit(message['event'],data," in code(pubsub_manager.PubSubManager._handle_emit)
    assert "self._handle_emit(message)" in code(pubsub_manager.PubSubManager.emit)
    assert "ifkwargs.get('ignore_queue'):returnsuper().emit(" in code(
        pubsub_manager.PubSubManager.emit), "an emit to this worker's clients only"
    mro = AdminRedisManager.__mro__
    assert mro.index(pubsub_manager.PubSubManager) < mro.index(AdminReports)
    # a connection's rooms are entered before it is pending, and left while it still is
    assert before(base_manager.BaseManager.pre_connect, "self.basic_enter_room(sid, namespace, sid",
                  "self.pending_connect[namespace].append(sid)")
    assert before(base_manager.BaseManager.basic_disconnect,
                  "self.basic_leave_room(sid, namespace, room)",
                  "self.pending_connect[namespace].remove(sid)")
    # Engine.IO's origin check and its CORS headers both ask this method
    assert params(base_server.BaseServer._cors_allowed_origins) == ["self", "environ"]
    assert "self._cors_allowed_origins(environ)" in code(base_server.BaseServer._cors_headers)


@pytest.fixture
def admin_ui_server(ui_port, tmp_path):
    """`scalechat serve-admin` on `ui_port`, stopped afterwards."""
    log = open(tmp_path / "serve-admin.log", "wb")
    proc = subprocess.Popen([str(BIN / "scalechat"), "serve-admin"], stdout=log,
                            stderr=subprocess.STDOUT,
                            env={**os.environ, "SCALECHAT_ADMIN_UI_PORT": str(ui_port)})
    url = f"http://127.0.0.1:{ui_port}"

    def answers():
        assert proc.poll() is None, (tmp_path / "serve-admin.log").read_text()
        try:
            return requests.get(url + "/", timeout=1).ok
        except requests.ConnectionError:
            return False
    wait_until(answers, timeout=20, what="scalechat serve-admin")
    yield url
    stop_process(proc)
    log.close()


def test_serve_admin_serves_the_ui_from_npm_on_loopback_only(admin_ui_server, ui_port):
    index = requests.get(admin_ui_server + "/", timeout=5)
    assert "Socket.IO Admin UI" in index.text
    assert "https://" not in index.text and "http://" not in index.text, "no outside link"
    assert "frame-ancestors 'none'" in index.headers["Content-Security-Policy"]
    css = requests.get(admin_ui_server + "/mdi/css/materialdesignicons.min.css", timeout=5)
    assert css.ok and "materialdesignicons-webfont" in css.text
    assert requests.get(admin_ui_server + "/js/nothing.js", timeout=5).status_code == 404
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.2", ui_port), timeout=2).close()


def test_serve_admin_says_when_the_ui_is_not_installed(tmp_path):
    result = subprocess.run([str(BIN / "scalechat"), "serve-admin"], capture_output=True,
                            text=True, timeout=30,
                            env={**os.environ, "SCALECHAT_NODE_MODULES": str(tmp_path),
                                 "SCALECHAT_ADMIN_UI_PORT": str(free_port())})
    assert result.returncode != 0 and "run deploy/install" in result.stderr



def test_an_operator_sees_the_chat_in_the_admin_ui(admin_workers, admin_ui_server, chromium,
                                                   clients, room, tmp_path):
    w1, w2 = admin_workers
    alice = clients("alice").connect(w1)
    bob = clients("bob").connect(w2)
    for client in (alice, bob):
        client.join(room)
    page = chromium.new_context(viewport={"width": 1400, "height": 900}).new_page()
    outside = []
    page.on("request", lambda request: request.url.startswith(
        (admin_ui_server, w1.url)) or outside.append(request.url))
    errors = []
    page.on("console", lambda message: message.type == "error" and errors.append(message.text))
    page.goto(admin_ui_server + "/")
    page.get_by_label("Server URL").fill(w1.url)
    page.get_by_label("Username").fill("admin")
    page.get_by_label("Password").fill(PASSWORD)
    page.get_by_role("button", name="Connect").click()
    page.get_by_label("Server URL").wait_for(state="hidden")

    page.goto(admin_ui_server + "/#/sockets/")
    for client in (alice, bob):
        page.get_by_role("cell", name=client.sio.get_sid("/")).wait_for()
    page.goto(admin_ui_server + "/#/rooms/")
    page.get_by_role("cell", name=room, exact=True).wait_for()
    page.screenshot(path=str(tmp_path / "admin-ui-rooms.png"))
    page.goto(admin_ui_server + "/#/servers/")
    for worker_id in ("admin-a", "admin-b"):
        page.get_by_role("cell", name=worker_id).wait_for()
    page.screenshot(path=str(tmp_path / "admin-ui-servers.png"))
    assert outside == [] and errors == []

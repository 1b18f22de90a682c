"""What our subclasses rely on inside python-engineio, python-socketio, gevent, pywsgi,
gevent-websocket, wsproto and redis-py, checked on the libraries themselves.

setup.cfg pins each of them to the minor version these checks pass on. Before raising a pin,
run this file (docs/operations.md, "Upgrading the pinned libraries"): a failure names the
internal that moved and the module of ours that leans on it.
"""
import inspect
import io
import subprocess
import threading

import engineio
import gevent
import gevent.socket
import pytest
import redis
import redis.sentinel
import socketio
from engineio import packet as eio_packet
from engineio.socket import Socket
from gevent import pywsgi
from geventwebsocket.handler import WebSocketHandler
from redis._parsers import _HiredisParser
from redis._parsers.hiredis import NOT_ENOUGH_DATA
from wsproto.frame_protocol import CloseReason, FrameProtocol, Opcode, ParseFailed

from cluster import redis_cluster  # noqa: F401 (a fixture)
from conftest import RedisServer, wait_until
from flask_app.redis import redis_client
from flask_app.redis.cluster import NodePool
from flask_app.redis.manager import CONTROL_METHODS
from flask_app.redis.pool import BlockingPool, Parser
from flask_app.redis.sentinel import SentinelPool
from flask_app.redis.subscriptions import ListenerPubSub


def params(function):
    return list(inspect.signature(function).parameters)


# --- python-engineio: engine.ChatSocket, engine._Sockets, engine.EngineServer ---------------

def environ(query, method="GET", body=b"", **headers):
    return {"REQUEST_METHOD": method, "QUERY_STRING": query, "PATH_INFO": "/engine.io/",
            "wsgi.input": io.BytesIO(body), "CONTENT_LENGTH": str(len(body)),
            "wsgi.url_scheme": "http", "SERVER_NAME": "127.0.0.1", "SERVER_PORT": "80",
            **headers}


def handshake(server):
    """Open a polling session on a real engineio.Server; return its sid."""
    statuses = []
    body = server.handle_request(environ("EIO=4&transport=polling"),
                                 lambda status, headers: statuses.append(status))
    assert statuses == ["200 OK"], body
    return engineio.packet.Packet(encoded_packet=b"".join(body).decode()).data["sid"]


def test_engineio_registers_each_new_session_through_sockets_setitem():
    """engine._Sockets turns each Socket into a ChatSocket when the server stores it."""
    stored = []

    class Recording(dict):
        def __setitem__(self, sid, eio_socket):
            stored.append(type(eio_socket))
            super().__setitem__(sid, eio_socket)

    server = engineio.Server(async_mode="threading")
    server.sockets = Recording()
    sid = handshake(server)
    assert stored == [Socket] and type(server.sockets[sid]) is Socket


def test_engineio_socket_has_what_chat_socket_overrides_and_uses():
    """engine.ChatSocket overrides send/schedule_ping/close/_websocket_handler, reads its state."""
    assert params(Socket.send) == ["self", "pkt"]
    assert params(Socket.schedule_ping) == ["self"]
    assert params(Socket.close) == ["self", "wait", "abort", "reason"]
    assert params(Socket._websocket_handler) == ["self", "ws"]
    assert params(Socket.check_ping_timeout) == ["self"]
    assert params(Socket.receive) == ["self", "pkt"]
    server = engineio.Server(async_mode="threading")
    eio_socket = server.sockets[handshake(server)]
    for attribute in ("queue", "last_ping", "connected", "upgrading", "upgraded", "closing",
                      "closed", "sid", "server"):
        assert hasattr(eio_socket, attribute), attribute
    for reason in ("TRANSPORT_CLOSE", "SERVER_DISCONNECT"):
        assert hasattr(server.reason, reason)
    assert server.ping_interval > 0 and server.max_http_buffer_size > 0


def test_engineio_asks_schedule_ping_for_the_next_ping_when_a_pong_arrives():
    """engine.ChatSocket.schedule_ping arms its timer where python-engineio asks for a ping."""
    asked = []

    class Recording(Socket):
        def schedule_ping(self):
            asked.append(self.sid)

    server = engineio.Server(async_mode="threading")
    sid = handshake(server)
    eio_socket = server.sockets[sid]
    eio_socket.__class__ = Recording
    eio_socket.receive(eio_packet.Packet(eio_packet.PONG))
    assert asked == [sid]


def test_engineio_builds_its_websocket_from_async_websocket_with_the_socket_handler():
    """transport.TakenWebSocket is python-engineio's `_async["websocket"]`, called as WSGI app."""
    built = []

    class Recording:
        def __init__(self, handler, server):
            built.append((handler, server))

        def __call__(self, environ, start_response):
            built.append(environ["QUERY_STRING"])
            start_response("101 Switching Protocols", [])
            return []

    gevent_server = engineio.Server(async_mode="gevent")
    assert "websocket" in gevent_server._async
    server = engineio.Server(async_mode="threading")
    server._async = {**server._async, "websocket": Recording}
    query = "EIO=4&transport=websocket"
    server.handle_request(environ(query, HTTP_CONNECTION="Upgrade", HTTP_UPGRADE="websocket"),
                          lambda status, headers: None)
    (handler, owner), called = built
    assert owner is server and called == query
    assert handler.__func__ is Socket._websocket_handler
    assert handler.__self__ is next(iter(server.sockets.values()))


def test_engineio_lets_a_post_to_a_closed_session_raise_key_error():
    """engine.EngineServer.handle_request answers that KeyError with a 400."""
    server = engineio.Server(async_mode="threading")
    sid = handshake(server)
    server.sockets[sid].close(wait=False, abort=True)
    with pytest.raises(KeyError):
        server.handle_request(environ(f"EIO=4&transport=polling&sid={sid}", "POST", b"2"),
                              lambda status, headers: None)


def test_engineio_server_disconnect_takes_an_optional_sid():
    """engine.EngineServer.disconnect replaces it with a close that does not wait."""
    assert params(engineio.Server.disconnect) == ["self", "sid"]
    assert inspect.signature(engineio.Server.disconnect).parameters["sid"].default is None


# --- python-socketio: engine.ChatServer, engine.ChatPacket, manager.ChatRedisManager ----------

def test_socketio_builds_its_engineio_server_from_the_class_method_with_our_options():
    """engine.ChatServer._engineio_server_class returns EngineServer, fed ChatServer's options."""

    class Engine(engineio.Server):
        def __init__(self, max_send_buffer, **kwargs):
            super().__init__(**kwargs)
            self.max_send_buffer = max_send_buffer

    class Server(socketio.Server):
        def _engineio_server_class(self):
            return Engine

    server = Server(async_mode="threading", max_send_buffer=1234)
    assert type(server.eio) is Engine and server.eio.max_send_buffer == 1234


def test_socketio_starts_its_manager_once_behind_manager_initialized():
    """engine.ChatServer.start_manager starts the manager early through the same flag."""
    started = []

    class Manager(socketio.Manager):
        def initialize(self):
            started.append(self)
            super().initialize()

    manager = Manager()
    server = socketio.Server(async_mode="threading", client_manager=manager)
    assert server.manager_initialized is False
    server._handle_eio_connect("a", {})
    server._handle_eio_connect("b", {})
    assert started == [manager] and server.manager_initialized is True


def test_socketio_packets_ask_their_class_whether_data_is_binary():
    """engine.ChatPacket answers data_is_binary for every packet the server builds."""
    asked = []

    class Packet(socketio.packet.Packet):
        @classmethod
        def data_is_binary(cls, data):
            asked.append(data)
            return super().data_is_binary(data)

    assert isinstance(inspect.getattr_static(socketio.packet.Packet, "data_is_binary"),
                      classmethod)
    server = socketio.Server(async_mode="threading", serializer=Packet)
    assert server.packet_class is Packet
    pkt = server.packet_class(socketio.packet.EVENT, data=["message", {"text": "hi"}])
    assert asked and pkt.encode() == '2["message",{"text":"hi"}]'


def test_socketio_hands_every_message_between_workers_to_publish():
    """manager.PooledRedisManager and ChatRedisManager replace `_publish`: emits, disconnects,
    room changes and callbacks of sids on other workers all go through it as a dict."""
    published = []

    class Manager(socketio.PubSubManager):
        def _publish(self, data):
            published.append(data)

    manager = Manager(write_only=True)
    manager.emit("hello", {"a": 1}, namespace="/", room="lobby")
    manager.enter_room("elsewhere", "/", "lobby")
    assert [(m["method"], m.get("event"), m["room"]) for m in published] == [
        ("emit", "hello", "lobby"), ("enter_room", None, "lobby")]
    assert published[0]["data"] == [{"a": 1}] and published[0]["host_id"] == manager.host_id


def test_socketio_starts_the_listener_task_as_thread_and_dispatches_by_method():
    """manager.ChatRedisManager runs its listeners from `_thread`, which initialize() starts,
    and dispatches what they hear to the `_handle_<method>` python-socketio's listener calls."""
    ran_in = []

    class Manager(socketio.PubSubManager):
        def _thread(self):
            ran_in.append(gevent.getcurrent())

    manager = Manager()
    server = socketio.Server(async_mode="gevent", client_manager=manager)
    server._handle_eio_connect("a", {})
    manager.thread.join(timeout=5)
    assert ran_in == [manager.thread]
    dispatch = inspect.getsource(socketio.PubSubManager._thread)
    for method in (*CONTROL_METHODS, "callback"):
        assert f"self._handle_{method}(data)" in dispatch, method
        assert callable(getattr(socketio.PubSubManager, f"_handle_{method}"))


# --- redis-py: pool.Parser, pool.BlockingPool, sentinel.SentinelPool, cluster.NodePool; listeners --

def test_hiredis_parser_keeps_the_socket_and_reader_that_parser_polls(redis_server):
    """pool.Parser polls `_sock` itself unless `_reader.has_data()`."""
    assert params(_HiredisParser.can_read) == ["self", "timeout"]
    conn = redis.Connection(port=redis.Redis.from_url(redis_server.url).connection_pool
                            .connection_kwargs["port"], parser_class=_HiredisParser)
    conn.connect()
    parser = conn._parser
    assert parser._sock is conn._sock and parser._reader.has_data() is False
    conn.send_command("PING")
    wait_until(lambda: parser.can_read(0), what="the reply")
    parser._reader.feed(b"+partial")  # hiredis keeps what it was fed until a reply is whole
    assert parser._reader.has_data() is True
    conn.disconnect()


def test_blocking_pool_get_connection_unwraps_to_the_pool_method():
    """pool.BlockingPool takes get_connection without its deprecation decorator."""
    undecorated = inspect.unwrap(redis.BlockingConnectionPool.get_connection)
    assert BlockingPool.get_connection is undecorated
    assert params(undecorated)[0] == "self"


def test_sentinel_pool_takes_draws_and_queue_from_the_blocking_pool():
    """sentinel.SentinelPool mixes SentinelConnectionPool into BlockingPool."""
    for method in ("get_connection", "release", "make_connection", "disconnect"):
        assert method not in vars(redis.sentinel.SentinelConnectionPool), method
    sentinel = redis.sentinel.Sentinel([("127.0.0.1", 1)])
    pool = SentinelPool("svc", sentinel, max_connections=3, timeout=0.5)
    assert (pool.max_connections, pool.timeout, pool.pool.maxsize) == (3, 0.5, 3)
    assert pool.connection_class is redis.sentinel.SentinelManagedConnection
    assert pool.connection_kwargs["connection_pool"] is pool.proxy and pool.is_master
    client = sentinel.master_for("svc", connection_pool_class=SentinelPool, max_connections=3)
    assert type(client.connection_pool) is SentinelPool


def test_pubsub_replies_read_confirmations_and_messages_from_the_parser(redis_server):
    """subscriptions.ListenerPubSub.replies reads `ssubscribe` confirmations, `smessage`s and
    `message`s of one connection that holds both kinds of subscription through the hiredis
    parser's `_reader` (its NOT_ENOUGH_DATA when a reply is not whole) and
    `read_from_socket(timeout=)`; handle_message forgets a channel on its `sunsubscribe`. The
    listener's address is the node's."""
    assert "timeout" in params(_HiredisParser.read_from_socket)
    pubsub = ListenerPubSub(redis.Redis.from_url(redis_server.url).connection_pool)
    pubsub.ssubscribe(b"seams-{room}:live")
    pubsub.subscribe("seams-all")
    replies = pubsub.replies()
    assert [next(replies)[:2] for _ in range(2)] == [
        ("ssubscribe", b"seams-{room}:live"), ("subscribe", b"seams-all")]
    publisher = redis.Redis.from_url(redis_server.url)
    assert publisher.spublish("seams-{room}:live", "to the room") == 1
    publisher.publish("seams-all", "to all")
    assert [next(replies) for _ in range(2)] == [
        ("smessage", b"seams-{room}:live", b"to the room"), ("message", b"seams-all", b"to all")]
    assert pubsub.connection._parser._reader.gets() is NOT_ENOUGH_DATA
    pubsub.sunsubscribe(b"seams-{room}:live")
    assert (next(replies)[0], publisher.spublish("seams-{room}:live", "gone")) == (
        "sunsubscribe", 0)
    assert b"seams-{room}:live" not in pubsub.shard_channels
    assert (pubsub.connection.host, pubsub.connection.port) == (
        "127.0.0.1", int(redis_server.url.rsplit(":", 1)[1].split("/")[0]))
    pubsub.close()


def test_pubsub_subscribes_again_through_on_connect():
    """subscriptions.ListenerPubSub silences on_connect, the callback through which redis-py
    re-sends every subscription (shard channels in one SSUBSCRIBE) after a reconnection."""
    assert "register_connect_callback(self.on_connect)" in inspect.getsource(
        redis.client.PubSub.execute_command)
    assert "_resubscribe_shard_channels" in inspect.getsource(redis.client.PubSub.on_connect)
    assert params(redis.client.PubSub.on_connect) == ["self", "connection"]


def test_cluster_client_builds_node_pools_of_our_class(redis_cluster):
    """cluster.NodePool is the pool of every node (RedisCluster passes `connection_pool_class`
    only with a URL), and subscriptions.Subscriptions reads the slot map through
    get_primaries(), get_node_from_key() and nodes_manager.initialize()."""
    client = redis_client(redis_cluster.url, 3)
    masters = client.get_primaries()
    assert len(masters) == 3
    for node in masters:
        pool = node.redis_connection.connection_pool
        assert type(pool) is NodePool and pool.max_connections == 3
        assert pool.connection_kwargs["parser_class"] is Parser
    assert client.get_node_from_key("{room}:x").name in {node.name for node in masters}
    client.nodes_manager.initialize()
    assert {node.name for node in client.get_primaries()} == {node.name for node in masters}
    assert client.get_node_from_key("x").redis_connection.ping()
    client.close()


class NamedMaster(redis.sentinel.Sentinel):
    """A Sentinel client naming a fixed master, without asking any Sentinel."""

    def __init__(self, address):
        super().__init__([])
        self.address = address

    def discover_master(self, service_name):
        return self.address


def test_sentinel_pool_moves_idle_connections_when_the_master_changes(redis_server, tmp_path):
    """sentinel.MasterWatch.follow sets `proxy.master_address` and disconnects idle
    connections, as get_master_address does; the pool drops a busy one to another host."""
    port = int(redis_server.url.rsplit(":", 1)[1].split("/")[0])
    sentinel = NamedMaster(("127.0.0.1", port))
    pool = SentinelPool("svc", sentinel, max_connections=3, timeout=0.5)
    client = redis.Redis(connection_pool=pool)
    busy = pool.get_connection()
    assert client.ping() and pool.master_address == ("127.0.0.1", port)
    (idle,) = pool._get_free_connections()
    sentinel.address = ("127.0.0.2", port)
    assert pool.get_master_address() == ("127.0.0.2", port)
    assert idle._sock is None and busy._sock is not None
    pool.release(busy)
    assert busy._sock is None and not pool.owns_connection(busy)
    assert pool.proxy.master_address == pool.master_address == ("127.0.0.2", port)


def test_sentinel_client_asks_check_master_state_of_every_answer():
    """sentinel.FollowingSentinel refuses states whose `flags` say a failover is under way."""
    assert params(redis.sentinel.Sentinel.check_master_state) == ["self", "state", "service_name"]
    source = inspect.getsource(redis.sentinel.Sentinel.discover_master)
    assert "self.check_master_state(state, service_name)" in source
    sentinel = redis.sentinel.Sentinel([("127.0.0.1", 1)], sentinel_kwargs={"retry": None})
    assert [s.connection_pool.connection_kwargs["port"] for s in sentinel.sentinels] == [1]
    assert sentinel.sentinel_kwargs == {"retry": None}


def test_sentinel_connection_drops_a_demoted_master(tmp_path):
    """A master demoted to a replica answers READONLY: redis-py's SentinelManagedConnection
    then disconnects, so that the next command asks the Sentinels again."""
    replica = RedisServer(tmp_path)
    replica.proc = subprocess.Popen(
        ["redis-server", "--port", str(replica.port), "--bind", "127.0.0.1", "--dir",
         str(tmp_path), "--save", "", "--replicaof", "127.0.0.1", "1"], stdout=subprocess.DEVNULL)
    try:
        wait_until(lambda: _answers(replica.url), what="the replica")
        pool = SentinelPool("svc", NamedMaster(("127.0.0.1", replica.port)), max_connections=2)
        client = redis.Redis(connection_pool=pool)
        with pytest.raises(redis.ConnectionError, match="previous master is now a slave"):
            client.set("key", "value")
        assert all(conn._sock is None for conn in pool._connections)
    finally:
        replica.stop()


def _answers(url):
    try:
        return redis.Redis.from_url(url).ping()
    except redis.ConnectionError:
        return False


def test_pubsub_replies_outlive_the_socket_timeout(redis_server):
    """pool.pool_policy gives the listener's connection a 5 s timeout that its idle read
    (read_from_socket(timeout=None)) ignores."""
    client = redis.Redis.from_url(redis_server.url, socket_timeout=0.2, client_name="seams-idle",
                                  parser_class=_HiredisParser)
    pubsub = ListenerPubSub(client.connection_pool)
    pubsub.subscribe("seams-idle")
    received = []
    reader = threading.Thread(target=lambda: received.extend(
        data for _, (_, _, data) in zip(range(2), pubsub.replies())), daemon=True)
    reader.start()
    admin = redis.Redis.from_url(redis_server.url)

    def listener_ages():
        return [int(c["age"]) for c in admin.client_list(_type="pubsub")
                if c["name"] == "seams-idle"]
    first = admin.client_list(_type="pubsub")
    wait_until(lambda: listener_ages() and listener_ages()[0] >= 2,
               what="the subscription to be older than ten socket timeouts")
    assert len(listener_ages()) == 1 and len(first) == len(admin.client_list(_type="pubsub"))
    admin.publish("seams-idle", "still here")
    reader.join(timeout=5)
    assert received == [1, b"still here"]  # the confirmation's count, then the message
    pubsub.close()


# --- pywsgi and gevent-websocket: handler.ChatHandler, transport.take_socket ----------------

def serve_once(handler_class, application, request, spawn=None):
    """Serve one raw request with a real gevent WSGIServer; return the bytes answered."""
    options = {} if spawn is None else {"spawn": spawn}
    server = pywsgi.WSGIServer(("127.0.0.1", 0), application, handler_class=handler_class,
                               log=None, **options)
    server.start()
    try:
        with gevent.socket.create_connection(("127.0.0.1", server.server_port)) as sock:
            sock.sendall(request)
            sock.shutdown(gevent.socket.SHUT_WR)
            answer = b""
            with gevent.Timeout(5):
                while chunk := sock.recv(65536):
                    answer += chunk
        return answer
    finally:
        server.stop()


def hello(environ, start_response):
    start_response("200 OK", [("Content-Length", "5")])
    return [environ.get("HTTP_X_NAME", "?????").encode()]


def test_pywsgi_reads_headers_through_message_class_into_an_old_message():
    """handler.read_headers returns pywsgi's OldMessage, filled with set_raw."""
    calls = []

    class Handler(pywsgi.WSGIHandler):
        def MessageClass(self, fp, *args):  # noqa: N802
            calls.append((fp is self.rfile, args))
            message = pywsgi.OldMessage()
            while (line := fp.readline()) not in (b"\r\n", b""):
                name, value = line.decode("iso-8859-1").split(":", 1)
                message.set_raw(name, value.strip())
            return message

    answer = serve_once(Handler, hello, b"GET / HTTP/1.1\r\nHost: x\r\nX-Name: alice\r\n\r\n")
    assert calls == [(True, (0,))]
    assert answer.endswith(b"\r\n\r\nalice")


def test_pywsgi_sends_a_head_through_sendall_then_the_body_through_write():
    """handler.ChatHandler holds the head in _sendall to send it with the body."""
    sent = []

    class Handler(pywsgi.WSGIHandler):
        def _sendall(self, data):
            sent.append(bytes(data))
            super()._sendall(data)

    assert params(pywsgi.WSGIHandler._write_with_headers) == ["self", "data"]
    assert params(pywsgi.WSGIHandler._sendall) == ["self", "data"]
    serve_once(Handler, hello, b"GET / HTTP/1.1\r\nHost: x\r\nX-Name: bobby\r\n\r\n")
    assert len(sent) == 2 and sent[0].startswith(b"HTTP/1.1 200 OK\r\n")
    assert sent[0].endswith(b"\r\n\r\n") and sent[1] == b"bobby"


def test_pywsgi_spawns_each_connection_through_a_callable():
    """worker.run hands WSGIServer Runners().spawn, called as spawn(handle, *args)."""
    spawned = []

    def spawn(handle, *args):
        spawned.append(handle)
        return gevent.spawn(handle, *args)

    answer = serve_once(pywsgi.WSGIHandler, hello,
                        b"GET / HTTP/1.1\r\nHost: x\r\nX-Name: carol\r\n\r\n", spawn=spawn)
    assert len(spawned) == 1 and answer.endswith(b"carol")


def test_gevent_websocket_exposes_its_handler_socket_and_writer_to_the_application():
    """transport.take_socket takes handler.socket and rfile; ChatHandler wraps raw_write."""
    seen = {}

    def application(environ, start_response):
        ws = environ["wsgi.websocket"]
        seen.update(handler=ws.handler, socket=ws.handler.socket, closed=ws.closed,
                    peek=ws.handler.rfile.peek, code=ws.handler.code)
        ws.raw_write = ws.raw_write  # an attribute ChatHandler may replace
        ws.closed, ws.handler = True, None  # as TakenWebSocket leaves it
        return []

    answer = serve_once(WebSocketHandler, application,
                        b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
                        b"Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
                        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 101 Switching Protocols\r\n")
    assert isinstance(seen["handler"], WebSocketHandler) and seen["closed"] is False
    assert isinstance(seen["socket"], gevent.socket.socket) and seen["code"] == 101


# --- gevent's loop: runners.Runners, transport.Connection, engine.ChatSocket ----------------

def test_gevent_parks_and_resumes_greenlets_as_runners_do():
    """runners.Runners parks a greenlet in hub.switch() and resumes it by run_callback."""
    hub = gevent.get_hub()
    handed = []
    parked = []

    def runner(first):
        handed.append(first)
        parked.append(gevent.getcurrent())
        handed.append(hub.switch())

    gevent.spawn_raw(runner, "first task")
    wait_until(lambda: gevent.sleep(0) or parked, what="the runner to park")
    hub.loop.run_callback(parked[0].switch, "func", ("args",))
    gevent.sleep(0)
    assert handed == ["first task", ("func", ("args",))]
    assert params(hub.handle_error) == ["context", "type", "value", "tb"]


def test_gevent_loop_watchers_used_by_transport_and_engine():
    """transport.Connection and engine.ChatSocket use the loop's io, timer and callbacks."""
    loop = gevent.get_hub().loop
    fired = []
    timer = loop.timer(0.01, 0.01)
    timer.again(lambda: (fired.append("timer"), timer.stop()))
    left, right = gevent.socket.socketpair()
    reader = loop.io(left.fileno(), 1)
    reader.start(lambda: (fired.append("read"), reader.stop()))
    right.send(b"x")
    loop.run_callback(fired.append, "callback")
    wait_until(lambda: gevent.sleep(0.01) or len(fired) == 3, what="every watcher")
    assert sorted(fired) == ["callback", "read", "timer"] and loop.now() > 0
    left.close()
    right.close()


# --- wsproto: transport.Connection ---------------------------------------------------------

def masked(opcode, payload):
    mask = b"\x01\x02\x03\x04"
    body = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return bytes([0x80 | opcode, 0x80 | len(payload)]) + mask + body


def test_wsproto_frame_protocol_reads_frames_answers_pings_and_refuses_garbage():
    """transport.Connection reads anything but short text frames with wsproto's FrameProtocol."""
    protocol = FrameProtocol(client=False, extensions=[])
    protocol.receive_bytes(masked(0x1, b"hello") + masked(0x9, b"are you there"))
    text, ping = protocol.received_frames()
    assert (text.opcode, text.payload, text.message_finished) == (Opcode.TEXT, "hello", True)
    assert ping.opcode is Opcode.PING
    assert bytes(protocol.pong(ping.payload)) == b"\x8a\x0dare you there"
    assert bytes(protocol.close(CloseReason.NORMAL_CLOSURE, "bye")).startswith(b"\x88")
    broken = FrameProtocol(client=False, extensions=[])
    broken.receive_bytes(b"\x81\x05hello")  # unmasked: a client must mask
    with pytest.raises(ParseFailed) as refused:
        list(broken.received_frames())
    assert refused.value.code is CloseReason.PROTOCOL_ERROR

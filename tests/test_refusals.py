"""Refusals: who may connect, and every kind of bad payload, answered without harm."""
import itertools
import json
import socket

import engineio
import itsdangerous
import pytest
import socketio
import websocket

from conftest import SECRET_KEY, ChatClient
from flask_app.wire.engine import EngineServer


def refused(worker, **connect_kwargs):
    """Return the detail of a refused connect, after checking it was refused as unauthorized."""
    client = ChatClient("intruder")
    with pytest.raises(socketio.exceptions.ConnectionError):
        client.sio.connect(worker.url, transports=["websocket"], wait_timeout=5,
                           **connect_kwargs)
    assert client.connect_error["message"] == "unauthorized", client.connect_error
    detail = client.connect_error["data"]["detail"]
    assert isinstance(detail, str) and detail
    return detail


class SignedLongAgo(itsdangerous.TimestampSigner):
    def get_timestamp(self):
        return 1_000_000_000


def old_token(user):
    return itsdangerous.URLSafeTimedSerializer(
        SECRET_KEY, salt="scalechat.token", signer=SignedLongAgo).dumps({"user": user})


@pytest.mark.parametrize("auth", [
    None,
    {},
    {"token": "not-a-token"},
    {"token": itsdangerous.URLSafeTimedSerializer("other-key", salt="scalechat.token")
     .dumps({"user": "mallory"})},
    {"token": 12345},
    {"token": ""},
], ids=["no-auth", "empty-auth", "garbage", "forged", "wrong-type", "empty"])
def test_connect_without_a_valid_token_is_refused(workers, auth):
    refused(workers[0], **({} if auth is None else {"auth": auth}))


def test_an_expired_token_is_refused(workers):
    assert "expired" in refused(workers[0], auth={"token": old_token("alice")})


LONG = "x" * 2001
BAD_PAYLOADS = {
    "join": [
        ((), "invalid_payload"), (("general",), "invalid_payload"), (([1],), "invalid_payload"),
        (({},), "invalid_room"), (({"room": 5},), "invalid_room"), (({"room": ""},), "invalid_room"),
        (({"room": "UPPER"},), "invalid_room"), (({"room": "a" * 65},), "invalid_room"),
        (({"room": "../etc"},), "invalid_room"), (({"room": {"$ne": 1}},), "invalid_room"),
        (({"room": "ok"}, {"room": "ok"}), "invalid_payload"),
    ],
    "message": [
        (({"text": "hi", "client_id": "c"},), "invalid_room"),
        (({"room": "{room}", "client_id": "c"},), "invalid_text"),
        (({"room": "{room}", "text": "   ", "client_id": "c"},), "invalid_text"),
        (({"room": "{room}", "text": ["hi"], "client_id": "c"},), "invalid_text"),
        (({"room": "{room}", "text": LONG, "client_id": "c"},), "text_too_long"),
        (({"room": "{room}", "text": "a\x00b", "client_id": "c"},), "invalid_text"),
        (({"room": "{room}", "text": "hi"},), "invalid_client_id"),
        (({"room": "{room}", "text": "hi", "client_id": 7},), "invalid_client_id"),
        (({"room": "{room}", "text": "hi", "client_id": "has space"},), "invalid_client_id"),
        (({"room": "not-joined-room", "text": "hi", "client_id": "c"},), "not_member"),
        ((None,), "invalid_payload"),
    ],
    "history": [
        (({"room": "{room}", "limit": 0},), "invalid_limit"),
        (({"room": "{room}", "limit": 10_000},), "invalid_limit"),
        (({"room": "{room}", "limit": True},), "invalid_limit"),
        (({"room": "{room}", "after": "yesterday"},), "invalid_cursor"),
        (({"room": "{room}", "before": 12},), "invalid_cursor"),
    ],
    "leave": [
        (({"room": "not-joined-room"},), "not_member"),
        (({"room": None},), "invalid_room"),
    ],
    "typing": [
        (({"room": "not-joined-room"},), "not_member"),
    ],
}
CASES = [(event, args, code) for event, cases in BAD_PAYLOADS.items() for args, code in cases]


def test_every_bad_payload_gets_its_error_and_the_worker_keeps_serving(workers, clients, room):
    alice = clients("alice").connect(workers[0])
    bob = clients("bob").connect(workers[1])
    alice.join(room)
    bob.join(room)
    for event, args, code in CASES:
        args = [{k: (v.replace("{room}", room) if isinstance(v, str) else v)
                 for k, v in a.items()} if isinstance(a, dict) else a for a in args]
        ack = alice.call(event, *args)
        assert ack["ok"] is False, (event, args, ack)
        assert ack["error"] == code, (event, args, ack)
        assert isinstance(ack["detail"], str) and ack["detail"]
    assert alice.send(room, "still here")["ok"]
    assert [m["text"] for m in bob.wait_for("message", lambda got: got)] == ["still here"]


def test_unknown_events_and_floods_of_bad_input_leave_others_unaffected(workers, clients, room):
    alice = clients("alice").connect(workers[0])
    bob = clients("bob").connect(workers[0])
    alice.join(room)
    bob.join(room)
    for n, (event, args, _) in zip(range(200), itertools.cycle(CASES)):
        alice.sio.emit(event, args[0] if args else None)
    alice.sio.emit("no-such-event", {"room": room})
    assert bob.send(room, "after the flood")["ok"]
    assert alice.wait_for("message", lambda got: got)[0]["text"] == "after the flood"


def raw_handshake(worker, origin):
    """A browser's WebSocket handshake from `origin`: the worker's answer, up to its close or
    the end of its 101."""
    host, port = worker.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as conn:
        conn.sendall(b"GET /socket.io/?EIO=4&transport=websocket HTTP/1.1\r\nHost: %s:%s\r\n"
                     b"Origin: %s\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                     b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                     b"Sec-WebSocket-Version: 13\r\n\r\n" % (host.encode(), port.encode(),
                                                               origin.encode()))
        received = b""
        while not received.startswith(b"HTTP/1.1 101") or b"\r\n\r\n" not in received:
            chunk = conn.recv(65536)
            if not chunk:
                break
            received += chunk
    return received


def test_a_websocket_from_a_refused_origin_gets_a_403_not_a_101(workers):
    received = raw_handshake(workers[0], "https://evil.example")
    head, _, body = received.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 403") and b"101" not in head
    assert json.loads(body) == {"error": "origin_not_allowed",
                                "detail": "origin https://evil.example may not connect here"}
    assert raw_handshake(workers[0], workers[0].url).startswith(b"HTTP/1.1 101")  # its own site


def test_clients_from_a_refused_origin_learn_the_403(worker_factory):
    listed = worker_factory("origins-ws", SCALECHAT_ALLOWED_ORIGINS="https://chat.example")
    url = listed.url.replace("http", "ws") + "/socket.io/?EIO=4&transport=websocket"
    with pytest.raises(websocket.WebSocketBadStatusException) as refusal:
        websocket.create_connection(url, origin="https://evil.example", timeout=10)
    assert refusal.value.status_code == 403 and b"origin_not_allowed" in refusal.value.resp_body
    allowed = websocket.create_connection(url, origin="https://chat.example", timeout=10)
    assert allowed.recv().startswith("0{")
    allowed.close()
    for transport in ("websocket", "polling"):
        client = ChatClient("elsewhere")
        with pytest.raises(socketio.exceptions.ConnectionError) as refusal:
            client.sio.connect(listed.url, auth={"token": listed.token("elsewhere")},
                               headers={"Origin": "https://evil.example"},
                               transports=[transport], wait_timeout=5)
        assert not client.sio.connected
        if transport == "polling":  # python-socketio passes the answer on to connect_error
            assert "403" in str(refusal.value)
            assert client.connect_error["error"] == "origin_not_allowed"
        else:  # and keeps websocket-client's refusal as the cause of its own
            cause = refusal.value
            while not isinstance(cause, websocket.WebSocketBadStatusException):
                cause = cause.__cause__ or cause.__context__
            assert cause.status_code == 403


ORIGIN_SETTINGS = [None, "*", ["*"], [], "https://a.example", ["https://a.example", "http://b:8"],
                   lambda origin: origin.endswith(".example")]
ORIGINS = [None, "", "https://a.example", "http://b:8", "https://evil.example", "http://host:80",
           "https://host:80", "https://proxy.example"]
FORWARDED = [{}, {"HTTP_X_FORWARDED_PROTO": "https"},
             {"HTTP_X_FORWARDED_HOST": "proxy.example", "HTTP_X_FORWARDED_PROTO": "https, http"}]


@pytest.mark.parametrize("setting", ORIGIN_SETTINGS)
def test_the_origin_refused_is_the_one_python_engineio_refuses(setting):
    """EngineServer.refused_origin calls engineio's private _cors_allowed_origins: an upgrade
    that changes the rule or that method fails here."""
    ours = EngineServer(max_send_buffer=1, async_mode="threading", cors_allowed_origins=setting)
    theirs = engineio.Server(async_mode="threading", cors_allowed_origins=setting)
    for origin, forwarded in itertools.product(ORIGINS, FORWARDED):
        environ = {"REQUEST_METHOD": "GET", "QUERY_STRING": "EIO=4&transport=none",
                   "wsgi.url_scheme": "http", "HTTP_HOST": "host:80", **forwarded}
        if origin is not None:
            environ["HTTP_ORIGIN"] = origin
        answer = theirs.handle_request(environ, lambda status, headers: None)
        refused_by_engineio = answer == [b'"Not an accepted origin."']
        assert (ours.refused_origin(environ) is not None) == refused_by_engineio, (origin, forwarded)

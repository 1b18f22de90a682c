"""Refusals: who may connect, and every kind of bad payload, answered without harm."""
import itertools

import itsdangerous
import pytest
import socketio

from conftest import SECRET_KEY, ChatClient


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

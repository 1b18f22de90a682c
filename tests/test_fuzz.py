"""Hostile input: generated payloads, raw malformed frames, oversized packets. Nobody else notices."""
import json

import pytest
import requests
import websocket
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

DOCUMENTED_ERRORS = {"invalid_payload", "invalid_room", "invalid_text", "text_too_long",
                     "invalid_client_id", "invalid_cursor", "invalid_limit", "not_member",
                     "rate_limited"}
EVENTS = ["join", "leave", "message", "history", "typing"]
FIELDS = ["room", "text", "client_id", "after", "before", "since", "limit"]

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**53, 2**53) | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=50) | st.text(min_size=1990, max_size=2100),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12)
payloads = (st.dictionaries(st.sampled_from(FIELDS), json_values, max_size=7)
            | json_values)


@pytest.fixture(scope="module")
def fuzz_client(workers):
    from conftest import ChatClient
    client = ChatClient("fuzzer").connect(workers[0])
    client.join("fuzz-room")
    yield client
    client.close()


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(event=st.sampled_from(EVENTS), payload=payloads)
def test_generated_payloads_get_an_ok_or_a_documented_error(fuzz_client, event, payload):
    ack = fuzz_client.call(event, payload)
    assert isinstance(ack, dict) and isinstance(ack["ok"], bool), ack
    if not ack["ok"]:
        assert ack["error"] in DOCUMENTED_ERRORS, ack
        assert isinstance(ack["detail"], str)


def open_raw_socket(worker):
    """A WebSocket speaking Engine.IO by hand, connected to namespace `/`."""
    url = worker.url.replace("http", "ws") + "/socket.io/?EIO=4&transport=websocket"
    ws = websocket.create_connection(url, timeout=5)
    assert ws.recv().startswith("0{")
    ws.send("40" + json.dumps({"token": worker.token("raw")}))
    assert ws.recv().startswith("40{")
    return ws


MALFORMED_FRAMES = [
    "", "x", "4", "42", "42[", '42["message"', '42{"room":1}', "42[1,2]", '42["join"]',
    '42["message",' + "[" * 5000 + "]" * 5000 + "]", '451-["message",{"_placeholder":true,"num":0}]',
    '42["join",{"room":Infinity}]', '43["message"]', "49", "4\x00", "2probe", "3", "5", "6", "9", '42["join",{"room":"\\ud800"}]',
    '421["message",{"room":"fuzz","text":"\\u0000","client_id":"a"}]',
    b"\x00\xff\xfe", b"\x04binary",
]


@pytest.mark.parametrize("frame", MALFORMED_FRAMES, ids=range(len(MALFORMED_FRAMES)))
def test_malformed_frames_leave_the_worker_serving_others(workers, clients, room, frame):
    w1, _ = workers
    bystander = clients("bystander").connect(w1)
    bystander.join(room)
    ws = open_raw_socket(w1)
    try:
        if isinstance(frame, bytes):
            ws.send_binary(frame)
        else:
            ws.send(frame)
        # an Engine.IO UPGRADE is answered with a NOOP after the frame is handled (or the close is)
        ws.send("5")
        try:
            while ws.recv() != "6":
                pass
        except (websocket.WebSocketConnectionClosedException, ConnectionError):
            pass
    finally:
        ws.close()
    assert requests.get(w1.url + "/healthz", timeout=5).ok
    assert bystander.send(room, "still here")["ok"]
    assert bystander.wait_for("message", lambda got: got)[-1]["text"] == "still here"


def test_an_acknowledged_malformed_event_is_answered(workers):
    ws = open_raw_socket(workers[0])
    try:
        ws.send('421["message",{"room":"Not Valid"}]')
        answer = ws.recv()
        while not answer.startswith("431"):
            answer = ws.recv()
        ack = json.loads(answer[3:])[0]
        assert ack["ok"] is False and ack["error"] == "invalid_room"
    finally:
        ws.close()


def test_an_oversized_frame_closes_only_its_connection(workers, clients, room):
    w1, _ = workers
    bystander = clients("bystander").connect(w1)
    bystander.join(room)
    ws = open_raw_socket(w1)
    ws.send('42["message",{"room":"%s","text":"%s","client_id":"big"}]' % (room, "x" * 100_000))
    with pytest.raises((websocket.WebSocketConnectionClosedException, ConnectionError, OSError)):
        for _ in range(10):
            if not ws.recv():
                raise ConnectionError("closed")
    ws.close()
    assert bystander.send(room, "unaffected")["ok"]
    assert [m["text"] for m in bystander.wait_for("message", lambda got: got)] == ["unaffected"]


def test_bad_polling_requests_get_a_quick_400(workers):
    url = workers[0].url + "/socket.io/"
    handshake = requests.get(url, params={"EIO": "4", "transport": "polling"}, timeout=5)
    sid = handshake.text.split('"sid":"')[1].split('"')[0]
    poll = {"EIO": "4", "transport": "polling", "sid": sid}
    # a packet clients never send: answered at once (python-engineio's own hangs past the timeout)
    noop = requests.post(url, params=poll, data="6", timeout=3)
    assert noop.status_code == 400
    after = requests.post(url, params=poll, data="40", timeout=5)
    assert after.status_code == 400
    garbage = requests.get(url, params={"EIO": "4", "transport": "polling", "sid": "nope"}, timeout=5)
    assert garbage.status_code == 400
    assert requests.get(url, params={"EIO": "3", "transport": "polling"}, timeout=5).status_code == 400

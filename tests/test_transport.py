"""The batching WebSocket writer: frames as gevent-websocket would write them, one send per batch."""
import gevent
import pytest
from geventwebsocket.websocket import Header

from flask_app.transport import BatchingQueue, BatchingWebSocket, frame


@pytest.mark.parametrize("length", [0, 1, 125, 126, 65535, 65536])
@pytest.mark.parametrize("kind", ["text", "binary"])
def test_frames_match_gevent_websocket(length, kind):
    message = "x" * length if kind == "text" else b"\x00" * length
    opcode = 0x1 if kind == "text" else 0x2
    payload = message.encode() if kind == "text" else message
    assert frame(message) == Header.encode_header(True, opcode, b"", length, 0) + payload


class FakeEngineSocket:
    """Stands in for python-engineio's Socket: only its queue is used."""

    def __init__(self):
        self.queue = BatchingQueue()

    def handler(self, ws):
        return []


class FakeGeventWebSocket:
    """Records raw writes instead of sending them."""

    version = path = origin = protocol = None
    closed = False

    def __init__(self):
        self.writes = []

    def raw_write(self, data):
        self.writes.append(data)


def make_websocket():
    engine_socket = FakeEngineSocket()
    ws = BatchingWebSocket(engine_socket.handler, server=None)
    raw = FakeGeventWebSocket()
    ws({"wsgi.websocket": raw}, None)
    return engine_socket, ws, raw


def test_the_writers_frames_go_out_in_one_write_when_it_waits_again():
    engine_socket, ws, raw = make_websocket()
    for n in range(3):
        engine_socket.queue.put(f"42[\"message\",{n}]")

    def writer():  # what python-engineio's writer does: poll, then send each packet
        packets = [engine_socket.queue.get(timeout=1)]
        while not engine_socket.queue.empty():
            packets.append(engine_socket.queue.get(block=False))
        for packet in packets:
            ws.send(packet)
        assert raw.writes == []  # nothing written while the batch is being built
        with pytest.raises(gevent.queue.Empty):
            engine_socket.queue.get(timeout=0.01)  # back to waiting: the batch goes out
    gevent.spawn(writer).get(timeout=5)
    assert raw.writes == [b"".join(frame(f"42[\"message\",{n}]") for n in range(3))]


def test_sends_from_outside_the_writer_go_out_at_once():
    _, ws, raw = make_websocket()
    ws.send("3probe")  # the upgrade handshake answers before any writer exists
    assert raw.writes == [frame("3probe")]


def test_close_flushes_what_is_pending():
    engine_socket, ws, raw = make_websocket()
    closed = []
    raw.close = lambda: closed.append(True)

    def writer():
        engine_socket.queue.put("2")
        engine_socket.queue.get(timeout=1)  # becomes the writer
        ws.send("4hello")
        ws.close()
    gevent.spawn(writer).get(timeout=5)
    assert raw.writes == [frame("4hello")] and closed == [True]

"""The loop-served WebSocket: frames, batching, back-pressure, closing, and Engine.IO upgrades.

The Connection tests run it on gevent's loop over a real socket pair; the client side builds
and parses frames with wsproto, as a browser would send them (masked).
"""
import json
import os
import socket
import struct
import time

import gevent
import gevent.socket
import pytest
import requests
import websocket
from hypothesis import given, settings
from hypothesis import strategies as st
from geventwebsocket.websocket import Header
from wsproto.frame_protocol import CloseReason, FrameProtocol, Opcode

from conftest import wait_until
from flask_app.wire.transport import (BUSY_FLUSHES, BUSY_WINDOW, Connection, frame,
                                 plain_text_frames, take_socket)


@pytest.mark.parametrize("length", [0, 1, 125, 126, 65535, 65536])
@pytest.mark.parametrize("kind", ["text", "binary"])
def test_frames_match_gevent_websocket(length, kind):
    message = "x" * length if kind == "text" else b"\x00" * length
    opcode = 0x1 if kind == "text" else 0x2
    payload = message.encode() if kind == "text" else message
    assert frame(message) == Header.encode_header(True, opcode, b"", length, 0) + payload


def client_frames(kind, text):
    """Bytes a client could send: a frame of `kind` carrying `text`, or a damaged one."""
    client = FrameProtocol(client=True, extensions=[])
    if kind == "text":
        return bytes(client.send_data(text))
    if kind == "fragment":
        return bytes(client.send_data(text, fin=False))
    if kind == "binary":
        return bytes(client.send_data(text.encode()))
    if kind == "ping":
        return bytes(client.ping(text.encode()[:125]))
    if kind == "unmasked":
        return bytes(FrameProtocol(client=False, extensions=[]).send_data(text))
    if kind == "bad utf-8":
        data = bytearray(client.send_data("\u00e9" + text))
        data[6] ^= data[6] ^ 0xFF ^ data[2]  # an 0xff byte once unmasked
        return bytes(data)
    return bytes(client.send_data(text))[:-1]  # cut short


@settings(max_examples=300)
@given(st.lists(st.tuples(st.sampled_from(["text", "text", "fragment", "binary", "ping",
                                           "unmasked", "bad utf-8", "truncated"]),
                          st.text(max_size=130)), min_size=1, max_size=4))
def test_plain_text_frames_read_as_wsproto_reads_them_or_not_at_all(frames):
    data = b"".join(client_frames(kind, text) for kind, text in frames)
    fast = plain_text_frames(data)
    if fast is None:
        return
    server = FrameProtocol(client=False, extensions=[])
    server.receive_bytes(data)
    read = list(server.received_frames())
    assert all(f.opcode is Opcode.TEXT and f.frame_finished and f.message_finished for f in read)
    assert [f.payload for f in read] == fast


def test_plain_text_frames_take_the_frames_clients_send_most():
    data = b"".join(client_frames("text", t) for t in ["40", '421["join",{"room":"a"}]', "é" * 62])
    assert plain_text_frames(data) == ["40", '421["join",{"room":"a"}]', "é" * 62]
    assert plain_text_frames(client_frames("text", "x" * 126)) is None  # a longer header


class CountingSocket:
    """The server's end of the pair, counting its send() calls."""

    def __init__(self, sock):
        self.sock = sock
        self.sends = 0

    def send(self, data):
        self.sends += 1
        return self.sock.send(data)

    def __getattr__(self, name):
        return getattr(self.sock, name)


class Peer:
    """A Connection on one end of a socket pair and a masking client on the other."""

    def __init__(self, max_message=1 << 20, max_buffered=1 << 20, server_sndbuf=None,
                 client_rcvbuf=None):
        server, client = socket.socketpair()
        if server_sndbuf:
            server.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, server_sndbuf)
        if client_rcvbuf:
            client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, client_rcvbuf)
        server.setblocking(False)
        self.server = CountingSocket(server)
        self.client = gevent.socket.socket(fileno=client.detach())
        self.messages, self.closes = [], []
        self.connection = Connection(self.server, self.messages.append, self.closes.append,
                                     max_message=max_message, max_buffered=max_buffered)
        self.connection.start()
        self.protocol = FrameProtocol(client=True, extensions=[])

    def write(self, data, chunk=None):
        chunk = chunk or len(data)
        for start in range(0, len(data), chunk):
            self.client.sendall(data[start:start + chunk])
            gevent.sleep(0.001)

    def frames(self, count, timeout=5):
        """The next `count` frames, each whole (wsproto hands big ones over in pieces)."""
        got, part = [], None
        with gevent.Timeout(timeout):
            while len(got) < count:
                for received in self.protocol.received_frames():
                    if part is not None:
                        received = received._replace(opcode=part.opcode,
                                                     payload=part.payload + received.payload)
                    part = None if received.frame_finished else received
                    if part is None:
                        got.append(received)
                if len(got) < count:
                    data = self.client.recv(65536)
                    if not data:
                        break
                    self.protocol.receive_bytes(data)
        return got

    def read_to_end(self, timeout=5):
        data = b""
        with gevent.Timeout(timeout):
            while chunk := self.client.recv(65536):
                data += chunk
        return data


def test_frames_sent_in_one_turn_of_the_loop_go_out_in_one_send():
    peer = Peer()
    for n in range(3):
        peer.connection.send(frame(f"message {n}"))
    assert peer.server.sends == 0  # nothing before the sender gives the loop a turn
    received = peer.frames(3)
    assert [f.payload for f in received] == ["message 0", "message 1", "message 2"]
    assert peer.server.sends == 1


def until(predicate, what):
    """Let the loop run until `predicate()` is true (this process is not monkey-patched)."""
    return wait_until(lambda: gevent.sleep(0.005) or predicate(), what=what)


def test_messages_arrive_whole_across_frames_and_reads():
    peer = Peer()
    data = (bytes(peer.protocol.send_data("héllo ", fin=False))
            + bytes(peer.protocol.send_data("wör", fin=False))
            + bytes(peer.protocol.send_data("ld", fin=True))
            + bytes(peer.protocol.send_data(b"\x00\x01")))
    peer.write(data, chunk=3)
    until(lambda: len(peer.messages) == 2, "both messages")
    assert peer.messages == ["héllo wörld", b"\x00\x01"]


def test_a_paused_connection_reads_nothing_until_resumed():
    peer = Peer()
    peer.connection.pause()
    peer.write(bytes(peer.protocol.send_data("wait for me")))
    gevent.sleep(0.05)
    assert peer.messages == []
    peer.connection.resume()
    until(lambda: peer.messages, "the message after resuming")
    assert peer.messages == ["wait for me"]


def test_a_ping_is_answered_with_its_payload():
    peer = Peer()
    peer.write(bytes(peer.protocol.ping(b"are you there")))
    [pong] = peer.frames(1)
    assert pong.opcode is Opcode.PONG and pong.payload == b"are you there"


def test_a_close_from_the_client_is_echoed_then_the_socket_closed():
    peer = Peer()
    peer.write(bytes(peer.protocol.close(CloseReason.GOING_AWAY, "bye")))
    [echo] = peer.frames(1)
    assert echo.opcode is Opcode.CLOSE and echo.payload[0] == CloseReason.GOING_AWAY
    assert peer.read_to_end() == b""
    assert peer.closes == ["closed"]


def test_a_protocol_error_closes_with_its_code():
    peer = Peer()
    peer.write(b"\x81\x05hello")  # clients must mask their frames
    [close] = peer.frames(1)
    assert close.opcode is Opcode.CLOSE and close.payload[0] == CloseReason.PROTOCOL_ERROR
    assert peer.messages == [] and peer.closes == ["closed"]


def test_a_message_over_the_limit_closes_the_connection():
    peer = Peer(max_message=100)
    peer.write(bytes(peer.protocol.send_data("x" * 60, fin=False))
               + bytes(peer.protocol.send_data("x" * 60, fin=True)))
    [close] = peer.frames(1)
    assert close.payload[0] == CloseReason.MESSAGE_TOO_BIG
    assert peer.messages == [] and peer.closes == ["closed"]


def test_what_the_kernel_does_not_take_goes_out_in_order_when_the_client_reads():
    peer = Peer(max_buffered=8 << 20, server_sndbuf=4096, client_rcvbuf=4096)
    sent = [frame(bytes([n]) * 60_000) for n in range(40)]  # 2.4 MB
    for data in sent:
        peer.connection.send(data)
    until(lambda: peer.connection.buffered > 0, "the kernel to be full")
    assert peer.server.sends >= 1
    received = peer.frames(40, timeout=20)
    assert [f.payload for f in received] == [bytes([n]) * 60_000 for n in range(40)]
    assert peer.connection.buffered == 0 and peer.closes == []


def test_a_client_that_stops_reading_is_disconnected():
    peer = Peer(max_buffered=256 << 10, server_sndbuf=4096, client_rcvbuf=4096)
    for _ in range(100):
        peer.connection.send(frame("x" * 10_000))
        gevent.sleep(0)
        if peer.closes:
            break
    assert peer.closes == ["client too slow"]
    assert peer.connection.closed


def test_a_burst_queued_in_one_turn_reaches_a_reading_client():
    peer = Peer(max_buffered=64 << 10)
    for n in range(100):  # 200 KB before the loop gets a turn, as from one pub/sub read
        peer.connection.send(frame(f"{n:04d}" + "x" * 2000))
    received = peer.frames(100)
    assert [f.payload[:4] for f in received] == [f"{n:04d}" for n in range(100)]
    assert peer.closes == []


def test_closing_sends_what_was_queued_then_the_close_frame():
    peer = Peer()
    peer.connection.send(frame("last words"))
    peer.connection.close()
    last, close = peer.frames(2)
    assert last.payload == "last words" and close.opcode is Opcode.CLOSE
    assert peer.read_to_end() == b""
    assert peer.closes == ["closed"]


def taken_tcp_socket(early=b""):
    """A TCP connection's server end taken as a WebSocket's is, and its client end."""
    listener = gevent.socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    client = gevent.socket.create_connection(listener.getsockname())
    server, _ = listener.accept()
    listener.close()
    client.sendall(early)
    gevent.sleep(0.05)

    class Request:  # what take_socket uses of gevent-websocket's request handler
        socket = server
        rfile = server.makefile("rb")
    Request.rfile.read(min(6, len(early)))  # consumed by the HTTP parser, the rest buffered
    sock, received, _ = take_socket(Request)
    return sock, received, client


def nodelay(sock):
    return bool(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))


def test_a_taken_socket_sends_without_delay_and_keeps_what_was_read_ahead():
    sock, received, client = taken_tcp_socket(early=b"early bytes")
    assert received == b"bytes"
    assert nodelay(sock)
    assert sock.gettimeout() == 0.0 and not os.get_blocking(sock.fileno())
    sock.close()
    client.close()


def test_a_busy_socket_lets_the_kernel_merge_frames_until_it_goes_quiet():
    sock, _, client = taken_tcp_socket()
    received = []
    connection = Connection(sock, received.append, received.append, max_message=1 << 20,
                            max_buffered=1 << 20)
    connection.start()
    for n in range(BUSY_FLUSHES - 1):
        connection.send(frame(f"message {n}"))
        gevent.sleep(0)  # one turn of the loop: one flush
    assert nodelay(sock)  # not busy yet
    connection.send(frame("one more"))
    gevent.sleep(0)
    assert not nodelay(sock)  # busy: Nagle's algorithm may merge its frames
    gevent.sleep(BUSY_WINDOW * 3)
    assert nodelay(sock)  # quiet again: whatever was held has been sent
    data = b""
    with gevent.Timeout(5):
        while not data.endswith(frame("one more")):
            data += client.recv(65536)
    connection.abort("done")
    client.close()


def polling_session(worker):
    url = worker.url + "/socket.io/"
    handshake = requests.get(url, params={"EIO": "4", "transport": "polling"}, timeout=5)
    sid = json.loads(handshake.text[1:])["sid"]
    return url, {"EIO": "4", "transport": "polling", "sid": sid}


def test_an_upgrade_from_polling_carries_the_session_over(workers):
    worker = workers[0]
    url, poll = polling_session(worker)
    assert requests.post(url, params=poll, data="40" + json.dumps({"token": worker.token("up")}),
                         timeout=5).ok
    assert requests.get(url, params=poll, timeout=5).text.startswith("40{")
    ws = websocket.create_connection(
        worker.url.replace("http", "ws") + f"/socket.io/?EIO=4&transport=websocket&sid={poll['sid']}",
        timeout=5)
    try:
        ws.send("2probe")
        assert ws.recv() == "3probe"
        assert requests.get(url, params=poll, timeout=5).text == "6"  # the poll is told to stop
        ws.send("5")
        ws.send('421["join",{"room":"upgraded"}]')
        answer = ws.recv()
        while not answer.startswith("431"):
            answer = ws.recv()
        assert json.loads(answer[3:])[0]["ok"] is True
    finally:
        ws.close()


def test_a_failed_upgrade_leaves_the_polling_session_working(workers):
    worker = workers[0]
    url, poll = polling_session(worker)
    ws = websocket.create_connection(
        worker.url.replace("http", "ws") + f"/socket.io/?EIO=4&transport=websocket&sid={poll['sid']}",
        timeout=5)
    ws.send("not a probe")
    with pytest.raises((websocket.WebSocketConnectionClosedException, ConnectionError, OSError)):
        for _ in range(5):
            if not ws.recv():
                raise ConnectionError("closed")
    ws.close()
    assert requests.post(url, params=poll, data="40" + json.dumps({"token": worker.token("poll")}),
                         timeout=5).ok
    assert requests.get(url, params=poll, timeout=5).text.startswith("40{")


def test_an_undecodable_packet_closes_its_websocket_with_1008(workers):
    ws = websocket.create_connection(
        workers[0].url.replace("http", "ws") + "/socket.io/?EIO=4&transport=websocket", timeout=5)
    assert ws.recv().startswith("0{")
    ws.send("not an engine.io packet")
    opcode, data = ws.recv_data(control_frame=True)
    assert opcode == websocket.ABNF.OPCODE_CLOSE
    assert struct.unpack("!H", data[:2])[0] == CloseReason.POLICY_VIOLATION
    ws.close()


def test_a_client_that_stops_reading_is_dropped_and_the_room_goes_on(worker_factory, clients, room):
    worker = worker_factory("slowpoke", SCALECHAT_MAX_SEND_BUFFER="65536")
    stalled = websocket.create_connection(
        worker.url.replace("http", "ws") + "/socket.io/?EIO=4&transport=websocket", timeout=10,
        sockopt=((socket.SOL_SOCKET, socket.SO_RCVBUF, 4096),))
    assert stalled.recv().startswith("0{")
    stalled.send("40" + json.dumps({"token": worker.token("stalled")}))
    assert stalled.recv().startswith("40{")
    stalled.send('421["join",{"room":"%s"}]' % room)
    assert stalled.recv().startswith("431")
    reader, sender = clients("reader").connect(worker), clients("sender").connect(worker)
    reader.join(room)
    sender.join(room)
    sent, acks = 0, []
    while "websocket dropped" not in worker.log_path.read_text():
        assert sent < 5000, "10 MB sent and the client that reads nothing is still served"
        for _ in range(200):  # 2 KB each; the kernel takes up to its send buffer (4 MB) first
            sender.sio.emit("message", {"room": room, "text": f"{sent:04d}" + "x" * 1990,
                                        "client_id": f"c{sent}"}, callback=acks.append)
            sent += 1
        reader.wait_for("message", lambda got: len(got) == sent, timeout=30)
    wait_until(lambda: len(acks) == sent, what="every ack")
    assert all(ack["ok"] for ack in acks)
    received = 0
    with pytest.raises((websocket.WebSocketConnectionClosedException, ConnectionError)):
        while True:  # what the kernel held, then the end of the connection
            opcode, _ = stalled.recv_data(control_frame=True)
            if opcode == websocket.ABNF.OPCODE_CLOSE:
                raise ConnectionError("closed by the server")
            received += 1
    assert received < sent
    stalled.close()


def test_pings_keep_their_interval_when_every_pong_comes_at_once():
    from flask_app.wire.engine import ChatSocket, EngineServer
    server = EngineServer(max_send_buffer=1 << 20, async_mode="gevent", ping_interval=0.1)
    eio_socket = ChatSocket(server, "sid")
    pings = []

    def send(pkt):  # the client answers every ping at once
        pings.append(time.monotonic())
        eio_socket.schedule_ping()
    eio_socket.send = send
    eio_socket.schedule_ping()
    until(lambda: len(pings) >= 5, "five pings")
    eio_socket.close(wait=False, abort=True)
    # one ping per interval, not one per pong: a storm would send the next at once
    assert all(later - earlier >= 0.09 for earlier, later in zip(pings, pings[1:])), pings
    assert min(b - a for a, b in zip(pings, pings[1:])) >= 0.09


def test_a_burst_of_events_is_answered_in_order(workers, room):
    ws = websocket.create_connection(
        workers[0].url.replace("http", "ws") + "/socket.io/?EIO=4&transport=websocket", timeout=10)
    assert ws.recv().startswith("0{")
    ws.send("40" + json.dumps({"token": workers[0].token("burst")}))
    assert ws.recv().startswith("40{")
    frames = [websocket.ABNF.create_frame(f'42{n}["history",{{"room":"{room}"}}]',
                                          websocket.ABNF.OPCODE_TEXT).format()
              for n in range(400)]  # more than a connection queues before it stops reading
    ws.sock.sendall(b"".join(frames))
    acks = []
    while len(acks) < 400:
        packet = ws.recv()
        if packet.startswith("43"):
            acks.append(int(packet[2:packet.index("[")]))
    assert acks == list(range(400))
    ws.close()


def socketio_websocket(worker, name):
    """A raw WebSocket with an open Socket.IO session, for a client that writes its own frames."""
    ws = websocket.create_connection(
        worker.url.replace("http", "ws") + "/socket.io/?EIO=4&transport=websocket", timeout=10)
    assert ws.recv().startswith("0{")
    ws.send("40" + json.dumps({"token": worker.token(name)}))
    assert ws.recv().startswith("40{")
    return ws


def answers_and_close(ws):
    """The text packets the server sends until it closes, and the close code."""
    answers = []
    while True:
        opcode, data = ws.recv_data(control_frame=True)
        if opcode == websocket.ABNF.OPCODE_CLOSE:
            ws.close()
            return answers, struct.unpack("!H", data[:2])[0]
        answers.append(data.decode())


def history_packet(ack_id, size):
    """A `history` event of exactly `size` bytes of UTF-8, mostly 4-byte characters."""
    head, tail = f'42{ack_id}["history",{{"room":"r","pad":"', '"}]'
    room = size - len(head) - len(tail)
    return head + "\U0001f600" * (room // 4) + "x" * (room % 4) + tail


@pytest.fixture(scope="module")
def small_payload_worker(redis_server, tmp_path_factory):
    """A worker taking packets of at most 120 bytes: below the size of a directly read frame."""
    from conftest import Worker
    worker = Worker(redis_server.url, "small-payload", tmp_path_factory.mktemp("small"),
                    SCALECHAT_MAX_PAYLOAD="120").start()
    yield worker
    worker.stop()


@pytest.mark.parametrize("size,frames", [(120, 1), (121, 1), (300, 1), (300, 3), (121, 2)])
def test_the_payload_limit_counts_bytes_not_characters(small_payload_worker, size, frames):
    ws = socketio_websocket(small_payload_worker, "sizer")
    text = history_packet(1, size)
    assert len(text.encode()) == size and len(text) <= 120  # in characters, always under
    client = FrameProtocol(client=True, extensions=[])
    cut = [len(text) * n // frames for n in range(frames + 1)]
    ws.sock.sendall(b"".join(bytes(client.send_data(text[a:b], fin=b == len(text)))
                             for a, b in zip(cut, cut[1:])))
    if size <= 120:
        assert ws.recv().startswith("431[")
        ws.close()
    else:
        assert answers_and_close(ws) == ([], CloseReason.MESSAGE_TOO_BIG)


@pytest.mark.parametrize("bad", ["oversized", "unmasked"])
def test_packets_read_with_a_protocol_error_are_answered_before_the_close(small_payload_worker,
                                                                         bad):
    ws = socketio_websocket(small_payload_worker, "early")
    client = FrameProtocol(client=True, extensions=[])
    good = b"".join(bytes(client.send_data(history_packet(n, 60))) for n in (1, 2))
    if bad == "oversized":
        broken, code = bytes(client.send_data(history_packet(3, 200))), CloseReason.MESSAGE_TOO_BIG
    else:
        broken, code = b"\x81\x02" + b"40", CloseReason.PROTOCOL_ERROR
    ws.sock.sendall(good + broken)  # in one segment: one read on the server
    answers, closed_with = answers_and_close(ws)
    assert [a[:4] for a in answers] == ["431[", "432["] and closed_with == code


def test_a_polling_post_is_limited_in_bytes_too(small_payload_worker):
    url, poll = polling_session(small_payload_worker)
    token = small_payload_worker.token("poll")
    assert requests.post(url, params=poll, data="40" + json.dumps({"token": token}), timeout=5).ok
    assert requests.get(url, params=poll, timeout=5).text.startswith("40{")
    assert requests.post(url, params=poll, data=history_packet(1, 120).encode(), timeout=5).ok
    assert requests.get(url, params=poll, timeout=5).text.startswith("431[")
    assert requests.post(url, params=poll, data=history_packet(2, 121).encode(),
                         timeout=5).status_code == 400
    assert requests.get(url, params=poll, timeout=5).status_code == 400  # the session is closed

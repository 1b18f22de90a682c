"""WebSocket connections served by gevent's event loop, with no greenlet of their own.

python-engineio's gevent driver keeps three greenlets per WebSocket: the request's, blocked
in receive(); a writer, blocked on the packet queue; and one asleep until the next ping.
At about 8 KB each they were most of an idle connection's memory, and every delivery cost
a switch to the writer. Here, once gevent-websocket has answered the handshake, the socket
is taken from the request's greenlet, which then ends:

- reads: a read watcher calls back when bytes arrive; short text frames, what clients
  send, are read directly (`plain_text_frames`), anything else by wsproto, which answers
  pings; every whole message goes to `on_message`. A message over `max_message` bytes of
  UTF-8 (not characters: the limit is the Engine.IO `maxPayload` clients are told) or a
  broken frame stops the reading, and the connection closes with the matching code once
  the messages read before it are handled (`on_error`);
- writes: the frames sent to a connection during one turn of the loop go out together in
  one send() when the turn ends, so a broadcast costs one system call per member and adds
  no delay. What the kernel does not take waits for a write watcher; a client that stops
  reading is disconnected once `max_buffered` bytes the kernel would not take wait for it.
  Sockets have TCP_NODELAY, except while they are written to continuously (see `_Busy`);
- flow control: the owner may `pause()` reading, and TCP then slows the client down.

Callbacks run in the loop itself, where nothing may block: `on_message` and `on_close`
hand blocking work to a greenlet.
"""
import _socket
import io
import logging
import struct

import gevent
from wsproto.frame_protocol import CloseReason, FrameProtocol, Opcode, ParseFailed

log = logging.getLogger(__name__)

TEXT, BINARY = 0x81, 0x82  # FIN + opcode
READ, WRITE = 1, 2  # libev's event masks
CLOSE_TIMEOUT = 5.0  # seconds a closing connection may take to take its last frames
BUSY_FLUSHES, BUSY_WINDOW = 8, 0.02  # this many flushes in this many seconds: a busy socket

_read_buffer = bytearray(65536)  # one for the process: reads never overlap in the loop
_read_view = memoryview(_read_buffer)


def frame(message):
    """Return an unmasked server-to-client WebSocket frame carrying `message`."""
    if isinstance(message, str):
        payload, first = message.encode(), TEXT
    else:
        payload, first = bytes(message), BINARY
    length = len(payload)
    if length < 126:
        return struct.pack("!BB", first, length) + payload
    if length < 65536:
        return struct.pack("!BBH", first, 126, length) + payload
    return struct.pack("!BBQ", first, 127, length) + payload


class _EndOfTurn:
    """The connections with frames waiting, written when this turn of the loop ends."""

    def __init__(self):
        self.waiting = []
        self.scheduled = False

    def add(self, connection):
        self.waiting.append(connection)
        if not self.scheduled:
            self.scheduled = True
            gevent.get_hub().loop.run_callback(self.flush)

    def flush(self):
        waiting, self.waiting = self.waiting, []
        self.scheduled = False
        for connection in waiting:
            try:
                connection.flush()
            except Exception:
                log.exception("websocket flush failed")
                connection.abort("internal error")


end_of_turn = _EndOfTurn()


class _Busy:
    """The sockets written to continuously, whose small frames the kernel may merge.

    A WebSocket has TCP_NODELAY so that a frame never waits for the ACK of the one before
    (the client may delay it 40 ms). A socket written to BUSY_FLUSHES times in BUSY_WINDOW
    (one member of a busy room) has Nagle's algorithm turned back on: the kernel then merges
    its frames into fewer segments, each of which costs about as much CPU as a frame. Once it
    has been quiet for BUSY_WINDOW it gets TCP_NODELAY again, which sends anything held.
    """

    def __init__(self):
        self.connections = set()
        self.timer = None

    def add(self, connection):
        connection.set_nodelay(False)
        self.connections.add(connection)
        if self.timer is None:
            self.timer = gevent.get_hub().loop.timer(BUSY_WINDOW, BUSY_WINDOW)
            self.timer.start(self.sweep)

    def sweep(self):
        now = gevent.get_hub().loop.now()
        for connection in list(self.connections):
            if connection.closed or now - connection.last_flush >= BUSY_WINDOW:
                self.connections.discard(connection)
                connection.set_nodelay(True)
        if not self.connections:
            self.timer.stop()
            self.timer = None


busy = _Busy()


def plain_text_frames(data):
    """The messages of `data` if it is whole, masked, unfragmented text frames of up to 125
    bytes of UTF-8 (what clients send most), else None: wsproto is to read it.

    wsproto reads such a frame in 5 us; this in 1.
    """
    messages = []
    at, end = 0, len(data)
    while at < end:
        first, second = data[at], data[at + 1] if at + 1 < end else 0
        length = second & 0x7F
        start = at + 6
        if first != 0x81 or second & 0x80 == 0 or length > 125 or start + length > end:
            return None
        mask = int.from_bytes(data[at + 2:start] * 32, "big") >> (8 * (128 - length))
        payload = (int.from_bytes(data[start:start + length], "big") ^ mask).to_bytes(length, "big")
        try:
            messages.append(payload.decode("utf-8"))
        except UnicodeDecodeError:
            return None
        at = start + length
    return messages


class Connection:
    """One server-side WebSocket on a non-blocking socket, driven by loop callbacks."""

    __slots__ = ("sock", "on_message", "on_close", "on_error", "max_message", "max_buffered",
                 "protocol", "plain", "fragments", "size", "out", "buffered", "pending",
                 "refused", "closing", "closed", "reader", "writer", "timer", "nodelay",
                 "flushes", "window_start", "last_flush")

    def __init__(self, sock, on_message, on_close, max_message, max_buffered, on_error=None):
        self.sock = sock
        self.on_message = on_message  # (str | bytes) -> None, each whole message
        self.on_close = on_close  # (reason: str) -> None, once, when the connection is gone
        # (code, reason) -> None: the client broke the protocol and nothing more is read; the
        # owner calls close(code, reason) once it has handled the messages before. None: at once.
        self.on_error = on_error
        self.max_message = max_message  # bytes of one message, as it came over the wire
        self.max_buffered = max_buffered
        self.protocol = None  # wsproto's, made when first needed: most connections never do
        self.plain = True  # every frame so far was read by plain_text_frames, none by wsproto
        self.fragments = None  # parts of a message that came in several frames
        self.size = 0
        self.out = []
        self.buffered = 0
        self.pending = False  # waiting in end_of_turn
        self.refused = False  # the client broke the protocol: never read again
        self.closing = False
        self.closed = False
        self.reader = self.writer = self.timer = None
        self.nodelay = True  # as take_socket leaves it
        self.flushes = 0
        self.window_start = self.last_flush = 0.0

    def start(self, received=b""):
        """Serve the connection from now on; `received` are bytes already read from it."""
        self.reader = gevent.get_hub().loop.io(self.sock.fileno(), READ)
        self.reader.start(self._readable)
        if received:
            self._received(received)

    def send(self, data):
        """Queue whole frames; they go out when this turn of the loop ends.

        Only bytes the kernel would not take count against `max_buffered`: frames queued in
        one turn (a page of pub/sub messages read at once) are no sign of a slow client.
        """
        if self.closing or self.closed:
            return
        self.out.append(data)
        self.buffered += len(data)
        if self.writer is not None and self.writer.active:  # the kernel's buffer is full
            self._drop_if_behind()
        elif not self.pending:
            self.pending = True
            end_of_turn.add(self)

    def _drop_if_behind(self):
        if self.buffered > self.max_buffered:
            log.info("websocket dropped: %d bytes wait for a client that does not read",
                     self.buffered)
            self.abort("client too slow")

    def pause(self):
        """Stop reading: the kernel's buffers fill and TCP slows the client down."""
        if self.reader is not None and not self.closing:
            self.reader.stop()

    def resume(self):
        if (self.reader is not None and not self.reader.active and not self.closing
                and not self.refused):
            self.reader.start(self._readable)

    def close(self, code=CloseReason.NORMAL_CLOSURE, reason=None):
        """Send a close frame after what is queued, then close the socket."""
        if self.closing or self.closed:
            return
        self.out.append(bytes(self._wsproto().close(code, reason)))
        self.closing = True
        if self.reader is not None:
            self.reader.stop()
        self.timer = gevent.get_hub().loop.timer(CLOSE_TIMEOUT)
        self.timer.start(self.abort, "close timed out")
        self.flush()

    def abort(self, reason):
        """Close the socket now, dropping whatever is still queued."""
        if self.closed:
            return
        self.closed = True
        for watcher in (self.reader, self.writer, self.timer):
            if watcher is not None:
                watcher.stop()
                watcher.close()
        self.reader = self.writer = self.timer = None
        self.out = []
        try:
            for _ in range(4):  # unread bytes would turn close() into a reset
                if not self.sock.recv_into(_read_buffer):
                    break
        except OSError:
            pass
        self.sock.close()
        self.on_close(reason)

    def set_nodelay(self, on):
        if on != self.nodelay and not self.closed:
            self.nodelay = on
            try:
                self.sock.setsockopt(_socket.IPPROTO_TCP, _socket.TCP_NODELAY, on)
            except OSError:
                pass  # not TCP, or already gone

    def flush(self):
        self.pending = False
        if self.closed or not self.out or (self.writer is not None and self.writer.active):
            return  # a full kernel buffer: the write watcher will flush
        now = gevent.get_hub().loop.now()
        if now - self.window_start > BUSY_WINDOW:
            self.window_start, self.flushes = now, 0
        self.flushes += 1
        self.last_flush = now
        if self.flushes == BUSY_FLUSHES and self.nodelay:
            busy.add(self)
        data = self.out[0] if len(self.out) == 1 else b"".join(self.out)
        try:
            sent = self.sock.send(data)
        except BlockingIOError:
            sent = 0
        except OSError as exc:
            self.abort(f"write failed: {exc}")
            return
        if sent == len(data):
            self.out = []
            self.buffered = 0
            if self.closing:
                self.abort("closed")
            return
        self.out = [data[sent:]]
        self.buffered = len(data) - sent
        self._drop_if_behind()
        if self.closed:
            return
        if self.writer is None:
            self.writer = gevent.get_hub().loop.io(self.sock.fileno(), WRITE)
        if not self.writer.active:
            self.writer.start(self._writable)

    def _writable(self):
        self.writer.stop()
        self.flush()

    def _readable(self):
        try:
            count = self.sock.recv_into(_read_buffer)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self.abort(f"read failed: {exc}")
            return
        if count == 0:
            self.abort("closed by the client")
            return
        self._received(bytes(_read_view[:count]))

    def _received(self, data):
        try:
            if self.plain:
                messages = plain_text_frames(data) if self.max_message >= 125 else None
                if messages is not None:
                    for message in messages:
                        if self.closing or self.closed:
                            return
                        self.on_message(message)
                    return
                self.plain = False  # wsproto may keep part of a frame from now on
            protocol = self._wsproto()
            protocol.receive_bytes(data)
            for received in protocol.received_frames():
                if self.closing or self.closed or self.refused:
                    return
                self._frame(received)
        except ParseFailed as exc:
            log.info("websocket protocol error: %s", exc)
            self._refuse(exc.code, str(exc))
        except Exception:
            log.exception("websocket message handling failed")
            self.close(CloseReason.INTERNAL_ERROR)

    def _refuse(self, code, reason):
        """Read nothing more; close once what was read before is handled (see `on_error`)."""
        self.refused = True
        if self.reader is not None:
            self.reader.stop()
        if self.on_error is None:
            self.close(code, reason)
        else:
            self.on_error(code, reason)

    def _wsproto(self):
        if self.protocol is None:
            self.protocol = FrameProtocol(client=False, extensions=[])
        return self.protocol

    def _frame(self, received):
        opcode = received.opcode
        if opcode is Opcode.PING:
            self.send(bytes(self.protocol.pong(received.payload)))
        elif opcode is Opcode.CLOSE:
            code, reason = received.payload
            self.close(code, reason)
        elif opcode is not Opcode.PONG:  # a piece of a text or binary message
            payload = received.payload
            # wsproto hands text over decoded: count the bytes it came in
            self.size += (len(payload) if not isinstance(payload, str) or payload.isascii()
                          else len(payload.encode()))
            if self.size > self.max_message:
                log.info("websocket message over %d bytes refused", self.max_message)
                self._refuse(CloseReason.MESSAGE_TOO_BIG, "message too big")
                return
            if received.message_finished and self.fragments is None:
                message = received.payload
            else:
                if self.fragments is None:
                    self.fragments = []
                self.fragments.append(received.payload)
                if not received.message_finished:
                    return
                parts, self.fragments = self.fragments, None
                message = "".join(parts) if isinstance(parts[0], str) else b"".join(parts)
            self.size = 0
            self.on_message(message)


def take_socket(request):
    """Take a WebSocket's socket from gevent-websocket's request handler, which then ends.

    Returns the socket, non-blocking, any bytes the handler had read ahead, and the 101
    answer the handler held back to go out first (handler.ChatHandler), or None.
    """
    gsock = request.socket
    gsock.settimeout(0.0)  # the peek below must not wait for bytes
    try:
        received = request.rfile.peek()
    except OSError:
        received = b""
    # family, type and proto given, and the fd already non-blocking: no system call here
    sock = _socket.socket(gsock.family, gsock.type | _socket.SOCK_NONBLOCK, gsock.proto,
                          gsock.detach())
    if sock.family in (_socket.AF_INET, _socket.AF_INET6):
        # Frames go out as soon as they are written: an ack followed by a broadcast must not
        # wait for the client's delayed ACK of the first (Nagle's algorithm: 40 ms here).
        sock.setsockopt(_socket.IPPROTO_TCP, _socket.TCP_NODELAY, 1)
    answer = getattr(request, "upgrade_answer", None)
    request.upgrade_answer = None
    return sock, bytes(received), answer


class TakenWebSocket:
    """python-engineio's `websocket` driver entry for gevent, handing over the socket itself.

    Called by python-engineio with the Engine.IO socket's handler, then as the WSGI app of
    the upgraded request; the handler gets this object, whose `sock` and `received` it
    serves with a `Connection`, sending `answer` (the held 101) first.
    """

    def __init__(self, handler, server):
        self.handler = handler
        self.sock = None
        self.received = b""
        self.answer = None

    def __call__(self, environ, start_response):
        websocket = environ.get("wsgi.websocket")
        if websocket is None:
            raise RuntimeError("scalechat needs gevent-websocket's WebSocketHandler")
        self.sock, self.received, self.answer = take_socket(websocket.handler)
        # Not gevent-websocket's to close any more; without its handler, the close() it
        # calls again when collected stops at once (it would build a class twice).
        websocket.closed = True
        websocket.handler = None
        # the session keeps the environ: let go of the request's 8 KB read buffer
        environ["wsgi.input"] = io.BytesIO()
        return self.handler(self)

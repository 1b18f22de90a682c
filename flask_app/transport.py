"""WebSocket writes in batches: every frame queued for a socket goes out in one send().

python-engineio's writer greenlet takes all the packets queued for a socket at once, then
sends each in its own WebSocket frame and system call; under a busy room that system call is
most of the cost of a delivery. Here the writer's frames are kept until it comes back to wait
on the queue, and then written with one sendall(): no delay is added (the writer had nothing
more to send), and a batch is never larger than what was already queued.

`BatchingQueue` and `BatchingWebSocket` replace the `queue` and `websocket` entries of
python-engineio's gevent driver (see engine.EngineServer); the Engine.IO protocol on the wire
is unchanged.
"""
import logging
import struct

import gevent
from gevent.queue import JoinableQueue

log = logging.getLogger(__name__)

TEXT, BINARY = 0x81, 0x82  # FIN + opcode


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


class BatchingQueue(JoinableQueue):
    """An Engine.IO socket's packet queue that lets its WebSocket flush before a blocking wait."""

    before_wait = None

    def get(self, block=True, timeout=None):
        if block and self.before_wait is not None:
            self.before_wait()
        return super().get(block, timeout)


class BatchingWebSocket:
    """python-engineio's gevent-websocket adapter, sending the writer's frames in batches."""

    def __init__(self, handler, server):
        self.app = handler
        self.pending = []
        self.writer = None
        handler.__self__.queue.before_wait = self._before_wait  # the Engine.IO socket's queue

    def __call__(self, environ, start_response):
        if "wsgi.websocket" not in environ:
            raise RuntimeError("scalechat needs gevent-websocket's WebSocketHandler")
        self._sock = environ["wsgi.websocket"]
        self.environ = environ
        self.version = self._sock.version
        self.path = self._sock.path
        self.origin = self._sock.origin
        self.protocol = self._sock.protocol
        return self.app(self)

    def send(self, message):
        self.pending.append(frame(message))
        if gevent.getcurrent() is not self.writer:
            self.flush()  # not the writer (the upgrade handshake): nothing else will flush

    def flush(self):
        if not self.pending:
            return
        data = b"".join(self.pending)
        self.pending.clear()
        if self._sock.closed:
            return
        try:
            self._sock.raw_write(data)
        except OSError as exc:
            log.info("websocket write failed: %s", exc)
            try:
                self._sock.close()  # the reader then ends the session
            except Exception:
                pass

    def _before_wait(self):
        self.writer = gevent.getcurrent()
        self.flush()

    def close(self):
        self.flush()
        return self._sock.close()

    def wait(self):
        return self._sock.receive()

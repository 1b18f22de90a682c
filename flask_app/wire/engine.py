"""Our Socket.IO server: python-socketio's, on an Engine.IO server that refuses bad requests
cleanly and serves WebSockets from the event loop (see transport.py).

python-engineio closes a session that sent a malformed polling packet by waiting for a poll
to drain its queue, which may never come (the request then hangs), and answers 500 to a
request for a session that has just closed. Both are a client's fault and get a 400 here.
"""
import collections
import logging
import time

import engineio
import gevent
import orjson
import socketio
from engineio import packet
from engineio.socket import Socket
from wsproto.frame_protocol import CloseReason

from . import transport
from .runners import Runners

log = logging.getLogger(__name__)

INBOX_LIMIT = 128  # packets waiting to be handled before a connection stops being read
_last_frame = (None, b"")  # a broadcast sends one Packet object to every member


def _frame_of(pkt):
    """The WebSocket frame of an Engine.IO packet, encoded once for all the members of a room."""
    global _last_frame
    if _last_frame[0] is not pkt:
        _last_frame = (pkt, transport.frame(pkt.encode()))
    return _last_frame[1]


def _packet_type(data):
    """The type of an encoded Engine.IO packet, or None if it is not one."""
    try:
        return packet.Packet(encoded_packet=data).packet_type
    except Exception:
        return None


class ChatSocket(Socket):
    """An Engine.IO session whose WebSocket is a transport.Connection and whose pings are timers.

    Polling works as in python-engineio. A WebSocket, opened directly or as an upgrade,
    is served by the loop: sends are queued on the connection; packets received are
    handled in order, by a greenlet that lives while there are some.
    """

    websocket = None  # the transport.Connection, once one is opened
    ping_timer = None
    inbox = None  # packets received and not yet handled
    protocol_error = None  # (close code, reason) to close with once the inbox is handled

    def send(self, pkt):
        if self.websocket is None or not self.upgraded:
            return super().send(pkt)  # polling, or a WebSocket still being probed
        if self.check_ping_timeout():
            self.websocket.send(_frame_of(pkt))

    def schedule_ping(self):
        if self.last_ping:
            self.last_ping = None
            if self.ping_timer is None:
                interval = self.server.ping_interval
                self.ping_timer = gevent.get_hub().loop.timer(interval, interval)
            # again(), not start(): libev restarts a timer that has fired with its time left (0)
            self.ping_timer.again(self._ping)

    def _ping(self):
        self.ping_timer.stop()  # one ping per pong: schedule_ping starts it again
        if not self.closing and not self.closed:
            self.last_ping = time.time()
            self.send(packet.Packet(packet.PING))

    def close(self, wait=True, abort=False, reason=None):
        if self.upgraded and self.websocket is not None:
            wait = False  # no writer drains the queue: the WebSocket flushes before closing
        super().close(wait=wait, abort=abort, reason=reason)
        if self.ping_timer is not None:
            self.ping_timer.stop()
        if self.websocket is not None:
            self.websocket.close()
        if self.server.sockets.get(self.sid) is self:
            del self.server.sockets[self.sid]

    def _websocket_handler(self, ws):
        """Serve the WebSocket `ws` (a transport.TakenWebSocket) from the loop, and return."""
        if self.websocket is not None or self.closed:
            ws.sock.close()  # a second WebSocket for one session
            return []
        self.websocket = transport.Connection(
            ws.sock, self._on_message, self._on_websocket_closed,
            max_message=self.server.max_http_buffer_size,
            max_buffered=self.server.max_send_buffer, on_error=self._on_protocol_error)
        if ws.answer is not None:  # the handshake's 101, before the first frame
            self.websocket.send(ws.answer)
        if self.connected:  # an upgrade from polling: the probe comes first
            self.upgrading = True
            self.websocket.on_message = self._on_probe
        else:
            self.connected = True
            self._upgraded()
        self.websocket.start(ws.received)
        return []

    def _on_probe(self, data):
        if _packet_type(data) == packet.PING and data[1:] == "probe":
            self.websocket.send(transport.frame(packet.Packet(packet.PONG, data="probe").encode()))
            self.queue.put(packet.Packet(packet.NOOP))  # ends the poll in flight
            self.websocket.on_message = self._on_upgrade
        else:
            self._fail_upgrade(f"no PING probe but {data!r:.40}")

    def _on_upgrade(self, data):
        if _packet_type(data) == packet.UPGRADE:
            self.upgrading = False
            self._upgraded()
        else:
            self._fail_upgrade(f"no UPGRADE but {data!r:.40}")

    def _fail_upgrade(self, why):
        log.info("%s: websocket upgrade failed: %s", self.sid, why)
        self.websocket.close()

    def _upgraded(self):
        """From now on the WebSocket carries every packet, those queued first."""
        self.upgraded = True
        self.websocket.on_message = self._on_message
        while not self.queue.empty():
            pkt = self.queue.get(block=False)
            self.queue.task_done()
            if pkt is not None:
                self.websocket.send(_frame_of(pkt))

    def _on_message(self, data):
        """Queue a packet from the loop; one greenlet at a time handles them, in order."""
        if self.inbox is None:
            self.inbox = collections.deque([data])
            self.server.runners.spawn(self._handle_inbox)
        else:
            self.inbox.append(data)
            if len(self.inbox) == INBOX_LIMIT:  # a client sending faster than it is served
                self.websocket.pause()

    def _handle_inbox(self):
        while self.inbox and not self.closed:
            data = self.inbox.popleft()
            try:
                pkt = packet.Packet(encoded_packet=data)
            except Exception as exc:
                log.info("%s: undecodable packet, closing: %s", self.sid, exc)
                self.websocket.close(CloseReason.POLICY_VIOLATION)
                break
            try:
                self.receive(pkt)
            except engineio.exceptions.UnknownPacketError:
                pass
            except Exception:
                log.exception("%s: packet handling failed, closing", self.sid)
                self.websocket.close(CloseReason.INTERNAL_ERROR)
                break
        self.inbox = None
        if self.protocol_error is not None:
            self.websocket.close(*self.protocol_error)
        else:
            self.websocket.resume()

    def _on_protocol_error(self, code, reason):
        """Close with the client's error, after answering the packets it sent before it."""
        if self.inbox is None:
            self.websocket.close(code, reason)
        else:
            self.protocol_error = (code, reason)

    def _on_websocket_closed(self, reason):
        if not self.upgraded:  # the upgrade did not finish: polling goes on
            self.websocket = None
            self.upgrading = False
        elif not self.closed and not self.closing:
            self.server.start_background_task(self.close, wait=False, abort=True,
                                              reason=self.server.reason.TRANSPORT_CLOSE)


class _Sockets(dict):
    """EngineServer.sockets. python-engineio builds its Socket by name when a session opens
    and registers it here before any other use: that is where it becomes a ChatSocket (the
    server's socket_class)."""

    def __init__(self, socket_class):
        super().__init__()
        self.socket_class = socket_class

    def __setitem__(self, sid, eio_socket):
        if type(eio_socket) is Socket:
            eio_socket.__class__ = self.socket_class
        super().__setitem__(sid, eio_socket)


class EngineServer(engineio.Server):
    """Engine.IO server whose refusals never hang or answer 500, with loop-served WebSockets.

    An origin python-engineio refuses gets a 403 rather than its 400, and a WebSocket from it
    gets that 403 instead of the 101 (handler.ChatHandler.run_websocket).

    `max_send_buffer`: bytes that may wait for a client before it is disconnected.
    `runners` handle the sockets' packets, on greenlets reused from one burst to the next.
    """

    socket_class = ChatSocket  # a subclass may give its sessions a subclass of ChatSocket

    def __init__(self, max_send_buffer, **kwargs):
        super().__init__(**kwargs)
        self.max_send_buffer = max_send_buffer
        self.runners = Runners()
        if self.async_mode == "gevent":
            self.sockets = _Sockets(self.socket_class)
            self._async = {**self._async, "websocket": transport.TakenWebSocket}

    def disconnect(self, sid=None):
        """Close sessions without waiting for a poll that may never come."""
        for key in [sid] if sid is not None else list(self.sockets):
            eio_socket = self.sockets.pop(key, None)
            if eio_socket is not None:
                eio_socket.close(wait=False, reason=self.reason.SERVER_DISCONNECT)

    def refused_origin(self, environ):
        """The request's Origin if python-engineio's rule (SCALECHAT_ALLOWED_ORIGINS) refuses it."""
        origin = environ.get("HTTP_ORIGIN")
        if not origin or self.cors_allowed_origins == []:  # [] turns the check off
            return None
        allowed = self._cors_allowed_origins(environ)  # None: any origin
        return origin if allowed is not None and origin not in allowed else None

    def handle_request(self, environ, start_response):
        origin = self.refused_origin(environ)
        if origin is not None:  # 403 for polling and WebSocket alike, before any upgrade
            start_response("403 FORBIDDEN", [("Content-Type", "application/json")])
            return [orjson.dumps({"error": "origin_not_allowed",
                                  "detail": f"origin {origin} may not connect here"})]
        try:
            return super().handle_request(environ, start_response)
        except KeyError:  # the session closed while this request was on its way
            start_response("400 BAD REQUEST", [("Content-Type", "text/plain")])
            return [b"Session is closed"]


class ChatPacket(socketio.packet.Packet):
    """python-socketio's packet, asking orjson whether its data holds bytes.

    python-socketio walks every argument in Python to find binary attachments: 84 us for a
    join's ack with 50 messages of history. orjson refuses bytes, and answers in 3 us.
    """

    @classmethod
    def data_is_binary(cls, data):
        try:
            orjson.dumps(data)
        except TypeError:  # bytes, or a type orjson does not know: walk it
            return socketio.packet.Packet.data_is_binary(data)
        return False


class ChatServer(socketio.Server):
    """socketio.Server on EngineServer, whose client manager can start before any client."""

    def _engineio_server_class(self):
        return EngineServer

    def start_manager(self):
        """Subscribe to Redis now rather than at the first connection, so readiness can tell."""
        if not self.manager_initialized:
            self.manager_initialized = True
            self.manager.initialize()

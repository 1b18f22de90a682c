"""Our Socket.IO server: python-socketio's, on an Engine.IO server that refuses bad requests
cleanly and writes WebSocket frames in batches.

python-engineio closes a session that sent a malformed polling packet by waiting for a poll
to drain its queue, which may never come (the request then hangs), and answers 500 to a
request for a session that has just closed. Both are a client's fault and get a 400 here.
"""
import engineio
import socketio

from .transport import BatchingQueue, BatchingWebSocket


class EngineServer(engineio.Server):
    """Engine.IO server whose refusals never hang or answer 500, with batched WebSocket writes."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        if self.async_mode == "gevent":
            self._async = {**self._async, "queue": BatchingQueue, "websocket": BatchingWebSocket}

    def disconnect(self, sid=None):
        """Close sessions without waiting for a poll that may never come."""
        for key in [sid] if sid is not None else list(self.sockets):
            eio_socket = self.sockets.pop(key, None)
            if eio_socket is not None:
                eio_socket.close(wait=False, reason=self.reason.SERVER_DISCONNECT)

    def handle_request(self, environ, start_response):
        try:
            return super().handle_request(environ, start_response)
        except KeyError:  # the session closed while this request was on its way
            start_response("400 BAD REQUEST", [("Content-Type", "text/plain")])
            return [b"Session is closed"]


class ChatServer(socketio.Server):
    """socketio.Server on EngineServer, whose client manager can start before any client."""

    def _engineio_server_class(self):
        return EngineServer

    def start_manager(self):
        """Subscribe to Redis now rather than at the first connection, so readiness can tell."""
        if not self.manager_initialized:
            self.manager_initialized = True
            self.manager.initialize()

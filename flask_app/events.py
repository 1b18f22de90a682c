"""Socket.IO handlers of namespace `/`, one method per event, each answered by an ack."""
import functools
import logging
import time

import redis
import socketio

from . import auth, validation

log = logging.getLogger(__name__)


def acknowledged(handler):
    """Turn a handler's result or refusal into an ack; never let an error escape."""

    @functools.wraps(handler)
    def wrapper(self, sid, *args):
        try:
            if len(args) != 1:
                raise validation.ValidationError(
                    "invalid_payload", "send exactly one JSON object")
            return handler(self, sid, validation.payload(args[0]))
        except validation.ValidationError as exc:
            return {"ok": False, "error": exc.code, "detail": exc.detail}
        except redis.RedisError:
            log.warning("redis unavailable during %s", handler.__name__, exc_info=True)
            return {"ok": False, "error": "unavailable",
                    "detail": "the message store is unavailable; retry shortly"}
        except Exception:
            log.exception("handler %s failed", handler.__name__)
            return {"ok": False, "error": "internal_error", "detail": "internal error"}

    return wrapper


class ChatNamespace(socketio.Namespace):
    """The chat protocol of docs/protocol.md: join, leave, message, history, typing."""

    def __init__(self, app, services):
        super().__init__("/")
        self.app = app
        self.config = services.config
        self.tokens = services.tokens
        self.store = services.store
        self.presence = services.presence

    def on_connect(self, sid, environ, auth_data=None):
        user = auth.connect_user(self.app, self.tokens, environ, auth_data)
        if user is None:
            raise socketio.exceptions.ConnectionRefusedError("unauthorized")
        self.presence.connect(sid, user)
        self.presence.start_heartbeat(self._announce_gone)

    def on_disconnect(self, sid, *reason):
        conn = self.presence.connection(sid)
        if conn is None:
            return
        for room in list(conn.rooms):
            try:
                left, gone = self.presence.leave(sid, room)
            except redis.RedisError:
                log.warning("could not record %s leaving %s; its heartbeat will expire",
                            conn.user, room)
                continue
            self._announce_leaves(room, [conn.user] if left else [], gone)
        self.presence.disconnect(sid)

    @acknowledged
    def on_join(self, sid, data):
        room = validation.room(data.get("room"))
        conn = self._connection(sid)
        self.enter_room(sid, room)
        fresh, gone = self.presence.join(sid, room)
        self.store.touch_room(room, time.time())
        self._announce_leaves(room, [], gone)
        if fresh:
            self.emit("presence", {"room": room, "user": conn.user, "state": "join"},
                      room=room, skip_sid=sid)
        return {"ok": True, "room": room,
                "history": self.store.history(room, limit=self.config.history_on_join),
                "members": self.presence.members(room),
                "worker": self.config.worker_id}

    @acknowledged
    def on_leave(self, sid, data):
        room = validation.room(data.get("room"))
        if room not in self._connection(sid).rooms:
            raise validation.ValidationError("not_member", f"you have not joined {room}")
        self.leave_room(sid, room)
        left, gone = self.presence.leave(sid, room)
        self._announce_leaves(room, [self._connection(sid).user] if left else [], gone)
        return {"ok": True}

    @acknowledged
    def on_message(self, sid, data):
        room = validation.room(data.get("room"))
        text = validation.text(data.get("text"), self.config.max_text)
        client_id = validation.client_id(data.get("client_id"))
        conn = self._member(sid, room)
        message_id, _ = self.store.append(room, conn.user, text, client_id)
        return {"ok": True, "id": message_id}

    @acknowledged
    def on_history(self, sid, data):
        room = validation.room(data.get("room"))
        after = validation.cursor(data.get("after"), "after")
        before = validation.cursor(data.get("before"), "before")
        limit = validation.limit(data.get("limit"), self.config.history_on_join,
                                 self.config.history_max_limit)
        return {"ok": True,
                "messages": self.store.history(room, after=after, before=before, limit=limit)}

    @acknowledged
    def on_typing(self, sid, data):
        room = validation.room(data.get("room"))
        conn = self._member(sid, room)
        self.emit("typing", {"room": room, "user": conn.user}, room=room, skip_sid=sid)
        return {"ok": True}

    def _connection(self, sid):
        conn = self.presence.connection(sid)
        if conn is None:
            raise validation.ValidationError("unauthorized", "connection is not signed in")
        return conn

    def _member(self, sid, room):
        conn = self._connection(sid)
        if room not in conn.rooms:
            raise validation.ValidationError("not_member", f"join {room} before using it")
        return conn

    def _announce_gone(self, room, user):
        self._announce_leaves(room, [user], [])

    def _announce_leaves(self, room, left, gone):
        for user in [*left, *gone]:
            self.emit("presence", {"room": room, "user": user, "state": "leave"}, room=room)

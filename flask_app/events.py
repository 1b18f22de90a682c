"""Socket.IO handlers of namespace `/`, one method per event, each answered by an ack."""
import functools
import logging
import time

import gevent
import redis
import socketio

from . import auth, ratelimit, validation
from .overload import LoopLag
from .store import id_order

log = logging.getLogger(__name__)


def acknowledged(handler):
    """Turn a handler's result or refusal into an ack; never let an error escape."""

    event = handler.__name__.removeprefix("on_")

    @functools.wraps(handler)
    def wrapper(self, sid, *args):
        self.in_flight += 1
        started = time.perf_counter()
        try:
            self._check_rate(sid)
            if len(args) != 1:
                raise validation.ValidationError(
                    "invalid_payload", "send exactly one JSON object")
            return handler(self, sid, validation.payload(args[0]))
        except validation.ValidationError as exc:
            return self._refuse(exc.code, exc.detail)
        except redis.exceptions.OutOfMemoryError:
            log.warning("redis is at its memory bound during %s", event, extra={"sid": sid})
            return self._refuse("storage_full", "the message store is full; nothing was stored")
        except redis.RedisError as exc:
            log.warning("redis unavailable during %s: %s", event, exc, extra={"sid": sid})
            return self._refuse("unavailable", "the message store is unavailable; retry shortly")
        except Exception:
            log.exception("handler %s failed", event, extra={"sid": sid})
            return self._refuse("internal_error", "internal error")
        finally:
            self.in_flight -= 1
            self.metrics.handler_seconds(event).observe(time.perf_counter() - started)

    return wrapper


class ChatNamespace(socketio.Namespace):
    """The chat protocol of docs/protocol.md: join, leave, message, history, typing."""

    def __init__(self, app, services):
        super().__init__("/")
        self.app = app
        self.services = services
        self.config = services.config
        self.tokens = services.tokens
        self.store = services.store
        self.presence = services.presence
        self.metrics = services.metrics
        self.buckets = {}
        self.in_flight = 0
        self.lag = LoopLag(self.config.shed_lag_ms / 1000, self.metrics.loop_lag)

    def on_connect(self, sid, environ, auth_data=None):
        try:
            user = auth.connect_user(self.app, self.tokens, environ, auth_data)
        except auth.Unauthorized as exc:
            self.metrics.refused.inc()
            log.info("connect refused", extra={"sid": sid, "reason": "unauthorized",
                                               "detail": exc.detail})
            raise socketio.exceptions.ConnectionRefusedError(
                "unauthorized", {"detail": exc.detail}) from None
        self.presence.connect(sid, user)
        self.buckets[sid] = ratelimit.TokenBucket(self.config.rate_limit, self.config.rate_burst)
        self.metrics.connects.inc()
        self.metrics.connected.inc()
        log.info("connect", extra={"sid": sid, "user": user})

    def on_disconnect(self, sid, *reason):
        self.buckets.pop(sid, None)
        conn = self.presence.connection(sid)
        if conn is None:
            return
        self.metrics.connected.dec()
        log.info("disconnect", extra={"sid": sid, "user": conn.user, "rooms": sorted(conn.rooms),
                                      "reason": str(reason[0]) if reason else None})
        for room in list(conn.rooms):
            try:
                left, gone, online = self.presence.leave(sid, room)
            except redis.RedisError:
                log.warning("could not record %s leaving %s; its heartbeat will expire",
                            conn.user, room)
                continue
            self._announce_leaves(room, [conn.user] if left else [], gone, online)
        self.presence.disconnect(sid)

    @acknowledged
    def on_join(self, sid, data):
        room = validation.room(data.get("room"))
        since = validation.cursor(data.get("since"), "since")
        conn = self._connection(sid)
        newest = None
        if since is not None:
            # a cursor after the newest message is one its master lost after members saw it,
            # and resumes like any other; unless it is later than Redis' clock
            newest = self.store.newest_id(room)
            if id_order(since) > id_order(newest) and not self.store.keep_ids_after(room, since):
                raise validation.ValidationError(
                    "invalid_cursor", f"since is after the newest message of {room} ({newest}) "
                                      "and later than any message could be: join without it")
        rejoining = room in conn.rooms
        # this worker hears the room's channel, and the connection is a member, before the
        # history is read: nothing falls in between
        self.server.manager.hold(room)
        self.enter_room(sid, room)
        try:
            pipe = self.services.redis.pipeline(transaction=False)  # one round trip for a join
            read_history = self.store.join_history(pipe, room, since)
            read_presence = self.presence.join(pipe, sid, room, self.config.members_page)
            self.store.touch_room(pipe, room, time.time())
            with self.metrics.redis_timer("join"):
                # the lobby's record may fail at Redis' memory bound: the join still counts
                history_reply, presence_reply, *_ = pipe.execute(raise_on_error=False)
            for reply in (history_reply, presence_reply):
                if isinstance(reply, Exception):
                    raise reply
            history, missed_more = read_history(history_reply)
            gone, members = read_presence(presence_reply)
        except Exception:
            if not rejoining:  # all or nothing: no deliveries to a connection that is not a member
                self.leave_room(sid, room)
            raise
        # the delivery cursor is always an id read from Redis, never the client's
        self.server.manager.remember_delivered(
            room, newest if since is not None else history[-1]["id"] if history else "0-0")
        self.metrics.joins.inc()
        log.info("join", extra={"sid": sid, "user": conn.user, "room": room})
        self._announce_leaves(room, [], gone, members.online)
        page = members.page()
        return {"ok": True, "room": room, "history": history, "missed_more": missed_more,
                "members": page["members"], "online": page["online"],
                "members_next": page["next"], "worker": self.config.worker_id}

    @acknowledged
    def on_leave(self, sid, data):
        room = validation.room(data.get("room"))
        if room not in self._connection(sid).rooms:
            raise validation.ValidationError("not_member", f"you have not joined {room}")
        self.leave_room(sid, room)
        left, gone, online = self.presence.leave(sid, room)
        self._announce_leaves(room, [self._connection(sid).user] if left else [], gone, online)
        return {"ok": True}

    @acknowledged
    def on_message(self, sid, data):
        self._check_load()
        room = validation.room(data.get("room"))
        text = validation.text(data.get("text"), self.config.max_text)
        client_id = validation.client_id(data.get("client_id"))
        conn = self._member(sid, room)
        self.metrics.received.inc()
        message_id, stored = self.store.append(room, conn.user, text, client_id)
        if stored:
            self.metrics.stored.inc()
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
    def on_members(self, sid, data):
        room = validation.room(data.get("room"))
        after = validation.user_cursor(data.get("after"))
        limit = validation.limit(data.get("limit"), self.config.members_page,
                                 self.config.members_page)
        self._member(sid, room)
        return {"ok": True, **self.presence.members(room, after or "", limit).page()}

    @acknowledged
    def on_typing(self, sid, data):
        self._check_load()
        room = validation.room(data.get("room"))
        conn = self._member(sid, room)
        self.server.manager.emit_to_room(
            "typing", {"room": room, "user": conn.user.name, "user_id": conn.user.id},
            room, skip_sid=sid)
        return {"ok": True}

    def drain(self):
        """Close every connection so its client reconnects elsewhere; wait for handlers."""
        self.services.draining = True
        for eio_socket in list(self.server.eio.sockets.values()):
            # no CLOSE packet: clients see a lost transport and reconnect by themselves
            eio_socket.close(wait=False, abort=True)
        deadline = time.monotonic() + self.config.drain_timeout
        while self.in_flight and time.monotonic() < deadline:
            gevent.sleep(0.05)
        self.metrics.flush()
        return self.in_flight

    def _check_rate(self, sid):
        bucket = self.buckets.get(sid)
        if bucket is None or bucket.allow(time.monotonic()):
            return
        if bucket.refused_in_a_row >= self.config.rate_disconnect_after:
            log.warning("disconnecting: %d events over the rate limit in a row",
                        bucket.refused_in_a_row, extra={"sid": sid})
            self.metrics.rate_limit_disconnects.inc()
            self.disconnect(sid)
        raise validation.ValidationError(
            "rate_limited", f"slow down: at most {self.config.rate_limit:g} events per second")

    def _check_load(self):
        if self.lag.busy:
            raise validation.ValidationError(
                "busy", "the server is at capacity: send again in a moment with the same "
                        "client_id")

    def _refuse(self, code, detail):
        self.metrics.error_ack(code)
        return {"ok": False, "error": code, "detail": detail}

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

    def start_background(self):
        """Start what runs beside the handlers: the Redis listener, the presence heartbeat, the
        metrics' flush and the measure of the loop's lag."""
        self.server.start_manager()
        self.presence.start_heartbeat(self._on_heartbeat)
        self.metrics.start_flushing()
        self.lag.start()

    def _on_heartbeat(self, gone):
        for room, (users, online) in gone.items():
            self._announce_leaves(room, users, [], online)
        self.metrics.rooms.set(len({room for conn in self.presence.local.values()
                                    for room in conn.rooms}))

    def _announce_leaves(self, room, left, gone, online):
        """Tell the room who left: by name while its users, those who left included, fit in
        one page of members; by the count beyond it (presence.Presence)."""
        users = [*left, *gone]
        if not users:
            return
        if online + len(users) > self.config.members_page:
            self.server.manager.emit_to_room("online", {"room": room, "online": online}, room)
            return
        for user in users:
            self.server.manager.emit_to_room(
                "presence", {"room": room, "user": user.name, "user_id": user.id,
                             "state": "leave"}, room)

"""Our client manager: python-socketio's RedisManager, delivering each room's messages only to
the workers with members there, in order, whatever Redis loses of its pub/sub.

A worker subscribes to a room's channel while it has members in it (subscriptions.py), so a
message costs each worker that has no member in its room nothing. Redis pub/sub forgets what
it publishes while a listener is away (a restart, a dropped connection, a failover, a slot
moving), but stored messages are in the room's stream: each time a room's channel is
subscribed again, the worker replays what came after the last message it delivered there,
and live messages it has already delivered are then skipped. A replay that fails (Redis still
flapping) leaves the room with a gap: its live messages are then read from the stream too,
and the gap is retried until it is filled, so no message is ever skipped. Members of a room
see each message once, in stream order, without reconnecting.

With Sentinel the listener must also be on the master: after a failover the old master, if it
lives, still holds the subscription but hears nothing the new master publishes. So the
listener subscribes again, and replays, as soon as Sentinel names another master, and /readyz
fails while it is elsewhere.
"""
import logging

import gevent
import gevent.lock
import redis
import socketio

from ..store import STORE_HOST_ID, id_order
from . import redis_client
from .sentinel import SentinelPool
from .subscriptions import PROBE_EVERY, Subscriptions, publish_to_all

log = logging.getLogger(__name__)

REPLAY_PAGE = 500
COUNT_EVERY = 1.0  # seconds at least between two `online` counts of a room to its members here
GAP_RETRY_FIRST, GAP_RETRY_MAX = 0.5, 5.0  # seconds between attempts to fill a room's gap
# python-socketio's messages between workers, by method (PubSubManager._thread's dispatch)
CONTROL_METHODS = ("emit", "disconnect", "enter_room", "leave_room", "close_room")


class PooledRedisManager(socketio.RedisManager):
    """python-socketio's RedisManager on a client from redis_client: any REDIS_URL, one policy.

    python-socketio's own client has redis-py's default pool, which refuses the 101st
    concurrent publish (a mass disconnect announcing its leaves), none of our timeouts, and no
    cluster. It publishes on the classic channel, where every worker listens.
    """

    def __init__(self, url, channel, pool_size, write_only=False):
        super().__init__(url, channel=channel, write_only=write_only)
        self.redis = redis_client(url, pool_size)

    def _publish(self, data):
        """Publish `data` to every worker; return how many heard it, None if Redis did not."""
        for attempt in range(2):  # a pooled connection may have died with a restarted Redis
            try:
                return publish_to_all(self.redis, self.channel, self.json.dumps(data))
            except redis.RedisError as exc:
                log.error("cannot publish to Redis%s: %s", "" if attempt else ", retrying", exc)
        return None


class ChatRedisManager(PooledRedisManager):
    """RedisManager that tracks the last stored message delivered per room and fills gaps."""

    def __init__(self, url, channel, store, metrics, pool_size):
        super().__init__(url, channel, pool_size)
        self.store = store
        self.metrics = metrics
        self.last_delivered = {}
        self.gaps = set()  # rooms whose stream must be read before any live message is delivered
        self.filling = gevent.lock.Semaphore()  # one greenlet at a time reads a room's gap
        self.gap_filler = None
        self.counts = {}  # room -> the latest `online` emit not yet sent to its members here
        self.subscriptions = Subscriptions(self, self.redis, store.keys, self.host_id, channel)

    def initialize(self):
        super().initialize()
        for pool in {getattr(client, "connection_pool", None)
                     for client in (self.redis, self.store.redis)}:
            if isinstance(pool, SentinelPool):
                pool.watch.start()
        if isinstance(getattr(self.redis, "connection_pool", None), SentinelPool):
            self.redis.connection_pool.watch.on_switch.append(self._master_switched)

    def _thread(self):
        """Start the listeners (greenlets of their own), then keep checking they are on the
        master Sentinel names."""
        self.subscriptions.start()
        while True:
            gevent.sleep(PROBE_EVERY)
            self._check_on_master()

    def listening(self):
        """Whether every listener is on its master and hears its probe."""
        return self.subscriptions.listening() and self._on_master()

    def hold(self, room):
        """Subscribe to a room's channel before a member joins it (subscriptions.Subscriptions)."""
        self.subscriptions.hold(room)

    def emit_to_room(self, event, data, room, skip_sid=None):
        """Emit to a room's members on every worker, on the room's channel only."""
        message = {"method": "emit", "event": event, "data": [data], "namespace": "/",
                   "room": room, "skip_sid": skip_sid, "host_id": self.host_id}
        self._handle_emit(message)
        try:
            self.redis.spublish(self.store.keys.room_channel(room), self.json.dumps(message))
        except redis.RedisError as exc:
            log.warning("cannot publish %s to %s's other workers: %s", event, room, exc)

    def received(self, data):
        """Act on a message a listener heard, as python-socketio's listener does."""
        self.metrics.pubsub_messages.inc()
        try:
            message = self.json.loads(data)
        except ValueError:
            return
        if not isinstance(message, dict) or message.get("method") is None:
            return
        try:
            if message["method"] == "callback":
                self._handle_callback(message)
            elif message.get("host_id") != self.host_id and message["method"] in CONTROL_METHODS:
                getattr(self, f"_handle_{message['method']}")(message)
        except Exception:
            log.exception("cannot handle a %s message from Redis", message["method"])

    def subscribed(self, room):
        """A room's channel is subscribed again: deliver what this worker missed meanwhile."""
        with self.filling:
            self._fill(room)

    def has_members(self, room):
        return bool(self.rooms.get("/", {}).get(room))

    def forget(self, room):
        """The room's channel is dropped: its cursor and gap go with it."""
        self.last_delivered.pop(room, None)
        self.gaps.discard(room)

    def lost(self):
        self.metrics.resubscribes.inc()

    def _master_switched(self, address):
        self._check_on_master()

    def _master(self):
        return getattr(getattr(self.redis, "connection_pool", None), "master_address", None)

    def _on_master(self):
        master = self._master()
        return master is None or all(listener.address() in (None, master)
                                     for listener in self.subscriptions.listeners.values())

    def _check_on_master(self):
        """Subscribe again on the master Sentinel names if a listener is elsewhere; rooms are
        then replayed there."""
        master = self._master()
        if master is None:
            return
        for listener in self.subscriptions.listeners.values():
            address = listener.address()
            if address is not None and address != master:
                log.warning("the pub/sub listener is on %s:%s, the master is %s:%s: "
                            "subscribing again", *address, *master)
                listener.restart()

    def _handle_emit(self, message):
        if message.get("host_id") == STORE_HOST_ID:
            if message["room"] in self.gaps:
                with self.filling:  # the stream holds this message too, after the gap
                    self._fill(message["room"])
                return
            self._deliver_stored(message)
            return
        if message.get("event") == "online":
            self._count_later(message)
            return
        super()._handle_emit(message)

    def _count_later(self, message):
        """Send a large room's count to its members here once COUNT_EVERY has passed, the
        latest of the counts heard meanwhile: a crowd joining costs each member one event a
        second, not one a join."""
        room = message["room"]
        if room not in self.counts:
            gevent.spawn_later(COUNT_EVERY, self._send_count, room)
        self.counts[room] = message

    def _send_count(self, room):
        message = self.counts.pop(room, None)
        if message is not None and self.has_members(room):
            # a joiner's count skips the joiner; the latest count goes to every member
            super()._handle_emit({**message, "skip_sid": None})

    def _deliver_stored(self, message):
        if self._first_delivery(message):
            self.metrics.deliveries.inc(len(self.rooms["/"][message["room"]]))
            super()._handle_emit(message)

    def remember_delivered(self, room, message_id):
        """Start tracking a room this worker just joined, from the last message it read."""
        self.last_delivered.setdefault(room, message_id)

    def _first_delivery(self, message):
        stored = message["data"][0]
        room = stored["room"]
        if not self.has_members(room):
            self.last_delivered.pop(room, None)
            return False
        last = self.last_delivered.get(room)
        if last is not None and id_order(stored["id"]) <= id_order(last):
            return False
        self.last_delivered[room] = stored["id"]
        return True

    def _fill(self, room):
        """Deliver what the room's stream holds after this worker's cursor, or keep it a gap."""
        if not self.has_members(room) or room not in self.last_delivered:
            self.last_delivered.pop(room, None)
            self.gaps.discard(room)
            return
        replayed = 0
        try:
            while True:
                page = self.store.history(room, after=self.last_delivered[room], limit=REPLAY_PAGE)
                if not page and not replayed:  # the cursor may be a message its master lost
                    self.store.keep_ids_after(room, self.last_delivered[room],
                                              read_from_redis=True)
                for stored in page:
                    self._deliver_stored(envelope(stored))
                replayed += len(page)
                if len(page) < REPLAY_PAGE:
                    break
        except Exception as exc:
            log.warning("could not replay missed messages of %s yet, retrying: %s", room, exc)
            self.gaps.add(room)
            if self.gap_filler is None:
                self.gap_filler = gevent.spawn(self._fill_gaps)
            return
        finally:
            if replayed:
                log.warning("replayed %d messages of %s missed while unsubscribed", replayed, room)
        self.gaps.discard(room)

    def _fill_gaps(self):
        delay = GAP_RETRY_FIRST
        while self.gaps:
            gevent.sleep(delay)
            for room in list(self.gaps):
                with self.filling:
                    if room in self.gaps:
                        self._fill(room)
            delay = min(delay * 2, GAP_RETRY_MAX)
        self.gap_filler = None


def envelope(stored):
    """Return the pub/sub message that delivers a stored message to its room."""
    return {"method": "emit", "event": "message", "data": [stored], "namespace": "/",
            "room": stored["room"], "host_id": STORE_HOST_ID}

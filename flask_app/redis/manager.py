"""Our client manager: python-socketio's RedisManager, with delivery that survives lost pub/sub.

Redis pub/sub forgets what it publishes while a listener is away (a Redis restart, a dropped
connection). Stored messages are in the room's stream, though, so after every (re)subscription
the worker replays, for each room it has members in, what came after the last message it
delivered there; live messages it has already delivered are then skipped. A replay that fails
(Redis still flapping) leaves the room with a gap: its live messages are then read from the
stream too, and the gap is retried until it is filled, so no message is ever skipped. Members of
a room see each message once, in stream order, without reconnecting.

The listener also pings Redis through its own subscription, so /readyz can tell a worker that
hears Redis from one whose listener is still reconnecting. With Sentinel, it must also listen
on the master: after a failover the old master, if it lives, still holds the subscription but
hears nothing the new master publishes. So the listener subscribes again, and replays, as soon
as Sentinel names another master, and /readyz fails while it is elsewhere.
"""
import logging
import time

import gevent
import gevent.event
import gevent.lock
import socketio

from ..store import STORE_HOST_ID, id_order
from . import redis_client
from .sentinel import SentinelPool

log = logging.getLogger(__name__)

REPLAY_PAGE = 500
GAP_RETRY_FIRST, GAP_RETRY_MAX = 0.5, 5.0  # seconds between attempts to fill a room's gap
# The listener pings Redis through its own subscription; a worker whose listener has not
# heard a pong for PONG_LIMIT seconds is not ready.
PING_EVERY = 2
PONG_LIMIT = 5
# seconds between attempts to subscribe again (python-socketio's own: 1 doubling up to 60)
LISTEN_RETRY_FIRST, LISTEN_RETRY_MAX = 0.5, 5.0


class PooledRedisManager(socketio.RedisManager):
    """python-socketio's RedisManager on a client from redis_client: any REDIS_URL, one policy.

    python-socketio's own client has redis-py's default pool, which refuses the 101st
    concurrent publish (a mass disconnect announcing its leaves), and none of our timeouts.
    """

    def __init__(self, url, channel, pool_size, write_only=False):
        super().__init__(url, channel=channel, write_only=write_only)
        self.redis = redis_client(url, pool_size)
        self.master_changed = gevent.event.Event()

    def _redis_connect(self):
        """Give the listener a fresh subscription; a publish that failed needs nothing new.

        python-socketio calls this from its listener (`self.thread`, the greenlet its
        initialize() started) before it subscribes again, and from a publish that failed
        before it retries. The pool replaces a broken connection by itself; closing the
        subscription under the listener because a publish timed out would only make it
        resubscribe and replay.
        """
        if not self.write_only and gevent.getcurrent() is getattr(self, "thread", None):
            if self.pubsub is not None:
                self.pubsub.close()
            # keep the subscribe confirmations: each one marks a (re)subscription
            self.pubsub = self.redis.pubsub()
        self.connected = True

    def _subscribed_messages(self):
        """Yield every message of the subscription, subscribing again when it fails.

        Again at once when Sentinel names a new master, else after LISTEN_RETRY_FIRST seconds,
        doubling up to LISTEN_RETRY_MAX: a failover takes seconds, and each second without
        a subscription is a second of messages this worker's members wait for.
        """
        delay = LISTEN_RETRY_FIRST
        while True:
            try:
                self._redis_connect()
                self.pubsub.subscribe(self.channel)
                delay = LISTEN_RETRY_FIRST
                yield from self.pubsub.listen()
            except Exception as exc:
                log.warning("cannot receive from Redis, subscribing again within %.1f s: %s",
                            delay, exc)
            if self.master_changed.wait(delay):
                self.master_changed.clear()
            else:
                delay = min(delay * 2, LISTEN_RETRY_MAX)


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
        self.last_pong = None
        self.on_master = False
        self.subscriptions = 0

    def initialize(self):
        super().initialize()
        for pool in {self.redis.connection_pool, self.store.redis.connection_pool}:
            if isinstance(pool, SentinelPool):
                pool.watch.start()
        if isinstance(self.redis.connection_pool, SentinelPool):
            self.redis.connection_pool.watch.on_switch.append(self._master_switched)
        gevent.spawn(self._ping_forever)

    def listening(self):
        """Whether the pub/sub listener is on the master and has heard from it lately."""
        return (self.on_master and self.last_pong is not None
                and time.monotonic() - self.last_pong < PONG_LIMIT)

    def _ping_forever(self):
        while True:
            gevent.sleep(PING_EVERY)
            self._check_on_master()
            try:
                self.pubsub.ping()
            except Exception:
                pass  # the listener reconnects; until then no pong arrives

    def _master_switched(self, address):
        self.master_changed.set()
        self._check_on_master()

    def _listener_address(self):
        connection = self.pubsub.connection if self.pubsub is not None else None
        return None if connection is None else (connection.host, connection.port)

    def _check_on_master(self):
        """Drop the subscription if it is not on the master Sentinel names; the listener then
        subscribes again there and replays what its members missed."""
        master = getattr(self.redis.connection_pool, "master_address", None)
        listener = self._listener_address()
        if master is None or listener is None or listener == master:
            return
        if self.on_master:
            log.warning("the pub/sub listener is on %s:%s, the master is %s:%s: "
                        "subscribing again", *listener, *master)
        self.on_master = False
        self.pubsub.connection.disconnect()

    def _listen(self):
        channel = self.channel.encode()
        for message in self._subscribed_messages():
            if message["type"] == "subscribe":
                master = getattr(self.redis.connection_pool, "master_address", None)
                self.on_master = master is None or self._listener_address() == master
                self.last_pong = time.monotonic()
                self.subscriptions += 1
                if self.subscriptions > 1:
                    self.metrics.resubscribes.inc()
                self._replay_missed()
            elif message["type"] == "pong":
                self.last_pong = time.monotonic()
            elif message["type"] == "message" and message["channel"] == channel:
                yield message["data"]

    def _handle_emit(self, message):
        if message.get("host_id") == STORE_HOST_ID:
            if message["room"] in self.gaps:
                with self.filling:  # the stream holds this message too, after the gap
                    self._fill(message["room"])
                return
            self._deliver_stored(message)
            return
        super()._handle_emit(message)

    def _deliver_stored(self, message):
        if self._first_delivery(message):
            self.metrics.deliveries.inc(len(self.rooms["/"][message["room"]]))
            super()._handle_emit(message)

    def remember_delivered(self, room, message_id):
        """Start tracking a room this worker just joined, from the last message it read."""
        self.last_delivered.setdefault(room, message_id)

    def _has_members(self, room):
        return bool(self.rooms.get("/", {}).get(room))

    def _first_delivery(self, message):
        stored = message["data"][0]
        room = stored["room"]
        if not self._has_members(room):
            self.last_delivered.pop(room, None)
            return False
        last = self.last_delivered.get(room)
        if last is not None and id_order(stored["id"]) <= id_order(last):
            return False
        self.last_delivered[room] = stored["id"]
        return True

    def _replay_missed(self):
        for room in list(self.last_delivered):
            with self.filling:
                self._fill(room)

    def _fill(self, room):
        """Deliver what the room's stream holds after this worker's cursor, or keep it a gap."""
        if not self._has_members(room) or room not in self.last_delivered:
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

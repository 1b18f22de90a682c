"""Room-sharded pub/sub: a worker hears only the rooms it has members in.

Each room has a shard channel in its stream's slot (keys.room_channel). A worker subscribes to
it (SSUBSCRIBE) while the room has members here, and drops it UNSUBSCRIBE_GRACE seconds after
the last one left. A Listener, one pub/sub connection to one Redis node, holds the channels of
the rooms that node serves: one listener with a single Redis or Sentinel, one per master with a
cluster, so a node that fails stalls only its own rooms (redis-py's ClusterPubSub reads its
nodes in turn from one loop, each read with a timeout: one node that does not answer delays
every other node's messages). Traffic for every worker (python-
socketio's control messages, announcements to all, emitters outside the workers) stays on the
classic channel, which one listener subscribes to.

A listener subscribes again to everything it holds after any loss: its connection failing,
the server taking a channel away (SUNSUBSCRIBE, after a failover or a slot migration), or its
probe not coming back: every PROBE_EVERY seconds it publishes on a channel of its own, through
the pool like any message, and a listener that has not heard a probe Redis took PROBE_LIMIT
seconds ago (while Redis took later ones), or whose probe Redis says nobody heard, has
silently stopped listening. Before subscribing again on a cluster, the slot map is read
anew and each room goes to the listener of its slot's master. The manager replays every room
subscribed again from its cursor. A Redis that stops answering (stalled, unreachable) is
not a lost subscription: its probes are not taken, and the listener keeps its subscription
until the connection itself fails.
"""
import collections
import logging
import time

import gevent
import gevent.event
import redis
import redis.client
from redis._parsers.hiredis import NOT_ENOUGH_DATA

from .pool import COMMAND_TIMEOUT

log = logging.getLogger(__name__)

UNSUBSCRIBE_GRACE = 2.0  # seconds a room without members here stays subscribed
PROBE_EVERY = 2.0
PROBE_LIMIT = 5.0
RETRY_FIRST, RETRY_MAX = 0.5, 5.0  # seconds between attempts to subscribe again
MESSAGE_KINDS = {b"smessage": "smessage", b"message": "message"}


class ListenerPubSub(redis.client.PubSub):
    """redis-py's PubSub, not subscribing again by itself when its connection reconnects.

    redis-py reconnects a pub/sub connection that failed, and subscribes it again to every
    shard channel in one SSUBSCRIBE, which a cluster node refuses (CROSSSLOT) when they span
    slots; the error comes after it anyway. The Listener subscribes again itself, one channel
    a command, on the node the slot map names.
    """

    def on_connect(self, connection):
        pass

    def replies(self):
        """Yield (kind, channel, data) of each reply on the connection, as hiredis parses it.

        redis-py's listen() costs each message a health check, a retry wrapper, a dict and a
        metrics record, an eighth of a busy worker; one read from the socket here may bring
        many messages, each costing a parse. Confirmations still go through handle_message,
        which keeps redis-py's record of the channels. Like listen()'s, the read has no
        timeout: an idle subscription is not a failure.
        """
        parser = self.connection._parser
        while True:
            reader = parser._reader
            if reader is None:
                raise redis.ConnectionError("the subscription's connection is closed")
            reply = reader.gets()
            if reply is NOT_ENOUGH_DATA:
                parser.read_from_socket(timeout=None)
            elif isinstance(reply, Exception):
                raise reply
            elif reply[0] in MESSAGE_KINDS:
                yield MESSAGE_KINDS[reply[0]], reply[1], reply[2]
            else:
                message = self.handle_message(reply)
                yield message["type"], message["channel"], message["data"]


class Listener:
    """One pub/sub connection to one Redis node and the room channels it holds."""

    def __init__(self, subscriptions, node, client, probe_channel, global_channel=None):
        self.subscriptions = subscriptions
        self.node = node  # a name, for logs and the slot map
        self.client = client
        self.probe_channel = probe_channel
        self.global_channel = global_channel
        self.channels = {}  # channel -> room, the rooms this listener holds
        self.confirmed = {}  # room -> Event set once its subscription is confirmed
        self.leaving = {}  # channel -> SUNSUBSCRIBEs sent and not yet confirmed
        self.pubsub = None
        self.heard = None  # when a probe last came back (time.monotonic())
        self.probes = 0  # probes published, each carrying its number
        self.unheard = collections.deque()  # (number, when Redis took it) of probes not heard
        self.reachable = True  # whether Redis took the last probe
        self.probing = None  # the greenlet publishing a probe
        self.wake = gevent.event.Event()
        self.stopped = False
        self.task = gevent.spawn(self._run)

    def hold(self, room, channel):
        """Subscribe to a room's channel; return the Event set once Redis confirms it."""
        confirmed = self.confirmed.setdefault(room, gevent.event.Event())
        if channel not in self.channels:
            self.channels[channel] = room
            self._send(self.pubsub, "ssubscribe", channel)
        return confirmed

    def release(self, channel):
        """Stop holding a room's channel."""
        room = self.channels.pop(channel, None)
        self.confirmed.pop(room, None)
        if self.pubsub is not None and self.pubsub.connection is not None:
            self.leaving[channel] = self.leaving.get(channel, 0) + 1
            self._send(self.pubsub, "sunsubscribe", channel)

    def listening(self):
        """Whether a probe came back lately, or the node takes none (down, or failing over:
        then every worker is as far from it, and the other nodes' rooms go on)."""
        return self.hears() or not self.reachable

    def hears(self):
        return self.heard is not None and time.monotonic() - self.heard < PROBE_LIMIT

    def probe(self):
        """Publish a numbered probe; start again if Redis took one that never came back while
        it kept taking later ones, or says nobody listens where this listener thinks it does.

        A probe Redis took just before it stalled comes back when it resumes, with the
        probes after it: the listener starts again only once a later probe was taken a full
        round ago and the first still has not come back.
        """
        now = time.monotonic()
        if len(self.unheard) >= 2 and now - self.unheard[0][1] > PROBE_LIMIT \
                and now - self.unheard[1][1] >= PROBE_EVERY:
            log.warning("the subscription on %s has not heard a probe Redis took %.0f s ago: "
                        "subscribing again", self.node, now - self.unheard[0][1])
            self.restart()
            return
        self.probes += 1
        try:
            heard_by = self.client.spublish(self.probe_channel, str(self.probes))
        except redis.exceptions.MovedError:
            self.restart()  # the probe's slot, and perhaps others, moved to another master
            return
        except redis.RedisError:
            # a node that does not answer stops the listener's reads too; on a cluster its
            # slots may have another master by now
            self.reachable = False
            self.subscriptions.unreachable(self)
            return
        self.reachable = True
        if heard_by == 0 and self.heard is not None:
            log.warning("Redis node %s has no subscription of this listener: subscribing again",
                        self.node)
            self.restart()
        else:
            self.unheard.append((self.probes, time.monotonic()))

    def restart(self):
        """Drop the connection; the listener subscribes again (and reads the slot map)."""
        self.heard = None
        self.unheard.clear()
        connection = self.pubsub.connection if self.pubsub is not None else None
        if connection is not None:
            connection.disconnect()
        self.wake.set()

    def stop(self):
        self.stopped = True
        self.restart()
        self.task.kill(block=False)

    def address(self):
        connection = self.pubsub.connection if self.pubsub is not None else None
        return None if connection is None else (connection.host, connection.port)

    def _send(self, pubsub, command, channel):
        if pubsub is None or pubsub.connection is None:
            return  # not connected: the next subscription includes it
        try:
            getattr(pubsub, command)(channel)
        except (redis.RedisError, OSError) as exc:
            log.info("cannot %s %s on %s yet: %s", command, channel, self.node, exc)
            self.restart()

    def _run(self):
        delay = RETRY_FIRST
        while not self.stopped:
            try:
                self._subscribe()
                delay = RETRY_FIRST
                for kind, channel, data in self.pubsub.replies():
                    self._handle(kind, channel, data)
            except Exception as exc:
                if self.stopped:
                    return
                log.warning("cannot receive from Redis node %s, subscribing again within "
                            "%.1f s: %s", self.node, delay, exc)
            self._lose()
            if self.wake.wait(delay):
                self.wake.clear()
            else:
                delay = min(delay * 2, RETRY_MAX)
            if not self.stopped:
                self.subscriptions.lost(self)

    def _subscribe(self):
        self.pubsub = pubsub = ListenerPubSub(self.client.connection_pool)
        pubsub.ssubscribe(self.probe_channel)
        if self.global_channel is not None:
            pubsub.subscribe(self.global_channel)
        for channel in list(self.channels):  # in one SSUBSCRIBE each: a cluster refuses
            pubsub.ssubscribe(channel)       # channels of several slots in one

    def _heard(self, number):
        self.heard = time.monotonic()
        while self.unheard and self.unheard[0][0] <= number:
            self.unheard.popleft()

    def _lose(self):
        self.heard = None
        self.unheard.clear()
        self.leaving.clear()
        for confirmed in self.confirmed.values():
            confirmed.clear()
        if self.pubsub is not None:
            self.pubsub.close()
            self.pubsub = None

    def _handle(self, kind, channel, data):
        if kind in MESSAGE_KINDS.values():
            if channel == self.probe_channel:
                self._heard(int(data or 0))
            else:
                self.subscriptions.received(data)
        elif kind == "ssubscribe":
            if channel == self.probe_channel:
                self.heard = time.monotonic()
                return
            room = self.channels.get(channel)
            if room is not None and room in self.confirmed:
                self.confirmed[room].set()
                self.subscriptions.subscribed(room)
        elif kind == "sunsubscribe":
            if self.leaving.get(channel):
                self.leaving[channel] -= 1
                return
            # the server took the channel away: its slot has another master now
            raise redis.ConnectionError(f"Redis node {self.node} dropped the subscription to "
                                        f"{channel.decode(errors='replace')}")


class Subscriptions:
    """Which listener holds each room's channel, following the cluster's slot map.

    `manager` receives what the listeners hear (`received`) and the rooms they subscribed
    again (`subscribed`). With a single Redis or Sentinel there is one node.
    """

    def __init__(self, manager, client, keys, listener_id, channel):
        self.manager = manager
        self.redis = client
        self.keys = keys
        self.listener_id = listener_id
        self.channel = channel
        self.cluster = isinstance(client, redis.RedisCluster)
        self.listeners = {}  # node name -> Listener
        self.rooms = {}  # room -> its Listener
        self.empty_since = {}  # room -> when it was last seen without members here
        self.rebalancing = None

    def start(self):
        self._place_listeners()
        gevent.spawn(self._tend_forever)

    def hold(self, room):
        """Subscribe to a room's channel; wait until Redis confirms it, or raise a RedisError.

        What is stored after the confirmation reaches this worker: a joiner reads history
        after this returns, so nothing falls in between.
        """
        self.empty_since.pop(room, None)
        listener = self.rooms.get(room)
        if listener is None:
            listener = self.rooms[room] = self._listener_of(self._channel(room))
        confirmed = listener.hold(room, self._channel(room))
        if not confirmed.wait(COMMAND_TIMEOUT):
            raise redis.TimeoutError(f"Redis did not confirm the subscription to {room} "
                                     f"within {COMMAND_TIMEOUT} s")

    def listening(self):
        """Whether every listener hears its probe, but for those of nodes that take none, and
        one at least does."""
        listeners = list(self.listeners.values())
        return (all(listener.listening() for listener in listeners)
                and any(listener.hears() for listener in listeners))

    def received(self, data):
        self.manager.received(data)

    def subscribed(self, room):
        self.manager.subscribed(room)

    def lost(self, listener):
        """A listener lost its connection: on a cluster, read the slot map and move rooms."""
        self.manager.lost()
        self.unreachable(listener)

    def unreachable(self, listener):
        """A listener's node does not answer (a lost host drops packets: its connection may
        never fail): on a cluster, read the slot map, and move the rooms of a master replaced."""
        if self.cluster and self.rebalancing is None:
            self.rebalancing = gevent.spawn(self._rebalance)

    def _rebalance(self):
        try:
            self.redis.nodes_manager.initialize()
            self._place_listeners()
        except (redis.RedisError, redis.exceptions.RedisClusterException) as exc:
            log.warning("cannot read the cluster's slot map yet: %s", exc)
        finally:
            self.rebalancing = None

    def _place_listeners(self):
        """One listener per master; each room on the listener of its slot's master."""
        masters = ({node.name: node for node in self.redis.get_primaries()} if self.cluster
                   else {"redis": None})
        for name in list(self.listeners):
            if name not in masters:
                log.warning("Redis node %s is no longer a master: moving its rooms", name)
                self.listeners.pop(name).stop()
        global_node = self._node_name(self.channel)
        for name, node in masters.items():
            listener = self.listeners.get(name)
            if listener is not None and (listener.global_channel is not None) == (
                    name == global_node):
                continue
            if listener is not None:
                listener.stop()
            client = node.redis_connection if node is not None else self.redis
            self.listeners[name] = Listener(
                self, name, client, self._probe_channel(name),
                self.channel if name == global_node else None)
        for room, listener in list(self.rooms.items()):
            placed = self._listener_of(self._channel(room))
            if placed is not listener:
                if not listener.stopped:
                    listener.release(self._channel(room))
                self.rooms[room] = placed
                placed.hold(room, self._channel(room))

    def _channel(self, room):
        return self.keys.room_channel(room).encode()

    def _node_name(self, key):
        return self.redis.get_node_from_key(key).name if self.cluster else "redis"

    def _listener_of(self, channel):
        return self.listeners[self._node_name(channel)]

    def _probe_channel(self, node):
        """A channel of this worker's in a slot that `node` serves."""
        for tag in range(100_000):
            channel = self.keys.probe_channel(tag, self.listener_id)
            if self._node_name(channel) == node:
                return channel.encode()
        raise redis.RedisError(f"no slot of Redis node {node} found")

    def _tend_forever(self):
        """Probe every listener, and drop the rooms that have had no members for a while."""
        while True:
            gevent.sleep(PROBE_EVERY)
            for listener in list(self.listeners.values()):
                # each in its own greenlet: a node that stalls holds up only its own probe
                if listener.probing is None or listener.probing.dead:
                    listener.probing = gevent.spawn(listener.probe)
            now = time.monotonic()
            for room in list(self.rooms):
                if self.manager.has_members(room):
                    self.empty_since.pop(room, None)
                elif now - self.empty_since.setdefault(room, now) >= UNSUBSCRIBE_GRACE:
                    self.empty_since.pop(room)
                    self.rooms.pop(room).release(self._channel(room))
                    self.manager.forget(room)


def publish_to_all(client, channel, data):
    """PUBLISH on the classic channel; return how many workers heard it.

    A cluster carries a PUBLISH to every node, but counts only the subscribers of the node it
    was sent to: it goes to the node of the channel's slot, where workers subscribe to it.
    """
    if isinstance(client, redis.RedisCluster):
        client = client.get_node_from_key(channel).redis_connection
    return client.publish(channel, data)

"""Auto-pipelining: the commands handlers issue while a round trip is in flight share the next
one, on one connection, as node-redis does by itself.

Without it every waiting handler draws a pooled connection of its own: a burst of sends
exhausts the pool while Redis is healthy and idle (the sends wait, then are refused), and each
command pays a write, a read and two switches through the hub. A Batcher sends what was queued
as one pipeline as soon as its previous one is answered, so a batch grows with the load and
costs an idle worker nothing but one greenlet switch. With `replicas`, a WAIT ends each batch:
one WAIT covers every write before it on that connection.
"""
import collections
import time

import gevent
import gevent.event
import redis

MAX_BATCH = 256  # commands in one round trip; more wait for the next


class Batch:
    """Commands sent together, and what Redis answered."""

    __slots__ = ("commands", "done", "replies", "replicas", "error")

    def __init__(self):
        self.commands = []
        self.done = gevent.event.Event()
        self.replies = None
        self.replicas = None
        self.error = None


class Batcher:
    """One Redis node's queue of commands, sent a batch at a time by one greenlet."""

    def __init__(self, client, replicas=0, replica_timeout=0, observe=None):
        self.client = client
        self.replicas = replicas
        self.replica_timeout = replica_timeout
        self.observe = observe  # called with each round trip's seconds
        self._queued = collections.deque()
        self._sender = None

    def run(self, *command):
        """Send `command` with the others of its batch; return (its reply, or the error Redis
        answered it with, as a value; how many replicas have the batch's writes, or None
        without `replicas`). A failed connection raises its error in every caller."""
        batch = self._queued[-1] if self._queued else None
        if batch is None or len(batch.commands) >= MAX_BATCH:
            batch = Batch()
            self._queued.append(batch)
        index = len(batch.commands)
        batch.commands.append(command)
        if self._sender is None:
            self._sender = gevent.spawn(self._send_queued)
        batch.done.wait()
        if batch.error is not None:
            raise batch.error
        return batch.replies[index], batch.replicas

    def _send_queued(self):
        try:
            while self._queued:
                batch = self._queued.popleft()
                try:
                    self._send(batch)
                except Exception as exc:  # each caller raises it as its own
                    batch.error = exc
                finally:
                    batch.done.set()
        finally:
            self._sender = None
            for batch in self._queued:  # only if killed: no caller waits forever
                batch.error = RuntimeError("the Redis batch sender stopped")
                batch.done.set()
            self._queued.clear()

    def _send(self, batch):
        """One pipeline on one pooled connection, without redis-py's Pipeline: for the one or
        few commands of a batch, its retry wrapper and bookkeeping cost more than the trip."""
        commands = batch.commands + [("WAIT", self.replicas, self.replica_timeout)] \
            if self.replicas else batch.commands
        pool = self.client.connection_pool
        connection = pool.get_connection()
        started = time.perf_counter()
        try:
            connection.send_packed_command(connection.pack_commands(commands))
            replies = [_reply(connection) for _ in commands]
        except BaseException:
            connection.disconnect()  # replies may be left unread: never reuse it
            raise
        finally:
            pool.release(connection)
        if self.observe is not None:
            self.observe(time.perf_counter() - started)
        if self.replicas:
            replicas = replies.pop()
            if isinstance(replicas, Exception):
                raise replicas
            batch.replicas = replicas
        batch.replies = replies


def _reply(connection):
    """The next reply, or the error Redis answered instead, as a value."""
    try:
        return connection.read_response()
    except redis.ResponseError as exc:
        return exc

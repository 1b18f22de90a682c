"""Prometheus metrics of a worker.

With PROMETHEUS_MULTIPROC_DIR set (deploy/configure sets it to var/metrics), every worker
writes its samples there, and `scalechat serve-metrics` (`serve`) answers a scrape for the
whole host on 127.0.0.1. Workers serve no metrics: their port is the public one.
Gauges count only live workers: a restarted worker removes the files of dead ones. The counts
made once per message reach the scrape within FLUSH_EVERY.
"""
import glob
import os
import re

import gevent
from prometheus_client import (REGISTRY, CollectorRegistry, Counter, Gauge, Histogram,
                               multiprocess, start_http_server)

CONNECTED = Gauge("scalechat_connected_clients", "Socket.IO connections open",
                  ["worker"], multiprocess_mode="livesum")
ROOMS = Gauge("scalechat_rooms", "Rooms with members connected to the worker",
              ["worker"], multiprocess_mode="livesum")
LOOP_LAG = Gauge("scalechat_loop_lag_seconds",
                 "How late the worker's loop ran its last timer: time events wait for a core",
                 ["worker"], multiprocess_mode="livemax")
CONNECTS = Counter("scalechat_connects", "Socket.IO connections accepted", ["worker"])
REFUSED = Counter("scalechat_connects_refused", "Socket.IO connections refused", ["worker"])
JOINS = Counter("scalechat_joins", "Rooms joined", ["worker"])
RECEIVED = Counter("scalechat_messages_received", "message events received from clients",
                   ["worker"])
STORED = Counter("scalechat_messages_stored",
                 "Messages stored and broadcast to their room (retries not counted)", ["worker"])
DELIVERIES = Counter("scalechat_deliveries", "Messages delivered to connections", ["worker"])
ERROR_ACKS = Counter("scalechat_error_acks", "Events answered with an error, by code",
                     ["worker", "error"])
RATE_LIMIT_DISCONNECTS = Counter("scalechat_rate_limit_disconnects",
                                 "Connections closed for exceeding the rate limit", ["worker"])
RESUBSCRIBES = Counter("scalechat_pubsub_resubscribes",
                       "Times a pub/sub listener subscribed again after losing Redis",
                       ["worker"])
PUBSUB_MESSAGES = Counter("scalechat_pubsub_messages",
                          "Pub/sub messages the worker received: its rooms', and those for "
                          "every worker", ["worker"])
HANDLER_SECONDS = Histogram("scalechat_handler_seconds", "Time to handle a client event",
                            ["event"], buckets=(.0005, .001, .0025, .005, .01, .025, .05, .1,
                                                .25, .5, 1, 2.5))
REDIS_SECONDS = Histogram("scalechat_redis_seconds", "Redis round trips by operation",
                          ["operation"], buckets=(.0002, .0005, .001, .0025, .005, .01, .025,
                                                  .05, .1, .25, 1))


FLUSH_EVERY = 1.0  # seconds between two additions of the per-message counts to their samples


class Tally:
    """A counter counted once per message, added to its shared sample every FLUSH_EVERY
    seconds: each update of a multiprocess sample takes a lock and writes to a memory map,
    and a busy worker makes several a message."""

    __slots__ = ("counter", "pending")

    def __init__(self, counter):
        self.counter = counter
        self.pending = 0

    def inc(self, amount=1):
        self.pending += amount

    def flush(self):
        if self.pending:
            self.counter.inc(self.pending)
            self.pending = 0


class WorkerMetrics:
    """The metrics above, bound to this worker's label once rather than on every event."""

    def __init__(self, worker_id):
        self.worker_id = worker_id
        for name, metric in (("connected", CONNECTED), ("rooms", ROOMS), ("loop_lag", LOOP_LAG),
                             ("connects", CONNECTS),
                             ("refused", REFUSED), ("joins", JOINS),
                             ("rate_limit_disconnects", RATE_LIMIT_DISCONNECTS),
                             ("resubscribes", RESUBSCRIBES)):
            setattr(self, name, metric.labels(worker_id))
        self.tallies = []
        for name, metric in (("received", RECEIVED), ("stored", STORED),
                             ("deliveries", DELIVERIES), ("pubsub_messages", PUBSUB_MESSAGES)):
            tally = Tally(metric.labels(worker_id))
            self.tallies.append(tally)
            setattr(self, name, tally)
        self._flushing = None
        self._errors = {}
        self._handlers = {}
        self._redis = {}

    def flush(self):
        """Add the tallies to their samples: the scrape sees them."""
        for tally in self.tallies:
            tally.flush()

    def start_flushing(self):
        """Flush every FLUSH_EVERY seconds in a background greenlet, once."""
        if self._flushing is None:
            self._flushing = gevent.spawn(self._flush_forever)

    def _flush_forever(self):
        while True:
            gevent.sleep(FLUSH_EVERY)
            self.flush()

    def error_ack(self, code):
        counter = self._errors.get(code)
        if counter is None:
            counter = self._errors[code] = ERROR_ACKS.labels(self.worker_id, code)
        counter.inc()

    def handler_seconds(self, event):
        histogram = self._handlers.get(event)
        if histogram is None:
            histogram = self._handlers[event] = HANDLER_SECONDS.labels(event)
        return histogram

    def redis_seconds(self, operation):
        """The histogram of an operation's Redis round trips."""
        histogram = self._redis.get(operation)
        if histogram is None:
            histogram = self._redis[operation] = REDIS_SECONDS.labels(operation)
        return histogram

    def redis_timer(self, operation):
        """Time a Redis round trip: `with metrics.redis_timer("join"): ...`."""
        return self.redis_seconds(operation).time()


def multiprocess_dir():
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR")


def forget_dead_workers():
    """Remove the live-gauge files of worker processes that no longer exist."""
    directory = multiprocess_dir()
    if not directory:
        return
    os.makedirs(directory, exist_ok=True)
    for path in glob.glob(os.path.join(directory, "gauge_live*_*.db")):
        pid = int(re.search(r"_(\d+)\.db$", path).group(1))
        if not os.path.exists(f"/proc/{pid}"):
            multiprocess.mark_process_dead(pid, directory)


def _registry():
    if not multiprocess_dir():
        return REGISTRY
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry)
    return registry


def serve(host, port):
    """Serve the scrape over HTTP in a thread; return (server, thread)."""
    return start_http_server(port, addr=host, registry=_registry())

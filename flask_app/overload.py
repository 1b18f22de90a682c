"""Shedding sends while a worker is past what its core can carry.

A worker that cannot keep up falls behind on every socket at once: events wait in the kernel's
buffers, the loop comes round later and later, and without a bound the wait grows until acks
miss the client's timeout and presence heartbeats lapse. How late a timer fires (the loop's
lag) measures that wait directly. While it exceeds SCALECHAT_SHED_LAG_MS, messages and typing
notices are answered `busy` at once, before any Redis work: a refusal costs a small part of a
message stored and delivered to a room, so the worker catches up, and the client sends again
with the same client_id (nothing was stored). Joins, history and deliveries go on.
"""
import time

import gevent

SAMPLE_EVERY = 0.05  # seconds between two measures of the lag


class LoopLag:
    """How late the worker's loop runs a timer, measured by a greenlet of its own."""

    def __init__(self, limit, gauge=None):
        self.limit = limit  # seconds; 0 sheds nothing
        self.gauge = gauge  # a metric set to each measure
        self.lag = 0.0
        self._task = None

    @property
    def busy(self):
        """Whether sends are to be shed: the last measure was over the limit."""
        return 0 < self.limit < self.lag

    def start(self):
        """Measure in a background greenlet, once."""
        if self._task is None:
            self._task = gevent.spawn(self._measure_forever)

    def _measure_forever(self):
        while True:
            due = time.monotonic() + SAMPLE_EVERY
            gevent.sleep(SAMPLE_EVERY)
            self.lag = max(0.0, time.monotonic() - due)
            if self.gauge is not None:
                self.gauge.set(self.lag)

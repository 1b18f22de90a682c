"""Greenlets that run one short task after another instead of one greenlet per task.

Every new greenlet maps a fresh 16 KB chunk for its Python frames and unmaps it when it
ends (Python 3.11 keeps frames in such chunks): two system calls and a few page faults
for each request and each burst of packets. `Runners.spawn` hands a task to a parked
greenlet when one is free and parks up to `keep` of them between tasks.

A task must not see what the one before it left on its greenlet. Context variables start
empty for each task. What gevent keeps per greenlet is either an attribute of the greenlet
(a `gevent.local`'s values are registered there, and so is the spawn tree a task starts by
spawning; runners' greenlets are plain ones, with no attribute of their own) or a
reference to it (a `gevent.Timeout` still pending, a lock it owns): a greenlet holding
either after its task is not handed another one, which gets a fresh greenlet instead.
"""
import contextvars
import sys

import gevent
from gevent import get_hub, getcurrent
from greenlet import greenlet


class Runners:
    """Spawn tasks on reused greenlets; each task starts with nothing left by the one before."""

    def __init__(self, keep=64):
        self.keep = keep
        self.idle = []

    def spawn(self, func, *args):
        """Run `func(*args)` in a greenlet of its own soon, as gevent.spawn would."""
        if self.idle:
            get_hub().loop.run_callback(self.idle.pop().switch, func, args)
        else:
            self._start(func, args)

    def _start(self, func, args):
        """Start a plain greenlet as a parked one is resumed: both then hold as many references."""
        hub = get_hub()
        hub.loop.run_callback(greenlet(self._run, hub).switch, func, args)

    def _run(self, func, args):
        hub = get_hub()
        me = getcurrent()
        unclaimed = sys.getrefcount(me)  # as it will be when resumed, if nothing else holds it
        while True:
            try:
                contextvars.Context().run(func, *args)
            except gevent.GreenletExit:
                return
            except BaseException:
                hub.handle_error(me, *sys.exc_info())
            func = args = None
            if me.__dict__ or len(self.idle) >= self.keep:  # a gevent.local, a spawn tree...
                return
            self.idle.append(me)
            try:
                func, args = hub.switch()
            except BaseException:  # killed, or a Timeout left by the last task: not reused
                if me in self.idle:
                    self.idle.remove(me)
                raise
            if sys.getrefcount(me) > unclaimed:  # a pending Timeout, a lock held...
                self._start(func, args)
                return

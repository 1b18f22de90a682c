"""Greenlets that run one short task after another instead of one greenlet per task.

Every new greenlet maps a fresh 16 KB chunk for its Python frames and unmaps it when it
ends (Python 3.11 keeps frames in such chunks): two system calls and a few page faults
for each request and each burst of packets. `Runners.spawn` hands a task to a parked
greenlet when one is free and parks up to `keep` of them between tasks.
"""
import contextvars
import sys

import gevent
from gevent import get_hub, getcurrent


class Runners:
    """Spawn tasks on reused greenlets; each task starts with empty context variables."""

    def __init__(self, keep=64):
        self.keep = keep
        self.idle = []

    def spawn(self, func, *args):
        """Run `func(*args)` in a greenlet of its own soon, as gevent.spawn would."""
        if self.idle:
            get_hub().loop.run_callback(self.idle.pop().switch, func, args)
        else:
            gevent.spawn_raw(self._run, func, args)

    def _run(self, func, args):
        hub = get_hub()
        me = getcurrent()
        while True:
            try:
                contextvars.Context().run(func, *args)
            except gevent.GreenletExit:
                return
            except BaseException:
                hub.handle_error(me, *sys.exc_info())
            func = args = None
            if len(self.idle) >= self.keep:
                return
            self.idle.append(me)
            try:
                func, args = hub.switch()
            except BaseException:  # killed while parked: not to be handed a task any more
                if me in self.idle:
                    self.idle.remove(me)
                raise

"""The pool policy every connection to Redis gets, the handlers', the manager's and
`scalechat announce`'s: a connection opens within CONNECT_TIMEOUT, a command that gets no reply
within COMMAND_TIMEOUT fails (a stalled Redis makes a send answer `unavailable` rather than
hang its handler), a connection idle for HEALTH_CHECK_INTERVAL is pinged before reuse, and a
command beyond the pool's size waits up to POOL_TIMEOUT for a free connection. redis-py does
not retry a failed command: the client retries with its client_id, or python-socketio retries
a publish once.

The pub/sub listener reads with no timeout: redis-py's PubSub.listen() lifts the socket's
timeout for its blocking read, so an idle subscription is not torn down every
COMMAND_TIMEOUT seconds; its liveness is the manager's pings (manager.py).
"""
import select

import redis
from gevent import monkey
from redis._parsers import _HiredisParser
from redis.backoff import NoBackoff
from redis.retry import Retry

from .urls import parse_url

CONNECT_TIMEOUT = 2
COMMAND_TIMEOUT = 5
HEALTH_CHECK_INTERVAL = 30
POOL_TIMEOUT = 5

_poll = monkey.get_original("select", "poll")


class Parser(_HiredisParser):
    """hiredis' parser, asking the kernel itself whether a pooled connection has bytes waiting.

    The pool asks this of every connection it hands out: a reply left unread, or the server
    closing it, makes a connection unusable. redis-py asks through select.poll, which gevent
    replaces with one that arms watchers and goes through the hub (12 us, against 0.7 us for
    the system call); a poll with a zero timeout never blocks, so the kernel's own is safe.
    """

    def can_read(self, timeout=0):
        if timeout == 0 and self._sock is not None and self._reader is not None \
                and not self._reader.has_data():
            poller = _poll()
            poller.register(self._sock, select.POLLIN)
            if not poller.poll(0):
                return False
        return super().can_read(timeout)


class BlockingPool(redis.BlockingConnectionPool):
    """redis-py's blocking pool, without the check for deprecated arguments on each draw.

    redis-py 8 wraps get_connection in a decorator that collects and inspects the call's
    arguments every time, about 1% of a worker's CPU when clients connect; none are passed.
    """

    get_connection = getattr(redis.BlockingConnectionPool.get_connection, "__wrapped__",
                             redis.BlockingConnectionPool.get_connection)


def pool_policy():
    """The connection options every client gets, Sentinel's included."""
    return {"socket_connect_timeout": CONNECT_TIMEOUT, "socket_timeout": COMMAND_TIMEOUT,
            "health_check_interval": HEALTH_CHECK_INTERVAL, "retry": Retry(NoBackoff(), 0)}


def blocking_pool(url, size, **options):
    """A pool of at most `size` connections to a direct `url`; a command beyond them waits.

    redis-py's default pool refuses the command past its size instead, which a burst of
    handlers (a mass disconnect, a busy room) reaches.
    """
    return BlockingPool.from_url(parse_url(url), max_connections=size, timeout=POOL_TIMEOUT,
                                 parser_class=Parser, **pool_policy(), **options)

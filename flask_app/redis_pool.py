"""Connections to Redis, for the handlers, the pub/sub manager and `scalechat announce`.

Every REDIS_URL form python-socketio's RedisManager reads is read here, and every client gets
the same pool policy: a connection opens within CONNECT_TIMEOUT, a command that gets no reply
within COMMAND_TIMEOUT fails (a stalled Redis makes a send answer `unavailable` rather than
hang its handler), a connection idle for HEALTH_CHECK_INTERVAL is pinged before reuse, and a
command beyond the pool's size waits up to POOL_TIMEOUT for a free connection. redis-py does
not retry a failed command: the client retries with its client_id, or python-socketio retries
a publish once.

The pub/sub listener reads with no timeout: redis-py's PubSub.listen() lifts the socket's
timeout for its blocking read, so an idle subscription is not torn down every
COMMAND_TIMEOUT seconds; its liveness is the manager's pings (manager.py).
"""
import dataclasses
import select
from urllib.parse import unquote, urlsplit

import redis
import redis.sentinel
from gevent import monkey
from redis._parsers import _HiredisParser
from redis.backoff import NoBackoff
from redis.retry import Retry

CONNECT_TIMEOUT = 2
COMMAND_TIMEOUT = 5
HEALTH_CHECK_INTERVAL = 30
POOL_TIMEOUT = 5

# Valkey speaks Redis' protocol: its URLs name the same connections.
DIRECT_SCHEMES = {"redis": "redis", "rediss": "rediss", "unix": "unix",
                  "valkey": "redis", "valkeys": "rediss"}
SENTINEL_SCHEMES = ("redis+sentinel", "valkey+sentinel")
URL_FORMS = ("redis://, rediss://, unix://, valkey://, valkeys:// or "
             "redis+sentinel://[user:password@]host:port,host:port/db/service")

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


class SentinelPool(redis.sentinel.SentinelConnectionPool, BlockingPool):
    """Sentinel's pool of connections to the current master, blocking as BlockingPool does.

    Sentinel's own pool refuses a command beyond its size, as redis-py's default pool does.
    """


@dataclasses.dataclass(frozen=True)
class SentinelURL:
    """What a redis+sentinel:// URL names: the Sentinels, the service and the master's db."""

    sentinels: tuple
    service: str
    db: int = 0
    username: str = None
    password: str = None


def parse_url(url):
    """Return a SentinelURL, or the redis-py URL of a direct connection; ValueError if neither."""
    scheme = url.partition("://")[0].lower() if "://" in url else ""
    if scheme in SENTINEL_SCHEMES:
        return _parse_sentinel_url(url)
    if scheme not in DIRECT_SCHEMES:
        raise ValueError(f"must start with {URL_FORMS}, got {shown(url)!r}")
    direct = DIRECT_SCHEMES[scheme] + url[len(scheme):]
    try:
        redis.connection.parse_url(direct)
    except ValueError as exc:
        raise ValueError(f"is not a usable URL ({exc}): {shown(url)!r}") from None
    return direct


def _parse_sentinel_url(url):
    """Read python-socketio's form: redis+sentinel://[user:password@]h1:p1,h2:p2/db/service."""
    parts = urlsplit(url)
    credentials, _, hosts = parts.netloc.rpartition("@")
    username, _, password = credentials.partition(":")
    sentinels = []
    for address in hosts.split(","):
        host, _, port = address.rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"lists each Sentinel as host:port, got {address!r} in {shown(url)!r}")
        sentinels.append((host.strip("[]"), int(port)))
    db, _, service = parts.path[1:].partition("/")
    if not service or "/" in service:
        raise ValueError(f"names the service after the db, as in "
                         f"redis+sentinel://h1:26379,h2:26379/0/mymaster; got {shown(url)!r}")
    if db and not db.isdigit():
        raise ValueError(f"has db {db!r}, not a number: {shown(url)!r}")
    return SentinelURL(sentinels=tuple(sentinels), service=unquote(service), db=int(db or 0),
                       username=unquote(username) or None, password=unquote(password) or None)


def shown(url):
    """`url` with its password hidden, to be quoted in an error message or a log."""
    credentials, at, rest = url.partition("://")[2].rpartition("@")
    if not at or ":" not in credentials:
        return url
    scheme = url.partition("://")[0]
    return f"{scheme}://{credentials.partition(':')[0]}:***@{rest}"


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


def redis_client(url, size, **options):
    """A client of REDIS_URL `url` over a blocking pool of `size` connections.

    A redis+sentinel:// URL gives a client of the service's master, which asks the
    Sentinels where the master is whenever it opens a connection.
    """
    target = parse_url(url)
    if not isinstance(target, SentinelURL):
        return redis.Redis(connection_pool=blocking_pool(url, size, **options))
    sentinel = redis.sentinel.Sentinel(
        target.sentinels,
        sentinel_kwargs={k: v for k, v in pool_policy().items() if k != "health_check_interval"})
    return sentinel.master_for(
        target.service, connection_pool_class=SentinelPool, max_connections=size,
        timeout=POOL_TIMEOUT, parser_class=Parser, db=target.db, username=target.username,
        password=target.password, **pool_policy(), **options)

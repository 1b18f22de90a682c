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

With Sentinel, a worker's pools follow the master through a failover (MasterWatch): redis-py
only asks the Sentinels where the master is when it opens a connection, and a master that
Sentinel demotes keeps serving the connections it has, as a master, for seconds.
"""
import dataclasses
import logging
import select
from urllib.parse import unquote, urlsplit

import gevent
import redis
import redis.sentinel
from gevent import monkey
from redis._parsers import _HiredisParser
from redis.backoff import NoBackoff
from redis.retry import Retry

log = logging.getLogger(__name__)

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


# The Sentinel events that begin and end a failover (+switch-master names the new master).
FAILOVER_EVENTS = ("+try-failover", "+switch-master", "-failover-abort-*",
                   "+failover-end-for-timeout")
WATCH_EVERY = 1.0  # seconds between two questions to the Sentinels, whatever their events say
WATCH_RETRY_MAX = 5.0  # seconds at most between attempts to hear a Sentinel's events again


class FollowingSentinel(redis.sentinel.Sentinel):
    """redis-py's Sentinel client, not taking the master from a Sentinel in mid-failover.

    The Sentinel leading a failover names the old master until the failover ends, about a
    second after the other Sentinels have learnt the new one from it.
    """

    def check_master_state(self, state, service_name):
        return (super().check_master_state(state, service_name)
                and "failover_in_progress" not in state["flags"])


class SentinelPool(redis.sentinel.SentinelConnectionPool, BlockingPool):
    """Sentinel's pool of connections to the current master, blocking as BlockingPool does.

    Sentinel's own pool refuses a command beyond its size, as redis-py's default pool does.
    """

    def __init__(self, service_name, sentinel_manager, **kwargs):
        super().__init__(service_name, sentinel_manager, **kwargs)
        self.watch = MasterWatch(self)


class MasterWatch:
    """A pool's eye on Sentinel: which master it names, and whether a failover is under way.

    A failover begins by promoting a replica while the old master still takes writes, and its
    other replica still acknowledges them (WAIT) until Sentinel moves it too: a message stored
    then is acknowledged and lost. So a worker hears each Sentinel's events and, from
    `+try-failover` until `+switch-master`, `under_way` tells the store to refuse sends;
    `begun` counts failovers, so that a send stored as one began is refused too. Every
    WATCH_EVERY seconds it also asks the Sentinels where the master is, and moves the pool's
    idle connections there (its busy ones leave the pool when released).
    """

    def __init__(self, pool):
        self.pool = pool
        self.service = pool.service_name
        self.under_way = False
        self.begun = 0
        self.on_switch = []  # called with the new master's address
        self.tasks = []

    def start(self):
        """Listen to every Sentinel and ask them in turn, in background greenlets, once."""
        if self.tasks:
            return
        for sentinel in list(self.pool.sentinel_manager.sentinels):
            address = sentinel.connection_pool.connection_kwargs
            self.tasks.append(gevent.spawn(self._hear_forever, address["host"], address["port"]))
        self.tasks.append(gevent.spawn(self._ask_forever))

    def _hear_forever(self, host, port):
        delay = WATCH_EVERY
        while True:
            pubsub = redis.Redis(host=host, port=port, **self.pool.sentinel_manager
                                 .sentinel_kwargs).pubsub(ignore_subscribe_messages=True)
            try:
                pubsub.psubscribe(*FAILOVER_EVENTS)
                delay = WATCH_EVERY
                for message in pubsub.listen():
                    if message["type"] == "pmessage":
                        self.heard(_text(message["channel"]), _text(message["data"]))
            except redis.RedisError as exc:
                log.info("not hearing Sentinel %s:%s (%s); retrying in %.0f s",
                         host, port, exc, delay)
            finally:
                pubsub.close()
            gevent.sleep(delay)
            delay = min(delay * 2, WATCH_RETRY_MAX)

    def heard(self, event, data):
        """Act on one Sentinel event: `event` is its channel, `data` its message."""
        words = data.split()
        if event == "+switch-master":
            if words[0] == self.service:
                self.under_way = False
                self.follow((words[3], int(words[4])))
            return
        name = words[words.index("@") + 1] if "@" in words else words[1]
        if name != self.service:
            return
        if event == "+try-failover":
            if not self.under_way:
                log.warning("Sentinel is failing over %s; sends are refused until it ends",
                            data)
            self.under_way = True
            self.begun += 1
        else:
            log.warning("Sentinel gave up failing over %s (%s)", data, event)
            self.under_way = False

    def follow(self, address):
        """Send the pool's next commands to the master at `address`."""
        proxy = self.pool.proxy
        if proxy.master_address != address:
            log.warning("Redis master is now %s:%s", *address)
            proxy.master_address = address
            self.pool.disconnect(inuse_connections=False)
        for callback in self.on_switch:
            callback(address)

    def _ask_forever(self):
        while True:
            gevent.sleep(WATCH_EVERY)
            try:
                self.ask()
            except redis.RedisError as exc:
                log.info("no Sentinel names the master of %s: %s", self.service, exc)

    def ask(self):
        """Ask the Sentinels, as events may be missed: where the master is, and whether a
        failover is still under way (only the Sentinel leading it says so)."""
        before = self.pool.master_address
        address = self.pool.get_master_address()  # moves idle connections when it changed
        if before is not None and address != before:
            self.follow(address)
        if self.under_way and not any(
                "failover_in_progress" in state["flags"] for state in self._states()):
            log.warning("the failover of %s is over", self.service)
            self.under_way = False

    def _states(self):
        for sentinel in self.pool.sentinel_manager.sentinels:
            try:
                yield sentinel.sentinel_master(self.service)
            except redis.RedisError:
                continue


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


def _text(value):
    return value.decode() if isinstance(value, bytes) else value


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
    sentinel = FollowingSentinel(
        target.sentinels,
        sentinel_kwargs={k: v for k, v in pool_policy().items() if k != "health_check_interval"})
    return sentinel.master_for(
        target.service, connection_pool_class=SentinelPool, max_connections=size,
        timeout=POOL_TIMEOUT, parser_class=Parser, db=target.db, username=target.username,
        password=target.password, **pool_policy(), **options)

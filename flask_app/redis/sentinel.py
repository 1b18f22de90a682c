"""Sentinel: a worker's pools follow the master through a failover (MasterWatch). redis-py
only asks the Sentinels where the master is when it opens a connection, and a master that
Sentinel demotes keeps serving the connections it has, as a master, for seconds.
"""
import logging

import gevent
import redis
import redis.sentinel

from .pool import POOL_TIMEOUT, BlockingPool, Parser, pool_policy

log = logging.getLogger(__name__)

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


def _text(value):
    return value.decode() if isinstance(value, bytes) else value


def sentinel_client(target, size, **options):
    """A client of the master of the service a SentinelURL `target` names, which asks the
    Sentinels where the master is whenever it opens a connection."""
    sentinel = FollowingSentinel(
        target.sentinels,
        sentinel_kwargs={k: v for k, v in pool_policy().items() if k != "health_check_interval"})
    return sentinel.master_for(
        target.service, connection_pool_class=SentinelPool, max_connections=size,
        timeout=POOL_TIMEOUT, parser_class=Parser, db=target.db, username=target.username,
        password=target.password, **pool_policy(), **options)

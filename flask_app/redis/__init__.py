"""The Redis side of a worker: connections, topologies and the Socket.IO client manager.

`redis_client` is the one way in: it reads any REDIS_URL form (urls.py) and gives a client
with one pool policy (pool.py), following the master through failovers with Sentinel
(sentinel.py) and the slots' masters with Redis Cluster (cluster.py). The manager (manager.py) carries Socket.IO emits between workers and delivers
stored messages in order, whatever Redis loses of its pub/sub.
"""
import redis

from .cluster import cluster_client
from .pool import blocking_pool
from .sentinel import sentinel_client
from .urls import ClusterURL, SentinelURL, parse_url


def redis_client(url, size, **options):
    """A client of REDIS_URL `url` over a blocking pool of `size` connections.

    A redis+sentinel:// URL gives a client of the service's master, a redis+cluster:// URL
    a client of the whole cluster.
    """
    target = parse_url(url)
    if isinstance(target, SentinelURL):
        return sentinel_client(target, size, **options)
    if isinstance(target, ClusterURL):
        return cluster_client(target, size, **options)
    return redis.Redis(connection_pool=blocking_pool(url, size, **options))

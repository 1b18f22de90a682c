"""Redis Cluster: one client for the whole cluster, each node's connections pooled by our policy.

redis-py's RedisCluster keeps a client per node and sends each command to the master of its
key's slot, following MOVED and ASK redirections and learning the slot map again after a
failover. Its own retry is kept short: a send during a failover is answered `unavailable`
(the client retries with its client_id) rather than held for the cluster's node timeout.
"""
import redis
from redis.backoff import ExponentialBackoff
from redis.cluster import ClusterNode
from redis.retry import Retry

from .pool import HEALTH_CHECK_INTERVAL, POOL_TIMEOUT, BlockingPool, Parser, pool_policy

RETRIES = 3  # redirections and reconnections of one command, 50 ms doubling up to 400 ms


class NodePool(BlockingPool):
    """A blocking pool for one cluster node, with our parser and health checks.

    RedisCluster passes a node's pool only the options it knows (not `parser_class` nor
    `health_check_interval`), so the pool adds them itself.
    """

    def __init__(self, **options):
        super().__init__(parser_class=Parser, health_check_interval=HEALTH_CHECK_INTERVAL,
                         **options)


def cluster_client(target, size, **options):
    """A client of the cluster a ClusterURL `target` names, `size` connections per node."""
    (host, port), *others = target.nodes
    policy = {key: value for key, value in pool_policy().items()
              if key not in ("retry", "health_check_interval")}
    return redis.RedisCluster(
        url=f"redis://{host}:{port}", startup_nodes=[ClusterNode(h, p) for h, p in others],
        username=target.username, password=target.password,
        connection_pool_class=NodePool, max_connections=size, timeout=POOL_TIMEOUT,
        retry=Retry(ExponentialBackoff(cap=0.4, base=0.05), RETRIES), **policy, **options)

"""The objects a worker shares between its HTTP views and Socket.IO handlers."""
import dataclasses

import redis
from flask import current_app

from .auth import Tokens
from .config import Config
from .keys import Keys
from .metrics import WorkerMetrics
from .presence import Presence
from .redis import redis_client
from .store import MessageStore


@dataclasses.dataclass
class Services:
    """Configuration, the Redis client and the components built on it."""

    config: Config
    redis: redis.Redis
    tokens: Tokens
    store: MessageStore
    presence: Presence
    metrics: WorkerMetrics
    draining: bool = False

    @classmethod
    def from_config(cls, config):
        """Build every component; Redis is only connected on first use."""
        client = redis_client(config.redis_url, config.redis_pool, decode_responses=True)
        keys = Keys(config.key_prefix)
        metrics = WorkerMetrics(config.worker_id)
        return cls(config=config, redis=client,
                   tokens=Tokens(config),
                   store=MessageStore(client, keys, config,
                                      observe=metrics.redis_seconds("append").observe),
                   presence=Presence(client, keys, config.presence_ttl),
                   metrics=metrics)


def get_services():
    """Return the services of the current Flask app."""
    return current_app.extensions["scalechat"]

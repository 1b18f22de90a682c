"""Liveness and readiness of this worker, for the proxy and operators.

Its metrics are not here: a worker's port is the public one behind HAProxy, and
`scalechat serve-metrics` serves every worker's on 127.0.0.1 (metrics.py).
"""
import redis
from flask import Blueprint, current_app, jsonify

from .services import get_services

bp = Blueprint("health", __name__)


@bp.get("/healthz")
def healthz():
    """200 while the process serves requests: restart it only when this fails."""
    services = get_services()
    return jsonify(status="ok", worker=services.config.worker_id,
                   connections=len(services.presence.local))


@bp.get("/readyz")
def readyz():
    """200 when this worker should get clients: Redis answers, the listener hears, not stopping."""
    services = get_services()
    problem = None
    if services.draining:
        problem = "draining: this worker is stopping"
    else:
        try:
            ping(services.redis)
        except redis.RedisError as exc:
            problem = f"redis: {exc}"
        else:
            if not current_app.extensions["socketio"].manager.listening():
                problem = "redis pub/sub listener is not subscribed on the master"
    if problem:
        return jsonify(status="unavailable", worker=services.config.worker_id,
                       reason=problem), 503
    return jsonify(status="ok", worker=services.config.worker_id,
                   connections=len(services.presence.local))


def ping(client):
    """Ping Redis; with a cluster, its masters until one answers.

    A cluster with a master down (until its replica takes over) or a replica restarting still
    serves the rooms of the other shards: every worker is as far from it as the others, and
    taking them all out of the proxy would stop every room.
    """
    if not isinstance(client, redis.RedisCluster):
        return client.ping()
    failure = redis.ConnectionError("the cluster has no master")
    for node in client.get_primaries():
        try:
            return node.redis_connection.ping()
        except redis.RedisError as exc:
            failure = exc
    raise failure

"""Health of this worker, for the proxy's checks and for operators."""
import redis
from flask import Blueprint, jsonify

from .services import get_services

bp = Blueprint("health", __name__)


@bp.get("/healthz")
def healthz():
    """200 when this worker reaches Redis and is not stopping, 503 with the reason otherwise."""
    services = get_services()
    if services.draining:
        return jsonify(status="draining", worker=services.config.worker_id,
                       reason="this worker is stopping"), 503
    try:
        services.redis.ping()
    except redis.RedisError as exc:
        return jsonify(status="unavailable", worker=services.config.worker_id,
                       reason=f"redis: {exc}"), 503
    return jsonify(status="ok", worker=services.config.worker_id,
                   connections=len(services.presence.local))

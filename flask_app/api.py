"""The JSON API for clients that are not browsers: sessions, history, rooms."""
import redis
from flask import Blueprint, jsonify, request

from . import auth, validation
from .services import get_services

bp = Blueprint("api", __name__, url_prefix="/api")


@bp.errorhandler(validation.ValidationError)
def refuse_input(exc):
    return jsonify(error=exc.code, detail=exc.detail), 400


@bp.errorhandler(redis.RedisError)
def report_unavailable(exc):
    return jsonify(error="unavailable", detail="the message store is unavailable"), 503


@bp.errorhandler(auth.Unauthorized)
def refuse_credentials(exc):
    return (jsonify(error="unauthorized", detail=exc.detail), 401,
            {"WWW-Authenticate": 'Bearer realm="scalechat"'})


@bp.post("/session")
def create_session():
    """Issue a guest token for a display name: a new user of its own."""
    tokens = get_services().tokens
    if not tokens.guest_login:
        return jsonify(error="guest_login_off",
                       detail="guest sign-in is off: connect with a token from the site"), 403
    data = request.get_json(silent=True)
    if not isinstance(data, dict):
        raise validation.ValidationError("invalid_payload", 'send a JSON object {"name": ...}')
    user = auth.new_guest(validation.name(data.get("name")))
    return jsonify(token=tokens.issue(user), user=user.name, user_id=user.id)


@bp.get("/rooms/<room>/messages")
def room_messages(room):
    """Return a page of a room's history, oldest first."""
    services = get_services()
    auth.request_user(services.tokens)
    config = services.config
    room = validation.room(room)
    messages = services.store.history(
        room,
        after=validation.cursor(request.args.get("after"), "after"),
        before=validation.cursor(request.args.get("before"), "before"),
        limit=validation.limit(request.args.get("limit"), config.history_on_join,
                               config.history_max_limit))
    return jsonify(messages=messages)


@bp.get("/rooms")
def rooms():
    """Return the most recently active rooms with their online counts."""
    services = get_services()
    auth.request_user(services.tokens)
    return jsonify(rooms=room_list(services))


def room_list(services, count=50):
    """Return [{room, online}] for the most recently active rooms."""
    names = services.store.recent_rooms(count)
    online = services.presence.online_counts(names)
    return [{"room": name, "online": online[name]} for name in names]

"""Reference peer for the benchmark: the stock python-socketio recipe.

Flask and python-socketio on gevent with gevent-websocket, processes joined by
`socketio.RedisManager`, speaking the part of scalechat's protocol the benchmark
uses (docs/protocol.md): POST /api/session, GET /healthz, and the `join` /
`message` events with acks. Messages are broadcast to the room with an id;
nothing is stored. GET /metrics counts the pub/sub messages the worker received.

    REDIS_URL=redis://127.0.0.1:6379/0 WORKER_ID=p0 python server.py --port 8201
"""
from gevent import monkey

monkey.patch_all()

import argparse  # noqa: E402
import base64  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import re  # noqa: E402
import signal  # noqa: E402
import time  # noqa: E402

import socketio  # noqa: E402
from flask import Flask, jsonify, request  # noqa: E402
from gevent import signal_handler  # noqa: E402
from gevent.event import Event  # noqa: E402
from gevent.pywsgi import WSGIServer  # noqa: E402
from geventwebsocket.handler import WebSocketHandler  # noqa: E402

ROOM_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")
CLIENT_ID_RE = re.compile(r"^[A-Za-z0-9_.:-]{1,64}$")

REDIS_URL = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
WORKER_ID = os.environ.get("WORKER_ID", f"python-{os.getpid()}")



class CountingRedisManager(socketio.RedisManager):
    """The stock RedisManager, counting what its listener receives for the benchmark."""

    received = 0

    def _listen(self):
        for data in super()._listen():
            self.received += 1
            yield data


manager = CountingRedisManager(REDIS_URL)
sio = socketio.Server(async_mode="gevent", client_manager=manager)
app = Flask(__name__)
_seq = 0


def issue_token(user):
    """Any token will do for the benchmark: the user name, encoded, so every worker can read it."""
    return base64.urlsafe_b64encode(json.dumps({"user": user}).encode()).decode()


def user_of(token):
    if not isinstance(token, str):
        return None
    try:
        user = json.loads(base64.urlsafe_b64decode(token.encode())).get("user")
    except (ValueError, AttributeError):
        return None
    return user if isinstance(user, str) and user else None


@app.get("/healthz")
def healthz():
    return jsonify(status="ok", worker=WORKER_ID)


@app.get("/metrics")
def metrics():
    """Pub/sub messages received on the one channel every worker subscribes to."""
    body = f'bench_pubsub_messages_total{{worker="{WORKER_ID}"}} {manager.received}\n'
    return body, 200, {"Content-Type": "text/plain; version=0.0.4"}


@app.post("/api/session")
def new_session():
    data = request.get_json(silent=True) or {}
    name = data.get("name") if isinstance(data, dict) else None
    if not isinstance(name, str) or not name.strip() or len(name) > 32:
        return jsonify(error="invalid_name", detail="name must be 1-32 characters"), 400
    name = name.strip()
    return jsonify(token=issue_token(name), user=name)


@sio.event
def connect(sid, environ, auth=None):
    user = user_of(auth.get("token") if isinstance(auth, dict) else None)
    if user is None:
        raise socketio.exceptions.ConnectionRefusedError("unauthorized")
    sio.save_session(sid, {"user": user})


@sio.event
def join(sid, data):
    room = data.get("room") if isinstance(data, dict) else None
    if not isinstance(room, str) or not ROOM_RE.match(room):
        return {"ok": False, "error": "invalid_room", "detail": "bad room name"}
    sio.enter_room(sid, room)
    return {"ok": True, "room": room, "history": [], "missed_more": False, "members": [],
            "worker": WORKER_ID}


@sio.event
def message(sid, data):
    global _seq
    if not isinstance(data, dict):
        return {"ok": False, "error": "invalid_payload", "detail": "send one JSON object"}
    room, text, client_id = data.get("room"), data.get("text"), data.get("client_id")
    if not isinstance(room, str) or not ROOM_RE.match(room):
        return {"ok": False, "error": "invalid_room", "detail": "bad room name"}
    if not isinstance(text, str) or not text.strip() or len(text) > 2000:
        return {"ok": False, "error": "invalid_text", "detail": "bad text"}
    if not isinstance(client_id, str) or not CLIENT_ID_RE.match(client_id):
        return {"ok": False, "error": "invalid_client_id", "detail": "bad client_id"}
    if room not in sio.rooms(sid):
        return {"ok": False, "error": "not_member", "detail": f"join {room} before using it"}
    ts = int(time.time() * 1000)
    _seq += 1
    msg_id = f"{ts}-{WORKER_ID}-{_seq}"
    user = sio.get_session(sid)["user"]
    sio.emit("message", {"id": msg_id, "room": room, "user": user, "text": text, "ts": ts,
                         "client_id": client_id}, room=room)
    return {"ok": True, "id": msg_id}


application = socketio.WSGIApp(sio, app)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8201)
    args = parser.parse_args()
    server = WSGIServer((args.host, args.port), application,
                        handler_class=WebSocketHandler, log=None)
    server.start()
    print(f"{WORKER_ID} listening on http://{args.host}:{args.port}", flush=True)
    stop = Event()
    signal_handler(signal.SIGTERM, stop.set)
    signal_handler(signal.SIGINT, stop.set)
    stop.wait()
    server.stop(timeout=1)


if __name__ == "__main__":
    main()

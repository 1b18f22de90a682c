"""`scalechat`: commands for operators and their scripts."""
import argparse
import os
import sys
import time
from pathlib import Path

import redis

from . import admin, metrics
from .config import PROJECT_ROOT, Config, ConfigError
from .keys import Keys
from .redis.manager import PooledRedisManager
from .redis.urls import shown
from .validation import ValidationError, room as valid_room

# deploy/configure's first line of var/stack.env (deploy/lib.sh reads the same format)
STACK_ENV_HEADER = ("# scalechat settings written by deploy/configure: "
                    "KEY=VALUE a line, read literally, never sourced")


class AnnouncementEmitter(PooledRedisManager):
    """A write-only manager that keeps its publish's receivers: python-socketio logs a failed
    publish, and `emit` returns nothing either way. A room's announcement goes on the room's
    channel, which only the workers with members there hear."""

    receivers = None

    def __init__(self, config):
        super().__init__(config.redis_url, config.channel, pool_size=1, write_only=True)
        self.keys = Keys(config.key_prefix)

    def _publish(self, data):
        if data["room"] is None:
            self.receivers = super()._publish(data)
            return self.receivers
        try:
            self.receivers = self.redis.spublish(self.keys.room_channel(data["room"]),
                                                 self.json.dumps(data))
        except redis.RedisError as exc:
            print(f"scalechat: cannot publish to Redis: {exc}", file=sys.stderr)
        return self.receivers


def announce(config, room, text):
    """Emit an `announcement` to a room, or to everyone, through Redis, from outside the workers;
    return how many workers heard it, or None when Redis could not be reached."""
    emitter = AnnouncementEmitter(config)
    emitter.emit("announcement", {"room": room, "text": text, "ts": int(time.time() * 1000)},
                 room=room, namespace="/")
    return emitter.receivers


def stack_env_path(environ):
    """Where deploy/configure keeps the deployed stack's settings."""
    return Path(environ.get("SCALECHAT_VAR") or PROJECT_ROOT / "var") / "stack.env"


def read_stack_env(path):
    """The settings of var/stack.env, each value taken literally."""
    lines = path.read_text().splitlines()
    quoted = not lines or lines[0] != STACK_ENV_HEADER  # written before the literal format
    settings = {}
    for line in lines:
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            settings[key] = value[1:-1] if quoted and value[:1] == value[-1:] == "'" else value
    return settings


def operator_environ():
    """The environment over the deployed stack's settings, so operators need not load them."""
    path = stack_env_path(os.environ)
    try:
        return {**read_stack_env(path), **os.environ}
    except FileNotFoundError:
        return dict(os.environ)
    except PermissionError:
        sys.exit(f"scalechat: cannot read {path}: run as the user who started the stack "
                 "(or set REDIS_URL and the other settings yourself)")


def serve_metrics(host, port):
    """Serve every worker's metrics from PROMETHEUS_MULTIPROC_DIR until stopped."""
    if not metrics.multiprocess_dir():
        sys.exit("scalechat: set PROMETHEUS_MULTIPROC_DIR to the workers' metrics directory")
    server, thread = metrics.serve(host, port)
    print(f"serving metrics on http://{host}:{port}/metrics", flush=True)
    try:
        thread.join()
    except KeyboardInterrupt:
        server.shutdown()


def serve_admin(config):
    """Serve the Socket.IO Admin UI's pages on 127.0.0.1 only, until stopped."""
    from gevent.pywsgi import WSGIServer

    try:
        app = admin.ui_app(config)
    except FileNotFoundError as exc:
        sys.exit(f"scalechat: {exc}")
    server = WSGIServer(("127.0.0.1", config.admin_ui_port), app)
    try:
        server.start()
    except OSError as exc:
        sys.exit(f"scalechat: cannot listen on 127.0.0.1:{config.admin_ui_port}: {exc}")
    print(f"serving the Admin UI on http://127.0.0.1:{config.admin_ui_port}/ : sign in with "
          f"the proxy's or a worker's URL, user {admin.USERNAME} and SCALECHAT_ADMIN_PASSWORD",
          flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        server.stop()


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="scalechat", description="Operate scalechat. Settings (REDIS_URL, ...) come from "
                                      "the environment, as for the workers, over those of the "
                                      "deployed stack ($SCALECHAT_VAR or var/, stack.env).")
    commands = parser.add_subparsers(dest="command", required=True)
    announce_parser = commands.add_parser(
        "announce", help="send an announcement to the clients of every worker",
        description='Send an announcement, e.g. scalechat announce --all "maintenance in 5 minutes"')
    target = announce_parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--room", help="only the members of this room")
    target.add_argument("--all", action="store_true", help="every connected client")
    announce_parser.add_argument("text", help="the announcement")
    metrics_parser = commands.add_parser(
        "serve-metrics", help="serve the metrics of every worker of this host for Prometheus",
        description="Serve /metrics for every worker writing to PROMETHEUS_MULTIPROC_DIR; "
                    "it keeps answering while workers restart.")
    metrics_parser.add_argument("--host", default="127.0.0.1")
    metrics_parser.add_argument("--port", type=int, default=9105)
    commands.add_parser(
        "serve-admin", help="serve the Socket.IO Admin UI to operators on 127.0.0.1",
        description="Serve the Admin UI's pages on http://127.0.0.1:SCALECHAT_ADMIN_UI_PORT/ "
                    "(9106); the workers must run with SCALECHAT_ADMIN_PASSWORD and the same "
                    "SCALECHAT_ADMIN_UI_PORT.")
    args = parser.parse_args(argv)
    if args.command == "serve-metrics":
        return serve_metrics(args.host, args.port)
    try:
        config = Config.from_env(operator_environ())
        if args.command == "serve-admin":
            return serve_admin(config)
        room = None if args.all else valid_room(args.room)
    except (ConfigError, ValidationError) as exc:
        sys.exit(f"scalechat: {exc}")
    if not args.text.strip():
        sys.exit("scalechat: the announcement text is empty")
    receivers = announce(config, room, args.text)
    if receivers is None:
        sys.exit(f"scalechat: cannot reach Redis at {shown(config.redis_url)}: "
                 "nothing was announced")
    if not receivers:
        sys.exit(f"scalechat: no worker listens on channel {config.channel!r} of Redis at "
                 f"{shown(config.redis_url)}: nobody received the announcement")
    print(f"announced to {'every client' if room is None else 'room ' + room} "
          f"({receivers} worker{'s' if receivers > 1 else ''} listening)")

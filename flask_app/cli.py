"""`scalechat`: commands for operators and their scripts."""
import argparse
import sys
import time

from . import admin, metrics
from .config import Config, ConfigError
from .manager import PooledRedisManager
from .validation import ValidationError, room as valid_room


def announce(config, room, text):
    """Emit an `announcement` to a room, or to everyone, through Redis, from outside the workers."""
    emitter = PooledRedisManager(config.redis_url, config.channel, pool_size=1, write_only=True)
    emitter.emit("announcement", {"room": room, "text": text, "ts": int(time.time() * 1000)},
                 room=room, namespace="/")


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
                                      "the environment, as for the workers.")
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
    if args.command == "serve-admin":
        try:
            config = Config.from_env()
        except ConfigError as exc:
            sys.exit(f"scalechat: {exc}")
        return serve_admin(config)
    try:
        config = Config.from_env()
        room = None if args.all else valid_room(args.room)
    except (ConfigError, ValidationError) as exc:
        sys.exit(f"scalechat: {exc}")
    if not args.text.strip():
        sys.exit("scalechat: the announcement text is empty")
    announce(config, room, args.text)
    print(f"announced to {'every client' if room is None else 'room ' + room}")

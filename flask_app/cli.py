"""`scalechat`: commands for operators and their scripts."""
import argparse
import sys
import time

from . import metrics
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
    args = parser.parse_args(argv)
    if args.command == "serve-metrics":
        return serve_metrics(args.host, args.port)
    try:
        config = Config.from_env()
        room = None if args.all else valid_room(args.room)
    except (ConfigError, ValidationError) as exc:
        sys.exit(f"scalechat: {exc}")
    if not args.text.strip():
        sys.exit("scalechat: the announcement text is empty")
    announce(config, room, args.text)
    print(f"announced to {'every client' if room is None else 'room ' + room}")

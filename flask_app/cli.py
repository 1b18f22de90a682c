"""`scalechat`: commands for operators and their scripts."""
import argparse
import sys
import time

import socketio

from .config import Config, ConfigError
from .validation import ValidationError, room as valid_room


def announce(config, room, text):
    """Emit an `announcement` to a room, or to everyone, through Redis, from outside the workers."""
    emitter = socketio.RedisManager(config.redis_url, channel=config.channel, write_only=True)
    emitter.emit("announcement", {"room": room, "text": text, "ts": int(time.time() * 1000)},
                 room=room, namespace="/")


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
    args = parser.parse_args(argv)
    try:
        config = Config.from_env()
        room = None if args.all else valid_room(args.room)
    except (ConfigError, ValidationError) as exc:
        sys.exit(f"scalechat: {exc}")
    if not args.text.strip():
        sys.exit("scalechat: the announcement text is empty")
    announce(config, room, args.text)
    print(f"announced to {'every client' if room is None else 'room ' + room}")

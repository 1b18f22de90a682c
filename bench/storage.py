"""`python -m bench.storage`: the Redis memory one stored message costs, dedup record included.

Stores messages through scalechat's own store script into a fresh redis-server and prints
`used_memory` per message: what sizes `maxmemory` (docs/operations.md).
"""
import argparse
import shutil
import subprocess
import tempfile
import time
import uuid

import redis

from flask_app.auth import User
from flask_app.config import Config
from flask_app.keys import Keys
from flask_app.store import MessageStore


def start_redis(directory, port):
    proc = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1",
                             "--dir", directory, "--save", "", "--appendonly", "no"],
                            stdout=subprocess.DEVNULL)
    client = redis.Redis(port=port, decode_responses=True)
    for _ in range(100):
        try:
            client.ping()
            return proc, client
        except redis.ConnectionError:
            time.sleep(0.05)
    raise SystemExit("redis-server did not start")


def measure(client, rooms, per_room, text_length):
    """Return used_memory bytes per message after storing rooms x per_room messages."""
    client.flushall()
    store = MessageStore(client, Keys("scalechat:"), Config(env="test"))
    before = client.info("memory")["used_memory"]
    text = "x" * text_length
    for n in range(per_room):
        for r in range(rooms):
            user = User(f"user-{n % 50:02d}", f"User {n % 50:02d}")
            store.append(f"room-{r:04d}", user, text, uuid.uuid4().hex)
    return (client.info("memory")["used_memory"] - before) / (rooms * per_room)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m bench.storage", description=__doc__)
    parser.add_argument("--port", type=int, default=6390)
    parser.add_argument("--text", type=int, default=100, help="characters of text per message")
    args = parser.parse_args(argv)
    directory = tempfile.mkdtemp()
    proc, client = start_redis(directory, args.port)
    try:
        print(f"{'rooms':>6} {'messages/room':>14} {'bytes/message':>14}  (text of {args.text} chars)")
        for rooms, per_room in [(1, 20000), (100, 200), (2000, 10)]:
            print(f"{rooms:>6} {per_room:>14} {measure(client, rooms, per_room, args.text):>14.0f}")
    finally:
        proc.terminate()
        proc.wait()
        shutil.rmtree(directory)


if __name__ == "__main__":
    main()

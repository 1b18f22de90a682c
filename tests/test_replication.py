"""Acknowledged means replicated: with SCALECHAT_MIN_REPLICAS, an `ok` waits for the replicas."""
import os
import signal
import subprocess

import pytest
import redis

from conftest import RedisServer, wait_until
from flask_app.keys import Keys


@pytest.fixture
def replica(redis_server, tmp_path):
    """A replica of the session's Redis."""
    server = RedisServer(tmp_path)
    server.proc = subprocess.Popen(
        ["redis-server", "--port", str(server.port), "--bind", "127.0.0.1", "--dir", str(tmp_path),
         "--save", "", "--appendonly", "no", "--replicaof", "127.0.0.1", str(redis_server.port)],
        stdout=subprocess.DEVNULL)
    client = redis.Redis.from_url(server.url, decode_responses=True)
    wait_until(lambda: _linked(client), what="the replica to be in sync")
    yield server
    os.kill(server.proc.pid, signal.SIGCONT)
    server.stop()


def _linked(client):
    try:
        return client.info("replication")["master_link_status"] == "up"
    except redis.ConnectionError:
        return False


def test_an_ok_means_a_replica_has_the_message(redis_server, replica, worker_factory, clients,
                                               room):
    worker = worker_factory("replicated", SCALECHAT_MIN_REPLICAS="1",
                            SCALECHAT_REPLICA_TIMEOUT="300")
    alice = clients("alice").connect(worker)
    alice.join(room)
    copy = redis.Redis.from_url(replica.url, decode_responses=True)
    stream = Keys("scalechat:").room_stream(room)
    first = alice.send(room, "replicated", client_id="r1")
    assert first["ok"]
    assert [entry_id for entry_id, _ in copy.xrange(stream)] == [first["id"]]

    os.kill(replica.proc.pid, signal.SIGSTOP)  # the replica stops acknowledging
    refused = alice.send(room, "not yet replicated", client_id="r2")
    assert refused["ok"] is False and refused["error"] == "unavailable", refused
    again = alice.send(room, "not yet replicated", client_id="r2")
    assert again["ok"] is False and again["error"] == "unavailable", again
    os.kill(replica.proc.pid, signal.SIGCONT)
    retried = wait_until(lambda: (ack := alice.send(room, "not yet replicated",
                                                   client_id="r2"))["ok"] and ack,
                         what="the retry to be acknowledged")
    ids = [entry_id for entry_id, _ in copy.xrange(stream)]
    assert ids == [first["id"], retried["id"]]  # stored once, on the replica too
    got = alice.wait_for("message", lambda got: len(got) == 2)
    assert [m["id"] for m in got] == ids


def test_without_replicas_required_a_single_redis_acknowledges_at_once(worker_factory, clients,
                                                                      room):
    worker = worker_factory("single")  # REDIS_URL is a single Redis: no replica is waited for
    alice = clients("alice").connect(worker)
    alice.join(room)
    assert alice.send(room, "no replica here")["ok"]

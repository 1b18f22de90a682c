"""Connections to Redis: every REDIS_URL form, and one pool policy that survives a stalled Redis."""
import os
import signal
import subprocess

import pytest
import redis
import requests
from socketio.redis_manager import parse_redis_sentinel_url

from conftest import BIN, RedisServer, wait_until
from flask_app.config import Config, ConfigError
from flask_app.redis import redis_client
from flask_app.redis.pool import COMMAND_TIMEOUT, POOL_TIMEOUT
from flask_app.redis.urls import SentinelURL, parse_url
from sentinel import sentinel_set  # noqa: F401 (a fixture)


@pytest.fixture
def own_redis(tmp_path):
    """A Redis of this test's own, to be stopped and continued."""
    server = RedisServer(tmp_path).start()
    yield server
    os.kill(server.proc.pid, signal.SIGCONT)  # a stopped process cannot take its SIGTERM
    server.stop()


def subscribers(server):
    """{client id: age in seconds} of the pub/sub connections to `server`."""
    listed = redis.Redis.from_url(server.url).client_list(_type="pubsub")
    return {client["id"]: int(client["age"]) for client in listed}


def announce(redis_url, *args):
    return subprocess.Popen([str(BIN / "scalechat"), "announce", *args],
                            env={**os.environ, "REDIS_URL": redis_url},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.parametrize("url", [
    "redis://127.0.0.1:6379/0", "rediss://:pw@cache.example:6380/1", "unix:///run/redis.sock?db=2",
    "valkey://127.0.0.1:6379/0", "valkeys://cache.example:6380",
    "redis+sentinel://127.0.0.1:26379/0/mymaster",
    "redis+sentinel://user:pw@h1:26379,h2:26380/3/mymaster",
    "valkey+sentinel://:pw@[::1]:26379//mymaster",
])
def test_config_accepts_every_form_python_socketio_reads(url):
    assert Config(redis_url=url).redis_url == url


@pytest.mark.parametrize("url, why", [
    ("localhost:6379", "must start with redis://"),
    ("http://127.0.0.1:6379", "must start with redis://"),
    ("redis://127.0.0.1:port/0", "is not a usable URL"),
    ("redis://127.0.0.1/0?socket_timeout=soon", "is not a usable URL"),
    ("redis+sentinel://h1:26379,h2/0/mymaster", "lists each Sentinel as host:port"),
    ("redis+sentinel://h1:26379/0", "names the service"),
    ("redis+sentinel://h1:26379/zero/mymaster", "has db 'zero'"),
])
def test_config_refuses_garbage_naming_redis_url(url, why):
    with pytest.raises(ConfigError, match="^REDIS_URL ") as refused:
        Config(redis_url=url)
    assert why in str(refused.value)


def test_a_refused_url_does_not_show_its_password():
    with pytest.raises(ConfigError) as refused:
        Config(redis_url="redis+sentinel://admin:s3cret@h1/0/mymaster")
    assert "s3cret" not in str(refused.value) and "admin:***@h1" in str(refused.value)


@pytest.mark.parametrize("url", [
    "redis+sentinel://127.0.0.1:26379/0/mymaster",
    "redis+sentinel://user:pw@h1:26379,h2:26380/3/mymaster",
    "valkey+sentinel://:pw@h1:26379/1/svc",
])
def test_sentinel_urls_mean_what_they_mean_to_python_socketio(url):
    sentinels, service, options = parse_redis_sentinel_url(url)
    assert parse_url(url) == SentinelURL(sentinels=tuple(sentinels), service=service,
                                         db=options.get("db", 0),
                                         username=options.get("username"),
                                         password=options.get("password"))


def test_a_sentinel_url_gives_a_blocking_pool_of_the_master(sentinel_set):
    client = redis_client(sentinel_set.url, 3, decode_responses=True)
    pool = client.connection_pool
    assert isinstance(pool, redis.BlockingConnectionPool)
    assert (pool.max_connections, pool.timeout) == (3, POOL_TIMEOUT)
    assert client.set("written", "to the master")
    assert pool.master_address == ("127.0.0.1", sentinel_set.master_port())
    for node in sentinel_set.replicas():
        replica = node.client(decode_responses=True)
        wait_until(lambda: replica.get("written") == "to the master", what="the write replicated")
    client.close()


def test_chat_across_workers_through_sentinel(sentinel_set, worker_factory, clients, room):
    w1 = worker_factory("sentinel-1", redis_url=sentinel_set.url)
    w2 = worker_factory("sentinel-2", redis_url=sentinel_set.url)
    alice = clients("alice").connect(w1)
    bob = clients("bob").connect(w2)
    alice.join(room)
    bob.join(room)
    sent = alice.send(room, "through the master Sentinel names")
    assert sent["ok"]
    got = bob.wait_for("message", lambda got: got)
    assert [(m["id"], m["text"]) for m in got] == [(sent["id"], "through the master Sentinel names")]
    assert announce(sentinel_set.url, "--room", room, "tea").wait(timeout=30) == 0
    assert alice.wait_for("announcement", lambda got: got)[0]["text"] == "tea"
    assert bob.wait_for("announcement", lambda got: got)[0]["text"] == "tea"
    master = sentinel_set.master().client()
    assert master.pubsub_numsub("scalechat") == [(b"scalechat", 2)]  # both listeners there


def test_a_valkey_url_serves_chat(redis_server, worker_factory, clients, room):
    valkey_url = redis_server.url.replace("redis://", "valkey://")
    worker = worker_factory("valkey", redis_url=valkey_url)
    alice = clients("alice").connect(worker)
    alice.join(room)
    assert alice.send(room, "hello")["ok"]
    assert alice.wait_for("message", lambda got: got)[0]["text"] == "hello"


def test_an_idle_listener_keeps_its_subscription(own_redis, worker_factory):
    worker_factory("idle", redis_url=own_redis.url)
    first = subscribers(own_redis)
    assert len(first) == 1
    # quiet for longer than a command may wait for its reply, and python-socketio's first retry
    wait_until(lambda: min(subscribers(own_redis).values()) > COMMAND_TIMEOUT + 2, timeout=30,
               what="the subscription to outlive the command timeout")
    assert subscribers(own_redis).keys() == first.keys()  # never subscribed again


def test_a_stalled_redis_answers_unavailable_and_recovers_without_restarts(
        own_redis, worker_factory, clients, room):
    w1 = worker_factory("stall-1", redis_url=own_redis.url)
    w2 = worker_factory("stall-2", redis_url=own_redis.url)
    alice = clients("alice").connect(w1)
    bob = clients("bob").connect(w2)
    alice.join(room)
    bob.join(room)
    before = alice.send(room, "before the stall")["id"]
    listeners = subscribers(own_redis).keys()

    os.kill(own_redis.proc.pid, signal.SIGSTOP)
    try:
        announcing = announce(own_redis.url, "--room", room, "during the stall")
        refused = alice.send(room, "during the stall", client_id="stalled")
        assert refused == {"ok": False, "error": "unavailable", "detail": refused["detail"]}
        # a publish from the manager, retried once by python-socketio: bounded, then answered
        assert alice.sio.call("typing", {"room": room}, timeout=60) == {"ok": True}
        announcing.wait(timeout=60)
    finally:
        os.kill(own_redis.proc.pid, signal.SIGCONT)

    during = wait_until(lambda: (ack := alice.send(room, "during the stall",
                                                   client_id="stalled"))["ok"] and ack,
                        what="a send to succeed again")
    for client in (alice, bob):
        got = client.wait_for("message", lambda got: len(got) >= 2)
        assert [m["id"] for m in got] == [before, during["id"]]
    assert alice.call("typing", {"room": room}) == {"ok": True}
    bob.wait_for("typing", lambda got: got)
    wait_until(lambda: requests.get(w1.url + "/readyz", timeout=10).ok, what="w1 ready again")
    # the listeners kept their subscriptions through the stall: none subscribed again
    assert subscribers(own_redis).keys() == listeners

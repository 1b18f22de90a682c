"""Losing the Redis master: Sentinel promotes a replica and the chat goes on, nothing acknowledged lost.

A busy room of 30 clients on two workers sends continuously through a `kill -9` of the master,
a graceful `SENTINEL FAILOVER` and a replica restart. Afterwards the new master's stream holds
every acknowledged message once, and every client holds exactly that stream.
"""
import json
import threading
import time
import uuid

import pytest
import redis
import requests

from conftest import ChatClient, wait_until
from deployment import ResumingClient
from flask_app.keys import Keys
from flask_app.store import STORE_HOST_ID, id_order
from sentinel import SERVICE, own_sentinel_set  # noqa: F401 (a fixture)
from test_faults import Conversation, check_everyone_has_the_stream
from test_redis_connections import own_redis  # noqa: F401 (a fixture)

CLIENTS = 30


class RefusalClock:
    """A client on one worker sending a message every 50 ms, each until it is acknowledged:
    how long sends were refused, and that a refused send is delivered once when retried."""

    def __init__(self, worker, room):
        self.client = ChatClient(f"clock-{worker.worker_id}").connect(worker)
        self.client.join(room)
        self.room = room
        self.refused = []  # (monotonic time, error) of each refused attempt
        self.acked = []
        self.running = threading.Event()
        self.thread = threading.Thread(target=self._tick, daemon=True)

    def __enter__(self):
        self.running.set()
        self.thread.start()
        return self

    def _tick(self):
        while self.running.is_set():
            client_id = uuid.uuid4().hex
            while self.running.is_set():
                try:
                    ack = self.client.send(self.room, "tick", client_id=client_id)
                except Exception as exc:  # no answer in 10 s: also refused
                    ack = {"ok": False, "error": type(exc).__name__}
                if ack["ok"]:
                    self.acked.append(ack["id"])
                    break
                self.refused.append((time.monotonic(), ack["error"]))
                time.sleep(0.05)
            time.sleep(0.05)

    def __exit__(self, *exc):
        self.running.clear()
        self.thread.join(timeout=30)
        self.client.close()

    def window(self):
        """Seconds from the first refused send to the last (0 if none was refused)."""
        return self.refused[-1][0] - self.refused[0][0] if self.refused else 0.0


@pytest.fixture
def chat_on_sentinel(own_sentinel_set, worker_factory, room):
    """Two workers on the Sentinel set and 30 resuming clients in one room, half on each."""
    workers = [worker_factory(f"fo-{n}", redis_url=own_sentinel_set.url) for n in (1, 2)]
    clients = [ResumingClient(f"c{n:02d}", workers[n % 2]).start() for n in range(CLIENTS)]
    for client in clients:
        client.enter(room)
    yield own_sentinel_set, workers, clients
    for client in clients:
        client.close()


def master_stream(sentinels, room):
    """The room's stream ids on the master the Sentinels name now."""
    stream = Keys("scalechat:").room_stream(room)
    return [entry_id.decode() for entry_id, _ in sentinels.master().client().xrange(stream)]


def run_through(chat, room, fault):
    """Chat through `fault`; check nothing is lost or doubled; return the figures."""
    sentinels, workers, clients = chat
    clock_room = room + "-clock"  # the room's stream is the conversation's alone
    with RefusalClock(workers[0], clock_room) as clock1, \
            RefusalClock(workers[1], clock_room) as clock2, \
            Conversation(clients, room) as conversation:
        conversation.around(lambda: fault(sentinels))
        for worker in workers:
            wait_until(lambda: requests.get(worker.url + "/readyz", timeout=5).ok, timeout=30,
                       what=f"{worker.worker_id} ready")
    count = check_everyone_has_the_stream(workers[0], room, clients, conversation)
    on_master = master_stream(sentinels, room)
    assert len(on_master) == len(set(on_master)), "a message is stored twice"
    assert sorted(conversation.acked, key=id_order) == on_master, \
        "the new master differs from what was acked"
    ticks = master_stream(sentinels, clock_room)
    assert sorted(clock1.acked + clock2.acked, key=id_order) == ticks, \
        "an acknowledged tick is missing"
    figures = {"messages": count, "deliveries": count * len(clients),
               "refused_seconds": max(clock1.window(), clock2.window()),
               "refusals": len(clock1.refused) + len(clock2.refused),
               "resends": sum(c.resends for c in clients),
               "reconnects": sum(c.connects - 1 for c in clients)}
    print(f"\n{fault.__name__}: {figures['messages']} messages, {figures['deliveries']} "
          f"deliveries, sends refused for {figures['refused_seconds']:.1f} s "
          f"({figures['refusals']} refused attempts of the clocks), {figures['resends']} "
          f"re-sends, {figures['reconnects']} reconnects; 0 lost, 0 doubled, 0 out of order")
    return figures


def test_kill_9_of_the_master(chat_on_sentinel, room):
    def kill_9_of_the_master(sentinels):
        old = sentinels.master()
        old.kill()
        sentinels.wait_for_new_master(old.port)
    figures = run_through(chat_on_sentinel, room, kill_9_of_the_master)
    assert figures["refusals"] > 0  # the fault was felt


def test_graceful_sentinel_failover(chat_on_sentinel, room):
    def sentinel_failover(sentinels):
        old = sentinels.master_port()
        sentinels.sentinels()[0].execute_command("SENTINEL", "FAILOVER", SERVICE)
        sentinels.wait_for_new_master(old)
        wait_until(lambda: sentinels.node(old).role() == "slave", timeout=30,
                   what="the old master to follow the new one")
    run_through(chat_on_sentinel, room, sentinel_failover)


def test_replica_restart(chat_on_sentinel, room):
    def replica_restart(sentinels):
        replica = sentinels.replicas()[0]
        replica.kill()
        replica.start(replica_of=sentinels.master_port())
        sentinels.settle()
    figures = run_through(chat_on_sentinel, room, replica_restart)
    assert figures["refusals"] == 0  # the other replica acknowledges meanwhile


def publish_lost_message(redis_url, room, message_id):
    """Broadcast a message as the store does, without storing it: one its master then lost."""
    lost = {"id": message_id, "room": room, "user": "carol", "user_id": "guest:carol",
            "text": "lost with its master", "ts": int(message_id.split("-")[0]),
            "client_id": uuid.uuid4().hex}
    redis.Redis.from_url(redis_url).publish("scalechat", json.dumps({
        "method": "emit", "event": "message", "data": [lost], "namespace": "/", "room": room,
        "host_id": STORE_HOST_ID}))


def test_a_cursor_lost_with_its_master_still_resumes(own_redis, worker_factory, clients, room):
    w1 = worker_factory("lost-1", redis_url=own_redis.url)
    w2 = worker_factory("lost-2", redis_url=own_redis.url)
    alice = clients("alice").connect(w1)
    bob = clients("bob").connect(w2)
    alice.join(room)
    bob.join(room)
    first = alice.send(room, "kept")["id"]
    seconds, micros = redis.Redis.from_url(own_redis.url).time()
    lost = f"{seconds * 1000 + micros // 1000}-7"
    publish_lost_message(own_redis.url, room, lost)
    bob.wait_for("message", lambda got: [m["id"] for m in got] == [first, lost])

    bob.close()  # bob's cursor is a message the stream does not hold: it resumes from there
    bob_again = clients("bob").connect(w2, token=bob.token)
    assert bob_again.join(room, since=lost)["history"] == []
    after = alice.send(room, "after")
    assert id_order(after["id"]) > id_order(lost)
    assert [m["id"] for m in bob_again.wait_for("message", lambda got: got)] == [after["id"]]


def test_ids_follow_a_lost_message_whose_master_clock_ran_ahead(own_redis, worker_factory,
                                                               clients, room):
    """A master whose clock was ahead stores a message, broadcasts it, and is lost; its
    successor's clock would give later messages smaller ids. The workers' cursors are at the
    lost message, so the stream's next ids are made to follow it."""
    w1 = worker_factory("ahead-1", redis_url=own_redis.url)
    w2 = worker_factory("ahead-2", redis_url=own_redis.url)
    alice = clients("alice").connect(w1)
    bob = clients("bob").connect(w2)
    alice.join(room)
    bob.join(room)
    first = alice.send(room, "before")["id"]
    ahead = f"{int(time.time() * 1000) + 60_000}-0"  # a minute ahead of this host's clock
    publish_lost_message(own_redis.url, room, ahead)
    for client in (alice, bob):
        client.wait_for("message", lambda got: [m["id"] for m in got] == [first, ahead])
    # the listeners lose their subscription and replay, as after a failover
    admin = redis.Redis.from_url(own_redis.url, decode_responses=True)
    admin.client_kill_filter(_type="pubsub")
    stream = Keys("scalechat:").room_stream(room)
    wait_until(lambda: id_order(admin.xinfo_stream(stream)["last-generated-id"]) >= id_order(ahead),
               what="a replay to move the stream's next ids past the lost message")

    carol = clients("carol").connect(w2)
    assert carol.join(room, since=ahead)["history"] == []  # her cursor resumes as well
    after = alice.send(room, "after")
    assert after["ok"] and id_order(after["id"]) > id_order(ahead)
    for client in (alice, bob, carol):
        client.wait_for("message", lambda got: after["id"] in [m["id"] for m in got])


def test_a_listener_on_an_old_master_moves_and_is_unready_until_it_can(own_sentinel_set,
                                                                     worker_factory, clients,
                                                                     room):
    for node in own_sentinel_set.nodes:
        node.client().acl_setuser("chat", enabled=True, passwords=["+chat-password"],
                                  keys=["*"], channels=["*"], commands=["+@all"])
    url = own_sentinel_set.url.replace("redis+sentinel://", "redis+sentinel://chat:chat-password@")
    worker = worker_factory("off-master", redis_url=url)
    alice = clients("alice").connect(worker)
    alice.join(room)
    for replica in own_sentinel_set.replicas():  # whichever is promoted refuses our SUBSCRIBE
        replica.client().acl_setuser("chat", enabled=True, commands=["-subscribe"])
    old = own_sentinel_set.master_port()
    # Sentinel cannot demote the old master (as if cut off from it): it keeps our subscription
    # and answers our pings, but hears nothing of the new master
    own_sentinel_set.node(old).client().acl_setuser("default", enabled=True,
                                                    commands=["-replicaof", "-slaveof"])
    own_sentinel_set.sentinels()[0].execute_command("SENTINEL", "FAILOVER", SERVICE)
    new = own_sentinel_set.wait_for_new_master(old)

    def readiness():
        response = requests.get(worker.url + "/readyz", timeout=5)
        return response.status_code, response.json().get("reason")
    wait_until(lambda: readiness() == (503, "redis pub/sub listener is not subscribed on the "
                                            "master"), timeout=30, what="the worker to be unready")
    sent = wait_until(lambda: (ack := alice.send(room, "while unready"))["ok"] and ack,
                      timeout=30, what="sends to go to the new master")
    new.client().acl_setuser("chat", enabled=True, commands=["+subscribe"])
    wait_until(lambda: readiness()[0] == 200, timeout=30, what="the worker to be ready again")
    assert [m["id"] for m in alice.wait_for("message", lambda got: got)] == [sent["id"]]

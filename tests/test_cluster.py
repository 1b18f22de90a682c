"""scalechat on a Redis Cluster: rooms spread over three masters, each heard only where it has
members, through a master's failover and a slot's migration with nothing acknowledged lost."""
import subprocess

import pytest
import redis

from cluster import PASSWORD, redis_cluster, wait_for_failover  # noqa: F401 (a fixture)
from conftest import BIN, wait_until
from flask_app.keys import Keys
from flask_app.redis import redis_client
from flask_app.store import APPEND_AND_PUBLISH
from test_failover import RefusalClock

KEYS = Keys("scalechat:")


@pytest.fixture
def cluster_chat(redis_cluster, worker_factory, clients):
    """Two workers on the cluster; alice on the first and bob on the second, in a room on
    each master."""
    workers = [worker_factory(f"cl-{n}", redis_url=redis_cluster.url) for n in (1, 2)]
    rooms = redis_cluster.rooms_on_every_master(KEYS)
    alice = clients("alice").connect(workers[0])
    bob = clients("bob").connect(workers[1])
    for room in rooms:
        alice.join(room)
        bob.join(room)
    return workers, rooms, alice, bob


def subscribers(cluster, room):
    """How many workers subscribe to the room's channel, on the master of its slot."""
    channel = KEYS.room_channel(room)
    return cluster.master_of(channel).client().execute_command(
        "PUBSUB", "SHARDNUMSUB", channel)[1]


def stream_ids(cluster, room):
    client = redis.RedisCluster(host="127.0.0.1", port=cluster.living()[0].port,
                                password=PASSWORD)
    try:
        return [entry_id.decode() for entry_id, _ in client.xrange(KEYS.room_stream(room))]
    finally:
        client.close()


def check_everyone_has_every_stream(cluster, rooms, *members):
    """Each member holds each room's stream: every acknowledged message once, in order."""
    for room in rooms:
        stored = stream_ids(cluster, room)
        for member in members:
            member.wait_for("message", lambda got: len(member.messages(room)) >= len(stored),
                            timeout=30)
            assert [m["id"] for m in member.messages(room)] == stored, (member.name, room)


def test_chat_on_every_master_reaches_only_the_workers_with_members(redis_cluster, cluster_chat,
                                                                     clients):
    workers, rooms, alice, bob = cluster_chat
    carol = clients("carol").connect(workers[0])
    solo = rooms[0] + "-solo"
    carol.join(solo)
    sent = {room: [alice.send(room, f"hi {room}")["id"], bob.send(room, f"ho {room}")["id"]]
            for room in rooms}
    assert all(ack for ids in sent.values() for ack in ids)
    check_everyone_has_every_stream(redis_cluster, rooms, alice, bob)
    assert [subscribers(redis_cluster, room) for room in rooms] == [2, 2, 2]
    assert subscribers(redis_cluster, solo) == 1  # carol's worker only

    # a late joiner gets the history of a room on another shard; announcements reach members
    dave = clients("dave").connect(workers[1])
    assert [m["id"] for m in dave.join(rooms[2])["history"]] == sent[rooms[2]]
    for args, heard_by in ((["--room", solo], 1), (["--all"], 2)):
        done = subprocess.run([str(BIN / "scalechat"), "announce", *args, "tea"],
                              env={"REDIS_URL": redis_cluster.url, "PATH": "/usr/bin:/bin"},
                              capture_output=True, text=True, timeout=30)
        assert done.returncode == 0, done.stderr
        assert f"({heard_by} worker" in done.stdout
    carol.wait_for("announcement", lambda got: len(got) == 2)

    carol.call("leave", {"room": solo})
    wait_until(lambda: subscribers(redis_cluster, solo) == 0, timeout=15,
               what="the worker to drop the channel of a room it has no member in")


def test_a_master_killed_mid_conversation_loses_nothing(redis_cluster, cluster_chat):
    workers, rooms, alice, bob = cluster_chat
    victim = redis_cluster.master_of(KEYS.room_stream(rooms[0]))
    with RefusalClock(workers[0], rooms[0]) as clock, RefusalClock(workers[1], rooms[1]) as other:
        wait_until(lambda: len(clock.acked) >= 10 and len(other.acked) >= 10,
                   what="the conversation to get going")
        victim.kill()
        failover = wait_for_failover(redis_cluster, victim)
        # the promoted replica has no replica of its own, and refuses writes (as it must, for
        # an `ok` to mean replicated) until the old master, restarted, comes back as one
        victim.start()
        acked = len(clock.acked)
        wait_until(lambda: len(clock.acked) >= acked + 20, timeout=60,
                   what="sends to the failed-over shard to go on")
    assert redis_cluster.master_of(KEYS.room_stream(rooms[0])) is not victim
    check_everyone_has_every_stream(redis_cluster, rooms, alice, bob)
    assert subscribers(redis_cluster, rooms[0]) == 2  # both listeners moved to the new master
    print(f"failover {failover:.1f} s; sends refused for {clock.window():.1f} s "
          f"on the failed shard, {other.window():.1f} s on another")


def test_a_room_moved_to_another_master_is_heard_there(redis_cluster, cluster_chat):
    workers, rooms, alice, bob = cluster_chat
    before = alice.send(rooms[0], "before the move")["id"]
    target = redis_cluster.master_of(KEYS.room_stream(rooms[1]))
    redis_cluster.move_slot(KEYS.room_stream(rooms[0]), target)
    after = None
    while after is None:  # sends may meet the move (MOVED, ASK) and be answered unavailable
        ack = bob.send(rooms[0], "after the move", client_id="after-the-move")
        after = ack["id"] if ack["ok"] else None
    wait_until(lambda: subscribers(redis_cluster, rooms[0]) == 2, timeout=15,
               what="both workers to subscribe on the room's new master")
    assert stream_ids(redis_cluster, rooms[0]) == [before, after]
    check_everyone_has_every_stream(redis_cluster, rooms, alice, bob)


def test_a_script_across_two_slots_fails_loudly(redis_cluster):
    """The store script publishes on the room's channel: Redis refuses a channel of another
    slot rather than publish where the room's members are not listening."""
    node = redis_cluster.master_of(KEYS.room_stream("a"))
    keys = [KEYS.room_stream("a"), *(KEYS.dedup("a", p) for p in (1, 2, 3)),
            KEYS.room_channel("b")]
    with pytest.raises(redis.ResponseError, match="slot"):
        node.client().eval(APPEND_AND_PUBLISH, len(keys), *keys,
                           100, 1, "a", "u", "t", "c", "h", "i")
    client = redis_client(redis_cluster.url, 2)
    assert client.xlen(KEYS.room_stream("a")) == 0  # nothing stored either

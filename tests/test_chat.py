"""Chatting across worker processes: delivery, order, history, dedup, presence."""
import hashlib
import json
import signal
import threading
import time

import redis
import requests

from conftest import HoldingProxy, wait_until
from flask_app import presence
from flask_app.config import Config
from flask_app.keys import Keys


def test_every_member_receives_every_message_once_in_stream_order(workers, clients, room):
    w1, w2 = workers
    members = [clients(f"user{n}").connect(workers[n % 2]) for n in range(4)]
    for member in members:
        member.join(room)
    senders = [members[0], members[1]]  # one on each worker, sending at once
    acks = {sender.name: [] for sender in senders}

    def send_all(sender):
        for n in range(25):
            ack = sender.send(room, f"{sender.name} says {n}")
            assert ack["ok"], ack
            acks[sender.name].append(ack["id"])
    threads = [threading.Thread(target=send_all, args=(sender,)) for sender in senders]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    stored = [m["id"] for m in requests.get(
        f"{w1.url}/api/rooms/{room}/messages", params={"limit": 200},
        headers={"Authorization": f"Bearer {w1.token('reader')}"}, timeout=5).json()["messages"]]
    assert len(stored) == 50
    assert sorted(acks["user0"] + acks["user1"]) == sorted(stored)
    for member in members:
        received = member.wait_for("message", lambda got: len(got) >= 50)
        assert [m["id"] for m in received] == stored, f"{member.name} saw another order"
    assert {m["room"] for m in members[2].events["message"]} == {room}


def test_message_carries_sender_text_and_client_id(workers, clients, room):
    alice = clients("alice").connect(workers[0])
    bob = clients("bob").connect(workers[1])
    alice.join(room)
    bob.join(room)
    ack = alice.send(room, "héllo <b>wörld</b> 👋", client_id="abc-1")
    received = bob.wait_for("message", lambda got: got)[0]
    assert received == {"id": ack["id"], "room": room, "user": "alice",
                        "user_id": alice.user_id, "text": "héllo <b>wörld</b> 👋",
                        "ts": received["ts"], "client_id": "abc-1"}
    assert alice.user_id.startswith("guest:")
    assert received["ts"] == int(ack["id"].split("-")[0])


def test_retried_client_id_is_stored_and_broadcast_once(workers, clients, room):
    alice = clients("alice").connect(workers[0])
    bob = clients("bob").connect(workers[1])
    alice.join(room)
    bob.join(room)
    first = alice.send(room, "only once", client_id="retry-1")
    again = alice.send(room, "only once", client_id="retry-1")
    after = alice.send(room, "next", client_id="retry-2")
    assert first["ok"] and again == first
    got = bob.wait_for("message", lambda got: len(got) >= 2)
    assert [m["id"] for m in got] == [first["id"], after["id"]]
    history = bob.call("history", {"room": room})["messages"]
    assert [m["client_id"] for m in history] == ["retry-1", "retry-2"]


def test_a_retry_is_recognised_in_the_next_dedup_period_and_records_expire(
        redis_server, worker_factory, clients, room):
    ttl = 2
    worker = worker_factory("short-dedup", SCALECHAT_DEDUP_TTL=str(ttl))
    alice = clients("alice").connect(worker)
    alice.join(room)
    period = int(time.time()) // ttl
    first = alice.send(room, "once", client_id="across")
    wait_until(lambda: int(time.time()) // ttl > period, what="the next dedup period")
    assert alice.send(room, "once", client_id="across") == first
    admin = redis.Redis.from_url(redis_server.url)
    records = admin.keys(Keys("scalechat:").dedup(room, "*"))
    assert 1 <= len(records) <= 2  # the retry refreshed the record in its own period
    assert all(0 < admin.ttl(record) <= 3 * ttl for record in records)


def test_the_same_client_id_from_another_user_is_another_message(workers, clients, room):
    alice = clients("alice").connect(workers[0])
    bob = clients("bob").connect(workers[1])
    alice.join(room)
    bob.join(room)
    assert alice.send(room, "a", client_id="same")["id"] != bob.send(room, "b", client_id="same")["id"]


def test_history_on_join_and_paging(workers, clients, room):
    alice = clients("alice").connect(workers[0])
    alice.join(room)
    ids = [alice.send(room, f"m{n}")["id"] for n in range(8)]

    bob = clients("bob").connect(workers[1])
    ack = bob.join(room)
    assert [m["id"] for m in ack["history"]] == ids
    assert [m["text"] for m in ack["history"]] == [f"m{n}" for n in range(8)]

    newest = bob.call("history", {"room": room, "limit": 3})
    assert [m["id"] for m in newest["messages"]] == ids[-3:]
    older = bob.call("history", {"room": room, "before": ids[-3], "limit": 3})
    assert [m["id"] for m in older["messages"]] == ids[2:5]
    catch_up = bob.call("history", {"room": room, "after": ids[1], "limit": 2})
    assert [m["id"] for m in catch_up["messages"]] == ids[2:4]
    between = bob.call("history", {"room": room, "after": ids[1], "before": ids[4]})
    assert [m["id"] for m in between["messages"]] == ids[2:4]


def test_history_over_http(workers, room, clients):
    w1, w2 = workers
    alice = clients("alice").connect(w1)
    alice.join(room)
    ids = [alice.send(room, f"m{n}")["id"] for n in range(3)]
    headers = {"Authorization": f"Bearer {w2.token('reader')}"}
    response = requests.get(f"{w2.url}/api/rooms/{room}/messages",
                            params={"after": ids[0]}, headers=headers, timeout=5)
    assert response.status_code == 200
    assert [m["id"] for m in response.json()["messages"]] == ids[1:]
    assert requests.get(f"{w2.url}/api/rooms/{room}/messages", timeout=5).status_code == 401
    bad = requests.get(f"{w2.url}/api/rooms/{room}/messages", params={"limit": "0"},
                       headers=headers, timeout=5)
    assert bad.status_code == 400 and bad.json()["error"] == "invalid_limit"
    bad = requests.get(f"{w2.url}/api/rooms/No%20Such/messages", headers=headers, timeout=5)
    assert bad.status_code == 400 and bad.json()["error"] == "invalid_room"


def test_presence_is_cluster_wide_and_counts_users_not_tabs(workers, clients, room):
    w1, w2 = workers
    bob = clients("bob").connect(w2)
    bob_member = {"id": bob.user_id, "name": "bob"}
    assert bob.join(room)["members"] == [bob_member]
    alice_tab1 = clients("alice").connect(w1)
    alice_tab2 = clients("alice").connect(w2, token=alice_tab1.token)
    both = sorted([{"id": alice_tab1.user_id, "name": "alice"}, bob_member],
                  key=lambda member: member["id"])  # members come in user id order
    assert alice_tab1.join(room)["members"] == both
    assert alice_tab2.join(room)["members"] == both
    joins = bob.wait_for("presence", lambda got: got)
    assert joins == [{"room": room, "user": "alice", "user_id": alice_tab1.user_id,
                      "state": "join"}]

    alice_tab1.close()
    assert bob.call("join", {"room": room})["members"] == both
    assert alice_tab2.call("leave", {"room": room}) == {"ok": True}
    left = bob.wait_for("presence", lambda got: len(got) >= 2)
    assert left[1] == {"room": room, "user": "alice", "user_id": alice_tab1.user_id,
                       "state": "leave"}
    assert bob.call("join", {"room": room})["members"] == [bob_member]


def test_a_clean_disconnect_is_announced_at_once(workers, clients, room):
    w1, _ = workers
    log_start = w1.log_path.stat().st_size
    bob = clients("bob").connect(w1)
    bob.join(room)
    dave = clients("dave").connect(w1)
    dave.join(room)
    bob.wait_for("presence", lambda got: got)
    dave.close()  # a Socket.IO DISCONNECT packet, then the transport closes
    started = time.monotonic()
    left = bob.wait_for("presence", lambda got: len(got) >= 2, timeout=5)
    assert left[1] == {"room": room, "user": "dave", "user_id": dave.user_id, "state": "leave"}
    assert time.monotonic() - started < 1.5  # not the 3 s presence expiry
    assert "Traceback" not in w1.log_path.read_text()[log_start:]


def test_members_of_a_dead_worker_expire(worker_factory, workers, clients, room):
    doomed = worker_factory("doomed")
    bob = clients("bob").connect(workers[0])
    bob.join(room)
    carol = clients("carol").connect(doomed)
    carol.join(room)
    bob.wait_for("presence", lambda got: got)
    doomed.stop(signal.SIGKILL)
    left = bob.wait_for("presence", lambda got: len(got) >= 2, timeout=15)
    assert left[1] == {"room": room, "user": "carol", "user_id": carol.user_id, "state": "leave"}
    assert bob.call("join", {"room": room})["members"] == [{"id": bob.user_id, "name": "bob"}]


def test_typing_reaches_the_other_members_only(workers, clients, room):
    alice = clients("alice").connect(workers[0])
    bob = clients("bob").connect(workers[1])
    alice.join(room)
    bob.join(room)
    alice.sio.emit("typing", {"room": room})
    assert bob.wait_for("typing", lambda got: got) == [
        {"room": room, "user": "alice", "user_id": alice.user_id}]
    alice.send(room, "sync")
    alice.wait_for("message", lambda got: got)
    assert alice.events["typing"] == []


def test_rooms_are_listed_with_online_counts(workers, clients, room):
    alice = clients("alice").connect(workers[0])
    alice.join(room)
    response = requests.get(f"{workers[1].url}/api/rooms", timeout=5,
                            headers={"Authorization": f"Bearer {workers[1].token('x')}"})
    assert {"room": room, "online": 1} in response.json()["rooms"]



def test_the_first_member_of_a_room_is_announced_to_nobody(redis_server, workers, clients, room):
    listener = redis.Redis.from_url(redis_server.url).pubsub(ignore_subscribe_messages=True)
    listener.ssubscribe(Keys(Config.from_env().key_prefix).room_channel(room))
    alice = clients("alice").connect(workers[0])
    alice.join(room)
    bob = clients("bob").connect(workers[1])
    bob.join(room)
    alice.wait_for("presence", lambda got: got)
    published, deadline = [], time.monotonic() + 1
    while time.monotonic() < deadline:
        message = listener.get_message(timeout=0.1)
        if message is not None:
            published.append(json.loads(message["data"]))
    assert [(p["data"][0]["user"], p["data"][0]["user_id"]) for p in published
            if p["event"] == "presence" and p["room"] == room] == [("bob", bob.user_id)]
    listener.close()


def test_a_heartbeat_in_flight_does_not_bring_back_a_member_who_left(redis_server, worker_factory,
                                                                     workers, clients, room):
    proxy = HoldingProxy(redis_server.port)
    try:
        worker = worker_factory("beating", redis_url=proxy.url)
        alice = clients("alice").connect(worker)
        bob = clients("bob").connect(workers[1])
        alice.join(room)
        bob.join(room)
        beat = hashlib.sha1(presence.HEARTBEAT.encode()).hexdigest().encode()
        proxy.hold(lambda chunk: b"EVALSHA" in chunk and beat in chunk)
        assert proxy.holding.wait(10), "no heartbeat came"
        # the heartbeat has chosen whom to refresh, alice included; now she leaves
        leaving = threading.Thread(target=lambda: alice.call("leave", {"room": room}))
        leaving.start()
        leaving.join(2)  # the leave may wait for the heartbeat: then it finishes after it
        proxy.release()
        assert proxy.answered.wait(10)
        leaving.join(10)
        index = redis.Redis.from_url(redis_server.url).zrange(
            Keys("scalechat:").presence_index(room), 0, -1)
        assert [member.split(b"\x1f")[0].decode() for member in index] == [bob.user_id]
        assert bob.wait_for("presence", lambda got: got)[-1]["state"] == "leave"
    finally:
        proxy.close()


def test_a_join_answers_a_page_of_members_and_the_rest_are_paged(worker_factory, clients, room):
    """A join costs the same in any room: the first users, how many are online, and a cursor."""
    small = worker_factory("member-pages", SCALECHAT_MEMBERS_PAGE="3")
    people = [clients(f"p{n}").connect(small) for n in range(7)]
    for person in people:
        person.join(room)
    clients("p0").connect(small, token=people[0].token).join(room)  # a second tab: one user
    ack = people[0].call("join", {"room": room})
    assert ack["online"] == 7 and len(ack["members"]) == 3
    assert ack["members_next"] == ack["members"][-1]["id"]
    seen, after = list(ack["members"]), ack["members_next"]
    while after is not None:
        page = people[0].call("members", {"room": room, "after": after})
        assert page["ok"] and page["online"] == 7
        seen, after = seen + page["members"], page["next"]
    assert [m["id"] for m in seen] == sorted(person.user_id for person in people)

    for data, error in (({"room": room, "after": 5}, "invalid_cursor"),
                        ({"room": room, "after": "x\x1fy"}, "invalid_cursor"),
                        ({"room": room, "limit": 4}, "invalid_limit"),
                        ({"room": "Not A Room"}, "invalid_room")):
        assert people[0].call("members", data)["error"] == error, data
    outsider = clients("outsider").connect(small)
    assert outsider.call("members", {"room": room})["error"] == "not_member"


def test_a_large_room_tells_its_count_at_most_once_a_second_not_each_join(worker_factory,
                                                                          clients, room):
    """Beyond a page of users a join costs each member nothing: who came is not sent, and the
    count reaches them at most once a second, the latest one."""
    pair = [worker_factory(f"large-{n}", SCALECHAT_MEMBERS_PAGE="2") for n in range(2)]
    watcher = clients("watcher").connect(pair[0])
    watcher.join(room)
    first = clients("first").connect(pair[1])
    first.join(room)
    watcher.wait_for("presence", lambda got: got)  # 2 users: one page, announced by name
    crowd = [clients(f"c{n}").connect(pair[n % 2]) for n in range(12)]
    for person in crowd:
        person.join(room)
    counts = watcher.wait_for("online", lambda got: got and got[-1]["online"] == 14)
    assert len(counts) < len(crowd) and all(c == {"room": room, "online": c["online"]}
                                            for c in counts)
    assert len(watcher.events["presence"]) == 1
    assert crowd[0].call("leave", {"room": room}) == {"ok": True}
    crowd[1].close()
    watcher.wait_for("online", lambda got: got[-1]["online"] == 12)
    assert len(watcher.events["presence"]) == 1


def test_members_recorded_before_the_count_existed_are_counted(redis_server, workers, clients,
                                                               room):
    """Rooms whose presence predates the per-user count get it rebuilt from their members."""
    keys = Keys(Config.from_env().key_prefix)
    before = redis.Redis.from_url(redis_server.url)
    far = int(time.time() * 1000) + 60_000
    for user in ("old-1", "old-2"):
        member = f"{user}\x1fsid-{user}\x1f{user}"
        before.zadd(keys.presence_expiry(room), {member: far})
        before.zadd(keys.presence_index(room), {member: 0})
    alice = clients("alice").connect(workers[0])
    ack = alice.join(room)
    assert ack["online"] == 3
    assert {m["id"] for m in ack["members"]} == {"old-1", "old-2", alice.user_id}

"""Recovery and protection: resuming after a reconnect, Redis outages, graceful stops, limits."""
import json
import signal
import subprocess
import time

import pytest
import redis
import requests
import socketio
import websocket

from conftest import BIN, HoldingProxy, RedisServer, free_port, wait_until
from flask_app.keys import Keys
from flask_app.redis.pool import blocking_pool

CROWD = 400  # clients of one worker dropped at once: more than a Redis pool's 100


def test_rejoin_since_returns_exactly_what_was_missed(workers, clients, room):
    alice = clients("alice").connect(workers[0])
    alice.join(room)
    ids = [alice.send(room, f"m{n}")["id"] for n in range(6)]
    bob = clients("bob").connect(workers[1])
    ack = bob.join(room, since=ids[2])
    assert [m["id"] for m in ack["history"]] == ids[3:]
    assert ack["missed_more"] is False
    assert bob.join(room, since=ids[-1])["history"] == []


def test_missed_more_when_more_followed_than_fit(worker_factory, clients, room):
    small = worker_factory("small-pages", SCALECHAT_HISTORY_MAX_LIMIT="5")
    alice = clients("alice").connect(small)
    alice.join(room)
    ids = [alice.send(room, f"m{n}")["id"] for n in range(12)]
    ack = alice.join(room, since=ids[0])
    assert [m["id"] for m in ack["history"]] == ids[1:6] and ack["missed_more"] is True
    rest = alice.call("history", {"room": room, "after": ids[5], "limit": 5})["messages"]
    assert [m["id"] for m in rest] == ids[6:11]


def test_missed_more_when_the_bounded_history_dropped_some(worker_factory, clients, room):
    bounded = worker_factory("bounded", SCALECHAT_HISTORY_MAXLEN="10")
    alice = clients("alice").connect(bounded)
    alice.join(room)
    first = alice.send(room, "the first")["id"]
    for n in range(300):  # XADD MAXLEN ~ trims whole stream nodes (100 entries each)
        alice.send(room, f"m{n}")
    ack = alice.join(room, since=first)
    assert ack["missed_more"] is True
    assert ack["history"] and ack["history"][0]["text"] != "m0"


@pytest.fixture
def own_redis(tmp_path):
    """A Redis with an append-only file, restartable on the same port and data."""
    server = RedisServer(tmp_path)
    server.args = ["--appendonly", "yes", "--appendfsync", "always"]
    yield server
    server.stop()


def start_persistent(server):
    server.proc = subprocess.Popen(
        ["redis-server", "--port", str(server.port), "--bind", "127.0.0.1", "--dir",
         str(server.directory), "--save", "", *server.args], stdout=subprocess.DEVNULL)
    import redis
    client = redis.Redis.from_url(server.url)

    def answers():
        try:
            return client.ping()
        except redis.ConnectionError:
            return False
    wait_until(answers, what="the restarted redis-server")


def test_a_redis_restart_loses_nothing_and_needs_no_reconnect(own_redis, worker_factory,
                                                             clients, room):
    start_persistent(own_redis)
    w1 = worker_factory("outage-1", redis_url=own_redis.url)
    w2 = worker_factory("outage-2", redis_url=own_redis.url)
    alice = clients("alice").connect(w1)
    bob = clients("bob").connect(w2)
    alice.join(room)
    bob.join(room)
    before = alice.send(room, "before the outage")["id"]

    own_redis.stop()
    health = requests.get(w1.url + "/readyz", timeout=10)
    assert health.status_code == 503 and "redis" in health.json()["reason"]
    refused = alice.send(room, "during the outage", client_id="outage-msg")
    assert refused == {"ok": False, "error": "unavailable", "detail": refused["detail"]}

    # the listeners retry after 0.5 s, 1 s, then 2 s more: Redis is back in between, so they
    # re-subscribe only after the next sends are stored, and must catch up from the stream
    wait_until(lambda: all("subscribing again within 2.0 s" in w.log_path.read_text()
                           for w in (w1, w2)),
               what="both listeners to have failed to reconnect once")
    start_persistent(own_redis)
    during = wait_until(lambda: (ack := alice.send(room, "during the outage",
                                                   client_id="outage-msg"))["ok"] and ack,
                        what="a send to succeed again")
    after = bob.send(room, "after the outage")
    assert after["ok"]
    wait_until(lambda: requests.get(w1.url + "/readyz", timeout=5).ok, timeout=20,
               what="the worker to be ready again")
    expected = [before, during["id"], after["id"]]
    for client in (alice, bob):
        got = client.wait_for("message", lambda got: len(got) >= 3, timeout=90)
        assert [m["id"] for m in got] == expected
    assert [m["id"] for m in bob.call("history", {"room": room})["messages"]] == expected
    assert alice.sio.connected and bob.sio.connected
    replays = [w.log_path.read_text().count("missed while unsubscribed") for w in (w1, w2)]
    assert sum(replays) >= 1, "the listeners re-subscribed before the sends: nothing replayed"


def test_sigterm_moves_clients_off_and_exits_promptly(worker_factory, clients, room):
    leaving = worker_factory("leaving")
    alice = clients("alice")
    alice.sio = socketio.Client(reconnection=True, reconnection_delay=0.2)
    disconnects = []
    alice.sio.on("disconnect", lambda *reason: disconnects.append(reason))
    alice.connect(leaving)
    alice.join(room)
    started = time.monotonic()
    leaving.proc.send_signal(signal.SIGTERM)
    assert leaving.proc.wait(timeout=15) == 0
    assert time.monotonic() - started < 10
    wait_until(lambda: disconnects, what="the client to notice")
    # the transport was dropped without a goodbye, so the client tries to reconnect
    wait_until(lambda: alice.sio._reconnect_task is not None, what="a reconnect attempt")
    assert "stopping: no new connections" in leaving.log_path.read_text()


def test_a_flood_is_rate_limited_then_disconnected(worker_factory, clients, room):
    strict = worker_factory("strict", SCALECHAT_RATE_LIMIT="10", SCALECHAT_RATE_BURST="20",
                            SCALECHAT_RATE_DISCONNECT_AFTER="30")
    flooder = clients("flooder").connect(strict)
    calm = clients("calm").connect(strict)
    flooder.join(room)
    calm.join(room)
    acks = []
    for n in range(30):  # all at once: the bucket holds 20
        flooder.sio.emit("message", {"room": room, "text": f"spam {n}", "client_id": f"s{n}"},
                         callback=acks.append)
    wait_until(lambda: len(acks) == 30, what="every ack")
    assert 19 <= sum(ack["ok"] for ack in acks) <= 22  # the burst, less the join, plus refill
    limited = [ack for ack in acks if not ack["ok"]]
    assert {ack["error"] for ack in limited} == {"rate_limited"}
    for n in range(40):
        flooder.sio.emit("message", {"room": room, "text": "spam", "client_id": f"x{n}"})
    wait_until(lambda: not flooder.sio.connected, what="the flooder to be disconnected")
    assert calm.send(room, "still fine")["ok"]


def test_production_refuses_the_default_secret_key():
    result = subprocess.run([str(BIN / "scalechat-worker"), "--port", str(free_port())],
                            env={"SCALECHAT_ENV": "production", "PATH": "/usr/bin:/bin"},
                            capture_output=True, text=True, timeout=30)
    assert result.returncode != 0 and "SECRET_KEY must be set" in result.stderr


def handshake_status(worker, origin):
    """Engine.IO checks the Origin at the handshake, for polling and WebSocket alike."""
    response = requests.get(worker.url + "/socket.io/", params={"EIO": "4", "transport": "polling"},
                            headers={"Origin": origin}, timeout=5)
    return response.status_code, response.text


def test_origins_outside_the_allow_list_are_refused(worker_factory):
    listed = worker_factory("origins", SCALECHAT_ALLOWED_ORIGINS="https://chat.example")
    assert handshake_status(listed, "https://chat.example")[0] == 200
    assert handshake_status(listed, "https://evil.example")[0] == 403


def test_same_origin_only_by_default(workers):
    assert handshake_status(workers[0], workers[0].url)[0] == 200
    assert handshake_status(workers[0], "https://evil.example")[0] == 403


def test_pages_carry_security_headers(workers):
    response = requests.get(workers[0].url + "/", timeout=5)
    csp = response.headers["Content-Security-Policy"]
    assert "script-src 'self'" in csp and "unsafe-inline" not in csp
    assert response.headers["X-Content-Type-Options"] == "nosniff"
    browser = requests.Session()
    login = browser.post(workers[0].url + "/login", data={"name": "alice"}, timeout=5,
                         allow_redirects=False)
    assert "SameSite=Lax" in login.headers["Set-Cookie"]
    assert "HttpOnly" in login.headers["Set-Cookie"]


def test_a_burst_beyond_the_redis_pool_waits_instead_of_failing(worker_factory, clients, room):
    narrow = worker_factory("narrow-pool", SCALECHAT_REDIS_POOL="2")
    alice = clients("alice").connect(narrow)
    alice.join(room)
    acks = []
    for n in range(40):  # handled concurrently, each needing a Redis connection
        alice.sio.emit("message", {"room": room, "text": f"m{n}", "client_id": f"b{n}"},
                       callback=acks.append)
    wait_until(lambda: len(acks) == 40, what="every ack")
    assert all(ack["ok"] for ack in acks), [ack for ack in acks if not ack["ok"]][:3]


def test_a_mass_disconnect_announces_every_leave_and_keeps_the_subscription(workers, clients,
                                                                            room):
    w1, _ = workers
    log_start = w1.log_path.stat().st_size
    bob = clients("bob").connect(w1)
    bob.join(room)
    crowd = []
    url = w1.url.replace("http", "ws") + "/socket.io/?EIO=4&transport=websocket"
    with requests.Session() as http:
        for n in range(CROWD):
            token = http.post(w1.url + "/api/session", json={"name": f"c{n}"}, timeout=5)
            ws = websocket.create_connection(url, timeout=10)
            ws.recv()
            ws.send("40" + json.dumps({"token": token.json()["token"]}))
            ws.recv()
            ws.send("421" + json.dumps(["join", {"room": room}]))
            crowd.append(ws)
        for ws in crowd:  # every join acknowledged
            while not ws.recv().startswith("431"):
                pass
    # a page of users is announced by name, the room's count after it
    bob.wait_for("online", lambda got: got and got[-1]["online"] == CROWD + 1)
    for ws in crowd:  # dropped at once, as when a proxy restarts
        ws.shutdown()

    def bob_alone(presence):  # the count down to a page of users, then their names
        leaves = [p["user"] for p in presence if p["state"] == "leave"]
        assert len(set(leaves)) == len(leaves) and set(leaves) <= {f"c{n}" for n in range(CROWD)}
        return bob.events["online"][-1]["online"] - len(leaves) == 1
    bob.wait_for("presence", bob_alone, timeout=30)
    log = w1.log_path.read_text()[log_start:]
    assert "Cannot publish" not in log and "Cannot receive" not in log


def test_pooled_connections_tell_unread_bytes_and_a_close_as_redis_py_does(redis_server):
    pool = blocking_pool(redis_server.url, 1)
    conn = pool.get_connection()
    assert conn.can_read() is False
    conn.send_command("CLIENT", "ID")
    wait_until(conn.can_read, what="the reply waiting")
    client_id = conn.read_response()
    assert conn.can_read() is False
    redis.Redis.from_url(redis_server.url).client_kill_filter(_id=client_id)
    wait_until(lambda: _closed(conn), what="the close seen")
    pool.release(conn)
    fresh = pool.get_connection()  # the closed connection is replaced
    fresh.send_command("PING")
    assert fresh.read_response() == b"PONG"
    pool.disconnect()


def _closed(conn):
    try:
        conn.can_read()
    except redis.ConnectionError:
        return True
    return False


FUTURE = "4102444800000-0"  # 2100-01-01: a client with a fast clock, or a malicious one


def test_a_cursor_from_the_future_cannot_silence_a_room(workers, clients, room):
    bob = clients("bob").connect(workers[1])
    bob.join(room)
    first = bob.send(room, "before")["id"]
    mallory = clients("mallory").connect(workers[0])  # the first member of the room on worker 0
    refused = mallory.call("join", {"room": room, "since": FUTURE})
    assert refused["ok"] is False and refused["error"] == "invalid_cursor", refused
    alice = clients("alice").connect(workers[0])
    assert [m["id"] for m in alice.join(room)["history"]] == [first]
    sent = bob.send(room, "after")["id"]
    alice.wait_for("message", lambda got: [m["id"] for m in got] == [sent])
    assert mallory.join(room, since=first)["history"][0]["id"] == sent  # an honest resume works


@pytest.mark.parametrize("field", ["since", "after", "before"])
def test_cursors_beyond_64_bits_are_invalid_not_unavailable(workers, clients, room, field):
    alice = clients("alice").connect(workers[0])
    alice.join(room)
    for cursor in ["18446744073709551616-0", "0-18446744073709551616", "99999999999999999999"]:
        event = "join" if field == "since" else "history"
        ack = alice.call(event, {"room": room, field: cursor})
        assert ack["ok"] is False and ack["error"] == "invalid_cursor", (cursor, ack)


def test_the_extreme_cursors_answer_empty_pages(workers, clients, room):
    alice = clients("alice").connect(workers[0])
    alice.join(room)
    alice.send(room, "one")
    last = "18446744073709551615-18446744073709551615"
    assert alice.call("history", {"room": room, "after": last}) == {"ok": True, "messages": []}
    assert alice.call("history", {"room": room, "before": "0-0"}) == {"ok": True, "messages": []}


def test_a_join_that_fails_leaves_no_half_member(own_redis, worker_factory, clients, room):
    start_persistent(own_redis)
    worker = worker_factory("half", redis_url=own_redis.url)
    alice = clients("alice").connect(worker)
    own_redis.stop()
    refused = alice.call("join", {"room": room})
    assert refused["ok"] is False and refused["error"] == "unavailable", refused
    start_persistent(own_redis)
    wait_until(lambda: requests.get(worker.url + "/readyz", timeout=5).ok, timeout=30,
               what="the worker to hear Redis again")
    bob = clients("bob").connect(worker)
    bob.join(room)
    unseen = bob.send(room, "not for alice")["id"]
    bob.wait_for("message", lambda got: [m["id"] for m in got] == [unseen])
    refused = alice.call("message", {"room": room, "text": "hi", "client_id": "a1"})
    assert refused["ok"] is False and refused["error"] == "not_member"
    alice.join(room)
    seen = bob.send(room, "for alice")["id"]
    # one connection receives in order: had `unseen` reached alice, it would come first
    assert [m["id"] for m in alice.wait_for("message", lambda got: got)] == [seen]


def test_a_failed_replay_is_retried_until_the_gap_is_filled(tmp_path, worker_factory, clients,
                                                            room):
    """The replay after a resubscription fails (here: the worker may not read streams for a
    while); live messages must not move the worker past what its members missed."""
    server = RedisServer(tmp_path).start()
    try:
        admin = redis.Redis.from_url(server.url)
        admin.acl_setuser("listener", enabled=True, passwords=["+pw"], keys=["*"],
                          channels=["*"], commands=["+@all"])
        port = server.port
        w1 = worker_factory("gap", redis_url=f"redis://listener:pw@127.0.0.1:{port}/0")
        w2 = worker_factory("sender", redis_url=server.url)
        alice = clients("alice").connect(w1)
        bob = clients("bob").connect(w2)
        alice.join(room)
        bob.join(room)
        first = bob.send(room, "before")["id"]
        alice.wait_for("message", lambda got: len(got) == 1)

        admin.acl_setuser("listener", enabled=True, commands=["-xrange", "-xrevrange"])
        admin.client_kill_filter(_type="pubsub", user="listener")
        missed = [bob.send(room, f"missed {n}")["id"] for n in range(3)]  # while re-subscribing
        wait_until(lambda: "could not replay missed messages" in w1.log_path.read_text(),
                   what="the replay after re-subscribing to fail")
        live = bob.send(room, "live, after the failed replay")["id"]
        bob.wait_for("message", lambda got: got[-1]["id"] == live)
        admin.acl_setuser("listener", enabled=True, commands=["+xrange", "+xrevrange"])

        expected = [first, *missed, live]
        got = alice.wait_for("message", lambda got: len(got) >= len(expected), timeout=30)
        assert [m["id"] for m in got] == expected
        assert alice.sio.connected
    finally:
        server.stop()


def test_at_the_memory_bound_sends_are_refused_and_nothing_unstored_is_acked(
        tmp_path, worker_factory, clients, room):
    server = RedisServer(tmp_path).start()
    try:
        admin = redis.Redis.from_url(server.url, decode_responses=True)
        admin.config_set("maxmemory-policy", "noeviction")
        worker = worker_factory("bounded-memory", redis_url=server.url)
        alice = clients("alice").connect(worker)
        alice.join(room)
        admin.config_set("maxmemory", admin.info("memory")["used_memory"] + 256 * 1024)
        acked, refusal = [], None
        for n in range(2000):  # 256 KiB hold about 150 messages of 1,500 characters
            ack = alice.send(room, f"{n} " + "x" * 1500)
            if not ack["ok"]:
                refusal = ack
                break
            acked.append(ack["id"])
        assert refusal is not None and refusal["error"] == "storage_full", refusal
        stream = [entry_id for entry_id, _ in admin.xrange(Keys("scalechat:").room_stream(room))]
        assert stream == acked  # every ok was stored, nothing refused was
        bob = clients("bob").connect(worker)
        members = bob.join(room)["members"]  # joining still works at the bound
        assert sorted(member["name"] for member in members) == ["alice", "bob"]
        assert requests.get(worker.url + "/readyz", timeout=5).ok
        admin.config_set("maxmemory", 0)
        assert alice.send(room, "room again")["ok"]
    finally:
        server.stop()


def test_a_subscription_that_silently_stops_is_noticed_and_replayed(redis_server, worker_factory,
                                                                     clients, room):
    """The worker's probe through the publish path does not come back: it subscribes again and
    delivers what its members missed, without them reconnecting."""
    proxy = HoldingProxy(redis_server.port)
    try:
        direct = worker_factory("direct")
        silenced = worker_factory("silenced", redis_url=proxy.url)
        alice = clients("alice").connect(direct)
        bob = clients("bob").connect(silenced)
        alice.join(room)
        bob.join(room)
        proxy.mute_subscriptions()
        sent = [alice.send(room, f"while bob's worker hears nothing {n}")["id"] for n in range(3)]
        bob.wait_for("message", lambda got: len(got) == 3, timeout=30)
        assert [m["id"] for m in bob.messages(room)] == sent
        assert bob.sio.connected
    finally:
        proxy.close()


def test_a_worker_behind_its_loop_answers_busy_then_serves_the_retries(worker_factory, clients,
                                                                       room):
    """Sends that waited for a core longer than SCALECHAT_SHED_LAG_MS are refused `busy` before
    any Redis work, never `unavailable`; the same client_ids sent again are stored once."""
    worker = worker_factory("shedding", SCALECHAT_SHED_LAG_MS="100")
    alice = clients("alice").connect(worker)
    alice.join(room)
    acks = {}
    worker.proc.send_signal(signal.SIGSTOP)  # as a worker whose core is taken for a while
    try:
        for n in range(20):
            alice.sio.emit("message", {"room": room, "text": f"m{n}", "client_id": f"s{n}"},
                           callback=lambda ack, n=n: acks.__setitem__(n, ack))
        time.sleep(0.5)
    finally:
        worker.proc.send_signal(signal.SIGCONT)
    wait_until(lambda: len(acks) == 20, what="every ack")
    refused = sorted(n for n, ack in acks.items() if not ack["ok"])
    assert refused and {acks[n]["error"] for n in refused} == {"busy"}, acks
    for n in refused:
        wait_until(lambda n=n: alice.send(room, f"m{n}", client_id=f"s{n}")["ok"],
                   what=f"m{n} taken once the worker caught up")
    delivered = alice.wait_for("message", lambda got: len(got) >= 20)
    assert sorted(m["text"] for m in delivered) == sorted(f"m{n}" for n in range(20))

"""Auto-pipelining (flask_app/redis/batching.py) on a real Redis: the commands of one turn of
the loop share one round trip, and every caller gets its own reply or the batch's failure."""
import gevent
import redis
from conftest import RedisServer, free_port

from flask_app.redis import redis_client
from flask_app.redis.batching import MAX_BATCH, Batcher


def run_together(batcher, commands):
    """Issue `commands` from one greenlet each, all in the same turn; return their results."""
    calls = [gevent.spawn(batcher.run, *command) for command in commands]
    gevent.joinall(calls, timeout=10)
    return [call.get(block=False) for call in calls]


def test_a_turns_commands_share_one_round_trip_on_a_pool_of_one(redis_server):
    client = redis_client(redis_server.url, 1, decode_responses=True)
    client.delete("batching:n")
    trips = []
    batcher = Batcher(client, observe=trips.append)
    results = run_together(batcher, [("INCR", "batching:n")] * (MAX_BATCH + 10))
    # in order, one reply each, in two round trips: a batch holds at most MAX_BATCH
    assert [reply for reply, _ in results] == list(range(1, MAX_BATCH + 11))
    assert len(trips) == 2
    assert all(replicas is None for _, replicas in results)


def test_a_refused_command_answers_only_its_caller(redis_server):
    client = redis_client(redis_server.url, 4, decode_responses=True)
    client.set("batching:text", "x")
    batcher = Batcher(client)
    (wrong, _), (missing, _), (right, _) = run_together(
        batcher, [("INCR", "batching:text"), ("EVALSHA", "0" * 40, 0), ("GET", "batching:text")])
    assert isinstance(wrong, redis.ResponseError)
    assert isinstance(missing, redis.exceptions.NoScriptError)  # the store loads it and retries
    assert right == "x"


def test_a_batch_ends_with_one_wait_for_its_replicas(redis_server):
    client = redis_client(redis_server.url, 4, decode_responses=True)
    batcher = Batcher(client, replicas=1, replica_timeout=50)
    client.config_resetstat()
    results = run_together(batcher, [("SET", f"batching:{n}", n) for n in range(5)])
    assert results == [("OK", 0)] * 5  # this Redis has no replica: WAIT answers 0
    assert client.execute_command("INFO", "commandstats")["cmdstat_wait"]["calls"] == 1


def test_a_failed_connection_fails_every_caller_and_the_next_batch_reconnects(tmp_path):
    port = free_port()
    client = redis_client(f"redis://127.0.0.1:{port}/0", 2, decode_responses=True)
    batcher = Batcher(client)
    calls = [gevent.spawn(batcher.run, "PING") for _ in range(3)]
    gevent.joinall(calls, timeout=10)
    assert all(isinstance(call.exception, redis.ConnectionError) for call in calls)
    server = RedisServer(tmp_path, port).start()
    try:
        assert run_together(batcher, [("PING",)]) == [("PONG", None)]
    finally:
        server.stop()


"""The fault suite: a busy room of 50 clients across workers through a worker crash, a rolling
restart and a Redis restart. Afterwards every client holds exactly the room's stream."""
import os
import random
import signal
import threading
import time

import pytest

from conftest import wait_until
from deployment import clients_in, stream_ids

CLIENTS = 50
SEND_EVERY = 1.0  # seconds between one client's messages: 50 messages/s in the room


class Conversation:
    """Every client sends continuously, retrying each message with its client_id until acked."""

    def __init__(self, clients, room):
        self.clients = clients
        self.room = room
        self.running = threading.Event()
        self.acked = []
        self.threads = []

    def __enter__(self):
        self.running.set()
        for client in self.clients:
            thread = threading.Thread(target=self._chat, args=(client,), daemon=True)
            thread.start()
            self.threads.append(thread)
        return self

    def _chat(self, client):
        time.sleep(random.uniform(0, SEND_EVERY))
        n = 0
        while self.running.is_set() and n < 200:
            self.acked.append(client.send_reliably(self.room, f"{client.name} #{n}", timeout=90))
            n += 1
            time.sleep(SEND_EVERY)

    def around(self, fault):
        """Run `fault` once two messages a client are acknowledged; return when two more are."""
        wait_until(lambda: len(self.acked) >= 2 * len(self.clients), timeout=60,
                   what="the conversation to be under way")
        fault()
        after = len(self.acked)
        wait_until(lambda: len(self.acked) >= after + 2 * len(self.clients), timeout=90,
                   what="the conversation to go on after the fault")

    def __exit__(self, *exc):
        self.running.clear()
        for thread in self.threads:
            thread.join(timeout=120)


@pytest.fixture
def busy_room(stack, room):
    with clients_in(stack, room, CLIENTS) as clients:
        yield clients


def check_everyone_has_the_stream(stack, room, clients, conversation):
    stream = stream_ids(stack, room)
    assert len(stream) == len(set(stream))
    assert sorted(conversation.acked) == sorted(stream), "an acknowledged message is missing"
    for client in clients:
        client.wait_for("message", lambda got: set(stream) <= set(client.ids), timeout=60)
        assert client.ids == stream, f"{client.name} differs from the stream"
        assert client.out_of_order == 0, f"{client.name} saw messages out of order"
    return len(stream)


def run_fault(stack, room, clients, fault):
    with Conversation(clients, room) as conversation:
        conversation.around(fault)
    count = check_everyone_has_the_stream(stack, room, clients, conversation)
    assert count >= CLIENTS * 3
    print(f"\n{fault.__name__}: {count} messages, {count * len(clients)} deliveries, "
          f"{sum(c.connects - 1 for c in clients)} reconnects, "
          f"{sum(c.resends for c in clients)} re-sends; 0 lost, 0 doubled, 0 out of order")


def test_kill_9_of_a_worker(stack, busy_room, room):
    def crash():
        victim = stack.pids()["worker-00"]
        os.kill(victim, signal.SIGKILL)
        wait_until(lambda: stack.states()["worker-00"] == "RUNNING"
                   and stack.pids()["worker-00"] != victim, timeout=30, what="the restart")
    run_fault(stack, room, busy_room, crash)
    assert any(client.connects > 1 for client in busy_room)


def test_rolling_restart(stack, busy_room, room):
    def rolling_restart():
        stack.script("rolling-restart", "--drain-seconds", "1")
    run_fault(stack, room, busy_room, rolling_restart)
    assert all(client.connects > 1 for client in busy_room)


def test_redis_restart(stack, busy_room, room):
    def restart_redis():
        before = stack.pids()["redis"]
        stack.ctl("restart", "redis")
        assert stack.pids()["redis"] != before
    run_fault(stack, room, busy_room, restart_redis)

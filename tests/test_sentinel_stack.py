"""The stack with REDIS_TOPOLOGY=sentinel: a Redis master, two replicas and three Sentinels under
the same supervisord, a failover by hand, a killed master and a restart, with chat going on."""
import os
import pwd
import shutil
import signal
import subprocess
import threading
import time
import uuid

import pytest
import redis
import requests

from conftest import ROOT, wait_until
from deployment import (ResumingClient, Stack, check_clients_hear_each_other, clients_in, running,
                        service_dir, stream_ids)
from test_faults import Conversation, check_everyone_has_the_stream
from test_stack import uids, with_children

SERVICE = "scalechat"
NODES = [f"redis-{n}" for n in range(3)]
SENTINELS = [f"sentinel-{n}" for n in range(3)]
CLIENTS = 30


@pytest.fixture(scope="module")
def stack():
    with service_dir() as path, running(Stack(path / "var", topology="sentinel")) as started:
        yield started


def settings(stack):
    lines = (stack.var / "stack.env").read_text().splitlines()
    return dict(line.split("=", 1) for line in lines if not line.startswith("#"))


def sentinel(stack, n):
    return redis.Redis(port=int(stack.env["SENTINEL_PORT"]) + n, decode_responses=True,
                       socket_timeout=5)


def node(stack, name):
    port = int(stack.env["REDIS_PORT"]) + NODES.index(name)
    return redis.Redis(port=port, password=settings(stack)["REDIS_PASSWORD"],
                       decode_responses=True, socket_timeout=5)


def masters(stack):
    """The node each Sentinel names as master."""
    base = int(stack.env["REDIS_PORT"])
    named = []
    for n in range(3):
        _, port = sentinel(stack, n).sentinel_get_master_addr_by_name(SERVICE)
        named.append(NODES[int(port) - base])
    return named


def the_master(stack):
    named = masters(stack)
    assert len(set(named)) == 1, f"the Sentinels disagree: {named}"
    return named[0]


def replicated(stack):
    """True once every Sentinel names one master, which sees its two replicas online, each
    seeing its link up."""
    try:
        master = the_master(stack)
        replicas = [info for key, info in node(stack, master).info("replication").items()
                    if key.startswith("slave")]
        links = [node(stack, name).info("replication").get("master_link_status")
                 for name in NODES if name != master]
    except (redis.RedisError, AssertionError):
        return False
    return [r["state"] for r in replicas] == ["online", "online"] and links == ["up", "up"]


class Probe:
    """One client sending a message every 0.1 s, recording when a send was refused; a refused
    message is sent again with its client_id until acknowledged, as clients are told to (it
    may have been stored)."""

    def __init__(self, stack, room):
        self.client = ResumingClient("probe", stack).start()
        self.client.enter(room)
        self.room = room
        self.refusals = []  # (monotonic time, error)
        self.sent = []
        self.running = threading.Event()
        self.thread = threading.Thread(target=self._send, daemon=True)

    def __enter__(self):
        self.running.set()
        self.thread.start()
        return self

    def _send(self):
        client_id = uuid.uuid4().hex
        while self.running.is_set():
            try:
                ack = self.client.sio.call("message", {"room": self.room, "text": "probe",
                                                       "client_id": client_id}, timeout=10)
            except Exception:  # disconnected, or no answer: counts as refused
                ack = {"ok": False, "error": "no answer"}
            if ack.get("ok"):
                self.sent.append(ack["id"])
                client_id = uuid.uuid4().hex
            else:
                self.refusals.append((time.monotonic(), ack.get("error")))
            time.sleep(0.1)

    def __exit__(self, *exc):
        self.running.clear()
        self.thread.join(timeout=30)
        self.client.close()

    def refused_for(self):
        """Seconds from the first refused send to the last one."""
        if not self.refusals:
            return 0.0
        return self.refusals[-1][0] - self.refusals[0][0]


@pytest.fixture
def chatting(stack, room):
    with clients_in(stack, room, CLIENTS) as clients:
        yield clients


def through(stack, room, clients, fault):
    """Chat in `room` while `fault` runs; every acknowledged message is in the stream once and
    every client holds exactly the stream. Return what the probe saw."""
    with Probe(stack, room) as probe, Conversation(clients, room) as conversation:
        conversation.around(fault)
    conversation.acked += probe.sent
    check_everyone_has_the_stream(stack, room, clients, conversation)
    return probe


def test_every_node_and_sentinel_runs_as_the_service_user(stack):
    states = stack.states()
    assert set(states) == {*NODES, *SENTINELS, "haproxy", "metrics", "redis-exporter",
                           "worker-00", "worker-01"}
    assert set(states.values()) == {"RUNNING"}
    exporter = f"http://127.0.0.1:{stack.env['REDIS_EXPORTER_PORT']}/scrape"
    for n in range(3):  # Prometheus reaches every node through the one exporter
        target = f"redis://127.0.0.1:{int(stack.env['REDIS_PORT']) + n}"
        assert "\nredis_up 1\n" in requests.get(exporter, params={"target": target}, timeout=10).text
    expected = pwd.getpwnam("scalechat").pw_uid if os.getuid() == 0 else os.getuid()
    for name, pid in stack.pids().items():
        assert {uid for process in with_children(pid) for uid in uids(process)} == {expected}, name
    sentinels = ",".join(f"127.0.0.1:{int(stack.env['SENTINEL_PORT']) + n}" for n in range(3))
    assert settings(stack)["REDIS_URL"] == \
        f"redis+sentinel://:{settings(stack)['REDIS_PASSWORD']}@{sentinels}/0/{SERVICE}"
    wait_until(lambda: replicated(stack), timeout=30, what="two replicas following the master")
    assert the_master(stack) == "redis-0"
    for name in NODES:
        config = node(stack, name).config_get("*")
        assert (config["appendonly"], config["maxmemory"], config["maxmemory-policy"]) == \
            ("yes", str(512 << 20), "noeviction")
        assert (config["min-replicas-to-write"], config["min-replicas-max-lag"]) == ("1", "10")
        assert config["bind"] == "127.0.0.1 -::1"
        with pytest.raises(redis.AuthenticationError):
            redis.Redis(port=node(stack, name).connection_pool.connection_kwargs["port"]).ping()
    master = sentinel(stack, 0).sentinel_master(SERVICE)
    assert (master["quorum"], master["down-after-milliseconds"]) == (2, 5000)


def test_status_shows_the_master_its_replicas_and_what_each_sentinel_believes(stack):
    wait_until(lambda: replicated(stack), timeout=30, what="two replicas following the master")
    wait_until(lambda: all(sentinel(stack, n).sentinel_master(SERVICE)["num-other-sentinels"] == 2
                           for n in range(3)), timeout=30, what="the Sentinels to know each other")
    result = stack.script("status")
    lines = result.stdout.splitlines()
    base, sentinel_base = int(stack.env["REDIS_PORT"]), int(stack.env["SENTINEL_PORT"])
    assert f"== redis: Sentinel set, master name {SERVICE}" in lines
    for n in range(3):
        assert any(line.split()[:5] == [f"127.0.0.1:{sentinel_base + n}", f"127.0.0.1:{base}",
                                        "master", "2", "OK"] for line in lines), result.stdout
    assert f"master   127.0.0.1:{base}" in result.stdout
    assert "redis-0  role master, 2 replicas connected" in result.stdout
    for n in (1, 2):
        assert any(line.startswith(f"replica  127.0.0.1:{base + n}")
                   and f"redis-{n}  state online, link up, lag " in line for line in lines), result.stdout


def test_chat_goes_through_the_proxy_to_both_workers(stack, resuming, room):
    check_clients_hear_each_other(resuming, room)


def test_scaling_and_a_rolling_restart_work_with_sentinel(stack, resuming, room):
    nodes = {name: pid for name, pid in stack.pids().items() if name in NODES + SENTINELS}
    stack.script("scale", "3")
    assert stack.states()["worker-02"] == "RUNNING"
    stack.script("scale", "2")
    stack.script("rolling-restart", "--quiet", "--drain-seconds", "0")
    alice, bob = resuming("alice"), resuming("bob")
    alice.enter(room)
    bob.enter(room)
    sent = alice.send_reliably(room, "after scaling and restarting the workers")
    bob.wait_for("message", lambda got: sent in bob.ids)
    assert {name: pid for name, pid in stack.pids().items() if name in nodes} == nodes

def test_a_failover_for_maintenance_loses_nothing_and_configure_keeps_the_new_master(stack, chatting, room):
    wait_until(lambda: replicated(stack), timeout=30, what="two replicas following the master")
    before = the_master(stack)

    def failover():
        result = stack.script("failover")
        print(result.stdout, end="")
        assert the_master(stack) != before
    probe = through(stack, room, chatting, failover)
    after = the_master(stack)
    assert after != before
    wait_until(lambda: replicated(stack), timeout=60, what="the old master to follow the new one")
    print(f"\nfailover {before} -> {after}: sends refused for {probe.refused_for():.1f} s "
          f"({len(probe.refusals)} refusals: {sorted({e for _, e in probe.refusals})})")

    stack.script("configure")
    rendered = {name: (stack.var / "redis" / f"{name}.conf").read_text() for name in NODES}
    assert "replicaof" not in rendered[after]
    new_port = int(stack.env["REDIS_PORT"]) + NODES.index(after)
    for name in NODES:
        if name != after:
            assert f"\nreplicaof 127.0.0.1 {new_port}\n" in rendered[name], name
    assert masters(stack) == [after] * 3


def test_a_master_killed_with_sigkill_comes_back_and_nothing_is_lost(stack, chatting, room):
    wait_until(lambda: replicated(stack), timeout=60, what="two replicas following the master")
    victim = the_master(stack)
    old_pid = stack.pids()[victim]

    def kill_9():
        os.kill(old_pid, signal.SIGKILL)
        wait_until(lambda: stack.states()[victim] == "RUNNING" and stack.pids()[victim] != old_pid,
                   timeout=30, what="supervisord to restart the master")
        wait_until(lambda: replicated(stack), timeout=60, what="the nodes to replicate again")
    probe = through(stack, room, chatting, kill_9)
    print(f"\nkill -9 of {victim}: master now {the_master(stack)}, sends refused for "
          f"{probe.refused_for():.1f} s ({len(probe.refusals)} refusals)")


def test_a_master_lost_for_good_is_replaced_by_a_replica_and_nothing_is_lost(stack, chatting, room):
    wait_until(lambda: replicated(stack), timeout=60, what="two replicas following the master")
    victim = the_master(stack)
    old_pid = stack.pids()[victim]

    def lose_the_master():
        os.kill(old_pid, signal.SIGKILL)
        stack.ctl("stop", victim)  # its host is gone: supervisord must not bring it back
        wait_until(lambda: len(set(named := masters(stack))) == 1 and named[0] != victim,
                   timeout=60, what="every Sentinel to name a promoted replica")
        stack.ctl("start", victim)  # the host returns: Sentinel makes it a replica
        wait_until(lambda: replicated(stack), timeout=90, what="the nodes to replicate again")
    probe = through(stack, room, chatting, lose_the_master)
    print(f"\n{victim} lost: master now {the_master(stack)}, sends refused for "
          f"{probe.refused_for():.1f} s ({len(probe.refusals)} refusals)")


def test_a_restart_keeps_the_master_the_sentinels_chose_and_the_history(stack, resuming, room):
    wait_until(lambda: replicated(stack), timeout=60, what="two replicas following the master")
    writer = resuming("writer")
    writer.enter(room)
    sent = [writer.send_reliably(room, f"before the restart {n}") for n in range(3)]
    master = the_master(stack)
    pids = stack.pids()
    writer.close()
    stack.script("stop")
    assert not [pid for pid in pids.values() if os.path.exists(f"/proc/{pid}")]
    stack.script("run")
    assert masters(stack) == [master] * 3
    wait_until(lambda: replicated(stack), timeout=60, what="two replicas following the master")
    assert stream_ids(stack, room) == sent


def test_a_backup_taken_from_a_replica_restores_onto_the_master(stack, resuming, room):
    wait_until(lambda: replicated(stack), timeout=60, what="two replicas following the master")
    writer = resuming("writer")
    writer.enter(room)
    sent = [writer.send_reliably(room, f"to keep {n}") for n in range(3)]
    writer.close()
    backup = stack.script("backup")
    assert "(slave)" in backup.stdout  # the replica forked and sent the snapshot, not the master
    archive = next(line.split()[2] for line in backup.stdout.splitlines()
                   if line.startswith("backup: wrote "))
    stack.script("stop")
    shutil.rmtree(stack.var / "redis")  # every node's data is lost
    restored = stack.script("restore", archive)
    assert "restore: restored " in restored.stdout
    stack.script("run")
    wait_until(lambda: replicated(stack), timeout=60, what="the replicas to copy the restored master")
    assert stream_ids(stack, room) == sent


def test_the_topology_does_not_change_under_a_running_stack(stack):
    before = (stack.var / "stack.env").read_text()
    result = subprocess.run([str(ROOT / "deploy/configure")], env={**stack.env, "REDIS_TOPOLOGY": "single"},
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert "configure: the stack runs with sentinel Redis; to change to single, stop it first" in result.stderr
    assert (stack.var / "stack.env").read_text() == before
    assert (stack.var / "supervisor/redis-sentinel.conf").exists()


def test_a_topology_that_is_not_known_is_refused(service_tmp):
    stack = Stack(service_tmp / "var", topology="ring")
    result = stack.script("configure", check=False)
    assert result.returncode == 1
    assert "configure: REDIS_TOPOLOGY must be single (one Redis), sentinel (a master, two replicas, three" \
        " Sentinels) or cluster (three masters, three replicas), got 'ring'" in result.stderr
    assert not (service_tmp / "var/stack.env").exists()


def test_changing_topology_moves_the_data_to_the_new_master(service_tmp):
    stack = Stack(service_tmp / "var")
    stack.script("configure")
    redis_dir = stack.var / "redis"
    (redis_dir / "appendonlydir").mkdir()
    (redis_dir / "appendonlydir/history.aof").write_text("single")

    stack.env["REDIS_TOPOLOGY"] = "sentinel"
    result = stack.script("configure")
    assert f"moved the Redis data from {redis_dir} to {redis_dir}/redis-0" in result.stdout
    assert (redis_dir / "redis-0/appendonlydir/history.aof").read_text() == "single"
    assert not (redis_dir / "appendonlydir").exists()
    assert "replicaof" not in (redis_dir / "redis-0.conf").read_text()

    # the Sentinels failed over to redis-1 (one of them, with the newer epoch, wrote it down)
    port = int(stack.env["REDIS_PORT"])
    newest = stack.var / "sentinel/sentinel-1.conf"
    newest.write_text(newest.read_text().replace(f"127.0.0.1 {port} 2", f"127.0.0.1 {port + 1} 2")
                      + "sentinel config-epoch scalechat 1\n")
    (redis_dir / "redis-1/appendonlydir").mkdir()
    (redis_dir / "redis-1/appendonlydir/history.aof").write_text("after the failover")
    stack.script("configure")
    assert f"\nreplicaof 127.0.0.1 {port + 1}\n" in (redis_dir / "redis-0.conf").read_text()
    assert "replicaof" not in (redis_dir / "redis-1.conf").read_text()

    stack.env["REDIS_TOPOLOGY"] = "single"
    result = stack.script("configure")
    assert f"moved the Redis data from {redis_dir}/redis-1 to {redis_dir}" in result.stdout
    assert (redis_dir / "appendonlydir/history.aof").read_text() == "after the failover"
    assert not (stack.var / "supervisor/redis-sentinel.conf").exists()


def test_failover_explains_itself_and_refuses_a_single_redis(service_tmp):
    stack = Stack(service_tmp / "var")
    assert stack.script("failover", "--help").stdout.startswith("Usage: deploy/failover")
    stack.script("configure")
    result = stack.script("failover", check=False)
    assert result.returncode == 1
    assert "failover: REDIS_URL names one Redis, not a Sentinel set" in result.stderr

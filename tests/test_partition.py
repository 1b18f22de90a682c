"""A master cut off from the others acknowledges nothing the majority will not keep.

Three hosts (network namespaces): A runs the Redis master and a worker; B a replica, a
Sentinel and the second worker; C the other replica and two Sentinels. Clients chat on both
workers; A is cut off from B and C, so its master and worker only see each other (and A's own
clients). The Sentinels on B and C promote a replica, A's clients move to B's worker, and A is
joined again: Sentinel makes the old master a replica of the new one, dropping what it took
alone. Every `ok`, from either side, must be in the new master's stream once.
"""
import subprocess
import threading
import time
import uuid

import pytest
import redis
import requests

from conftest import ChatClient, wait_until
from deployment import ResumingClient
from flask_app.keys import Keys
from flask_app.store import id_order
from hosts import Balancer, HostWorker, three_hosts  # noqa: F401 (a fixture)
from sentinel import DOWN_AFTER_MS, FAILOVER_TIMEOUT_MS, QUORUM, SERVICE
from test_faults import Conversation

pytestmark = pytest.mark.hosts

CLIENTS = 10  # half on A's worker, half on B's
REDIS_PORT = 6379
# (host, port) of each Sentinel: the majority is on B and C
SENTINELS = (("b", 26379), ("c", 26379), ("c", 26380))


class HostNode:
    """A redis-server on a host, bound to the host's address."""

    def __init__(self, hosts, host, directory):
        self.hosts, self.host_name = hosts, host
        self.address = hosts.address(host)
        self.directory = directory / f"redis-{host}"
        self.directory.mkdir()
        self.proc = None

    def start(self, replica_of=None):
        args = ["redis-server", "--port", str(REDIS_PORT), "--bind", self.address,
                "--protected-mode", "no",  # no password on the hosts' private network
                "--dir", str(self.directory), "--save", "", "--appendonly", "no",
                "--min-replicas-to-write", "1", "--min-replicas-max-lag", "10",
                "--repl-diskless-sync-delay", "0"]
        if replica_of is not None:
            args += ["--replicaof", replica_of.address, str(REDIS_PORT)]
        self.proc = self.hosts.run(self.host_name, args, stdout=open(self.directory / "redis.log", "ab"),
                                   stderr=subprocess.STDOUT)
        wait_until(lambda: answers(self.client()), what=f"redis on host {self.host_name}")
        return self

    def client(self):
        return redis.Redis(host=self.address, port=REDIS_PORT, socket_timeout=5,
                           socket_connect_timeout=2)

    def replication(self):
        return self.client().info("replication")


class HostedSentinelSet:
    """The master on A, replicas on B and C, Sentinels as SENTINELS places them."""

    def __init__(self, hosts, directory):
        self.hosts, self.directory = hosts, directory
        self.nodes = {host: HostNode(hosts, host, directory) for host in ("a", "b", "c")}
        self.procs = []
        self.url = "redis+sentinel://" + ",".join(
            f"{hosts.address(host)}:{port}" for host, port in SENTINELS) + f"/0/{SERVICE}"

    def start(self):
        master = self.nodes["a"].start()
        for host in ("b", "c"):
            self.nodes[host].start(replica_of=master)
        for n, (host, port) in enumerate(SENTINELS):
            conf = self.directory / f"sentinel-{n}.conf"  # Sentinel rewrites its file
            address = self.hosts.address(host)
            conf.write_text(
                f"port {port}\nbind {address}\nprotected-mode no\nsentinel announce-ip {address}\n"
                f"dir {self.directory}\n"
                f"sentinel monitor {SERVICE} {master.address} {REDIS_PORT} {QUORUM}\n"
                f"sentinel down-after-milliseconds {SERVICE} {DOWN_AFTER_MS}\n"
                f"sentinel failover-timeout {SERVICE} {FAILOVER_TIMEOUT_MS}\n")
            self.procs.append(self.hosts.run(host, ["redis-server", str(conf), "--sentinel"],
                                             stdout=open(self.directory / f"sentinel-{n}.log", "ab"),
                                             stderr=subprocess.STDOUT))
        wait_until(self.settled, timeout=30, what="the Sentinels to know the whole set")
        return self

    def sentinels(self):
        return [redis.Redis(host=self.hosts.address(host), port=port, socket_timeout=5,
                            socket_connect_timeout=2, decode_responses=True)
                for host, port in SENTINELS]

    def settled(self):
        """Every Sentinel sees a master, both replicas in sync and the other two Sentinels."""
        try:
            for sentinel in self.sentinels():
                state = sentinel.sentinel_master(SERVICE)
                if not (state["is_master"] and state["num-slaves"] == 2
                        and state["num-other-sentinels"] == 2
                        and not state["is_sdown"] and not state["is_odown"]
                        and "failover_in_progress" not in state["flags"]):
                    return False
                if any(replica["is_sdown"] or replica["master-link-status"] != "ok"
                       for replica in sentinel.sentinel_slaves(SERVICE)):
                    return False
        except redis.ConnectionError:
            return False
        return True

    def master_named(self):
        """The host whose node every Sentinel names as master, or None while they differ."""
        try:
            addresses = {sentinel.sentinel_get_master_addr_by_name(SERVICE)[0]
                         for sentinel in self.sentinels()}
        except redis.ConnectionError:
            return None
        if len(addresses) != 1:
            return None
        address = addresses.pop()
        return next(host for host, node in self.nodes.items() if node.address == address)

    def stop(self):
        for proc in self.procs + [node.proc for node in self.nodes.values()]:
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()


def answers(client):
    try:
        return client.ping()
    except redis.ConnectionError:
        return False


class AnswerLog:
    """A client sending a message every 50 ms, each until acknowledged, noting every answer."""

    def __init__(self, worker, room):
        self.client = ChatClient(f"log-{worker.worker_id}").connect(worker)
        self.client.join(room)
        self.room = room
        self.answers = []  # (monotonic time, client_id, "ok" or the error, id or None)
        self.running = threading.Event()
        self.thread = threading.Thread(target=self._send, daemon=True)

    def __enter__(self):
        self.running.set()
        self.thread.start()
        return self

    def _send(self):
        while self.running.is_set():
            client_id = uuid.uuid4().hex
            while self.running.is_set():
                try:
                    ack = self.client.send(self.room, "tick", client_id=client_id)
                except Exception as exc:  # no answer within 10 s
                    ack = {"ok": False, "error": f"no answer ({type(exc).__name__})"}
                self.answers.append((time.monotonic(), client_id,
                                     "ok" if ack["ok"] else ack["error"], ack.get("id")))
                time.sleep(0.05)
                if ack["ok"]:
                    break

    def __exit__(self, *exc):
        self.running.clear()
        self.thread.join(timeout=30)
        self.client.close()

    def acked(self):
        return [message_id for _, _, answer, message_id in self.answers if answer == "ok"]

    def between(self, start, end):
        return [answer for answer in self.answers if start <= answer[0] <= end]


def stream(node, room):
    ids = [entry_id.decode() for entry_id, _ in node.client().xrange(Keys("scalechat:").room_stream(room))]
    assert len(ids) == len(set(ids)), f"a message is stored twice in {room}"
    return ids


@pytest.fixture
def partitioned_chat(three_hosts, tmp_path):
    """The Sentinel set and a worker on A and on B; everything stopped whatever happened."""
    redis_set = HostedSentinelSet(three_hosts, tmp_path)
    workers = []
    try:
        redis_set.start()
        workers += [HostWorker(three_hosts, host, redis_set.url, f"worker-{host}", tmp_path).start()
                    for host in ("a", "b")]
        yield redis_set, workers
    finally:
        for worker in workers:
            worker.stop()
        redis_set.stop()


def test_a_master_cut_off_acknowledges_nothing_the_majority_loses(three_hosts, partitioned_chat, room):
    redis_set, (worker_a, worker_b) = partitioned_chat
    balancer = Balancer(worker_a)  # A's clients' way in, moved to B once B's side has a master
    on_a = [ResumingClient(f"a{n}", balancer).start() for n in range(CLIENTS // 2)]
    on_b = [ResumingClient(f"b{n}", worker_b).start() for n in range(CLIENTS // 2)]
    clients = on_a + on_b
    try:
        for client in clients:
            client.enter(room)
        log_room = room + "-log"  # the conversation's stream is its own
        with AnswerLog(worker_a, log_room) as log_a, AnswerLog(worker_b, log_room) as log_b, \
                Conversation(clients, room) as conversation:
            wait_until(lambda: len(conversation.acked) >= 2 * CLIENTS, timeout=30,
                       what="the conversation to be under way")
            cut = time.monotonic()
            three_hosts.cut("a")
            new = wait_until(lambda: redis_set.master_named() not in (None, "a")
                             and redis_set.master_named(), timeout=30,
                             what="the Sentinels on B and C to promote a replica")
            promoted = time.monotonic()
            balancer.move_to(worker_b)
            after = len(conversation.acked)
            wait_until(lambda: len(conversation.acked) >= after + 2 * CLIENTS, timeout=30,
                       what="the conversation to go on on B's side")
            old = redis_set.nodes["a"]
            wait_until(lambda: old.replication()["min_slaves_good_slaves"] == 0, timeout=30,
                       what="the old master to refuse writes alone")
            fenced = time.monotonic()
            ready_a = requests.get(worker_a.url + "/readyz", timeout=5)
            alone = {"conversation": set(stream(old, room)) - set(stream(redis_set.nodes[new], room)),
                     "log": set(stream(old, log_room)) - set(stream(redis_set.nodes[new], log_room))}
            three_hosts.restore("a")
            restored = time.monotonic()
            wait_until(lambda: redis_set.settled() and redis_set.master_named() == new
                       and old.replication()["role"] == "slave", timeout=30,
                       what="Sentinel to make the old master a replica of the new one")
            demoted = time.monotonic()
            wait_until(lambda: any(t > restored and answer == "ok"
                                   for t, _, answer, _ in log_a.answers), timeout=30,
                       what="A's worker to acknowledge again")
            healed = min(t for t, _, answer, _ in log_a.answers if t > restored and answer == "ok")
            after = len(conversation.acked)
            wait_until(lambda: len(conversation.acked) >= after + CLIENTS, timeout=30,
                       what="the conversation to go on after A is back")

        master = redis_set.nodes[new]
        final, final_log = stream(master, room), stream(master, log_room)
        assert sorted(conversation.acked, key=id_order) == final, \
            "the new master differs from what was acked"
        assert sorted(log_a.acked() + log_b.acked(), key=id_order) == final_log, \
            "an acknowledged send is missing"
        assert stream(old, room) == final, "the old master did not drop what it took alone"
        during = log_a.between(cut, restored)
        oks_during = [message_id for _, _, answer, message_id in during if answer == "ok"]
        assert set(oks_during) <= set(final_log), "A acknowledged a send the majority lost"
        for client in on_b:  # the clients that stayed on B's side
            client.wait_for("message", lambda got: set(final) <= set(client.ids), timeout=30)
            assert client.ids == final, f"{client.name} differs from the stream"
            assert client.out_of_order == 0, f"{client.name} saw messages out of order"
        moved = {}
        for client in on_a:
            client.wait_for("message", lambda got: set(final) <= set(client.ids), timeout=30)
            moved[client.name] = sorted(set(client.ids) - set(final))
        assert all(set(ids) <= alone["conversation"] for ids in moved.values()), \
            "a client of A saw a message that A did not store alone"

        def tally(answers, since):
            kinds = {}
            for t, _, answer, _ in answers:
                kinds.setdefault(answer, []).append(t - since)
            return ", ".join(f"{len(ts)} x {answer} ({min(ts):.1f} – {max(ts):.1f} s)"
                             for answer, ts in kinds.items())
        print(f"\npartition of {restored - cut:.1f} s: promoted after {promoted - cut:.1f} s, "
              f"old master refusing writes after {fenced - cut:.1f} s; after the link came back, "
              f"A's worker acknowledging again after {healed - restored:.1f} s, the old master a "
              f"replica in sync after {demoted - restored:.1f} s; A's worker answered "
              f"after the cut: {tally(during, cut)}; after the link came back: "
              f"{tally(log_a.between(restored, healed), restored)}"
              + f"; /readyz of A during the partition: {ready_a.status_code} "
              f"{ready_a.json().get('reason', '')[:60]}; A's master stored "
              f"{len(alone['conversation'])} conversation and {len(alone['log'])} log messages "
              f"alone, dropped on resync; clients moved from A saw "
              f"{sum(len(ids) for ids in moved.values())} of them; {len(final)} messages, "
              f"{sum(c.resends for c in clients)} re-sends, "
              f"{sum(c.connects - 1 for c in clients)} reconnects; 0 acknowledged lost")
    finally:
        for client in clients:
            client.close()
        balancer.close()

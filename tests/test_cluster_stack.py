"""The stack with REDIS_TOPOLOGY=cluster: six Redis Cluster nodes under the same supervisord, formed
by deploy/run, a master lost for good and replaced by its replica, with chat going on; what
deploy/configure, deploy/backup and deploy/restore refuse."""
import hashlib
import io
import os
import signal
import subprocess
import tarfile

import pytest
import redis
import requests

from conftest import ROOT, wait_until
from deployment import Stack, check_clients_hear_each_other, running, service_dir, stream_ids
from test_redis_health import CLUSTER_ONLY, metric_names

NODES = [f"redis-{n}" for n in range(6)]


@pytest.fixture(scope="module")
def stack():
    with service_dir() as path, running(Stack(path / "var", topology="cluster")) as started:
        yield started


def settings(stack):
    lines = (stack.var / "stack.env").read_text().splitlines()
    return dict(line.split("=", 1) for line in lines if not line.startswith("#"))


def port(stack, name):
    return int(stack.env["REDIS_PORT"]) + NODES.index(name)


def name_of(stack, address):
    return NODES[int(address.rpartition(":")[2]) - int(stack.env["REDIS_PORT"])]


def node(stack, name):
    return redis.Redis(port=port(stack, name), password=settings(stack)["REDIS_PASSWORD"],
                       decode_responses=True, socket_timeout=5)


def cluster_nodes(stack, seen_from):
    """CLUSTER NODES as `seen_from` sees it: {name: (id, flags, master's name or None, slots)}."""
    lines = node(stack, seen_from).execute_command("CLUSTER", "NODES")
    lines = lines if isinstance(lines, str) else "\n".join(lines)
    fields = [line.split() for line in lines.splitlines() if line.strip()]
    names = {f[0]: name_of(stack, f[1].partition("@")[0]) for f in fields}
    return {names[f[0]]: (f[0], set(f[2].split(",")) - {"myself"}, names.get(f[3]), f[8:])
            for f in fields}


def shards(stack, seen_from):
    """{master: its replicas} of the masters that serve slots, as `seen_from` sees them."""
    known = cluster_nodes(stack, seen_from)
    return {name: sorted(r for r, (_, flags, master, _) in known.items()
                         if master == name and "fail" not in flags)
            for name, (_, flags, _, slots) in known.items() if "master" in flags and slots}


def whole(stack, names=NODES):
    """True when every node of `names` says cluster_state:ok and sees three masters with a
    replica each, whose link is up."""
    try:
        for name in names:
            if node(stack, name).cluster("info")["cluster_state"] != "ok":
                return False
            seen = shards(stack, name)
            if len(seen) != 3 or any(len(replicas) != 1 for replicas in seen.values()):
                return False
            if any(node(stack, replica).info("replication")["master_link_status"] != "up"
                   for replicas in seen.values() for replica in replicas):
                return False
    except redis.RedisError:
        return False
    return True


def test_six_nodes_form_three_shards_with_a_replica_each(stack):
    states = stack.states()
    assert set(states) == {*NODES, "haproxy", "metrics", "redis-exporter", "worker-00", "worker-01"}
    assert set(states.values()) == {"RUNNING"}
    base = int(stack.env["REDIS_PORT"])
    password = settings(stack)["REDIS_PASSWORD"]
    assert settings(stack)["REDIS_URL"] == "redis+cluster://:" + password + "@" + ",".join(
        f"127.0.0.1:{base + n}" for n in range(6))
    assert whole(stack)
    seen = shards(stack, "redis-0")
    assert sorted(seen) == ["redis-0", "redis-1", "redis-2"]  # the first three of the list
    assert all(replicas[0] != master for master, replicas in seen.items())
    for name in NODES:
        config = node(stack, name).config_get("*")
        assert (config["cluster-enabled"], config["cluster-config-file"], config["cluster-node-timeout"]) \
            == ("yes", "nodes.conf", "5000")
        assert config["dir"] == str(stack.var / "redis" / name)
        assert (stack.var / "redis" / name / "nodes.conf").exists()
        assert (config["appendonly"], config["maxmemory"], config["maxmemory-policy"]) == \
            ("yes", str(512 << 20), "noeviction")
        assert (config["min-replicas-to-write"], config["min-replicas-max-lag"]) == ("1", "10")
        assert config["bind"] == "127.0.0.1 -::1"
        with pytest.raises(redis.AuthenticationError):
            redis.Redis(port=port(stack, name)).ping()
    # Prometheus reaches every node through the one exporter, with each cluster series that the
    # alerts and the dashboard name
    exporter = f"http://127.0.0.1:{stack.env['REDIS_EXPORTER_PORT']}/scrape"
    for name in NODES:
        scraped = requests.get(exporter, params={"target": f"redis://127.0.0.1:{port(stack, name)}"},
                               timeout=10).text
        assert "\nredis_up 1\n" in scraped and "\nredis_cluster_state 1\n" in scraped, name
        assert CLUSTER_ONLY <= metric_names(scraped), name


def test_status_shows_the_cluster_and_each_shard(stack):
    wait_until(lambda: whole(stack), timeout=30, what="the cluster whole")
    result = stack.script("status")
    lines = result.stdout.splitlines()
    assert "== redis: Redis Cluster" in lines
    for field in ("cluster_state:ok", "cluster_slots_assigned:16384", "cluster_slots_ok:16384",
                  "cluster_slots_pfail:0", "cluster_slots_fail:0", "cluster_known_nodes:6",
                  "cluster_size:3"):
        assert field in lines, result.stdout
    base = int(stack.env["REDIS_PORT"])
    masters = [line.split() for line in lines if line.startswith("master ")]
    assert [(m[1], m[2], m[4]) for m in masters] == [
        (f"127.0.0.1:{base}", "redis-0", "0-5460,"), (f"127.0.0.1:{base + 1}", "redis-1", "5461-10922,"),
        (f"127.0.0.1:{base + 2}", "redis-2", "10923-16383,")], result.stdout
    replicas = [line for line in lines if line.startswith("replica ")]
    assert len(replicas) == 3 and all(" link up, lag " in line for line in replicas), result.stdout
    assert not [line for line in lines if line.startswith("down ")]


def test_chat_goes_through_the_proxy_to_both_workers(stack, resuming, room):
    check_clients_hear_each_other(resuming, room)


def test_a_second_deploy_run_leaves_the_formed_cluster_alone(stack):
    before = cluster_nodes(stack, "redis-0")
    pids = stack.pids()
    result = stack.script("run")
    assert "run: the Redis Cluster is formed already; not creating it" in result.stdout
    assert "forming the Redis Cluster" not in result.stdout
    assert cluster_nodes(stack, "redis-0") == before
    assert stack.pids() == pids


def test_a_master_lost_for_good_is_replaced_by_its_replica(stack, resuming, room):
    wait_until(lambda: whole(stack), timeout=30, what="the cluster whole")
    writer = resuming("writer")
    writer.enter(room)
    sent = [writer.send_reliably(room, "before the loss")]
    # the master of the room's shard, whichever it is
    slot = node(stack, "redis-0").cluster("keyslot", f"{{{room}}}")
    victim = next(name for name, (_, flags, _, slots) in cluster_nodes(stack, "redis-0").items()
                  if "master" in flags and any(int(r.split("-")[0]) <= slot <= int(r.split("-")[-1])
                                               for r in slots))
    [heir] = shards(stack, "redis-0")[victim]
    os.kill(stack.pids()[victim], signal.SIGKILL)
    stack.ctl("stop", victim)  # its host is gone: supervisord must not bring it back
    others = [name for name in NODES if name != victim]

    def promoted():
        try:
            return all(node(stack, name).cluster("info")["cluster_state"] == "ok"
                       and heir in shards(stack, name) for name in others)
        except redis.RedisError:
            return False
    wait_until(promoted, timeout=60, what=f"{heir} to take over {victim}'s slots")
    status = stack.script("status", check=False)
    assert status.returncode == 1  # the promoted master has no replica yet
    assert "cluster_state:ok" in status.stdout.splitlines()
    assert any(line.startswith("master ") and f" {heir} " in line and ", 0 replicas" in line
               for line in status.stdout.splitlines()), status.stdout
    assert any(line.startswith("down ") and f" {victim} " in line and "fail" in line
               for line in status.stdout.splitlines()), status.stdout

    stack.ctl("start", victim)  # the host returns: it rejoins as the replica of its heir
    wait_until(lambda: whole(stack), timeout=60, what=f"{victim} to rejoin as a replica")
    assert shards(stack, "redis-0")[heir] == [victim]
    sent.append(writer.send_reliably(room, "after the failover"))
    # the workers subscribe again while the returning node rejoins, briefly unready together
    wait_until(lambda: requests.post(stack.url + "/api/session", json={"name": "auditor"},
                                     timeout=5).ok, timeout=30, what="the proxy to serve again")
    assert stream_ids(stack, room) == sent


def test_backup_refuses_the_cluster(stack):
    backup = stack.script("backup", check=False)
    assert backup.returncode == 2
    assert "backup: the cluster topology (REDIS_TOPOLOGY=cluster) is not backed up" in backup.stderr
    assert not list((stack.var / "backups").glob("*.tar.gz"))


def test_the_topology_does_not_change_to_or_from_a_cluster_with_data(service_tmp):
    stack = Stack(service_tmp / "var")
    stack.script("configure")
    (stack.var / "redis/appendonlydir").mkdir()
    stack.env["REDIS_TOPOLOGY"] = "cluster"
    result = stack.script("configure", check=False)
    assert result.returncode == 1
    assert "configure: var/redis holds the data of the single topology" in result.stderr
    assert "REDIS_TOPOLOGY=single" in (stack.var / "stack.env").read_text()

    (stack.var / "redis/appendonlydir").rmdir()
    result = stack.script("configure")
    assert "embedded Redis Cluster: redis-0..5" in result.stdout
    assert (stack.var / "supervisor/redis-cluster.conf").read_text().count("[program:redis-") == 6
    rendered = (stack.var / "redis/redis-3.conf").read_text()
    assert f"\nport {int(stack.env['REDIS_PORT']) + 3}\n" in rendered
    assert f"\ninclude {ROOT}/deploy/redis-cluster.conf\n" in rendered
    assert "autostart=%(ENV_SCALECHAT_WORKERS_AUTOSTART)s" in \
        (stack.var / "supervisor/workers.conf").read_text()

    (stack.var / "redis/redis-0/nodes.conf").write_text("formed\n")
    moved = subprocess.run([str(ROOT / "deploy/configure")],
                           env={**stack.env, "REDIS_PORT": str(int(stack.env["REDIS_PORT"]) + 1)},
                           capture_output=True, text=True, timeout=60)
    assert moved.returncode == 1
    assert "configure: REDIS_PORT cannot change under a formed Redis Cluster" in moved.stderr

    (stack.var / "redis/redis-0/appendonlydir").mkdir()
    stack.env["REDIS_TOPOLOGY"] = "sentinel"
    result = stack.script("configure", check=False)
    assert result.returncode == 1
    assert "configure: var/redis holds the data of the cluster topology" in result.stderr
    assert (stack.var / "supervisor/redis-cluster.conf").exists()


def test_restore_refuses_to_put_settings_of_a_cluster_back(service_tmp):
    """An archive whose settings name the cluster topology, which deploy/backup never writes with
    data but an operator may bring: restore changes nothing."""
    settings_file = b"REDIS_TOPOLOGY=cluster\nREDIS_PORT=6380\n"
    files = {"MANIFEST": b"format=1\ncreated=now\nhost=elsewhere\n", "settings/stack.env": settings_file}
    files["SHA256SUMS"] = "".join(f"{hashlib.sha256(data).hexdigest()}  {name}\n"
                                  for name, data in sorted(files.items())).encode()
    archive = service_tmp / "scalechat-backup-cluster.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        for name, data in files.items():
            member = tarfile.TarInfo(name)
            member.size = len(data)
            tar.addfile(member, io.BytesIO(data))
    stack = Stack(service_tmp / "var")
    stack.script("configure")
    before = (stack.var / "stack.env").read_text()
    result = stack.script("restore", str(archive), check=False)
    assert result.returncode == 2
    assert "restore: the cluster topology (REDIS_TOPOLOGY=cluster, in " in result.stderr
    assert (stack.var / "stack.env").read_text() == before
    assert not list(stack.var.glob("*before-restore*"))

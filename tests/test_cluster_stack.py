"""REDIS_TOPOLOGY=cluster: deploy/configure renders six Redis Cluster nodes, refuses to carry
another topology's data across, and deploy/restore refuses to put data into a cluster."""
import hashlib
import io
import subprocess
import tarfile

from conftest import ROOT
from deployment import Stack


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

"""Backups as operators take them: deploy/backup from the running stack, deploy/restore after a loss."""
import hashlib
import io
import os
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest
import requests

from conftest import ROOT
from deployment import ResumingClient, Stack, running, service_dir, stream_ids


@pytest.fixture(scope="module")
def stack():
    with service_dir() as path, running(Stack(path / "var")) as started:
        yield started


def history(stack, room):
    """[(id, user, text)] of a room, oldest first, as a client reads it through the proxy."""
    headers = {"Authorization": f"Bearer {stack.token('auditor')}"}
    messages = requests.get(f"{stack.url}/api/rooms/{room}/messages",
                            params={"after": "0-0", "limit": 200}, headers=headers, timeout=10).json()
    return [(m["id"], m["user"], m["text"]) for m in messages["messages"]]


def lobby(stack):
    headers = {"Authorization": f"Bearer {stack.token('lobby')}"}
    return [entry["room"] for entry in
            requests.get(f"{stack.url}/api/rooms", headers=headers, timeout=10).json()["rooms"]]


def archive_members(path):
    with tarfile.open(path) as archive:
        return {member.name.removeprefix("./"): member for member in archive.getmembers()
                if member.isfile()}


def repack(source, target, change):
    """Copy archive `source` to `target` with its files' contents passed through change(files)."""
    with tarfile.open(source) as old:
        members = old.getmembers()
        files = {m.name.removeprefix("./"): old.extractfile(m).read() for m in members if m.isfile()}
    files = change(files)
    with tarfile.open(target, "w:gz") as new:
        for member in members:
            if member.isfile():
                data = files[member.name.removeprefix("./")]
                member.size = len(data)
                new.addfile(member, io.BytesIO(data))
            else:
                new.addfile(member)


def checksums(files):
    """SHA256SUMS as deploy/backup writes it, for `files`."""
    return "".join(f"{hashlib.sha256(data).hexdigest()}  {name}\n"
                   for name, data in sorted(files.items()) if name != "SHA256SUMS").encode()


def written(result):
    """The archive path that deploy/backup printed."""
    line = next(line for line in result.stdout.splitlines() if line.startswith("backup: wrote "))
    return line.split()[2]


def test_a_restore_after_losing_the_redis_data_brings_back_history_and_rooms(stack):
    rooms = ["backup-general", "backup-random"]
    alice, bob = ResumingClient("alice", stack).start(), ResumingClient("bob", stack).start()
    try:
        for client in (alice, bob):
            for room in rooms:
                client.enter(room)
        for n in range(3):
            alice.send_reliably(rooms[0], f"general {n}: it's $(not) `run` \"quoted\" ✓")
            bob.send_reliably(rooms[1], f"random {n}")
    finally:
        alice.close()
        bob.close()
    before = {room: history(stack, room) for room in rooms}
    assert [len(messages) for messages in before.values()] == [3, 3]
    rooms_before = lobby(stack)
    assert set(rooms) <= set(rooms_before)

    result = stack.script("backup")
    archive = written(result)
    assert archive.startswith(f"{stack.var}/backups/scalechat-backup-")
    assert "keys from Redis 7" in result.stdout and "(master)" in result.stdout
    assert (stack.var / "backups").stat().st_mode & 0o777 == 0o700
    assert (ROOT / archive).stat().st_mode & 0o777 == 0o600  # it holds the secrets
    assert set(archive_members(archive)) == {
        "MANIFEST", "SHA256SUMS", "redis/dump.rdb", "settings/stack.env", "settings/redis.conf",
        "settings/haproxy.cfg"}

    refused = stack.script("restore", archive, check=False)
    assert refused.returncode == 1
    assert "restore: the stack is running (supervisord pid" in refused.stderr
    assert "nothing restored" in refused.stderr
    assert history(stack, rooms[0]) == before[rooms[0]]

    stack.script("stop")
    shutil.rmtree(stack.var / "redis")  # the disk with Redis's data is lost
    (stack.var / "stack.env").unlink()
    result = stack.script("restore", archive)
    assert "restore: put back the settings (stack.env)" in result.stdout
    assert "restore: restored " in result.stdout
    stack.script("run")

    assert {room: history(stack, room) for room in rooms} == before
    assert lobby(stack) == rooms_before
    assert stream_ids(stack, rooms[1]) == [entry[0] for entry in before[rooms[1]]]


def test_a_data_only_restore_rolls_back_to_the_backup_and_keeps_the_newer_data_aside(stack, room):
    alice = ResumingClient("alice", stack).start()
    try:
        alice.enter(room)
        kept = alice.send_reliably(room, "before the backup")
        archive = written(stack.script("backup"))
        alice.send_reliably(room, "after the backup")
    finally:
        alice.close()
    settings = (stack.var / "stack.env").read_text()
    stack.script("stop")
    try:
        result = stack.script("restore", "--data-only", archive)
    finally:
        stack.script("run")
    aside = [path for path in stack.var.iterdir() if path.name.startswith("redis.before-restore-")]
    assert len(aside) == 1 and (aside[0] / "appendonlydir").is_dir()
    assert f"restore: moved the current Redis data to {aside[0]}" in result.stdout
    assert "put back the settings" not in result.stdout
    assert (stack.var / "stack.env").read_text() == settings
    assert [entry[2] for entry in history(stack, room)] == ["before the backup"]
    assert history(stack, room)[0][0] == kept


@pytest.mark.parametrize("damage, reason", [
    ("truncated", "is not a whole backup archive"),
    ("tampered", "is damaged: redis/dump.rdb: FAILED"),
    ("bad snapshot", "holds a damaged Redis snapshot"),
    ("foreign", "is not an archive of deploy/backup"),
])
def test_a_damaged_archive_is_refused_before_anything_changes(stack, service_tmp, damage, reason):
    good = written(stack.script("backup"))
    bad = service_tmp / "bad.tar.gz"
    if damage == "truncated":
        bad.write_bytes(open(good, "rb").read()[:-200])
    elif damage == "tampered":  # a flipped byte in the snapshot
        def flip(files):
            data = files["redis/dump.rdb"]
            files["redis/dump.rdb"] = data[:100] + bytes([data[100] ^ 1]) + data[101:]
            return files
        repack(good, bad, flip)
    elif damage == "bad snapshot":  # cut short, with checksums that match the cut
        def cut(files):
            files["redis/dump.rdb"] = files["redis/dump.rdb"][:len(files["redis/dump.rdb"]) // 2]
            files["SHA256SUMS"] = checksums(files)
            return files
        repack(good, bad, cut)
    else:  # another program's archive
        with tarfile.open(bad, "w:gz") as archive:
            archive.add(ROOT / "README.md", arcname="README.md")

    checked = stack.script("restore", "--check", str(bad), check=False)
    assert checked.returncode == 1, checked.stdout
    assert f"restore: {bad} {reason}" in checked.stderr and "nothing restored" in checked.stderr
    redis_before = sorted(path.name for path in (stack.var / "redis").iterdir())
    refused = stack.script("restore", str(bad), check=False)
    assert refused.returncode == 1 and reason in refused.stderr
    assert sorted(path.name for path in (stack.var / "redis").iterdir()) == redis_before
    assert stack.script("restore", "--check", good).returncode == 0


def test_only_the_newest_backups_are_kept(stack, service_tmp):
    backups = service_tmp / "backups"
    backups.mkdir()
    (backups / "notes.txt").write_text("an operator's file, not a backup\n")
    stack.env.update(BACKUP_DIR=str(backups), BACKUP_KEEP="2")
    try:
        made = [written(stack.script("backup")) for _ in range(3)]
        result = stack.script("backup")
    finally:
        del stack.env["BACKUP_DIR"], stack.env["BACKUP_KEEP"]
    made.append(written(result))
    assert sorted(str(path) for path in backups.glob("scalechat-backup-*")) == made[-2:]
    assert (backups / "notes.txt").exists()
    assert f"backup: removed {made[1]} (BACKUP_KEEP=2)" in result.stdout
    assert f"backup: archives kept in {backups}: 2 (BACKUP_KEEP=2)" in result.stdout
    assert not list(backups.glob(".partial*"))


def test_a_bad_keep_count_or_an_unreachable_redis_writes_nothing(stack, service_tmp):
    stack.env.update(BACKUP_DIR=str(service_tmp / "backups"), BACKUP_KEEP="none")
    try:
        result = stack.script("backup", check=False)
        assert result.returncode == 1
        assert "backup: BACKUP_KEEP must be a positive whole number, got 'none'" in result.stderr
        stack.env["BACKUP_KEEP"] = "3"
        stack.ctl("stop", "redis")
        result = stack.script("backup", check=False)
    finally:
        stack.ctl("start", "redis")
        del stack.env["BACKUP_DIR"], stack.env["BACKUP_KEEP"]
    assert result.returncode == 1
    assert f"backup: cannot reach Redis at 127.0.0.1:{stack.env['REDIS_PORT']}" in result.stderr
    assert "nothing written" in result.stderr
    assert not [path for path in (service_tmp / "backups").iterdir() if path.name != ".lock"]


@pytest.mark.parametrize("name", ["backup", "restore"])
def test_the_backup_scripts_explain_themselves(name):
    result = subprocess.run([str(ROOT / "deploy" / name), "--help"], capture_output=True,
                            text=True, timeout=10)
    assert result.returncode == 0 and result.stdout.startswith("Usage: deploy/" + name)
    wrong = subprocess.run([str(ROOT / "deploy" / name), "--bogus"], capture_output=True,
                           text=True, timeout=10)
    assert wrong.returncode == 2 and f"{name}: unknown option --bogus" in wrong.stderr


def test_the_backup_timer_and_service_verify(tmp_path):
    """The units name /opt/scalechat: verify them with this checkout's paths instead."""
    names = ["scalechat.service", "scalechat-backup.service", "scalechat-backup.timer"]
    for name in names:
        (tmp_path / name).write_text(
            (ROOT / "deploy" / name).read_text().replace("/opt/scalechat", str(ROOT)))
    result = subprocess.run(["systemd-analyze", "verify", *(str(tmp_path / name) for name in names[1:])],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "scalechat-backup" not in result.stderr, result.stderr
    service = (ROOT / "deploy/scalechat-backup.service").read_text()
    assert "\nUser=scalechat\n" in service and "\nExecStart=/opt/scalechat/deploy/backup\n" in service
    assert "\nPersistent=true\n" in (ROOT / "deploy/scalechat-backup.timer").read_text()


@pytest.mark.skipif(os.getuid() != 0, reason="only root hands the backup directory to another user")
def test_the_service_user_backs_up_a_stack_started_by_root(stack, service_tmp):
    """As scalechat-backup.service does: root makes the directory the user's own, the user
    reads the settings (root's, readable by its group) and writes the archive."""
    backups = service_tmp / "backups"
    subprocess.run(["install", "-d", "-m", "0700", "-o", "scalechat", "-g", "scalechat", str(backups)],
                   check=True)
    result = subprocess.run(
        ["setpriv", "--reuid=scalechat", "--regid=scalechat", "--init-groups", "--",
         str(ROOT / "deploy/backup")], env={**stack.env, "BACKUP_DIR": str(backups)}, cwd=ROOT,
        capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    archive = Path(written(result))
    assert archive.parent == backups and archive.owner() == "scalechat"
    assert stack.script("restore", "--check", str(archive)).returncode == 0


def test_with_an_external_redis_the_backup_holds_the_settings_only(service_tmp):
    stack = Stack(service_tmp / "var", REDIS_URL="redis://:secret@127.0.0.1:1/0")
    stack.script("configure")
    result = stack.script("backup")
    assert "the settings only: Redis is external (redis://127.0.0.1:1/0 is backed up where it runs)" \
        in result.stdout and "secret" not in result.stdout
    archive = written(result)
    assert set(archive_members(archive)) == {"MANIFEST", "SHA256SUMS", "settings/stack.env",
                                             "settings/redis.conf", "settings/haproxy.cfg"}
    result = stack.script("restore", "--check", archive)
    assert "checks: settings only (the stack's Redis was external)" in result.stdout
    refused = stack.script("restore", "--data-only", archive, check=False)
    assert refused.returncode == 1 and "holds no Redis data" in refused.stderr

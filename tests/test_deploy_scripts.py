"""The deploy scripts on their own: arguments, the settings file, the pid file, the unit file."""
import os
import pwd
import subprocess

import pytest
import redis

from conftest import ROOT, free_port, stop_process, wait_until
from deployment import ResumingClient, Stack, running

AWKWARD = "it's $(touch {marker}) `touch {marker}` two  spaces \\ \"quoted\" %s"
as_root_only = pytest.mark.skipif(os.getuid() != 0, reason="only root hands the stack to another user")


def configure(var, **settings):
    env = {key: value for key, value in os.environ.items()
           if not key.startswith(("SCALECHAT_", "REDIS_", "PROXY_"))}
    env.update({"SCALECHAT_VAR": str(var), "WORKERS": "2", **settings})
    return subprocess.run([str(ROOT / "deploy/configure")], env=env, capture_output=True, text=True,
                          timeout=60)


def loaded(var, name):
    """A setting as the deploy scripts see it after deploy/lib.sh's load_stack."""
    return subprocess.run(
        ["bash", "-c", f'. deploy/lib.sh; load_stack; printf %s "${name}"'], cwd=ROOT,
        env={"PATH": os.environ["PATH"], "SCALECHAT_VAR": str(var)},
        capture_output=True, text=True, timeout=30, check=True).stdout


def test_scale_refuses_a_count_that_is_not_a_number(service_tmp):
    stack = Stack(service_tmp / "var")
    for argument in ("abc", "0", "-1", "2x"):
        result = stack.script("scale", argument, check=False)
        assert result.returncode == 2, result.stderr
        assert f"scale: N must be a whole number from 1 to 9999, got '{argument}'" in result.stderr
        assert "Usage: deploy/scale N" in result.stderr
    result = stack.script("scale", check=False)
    assert result.returncode == 2 and "scale: the number of workers is missing" in result.stderr


def test_settings_with_quotes_substitutions_and_spaces_are_kept_literally(service_tmp):
    marker = service_tmp / "ran"
    secret = AWKWARD.format(marker=marker) % "key"
    password = AWKWARD.format(marker=marker) % "password"
    var = service_tmp / "var"
    result = configure(var, SECRET_KEY=secret, REDIS_PASSWORD=password, REDIS_PORT=str(free_port()),
                       SCALECHAT_ADMIN_PASSWORD="a 'b' $(c)")
    assert result.returncode == 0, result.stderr
    assert loaded(var, "SCALECHAT_ADMIN_PASSWORD") == "a 'b' $(c)"
    assert configure(var).returncode == 0  # a second run keeps what the first chose
    assert loaded(var, "SECRET_KEY") == secret
    assert loaded(var, "REDIS_PASSWORD") == password
    assert not marker.exists()

    # the embedded Redis takes the password from its rendered config, the workers from the URL
    server = subprocess.Popen(["redis-server", str(var / "redis.conf"), "--appendonly", "no"],
                              stdout=subprocess.DEVNULL)
    try:
        client = redis.Redis.from_url(loaded(var, "REDIS_URL"))

        def answers():
            try:
                return client.ping()
            except redis.ConnectionError:
                assert server.poll() is None, "redis-server exited"
                return False
        wait_until(answers, what="the embedded Redis with an awkward password")
        assert redis.Redis(port=int(loaded(var, "REDIS_PORT")), password=password).ping()
    finally:
        stop_process(server)


def test_a_setting_with_a_line_break_is_refused(service_tmp):
    var = service_tmp / "var"
    assert configure(var, SECRET_KEY="kept").returncode == 0
    result = configure(var, SECRET_KEY="two\nlines")
    assert result.returncode == 1
    assert "configure: SECRET_KEY holds a line break: stack.env keeps one KEY=VALUE a line" in result.stderr
    assert loaded(var, "SECRET_KEY") == "kept"


def test_the_redis_memory_bound_is_a_setting(service_tmp):
    var = service_tmp / "var"
    assert configure(var).returncode == 0
    assert "\nmaxmemory 512mb\n" in (var / "redis.conf").read_text()
    result = configure(var, REDIS_MAXMEMORY="64mb")
    assert result.returncode == 0 and "at most 64mb" in result.stdout
    assert configure(var).returncode == 0  # kept in stack.env
    assert "\nmaxmemory 64mb\n" in (var / "redis.conf").read_text()
    assert loaded(var, "REDIS_MAXMEMORY") == "64mb"
    result = configure(var, REDIS_MAXMEMORY="lots")
    assert result.returncode == 1
    assert "REDIS_MAXMEMORY must be a size such as 512mb or 2gb, got 'lots'" in result.stderr


@as_root_only
def test_configure_gives_var_to_the_service_user_and_keeps_the_rest_to_root(service_tmp):
    var = service_tmp / "var"
    assert configure(var).returncode == 0
    scalechat = pwd.getpwnam("scalechat")
    for name in ("run", "log", "redis", "metrics"):
        assert (var / name).stat().st_uid == scalechat.pw_uid
    for name in ("stack.env", "redis.conf", "haproxy.cfg", "supervisor/workers.conf", "."):
        info = (var / name).stat()
        assert (info.st_uid, info.st_gid) == (0, scalechat.pw_gid), name
        assert info.st_mode & 0o027 == 0, name  # the group reads, others nothing


@as_root_only
def test_configure_stops_when_the_service_user_cannot_reach_var(tmp_path):
    """pytest's temp dirs are under /tmp/pytest-of-root, mode 700, as a checkout under /root is."""
    result = configure(tmp_path / "var")
    assert result.returncode == 1
    closed = tmp_path.parents[1]
    assert f"configure: user scalechat, which the stack runs as, cannot read {tmp_path}/var/haproxy.cfg: " \
           f"{closed} (drwx------ root:root) is closed to it." in result.stderr
    assert "RUN_USER=root" in result.stderr


@as_root_only
def test_a_user_without_root_runs_the_stack_as_themselves(service_tmp, room):
    """As a developer's `make run`: supervisord and every program run as that user, with no
    sudo. The user scalechat stands in for the developer here."""
    developer = pwd.getpwnam("scalechat")
    os.chown(service_tmp, developer.pw_uid, developer.pw_gid)
    with running(Stack(service_tmp / "var", workers=1, as_user="scalechat")) as stack:
        supervisord = int((stack.var / "run/supervisord.pid").read_text())
        for pid in [supervisord, *stack.pids().values()]:
            with open(f"/proc/{pid}/status") as status:
                uid_line = next(line for line in status if line.startswith("Uid:"))
            assert set(map(int, uid_line.split()[1:])) == {developer.pw_uid}
        chat = [ResumingClient(name, stack).start() for name in ("dev1", "dev2")]
        try:
            for client in chat:
                client.enter(room)
            sent = chat[0].send_reliably(room, "hello from a developer's stack")
            chat[1].wait_for("message", lambda got: sent in chat[1].ids)
        finally:
            for client in chat:
                client.close()


def test_stop_leaves_alone_a_process_that_took_the_pid_of_a_stale_pid_file(service_tmp):
    (service_tmp / "var/run").mkdir(parents=True)
    bystander = subprocess.Popen(["sleep", "60"])
    try:
        (service_tmp / "var/run/supervisord.pid").write_text(f"{bystander.pid}\n")
        result = Stack(service_tmp / "var").script("stop", timeout=30)
        assert "not running (the pid file" in result.stdout
        assert bystander.poll() is None
    finally:
        stop_process(bystander)


def test_the_systemd_unit_verifies(tmp_path):
    """The unit names /opt/scalechat: verify it with this checkout's paths instead."""
    unit = tmp_path / "scalechat.service"
    unit.write_text((ROOT / "deploy/scalechat.service").read_text().replace("/opt/scalechat", str(ROOT)))
    result = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "scalechat.service" not in result.stderr, result.stderr


def test_the_scripts_read_a_sentinel_url_as_the_workers_do():
    """deploy/status and deploy/backup find the Sentinels and the password in REDIS_URL."""
    result = subprocess.run(
        ["bash", "-c", '. deploy/lib.sh; read_sentinel_url "$1"; '
                       'echo "$sentinel_name|$redis_user|$redis_password|${sentinels[*]}"', "-",
         "redis+sentinel://:p%40ss@10.0.0.1:26379,10.0.0.2:26380/0/chat"],
        cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "chat||p@ss|10.0.0.1:26379 10.0.0.2:26380\n"


@pytest.mark.parametrize("settings, message", [
    ({"PROXY_SERVERS": "10.0.0.2:8001,10.0.0.3"},
     "'10.0.0.3' is not IP:port"),
    ({"PROXY_SERVERS": "10.0.0.2:8001,,10.0.0.3:8001"},
     "PROXY_SERVERS has an empty entry: list IP:port,IP:port, got '10.0.0.2:8001,,10.0.0.3:8001'"),
    ({"PROXY_SERVERS": "10.0.0.2:8001,"}, "PROXY_SERVERS has an empty entry"),
    ({"PROXY_SERVERS": "10.0.0.2:70000"}, "'10.0.0.2:70000' is not IP:port"),
    ({"PROXY_SERVERS": "10.0.0.256:8001"}, "'10.0.0.256:8001' is not IP:port"),
    ({"PROXY_SERVERS": "workers.internal:8001"}, "'workers.internal:8001' is not IP:port"),
    ({"PROXY_SERVERS": "fd00::2:8001"}, "'fd00::2:8001' is not IP:port"),
    ({"PROXY_SERVERS": "10.0.0.2:8001, 10.0.0.2:8001"}, "PROXY_SERVERS lists 10.0.0.2:8001 twice"),
    ({"WORKER_HOST": "10.0.0"}, "WORKER_HOST must be an IP address such as 127.0.0.1 or 10.0.0.2, got '10.0.0'"),
    ({"WORKER_HOST": "worker-a"}, "got 'worker-a'"),
    ({"WORKERS": "0"}, "WORKERS=0 leaves the proxy no workers of this host"),
    ({"WORKERS": "0", "PROXY_SERVERS": "none"}, "WORKERS=0 with PROXY_SERVERS=none leaves this host nothing to run"),
])
def test_configure_refuses_roles_it_cannot_read(service_tmp, settings, message):
    var = service_tmp / "var"
    result = configure(var, **settings)
    assert result.returncode == 2, result.stderr
    assert message in result.stderr
    assert not (var / "stack.env").exists()


def test_a_proxy_host_sends_to_other_hosts_workers_and_runs_no_redis(service_tmp):
    var = service_tmp / "var"
    result = configure(var, WORKERS="0", PUBLIC_BIND="0.0.0.0",
                       PROXY_SERVERS="10.0.0.2:8001, 10.0.0.2:8002,10.0.0.3:8001,[fd00::4]:8001")
    assert result.returncode == 0, result.stderr
    assert "proxy on 0.0.0.0:8000 in front of 4 workers" in result.stdout
    assert "no Redis on this host" in result.stdout
    servers = [line.split() for line in (var / "haproxy.cfg").read_text().splitlines()
               if line.strip().startswith("server ")]
    assert [server[1:3] for server in servers] == [
        ["10.0.0.2:8001", "10.0.0.2:8001"], ["10.0.0.2:8002", "10.0.0.2:8002"],
        ["10.0.0.3:8001", "10.0.0.3:8001"], ["fd00::4:8001", "[fd00::4]:8001"]]
    assert all(server[3] == "cookie" and server[5:] == ["check", "tcp-ut", "5s"] for server in servers)
    cookies = {server[2]: server[4] for server in servers}
    assert len(set(cookies.values())) == 4
    check = subprocess.run(["haproxy", "-c", "-f", str(var / "haproxy.cfg")], capture_output=True,
                           text=True, timeout=30)
    assert check.returncode == 0, check.stdout + check.stderr
    assert (loaded(var, "SCALECHAT_REDIS_PROCS"), loaded(var, "SCALECHAT_EXPORTER_PROCS"),
            loaded(var, "SCALECHAT_PROXY_PROCS"), loaded(var, "REDIS_URL")) == ("0", "0", "1", "")
    assert (var / "supervisor/workers.conf").read_text().count("[program:") == 0

    # another proxy listing the same workers in another order sends each client to the same one
    other = service_tmp / "other"
    assert configure(other, WORKERS="0", PROXY_SERVERS="[fd00::4]:8001,10.0.0.3:8001,"
                     "10.0.0.2:8002,10.0.0.2:8001").returncode == 0
    assert {line.split()[2]: line.split()[4] for line in (other / "haproxy.cfg").read_text().splitlines()
            if line.strip().startswith("server ")} == cookies


@pytest.mark.parametrize("redis_url", [
    "redis://:pw@10.0.0.3:6379/0",
    "redis+sentinel://:pw@10.0.0.2:26379,10.0.0.3:26379,10.0.0.4:26379/0/scalechat",
    "redis+cluster://:pw@10.0.0.2:7000,10.0.0.3:7000",
])
def test_a_worker_host_serves_another_hosts_proxy_from_an_external_redis(service_tmp, redis_url):
    var = service_tmp / "var"
    result = configure(var, REDIS_URL=redis_url, WORKER_HOST="10.0.0.2", PROXY_SERVERS="none",
                       REDIS_TOPOLOGY="sentinel")
    assert result.returncode == 0, result.stderr
    assert "2 workers on 10.0.0.2 ports 8001-8002" in result.stdout
    assert "no proxy on this host" in result.stdout
    workers = (var / "supervisor/workers.conf").read_text()
    assert "scalechat-worker --host 10.0.0.2 --port 8001\n" in workers
    assert 'environment=SCALECHAT_WORKER_ID="worker-01@10.0.0.2"' in workers
    assert not (var / "haproxy.cfg").exists()
    assert not (var / "supervisor/redis-sentinel.conf").exists()
    assert (loaded(var, "SCALECHAT_REDIS_PROCS"), loaded(var, "SCALECHAT_EXPORTER_PROCS"),
            loaded(var, "SCALECHAT_PROXY_PROCS"), loaded(var, "REDIS_URL")) == ("0", "0", "0", redis_url)
    assert configure(var).returncode == 0  # kept in stack.env
    assert loaded(var, "WORKER_HOST") == "10.0.0.2" and loaded(var, "PROXY_SERVERS") == "none"

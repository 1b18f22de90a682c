"""The deployed stack: supervisord, the embedded Redis, the workers and HAProxy, for real."""
import os
import pwd
import signal
import socket
import subprocess
import threading
import time

import pytest
import redis
import requests

from conftest import ROOT, RedisServer, wait_until
from deployment import Stack, check_clients_hear_each_other, stream_ids


def uids(pid):
    """The real, effective, saved and filesystem uids of a process."""
    with open(f"/proc/{pid}/status") as status:
        line = next(line for line in status if line.startswith("Uid:"))
    return set(map(int, line.split()[1:]))


def with_children(pid):
    """A process and its children (HAProxy's master forks its worker)."""
    children = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    return [pid, *map(int, children.split())]


def announce(stack, *args, **env):
    """`scalechat announce` as an operator runs it: from elsewhere, with none of the stack's
    settings in the environment, only where it lives."""
    environ = {key: value for key, value in stack.env.items()
               if key not in ("PORT", "REDIS_PORT", "WORKERS", "STATS_PORT", "METRICS_PORT",
                              "WORKER_PORT_BASE") and not key.startswith("SCALECHAT_")}
    environ.update(SCALECHAT_VAR=str(stack.var), **env)
    return subprocess.run([str(ROOT / ".venv/bin/scalechat"), "announce", *args], env=environ,
                          cwd="/", capture_output=True, text=True, timeout=30)


def test_every_program_of_the_stack_is_running(stack):
    states = stack.states()
    assert set(states) == {"redis", "redis-exporter", "haproxy", "metrics", "worker-00", "worker-01"}
    assert set(states.values()) == {"RUNNING"}
    status = stack.script("status")
    assert "worker-00 " in status.stdout and "UP" in status.stdout
    assert "clients 0  messages stored" in status.stdout
    exported = requests.get(f"http://127.0.0.1:{stack.env['METRICS_PORT']}/metrics", timeout=5).text
    assert 'scalechat_connected_clients{worker="worker-01"} 0.0' in exported


def test_every_program_runs_as_an_unprivileged_user_and_still_serves_chat(stack, resuming, room):
    """Started as root, Redis, HAProxy, the workers and the exporters run as `scalechat`; started
    by a developer, as that developer."""
    expected = pwd.getpwnam("scalechat").pw_uid if os.getuid() == 0 else os.getuid()
    running_as = {name: {uid for process in with_children(pid) for uid in uids(process)}
                  for name, pid in stack.pids().items()}
    assert set(running_as) == {"redis", "redis-exporter", "haproxy", "metrics", "worker-00", "worker-01"}
    assert all(found == {expected} for found in running_as.values()), running_as
    assert expected != 0
    alice, bob = resuming("alice"), resuming("bob")
    alice.enter(room)
    bob.enter(room)
    sent = alice.send_reliably(room, "from an unprivileged worker")
    bob.wait_for("message", lambda got: sent in bob.ids)


def test_redis_is_bounded_and_refuses_writes_rather_than_evict(stack):
    assert "\nmaxmemory 512mb\n" in (stack.var / "redis.conf").read_text()
    settings = dict(line.split("=", 1) for line in (stack.var / "stack.env").read_text().splitlines()
                    if not line.startswith("#"))
    client = redis.Redis.from_url(settings["REDIS_URL"])
    assert client.config_get("maxmemory") == {"maxmemory": str(512 << 20)}
    assert client.config_get("maxmemory-policy") == {"maxmemory-policy": "noeviction"}


def test_an_operator_announces_without_loading_the_stack_settings(stack, resuming, room):
    listener = resuming("listener")
    result = announce(stack, "--all", "maintenance at noon")
    assert result.returncode == 0, result.stderr
    assert result.stdout == "announced to every client (2 workers listening)\n"
    listener.wait_for("announcement", lambda got: [a["text"] for a in got] == ["maintenance at noon"])

    # a REDIS_URL of the operator's own wins over the stack's
    down = RedisServer(stack.var / "redis").start()
    down.stop()
    result = announce(stack, "--all", "never sent", REDIS_URL=down.url)
    assert result.returncode == 1
    assert f"scalechat: cannot reach Redis at {down.url}: nothing was announced" in result.stderr
    assert "announced to" not in result.stdout


def test_a_bad_drain_time_stops_the_rolling_restart_before_it_touches_a_worker(stack):
    before = stack.pids()
    result = stack.script("rolling-restart", "--drain-seconds", "abc", check=False)
    assert result.returncode == 2
    assert "--drain-seconds must be a number of seconds (e.g. 2 or 0.5), got 'abc'" in result.stderr
    assert [stack.server_stats(f"worker-0{n}")["status"] for n in range(2)] == ["UP", "UP"]
    assert stack.pids() == before


def test_an_interrupted_rolling_restart_puts_its_worker_back_in_service(stack):
    """Ctrl-C while a worker drains: the worker goes back to ready in HAProxy, not left drained."""
    restart = subprocess.Popen([str(ROOT / "deploy/rolling-restart"), "--quiet", "--drain-seconds", "120"],
                               env=stack.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, start_new_session=True)
    try:
        wait_until(lambda: stack.server_stats("worker-00")["status"] == "DRAIN", timeout=30,
                   what="the rolling restart to drain worker-00")
        os.killpg(restart.pid, signal.SIGINT)
        output, _ = restart.communicate(timeout=30)
    finally:
        if restart.poll() is None:
            os.killpg(restart.pid, signal.SIGKILL)
            restart.wait()
    assert restart.returncode != 0
    assert "worker-00: stopped half-way; put back in service in HAProxy" in output
    assert stack.server_stats("worker-00")["status"] == "UP"


def test_polling_through_the_proxy_relies_on_the_sticky_cookie(stack, resuming, room):
    """Long-polling sends each request of a session separately: only the worker that opened
    the Engine.IO session knows its sid, so without the cookie HAProxy's round robin would
    send the next poll to the other worker, which answers 400 and the session breaks."""
    alice = resuming("alice", transports=("polling",))
    bob = resuming("bob", transports=("polling",))
    alice.enter(room)
    bob.enter(room)
    assert "SCALECHAT_WORKER" in alice.http.cookies
    sent = [alice.send_reliably(room, "hi bob"), bob.send_reliably(room, "hi alice")]
    for client in (alice, bob):
        client.wait_for("message", lambda got: False or len(client.ids) >= 2)
        assert client.ids == sent
    assert alice.connects == bob.connects == 1


def test_polling_without_the_cookie_reaches_a_worker_that_does_not_know_the_session(stack):
    handshake = requests.get(stack.url + "/socket.io/", params={"EIO": "4", "transport": "polling"},
                             timeout=5)
    owner = handshake.headers["X-Scalechat-Worker"]
    sid = handshake.text.split('"sid":"')[1].split('"')[0]
    poll = {"EIO": "4", "transport": "polling", "sid": sid}

    def post(data, cookies):
        response = requests.post(stack.url + "/socket.io/", params=poll, data=data,
                                 cookies=cookies, timeout=5)
        return response.headers["X-Scalechat-Worker"], response.status_code
    token = stack.token("poller")
    assert post('40{"token":"%s"}' % token, handshake.cookies) == (owner, 200)
    typing = '42["typing",{"room":"lobby"}]'
    assert {post(typing, handshake.cookies) for _ in range(6)} == {(owner, 200)}
    without_cookie = {post(typing, None) for _ in range(6)}
    assert (owner, 200) in without_cookie
    assert any(worker != owner and status == 400 for worker, status in without_cookie)


def test_websocket_clients_spread_over_workers_and_hear_each_other(stack, resuming, room):
    check_clients_hear_each_other(resuming, room)


def test_a_killed_worker_is_restarted_and_its_clients_keep_chatting(stack, resuming, room):
    clients = [resuming(f"k{n}") for n in range(4)]
    for client in clients:
        client.enter(room)
    victim = "worker-00"
    old_pid = stack.pids()[victim]
    downs = int(stack.server_stats(victim)["chkdown"])
    os.kill(old_pid, signal.SIGKILL)
    # a request pinned to the dead worker by its cookie is served by the other one
    response = requests.get(stack.url + "/healthz", cookies={"SCALECHAT_WORKER": "w00"}, timeout=5)
    assert response.status_code == 200 and response.headers["X-Scalechat-Worker"] == "worker-01"

    wait_until(lambda: stack.states()[victim] == "RUNNING" and stack.pids()[victim] != old_pid,
               timeout=30, what="supervisord to restart the worker")
    wait_until(lambda: int(stack.server_stats(victim)["chkdown"]) > downs, timeout=10,
               what="HAProxy to mark the worker down")
    wait_until(lambda: stack.server_stats(victim)["status"] == "UP", timeout=30,
               what="HAProxy to mark the worker up again")
    sent = [client.send_reliably(room, f"after the crash from {client.name}") for client in clients]
    for client in clients:
        client.wait_for("message", lambda got: set(sent) <= set(client.ids), timeout=30)
    assert any(client.connects > 1 for client in clients)


def test_scaling_keeps_the_other_workers_connections(stack, resuming, room):
    stayers = [resuming(f"stay{n}") for n in range(2)]
    for client in stayers:
        client.enter(room)
    before = stack.pids()
    stack.script("scale", "3")
    assert stack.states()["worker-02"] == "RUNNING"
    wait_until(lambda: stack.server_stats("worker-02")["status"] == "UP", timeout=15,
               what="HAProxy to send clients to the new worker")
    movers = [resuming(f"mover{n}") for n in range(3)]
    for client in movers:
        client.enter(room)
    assert "worker-02" in {client.workers_seen[0] for client in movers}

    stack.script("scale", "2")
    assert "worker-02" not in stack.states()
    after = stack.pids()
    assert {name: after[name] for name in before} == before
    sent = [client.send_reliably(room, f"after scaling, {client.name}") for client in stayers + movers]
    for client in stayers + movers:
        client.wait_for("message", lambda got: set(sent) <= set(client.ids), timeout=30)
    assert [client.connects for client in stayers] == [1, 1]
    assert any(client.connects > 1 for client in movers)


def test_rolling_restart_loses_no_message(stack, resuming, room):
    listeners = [resuming(f"listener{n}") for n in range(4)]
    senders = [resuming(f"sender{n}") for n in range(2)]
    for client in listeners + senders:
        client.enter(room)
    acked = []
    restarting = threading.Event()
    restarting.set()

    def chat(sender):
        n = 0
        while restarting.is_set() and n < 2000:
            acked.append(sender.send_reliably(room, f"{sender.name} #{n}"))
            n += 1
            time.sleep(0.02)
    threads = [threading.Thread(target=chat, args=(sender,)) for sender in senders]
    for thread in threads:
        thread.start()
    try:
        wait_until(lambda: len(acked) >= 20, what="the senders to be under way")
        before = stack.pids()
        stack.script("rolling-restart", "--drain-seconds", "1")
        after = stack.pids()
        restarted = len(acked)
        wait_until(lambda: len(acked) >= restarted + 20, what="sends after the restart")
    finally:
        restarting.clear()
        for thread in threads:
            thread.join()
    assert before["worker-00"] != after["worker-00"] and before["worker-01"] != after["worker-01"]
    assert before["redis"] == after["redis"] and before["haproxy"] == after["haproxy"]

    stored = stream_ids(stack, room)
    assert len(set(acked)) == len(acked) > 40
    assert sorted(acked) == sorted(stored)  # every acknowledged message stored once, no other
    for client in listeners + senders:
        client.wait_for("message", lambda got: set(stored) <= set(client.ids), timeout=30)
        assert client.ids == stored, client.name
    assert all(client.connects > 1 for client in listeners + senders)



def test_two_browsers_chat_through_the_proxy(stack, chromium, room, tmp_path):
    pages = []
    for name in ("Alice", "Bob"):
        page = chromium.new_context().new_page()
        page.goto(stack.url + "/")
        page.fill("#name", name)
        page.click("button[type=submit]")
        page.fill("#room", room)
        page.click("text=Go")
        page.wait_for_url(f"**/rooms/{room}")
        page.wait_for_selector("#status:text('online')")
        pages.append(page)
    alice, bob = pages
    alice.wait_for_selector("#members li:text('Bob')")

    alice.fill("#text", "hello from Alice")
    alice.press("#text", "Enter")
    markup = "hi Alice, Bob here <b>bold</b><img src=x onerror=\"document.title='owned'\">"
    bob.fill("#text", markup)
    bob.click("#send button")
    for page in pages:
        page.wait_for_selector("#messages li:has-text('hello from Alice')")
        page.wait_for_selector("#messages li:has-text('Bob here')")
    for page, name in zip(pages, ("alice", "bob")):
        texts = page.locator("#messages .text").all_text_contents()
        assert texts == ["hello from Alice", markup]  # markup shown as text
        assert page.locator("#messages b, #messages img").count() == 0
        assert page.title() != "owned"
        page.screenshot(path=str(tmp_path / f"{name}.png"))
    assert (tmp_path / "alice.png").stat().st_size > 0


def test_a_browser_page_misses_nothing_across_a_rolling_restart(stack, chromium, resuming, room):
    page = chromium.new_context().new_page()
    page.goto(stack.url + "/")
    page.fill("#name", "Carol")
    page.click("button[type=submit]")
    page.goto(f"{stack.url}/rooms/{room}")
    page.wait_for_selector("#status:text('online')")
    bob = resuming("bob")
    bob.enter(room)
    sent = []
    restarting = threading.Thread(target=stack.script, args=("rolling-restart", "--drain-seconds", "0"))
    restarting.start()
    while restarting.is_alive() or len(sent) < 20:
        sent.append(bob.send_reliably(room, f"message {len(sent)}"))
        time.sleep(0.05)
    restarting.join()
    page.wait_for_function(
        f"document.querySelectorAll('#messages li:not(.announcement)').length >= {len(sent)}",
        timeout=30_000)
    shown = page.eval_on_selector_all("#messages li:not(.announcement)",
                                      "items => items.map(i => i.dataset.id)")
    assert shown == sent
    # deploy/rolling-restart told everyone first
    assert "Restarting for maintenance" in page.locator("#messages li.announcement").first.inner_text()


def test_a_taken_port_stops_the_start_with_its_name(service_tmp):
    blocker = socket.socket()
    blocker.bind(("127.0.0.1", 0))
    blocker.listen()
    try:
        stack = Stack(service_tmp / "var")
        stack.env["STATS_PORT"] = str(blocker.getsockname()[1])
        result = stack.script("run", check=False)
    finally:
        blocker.close()
    assert result.returncode != 0
    assert f"port {stack.env['STATS_PORT']} for the HAProxy stats page (STATS_PORT)" in result.stderr
    assert not (service_tmp / "var" / "run" / "supervisord.pid").exists()


@pytest.mark.parametrize("name", ["install", "configure", "run", "stop", "status",
                                  "rolling-restart", "scale"])
def test_every_deploy_script_explains_itself(name):
    result = subprocess.run([str(ROOT / "deploy" / name), "--help"], capture_output=True,
                            text=True, timeout=10)
    assert result.returncode == 0 and result.stdout.startswith("Usage: deploy/" + name)

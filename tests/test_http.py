"""The HTTP side: sessions, pages, the session cookie on Socket.IO, health, headers."""
import re
import socket
import subprocess
import time

import pytest
import requests

from conftest import BIN, ChatClient


def test_api_session_issues_a_token_for_a_valid_name(workers):
    response = requests.post(workers[0].url + "/api/session", json={"name": "  Zoë "}, timeout=5)
    assert response.status_code == 200
    assert response.json()["user"] == "Zoë"
    assert response.json()["token"]


@pytest.mark.parametrize("body", [{"name": ""}, {"name": "x" * 33}, {"name": "<script>"},
                                  {"name": 5}, {}, ["name"], "name"])
def test_api_session_refuses_bad_names_with_a_message(workers, body):
    response = requests.post(workers[0].url + "/api/session", json=body, timeout=5)
    assert response.status_code == 400
    assert response.json()["error"] in {"invalid_name", "invalid_payload"}
    assert response.json()["detail"]


def test_api_session_refuses_a_body_that_is_not_json(workers):
    response = requests.post(workers[0].url + "/api/session", data="name=bob", timeout=5)
    assert response.status_code == 400 and response.json()["error"] == "invalid_payload"


def test_every_response_names_its_worker(workers):
    for worker in workers:
        for path in ("/healthz", "/", "/socket.io/?EIO=4&transport=polling", "/missing"):
            response = requests.get(worker.url + path, timeout=5)
            assert response.headers["X-Scalechat-Worker"] == worker.worker_id, path


def test_a_worker_without_redis_is_alive_but_not_ready(workers, worker_factory):
    assert requests.get(workers[0].url + "/readyz", timeout=5).json()["status"] == "ok"
    cut_off = worker_factory("cut-off", redis_url="redis://127.0.0.1:1/0", wait_healthy=False)
    assert requests.get(cut_off.url + "/healthz", timeout=10).status_code == 200
    response = requests.get(cut_off.url + "/readyz", timeout=10)
    assert response.status_code == 503
    assert response.json()["status"] == "unavailable" and "redis" in response.json()["reason"]


def test_a_browser_signs_in_and_its_cookie_opens_a_socket(workers, room):
    w1, w2 = workers
    browser = requests.Session()
    lobby = browser.get(w1.url + "/", timeout=5)
    assert lobby.status_code == 200 and 'name="name"' in lobby.text
    page = browser.post(w1.url + "/login", data={"name": "alice", "next": f"/rooms/{room}"},
                        timeout=5)
    assert page.status_code == 200 and page.url.endswith(f"/rooms/{room}")
    user_id = re.search(r'data-user-id="(guest:[\w-]+)"', page.text).group(1)
    assert f'data-room="{room}"' in page.text and "<strong>alice</strong>" in page.text
    script = browser.get(w1.url + "/vendor/socket.io.min.js", timeout=5)
    assert script.status_code == 200 and "io" in script.text

    cookie = "; ".join(f"{c.name}={c.value}" for c in browser.cookies)
    client = ChatClient("alice")
    client.sio.connect(w2.url, headers={"Cookie": cookie}, transports=["websocket"],
                       wait_timeout=10)
    try:
        assert client.join(room)["members"] == [{"id": user_id, "name": "alice"}]
        rooms_page = browser.get(w1.url + "/", timeout=5).text
        assert re.search(rf"#{room}</a>\s*<span class=\"online\">1 online", rooms_page)
    finally:
        client.close()


def test_pages_refuse_bad_input_with_a_message(workers):
    url = workers[0].url
    bad_login = requests.post(url + "/login", data={"name": "<b>"}, timeout=5)
    assert bad_login.status_code == 400 and "name must be" in bad_login.text
    browser = requests.Session()
    browser.post(url + "/login", data={"name": "alice"}, timeout=5)
    bad_room = browser.post(url + "/rooms", data={"room": "no way!"}, timeout=5)
    assert bad_room.status_code == 400 and "room must be" in bad_room.text
    assert browser.get(url + "/rooms/Not%20A%20Room", timeout=5).status_code == 404
    anonymous = requests.get(url + "/rooms/general", timeout=5, allow_redirects=False)
    assert anonymous.status_code == 302 and "next=/rooms/general" in anonymous.headers["Location"]


def test_login_redirects_only_into_rooms(workers):
    response = requests.post(workers[0].url + "/login",
                             data={"name": "alice", "next": "https://evil.example/"},
                             timeout=5, allow_redirects=False)
    assert response.status_code == 302 and response.headers["Location"] == "/"


def test_a_worker_with_a_bad_setting_refuses_to_start():
    result = subprocess.run([str(BIN / "scalechat-worker"), "--port", "1"],
                            env={"SCALECHAT_MAX_TEXT": "lots", "PATH": "/usr/bin:/bin"},
                            capture_output=True, text=True, timeout=30)
    assert result.returncode != 0
    assert "scalechat: SCALECHAT_MAX_TEXT must be an integer, got 'lots'" in result.stderr


def test_a_request_that_comes_seconds_after_its_connection_is_served(workers):
    host, port = workers[0].url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as conn:
        time.sleep(3)  # longer than the worker's deferred accept
        conn.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        response = b""
        while chunk := conn.recv(65536):
            response += chunk
    assert response.startswith(b"HTTP/1.1 200")

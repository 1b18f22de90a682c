"""Who is who: the embedding site's tokens (JWT), guests, and users told apart by id."""
import base64
import hashlib
import hmac
import json
import subprocess
import time

import flask
import itsdangerous
import jwt
import pytest
import redis
import requests
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from flask.sessions import SecureCookieSessionInterface

from conftest import BIN, ROOT, SECRET_KEY, Worker
from flask_app.config import Config, ConfigError
from flask_app.keys import Keys
from flask_app.presence import SEPARATOR
from test_refusals import refused

SITE_SECRET = "the-site-and-the-chat-share-this-secret-of-48-bytes"
AUDIENCE, ISSUER = "chat.example.org", "https://www.example.org"


def public_pem(private_key):
    return private_key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()


def site_token(key, alg="HS256", **claims):
    """Mint a token as the site's backend would; a claim given as None is left out."""
    payload = {"sub": "user-1", "name": "Ann", "exp": int(time.time()) + 300, **claims}
    return jwt.encode({k: v for k, v in payload.items() if v is not None}, key, algorithm=alg)


def hs256_by_hand(secret, payload):
    """Sign HS256 with any bytes, which PyJWT rightly refuses to do with a public key."""
    def segment(data):
        return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()
    signing_input = segment({"alg": "HS256", "typ": "JWT"}) + "." + segment(payload)
    signature = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
    return signing_input + "." + base64.urlsafe_b64encode(signature).rstrip(b"=").decode()


@pytest.fixture(scope="module")
def rsa_key():
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def ec_key():
    return ec.generate_private_key(ec.SECP256R1())


@pytest.fixture(scope="module")
def site_worker(redis_server, rsa_key, tmp_path_factory):
    """A worker taking HS256 and RS256 site tokens (the key from a file); guests off by default."""
    directory = tmp_path_factory.mktemp("site")
    key_file = directory / "site-public.pem"
    key_file.write_text(public_pem(rsa_key))
    worker = Worker(redis_server.url, "site", directory, SCALECHAT_JWT_SECRET=SITE_SECRET,
                    SCALECHAT_JWT_PUBLIC_KEY=str(key_file)).start()
    yield worker
    worker.stop()


@pytest.fixture(scope="module")
def ec_worker(redis_server, ec_key, tmp_path_factory):
    """A worker taking ES256 tokens for its audience and issuer (the key as PEM text), and guests."""
    worker = Worker(redis_server.url, "site-ec", tmp_path_factory.mktemp("site-ec"),
                    SCALECHAT_JWT_PUBLIC_KEY=public_pem(ec_key), SCALECHAT_JWT_AUDIENCE=AUDIENCE,
                    SCALECHAT_JWT_ISSUER=ISSUER, SCALECHAT_GUEST_LOGIN="on").start()
    yield worker
    worker.stop()


def ec_token(ec_key, **claims):
    return site_token(ec_key, "ES256", **{"aud": AUDIENCE, "iss": ISSUER, **claims})


def test_site_tokens_of_every_algorithm_connect_and_messages_carry_their_sub(
        site_worker, ec_worker, rsa_key, ec_key, clients, room):
    ann = clients("Ann").connect(site_worker, token=site_token(SITE_SECRET, sub="u-ann"))
    ben = clients("Ben").connect(site_worker, token=site_token(
        rsa_key, "RS256", sub="u-ben", name="Ben"))
    cy = clients("Cy").connect(ec_worker, token=ec_token(ec_key, sub="u-cy", name="Cy Young"))
    for client in (ann, ben, cy):
        client.join(room)
    assert cy.call("join", {"room": room})["members"] == [
        {"id": "u-ann", "name": "Ann"}, {"id": "u-ben", "name": "Ben"},
        {"id": "u-cy", "name": "Cy Young"}]
    ids = [client.send(room, f"hello from {client.name}")["id"] for client in (ann, ben, cy)]
    for client in (ann, ben, cy):
        received = client.wait_for("message", lambda got: len(got) >= 3)
        assert [(m["id"], m["user_id"], m["user"]) for m in received] == [
            (ids[0], "u-ann", "Ann"), (ids[1], "u-ben", "Ben"), (ids[2], "u-cy", "Cy Young")]
    history = ann.call("history", {"room": room})["messages"]
    assert [m["user_id"] for m in history] == ["u-ann", "u-ben", "u-cy"]


def test_two_users_named_alice_are_two_members_with_their_own_messages(
        site_worker, workers, clients, room):
    alice1 = clients("alice").connect(site_worker, token=site_token(
        SITE_SECRET, sub="a-1", name="alice"))
    alice2 = clients("alice").connect(site_worker, token=site_token(
        SITE_SECRET, sub="a-2", name="alice"))
    guest = clients("alice").connect(workers[0])
    alice1.join(room)
    alice2.join(room)
    members = guest.join(room)["members"]
    assert members == sorted([{"id": "a-1", "name": "alice"}, {"id": "a-2", "name": "alice"},
                              {"id": guest.user_id, "name": "alice"}],
                             key=lambda member: member["id"])
    assert alice1.wait_for("presence", lambda got: len(got) >= 2) == [
        {"room": room, "user": "alice", "user_id": "a-2", "state": "join"},
        {"room": room, "user": "alice", "user_id": guest.user_id, "state": "join"}]

    # the same client_id from two users is two messages: retries are deduplicated per user
    first = alice1.send(room, "I am the first alice", client_id="same-id")
    second = alice2.send(room, "I am the second alice", client_id="same-id")
    assert first["ok"] and second["ok"] and first["id"] != second["id"]
    got = guest.wait_for("message", lambda got: len(got) >= 2)
    assert [(m["user_id"], m["text"]) for m in got] == [
        ("a-1", "I am the first alice"), ("a-2", "I am the second alice")]

    # a second connection of a-1 (a fresh token, another tab) is the same member
    tab = clients("alice").connect(site_worker, token=site_token(
        SITE_SECRET, sub="a-1", name="alice", iat=int(time.time())))
    assert len(tab.join(room)["members"]) == 3
    alice2.close()
    left = guest.wait_for("presence", lambda got: any(p["state"] == "leave" for p in got))
    assert [p for p in left if p["state"] == "leave"] == [
        {"room": room, "user": "alice", "user_id": "a-2", "state": "leave"}]
    assert [m["id"] for m in guest.call("join", {"room": room})["members"]] == sorted(
        ["a-1", guest.user_id])


@pytest.mark.parametrize("make_token, because", [
    (lambda keys: site_token(SITE_SECRET, exp=int(time.time()) - 60), "expired"),
    (lambda keys: site_token(SITE_SECRET, exp=None), "exp"),
    (lambda keys: site_token(SITE_SECRET, sub=None), "sub"),
    (lambda keys: site_token(SITE_SECRET, sub=42), "sub"),
    (lambda keys: site_token(SITE_SECRET, name="bad\x1fname"), "name"),
    (lambda keys: site_token(SITE_SECRET, name="x" * 65), "name"),
    (lambda keys: site_token(SITE_SECRET, nbf=int(time.time()) + 3600), "not valid yet"),
    (lambda keys: site_token(None, "none"), "algorithm 'none'"),
    (lambda keys: site_token("another-secret-that-is-long-enough-too", "HS256"), "signature"),
    (lambda keys: site_token(rsa.generate_private_key(65537, 2048), "RS256"), "signature"),
    (lambda keys: site_token(keys["rsa"], "RS512"), "algorithm 'RS512'"),
    (lambda keys: site_token(keys["ec"], "ES256"), "algorithm 'ES256'"),
    (lambda keys: hs256_by_hand(public_pem(keys["rsa"]).encode(),
                                {"sub": "mallory", "exp": int(time.time()) + 300}), "signature"),
    (lambda keys: tampered(site_token(SITE_SECRET, sub="bob")), "signature"),
    (lambda keys: other_signature(site_token(SITE_SECRET)), "signature"),
    (lambda keys: site_token(SITE_SECRET)[:-2], "malformed"),  # 41 characters: no base64
    (lambda keys: "eyJhbGciOiJIUzI1NiJ9.not-base64!.x", "malformed"),
], ids=["expired", "no-exp", "no-sub", "sub-not-a-string", "control-in-name", "long-name",
        "not-yet-valid", "alg-none", "other-secret", "other-rsa-key", "alg-not-listed",
        "alg-of-another-worker", "hs256-signed-with-the-public-key", "tampered", "signature-changed", "truncated",
        "malformed"])
def test_bad_site_tokens_are_refused_as_unauthorized_with_a_reason(
        site_worker, rsa_key, ec_key, make_token, because):
    token = make_token({"rsa": rsa_key, "ec": ec_key})
    assert because in refused(site_worker, auth={"token": token})


def other_signature(token):
    """Change the first character of a token's signature."""
    signed, _, signature = token.rpartition(".")
    return signed + "." + ("B" if signature[0] == "A" else "A") + signature[1:]


def tampered(token):
    """Swap a signed token's claims for others, keeping the signature."""
    header, payload, signature = token.split(".")
    claims = json.loads(base64.urlsafe_b64decode(payload + "=="))
    forged = base64.urlsafe_b64encode(json.dumps({**claims, "sub": "admin"}).encode())
    return ".".join([header, forged.rstrip(b"=").decode(), signature])


@pytest.mark.parametrize("claims, because", [
    ({"aud": None}, "aud"), ({"aud": "other.example.org"}, "aud"),
    ({"iss": None}, "iss"), ({"iss": "https://evil.example"}, "iss"),
], ids=["no-aud", "other-aud", "no-iss", "other-iss"])
def test_audience_and_issuer_are_checked_where_configured(ec_worker, ec_key, claims, because):
    assert because in refused(ec_worker, auth={"token": ec_token(ec_key, **claims)})


def test_a_token_signed_with_the_public_key_as_hmac_secret_is_refused_where_only_keys_verify(
        ec_worker, ec_key):
    forged = hs256_by_hand(public_pem(ec_key).encode(), {
        "sub": "mallory", "exp": int(time.time()) + 300, "aud": AUDIENCE, "iss": ISSUER})
    assert "algorithm 'HS256'" in refused(ec_worker, auth={"token": forged})


def test_a_little_clock_difference_with_the_site_is_forgiven(site_worker, clients):
    late = site_token(SITE_SECRET, exp=int(time.time()) - 3)  # SCALECHAT_JWT_LEEWAY is 10 s
    assert clients("Ann").connect(site_worker, token=late).sio.connected


def test_the_http_api_takes_a_site_token_as_bearer(site_worker, rsa_key, clients, room):
    ann = clients("Ann").connect(site_worker, token=site_token(rsa_key, "RS256", sub="u-ann"))
    ann.join(room)
    sent = ann.send(room, "over http")
    url = f"{site_worker.url}/api/rooms/{room}/messages"
    bearer = {"Authorization": "Bearer " + site_token(SITE_SECRET, sub="reader")}
    response = requests.get(url, headers=bearer, timeout=5)
    assert response.status_code == 200
    assert [(m["id"], m["user_id"], m["user"]) for m in response.json()["messages"]] == [
        (sent["id"], "u-ann", "Ann")]
    expired = {"Authorization": "Bearer " + site_token(SITE_SECRET, exp=int(time.time()) - 60)}
    response = requests.get(url, headers=expired, timeout=5)
    assert response.status_code == 401 and response.json()["error"] == "unauthorized"
    assert "expired" in response.json()["detail"]
    assert response.headers["WWW-Authenticate"].startswith("Bearer")


def test_two_browsers_named_alice_each_see_two_alices_and_know_which_is_them(
        workers, chromium, room):
    pages = []
    for worker in workers:
        page = chromium.new_context().new_page()
        page.goto(f"{worker.url}/rooms/{room}")
        page.fill("#name", "alice")
        page.click("button[type=submit]")
        page.wait_for_selector("#status:text('online')")
        pages.append(page)
    first, second = pages
    first.wait_for_selector("#members li:nth-child(2)")
    first.fill("#text", "from the first alice")
    first.press("#text", "Enter")
    for page in pages:
        page.wait_for_selector("#messages li:has-text('from the first alice')")
        assert page.locator("#members li").all_text_contents() == ["alice", "alice"]
        assert page.locator("#members li.me").count() == 1
    assert first.locator("#messages li.mine").count() == 1
    assert second.locator("#messages li.mine").count() == 0
    ids = [page.locator("body").get_attribute("data-user-id") for page in pages]
    assert ids[0] != ids[1] and all(user_id.startswith("guest:") for user_id in ids)
    for page, user_id in zip(pages, ids):
        assert page.locator("#members li.me").get_attribute("title") == user_id


def test_guest_login_is_on_by_default(workers):
    response = requests.post(workers[0].url + "/api/session", json={"name": "alice"}, timeout=5)
    again = requests.post(workers[0].url + "/api/session", json={"name": "alice"}, timeout=5)
    assert response.status_code == again.status_code == 200
    assert response.json()["user"] == again.json()["user"] == "alice"
    assert response.json()["user_id"].startswith("guest:")
    assert response.json()["user_id"] != again.json()["user_id"]
    assert 'name="name"' in requests.get(workers[0].url + "/", timeout=5).text


def test_guest_login_is_off_once_a_site_key_is_set(site_worker, workers, room):
    response = requests.post(site_worker.url + "/api/session", json={"name": "alice"}, timeout=5)
    assert response.status_code == 403 and response.json()["error"] == "guest_login_off"
    assert response.json()["detail"]
    lobby = requests.get(site_worker.url + "/", timeout=5)
    assert "Guest sign-in is off" in lobby.text and 'name="name"' not in lobby.text
    login = requests.post(site_worker.url + "/login", data={"name": "alice"}, timeout=5,
                          allow_redirects=False)
    assert login.status_code == 403 and "Guest sign-in is off" in login.text

    # guests of a worker that has them (same SECRET_KEY) are refused here
    guest_token = workers[0].token("alice")
    assert "guest sign-in is off" in refused(site_worker, auth={"token": guest_token})
    rooms = requests.get(site_worker.url + "/api/rooms", timeout=5,
                         headers={"Authorization": f"Bearer {guest_token}"})
    assert rooms.status_code == 401 and rooms.json()["error"] == "unauthorized"
    browser = requests.Session()
    browser.post(workers[0].url + "/login", data={"name": "alice"}, timeout=5)
    cookie = "; ".join(f"{c.name}={c.value}" for c in browser.cookies)
    assert "guest sign-in is off" in refused(site_worker, headers={"Cookie": cookie})
    page = requests.get(f"{site_worker.url}/rooms/{room}", headers={"Cookie": cookie},
                        timeout=5, allow_redirects=False)
    assert page.status_code == 302 and "next=" in page.headers["Location"]


def test_guest_login_can_be_forced_on_beside_a_site_key(ec_worker, ec_key, clients, room):
    guest = clients("Dee").connect(ec_worker)
    site_user = clients("Cy").connect(ec_worker, token=ec_token(ec_key, sub="u-cy", name="Cy"))
    guest.join(room)
    assert site_user.join(room)["members"] == [{"id": guest.user_id, "name": "Dee"},
                                               {"id": "u-cy", "name": "Cy"}]


def test_guest_login_can_be_forced_off_without_a_site_key(worker_factory, workers):
    closed = worker_factory("closed", SCALECHAT_GUEST_LOGIN="off")
    response = requests.post(closed.url + "/api/session", json={"name": "alice"}, timeout=5)
    assert response.status_code == 403 and response.json()["error"] == "guest_login_off"
    assert "guest sign-in is off" in refused(closed, auth={"token": workers[0].token("alice")})
    assert "no SCALECHAT_JWT_SECRET" in refused(closed, auth={"token": site_token(SITE_SECRET)})


def test_a_guest_token_from_before_user_ids_is_one_user_until_it_expires(workers, clients, room):
    old = itsdangerous.URLSafeTimedSerializer(SECRET_KEY, salt="scalechat.token").dumps(
        {"user": "olga"})
    tab1 = clients("olga").connect(workers[0], token=old)
    tab2 = clients("olga").connect(workers[1], token=old)
    tab1.join(room)
    members = tab2.join(room)["members"]
    assert len(members) == 1 and members[0]["name"] == "olga"
    assert members[0]["id"].startswith("guest:")


def test_a_browser_session_from_before_user_ids_is_one_guest_and_gets_its_id_kept(
        workers, clients, room):
    app = flask.Flask(__name__)
    app.secret_key = SECRET_KEY
    old = SecureCookieSessionInterface().get_signing_serializer(app).dumps({"user": "olga"})
    cookie = {"Cookie": f"session={old}"}
    tab1, tab2 = clients("olga"), clients("olga")
    tab1.sio.connect(workers[0].url, headers=cookie, transports=["websocket"], wait_timeout=10)
    tab2.sio.connect(workers[1].url, headers=cookie, transports=["websocket"], wait_timeout=10)
    tab1.join(room)
    [member] = tab2.join(room)["members"]
    assert member["name"] == "olga" and member["id"].startswith("guest:")
    page = requests.get(f"{workers[0].url}/rooms/{room}", headers=cookie, timeout=5)
    assert f'data-user-id="{member["id"]}"' in page.text and "session=" in page.headers["Set-Cookie"]


def test_history_and_members_from_before_user_ids_still_read(redis_server, workers, clients, room):
    """Entries and presence members written by a worker of the previous version."""
    config = Config.from_env()
    keys, store = Keys(config.key_prefix), redis.Redis.from_url(redis_server.url)
    old_id = store.xadd(keys.room_stream(room),
                        {"user": "olga", "text": "from before", "client_id": "c-1"}).decode()
    member = "olga" + SEPARATOR + "old-worker-sid"
    far = int(time.time() * 1000) + 60_000
    store.zadd(keys.presence_expiry(room), {member: far})
    store.zadd(keys.presence_index(room), {member: 0})
    bob = clients("bob").connect(workers[1])
    ack = bob.join(room)
    assert ack["history"] == [{"id": old_id, "room": room, "user": "olga", "user_id": None,
                               "text": "from before", "ts": int(old_id.split("-")[0]),
                               "client_id": "c-1"}]
    assert ack["members"] == [{"id": bob.user_id, "name": "bob"},
                              {"id": "olga", "name": "olga"}]
    new = bob.send(room, "after the upgrade")
    assert [(m["id"], m["user_id"]) for m in bob.call("history", {"room": room})["messages"]] == [
        (old_id, None), (new["id"], bob.user_id)]


@pytest.mark.parametrize("env, variable", [
    ({"SCALECHAT_JWT_SECRET": "too-short"}, "SCALECHAT_JWT_SECRET"),
    ({"SCALECHAT_JWT_PUBLIC_KEY": "-----BEGIN PUBLIC KEY-----\nnope\n-----END PUBLIC KEY-----"},
     "SCALECHAT_JWT_PUBLIC_KEY"),
    ({"SCALECHAT_JWT_PUBLIC_KEY": "/no/such/key.pem"}, "SCALECHAT_JWT_PUBLIC_KEY"),
    ({"SCALECHAT_JWT_SECRET": SITE_SECRET, "SCALECHAT_JWT_ALGORITHMS": "HS256,none"},
     "SCALECHAT_JWT_ALGORITHMS"),
    ({"SCALECHAT_JWT_ALGORITHMS": "HS256"}, "SCALECHAT_JWT_SECRET"),
    ({"SCALECHAT_JWT_SECRET": SITE_SECRET, "SCALECHAT_JWT_ALGORITHMS": "RS256"},
     "SCALECHAT_JWT_PUBLIC_KEY"),
    ({"SCALECHAT_GUEST_LOGIN": "maybe"}, "SCALECHAT_GUEST_LOGIN"),
    ({"SCALECHAT_JWT_LEEWAY": "-1"}, "SCALECHAT_JWT_LEEWAY"),
])
def test_unusable_token_settings_stop_start_up_naming_the_variable(env, variable):
    with pytest.raises(ConfigError, match=variable):
        Config.from_env(env)


def test_a_key_of_the_wrong_kind_for_the_algorithm_stops_start_up(rsa_key, ec_key):
    with pytest.raises(ConfigError, match="SCALECHAT_JWT_PUBLIC_KEY to be an"):
        Config.from_env({"SCALECHAT_JWT_PUBLIC_KEY": public_pem(ec_key),
                         "SCALECHAT_JWT_ALGORITHMS": "RS256"})
    with pytest.raises(ConfigError, match="curve"):
        Config.from_env({"SCALECHAT_JWT_PUBLIC_KEY": public_pem(ec_key),
                         "SCALECHAT_JWT_ALGORITHMS": "ES384"})
    with pytest.raises(ConfigError, match="RSA or EC"):
        Config.from_env({"SCALECHAT_JWT_PUBLIC_KEY": public_pem(
            ed25519.Ed25519PrivateKey.generate())})


def test_token_settings_default_from_the_keys_given(rsa_key, ec_key):
    assert Config.from_env({}).guest_login is True
    assert Config.from_env({}).jwt_algorithms == ()
    secret = Config.from_env({"SCALECHAT_JWT_SECRET": SITE_SECRET})
    assert secret.jwt_algorithms == ("HS256",) and secret.guest_login is False
    both = Config.from_env({"SCALECHAT_JWT_SECRET": SITE_SECRET,
                            "SCALECHAT_JWT_PUBLIC_KEY": public_pem(rsa_key),
                            "SCALECHAT_GUEST_LOGIN": "on"})
    assert both.jwt_algorithms == ("HS256", "RS256") and both.guest_login is True
    assert Config.from_env({"SCALECHAT_JWT_PUBLIC_KEY": public_pem(ec_key)}).jwt_algorithms == (
        "ES256",)
    assert Config.from_env({"SCALECHAT_GUEST_LOGIN": "off"}).guest_login is False
    assert Config.from_env({"SCALECHAT_JWT_LEEWAY": "0"}).jwt_leeway == 0


def test_a_worker_with_an_unusable_key_exits_naming_the_variable(redis_server, tmp_path):
    result = subprocess.run(
        [str(BIN / "scalechat-worker"), "--host", "127.0.0.1", "--port", "1"],
        env={**Worker(redis_server.url, "bad-key", tmp_path).env,
             "SCALECHAT_JWT_PUBLIC_KEY": "/no/such/key.pem"},
        capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert result.returncode != 0
    assert "SCALECHAT_JWT_PUBLIC_KEY" in result.stderr

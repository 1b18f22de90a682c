"""Pure logic: input validation, configuration from the environment, tokens, packets."""
import itsdangerous
import pytest
import redis

from flask_app import validation
from flask_app.auth import GuestTokens, Unauthorized, User
from flask_app.config import Config, ConfigError
from flask_app.keys import Keys
from flask_app.store import MessageStore


@pytest.mark.parametrize("value", ["general", "a", "room-1_x", "0" * 64])
def test_valid_rooms(value):
    assert validation.room(value) == value


@pytest.mark.parametrize("value", ["", "-x", "Upper", "a" * 65, "a b", "é", None, 3, ["a"]])
def test_invalid_rooms(value):
    with pytest.raises(validation.ValidationError) as info:
        validation.room(value)
    assert info.value.code == "invalid_room"


def test_text_limits():
    assert validation.text("x" * 10, 10) == "x" * 10
    with pytest.raises(validation.ValidationError, match="at most 10") as info:
        validation.text("x" * 11, 10)
    assert info.value.code == "text_too_long"


def test_limit_accepts_query_strings_and_refuses_bools():
    assert validation.limit("5", 50, 200) == 5
    assert validation.limit(None, 50, 200) == 50
    for bad in (True, 0, 201, "x", 1.5):
        with pytest.raises(validation.ValidationError):
            validation.limit(bad, 50, 200)


def test_config_reads_the_environment():
    config = Config.from_env({"REDIS_URL": "redis://example:1/2", "SCALECHAT_MAX_TEXT": "10",
                              "SCALECHAT_ALLOWED_ORIGINS": "https://a.example, https://b.example"})
    assert config.redis_url == "redis://example:1/2"
    assert config.max_text == 10
    assert config.cors_allowed_origins == ["https://a.example", "https://b.example"]
    assert Config.from_env({}).cors_allowed_origins is None


def test_replicas_are_required_only_where_there_are_some():
    assert Config.from_env({}).min_replicas == 0
    assert Config.from_env({"REDIS_URL": "redis+sentinel://h:26379/0/chat"}).min_replicas == 1
    assert Config.from_env({"SCALECHAT_MIN_REPLICAS": "2"}).min_replicas == 2
    assert Config.from_env({"REDIS_URL": "redis://r:1/0", "SCALECHAT_MIN_REPLICAS": "0"}) \
        .min_replicas == 0


@pytest.mark.parametrize("env, variable", [
    ({"SCALECHAT_MAX_TEXT": "lots"}, "SCALECHAT_MAX_TEXT"),
    ({"SCALECHAT_PRESENCE_TTL": "0"}, "SCALECHAT_PRESENCE_TTL"),
    ({"REDIS_URL": "http://x"}, "REDIS_URL"),
    ({"SCALECHAT_ENV": "staging"}, "SCALECHAT_ENV"),
    ({"SCALECHAT_MIN_REPLICAS": "-1"}, "SCALECHAT_MIN_REPLICAS"),
])
def test_bad_settings_name_their_variable(env, variable):
    with pytest.raises(ConfigError, match=variable):
        Config.from_env(env)



@pytest.mark.parametrize("data", [
    ["message", {"history": [{"id": "1-0", "text": "hi"}], "members": ["a", "b"]}],
    ["file", {"name": "a.bin", "content": b"\x00\xff"}],
    ["nested", [[[b"deep"]]]],
])
def test_chat_packets_find_binary_data_as_python_socketio_does(data):
    from socketio.packet import EVENT, Packet

    from flask_app.wire.engine import ChatPacket
    ours, theirs = ChatPacket(EVENT, data=data), Packet(EVENT, data=data)
    assert ours.packet_type == theirs.packet_type and ours.attachment_count == theirs.attachment_count
    assert ours.encode() == theirs.encode()


def test_tokens_read_and_are_read_by_itsdangerous_own_serializer():
    tokens = GuestTokens("key", ttl_seconds=60)
    plain = itsdangerous.URLSafeTimedSerializer("key", salt="scalechat.token")
    issued = tokens.issue(User("guest:1", "zoë"))
    assert plain.loads(issued) == {"user": "zoë", "id": "guest:1"}
    assert tokens.verify(plain.dumps({"user": "zoë", "id": "guest:2"})) == User("guest:2", "zoë")
    with pytest.raises(Unauthorized):
        tokens.verify(issued[:-2] + "xx")


class RecordingPipe:
    def __init__(self):
        self.zadds = []

    def zadd(self, key, mapping):
        self.zadds.append(mapping)


def test_a_room_s_activity_is_recorded_at_most_once_a_second():
    store = MessageStore(redis.Redis(), keys=Keys("t"), config=None)  # never connects
    pipe = RecordingPipe()
    for now in (100.0, 100.5, 100.99, 101.0, 101.2):
        store.touch_room(pipe, "a", now)
    store.touch_room(pipe, "b", 101.2)
    assert pipe.zadds == [{"a": 100.0}, {"a": 101.0}, {"b": 101.2}]

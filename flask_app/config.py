"""Every setting of scalechat, read from the environment in one place.

Each setting has a documented default; a value that cannot be used stops the
process at start-up with a message naming the variable.
"""
import dataclasses
import os
import socket
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_SECRET_KEY = "dev-insecure-secret-key"


class ConfigError(ValueError):
    """A setting from the environment cannot be used."""


@dataclasses.dataclass(frozen=True)
class Config:
    """Settings of one worker; field metadata names the environment variable."""

    redis_url: str = dataclasses.field(
        default="redis://127.0.0.1:6379/0", metadata={"env": "REDIS_URL"})
    secret_key: str = dataclasses.field(
        default=DEFAULT_SECRET_KEY, metadata={"env": "SECRET_KEY"})
    env: str = dataclasses.field(
        default="development", metadata={"env": "SCALECHAT_ENV"})
    worker_id: str = dataclasses.field(
        default="", metadata={"env": "SCALECHAT_WORKER_ID"})
    # Comma-separated origins allowed to open Socket.IO connections; empty
    # means the site's own origin only, "*" allows any.
    allowed_origins: tuple = dataclasses.field(
        default=(), metadata={"env": "SCALECHAT_ALLOWED_ORIGINS"})
    # Redis connections per worker; handlers beyond it wait for one (up to 5 s) rather than fail.
    redis_pool: int = dataclasses.field(
        default=100, metadata={"env": "SCALECHAT_REDIS_POOL"})
    key_prefix: str = dataclasses.field(
        default="scalechat:", metadata={"env": "SCALECHAT_KEY_PREFIX"})
    channel: str = dataclasses.field(
        default="scalechat", metadata={"env": "SCALECHAT_CHANNEL"})
    token_ttl: int = dataclasses.field(
        default=86400, metadata={"env": "SCALECHAT_TOKEN_TTL"})
    max_text: int = dataclasses.field(
        default=2000, metadata={"env": "SCALECHAT_MAX_TEXT"})
    history_maxlen: int = dataclasses.field(
        default=10000, metadata={"env": "SCALECHAT_HISTORY_MAXLEN"})
    history_on_join: int = dataclasses.field(
        default=50, metadata={"env": "SCALECHAT_HISTORY_ON_JOIN"})
    history_max_limit: int = dataclasses.field(
        default=200, metadata={"env": "SCALECHAT_HISTORY_MAX_LIMIT"})
    dedup_ttl: int = dataclasses.field(
        default=86400, metadata={"env": "SCALECHAT_DEDUP_TTL"})
    presence_ttl: int = dataclasses.field(
        default=30, metadata={"env": "SCALECHAT_PRESENCE_TTL"})
    max_payload: int = dataclasses.field(
        default=65536, metadata={"env": "SCALECHAT_MAX_PAYLOAD"})
    # Bytes that may wait to be sent to one WebSocket client before it is disconnected as
    # too slow (it reconnects and resumes from its last message).
    max_send_buffer: int = dataclasses.field(
        default=4 << 20, metadata={"env": "SCALECHAT_MAX_SEND_BUFFER"})
    # Events per second each connection may send, and the burst above that rate.
    rate_limit: float = dataclasses.field(
        default=10.0, metadata={"env": "SCALECHAT_RATE_LIMIT"})
    rate_burst: int = dataclasses.field(
        default=20, metadata={"env": "SCALECHAT_RATE_BURST"})
    # Refused events in a row after which a connection is disconnected as abusive.
    rate_disconnect_after: int = dataclasses.field(
        default=100, metadata={"env": "SCALECHAT_RATE_DISCONNECT_AFTER"})
    # Seconds a stopping worker waits for its handlers to finish.
    drain_timeout: int = dataclasses.field(
        default=5, metadata={"env": "SCALECHAT_DRAIN_TIMEOUT"})
    # Password of the Socket.IO Admin UI (user "admin", namespace /admin); empty: off.
    admin_password: str = dataclasses.field(
        default="", metadata={"env": "SCALECHAT_ADMIN_PASSWORD"})
    # Port of `scalechat serve-admin` on 127.0.0.1; workers accept its pages' origin on /admin.
    admin_ui_port: int = dataclasses.field(
        default=9106, metadata={"env": "SCALECHAT_ADMIN_UI_PORT"})
    # Send the session cookie over HTTPS only (set behind a TLS-terminating proxy).
    secure_cookies: bool = dataclasses.field(
        default=False, metadata={"env": "SCALECHAT_SECURE_COOKIES"})
    node_modules: str = dataclasses.field(
        default=str(PROJECT_ROOT / "node_modules"),
        metadata={"env": "SCALECHAT_NODE_MODULES"})

    @classmethod
    def from_env(cls, environ=None, **overrides):
        """Build the settings from environment variables, then overrides."""
        environ = os.environ if environ is None else environ
        values = {}
        for field in dataclasses.fields(cls):
            raw = environ.get(field.metadata["env"])
            if raw is not None and raw != "":
                values[field.name] = _parse(field, raw)
        values.update(overrides)
        return cls(**values)

    def __post_init__(self):
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if field.type in (int, float) and value <= 0:
                raise ConfigError(
                    f"{field.metadata['env']} must be a positive number, got {value!r}")
        if not self.redis_url.startswith(("redis://", "rediss://", "unix://")):
            raise ConfigError(
                f"REDIS_URL must start with redis://, rediss:// or unix://, "
                f"got {self.redis_url!r}")
        if self.env not in ("development", "production", "test"):
            raise ConfigError(
                f"SCALECHAT_ENV must be development, production or test, got {self.env!r}")
        if self.env == "production" and self.secret_key == DEFAULT_SECRET_KEY:
            raise ConfigError("SECRET_KEY must be set when SCALECHAT_ENV=production: "
                              "the default is public")
        if self.admin_ui_port > 65535:
            raise ConfigError(
                f"SCALECHAT_ADMIN_UI_PORT must be a port number, got {self.admin_ui_port!r}")
        if not self.worker_id:
            object.__setattr__(self, "worker_id", f"{socket.gethostname()}-{os.getpid()}")

    @property
    def cors_allowed_origins(self):
        """The value python-socketio expects: None for same origin only."""
        if not self.allowed_origins:
            return None
        if self.allowed_origins == ("*",):
            return "*"
        return list(self.allowed_origins)


def _parse(field, raw):
    name = field.metadata["env"]
    if field.type is int:
        try:
            return int(raw)
        except ValueError:
            raise ConfigError(f"{name} must be an integer, got {raw!r}") from None
    if field.type is float:
        try:
            return float(raw)
        except ValueError:
            raise ConfigError(f"{name} must be a number, got {raw!r}") from None
    if field.type is bool:
        if raw.lower() not in ("1", "true", "yes", "0", "false", "no"):
            raise ConfigError(f"{name} must be true or false, got {raw!r}")
        return raw.lower() in ("1", "true", "yes")
    if field.type is tuple:
        return tuple(part.strip() for part in raw.split(",") if part.strip())
    return raw

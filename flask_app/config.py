"""Every setting of scalechat, read from the environment in one place.

Each setting has a documented default; a value that cannot be used stops the
process at start-up with a message naming the variable.
"""
import dataclasses
import os
import socket
from pathlib import Path

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from .redis import urls

PROJECT_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_SECRET_KEY = "dev-insecure-secret-key"


# The key each JWT algorithm verifies with.
ALGORITHM_KEYS = {
    **{f"HS{bits}": "secret" for bits in (256, 384, 512)},
    **{f"{kind}{bits}": rsa.RSAPublicKey for kind in ("RS", "PS") for bits in (256, 384, 512)},
    **{f"ES{bits}": ec.EllipticCurvePublicKey for bits in (256, 384, 512)},
}
EC_ALGORITHMS = {"secp256r1": "ES256", "secp384r1": "ES384", "secp521r1": "ES512"}


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
    # Users a join answers, and at most per `members` page: a join costs the same in any room.
    members_page: int = dataclasses.field(
        default=100, metadata={"env": "SCALECHAT_MEMBERS_PAGE"})
    dedup_ttl: int = dataclasses.field(
        default=86400, metadata={"env": "SCALECHAT_DEDUP_TTL"})
    # Replicas that must have a message before its sender gets `ok`; by default 1 when REDIS_URL
    # names a Sentinel set or a cluster (which have replicas), else 0 (a single Redis).
    min_replicas: int = dataclasses.field(
        default=None, metadata={"env": "SCALECHAT_MIN_REPLICAS", "min": 0})
    # Milliseconds a send waits for those replicas before it is answered `unavailable`.
    replica_timeout: int = dataclasses.field(
        default=1000, metadata={"env": "SCALECHAT_REPLICA_TIMEOUT"})
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
    # Milliseconds of loop lag beyond which a worker answers messages and typing `busy` rather
    # than fall further behind (overload.py); 0: never.
    shed_lag_ms: int = dataclasses.field(
        default=200, metadata={"env": "SCALECHAT_SHED_LAG_MS", "min": 0})
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
    # Site tokens (JWT, docs/protocol.md): the secret shared with the site's backend for HS256,
    # at least 32 bytes; empty: none.
    jwt_secret: str = dataclasses.field(
        default="", metadata={"env": "SCALECHAT_JWT_SECRET"})
    # The public key of RS256/ES256 site tokens: PEM text, or the path of a PEM file; empty: none.
    jwt_public_key: str = dataclasses.field(
        default="", metadata={"env": "SCALECHAT_JWT_PUBLIC_KEY"})
    # Accepted JWT algorithms; empty: HS256 with a secret, and RS256 or ES256 (by the key's
    # type) with a public key.
    jwt_algorithms: tuple = dataclasses.field(
        default=(), metadata={"env": "SCALECHAT_JWT_ALGORITHMS"})
    # The `aud` and `iss` site tokens must carry; empty: not checked.
    jwt_audience: str = dataclasses.field(
        default="", metadata={"env": "SCALECHAT_JWT_AUDIENCE"})
    jwt_issuer: str = dataclasses.field(
        default="", metadata={"env": "SCALECHAT_JWT_ISSUER"})
    # Seconds of clock difference with the site forgiven on exp, nbf and iat (0 or more).
    jwt_leeway: int = dataclasses.field(
        default=10, metadata={"env": "SCALECHAT_JWT_LEEWAY", "min": 0})
    # Guest sign-in under a display name (POST /api/session, the lobby's form); empty: on
    # unless a site key (SCALECHAT_JWT_SECRET or SCALECHAT_JWT_PUBLIC_KEY) is set.
    guest_login: bool = dataclasses.field(
        default=None, metadata={"env": "SCALECHAT_GUEST_LOGIN"})
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
        if self.min_replicas is None:
            replicated = urls.SENTINEL_SCHEMES + urls.CLUSTER_SCHEMES
            object.__setattr__(self, "min_replicas",
                               1 if self.redis_url.startswith(replicated) else 0)
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if field.type not in (int, float):
                continue
            if "min" in field.metadata and value < field.metadata["min"]:
                raise ConfigError(f"{field.metadata['env']} must be at least "
                                  f"{field.metadata['min']}, got {value!r}")
            if "min" not in field.metadata and value <= 0:
                raise ConfigError(
                    f"{field.metadata['env']} must be a positive number, got {value!r}")
        try:
            urls.parse_url(self.redis_url)
        except ValueError as exc:
            raise ConfigError(f"REDIS_URL {exc}") from None
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
        self._check_site_tokens()

    def _check_site_tokens(self):
        if self.jwt_secret and len(self.jwt_secret.encode()) < 32:
            raise ConfigError("SCALECHAT_JWT_SECRET must be at least 32 bytes (256 bits); "
                              "make one with: python3 -c 'import secrets; "
                              "print(secrets.token_urlsafe(32))'")
        if self.jwt_public_key and not self.jwt_public_key.lstrip().startswith("-----BEGIN"):
            try:
                pem = Path(self.jwt_public_key).read_text()
            except (OSError, UnicodeDecodeError) as exc:
                raise ConfigError(f"SCALECHAT_JWT_PUBLIC_KEY is neither PEM text nor a "
                                  f"readable PEM file: {exc}") from None
            object.__setattr__(self, "jwt_public_key", pem)
        key = self.public_key()
        if not self.jwt_algorithms:
            defaults = (["HS256"] if self.jwt_secret else []) + (
                [default_algorithm(key)] if key is not None else [])
            object.__setattr__(self, "jwt_algorithms", tuple(defaults))
        for alg in self.jwt_algorithms:
            needs = ALGORITHM_KEYS.get(alg)
            if needs is None:
                raise ConfigError(f"SCALECHAT_JWT_ALGORITHMS: {alg!r} is not one of "
                                  f"{', '.join(ALGORITHM_KEYS)}")
            if needs == "secret" and not self.jwt_secret:
                raise ConfigError(f"SCALECHAT_JWT_ALGORITHMS lists {alg}, which needs "
                                  "SCALECHAT_JWT_SECRET")
            if needs != "secret" and not isinstance(key, needs):
                raise ConfigError(f"SCALECHAT_JWT_ALGORITHMS lists {alg}, which needs "
                                  f"SCALECHAT_JWT_PUBLIC_KEY to be an {needs.__name__}")
            if alg.startswith("ES") and EC_ALGORITHMS[key.curve.name] != alg:
                raise ConfigError(f"SCALECHAT_JWT_ALGORITHMS lists {alg}, but the curve of "
                                  f"SCALECHAT_JWT_PUBLIC_KEY ({key.curve.name}) is for "
                                  f"{EC_ALGORITHMS[key.curve.name]}")
        if self.guest_login is None:
            object.__setattr__(self, "guest_login",
                               not (self.jwt_secret or self.jwt_public_key))

    def public_key(self):
        """Return the loaded public key of site tokens, or None."""
        if not self.jwt_public_key:
            return None
        try:
            key = serialization.load_pem_public_key(self.jwt_public_key.encode())
        except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
            raise ConfigError(f"SCALECHAT_JWT_PUBLIC_KEY is not a PEM public key: {exc}") from None
        if not isinstance(key, (rsa.RSAPublicKey, ec.EllipticCurvePublicKey)):
            raise ConfigError("SCALECHAT_JWT_PUBLIC_KEY must be an RSA or EC public key")
        if isinstance(key, ec.EllipticCurvePublicKey) and key.curve.name not in EC_ALGORITHMS:
            raise ConfigError(f"SCALECHAT_JWT_PUBLIC_KEY is on curve {key.curve.name}; "
                              f"use one of {', '.join(EC_ALGORITHMS)}")
        return key

    @property
    def cors_allowed_origins(self):
        """The value python-socketio expects: None for same origin only."""
        if not self.allowed_origins:
            return None
        if self.allowed_origins == ("*",):
            return "*"
        return list(self.allowed_origins)


def default_algorithm(key):
    """Return the algorithm a public key verifies by default: RS256, or ES* by its curve."""
    return "RS256" if isinstance(key, rsa.RSAPublicKey) else EC_ALGORITHMS[key.curve.name]


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
        if raw.lower() not in ("1", "true", "yes", "on", "0", "false", "no", "off"):
            raise ConfigError(f"{name} must be true or false (on or off), got {raw!r}")
        return raw.lower() in ("1", "true", "yes", "on")
    if field.type is tuple:
        return tuple(part.strip() for part in raw.split(",") if part.strip())
    return raw

"""The REDIS_URL forms scalechat reads: python-socketio's, plus Valkey's names for them."""
import dataclasses
from urllib.parse import unquote, urlsplit

import redis

# Valkey speaks Redis' protocol: its URLs name the same connections.
DIRECT_SCHEMES = {"redis": "redis", "rediss": "rediss", "unix": "unix",
                  "valkey": "redis", "valkeys": "rediss"}
SENTINEL_SCHEMES = ("redis+sentinel", "valkey+sentinel")
URL_FORMS = ("redis://, rediss://, unix://, valkey://, valkeys:// or "
             "redis+sentinel://[user:password@]host:port,host:port/db/service")


@dataclasses.dataclass(frozen=True)
class SentinelURL:
    """What a redis+sentinel:// URL names: the Sentinels, the service and the master's db."""

    sentinels: tuple
    service: str
    db: int = 0
    username: str = None
    password: str = None


def parse_url(url):
    """Return a SentinelURL, or the redis-py URL of a direct connection; ValueError if neither."""
    scheme = url.partition("://")[0].lower() if "://" in url else ""
    if scheme in SENTINEL_SCHEMES:
        return _parse_sentinel_url(url)
    if scheme not in DIRECT_SCHEMES:
        raise ValueError(f"must start with {URL_FORMS}, got {shown(url)!r}")
    direct = DIRECT_SCHEMES[scheme] + url[len(scheme):]
    try:
        redis.connection.parse_url(direct)
    except ValueError as exc:
        raise ValueError(f"is not a usable URL ({exc}): {shown(url)!r}") from None
    return direct


def _parse_sentinel_url(url):
    """Read python-socketio's form: redis+sentinel://[user:password@]h1:p1,h2:p2/db/service."""
    parts = urlsplit(url)
    credentials, _, hosts = parts.netloc.rpartition("@")
    username, _, password = credentials.partition(":")
    sentinels = []
    for address in hosts.split(","):
        host, _, port = address.rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"lists each Sentinel as host:port, got {address!r} in {shown(url)!r}")
        sentinels.append((host.strip("[]"), int(port)))
    db, _, service = parts.path[1:].partition("/")
    if not service or "/" in service:
        raise ValueError(f"names the service after the db, as in "
                         f"redis+sentinel://h1:26379,h2:26379/0/mymaster; got {shown(url)!r}")
    if db and not db.isdigit():
        raise ValueError(f"has db {db!r}, not a number: {shown(url)!r}")
    return SentinelURL(sentinels=tuple(sentinels), service=unquote(service), db=int(db or 0),
                       username=unquote(username) or None, password=unquote(password) or None)


def shown(url):
    """`url` with its password hidden, to be quoted in an error message or a log."""
    credentials, at, rest = url.partition("://")[2].rpartition("@")
    if not at or ":" not in credentials:
        return url
    scheme = url.partition("://")[0]
    return f"{scheme}://{credentials.partition(':')[0]}:***@{rest}"

"""The REDIS_URL forms scalechat reads: python-socketio's, plus Valkey's names for them."""
import dataclasses
from urllib.parse import unquote, urlsplit

import redis

# Valkey speaks Redis' protocol: its URLs name the same connections.
DIRECT_SCHEMES = {"redis": "redis", "rediss": "rediss", "unix": "unix",
                  "valkey": "redis", "valkeys": "rediss"}
SENTINEL_SCHEMES = ("redis+sentinel", "valkey+sentinel")
CLUSTER_SCHEMES = ("redis+cluster", "valkey+cluster")
URL_FORMS = ("redis://, rediss://, unix://, valkey://, valkeys://, "
             "redis+sentinel://[user:password@]host:port,host:port/db/service or "
             "redis+cluster://[user:password@]host:port,host:port")


@dataclasses.dataclass(frozen=True)
class SentinelURL:
    """What a redis+sentinel:// URL names: the Sentinels, the service and the master's db."""

    sentinels: tuple
    service: str
    db: int = 0
    username: str = None
    password: str = None


@dataclasses.dataclass(frozen=True)
class ClusterURL:
    """What a redis+cluster:// URL names: nodes to learn the cluster from, and credentials."""

    nodes: tuple
    username: str = None
    password: str = None


def parse_url(url):
    """Return a SentinelURL, a ClusterURL, or the redis-py URL of a direct connection;
    ValueError if none."""
    scheme = url.partition("://")[0].lower() if "://" in url else ""
    if scheme in SENTINEL_SCHEMES:
        return _parse_sentinel_url(url)
    if scheme in CLUSTER_SCHEMES:
        return _parse_cluster_url(url)
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
    username, password, sentinels = _credentials_and_hosts(parts.netloc, "Sentinel", url)
    db, _, service = parts.path[1:].partition("/")
    if not service or "/" in service:
        raise ValueError(f"names the service after the db, as in "
                         f"redis+sentinel://h1:26379,h2:26379/0/mymaster; got {shown(url)!r}")
    if db and not db.isdigit():
        raise ValueError(f"has db {db!r}, not a number: {shown(url)!r}")
    return SentinelURL(sentinels=sentinels, service=unquote(service), db=int(db or 0),
                       username=username, password=password)


def _parse_cluster_url(url):
    """Read redis+cluster://[user:password@]h1:p1,h2:p2: any nodes of the cluster, at least one."""
    parts = urlsplit(url)
    if parts.path.strip("/") not in ("", "0"):
        raise ValueError(f"names no db (a cluster has only db 0): {shown(url)!r}")
    username, password, nodes = _credentials_and_hosts(parts.netloc, "node", url)
    return ClusterURL(nodes=nodes, username=username, password=password)


def _credentials_and_hosts(netloc, what, url):
    credentials, _, hosts = netloc.rpartition("@")
    username, _, password = credentials.partition(":")
    addresses = []
    for address in hosts.split(","):
        host, _, port = address.rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"lists each {what} as host:port, got {address!r} in {shown(url)!r}")
        addresses.append((host.strip("[]"), int(port)))
    return unquote(username) or None, unquote(password) or None, tuple(addresses)


def shown(url):
    """`url` with its password hidden, to be quoted in an error message or a log."""
    credentials, at, rest = url.partition("://")[2].rpartition("@")
    if not at or ":" not in credentials:
        return url
    scheme = url.partition("://")[0]
    return f"{scheme}://{credentials.partition(':')[0]}:***@{rest}"

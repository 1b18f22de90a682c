"""Who is online in each room, across every worker, expiring with heartbeats.

A connection in a room is the member `user_id<US>sid<US>name` of two sorted sets:
one scored by the time its heartbeat expires, one scored 0 so that a lexical range
finds a user's connections. A user with two tabs is one member of the room, two
users of the same name are two; a worker that dies stops refreshing its
connections and they expire.
"""
import dataclasses
import logging

import gevent
import gevent.lock
import redis

from .auth import User

log = logging.getLogger(__name__)

SEPARATOR = "\x1f"
ANNOUNCER_HOST_ID = "scalechat-presence"  # the host_id of the joins JOIN announces

# Shared by every script: presence may still change at Redis' memory bound (it is small and
# bounded by the connections; stored messages are what noeviction refuses), the time from
# Redis (one clock for all workers),
# the look-up of a user's connections, and the removal of expired ones,
# which returns a member of each user that has no connection left.
_LIB = """#!lua flags=allow-oom
local SEP = '\\031'
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local function has_user(index, user)
  return #redis.call('ZRANGEBYLEX', index, '[' .. user .. SEP,
                     '(' .. user .. '\\032', 'LIMIT', 0, 1) > 0
end
local function purge(expiry, index, now)
  local expired = redis.call('ZRANGEBYSCORE', expiry, '-inf', now)
  local gone, seen = {}, {}
  for i = 1, #expired, 500 do
    local batch = {unpack(expired, i, math.min(i + 499, #expired))}
    redis.call('ZREM', expiry, unpack(batch))
    redis.call('ZREM', index, unpack(batch))
  end
  for _, member in ipairs(expired) do
    local user = string.match(member, '^(.-)' .. SEP)
    if user and not seen[user] and not has_user(index, user) then
      seen[user] = true
      table.insert(gone, member)
    end
  end
  return gone
end
"""

# KEYS: expiry, index, the room's channel. ARGV: user_id, sid, ttl_ms, room, ANNOUNCER_HOST_ID,
# name. Returns {users gone, every connection now in the room}: one round trip per join. A user
# new to a room with other members is announced to them on the room's channel, as
# python-socketio's pub/sub `emit` message, from a host_id no worker has (all deliver it).
JOIN = _LIB + """
local now = now_ms()
local gone = purge(KEYS[1], KEYS[2], now)
local fresh = not has_user(KEYS[2], ARGV[1])
local member = ARGV[1] .. SEP .. ARGV[2] .. SEP .. ARGV[6]
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[3]), member)
redis.call('ZADD', KEYS[2], 0, member)
local connections = redis.call('ZRANGE', KEYS[2], 0, -1)
if fresh and #connections > 1 then
  redis.call('SPUBLISH', KEYS[3], cjson.encode({
    method = 'emit', event = 'presence', namespace = '/', room = ARGV[4],
    data = {{room = ARGV[4], user_id = ARGV[1], user = ARGV[6], state = 'join'}},
    skip_sid = ARGV[2], host_id = ARGV[5]}))
end
return {gone, connections}
"""

# KEYS: expiry, index. ARGV: user_id, sid, name. Returns {absent, gone...}.
LEAVE = _LIB + """
local member = ARGV[1] .. SEP .. ARGV[2] .. SEP .. ARGV[3]
local removed = redis.call('ZREM', KEYS[1], member)
redis.call('ZREM', KEYS[2], member)
local gone = purge(KEYS[1], KEYS[2], now_ms())
local absent = (removed == 1 and not has_user(KEYS[2], ARGV[1])) and 1 or 0
table.insert(gone, 1, absent)
return gone
"""

# KEYS: expiry, index. ARGV: ttl_ms, member... Returns the users gone.
# Members are added back if missing (expired during a Redis outage): the worker's
# own connections are the truth about them.
HEARTBEAT = _LIB + """
local now = now_ms()
local expires = now + tonumber(ARGV[1])
for i = 2, #ARGV do
  redis.call('ZADD', KEYS[1], expires, ARGV[i])
  redis.call('ZADD', KEYS[2], 0, ARGV[i])
end
return purge(KEYS[1], KEYS[2], now)
"""

# KEYS: expiry, index. Returns every connection still alive (the lobby's counts).
MEMBERS = _LIB + """
purge(KEYS[1], KEYS[2], now_ms())
return redis.call('ZRANGE', KEYS[2], 0, -1)
"""


@dataclasses.dataclass
class LocalConnection:
    """A Socket.IO connection on this worker and the rooms it joined."""

    user: User
    rooms: set = dataclasses.field(default_factory=set)


class Presence:
    """Room membership: local connections here, every worker's in Redis."""

    def __init__(self, redis, keys, ttl_seconds):
        self.redis = redis
        self.keys = keys
        self.ttl_ms = ttl_seconds * 1000
        self.local = {}
        # a heartbeat in flight must not add back a connection that leaves meanwhile
        self._beating = gevent.lock.Semaphore()
        self._leave = redis.register_script(LEAVE)
        self._heartbeat = redis.register_script(HEARTBEAT)
        self._members = redis.register_script(MEMBERS)
        self._heartbeat_task = None

    def _room_keys(self, room):
        return [self.keys.presence_expiry(room), self.keys.presence_index(room)]

    def connect(self, sid, user):
        """Remember a new connection of this worker."""
        self.local[sid] = LocalConnection(user)

    def connection(self, sid):
        """Return the connection record of a local sid, or None."""
        return self.local.get(sid)

    def join(self, pipe, sid, room):
        """Queue on `pipe` a connection joining a room; return the reader of its reply.

        The room's other members hear of the user if it was not there yet. The reader
        returns (users gone, members).
        """
        conn = self.local[sid]
        # EVAL, not EVALSHA: redis-py checks a pipeline's scripts with SCRIPT EXISTS first
        # (and a cluster's pipeline has no eval())
        pipe.execute_command("EVAL", JOIN, 3, *self._room_keys(room),
                             self.keys.room_channel(room), conn.user.id, sid, self.ttl_ms, room,
                             ANNOUNCER_HOST_ID, conn.user.name)

        def read(reply):
            gone, connections = reply
            conn.rooms.add(room)
            return ([user for user in map(user_of, gone) if user.id != conn.user.id],
                    users_of(connections))
        return read

    def leave(self, sid, room):
        """Remove a connection from a room; return (user has left, users gone)."""
        conn = self.local[sid]
        with self._beating:
            conn.rooms.discard(room)
            absent, *gone = self._leave(keys=self._room_keys(room),
                                        args=[conn.user.id, sid, conn.user.name])
        return bool(absent), [user_of(member) for member in gone]

    def disconnect(self, sid):
        """Forget a local connection once it has left its rooms."""
        self.local.pop(sid, None)

    def online_counts(self, rooms):
        """Return the number of users online in each of `rooms`."""
        def queue(pipe):
            for room in rooms:
                self._members(keys=self._room_keys(room), client=pipe)
        return {room: len(users_of(connections))
                for room, connections in zip(rooms, self._run(queue))}

    def heartbeat(self):
        """Refresh this worker's connections; return {room: users gone} of every room here."""
        with self._beating:
            return self._refresh()

    def _refresh(self):
        by_room = {}
        for sid, conn in list(self.local.items()):
            for room in conn.rooms:
                by_room.setdefault(room, []).append(
                    SEPARATOR.join((conn.user.id, sid, conn.user.name)))
        if not by_room:
            return {}

        def queue(pipe):
            for room, members in by_room.items():
                self._heartbeat(keys=self._room_keys(room), args=[self.ttl_ms, *members],
                                client=pipe)
        return {room: [user_of(member) for member in gone]
                for room, gone in zip(by_room, self._run(queue)) if gone}

    def _run(self, queue):
        """Run the scripts `queue` puts on a pipeline, in one round trip per node.

        redis-py loads a plain pipeline's scripts itself; a cluster's pipeline fails on a
        master that lacks one (new, restarted, promoted), so they are loaded and it runs again.
        """
        for attempt in range(2):
            pipe = self.redis.pipeline(transaction=False)
            queue(pipe)
            try:
                return pipe.execute()
            except redis.exceptions.NoScriptError:
                if attempt:
                    raise
                for script in (self._heartbeat, self._members):
                    self.redis.script_load(script.script)

    def start_heartbeat(self, on_beat):
        """Refresh presence every third of its lifetime in a background greenlet, once.

        `on_beat` receives {room: users gone} after each refresh.
        """
        if self._heartbeat_task is None:
            self._heartbeat_task = gevent.spawn(self._heartbeat_forever, on_beat)

    def _heartbeat_forever(self, on_beat):
        while True:
            gevent.sleep(self.ttl_ms / 3000)
            try:
                on_beat(self.heartbeat())
            except Exception:
                log.exception("presence heartbeat failed; retrying")


def user_of(member):
    """Return the user of a `user_id<US>sid<US>name` member (`name<US>sid` before ids)."""
    user_id, _, rest = member.partition(SEPARATOR)
    return User(user_id, rest.partition(SEPARATOR)[2] or user_id)


def users_of(connections):
    """Return the distinct users of members as [{"id", "name"}], sorted by name, then id."""
    users = {user.id: user for user in map(user_of, connections)}
    return [{"id": user.id, "name": user.name}
            for user in sorted(users.values(), key=lambda user: (user.name, user.id))]

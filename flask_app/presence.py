"""Who is online in each room, across every worker, expiring with heartbeats.

A connection in a room is the member `user_id<US>sid<US>name` of two sorted sets: one scored
by the time its heartbeat expires, one scored 0 so that a lexical range pages through users in
id order. A hash counts each user's connections, so a user with two tabs is one member of the
room, two users of the same name are two, and the number of users online is one HLEN. A join,
a leave and a lobby's count cost the same whatever the room's size: a joiner gets the first
page of members and the count, and pages through the rest. A worker that dies stops refreshing
its connections and they expire.
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

# Shared by every script (KEYS: expiry, index, users): presence may still change at Redis'
# memory bound (it is small and bounded by the connections; stored messages are what
# noeviction refuses), the time from Redis (one clock for all workers), adding and removing a
# connection with its user's count, the removal of expired connections, which returns a member
# of each user that has no connection left, and the users hash rebuilt from the index for rooms
# whose members were recorded before it existed. PAGE reads the users after a user id.
_LIB = """#!lua flags=allow-oom
local SEP = '\\031'
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local function user_of(member)
  return string.match(member, '^(.-)' .. SEP) or member
end
local function count_users()
  if redis.call('EXISTS', KEYS[3]) == 0 then
    for _, member in ipairs(redis.call('ZRANGE', KEYS[2], 0, -1)) do
      redis.call('HINCRBY', KEYS[3], user_of(member), 1)
    end
  end
end
local function add(member, expires)  -- true when the member's user was not in the room
  redis.call('ZADD', KEYS[1], expires, member)
  return redis.call('ZADD', KEYS[2], 0, member) == 1
         and redis.call('HINCRBY', KEYS[3], user_of(member), 1) == 1
end
local function remove(member)  -- true when the member's user has no connection left
  redis.call('ZREM', KEYS[1], member)
  if redis.call('ZREM', KEYS[2], member) == 0 then
    return false
  end
  local user = user_of(member)
  if redis.call('HINCRBY', KEYS[3], user, -1) > 0 then
    return false
  end
  redis.call('HDEL', KEYS[3], user)
  return true
end
local function purge(now)
  count_users()
  local gone = {}
  for _, member in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now)) do
    if remove(member) then
      table.insert(gone, member)
    end
  end
  return gone
end
local function page(after, limit)  -- {connections of the `limit` users after `after`, more?}
  local from = after == '' and '-' or '[' .. after .. '\\032'
  local connections, users, last = {}, 0, nil
  while true do
    local batch = redis.call('ZRANGEBYLEX', KEYS[2], from, '+', 'LIMIT', 0, limit + 1)
    for _, member in ipairs(batch) do
      local user = user_of(member)
      if user ~= last then
        if users == limit then
          return {connections, 1}
        end
        users, last = users + 1, user
      end
      table.insert(connections, member)
    end
    if #batch <= limit then
      return {connections, 0}
    end
    from = '(' .. batch[#batch]
  end
end
"""

# KEYS: expiry, index, users, the room's channel. ARGV: user_id, sid, ttl_ms, room,
# ANNOUNCER_HOST_ID, name, page size. Returns {users gone, the first page of connections, 1 if
# more users follow, users online}: one round trip per join. A user new to a room with other
# members is announced to them on the room's channel, as python-socketio's pub/sub `emit`
# message, from a host_id no worker has (all deliver it): by name while the room's users fit in
# one page (the joiners' acks list them all), by the count alone beyond it (see Presence).
JOIN = _LIB + """
local now = now_ms()
local gone = purge(now)
local fresh = add(ARGV[1] .. SEP .. ARGV[2] .. SEP .. ARGV[6], now + tonumber(ARGV[3]))
local online = redis.call('HLEN', KEYS[3])
if fresh and online > 1 then
  local event, data = 'presence', {room = ARGV[4], user_id = ARGV[1], user = ARGV[6],
                                   state = 'join'}
  if online > tonumber(ARGV[7]) then
    event, data = 'online', {room = ARGV[4], online = online}
  end
  redis.call('SPUBLISH', KEYS[4], cjson.encode({
    method = 'emit', event = event, namespace = '/', room = ARGV[4], data = {data},
    skip_sid = ARGV[2], host_id = ARGV[5]}))
end
local first = page('', tonumber(ARGV[7]))
return {gone, first[1], first[2], online}
"""

# KEYS: expiry, index, users. ARGV: user_id, sid, name. Returns {absent, users online, gone...}.
LEAVE = _LIB + """
count_users()
local absent = remove(ARGV[1] .. SEP .. ARGV[2] .. SEP .. ARGV[3]) and 1 or 0
local gone = purge(now_ms())
table.insert(gone, 1, redis.call('HLEN', KEYS[3]))
table.insert(gone, 1, absent)
return gone
"""

# KEYS: expiry, index, users. ARGV: ttl_ms, member... Returns {users online, gone...}.
# Members are added back if missing (expired during a Redis outage): the worker's
# own connections are the truth about them.
HEARTBEAT = _LIB + """
local now = now_ms()
count_users()
for i = 2, #ARGV do
  add(ARGV[i], now + tonumber(ARGV[1]))
end
local gone = purge(now)
table.insert(gone, 1, redis.call('HLEN', KEYS[3]))
return gone
"""

# KEYS: expiry, index, users. ARGV: a user id ('' for the first page), page size. Returns
# {connections of the next users, 1 if more follow, users online}.
PAGE = _LIB + """
purge(now_ms())
local next = page(ARGV[1], tonumber(ARGV[2]))
return {next[1], next[2], redis.call('HLEN', KEYS[3])}
"""

# KEYS: expiry, index, users. Returns how many users are online (the lobby's counts).
ONLINE = _LIB + """
purge(now_ms())
return redis.call('HLEN', KEYS[3])
"""


@dataclasses.dataclass
class Members:
    """A page of a room's users in id order, and how many are online."""

    users: list
    more: bool
    online: int

    def page(self):
        """The page as a client gets it: `next` is the `after` of the next page, or None."""
        return {"members": self.users, "online": self.online,
                "next": self.users[-1]["id"] if self.more else None}


@dataclasses.dataclass
class LocalConnection:
    """A Socket.IO connection on this worker and the rooms it joined."""

    user: User
    rooms: set = dataclasses.field(default_factory=set)


class Presence:
    """Room membership: local connections here, every worker's in Redis.

    A large room, one with more users online than a page of members, announces joins and
    leaves by its count (an `online` event, which each worker sends its members at most once
    every manager.COUNT_EVERY): a crowd joining costs each member a few events, not one a join.
    """

    def __init__(self, redis, keys, ttl_seconds):
        self.redis = redis
        self.keys = keys
        self.ttl_ms = ttl_seconds * 1000
        self.local = {}
        # a heartbeat in flight must not add back a connection that leaves meanwhile
        self._beating = gevent.lock.Semaphore()
        self._leave = redis.register_script(LEAVE)
        self._heartbeat = redis.register_script(HEARTBEAT)
        self._page = redis.register_script(PAGE)
        self._online = redis.register_script(ONLINE)
        self._heartbeat_task = None

    def _room_keys(self, room):
        return [self.keys.presence_expiry(room), self.keys.presence_index(room),
                self.keys.presence_users(room)]

    def connect(self, sid, user):
        """Remember a new connection of this worker."""
        self.local[sid] = LocalConnection(user)

    def connection(self, sid):
        """Return the connection record of a local sid, or None."""
        return self.local.get(sid)

    def join(self, pipe, sid, room, page_size):
        """Queue on `pipe` a connection joining a room; return the reader of its reply.

        The room's other members hear of the user if it was not there yet. The reader
        returns (users gone, the room's first Members).
        """
        conn = self.local[sid]
        # EVAL, not EVALSHA: redis-py checks a pipeline's scripts with SCRIPT EXISTS first
        # (and a cluster's pipeline has no eval())
        pipe.execute_command("EVAL", JOIN, 4, *self._room_keys(room),
                             self.keys.room_channel(room), conn.user.id, sid, self.ttl_ms, room,
                             ANNOUNCER_HOST_ID, conn.user.name, page_size)

        def read(reply):
            gone, connections, more, online = reply
            conn.rooms.add(room)
            return ([user for user in map(user_of, gone) if user.id != conn.user.id],
                    Members(users_of(connections), bool(more), online))
        return read

    def members(self, room, after, page_size):
        """Return the Members of up to `page_size` users after the user id `after`."""
        connections, more, online = self._page(keys=self._room_keys(room),
                                               args=[after, page_size])
        return Members(users_of(connections), bool(more), online)

    def leave(self, sid, room):
        """Remove a connection from a room; return (user has left, users gone, users online)."""
        conn = self.local[sid]
        with self._beating:
            conn.rooms.discard(room)
            absent, online, *gone = self._leave(keys=self._room_keys(room),
                                                args=[conn.user.id, sid, conn.user.name])
        return bool(absent), [user_of(member) for member in gone], online

    def disconnect(self, sid):
        """Forget a local connection once it has left its rooms."""
        self.local.pop(sid, None)

    def online_counts(self, rooms):
        """Return the number of users online in each of `rooms`."""
        def queue(pipe):
            for room in rooms:
                run_script(pipe, self._online, self._room_keys(room))
        return dict(zip(rooms, self._run(queue)))

    def heartbeat(self):
        """Refresh this worker's connections; return {room: (users gone, users online)} of the
        rooms here that users left."""
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
                run_script(pipe, self._heartbeat, self._room_keys(room), self.ttl_ms, *members)
        return {room: ([user_of(member) for member in gone], online)
                for room, (online, *gone) in zip(by_room, self._run(queue)) if gone}

    def _run(self, queue):
        """Run the scripts `queue` puts on a pipeline, in one round trip per node.

        A master that lacks a script (new, restarted, promoted) fails the pipeline: the scripts
        are loaded (on every master) and it runs again.
        """
        for attempt in range(2):
            pipe = self.redis.pipeline(transaction=False)
            queue(pipe)
            try:
                return pipe.execute()
            except redis.exceptions.NoScriptError:
                if attempt:
                    raise
                for script in (self._heartbeat, self._online):
                    self.redis.script_load(script.script)

    def start_heartbeat(self, on_beat):
        """Refresh presence every third of its lifetime in a background greenlet, once.

        `on_beat` receives heartbeat()'s answer after each refresh.
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


def run_script(pipe, script, keys, *args):
    """Queue `script` on `pipe` by its SHA: redis-py blocks a Script called on a cluster's
    pipeline, and checks a plain pipeline's scripts with SCRIPT EXISTS on every execute."""
    pipe.execute_command("EVALSHA", script.sha, len(keys), *keys, *args)


def user_of(member):
    """Return the user of a `user_id<US>sid<US>name` member (`name<US>sid` before ids)."""
    user_id, _, rest = member.partition(SEPARATOR)
    return User(user_id, rest.partition(SEPARATOR)[2] or user_id)


def users_of(connections):
    """Return the distinct users of members as [{"id", "name"}], in the members' order."""
    users = {user.id: user for user in map(user_of, connections)}
    return [{"id": user.id, "name": user.name} for user in users.values()]

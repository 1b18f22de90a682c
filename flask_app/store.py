"""Room messages in Redis Streams: store, deduplicate, publish, read history."""
import time

import redis

from .redis.batching import Batcher

# The host_id of the messages the script below publishes: no worker has it, so every
# worker delivers them, the sender's included.
STORE_HOST_ID = "scalechat-store"

# One script stores the message and publishes it, so the order on the room's channel is the
# order of the stream on every worker, and a retried client_id returns the first id without a
# second store or broadcast.
# KEYS: the stream, the dedup hashes of this period and of the periods either side (a retry on
# a worker whose clock is a little off still finds the first send), and the room's channel,
# all in the room's slot (Redis refuses a script whose keys span slots). A message's record
# goes into this period's hash, which expires at the end of the next period (ARGV[2]).
# The published envelope is python-socketio's pub/sub `emit` message (ARGV[7] is
# STORE_HOST_ID). ARGV[4] is the sender's name at send time, ARGV[8] its user id. Redis refuses
# the first write when it is out of memory: nothing is stored. Scripts do not roll back, so the
# publish comes last.
APPEND_AND_PUBLISH = """
local sent = ARGV[8] .. '\\031' .. ARGV[6]
local existing = redis.call('HGET', KEYS[3], sent) or redis.call('HGET', KEYS[2], sent)
                 or redis.call('HGET', KEYS[4], sent)
local function record(id)  -- on a retry too: a write, so a WAIT after it covers the first
  redis.call('HSET', KEYS[3], sent, id)
  redis.call('EXPIREAT', KEYS[3], ARGV[2], 'NX')
end
if existing then
  record(existing)
  return {existing, 0}
end
local id = redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[1], '*',
                      'user', ARGV[4], 'text', ARGV[5], 'client_id', ARGV[6],
                      'user_id', ARGV[8])
record(id)
local message = {id = id, room = ARGV[3], user = ARGV[4], text = ARGV[5],
                 ts = tonumber(string.match(id, '^(%d+)')), client_id = ARGV[6],
                 user_id = ARGV[8]}
redis.call('SPUBLISH', KEYS[5], cjson.encode({
  method = 'emit', event = 'message', data = {message}, namespace = '/',
  room = ARGV[3], host_id = ARGV[7]}))
return {id, 1}
"""


# The messages after `since`, and the oldest id the stream still holds: if that is
# after `since`, `since` itself was trimmed, and messages after it may have been too.
SINCE = """
local entries = redis.call('XRANGE', KEYS[1], '(' .. ARGV[1], '+', 'COUNT', ARGV[2])
local first = redis.call('XRANGE', KEYS[1], '-', '+', 'COUNT', 1)[1]
return {entries, first and first[1] or '0-0'}
"""


# Make the stream's next ids follow a message id that it may not hold: a message its master
# lost (a failover, the last second of a crash) after members saw it. KEYS: the stream. ARGV:
# the id's ms and seq (digits), and '1' if the id was read from Redis, '0' if a client gave it.
# Returns 0, changing nothing, for a client's id later than Redis' clock: no message had it.
KEEP_IDS_AFTER = """
local function later(ms1, seq1, ms2, seq2)  -- digit strings without leading zeros
  if ms1 ~= ms2 then
    return #ms1 > #ms2 or (#ms1 == #ms2 and ms1 > ms2)
  end
  return #seq1 > #seq2 or (#seq1 == #seq2 and seq1 > seq2)
end
local exists = redis.call('EXISTS', KEYS[1]) == 1
local last_ms, last_seq = '0', '0'
if exists then
  local info = redis.call('XINFO', 'STREAM', KEYS[1])
  for i = 1, #info, 2 do
    if info[i] == 'last-generated-id' then
      last_ms, last_seq = string.match(info[i + 1], '^(%d+)-(%d+)$')
    end
  end
end
if not later(ARGV[1], ARGV[2], last_ms, last_seq) then
  return 1
end
if ARGV[3] ~= '1' then
  local now = redis.call('TIME')
  local now_ms = now[1] .. string.format('%03d', math.floor(tonumber(now[2]) / 1000))
  if later(ARGV[1], '0', now_ms, '0') then
    return 0
  end
end
if exists then
  redis.call('XSETID', KEYS[1], ARGV[1] .. '-' .. ARGV[2])
end
return 1
"""

LAST_POSSIBLE_ID = (2**64 - 1, 2**64 - 1)

class NotReplicated(redis.RedisError):
    """A message is stored on the master, but too few replicas have it yet to acknowledge it."""


TOUCH_EVERY = 1.0  # seconds between two records of a room's activity by one worker
TOUCHED_MAX = 10_000  # rooms remembered before the record starts afresh


class MessageStore:
    """The messages of every room, one bounded stream per room."""

    def __init__(self, redis, keys, config, observe=None):
        self.redis = redis
        self.keys = keys
        self.config = config
        self._append = redis.register_script(APPEND_AND_PUBLISH)
        self._keep_ids_after = redis.register_script(KEEP_IDS_AFTER)
        self._touched = {}  # room -> when this worker last recorded activity there
        self._batchers = {}  # Redis node name (None for one Redis) -> its Batcher
        self.observe = observe  # called with the seconds of each round trip of stores

    def append(self, room, user, text, client_id):
        """Store a message of `user` and broadcast it to the room; return (id, stored_now).

        A retry with the same client_id is recognised for at least SCALECHAT_DEDUP_TTL: records
        are kept in one hash per period of that length, until the next period ends. The script
        shares its round trip with the other sends of the moment to the same Redis node
        (batching.py); with SCALECHAT_MIN_REPLICAS, so does the WAIT that follows them.
        """
        period = int(time.time()) // self.config.dedup_ttl
        keys = [self.keys.room_stream(room),
                *(self.keys.dedup(room, p) for p in (period - 1, period, period + 1)),
                self.keys.room_channel(room)]
        args = [self.config.history_maxlen, (period + 2) * self.config.dedup_ttl,
                room, user.name, text, client_id, STORE_HOST_ID, user.id]
        # Not while Sentinel fails the master over: its other replica acknowledges writes
        # until Sentinel moves it to the new master, which never gets them.
        watch = getattr(getattr(self.redis, "connection_pool", None), "watch", None)
        for _ in range(2):
            if watch is not None and watch.under_way:
                raise NotReplicated("Sentinel is failing over the master")
            begun = watch.begun if watch is not None else 0
            reply, replicas = self._batcher(keys[0]).run(
                "EVALSHA", self._append.sha, len(keys), *keys, *args)
            if isinstance(reply, redis.exceptions.NoScriptError):
                self.redis.script_load(APPEND_AND_PUBLISH)  # a new or restarted Redis
                continue
            if isinstance(reply, redis.exceptions.MovedError):
                self.redis.nodes_manager.initialize()  # the slot has a new master
                continue
            if isinstance(reply, Exception):
                raise reply
            message_id, created = reply
            if replicas is not None and replicas < self.config.min_replicas:
                raise NotReplicated(
                    f"{replicas} of {self.config.min_replicas} replicas have message {message_id}")
            if watch is not None and watch.begun != begun:
                raise NotReplicated(f"a failover began while message {message_id} was stored")
            return message_id, bool(created)
        raise redis.exceptions.NoScriptError("the store script could not be loaded")

    def _batcher(self, key):
        """The Batcher of the Redis node that holds `key`: on a cluster, its slot's master,
        whose own connection the WAIT must go on."""
        if isinstance(self.redis, redis.RedisCluster):
            node = self.redis.get_node_from_key(key)
            name, client = node.name, node.redis_connection
        else:
            name, client = None, self.redis
        batcher = self._batchers.get(name)
        if batcher is None or batcher.client is not client:
            batcher = self._batchers[name] = Batcher(
                client, self.config.min_replicas, self.config.replica_timeout, self.observe)
        return batcher

    def history(self, room, after=None, before=None, limit=50):
        """Return up to `limit` messages between the exclusive bounds, oldest first.

        With `after`, the page starts just after it (catching up); otherwise it
        ends just before `before`, or at the newest message (scrolling back).
        """
        if (after and id_order(after) == LAST_POSSIBLE_ID) or (before and id_order(before) == (0, 0)):
            return []  # nothing can follow the last possible id or precede 0-0 (Redis refuses both)
        stream = self.keys.room_stream(room)
        low = f"({after}" if after else "-"
        high = f"({before}" if before else "+"
        if after:
            entries = self.redis.xrange(stream, low, high, count=limit)
        else:
            entries = self.redis.xrevrange(stream, high, low, count=limit)
            entries.reverse()
        return [message(room, entry_id, fields) for entry_id, fields in entries]

    def newest_id(self, room):
        """Return the id of the room's newest message, or '0-0' if it has none."""
        entries = self.redis.xrevrange(self.keys.room_stream(room), "+", "-", count=1)
        return entries[0][0] if entries else "0-0"

    def keep_ids_after(self, room, message_id, read_from_redis=False):
        """Make the room's next messages' ids follow `message_id`; False if it is not an id
        that a message could have had yet (a client's, later than Redis' clock).

        A message its master lost may have been delivered: members' cursors are then after
        the stream's end, and a new master whose clock is behind the old one's would give
        later messages smaller ids, which the members' workers would take for old ones.
        """
        ms, seq = id_order(message_id)
        return bool(self._keep_ids_after(keys=[self.keys.room_stream(room)],
                                         args=[ms, seq, int(read_from_redis)]))

    def join_history(self, pipe, room, since):
        """Queue on `pipe` the history a joiner gets; return the reader of its reply.

        The reader returns (messages oldest first, whether more were missed). Without
        `since` they are the newest `history_on_join`; with it, those after `since`, at most
        `history_max_limit`, and more were missed when more followed or when the stream's
        bound has trimmed `since` (and perhaps messages after it).
        """
        stream = self.keys.room_stream(room)
        if since is None:
            pipe.xrevrange(stream, "+", "-", count=self.config.history_on_join)
            return lambda entries: ([message(room, entry_id, fields)
                                     for entry_id, fields in reversed(entries)], False)
        limit = self.config.history_max_limit
        # EVAL: EVALSHA would cost a SCRIPT EXISTS, and a cluster's pipeline has no eval()
        pipe.execute_command("EVAL", SINCE, 1, stream, since, limit + 1)

        def read(reply):
            entries, oldest = reply
            messages = [message(room, entry_id, dict(zip(fields[::2], fields[1::2])))
                        for entry_id, fields in entries[:limit]]
            return messages, len(entries) > limit or id_order(oldest) > id_order(since)
        return read

    def touch_room(self, pipe, room, now):
        """Queue on `pipe` the record of activity in a room, for the lobby's list.

        At most once a second per room and worker: the lobby orders rooms by activity,
        and a crowd joining one room need not rewrite its time for each of them.
        """
        if now - self._touched.get(room, 0) < TOUCH_EVERY:
            return
        if len(self._touched) >= TOUCHED_MAX:
            self._touched.clear()
        self._touched[room] = now
        pipe.zadd(self.keys.rooms(), {room: now})

    def recent_rooms(self, count):
        """Return the most recently active rooms, newest first."""
        return self.redis.zrevrange(self.keys.rooms(), 0, count - 1)


def message(room, message_id, fields):
    """Return the wire form of a stored message; its time comes from its id.

    Messages stored before users had ids have a `user_id` of None.
    """
    return {"id": message_id, "room": room, "user": fields["user"],
            "user_id": fields.get("user_id"),
            "text": fields["text"], "ts": int(message_id.split("-", 1)[0]),
            "client_id": fields["client_id"]}


def id_order(message_id):
    """Return a sortable form of a stream id ('<ms>-<seq>', or '<ms>')."""
    ms, _, seq = message_id.partition("-")
    return int(ms), int(seq or 0)

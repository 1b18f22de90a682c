"""Every Redis key scalechat uses; nothing else formats a key."""


class Keys:
    """Key builders under one prefix, so several deployments can share a Redis.

    A room's keys carry the room in a {hash tag}, so a Lua script touching
    them stays on one Redis Cluster slot.
    """

    def __init__(self, prefix):
        self.prefix = prefix

    def room_stream(self, room):
        """The room's message stream: history and ordering for every worker."""
        return f"{self.prefix}room:{{{room}}}:messages"

    def dedup(self, room, period):
        """The stream ids first stored for clients' message ids in one period, as one hash:
        a field costs Redis about half of what a key with its own expiry does."""
        return f"{self.prefix}room:{{{room}}}:dedup:{period}"

    def presence_expiry(self, room):
        """Connections in the room, scored by the time their heartbeat expires."""
        return f"{self.prefix}room:{{{room}}}:presence:expiry"

    def presence_index(self, room):
        """The same connections, scored 0, in `user_id<US>sid<US>name` order for prefix look-ups."""
        return f"{self.prefix}room:{{{room}}}:presence:index"

    def rooms(self):
        """Every room ever joined, scored by its last activity."""
        return f"{self.prefix}rooms"

    def room_channel(self, room):
        """The room's pub/sub shard channel, in the slot of its stream: its messages, presence
        and typing reach only the workers that have members in it."""
        return f"{self.prefix}room:{{{room}}}:live"

    def probe_channel(self, tag, listener):
        """A shard channel in the slot of `{tag}` that only one listener subscribes to: the
        worker publishes there to check that its subscription still hears Redis."""
        return f"{self.prefix}probe:{{{tag}}}:{listener}"

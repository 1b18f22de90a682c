"""A token bucket per connection: a steady rate with room for short bursts."""
import time


class TokenBucket:
    """Allow `rate` events per second on average and `burst` at once; count refusals in a row."""

    __slots__ = ("rate", "burst", "tokens", "stamp", "refused_in_a_row")

    def __init__(self, rate, burst, now=None):
        self.rate = rate
        self.burst = burst
        self.tokens = float(burst)
        self.stamp = time.monotonic() if now is None else now
        self.refused_in_a_row = 0

    def allow(self, now):
        """Take one token if there is one; return whether the event may proceed."""
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens >= 1:
            self.tokens -= 1
            self.refused_in_a_row = 0
            return True
        self.refused_in_a_row += 1
        return False

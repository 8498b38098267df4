"""Token buckets: the one rate-limiting rule used for frames per connection and connects per IP.

A bucket holds up to `burst` tokens and refills at `rate` tokens per second; each event takes
one.  A burst lets a client send a short flurry (a reconnect's catch-up, a UI opening several
things at once) while the long-run rate stays capped.  Pure: the caller passes the time.
"""

from __future__ import annotations


class TokenBucket:
    __slots__ = ("burst", "rate", "stamp", "tokens")

    def __init__(self, rate: float, burst: float, now: float) -> None:
        self.rate = rate
        self.burst = max(float(burst), 1.0)
        self.tokens = self.burst
        self.stamp = now

    def take(self, now: float) -> bool:
        """Spend one token if there is one; False means the event is over the limit."""
        if self.rate <= 0:
            return True
        tokens = self.tokens + (now - self.stamp) * self.rate
        self.stamp = now
        if tokens > self.burst:
            tokens = self.burst
        if tokens < 1.0:
            self.tokens = tokens
            return False
        self.tokens = tokens - 1.0
        return True

    def idle(self, now: float) -> bool:
        """Full again: the bucket remembers nothing and can be forgotten."""
        return self.tokens + (now - self.stamp) * self.rate >= self.burst


class KeyedBuckets:
    """One bucket per key (e.g. client IP), pruned when idle so the map cannot grow forever."""

    def __init__(self, rate: float, burst: float) -> None:
        self.rate = rate
        self.burst = burst
        self._buckets: dict[str, TokenBucket] = {}

    def take(self, key: str, now: float) -> bool:
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = self._buckets[key] = TokenBucket(self.rate, self.burst, now)
        return bucket.take(now)

    def prune(self, now: float) -> None:
        for key in [k for k, b in self._buckets.items() if b.idle(now)]:
            del self._buckets[key]

    def __len__(self) -> int:
        return len(self._buckets)

"""The metrics the server exposes: tick lateness is counted in batches, and must read exactly as
prometheus' own `Histogram` would have exposed the same samples."""

from __future__ import annotations

import random

from prometheus_client import CollectorRegistry, Histogram, generate_latest

from asobi.metrics import LATENESS_BUCKETS, Metrics


def _series(text: bytes, name: str) -> dict[str, float]:
    """`name`'s bucket, count and sum samples of an exposition, by sample name and labels."""
    out = {}
    for line in text.decode().splitlines():
        if line.startswith(name) and not line.startswith(f"{name}_created"):
            key, _, value = line.rpartition(" ")
            out[key] = float(value)
    return out


def test_tick_lateness_reads_as_prometheus_histogram_would() -> None:
    rng = random.Random(7)
    # Values on every bucket's bound (le is inclusive), between them, past the last, zeros, and
    # negatives (a match run early: counted as 0).
    samples = [*LATENESS_BUCKETS, 0.0, -0.003, 3.0, *(rng.uniform(0.0006, 0.3) for _ in range(500))]
    reference = Histogram(
        "asobi_tick_lateness_seconds",
        "How late each match tick ran: actual minus scheduled time.",
        buckets=LATENESS_BUCKETS,
        registry=(registry := CollectorRegistry()),
    )
    for value in samples:
        reference.observe(value if value > 0 else 0.0)
    metrics = Metrics()
    metrics.observe_lateness(samples[:100])  # two housekeeping rounds
    metrics.observe_lateness(samples[100:])
    name = "asobi_tick_lateness_seconds"
    ours, theirs = _series(metrics.exposition(), name), _series(generate_latest(registry), name)
    assert ours.keys() == theirs.keys()
    assert ours[f'{name}_bucket{{le="0.0005"}}'] == 3  # 0.0005 itself, 0.0 and the clamped -0.003
    for key, value in theirs.items():
        assert abs(ours[key] - value) < 1e-9, key
    assert list(metrics.drain_recent_lateness())[:3] == list(LATENESS_BUCKETS[:3])

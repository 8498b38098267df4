"""`python -m bench.patch_bytes` runs, and patch frames are smaller than full frames on every
workload (a quick run: the figures themselves are in docs/performance.md)."""

from __future__ import annotations

from bench import patch_bytes


def test_patch_frames_are_smaller_on_every_workload() -> None:
    pairs = patch_bytes.run(matches=2, ticks=20, rounds=1)
    assert [full.workload for full, _ in pairs] == [w.name for w in patch_bytes.WORKLOADS]
    for full, patch in pairs:
        assert full.patch_share == 0.0
        assert 0.8 < patch.patch_share < 1.0, patch
        assert patch.bytes_per_player_s < full.bytes_per_player_s, (full, patch)
    entities = {full.workload: (full, patch) for full, patch in pairs}["entities"]
    assert entities[1].bytes_per_player_s < 0.25 * entities[0].bytes_per_player_s
    assert "| entities |" in patch_bytes.table(pairs)

"""`python -m bench.patch_bytes` runs, and patch frames are smaller than full frames on every
workload, compact ones smaller still (a quick run: the figures themselves are in
docs/performance.md)."""

from __future__ import annotations

from bench import patch_bytes


def test_patch_frames_are_smaller_on_every_workload() -> None:
    results = patch_bytes.run(matches=2, ticks=20, rounds=1)
    assert [full.workload for full, _, _ in results] == [w.name for w in patch_bytes.WORKLOADS]
    for full, patch, compact in results:
        assert full.patch_share == 0.0
        assert 0.8 < patch.patch_share < 1.0, patch
        assert compact.patch_share == patch.patch_share, compact
        assert patch.bytes_per_player_s < full.bytes_per_player_s, (full, patch)
        assert compact.bytes_per_player_s < patch.bytes_per_player_s, (patch, compact)
        assert compact.full_frame_bytes < full.full_frame_bytes, (full, compact)
        assert compact.json_encode_us > 0 and compact.compact_encode_us > 0, compact
    by_name = {full.workload: (full, patch, compact) for full, patch, compact in results}
    full, patch, _ = by_name["entities"]
    assert patch.bytes_per_player_s < 0.25 * full.bytes_per_player_s
    full, _, compact = by_name["bench"]
    assert compact.bytes_per_player_s < 0.25 * full.bytes_per_player_s
    assert "| entities |" in patch_bytes.table(results)

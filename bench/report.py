"""The markdown report of one run (the JSON holds everything; this is the readable part)."""

from __future__ import annotations

import statistics
from typing import Any

from bench import cluster_cost, cluster_matchmaking, drain_bench, patch_bytes, snapshot_cost
from bench.patch_bytes import Row as PatchRow

TARGET_MATCHES = 1000
TARGET_US_PER_FRAME = 15.0
TARGET_KIB_PER_CONN = 32.0
TARGET_KIB_PER_MATCH = 100.0
TARGET_RELOAD_MS = 150.0
TARGET_SPREAD_TICKS = 2.0
TARGET_PATCH_SHARE = 0.25  # bytes of patch frames, as a share of full frames (issue 16)
TARGET_VS_COLYSEUS_BYTES = 2.0  # patch bytes at most this many times Colyseus' deltas


def _f(value: Any, digits: int = 1) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    return f"{value:,}"


def _steps_table(result: dict[str, Any]) -> list[str]:
    lines = [
        "| M matches | clients | frames/s (expected) | server CPU | CPU us/frame "
        "| lateness p50 / p99 / max ms | dropped | jitter p99 ms | RSS MiB | foreign CPU "
        "| holds |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|:---:|",
    ]
    for s in result["steps"]:
        lines.append(
            f"| {s['matches']} | {s['clients']} | {s['frames_per_s']:,.0f} "
            f"({s['expected_per_s']:,.0f}) | {s['server_cpu_pct']:.0f}% "
            f"| {s['cpu_us_per_frame']:.1f} | {s['lateness_p50_ms']:.1f} / "
            f"{s['lateness_p99_ms']:.1f} / {s['lateness_max_ms']:.1f} | {s['dropped']} "
            f"| {s['jitter_p99_ms']:.1f} | {s['rss_mib']:.0f} | {s['foreign_cpu_pct']:.0f}% "
            f"| {'yes' if s['ok'] else 'no'} |"
        )
    return lines


def _best_step(result: dict[str, Any]) -> dict[str, Any] | None:
    """The step used for per-frame and per-match figures: the largest that held the bound,
    else the first one."""
    held = [s for s in result.get("steps", []) if s["ok"]]
    if held:
        return held[-1]
    steps = result.get("steps", [])
    return steps[0] if steps else None


def _held_by_both(
    a: dict[str, Any], b: dict[str, Any]
) -> tuple[dict[int, dict], dict[int, dict], list[int]]:
    """Each run's steps that held, by M, and the Ms both held, ascending."""
    held_a = {s["matches"]: s for s in a["steps"] if s["ok"]}
    held_b = {s["matches"]: s for s in b["steps"] if s["ok"]}
    return held_a, held_b, sorted(set(held_a) & set(held_b))


def _common_step(a: dict[str, Any], b: dict[str, Any]) -> tuple[dict, dict]:
    """The steps to compare per-frame cost on: the largest M both held (same load), else each
    one's best."""
    held_a, held_b, common = _held_by_both(a, b)
    if common:
        return held_a[common[-1]], held_b[common[-1]]
    sa, sb = _best_step(a), _best_step(b)
    assert sa is not None and sb is not None
    return sa, sb


def _median_ratio(a: dict[str, Any], b: dict[str, Any]) -> tuple[float, int, int] | None:
    """The median of a's / b's CPU per frame over the steps both held at M of at least half the
    largest such M (where per-frame work, not the fixed costs of a nearly idle server, is what
    is measured): one window disturbed by a neighbour moves it far less than the single ratio
    at the largest common M.  (ratio, first M, last M), or None with no common step."""
    held_a, held_b, common = _held_by_both(a, b)
    if not common:
        return None
    loaded = [m for m in common if m * 2 >= common[-1]]
    ratios = [held_a[m]["cpu_us_per_frame"] / held_b[m]["cpu_us_per_frame"] for m in loaded]
    return statistics.median(ratios), loaded[0], loaded[-1]


def _rss(result: dict[str, Any]) -> tuple[float | None, float | None]:
    """Per idle connection and per running match, from the step that added the most."""
    steps = [s for s in result.get("steps", []) if s.get("rss_per_idle_conn_kib") is not None]
    if not steps:
        return None, None
    biggest = max(
        steps,
        key=lambda s: (
            s["matches"] - (steps[steps.index(s) - 1]["matches"] if steps.index(s) else 0)
        ),
    )
    return biggest["rss_per_idle_conn_kib"], biggest["rss_per_match_kib"]


def markdown(out: dict[str, Any]) -> str:
    lines = [f"# asobi bench{' (smoke)' if out.get('smoke') else ''} — {out.get('started')}", ""]
    machine = out.get("machine", {})
    lines.append(
        f"{machine.get('cpus')} CPUs, server and load generator "
        f"{'pinned to separate cores' if machine.get('pinned') else 'NOT pinned (one core)'}, "
        f"Python {machine.get('python')} (server: {machine.get('server_python', 'the same')}); "
        f'run took {out.get("elapsed_s")} s.  "foreign CPU" is '
        "time other processes took on the server's core during the window (a shared machine); "
        "a failing step is measured twice and the better window kept."
    )
    summary: list[tuple[str, str, str, str]] = []
    asobi = out.get("asobi")
    if asobi:
        lines += _capacity(asobi, "## asobi capacity (M matches x 4 players, 10 Hz)", "", summary)
        per_conn, per_match = _rss(asobi)
        if per_conn is not None:
            summary.append(
                (
                    "RSS per idle connection",
                    f"<= {TARGET_KIB_PER_CONN:.0f} KiB",
                    f"{per_conn:.1f} KiB",
                    _met(per_conn <= TARGET_KIB_PER_CONN),
                )
            )
            summary.append(
                (
                    "RSS per running match (capacity run, just after start)",
                    f"<= {TARGET_KIB_PER_MATCH:.0f} KiB",
                    f"{per_match:.1f} KiB",
                    _met(per_match <= TARGET_KIB_PER_MATCH),
                )
            )
    memory = out.get("match_memory")
    if memory and "rss_per_match_kib" in memory:
        kib = memory["rss_per_match_kib"]
        summary.append(
            (
                f"RSS per running match, steady state ({memory['matches']} matches, "
                f"{memory['ticks']} ticks, in-process)",
                f"<= {TARGET_KIB_PER_MATCH:.0f} KiB",
                f"{kib:.1f} KiB (Lua heap {memory['lua_heap_kib']:.1f})",
                _met(kib <= TARGET_KIB_PER_MATCH),
            )
        )
    shared = out.get("asobi-shared")
    if shared:
        title = (
            "## asobi capacity, `shared_state = true` (one get_state and one encoding per tick, "
            "the same frame for the 4 players)"
        )
        lines += _capacity(shared, title, " (shared_state)", summary)
    switches = out.get("switch_cost") or []
    if switches:
        lines += [
            "",
            "## Cost of switching code, per match (in-process, engine only)",
            "",
            "| get_state | normal tick us | switching tick us | extra us "
            "| extra for 1,000 matches |",
            "|:---|---:|---:|---:|---:|",
        ]
        for c in switches:
            lines.append(
                f"| {_mode(c)} | {c['normal_us']:.1f} | {c['switching_us']:.1f} "
                f"| {c['extra_us']:.1f} | {c['extra_us']:.0f} ms |"
            )
    snapshots = out.get("snapshot_cost") or []
    if snapshots:
        lines += [
            "",
            "## Cost of the match journal, per match (in-process; snapshot once a second)",
            "",
            *snapshot_cost.table(snapshots),
        ]
    reloads = out.get("reload") or []
    if reloads:
        lines += ["", f"## Hot reload under load ({reloads[0]['saves']} saves per row)", ""]
        lines += [
            "| matches x players | get_state | lateness p99 before saves ms "
            "| save -> first new frame p50 / p99 ms "
            "| save -> all matches p50 / p99 ms | spread p50 / max (ticks) "
            "| saves with all matches within 2 ticks | skipped | repeated "
            "| timed out | lateness p99 / max ms during saves |",
            "|---:|:---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for r in reloads:
            s = r["summary"]
            lines.append(
                f"| {r['matches']} x {r.get('players_per_match', 4)} | {_mode(r)} "
                f"| {r.get('quiet_lateness_p99_ms', 0.0):.1f} "
                f"| {s['first_frame_p50_ms']:.0f} / {s['first_frame_p99_ms']:.0f} "
                f"| {s['all_matches_p50_ms']:.0f} / {s['all_matches_p99_ms']:.0f} "
                f"| {s.get('spread_ticks_p50', 0.0):.1f} / {s['spread_ticks_max']:.1f} "
                f"| {s.get('saves_within_2_ticks', '-')} / {r['saves'] - r['timed_out']} "
                f"| {r['skipped']} | {r['repeated']} "
                f"| {r['timed_out']} | {r['lateness_p99_ms']:.1f} / {r['lateness_max_ms']:.1f} |"
            )
        for r in reloads:
            s = r["summary"]
            at = f" ({r['matches']} x {r.get('players_per_match', 4)}, {_mode(r)})"
            clean = not r["timed_out"]
            summary.append(
                (
                    "reload median (save -> first new frame)" + at,
                    f"<= {TARGET_RELOAD_MS:.0f} ms",
                    f"{s['first_frame_p50_ms']:.0f} ms",
                    _met(s["first_frame_p50_ms"] <= TARGET_RELOAD_MS and clean),
                )
            )
            summary.append(
                (
                    "all matches on new code" + at,
                    f"within {TARGET_SPREAD_TICKS:.0f} ticks",
                    f"{s['spread_ticks_max']:.1f} ticks after the first",
                    _met(s["spread_ticks_max"] <= TARGET_SPREAD_TICKS and clean),
                )
            )
        bad = sum(r["skipped"] + r["repeated"] for r in reloads)
        summary.append(("ticks skipped or repeated on reload", "0", str(bad), _met(bad == 0)))
    cluster_rows = out.get("cluster_matchmaking") or []
    if cluster_rows:
        lines += [
            "",
            "## Cluster matchmaking: add -> matched (`bench/cluster_matchmaking.py`)",
            "",
            *cluster_matchmaking.table(cluster_rows),
        ]
    if out.get("cluster_cost"):
        lines += ["", "## Cluster cost (`bench/cluster_cost.py`)", ""]
        lines += cluster_cost.tables(out["cluster_cost"])
    drain_rows = out.get("drain") or []
    if drain_rows:
        lines += [
            "",
            "## Drain: matches moved off a node (`bench/drain_bench.py`)",
            "",
            *drain_bench.table(drain_rows),
        ]
    # (Results saved before the compact encoding have no "compact" row: not shown.)
    patches = [p for p in out.get("patch_bytes") or [] if "compact" in p]
    if patches:
        results = [
            (PatchRow(**p["full"]), PatchRow(**p["patch"]), PatchRow(**p["compact"]))
            for p in patches
        ]
        lines += [
            "",
            "## State frames: full JSON vs `match.patch` in JSON and compact "
            "(in-process, `bench/patch_bytes.py`)",
            "",
            *patch_bytes.table(results).splitlines(),
        ]
        theirs = out.get("colyseus_bytes") or {}
        if theirs:
            lines += [
                "",
                "Colyseus' deltas for the same states and simulation (its own `SchemaSerializer`, "
                "a `StateView` per client for the field game; `bench/peers/colyseus/bytes.js`):",
                "",
                *patch_bytes.colyseus_table(results, theirs).splitlines(),
            ]
        for full, patch, compact in results:
            if full.workload not in ("bench", "field"):
                continue
            coly = theirs.get(full.workload)
            for name, row in (("JSON patch", patch), ("compact", compact)):
                if coly and "error" not in coly:
                    ratio = row.bytes_per_player_s / coly["patch_bytes_per_player_s"]
                    summary.append(
                        (
                            f"{name} bytes per player per second vs Colyseus, {full.workload}",
                            f"<= {TARGET_VS_COLYSEUS_BYTES:.0f}x",
                            f"{ratio:.2f}x",
                            _met(ratio <= TARGET_VS_COLYSEUS_BYTES),
                        )
                    )
                share = row.bytes_per_player_s / full.bytes_per_player_s
                summary.append(
                    (
                        f"{name} bytes per player per second, {full.workload} game",
                        f"<= {TARGET_PATCH_SHARE:.0%} of full frames",
                        f"{share:.0%}",
                        _met(share <= TARGET_PATCH_SHARE),
                    )
                )
    coly = out.get("colyseus")
    if coly:
        lines += ["", "## Colyseus, same game and load", ""]
        if "error" in coly:
            lines.append(f"Not measured: {coly['error']}")
        else:
            lines += _steps_table(coly)
            lines += [
                "",
                "Colyseus lateness is the overshoot of each 100 ms simulation interval, "
                "measured inside the room (Colyseus does not report lateness); dropped is "
                "not observable (patches carry no sequence number; Colyseus buffers "
                "rather than drops).",
                "",
                f"Largest M holding p99 lateness <= 10 ms: **{coly['largest_ok']}** "
                f"({coly['stopped']}).",
            ]
            ratio_rows = [
                _ratio(asobi, coly, "", "ratios", out),
                _ratio(shared, coly, ", shared_state", "ratios_shared", out),
            ]
            rows = [row for pair in ratio_rows if pair for row in pair]
            if rows:
                lines += ["", "| ratio asobi / Colyseus | value |", "|---|---:|", *rows]
    lines += _field(out, summary)
    prof = out.get("profile")
    if prof and "self" in prof:
        lines += [
            "",
            f"## Server profile (py-spy, {prof['matches']} matches, "
            f"{prof['samples']} busy samples)",
            "",
            "| function (self time) | share |",
            "|---|---:|",
        ]
        lines += [f"| `{name}` | {share}% |" for name, share in prof["self"][:12]]
        lines += ["", "| function (inclusive) | share |", "|---|---:|"]
        lines += [f"| `{name}` | {share}% |" for name, share in prof["inclusive"][:12]]
    elif prof:
        lines += ["", f"Profile not taken: {prof.get('error')}"]
    if summary:
        lines += ["", "## Targets", "", "| target | goal | measured | met |", "|---|---|---|:---:|"]
        lines += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in summary]
    return "\n".join(lines)


def _field(out: dict[str, Any], summary: list[tuple[str, str, str, str]]) -> list[str]:
    """The realistic workload on asobi and on Colyseus, side by side."""
    ours, coly = out.get("asobi-field"), out.get("colyseus-field")
    if not ours:
        return []
    lines = [
        "",
        "## Field game: 16 players, 50 moving NPCs, 20 inputs/s per player, per-player views",
        "",
        '`bench/field_game.py` with `state_sync = "patch"` on asobi; the same room on '
        "Colyseus with a `StateView` per client (`bench/peers/colyseus/server.js`).",
        "",
        "### asobi",
        "",
    ]
    for name, result in (("asobi", ours), ("Colyseus", coly)):
        if result is None:
            continue
        if result is not ours:
            lines += ["", f"### {name}", ""]
        if "error" in result:
            lines.append(f"Not measured: {result['error']}")
            continue
        lines += _steps_table(result)
        lines += [
            "",
            f"Largest M holding p99 lateness <= 10 ms: **{result['largest_ok']}** "
            f"({result['stopped']}).",
        ]
    if coly and "error" not in coly and "error" not in ours:
        m_ratio = ours["largest_ok"] / coly["largest_ok"] if coly["largest_ok"] else None
        rows = _ratio(ours, coly, ", field game", "ratios_field", out) or []
        lines += ["", "| ratio asobi / Colyseus | value |", "|---|---:|", *rows]
        summary.append(
            (
                "field game: matches per core at p99 <= 10 ms, vs Colyseus",
                ">= 1.0x",
                f"{ours['largest_ok']} vs {coly['largest_ok']} ({_f(m_ratio, 2)}x)",
                _met(m_ratio is not None and m_ratio >= 1.0),
            )
        )
    elif "error" not in ours:
        summary.append(
            ("field game: matches per core at p99 <= 10 ms", "-", str(ours["largest_ok"]), "-")
        )
    return lines


def _capacity(
    result: dict[str, Any], title: str, label: str, summary: list[tuple[str, str, str, str]]
) -> list[str]:
    """One capacity run: its table and largest M, and its rows of the targets summary."""
    lines = ["", title, "", *_steps_table(result)]
    lines += [
        "",
        f"Largest M holding p99 lateness <= 10 ms with 0 dropped: "
        f"**{result['largest_ok']}** ({result['stopped']}).",
    ]
    summary.append(
        (
            f"matches x 4 at p99 <= 10 ms{label}",
            f">= {TARGET_MATCHES}",
            str(result["largest_ok"]),
            _met(result["largest_ok"] >= TARGET_MATCHES),
        )
    )
    best = _best_step(result)
    if best:
        summary.append(
            (
                f"server CPU per delivered frame{label}",
                f"<= {TARGET_US_PER_FRAME} us",
                f"{best['cpu_us_per_frame']:.1f} us (M={best['matches']})",
                _met(best["cpu_us_per_frame"] <= TARGET_US_PER_FRAME),
            )
        )
    return lines


def _ratio(
    ours: dict[str, Any] | None, coly: dict[str, Any], label: str, key: str, out: dict[str, Any]
) -> list[str] | None:
    """asobi / Colyseus ratios for one capacity run (also stored in `out[key]`)."""
    if not ours or not ours.get("steps") or not coly.get("steps"):
        return None
    a, c = _common_step(ours, coly)
    cpu_ratio = a["cpu_us_per_frame"] / c["cpu_us_per_frame"]
    m_ratio = ours["largest_ok"] / coly["largest_ok"] if coly["largest_ok"] else None
    median = _median_ratio(ours, coly)
    out[key] = {
        "cpu_per_update": cpu_ratio,
        "cpu_per_update_median": median[0] if median else None,
        "largest_m": m_ratio,
    }
    rows = [
        f"| CPU per delivered state update{label} (M={a['matches']} vs M={c['matches']}) "
        f"| {cpu_ratio:.2f} |"
    ]
    if median:
        rows.append(
            f"| CPU per delivered state update{label}, median over the steps both held "
            f"(M={median[1]}-{median[2]}) | {median[0]:.2f} |"
        )
    rows.append(f"| largest M at p99 <= 10 ms{label} | {_f(m_ratio, 2)} |")
    return rows


def _mode(reload_run: dict[str, Any]) -> str:
    return "shared" if reload_run.get("shared") else "per-player"


def _met(ok: bool) -> str:
    return "yes" if ok else "**no**"


def healthy(out: dict[str, Any]) -> bool:
    """The harness worked (targets may still be missed): steps measured, reloads observed (an
    overloaded server may miss the per-save wait: reported, not fatal), and no tick skipped or
    repeated across reloads."""
    asobi = out.get("asobi")
    if asobi is not None and not asobi.get("steps"):
        return False
    for r in out.get("reload") or []:
        if r["timed_out"] == r["saves"] or r["skipped"] or r["repeated"]:
            return False
    return True

"""`python -m bench.side_by_side REV [--game per|shared|field] [--matches M] [--windows N]`:
one change measured against the commit before it, on the same machine at the same time.

This machine's speed moves by 10-15% within an hour, more than most single changes save, so two
runs one after the other cannot tell a change from the weather.  Here two servers run at once,
both pinned to the server core under the same load from this one load generator: `REV` (checked
out into a temporary git worktree) and this checkout.  Each window measures both servers' CPU per
delivered frame over the same seconds; a change is real when its server is lower in (nearly)
every window.  Swap the two (`--swap`) to see that the slots themselves are even.

Both servers share one core, so keep M well under half of what one core holds (the defaults do).

What a change to wake-ups or to how many matches a pass runs saves depends on the load: a lot
at light load, where the loop's wake-ups are a large share of the work, nothing once passes are
large anyway (phase groups: -14% at 150 matches, +4% at 300; docs/performance-history.md).  Two
servers at once cannot go past half a core's worth each; `--alternate` can: both servers carry
their matches, but only one runs at a time (the other is stopped with SIGSTOP), each window
measures one and then the other after a settling pause, and the windows still alternate within
the same minutes, so the machine's drift cancels as before.  It also leaves out what two
servers on one core do to each other (their passes interleave).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from bench import field_game, procs
from bench import game as bench_game
from bench.loadgen import Tally
from bench.targets import AsobiTarget

HERE = Path(__file__).resolve().parent.parent
DEFAULT_MATCHES = {"per": 150, "shared": 150, "field": 8}
# `--alternate`: seconds a server runs after it is resumed before its window starts (it first
# skips the ticks it missed while stopped, and its clients drain what was waiting).
SETTLE_S = 2.0


async def measure(
    sources: list[tuple[str, Path]],
    game: str,
    matches: int,
    windows: int,
    seconds: float,
    per_tick: bool = False,
    this_env: dict[str, str] | None = None,
    alternate: bool = False,
    this_python: str | None = None,
) -> dict[str, list[float]]:
    """Each server's CPU per delivered frame in each window, in us; `per_tick`: per match-tick
    it should have run instead (for a variant that sends fewer frames, or none); `this_env`:
    more environment for this checkout's server only (a setting measured against its default);
    `alternate`: one server running at a time (see the module's docstring); `this_python`: the
    interpreter this checkout's server runs on (one Python release against another)."""
    server_core, load_core = procs.cores()
    if load_core:
        os.sched_setaffinity(0, load_core)
    work = Path(tempfile.mkdtemp(prefix="asobi-side-by-side-"))
    targets = []
    try:
        for name, source in sources:
            target = AsobiTarget(
                work / name,
                server_core,
                Tally(),
                shared=game == "shared",
                field=game == "field",
                source=source,
                env=this_env if name == "this" else None,
                python=this_python if name == "this" else None,
            )
            targets.append(target)
            target.start()
        for target in targets:
            await target.add_matches(matches)
        await asyncio.sleep(3)  # past the matches' first ticks
        per_frame: dict[str, list[float]] = {name: [] for name, _ in sources}
        rate = field_game.TICK_RATE if game == "field" else bench_game.TICK_RATE
        for window in range(windows):
            if alternate:
                before, after = [], []
                for target in targets:
                    _run_only(target, targets)
                    await asyncio.sleep(SETTLE_S)
                    before.append(_reading(target))
                    await asyncio.sleep(seconds)
                    after.append(_reading(target))
                _run_only(None, targets)
            else:
                before = [_reading(t) for t in targets]
                await asyncio.sleep(seconds)
                after = [_reading(t) for t in targets]
            row = []
            for (name, _), (c0, f0), (c1, f1) in zip(sources, before, after, strict=True):
                units = matches * rate * seconds if per_tick else max(1, f1 - f0)
                us = (c1 - c0) / units * 1e6
                per_frame[name].append(us)
                row.append(f"{name} {us:6.1f}")
            unit = "match-tick" if per_tick else "frame"
            print(f"  window {window + 1}: " + "  ".join(row) + f" us per {unit}", flush=True)
        return per_frame
    finally:
        _run_only(None, targets)
        for target in targets:
            target.stop()
        shutil.rmtree(work, ignore_errors=True)


def _reading(target: AsobiTarget) -> tuple[float, int]:
    """The server's CPU seconds so far and the frames its clients have received."""
    assert target.server is not None
    return target.server.cpu(), target.tally.counters()[0]


def _run_only(running: AsobiTarget | None, targets: list[AsobiTarget]) -> None:
    """Resume `running` and stop every other server (None: resume them all)."""
    for target in targets:
        if target.server is not None:
            stop = running is not None and target is not running
            with contextlib.suppress(ProcessLookupError):
                os.kill(target.server.pid, signal.SIGSTOP if stop else signal.SIGCONT)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("rev", help="the commit to compare this checkout with (e.g. HEAD~1)")
    parser.add_argument("--game", choices=("per", "shared", "field"), default="per")
    parser.add_argument("--matches", type=int, help="matches per server")
    parser.add_argument("--windows", type=int, default=6)
    parser.add_argument("--seconds", type=float, default=8.0, help="length of a window")
    parser.add_argument("--swap", action="store_true", help="this checkout in the first slot")
    parser.add_argument(
        "--per-tick",
        action="store_true",
        help="CPU per match-tick instead of per delivered frame (a variant that sends fewer)",
    )
    parser.add_argument(
        "--alternate",
        action="store_true",
        help="one server running at a time, for changes to wake-ups or pass sizes",
    )
    parser.add_argument(
        "--this-env",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="set KEY=VALUE for this checkout's server only (REV may be HEAD: a setting alone)",
    )
    parser.add_argument(
        "--this-python",
        metavar="EXE",
        help="run this checkout's server on another interpreter (a venv's python with asobi's"
        " dependencies; REV may be HEAD: the interpreter alone)",
    )
    args = parser.parse_args()
    this_env = dict(item.split("=", 1) for item in args.this_env)
    matches = args.matches or DEFAULT_MATCHES[args.game]
    worktree = Path(tempfile.mkdtemp(prefix="asobi-rev-"))
    subprocess.run(
        ["git", "-C", str(HERE), "worktree", "add", "--detach", "-f", str(worktree), args.rev],
        check=True,
        capture_output=True,
    )
    try:
        procs.build_extensions(worktree)
        if args.this_python:
            procs.build_extensions(HERE, args.this_python)
        sources = [(args.rev, worktree), ("this", HERE)]
        if args.swap:
            sources.reverse()
        mode = ", one at a time" if args.alternate else ""
        print(
            f"{args.game}, {matches} matches per server{mode}, {args.windows} x {args.seconds:g} s"
        )
        per_frame = asyncio.run(
            measure(
                sources,
                args.game,
                matches,
                args.windows,
                args.seconds,
                args.per_tick,
                this_env,
                args.alternate,
                args.this_python,
            )
        )
    finally:
        subprocess.run(
            ["git", "-C", str(HERE), "worktree", "remove", "--force", str(worktree)],
            capture_output=True,
        )
    base, this = per_frame[args.rev], per_frame["this"]
    lower = sum(t < b for b, t in zip(base, this, strict=True))
    print()
    unit = "match-tick" if args.per_tick else "delivered frame"
    print(f"| server | min | median | max | us of server CPU per {unit} |")
    print("|---|---:|---:|---:|---|")
    for name, values in ((args.rev, base), ("this checkout", this)):
        print(
            f"| {name} | {min(values):.1f} | {statistics.median(values):.1f} "
            f"| {max(values):.1f} | |"
        )
    change = statistics.median(this) / statistics.median(base) - 1
    print(f"\nmedian change {change * 100:+.1f}%; this checkout lower in {lower} of {len(base)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

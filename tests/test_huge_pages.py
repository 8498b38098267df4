"""`asobi serve` starts again with glibc's huge-page tunable (`asobi.huge_pages`): when it does,
when it leaves the environment alone, and a real server process running with it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from asobi import huge_pages
from asobi.huge_pages import ENV, STARTED_AGAIN, environment_to_start_again
from tests.test_first_hour_cli import Serve, _game

LINUX = {"platform": "linux", "glibc": (2, 36), "offered": True}


def test_a_plain_environment_gets_the_tunable_and_the_mark() -> None:
    env = environment_to_start_again({"PATH": "/bin"}, **LINUX)  # type: ignore[arg-type]
    assert env == {"PATH": "/bin", ENV: "glibc.malloc.hugetlb=1", STARTED_AGAIN: "1"}


def test_other_tunables_are_kept() -> None:
    env = environment_to_start_again({ENV: "glibc.malloc.arena_max=2"}, **LINUX)  # type: ignore[arg-type]
    assert env is not None
    assert env[ENV] == "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"


@pytest.mark.parametrize(
    ("environ", "where"),
    [
        ({ENV: "glibc.malloc.hugetlb=0"}, LINUX),  # the deployment chose
        ({STARTED_AGAIN: "1"}, LINUX),  # already started again, whatever glibc kept
        ({}, {**LINUX, "platform": "darwin"}),
        ({}, {**LINUX, "glibc": (2, 34)}),  # the tunable does not exist there
        ({}, {**LINUX, "offered": False}),  # transparent huge pages: never
    ],
)
def test_no_start_again_where_it_cannot_help_or_was_decided(
    environ: dict[str, str], where: dict[str, object]
) -> None:
    assert environment_to_start_again(environ, **where) is None  # type: ignore[arg-type]


def test_in_use_reads_the_tunable_among_others() -> None:
    assert huge_pages.in_use({ENV: "glibc.malloc.hugetlb=1"})
    assert huge_pages.in_use({ENV: "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=2"})
    assert not huge_pages.in_use({ENV: "glibc.malloc.hugetlb=0"})
    assert not huge_pages.in_use({ENV: "glibc.malloc.arena_max=2"})
    assert not huge_pages.in_use({})


def test_the_kernel_setting_is_read_from_its_brackets(tmp_path: Path) -> None:
    setting = tmp_path / "enabled"
    for text, offered in [
        ("always [madvise] never\n", True),
        ("[always] madvise never\n", True),
        ("always madvise [never]\n", False),
    ]:
        setting.write_text(text)
        assert huge_pages.kernel_offers_huge_pages(setting) is offered
    assert huge_pages.kernel_offers_huge_pages(tmp_path / "missing") is False


def _environ(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(item.decode().partition("=")[::2] for item in raw if item)


needs_huge_pages = pytest.mark.skipif(
    environment_to_start_again({}) is None,
    reason="not Linux with glibc >= 2.35 and transparent huge pages offered",
)


@needs_huge_pages
def test_a_served_game_runs_with_malloc_on_huge_pages(tmp_path: Path) -> None:
    server = Serve(_game(tmp_path))
    try:
        environ = _environ(server.proc.pid)  # the same process id, started again
        assert "glibc.malloc.hugetlb=1" in environ[ENV]
        assert environ[STARTED_AGAIN] == "1"
    finally:
        out = server.stop()
    started = [json.loads(line) for line in out.splitlines() if "server_started" in line]
    assert [event["huge_pages"] for event in started] == [True]


@needs_huge_pages
def test_asobi_huge_pages_0_leaves_the_process_as_it_was_started(tmp_path: Path) -> None:
    server = Serve(_game(tmp_path), env={"ASOBI_HUGE_PAGES": "0"})
    try:
        environ = _environ(server.proc.pid)
        assert ENV not in environ and STARTED_AGAIN not in environ
    finally:
        out = server.stop()
    started = [json.loads(line) for line in out.splitlines() if "server_started" in line]
    assert [event["huge_pages"] for event in started] == [False]

"""The shipped container files and CLI agree with the package (no Docker engine needed)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent


def test_compose_serves_the_example_game() -> None:
    compose = yaml.safe_load((ROOT / "compose.yaml").read_text())
    service = compose["services"]["asobi"]
    assert service["build"] == "."
    assert service["ports"] == ["${ASOBI_PORT:-8080}:${ASOBI_PORT:-8080}"]
    assert service["environment"]["ASOBI_PORT"] == "${ASOBI_PORT:-8080}"
    assert service["restart"] == "unless-stopped"
    game_mounts = [v for v in service["volumes"] if v.startswith("./game:")]
    assert game_mounts == ["./game:/game"]
    assert service["environment"]["ASOBI_GAME_DIR"] == "/game"
    assert (ROOT / "game" / "match.lua").is_file()


def test_compose_gives_shutdown_time_to_save_pending_writes() -> None:
    """The runtime's SIGKILL must come well after the server has cut its connections (and then
    written out the store)."""
    from asobi.config import Settings

    service = yaml.safe_load((ROOT / "compose.yaml").read_text())["services"]["asobi"]
    grace = service["stop_grace_period"]
    assert grace.endswith("s")
    assert float(grace[:-1]) >= 2 * Settings().shutdown_timeout_s


def test_dockerfile_runs_the_package_as_non_root() -> None:
    lines = [ln.strip() for ln in (ROOT / "Dockerfile").read_text().splitlines()]
    assert lines[0].startswith("# ") or lines[0].startswith("FROM")
    assert any(ln.startswith("FROM python:3.1") and ln.endswith("-slim") for ln in lines)
    assert any(ln.startswith("USER ") and ln != "USER root" for ln in lines)
    assert 'CMD ["asobi", "serve"]' in lines
    copied = [ln.split()[1] for ln in lines if ln.startswith("COPY") and "--chown" not in ln]
    copied += [ln.split()[2] for ln in lines if ln.startswith("COPY --chown")]
    for path in copied:
        assert (ROOT / path).exists(), path


def test_cli_check_passes_on_the_shipped_game() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "asobi", "check", "--game-dir", str(ROOT / "game")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "match.lua" in result.stdout


def test_cli_check_reports_syntax_errors(tmp_path: Path) -> None:
    (tmp_path / "match.lua").write_text("function tick(state\n")
    (tmp_path / "ok.lua").write_text("return {}\n")
    result = subprocess.run(
        [sys.executable, "-m", "asobi", "check", "--game-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    assert "error match.lua" in result.stdout
    assert "ok    ok.lua" in result.stdout


def test_cli_token_is_accepted_by_the_server_secret(tmp_path: Path) -> None:
    from asobi.auth import TokenSigner, load_or_create_secret

    secret = load_or_create_secret(tmp_path, None)  # the server's start-up made it
    result = subprocess.run(
        [sys.executable, "-m", "asobi", "token", "alice", "--data-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
        env={"PATH": "/usr/bin:/bin"},
    )
    assert result.returncode == 0, result.stderr
    token = result.stdout.strip()
    assert TokenSigner(secret).verify(token) == "alice"


def _healthchecks() -> dict[str, list[str]]:
    """The health check commands of the Dockerfile and of compose, as argv lists."""
    dockerfile = (ROOT / "Dockerfile").read_text()
    cmd = dockerfile.split("HEALTHCHECK", 1)[1].split("CMD", 1)[1].splitlines()[0].strip()
    code = cmd.split('python -c "', 1)[1].rsplit('"', 1)[0]
    test = yaml.safe_load((ROOT / "compose.yaml").read_text())["services"]["asobi"]["healthcheck"]
    assert test["test"][:3] == ["CMD", "python", "-c"]
    return {"Dockerfile": ["python", "-c", code], "compose": test["test"][1:]}


@pytest.mark.parametrize("where", ["Dockerfile", "compose"])
def test_healthcheck_follows_asobi_port(where: str, tmp_path: Path) -> None:
    """Run the shipped health check against a real server on a port that is not 8080."""
    argv = _healthchecks()[where]
    argv[0] = sys.executable
    game = tmp_path / "game"
    game.mkdir()
    (game / "match.lua").write_text((ROOT / "game" / "match.lua").read_text())
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT), "ASOBI_SECRET": "s" * 40}
    server = subprocess.Popen(
        [sys.executable, "-m", "asobi", "serve", "--host", "127.0.0.1", "--port", "0"],
        cwd=tmp_path,
        env={**env, "ASOBI_GAME_DIR": str(game)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert server.stderr is not None
        port = server.stderr.readline().split(":")[2].split("/")[0]
        assert port != "8080"
        ok = subprocess.run(argv, env={"ASOBI_PORT": port}, capture_output=True, timeout=30)
        assert ok.returncode == 0, ok.stderr
        wrong = subprocess.run(argv, env={"ASOBI_PORT": "9"}, capture_output=True, timeout=30)
        assert wrong.returncode != 0
    finally:
        server.terminate()
        server.wait(timeout=20)


def test_dockerignore_keeps_secrets_and_local_state_out_of_the_image() -> None:
    patterns = {
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    for excluded in (".venv", "data", ".git", "bench/results", "**/__pycache__"):
        assert excluded in patterns, excluded
    # What the Dockerfile copies must not be excluded.
    for needed in ("pyproject.toml", "README.md", "asobi", "game"):
        assert needed not in patterns


def test_postgres_driver_is_an_extra() -> None:
    """A single node on SQLite installs no PostgreSQL driver; the test extra keeps it (the suite
    also runs against PostgreSQL)."""
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert not [d for d in project["dependencies"] if d.startswith("asyncpg")]
    for extra in ("postgres", "test"):
        assert [d for d in project["optional-dependencies"][extra] if d.startswith("asyncpg")]


# `asobi serve` in a Python where asyncpg cannot be imported (as after `pip install asobi`).
WITHOUT_ASYNCPG = (
    "import sys; sys.modules['asyncpg'] = None; from asobi.cli import main; "
    "raise SystemExit(main(['serve', '--port', '0']))"
)


def test_postgres_url_without_the_extra_is_one_clear_line(tmp_path: Path) -> None:
    (tmp_path / "game").mkdir()
    (tmp_path / "game" / "match.lua").write_text("function tick(state) return state end\n")
    result = subprocess.run(
        [sys.executable, "-c", WITHOUT_ASYNCPG],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        env={
            "PATH": "/usr/bin:/bin",
            "ASOBI_DATABASE_URL": "postgresql://nobody@127.0.0.1:1/none",
            "ASOBI_GAME_DIR": str(tmp_path / "game"),
            "ASOBI_DATA_DIR": str(tmp_path / "data"),
        },
    )
    assert result.returncode == 1, result.stdout + result.stderr
    assert result.stderr.splitlines() == [
        "asobi: ASOBI_DATABASE_URL names a PostgreSQL database, which needs the 'postgres' "
        "extra: pip install 'asobi[postgres]'"
    ]


def test_compose_cluster_profile_runs_nodes_that_can_reach_each_other() -> None:
    """`docker compose --profile cluster up`: Redis, PostgreSQL and nodes that share the secret,
    the database and Redis, each announcing the URL of its own published port; plain
    `docker compose up` still starts only the single node."""
    services = yaml.safe_load((ROOT / "compose.yaml").read_text())["services"]
    assert "profiles" not in services["asobi"]
    nodes = {name: s for name, s in services.items() if name.startswith("node")}
    assert len(nodes) >= 2
    for name in ("redis", "postgres", *nodes):
        assert services[name]["profiles"] == ["cluster"]
    envs = [s["environment"] for s in nodes.values()]
    for key in ("ASOBI_SECRET", "ASOBI_DATABASE_URL", "ASOBI_REDIS_URL"):
        assert len({env[key] for env in envs}) == 1, key
    assert envs[0]["ASOBI_DATABASE_URL"].startswith("postgresql://")
    assert envs[0]["ASOBI_REDIS_URL"].startswith("redis://redis:")
    assert len({env["ASOBI_NODE_ID"] for env in envs}) == len(nodes)
    for service in nodes.values():
        env = service["environment"]
        published = service["ports"][0].split(":")
        assert published == [env["ASOBI_PORT"], env["ASOBI_PORT"]]
        assert env["ASOBI_PUBLIC_URL"].endswith(f":{env['ASOBI_PORT']}/ws")
        assert service["build"]["args"]["ASOBI_EXTRAS"] == "cluster"

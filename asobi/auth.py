"""Player tokens: HS256 JWTs signed with the server secret (PyJWT does the cryptography).

The secret comes from `ASOBI_SECRET`; without it the server generates one and keeps it in the data
dir, so that `asobi token`, the server and its restarts all agree.
"""

from __future__ import annotations

import os
import secrets
import time
import uuid
from pathlib import Path

import jwt
import structlog

from asobi import names

log = structlog.get_logger("asobi.auth")

ALGORITHM = "HS256"
ISSUER = "asobi"
SECRET_FILE = "secret.key"


class InvalidToken(Exception):
    """The token is malformed, forged, expired or names no valid player."""


class SecretNotFound(Exception):
    """Neither ASOBI_SECRET nor a stored secret: the message says where it was looked for."""


def find_secret(data_dir: Path, configured: str | None) -> str:
    """The secret the server would use, without ever creating one (`asobi token`): a new secret
    would sign tokens that the running server rejects."""
    if configured:
        return configured
    path = data_dir / SECRET_FILE
    if path.is_file():
        return path.read_text().strip()
    raise SecretNotFound(
        f"no secret: ASOBI_SECRET is not set and {path.resolve()} does not exist. "
        "Run this from the directory the server runs in, or point --data-dir/ASOBI_DATA_DIR "
        "at the server's data dir, or set ASOBI_SECRET to the server's secret"
    )


def load_or_create_secret(data_dir: Path, configured: str | None) -> str:
    """The configured secret, else the one stored under `data_dir`, else a new stored one."""
    try:
        return find_secret(data_dir, configured)
    except SecretNotFound:
        pass
    path = data_dir / SECRET_FILE
    data_dir.mkdir(parents=True, exist_ok=True)
    secret = secrets.token_urlsafe(48)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(secret + "\n")
    log.warning(
        "secret_generated",
        path=str(path),
        hint="set ASOBI_SECRET in production so every instance signs alike",
    )
    return secret


class TokenSigner:
    def __init__(self, secret: str, ttl_s: int = 7 * 24 * 3600) -> None:
        self._secret = secret
        self.ttl_s = ttl_s

    def issue(self, player_id: str, ttl_s: int | None = None) -> str:
        if not names.PLAYER_ID.accepts(player_id):
            raise ValueError(f"player id must match {names.PLAYER_ID}")
        now = int(time.time())
        claims = {"sub": player_id, "iat": now, "exp": now + (ttl_s or self.ttl_s), "iss": ISSUER}
        return jwt.encode(claims, self._secret, algorithm=ALGORITHM)

    def verify(self, token: str) -> str:
        try:
            claims = jwt.decode(
                token,
                self._secret,
                algorithms=[ALGORITHM],
                issuer=ISSUER,
                options={"require": ["sub", "exp"]},
            )
        except jwt.PyJWTError as exc:
            # Plain words, never the library's own message: it names its internals.
            raise InvalidToken(_token_problem(exc)) from None
        player_id = claims.get("sub")
        if not names.PLAYER_ID.accepts(player_id):
            raise InvalidToken("token names no valid player")
        return player_id

    def guest(self) -> tuple[str, str]:
        player_id = "guest-" + uuid.uuid4().hex[:16]
        return player_id, self.issue(player_id)


def _token_problem(exc: jwt.PyJWTError) -> str:
    if isinstance(exc, jwt.ExpiredSignatureError):
        return "token has expired: get a new one (auth.guest, auth.login or asobi token)"
    if isinstance(exc, jwt.InvalidSignatureError):
        return (
            "signature does not match this server's secret: the token was signed with another "
            "secret (asobi token run with another data dir or ASOBI_SECRET?)"
        )
    if isinstance(exc, jwt.DecodeError):
        return "token is malformed: send the token string from auth.token or asobi token"
    if isinstance(exc, jwt.InvalidAlgorithmError):
        return "token is not signed the way this server signs tokens"
    return "token was not issued by this server (missing or wrong claims)"

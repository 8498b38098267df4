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


def load_or_create_secret(data_dir: Path, configured: str | None) -> str:
    """The configured secret, else the one stored under `data_dir`, else a new stored one."""
    if configured:
        return configured
    path = data_dir / SECRET_FILE
    if path.exists():
        return path.read_text().strip()
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
        except jwt.ExpiredSignatureError:
            raise InvalidToken("token has expired") from None
        except jwt.PyJWTError as exc:
            raise InvalidToken(f"token is not valid: {exc}") from None
        player_id = claims.get("sub")
        if not names.PLAYER_ID.accepts(player_id):
            raise InvalidToken("token names no valid player")
        return player_id

    def guest(self) -> tuple[str, str]:
        player_id = "guest-" + uuid.uuid4().hex[:16]
        return player_id, self.issue(player_id)

"""Username/password accounts: validation, argon2 hashing off the event loop, lookups.

Hashing is slow by design (tens of MiB and ~100 ms per hash), so it runs on a small thread pool
(argon2-cffi releases the GIL) and the number of hashes waiting is capped: past the cap new
requests are refused as rate limited instead of queueing without bound.  A login for an unknown
username still verifies against a dummy hash, so response time does not reveal which names exist.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import structlog
from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

from asobi import names
from asobi.store import Store
from asobi.store.errors import BackendUnavailable

log = structlog.get_logger("asobi.accounts")

PASSWORD_MIN = 8
PASSWORD_MAX = 128


class AccountError(Exception):
    """A refusal with a stable kind: invalid_input, taken, credentials, busy, unavailable."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message


def validate(username: Any, password: Any) -> tuple[str, str]:
    if not names.USERNAME.accepts(username):
        raise AccountError("invalid_input", "username must be 3-32 characters of A-Z a-z 0-9 _ -")
    if not isinstance(password, str) or not PASSWORD_MIN <= len(password) <= PASSWORD_MAX:
        raise AccountError(
            "invalid_input", f"password must be {PASSWORD_MIN}-{PASSWORD_MAX} characters"
        )
    return username, password


class Accounts:
    def __init__(
        self,
        store: Store,
        hasher: PasswordHasher | None = None,
        *,
        workers: int | None = None,
        max_waiting: int = 16,
    ) -> None:
        self.store = store
        self.hasher = hasher or PasswordHasher()
        # Hashing is CPU-bound by design: leave a core for the event loop that runs the matches.
        workers = workers or max(1, (os.cpu_count() or 2) - 1)
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="asobi-hash")
        self._waiting = 0
        self.max_waiting = max_waiting
        self._dummy: str | None = None

    async def _hashing(self, fn: Any, *args: Any) -> Any:
        if self._waiting >= self.max_waiting:
            raise AccountError("busy", "too many sign-ins in progress; try again shortly")
        self._waiting += 1
        try:
            return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)
        finally:
            self._waiting -= 1

    async def register(self, username: Any, password: Any) -> str:
        """Create an account; returns its new player id."""
        username, password = validate(username, password)
        password_hash = await self._hashing(self.hasher.hash, password)
        player_id = "p-" + uuid.uuid4().hex
        try:
            created = await self.store.create_account(player_id, username, password_hash)
        except BackendUnavailable as exc:
            raise AccountError("unavailable", "accounts are unavailable right now") from exc
        if not created:
            raise AccountError("taken", f"username {username!r} is taken")
        log.info("account_registered", player_id=player_id, username=username)
        return player_id

    async def login(self, username: Any, password: Any) -> str:
        """The player id of the account, if the password matches."""
        try:
            username, password = validate(username, password)
        except AccountError:
            raise AccountError("credentials", "wrong username or password") from None
        try:
            found = await self.store.find_account(username)
        except BackendUnavailable as exc:
            raise AccountError("unavailable", "accounts are unavailable right now") from exc
        if found is None:
            await self._hashing(self._verify_dummy, password)
            raise AccountError("credentials", "wrong username or password")
        player_id, password_hash = found
        if not await self._hashing(self._verify, password_hash, password):
            log.info("login_failed", player_id=player_id)
            raise AccountError("credentials", "wrong username or password")
        if self.hasher.check_needs_rehash(password_hash):
            new_hash = await self._hashing(self.hasher.hash, password)
            # If this fails the old hash keeps working and the next login tries again.
            with contextlib.suppress(BackendUnavailable):
                await self.store.update_hash(player_id, new_hash)
        return player_id

    def _verify(self, password_hash: str, password: str) -> bool:
        try:
            return bool(self.hasher.verify(password_hash, password))
        except (VerificationError, InvalidHashError):
            return False

    def _verify_dummy(self, password: str) -> bool:
        if self._dummy is None:
            self._dummy = self.hasher.hash("not a real password")
        return self._verify(self._dummy, password)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

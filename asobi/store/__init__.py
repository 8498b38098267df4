"""Persistence: accounts, economy, leaderboards and key-value storage.

`Store` keeps an in-memory view of what running matches need (resident player wallets and
storage, all leaderboards, global storage) and persists changes write-behind through one ordered
stream to a `Backend` (SQLite by default, PostgreSQL through `ASOBI_DATABASE_URL`).  Lua callbacks
work against that view synchronously through a `UnitOfWork`, which the engine commits or discards
with the callback.  See docs/persistence.md for the guarantees.
"""

from asobi.store.errors import StoreError
from asobi.store.store import Store, UnitOfWork, open_backend

__all__ = ["Store", "StoreError", "UnitOfWork", "open_backend"]

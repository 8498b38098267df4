"""Optional dependencies: what a single node does not need is an extra, asked for by a setting.

`pip install asobi` is enough for one server on SQLite.  A setting that needs more (a PostgreSQL
URL today) checks for its driver when the server starts, so a missing one is a one-line
message naming the extra to install, not an ImportError deep in a traceback.
"""

from __future__ import annotations

import importlib


class MissingExtra(Exception):
    """A setting asks for an optional dependency that is not installed."""


def require(module: str, extra: str, wanted_by: str) -> None:
    """Import `module` or explain which extra brings it (`wanted_by` says which setting asks)."""
    try:
        importlib.import_module(module)
    except ImportError:
        raise MissingExtra(
            f"{wanted_by}, which needs the {extra!r} extra: pip install 'asobi[{extra}]'"
        ) from None

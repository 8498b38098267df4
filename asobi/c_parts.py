"""Whether this process uses asobi's C parts: `asobi/lua/_native.c` (state frames' JSON and
snapshots written inside each Lua state, `asobi.lua.native`), `asobi/_merge_patch.c` (the
patch diff, `asobi.merge_patch`) and `asobi/_send.c` (the sends at the end of a tick pass,
`asobi.server_writes`).

`ASOBI_NATIVE` is a yes/no setting, read as `asobi.config.Settings` reads its flags (1, true,
yes, on), default yes.  It is read from the environment here rather than from `Settings`: the
choice is made where those parts are first used, which a reload's probe, the bench and the tests
reach without any `Settings`.  Without the C parts the same work is done in Python and Lua, with
the same results.
"""

from __future__ import annotations

import os


def wanted() -> bool:
    return os.environ.get("ASOBI_NATIVE", "1").strip().lower() in ("1", "true", "yes", "on")

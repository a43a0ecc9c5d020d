"""What every format's checks share: turning problems into one refusal, and relative paths
that must stay inside a folder."""
from __future__ import annotations

import os
import re

from ..errors import UnsafeModelError


def refuse(path: str, problems: list[str]) -> None:
    """Raise UnsafeModelError listing ``problems`` (at most a handful, then a count)."""
    if not problems:
        return
    shown = "; ".join(problems[:6]) + (f"; and {len(problems) - 6} more" if len(problems) > 6 else "")
    raise UnsafeModelError(f"refusing to load {path}: {shown}. Pass --trust-model only if you trust its source")


def inside(relative: str) -> bool:
    """A relative path that stays inside its base directory (no '..' escape, not absolute)."""
    parts = relative.replace("\\", "/").split("/")
    return bool(relative) and not os.path.isabs(relative) and not re.match(r"^[A-Za-z]:", relative) and ".." not in parts


def cut(value) -> str:
    """A value from a hostile file, shortened for a message."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."

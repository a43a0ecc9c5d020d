"""``python -m jacli.backends.onnx.rules --markdown``: the operator table of docs/onnx.md;
``--write PATH`` replaces it in that file; ``--json``: the rows of ``jacli ops --json``."""
from __future__ import annotations

import json
import sys
from pathlib import Path

from . import catalog


def replace_table(text: str, table: str) -> str:
    begin, end = text.index(catalog.MARK_BEGIN), text.index(catalog.MARK_END) + len(catalog.MARK_END)
    return text[:begin] + table + text[end:]


def main(argv: list[str]) -> int:
    if argv[:1] == ["--json"]:
        print(json.dumps(catalog.rows(), indent=1))
    elif argv[:1] == ["--markdown"]:
        print(catalog.markdown())
    elif argv[:1] == ["--write"] and len(argv) == 2:
        path = Path(argv[1])
        path.write_text(replace_table(path.read_text(), catalog.markdown()))
    else:
        print(__doc__, file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

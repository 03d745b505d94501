"""Where benchmark scripts put their results: a markdown table and the raw rows as JSON."""

from __future__ import annotations

import json
import os
from pathlib import Path


def write_report(stem: str, text: str, rows: object = None) -> Path:
    """Prints `text`, then writes $OUT/<stem>.md and, given `rows`, $OUT/<stem>.json (OUT
    defaults to the current folder, as on the device machine's $OUT). Returns the folder."""
    print(text)
    out = Path(os.environ.get("OUT", "."))
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.md").write_text(text.rstrip("\n") + "\n")
    if rows is not None:
        (out / f"{stem}.json").write_text(json.dumps(rows, indent=1))
    return out

"""Write a file so that a killed run never leaves half of it under the real name."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable


def write_atomic(path: Path, content: str | Callable[[Path], object]) -> None:
    """Write `content` (a text, or a function that writes the file it is given:
    a checkpoint, a table) under a temporary name, then rename it to `path`."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    if isinstance(content, str):
        tmp.write_text(content)
    else:
        content(tmp)
    os.replace(tmp, path)

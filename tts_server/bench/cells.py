"""Results saved per scenario cell as each one finishes, so a stopped run resumes where it
stopped: a cell already on disk for the same settings is read back, not run again."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any


class CellStore:
    """`root`/cells/<cell>.json, and `root`/run.json naming the settings they were measured
    with. Other settings than the saved ones start the run afresh (old cells moved aside)."""

    def __init__(self, root: Path, settings: dict[str, Any], *, fresh: bool = False) -> None:
        self.root = root
        self.dir = root / "cells"
        self.resumed = 0
        marker = root / "run.json"
        previous = _read(marker)
        if self.dir.exists() and (fresh or previous is None or previous != settings):
            stale = root / "cells.previous"
            shutil.rmtree(stale, ignore_errors=True)
            self.dir.rename(stale)
        self.dir.mkdir(parents=True, exist_ok=True)
        _write(marker, settings)
        self.resumed = len(list(self.dir.glob("*.json")))

    @staticmethod
    def saved_settings(root: Path) -> Any:
        """The settings the cells in `root` were measured with (None: none saved)."""
        return _read(root / "run.json")

    def _path(self, cell: str) -> Path:
        return self.dir / (cell.replace("/", "__") + ".json")

    def get(self, cell: str) -> dict[str, Any] | None:
        data = _read(self._path(cell))
        return data if isinstance(data, dict) else None

    def put(self, cell: str, result: dict[str, Any]) -> None:
        _write(self._path(cell), {"cell": cell, **result})

    def all(self) -> dict[str, dict[str, Any]]:
        cells = {}
        for path in sorted(self.dir.glob("*.json")):
            data = _read(path)
            if data is not None and "cell" in data:
                cells[data["cell"]] = data
        return cells


def _read(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None  # absent, or cut short by a kill mid-write: measured again


def _write(path: Path, data: Any) -> None:
    # Whole or not at all: a run killed mid-write must not leave half a cell to resume from.
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, path)

"""The run manifest: which steps of a run are finished and what they produced, so a re-run resumes.

``<run>/manifest.json`` is rewritten atomically after every step. A step's outputs are written before the step is
marked done, so a crash between the two only costs redoing that one step.
"""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path
from typing import Any


def round_step(rnd: int, step: str) -> str:
    """A step of adaptation round ``rnd``: its key in the manifest and its folder (``round_step(2, "pix2pix")`` ->
    ``"round2/pix2pix"``). The pipeline names its steps with it, and tools that read a run folder find them by it."""
    return f"round{rnd}/{step}"


def step_rounds(steps: dict[str, Any], step: str) -> list[int]:
    """The rounds in a manifest's ``steps`` that hold ``step`` (finished or not), newest first."""
    found = (re.fullmatch(r"round(\d+)/" + re.escape(step), key) for key in steps)
    return sorted((int(m.group(1)) for m in found if m), reverse=True)


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """Write JSON atomically (temporary name, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str))
    os.replace(tmp, path)


class Manifest:
    """Finished steps of one run folder."""

    def __init__(self, run_dir: str | os.PathLike):
        self.path = Path(run_dir) / "manifest.json"
        self.data: dict[str, Any] = {"steps": {}}
        if self.path.exists():
            try:
                self.data = json.loads(self.path.read_text())
            except json.JSONDecodeError as exc:
                raise ValueError(
                    f"run manifest {self.path} is corrupt ({exc.msg}); move it away to start over"
                ) from None

    def done(self, step: str) -> bool:
        return self.data["steps"].get(step, {}).get("status") == "done"

    def outputs(self, step: str) -> dict[str, Any]:
        return self.data["steps"][step]["outputs"]

    def mark_done(self, step: str, outputs: dict[str, Any], seconds: float) -> None:
        self.data["steps"][step] = {
            "status": "done",
            "outputs": outputs,
            "seconds": round(seconds, 2),
            "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }
        write_json(self.path, self.data)

    def set(self, key: str, value: Any) -> None:
        self.data[key] = value
        write_json(self.path, self.data)

    def get(self, key: str, default: Any = None) -> Any:
        return self.data.get(key, default)

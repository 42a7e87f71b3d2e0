"""What a person sees while a run trains: one line per step, one live bar per training stage, nothing of Ray's.

Training workers send progress events (dicts) to the driver (``train.driver.progress_to``):

    {"stage": "pix2pix", "kind": "epoch", "epoch": 3, "epochs": 50, "metrics": {"loss_G": 1.2, ...}, "eta_s": 95.0}

``kind`` is ``epoch``, ``resumed`` (from a checkpoint of ``epoch``), ``complete`` (nothing left to train) or
``end`` (sent by the driver when the stage's Ray Train run returns). :class:`StageBars` draws them.
"""

from __future__ import annotations

import sys
from typing import Any, TextIO


def format_eta(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


def _metrics(event: dict[str, Any]) -> str:
    shown = " ".join(f"{k}={v:.4g}" for k, v in (event.get("metrics") or {}).items())
    eta = event.get("eta_s")
    return f"{shown} ETA {format_eta(eta)}" if eta is not None else shown


def progress_line(event: dict[str, Any]) -> str:
    """One event as the line a log file (or a terminal that is not a TTY) gets."""
    stage, kind = event["stage"], event.get("kind")
    if kind == "resumed":
        return f"[{stage}] resumed from the checkpoint of epoch {event['epoch']}"
    if kind == "complete":
        return f"[{stage}] already complete ({event['epochs']} epochs)"
    return f"[{stage}] epoch {event['epoch']}/{event['epochs']} {_metrics(event)}".rstrip()


class StageBars:
    """Progress events -> one tqdm bar per training stage on a TTY; one line per event elsewhere (a pipe, a
    log file, a notebook cell captured to text).

    Args:
        file: where to draw (default stderr, so that ``--json`` output on stdout stays clean).
        bars: force bars (True) or lines (False); None: bars when ``file`` is a TTY.
    """

    BAR_FORMAT = "{desc} {n_fmt}/{total_fmt} epochs |{bar}| {elapsed} {postfix}"

    def __init__(self, file: TextIO | None = None, bars: bool | None = None):
        self._file, self._bars = file, bars
        self._bar, self._stage = None, None

    @property
    def file(self) -> TextIO:
        return self._file or sys.stderr  # at call time: a quiet run points sys.stderr at the terminal

    def __call__(self, event: dict[str, Any]) -> None:
        kind = event.get("kind")
        if kind == "end":
            self.close()
            return
        bars = self._bars
        if bars is None:
            bars = bool(getattr(self.file, "isatty", lambda: False)())
        if not bars:
            print(progress_line(event), file=self.file, flush=True)
            return
        from tqdm import tqdm

        if self._bar is None or self._stage != event["stage"]:
            self.close()
            self._stage = event["stage"]
            self._bar = tqdm(
                total=event["epochs"],
                desc=f"   {event['stage']}",
                file=self.file,
                bar_format=self.BAR_FORMAT,
                dynamic_ncols=True,
            )
        self._bar.n = event["epochs"] if kind == "complete" else event.get("epoch", 0)
        self._bar.set_postfix_str(_metrics(event), refresh=False)
        self._bar.refresh()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        self._bar, self._stage = None, None

"""One prepared GPU run that measures everything in ten minutes: writes gpu_suite.json and gpu_suite.md.

    python bench/gpu_suite.py --prep-data ../shared/data          # once, here: copy the frames into bench/_gpu_data
    bench/gpu_suite.sh "$OUT"                                       # on the GPU machine: set-up + this suite
    python bench/gpu_suite.py --smoke-test --out /tmp/gpu-smoke     # on a CPU in about a minute (CI runs it)

Sections, each under its own deadline (a section that runs out is recorded "skipped: out of time", rows measured
before it are kept, and the suite goes on); the report is rewritten after every section:

1. train: Ray Train vs plain PyTorch, same networks and batch, 512 px, bf16 + channels_last; a torch.compile row.
2. data: batch segmentation through Ray Data (``tgan segment``'s code path) vs a plain loop, 512 and 2048 px.
3. paper: the paper preset end to end on a real stack (``--data``), scored as bench/real_quality.py scores it,
   with wall time per step; epochs cut to fit (said in the output).
4. serve: p50/p99 of one 1024 px frame including the particle table, then a short bounded load test.
5. tests: the ``gpu``-marked tests (pytest -m gpu), pass/fail.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_TRAIN_ENABLE_V2_MIGRATION_WARNINGS", "0")
sys.path.insert(0, str(Path(__file__).resolve().parent))  # the other bench scripts, imported as modules

import gpu_checks  # noqa: E402
import gpu_sections as gs  # noqa: E402

SECTIONS = {  # name: (title, function, default seconds)
    "train": ("Training throughput: Ray Train vs plain PyTorch", gs.section_train, 150),
    "data": ("Batch segmentation: Ray Data vs a plain loop", gs.section_data, 75),
    "paper": ("The paper preset end to end on a real stack", gs.section_paper, 190),
    "serve": ("Ray Serve: one frame, then a bounded load test", gpu_checks.section_serve, 60),
    "tests": ("Correctness: the gpu-marked tests", gpu_checks.section_tests, 50),
}
GPU_BUDGET_S = 570.0  # ten minutes, less the device call's own margin
SMOKE_SLACK = 4.0
MIN_SECTION_S = 10.0  # less than this left: the section is not started
DEFAULT_DATA = gs.ROOT / "bench" / "_gpu_data"


class SectionTimeout(BaseException):
    """Raised in the main thread by SIGALRM at a section's deadline (BaseException: no `except Exception` eats it)."""


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--out", type=Path, default=Path("runs/gpu_suite"), help="Report folder (gpu_suite.json/.md)."
    )
    p.add_argument("--work", type=Path, default=None, help="Scratch folder (default: a new temporary one).")
    p.add_argument(
        "--data",
        type=Path,
        default=None,
        help=f"Prepared real frames (default: {DEFAULT_DATA.relative_to(gs.ROOT)}).",
    )
    p.add_argument(
        "--prep-data",
        type=Path,
        default=None,
        metavar="SHARED",
        help="Copy --stack from SHARED (e.g. ../shared/data) into --data, then exit.",
    )
    p.add_argument(
        "--stack", choices=["PtW", "tem-sintering"], default="PtW", help="Real stack of section 3."
    )
    p.add_argument(
        "--budget",
        type=float,
        default=None,
        help=f"Wall-time budget of the whole run, set-up included, s (default {GPU_BUDGET_S:g}; --smoke-test: "
        f"{SMOKE_SLACK:g}x that, and each section's deadline too: a crowded CPU is slow, not broken).",
    )
    p.add_argument(
        "--setup-seconds", type=float, default=0.0, help="Set-up time already spent (gpu-wheels install), s."
    )
    p.add_argument(
        "--sections",
        default=",".join(SECTIONS),
        help=f"Comma-separated sections to run ({', '.join(SECTIONS)}).",
    )
    p.add_argument(
        "--section-seconds",
        default="",
        help="Per-section deadlines, e.g. train=120,paper=240 (defaults: "
        + ", ".join(f"{k}={v[2]}" for k, v in SECTIONS.items())
        + ").",
    )
    p.add_argument(
        "--smoke-test",
        action="store_true",
        help="Tiny sizes on a CPU in a minute or two: checks every section runs.",
    )
    g = p.add_argument_group("section sizes (GPU run; --smoke-test replaces them with toy sizes)")
    g.add_argument("--size", type=int, default=512, help="Training image / segmentation tile side, px.")
    g.add_argument("--train-steps", type=int, default=15, help="Steps in each timed training epoch.")
    g.add_argument(
        "--train-batch", default="segmenter=32,pix2pix=16,cyclegan=8", help="Batch size per stage."
    )
    g.add_argument(
        "--compile-stages", default="segmenter", help="Stages given a torch.compile row ('' for none)."
    )
    g.add_argument("--seg-frames", default="512:512,2048:32", help="Frame side:count pairs segmented.")
    g.add_argument("--seg-batch", type=int, default=32, help="Tiles per model call in segmentation.")
    g.add_argument("--paper-preset", default="paper", help="Config preset of section 3.")
    g.add_argument(
        "--paper-train-seconds",
        type=float,
        default=110.0,
        help="Training time the paper epochs are cut to, s.",
    )
    g.add_argument(
        "--paper-set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="Config override of section 3, after the epoch cut (repeatable), e.g. prior.n_masks=500.",
    )
    g.add_argument(
        "--box-iou", type=float, default=0.3, help="Box IoU that counts as a detection (boxes reference)."
    )
    g.add_argument("--serve-size", type=int, default=1024, help="Frame side sent to Serve, px.")
    g.add_argument(
        "--serve-single", type=int, default=50, help="Requests sent one at a time (p50/p99 of one frame)."
    )
    g.add_argument("--serve-requests", type=int, default=400, help="Requests of the load test (at most).")
    g.add_argument("--serve-concurrency", type=int, default=16, help="Concurrent clients of the load test.")
    g.add_argument(
        "--serve-seconds",
        type=float,
        default=20.0,
        help="Each Serve test stops starting requests after this, s.",
    )
    args = p.parse_args(argv)
    wanted = [s for s in args.sections.split(",") if s]
    if unknown := sorted(set(wanted) - set(SECTIONS)):
        p.error(f"--sections: unknown {unknown}; choose from {list(SECTIONS)}")
    args.sections = wanted
    slack = SMOKE_SLACK if args.smoke_test else 1.0
    args.budget = args.budget if args.budget is not None else GPU_BUDGET_S * slack
    try:
        args.section_seconds = {
            k: float(v) for k, v in (kv.split("=") for kv in args.section_seconds.split(",") if kv)
        }
    except ValueError:
        p.error(f"--section-seconds {args.section_seconds!r}: use name=seconds,name=seconds")
    if unknown := sorted(set(args.section_seconds) - set(SECTIONS)):
        p.error(f"--section-seconds: unknown {unknown}; choose from {list(SECTIONS)}")
    if bad := [kv for kv in args.paper_set if "=" not in kv]:
        p.error(f"--paper-set {bad[0]!r}: use key=value, e.g. prior.n_masks=500")
    if args.data is not None and args.prep_data is None and not args.data.is_dir():
        p.error(f"--data {args.data}: no such folder (prepare it with --prep-data ../shared/data)")
    return args


def prep_data(shared: Path, dest: Path, stack: str) -> list[Path]:
    """Copy the frames (and references) of ``stack`` from the shared data folder into ``dest``, same layout."""
    import shutil

    import real_quality as rq

    if stack == "tem-sintering":
        s = rq.tem_sintering_stack(shared / "tem-sintering")
        src_root = shared / "tem-sintering"
    else:
        s = next(x for x in rq.stem_catalyst_stacks(shared / "stem-catalysts") if x.name == stack)
        src_root = shared / "stem-catalysts"
    files = [*s.frames, *s.truth.values()]
    if not files or (missing := [f for f in files if not f.exists()]):
        sys.exit(f"error: --prep-data {shared}: {stack} frames not found ({(missing or [src_root])[0]})")
    copied = []
    for f in files:
        target = dest / src_root.name / f.relative_to(src_root)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(f, target)
        copied.append(target)
    return copied


def describe_machine(cuda: bool) -> dict:
    import ray
    import torch

    name = torch.cuda.get_device_name() if cuda else f"CPU only ({os.cpu_count()} cores)"
    return {
        "device": name,
        "cuda": cuda,
        "torch": torch.__version__,
        "ray": ray.__version__,
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "host": platform.node(),
    }


_timed_out = False  # set by the alarm: an exception that follows it (Ray can wrap it) is the deadline's


def _alarm(signum, frame):
    global _timed_out
    _timed_out = True
    raise SectionTimeout()


def _cleanup_ray() -> None:
    """After a section stopped mid-way: end Serve and Ray so that no trainer or actor holds the device."""
    try:
        import ray
        from ray import serve

        if ray.is_initialized():
            try:
                serve.shutdown()
            finally:
                ray.shutdown()
    except Exception:  # noqa: BLE001 - cleanup must not end the suite
        pass


def run_section(
    name: str,
    title: str,
    fn,
    ctx: gs.Context,
    seconds: float,
    suite_deadline: float,
    min_seconds: float = MIN_SECTION_S,
) -> dict:
    """Run one section under its deadline (the sooner of its own and the suite's) and return its record."""
    global _timed_out
    rec = {"title": title, "status": "running", "budget_s": seconds, "rows": [], "notes": [], "columns": []}
    start = time.monotonic()
    allotted = min(seconds, suite_deadline - start)
    _timed_out = False
    if allotted < min_seconds:
        rec.update(status="skipped: out of time", seconds=0.0, budget_s=round(max(allotted, 0), 1))
        return rec
    rec["budget_s"] = round(allotted, 1)
    ctx.section_deadline = start + allotted
    previous = signal.signal(signal.SIGALRM, _alarm)
    signal.setitimer(signal.ITIMER_REAL, allotted)
    error = None
    try:
        fn(ctx, rec)
    except SectionTimeout:
        error = "timeout"
    except Exception as exc:  # noqa: BLE001 - a broken section is recorded, the suite goes on
        # the deadline can reach us wrapped (Ray turns it into a SystemError) or as pytest's timeout
        error = "timeout" if _timed_out or isinstance(exc, subprocess.TimeoutExpired) else exc
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)  # disarmed before any clean-up
        signal.signal(signal.SIGALRM, previous)
    if error is None:
        rec["status"] = "ok"
    elif error == "timeout":
        rec["status"] = "skipped: out of time"
        rec["notes"].append(f"stopped at its {allotted:.0f} s deadline; rows measured before it are kept")
        _cleanup_ray()
    else:
        text = str(error).splitlines()[0] if str(error) else ""
        rec["status"] = f"failed: {type(error).__name__}: {text}"[:300]
        rec["traceback"] = "".join(traceback.format_exception(error))[-3000:]
        _cleanup_ray()
    rec["seconds"] = round(time.monotonic() - start, 1)
    return rec


def _fmt(v) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:,.0f}" if abs(v) >= 100 else f"{v:.1f}" if abs(v) >= 10 else f"{v:.3g}"
    return str(v)


def to_markdown(report: dict) -> str:
    m = report["machine"]
    lines = [
        f"## GPU suite: {m['device']}",
        "",
        f"torch {m['torch']}, Ray {m['ray']}, Python {m['python']}, {m['cpus']} CPUs; {report['started']}; "
        f"{'SMOKE TEST (toy sizes, not figures); ' if report['smoke_test'] else ''}"
        f"{report['total_seconds']:.0f} s in all of a {report['budget_s']:.0f} s budget "
        f"(set-up {report['setup_seconds']:.0f} s).",
    ]
    for name, rec in report["sections"].items():
        lines += [
            "",
            f"### {rec['title']} (`{name}`)",
            "",
            f"status: {rec['status']}; {rec.get('seconds', 0):.0f} s of {rec['budget_s']:.0f} s",
        ]
        setup = {k: v for k, v in rec.get("setup", {}).items() if v is not None and not isinstance(v, dict)}
        if setup:
            lines.append("; ".join(f"{k}: {v}" for k, v in setup.items()))
        lines += [f"- {n}" for n in rec["notes"]]
        if rec["columns"] and rec["rows"]:
            keys = [k for k, _ in rec["columns"]]
            lines += ["", "| " + " | ".join(h for _, h in rec["columns"]) + " |", "|" + "---|" * len(keys)]
            lines += ["| " + " | ".join(_fmt(row.get(k)) for k in keys) + " |" for row in rec["rows"]]
    return "\n".join(lines) + "\n"


def write_report(report: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / ".gpu_suite.json.tmp"
    tmp.write_text(json.dumps(report, indent=2, default=str))
    tmp.replace(out / "gpu_suite.json")
    (out / "gpu_suite.md").write_text(to_markdown(report))


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.prep_data is not None:
        dest = args.data or DEFAULT_DATA
        copied = prep_data(args.prep_data, dest, args.stack)
        print(f"copied {len(copied)} files of {args.stack} into {dest}")
        return 0
    t0 = time.monotonic()
    suite_deadline = t0 + args.budget - args.setup_seconds
    import tempfile

    import torch

    cuda = torch.cuda.is_available()
    if not cuda and not args.smoke_test:
        print("error: no CUDA device here; use --smoke-test on a CPU", file=sys.stderr)
        return 2
    # the smoke test takes real frames only when --data names them; otherwise a tiny synthetic stack
    data = args.data or (DEFAULT_DATA if DEFAULT_DATA.is_dir() and not args.smoke_test else None)
    if data is None and not args.smoke_test and "paper" in args.sections:
        print(
            f"error: no --data and no {DEFAULT_DATA}: run --prep-data ../shared/data first", file=sys.stderr
        )
        return 2
    scratch = tempfile.TemporaryDirectory(prefix="gpu-suite-") if args.work is None else None
    work = args.work or Path(scratch.name)
    ctx = gs.Context(args, args.smoke_test, cuda, work, args.out, data)
    report = {
        "machine": describe_machine(cuda),
        "started": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "smoke_test": args.smoke_test,
        "budget_s": args.budget,
        "setup_seconds": args.setup_seconds,
        "total_seconds": args.setup_seconds,
        "sections": {},
    }
    try:
        for name, (title, fn, seconds) in SECTIONS.items():
            if name not in args.sections:
                continue
            print(f"== {name}: {title}", flush=True)
            seconds = args.section_seconds.get(name, seconds * (SMOKE_SLACK if args.smoke_test else 1.0))
            rec = run_section(name, title, fn, ctx, seconds, suite_deadline)
            report["sections"][name] = rec
            report["total_seconds"] = time.monotonic() - t0 + args.setup_seconds
            write_report(report, args.out)
            print(f"== {name}: {rec['status']} ({rec['seconds']:.0f} s)", flush=True)
    finally:
        _cleanup_ray()
        if scratch is not None:
            scratch.cleanup()
    print(to_markdown(report))
    return (
        0
        if all(r["status"] == "ok" or r["status"].startswith("skipped") for r in report["sections"].values())
        else 1
    )


if __name__ == "__main__":
    sys.exit(main())

"""Sections 4 and 5 of ``bench/gpu_suite.py``: Serve latency and a bounded load test (``serve_load``'s functions),
then the ``gpu``-marked tests. Each is a function ``(ctx, rec)`` that fills its record as it goes."""

from __future__ import annotations

import asyncio
import xml.etree.ElementTree as ET
from pathlib import Path

from gpu_sections import ROOT, SERVE_P50_GOAL_MS, Context, _quiet_ray

# ---------------------------------------------------------------------------------- 4. Serve


def section_serve(ctx: Context, rec: dict) -> None:
    import httpx
    import serve_load as sl
    from ray import serve

    from tgan_ray.serve import serve_model

    a = ctx.args
    size = 128 if ctx.smoke else a.serve_size
    single, requests, concurrency = (
        (6, 12, 4) if ctx.smoke else (a.serve_single, a.serve_requests, a.serve_concurrency)
    )
    frames = sl.make_frames(2 if ctx.smoke else 4, size)
    model = ctx.shared.get("paper_model")
    source = "the paper-preset NPsSegNet of section 3"
    if model is None:
        arch = "tiny" if ctx.smoke else "paper"
        model = str(sl.build_model(arch, ctx.work))
        source = "toy NPsSegNet (64 px tiles)" if ctx.smoke else "UNet++/ResNet34 with random weights"
    rec["setup"] = {"frame_px": size, "model": source, "concurrency": concurrency}
    rec["columns"] = [
        ("test", "test"),
        ("ok", "ok"),
        ("errors", "errors"),
        ("p50", "p50 (ms)"),
        ("p99", "p99 (ms)"),
        ("rps", "requests/s"),
        ("server", "server median: inference / analysis (ms)"),
        ("goal", "goal"),
    ]
    _quiet_ray(ctx)
    cfg = sl.service_config(1, 0.5 if ctx.smoke else 2.0, float(ctx.cuda), 8, 0.005, concurrency)
    url = serve_model(model, cfg, blocking=False, name="gpu-suite")
    try:
        for frame in frames[:2]:  # first calls pay for lazy initialisation
            httpx.post(
                f"{url}/v1/segment", files={"file": ("warm.png", frame)}, timeout=120
            ).raise_for_status()
        runs = [
            (f"one {size} px frame at a time (+ particle table)", single, 1, f"p50 ≤ {SERVE_P50_GOAL_MS} ms"),
            (f"load: {concurrency} concurrent clients", requests, concurrency, ""),
        ]
        for label, n, conc, goal in runs:
            limit = max(1.0, min(a.serve_seconds, ctx.seconds_left() - 5))
            r = asyncio.run(sl.run_load(url, frames, n, conc, limit))
            med = r["server_median_ms"]
            rec["rows"].append(
                {
                    "test": label,
                    "ok": r["ok"],
                    "errors": r["errors"],
                    "p50": r["latency_ms"]["p50"],
                    "p99": r["latency_ms"]["p99"],
                    "rps": r["throughput_rps"],
                    "server": " / ".join(
                        "–" if med[k] is None else f"{med[k]:.1f}" for k in ("inference", "analysis")
                    ),
                    "goal": goal,
                    "first_errors": r["first_errors"],
                }
            )
            if r["errors"] or not r["ok"]:
                raise RuntimeError(f"{label}: {r['errors']} errors, first: {r['first_errors'][:1]}")
    finally:
        serve.shutdown()


# ---------------------------------------------------------------------------------- 5. the gpu-marked tests


def gpu_test_files() -> list[Path]:
    return [p for p in sorted((ROOT / "tests").glob("test_*.py")) if "mark.gpu" in p.read_text()]


def section_tests(ctx: Context, rec: dict) -> None:
    """pytest -m gpu in this process (torch and the project are imported already: seconds, not a minute);
    pytest-timeout is off, the section's own deadline stops it."""
    import pytest
    import ray

    ray.shutdown()  # the tests start their own Ray: leave them the GPU
    xml = ctx.out / "gpu_tests.xml"
    files = [str(p) for p in gpu_test_files()]
    if not files:
        raise RuntimeError("no test file under tests/ holds a gpu-marked test")
    opts = ["-q", "-m", "gpu", "-p", "no:cacheprovider", "-p", "no:timeout", f"--rootdir={ROOT}"]
    opts += [
        "-c",
        str(ROOT / "pyproject.toml"),
        f"--junitxml={xml}",
        "-W",
        "ignore::pytest.PytestConfigWarning",
    ]
    code = int(pytest.main(opts + files))
    rec["columns"] = [("test", "test"), ("outcome", "outcome")]
    rec["setup"] = {
        "command": "pytest " + " ".join(opts[:3] + [str(Path(f).relative_to(ROOT)) for f in files])
    }
    rec["setup"]["exit_code"] = code
    counts = {"passed": 0, "failed": 0, "skipped": 0}
    for case in ET.parse(xml).getroot().iter("testcase"):
        kind = next((c.tag for c in case if c.tag in ("failure", "error", "skipped")), "passed")
        outcome = {"failure": "failed", "error": "failed"}.get(kind, kind)
        counts[outcome] += 1
        detail = next((c.get("message", "") for c in case if c.tag == kind), "")
        name = f"{case.get('classname', '').split('.')[-1]}::{case.get('name')}"
        rec["rows"].append({"test": name, "outcome": f"{outcome}: {detail[:80]}" if detail else outcome})
    rec["counts"] = counts
    if not rec["rows"]:
        raise RuntimeError(f"no gpu-marked test ran (pytest exit {code})")
    if not ctx.cuda:
        rec["notes"].append("no CUDA device here: every gpu-marked test is skipped")
    if code != 0:
        raise RuntimeError(f"{counts['failed']} gpu-marked test(s) failed (pytest exit {code})")

"""bench/gpu_suite.py: the smoke test on a CPU writes every section to the JSON and the Markdown table, and a
section past its deadline is recorded as skipped while the suite goes on."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import gpu_suite  # noqa: E402

# The smoke run is a few minutes at most on an idle CPU; a crowded one can take many times that (slow, not broken).
pytestmark = pytest.mark.timeout(1800)


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu-suite")
    cmd = [
        sys.executable,
        "bench/gpu_suite.py",
        "--smoke-test",
        "--out",
        str(out),
        "--work",
        str(out / "work"),
    ]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=1700)
    report = json.loads((out / "gpu_suite.json").read_text())
    return proc, report, (out / "gpu_suite.md").read_text()


def test_smoke_run_passes_every_section(smoke):
    proc, report, _ = smoke
    assert list(report["sections"]) == list(gpu_suite.SECTIONS)
    for name, rec in report["sections"].items():
        assert rec["status"] == "ok", f"{name}: {rec['status']}\n{rec.get('traceback', '')}"
        assert rec["rows"], name
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert report["smoke_test"] and report["machine"]["device"]


def test_smoke_run_measures_what_each_section_names(smoke):
    _, report, _ = smoke
    s = report["sections"]
    for row in s["train"]["rows"]:
        assert row["plain_img_s"] > 0 and row.get("ray_img_s", 1) > 0, row
    assert len(s["train"]["rows"]) == 3
    # --smoke-test: the Ray Train row for NPsSegNet only (section 3 trains the GANs through Ray Train anyway)
    with_ray = [r["stage"] for r in s["train"]["rows"] if "ray_img_s" in r]
    assert len(with_ray) == 1 and with_ray[0].startswith("NPsSegNet"), with_ray
    paths = {row["path"] for row in s["data"]["rows"]}
    assert any("Ray Data" in p for p in paths) and any("plain" in p for p in paths)
    assert all(row["frames_per_s"] > 0 for row in s["data"]["rows"])
    steps = [row["what"] for row in s["paper"]["rows"]]
    for step in ("step stack", "step round1/pix2pix", "step round1/cyclegan", "step round1/segmenter"):
        assert step in steps
    scored = {row["what"]: row for row in s["paper"]["rows"] if "f1" in row}
    assert set(scored) == {"rough segmenter alone", "label-free NPsSegNet"}
    assert all(0 <= row["f1"] <= 1 for row in scored.values())
    for row in s["serve"]["rows"]:
        assert row["ok"] > 0 and row["errors"] == 0 and row["p50"] > 0
    counts = s["tests"]["counts"]
    assert counts["failed"] == 0 and counts["passed"] + counts["skipped"] == len(s["tests"]["rows"]) > 0


def test_markdown_has_a_table_per_section(smoke):
    _, report, md = smoke
    for name, rec in report["sections"].items():
        block = md.split(f"### {rec['title']} (`{name}`)")[1].split("\n### ")[0]
        header = "| " + " | ".join(h for _, h in rec["columns"]) + " |"
        assert "status: ok" in block and header in block, name
        assert block.count("\n| ") >= 1 + len(rec["rows"]), name


def _ctx(tmp_path):
    return gpu_suite.gs.Context(gpu_suite.parse_args([]), True, False, tmp_path, tmp_path, None)


def test_a_section_past_its_deadline_is_skipped_with_its_rows_kept(tmp_path):
    def slow(ctx, rec):
        rec["rows"].append({"measured": 1})
        time.sleep(5)

    rec = gpu_suite.run_section(
        "slow", "Slow", slow, _ctx(tmp_path), 0.5, time.monotonic() + 60, min_seconds=0.1
    )
    assert rec["status"] == "skipped: out of time"  # not "ok": the sleep was cut at the deadline
    assert rec["rows"] == [{"measured": 1}]


def test_no_time_left_skips_and_a_broken_section_is_a_failure(tmp_path):
    ran = []
    rec = gpu_suite.run_section(
        "late", "Late", lambda c, r: ran.append(1), _ctx(tmp_path), 60, time.monotonic()
    )
    assert rec["status"] == "skipped: out of time" and not ran

    def broken(ctx, rec):
        raise ValueError("no frames")

    rec = gpu_suite.run_section("broken", "Broken", broken, _ctx(tmp_path), 60, time.monotonic() + 60)
    assert rec["status"] == "failed: ValueError: no frames"


def test_missing_data_folder_is_a_one_line_error(tmp_path, capsys):
    with pytest.raises(SystemExit):
        gpu_suite.parse_args(["--data", str(tmp_path / "nope")])
    assert "no such folder" in capsys.readouterr().err


def test_paper_epochs_are_cut_to_the_training_budget_and_said(tmp_path):
    args = gpu_suite.parse_args(["--paper-train-seconds", "110", "--paper-set", "prior.n_masks=500"])
    ctx = gpu_suite.gs.Context(args, False, True, tmp_path, tmp_path, tmp_path)
    cfg, epochs = gpu_suite.gs.paper_config(ctx)
    assert set(epochs) == {"pix2pix", "cyclegan", "segmenter"}
    for stage, e in epochs.items():
        assert 1 <= e["run"] < e["paper"] == 150, stage
    assert cfg.pix2pix.epochs + cfg.pix2pix.epochs_decay == epochs["pix2pix"]["run"]
    assert cfg.pix2pix.epochs_decay == epochs["pix2pix"]["run"] // 3  # the paper's 2:1 split kept
    assert cfg.segmenter.epochs == epochs["segmenter"]["run"]
    assert cfg.prior.n_masks == 500 and cfg.data.image_size == 512 and not cfg.tracking.enabled


def test_prep_data_copies_the_stack_the_suite_reads(tmp_path):
    shared = gpu_suite.gs.ROOT.parent / "shared" / "data"
    if not (shared / "stem-catalysts").is_dir():
        pytest.skip("no ../shared/data here")
    copied = gpu_suite.prep_data(shared, tmp_path / "data", "PtW")
    assert len(copied) == 12  # 6 frames and their box files
    args = gpu_suite.parse_args(["--data", str(tmp_path / "data")])
    stack = gpu_suite.gs.pick_stack(
        gpu_suite.gs.Context(args, False, True, tmp_path, tmp_path, tmp_path / "data")
    )
    assert stack.name == "PtW" and len(stack.frames) == 6 and all(f.exists() for f in stack.frames)

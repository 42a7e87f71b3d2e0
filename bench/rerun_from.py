"""Re-run a finished real-quality run from one step on, with changed settings, and score it as real_quality does.

An ablation of a late step (say NPsSegNet's training) need not redo the GANs: the earlier steps' outputs are the
same files. This copies the run folder, forgets the chosen step and every step after it, stores the new config
and resumes, so steps before ``--from`` are reused and the rest run with the new settings.

    python bench/rerun_from.py --work /tmp/tgan-real-quality --stack PtW --from round1/segmenter \\
        --out /tmp/ptw-no-real --set segmenter.real_fraction=0

``--work`` is the ``--out`` of ``bench/real_quality.py``; the run is ``<work>/<stack>/run``. The new run folder
is ``<out>/<stack>/run``, beside the same rough column, so ``real_quality``'s tables read it the same way.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from real_quality import SHARED, _read_masks, score_stack, stem_catalyst_stacks, tem_sintering_stack  # noqa: E402


def forget_from(manifest: dict, step: str, old: Path, new: Path) -> list[str]:
    """Drop ``step`` and every later step (and the report's end steps); point kept outputs at the copy."""
    steps = list(manifest["steps"])
    if step not in steps:
        raise SystemExit(f"step {step!r} is not in the run; its steps: {', '.join(steps)}")
    dropped = steps[steps.index(step) :]
    kept = {k: v for k, v in manifest["steps"].items() if k not in dropped}
    text = json.dumps(kept).replace(str(old.resolve()), str(new.resolve()))
    manifest["steps"] = json.loads(text)
    manifest.pop("mlflow_run_id", None)  # a new MLflow parent run in the copy's store
    return dropped


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, required=True, help="The --out folder of bench/real_quality.py.")
    ap.add_argument("--stack", required=True, help="Stack name (a folder under --work).")
    ap.add_argument("--from", dest="step", required=True, help="First step to redo, e.g. round1/segmenter.")
    ap.add_argument("--out", type=Path, required=True, help="Where the copy goes (<out>/<stack>/run).")
    ap.add_argument("--set", action="append", default=[], help="Config override key=value (repeatable).")
    ap.add_argument("--data", type=Path, default=SHARED, help="Folder holding the shared stacks.")
    ap.add_argument("--box-iou", type=float, default=0.3, help="Box IoU that counts as a detection.")
    args = ap.parse_args()

    from tgan_ray.config import build_config, config_to_dict, parse_overrides, with_overrides
    from tgan_ray.pipeline import run_pipeline

    source = args.work / args.stack
    old_run, new_run = source / "run", args.out / args.stack / "run"
    if not (old_run / "manifest.json").is_file():
        raise SystemExit(f"no finished run in {old_run}")
    if new_run.exists():
        raise SystemExit(f"{new_run} exists; choose another --out")
    stacks = {s.name: s for s in stem_catalyst_stacks(args.data / "stem-catalysts")}
    stacks["tem-sintering"] = tem_sintering_stack(args.data / "tem-sintering")
    stack = stacks[args.stack]

    manifest = json.loads((old_run / "manifest.json").read_text())
    overrides = parse_overrides(args.set)
    cfg = with_overrides(build_config(manifest["config"], str(old_run)), overrides)
    shutil.copytree(old_run, new_run, ignore=shutil.ignore_patterns("mlflow.db", "mlartifacts", "logs"))
    dropped = forget_from(manifest, args.step, old_run, new_run)
    if "segment" in dropped:  # step 8 refuses a folder of masks made by another model: start it afresh
        for folder in ("segment", "masks"):
            shutil.rmtree(new_run / folder, ignore_errors=True)
    manifest["config"] = config_to_dict(cfg)
    (new_run / "manifest.json").write_text(json.dumps(manifest, indent=2))
    print(f"redoing {', '.join(dropped)} with {overrides}", flush=True)

    t = time.time()
    images = source / "images"
    run = run_pipeline(str(images), new_run, cfg, log=print)
    seconds = time.time() - t
    scores = score_stack(stack, _read_masks(run.run_dir / "masks", stack.truth), args.box_iou)
    rough = score_stack(stack, _read_masks(source / "rough" / "masks", stack.truth), args.box_iou)
    check = (run.summary or {}).get("self_check", {}) if isinstance(run.summary, dict) else {}
    result = {
        "stack": args.stack,
        "from": args.step,
        "overrides": overrides,
        "seconds": round(seconds, 1),
        "rough": rough,
        "label_free": scores,
        "self_check": check.get("verdict"),
        "confident_recall": (check.get("agreement") or {}).get("recall"),
    }
    (args.out / f"{args.stack}-rerun.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

"""`tgan run` end to end on a tiny synthetic stack, including a crash between steps and the resume after it.

The stack holds what a user's folder does: besides six good frames, files that cannot be read (truncated,
random bytes, zero-size, a decompression bomb) and awkward ones that can (8-bit JPEG, float TIFF, RGBA, 8x8 px,
non-square, blank).

The run folder is on S3 (moto's server over HTTP), as on a cluster with no shared volume: after the crash, the local
working copy is deleted, and the run resumes on "another machine" (another working copy) from what S3 holds alone.
"""

import json
import shutil
import uuid
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from tgan_ray.config import load_config
from tgan_ray.data.synthetic import make_stack
from tgan_ray.io import read_image, s3_client, split_s3
from tgan_ray.pipeline import Pipeline, PipelineError, check_inputs, load_pngs, run_pipeline

TINY = {
    "data.image_size": 64,
    "data.real_crops": 16,
    "data.subset1_size": 3,
    "prior.n_masks": 24,
    "pix2pix.epochs": 1,
    "pix2pix.epochs_decay": 1,
    "pix2pix.steps_per_epoch": 2,
    "pix2pix.eval_every": 2,
    "pix2pix.eval_images": 8,
    "cyclegan.epochs": 1,
    "cyclegan.epochs_decay": 0,
    "cyclegan.steps_per_epoch": 2,
    "cyclegan.eval_every": 1,
    "cyclegan.eval_images": 8,
    "segmenter.epochs": 2,
    "segmenter.steps_per_epoch": 3,
    "ray.cpus_per_worker": 0.5,
}
# Enough training that round 1's NPsSegNet finds particles (pix2pix must draw them: 40 steps, a few seconds; and
# NPsSegNet learn them: 30): a later round's step 2 starts from its masks of real frames.
LEARNS = {
    "pix2pix.epochs": 4,
    "pix2pix.epochs_decay": 0,
    "pix2pix.steps_per_epoch": 10,
    "pix2pix.eval_every": 4,
    "segmenter.epochs": 3,
    "segmenter.steps_per_epoch": 10,
    "segmenter.val_every": 3,
}


class Crash(RuntimeError):
    pass


UNREADABLE = {
    "truncated.png": "truncated",
    "random.tif": "TIFF",
    "empty.png": "empty",
    "bomb.png": "too large",
}
AWKWARD = ("eight_bit.jpg", "float.tif", "rgba.png", "tiny.png", "narrow.png", "blank.png")


def add_awkward_files(images):
    """The unreadable and the awkward files of the module docstring, beside the good frames."""
    import tifffile

    first = sorted(images.glob("*.png"))[0]
    a = (np.asarray(Image.open(first)) // 257).astype(np.uint8)  # the synthetic frames are 16-bit
    raw = first.read_bytes()
    (images / "truncated.png").write_bytes(raw[: len(raw) // 3])
    (images / "random.tif").write_bytes(np.random.default_rng(0).bytes(2000))
    (images / "empty.png").write_bytes(b"")
    Image.new("1", (14000, 14000)).save(images / "bomb.png")  # 196 Mpx in 24 kB: over PIL's bomb limit
    Image.fromarray(a).save(images / "eight_bit.jpg", quality=95)
    tifffile.imwrite(images / "float.tif", a.astype(np.float32) / 255)
    Image.fromarray(a).convert("RGBA").save(images / "rgba.png")
    Image.fromarray(a[:8, :8]).save(images / "tiny.png")
    Image.fromarray(a[:, :80]).save(images / "narrow.png")
    Image.fromarray(np.full_like(a, 90)).save(images / "blank.png")


def _objects(uri: str, cfg) -> dict[str, tuple]:
    """The S3 objects under ``uri``: relative key -> (size, last modified)."""
    bucket, key = split_s3(uri)
    pages = s3_client(cfg.storage).get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=key + "/")
    found = [
        o for p in pages for o in p.get("Contents", []) if not o["Key"].endswith("/")
    ]  # not folder markers
    return {o["Key"][len(key) + 1 :]: (o["Size"], o["LastModified"]) for o in found}


def crash(self, *args):
    raise Crash("simulated crash")


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, ray_local, s3_server):
    root = tmp_path_factory.mktemp("pipeline")
    stack = make_stack(root / "stack", n=6, modality="haadf", size=128, seed=3)
    add_awkward_files(stack / "images")
    cfg = load_config("quick", overrides={**TINY, **LEARNS, "storage.s3_endpoint_url": s3_server})
    bucket = f"tgan-{uuid.uuid4().hex[:10]}"
    s3_client(cfg.storage).create_bucket(Bucket=bucket)
    uri = f"s3://{bucket}/runs/r1"
    lines: list[str] = []

    with pytest.MonkeyPatch.context() as patch:
        # First attempt dies between steps (after the 1st generation, in CycleGAN), on machine 1.
        patch.setenv("TGAN_CACHE_DIR", str(root / "machine1"))
        patch.setattr(Pipeline, "step_cyclegan", crash)
        with pytest.raises(Crash), warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            run_pipeline(str(stack / "images"), uri, cfg, log=lines.append)
        after_crash = _objects(uri, cfg)
        shutil.rmtree(root / "machine1")
        # The same command on machine 2 (another home folder), which has nothing but S3.
        patch.undo()
        patch.setenv("TGAN_CACHE_DIR", str(root / "machine2"))
        resumed: list[str] = []
        result = run_pipeline(str(stack / "images"), uri, cfg, log=resumed.append)
    return {
        "out": result.run_dir,  # the working copy on machine 2
        "uri": uri,
        "stack": stack,
        "result": result,
        "resumed": resumed,
        "after_crash": after_crash,
        "cfg": cfg,
        "first": lines,
        "warnings": [w for w in caught if type(w.message).__name__ == "SkippedImagesWarning"],
    }


def test_a_frame_at_another_magnification_gets_its_own_working_scale(tmp_path):
    """Step 1: one frame of the stack was taken at 3x the magnification (same field, 3x the px); it alone is
    rescaled, so that the networks meet its particles at the size they learn."""
    import shutil

    common = {"modality": "haadf", "count": (25, 30)}
    stack = make_stack(tmp_path / "stack", n=4, size=128, seed=5, **common) / "images"
    zoomed = make_stack(tmp_path / "zoom", n=1, size=384, seed=6, pixel_size_nm=0.5 / 3, **common) / "images"
    shutil.copy(next(zoomed.glob("*.png")), stack / "zoomed.png")
    pipeline = Pipeline(str(stack), tmp_path / "run", load_config("quick", overrides=TINY), log=print)
    out = pipeline.step_stack()
    pipeline.tracker.end()
    scales = {f["stem"]: f["scale"] for f in out["frames"]}
    assert [s for stem, s in scales.items() if stem != "zoomed"] == [out["scale"]] * 4
    assert 0.7 / 3 < scales["zoomed"] / out["scale"] < 1.4 / 3
    work = np.load(tmp_path / "run" / "work" / "zoomed.npy")  # its working frame is at its own scale
    assert abs(work.shape[0] - 384 * scales["zoomed"]) <= 1


def test_blobs_outside_a_virtual_mask_are_left_out_without_classical_settings(tmp_path):
    """Step 7 with a rough step that left no classical settings (rough.method sam / model): the stack's own
    contrast and radii are measured, and a particle the mask lacks is marked unsure while the mask's are kept."""
    from tgan_ray.masks.pseudo import IGNORE

    stack = make_stack(tmp_path / "stack", n=4, modality="haadf", size=128, seed=4) / "images"
    pipeline = Pipeline(str(stack), tmp_path / "run", load_config("quick", overrides=TINY), log=print)
    frames = pipeline.run_step("stack", pipeline.step_stack)["frames"]
    pipeline.manifest.mark_done("round1/rough", {"folder": str(tmp_path)}, 0.0)  # no "settings"
    pipeline.tracker.end()
    from skimage.measure import label

    from tgan_ray.masks import ClassicalSegmenter

    work = pipeline.work_frame(frames[0]["stem"])
    blobs = label(ClassicalSegmenter("bright").segment(work))
    assert blobs.max() >= 2, "the synthetic frame needs two particles"
    kept = blobs == 1  # the mask holds one particle; the generator "painted" the others
    out = pipeline.unmasked_left_out(work[None], kept[None].astype(np.uint8), rnd=1)[0]
    assert (out[kept] == 1).all()
    assert (out == IGNORE).any() and (out[(blobs > 1)] == IGNORE).mean() > 0.5


def test_resume_after_crash_skips_finished_steps(finished_run):
    resumed = finished_run["resumed"]
    for step in ("stack", "round1/rough", "round1/prior", "round1/pix2pix", "round1/gen1"):
        assert f"== {step}: done earlier, skipped" in resumed
    assert "== round1/cyclegan ..." in resumed
    # Step 7 left the blobs the generators painted outside their masks out of the loss (ignore_unmasked).
    assert any("blobs painted outside their masks" in line for line in resumed), resumed
    # The training estimate comes once, before the first training step, and not again on resume.
    estimates = [line for line in finished_run["first"] if "training ~" in line]
    assert len(estimates) == 1 and "warm-up" in estimates[0], finished_run["first"]
    assert not any("training ~" in line for line in resumed)
    # What S3 held after the crash: the finished steps, the manifest naming them, and nothing half-done.
    after_crash, uri = finished_run["after_crash"], finished_run["uri"]
    assert {"manifest.json", "config.yaml", "stack.json", "round1/prior.json", "mlflow.db"} <= set(
        after_crash
    )
    assert any(k.startswith("ray/round1-pix2pix/checkpoint_") for k in after_crash)  # Ray Train wrote to S3
    gen1 = {k: v for k, v in after_crash.items() if k.startswith("round1/gen1/images/")}
    assert len(gen1) == 24  # the 1st generation, written to S3 by the Ray Data actors before the crash ...
    now = _objects(uri, finished_run["cfg"])
    assert {k: now[k] for k in gen1} == gen1  # ... kept, not made again
    assert not any(k.startswith("round1/virtual/images/") for k in after_crash)  # step 6 had not run
    assert finished_run["result"].remote == uri


def test_pix2pix_sees_what_step_2_is_unsure_of(finished_run):
    """pix2pix.unsure_input: a subset-1 input mask keeps every rough particle, and marks unsure (IGNORE) only
    pixels step 2's pseudo-label is unsure of, away from a particle's edge. Off, the masks stay binary."""
    from scipy import ndimage as ndi

    from tgan_ray.masks.pseudo import IGNORE, read_pseudo_label

    cfg = finished_run["cfg"]
    pipeline = Pipeline(str(finished_run["stack"] / "images"), finished_run["out"], cfg, log=print)
    pipeline.tracker.end()
    stack, rough = pipeline.manifest.outputs("stack"), pipeline.manifest.outputs("round1/rough")

    def masks_with(unsure_input: bool) -> list[np.ndarray]:
        pipeline.cfg = cfg.model_copy(
            update={"pix2pix": cfg.pix2pix.model_copy(update={"unsure_input": unsure_input})}
        )
        return pipeline.pix2pix_masks(stack, rough)

    masks = masks_with(True)
    assert len(masks) == len(stack["subset1"]) == cfg.data.subset1_size
    assert any((m == IGNORE).any() for m in masks), "the synthetic frames have faint particles"
    for stem, mask in zip(stack["subset1"], masks):
        rough_mask = np.asarray(Image.open(f"{rough['folder']}/{stem}.png")) > 127
        assert ((mask == 1) == rough_mask).all()
        unsure = mask == IGNORE
        assert (read_pseudo_label(f"{rough['pseudo']}/{stem}.png")[unsure] == IGNORE).all()
        assert not (unsure & ndi.binary_dilation(rough_mask)).any()
    assert all(set(np.unique(m)) <= {0, 1} for m in masks_with(False))


def test_step_7_can_leave_out_the_masked_particles_no_generation_drew(finished_run):
    """segmenter.ignore_undrawn: exactly the masked particles a chosen virtual image does not show become IGNORE
    (the rest of each mask is kept), and the log says what share of particle pixels that was."""
    from scipy.ndimage import binary_dilation
    from skimage.measure import label

    from tgan_ray.masks.consistency import undrawn_particles
    from tgan_ray.masks.pseudo import IGNORE

    lines: list[str] = []
    pipeline = Pipeline(
        str(finished_run["stack"] / "images"), finished_run["out"], finished_run["cfg"], log=lines.append
    )
    pipeline.tracker.end()
    virtual = Path(pipeline.manifest.outputs("round1/virtual")["manifest"])
    pairs = json.loads(virtual.read_text())["pairs"]
    images = load_pngs(virtual.parent, [p["image"] for p in pairs])
    masks = load_pngs(virtual.parent, [p["mask"] for p in pairs], is_mask=True)
    first = next(i for i, m in enumerate(masks) if (m == 1).any())
    one = label(masks[first] == 1) == 1
    ring = binary_dilation(one, iterations=3) & (masks[first] == 0)
    # A particle the generator left out, whatever the toy GANs drew: its pixels take its support's level.
    images[first][one] = images[first][ring].mean()
    labels = pipeline.undrawn_left_out(images, masks, 1)
    reference = pipeline.real_particle_contrast(1)
    expected = [
        undrawn_particles(i, m, reference, finished_run["cfg"].segmenter.min_drawn_contrast)
        for i, m in zip(images, masks)
    ]
    assert expected[first][one].all()
    np.testing.assert_array_equal(labels == IGNORE, np.stack(expected))
    np.testing.assert_array_equal(labels[labels != IGNORE], masks[labels != IGNORE])
    share = np.stack(expected).sum() / (masks == 1).sum()
    assert f"{share:.1%} of particle pixels left out of the loss" in lines[-1], lines


def test_every_artefact_is_written(finished_run):
    out, stack = finished_run["out"], finished_run["stack"]
    manifest = json.loads((out / "manifest.json").read_text())
    steps = manifest["steps"]
    for step in (
        "stack",
        "round1/rough",
        "round1/prior",
        "round1/pix2pix",
        "round1/gen1",
        "round1/cyclegan",
        "round1/gen2",
        "round1/virtual",
        "round1/segmenter",
        "segment",
        "selfcheck",
        "report",
    ):
        assert steps[step]["status"] == "done", step

    # Step 2: rough masks of subset 1, pseudo-labels (0 / 127 unsure / 255) of every frame but the test split.
    split = json.loads((out / "stack.json").read_text())
    pseudo = sorted(p.stem for p in (out / "round1" / "pseudo").glob("*.png"))
    assert pseudo == sorted(split["subset1"] + split["subset2"])
    assert set(np.unique(np.asarray(Image.open(out / "round1" / "pseudo" / f"{pseudo[0]}.png")))) <= {
        0,
        127,
        255,
    }
    settings = steps["round1/rough"]["outputs"]["settings"]
    assert settings["contrast"] == "bright" and settings["radii"]

    # Steps 4 and 6 ran through Ray Data's generate_dataset: two sets of 24 pairs with their Parquet manifests.
    round1 = out / "round1"
    virtual_set = pd.read_parquet(round1 / "virtual" / "manifest.parquet")
    assert virtual_set["index"].tolist() == list(range(24)) and {"image", "mask", "gen1"} <= set(virtual_set)
    assert pd.read_parquet(round1 / "gen1" / "manifest.parquet")["index"].tolist() == list(range(24))
    assert json.loads((round1 / "virtual" / "generate.json").read_text())["cyclegan_sha256"]
    assert json.loads((round1 / "gen1" / "generate.json").read_text())["cyclegan_sha256"] is None
    # Mask i is one draw from (seed, i): the prior step's file, the 1st generation's and the virtual set's agree.
    for name in ("0000000.png", "0000023.png"):
        masks = [np.asarray(Image.open(round1 / d / "masks" / name)) for d in ("virtual", "gen1")]
        assert np.array_equal(*masks)
    assert steps["round1/prior"]["outputs"]["masks"] == [f"{i:07d}.png" for i in range(24)]
    from tgan_ray.masks.prior import MorphologyPrior
    from tgan_ray.masks.sampling import sample_capped_mask_at

    prior, seed = MorphologyPrior.load(round1 / "prior.json"), steps["round1/prior"]["outputs"]["seed"]
    expected = sample_capped_mask_at(prior, 64, seed, 23, finished_run["cfg"].prior.max_empty_fraction)[0]
    assert np.array_equal(masks[1] > 127, expected)

    virtual = json.loads((round1 / "virtual" / "manifest.json").read_text())
    assert virtual["count"] == 24 and virtual["source"] in ("gen1", "gen2")
    pair = virtual["pairs"][0]
    assert pair["image"] == ("images/0000000.png" if virtual["source"] == "gen2" else "gen1/0000000.png")
    image = np.asarray(Image.open(round1 / "virtual" / pair["image"]))
    mask = np.asarray(Image.open(round1 / "virtual" / pair["mask"]))
    assert image.shape == mask.shape == (64, 64) and set(np.unique(mask)) <= {0, 255}
    empty = sum(not np.asarray(Image.open(round1 / "virtual" / p["mask"])).any() for p in virtual["pairs"])
    assert empty <= 24 * finished_run["cfg"].prior.max_empty_fraction + 2

    assert (out / "round1" / "npssegnet.pt").is_file()
    from tgan_ray.models.npssegnet import load_segmenter

    _, meta = load_segmenter(out / "round1" / "npssegnet.pt")
    assert meta["data"]["image_size"] == 64
    # A lean run folder: each finished stage keeps one Ray Train checkpoint on S3, its best model and nothing else.
    on_s3 = _objects(finished_run["uri"], finished_run["cfg"])
    for stage in ("pix2pix", "cyclegan", "segmenter"):
        kept = [k for k in on_s3 if k.startswith(f"ray/round1-{stage}/checkpoint_")]
        assert len(kept) == 1 and kept[0].endswith("/model.pt"), kept
    # The working copy holds what S3 holds but Train's checkpoints, and S3 holds every file of the working copy.
    local = {p.relative_to(out).as_posix(): p.stat().st_size for p in out.rglob("*") if p.is_file()}
    assert {k: size for k, (size, _) in on_s3.items() if not k.startswith("ray/")} == local

    # Step 8 ran through Ray Data's segment_stack: masks at <run>/masks/<stem>.png, its tables in <run>/segment.
    # The awkward files are segmented at their own size; each unreadable one is a row with its reason.
    sources = sorted(p for p in (stack / "images").iterdir() if p.name not in UNREADABLE)
    assert len(sources) == 6 + len(AWKWARD)
    for src in sources:
        m = np.asarray(Image.open(out / "masks" / f"{src.stem}.png"))
        assert m.shape == np.asarray(Image.open(src)).shape[:2] and set(np.unique(m)) <= {0, 255}, src.name
    images = pd.read_parquet(out / "segment" / "images.parquet").set_index("image")
    assert sorted(images.index) == sorted(p.stem for p in (stack / "images").iterdir())
    segmented = images.loc[[s.stem for s in sources]]
    assert (segmented["status"] == "segmented").all()
    masks_on_s3 = [f"{finished_run['uri']}/masks/{s}.png" for s in segmented.index]
    assert (segmented["mask"] == masks_on_s3).all()  # where the Ray Data actors wrote them
    for name, reason in UNREADABLE.items():
        row = images.loc[name.rsplit(".", 1)[0]]
        assert row["status"] == "error" and reason in row["reason"] and "\n" not in row["reason"], name
    assert not (out / "segment" / "masks").exists()
    # Step 1 warned once, naming every unreadable file, and learnt from neither them nor the 8 px frame.
    [warned] = finished_run["warnings"]
    assert all(name in str(warned.message) for name in UNREADABLE)
    assert sorted(s for s, _ in split["skipped"]) == sorted(str(stack / "images" / n) for n in UNREADABLE)
    assert "tiny" not in split["subset1"] + split["subset2"] + split["test"]
    assert any("too small to learn from" in line and "tiny" in line for line in finished_run["first"])

    table = pd.read_csv(out / "particles.csv")
    assert {"image", "equivalent_diameter", "circularity", "solidity", "touches_border", "unit"} <= set(table)
    assert (table["unit"] == "nm").all()  # pixel size from the stack's pixel_size.json
    summary = json.loads((out / "summary.json").read_text())
    assert summary["count"] == int((~table["touches_border"]).sum())
    # The self-check: step 2's particles, agreement with the rough segmenter on held-out frames, uncertainty.
    check = summary["self_check"]
    assert check["verdict"] in ("ok", "check") and (check["warning"] is None) == (check["verdict"] == "ok")
    assert check["frames"] == split["test"] and check["agreement"]["confident"] > 0
    assert check["support"]["share"] is None or 0 <= check["support"]["share"] <= 1
    assert check["step2"]["particles_per_frame"] > 0 and check["realism"]["source"] in ("gen1", "gen2")
    assert table["image_uncertainty"].between(0, 1).all()
    assert segmented["uncertainty"].between(0, 1).all()
    # segmenter.merge_rough: each frame names whose outlines lead, and the summary the frames the rough masks led
    assert set(segmented["lead"]) <= {"NPsSegNet", "rough"}
    assert summary["frames_led_by_rough"] == sorted(segmented.index[segmented["lead"] == "rough"])
    assert len(table) == len(pd.read_parquet(out / "segment" / "particles.parquet"))
    pd.testing.assert_frame_equal(pd.read_parquet(out / "particles.parquet"), table, check_dtype=False)
    for src in sources:  # Fiji / napari copies of the masks, calibrated from pixel_size.json
        pixel_size = json.loads((stack / "pixel_size.json").read_text())["pixel_size_nm"]
        assert read_image(out / "masks" / f"{src.stem}.tif").pixel_size_nm == pytest.approx(pixel_size)
        assert (out / "masks" / "labels" / f"{src.stem}.tif").is_file()
    assert json.loads((out / "segment" / "summary.json").read_text())["stack"]["count"] == summary["count"]
    html = (out / "report.html").read_text()
    assert "data:image/png;base64" in html and "http://" not in html and "https://" not in html
    assert "Self-check" in html and "Frames to check by eye first" in html
    assert finished_run["result"].report == out / "report.html"

    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{out / 'mlflow.db'}")
    parent = manifest["mlflow_run_id"]
    exp = client.get_run(parent).info.experiment_id
    children = client.search_runs([exp], filter_string=f"tags.mlflow.parentRunId = '{parent}'")
    assert {c.data.tags["stage"] for c in children} >= {"pix2pix", "cyclegan", "segmenter"}
    # One MLflow store across both machines; its artifacts moved with the working copy.
    assert client.get_run(parent).info.artifact_uri.startswith(out.as_uri())


def test_rerun_with_another_config_is_refused(finished_run):
    endpoint = finished_run["cfg"].storage.s3_endpoint_url
    overrides = {**TINY, **LEARNS, "segmenter.epochs": 5, "storage.s3_endpoint_url": endpoint}
    cfg = load_config("quick", overrides=overrides)
    with pytest.raises(PipelineError, match="segmenter.epochs"):
        Pipeline(str(finished_run["stack"] / "images"), finished_run["out"], cfg)
    with pytest.raises(PipelineError, match=f"run folder {finished_run['uri']} .*segmenter.epochs"):
        check_inputs(str(finished_run["stack"] / "images"), finished_run["uri"], cfg)  # read from S3


def test_a_run_from_before_an_option_existed_resumes_while_the_option_keeps_its_default():
    from tgan_ray.config import config_to_dict
    from tgan_ray.pipeline.common import check_same_config

    cfg = load_config("quick")
    older = config_to_dict(cfg)
    del older["segmenter"]["ignore_undrawn"]  # written by a version without the option
    older["segmenter"]["retired_option"] = 1  # and with one since removed, which no longer does anything
    check_same_config("r1", older, cfg)
    on = load_config("quick", overrides={"segmenter.ignore_undrawn": True})
    with pytest.raises(PipelineError, match=r"\(segmenter.ignore_undrawn\)"):
        check_same_config("r1", older, on)


def test_run_to_s3_with_a_wrong_credential_is_one_line_before_any_work(
    tmp_path, s3_bucket, monkeypatch, moto_auth
):
    from typer.testing import CliRunner

    import tgan_ray.runtime
    from tgan_ray.cli import app

    endpoint, bucket = s3_bucket
    stack = make_stack(tmp_path / "stack", n=3, modality="haadf", size=64, seed=3)
    monkeypatch.setenv("TGAN_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(tgan_ray.runtime, "init_ray", lambda *a, **k: pytest.fail("Ray work started"))
    previous = moto_auth("0")
    try:
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAWRONGWRONGWRONG0")
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "very-secret-value")
        args = [
            "run",
            "--images",
            str(stack / "images"),
            "--out",
            f"s3://{bucket}/runs/r2",
            "--preset",
            "quick",
        ]
        result = CliRunner().invoke(app, [*args, "--set", f"storage.s3_endpoint_url={endpoint}"])
    finally:
        moto_auth(previous)
    assert result.exit_code == 2
    [line] = result.output.strip().splitlines()
    assert line.startswith("error: S3 credentials rejected for s3://") and "very-secret" not in line
    assert not (tmp_path / "cache").exists()  # no working copy, no run folder


def test_too_few_images_and_no_particles_are_clear_errors(tmp_path, ray_local):
    from tgan_ray.io import StackError
    from tgan_ray.masks import NoParticlesError

    stack = make_stack(tmp_path / "small", n=3, modality="haadf", size=96, seed=1)
    cfg = load_config("quick", overrides=TINY)
    with pytest.raises((StackError, PipelineError, ValueError), match="3"):
        run_pipeline(str(stack / "images"), tmp_path / "r1", cfg, log=lambda m: None)

    blank = tmp_path / "blank"
    blank.mkdir()
    rng = np.random.default_rng(0)
    for i in range(5):
        Image.fromarray((rng.normal(120, 3, (96, 96))).clip(0, 255).astype(np.uint8)).save(
            blank / f"b{i}.png"
        )
    with pytest.raises(NoParticlesError, match="particle-contrast"):
        run_pipeline(str(blank), tmp_path / "r2", cfg, log=lambda m: None)


def test_a_later_round_starts_from_the_previous_rounds_segmenter(finished_run, tmp_path):
    """--rounds 2: round 2's step 2 is round 1's NPsSegNet on the real frames, not the classical segmenter, and
    its prior draws other random masks. The finished run has one round (a second would double the suite's
    longest fixture), so round 2's first steps run here, on a copy of it; they differ from round 1's only in
    these inputs, and the rest of the round is the same code with another folder."""
    from tgan_ray.inference import Segmenter
    from tgan_ray.masks.pseudo import pseudo_label, read_pseudo_label

    out, cfg, stack = tmp_path / "run", finished_run["cfg"], finished_run["stack"]
    shutil.copytree(finished_run["out"], out)
    pipe = Pipeline(str(stack / "images"), out, cfg, log=lambda m: None)
    pipe.tracker.end()
    split = pipe.manifest.outputs("stack")
    rough = pipe.step_rough(split, 2)

    round1 = Segmenter(out / "round1" / "npssegnet.pt", pipe.data_cfg, cfg.segmenter)
    for stem in split["subset1"]:
        work = pipe.work_frame(stem)
        got = np.asarray(Image.open(out / "round2" / "rough" / f"{stem}.png")) > 127
        np.testing.assert_array_equal(got, round1.segment_working(work))
        # Its pseudo-labels: p > 0.5 a particle, p 0.2-0.5 unsure.
        expected = pseudo_label(got, round1.probability_working(work) > 0.2)
        np.testing.assert_array_equal(read_pseudo_label(out / "round2" / "pseudo" / f"{stem}.png"), expected)
    assert rough["folder"] == str(out / "round2" / "rough") and rough["settings"] == {}
    prior2 = pipe.step_prior(split, rough, 2)
    assert prior2["seed"] != pipe.manifest.outputs("round1/prior")["seed"]
    assert (out / "round2" / "prior.json").is_file()
    # The last round's NPsSegNet makes the final masks.
    assert finished_run["result"].segmenter == finished_run["out"] / "round1" / "npssegnet.pt"
    segment_json = json.loads((finished_run["out"] / "segment" / "segment.json").read_text())
    assert segment_json["sources"]["model"].endswith("round1/npssegnet.pt")

"""``segment_stack`` on a real local Ray and a real S3 endpoint (moto's HTTP server): masks, particle table,
PSD summaries, a corrupt object, bad credentials, a missing bucket and a re-run that skips finished images."""

from __future__ import annotations

import io
import json
import time

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from tgan_ray.config import DataConfig, load_config
from tgan_ray.io import StorageError, StorageNotFoundError, s3_client
from tgan_ray.scale_out import ScaleOutError
from tgan_ray.segment import segment_stack, unique_stems
from tgan_ray.segment_actor import STATUS_ERROR, STATUS_REUSED, STATUS_SEGMENTED

N_IMAGES, SIZE = 5, 96


@pytest.fixture(scope="module")
def ray_s3(s3_server, ray_local):
    return s3_server


@pytest.fixture(scope="module")
def segmenter_path(tmp_path_factory):
    """A tiny untrained NPsSegNet: its masks are arbitrary, but real (binary, full size)."""
    import torch

    from tgan_ray.models.npssegnet import create_segmenter, save_segmenter

    torch.manual_seed(0)
    model = create_segmenter("unetplusplus", "resnet18", decoder_channels=[16, 16, 8, 8, 8])
    path = tmp_path_factory.mktemp("model") / "npssegnet.pt"
    # A working scale that is not 1, as a pipeline run records it: segment_stack must take it from here.
    meta = {"data": DataConfig(image_size=64, resize_mode="tile", scale=0.75).model_dump()}
    save_segmenter(model, path, meta=meta)
    return path


@pytest.fixture(scope="module")
def stack_dir(tmp_path_factory):
    from tgan_ray.data.synthetic import make_stack

    return make_stack(tmp_path_factory.mktemp("stack"), n=N_IMAGES, size=SIZE, seed=3) / "images"


def _cfg(**overrides):
    base = {"scale_out.cpus_per_actor": 0.5, "scale_out.batch_size": 2, "segmenter.inference_batch_size": 4}
    return load_config("quick", overrides={**base, **overrides})


def _upload_stack(stack_dir, endpoint, bucket) -> list[str]:
    client = s3_client(_cfg(**{"storage.s3_endpoint_url": endpoint}).storage)
    names = sorted(p.name for p in stack_dir.glob("*.png"))
    for name in names:
        client.put_object(Bucket=bucket, Key=f"stack/{name}", Body=(stack_dir / name).read_bytes())
    client.put_object(Bucket=bucket, Key="stack/x.png", Body=np.random.default_rng(0).bytes(500))
    return names


def _get(client, bucket, key) -> bytes:
    return client.get_object(Bucket=bucket, Key=key)["Body"].read()


def _mask_times(client, bucket) -> dict[str, object]:
    """The mask PNGs (the TIFF copies are rewritten on each run, so their calibration follows the config)."""
    objects = client.list_objects_v2(Bucket=bucket, Prefix="seg/masks/").get("Contents", [])
    return {o["Key"]: (o["LastModified"], o["ETag"]) for o in objects if o["Key"].endswith(".png")}


def test_segment_s3_stack_with_corrupt_object_then_rerun(ray_s3, s3_bucket, segmenter_path, stack_dir):
    endpoint, bucket = s3_bucket
    cfg = _cfg(**{"storage.s3_endpoint_url": endpoint})
    client = s3_client(cfg.storage)
    names = _upload_stack(stack_dir, endpoint, bucket)
    stems = [n[:-4] for n in names]
    model_uri = f"s3://{bucket}/models/npssegnet.pt"
    client.put_object(Bucket=bucket, Key="models/npssegnet.pt", Body=segmenter_path.read_bytes())

    result = segment_stack(model_uri, f"s3://{bucket}/stack/", f"s3://{bucket}/seg", cfg)
    assert (result.images, result.segmented, result.reused) == (N_IMAGES + 1, N_IMAGES, 0)
    assert [src for src, _ in result.errors] == [f"s3://{bucket}/stack/x.png"]

    for stem in stems:
        mask = np.asarray(Image.open(io.BytesIO(_get(client, bucket, f"seg/masks/{stem}.png"))))
        assert mask.shape == (SIZE, SIZE) and set(np.unique(mask)) <= {0, 255}
    assert "seg/masks/x.png" not in _mask_times(client, bucket)
    import tifffile

    for stem in stems:  # the TIFF copies beside the PNGs on S3 too; PNGs carry no pixel size, nor do they
        labels = tifffile.TiffFile(io.BytesIO(_get(client, bucket, f"seg/masks/labels/{stem}.tif")))
        assert labels.asarray().shape == (SIZE, SIZE) and "unit" not in (labels.imagej_metadata or {})

    images = pd.read_parquet(io.BytesIO(_get(client, bucket, "seg/images.parquet")))
    assert len(images) == N_IMAGES + 1
    bad = images.set_index("image").loc["x"]
    assert bad.status == STATUS_ERROR and "PNG" in bad.reason and bad["mask"] == ""
    good = images[images.status != STATUS_ERROR]
    assert sorted(good.image) == stems and (good.status == STATUS_SEGMENTED).all()
    assert (good["mask"] == [f"s3://{bucket}/seg/masks/{s}.png" for s in good.image]).all()
    assert good.pixel_size_nm.isna().all() and (good.unit == "px").all()  # PNGs carry no calibration
    assert (good.height == SIZE).all() and (good.width == SIZE).all()

    particles = pd.read_parquet(io.BytesIO(_get(client, bucket, "seg/particles.parquet")))
    assert {"image", "source", "pixel_size_nm", "equivalent_diameter", "touches_border"} <= set(
        particles.columns
    )
    assert set(particles.image) <= set(stems) and len(particles) == result.particles
    for stem, group in particles.groupby("image"):
        assert set(group.source) == {f"s3://{bucket}/stack/{stem}.png"}
    counts = (~particles.touches_border).groupby(particles.image).sum().reindex(good.image, fill_value=0)
    assert counts.tolist() == good.particle_count.tolist()

    summary = json.loads(_get(client, bucket, "seg/summary.json"))
    assert summary["images"] == {"total": N_IMAGES + 1, "segmented": N_IMAGES, "reused": 0, "errors": 1}
    assert summary["stack"]["count"] == int(good.particle_count.sum())
    assert sorted(summary["per_image"]) == stems
    assert all(
        summary["per_image"][s]["count"] == c for s, c in zip(good.image, good.particle_count, strict=True)
    )

    # Re-run after losing one mask: only that image is segmented again; the other masks are not rewritten.
    before = _mask_times(client, bucket)
    client.delete_object(Bucket=bucket, Key=f"seg/masks/{stems[0]}.png")
    time.sleep(1.1)  # S3 LastModified has a one-second resolution
    again = segment_stack(model_uri, f"s3://{bucket}/stack/", f"s3://{bucket}/seg", cfg)
    assert (again.segmented, again.reused, len(again.errors)) == (1, N_IMAGES - 1, 1)
    after = _mask_times(client, bucket)
    assert sorted(after) == sorted(before)
    changed = [k for k in after if after[k] != before[k]]
    assert changed == [f"seg/masks/{stems[0]}.png"]
    images2 = pd.read_parquet(io.BytesIO(_get(client, bucket, "seg/images.parquet")))
    status = dict(zip(images2.image, images2.status, strict=True))
    assert status[stems[0]] == STATUS_SEGMENTED and status["x"] == STATUS_ERROR
    assert all(status[s] == STATUS_REUSED for s in stems[1:])
    particles2 = pd.read_parquet(io.BytesIO(_get(client, bucket, "seg/particles.parquet")))
    assert len(particles2) == len(particles)  # same masks, same particles


def test_segment_local_stack_into_masks_dir_same_masks_as_in_process(
    ray_local, tmp_path, segmenter_path, stack_dir
):
    """The pipeline's layout (masks beside, not inside, ``out``; a stack-wide pixel size for uncalibrated PNGs),
    and the masks that segmenting each frame in-process with :class:`~tgan_ray.inference.Segmenter` gives."""
    from tgan_ray.inference import Segmenter
    from tgan_ray.io import normalize_intensity, read_image

    cfg = _cfg(**{"segmenter.merge_rough": False})
    masks_dir = tmp_path / "masks"
    result = segment_stack(
        segmenter_path, stack_dir, tmp_path / "out", cfg, masks_dir=masks_dir, fallback_pixel_size_nm=0.25
    )
    assert (result.segmented, result.errors) == (N_IMAGES, [])
    assert len(list(masks_dir.glob("*.png"))) == N_IMAGES and not (tmp_path / "out" / "masks").exists()

    # Working scale from the checkpoint (0.75), normalisation from the config, same tiles and overlap.
    segmenter, d = Segmenter(segmenter_path, None, cfg.segmenter), cfg.data
    mixed = 0
    for src in sorted(stack_dir.glob("*.png")):
        image = normalize_intensity(read_image(str(src)).data, d.norm_low_percentile, d.norm_high_percentile)
        expected = segmenter.segment(image)
        np.testing.assert_array_equal(np.asarray(Image.open(masks_dir / f"{src.stem}.png")) > 127, expected)
        mixed += 0 < expected.mean() < 1
    assert mixed  # not a trivial all-empty (or all-particle) comparison
    images = pd.read_parquet(tmp_path / "out" / "images.parquet")
    assert (images.pixel_size_nm == 0.25).all() and (images.unit == "nm").all()
    assert (images["lead"] == "NPsSegNet").all()
    particles = pd.read_parquet(tmp_path / "out" / "particles.parquet")
    assert (particles.unit == "nm").all() and (particles.pixel_size_nm == 0.25).all()
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["stack"]["unit"] in ("nm", None) and len(summary["per_image"]) == N_IMAGES
    assert not [p for p in (tmp_path / "out").rglob("*") if p.name.endswith(".tmp")]  # nothing half-written
    _check_calibrated_tiffs(masks_dir, particles, 0.25)

    # segmenter.merge_rough (the default): plus the rough segmenter's particles that touch none of the network's.
    # A checkpoint whose real particles' contrast no frame reaches: step 8 drops every particle the network marks
    # as too faint (Segmenter.drop_faint), so the masks are the rough segmenter's, plus (merge_candidates, the
    # default) its loose candidates where the network's probability passes 0.2.
    from tgan_ray.analysis.selfcheck import add_agreed_candidates
    from tgan_ray.models import load_segmenter, save_segmenter
    from tgan_ray.segment_actor import rough_segment_fn

    net, meta = load_segmenter(str(segmenter_path))
    unreachable = save_segmenter(net, tmp_path / "faint.pt", meta={**meta, "particle_contrast": 10.0})
    segment_stack(unreachable, stack_dir, tmp_path / "merged", _cfg())
    settings = json.loads((tmp_path / "merged" / "segment.json").read_text())
    assert settings["merge_candidates"] is True
    rough = rough_segment_fn(settings["merge_rough"], candidates=True)
    added = 0
    for src in sorted(stack_dir.glob("*.png")):
        image = normalize_intensity(read_image(str(src)).data, d.norm_low_percentile, d.norm_high_percentile)
        merged = np.asarray(Image.open(tmp_path / "merged" / "masks" / f"{src.stem}.png")) > 127
        [(rough_mask, candidates)] = rough([image])
        assert rough_mask.any()
        expected = add_agreed_candidates(rough_mask, candidates, segmenter.probability(image))
        np.testing.assert_array_equal(merged, expected)
        added += int((expected & ~rough_mask).any())
    assert added  # some frame gained a candidate both segmenters see
    led = pd.read_parquet(tmp_path / "merged" / "images.parquet")["lead"]
    assert (led == "rough").all()  # the network found none of the rough particles on any frame

    # A frame taken at another magnification is segmented at the scale step 1 gave it; the others as before.
    odd = sorted(stack_dir.glob("*.png"))[0]
    again = segment_stack(segmenter_path, stack_dir, tmp_path / "scaled", cfg, frame_scales={odd.stem: 0.4})
    assert again.segmented == N_IMAGES
    settings = json.loads((tmp_path / "scaled" / "segment.json").read_text())
    assert settings["frame_scales"] == {odd.stem: 0.4}
    for src in sorted(stack_dir.glob("*.png")):
        image = normalize_intensity(read_image(str(src)).data, d.norm_low_percentile, d.norm_high_percentile)
        scale = 0.4 if src == odd else None
        expected = segmenter.to_mask(segmenter.probability(image, scale), scale=scale)
        mask = np.asarray(Image.open(tmp_path / "scaled" / "masks" / f"{src.stem}.png")) > 127
        np.testing.assert_array_equal(mask, expected)
    scaled_odd = np.asarray(Image.open(tmp_path / "scaled" / "masks" / f"{odd.stem}.png"))
    assert not np.array_equal(scaled_odd, np.asarray(Image.open(masks_dir / f"{odd.stem}.png")))

    # Masks of another model must not be mixed with these: refused before any Ray work.
    import torch

    from tgan_ray.models.npssegnet import load_segmenter, save_segmenter

    other, meta = load_segmenter(segmenter_path)
    with torch.no_grad():
        next(other.parameters()).mul_(0.5)
    save_segmenter(other, tmp_path / "other.pt", meta=meta)
    with pytest.raises(ScaleOutError, match="outputs made with other settings \\(model_sha256\\)"):
        segment_stack(tmp_path / "other.pt", stack_dir, tmp_path / "out", cfg, masks_dir=masks_dir)


def _check_calibrated_tiffs(masks_dir, particles, pixel_size_nm):
    """Beside each mask PNG: the mask and its instance labels as ImageJ TIFFs calibrated in nm, whose labels
    are the particles of particles.parquet."""
    import tifffile

    for png in sorted(masks_dir.glob("*.png")):
        png_mask = np.asarray(Image.open(png)) > 127
        with tifffile.TiffFile(masks_dir / f"{png.stem}.tif") as tif:
            np.testing.assert_array_equal(tif.asarray() > 127, png_mask)
            assert tif.imagej_metadata["unit"] == "nm"
            num, den = tif.pages[0].tags["XResolution"].value
            assert num / den == pytest.approx(1 / pixel_size_nm)
        with tifffile.TiffFile(masks_dir / "labels" / f"{png.stem}.tif") as tif:
            labels = tif.asarray()
            assert labels.dtype == np.uint16 and tif.imagej_metadata["unit"] == "nm"
        np.testing.assert_array_equal(labels > 0, png_mask)
        ids = sorted(particles.loc[particles.image == png.stem, "particle_id"])
        assert ids == sorted(set(np.unique(labels)) - {0})


@pytest.fixture()
def no_ray_work(monkeypatch):
    """Fail the test if segment_stack gets as far as starting Ray work."""
    import tgan_ray.runtime

    def tripwire(*args, **kwargs):
        raise AssertionError("Ray work started before the storage check")

    monkeypatch.setattr(tgan_ray.runtime, "init_ray", tripwire)


def test_segment_bad_credentials_fail_before_ray_work(
    s3_bucket, segmenter_path, no_ray_work, monkeypatch, moto_auth
):
    endpoint, bucket = s3_bucket
    cfg = _cfg(**{"storage.s3_endpoint_url": endpoint})
    s3_client(cfg.storage).put_object(Bucket=bucket, Key="stack/a.png", Body=b"x")
    previous = moto_auth("0")
    try:
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAWRONGWRONGWRONG0")
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "very-secret-value")
        with pytest.raises(StorageError, match="credentials rejected for s3://") as err:
            segment_stack(segmenter_path, f"s3://{bucket}/stack/", f"s3://{bucket}/seg", cfg)
        assert "very-secret-value" not in str(err.value) and "AKIAWRONG" not in str(err.value)
        assert len(str(err.value).splitlines()) == 1
    finally:
        moto_auth(previous)


def test_segment_missing_bucket_fails_before_ray_work(s3_bucket, segmenter_path, no_ray_work, tmp_path):
    endpoint, bucket = s3_bucket
    cfg = _cfg(**{"storage.s3_endpoint_url": endpoint})
    with pytest.raises(StorageNotFoundError, match="S3 bucket 'no-such-bucket-here' does not exist"):
        segment_stack(segmenter_path, "s3://no-such-bucket-here/stack/", tmp_path / "out", cfg)
    with pytest.raises(StorageNotFoundError, match="S3 bucket 'no-such-output-bucket' does not exist"):
        segment_stack(segmenter_path, f"s3://{bucket}/stack/", "s3://no-such-output-bucket/seg", cfg)


def test_unique_stems_keeps_list_order():
    uris = ["s3://b/x/a.png", "s3://b/x/a.tif", "/data/b.dm4", "/other/a.png", "s3://b/x/a_.png"]
    assert list(unique_stems(uris).values()) == ["a", "a_", "b", "a__", "a___"]


def test_segment_rough_is_the_classical_segmenter_at_the_stack_scale(ray_local, stack_dir, tmp_path):
    """``tgan segment --rough``: the training-free baseline with a model's outputs, one contrast for the stack,
    each frame at the best of the stack's radii."""
    from tgan_ray.io import normalize_intensity, read_image
    from tgan_ray.masks import ClassicalSegmenter

    cfg = _cfg()
    result = segment_stack(None, stack_dir, tmp_path / "out", cfg, rough=True)
    assert (result.segmented, result.errors) == (N_IMAGES, []) and result.particles > 0
    settings = json.loads((tmp_path / "out" / "segment.json").read_text())
    assert settings["rough"]["contrast"] == "bright" and settings["rough"]["radii"]
    d, seg = cfg.data, ClassicalSegmenter(cfg.rough.particle_contrast, cfg.rough.min_particle_px)
    frames = {
        p.stem: normalize_intensity(read_image(str(p)).data, d.norm_low_percentile, d.norm_high_percentile)
        for p in sorted(stack_dir.glob("*.png"))
    }
    for stem, image in frames.items():
        expected = seg.segment(image, settings["rough"]["radii"], "bright")
        np.testing.assert_array_equal(np.asarray(Image.open(result.masks + f"/{stem}.png")) > 127, expected)
    for name in ("images.parquet", "particles.parquet", "summary.json"):
        assert (tmp_path / "out" / name).is_file()
    with pytest.raises(ScaleOutError, match="not both or neither"):
        segment_stack(None, stack_dir, tmp_path / "o2", cfg)


def test_cli_segment_needs_a_model_or_rough(tmp_path):
    from typer.testing import CliRunner

    from tgan_ray.cli import app

    result = CliRunner().invoke(app, ["segment", "--images", str(tmp_path), "--out", str(tmp_path / "o")])
    assert result.exit_code == 2 and "--model" in result.output and "--rough" in result.output


def test_actor_segments_a_batch_in_pixel_bounded_groups(segmenter_path, stack_dir, tmp_path, monkeypatch):
    # In-process (no Ray): a batch is segmented in groups of at most BATCH_PIXELS; a bad frame between good ones
    # becomes its own error row, and the grouping does not change any frame's particles.
    import tgan_ray.segment as segment
    import tgan_ray.segment_actor as segment_actor

    cfg = _cfg()
    files = sorted(stack_dir.iterdir())[:3]
    batch = {
        "bytes": np.array([f.read_bytes() for f in files[:2]] + [b"not an image"] + [files[2].read_bytes()]),
        "path": np.array([str(f) for f in files[:2]] + [str(tmp_path / "bad.png"), str(files[2])]),
    }

    def rows(masks_dir, batch_pixels):
        monkeypatch.setattr(segment_actor, "BATCH_PIXELS", batch_pixels)
        actor = segment_actor.SegmentActor(
            [segmenter_path.read_bytes()],
            segment._model_data_cfg(segmenter_path.read_bytes(), str(segmenter_path), cfg),
            cfg.segmenter,
            "cpu",
            str(masks_dir),
            None,
            None,
            {},
            set(),
        )
        batched = actor.segmenter.probabilities
        actor.segmenter.probabilities = lambda images, scales: (
            groups.append(len(images)) or batched(images, scales)
        )
        return actor(batch)

    groups: list[int] = []
    together = rows(tmp_path / "a", 10**9)
    assert groups == [3]  # the three readable frames in one pass
    groups.clear()
    one_by_one = rows(tmp_path / "b", 1)
    assert groups == [1, 1, 1]
    assert list(together["status"]) == [STATUS_SEGMENTED] * 2 + [STATUS_ERROR] + [STATUS_SEGMENTED]
    assert list(one_by_one["status"]) == list(together["status"])
    np.testing.assert_array_equal(together["particle_count"], one_by_one["particle_count"])

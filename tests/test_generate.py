"""``generate_dataset`` on a real local Ray and a real S3 endpoint (moto's HTTP server): PNG pairs and the
Parquet manifest read back, a re-run that completes lost pairs without rewriting the others, bad input."""

from __future__ import annotations

import io
import json
import time

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from tgan_ray.config import Pix2PixConfig, load_config
from tgan_ray.generate import find_run_models, generate_dataset
from tgan_ray.io import StorageError, s3_client
from tgan_ray.masks.prior import MorphologyPrior
from tgan_ray.masks.sampling import sample_capped_mask_at
from tgan_ray.scale_out import ScaleOutError

SIZE, N = 64, 12


@pytest.fixture(scope="module")
def ray_s3(s3_server, ray_local):
    """The session's Ray and the local S3 endpoint (Ray's workers got the test credentials from conftest)."""
    return s3_server


def _save_generator(path, seed: int, noise_channels: int) -> str:
    from tgan_ray.models.networks import define_generator

    torch.manual_seed(seed)
    gan_cfg = Pix2PixConfig(
        generator_encoder="resnet18",
        generator_decoder_channels=[16, 16, 8, 8, 8],
        noise_channels=noise_channels,
    )
    net = define_generator(
        gan_cfg.generator_encoder, gan_cfg.generator_decoder_channels, noise_channels=noise_channels
    )
    config = gan_cfg.model_dump(mode="json")
    torch.save({"kind": "pix2pix", "config": config, "generator": net.state_dict()}, path)
    return str(path)


@pytest.fixture(scope="module")
def artefacts(tmp_path_factory):
    """Tiny untrained pix2pix and CycleGAN generators, and a morphology prior of synthetic masks."""
    from tgan_ray.data.synthetic import make_image, synth_config

    folder = tmp_path_factory.mktemp("artefacts")
    masks = [make_image(synth_config(size=96, seed=s))[1] for s in range(3)]
    MorphologyPrior.from_masks(masks).save(folder / "prior.json")
    return {
        "prior": str(folder / "prior.json"),
        "pix2pix": _save_generator(folder / "pix2pix.pt", 0, noise_channels=1),  # as the pipeline's
        "cyclegan": _save_generator(folder / "cyclegan.pt", 1, noise_channels=0),
    }


def _cfg(**overrides):
    base = {
        "data.image_size": SIZE,
        "data.seed": 7,
        "scale_out.cpus_per_actor": 0.5,
        "scale_out.batch_size": 4,
        "scale_out.masks_per_task": 4,
    }
    return load_config("quick", overrides={**base, **overrides})


def _png(client, bucket, key) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(client.get_object(Bucket=bucket, Key=key)["Body"].read())))


def _objects(client, bucket, prefix) -> dict[str, tuple]:
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return {o["Key"]: (o["LastModified"], o["ETag"]) for p in pages for o in p.get("Contents", [])}


def test_generate_to_s3_then_complete_lost_pairs(ray_s3, s3_bucket, artefacts):
    endpoint, bucket = s3_bucket
    cfg = _cfg(**{"storage.s3_endpoint_url": endpoint})
    client = s3_client(cfg.storage)
    out = f"s3://{bucket}/gen"
    result = generate_dataset(
        artefacts["prior"], artefacts["pix2pix"], artefacts["cyclegan"], N, out, cfg, write_gen1=True
    )
    assert (result.count, result.generated, result.reused) == (N, N, 0)

    manifest = pd.read_parquet(
        io.BytesIO(client.get_object(Bucket=bucket, Key="gen/manifest.parquet")["Body"].read())
    )
    assert manifest["index"].tolist() == list(range(N)) and (manifest.seed == 7).all()
    assert manifest.image.tolist() == [f"images/{i:07d}.png" for i in range(N)]
    objects = _objects(client, bucket, "gen/")
    for row in manifest.itertuples():
        mask, image, gen1 = (_png(client, bucket, f"gen/{p}") for p in (row.mask, row.image, row.gen1))
        assert mask.shape == image.shape == gen1.shape == (SIZE, SIZE)
        assert mask.dtype == image.dtype == np.uint8 and set(np.unique(mask)) <= {0, 255}
    # each mask is the prior's sample (seed, index) under the empty-mask cap: reproducible from those alone
    prior = MorphologyPrior.load(artefacts["prior"])
    for i in range(N):
        expected = sample_capped_mask_at(prior, SIZE, 7, i, cfg.prior.max_empty_fraction)[0]
        np.testing.assert_array_equal(_png(client, bucket, f"gen/masks/{i:07d}.png") > 0, expected)
    assert not np.array_equal(
        _png(client, bucket, "gen/images/0000000.png"), _png(client, bucket, "gen/gen1/0000000.png")
    )  # CycleGAN ran

    # Lose pairs 2 (image), 5 (mask) and 9 (both); the re-run writes those three and nothing else.
    lost = [
        "gen/images/0000002.png",
        "gen/masks/0000005.png",
        "gen/images/0000009.png",
        "gen/masks/0000009.png",
    ]
    old_mask5 = _png(client, bucket, "gen/masks/0000005.png")
    old_images = {i: _png(client, bucket, f"gen/images/{i:07d}.png") for i in (2, 9)}
    for key in lost:
        client.delete_object(Bucket=bucket, Key=key)
    time.sleep(1.1)  # S3 LastModified has a one-second resolution
    again = generate_dataset(
        artefacts["prior"], artefacts["pix2pix"], artefacts["cyclegan"], N, out, cfg, write_gen1=True
    )
    assert (again.generated, again.reused) == (3, N - 3)
    after = _objects(client, bucket, "gen/")
    rewritten = {k for k in after if k in objects and after[k] != objects[k]}
    pair_files = {f"gen/{d}/{i:07d}.png" for d in ("images", "masks", "gen1") for i in (2, 5, 9)}
    assert rewritten - {"gen/manifest.parquet"} <= pair_files and set(lost) <= set(after)
    assert sorted(k for k in after if k.endswith(".png")) == sorted(k for k in objects if k.endswith(".png"))
    np.testing.assert_array_equal(_png(client, bucket, "gen/masks/0000005.png"), old_mask5)
    for i, image in old_images.items():  # pix2pix's noise comes from (seed, index) too: the same pair again,
        # within generate_dataset's promise of one grey level (bit-identical here; CPU kernels may round apart)
        again_image = _png(client, bucket, f"gen/images/{i:07d}.png").astype(int)
        assert np.abs(again_image - image).max() <= 1 and (again_image != image).mean() < 0.01
    manifest2 = pd.read_parquet(
        io.BytesIO(client.get_object(Bucket=bucket, Key="gen/manifest.parquet")["Body"].read())
    )
    assert manifest2["index"].tolist() == list(range(N))


def test_generate_local_pix2pix_only_and_settings_guard(ray_local, tmp_path, artefacts, monkeypatch):
    cfg = _cfg()
    out = tmp_path / "virtual"
    result = generate_dataset(artefacts["prior"], artefacts["pix2pix"], None, 5, out, cfg)
    assert result.generated == 5 and not (out / "gen1").exists()
    assert sorted(p.name for p in (out / "images").iterdir()) == [f"{i:07d}.png" for i in range(5)]
    manifest = pd.read_parquet(out / "manifest.parquet")
    assert manifest["index"].tolist() == list(range(5)) and "gen1" not in manifest
    assert json.loads((out / "generate.json").read_text())["cyclegan_sha256"] is None
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")]

    # Complete already: no Ray work at all (a tripwire on init_ray), the manifest is rewritten the same.
    import tgan_ray.runtime

    monkeypatch.setattr(
        tgan_ray.runtime, "init_ray", lambda *a, **k: pytest.fail("Ray work on a complete set")
    )
    assert generate_dataset(artefacts["prior"], artefacts["pix2pix"], None, 5, out, cfg).reused == 5
    with pytest.raises(ScaleOutError, match="outputs made with other settings \\(seed\\)"):
        generate_dataset(artefacts["prior"], artefacts["pix2pix"], None, 5, out, cfg, seed=99)
    # the empty-mask cap decides which masks are drawn: a changed cap may not complete this set either
    other_cap = _cfg(**{"prior.max_empty_fraction": 0.5})
    with pytest.raises(ScaleOutError, match="outputs made with other settings \\(max_empty_fraction\\)"):
        generate_dataset(artefacts["prior"], artefacts["pix2pix"], None, 5, out, other_cap)


def test_generate_bad_inputs_fail_before_ray_work(s3_bucket, artefacts, tmp_path, monkeypatch):
    import tgan_ray.runtime

    monkeypatch.setattr(tgan_ray.runtime, "init_ray", lambda *a, **k: pytest.fail("Ray work started"))
    endpoint, _ = s3_bucket
    cfg = _cfg(**{"storage.s3_endpoint_url": endpoint})
    a = artefacts
    with pytest.raises(StorageError, match="S3 bucket 'no-such-bucket-here' does not exist"):
        generate_dataset(a["prior"], a["pix2pix"], a["cyclegan"], 4, "s3://no-such-bucket-here/gen", cfg)
    with pytest.raises(ScaleOutError, match="pix2pix model not found: .*missing.pt"):
        generate_dataset(a["prior"], str(tmp_path / "missing.pt"), None, 4, tmp_path / "o1", cfg)
    with pytest.raises(ScaleOutError, match="is not a usable generator checkpoint"):
        generate_dataset(a["prior"], a["prior"], None, 4, tmp_path / "o2", cfg)
    with pytest.raises(ScaleOutError, match="morphology prior not found"):
        generate_dataset(str(tmp_path / "nope.json"), a["pix2pix"], None, 4, tmp_path / "o3", cfg)
    with pytest.raises(ScaleOutError, match="n=0"):
        generate_dataset(a["prior"], a["pix2pix"], None, 0, tmp_path / "o4", cfg)


def test_find_run_models_takes_the_last_finished_round(tmp_path):
    def step(path):
        return {"status": "done", "outputs": {"checkpoint_path": str(path)}}

    steps = {
        "round1/pix2pix": step(tmp_path / "p1"),
        "round1/cyclegan": step(tmp_path / "c1"),
        "round2/pix2pix": step(tmp_path / "p2"),
        "round2/cyclegan": step(tmp_path / "c2"),
        "round3/pix2pix": step(tmp_path / "p3"),  # round 3 has no CycleGAN yet
        "round10/pix2pix": step(tmp_path / "p10"),  # round 10's CycleGAN did not finish
        "round10/cyclegan": {"status": "running"},
    }
    (tmp_path / "manifest.json").write_text(json.dumps({"steps": steps}))
    found = find_run_models(tmp_path, _cfg())
    assert found == {
        "round": 2,
        "prior": str(tmp_path / "round2" / "prior.json"),
        "pix2pix": str(tmp_path / "p2" / "model.pt"),
        "cyclegan": str(tmp_path / "c2" / "model.pt"),
    }
    with pytest.raises(ScaleOutError, match="not a pipeline run folder"):
        find_run_models(tmp_path / "elsewhere", _cfg())


def test_find_run_models_in_an_s3_run_folder(tmp_path, s3_bucket):
    endpoint, bucket = s3_bucket
    cfg = _cfg(**{"storage.s3_endpoint_url": endpoint})
    steps = {
        f"round1/{stage}": {"status": "done", "outputs": {"checkpoint_path": f"s3://{bucket}/r/ray/{stage}"}}
        for stage in ("pix2pix", "cyclegan")
    }
    s3_client(cfg.storage).put_object(Bucket=bucket, Key="r/manifest.json", Body=json.dumps({"steps": steps}))
    assert find_run_models(f"s3://{bucket}/r/", cfg) == {
        "round": 1,
        "prior": f"s3://{bucket}/r/round1/prior.json",
        "pix2pix": f"s3://{bucket}/r/ray/pix2pix/model.pt",
        "cyclegan": f"s3://{bucket}/r/ray/cyclegan/model.pt",
    }
    with pytest.raises(ScaleOutError, match="not a pipeline run folder"):
        find_run_models(f"s3://{bucket}/elsewhere", cfg)


def test_actor_pool_that_would_starve_the_tasks_is_refused(ray_local, tmp_path, artefacts):
    """On 2 CPUs, 2 actors x 0.75 CPU leave no whole CPU for ray.data.range's read task: a job that would wait
    forever is refused with the settings to change."""
    cfg = _cfg(**{"scale_out.actors": 2, "scale_out.cpus_per_actor": 0.75})
    with pytest.raises(
        ScaleOutError, match="scale_out.actors=2 x scale_out.cpus_per_actor=0.75 leaves less than 1"
    ):
        generate_dataset(artefacts["prior"], artefacts["pix2pix"], None, 4, tmp_path / "out", cfg)

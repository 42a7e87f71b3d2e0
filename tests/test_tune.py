"""Ray Tune campaigns: validation of the search space, and a 2-trial ASHA campaign on CPU picked by KID."""

import json

import pytest

from tgan_ray.config import ConfigError, load_config
from tgan_ray.data.synthetic import make_stack
from tgan_ray.tune import run_campaign, tuned_overrides, validate_space


def test_invalid_search_space_is_rejected_before_any_trial():
    base = load_config("quick").pix2pix
    with pytest.raises(ConfigError, match="no field 'lr_gen'"):
        validate_space("pix2pix", {"lr_gen": {"choice": [1e-4]}}, base)
    with pytest.raises(ConfigError, match="discriminator='resnet'"):
        validate_space("pix2pix", {"discriminator": {"choice": ["patchgan", "resnet"]}}, base)
    with pytest.raises(ConfigError, match="positive bounds"):
        validate_space("pix2pix", {"lr_g": {"loguniform": [0, 1e-3]}}, base)
    with pytest.raises(ConfigError, match="low < high"):
        validate_space("pix2pix", {"lr_g": {"uniform": [1e-3, 1e-4]}}, base)
    with pytest.raises(ConfigError, match="batch_size=0"):
        validate_space("pix2pix", {"batch_size": {"choice": [4, 0]}}, base)
    validate_space(
        "pix2pix", {"lr_g": {"loguniform": [1e-5, 1e-3]}, "discriminator_layers": {"choice": [2, 3]}}, base
    )


def test_two_trial_asha_campaign_returns_best_checkpoint_and_logs_children(tmp_path, ray_local):
    stack = make_stack(tmp_path / "stack", n=5, modality="haadf", size=96, seed=2)
    cfg = load_config(
        "quick",
        overrides={
            "data.real_crops": 12,
            "prior.n_masks": 12,
            "pix2pix.epochs": 2,
            "pix2pix.epochs_decay": 0,
            "pix2pix.steps_per_epoch": 2,
            "pix2pix.eval_every": 1,
            "pix2pix.eval_images": 8,
            "ray.cpus_per_worker": 0.5,
        },
    )
    space = {"lr_g": {"choice": [1e-4, 5e-4]}, "lambda_l1": {"choice": [5.0, 20.0]}}
    result = run_campaign(
        "pix2pix",
        str(stack / "images"),
        cfg,
        tmp_path / "campaign",
        num_samples=2,
        scheduler="asha",
        space=space,
        log=lambda m: None,
    )
    assert len(result.trials) == 2
    scores = [t["score"] for t in result.trials]
    assert result.best_score == pytest.approx(min(scores))
    assert (tmp_path / "campaign" / "campaign.json").is_file()
    assert json.loads((tmp_path / "campaign" / "campaign.json").read_text())["stage"] == "pix2pix"
    from pathlib import Path

    assert (Path(result.checkpoint_path) / "model.pt").is_file()
    overrides = tuned_overrides(tmp_path / "campaign")
    assert overrides["pix2pix.lr_g"] in (1e-4, 5e-4) and overrides["pix2pix.lambda_l1"] in (5.0, 20.0)

    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'campaign' / 'prep' / 'mlflow.db'}")
    campaign_runs = client.search_runs(
        [e.experiment_id for e in client.search_experiments()], filter_string="tags.stage = 'pix2pix'"
    )
    parent = next(r for r in campaign_runs if r.data.tags.get("mlflow.runName", "").startswith("tune-"))
    trials = [r for r in campaign_runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(trials) == 2
    versions = client.search_model_versions("name = 'npssegnet-pix2pix-generator'")
    assert len(versions) == 1

"""The config tree: paper defaults, presets, YAML round trip, and one-line errors that name the field."""

from pathlib import Path

import pytest
import yaml

from tgan_ray.config import PRESETS, ConfigError, load_config, save_config

ROOT = Path(__file__).resolve().parents[1]


def test_paper_defaults_are_the_papers_hyperparameters():
    cfg = load_config("paper")
    assert cfg.data.image_size == 512 and cfg.data.subset1_size == 5 and cfg.data.test_fraction == 0.2
    s = cfg.segmenter
    assert (s.arch, s.encoder, s.encoder_weights) == ("unetplusplus", "resnet34", None)
    assert (s.lr, s.weight_decay, s.lr_step, s.lr_gamma, s.epochs, s.batch_size) == (
        3e-4,
        5e-4,
        5,
        0.9,
        150,
        4,
    )
    assert s.focal_alpha == 0.25
    for gan in (cfg.pix2pix, cfg.cyclegan):
        assert (gan.epochs, gan.epochs_decay, gan.batch_size, gan.lr_g, gan.beta1, gan.beta2) == (
            100,
            50,
            4,
            2e-4,
            0.5,
            0.999,
        )
        assert gan.gan_mode == "lsgan" and gan.generator_encoder_weights is None
    assert cfg.pix2pix.lambda_l1 == 10 and cfg.cyclegan.lambda_cycle == 10 and cfg.cyclegan.pool_size == 50


def test_quick_preset_is_small_and_yaml_round_trips(tmp_path):
    cfg = load_config("quick")
    assert cfg.data.image_size == 64 and cfg.segmenter.epochs <= 20
    save_config(cfg, tmp_path / "c.yaml")
    assert load_config("paper", tmp_path / "c.yaml") == cfg
    assert set(PRESETS) == {"paper", "quick", "cpu"}


def test_auto_preset_fits_the_machine():
    import torch

    assert load_config("auto") == load_config("paper" if torch.cuda.is_available() else "cpu")


def test_cpu_preset_sits_between_quick_and_paper():
    quick, cpu, paper = (load_config(p) for p in ("quick", "cpu", "paper"))
    assert quick.data.image_size < cpu.data.image_size < paper.data.image_size
    steps = [c.pix2pix.steps_per_epoch * (c.pix2pix.epochs + c.pix2pix.epochs_decay) for c in (quick, cpu)]
    assert steps[0] < steps[1]
    assert (
        cpu.segmenter.real_fraction > 0 and paper.segmenter.real_fraction == 0
    )  # the paper: virtual pairs only
    assert cpu.pix2pix.unsure_input and not paper.pix2pix.unsure_input  # the paper: binary masks


def test_file_and_dotted_overrides_win(tmp_path):
    (tmp_path / "o.yaml").write_text(yaml.safe_dump({"segmenter": {"epochs": 7}}))
    cfg = load_config("quick", tmp_path / "o.yaml", {"segmenter.lr": 0.01})
    assert cfg.segmenter.epochs == 7 and cfg.segmenter.lr == 0.01


@pytest.mark.parametrize(
    ("data", "needle"),
    [
        ({"segmenter": {"epoch": 3}}, "segmenter.epoch: unknown key"),
        ({"segmenter": {"epochs": "many"}}, "segmenter.epochs"),
        ({"nonsense": {}}, "nonsense: unknown key"),
        ({"data": {"image_size": 100}}, "multiple of 32"),
        ({"rough": {"particle_contrast": "purple"}}, "rough.particle_contrast"),
    ],
)
def test_wrong_key_or_type_is_one_line_naming_the_field(tmp_path, data, needle):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError) as err:
        load_config("paper", path)
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_missing_file_unknown_preset_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config("paper", tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="unknown preset 'fast'"):
        load_config("fast")
    (tmp_path / "x.yaml").write_text("a: [1,")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config("paper", tmp_path / "x.yaml")


def test_set_overrides_parse_as_yaml_scalars_and_a_bad_one_is_named():
    from tgan_ray.config import parse_overrides

    assert parse_overrides(["segmenter.epochs=20", "data.pixel_size_nm=0.25", "rough.method= classical"]) == {
        "segmenter.epochs": 20,
        "data.pixel_size_nm": 0.25,
        "rough.method": "classical",
    }
    assert parse_overrides(None) == {}
    for bad in ("segmenter.epochs", "=3"):
        with pytest.raises(ConfigError, match=f"--set expects KEY=VALUE, got {bad!r}"):
            parse_overrides(["data.seed=1", bad])


def test_cli_and_jobs_share_the_set_parser(tmp_path):
    """`tgan config --set` and a job's --set: the same parser, the same one-line error, exit status 2."""
    import subprocess
    import sys

    from typer.testing import CliRunner

    from tgan_ray.cli import app

    result = CliRunner().invoke(app, ["config", "--preset", "quick", "--set", "segmenter.epochs"])
    assert result.exit_code == 2 and "--set expects KEY=VALUE, got 'segmenter.epochs'" in result.output
    check = "import sys; sys.path.insert(0, 'jobs'); import _common; _common.parse_sets(['segmenter.epochs'])"
    job = subprocess.run([sys.executable, "-c", check], cwd=ROOT, capture_output=True, text=True)
    assert (
        job.returncode == 2 and job.stderr.strip() == "error: --set expects KEY=VALUE, got 'segmenter.epochs'"
    )


def test_with_overrides_changes_one_field_and_names_a_wrong_key():
    from tgan_ray.config import with_overrides

    cfg = load_config("cpu")
    changed = with_overrides(cfg, {"segmenter.real_fraction": 0.0})
    assert changed.segmenter.real_fraction == 0.0 and cfg.segmenter.real_fraction == 0.5
    assert changed.model_copy(update={"segmenter": cfg.segmenter}) == cfg  # nothing else moved
    with pytest.raises(ConfigError, match="segmenter.nope"):
        with_overrides(cfg, {"segmenter.nope": 1})


def test_worker_cpus_none_shares_the_local_cpus_and_is_one_on_a_cluster(monkeypatch):
    import os

    from tgan_ray.config import RayConfig
    from tgan_ray.runtime import worker_cpus
    from tgan_ray.train.driver import with_worker_cpus

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert worker_cpus(RayConfig(cpus_per_worker=0.5)) == 0.5
    local = os.cpu_count() or 1  # no Ray started in this process: the machine's CPUs
    assert worker_cpus(RayConfig(cpus_per_worker=None, num_workers=2)) == max(0.25, local / 2)
    assert worker_cpus(RayConfig(cpus_per_worker=None), reserved=local) == 0.25
    assert worker_cpus(RayConfig(cpus_per_worker=None, address="ray://head:10001")) == 1.0
    cfg = load_config("cpu")
    assert cfg.ray.cpus_per_worker is None and load_config("paper").ray.cpus_per_worker == 1.0
    assert with_worker_cpus(cfg).ray.cpus_per_worker == local
    assert with_worker_cpus(cfg, trials=2).ray.cpus_per_worker == max(0.25, local / 2)

"""Ray Train stages: one loop (``worker.py``) on shared plumbing, one driver call per stage."""

from tgan_ray.train.driver import StageResult, build_trainer, train_stage

__all__ = ["StageResult", "build_trainer", "train_stage"]

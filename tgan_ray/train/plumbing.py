"""Shared plumbing for every Ray Train stage: device, precision, seeding, data sharding, checkpoints.

Nothing here knows a model: stages (``stages.py``) bring the networks, this brings the machine. A stage runs
inside a Ray Train worker (:func:`setup_worker`) or in a plain process (:func:`local_context`: one rank, no Ray),
which is how a stage is unit-tested, profiled or stepped through in a debugger.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import random
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

CHECKPOINT_STATE = "state.pt"  # full training state, for resume
CHECKPOINT_MODEL = "model.pt"  # the inference artefact of the stage (generator or segmenter)


@dataclass
class WorkerContext:
    """What a stage needs to know about the worker it runs on."""

    device: torch.device
    rank: int
    world_size: int
    precision: str  # "bf16" or "fp32"
    channels_last: bool
    seed: int
    in_ray_train: bool = True  # False: a plain process (local_context), where nothing may call Ray Train

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def autocast(self):
        """bf16 autocast on GPU (no GradScaler needed for bf16); a no-op in fp32."""
        if self.precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def to_device(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.device, non_blocking=True)
        if self.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        return x


def setup_worker(ray_cfg: dict[str, Any], seed: int) -> WorkerContext:
    """Pick the device and precision, seed every generator (distinct per rank, reproducible per run)."""
    import ray.train
    import ray.train.torch

    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    want_gpu = ray_cfg.get("use_gpu", "auto") != "no" and torch.cuda.is_available()
    device = ray.train.torch.get_device() if want_gpu else torch.device("cpu")
    if isinstance(device, list):
        device = device[0]
    on_gpu = device.type == "cuda"
    precision = ray_cfg.get("precision", "auto")
    precision = ("bf16" if on_gpu else "fp32") if precision == "auto" else precision
    seed_everything(seed + rank)
    if not on_gpu:
        # One intra-op thread per CPU Ray reserved for this worker (however ray.cpus_per_worker was resolved):
        # more threads than cores spin-wait and can run 10-100x slower.
        from tgan_ray.runtime import use_actor_cpus

        use_actor_cpus()
    if on_gpu:
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
    return WorkerContext(
        device=device,
        rank=rank,
        world_size=world,
        precision=precision,
        channels_last=bool(ray_cfg.get("channels_last", True)) and on_gpu,
        seed=seed,
    )


def local_context(
    seed: int = 0, device: str = "cpu", precision: str = "fp32", channels_last: bool = False
) -> WorkerContext:
    """A one-rank context outside Ray: the same stage code, without a Ray Train worker around it."""
    seed_everything(seed)
    return WorkerContext(
        device=torch.device(device),
        rank=0,
        world_size=1,
        precision=precision,
        channels_last=channels_last,
        seed=seed,
        in_ray_train=False,
    )


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def prepare_network(net: torch.nn.Module, ctx: WorkerContext) -> torch.nn.Module:
    """Move one network to the device (channels_last on GPU) and wrap it in DDP when there are several ranks.

    Each network of a GAN is prepared on its own: one DDP wrapper per network, two plain optimisers.
    ``broadcast_buffers=False``: a discriminator runs forward twice (real, fake) before one backward.
    """
    net = net.to(ctx.device)
    if ctx.channels_last:
        net = net.to(memory_format=torch.channels_last)
    if not ctx.in_ray_train:
        return net
    import ray.train.torch

    return ray.train.torch.prepare_model(
        net, move_to_device=False, parallel_strategy_kwargs={"broadcast_buffers": False}
    )


class RepeatDataset(Dataset):
    """Present a small dataset as ``length`` items, so an epoch has a fixed number of steps.

    Subset 1 has 5 images: one pass is a single step at batch 4. Repeating (with fresh augmentation per item)
    gives the GANs a sensible epoch without changing the sampler, so DistributedSampler still shards it.
    Only for datasets smaller than ``length``: a larger one is capped by :class:`CappedLoader` instead.
    """

    def __init__(self, dataset: Dataset, length: int):
        self.dataset, self.length = dataset, max(int(length), 1)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int):
        return self.dataset[index % len(self.dataset)]


class CappedLoader:
    """The first ``steps`` batches of each epoch's shuffled pass over the whole dataset.

    ``steps_per_epoch`` caps an epoch's length, not the data: each epoch draws its batches from a fresh
    permutation of every item. (Presenting the dataset as its first ``steps x batch`` items instead trained
    NPsSegNet on 96 of its 320 virtual pairs and on none of the real crops after them.)
    """

    def __init__(self, loader: DataLoader, steps: int):
        self.loader, self.steps = loader, steps

    def __iter__(self):
        return itertools.islice(iter(self.loader), self.steps)

    def __len__(self) -> int:
        return min(self.steps, len(self.loader))

    def __getattr__(self, name: str):  # batch_size, sampler, dataset: the wrapped loader's
        if name == "loader":  # not set yet (unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.loader, name)


def build_loader(
    dataset: Dataset,
    batch_size: int,
    ctx: WorkerContext,
    steps_per_epoch: int | None = None,
    shuffle: bool = True,
    num_workers: int = 0,
) -> DataLoader | CappedLoader:
    """A DataLoader sharded across ranks by Ray Train's ``prepare_data_loader`` (DistributedSampler).

    With ``steps_per_epoch``, every epoch has exactly that many steps: a smaller dataset is repeated, a larger
    one is drawn from at random (:class:`CappedLoader`).
    """
    epoch_items = (steps_per_epoch or 1) * batch_size * ctx.world_size
    if len(dataset) < epoch_items:
        dataset = RepeatDataset(dataset, epoch_items)
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        drop_last=len(dataset) >= batch_size * ctx.world_size,
        num_workers=num_workers,
        pin_memory=ctx.device.type == "cuda",
        persistent_workers=num_workers > 0,
    )
    if ctx.in_ray_train:
        import ray.train.torch

        loader = ray.train.torch.prepare_data_loader(loader, move_to_device=False)
    return CappedLoader(loader, steps_per_epoch) if steps_per_epoch else loader


def set_epoch(loader: DataLoader | CappedLoader, epoch: int) -> None:
    """Reshuffle the DistributedSampler each epoch (otherwise every epoch sees the same order)."""
    sampler = getattr(loader, "sampler", None)
    if hasattr(sampler, "set_epoch"):
        sampler.set_epoch(epoch)


def unwrap(net: torch.nn.Module) -> torch.nn.Module:
    return net.module if hasattr(net, "module") else net


def write_checkpoint_dir(state: dict[str, Any], export) -> str:
    """Write training state and the inference artefact (``export(path)``) to a fresh temporary folder.

    Ray Train copies the folder into storage only after both files are complete, so storage never holds a
    half-written checkpoint.
    """
    directory = Path(tempfile.mkdtemp(prefix="tgan-ckpt-"))
    tmp = directory / f".{CHECKPOINT_STATE}.tmp"
    torch.save(state, tmp)
    os.replace(tmp, directory / CHECKPOINT_STATE)
    export(directory / CHECKPOINT_MODEL)
    return str(directory)


def read_checkpoint_state(checkpoint) -> dict[str, Any] | None:
    """Load ``state.pt`` from a Ray checkpoint (weights_only: plain tensors and containers only)."""
    if checkpoint is None:
        return None
    with checkpoint.as_directory() as directory:
        path = Path(directory) / CHECKPOINT_STATE
        if not path.exists():
            return None
        return torch.load(path, map_location="cpu", weights_only=True)


def optimizer_to(optimizer: torch.optim.Optimizer, device: torch.device) -> None:
    """Move restored optimizer state onto the worker's device."""
    for state in optimizer.state.values():
        for k, v in state.items():
            if isinstance(v, torch.Tensor):
                state[k] = v.to(device)


def to_uint8_grid(rows: list[list[np.ndarray]]) -> np.ndarray:
    """Tile rows of [-1,1] or [0,1] gray images (H x W) into one uint8 picture for MLflow."""

    def u8(a):
        a = np.asarray(a, dtype=np.float32)
        if a.min() < 0:
            a = (a + 1) / 2
        return (np.clip(a, 0, 1) * 255).astype(np.uint8)

    return np.concatenate([np.concatenate([u8(x) for x in row], axis=1) for row in rows], axis=0)

"""Abstract base of the GAN models (pix2pix, CycleGAN): nets in a dict, two Adam optimisers, linear-decay schedule.

Contract (after the reference's ``models/base_model.py``), which the Ray Train loop relies on:

- ``nets`` is an ``nn.ModuleDict``; ``generator_names`` / ``discriminator_names`` say which net is which, and
  ``loss_names`` are the keys ``train_step`` returns.
- The loop may replace ``model.nets[name]`` by a DDP-wrapped copy (``ray.train.torch.prepare_model(net)``), one
  network at a time. So ``train_step`` calls networks only as ``self.nets[name](x)`` and never reads attributes of
  the raw modules; wrappers share the parameters, so the optimisers work before or after wrapping.
- DDP safety: ``requires_grad`` is never switched on a discriminator (a DDP-wrapped D then raises "Expected to have
  finished reduction"). The generator step lets gradients reach D, steps only the generator optimiser, and the
  discriminator step zeroes D's gradients first and sees ``fake.detach()``.
- Mixed precision: the loop sets ``model.autocast`` to a context factory, e.g.
  ``functools.partial(torch.autocast, "cuda", dtype=torch.bfloat16)``; bf16 needs no GradScaler. Default: none.
"""

from __future__ import annotations

import abc
import contextlib
import itertools
from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

from tgan_ray.models.networks import unwrap_model

__all__ = ["GANModel", "linear_decay_factor", "require_keys"]


def require_keys(batch: dict[str, torch.Tensor], keys: Iterable[str], model: str) -> None:
    """Raise a one-line KeyError when ``batch`` lacks one of ``keys`` (``model`` names the caller)."""
    missing = [k for k in keys if k not in batch]
    if missing:
        raise KeyError(f"{model} batch lacks key(s) {missing}; it has {sorted(batch)}")


def linear_decay_factor(epoch: int, epochs: int, epochs_decay: int) -> float:
    """Learning-rate multiplier of the reference's 'linear' policy.

    Constant 1 for the first ``epochs`` epochs, then linear decay that reaches 0 after ``epochs_decay`` more:
    epochs=3, epochs_decay=2 gives 1, 1, 1, 2/3, 1/3, then 0.

    Args:
        epoch: Epoch index, from 0 (the number of ``scheduler.step()`` calls so far).
        epochs: Epochs at constant learning rate.
        epochs_decay: Epochs of linear decay.

    Returns:
        The multiplier, in [0, 1].
    """
    return max(0.0, 1.0 - max(0, epoch + 1 - epochs) / float(epochs_decay + 1))


class GANModel(nn.Module, abc.ABC):
    """Base of the GAN models: see the module docstring for the contract.

    Args:
        lr_g: Generator learning rate.
        lr_d: Discriminator learning rate.
        beta1: Adam beta1 (paper: 0.5).
        beta2: Adam beta2 (paper: 0.999).
    """

    loss_names: tuple[str, ...] = ()
    generator_names: tuple[str, ...] = ()
    discriminator_names: tuple[str, ...] = ()

    def __init__(self, lr_g: float = 2e-4, lr_d: float = 2e-4, beta1: float = 0.5, beta2: float = 0.999):
        super().__init__()
        self.nets = nn.ModuleDict()
        self.lr_g, self.lr_d, self.betas = lr_g, lr_d, (beta1, beta2)
        self.autocast: Callable[[], AbstractContextManager] = contextlib.nullcontext
        self._optimizers: tuple[torch.optim.Optimizer, torch.optim.Optimizer] | None = None
        self._schedulers: tuple[LambdaLR, LambdaLR] | None = None

    # -- training -------------------------------------------------------------------------------------------

    @abc.abstractmethod
    def train_step(self, batch: dict[str, torch.Tensor]) -> dict[str, float]:
        """One generator step and one discriminator step on a batch; returns ``loss_names`` -> value."""

    def _parameters_of(self, names: Iterable[str]) -> list[nn.Parameter]:
        return list(itertools.chain.from_iterable(self.nets[n].parameters() for n in names))

    def optimizers(self) -> tuple[torch.optim.Optimizer, torch.optim.Optimizer]:
        """The generator and discriminator Adam optimisers, built on first call and then reused.

        Returns:
            ``(opt_G, opt_D)``; ``opt_G`` covers every generator, ``opt_D`` every discriminator.
        """
        if self._optimizers is None:
            opt_g = torch.optim.Adam(
                self._parameters_of(self.generator_names), lr=self.lr_g, betas=self.betas
            )
            opt_d = torch.optim.Adam(
                self._parameters_of(self.discriminator_names), lr=self.lr_d, betas=self.betas
            )
            self._optimizers = (opt_g, opt_d)
        return self._optimizers

    def schedulers(self, epochs: int, epochs_decay: int) -> tuple[LambdaLR, LambdaLR]:
        """Linear-decay schedulers of both optimisers (see :func:`linear_decay_factor`); step once per epoch.

        Args:
            epochs: Epochs at constant learning rate.
            epochs_decay: Epochs of linear decay to zero.

        Returns:
            ``(sched_G, sched_D)``, built on first call and then reused.
        """
        if self._schedulers is None:

            def factor(epoch: int) -> float:
                return linear_decay_factor(epoch, epochs, epochs_decay)

            self._schedulers = tuple(LambdaLR(opt, lr_lambda=factor) for opt in self.optimizers())
        return self._schedulers

    @staticmethod
    def _to_floats(losses: dict[str, torch.Tensor]) -> dict[str, float]:
        # One device sync for all losses instead of one .item() each.
        values = torch.stack([v.detach().float() for v in losses.values()]).tolist()
        return dict(zip(losses, values, strict=True))

    # -- inference ------------------------------------------------------------------------------------------

    @torch.no_grad()
    def generate(self, x: torch.Tensor) -> torch.Tensor:
        """Translate a batch with the main generator (``generator_names[0]``), without gradients.

        Args:
            x: Source-domain batch in [-1, 1].

        Returns:
            Float32 target-domain batch in [-1, 1].

        Shape:
            (N, 1, H, W) -> (N, 1, H, W).
        """
        with self.autocast():
            return self.nets[self.generator_names[0]](x).float()

    # -- checkpoints ----------------------------------------------------------------------------------------

    def unwrapped_state_dict(self) -> dict[str, torch.Tensor]:
        """``state_dict()`` without DDP / compile prefixes, loadable into a fresh, unwrapped model."""
        return {
            f"nets.{name}.{key}": value
            for name, net in self.nets.items()
            for key, value in unwrap_model(net).state_dict().items()
        }

    def load_unwrapped_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Load an :meth:`unwrapped_state_dict` into this model, wrapped or not (strict)."""
        known = tuple(f"nets.{name}." for name in self.nets)
        stray = [k for k in state if not k.startswith(known)]
        if stray:
            raise KeyError(f"state dict has keys for no network of {type(self).__name__}: {stray[:3]}")
        for name, net in self.nets.items():
            prefix = f"nets.{name}."
            unwrap_model(net).load_state_dict(
                {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
            )

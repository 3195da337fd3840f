"""What every training loop of ssip runs on: an engine and the loop's hooks.

Each model has ONE training loop (:func:`ssip.models.prior.fit_prior`,
:func:`ssip.models.likelihood.train.fit_likelihood`) written against the small :class:`Engine`
interface, as Lightning Fabric and litgpt separate a loop from its strategy:

- :class:`LocalEngine` (here): plain torch in one process, what ``ssip train prior`` /
  ``ssip train likelihood`` use without ``--workers``;
- ``DeepSpeedEngine`` (:mod:`ssip.distributed.engine`): DeepSpeed inside a Ray Train worker, the
  gradient averaged over the workers and clipped globally.

A loop never knows which one it runs on: it calls the engine for the forward pass, ``step(loss)``
for backward + optimizer step, ``set_lr`` and ``all_reduce`` (a no-op in one process), and the
:class:`TrainHooks` for everything that is not training (run checkpoints, reports, metrics,
a progress bar, test hooks). The Ray modules keep only their Ray Data pipelines and the
TorchTrainer wiring. Nothing here imports Ray or DeepSpeed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import nn


class Engine(Protocol):
    """The training loop's view of where it runs (one process, or one of ``world_size``)."""

    module: nn.Module
    rank: int
    world_size: int

    def __call__(self, *args: Any, **kwargs: Any) -> Any: ...

    def train(self, mode: bool = True) -> Any: ...

    def step(self, loss: torch.Tensor) -> None: ...

    def set_lr(self, lr: float) -> None: ...

    def all_reduce(self, t: torch.Tensor, op: str = "sum") -> torch.Tensor: ...


class LocalEngine:
    """Plain torch in one process: ``step`` = zero_grad, backward, clip (``grad_clip > 0``),
    optimizer step.

    Parameters
    ----------
    module : nn.Module
        The network (the forward pass is ``engine(*args)``).
    optimizer : torch.optim.Optimizer
        Over the parameters to train.
    grad_clip : float
        Global gradient-norm clip over ``module``'s parameters; 0 = none.
    """

    rank = 0
    world_size = 1

    def __init__(self, module: nn.Module, optimizer: torch.optim.Optimizer, grad_clip: float = 0.0):
        self.module = module
        self.optimizer = optimizer
        self.grad_clip = float(grad_clip)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.module(*args, **kwargs)

    def train(self, mode: bool = True) -> LocalEngine:
        self.module.train(mode)
        return self

    def step(self, loss: torch.Tensor) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.module.parameters(), self.grad_clip)
        self.optimizer.step()

    def set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def all_reduce(self, t: torch.Tensor, op: str = "sum") -> torch.Tensor:
        return t


@dataclass
class TrainHooks:
    """What a training loop calls besides training (all optional).

    report : callable(metrics)
        Every log interval (the prior) or epoch (the likelihood) without a checkpoint
        (collective: every rank calls it).
    checkpoint : callable(state, metrics)
        At a checkpoint interval instead of ``report`` (collective).
    checkpoint_every : int
        Samples between run checkpoints (0: every log interval / epoch).
    metrics : object with ``log(row, samples_seen=, data_wait_s=) -> row``
        E.g. :class:`ssip.distributed.engine.TrainMetrics`.
    after_step : callable(samples_seen)
        Test hook (e.g. kill this worker).
    progress_bar : callable(total=, desc=, unit=) -> tqdm-like
        Made on rank 0 when the loop shows progress (``ray.experimental.tqdm_ray.tqdm`` on Ray).
    """

    report: Callable[[dict[str, Any]], Any] | None = None
    checkpoint: Callable[[dict[str, Any], dict[str, Any]], Any] | None = None
    checkpoint_every: int = 0
    metrics: Any = None
    after_step: Callable[[int], Any] | None = None
    progress_bar: Callable[..., Any] | None = None

    def bar(self, engine: Engine, progress: bool, **kwargs: Any) -> Any:
        """The progress bar of rank 0 (None elsewhere, or without a factory)."""
        if progress and engine.rank == 0 and self.progress_bar is not None:
            return self.progress_bar(**kwargs)
        return None

"""Per-trial noise for the samplers: one generator per batch item, frame-stable draws.

A batch is an optimisation, never a change in results: item b's noise comes from
``generators[b]`` alone, so its sample does not depend on its batch-mates, on the batch size or
on how many workers ran it. Noise is also *frame-stable*: the value at time frame t depends only
on the generator and t, not on how many frames the tensor has, so a trial padded to a longer
T_max gets the same noise on its real frames. Nothing here imports Ray or touches files.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import torch

#: Frames per independently seeded noise block (the last axis of an item is time).
NOISE_BLOCK_FRAMES = 32
_SEED_LIMIT = 2**63 - 1
# Golden-ratio increment spreads block seeds over the 64-bit range (SplitMix64's constant).
_BLOCK_STRIDE = 0x9E3779B97F4A7C15


def trial_seed(run_seed: int, trial_id: str, draw: int) -> int:
    """Seed of one posterior draw of one trial in one run, stable across processes and machines.

    Parameters
    ----------
    run_seed : int
        Seed of the decoding run.
    trial_id : str
        The trial's key (e.g. ``"sub-01/trial-0042"``).
    draw : int
        Index of the posterior draw, 0 <= draw.

    Returns
    -------
    int
        A seed in [0, 2**63 - 1), from SHA-256 of the three (Python's ``hash`` is salted per
        process, so it cannot be used here).
    """
    if draw < 0:
        raise ValueError(f"draw={draw} for trial {trial_id!r}: draw indices start at 0")
    digest = hashlib.sha256(f"{int(run_seed)}\x1f{trial_id}\x1f{int(draw)}".encode()).digest()
    return int.from_bytes(digest[:8], "little") % _SEED_LIMIT


def trial_generator(
    run_seed: int, trial_id: str, draw: int, device: str | torch.device = "cpu"
) -> torch.Generator:
    """A ``torch.Generator`` seeded with :func:`trial_seed` (run_seed, trial_id, draw)."""
    return torch.Generator(device=device).manual_seed(trial_seed(run_seed, trial_id, draw))


def item_noise(
    generators: Sequence[torch.Generator],
    item_shape: Sequence[int],
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype = torch.float64,
) -> torch.Tensor:
    """Standard normal noise with item b drawn from ``generators[b]`` only.

    Each call advances every generator by exactly one 63-bit draw whatever ``item_shape``: that
    draw seeds a CPU generator which fills fixed-size blocks of :data:`NOISE_BLOCK_FRAMES` time
    frames, block j from seed (draw + j * stride). Because every block has the same shape, the
    values do not depend on how ``torch.randn`` fills tensors of different sizes, and frame t's
    noise does not depend on T (frame-stable under padding).

    Parameters
    ----------
    generators : sequence of torch.Generator, length B
        One generator per batch item (any device; the blocks are drawn on the CPU).
    item_shape : sequence of int
        Shape of one item, time last, e.g. (1, 80, T) for a mel.
    device, dtype
        Where and in which precision to return the noise (drawn in float32).

    Returns
    -------
    torch.Tensor, shape (B, *item_shape)
    """
    item_shape = tuple(int(s) for s in item_shape)
    if not generators:
        raise ValueError("generators is empty: pass one torch.Generator per batch item")
    if len(item_shape) == 0 or item_shape[-1] < 1:
        raise ValueError(
            f"item_shape={item_shape}: need at least one axis (time, last) of size >= 1"
        )
    n_frames = item_shape[-1]
    n_blocks = -(-n_frames // NOISE_BLOCK_FRAMES)
    block_shape = (NOISE_BLOCK_FRAMES, *item_shape[:-1])
    # Time first while drawing, so that each block is one contiguous slice.
    out = torch.empty((len(generators), n_blocks, *block_shape))
    block_gen = torch.Generator()
    for b, g in enumerate(generators):
        seed = int(torch.randint(0, _SEED_LIMIT, (1,), generator=g, device=g.device))
        for j in range(n_blocks):
            block_gen.manual_seed((seed + j * _BLOCK_STRIDE) % 2**64)
            torch.randn(block_shape, generator=block_gen, out=out[b, j])
    # (B, n_blocks, F, *rest) -> (B, *rest, T), cropped to the real length.
    out = out.flatten(1, 2)[:, :n_frames].movedim(1, -1)
    return out.to(device=device, dtype=dtype)

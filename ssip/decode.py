"""Decoding trials: DPS posterior draws, the unconditional-prior and shuffled-neural controls, and
the direct regression baselines, as rows of a decoded table.

One row per (subject, trial, method, draw) with the decoded mel (80, T) cropped to the trial:

- ``"dps"``: Diffusion Posterior Sampling (Chung et al., ICLR 2023) with the EDM prior and the
  subject's likelihood (:func:`ssip.sampling.dps_edm`), draws k = 0..K-1 and their pointwise
  mean as draw = -1 (the estimate to score with mel PCC / STOI, docs/method.md, Decoding). By
  default the guidance is the Gaussian likelihood's own score (``weight`` 1): the likelihood's
  sigma is the noise's long-run std (:func:`ssip.models.likelihood.variance_inflation`), so the
  prior and the neural evidence are weighed as the model says, with no step size to tune.
- ``"prior"``: unconditional EDM samples (:func:`ssip.sampling.edm_sample`) from the SAME seeds,
  so the difference to ``"dps"`` is the guidance alone.
- ``"dps-shuffled"``: DPS driven by another trial's neural data of the same subject (trial i of
  the given list takes trial i+1's, cyclically; cropped, or zero-padded (zero = the z-scored
  mean) to trial i's length), with the same seeds: a control that should score about chance.
- ``"linear"``, ``"nn"``: the regression baselines of :mod:`ssip.models.baselines`, draw = -1.

Draw k of trial t is seeded by ``trial_generator(cfg.seed, "<subject>/<trial_id>", k)`` and every
method draws it the same way, so a trial's rows never depend on its batch-mates, the batch size
or the worker that ran it. The EDM UNet mixes frames (convolutions, attention), so a batch is
only exact when all its trials are padded to the same length: trials are grouped by their padded
length (T rounded up to the UNet's downsampling factor, 8 for the presets, or to
``pad_multiple``) and each group is split into batches of ``speed.batch_size``. Padded frames carry a frame mask (unguided, MEL_FLOOR in
the output) and are cropped off.

Pure library code: no Ray, no file I/O (the commands load checkpoints and write the table).
"""

from __future__ import annotations

import contextlib
import math
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
from tqdm.auto import tqdm

from ssip.config import ConfigError, check_option, check_range, field, from_dict, to_dict
from ssip.mel import MEL_FLOOR, N_MELS
from ssip.sampling import (
    NonFiniteSampleError,
    PosteriorDraws,
    check_guidance_rule,
    edm_sample,
    make_guidance,
    posterior_draws,
    trial_generator,
)
from ssip.sampling.daps import daps_sample, gaussian_measurement, stack_residuals
from ssip.sampling.reference import ddpm_sample, dps_ancestral

#: Methods that sample from the prior (and, but for "prior", guide with the likelihood).
SAMPLED_METHODS = ("dps", "prior", "dps-shuffled")
#: Direct regression baselines (one deterministic prediction each, draw = -1).
BASELINE_METHODS = ("linear", "nn")
METHODS = SAMPLED_METHODS + BASELINE_METHODS
#: ``draw`` of the posterior-mean row (and of the baselines' single prediction).
MEAN_DRAW = -1
#: Samplers of DecodeConfig.sampler.
SAMPLERS = ("edm", "ancestral", "daps")
#: Evidence a posterior sampler can use (DecodeConfig.evidence): the subject's encoding
#: likelihood p(neural | mel), and/or the nn decoder's prediction as a Gaussian pseudo-measurement
#: of the mel (per-bin noise std from its validation error).
EVIDENCE = ("encoding", "nn")


@dataclass
class DecodeSpeed:
    """Speed switches of a decode: each changes how fast, never what (to float rounding).

    bench/dps_speed.py prints each one's effect on speed and quality. The defaults are the
    production path; the naive reference (the published recipe, with ``sampler: ancestral``
    and ``num_steps: 1000`` in the science) is batch_size=1, draws_per_call=1,
    whisper_window=30s, whisper_layers=all, precision=fp32.
    """

    batch_size: int = field(8, help="trials per sampler call, each with all its n_draws draws "
                                    "(an optimisation only: results do not depend on it)")
    draws_per_call: int | None = field(None, help="posterior draws per sampler call (null = "
                                                  "all n_draws of a batch's trials in one "
                                                  "call; 1 = one draw at a time); results do "
                                                  "not depend on it")
    whisper_window: str = field("trial", help="Whisper likelihood input: 'trial' (the trial's "
                                              "frames only) or '30s' (padded to Whisper's "
                                              "3000 frames with the padding masked: the same "
                                              "result at 3000/T times the cost)")
    whisper_layers: str = field("tap", help="'tap': run the Whisper encoder up to the tapped "
                                            "layer; 'all': through all its layers (the same "
                                            "result, more compute)")
    grad_checkpoint: bool = field(False, help="recompute the denoiser's and likelihood's "
                                              "activations in the backward pass: less memory "
                                              "for larger batches, about 1.3x the compute")
    precision: str = field("auto", help="'fp32'; 'bf16': autocast of the denoiser and "
                                        "likelihood (the sampler's update stays float64); "
                                        "'auto': bf16 on CUDA, fp32 on CPU")
    compile: bool = field(False, help="torch.compile the denoiser and the likelihood (a "
                                      "one-off compile per batch shape; for GPUs)")
    compile_mode: str = field("default", help="torch.compile mode: 'default', "
                                              "'reduce-overhead' (CUDA graphs on a GPU), "
                                              "'max-autotune'")

    def __post_init__(self) -> None:
        check_range("speed.batch_size", self.batch_size, 1, None)
        if self.draws_per_call is not None:
            check_range("speed.draws_per_call", self.draws_per_call, 1, None)
        check_option("speed.whisper_window", self.whisper_window, ("trial", "30s"))
        check_option("speed.whisper_layers", self.whisper_layers, ("tap", "all"))
        check_option("speed.precision", self.precision, ("auto", "fp32", "bf16"))
        check_option("speed.compile_mode", self.compile_mode,
                     ("default", "reduce-overhead", "max-autotune"))

    def resolved_precision(self, device: torch.device | str) -> str:
        """'fp32' or 'bf16' on ``device`` ('auto': bf16 on CUDA only)."""
        if self.precision != "auto":
            return self.precision
        return "bf16" if torch.device(device).type == "cuda" else "fp32"


@dataclass
class DecodeSelection:
    """Which trials ``ssip decode`` decodes (its --split / --subject / --max-trials set these)."""

    split: str = field("test", help="split to decode: train | val | test")
    subjects: list[str] = field(default_factory=list, help="subjects to decode (empty = every "
                                                           "subject of the ingest)")
    max_trials: int = field(0, help="decode at most this many trials per subject, in trial "
                                    "order (0 = all)")

    def __post_init__(self) -> None:
        check_option("selection.split", self.split, ("train", "val", "test"))
        self.subjects = [str(s) for s in self.subjects]
        check_range("selection.max_trials", self.max_trials, 0, None)


#: Speed switches that moved from the top level of DecodeConfig into its ``speed`` section: a
#: config or override that still gives one at the top level is a ConfigError naming the new key.
MOVED_TO_SPEED = ("batch_size", "draws_per_call", "whisper_window", "whisper_layers",
                  "grad_checkpoint", "precision", "compile", "compile_mode")


@dataclass
class DecodeConfig:
    """How trials are decoded (sampler, guidance step, draws, seeds, methods); the switches that
    only change the speed are the ``speed`` section, the trials ``ssip decode`` decodes the
    ``selection``."""

    MOVED_KEYS: ClassVar[dict[str, str]] = {k: f"speed.{k}" for k in MOVED_TO_SPEED}

    methods: list[str] = field(default_factory=lambda: list(METHODS),
                               help=f"methods to decode, any of {list(METHODS)}; 'linear'/'nn' "
                                    "need fitted baselines")
    n_draws: int = field(4, help="posterior draws per trial and sampled method; >= 16 is "
                                 "recommended when scoring the posterior mean with mel PCC / "
                                 "STOI (docs/method.md, Decoding: the mean of 16 beat ridge)")
    control_draws: int | None = field(None, help="draws per trial for the 'prior' and "
                                                 "'dps-shuffled' controls (null = n_draws); a "
                                                 "control only has to show chance, so fewer "
                                                 "draws save most of a decode's time")
    num_steps: int = field(50, help="EDM sampler steps (about 50 sufficed; 100 gave nothing more)")
    weight: float | None = field(1.0, help="guidance as the Gaussian likelihood's score times "
                                           "weight (1 = the calibrated likelihood); set to null "
                                           "to use xi or zeta instead")
    xi: float | None = field(None, help="CQT-Diff normalised guidance step (0.05-0.1 on the "
                                        "default corpus), instead of weight")
    zeta: float | None = field(None, help="constant DPS step on the non-squared residual norm, "
                                          "instead of weight")
    inflation: float = field(0.0, help="with weight: the score is scaled by 1 / (1 + inflation "
                                       "* r^2), r^2 = sd^2 t^2 / (sd^2 + t^2) (PiGDM-style)")
    sigma_min: float = field(0.002, help="lowest noise level of the EDM schedule")
    sigma_max: float = field(80.0, help="highest noise level of the EDM schedule")
    rho: float = field(7.0, help="EDM schedule exponent")
    heun: bool = field(True, help="Heun (2nd order) correction on every step but the last")
    s_churn: float = field(0.0, help="EDM stochasticity (Karras et al. Alg. 2): noise added back "
                                     "per step, 0 = deterministic ODE sampler")
    s_min: float = field(0.0, help="churn only at sigma >= s_min")
    s_max: float = field(float("inf"), help="churn only at sigma <= s_max")
    s_noise: float = field(1.0, help="scale of the churn noise (EDM: 1.003-1.007)")
    seed: int = field(0, help="run seed: draw k of trial t is seeded by (seed, subject/trial, k)")
    sampler: str = field("edm", help="'edm': the few-step EDM Euler/Heun sampler with DPS "
                                     "guidance (production); 'ancestral': the paper's DDPM "
                                     "ancestral sampler over num_steps of its 1000 training steps "
                                     "(weight or zeta rule); 'daps': decoupled annealing "
                                     "(ssip.sampling.daps): num_steps noise levels, Langevin "
                                     "steps on x0 with the likelihood only, no backprop through "
                                     "the prior")
    evidence: list[str] = field(default_factory=lambda: ["encoding"],
                                help="what guides the posterior: 'encoding' (the subject's "
                                     "likelihood p(neural | mel)) and/or 'nn' (the nn decoder's "
                                     "mel as a Gaussian pseudo-measurement, per-bin noise from "
                                     "its validation error); both views read the same neural "
                                     "data, so evidence_weights should sum to 1 to count it once")
    evidence_weights: list[float] | None = field(None, help="exponent of each evidence term, in "
                                                            "the order of evidence (null = 1 "
                                                            "each)")
    daps_langevin_steps: int = field(20, help="daps: Langevin steps on x0 per noise level")
    daps_step_scale: float = field(0.05, help="daps: Langevin step = this x r_t^2 (r_t^2 the "
                                              "variance of x0 given x_t)")
    daps_x0: str = field("tweedie", help="daps: x0 estimate from x_t, 'tweedie' (one denoiser "
                                         "call) or 'ode' (daps_ode_steps of the probability-flow "
                                         "ODE)")
    daps_ode_steps: int = field(4, help="daps with daps_x0=ode: ODE steps per noise level")
    guide_sigma_max: float | None = field(None, help="guide only the steps at noise level <= "
                                                     "this (null = every step): an unguided "
                                                     "step skips the likelihood and the "
                                                     "backward pass (edm sampler)")
    pad_multiple: int | None = field(None, help="pad each trial to a multiple of this many "
                                                "frames (null = the UNet's factor, 8 for the "
                                                "presets): coarser buckets put more trials of "
                                                "similar length in one batch; a trial's padding "
                                                "depends on its own length only, so batching "
                                                "still equals decoding it alone")
    speed: DecodeSpeed = field(default_factory=DecodeSpeed,
                               help="speed switches (batch size, precision, compile, ...): "
                                    "results do not depend on them beyond float rounding")
    selection: DecodeSelection = field(default_factory=DecodeSelection,
                                       help="which trials `ssip decode` decodes (split, "
                                            "subjects, max_trials; its --split / --subject / "
                                            "--max-trials flags set them)")

    def __post_init__(self) -> None:
        self.methods = list(self.methods)
        if not self.methods:
            raise ConfigError(f"methods is empty; choose some of {list(METHODS)}")
        for m in self.methods:
            check_option("methods[]", m, METHODS)
        if len(set(self.methods)) != len(self.methods):
            raise ConfigError(f"methods={self.methods} lists a method twice")
        check_range("n_draws", self.n_draws, 1, None)
        if self.control_draws is not None:
            check_range("control_draws", self.control_draws, 1, None)
        check_range("num_steps", self.num_steps, 1, None)
        check_range("sigma_min", self.sigma_min, 1e-9, self.sigma_max)
        check_range("rho", self.rho, 1e-6, None)
        check_range("s_churn", self.s_churn, 0.0, None)
        check_range("s_noise", self.s_noise, 0.0, None)
        if self.s_min > self.s_max:
            raise ConfigError(f"s_min={self.s_min} exceeds s_max={self.s_max}")
        check_option("sampler", self.sampler, SAMPLERS)
        self.evidence = list(self.evidence)
        if not self.evidence or len(set(self.evidence)) != len(self.evidence):
            raise ConfigError(f"evidence={self.evidence}: give one or more of {list(EVIDENCE)}, "
                              "each once")
        for e in self.evidence:
            check_option("evidence[]", e, EVIDENCE)
        if self.evidence_weights is not None:
            self.evidence_weights = [float(w) for w in self.evidence_weights]
            if len(self.evidence_weights) != len(self.evidence) or any(
                    not (math.isfinite(w) and w >= 0) for w in self.evidence_weights):
                raise ConfigError(f"evidence_weights={self.evidence_weights}: one finite weight "
                                  f">= 0 per evidence {self.evidence}")
        if self.sampler == "ancestral" and self.evidence != ["encoding"]:
            raise ConfigError("sampler=ancestral is the published reference: evidence must be "
                              "['encoding']")
        if self.sampler == "daps" and self.weight is None:
            raise ConfigError("sampler=daps weighs the likelihood by weight (the Gaussian "
                              "likelihood's exponent); xi and zeta are DPS step rules")
        check_range("daps_langevin_steps", self.daps_langevin_steps, 0, None)
        check_range("daps_step_scale", self.daps_step_scale, 1e-9, None)
        check_option("daps_x0", self.daps_x0, ("tweedie", "ode"))
        check_range("daps_ode_steps", self.daps_ode_steps, 1, None)
        try:
            check_guidance_rule({"xi": self.xi, "zeta": self.zeta, "weight": self.weight},
                                self.inflation, sampler=self.sampler)
        except ValueError as e:
            raise ConfigError(str(e)) from e
        if self.sampler != "edm" and self.guide_sigma_max is not None:
            raise ConfigError(f"guide_sigma_max is for sampler=edm; sampler={self.sampler} "
                              "guides every step")
        if self.sampler == "ancestral":
            if self.num_steps > 1000:
                raise ConfigError(f"num_steps={self.num_steps}: the ancestral sampler respaces "
                                  f"its 1000 training steps; choose 1..1000")
        if self.guide_sigma_max is not None:
            check_range("guide_sigma_max", self.guide_sigma_max, 0.0, None)
        if self.pad_multiple is not None:
            check_range("pad_multiple", self.pad_multiple, 1, None)
        if not isinstance(self.speed, DecodeSpeed):
            raise ConfigError(f"speed={self.speed!r} must be a DecodeSpeed section")
        if not isinstance(self.selection, DecodeSelection):
            raise ConfigError(f"selection={self.selection!r} must be a DecodeSelection section")

    def pad_factor(self, unet_factor: int) -> int:
        """The padding multiple of a trial: lcm of the UNet's factor and ``pad_multiple``."""
        return math.lcm(int(unet_factor), int(self.pad_multiple or 1))

    def needs_likelihood(self) -> bool:
        """Whether decoding needs the subject's likelihood (a guided method with 'encoding')."""
        return any(m in ("dps", "dps-shuffled") for m in self.methods) and \
            "encoding" in self.evidence

    def needs_baselines(self) -> list[str]:
        """The fitted baselines decoding needs: those in methods, and 'nn' for evidence 'nn'."""
        out = [m for m in self.methods if m in BASELINE_METHODS]
        guided = any(m in ("dps", "dps-shuffled") for m in self.methods)
        if guided and "nn" in self.evidence and "nn" not in out:
            out.append("nn")
        return out

    def weights(self) -> list[float]:
        """The exponent of each evidence term (``evidence_weights``, default 1 each)."""
        return list(self.evidence_weights or [1.0] * len(self.evidence))

    def guide_steps(self) -> list[bool] | None:
        """Which EDM steps are guided under ``guide_sigma_max`` (None: all)."""
        if self.guide_sigma_max is None:
            return None
        from ssip.sampling.edm import churn_gamma, karras_sigmas

        sig = karras_sigmas(self.num_steps, self.sigma_min, self.sigma_max, self.rho).tolist()
        out = []
        for t in sig[:-1]:
            t_hat = t * (1 + churn_gamma(t, self.num_steps, self.s_churn, self.s_min, self.s_max))
            out.append(t_hat <= self.guide_sigma_max)
        return out


def with_overrides(cfg: DecodeConfig, overrides: Mapping[str, Any] | None = None,
                   **speed: Any) -> DecodeConfig:
    """``cfg`` with top-level ``overrides`` (a preset's, e.g. ``{"weight": 2.0}``) and
    ``speed`` switches replaced, validated by :func:`ssip.config.from_dict` (a key that moved
    into a section, ``batch_size``: ``speed.batch_size``, or an unknown key is a ConfigError
    naming it)."""
    data = {**to_dict(cfg), **dict(overrides or {})}
    if speed:
        data["speed"] = {**data["speed"], **speed}
    return from_dict(DecodeConfig, data, where="decode")


def trial_key(trial: Mapping[str, Any]) -> str:
    """``"<subject>/<trial_id>"``: the name that seeds a trial's draws (unique across subjects)."""
    return f"{trial.get('subject', '')}/{trial['trial_id']}"


def padded_length(n_frames: int, factor: int) -> int:
    """Smallest multiple of ``factor`` that is >= n_frames."""
    return -(-int(n_frames) // factor) * factor


def _check_trials(trials: Sequence[Mapping[str, Any]], n_electrodes: int | None) -> str:
    """Validate trial dicts for decoding; return their (single) subject."""
    if not trials:
        raise ValueError("decode_trials: no trials given")
    subjects = sorted({str(t.get("subject", "")) for t in trials})
    if len(subjects) > 1:
        raise ValueError(f"decode_trials: trials of subjects {subjects}; a likelihood is per "
                         f"subject: decode one subject's trials at a time")
    keys = [trial_key(t) for t in trials]
    if len(set(keys)) != len(keys):
        dup = sorted({k for k in keys if keys.count(k) > 1})
        raise ValueError(f"decode_trials: trial(s) {dup} appear twice; each trial is decoded once")
    for t in trials:
        where = f"subject {t.get('subject')!r} trial {t.get('trial_id')!r}"
        x = np.asarray(t["neural"]) if "neural" in t else None
        if x is None:
            raise ValueError(f"{where}: field 'neural' is missing")
        if x.ndim != 2 or x.shape[0] < 1:
            raise ValueError(f"{where}: neural has shape {x.shape}; expected (T, C) with T >= 1")
        if n_electrodes is not None and x.shape[1] != n_electrodes:
            raise ValueError(f"{where}: {x.shape[1]} electrodes but the likelihood models "
                             f"{n_electrodes}; use the likelihood trained on this subject")
        if not np.isfinite(x).all():
            raise ValueError(f"{where}: neural holds NaN/inf; re-run ingest or drop the trial")
    return subjects[0]


def _fit_length(x: np.ndarray, n_frames: int) -> np.ndarray:
    """Crop or zero-pad neural (T', C) to (n_frames, C)."""
    out = np.zeros((n_frames, x.shape[1]), dtype=np.float32)
    n = min(n_frames, x.shape[0])
    out[:n] = x[:n]
    return out


def _batches(lengths: Sequence[int], factor: int, batch_size: int) -> list[tuple[int, list[int]]]:
    """Trial indices grouped by padded length, then chunked: [(T_pad, [i, ...]), ...]."""
    groups: dict[int, list[int]] = defaultdict(list)
    for i, n in enumerate(lengths):
        groups[padded_length(n, factor)].append(i)
    return [(t_pad, idx[s:s + batch_size])
            for t_pad, idx in sorted(groups.items()) for s in range(0, len(idx), batch_size)]


def _autocast(device_type: str, precision: str):
    """bf16 autocast on ``device_type`` for precision 'bf16', else a no-op context."""
    if precision == "bf16":
        return torch.autocast(device_type=device_type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _run(fn, grad_checkpoint: bool, *args):
    """fn(*args), recomputing its activations in the backward pass when asked (and grad is on)."""
    if grad_checkpoint and torch.is_grad_enabled():
        return torch.utils.checkpoint.checkpoint(fn, *args, use_reentrant=False)
    return fn(*args)


def prior_denoiser(prior: torch.nn.Module, cfg: DecodeConfig | None = None):
    """The sampler's ``denoiser(x float64, sigma float64)`` over a frozen EDMPrior (float32).

    ``cfg.speed``'s switches apply: ``precision`` (bf16 autocast), ``grad_checkpoint`` and
    ``compile``; the output is float32 whatever the precision inside.
    """
    cfg = cfg or DecodeConfig()
    prior.eval()
    prior.requires_grad_(False)
    device_type = next(prior.parameters()).device.type
    precision = cfg.speed.resolved_precision(device_type)
    net = torch.compile(prior, mode=cfg.speed.compile_mode) if cfg.speed.compile else prior

    def denoiser(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        with _autocast(device_type, precision):
            out = _run(net, cfg.speed.grad_checkpoint, x.float(), sigma.float())
        return out.float()

    denoiser.sigma_data = float(prior.sigma_data)  # for the PiGDM-style guidance weight
    return denoiser


def _likelihood_forward(likelihood: torch.nn.Module, cfg: DecodeConfig):
    """The likelihood's A(mel, mask) under ``cfg``'s precision / checkpoint / compile switches."""
    device_type = likelihood.sigma.device.type
    precision = cfg.speed.resolved_precision(device_type)
    net = (torch.compile(likelihood, mode=cfg.speed.compile_mode) if cfg.speed.compile
           else likelihood)

    def forward(mel: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        with _autocast(device_type, precision):
            out = _run(net, cfg.speed.grad_checkpoint, mel, mask)
        return out.float()

    return forward


class NaiveWhisperView:
    """A Whisper likelihood seen through the naive-reference switches (benchmark only).

    Calling it is calling the likelihood with the encoder's ``pad_to`` / ``rest_layers``
    (:meth:`ssip.models.whisper.WhisperEncoderWindow.forward`); every other attribute is the
    likelihood's own. It holds the switches itself, so the likelihood is never changed.

    Attributes
    ----------
    likelihood : WhisperLikelihood
    pad_to : int or None
        Frames every window is padded to (3000 for ``whisper_window: 30s``), else None.
    all_layers : bool
        Whether the encoder's layers past the tap run too (``whisper_layers: all``).
    rest_layers : tuple of modules
        Those layers (the encoder window's ``past_tap``) when ``all_layers``, else empty.
    """

    def __init__(self, likelihood: torch.nn.Module, pad_to: int | None, all_layers: bool):
        enc = likelihood.encoder
        if pad_to is not None and not 1 <= int(pad_to) <= enc.max_frames:
            raise ValueError(f"pad_to={pad_to}: Whisper takes 1..{enc.max_frames} frames")
        self.likelihood = likelihood
        self.pad_to = None if pad_to is None else int(pad_to)
        self.all_layers = bool(all_layers)
        self.rest_layers: tuple[torch.nn.Module, ...] = ()
        if self.all_layers:
            # The layers past the tap are not registered in the likelihood (its .to() skips
            # them): bring them where the encoder runs. They are frozen pretrained weights.
            w = enc.conv1.weight
            self.rest_layers = tuple(block.to(device=w.device, dtype=w.dtype).requires_grad_(False)
                                     for block in enc.past_tap)

    def __call__(self, mel: torch.Tensor, frame_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.likelihood(mel, frame_mask, pad_to=self.pad_to, rest_layers=self.rest_layers)

    def whitened_residual(self, mel, neural, frame_mask=None, forward=None):
        return self.likelihood.whitened_residual(mel, neural, frame_mask, forward=forward or self)

    def __getattr__(self, name: str):
        # Only reached for names the view lacks (sigma, n_electrodes, noise, encoder, ...).
        try:
            likelihood = self.__dict__["likelihood"]
        except KeyError:
            raise AttributeError(name) from None
        return getattr(likelihood, name)


@contextlib.contextmanager
def whisper_switches(likelihood, cfg: DecodeConfig):
    """The likelihood to decode with under ``cfg.speed.whisper_window`` / ``whisper_layers``.

    Yields ``likelihood`` itself on the production path, else a :class:`NaiveWhisperView`
    carrying the naive switches: it shares the weights, and the shared model is never changed,
    so threads decoding with one likelihood (Ray Serve's replicas) cannot see each other's
    switches.
    """
    naive = cfg.speed.whisper_window != "trial" or cfg.speed.whisper_layers != "tap"
    if likelihood is None or not naive:
        yield likelihood
        return
    if not hasattr(getattr(likelihood, "encoder", None), "past_tap"):
        raise ValueError(f"whisper_window={cfg.speed.whisper_window!r} / whisper_layers="
                         f"{cfg.speed.whisper_layers!r} need a Whisper likelihood; this one is "
                         f"{type(likelihood).__name__}")
    yield NaiveWhisperView(
        likelihood,
        pad_to=likelihood.encoder.max_frames if cfg.speed.whisper_window == "30s" else None,
        all_layers=cfg.speed.whisper_layers == "all")


def decode_trials(trials: Sequence[Mapping[str, Any]], prior: torch.nn.Module,
                  likelihood: torch.nn.Module | None, cfg: DecodeConfig | None = None,
                  baselines: Mapping[str, Any] | None = None,
                  progress: bool = False,
                  shuffled_neural: Sequence[np.ndarray] | None = None) -> list[dict[str, Any]]:
    """Decode one subject's trials with every method of ``cfg.methods``.

    Parameters
    ----------
    trials : sequence of dict
        ``subject``, ``trial_id``, ``neural`` (T, C) z-scored high gamma at 100 Hz (e.g. from
        :func:`ssip.data.dataset.load_trials`), all of one subject. Their order defines the
        shuffled pairing (trial i takes trial i+1's neural, cyclically).
    prior : EDMPrior
        The mel prior; frozen and put in eval mode here. Its ``factor`` (UNet downsampling)
        sets the padding multiple (8 when absent), with ``cfg.pad_multiple`` when given.
    likelihood : Likelihood or None
        The subject's forward model (:mod:`ssip.models.likelihood`), frozen here; may be None
        when no DPS method is asked for.
    cfg : DecodeConfig, optional
    baselines : mapping, optional
        ``{"linear": LinearDecoder, "nn": NNDecoder}`` fitted on this subject, for the baseline
        methods in ``cfg.methods``.
    shuffled_neural : sequence of ndarray, optional
        The other trial's neural data (T_j, C) that drives each trial's ``"dps-shuffled"``
        control (default: trial i takes trial i+1's of ``trials``, cyclically). The bulk decoder
        passes it so that the pairing does not depend on how trials are batched.

    Returns
    -------
    list of dict
        Rows ``subject``, ``trial_id``, ``method``, ``draw`` (k, or -1 for the posterior mean and
        for baselines) and ``mel`` (80, T) float32 ndarray, T the trial's frame count; the mean
        rows of sampled methods also carry ``spread`` (mean std over draws); ordered by
        trial, then method (in ``cfg.methods`` order), then draw (0..K-1, then -1).

    Raises
    ------
    ValueError
        Trials of several subjects, a missing likelihood/baseline, or a shuffled control with a
        single trial.
    NonFiniteSampleError
        A sampler step gave NaN/inf; the message names the trials of the batch.
    """
    cfg = cfg or DecodeConfig()
    methods = list(cfg.methods)
    guided = [m for m in methods if m in ("dps", "dps-shuffled")]
    encoding = bool(guided) and "encoding" in cfg.evidence
    if encoding and likelihood is None:
        raise ValueError(f"decode_trials: methods {guided} need a likelihood; pass the subject's "
                         f"likelihood or drop them from methods")
    n_el = likelihood.n_electrodes if likelihood is not None and encoding else None
    subject = _check_trials(trials, n_el)
    if shuffled_neural is not None and len(shuffled_neural) != len(trials):
        raise ValueError(f"decode_trials: {len(shuffled_neural)} shuffled_neural arrays for "
                         f"{len(trials)} trials")
    if "dps-shuffled" in methods and len(trials) < 2 and shuffled_neural is None:
        raise ValueError(f"decode_trials (subject {subject!r}): 'dps-shuffled' needs >= 2 trials "
                         f"to borrow another trial's neural data; got 1")
    baselines = dict(baselines or {})
    pseudo = None  # per-bin noise std (80, 1) of the nn's mel when "nn" is evidence
    if guided and "nn" in cfg.evidence:
        nn_dec = baselines.get("nn")
        std = getattr(nn_dec, "noise_std", None)
        if nn_dec is None or std is None:
            raise ValueError(f"decode_trials (subject {subject!r}): evidence 'nn' needs the "
                             f"subject's fitted nn decoder with its validation noise_std; pass "
                             f"baselines={{'nn': decoder}} (ssip train baseline --kind nn)")
        pseudo = torch.as_tensor(np.asarray(std, np.float64)).reshape(N_MELS, 1)
    missing = [m for m in methods if m in BASELINE_METHODS and m not in baselines]
    if missing:
        raise ValueError(f"decode_trials (subject {subject!r}): no fitted decoder for {missing}; "
                         f"pass baselines={{name: decoder}} or drop them from methods")

    neural = [np.asarray(t["neural"], dtype=np.float32) for t in trials]
    lengths = [x.shape[0] for x in neural]
    n = len(trials)
    partners = (neural[(i + 1) % n] for i in range(n)) if shuffled_neural is None else (
        np.asarray(x, dtype=np.float32) for x in shuffled_neural)
    shuffled = [_fit_length(x, lengths[i]) for i, x in enumerate(partners)]
    nn_mels: dict[tuple[str, int], np.ndarray] = {}

    def nn_mel(kind: str, i: int) -> np.ndarray:
        # The nn's mel of trial i from its own ("dps") or borrowed ("dps-shuffled") neural data,
        # computed once per decode for both the 'nn' evidence and the 'nn' method.
        if (kind, i) not in nn_mels:
            x = neural[i] if kind == "dps" else shuffled[i]
            nn_mels[(kind, i)] = baseline_predictions(
                [{**trials[i], "neural": x}], baselines["nn"])[0]
        return nn_mels[(kind, i)]

    out: dict[tuple[int, str], list[dict[str, Any]]] = defaultdict(list)

    sampled = [m for m in methods if m in SAMPLED_METHODS]
    if sampled:
        factor = cfg.pad_factor(int(getattr(prior, "factor", 8)))
        denoiser = prior_denoiser(prior, cfg)
        if cfg.sampler in ("edm", "daps"):  # daps: its "prior" control is the EDM one
            schedule = {"num_steps": cfg.num_steps, "sigma_min": cfg.sigma_min,
                        "sigma_max": cfg.sigma_max, "rho": cfg.rho, "heun": cfg.heun,
                        "S_churn": cfg.s_churn, "S_min": cfg.s_min, "S_max": cfg.s_max,
                        "S_noise": cfg.s_noise, "pad_value": MEL_FLOOR,
                        "guide_steps": cfg.guide_steps()}
        else:
            schedule = {"num_steps": cfg.num_steps, "pad_value": MEL_FLOOR}
        device = next(prior.parameters()).device
        batches = _batches(lengths, factor, cfg.speed.batch_size)
        bar = tqdm(total=n, desc=f"decode {subject}", unit="trial", disable=not progress)
        with whisper_switches(likelihood if encoding else None, cfg) as lik:
            forward = _likelihood_forward(lik, cfg) if encoding else None
            for t_pad, idx in batches:
                mask = torch.zeros((len(idx), t_pad), dtype=torch.bool)
                for b, i in enumerate(idx):
                    mask[b, :lengths[i]] = True
                mask = mask.to(device)
                for method in sampled:
                    ys = zs = None
                    if method != "prior":
                        src = neural if method == "dps" else shuffled
                        ys = np.stack([_fit_length(src[i], t_pad) for i in idx])  # (B, T_pad, C)
                        if pseudo is not None:  # the nn's mel of the same (or shuffled) neural
                            zs = np.full((len(idx), 1, N_MELS, t_pad), MEL_FLOOR, np.float32)
                            for b, i in enumerate(idx):
                                zs[b, 0, :, :lengths[i]] = nn_mel(method, i)
                    n_draws = cfg.n_draws if method == "dps" else cfg.control_draws or cfg.n_draws
                    draws = _sample_batch(method, denoiser, lik, forward, ys, mask, t_pad,
                                          [trial_key(trials[i]) for i in idx], n_draws, cfg,
                                          schedule, device,
                                          None if zs is None else (zs, pseudo))
                    for b, i in enumerate(idx):
                        t = lengths[i]
                        rows = out[(i, method)]
                        for k in range(n_draws):
                            rows.append(_row(trials[i], method, k, draws.samples[b, k, 0, :, :t]))
                        mean_row = _row(trials[i], method, MEAN_DRAW, draws.mean[b, 0, :, :t])
                        # Posterior spread: the draws' std (per element, over draws), averaged over
                        # the trial's real frames and bins; NaN with a single draw.
                        mean_row["spread"] = (float(draws.std[b, 0, :, :t].mean()) if n_draws > 1
                                              else math.nan)
                        rows.append(mean_row)
                bar.update(len(idx))
        bar.close()

    for method in methods:
        if method in BASELINE_METHODS:
            mels = ([nn_mel("dps", i) for i in range(n)] if method == "nn"
                    else baseline_predictions(trials, baselines[method]))
            for i, mel in enumerate(mels):
                out[(i, method)].append(_row(trials[i], method, MEAN_DRAW, mel))
    return [r for i in range(n) for m in methods for r in out[(i, m)]]


def _sample_batch(method: str, denoiser, likelihood, forward, ys: np.ndarray | None,
                  mask: torch.Tensor, t_pad: int, keys: list[str], n_draws: int,
                  cfg: DecodeConfig, schedule: dict[str, Any], device: torch.device,
                  pseudo: tuple[np.ndarray, torch.Tensor] | None = None) -> PosteriorDraws:
    """K draws of one padded batch (B trials of T_pad frames) for one sampled method.

    All B * K draws go through the sampler in ONE call (item b * K + k is draw k of trial b,
    seeded by its own generator), or ``cfg.speed.draws_per_call`` draws of every trial per call
    (:func:`~ssip.sampling.posterior_draws`): the samplers treat items independently, so this
    equals K calls of B items up to float rounding, and a larger batch keeps the CPU's matrix
    kernels busier (about 1.5x faster per draw at 16).
    """
    from ssip.models.likelihood import make_residual

    B = len(keys)
    rule = {"zeta": cfg.zeta, "weight": cfg.weight, "inflation": cfg.inflation,
            "sigma_data": float(getattr(denoiser, "sigma_data", 0.5))}

    def sampler(shape_or_latents: tuple[int, ...], generators: list[torch.Generator]):
        k = len(generators) // B  # draws of each trial in this call, item b * k + j
        mask_k = mask.repeat_interleave(k, dim=0)
        residual = None
        if method != "prior":
            parts = []
            for ev in cfg.evidence:
                if ev == "encoding":
                    parts.append(make_residual(likelihood,
                                               torch.from_numpy(np.repeat(ys, k, axis=0)),
                                               mask_k, forward=forward))
                else:
                    zs, std = pseudo
                    parts.append(gaussian_measurement(
                        torch.from_numpy(np.repeat(zs, k, axis=0)).to(device), std.to(device),
                        mask_k))
            residual = (parts[0] if cfg.evidence_weights is None and len(parts) == 1
                        else stack_residuals(parts, cfg.weights()))
        try:
            # DPS differentiates through the frozen denoiser and likelihood: grad must be on.
            with torch.enable_grad():
                if cfg.sampler == "daps":
                    if residual is None:
                        return edm_sample(denoiser, shape_or_latents, generators,
                                          frame_mask=mask_k, **schedule)
                    w = float(cfg.weight)
                    return daps_sample(
                        denoiser, residual if w == 1.0 else stack_residuals([residual], [w]),
                        shape_or_latents, generators, num_levels=cfg.num_steps,
                        langevin_steps=cfg.daps_langevin_steps, step_scale=cfg.daps_step_scale,
                        sigma_min=cfg.sigma_min, sigma_max=cfg.sigma_max, rho=cfg.rho,
                        sigma_data=rule["sigma_data"], x0_estimate=cfg.daps_x0,
                        ode_steps=cfg.daps_ode_steps, frame_mask=mask_k, pad_value=MEL_FLOOR)
                if cfg.sampler == "edm":
                    guidance = None if residual is None else make_guidance(residual, xi=cfg.xi,
                                                                           **rule)
                    return edm_sample(denoiser, shape_or_latents, generators, guidance=guidance,
                                      frame_mask=mask_k, **schedule)
                if residual is None:
                    return ddpm_sample(denoiser, shape_or_latents, generators, frame_mask=mask_k,
                                       **schedule)
                return dps_ancestral(denoiser, residual, shape_or_latents, generators,
                                     frame_mask=mask_k, **rule, **schedule)
        except NonFiniteSampleError as e:
            bad = sorted({keys[b // k] for b in e.items if b // k < len(keys)})
            raise NonFiniteSampleError(f"method {method!r}, trials {bad}: {e}", e.step,
                                       e.items) from e

    generators = [[trial_generator(cfg.seed, key, d, device=device) for d in range(n_draws)]
                  for key in keys]
    return posterior_draws(sampler, generators, draws_per_call=cfg.speed.draws_per_call,
                           shape_or_latents=(B, 1, N_MELS, t_pad))


def _row(trial: Mapping[str, Any], method: str, draw: int, mel) -> dict[str, Any]:
    mel = mel.detach().cpu().numpy() if isinstance(mel, torch.Tensor) else np.asarray(mel)
    return {"subject": str(trial.get("subject", "")), "trial_id": str(trial["trial_id"]),
            "method": method, "draw": int(draw), "mel": np.ascontiguousarray(mel, np.float32)}


def baseline_predictions(trials: Sequence[Mapping[str, Any]], decoder) -> list[np.ndarray]:
    """Mels (80, T_i) float32 that a fitted baseline (``predict(neural (T, C))``) gives each trial."""
    mels = []
    for t in trials:
        x = np.asarray(t["neural"], dtype=np.float32)
        mel = np.asarray(decoder.predict(x), dtype=np.float32)
        if mel.shape != (N_MELS, x.shape[0]):
            raise ValueError(f"subject {t.get('subject')!r} trial {t.get('trial_id')!r}: "
                             f"{type(decoder).__name__} returned {mel.shape}, expected "
                             f"({N_MELS}, {x.shape[0]})")
        mels.append(mel)
    return mels


def baseline_rows(trials: Sequence[Mapping[str, Any]], decoder, method: str) -> list[dict]:
    """Decoded-table rows (draw = -1) of one baseline ``method`` ('linear' | 'nn')."""
    check_option("method", method, BASELINE_METHODS)
    return [_row(t, method, MEAN_DRAW, m)
            for t, m in zip(trials, baseline_predictions(trials, decoder), strict=True)]

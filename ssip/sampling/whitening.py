"""A noise model of the likelihood's residual that is correlated in time and across electrodes.

The likelihood of :mod:`ssip.models.likelihood` treats the residual r = y - A(x) (frames T x
electrodes C) as independent N(0, sigma_c^2) per element. Real residuals are not: high-gamma
features are smoothed over tens of ms (1/f, slow drifts) and electrodes share drifts. This module
models the residual of one trial as

    r_t - mu = sum_{j=1}^{m_t} a^(m_t)_{c,j} (r_{t-j} - mu) + s^(m_t)_c z_{t,c}   (electrode c),
    z_t ~ N(0, Sigma) iid over frames t,   Sigma = L L^T + diag(psi)   (C x C, rank k + diagonal),

i.e. a stationary AR(p) process per electrode (coefficients a_c = a^(p)_c, innovation std
s_c = s^(p)_c) whose standardised innovations z are correlated across electrodes by a
factor-analysis covariance. m_t = min(t, p) is the number of past frames the prediction uses
(counted from the start of the trial, or from the last masked frame): frames t < p of a run are
predicted from the partial-order (Levinson-Durbin) predictors a^(m) with their prediction-error
std s^(m), which is the exact stationary start of each electrode's AR(p) process (the Cholesky
factor of its Toeplitz covariance), so no frame is dropped. (Across electrodes the first p frames
of a run use the same Sigma as the rest: exact when electrodes share one AR filter, an
approximation on p frames otherwise. The model is still a proper Gaussian density: whitening is
exact for it and :meth:`NoiseModel.nll` is its exact negative log-density.)

Whitening (:meth:`NoiseModel.whiten`) inverts the model, differentiably:

    z_{t,c} = (r_{t,c} - mu_c - sum_j a^(m_t)_{c,j} (r_{t-j,c} - mu_c)) / s^(m_t)_c   (causal FIR)
    e_t = W z_t,   W = (I + M M^T)^{-1/2} diag(psi)^{-1/2},   M = diag(psi)^{-1/2} L,

with W^T W = Sigma^{-1} (Woodbury), so e ~ iid N(0, 1) per element when r follows the model.
(I + M M^T)^{-1/2} = I + U diag((1 + s_i^2)^{-1/2} - 1) U^T from the thin SVD M = U diag(s) V^T:
a closed form costing O(T C k) per trial, never a dense C x C inverse; and
log|Sigma| = sum log psi + sum log(1 + s_i^2). Padded (masked) frames are zeroed before the
filter, contribute nothing, and restart the AR prediction after them.

:func:`fit_noise_model` fits it on held-out residuals (a list of (T_i, C) trials): the AR part
by Yule-Walker on autocovariances pooled over trials (lagged products within each trial, never
across trial boundaries), the cross-electrode part by maximum-likelihood factor analysis of the
standardised innovations; diagonal loading of the autocovariance and a floor on psi keep the
whitening from amplifying any direction by more than the estimates can support.

Torch and numpy, plus scipy / scikit-learn inside the fit; nothing here imports Ray, touches
files or imports other ssip modules. :meth:`NoiseModel.to_tensors` /
:meth:`NoiseModel.from_tensors` give the plain tensors a safetensors checkpoint stores.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

#: Names of the tensors of a :class:`NoiseModel` (``to_tensors`` / ``from_tensors``).
TENSOR_NAMES = ("mean", "ar", "innov_std", "loadings", "psi")


# ---------------------------------------------------------------------------------------------
# Yule-Walker pieces (numpy, float64).


def pooled_autocovariance(
    residuals: Sequence[np.ndarray], max_lag: int, mean: np.ndarray | None = None
) -> np.ndarray:
    """Autocovariance per electrode pooled over trials, lags 0..max_lag.

    gamma_c(k) = sum_i sum_t (r_{i,t,c} - mu_c)(r_{i,t+k,c} - mu_c) / sum_i T_i: lagged products
    are taken within each trial only, and the sum is divided by the total frame count (the biased
    estimator). Each trial's zero-padded sequence has a positive semi-definite autocovariance, so
    the pooled one is too, and Yule-Walker on it always gives a stationary AR model.

    Parameters
    ----------
    residuals : sequence of ndarray, shape (T_i, C)
    max_lag : int
        p >= 0.
    mean : ndarray, shape (C,), optional
        Subtracted from every frame first (zeros if None).

    Returns
    -------
    ndarray, shape (max_lag + 1, C)
    """
    if max_lag < 0:
        raise ValueError(f"max_lag={max_lag} must be >= 0")
    n_el = residuals[0].shape[1]
    mu = np.zeros(n_el) if mean is None else np.asarray(mean, dtype=np.float64)
    acov = np.zeros((max_lag + 1, n_el))
    n_frames = 0
    for r in residuals:
        x = np.asarray(r, dtype=np.float64) - mu
        n_frames += x.shape[0]
        for k in range(min(max_lag, x.shape[0] - 1) + 1):
            acov[k] += np.einsum("tc,tc->c", x[k:], x[: x.shape[0] - k])
    return acov / max(n_frames, 1)


def levinson_durbin(acov: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """All-order linear predictors of a stationary process from its autocovariance.

    Parameters
    ----------
    acov : ndarray, shape (p + 1, C)
        gamma(0..p) per electrode, gamma(0) > 0, positive definite.

    Returns
    -------
    coefs : ndarray, shape (p + 1, C, p)
        coefs[m, c, :m] = a^(m)_c, the order-m Yule-Walker coefficients (best linear prediction
        of x_t from x_{t-1..t-m}: x_t ~ sum_j a_j x_{t-j}); zero beyond m.
    var : ndarray, shape (p + 1, C)
        Prediction-error variances v_m = v_{m-1} (1 - k_m^2), v_0 = gamma(0).
    """
    acov = np.asarray(acov, dtype=np.float64)
    p, n_el = acov.shape[0] - 1, acov.shape[1]
    coefs = np.zeros((p + 1, n_el, p))
    var = np.zeros((p + 1, n_el))
    var[0] = acov[0]
    for m in range(1, p + 1):
        prev = coefs[m - 1, :, : m - 1]  # (C, m-1)
        # k_m = (gamma_m - sum_{j<m} a_j gamma_{m-j}) / v_{m-1}
        k = (acov[m] - np.einsum("cj,jc->c", prev, acov[m - 1:0:-1])) / var[m - 1]
        coefs[m, :, : m - 1] = prev - k[:, None] * prev[:, ::-1]
        coefs[m, :, m - 1] = k
        var[m] = var[m - 1] * (1.0 - k * k)
    return coefs, var


def _step_down(ar: torch.Tensor, innov_var: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse Levinson recursion: the partial-order tables from the order-p model alone.

    a^(m-1)_j = (a^(m)_j + k_m a^(m)_{m-j}) / (1 - k_m^2), v_{m-1} = v_m / (1 - k_m^2), with
    k_m = a^(m)_m. Returns (coefs (p+1, C, p), var (p+1, C)) as :func:`levinson_durbin` does.
    Raises ValueError when some |k_m| >= 1 (the AR model is not stationary).
    """
    n_el, p = ar.shape
    coefs = torch.zeros((p + 1, n_el, p), dtype=torch.float64)
    var = torch.zeros((p + 1, n_el), dtype=torch.float64)
    coefs[p] = ar
    var[p] = innov_var
    for m in range(p, 0, -1):
        a = coefs[m, :, :m]
        k = a[:, m - 1]
        if bool((k.abs() >= 1.0).any()):
            bad = (k.abs() >= 1.0).nonzero().flatten().tolist()
            raise ValueError(f"AR coefficients of electrodes {bad} are not stationary "
                             f"(reflection coefficient |k_{m}| >= 1)")
        denom = (1.0 - k * k)[:, None]
        coefs[m - 1, :, : m - 1] = (a[:, : m - 1] + k[:, None] * a[:, : m - 1].flip(1)) / denom
        var[m - 1] = var[m] / denom[:, 0]
    return coefs, var


# ---------------------------------------------------------------------------------------------
# Low-rank + diagonal algebra (torch).


def woodbury_inverse(loadings: torch.Tensor, psi: torch.Tensor) -> torch.Tensor:
    """(L L^T + diag(psi))^{-1} = D^-1 - D^-1 L (I_k + L^T D^-1 L)^-1 L^T D^-1, dense (C, C)."""
    d_inv = 1.0 / psi
    dl = d_inv[:, None] * loadings  # (C, k)
    core = torch.eye(loadings.shape[1], dtype=psi.dtype, device=psi.device) + loadings.T @ dl
    return torch.diag(d_inv) - dl @ torch.linalg.solve(core, dl.T)


def _low_rank_root(loadings: torch.Tensor, psi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """U (C, k) and s (k) of the thin SVD of M = diag(psi)^{-1/2} L (zero singular values kept)."""
    m = loadings / psi.sqrt()[:, None]
    if m.shape[1] == 0:
        return m, torch.zeros(0, dtype=m.dtype)
    u, s, _ = torch.linalg.svd(m, full_matrices=False)
    return u, s


# ---------------------------------------------------------------------------------------------
# Masks.


def _real_frames(mask: torch.Tensor | None, batch: int, n_frames: int,
                 device: torch.device) -> torch.Tensor:
    """(B, T) bool, True on real frames; accepts None, (B, T) or the sampler's (B, T, 1)."""
    if mask is None:
        return torch.ones((batch, n_frames), dtype=torch.bool, device=device)
    if mask.ndim == 3 and mask.shape[2] == 1:
        mask = mask[..., 0]
    if mask.dtype != torch.bool or tuple(mask.shape) != (batch, n_frames):
        raise ValueError(f"mask must be bool of shape (B, T) = ({batch}, {n_frames}) or "
                         f"(B, T, 1), got {mask.dtype} {tuple(mask.shape)}")
    return mask.to(device)


def _shift(x: torch.Tensor, j: int) -> torch.Tensor:
    """x delayed by j frames along dim 1 (zeros in front): out[:, t] = x[:, t - j]."""
    if j == 0:
        return x
    pad = torch.zeros_like(x[:, :j])
    return torch.cat([pad, x[:, :-j]], dim=1) if j < x.shape[1] else torch.zeros_like(x)


def prediction_orders(real: torch.Tensor, order: int) -> torch.Tensor:
    """m_t = min(p, consecutive real frames just before t), (B, T) int64 (0 at a run's start)."""
    m = torch.zeros(real.shape, dtype=torch.long, device=real.device)
    ok = torch.ones_like(real)
    for j in range(1, order + 1):
        ok = ok & _shift(real, j)
        m = m + ok.long()
    return m


# ---------------------------------------------------------------------------------------------
# The model.


@dataclass
class NoiseModel:
    """AR(p) per electrode + low-rank-plus-diagonal innovation covariance (module docstring).

    Every field is a plain float64 tensor (safetensors-ready, :meth:`to_tensors`):

    mean : (C,)         mu, subtracted from the residual first.
    ar : (C, p)         a_c, order-p AR coefficients: r_t - mu ~ sum_j ar[c, j-1] (r_{t-j} - mu).
    innov_std : (C,)    s_c, std of the order-p prediction error (the AR innovation).
    loadings : (C, k)   L of Sigma = L L^T + diag(psi), the covariance of the standardised
                        innovations z = innovation / s (so diag(Sigma) ~ 1 when fitted).
    psi : (C,)          diagonal of Sigma, > 0.
    """

    mean: torch.Tensor
    ar: torch.Tensor
    innov_std: torch.Tensor
    loadings: torch.Tensor
    psi: torch.Tensor
    _cache: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        for name in TENSOR_NAMES:
            value = torch.as_tensor(getattr(self, name), dtype=torch.float64).detach().cpu()
            if not bool(torch.isfinite(value).all()):
                raise ValueError(f"NoiseModel.{name} has non-finite values")
            setattr(self, name, value.contiguous())
        if self.mean.ndim != 1 or self.ar.ndim != 2 or self.loadings.ndim != 2:
            raise ValueError("NoiseModel: mean must be (C,), ar (C, p) and loadings (C, k)")
        c = self.mean.shape[0]
        for name in TENSOR_NAMES:
            shape = tuple(getattr(self, name).shape)
            if shape[0] != c or len(shape) != (2 if name in ("ar", "loadings") else 1):
                raise ValueError(f"NoiseModel.{name} has shape {shape}, inconsistent with "
                                 f"C = {c} electrodes")
        if bool((self.innov_std <= 0).any()) or bool((self.psi <= 0).any()):
            raise ValueError("NoiseModel.innov_std and psi must be > 0")
        # Stationarity check (raises) and the tables of the partial-order predictors.
        coefs, var = _step_down(self.ar, self.innov_std**2)
        u, s = _low_rank_root(self.loadings, self.psi)
        self._cache["cpu64"] = {"coefs": coefs, "std": var.sqrt(), "u": u, "s": s}

    # -- shapes ---------------------------------------------------------------------------------

    @property
    def n_electrodes(self) -> int:
        return int(self.mean.shape[0])

    @property
    def order(self) -> int:
        """p, frames of AR memory."""
        return int(self.ar.shape[1])

    @property
    def rank(self) -> int:
        """k, shared factors of the innovations."""
        return int(self.loadings.shape[1])

    @classmethod
    def diagonal(cls, sigma: torch.Tensor | np.ndarray, mean=None) -> NoiseModel:
        """The current likelihood's model: independent N(0, sigma_c^2), no AR, no factors."""
        sigma = torch.as_tensor(sigma, dtype=torch.float64)
        c = sigma.shape[0]
        return cls(mean=torch.zeros(c) if mean is None else mean, ar=torch.zeros((c, 0)),
                   innov_std=sigma, loadings=torch.zeros((c, 0)), psi=torch.ones(c))

    # -- (de)serialisation ------------------------------------------------------------------------

    def to_tensors(self, prefix: str = "") -> dict[str, torch.Tensor]:
        """{prefix + name: tensor} of the five fields (float64, contiguous, CPU)."""
        return {prefix + name: getattr(self, name).clone() for name in TENSOR_NAMES}

    @classmethod
    def from_tensors(cls, tensors: Mapping[str, torch.Tensor], prefix: str = "") -> NoiseModel:
        missing = [prefix + n for n in TENSOR_NAMES if prefix + n not in tensors]
        if missing:
            raise KeyError(f"noise model tensors missing: {missing}")
        return cls(**{name: tensors[prefix + name] for name in TENSOR_NAMES})

    # -- parameters on the residual's device / dtype --------------------------------------------

    def _params(self, device: torch.device, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        key = (str(device), dtype)
        if key not in self._cache:
            base = self._cache["cpu64"]
            s = base["s"]
            params = {
                "mean": self.mean, "coefs": base["coefs"], "std": base["std"], "u": base["u"],
                "inv_sqrt_psi": self.psi.rsqrt(),
                # (I + M M^T)^{-1/2} = I + U diag(c) U^T and its inverse (for sample()).
                "c": (1.0 + s * s).rsqrt() - 1.0,
                "c_inv": (1.0 + s * s).sqrt() - 1.0,
                "sqrt_psi": self.psi.sqrt(),
            }
            self._cache[key] = {k: v.to(device=device, dtype=dtype) for k, v in params.items()}
        return self._cache[key]

    # -- whitening ------------------------------------------------------------------------------

    def innovations(self, r: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Temporal whitening: the standardised AR prediction errors z (B, T, C), 0 on padding.

        z_{t,c} = (x_{t,c} - sum_{j<=m_t} a^(m_t)_{c,j} x_{t-j,c}) / s^(m_t)_c with x = r - mu
        zeroed on masked frames (so non-finite padding cannot leak) and m_t from
        :func:`prediction_orders` (the AR prediction restarts after every masked frame).
        """
        b, t, _ = self._check(r)
        real = _real_frames(mask, b, t, r.device)
        prm = self._params(r.device, r.dtype)
        x = torch.where(real[..., None], r - prm["mean"], torch.zeros((), dtype=r.dtype,
                                                                      device=r.device))
        p = self.order
        lags = [_shift(x, j) for j in range(1, p + 1)]
        m_t = prediction_orders(real, p)[..., None]  # (B, T, 1)
        z = torch.zeros_like(x)
        for m in range(p + 1):
            pred = sum((lags[j] * prm["coefs"][m, :, j] for j in range(m)),
                       start=torch.zeros_like(x))
            z = torch.where(m_t == m, (x - pred) / prm["std"][m], z)
        return torch.where(real[..., None], z, torch.zeros((), dtype=r.dtype, device=r.device))

    def decorrelate(self, z: torch.Tensor) -> torch.Tensor:
        """Cross-electrode whitening e_t = W z_t, W = (I + M M^T)^{-1/2} diag(psi)^{-1/2}."""
        self._check(z)
        prm = self._params(z.device, z.dtype)
        e = z * prm["inv_sqrt_psi"]
        if self.rank:
            e = e + ((e @ prm["u"]) * prm["c"]) @ prm["u"].T
        return e

    def whiten(self, r: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """e (B, T, C), ~ iid N(0, 1) when r follows the model; exactly 0 on masked frames.

        Parameters
        ----------
        r : Tensor, shape (B, T, C)
            Residuals y - A(x) in the units the model was fitted in; differentiable.
        mask : bool Tensor, shape (B, T) or (B, T, 1), optional
            True on real frames; masked frames contribute nothing (whatever they hold).
        """
        return self.decorrelate(self.innovations(r, mask))

    def sq_norm(self, r: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """||e_b||^2 per trial, (B,): the Mahalanobis distance r^T Cov^-1 r of each trial."""
        return self.whiten(r, mask).square().sum(dim=(1, 2))

    def log_det(self, mask: torch.Tensor | None = None, *, batch: int | None = None,
                n_frames: int | None = None) -> torch.Tensor:
        """log|Cov(r_b)| per trial, (B,), over its real frames (independent of r's values).

        = n_b log|Sigma| + 2 sum_{real t} sum_c log s^(m_t)_c, with
        log|Sigma| = sum log psi + sum log(1 + s_i^2). Give ``mask`` or ``batch`` + ``n_frames``.
        """
        if mask is None:
            if batch is None or n_frames is None:
                raise ValueError("log_det needs a mask or batch and n_frames")
            real = torch.ones((batch, n_frames), dtype=torch.bool)
        else:
            real = mask[..., 0] if mask.ndim == 3 else mask
        device = real.device
        prm = self._params(device, torch.float64)
        m_t = prediction_orders(real, self.order)
        log_std = prm["std"].log()  # (p+1, C)
        per_frame = torch.where(real, log_std.sum(dim=1)[m_t], 0.0)
        n_real = real.sum(dim=1).to(torch.float64)
        return n_real * self.log_det_sigma() + 2.0 * per_frame.sum(dim=1)

    def log_det_sigma(self) -> torch.Tensor:
        """log|Sigma| = sum log psi + sum log(1 + s_i^2) (matrix determinant lemma)."""
        s = self._cache["cpu64"]["s"]
        return self.psi.log().sum() + torch.log1p(s * s).sum()

    def nll(self, r: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """-log p(r_b) per trial, (B,): (||e||^2 + log|Cov| + n C log 2 pi) / 2 on real frames."""
        b, t, c = self._check(r)
        real = _real_frames(mask, b, t, r.device)
        n_el = real.sum(dim=1).to(r.dtype) * c
        logdet = self.log_det(real).to(r)
        return 0.5 * (self.sq_norm(r, real) + logdet + n_el * math.log(2.0 * math.pi))

    # -- dense forms and sampling (tests, diagnostics) -----------------------------------------

    def covariance(self) -> torch.Tensor:
        """Sigma = L L^T + diag(psi), dense (C, C), of the standardised innovations."""
        return self.loadings @ self.loadings.T + torch.diag(self.psi)

    def precision(self) -> torch.Tensor:
        """Sigma^{-1} through Woodbury (:func:`woodbury_inverse`), dense (C, C)."""
        return woodbury_inverse(self.loadings, self.psi)

    def marginal_covariance(self) -> torch.Tensor:
        """Covariance of r_t across electrodes at one frame of the stationary process (C, C).

        diag(s^(0)) Sigma diag(s^(0)) with s^(0)_c the marginal std of electrode c (exact at a
        run's first frame; in the stationary regime exact when electrodes share one AR filter).
        """
        std0 = self._cache["cpu64"]["std"][0]
        return std0[:, None] * self.covariance() * std0[None, :]

    def sample(self, n_trials: int, n_frames: int, *,
               generator: torch.Generator | None = None,
               dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """Draws r (n_trials, n_frames, C) from the model (the inverse of :meth:`whiten`)."""
        e = torch.randn((n_trials, n_frames, self.n_electrodes), generator=generator,
                        dtype=torch.float64)
        return self.unwhiten(e).to(dtype)

    def unwhiten(self, e: torch.Tensor) -> torch.Tensor:
        """r with whiten(r) = e (no mask): z = W^{-1} e, then the AR recursion frame by frame."""
        _, t, _ = self._check(e)
        prm = self._params(e.device, e.dtype)
        z = e
        if self.rank:
            z = z + ((z @ prm["u"]) * prm["c_inv"]) @ prm["u"].T
        z = z * prm["sqrt_psi"]
        p = self.order
        x = torch.zeros_like(z)
        for step in range(t):
            m = min(step, p)
            pred = sum((prm["coefs"][m, :, j] * x[:, step - 1 - j] for j in range(m)),
                       start=torch.zeros_like(z[:, 0]))
            x[:, step] = pred + prm["std"][m] * z[:, step]
        return x + prm["mean"]

    def _check(self, r: torch.Tensor) -> tuple[int, int, int]:
        if r.ndim != 3 or r.shape[2] != self.n_electrodes:
            raise ValueError(f"expected a residual of shape (B, T, {self.n_electrodes}), "
                             f"got {tuple(r.shape)}")
        return int(r.shape[0]), int(r.shape[1]), int(r.shape[2])


# ---------------------------------------------------------------------------------------------
# Fitting.


def factor_analysis(cov: np.ndarray, rank: int, *, max_iter: int = 10000,
                    tol: float = 1e-10) -> tuple[np.ndarray, np.ndarray]:
    """Maximum-likelihood factor analysis of a covariance: cov ~ L L^T + diag(psi).

    Uses scikit-learn's :class:`~sklearn.decomposition.FactorAnalysis` (Barber's SVD-based ML
    iteration; a dependency of the project already, well tested, deterministic with
    ``svd_method="lapack"``). Its fit depends on the data only through their covariance, so it is
    given 2C surrogate rows +-sqrt(C) cov^{1/2} (mean 0, covariance exactly ``cov``) instead of
    all the frames: the cost is independent of the frame count. ``tol`` is on its log-likelihood
    of those 2C rows.

    Returns
    -------
    loadings : ndarray, shape (C, rank)
    psi : ndarray, shape (C,)
    """
    from sklearn.decomposition import FactorAnalysis
    from sklearn.exceptions import ConvergenceWarning

    cov = np.asarray(cov, dtype=np.float64)
    n_el = cov.shape[0]
    if rank == 0:
        return np.zeros((n_el, 0)), np.diag(cov).copy()
    w, v = np.linalg.eigh(0.5 * (cov + cov.T))
    root = (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T
    rows = math.sqrt(n_el) * np.concatenate([root, -root])
    fa = FactorAnalysis(n_components=rank, tol=tol, max_iter=max_iter, svd_method="lapack")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # psi is floored by the caller
        fa.fit(rows)
    return fa.components_.T.copy(), fa.noise_variance_.copy()


def fit_noise_model(
    residuals: Sequence[np.ndarray],
    order: int = 3,
    rank: int = 2,
    *,
    center: bool = True,
    ar_ridge: float = 1e-3,
    psi_floor: float = 0.1,
) -> NoiseModel:
    """Fit the noise model to held-out residuals y - A(x_true), one (T_i, C) array per trial.

    1. mu: the mean residual per electrode over all frames (``center``; else 0).
    2. AR(p) per electrode by Yule-Walker on :func:`pooled_autocovariance` (no lagged product
       crosses a trial boundary), with gamma(0) loaded by (1 + ``ar_ridge``): the same as
       assuming a white component of that relative variance, it bounds the innovation variance
       below by ~ar_ridge * gamma(0), hence the temporal whitening's gain by 1/sqrt(ar_ridge).
    3. z: the standardised order-p innovations of every trial (frames t >= p of each trial);
       their second-moment matrix S (C x C) pooled over trials.
    4. S ~ L L^T + diag(psi) by ML factor analysis of rank k (:func:`factor_analysis`), then
       psi floored at ``psi_floor`` x median(psi): no direction is whitened by more than
       1/sqrt(psi_floor) times the typical electrode's unique noise, however well the factors
       seem to explain an electrode on this finite sample.

    Parameters
    ----------
    residuals : sequence of ndarray, shape (T_i, C)
        Whole trials (lengths may differ), in the units the model will whiten.
    order : int
        p >= 0 frames of AR memory.
    rank : int
        k, 0 <= k < C, shared factors of the innovations (0: electrodes independent).
    """
    if not residuals:
        raise ValueError("fit_noise_model needs at least one residual trial")
    arrays = [np.asarray(r, dtype=np.float64) for r in residuals]
    n_el = arrays[0].shape[1]
    for i, r in enumerate(arrays):
        if r.ndim != 2 or r.shape[1] != n_el:
            raise ValueError(f"residual {i} has shape {r.shape}, expected (T, {n_el})")
        if not np.isfinite(r).all():
            raise ValueError(f"residual {i} has non-finite values")
    if order < 0 or not 0 <= rank < n_el:
        raise ValueError(f"need order >= 0 and 0 <= rank < C = {n_el}, got {order}, {rank}")
    if ar_ridge < 0 or not 0 <= psi_floor <= 1:
        raise ValueError(f"need ar_ridge >= 0 and 0 <= psi_floor <= 1, got {ar_ridge}, "
                         f"{psi_floor}")
    n_frames = sum(r.shape[0] for r in arrays)
    if n_frames == 0:
        raise ValueError("the residual trials have no frames")
    mean = sum(r.sum(axis=0) for r in arrays) / n_frames if center else np.zeros(n_el)

    acov = pooled_autocovariance(arrays, order, mean)
    live = acov[0] > 0
    typical = float(np.median(acov[0][live])) if live.any() else 1.0
    acov[:, ~live] = 0.0
    acov[0, ~live] = typical  # a constant electrode: white noise of the typical variance
    acov[0] *= 1.0 + ar_ridge
    coefs, var = levinson_durbin(acov)
    temporal = NoiseModel(mean=torch.from_numpy(mean), ar=torch.from_numpy(coefs[order]),
                          innov_std=torch.from_numpy(np.sqrt(var[order])),
                          loadings=torch.zeros((n_el, 0)), psi=torch.ones(n_el))

    second = np.zeros((n_el, n_el))
    n_innov = 0
    with torch.no_grad():
        for r in arrays:
            if r.shape[0] <= order:
                continue
            z = temporal.innovations(torch.from_numpy(r)[None])[0, order:].numpy()
            second += z.T @ z
            n_innov += z.shape[0]
    if n_innov == 0:
        raise ValueError(f"no trial is longer than order={order} frames")
    second /= n_innov

    loadings, psi = factor_analysis(second, rank)
    psi = np.maximum(psi, psi_floor * float(np.median(psi)))
    psi = np.maximum(psi, 1e-12)
    return dataclasses.replace(temporal, loadings=torch.from_numpy(loadings),
                               psi=torch.from_numpy(psi))

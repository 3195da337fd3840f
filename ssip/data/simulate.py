"""The embedded default corpus: real recorded speech, simulated intracranial responses to it.

Simulated subjects "speak" real prompts (asterisk or pocketsphinx recordings, see
:mod:`ssip.data.speech`); every prompt is spoken by exactly one subject. For each subject this
module renders a raw ECoG-like recording whose high-gamma power is driven by the speech through a
known encoding model, and :mod:`ssip.data.formats` writes it in the layouts of two public datasets
(iBIDS NWB of Verwoert et al. 2022, Flinker-lab HDF5 of Chen et al. 2024) and as plain BIDS-iEEG
(BrainVision, through MNE-BIDS), with the ground truth.

Timeline
--------
Each subject's prompts follow one another; each is preceded by a fixation gap of silence drawn
from U(gap_s_min, gap_s_max) and the last is followed by one more gap. Gaps and prompt starts are
rounded to whole 10 ms mel frames, so prompt ``i`` starts at mel frame ``start_i / 160`` and the
timeline's mel equals each prompt's own mel, placed end to end. The audio track is the
loudness-normalised speech (:func:`ssip.mel.normalize_loudness`, per prompt) with exact zeros in
the gaps; the neural recording starts and ends with the audio track.

Ground-truth encoding model, family spectral (per electrode ``e``; frames at 100 Hz)
------------------------------------------------------------------------------------
1. Mel above floor: ``m(f, t) = mel(f, t) - MEL_FLOOR`` where ``mel`` is
   ``ssip.mel.log_mel(normalize_loudness(audio))`` of each prompt and ``MEL_FLOOR`` in the gaps,
   so ``m`` is 0 in silence and about 1-2 in loud speech. Shape (80, T).
2. Spectral tuning ``w_e(f) ∝ exp(-(f - c_e)^2 / (2 s_e^2))`` over mel bins, ``c_e ~ U(0, 79)``,
   ``s_e ~ U(2, 12)`` bins, normalised to sum 1 (so ``w_e · m`` is a weighted mean of ``m``).
3. Temporal smoothing ``h_e(k) ∝ exp(-k^2 / (2 σ_e^2))``, ``σ_e ~ U(1, 3)`` frames,
   ``|k| <= 9``, sum 1: drive ``d_e(t) = Σ_k h_e(k) (w_e · m)(t - k)``.
4. Static nonlinearity, zero in silence: ``r_e(t) = g_e [sp(β_e (d_e - θ_e)) - sp(-β_e θ_e)] / β_e``
   with ``sp`` = softplus, slope ``β_e ~ U(3, 8)``, threshold ``θ_e ~ U(0.3, 0.9)`` and gain
   ``g_e = κ · exp(N(0, 0.35^2))``. ``r_e`` is linear in the drive well above threshold.
5. Lead: the neural envelope LEADS the audio (speech production): ``a_e(t) = r_e(t + L_e)``,
   ``L_e ~ U(lead_ms_min, lead_ms_max)``, a continuous shift evaluated with a PCHIP interpolant
   through the 100 Hz frames (monotone, so ``a_e >= 0``).
6. ``unresponsive_fraction`` of electrodes have zero weights and gain (``a_e ≡ 0``).

``κ`` (one per subject) sets the signal-to-noise ratio (step 8).

Raw rendering at ``sfreq`` (µV)
-------------------------------
7. ``x_e(n) = a_e(n / sfreq) · c_e(n) + b_e(n) + line_e(n)`` where the carrier ``c_e`` is Gaussian
   noise band-passed to 70-170 Hz (4th-order Butterworth, zero phase) at unit RMS; ``b_e`` is
   aperiodic 1/f^χ background, ``χ_e ~ U(1.5, 2.5)``, high-passed at 0.5 Hz like an amplifier,
   scaled so its 70-170 Hz band RMS is ``2 µV · exp(N(0, 0.2^2))``; ``line_e`` is mains at
   ``line_freq`` and its 2nd and 3rd harmonics (amplitudes ``A_e / h^2``, ``A_e ~ U(2, 10)`` µV,
   phases shared by all electrodes, as mains pick-up is common mode).
8. SNR: ``κ`` is chosen so that over the good responsive electrodes
   ``Σ_e mean_{t in words} a_e(t)^2 / Σ_e bandpower_e(b_e) = 10^(snr_db / 10)``: the speech-driven
   70-170 Hz power during spoken prompts over the background power in the same band. Line noise
   is excluded (high-gamma features notch its harmonics).
   With ``background`` set to a real recording (``pyneuromodulation``: the 19 s of real ECoG
   that PyPI py-neuromodulation 0.1.3 ships, or the path of any BIDS-iEEG recording), ``b_e`` is
   that recording's ECoG/sEEG instead: channel ``e mod C`` z-scored (its units are not trusted),
   resampled to ``sfreq``, extended to the subject's length by mirrored repetition (forward,
   backward, forward, ...: no jumps at the joins, the same spectrum) from an offset drawn per
   electrode, high-passed and scaled exactly as the simulated one, so the SNR definition holds.
   It keeps the real spectra and artefacts; the simulated mains component is then left out (the
   recording has its own) and the subject's ``line_freq`` is the recording's PowerLineFrequency,
   which the files declare.
9. ``bad_fraction`` of electrodes (disjoint from the unresponsive ones) are bad: flat (exactly 0)
   or wildly noisy (white noise of 2 mV RMS plus 10x line noise), marked bad in the
   files. Their ground-truth envelope is still stored (what the electrode would have seen).

Two brains: ``family``
----------------------
Everything above is ``family: spectral`` (the default; the decoder was developed on it). A
second brain, ``family: mixed``, differs IN KIND in what drives the electrodes, in how long they
lead, in how unequal they are and in the noise, so that a decoder tuned on one can be tested on
the other. It keeps steps 1, 6, 7 (per-electrode 1/f background, mains, carrier), 8 and 9 and the
timeline, and replaces the rest (frames at 100 Hz, ``m`` as in step 1):

M1. Features. Loudness ``E(t) = mean_f m(f, t)``; ``K_a = 6`` "articulatory-like" features
    ``z(t) = P m(t)``, ``P`` (6, 80) per subject, rows smooth random spectral contrasts (white
    noise over bins smoothed by a Gaussian of 6 bins, zero mean, unit norm): spectral SHAPE, not
    level. No Gaussian spectral tuning anywhere.
M2. Electrode kinds (responsive electrodes, drawn by permutation): ``onset_fraction`` are ONSET
    electrodes, of the rest one third follow the broadband ENVELOPE and two thirds are
    ARTICULATORY. Each has a causal temporal kernel ``h_e(k) ∝ exp(-k / τ_e)``, ``k = 0..9``
    frames, sum 1 (``temporal`` holds it at offsets -9..9, zero for the future), and
      - onset: ``L_e = [E - θ_e]_+`` with ``θ_e = q_e E95``, ``E95`` the 95th percentile of
        ``E`` over the subject's spoken frames and ``q_e ~ U(0.35, 0.6)`` (above the recording
        noise of a prompt, so the response starts with the voice), ``s_e = h_e * L_e``
        (``τ_e ~ U(0.5, 1.5)``), adaptation ``A_e(t) = (1 - α_e) A_e(t - 1) + α_e s_e(t - 1)`` with
        ``α_e = 1 - exp(-1 / τa_e)``, ``τa_e ~ U(10, 30)`` frames (100-300 ms), and
        ``u_e = [s_e - A_e]_+``: a transient at each onset after silence that decays within
        ``τa_e`` in sustained speech (a step of height ``H`` gives ``H (1 - α_e)^k`` ``k``
        frames after it); ``γ_e = 1``.
      - envelope: ``u_e = [h_e * E - θ_e]_+^γ_e``, ``θ_e = q_e E95``, ``q_e ~ U(0.25, 0.6)``,
        compressive ``γ_e ~ U(0.5, 1)``, ``τ_e ~ U(1, 4)``.
      - articulatory: ``y_e = h_e * (v_e · z)``, ``v_e ~ N(0, I / 6)``, ``u_e = [y_e - θ_e]_+^γ_e``
        with ``θ_e = q_e · rms(y_e)`` over the spoken frames, ``q_e ~ U(0, 0.5)``, expansive
        ``γ_e ~ U(1, 2)``, ``τ_e ~ U(1, 4)``: half-wave rectified, signed mixtures of spectral
        shape features.
    ``u_e`` is 0 in silence for every kind.
M3. Gains: ``r_e = g_e u_e / rms_e`` where ``rms_e`` is the RMS of ``u_e`` over the spoken
    frames and ``g_e = κ exp(N(0, gain_log_sd^2))``: electrodes differ by several dB of SNR
    (sd ``8.7 · gain_log_sd`` dB, 5.2 dB at the default 0.6), not only by their tuning.
    ``gain`` stores ``g_e / rms_e``.
M4. Leads ``L_e ~ U(lead_ms_min, lead_ms_max)`` with ``lead_ms_max`` 300 ms by default (200 ms
    for ``spectral``), applied as in step 5.
M5. Correlated noise. ``K_s = 3`` latent slow factors ``f_k(t)``: 1/f^2 noise, high-passed at
    0.5 Hz and low-passed at 2 Hz (2nd-order Butterworth, zero phase), unit RMS, one set per
    subject. They reach every good electrode twice:
      - raw drift ``D_e Σ_k λ_ek f_k(t)``, ``λ_ek ~ N(0, 1 / 3)`` (signed: a low-rank shared
        component), ``D_e = 30 µV · exp(N(0, 0.3^2))``;
      - a shared high-gamma state ``S_e Σ_k w_ek exp(0.4 f_k(t)) · c'_e(t)``: a slowly varying
        70-170 Hz amplitude common to all electrodes (``w_e ~ Dirichlet(1, 1, 1)``, non-negative,
        so the high-gamma envelopes of different electrodes co-vary positively even in silence)
        on an independent carrier ``c'_e`` drawn like ``c_e``; ``S_e`` makes its mean band power
        ``shared_noise_fraction · bandpower_e(b_e)``.
    The background of step 8 is then ``(1 + shared_noise_fraction) bandpower_e(b_e)``.
    Ground truth of the family (kinds, ``P``, ``v_e``, ``τa_e``, loadings, ``D_e``, ``S_e``,
    the factors at the 100 Hz frames) goes to ``ground_truth/sub-<label>_mixed.npz``
    (:func:`read_mixed_ground_truth`); the common ground-truth file keeps its keys, with
    ``spectral`` the effective linear weights (uniform 1/80 for onset and envelope electrodes,
    ``v_e P`` for articulatory ones), ``slope`` = ``γ_e`` and ``threshold`` = ``θ_e``.

Phrases (either family): with ``phrase_fraction > 0`` each trial starts, with that chance, a
phrase of 2-4 consecutive prompts separated by pauses of U(0.05, 0.15) s (whole frames, exact
zeros, ``MEL_FLOOR``) instead of fixation gaps. A phrase is ONE trial: ``utt_id`` is its prompts'
ids joined by ``+``, ``transcript`` their transcripts joined by a space, its extent from the
first prompt's start to the last prompt's end. The grouping has its own random stream and the
pauses take the places of the gaps' draws, so the electrodes of a subject do not change.
:mod:`ssip.data.leakage` (and so the default speech corpus's ``--exclude-from``) splits a phrase
id into its prompts (:func:`ssip.data.leakage.utterance_ids`), so none of them reaches the prior.

Randomness: one numpy Generator per (seed, subject) for the subject's draws and one per
(seed, subject, electrode) for that electrode's noise, so a build is deterministic for a config
and does not depend on how channels are processed (the mixed family's shared factors and the
phrase grouping have one stream per subject each).

The simulation functions here are pure (no file I/O); :func:`build_corpus` reads the speech,
simulates and calls the writers.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import scipy.interpolate
import scipy.ndimage
import scipy.signal

from ssip import mel as melmod
from ssip.config import ConfigError, check_option, check_range, config_hash, field, to_dict
from ssip.data.formats import START_CLOCK_S  # the clock of the files the simulator writes
from ssip.data.leakage import PHRASE_JOIN  # a phrase trial's utt_id joins its prompts' ids
from ssip.data.speech import Utterance, read_source

#: The SNR is defined in this band (Hz), the high-gamma band of the features.
HIGH_GAMMA_BAND = (70.0, 170.0)
#: 70-170 Hz RMS of the aperiodic background before per-electrode variation, µV.
BACKGROUND_BAND_RMS_UV = 2.0
#: Amplifier high-pass of the background, Hz (a 1/f^2 spectrum otherwise drifts without bound).
BACKGROUND_HIGHPASS_HZ = 0.5
#: RMS of a noisy bad channel, µV.
NOISY_CHANNEL_RMS_UV = 2000.0
#: Widest temporal kernel half-length in frames (3 sigma of the widest Gaussian).
_KERNEL_HALF = 9
#: Prompt and gap boundaries sit on whole mel frames.
_HOP = melmod.HOP_LENGTH
#: Entropy tags that keep the random streams apart (fixed-length seed lists avoid collisions).
_STREAM_DEAL, _STREAM_SUBJECT, _STREAM_ELECTRODE, _STREAM_SHARED, _STREAM_PHRASE = 0, 1, 2, 3, 4
#: Simulated brains (module docstring, "Two brains"); the first is the default.
FAMILIES = ["spectral", "mixed"]
#: Longest neural lead of each family when ``lead_ms_max`` is None, ms.
FAMILY_LEAD_MS_MAX = {"spectral": 200.0, "mixed": 300.0}
#: Pause between the prompts of a phrase, s (drawn uniformly, rounded to whole frames).
PHRASE_PAUSE_S = (0.05, 0.15)
#: Prompts per phrase (inclusive).
PHRASE_PROMPTS = (2, 4)
#: family mixed: articulatory-like features, shared slow factors, raw drift RMS (µV), and the
#: log-amplitude depth of the shared high-gamma state.
N_ARTICULATORY = 6
N_SHARED_FACTORS = 3
DRIFT_UV = 30.0
SHARED_LOWPASS_HZ = 2.0
SHARED_HG_DEPTH = 0.4
#: Electrode kinds of the mixed family ("none" = unresponsive).
MIXED_KINDS = ["onset", "envelope", "articulatory", "none"]


@dataclass
class CorpusConfig:
    """How the embedded simulated corpus is built (``ssip corpus build``)."""

    n_subjects: int = field(4, help="simulated subjects speaking `source`; every prompt is "
                                    "spoken by exactly one (extra_voices add more)")
    electrodes_min: int = field(32, help="fewest electrodes a subject can have")
    electrodes_max: int = field(128, help="most electrodes a subject can have (drawn uniformly)")
    snr_db: float = field(-6.0, help="speech-driven over background 70-170 Hz power, dB, "
                                     "over good responsive electrodes during speech")
    seed: int = field(0, help="seed of every random draw; same config + seed = same corpus")
    sfreq: float = field(1024.0, help="raw sampling rate, Hz (Verwoert et al.: 1024)")
    line_freq: float = field(50.0, help="mains frequency, Hz (50 Europe, 60 Americas)")
    unresponsive_fraction: float = field(0.25, help="share of electrodes not driven by speech")
    bad_fraction: float = field(0.05, help="share of electrodes that are bad (flat or noisy)")
    lead_ms_min: float = field(50.0, help="shortest neural lead over the audio, ms")
    lead_ms_max: float | None = field(None, help="longest neural lead over the audio, ms; None = "
                                                 "the family's (spectral 200, mixed 300)")
    gap_s_min: float = field(1.0, help="shortest fixation gap before each prompt, s")
    gap_s_max: float = field(1.5, help="longest fixation gap before each prompt, s")
    source: str = field("asterisk", help="speech: asterisk (553 prompts, 24 min, one speaker) "
                                         "| pocketsphinx (12 prompts, 40 s)")
    max_utterances: int | None = field(None, help="use only the first N prompts in id order "
                                                  "(None = all)")
    extra_voices: list[str] = field(
        default_factory=lambda: ["asterisk-fr"],
        help="one more subject per Debian voice, speaking that voice's prompts; the default "
             "prior corpus never hears asterisk-fr (June): the cross-speaker subject")
    extra_voice_utterances: int = field(138, help="prompts each extra-voice subject speaks "
                                                  "(drawn by seed; 138 = 553 / 4)")
    formats: list[str] = field(default_factory=lambda: ["nwb", "flinker"],
                               help="layouts to write: nwb (iBIDS), flinker (HDF5), brainvision "
                                    "(BIDS-iEEG through MNE-BIDS, in bids-brainvision/)")
    bids_audio: str = field("file", help="brainvision layout: speech as one WAV per run beside the "
                                         "recording (file) or one per prompt under stimuli/ named "
                                         "by events.tsv's stim_file column (stim_file)")
    n_tasks: int = field(5, help="contiguous task blocks per subject")
    flinker_test_per_task: int = field(10, help="flinker layout: the last N trials of each task "
                                                "are the test rows (written last; TestNum_cum)")
    background: str = field("simulated", help="background activity: simulated (1/f^chi noise) | "
                                              "pyneuromodulation (its 19 s of real ECoG; pip "
                                              "install --no-deps py-neuromodulation==0.1.3) | the "
                                              "path of a BIDS-iEEG recording (.vhdr/.edf/...)")
    family: str = field("spectral", help="simulated brain: spectral (Gaussian spectral tuning, "
                                         "independent noise) | mixed (onset, envelope and "
                                         "articulatory-like electrodes, log-normal gains, leads "
                                         "to 300 ms, noise shared across electrodes); see the "
                                         "ssip.data.simulate docstring")
    phrase_fraction: float = field(0.0, help="chance that a trial is a phrase of 2-4 consecutive "
                                             "prompts with 50-150 ms pauses (utt_ids joined by "
                                             "'+'); 0 = one prompt per trial")
    onset_fraction: float = field(0.3, help="family mixed: share of the responsive electrodes "
                                            "that respond to speech onsets")
    shared_noise_fraction: float = field(0.5, help="family mixed: 70-170 Hz power of the shared "
                                                   "slow high-gamma state over each electrode's "
                                                   "own background power")
    gain_log_sd: float = field(0.6, help="family mixed: sd of the electrodes' log gains (natural "
                                         "log; 0.6 = 5.2 dB of SNR spread)")

    @property
    def lead_ms_upper(self) -> float:
        """Longest lead in force, ms: ``lead_ms_max``, else the family's default."""
        if self.lead_ms_max is not None:
            return float(self.lead_ms_max)
        return FAMILY_LEAD_MS_MAX.get(self.family, FAMILY_LEAD_MS_MAX["spectral"])

    def __post_init__(self) -> None:
        check_range("n_subjects", self.n_subjects, 1, 1000)
        check_range("electrodes_min", self.electrodes_min, 1, 4096)
        check_range("electrodes_max", self.electrodes_max, self.electrodes_min, 4096)
        if not math.isfinite(self.snr_db):
            raise ConfigError(f"snr_db={self.snr_db!r} must be a finite number of dB")
        check_range("snr_db", self.snr_db, -60.0, 60.0)
        check_range("seed", self.seed, 0, 2**63 - 1)
        # The 70-170 Hz carrier and the features' filters need Nyquist well above 170 Hz.
        check_range("sfreq", self.sfreq, 2.2 * HIGH_GAMMA_BAND[1], 100_000.0)
        check_range("line_freq", self.line_freq, 1.0, 1000.0)
        check_range("unresponsive_fraction", self.unresponsive_fraction, 0.0, 1.0)
        check_range("bad_fraction", self.bad_fraction, 0.0, 1.0)
        if self.unresponsive_fraction + self.bad_fraction > 1.0:
            raise ConfigError(
                f"unresponsive_fraction + bad_fraction = "
                f"{self.unresponsive_fraction + self.bad_fraction} exceeds 1; lower one of them"
            )
        check_range("lead_ms_min", self.lead_ms_min, 0.0, 1000.0)
        check_option("family", self.family, FAMILIES)
        check_range("lead_ms_max", self.lead_ms_upper, self.lead_ms_min, 1000.0)
        check_range("gap_s_min", self.gap_s_min, 0.1, 60.0)
        check_range("gap_s_max", self.gap_s_max, self.gap_s_min, 60.0)
        from ssip.data.speech import SPEECH_SOURCES

        check_option("source", self.source, SPEECH_SOURCES)
        for i, v in enumerate(self.extra_voices):
            check_option(f"extra_voices[{i}]", v, [s for s in SPEECH_SOURCES if s.startswith("asterisk-")])
        check_range("extra_voice_utterances", self.extra_voice_utterances, 1, None)
        if self.max_utterances is not None:
            check_range("max_utterances", self.max_utterances, 1, None)
        if not self.formats:
            raise ConfigError("formats is empty; choose one or more of ['nwb', 'flinker', 'brainvision']")
        for i, fmt in enumerate(self.formats):
            check_option(f"formats[{i}]", fmt, ["nwb", "flinker", "brainvision"])
        check_option("bids_audio", self.bids_audio, ["file", "stim_file"])
        check_range("n_tasks", self.n_tasks, 1, 1000)
        check_range("flinker_test_per_task", self.flinker_test_per_task, 0, 100000)
        check_range("phrase_fraction", self.phrase_fraction, 0.0, 1.0)
        check_range("onset_fraction", self.onset_fraction, 0.0, 1.0)
        check_range("shared_noise_fraction", self.shared_noise_fraction, 0.0, 100.0)
        check_range("gain_log_sd", self.gain_log_sd, 0.0, 3.0)
        if self.background not in ("simulated", "pyneuromodulation") and not Path(self.background).exists():
            raise ConfigError(f"background={self.background!r}: choose simulated, pyneuromodulation "
                              "or the path of an existing BIDS-iEEG recording")


@dataclass
class EncodingModel:
    """Ground-truth encoding model of one subject (module docstring, steps 1-6).

    Attributes
    ----------
    spectral : ndarray, shape (n_electrodes, 80)
        Spectral tuning ``w_e`` over mel bins (rows sum to 1; zero rows = unresponsive).
    temporal : ndarray, shape (n_electrodes, 2 * 9 + 1)
        Temporal kernel ``h_e`` over frame offsets -9..9 (rows sum to 1).
    lead_s : ndarray, shape (n_electrodes,)
        Neural lead ``L_e`` over the audio, s.
    slope, threshold : ndarray, shape (n_electrodes,)
        ``β_e`` and ``θ_e`` of the softplus nonlinearity (threshold in mel-above-floor units).
    gain : ndarray, shape (n_electrodes,)
        ``g_e`` in µV (includes the subject's SNR scale ``κ``); 0 for unresponsive electrodes.
    """

    spectral: np.ndarray
    temporal: np.ndarray
    lead_s: np.ndarray
    slope: np.ndarray
    threshold: np.ndarray
    gain: np.ndarray

    @property
    def n_electrodes(self) -> int:
        return int(self.spectral.shape[0])

    def response(self, mel: np.ndarray) -> np.ndarray:
        """Envelope ``r_e`` at audio time (steps 1-4, before the lead).

        Parameters
        ----------
        mel : ndarray, shape (80, n_frames)
            ssip log-mel at 100 frames/s (``MEL_FLOOR`` in silence).

        Returns
        -------
        ndarray, shape (n_frames, n_electrodes), float64, µV, >= 0.
        """
        m = np.asarray(mel, dtype=np.float64) - melmod.MEL_FLOOR  # (80, T), 0 in silence
        proj = self.spectral @ m  # (C, T)
        drive = np.stack([np.convolve(p, h, mode="same") for p, h in zip(proj, self.temporal)])
        beta, theta = self.slope[:, None], self.threshold[:, None]
        resp = (_softplus(beta * (drive - theta)) - _softplus(-beta * theta)) / beta
        return (self.gain[:, None] * resp).T

    def envelope(self, mel: np.ndarray, times: np.ndarray | None = None) -> np.ndarray:
        """Neural high-gamma envelope ``a_e(t) = r_e(t + L_e)`` (steps 1-5).

        Parameters
        ----------
        mel : ndarray, shape (80, n_frames)
        times : ndarray, shape (n_times,), optional
            Neural times in s; default the frame times ``k / 100``.

        Returns
        -------
        ndarray, shape (n_times, n_electrodes), float64, µV.
        """
        resp = self.response(mel)  # (T, C)
        if times is None:
            times = np.arange(resp.shape[0]) / melmod.FRAME_RATE
        out = np.empty((len(times), self.n_electrodes))
        for e in range(self.n_electrodes):
            out[:, e] = shifted_envelope(resp[:, e], times, self.lead_s[e])
        return out


@dataclass
class MixedEncodingModel(EncodingModel):
    """Ground-truth encoding model of one subject of ``family: mixed`` (module docstring, M1-M4).

    The inherited fields keep their shapes with these meanings: ``spectral`` the effective
    linear weights over mel bins (1/80 for onset and envelope electrodes, ``v_e P`` for
    articulatory ones, 0 for unresponsive ones; informative only, :meth:`response` does not use
    it); ``temporal`` the causal kernel ``h_e`` at offsets -9..9 (zero for negative offsets);
    ``slope`` the exponent ``γ_e``; ``threshold`` ``θ_e``; ``gain`` ``g_e / rms_e`` (µV per unit
    of ``u_e``, with ``κ``).

    Attributes
    ----------
    kind : ndarray, shape (n_electrodes,), str
        ``onset``, ``envelope``, ``articulatory`` or ``none`` (unresponsive).
    projection : ndarray, shape (6, 80)
        ``P``: the subject's articulatory-like features ``z = P m``.
    weights : ndarray, shape (n_electrodes, 6)
        ``v_e`` (zero rows except for articulatory electrodes).
    adapt_tau : ndarray, shape (n_electrodes,)
        Adaptation time constant ``τa_e`` of onset electrodes, frames (0 for the others).
    """

    kind: np.ndarray
    projection: np.ndarray
    weights: np.ndarray
    adapt_tau: np.ndarray

    def drive(self, mel: np.ndarray) -> np.ndarray:
        """``u_e`` before the gain (steps M1-M2), shape (n_frames, n_electrodes), >= 0."""
        m = np.asarray(mel, dtype=np.float64) - melmod.MEL_FLOOR  # (80, T), 0 in silence
        loud = m.mean(axis=0)
        feats = self.projection @ m  # (6, T)
        out = np.zeros((m.shape[1], self.n_electrodes))
        for e, kind in enumerate(self.kind):
            if kind == "none":
                continue
            h, theta, gamma = self.temporal[e], self.threshold[e], self.slope[e]
            if kind == "onset":
                s = np.convolve(np.maximum(loud - theta, 0.0), h, mode="same")
                alpha = 1.0 - math.exp(-1.0 / self.adapt_tau[e])
                adapted = scipy.signal.lfilter([0.0, alpha], [1.0, alpha - 1.0], s)
                u = np.maximum(s - adapted, 0.0)
            else:
                x = loud if kind == "envelope" else self.weights[e] @ feats
                u = np.maximum(np.convolve(x, h, mode="same") - theta, 0.0)
            out[:, e] = u**gamma
        return out

    def response(self, mel: np.ndarray) -> np.ndarray:
        """Envelope ``r_e = gain_e u_e`` at audio time (M1-M3, before the lead), (T, C), µV."""
        return self.drive(mel) * self.gain[None, :]


def _softplus(x: np.ndarray) -> np.ndarray:
    return np.logaddexp(0.0, x)


def shifted_envelope(resp: np.ndarray, times: np.ndarray, lead: float) -> np.ndarray:
    """``r(t + lead)`` of one electrode by PCHIP through its 100 Hz frames; 0 past either end.

    Parameters
    ----------
    resp : ndarray, shape (n_frames,)
        ``r_e`` at frame times ``k / 100`` s.
    times : ndarray, shape (n_times,)
        Neural times in s.
    lead : float
        Lead in s.

    Returns
    -------
    ndarray, shape (n_times,), float64, >= 0.
    """
    t = np.asarray(times, dtype=np.float64) + lead
    last = (len(resp) - 1) / melmod.FRAME_RATE
    inside = (t >= 0) & (t <= last)
    out = np.zeros(len(t))
    if inside.any() and np.any(resp):
        knots = np.arange(len(resp)) / melmod.FRAME_RATE
        out[inside] = scipy.interpolate.PchipInterpolator(knots, resp)(t[inside])
    return np.maximum(out, 0.0)  # PCHIP does not overshoot the data; clip rounding only


@dataclass
class Trial:
    """One spoken prompt in a subject's timeline (times in s from the recording start)."""

    utt_id: str
    transcript: str
    onset_s: float
    duration_s: float
    task: int
    speaker: str


@dataclass
class SharedNoise:
    """The correlated noise of ``family: mixed`` (module docstring, M5).

    Attributes
    ----------
    factors : ndarray, shape (n_frames, 3)
        The latent slow factors ``f_k`` at the 100 Hz frame times (unit RMS at the raw rate).
    drift_loadings : ndarray, shape (n_electrodes, 3)
        ``λ_ek`` of the raw drift (signed).
    drift_uv : ndarray, shape (n_electrodes,)
        ``D_e``, µV.
    hg_loadings : ndarray, shape (n_electrodes, 3)
        ``w_ek`` of the shared high-gamma state (non-negative, rows sum to 1).
    hg_scale : ndarray, shape (n_electrodes,)
        ``S_e``, µV.
    """

    factors: np.ndarray
    drift_loadings: np.ndarray
    drift_uv: np.ndarray
    hg_loadings: np.ndarray
    hg_scale: np.ndarray


@dataclass
class SimulatedSubject:
    """Everything simulated for one subject; what the writers put on disk.

    Attributes
    ----------
    subject : str
        BIDS label, e.g. ``"sim01"``.
    raw : ndarray, shape (n_samples, n_electrodes), float32
        Raw recording in µV at ``sfreq``.
    audio : ndarray, shape (n_audio,), float32
        16 kHz audio track (loudness-normalised prompts, zeros between), same start as ``raw``.
    mel : ndarray, shape (80, n_frames), float32
        Ground-truth ssip mel of the audio track, 100 frames/s.
    envelope : ndarray, shape (n_frames, n_electrodes), float32
        True speech-driven high-gamma amplitude ``a_e`` at neural frame times, µV.
    model : EncodingModel
        A :class:`MixedEncodingModel` for ``family == "mixed"``.
    family : str
        ``CorpusConfig.family`` of the subject.
    shared : SharedNoise or None
        The correlated noise of ``family: mixed`` (None for ``spectral``).
    """

    subject: str
    index: int
    sfreq: float
    line_freq: float
    raw: np.ndarray
    audio: np.ndarray
    mel: np.ndarray
    envelope: np.ndarray
    model: EncodingModel
    channel_names: list[str]
    unresponsive: np.ndarray
    bad: np.ndarray
    bad_kind: list[str]
    background_band_rms: np.ndarray
    aperiodic_exponent: np.ndarray
    line_amplitude: np.ndarray
    scale: float
    snr_db: float
    trials: list[Trial]
    n_tasks: int
    family: str = "spectral"
    shared: SharedNoise | None = None

    @property
    def duration_s(self) -> float:
        return self.raw.shape[0] / self.sfreq

    @property
    def good(self) -> np.ndarray:
        return ~self.bad


def deal_utterances(utterances: list[Utterance], n_subjects: int, seed: int) -> list[list[Utterance]]:
    """Deal prompts to subjects: each prompt goes to exactly one subject.

    The id-sorted prompts are shuffled by ``seed`` and dealt round-robin, so subject sizes differ
    by at most one and each subject's order is the shuffled order.
    """
    ordered = sorted(utterances, key=lambda u: u.utt_id)
    ids = [u.utt_id for u in ordered]
    if len(set(ids)) != len(ids):
        dup = sorted({i for i in ids if ids.count(i) > 1})
        raise ValueError(f"utterance ids must be unique; repeated: {dup[:5]}")
    if len(ordered) < n_subjects:
        raise ConfigError(
            f"{len(ordered)} utterance(s) cannot be dealt to n_subjects={n_subjects}; "
            "raise max_utterances or lower n_subjects"
        )
    rng = np.random.default_rng([seed, _STREAM_DEAL, 0, 0])
    order = rng.permutation(len(ordered))
    return [[ordered[i] for i in order[s::n_subjects]] for s in range(n_subjects)]


def group_phrases(utterances: list[Utterance], cfg: CorpusConfig, index: int) -> list[list[Utterance]]:
    """Group a subject's prompts (in spoken order) into trials: single prompts, and with
    ``cfg.phrase_fraction > 0`` phrases of 2-4 consecutive prompts (module docstring, Phrases).

    Each trial starts a phrase with chance ``phrase_fraction`` (when 2 or more prompts remain);
    its own random stream, so the grouping does not move any other draw. Returns the groups in
    spoken order; with ``phrase_fraction == 0`` every prompt is its own group.
    """
    if cfg.phrase_fraction <= 0:
        return [[u] for u in utterances]
    rng = np.random.default_rng([cfg.seed, _STREAM_PHRASE, index, 0])
    groups, i = [], 0
    while i < len(utterances):
        k = 1
        if len(utterances) - i >= 2 and rng.random() < cfg.phrase_fraction:
            k = min(int(rng.integers(PHRASE_PROMPTS[0], PHRASE_PROMPTS[1] + 1)), len(utterances) - i)
        groups.append(utterances[i: i + k])
        i += k
    return groups


def _layout(utts: list[Utterance], rng: np.random.Generator, cfg: CorpusConfig,
            in_phrase: list[bool] | None = None):
    """Prompt start samples (16 kHz, on mel frames) and the total length of the audio track.

    ``in_phrase[i]`` True: prompt ``i`` continues a phrase, so the silence before it is a
    phrase pause (``PHRASE_PAUSE_S``) rather than a fixation gap; one uniform draw either way.
    """
    starts, pos = [], 0
    for i, u in enumerate(utts):
        lo, hi = PHRASE_PAUSE_S if in_phrase and in_phrase[i] else (cfg.gap_s_min, cfg.gap_s_max)
        pos += _HOP * int(round(rng.uniform(lo, hi) * melmod.FRAME_RATE))
        starts.append(pos)
        pos += _HOP * math.ceil(len(u.audio) / _HOP)
    pos += _HOP * int(round(rng.uniform(cfg.gap_s_min, cfg.gap_s_max) * melmod.FRAME_RATE))
    # Round the track to 0.25 s so that common raw rates (1024, 1000, 512, 2048 Hz) give a whole
    # number of raw samples for the same duration.
    quantum = melmod.SAMPLE_RATE // 4
    return starts, quantum * math.ceil(pos / quantum)


def _draw_model(n: int, unresponsive: np.ndarray, rng: np.random.Generator,
                cfg: CorpusConfig) -> EncodingModel:
    """Random encoding-model parameters (module docstring, steps 2-6), gain before ``κ``."""
    bins = np.arange(melmod.N_MELS)
    centre = rng.uniform(0, melmod.N_MELS - 1, n)
    width = rng.uniform(2.0, 12.0, n)
    spectral = np.exp(-0.5 * ((bins[None, :] - centre[:, None]) / width[:, None]) ** 2)
    spectral /= spectral.sum(axis=1, keepdims=True)
    sigma_t = rng.uniform(1.0, 3.0, n)
    k = np.arange(-_KERNEL_HALF, _KERNEL_HALF + 1)
    temporal = np.exp(-0.5 * (k[None, :] / sigma_t[:, None]) ** 2)
    temporal /= temporal.sum(axis=1, keepdims=True)
    lead_s = rng.uniform(cfg.lead_ms_min, cfg.lead_ms_upper, n) / 1000.0
    slope = rng.uniform(3.0, 8.0, n)
    threshold = rng.uniform(0.3, 0.9, n)
    gain = np.exp(rng.normal(0.0, 0.35, n))
    spectral[unresponsive] = 0.0
    gain[unresponsive] = 0.0
    return EncodingModel(spectral, temporal, lead_s, slope, threshold, gain)


def _causal_kernels(tau: np.ndarray) -> np.ndarray:
    """``h(k) ∝ exp(-k / τ)`` for ``k = 0..9`` at offsets -9..9 (zero before 0), rows sum 1."""
    k = np.arange(_KERNEL_HALF + 1)
    out = np.zeros((len(tau), 2 * _KERNEL_HALF + 1))
    out[:, _KERNEL_HALF:] = np.exp(-k[None, :] / tau[:, None])
    return out / out.sum(axis=1, keepdims=True)


def _draw_mixed_model(n: int, unresponsive: np.ndarray, rng: np.random.Generator,
                      cfg: CorpusConfig, mel: np.ndarray, speech: np.ndarray) -> MixedEncodingModel:
    """Random ``family: mixed`` model (module docstring, M1-M4), gain before ``κ``.

    ``mel`` (80, T) is the subject's timeline and ``speech`` (T,) its spoken frames, on which the
    relative thresholds and the unit-RMS normalisation of M3 are computed.
    """
    resp = np.flatnonzero(~unresponsive)
    order = resp[rng.permutation(len(resp))]
    n_onset = int(round(cfg.onset_fraction * len(resp)))
    n_env = int(round((len(resp) - n_onset) / 3))
    kind = np.full(n, "none", dtype="U12")
    kind[order[:n_onset]] = "onset"
    kind[order[n_onset: n_onset + n_env]] = "envelope"
    kind[order[n_onset + n_env:]] = "articulatory"
    onset, env, art = kind == "onset", kind == "envelope", kind == "articulatory"

    proj = scipy.ndimage.gaussian_filter1d(rng.standard_normal((N_ARTICULATORY, melmod.N_MELS)),
                                           6.0, axis=1)
    proj -= proj.mean(axis=1, keepdims=True)
    proj /= np.linalg.norm(proj, axis=1, keepdims=True)
    weights = rng.normal(0.0, math.sqrt(1.0 / N_ARTICULATORY), (n, N_ARTICULATORY))
    tau = np.where(onset, rng.uniform(0.5, 1.5, n), rng.uniform(1.0, 4.0, n))
    q = np.where(onset, rng.uniform(0.35, 0.6, n),
                 np.where(env, rng.uniform(0.25, 0.6, n), rng.uniform(0.0, 0.5, n)))
    gamma = np.where(env, rng.uniform(0.5, 1.0, n), np.where(art, rng.uniform(1.0, 2.0, n), 1.0))
    adapt_tau = np.where(onset, rng.uniform(10.0, 30.0, n), 0.0)
    lead_s = rng.uniform(cfg.lead_ms_min, cfg.lead_ms_upper, n) / 1000.0
    log_gain = rng.normal(0.0, cfg.gain_log_sd, n)

    temporal = _causal_kernels(tau)
    weights[~art] = 0.0
    spectral = np.zeros((n, melmod.N_MELS))
    spectral[onset | env] = 1.0 / melmod.N_MELS
    spectral[art] = weights[art] @ proj
    gamma[unresponsive] = 0.0
    # Thresholds relative to the subject's speech: loudness percentile, drive RMS (M2).
    m = np.asarray(mel, dtype=np.float64) - melmod.MEL_FLOOR
    loud95 = float(np.percentile(m.mean(axis=0)[speech], 95)) if speech.any() else 1.0
    threshold = q * loud95
    feats = proj @ m
    for e in np.flatnonzero(art):
        y = np.convolve(weights[e] @ feats, temporal[e], mode="same")[speech]
        threshold[e] = q[e] * math.sqrt(float(np.mean(y**2))) if y.size else 0.0
    threshold[unresponsive] = 0.0
    model = MixedEncodingModel(spectral, temporal, lead_s, gamma, threshold, np.ones(n),
                               kind=kind, projection=proj, weights=weights, adapt_tau=adapt_tau)
    drive = model.drive(mel)[speech]
    rms = np.sqrt(np.mean(drive**2, axis=0)) if drive.size else np.zeros(n)
    model.gain = np.where(rms > 0, np.exp(log_gain) / np.where(rms > 0, rms, 1.0), 0.0)
    return model


def _shared_noise(rng: np.random.Generator, n_raw: int, n_frames: int, n_el: int,
                  sfreq: float, bg_rms: np.ndarray, fraction: float) -> tuple[SharedNoise, np.ndarray]:
    """The shared slow factors and loadings of M5; also the raw-rate factors (n_raw, 3)."""
    from neurodsp.sim.utils import rotate_timeseries

    k = N_SHARED_FACTORS
    sos = np.concatenate([
        scipy.signal.butter(2, BACKGROUND_HIGHPASS_HZ, "highpass", fs=sfreq, output="sos"),
        scipy.signal.butter(2, SHARED_LOWPASS_HZ, "lowpass", fs=sfreq, output="sos")])
    factors = np.empty((n_raw, k))
    for j in range(k):
        f = scipy.signal.sosfiltfilt(sos, rotate_timeseries(rng.standard_normal(n_raw), sfreq, 2.0))
        factors[:, j] = f / math.sqrt(float(np.mean(f**2)))
    drift_loadings = rng.normal(0.0, math.sqrt(1.0 / k), (n_el, k))
    drift_uv = DRIFT_UV * np.exp(rng.normal(0.0, 0.3, n_el))
    hg_loadings = rng.dirichlet(np.ones(k), n_el)
    state = np.exp(SHARED_HG_DEPTH * factors)  # (n_raw, 3), > 0; electrode e's is state @ w_e
    mean_sq = np.array([np.mean((state @ w) ** 2) for w in hg_loadings])  # no (n_raw, C) array
    hg_scale = math.sqrt(fraction) * bg_rms / np.sqrt(mean_sq)
    at_frames = np.minimum(np.rint(np.arange(n_frames) / melmod.FRAME_RATE * sfreq).astype(int),
                           n_raw - 1)
    return SharedNoise(factors[at_frames].astype(np.float32), drift_loadings, drift_uv,
                       hg_loadings, hg_scale), factors


def _band_power(x: np.ndarray, sfreq: float, band: tuple[float, float]) -> float:
    """Mean power of ``x`` (n_samples,) in ``band`` from its periodogram (Parseval)."""
    spec = np.fft.rfft(x)
    freqs = np.fft.rfftfreq(len(x), 1.0 / sfreq)
    sel = (freqs >= band[0]) & (freqs <= band[1])
    return float(2.0 * np.sum(np.abs(spec[sel]) ** 2) / len(x) ** 2)


def _background(rng: np.random.Generator, n: int, sfreq: float, chi: float,
                band_rms: float) -> np.ndarray:
    """Aperiodic noise with power ∝ 1/f^chi, high-passed, ``band_rms`` µV RMS in 70-170 Hz."""
    # neurodsp's sim_powerlaw draws from numpy's global RNG, which would make the corpus depend
    # on what else ran in the process; feed the same spectral rotation (Timmer & Koenig 1995,
    # neurodsp.sim.utils.rotate_timeseries) white noise from this electrode's own Generator.
    from neurodsp.sim.utils import rotate_timeseries

    sig = rotate_timeseries(rng.standard_normal(n), sfreq, chi)  # chi > 0 steepens
    sos = scipy.signal.butter(2, BACKGROUND_HIGHPASS_HZ, "highpass", fs=sfreq, output="sos")
    sig = scipy.signal.sosfiltfilt(sos, sig)
    return sig * (band_rms / math.sqrt(_band_power(sig, sfreq, HIGH_GAMMA_BAND)))


@dataclass
class RealBackground:
    """Real iEEG used as background: (n_samples, n_channels) z-scored, with its rate and mains."""

    signal: np.ndarray
    sfreq: float
    line_freq: float
    source: str
    channels: list[str]

    def at(self, sfreq: float) -> RealBackground:
        """The same recording resampled to ``sfreq`` (once per subject, not per electrode)."""
        if sfreq == self.sfreq:
            return self
        from fractions import Fraction

        frac = Fraction(sfreq / self.sfreq).limit_denominator(1000)
        x = scipy.signal.resample_poly(self.signal, frac.numerator, frac.denominator, axis=0)
        return RealBackground(x, sfreq, self.line_freq, self.source, self.channels)


def pyneuromodulation_recording() -> Path:
    """The BIDS BrainVision recording inside PyPI py-neuromodulation 0.1.3 (found, not imported:
    the package's own imports need its full dependency set)."""
    import importlib.util

    spec = importlib.util.find_spec("py_neuromodulation")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError("background=pyneuromodulation needs py-neuromodulation: pip install "
                          "--no-deps py-neuromodulation==0.1.3")
    root = Path(next(iter(spec.submodule_search_locations))) / "data"
    found = sorted(root.glob("sub-*/ses-*/ieeg/*_ieeg.vhdr"))
    if not found:
        raise ConfigError(f"py-neuromodulation is installed but {root} holds no BIDS recording")
    return found[0]


def load_background(spec: str) -> RealBackground | None:
    """Read ``CorpusConfig.background``: None for ``simulated``, else the real recording."""
    if spec == "simulated":
        return None
    from ssip.data.bids import read_bids_signal

    path = pyneuromodulation_recording() if spec == "pyneuromodulation" else Path(spec)
    sig = read_bids_signal(path)
    x = sig.signal.astype(np.float64)
    x = (x - x.mean(axis=0)) / np.where(x.std(axis=0) > 0, x.std(axis=0), 1.0)
    return RealBackground(x, sig.sfreq, sig.line_freq, str(path), sig.channel_names)


def _real_background(rng: np.random.Generator, n: int, sfreq: float, real: RealBackground,
                     channel: int, band_rms: float) -> np.ndarray:
    """Channel ``channel mod C`` of ``real`` (already at ``sfreq``: :meth:`RealBackground.at`),
    mirror-extended to ``n`` samples from a random offset, high-passed and scaled to
    ``band_rms`` µV in 70-170 Hz (step 7)."""
    x = real.signal[:, channel % real.signal.shape[1]]
    period = np.concatenate([x, x[::-1]])
    start = int(rng.integers(len(period)))
    sig = np.resize(np.roll(period, -start), n)  # np.resize repeats the period
    sos = scipy.signal.butter(2, BACKGROUND_HIGHPASS_HZ, "highpass", fs=sfreq, output="sos")
    sig = scipy.signal.sosfiltfilt(sos, sig)
    return sig * (band_rms / math.sqrt(_band_power(sig, sfreq, HIGH_GAMMA_BAND)))


def _carrier(rng: np.random.Generator, n: int, sfreq: float) -> np.ndarray:
    """Gaussian noise band-passed to 70-170 Hz, unit RMS."""
    sos = scipy.signal.butter(4, HIGH_GAMMA_BAND, "bandpass", fs=sfreq, output="sos")
    c = scipy.signal.sosfiltfilt(sos, rng.standard_normal(n))
    return c / np.sqrt(np.mean(c**2))


def simulate_subject(
    utterances: list[Utterance], cfg: CorpusConfig, index: int,
    mels: dict[str, np.ndarray] | None = None, background: RealBackground | None = None,
) -> SimulatedSubject:
    """Simulate one subject speaking ``utterances`` in the given order (pure: no file I/O).

    Parameters
    ----------
    utterances : list of Utterance
        The subject's prompts in spoken order.
    cfg : CorpusConfig
    index : int
        Subject index (0-based); with ``cfg.seed`` it seeds every draw.
    mels : dict, optional
        utt_id -> ssip mel (80, n_frames) of the loudness-normalised prompt, if already known.
    background : RealBackground, optional
        Real iEEG for the background (step 7; :func:`load_background`); None = simulated.

    Returns
    -------
    SimulatedSubject
    """
    subject = f"sim{index + 1:02d}"
    groups = group_phrases(utterances, cfg, index)
    if len(groups) < cfg.n_tasks:
        grouped = f" in {len(groups)} trial(s) (phrases)" if len(groups) < len(utterances) else ""
        raise ConfigError(
            f"subject {subject} has {len(utterances)} prompt(s){grouped}, fewer than "
            f"n_tasks={cfg.n_tasks}; lower n_tasks, n_subjects or phrase_fraction, or raise "
            "max_utterances"
        )
    rng = np.random.default_rng([cfg.seed, _STREAM_SUBJECT, index, 0])
    n_el = int(rng.integers(cfg.electrodes_min, cfg.electrodes_max + 1))

    # Timeline: audio track and its mel (MEL_FLOOR in the gaps and pauses).
    in_phrase = [j > 0 for g in groups for j in range(len(g))]
    starts, n_audio = _layout(utterances, rng, cfg, in_phrase)
    n_frames = n_audio // _HOP
    audio = np.zeros(n_audio, dtype=np.float32)
    mel = np.full((melmod.N_MELS, n_frames), melmod.MEL_FLOOR, dtype=np.float32)
    for u, s in zip(utterances, starts):
        x = melmod.normalize_loudness(u.audio)
        audio[s : s + len(x)] = x
        m = mels[u.utt_id] if mels is not None else prompt_mel(u)
        mel[:, s // _HOP : s // _HOP + m.shape[1]] = m
    task_of = np.repeat(np.arange(1, cfg.n_tasks + 1),
                        [len(b) for b in np.array_split(np.arange(len(groups)), cfg.n_tasks)])
    trials, first = [], 0
    for g, t in zip(groups, task_of):
        s0, s1 = starts[first], starts[first + len(g) - 1] + len(g[-1].audio)
        trials.append(Trial(
            PHRASE_JOIN.join(u.utt_id for u in g), " ".join(u.transcript for u in g),
            s0 / melmod.SAMPLE_RATE, (s1 - s0) / melmod.SAMPLE_RATE, int(t),
            PHRASE_JOIN.join(dict.fromkeys(u.speaker for u in g))))
        first += len(g)
    frame_t = np.arange(n_frames) / melmod.FRAME_RATE
    in_words = np.zeros(n_frames, dtype=bool)
    for tr in trials:
        in_words |= (frame_t >= tr.onset_s) & (frame_t < tr.onset_s + tr.duration_s)

    # Electrodes: which are bad, which unresponsive (disjoint), and the encoding model.
    perm = rng.permutation(n_el)
    n_bad = int(round(cfg.bad_fraction * n_el))
    n_unresp = int(round(cfg.unresponsive_fraction * n_el))
    bad = np.zeros(n_el, dtype=bool)
    bad[perm[:n_bad]] = True
    unresponsive = np.zeros(n_el, dtype=bool)
    unresponsive[perm[n_bad : n_bad + n_unresp]] = True
    bad_kind = [""] * n_el
    for e in perm[:n_bad]:
        bad_kind[e] = str(rng.choice(["flat", "noisy"]))
    mixed = cfg.family == "mixed"
    if mixed:
        model: EncodingModel = _draw_mixed_model(n_el, unresponsive, rng, cfg, mel, in_words)
    else:
        model = _draw_model(n_el, unresponsive, rng, cfg)
    exponent = rng.uniform(1.5, 2.5, n_el)
    bg_rms = BACKGROUND_BAND_RMS_UV * np.exp(rng.normal(0.0, 0.2, n_el))
    line_amp = rng.uniform(2.0, 10.0, n_el)
    line_phase = rng.uniform(0, 2 * np.pi, 3)

    # SNR scale kappa (step 8) from the envelope at frame times during the spoken prompts.
    env = model.envelope(mel)  # (T, C) before kappa
    counted = ~bad & ~unresponsive
    speech_power = float(np.sum(np.mean(env[in_words][:, counted] ** 2, axis=0)))
    bg_power = float(np.sum(bg_rms[counted] ** 2))
    if mixed:  # the shared high-gamma state is background too (M5)
        bg_power *= 1.0 + cfg.shared_noise_fraction
    if counted.any() and speech_power > 0:
        scale = math.sqrt(10 ** (cfg.snr_db / 10) * bg_power / speech_power)
    else:
        scale = 0.0  # no good responsive electrode: nothing to scale
    model.gain *= scale
    env *= scale

    # Raw rendering (step 7, 9), one electrode at a time to bound memory.
    n_raw = int(round(n_audio / melmod.SAMPLE_RATE * cfg.sfreq))
    t_raw = np.arange(n_raw) / cfg.sfreq
    if background is not None:
        background = background.at(cfg.sfreq)
    line_freq = background.line_freq if background is not None else cfg.line_freq
    line = sum(
        np.sin(2 * np.pi * h * line_freq * t_raw + line_phase[h - 1]) / h**2
        for h in (1, 2, 3) if h * line_freq < cfg.sfreq / 2
    )
    shared = None
    if mixed:
        srng = np.random.default_rng([cfg.seed, _STREAM_SHARED, index, 0])
        shared, factors = _shared_noise(srng, n_raw, n_frames, n_el, cfg.sfreq, bg_rms,
                                        cfg.shared_noise_fraction)
        state = np.exp(SHARED_HG_DEPTH * factors)  # (n_raw, 3)
    resp = model.response(mel)  # (T, C), with kappa
    raw = np.empty((n_raw, n_el), dtype=np.float32)
    for e in range(n_el):
        erng = np.random.default_rng([cfg.seed, _STREAM_ELECTRODE, index, e])
        if bad_kind[e] == "flat":
            raw[:, e] = 0.0
            continue
        if bad_kind[e] == "noisy":
            raw[:, e] = NOISY_CHANNEL_RMS_UV * erng.standard_normal(n_raw) + 10 * line_amp[e] * line
            continue
        if background is None:
            x = _background(erng, n_raw, cfg.sfreq, exponent[e], bg_rms[e]) + line_amp[e] * line
        else:  # the real recording brings its own mains
            x = _real_background(erng, n_raw, cfg.sfreq, background, e, bg_rms[e])
        if model.gain[e] > 0:
            a = shifted_envelope(resp[:, e], t_raw, model.lead_s[e])
            x += a * _carrier(erng, n_raw, cfg.sfreq)
        if shared is not None:  # M5: raw drift and the shared high-gamma state
            x += shared.drift_uv[e] * (factors @ shared.drift_loadings[e])
            x += shared.hg_scale[e] * (state @ shared.hg_loadings[e]) * _carrier(erng, n_raw,
                                                                                 cfg.sfreq)
        raw[:, e] = x

    return SimulatedSubject(
        subject=subject, index=index, sfreq=cfg.sfreq, line_freq=line_freq, raw=raw,
        audio=audio, mel=mel, envelope=env.astype(np.float32), model=model,
        channel_names=[f"E{e + 1:03d}" for e in range(n_el)], unresponsive=unresponsive,
        bad=bad, bad_kind=bad_kind, background_band_rms=bg_rms, aperiodic_exponent=exponent,
        line_amplitude=line_amp, scale=scale, snr_db=cfg.snr_db, trials=trials,
        n_tasks=cfg.n_tasks, family=cfg.family, shared=shared,
    )


def extra_voice_utterances(voice: str, n: int, seed: int, k: int = 0) -> list[Utterance]:
    """``n`` prompts of a Debian voice for an extra subject, drawn by ``seed`` (spoken order)."""
    from ssip.data.speech import read_voice, voice_prompts

    ids = [uid for uid, _, _ in voice_prompts(voice)]
    rng = np.random.default_rng([seed, _STREAM_DEAL, 1, k])
    chosen = [ids[i] for i in rng.permutation(len(ids))[: min(n, len(ids))]]
    by_id = {u.utt_id: u for u in read_voice(voice, only=chosen)}
    return [by_id[i] for i in chosen]


def write_mixed_ground_truth(sim: SimulatedSubject, folder: str | Path) -> list[Path]:
    """``sub-<label>_mixed.npz``: what ``family: mixed`` knows beyond the common ground truth.

    Keys (C electrodes, T frames): ``kind`` (C,) str, ``projection`` (6, 80), ``weights``
    (C, 6), ``adapt_tau`` (C,) frames, ``factors`` (T, 3), ``drift_loadings`` (C, 3),
    ``drift_uv`` (C,), ``hg_loadings`` (C, 3), ``hg_scale`` (C,). Nothing for other families.
    """
    m = sim.model
    if not isinstance(m, MixedEncodingModel) or sim.shared is None:
        return []
    path = Path(folder) / f"sub-{sim.subject}_mixed.npz"
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(
        path, kind=np.asarray(m.kind, dtype="U12"), projection=m.projection, weights=m.weights,
        adapt_tau=m.adapt_tau, factors=sim.shared.factors,
        drift_loadings=sim.shared.drift_loadings, drift_uv=sim.shared.drift_uv,
        hg_loadings=sim.shared.hg_loadings, hg_scale=sim.shared.hg_scale)
    return [path]


def read_ground_truth(path: str | Path):
    """Load a ground-truth npz: returns (EncodingModel, dict of all arrays)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"ground truth {path} not found; build the corpus first "
                                "(ssip corpus build)")
    with np.load(path, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    missing = [k for k in ("spectral", "temporal", "lead_s", "slope", "threshold", "gain")
               if k not in arrays]
    if missing:
        raise KeyError(f"ground truth {path} lacks {missing}; rebuild it with this ssip version")
    model = EncodingModel(arrays["spectral"], arrays["temporal"], arrays["lead_s"],
                          arrays["slope"], arrays["threshold"], arrays["gain"])
    return model, arrays


def read_mixed_ground_truth(path: str | Path) -> tuple[MixedEncodingModel, dict]:
    """The mixed model of a subject from its ground truth ``sub-<label>.npz`` (beside which
    ``sub-<label>_mixed.npz`` lies): (MixedEncodingModel, dict of every array of both files)."""
    path = Path(path)
    base, arrays = read_ground_truth(path)
    extra_path = path.with_name(f"{path.stem}_mixed.npz")
    if not extra_path.exists():
        raise FileNotFoundError(f"{extra_path} not found: {path} is not of family mixed")
    with np.load(extra_path, allow_pickle=False) as z:
        extra = {k: z[k] for k in z.files}
    model = MixedEncodingModel(base.spectral, base.temporal, base.lead_s, base.slope,
                               base.threshold, base.gain, kind=extra["kind"],
                               projection=extra["projection"], weights=extra["weights"],
                               adapt_tau=extra["adapt_tau"])
    return model, {**arrays, **extra}


def prompt_mel(u: Utterance) -> np.ndarray:
    """ssip mel of a loudness-normalised prompt, shape (80, len(audio) // 160), float32."""
    return melmod.log_mel(melmod.normalize_loudness(u.audio)).numpy().astype(np.float32)


def build_corpus(
    cfg: CorpusConfig,
    out_dir: str | Path,
    utterances: list[Utterance] | None = None,
    progress: bool = True,
) -> dict:
    """Build the simulated corpus: BIDS NWB and/or Flinker HDF5 per subject, plus ground truth.

    Parameters
    ----------
    cfg : CorpusConfig
    out_dir : path
        Output folder; gets ``bids/`` (iBIDS NWB), ``bids-brainvision/`` (BIDS-iEEG), ``flinker/``,
        ``ground_truth/`` and ``corpus.json`` (each layout only when in ``cfg.formats``).
    utterances : list of Utterance, optional
        Speech to use instead of ``cfg.source`` (sorted by id, then ``cfg.max_utterances``).
    progress : bool
        Show a tqdm bar over subjects.

    Returns
    -------
    dict
        The corpus card, also written to ``out_dir/corpus.json``.
    """
    from tqdm.auto import tqdm

    from ssip.data import formats

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if utterances is None:
        utterances = read_source(cfg.source, limit=cfg.max_utterances)
    else:
        utterances = sorted(utterances, key=lambda u: u.utt_id)[: cfg.max_utterances]
    dealt = deal_utterances(utterances, cfg.n_subjects, cfg.seed)
    for k, voice in enumerate(cfg.extra_voices):
        extra = extra_voice_utterances(voice, cfg.extra_voice_utterances, cfg.seed, k)
        dealt.append(extra)
        utterances = utterances + extra
    mels = {u.utt_id: prompt_mel(u) for u in utterances}
    n_total = len(dealt)
    background = load_background(cfg.background)

    subjects = []
    if "nwb" in cfg.formats:
        formats.write_bids_dataset(out / "bids", n_total, config_hash(cfg))
    if "brainvision" in cfg.formats:
        formats.write_bids_ieeg_dataset(out / formats.BIDS_IEEG_DIR, config_hash(cfg))
    for index in tqdm(range(n_total), desc="corpus subjects", disable=not progress):
        sim = simulate_subject(dealt[index], cfg, index, mels, background)
        files = formats.write_ground_truth(sim, out / "ground_truth")
        files += write_mixed_ground_truth(sim, out / "ground_truth")
        if "nwb" in cfg.formats:
            files += formats.write_bids_subject(sim, out / "bids")
        if "brainvision" in cfg.formats:
            files += formats.write_bids_ieeg_subject(sim, out / formats.BIDS_IEEG_DIR,
                                                     audio=cfg.bids_audio)
        if "flinker" in cfg.formats:
            files.append(formats.write_flinker(sim, out / "flinker" / f"sub-{sim.subject}.h5",
                                               cfg.flinker_test_per_task))
        subjects.append({
            "subject": sim.subject,
            "n_electrodes": int(sim.raw.shape[1]),
            "n_good": int(sim.good.sum()),
            "n_bad": int(sim.bad.sum()),
            "n_unresponsive": int(sim.unresponsive.sum()),
            "n_trials": len(sim.trials),
            **({"n_phrases": sum(PHRASE_JOIN in t.utt_id for t in sim.trials)}
               if cfg.phrase_fraction > 0 else {}),
            **({"electrode_kinds": {k: int(np.sum(sim.model.kind == k)) for k in MIXED_KINDS}}
               if isinstance(sim.model, MixedEncodingModel) else {}),
            "voice": sorted({u.speaker for u in dealt[index]}),
            "language": sorted({u.language for u in dealt[index]}),
            "duration_s": round(sim.duration_s, 3),
            "speech_s": round(sum(t.duration_s for t in sim.trials), 3),
            "files": sorted(str(Path(f).relative_to(out)) for f in files),
        })
        del sim  # free the raw array before the next subject

    sources: dict[tuple[str, str, str], dict] = {}
    for u in utterances:
        key = (u.source, u.speaker, u.license)
        entry = sources.setdefault(key, {"source": u.source, "speaker": u.speaker,
                                         "license": u.license, "n_utterances": 0,
                                         "duration_s": 0.0})
        entry["n_utterances"] += 1
        entry["duration_s"] += u.duration
    for entry in sources.values():
        entry["duration_s"] = round(entry["duration_s"], 3)
    card = {
        "name": "ssip simulated corpus",
        "config": to_dict(cfg),
        "config_hash": config_hash(cfg),
        "mel_version": melmod.MEL_VERSION,
        "units": {"raw": "uV", "envelope": "uV", "audio": "full scale, loudness-normalised"},
        "start_clock_s": START_CLOCK_S,
        "encoding_model": "see ssip.data.simulate module docstring" + (
            "" if cfg.family == "spectral" else f" (family {cfg.family})"),
        "background": {"kind": cfg.background} if background is None else {
            "kind": cfg.background, "recording": background.source,
            "channels": background.channels, "sfreq": background.sfreq,
            "line_freq": background.line_freq},
        "speech_sources": list(sources.values()),
        "n_utterances": len(utterances),
        "subjects": subjects,
    }
    (out / "corpus.json").write_text(json.dumps(card, indent=2) + "\n")
    return card

"""Re-referencing of raw iEEG, as iEEG users expect it, computed by MNE-Python.

Three schemes (``IngestConfig.reference``), applied at ingest to the good channels only (bad,
flat and exploding channels are dropped first, so they never leak into a reference):

- ``none``: the recording's own reference.
- ``average``: common average reference per electrode group (an ECoG grid or strip, an sEEG
  shaft): every channel minus the mean of its group (``mne.set_eeg_reference(ref_channels=
  "average")`` on each group). Groups come from electrodes.tsv's ``group`` column when the
  recording has one, else from the channel names (the name without its trailing contact number:
  ``LA1..LA12`` -> ``LA``, ``G1..G64`` -> ``G``). A group of one channel keeps the recording's
  reference (its own average would zero it).
- ``bipolar``: for sEEG shafts, each contact minus its next neighbour on the same shaft
  (``LA1-LA2``, ``LA2-LA3``, ...; ``mne.set_bipolar_reference``). Neighbours are consecutive
  contact numbers of one shaft; a gap (a dropped bad contact) breaks the chain, and a contact
  with no neighbour is left out. Non-sEEG channels (ECoG grids, whose neighbours are 2-D) keep
  the recording's reference.

Pure signal code (arrays in, arrays out; MNE computes): no file I/O, no Ray.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np

REFERENCES = ["none", "average", "bipolar"]
_CONTACT = re.compile(r"^(.*?)[\s_-]*(\d+)$")


def split_contact(name: str) -> tuple[str, int | None]:
    """``"LA12"`` -> ``("LA", 12)``; a name without a trailing number -> ``(name, None)``."""
    m = _CONTACT.match(name.strip())
    if not m or not m.group(1):
        return name, None
    return m.group(1), int(m.group(2))


def channel_groups(names: list[str], groups: dict[str, str] | None = None) -> list[str]:
    """Group label of each channel: ``groups[name]`` when given (electrodes.tsv), else the shaft
    or grid prefix of its name."""
    groups = groups or {}
    return [groups.get(n) or split_contact(n)[0] for n in names]


def bipolar_pairs(names: list[str], types: list[str],
                  groups: dict[str, str] | None = None) -> list[tuple[str, str]]:
    """(anode, cathode) pairs of neighbouring sEEG contacts on the same shaft, in channel order."""
    label = channel_groups(names, groups)
    contacts: dict[str, dict[int, str]] = {}
    for n, t, g in zip(names, types, label, strict=True):
        num = split_contact(n)[1]
        if t == "seeg" and num is not None:
            contacts.setdefault(g, {})[num] = n
    pairs = []
    for n, t, g in zip(names, types, label, strict=True):
        num = split_contact(n)[1]
        if t == "seeg" and num is not None and num + 1 in contacts[g]:
            pairs.append((n, contacts[g][num + 1]))
    return pairs


@dataclass
class Referenced:
    """A re-referenced signal: (n_samples, n_out) with its channel names and what was done."""

    signal: np.ndarray
    names: list[str]
    types: list[str]
    info: dict = field(default_factory=dict)


def rereference(signal: np.ndarray, sfreq: float, names: list[str], types: list[str], scheme: str,
                groups: dict[str, str] | None = None) -> Referenced:
    """Apply ``scheme`` (module docstring) to ``signal`` (n_samples, n_channels), any unit.

    Returns the new signal (float32), its channel names and types, and ``info`` for the ingest
    metadata (the scheme, the groups or pairs used, channels left out).
    """
    if scheme not in REFERENCES:
        raise ValueError(f"reference={scheme!r} is not allowed; choose one of {REFERENCES}")
    if scheme == "none":
        return Referenced(signal, list(names), list(types), {"scheme": "none"})
    import mne

    def raw_of(cols: list[int]) -> mne.io.RawArray:
        info = mne.create_info([names[c] for c in cols], sfreq, [types[c] for c in cols])
        return mne.io.RawArray(signal[:, cols].T.astype(np.float64), info, verbose="error")

    if scheme == "average":
        out = np.empty_like(signal, dtype=np.float32)
        label = channel_groups(names, groups)
        by_group: dict[tuple[str, str], list[int]] = {}
        for c, (g, t) in enumerate(zip(label, types, strict=True)):
            by_group.setdefault((g, t), []).append(c)
        for (_, t), cols in by_group.items():
            if len(cols) == 1:  # its own average: it would become zero; keep it as recorded
                out[:, cols] = signal[:, cols]
                continue
            raw = raw_of(cols)  # one group at a time bounds memory to one group's float64 copy
            mne.set_eeg_reference(raw, ref_channels="average", ch_type=t, projection=False,
                                  copy=False, verbose="error")
            out[:, cols] = raw.get_data().T
        single = [names[cols[0]] for cols in by_group.values() if len(cols) == 1]
        return Referenced(out, list(names), list(types), {
            "scheme": "average",
            "groups": {g: [names[c] for c in cols] for (g, _), cols in sorted(by_group.items())},
            "kept_on_recording_reference": single,
        })

    pairs = bipolar_pairs(names, types, groups)
    seeg = [c for c, t in enumerate(types) if t == "seeg"]
    other = [c for c, t in enumerate(types) if t != "seeg"]
    paired = {n for p in pairs for n in p}
    parts, out_names, out_types = [], [], []
    if pairs:
        raw = raw_of(seeg)
        ref = mne.set_bipolar_reference(raw, anode=[a for a, _ in pairs],
                                        cathode=[c for _, c in pairs],
                                        ch_name=[f"{a}-{c}" for a, c in pairs], drop_refs=True,
                                        copy=True, verbose="error")
        bip = ref.copy().pick([f"{a}-{c}" for a, c in pairs])
        parts.append(bip.get_data().T.astype(np.float32))
        out_names += bip.ch_names
        out_types += ["seeg"] * len(pairs)
    if other:
        parts.append(signal[:, other].astype(np.float32))
        out_names += [names[c] for c in other]
        out_types += [types[c] for c in other]
    if not parts:
        raise ValueError("bipolar reference: no sEEG contact has a neighbour on its shaft and no "
                         "other channel is left")
    return Referenced(np.concatenate(parts, axis=1), out_names, out_types, {
        "scheme": "bipolar",
        "pairs": [list(p) for p in pairs],
        "unpaired": [names[c] for c in seeg if names[c] not in paired],
        "kept_on_recording_reference": [names[c] for c in other],
    })

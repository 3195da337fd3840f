"""The Whisper encoder on a short mel window, without padding to 30 s."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ssip.mel import MEL_FLOOR


class WhisperEncoderWindow(nn.Module):
    """Whisper encoder on a mel window of any length up to 30 s, tapping one layer.

    Runs the HF encoder's own modules (conv1, conv2, positional table, layers, layer_norm) with
    the positional embedding sliced to the window, so a (B, 80, T) mel costs T/3000 of a padded
    forward. The parameters are shared with (not copied from) ``encoder``.

    Outputs differ from the padded 30 s forward on the frames the window covers: there, every
    frame also attends to the padding (see tests/test_whisper.py for the measured size).
    :meth:`forward` with per-item ``lengths`` masks a right-padded batch instead, so that each
    item gives what it gives alone.

    Parameters
    ----------
    encoder : transformers WhisperEncoder
        E.g. ``model.model.encoder`` (or ``model.get_encoder()``).
    layer : int, optional
        Which hidden state :meth:`forward` returns: 0 = after conv + positional embedding,
        k = after encoder layer k (1-based), ``encoder_layers`` (default) = the final output,
        after the closing layer_norm, as HF's ``last_hidden_state``.
    truncate : bool
        Keep only the layers up to ``layer`` so nothing past the tap is computed or held.

    Attributes
    ----------
    past_tap : tuple of modules
        The encoder's layers after the tap (layer+1 .. encoder_layers), held in a tuple, not
        registered: neither state dicts nor ``.to()`` see them. Only the naive benchmark path
        runs them (``forward(..., rest_layers=window.past_tap)``).
    """

    def __init__(self, encoder: nn.Module, layer: int | None = None, truncate: bool = True):
        super().__init__()
        n_layers = len(encoder.layers)
        if layer is None:
            layer = n_layers
        if not 0 <= layer <= n_layers:
            raise ValueError(f"WhisperEncoderWindow: layer={layer} must be in [0, {n_layers}]")
        self.layer = int(layer)
        self.num_layers = n_layers
        self.conv1 = encoder.conv1
        self.conv2 = encoder.conv2
        self.embed_positions = encoder.embed_positions
        keep = self.layer if truncate else n_layers
        self.layers = nn.ModuleList(list(encoder.layers)[:keep])
        self.past_tap: tuple[nn.Module, ...] = tuple(list(encoder.layers)[self.layer:])
        self.layer_norm = encoder.layer_norm
        self.max_frames = 2 * encoder.embed_positions.num_embeddings

    @staticmethod
    def output_frames(n_frames: int) -> int:
        """Encoder frames (50 Hz) for ``n_frames`` mel frames: conv2 has stride 2 and padding 1."""
        return (int(n_frames) - 1) // 2 + 1

    def _embed(self, mel: torch.Tensor, lengths: torch.Tensor | None,
               pad_to: int | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """conv1, conv2 and positions: (B, T2, d) at 50 Hz, and the additive key mask or None."""
        if mel.ndim != 3 or mel.shape[1] != self.conv1.in_channels:
            raise ValueError(
                f"WhisperEncoderWindow expects a mel of shape (B, {self.conv1.in_channels}, T), "
                f"got {tuple(mel.shape)}"
            )
        b, _, t = mel.shape
        if not 1 <= t <= self.max_frames:
            raise ValueError(
                f"WhisperEncoderWindow: window of {t} frames; it must hold 1 to "
                f"{self.max_frames} frames (split longer mels into windows)"
            )
        if pad_to is not None and not 1 <= int(pad_to) <= self.max_frames:
            raise ValueError(f"pad_to={pad_to}: Whisper takes 1..{self.max_frames} frames")
        w = self.conv1.weight
        if lengths is None and pad_to is None:  # every item full length: nothing to mask
            x = mel.to(dtype=w.dtype, device=w.device)
            x = nn.functional.gelu(self.conv1(x))  # (B, d, T)
            x = nn.functional.gelu(self.conv2(x))  # (B, d, ceil(T/2))
            x = x.transpose(1, 2)  # (B, T2, d)
            return x + self.embed_positions.weight[: x.shape[1]], None
        if lengths is None:
            lengths = torch.full((b,), t, dtype=torch.long, device=w.device)
        lengths = lengths.to(device=w.device)
        t_even = t + t % 2
        if pad_to is not None:
            t_even = max(t_even, int(pad_to))
        enc_len = lengths + lengths % 2  # (B,) even encoder lengths
        x = nn.functional.pad(mel.to(w), (0, t_even - t))  # (B, 80, T_even)
        pos = torch.arange(t_even, device=x.device)[None, None, :]
        floor = torch.full((), MEL_FLOOR, dtype=x.dtype, device=x.device)
        x = torch.where(pos < lengths[:, None, None], x,
                        torch.where(pos < enc_len[:, None, None], floor, 0.0))
        # conv2's output j reads conv1 frames 2j-1..2j+1, so real positions (2j+1 < enc_len)
        # never see conv1 outputs past the item.
        x = nn.functional.gelu(self.conv1(x))  # (B, d, T_even)
        x = nn.functional.gelu(self.conv2(x)).transpose(1, 2)  # (B, T2, d) at 50 Hz
        t2 = x.shape[1]
        x = x + self.embed_positions.weight[:t2]
        half = enc_len // 2
        if not bool((half < t2).any()):
            return x, None
        # Additive key mask (B, 1, 1, T2): padded positions get no attention weight.
        keep = torch.arange(t2, device=x.device)[None, :] < half[:, None]
        bias = torch.zeros((b, 1, 1, t2), dtype=x.dtype, device=x.device)
        return x, bias.masked_fill(~keep[:, None, None, :], torch.finfo(x.dtype).min)

    def _states(self, mel: torch.Tensor, lengths: torch.Tensor | None, upto: int,
                pad_to: int | None) -> tuple[list[torch.Tensor], torch.Tensor | None]:
        if not 0 <= upto <= len(self.layers):
            raise ValueError(
                f"WhisperEncoderWindow holds layers 0..{len(self.layers)}, asked for {upto}; "
                "build it with truncate=False or a deeper layer"
            )
        h, bias = self._embed(mel, lengths, pad_to)
        states = [h]
        for block in self.layers[:upto]:
            h = block(h, bias)  # (B, T2, d)
            states.append(h)
        if upto == self.num_layers:
            states[-1] = self.layer_norm(h)
        return states, bias

    def hidden_states(self, mel: torch.Tensor, upto: int | None = None,
                      lengths: torch.Tensor | None = None) -> list[torch.Tensor]:
        """All hidden states 0..``upto`` (default: the tapped layer), each (B, ceil(T/2), d).

        The last entry is after the closing layer_norm when ``upto`` equals ``encoder_layers``.
        ``lengths`` masks padding as in :meth:`forward`.
        """
        upto = self.layer if upto is None else int(upto)
        return self._states(mel, lengths, upto, None)[0]

    def forward(self, mel: torch.Tensor, lengths: torch.Tensor | None = None, *,
                pad_to: int | None = None,
                rest_layers: Sequence[nn.Module] = ()) -> torch.Tensor:
        """Hidden state of the tapped layer, each item of a right-padded batch as alone.

        Parameters
        ----------
        mel : Tensor, shape (B, 80, T), T <= 3000
            ssip log-mel at 100 frames/s.
        lengths : int Tensor, shape (B,), optional
            Real frames of each item; None = every item holds all T frames, with nothing
            padded or masked. Given, an item runs as it would alone on its first ``length``
            frames (an odd length padded by one mel-floor frame, as conv2 has stride 2): the mel
            past it is zeroed, which is what conv1 zero-pads alone, and attention masks the keys
            of its padded 50 Hz positions.
        pad_to : int, optional
            Benchmark-only naive reference: pad the window to this many frames (3000 = Whisper's
            30 s input) with the padding masked; the same result up to float rounding at
            pad_to/T times the cost. Without ``lengths``, every item is T frames long.
        rest_layers : sequence of modules
            Benchmark-only naive reference: encoder layers to run after the tap (e.g.
            :attr:`past_tap`) whose output is discarded: the whole encoder runs, the tap is read
            off the way.

        Returns
        -------
        Tensor, shape (B, ceil(T_in / 2), d_model)
            At 50 frames/s, T_in = T (or pad_to, or T + 1 for odd T with lengths); frame j covers
            mel frames 2j-1 .. 2j+1 at the input of conv2. Values past an item's length are
            meaningless.
        """
        states, bias = self._states(mel, lengths, self.layer, pad_to)
        x = states[-1]
        if rest_layers and self.layer < self.num_layers:
            h = x
            for block in rest_layers:
                h = block(h, bias)
            self.layer_norm(h)
        return x

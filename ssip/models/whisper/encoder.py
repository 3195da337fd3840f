"""The Whisper encoder on a short mel window, without padding to 30 s."""

from __future__ import annotations

import torch
from torch import nn


class WhisperEncoderWindow(nn.Module):
    """Whisper encoder on a mel window of any length up to 30 s, tapping one layer.

    Runs the HF encoder's own modules (conv1, conv2, positional table, layers, layer_norm) with
    the positional embedding sliced to the window, so a (B, 80, T) mel costs T/3000 of a padded
    forward. The parameters are shared with (not copied from) ``encoder``.

    Outputs differ from the padded 30 s forward on the frames the window covers: there, every
    frame also attends to the padding (see tests/test_whisper.py for the measured size).

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
        self.layer_norm = encoder.layer_norm
        self.max_frames = 2 * encoder.embed_positions.num_embeddings

    @staticmethod
    def output_frames(n_frames: int) -> int:
        """Encoder frames (50 Hz) for ``n_frames`` mel frames: conv2 has stride 2 and padding 1."""
        return (int(n_frames) - 1) // 2 + 1

    def _embed(self, mel: torch.Tensor) -> torch.Tensor:
        if mel.ndim != 3 or mel.shape[1] != self.conv1.in_channels:
            raise ValueError(
                f"WhisperEncoderWindow expects a mel of shape (B, {self.conv1.in_channels}, T), "
                f"got {tuple(mel.shape)}"
            )
        if not 1 <= mel.shape[-1] <= self.max_frames:
            raise ValueError(
                f"WhisperEncoderWindow: window of {mel.shape[-1]} frames; it must hold 1 to "
                f"{self.max_frames} frames (split longer mels into windows)"
            )
        w = self.conv1.weight
        x = mel.to(dtype=w.dtype, device=w.device)
        x = nn.functional.gelu(self.conv1(x))  # (B, d, T)
        x = nn.functional.gelu(self.conv2(x))  # (B, d, ceil(T/2))
        x = x.transpose(1, 2)  # (B, T2, d)
        return x + self.embed_positions.weight[: x.shape[1]]

    def hidden_states(self, mel: torch.Tensor, upto: int | None = None) -> list[torch.Tensor]:
        """All hidden states 0..``upto`` (default: the tapped layer), each (B, ceil(T/2), d).

        The last entry is after the closing layer_norm when ``upto`` equals ``encoder_layers``.
        """
        upto = self.layer if upto is None else int(upto)
        if not 0 <= upto <= len(self.layers):
            raise ValueError(
                f"WhisperEncoderWindow holds layers 0..{len(self.layers)}, asked for {upto}; "
                "build it with truncate=False or a deeper layer"
            )
        h = self._embed(mel)
        states = [h]
        for block in self.layers[:upto]:
            h = block(h, None)  # (B, T2, d); no attention mask: the window has no padding
            states.append(h)
        if upto == self.num_layers:
            states[-1] = self.layer_norm(h)
        return states

    def forward(self, mel: torch.Tensor) -> torch.Tensor:
        """Hidden state of the tapped layer.

        Parameters
        ----------
        mel : Tensor, shape (B, 80, T), T <= 3000
            ssip log-mel at 100 frames/s.

        Returns
        -------
        Tensor, shape (B, ceil(T / 2), d_model)
            At 50 frames/s; frame j covers mel frames 2j-1 .. 2j+1 at the input of conv2.
        """
        return self.hidden_states(mel)[-1]

"""ssip: speech decoding from intracranial recordings as diffusion posterior sampling."""

__version__ = "0.1.0"

"""ssip: speech decoding from intracranial recordings as diffusion posterior sampling."""

import os as _os

__version__ = "0.1.0"

# Ray token authentication stays on for every cluster ssip starts or joins. Ray reads the mode
# when it is imported, so it is set here, before any ssip module imports ray; a user who sets
# RAY_AUTH_MODE themselves keeps their choice.
_os.environ.setdefault("RAY_AUTH_MODE", "token")

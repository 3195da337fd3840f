"""ssip.models."""

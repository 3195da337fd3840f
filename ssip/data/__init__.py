"""ssip.data."""

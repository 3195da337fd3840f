"""ssip.sampling."""

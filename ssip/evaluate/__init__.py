"""ssip.evaluate."""

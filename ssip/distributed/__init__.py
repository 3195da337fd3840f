"""ssip.distributed."""

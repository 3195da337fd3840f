"""One module per `ssip` command group; see ssip/cli.py."""

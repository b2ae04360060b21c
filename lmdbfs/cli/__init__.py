"""The `lmdbfs` command (main): arguments in, one line and an exit code out."""

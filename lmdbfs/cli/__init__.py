"""The `lmdbfs` command: its grammar (parser) and what each command does (main):
arguments in, one line and an exit code out."""

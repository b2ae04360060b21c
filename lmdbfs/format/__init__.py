"""The on-disk format: keys, directory records and split files' piece tables (records),
the meta record (meta), and the checks that records read back from an untrusted file
pass (recordcheck, jsoncheck). The lowest layer: it imports nothing of lmdbfs but errors."""

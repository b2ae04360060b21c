"""Reading a DB without FUSE: the `Archive` (reader, over a per-process handle), unions of
several DBs (union), whole-DB operations (ops: info, unpack) and `lmdbfs verify`."""

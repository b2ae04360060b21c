"""Reading a DB without FUSE: the calls by path (tree), written once over what one DB
answers (`Archive`, reader, over a per-process handle) or several as one (union);
whole-DB operations (ops: info, unpack) and `lmdbfs verify`."""

"""Reading a DB without FUSE: the reading API of any tree (tree), written once over what
one DB answers (`Archive`, reader, over a per-process handle) or several as one (`Union`,
holding one `Archive` per layer); whole-DB operations (ops: info, unpack) and `lmdbfs verify`."""

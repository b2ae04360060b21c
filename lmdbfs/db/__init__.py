"""LMDB files themselves: every DB a reader serves is opened safely here (store), a B-tree
is read page by page without touching values (btree), and DBs built by other tools are
recognised (foreign). Built on the format; the pack, adopt, remote and read sides use it."""

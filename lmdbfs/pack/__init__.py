"""Building a DB: sources (folders, archives) are listed into a scan, their bytes fed in
order to the writer, and the packer drives the whole `lmdbfs pack`; shard cuts one tree
into N packs."""

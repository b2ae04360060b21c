"""`lmdbfs adopt`: an lmdbfs index written beside an LMDB that another tool built, so it
is served without copying its values (adopt); the md5 converter's values turned back
into files (convert)."""

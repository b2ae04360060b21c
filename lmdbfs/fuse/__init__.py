"""Serving over FUSE: DBs described as the C server's layers (serve), the mount daemon's
life in its own process (daemon), `lmdbfs mount`/`umount` on the caller's side (mount)
and the entry point of mount(8) and fstab (mounthelper)."""

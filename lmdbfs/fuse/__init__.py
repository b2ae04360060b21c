"""Serving over FUSE: the mount daemon's serving loop in front of the C server (serve),
`lmdbfs mount`/`umount` (mount) and the entry point of mount(8) and fstab (mounthelper)."""

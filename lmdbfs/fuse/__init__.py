"""Serving over FUSE: DBs described as the C server's layers (serve), `lmdbfs mount`/
`umount` and the mount daemon's life (mount), and the entry point of mount(8) and fstab
(mounthelper)."""

"""The spool: a request on disk before its 202, written by group commit and fed to the buffer."""

"""ingest: a listener thread, a bounded buffer and consumer threads between HTTP and a database."""

__version__ = "0.1.0"

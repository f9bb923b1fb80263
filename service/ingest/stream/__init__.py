"""The replicated stream buffer (NATS JetStream): the stream, the listener's publish, the writers' feed."""

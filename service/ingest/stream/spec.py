"""What the stream and its consumer must be: one home for the names and the settings that
`ingest stream init` makes, `serve`/`write` check at start, and `stream status` compares.

One JetStream message holds one whole HTTP request (wire.py). The stream is the unstored
backlog, like the spool: file storage, R replicas, work-queue retention (a message leaves once a
writer acked it, that is once it is in the database), `discard: new` (full means refuse at
once: 503, never drop what was acknowledged), bounded in bytes, and no age limit (age would
expire data nobody stored). The consumer is durable and pulled, with explicit acks, shared by
every writer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from nats.js.api import AckPolicy, ConsumerConfig, DiscardPolicy, RetentionPolicy, StorageType, StreamConfig

DURABLE = "writers"
# Room a request's headers (identities, ids, reply subject) take beside its body.
HEADER_ROOM = 64 * 1024
DUPLICATE_WINDOW_S = 120.0  # the listener's own publish retries are deduplicated within this
MAX_ACK_PENDING = 1000  # JetStream messages (each one or more requests) held by all writers at once


@dataclass(frozen=True, kw_only=True)
class StreamSpec:
    servers: list[str]
    name: str
    replicas: int
    max_bytes: int
    max_body_bytes: int
    ack_wait_s: float

    @property
    def subject(self) -> str:
        return f"{self.name.lower()}.requests"

    @property
    def max_msg_size(self) -> int:
        return self.max_body_bytes + HEADER_ROOM

    def stream_config(self) -> StreamConfig:
        return StreamConfig(
            name=self.name, subjects=[self.subject], retention=RetentionPolicy.WORK_QUEUE,
            discard=DiscardPolicy.NEW, storage=StorageType.FILE, num_replicas=self.replicas,
            max_bytes=self.max_bytes, max_msgs=-1, max_age=0, max_msg_size=self.max_msg_size,
            duplicate_window=DUPLICATE_WINDOW_S, deny_delete=True,
        )

    def consumer_config(self) -> ConsumerConfig:
        return ConsumerConfig(
            name=DURABLE, durable_name=DURABLE, ack_policy=AckPolicy.EXPLICIT, ack_wait=self.ack_wait_s,
            max_deliver=-1, max_ack_pending=MAX_ACK_PENDING, filter_subject=self.subject,
        )

    def stream_differences(self, config: dict[str, Any]) -> list[str]:
        """What an existing stream's config (the server's JSON) has otherwise than this spec."""
        wanted: dict[str, Any] = {
            "subjects": [self.subject], "retention": "workqueue", "discard": "new", "storage": "file",
            "num_replicas": self.replicas, "max_bytes": self.max_bytes, "max_age": 0,
            "max_msg_size": self.max_msg_size,
        }
        return [f"{key} is {config.get(key)!r}, expected {value!r}"
                for key, value in wanted.items() if config.get(key) != value]

    def consumer_differences(self, config: dict[str, Any]) -> list[str]:
        wanted: dict[str, Any] = {
            "durable_name": DURABLE, "ack_policy": "explicit", "ack_wait": int(self.ack_wait_s * 1e9),
            "filter_subject": self.subject, "max_ack_pending": MAX_ACK_PENDING,
        }
        return [f"{key} is {config.get(key)!r}, expected {value!r}"
                for key, value in wanted.items() if config.get(key) != value]

    def essential_differences(self, config: dict[str, Any]) -> list[str]:
        """Differences a listener or writer cannot work with (others, like max_bytes, are the
        operator's to change with `stream init`)."""
        essential = ("subjects", "retention", "discard", "storage", "max_age")
        return [d for d in self.stream_differences(config) if d.split(" ", 1)[0] in essential]

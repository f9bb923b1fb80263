"""The stream buffer end to end, in process: a listener publishes each request as one stream
message and answers 202 after the stream's ack; writers store it and ack it."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from aiohttp import web
from sqlalchemy import create_engine, func, select

from ingest.builder import stream_spec
from ingest.config import Settings
from ingest.db.tables import messages, requests
from ingest.http.identity import Generator
from ingest.messages import Message, Receipt
from ingest.metrics import Metrics
from ingest.receipts import Ledger
from ingest.service import Service
from ingest.stream import admin
from ingest.stream.intake import StreamIntake
from support.httpclient import post_ndjson, request
from support.nats_cluster import NatsCluster, free_port
from support.serving import ServeProcess
from support.waiting import wait_until


def stream_status(service: Service) -> admin.Status:
    return admin.status(stream_spec(service.settings))


def rows(url: str) -> int:
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            return int(conn.execute(select(func.count()).select_from(messages)).scalar_one())
    finally:
        engine.dispose()


def test_a_202_becomes_rows_the_stream_empties_and_the_receipt_says_stored(
    stream_ready: NatsCluster, make_service: Callable[..., Service], postgres_head_url: str,
) -> None:
    service = make_service(buffer=stream_ready.urls, db_url=postgres_head_url)
    reply = post_ndjson(service.url, [{"n": i} for i in range(100)])
    assert reply.status == 202, reply.body
    request_id = reply.json()["request"]
    wait_until(lambda: rows(postgres_head_url) == 100, 20, "100 rows")
    wait_until(lambda: stream_status(service).messages == 0, 10, "the stream to empty (acked)")
    receipt = wait_until(lambda: (r := request(f"{service.url}/requests/{request_id}")).status == 200
                         and r.json()["pending"] == 0 and r, 10, "the receipt")
    assert receipt.json() == {"request": request_id, "accepted": 100, "stored": 100, "dead_lettered": 0,
                              "pending": 0}
    assert request(service.url + "/readyz").status == 200


def test_a_listener_only_publishes_and_a_writer_stores(
    stream_ready: NatsCluster, make_service: Callable[..., Service], postgres_head_url: str,
) -> None:
    listener = make_service(buffer=stream_ready.urls, db_url=postgres_head_url, consumers=0)
    replies = [post_ndjson(listener.url, [{"n": i, "r": r} for i in range(10)],
                           query="") for r in range(20)]
    assert {r.status for r in replies} == {202}
    assert stream_status(listener).messages == 20  # sent one after another: a stream message each; nobody writes yet
    assert rows(postgres_head_url) == 0
    writer = make_service(buffer=stream_ready.urls, db_url=postgres_head_url, consumers=2)
    wait_until(lambda: rows(postgres_head_url) == 200, 20, "200 rows")
    wait_until(lambda: stream_status(writer).messages == 0, 10, "the stream to empty")


def last_sequence(cluster: NatsCluster) -> int:
    """How many stream messages were ever published (acked ones leave the work queue)."""
    page = cluster.nodes[0].monitor("/jsz?streams=true")
    assert page is not None
    return int(page["account_details"][0]["stream_detail"][0]["state"]["last_seq"])  # type: ignore[index]


def test_requests_accepted_in_one_turn_of_the_loop_are_one_stream_message_each_settled_apart(
    stream_ready: NatsCluster, make_service: Callable[..., Service], postgres_head_url: str,
) -> None:
    """Ten requests submitted together (half of them ?ack=commit) go out as one stream message;
    a writer stores each request's messages, counts each receipt, and reports each commit."""
    spec = stream_spec(Settings.from_mapping({"buffer": stream_ready.urls}))
    ledger = Ledger()
    intake = StreamIntake(spec, ledger=ledger, metrics=Metrics([]), enqueue_timeout_s=10.0, commit_timeout_s=30.0)
    make_service(buffer=stream_ready.urls, db_url=postgres_head_url, consumers=2, _listens=False)
    identities = Generator()

    async def publish() -> list[Receipt]:
        lifespan = intake.lifespan(web.Application())
        await anext(lifespan)
        try:
            receipts = [ledger.open(None, 3, time.time(), waited_on=i % 2 == 0) for i in range(10)]
            batches = [[Message(f'{{"r": {i}, "n": {n}}}', receipt.received_at, ident=ident, receipt=receipt)
                        for n, ident in enumerate(identities.take(3))] for i, receipt in enumerate(receipts)]
            await asyncio.gather(*(intake.submit(batch) for batch in batches))
            committed = await asyncio.wait_for(asyncio.gather(
                *(asyncio.wrap_future(r.future) for r in receipts if r.future is not None)), 30)
            assert committed == [(3, 0)] * 5
            return receipts
        finally:
            await lifespan.aclose()

    receipts = asyncio.run(publish())
    assert last_sequence(stream_ready) == 1
    assert rows(postgres_head_url) == 30
    wait_until(lambda: stored_by_request(postgres_head_url) == {r.id: (3, 3) for r in receipts}, 10,
               "every request's receipt row: 3 accepted, 3 stored")
    wait_until(lambda: admin.status(spec).messages == 0, 10, "the stream to empty (acked)")


def stored_by_request(url: str) -> dict[str, tuple[int, int]]:
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            return {r.id: (r.accepted, r.stored) for r in conn.execute(select(requests))}
    finally:
        engine.dispose()


def test_ack_commit_across_roles_is_a_201_after_the_writers_commit(
    stream_ready: NatsCluster, make_service: Callable[..., Service], postgres_head_url: str,
) -> None:
    listener = make_service(buffer=stream_ready.urls, db_url=postgres_head_url, consumers=0)
    make_service(buffer=stream_ready.urls, db_url=postgres_head_url, consumers=1)
    reply = post_ndjson(listener.url, [{"n": i} for i in range(5)], query="?ack=commit")
    assert reply.status == 201, reply.body
    assert reply.counts() == {"stored": 5, "duplicates": 0}
    assert rows(postgres_head_url) == 5


def test_ack_commit_without_a_writer_times_out_naming_the_request(
    stream_ready: NatsCluster, make_service: Callable[..., Service], postgres_head_url: str,
) -> None:
    listener = make_service(buffer=stream_ready.urls, db_url=postgres_head_url, consumers=0, commit_timeout_s=1.0)
    reply = post_ndjson(listener.url, [{"n": 1}], query="?ack=commit")
    assert reply.status == 504, reply.body
    request_id = reply.json()["detail"]["request"]
    assert reply.headers["x-request-id"] == request_id
    make_service(buffer=stream_ready.urls, db_url=postgres_head_url, consumers=1)
    wait_until(lambda: (r := request(f"{listener.url}/requests/{request_id}")).status == 200
               and r.json()["stored"] == 1, 20, "the receipt to say stored")




def test_workers_publish_through_each_their_own_connection(
    stream_ready: NatsCluster, make_service: Callable[..., Service], postgres_head_url: str,
) -> None:
    port = free_port()
    listener = ServeProcess(["--port", str(port), "--workers", "2", "--consumers", "0", "--buffer", stream_ready.urls,
                             "--db", postgres_head_url])
    try:
        replies = [post_ndjson(listener.url, [{"r": r, "i": i} for i in range(10)]) for r in range(40)]
        assert {r.status for r in replies} == {202}
        metrics = request(listener.url + "/metrics").body.decode()
        assert "ingest_stream_publish_seconds_count 40.0" in metrics  # the workers' counts, added up
    finally:
        listener.kill()
    make_service(buffer=stream_ready.urls, db_url=postgres_head_url, consumers=2)
    wait_until(lambda: rows(postgres_head_url) == 400, 20, "400 rows")


def test_a_writer_refuses_messages_and_serves_its_metrics(
    stream_ready: NatsCluster, make_service: Callable[..., Service], postgres_head_url: str,
) -> None:
    writer = make_service(buffer=stream_ready.urls, db_url=postgres_head_url, consumers=1, _listens=False)
    refused = post_ndjson(writer.url, [{"n": 1}])
    assert refused.status == 404
    assert "this is a writer" in refused.json()["error"]
    wait_until(lambda: request(writer.url + "/readyz").status == 200, 10, "the writer ready")
    wait_until(lambda: "ingest_stream_replicas_current 3.0" in request(writer.url + "/metrics").body.decode(), 10,
               "the stream's state polled")

"""/metrics parses as Prometheus text and moves as the pipeline works."""

from prometheus_client.parser import text_string_to_metric_families

from support.httpclient import post_json, post_ndjson, request
from support.waiting import wait_until

CONTRACT = {
    "ingest_queue_depth": "gauge",
    "ingest_queue_capacity": "gauge",
    "ingest_messages_received": "counter",
    "ingest_messages_stored": "counter",
    "ingest_messages_rejected": "counter",
    "ingest_batch_size": "histogram",
    "ingest_db_write_seconds": "histogram",
    "ingest_message_latency_seconds": "histogram",
    "ingest_db_pool_size": "gauge",
    "ingest_db_pool_in_use": "gauge",
    "ingest_db_pool_waiting": "gauge",
    "ingest_consumers_alive": "gauge",
    "ingest_thread_errors": "counter",
    "ingest_db_retries": "counter",
    "ingest_db_calls_cut": "counter",
    "ingest_messages_dead_lettered": "counter",
    "ingest_http_requests": "counter",
}


def scrape(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    reply = request(f"{url}/metrics")
    assert reply.status == 200
    samples = {}
    families = {}
    for family in text_string_to_metric_families(reply.body.decode()):
        families[family.name] = family.type
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    for name, kind in CONTRACT.items():
        assert families.get(name) == kind, f"{name}: {families.get(name)}"
    return samples


def value(samples, name: str, **labels: str) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


def test_contract_metrics_exist_with_zeroes_before_traffic(make_service) -> None:
    service = make_service(consumers=3, pool_size=2, queue_size=1234)
    samples = scrape(service.url)
    assert value(samples, "ingest_queue_capacity") == 1234
    assert value(samples, "ingest_db_pool_size") == 2
    assert value(samples, "ingest_consumers_alive") == 3
    for reason in ("invalid", "too_large", "unsupported", "queue_full", "shutting_down"):
        assert value(samples, "ingest_messages_rejected_total", reason=reason, client="anonymous") == 0
    assert value(samples, "ingest_thread_errors_total", thread="consumer-3") == 0
    assert value(samples, "ingest_http_requests_total", code="503") == 0
    assert value(samples, "ingest_db_calls_cut_total") == 0


def test_counters_and_histograms_move_with_traffic(make_service) -> None:
    service = make_service(batch_linger_s=0)
    for n in range(10):
        assert post_ndjson(service.url, [{"n": n, "i": i} for i in range(10)], query="?ack=commit").status == 201
    assert post_json(service.url, {"ok": 1}).status == 202
    assert request(f"{service.url}/messages", "POST", b"{", {"Content-Type": "application/json"}).status == 400
    wait_until(lambda: value(scrape(service.url), "ingest_messages_stored_total") == 101, what="101 stored")
    samples = scrape(service.url)
    assert value(samples, "ingest_messages_received_total", client="anonymous") == 101
    assert value(samples, "ingest_message_latency_seconds_count") == 101
    assert value(samples, "ingest_batch_size_sum") == 101
    assert value(samples, "ingest_db_write_seconds_count") == value(samples, "ingest_batch_size_count") >= 10
    assert value(samples, "ingest_http_requests_total", code="201") == 10
    assert value(samples, "ingest_http_requests_total", code="202") == 1
    assert value(samples, "ingest_http_requests_total", code="400") == 1
    assert value(samples, "ingest_messages_rejected_total", reason="invalid", client="anonymous") == 1
    assert value(samples, "ingest_queue_depth") == 0
    assert value(samples, "ingest_db_pool_in_use") == 0


def test_two_services_in_one_process_have_separate_registries(make_service) -> None:
    first, second = make_service(), make_service()
    assert post_json(first.url, {"a": 1}, query="?ack=commit").status == 201
    assert value(scrape(first.url), "ingest_messages_stored_total") == 1
    assert value(scrape(second.url), "ingest_messages_stored_total") == 0


def test_counted_histogram_matches_prometheus_semantics() -> None:
    from prometheus_client import CollectorRegistry, Histogram

    from ingest.metrics import CountedHistogram

    buckets = (0.01, 0.1, 1.0)
    ours_registry, reference_registry = CollectorRegistry(), CollectorRegistry()
    ours = CountedHistogram("h_seconds", "h", buckets, ours_registry)
    reference = Histogram("h_seconds", "h", buckets=buckets, registry=reference_registry)
    for value, count in [(0.001, 3), (0.01, 2), (0.5, 4), (7.0, 1)]:
        ours.observe(value, count)
        for _ in range(count):
            reference.observe(value)
    for le in ("0.01", "0.1", "1.0", "+Inf"):
        sample = ("h_seconds_bucket", {"le": le})
        assert ours_registry.get_sample_value(*sample) == reference_registry.get_sample_value(*sample), le
    for name in ("h_seconds_count", "h_seconds_sum"):
        assert ours_registry.get_sample_value(name) == reference_registry.get_sample_value(name)


def test_listener_counter_exposes_what_a_labelled_counter_does() -> None:
    """ListenerCounter stands in for prometheus_client's Counter on the listener's hot path:
    the same samples (totals and _created) by label value, zeroes for values added first, values
    counted without being added, and a scrape from another thread while the loop counts."""
    import threading

    from prometheus_client import CollectorRegistry, Counter, generate_latest

    from ingest.metrics import ListenerCounter

    ours_registry, reference_registry = CollectorRegistry(), CollectorRegistry()
    ours = ListenerCounter("x_requests", "x", "code", ours_registry)
    reference = Counter("x_requests", "x", ["code"], registry=reference_registry)
    for code in (200, 503):
        ours.add(code)
        reference.labels(str(code))
    ours.add(200)  # twice: still one series, still counting from 0
    for code, amount in [(200, 3), (418, 1), (200, 2)]:
        ours.inc(code, amount)
        reference.labels(str(code)).inc(amount)

    def samples(registry: CollectorRegistry) -> set[tuple[str, str, float | None]]:
        return {
            (s.name, s.labels["code"], s.value if s.name.endswith("_total") else None)
            for family in text_string_to_metric_families(generate_latest(registry).decode())
            for s in family.samples
        }

    assert samples(ours_registry) == samples(reference_registry)
    assert ("x_requests_total", "200", 5.0) in samples(ours_registry)

    counting = threading.Thread(target=lambda: [ours.inc(n % 700) for n in range(200_000)], name="loop")
    counting.start()
    while counting.is_alive():  # new label values appear while /metrics reads
        generate_latest(ours_registry)
    counting.join()
    assert sum(s.value for s in ours_registry.collect().__next__().samples if s.name.endswith("_total")) == 200_006

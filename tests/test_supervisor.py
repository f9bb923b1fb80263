"""The excepthook is the last line of defence: it counts every death, and leaves when asked."""

import sys
import threading

import pytest

from support.probes import metric


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_hook_counts_deaths_including_systemexit_and_is_restored(make_service, caplog) -> None:
    before = threading.excepthook
    service = make_service(consumers=1)
    assert threading.excepthook is not before

    def exit_quietly() -> None:
        sys.exit(3)  # the default hook would say nothing at all

    for name, target in [("listener-helper", exit_quietly), ("consumer-1", exit_quietly)]:
        thread = threading.Thread(target=target, name=name)
        thread.start()
        thread.join()
    assert metric(service, "ingest_thread_errors_total", {"thread": "consumer-1"}) == 1
    assert metric(service, "ingest_thread_errors_total", {"thread": "other"}) == 1  # bounded labels
    assert "thread consumer-1 died: SystemExit: 3" in caplog.text
    service.stop()
    assert threading.excepthook is before


def test_consumer_that_finished_on_purpose_is_not_replaced(make_service) -> None:
    service = make_service(consumers=2)
    victim = service.supervisor.consumers()[1]
    assert service.supervisor.check() == 0  # nothing to do while all live
    service.shutdown.hard_stop.set()  # ends every consumer's loop, as the drain deadline would
    victim.join(10)
    service.shutdown.hard_stop.clear()
    # A consumer that returned on purpose is finished, not dead: the supervisor leaves it be.
    assert victim.finished and service.supervisor.check() == 0


def test_a_listener_that_ends_stops_the_service_with_exit_code_4(sqlite_url) -> None:
    from ingest.config import Settings
    from ingest.service import EXIT_LISTENER_DIED, Service

    service = Service(Settings.from_mapping({"port": 0, "db_url": sqlite_url, "consumers": 1}))
    service.start()
    assert service.health.healthy()
    service.listener.stop()  # its loop ends, as it would after a crash
    service.listener.join(10)
    assert not service.health.healthy()
    assert service.run() == EXIT_LISTENER_DIED  # the main loop notices, drains and stops
    assert not any(c.is_alive() for c in service.supervisor.consumers())

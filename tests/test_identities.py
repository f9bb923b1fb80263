"""A request's identities in one short string and back: what the stream and the spool keep."""

from __future__ import annotations

import pytest

from ingest import identities
from ingest.http.identity import Generator, from_field, from_key


@pytest.mark.parametrize("count", [1, 2, 100])
@pytest.mark.parametrize("make", [lambda n: Generator().take(n), lambda n: from_key("a%b:0", n)],
                         ids=["generated", "keyed"])
def test_a_run_of_identities_is_one_string_and_comes_back_whole(make, count) -> None:
    idents = make(count)
    form = identities.compact(idents[0], idents[-1], count)
    assert form is not None and len(form) <= len(idents[0])
    assert identities.expand(form, count) == idents


def test_a_generator_past_its_first_counters_still_compacts() -> None:
    generator = Generator()
    generator.take(0xFFFF)
    idents = generator.take(3)
    assert identities.expand(identities.compact(idents[0], idents[-1], 3) or "", 3) == idents


@pytest.mark.parametrize(("first", "last", "count"), [
    ("g:p:000000000001", "g:p:000000000005", 3),  # not consecutive
    ("g:p:xyz", "g:p:xyz", 1),  # not a counter
    ("k:key:1", "k:key:3", 3),  # not from index 0
    ("f:1", "f:3", 3),  # from a field: no run
    ("", "", 2),  # none
])
def test_what_is_not_a_run_has_no_compact_form(first, last, count) -> None:
    assert identities.compact(first, last, count) is None


def test_field_identities_are_never_mistaken_for_a_run() -> None:
    idents = from_field(['{"id": "g:p:000000000001"}', '{"id": "g:p:000000000002"}'], "id")
    assert identities.compact(idents[0], idents[-1], 2) is None


def test_a_string_of_no_known_form_is_an_error() -> None:
    with pytest.raises(ValueError, match="identity"):
        identities.expand("z:x", 2)


@pytest.mark.parametrize(("start", "count"), [(0, 1), (0, 100), (250, 10), (255, 1), (256, 1), (200, 600),
                                              (0xFFFF, 3), (16**12 - 2, 2), (5, 0)])
def test_runs_made_in_bulk_are_the_identities_made_one_by_one(start, count) -> None:
    """The table of last digits crosses its 256-boundaries right, and keys are indexed from 0."""
    assert identities.generated_run("g:p:", start, count) == [identities.generated("g:p:", n)
                                                              for n in range(start, start + count)]
    assert identities.keyed_run("a:%b", count) == [identities.keyed("a:%b", n) for n in range(count)]

"""The coverage-guided fuzz target for request decoding, run for a bounded time (15 s) on every
test run; the seeds are in tests/http/fuzz/corpus. A crash it finds fails this test and leaves the
input in a crash-* file: turn it into a case in test_decoding.py, then fix the decoder."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

FUZZ = Path(__file__).parent / "fuzz"


def test_the_decoder_survives_fifteen_seconds_of_coverage_guided_fuzzing(tmp_path: Path) -> None:
    corpus = tmp_path / "corpus"  # libFuzzer adds what it finds to its first directory
    shutil.copytree(FUZZ / "corpus", corpus)
    done = subprocess.run(
        [sys.executable, str(FUZZ / "fuzz_decoding.py"), "-max_total_time=15", "-rss_limit_mb=2048",
         f"-artifact_prefix={tmp_path}/", str(corpus)],
        capture_output=True, text=True, timeout=120,
    )
    crashes = sorted(p.name for p in tmp_path.glob("crash-*"))
    assert done.returncode == 0 and not crashes, f"{crashes}\n{done.stderr[-3000:]}"
    assert "Done" in done.stderr and " runs in " in done.stderr

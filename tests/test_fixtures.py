"""The test harness's own Ray head start-up: a failed start is retried once, then reported with
the head's logs, and leaves no process behind."""

from __future__ import annotations

import sys

import psutil
import pytest

from tests.conftest import start_head_process


def test_failed_head_start_retries_once_and_reports(tmp_path):
    calls = []

    def cmd(port):
        calls.append(port)
        # A stand-in for a `ray start` that fails, naming its temp dir as Ray's processes do.
        return [sys.executable, "-c", f"import sys; sys.stderr.write('no agent {tmp_path}'); sys.exit(1)"]

    with pytest.raises(RuntimeError, match=r"(?s)failed twice.*attempt 1.*no agent.*attempt 2.*no logs under"):
        start_head_process(cmd, tmp_path)
    assert len(calls) == 2 and calls[0] != calls[1]
    assert not [p for p in psutil.process_iter(["cmdline"])
                if str(tmp_path) in " ".join(p.info["cmdline"] or [])]

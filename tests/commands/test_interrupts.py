"""Ctrl-C and SIGTERM always stop `series --output`: exit 130 / 143, no output file, no temporary file.

The signals are sent by the process to itself at chosen moments (a hook wraps the code running at
that moment), so each case lands where it is meant to, however busy the machine is: before the
analysis, during it, inside llvmlite's object-cache callback while the kernel compiles with a cold
Numba cache (where a KeyboardInterrupt used to be swallowed), and in the middle of the write.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from tiny_models import save_tiny_bert

HOOKED = r"""
import os, signal, sys

SIGNAL, MOMENT = int(os.environ["TEST_SIGNAL"]), os.environ["TEST_MOMENT"]


def kill_self():
    os.kill(os.getpid(), SIGNAL)


if MOMENT == "compile":  # inside the ctypes callback llvmlite calls while Numba caches the kernel
    from llvmlite.binding import executionengine as ee

    original = ee.ExecutionEngine._raw_object_cache_notify

    def notify(self, data):
        kill_self()
        return original(self, data)

    ee._notify_c_hook = ee._ObjectCacheNotifyFunc(notify)
elif MOMENT == "analysis":
    import dora_analysis.analysis.series as series

    analyze = series.analyze_series

    def analyze_series(*args, **kwargs):
        kill_self()
        return analyze(*args, **kwargs)

    series.analyze_series = analyze_series
elif MOMENT == "write":  # the temporary file is written, not yet named
    real_fsync = os.fsync

    def fsync(fd):
        kill_self()
        return real_fsync(fd)

    os.fsync = fsync
import dora_analysis.commands.main as cli

if MOMENT == "start":  # the command line is being parsed
    parser = cli.build_parser

    def build_parser():
        kill_self()
        return parser()

    cli.build_parser = build_parser
sys.exit(cli.main(sys.argv[1:]))
"""

MOMENTS = ["start", "analysis", "compile", "write"]
CASES = [(signal.SIGINT, m) for m in MOMENTS] + [(signal.SIGTERM, m) for m in ("compile", "write")]


@pytest.mark.slow
def test_every_interrupt_stops_with_no_output(tmp_path: Path) -> None:
    save_tiny_bert(tmp_path / "base", seed=0)
    save_tiny_bert(tmp_path / "tuned", seed=1)
    processes = {}
    for signum, moment in CASES:  # all at once: they wait on the machine, not on each other
        work = tmp_path / f"{signum.name}-{moment}"
        work.mkdir()
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join(sys.path),
            "NUMBA_CACHE_DIR": str(work / "numba-cache"),  # cold: the kernel compiles and is cached
            "TEST_SIGNAL": str(int(signum)),
            "TEST_MOMENT": moment,
        }
        command = [sys.executable, "-c", HOOKED, "series", str(tmp_path / "base"), str(tmp_path / "tuned")]
        processes[signum, moment, work] = subprocess.Popen(
            [*command, "--output", str(work / "deltas.csv")],
            cwd=work,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
    for (signum, moment, work), process in processes.items():
        out, err = process.communicate(timeout=300)
        assert process.returncode == 128 + signum, (signum.name, moment, err)
        assert err.strip().splitlines()[-1:] == ["interrupted"] and "Traceback" not in err, (moment, err)
        left = sorted(p.name for p in work.iterdir() if p.name != "numba-cache")
        assert left == [], (signum.name, moment, left)  # no deltas.csv, no .dora-*.tmp


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_inside_the_llvmlite_callback_is_raised_once_back_in_python(signum, monkeypatch) -> None:
    """The handler never raises inside llvmlite (it would be swallowed) but asks again a moment later."""
    import threading

    from dora_analysis.commands import interrupts

    asked = []
    monkeypatch.setattr(interrupts, "_in_ctypes_callback", lambda frame: True)
    monkeypatch.setattr(threading.Timer, "start", lambda self: asked.append(self.args))
    interrupts._received.clear()
    interrupts._handler(signum, None)  # deferred: no exception here
    assert asked == [(signum,)]
    with pytest.raises(KeyboardInterrupt) as raised:
        interrupts.raise_if_interrupted()  # checked before any output is written
    assert isinstance(raised.value, interrupts.Terminated) == (signum == signal.SIGTERM)
    interrupts._received.clear()

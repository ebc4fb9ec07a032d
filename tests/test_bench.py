"""The benchmark script keeps working. Its figures are not checked here (performance is measured,
not asserted in tests): --quick sizes are far too small to mean anything."""

import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).parent / "perf" / "bench.py"


def test_benchmark_runs_every_section_and_prints_every_target():
    proc = subprocess.run([sys.executable, str(BENCH), "--quick"], capture_output=True, text=True,
                          timeout=300)
    out = proc.stdout + proc.stderr
    # 0: every target met, 1: some missed; anything else is the script breaking.
    assert proc.returncode in (0, 1), out
    for heading in ("1. Overhead", "2. Makespan", "3. Against a naive script", "4. Scale",
                    "5. --concurrency auto", "6. Polling economy"):
        assert heading in out, out
    # 9 in sections 1-4; 4 per account (L = 2, 4 in --quick) in section 5; 1 in section 6
    assert out.count("(target ") == 9 + 2 * 4 + 1, out
    assert "Traceback" not in out


def test_memory_benchmark_runs():
    script = Path(__file__).parent / "perf" / "memory.py"
    proc = subprocess.run([sys.executable, str(script), "--quick"], capture_output=True, text=True, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode in (0, 1), out
    assert "peak RSS with 10 local images inline" in out and "Traceback" not in out

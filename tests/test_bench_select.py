"""bench/bench_select.py: a small run works and its checks pass; the CPU target is judged on the
paired measurement; the Flex way's selection is the contract's."""

from __future__ import annotations

import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "bench")

pytest.importorskip("torch.nn.attention.flex_attention")


@pytest.fixture(scope="module")
def bench():
    sys.path.insert(0, BENCH)
    try:
        import bench_select
        import select_report

        yield bench_select, select_report
    finally:
        sys.path.remove(BENCH)


def test_small_run_in_process(bench, capsys):
    """Every case at N=512: attndsl and the Flex way agree, the selection check finds no
    differing pair, and the CPU target (no 4K row here) is reported as not measured."""
    bench_select, _ = bench
    status = bench_select.main(["--lengths", "512", "--mask-n", "256", "--reps", "1",
                                "--budget", "0.5"])
    out = capsys.readouterr().out
    assert status == 0, out
    assert out.count("0 of 262144 pairs differ") == 3          # 4 heads x 256 x 256, 3 cases
    assert "the run has no such row" in out
    assert "**FAIL**" not in out and "Errors:" not in out


def test_cpu_target_uses_the_paired_measurement(bench):
    _, report = bench

    def cpu_line(row) -> str:
        return next(line for line in report.targets([row], on_gpu=False)
                    if "MoBA top-2 of 32" in line)

    dense = report.DenseRef(report.CPU_TARGET_N, attndsl=0.100)
    row = report.SelRow(report.CPU_TARGET_CASE, "MoBA", report.CPU_TARGET_N, block=128,
                        attndsl=0.045, dense=dense)
    assert cpu_line(row).startswith("- FAIL")                       # 0.45x, times taken apart
    row.paired = (0.030, 0.100, 0.033, 0.101)                       # 0.30x paired
    line = cpu_line(row)
    assert line.startswith("- PASS") and "0.300x" in line and "0.450x" in line
    row.paired = (0.041, 0.100, 0.042, 0.100)
    assert cpu_line(row).startswith("- FAIL")

"""bench/bench_train.py: its quick run works and its checks pass; the GPU targets are data."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "bench")

pytest.importorskip("torch.nn.attention.flex_attention")


@pytest.fixture(scope="module")
def bench_train():
    sys.path.insert(0, BENCH)
    try:
        import bench_train

        yield bench_train
    finally:
        sys.path.remove(BENCH)


def test_quick_subset_in_process(bench_train, capsys):
    """--quick on three patterns: the gradient check against float64 SDPA passes, every row has
    attndsl and SDPA fwd+bwd times, and Flex is timed or marked n/a with a reason."""
    status = bench_train.main(["--quick", "--patterns", "causal,dilated_256_4,moba"])
    out = capsys.readouterr().out
    assert status == 0, out
    labels = ("causal", "dilated (256, 4)", "MoBA (top 3 of 32-token blocks)")
    for label in (f"| {name} | 256 |" for name in labels):
        row = next(line for line in out.splitlines() if line.startswith(label))
        cells = [c.strip() for c in row.split("|")[1:-1]]
        assert all(cells[i] != "—" for i in (3, 4, 5, 6, 8, 10, 11)), row   # fwd, bwd, fwd+bwd, SDPA, errors
        assert cells[7] == "n/a (below)" or cells[7][0].isdigit(), row
    assert "at N=128" in out and "**FAIL**" not in out and "Errors:" not in out
    if "n/a (below)" in out:
        assert "Flex fwd+bwd not measured: " in out
    import torch

    if not torch.cuda.is_available():
        assert "GPU targets (3): not measured: no GPU" in out
    assert bench_train.MOBA.params["block"] == 256          # restored for bench_cpu's users


def test_gpu_targets_are_data(bench_train):
    """On a GPU the targets are marked: <= 0.9x Flex, <= 0.3x for dilated and strided."""
    import train_report as tr

    rows = [tr.TrainRow("causal", "causal", 2048, attndsl=0.8, flex=1.0),
            tr.TrainRow("dilated_256_4", "dilated", 2048, attndsl=0.4, flex=1.0),
            tr.TrainRow("strided_128", "strided", 2048, attndsl=0.2, flex=1.0),
            tr.TrainRow("bigbird", "BigBird", 2048, attndsl=1.0, flex=1.0)]
    lines = tr.targets(rows, on_gpu=True)
    assert lines[0] == "2 of 4 GPU targets met."
    assert [line.split()[1] for line in lines[2:]] == ["PASS", "MISS", "PASS", "MISS"]
    assert "(GPU target ≤ 0.3x)" in lines[3] and "(GPU target ≤ 0.9x)" in lines[5]
    cpu = tr.targets(rows, on_gpu=False)
    assert all(line.startswith("- not measured: no GPU") for line in cpu[2:])


@pytest.mark.slow
def test_quick_run():
    """--quick, every pattern, as a command: exit 0, every check passes."""
    run = subprocess.run([sys.executable, os.path.join(BENCH, "bench_train.py"), "--quick"],
                         capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    out = run.stdout
    for label in ("causal", "sliding window 1024", "dilated (256, 4)", "packed documents (16)",
                  "Longformer (w 512, g 64)", "BigBird (block 64; 1, 2, 3)", "strided (stride 128)"):
        assert f"| {label} | 256 |" in out
    assert "**FAIL**" not in out and "Errors:" not in out

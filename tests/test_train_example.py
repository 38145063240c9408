"""examples/train/train.py: a short training run of the attndsl model (sinks + sliding window
with a learned bias table) next to the dense SDPA model, at small sizes (seconds)."""

from __future__ import annotations

import importlib.util
import re

import pytest
from conftest import ROOT

pytest.importorskip("torch")

TRAIN = ROOT / "examples" / "train" / "train.py"
SMALL = ["--batch", "4", "--seq", "128", "--period", "8", "--window", "32", "--layers", "1",
         "--log-every", "20"]


@pytest.fixture(scope="module")
def train():
    spec = importlib.util.spec_from_file_location("attndsl_train_example", TRAIN)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def checks(text: str) -> dict:
    """{check's first words: (PASS/FAIL, its line)} from the script's output."""
    out = {}
    for line in text.splitlines():
        m = re.match(r"(PASS|FAIL) (the loss falls|the curves match|gradients at step 0)", line)
        if m:
            out[m.group(2)] = (m.group(1), line)
    return out


def test_float64_run_learns_and_matches_sdpa(train, capsys):
    """120 steps in float64: the gradients at step 0 agree to 1e-10 (bias tables included), the
    loss falls below half its first value, and the curves agree to 1e-6 at every step."""
    status = train.main(["--steps", "120", *SMALL])
    out = capsys.readouterr().out
    got = checks(out)
    assert set(got) == {"gradients at step 0", "the loss falls", "the curves match"}, out
    assert all(v[0] == "PASS" for v in got.values()), out
    assert status == 0
    assert "bias tables learned" in out and "tolerance 1e-06" in out
    assert re.search(r"^\s+119\s+\d", out, re.M), out          # the last step is printed


def test_bias_tables_receive_gradients(train):
    """Through attndsl, every layer's bias table gets a nonzero gradient equal to the dense
    model's (float64, one batch)."""
    import torch

    torch.manual_seed(0)
    models = [train.LM(16, 32, 2, 2, 8, attend).double()
              for attend in (train.AttndslAttention(2, 8, "torch"), train.DenseAttention(2, 8))]
    models[1].load_state_dict(models[0].state_dict())
    for m in models:                       # a non-zero table: distances differ from the start
        for block in m.blocks:
            torch.nn.init.normal_(block.rel, std=0.5)
    models[1].load_state_dict(models[0].state_dict())
    x, y = train.batch(torch.Generator().manual_seed(1), 2, 40, 6, 16)
    for m in models:
        train.loss_of(m, x, y).backward()
    for a, b in zip(models[0].blocks, models[1].blocks):
        assert a.rel.grad is not None and float(a.rel.grad.abs().max()) > 1e-6
        torch.testing.assert_close(a.rel.grad, b.rel.grad, rtol=1e-10, atol=1e-12)
    assert train.grad_difference(*models)[0] <= 1e-10


def test_float32_run(train, capsys):
    """float32, 30 steps: gradients at step 0 agree to 1e-4 and the loss has started to fall."""
    status = train.main(["--steps", "30", "--dtype", "float32", "--max-ratio", "0.97", *SMALL])
    out = capsys.readouterr().out
    got = checks(out)
    assert len(got) == 3 and all(v[0] == "PASS" for v in got.values()), out
    assert status == 0


def test_triton_interpreter_backend(train, capsys):
    """The same model through the generated Triton kernels (forward and backward, the bias
    tables' gradients included) under Triton's interpreter: 3 tiny steps in float32, the
    gradients at step 0 agree with the dense model's to 1e-4 and the losses to 1e-3."""
    status = train.main(["--backend", "triton-interpret", "--steps", "3", "--seq", "32", "--batch", "1",
                         "--window", "8", "--layers", "1", "--log-every", "1", "--tol", "1e-3",
                         "--max-ratio", "2"])
    out = capsys.readouterr().out
    got = checks(out)
    verdict, line = got["gradients at step 0"]
    assert verdict == "PASS" and "tolerance 0.0001" in line, out
    assert got["the curves match"][0] == "PASS", out
    assert status == 0, out

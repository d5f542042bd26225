"""`tts-server diagnose erank` (tts_server/tools/erank.py): the effective rank against matrices
whose answer is known, the comparison with a reference, and on SmolLM2-135M against a copy whose
layer-10 MLP down projection is cut to rank 4: the drop shows at that layer and nowhere before."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from tts_server.settings import Settings  # noqa: E402
from tts_server.tools.erank import Profile, drops, effective_rank  # noqa: E402


def test_identity_has_full_effective_rank() -> None:
    assert effective_rank(torch.eye(6)) == pytest.approx(6.0, abs=1e-9)
    assert effective_rank(5.0 * torch.eye(6)) == pytest.approx(6.0, abs=1e-9)  # scale-free


def test_a_rank_one_matrix_has_effective_rank_one() -> None:
    u, v = torch.arange(1.0, 9.0), torch.tensor([1.0, -2.0, 0.5, 3.0])
    assert effective_rank(torch.outer(u, v)) == pytest.approx(1.0, abs=1e-6)


def test_unequal_singular_values_by_hand() -> None:
    # Singular values 3 and 1: p = (0.75, 0.25), entropy 0.5623..., eRank 1.7548...
    expected = math.exp(-(0.75 * math.log(0.75) + 0.25 * math.log(0.25)))
    assert expected == pytest.approx(1.75476, abs=1e-5)
    assert effective_rank(torch.diag(torch.tensor([3.0, 1.0]))) == pytest.approx(expected)
    assert effective_rank(torch.zeros(3, 3)) == 0.0


def test_a_random_tall_matrix_is_nearly_full_rank_but_not_quite() -> None:
    gen = torch.Generator().manual_seed(0)
    value = effective_rank(torch.randn(400, 20, generator=gen))
    assert 19.0 < value < 20.0
    # Rows confined to a 5-dimensional subspace: at most 5.
    low = torch.randn(400, 5, generator=gen) @ torch.randn(5, 20, generator=gen)
    assert 3.0 < effective_rank(low) <= 5.0 + 1e-9


def test_drops_lists_the_layers_below_the_reference_by_more_than_the_tolerance() -> None:
    ref = Profile("ref", "d", 2, 10, hidden=[50.0, 60.0, 70.0], mlp=[40.0, 40.0])
    ours = Profile("ours", "d", 2, 10, hidden=[50.0, 55.0, 30.0], mlp=[40.0, 4.0])
    found = drops(ours, ref, tolerance=0.1)
    # hidden[1] is 0.92x (within 10%); hidden[2] (after layer 1) and mlp layer 1 are not.
    assert [(d.series, d.layer, round(d.ratio, 3)) for d in found] == [
        ("hidden", 1, 0.429),
        ("mlp", 1, 0.1),
    ]
    assert drops(ref, ref, tolerance=0.0) == []


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "tts_server.cli", "diagnose", "erank", *args]
    return subprocess.run(argv, capture_output=True, text=True, timeout=900)


def test_bad_arguments_are_one_line_errors(tmp_path: Path) -> None:
    done = _cli("--model", str(tmp_path), "--limit", "2", "--quiet")
    assert done.returncode == 2 and f"--model: no config.json in {tmp_path}" in done.stderr
    done = _cli("--model", str(tmp_path), "--dataset", "no-such-set", "--quiet")
    assert done.returncode == 2 and done.stderr.startswith("error: --dataset")
    assert "Traceback" not in done.stderr


@pytest.mark.integration
def test_a_rank_4_projection_shows_as_a_drop_at_its_layer(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = Settings().embedded_model_dir
    if not (source / "config.json").exists():
        pytest.fail(f"{source} is missing: run `make install`")
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    proj = model.model.layers[10].mlp.down_proj
    u, s, vh = torch.linalg.svd(proj.weight.data, full_matrices=False)
    proj.weight.data = (u[:, :4] * s[:4]) @ vh[:4]
    compressed = tmp_path / "smollm2-rank4"
    model.save_pretrained(compressed)
    AutoTokenizer.from_pretrained(source).save_pretrained(compressed)
    del model

    out = tmp_path / "report"
    args = ("--model", str(compressed), "--reference", str(source), "--limit", "8")
    done = _cli(*args, "--out", str(out), "--quiet")
    assert done.returncode == 0, done.stderr
    report = json.loads((out / "erank.json").read_text())
    ours, ref = report["model"], report["reference"]
    assert len(ours["mlp"]) == 30 and len(ours["hidden"]) == 31  # SmolLM2-135M: 30 layers
    # The same weights up to layer 10: the same eRank, layer for layer.
    assert ours["mlp"][:10] == pytest.approx(ref["mlp"][:10], rel=1e-4)
    assert ours["hidden"][:11] == pytest.approx(ref["hidden"][:11], rel=1e-4)
    # Layer 10's MLP output has rank 4 at most; the reference's is far higher.
    assert ours["mlp"][10] <= 4.0 and ref["mlp"][10] > 40.0
    found = {(d["series"], d["layer"]) for d in report["below_reference"]}
    assert ("mlp", 10) in found
    assert not [layer for _, layer in found if layer < 10]
    assert "below the reference: mlp layer 10" in done.stdout
    assert (out / "erank.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

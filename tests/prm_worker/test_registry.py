"""The PRM registry file: the shipped one loads with its entries, broken ones fail with the reason,
entries are selected by name / model id / family, and both CLIs list them."""

from __future__ import annotations

from pathlib import Path

import pytest

from tts_server import cli
from tts_server.prm_worker.__main__ import main as worker_main
from tts_server.prm_worker.backends import BackendError, registry
from tts_server.prm_worker.backends.formats import QWEN_MATH_PRM
from tts_server.prm_worker.backends.registry import RegistryError

SHIPPED = {
    "Qwen/Qwen2.5-Math-PRM-7B": ("qwen2.5-math-prm", "class_head", ("hf", "vllm")),
    "Qwen/Qwen2.5-Math-PRM-72B": ("qwen2.5-math-prm", "class_head", ("hf", "vllm")),
    "Qwen/Qwen2.5-Math-7B-PRM800K": ("qwen2.5-math-prm", "class_head", ("hf", "vllm")),
    "Skywork/Skywork-o1-Open-PRM-Qwen-2.5-1.5B": ("skywork-o1-prm", "value_head", ("hf",)),
    "Skywork/Skywork-o1-Open-PRM-Qwen-2.5-7B": ("skywork-o1-prm", "value_head", ("hf",)),
    "RLHFlow/Llama3.1-8B-PRM-Mistral-Data": ("rlhflow-llama3.1-prm", "token_pair", ("hf",)),
    "RLHFlow/Llama3.1-8B-PRM-Deepseek-Data": ("rlhflow-llama3.1-prm", "token_pair", ("hf",)),
    "peiyi9979/math-shepherd-mistral-7b-prm": ("math-shepherd", "token_pair", ("hf",)),
}


def test_the_shipped_registry_loads_with_every_entry() -> None:
    loaded = registry.shipped()
    found = {
        e.model: (e.family.name, e.family.score.kind, e.family.backends) for e in loaded.entries
    }
    assert found == SHIPPED
    assert loaded.default.model == "Qwen/Qwen2.5-Math-PRM-7B"
    assert all(family.source for family in loaded.families.values())


def test_the_default_family_is_todays_qwen_format() -> None:
    assert registry.shipped().default.family.format == QWEN_MATH_PRM


def test_the_families_formats_and_readings() -> None:
    families = registry.shipped().families
    skywork = families["skywork-o1-prm"]
    assert (skywork.format.layout, skywork.format.step_tag) == ("token_pieces", "\n")
    assert skywork.score.head == "v_head.summary"
    rlhflow = families["rlhflow-llama3.1-prm"]
    assert (rlhflow.format.layout, rlhflow.format.reply, rlhflow.format.question_sep) == (
        "chat_turns",
        "+",
        " ",
    )
    shepherd = families["math-shepherd"]
    assert (shepherd.format.step_tag, shepherd.format.step_sep) == (" ки", "\n")
    assert (shepherd.score.good_token, shepherd.score.bad_token) == ("+", "-")
    assert families["qwen2.5-math-prm"].score.positive_class == 1


def test_the_registry_file_ships_in_the_wheel() -> None:
    pyproject = (Path(__file__).parents[2] / "pyproject.toml").read_text()
    assert '"tts_server.prm_worker" = ["registry.toml"]' in pyproject


def _broken(old: str, new: str) -> str:
    text = registry.shipped_text()
    assert old in text, old
    return text.replace(old, new, 1)


@pytest.mark.parametrize(
    ("old", "new", "error"),
    [
        (
            'family = "skywork-o1-prm"',
            'family = "skywork"',
            r"prm entry skywork-o1-prm-1.5b: unknown family 'skywork' \(families: qwen2.5",
        ),
        ('backends = ["hf"]', 'backends = ["hf", "sglang"]', r"unknown backend 'sglang'"),
        ('kind = "value_head"', 'kind = "logistic"', r"bad score kind 'logistic' \(known: class"),
        ('layout = "text_tagged"', 'layout = "xml"', r"layout must be one of chat_tagged"),
        ('head = "v_head.summary"', 'hed = "v_head.summary"', r"missing head"),
        ('reply = "+"', 'reply = "+"\nstep_tag = "+"', r"unknown key step_tag"),
        ("positive_class = 1", "positive_class = 2", r"positive_class is 0 or 1"),
        ("positive_class = 1", 'positive_class = "1"', r"positive_class must be a non-empty int"),
        ('tag_in_text = "space"', 'tag_in_text = "drop"', r"tag_in_text must be one of"),
        ('default = "qwen2.5-math-prm-7b"', 'default = "nope"', r"the default 'nope'"),
        ('model = "Qwen/Qwen2.5-Math-PRM-72B"', 'model = "Qwen/Qwen2.5-Math-PRM-7B"', "repeats"),
        ('name = "math-shepherd-mistral-7b"', "name = 7", r"prm entry 7: name must be a string"),
        ("default =", "default = = ", r"not valid TOML"),
    ],
)
def test_a_broken_registry_says_what_is_wrong(old: str, new: str, error: str) -> None:
    with pytest.raises(RegistryError, match=error):
        registry.parse(_broken(old, new), "broken.toml")


def test_vllm_is_refused_for_a_family_it_cannot_serve() -> None:
    text = _broken('backends = ["hf"]', 'backends = ["hf", "vllm"]')  # Skywork's
    with pytest.raises(RegistryError, match=r"vllm backend serves only chat_tagged \+ class_head"):
        registry.parse(text, "broken.toml")


def test_load_reads_a_file_and_names_a_missing_one(tmp_path: Path) -> None:
    path = tmp_path / "mine.toml"
    path.write_text(registry.shipped_text())
    assert len(registry.load(path).entries) == len(SHIPPED)
    with pytest.raises(RegistryError, match="cannot read the PRM registry"):
        registry.load(tmp_path / "none.toml")


def test_adding_a_checkpoint_of_a_known_family_is_one_entry() -> None:
    entry = '\n[[prm]]\nname = "my-prm"\nmodel = "me/My-PRM-1B"\nfamily = "math-shepherd"\n'
    mine = registry.parse(registry.shipped_text() + entry, "mine.toml")
    found = mine.find("me/My-PRM-1B")
    assert found is not None and found.name == "my-prm"
    assert found.family is mine.families["math-shepherd"]


# --- selection ---


def test_select_by_name_model_id_or_family() -> None:
    shipped = registry.shipped()
    by_name = registry.select(shipped, prm="skywork-o1-prm-7b", family=None, model=None)
    assert by_name.model == "Skywork/Skywork-o1-Open-PRM-Qwen-2.5-7B"
    assert by_name.family.name == "skywork-o1-prm"
    local = registry.select(shipped, prm="RLHFlow/Llama3.1-8B-PRM-Mistral-Data", family=None,
                            model="/models/rlhflow")  # fmt: skip
    assert (local.model, local.family.name) == ("/models/rlhflow", "rlhflow-llama3.1-prm")
    folder = registry.select(shipped, prm=None, family="math-shepherd", model="/models/ms")
    assert (folder.model, folder.family.name, folder.entry) == ("/models/ms", "math-shepherd", None)
    # Neither: an entry whose model id is --model, else the default's (today's Qwen) family.
    known = registry.select(
        shipped, prm=None, family=None, model="peiyi9979/math-shepherd-mistral-7b-prm"
    )
    assert known.family.name == "math-shepherd"
    default = registry.select(shipped, prm=None, family=None, model="/models/some-prm")
    assert (default.model, default.family.name) == ("/models/some-prm", "qwen2.5-math-prm")


@pytest.mark.parametrize(
    ("prm", "family", "model", "error"),
    [
        ("no-such-prm", None, None, r"no PRM 'no-such-prm' in the registry \(entries: qwen2.5"),
        (None, "nope", "/m", r"unknown PRM family 'nope' \(known: qwen2.5-math-prm, skywork"),
        (None, "math-shepherd", None, r"--family math-shepherd needs --model"),
        ("qwen2.5-math-prm-7b", "math-shepherd", "/m", r"--prm or --family, not both"),
    ],
)
def test_select_errors(prm: str | None, family: str | None, model: str | None, error: str) -> None:
    with pytest.raises(BackendError, match=error):
        registry.select(registry.shipped(), prm=prm, family=family, model=model)


# --- the CLIs ---


def _listed(output: str) -> dict[str, list[str]]:
    rows = [line.split() for line in output.strip().splitlines()]
    assert rows[0] == ["NAME", "FAMILY", "SCORE", "BACKENDS", "MODEL"]
    return {row[-1]: [c for c in row[:-1] if c != "(default)"] for row in rows[1:]}


def test_the_worker_lists_the_registry(capsys: pytest.CaptureFixture[str]) -> None:
    assert worker_main(["--list"]) == 0
    listed = _listed(capsys.readouterr().out)
    assert set(listed) == set(SHIPPED)
    for model, (family, kind, backends) in SHIPPED.items():
        assert listed[model][1:] == [family, kind, ",".join(backends)]
    assert listed["RLHFlow/Llama3.1-8B-PRM-Deepseek-Data"][0] == "rlhflow-llama3.1-8b-prm-deepseek"


def test_tts_server_prm_worker_lists_the_same(capsys: pytest.CaptureFixture[str]) -> None:
    assert worker_main(["--list"]) == 0
    expected = capsys.readouterr().out
    assert cli.main(["prm-worker", "--list"]) == 0
    out = capsys.readouterr().out
    assert out == expected and "(default)" in out


def test_the_worker_names_an_unknown_prm(capsys: pytest.CaptureFixture[str]) -> None:
    assert worker_main(["--backend", "hf", "--prm", "gpt-prm"]) == 2
    assert "no PRM 'gpt-prm' in the registry" in capsys.readouterr().err
    assert worker_main(["--backend", "arith", "--prm", "qwen2.5-math-prm-7b"]) == 2
    assert "--prm and --family are for the hf and vllm backends" in capsys.readouterr().err
    assert worker_main(["--backend", "vllm", "--vllm-url", "http://127.0.0.1:9",
                        "--prm", "math-shepherd-mistral-7b"]) == 2  # fmt: skip
    assert "vllm backend cannot serve the math-shepherd family" in capsys.readouterr().err


def test_tts_server_forwards_the_prm_options(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[list[str]] = []
    monkeypatch.setattr(cli.os, "execv", lambda _exe, argv: seen.append(argv))
    monkeypatch.setenv("TTS_PRM_NAME", "skywork-o1-prm-7b")
    cli.main(["prm-worker", "--backend", "hf", "--model", "/m"])
    cli.main(["prm-worker", "--backend", "arith"])  # the arith checker has no model to name
    monkeypatch.delenv("TTS_PRM_NAME")
    cli.main(["prm-worker", "--backend", "hf", "--family", "skywork-o1-prm", "--model", "/m"])
    named, arith, family = seen
    assert named[named.index("--prm") + 1] == "skywork-o1-prm-7b"
    assert "--prm" not in arith
    assert family[family.index("--family") + 1] == "skywork-o1-prm" and "--prm" not in family

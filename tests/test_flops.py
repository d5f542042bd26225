"""FLOPs per answer: parameter counts from configs, the formula, and the never-exceeded ceiling."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.support.fakes import FakePolicy, FakePRM, encode, per_step
from tts_server.accounting import Account
from tts_server.flops import FlopsCounter, ModelShape, context_sum, shape_from_config
from tts_server.strategies import REGISTRY
from tts_server.types import PolicyUsage, PRMUsage, Problem, SearchConfig

SMOLLM2 = {
    "model_type": "llama",
    "hidden_size": 576,
    "intermediate_size": 1536,
    "num_hidden_layers": 30,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "head_dim": 64,
    "vocab_size": 49152,
    "tie_word_embeddings": True,
    "attention_bias": False,
}


def test_smollm2_parameter_count() -> None:
    shape = shape_from_config(SMOLLM2)
    # 30 layers x 3,540,096 + final norm 576 + the tied 49152 x 576 matrix, counted once.
    assert shape.parameters == 134_515_008
    assert (shape.layers, shape.attention_width) == (30, 576)


@pytest.mark.parametrize("family", ["llama", "qwen2"])
@pytest.mark.parametrize("tied", [True, False])
def test_count_matches_transformers_weights(family: str, tied: bool) -> None:
    """Our formula against the real weights of a tiny model: every weight but the input table."""
    try:
        import transformers
    except ImportError:  # a failure, not a skip: a skip went unseen in `make test-unit`
        pytest.fail("transformers is not installed: this check needs it (make install-gateway)")
    config = {
        "hidden_size": 64,
        "intermediate_size": 96,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": 300,
        "tie_word_embeddings": tied,
    }
    cls = transformers.Qwen2Config if family == "qwen2" else transformers.LlamaConfig
    model = transformers.AutoModelForCausalLM.from_config(cls(**config))
    weights = sum(p.numel() for p in model.parameters())
    expected = weights if tied else weights - model.get_input_embeddings().weight.numel()
    assert shape_from_config(json.loads(model.config.to_json_string())).parameters == expected


@pytest.mark.parametrize("labels", [2, 3])
def test_a_token_classification_prm_counts_its_head_not_a_vocabulary(labels: int) -> None:
    """The `hf` backend's PRMs: the classifier head replaces the vocabulary projection."""
    import transformers

    config = transformers.Qwen2Config(
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=300,
        num_labels=labels,
        architectures=["Qwen2ForTokenClassification"],
    )
    model = transformers.Qwen2ForTokenClassification(config)
    weights = sum(p.numel() for p in model.parameters())
    expected = weights - model.get_input_embeddings().weight.numel()
    assert shape_from_config(json.loads(config.to_json_string())).parameters == expected


def test_policy_flops_formula_and_cache_savings() -> None:
    counter = FlopsCounter(ModelShape(1000, layers=2, attention_width=8), ModelShape(50))
    usage = PolicyUsage(prompt_tokens=100, completion_tokens=20, cached_tokens=64)
    flops = counter.count(usage, PRMUsage(tokens=30))
    assert flops is not None
    assert flops.policy == 2 * 1000 * (100 - 64 + 20)
    assert flops.saved_by_cache == 2 * 1000 * 64
    assert flops.prm == 2 * 50 * 30
    assert flops.total == flops.policy + flops.prm


def test_attention_term_is_added_only_when_asked() -> None:
    shape = ModelShape(1000, layers=2, attention_width=8)
    usage = PolicyUsage(prompt_tokens=10, completion_tokens=5, context_computed=context_sum(0, 15))
    plain = FlopsCounter(shape, ModelShape(0)).count(usage, PRMUsage())
    full = FlopsCounter(shape, ModelShape(0), include_attention=True).count(usage, PRMUsage())
    assert plain is not None and full is not None
    assert full.policy - plain.policy == 4 * 2 * 8 * sum(range(15))
    assert full.attention_included and not plain.attention_included


def test_unknown_parameters_give_no_count() -> None:
    assert FlopsCounter(None, ModelShape(0)).count(PolicyUsage(), PRMUsage()) is None


def test_shape_from_folder(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps(SMOLLM2))
    from tts_server.flops import shape_from_path

    assert shape_from_path(tmp_path).parameters == 134_515_008


# --- the ceiling: never exceeded, whatever the plan ---

PROBLEM = Problem(question="How many apples?", prompt_ids=tuple(encode("Q: How many apples?\nA:")))


def rambling(prompt: list[int], sample: int) -> str:
    return f"Step one {sample}.\n\n2 + 3 = 5\n\nMore words here.\n\nThe answer is {sample % 3}."


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    strategy=st.sampled_from(["greedy", "majority", "best_of_n", "beam_search", "dvts"]),
    width=st.sampled_from([1, 2, 4]),
    multiple=st.integers(1, 4),
    max_tokens=st.integers(8, 300),
    ceiling=st.integers(1, 3_000_000),
    prm_params=st.sampled_from([0, 10, 1000]),
    attention=st.booleans(),
)
def test_flops_ceiling_is_never_exceeded(
    strategy: str,
    width: int,
    multiple: int,
    max_tokens: int,
    ceiling: int,
    prm_params: int,
    attention: bool,
) -> None:
    counter = FlopsCounter(
        ModelShape(1000, layers=2, attention_width=4), ModelShape(prm_params), attention
    )
    account = Account(counter, ceiling)
    prm = FakePRM(per_step(lambda step: 0.9 if "= 5" in step else 0.4))

    # The fake PRM reports tokens like a real worker: bytes of what it read.
    original = prm.score

    async def scoring(question, solutions, usage, *, context=None, affinity=None):  # type: ignore[no-untyped-def]
        usage.tokens += sum(len(question) + sum(len(s) for s in steps) for steps in solutions)
        return await original(question, solutions, usage, context=context, affinity=affinity)

    prm.score = scoring  # type: ignore[method-assign]
    config = SearchConfig(
        budget=width * multiple,
        beam_width=width,
        max_tokens=max_tokens,
        max_step_tokens=min(40, max_tokens),
        max_iterations=10,
    )
    policy, metered_prm = account.wrap(FakePolicy(rambling), prm)
    result = asyncio.run(REGISTRY[strategy].run(PROBLEM, config, policy, metered_prm))
    spent = counter.count(result.policy_usage, result.prm_usage)
    assert spent is not None
    assert spent.total <= ceiling
    assert spent.total == account.spent


def test_a_binding_ceiling_shrinks_the_request() -> None:
    counter = FlopsCounter(ModelShape(1000), ModelShape(0))
    config = SearchConfig(budget=8, max_tokens=200)
    free = asyncio.run(REGISTRY["majority"].run(PROBLEM, config, FakePolicy(rambling), None))
    unlimited = counter.count(free.policy_usage, free.prm_usage)
    assert unlimited is not None
    account = Account(counter, unlimited.total // 2)
    policy, _ = account.wrap(FakePolicy(rambling), FakePRM(per_step(lambda step: 0.5)))
    capped = asyncio.run(REGISTRY["majority"].run(PROBLEM, config, policy, None))
    spent = counter.count(capped.policy_usage, capped.prm_usage)
    assert spent is not None and spent.total <= unlimited.total // 2
    assert account.limited


class Yielding:
    """A FakePolicy whose calls take a little time, so DVTS's subtrees overlap for real."""

    def __init__(self, inner: FakePolicy, delay_s: float = 0.002) -> None:
        self.inner, self.delay_s = inner, delay_s

    async def generate(self, prompts, sampling, usage, *, n=1, affinity=None):  # type: ignore[no-untyped-def]
        await asyncio.sleep(self.delay_s)
        return await self.inner.generate(prompts, sampling, usage, n=n, affinity=affinity)


@pytest.mark.parametrize("ceiling", [60_000, 150_000, 400_000, 900_000, 2_000_000])
def test_concurrent_subtrees_stay_under_the_ceiling_together(ceiling: int) -> None:
    """DVTS's subtrees call at the same time: each call reserves its worst case, so what they
    spend together never passes the ceiling (checking `remaining` alone, two calls could each
    see the same room)."""
    counter = FlopsCounter(ModelShape(1000), ModelShape(10))
    account = Account(counter, ceiling)
    prm = FakePRM(per_step(lambda step: 0.9 if "= 5" in step else 0.4))
    policy, metered_prm = account.wrap(Yielding(FakePolicy(rambling)), prm)  # type: ignore[arg-type]
    config = SearchConfig(
        budget=8, beam_width=2, max_tokens=120, max_step_tokens=40, max_iterations=10
    )
    result = asyncio.run(REGISTRY["dvts"].run(PROBLEM, config, policy, metered_prm))
    spent = counter.count(result.policy_usage, result.prm_usage)
    assert spent is not None
    assert spent.total <= ceiling
    assert spent.total == account.spent
    assert account.reserved == 0


def test_a_stage_counts_the_wall_time_its_calls_overlap_once() -> None:
    account = Account(FlopsCounter(ModelShape(1000), ModelShape(0)))
    policy, _ = account.wrap(Yielding(FakePolicy(rambling), delay_s=0.2), FakePRM(per_step(float)))

    async def two_at_once() -> None:
        sampling_config = SearchConfig(budget=1, max_tokens=20)
        from tts_server.strategies.common import full_sampling

        sampling = full_sampling(sampling_config)
        await asyncio.gather(
            policy.generate([PROBLEM.prompt_ids], sampling, PolicyUsage()),
            policy.generate([PROBLEM.prompt_ids], sampling, PolicyUsage()),
        )

    asyncio.run(two_at_once())
    assert 0.19 < account.generation_s < 0.35  # one 0.2 s stretch, not 0.4

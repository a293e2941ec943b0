"""Tests for hsd.py: python -m pytest -q test_hsd.py (offline, on the tiny models; README).

The central property first: speculative output equals plain greedy output, for every family x draft x k. Then the
state of a round step by step, what a reader meets in a debugger, the command line, and speculative sampling's exact
distribution. The grading tests of the round's exercises (EXERCISES.md) are ordinary tests here, beside the tests of
the function each one grades, whose failure messages speak a student's language; a handout carries this file as it is.
"""
import io
import json
import math
import os
import re
import signal
import statistics
import subprocess
import sys
import traceback
import types
import warnings

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

import cli
import cost_model
import hsd
import hsd_train
import models

HERE = os.path.dirname(os.path.abspath(__file__))
FAMILIES = list(models.TINY)
PROMPTS_IDS = models.char_tokenizer().encode("The cat sat on the mat.").ids
QWEN2_TINY_JSON = {"model_type": "qwen2", "vocab_size": 300, "hidden_size": 64, "intermediate_size": 96,
                   "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                   "tie_word_embeddings": True, "rope_theta": 1e6, "rms_norm_eps": 1e-6, "eos_token_id": 0}


def rel_err(a, b):
    """Relative RMS error of a against the reference b."""
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def teach(ok, message):
    """Unless ok, fail with the message alone: no traceback, no values (what a student reads first)."""
    if not ok:
        pytest.fail(message, pytrace=False)


def kind_of(value):
    """What a value is, in a student's words and without its numbers: "an int", "a tensor of shape (4,)", "a tuple"."""
    if torch.is_tensor(value):
        return f"a tensor of shape {tuple(value.shape)}"
    if value is None:
        return "None"
    name = type(value).__name__
    return f"{'an' if name[0] in 'aeiou' else 'a'} {name}"


def teach_int(value, what):
    """Unless value is a Python int, fail saying what it is: token ids and counts are ints, which the next step
    compares, prints and writes to JSON (a tensor there fails: "Object of type Tensor is not JSON serializable")."""
    teach(type(value) is int, f"{what} is {kind_of(value)}, not an int: token ids and counts are Python ints (a "
                              "tensor cannot be written to JSON, and compares as a tensor); int(x) converts a "
                              "one-element tensor")


def save_checkpoint(model, path, cfg):
    """Write model in the official layout (config.json + model.safetensors)."""
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg, f)
    save_file({k: v.detach() for k, v in model.named_parameters()}, os.path.join(path, "model.safetensors"),
              metadata={"format": "pt"})


# ----------------------------------------------------------------------------------------------------------
# hsd: speculation is lossless

SKIP_NOTHING = models.Skip()        # a draft that leaves nothing out, a test device: it must accept every draft
APPLICABLE = {"tiny-falcon-h1": ["component", "layerskip", "early-exit", "skip-nothing"],
              "tiny-qwen3.5": ["component", "layerskip", "early-exit", "skip-nothing"],
              "tiny-qwen2.5": ["layerskip", "early-exit", "skip-nothing"]}
REAL_DRAFTS = [(n, d) for n, ds in APPLICABLE.items() for d in ds[:-1]]
PROMPTS = {"1-token": [40], "12-token": models.char_tokenizer().encode("The cat sat ").ids}
NEW_TOKENS = 23          # not a multiple of k+1 for any k tested
# The paper's drafts for the tiny models, worked out by hand (README, "Draft strategies"): Falcon-H1 and Qwen2.5 have
# 6 layers (layerskip: int(0.33 * 6) = 1 layer from 3), Qwen3.5 8 (attention at 3 and 7; layerskip: 2 layers from 3).
TINY_SKIPS = {
    "tiny-falcon-h1": {"component": models.Skip(attention=frozenset(range(6))),
                       "layerskip": models.Skip(layers=frozenset({3})),
                       "early-exit": models.Skip(layers=frozenset({3, 4, 5}))},
    "tiny-qwen3.5": {"component": models.Skip(layers=frozenset({3, 7})),
                     "layerskip": models.Skip(layers=frozenset({3, 4})),
                     "early-exit": models.Skip(layers=frozenset({4, 5, 6, 7}))},
    "tiny-qwen2.5": {"layerskip": models.Skip(layers=frozenset({3})),
                     "early-exit": models.Skip(layers=frozenset({3, 4, 5}))},
}

# Every unit a draft can leave out, one draft per unit and family, and one mixing them (models.Skip).
UNIT_SKIPS = {
    "tiny-falcon-h1": {"attention": models.Skip(attention={0, 2, 4}), "recurrent": models.Skip(recurrent={1, 4}),
                       "mlp": models.Skip(mlp={0, 3, 5}),
                       "mixed": models.Skip(layers={2}, attention={0, 1, 3, 4, 5}, recurrent={4}, mlp={1, 5})},
    "tiny-qwen3.5": {"attention": models.Skip(attention={3, 7}), "recurrent": models.Skip(recurrent={1, 5}),
                     "mlp": models.Skip(mlp={0, 3, 6}), "mixed": models.Skip(layers={7}, attention={3},
                                                                             recurrent={0, 5}, mlp={2})},
    "tiny-qwen2.5": {"attention": models.Skip(attention={1, 4}), "mlp": models.Skip(mlp={2, 3}),
                     "mixed": models.Skip(layers={5}, attention={2}, mlp={0})},
}
UNIT_CASES = [(n, u) for n, units in UNIT_SKIPS.items() for u in units]

_models, _greedy = {}, {}


def tiny(name, dtype=torch.float64):
    """Tiny models in float64 for exact comparisons: a near-tie between two logits cannot flip a choice here."""
    if (name, dtype) not in _models:
        _models[name, dtype] = models.load(name, dtype=dtype)
    return _models[name, dtype]


def reference_greedy(name, prompt, n=NEW_TOKENS):
    """Plain greedy decoding by repeated full forwards, no cache at all."""
    key = (name, tuple(prompt), n)
    if key not in _greedy:
        ids = list(prompt)
        with torch.inference_mode():
            for _ in range(n):
                ids.append(int(tiny(name)(torch.tensor([ids]))[0, -1].argmax()))
        _greedy[key] = ids[len(prompt):]
    return _greedy[key]


def as_draft(draft):
    return SKIP_NOTHING if draft == "skip-nothing" else draft


@pytest.mark.parametrize("prompt", list(PROMPTS))
@pytest.mark.parametrize("k", [1, 2, 3, 5, 8], ids=lambda k: f"k{k}")
@pytest.mark.parametrize("name, draft", [(n, d) for n, ds in APPLICABLE.items() for d in ds])
def test_speculative_equals_greedy(name, draft, k, prompt):
    tokens, stats = hsd.generate(tiny(name), PROMPTS[prompt], NEW_TOKENS, draft=as_draft(draft), k=k, eos_token_id=-1)
    assert tokens == reference_greedy(name, PROMPTS[prompt]), "speculative decoding's tokens are not plain greedy's"
    assert stats["new_tokens"] == NEW_TOKENS and stats["drafted"] >= stats["accepted"]
    assert sum(stats["accepted_histogram"]) == stats["rounds"] > 0


@pytest.mark.parametrize("k", [1, 3, 8], ids=lambda k: f"k{k}")
@pytest.mark.parametrize("name, unit", UNIT_CASES)
def test_every_unit_left_out_is_lossless(name, unit, k):
    """A draft that leaves out attention, a recurrent mixer or an MLP (or a mix of them and whole layers) in some
    layers still gives plain greedy decoding's tokens, and is a smaller model: its logits are not the full model's."""
    skip = UNIT_SKIPS[name][unit]
    tokens, stats = hsd.generate(tiny(name), PROMPTS["12-token"], NEW_TOKENS, draft=skip, k=k, eos_token_id=-1)
    assert tokens == reference_greedy(name, PROMPTS["12-token"]), "speculative decoding's tokens are not plain greedy's"
    ids = torch.tensor([PROMPTS["12-token"]])
    assert rel_err(tiny(name)(ids, skip=skip), tiny(name)(ids)) > 1e-3 and stats["rounds"] > 0


@pytest.mark.parametrize("name, unit", [case for case in UNIT_CASES if case[1] != "mixed"])
def test_a_unit_left_out_is_not_computed(name, unit):
    """A draft step leaves the state of the units it leaves out as it was (the recurrent layers' conv windows and
    states are the same tensors; the attention layers' KV buffers are not written), and advances the others."""
    model, cache = filled_cache(name, PROMPTS["12-token"])
    skip, before = UNIT_SKIPS[name][unit], [(s.conv, s.ssm) for s in cache.layers]
    position = cache.length
    model(torch.tensor([[5]]), cache, skip=skip)
    for i, (state, (conv, ssm)) in enumerate(zip(cache.layers, before)):
        if ssm is not None:
            assert (state.ssm is ssm and state.conv is conv) == (i in skip.recurrent), (unit, i)
        if state.keys is not None:
            written = bool(state.keys[:, :, position].abs().sum() > 0)
            assert written == (i not in skip.attention), (unit, i)


@pytest.mark.parametrize("name, bad, message", [
    ("tiny-falcon-h1", models.Skip(layers={99}), "names layer 99 (layers), which the model does not have: its "
                                                 "layers are 0-5"),
    ("tiny-falcon-h1", models.Skip(mlp={-1}), "names layer -1 (mlp)"),
    ("tiny-qwen3.5", models.Skip(attention={0}), "the attention unit of layer 0, a linear_attention layer, which has "
                                                 "none: layers with one: 3, 7"),
    ("tiny-qwen3.5", models.Skip(recurrent={3}), "the recurrent unit of layer 3, a full_attention layer"),
    ("tiny-qwen2.5", models.Skip(recurrent={0}), "no layer of this model has one"),
])
def test_a_skip_naming_what_the_model_does_not_have_is_an_error(name, bad, message):
    """Such a Skip would leave out nothing without a word (its logits would be the full model's)."""
    for call in (lambda: hsd.generate(tiny(name), [1, 2], 4, draft=bad), lambda: tiny(name)(torch.tensor([[1]]),
                                                                                              skip=bad)):
        with pytest.raises(models.UsageError, match=re.escape(message)):
            call()


def test_a_skip_names_its_layers():
    assert str(models.Skip(layers={3, 7})) == "layers 3, 7"
    assert str(hsd.draft_skip(models.TINY["tiny-falcon-h1"], "component")) == "the attention of layers 0-5"
    mixed = UNIT_SKIPS["tiny-falcon-h1"]["mixed"]
    assert str(mixed) == ("layer 2; the attention of layers 0-1, 3-5; the recurrent mixers of layer 4; the MLPs of "
                          "layers 1, 5")
    assert repr(mixed) == "Skip(layers={2}, attention={0, 1, 3, 4, 5}, recurrent={4}, mlp={1, 5})"
    assert eval(repr(mixed), {"Skip": models.Skip}) == mixed and str(models.Skip()) == "nothing"


@pytest.mark.parametrize("name", FAMILIES)
def test_plain_greedy_equals_reference(name):
    tokens, stats = hsd.generate(tiny(name), PROMPTS["12-token"], NEW_TOKENS, draft="none", eos_token_id=-1)
    assert tokens == reference_greedy(name, PROMPTS["12-token"]) and stats["rounds"] == 0


@pytest.mark.parametrize("name", FAMILIES)
def test_a_draft_that_skips_nothing_accepts_everything(name):
    tokens, stats = hsd.generate(tiny(name), PROMPTS["12-token"], NEW_TOKENS, draft=SKIP_NOTHING, k=3, eos_token_id=-1)
    assert stats["alpha"] == 1.0 and all(n == len(drafts) for drafts, n, _ in stats["trace"])
    assert tokens == reference_greedy(name, PROMPTS["12-token"])


def test_real_drafts_see_every_kind_of_round():
    """Across the drafts, rounds accept nothing, some, and all k drafts (the bonus token path)."""
    seen = set()
    for name, draft in REAL_DRAFTS:
        _, stats = hsd.generate(tiny(name), PROMPTS["12-token"], 40, draft=draft, k=2, eos_token_id=-1)
        seen |= {n for _, n, _ in stats["trace"]}
    assert seen == {0, 1, 2}


@pytest.mark.parametrize("name", FAMILIES)
def test_eos_inside_a_round_stops_there(name):
    """With k=5 and a draft that accepts everything, rounds emit 6 tokens; put EOS in the middle of one."""
    reference = reference_greedy(name, PROMPTS["12-token"])
    j = next(j for j in range(8, NEW_TOKENS) if j % 6 not in (0, 5) and reference[j] not in reference[:j])
    tokens, stats = hsd.generate(tiny(name), PROMPTS["12-token"], NEW_TOKENS, draft=SKIP_NOTHING, k=5,
                                 eos_token_id=reference[j])
    assert tokens == reference[:j + 1]


def test_generate_takes_a_tensor_prompt():
    prompt = torch.tensor(PROMPTS["12-token"])
    tokens, _ = hsd.generate(tiny("tiny-qwen2.5"), prompt, NEW_TOKENS, draft="layerskip", k=3, eos_token_id=-1)
    assert tokens == reference_greedy("tiny-qwen2.5", PROMPTS["12-token"])


@pytest.mark.parametrize("name", FAMILIES)
def test_eos_as_the_correction_token(name):
    """EOS chosen by the full model after a rejected draft ends the generation right there."""
    draft = "layerskip"
    _, stats = hsd.generate(tiny(name), PROMPTS["12-token"], NEW_TOKENS, draft=draft, k=2, eos_token_id=-1)
    position, eos = 0, None
    for drafts, n, next_token in stats["trace"]:
        position += n + 1
        if n < len(drafts) and next_token not in reference_greedy(name, PROMPTS["12-token"])[:position - 1]:
            eos = next_token
            break
    tokens, _ = hsd.generate(tiny(name), PROMPTS["12-token"], NEW_TOKENS, draft=draft, k=2, eos_token_id=eos)
    assert eos is not None and tokens == reference_greedy(name, PROMPTS["12-token"])[:position]


@pytest.mark.parametrize("max_new", [1, 2, 7])
def test_never_more_than_max_new_tokens(max_new):
    tokens, _ = hsd.generate(tiny("tiny-falcon-h1"), PROMPTS["12-token"], max_new, draft="component", k=8, eos_token_id=-1)
    assert tokens == reference_greedy("tiny-falcon-h1", PROMPTS["12-token"])[:max_new]


@pytest.mark.parametrize("name, draft", REAL_DRAFTS + [(n, "skip-nothing") for n in FAMILIES])
def test_drafts_are_smaller_models(name, draft):
    """A real draft's logits differ from the full model's; skipping nothing gives exactly the full model's."""
    model = tiny(name)
    ids = torch.tensor([PROMPTS["12-token"]])
    full, drafted = model(ids), model(ids, skip=SKIP_NOTHING if draft == "skip-nothing" else TINY_SKIPS[name][draft])
    assert torch.equal(drafted, full) if draft == "skip-nothing" else rel_err(drafted, full) > 0.05


@pytest.mark.parametrize("name, draft", [("tiny-falcon-h1", "component"), ("tiny-qwen3.5", "component"),
                                         ("tiny-qwen2.5", "layerskip"), ("tiny-falcon-h1", "mixed"),
                                         ("tiny-qwen3.5", "skip-nothing")])
def test_auto_k_and_the_stop_are_lossless(name, draft):
    """k="auto" (its length changing from round to round, its drafts stopping when unsure) and a fixed k with a stop
    give plain greedy decoding's tokens."""
    skip = UNIT_SKIPS[name]["mixed"] if draft == "mixed" else SKIP_NOTHING if draft == "skip-nothing" else draft
    for k, stop in (("auto", None), (3, 0.9), (8, 0.5)):
        chosen = hsd.choose_draft(tiny(name), skip, k)._replace(stop=stop or hsd.AUTO_STOP)
        tokens, stats = hsd.generate(tiny(name), PROMPTS["12-token"], NEW_TOKENS, draft=chosen, eos_token_id=-1)
        assert tokens == reference_greedy(name, PROMPTS["12-token"]), (k, stop)
        assert stats["k"] == k and stats["drafted"] >= stats["accepted"] and stats["stop"] == (stop or hsd.AUTO_STOP)


def test_expected_accepted_is_the_chance_of_each_prefix():
    """Greedy: the drafts accepted (certain). At a temperature: a_1 + a_1 a_2 for two drafts, a_j = 1 - TV(p_j, q_j)
    at the drafts' positions, whichever tokens were drawn (the same for a draft the full model rejects)."""
    L1, L2, Q1, Q2 = sampling_rows("tiny-falcon-h1")
    d1 = int(L1.argmax())
    logits = torch.stack([L1, L2[d1], L2[d1]])                                      # rows after pending, d1, d2
    wrong = (int(L2[d1].argmax()) + 1) % len(L1)                                  # not the full model's choice
    assert hsd.expected_accepted([d1, wrong], None, logits) == float(hsd.accept([d1, wrong], logits)[0]) == 1.0
    p1, p2 = hsd.probabilities(L1, TEMPERATURE), hsd.probabilities(L2[d1], TEMPERATURE)
    q1, q2 = hsd.probabilities(Q1, TEMPERATURE), hsd.probabilities(Q2[d1], TEMPERATURE)
    a1, a2 = (1 - 0.5 * (p - q).abs().sum().item() for p, q in ((p1, q1), (p2, q2)))
    assert 0.05 < a1 < 0.95 and 0.05 < a2 < 0.95
    for d2 in (int(p2.argmax()), int(p2.argmin())):                                  # likely accepted, or not
        got = hsd.expected_accepted([d1, d2], torch.stack([q1, q2]), logits, TEMPERATURE)
        assert got == pytest.approx(a1 + a1 * a2, abs=1e-9)


def test_auto_k_follows_the_rounds_already_judged():
    """All accepted: two more next time; some rejected: one fewer; none accepted: 1. The recent gain (a moving sum of
    each round's tokens made less its cost, round_cost of the costs given: here 0.5 d + 1; a sampled round's tokens
    counted on average, expected_accepted's) below 0: plain steps, the pause doubling while the tries do not pay. A
    draft that skips nothing grows to AUTO_MAX."""
    P, M, costs = hsd.AUTO_PAUSE, hsd.AUTO_MEMORY, cost_model.costs_up_to((0.5, {1: 1.0}, 0.0), hsd.AUTO_MAX)
    assert hsd.auto_k(hsd.Plan(1, 0, P), 1, 1, 1, costs) == (3, 0, P, 0.5)              # 2 tokens for 1.5 steps
    assert hsd.auto_k(hsd.Plan(5, 0, P), 5, 3, 3, costs) == (4, 0, P, 0.5)              # 4 tokens for 3.5 steps
    assert hsd.auto_k(hsd.Plan(5, 0, P), 3, 3, 3, costs)[:3] == (5, 0, P)      # all accepted, but a stop ended it
    assert hsd.auto_k(hsd.Plan(5, 0, P), 5, 0, 0, costs) == (1, P, 2 * P, 0.0)          # 1 token for 3.5 steps: a pause
    plan = hsd.auto_k(hsd.Plan(3, 0, P, 2.0), 3, 0, 0, costs)                  # what came before still carries it
    assert plan[:3] == (1, 0, P) and plan.gain == pytest.approx(M * 2.0 + 1 - 2.5)
    assert hsd.auto_k(hsd.Plan(3, 0, P), 3, 3, 0.2, costs)[:3] == (1, P, 2 * P)   # sampled: 3 kept, 0.2 on average
    assert hsd.auto_k(hsd.Plan(3, 0, P), 3, 0, 2.5, costs)[:3] == (1, 0, P)   # none kept, 2.5 on average: goes on
    assert hsd.auto_k(hsd.Plan(1, 4, 16), 0, 0, 0, costs) == hsd.Plan(1, 3, 16)   # a plain step: one less to wait
    longest = hsd.AUTO_LONGEST_PAUSE
    assert hsd.auto_k(hsd.Plan(1, 0, longest), 1, 0, 0, costs)[:3] == (1, longest, longest)   # stops doubling
    assert hsd.first_plan(costs) == (1, 0, P, 0.0)
    dear = cost_model.costs_up_to((0.6, {1: 1.5, 2: 1.5}, 0.0), hsd.AUTO_MAX)   # one draft costs 2.1 steps, two 2.7
    assert hsd.first_plan(dear) == (2, 0, P, 0.0)                    # a round of one could not pay even if kept
    assert hsd.auto_k(hsd.Plan(4, 0, P), 4, 0, 0, dear)[:3] == (2, P, 2 * P)      # a pause, then a try of two
    assert hsd.auto_k(hsd.Plan(2, 0, P, 5.0), 2, 1, 1, dear)[:3] == (2, 0, P)     # one fewer, but never below two
    never = cost_model.costs_up_to((1.0, {1: 1.5}, 0.0), hsd.AUTO_MAX)          # d + 1.5 steps for at most d + 1
    assert hsd.first_plan(never) == (1, longest, longest, 0.0)
    assert hsd.first_plan(costs, predicted=0.97) == (1, longest, longest, 0.0)   # its file's search saw it lose
    assert hsd.first_plan(costs, predicted=1.02) == hsd.first_plan(costs)
    model, prompt = tiny("tiny-falcon-h1"), PROMPTS["12-token"]
    unstopped = hsd.choose_draft(model, SKIP_NOTHING, "auto")._replace(stop=None)   # a random model is never sure
    _, stats = hsd.generate(model, prompt, 100, draft=unstopped, eos_token_id=-1, costs=(0.5, {1: 1.0}, 0.0))
    assert [len(r.drafts) for r in stats["trace"]][:4] == [1, 3, 5, 7] and stats["plain_steps"] == 0
    assert max(len(r.drafts) for r in stats["trace"]) == hsd.AUTO_MAX


def test_auto_k_starts_paused_where_the_draft_files_search_predicted_a_loss(tmp_path):
    """A draft file whose search predicted it to lose at this run's temperature (found_by.predicted_speedup below 1)
    starts -k auto with the longest pause, the first try after AUTO_LONGEST_PAUSE plain steps; predicted to gain, or
    predicted at another temperature only, it drafts at once. The tokens stay plain greedy decoding's."""
    model, prompt = tiny("tiny-falcon-h1"), PROMPTS["12-token"]
    reference = reference_greedy("tiny-falcon-h1", prompt, 40)
    first_rounds = {}
    for label, predicted in [("loses", {"0": 0.95, "0.6": 1.1}), ("gains", {"0": 1.05}), ("elsewhere", {"0.6": 0.9})]:
        path = tmp_path / f"{label}.json"
        path.write_text(json.dumps({"format": "hsd-draft/1", "skip": {"attention": [0, 1, 2, 3, 4, 5]},
                                    "k": "auto", "found_by": {"predicted_speedup": predicted}}))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")                                  # the file names no architecture
            steps = list(hsd.generate_steps(model, prompt, 40, path, eos_token_id=-1))
        assert [t for step in steps for t in step.tokens] == reference
        first_rounds[label] = next((i for i, step in enumerate(steps) if step.kind == "round"), None)
    assert first_rounds == {"loses": None, "gains": 1, "elsewhere": 1}, first_rounds    # 40 < AUTO_LONGEST_PAUSE
    for label in first_rounds:                                          # generate says so, from the file's notes
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            hsd.generate(model, prompt, 4, draft=tmp_path / f"{label}.json", eos_token_id=-1)
        said = [str(w.message) for w in caught if "predicted a loss at temperature 0 (0.95x" in str(w.message)]
        assert len(said) == (label == "loses") and all("starts with its longest pause" in x for x in said), said


def test_auto_k_runs_a_draft_that_never_agrees_as_plain_decoding(monkeypatch):
    """A draft that never agrees: its first round makes 1 token for c + v[1] + r = 0.5 + 1.1 + 0 steps, so k="auto"
    pauses for AUTO_PAUSE plain steps, then tries one draft; the pause doubles while the tries do not pay. The tokens
    stay plain greedy decoding's."""
    real, reference = hsd.draft, reference_greedy("tiny-falcon-h1", PROMPTS["12-token"], 80)
    wrong = next(t for t in range(97) if t not in reference)               # a token the full model never chooses
    monkeypatch.setattr(hsd, "draft", lambda *args, **kwargs: ([wrong] * len(real(*args, **kwargs)[0]), None))
    tokens, stats = hsd.generate(tiny("tiny-falcon-h1"), PROMPTS["12-token"], 80, draft="component", k="auto",
                                 eos_token_id=-1, costs=(0.5, {1: 1.1}, 0.0))
    assert tokens == reference and stats["accepted"] == 0 and hsd.AUTO_PAUSE == 16
    assert stats["least_break_even"] == pytest.approx(0.6)
    # a round, 16 plain steps, a round, 32, a round, then the 29 tokens left plain (a pause of 64)
    assert (stats["rounds"], stats["plain_steps"]) == (3, 77), stats


def test_a_cascades_pause_pauses_its_draft_model_not_the_text(monkeypatch):
    """k="auto" in a cascade whose draft model never agrees: its rounds lose, so it pauses the draft model, and in the
    pause the text drafts on alone (rounds the full model judges, up to AUTO_MAX drafts, counted as the pause's plain
    steps). The tokens stay plain greedy decoding's."""
    monkeypatch.setattr(hsd, "LOOKUP_LEAST", 1)          # the tiny model's random weights repeat one-character runs
    name, prompt = "tiny-falcon-h1", models.char_tokenizer().encode(LOOKUP_PROMPTS["repeats"]).ids
    real, reference, calls = hsd.draft, reference_greedy(name, prompt, 80), []
    wrong = next(t for t in range(97) if t not in reference + prompt)     # never the text's, never the full model's

    def never_agrees(*args, **kwargs):
        calls.append(1)
        return [wrong] * len(real(*args, **kwargs)[0]), None
    monkeypatch.setattr(hsd, "draft", never_agrees)
    steps = list(hsd.generate_steps(tiny(name), prompt, 80, "lookup+component", "auto", eos_token_id=-1,
                                    costs=(0.5, {1: 1.1}, 0.0)))
    assert [t for step in steps for t in step.tokens] == reference
    model_rounds = [s for s in steps if s.kind == "round" and s.from_text < len(s.drafts)]
    text_rounds = [s for s in steps if s.kind == "round" and s.from_text == len(s.drafts)]
    assert len(model_rounds) == len(calls) and all(s.accepted == 0 for s in model_rounds)
    assert text_rounds and sum(s.accepted for s in text_rounds) > 0, [s.kind for s in steps]
    # the draft model's round, a pause of 16 steps (text rounds among them), a try, a pause of 32, a try
    at = [steps.index(s) for s in model_rounds]
    assert len(at) == 3 and [b - a for a, b in zip(at, at[1:])] == [1 + hsd.AUTO_PAUSE, 1 + 2 * hsd.AUTO_PAUSE], at
    assert any(at[0] < steps.index(s) < at[1] for s in text_rounds)           # the text drafts on inside a pause


@pytest.mark.parametrize("kwargs, message", [
    (dict(k=0), "k must be at least 1"), (dict(draft="medusa"), "unknown draft"),
    (dict(prompt_ids=[]), "prompt is empty"), (dict(max_new_tokens=10_000), "exceed the model's context"),
    (dict(temperature=-1), r"temperature must be 0 \(greedy\) or a finite number from 0.001"), (dict(prompt_ids=[1, 200]), "token ids must lie in"),
])
def test_generate_rejects_bad_requests(kwargs, message):
    args = dict(prompt_ids=[1, 2], max_new_tokens=4) | kwargs
    with pytest.raises(ValueError, match=message):
        hsd.generate(tiny("tiny-falcon-h1"), **args)


def test_the_end_of_text_ends_drafting():
    """The issue's case: a draft proposing the end-of-text token ends its round's drafting there, so no draft after it
    counts as accepted (statistics, trace); the output is plain greedy decoding's, which the end of text ends."""
    model, tokenizer = tiny("tiny-qwen3.5"), models.char_tokenizer()
    prompt = tokenizer.encode("At a temperature the draft samples its tokens, and the full mode").ids
    eos = model.config.eos_token_id
    tokens, stats = hsd.generate(model, prompt, 20, draft=models.Skip(attention={7}), k=8)
    plain, _ = hsd.generate(model, prompt, 20, draft="none")
    assert tokens == plain == [eos]                                   # the full model ends the text at once
    assert all(eos not in r.drafts[:-1] for r in stats["trace"])
    assert (stats["drafted"], stats["accepted"], stats["trace"]) == (1, 1, [hsd.Round([eos], 1, stats["trace"][0][2])])


# ----------------------------------------------------------------------------------------------------------
# hsd: the state, step by step (the exercises of the round grade with these)

def filled_cache(name, tokens, max_len=40):
    """A tiny model (float64) and its cache after feeding tokens."""
    model = tiny(name)
    cache = models.Cache(model, max_len)
    hsd.prefill(model, cache, tokens)
    return model, cache


def fed_one_by_one(model, tokens, max_len):
    cache = models.Cache(model, max_len)
    for t in tokens:
        model(torch.tensor([[t]]), cache)
    return cache


def same_state(cache, reference):
    """Whether cache holds what reference does: the length, the KV entries up to it, every conv window and state."""
    n = reference.length
    if cache.length != n:
        return False
    for s, r in zip(cache.layers, reference.layers, strict=True):
        if r.keys is not None and (rel_err(s.keys[:, :, :n], r.keys[:, :, :n]) > 1e-9
                                   or rel_err(s.values[:, :, :n], r.values[:, :, :n]) > 1e-9):
            return False
        if r.ssm is not None and (s.conv.shape != r.conv.shape or rel_err(s.conv, r.conv) > 1e-9
                                  or rel_err(s.ssm, r.ssm) > 1e-9):
            return False
    return True


@pytest.mark.parametrize("name, draft", REAL_DRAFTS)
def test_restore_puts_the_snapshot_back(name, draft):
    """Snapshot, draft 5 tokens, restore: the length, and every conv window and recurrent state are the very tensors
    of before (nothing is written in place, so references are a snapshot); the KV caches hold what they held."""
    prompt = PROMPTS["12-token"]
    model, cache = filled_cache(name, prompt[:-1])
    length = cache.length
    before = [(s.conv, s.ssm, None if s.keys is None else s.keys[:, :, :length].clone()) for s in cache.layers]
    snap = hsd.snapshot(cache)
    teach(isinstance(snap, hsd.Snapshot), f"snapshot returned {kind_of(snap)}, not an hsd.Snapshot: the round reads "
                                          "it by name (snap.length), and the debugger prints it")
    teach(type(snap.length) is int and snap.length == length, f"the snapshot's length is {snap.length!r}, not the "
                                                              f"{length} tokens the cache holds")
    teach(isinstance(snap.layers, list) and len(snap.layers) == len(cache.layers) and all(
        isinstance(s, models.LayerState) for s in snap.layers), f"the snapshot's layers are {kind_of(snap.layers)}: "
        f"they must be a list of models.LayerState, one for each of the cache's {len(cache.layers)} layers")
    token = prompt[-1]
    for _ in range(5):                                                 # the draft model's steps advance the cache
        token = int(model(torch.tensor([[token]]), cache, skip=TINY_SKIPS[name][draft])[0, -1].argmax())
    hsd.restore(cache, snap)
    teach(cache.length == length, f"after drafting 5 tokens and restoring, the cache holds {cache.length} tokens, "
                                  f"not the {length} it held: restore must set the length back")
    for i, (state, (conv, ssm, keys)) in enumerate(zip(cache.layers, before)):
        teach(keys is None or state.keys is not None, f"layer {i}: after restore the layer has no KV cache: the "
                                                      "cache's layer states were replaced by the snapshot's, which "
                                                      "hold no keys or values")
        if ssm is not None:
            teach(state.ssm is ssm, f"layer {i}: after restore the recurrent state is not the one before drafting: the "
                                    "snapshot keeps the state tensors themselves (references), not the LayerState "
                                    "objects, which drafting changes")
            teach(state.conv is conv, f"layer {i}: after restore the conv window is not the one before drafting: the "
                                      "last K-1 conv inputs are part of the state and must be restored too")
        if keys is not None:
            assert torch.equal(state.keys[:, :, :length], keys), "drafting changed the KV cache below the length"


def tokens_that_give(model, prompt, fed, i, what, value):
    """How many of the tokens fed, fed one by one after the prompt, leave layer i's "state" or "conv window" equal to
    value; None if no number of them does."""
    for m in range(len(fed) + 1):
        layer = fed_one_by_one(model, prompt + fed[:m], 40).layers[i]
        if rel_err(value, layer.ssm if what == "state" else layer.conv) < 1e-9:
            return m
    return None


@pytest.mark.parametrize("n", [1, 2, 3, 4], ids=lambda n: f"keep{n}of4")
@pytest.mark.parametrize("name", FAMILIES)
def test_commit_keeps_the_state_after_n_tokens(name, n):
    """Verify 4 tokens, keep n: the length, every recurrent state and conv window must be those of feeding the prompt
    and those n tokens one by one, and the cache must go on from there (a conv window not rolled back, a stale state
    after a round that accepted nothing, an off-by-one in the rewind all show here)."""
    prompt = PROMPTS["12-token"]
    model, cache = filled_cache(name, prompt[:-1])
    start, fed = cache.length, [prompt[-1], 10, 20, 30]
    _, recorded = model(torch.tensor([fed]), cache, record_states=True)       # the verify pass's model call
    try:
        hsd.commit(cache, start, n, recorded)
        missing = None
    except IndexError as e:                           # said after the except block: the message alone, no chain
        missing = e
    teach(missing is None, f"keeping {n} of 4 tokens, commit asked the recording for something it does not hold "
                           f"(IndexError: {missing}): it holds the state after each of the 4 tokens fed, and the conv "
                           "inputs from the window before them on")
    expected = fed_one_by_one(model, prompt[:-1] + fed[:n], 40)
    teach_int(cache.length, "after commit the cache's length")
    teach(cache.length == expected.length, f"after committing {n} of 4 tokens the cache holds {cache.length - start} "
                                           "of them")
    kind = "Mamba" if name == "tiny-falcon-h1" else "DeltaNet"
    for i, (state, right) in enumerate(zip(cache.layers, expected.layers)):
        if state.ssm is None:
            continue
        for what, ours, theirs in [("state", state.ssm, right.ssm), ("conv window", state.conv, right.conv)]:
            where = f"after committing {n} of 4 tokens the {kind} {what} of layer {i}"
            teach(torch.is_tensor(ours) and ours.shape == theirs.shape, f"{where} is {kind_of(ours)}, not "
                  f"{tuple(theirs.shape)} as the model's {what}s are" + (
                      f" (a conv window holds K-1 = {theirs.shape[1]} inputs)" if what == "conv window" else ""))
            if rel_err(ours, theirs) > 1e-9:
                m = tokens_that_give(model, prompt[:-1], fed, i, what, ours)
                teach(m is not None, f"{where} equals no {what} after 0..4 tokens")
                off = "one token" if abs(m - n) == 1 else f"{abs(m - n)} tokens"
                teach(False, f"{where} is the {what} after {m} tokens, {off} {'late' if m > n else 'early'}" + (
                    ": commit kept the last one recorded" if m == 4 else
                    ": the one from before the verify pass, not taken from the recording" if m == 0 else ""))
    assert same_state(cache, expected), "after commit the KV caches do not hold the committed tokens' entries"
    next_logits = model(torch.tensor([[90]]), cache)                      # and the cache goes on correctly
    assert rel_err(next_logits, model(torch.tensor([prompt[:-1] + fed[:n] + [90]]))[:, -1:]) < 1e-9, (
        "after commit the next token's logits differ from a full forward's")


def test_accept_takes_the_longest_agreeing_prefix():
    """Drafts against the full model's choices (rows of logits): the agreeing prefix, then the full model's own choice
    after it; both ints, which the round returns, the trace prints and --json writes."""
    def logits(choices):
        return F.one_hot(torch.tensor(choices), 10).float()        # row i chooses choices[i]
    cases = [([1, 2, 3], [1, 2, 3, 4], (3, 4), "all 3 accepted: the next token is the bonus"),
             ([1, 2, 3], [1, 5, 3, 4], (1, 5), "a match after the first mismatch does not count"),
             ([1, 2, 3], [7, 2, 3, 4], (0, 7), "none accepted: the next token is the correction"),
             ([1, 2], [1, 2, 9], (2, 9), "all 2 accepted: the next token is the bonus"),
             ([], [6], (0, 6), "nothing drafted: the next token is the full model's choice (plain decoding)")]
    for drafts, choices, expected, why in cases:
        got = hsd.accept(drafts, logits(choices))
        teach(isinstance(got, (tuple, list)) and len(got) == 2, f"accept returned {kind_of(got)}: it returns two "
                                                                "values, (accepted, next_token)")
        teach_int(got[0], "the number of accepted drafts")
        teach_int(got[1], "the next token")
        teach(tuple(got) == expected, f"drafts {drafts}, the full model's choices {choices}: expected {expected}, got "
                                      f"{tuple(got)}: {why}")


@pytest.mark.parametrize("name", ["tiny-falcon-h1", "tiny-qwen3.5"])
def test_drafts_are_the_draft_models_greedy_tokens(name):
    """draft feeds pending, d1 .. d(k-1) (k steps) and returns the draft's k greedy choices (and no q); at a
    temperature its draws from the draft's distributions q; it ends after a draft it is unsure of (stop) and after
    the end-of-text token (eos); verify feeds all k + 1 and returns their logits and what the recording pass
    recorded."""
    prompt = PROMPTS["12-token"]
    model, cache = filled_cache(name, prompt[:-1])
    skip, length = TINY_SKIPS[name]["component"], cache.length
    result = hsd.draft(model, cache, prompt[-1], skip, 3)
    teach(isinstance(result, tuple) and len(result) == 2, f"draft returned {kind_of(result)}: it returns two values, "
                                                          "the drafts and q (None when greedy)")
    drafts, q = result
    teach(type(drafts) is list, f"draft returned drafts as {kind_of(drafts)}, not a list: the round's tokens are "
                                "lists (generate adds the next token to the accepted drafts: drafts[:n] + [token])")
    teach(q is None, f"greedy drafting has no distributions to return: q should be None, not {kind_of(q)}")
    teach(len(drafts) == 3, f"k = 3 drafts expected, got {len(drafts)}")
    for i, d in enumerate(drafts):
        teach_int(d, f"draft {i + 1}")
    teach(cache.length == length + 3, f"drafting 3 tokens fed {cache.length - length} tokens: it feeds the pending "
                                      "token and d1, d2; d3 is fed by the verify pass")
    _, fresh = filled_cache(name, prompt[:-1])
    expected, token = [], prompt[-1]
    for _ in range(3):                                   # the draft model, one token at a time, from the full state
        token = int(model(torch.tensor([[token]]), fresh, skip=skip)[0, -1].argmax())
        expected.append(token)
    teach(drafts == expected, f"the drafts {drafts} are not the draft model's greedy tokens {expected}, continuing "
                              "from the full model's state")
    _, fresh = filled_cache(name, prompt[:-1])
    ended = hsd.draft(model, fresh, prompt[-1], skip, 3, eos=expected[0])[0]
    teach(ended == expected[:1], f"with eos={expected[0]} (the first draft) draft returned {ended}: drafting ends "
                                 "after the end-of-text token, since nothing after it is output")
    _, fresh = filled_cache(name, prompt[:-1])
    unsure = hsd.draft(model, fresh, prompt[-1], skip, 3, stop=1.0)[0]
    teach(unsure == expected[:1], f"with stop=1.0 (never sure enough) draft returned {unsure}: drafting ends after "
                                  "the first draft whose probability under the draft model is below the stop")
    _, fresh = filled_cache(name, prompt[:-1])
    sampled = hsd.draft(model, fresh, prompt[-1], skip, 3, TEMPERATURE, torch.Generator().manual_seed(3))
    teach(isinstance(sampled, tuple) and len(sampled) == 2 and torch.is_tensor(sampled[1]),
          "at a temperature draft returns the drafts and q, the draft's distributions (len, V), a tensor")
    _, fresh = filled_cache(name, prompt[:-1])
    rows = [model(torch.tensor([[t]]), fresh, skip=skip)[0, -1] for t in [prompt[-1], *sampled[0][:-1]]]
    teach(sampled[1].shape == (3, model.config.vocab_size) and torch.allclose(
        sampled[1], hsd.probabilities(torch.stack(rows), TEMPERATURE), atol=1e-12),
        "q's rows are not the draft model's probabilities(logits, temperature) at each drafted position")
    g = torch.Generator().manual_seed(3)
    teach(sampled[0] == [int(torch.multinomial(row, 1, generator=g)) for row in sampled[1]],
          "at a temperature each draft is the generator's draw (torch.multinomial) from its row of q")
    _, fresh = filled_cache(name, prompt[:-1])
    verified = hsd.verify(model, fresh, prompt[-1], drafts)
    teach(isinstance(verified, tuple) and len(verified) == 2, f"verify returned {kind_of(verified)}: it returns two "
                                                              "values, the logits and what the pass recorded")
    logits, recorded = verified
    full = model(torch.tensor([prompt + drafts]))[0, len(prompt) - 1:]
    teach(torch.is_tensor(logits) and logits.shape == full.shape, f"verify must return k + 1 = 4 rows of logits, one "
          f"per position of [pending, d1, d2, d3], {tuple(full.shape)}; got {kind_of(logits)}")
    teach(rel_err(logits, full) < 1e-9, "verify's rows are not the full model's logits at [pending, d1 .. dk]")
    teach(isinstance(recorded, list) and len(recorded) == model.config.num_layers and all(
        (r is not None) == (s.ssm is not None) for r, s in zip(recorded, fresh.layers)),
        "verify must return, with the logits, what the recording pass recorded (model(..., record_states=True)): "
        "per layer the states commit chooses from")


def round_values(result, k):
    """A round's (drafts, accepted, next token, expected), after checking that they are what the next step takes: a
    list of at most k drafts, two ints and a float."""
    teach(isinstance(result, tuple) and len(result) == 4, f"a round returned {kind_of(result)}: it returns four "
                                                          "values, (drafts, accepted, next token, expected)")
    drafts, n, token, expected = result
    teach(type(drafts) is list and len(drafts) <= k, f"a round returns its drafts first, a list of at most k = {k} "
                                                     f"tokens; its first value is {kind_of(drafts)}")
    for i, d in enumerate(drafts):
        teach_int(d, f"the round's draft {i + 1}")
    teach_int(n, "the round's number of accepted drafts (its second value)")
    teach_int(token, "the round's next token (its third value)")
    teach(0 <= n <= len(drafts), f"a round accepted {n} of {len(drafts)} drafts")
    teach(type(expected) is float and 0 <= expected <= len(drafts), f"a round's fourth value, how many drafts it "
          f"accepts on average, is {kind_of(expected)}: a float from 0 to {len(drafts)}, expected_accepted's")
    return drafts, n, token, expected


@pytest.mark.parametrize("name", ["tiny-falcon-h1", "tiny-qwen3.5"])
def test_rounds_commit_what_one_by_one_feeding_gives(name):
    """Round after round of k = 3: the cache holds exactly the committed tokens' state, and the next token is the full
    model's choice after them."""
    model, prompt = tiny(name), PROMPTS["12-token"]
    cache = models.Cache(model, 60)
    hsd.prefill(model, cache, prompt[:-1])
    one_by_one = fed_one_by_one(model, prompt[:-1], 60)                  # fed the committed tokens as they come
    committed, pending, seen = prompt[:-1], prompt[-1], set()
    while len(committed) < 40:
        drafts, n, next_token, _ = round_values(hsd.speculative_round(model, cache, pending,
                                                                      TINY_SKIPS[name]["component"], 3), k=3)
        before, committed = len(committed), committed + [pending] + drafts[:n]
        teach(cache.length == len(committed), f"after a round that accepted {n} of 3 drafts the cache holds "
                                              f"{cache.length - before} more tokens, not {n + 1}: the pending token "
                                              f"and the {n} accepted")
        for token in committed[before:]:
            model(torch.tensor([[token]]), one_by_one)
        teach(same_state(cache, one_by_one), f"after a round that accepted {n} of 3 drafts "
              "the state is not that of feeding the committed tokens one by one (the pending token and the accepted "
              "drafts after the earlier ones)")
        teach(next_token == int(model(torch.tensor([committed]))[0, -1].argmax()),
              "the next token is not the full model's choice after the committed tokens")
        pending = next_token
        seen.add(n)
    assert seen >= {0, 1}, "the rounds should have accepted none and some drafts"


@pytest.mark.parametrize("name", ["tiny-falcon-h1", "tiny-qwen3.5"])
def test_a_round_drafts_and_judges_as_it_is_asked(name):
    """A round passes on what it is asked: greedy or at a temperature with its generator, and with a stop (a
    confidence threshold: drafting may end early) or without, its drafts are those draft gives from the same state,
    its verdict is judge's on them, and the cache then holds the committed tokens' state."""
    model, prompt = tiny(name), PROMPTS["12-token"]
    skip, pending, k = TINY_SKIPS[name]["component"], prompt[-1], 4
    torch.manual_seed(0)                        # a round that draws from torch's own random stream does so repeatably
    for temperature, stop in ((0.0, 0.9), (TEMPERATURE, 0.9), (TEMPERATURE, None)):
        asked = f"at temperature {temperature}" + (f" with stop={stop}" if stop else " without a stop")
        _, cache = filled_cache(name, prompt[:-1])
        try:
            result, failed = hsd.speculative_round(model, cache, pending, skip, k, temperature,
                                                   torch.Generator().manual_seed(1), stop), None
        except Exception as e:                        # a step was given what it does not take: said below, alone
            result, failed = None, e
        teach(failed is None, f"{asked} the round failed in {traceback.extract_tb(failed.__traceback__)[-1].name} "
                              f"({type(failed).__name__}: {failed}): draft and judge take the round's temperature, "
                              "generator and stop" if failed else "")
        drafts, n, next_token, expected_n = round_values(result, k)
        generator = torch.Generator().manual_seed(1)
        _, fresh = filled_cache(name, prompt[:-1])
        expected, q = hsd.draft(model, fresh, pending, skip, k, temperature, generator, stop)
        teach(len(drafts) == len(expected), f"{asked} the round drafted {len(drafts)} tokens where draft, from the "
                                            f"same state, drafts {len(expected)}: the round ignored its stop")
        teach(drafts == expected, f"{asked} the round's drafts are not those draft gives from the same state and a "
                                  "generator seeded alike: the round ignored its temperature or its generator")
        _, fresh = filled_cache(name, prompt[:-1])
        logits, _ = hsd.verify(model, fresh, pending, expected)
        verdict = hsd.judge(expected, q, logits, temperature, generator)
        teach((n, next_token) == verdict, f"{asked} the round's verdict (accepted, next token) is {(n, next_token)}, "
                                          f"judge's on its drafts {verdict}: the round ignored its temperature or its "
                                          "generator when judging")
        on_average = hsd.expected_accepted(expected, q, logits, temperature)
        teach(expected_n == pytest.approx(on_average, abs=1e-9), f"{asked} the round says it accepts {expected_n} "
              f"drafts on average, expected_accepted on its drafts {on_average}: the round ignored its temperature")
        teach(cache.length == len(prompt) + n, f"{asked}, after a round that accepted {n} of {len(drafts)} drafts "
                                               f"the cache holds {cache.length - len(prompt) + 1} more tokens, not "
                                               f"{n + 1}: the pending token and the {n} accepted")
        teach(same_state(cache, fed_one_by_one(model, prompt[:-1] + [pending] + drafts[:n], 40)),
              f"{asked} the state after the round is not that of feeding the committed tokens one by one")
    _, fresh = filled_cache(name, prompt[:-1])
    first = hsd.draft(model, fresh, pending, skip, 1)[0][0]                   # made the end of text below
    _, cache = filled_cache(name, prompt[:-1])
    drafts, _, _, _ = round_values(hsd.speculative_round(model, cache, pending, skip, k, eos=first), k)
    teach(drafts == [first], f"with eos={first} (its first draft) the round drafted {drafts}: the round ignored its "
                             "eos, which draft takes (drafting ends at the end of text)")


def test_draft_strategies_skip_what_the_paper_skips():
    """The paper's drafts as data, on the tiny models and on 24 and 36 layers (README, "Draft strategies")."""
    hints = {"component": {"falcon_h1": "Falcon-H1's component draft drops the attention branch of every layer, "
                                        "keeping its Mamba-2 branch, norms and MLP: Skip(attention=...)",
                           "qwen3_5": "Qwen3.5's component draft replaces the full-attention layers by identity as "
                                      "whole layers (their MLP too): Skip(layers=...)"},
             "layerskip": "layerskip leaves out int(0.33 n) contiguous middle layers, the first at n//2 - skipped//2",
             "early-exit": "early-exit keeps the first int(0.5 n) layers, then the final norm and the LM head"}
    for name, skips in TINY_SKIPS.items():
        config = models.TINY[name]
        for draft, expected in skips.items():
            got = hsd.draft_skip(config, draft)
            hint = hints[draft][config.family] if draft == "component" else hints[draft]
            teach(got == expected, f"{draft} on {name} ({config.num_layers} layers): expected {expected!r}, got "
                                   f"{got!r}: {hint}")
    c24 = models.config_from_hf({**QWEN2_TINY_JSON, "num_hidden_layers": 24})
    c36 = models.config_from_hf({**hsd_train.TOY_CONFIGS["toy-falcon-h1"], "num_hidden_layers": 36})
    teach(hsd.draft_skip(c24, "layerskip").layers == frozenset(range(9, 16)), "layerskip on 24 layers: layers 9-15")
    teach(hsd.draft_skip(c36, "layerskip").layers == frozenset(range(13, 24)), "layerskip on 36 layers: layers 13-23")
    teach(hsd.draft_skip(c24, "early-exit").layers == frozenset(range(12, 24)), "early-exit on 24 layers: 12-23 left out")
    with pytest.raises(models.UsageError, match="layerskip"):
        hsd.draft_skip(c24, "component")               # a Transformer has no attention-free part
    with pytest.raises(models.UsageError, match="unknown draft 'none'"):
        hsd.draft_skip(c24, "none")                    # "none" is plain decoding, never a draft


# ----------------------------------------------------------------------------------------------------------
# What a reader meets in a debugger prints briefly; every model-level call of a round runs on any device

def test_the_objects_of_a_round_print_briefly():
    model = models.load("tiny-qwen3.5")
    cache = models.Cache(model, 20)
    hsd.prefill(model, cache, PROMPTS_IDS[:11])
    snap = hsd.snapshot(cache)
    _, recorded = hsd.verify(model, cache, 1, [2, 3, 4])
    assert repr(cache) == ("Cache(length 15 of 20; layers 0-2, 4-6: conv (1, 3, 128), state (1, 4, 16, 16); "
                           "layers 3, 7: KV (1, 2, 20, 32))")
    assert repr(snap).startswith("Snapshot(length=11, layers=[LayerState(conv (1, 3, 128), state (1, 4, 16, 16)), ")
    assert "LayerState(nothing)" in repr(snap) and len(repr(snap)) < 500 and "tensor(" not in repr(snap)
    assert repr(recorded[0]) == ("Recorded(conv_inputs (1, 7, 128), StatesAfterEachToken(4 tokens, each state "
                                 "(1, 4, 16, 16), computed when indexed))")
    assert recorded[3] is None and "states[t] = from_start[t] s_0" in models.StatesAfterEachToken.__getitem__.__doc__


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name", FAMILIES)
def test_every_model_call_of_a_round_runs_on_the_meta_device(name, dtype):
    """Prefill, a decoding step, each draft's step, a recording verify pass and what commit computes, on PyTorch's
    meta device: a tensor made on the CPU without a device argument fails here as it would on a GPU."""
    with torch.device("meta"):
        model = models.Model(models.TINY[name]).to(dtype)
    cache = models.Cache(model, 16)
    hsd.prefill(model, cache, [1, 2, 3, 4, 5])
    model(torch.tensor([[6]], device="meta"), cache)
    snap = hsd.snapshot(cache)
    for skip in [*TINY_SKIPS[name].values(), *UNIT_SKIPS[name].values()]:
        model(torch.tensor([[7]], device="meta"), cache, skip=skip)
        hsd.restore(cache, snap)
    logits, recorded = hsd.verify(model, cache, 7, [8, 9, 10])
    hsd.commit(cache, snap.length, 2, recorded)
    assert logits.device.type == "meta" and logits.dtype == dtype and cache.length == snap.length + 2
    assert all(s.ssm is None or s.ssm.device.type == "meta" for s in cache.layers)


# ----------------------------------------------------------------------------------------------------------
# hsd: the command line

def run_cli(*args, env=None, script="hsd.py"):
    """A tool as a user runs it; a busy machine's warning, which depends on whatever else runs here, left out."""
    result = subprocess.run([sys.executable, script, *args], capture_output=True, text=True,
                            env={**os.environ, **(env or {})}, cwd=HERE)
    result.stderr = "".join(line for line in result.stderr.splitlines(True) if "the machine is busy" not in line)
    return result


def main_status(main, args):
    """A main()'s exit status; argparse's own errors exit from inside parse_args."""
    try:
        return main(args)
    except SystemExit as e:
        return e.code


@pytest.mark.parametrize("name", FAMILIES)
def test_cli_check_json(name, capsys):
    draft = "layerskip" if name == "tiny-qwen2.5" else "component"
    assert hsd.main(["--model", name, "--draft", draft, "-k", "3", "--max-new-tokens", "20", "--check", "--json",
                     "--trace", "--repeats", "2"]) == 0
    captured = capsys.readouterr()
    stats, out = json.loads(captured.out), captured.err.splitlines()          # --json: stdout holds the JSON alone
    assert stats["identical_to_greedy"] and stats["new_tokens"] == len(stats["new_token_ids"]) and stats["drafted"] > 0
    assert stats["alpha"] == stats["accepted"] / stats["drafted"] and stats["speedup_vs_greedy"] > 0
    assert (stats["model"], stats["draft"], stats["k"], stats["temperature"], stats["seed"]) == (name, draft, 3, 0, None)
    assert stats["new_text"] == models.char_tokenizer().decode(stats["new_token_ids"], skip_special_tokens=False)
    assert all(set(r) == {"drafts", "accepted", "next_token"} for r in stats["trace"]) and stats["trace"]
    assert sum(line.startswith("round") for line in out) == stats["rounds"]
    note = any("below 1 is expected on a CPU" in line for line in out)
    assert not note                             # said only for the official models, whose drafts RESULTS.md measures


def test_the_trace_holds_the_rounds_as_they_were_judged(monkeypatch):
    """statistics()["trace"] lists each round of a generation as speculative_round judged it: an hsd.Round (drafts,
    accepted, next token, as the round returned them) that unpacks as that triple; a plain step is no round; the
    rounds' accepted drafts and next tokens are the output, in order."""
    judged, real = [], hsd.speculative_round

    def watched(*args, **kwargs):
        judged.append(real(*args, **kwargs))
        return judged[-1]
    monkeypatch.setattr(hsd, "speculative_round", watched)
    ids, stats = hsd.generate(tiny("tiny-falcon-h1"), PROMPTS["12-token"], 8, k=2, eos_token_id=-1)
    assert len(judged) == stats["rounds"] >= 3 and stats["plain_steps"] == 1     # the last token: no room to draft
    assert all(type(entry) is hsd.Round for entry in stats["trace"])
    assert [(drafts, accepted, next_token) for drafts, accepted, next_token in stats["trace"]] == [
        judged_round[:3] for judged_round in judged]
    assert [t for drafts, accepted, next_token in stats["trace"] for t in drafts[:accepted] + [next_token]] == ids[:-1]


def test_cli_says_why_generation_stopped_and_names_special_tokens(capsys):
    """tiny-falcon-h1 ends its continuation of the default prompt with <|endoftext|> after 21 tokens."""
    assert hsd.main(["--model", "tiny-falcon-h1", "--json"]) == 0
    captured = capsys.readouterr()
    stats, out = json.loads(captured.out), captured.err.splitlines()
    assert stats["new_token_ids"][-1] == 96 and stats["new_text"].endswith("<|endoftext|>")
    assert out[2].startswith('output  "') and out[2].endswith('<|endoftext|>"')
    assert f"stop    at the end-of-text token \"<|endoftext|>\", after {len(stats['new_token_ids'])} of 64 tokens" in out
    assert hsd.main(["--model", "tiny-falcon-h1", "--max-new-tokens", "5"]) == 0
    assert "stop    after 5 new tokens (--max-new-tokens)" in capsys.readouterr().out


def test_cli_check_reports_a_mismatch(monkeypatch, capsys):
    """If speculation went wrong, --check fails (exit 1) and says where, with the full model's logit margin."""
    real_accept = hsd.accept
    monkeypatch.setattr(hsd, "accept", lambda drafts, logits: (0, (real_accept(drafts, logits)[1] + 1) % 97))
    assert hsd.main(["--model", "tiny-falcon-h1", "--max-new-tokens", "8", "--check", "--json"]) == 1
    out, err = capsys.readouterr()
    assert "FAILED" in err and "new token 0:" in err and "logit margin" in err
    assert json.loads(out)["identical_to_greedy"] is False


def test_cli_check_says_near_tie_only_when_it_is_one(monkeypatch, capsys):
    """A mismatch far above the logits' spread is no rounding: it says so; one within rounding is a near-tie."""
    real_accept = hsd.accept
    monkeypatch.setattr(hsd, "accept", lambda drafts, logits: (0, (real_accept(drafts, logits)[1] + 1) % 97))
    assert hsd.main(["--model", "tiny-falcon-h1", "--max-new-tokens", "8", "--check"]) == 1
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("check"))
    assert "not a near-tie, so not rounding" in line and "can flip" not in line
    monkeypatch.setattr(cli, "logit_margin", lambda *args: (1e-6, 2.0))
    assert hsd.main(["--model", "tiny-falcon-h1", "--max-new-tokens", "8", "--check"]) == 1
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("check"))
    assert "a near-tie, which the rounding of a verify pass and of single steps can flip" in line


def test_cli_check_measures_a_speedup_only_where_there_is_one(capsys):
    """Plain decoding has no speedup to print, and its header no k; a draft's speedup is the median of runs in turns,
    with their range."""
    assert hsd.main(["--model", "tiny-falcon-h1", "--draft", "none", "--check", "--max-new-tokens", "8"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert "k=" not in out[0] and "draft none: plain decoding" in out[0]
    assert out[-1] == "check   identical to plain greedy decoding (plain decoding: no draft, so no speedup to measure)"
    assert hsd.main(["--model", "tiny-falcon-h1", "--check", "--repeats", "3", "--max-new-tokens", "8"]) == 0
    check = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("check"))
    assert "speedup" in check and "(median of 3 runs of each, in turns; range " in check


def test_the_default_draft_is_the_papers_for_the_family(capsys):
    """component for the hybrids, layerskip for the Transformer, and the header says which it chose."""
    for name, expected in (("tiny-qwen2.5", "draft layerskip (the paper's for qwen2)"),
                           ("tiny-qwen3.5", "draft component (the paper's for qwen3_5)")):
        assert hsd.main(["--model", name, "--max-new-tokens", "4"]) == 0
        assert expected in capsys.readouterr().out.splitlines()[0]
        assert hsd.generate(tiny(name), [1, 2], 4)[1]["draft"] == expected.split()[1]


def test_cli_says_what_it_did_not_do(capsys):
    """A --seed without --temperature does nothing, and a prompt character the tokenizer lacks reads as "?": both are
    said in one line each; --prompt has a help text."""
    assert hsd.main(["--model", "tiny-falcon-h1", "--seed", "3", "--max-new-tokens", "2"]) == 0
    assert capsys.readouterr().err == ("hsd: note: --seed has no effect without --temperature (greedy decoding draws "
                                       "nothing)\n")
    assert hsd.main(["--model", "tiny-falcon-h1", "--prompt", "café €", "--max-new-tokens", "2"]) == 0
    err = capsys.readouterr().err
    assert err == "hsd: warning: the tokenizer has no token for 'é', '€': the prompt reads \"caf? ?\"\n", err
    result = run_cli("--help")
    assert "--prompt PROMPT" in result.stdout and "the text to continue" in result.stdout


def test_cli_trace_is_plain_when_piped(capsys):
    assert hsd.main(["--model", "tiny-falcon-h1", "--max-new-tokens", "8", "--trace"]) == 0
    out = capsys.readouterr().out
    assert "round   1  accepted" in out and "\033[" not in out


@pytest.mark.parametrize("args, message", [
    (["--model", "no-such-model"], "unknown model"),
    (["--model", "./missing-dir"], "no such directory"),
    (["--model", "tiny-falcon-h1", "-k", "0"], "k must be at least 1"),
    (["--model", "tiny-qwen2.5", "--draft", "component"], "use --draft layerskip"),
    (["--model", "tiny-falcon-h1", "--prompt", ""], "prompt is empty"),
    (["--model", "tiny-falcon-h1", "--max-new-tokens", "5000"], "exceed the model's context"),
    (["--model", "tiny-falcon-h1", "--max-new-tokens", "-1"], "at least 0"),
    (["--model", "tiny-falcon-h1", "--temperature", "0.6", "--check"], "--check compares with greedy decoding"),
    (["--model", "tiny-falcon-h1", "--max-new-tokens", "0", "--check"], "give --max-new-tokens >= 1"),
    (["--model", "tiny-falcon-h1", "--temperature", "nan"], "temperature must be 0 (greedy) or a finite number from"),
    (["--model", "tiny-falcon-h1", "--temperature", "-1"], "temperature must be 0 (greedy) or a finite number from"),
    (["--model", "tiny-falcon-h1", "--temperature", "inf"], "or a finite number from 0.001 on (got inf)"),
    (["--model", "tiny-falcon-h1", "--temperature", "1e-320"], "or a finite number from 0.001 on (got 1e-320)"),
    (["--model", "tiny-falcon-h1", "--threads", "0"], "--threads takes a number of threads, at least 1, not 0"),
    (["--model", "tiny-falcon-h1", "--draft", "medusa"], "unknown draft 'medusa': choose one of component, "
                                                         "layerskip, early-exit, none, or give a draft file (there is"),
    (["--model", "tiny-falcon-h1", "-k", "two"], "-k takes a number of drafts or auto, not 'two'"),
    (["--model", "tiny-falcon-h1", "--eval"], "(measurements: hsd_eval.py --model tiny-falcon-h1 ...)"),
    (["--model", "tiny-falcon-h1", "--out", "x.jsonl"], "unrecognized arguments: --out x.jsonl (measurements: hsd_eval"),
    (["--model", "tiny-falcon-h1", "--text", "t.txt"], "unrecognized arguments: --text t.txt (measurements: hsd_eval"),
    (["--model", "tiny-falcon-h1", "--plot", "a.svg"], "unrecognized arguments: --plot a.svg (measurements: hsd_eval"),
    (["--model", "tiny-falcon-h1", "--prompts", "3"], "unrecognized arguments: --prompts 3 (measurements: hsd_eval"),
    (["--model", "tiny-falcon-h1", "--speed-prompts=3"], "--speed-prompts=3 (measurements"),
    (["--model", "tiny-falcon-h1", "--device", "cuda"] if not torch.cuda.is_available() else
     ["--model", "tiny-falcon-h1", "--dtype", "float16"], "use --device cpu" if not torch.cuda.is_available() else
     "invalid choice: 'float16'"),
])
def test_cli_user_errors_are_one_line(args, message, capsys):
    assert main_status(hsd.main, args) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err


def test_cli_model_folder_without_a_model_is_one_line(tmp_path, capsys):
    assert main_status(hsd.main, ["--model", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err and "config.json, tokenizer.json and *.safetensors" in err


def test_cli_exit_codes():
    """As a user runs it (the Hub's offline setting is read when huggingface_hub is imported): a user error exits 2
    through the script's exit status (test_cli_user_errors_are_one_line checks each message in-process)."""
    offline = run_cli("--model", "falcon-h1-0.5b", env={"HF_HUB_OFFLINE": "1", "HF_HOME": "/nonexistent-hf-home"})
    assert offline.returncode == 2 and "--" not in offline.stdout
    assert "no connection to the Hugging Face Hub" in offline.stderr and "Traceback" not in offline.stderr


def test_cli_prints_each_round_before_the_next_is_made(monkeypatch, capsys):
    """The text (with --trace: each round) reaches stdout as rounds commit it, not at the end of the generation."""
    real, printed = hsd.generate_steps, []

    def watched(*args, **kwargs):
        for step in real(*args, **kwargs):
            yield step
            printed.append((step, capsys.readouterr().out))   # what the CLI printed before asking for the next step
    monkeypatch.setattr(hsd, "generate_steps", watched)
    tok = models.char_tokenizer()
    assert hsd.main(["--model", "tiny-falcon-h1", "--max-new-tokens", "12"]) == 0
    assert printed[0][1].endswith('output  "') and len(printed) > 3
    assert all(out == json.dumps(tok.decode(step.tokens, skip_special_tokens=False))[1:-1] for step, out in printed[1:])
    printed.clear()
    assert hsd.main(["--model", "tiny-falcon-h1", "--max-new-tokens", "12", "--trace"]) == 0
    rounds = [out for step, out in printed if step.kind == "round"]
    assert all(out.startswith(f"round {i:3d}") for i, out in enumerate(rounds, 1)) and len(rounds) > 3


def test_ctrl_c_during_generation_is_one_line(ctrl_c):
    """Ctrl-C while generating: one line, exit 130. The tiny model is told it has no end-of-text token, so that the
    generation is still running when the signal comes (its continuation would otherwise end after 214 tokens)."""
    code = (ctrl_c.code + "import cost_model, dataclasses, sys, hsd, models; cost_model.busy_cores = lambda: 0.0; "
            "models.TINY['tiny-qwen2.5'] = dataclasses.replace("                                      # idle, above
            "models.TINY['tiny-qwen2.5'], eos_token_id=-1); sys.exit(hsd.main(sys.argv[1:]))")
    run = subprocess.Popen([sys.executable, "-c", code, "--model", "tiny-qwen2.5", "--max-new-tokens", "4000"],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=HERE)
    assert run.stdout.readline().startswith("model") and run.stdout.readline().startswith("prompt")
    assert run.stdout.read(12).startswith('output  "')                         # generating: 12 characters are out
    signals = ctrl_c.signals(run.pid)
    run.send_signal(signal.SIGINT)
    _, stderr = run.communicate()
    assert run.returncode == 130 and stderr.strip() == "hsd: interrupted", (signals, stderr)


def test_a_busy_machine_is_said_before_the_run_and_never_advises_what_was_given(monkeypatch, capsys):
    """The load is known before anything is decoded: one line on stderr before the first step, with --check or without;
    its advice is --threads 1, unless the run has 1 thread already (then what else helps). The load is given here."""
    monkeypatch.setattr(cost_model, "busy_cores", lambda: 1.9)
    real, before = hsd.generate_steps, []

    def watched(*args, **kwargs):
        before.append(capsys.readouterr().err)                               # what was said before the first step
        yield from real(*args, **kwargs)
    monkeypatch.setattr(hsd, "generate_steps", watched)
    threads = torch.get_num_threads()
    try:
        for extra in ([], ["--check", "--repeats", "1"], ["--temperature", "0.6", "--seed", "1"]):
            torch.set_num_threads(2)
            assert hsd.main(["--model", "tiny-falcon-h1", "--max-new-tokens", "4", *extra]) == 0
            warned = [line for line in before.pop(0).splitlines() if "busy" in line]
            assert len(warned) == 1 and warned[0].startswith("hsd: warning: the machine is busy (other processes kept "
                                                             "1.90 of ") and "--threads 1" in warned[0], warned
            capsys.readouterr()
            before.clear()
        assert hsd.main(["--model", "tiny-falcon-h1", "--max-new-tokens", "4", "--threads", "1"]) == 0
        warned = [line for line in before[0].splitlines() if "busy" in line]
        assert len(warned) == 1 and "--threads 1" not in warned[0] and "taskset" in warned[0], warned
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("extra", [[], ["--trace", "--check", "--repeats", "1"]])
def test_json_is_stdout_alone(extra, capsys):
    """--json: stdout holds the JSON object alone (what `| jq` reads); the human lines go to stderr."""
    assert hsd.main(["--model", "tiny-falcon-h1", "--max-new-tokens", "6", "--json", *extra]) == 0
    out, err = capsys.readouterr()
    stats = json.loads(out)
    assert stats["new_tokens"] == 6 and err.startswith("model   tiny-falcon-h1") and "alpha" in err


def test_raw_prints_the_text_alone_and_a_prompt_can_come_from_a_file(tmp_path, monkeypatch, capsys):
    """--raw: stdout holds the new text, unescaped, no special tokens, then a line break; the other lines go to stderr.
    --prompt-file PATH (or - for stdin) gives the prompt as --prompt does, its last line break left out."""
    text = "The cat\nsat "
    ids, _ = hsd.generate(tiny("tiny-falcon-h1", torch.float32), models.char_tokenizer().encode(text).ids, 30)
    assert hsd.main(["--model", "tiny-falcon-h1", "--prompt", text, "--max-new-tokens", "30", "--raw"]) == 0
    out, err = capsys.readouterr()
    assert out == models.char_tokenizer().decode(ids, skip_special_tokens=True) + "\n" and ids[-1] == 96, ids
    assert "<|endoftext|>" not in out and 'prompt  "The cat\\nsat "' in err and "output" not in err
    (tmp_path / "prompt.txt").write_text(text + "\n")
    assert hsd.main(["--model", "tiny-falcon-h1", "--prompt-file", str(tmp_path / "prompt.txt"), "--max-new-tokens",
                     "30", "--raw"]) == 0
    assert capsys.readouterr().out == out
    monkeypatch.setattr(sys, "stdin", io.StringIO(text + "\n"))
    assert hsd.main(["--model", "tiny-falcon-h1", "--prompt-file", "-", "--max-new-tokens", "30", "--raw"]) == 0
    assert capsys.readouterr().out == out
    for args, says in ((["--prompt-file", str(tmp_path / "none.txt")], "cannot read --prompt-file"),
                       (["--prompt", "a", "--prompt-file", "-"], "give one of them"),
                       (["--raw", "--json"], "--json and --raw both take stdout")):
        assert main_status(hsd.main, ["--model", "tiny-falcon-h1", *args]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and says in err, err


def test_colour_only_on_a_terminal_and_never_with_no_color(monkeypatch, capsys):
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)
    assert hsd.main(["--model", "tiny-falcon-h1", "--max-new-tokens", "6", "--trace"]) == 0
    assert "\033[32m" in capsys.readouterr().out
    monkeypatch.setenv("NO_COLOR", "1")
    assert hsd.main(["--model", "tiny-falcon-h1", "--max-new-tokens", "6", "--trace"]) == 0
    out = capsys.readouterr().out
    assert "\033[" not in out and "round   1" in out


def test_errors_name_the_mistake(capsys):
    """A misspelt option, a model's file for its folder, too many new tokens: each said in one line that names it."""
    for args, says in ((["--modle", "tiny-falcon-h1"], "unknown option --modle: did you mean --model?"),
                       (["--model", "tiny-falcon-h1", "--max-new-token=4"], None),           # an abbreviation: fine
                       (["--model", "toys/toy-falcon-h1/config.json"], "toys/toy-falcon-h1/config.json is a file: give "
                                                                       "its folder, toys/toy-falcon-h1"),
                       (["--model", "tiny-falcon-h1", "--max-new-tokens", "100000000"],
                        "after the prompt's 20 tokens, at most 4076 new tokens fit")):
        assert main_status(hsd.main, args) == (0 if says is None else 2)
        err = capsys.readouterr().err
        assert says is None or (err.count("\n") == 1 and says in err), err


def test_generate_takes_a_one_row_tensor_and_refuses_the_common_mistakes_in_one_line():
    """transformers' (1, T) habit works; text, a tokenizers.Encoding, a batch, float ids: one sentence saying what to
    pass."""
    model, tok = tiny("tiny-falcon-h1"), models.char_tokenizer()
    ids = tok.encode("The cat").ids
    expected = hsd.generate(model, ids, 6)[0]
    assert hsd.generate(model, torch.tensor([ids]), 6)[0] == expected == hsd.generate(model, torch.tensor(ids), 6)[0]
    for wrong, says in (("The cat", "not text"), (tok.encode("The cat"), "pass its .ids"),
                        ([ids], "(one prompt: batch size 1)"), (torch.tensor([ids], dtype=torch.float32), "float32"),
                        (torch.tensor([ids, ids]), "batch size 1")):
        with pytest.raises((TypeError, models.UsageError)) as e:
            hsd.generate(model, wrong, 6)
        message = str(e.value)
        assert says in message and "\n" not in message and ("ids" in message or "row" in message), message


def test_ctrl_c_while_torch_loads_is_one_line(tmp_path):
    """Ctrl-C in the first second, while torch is imported, is one line and exit status 130 in every tool, as later:
    a torch that raises KeyboardInterrupt when imported stands in for the key pressed then."""
    (tmp_path / "torch.py").write_text("raise KeyboardInterrupt\n")
    for tool in ("hsd", "hsd_eval", "hsd_bench", "hsd_search", "hsd_train"):
        result = run_cli("--model", "toy-falcon-h1", script=f"{tool}.py", env={"PYTHONPATH": str(tmp_path)})
        assert result.returncode == 130 and result.stderr.strip() == f"{tool}: interrupted", (tool, result.stderr)


def test_damaged_files_are_one_line_saying_what_to_do(tmp_path, capsys):
    cfg = {**QWEN2_TINY_JSON, "vocab_size": 97}
    save_checkpoint(models.init_random(models.Model(models.config_from_hf(cfg))), tmp_path, cfg)
    models.char_tokenizer().save(str(tmp_path / "tokenizer.json"))
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:5000])                          # an interrupted copy
    args = ["--model", str(tmp_path), "--draft", "layerskip", "--max-new-tokens", "2"]
    result = run_cli(*args)
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert f"{weights} is damaged or incomplete" in result.stderr and "replace it with an intact copy" in result.stderr
    blob = tmp_path / "blobs" / "0123abcd"                              # the Hugging Face cache: a link to a blob
    blob.parent.mkdir()
    weights.rename(blob)
    weights.symlink_to(blob)
    capsys.readouterr()
    assert main_status(hsd.main, args) == 2                                   # in this process from here on
    assert f"delete {blob} and run the command again" in capsys.readouterr().err
    save_checkpoint(models.init_random(models.Model(models.config_from_hf(cfg))), tmp_path / "ok", cfg)
    (tmp_path / "ok" / "tokenizer.json").write_text('{"version": "1.0", "truncat')
    assert main_status(hsd.main, ["--model", str(tmp_path / "ok"), *args[2:]]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{tmp_path / 'ok' / 'tokenizer.json'} is damaged or incomplete" in err


def test_k_with_plain_decoding_is_a_note_and_the_run_goes_on(capsys):
    for k in ("3", "auto"):
        assert hsd.main(["--model", "tiny-falcon-h1", "--draft", "none", "-k", k, "--max-new-tokens", "3",
                         "--json"]) == 0
        out, err = capsys.readouterr()
        assert err.startswith("hsd: note: -k has no effect with --draft none (plain decoding drafts nothing)\nmodel ")
        assert json.loads(out)["k"] is None
    assert hsd.generate(tiny("tiny-falcon-h1"), [1, 2], 3, draft="none", k=3)[1]["k"] is None


def test_auto_trace_shows_the_plain_steps_between_rounds(capsys, monkeypatch):
    """-k auto --trace: each run of plain steps is one line where it ran, and they add up to the summary's count."""
    real, wrong = hsd.draft, 0                                             # a draft that never agrees pauses
    monkeypatch.setattr(hsd, "draft", lambda *args, **kwargs: ([wrong] * len(real(*args, **kwargs)[0]), None))
    monkeypatch.setattr(hsd, "default_costs", lambda model, skip: (0.5, {1: 1.1}, 0.0))
    assert hsd.main(["--model", "tiny-falcon-h1", "-k", "auto", "--trace", "--max-new-tokens", "30",
                     "--json"]) == 0
    captured = capsys.readouterr()
    lines, stats = captured.err.splitlines(), json.loads(captured.out)
    kinds = [line.split()[0] for line in lines if line.startswith(("round", "plain"))]
    assert kinds[:4] == ["round", "plain", "round", "plain"] and "plain    16 steps" in lines, lines
    assert sum(int(line.split()[1]) for line in lines if line.startswith("plain ")) == stats["plain_steps"] > 8


def test_help_shows_defaults_and_threads_are_set(capsys):
    with pytest.raises(SystemExit):
        hsd.main(["--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "(default: 64)" in out and "(default: cpu)" in out and "(default: float32)" in out and "a Hub id" in out
    before = torch.get_num_threads()
    try:
        assert hsd.main(["--model", "tiny-falcon-h1", "--threads", "1", "--max-new-tokens", "2"]) == 0
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


# ----------------------------------------------------------------------------------------------------------
# hsd at a temperature: speculative sampling is exact in distribution
#
# The statistical tests below have a fixed false-alarm rate: each would reject a correct implementation with
# probability FALSE_ALARM over the random stream. The streams are seeded, so every run gives the same verdict.

TEMPERATURE = 0.6
FALSE_ALARM = 1e-4


def chi_square_threshold(df, alpha=FALSE_ALARM):
    """The chi-square quantile 1 - alpha (Wilson-Hilferty approximation, good to a few percent for df >= 3)."""
    z = statistics.NormalDist().inv_cdf(1 - alpha)
    return df * (1 - 2 / (9 * df) + z * math.sqrt(2 / (9 * df))) ** 3


def distributed_as(samples, probabilities):
    """Pearson's chi-square test of sampled token ids against `probabilities` (V,), tokens expected fewer than 5 times
    pooled into one category: (passes, what to say). A token of probability 0 must never be drawn."""
    counts = torch.bincount(torch.tensor(samples), minlength=len(probabilities)).double()
    expected = probabilities.double() * len(samples)
    if counts[expected == 0].sum() > 0:
        return False, "a token of probability 0 was drawn"
    big = expected >= 5
    observed = torch.cat([counts[big], counts[~big].sum()[None]])
    expected = torch.cat([expected[big], expected[~big].sum()[None]])
    observed, expected = observed[expected > 0], expected[expected > 0]
    chi2, df = ((observed - expected) ** 2 / expected).sum().item(), len(expected) - 1
    return chi2 < chi_square_threshold(df), f"chi-square {chi2:.1f} over {df} degrees of freedom, threshold " \
                                            f"{chi_square_threshold(df):.1f}"


_rows = {}


def sampling_rows(name):
    """What speculative sampling reads after PROMPTS["12-token"] in rounds of k = 1 with the component draft sharing
    the full model's state (as generate drafts): the full model's logits L1 (V,) after the prompt and L2 (V, V) after
    the prompt and each token x (row x); the draft's, Q1 (V,) and Q2 (V, V), for the same positions."""
    if name not in _rows:
        model, prompt = tiny(name), PROMPTS["12-token"]
        V, skip = model.config.vocab_size, TINY_SKIPS[name]["component"]
        with torch.inference_mode():
            after_x = torch.tensor([prompt + [x] for x in range(V)])                       # (V, T+1): prompt, then x
            L1 = model(after_x[:1, :-1])[0, -1]
            L2 = model(after_x)[:, -1]
            state = models.Cache(model, len(prompt) + 1, batch_size=V)
            model.hidden_states(after_x[:, :-2], state)            # the full model's state before the pending token
            Q1 = model(after_x[:, -2:-1], state, skip=skip)[0, -1]  # the draft, fed the pending (last prompt) token
            state = models.Cache(model, len(prompt) + 1, batch_size=V)
            model.hidden_states(after_x[:, :-1], state)            # the full model's state after the whole prompt
            Q2 = model(after_x[:, -1:], state, skip=skip)[:, -1]   # the next round's draft, fed x
        _rows[name] = L1, L2, Q1, Q2
    return _rows[name]


def speculative_first_two_tokens(name, n, seed):
    """Tokens 1 and 2 of speculative sampling in rounds of k = 1, n times, as generate makes them, with the model's
    outputs precomputed (sampling_rows): each draft is drawn from the draft's q, and hsd.accept_sampled judges it.
    Returns (first tokens, second tokens, how many first drafts were accepted)."""
    L1, L2, Q1, Q2 = sampling_rows(name)
    q1, q2 = hsd.probabilities(Q1, TEMPERATURE), hsd.probabilities(Q2, TEMPERATURE)
    g = torch.Generator().manual_seed(seed)
    first, second, accepted = [], [], 0
    for _ in range(n):
        d1 = int(torch.multinomial(q1, 1, generator=g))
        kept, token = hsd.accept_sampled([d1], q1[None], torch.stack([L1, L2[d1]]), TEMPERATURE, g)
        if kept:                  # d1 accepted: token 2 is the bonus, from the full model's row after d1
            accepted += 1
            first.append(d1)
            second.append(token)
        else:                     # d1 rejected: the correction is token 1, and the next round, after it, makes token 2
            first.append(token)
            d2 = int(torch.multinomial(q2[token], 1, generator=g))
            rows = torch.stack([L2[token], L2[token]])         # that round's bonus row is never read: a stand-in
            kept, token2 = hsd.accept_sampled([d2], q2[token][None], rows, TEMPERATURE, g)
            second.append(d2 if kept else token2)
    return first, second, accepted


@pytest.mark.parametrize("name", ["tiny-falcon-h1", "tiny-qwen3.5"])
def test_speculative_sampling_is_exact_in_distribution(name):
    """Acceptance with probability min(1, p/q), the correction from the residual max(0, p - q), the bonus from p: then
    the first draft is accepted with probability 1 - TV(p, q), and the first and second tokens are distributed as
    plain sampling's, p1 and sum_x p1(x) p2(. | x), computed exactly over the whole vocabulary. First, on rows whose
    verdict is certain, the two values are ints, which the round returns, the trace prints and --json writes."""
    q, inf = torch.tensor([[0.5, 0.5, 0.0, 0.0]], dtype=torch.float64), float("inf")
    rejected = torch.tensor([[-inf, 0.0, -inf, -inf], [0.0, 0.0, 0.0, 0.0]])      # p(d1) = 0: d1 = 0 is rejected
    accepted = torch.tensor([[0.0, 0.0, -inf, -inf], [-inf, -inf, 0.0, -inf]])    # p = q: d1 is accepted
    for logits, what in ((rejected, "the correction"), (accepted, "the bonus token")):
        got = hsd.accept_sampled([0], q, logits, TEMPERATURE, torch.Generator().manual_seed(0))
        teach(isinstance(got, (tuple, list)) and len(got) == 2, f"accept_sampled returned {kind_of(got)}: it returns "
                                                                "two values, (accepted, next_token)")
        teach_int(got[0], f"the number of accepted drafts (a round ending with {what})")
        teach_int(got[1], what)
    L1, L2, Q1, _ = sampling_rows(name)
    p1, p2, q1 = (hsd.probabilities(x, TEMPERATURE) for x in (L1, L2, Q1))
    n = 4_000
    first, second, accepted = speculative_first_two_tokens(name, n, seed=0)
    one_minus_tv = 1 - 0.5 * (p1 - q1).abs().sum().item()
    assert 0.05 < one_minus_tv < 0.95                      # both accepted and rejected drafts are frequent
    z = (accepted - n * one_minus_tv) / math.sqrt(n * one_minus_tv * (1 - one_minus_tv))
    teach(abs(z) < statistics.NormalDist().inv_cdf(1 - FALSE_ALARM / 2),
          f"the first draft was accepted {accepted / n:.4f} of the time, but 1 - TV(p, q) = {one_minus_tv:.4f}: accept "
          "draft i with probability min(1, p(d_i) / q(d_i)), p and q both at the temperature")
    ok, why = distributed_as(first, p1)
    teach(ok, f"the first token is not distributed as plain sampling's ({why}): a rejected draft is replaced by a "
              "sample from the residual max(0, p - q), normalised, p and q both at the temperature")
    ok, why = distributed_as(second, p1 @ p2)
    teach(ok, f"the second token is not distributed as plain sampling's ({why}): when every draft is accepted, the "
              "bonus token is sampled from the full model's p after the last draft")


def first_two_tokens_with_a_stop_or_auto(name, n, seed, rule):
    """Tokens 1 and 2 of speculative sampling, n times, as generate makes them, with the model's outputs precomputed
    (sampling_rows). rule "stop": rounds of k = 2 whose drafting stops after a first draft the draft gives less than
    0.5 (the second draft, if any, proposed from Q2's row of the first: any proposal keeps sampling exact); rule
    "auto": a round of two drafts, then, after a rejection, what k="auto" plans from it: a plain step (a pause) or a
    round of one draft, by the drafts it accepts on average, a_1 + a_1 a_2(d1), which depends on the first draft drawn
    (costs put the pause at its median: about half of the rounds pause). Returns (first tokens, second tokens, rounds
    rejected at once, the pauses after them)."""
    L1, L2, Q1, Q2 = sampling_rows(name)
    p1, p2 = hsd.probabilities(L1, TEMPERATURE), hsd.probabilities(L2, TEMPERATURE)
    q1, q2 = hsd.probabilities(Q1, TEMPERATURE), hsd.probabilities(Q2, TEMPERATURE)
    g = torch.Generator().manual_seed(seed)
    ranked = q1.sort(descending=True).values
    stop = ranked[int((ranked.cumsum(0) < 0.5).sum())]              # the draft is this sure of half its first drafts
    a1 = torch.minimum(p1, q1).sum()
    on_average = a1 + a1 * torch.minimum(p2, q2).sum(dim=-1)        # (V,): a round of d1 and a draw after it
    order = on_average.argsort()
    median = on_average[order[int((q1[order].cumsum(0) < 0.5).sum())]].item()
    costs = cost_model.costs_up_to((0.5, {1: 1.0, 2: 1.0}, median - 1.0), hsd.AUTO_MAX)   # 2 drafts: 1 + median steps
    first, second, rejected, pauses = [], [], 0, 0
    for _ in range(n):
        d1 = int(torch.multinomial(q1, 1, generator=g))
        drafts, q, rows = [d1], [q1], [L1, L2[d1]]
        if rule == "auto" or q1[d1] >= stop:                      # sure of d1 (or -k auto's two): a second draft
            drafts.append(int(torch.multinomial(q2[d1], 1, generator=g)))
            q.append(q2[d1])
            rows.append(L2[d1])                                    # the bonus row after d2 is never read: a stand-in
        accepted, token = hsd.accept_sampled(drafts, torch.stack(q), torch.stack(rows), TEMPERATURE, g)
        made = drafts[:accepted] + [token]
        if len(made) == 1:                   # rejected at once: token 2 comes from the next step
            rejected += 1
            expected = hsd.expected_accepted(drafts, torch.stack(q), torch.stack(rows), TEMPERATURE)
            plan = hsd.auto_k(hsd.Plan(2, 0, hsd.AUTO_PAUSE), 2, 0, expected, costs) if rule == "auto" else None
            if plan is not None and plan.plain > 0:                # auto pauses: a plain step samples from p
                made.append(int(torch.multinomial(p2[token], 1, generator=g)))
                pauses += 1
            else:                                                  # a round of one draft after it
                d = int(torch.multinomial(q2[token], 1, generator=g))
                kept, t = hsd.accept_sampled([d], q2[token][None], torch.stack([L2[token], L2[token]]), TEMPERATURE, g)
                made.append(d if kept else t)
        first.append(made[0])
        second.append(made[1])
    return first, second, rejected, pauses


@pytest.mark.parametrize("rule", ["stop", "auto"])
def test_a_stop_and_auto_k_sample_as_plain_sampling(rule):
    """Stopping a round after an unsure draft, and k="auto"'s plan after a round (a pause or a round of one draft, by
    what the round accepts on average, which depends on its drafts), depend only on the draft's own distribution and
    on rounds already judged: the first two tokens stay distributed as plain sampling's, p1 and p1 p2."""
    L1, L2, _, _ = sampling_rows("tiny-falcon-h1")
    p1, p2 = hsd.probabilities(L1, TEMPERATURE), hsd.probabilities(L2, TEMPERATURE)
    n = 8_000
    first, second, rejected, pauses = first_two_tokens_with_a_stop_or_auto("tiny-falcon-h1", n, seed=1, rule=rule)
    if rule == "auto":
        assert 0.2 * rejected < pauses < 0.8 * rejected, (pauses, rejected)   # both of auto's plans, often
    for tokens, p, which in ((first, p1, "first"), (second, p1 @ p2, "second")):
        ok, why = distributed_as(tokens, p)
        assert ok, f"the {which} token is not distributed as plain sampling's ({why})"


def test_rounds_and_plain_steps_sample_as_plain_sampling():
    """The whole round at k = 3 (draft, restore, verify, judge, commit) and plain sampling, 200 times each from the
    same state: the first token follows p1."""
    prompt = PROMPTS["12-token"]
    model, cache = filled_cache("tiny-falcon-h1", prompt[:-1])
    skip = TINY_SKIPS["tiny-falcon-h1"]["component"]
    snap, g = hsd.snapshot(cache), torch.Generator().manual_seed(1)
    spec, plain = [], []
    for _ in range(200):
        drafts, n, next_token, _ = hsd.speculative_round(model, cache, prompt[-1], skip, 3, TEMPERATURE, g)
        spec.append(drafts[0] if n else next_token)
        hsd.restore(cache, snap)
        plain.append(hsd.plain_step(model, cache, prompt[-1], TEMPERATURE, g))
        hsd.restore(cache, snap)
    p1 = hsd.probabilities(sampling_rows("tiny-falcon-h1")[0], TEMPERATURE)
    for samples, what in ((spec, "speculative rounds"), (plain, "plain sampling")):
        ok, why = distributed_as(samples, p1)
        assert ok, f"the first token of {what} is not distributed as p: {why}"


def test_sampling_is_reproducible_with_a_seed():
    model, prompt = tiny("tiny-qwen3.5"), PROMPTS["12-token"]
    runs = [hsd.generate(model, prompt, 16, k=3, eos_token_id=-1, temperature=1.5, seed=s) for s in (7, 7, 8)]
    assert runs[0][0] == runs[1][0] != runs[2][0] and len(runs[0][0]) == 16 and runs[0][1]["rounds"] > 0
    plain = [hsd.generate(model, prompt, 16, draft="none", eos_token_id=-1, temperature=1.5, seed=s)[0]
             for s in (7, 7, 8)]
    assert plain[0] == plain[1] != plain[2]


def test_cli_at_a_temperature_traces_sampled_rounds(capsys):
    args = ["--model", "tiny-falcon-h1", "--temperature", "0.6", "--seed", "1", "--trace", "--max-new-tokens", "12",
            "--json"]
    assert hsd.main(args) == 0
    captured = capsys.readouterr()
    out, stats = captured.err.splitlines(), json.loads(captured.out)
    assert "temperature 0.6, seed 1" in out[0] and stats["temperature"] == 0.6 and stats["seed"] == 1
    assert sum(line.startswith("round") for line in out) == stats["rounds"] > 0
    assert hsd.main(args) == 0                                           # the same seed: the same rounds and text
    again = capsys.readouterr().err.splitlines()
    shown = [x for x in out if x.startswith(("round", "output"))]
    assert [x for x in again if x.startswith(("round", "output"))] == shown


def test_a_temperature_without_a_seed_reports_the_seed_it_chose():
    """generate chooses a seed from torch's global stream and the statistics say which: rerunning with it repeats."""
    model = tiny("tiny-falcon-h1")
    torch.manual_seed(5)
    tokens, stats = hsd.generate(model, PROMPTS["12-token"], 12, temperature=TEMPERATURE, eos_token_id=-1)
    assert isinstance(stats["seed"], int)
    assert hsd.generate(model, PROMPTS["12-token"], 12, temperature=TEMPERATURE, seed=stats["seed"],
                        eos_token_id=-1)[0] == tokens
    assert hsd.generate(model, PROMPTS["12-token"], 4)[1]["seed"] is None


# ----------------------------------------------------------------------------------------------------------
# hsd: the statistics of a generation


def test_statistics_arithmetic():
    Step = hsd.Step
    steps = [Step("prefill", [], 0, None, [], 0.5), Step("round", [1, 2], 2, 3, [1, 2, 3], 0.25),
             Step("round", [4, 5], 0, 6, [6], 0.25), Step("round", [7, 8], 1, 9, [7, 9], 0.25),
             Step("round", [1], 1, 2, [1, 2], 0.25), Step("plain", [], 0, 5, [5], 0.5)]
    s = hsd.statistics(hsd.Draft("component", SKIP_NOTHING, 2, None), steps)
    assert (s["drafted"], s["accepted"], s["alpha"], s["rounds"]) == (7, 4, 4 / 7, 4)
    assert s["accepted_per_round"] == 1.0 and s["accepted_histogram"] == [1, 2, 1] and s["new_tokens"] == 9
    assert (s["prefill_s"], s["decode_s"], s["round_s"], s["tokens_per_s"]) == (0.5, 1.5, 1.0, 6.0)
    assert s["trace"] == [([1, 2], 2, 3), ([4, 5], 0, 6), ([7, 8], 1, 9), ([1], 1, 2)]


# ----------------------------------------------------------------------------------------------------------
# hsd: drafts from the text itself (lookup), and cascades (lookup+DRAFT)

def test_lookup_proposes_what_followed_the_longest_latest_earlier_occurrence():
    cases = [([1, 2, 3, 9, 1, 2, 3], 3, 8, [9, 1, 2, 3]),      # runs up to the end of what is committed, not past it
             ([1, 2, 5, 1, 2, 6, 1, 2], 2, 8, [6, 1, 2]),       # the latest occurrence of [1, 2], not the earliest
             ([7, 1, 2, 8, 2, 9, 1, 2], 2, 8, [8, 2, 9, 1, 2]),  # the longest suffix first: [1, 2], then [2]
             ([3, 3, 8, 3, 3, 3], 3, 8, [8, 3, 3, 3]),          # [3, 3] at 3 overlaps the suffix itself: not earlier
             ([1, 2, 1], 3, 1, [2]),                            # at most k
             ([1, 2, 3], 3, 8, []), ([5], 3, 8, [])]            # nothing occurs earlier
    for tokens, n, k, expected in cases:
        teach(hsd.lookup(tokens, n, k) == expected, f"lookup({tokens}, n={n}, k={k}) should be {expected}")
    shortest = [([7, 1, 2, 8, 2, 9, 1, 2], 2, 8, 2, [8, 2, 9, 1, 2]),   # [1, 2] occurs: as without least
                ([7, 1, 8, 2, 9, 3, 2], 2, 8, 2, []),                   # only [2] occurs: shorter than least
                ([7, 1, 8, 2, 9, 3, 2], 2, 8, 1, [9, 3, 2])]
    for tokens, n, k, least, expected in shortest:
        teach(hsd.lookup(tokens, n, k, least=least) == expected,
              f"lookup({tokens}, n={n}, k={k}, least={least}) should be {expected}")


def test_the_lookups_index_gives_what_a_scan_gives():
    """index_ngrams, brought up to date a few tokens at a time as generation commits them: the same proposals."""
    g = torch.Generator().manual_seed(0)
    for vocab in (2, 3, 5):
        tokens = torch.randint(vocab, (60,), generator=g).tolist()
        index, indexed = {}, 0
        for length in range(1, 61, 3):
            indexed = hsd.index_ngrams(index, tokens[:length], 3, indexed)
            assert hsd.lookup(tokens[:length], 3, 5, index) == hsd.lookup(tokens[:length], 3, 5)


LOOKUP_PROMPTS = {"repeats": "The cat sat on the mat. The cat sat on", "none": "Quick brown"}   # no repeat
LOOKUP_KS = [*range(1, 9), "auto"]


def lookup_cases():
    """(name, draft, ks): each tiny model with the lookup alone and each cascade, each toy with the lookup alone and
    the cascade of its family's paper draft; each case runs a third of LOOKUP_KS, a small, a middle and a large k
    (1, 4, 7 or 2, 5, 8 or 3, 6, auto), the cases of a draft taking the thirds in turn, so that together they run
    every k for each draft."""
    cases, turns = [], {}
    for name in [*FAMILIES, *models.TOYS]:
        family = name.replace("toy-", "tiny-")
        cascades = APPLICABLE[family][:-1] if name in models.TINY else APPLICABLE[family][:1]
        for draft in ["lookup", *(f"lookup+{d}" for d in cascades)]:
            turn = turns[draft] = turns.get(draft, -1) + 1
            cases.append((name, draft, LOOKUP_KS[turn % 3::3]))
    return cases


LOOKUP_CASES = lookup_cases()


def test_the_lookup_cases_run_every_k_of_every_draft_on_every_family():
    """lookup_cases: every tiny model with the lookup and every cascade, every toy with the lookup and one cascade;
    for each draft, its cases together run every k."""
    tiny_cases = {(n, d) for n, d, _ in LOOKUP_CASES if n in FAMILIES}
    assert tiny_cases == {(n, d) for n in FAMILIES for d in ["lookup", *(f"lookup+{x}" for x in APPLICABLE[n][:-1])]}
    for toy in models.TOYS:
        paper = APPLICABLE[toy.replace("toy-", "tiny-")][0]
        assert [d for n, d, _ in LOOKUP_CASES if n == toy] == ["lookup", f"lookup+{paper}"]
    for draft in {d for _, d, _ in LOOKUP_CASES}:
        ran = {k for _, d, ks in LOOKUP_CASES if d == draft for k in ks}
        assert ran == set(LOOKUP_KS), f"{draft} runs k in {sorted(map(str, ran))} only"


@pytest.mark.parametrize("name, draft, ks", LOOKUP_CASES, ids=[f"{n}-{d}" for n, d, _ in LOOKUP_CASES])
def test_the_lookup_and_its_cascades_are_lossless(name, draft, ks, monkeypatch):
    """Greedy output is plain greedy decoding's for every family x lookup and cascade x k (1..8 and auto, spread over
    the cases: lookup_cases), on a prompt with repeats and one without in turns; the rounds seen: ones the text's
    drafts were accepted in, ones it had nothing for (plain steps with the lookup alone; asserted on the toys), and
    rejected drafts from the text (asserted for the lookup alone). The tiny models' random weights repeat only runs of
    a character or two, so they match n-grams down to 1 (LOOKUP_LEAST 1); the toys run generation's own."""
    if name in models.TINY:
        monkeypatch.setattr(hsd, "LOOKUP_LEAST", 1)
    tokenizer = models.load_tokenizer(name) if name in models.TOYS else models.char_tokenizer()
    seen = set()
    for i, k in enumerate(ks):
        label = list(LOOKUP_PROMPTS)[i % 2]
        prompt = tokenizer.encode(LOOKUP_PROMPTS[label]).ids
        expected = reference_greedy(name, prompt)
        steps = list(hsd.generate_steps(tiny(name), prompt, NEW_TOKENS, draft, k, eos_token_id=-1))
        got = [t for step in steps for t in step.tokens]
        assert got == expected, f"{draft}, k={k}, prompt {label!r}: not plain greedy decoding's tokens"
        rounds = [s for s in steps if s.kind == "round"]
        seen |= {"accepted from the text" for r in rounds if min(r.from_text, r.accepted) > 0}
        seen |= {"rejected from the text" for r in rounds if r.accepted < r.from_text}
        marks = "".join("n" if s.proposed == 0 else "a" if s.kind == "round" and s.accepted else "."   # n: the text
                        for s in steps[1:])                                   # had nothing (a plain step, alone)
        seen |= {"nothing from the text between rounds that accept" for _ in [1] if re.search("a.*n.*a", marks)}
        seen |= {"nothing from the text" for _ in [1] if "n" in marks}
    assert "accepted from the text" in seen and ("rejected from the text" in seen or draft != "lookup"), seen
    if name in models.TOYS:          # the tiny models' random weights accept the text only inside loops, endless
        assert "nothing from the text" in seen, seen                 # on some toys between rounds that accept, too


def test_a_cascade_checks_a_proposal_shorter_than_k_and_with_k_auto_none(monkeypatch):
    """The one place the cascade's rounds are decided (generate_steps): with a fixed k the draft model checks a
    proposal shorter than k and drafts on (a round that mixes the text's drafts and the draft model's), a proposal of
    k tokens goes to the full model as it is; with -k auto every proposal goes alone, and the draft model drafts only
    where the text has nothing (its plan held at k = 8, never paused, so that a proposal shorter than k could be
    checked). The draft model's calls are counted: a text round makes none."""
    monkeypatch.setattr(hsd, "LOOKUP_LEAST", 1)          # the tiny model's random weights repeat one-character runs
    name, prompt = "tiny-falcon-h1", models.char_tokenizer().encode(LOOKUP_PROMPTS["repeats"]).ids
    real, proposals = hsd.draft, []

    def counted(*args, **kwargs):
        proposals.append(len(kwargs.get("proposed", args[9] if len(args) > 9 else ())))
        return real(*args, **kwargs)
    monkeypatch.setattr(hsd, "draft", counted)
    monkeypatch.setattr(hsd, "first_plan", lambda *args: hsd.Plan(8, 0, hsd.AUTO_PAUSE))    # -k auto held at k = 8,
    monkeypatch.setattr(hsd, "auto_k", lambda plan, *args: plan)                            # never paused
    for k in (4, "auto"):
        proposals.clear()
        steps = list(hsd.generate_steps(tiny(name), prompt, 60, "lookup+component", k, eos_token_id=-1))
        assert [t for s in steps for t in s.tokens] == reference_greedy(name, prompt, 60)
        produced, text_rounds, model_rounds = 0, 0, 0
        for step in steps[1:]:
            if step.kind == "round" and step.from_text == len(step.drafts) and step.proposed:     # the text alone
                text_rounds += 1
                assert k == "auto" or step.proposed == min(k, 60 - produced - 1), (k, step)
            elif step.kind == "round":
                model_rounds += 1
                assert k != "auto" or step.proposed == 0, step
            produced += len(step.tokens)
        assert text_rounds and model_rounds == len(proposals), (text_rounds, model_rounds, proposals)
        assert (not any(proposals)) if k == "auto" else (any(proposals) and max(proposals) < k), proposals


def test_a_match_that_runs_into_the_end_of_text_or_the_last_new_token():
    """The text proposes the end-of-text token ("d" after "abc", here): the drafts end there, and generation stops
    after it as plain decoding does; and near the last new token a round proposes only what fits."""
    name, prompt = "tiny-falcon-h1", models.char_tokenizer().encode("abcdabc").ids
    eos = prompt[3]
    greedy = reference_greedy(name, prompt, 30)
    steps = list(hsd.generate_steps(tiny(name), prompt, 30, "lookup", 8, eos_token_id=eos))
    assert [t for s in steps for t in s.tokens] == (greedy[:greedy.index(eos) + 1] if eos in greedy else greedy)
    assert steps[1].drafts == [eos] and steps[1].from_text == 1     # "dabc" proposed, cut after the end of text
    prompt = models.char_tokenizer().encode("abcabcabc").ids
    greedy = reference_greedy(name, prompt, 30)
    for new in range(1, 12):
        tokens, _ = hsd.generate(tiny(name), prompt, new, draft="lookup", k=8, eos_token_id=-1)
        assert tokens == greedy[:new]


@pytest.mark.parametrize("name", FAMILIES)
def test_a_round_the_text_has_nothing_for_leaves_plain_decodings_state(name, monkeypatch):
    """The first step after a prompt with no repeat finds nothing: the cache after it holds exactly (bit for bit)
    what plain decoding's holds after its first step."""
    made = []

    class Kept(models.Cache):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            made.append(self)
    monkeypatch.setattr(models, "Cache", Kept)
    prompt = models.char_tokenizer().encode(LOOKUP_PROMPTS["none"]).ids
    firsts = []
    for draft in ("lookup", "none"):
        steps = hsd.generate_steps(tiny(name), prompt, 5, draft, None if draft == "none" else 4, eos_token_id=-1)
        next(steps)                                                   # the prefill
        firsts.append(next(steps))
    assert firsts[0].kind == "plain" and firsts[0].proposed == 0 and firsts[0].next_token == firsts[1].next_token
    a, b = made
    assert a.length == b.length
    for x, y in zip(a.layers, b.layers, strict=True):
        for field in ("keys", "values", "conv", "ssm"):
            u, v = getattr(x, field), getattr(y, field)
            assert (u is None) == (v is None)
            if u is not None:
                assert torch.equal(u[:, :, :a.length] if field in ("keys", "values") else u,
                                   v[:, :, :a.length] if field in ("keys", "values") else v), field


def sharp_temperature(p_logits, token):
    """A temperature at which the token is likely but not certain (0.3 .. 0.9): the text's drafts often accepted."""
    return next(t for t in (1.0, 0.6, 0.4, 0.3, 0.2, 0.15, 0.1, 0.07, 0.05)
                if hsd.probabilities(p_logits, t)[token] >= 0.3)


@pytest.mark.parametrize("cascade", [False, True], ids=["lookup", "lookup+component"])
def test_the_text_as_the_draft_samples_as_plain_sampling(cascade):
    """A round whose drafts come from the text (q one-hot), alone or checked by the draft model: the first token
    follows p, the full model's distribution; in a cascade the first draft follows the draft model's q, which it
    passes up as the outer round's q. Both the accepting and the rejecting paths are exercised."""
    name = "tiny-falcon-h1"
    prompt = PROMPTS["12-token"]
    model, cache = filled_cache(name, prompt[:-1])
    skip = TINY_SKIPS[name]["component"]
    L1, _, Q1, _ = sampling_rows(name)
    best = int(L1.argmax())
    proposed = [best, best]
    t = sharp_temperature(L1, best)
    snap, g = hsd.snapshot(cache), torch.Generator().manual_seed(3)
    first, drafted, accepted_from_text = [], [], 0
    draws = 200                              # chi-square pools the tokens expected fewer than 5 times
    for _ in range(draws):
        if cascade:
            drafts, n, token, _ = hsd.speculative_round(model, cache, prompt[-1], skip, 3, t, g, proposed=proposed)
            drafted.append(drafts[0])
            accepted_from_text += n > 0 and drafts[0] == best
        else:
            n, token, _ = hsd.text_round(model, cache, prompt[-1], proposed, None, t, g)
            drafts = proposed
            accepted_from_text += n > 0
        first.append(drafts[0] if n else token)
        hsd.restore(cache, snap)
    assert 0.1 * draws < accepted_from_text < 0.9 * draws, accepted_from_text   # both paths, often
    ok, why = distributed_as(first, hsd.probabilities(L1, t))
    assert ok, f"the first token is not distributed as plain sampling's: {why}"
    if cascade:
        ok, why = distributed_as(drafted, hsd.probabilities(Q1, t))
        assert ok, f"the cascade's first draft is not a sample of the draft model: {why}"


def test_the_lookups_draft_is_chosen_in_one_place_and_prints_briefly(tmp_path):
    model = tiny("tiny-falcon-h1")
    alone, cascade = hsd.choose_draft(model, "lookup"), hsd.choose_draft(model, "lookup+component", 3)
    assert (alone.skip, alone.k, alone.lookup, alone.stop) == (None, hsd.LOOKUP_K, hsd.LOOKUP_N, None)
    assert (cascade.skip, cascade.k, cascade.lookup) == (TINY_SKIPS["tiny-falcon-h1"]["component"], 3, hsd.LOOKUP_N)
    assert hsd.choose_draft(model, "lookup", "auto")[2:5] == (hsd.AUTO_MAX, None, None)   # k, stop, costs
    for chosen in (alone, cascade):
        assert "tensor(" not in repr(chosen) and "object at" not in repr(chosen) and len(repr(chosen)) < 300
    with pytest.raises(models.UsageError, match="after lookup"):
        hsd.choose_draft(model, "lookup+none")
    path = tmp_path / "d.json"
    path.write_text(json.dumps({"format": "hsd-draft/1", "skip": {"attention": [1]}, "k": 2, "lookup": {"n": 2}}))
    tokens, s = hsd.generate(model, PROMPTS["12-token"], 12, draft=path, eos_token_id=-1)
    assert tokens == reference_greedy("tiny-falcon-h1", PROMPTS["12-token"], 12) and s["proposed"] > 0


def test_cli_traces_and_counts_the_texts_drafts(capsys):
    args = ["--model", "tiny-falcon-h1", "--prompt", "abcabcabcabc", "--max-new-tokens", "24", "--trace", "--json"]
    for draft in ("lookup", "lookup+layerskip"):
        assert hsd.main([*args, "--draft", draft, "-k", "4"]) == 0
        captured = capsys.readouterr()                    # --json: stdout holds the JSON alone, the trace is stderr's
        s, out = json.loads(captured.out), captured.err.splitlines()
        assert f"draft {draft}" in out[0] and s["draft"] == draft and s["from_text"] >= (draft == "lookup")
        assert any("from the text)" in line for line in out if line.startswith("round")) or draft != "lookup"
        assert any(line.startswith("text    ") and f"{s['from_text_accepted']} of {s['from_text']}" in line
                   for line in out)
    assert hsd.main([*args, "--draft", "lookup", "-k", "auto", "--check", "--repeats", "1"]) == 0
    captured = capsys.readouterr()
    assert "identical to plain greedy decoding" in captured.err and json.loads(captured.out)["identical_to_greedy"]


def test_statistics_count_the_texts_drafts_apart():
    Step = hsd.Step
    steps = [Step("prefill", [], 0, None, [], 0.5), Step("round", [1, 2, 3], 2, 4, [1, 2, 4], 0.25, 3, 3),
             Step("round", [5, 6], 0, 7, [7], 0.25, 4, 1), Step("plain", [], 0, 8, [8], 0.25, 0, 0),
             Step("round", [9], 1, 1, [9, 1], 0.25, 0, 0)]
    s = hsd.statistics(hsd.Draft("lookup+component", SKIP_NOTHING, 3, None, None, 3), steps)
    assert (s["proposed"], s["from_text"], s["from_text_accepted"], s["drafted"], s["accepted"]) == (7, 4, 2, 6, 3)
    assert hsd.statistics(hsd.Draft("component", SKIP_NOTHING, 3, None), steps)["proposed"] is None


# --- The lookup: drafts from the text itself (an exercise) -------------------------------------------------------
def proposal(tokens, n, k, index, least=1):
    """hsd.lookup's proposal, by a scan or (index) with an index brought up to the tokens by hsd.index_ngrams; a
    lookup that fails is said in a student's words, not as a traceback."""
    if index:
        index = {}
        hsd.index_ngrams(index, tokens, n)
    try:
        got, past = hsd.lookup(list(tokens), n, k, index or None, least=least), None
    except IndexError as e:                           # said after the except block: the message alone, no chain
        past = e
    teach(past is None, f"lookup asked for a token past the end of the committed tokens (IndexError: {past}): fewer "
                        "than k tokens may follow the occurrence, and the proposal then ends where the committed "
                        "tokens end")
    teach(isinstance(got, list), f"lookup returned {kind_of(got)}, not a list: a round's drafts are a list of ints")
    for token in got:
        teach_int(token, "a proposed token")
    return got


@pytest.mark.parametrize("index", [False, True], ids=["scan", "index"])
def test_lookup_proposes_what_followed_the_longest_earlier_suffix(index):
    """Prompt lookup (hsd.lookup): among the committed tokens, the latest earlier occurrence of the longest suffix of
    n, n-1, ..., least tokens, wholly before the suffix itself, and up to k of the tokens that followed it, never past
    the end; nothing found: no proposal. The same with the index that generation keeps (hsd.index_ngrams)."""
    got = proposal([1, 2, 3, 9, 8, 1, 2, 3], 3, 2, index)
    teach(got != [], "lookup proposed nothing although the last 3 tokens [1, 2, 3] occurred before: the occurrence "
                     "it found was the suffix itself, after which nothing follows; look for one wholly before it")
    teach(got == [9, 8], f"after [1, 2, 3, 9, 8, 1, 2, 3] with n = 3 and k = 2 lookup proposed {got}, not the 2 tokens "
                         "that followed the earlier [1, 2, 3]")
    got = proposal([4, 3, 8, 8, 1, 2, 3, 7, 7, 5, 3, 6, 6, 1, 2, 3], 3, 2, index)
    teach(got == [7, 7], f"the suffix [1, 2, 3] occurred before, followed by 7, 7, but lookup proposed {got}, what "
                         "followed a shorter suffix: try the largest n first, then n-1, ..., 1; the longest match wins")
    got = proposal([1, 1, 7, 1, 1, 1], 2, 8, index)
    teach(got == [7, 1, 1, 1], f"after [1, 1, 7, 1, 1, 1] with n = 2 lookup proposed {got}, not [7, 1, 1, 1]: it "
                               "took an occurrence overlapping the suffix itself; an earlier occurrence ends before "
                               "the suffix begins")
    got = proposal([1, 2, 5, 1, 2, 6, 1, 2], 2, 1, index)
    teach(got == [6], f"[1, 2] occurred twice before, followed by 5 and by 6, and lookup proposed {got}: propose what "
                      "followed the latest occurrence, [6]")
    got = proposal([1, 2, 3, 9, 1, 2, 3], 3, 8, index)
    teach(got == [9, 1, 2, 3], f"after [1, 2, 3, 9, 1, 2, 3] with k = 8 lookup proposed {got}: only 4 tokens follow "
                               "the earlier [1, 2, 3], so the proposal is those 4, ending where the committed tokens "
                               "end, never past the end and never more than k")
    got = proposal([1, 2, 3, 9, 1, 2, 3], 3, 3, index)
    teach(got == [9, 1, 2], f"after [1, 2, 3, 9, 1, 2, 3] with k = 3 lookup proposed {got}: at most k tokens")
    teach(proposal(list(range(1, 13)), 3, 8, index) == [], "tokens that repeat nothing: lookup must propose nothing")
    teach(proposal([5], 3, 8, index) == [], "a single committed token: nothing occurs before it, nothing to propose")
    got = proposal([4, 4], 3, 8, index)
    teach(got == [4], f"after [4, 4] with n = 3 lookup proposed {got}, not [4]: with fewer tokens than n, the longest "
                      "suffix that can occur earlier is shorter")
    got = proposal([7, 1, 8, 2, 9, 3, 2], 3, 8, index, least=2)
    teach(got == [], f"after [7, 1, 8, 2, 9, 3, 2] with least = 2 lookup proposed {got}: only the 1-token suffix [2] "
                     "occurs earlier, and least = 2 says no suffix shorter than 2 tokens counts")


class Judged:
    """A stand-in for the model in a text round: every call returns the given logits (d+1, V) as one batch row,
    advances the cache by the tokens fed and records how it was called; no layer has a state (recorded: [])."""

    def __init__(self, logits):
        self.logits, self.calls = logits, []
        self.config = types.SimpleNamespace(vocab_size=logits.shape[-1])

    def __call__(self, ids, cache, skip=None, record_states=False):
        self.calls.append({"ids": ids.tolist(), "skip": skip, "record_states": record_states})
        cache.length += ids.shape[1]
        return self.logits[None], []


def text_rounds(logits, proposed, temperature, n, seed, skip=None):
    """hsd.text_round n times over the same judging rows (Judged), each from a cache of 12 committed tokens: the
    verdicts (accepted, next token) and the Judged model of the last one."""
    generator, verdicts = torch.Generator().manual_seed(seed), []
    for _ in range(n):
        model, cache = Judged(logits), types.SimpleNamespace(length=12, layers=[], device=torch.device("cpu"))
        got = hsd.text_round(model, cache, 7, list(proposed), skip, temperature, generator)
        teach(isinstance(got, tuple) and len(got) == 3, f"text_round returned {kind_of(got)}: it returns three values, "
                                                        "(accepted, next_token, logits)")
        teach_int(got[0], "the number of accepted proposed tokens")
        teach_int(got[1], "the next token")
        teach(cache.length == 12 + got[0] + 1, f"after a text round that accepted {got[0]} of {len(proposed)} "
                                               f"proposed tokens the cache holds {cache.length - 12} new tokens, not "
                                               "the pending token and the accepted ones")
        verdicts.append(got[:2])
    return verdicts, model


def test_a_text_round_judges_the_text_as_a_one_hot_draft():
    """A round whose draft is the text (hsd.text_round): one verify pass over the pending token and the proposed
    tokens, by the full model or, given a skip (a cascade's inner check), by the draft model; greedy, accept's
    verdict; at a temperature the exact rule of a deterministic draft: q is one-hot, so the proposed d is accepted
    with probability p(d), a rejection is replaced by a draw from p with d removed, and after an accepted d the bonus
    comes from p after it: the tokens are distributed as plain sampling's. The judging rows are made up (a model's
    would do as well), the proposed token's p exactly 1/2 at the temperature: accepted and rejected alike often."""
    T, V, d = TEMPERATURE, 97, 5
    L1, L2 = torch.randn(2, V, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    others = torch.cat([L1[:d], L1[d + 1:]])
    L1[d] = T * torch.logsumexp(others / T, dim=0)                                 # p(d) = 1/2 at T
    logits = torch.stack([L1, L2])                                                     # (2, V): judges d, then bonus
    (verdict,), judged = text_rounds(logits, [d], 0.0, 1, 0)
    call = judged.calls[0]
    teach(call["ids"] == [[7, d]] and call["record_states"], "a text round feeds the pending token and the proposed "
                                                             "tokens in one pass that records the states (verify)")
    teach(verdict == hsd.accept([d], logits), "greedy, a text round's verdict is accept's")
    skip = models.Skip(attention=frozenset({0}))
    teach(text_rounds(logits, [d], 0.0, 1, 0, skip)[1].calls[0]["skip"] == skip, "with a skip (a cascade's inner "
          "check) the draft model judges the proposed tokens: its verify pass runs with that skip")
    n = 6_000
    verdicts, _ = text_rounds(logits, [d], T, n, seed=0)
    p1, p2 = hsd.probabilities(L1, T), hsd.probabilities(L2, T)
    accepted = sum(a for a, _ in verdicts)
    z = (accepted - n * p1[d].item()) / math.sqrt(n * p1[d].item() * (1 - p1[d].item()))
    teach(abs(z) < statistics.NormalDist().inv_cdf(1 - FALSE_ALARM / 2),
          f"the proposed token was accepted {accepted / n:.4f} of the time, but the full model gives it p(d) = "
          f"{p1[d].item():.4f}: the text's draft is deterministic, its q one-hot (q(d) = 1), so d is accepted with "
          "probability min(1, p(d) / q(d)) = p(d), p at the round's temperature")
    ok, why = distributed_as([d if a else t for a, t in verdicts], p1)
    teach(ok, f"the first token is not distributed as plain sampling's ({why}): after a rejection the next token is "
              "drawn from max(0, p - q), p with the proposed token removed")
    ok, why = distributed_as([t for a, t in verdicts if a], p2)
    teach(ok, f"after an accepted proposal the bonus token is not distributed as plain sampling's ({why}): it is drawn "
              "from the full model's p after it")

"""Tests for hsd_eval.py, the paper's measurements: python -m pytest -q test_hsd_eval.py (offline, on the tiny models
and the trained toys). The grading tests of the measurements' exercises (EXERCISES.md) are ordinary tests here."""
import contextlib
import functools
import io
import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from xml.etree import ElementTree

import pytest
import tokenizers.processors
import torch
from safetensors.torch import save_file

import cost_model
import hsd
import hsd_eval
import hsd_train
import models

HERE = os.path.dirname(os.path.abspath(__file__))
FAMILIES = list(models.TINY)
SKIP_NOTHING = models.Skip()        # a draft that leaves nothing out: it must accept every draft
PROMPTS = {"1-token": [40], "12-token": models.char_tokenizer().encode("The cat sat ").ids}
# The paper's drafts for the tiny models, as test_hsd.py's TINY_SKIPS: written out, not hsd.draft_skip's, which the
# draft-strategies exercise blanks while these measurements grade other exercises.
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
REAL_DRAFTS = [(name, draft) for name, skips in TINY_SKIPS.items() for draft in skips]


@pytest.fixture(autouse=True)
def one_timed_turn(monkeypatch):
    """hsd_eval's step times in these tests from one timed turn of the cost model's harness, not 7 (after its two
    warm-up turns): these tests check what a run does with its times, not the times; a run's step times are most of
    its seconds here (tiny-falcon-h1's second context is 2048 tokens, prefilled twice a turn)."""
    monkeypatch.setattr(hsd_eval, "step_times", functools.partial(hsd_eval.step_times, repeats=1))


QWEN2_TINY_JSON = {"model_type": "qwen2", "vocab_size": 300, "hidden_size": 64, "intermediate_size": 96,
                   "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                   "tie_word_embeddings": True, "rope_theta": 1e6, "rms_norm_eps": 1e-6, "eos_token_id": 0}

_models = {}


def tiny(name, dtype=torch.float64):
    """Tiny models in float64 for exact comparisons: a near-tie between two logits cannot flip a choice here."""
    if (name, dtype) not in _models:
        _models[name, dtype] = models.load(name, dtype=dtype)
    return _models[name, dtype]


def teach(ok, message):
    """Unless ok, fail with the message alone: no traceback, no values (what a student reads first)."""
    if not ok:
        pytest.fail(message, pytrace=False)


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


def save_checkpoint(model, path, cfg):
    """Write model in the official layout (config.json + model.safetensors)."""
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg, f)
    save_file({name: param.detach() for name, param in model.named_parameters()}, os.path.join(path, "model.safetensors"),
              metadata={"format": "pt"})


def training_log(name):
    with open(os.path.join(models.TOYS[name], "training-log.json")) as f:
        return json.load(f)


# ----------------------------------------------------------------------------------------------------------
# hsd_eval.py: the measurements


def test_bootstrap_gives_a_95_percent_interval():
    """200 values, half 0 and half 1: the mean's standard error is 0.0354, so a 95% interval is about 1.96 of them
    either side of 0.5 (the resampled means are multiples of 1/200, hence the tolerance); seeded, so repeatable."""
    teach(cost_model.bootstrap_ci([0.25] * 50) == (0.25, 0.25), "values that are all 0.25: every resample's mean is 0.25, "
                                                              "and so is the interval")
    low, high = cost_model.bootstrap_ci([0.0] * 100 + [1.0] * 100)
    teach(high > low, "the interval has no width: each resample draws n values with replacement, so its mean varies; "
                      "a permutation of the values always has the same mean")
    teach(high - low > 0.13, f"[{low:.3f}, {high:.3f}] is narrower than a 95% interval (about 0.139 wide here): the "
                             "2.5% and 97.5% quantiles of the resampled means")
    teach(high - low < 0.15, f"[{low:.3f}, {high:.3f}] is wider than a 95% interval (about 0.139 wide here)")
    teach(abs(low + high - 1) < 0.02, f"[{low:.3f}, {high:.3f}] is not centred on the mean, 0.5")
    values = torch.rand(50, generator=torch.Generator().manual_seed(0)).tolist()
    teach(cost_model.bootstrap_ci(values) == cost_model.bootstrap_ci(values), "the same seed must give the same interval: "
                                                                          "draw with a generator seeded by `seed`")
    teach(cost_model.bootstrap_ci(values) != cost_model.bootstrap_ci(values, seed=1), "another seed, the same interval: "
                                                                                  "the seed is not used")


def test_break_even_arithmetic():
    """gap(L) = (1 + a) t_full - k t_draft - t_verify - t_round, linear in the context L through the two measured
    contexts."""
    times = {100: {"full": 1.0, "component": 0.9, 2: 1.2, "round": 0.0},
             1100: {"full": 2.5, "component": 0.9, 2: 2.2, "round": 0.0}}
    got = cost_model.break_even(times, "component", 2, 1.0, max_context=4096)
    teach(got == 600, f"the gap rises from -1.0 at 100 tokens to +1.0 at 1100, so it crosses 0 at 600, not {got}: "
                      "interpolate linearly from the first context")
    got = cost_model.break_even(times, "component", 2, 1.0, max_context=500)
    teach(got is None, f"the crossing at 600 lies beyond the model's context of 500: None, not {got}")
    got = cost_model.break_even(times, "component", 2, 3.0, max_context=4096)
    teach(got == 0, f"with a = 3 the gap is positive at both contexts: it pays off from the start (0), not {got}")
    flat = {100: {"full": 1.0, "component": 0.9, 2: 1.2, "round": 0.0},
            1100: {"full": 1.0, "component": 0.9, 2: 1.2, "round": 0.0}}
    teach(cost_model.break_even(flat, "component", 2, 1.0, max_context=4096) is None, "a gap that does not rise never "
                                                                                    "crosses 0: None")
    falling = {100: {"full": 2.5, "component": 0.9, 2: 2.2, "round": 0.0},
               1100: {"full": 1.0, "component": 0.9, 2: 1.2, "round": 0.0}}
    teach(cost_model.break_even(falling, "component", 2, 1.0, max_context=4096) is None, "a falling gap pays off only "
                                                                                       "below the crossing: None")
    with_round = {L: {**t, "round": 0.5} for L, t in times.items()}      # a round's own work: the gap 0.5 lower
    got = cost_model.break_even(with_round, "component", 2, 1.0, max_context=4096)
    teach(got == 850, f"a round's own 0.5 s lowers the gap to -1.5 at 100 tokens and +0.5 at 1100: it crosses 0 at "
                      f"850, not {got}: the round costs k t_draft + t_verify + t_round")
    assert cost_model.predicted_speedup(2.0, [2], 0.75, {2: 1.5}, 0.0) == 2 / 3


@pytest.mark.parametrize("name", FAMILIES)
def test_divergence_and_nll_against_direct_computation(name):
    """Every position but the last; KL with the authors' 1e-10 inside both logs; chunks that do not divide T."""
    model, ids = tiny(name), torch.tensor([PROMPTS["12-token"] * 3])
    skips = {"early-exit": TINY_SKIPS[name]["early-exit"], "skip-nothing": SKIP_NOTHING}
    p = torch.softmax(model(ids)[0, :-1].double(), -1)
    q = torch.softmax(model(ids, skip=skips["early-exit"])[0, :-1].double(), -1)
    sums = hsd_eval.divergence(model, ids, skips, chunk=7)["early-exit"]
    assert math.isclose(sums["tvd"], 0.5 * (p - q).abs().sum().item(), rel_tol=1e-9)
    assert sums["top1"] == (p.argmax(-1) == q.argmax(-1)).sum().item() and sums["positions"] == ids.shape[1] - 1
    assert math.isclose(sums["kl"], (p * ((p + 1e-10).log() - (q + 1e-10).log())).sum().item(), rel_tol=1e-9)
    assert hsd_eval.divergence(model, ids, skips)["skip-nothing"] == {"tvd": 0, "top1": ids.shape[1] - 1, "kl": 0,
                                                                   "positions": ids.shape[1] - 1}
    targets = ids[0, 1:]
    expected = torch.nn.functional.cross_entropy(model(ids)[0, :-1].double(), targets, reduction="sum").item()
    assert math.isclose(hsd_eval.nll(model, ids, chunk=7), expected, rel_tol=1e-9)
    expected = -q.log().gather(1, targets[:, None]).sum().item()
    assert math.isclose(hsd_eval.nll(model, ids, skips["early-exit"]), expected, rel_tol=1e-9)


def draft_without_cache(model, prompt_ids, skip, k):
    """The paper's protocol, literally: the draft model recomputes the whole prefix for each of its k tokens."""
    ids = list(prompt_ids)
    while len(ids) < len(prompt_ids) + k:
        ids.append(int(model(torch.tensor([ids]), skip=skip)[0, -1].argmax()))
    return ids[-k:]


@pytest.mark.parametrize("name, draft", REAL_DRAFTS)
def test_independent_single_round_is_the_papers_protocol(name, draft):
    model, skip = tiny(name), TINY_SKIPS[name][draft]
    for text in ["The cat sat on the mat", "A", "Speculative decoding drafts"]:
        prompt = models.char_tokenizer().encode(text).ids
        drafts = draft_without_cache(model, prompt, skip, 5)
        full = model(torch.tensor([prompt + drafts]))[0, len(prompt) - 1:].argmax(-1).tolist()
        expected = next((i for i in range(5) if drafts[i] != full[i]), 5)
        cache, own = models.Cache(model, len(prompt) + 6), models.Cache(model, len(prompt) + 6)
        hsd.prefill(model, cache, prompt[:-1])
        hsd.prefill(model, own, prompt[:-1], skip)
        assert hsd_eval.single_round(model, cache, own, prompt[-1], skip, 5) == expected


def test_shared_single_round_is_the_first_round_of_generate():
    model, skip = tiny("tiny-falcon-h1"), TINY_SKIPS["tiny-falcon-h1"]["layerskip"]
    for text in ["The cat sat on the mat", "Speculative decoding drafts"]:
        prompt = models.char_tokenizer().encode(text).ids
        cache = models.Cache(model, len(prompt) + 6)
        hsd.prefill(model, cache, prompt[:-1])
        _, stats = hsd.generate(model, prompt, 10, draft=skip, k=5, eos_token_id=-1)
        assert hsd_eval.single_round(model, cache, cache, prompt[-1], skip, 5) == stats["trace"][0][1]
        generator = torch.Generator().manual_seed(4)
        _, sampled = hsd.generate(model, prompt, 10, draft=skip, k=5, eos_token_id=-1, temperature=0.6, seed=4)
        accepted = hsd_eval.single_round(model, cache, cache, prompt[-1], skip, 5, 0.6, generator)
        assert accepted == sampled["trace"][0][1]                    # the same random stream: the same first round


def test_single_round_leaves_both_caches_as_they_were():
    model, prompt = tiny("tiny-qwen3.5"), PROMPTS["12-token"]
    skip = TINY_SKIPS["tiny-qwen3.5"]["component"]
    cache, own = models.Cache(model, 40), models.Cache(model, 40)
    hsd.prefill(model, cache, prompt[:-1])
    hsd.prefill(model, own, prompt[:-1], skip)
    before = [hsd.snapshot(each) for each in (cache, own)]
    assert hsd_eval.single_round(model, cache, cache, prompt[-1], models.Skip(), 5) == 5      # nothing skipped: all
    g = torch.Generator().manual_seed(0)
    assert hsd_eval.single_round(model, cache, cache, prompt[-1], models.Skip(), 5, 0.6, g) == 5     # p = q: all
    for draft_cache in (cache, own):
        for temperature in (0.0, 0.6):
            assert 0 <= hsd_eval.single_round(model, cache, draft_cache, prompt[-1], skip, 5, temperature, g) <= 5
    for each, snap in zip((cache, own), before):
        assert each.length == snap.length and all(s.ssm is m.ssm for s, m in zip(each.layers, snap.layers))


PAPER_TEXT = [" = Title = ", " ", " " + "a" * 99 + " ", " " + "b" * 101 + " ", "c" * 60, " " + "d" * 201 + " ",
              "e" * 40, " " + "f" * 150]


def test_paper_inputs_follow_the_authors_rules():
    """Lines are stripped before filtering (WikiText's leading space and trailing " " are gone), lengths are those of
    stripped lines, prompts carry the tokenizer's default special tokens, perplexity text has none."""
    tok = models.char_tokenizer()
    tok.post_processor = tokenizers.processors.TemplateProcessing(single="<|endoftext|> $A",
                                                                  special_tokens=[("<|endoftext|>", 96)])   # a BOS
    inputs = hsd_eval.paper_inputs(PAPER_TEXT, tok, max_len=4096, prompts=200, speed_prompts=10)
    decode = lambda ids: tok.decode(ids[1:]) if ids[0] == 96 else None                         # the BOS, then the line
    assert [decode(x) for x in inputs["alpha"]] == ["b" * 101, "d" * 201, "f" * 150]             # 99 + 2 spaces: out
    assert [decode(x) for x in inputs["divergence"]] == ["d" * 127]                              # 128 tokens with BOS
    assert [decode(x) for x in inputs["speed"]] == ["a" * 99, "b" * 101, "c" * 60, "d" * 201, "f" * 150]
    assert tok.decode(inputs["perplexity"][0]) == "\n".join(line.strip() for line in PAPER_TEXT if line.strip())
    assert 96 not in inputs["perplexity"][0]
    short = hsd_eval.paper_inputs(PAPER_TEXT, tok, max_len=120, prompts=2, speed_prompts=1)
    assert [len(x) for x in short["alpha"]] == [102, 102] and len(short["speed"]) == 1   # cut to max_len - 8 - 10


def test_paper_inputs_perplexity_text_is_the_first_2048_tokens():
    lines = [f" line {i} " + "x" * 990 for i in range(80)]
    text = models.char_tokenizer().decode(hsd_eval.paper_inputs(lines, models.char_tokenizer(), 4096)["perplexity"][0])
    assert text == "\n".join(line.strip() for line in lines)[:2048]


def test_tiny_text_has_lines_for_every_protocol():
    lines = [line.strip() for line in cost_model.TINY_TEXT]
    assert sum(len(x) > 200 for x in lines) >= 3 and sum(len(x) > 100 for x in lines) >= 6
    assert sum(len(x) > 50 for x in lines) >= 8 and any(x != x.strip() for x in cost_model.TINY_TEXT)


def test_prompts_carry_the_special_tokens_transformers_adds(tmp_path):
    """hsd encodes with tokenizer.json as the tokenizers library reads it: the same ids as a transformers tokenizer
    call, whose tokenizer_config.json add_bos_token is ignored where a tokenizer.json exists (transformers 5.23)."""
    tf = pytest.importorskip("transformers")
    from tokenizers import Tokenizer, decoders, models as tm, pre_tokenizers, processors, trainers
    tok = Tokenizer(tm.BPE())
    tok.pre_tokenizer, tok.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    tok.train_from_iterator(cost_model.TINY_TEXT * 5, trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<|endoftext|>", "<s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    for bos in (True, False):
        for cls, add_bos in [("PreTrainedTokenizerFast", not bos), ("Qwen2Tokenizer", not bos)]:
            path = tmp_path / f"{cls}-{bos}"
            path.mkdir()
            tok.post_processor = (processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)]) if bos
                                  else processors.ByteLevel(trim_offsets=False))
            tok.save(str(path / "tokenizer.json"))
            (path / "tokenizer_config.json").write_text(json.dumps(
                {"tokenizer_class": cls, "bos_token": "<s>", "eos_token": "<|endoftext|>", "add_bos_token": add_bos}))
            ours, theirs = models.load_tokenizer(str(path)), tf.AutoTokenizer.from_pretrained(str(path))
            for line in cost_model.TINY_TEXT[1:4]:
                assert ours.encode(line.strip()).ids == theirs(line.strip())["input_ids"]
                assert (ours.encode(line.strip()).ids[0] == 1) == bos


def fake_records(alpha_counts, skips):
    """Records of a run whose single rounds accepted the given counts (per prompt: per draft, the same for every
    variant), and whose other phases are empty."""
    records = hsd_eval.Records(None, {})
    for i, (shared, independent) in enumerate(alpha_counts):
        records.add("alpha", i, {draft: {"shared": shared, "independent": independent, "sampled_shared": shared,
                                         "sampled_independent": independent} for draft in skips})
    records.add("perplexity", 0, dict.fromkeys(["full", *skips], 1.0))
    return records


def test_eval_alpha_arithmetic():
    """Acceptance per prompt from single rounds of 8 drafts: alpha_k = mean(min(accepted, k) / k), histogram of
    min(accepted, k)."""
    model = tiny("tiny-falcon-h1")
    skips = {"component": TINY_SKIPS["tiny-falcon-h1"]["component"]}
    inputs = {"alpha": [[1, 2], [3, 4]], "divergence": [], "perplexity": [[1, 2, 3]], "speed": []}
    times = {L: {"full": 2.0, "component": 1.0, 2: 2.0, 4: 3.0, 8: 4.0, "round": 0.0} for L in (10, 20)}
    r = hsd_eval.summarize(model, inputs, skips, fake_records([(0, 8), (3, 5)], skips), (10, 20), times, 0.6)
    k = r["drafts"]["component"]["k"]
    assert k[2]["alpha_shared"] == (0 / 2 + 2 / 2) / 2 and k[2]["histogram_shared"] == [1, 0, 1]
    assert k[4]["alpha_independent"] == (4 / 4 + 4 / 4) / 2 and k[4]["histogram_independent"] == [0, 0, 0, 0, 2]
    assert k[8]["alpha_shared"] == (0 / 8 + 3 / 8) / 2 and k[8]["alpha_independent"] == (8 / 8 + 5 / 8) / 2
    assert k[8]["histogram_shared"] == [1, 0, 0, 1, 0, 0, 0, 0, 0] and k[8]["ci_independent"][1] == 1.0
    assert k[8]["alpha_sampled_independent"] == k[8]["alpha_independent"] and k[2]["alpha_multi"] is None
    assert r["drafts"]["component"]["c"] == 0.5 and k[4]["v"] == 1.5


def test_eval_numbers_against_direct_computations(monkeypatch):
    """Perplexity = exp(mean cross-entropy); divergence averaged over positions; S = (1 + a) / (k c + v + r)."""
    model, tok = tiny("tiny-qwen3.5", torch.float32), models.char_tokenizer()
    fake = {"full": 2.0, "component": 1.5, "layerskip": 1.0, "early-exit": 0.5, 2: 2.5, 4: 3.0, 8: 4.0,
            "round": 0.4, "logits": 0.001, "prefill": 0.1}
    monkeypatch.setattr(hsd_eval, "step_times", lambda *args: fake)
    inputs = hsd_eval.paper_inputs(cost_model.TINY_TEXT, tok, 4096, prompts=2, speed_prompts=1)
    skips = dict(TINY_SKIPS["tiny-qwen3.5"])
    records = hsd_eval.Records(None, {})
    contexts, times = hsd_eval.measure(model, "tiny-qwen3.5", inputs, skips, records, 6, 0.6, 0)
    r = hsd_eval.summarize(model, inputs, skips, records, contexts, times, 0.6)
    ids = torch.tensor(inputs["perplexity"])
    for logits, perplexity in [(model(ids), r["perplexity_full"]),
                               (model(ids, skip=skips["component"]), r["drafts"]["component"]["perplexity"])]:
        ce = torch.nn.functional.cross_entropy(logits[0, :-1].double(), ids[0, 1:])
        assert math.isclose(perplexity, math.exp(min(ce.item(), 20)), rel_tol=1e-6)     # the authors' cap at e^20
    texts = [torch.tensor([x]) for x in inputs["divergence"]]
    tvd = sum(0.5 * (torch.softmax(model(x)[0, :-1].double(), -1) - torch.softmax(
        model(x, skip=skips["component"])[0, :-1].double(), -1)).abs().sum().item() for x in texts)
    entry = r["drafts"]["component"]
    assert math.isclose(entry["tvd"], tvd / sum(x.shape[1] - 1 for x in texts), rel_tol=1e-6)
    for k in (2, 4, 8):
        row = entry["k"][k]
        assert entry["c"] == 0.75 and row["v"] == fake[k] / 2.0 and row["r"] == 0.2
        assert math.isclose(row["predicted_speedup"], (1 + row["accepted_per_round"]) / (k * 0.75 + fake[k] / 2.0
                                                                                         + 0.2))
        speed = records.saved["speed", 0]["component"][str(k)]
        assert row["alpha_multi"] == speed["accepted"] / speed["drafted"]


def test_estimate_arithmetic():
    t = {"full": 1.0, "component": 0.5, 2: 2.0, 4: 3.0, 8: 4.0, "round": 0.25, "prefill": 10.0, "context": 100,
         "logits": 0.01}
    inputs = {"alpha": [[0] * 100], "divergence": [[0] * 50], "perplexity": [[0] * 150], "speed": [[0] * 10]}
    phase_s = hsd_eval.estimate_seconds(t, inputs, ["component"], 6, lambda draft, k: 1.0)
    assert phase_s["alpha"] == 0.1 * 100 * 1.5 + 4 * (8 * 0.5 + 4.0)            # passes over the prompt; 4 rounds of 8
    assert math.isclose(phase_s["divergence and perplexity"], 200 * (0.1 * 1.5 + 0.01 * 2))
    rounds = sum(6 / 2 * (k * 0.5 + t[k] + 0.25) + 0.1 * 10 for k in (2, 4, 8))   # 1 + a = 2 tokens a round
    assert math.isclose(phase_s["speed"], 0.1 * 10 + 6 * 1.0 + rounds)


def test_records_resume_and_refuse_another_run(tmp_path):
    path = str(tmp_path / "run.jsonl")
    records = hsd_eval.Records(path, {"model": "m", "prompts": 3})
    records.add("alpha", 0, {"component": {"shared": 1}})
    records.add("costs", 12, {"full": 1.0})
    with open(path, "a") as f:
        f.write('{"phase": "alpha", "index": 1, "res')                  # a crash in the middle of a line
    again = hsd_eval.Records(path, {"model": "m", "prompts": 3})
    assert again.saved == {("alpha", 0): {"component": {"shared": 1}}, ("costs", 12): {"full": 1.0}}
    assert again.missing("alpha", 3) == [1, 2] and again.resumed
    again.add("alpha", 1, {"component": {"shared": 0}})
    assert len(open(path).read().splitlines()) == 4                       # the half line is gone, the new one whole
    with pytest.raises(models.UsageError, match="holds another run \\(prompts 3 there, 4 now\\)"):
        hsd_eval.Records(path, {"model": "m", "prompts": 4})


def test_records_file_that_is_not_a_results_file(tmp_path):
    """An --out file that is not hsd's is refused, never overwritten; one cut off before its header starts afresh."""
    for content in (b"no results here\n", b"[1, 2]\n", b'{"header": {}}\n{"phase": 1}\n', b"\xff\xfe\n", b"notes"):
        path = tmp_path / "other.txt"
        path.write_bytes(content)
        with pytest.raises(models.UsageError, match="is not a results file of hsd_eval"):
            hsd_eval.Records(str(path), {"model": "m"})
        assert path.read_bytes() == content
    for content in (b"", b'{"header": {"mod'):
        path = tmp_path / "cut.jsonl"
        path.write_bytes(content)
        records = hsd_eval.Records(str(path), {"model": "m"})
        assert not records.resumed and path.read_text() == '{"header": {"model": "m"}}\n'
    with pytest.raises(models.UsageError, match="cannot write --out"):
        hsd_eval.Records(str(tmp_path / "no such folder" / "run.jsonl"), {"model": "m"})


@pytest.mark.parametrize("flag, where, message", [
    ("--plot", "no such folder/a.svg", "cannot write --plot"), ("--plot", ".", "it is a folder: give a file name"),
    ("--plot", "/proc/x.svg", "cannot write --plot /proc/x.svg"), ("--out", ".", "cannot write --out"),
    ("--out", "/proc/x.jsonl", "cannot write --out /proc/x.jsonl"),
])
def test_eval_refuses_an_output_it_could_not_write_before_measuring(tmp_path, flag, where, message, monkeypatch,
                                                                   capsys):
    """Every output path is proven writable (a folder, a missing folder, a place even root cannot write, such as
    /proc) before anything is measured: one line, exit 2."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(hsd_eval, "measure", lambda *args, **kwargs: pytest.fail("measured before refusing"))
    assert main_status(hsd_eval.main, ["--model", "tiny-falcon-h1", flag, where]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err


def test_checking_an_output_path_truncates_nothing(tmp_path):
    """A resume file keeps what it holds when the check opens it, and a path that was not there is not left behind."""
    kept = tmp_path / "run.jsonl"
    kept.write_text('{"header": {}}\n')
    cost_model.check_writable(str(kept), "--out")
    cost_model.check_writable(str(tmp_path / "new.svg"), "--plot")
    assert kept.read_text() == '{"header": {}}\n' and not (tmp_path / "new.svg").exists()


def test_eval_with_one_new_token_and_no_divergence_text(tmp_path, capsys):
    """One new token leaves no round to speculate (no acceptance, no speedup, no break-even), and a text without a
    line over 200 characters leaves divergence without positions: both print "-", not a traceback or a zero."""
    text = tmp_path / "short.txt"
    text.write_text("\n".join(line[:190] for line in cost_model.TINY_TEXT))
    assert hsd_eval.main(["--model", "tiny-falcon-h1", "--text", str(text), "--prompts", "2", "--speed-prompts", "1",
                          "--max-new-tokens", "1", "--json"]) == 0
    captured = capsys.readouterr()
    out, result = captured.err.splitlines(), json.loads(captured.out)            # --json: stdout holds it alone
    entry = result["drafts"]["component"]
    assert result["divergence_texts"] == 0 and entry["tvd"] is None and entry["kl"] is None
    assert entry["k"]["2"]["predicted_speedup"] is None and entry["k"]["2"]["break_even_context"] is None
    assert any(line.startswith("component   TVD -, top-1 agreement -, KL -") for line in out)
    header = next(i for i, line in enumerate(out) if line.startswith("draft        k   multi"))
    rows = [line for line in out[header + 1:] if line.startswith("component") and "TVD" not in line]
    columns = [out[header].index(name) + len(name) - 1 for name in ("multi", "acc/rnd", "predicted", "measured")]
    for row in rows:           # "-" stands where a number would, right-aligned in its column (nothing was drafted,
        assert [row[i] for i in columns] == ["-", "-", "-", "-"], (out[header], row)      # so no speedup measured)
        assert row.endswith("never"), row
    assert entry["k"]["2"]["measured_speedup"] is None
    note = [line for line in out if line.startswith("note: the multi-round runs make 1 new tokens each")]
    assert len(note) == 1 and "their acceptance and measured speedups say little" in note[0], out
    assert hsd_eval.break_even_words(0) == "any" and hsd_eval.break_even_words(None) == "never"


EVAL_ARGS = ["--model", "tiny-falcon-h1", "--prompts", "3", "--speed-prompts", "1", "--max-new-tokens", "4"]


def eval_numbers(result):
    """What an interrupted and resumed run must repeat exactly: everything but timings."""
    return {draft: {"tvd": entry["tvd"], "kl": entry["kl"], "top1": entry["top1_agreement"],
                    "perplexity": entry["perplexity"],
                    "k": {k: {key: x for key, x in row.items() if key.startswith(("alpha", "ci", "histogram"))}
                          for k, row in entry["k"].items()}}
            for draft, entry in result["drafts"].items()} | {"perplexity_full": result["perplexity_full"]}


@pytest.fixture(scope="module")
def whole_run(tmp_path_factory):
    """One uninterrupted run of EVAL_ARGS with --out, --json and --plot, for the tests that read it (speed: one run
    of ~5 s, not two) -> (stdout, stderr, the --out file, the plot)."""
    folder = tmp_path_factory.mktemp("eval")
    out, err = io.StringIO(), io.StringIO()
    with pytest.MonkeyPatch.context() as patch, contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        patch.setattr(cost_model, "busy_cores", lambda *args, **kwargs: 0.0)    # what conftest's an_idle_machine and
        patch.setattr(os, "getloadavg", lambda: (0.0, 0.0, 0.0))               # one_timed_turn do, as a module's
        patch.setattr(hsd_eval, "step_times", functools.partial(hsd_eval.step_times, repeats=1))    # fixture runs first
        code = hsd_eval.main([*EVAL_ARGS, "--out", str(folder / "whole.jsonl"), "--json", "--plot",
                              str(folder / "alpha.svg")])
    assert code == 0, err.getvalue()[-2000:]
    return out.getvalue(), err.getvalue(), folder / "whole.jsonl", folder / "alpha.svg"


def test_eval_interrupted_and_resumed_equals_an_uninterrupted_run(tmp_path, capsys, ctrl_c, whole_run):
    """Ctrl-C (a real SIGINT to a real run) in the middle of the prompts: one line saying where the results are; the
    same command resumes, and its numbers are an uninterrupted run's. The interrupted run starts from a file holding
    an uninterrupted run's step times alone (a run resumed after its step times: they are not measured again)."""
    out, progress = tmp_path / "run.jsonl", tmp_path / "stderr.txt"
    uninterrupted, whole = json.loads(whole_run[0]), whole_run[2]
    lines = whole.read_text().splitlines(keepends=True)
    out.write_text("".join(line for line in lines if "header" in json.loads(line) or '"phase": "costs"' in line))
    with open(progress, "w") as err:                  # a file, not a pipe: the progress bars would fill a pipe
        code = ctrl_c.code + "import runpy; runpy.run_path('hsd_eval.py', run_name='__main__')"
        run = subprocess.Popen([sys.executable, "-c", code, *EVAL_ARGS, "--out", str(out), "--json"], text=True,
                               stdout=subprocess.PIPE, stderr=err, cwd=HERE)
        while run.poll() is None and out.read_text().count('"phase": "alpha"') < 1:
            time.sleep(0.05)
        signals = ctrl_c.signals(run.pid)
        run.send_signal(signal.SIGINT)
        stdout, _ = run.communicate()
    stderr = progress.read_text()
    assert run.returncode == 130 and stdout == "", (signals, stderr)
    message = [line for line in stderr.splitlines() if line.startswith("hsd_eval:") and "estimate" not in line
               and "warning" not in line]                      # a busy machine is said so
    assert message == [message[0]] and "run the same command again to resume" in message[0] and "alpha " in message[0]
    saved = out.read_text().count('"phase": "alpha"')
    assert 1 <= saved < 3                                                   # interrupted in the middle of the prompts
    assert hsd_eval.main([*EVAL_ARGS, "--out", str(out), "--json"]) == 0
    resumed = json.loads(capsys.readouterr().out)
    assert eval_numbers(resumed) == eval_numbers(uninterrupted)
    assert resumed["drafts"]["component"]["k"]["2"]["alpha_sampled_shared"] is not None


def test_each_toy_stands_beside_the_paper_numbers_of_its_family():
    assert [hsd_eval.paper_model(name) for name in models.TOYS] == ["falcon-h1-0.5b", "qwen3.5-0.8b", "qwen2.5-0.5b"]
    assert hsd_eval.paper_model("falcon-h1-3b") == "falcon-h1-3b" and hsd_eval.paper_model("tiny-falcon-h1") is None


def test_eval_runs_offline_and_the_json_carries_the_table(whole_run):
    stdout, stderr, _, plot = whole_run
    err = stderr.splitlines()                                 # --json: the table on stderr, stdout the JSON alone
    lines = err[next(i for i, x in enumerate(err) if x.startswith("tiny-falcon-h1: ")):]
    result = json.loads(stdout)
    leaves = []
    def walk(x):
        if isinstance(x, dict):
            leaves.extend(float(key) for key in x if key.isdigit())
            [walk(value) for value in x.values()]
        elif isinstance(x, (list, tuple)):
            [walk(value) for value in x]
        elif isinstance(x, (int, float)) and not isinstance(x, bool):
            leaves.append(float(x))
    walk(result)
    table = [line for line in lines if not line.startswith(("draft ", "note: "))]   # all but titles and the note
    printed = [found for line in table for found in re.findall(r"(?<![\w.-])\d+(?:\.\d+)?", line)]
    assert len(printed) > 50
    for number in printed:
        decimals = len(number.split(".")[1]) if "." in number else 0
        assert any(round(leaf, decimals) == float(number) for leaf in leaves), number
    assert set(result["drafts"]) == {"component", "layerskip", "early-exit"}
    assert 0 <= result["drafts"]["component"]["k"]["2"]["alpha_shared"] <= 1
    assert "hsd_eval: estimate" in stderr and "%|" in stderr                 # the estimate, progress: on stderr
    assert "; the speed phase as if no draft were accepted: at most)" in stderr    # no paper numbers for tiny
    assert plot.read_text().startswith("<svg")


def test_plot_is_well_formed_and_carries_its_numbers():
    r = {"temperature": 0.6, "prompts": 2, "paper": cost_model.PAPER["falcon-h1-0.5b"], "drafts": {}}
    for draft in ("component", "layerskip"):
        r["drafts"][draft] = {"k": {k: {f"{x}_{variant}": (0.125 * j if x == "alpha" else (0.0625 * j, 0.25 * j))
                                        for x in ("alpha", "ci") for j, variant in enumerate(
                                            ["shared", "independent", "sampled_shared", "sampled_independent"], 1)}
                                    for k in (2, 4, 8)}}
    svg = hsd_eval.plot_svg("falcon-h1-0.5b", r)
    root = ElementTree.fromstring(svg)                                              # well-formed XML
    assert root.tag == "{http://www.w3.org/2000/svg}svg"
    titles = [t.text for t in root.iter("{http://www.w3.org/2000/svg}title")]
    assert "component, k=4, greedy, independent state: 0.250 [0.125, 0.500]" in titles
    assert "layerskip, k=8, sampled, independent state: 0.500 [0.250, 1.000]" in titles
    assert "component, k=2, paper, greedy: 0.680 [0.620, 0.740]" in titles
    assert "component, k=8, paper, T=0.6: 0.224 [0.190, 0.259]" in titles
    assert len(titles) == 2 * 3 * 4 + 3 + 3                                          # the paper has the component only
    circles = [circle for circle in root.iter("{http://www.w3.org/2000/svg}circle") if circle.get("cx")]
    heights = {float(circle.get("cy")) for circle in circles}
    assert len(heights) > 5                                      # the points stand at different heights (their values)


def test_eval_without_wikitext_names_text(tmp_path, capsys):
    cfg = {**QWEN2_TINY_JSON, "vocab_size": 97, "max_position_embeddings": 1024}    # step times at 512 tokens, not 8192
    save_checkpoint(models.init_random(models.Model(models.config_from_hf(cfg))), tmp_path, cfg)
    models.char_tokenizer().save(str(tmp_path / "tokenizer.json"))
    result = run_cli("--model", str(tmp_path), env={"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")},
                     script="hsd_eval.py")
    assert result.returncode == 2 and "WikiText-2" in result.stderr and "--text FILE" in result.stderr
    text = tmp_path / "text.txt"
    text.write_text("\n".join(cost_model.TINY_TEXT))
    assert hsd_eval.main(["--model", str(tmp_path), "--text", str(text), "--prompts", "1", "--speed-prompts", "1",
                          "--max-new-tokens", "3"]) == 0
    out = capsys.readouterr().out
    assert "layerskip" in out and "component" not in out


def svg_texts(svg):
    root = ElementTree.fromstring(svg)
    return [t.text for t in root.iter("{http://www.w3.org/2000/svg}text")]


def test_plot_legend_lists_only_what_is_drawn_and_labels_its_axes():
    r = {"temperature": 0.6, "prompts": 2, "paper": {}, "drafts": {"component": {"k": {
        k: {f"{x}_{variant}": (0.5 if x == "alpha" else (0.25, 0.75)) for x in ("alpha", "ci")
            for variant in ("shared", "independent", "sampled_shared", "sampled_independent")} for k in (2, 4, 8)}}}}
    texts = svg_texts(hsd_eval.plot_svg("tiny-falcon-h1", r))
    assert "paper, greedy" not in texts and "paper, T=0.6" not in texts and "greedy, shared state" in texts
    assert "acceptance (accepted / k)" in texts and "drafts per round" in texts
    r["paper"] = cost_model.PAPER["falcon-h1-0.5b"]
    assert "paper, greedy" in svg_texts(hsd_eval.plot_svg("falcon-h1-0.5b", r))


@pytest.mark.parametrize("args, message", [
    (["--model", "tiny-falcon-h1", "--prompts", "0"], "no prompts"),
    (["--model", "tiny-falcon-h1", "--temperature", "0"], "needs a --temperature above 0"),
    (["--model", "tiny-falcon-h1", "--temperature", "nan"], "needs a --temperature above 0"),
    (["--model", "tiny-falcon-h1", "--text", "/no/such/file.txt"], "cannot read --text /no/such/file.txt: No such file"),
    (["--model", "tiny-falcon-h1", "--trace"], "unrecognized arguments: --trace"),
    (["--model", "no-such-model"], "unknown model"),
    (["--model", "tiny-falcon-h1", "--recall", "--plot", "a.svg"], "--recall measures the paper's drafts"),
    (["--model", "tiny-falcon-h1", "--recall", "--prompts", "0"], "--recall needs --prompts >= 1"),
    (["--model", "tiny-falcon-h1", "--recall", "--prompts", "9"], "not the 9 the copying probe needs"),
])
def test_eval_user_errors_are_one_line(args, message, capsys):
    assert main_status(hsd_eval.main, args) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert "pass --text" not in err                              # the user did pass one, or did not need to


TOY_QWEN25_SKIPS = {"layerskip": models.Skip(layers=frozenset({3, 4})),            # 8 layers: 2 from 3
                    "early-exit": models.Skip(layers=frozenset({4, 5, 6, 7}))}


def test_nll_gives_the_toys_recorded_heldout_loss():
    """hsd_eval.nll, the summed negative log-likelihood a perplexity divides, on the trained Transformer toy: the held-
    out loss of the full model and of two drafts, as the toy's training log recorded them (bits per character over the
    first 4 of its 32 held-out windows of 512 characters, every position but the first predicted), and the perplexity
    ratio full -> draft."""
    model, recorded = models.load("toy-qwen2.5"), training_log("toy-qwen2.5")["heldout"]["first_4_windows"]
    windows = hsd_train.heldout_windows()[:hsd_train.FIRST_WINDOWS]
    positions = windows.shape[0] * (windows.shape[1] - 1)

    def bits_per_char(skip):
        with torch.inference_mode():
            return sum(hsd_eval.nll(model, w[None], skip, chunk=100) for w in windows) / positions / math.log(2)
    bits = {"full": bits_per_char(None)}
    teach(bits["full"] > recorded["full"] / 50, f"nll gives {bits['full']:.5f} bits per character, the training log "
                                                f"{recorded['full']:.4f}: nll returns the mean; it must be the sum over "
                                                "the T-1 predicted tokens (a perplexity divides by their number)")
    teach(math.isclose(bits["full"], recorded["full"], rel_tol=1e-4),
          f"nll over the held-out windows gives {bits['full']:.4f} bits per character, the toy's training log recorded "
          f"{recorded['full']:.4f}: the logits at position t predict token t+1 (the first token has no prediction), "
          "and nll sums -log p in nats")
    for draft, skip in TOY_QWEN25_SKIPS.items():
        bits[draft] = bits_per_char(skip)
        teach(not math.isclose(bits[draft], bits["full"], rel_tol=1e-6), f"the {draft} draft's loss equals the full "
                                                                          "model's: pass the skip to the model")
        teach(math.isclose(bits[draft], recorded[draft], rel_tol=1e-4), f"the {draft} draft gives {bits[draft]:.4f} "
                                                                        f"bits per character, recorded {recorded[draft]:.4f}")
        ratio = 2 ** (bits[draft] - bits["full"])
        assert ratio > 1.0, f"perplexity full -> {draft}: {ratio:.2f}x (a draft leaves something out)"


# --- The paper's question asked on recall (--recall) -------------------------------------------------------------
def test_recall_drafts_add_the_attention_only_draft_to_the_sequential_hybrid():
    """Qwen3.5's attention-only draft leaves out the attention of its full-attention layers (3 and 7), nothing else;
    the other families measure the paper's drafts."""
    qwen35 = hsd_eval.recall_skips(models.TINY["tiny-qwen3.5"])
    assert qwen35 == {**TINY_SKIPS["tiny-qwen3.5"], "attention-only": models.Skip(attention={3, 7})}
    assert hsd_eval.recall_skips(models.TINY["tiny-falcon-h1"]) == TINY_SKIPS["tiny-falcon-h1"]
    assert set(hsd_eval.recall_skips(models.TINY["tiny-qwen2.5"])) == {"layerskip", "early-exit"}


def test_continuation_record_is_the_continuations_loss_and_what_greedy_decoding_copies():
    """nll: the summed cross-entropy of the continuation's tokens after the prompt; matched: greedy decoding's own
    5 tokens and then another are matched for 5 by the full model."""
    model, skip = tiny("tiny-qwen3.5"), TINY_SKIPS["tiny-qwen3.5"]["component"]
    prompt = models.char_tokenizer().encode("The cat sat on the mat. The cat").ids
    greedy, _ = hsd.generate(model, prompt, 6, draft="none")
    rest = greedy[:5] + [(greedy[5] + 1) % 95]
    with torch.inference_mode():
        record = hsd_eval.continuation_record(model, prompt, rest, {"component": skip})
    assert record["full"]["matched"] == 5
    for draft, s in (("full", None), ("component", skip)):
        logits = model(torch.tensor([prompt + rest]), skip=s)[0, len(prompt) - 1:-1]
        ce = torch.nn.functional.cross_entropy(logits.double(), torch.tensor(rest), reduction="sum").item()
        assert math.isclose(record[draft]["nll"], ce, rel_tol=1e-9)
        wrong = (logits.argmax(-1) != torch.tensor(rest)).tolist()
        assert record[draft]["matched"] == (wrong.index(True) if True in wrong else len(rest))


def test_recall_runs_offline_and_its_table_and_json_agree(capsys, tmp_path):
    """--recall on the tiny Qwen3.5: every draft and the full model on both texts; bits per character of the copy
    prompts' continuations as computed directly; every number printed is in the JSON; its results file is its own."""
    out = tmp_path / "recall.jsonl"
    assert hsd_eval.main(["--model", "tiny-qwen3.5", "--recall", "--prompts", "2", "--out", str(out), "--json"]) == 0
    captured = capsys.readouterr()                        # --json: stdout holds the JSON alone, the table is stderr's
    result, lines = json.loads(captured.out), captured.err.splitlines()
    assert list(result["drafts"]) == ["full", "component", "layerskip", "early-exit", "attention-only"]
    assert result["prompts"] == result["copy_prompts"] == 2 and "k" not in result["drafts"]["full"]["copy"]
    model, tok = models.load("tiny-qwen3.5"), models.char_tokenizer()
    pairs = cost_model.copy_prompts(cost_model.TINY_TEXT, 2)
    nats = 0.0
    for prompt, rest in pairs:
        ids = torch.tensor([tok.encode(prompt + rest).ids])
        with torch.inference_mode():
            logits = model(ids, skip=models.Skip(attention={3, 7}))[0, len(prompt) - 1:-1]
        nats += torch.nn.functional.cross_entropy(logits.double(), ids[0, len(prompt):], reduction="sum").item()
    copy = result["drafts"]["attention-only"]["copy"]
    assert math.isclose(copy["bits_per_char"], nats / math.log(2) / sum(len(rest) for _, rest in pairs), rel_tol=1e-6)
    assert set(copy["k"]) == {"2", "4", "8"} and 0 <= copy["k"]["8"]["alpha_sampled_shared"] <= 1
    leaves = [round(x, 3) for entry in result["drafts"].values() for text in entry.values()
              for x in [text["bits_per_char"], text.get("copied", 0)]] + [
        round(row[key][i], 2) if key.startswith("ci") else round(row[key], 2) for entry in result["drafts"].values()
        for text in entry.values() for row in text.get("k", {}).values() for key in ("alpha_shared", "ci_shared",
        "alpha_sampled_shared", "ci_sampled_shared") for i in (0, 1)]
    table = [line for line in lines if line.startswith(tuple(result["drafts"]))]
    assert len(table) == 10
    for number in (n for line in table for n in re.findall(r"(?<![\w.-])\d+\.\d+", line)):
        assert float(number) in leaves, number
    assert hsd_eval.main(["--model", "tiny-qwen3.5", "--prompts", "2", "--out", str(out)]) == 2    # not a recall run
    assert "recall True there, None now" in capsys.readouterr().err


def test_eval_measures_drafts_from_the_text_beside_the_papers(capsys):
    """--draft lookup and --draft lookup+component: per k the single round's acceptance (a round that proposed nothing
    accepts none) and how often the text proposed anything, the multi-round runs, the lookup's prediction with c = 0
    and none for the cascade (one c does not describe it); the paper's drafts as before; in the table by name."""
    assert hsd_eval.main([*EVAL_ARGS, "--draft", "lookup", "--draft", "lookup+component", "--json"]) == 0
    captured = capsys.readouterr()                        # --json: stdout holds the JSON alone, the table is stderr's
    result, lines = json.loads(captured.out), captured.err.splitlines()
    assert set(result["drafts"]) == {"component", "layerskip", "early-exit"} and not result["draft_files"]
    lookup, cascade = result["text_drafts"]["lookup"], result["text_drafts"]["lookup+component"]
    assert lookup["c"] == 0.0 and cascade["c"] is None
    for entry in (lookup, cascade):
        assert list(entry["k"]) == ["2", "4", "8"] and entry["found"]["measured_speedup"] > 0
        for row in entry["k"].values():
            assert 0 <= row["alpha_shared"] <= 1 and 0 <= row["alpha_sampled_shared"] <= 1
            assert 0 <= row["proposed_shared"] <= 1
            assert row["ci_shared"][0] <= row["alpha_shared"] <= row["ci_shared"][1]
            assert row["measured_speedup"] > 0
    assert all(row["predicted_speedup"] is None for row in cascade["k"].values())
    assert any(row["predicted_speedup"] is not None for row in lookup["k"].values()) or all(
        row["accepted_per_round"] is None for row in lookup["k"].values())        # no round: nothing to predict
    assert any(line.startswith("lookup (a draft from the text") for line in lines)
    assert any(line.startswith("lookup+component at its own k=") for line in lines)


def test_a_draft_from_the_text_has_a_single_round_of_its_own():
    """The single-round protocol for the lookup: the first step after the prompt; on a prompt whose last tokens
    occurred before the lookup proposes what followed them, on one that repeats nothing it proposes nothing and the
    step is a plain step: (0, 0)."""
    model = models.load("tiny-falcon-h1")
    chosen = hsd.choose_draft(model, "lookup")
    assert hsd_eval.text_round(model, list(range(1, 12)), chosen) == (0, 0)
    drafted, accepted = hsd_eval.text_round(model, [5, 6, 7, 8, 9, 10, 5, 6, 7], chosen)
    assert drafted == 6 and 0 <= accepted <= drafted              # 8, 9, 10, 5, 6, 7 followed 5, 6, 7: up to the end

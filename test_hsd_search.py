"""Tests of hsd_search: the estimate and its replay against real generation, the search's moves, ConfLayers' selection,
and the command line on a tiny model (costs fixed, so that its choices repeat)."""
import json
import os

import pytest
import torch

import hsd
import hsd_search
import models

HERE = os.path.dirname(os.path.abspath(__file__))
TEXT = os.path.join(HERE, "toys", "text", "heldout.txt")


def tiny_texts(name, count=3, confirm=2):
    model, tokenizer = models.load(name), models.load_tokenizer(name)
    with open(TEXT, encoding="utf-8") as f:
        lines = f.read().splitlines()
    return model, hsd_search.calibration_texts(lines, tokenizer, 0, 24, 24, count, confirm)


def test_the_calibration_never_sees_the_confirmation_prompts():
    """The confirmation prompts are the text's last long paragraphs; the calibration is drawn from the others, and the
    seed draws other ones."""
    _, texts = tiny_texts("tiny-falcon-h1", count=4, confirm=3)
    _, again = tiny_texts("tiny-falcon-h1", count=4, confirm=3)
    assert texts == again and len(texts.prompts) == len(texts.paragraphs) == 4 and len(texts.confirm) == 3
    seen = {tuple(p) for p in texts.prompts} | {tuple(p[:24]) for p in texts.paragraphs}
    assert not seen & {tuple(p) for p in texts.confirm}
    tokenizer = models.load_tokenizer("tiny-falcon-h1")
    with open(TEXT, encoding="utf-8") as f:
        other = hsd_search.calibration_texts(f.read().splitlines(), tokenizer, 1, 24, 24, 4, 3)
    assert other.prompts != texts.prompts and other.confirm == texts.confirm


@pytest.mark.parametrize("k", [1, 3, "auto"])
@pytest.mark.parametrize("name", ["tiny-falcon-h1", "tiny-qwen3.5"])
def test_the_replay_runs_the_rounds_generate_runs(name, k):
    """For a draft whose teacher-forced estimate is exact (the early exit: its layers see what the full model's first
    layers see), replaying rounds over it gives the very rounds hsd.generate runs: as many rounds, drafts and accepted
    drafts, and the same tokens."""
    model = models.load(name, torch.float64)
    prompt, new = [40, 41, 42, 43, 44, 45, 46, 47], 40
    skip = hsd.draft_skip(model.config, "early-exit")
    tokens, stats = hsd.generate(model, prompt, new, draft=hsd.Draft("early-exit", skip, k, None), eos_token_id=-1)
    batch = torch.tensor([prompt + tokens])
    choices = hsd_search.full_choices(model, batch, len(prompt))
    assert choices[0].tolist() == tokens                               # the full model's own continuation
    estimates = hsd_search.estimate(model, batch, choices, skip, len(prompt))
    replay = hsd_search.replay(estimates, k, None, 0.5, {d: 1.2 for d in range(1, 17)})
    assert (replay.tokens, replay.rounds, replay.drafted, replay.accepted) == (
        new, stats["rounds"], stats["drafted"], stats["accepted"])
    assert replay.cost == pytest.approx(stats["plain_steps"] + sum(0.5 * len(r.drafts) + 1.2 for r in stats["trace"]))


def test_the_replay_stops_and_costs_as_the_cost_model_says():
    """A hand-made estimate of 8 positions: runs of agreement and the draft's confidence. As generate does, a round
    drafts at most k and never past the last token but one; the stop ends a round after an unsure draft, except past
    the first wrong draft, where a round is taken to draft on; a round costs d c + v[d]."""
    e = hsd_search.Estimate(runs=[3, 2, 1, 0, 0, 2, 1, 0], sure=[0.9, 0.9, 0.3, 0.9, 0.9, 0.9, 0.9, 0.9])
    v = {d: 1.0 + d / 10 for d in range(1, 17)}
    r = hsd_search.replay([e], 4, None, 0.5, v)
    # rounds at 0 (4 drafted, 3 kept, then the full model's: 4 tokens), 4 (at most 3: 3 drafted, none kept), 5 (2 of 2)
    assert (r.rounds, r.drafted, r.accepted, r.tokens) == (3, 4 + 3 + 2, 3 + 0 + 2, 8)
    stopped = hsd_search.replay([e], 4, 0.5, 0.5, v)
    # position 2 is unsure: the first round ends after 3 drafts (all kept); at 4 the first draft is wrong and sure, the
    # next ones unknown: drafted on to 3; then 5 as before
    assert (stopped.drafted, stopped.accepted) == (3 + 3 + 2, 3 + 0 + 2)
    assert stopped.cost == pytest.approx(3 * 0.5 + v[3] + 3 * 0.5 + v[3] + 2 * 0.5 + v[2])
    auto = hsd_search.replay([hsd_search.Estimate([0] * 12, [0.9] * 12)], "auto", None, 0.5, v)
    assert (auto.rounds, auto.tokens, auto.cost) == (2, 12, pytest.approx(10 + 2 * (0.5 + v[1])))  # a pause of 8


def test_a_unit_added_or_taken_back():
    config = models.TINY["tiny-qwen3.5"]
    skip = hsd_search.with_unit(models.Skip(), ("attention", 3), config)
    assert skip == models.Skip(attention={3})
    assert hsd_search.with_unit(skip, ("mlp", 3), config) == models.Skip(layers={3})   # all its units: the layer
    assert hsd_search.toggled(skip, ("attention", 3), config) == models.Skip()
    assert hsd_search.with_unit(models.Skip(mlp={2}), ("layers", 2), config) == models.Skip(layers={2})
    units = hsd_search.search_units(config)
    assert ("attention", 0) not in units and ("recurrent", 3) not in units and len(units) == 8 + 8 * 2


def test_conflayers_skips_a_layer_below_its_neighbours():
    """ConfLayers' rule on hand-made confidences: flat ones skip nothing; a layer far below the others is skipped;
    a larger lambda asks for a deeper dip."""
    flat = {i: 1.0 for i in range(1, 7)}
    assert hsd_search.conflayers_selection(flat, 0.0, 8, qwen=False) == []
    dip = {**flat, 4: 0.2}
    assert hsd_search.conflayers_selection(dip, 0.0, 8, qwen=False) == [4]
    dips = {1: 1.0, 2: 0.8, 3: 1.1, 4: 0.55, 5: 0.95, 6: 1.05}
    assert hsd_search.conflayers_selection(dips, 0.0, 8, qwen=False) == [2, 4]
    assert hsd_search.conflayers_selection(dips, 5.0, 8, qwen=False) == []


def test_layer_confidences_leave_the_cache_as_it_was():
    model = models.load("tiny-falcon-h1")
    cache = models.Cache(model, 40)
    hsd.prefill(model, cache, list(range(30, 40)))
    snap = hsd.snapshot(cache)
    confidences = hsd_search.layer_confidences(model, cache, list(range(50, 60)))
    assert sorted(confidences) == [1, 2, 3, 4] and all(0 < c < 2 for c in confidences.values())
    assert cache.length == snap.length and all(s.ssm is k.ssm for s, k in zip(cache.layers, snap.layers))


FIXED_COSTS = {"step": 0.01, "v": {d: 1.2 + 0.02 * d for d in range(1, 26)}}


@pytest.fixture
def fixed_costs(monkeypatch):
    """Costs that do not depend on this machine's mood: each unit saves what its share of a layer would."""
    def measure_costs(model, context, repeats):
        saves = {kind: 0.6 / model.config.num_layers / (1 if kind[0] == "layers" else 3)
                 for kind in hsd_search.unit_kinds(model.config)}
        return hsd_search.Costs(FIXED_COSTS["step"], saves, FIXED_COSTS["v"], context)
    monkeypatch.setattr(hsd_search, "measure_costs", measure_costs)
    monkeypatch.setattr(hsd_search, "measured_cost", lambda model, skip, context, repeats: 0.5)


SMALL = ["--text", TEXT, "--prompts", "2", "--confirm-prompts", "2", "--prompt-tokens", "16", "--new-tokens", "16",
         "--repeats", "1"]


def test_the_search_writes_a_draft_file_hsd_reads(tmp_path, fixed_costs, capsys):
    """A search on a tiny model writes a draft file that hsd.py reads and decodes with losslessly; the same seed gives
    the same draft; the file records how it was found."""
    out = tmp_path / "draft.json"
    assert hsd_search.main(["--model", "tiny-falcon-h1", *SMALL, "--out", str(out), "--json"]) == 0
    spec = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert json.loads(out.read_text()) == spec and spec["format"] == hsd.DRAFT_FORMAT
    found = spec["found_by"]
    assert found["method"] == "search" and found["candidates_tried"] > 10 and found["seed"] == 0
    assert {"predicted_speedup", "measured", "estimate", "paper_drafts", "c", "costs", "calibration"} <= set(found)
    model = models.load("tiny-falcon-h1")
    draft, warned = hsd.read_draft_file(str(out), model)
    assert warned == [] and draft.k == spec["k"]
    tokens, _ = hsd.generate(model, [40, 41, 42], 12, draft=str(out), eos_token_id=-1)
    assert tokens == hsd.generate(model, [40, 41, 42], 12, draft="none", eos_token_id=-1)[0]
    assert hsd_search.main(["--model", "tiny-falcon-h1", *SMALL, "--json"]) == 0
    again = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (again["skip"], again["k"], again["stop"]) == (spec["skip"], spec["k"], spec["stop"])


def test_ctrl_c_writes_the_best_draft_so_far(tmp_path, fixed_costs, monkeypatch, capsys):
    real, calls = hsd_search.evaluate, []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) > 12:
            raise KeyboardInterrupt
        return real(*args, **kwargs)
    monkeypatch.setattr(hsd_search, "evaluate", interrupted)
    out = tmp_path / "draft.json"
    assert hsd_search.main(["--model", "tiny-falcon-h1", *SMALL, "--out", str(out)]) == 130
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith(f"hsd_search: interrupted: wrote the best draft found so far to {out}") and "not confirmed" in err
    spec = json.loads(out.read_text())
    assert spec["found_by"]["interrupted"] and hsd.read_draft_file(str(out), models.load("tiny-falcon-h1"))[1] == []


@pytest.mark.parametrize("args, message", [
    (["--out", "/proc/x.json"], "cannot write --out /proc/x.json"),
    (["--out", "."], "cannot write --out .: it is a folder"),
    (["--prompts", "0"], "must be at least 1"),
    (["--prompts", "900"], "the search needs"),
])
def test_search_errors_are_one_line_before_anything_is_measured(args, message, capsys, monkeypatch):
    monkeypatch.setattr(hsd_search, "measure_costs", lambda *a: pytest.fail("measured before the error"))
    try:
        status = hsd_search.main(["--model", "tiny-falcon-h1", *SMALL, *args])
    except SystemExit as e:
        status = e.code
    err = capsys.readouterr().err
    assert status == 2 and message in err and err.count("\n") == 1, err

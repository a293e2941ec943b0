"""Tests of hsd_search: the estimates and their replay against real generation, the split, the search's moves and
progress, the warnings, and the command line on a tiny model (costs fixed, so that its choices repeat); ConfLayers'
rule has test_conflayers.py."""
import argparse
import itertools
import json
import math
import os

import pytest
import torch

import conflayers
import cost_model
import drafts
import hsd
import hsd_search
import models

HERE = os.path.dirname(os.path.abspath(__file__))
TEXT = os.path.join(HERE, "toys", "text", "heldout.txt")
V = {d: 1.0 + d / 10 for d in range(1, 26)}
R = 0.2                                                  # a round's own work, once a round


def test_calibration_and_test_paragraphs_are_disjoint_and_named_by_index():
    """From cost_model's split, by paragraph index: calibration prompts and followed paragraphs are drawn from its
    calibration side, the confirmation's prompts spread over its test side; another seed draws other calibration
    paragraphs, never the test's."""
    split = cost_model.Split(test=[100, 200, 300, 400, 500, 600], calibration=list(range(3, 60, 2)))
    drawn = hsd_search.draw(split, 0, 5, 3)
    assert drawn == hsd_search.draw(split, 0, 5, 3) and drawn.test == [100, 300, 500]
    assert len(drawn.calibration) == len(drawn.followed) == len(drawn.held) == 5
    assert not set(drawn.calibration) & set(drawn.followed) and not set(drawn.held) & (set(drawn.calibration) | set(
        drawn.followed))                                            # the prediction's prompts chose nothing
    assert set(drawn.calibration) | set(drawn.followed) | set(drawn.held) <= set(split.calibration)
    other = hsd_search.draw(split, 1, 5, 3)
    assert other.calibration != drawn.calibration and other.test == drawn.test
    with pytest.raises(models.UsageError, match="the search needs 90"):
        hsd_search.draw(split, 0, 30, 3)


def greedy_row(model, prompt, new):
    tokens, _ = hsd.generate(model, prompt, new, draft="none", eos_token_id=-1)
    return torch.tensor([prompt + tokens])


@pytest.mark.parametrize("draft, k, stop", [("component", 3, None), ("layerskip", 4, 0.6), ("layerskip", "auto", None),
                                            ("early-exit", 4, 0.6)])
@pytest.mark.parametrize("name", ["tiny-falcon-h1", "tiny-qwen3.5"])
def test_the_generation_estimate_replays_the_rounds_generate_runs(name, draft, k, stop):
    """Drafting from the full model's state, the replay over the estimate is the very run hsd.generate makes on the
    same continuation, for any draft, k and stop: as many rounds, drafts and accepted drafts, and the same cost."""
    if name == "tiny-qwen3.5" and draft == "component":
        draft = "early-exit"
    model = models.load(name, torch.float64)
    prompt, new = [40, 41, 42, 43, 44, 45, 46, 47], 24
    skip = hsd.draft_skip(model.config, draft)
    rows = greedy_row(model, prompt, new)
    _, stats = hsd.generate(model, prompt, new, draft=hsd.Draft(draft, skip, k, stop), eos_token_id=-1,
                            costs=(0.5, V, R))                # -k auto pauses by these costs, as the replay does
    longest = hsd.AUTO_MAX if k == "auto" else k
    estimates = hsd_search.generation_estimates(model, rows, skip, len(prompt), longest, eos=-1)
    r = hsd_search.replay(estimates, k, stop, 0.5, V, R)
    assert (r.tokens, r.rounds, r.drafted, r.accepted) == (new, stats["rounds"], stats["drafted"], stats["accepted"])
    assert r.cost == pytest.approx(stats["plain_steps"] + sum(0.5 * len(t.drafts) + V[len(t.drafts)] + R
                                                              for t in stats["trace"]))


def test_a_draft_that_skips_nothing_accepts_everything_greedy_and_sampled():
    model = models.load("tiny-falcon-h1", torch.float64)
    rows = greedy_row(model, [40, 41, 42, 43], 12)
    for temperature in (0.0, 0.6):
        estimates = hsd_search.generation_estimates(model, rows, models.Skip(), 4, 5, temperature, eos=-1)
        assert all(a == pytest.approx(1.0) for e in estimates for accept in e.accept for a in accept)
        r = hsd_search.replay(estimates, 3, None, 0.5, V, R)
        assert r.accepted == pytest.approx(r.drafted) and r.drafted > 0


def test_the_sampled_estimate_is_one_minus_the_total_variation():
    """At a temperature, a round's first draft is accepted with probability 1 - TV(p_T, q_T), p the full model's
    distribution and q the draft's, both from the full model's state."""
    model = models.load("tiny-qwen3.5", torch.float64)
    rows = greedy_row(model, [40, 41, 42, 43, 44], 4)
    skip = hsd.draft_skip(model.config, "early-exit")
    e = hsd_search.generation_estimates(model, rows, skip, 5, 2, 0.6, eos=-1)[0]
    cache = models.Cache(model, 20)
    hsd.prefill(model, cache, rows[0, :6].tolist())              # the state before position 6
    q = hsd.probabilities(model(rows[:, 6:7], cache, skip=skip)[0, -1], 0.6)
    p = hsd.probabilities(model(rows[:, :7])[0, -1], 0.6)
    assert e.accept[2][0] == pytest.approx(1 - 0.5 * (p - q).abs().sum().item())
    assert 0 < e.accept[2][0] < 1


def test_the_cheap_estimate_is_exact_where_teacher_forcing_is():
    """For the early exit, the draft's own states are the full model's first layers': the teacher-forced pass agrees
    with drafting from the full model's state on every accepted draft; for other drafts it may not."""
    model = models.load("tiny-falcon-h1", torch.float64)
    rows = greedy_row(model, [40, 41, 42, 43, 44, 45], 24)
    skip = hsd.draft_skip(model.config, "early-exit")
    cheap = hsd_search.teacher_forced_estimates(model, rows, skip, 6, 8, eos=-1)[0]
    exact = hsd_search.generation_estimates(model, rows, skip, 6, 8, eos=-1)[0]
    for j in range(len(exact.accept)):
        assert hsd_search.expected_accepted(cheap.accept[j], 8) == hsd_search.expected_accepted(exact.accept[j], 8)


def test_the_replay_stops_and_costs_as_the_cost_model_says():
    """A hand-made estimate of 8 positions: as generate does, a round drafts at most k and never past the last token
    but one; the stop ends a round after an unsure draft; a round costs d c + v[d]."""
    def position(run, sure):
        return [1.0] * run + [0.0] * (4 - run), sure
    accept, sure = zip(*[position(3, [0.9, 0.9, 0.3, 0.9]), position(2, [0.9] * 4), position(1, [0.9] * 4),
                         position(0, [0.9, 0.9, 0.1, 0.9]), position(0, [0.9] * 4), position(2, [0.9] * 4),
                         position(1, [0.9] * 4), position(0, [0.9] * 4)])
    e = hsd_search.Estimate(list(accept), list(sure))
    r = hsd_search.replay([e], 4, None, 0.5, V, R)
    # rounds at 0 (4 drafted, 3 kept, then the full model's: 4 tokens), 4 (at most 3: 3 drafted, none kept), 5 (2 of 2)
    assert (r.rounds, r.drafted, r.accepted, r.tokens) == (3, 4 + 3 + 2, 3 + 0 + 2, 8)
    stopped = hsd_search.replay([e], 4, 0.5, 0.5, V, R)
    # position 0: its third draft is unsure, the round ends after it (3 drafted, 3 kept); then 4 (3 drafted), 5
    assert (stopped.drafted, stopped.accepted) == (3 + 3 + 2, 3 + 0 + 2)
    assert stopped.cost == pytest.approx(3 * 0.5 + V[3] + 3 * 0.5 + V[3] + 2 * 0.5 + V[2] + 3 * R)   # r: 3 rounds
    never = hsd_search.Estimate([[0.0] * 12 for _ in range(12)], [[0.9] * 12 for _ in range(12)])
    auto = hsd_search.replay([never], "auto", None, 0.5, V, R)
    # -k auto pauses after a round that cost more than it made (1 token for 0.5 + V[1] + R): 1 round, 11 plain steps
    assert (auto.rounds, auto.tokens, auto.cost) == (1, 12, pytest.approx(11 + 0.5 + V[1] + R))
    half = hsd_search.Estimate([[0.5] * 3 for _ in range(6)], [[0.9] * 3 for _ in range(6)])
    expected = hsd_search.replay([half], 2, None, 0.5, V, R)          # in expectation: 0.5 + 0.25 accepted a round
    assert expected.accepted / expected.rounds == pytest.approx(0.75)


def test_a_part_added_or_taken_back():
    config = models.TINY["tiny-qwen3.5"]
    skip = hsd_search.with_part(models.Skip(), ("attention", 3), config)
    assert skip == models.Skip(attention={3})
    assert hsd_search.with_part(skip, ("mlp", 3), config) == models.Skip(layers={3})   # all its units: the layer
    assert hsd_search.toggled(skip, ("attention", 3), config) == models.Skip()
    assert hsd_search.with_part(models.Skip(mlp={2}), ("layers", 2), config) == models.Skip(layers={2})
    parts = hsd_search.leavable(config)
    assert ("attention", 0) not in parts and ("recurrent", 3) not in parts and len(parts) == 8 + 8 * 2


def fixed_c(config, skip):
    """A cost that does not depend on this machine's mood: each part saves its share of a layer."""
    parts = sum(len(getattr(skip, u)) for u in models.UNITS) / 3 + len(skip.layers)
    return 1 - 0.6 * parts / config.num_layers


def test_the_search_progress_never_goes_back():
    """The search's progress: candidates ranked only grow, the bound only falls, and it ends at 100%."""
    model = models.load("tiny-qwen3.5")
    rows = greedy_row(model, [40, 41, 42, 43], 6)
    kinds = cost_model.part_kinds(model.config)
    savings = {kind: 0.6 / model.config.num_layers / (1 if kind[0] == "layers" else 3) for kind in kinds}
    s = hsd_search.Search(model, hsd_search.Calibration(rows, rows, 4), None, savings, V, R, 8, 0.0)
    seen, best = [], []
    ranked, winner = hsd_search.search(s, [], lambda done, total: seen.append((done, total)),
                                       lambda cand, tried: best.append(cand.speedup))
    assert len(seen) > 3 and seen[-1][0] == seen[-1][1]
    assert all(d1 <= d2 and t1 >= t2 and d1 / t1 <= d2 / t2 for (d1, t1), (d2, t2) in itertools.pairwise(seen)), seen
    assert best == sorted(best) and winner.speedup == best[-1] == max(
        cand.speedup for skip, cand in ranked.items() if skip != models.Skip())    # the full model is no draft
    assert hsd_search.search(s, [], lambda *a: None, lambda *a: None)[1] == winner     # the same draft again


def row(speedup, low, high, accepted=1.0):
    return {"speedup": speedup, "speedup_ci": (low, high), "accepted_per_round": accepted, "turn_speedups": [speedup]}


def costs_of(c, noise, longest=25, turns=7):
    return cost_model.Costs(0.01, c, [1.0, *(V[d] for d in range(1, longest + 1))], None, R, 64, 0.0, turns,
                            {"step": 0.0, "c": noise, "v": {}, "r": 0.0})


IDLE = {"busy_cores": 0.1, "cores": 2}


def test_the_warnings_say_when_a_draft_is_worse_or_its_prediction_fails():
    r = hsd_search.Replay(10, 8, 4, 8, 4)
    winner = hsd_search.Candidate(models.Skip(), 0.5, 2, None, 1.30, r)
    fine = {"found": row(1.25, 1.18, 1.32), "component": row(1.1, 1.0, 1.2)}
    ranked = {"separated": True, "said": "a predicts 1.300x, clear of the others"}
    assert hsd_search.warnings_of(winner, winner.speedup, ranked, fine, ["component"], IDLE, 0.5) == []
    slow = {"found": row(0.95, 0.9, 1.0), "component": row(1.1, 1.0, 1.2)}
    said = hsd_search.warnings_of(winner, winner.speedup, ranked, slow, ["component"], IDLE, 0.5)
    assert len(said) == 3 and "slower than no draft" in said[0] and "a paper draft is faster" in said[1]
    assert "does not hold" in said[2]
    held = hsd_search.warnings_of(winner, 1.0, ranked, slow, ["component"], IDLE, 0.5)   # held-out 1.0x
    assert len(held) == 2 and not any("does not hold" in line for line in held)    # the file's prediction is judged
    assert not hsd_search.contradicted(1.30, row(1.2, 1.0, 1.4))        # inside the interval
    assert not hsd_search.contradicted(1.30, row(1.25, 1.24, 1.26))     # outside, but within 10%
    close = {"separated": False, "said": "a, b predict 1.300x, 1.290x, within the costs' noise"}
    assert "too busy to rank" in hsd_search.warnings_of(winner, winner.speedup, close, fine, ["component"], IDLE, 0.5)[0]
    assert "the machine is busy" in hsd_search.warnings_of(winner, winner.speedup, ranked, fine, ["component"],
                                                           {"busy_cores": 1.5, "cores": 2}, 0.5)[0]
    assert "composed from its units 0.800" in hsd_search.warnings_of(winner, winner.speedup, ranked, fine,
                                                                     ["component"], IDLE, 0.8)[0]


def test_finalists_the_costs_cannot_tell_apart_are_measured_again_then_the_simplest_is_kept():
    """Two finalists within the costs' noise (10%) of each other: measured again at 2x the turns; where they then
    stand clear (noise 1%), the better is kept; where they stay close, after 2x and 4x the turns the one leaving out
    fewer units is kept, and the ranking says so. One clear of the other from the start is not measured again."""
    config = models.load("tiny-falcon-h1").config
    skips = {"a": models.Skip(layers={1, 2}), "b": models.Skip(attention={1})}        # b: fewer units left out
    assert hsd_search.units_left_out(config, skips["a"]) > hsd_search.units_left_out(config, skips["b"]) == 1
    r = hsd_search.Replay(10, 8, 4, 8, 4)
    refined = {"a": hsd_search.Candidate(skips["a"], 0.5, 2, None, 1.30, r),
               "b": hsd_search.Candidate(skips["b"], 0.5, 2, None, 1.25, r)}
    estimated = {label: [hsd_search.Estimate([[1.0, 1.0]] * 6, [[0.9, 0.9]] * 6)] for label in skips}
    args = argparse.Namespace(context=64, temperature=0.0, method="search")

    def measuring(noise, c):                                  # a measurement of the given noise and c of each label
        turns = []

        def measure(model, chosen, context, n, longest, temperature):
            turns.append(n)
            return costs_of({label: c[label] for label in chosen}, dict.fromkeys(chosen, noise), turns=n)
        return measure, turns
    first = costs_of({"a": 0.5, "b": 0.5}, {"a": 0.1, "b": 0.1})
    measure, turns = measuring(0.01, {"a": 0.3, "b": 0.6})                     # measured more, a is clearly faster
    kept, ranking = hsd_search.separate(args, None, config, ["a", "b"], refined, first, estimated, skips, {}, measure)
    assert (kept, ranking["separated"], turns) == ("a", True, [14])
    measure, turns = measuring(0.1, {"a": 0.5, "b": 0.5})                      # still within the noise
    kept, ranking = hsd_search.separate(args, None, config, ["a", "b"], refined, first, estimated, skips, {}, measure)
    assert (kept, ranking["separated"], turns, ranking["turns"]) == ("b", False, [14, 28], [7, 14, 28])
    assert "the simplest is kept, b" in ranking["said"] and ranking["still_close"] == ["a", "b"]
    clear = costs_of({"a": 0.5, "b": 0.5}, {"a": 0.01, "b": 0.01})
    measure, turns = measuring(0.1, {"a": 0.5, "b": 0.5})
    assert hsd_search.separate(args, None, config, ["a", "b"], refined, clear, estimated, skips, {}, measure)[0] == "a"
    assert turns == []


@pytest.fixture
def fixed_costs(monkeypatch):
    """Costs that do not depend on this machine's mood."""
    def measure_costs(model, skips, context, turns, longest, temperature):
        return cost_model.Costs(0.01, {label: fixed_c(model.config, skip) for label, skip in skips.items()},
                                [1.0, *(1.2 + 0.02 * d for d in range(1, longest + 1))], None, R, context,
                                temperature, turns, {"step": 0.0, "c": {label: 0.0 for label in skips}, "v": {},
                                                     "r": 0.0})
    monkeypatch.setattr(hsd_search, "measure_costs", measure_costs)
    monkeypatch.setattr(cost_model, "busy_warning", lambda state, ratios=(): None)
    monkeypatch.setattr(hsd_search, "REFINED", 3)                   # fewer finalists: the same steps, sooner


SMALL = ["--text", TEXT, "--prompts", "2", "--test-prompts", "1", "--prompt-tokens", "8", "--new-tokens", "8",
         "--repeats", "1"]


def test_the_search_writes_a_draft_file_hsd_reads(tmp_path, fixed_costs, capsys):
    """A search on a tiny model writes a draft file that hsd.py reads and decodes with losslessly; the same seed gives
    the same draft; the file records how it was found: its costs where -k auto reads them, its predictions at both
    temperatures, the paragraphs of its split, its warnings."""
    out = tmp_path / "draft.json"
    assert hsd_search.main(["--model", "tiny-falcon-h1", *SMALL, "--out", str(out), "--json"]) == 0
    printed, said = capsys.readouterr()
    spec = json.loads(printed)                                   # --json: stdout holds the JSON alone, as jq reads it
    legend = next(line for line in said.splitlines() if line.startswith("finalists: S, "))
    assert "the file's prediction above is the fair one" in legend
    assert "measured, over plain decoding on 1 test" in legend
    assert any(line.startswith("hsd_search: the file's prediction, on ") for line in said.splitlines())
    assert f"hsd_search: {spec['found_by']['candidates_tried']} distinct candidates in " in said
    assert json.loads(out.read_text()) == spec and spec["format"] == drafts.DRAFT_FORMAT
    found = spec["found_by"]
    assert found["method"] == "search" and found["candidates_tried"] > 10 and found["seed"] == 0
    assert set(found["costs"]) >= {"c", "v", "context", "temperature", "threads"} and found["costs"]["context"] == 12
    assert set(found["costs"]["v"]) == {str(d) for d in range(1, 17)}
    assert set(found["predicted_speedup"]) == {"0", "0.6"} and all(
        math.isfinite(s) for s in found["predicted_speedup"].values())
    cal = found["calibration"]
    assert not set(cal["calibration_paragraphs"]) & set(cal["test_paragraphs"])
    assert isinstance(found["warnings"], list) and len(found["finalists"]) >= 3
    assert found["best_fixed"]["k"] in range(1, 9)
    model = models.load("tiny-falcon-h1")
    draft, warned = hsd.read_draft_file(str(out), model)
    assert warned == [] and draft.k == spec["k"]
    tokens, _ = hsd.generate(model, [40, 41, 42], 12, draft=str(out), eos_token_id=-1)
    assert tokens == hsd.generate(model, [40, 41, 42], 12, draft="none", eos_token_id=-1)[0]


def test_the_conflayers_method_writes_its_selection_at_its_own_k(tmp_path, fixed_costs, monkeypatch, capsys):
    """--method conflayers: the layers ConfLayers' loop selected, at its k and stop, with what it did and its budget
    beside the paper's; hsd.py reads the file."""
    monkeypatch.setattr(conflayers, "WINDOW", 4)                    # rounds count, and sets are selected, sooner
    out = tmp_path / "draft.json"
    assert hsd_search.main(["--model", "tiny-falcon-h1", *SMALL, "--method", "conflayers", "--conflayers-tokens", "12",
                            "--out", str(out)]) == 0
    spec = json.loads(out.read_text())
    ran = spec["found_by"]["conflayers"]
    assert (spec["k"], spec["stop"]) == (conflayers.K, {"confidence": conflayers.STOP})
    assert spec["skip"]["attention"] == spec["skip"]["mlp"] == [] and set(spec["skip"]["layers"]) <= {1, 2, 3, 4}
    assert ran["described"] == conflayers.WHAT_RUNS and ran["iterations"] >= 1 and len(ran["log"]) == ran["iterations"] + 1
    assert ran["budget"] == {"prompts": 2, "new_tokens": 12} and ran["paper_budget"]["prompts"] == 100
    assert "ConfLayers (" in capsys.readouterr().out
    assert hsd.read_draft_file(str(out), models.load("tiny-falcon-h1"))[1] == []


def test_a_busy_machine_is_said_before_anything_is_decoded_and_warnings_are_spelt_alike(monkeypatch, capsys):
    """The load (given here) is said on stderr before step 1 decodes its calibration prompts, as every tool spells a
    warning: "hsd_search: warning:"."""
    monkeypatch.setattr(cost_model, "busy_cores", lambda: 1.6)

    def calibration(*args):
        raise KeyboardInterrupt
    monkeypatch.setattr(hsd_search, "calibration", calibration)
    assert hsd_search.main(["--model", "tiny-falcon-h1", *SMALL]) == 130
    err = capsys.readouterr().err.splitlines()
    assert any(line.startswith("hsd_search: warning: the machine is busy (other processes kept 1.60 of ")
               for line in err)
    for tool in ("hsd.py", "hsd_eval.py", "hsd_bench.py", "hsd_search.py", "hsd_train.py", "exercises.py"):
        with open(os.path.join(HERE, tool), encoding="utf-8") as f:
            assert "WARNING" not in f.read(), tool


def test_without_out_it_says_so_at_the_start(monkeypatch, capsys):
    def calibration(*args):
        raise KeyboardInterrupt
    monkeypatch.setattr(hsd_search, "calibration", calibration)
    assert hsd_search.main(["--model", "tiny-falcon-h1", *SMALL]) == 130
    err = capsys.readouterr().err.splitlines()
    assert err[0] == "hsd_search: no --out: the draft is printed, not written (--out FILE writes the draft file)"


def test_ctrl_c_writes_the_best_draft_so_far(tmp_path, fixed_costs, monkeypatch, capsys):
    real, calls = hsd_search.rank, []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) > 12:
            raise KeyboardInterrupt
        return real(*args, **kwargs)
    monkeypatch.setattr(hsd_search, "rank", interrupted)
    out = tmp_path / "draft.json"
    assert hsd_search.main(["--model", "tiny-falcon-h1", *SMALL, "--out", str(out)]) == 130
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith(f"hsd_search: interrupted: wrote the best draft found so far to {out}")
    assert "not confirmed" in err
    spec = json.loads(out.read_text())
    assert spec["found_by"]["interrupted"] and hsd.read_draft_file(str(out), models.load("tiny-falcon-h1"))[1] == []


@pytest.mark.parametrize("args, message", [
    (["--out", "/proc/x.json"], "cannot write --out /proc/x.json"),
    (["--out", "."], "cannot write --out .: it is a folder"),
    (["--prompts", "0"], "must be at least 1"),
    (["--prompts", "900"], "the search needs"),
    (["--temperature", "-0.5"], "--temperature must be a number from 0"),
    (["--temperature", "nan"], "--temperature must be a number from 0"),
    (["--temperature", "inf"], "--temperature must be a number from 0"),
    (["--context", "0"], "--context must lie in 1.."),
    (["--context", "100000"], "--context must lie in 1.."),
    (["--threads", "0"], "--threads must be at least 1"),
    (["--prompt-tokens", "400"], "is longer than a test paragraph"),
])
def test_search_errors_are_one_line_before_anything_is_measured(args, message, capsys, monkeypatch):
    monkeypatch.setattr(hsd_search, "measure_costs", lambda *a: pytest.fail("measured before the error"))
    try:
        status = hsd_search.main(["--model", "tiny-falcon-h1", *SMALL, *args])
    except SystemExit as e:
        status = e.code
    err = capsys.readouterr().err
    assert status == 2 and message in err and err.count("\n") == 1, err

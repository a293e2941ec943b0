"""Tests of conflayers, ConfLayers' selection rule as hsd_search runs it: the rule on hand-made confidences, the
confidence passes, and the loop's steps on hand-made rounds."""
import pytest
import torch

import conflayers
import hsd
import models


def test_find_skip_layers_skips_a_layer_below_its_neighbours():
    """ConfLayers' rule on hand-made confidences: flat ones skip nothing; a layer far below the others is skipped;
    a larger lambda asks for a deeper dip; lambda starts at eval.sh's 0.25 and moves by 0.05 to keep the band."""
    flat = {i: 1.0 for i in range(1, 7)}
    assert conflayers.find_skip_layers(flat, 0.0, 8, qwen=False) == []
    dip = {**flat, 4: 0.2}
    assert conflayers.find_skip_layers(dip, 0.0, 8, qwen=False) == [4]
    dips = {1: 1.0, 2: 0.8, 3: 1.1, 4: 0.55, 5: 0.95, 6: 1.05}
    assert conflayers.find_skip_layers(dips, 0.0, 8, qwen=False) == [2, 4]
    assert conflayers.find_skip_layers(dips, 5.0, 8, qwen=False) == []
    assert conflayers.LAMBDA == 0.25
    assert [conflayers.next_lambda(0.25, share) for share in (0.2, 0.5, 0.7)] == pytest.approx([0.2, 0.25, 0.3])


def test_layer_confidences_leave_the_cache_as_it_was():
    model = models.load("tiny-falcon-h1")
    cache = models.Cache(model, 40)
    hsd.prefill(model, cache, list(range(30, 40)))
    snap = hsd.snapshot(cache)
    confidences = conflayers.layer_confidences(model, cache, list(range(50, 60)))
    assert sorted(confidences) == [1, 2, 3, 4] and all(0 < x < 2 for x in confidences.values())
    assert cache.length == snap.length and all(s.ssm is k.ssm for s, k in zip(cache.layers, snap.layers))


NO_BEST = conflayers.Best([], 0.0)             # the loop's start: no set judged yet


def judged(rounds, skipped=(1, 3, 5), iterations=1, best=NO_BEST):
    """The loop after `rounds` counted rounds ((accepted, drafted) each) of a set chosen by the rule."""
    return conflayers.Loop(list(skipped), 0.25, iterations, list(rounds), best, None, [])


def test_a_set_is_replaced_judged_and_kept_as_its_rounds_say():
    """After each counted round: the first set and a set that skips too few layers are replaced at once; half an
    interval accepting less than a draft a round, too; an interval accepting more than 4 drafts a round at a rate above
    MAX_SCORE ends the loop; any other interval keeps the set if it beats the best seen, and replaces it."""
    least, half, whole = conflayers.least_skipped(8), conflayers.INTERVAL // 2, conflayers.INTERVAL + 1
    assert least == 3
    assert conflayers.assess(judged([(0, 4)], iterations=0), least)[1]                    # the odd layers: replaced
    assert conflayers.assess(judged([(4, 4)], skipped=(1, 3)), least)[1]                  # too few: replaced
    assert conflayers.assess(judged([(0, 4)] * half), least)[1]
    assert not conflayers.assess(judged([(1, 4)] * half), least)[1]                       # a draft a round: counted on
    assert not conflayers.assess(judged([(0, 4)] * (half + 1)), least)[1]                 # only at half an interval
    assert not conflayers.assess(judged([(2, 4)] * conflayers.INTERVAL), least)[1]
    converged, anew = conflayers.assess(judged([(6, 6)] * whole), least)
    assert not anew and converged.stopped == "converged" and converged.log == [
        "stopped: 6.00 accepted per round at a rate of 1.000"]
    kept, anew = conflayers.assess(judged([(2, 4)] * whole, best=conflayers.Best([2, 4], 1.5)), least)
    assert anew and kept.stopped is None and kept.best == conflayers.Best([1, 3, 5], 2)
    worse, anew = conflayers.assess(judged([(1, 4)] * whole, best=conflayers.Best([2, 4], 1.5)), least)
    assert anew and worse.best == conflayers.Best([2, 4], 1.5)
    slow, anew = conflayers.assess(judged([(5, 8)] * whole), least)                        # > 4 but at a rate < 0.95
    assert anew and slow.stopped is None


def test_the_last_selection_and_the_end_take_the_best_set_seen():
    """The MAX_ITERATIONS-th selection stops the loop with the best set seen; prompts that run out first end it with
    the best set seen, or the last selected if none was judged; a converged set is kept."""
    model = models.load("tiny-falcon-h1")
    cache = models.Cache(model, 40)
    hsd.prefill(model, cache, list(range(30, 40)))
    loop = judged([], iterations=conflayers.MAX_ITERATIONS - 1, best=conflayers.Best([4, 2], 1.5))
    last = conflayers.reselect(model, cache, list(range(50, 60)), loop)
    assert (last.skipped, last.stopped, last.iterations) == ([4, 2], "iterations", conflayers.MAX_ITERATIONS)
    assert last.log[-1] == f"{conflayers.MAX_ITERATIONS} iterations: the best set seen, [4, 2]"
    assert conflayers.result(last).layers == [2, 4] and not conflayers.result(last).converged
    again = conflayers.reselect(model, cache, list(range(50, 60)), judged([(0, 4)]))
    assert again.iterations == 2 and again.counted == [] and again.stopped is None
    ran_out = conflayers.result(judged([], skipped=(3,), best=conflayers.Best([1, 2], 2.0)))
    assert ran_out.layers == [1, 2] and ran_out.log[-1].startswith("the calibration prompts ran out")
    assert conflayers.result(judged([], skipped=(3, 1))).layers == [1, 3]
    assert conflayers.result(judged([], skipped=(3, 1))._replace(stopped="converged")).converged


def test_its_rounds_are_greedy_decoding_while_it_selects_anew(monkeypatch):
    """The rounds ConfLayers judges are real speculative rounds: a prompt's tokens are plain greedy decoding's, new sets
    selected mid-prompt included (their confidence passes write KV after the prompt: in a cache of their own, never
    over the generation's)."""
    monkeypatch.setattr(conflayers, "WINDOW", 4)
    monkeypatch.setattr(conflayers, "INTERVAL", 2)
    monkeypatch.setattr(conflayers, "K", 4)
    model = models.load("tiny-falcon-h1", torch.float64)
    prompt = [40, 41, 42, 43, 44, 45, 46, 47]
    loop, tokens = conflayers.prompt_rounds(model, prompt, 32, conflayers.start(model.config.num_layers),
                                            lambda n: None)
    assert loop.iterations >= 2 and len(tokens) >= 31
    assert tokens == hsd.generate(model, prompt, len(tokens), draft="none", eos_token_id=-1)[0]

"""cost_model.py: the round's cost, the timing harness, generations in turns, intervals, the texts' split, the machine.

Timings here are of a fake clock: no test asserts anything about how fast this machine is."""
import math
import os
import shutil
import subprocess
from collections import namedtuple

import pytest
import torch

import cost_model
import hsd
import models

MEASURE_BUSY_CORES = cost_model.busy_cores     # the function itself: conftest makes every test read the machine idle


# --- The cost of a round, and the speedup it predicts ---------------------------------------------------------------
def test_a_round_costs_its_draft_steps_its_verify_pass_and_its_own_work():
    v = [1.0, 1.1, 1.25, 1.5]
    assert cost_model.round_cost(3, 0.5, v, 0.0) == 3 * 0.5 + 1.5
    assert cost_model.round_cost(3, 0.5, v, 0.25) == 3 * 0.5 + 1.5 + 0.25           # r once a round, whatever d
    assert cost_model.round_cost(1, 0.5, v, 0.25) == 0.5 + 1.1 + 0.25
    assert cost_model.round_cost(0, 0.5, v, 0.25) == 1.0                            # a plain step: no round, no r
    assert cost_model.predicted_speedup(5, [0] * 5, 0.5, v, 0.25) == 1.0            # plain decoding: 1 by definition
    assert cost_model.predicted_speedup(1 + 2, [3], 0.5, v, 0.0) == 3 / 3.0         # 3 tokens for 1.5 + 1.5 steps
    assert cost_model.predicted_speedup(1 + 2, [3], 0.5, v, 0.5) == 3 / 3.5
    assert math.isclose(cost_model.predicted_speedup(4 + 1, [2, 0], 0.25, v, 0.2), 5 / (0.5 + 1.25 + 0.2 + 1.0))
    with pytest.raises(TypeError):
        cost_model.round_cost(3, 0.5, v)                                            # r cannot be left out


def test_break_even_acceptance_is_where_a_round_just_pays():
    p = cost_model.break_even_acceptance(0.5, 1.0, 1, 0.0)            # 1 + p tokens for 1.5 steps: p = 0.5
    assert abs(p - 0.5) < 1e-9
    p = cost_model.break_even_acceptance(0.5, 1.0, 1, 0.2)            # 1 + p tokens for 1.7 steps: p = 0.7
    assert abs(p - 0.7) < 1e-9
    p = cost_model.break_even_acceptance(0.3, 1.2, 4, 0.1)
    assert abs(sum(p ** i for i in range(5)) - cost_model.round_cost(4, 0.3, {4: 1.2}, 0.1)) < 1e-9
    assert cost_model.break_even_acceptance(0.9, 1.5, 2, 0.0) is None      # 3.3 steps for at most 3 tokens: never
    assert cost_model.break_even_acceptance(0.5, 1.0, 1, 0.6) is None      # 2.1 steps for at most 2 tokens: never
    # drafting pays above the least of them over k: r raises it (r 0.3: 1 + p = 0.5 + 1.0 + 0.3 at k = 1)
    assert cost_model.least_break_even((0.5, {1: 1.0, 2: 1.2}, 0.0), 2) == pytest.approx(0.5)
    assert cost_model.least_break_even((0.5, {1: 1.0, 2: 1.2}, 0.3), 2) == pytest.approx(0.8)
    # the fewest drafts that can pay even if all are kept: 1 + 1 > 0.6 + 1.5? no; 2 + 1 > 1.2 + 1.5? yes
    assert cost_model.least_paying_k(cost_model.costs_up_to((0.6, {1: 1.5}, 0.0), 4), 4) == 2
    assert cost_model.least_paying_k(cost_model.costs_up_to((1.0, {1: 1.5}, 0.0), 4), 4) is None
    # a d not measured takes the nearest measured d's v
    assert cost_model.costs_up_to((0.5, {1: 1.0, 4: 1.2}, 0.1), 5) == (0.5, {1: 1.0, 2: 1.0, 3: 1.2, 4: 1.2, 5: 1.2},
                                                                       0.1)


@pytest.mark.parametrize("values, fitted", [
    ([1.0, 2.0, 3.0], [1.0, 2.0, 3.0]),                              # already non-decreasing: unchanged
    ([1.0, 3.0, 2.0, 4.0], [1.0, 2.5, 2.5, 4.0]),                    # one violation: its pair pooled
    ([3.0, 2.0, 1.0], [2.0, 2.0, 2.0]),                              # all pooled
    ([1.39, 1.376, 1.5, 1.45], [1.383, 1.383, 1.475, 1.475]),
    ([1.39, 1.376, 1.4, 1.2], [1.3415] * 4),                         # a pool below the one before: pooled with it
], ids=["monotone", "one-pair", "falling", "two-pools", "pools-merge"])
def test_v_is_fitted_non_decreasing_in_least_squares(values, fitted):
    got = cost_model.fit_monotone(values)
    assert all(math.isclose(a, b, rel_tol=1e-9) for a, b in zip(got, fitted)) and len(got) == len(values)
    assert math.isclose(sum(got), sum(values))                        # pooling keeps each block's mean


# --- The timing harness, on a fake clock ---------------------------------------------------------------------------
class FakeModel:
    """A tiny model's config and weights, whose calls only advance a fake clock: a full step by `step_s` seconds, a
    draft step by `draft_s[skip]`, a pass over T tokens by `passes[T]`, all times the turn's drift (1 + the turn)."""

    def __init__(self, config, lm_head, step_s, draft_s, passes):
        self.config, self.lm_head = config, lm_head
        self.step_s, self.draft_s, self.passes = step_s, draft_s, passes
        self.now, self.full_calls = 0.0, 0

    def __call__(self, tokens, cache, skip=None, record_states=False):
        T = tokens.shape[1]
        if skip is None and T == 1:
            self.full_calls += 1
        drift = 1 + (self.full_calls - 1) // 2                   # a turn starts and ends with a full step
        self.now += drift * (self.draft_s[skip] if skip is not None else self.step_s if T == 1 else self.passes[T])
        return torch.zeros(1, T, self.config.vocab_size)


def fake_generate(model, round_steps):
    """A generation on the fake clock, as hsd.generate's statistics say it: a plain one takes step_s a token (drift
    left out: the harness divides by the generation's own plain step), one with a draft runs rounds of 2 drafts, each
    taking round_steps (given the skip's fake c) plain steps."""
    def generate(m, prompt, new_tokens, draft, eos_token_id, temperature, seed):
        if draft == "none":
            return [0] * new_tokens, {"new_tokens": new_tokens, "decode_s": new_tokens * model.step_s}
        rounds = [Round([5] * draft.k, 1, 5) for _ in range(new_tokens // (draft.k + 1))]
        whole = round_steps(model.draft_s[draft.skip] / model.step_s, draft.k)
        return [], {"rounds": len(rounds), "trace": rounds, "round_s": len(rounds) * whole * model.step_s}
    return generate


def fake_costs(monkeypatch, temperature, passes, r=0.3):
    real = models.load("tiny-falcon-h1")
    skips = {"component": hsd.draft_skip(real.config, "component"), "early-exit": hsd.draft_skip(real.config,
                                                                                                   "early-exit")}
    model = FakeModel(real.config, real.lm_head, 0.002, {skips["component"]: 0.0015, skips["early-exit"]: 0.001},
                      passes)
    monkeypatch.setattr(cost_model, "clock", lambda device: model.now)
    given = hsd.PASSES._replace(prefill=lambda model, cache, tokens: None,       # hsd's own functions but these
                                verify=lambda model, cache, pending, drafts: (model(torch.tensor([[pending, *drafts]]),
                                                                                    cache)[0], None),
                                commit=lambda cache, start, kept, recorded: None,
                                generate=fake_generate(model, lambda c, d: d * c + 1.25 + r))   # v[2] as fitted
    return cost_model.measure_costs(model, skips, 16, 6, 4, temperature, passes=given)


@pytest.mark.parametrize("temperature", [0.0, 0.6])
def test_costs_are_ratios_to_the_turns_full_step_and_v_is_fitted(monkeypatch, temperature):
    """The machine slows down every turn (drift), by the same factor for every call of the turn: c and v, ratios to
    the turn's full step, come out exact; v[3] measured below v[2] is pooled with it."""
    passes = {2: 0.0022, 3: 0.0026, 4: 0.0024, 5: 0.003}                   # v: 1.1, 1.3, 1.2 (noise), 1.5
    costs = fake_costs(monkeypatch, temperature, passes)
    assert math.isclose(costs.c["component"], 0.75) and math.isclose(costs.c["early-exit"], 0.5)
    assert [round(x, 9) for x in costs.v_measured] == [1.0, 1.1, 1.3, 1.2, 1.5]
    assert [round(x, 9) for x in costs.v] == [1.0, 1.1, 1.25, 1.25, 1.5]
    assert math.isclose(costs.step_s, 0.002 * 5.5)                    # median of the turns' drift 3..8 (2 warm up)
    assert costs.noise["c"]["component"] < 1e-12 and costs.noise["v"][3] < 1e-12  # ratios: no drift left in them
    assert costs.noise["step"] > 0.5                                          # the seconds themselves drift
    assert (costs.context, costs.temperature, costs.turns) == (16, temperature, 6)
    assert math.isclose(costs.r, 0.3)              # whole rounds (2 drafts: 2 c + v[2] + 0.3) less their parts


def test_costs_time_the_functions_generation_runs(monkeypatch):
    """A plain step is hsd.plain_step, a draft step hsd.draft (DRAFT_STEPS a call), v[d] verify, judge and commit of d
    drafts: at a temperature each pays its float64 softmax and draws within its time, as in a generation."""
    seen = []
    for name in ("plain_step", "draft", "judge"):
        real = getattr(hsd.PASSES, name)
        monkeypatch.setattr(hsd, "PASSES", hsd.PASSES._replace(**{name: lambda *a, real=real, name=name: seen.append(
            (name, a[-2])) or real(*a)}))
    fake_costs(monkeypatch, 0.6, {2: 0.0022, 3: 0.0026, 4: 0.0024, 5: 0.003})
    turn = [("plain_step", 0.6)] * 2 + [("draft", 0.6)] * 2 + [("judge", 0.6)] * 4     # each judged at T = 0.6
    assert sorted(seen) == sorted(turn * 8)                                             # 2 warm-up + 6 turns


def test_the_harness_runs_on_a_real_model_at_both_temperatures():
    model = models.load("tiny-qwen3.5")
    passes = hsd.PASSES
    skips = cost_model.part_skips(model.config)
    for temperature in (0.0, 0.6):
        costs = cost_model.measure_costs(model, skips, 8, 2, 3, temperature, passes=passes, warm_turns=0)
        assert set(costs.c) == set(skips) and len(costs.v) == 4 and costs.v[0] == 1.0
        assert all(a <= b for a, b in zip(costs.v, costs.v[1:])) and min(costs.v) >= 1.0
    assert set(skips) == {(field, t) for t in ("linear_attention", "full_attention")
                          for field in ("layers", *models.units_of(t))}
    assert skips["attention", "full_attention"] == models.Skip(attention=frozenset(
        i for i, t in enumerate(model.config.layer_types) if t == "full_attention"))


# --- Generations in turns and what they measured ----------------------------------------------------------------
Round = namedtuple("Round", "drafts accepted next_token")


def test_generations_take_turns_and_keep_every_run(monkeypatch):
    calls = []

    def generate(model, prompt, new_tokens, draft, temperature, seed):
        calls.append((prompt[0], draft, seed))
        trace = [] if draft == "none" else [Round([7, 7], 1, 7)]
        s = {"new_tokens": new_tokens, "decode_s": 1.0 if draft == "none" else 0.5, "rounds": len(trace),
             "drafted": 2 * len(trace), "accepted": len(trace), "plain_steps": new_tokens - 2 * len(trace),
             "trace": trace}
        return [prompt[0]] * new_tokens, s
    runs = cost_model.generations_in_turns(generate, None, [[10], [20]], {"d": "a draft"}, 4, 2, 0.6, seed=5)
    assert calls == [(10, "none", 5), (10, "a draft", 5), (20, "none", 6), (20, "a draft", 6),
                     (10, "none", 1005), (10, "a draft", 1005), (20, "none", 1006), (20, "a draft", 1006)]
    assert list(runs) == ["plain", "d"] and [len(p) for p in runs["d"]] == [2, 2]
    assert runs["d"][1][0] == {"new_tokens": 4, "decode_s": 0.5, "rounds": 1, "drafted": 2, "accepted": 1,
                               "plain_steps": 2, "tokens": [20] * 4, "steps": [2, 0, 0]}
    greedy_seeds = []
    cost_model.generations_in_turns(lambda *a, seed, **k: greedy_seeds.append(seed) or generate(*a, seed=seed, **k),
                                    None, [[10]], {}, 4, 1)
    assert greedy_seeds == [None]                                       # greedy: no seed
    row = cost_model.measured_row(runs["d"], runs["plain"], (0.5, [1.0, 1.1, 1.2], 0.25))
    assert row["speedup"] == 2.0 and row["speedup_ci"] == (2.0, 2.0) and row["turn_speedups"] == [2.0, 2.0]
    assert (row["rounds"], row["plain_steps"], row["drafts_per_round"], row["accepted_per_round"], row["alpha"]) == (
        4, 8, 2.0, 1.0, 0.5)
    assert row["cost_model_on_these_rounds"] == 16 / (4 * (2 * 0.5 + 1.2 + 0.25) + 8 * 1.0)   # the steps they took
    assert row["repeated_4grams"] == 0.0                                       # [20] * 4: one 4-gram, seen once


def test_generations_with_hsd_generate_are_greedy_decoding():
    model = models.load("tiny-falcon-h1")
    labelled = {"component k=3": hsd.choose_draft(model, "component", 3)}
    runs = cost_model.generations_in_turns(hsd.generate, model, [[1, 2, 3], [4, 5]], labelled, 6, 2)
    for i, prompt in enumerate([[1, 2, 3], [4, 5]]):
        plain = hsd.generate(model, prompt, 6, draft="none")[0]
        assert all(turn["tokens"] == plain for label in runs for turn in runs[label][i])
    assert all(sum(r["steps"]) == r["drafted"] for p in runs["component k=3"] for r in p)


def run(tokens, seconds):
    return {"new_tokens": tokens, "decode_s": seconds}


def test_the_speedup_is_of_summed_times_and_its_interval_resamples_prompts():
    """Two prompts: twice as fast on a short one, the same on a long one: the speedup weighs each by its time
    (20 tokens in 11 s against 12 s), not the mean of the ratios (1.5)."""
    ours, plain = [[run(10, 1.0)], [run(10, 10.0)]], [[run(10, 2.0)], [run(10, 10.0)]]
    assert math.isclose(cost_model.speedup(ours, plain), 12 / 11)
    low, high = cost_model.speedup_ci(ours, plain)
    assert math.isclose(low, 1.0) and math.isclose(high, 2.0)              # resamples of prompts: all B .. all A
    same = [[run(8, 1.0), run(8, 1.2)] for _ in range(5)]
    twice = [[run(8, 2.0), run(8, 2.4)] for _ in range(5)]
    assert all(math.isclose(x, 2.0) for x in cost_model.speedup_ci(same, twice))
    many = [[run(10, 1.0 + (i % 3) / 10)] for i in range(30)]
    low, high = cost_model.speedup_ci(many, [[run(10, 1.2)]] * 30)
    assert low < cost_model.speedup(many, [[run(10, 1.2)]] * 30) < high and high - low < 0.15


def test_the_loop_measure_counts_tokens_inside_repeated_ngrams():
    assert cost_model.repeated_share([1, 2, 3, 4, 1, 2, 3, 4]) == 0.5
    assert cost_model.repeated_share([1, 2, 3, 4, 5, 6, 7, 8]) == 0.0
    assert cost_model.repeated_share([5] * 10) == 0.9                   # all but the first 4-gram's first token
    assert cost_model.repeated_share([1, 2, 1, 2, 3], gram=2) == 2 / 5 and cost_model.repeated_share([]) == 0.0


# --- The texts and their split ---------------------------------------------------------------------------------
def test_paragraphs_are_numbered_by_their_place_in_the_text():
    lines = ["first", "", "  second  ", "", "", "third"]
    got = cost_model.paragraphs(lines, models.char_tokenizer())
    assert list(got) == [0, 1, 2] and models.char_tokenizer().decode(got[1]) == "second"


def test_the_split_is_disjoint_by_index_and_spread_over_the_text():
    lengths = {i: 10 if i % 7 == 3 else 100 if i % 7 == 5 else 200 for i in range(1449)}     # some too short
    paragraphs = {i: [0] * length for i, length in lengths.items()}
    test, calibration = cost_model.split(paragraphs, 64)
    assert len(test) == 24 and not set(test) & set(calibration)
    assert all(lengths[i] >= cost_model.TEST_TOKENS for i in test)
    assert set(test) | set(calibration) == {i for i, length in lengths.items() if length >= 64}
    assert cost_model.split(paragraphs, 150).test == test                     # whatever the calibration needs
    assert all(b - a >= 50 for a, b in zip(test, test[1:]))
    assert test[0] < 1449 / 24 and test[-1] >= 1449 - 2 * 1449 / 24             # from the start to the end
    with pytest.raises(models.UsageError, match="not 24 spread 50 paragraphs apart"):
        cost_model.split({i: [0] * 200 for i in range(1000)}, 64)               # 24 x 50 > 1000


def test_the_heldout_text_gives_the_test_set():
    """toys/text/heldout.txt has 1,449 paragraphs: 24 of at least 128 tokens 50 apart, for every toy's tokens."""
    lines = cost_model.read_lines(None, "toy-qwen3.5")
    for name in models.TOYS:
        test, calibration = cost_model.split(cost_model.paragraphs(lines, models.load_tokenizer(name)), 64 + 64)
        assert len(test) == 24 and len(calibration) >= 200


def test_copy_prompts_give_each_passage_again_spread_over_the_text():
    """Passages: the first 200 characters of the paragraphs of at least 200, the i-th of 16 at i * len // 16; each
    given whole, a newline and its first 35 characters; the continuation its other 165."""
    lines = [f"  {i:03} " + "word " * (40 + i % 50) if i % 3 else "short" for i in range(120)]
    long = [line.strip() for line in lines if len(line.strip()) >= 200]
    pairs = cost_model.copy_prompts(lines)
    assert len(pairs) == 16 and len(long) == 80
    for i, (prompt, rest) in enumerate(pairs):
        passage = long[i * 80 // 16][:200]
        assert prompt == passage + "\n" + passage[:35] and rest == passage[35:] and len(rest) == 165
    assert [prompt[:4] for prompt, _ in pairs[:3]] == ["001 ", "008 ", "016 "]      # every fifth long paragraph
    heldout = cost_model.read_lines(None, "toy-qwen2.5")
    assert cost_model.copy_prompts(heldout) == cost_model.copy_prompts(heldout)     # the same for every caller
    with pytest.raises(models.UsageError, match="80 paragraphs of at least 200 characters, not the 81"):
        cost_model.copy_prompts(lines, count=81)


# --- The machine --------------------------------------------------------------------------------------------------
def test_a_busy_machine_is_said_so_in_one_line():
    idle = {"busy_cores": 0.4, "cores": 2}
    assert cost_model.busy_warning(idle, [1.0, 1.1, 1.14]) is None
    line = cost_model.busy_warning(idle, [1.0, 1.2])
    assert "busy" in line and "1.00-1.20x" in line and "--threads 1" in line and "\n" not in line
    assert cost_model.busy_warning({"busy_cores": 0.5, "cores": 2}) is None        # half a core: not yet busy
    assert "other processes kept 0.98 of its 2 cores busy" in cost_model.busy_warning({"busy_cores": 0.98, "cores": 2})
    one_thread = cost_model.busy_warning({"busy_cores": 1.5, "cores": 2, "threads": 1})     # --threads 1 given
    assert "--threads 1" not in one_thread and "taskset" in one_thread and "\n" not in one_thread
    state = cost_model.machine_state(models.load("tiny-falcon-h1"), torch.float32)
    assert state["threads"] == torch.get_num_threads() and state["dtype"] == "float32"
    assert {"omp_wait_policy", "busy_cores", "load_average", "cores", "torch", "commit", "device"} <= set(state)


def stat_readings(*readings):
    """A reader of /proc/stat that gives these texts in turn (made-up ticks: no test depends on this machine's)."""
    texts = iter(readings)
    return lambda: next(texts)


#                   user nice system idle iowait irq softirq steal guest guest_nice
BEFORE = ("cpu  3000 10 1000 90000 400 0 50 0 0 0\n"
          "cpu0 1000 10  500 45000 200 0 25 0 0 0\n"
          "cpu1 2000  0  500 45000 200 0 25 0 0 0\nintr 12345 0 0\n")
# 100 ticks later on each core: cpu0 ran another process 98 of them (waited 2 on a disk), cpu1 idled 99
ONE_BUSY = ("cpu  3098 10 1001 90099 402 0 50 0 5 0\n"
            "cpu0 1098 10  500 45000 202 0 25 0 5 0\n"
            "cpu1 2000  0  501 45099 200 0 25 0 0 0\nintr 12999 0 0\n")


def test_busy_cores_are_the_ticks_other_processes_spent_on_the_cores_of_this_process():
    """Two readings of /proc/stat: the cores' busy ticks (all but idle and iowait; guest counted in user already)
    over all their ticks, times the cores counted: those this process may run on, a core elsewhere left out."""
    assert MEASURE_BUSY_CORES(0, stat_readings(BEFORE, ONE_BUSY), cpus={0, 1}) == pytest.approx(0.99, abs=0.01)
    assert MEASURE_BUSY_CORES(0, stat_readings(BEFORE, ONE_BUSY), cpus={0}) == pytest.approx(0.98, abs=0.01)
    assert MEASURE_BUSY_CORES(0, stat_readings(BEFORE, ONE_BUSY), cpus={1}) == pytest.approx(0.01, abs=0.01)
    assert MEASURE_BUSY_CORES(0, stat_readings(BEFORE, BEFORE), cpus={0, 1}) == 0.0    # no time passed: 0, not 0/0
    if os.path.exists("/proc/stat"):               # this machine's own: whatever runs here, a share of its cores
        assert 0.0 <= MEASURE_BUSY_CORES(0.05) <= len(os.sched_getaffinity(0))


def test_busy_cores_without_proc_stat_are_the_load_average_less_this_process(monkeypatch):
    def no_proc_stat():
        raise FileNotFoundError("/proc/stat")
    monkeypatch.setattr(cost_model.os, "getloadavg", lambda: (2.25, 1.0, 0.5))
    assert MEASURE_BUSY_CORES(0, no_proc_stat) == 1.25
    monkeypatch.setattr(cost_model.os, "getloadavg", lambda: (0.4, 1.0, 0.5))
    assert MEASURE_BUSY_CORES(0, no_proc_stat) == 0.0


def test_a_load_average_left_by_a_finished_run_is_no_busy_machine(monkeypatch):
    """The run before this one has just ended: the load average still counts it (1.4 on 2 cores), the cores idle.
    What is measured is what runs now: no warning; the load average is kept for the record."""
    idle = ("cpu  3000 10 1000 90198 402 0 50 0 0 0\n"
            "cpu0 1000 10  500 45099 201 0 25 0 0 0\n"
            "cpu1 2000  0  500 45099 201 0 25 0 0 0\n")
    monkeypatch.setattr(cost_model, "busy_cores",
                        lambda: MEASURE_BUSY_CORES(0, stat_readings(BEFORE, idle), cpus={0, 1}))
    monkeypatch.setattr(cost_model.os, "getloadavg", lambda: (1.4, 0.6, 0.2))
    state = cost_model.machine_state(models.load("tiny-falcon-h1"), torch.float32)
    assert state["load_average"] == 1.4 and state["busy_cores"] == pytest.approx(0.0, abs=0.01)
    assert cost_model.busy_warning(state) is None


def test_write_json_leaves_no_half_file(tmp_path):
    path = tmp_path / "out.json"
    cost_model.write_json(str(path), {"a": [1, 2]})
    assert path.read_text() == '{\n "a": [\n  1,\n  2\n ]\n}\n' and not (tmp_path / "out.json.partial").exists()
    with pytest.raises(TypeError):
        cost_model.write_json(str(path), {"a": object()})
    assert path.read_text().startswith('{\n "a": [')                              # the old file stays whole


def test_the_commit_is_marked_changed_by_code_and_toys_not_by_results(tmp_path):
    """project_commit: "+changes" where a tracked .py file or a toy's weights differ from the commit; a rewritten draft
    file, bench.json or document is a result, not a change (a run beside committed code is that code's)."""
    git = shutil.which("git") or pytest.skip("git is not installed")

    def run(*args):
        subprocess.run([git, *args], cwd=tmp_path, check=True, capture_output=True,
                       env={**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
                            "GIT_COMMITTER_EMAIL": "t@t"})
    (tmp_path / "toys" / "toy").mkdir(parents=True)
    files = {"hsd.py": "x = 1\n", "RESULTS.md": "a\n", "toys/toy/bench.json": "{}\n", "toys/toy/draft.json": "{}\n",
             "toys/toy/model.safetensors": "w"}
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    run("init", "-q")
    run("add", "-A")
    run("commit", "-qm", "c")
    head = cost_model.project_commit(tmp_path)
    assert len(head) == 40 and "+" not in head
    for name in ("RESULTS.md", "toys/toy/bench.json", "toys/toy/draft.json"):
        (tmp_path / name).write_text("rewritten\n")
    (tmp_path / "notes.py").write_text("untracked\n")
    assert cost_model.project_commit(tmp_path) == head                          # results, documents, untracked files
    for name in ("hsd.py", "toys/toy/model.safetensors"):
        (tmp_path / name).write_text("changed\n")
        assert cost_model.project_commit(tmp_path) == head + "+changes", name
        run("checkout", "--", name)
    assert cost_model.project_commit(str(tmp_path / "no such folder")) is None

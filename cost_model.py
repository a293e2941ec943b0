"""cost_model: how a speedup of self-speculative decoding is predicted and measured; every tool uses this module.

Costs are in units of one full decoding step (a plain step costs 1): c, one draft step; v[d], a verify pass over the
pending token and d drafts (v[0] = 1: a plain step is a verify pass of one token); r, what a round costs beyond its
draft steps and its verify pass, as generation runs it (measure_costs says how it is measured). A round that drafts d
tokens costs round_cost(d, c, v, r) = d c + v[d] + r and makes its accepted drafts plus the full model's next token,
so the predicted speedup over plain decoding is the tokens made over what the rounds cost. This is the one formula:
every prediction of every tool (the search, hsd_eval, hsd_bench, -k auto's pause) goes through round_cost. A
measured speedup is tokens per second against plain decoding's on the same prompts, run in turns in one process
(generations_in_turns), with a 95% interval that resamples the prompts.

This module imports torch, models, drafts and the standard library, never hsd nor a tool: it is given what it runs. The
timing harness takes the round's functions as a Passes record (a tool passes hsd.PASSES) and times them as generation
runs them; the generations take the generate function (hsd.generate).

  clock(device)                                     seconds, after the GPU's queued work
  warm_up(model, longest)                           the first calls, which are slow, made before anything is timed
  round_cost(d, c, v, r) -> d c + v[d] + r          a round's cost in full steps (a plain step: d = 0, cost 1)
  predicted_speedup(made, steps, c, v, r)           tokens made / the cost of the steps that made them
  break_even_acceptance(c, v, k, r)                 the per-token acceptance at which k drafts a round just pay off
  costs_up_to(costs, longest=16)                    (c, v, r) with v[d] for every d up to longest (the nearest's)
  least_break_even(costs, longest=16)               the acceptance above which some k up to longest pays off
  least_paying_k(costs, longest=16)                 the fewest drafts a round needs to pay off even if all are kept
  default_costs(model, skip) -> (c, v, r)           -k auto's costs when none are measured: the weights read
  break_even(times, draft, k, a, max_context)       the context from which on speculation pays off (an exercise)
  fit_monotone(values)                              least-squares non-decreasing fit (v in d)
  PAPER                                             the paper's single-round acceptance (Table A)
  measure_costs(model, skips, context, turns, longest, temperature=0.0, *, passes, warm_turns=2) -> Costs
      step_s, c {label: c}, v [v[0] .. v[longest]] (fitted monotone), v_measured, r, context, temperature, turns,
      noise {"step": x, "c": {label: x}, "v": {d: x}, "r": x}: the relative difference of the medians of the turns'
      halves
  part_kinds(config) -> {(field, layer type): [layers]}; part_skips(config) -> {(field, layer type): models.Skip}
  generations_in_turns(generate, model, prompts, labelled, new_tokens, turns, temperature=0.0, seed=0, progress=None)
      -> {label: [per prompt [per turn run]]}, "plain" first; a run: RUN_KEYS of generate's statistics, the tokens and
      how many tokens each step drafted
  measured_row(runs, plain_runs, costs=None)        what generations measured, one key per quantity; costs (c, v, r)
  rate(runs, prompts=None, turn=None)               tokens per second: summed tokens over summed seconds
  speedup(runs, plain_runs); speedup_ci(runs, plain_runs, resamples=10_000, seed=0)   over prompts
  bootstrap_ci(values, resamples=10_000, seed=0)    95% percentile interval of a mean (an exercise)
  repeated_share(tokens, gram=4)                    the share of tokens inside a gram-token window seen before (loops)
  TINY_TEXT; read_lines(path, model_name)          the text a tool reads (tiny-*: TINY_TEXT; toys: held-out)
  paragraphs(lines, tokenizer) -> {paragraph index: ids}
  split(paragraphs, tokens, count=TEST_PROMPTS, gap=TEST_GAP, test_tokens=TEST_TOKENS) -> Split(test,
      calibration): paragraph indices, disjoint; the test set the same for every caller
  copy_prompts(lines, count=COPY_PASSAGES, length=COPY_LENGTH, given=COPY_GIVEN) -> [(prompt, continuation)]: the
      copying probe, a passage given again after itself (hsd_train measures copying with it, hsd_eval --recall)
  check_writable(path, flag); write_json(path, value)
  busy_cores(window=BUSY_WINDOW, read_stat=..., cpus=None)    the cores others keep busy now (/proc/stat, sampled)
  machine_state(model, dtype) -> machine (a dict); busy_warning(machine, ratios=()) -> a line or None
"""
import json
import os
import pathlib
import statistics
import subprocess
import time
from collections import namedtuple

import torch

import drafts
import models

HERE = os.path.dirname(os.path.abspath(__file__))
TEST_PROMPTS, TEST_GAP = 24, 50      # the test set: 24 paragraphs spread over the held-out text, 50 or more apart,
TEST_TOKENS = 128                    # each of at least 128 tokens (a 64-token prompt and as much text after it)
COPY_PASSAGES, COPY_LENGTH, COPY_GIVEN = 16, 200, 35   # the copying probe: 16 passages of 200 characters, 35 given
BUSY_SPREAD = 1.15                   # per-turn ratios further apart than this (max / min): the machine is busy
BUSY_CORES = 0.5                     # other processes on more than half a core: the machine is busy (busy_warning)
BUSY_WINDOW = 0.3                    # seconds over which busy_cores samples what other processes use


# --- The cost of a round, and the speedup it predicts ---------------------------------------------------------------
def clock(device):
    """time.perf_counter(), after waiting for the GPU's queued work if there is a GPU: timings of model calls."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


@torch.inference_mode()
def warm_up(model, longest):
    """A decoding step and a recording pass of every length up to longest + 1 (a verify pass of `longest` drafts) on
    a scratch cache: a process's first calls are slow (memory, kernel selection), and timings should show what
    decoding costs."""
    cache = models.Cache(model, longest + 2)
    for length in range(2, longest + 2):
        model(torch.zeros(1, length, dtype=torch.long, device=cache.device), cache, record_states=True)
        cache.length = 0
    model(torch.zeros(1, 1, dtype=torch.long, device=cache.device), cache)


def round_cost(d, c, v, r):
    """What a round of d drafts costs: d draft steps of cost c, a verify pass over d + 1 tokens, v[d], and r, the
    round's own work beyond them (in full steps; or in seconds, given c, v and r in seconds). A plain step is a round
    of 0 drafts: v[0], without r (it is the unit the others are measured in)."""
    return d * c + v[d] + r if d else v[0]


def predicted_speedup(made, steps, c, v, r):
    """Tokens made over what the steps that made them cost, in full steps: steps lists how many tokens each step
    drafted (0 for a plain step). One round of k drafts that keeps a of them on average: predicted_speedup(1 + a, [k],
    c, v, r)."""
    return made / sum(round_cost(d, c, v, r) for d in steps)


def break_even_acceptance(c, v, k, r):
    """The per-token acceptance p at which k drafts a round of cost c (verify v, the round's own work r) just pay off,
    S = 1: where (1 - p^(k+1)) / (1 - p) = round_cost(k, c, {k: v}, r); None if no p <= 1 does (even accepting every
    draft would not pay)."""
    target = round_cost(k, c, {k: v}, r)
    if target > k + 1:
        return None
    low, high = 0.0, 1.0
    for _ in range(50):                                    # tokens per round rise with p: bisect
        p = (low + high) / 2
        low, high = (p, high) if sum(p ** i for i in range(k + 1)) < target else (low, p)
    return high


def costs_up_to(costs, longest=16):
    """costs (c, v, r), v a dict {d: v[d]} or a sequence -> (c, {d: v[d]} for every d from 1 to longest, r): a d not
    measured takes the nearest measured d's v (default_costs gives v[1] alone)."""
    c, v, r = drafts.draft_costs(*costs)                     # v as {d: v[d]}, from a dict or a sequence
    return c, {d: v[d] if d in v else v[min(v, key=lambda e: abs(e - d))] for d in range(1, longest + 1)}, r


def least_paying_k(costs, longest=16):
    """The fewest drafts a round must make to pay off at all: the least d up to longest at which a round that keeps all
    its d drafts makes more tokens than it costs, d + 1 > round_cost(d, c, v, r); None if no d does. costs: (c, v, r),
    v[d] for every d up to longest (costs_up_to)."""
    c, v, r = costs
    return next((d for d in range(1, longest + 1) if d + 1 > round_cost(d, c, v, r)), None)


def least_break_even(costs, longest=16):
    """The acceptance above which drafting pays off for costs (c, v, r) at some k up to longest (-k auto's largest):
    the least break_even_acceptance; 1 if none does."""
    c, v, r = costs_up_to(costs, longest)
    even = [break_even_acceptance(c, v[d], d, r) for d in range(1, longest + 1)]
    return min((acceptance for acceptance in even if acceptance is not None), default=1.0)


UNIT_MODULES = {"attention": ("self_attn",), "recurrent": ("mamba", "linear_attn"), "mlp": ("feed_forward", "mlp")}


def default_costs(model, skip):
    """-k auto's costs when none are given (README, "-k auto"): c, the share of the weights a draft step reads,
    v[d] = 1 for every d, as where decoding is bound by reading each weight once a step (a verify pass too), and r = 0
    (a round's own work is not known without measuring it)."""
    def weights(module):
        return sum(param.numel() for param in module.parameters())
    left_out = sum(weights(layer) if i in skip.layers else sum(weights(getattr(layer, name)) for unit in
                   skip.left_out_of(i) for name in UNIT_MODULES[unit] if hasattr(layer, name))
                   for i, layer in enumerate(model.model.layers))
    read = weights(model) - (0 if model.config.tie_word_embeddings else model.model.embed_tokens.weight.numel())
    return 1 - left_out / read, {1: 1.0}, 0.0


def break_even(times, draft, k, a, max_context):
    """The context from which on the predicted speedup (1 + a) t_full / (k t_draft + t_verify + t_round) exceeds 1,
    each time linear in L through the two measured contexts: 0 if it does at both, None if not up to max_context.
    times: {L: {"full": seconds, draft: seconds, k: seconds of a verify pass of k + 1 tokens, "round": seconds of a
    round's own work}} at two contexts L."""
    (L0, t0), (L1, t1) = times.items()
    gap0 = (1 + a) * t0["full"] - round_cost(k, t0[draft], t0, t0["round"])   # seconds the round saves (< 0: loses)
    gap1 = (1 + a) * t1["full"] - round_cost(k, t1[draft], t1, t1["round"])
    if min(gap0, gap1) >= 0:
        return 0
    if gap1 <= gap0:                                     # not rising: never pays off beyond the measured contexts
        return None
    crossing = L0 - gap0 * (L1 - L0) / (gap1 - gap0)
    return round(crossing) if crossing <= max_context else None


def fit_monotone(values):
    """The non-decreasing sequence closest to values in least squares (pool adjacent violators): a verify pass of
    more tokens never costs less, so the noise that makes v[10] < v[7] is averaged away before v is used."""
    blocks = []                                                  # [mean, count], non-decreasing
    for x in values:
        blocks.append([x, 1])
        while len(blocks) > 1 and blocks[-2][0] > blocks[-1][0]:
            (mean1, count1), (mean2, count2) = blocks.pop(-2), blocks.pop()
            blocks.append([(mean1 * count1 + mean2 * count2) / (count1 + count2), count1 + count2])
    return [mean for mean, count in blocks for _ in range(count)]


# The paper's single-round acceptance (Table A; value, 95% interval or None), greedy and at T = 0.6: hsd_eval's
# figure, and the acceptance hsd_bench --context-sweep predicts the official models' speedups with.
PAPER = {
    "falcon-h1-0.5b": {"component": {
        "greedy": {2: (0.68, (0.62, 0.74)), 4: (0.37, (0.335, 0.405)), 8: (0.186, None)},
        "T=0.6": {2: (0.56, (0.505, 0.615)), 4: (0.3875, (0.346, 0.43)), 8: (0.224, (0.19, 0.259))}}},
    "falcon-h1-3b": {"component": {
        "greedy": {2: (0.59, None), 4: (0.351, None), 8: (0.186, None)},
        "T=0.6": {2: (0.495, (0.4375, 0.5525)), 4: (0.374, (0.326, 0.424)), 8: (0.2175, (0.186, 0.252))}}},
    "qwen3.5-0.8b": {
        "component": {
            "greedy": {2: (0.0375, None), 4: (0.01875, None), 8: (0.0094, None)},
            "T=0.6": {2: (0.0725, (0.045, 0.105)), 4: (0.04, (0.0225, 0.06)), 8: (0.0094, (0.0031, 0.0175))}},
        "layerskip": {"greedy": {4: (0.2325, None)}},
        "early-exit": {"greedy": {4: (0.0, None)}}},
    "qwen2.5-0.5b": {"layerskip": {
        "greedy": {2: (0.52, None), 4: (0.326, None), 8: (0.179, None)},
        "T=0.6": {2: (0.4275, (0.375, 0.4825)), 4: (0.306, (0.262, 0.351)), 8: (0.191, (0.161, 0.223))}}},
}


# --- The timing harness: c, v and r at a context ---------------------------------------------------------------
Passes = namedtuple("Passes", "prefill snapshot restore plain_step draft verify judge commit generate")
# the round's functions, timed as generation runs them, and generation itself (generate, for r): a tool passes
# hsd.PASSES, hsd's own
Costs = namedtuple("Costs", "step_s c v v_measured r context temperature turns noise")
# step_s: a plain decoding step in seconds (median); c[label]: a draft step of that skip over a plain step; v[d]: what
# a round does after drafting d tokens (a verify pass of d + 1 tokens, the judgement, the commit) over a plain step,
# fitted monotone, v[0] = 1; v_measured: as measured; r: what a round costs in a generation beyond d c + v[d] (in plain
# steps of that generation); context: tokens in the cache; temperature: 0 greedy, > 0 the sampled round's float64
# softmax and draws included, as generation pays them; turns: how many; noise: per cost, the relative difference
# between the medians of the first and second half of the turns (of r: of the whole rounds it is fitted from).
DRAFT_STEPS = 4                 # draft steps of one timed draft call: c is its time over 4 (one step is too short)
ROUND_K, ROUND_TOKENS = 2, 16   # r: per turn a plain generation of 16 tokens and one at k = 2 (a skip a turn, in turn)


def halves_noise(values):
    """|median of the first half - median of the second half| / median: how far the costs drifted while measured."""
    half = len(values) // 2
    if half == 0 or statistics.median(values) == 0:
        return None
    return abs(statistics.median(values[:half]) - statistics.median(values[half:])) / statistics.median(values)


def whole_rounds(generate, model, label, skip, k, context, temperature, seed):
    """Rounds as generation runs them: a plain generation and one of k drafts a round (the skip, no stop), of
    ROUND_TOKENS tokens after a prompt that puts the context at `context` halfway (no end of text) -> (label, a round's
    seconds over the plain generation's seconds per token, [drafts of each round])."""
    prompt = [i % model.config.vocab_size for i in range(1, max(1, context - ROUND_TOKENS // 2) + 1)]
    seed = seed if temperature else None
    plain = generate(model, prompt, ROUND_TOKENS, draft="none", eos_token_id=-1, temperature=temperature, seed=seed)[1]
    s = generate(model, prompt, ROUND_TOKENS, draft=drafts.Draft(str(label), skip, k, None), eos_token_id=-1,
                 temperature=temperature, seed=seed)[1]
    step = plain["decode_s"] / plain["new_tokens"]
    return label, s["round_s"] / s["rounds"] / step, [len(r.drafts) for r in s["trace"]]


@torch.inference_mode()
def measure_costs(model, skips, context, turns, longest, temperature=0.0, *, passes, warm_turns=2):
    """c of each skip ({label: models.Skip}), v[d] for d = 0..longest and r, against a plain decoding step at a
    context, at a temperature, each timed through the functions generation runs (passes: hsd.PASSES): a plain step is
    plain_step; a draft step, draft (DRAFT_STEPS of them a call); v[d], verify, judge and commit of a round of d
    drafts; so the Python work around each model call is in the costs, as it is in a generation. In each turn a plain
    step comes first and last and every call in between, and each call's time is divided by that turn's plain step,
    so that the machine's drift affects a call and the step it is divided by alike; the costs are the medians over
    `turns` turns (after warm_turns turns that warm up), v then fitted monotone. The cache is put back after each
    call. Many skips cost one call each per turn: time them together.

    r, what a round costs beyond d c + v[d]: in each turn, after the calls, whole rounds as generation runs them
    (whole_rounds: passes.generate, a plain generation and one at ROUND_K drafts a round, one skip a turn in turn),
    each round's seconds over the plain generation's seconds per token, less d c + v[d] of its d drafts (the medians
    of c and v); r is the median over the turns. Why r from generations and not v[d] redefined as a whole round less
    its d draft steps: the timed parts already hold every function a round calls (snapshot and restore cost
    microseconds), yet rounds in a generation cost about 0.15-0.4 of a plain step more than their parts (the shipped
    benchmark runs of 2026-12-04, fitted: RESULTS.md, "The cost model"); what a round pays there (the state a commit
    leaves, the loop, memory) is seen only where generation runs, and one term fitted there, beside the parts, keeps
    c and v what they say and r the rest, in the same unit as the speedup it predicts (a plain step as generation runs
    it). Without skips r is 0 (nothing to draft with)."""
    cache = models.Cache(model, context + max(longest, DRAFT_STEPS) + 2)
    passes.prefill(model, cache, [i % model.config.vocab_size for i in range(1, context + 1)])
    snap, generator = passes.snapshot(cache), torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size

    def round_tail(d):                  # after drafting d tokens: verify, judge (q: some draft distribution), commit
        logits, recorded = passes.verify(model, cache, 1, [1] * d)
        q = torch.full((d, vocab), 1 / vocab, dtype=torch.float64) if temperature > 0 else None
        passes.judge([1] * d, q, logits, temperature, generator)
        passes.commit(cache, context, d + 1, recorded)
    calls = {"full": lambda: passes.plain_step(model, cache, 1, temperature, generator)}
    calls |= {("c", label): lambda s=s: passes.draft(model, cache, 1, s, DRAFT_STEPS, temperature, generator)
              for label, s in skips.items()}
    calls |= {("v", d): lambda d=d: round_tail(d) for d in range(1, longest + 1)}

    def seconds(call):
        t0 = clock(cache.device)
        call()
        t = clock(cache.device) - t0
        passes.restore(cache, snap)
        return t
    full, ratios, rounds = [], {name: [] for name in calls if name != "full"}, []
    labels = list(skips)
    for turn in range(warm_turns + turns):
        before = seconds(calls["full"])
        times = {name: seconds(call) for name, call in calls.items() if name != "full"}
        step = (before + seconds(calls["full"])) / 2
        if turn >= warm_turns:
            full.append(step)
            for name, t in times.items():
                ratios[name].append(t / step / (DRAFT_STEPS if name[0] == "c" else 1))
            if labels and longest >= 1:
                label = labels[(turn - warm_turns) % len(labels)]
                rounds.append(whole_rounds(passes.generate, model, label, skips[label], min(ROUND_K, longest),
                                           context, temperature, turn))
    median = {name: statistics.median(r) for name, r in ratios.items()}
    v_measured = [1.0] + [median["v", d] for d in range(1, longest + 1)]
    v = [1.0] + [max(1.0, x) for x in fit_monotone(v_measured[1:])]        # never below a plain step
    c = {label: median["c", label] for label in skips}
    beyond = [whole - statistics.mean(d * c[label] + v[d] for d in ds) for label, whole, ds in rounds]
    r = statistics.median(beyond) if beyond else 0.0
    noise = {"step": halves_noise(full), "c": {label: halves_noise(ratios["c", label]) for label in skips},
             "v": {d: halves_noise(ratios["v", d]) for d in range(1, longest + 1)},
             "r": halves_noise([whole for _, whole, _ in rounds])}
    return Costs(statistics.median(full), c, v, v_measured, r, context, temperature, turns, noise)


def part_kinds(config):
    """{(field, layer type): the layers that have it}: the kinds of part a draft can leave out, field a models.Skip
    field: "layers" (a whole layer) or a unit of models.UNITS (a unit the layer type has)."""
    kinds = {}
    for i, layer_type in enumerate(config.layer_types):
        for field in ("layers", *models.units_of(layer_type)):
            kinds.setdefault((field, layer_type), []).append(i)
    return kinds


def part_skips(config):
    """{(field, layer type): the Skip leaving out that part in every layer that has it}: measure_costs of these says
    what each kind of part saves, (1 - c) / the number of its layers per layer."""
    return {kind: models.Skip(**{kind[0]: frozenset(layers)}) for kind, layers in part_kinds(config).items()}




# --- Generations in turns, and what they measured -------------------------------------------------------------------
RUN_KEYS = ("new_tokens", "decode_s", "rounds", "drafted", "accepted", "plain_steps")


@torch.inference_mode()
def generations_in_turns(generate, model, prompts, labelled, new_tokens, turns, temperature=0.0, seed=0, progress=None):
    """Plain decoding and each of labelled ({label: what generate takes as draft, e.g. a drafts.Draft}) on every
    prompt (token ids), `turns` turns: in each turn every prompt in turn, and for each prompt every label in turn, so
    that a label's runs and plain decoding's of the same prompt lie seconds apart and the machine's drift affects both
    alike. generate is hsd.generate. Returns {label: [per prompt: [per turn: run]]}, "plain" first; a run is a dict
    of RUN_KEYS, "tokens" (the new token ids) and "steps" (how many tokens each step drafted, 0 for a plain step): raw
    numbers a stranger can bootstrap again. At a temperature, prompt i of a turn is seeded alike for all labels.
    progress: an object with update(count), called after each prompt of a turn with how many generations it ran
    (plain and every label)."""
    labels = {"plain": "none", **labelled}
    runs = {label: [[] for _ in prompts] for label in labels}
    for turn in range(turns):
        for i, prompt in enumerate(prompts):
            for label, draft in labels.items():
                tokens, s = generate(model, prompt, new_tokens, draft=draft, temperature=temperature,
                                     seed=seed + 1000 * turn + i if temperature else None)
                steps = [len(r.drafts) for r in s["trace"]] + [0] * s["plain_steps"]
                runs[label][i].append({**{key: s[key] for key in RUN_KEYS}, "tokens": tokens, "steps": steps})
            if progress is not None:
                progress.update(len(labels))
    return runs


def rate(runs, prompts=None, turn=None):
    """Tokens per second of runs ({per prompt: [per turn]}): summed tokens over summed seconds, of the given prompts
    (indices; all by default) and turn (all by default)."""
    chosen = [runs[i] for i in (range(len(runs)) if prompts is None else prompts)]
    picked = [r for per_prompt in chosen for t, r in enumerate(per_prompt) if turn is None or t == turn]
    return sum(r["new_tokens"] for r in picked) / sum(r["decode_s"] for r in picked)


def speedup(runs, plain_runs):
    """The measured speedup: tokens per second of the runs over plain decoding's, over all prompts and turns."""
    return rate(runs) / rate(plain_runs)


def speedup_ci(runs, plain_runs, resamples=10_000, seed=0):
    """95% percentile interval of speedup(), resampling the prompts with replacement (a prompt keeps all its turns,
    and its plain runs): the ratio of summed times, so a long prompt weighs as much as it took."""
    def totals(r):                                       # (prompts, 2): tokens and seconds of each prompt
        return torch.tensor([[sum(x["new_tokens"] for x in p), sum(x["decode_s"] for x in p)] for p in r],
                            dtype=torch.float64)
    ours, plain = totals(runs), totals(plain_runs)
    drawn = torch.randint(len(ours), (resamples, len(ours)), generator=torch.Generator().manual_seed(seed))
    a, b = ours[drawn].sum(dim=1), plain[drawn].sum(dim=1)                           # (resamples, 2)
    ratios = (a[:, 0] / a[:, 1]) / (b[:, 0] / b[:, 1])
    return torch.quantile(ratios, 0.025).item(), torch.quantile(ratios, 0.975).item()


def bootstrap_ci(values, resamples=10_000, seed=0):
    """95% percentile interval of the mean, resampling the values with replacement."""
    v = torch.tensor(values, dtype=torch.float64)
    means = v[torch.randint(len(v), (resamples, len(v)), generator=torch.Generator().manual_seed(seed))].mean(dim=1)
    return torch.quantile(means, 0.025).item(), torch.quantile(means, 0.975).item()


def repeated_share(tokens, gram=4):
    """The share of tokens that lie inside a window of `gram` tokens (a 4-gram) seen before in the same sequence: 0
    for text that never repeats itself, near 1 for a loop ("the same of the same of ..."); loops make greedy speedups
    look better than text."""
    seen, inside = set(), [False] * len(tokens)
    for j in range(len(tokens) - gram + 1):
        window = tuple(tokens[j:j + gram])
        if window in seen:
            inside[j:j + gram] = [True] * gram
        seen.add(window)
    return sum(inside) / len(tokens) if tokens else 0.0


def measured_row(runs, plain_runs, costs=None):
    """What generations (one label's runs and plain decoding's) measured: the speedup over plain decoding with its 95%
    interval over prompts, each turn's speedup, tokens per second, rounds, plain steps, drafts_per_round,
    accepted_per_round, alpha, the loop measure (repeated_share of the continuations), and, given costs (c, v, r),
    the speedup the cost model gives the very steps these runs took ("cost_model_on_these_rounds": not a prediction
    made beforehand, the cost model's own error beside the measured speedup)."""
    every = [r for per_prompt in runs for r in per_prompt]
    rounds, drafted, accepted, plain = (sum(r[x] for r in every) for x in ("rounds", "drafted", "accepted",
                                                                            "plain_steps"))
    turns = len(runs[0]) if runs else 0
    row = {"speedup": speedup(runs, plain_runs), "speedup_ci": speedup_ci(runs, plain_runs),
           "turn_speedups": [rate(runs, turn=t) / rate(plain_runs, turn=t) for t in range(turns)],
           "tokens_per_s": rate(runs), "rounds": rounds, "plain_steps": plain,
           "drafts_per_round": drafted / rounds if rounds else None,
           "accepted_per_round": accepted / rounds if rounds else None,
           "alpha": accepted / drafted if drafted else None,
           "repeated_4grams": statistics.mean(repeated_share(r["tokens"]) for r in every)}
    if costs is not None:
        row["cost_model_on_these_rounds"] = predicted_speedup(sum(r["new_tokens"] for r in every),
                                                              [d for r in every for d in r["steps"]], *costs)
    return row


# --- The texts and their splits --------------------------------------------------------------------------------------
TINY_TEXT = [  # what the tools read for tiny-* models, offline: lines long enough for every protocol of paper_inputs
    " = Speculative decoding = ",
    " Speculative decoding drafts a few tokens with a cheap model and then checks all of them with the expensive "
    "model in a single pass. The longest prefix that the expensive model agrees with is kept, and one more token "
    "comes from the expensive model itself. ",
    " A hybrid language model mixes recurrent layers such as Mamba-2 or Gated DeltaNet with a few layers of softmax "
    "attention, so that most of the sequence is summarised in a state of fixed size. ",
    " Because a recurrent state summarises everything seen so far, it cannot be cut back the way a cache of keys and "
    "values can. The decoder keeps a snapshot before drafting and the state after every verified position, and picks "
    "the one after the last accepted token. ",
    " The draft model inside a hybrid is the same network with its attention switched off, sharing every weight. ",
    "",
    " = = Measurements = = ",
    " Acceptance is the share of drafted tokens that the full model keeps; it is not a speedup, since a draft step and "
    "a verify pass both cost time. The cost model divides the tokens a round yields by what the round costs. ",
    " Perplexity with the attention removed says how much of the model's knowledge lives in its attention layers, and "
    "the paper found that this ratio predicts whether the draft is any good. ",
    " Divergence compares the two next-token distributions at every position of a text. ",
    " At a temperature the draft samples its tokens, and the full model accepts each with a probability that makes the "
    "output follow its own distribution exactly, whatever the draft proposed. ",
]


def read_lines(path, model_name):
    """The raw lines of the text: a file; for tiny-* models their built-in text, for the toys their held-out text;
    else WikiText-2 raw validation (the paper's)."""
    if model_name in models.TINY and not path:
        return list(TINY_TEXT)
    path = path or (os.path.join(models.TOYS_DIR, "text", "heldout.txt") if model_name in models.TOYS else None)
    if path:
        try:
            with open(path, encoding="utf-8") as f:
                return f.read().splitlines()
        except (OSError, UnicodeDecodeError) as e:
            reason = e.strerror if isinstance(e, OSError) else "it is not UTF-8 text"
            raise models.UsageError(f"cannot read --text {path}: {reason}") from None
    try:
        import pyarrow.parquet as pq
        from huggingface_hub import hf_hub_download
        file = hf_hub_download("Salesforce/wikitext", "wikitext-2-raw-v1/validation-00000-of-00001.parquet",
                               repo_type="dataset")
        return [line.rstrip("\n") for line in pq.read_table(file).column("text").to_pylist()]
    except Exception as e:      # no network and nothing cached, or no pyarrow to read the parquet file
        raise models.UsageError(f"cannot read WikiText-2 (it needs the Hub and `pip install pyarrow`): "
                                f"{type(e).__name__}: {str(e)[:80]}; or pass --text FILE") from None


def paragraphs(lines, tokenizer):
    """{paragraph index: token ids}: the text's non-empty lines (stripped), numbered in the order of the text; the
    index names a paragraph in every split and record."""
    return {i: tokenizer.encode(line).ids for i, line in enumerate(line.strip() for line in lines if line.strip())}


Split = namedtuple("Split", "test calibration")   # paragraph indices, disjoint; test spread over the text


def split(paragraphs, tokens, count=TEST_PROMPTS, gap=TEST_GAP, test_tokens=TEST_TOKENS):
    """The test and the calibration paragraphs ({index: ids}), by index. Test: `count` paragraphs of at least
    test_tokens tokens spread evenly over the text (the first long enough one at or after each of count even marks),
    each at least `gap` paragraphs after the one before; it does not depend on `tokens`, so that the search confirms
    on the very prompts the benchmark measures. Calibration: every other paragraph of at least `tokens` tokens (a
    search draws from these). A UsageError if the text cannot give the test set."""
    total = max(paragraphs, default=-1) + 1
    long = [i for i in sorted(paragraphs) if len(paragraphs[i]) >= test_tokens]
    test = []
    for mark in range(count):
        after = max(mark * total // count, test[-1] + gap if test else 0)
        chosen = next((i for i in long if i >= after), None)
        if chosen is None:
            break
        test.append(chosen)
    if len(test) < count:
        raise models.UsageError(f"the text has {len(long)} paragraphs of at least {test_tokens} tokens, not {count} "
                                f"spread {gap} paragraphs apart for the test set: give a longer --text")
    chosen = set(test)
    return Split(test, [i for i in sorted(paragraphs) if len(paragraphs[i]) >= tokens and i not in chosen])



def copy_prompts(lines, count=COPY_PASSAGES, length=COPY_LENGTH, given=COPY_GIVEN):
    """The copying probe: `count` passages of `length` characters, each given once whole and then begun again, so
    that what comes next is known. lines: a text's lines (the toys': their held-out text, read_lines). The passages
    are the first `length` characters of the paragraphs (stripped lines) at least that long, evenly spread over them:
    the i-th of count is long[i * len(long) // count], the same for every caller. Returns count pairs of strings
    (prompt, continuation): prompt = passage + "\n" + passage[:given], continuation = passage[given:] (length - given
    characters, what a model that copies writes next). A UsageError if the text has fewer such paragraphs."""
    long = [line.strip() for line in lines if len(line.strip()) >= length]
    if len(long) < count:
        raise models.UsageError(f"the text has {len(long)} paragraphs of at least {length} characters, not the {count} "
                                "the copying probe needs: give a longer --text, or fewer prompts")
    passages = [long[i * len(long) // count][:length] for i in range(count)]
    return [(passage + "\n" + passage[:given], passage[given:]) for passage in passages]

# --- Output files, and the machine the numbers were measured on --------------------------------------------------
def check_writable(path, flag):
    """A UsageError, before anything is measured, unless path can be written as a file: not a folder, and open for
    appending (which truncates nothing: a resume file stays whole), or created and removed again."""
    if os.path.isdir(path):
        raise models.UsageError(f"cannot write {flag} {path}: it is a folder: give a file name")
    existed = os.path.exists(path)
    try:
        with open(path, "a", encoding="utf-8"):
            pass
    except OSError as e:
        raise models.UsageError(f"cannot write {flag} {path}: {e.strerror}") from None
    if not existed:
        os.remove(path)


def write_json(path, value):
    """Write value to path as JSON, through a file beside it and a rename: an interrupted write leaves no half file."""
    partial = f"{path}.partial"
    with open(partial, "w", encoding="utf-8") as f:
        json.dump(value, f, indent=1)
        f.write("\n")
    os.replace(partial, path)


def project_commit(folder=HERE):
    """The project's git commit, with "+changes" if what computes a number differs from it (a tracked .py file, or a
    toy's weights, config or tokenizer), or None where there is no git. Results and documents written since (draft
    files, bench.json, the .md files) are no change: a run that rewrites a draft file beside committed code is still
    that code's."""
    computes = ["*.py", "toys/*/model.safetensors", "toys/*/config.json", "toys/*/tokenizer.json"]
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=folder, capture_output=True, text=True, timeout=10,
                              check=False)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", *computes], cwd=folder,
                               capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    if head.returncode != 0:
        return None
    return head.stdout.strip() + ("+changes" if dirty.stdout.strip() else "")


def busy_cores(window=BUSY_WINDOW, read_stat=pathlib.Path("/proc/stat").read_text, cpus=None):
    """The cores other processes keep busy now, of those this process may run on: a float, 0.02 on an idle machine,
    0.98 with one of them busy with other work.

    /proc/stat has a line per core (cpu0, cpu1, ...) of its CPU time since boot, in ticks (SC_CLK_TCK a second): user
    nice system idle iowait irq softirq steal (then guest and guest_nice, counted in user and nice already: left out).
    It is read twice, `window` seconds apart, while this process sleeps; over the lines of the cores `cpus` (default:
    this process's, os.sched_getaffinity: a run given cores of its own with taskset -c is not told of work on others),
    the ticks spent busy (all but idle and iowait), less this process's own CPU time over the window (time.process_time:
    all its threads, torch's included), over all their ticks, times their number. What is measured is what runs now,
    unlike the load average, which still counts for a minute a run that has just ended. read_stat() returns /proc/stat's
    text (a test gives readings of its own). Without /proc/stat (not Linux): the 1-minute load average less the one
    core this process may have used, at least 0: a lagging estimate, the best there is there."""
    try:
        first, own = read_stat(), time.process_time()
    except OSError:
        return round(max(0.0, os.getloadavg()[0] - 1), 2)
    names = {f"cpu{n}" for n in (os.sched_getaffinity(0) if cpus is None else cpus)}
    time.sleep(window)
    second, own = read_stat(), time.process_time() - own
    busy, total = [], []
    for text in (first, second):
        per_core = [[int(t) for t in line.split()[1:9]] for line in text.splitlines()
                    if line.partition(" ")[0] in names]
        busy.append(sum(sum(ticks) - ticks[3] - ticks[4] for ticks in per_core))    # all but idle and iowait
        total.append(sum(sum(ticks) for ticks in per_core))
    others = busy[1] - busy[0] - own * os.sysconf("SC_CLK_TCK")
    return round(max(0.0, others / max(total[1] - total[0], 1) * len(per_core)), 2)


def machine_state(model, dtype):
    """What every published number is measured on: device, dtype, torch's threads, the OpenMP wait policy, the cores
    this process may use, the cores other processes keep busy (busy_cores, measured now: before anything is decoded,
    it is the work of others, not ours), the load average (1 minute; for the record), torch's version, the project's
    commit."""
    device = model.lm_head.weight.device
    return {"device": drafts.device_name(device), "dtype": str(dtype).replace("torch.", ""),
            "threads": torch.get_num_threads(), "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "default"),
            "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
            "busy_cores": busy_cores(), "load_average": round(os.getloadavg()[0], 2), "torch": torch.__version__,
            "commit": project_commit()}


def busy_warning(machine, ratios=()):
    """One line when the machine is too busy for its speedups to be trusted, else None: the per-turn speedups
    `ratios` more than BUSY_SPREAD apart (max / min), or other processes on more than BUSY_CORES cores
    (machine["busy_cores"], busy_cores's). Half a core: an idle machine reads a few hundredths (a shell, a daemon's
    tick), a process spinning on a core about 1; other work of more than half a core takes a core from a run of
    torch's threads for half its steps or more, and each such step waits for the shared core (3x slower: RESULTS.md,
    "A busy machine"). Its advice is --threads 1, unless the machine state says 1 thread already."""
    reasons = []
    if ratios and max(ratios) > BUSY_SPREAD * min(ratios):
        reasons.append(f"the turns' speedups range {min(ratios):.2f}-{max(ratios):.2f}x (more than "
                       f"{BUSY_SPREAD - 1:.0%} apart)")
    if machine["busy_cores"] > BUSY_CORES:
        reasons.append(f"other processes kept {machine['busy_cores']:.2f} of its {machine['cores']} cores busy "
                       "just before the run")
    if not reasons:
        return None
    advice = ("on a shared machine --threads 1 keeps other work from slowing every step"
              if machine.get("threads") != 1 else "with 1 thread already, only less other work helps: wait for the "
              "load to fall, or give this run cores of its own (taskset -c)")
    return ("the machine is busy (" + "; ".join(reasons) + "): every step is slower and its timings and speedups are "
            f"unreliable; {advice} (RESULTS.md, \"A busy machine\")")

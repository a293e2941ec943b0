"""hsd_search: a draft chosen by measurement: which parts of the model it leaves out, its k and its stop rule.

  python hsd_search.py --model toy-falcon-h1 --out toys/toy-falcon-h1/draft.json    # minutes on 2 CPU cores
  python hsd.py --model toy-falcon-h1 --draft toys/toy-falcon-h1/draft.json --check

What it maximises: the cost model's predicted speedup of speculative decoding over plain decoding,

    S = tokens the rounds produce / what the rounds cost

over the rounds greedy decoding would run on a calibration text (a round makes its accepted drafts and the full
model's own next token, and costs d c + v[d] for d drafts), costs in units of one full decoding step (a plain step
costs 1): c, one draft step, composed from what leaving out each unit saves; v[d], a verify pass of d + 1
tokens; both measured on this machine at the calibration's context. How many tokens a round drafts and keeps comes
from a cheap estimate: one teacher-forced pass of the draft along the full model's own greedy continuations of
calibration prompts tells, at every position, whether the draft's greedy token is the full model's and how sure the
draft is of it (SWIFT's "matchness", with the draft's confidence); replaying rounds over that (replay) gives every k,
every stop rule, and k="auto" (hsd.auto_k itself) at the cost of a few list walks. A small model's greedy text
loops, which inflates acceptance, so the same estimate along real paragraphs of the text (the full model's choices
there) is reported beside it, and the winner is confirmed end to end on prompts the search never saw, whose
measured acceptance the estimate is compared with.

The steps, in the order main runs them:
  1. texts    calibration prompts and paragraphs, drawn (--seed) from the text but its last paragraphs; confirmation
              prompts from those last paragraphs
  2. costs    a full step; steps that leave out each kind of unit in all layers of a type (what one unit saves);
              verify passes of 1 to longest_round() drafts
  3. search   greedy, best first: from the full model, leave out the unit that raises S most, each candidate at its
              best k (1..8, or auto) and stop rule, until PATIENCE steps find no better draft; then, from the best
              of those and of the paper's drafts, leave out or put back one unit while that raises S. --method
              conflayers: ConfLayers' selection of layers instead (conflayers)
  4. confirm  end-to-end generations of the confirmation prompts, in turns with plain decoding: the winner and the
              paper's drafts (each at the fixed k the cost model prefers for it), their measured speedups, acceptance
              and c, and the estimate's error against them
  5. write    the draft file (--out), which hsd.py --draft FILE reads
Ctrl-C during the search writes the best draft found so far (unconfirmed) to --out and says so.
"""
import argparse
import hashlib
import json
import math
import os
import random
import signal
import statistics
import sys
import time
from collections import namedtuple

import torch
from huggingface_hub.utils import tqdm

import cost_model
import hsd
import hsd_eval
import models

KS = tuple(range(1, 9))                  # the fixed draft lengths a candidate is tried at, besides "auto"
STOPS = (None, 0.2, 0.4, 0.6, 0.8)       # stop rules tried: none, or stop after a draft less sure than this
PATIENCE = 3                             # search steps without a better draft before the search ends


# --- 1. The texts ---------------------------------------------------------------------------------------------------
Texts = namedtuple("Texts", "prompts paragraphs confirm sha256")


def calibration_texts(lines, tokenizer, seed, prompt_tokens, new_tokens, count, confirm):
    """Token ids: `count` calibration prompts (prompt_tokens each) and `count` paragraphs (prompt_tokens + new_tokens),
    drawn at random (seed) from the paragraphs long enough but the last `confirm`, whose beginnings are the
    confirmation prompts; and the sha256 of the text."""
    long = [ids for ids in (tokenizer.encode(line.strip()).ids for line in lines if line.strip())
            if len(ids) >= prompt_tokens + new_tokens]
    if len(long) < 2 * count + confirm:
        raise models.UsageError(f"the text has {len(long)} paragraphs of at least {prompt_tokens + new_tokens} tokens; "
                                f"the search needs {2 * count + confirm}: give a longer --text, or fewer --prompts")
    rest, held = long[:-confirm], long[-confirm:]
    drawn = random.Random(seed).sample(range(len(rest)), 2 * count)
    return Texts([rest[i][:prompt_tokens] for i in drawn[:count]],
                 [rest[i][:prompt_tokens + new_tokens] for i in drawn[count:]],
                 [ids[:prompt_tokens] for ids in held], hashlib.sha256("\n".join(lines).encode()).hexdigest())


def continuations(model, prompts, new_tokens):
    """Each prompt followed by the full model's own greedy continuation of new_tokens tokens (past an end of text,
    too, so that all are one length and go through the model as one batch): (count, prompt + new_tokens)."""
    rows = [p + hsd.generate(model, p, new_tokens, draft="none", eos_token_id=-1)[0] for p in prompts]
    return torch.tensor(rows, device=model.lm_head.weight.device)


# --- 2. The costs ---------------------------------------------------------------------------------------------------
Costs = namedtuple("Costs", "step saves v context")
# step: a full decoding step in seconds; saves[(unit, layer type)]: the share of a step that leaving out one such
# unit saves ("layers": a whole layer); v[d]: a verify pass of d + 1 tokens, in steps; context: where measured.

def longest_round():
    """The most drafts a round here can have: k="auto"'s largest, or ConfLayers' (its verify passes are measured)."""
    return max(hsd.AUTO_MAX, CONFLAYERS["k"])


def unit_kinds(config):
    """{(unit, layer type): the layers that have it}, unit one of "layers" and models.UNITS."""
    kinds = {}
    for i, layer_type in enumerate(config.layer_types):
        for unit in ("layers", *models.units_of(layer_type)):
            kinds.setdefault((unit, layer_type), []).append(i)
    return kinds


def step_ratios(model, calls, context, repeats):
    """Each call(cache) {name: call} timed against a full decoding step at a context: (the full step's median seconds,
    {name: the median over `repeats` turns of the call's time over that turn's full step}). In each turn a full step
    comes first and last and the calls in between, so that the machine's drift affects a call and the full step it is
    divided by alike; the cache is put back after each call; two turns warm up."""
    cache = models.Cache(model, context + longest_round() + 2)
    hsd.prefill(model, cache, [i % model.config.vocab_size for i in range(1, context + 1)])
    snap, full, ratios = hsd.snapshot(cache), [], {name: [] for name in calls}
    token = torch.tensor([[1]], device=cache.device)

    def seconds(call):
        t0 = hsd.clock(cache.device)
        call(cache)
        t = hsd.clock(cache.device) - t0
        hsd.restore(cache, snap)
        return t
    with torch.inference_mode():
        for turn in range(repeats + 2):
            before = seconds(lambda cache: model(token, cache))
            times = {name: seconds(call) for name, call in calls.items()}
            step = (before + seconds(lambda cache: model(token, cache))) / 2
            if turn >= 2:
                full.append(step)
                for name, t in times.items():
                    ratios[name].append(t / step)
    return statistics.median(full), {name: statistics.median(r) for name, r in ratios.items()}


def measure_costs(model, context, repeats):
    """Costs at a context: a step leaving out each kind of unit in all its layers, and verify passes, against a full
    decoding step."""
    token = torch.tensor([[1]], device=model.lm_head.weight.device)
    kinds = unit_kinds(model.config)
    calls = {kind: lambda cache, s=models.Skip(**{kind[0]: layers}): model(token, cache, skip=s)
             for kind, layers in kinds.items()}
    calls |= {d: lambda cache, d=d: hsd.verify(model, cache, 1, [1] * d) for d in range(1, longest_round() + 1)}
    step, r = step_ratios(model, calls, context, repeats)
    saves = {kind: (1 - r[kind]) / len(layers) for kind, layers in kinds.items()}
    return Costs(step, saves, {d: r[d] for d in range(1, longest_round() + 1)}, context)


def draft_cost(config, skip, costs):
    """c of a draft, composed: 1 minus what each unit it leaves out saves (a whole layer: the layer's saving)."""
    saved = 0.0
    for i, layer_type in enumerate(config.layer_types):
        if i in skip.layers:
            saved += costs.saves["layers", layer_type]
        else:
            saved += sum(costs.saves[unit, layer_type] for unit in models.units_of(layer_type) if i in getattr(skip, unit))
    return max(0.01, 1 - saved)


def measured_cost(model, skip, context, repeats):
    """c of a draft, measured: a draft step over a full step (step_ratios)."""
    token = torch.tensor([[1]], device=model.lm_head.weight.device)
    return step_ratios(model, {"draft": lambda cache: model(token, cache, skip=skip)}, context, repeats)[1]["draft"]


# --- The estimate: a teacher-forced pass of the draft, and the rounds replayed over it -----------------------------
Estimate = namedtuple("Estimate", "runs sure")
# per text and position: runs[j], how many drafts in a row from position j on are the full model's choices (at most
# longest_round()); sure[j], the draft's probability of its greedy token at j.

def full_choices(model, batch, start):
    """The full model's greedy choice at every position from start - 1 on: what position j's draft must equal."""
    return model(batch)[:, start - 1:-1].argmax(dim=-1)


@torch.inference_mode()
def estimate(model, batch, choices, skip, start):
    """One teacher-forced pass of the draft over batch (B, T): an Estimate per row, from position start - 1 on."""
    logits = model(batch, skip=skip)[:, start - 1:-1].float()
    sure, guess = torch.softmax(logits, dim=-1).max(dim=-1)
    agrees = (guess == choices).tolist()
    estimates = []
    for row, probabilities in zip(agrees, sure.tolist()):
        runs, run = [0] * len(row), 0
        for j in reversed(range(len(row))):               # run lengths, read from the end
            run = min(run + 1, longest_round()) if row[j] else 0
            runs[j] = run
        estimates.append(Estimate(runs, probabilities))
    return estimates


Replay = namedtuple("Replay", "tokens cost rounds drafted accepted")


def replay(estimates, k, stop, c, v):
    """The rounds greedy decoding runs over the estimated texts, as hsd.generate_steps runs them (k a number or "auto",
    the stop ending a round after a draft less sure than it): tokens made, their cost in full steps, rounds, drafts
    made and accepted. A round from position j drafts d tokens and keeps min(runs[j], d), then the full model's. How
    sure the draft is is known along the text only, so after its first wrong draft a round is taken to draft on to
    its k: drafts rejected anyway, counted at their cost (an estimate that errs on the slow side)."""
    tokens = cost = rounds = drafted = accepted = 0
    for e in estimates:
        j, n, plan = 0, len(e.runs), hsd.Plan(hsd.AUTO_START, 0, hsd.AUTO_PAUSE)
        while j < n:
            k_round = min(plan.k if k == "auto" else k, n - j - 1)
            if k_round == 0 or (k == "auto" and plan.plain > 0):
                d = a = 0
                tokens, cost = tokens + 1, cost + 1
            else:                  # after its first wrong draft the draft goes on along its own tokens, not the text's,
                d = 1              # whose confidences the estimate does not know: it is taken to draft on to k_round
                while d < k_round and (d > e.runs[j] + 1 or not (stop is not None and e.sure[j + d - 1] < stop)):
                    d += 1
                a = min(e.runs[j], d)
                tokens, cost, rounds = tokens + a + 1, cost + d * c + v[d], rounds + 1
                drafted, accepted = drafted + d, accepted + a
            if k == "auto":
                plan = hsd.auto_k(plan, d, a)
            j += a + 1
    return Replay(tokens, cost, rounds, drafted, accepted)


def speedup(r):
    return r.tokens / r.cost


# --- 3. The search --------------------------------------------------------------------------------------------------
Candidate = namedtuple("Candidate", "skip c k stop speedup text_speedup own text")
# a draft, its composed c, the k and stop it is best at, its predicted speedups on the model's own continuations and
# on the paragraphs, and the replays behind them

def evaluate(model, skip, data, costs, ks=(*KS, "auto"), stops=STOPS, paragraphs=False):
    """A draft at its best k and stop rule, by the predicted speedup on the model's own continuations; with
    paragraphs, also its prediction along the paragraphs (at that k and stop), else None there."""
    c = draft_cost(model.config, skip, costs)
    own = estimate(model, *data["own"], skip, data["start"])
    best = None
    for k in ks:
        for stop in stops:
            r = replay(own, k, stop, c, costs.v)
            if best is None or speedup(r) > speedup(best[2]):
                best = (k, stop, r)
    k, stop, r = best
    t = replay(estimate(model, *data["text"], skip, data["start"]), k, stop, c, costs.v) if paragraphs else None
    return Candidate(skip, c, k, stop, speedup(r), t and speedup(t), r, t)


def search_units(config):
    """Every unit a draft can leave out, as (field of models.Skip, layer): whole layers and their units."""
    return [(unit, i) for i, layer_type in enumerate(config.layer_types) for unit in ("layers", *models.units_of(
        layer_type))]


def with_unit(skip, unit, config):
    """skip, leaving out one more unit (field, layer); a layer all of whose units are left out is left out whole (the
    same computation, said plainly), and a whole layer replaces the units of it left out before."""
    field, i = unit
    sets = {f: set(getattr(skip, f)) for f in ("layers", *models.UNITS)}
    sets[field].add(i)
    if field == "layers" or all(i in sets[u] for u in models.units_of(config.layer_types[i])):
        sets = {f: s - {i} for f, s in sets.items()}
        sets["layers"].add(i)
    return models.Skip(**sets)


def toggled(skip, unit, config):
    """skip with one unit (field, layer) left out if it runs, or put back if it is left out."""
    field, i = unit
    if i not in getattr(skip, field):
        return with_unit(skip, unit, config)
    sets = {f: set(getattr(skip, f)) for f in ("layers", *models.UNITS)}
    sets[field].discard(i)
    return models.Skip(**sets)


def search(model, data, costs, starts, progress, best_so_far):
    """Greedy, best first: from the full model, leave out the unit that raises the predicted speedup most, until
    PATIENCE steps in a row find no better draft. Then, from the best of those and of `starts` (the paper's drafts,
    evaluated, which are the best so far until a better one is found), a local search: leave out or put back the one
    unit that raises it most, while one does.
    best_so_far(candidate, tried) hears of every new best (for Ctrl-C). Returns (the best candidate, how many were
    tried)."""
    current = evaluate(model, models.Skip(), data, costs)
    best = max([current, *starts], key=lambda c: c.speedup)
    remaining, misses, tried = search_units(model.config), 0, 1 + len(starts)
    best_so_far(best, tried)

    def better(candidate):
        nonlocal best
        if candidate.speedup > best.speedup:
            best = candidate
            best_so_far(best, tried)
            progress.set_postfix_str(f"best S {best.speedup:.3f}: {best.skip}"[:70])
            return True
        return False
    while remaining and misses < PATIENCE:
        step = [evaluate(model, with_unit(current.skip, unit, model.config), data, costs) for unit in remaining]
        tried += len(step)
        progress.update(len(step))
        i = max(range(len(step)), key=lambda i: step[i].speedup)
        current, chosen = step[i], remaining[i]
        remaining = [u for u in remaining if u != chosen and not (chosen[0] == "layers" and u[1] == chosen[1])]
        misses = 0 if better(current) else misses + 1
    units = search_units(model.config)
    progress.reset(total=tried + len(units))
    progress.update(tried)
    while True:                                               # the local search, from the best so far
        step = [evaluate(model, toggled(best.skip, unit, model.config), data, costs) for unit in units
                if not (unit[0] != "layers" and unit[1] in best.skip.layers)]
        tried += len(step)
        progress.total += len(step)
        progress.update(len(step))
        if not better(max(step, key=lambda c: c.speedup)):
            return best, tried


# --- ConfLayers (arXiv 2604.14612, code WA225/ConfLayers), as its code selects layers ------------------------------
# Its settings (eval.sh and its code's defaults): skip ratio 0.4, a search interval of 30 rounds, at most 100
# optimisations, stop when rounds accept more than 4 drafts at a rate above 0.95, confidences over the last 100 tokens,
# drafts of at most 25 tokens that stop below a confidence of 0.8. It knows whole layers only, and never the first
# or the last; a layer's "attention output" is here its token mixer's output (attention, Gated DeltaNet, or
# Falcon-H1's attention and Mamba-2 branches together), added to the residual stream as its MLP's output is.
CONFLAYERS = {"skip_ratio": 0.4, "interval": 30, "max_iterations": 100, "max_score": 0.95, "window": 100,
              "k": 25, "stop": 0.8}


def layer_confidences(model, cache, tokens):
    """ConfLayers' confidence of each layer 1..L-2 over tokens fed after the cache (left as it was): for its mixer's and
    its MLP's outputs h (T, D), 1 - H(softmax(h)) / log D, the entropy averaged over tokens; the two summed."""
    L, D = model.config.num_layers, model.config.hidden_size
    ids, snap, confidences = torch.tensor([tokens], device=cache.device), hsd.snapshot(cache), {}

    def residual(skip):                                       # the residual stream after the layers that run
        h = model.hidden_states(ids, cache, skip=skip, normed=False)[0].float()
        hsd.restore(cache, snap)
        return h

    def confidence(h):
        p = torch.softmax(h, dim=-1)
        return 1 - (-(p * torch.log(p + 1e-12)).sum(-1)).mean().item() / math.log(D)
    for i in range(1, L - 1):
        before = residual(models.Skip(layers=range(i, L)))
        mixed = residual(models.Skip(layers=range(i + 1, L), mlp={i}))
        after = residual(models.Skip(layers=range(i + 1, L)))
        confidences[i] = confidence(mixed - before) + confidence(after - mixed)
    return confidences


def conflayers_selection(confidences, lam, num_layers, qwen):
    """ConfLayers' find_skip_layers: the layers whose z-normalised confidence lies below their local window's mean
    minus lam standard deviations, the window widened where the confidence curve bends (its second derivative)."""
    layers = sorted(confidences)
    x = torch.tensor([confidences[i] for i in layers], dtype=torch.float64)
    x = (x - x.mean()) / (x.std(unbiased=False) + 1e-6)
    grad = torch.gradient(torch.gradient(x)[0])[0]
    count = next((j for j in range(len(grad)) if grad[j] != grad[0]), 0) or len(grad)   # leading equal values
    grad = (grad - grad.min()) / (grad.max() - grad.min() + 1e-8)
    mu, low, high = grad.mean(), grad.min(), grad.max()                                 # their adjust_to_mean_half
    if math.isclose(low, high):
        grad = torch.full_like(grad, 0.5)
    else:
        a = min(0.5 / (high - mu), -0.5 / (low - mu))
        grad = (a * grad + 0.5 - a * mu).clamp(0, 1)
    alpha = min(num_layers // 3, 5 * count) if qwen else 5 * count
    skipped = []
    for i in range(len(x)):
        half = (2 + int(alpha * grad[i] * ((i + 1) / num_layers))) // 2
        window = torch.cat([x[max(0, i - half):i], x[i + 1:i + half + 1]])
        threshold = window.mean() - lam * window.std(unbiased=False) if len(window) else 0
        if x[i] < threshold:
            skipped.append(layers[i])
    return skipped


@torch.inference_mode()
def conflayers(model, prompts, new_tokens, progress):
    """ConfLayers' loop: generate the calibration prompts speculatively with the current set of skipped layers; after
    the first `window` new tokens of a prompt, each round's acceptance counts; a new set comes from the confidences
    of the last `window` tokens whenever the counted rounds ask for one (mean accepted below 1 after half an
    interval, or an interval done); after an interval with more than 4 accepted per round at a rate above max_score
    it stops, and after max_iterations it takes the best set seen. Returns (the skipped layers, what it did)."""
    s, L = CONFLAYERS, model.config.num_layers
    skipped, lam, iterations, best, best_accepted = list(range(1, L - 1, 2)), 0.0, 0, [], 0.0
    least, optimise, done, log = int((L - 2) * s["skip_ratio"]) + 1, True, False, []
    scores, accepted_counts = [], []
    qwen = model.config.family in ("qwen2", "qwen3_5")
    for prompt in prompts:
        cache = models.Cache(model, len(prompt) + new_tokens + s["k"] + 1)
        hsd.prefill(model, cache, prompt[:-1])
        prompt_state = hsd.snapshot(cache)
        generated, pending = [], prompt[-1]
        hsd.prefill(model, cache, [pending])             # the prompt's state, all of it, for the confidence passes
        after_prompt = hsd.snapshot(cache)
        hsd.restore(cache, prompt_state)
        while len(generated) < new_tokens and not done:
            k = min(s["k"], new_tokens - len(generated) - 1)
            if k < 1:
                break
            drafts, a, pending = hsd.speculative_round(model, cache, pending, models.Skip(layers=skipped), k,
                                                       stop=s["stop"])
            generated += drafts[:a] + [pending]
            progress.update(a + 1)
            if len(generated) <= s["window"] + 1:
                continue
            scores.append(a / len(drafts))
            accepted_counts.append(a)
            if iterations and len(scores) == s["interval"] // 2 and len(skipped) >= least and \
                    statistics.mean(accepted_counts) < 1:
                scores, accepted_counts, optimise = [], [], True
            if iterations and len(scores) > s["interval"]:
                if len(skipped) >= least:
                    mean_accepted, rate = statistics.mean(accepted_counts), statistics.mean(scores)
                    if mean_accepted > 4 and rate > s["max_score"]:
                        done = True
                        log.append(f"stopped: {mean_accepted:.2f} accepted per round at a rate of {rate:.3f}")
                    elif mean_accepted > best_accepted:
                        best, best_accepted = list(skipped), mean_accepted
                optimise = not done
                scores, accepted_counts = [], []
            if (optimise or len(skipped) < least) and not done:
                snap = hsd.snapshot(cache)
                hsd.restore(cache, after_prompt)
                confidences = layer_confidences(model, cache, generated[-s["window"]:])
                hsd.restore(cache, snap)
                skipped = conflayers_selection(confidences, lam, L, qwen)
                share = len(skipped) / (L - 2)
                lam += 0.05 if share > s["skip_ratio"] + 0.25 else -0.05 if share < s["skip_ratio"] else 0.0
                iterations += 1
                log.append(f"iteration {iterations}: skip {skipped} ({share:.0%} of layers 1..{L - 2}), lambda "
                           f"{lam:.2f}")
                if iterations >= s["max_iterations"]:
                    skipped, done = best, True
                    log.append(f"{iterations} iterations: the best set seen, {best}")
                scores, accepted_counts, optimise = [], [], False
    if not done:
        log.append(f"the calibration prompts ran out before it stopped: the best set seen ({best or skipped})")
        skipped = best or skipped
    return sorted(skipped), log


# --- 4. The confirmation --------------------------------------------------------------------------------------------
@torch.inference_mode()
def generations_in_turns(model, prompts, drafts, new_tokens, repeats, temperature=0.0, seed=0, progress=None):
    """Plain decoding and each of drafts ({label: hsd.Draft}) on every prompt, `repeats` turns: in each turn every
    prompt in turn, and for each prompt every label in turn, so that a label's runs and plain decoding's of the same
    prompt lie seconds apart and the machine's drift affects both alike. {label: (tokens per second of each turn, the
    last turn's (tokens, statistics) per prompt)}, "plain" first. At a temperature, prompt i of a turn is seeded alike
    for all labels."""
    labels = {"plain": hsd.Draft("none", None, 1, None), **drafts}
    rates, runs = {label: [] for label in labels}, {}
    for turn in range(repeats):
        runs = {label: [] for label in labels}
        for i, prompt in enumerate(prompts):
            for label, draft in labels.items():
                runs[label].append(hsd.generate(model, prompt, new_tokens, draft=draft, temperature=temperature,
                                                seed=seed + 1000 * turn + i if temperature else None))
            if progress is not None:
                progress.update(1)
        for label in labels:
            rates[label].append(sum(s["new_tokens"] for _, s in runs[label]) / sum(s["decode_s"] for _, s in runs[label]))
    return {label: (rates[label], runs[label]) for label in labels}


def measured_row(rates, plain_rates, runs):
    """What generations measured: the speedup over plain decoding (median of the turns' ratios of tokens per second,
    and the ratios), rounds, drafts per round, accepted per round, alpha, plain steps (k="auto")."""
    stats = [s for _, s in runs]
    ratios = [rate / plain for rate, plain in zip(rates, plain_rates)]
    rounds, drafted, accepted, plain = (sum(s[x] for s in stats) for x in ("rounds", "drafted", "accepted",
                                                                           "plain_steps"))
    return {"speedup": statistics.median(ratios), "ratios": ratios, "tokens_per_s": statistics.median(rates),
            "rounds": rounds, "plain_steps": plain, "accepted_per_round": accepted / rounds if rounds else None,
            "drafted_per_round": drafted / rounds if rounds else None, "alpha": accepted / drafted if drafted else None}


def confirm(model, prompts, drafts, new_tokens, repeats, progress):
    """End-to-end generations of the confirmation prompts (generations_in_turns): {label: measured_row}, and each
    prompt's continuation by plain decoding."""
    runs = generations_in_turns(model, prompts, drafts, new_tokens, repeats, progress=progress)
    result = {label: measured_row(rates, runs["plain"][0], generated) for label, (rates, generated) in runs.items()}
    return result, [tokens for tokens, _ in runs["plain"][1]]


def estimate_error(model, candidate, prompts, tokens, costs, measured):
    """The estimate against what the confirmation measured: accepted per round predicted from the calibration, and
    from the same estimate made on the confirmation prompts' own continuations (its error there, the estimator's
    own), beside the accepted per round measured."""
    rows = [p + t for p, t in zip(prompts, tokens)]
    length = min(len(r) for r in rows)                    # an end of text may have cut some short
    start = len(prompts[0])
    batch = torch.tensor([r[:length] for r in rows], device=model.lm_head.weight.device)
    held = estimate(model, batch, full_choices(model, batch, start), candidate.skip, start) if length > start + 1 \
        else []
    r = replay(held, candidate.k, candidate.stop, candidate.c, costs.v) if held else None
    calibration = candidate.own.accepted / candidate.own.rounds if candidate.own.rounds else None
    there = r.accepted / r.rounds if r and r.rounds else None
    truth = measured["accepted_per_round"]
    return {"accepted_per_round": {"estimated_on_calibration": calibration, "estimated_on_these_prompts": there,
                                   "estimated_on_paragraphs": candidate.text.accepted / candidate.text.rounds
                                   if candidate.text.rounds else None, "measured": truth},
            "relative_error_on_these_prompts": (there - truth) / truth if there is not None and truth else None,
            "relative_error_from_calibration": (calibration - truth) / truth if calibration is not None and truth
            else None}


# --- 5. The draft file ----------------------------------------------------------------------------------------------
def draft_file(model, name, candidate, found_by):
    """The draft file's JSON object (hsd.read_draft_file reads it)."""
    return {"format": hsd.DRAFT_FORMAT, "model": {"name": name, **models.identity(model)},
            "skip": {field: sorted(getattr(candidate.skip, field)) for field in ("layers", *models.UNITS)},
            "k": candidate.k, "stop": None if candidate.stop is None else {"confidence": candidate.stop},
            "found_by": found_by}


def write_json(path, value):
    """Write value to path as JSON, through a file beside it and a rename: an interrupted write leaves no half file."""
    partial = f"{path}.partial"
    with open(partial, "w", encoding="utf-8") as f:
        json.dump(value, f, indent=1)
        f.write("\n")
    os.replace(partial, path)


def machine(model, dtype):
    device = model.lm_head.weight.device
    return {"device": models.device_name(device), "dtype": dtype, "threads": torch.get_num_threads(),
            "torch": torch.__version__}


# --- The command line -----------------------------------------------------------------------------------------------
def describe(label, c):
    k = f"k={c.k}" + (f", stop below {c.stop}" if c.stop is not None else "")
    return (f"{label:10} S {c.speedup:.3f} on its own continuations, {c.text_speedup:.3f} on paragraphs; c {c.c:.3f}, "
            f"{k}, {c.own.accepted / max(1, c.own.rounds):.2f} of {c.own.drafted / max(1, c.own.rounds):.2f} drafts "
            f"kept per round: skips {c.skip}")


def run(args, model, tokenizer):
    """The steps of the module docstring; returns what --json prints."""
    if args.out:
        cost_model.check_writable(args.out, "--out")
    lines = cost_model.read_lines(args.text, args.model)
    texts = calibration_texts(lines, tokenizer, args.seed, args.prompt_tokens, args.new_tokens, args.prompts,
                              args.confirm_prompts)
    context = args.prompt_tokens + args.new_tokens // 2
    t0 = time.time()
    print(f"hsd_search: {args.model}, method {args.method}, seed {args.seed}: {len(texts.prompts)} calibration prompts "
          f"and paragraphs of {args.prompt_tokens} + {args.new_tokens} tokens, {len(texts.confirm)} confirmation "
          "prompts", file=sys.stderr)
    hsd.warm_up(model, longest_round())                       # every verify length a round here can use
    costs = measure_costs(model, context, args.repeats * 7)
    start = args.prompt_tokens
    own = continuations(model, texts.prompts, args.new_tokens)
    text = torch.tensor(texts.paragraphs, device=own.device)
    data = {"own": (own, full_choices(model, own, start)), "text": (text, full_choices(model, text, start)),
            "start": start}
    paper = {name: evaluate(model, skip, data, costs, ks=KS, stops=(None,), paragraphs=True)      # fixed k, no stop
             for name, skip in hsd_eval.drafts_of(model.config).items()}
    found_by = {"method": args.method, "seed": args.seed, **machine(model, args.dtype),
                "date": time.strftime("%Y-%m-%d"),
                "calibration": {"text_sha256": texts.sha256, "prompts": len(texts.prompts),
                                "paragraphs": len(texts.paragraphs), "prompt_tokens": args.prompt_tokens,
                                "new_tokens": args.new_tokens, "context": context},
                "costs": {"step_ms": costs.step * 1e3, "v": costs.v,
                          "unit_saves": {f"{unit} of a {layer_type} layer": s
                                         for (unit, layer_type), s in costs.saves.items()}}}
    best = {}

    def best_so_far(candidate, tried):
        best.update(candidate=candidate, tried=tried)
    units = search_units(model.config)
    try:
        if args.method == "search":
            with tqdm(total=len(units) * (len(units) + 1) // 2, desc="candidates (at most)", file=sys.stderr) as progress:
                starts = [evaluate(model, c.skip, data, costs) for c in paper.values()]    # at any k, any stop
                winner, tried = search(model, data, costs, starts, progress, best_so_far)
            fixed = evaluate(model, winner.skip, data, costs, ks=KS)                # its best fixed k, for tables
            found_by["best_fixed"] = {"k": fixed.k, "stop": fixed.stop, "predicted_speedup": fixed.speedup}
            winner = evaluate(model, winner.skip, data, costs, ks=(winner.k,), stops=(winner.stop,), paragraphs=True)
            log = []
        else:
            with tqdm(total=len(texts.prompts) * args.conflayers_tokens, desc="ConfLayers' tokens",
                      file=sys.stderr) as progress:
                layers, log = conflayers(model, texts.prompts, args.conflayers_tokens, progress)
            skip = models.Skip(layers=layers)
            winner = evaluate(model, skip, data, costs, ks=(CONFLAYERS["k"],), stops=(CONFLAYERS["stop"],),
                              paragraphs=True)
            tried = len(log)
    except KeyboardInterrupt:
        if not (args.out and best):
            raise KeyboardInterrupt("nothing was written" + ("" if args.out else " (--out FILE saves the best draft "
                                                                                "found so far)")) from None
        found_by.update(interrupted=True, candidates_tried=best["tried"],
                        predicted_speedup=best["candidate"].speedup)
        write_json(args.out, draft_file(model, args.model, best["candidate"], found_by))
        raise KeyboardInterrupt(f"wrote the best draft found so far to {args.out} (predicted speedup "
                                f"{best['candidate'].speedup:.3f}, not confirmed)") from None
    labels = {"found": winner, **{name: c for name, c in paper.items()}}
    drafts = {label: hsd.Draft(label, c.skip, c.k, c.stop) for label, c in labels.items()}
    with tqdm(total=args.repeats * len(texts.confirm), desc="confirmation runs (prompts)",
              file=sys.stderr) as progress:
        measured, tokens = confirm(model, texts.confirm, drafts, args.new_tokens, args.repeats, progress)
    c_measured = {label: measured_cost(model, c.skip, context, args.repeats * 7) for label, c in labels.items()}
    errors = {label: estimate_error(model, c, texts.confirm, tokens, costs, measured[label])
              for label, c in labels.items()}
    found_by.update({
        "candidates_tried": tried, "seconds": round(time.time() - t0, 1), "log": log,
        "c": {"composed": winner.c, "measured": c_measured["found"]},
        "predicted_speedup": {"own_continuations": winner.speedup, "paragraphs": winner.text_speedup},
        "measured": {"speedup": measured["found"]["speedup"], "ratios": measured["found"]["ratios"],
                     "prompts": len(texts.confirm), "new_tokens": args.new_tokens, "repeats": args.repeats},
        "estimate": errors["found"],
        "paper_drafts": {label: {"k": c.k, "c": {"composed": c.c, "measured": c_measured[label]},
                                 "predicted_speedup": c.speedup, "measured_speedup": measured[label]["speedup"],
                                 "estimate": errors[label]} for label, c in paper.items()}})
    spec = draft_file(model, args.model, winner, found_by)
    if args.out:
        write_json(args.out, spec)
    for label, c in labels.items():
        print(describe(label, c))
        m = measured[label]
        print(f"{'':10} measured: speedup {m['speedup']:.3f} (turns {', '.join(f'{r:.2f}' for r in m['ratios'])}), "
              f"{m['accepted_per_round'] or 0:.2f} of {m['drafted_per_round'] or 0:.2f} drafts kept per round, "
              f"c {c_measured[label]:.3f}")
    print(*log, sep="\n")
    print(f"hsd_search: {tried} candidates in {time.time() - t0:.0f} s" +
          (f"; wrote {args.out}" if args.out else "; --out FILE writes the draft file"))
    return spec


def main(argv=None):
    p = argparse.ArgumentParser(description="Choose a draft by measurement: the units to leave out, k and the stop "
                                            "rule that maximise the cost model's predicted speedup.")
    p.error = lambda message: p.exit(2, f"hsd_search: error: {message} (see --help)\n")
    p.add_argument("--model", required=True, help=f"{', '.join([*models.TOYS, *models.OFFICIAL, *models.TINY])}, a "
                                                   "Hugging Face repo id or a folder")
    p.add_argument("--text", help="a UTF-8 text, a paragraph per line (default: as hsd_eval.py reads: the toys' "
                                  "held-out text, WikiText-2 for the others)")
    p.add_argument("--out", help="write the draft file here (hsd.py --draft FILE)")
    p.add_argument("--json", action="store_true", help="the draft file's object as one JSON line on stdout")
    p.add_argument("--method", default="search", choices=["search", "conflayers"])
    p.add_argument("--seed", type=int, default=0, help="which calibration prompts and paragraphs are drawn")
    p.add_argument("--prompts", type=int, default=8, help="calibration prompts, and as many paragraphs (default: 8)")
    p.add_argument("--confirm-prompts", type=int, default=8, help="held-out prompts of the confirmation (default: 8)")
    p.add_argument("--prompt-tokens", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=64, help="tokens continuing each prompt (default: 64)")
    p.add_argument("--conflayers-tokens", type=int, default=320, help="tokens ConfLayers generates per prompt")
    p.add_argument("--repeats", type=int, default=3, help="turns of the confirmation runs (default: 3)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = p.parse_args(argv)
    if min(args.prompts, args.confirm_prompts, args.prompt_tokens, args.new_tokens, args.repeats) < 1:
        p.error("--prompts, --confirm-prompts, --prompt-tokens, --new-tokens and --repeats must be at least 1")
    try:
        model = models.load(args.model, getattr(torch, args.dtype), args.device)
        spec = run(args, model, models.load_tokenizer(args.model))
    except models.UsageError as e:
        print(f"hsd_search: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        print(f"\nhsd_search: interrupted{': ' + str(e) if str(e) else ''}", file=sys.stderr)
        return 130
    if args.json:
        print(json.dumps(spec))
    return 0


if __name__ == "__main__":
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)     # output piped into `head` and the like: stop quietly
    sys.exit(main())

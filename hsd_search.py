"""hsd_search: a draft chosen by measurement: which parts of the model it leaves out, its k and its stop rule.

  python hsd_search.py --model toy-falcon-h1 --out toys/toy-falcon-h1/draft.json    # minutes on 2 CPU cores
  python hsd.py --model toy-falcon-h1 --draft toys/toy-falcon-h1/draft.json --check

What it maximises: the cost model's predicted speedup of speculative decoding over plain decoding,

    S = tokens the rounds produce / what the rounds cost

over the rounds decoding would run on calibration text (a round makes its accepted drafts and the full model's own
next token, and costs d c + v[d] for d drafts), costs in units of one full decoding step (a plain step costs 1): c,
one draft step; v[d], a verify pass of d + 1 tokens (fitted non-decreasing in d); both measured on this machine at
--context. How many tokens a round drafts and keeps comes from an acceptance estimate along the full model's own
continuations of calibration prompts (greedy, or sampled at --temperature), in two forms:
  - as generation drafts (generation_estimates): at every position the draft starts from the full model's state
    there (its KV and recurrent states after the tokens before it) and drafts up to the longest round, as
    hsd.speculative_round does; greedy: how many of its drafts in a row are the full model's tokens, and how sure it
    is of each; at a temperature T: each draft's expected acceptance 1 - TV(p_T, q_T). Replaying rounds over that
    (replay) gives every k, stop rule and k="auto" (hsd.auto_k itself); greedy, the replay is the rounds
    hsd.generate runs on the same continuation (up to near-ties that batched and single-row numerics break apart).
  - cheap (teacher_forced_estimates): one teacher-forced pass of the draft along the text, from its own states
    (SWIFT's "matchness"), which ranks the many candidates of the search; it is biased (either sign), so only the
    best REFINED of them and the paper's drafts go on to the first form and to measured costs.
A small model's greedy text loops, which inflates acceptance, so the estimate along real paragraphs of the text is
reported beside it, and the winner is confirmed end to end on test prompts, paragraphs the search never saw.

The steps, in the order run() calls them:
  1. calibration  cost_model's split of the text by paragraph index (its test paragraphs spread over the text);
                  calibration prompts and paragraphs drawn (--seed) from its calibration side, --test-prompts of its
                  test side; the full model's continuations of the calibration prompts (sampled at --temperature)
  2. unit costs   what leaving out each kind of unit saves (composed c: ranking only)
  3. search       greedy, best first, by the cheap estimate: from the full model, leave out the unit that raises S
                  most, each candidate at its best k (1..8, or auto) and stop rule, until PATIENCE steps find no
                  better draft; then leave out or put back one unit while that raises S (at most LOCAL_STEPS).
                  --method conflayers: ConfLayers' selection rule instead (its own section below)
  4. refine       the best REFINED candidates and the paper's drafts: c measured (cost_model.measure_costs, with
                  its noise), estimated as generation drafts; the winner is the best of them; its prediction at the
                  other temperature of TEMPERATURES and along paragraphs
  5. confirm      end-to-end generations of the test prompts, in turns with plain decoding: the winner and the
                  paper's drafts, their measured speedups with 95% intervals, the estimate's error in S; warnings
  6. write        the draft file (--out), which hsd.py --draft FILE reads
Ctrl-C during the search writes the best draft found so far (unconfirmed) to --out and says so.
"""
import argparse
import hashlib
import json
import math
import random
import signal
import statistics
import sys
import time
from collections import namedtuple

import torch

import cost_model
import drafts
import hsd
import models

KS = tuple(range(1, 9))                  # the fixed draft lengths a candidate is tried at, besides "auto"
STOPS = (None, 0.2, 0.4, 0.6, 0.8)       # stop rules tried: none, or stop after a draft less sure than this
PATIENCE = 3                             # greedy steps without a better draft before the greedy search ends
LOCAL_STEPS = 6                          # local-search steps at most after it
REFINED = 10                             # candidates estimated as generation drafts and measured
TEMPERATURES = (0.0, 0.6)                # the temperatures a draft file predicts its speedup at (the paper's two)


# --- 1. The calibration --------------------------------------------------------------------------------------------
Drawn = namedtuple("Drawn", "calibration followed held test")
# paragraph indices (cost_model.paragraphs'): calibration prompts and paragraphs followed along, and prompts held out
# of the search for its prediction (the winner of many candidates scores best on the prompts that chose it, so its
# score there is too high: its prediction is made on others), drawn from the calibration side of cost_model.split;
# and the test prompts the search confirms on, from its test side
class Calibration(namedtuple("Calibration", "continuations paragraphs start")):
    """continuations: (B, T) token ids, each calibration prompt and the full model's continuation of it (greedy, or
    sampled at the search's temperature); paragraphs: (B, T), real paragraphs of the text; start: the prompts'
    length."""

    def __repr__(self):
        return (f"Calibration(continuations {tuple(self.continuations.shape)}, paragraphs "
                f"{tuple(self.paragraphs.shape)}, start {self.start})")


def draw(split, seed, count, test):
    """Drawn from a cost_model.Split: `count` calibration prompts, `count` paragraphs and `count` held-out prompts
    (seed) from its calibration side, and `test` of its test paragraphs spread evenly over them (the search's short
    confirmation)."""
    if len(split.calibration) < 3 * count:
        raise models.UsageError(f"the text has {len(split.calibration)} calibration paragraphs long enough; the search "
                                f"needs {3 * count}: give a longer --text, or fewer --prompts")
    drawn = random.Random(seed).sample(split.calibration, 3 * count)
    step = len(split.test) / min(test, len(split.test))
    return Drawn(drawn[:count], drawn[count:2 * count], drawn[2 * count:],
                 [split.test[int(i * step)] for i in range(min(test, len(split.test)))])


@torch.inference_mode()
def continuations(model, prompts, new_tokens, temperature, seed):
    """Each prompt followed by the full model's continuation of new_tokens tokens, greedy or sampled at the
    temperature (seeded per prompt); past an end of text too, so that all are one length: (count, prompt + new)."""
    rows = [p + hsd.generate(model, p, new_tokens, draft="none", eos_token_id=-1, temperature=temperature,
                             seed=seed + i if temperature else None)[0] for i, p in enumerate(prompts)]
    return torch.tensor(rows, device=model.lm_head.weight.device)


def calibration(model, paragraphs, drawn, prompt_tokens, new_tokens, temperature, seed):
    """The Calibration of what was drawn: the continuations of its prompts, and its paragraphs cut to one length."""
    prompts = [paragraphs[i][:prompt_tokens] for i in drawn.calibration]
    text = torch.tensor([paragraphs[i][:prompt_tokens + new_tokens] for i in drawn.followed],
                        device=model.lm_head.weight.device)
    return Calibration(continuations(model, prompts, new_tokens, temperature, seed), text, prompt_tokens)


# --- 2. The costs --------------------------------------------------------------------------------------------------
def longest_round(method):
    """The most drafts a round can have: k="auto"'s largest, or ConfLayers' (its verify passes are measured too)."""
    return CONFLAYERS["k"] if method == "conflayers" else hsd.AUTO_MAX




def measure_costs(model, skips, context, turns, longest, temperature):
    """cost_model.measure_costs of hsd's passes: c of each of skips ({label: Skip}), v, their noise."""
    return cost_model.measure_costs(model, skips, context, turns, longest, temperature, passes=hsd.PASSES)


def unit_savings(model, context, turns, longest, temperature):
    """(Costs of steps leaving out each kind of unit in all layers of its type, {(unit, layer type): the share of a
    step leaving out one such unit saves}): what composed_cost composes."""
    kinds = cost_model.unit_kinds(model.config)
    costs = measure_costs(model, cost_model.unit_skips(model.config), context, turns, longest, temperature)
    return costs, {kind: (1 - costs.c[kind]) / len(layers) for kind, layers in kinds.items()}


def composed_cost(config, skip, savings):
    """c of a draft composed from unit_savings: 1 minus what each part it leaves out saves (no floor: a composition
    at or below 0 says the savings are noise, and the measured step (refine) decides)."""
    saved = 0.0
    for i, layer_type in enumerate(config.layer_types):
        if i in skip.layers:
            saved += savings["layers", layer_type]
        else:
            saved += sum(savings[unit, layer_type] for unit in models.units_of(layer_type) if i in getattr(skip, unit))
    return 1 - saved


# --- The acceptance estimate ---------------------------------------------------------------------------------------
class Estimate(namedtuple("Estimate", "accept sure")):
    """One text, from each position j on (a round whose pending token is the text's token j past the prompt):
    accept[j][m], the probability that draft m + 1 is accepted given drafts 1..m were (greedy: 1 or 0); sure[j][m],
    the draft's probability of its token m + 1 (1.0 where the cheap estimate does not know it: taken to draft on)."""

    def __repr__(self):
        first = [round(expected_accepted(a, len(a)), 2) for a in self.accept[:4]]
        return f"Estimate({len(self.accept)} positions; accepted in a row from the first: {first} ...)"


def text_lengths(rows, start, eos):
    """Per row, how many tokens past the prompt a generation makes: up to and including the first end of text."""
    lengths = []
    for row in rows[:, start:].tolist():
        lengths.append(row.index(eos) + 1 if eos in row else len(row))
    return lengths


def acceptance(logits_p, logits_q, chosen, temperature):
    """Per row (B,): the chance the full model accepts the draft's next token: greedy, whether the draft's argmax is
    the full model's choice `chosen`; at a temperature, 1 - TV(p_T, q_T). Also the draft's probability of its
    token (greedy: of its argmax; sampling: of `chosen`, the text's token) and its argmax."""
    if temperature == 0:
        q = torch.softmax(logits_q.float(), dim=-1)
        sure, guess = q.max(dim=-1)
        return (guess == chosen).double(), sure, guess
    p, q = hsd.probabilities(logits_p, temperature), hsd.probabilities(logits_q, temperature)
    return 1 - 0.5 * (p - q).abs().sum(-1), q.gather(-1, chosen.cpu()[:, None])[:, 0], chosen


@torch.inference_mode()
def teacher_forced_estimates(model, rows, skip, start, longest, temperature=0.0, eos=None, full=None):
    """The cheap estimate: one teacher-forced pass of the draft over rows (B, T), from its own states. Position j's
    drafts are taken to agree while the text's positions j, j+1, ... agree: [Estimate] per row, each up to its first
    end of text (eos: the model's by default, -1 none). full: the full model's logits over rows, if known."""
    full = (model(rows) if full is None else full)[:, start - 1:-1]                               # (B, n, V)
    drafted = model(rows, skip=skip)[:, start - 1:-1]
    chosen = rows[:, start:]
    estimates = []
    for b, n in enumerate(text_lengths(rows, start, model.config.eos_token_id if eos is None else eos)):
        agree, sure, _ = acceptance(full[b], drafted[b], chosen[b] if temperature else full[b].argmax(-1),
                                    temperature)
        agree, sure = agree.tolist()[:n], sure.tolist()[:n]
        accept, known = [agree[j:j + longest] for j in range(n)], []
        for a, s in zip(accept, (sure[j:j + longest] for j in range(n))):
            if temperature == 0 and 0.0 in a:             # past its first wrong draft a round drafts its own tokens,
                w = a.index(0.0)                          # whose confidences this pass does not see
                s = s[:w + 1] + [1.0] * (len(s) - w - 1)
            known.append(s)
        estimates.append(Estimate(accept, known))
    return estimates


@torch.inference_mode()
def generation_estimates(model, rows, skip, start, longest, temperature=0.0, eos=None, along_text=False):
    """The estimate as generation drafts: at every position j past the prompt of rows (B, T), the draft starts from
    the full model's state after the tokens before j (its KV and recurrent states), pending token rows[:, j], and
    drafts up to `longest` tokens; greedy it feeds its own tokens (as hsd.draft does), at a temperature or
    along_text the text's (a sampled continuation: acceptance in expectation; a real paragraph: the full model's
    choices along it, which its own continuation would not follow). Then the full model takes token j. [Estimate]
    per row, each up to its first end of text (eos: the model's by default, -1 none)."""
    B, T = rows.shape
    full = model(rows)                                                            # (B, T, V): p at every position
    cache = models.Cache(model, T + longest + 1, batch_size=B)
    if start > 1:
        model.hidden_states(rows[:, :start - 1], cache)
    lengths = text_lengths(rows, start, model.config.eos_token_id if eos is None else eos)
    lowest_stop = min(s for s in STOPS if s is not None)
    accept, sure = [[] for _ in range(B)], [[] for _ in range(B)]
    for t in range(start - 1, T - 1):
        snap, token = hsd.snapshot(cache), rows[:, t]
        a, s = [[] for _ in range(B)], [[] for _ in range(B)]
        going, wrong, unsure = torch.ones(B, dtype=torch.double), torch.zeros(B, dtype=torch.bool), torch.zeros(
            B, dtype=torch.bool)
        for m in range(min(longest, T - 1 - t)):
            logits = model(token[:, None], cache, skip=skip)[:, -1]               # (B, V) draft m + 1
            chosen = rows[:, t + m + 1] if temperature else full[:, t + m].argmax(-1)
            agree, probability, guess = acceptance(full[:, t + m], logits, chosen, temperature)
            agree, probability = agree.cpu(), probability.cpu()
            for b, (x, y) in enumerate(zip(agree.tolist(), probability.tolist())):
                a[b].append(x)
                s[b].append(y)
            going, wrong = going * agree, wrong | (agree == 0)
            unsure |= probability < lowest_stop
            if bool(((wrong & unsure) if temperature == 0 else going < 1e-4).all()):   # nothing more can count
                break
            token = rows[:, t + m + 1] if temperature or along_text else guess
        hsd.restore(cache, snap)
        model(rows[:, t:t + 1], cache)                                            # the full model takes token t
        for b in range(B):
            accept[b].append(a[b])
            sure[b].append(s[b])
    return [Estimate(accept[b][:n], sure[b][:n]) for b, n in enumerate(lengths)]


# --- The rounds replayed over an estimate --------------------------------------------------------------------------
Replay = namedtuple("Replay", "tokens cost rounds drafted accepted")


def is_unsure(probability, stop):
    """Whether a stop rule ends a round after a draft of this probability (no stop: never)."""
    return stop is not None and probability < stop


def drafts_in_round(sure, k, stop):
    """How many drafts a round of at most k makes: up to and including the first it is unsure of (as hsd.draft); sure
    may end early where no stop rule of STOPS could end a round later."""
    for d in range(1, min(k, len(sure)) + 1):
        if is_unsure(sure[d - 1], stop):
            return d
    return k


def expected_accepted(accept, d):
    """Drafts accepted in expectation of the first d: sum over i of P(drafts 1..i all accepted)."""
    total, chance = 0.0, 1.0
    for a in accept[:d]:
        chance *= a
        total += chance
    return total


def replay(estimates, k, stop, c, v):
    """The rounds decoding runs over the estimated texts, as hsd.generate_steps runs them (k a number or "auto", the
    stop ending a round after a draft less sure than it): tokens made, their cost in full steps, rounds, drafts made
    and accepted. At a temperature a round keeps its expected accepted drafts and the replay moves on by as many."""
    tokens = cost = rounds = drafted = accepted = 0
    below = cost_model.pause_below((c, v)) if k == "auto" else 0.0       # where -k auto pauses, as generate does
    for e in estimates:
        j, n, plan = 0.0, len(e.accept), hsd.Plan(hsd.AUTO_START, 0, hsd.AUTO_PAUSE)
        while int(j) < n:
            i = int(j)
            k_round = min(plan.k if k == "auto" else k, n - i - 1)
            if k_round == 0 or (k == "auto" and plan.plain > 0):
                d, a = 0, 0
                tokens, cost = tokens + 1, cost + 1
            else:
                d = drafts_in_round(e.sure[i], k_round, stop)
                a = expected_accepted(e.accept[i], d)
                tokens, cost, rounds = tokens + a + 1, cost + cost_model.round_cost(d, c, v), rounds + 1
                drafted, accepted = drafted + d, accepted + a
            if k == "auto":
                plan = hsd.auto_k(plan, d, round(a), below)
            j += a + 1
    return Replay(tokens, cost, rounds, drafted, accepted)


def speedup(r):
    """The speedup a Replay predicts: tokens made over what their rounds cost (cost_model's predicted speedup)."""
    return r.tokens / r.cost


Candidate = namedtuple("Candidate", "skip draft_cost k stop speedup replayed")
# a draft, the c its prediction used, the k and stop rule it is best at, its predicted speedup there, and the Replay
# behind that prediction


def best_plan(skip, estimates, draft_cost, v, ks, stops):
    """A draft at the k and stop rule (of ks and stops) whose replay predicts the highest speedup: a Candidate."""
    best = None
    for k in ks:
        for stop in stops:
            r = replay(estimates, k, stop, draft_cost, v)
            if best is None or speedup(r) > best.speedup:
                best = Candidate(skip, draft_cost, k, stop, speedup(r), r)
    return best


def planned(skip, estimates, draft_cost, v, k, stop):
    """A draft at a given k and stop rule: a Candidate."""
    return best_plan(skip, estimates, draft_cost, v, (k,), (stop,))


# --- 3. The search -------------------------------------------------------------------------------------------------
class Search(namedtuple("Search", "model calibration full savings v longest temperature")):
    """What ranking a draft needs: full, the full model's logits over the calibration's continuations (B, T, V);
    savings, unit_savings'; v, the verify passes' costs; longest, the most drafts a round makes."""

    def __repr__(self):
        return (f"Search({self.calibration!r}, {len(self.savings)} unit savings, longest {self.longest}, temperature "
                f"{self.temperature:g})")


def rank(search, skip, ks=(*KS, "auto"), stops=STOPS):
    """A draft by the cheap estimate and its composed c, at its best k and stop rule: a Candidate."""
    s = search
    estimates = teacher_forced_estimates(s.model, s.calibration.continuations, skip, s.calibration.start, s.longest,
                                         s.temperature, full=s.full)
    return best_plan(skip, estimates, composed_cost(s.model.config, skip, s.savings), s.v, ks, stops)


def leavable(config):
    """Every (field of models.Skip, layer) a draft can leave out: whole layers and their units."""
    return [(field, i) for i, layer_type in enumerate(config.layer_types)
            for field in ("layers", *models.units_of(layer_type))]


def fields_of(skip):
    return {field: set(getattr(skip, field)) for field in ("layers", *models.UNITS)}


def with_part(skip, part, config):
    """skip, leaving out one more part (field, layer); a layer all of whose units are left out is left out whole (the
    same computation, said plainly), and a whole layer replaces the units of it left out before."""
    field, i = part
    sets = fields_of(skip)
    sets[field].add(i)
    if field == "layers" or all(i in sets[u] for u in models.units_of(config.layer_types[i])):
        sets = {f: s - {i} for f, s in sets.items()}
        sets["layers"].add(i)
    return models.Skip(**sets)


def toggled(skip, part, config):
    """skip with one part (field, layer) left out if it runs, or put back if it is left out."""
    field, i = part
    if i not in getattr(skip, field):
        return with_part(skip, part, config)
    sets = fields_of(skip)
    sets[field].discard(i)
    return models.Skip(**sets)


def within_skipped_layer(part, skip):
    """Whether part is a unit of a layer skip leaves out whole (toggling it would change nothing)."""
    return part[0] != "layers" and part[1] in skip.layers


def search(s, starts, progress, on_best):
    """Greedy, best first: from the full model, leave out the part that raises the predicted speedup most, until
    PATIENCE steps in a row find no better draft. Then, from the best of those and of `starts` (the paper's drafts,
    ranked), a local search: leave out or put back the one part that raises it most, while one does (at most
    LOCAL_STEPS steps). progress(done, total) hears how many candidates were ranked of at most how many (the bound
    only falls, so the share done only grows); on_best(candidate, tried) hears of every new best (for Ctrl-C).
    Returns ({skip: Candidate} of every candidate ranked, the best)."""
    parts, ranked, done = leavable(s.model.config), {}, 0
    bound = 1 + greedy_bound(len(parts)) + LOCAL_STEPS * len(parts)

    def ranked_step(skips):
        step = [rank(s, skip) for skip in skips]
        ranked.update((cand.skip, cand) for cand in step)
        return step
    current = ranked_step([models.Skip()])[0]
    done += 1
    progress(done, bound)
    ranked.update((cand.skip, cand) for cand in starts)
    best = max(starts, key=lambda cand: cand.speedup, default=None)   # the full model is the search's start, no draft
    if best is not None:
        on_best(best, len(ranked))
    remaining, misses = parts, 0
    while remaining and misses < PATIENCE:
        step = ranked_step([with_part(current.skip, part, s.model.config) for part in remaining])
        i = max(range(len(step)), key=lambda i: step[i].speedup)
        current, chosen = step[i], remaining[i]
        remaining = [p for p in remaining if p != chosen and not (chosen[0] == "layers" and p[1] == chosen[1])]
        done += len(step)
        progress(done, done + greedy_bound(len(remaining)) + LOCAL_STEPS * len(parts))
        if best is None or current.speedup > best.speedup:
            best, misses = current, 0
            on_best(best, len(ranked))
        else:
            misses += 1
    for steps_left in reversed(range(LOCAL_STEPS)):
        step = ranked_step([toggled(best.skip, part, s.model.config) for part in parts
                            if not within_skipped_layer(part, best.skip)])
        done += len(step)
        challenger = max(step, key=lambda cand: cand.speedup)
        if challenger.speedup <= best.speedup:
            break
        best = challenger
        on_best(best, len(ranked))
        progress(done, done + steps_left * len(parts))
    progress(done, done)
    return ranked, best


def greedy_bound(remaining):
    """The most candidates the greedy steps rank from `remaining` parts on: each step one per part, one part fewer."""
    return remaining * (remaining + 1) // 2


# --- ConfLayers (arXiv 2604.14612, code WA225/ConfLayers), a baseline: its selection rule, offline -------------------
# What runs here: its rule for choosing layers, run once before decoding on the calibration prompts, with hsd's chain
# verification (its code verifies a tree, re-selects at the start of every prompt and adapts during evaluation).
# Its settings (eval.sh and its code's defaults): skip ratio 0.4, lambda starting at 0.25 (eval.sh's LAMBDA), a
# search interval of 30 rounds, at most 100 optimisations, stop when rounds accept more than 4 drafts at a rate above
# 0.95, confidences over the last 100 tokens, drafts of at most 25 tokens that stop below a confidence of 0.8; the
# paper's budget: 100 prompts of 512 new tokens. It knows whole layers only, and never the first or the last; a
# layer's "attention output" is here its token mixer's output (attention, Gated DeltaNet, or Falcon-H1's attention and
# Mamba-2 branches together), added to the residual stream as its MLP's output is.
CONFLAYERS = {"skip_ratio": 0.4, "lambda": 0.25, "interval": 30, "max_iterations": 100, "max_score": 0.95,
              "window": 100, "k": 25, "stop": 0.8, "paper_prompts": 100, "paper_new_tokens": 512}
CONFLAYERS_DESCRIBED = "ConfLayers' selection rule, offline, chain verification"


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


def next_lambda(lam, share):
    """ConfLayers' lambda after a selection that skipped `share` of the eligible layers: up 0.05 above the band
    (skip ratio + 0.25), down 0.05 below the skip ratio."""
    s = CONFLAYERS
    return lam + 0.05 if share > s["skip_ratio"] + 0.25 else lam - 0.05 if share < s["skip_ratio"] else lam


ConfLayersResult = namedtuple("ConfLayersResult", "layers converged iterations log")


@torch.inference_mode()
def conflayers(model, prompts, new_tokens, progress):
    """ConfLayers' loop: generate the calibration prompts speculatively with the current set of skipped layers; after
    the first `window` new tokens of a prompt, each round's acceptance counts; a new set comes from the confidences
    of the last `window` tokens whenever the counted rounds ask for one (mean accepted below 1 after half an
    interval, or an interval done); after an interval with more than 4 accepted per round at a rate above max_score
    it stops (converged), and after max_iterations it takes the best set seen. progress(done, total): tokens
    generated of the calibration's. Returns a ConfLayersResult."""
    s, L = CONFLAYERS, model.config.num_layers
    skipped, lam, iterations, best, best_accepted = list(range(1, L - 1, 2)), s["lambda"], 0, [], 0.0
    least, optimise, done, log = int((L - 2) * s["skip_ratio"]) + 1, True, False, []
    scores, accepted_counts, converged = [], [], False
    qwen = model.config.family in ("qwen2", "qwen3_5")
    total, made = len(prompts) * new_tokens, 0
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
            progress(made + len(generated), total)
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
                        done = converged = True
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
                lam = next_lambda(lam, share)
                iterations += 1
                log.append(f"iteration {iterations}: skip {skipped} ({share:.0%} of layers 1..{L - 2}), lambda "
                           f"{lam:.2f}")
                if iterations >= s["max_iterations"]:
                    skipped, done = best, True
                    log.append(f"{iterations} iterations: the best set seen, {best}")
                scores, accepted_counts, optimise = [], [], False
        made += new_tokens
    progress(total, total)
    if not done:
        log.append(f"the calibration prompts ran out before it stopped: the best set seen ({best or skipped})")
        skipped = best or skipped
    return ConfLayersResult(sorted(skipped), converged, iterations, log)


# --- 4. Refine: the finalists estimated as generation drafts, with measured costs ---------------------------------
def finalists(ranked, paper, count):
    """The best `count` distinct drafts ranked by the cheap estimate, then the paper's drafts: {label: Skip}."""
    best = sorted(ranked.values(), key=lambda cand: -cand.speedup)
    labels = {f"candidate {i + 1}": cand.skip for i, cand in enumerate(
        [cand for cand in best if cand.skip not in paper.values() and cand.skip != models.Skip()][:count])}
    return {**labels, **paper}


def refine(model, rows, start, skips, costs, longest, temperature, progress, plans=None):
    """Each of skips ({label: Skip}) estimated as generation drafts along rows, with its measured c: ({label:
    Candidate at its best k and stop rule, or at plans[label] = (k, stop) where given}, {label: Candidate at its best
    fixed k}); at a temperature without stops (the estimate of a stop there is rough)."""
    refined, fixed = {}, {}
    stops = STOPS if temperature == 0 else (None,)
    for i, (label, skip) in enumerate(skips.items()):
        estimates = generation_estimates(model, rows, skip, start, longest, temperature)
        fixed[label] = best_plan(skip, estimates, costs.c[label], costs.v, KS, stops)
        if plans and label in plans:
            refined[label] = planned(skip, estimates, costs.c[label], costs.v, *plans[label])
        else:
            refined[label] = best_plan(skip, estimates, costs.c[label], costs.v, (*KS, "auto"), stops)
        progress(i + 1, len(skips))
    return refined, fixed


# --- 5. Confirm: generations of the test prompts ------------------------------------------------------------------
def estimate_error(predicted, measured):
    """The estimate against the confirmation: accepted drafts per round and S, predicted and measured, and the
    relative error of each."""
    def error(p, m):
        return (p - m) / m if p is not None and m else None
    r = predicted.replayed
    p_accepted = r.accepted / r.rounds if r.rounds else None
    return {"accepted_per_round": {"predicted": p_accepted, "measured": measured["accepted_per_round"],
                                   "relative_error": error(p_accepted, measured["accepted_per_round"])},
            "speedup": {"predicted": predicted.speedup, "measured": measured["speedup"],
                        "relative_error": error(predicted.speedup, measured["speedup"])}}


def contradicted(predicted, measured):
    """Whether a measurement contradicts a prediction: outside the measurement's interval and more than 10% off."""
    low, high = measured["speedup_ci"]
    return not low <= predicted <= high and abs(predicted - measured["speedup"]) > 0.1 * measured["speedup"]


def warnings_of(winner, predicted, runner_up, measured, paper_labels, costs, state, composed_c):
    """The loud warnings of a search: its draft measured below plain decoding or below a paper draft it measured, its
    prediction contradicted by its measurement, its measured c far from its composed one (one measurement gone wrong:
    the winner of many noisy measurements is often the luckiest), costs too noisy to rank the finalists, a busy
    machine. predicted: the draft file's prediction (made on prompts held out of the search)."""
    found, said = measured["found"], []
    if found["speedup"] < 1:
        said.append(f"the draft measured {found['speedup']:.3f}x plain decoding: slower than no draft")
    for label in paper_labels:
        if measured[label]["speedup"] > found["speedup"]:
            said.append(f"the draft measured {found['speedup']:.3f}x, the paper's {label} draft "
                        f"{measured[label]['speedup']:.3f}x: a paper draft is faster")
    if contradicted(predicted, found):
        low, high = found["speedup_ci"]
        said.append(f"predicted {predicted:.3f}x, measured {found['speedup']:.3f}x [{low:.3f}, {high:.3f}]: the "
                    "prediction does not hold")
    if abs(winner.draft_cost - composed_c) > 0.25 * composed_c:
        said.append(f"the draft's c measured {winner.draft_cost:.3f}, composed from its units {composed_c:.3f}: one of "
                    "them is wrong (a busy machine?); search again on an idle one")
    noise = max(costs.noise["c"].values())
    if runner_up is not None and winner.speedup - runner_up.speedup < noise * winner.speedup:
        said.append(f"costs moved by up to {noise:.1%} between the halves of their turns, more than the "
                    f"{1 - runner_up.speedup / winner.speedup:.1%} between the two best drafts' predicted speedups: "
                    "the machine is too busy to rank them")
    busy = cost_model.busy_warning(state, found["turn_speedups"])
    return said + ([busy] if busy else [])


# --- 6. The draft file ---------------------------------------------------------------------------------------------
def draft_file(model, name, candidate, found_by):
    """The draft file's JSON object (drafts.read_draft_file reads it)."""
    return drafts.draft_file(name, drafts.identity(model), candidate.skip, candidate.k, candidate.stop, found_by)


# --- The command line ----------------------------------------------------------------------------------------------
class Progress:
    """A progress line on stderr: `label: done/total (percent), about N s left`, or with bounded=True (a total that
    is a bound, which falls as the work learns it needs less) `label: done of at most total, at most N s left`. The
    callers' done only grows and their total only falls, so the line never goes back. Called as progress(done,
    total), or update(n) with a total given at the start (cost_model.generations_in_turns calls update(1))."""

    def __init__(self, label, total=None, bounded=False, stream=None):
        self.label, self.total, self.bounded, self.done = label, total, bounded, 0
        self.stream = stream or sys.stderr
        self.t0 = time.time()

    def __call__(self, done, total):
        self.done, self.total, elapsed = done, total, time.time() - self.t0
        if done >= total:
            self.stream.write(f"\r{self.label}: {done} in {elapsed:.0f} s{' ' * 40}\n")
        else:
            left = elapsed / done * (total - done) if done else None
            if self.bounded:
                self.stream.write(f"\r{self.label}: {done} of at most {total}"
                                  f"{f', at most about {left:.0f} s left' if left is not None else ''}   ")
            else:
                self.stream.write(f"\r{self.label}: {done}/{total} ({done / total:.0%})"
                                  f"{f', about {left:.0f} s left' if left is not None else ''}   ")
        self.stream.flush()

    def update(self, n):
        self(self.done + n, self.total)


def describe_candidate(label, cand):
    k = f"k={cand.k}" + (f", stop below {cand.stop}" if cand.stop is not None else "")
    r = cand.replayed
    return (f"{label:12} S {cand.speedup:.3f}; c {cand.draft_cost:.3f}, {k}, {r.accepted / max(1, r.rounds):.2f} of "
            f"{r.drafted / max(1, r.rounds):.2f} drafts kept per round: skips {cand.skip}")


def describe_measured(m, c):
    low, high = m["speedup_ci"]
    return (f"{'':12} measured: speedup {m['speedup']:.3f} [{low:.3f}, {high:.3f}], {m['accepted_per_round'] or 0:.2f} "
            f"of {m['drafts_per_round'] or 0:.2f} drafts kept per round, c {c:.3f}")


def texts(args, tokenizer):
    """Step 1's text: ({paragraph index: token ids}, the cost_model.Split, what the search Drawn from it, the text's
    sha256)."""
    lines = cost_model.read_lines(args.text, args.model)
    paragraphs = cost_model.paragraphs(lines, tokenizer)
    split = cost_model.split(paragraphs, args.prompt_tokens + args.new_tokens)
    drawn = draw(split, args.seed, args.prompts, args.test_prompts)
    if any(len(paragraphs[i]) < args.prompt_tokens for i in drawn.test):
        raise models.UsageError(f"--prompt-tokens {args.prompt_tokens} is longer than a test paragraph: give at most "
                                f"{min(len(paragraphs[i]) for i in drawn.test)}")
    return paragraphs, split, drawn, hashlib.sha256("\n".join(lines).encode()).hexdigest()


def choose(args, model, calib, savings_costs, savings, paper, on_best):
    """Steps 3 and 4: (the winner's label, {label: Candidate} of the finalists, the winner at its best fixed k, their
    Costs, candidates ranked, what ConfLayers did or None)."""
    longest = longest_round(args.method)
    rows = calib.continuations
    with torch.inference_mode():
        s = Search(model, calib, model(rows), savings, savings_costs.v, longest, args.temperature)
    if args.method == "search":
        stops = STOPS if args.temperature == 0 else (None,)
        starts = [rank(s, skip, stops=stops) for skip in paper.values()]
        ranked, _ = search(s, starts, Progress("search: candidates ranked", bounded=True), on_best)
        skips, plans, ran = finalists(ranked, paper, REFINED), None, None
    else:
        ran = conflayers(model, [row[:calib.start] for row in rows.tolist()], args.conflayers_tokens,
                         Progress("ConfLayers: tokens generated", bounded=True))
        skips = {"conflayers": models.Skip(layers=ran.layers), **paper}
        plans, ranked = {"conflayers": (CONFLAYERS["k"], CONFLAYERS["stop"])}, {}
        on_best(planned(skips["conflayers"], teacher_forced_estimates(model, rows, skips["conflayers"], calib.start,
                                                                      longest, args.temperature),
                        composed_cost(model.config, skips["conflayers"], savings), s.v, *plans["conflayers"]), 1)
    costs = measure_costs(model, skips, args.context, args.repeats * 7, longest, args.temperature)
    refined, fixed = refine(model, rows, calib.start, skips, costs, longest, args.temperature,
                            Progress("refine: finalists estimated as generation drafts"), plans)
    own = {label: cand for label, cand in refined.items() if label not in paper}
    label = max(own, key=lambda label: own[label].speedup)
    return label, refined, fixed[label], costs, len(ranked) or 1, ran


def predictions(args, model, winner, calib, held, label):
    """The winner's predicted speedup at each of TEMPERATURES, made on what did not choose it: along the full
    model's continuations of the held-out prompts (greedy, or sampled at that temperature) with its costs measured
    afresh there (the finalists' own measurement favours the luckiest); and along the calibration's paragraphs:
    ({"0": S, "0.6": S}, {"0": S along paragraphs}, {temperature: Costs})."""
    longest, at, fresh = longest_round(args.method), {}, {}
    for t in TEMPERATURES:
        here = fresh[t] = measure_costs(model, {label: winner.skip}, args.context, args.repeats * 7, longest, t)
        rows = continuations(model, held, args.new_tokens, t, args.seed + 20_000)
        estimates = generation_estimates(model, rows, winner.skip, calib.start, longest, t)
        at[f"{t:g}"] = planned(winner.skip, estimates, here.c[label], here.v, winner.k, winner.stop).speedup
    costs = fresh[args.temperature]
    along = generation_estimates(model, calib.paragraphs, winner.skip, calib.start, longest, 0.0, along_text=True)
    return at, {"0": planned(winner.skip, along, costs.c[label], costs.v, winner.k, winner.stop).speedup}, fresh


def confirm(args, model, test, labelled, costs):
    """Step 5: generations of the test prompts ({label: measured_row}) and the estimate made on the test prompts'
    own continuations ({label: Candidate}), whose error is the estimator's own."""
    draft_of = {label: hsd.Draft(label, cand.skip, cand.k, cand.stop) for label, cand in labelled.items()}
    runs = cost_model.generations_in_turns(hsd.generate, model, test, draft_of, args.new_tokens, args.repeats,
                                           args.temperature, args.seed,
                                           Progress("confirm: test prompts x turns", args.repeats * len(test)))
    measured = {label: cost_model.measured_row(runs[label], runs["plain"], cand.draft_cost, costs.v)
                for label, cand in labelled.items()}
    rows = continuations(model, test, args.new_tokens, args.temperature, args.seed + 10_000)
    there = {label: planned(cand.skip, generation_estimates(model, rows, cand.skip, len(test[0]),
                                                            longest_round(args.method), args.temperature),
                            cand.draft_cost, costs.v, cand.k, cand.stop) for label, cand in labelled.items()}
    return measured, there


def run(args, model, tokenizer):
    """The steps of the module docstring; returns the draft file's object (what --json prints)."""
    if args.out:
        cost_model.check_writable(args.out, "--out")
    paragraphs, split, drawn, sha256 = texts(args, tokenizer)
    if not args.out:
        print("hsd_search: no --out: the draft is printed, not written (--out FILE writes the draft file)",
              file=sys.stderr)
    t0 = time.time()
    calib = calibration(model, paragraphs, drawn, args.prompt_tokens, args.new_tokens, args.temperature, args.seed)
    test = [paragraphs[i][:args.prompt_tokens] for i in drawn.test]
    print(f"hsd_search: {args.model}, method {args.method}, temperature {args.temperature:g}, seed {args.seed}: "
          f"{len(drawn.calibration)} calibration prompts and paragraphs of {args.prompt_tokens} + {args.new_tokens} "
          f"tokens, {len(test)} test prompts; costs at {args.context} tokens of context", file=sys.stderr)
    state = cost_model.machine_state(model, args.dtype)      # before measuring: the load of others, not ours
    if cost_model.busy_warning(state):
        print(f"hsd_search: WARNING: {cost_model.busy_warning(state)}", file=sys.stderr)
    longest = longest_round(args.method)
    cost_model.warm_up(model, longest)                        # every verify length a round here can use
    savings_costs, savings = unit_savings(model, args.context, args.repeats * 7, longest, args.temperature)
    paper = drafts.paper_skips(model.config)
    found_by = found_by_start(args, state, split, drawn, sha256)
    best = {}
    try:
        label, refined, fixed, costs, tried, ran = choose(args, model, calib, savings_costs, savings, paper,
                                                          lambda cand, tried: best.update(candidate=cand, tried=tried))
    except KeyboardInterrupt:
        interrupted(args, model, found_by, best)
    winner = refined[label]
    labelled = {"found": winner, **{name: refined[name] for name in paper}}
    held = [paragraphs[i][:args.prompt_tokens] for i in drawn.held]
    at, along, fresh = predictions(args, model, winner, calib, held, label)
    measured, there = confirm(args, model, test, labelled, costs)
    others = sorted((cand for lab, cand in refined.items() if lab not in paper and cand is not winner),
                    key=lambda cand: -cand.speedup)
    composed = {lab: composed_cost(model.config, cand.skip, savings) for lab, cand in refined.items()}
    said = warnings_of(winner, at[f"{args.temperature:g}"], others[0] if others else None, measured, list(paper),
                       costs, state, composed[label])
    found_by.update(found_by_end(args, winner, label, refined, costs, fresh[args.temperature], composed, measured,
                                 there, at, along, tried, ran, said, paper, time.time() - t0))
    found_by["best_fixed"] = {"k": fixed.k, "stop": fixed.stop, "predicted_speedup": fixed.speedup}   # hsd_bench
    spec = draft_file(model, args.model, winner, found_by)
    if args.out:
        drafts.write_draft_file(args.out, spec)
    print(f"hsd_search: the file's prediction, on {len(held)} prompts held out of the search with its costs measured "
          "afresh: " + ", ".join(f"{speedup:.3f}x at T={t}" for t, speedup in at.items()))
    report(labelled, {"found": costs.c[label], **{name: costs.c[name] for name in paper}}, measured, ran, said, tried,
           t0, args.out)
    return spec


def found_by_start(args, state, split, drawn, sha256):
    """What the draft file records of how it was searched, known before the search: paragraphs by index
    (cost_model.paragraphs'), the test split's whole and the part of it the search confirmed on."""
    return {"method": args.method, "seed": args.seed, "temperature": args.temperature, **state,
            "date": time.strftime("%Y-%m-%d"),
            "calibration": {"text_sha256": sha256, "calibration_paragraphs": drawn.calibration,
                            "followed_paragraphs": drawn.followed, "predicted_on_paragraphs": drawn.held,
                            "confirmed_on_paragraphs": drawn.test,
                            "test_paragraphs": split.test, "prompt_tokens": args.prompt_tokens,
                            "new_tokens": args.new_tokens}}


def found_by_end(args, winner, label, refined, costs, fresh, composed, measured, there, at, along, tried, ran, said,
                 paper, seconds):
    """What the draft file records of what the search found, measured and warned of; its costs (which -k auto reads)
    and its prediction those measured afresh after the search chose it (fresh), the finalists' those they were
    chosen by (costs)."""
    return {
        "candidates_tried": tried, "seconds": round(seconds, 1),
        "costs": {"c": fresh.c[label], "v": {str(d): fresh.v[d] for d in range(1, len(fresh.v))},
                  "context": fresh.context, "temperature": args.temperature, "threads": torch.get_num_threads(),
                  "noise": fresh.noise["c"][label], "composed_c": composed[label], "step_ms": fresh.step_s * 1e3,
                  "c_when_chosen": costs.c[label]},
        "predicted_speedup": at, "predicted_speedup_along_paragraphs": along,
        "measured": {**measured["found"], "set": "test prompts (a short confirmation: hsd_bench.py measures)",
                     "prompts": args.test_prompts, "new_tokens": args.new_tokens,
                     "repeats": args.repeats, "temperature": args.temperature},
        "estimate": {"from_calibration": estimate_error(winner, measured["found"]),
                     "held_out": {"speedup": {"predicted": at[f"{args.temperature:g}"],
                                              "measured": measured["found"]["speedup"],
                                              "relative_error": at[f"{args.temperature:g}"] /
                                              measured["found"]["speedup"] - 1}},
                     "on_the_test_prompts": estimate_error(there["found"], measured["found"])},
        "finalists": {lab: {"skip": str(cand.skip), "k": cand.k, "stop": cand.stop, "c": costs.c[lab],
                            "c_noise": costs.noise["c"][lab], "composed_c": composed[lab],
                            "predicted_speedup": cand.speedup}
                      for lab, cand in refined.items()},
        "paper_drafts": {name: {"k": refined[name].k, "stop": refined[name].stop, "c": costs.c[name],
                                "c_noise": costs.noise["c"][name],
                                "predicted_speedup": refined[name].speedup, "measured": measured[name],
                                "estimate": estimate_error(refined[name], measured[name])} for name in paper},
        **({"conflayers": {"described": CONFLAYERS_DESCRIBED, "converged": ran.converged,
                           "iterations": ran.iterations, "log": ran.log,
                           "budget": {"prompts": args.prompts, "new_tokens": args.conflayers_tokens},
                           "paper_budget": {"prompts": CONFLAYERS["paper_prompts"],
                                            "new_tokens": CONFLAYERS["paper_new_tokens"]}}} if ran else {}),
        "warnings": said}


def interrupted(args, model, found_by, best):
    """Ctrl-C during the search: the best draft so far written to --out (unconfirmed), then KeyboardInterrupt."""
    if not (args.out and best):
        raise KeyboardInterrupt("nothing was written" + ("" if args.out else " (--out FILE saves the best draft "
                                                                            "found so far)")) from None
    found_by.update(interrupted=True, candidates_tried=best["tried"], predicted_speedup_cheap=best["candidate"].speedup)
    drafts.write_draft_file(args.out, draft_file(model, args.model, best["candidate"], found_by))
    raise KeyboardInterrupt(f"wrote the best draft found so far to {args.out} (predicted speedup "
                            f"{best['candidate'].speedup:.3f}, not confirmed)") from None


def report(labelled, measured_c, measured, ran, said, tried, t0, out):
    """What the search found, measured and warned of, on stdout."""
    for label, cand in labelled.items():
        print(describe_candidate(label, cand))
        print(describe_measured(measured[label], measured_c[label]))
    if ran:
        print(f"ConfLayers ({CONFLAYERS_DESCRIBED}): {'converged' if ran.converged else 'did not converge'} after "
              f"{ran.iterations} selections", *ran.log, sep="\n")
    for line in said:
        print(f"hsd_search: WARNING: {line}")
    print(f"hsd_search: {tried} candidates in {time.time() - t0:.0f} s" + (f"; wrote {out}" if out else
                                                                          "; nothing written (no --out)"))


def main(argv=None):
    p = argparse.ArgumentParser(description="Choose a draft by measurement: the units to leave out, k and the stop "
                                            "rule that maximise the cost model's predicted speedup.")
    p.error = lambda message: p.exit(2, f"hsd_search: error: {message} (see --help)\n")
    p.add_argument("--model", required=True, help=f"{', '.join([*models.TOYS, *models.OFFICIAL, *models.TINY])}, a "
                                                   "Hugging Face repo id or a folder")
    p.add_argument("--text", help="a UTF-8 text, a paragraph per line (default: as cost_model.read_lines reads: the "
                                  "toys' held-out text, WikiText-2 for the others)")
    p.add_argument("--out", help="write the draft file here (hsd.py --draft FILE); without it nothing is written")
    p.add_argument("--json", action="store_true", help="the draft file's object as one JSON line on stdout")
    p.add_argument("--method", default="search", choices=["search", "conflayers"],
                   help="search: greedy, then local search over the units, by the cost model; conflayers: "
                        "ConfLayers' selection rule, offline, chain verification, a baseline (default: search)")
    p.add_argument("--temperature", type=float, default=0.0, help="the temperature the draft is searched and "
                                                                   "measured at: 0 greedy, the paper's other 0.6 "
                                                                   "(default: 0)")
    p.add_argument("--context", type=int, help="tokens of context the costs are measured at (default: the prompt "
                                               "tokens + half the new tokens)")
    p.add_argument("--threads", type=int, help="torch's threads (default: torch's own choice)")
    p.add_argument("--seed", type=int, default=0, help="which calibration prompts and paragraphs are drawn "
                                                       "(default: 0)")
    p.add_argument("--prompts", type=int, default=8, help="calibration prompts, and as many paragraphs (default: 8)")
    p.add_argument("--test-prompts", type=int, default=8, help="prompts of the confirmation, spread over the test "
                                                                 f"split's {cost_model.TEST_PROMPTS} (hsd_bench.py "
                                                                 "measures them all) (default: 8)")
    p.add_argument("--prompt-tokens", type=int, default=64, help="tokens of each calibration and test prompt "
                                                                 "(default: 64)")
    p.add_argument("--new-tokens", type=int, default=64, help="tokens continuing each prompt (default: 64)")
    p.add_argument("--conflayers-tokens", type=int, default=320, help="tokens ConfLayers generates per calibration "
                                                                      "prompt (default: 320)")
    p.add_argument("--repeats", type=int, default=3, help="turns of the confirmation runs; the costs take 7 turns "
                                                          "per repeat (default: 3)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="(default: cpu)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="(default: float32)")
    args = p.parse_args(argv)
    if min(args.prompts, args.test_prompts, args.prompt_tokens, args.new_tokens, args.repeats) < 1:
        p.error("--prompts, --test-prompts, --prompt-tokens, --new-tokens and --repeats must be at least 1")
    if not (math.isfinite(args.temperature) and 0 <= args.temperature <= 10):
        p.error(f"--temperature must be a number from 0 (greedy) to 10, not {args.temperature:g}")
    if args.threads is not None and args.threads < 1:
        p.error("--threads must be at least 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        model = models.load(args.model, getattr(torch, args.dtype), args.device)
        longest = longest_round(args.method)
        args.context = args.context if args.context is not None else args.prompt_tokens + args.new_tokens // 2
        most = model.config.max_position_embeddings - longest - 2
        if not 1 <= args.context <= most:
            raise models.UsageError(f"--context must lie in 1..{most} for this model (got {args.context})")
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

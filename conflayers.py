"""conflayers: ConfLayers (arXiv 2604.14612, code WA225/ConfLayers), the baseline `hsd_search.py --method conflayers`
runs: its rule for choosing the whole layers a draft skips, by how confident each layer's outputs are.

What runs here, named for what it is (WHAT_RUNS): its selection rule, run once before decoding on the calibration
prompts, with hsd's chain verification (its code verifies a tree, re-selects at the start of every prompt and adapts
during evaluation). It knows whole layers only, and never the first or the last. A layer's "attention output" is here
its token mixer's output (attention, Gated DeltaNet, or Falcon-H1's attention and Mamba-2 branches together), added to
the residual stream as its MLP's output is.

The loop, in the order select() runs it over the calibration prompts:
  1. generate  each prompt speculatively (prompt_rounds), skipping the set of now (at first the odd layers), rounds of
               at most K drafts that end after a draft less sure than STOP; past a prompt's first WINDOW new tokens
               every round counts: its accepted drafts, and their share of its drafts
  2. assess    after each counted round: the first set, or one that skips fewer layers than least_skipped, is
               replaced at once; a set accepting less than one draft a round over half an INTERVAL is replaced; after
               an INTERVAL of rounds, a set accepting more than 4 a round at a rate above MAX_SCORE ends the loop
               (converged), any other is kept if it is the best seen, and replaced
  3. reselect  the replacement: the layers whose confidence over the last WINDOW tokens dips below their neighbours'
               (layer_confidences, find_skip_layers), lambda moved to keep the share skipped in its band
               (next_lambda); after MAX_ITERATIONS selections the loop ends with the best set seen
  4. result    the set it converged on; else the best set seen (the last selected, if none was ever judged)
"""
import math
import statistics
from collections import namedtuple

import torch

import hsd
import models

# Its settings, from its eval.sh and its code's defaults
SKIP_RATIO = 0.4        # a set skipping fewer than this share of layers 1..L-2 (and one) is replaced at once
LAMBDA = 0.25           # lambda's start (eval.sh's LAMBDA): how far below its neighbours a layer must dip to be skipped
INTERVAL = 30           # counted rounds a set is judged on (its search interval)
MAX_ITERATIONS = 100    # selections at most
MAX_SCORE = 0.95        # converged: more than 4 drafts accepted a round, at a rate above this
WINDOW = 100            # new tokens of a prompt before its rounds count; the confidences are over the last this many
K = 25                  # drafts a round at most
STOP = 0.8              # a round ends after a draft less sure than this
PAPER_PROMPTS, PAPER_NEW_TOKENS = 100, 512      # the paper's budget: 100 prompts of 512 new tokens
WHAT_RUNS = "ConfLayers' selection rule, offline, chain verification"


# --- The confidences and the rule that reads them ------------------------------------------------------------------
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


def find_skip_layers(confidences, lam, num_layers, qwen):
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
    (SKIP_RATIO + 0.25), down 0.05 below SKIP_RATIO."""
    return lam + 0.05 if share > SKIP_RATIO + 0.25 else lam - 0.05 if share < SKIP_RATIO else lam


def least_skipped(num_layers):
    """The fewest layers a set may skip before it is replaced at once: SKIP_RATIO of layers 1..L-2, and one."""
    return int((num_layers - 2) * SKIP_RATIO) + 1


# --- The loop ------------------------------------------------------------------------------------------------------
Best = namedtuple("Best", "layers accepted")      # the best set judged so far and its mean accepted drafts a round
Selection = namedtuple("Selection", "layers converged iterations log")
# what select() found: the layers the draft skips (sorted), whether the rule converged, the selections it made, and
# what it did (a line per selection and one for its end)


class Loop(namedtuple("Loop", "skipped lam iterations counted best stopped log")):
    """ConfLayers' loop between two rounds: skipped, the layers the draft skips now; lam, the lambda of the next
    selection; iterations, the selections made; counted, (accepted, drafted) of each round counted since the last
    selection; best, a Best (none yet: [] and 0.0); stopped, None while it runs, then "converged" or "iterations";
    log, a line per selection and one where it stopped."""

    def __repr__(self):
        return (f"Loop(skip {self.skipped}, lambda {self.lam:.2f}, {self.iterations} selections, {len(self.counted)} "
                f"rounds counted, best {self.best.layers} ({self.best.accepted:.2f} accepted), "
                f"{self.stopped or 'running'})")


def start(num_layers):
    """The loop before any round: the odd layers skipped (its code's start), lambda at LAMBDA."""
    return Loop(list(range(1, num_layers - 1, 2)), LAMBDA, 0, [], Best([], 0.0), None, [])


def select(model, prompts, new_tokens, progress):
    """ConfLayers' loop (the module docstring's steps) over the calibration prompts (lists of token ids), new_tokens
    generated after each; progress(done, total): tokens generated of all the prompts'. Returns a Selection."""
    loop, total = start(model.config.num_layers), len(prompts) * new_tokens
    for i, prompt in enumerate(prompts):
        loop, _ = prompt_rounds(model, prompt, new_tokens, loop,
                                lambda n, made=i * new_tokens: progress(made + n, total))
        if loop.stopped:
            break
    progress(total, total)
    return result(loop)


@torch.inference_mode()
def prompt_rounds(model, prompt, new_tokens, loop, progress):
    """Step 1 on one prompt: up to new_tokens generated speculatively, skipping loop.skipped; each round past the first
    WINDOW new tokens is assessed (step 2) and may ask for a new set (step 3), until the loop stops. progress(n):
    tokens generated of this prompt's. Returns (the Loop after them, the tokens generated)."""
    cache = models.Cache(model, len(prompt) + new_tokens + K + 1)
    hsd.prefill(model, cache, prompt[:-1])
    prompt_state = models.Cache(model, len(prompt) + new_tokens + 1)   # the prompt's state, all of it, for the
    hsd.prefill(model, prompt_state, prompt)        # confidence passes: a cache of its own, as they write KV after it
    least, generated, pending = least_skipped(model.config.num_layers), [], prompt[-1]
    while len(generated) < new_tokens - 1 and loop.stopped is None:
        k = min(K, new_tokens - 1 - len(generated))      # a round makes at most k + 1 tokens: never past new_tokens
        drafts, accepted, pending, _ = hsd.speculative_round(model, cache, pending, models.Skip(layers=loop.skipped),
                                                             k, stop=STOP)
        generated += drafts[:accepted] + [pending]
        progress(len(generated))
        if len(generated) > WINDOW + 1:                  # past the first WINDOW new tokens: the round counts
            loop, anew = assess(loop._replace(counted=[*loop.counted, (accepted, len(drafts))]), least)
            if anew:
                loop = reselect(model, prompt_state, generated[-WINDOW:], loop)
    return loop, generated


def assess(loop, least):
    """Step 2, after a counted round (the last of loop.counted): (the Loop, whether a new set is to be selected). The
    first set, or one skipping fewer than `least` layers, is replaced at once; half an INTERVAL of rounds accepting
    less than a draft a round, too; after an INTERVAL, the set converged or is kept as the best if it beats it, and
    is replaced."""
    if loop.iterations == 0 or len(loop.skipped) < least:
        return loop, True                               # the odd layers, or too few layers skipped
    accepted = statistics.mean(a for a, _ in loop.counted)
    if len(loop.counted) == INTERVAL // 2 and accepted < 1:
        return loop, True                               # half an interval, under a draft accepted a round
    if len(loop.counted) <= INTERVAL:
        return loop, False                              # counting on
    rate = statistics.mean(a / drafted for a, drafted in loop.counted)
    if accepted > 4 and rate > MAX_SCORE:
        said = f"stopped: {accepted:.2f} accepted per round at a rate of {rate:.3f}"
        return loop._replace(stopped="converged", log=[*loop.log, said]), False
    if accepted > loop.best.accepted:
        loop = loop._replace(best=Best(list(loop.skipped), accepted))
    return loop, True


def reselect(model, prompt_state, tokens, loop):
    """Step 3: a new set from the confidences of tokens fed after the prompt (prompt_state, a Cache holding the
    prompt's state, is left as it was), lambda moved for the next; its counted rounds start anew. The
    MAX_ITERATIONS-th selection stops the loop with the best set seen instead."""
    confidences = layer_confidences(model, prompt_state, tokens)
    L = model.config.num_layers
    skipped = find_skip_layers(confidences, loop.lam, L, qwen=model.config.family in ("qwen2", "qwen3_5"))
    share = len(skipped) / (L - 2)
    lam, iterations = next_lambda(loop.lam, share), loop.iterations + 1
    log = [*loop.log, f"iteration {iterations}: skip {skipped} ({share:.0%} of layers 1..{L - 2}), lambda {lam:.2f}"]
    if iterations >= MAX_ITERATIONS:
        return loop._replace(skipped=loop.best.layers, lam=lam, iterations=iterations, counted=[], stopped="iterations",
                             log=[*log, f"{iterations} iterations: the best set seen, {loop.best.layers}"])
    return loop._replace(skipped=skipped, lam=lam, iterations=iterations, counted=[], log=log)


def result(loop):
    """Step 4: the Selection a loop ends with: the set it converged on or stopped with; if the prompts ran out first,
    the best set seen (the last selected, if none was judged)."""
    if loop.stopped:
        return Selection(sorted(loop.skipped), loop.stopped == "converged", loop.iterations, loop.log)
    layers = loop.best.layers or loop.skipped
    return Selection(sorted(layers), False, loop.iterations,
                     [*loop.log, f"the calibration prompts ran out before it stopped: the best set seen ({layers})"])

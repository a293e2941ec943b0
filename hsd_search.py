"""hsd_search: a draft chosen by measurement: which parts of the model it leaves out, its k and its stop rule.

  python hsd_search.py --model toy-falcon-h1 --out toys/toy-falcon-h1/draft.json    # minutes on 2 CPU cores
  python hsd.py --model toy-falcon-h1 --draft toys/toy-falcon-h1/draft.json --check

What it maximises: the cost model's predicted speedup of speculative decoding over plain decoding,

    S = tokens the rounds produce / what the rounds cost

over the rounds decoding would run on calibration text (a round makes its accepted drafts and the full model's own
next token, and costs cost_model.round_cost(d, c, v, r) = d c + v[d] + r for d drafts), costs in units of one full
decoding step (a plain step costs 1): c, one draft step; v[d], a verify pass of d + 1 tokens (fitted non-decreasing
in d); r, what a round costs in a generation beyond those; all measured on this machine at --context. How many tokens a round drafts and keeps comes from an acceptance estimate along the full model's own
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

The steps, in the order run() calls them (a part is a (field of models.Skip, layer): a whole layer or one unit of it):
  1. calibration  read_text: cost_model's split of the text by paragraph index (its test paragraphs spread over the
                  text), calibration prompts and paragraphs drawn (--seed) from its calibration side, --test-prompts
                  of its test side; calibration: the full model's continuations of the calibration prompts (sampled
                  at --temperature)
  2. unit costs   unit_savings: what leaving out each kind of unit saves (composed c: ranking only)
  3. candidates   search: greedy, best first, by the cheap estimate: from the full model, leave out the part that
                  raises S most, each candidate at its best k (1..8, or auto) and stop rule, until PATIENCE steps find
                  no better draft; then leave out or put back one part while that raises S (at most LOCAL_STEPS).
                  --method conflayers: ConfLayers' selection rule instead (conflayers.py)
  4. refine       the best REFINED candidates and the paper's drafts: c measured (cost_model.measure_costs, with
                  its noise), estimated as generation drafts; the winner is the best of them (Finalists); predictions:
                  its speedup at the other temperature of TEMPERATURES and along paragraphs; finalists whose
                  predictions lie within the costs' noise of the best are measured again, more turns, interleaved
                  (separate), and if they still cannot be told apart the simplest is kept (found_by.ranking)
  5. confirm      end-to-end generations of the test prompts, in turns with plain decoding: the winner and the
                  paper's drafts, their measured speedups with 95% intervals, the estimate's error in S; warnings_of
  6. write        the draft file (--out), which hsd.py --draft FILE reads
Ctrl-C during steps 3 and 4 writes the best draft found so far (unconfirmed) to --out and says so.
"""
import argparse
import contextlib
import hashlib
import json
import math
import random
import signal
import sys
import time
from collections import namedtuple

try:
    import torch

    import cli
    import conflayers
    import cost_model
    import drafts
    import hsd
    import models
except KeyboardInterrupt:                     # Ctrl-C while torch loads (a second or more): one line, as later on
    if __name__ != "__main__":
        raise
    print("\nhsd_search: interrupted", file=sys.stderr)
    sys.exit(130)

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


class Text(namedtuple("Text", "paragraphs split drawn sha256")):
    """The text the search reads: paragraphs, {paragraph index: token ids} (cost_model.paragraphs'); split, its
    cost_model.Split; drawn, what the search Drawn from it; sha256, the text's."""

    def __repr__(self):
        return (f"Text({len(self.paragraphs)} paragraphs, {len(self.split.calibration)} for calibration, "
                f"{len(self.split.test)} for tests; {self.drawn})")


class Calibration(namedtuple("Calibration", "continuations paragraphs start")):
    """continuations: (B, T) token ids, each calibration prompt and the full model's continuation of it (greedy, or
    sampled at the search's temperature); paragraphs: (B, T), real paragraphs of the text; start: the prompts'
    length."""

    def __repr__(self):
        return (f"Calibration(continuations {tuple(self.continuations.shape)}, paragraphs "
                f"{tuple(self.paragraphs.shape)}, start {self.start})")


def read_text(args, tokenizer):
    """Step 1's Text: --text read and split, calibration and test paragraphs drawn (its errors come before anything
    is measured)."""
    lines = cost_model.read_lines(args.text, args.model)
    paragraphs = cost_model.paragraphs(lines, tokenizer)
    split = cost_model.split(paragraphs, args.prompt_tokens + args.new_tokens)
    drawn = draw(split, args.seed, args.prompts, args.test_prompts)
    if any(len(paragraphs[i]) < args.prompt_tokens for i in drawn.test):
        raise models.UsageError(f"--prompt-tokens {args.prompt_tokens} is longer than a test paragraph: give at most "
                                f"{min(len(paragraphs[i]) for i in drawn.test)}")
    return Text(paragraphs, split, drawn, hashlib.sha256("\n".join(lines).encode()).hexdigest())


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
    followed = torch.tensor([paragraphs[i][:prompt_tokens + new_tokens] for i in drawn.followed],
                            device=model.lm_head.weight.device)
    return Calibration(continuations(model, prompts, new_tokens, temperature, seed), followed, prompt_tokens)


def confirmation_prompts(text, prompt_tokens):
    """The prompts step 5 confirms on: the first prompt_tokens of each test paragraph drawn."""
    return [text.paragraphs[i][:prompt_tokens] for i in text.drawn.test]


# --- 2. The costs --------------------------------------------------------------------------------------------------
def longest_round(method):
    """The most drafts a round can have: k="auto"'s largest, or ConfLayers' (its verify passes are measured too)."""
    return conflayers.K if method == "conflayers" else hsd.AUTO_MAX




def measure_costs(model, skips, context, turns, longest, temperature):
    """cost_model.measure_costs of hsd's passes: c of each of skips ({label: Skip}), v, r, their noise."""
    return cost_model.measure_costs(model, skips, context, turns, longest, temperature, passes=hsd.PASSES)


def unit_savings(model, context, turns, longest, temperature):
    """(Costs of steps leaving out each kind of part in all layers of its type, {(field of models.Skip, layer type):
    the share of a step leaving out one such part saves}): what composed_cost composes (cost_model.part_kinds)."""
    kinds = cost_model.part_kinds(model.config)
    costs = measure_costs(model, cost_model.part_skips(model.config), context, turns, longest, temperature)
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
        for accept_j, sure_j in zip(accept, (sure[j:j + longest] for j in range(n))):
            if temperature == 0 and 0.0 in accept_j:      # past its first wrong draft a round drafts its own tokens,
                wrong = accept_j.index(0.0)               # whose confidences this pass does not see
                sure_j = sure_j[:wrong + 1] + [1.0] * (len(sure_j) - wrong - 1)
            known.append(sure_j)
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
    lowest_stop = min(stop for stop in STOPS if stop is not None)
    accept, sure = [[] for _ in range(B)], [[] for _ in range(B)]
    for t in range(start - 1, T - 1):
        snap, token = hsd.snapshot(cache), rows[:, t]
        accept_t, sure_t = [[] for _ in range(B)], [[] for _ in range(B)]       # per row, from position t on
        going, wrong, unsure = (torch.ones(B, dtype=torch.double), torch.zeros(B, dtype=torch.bool),
                                torch.zeros(B, dtype=torch.bool))
        for m in range(min(longest, T - 1 - t)):
            logits = model(token[:, None], cache, skip=skip)[:, -1]               # (B, V) draft m + 1
            chosen = rows[:, t + m + 1] if temperature else full[:, t + m].argmax(-1)
            agree, probability, guess = acceptance(full[:, t + m], logits, chosen, temperature)
            agree, probability = agree.cpu(), probability.cpu()
            for b, (x, y) in enumerate(zip(agree.tolist(), probability.tolist())):
                accept_t[b].append(x)
                sure_t[b].append(y)
            going, wrong = going * agree, wrong | (agree == 0)
            unsure |= probability < lowest_stop
            if bool(((wrong & unsure) if temperature == 0 else going < 1e-4).all()):   # nothing more can count
                break
            token = rows[:, t + m + 1] if temperature or along_text else guess
        hsd.restore(cache, snap)
        model(rows[:, t:t + 1], cache)                                            # the full model takes token t
        for b in range(B):
            accept[b].append(accept_t[b])
            sure[b].append(sure_t[b])
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


def replay(estimates, k, stop, c, v, r):
    """The rounds decoding runs over the estimated texts, as hsd.generate_steps runs them (k a number or "auto", the
    stop ending a round after a draft less sure than it): tokens made, their cost in full steps, rounds, drafts made
    and accepted. At a temperature a round keeps its expected accepted drafts and the replay moves on by as many."""
    tokens = cost = rounds = drafted = accepted = 0
    pause_by = cost_model.costs_up_to((c, v, r), hsd.AUTO_MAX) if k == "auto" else None    # as generate pauses
    for e in estimates:
        j, n, plan = 0.0, len(e.accept), hsd.first_plan(pause_by) if k == "auto" else None
        while int(j) < n:
            i = int(j)
            k_round = min(plan.k if k == "auto" else k, n - i - 1)
            if k_round == 0 or (k == "auto" and plan.plain > 0):
                d, a = 0, 0
                tokens, cost = tokens + 1, cost + 1
            else:
                d = drafts_in_round(e.sure[i], k_round, stop)
                a = expected_accepted(e.accept[i], d)
                tokens, cost, rounds = tokens + a + 1, cost + cost_model.round_cost(d, c, v, r), rounds + 1
                drafted, accepted = drafted + d, accepted + a
            if k == "auto":
                plan = hsd.auto_k(plan, d, round(a), a, pause_by)
            j += a + 1
    return Replay(tokens, cost, rounds, drafted, accepted)


def speedup(r):
    """The speedup a Replay predicts: tokens made over what their rounds cost (cost_model's predicted speedup)."""
    return r.tokens / r.cost


Candidate = namedtuple("Candidate", "skip draft_cost k stop speedup replayed")
# a draft, the c its prediction used, the k and stop rule it is best at, its predicted speedup there, and the Replay
# behind that prediction


def best_plan(skip, estimates, draft_cost, v, r, ks, stops):
    """A draft at the k and stop rule (of ks and stops) whose replay predicts the highest speedup: a Candidate."""
    best = None
    for k in ks:
        for stop in stops:
            rounds = replay(estimates, k, stop, draft_cost, v, r)
            if best is None or speedup(rounds) > best.speedup:
                best = Candidate(skip, draft_cost, k, stop, speedup(rounds), rounds)
    return best


def planned(skip, estimates, draft_cost, v, r, k, stop):
    """A draft at a given k and stop rule: a Candidate."""
    return best_plan(skip, estimates, draft_cost, v, r, (k,), (stop,))


def is_better(candidate, best):
    """Whether a candidate predicts a higher speedup than the best so far (None: none yet)."""
    return best is None or candidate.speedup > best.speedup


# --- 3. The candidates: the search ---------------------------------------------------------------------------------
class Search(namedtuple("Search", "model calibration full savings v r longest temperature")):
    """What ranking a draft needs: full, the full model's logits over the calibration's continuations (B, T, V);
    savings, unit_savings'; v, the verify passes' costs; r, a round's own; longest, the most drafts a round makes."""

    def __repr__(self):
        return (f"Search({self.calibration!r}, {len(self.savings)} unit savings, longest {self.longest}, temperature "
                f"{self.temperature:g})")


def rank(s, skip, ks=(*KS, "auto"), stops=STOPS):
    """A draft by the cheap estimate and its composed c, at its best k and stop rule: a Candidate."""
    estimates = teacher_forced_estimates(s.model, s.calibration.continuations, skip, s.calibration.start, s.longest,
                                         s.temperature, full=s.full)
    return best_plan(skip, estimates, composed_cost(s.model.config, skip, s.savings), s.v, s.r, ks, stops)


def rank_into(ranked, s, skips):
    """Each of skips ranked (rank) and recorded in ranked ({Skip: Candidate}): the Candidates, in the order given."""
    step = [rank(s, skip) for skip in skips]
    ranked.update((cand.skip, cand) for cand in step)
    return step


def leavable(config):
    """Every part (field of models.Skip, layer) a draft can leave out: whole layers and their units."""
    return [(field, i) for i, layer_type in enumerate(config.layer_types)
            for field in ("layers", *models.units_of(layer_type))]


def fields_of(skip):
    """{field of models.Skip: the set of layers it names}, to change and make a Skip of again."""
    return {field: set(getattr(skip, field)) for field in ("layers", *models.UNITS)}


def with_part(skip, part, config):
    """skip, leaving out one more part; a layer all of whose units are left out is left out whole (the same
    computation, said plainly), and a whole layer replaces the units of it left out before."""
    field, i = part
    sets = fields_of(skip)
    sets[field].add(i)
    if field == "layers" or all(i in sets[u] for u in models.units_of(config.layer_types[i])):
        sets = {f: layers - {i} for f, layers in sets.items()}
        sets["layers"].add(i)
    return models.Skip(**sets)


def toggled(skip, part, config):
    """skip with one part left out if it runs, or put back if it is left out."""
    field, i = part
    if i not in getattr(skip, field):
        return with_part(skip, part, config)
    sets = fields_of(skip)
    sets[field].discard(i)
    return models.Skip(**sets)


def within_skipped_layer(part, skip):
    """Whether part is a unit of a layer skip leaves out whole (toggling it would change nothing)."""
    return part[0] != "layers" and part[1] in skip.layers


def left_out_with(part, chosen):
    """Whether leaving out the part `chosen` leaves out `part` too: it is chosen, or a unit of the layer chosen whole."""
    return part == chosen or (chosen[0] == "layers" and part[1] == chosen[1])


def greedy_bound(remaining):
    """The most candidates the greedy steps rank from `remaining` parts on: each step one per part, one part fewer."""
    return remaining * (remaining + 1) // 2


def search(s, starts, progress, on_best):
    """Greedy, best first, then a local search (greedy_steps, local_steps), from the full model and from the best of
    `starts` (the paper's drafts, ranked). progress(done, total) hears how many candidates were ranked of at most how
    many (the bound only falls, so the share done only grows); on_best(candidate, tried) hears of every new best (for
    Ctrl-C). Returns ({skip: Candidate} of every candidate ranked, in the order ranked; the best)."""
    parts, ranked = leavable(s.model.config), {}
    full_model = rank_into(ranked, s, [models.Skip()])[0]        # the search's start, itself no draft
    progress(1, 1 + greedy_bound(len(parts)) + LOCAL_STEPS * len(parts))
    ranked.update((cand.skip, cand) for cand in starts)
    best = max(starts, key=lambda cand: cand.speedup, default=None)
    if best is not None:
        on_best(best, len(ranked))
    best, done = greedy_steps(s, parts, full_model, best, ranked, 1, progress, on_best)
    best, done = local_steps(s, parts, best, ranked, done, progress, on_best)
    progress(done, done)
    return ranked, best


def greedy_steps(s, parts, current, best, ranked, done, progress, on_best):
    """From current, leave out the part that raises the predicted speedup most, step by step, until PATIENCE steps in
    a row find nothing better than best. done: candidates ranked before. Returns (the best, candidates ranked)."""
    remaining, misses = parts, 0
    while remaining and misses < PATIENCE:
        step = rank_into(ranked, s, [with_part(current.skip, part, s.model.config) for part in remaining])
        i = max(range(len(step)), key=lambda i: step[i].speedup)
        current, chosen = step[i], remaining[i]
        remaining = [part for part in remaining if not left_out_with(part, chosen)]
        done += len(step)
        progress(done, done + greedy_bound(len(remaining)) + LOCAL_STEPS * len(parts))
        if is_better(current, best):
            best, misses = current, 0
            on_best(best, len(ranked))
        else:
            misses += 1
    return best, done


def local_steps(s, parts, best, ranked, done, progress, on_best):
    """From best, leave out or put back the one part that raises the predicted speedup most, while one does (at most
    LOCAL_STEPS steps). done: candidates ranked before. Returns (the best, candidates ranked)."""
    for steps_left in reversed(range(LOCAL_STEPS)):
        step = rank_into(ranked, s, [toggled(best.skip, part, s.model.config) for part in parts
                                     if not within_skipped_layer(part, best.skip)])
        done += len(step)
        challenger = max(step, key=lambda cand: cand.speedup)
        if not is_better(challenger, best):
            break
        best = challenger
        on_best(best, len(ranked))
        progress(done, done + steps_left * len(parts))
    return best, done


def candidates(args, s, paper, on_best):
    """Step 3, by --method: ({label: Skip} of the finalists, {label: (k, stop)} of those whose method fixes their
    plan, candidates ranked, ConfLayers' conflayers.Selection or None)."""
    if args.method == "conflayers":
        return conflayers_candidates(args, s, paper, on_best)
    stops = STOPS if s.temperature == 0 else (None,)
    starts = [rank(s, skip, stops=stops) for skip in paper.values()]
    ranked, _ = search(s, starts, Progress("search: candidates ranked", bounded=True), on_best)
    return finalist_skips(ranked, paper, REFINED), {}, len(ranked), None


def conflayers_candidates(args, s, paper, on_best):
    """Step 3 by ConfLayers' selection rule (conflayers.select) on the calibration prompts: its layers, at its own k
    and stop, beside the paper's drafts; as step 3 returns."""
    prompts = [row[:s.calibration.start] for row in s.calibration.continuations.tolist()]
    selection = conflayers.select(s.model, prompts, args.conflayers_tokens,
                                  Progress("ConfLayers: tokens generated", bounded=True))
    skip, plan = models.Skip(layers=selection.layers), (conflayers.K, conflayers.STOP)
    on_best(rank(s, skip, ks=(conflayers.K,), stops=(conflayers.STOP,)), 1)
    return {"conflayers": skip, **paper}, {"conflayers": plan}, 1, selection


# --- 4. Refine: the finalists estimated as generation drafts, with measured costs ---------------------------------
def finalist_skips(ranked, paper, count):
    """The best `count` distinct drafts ranked by the cheap estimate, then the paper's drafts: {label: Skip}."""
    best = sorted(ranked.values(), key=lambda cand: -cand.speedup)
    labels = {f"candidate {i + 1}": cand.skip for i, cand in enumerate(
        [cand for cand in best if cand.skip not in paper.values() and cand.skip != models.Skip()][:count])}
    return {**labels, **paper}


def plan_of(label, skip, estimates, costs, temperature, plans):
    """A finalist with measured costs: at plans[label] = (k, stop) where given, else at its best k (1..8 or auto) and
    stop rule (at a temperature without stops: the estimate of a stop there is rough): a Candidate."""
    if label in plans:
        return planned(skip, estimates, costs.c[label], costs.v, costs.r, *plans[label])
    stops = STOPS if temperature == 0 else (None,)
    return best_plan(skip, estimates, costs.c[label], costs.v, costs.r, (*KS, "auto"), stops)


def refine(model, rows, start, skips, costs, longest, temperature, progress, plans):
    """Each of skips ({label: Skip}) estimated as generation drafts along rows, with its measured c: ({label:
    Candidate, plan_of's}, {label: Candidate at its best fixed k}, {label: its estimates})."""
    refined, fixed, estimated = {}, {}, {}
    stops = STOPS if temperature == 0 else (None,)
    for i, (label, skip) in enumerate(skips.items()):
        estimates = estimated[label] = generation_estimates(model, rows, skip, start, longest, temperature)
        fixed[label] = best_plan(skip, estimates, costs.c[label], costs.v, costs.r, KS, stops)
        refined[label] = plan_of(label, skip, estimates, costs, temperature, plans)
        progress(i + 1, len(skips))
    return refined, fixed, estimated


# --- 4b. Rank only what the costs can tell apart ----------------------------------------------------------------
SEPARATE_TURNS = (2, 4)      # finalists too close to rank: their costs measured again at 2x, then 4x the turns


def units_left_out(config, skip):
    """How many units (attention, recurrent mixer, MLP) a skip leaves out, a whole layer counting as all of its units:
    the fewer, the simpler the draft (it is more of the full model)."""
    return sum(len(models.units_of(t)) if i in skip.layers else sum(i in getattr(skip, u) for u in models.units_of(t))
               for i, t in enumerate(config.layer_types))


def too_close(speedups, noise):
    """The labels of speedups ({label: predicted S}) whose S lies within `noise` (relative) of the best, best first:
    the drafts the costs' noise cannot rank."""
    best = max(speedups.values())
    close = [label for label, x in speedups.items() if x >= best * (1 - noise)]
    return sorted(close, key=lambda label: -speedups[label])


def costs_noise(costs, labels):
    """The costs' noise for ranking drafts: the largest halves noise of their c (0 where unknown)."""
    return max((costs.noise["c"][label] or 0.0 for label in labels), default=0.0)


def separate(args, model, config, own, refined, costs, estimated, skips, plans, measure=None):
    """The winner among the search's own finalists `own` (labels of refined), ranked only as far as the costs tell
    them apart: those whose predicted speedups lie within the costs' noise of the best are measured again, on their
    own and interleaved, with SEPARATE_TURNS times the turns, until one stands clear or the budget is spent; then the
    simplest of those still too close (units_left_out; among equals the higher S) is kept, and said so. Returns
    (label, ranking: what the draft file records in found_by.ranking)."""
    measure = measure or measure_costs
    speedups = {label: refined[label].speedup for label in own}
    noise = costs_noise(costs, own)
    close, turns = too_close(speedups, noise), [costs.turns]
    for times in SEPARATE_TURNS:
        if len(close) < 2:
            break
        print(f"hsd_search: {', '.join(close)} predict within the costs' noise ({noise:.1%}) of each other: their "
              f"costs measured again, {costs.turns * times} turns", file=sys.stderr)
        more = measure(model, {label: skips[label] for label in close}, args.context, costs.turns * times,
                       longest_round(args.method), args.temperature)
        turns.append(more.turns)
        speedups = {label: plan_of(label, skips[label], estimated[label], more, args.temperature, plans).speedup
                    for label in close}
        noise = costs_noise(more, close)
        close = too_close(speedups, noise)
    separated = len(close) < 2
    kept = close[0] if separated else min(close, key=lambda label: (units_left_out(config, skips[label]),
                                                                    -speedups[label]))
    said = (f"{kept} predicts {speedups[kept]:.3f}x, clear of the others by more than the costs' noise ({noise:.1%})"
            if separated else
            f"{', '.join(close)} predict {', '.join(f'{speedups[label]:.3f}x' for label in close)}, within the costs' "
            f"noise ({noise:.1%}) after {turns[-1]} turns: the simplest is kept, {kept} (leaving out "
            f"{units_left_out(config, skips[kept])} units)")
    return kept, {"separated": separated, "turns": turns, "noise": noise, "still_close": [] if separated else close,
                  "speedups": speedups, "kept": kept, "said": said,
                  "simpler": "leaves out fewer units (attention, recurrent mixer, MLP; a whole layer counts as all "
                             "of its units); among equals the higher predicted speedup"}


class Finalists(namedtuple("Finalists", "label candidates best_fixed costs composed paper_labels tried selection "
                                        "ranking")):
    """Steps 3 and 4: label, the winner's; candidates, {label: Candidate} of the finalists, estimated as generation
    drafts with measured costs: the search's best ("candidate 1", ...; ConfLayers': "conflayers") and the paper's
    drafts (paper_labels); best_fixed, the winner at its best fixed k; costs, the finalists' measured Costs;
    composed, {label: c composed from the unit costs}; tried, candidates ranked; selection, what ConfLayers did (a
    conflayers.Selection) or None; ranking, how the winner was told apart from the others (separate's)."""

    def __repr__(self):
        return (f"Finalists(winner {self.label!r} S {self.winner.speedup:.3f} of {len(self.candidates)}, {self.tried} "
                f"candidates ranked)")

    @property
    def winner(self):
        return self.candidates[self.label]

    def confirmed(self):
        """The drafts step 5 confirms: {"found": the winner, each paper draft's label: its Candidate}."""
        return {"found": self.winner, **{name: self.candidates[name] for name in self.paper_labels}}


def choose(args, model, calib, unit_costs, savings, paper, on_best):
    """Steps 3 and 4: the candidates (candidates), their finalists' costs measured and refined: Finalists."""
    longest = longest_round(args.method)
    with torch.inference_mode():
        s = Search(model, calib, model(calib.continuations), savings, unit_costs.v, unit_costs.r, longest,
                   args.temperature)
    skips, plans, tried, selection = candidates(args, s, paper, on_best)
    costs = measure_costs(model, skips, args.context, args.repeats * 7, longest, args.temperature)
    refined, fixed, estimated = refine(model, calib.continuations, calib.start, skips, costs, longest,
                                       args.temperature, Progress("refine: finalists estimated as generation drafts"),
                                       plans)
    own = [label for label in refined if label not in paper]
    label, ranking = separate(args, model, model.config, own, refined, costs, estimated, skips, plans)
    composed = {label: composed_cost(model.config, cand.skip, savings) for label, cand in refined.items()}
    return Finalists(label, refined, fixed[label], costs, composed, list(paper), tried, selection, ranking)


Predicted = namedtuple("Predicted", "at along fresh")
# the draft file's prediction: at, {"0": S, "0.6": S}; along, {"0": S along the calibration's paragraphs}; fresh,
# {temperature: the winner's Costs measured afresh there}


def predictions(args, model, finalists, calib, held):
    """The winner's predicted speedup at each of TEMPERATURES, made on what did not choose it: along the full
    model's continuations of the held-out prompts (greedy, or sampled at that temperature) with its costs measured
    afresh there (the finalists' own measurement favours the luckiest); and along the calibration's paragraphs
    (greedy costs): a Predicted."""
    winner, label = finalists.winner, finalists.label
    longest, at, fresh = longest_round(args.method), {}, {}
    for t in TEMPERATURES:
        here = fresh[t] = measure_costs(model, {label: winner.skip}, args.context, args.repeats * 7, longest, t)
        rows = continuations(model, held, args.new_tokens, t, args.seed + 20_000)
        estimates = generation_estimates(model, rows, winner.skip, calib.start, longest, t)
        at[f"{t:g}"] = planned(winner.skip, estimates, here.c[label], here.v, here.r, winner.k, winner.stop).speedup
    greedy = fresh[0.0]
    along = generation_estimates(model, calib.paragraphs, winner.skip, calib.start, longest, 0.0, along_text=True)
    return Predicted(at, {"0": planned(winner.skip, along, greedy.c[label], greedy.v, greedy.r, winner.k,
                                       winner.stop).speedup},
                     fresh)


# --- 5. Confirm: generations of the test prompts ------------------------------------------------------------------
def confirm(args, model, test, finalists):
    """Step 5: generations of the test prompts by the drafts finalists.confirmed() names, in turns with plain decoding
    ({label: measured_row}), and the estimate made on the test prompts' own continuations ({label: Candidate}), whose
    error is the estimator's own."""
    confirmed, costs = finalists.confirmed(), finalists.costs
    draft_of = {label: hsd.Draft(label, cand.skip, cand.k, cand.stop, drafts.draft_costs(cand.draft_cost, costs.v,
                                                                                           costs.r))
                for label, cand in confirmed.items()}            # -k auto pauses by the costs it was planned by
    runs = cost_model.generations_in_turns(hsd.generate, model, test, draft_of, args.new_tokens, args.repeats,
                                           args.temperature, args.seed,
                                           Progress("confirm: generations", args.repeats * len(test) * (1 + len(
                                               draft_of))))
    measured = {label: cost_model.measured_row(runs[label], runs["plain"], (cand.draft_cost, costs.v, costs.r))
                for label, cand in confirmed.items()}
    rows = continuations(model, test, args.new_tokens, args.temperature, args.seed + 10_000)
    there = {label: planned(cand.skip, generation_estimates(model, rows, cand.skip, len(test[0]),
                                                            longest_round(args.method), args.temperature),
                            cand.draft_cost, costs.v, costs.r, cand.k, cand.stop)
             for label, cand in confirmed.items()}
    return measured, there


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


def warnings_of(winner, predicted, ranking, measured, paper_labels, machine, composed_c):
    """The loud warnings of a search: its draft measured below plain decoding or below a paper draft it measured, its
    prediction contradicted by its measurement, its measured c far from its composed one (one measurement gone wrong:
    the winner of many noisy measurements is often the luckiest), finalists the costs could not tell apart even when
    measured more (ranking: separate's; the simplest was kept), a busy machine (machine: cost_model.machine_state's).
    predicted: the draft file's prediction (on held-out prompts)."""
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
    if ranking and not ranking["separated"]:
        said.append(f"{ranking['said']}: the machine is too busy to rank them")
    busy = cost_model.busy_warning(machine, found["turn_speedups"])
    return said + ([busy] if busy else [])


# --- 6. The draft file ---------------------------------------------------------------------------------------------
def draft_file(model, name, candidate, found_by):
    """The draft file's JSON object (drafts.read_draft_file reads it)."""
    return drafts.draft_file(name, drafts.identity(model), candidate.skip, candidate.k, candidate.stop, found_by)


def found_by_start(args, machine, text):
    """What the draft file records of how it was searched, known before the search: paragraphs by index
    (cost_model.paragraphs'), the test split's whole and the part of it the search confirmed on."""
    return {"method": args.method, "seed": args.seed, "temperature": args.temperature, **machine,
            "date": time.strftime("%Y-%m-%d"),
            "calibration": {"text_sha256": text.sha256, "calibration_paragraphs": text.drawn.calibration,
                            "followed_paragraphs": text.drawn.followed, "predicted_on_paragraphs": text.drawn.held,
                            "confirmed_on_paragraphs": text.drawn.test,
                            "test_paragraphs": text.split.test, "prompt_tokens": args.prompt_tokens,
                            "new_tokens": args.new_tokens}}


def found_by_end(args, finalists, predicted, measured, there, said, seconds, prompts):
    """What the draft file records of what the search found (finalists: a Finalists; predicted: a Predicted),
    measured (on `prompts` test prompts) and warned of. Its costs (which -k auto reads) and its prediction are those
    measured afresh after the search chose it; the finalists' are those they were chosen by."""
    f, costs, winner = finalists, finalists.costs, finalists.winner
    fresh, at = predicted.fresh[args.temperature], predicted.at[f"{args.temperature:g}"]
    return {
        "candidates_tried": f.tried, "seconds": round(seconds, 1),
        "costs": {"c": fresh.c[f.label], "v": {str(d): fresh.v[d] for d in range(1, len(fresh.v))}, "r": fresh.r,
                  "r_noise": fresh.noise["r"],
                  "context": fresh.context, "temperature": args.temperature, "threads": torch.get_num_threads(),
                  "noise": fresh.noise["c"][f.label], "composed_c": f.composed[f.label],
                  "step_ms": fresh.step_s * 1e3, "c_when_chosen": costs.c[f.label]},
        "predicted_speedup": predicted.at, "predicted_speedup_along_paragraphs": predicted.along,
        "ranking": f.ranking,
        "measured": {**measured["found"], "set": "test prompts (a short confirmation: hsd_bench.py measures)",
                     "prompts": prompts, "new_tokens": args.new_tokens,
                     "repeats": args.repeats, "temperature": args.temperature},
        "estimate": {"from_calibration": estimate_error(winner, measured["found"]),
                     "held_out": {"speedup": {"predicted": at, "measured": measured["found"]["speedup"],
                                              "relative_error": at / measured["found"]["speedup"] - 1}},
                     "on_the_test_prompts, cost model only": estimate_error(there["found"], measured["found"])},
        "finalists": {label: {"skip": str(cand.skip), "k": cand.k, "stop": cand.stop, "c": costs.c[label],
                              "c_noise": costs.noise["c"][label], "composed_c": f.composed[label],
                              "predicted_speedup": cand.speedup}
                      for label, cand in f.candidates.items()},
        "paper_drafts": {name: {"k": f.candidates[name].k, "stop": f.candidates[name].stop, "c": costs.c[name],
                                "c_noise": costs.noise["c"][name], "predicted_speedup": f.candidates[name].speedup,
                                "measured": measured[name], "estimate": estimate_error(f.candidates[name],
                                                                                       measured[name])}
                         for name in f.paper_labels},
        **({"conflayers": conflayers_record(args, f.selection)} if f.selection else {}),
        "warnings": said,
        "best_fixed": {"k": f.best_fixed.k, "stop": f.best_fixed.stop,                  # hsd_bench reads it
                       "predicted_speedup": f.best_fixed.speedup}}


def conflayers_record(args, selection):
    """What the draft file records of ConfLayers' run: what runs, whether it converged, its log, its budget."""
    return {"described": conflayers.WHAT_RUNS, "converged": selection.converged, "iterations": selection.iterations,
            "log": selection.log, "budget": {"prompts": args.prompts, "new_tokens": args.conflayers_tokens},
            "paper_budget": {"prompts": conflayers.PAPER_PROMPTS, "new_tokens": conflayers.PAPER_NEW_TOKENS}}


def interrupted(args, model, found_by, best):
    """Ctrl-C during steps 3 and 4: the best draft so far (best: a BestSoFar) written to --out (unconfirmed), then
    KeyboardInterrupt."""
    if not (args.out and best.candidate):
        raise KeyboardInterrupt("nothing was written" + ("" if args.out else " (--out FILE saves the best draft "
                                                                            "found so far)")) from None
    found_by.update(interrupted=True, candidates_tried=best.tried, predicted_speedup_cheap=best.candidate.speedup)
    drafts.write_draft_file(args.out, draft_file(model, args.model, best.candidate, found_by))
    raise KeyboardInterrupt(f"wrote the best draft found so far to {args.out} (predicted speedup "
                            f"{best.candidate.speedup:.3f}, not confirmed)") from None


# --- The command line ----------------------------------------------------------------------------------------------
class Progress:
    """A progress line on stderr: `label: done/total (percent), about N s left`, or with bounded=True (a total that
    is a bound, which falls as the work learns it needs less) `label: done of at most total, at most N s left`. The
    callers' done only grows and their total only falls, so the line never goes back. Called as progress(done,
    total), or update(n) with a total given at the start (cost_model.generations_in_turns calls update(1))."""

    def __init__(self, label, total=None, bounded=False):
        self.label, self.total, self.bounded, self.done = label, total, bounded, 0
        self.t0 = time.time()

    def __call__(self, done, total):
        self.done, self.total, elapsed = done, total, time.time() - self.t0
        if done >= total:
            sys.stderr.write(f"\r{self.label}: {done} in {elapsed:.0f} s{' ' * 40}\n")
        else:
            left = elapsed / done * (total - done) if done else None
            if self.bounded:
                sys.stderr.write(f"\r{self.label}: {done} of at most {total}"
                                 f"{f', at most about {left:.0f} s left' if left is not None else ''}   ")
            else:
                sys.stderr.write(f"\r{self.label}: {done}/{total} ({done / total:.0%})"
                                 f"{f', about {left:.0f} s left' if left is not None else ''}   ")
        sys.stderr.flush()

    def update(self, n):
        self(self.done + n, self.total)


class BestSoFar:
    """The search's on_best callback: the best candidate found so far and how many were ranked then (for Ctrl-C)."""

    def __init__(self):
        self.candidate, self.tried = None, 0

    def __call__(self, candidate, tried):
        self.candidate, self.tried = candidate, tried

    def __repr__(self):
        return f"BestSoFar({self.candidate.speedup if self.candidate else None}, {self.tried} tried)"


def describe_candidate(label, cand):
    """A line of what a Candidate predicts."""
    k = f"k={cand.k}" + (f", stop below {cand.stop}" if cand.stop is not None else "")
    r = cand.replayed
    return (f"{label:12} S {cand.speedup:.3f}; c {cand.draft_cost:.3f}, {k}, {r.accepted / max(1, r.rounds):.2f} of "
            f"{r.drafted / max(1, r.rounds):.2f} drafts kept per round: skips {cand.skip}")


def describe_measured(m, c):
    """A line of what a confirmation measured (m, a measured_row) of a draft of cost c."""
    low, high = m["speedup_ci"]
    return (f"{'':12} measured: speedup {m['speedup']:.3f} [{low:.3f}, {high:.3f}], {m['accepted_per_round'] or 0:.2f} "
            f"of {m['drafts_per_round'] or 0:.2f} drafts kept per round, c {c:.3f}")


def announce(args, model, text):
    """The search's first lines on stderr: what it runs, and a warning if the machine is busy. Returns the machine's
    state (cost_model.machine_state), taken before measuring: the load of others, not ours."""
    print(f"hsd_search: {args.model}, method {args.method}, temperature {args.temperature:g}, seed {args.seed}: "
          f"{len(text.drawn.calibration)} calibration prompts and paragraphs of {args.prompt_tokens} + "
          f"{args.new_tokens} tokens, {len(text.drawn.test)} test prompts; costs at {args.context} tokens of context",
          file=sys.stderr)
    machine = cost_model.machine_state(model, args.dtype)
    if cost_model.busy_warning(machine):
        print(f"hsd_search: warning: {cost_model.busy_warning(machine)}", file=sys.stderr)
    return machine


def report(finalists, measured, said, seconds, out, test_prompts):
    """What the search found, measured and warned of, on stdout."""
    print(f"finalists: S, the cost model's predicted speedup on the calibration prompts that ranked them (the winner's "
          f"is optimistic: the file's prediction above is the fair one); measured, over plain decoding on "
          f"{test_prompts} test prompts")
    for label, cand in finalists.confirmed().items():
        print(describe_candidate(label, cand))
        print(describe_measured(measured[label], cand.draft_cost))
    print(f"ranking: {finalists.ranking['said']}")
    selection = finalists.selection
    if selection:
        print(f"ConfLayers ({conflayers.WHAT_RUNS}): {'converged' if selection.converged else 'did not converge'} "
              f"after {selection.iterations} selections", *selection.log, sep="\n")
    for line in said:
        print(f"hsd_search: warning: {line}")
    print(f"hsd_search: {finalists.tried} distinct candidates in {seconds:.0f} s (the progress line counts every "
          "ranking, a candidate met twice twice)" + (f"; wrote {out}" if out else "; nothing written (no --out)"))


def run(args, model, tokenizer):
    """The steps of the module docstring, numbered as there; returns the draft file's object (what --json prints)."""
    if args.out:
        cost_model.check_writable(args.out, "--out")
    text = read_text(args, tokenizer)                            # 1, first: its errors come before anything is measured
    if not args.out:
        print("hsd_search: no --out: the draft is printed, not written (--out FILE writes the draft file)",
              file=sys.stderr)
    t0, longest = time.time(), longest_round(args.method)
    machine = announce(args, model, text)                        # before anything is decoded or timed
    calib = calibration(model, text.paragraphs, text.drawn, args.prompt_tokens, args.new_tokens, args.temperature,
                        args.seed)                                                                      # 1
    cost_model.warm_up(model, longest)                            # every verify length a round here can use
    unit_costs, savings = unit_savings(model, args.context, args.repeats * 7, longest, args.temperature)   # 2
    paper, found_by, best = drafts.paper_skips(model.config), found_by_start(args, machine, text), BestSoFar()
    try:
        finalists = choose(args, model, calib, unit_costs, savings, paper, best)                        # 3, 4
    except KeyboardInterrupt:
        interrupted(args, model, found_by, best)
    held = [text.paragraphs[i][:args.prompt_tokens] for i in text.drawn.held]
    predicted = predictions(args, model, finalists, calib, held)                                        # 4
    measured, there = confirm(args, model, confirmation_prompts(text, args.prompt_tokens), finalists)   # 5
    said = warnings_of(finalists.winner, predicted.at[f"{args.temperature:g}"], finalists.ranking, measured,
                       finalists.paper_labels, machine, finalists.composed[finalists.label])
    found_by.update(found_by_end(args, finalists, predicted, measured, there, said, time.time() - t0,
                                 len(text.drawn.test)))
    spec = draft_file(model, args.model, finalists.winner, found_by)                                    # 6
    if args.out:
        drafts.write_draft_file(args.out, spec)
    print(f"hsd_search: the file's prediction, on {len(held)} prompts held out of the search with its costs measured "
          "afresh: " + ", ".join(f"{speedup:.3f}x at T={t}" for t, speedup in predicted.at.items()))
    report(finalists, measured, said, time.time() - t0, args.out, len(text.drawn.test))
    return spec


def main(argv=None):
    p = argparse.ArgumentParser(description="Choose a draft by measurement: the units to leave out, k and the stop "
                                            "rule that maximise the cost model's predicted speedup.")
    p.error = lambda message: p.exit(2, f"hsd_search: error: {message} (see --help)\n")
    p.add_argument("--model", required=True, help=f"{', '.join([*models.TOYS, *models.OFFICIAL, *models.TINY])}, a "
                                                   "Hugging Face repo id or a folder")
    p.add_argument("--text", help="a UTF-8 text, a paragraph per line (default: as cost_model.read_lines reads: the "
                                  "toys' held-out text, WikiText-2 for the others)")
    p.add_argument("--out", help="write the draft file here (hsd.py --draft FILE); without it nothing is written")
    p.add_argument("--json", action="store_true", help="the draft file's object as one JSON line: stdout holds it "
                                                      "alone, the other lines go to stderr")
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
    misspelt = cli.misspelt_option(p, sys.argv[1:] if argv is None else argv)
    if misspelt:
        p.error(misspelt)
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
        with contextlib.redirect_stdout(sys.stderr if args.json else sys.stdout):      # --json: stdout is the JSON
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

"""hsd: component-aware self-speculative decoding in hybrid language models (lossless).

A hybrid model contains a cheaper model: itself without its attention. Draft k tokens with that, verify them
with the full model in one pass, keep the longest agreeing prefix. The state covers the committed tokens; one
committed token is pending (not yet fed). One round:

  1. snapshot  remember the state: KV length + references to the recurrent states
  2. draft     k tokens from the draft model (the full model minus some parts), from the full model's state
  3. restore   put the snapshot back: drafting leaves no trace
  4. verify    one full-model pass over [pending, d1..dk]: logits, and the recurrent states after every position
  5. judge     how many drafts the full model accepts (a prefix), and the full model's next token
  6. commit    keep the recorded state after the kept tokens (pending + accepted); roll the KV caches back by length

Steps 2 and 5 have two forms: greedy (temperature 0), whose output is plain greedy decoding's, token for token, and
sampling (speculative sampling, Leviathan et al. 2023), exact in distribution; so has expected_accepted, beside step 5,
which says how many drafts a round accepts on average (what k="auto" weighs it by). Which parts a draft leaves out is
data (drafts.py): one of the paper's drafts, a draft file that hsd_search.py found by measurement, or the text itself
(lookup; before a draft model: a cascade). With k="auto" the draft length changes from round to round and drafting
pauses where it does not pay (auto_k). README: how to run it; cli.py: the command line's arguments and checks, printing;
hsd_eval.py: measurements.

Names (one meaning each, here and in drafts.py):
  pending    the last committed token, not yet fed to the model; every round and plain step starts by feeding it
  drafts     the token ids a round's draft proposed, d1..dk (a list of ints); drafted: how many (a count); the
             module drafts.py says what a draft is
  proposed   the ids lookup proposed from the text (the committed tokens' own n-grams), which a round's drafts
             start with (text_round) or a cascade's draft model checks first (with a fixed k); from_text: how
             many drafts are the text's
  accepted   how many of the drafts the full model accepted (a prefix); the next token: its own after them;
             expected: how many it accepts on average (expected_accepted: at a temperature, before the draw)
  kept       what commit keeps of a verify pass: the pending token and the accepted drafts
  Draft      what a generation runs (drafts.Draft): a name, a skip, k, a stop, -k auto's costs, the lookup's n and
             a draft file's predicted speedups; chosen: the Draft choose_draft decided on; asked: what it was
             asked for (a name, a Skip, a draft file or a Draft)
  skip       a models.Skip: which units of which layers the draft model leaves out
  unit       a part of a layer a draft can leave out: its attention, its recurrent mixer or its MLP (models.UNITS)
  k          the most drafts a round proposes, or "auto" (then a Plan says the next k, from the rounds judged)
  stop, eos  what ends drafting earlier: a draft less probable than stop; the end-of-text token (it ends generation)
  c, v[d], r costs in units of one plain step: a draft step; a verify pass over the pending token and d drafts;
             what a round costs beyond them (cost_model.round_cost)
  q, p       the draft's and the full model's distributions at the temperature (sampling)
  plain step one token of plain decoding: the full model fed the pending token, nothing drafted
  n          the model's number of layers, in the paper's draft rules (drafts.draft_skip)
  s          a generation's statistics (a dict) in the command line; a step is a Step
"""
import argparse
import contextlib
import json
import os
import signal
import sys
import warnings
from collections import namedtuple

try:
    import torch

    import cli
    import cost_model
    import models
    from cost_model import clock, costs_up_to, default_costs, least_break_even, least_paying_k
    from drafts import (DRAFTS, LOOKUP, Draft, draft_costs, draft_skip, draft_words, is_draft_file, paper_draft,
                        prediction_at, predicts_a_loss, read_draft_file, split_lookup)
except KeyboardInterrupt:                     # Ctrl-C while torch loads (a second or more): one line, as later on
    if __name__ != "__main__":
        raise
    print("\nhsd: interrupted", file=sys.stderr)
    sys.exit(130)


# --- The state: snapshot, restore, commit ------------------------------------------------------------------------
Snapshot = namedtuple("Snapshot", "length layers")    # committed tokens; per layer a models.LayerState: conv, ssm


def snapshot(cache):
    """Remember the committed state. References, not copies: the models never write a conv window or a recurrent
    state in place (they make new tensors); KV caches are written only beyond their length, all there is to keep."""
    return Snapshot(cache.length, [models.LayerState(conv=s.conv, ssm=s.ssm) for s in cache.layers])


def restore(cache, snap):
    """Put a snapshot back: O(layers), nothing is copied."""
    cache.length = snap.length
    for state, kept in zip(cache.layers, snap.layers):
        state.conv, state.ssm = kept.conv, kept.ssm


def commit(cache, start, kept, recorded):
    """Make the cache hold the first `kept` tokens of the verify pass that started at position start, and nothing after
    them; recorded is what that pass recorded (verify's second value: per layer a models.Recorded, None for attention
    layers). A KV cache is cut back by its length; a recurrent state cannot be cut back, so each recurrent layer takes
    what the pass recorded after its kept-th token: its conv window and its state."""
    cache.length = start + kept
    for state, layer in zip(cache.layers, recorded):
        if layer is not None:
            state.conv = layer.conv_inputs[:, kept:kept + state.conv.shape[1]]   # the K-1 inputs up to that token
            state.ssm = layer.states[kept - 1]


# --- One round of speculation ------------------------------------------------------------------------------------
def probabilities(logits, temperature):
    """softmax(logits / temperature) in float64, on the CPU where the sampling generator lives: (..., V)."""
    return torch.softmax(logits.double().cpu() / temperature, dim=-1)


def draft(model, cache, pending, skip, k, temperature=0.0, generator=None, stop=None, eos=None, proposed=()):
    """Step 2: up to k drafts from the draft model (the full model without `skip`), continuing from the cache ->
    (drafts, q). It feeds pending, d1, ..., d(k-1), one token a step (dk is fed by the verify pass), and so advances
    the cache: restore() after. Greedy (temperature 0): each draft is the draft model's argmax; at a temperature, a
    draw with the generator from probabilities(logits, temperature), whose rows make q (len, V), the draft's
    distributions, which accept_sampled needs (None when greedy). Drafting ends early after a draft the draft model
    gives a probability below `stop` (unsure of it, so what follows would likely be rejected too), or after the
    end-of-text token eos (nothing after it is output). Both look only at the draft's own tokens and distributions,
    never at what the full model will say: greedy output stays plain greedy decoding's, sampling stays exact in
    distribution.

    proposed (a cascade, lookup+DRAFT, with a fixed k: generate_steps says when): the lookup's drafts, which the draft
    model checks first in one round of its own, text_round with the text as the draft and the draft model as the
    verifier; the drafts then start with the proposed tokens it accepted and its own next token, and the draft model
    drafts on from there. Its judge is exact, so each of these drafts is a sample of the draft model, and its rows
    are their q."""
    drafts, q, token = [], [], pending
    if proposed:
        accepted, token, logits = text_round(model, cache, pending, proposed, skip, temperature, generator)
        drafts = (proposed[:accepted] + [token])[:k]
        q = list(probabilities(logits[:len(drafts)], temperature)) if temperature > 0 else []
    while len(drafts) < k and eos not in drafts:
        logits = model(torch.tensor([[token]], device=cache.device), cache, skip=skip)[0, -1]      # (V,)
        if temperature > 0:
            q.append(probabilities(logits, temperature))                                          # (V,)
            token = int(torch.multinomial(q[-1], 1, generator=generator))
        else:
            token = int(logits.argmax())
        drafts.append(token)
        if stop is not None and (q[-1] if q else torch.softmax(logits.float(), dim=-1))[token] < stop:
            break
    drafts = drafts[:drafts.index(eos) + 1] if eos in drafts else drafts
    return drafts, torch.stack(q[:len(drafts)]) if q else None


def verify(model, cache, pending, drafts, skip=None):
    """One full-model pass over [pending, d1..dk] -> (logits (k+1, V), recorded); given a skip, the draft model's (a
    cascade's inner check). Row i of logits predicts the token after position i, so rows 0..k-1 judge d1..dk and row
    k gives the bonus token. recorded: per layer, the states
    after every position (models.Recorded; None for attention layers), from which commit keeps one. The pass leaves
    the cache holding all k+1 tokens (length start + k + 1), as any forward pass would; commit then cuts it back to
    the tokens kept, since the rejected drafts must not stay in it."""
    logits, recorded = model(torch.tensor([[pending, *drafts]], device=cache.device), cache, skip=skip,
                             record_states=True)
    return logits[0], recorded


def accept(drafts, logits):
    """(accepted, next_token): accepted = the length of the longest prefix of drafts equal to the full model's greedy
    choices; next_token = the full model's own choice after it (the correction if accepted < k, the bonus if all k
    were accepted). Both are ints."""
    choices = logits.argmax(dim=-1).tolist()
    accepted = 0
    while accepted < len(drafts) and drafts[accepted] == choices[accepted]:
        accepted += 1
    return accepted, choices[accepted]


def accept_sampled(drafts, q, logits, temperature, generator):
    """(accepted, next_token) for sampled drafts, both ints; q (k, V) the draft's distributions, logits (k+1, V) the
    verify pass's rows. Draft i is accepted with probability min(1, p(d_i) / q(d_i)), p the full model's distribution
    at the temperature; the first rejection ends the round, its token drawn from max(0, p - q) (weights); all accepted:
    the bonus from p."""
    p = probabilities(logits, temperature)                                            # (k+1, V)
    for i, token in enumerate(drafts):
        if torch.rand((), dtype=torch.float64, generator=generator) >= p[i, token] / q[i, token]:     # rejected
            return i, int(torch.multinomial((p[i] - q[i]).clamp(min=0), 1, generator=generator))
    return len(drafts), int(torch.multinomial(p[-1], 1, generator=generator))


def judge(drafts, q, logits, temperature=0.0, generator=None):
    """Step 5, greedy (accept) or sampled (accept_sampled): (accepted drafts, the full model's next token)."""
    if temperature == 0:
        return accept(drafts, logits)
    return accept_sampled(drafts, q, logits, temperature, generator)


def expected_accepted(drafts, q, logits, temperature=0.0):
    """How many of the drafts the full model accepts on average, a float (drafts, q and logits as judge takes them):
    -k auto weighs a round by it (auto_k), not by what a sampled round happened to accept, so that one lucky or
    unlucky draw neither keeps a draft drafting that does not pay nor pauses one that does. At a temperature: the sum
    over i of a_1 a_2 ... a_i, where a_j = sum over the vocabulary of min(p_j, q_j) = 1 - TV(p_j, q_j) is the chance
    that accept_sampled accepts a draw from q_j at the drafts' position j (p_j from logits row j - 1, as accept_sampled
    reads it): the accepted drafts' mean over each position's draw, along the drafts drawn. It reads distributions,
    not the verdict's draws; the next round's k depends only on rounds already judged, so sampling stays exact.
    Greedy: accept's count, which is certain."""
    if temperature == 0 or not drafts:
        return float(accept(drafts, logits)[0])
    chances = torch.minimum(probabilities(logits[:len(drafts)], temperature), q).sum(dim=-1)    # (k,): a_1 .. a_k
    return float(torch.cumprod(chances, dim=0).sum())


def speculative_round(model, cache, pending, skip, k, temperature=0.0, generator=None, stop=None, eos=None,
                      proposed=()):
    """One round (module docstring): (drafts, accepted, next token, expected), expected = expected_accepted, what
    -k auto weighs the round by. The committed tokens grow by the pending token and the accepted drafts; the next
    token becomes the new pending token. k drafts at most: a stop (a confidence threshold) or the end-of-text token
    eos may end drafting early; temperature 0 is greedy, above it the round samples with the generator's random
    stream; draft and judge take these as the round is given them, and draft the lookup's proposed ids (a cascade;
    the lookup alone is text_round)."""
    snap = snapshot(cache)                                                                            # 1
    drafts, q = draft(model, cache, pending, skip, k, temperature, generator, stop, eos, proposed)    # 2
    restore(cache, snap)                                                                              # 3
    logits, recorded = verify(model, cache, pending, drafts)                                          # 4
    accepted, next_token = judge(drafts, q, logits, temperature, generator)                           # 5
    expected = expected_accepted(drafts, q, logits, temperature)                                      # and on average
    commit(cache, snap.length, accepted + 1, recorded)       # 6: kept, the pending token and the accepted drafts
    return drafts, accepted, next_token, expected


def plain_step(model, cache, pending, temperature=0.0, generator=None):
    """Plain decoding, the baseline: feed the pending token; the next token is judge's with nothing drafted."""
    logits = model(torch.tensor([[pending]], device=cache.device), cache)[0]          # (1, V)
    return judge([], None, logits, temperature, generator)[1]


# --- The text as the draft: lookup, and its round ------------------------------------------------------------
LOOKUP_N, LOOKUP_LEAST, LOOKUP_K = 3, 3, 8  # the largest n-gram, the shortest generation matches (at most n), the most
# drafts: measured on the toys (README, "Draft strategies"; RESULTS.md, "Drafts from the text")


def lookup(tokens, n=LOOKUP_N, k=LOOKUP_K, index=None, least=1):
    """Prompt lookup: drafts from the text itself -> a list of up to k token ids (possibly empty).

    tokens: the committed ids, prompt and output (a list of ints), the pending token last; n: the largest n-gram;
    k: the most tokens to propose; least: the shortest n-gram (at most n). For size = n, ..., least: if the last `size`
    tokens (the suffix) occur earlier, wholly before the suffix itself (an occurrence overlapping it is not "earlier"),
    propose the up to k tokens that followed the LATEST such occurrence, which end where the committed tokens end; the
    first size that occurs wins (the longest match). Nothing occurs: []. Measured on the toys (RESULTS.md, "Drafts from
    the text"): the latest occurrence predicts the model's greedy tokens better than the earliest, larger n change
    nothing, k from 8 to 12 is best; generation passes least = LOOKUP_LEAST, as on the toys' one-character tokens a
    match of 1 or 2 proposes noise (at T = 0.6 it cost 6-12 % of plain decoding's speed, where 3 gains 4-7 %).
    index: None scans the tokens, O(len(tokens) n); index_ngrams' dict gives the same answer in O(n)."""
    for size in range(min(n, len(tokens) // 2), min(least, n) - 1, -1):
        suffix = tokens[-size:]
        if index is not None:
            end = index.get(tuple(suffix))
        else:                                       # occurrences starting at len - 2 size, ..., 0: the latest first
            end = next((start + size for start in range(len(tokens) - 2 * size, -1, -1)
                        if tokens[start:start + size] == suffix), None)
        if end is not None:
            return tokens[end:end + k]
    return []


def index_ngrams(index, tokens, n, before=0):
    """Bring lookup's index up to the committed tokens -> how many tokens it now covers (pass it as `before` next
    time). index: a dict {n-gram (a tuple of 1..n ids): the position after its latest occurrence}, holding each
    occurrence a lookup may find, one that ends at least its own size before the end; before: len(tokens) when it
    was last brought up to date (0: empty). A scan costs ~5 ms at 4,096 tokens on this CPU, the index microseconds."""
    for size in range(1, n + 1):
        for end in range(max(size, before - size + 1), len(tokens) - size + 1):
            index[tuple(tokens[end - size:end])] = end
    return len(tokens)


def text_round(model, cache, pending, proposed, skip=None, temperature=0.0, generator=None):
    """A round whose draft is the text (lookup's proposed ids, at least one) -> (accepted, next token, logits (d+1, V)).
    No model drafts, so there is nothing to snapshot or restore, and q is one-hot: steps 4-6 of the round, verify,
    judge and commit, by the full model (skip None) or, as a cascade's inner check, by the draft model (its skip).
    One-hot q makes accept_sampled the exact rule for a deterministic draft: d is accepted with probability
    min(1, p(d) / 1) = p(d), and after a rejection max(0, p - q) is p with d removed (renormalised by the draw)."""
    start = cache.length
    q = torch.nn.functional.one_hot(torch.tensor(proposed), model.config.vocab_size).double() if temperature else None
    logits, recorded = verify(model, cache, pending, proposed, skip)                         # 4
    accepted, next_token = judge(proposed, q, logits, temperature, generator)                # 5
    commit(cache, start, accepted + 1, recorded)                                             # 6
    return accepted, next_token, logits


# --- k="auto": the draft length, and whether to draft at all, from the rounds already judged ----------------------
AUTO_MAX, AUTO_STOP = 16, 0.5   # the largest k, the stop of a draft that brings none
AUTO_MEMORY = 0.875     # the moving gain keeps this much of what came before each round: about 8 rounds count
AUTO_PAUSE, AUTO_LONGEST_PAUSE = 16, 128        # plain steps of a pause, doubling to this while tries do not pay
Plan = namedtuple("Plan", "k plain pause gain", defaults=(0.0,))
# draft k next, after `plain` plain steps; pause: the next pause; gain: the recent rounds' tokens made less what they
# cost (cost_model.round_cost, in full steps), a moving sum that keeps AUTO_MEMORY of itself per round


def first_plan(costs, predicted=None):
    """-k auto's plan before the first round, for the draft's costs (costs_up_to's): the fewest drafts that can pay off
    (cost_model.least_paying_k: fewer cost more than they could make even if all were kept); if no k can, or if the
    draft file's own search predicted it to lose at this temperature (predicted: found_by.predicted_speedup there,
    made at the file's own k and stop, not -k auto's, below 1), the longest pause, then a try."""
    least = least_paying_k(costs, AUTO_MAX)
    if not least or predicts_a_loss(predicted):
        return Plan(least or 1, AUTO_LONGEST_PAUSE, AUTO_LONGEST_PAUSE)
    return Plan(least, 0, AUTO_PAUSE)


def auto_k(plan, drafted, accepted, expected, costs):
    """-k auto: the plan after a step that drafted `drafted` tokens and accepted `accepted` of them, `expected` on
    average (speculative_round's; greedy the same; 0, 0, 0: a plain step). costs: the draft's (c, v, r), v[d] for
    every d (cost_model.costs_up_to). When the recent rounds made fewer tokens than they cost (the moving gain, which
    counts each round's expected drafts, below 0), `pause` plain steps, then a round of one draft, the pause doubling
    (up to AUTO_LONGEST_PAUSE) while the tries do not pay (a pause pauses a cascade's draft model only; the text's
    rounds, generate_steps runs them, count as plain steps, in a pause and out of it). Otherwise: all k accepted, two
    more next time (up to AUTO_MAX); some rejected, one fewer; none accepted, the fewest that can pay (least_paying_k;
    a try after a pause drafts as many: fewer could not pay even if all were kept). It looks only at rounds already
    judged: greedy output stays plain greedy decoding's and sampling stays exact. Why the gain, not the acceptance:
    RESULTS.md, "-k auto"."""
    if drafted == 0:                                           # a plain step: one less to wait
        return plan._replace(plain=max(0, plan.plain - 1))
    made = expected + 1                               # its accepted drafts (on average) and the full model's token
    gain = AUTO_MEMORY * plan.gain + made - cost_model.round_cost(drafted, *costs)
    least = least_paying_k(costs, AUTO_MAX) or 1               # fewer drafts never pay
    if gain < 0:                                               # drafting costs more than it makes: pause
        return Plan(least, plan.pause, min(AUTO_LONGEST_PAUSE, 2 * plan.pause), 0.0)
    if accepted == drafted:                                    # all accepted (a stop may have ended the round early)
        return Plan(min(AUTO_MAX, plan.k + 2) if drafted == plan.k else plan.k, 0, AUTO_PAUSE, gain)
    return Plan(max(least, plan.k - 1) if accepted else least, 0, AUTO_PAUSE, gain)


def choose_draft(model, asked=None, k=None, costs=None, temperature=None, context=None):
    """The one place a generation's draft is decided -> a Draft. asked: None (the paper's draft for the model's
    family), a name from DRAFTS ("none": plain decoding), "lookup" (the text's n-grams, LOOKUP_N), "lookup+DRAFT" (a
    cascade: DRAFT any of these but none), a models.Skip, a draft file (any other str, or a pathlib.Path; its notes as
    Python warnings) or a Draft. k: drafts per round or "auto"; None: the draft file's, else LOOKUP_K for the lookup
    alone, 2 for any other draft; None for plain decoding, whatever is asked. A draft file keeps its stop rule; a
    named draft or a Skip stops at AUTO_STOP with k="auto" and never with a fixed k (the lookup alone never: its
    drafts are certain). The lookup alone asked for k="auto" runs k=AUTO_MAX: without a draft step there is nothing to
    weigh, and on the toys its longest proposals paid best (RESULTS.md, "-k auto"). costs (c, v, r) for -k auto: those
    given, else the draft file's, else default_costs (a cascade: its draft model's, for what runs most). temperature,
    context: the run's, for a draft file's notes (drafts.run_notes)."""
    text, asked = split_lookup(asked)
    if isinstance(asked, Draft):
        chosen = asked
    elif is_draft_file(asked):
        chosen, notes = read_draft_file(asked, model, temperature, context)
        for line in notes:
            warnings.warn(line, stacklevel=3)
    else:
        if isinstance(asked, models.Skip):
            models.check_skip(model.config, asked)
            name, skip = repr(asked), asked
        else:
            name = paper_draft(model.config) if asked is None else asked
            skip = None if name == "none" else draft_skip(model.config, name)
        chosen = Draft(name, skip, 2, AUTO_STOP if k == "auto" else None)
    if text:                                              # the lookup proposes: alone, or the first of a cascade
        alone = chosen.skip is None
        chosen = chosen._replace(name=LOOKUP if alone else f"{LOOKUP}+{chosen.name}", lookup=LOOKUP_N,
                                 k=LOOKUP_K if alone else chosen.k, stop=None if alone else chosen.stop)
    if chosen.skip is None and chosen.lookup is None:
        return chosen._replace(k=None, stop=None, costs=None)
    k = chosen.k if k is None else k
    if not (k == "auto" or (isinstance(k, int) and not isinstance(k, bool))):
        raise models.UsageError(f'k must be a number of drafts or "auto" (got {k!r})')
    if k == "auto" and chosen.skip is None:               # the lookup alone: no draft step to weigh, nothing to adapt
        k = AUTO_MAX
    if costs is not None:
        costs = draft_costs(*costs)
    elif chosen.costs is None and k == "auto":                          # the default rule
        costs = default_costs(model, chosen.skip)
    return chosen._replace(k=k, costs=costs or chosen.costs)


# --- Generation --------------------------------------------------------------------------------------------------
Step = namedtuple("Step", "kind drafts accepted next_token tokens seconds proposed from_text", defaults=(0, 0))
# kind: "prefill" (no tokens yet), "plain" (a token of plain decoding) or "round" (drafts, the first `accepted` of
# them accepted, then next_token); tokens: what the step adds to the output (cut after EOS); seconds: its own time;
# proposed: how many tokens the lookup proposed; from_text: how many of the drafts are the text's (the first ones).
Round = namedtuple("Round", "drafts accepted next_token")    # an entry of statistics()["trace"]


def choose_seed(temperature, seed=None):
    """A generation's seed: the one given; at a temperature without one, a fresh one drawn from torch's global random
    stream (so torch.manual_seed repeats it), which the statistics report; None when greedy and none is given."""
    if seed is None and temperature > 0:
        return int(torch.randint(2 ** 31, ()))
    return seed


def prefill(model, cache, tokens, skip=None):
    """Feed tokens with the full model (or, given a skip, the draft model): chunked scans, no logits needed."""
    if tokens:
        model.hidden_states(torch.tensor([tokens], device=cache.device), cache, skip=skip)


@torch.inference_mode()
def generate_steps(model, prompt_ids, max_new_tokens, draft=None, k=None, eos_token_id=None, temperature=0.0,
                   seed=None, costs=None):
    """generate, one step at a time: yields a Step after the prefill and after every round (or plain step), so that a
    caller can show the tokens as they are committed. Arguments as for generate (seed None at a temperature: torch's
    global random stream). Each step, decided here: the text's proposal judged by the full model alone (the lookup; a
    cascade's with -k auto, or of k tokens: the draft model's check cost more than it saved, RESULTS.md), else a round
    of the draft model (a cascade's checks a shorter proposal first, then drafts on to k), else a plain step."""
    prompt = cli.prompt_list(prompt_ids)
    chosen = choose_draft(model, draft, k, costs)
    cli.check_request(model.config, prompt, max_new_tokens, chosen.k, temperature)
    eos = model.config.eos_token_id if eos_token_id is None else eos_token_id
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    cache = models.Cache(model, max_len=len(prompt) + max_new_tokens)   # no round drafts past the last new token
    committed, index, indexed = list(prompt), {}, 0     # the lookup's text: the committed tokens, pending last
    t0 = clock(cache.device)
    prefill(model, cache, prompt[:-1])
    yield Step("prefill", [], 0, None, [], clock(cache.device) - t0)
    auto = chosen.k == "auto"
    pause_by = costs_up_to(chosen.costs, AUTO_MAX) if auto else None       # what -k auto weighs its rounds by
    predicted = prediction_at(chosen.predicted, temperature)               # a draft file's, at this temperature
    produced, pending, plan = 0, prompt[-1], first_plan(pause_by, predicted) if auto else None
    while produced < max_new_tokens:
        t0 = clock(cache.device)
        room = max_new_tokens - produced - 1                     # no round drafts past the last new token
        pausing = auto and plan.plain > 0     # -k auto pauses the draft model; the text, no draft step, drafts on
        k_model = 0 if chosen.skip is None or pausing else min(plan.k if auto else chosen.k, room)   # the draft model's
        proposed = []
        if chosen.lookup and room:
            indexed = index_ngrams(index, committed, chosen.lookup, indexed)
            proposed = lookup(committed, chosen.lookup, min(AUTO_MAX if auto else chosen.k, room), index,
                              least=LOOKUP_LEAST)
            proposed = proposed[:proposed.index(eos) + 1] if eos in proposed else proposed
        text_alone = len(proposed) >= (1 if auto else max(k_model, 1))    # the text is the draft, the full model
        expected = 0.0                                   # a draft model's round's accepted drafts on average: auto_k
        if text_alone:                                                     # its judge (the docstring says when)
            drafts, (accepted, pending, _) = proposed, text_round(model, cache, pending, proposed, None, temperature,
                                                                  generator)
        elif k_model:                                            # a draft model, checking what the text proposed
            drafts, accepted, pending, expected = speculative_round(model, cache, pending, chosen.skip, k_model,
                                                                    temperature, generator, chosen.stop, eos, proposed)
        else:                                                    # nothing to draft: a plain step
            drafts, accepted, pending = [], 0, plain_step(model, cache, pending, temperature, generator)
        if auto:                                                 # the text's rounds count as plain steps
            plan = auto_k(plan, 0 if text_alone else len(drafts), accepted, expected, pause_by)
        new = drafts[:accepted] + [pending]
        if eos in new:
            new = new[:new.index(eos) + 1]
        produced += len(new)
        committed += new
        from_text = next((i for i, (d, t) in enumerate(zip(drafts, proposed)) if d != t),    # the text's drafts
                         min(len(drafts), len(proposed)))
        yield Step("round" if drafts else "plain", drafts, accepted, pending, new, clock(cache.device) - t0,
                   len(proposed), from_text)
        if eos in new:
            return


def generate(model, prompt_ids, max_new_tokens, draft=None, k=None, eos_token_id=None, temperature=0.0, seed=None,
             costs=None):
    """Self-speculative decoding: plain greedy decoding's tokens (temperature 0), or at a temperature T > 0 tokens
    distributed as plain sampling's at T (seed: a seeded random stream; None: choose_seed draws one, and the statistics
    say which). prompt_ids: a list of ints, a 1-D or a (1, T) LongTensor (cli.prompt_list); draft, k and costs (c, v, r)
    of -k auto: as choose_draft takes them (default: the paper's draft for the family, k=2); eos_token_id: the model's
    by default. Stops after max_new_tokens or EOS (kept). Returns (new token ids, statistics() dict)."""
    prompt_ids = cli.prompt_list(prompt_ids)
    context = len(prompt_ids) + max_new_tokens // 2                      # a draft file's note compares its own
    chosen, seed = choose_draft(model, draft, k, costs, temperature, context), choose_seed(temperature, seed)
    steps = list(generate_steps(model, prompt_ids, max_new_tokens, chosen, chosen.k, eos_token_id, temperature, seed))
    return [t for step in steps for t in step.tokens], statistics(chosen, steps, seed)


PASSES = cost_model.Passes(prefill, snapshot, restore, plain_step, draft, verify, judge, commit, generate)
# the round's functions, which cost_model.measure_costs times as generation runs them, and generation (for r)


def statistics(chosen, steps, seed=None):
    """What a generation with the Draft `chosen` did, from its steps; alpha: RESULTS.md, "Acceptance". "k" is the k
    asked for (a number, "auto": then "drafts_per_round" says how long the rounds were on average; None: plain
    decoding); "least_break_even": with -k auto, the acceptance above which its costs let drafting pay
    (cost_model.least_break_even); "seed": the sampling's seed; with a lookup, the text's drafts apart: "proposed",
    the tokens the lookup proposed, "from_text", the drafts that are the text's,
    "from_text_accepted", how many of those the full model accepted."""
    rounds = [step for step in steps if step.kind == "round"]
    drafted = sum(len(r.drafts) for r in rounds)
    accepted = sum(r.accepted for r in rounds)
    new_tokens = sum(len(step.tokens) for step in steps)
    decode_s = sum(step.seconds for step in steps if step.kind != "prefill")
    longest = chosen.k if chosen.k not in ("auto", None) else max((len(r.drafts) for r in rounds), default=0)
    return {"draft": chosen.name, "k": chosen.k, "stop": chosen.stop, "seed": seed, "drafted": drafted,
            "accepted": accepted, "alpha": accepted / drafted if drafted else None, "rounds": len(rounds),
            "plain_steps": sum(step.kind == "plain" for step in steps),
            "drafts_per_round": drafted / len(rounds) if rounds else None,
            "accepted_per_round": accepted / len(rounds) if rounds else None,
            "accepted_histogram": [sum(r.accepted == a for r in rounds) for a in range(longest + 1)],
            "least_break_even": least_break_even(chosen.costs, AUTO_MAX) if chosen.k == "auto" else None,
            "new_tokens": new_tokens, "prefill_s": sum(step.seconds for step in steps if step.kind == "prefill"),
            "decode_s": decode_s, "round_s": sum(r.seconds for r in rounds),
            "tokens_per_s": new_tokens / decode_s if decode_s else None,
            "proposed": sum(step.proposed for step in steps) if chosen.lookup else None,
            "from_text": sum(r.from_text for r in rounds) if chosen.lookup else None,
            "from_text_accepted": sum(min(r.from_text, r.accepted) for r in rounds) if chosen.lookup else None,
            "trace": [Round(r.drafts, r.accepted, r.next_token) for r in rounds]}


# --- Command line ------------------------------------------------------------------------------------------------
PROMPT = "The function returns"          # the text continued when neither --prompt nor --prompt-file is given


def run_generate(args, model, tokenizer, raw=None):
    """Generate for the command line, printing the text (or each round) as it comes; returns what --json prints.
    raw: the stream that takes the new text alone, as it comes, unescaped (--raw); None: the quoted output line."""
    machine = cost_model.machine_state(model, args.dtype)          # before decoding: the load of others, not ours
    prompt, temperature = tokenizer.encode(args.prompt).ids, args.temperature or 0.0
    text, asked = split_lookup(args.draft)
    if is_draft_file(asked):                  # read here: its notes print as hsd's warnings, not as Python's
        read, notes = read_draft_file(asked, model, temperature, len(prompt) + args.max_new_tokens // 2)
        for line in notes:
            print(f"hsd: warning: {line}", file=sys.stderr)
        asked = read._replace(name=args.draft, lookup=read.lookup or LOOKUP_N) if text else read
    chosen = choose_draft(model, asked if isinstance(asked, Draft) else args.draft, args.k)
    cli.check_request(model.config, prompt, args.max_new_tokens, chosen.k, temperature)
    lost = sorted(set(args.prompt) - set(tokenizer.decode(prompt, skip_special_tokens=False)))
    if lost:
        print(f"hsd: warning: the tokenizer has no token for {', '.join(map(repr, lost))}: the prompt reads "
              f"{cli.show(tokenizer, prompt)}", file=sys.stderr)
    if args.seed is not None and temperature == 0:
        print("hsd: note: --seed has no effect without --temperature (greedy decoding draws nothing)", file=sys.stderr)
    if args.k is not None and chosen.k is None:
        print("hsd: note: -k has no effect with --draft none (plain decoding drafts nothing)", file=sys.stderr)
    if cost_model.busy_warning(machine):                          # said before the run, which it slows
        print(f"hsd: warning: {cost_model.busy_warning(machine)}", file=sys.stderr)
    seed = choose_seed(temperature, args.seed)                                                       # printed
    sampling = f"temperature {temperature}, seed {seed}" if temperature > 0 else "greedy"
    print(f"model   {args.model} ({model.config.num_layers} layers, {args.dtype} on {args.device}), {sampling}, "
          f"{draft_words(chosen, model.config, args.draft is None, LOOKUP_LEAST)}")
    print(f"prompt  {cli.show(tokenizer, prompt)}")
    longest = AUTO_MAX if chosen.k == "auto" else chosen.k or 1
    cost_model.warm_up(model, max(1, min(longest, args.max_new_tokens - 1)))     # every round length it can run
    steps, tokens, shown, plain_run = [], [], "", 0            # plain_run: plain steps since the trace's last round
    color = sys.stdout.isatty() and not os.environ.get("NO_COLOR")                  # https://no-color.org
    print("" if args.trace or raw else 'output  "', end="", flush=True)
    for step in generate_steps(model, prompt, args.max_new_tokens, chosen, chosen.k, None, temperature, seed):
        steps.append(step)
        tokens += step.tokens
        plain_run = plain_run + 1 if step.kind == "plain" else plain_run
        if args.trace and plain_run and step.kind == "round":
            print(cli.plain_line(plain_run), flush=True)
            plain_run = 0
        if args.trace and step.kind == "round":
            print(cli.trace_line(sum(done.kind == "round" for done in steps), step, tokenizer, color), flush=True)
        text = tokenizer.decode(tokens, skip_special_tokens=raw is not None)    # --raw: the text, no <|endoftext|>
        if (raw or not args.trace) and not text.endswith("\ufffd"):   # a character whose bytes are not all there yet
            new = text[len(shown):]
            print(new if raw else json.dumps(new, ensure_ascii=False)[1:-1], end="", flush=True, file=raw or sys.stdout)
            shown = text
    rest = json.dumps(text[len(shown):], ensure_ascii=False)[1:-1] + '"'        # what the loop has not shown yet
    if args.trace and plain_run:
        print(cli.plain_line(plain_run))
    if raw:
        print(text[len(shown):], file=raw, flush=True)
    elif args.trace:
        print(f"output  {cli.show(tokenizer, tokens)}")
    else:
        print(rest)
    text = tokenizer.decode(tokens, skip_special_tokens=False)
    s = {"model": args.model, "temperature": temperature, "seed": seed, "new_token_ids": tokens, "new_text": text,
         **statistics(chosen, steps, seed)}
    print(*cli.summary(s, args.max_new_tokens, model.config.eos_token_id, tokenizer), sep="\n")
    if args.check:
        official = args.model in models.OFFICIAL or args.model in models.OFFICIAL.values()
        print(cli.check(s, model, prompt, args.max_new_tokens, chosen, args.repeats, machine, generate, official))
    return {**s, "trace": [r._asdict() for r in s["trace"]]}


def main(argv=None):
    p = argparse.ArgumentParser(description="Self-speculative decoding in hybrid language models.")
    p.error = lambda message: p.exit(2, f"hsd: error: {message} (see --help)\n")     # one line, no usage text
    p.add_argument("--model", help="(required) " + ", ".join([*models.TOYS, *models.OFFICIAL, *models.TINY]) +
                   ", a Hub id (owner/name) or a folder in the official layout (config.json, *.safetensors)")
    p.add_argument("--draft", help="component, layerskip, early-exit, none (plain decoding), a draft file from "
                                   "hsd_search.py, lookup (the text's own n-grams) or lookup+DRAFT (a cascade: the "
                                   "lookup proposes, DRAFT drafts where it has nothing) (default: the paper's draft "
                                   "for the family: component for the hybrids, layerskip for the Transformer)")
    p.add_argument("-k", type=cli.k_argument, help="drafts per round, or auto: a length that adapts from round to "
                                                   "round (the lookup alone: 16) (default: the draft file's, else 2; "
                                                   "the lookup's 8)")
    p.add_argument("--prompt", help=f"the text to continue (default: {PROMPT!r})")
    p.add_argument("--prompt-file", metavar="PATH", help="the text to continue, from a UTF-8 file (- : standard input)")
    p.add_argument("--max-new-tokens", type=int, default=64, help="at most this many new tokens (default: 64)")
    p.add_argument("--temperature", type=float, help="sample at this temperature (default: 0, greedy)")
    p.add_argument("--seed", type=int, help="seed of the sampling (default: a fresh one, printed)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="(default: cpu)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="(default: float32)")
    p.add_argument("--threads", type=int, help="torch's CPU threads, set before anything is timed (default: torch's)")
    p.add_argument("--trace", action="store_true", help="show every round: drafts, accepted, the next token")
    p.add_argument("--check", action="store_true", help="decode plainly too; fail if tokens differ; print the speedup")
    p.add_argument("--repeats", type=int, default=5, help="--check's timed runs of each kind (default: 5)")
    p.add_argument("--json", action="store_true", help="the statistics as one JSON object: stdout holds it alone, "
                                                      "the other lines go to stderr")
    p.add_argument("--raw", action="store_true", help="stdout holds the new text alone, as it comes, unescaped and "
                                                     "without special tokens; the other lines go to stderr")
    args, unknown = p.parse_known_args(argv)
    misspelt = cli.misspelt_option(p, unknown)                  # --modle: did you mean --model?
    if args.model is None:
        p.error(misspelt or "the following arguments are required: --model")
    if unknown:                       # --eval, --out, --text, ...: the measurements have a command of their own
        p.error(f"unrecognized arguments: {' '.join(unknown)} (measurements: hsd_eval.py --model {args.model} ..."
                + (f"; {misspelt}" if misspelt else "") + ")")
    if args.json and args.raw:
        p.error("--json and --raw both take stdout: give one of them")
    if args.prompt is not None and args.prompt_file is not None:
        p.error("--prompt and --prompt-file both give the prompt: give one of them")
    if args.check and (args.temperature or args.max_new_tokens < 1 or args.repeats < 1):
        p.error("--check compares with greedy decoding: leave out --temperature, give --max-new-tokens >= 1 and "
                "--repeats >= 1")
    try:
        named = split_lookup(args.draft)[1]
    except models.UsageError as e:
        p.error(str(e))
    if is_draft_file(named) and not os.path.exists(named):
        p.error(f"unknown draft {named!r}: choose one of {', '.join(DRAFTS)}, or give a draft file (there is no "
                "such file)")
    problem = None if args.temperature is None else cli.temperature_problem(args.temperature)
    if problem:
        p.error(problem)
    if args.threads is not None and args.threads < 1:
        p.error(f"--threads takes a number of threads, at least 1, not {args.threads}")
    if args.threads:
        torch.set_num_threads(args.threads)                      # before the model is loaded, warmed up or timed
    stdout = sys.stdout
    try:
        args.prompt = cli.read_prompt(args.prompt_file) if args.prompt_file is not None else (
            PROMPT if args.prompt is None else args.prompt)
        model = models.load(args.model, getattr(torch, args.dtype), args.device)
        with contextlib.redirect_stdout(sys.stderr if args.json or args.raw else stdout):     # stdout: JSON or text
            s = run_generate(args, model, models.load_tokenizer(args.model), stdout if args.raw else None)
    except models.UsageError as e:
        print(f"hsd: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\nhsd: interrupted", file=sys.stderr)
        return 130
    if args.json:
        print(json.dumps(s), file=stdout)
    return 1 if s.get("identical_to_greedy") is False else 0


if __name__ == "__main__":
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)     # output piped into `head` and the like: stop quietly
    sys.exit(main())

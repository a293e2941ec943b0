"""The grader's self-check, the instructor's: python -m pytest -q test_exercises.py (EXERCISES.md).

Every exercise's starter code and every typical wrong solution fails its grading with the message written for it,
first; every reference passes, also with every exercise it does not need blanked; correct solutions written otherwise
pass; a handout holds the project, its tests and the starter code, and neither an answer nor this machinery. The
grading tests themselves are ordinary tests of the project's test files (test_models.py, test_hsd.py,
test_hsd_eval.py), beside the tests of each function; handouts leave this file out.
"""
import ast
import functools
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import textwrap
from collections import namedtuple
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

import exercises
from exercises import EXERCISES, exercise_by_name

HERE = os.path.dirname(os.path.abspath(__file__))

Mistake = namedtuple("Mistake", "what function old new message only", defaults=[None])
DRAFT_LOOP = """while len(drafts) < k and eos not in drafts:
    logits = model(torch.tensor([[token]], device=cache.device), cache, skip=skip)[0, -1]
    if temperature > 0:
        q.append(probabilities(logits, temperature))
        token = int(torch.multinomial(q[-1], 1, generator=generator))
    else:
        token = int(logits.argmax())
    drafts.append(token)
    if stop is not None and (q[-1] if q else torch.softmax(logits.float(), dim=-1))[token] < stop:
        break
drafts = drafts[:drafts.index(eos) + 1] if eos in drafts else drafts"""      # hsd.draft's loop and its end-of-text cut
LOOKUP_LOOP = """for size in range(min(n, len(tokens) // 2), min(least, n) - 1, -1):
    suffix = tokens[-size:]
    if index is not None:
        end = index.get(tuple(suffix))
    else:
        end = next((start + size for start in range(len(tokens) - 2 * size, -1, -1)
                    if tokens[start:start + size] == suffix), None)
    if end is not None:
        return tokens[end:end + k]"""                     # hsd.lookup's loop: a mistake in its header replaces it all
# A typical wrong solution: in `function`, the statements `old` (code of the reference, in any formatting: they are
# matched as syntax trees) become `new`; `message` is what the failure the student reads first must say. only: the
# grading test cases it is graded on, where it fails in one case alone (default: all of the exercise's).
MISTAKES = {
    "causal-conv": [
        Mistake("the window is ignored", "models.causal_conv", "inputs = torch.cat([window, x], dim=1)",
                "inputs = torch.cat([torch.zeros_like(window), x], dim=1)", "y ignores the window"),
        Mistake("the taps are reversed", "models.causal_conv", "w = weight[:, 0].to(f32)",
                "w = weight[:, 0].flip(-1).to(f32)", "the taps are reversed")],
    "mamba-recurrence": [
        Mistake("the decay comes after the input", "models.ssd_step",
                "state = decay * state\nstate.addcmul_(dt_x, B[:, :, None, :])",
                "state = decay * (state + dt_x * B[:, :, None, :])", "token 0: the decay was applied after adding"),
        Mistake("the state is updated in place", "models.ssd_step", "state = decay * state",
                "state = state.mul_(decay)", "the state passed in was changed"),
        Mistake("dt is left out of the input term", "models.ssd_step", "dt_x = (dt[:, :, None] * x)[..., None]",
                "dt_x = x[..., None]", "token 0: the input term lacks dt")],
    "delta-rule-recurrence": [
        Mistake("the prediction uses the memory before its decay", "models.gated_delta_rule_step",
                "prediction = (k[:, :, None, :] @ state).squeeze(-2)",
                "prediction = (k[:, :, None, :] @ (state / torch.exp(g)[:, :, None, None])).squeeze(-2)",
                "token 0: the prediction S^T k used the memory before its decay"),
        Mistake("beta is left out of the write", "models.gated_delta_rule_step",
                "error = beta[:, :, None] * (v - prediction)", "error = v - prediction", "token 0: the write lacks beta")],
    "ssd-chunked": [
        Mistake("the state is not decayed across chunks", "models.ssd_chunked",
                "state = torch.exp(a_cum[:, i, :, -1])[..., None, None] * state + chunk_updates[:, i]",
                "state = state + chunk_updates[:, i]", "its start state decayed over the chunk plus its own writes"),
        Mistake("positions read the chunk's start state without its decay", "models.ssd_chunked",
                "y_off = y_off * torch.exp(a_cum).permute(0, 1, 3, 2)[..., None]", "",
                "the output differs already in the first chunk")],
    "delta-rule-chunked": [
        Mistake("the start state's prediction is not subtracted", "models.gated_delta_rule_chunked",
                "u = U[:, i] - W[:, i] @ state", "u = U[:, i]", "the output differs already in the first chunk"),
        Mistake("the state is not decayed across chunks", "models.gated_delta_rule_chunked",
                "state = c[:, i, :, -1].exp()[..., None, None] * state + (k[:, i] * decay_to_end).transpose(-1, -2) @ u",
                "state = state + (k[:, i] * decay_to_end).transpose(-1, -2) @ u",
                "its start state decayed over the chunk plus its own writes")],
    "mamba-verify-states": [
        Mistake("the start state is left out of the states", "models.ssd_states",
                "return y.transpose(1, 2), StatesAfterEachToken(state, from_start, decay, x_dt, B)",
                "return y.transpose(1, 2), StatesAfterEachToken(torch.zeros_like(state), from_start, decay, x_dt, B)",
                "from an empty start state the outputs and states are right"),
        Mistake("the decay from the start leaves out the token's own", "models.ssd_states",
                "from_start = torch.exp(a.cumsum(dim=-1))", "from_start = torch.exp(a.cumsum(dim=-1) - a)",
                "from an empty start state the outputs and states are right")],
    "delta-rule-verify-states": [
        Mistake("the start memory's prediction is not subtracted", "models.gated_delta_rule_states",
                "rhs = beta * (v - from_start[..., None] * (k @ state))", "rhs = beta * v",
                "from an empty start memory the outputs and states are right"),
        Mistake("the triangular system without its unit diagonal", "models.gated_delta_rule_states",
                "u = torch.linalg.solve_triangular(M, rhs, upper=False, unitriangular=True)",
                "u = torch.linalg.solve_triangular(M, rhs, upper=False, unitriangular=False)",
                "even from an empty start memory")],
    "snapshot-restore": [
        Mistake("restore leaves the length as drafting left it", "hsd.restore", "cache.length = snap.length", "",
                "after drafting 5 tokens and restoring, the cache holds"),
        Mistake("restore forgets the conv windows", "hsd.restore", "state.conv, state.ssm = kept.conv, kept.ssm",
                "state.ssm = kept.ssm", "layer 0: after restore the conv window is not the one before drafting"),
        Mistake("the snapshot keeps the LayerState objects", "hsd.snapshot",
                "return Snapshot(cache.length, [models.LayerState(conv=s.conv, ssm=s.ssm) for s in cache.layers])",
                "return Snapshot(cache.length, list(cache.layers))",
                "layer 0: after restore the recurrent state is not the one before drafting"),
        Mistake("the snapshot is a plain tuple", "hsd.snapshot",
                "return Snapshot(cache.length, [models.LayerState(conv=s.conv, ssm=s.ssm) for s in cache.layers])",
                "return cache.length, [models.LayerState(conv=s.conv, ssm=s.ssm) for s in cache.layers]",
                "snapshot returned a tuple, not an hsd.Snapshot"),
        Mistake("restore puts the snapshot's layer states into the cache", "hsd.restore",
                "for state, kept in zip(cache.layers, snap.layers):\n    state.conv, state.ssm = kept.conv, kept.ssm",
                "cache.layers[:] = snap.layers", "layer 0: after restore the layer has no KV cache")],
    "commit": [
        Mistake("the last recorded state is kept", "hsd.commit", "state.ssm = layer.states[kept - 1]",
                "state.ssm = layer.states[-1]",
                "state after 4 tokens, 3 tokens late: commit kept the last one recorded"),
        Mistake("the conv window is taken from the end", "hsd.commit",
                "state.conv = layer.conv_inputs[:, kept:kept + state.conv.shape[1]]",
                "state.conv = layer.conv_inputs[:, -state.conv.shape[1]:]",
                "conv window after 4 tokens, 3 tokens late: commit kept the last one recorded"),
        Mistake("the conv window is one token late", "hsd.commit",
                "state.conv = layer.conv_inputs[:, kept:kept + state.conv.shape[1]]",
                "state.conv = layer.conv_inputs[:, kept + 1:kept + 1 + state.conv.shape[1]]",
                "is the conv window after 2 tokens, one token late"),
        Mistake("an off-by-one in the length", "hsd.commit", "cache.length = start + kept", "cache.length = start + kept - 1",
                "after committing 1 of 4 tokens the cache holds 0 of them"),
        Mistake("the state is one token late", "hsd.commit", "state.ssm = layer.states[kept - 1]",
                "state.ssm = layer.states[kept]", "is the state after 2 tokens, one token late"),
        Mistake("the state is one token late, keeping all 4", "hsd.commit", "state.ssm = layer.states[kept - 1]",
                "state.ssm = layer.states[kept]",
                "commit asked the recording for something it does not hold (IndexError",
                ["test_commit_keeps_the_state_after_n_tokens[tiny-falcon-h1-keep4of4]"]),
        Mistake("the conv window one input too long", "hsd.commit",
                "state.conv = layer.conv_inputs[:, kept:kept + state.conv.shape[1]]",
                "state.conv = layer.conv_inputs[:, kept - 1:kept + state.conv.shape[1]]",
                "(a conv window holds K-1 = 3 inputs)")],
    "accept": [
        Mistake("every agreeing draft counts, not only the prefix", "hsd.accept",
                "accepted = 0\nwhile accepted < len(drafts) and drafts[accepted] == choices[accepted]:\n"
                "    accepted += 1",
                "accepted = sum(d == c for d, c in zip(drafts, choices))", "a match after the first mismatch does not count"),
        Mistake("the next token comes from the row of the last accepted draft", "hsd.accept",
                "return accepted, choices[accepted]", "return accepted, choices[max(accepted - 1, 0)]",
                "all 3 accepted: the next token is the bonus"),
        Mistake("the next token is a tensor", "hsd.accept", "return accepted, choices[accepted]",
                "return accepted, logits[accepted].argmax()", "the next token is a tensor of shape (), not an int"),
        Mistake("the number accepted is a tensor", "hsd.accept",
                "accepted = 0\nwhile accepted < len(drafts) and drafts[accepted] == choices[accepted]:\n"
                "    accepted += 1",
                "accepted = (torch.tensor(drafts) == logits.argmax(dim=-1)[:len(drafts)]).long().cumprod(0).sum()",
                "the number of accepted drafts is a tensor of shape (), not an int")],
    "accept-sampled": [
        Mistake("accepting with q/p instead of p/q", "hsd.accept_sampled",
                "if torch.rand((), dtype=torch.float64, generator=generator) >= p[i, token] / q[i, token]:\n"
                "    return i, int(torch.multinomial((p[i] - q[i]).clamp(min=0), 1, generator=generator))",
                "if torch.rand((), dtype=torch.float64, generator=generator) >= q[i, token] / p[i, token]:\n"
                "    return i, int(torch.multinomial((p[i] - q[i]).clamp(min=0), 1, generator=generator))",
                "the first draft was accepted"),
        Mistake("the correction sampled from p instead of the residual", "hsd.accept_sampled",
                "if torch.rand((), dtype=torch.float64, generator=generator) >= p[i, token] / q[i, token]:\n"
                "    return i, int(torch.multinomial((p[i] - q[i]).clamp(min=0), 1, generator=generator))",
                "if torch.rand((), dtype=torch.float64, generator=generator) >= p[i, token] / q[i, token]:\n"
                "    return i, int(torch.multinomial(p[i], 1, generator=generator))",
                "the first token is not distributed as plain sampling's"),
        Mistake("the bonus token taken from the draft", "hsd.accept_sampled",
                "return len(drafts), int(torch.multinomial(p[-1], 1, generator=generator))",
                "return len(drafts), int(torch.multinomial(q[-1], 1, generator=generator))",
                "the second token is not distributed as plain sampling's"),
        Mistake("the temperature applied to the draft side only", "hsd.accept_sampled",
                "p = probabilities(logits, temperature)", "p = probabilities(logits, 1.0)",
                "p and q both at the temperature"),
        Mistake("the correction is a tensor", "hsd.accept_sampled",
                "if torch.rand((), dtype=torch.float64, generator=generator) >= p[i, token] / q[i, token]:\n"
                "    return i, int(torch.multinomial((p[i] - q[i]).clamp(min=0), 1, generator=generator))",
                "if torch.rand((), dtype=torch.float64, generator=generator) >= p[i, token] / q[i, token]:\n"
                "    return i, torch.multinomial((p[i] - q[i]).clamp(min=0), 1, generator=generator)",
                "the correction is a tensor of shape (1,), not an int"),
        Mistake("the bonus token is a tensor", "hsd.accept_sampled",
                "return len(drafts), int(torch.multinomial(p[-1], 1, generator=generator))",
                "return len(drafts), torch.multinomial(p[-1], 1, generator=generator)",
                "the bonus token is a tensor of shape (1,), not an int")],
    "draft-and-verify": [
        Mistake("verify leaves out the pending token", "hsd.verify",
                "logits, recorded = model(torch.tensor([[pending, *drafts]], device=cache.device), cache, skip=skip, "
                "record_states=True)",
                "logits, recorded = model(torch.tensor([[*drafts]], device=cache.device), cache, skip=skip, "
                "record_states=True)",
                "verify must return k + 1 = 4 rows"),
        Mistake("the draft feeds the full model", "hsd.draft",
                "logits = model(torch.tensor([[token]], device=cache.device), cache, skip=skip)[0, -1]",
                "logits = model(torch.tensor([[token]], device=cache.device), cache)[0, -1]",
                "are not the draft model's greedy tokens"),
        Mistake("the drafts are tensors", "hsd.draft", "token = int(logits.argmax())", "token = logits.argmax()",
                "draft 1 is a tensor of shape (), not an int"),
        Mistake("the drafts are a tuple", "hsd.draft", "return drafts, torch.stack(q[:len(drafts)]) if q else None",
                "return tuple(drafts), torch.stack(q[:len(drafts)]) if q else None",
                "draft returned drafts as a tuple, not a list"),
        Mistake("drafting goes on past the end of text", "hsd.draft", DRAFT_LOOP,
                DRAFT_LOOP.replace(" and eos not in drafts", "").replace(
                    "drafts = drafts[:drafts.index(eos) + 1] if eos in drafts else drafts", ""),
                "drafting ends after the end-of-text token"),
        Mistake("the stop is ignored", "hsd.draft",
                "if stop is not None and (q[-1] if q else torch.softmax(logits.float(), dim=-1))[token] < stop:\n"
                "    break", "", "drafting ends after the first draft whose"),
        Mistake("sampled drafts drawn from torch's own random stream", "hsd.draft",
                "token = int(torch.multinomial(q[-1], 1, generator=generator))", "token = int(torch.multinomial(q[-1], 1))",
                "each draft is the generator's draw"),
        Mistake("verify keeps the batch dimension", "hsd.verify", "return logits[0], recorded",
                "return logits, recorded", "got a tensor of shape (1, 4, 97)"),
        Mistake("verify returns the logits alone", "hsd.verify", "return logits[0], recorded", "return logits[0]",
                "verify returned a tensor of shape (4, 97): it returns two values")],
    "speculative-round": [
        Mistake("no restore before verifying", "hsd.speculative_round", "restore(cache, snap)", "",
                "is not that of feeding the committed tokens one by one"),
        Mistake("commit leaves out the pending token", "hsd.speculative_round",
                "commit(cache, snap.length, accepted + 1, recorded)", "commit(cache, snap.length, accepted, recorded)",
                "more tokens, not"),
        Mistake("the stop is not passed on", "hsd.speculative_round",
                "drafts, q = draft(model, cache, pending, skip, k, temperature, generator, stop, eos, proposed)",
                "drafts, q = draft(model, cache, pending, skip, k, temperature, generator, eos=eos, proposed=proposed)",
                "the round ignored its stop"),
        Mistake("the end of text is not passed on", "hsd.speculative_round",
                "drafts, q = draft(model, cache, pending, skip, k, temperature, generator, stop, eos, proposed)",
                "drafts, q = draft(model, cache, pending, skip, k, temperature, generator, stop, proposed=proposed)",
                "the round ignored its eos"),
        Mistake("the drafts are greedy at any temperature", "hsd.speculative_round",
                "drafts, q = draft(model, cache, pending, skip, k, temperature, generator, stop, eos, proposed)",
                "drafts, q = draft(model, cache, pending, skip, k, stop=stop, eos=eos, proposed=proposed)",
                "the round failed in accept_sampled (TypeError"),
        Mistake("the drafts drawn from torch's own random stream", "hsd.speculative_round",
                "drafts, q = draft(model, cache, pending, skip, k, temperature, generator, stop, eos, proposed)",
                "drafts, q = draft(model, cache, pending, skip, k, temperature, stop=stop, eos=eos, proposed=proposed)",
                "round's drafts are not those draft gives"),
        Mistake("the verdict is greedy at any temperature", "hsd.speculative_round",
                "accepted, next_token = judge(drafts, q, logits, temperature, generator)",
                "accepted, next_token = judge(drafts, q, logits)", "round's verdict (accepted, next token) is"),
        Mistake("the average taken as greedy at any temperature", "hsd.speculative_round",
                "expected = expected_accepted(drafts, q, logits, temperature)",
                "expected = expected_accepted(drafts, q, logits)", "drafts on average, expected_accepted on its"),
        Mistake("the values returned in another order", "hsd.speculative_round",
                "return drafts, accepted, next_token, expected", "return accepted, drafts, next_token, expected",
                "a round returns its drafts first")],
    "lookup": [
        Mistake("the suffix itself is taken for an earlier occurrence", "hsd.lookup",
                "end = next((start + size for start in range(len(tokens) - 2 * size, -1, -1)\n"
                "            if tokens[start:start + size] == suffix), None)",
                "end = next((start + size for start in range(len(tokens) - size, -1, -1)\n"
                "            if tokens[start:start + size] == suffix), None)",
                "the occurrence it found was the suffix itself"),
        Mistake("an occurrence overlapping the suffix is taken", "hsd.lookup",
                "end = next((start + size for start in range(len(tokens) - 2 * size, -1, -1)\n"
                "            if tokens[start:start + size] == suffix), None)",
                "end = next((start + size for start in range(len(tokens) - size - 1, -1, -1)\n"
                "            if tokens[start:start + size] == suffix), None)",
                "it took an occurrence overlapping the suffix itself"),
        Mistake("the shortest suffix is tried first", "hsd.lookup",
                LOOKUP_LOOP, LOOKUP_LOOP.replace("range(min(n, len(tokens) // 2), min(least, n) - 1, -1)",
                                                 "range(min(least, n), min(n, len(tokens) // 2) + 1)"),
                "what followed a shorter suffix"),
        Mistake("the earliest occurrence is taken", "hsd.lookup",
                "end = next((start + size for start in range(len(tokens) - 2 * size, -1, -1)\n"
                "            if tokens[start:start + size] == suffix), None)",
                "end = next((start + size for start in range(len(tokens) - 2 * size + 1)\n"
                "            if tokens[start:start + size] == suffix), None)",
                "propose what followed the latest occurrence"),
        Mistake("k tokens proposed even where fewer follow", "hsd.lookup", "return tokens[end:end + k]",
                "return [tokens[end + i] for i in range(k)]", "lookup asked for a token past the end"),
        Mistake("one token more than k", "hsd.lookup", "return tokens[end:end + k]",
                "return tokens[end:end + k + 1]", "not the 2 tokens that followed the earlier [1, 2, 3]")],
    "text-round": [
        Mistake("the text judged greedily at any temperature", "hsd.text_round",
                "accepted, next_token = judge(proposed, q, logits, temperature, generator)",
                "accepted, next_token = judge(proposed, q, logits)", "the proposed token was accepted"),
        Mistake("q uniform, not one-hot", "hsd.text_round",
                "q = torch.nn.functional.one_hot(torch.tensor(proposed), model.config.vocab_size).double() if "
                "temperature else None",
                "q = torch.full((len(proposed), model.config.vocab_size), 1 / model.config.vocab_size, "
                "dtype=torch.float64) if temperature else None", "the proposed token was accepted"),
        Mistake("the skip is not passed to verify", "hsd.text_round",
                "logits, recorded = verify(model, cache, pending, proposed, skip)",
                "logits, recorded = verify(model, cache, pending, proposed)", "with a skip (a cascade's inner check)"),
        Mistake("commit leaves out the pending token", "hsd.text_round", "commit(cache, start, accepted + 1, recorded)",
                "commit(cache, start, accepted, recorded)", "not the pending token and the accepted ones")],
    "draft-strategies": [
        Mistake("layerskip starts one layer late", "drafts.draft_skip",
                "start, skipped = n // 2 - int(0.33 * n) // 2, int(0.33 * n)",
                "start, skipped = n // 2 - int(0.33 * n) // 2 + 1, int(0.33 * n)", "layerskip on tiny-falcon-h1"),
        Mistake("Qwen3.5's attention layers keep their MLP", "drafts.draft_skip",
                "return models.Skip(layers=frozenset(i for i, t in enumerate(config.layer_types) if t == "
                "'full_attention'))",
                "return models.Skip(attention=frozenset(i for i, t in enumerate(config.layer_types) if t == "
                "'full_attention'))", "component on tiny-qwen3.5")],
    "bootstrap": [
        Mistake("a 90% interval", "cost_model.bootstrap_ci",
                "return torch.quantile(means, 0.025).item(), torch.quantile(means, 0.975).item()",
                "return torch.quantile(means, 0.05).item(), torch.quantile(means, 0.95).item()",
                "is narrower than a 95% interval"),
        Mistake("resampling without replacement", "cost_model.bootstrap_ci",
                "means = v[torch.randint(len(v), (resamples, len(v)), generator=torch.Generator().manual_seed(seed))]"
                ".mean(dim=1)",
                "means = v[torch.stack([torch.randperm(len(v), generator=torch.Generator().manual_seed(seed + i)) "
                "for i in range(resamples)])].mean(dim=1)", "the interval has no width")],
    "break-even": [
        Mistake("the crossing interpolated from the wrong end", "cost_model.break_even",
                "crossing = L0 - gap0 * (L1 - L0) / (gap1 - gap0)", "crossing = L1 - gap0 * (L1 - L0) / (gap1 - gap0)",
                "so it crosses 0 at 600, not 1600"),
        Mistake("a crossing beyond the model's context is reported", "cost_model.break_even",
                "return round(crossing) if crossing <= max_context else None", "return round(crossing)",
                "the crossing at 600 lies beyond the model's context")],
    "perplexity": [
        Mistake("the target is the token at the same position", "hsd_eval.nll",
                "total -= logp.gather(1, ids[0, i + 1:i + 1 + chunk, None]).sum().item()",
                "total -= logp.gather(1, ids[0, i:i + len(logp), None]).sum().item()",
                "nll over the held-out windows gives"),
        Mistake("the draft's skip is not passed", "hsd_eval.nll", "h = model.hidden_states(ids, skip=skip)[0, :-1]",
                "h = model.hidden_states(ids)[0, :-1]", "the layerskip draft's loss equals the full model's"),
        Mistake("the mean, not the sum", "hsd_eval.nll", "return total", "return total / len(h)",
                "nll returns the mean")],
}
ROUND = ["snapshot-restore", "commit", "accept", "accept-sampled", "draft-and-verify", "speculative-round"]

# Correct solutions written otherwise than the reference: a finished handout must go green with them too.
ALTERNATIVES = {
    "snapshot-restore": {
        "hsd.snapshot": "layers = []\nfor state in cache.layers:\n    layers.append(models.LayerState(conv=state.conv, "
                        "ssm=state.ssm))\nreturn Snapshot(length=cache.length, layers=layers)",
        "hsd.restore": "for i, kept in enumerate(snap.layers):\n    cache.layers[i].conv = kept.conv\n"
                       "    cache.layers[i].ssm = kept.ssm\ncache.length = snap.length"},
    "commit": {
        "hsd.commit": "for i, layer in enumerate(recorded):\n    if layer is None:\n        continue\n"
                      "    width = cache.layers[i].conv.shape[1]\n    cache.layers[i].ssm = layer.states[kept - 1]\n"
                      "    cache.layers[i].conv = layer.conv_inputs[:, kept:kept + width]\ncache.length = start + kept"},
    "accept": {
        "hsd.accept": "choices = logits.argmax(dim=-1).tolist()\nfor n, (d, c) in enumerate(zip(drafts, choices)):\n"
                      "    if d != c:\n        return n, c\nreturn len(drafts), choices[len(drafts)]"},
    "accept-sampled": {
        "hsd.accept_sampled": "p = probabilities(logits, temperature)\nn = 0\nwhile n < len(drafts):\n"
                              "    u = torch.rand((), dtype=torch.float64, generator=generator)\n"
                              "    if u * q[n, drafts[n]] >= p[n, drafts[n]]:\n"
                              "        residual = torch.clamp(p[n] - q[n], min=0)\n"
                              "        return n, int(torch.multinomial(residual, 1, generator=generator))\n"
                              "    n += 1\nreturn n, int(torch.multinomial(p[n], 1, generator=generator))"},
    "draft-and-verify": {
        "hsd.draft": "drafts, rows = [], []\nif proposed:\n"
                     "    kept, last, judged = text_round(model, cache, pending, proposed, skip, temperature, "
                     "generator)\n    drafts = (list(proposed[:kept]) + [last])[:k]\n"
                     "    rows = [probabilities(judged[i], temperature) for i in range(len(drafts))] if temperature "
                     "else []\n"
                     "while len(drafts) < k and eos not in drafts:\n    last = drafts[-1] if drafts else pending\n"
                     "    logits = model(torch.tensor([[last]], device=cache.device), cache, skip=skip)\n"
                     "    row = logits[0, -1]\n    if temperature == 0:\n        drafts.append(row.argmax().item())\n"
                     "        sure = torch.softmax(row.float(), dim=-1)[drafts[-1]]\n    else:\n"
                     "        rows.append(probabilities(row, temperature))\n"
                     "        drafts.append(torch.multinomial(rows[-1], 1, generator=generator).item())\n"
                     "        sure = rows[-1][drafts[-1]]\n    if drafts[-1] == eos:\n        break\n"
                     "    if stop is not None and sure < stop:\n        break\n"
                     "if eos in drafts:\n    drafts = drafts[:drafts.index(eos) + 1]\n"
                     "return drafts, (torch.stack(rows[:len(drafts)]) if rows else None)",
        "hsd.verify": "ids = torch.tensor([[pending] + list(drafts)], device=cache.device)\n"
                      "logits, recorded = model(ids, cache, skip=skip, record_states=True)\n"
                      "return logits[0], recorded"},
    "speculative-round": {
        "hsd.speculative_round": "snap = snapshot(cache)\n"
                                 "drafts, q = draft(model, cache, pending, skip, k, temperature=temperature, "
                                 "generator=generator, stop=stop, eos=eos, proposed=proposed)\nrestore(cache, snap)\nlogits, states = verify(model, cache, "
                                 "pending, drafts)\naccepted, token = judge(drafts, q, logits, temperature, generator)\n"
                                 "on_average = expected_accepted(drafts, q, logits, temperature=temperature)\n"
                                 "commit(cache, start=snap.length, kept=accepted + 1, recorded=states)\n"
                                 "return drafts, accepted, token, on_average"},
}

# The index formulas of a blanked function's reference as a text would write them (the reference's own expressions
# are found in its syntax tree): no file of a handout of the exercise may hold them, spaces left out.
SPOKEN = {
    "commit": ["states[n-1]", "states[kept-1]", "states[accepted]", "recorded[0].states[2]", "n:n+K-1", "t+1:t+K",
               "tokenn-1", "start+n", "start+kept"],
    "accept": ["choices[n]", "choices[accepted]", "logits[n]", "argmax(rowj)", "rown'schoice"],
    "speculative-round": ["commit(n+1)"],    # not accepted+1: hsd.text_round, steps 4-6 of a round, commits so too
}


@functools.cache
def parsed(source):
    """ast.parse(source), once per text: the same few modules receive every mistake (speed: the self-check's 146
    parses of a module become 4); the tree is read, never changed."""
    return ast.parse(source)


def apply_mistake(source, mistake):
    """source with the mistake made: the statements `old` of its function, found as syntax trees, replaced by `new`."""
    old = [ast.dump(s) for s in ast.parse(mistake.old).body]
    found = []
    for node in ast.walk(exercises.function_node(parsed(source), mistake.function.split(".", 1)[1])):
        for field in ("body", "orelse", "finalbody"):
            block = getattr(node, field, None)
            if isinstance(block, list) and block and isinstance(block[0], ast.stmt):
                found += [block[i:i + len(old)] for i in range(len(block) - len(old) + 1)
                          if [ast.dump(s) for s in block[i:i + len(old)]] == old]
    assert len(found) == 1, f"{mistake.what}: its reference statements are {len(found)} times in {mistake.function}"
    return exercises.splice(source, found[0][0].lineno, found[0][-1].end_lineno, found[0][0].col_offset, mistake.new)


def with_mistake(texts, mistake):
    file = mistake.function.split(".")[0] + ".py"
    return {**texts, file: apply_mistake(texts[file], mistake)}


def run(script, *args):
    return subprocess.run([sys.executable, script, *args], capture_output=True, text=True, cwd=HERE)


# --- Grading in scratch copies, in worker processes ----------------------------------------------------------------
def cores():
    """The cores this process may run on (a shared machine's taskset or cgroup limit counts), shared with the other
    workers of `pytest -n` (conftest.py)."""
    n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, n // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")))


def grade_variants(variants, threads=1, claims=None):
    """Run each (folder, test ids, stop at the first failure) as its own pytest session, one after another in this
    process, as a student's grading command runs them: [(passed, output)]. The project's modules are imported afresh
    from each folder; torch is imported once, which is most of what a session costs to start. claims: a folder shared
    with other workers; a variant another worker claimed first is left to it (None in the list)."""
    import contextlib
    import gc
    import io
    torch.set_num_threads(threads)
    results, compiled = [], {}
    for i, (folder, tests, first_only) in enumerate(variants):
        if claims is not None:
            try:
                os.close(os.open(os.path.join(claims, str(i)), os.O_CREAT | os.O_EXCL))
            except FileExistsError:                                  # another worker is grading it
                results.append(None)
                continue
        share_bytecode(folder, compiled)
        for module in [name[:-3] for name in os.listdir(folder) if name.endswith(".py")]:     # modules and tests
            sys.modules.pop(module, None)
        os.chdir(folder)
        sys.path.insert(0, folder)
        output = io.StringIO()
        gc.freeze()           # speed: what is alive now (torch, earlier sessions) is left out of the collections that
        with contextlib.redirect_stdout(output):       # pytest runs as a session ends: 0.15 s less a session
            code = pytest.main(["-q", "--tb=short", "--assert=plain", "-p", "no:cacheprovider", *tests]
                               + ["-x"] * first_only)
        sys.path.remove(folder)
        results.append((code == 0, output.getvalue()))
    return results


def share_bytecode(folder, compiled):
    """Speed: each .py file of folder gets, in its __pycache__, the bytecode of the first file with the same text that
    this process compiled (compiled: {text's hash: .pyc path}), a .pyc that Python checks against the text's hash, not
    the file's time: the scratch copies differ in a file or two (60 of the grader's sessions: 22.5-25.2 -> 21.9-23 s).
    Python names each module's own file in its tracebacks all the same."""
    import hashlib
    import importlib.util
    import py_compile
    for name in os.listdir(folder):
        path = os.path.join(folder, name)
        if name.endswith(".py"):
            with open(path, "rb") as f:
                text = hashlib.sha256(f.read()).hexdigest()
            if text not in compiled:
                try:
                    compiled[text] = py_compile.compile(path, doraise=True,
                                                        invalidation_mode=py_compile.PycInvalidationMode.CHECKED_HASH)
                except py_compile.PyCompileError:             # the import will say what is wrong, as a student sees it
                    pass
            else:
                os.makedirs(os.path.join(folder, "__pycache__"), exist_ok=True)
                os.symlink(compiled[text], importlib.util.cache_from_source(path))


def in_workers(jobs):
    """grade_variants over jobs in worker processes (two, or one on one core) whose torch threads add up to this
    machine's cores; each worker takes the next job no other has taken, so that they finish together."""
    n = cores()
    threads = [n // 2 + n % 2, n // 2] if n > 1 and len(jobs) > 1 else [n]
    code = ("import json, sys, test_exercises; print(json.dumps(test_exercises.grade_variants(json.loads(sys.argv[1]), "
            "int(sys.argv[2]), sys.argv[3])))")

    def work(claims, threads):
        result = subprocess.run([sys.executable, "-c", code, json.dumps(jobs), str(threads), claims], cwd=HERE,
                                capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": str(threads)})
        assert result.returncode == 0, result.stderr[-3000:]
        return json.loads(result.stdout.splitlines()[-1])
    with tempfile.TemporaryDirectory() as claims, ThreadPoolExecutor(len(threads)) as pool:
        graded = list(pool.map(work, [claims] * len(threads), threads))       # per worker: a result or None per job
    return [next(result for result in job if result is not None) for job in zip(*graded)]


def first_failure(output):
    """What a student reads first: the first failure's block of a pytest -q --tb=short report."""
    blocks = re.split(r"\n_{3,} .* _{3,}\n", output.split(" FAILURES ", 1)[-1])
    return blocks[1].split("\n=====")[0] if len(blocks) > 1 else ""


@pytest.fixture(scope="module")
def graded(tmp_path_factory):
    """Every exercise's grading tests in scratch handouts: on its starter code, on each typical mistake, and with
    every exercise it does not need blanked. {(exercise, variant): (passed, output)}"""
    texts = exercises.project_texts(HERE)
    project = exercises.handout_texts(texts, [])             # what a handout holds, nothing blanked
    variants = {}
    for exercise in EXERCISES:
        variants[exercise.name, "the starter code"] = exercises.handout_texts(texts, [exercise]), exercise.tests
        others = [e for e in EXERCISES if e.name not in exercise.needs and e is not exercise]
        variants[exercise.name, "every exercise it does not need blanked"] = (exercises.handout_texts(texts, others),
                                                                              exercise.tests)
        for mistake in MISTAKES[exercise.name]:
            variants[exercise.name, mistake.what] = with_mistake(project, mistake), mistake.only or exercise.tests
    jobs = []
    for i, ((name, what), (variant, tests)) in enumerate(variants.items()):
        folder = tmp_path_factory.mktemp(f"variant{i}")
        exercises.write_project(folder, variant, HERE, link=True)
        passes = what == "every exercise it does not need blanked"        # the others must fail: the first counts
        jobs.append((str(folder), [t if "::" in t else exercises.pytest_id(t) for t in tests], not passes))
    return dict(zip(variants, in_workers(jobs)))


def test_the_grader_fails_the_starter_code_and_each_typical_mistake_with_its_own_message(graded):
    """Each exercise's grading passes on the reference (its test file shows it) and with every exercise it does not need
    blanked; it fails on the starter code and on every typical mistake, and the failure a student reads first is the
    message written for that mistake, with no values or tensors before it. (One test, not one per exercise: with
    `pytest -n`, one worker grades every variant, once.)"""
    for exercise in EXERCISES:
        assert len(MISTAKES[exercise.name]) >= 2 + 2 * (exercise.name in ROUND)      # the round's: of contracts too
        passed, output = graded[exercise.name, "every exercise it does not need blanked"]
        assert passed, f"{exercise.name}'s grading needs more than {exercise.needs}:\n{output[-3000:]}"
        passed, output = graded[exercise.name, "the starter code"]
        assert not passed and f"NotImplementedError: exercise {exercise.name}" in first_failure(output), output[-3000:]
        for mistake in MISTAKES[exercise.name]:
            passed, output = graded[exercise.name, mistake.what]
            assert not passed, f"{exercise.name}: the grading tests pass on the mistake '{mistake.what}'"
            first = first_failure(output)
            assert mistake.message in first, f"{exercise.name}, '{mistake.what}': the first failure says\n{first[:1500]}"
            assert not re.search(r"tensor\(|Traceback|During handling|\nE   ", first), first[:1500]


# --- Handouts: no answer, none of the grader's machinery -----------------------------------------------------------
@functools.cache                                  # the same texts are read for every exercise
def code_lines(text):
    """The logical lines of text, without comments, whitespace and a trailing comma before a closing bracket: a line
    that leaves a bracket open goes on with the next ones, so that a statement a formatter broke over lines is one
    line again and none of its fragments is a line of its own. '    n += 1   # next' -> 'n+=1'; a call broken over
    the lines 'f(', '    a,' and ')' -> 'f(a)', never 'f('."""
    lines, pending, depth = [], "", 0
    for line in text.splitlines():
        code = re.sub(r"\s+", "", line.split("  #")[0].split("# ")[0] if line.lstrip()[:1] != "#" else "")
        pending += code
        depth = max(0, depth + sum(map(code.count, "([{")) - sum(map(code.count, ")]}")))
        if depth == 0:
            lines.append(re.sub(r",([)\]}])", r"\1", pending))
            pending = ""
    return tuple(lines + [pending] * bool(pending))


def module_code(texts, function):
    """The code of the project's modules (not its tests, not the instructor's tools) with function's body left out."""
    module, qualname = function.split(".", 1)
    others = dict(texts)
    others[module + ".py"] = exercises.replace_bodies(others[module + ".py"], {qualname: "pass"})
    return [text for name, text in others.items() if name.endswith(".py") and not name.startswith("test_")
            and name not in exercises.INSTRUCTORS]


def answer_lines(texts, function):
    """The lines of a function's reference body that no other code of the project has: what gives the answer away."""
    module, qualname = function.split(".", 1)
    own = [line for line in code_lines(exercises.reference_body(texts[module + ".py"], qualname)) if len(line) >= 12]
    elsewhere = "\n".join(line for text in module_code(texts, function) for line in code_lines(text))
    return [line for line in own if line not in elsewhere]


def squeezed(text):
    return re.sub(r"\s+", "", text)


def answer_expressions(texts, function):
    """The subscripts of a function's reference body that index by its own values (a name in the index) and that no
    other module writes, spaces left out: commit's `layer.states[kept-1]`, accept's `choices[accepted]`."""
    module, qualname = function.split(".", 1)
    body = exercises.body_statements(exercises.function_node(ast.parse(texts[module + ".py"]), qualname))
    found = {squeezed(ast.unparse(n)) for statement in body for n in ast.walk(statement)
             if isinstance(n, ast.Subscript) and any(isinstance(m, ast.Name) for m in ast.walk(n.slice))}
    elsewhere = squeezed("\n".join(module_code(texts, function)))
    return sorted(e for e in found if e not in elsewhere)


def shown_answers(texts, exercise):
    """Where a file of the exercise's handout (made of texts) shows a line of a blanked function's reference body that
    no other code of the project holds: one sentence each."""
    handout, found = exercises.handout_texts(texts, [exercise]), []
    for function in exercise.functions:
        answer = answer_lines(texts, function)
        assert answer, f"{function}: a body with no line of its own"
        for name, text in handout.items():
            shown = "\n".join(code_lines(text))                       # an answer line in one of its lines
            lines = [line for line in answer if line in shown]
            found += [f"{name} of the {exercise.name} handout shows {function}'s reference: {lines}"] * bool(lines)
    return found


@pytest.mark.parametrize("exercise", EXERCISES, ids=lambda e: e.name)
def test_a_handout_holds_no_answer(exercise):
    """No file of an exercise's handout (its tests, the README, EXERCISES.md...) holds a line of a blanked function's
    reference body that no other code of the project holds."""
    found = shown_answers(exercises.project_texts(HERE), exercise)
    assert not found, "\n".join(found)


def test_a_formatted_course_copy_holds_no_answer_and_its_answers_are_still_seen(tmp_path):
    """An instructor formats the course copy (ruff format --line-length 88), which breaks statements over lines: a
    fragment of one that every test of a Skip holds ('layers=frozenset(') is no answer; a reference that a test
    writes out, broken over lines as the formatter breaks it, still is."""
    ruff = (shutil.which("ruff") or shutil.which("ruff", path=os.path.dirname(sys.executable))
            or pytest.skip("ruff is not installed (.ci/run installs it: pip install ruff)"))
    copy = tmp_path / "formatted"
    exercises.write_project(copy, exercises.project_texts(HERE), HERE, link=True)
    python = [str(copy / name) for name in exercises.handout_files(HERE) if name.endswith(".py")]
    subprocess.run([ruff, "format", "--line-length", "88", "--quiet", *python], check=True)
    texts = exercises.project_texts(str(copy))
    skips = exercise_by_name("draft-strategies")
    file, qualname = skips.functions[0].split(".")
    assert "layers=frozenset(" in [line.strip() for line in texts[file + ".py"].splitlines()]      # a fragment now
    for exercise in EXERCISES:
        found = shown_answers(texts, exercise)
        assert not found, "\n".join(found)
    node = exercises.function_node(ast.parse(texts[file + ".py"]), qualname)     # copied into a test, as formatted
    copied = "".join(exercises.source_lines(texts[file + ".py"])[node.lineno - 1:node.end_lineno])
    found = shown_answers({**texts, "test_hsd.py": texts["test_hsd.py"] + "\n\n" + copied}, skips)
    assert found and all(line.startswith("test_hsd.py of the draft-strategies handout") for line in found), found


@pytest.mark.parametrize("exercise", EXERCISES, ids=lambda e: e.name)
def test_a_handout_states_the_task_not_its_solution(exercise):
    """No file of an exercise's handout, nor the catalogue's hint, writes an index formula of a blanked function's
    reference: the reference's own subscripts (its syntax tree's) nor the words a text would use for them
    (`states[n-1]`, `n : n+K-1`). Docstrings, hints and failure messages say what the function must do and what is
    wrong (which state, off by how many tokens), not the expression that would be right."""
    texts = exercises.project_texts(HERE)
    forms = SPOKEN.get(exercise.name, []) + [e for f in exercise.functions for e in answer_expressions(texts, f)]
    assert exercise.name not in SPOKEN or all(squeezed(form) == form for form in forms)
    said = {**exercises.handout_texts(texts, [exercise]), "its hint": exercise.hint,
            "what it teaches": exercise.teaches}
    for name, text in said.items():
        found = [form for form in forms if form in squeezed(text)]
        assert not found, f"{name} of the {exercise.name} handout writes the answer: {found}"


def test_the_answer_expressions_come_from_the_reference():
    """The expressions the previous test looks for are there to find: in the reference, which a handout leaves out."""
    texts = exercises.project_texts(HERE)
    assert answer_expressions(texts, "hsd.commit") == ["layer.conv_inputs[:,kept:kept+state.conv.shape[1]]",
                                                       "layer.states[kept-1]"]
    assert answer_expressions(texts, "hsd.accept") == ["choices[accepted]", "drafts[accepted]"]
    for exercise in EXERCISES:
        for function in exercise.functions:
            module, qualname = function.split(".", 1)
            body = squeezed(exercises.reference_body(texts[module + ".py"], qualname))
            assert all(e in body for e in answer_expressions(texts, function)), function


@pytest.fixture(scope="module")
def hw1(tmp_path_factory):
    """The handout EXERCISES.md's example writes, as an instructor writes it."""
    out = tmp_path_factory.mktemp("handouts") / "hw1"
    result = run("exercises.py", "--blank", "commit,accept", "--out", str(out))
    assert result.returncode == 0 and not result.stderr, result.stderr
    assert exercises.grading_command(exercise_by_name("commit")) in result.stdout
    return out


def test_a_handout_holds_none_of_the_graders_machinery(hw1):
    """A handout holds the project's files but exercises.py and test_exercises.py; test_hsd.py and every other file
    but the blanked modules and the two texts that leave parts out are the project's, byte for byte; the blanked
    module differs in the blanked bodies alone; no typical mistake, other solution or handout flag is in it."""
    files = sorted(exercises.project_files(str(hw1)))
    assert files == sorted(exercises.handout_files(HERE)) and not set(files) & set(exercises.INSTRUCTORS)
    for name in files:
        with open(hw1 / name, "rb") as a, open(os.path.join(HERE, name), "rb") as b:
            assert (a.read() == b.read()) == (name not in ("hsd.py", "README.md", "EXERCISES.md")), name
    texts, handout = exercises.project_texts(HERE), exercises.project_texts(str(hw1))
    references = {f: exercises.reference_body(texts["hsd.py"], f) for f in ("commit", "accept")}
    assert exercises.replace_bodies(handout["hsd.py"], references) == texts["hsd.py"]
    for name, text in handout.items():
        assert not re.search(r"\bMISTAKES\b|\bALTERNATIVES\b|\bHANDOUT\b|Mistake\(", text), name
    exercises_md = handout["EXERCISES.md"]
    assert "## This handout" in exercises_md and "<!-- the instructor's -->" not in exercises_md
    assert exercises.THIS_HANDOUT not in exercises_md
    assert "typical mistake" not in exercises_md.lower() and "python exercises.py" not in exercises_md
    for e in ("commit", "accept"):
        assert exercises.grading_command(exercise_by_name(e)) in exercises_md


def test_a_finished_handout_is_green(hw1, tmp_path):
    """EXERCISES.md's example as an instructor and a student run it: `--blank commit,accept` writes a handout (the
    toys' weights copied byte for byte) in which, with both written otherwise than the reference and so is every other
    round exercise's function, the round's tests pass, and so does each round exercise's grading. (Commit green while
    accept is blank, and the other way round: the grader's "every exercise it does not need blanked"; both written as
    the reference writes them: the project itself, test_a_handout_holds_none_of_the_graders_machinery. One pytest
    session for all, not seven: 18 -> 13 s.)"""
    handout = exercises.project_texts(str(hw1))
    for function in ("commit", "accept"):
        assert "NotImplementedError" in exercises.reference_body(handout["hsd.py"], function)
    round_tests = [*(f"test_speculative_equals_greedy[{case}]" for case in (
        "tiny-falcon-h1-component-k3-12-token", "tiny-qwen3.5-component-k5-1-token", "tiny-qwen2.5-layerskip-k2-12-token",
        "tiny-qwen3.5-layerskip-k8-12-token")), "test_rounds_commit_what_one_by_one_feeding_gives",
        "test_eos_inside_a_round_stops_there[tiny-qwen3.5]", "test_cli_check_json[tiny-falcon-h1]"]
    gradings = [test for e in ALTERNATIVES for test in exercise_by_name(e).tests]
    assert {"commit", "accept"} <= set(ALTERNATIVES)
    folder = tmp_path / "every-round-exercise-written-otherwise"
    bodies = {function: body for e in ALTERNATIVES for function, body in ALTERNATIVES[e].items()}
    exercises.write_project(folder, exercises.filled(handout, bodies), str(hw1), link=True)
    tests = list(dict.fromkeys(exercises.pytest_id(t) for t in round_tests + gradings))
    [(passed, output)] = in_workers([(str(folder), tests, False)])
    assert passed, output[-3000:]


def without_docstrings(source, qualname=None, like=None):
    """The module's syntax tree (or that of its function qualname), dumped, with every docstring left out (a formatter
    may re-indent them). like: the module that source is, changed inside qualname alone (a mistake, a starter); then
    only that function's lines are parsed, where like's tree says they are (speed: 12.6 -> 7 s for the self-check), so
    a change outside it shows only as a shifted slice or a parse error."""
    if like is None:
        tree = ast.parse(source)
        tree = exercises.function_node(tree, qualname) if qualname is not None else tree
    else:
        node, lines = exercises.function_node(parsed(like), qualname), source.splitlines()
        end = node.end_lineno + len(lines) - len(like.splitlines())
        tree = ast.parse(textwrap.dedent("\n".join(lines[node.lineno - 1:end])))
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if isinstance(body, list) and body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
            node.body = body[1:] or [ast.Pass()]
    return ast.dump(tree)


def test_the_self_check_holds_on_a_reformatted_project(tmp_path):
    """The project's .py files reformatted by ruff at another line length: every typical mistake and every starter
    still applies, and gives the same code (syntax tree) as in the project, so the self-check's verdicts carry over;
    commit's mistakes are graded there for real."""
    ruff = (shutil.which("ruff") or shutil.which("ruff", path=os.path.dirname(sys.executable))      # venv not activated
            or pytest.skip("ruff is not installed (.ci/run installs it: pip install ruff)"))
    texts = exercises.project_texts(HERE)
    copy = tmp_path / "reformatted"
    exercises.write_project(copy, texts, HERE, link=True)
    python = [str(copy / name) for name in exercises.handout_files(HERE) if name.endswith(".py")]
    subprocess.run([ruff, "format", "--line-length", "79", "--quiet", *python], check=True)
    reformatted = exercises.project_texts(str(copy))
    assert any(reformatted[name] != texts[name] for name in reformatted if name.endswith(".py"))
    for name in reformatted:                             # the same code; a mistake or a starter changes one function
        if name.endswith(".py"):
            assert without_docstrings(reformatted[name]) == without_docstrings(texts[name]), name
    for exercise in EXERCISES:
        for mistake in MISTAKES[exercise.name]:
            file, qualname = mistake.function.split(".", 1)
            made = [without_docstrings(apply_mistake(text[file + ".py"], mistake), qualname, text[file + ".py"])
                    for text in (reformatted, texts)]
            assert made[0] == made[1], mistake.what
        for function in exercise.functions:                          # its starter code
            module, qualname = function.split(".", 1)
            code = exercises.starter(exercise.name, qualname)
            assert len({without_docstrings(exercises.replace_bodies(text[module + ".py"], {qualname: code}), qualname,
                                           text[module + ".py"]) for text in (texts, reformatted)}) == 1, function
    jobs = []
    for mistake in MISTAKES["commit"]:
        folder = tmp_path / f"commit-{len(jobs)}"
        exercises.write_project(folder, with_mistake(reformatted, mistake), str(copy), link=True)
        tests = mistake.only or exercise_by_name("commit").tests
        jobs.append((str(folder), [t if "::" in t else exercises.pytest_id(t) for t in tests], mistake))
    for (folder, tests, mistake), (passed, output) in zip(jobs, in_workers([(f, t, True) for f, t, _ in jobs])):
        assert not passed and mistake.message in first_failure(output), (mistake.what, output[-2000:])


# --- The instructor's command line ---------------------------------------------------------------------------------
def test_exercises_that_need_each_other_are_not_handed_out_together(tmp_path, capsys):
    """--blank refuses a pair one of which grades with the other's functions, naming an order that works; every
    pair it allows grades on its own (the self-check grades each exercise with everything it does not need blanked)."""
    refused = [(a, b) for a in EXERCISES for b in EXERCISES if b.name in a.needs]
    assert refused and all(exercises.together(a, b) == (a.name not in b.needs and b.name not in a.needs)
                           for a in EXERCISES for b in EXERCISES)
    for i, (a, b) in enumerate(refused):
        if i == 0:                                                  # as a user runs it
            result = run("exercises.py", "--blank", f"{a.name},{b.name}", "--out", str(tmp_path / "refused"))
            status, err = result.returncode, result.stderr
        else:
            status = exercises.main(["--blank", f"{b.name},{a.name}", "--out", str(tmp_path / "refused")])
            err = capsys.readouterr().err
        assert status == 2 and err.count("\n") == 1 and "Traceback" not in err
        assert f"hand out {b.name} first, then {a.name}" in err
        assert not (tmp_path / "refused").exists()
    assert exercises.together(exercise_by_name("commit"), exercise_by_name("accept"))     # EXERCISES.md's example pair


def test_the_catalogue_lists_each_exercise_with_its_grading():
    """--exercises --json: every exercise with its functions, grading command, needs and the exercises it goes with;
    each grading test and each function exists; --exercises prints the same in words."""
    result = run("exercises.py", "--exercises", "--json")
    assert result.returncode == 0, result.stderr
    listed = json.loads(result.stdout)
    assert [e["name"] for e in listed] == [e.name for e in EXERCISES]
    assert all(set(e) == {"name", "functions", "grade", "teaches", "hint", "minutes", "needs", "together_with"}
               for e in listed)
    commit = next(e for e in listed if e["name"] == "commit")
    assert "accept" in commit["together_with"] and "snapshot-restore" in commit["together_with"]
    assert commit["grade"] == ("python -m pytest -q --tb=short --assert=plain "
                               "'test_hsd.py::test_commit_keeps_the_state_after_n_tokens'")
    texts = exercises.project_texts(HERE)
    for e in EXERCISES:
        for test in e.tests:                                     # defined in the one file its command names
            file, name = exercises.pytest_id(test).split("::")
            assert name in {node.name for node in ast.parse(texts[file]).body if isinstance(node, ast.FunctionDef)}
        assert all(n in {o.name for o in EXERCISES} for n in e.needs), e.name
        for function in e.functions:
            module, qualname = function.split(".", 1)
            assert exercises.reference_body(texts[module + ".py"], qualname)
    words = run("exercises.py", "--exercises").stdout
    assert all(e["grade"] in words and e["name"] in words for e in listed)


def test_a_grading_command_names_the_file_of_each_test(tmp_path):
    """A grading test may live in any test file (test_models.py for the model's exercises): its command names that
    file; one defined in no test file, or in two, is an error saying so, not a command that would run nothing."""
    assert exercises.grading_command(exercise_by_name("causal-conv")) == (
        "python -m pytest -q --tb=short --assert=plain 'test_models.py::test_causal_conv_reads_its_window'")
    (tmp_path / "test_a.py").write_text("def test_x():\n    pass\n\n\ndef helper():\n    pass\n")
    (tmp_path / "test_b.py").write_text("def test_y():\n    pass\n\n\ndef test_x():\n    pass\n")
    (tmp_path / "test_exercises.py").write_text("def test_z():\n    pass\n")                # the instructor's
    (tmp_path / "notes.py").write_text("def test_w():\n    pass\n")                         # not a test file
    assert exercises.files_of_tests(str(tmp_path)) == {"test_x": ["test_a.py", "test_b.py"], "test_y": ["test_b.py"]}
    with pytest.raises(ValueError, match=r"test_nothing_at_all\[case\] is defined in no test file"):
        exercises.pytest_id("test_nothing_at_all[case]")


def test_bodies_are_found_by_the_line_numbers_python_gives():
    """A form feed (a page break, which PEP 8 allows) is no line end for Python: the spliced lines are the right ones."""
    source = 'x = 1\n\x0c\ndef f():\n    """doc"""\n    return 1\n'
    assert exercises.replace_bodies(source, {"f": "return 2"}) == source.replace("return 1", "return 2")
    assert exercises.reference_body(source, "f") == "return 1\n"


def test_a_handout_written_inside_the_project_is_not_part_of_the_next(tmp_path):
    """EXERCISES.md's example writes hw1 inside the project: hw1 holds the answers of every other exercise, so no later
    handout, nor the self-check, may take it for the project's own files (with git or without)."""
    project = tmp_path / "project"
    for name in ("hsd.py", "test_hsd.py", "toys/notes.md", "hw1/hsd.py", "hw1/test_hsd.py", "hw1/toys/a.json"):
        os.makedirs(os.path.dirname(project / name), exist_ok=True)
        (project / name).write_text("z = 3\n")
    assert exercises.project_files(str(project)) == ["hsd.py", "test_hsd.py", os.path.join("toys", "notes.md")]
    if shutil.which("git"):
        subprocess.run(["git", "init", "-q"], cwd=project, check=True)
        subprocess.run(["git", "add", "hsd.py", "test_hsd.py", "toys/notes.md"], cwd=project, check=True)
        assert exercises.project_files(str(project)) == ["hsd.py", "test_hsd.py", "toys/notes.md"]


def test_a_handout_holds_what_git_tracks_never_an_untracked_file(tmp_path):
    """An untracked solutions/hsd.py (or any file of the instructor's lying in the folder) is no part of a handout: with
    git, the project's files are those git tracks, ignored or not."""
    if not shutil.which("git"):
        pytest.skip("no git on this machine")
    project = tmp_path / "project"
    for name in ("hsd.py", "test_hsd.py", "solutions/hsd.py", "notes.py"):
        os.makedirs(os.path.dirname(project / name), exist_ok=True)
        (project / name).write_text("z = 3\n")
    subprocess.run(["git", "init", "-q"], cwd=project, check=True)
    subprocess.run(["git", "add", "hsd.py", "test_hsd.py"], cwd=project, check=True)
    assert exercises.project_files(str(project)) == ["hsd.py", "test_hsd.py"]
    assert set(exercises.project_files(HERE)) <= set(subprocess.run(["git", "ls-files"], cwd=HERE, capture_output=True,
                                                                     text=True).stdout.splitlines())


def test_a_handout_inside_the_project_is_refused_unless_git_ignores_it(capsys):
    """--out hw1 in the project's folder: one line saying to write it outside (git would list it as the project's
    changes); nothing is written. A folder git ignores is accepted."""
    if not shutil.which("git") or not os.path.exists(os.path.join(HERE, ".git")):
        pytest.skip("the project is no git work tree here")
    inside = os.path.join(HERE, "hw1-refused")
    assert exercises.main(["--blank", "commit", "--out", inside]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "lies inside the project" in err and "(../hw1-refused)" in err, err
    assert not os.path.exists(inside) and not os.path.exists(os.path.join(HERE, ".hw1-refused.partial"))
    assert not exercises.inside_the_project(os.path.join(HERE, "__pycache__", "hw1"))          # .gitignore's
    assert not exercises.inside_the_project(os.path.join(os.path.dirname(HERE), "hw1"))


def test_blank_refuses_what_it_cannot_write_in_one_line(tmp_path, capsys, monkeypatch):
    """--out a file, a folder under one, a folder that is not empty, one that may not be written: one line, exit 2;
    Ctrl-C while writing: one line, exit 130, no half-written handout left; --exercises with --blank: one line; names
    may be spaced."""
    (tmp_path / "a-file").write_text("")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "notes.txt").write_text("mine")
    for out, says in ((tmp_path / "a-file", "is a file: give a new folder to --out"),
                      (tmp_path / "a-file" / "hw1", "cannot write the handout"),
                      (tmp_path / "full", "is not empty: give a new folder to --out")):
        assert exercises.main(["--blank", "commit", "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and says in err and err.startswith("exercises.py: error: "), err
    assert os.listdir(tmp_path / "full") == ["notes.txt"]

    def refused(out, *args, **kwargs):                                # as a folder this user may not write
        raise PermissionError(13, "Permission denied", out)
    monkeypatch.setattr(exercises, "write_project", refused)
    assert exercises.main(["--blank", "commit", "--out", str(tmp_path / "hw1")]) == 2
    err = capsys.readouterr().err
    assert err == f"exercises.py: error: cannot write the handout to {tmp_path / 'hw1'}: Permission denied\n", err

    def interrupted(out, *args, **kwargs):
        os.makedirs(os.path.join(out, "toys"))
        raise KeyboardInterrupt
    monkeypatch.setattr(exercises, "write_project", interrupted)
    assert exercises.main(["--blank", "commit, accept", "--out", str(tmp_path / "hw1")]) == 130
    assert "interrupted" in capsys.readouterr().err and sorted(os.listdir(tmp_path)) == ["a-file", "full"]
    with pytest.raises(SystemExit) as stopped:
        exercises.main(["--exercises", "--blank", "commit", "--out", str(tmp_path / "hw1")])
    assert stopped.value.code == 2 and "give one of them" in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path)) == ["a-file", "full"]


def test_an_unknown_exercise_is_one_line_naming_the_closest():
    result = run("exercises.py", "--blank", "comit", "--out", "nowhere")
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert "no exercise 'comit': did you mean commit?" in result.stderr


# --- EXERCISES.md --------------------------------------------------------------------------------------------------
def test_exercises_md_lists_every_exercise():
    """EXERCISES.md's table has a row for each exercise: its name, its functions and its time, as the catalogue says."""
    with open(os.path.join(HERE, "EXERCISES.md"), encoding="utf-8") as f:
        rows = [line for line in f if line.startswith("| `")]
    assert len(rows) == len(EXERCISES)
    for e, row in zip(EXERCISES, rows):
        assert row.startswith(f"| `{e.name}`") and all(f"`{f}`" in row for f in e.functions), row
        assert row.rstrip().endswith(f"| {e.minutes} min |"), row


def links(text):
    """The relative links of a markdown text: [(file, anchor)]."""
    return [(target.split("#")[0], target.partition("#")[2]) for target in re.findall(r"\]\(([^)\s]+)\)", text)
            if not re.match(r"\w+:", target)]


def anchors(text):
    """GitHub's anchors of a markdown text's headings: "## One round" -> "one-round"."""
    return {re.sub(r"[^\w\- ]", "", line.lstrip("#").strip().lower()).replace(" ", "-")
            for line in text.splitlines() if line.startswith("#")}


def test_every_link_resolves_in_the_project_and_in_a_handout(hw1):
    """README.md's and EXERCISES.md's links to files and to their headings resolve from where they stand, in the
    project and in a handout (whose texts leave parts out)."""
    for root in (HERE, str(hw1)):
        for name in ("README.md", "EXERCISES.md"):
            with open(os.path.join(root, name), encoding="utf-8") as f:
                text = f.read()
            for file, anchor in links(text):
                target = os.path.join(root, os.path.dirname(name), file) if file else os.path.join(root, name)
                assert os.path.isfile(target), f"{name}: {file}"
                if anchor:
                    with open(target, encoding="utf-8") as f:
                        assert anchor in anchors(f.read()), f"{name}: {file}#{anchor}"
    with open(os.path.join(HERE, "README.md"), encoding="utf-8") as f:
        assert ("EXERCISES.md", "") in links(f.read())


def test_a_handouts_texts_name_no_file_it_lacks(hw1):
    """Every file name a handout's README.md and EXERCISES.md give (`hsd.py`, `toys/README.md`, ...) is in the handout:
    not exercises.py nor test_exercises.py, which stay with the instructor."""
    for name in ("README.md", "EXERCISES.md"):
        text = (hw1 / name).read_text(encoding="utf-8")
        named = set(re.findall(r"`([\w./-]+\.(?:py|md))`", text))
        assert named and all((hw1 / file).is_file() for file in named), (name, sorted(f for f in named
                                                                                     if not (hw1 / f).is_file()))
    with open(os.path.join(HERE, "README.md"), encoding="utf-8") as f:
        assert "`exercises.py`" in f.read()                        # the project's README names it

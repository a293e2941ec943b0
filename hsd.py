"""hsd: component-aware self-speculative decoding in hybrid language models (lossless).

A hybrid model contains a cheaper model: itself without its attention. Draft k tokens with that, verify them
with the full model in one pass, keep the longest agreeing prefix. The state covers the committed tokens; one
committed token is pending (not yet fed). One round:

  1. snapshot  remember the state: KV length + references to the recurrent states
  2. draft     k tokens from the draft model (the full model minus some parts), from the full model's state
  3. restore   put the snapshot back: drafting leaves no trace
  4. verify    one full-model pass over [pending, d1..dk], recording the recurrent states after every position
  5. accept    the longest prefix of drafts the full model agrees with, plus the full model's next token
  6. commit    keep the recorded state after the accepted tokens; roll the KV caches back by length

Greedy (temperature 0, the default): the drafts are the draft model's argmax, and "agrees" means equal to the full
model's argmax, so the output is plain greedy decoding's, token for token. Sampling (temperature T > 0): the drafts
are sampled from the draft's distribution q, draft i is accepted with probability min(1, p(d_i) / q(d_i)), and a
rejected draft is replaced by a sample from the residual max(0, p - q): the output is distributed exactly as plain
sampling from p (speculative sampling, Leviathan et al. 2023).
Usage: python hsd.py --model falcon-h1-0.5b  (README: the flags, --eval, what was and was not verified)
"""
import argparse
import json
import signal
import sys
import time
import warnings
from collections import namedtuple

warnings.filterwarnings("ignore", message="Failed to initialize NumPy")  # torch warns when NumPy (unused) is absent
import torch  # noqa: E402

import models  # noqa: E402

DRAFTS = ("component", "layerskip", "early-exit", "none")


# --- Draft strategies: plain data saying which parts of the full model the draft leaves out ----------------------
def draft_skip(config, draft):
    """The models.Skip of a draft strategy of the paper; "none" skips nothing (as a draft it accepts everything)."""
    n = config.num_layers
    if draft == "component":
        if config.family == "falcon_h1":      # parallel hybrid: the attention branch of every layer adds nothing
            return models.Skip(attention=frozenset(range(n)))
        if config.family == "qwen3_5":        # sequential hybrid: the full-attention layers become identity
            return models.Skip(layers=frozenset(i for i, t in enumerate(config.layer_types) if t == "full_attention"))
        raise models.UsageError("a Transformer (qwen2) has no attention-free part to draft with: use --draft layerskip")
    if draft == "layerskip":                  # int(0.33 n) contiguous middle layers
        start, skipped = n // 2 - int(0.33 * n) // 2, int(0.33 * n)
        return models.Skip(layers=frozenset(range(start, start + skipped)))
    if draft == "early-exit":                 # the first int(0.5 n) layers, then the final norm and LM head
        return models.Skip(layers=frozenset(range(int(0.5 * n), n)))
    if draft == "none":
        return models.Skip()
    raise models.UsageError(f"unknown draft {draft!r}: choose one of {', '.join(DRAFTS)}")


# --- The state: snapshot, restore, commit ------------------------------------------------------------------------
Snapshot = namedtuple("Snapshot", "length conv ssm")    # committed tokens; per layer: conv window, recurrent state

def snapshot(cache):
    """Remember the committed state. References, not copies: the models never write a conv window or a recurrent
    state in place, they replace it with a new tensor, so the tensors referenced here stay as they are. KV caches
    are only written beyond the committed length, so their length is all there is to remember."""
    return Snapshot(cache.length, [s.conv for s in cache.layers], [s.ssm for s in cache.layers])

def restore(cache, snap):
    """Put a snapshot back: O(layers), nothing is copied."""
    cache.length = snap.length
    for state, conv, ssm in zip(cache.layers, snap.conv, snap.ssm):
        state.conv, state.ssm, state.recorded = conv, ssm, None

def commit(cache, start, n):
    """Keep the state after the first n tokens fed by the recording pass that started at position start.
    A recurrent state cannot be truncated, but the verify pass recorded every position's state (each one computed
    when indexed), so we pick one: the conv window after token n-1 is the K-1 inputs ending there, the recurrent
    state is states[n-1].
    The KV caches are rolled back by length: entries beyond it are overwritten later."""
    cache.length = start + n
    for state in cache.layers:
        if state.recorded is not None:
            state.conv = state.recorded.conv_inputs[:, n:n + state.conv.shape[1]]   # the K-1 inputs up to token n-1
            state.ssm = state.recorded.states[n - 1]
            state.recorded = None


# --- One round of speculation: greedy, and its sampling form -----------------------------------------------------
def draft_tokens(model, cache, pending, skip, k):
    """k greedy tokens from the draft model (the full model without `skip`), continuing from the cache.
    Feeds pending, d1, ..., d(k-1): k steps; dk is fed by the verify pass. Advances the cache: restore() after."""
    drafts, token = [], pending
    for _ in range(k):
        token = int(model(torch.tensor([[token]], device=cache.device), cache, skip=skip)[0, -1].argmax())
        drafts.append(token)
    return drafts

def draft_tokens_sampled(model, cache, pending, skip, k, temperature, generator):
    """k tokens sampled from the draft model at a temperature, as draft_tokens feeds them. Returns the drafts and
    q (k, V): the draft's whole distribution at each drafted position, which accept_sampled needs."""
    drafts, q, token = [], [], pending
    for _ in range(k):
        logits = model(torch.tensor([[token]], device=cache.device), cache, skip=skip)[0, -1]
        q.append(probabilities(logits, temperature))
        token = int(torch.multinomial(q[-1], 1, generator=generator))
        drafts.append(token)
    return drafts, torch.stack(q)

def probabilities(logits, temperature):
    """softmax(logits / temperature) in float64, on the CPU where the sampling generator lives: (..., V)."""
    return torch.softmax(logits.double().cpu() / temperature, dim=-1)

def verify(model, cache, pending, drafts):
    """One full-model pass over [pending, d1..dk] -> logits (k+1, V): row i predicts the token after position i, so
    rows 0..k-1 judge d1..dk and row k gives the bonus token. Records the recurrent state after every position."""
    return model(torch.tensor([[pending, *drafts]], device=cache.device), cache, record_states=True)[0]

def accept(drafts, logits):
    """(n, next_token): n = the longest prefix of drafts equal to the full model's greedy choices; next_token = the
    full model's own choice after it (the correction if n < k, the bonus if all k were accepted)."""
    choices = logits.argmax(dim=-1).tolist()
    n = 0
    while n < len(drafts) and drafts[n] == choices[n]:
        n += 1
    return n, choices[n]

def accept_sampled(drafts, q, logits, temperature, generator):
    """(n, next_token) for sampled drafts; q (k, V) the draft's distributions, logits (k+1, V) the verify pass's rows.
    Draft i is accepted with probability min(1, p(d_i) / q(d_i)), p the full model's distribution at the same
    temperature; the first rejection ends the round, and the next token is sampled from the residual max(0, p - q)
    (normalised: torch.multinomial takes weights). If all k are accepted, the bonus token is sampled from p."""
    p = probabilities(logits, temperature)                                            # (k+1, V)
    for i, draft in enumerate(drafts):
        if torch.rand((), dtype=torch.float64, generator=generator) >= p[i, draft] / q[i, draft]:     # rejected
            return i, int(torch.multinomial((p[i] - q[i]).clamp(min=0), 1, generator=generator))
    return len(drafts), int(torch.multinomial(p[-1], 1, generator=generator))

def speculative_round(model, cache, pending, skip, k, temperature=0.0, generator=None):
    """One round (module docstring): (drafts, n accepted, next token). The committed tokens grow by the accepted
    drafts and the next token, which becomes the new pending token."""
    snap = snapshot(cache)                                                                     # 1
    if temperature == 0:
        drafts = draft_tokens(model, cache, pending, skip, k)                                  # 2 (greedy)
    else:
        drafts, q = draft_tokens_sampled(model, cache, pending, skip, k, temperature, generator)  # 2 (sampling)
    restore(cache, snap)                                                                       # 3
    logits = verify(model, cache, pending, drafts)                                             # 4
    if temperature == 0:
        n, next_token = accept(drafts, logits)                                                 # 5 (greedy)
    else:
        n, next_token = accept_sampled(drafts, q, logits, temperature, generator)             # 5 (sampling)
    commit(cache, snap.length, n + 1)                                  # 6: the pending token and the n accepted drafts
    return drafts, n, next_token

def plain_step(model, cache, pending, temperature=0.0, generator=None):
    """Plain decoding, the baseline: feed the pending token, return the full model's next token (argmax, or a sample)."""
    logits = model(torch.tensor([[pending]], device=cache.device), cache)[0, -1]
    if temperature == 0:
        return int(logits.argmax())
    return int(torch.multinomial(probabilities(logits, temperature), 1, generator=generator))


# --- Generation --------------------------------------------------------------------------------------------------
Step = namedtuple("Step", "kind drafts accepted next_token tokens seconds")
# kind: "prefill" (the prompt is fed; no tokens yet), "plain" (one token of plain decoding) or "round" (speculation:
# k drafts, `accepted` of them kept, then the full model's next token); tokens: what the step adds to the output
# (cut after EOS); seconds: what the step took, not counting what the caller did between steps.

def clock(device):
    """time.perf_counter(), after waiting for the GPU if there is one."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()

def prefill(model, cache, tokens, skip=None):
    """Feed tokens with the full model (or, given a skip, the draft model): chunked scans, no logits needed."""
    if tokens:
        model.hidden_states(torch.tensor([tokens], device=cache.device), cache, skip=skip)

def check_request(model, prompt, max_new_tokens, k, temperature):
    vocab, context = model.config.vocab_size, model.config.max_position_embeddings
    if not prompt:
        raise models.UsageError("the prompt is empty: give at least one token")
    if not all(0 <= t < vocab for t in prompt):
        raise models.UsageError(f"token ids must lie in 0..{vocab - 1}")
    if k < 1:
        raise models.UsageError(f"k must be at least 1 (got {k})")
    if max_new_tokens < 0:
        raise models.UsageError(f"the number of new tokens must be at least 0 (got {max_new_tokens})")
    if len(prompt) + max_new_tokens > context:
        raise models.UsageError(f"prompt + new tokens exceed the model's context of {context}")
    if temperature < 0:
        raise models.UsageError(f"the temperature must be at least 0 (got {temperature})")

@torch.inference_mode()
def generate_steps(model, prompt_ids, max_new_tokens, draft="component", k=2, eos_token_id=None, temperature=0.0,
                   seed=None):
    """generate, one step at a time: yields a Step after the prefill and after every round (or plain step), so that a
    caller can show the tokens as they are committed. Arguments as for generate."""
    prompt = prompt_ids.tolist() if torch.is_tensor(prompt_ids) else list(prompt_ids)
    check_request(model, prompt, max_new_tokens, k, temperature)
    skip = draft if isinstance(draft, models.Skip) else None if draft == "none" else draft_skip(model.config, draft)
    eos = model.config.eos_token_id if eos_token_id is None else eos_token_id
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    cache = models.Cache(model, max_len=len(prompt) + max_new_tokens + k + 1)
    t0 = clock(cache.device)
    prefill(model, cache, prompt[:-1])
    yield Step("prefill", [], 0, None, [], clock(cache.device) - t0)
    produced, pending = 0, prompt[-1]
    while produced < max_new_tokens:
        t0 = clock(cache.device)
        k_round = min(k, max_new_tokens - produced - 1)           # never draft past the last token asked for
        if skip is None or k_round == 0:
            kind, drafts, n = "plain", [], 0
            pending = plain_step(model, cache, pending, temperature, generator)
        else:
            kind = "round"
            drafts, n, pending = speculative_round(model, cache, pending, skip, k_round, temperature, generator)
        new = drafts[:n] + [pending]
        if eos in new:
            new = new[:new.index(eos) + 1]
        produced += len(new)
        yield Step(kind, drafts, n, pending, new, clock(cache.device) - t0)
        if eos in new:
            return

def generate(model, prompt_ids, max_new_tokens, draft="component", k=2, eos_token_id=None, temperature=0.0, seed=None):
    """Self-speculative decoding. Greedy (temperature 0) gives plain greedy decoding's tokens; at a temperature T > 0,
    tokens distributed as plain sampling's at T (seed: a seeded random stream; None: torch's global one).
    prompt_ids: 1-D LongTensor or list of ints; draft: a name from DRAFTS ("none" = plain decoding, the baseline)
    or a models.Skip; eos_token_id: defaults to the model's. Stops after max_new_tokens new tokens or after EOS
    (included). Returns (new token ids, the statistics() dict)."""
    steps = list(generate_steps(model, prompt_ids, max_new_tokens, draft, k, eos_token_id, temperature, seed))
    return [t for step in steps for t in step.tokens], statistics(k, steps)

def statistics(k, steps):
    """What a generation did, from its steps; alpha: README, "Acceptance"."""
    rounds = [s for s in steps if s.kind == "round"]
    drafted = sum(len(r.drafts) for r in rounds)
    accepted = sum(r.accepted for r in rounds)
    new_tokens = sum(len(s.tokens) for s in steps)
    decode_s = sum(s.seconds for s in steps if s.kind != "prefill")
    return {"k": k, "drafted": drafted, "accepted": accepted, "alpha": accepted / drafted if drafted else None,
            "rounds": len(rounds), "accepted_per_round": accepted / len(rounds) if rounds else None,
            "accepted_histogram": [sum(r.accepted == a for r in rounds) for a in range(k + 1)],
            "new_tokens": new_tokens, "prefill_s": sum(s.seconds for s in steps if s.kind == "prefill"),
            "decode_s": decode_s, "round_s": sum(r.seconds for r in rounds),
            "tokens_per_s": new_tokens / decode_s if decode_s else None,
            "trace": [(r.drafts, r.accepted, r.next_token) for r in rounds]}


# --- Command line ------------------------------------------------------------------------------------------------
def show(tokenizer, ids):
    """Token ids as quoted text, whitespace and control characters visible."""
    return json.dumps(tokenizer.decode(ids), ensure_ascii=False)

def trace_line(i, step, tokenizer, color):
    """A round: the drafts (accepted +, rejected -), then the full model's next token."""
    paint = (lambda code, s: f"\033[{code}m{s}\033[0m") if color else (lambda code, s: s)
    n, drafts = step.accepted, step.drafts
    marked = [paint("32", "+" + show(tokenizer, [t])) if j < n else paint("31", "-" + show(tokenizer, [t]))
              for j, t in enumerate(drafts)]
    return (f"round {i:3d}  accepted {n}/{len(drafts)}  {' '.join(marked)}  -> "
            f"{'bonus' if n == len(drafts) else 'correction'} {paint('36', show(tokenizer, [step.next_token]))}")

def warm_up(model, k):
    """A decoding step and a (k+1)-token pass on a scratch cache: the first calls of a process are slow (memory,
    kernel selection), and the timings should show what decoding costs. Not a generation, so a debugger's first stop
    in speculative_round is in the generation asked for."""
    with torch.inference_mode():
        cache = models.Cache(model, k + 2)
        model(torch.zeros(1, k + 1, dtype=torch.long, device=cache.device), cache, record_states=True)
        model(torch.zeros(1, 1, dtype=torch.long, device=cache.device), cache)

def first_difference(model, prompt, spec, plain):
    """Where the speculative and the plain tokens part, and by what logit margin the full model chose there."""
    i = next(i for i, (a, b) in enumerate(zip(spec, plain)) if a != b)      # EOS ends both at the same place
    with torch.inference_mode():
        logits = model(torch.tensor([prompt + plain[:i]], device=model.lm_head.weight.device))[0, -1].float()
    margin = (logits[plain[i]] - logits[spec[i]]).item()
    return (f"new token {i}: speculative {spec[i]}, greedy {plain[i]}, logit margin {margin:.3g} (logit std "
            f"{logits.std().item():.3g}). A margin far below the std is a near-tie, which a verify pass of k+1 tokens "
            "and single-token steps, rounding differently, can flip (bfloat16 far more often than float32); else a bug")

def run_generate(args, model, tokenizer):
    """Generate for the command line, printing the text (or, with --trace, each round) as it is committed."""
    prompt, temperature = tokenizer.encode(args.prompt).ids, args.temperature or 0.0
    check_request(model, prompt, args.max_new_tokens, args.k, temperature)
    if args.check and temperature > 0:
        raise models.UsageError("--check compares with greedy decoding: at a temperature, exactness is a property of "
                                "distributions (the tests prove it); leave out --check or --temperature")
    seed = args.seed if args.seed is not None or temperature == 0 else torch.Generator().seed() % 2**31   # printed
    sampling = f", temperature {temperature}, seed {seed}" if temperature > 0 else ", greedy"
    print(f"model   {args.model} ({model.config.num_layers} layers, {args.dtype} on {args.device}), draft {args.draft}, "
          f"k={args.k}{sampling}: skips {draft_skip(model.config, args.draft)}")
    print(f"prompt  {show(tokenizer, prompt)}")
    warm_up(model, args.k)
    steps, tokens, shown = [], [], ""
    print("" if args.trace else 'output  "', end="", flush=True)
    for step in generate_steps(model, prompt, args.max_new_tokens, args.draft, args.k, None, temperature, seed):
        steps.append(step)
        tokens += step.tokens
        if args.trace and step.kind == "round":
            print(trace_line(sum(s.kind == "round" for s in steps), step, tokenizer, sys.stdout.isatty()), flush=True)
        text = tokenizer.decode(tokens)
        if not args.trace and not text.endswith("\ufffd"):       # a character whose bytes are not all there yet
            print(json.dumps(text[len(shown):], ensure_ascii=False)[1:-1], end="", flush=True)
            shown = text
    if args.trace:
        print(f"output  {show(tokenizer, tokens)}")
    else:
        print(json.dumps(text[len(shown):], ensure_ascii=False)[1:-1] + '"')
    s = {**statistics(args.k, steps), "temperature": temperature, "seed": seed}
    if s["rounds"]:
        print(f"alpha   {s['alpha']:.3f}: {s['accepted']} of {s['drafted']} drafts accepted, "
              f"{s['accepted_per_round']:.2f} per round over {s['rounds']} rounds {s['accepted_histogram']}, "
              f"{s['round_s'] / s['rounds'] * 1e3:.1f} ms per round")
    print(f"speed   {s['new_tokens']} tokens in {s['decode_s']:.2f} s: {s['tokens_per_s'] or 0:.2f} tokens/s "
          f"(prefill of {len(prompt)} tokens {s['prefill_s']:.2f} s)")
    if args.check:
        plain, plain_stats = generate(model, prompt, args.max_new_tokens, draft="none")
        s["identical_to_greedy"], s["speedup_vs_greedy"] = plain == tokens, plain_stats["decode_s"] / s["decode_s"]
        print(f"check   identical to plain greedy decoding: speedup {s['speedup_vs_greedy']:.2f}x" if plain == tokens
              else f"check   FAILED: tokens differ from greedy at {first_difference(model, prompt, tokens, plain)}")
    return s

def main(argv=None):
    p = argparse.ArgumentParser(description="Self-speculative decoding in hybrid language models.")
    p.error = lambda message: p.exit(2, f"hsd: error: {message} (see --help)\n")     # one line, no usage text
    p.add_argument("--model", required=True, help=f"{', '.join([*models.OFFICIAL, *models.TINY])}, repo id or folder")
    p.add_argument("--draft", default="component", choices=DRAFTS, help="draft strategy (default: component)")
    p.add_argument("-k", type=int, default=2, help="drafted tokens per round (default: 2)")
    p.add_argument("--prompt", default="The Eiffel Tower is a wrought-iron lattice tower in Paris. It was built")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, help="sample at this temperature (default: 0, greedy; --eval: 0.6)")
    p.add_argument("--seed", type=int, help="seed of the sampling (default: a fresh one, printed; --eval: 0)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--trace", action="store_true", help="show every round: drafts, accepted, the next token")
    p.add_argument("--check", action="store_true", help="decode plainly too; fail if tokens differ; print the speedup")
    p.add_argument("--json", action="store_true", help="the statistics as one JSON object on the last line")
    p.add_argument("--eval", action="store_true", help="the paper's measurements and the cost model (README, hsd_eval.py)")
    p.add_argument("--text", help="--eval: a UTF-8 text file (default: WikiText-2 validation; tiny-*: a built-in text)")
    p.add_argument("--prompts", type=int, default=200, help="--eval: prompts of the single-round protocol (default: 200)")
    p.add_argument("--speed-prompts", type=int, default=10, help="--eval: prompts of the multi-round runs (default: 10)")
    p.add_argument("--out", help="--eval: save results to this file as they come; the same command resumes from it")
    p.add_argument("--plot", help="--eval: draw acceptance by k to this SVG file")
    args = p.parse_args(argv)
    try:
        if args.device == "cuda" and not torch.cuda.is_available():
            raise models.UsageError("CUDA is not available on this machine: use --device cpu")
        model = models.load(args.model, getattr(torch, args.dtype), args.device)
        tokenizer = models.load_tokenizer(args.model)
        if args.eval:
            import hsd_eval
            s = hsd_eval.run(args, model, tokenizer)
        else:
            s = run_generate(args, model, tokenizer)
    except models.UsageError as e:
        print(f"hsd: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        print(f"\nhsd: interrupted{': ' + str(e) if str(e) else ''}", file=sys.stderr)
        return 130
    if args.json:
        print(json.dumps(s))
    return 1 if s.get("identical_to_greedy") is False else 0


if __name__ == "__main__":
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)     # output piped into `head` and the like: stop quietly
    sys.exit(main())

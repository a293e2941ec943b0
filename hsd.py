"""hsd: component-aware self-speculative decoding in hybrid language models (lossless).

A hybrid model contains a cheaper model: itself without its attention. Draft k tokens with that, verify them
with the full model in one pass, keep the longest agreeing prefix. The state covers the committed tokens; one
committed token is pending (not yet fed). One round:

  1. snapshot  remember the state: KV length + references to the recurrent states
  2. draft     k tokens from the draft model (the full model minus some parts), from the full model's state
  3. restore   put the snapshot back: drafting leaves no trace
  4. verify    one full-model pass over [pending, d1..dk]: logits, and the recurrent states after every position
  5. judge     how many drafts the full model accepts (a prefix), and the full model's next token
  6. commit    keep the recorded state after the accepted tokens; roll the KV caches back by length

Steps 2 and 5 have two forms: greedy (temperature 0), whose output is plain greedy decoding's, token for token, and
sampling (speculative sampling, Leviathan et al. 2023), exact in distribution. README: how to run it; hsd_eval.py.
"""
import argparse
import json
import signal
import sys
import warnings
from collections import namedtuple

warnings.filterwarnings("ignore", message="Failed to initialize NumPy")  # torch warns when NumPy (unused) is absent
import torch  # noqa: E402

import models  # noqa: E402

DRAFTS = ("component", "layerskip", "early-exit", "none")     # "none": plain decoding, no draft


# --- Draft strategies: plain data saying which parts of the full model the draft leaves out ----------------------
def draft_skip(config, draft):
    """The models.Skip of a draft strategy of the paper: "component", "layerskip" or "early-exit"."""
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
    raise models.UsageError(f"unknown draft {draft!r}: choose one of {', '.join(DRAFTS[:-1])} (or none: no draft)")


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

def commit(cache, start, n, recorded):
    """Keep the state after the first n tokens of the verify pass that started at position start, from what that pass
    recorded (verify's second value: per layer a models.Recorded, None for attention layers). A recurrent state cannot
    be truncated: the conv window becomes the K-1 inputs ending at token n-1, the state states[n-1]. KV: the length."""
    cache.length = start + n
    for state, layer in zip(cache.layers, recorded):
        if layer is not None:
            state.conv = layer.conv_inputs[:, n:n + state.conv.shape[1]]   # the K-1 inputs up to token n-1
            state.ssm = layer.states[n - 1]


# --- One round of speculation ------------------------------------------------------------------------------------
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

def draft(model, cache, pending, skip, k, temperature=0.0, generator=None):
    """Step 2, greedy or sampled: (drafts, q), q the drafts' distributions (k, V) when sampling, None when greedy."""
    if temperature == 0:
        return draft_tokens(model, cache, pending, skip, k), None
    return draft_tokens_sampled(model, cache, pending, skip, k, temperature, generator)

def verify(model, cache, pending, drafts):
    """One full-model pass over [pending, d1..dk] -> (logits (k+1, V), recorded). Row i of logits predicts the token
    after position i, so rows 0..k-1 judge d1..dk and row k gives the bonus token. recorded: per layer, the states
    after every position (models.Recorded; None for attention layers), from which commit keeps one."""
    logits, recorded = model(torch.tensor([[pending, *drafts]], device=cache.device), cache, record_states=True)
    return logits[0], recorded

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
    Draft i is accepted with probability min(1, p(d_i) / q(d_i)), p the full model's distribution at the temperature;
    the first rejection ends the round, its token drawn from max(0, p - q) (weights); all accepted: the bonus from p."""
    p = probabilities(logits, temperature)                                            # (k+1, V)
    for i, token in enumerate(drafts):
        if torch.rand((), dtype=torch.float64, generator=generator) >= p[i, token] / q[i, token]:     # rejected
            return i, int(torch.multinomial((p[i] - q[i]).clamp(min=0), 1, generator=generator))
    return len(drafts), int(torch.multinomial(p[-1], 1, generator=generator))

def judge(drafts, q, logits, temperature=0.0, generator=None):
    """Step 5, greedy (accept) or sampled (accept_sampled): (n accepted, the full model's next token)."""
    if temperature == 0:
        return accept(drafts, logits)
    return accept_sampled(drafts, q, logits, temperature, generator)

def speculative_round(model, cache, pending, skip, k, temperature=0.0, generator=None):
    """One round (module docstring): (drafts, n accepted, next token). The committed tokens grow by the accepted
    drafts and the next token, which becomes the new pending token."""
    snap = snapshot(cache)                                                         # 1
    drafts, q = draft(model, cache, pending, skip, k, temperature, generator)     # 2
    restore(cache, snap)                                                           # 3
    logits, recorded = verify(model, cache, pending, drafts)                       # 4
    n, next_token = judge(drafts, q, logits, temperature, generator)               # 5
    commit(cache, snap.length, n + 1, recorded)               # 6: the pending token and the n accepted drafts
    return drafts, n, next_token

def plain_step(model, cache, pending, temperature=0.0, generator=None):
    """Plain decoding, the baseline: feed the pending token; the next token is judge's with nothing drafted."""
    logits = model(torch.tensor([[pending]], device=cache.device), cache)[0]          # (1, V)
    return judge([], None, logits, temperature, generator)[1]


# --- Generation --------------------------------------------------------------------------------------------------
Step = namedtuple("Step", "kind drafts accepted next_token tokens seconds")
# kind: "prefill" (no tokens yet), "plain" (a token of plain decoding) or "round" (k drafts, `accepted` of them kept,
# then next_token); tokens: what the step adds to the output (cut after EOS); seconds: what the step itself took.
Round = namedtuple("Round", "drafts accepted next_token")    # an entry of statistics()["trace"]

def prefill(model, cache, tokens, skip=None):
    """Feed tokens with the full model (or, given a skip, the draft model): chunked scans, no logits needed."""
    if tokens:
        model.hidden_states(torch.tensor([tokens], device=cache.device), cache, skip=skip)

@torch.inference_mode()
def generate_steps(model, prompt_ids, max_new_tokens, draft="component", k=2, eos_token_id=None, temperature=0.0,
                   seed=None):
    """generate, one step at a time: yields a Step after the prefill and after every round (or plain step), so that a
    caller can show the tokens as they are committed. Arguments as for generate."""
    prompt = prompt_ids.tolist() if torch.is_tensor(prompt_ids) else list(prompt_ids)
    models.check_request(model.config, prompt, max_new_tokens, k, temperature)
    skip = draft if isinstance(draft, models.Skip) else None if draft == "none" else draft_skip(model.config, draft)
    eos = model.config.eos_token_id if eos_token_id is None else eos_token_id
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    cache = models.Cache(model, max_len=len(prompt) + max_new_tokens)   # no round drafts past the last new token
    t0 = models.clock(cache.device)
    prefill(model, cache, prompt[:-1])
    yield Step("prefill", [], 0, None, [], models.clock(cache.device) - t0)
    produced, pending = 0, prompt[-1]
    while produced < max_new_tokens:
        t0 = models.clock(cache.device)
        k_round = min(k, max_new_tokens - produced - 1)           # never draft past the last token asked for
        if skip is None or k_round == 0:
            drafts, n, pending = [], 0, plain_step(model, cache, pending, temperature, generator)
        else:
            drafts, n, pending = speculative_round(model, cache, pending, skip, k_round, temperature, generator)
        new = drafts[:n] + [pending]
        if eos in new:
            new = new[:new.index(eos) + 1]
        produced += len(new)
        yield Step("round" if drafts else "plain", drafts, n, pending, new, models.clock(cache.device) - t0)
        if eos in new:
            return

def generate(model, prompt_ids, max_new_tokens, draft="component", k=2, eos_token_id=None, temperature=0.0, seed=None):
    """Self-speculative decoding: plain greedy decoding's tokens (temperature 0), or at a temperature T > 0 tokens
    distributed as plain sampling's at T (seed: a seeded random stream; None: torch's global one). prompt_ids: 1-D
    LongTensor or list of ints; draft: a name from DRAFTS ("none": plain decoding) or a models.Skip; eos_token_id:
    the model's by default. Stops after max_new_tokens or EOS (kept). Returns (new token ids, statistics() dict)."""
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
            "trace": [Round(r.drafts, r.accepted, r.next_token) for r in rounds]}


# --- Command line ------------------------------------------------------------------------------------------------
def show(tokenizer, ids):
    """Token ids as quoted text, whitespace and control characters visible, special tokens by name."""
    return json.dumps(tokenizer.decode(ids, skip_special_tokens=False), ensure_ascii=False)

def trace_line(i, step, tokenizer, color):
    """A round: the drafts (accepted +, rejected -), the full model's next token, and what an end of text cut off."""
    paint = (lambda code, s: f"\033[{code}m{s}\033[0m") if color else (lambda code, s: s)
    n, drafts = step.accepted, step.drafts
    marked = [paint("32", "+" + show(tokenizer, [t])) if j < n else paint("31", "-" + show(tokenizer, [t]))
              for j, t in enumerate(drafts)]
    line = (f"round {i:3d}  accepted {n}/{len(drafts)}  {' '.join(marked)}  -> "
            f"{'bonus' if n == len(drafts) else 'correction'} {paint('36', show(tokenizer, [step.next_token]))}")
    cut = (drafts[:n] + [step.next_token])[len(step.tokens):]          # what came after the end-of-text token
    return line + (f"  (not output: {show(tokenizer, cut)} came after the end of text)" if cut else "")

def summary(s, max_new_tokens, eos, tokenizer):
    """The lines after the output: why generation stopped, acceptance (rounds by drafts accepted), speed."""
    tokens = s["new_token_ids"]
    yield (f"stop    at the end-of-text token {show(tokenizer, [eos])}, after {len(tokens)} of {max_new_tokens} tokens"
           if tokens and tokens[-1] == eos else f"stop    after {len(tokens)} new tokens (--max-new-tokens)")
    if s["rounds"]:
        histogram = ", ".join(f"{a}: {count}" for a, count in enumerate(s["accepted_histogram"]) if count)
        yield (f"alpha   {s['alpha']:.3f}: {s['accepted']} of {s['drafted']} drafts accepted, "
               f"{s['accepted_per_round']:.2f} per round over {s['rounds']} rounds (rounds by drafts accepted: "
               f"{histogram}), {s['round_s'] / s['rounds'] * 1e3:.1f} ms per round")
    yield (f"speed   {s['new_tokens']} tokens in {s['decode_s']:.2f} s: {s['tokens_per_s'] or 0:.2f} tokens/s "
           f"(prefill {s['prefill_s']:.2f} s)")

def check(s, model, prompt, max_new_tokens):
    """--check: decode plainly too; say whether the tokens are the same (and the speedup) or where they part."""
    plain, plain_stats = generate(model, prompt, max_new_tokens, draft="none")
    spec = s["new_token_ids"]
    s["identical_to_greedy"] = plain == spec
    s["speedup_vs_greedy"] = plain_stats["decode_s"] / s["decode_s"]
    if plain != spec:
        i = next(i for i, (a, b) in enumerate(zip(spec, plain)) if a != b)       # EOS ends both alike
        margin, std = models.logit_margin(model, prompt + plain[:i], plain[i], spec[i])
        return (f"check   FAILED: tokens differ from greedy at new token {i}: speculative {spec[i]}, greedy "
                f"{plain[i]}, logit margin {margin:.3g} (logit std {std:.3g}; far below it: a near-tie)")
    note = ("\n        (below 1 is expected on a CPU: README, \"The cost model\", says why and what changes it)"
            if s["speedup_vs_greedy"] < 1 and model.lm_head.weight.device.type == "cpu" else "")
    return f"check   identical to plain greedy decoding; speedup {s['speedup_vs_greedy']:.2f}x in this run{note}"

def run_generate(args, model, tokenizer):
    """Generate for the command line, printing the text (or each round) as it comes; returns what --json prints."""
    prompt, temperature = tokenizer.encode(args.prompt).ids, args.temperature or 0.0
    models.check_request(model.config, prompt, args.max_new_tokens, args.k, temperature)
    seed = args.seed if args.seed is not None or temperature == 0 else torch.Generator().seed() % 2**31   # printed
    skips = "nothing: plain decoding" if args.draft == "none" else draft_skip(model.config, args.draft)
    sampling = f"temperature {temperature}, seed {seed}" if temperature > 0 else "greedy"
    print(f"model   {args.model} ({model.config.num_layers} layers, {args.dtype} on {args.device}), draft "
          f"{args.draft}, k={args.k}, {sampling}: skips {skips}")
    print(f"prompt  {show(tokenizer, prompt)}")
    models.warm_up(model, max(1, min(args.k, args.max_new_tokens - 1)))         # the longest round it will run
    steps, tokens, shown = [], [], ""
    print("" if args.trace else 'output  "', end="", flush=True)
    for step in generate_steps(model, prompt, args.max_new_tokens, args.draft, args.k, None, temperature, seed):
        steps.append(step)
        tokens += step.tokens
        if args.trace and step.kind == "round":
            print(trace_line(sum(s.kind == "round" for s in steps), step, tokenizer, sys.stdout.isatty()), flush=True)
        text = tokenizer.decode(tokens, skip_special_tokens=False)
        if not args.trace and not text.endswith("\ufffd"):       # a character whose bytes are not all there yet
            print(json.dumps(text[len(shown):], ensure_ascii=False)[1:-1], end="", flush=True)
            shown = text
    rest = json.dumps(text[len(shown):], ensure_ascii=False)[1:-1] + '"'        # what the loop has not shown yet
    print(f"output  {show(tokenizer, tokens)}" if args.trace else rest)
    s = {"model": args.model, "draft": args.draft, "temperature": temperature, "seed": seed, "new_token_ids": tokens,
         "new_text": text, **statistics(args.k, steps)}
    print(*summary(s, args.max_new_tokens, model.config.eos_token_id, tokenizer), sep="\n")
    if args.check:
        print(check(s, model, prompt, args.max_new_tokens))
    return {**s, "trace": [r._asdict() for r in s["trace"]]}

def main(argv=None):
    p = argparse.ArgumentParser(description="Self-speculative decoding in hybrid language models.")
    p.error = lambda message: p.exit(2, f"hsd: error: {message} (see --help)\n")     # one line, no usage text
    p.add_argument("--model", required=True, help=", ".join([*models.OFFICIAL, *models.TOYS, *models.TINY, "a folder"]))
    p.add_argument("--draft", default="component", choices=DRAFTS, help="draft strategy (default: component)")
    p.add_argument("-k", type=int, default=2, help="drafted tokens per round (default: 2)")
    p.add_argument("--prompt", default="The function returns")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, help="sample at this temperature (default: 0, greedy)")
    p.add_argument("--seed", type=int, help="seed of the sampling (default: a fresh one, printed)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--trace", action="store_true", help="show every round: drafts, accepted, the next token")
    p.add_argument("--check", action="store_true", help="decode plainly too; fail if tokens differ; print the speedup")
    p.add_argument("--json", action="store_true", help="the statistics as one JSON object on the last line")
    args, unknown = p.parse_known_args(argv)
    if unknown:                       # --eval, --out, --text, ...: the measurements have a command of their own
        p.error(f"unrecognized arguments: {' '.join(unknown)} (measurements: hsd_eval.py --model {args.model} ...)")
    if args.check and (args.temperature or args.max_new_tokens < 1):   # exactness at T > 0: the tests prove it
        p.error("--check compares with greedy decoding: leave out --temperature, give --max-new-tokens >= 1")
    try:
        model = models.load(args.model, getattr(torch, args.dtype), args.device)
        s = run_generate(args, model, models.load_tokenizer(args.model))
    except models.UsageError as e:
        print(f"hsd: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\nhsd: interrupted", file=sys.stderr)
        return 130
    if args.json:
        print(json.dumps(s))
    return 1 if s.get("identical_to_greedy") is False else 0


if __name__ == "__main__":
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)     # output piped into `head` and the like: stop quietly
    sys.exit(main())

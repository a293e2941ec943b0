"""hsd: component-aware self-speculative decoding in hybrid language models (greedy, lossless).

A hybrid model contains a cheaper model: itself without its attention. Draft k tokens with that, verify them
with the full model in one pass, keep the longest agreeing prefix. The state covers the committed tokens; one
committed token is pending (not yet fed). One round:

  1. snapshot  remember the state: KV length + references to the recurrent states
  2. draft     k greedy tokens from the draft model (the full model minus some parts), from the full model's state
  3. restore   put the snapshot back: drafting leaves no trace
  4. verify    one full-model pass over [pending, d1..dk], recording the recurrent states after every position
  5. accept    the longest prefix of drafts equal to the full model's choices, plus the full model's next token
  6. commit    keep the recorded state after the accepted tokens; roll the KV caches back by length
Usage: python hsd.py --model falcon-h1-0.5b  (README: the flags, --eval, what was and was not verified)
"""
import argparse
import json
import signal
import sys
import time
from collections import namedtuple
from functools import partial

import torch

import models

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
    A recurrent state cannot be truncated, but the verify pass recorded every position's state, so we pick one:
    the conv window after token n-1 is the K-1 inputs ending there, the recurrent state is states[n-1].
    The KV caches are rolled back by length: entries beyond it are overwritten later."""
    cache.length = start + n
    for state in cache.layers:
        if state.recorded is not None:
            state.conv = state.recorded.conv_inputs[:, n:n + state.conv.shape[1]]   # the K-1 inputs up to token n-1
            state.ssm = state.recorded.states[n - 1]
            state.recorded = None


# --- One round of speculation ------------------------------------------------------------------------------------
def draft_tokens(model, cache, pending, skip, k):
    """k greedy tokens from the draft model (the full model without `skip`), continuing from the cache.
    Feeds pending, d1, ..., d(k-1): k steps; dk is fed by the verify pass. Advances the cache: restore() after."""
    drafts, token = [], pending
    for _ in range(k):
        token = int(model(torch.tensor([[token]], device=cache.device), cache, skip=skip)[0, -1].argmax())
        drafts.append(token)
    return drafts

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

def speculative_round(model, cache, pending, skip, k, seconds):
    """One round (module docstring): (drafts, n accepted, next token). The committed tokens grow by the accepted
    drafts and the next token, which becomes the new pending token. Adds the round's times to `seconds`."""
    t0 = clock(cache.device)
    snap = snapshot(cache)                                   # 1
    drafts = draft_tokens(model, cache, pending, skip, k)    # 2
    t1 = clock(cache.device)
    restore(cache, snap)                                     # 3
    logits = verify(model, cache, pending, drafts)           # 4
    t2 = clock(cache.device)
    n, next_token = accept(drafts, logits)                   # 5
    commit(cache, snap.length, n + 1)                        # 6: the pending token and the n accepted drafts
    seconds["draft"], seconds["verify"] = seconds["draft"] + t1 - t0, seconds["verify"] + t2 - t1
    seconds["bookkeeping"] += clock(cache.device) - t2
    return drafts, n, next_token


# --- Generation --------------------------------------------------------------------------------------------------
def clock(device):
    """time.perf_counter(), after waiting for the GPU if there is one."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()

def prefill(model, cache, tokens, skip=None):
    """Feed tokens with the full model (or, given a skip, the draft model): chunked scans, no logits needed."""
    if tokens:
        model.hidden_states(torch.tensor([tokens], device=cache.device), cache, skip=skip)

def check_request(model, prompt, max_new_tokens, k):
    vocab, context = model.config.vocab_size, model.config.max_position_embeddings
    for bad, message in [
            (not prompt, "the prompt is empty: give at least one token"), (k < 1, f"k must be at least 1 (got {k})"),
            (max_new_tokens < 0, f"the number of new tokens must be at least 0 (got {max_new_tokens})"),
            (prompt and not 0 <= min(prompt) <= max(prompt) < vocab, f"token ids must lie in 0..{vocab - 1}"),
            (len(prompt) + max_new_tokens > context, f"prompt + new tokens exceed the model's context of {context}")]:
        if bad:
            raise models.UsageError(message)

def statistics(k, rounds, seconds, new_tokens):
    """What generate did, from its rounds, each (drafts, n accepted, next token); alpha: README, "Acceptance"."""
    drafted, accepted = sum(len(d) for d, _, _ in rounds), sum(n for _, n, _ in rounds)
    return {"k": k, "drafted": drafted, "accepted": accepted, "alpha": accepted / drafted if drafted else None,
            "rounds": len(rounds), "accepted_per_round": accepted / len(rounds) if rounds else None,
            "accepted_histogram": [sum(n == a for _, n, _ in rounds) for a in range(k + 1)],
            "new_tokens": new_tokens, "tokens_per_s": new_tokens / seconds["decode"] if seconds["decode"] else None,
            **{f"{phase}_s": s for phase, s in seconds.items()}, "trace": rounds}

@torch.inference_mode()
def generate(model, prompt_ids, max_new_tokens, draft="component", k=2, eos_token_id=None):
    """Greedy decoding with self-speculation; the tokens equal plain greedy decoding's.
    prompt_ids: 1-D LongTensor or list of ints; draft: a name from DRAFTS ("none" = plain greedy decoding, the
    baseline) or a models.Skip; eos_token_id: defaults to the model's. Stops after max_new_tokens new tokens or
    after EOS (included). Returns (new token ids, the statistics() dict)."""
    prompt = prompt_ids.tolist() if torch.is_tensor(prompt_ids) else list(prompt_ids)
    check_request(model, prompt, max_new_tokens, k)
    skip = draft if isinstance(draft, models.Skip) else None if draft == "none" else draft_skip(model.config, draft)
    eos = model.config.eos_token_id if eos_token_id is None else eos_token_id
    cache = models.Cache(model, max_len=len(prompt) + max_new_tokens + k + 1)
    rounds, seconds = [], dict.fromkeys(["prefill", "decode", "draft", "verify", "bookkeeping"], 0.0)
    t0 = clock(cache.device)
    prefill(model, cache, prompt[:-1])
    t1 = clock(cache.device)
    tokens, pending = [], prompt[-1]
    while len(tokens) < max_new_tokens and eos not in tokens:
        k_round = min(k, max_new_tokens - len(tokens) - 1)       # never draft past the last token asked for
        if skip is None or k_round == 0:                          # plain greedy step
            new = [int(model(torch.tensor([[pending]], device=cache.device), cache)[0, -1].argmax())]
        else:
            rounds.append(speculative_round(model, cache, pending, skip, k_round, seconds))
            drafts, n, next_token = rounds[-1]
            new = drafts[:n] + [next_token]
        tokens += new[:new.index(eos) + 1] if eos in new else new
        pending = tokens[-1]
    seconds["prefill"], seconds["decode"] = t1 - t0, clock(cache.device) - t1
    return tokens, statistics(k, rounds, seconds, len(tokens))


# --- Evaluation (--eval): the paper's measurements, and a cost model that explains the speed ---------------------
def eval_text(path, model_name):
    """(prompts: non-empty lines longer than 100 characters, text: all non-empty lines joined by newlines)."""
    try:
        if path or model_name in models.TINY:         # a text file, or the tiny models' built-in text
            lines = open(path, encoding="utf-8").read().splitlines() if path else models.TINY_TEXT
        else:                                        # WikiText-2 raw validation, as in the paper
            import pyarrow.parquet as pq
            from huggingface_hub import hf_hub_download
            lines = pq.read_table(hf_hub_download("Salesforce/wikitext", "wikitext-2-raw-v1/validation-00000-of-00001"
                                                  ".parquet", repo_type="dataset")).column("text").to_pylist()
    except Exception as e:      # no such file; or no network and nothing cached, or no pyarrow to read the parquet file
        raise models.UsageError(f"cannot read {path or 'WikiText-2 (it needs the Hub and `pip install pyarrow`)'}: "
                                f"{type(e).__name__}: {str(e)[:80]}; pass --text FILE") from None
    lines = [line.rstrip("\n") for line in lines if line.strip()]     # raw WikiText lines start with a space: kept
    return [line for line in lines if len(line) > 100], "\n".join(lines)

def bootstrap_ci(values, resamples=10_000, seed=0):
    """95% percentile interval of the mean, resampling the values with replacement."""
    v = torch.tensor(values, dtype=torch.float64)
    means = v[torch.randint(len(v), (resamples, len(v)), generator=torch.Generator().manual_seed(seed))].mean(dim=1)
    return torch.quantile(means, 0.025).item(), torch.quantile(means, 0.975).item()

def single_round(model, cache, prompt, skip, k, independent):
    """Drafts accepted in one round after the prompt (the paper's protocol); cache holds the full model's prefill of
    prompt[:-1] and is left so. The draft starts from the full model's state (shared, as generate does) or from its
    own, made by running the draft over the prompt (independent, as the paper's code did)."""
    snap, own = snapshot(cache), models.Cache(model, len(prompt) + k) if independent else cache
    if independent:
        prefill(model, own, prompt[:-1], skip)
    drafts = draft_tokens(model, own, prompt[-1], skip, k)
    restore(cache, snap)
    n, _ = accept(drafts, verify(model, cache, prompt[-1], drafts))
    restore(cache, snap)
    return n

def compare(model, ids, skip, chunk=256):
    """Sums over the positions of ids (1, T), p the full model's next-token distribution and q the draft's: total
    variation 1/2 sum|p - q|, top-1 agreement, KL(p || q), cross-entropy of the next token under p and q (T-1)."""
    h, h_draft = model.hidden_states(ids)[0], model.hidden_states(ids, skip=skip)[0]
    sums = torch.zeros(5, dtype=torch.float64)
    for i in range(0, len(h), chunk):          # logits a chunk of positions at a time: the vocabulary is large
        lp, lq = (torch.log_softmax(model.logits(x[i:i + chunk]).double(), -1) for x in (h, h_draft))
        nxt = ids[0, i + 1:i + 1 + chunk, None]
        sums += torch.stack([0.5 * (lp.exp() - lq.exp()).abs().sum(), (lp.argmax(-1) == lq.argmax(-1)).sum(),
                             (lp.exp() * (lp - lq)).sum(), -lp[:len(nxt)].gather(1, nxt).sum(),
                             -lq[:len(nxt)].gather(1, nxt).sum()]).cpu()
    return sums

def step_times(model, skips, ks, context, repeats=7):
    """Median seconds at a context: a full decoding step ("full"), a draft step (by name), a verify pass (by k)."""
    cache = models.Cache(model, context + max(ks) + 2)
    tokens = torch.randint(model.config.vocab_size, (context,), generator=torch.Generator().manual_seed(0))
    prefill(model, cache, tokens.tolist())
    snap, token = snapshot(cache), torch.tensor([[1]], device=cache.device)
    steps = {"full": partial(model, token, cache), **{k: partial(verify, model, cache, 1, [1] * k) for k in ks},
             **{d: partial(model, token, cache, skip=s) for d, s in skips.items()}}
    samples = {name: [] for name in steps}
    for _ in range(repeats):                   # the kinds of step take turns, so that drift affects all alike
        for name, step in steps.items():
            t0 = clock(cache.device)
            step()
            samples[name].append(clock(cache.device) - t0)
            restore(cache, snap)
    return {name: sorted(s)[repeats // 2] for name, s in samples.items()}

def break_even(times, draft, k, a, max_context):
    """The context from which on the predicted speedup (1 + a) t_full / (k t_draft + t_verify) exceeds 1, each time
    linear in L through the two measured contexts: 0 if it does at both, None if not up to max_context."""
    (L0, t0), (L1, t1) = times.items()
    gap0, gap1 = ((1 + a) * t["full"] - k * t[draft] - t[k] for t in (t0, t1))
    crossing = L0 - gap0 * (L1 - L0) / (gap1 - gap0) if gap1 > gap0 else float("inf")    # rising through 0
    return 0 if min(gap0, gap1) >= 0 else round(crossing) if crossing <= max_context else None

@torch.inference_mode()
def evaluate(model, tokenizer, prompts, text, max_new_tokens, ks=(2, 4, 8)):
    """Every number of the --eval table, as a dict (README, "Results")."""
    device, c = model.lm_head.weight.device, model.config
    prompts = [tokenizer.encode(p, add_special_tokens=False).ids[:512] for p in prompts]
    text_ids = torch.tensor([tokenizer.encode(text, add_special_tokens=False).ids[:2048]], device=device)
    skips = {d: draft_skip(c, d) for d in DRAFTS if d != "none" and (d != "component" or c.family != "qwen2")}
    L0 = sum(map(len, prompts)) // len(prompts)
    contexts = (L0, max(2 * L0, min(8192, c.max_position_embeddings // 2)))
    times = {L: step_times(model, skips, ks, L) for L in contexts}
    plain = [generate(model, p, max_new_tokens, draft="none")[1] for p in prompts]
    plain_rate = sum(s["new_tokens"] for s in plain) / sum(s["decode_s"] for s in plain)
    result = {"prompts": len(prompts), "contexts": contexts, "step_seconds": times, "drafts": {}}
    for draft, skip in skips.items():
        accepted, sums = {"shared": [], "independent": []}, 0
        for p in prompts:
            cache = models.Cache(model, len(p) + max(ks) + 1)
            prefill(model, cache, p[:-1])
            for variant, ns in accepted.items():
                ns.append(single_round(model, cache, p, skip, max(ks), variant == "independent"))
            sums = sums + compare(model, torch.tensor([p], device=device), skip)
        tvd, top1, kl = (sums[:3] / sum(map(len, prompts))).tolist()
        result["perplexity_full"], ppl = (compare(model, text_ids, skip)[3:] / (len(text_ids[0]) - 1)).exp().tolist()
        d = result["drafts"][draft] = {"tvd": tvd, "top1_agreement": top1, "kl": kl, "perplexity": ppl,
                                       "perplexity_ratio": ppl / result["perplexity_full"], "k": {},
                                       "c": times[contexts[0]][draft] / times[contexts[0]]["full"]}
        for k in ks:     # drafts are greedy and verify is causal: a round of k drafts is a prefix of one of max(ks)
            row = d["k"][k] = {}
            for variant, ns in accepted.items():
                row[f"alpha_{variant}"] = sum(min(n, k) / k for n in ns) / len(ns)
                row[f"ci_{variant}"] = bootstrap_ci([min(n, k) / k for n in ns])
                row[f"histogram_{variant}"] = [sum(min(n, k) == a for n in ns) for a in range(k + 1)]
            runs = [generate(model, p, max_new_tokens, draft=draft, k=k)[1] for p in prompts]
            total = {x: sum(s[x] for s in runs) for x in ("accepted", "drafted", "rounds", "decode_s", "new_tokens")}
            row["alpha_multi"] = total["accepted"] / max(1, total["drafted"])
            row["accepted_per_round"] = a = total["accepted"] / max(1, total["rounds"])
            row["v"] = times[contexts[0]][k] / times[contexts[0]]["full"]
            row["predicted_speedup"] = (1 + a) / (k * d["c"] + row["v"])
            row["measured_speedup"] = total["new_tokens"] / total["decode_s"] / plain_rate        # tokens/s ratio
            row["break_even_context"] = break_even(times, draft, k, a, c.max_position_embeddings)
    return result

def eval_table(name, r):
    yield (f"{name}: {r['prompts']} prompts, full-model perplexity {r['perplexity_full']:.2f}; c and v at "
           f"{r['contexts'][0]} tokens, break-even from step times at {r['contexts'][0]} and {r['contexts'][1]}")
    yield ("draft        k   alpha shared [95% CI]  alpha indep. [95% CI]  multi acc/rnd     c     v predicted measured"
           "  break-even")
    for draft, d in r["drafts"].items():
        for k, row in d["k"].items():
            a = [f"{row['alpha_' + v]:.3f} [{row['ci_' + v][0]:.3f}, {row['ci_' + v][1]:.3f}]"
                 for v in ("shared", "independent")]
            yield (f"{draft:11} {k:>2} {a[0]:>23} {a[1]:>22} {row['alpha_multi']:6.3f} {row['accepted_per_round']:7.2f} "
                   f"{d['c']:5.2f} {row['v']:5.2f} {row['predicted_speedup']:8.2f}x {row['measured_speedup']:7.2f}x "
                   f"{row['break_even_context'] or '-':>11}")
        hist = ", ".join(f"k={k} {x['histogram_shared']} / {x['histogram_independent']}" for k, x in d["k"].items())
        yield (f"{'':14} TVD {d['tvd']:.3f}, top-1 agreement {d['top1_agreement']:.3f}, KL {d['kl']:.3f}, perplexity "
               f"{d['perplexity']:.2f} ({d['perplexity_ratio']:.2f}x); accepted 0..k, shared / independent: {hist}")


# --- Command line ------------------------------------------------------------------------------------------------
def show(tokenizer, ids):
    """Token ids as quoted text, whitespace and control characters visible."""
    return json.dumps(tokenizer.decode(ids), ensure_ascii=False)

def trace_lines(rounds, tokenizer, color):
    """Every round: the drafts (accepted +, rejected -), then the full model's next token."""
    paint = (lambda code, s: f"\033[{code}m{s}\033[0m") if color else (lambda code, s: s)
    for i, (drafts, n, next_token) in enumerate(rounds, 1):
        marked = [paint("32", "+" + show(tokenizer, [t])) if j < n else paint("31", "-" + show(tokenizer, [t]))
                  for j, t in enumerate(drafts)]
        yield (f"round {i:3d}  accepted {n}/{len(drafts)}  {' '.join(marked)}  -> "
               f"{'bonus' if n == len(drafts) else 'correction'} {paint('36', show(tokenizer, [next_token]))}")

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
    prompt = tokenizer.encode(args.prompt).ids
    check_request(model, prompt, args.max_new_tokens, args.k)
    print(f"model   {args.model} ({model.config.num_layers} layers, {args.dtype} on {args.device}), "
          f"draft {args.draft}, k={args.k}: skips {draft_skip(model.config, args.draft)}")
    generate(model, prompt, 2, draft=args.draft, k=args.k)              # warm up: time what decoding costs
    tokens, s = generate(model, prompt, args.max_new_tokens, draft=args.draft, k=args.k)
    rounds = s.pop("trace")
    print(f"prompt  {show(tokenizer, prompt)}\noutput  {show(tokenizer, tokens)}")
    if args.trace:
        print(*trace_lines(rounds, tokenizer, color=sys.stdout.isatty()), sep="\n")
    if rounds:
        print(f"alpha   {s['alpha']:.3f}: {s['accepted']} of {s['drafted']} drafts accepted, "
              f"{s['accepted_per_round']:.2f} per round over {s['rounds']} rounds {s['accepted_histogram']}; time: "
              f"draft {s['draft_s']:.2f} s, verify {s['verify_s']:.2f} s, accept and commit {s['bookkeeping_s']:.3f} s")
    print(f"speed   {s['new_tokens']} tokens in {s['decode_s']:.2f} s: {s['tokens_per_s']:.2f} tokens/s "
          f"(prefill of {len(prompt)} tokens {s['prefill_s']:.2f} s)")
    if args.check:
        plain, plain_stats = generate(model, prompt, args.max_new_tokens, draft="none")
        s["identical_to_greedy"], s["speedup_vs_greedy"] = plain == tokens, plain_stats["decode_s"] / s["decode_s"]
        print(f"check   identical to plain greedy decoding: speedup {s['speedup_vs_greedy']:.2f}x" if plain == tokens
              else f"check   FAILED: tokens differ from greedy at {first_difference(model, prompt, tokens, plain)}")
    return s

def main(argv=None):
    p = argparse.ArgumentParser(description="Greedy self-speculative decoding in hybrid language models.")
    p.error = lambda message: p.exit(2, f"hsd: error: {message} (see --help)\n")     # one line, no usage text
    p.add_argument("--model", required=True, help=f"{', '.join([*models.OFFICIAL, *models.TINY])}, repo id or folder")
    p.add_argument("--draft", default="component", choices=DRAFTS, help="draft strategy (default: component)")
    p.add_argument("-k", type=int, default=2, help="drafted tokens per round (default: 2)")
    p.add_argument("--prompt", default="The Eiffel Tower is a wrought-iron lattice tower in Paris. It was built")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--trace", action="store_true", help="show every round: drafts, accepted, the next token")
    p.add_argument("--check", action="store_true", help="decode plainly too; fail if tokens differ; print the speedup")
    p.add_argument("--json", action="store_true", help="the statistics as one JSON object on the last line")
    p.add_argument("--eval", action="store_true", help="measure acceptance, divergence, perplexity and costs (README)")
    p.add_argument("--text", help="--eval: a UTF-8 text file (default: WikiText-2 validation; tiny-*: a built-in text)")
    p.add_argument("--prompts", type=int, default=200, help="--eval: number of prompts (default: 200)")
    args = p.parse_args(argv)
    try:
        if args.device == "cuda" and not torch.cuda.is_available():
            raise models.UsageError("CUDA is not available on this machine: use --device cpu")
        model, tokenizer = models.load(args.model, getattr(torch, args.dtype), args.device), models.load_tokenizer(args.model)
        if args.eval:
            prompts, text = eval_text(args.text, args.model)
            if not prompts[:max(args.prompts, 0)]:
                raise models.UsageError("no prompts: give --prompts >= 1 and a text with lines over 100 characters")
            s = {**vars(args), **evaluate(model, tokenizer, prompts[:args.prompts], text, args.max_new_tokens)}
            print(*eval_table(args.model, s), sep="\n")
        else:
            s = run_generate(args, model, tokenizer)
    except models.UsageError as e:
        print(f"hsd: error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(s))
    return 1 if s.get("identical_to_greedy") is False else 0


if __name__ == "__main__":
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)     # output piped into `head` and the like: stop quietly
    sys.exit(main())

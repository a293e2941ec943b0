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

    python hsd.py --model falcon-h1-0.5b            (see README for the flags)
"""
import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass, field

import torch

import models

DRAFTS = ("component", "layerskip", "early-exit", "none")
DEFAULT_PROMPT = "The Eiffel Tower is a wrought-iron lattice tower on the Champ de Mars in Paris. It was"


class UsageError(ValueError):
    """A request that cannot be served as asked (bad k, unknown draft, empty prompt...): the message says why."""


# ----------------------------------------------------------------------------------------------------------
# Draft strategies: plain data saying which parts of the full model the draft leaves out

def draft_skip(config, draft):
    """The models.Skip for a draft strategy of the paper (see README, "Draft strategies")."""
    n = config.num_layers
    if draft == "component":
        if config.family == "falcon_h1":      # parallel hybrid: the attention branch of every layer adds nothing
            return models.Skip(attention=frozenset(range(n)))
        if config.family == "qwen3_5":        # sequential hybrid: the full-attention layers become identity
            return models.Skip(layers=frozenset(i for i, t in enumerate(config.layer_types) if t == "full_attention"))
        raise UsageError("a pure Transformer (qwen2) has no attention-free part to draft with: use --draft layerskip")
    if draft == "layerskip":                  # int(0.33 n) contiguous middle layers
        skipped = int(0.33 * n)
        start = n // 2 - skipped // 2
        return models.Skip(layers=frozenset(range(start, start + skipped)))
    if draft == "early-exit":                 # the first int(0.5 n) layers, then the final norm and LM head
        return models.Skip(layers=frozenset(range(int(0.5 * n), n)))
    if draft == "none":                       # the full model itself (as a draft it accepts everything)
        return models.Skip()
    raise UsageError(f"unknown draft {draft!r}: choose one of {', '.join(DRAFTS)}")


# ----------------------------------------------------------------------------------------------------------
# The state: snapshot, restore, commit

@dataclass
class Snapshot:
    length: int      # committed tokens; KV entries at positions >= length are scratch
    conv: list       # per layer: the conv window tensor (None for attention-only layers)
    ssm: list        # per layer: the recurrent state tensor


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
            window = state.conv.shape[-1]                                # K-1
            state.conv = state.recorded.conv_inputs[:, :, n:n + window]
            state.ssm = state.recorded.states[n - 1]
            state.recorded = None


# ----------------------------------------------------------------------------------------------------------
# One round of speculation

def draft_tokens(model, cache, pending, skip, k):
    """k greedy tokens from the draft model (the full model without `skip`), continuing from the cache.

    Feeds pending, d1, ..., d(k-1): k steps; dk is never fed (the verify pass does that). Advances the cache:
    call restore() afterwards."""
    drafts, token = [], pending
    for _ in range(k):
        logits = model(torch.tensor([[token]], device=cache.device), cache, skip=skip)
        token = int(logits[0, -1].argmax())
        drafts.append(token)
    return drafts


def verify(model, cache, pending, drafts):
    """One full-model pass over [pending, d1..dk] -> logits (k+1, V): row i is the full model's prediction for the
    token after position i, so rows 0..k-1 judge d1..dk and row k is the bonus. Records every position's state."""
    ids = torch.tensor([[pending, *drafts]], device=cache.device)
    return model(ids, cache, record_states=True)[0]


def accept(drafts, logits):
    """(n, next_token): n = the longest prefix of drafts equal to the full model's greedy choices; next_token = the
    full model's own choice after it (the correction if n < k, the bonus if all k were accepted)."""
    choices = logits.argmax(dim=-1).tolist()
    n = 0
    while n < len(drafts) and drafts[n] == choices[n]:
        n += 1
    return n, choices[n]


def speculative_round(model, cache, pending, skip, k, stats):
    """One round (module docstring). Returns the new committed tokens: the accepted drafts and the next token;
    the last of them is the new pending token."""
    t0 = clock(cache.device)
    snap = snapshot(cache)                                   # 1
    drafts = draft_tokens(model, cache, pending, skip, k)    # 2
    t1 = clock(cache.device)
    restore(cache, snap)                                     # 3
    t2 = clock(cache.device)
    logits = verify(model, cache, pending, drafts)           # 4
    t3 = clock(cache.device)
    n, next_token = accept(drafts, logits)                   # 5
    commit(cache, snap.length, n + 1)                        # 6: pending and the n accepted drafts are committed
    t4 = clock(cache.device)
    stats.add_round(drafts, n, next_token, draft_s=t1 - t0, verify_s=t3 - t2, bookkeeping_s=(t2 - t1) + (t4 - t3))
    return drafts[:n] + [next_token]


# ----------------------------------------------------------------------------------------------------------
# Generation

@dataclass
class Stats:
    k: int
    drafted: int = 0
    accepted: int = 0
    rounds: int = 0
    new_tokens: int = 0
    accepted_histogram: list = field(default_factory=list)   # [rounds that accepted 0, 1, ..., k drafts]
    prefill_s: float = 0.0
    decode_s: float = 0.0        # everything after prefill
    draft_s: float = 0.0
    verify_s: float = 0.0
    bookkeeping_s: float = 0.0   # snapshot, restore, accept, commit
    trace: list = field(default_factory=list)                # per round: (drafts, n accepted, next token)

    def add_round(self, drafts, n, next_token, draft_s, verify_s, bookkeeping_s):
        self.rounds, self.drafted, self.accepted = self.rounds + 1, self.drafted + len(drafts), self.accepted + n
        self.accepted_histogram += [0] * (self.k + 1 - len(self.accepted_histogram))
        self.accepted_histogram[n] += 1
        self.draft_s, self.verify_s, self.bookkeeping_s = (
            self.draft_s + draft_s, self.verify_s + verify_s, self.bookkeeping_s + bookkeeping_s)
        self.trace.append((drafts, n, next_token))

    @property
    def alpha(self):
        """Accepted drafts / drafted tokens over all rounds (README, "Acceptance")."""
        return self.accepted / self.drafted if self.drafted else float("nan")

    def summary(self):
        """The numbers as a dict (JSON-ready: undefined ratios are None)."""
        return {**{k: v for k, v in asdict(self).items() if k != "trace"},
                "alpha": self.accepted / self.drafted if self.drafted else None,
                "mean_accepted_per_round": self.accepted / self.rounds if self.rounds else None,
                "tokens_per_s": self.new_tokens / self.decode_s if self.decode_s else None}


def clock(device):
    """time.perf_counter(), after waiting for the GPU if there is one."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def prefill(model, cache, tokens):
    """Feed tokens with the full model (chunked scans), no logits needed."""
    if tokens:
        model.hidden_states(torch.tensor([tokens], device=cache.device), cache)


def greedy_step(model, cache, pending):
    """Plain decoding: feed the pending token, return the full model's next token."""
    return int(model(torch.tensor([[pending]], device=cache.device), cache)[0, -1].argmax())


def check_request(model, prompt, max_new_tokens, k):
    if not prompt:
        raise UsageError("the prompt is empty: give at least one token")
    if k < 1:
        raise UsageError(f"k must be at least 1 (got {k})")
    if max_new_tokens < 0:
        raise UsageError(f"max_new_tokens must be >= 0 (got {max_new_tokens})")
    if min(prompt) < 0 or max(prompt) >= model.config.vocab_size:
        raise UsageError(f"token ids must lie in 0..{model.config.vocab_size - 1}")
    if len(prompt) + max_new_tokens > model.config.max_position_embeddings:
        raise UsageError(f"prompt ({len(prompt)} tokens) + {max_new_tokens} new tokens exceed the model's context of "
                         f"{model.config.max_position_embeddings}: shorten the prompt or --max-new-tokens")


@torch.inference_mode()
def generate(model, prompt_ids, max_new_tokens, draft="component", k=2, eos_token_id=None):
    """Greedy decoding with self-speculation; the tokens equal plain greedy decoding's.

    prompt_ids: 1-D LongTensor or list of ints; draft: a name from DRAFTS ("none" = plain greedy decoding, the
    baseline) or a models.Skip; eos_token_id: defaults to the model's. Stops after max_new_tokens new tokens or
    after EOS (included). Returns (new token ids, Stats)."""
    prompt = prompt_ids.tolist() if torch.is_tensor(prompt_ids) else list(prompt_ids)
    check_request(model, prompt, max_new_tokens, k)
    skip = draft if isinstance(draft, models.Skip) else (None if draft == "none" else draft_skip(model.config, draft))
    eos = model.config.eos_token_id if eos_token_id is None else eos_token_id
    stats = Stats(k=k)
    cache = models.Cache(model, max_len=len(prompt) + max_new_tokens + k + 1)
    t0 = clock(cache.device)
    prefill(model, cache, prompt[:-1])
    t1 = clock(cache.device)
    tokens, pending = [], prompt[-1]
    while len(tokens) < max_new_tokens and eos not in tokens:
        k_round = min(k, max_new_tokens - len(tokens) - 1)       # never draft past the last token asked for
        if skip is None or k_round == 0:
            new = [greedy_step(model, cache, pending)]
        else:
            new = speculative_round(model, cache, pending, skip, k_round, stats)
        if eos in new:
            new = new[:new.index(eos) + 1]
        tokens += new
        pending = tokens[-1]
    stats.prefill_s, stats.decode_s, stats.new_tokens = t1 - t0, clock(cache.device) - t1, len(tokens)
    return tokens, stats


# ----------------------------------------------------------------------------------------------------------
# Command line

def show(tokenizer, ids):
    """Token ids as quoted text, whitespace visible."""
    return json.dumps(tokenizer.decode(ids), ensure_ascii=False)


def trace_lines(stats, tokenizer, color):
    """Every round: the drafts (accepted ones marked +, rejected -), then the full model's next token."""
    paint = (lambda code, s: f"\033[{code}m{s}\033[0m") if color else (lambda code, s: s)
    for i, (drafts, n, next_token) in enumerate(stats.trace, 1):
        marked = [paint("32", "+" + show(tokenizer, [t])) if j < n else paint("31", "-" + show(tokenizer, [t]))
                  for j, t in enumerate(drafts)]
        kind = "bonus" if n == len(drafts) else "correction"
        yield f"round {i:3d}  accepted {n}/{len(drafts)}  {' '.join(marked)}  -> {kind} {paint('36', show(tokenizer, [next_token]))}"


def first_difference(model, prompt, spec, plain):
    """Where the speculative and the plain tokens part, and by what logit margin the full model decided there."""
    i = next((i for i, (a, b) in enumerate(zip(spec, plain)) if a != b), min(len(spec), len(plain)))
    if i == min(len(spec), len(plain)):
        return f"one stopped earlier: {len(spec)} speculative tokens, {len(plain)} greedy tokens"
    with torch.inference_mode():
        logits = model(torch.tensor([prompt + plain[:i]], device=model.lm_head.weight.device))[0, -1].float()
    margin = (logits[plain[i]] - logits[spec[i]]).item()
    return (f"new token {i}: speculative chose {spec[i]}, greedy chose {plain[i]}; the full model's logits for the two "
            f"differ by {margin:.3g} (logit std {logits.std().item():.3g})")


def run(args):
    if args.device == "cuda" and not torch.cuda.is_available():
        raise UsageError("CUDA is not available on this machine: use --device cpu")
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
    model = models.load(args.model, dtype=dtype, device=args.device)
    tokenizer = models.load_tokenizer(args.model)
    prompt = tokenizer.encode(args.prompt).ids
    check_request(model, prompt, args.max_new_tokens, args.k)
    c, skipped = model.config, describe(model.config, args.draft)
    print(f"model   {args.model}: {c.family}, {c.num_layers} layers, {args.dtype} on {args.device}")
    print(f"draft   {args.draft}, k={args.k}: skips {skipped}")
    if args.check:                                                      # warm up, so neither run pays for it
        generate(model, prompt, 2, draft=args.draft, k=args.k)
    tokens, stats = generate(model, prompt, args.max_new_tokens, draft=args.draft, k=args.k)
    print(f"prompt  {show(tokenizer, prompt)}\noutput  {show(tokenizer, tokens)}")
    if args.trace:
        print(*trace_lines(stats, tokenizer, color=sys.stdout.isatty()), sep="\n")
    s = stats.summary()
    if args.draft != "none":
        print(f"alpha   {s['alpha']:.3f}: {stats.accepted} of {stats.drafted} drafts accepted, "
              f"{s['mean_accepted_per_round']:.2f} per round over {stats.rounds} rounds, histogram {stats.accepted_histogram}")
    print(f"speed   {stats.new_tokens} tokens in {stats.decode_s:.2f} s: {s['tokens_per_s']:.2f} tokens/s "
          f"(prefill {len(prompt)} tokens {stats.prefill_s:.2f} s)")
    if stats.rounds:
        print(f"time    draft {stats.draft_s:.2f} s, verify {stats.verify_s:.2f} s, "
              f"snapshot/restore/accept/commit {stats.bookkeeping_s:.3f} s")
    status = 0
    if args.check:
        plain, plain_stats = generate(model, prompt, args.max_new_tokens, draft="none")
        s["speedup_vs_greedy"] = plain_stats.decode_s / stats.decode_s
        if plain == tokens:
            print(f"check   identical to plain greedy decoding ({len(plain)} tokens); greedy {plain_stats.decode_s:.2f} s, "
                  f"speculative {stats.decode_s:.2f} s: speedup {s['speedup_vs_greedy']:.2f}x")
        else:
            status = 1
            why = ("in bfloat16 a (k+1)-token verify pass and single-token steps round differently, so a near-tie can "
                   "flip; --dtype float32 checks exactly" if dtype == torch.bfloat16 else "in float32 this is a bug")
            print(f"check   FAILED: speculative tokens differ from plain greedy decoding at "
                  f"{first_difference(model, prompt, tokens, plain)}. {why}")
        s["identical_to_greedy"] = plain == tokens
    if args.json:
        print(json.dumps(s))
    return status


def describe(config, draft):
    skip = draft_skip(config, draft)
    if skip.attention:
        return f"the attention branch in {len(skip.attention)} of {config.num_layers} layers"
    return f"layers {sorted(skip.layers)}" if skip.layers else "nothing"


def parse_args(argv):
    p = argparse.ArgumentParser(description="Greedy self-speculative decoding in hybrid language models.")
    p.add_argument("--model", required=True,
                   help=f"{', '.join([*models.OFFICIAL, *models.TINY])}, a Hugging Face repo id or a local directory")
    p.add_argument("--draft", default="component", choices=DRAFTS, help="draft strategy (default: component)")
    p.add_argument("-k", type=int, default=2, help="drafted tokens per round (default: 2)")
    p.add_argument("--prompt", default=DEFAULT_PROMPT)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--trace", action="store_true", help="show every round: drafts, accepted, the next token")
    p.add_argument("--check", action="store_true", help="also decode plainly; fail if the tokens differ; print the speedup")
    p.add_argument("--json", action="store_true", help="the statistics as one JSON object on the last line")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    try:
        return run(args)
    except (UsageError, models.LoadError) as e:
        print(f"hsd: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

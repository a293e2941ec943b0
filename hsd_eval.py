"""hsd_eval: the paper's measurements: python hsd_eval.py --model NAME [--out FILE --plot FILE.svg] (RESULTS.md).

The run goes through five phases, in this order; every prompt's result is a record that `--out FILE` appends to a
JSON-lines file as soon as it exists, so that an interrupted run resumes where it stopped:
  costs       step times of a full decoding step, a draft step and verify passes (the cost model's c and v), and
              from them an estimate of how long the whole run takes on this machine
  alpha       the paper's single-round protocol on every prompt: k drafts right after the prompt, how many the full
              model accepts; greedy and at a temperature (speculative sampling); the draft starting from the full
              model's state (shared, as hsd.generate does) or from its own (independent, as the paper's code did)
  divergence  total variation, top-1 agreement and KL between the full model's and the draft's next-token distributions
  perplexity  of the full model and of each draft on 2048 tokens of text
  speed       multi-round generation on a few prompts: acceptance over whole generations, and the measured speedup
`--recall` asks the paper's question on recall instead (recall): bits per character and single-round acceptance of
each draft on the text and on copy prompts, a passage given again after itself (toys/README.md, "The paper, in
miniature"). The inputs are built exactly as the authors' code built them (paper_inputs; RESULTS.md, "The paper's
inputs"). This module uses hsd's pieces of a round (snapshot, draft, restore, verify, judge) and the cost model
(cost_model.py: the timing of c and v, the predicted speedup, break-even, the bootstrap, the texts); no tool imports
it.
"""
import argparse
import contextlib
import hashlib
import json
import math
import os
import signal
import sys

try:
    import torch
    from huggingface_hub.utils import tqdm

    import cli
    import cost_model
    import drafts
    import hsd
    import models
except KeyboardInterrupt:                     # Ctrl-C while torch loads (a second or more): one line, as later on
    if __name__ != "__main__":
        raise
    print("\nhsd_eval: interrupted", file=sys.stderr)
    sys.exit(130)

KS = (2, 4, 8)                  # the paper's draft lengths
SHORT_RUNS = 2 * (max(KS) + 1)  # multi-round runs of fewer new tokens than this hold too few rounds of k drafts
TEMPERATURE, SEED = 0.6, 0      # the sampled column's temperature, and the seed, unless --temperature / --seed say

# The trained toys are measured beside the paper's numbers for the model of their family.
PAPER_MODEL = {"toy-falcon-h1": "falcon-h1-0.5b", "toy-qwen3.5": "qwen3.5-0.8b", "toy-qwen2.5": "qwen2.5-0.5b"}


def paper_model(name):
    """The model whose paper numbers a measurement of `name` stands beside (itself, or a toy's family's), or None."""
    name = PAPER_MODEL.get(name, name)
    return name if name in cost_model.PAPER else None


# --- The inputs: the authors' text handling, exactly -------------------------------------------------------------
def paper_inputs(lines, tokenizer, max_len, prompts=200, speed_prompts=10):
    """The token ids of every protocol, as the authors' code made them. Every line is stripped first (WikiText's
    lines start with a space and end with " "); lengths are those of stripped lines; encode() adds the special tokens
    of the tokenizer's post-processor (a BOS where tokenizer.json asks for one), as a transformers tokenizer call does
    (transformers 5.23 reads them from tokenizer.json and ignores tokenizer_config.json's add_bos_token there).
      alpha:      lines longer than 100 characters, the first `prompts`, each cut to min(512, max_len - 8 - 10) tokens
      divergence: lines longer than 200 characters, the first 50, each cut to 128 tokens
      perplexity: the non-empty lines joined by newlines until the text exceeds 50,000 characters, encoded without
                  special tokens, the first 2048 tokens
      speed:      lines longer than 50 characters, the first `speed_prompts`, each cut to 256 tokens"""
    lines = [line.strip() for line in lines]
    text = ""
    for line in (line for line in lines if line):
        text = text + "\n" + line if text else line
        if len(text) > 50_000:
            break
    return {
        "alpha": [tokenizer.encode(x).ids[:min(512, max_len - max(KS) - 10)] for x in lines if len(x) > 100][:prompts],
        "divergence": [tokenizer.encode(x).ids[:128] for x in lines if len(x) > 200][:50],
        "perplexity": [tokenizer.encode(text, add_special_tokens=False).ids[:2048]],           # one text
        "speed": [tokenizer.encode(x).ids[:256] for x in lines if len(x) > 50][:speed_prompts],
    }


def file_sha256(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


# --- The measurements ----------------------------------------------------------------------------------------------
def single_round(model, cache, draft_cache, pending, skip, k, temperature=0.0, generator=None):
    """Drafts accepted in one round of k (the paper's protocol): hsd's steps 1-5 without the commit. cache: the full
    model's state after the prompt but its last token, `pending`. draft_cache: the state the draft starts from, cache
    itself (shared) or the draft model's own prefill of the same tokens (independent). Both are left as they were."""
    snap, draft_snap = hsd.snapshot(cache), hsd.snapshot(draft_cache)
    drafts, q = hsd.draft(model, draft_cache, pending, skip, k, temperature, generator)
    hsd.restore(draft_cache, draft_snap)
    hsd.restore(cache, snap)                                   # the same cache when shared
    logits, _ = hsd.verify(model, cache, pending, drafts)
    accepted, _ = hsd.judge(drafts, q, logits, temperature, generator)
    hsd.restore(cache, snap)                                   # no commit: the next prompt starts afresh
    return accepted


def divergence(model, ids, skips, chunk=256):
    """Sums over every position of ids (1, T) but the last, p the full model's next-token distribution and q a
    draft's: total variation 1/2 sum|p - q|, top-1 agreement, and KL(p || q) with the authors' 1e-10 inside both logs.
    Returns {draft: {"tvd", "top1", "kl", "positions"}}."""
    h = model.hidden_states(ids)[0, :-1]                                                       # (T-1, D)
    sums = {}
    for draft, skip in skips.items():
        h_draft = model.hidden_states(ids, skip=skip)[0, :-1]
        tvd = top1 = kl = 0.0
        for i in range(0, len(h), chunk):               # logits a chunk of positions at a time: the vocabulary is large
            p = torch.softmax(model.logits(h[i:i + chunk]).double(), dim=-1)                    # (chunk, V)
            q = torch.softmax(model.logits(h_draft[i:i + chunk]).double(), dim=-1)
            tvd += 0.5 * (p - q).abs().sum().item()
            top1 += (p.argmax(-1) == q.argmax(-1)).sum().item()
            kl += (p * ((p + 1e-10).log() - (q + 1e-10).log())).sum().item()
        sums[draft] = {"tvd": tvd, "top1": top1, "kl": kl, "positions": len(h)}
    return sums


def nll(model, ids, skip=None, chunk=256):
    """The summed negative log-likelihood of ids[0, 1:] under the model (or the draft, given a skip): one pass."""
    h = model.hidden_states(ids, skip=skip)[0, :-1]                                              # (T-1, D)
    total = 0.0
    for i in range(0, len(h), chunk):
        logp = torch.log_softmax(model.logits(h[i:i + chunk]).double(), dim=-1)
        total -= logp.gather(1, ids[0, i + 1:i + 1 + chunk, None]).sum().item()
    return total


def continuation_record(model, prompt, rest, skips):
    """The full model ("full") and each draft on a prompt's known continuation, one pass each over prompt + rest (lists
    of token ids): "nll", the summed negative log-likelihood of rest's tokens; "matched", how many of them come before
    the first that is not the most likely next token (what greedy decoding reproduces of rest: hsd_train.copying's
    measure)."""
    ids = torch.tensor([prompt + rest], device=model.lm_head.weight.device)                      # (1, T)
    wanted = ids[0, len(prompt):]                                                                # (len(rest),)
    result = {}
    for draft, skip in {"full": None, **skips}.items():
        h = model.hidden_states(ids, skip=skip)[0, len(prompt) - 1:-1]                           # (len(rest), D)
        logp = torch.log_softmax(model.logits(h).double(), dim=-1)                               # (len(rest), V)
        wrong = (logp.argmax(-1) != wanted).nonzero()
        result[draft] = {"nll": -logp.gather(1, wanted[:, None]).sum().item(),
                         "matched": wrong[0, 0].item() if len(wrong) else len(rest)}
    return result


def step_times(model, skips, ks, context, repeats=7):
    """Seconds at a context, from the cost model's harness (cost_model.measure_costs, greedy, `repeats` turns): a full
    decoding step ("full"), a draft step (by name), a verify pass (by k, k drafts), a round's own work ("round",
    cost_model's r); and, for the run's estimate only,
    the logits of one position ("logits") and the prefill of the context ("prefill", once)."""
    costs = cost_model.measure_costs(model, skips, context, repeats, max(ks), passes=hsd.PASSES)
    cache = models.Cache(model, context)
    t0 = cost_model.clock(cache.device)
    hsd.prefill(model, cache, [i % model.config.vocab_size for i in range(1, context + 1)])
    prefill_s = cost_model.clock(cache.device) - t0
    rows = torch.zeros(64, model.config.hidden_size, device=cache.device, dtype=model.lm_head.weight.dtype)
    t0 = cost_model.clock(cache.device)
    model.logits(rows)
    logits_s = (cost_model.clock(cache.device) - t0) / len(rows)
    return {"full": costs.step_s, **{draft: costs.c[draft] * costs.step_s for draft in skips},
            **{k: costs.v[k] * costs.step_s for k in ks}, "round": costs.r * costs.step_s, "logits": logits_s,
            "prefill": prefill_s}


# --- A run that survives interruption: its records, saved as they come ---------------------------------------------
class Records:
    """The run's results, one record per prompt and phase, by (phase, index). With a path, each record is appended to
    that JSON-lines file and flushed as soon as it exists, after a header naming everything that changes a number; a
    rerun with the same header resumes (what is saved is not measured again), one with another header is refused."""

    def __init__(self, path, header):
        self.path, self.saved, self.resumed = path, {}, False
        lines, complete = self.read() if path and os.path.exists(path) else ([], 0)
        if lines:
            saved_header = lines[0]["header"]
            if saved_header != header:
                different = [f"{key} {saved_header.get(key)!r} there, {header.get(key)!r} now"
                             for key in dict.fromkeys([*header, *saved_header])     # a key only one of them has too
                             if saved_header.get(key) != header.get(key)]
                raise models.UsageError(f"{path} holds another run ({'; '.join(different)}): give another --out "
                                        "file, or the options of that run to resume it")
            self.saved = {(r["phase"], r["index"]): r["result"] for r in lines[1:]}
            self.resumed = bool(self.saved)
            with open(path, "r+b") as f:              # a crash can leave half a line at the end: cut it off
                f.truncate(complete)
        elif path:                                   # a new file, or one cut off before its header was complete
            try:
                open(path, "w").close()
            except OSError as e:
                raise models.UsageError(f"cannot write --out {path}: {e.strerror}") from None
            self.write({"header": header})

    def read(self):
        """The complete lines of the file at self.path, checked to be a header and records, and their length in
        bytes (all but a half line a crash can leave at the end)."""
        with open(self.path, "rb") as f:
            data = f.read()
        complete = data.rfind(b"\n") + 1
        try:
            lines = [json.loads(line) for line in data[:complete].decode().splitlines()]
            if not lines and data and not data.startswith(b'{"header"'):
                raise ValueError("neither empty nor the start of a header")
            if lines and not (isinstance(lines[0], dict) and isinstance(lines[0].get("header"), dict)
                              and all({"phase", "index", "result"} <= r.keys() for r in lines[1:])):
                raise ValueError("not a header and records")
        except (ValueError, AttributeError):        # not UTF-8, not JSON, or JSON of another shape
            raise models.UsageError(f"{self.path} is not a results file of hsd_eval: give another --out file") from None
        return lines, complete

    def write(self, line):
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(line) + "\n")
            f.flush()

    def add(self, phase, index, result):
        self.saved[phase, index] = result
        if self.path:
            self.write({"phase": phase, "index": index, "result": result})

    def missing(self, phase, count):
        """The indices of a phase's first `count` items that have no record yet."""
        return [i for i in range(count) if (phase, i) not in self.saved]


# --- The run, phase by phase ---------------------------------------------------------------------------------------
def text_round(model, prompt, chosen, temperature=0.0, seed=None):
    """The single-round protocol for a draft from the text (a drafts.Draft: the lookup, or a cascade): the first step
    of a generation after the prompt, with k = max(KS) -> (drafts proposed, how many the full model accepts); (0, 0)
    where the text proposes nothing (the step is a plain step). The lookup has no state of its own: shared only."""
    steps = hsd.generate_steps(model, prompt, max(KS) + 1, chosen, max(KS), None, temperature, seed)
    next(steps)                                                                # the prefill
    step = next(steps)
    return len(step.drafts), step.accepted


def alpha_record(model, prompt, skips, temperature, generator, text=None):
    """One prompt of the single-round protocol: per draft, how many of max(KS) drafts the full model accepts, greedy
    and sampled, with the draft starting from the full model's state (shared) or from its own (independent); per
    draft from the text ({name: drafts.Draft}), its first round's (text_round): drafts proposed and accepted."""
    k = max(KS)
    cache = models.Cache(model, len(prompt) + k + 1)
    hsd.prefill(model, cache, prompt[:-1])
    result = {}
    for draft, skip in skips.items():
        own = models.Cache(model, len(prompt) + k + 1)
        hsd.prefill(model, own, prompt[:-1], skip)
        result[draft] = {
            "shared": single_round(model, cache, cache, prompt[-1], skip, k),
            "independent": single_round(model, cache, own, prompt[-1], skip, k),
            "sampled_shared": single_round(model, cache, cache, prompt[-1], skip, k, temperature, generator),
            "sampled_independent": single_round(model, cache, own, prompt[-1], skip, k, temperature, generator)}
    for name, chosen in (text or {}).items():
        seed = int(torch.randint(2 ** 31, (), generator=generator))        # the prompt's generator seeds the round
        (drafted, shared), (sampled_drafted, sampled) = (text_round(model, prompt, chosen),
                                                         text_round(model, prompt, chosen, temperature, seed))
        result[name] = {"drafted": drafted, "shared": shared, "sampled_drafted": sampled_drafted,
                        "sampled_shared": sampled}
    return result


def perplexity_record(model, ids, skips):
    """The summed negative log-likelihood of the text under the full model and each draft."""
    return {draft: nll(model, ids, skip) for draft, skip in {"full": None, **skips}.items()}


def speed_record(model, prompt, skips, new_tokens, files=None, text=None):
    """Plain greedy decoding and every draft at every k on one prompt, each draft file ({path: drafts.Draft}) also at
    its own k and stop ("found"), and each draft from the text ({name: drafts.Draft}) at every k and at its own:
    tokens, time and acceptance of each run."""
    plain = hsd.generate(model, prompt, new_tokens, draft="none")[1]
    result = {"plain": {"new_tokens": plain["new_tokens"], "decode_s": plain["decode_s"]}}
    keys = ("accepted", "drafted", "rounds", "decode_s", "new_tokens")
    for draft, skip in skips.items():
        result[draft] = {}
        for k in KS:
            s = hsd.generate(model, prompt, new_tokens, draft=skip, k=k)[1]
            result[draft][str(k)] = {x: s[x] for x in keys}
    for path, found in (files or {}).items():
        s = hsd.generate(model, prompt, new_tokens, draft=found)[1]
        result[path]["found"] = {x: s[x] for x in keys}
    for name, chosen in (text or {}).items():
        result[name] = {str(k): hsd.generate(model, prompt, new_tokens, draft=chosen, k=k)[1] for k in KS}
        result[name]["found"] = hsd.generate(model, prompt, new_tokens, draft=chosen)[1]
        result[name] = {key: {x: s[x] for x in keys} for key, s in result[name].items()}
    return result


def estimate_seconds(t, inputs, skips, new_tokens, accepted_per_round, text=0):
    """How long each phase takes, from the step times t (step_times) at a context of t["context"] tokens: a pass over
    some tokens costs as many prefill tokens' time (and as many rows of logits where they are needed), a round of k
    drafts k draft steps and a verify pass, a generation new_tokens / (1 + a) rounds. accepted_per_round(draft, k) ->
    a. text: how many drafts from the text run beside, each of whose runs is counted as long as plain decoding's (at
    most, where nothing is accepted and the lookup costs nothing)."""
    per_token = t["prefill"] / t["context"]
    all_passes = 1 + sum(t[draft] / t["full"] for draft in skips)   # a pass of the full model, and one of every draft
    k = max(KS)
    alpha = sum(per_token * len(prompt) * all_passes + 4 * sum(k * t[draft] + t[k] for draft in skips)
                for prompt in inputs["alpha"])
    passes = sum(len(ids) * (per_token * all_passes + t["logits"] * (1 + len(skips)))
                 for ids in inputs["divergence"] + inputs["perplexity"])
    alpha += sum(2 * text * (per_token * len(prompt) + t[k]) for prompt in inputs["alpha"])
    speed = 0.0
    for prompt in inputs["speed"]:
        speed += (1 + text * (len(KS) + 1)) * (per_token * len(prompt) + new_tokens * t["full"])
        for draft in skips:
            for k in KS:
                speed += (per_token * len(prompt)
                          + new_tokens / (1 + accepted_per_round(draft, k)) * cost_model.round_cost(k, t[draft], t,
                                                                                                     t["round"]))
    return {"alpha": alpha, "divergence and perplexity": passes, "speed": speed}


def duration(seconds):
    if seconds > 5400:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 60:.0f} min" if seconds > 90 else f"{seconds:.0f} s"


def measure(model, model_name, inputs, skips, records, new_tokens, temperature, seed, files=None, text=None):
    """Every phase's records, measuring only what is not saved yet; first the step times, and from them the estimate."""
    config, device = model.config, model.lm_head.weight.device
    L0 = max(1, sum(map(len, inputs["alpha"])) // len(inputs["alpha"]))
    contexts = (L0, max(2 * L0, min(8192, config.max_position_embeddings // 2)))
    for L in tqdm([L for L in contexts if ("costs", L) not in records.saved], desc="step times", leave=False):
        records.add("costs", L, {str(key): seconds for key, seconds in step_times(model, skips, KS, L).items()})
    times = {L: {int(key) if key.isdigit() else key: seconds for key, seconds in records.saved["costs", L].items()}
             for L in contexts}                                   # step_times at each L, its k ints again

    paper = cost_model.PAPER.get(paper_model(model_name), {})
    unmeasured = {phase: [items[i] for i in records.missing(phase, len(items))] for phase, items in inputs.items()}

    def accepted_per_round(draft, k):                     # the paper's greedy alpha where it has one, else 0
        return k * paper.get(draft, {}).get("greedy", {}).get(k, (0.0,))[0]
    phase_s = estimate_seconds({**times[L0], "context": L0}, unmeasured, skips, new_tokens, accepted_per_round,
                               len(text or {}))
    print(f"hsd_eval: estimate {duration(sum(phase_s.values()))} on this machine ("
          + ", ".join(f"{phase} {duration(s)}" for phase, s in phase_s.items())
          + ("; the speed phase at the paper's acceptance, or at none accepted where the paper gives none" if paper
             else "; the speed phase as if no draft were accepted: at most")
          + ("; what is saved is not measured again)" if records.resumed else ")"),
          file=sys.stderr, flush=True)

    cost_model.warm_up(model, max(KS))
    phases = {
        "alpha": lambda i, prompt: alpha_record(model, prompt, skips, temperature,     # a generator per prompt
                                                torch.Generator().manual_seed(seed * 1_000_003 + i), text),
        "divergence": lambda i, ids: divergence(model, torch.tensor([ids], device=device), skips),
        "perplexity": lambda i, ids: perplexity_record(model, torch.tensor([ids], device=device), skips),
        "speed": lambda i, prompt: speed_record(model, prompt, skips, new_tokens, files, text)}
    with torch.inference_mode():
        for phase, run_one in phases.items():
            items = inputs[phase]
            todo = records.missing(phase, len(items))
            for i in tqdm(todo, desc=phase, total=len(items), initial=len(items) - len(todo)):
                records.add(phase, i, run_one(i, items[i]))
    return contexts, times


VARIANTS = ("shared", "independent", "sampled_shared", "sampled_independent")     # alpha_record's, per draft


def acceptance(alphas, draft):
    """Single-round acceptance of a draft over prompts, from alphas (alpha_record's records): for each k of KS (a round
    of k drafts is a prefix of a round of max(KS): its first k drafts, judged the same way) and each of VARIANTS, the
    mean share of k accepted, its 95% bootstrap interval over prompts and the histogram of 0..k accepted:
    {k: {"alpha_VARIANT": mean, "ci_VARIANT": [low, high], "histogram_VARIANT": [prompts]}}."""
    rows = {}
    for k in KS:
        row = rows[k] = {}
        for variant in VARIANTS:
            shares = [min(record[draft][variant], k) / k for record in alphas]
            row[f"alpha_{variant}"] = sum(shares) / len(shares)
            row[f"ci_{variant}"] = cost_model.bootstrap_ci(shares)
            row[f"histogram_{variant}"] = [sum(min(record[draft][variant], k) == accepted for record in alphas)
                                           for accepted in range(k + 1)]
    return rows


def text_draft_summary(chosen, name, alphas, speed, c, v, r, plain_rate):
    """A draft from the text's numbers (summarize's "text_drafts"): per k the single round's acceptance (greedy and
    sampled, with 95% intervals; a round that proposed nothing counts as none accepted) and the share of prompts on
    which the text proposed anything; the multi-round runs' acceptance and measured speedup; the cost model's
    prediction where c says what a draft costs (the lookup: 0, no model call drafts; a cascade: None). No divergence
    nor perplexity: the text has no distribution."""
    entry = {"c": c, "k": {}}
    for k in KS:              # a round of k drafts is a prefix of a round of max(KS), judged the same way
        row = entry["k"][k] = {}
        for variant, drafted in (("shared", "drafted"), ("sampled_shared", "sampled_drafted")):
            shares = [min(record[name][variant], k) / k for record in alphas]
            row[f"alpha_{variant}"] = sum(shares) / len(shares)
            row[f"ci_{variant}"] = cost_model.bootstrap_ci(shares)
            row[f"proposed_{variant}"] = sum(record[name][drafted] > 0 for record in alphas) / len(alphas)
        row.update(multi_round([record[name][str(k)] for record in speed], plain_rate))
        a = row["accepted_per_round"]
        row["v"] = v[k]
        row["predicted_speedup"] = (cost_model.predicted_speedup(1 + a, [k], c, {k: v[k]}, r)
                                    if a is not None and c is not None else None)
    entry["found"] = {"k": chosen.k, **multi_round([record[name]["found"] for record in speed], plain_rate)}
    return entry


def multi_round(runs, plain_rate):
    """Acceptance over whole generations (runs: speed_record's of one draft and k), and the measured speedup."""
    total = {x: sum(r[x] for r in runs) for x in ("accepted", "drafted", "rounds", "decode_s", "new_tokens")}
    return {"alpha_multi": total["accepted"] / total["drafted"] if total["drafted"] else None,
            "accepted_per_round": total["accepted"] / total["rounds"] if total["rounds"] else None,
            "measured_speedup": total["new_tokens"] / total["decode_s"] / plain_rate if runs else None}


def summarize(model, inputs, skips, records, contexts, times, temperature, files=None, text=None):
    """The measurements' result (RESULTS.md): per draft, divergence and perplexity, and per k the acceptance
    of the single-round protocol, the multi-round runs, the cost model; per draft from the text (text: {name:
    drafts.Draft}) text_draft_summary. The keys of earlier versions are all kept."""
    config = model.config
    alphas = [records.saved["alpha", i] for i in range(len(inputs["alpha"]))]
    texts = [records.saved["divergence", i] for i in range(len(inputs["divergence"]))]
    speed = [records.saved["speed", i] for i in range(len(inputs["speed"]))]
    ppl = records.saved["perplexity", 0]
    tokens = max(1, len(inputs["perplexity"][0]) - 1)
    plain_rate = None                                                  # tokens/s of plain greedy decoding
    if speed:
        plain_rate = (sum(record["plain"]["new_tokens"] for record in speed)
                      / sum(record["plain"]["decode_s"] for record in speed))
    result = {"prompts": len(alphas), "divergence_texts": len(texts), "perplexity_tokens": tokens + 1,
              "speed_prompts": len(speed), "temperature": temperature, "contexts": contexts, "step_seconds": times,
              "perplexity_full": math.exp(min(ppl["full"] / tokens, 20)), "drafts": {}, "draft_files": {}}
    for draft in skips:
        positions = sum(x[draft]["positions"] for x in texts)                 # 0 if no line is long enough
        perplexity = math.exp(min(ppl[draft] / tokens, 20))
        entry = result["drafts"][draft] = {
            "tvd": sum(x[draft]["tvd"] for x in texts) / positions if positions else None,
            "top1_agreement": sum(x[draft]["top1"] for x in texts) / positions if positions else None,
            "kl": sum(x[draft]["kl"] for x in texts) / positions if positions else None,
            "perplexity": perplexity, "perplexity_ratio": perplexity / result["perplexity_full"],
            "c": times[contexts[0]][draft] / times[contexts[0]]["full"], "k": {}}
        for k, row in acceptance(alphas, draft).items():
            entry["k"][k] = row
            runs = [record[draft][str(k)] for record in speed]
            total = {x: sum(r[x] for r in runs) for x in ("accepted", "drafted", "rounds", "decode_s", "new_tokens")}
            row["alpha_multi"] = total["accepted"] / total["drafted"] if total["drafted"] else None
            row["accepted_per_round"] = a = total["accepted"] / total["rounds"] if total["rounds"] else None
            row["v"] = times[contexts[0]][k] / times[contexts[0]]["full"]
            row["r"] = times[contexts[0]]["round"] / times[contexts[0]]["full"]
            row["predicted_speedup"] = (cost_model.predicted_speedup(1 + a, [k], entry["c"], {k: row["v"]}, row["r"])
                                        if a is not None else None)          # a round of k makes 1 + a tokens
            row["measured_speedup"] = (total["new_tokens"] / total["decode_s"] / plain_rate if total["drafted"]
                                       else None)                # nothing drafted: plain decoding against itself
            row["break_even_context"] = (cost_model.break_even(times, draft, k, a, config.max_position_embeddings)
                                         if a is not None else None)
    for path, found in (files or {}).items():          # a draft file's numbers under their own key
        entry = result["draft_files"][path] = result["drafts"].pop(path)
        runs = [record[path]["found"] for record in speed]
        total = {x: sum(r[x] for r in runs) for x in ("accepted", "drafted", "rounds", "decode_s", "new_tokens")}
        entry["found"] = {"k": found.k, "stop": found.stop,
                          "alpha_multi": total["accepted"] / total["drafted"] if total["drafted"] else None,
                          "accepted_per_round": total["accepted"] / total["rounds"] if total["rounds"] else None,
                          "measured_speedup": total["new_tokens"] / total["decode_s"] / plain_rate if runs else None}
    v = {k: times[contexts[0]][k] / times[contexts[0]]["full"] for k in KS}
    r = times[contexts[0]]["round"] / times[contexts[0]]["full"]
    result["text_drafts"] = {name: text_draft_summary(chosen, name, alphas, speed, 0.0 if chosen.skip is None else None,
                                                      v, r, plain_rate) for name, chosen in (text or {}).items()}
    return result


def run(args, model, tokenizer):
    """Measure (resuming from --out), print the table, draw --plot; returns the JSON object of --json."""
    if args.temperature is not None and not args.temperature > 0:     # NaN too
        raise models.UsageError("the sampled column needs a --temperature above 0 (the greedy column is always there)")
    temperature = TEMPERATURE if args.temperature is None else args.temperature
    seed = SEED if args.seed is None else args.seed
    lines = cost_model.read_lines(args.text, args.model)
    if args.recall:
        return recall(args, model, tokenizer, lines, temperature, seed)
    inputs = paper_inputs(lines, tokenizer, model.config.max_position_embeddings, max(args.prompts, 0),
                          max(args.speed_prompts, 0))
    if not inputs["alpha"]:
        raise models.UsageError("no prompts: give --prompts >= 1 and a text with lines over 100 characters")
    if inputs["speed"] and args.max_new_tokens < 1:
        raise models.UsageError("the multi-round runs need --max-new-tokens >= 1 (or --speed-prompts 0 to leave them out)")
    if len(inputs["perplexity"][0]) < 2:
        raise models.UsageError("the text is too short for perplexity: give a text of at least a few lines")
    skips, files, text = drafts.paper_skips(model.config), {}, {}
    for name in (entry for entry in args.draft or [] if drafts.split_lookup(entry)[0]):    # lookup, lookup+DRAFT
        text[name] = hsd.choose_draft(model, name)
    for path in (entry for entry in args.draft or [] if not drafts.split_lookup(entry)[0]):   # files beside those
        files[path], warned = drafts.read_draft_file(path, model)
        for line in warned:
            print(f"hsd_eval: warning: {line}", file=sys.stderr)
        skips[path] = files[path].skip
    header = {"model": args.model, "text_sha256": hashlib.sha256("\n".join(lines).encode()).hexdigest(),
              "prompts": len(inputs["alpha"]), "speed_prompts": len(inputs["speed"]),
              "max_new_tokens": args.max_new_tokens, "dtype": args.dtype, "device": args.device,
              "temperature": temperature, "seed": seed, "costs": "c, v and r (a round's own work)"}
    if files:                                                 # a resumed run must measure the same files
        header["draft_files"] = {path: file_sha256(path) for path in files}
    if text:                                                  # and the same drafts from the text
        header["text_drafts"] = list(text)
    for path, flag in ((args.plot, "--plot"), (args.out, "--out")):
        if path:
            cost_model.check_writable(path, flag)
    records = Records(args.out, header)
    machine = cost_model.machine_state(model, args.dtype)          # before measuring: the load of others, not ours
    busy = cost_model.busy_warning(machine)
    if busy:
        print(f"hsd_eval: warning: {busy}", file=sys.stderr)
    try:
        contexts, times = measure(model, args.model, inputs, skips, records, args.max_new_tokens, temperature, seed,
                                  files, text)
        result = {**vars(args), **summarize(model, inputs, skips, records, contexts, times, temperature, files, text),
                  "seed": seed, "paper": cost_model.PAPER.get(paper_model(args.model), {}),
                  "paper_model": paper_model(args.model), "machine": machine, "warnings": [busy] if busy else []}
    except KeyboardInterrupt:
        if not args.out:
            raise KeyboardInterrupt("nothing was saved (--out FILE keeps results as they come)") from None
        saved = ", ".join(f"{phase} {len(items) - len(records.missing(phase, len(items)))} of {len(items)}"
                          for phase, items in inputs.items())
        raise KeyboardInterrupt(f"saved in {args.out} ({saved}): run the same command again to resume") from None
    print(*eval_table(args.model, result), sep="\n")
    if args.plot:
        with open(args.plot, "w", encoding="utf-8") as f:
            f.write(plot_svg(args.model, result))
    return result


# --- The table and the figure ----------------------------------------------------------------------------------
def interval(row, variant):
    return f"{row['alpha_' + variant]:.3f} [{row['ci_' + variant][0]:.3f}, {row['ci_' + variant][1]:.3f}]"


def number(x, form, width, suffix=""):
    """x formatted (and suffix, e.g. "x"), right-aligned in width characters; "-" (aligned alike) where there is no
    value."""
    return f"{'-' if x is None else format(x, form) + suffix:>{width}}"


def break_even_words(context):
    """The break-even column: "any" (it pays at every context measured), "never" (not within the model's context)."""
    return "never" if context is None else "any" if context == 0 else str(context)


def eval_table(name, r):
    """The table of the measurements, as lines of text; draft files are named by their number (listed last)."""
    T = r["temperature"]
    files = {f"file {i + 1}": path for i, path in enumerate(r.get("draft_files", {}))}
    measured = {**r["drafts"], **{label: r["draft_files"][path] for label, path in files.items()}}
    yield (f"{name}: {r['prompts']} prompts (single round), {r['divergence_texts']} divergence texts, "
           f"perplexity on {r['perplexity_tokens']} tokens: full model {r['perplexity_full']:.2f}; {r['speed_prompts']} "
           f"speed prompts; c and v at {r['contexts'][0]} tokens, break-even from step times at {r['contexts'][0]} "
           f"and {r['contexts'][1]}")
    if r.get("paper_model") not in (None, name):
        yield f"(the paper's columns: its values for {r['paper_model']}, the model of this toy's family)"
    yield (f"draft        k   greedy shared [95% CI]   greedy indep. [95% CI]  T={T:<4} shared [95% CI]  T={T:<4} "
           "indep. [95% CI]  paper greedy  T=0.6")
    for draft, entry in measured.items():
        for k, row in entry["k"].items():
            paper = r["paper"].get(draft, {})
            greedy, sampled = paper.get("greedy", {}).get(k), paper.get("T=0.6", {}).get(k)
            yield (f"{draft:11} {k:>2} {interval(row, 'shared'):>24} {interval(row, 'independent'):>24} "
                   f"{interval(row, 'sampled_shared'):>24} {interval(row, 'sampled_independent'):>24} "
                   f"{number(greedy and greedy[0], '.4g', 13)} {number(sampled and sampled[0], '.4g', 6)}")
    yield (f"{'draft':11} {'k':>2} {'multi':>7} {'acc/rnd':>8} {'c':>6} {'v':>6} {'predicted':>10} {'measured':>9} "
           f"{'break-even':>11}")
    for draft, entry in measured.items():
        for k, row in entry["k"].items():
            yield (f"{draft:11} {k:>2} {number(row['alpha_multi'], '.3f', 7)} {number(row['accepted_per_round'], '.2f', 8)} "
                   f"{entry['c']:6.2f} {row['v']:6.2f} {number(row['predicted_speedup'], '.2f', 10, 'x')} "
                   f"{number(row['measured_speedup'], '.2f', 9, 'x')} {break_even_words(row['break_even_context']):>11}")
        if "found" in entry:
            f = entry["found"]
            yield (f"{draft:11} as found (k={f['k']}, stop {f['stop']}): multi {number(f['alpha_multi'], '.3f', 0)}, "
                   f"{number(f['accepted_per_round'], '.2f', 0)} per round, measured "
                   f"{number(f['measured_speedup'], '.2f', 0)}x")
        hist = ", ".join(f"k={k} {x['histogram_shared']} / {x['histogram_independent']}" for k, x in entry["k"].items())
        yield (f"{draft:11} TVD {number(entry['tvd'], '.3f', 0)}, top-1 agreement "
               f"{number(entry['top1_agreement'], '.3f', 0)}, KL {number(entry['kl'], '.3f', 0)}, perplexity "
               f"{entry['perplexity']:.2f} ({entry['perplexity_ratio']:.2f}x); greedy accepted 0..k, shared / "
               f"independent: {hist}")
    if r["speed_prompts"] and r["max_new_tokens"] < SHORT_RUNS:
        yield (f"note: the multi-round runs make {r['max_new_tokens']} new tokens each, so they drafted little or "
               "nothing (the last token of a run is never drafted): their acceptance and measured speedups say "
               f"little; give --max-new-tokens {SHORT_RUNS} or more (default: 64)")
    for draft, entry in r.get("text_drafts", {}).items():
        yield from text_draft_lines(draft, entry, T)
    for label, path in files.items():
        yield f"{label}: {path}"


def text_draft_lines(name, entry, T):
    """A draft from the text in the table: per k the single round (greedy and at T; the share of prompts on which the
    text proposed anything), the multi-round runs and the cost model; then its own k."""
    yield (f"{name} (a draft from the text: no divergence, no perplexity){'':4} k   greedy [95% CI]  proposed   "
           f"T={T:<4} [95% CI]  proposed   multi  acc/rnd  predicted  measured")
    for k, row in entry["k"].items():
        yield (f"{name:>{len(name) + 51}} {k:>2} {interval(row, 'shared'):>24} {row['proposed_shared']:8.0%} "
               f"{interval(row, 'sampled_shared'):>24} {row['proposed_sampled_shared']:8.0%} "
               f"{number(row['alpha_multi'], '.3f', 7)} {number(row['accepted_per_round'], '.2f', 8)} "
               f"{number(row['predicted_speedup'], '.2f', 10, 'x')} {number(row['measured_speedup'], '.2f', 9, 'x')}")
    f = entry["found"]
    yield (f"{name} at its own k={f['k']}: multi {number(f['alpha_multi'], '.3f', 0)}, "
           f"{number(f['accepted_per_round'], '.2f', 0)} per round, measured "
           f"{number(f['measured_speedup'], '.2f', 0)}x")


SERIES = [  # (label, where the value comes from, colour, filled)
    ("greedy, shared state", "shared", "#1f5fbf", True),
    ("greedy, independent state", "independent", "#1f5fbf", False),
    ("sampled, shared state", "sampled_shared", "#d9730d", True),
    ("sampled, independent state", "sampled_independent", "#d9730d", False),
    ("paper, greedy", "greedy", "#222222", True),
    ("paper, T=0.6", "T=0.6", "#888888", True),
]


def plot_svg(name, r):
    """Acceptance by k for each draft, with 95% intervals, and the paper's values where it has them: an SVG written
    by hand. Every point carries its numbers in a <title> (shown on hover, read by the tests)."""
    panel, top, bottom = 270, 60, 270                                        # a panel per draft; the y axis in pixels
    y = lambda alpha: bottom - alpha * (bottom - top)                       # acceptance 0..1, upwards
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{panel * len(r["drafts"]) + 50}" height="{bottom + 95}" '
           'font-family="sans-serif" font-size="11">',
           f'<text x="10" y="18" font-size="13">{name}: single-round acceptance by k, {r["prompts"]} prompts, '
           '95% bootstrap intervals</text>',
           f'<text x="10" y="34">sampled: at temperature {r["temperature"]}; ' + (
               f'paper: the values the paper reports for {r.get("paper_model") or "this model"} (greedy, and T=0.6)'
               if r["paper"] else
               'the paper reports no values for this model') + '</text>']
    out.append(f'<text transform="translate(12 {(top + bottom) / 2}) rotate(-90)" text-anchor="middle">'
               'acceptance (accepted / k)</text>')
    drawn = set()                                                     # the series with at least one point
    for p, (draft, entry) in enumerate(r["drafts"].items()):
        left = 40 + p * panel
        out.append(f'<text x="{left + 120}" y="{top - 8}" text-anchor="middle" font-weight="bold">{draft}</text>')
        out.append(f'<text x="{left + 120}" y="{bottom + 30}" text-anchor="middle">drafts per round</text>')
        for tick in (0, 0.25, 0.5, 0.75, 1):
            out.append(f'<line x1="{left}" x2="{left + 240}" y1="{y(tick)}" y2="{y(tick)}" stroke="#ddd"/>')
            out.append(f'<text x="{left - 4}" y="{y(tick) + 4}" text-anchor="end">{tick}</text>')
        out.append(f'<rect x="{left}" y="{top}" width="240" height="{bottom - top}" fill="none" stroke="#999"/>')
        for j, k in enumerate(KS):
            center = left + 45 + j * 75
            out.append(f'<text x="{center}" y="{bottom + 16}" text-anchor="middle">k={k}</text>')
            for s, (label, key, colour, filled) in enumerate(SERIES):
                if key in ("greedy", "T=0.6"):
                    value, ci = r["paper"].get(draft, {}).get(key, {}).get(k, (None, None))
                else:
                    value, ci = entry["k"][k]["alpha_" + key], entry["k"][k]["ci_" + key]
                if value is None:
                    continue
                x = center + (s - 2.5) * 8
                drawn.add(label)
                ci_text = f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else ""
                out.append(f'<g><title>{draft}, k={k}, {label}: {value:.3f}{ci_text}</title>')
                if ci:
                    out.append(f'<line x1="{x}" x2="{x}" y1="{y(ci[0]):.1f}" y2="{y(ci[1]):.1f}" stroke="{colour}"/>')
                out.append(f'<circle cx="{x}" cy="{y(value):.1f}" r="3.5" stroke="{colour}" '
                           f'fill="{colour if filled else "white"}"/></g>')
    for s, (label, _, colour, filled) in enumerate(series for series in SERIES if series[0] in drawn):
        x, line = 40 + (s % 3) * 230, bottom + 50 + (s // 3) * 18
        out.append(f'<circle cx="{x}" cy="{line - 4}" r="3.5" stroke="{colour}" fill="{colour if filled else "white"}"/>')
        out.append(f'<text x="{x + 8}" y="{line}">{label}</text>')
    return "\n".join(out + ["</svg>"]) + "\n"



# --- The paper's question asked on recall: python hsd_eval.py --model NAME --recall (toys/README.md) -------------
def recall_skips(config):
    """The drafts --recall measures: the paper's (drafts.paper_skips) and, for Qwen3.5 (a sequential hybrid, whose
    component draft leaves out its full-attention layers whole, their MLPs too), "attention-only": only the attention
    of those layers left out, their MLPs kept, as Falcon-H1's component draft leaves out only its attention branch."""
    skips = drafts.paper_skips(config)
    if config.family == "qwen3_5":
        skips["attention-only"] = models.Skip(attention={i for i, t in enumerate(config.layer_types)
                                                         if t == "full_attention"})
    return skips


def recall_inputs(lines, tokenizer, max_len, prompts):
    """What --recall measures, token ids by phase, and the characters its bits are of. Plain text: the single-round
    prompts as the paper's alpha protocol reads them (paper_inputs: the first `prompts` lines over 100 characters, cut
    to fit the model's context), "plain alpha" for acceptance and "plain bits" for the loss of every token but each
    prompt's first (within the context the model was trained on, unlike the paper's 2048-token perplexity text).
    Recall: `prompts` copy prompts (cost_model.copy_prompts: a passage, a newline and the passage's first characters
    again), "copy alpha" the prompts, "copy bits" the pairs (prompt, continuation) whose continuation's loss is
    measured. Returns (inputs, {"plain": characters predicted of the prompts, "copy": of the continuations})."""
    plain = paper_inputs(lines, tokenizer, max_len, prompts, speed_prompts=0)["alpha"]
    pairs = cost_model.copy_prompts(lines, prompts)
    copy = [(tokenizer.encode(prompt).ids, tokenizer.encode(rest, add_special_tokens=False).ids)
            for prompt, rest in pairs]
    inputs = {"plain alpha": plain, "copy alpha": [prompt for prompt, _ in copy], "plain bits": plain,
              "copy bits": copy}
    characters = {"plain": sum(len(tokenizer.decode(ids[1:])) for ids in plain),
                  "copy": sum(len(rest) for _, rest in pairs)}
    return inputs, characters


def recall(args, model, tokenizer, lines, temperature, seed):
    """--recall: per draft of recall_skips, on the held-out text and on copy prompts, bits per character and
    single-round acceptance (alpha_record, k = KS, greedy and at the temperature, with 95% intervals); on the copy
    prompts also the characters of the continuation that the full model and each draft reproduce greedily before
    the first difference (continuation_record). Records saved in --out as they come, as the main run does; prints
    recall_table; returns the JSON object of --json."""
    if args.plot or args.draft:
        raise models.UsageError("--recall measures the paper's drafts and prints one table: leave out --plot and "
                                "--draft (they belong to the main run)")
    if args.prompts < 1:
        raise models.UsageError(f"--recall needs --prompts >= 1 (got {args.prompts})")
    inputs, characters = recall_inputs(lines, tokenizer, model.config.max_position_embeddings, args.prompts)
    if not inputs["plain alpha"]:
        raise models.UsageError("the text has no line over 100 characters: give a longer --text")
    skips = recall_skips(model.config)
    header = {"model": args.model, "recall": True,
              "text_sha256": hashlib.sha256("\n".join(lines).encode()).hexdigest(),
              "prompts": len(inputs["plain alpha"]), "copy_prompts": len(inputs["copy alpha"]), "dtype": args.dtype,
              "device": args.device, "temperature": temperature, "seed": seed}
    if args.out:
        cost_model.check_writable(args.out, "--out")
    records = Records(args.out, header)
    device = model.lm_head.weight.device

    def alpha(i, prompt):                                      # a seeded stream per prompt, as the main run's
        return alpha_record(model, prompt, skips, temperature, torch.Generator().manual_seed(seed * 1_000_003 + i))
    phases = {"plain alpha": alpha, "copy alpha": alpha,
              "plain bits": lambda i, ids: perplexity_record(model, torch.tensor([ids], device=device), skips),
              "copy bits": lambda i, pair: continuation_record(model, *pair, skips)}
    try:
        with torch.inference_mode():
            for phase, run_one in phases.items():
                todo = records.missing(phase, len(inputs[phase]))
                for i in tqdm(todo, desc=phase, total=len(inputs[phase]), initial=len(inputs[phase]) - len(todo)):
                    records.add(phase, i, run_one(i, inputs[phase][i]))
    except KeyboardInterrupt:
        if not args.out:
            raise KeyboardInterrupt("nothing was saved (--out FILE keeps results as they come)") from None
        raise KeyboardInterrupt(f"saved in {args.out}: run the same command again to resume") from None
    result = {**vars(args), **recall_summary(inputs, characters, skips, records, temperature), "seed": seed}
    print(*recall_table(args.model, result), sep="\n")
    return result


def recall_summary(inputs, characters, skips, records, temperature):
    """--recall's result: per text ("plain", "copy"), the full model's and each draft's bits per character; per draft
    the acceptance rows (acceptance); on the copy prompts the share of the continuations' characters reproduced
    greedily ("copied", summed matched over summed characters, as hsd_train.copying)."""
    bits = math.log(2)
    plain = [records.saved["plain bits", i] for i in range(len(inputs["plain bits"]))]
    copy = [records.saved["copy bits", i] for i in range(len(inputs["copy bits"]))]
    tokens = sum(len(rest) for _, rest in inputs["copy bits"])
    result = {"prompts": len(inputs["plain alpha"]), "copy_prompts": len(copy), "temperature": temperature,
              "characters": characters, "drafts": {}}
    for draft in ("full", *skips):
        entry = result["drafts"][draft] = {
            "plain": {"bits_per_char": sum(r[draft] for r in plain) / bits / characters["plain"]},
            "copy": {"bits_per_char": sum(r[draft]["nll"] for r in copy) / bits / characters["copy"],
                     "copied": sum(r[draft]["matched"] for r in copy) / tokens}}
        if draft != "full":
            for text in ("plain", "copy"):
                alphas = [records.saved[f"{text} alpha", i] for i in range(len(inputs[f"{text} alpha"]))]
                entry[text]["k"] = acceptance(alphas, draft)
    return result


def recall_table(name, r):
    """--recall's table, as lines of text: a row per draft and text, greedy and sampled acceptance of the draft
    starting from the full model's state (shared, as hsd.generate runs), 95% intervals."""
    T = r["temperature"]
    yield (f"{name}: the paper's question on recall (acceptance: the draft starting from the full model's state, "
           "[95% CI])")
    yield (f"plain: {r['prompts']} single-round prompts of the text; bits/char on their {r['characters']['plain']} "
           "characters")
    yield (f"copy:  {r['copy_prompts']} prompts (a passage, a newline, its first characters again); bits/char and the "
           f"share copied (greedily, before the first difference) of the {r['characters']['copy']} characters that "
           "follow")
    yield (f"{'draft':14} {'text':5} {'bits/char':>9} {'copied':>6} " + " ".join(
        f"{f'greedy k={k}':>17}" for k in KS) + " " + " ".join(f"{f'T={T} k={k}':>17}" for k in KS))
    for draft, entry in r["drafts"].items():
        for text, row in entry.items():
            cells = [f"{row['k'][k]['alpha_' + variant]:.2f} [{row['k'][k]['ci_' + variant][0]:.2f}, "
                     f"{row['k'][k]['ci_' + variant][1]:.2f}]" for variant in ("shared", "sampled_shared") for k in KS
                     ] if "k" in row else []
            yield (f"{draft:14} {text:5} {row['bits_per_char']:9.3f} {number(row.get('copied'), '.3f', 6)} "
                   + " ".join(f"{cell:>17}" for cell in cells)).rstrip()

# --- Command line ------------------------------------------------------------------------------------------------
def main(argv=None):
    p = argparse.ArgumentParser(description="The paper's measurements: acceptance, divergence, perplexity and the "
                                            "cost model of every draft (RESULTS.md).")
    p.error = lambda message: p.exit(2, f"hsd_eval: error: {message} (see --help)\n")     # one line, no usage text
    p.add_argument("--model", required=True, help=f"{', '.join([*models.OFFICIAL, *models.TOYS, *models.TINY])}, "
                   "a Hugging Face repo id or a folder")
    p.add_argument("--text", help="a UTF-8 text file (default: WikiText-2 validation; toy-*: their held-out text; "
                                  "tiny-*: a built-in text)")
    p.add_argument("--prompts", type=int, default=200, help="prompts of the single-round protocol, and with "
                   "--recall as many copy prompts (default: 200)")
    p.add_argument("--speed-prompts", type=int, default=10, help="prompts of the multi-round runs (default: 10)")
    p.add_argument("--max-new-tokens", type=int, default=64, help="new tokens of a multi-round run (default: 64)")
    p.add_argument("--temperature", type=float, help=f"the sampled column's temperature (default: {TEMPERATURE})")
    p.add_argument("--seed", type=int, help=f"seed of the sampling (default: {SEED})")
    p.add_argument("--out", help="save results to this file as they come; the same command resumes from it")
    p.add_argument("--plot", help="draw acceptance by k to this SVG file")
    p.add_argument("--draft", action="append", metavar="DRAFT", help="a draft file (hsd_search.py), or a draft from "
                   "the text (lookup, lookup+component, ...), to measure beside the paper's drafts; may be given more "
                   "than once")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--threads", type=int, help="torch's threads (default: torch's choice; timings on a busy machine "
                                               "are steadier with 1)")
    p.add_argument("--recall", action="store_true", help="the paper's question asked on recall instead: bits/char and "
                   "acceptance of each draft on the text and on copy prompts (toys/README.md)")
    p.add_argument("--json", action="store_true", help="the results as one JSON object: stdout holds it alone, the "
                                                      "table goes to stderr")
    misspelt = cli.misspelt_option(p, sys.argv[1:] if argv is None else argv)
    if misspelt:
        p.error(misspelt)
    args = p.parse_args(argv)
    if args.threads is not None:
        if args.threads < 1:
            p.error(f"--threads must be at least 1 (got {args.threads})")
        torch.set_num_threads(args.threads)
    try:
        model = models.load(args.model, getattr(torch, args.dtype), args.device)
        with contextlib.redirect_stdout(sys.stderr if args.json else sys.stdout):      # --json: stdout is the JSON
            result = run(args, model, models.load_tokenizer(args.model))
    except models.UsageError as e:
        print(f"hsd_eval: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        print(f"\nhsd_eval: interrupted{': ' + str(e) if str(e) else ''}", file=sys.stderr)
        return 130
    if args.json:
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)     # output piped into `head` and the like: stop quietly
    sys.exit(main())

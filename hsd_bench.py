"""hsd_bench: hsd against transformers, and what speculation costs and measures; on the cost model (cost_model.py).

  python hsd_bench.py --model falcon-h1-0.5b [--repeats 5]   # hsd against transformers, about 5 min on 2 CPU cores
  python hsd_bench.py --model NAME --units                   # what leaving out each kind of part (layer, unit) saves
  python hsd_bench.py --model NAME --context-sweep [--out F] # c, v and the predicted speedup at 64 ... 8,192 tokens
  python hsd_bench.py --model TOY --drafts FILES [--out F]   # drafts side by side on the test prompts, greedy, T=0.6
  python hsd_bench.py --model TOY --drafts FILES --ks 1,2,4,8 --tokens 48 --repeats 2   # shorter: 4 fixed k, 2 turns
  python hsd_bench.py --model TOY --drafts lookup lookup+component --ks 2 --prompts grounded   # drafts from
                                                             # the text, on input-grounded prompts (a passage, a
                                                             # newline, its beginning)
  python hsd_bench.py --model TOY --transformers-lookup [--prompts grounded]   # hsd's lookup against transformers'
  python hsd_bench.py --model TOY --busy                     # a busy core: default threads, passive wait, 1 thread
(The model may also come first, without --model: python hsd_bench.py NAME ...)

Speed does not depend on the weight values, so random weights of an official config.json (models.OFFICIAL_CONFIGS) saved
once in the official layout, serve both sides: transformers (the official implementation; this benchmark, like the
tests, needs `pip install transformers==5.23.0`) and hsd load the same file. Runs alternate between the two and
medians are reported; every ratio printed is of numbers measured in this process. Besides tokens per second it prints
the operations of a decoding step and of verify passes (counted as the innermost PyTorch operations, roughly the
kernels a GPU would launch), c and v of the cost model, and decoding against the machine's memory-bandwidth limit.
--drafts measures the test set of cost_model.split (never the search's calibration paragraphs), every speedup with a
95% interval over the prompts (greedy every row; at T=0.6 of the paper's fixed k only the best greedy one's
neighbourhood: sampled_labels), after an estimate of its duration; every table is printed with the machine's state,
and a busy machine is said so.
"""
import argparse
import contextlib
import difflib
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time

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
    print("\nhsd_bench: interrupted", file=sys.stderr)
    sys.exit(130)



PAPER_T = 0.6                                            # the paper's sampling temperature
CONTEXTS = (64, 128, 256, 512, 1024, 2048, 4096, 8192)   # --context-sweep, as far as each model's context allows


def warning_lines(machine):
    """The busy machine's warning (cost_model.busy_warning: what other processes use), if it is busy."""
    busy = cost_model.busy_warning(machine)
    if busy:
        yield f"warning: {busy}"


def warn_if_busy():
    """Before anything is loaded or measured: the busy machine's warning on stderr, from the load of others now."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    busy = cost_model.busy_warning({"busy_cores": cost_model.busy_cores(), "cores": cores,
                                    "threads": torch.get_num_threads()})
    if busy:
        print(f"hsd_bench: warning: {busy}", file=sys.stderr)


def machine_words(machine):
    """The machine (cost_model.machine_state) in a few words, printed with every number."""
    threads = f"{machine['threads']} thread" + ("s" if machine["threads"] != 1 else "")
    return (f"{machine['device']}, {threads} of {machine['cores']} cores, OMP_WAIT_POLICY "
            f"{machine['omp_wait_policy']}, {machine['busy_cores']:.2f} cores busy with other work, torch "
            f"{machine['torch']}, commit {(machine['commit'] or '?')[:12]}")


# --- Operations -------------------------------------------------------------------------------------------------
# Operations that launch no kernel on a GPU: views, reshapes, dtype no-ops, type queries.
NO_KERNEL = {
    "aten::view", "aten::as_strided", "aten::select", "aten::slice", "aten::expand", "aten::unsqueeze", "aten::reshape",
    "aten::split", "aten::narrow", "aten::t", "aten::transpose", "aten::permute", "aten::_unsafe_view", "aten::detach",
    "aten::lift", "aten::lift_fresh", "aten::empty", "aten::empty_strided", "aten::squeeze", "aten::alias",
    "aten::unbind", "aten::_reshape_alias", "aten::chunk", "aten::split_with_sizes", "aten::contiguous", "aten::to",
    "aten::result_type", "aten::promote_types", "aten::resolve_conj", "aten::resolve_neg", "aten::flatten",
    "aten::expand_as", "aten::view_as", "aten::_to_copy"}


def count_ops(fn):
    """The innermost PyTorch operations that fn() issues (an operation that calls others counts as its children),
    leaving out those that launch no kernel (NO_KERNEL): roughly the kernels a GPU would launch."""
    with torch.inference_mode(), torch.profiler.profile() as prof:
        fn()
    return sum(1 for e in prof.events() if not e.cpu_children and e.name not in NO_KERNEL
               and e.name.startswith(("aten::", "mkldnn::")))


def ops_per_pass(model, ks, context=64):
    """Operations of one decoding step, and of a verify pass of k+1 tokens for each k, after a prefill of context tokens
    (the counts do not depend on the context or on the weight values)."""
    cache = models.Cache(model, context + max(ks) + 2)
    hsd.prefill(model, cache, list(range(1, context + 1)))
    snap, token = hsd.snapshot(cache), torch.tensor([[1]])

    def counted(step):
        ops = count_ops(step)
        hsd.restore(cache, snap)
        return ops
    return counted(lambda: model(token, cache)), {k: counted(lambda: hsd.verify(model, cache, 1, [1] * k)) for k in ks}


# --- Memory bandwidth -----------------------------------------------------------------------------------------------
def memory_bandwidth(repeats=5):
    """Bytes per second this machine reads from memory: summing 1 GiB, far more than any cache (median of repeats)."""
    buffer = torch.ones(2**28)
    seconds = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        buffer.sum()
        seconds.append(time.perf_counter() - t0)
    return buffer.numel() * buffer.element_size() / sorted(seconds)[repeats // 2]


def weight_bytes_per_token(model):
    """Bytes of weights a decoding step reads: every parameter once, but of an untied embedding table only one row."""
    table = model.model.embed_tokens.weight
    untied = table is not model.lm_head.weight
    return sum(p.numel() * p.element_size() for p in model.parameters() if not (untied and p is table))


# --- The benchmark ----------------------------------------------------------------------------------------------
def random_checkpoint(name, tf):
    """The folder of a random-weight checkpoint of models.OFFICIAL_CONFIGS[name], written by transformers once (in the
    temporary directory, hsd-bench-NAME) and reused."""
    cfg = models.OFFICIAL_CONFIGS[name]
    path = os.path.join(tempfile.gettempdir(), f"hsd-bench-{name}")
    if not os.path.exists(os.path.join(path, "config.json")):
        torch.manual_seed(0)
        hf = (tf.Qwen3_5ForCausalLM(tf.Qwen3_5TextConfig(**cfg["text_config"])) if cfg["model_type"] == "qwen3_5" else
              tf.AutoModelForCausalLM.from_config(tf.AutoConfig.for_model(**cfg)))
        hf.save_pretrained(path)
    return path


def seconds(fn):
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def bench(name, new_tokens=32, prompt_len=512, repeats=3, k=2, context=256, cost_repeats=11):
    """Print hsd against transformers (decoding and prefill, alternating runs, medians), the bookkeeping of a round,
    the operations per step and verify pass, c and v, and decoding against the memory-bandwidth limit."""
    import transformers as tf
    path = random_checkpoint(name, tf)
    hf = tf.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ours = models.load(path)
    machine = cost_model.machine_state(ours, "float32")        # before measuring: the load of others, not ours
    draft = drafts.paper_draft(ours.config)
    torch.manual_seed(0)
    ids = torch.randint(0, 1000, (1, prompt_len))
    prompt = ids[:, :16]

    def hf_generate(tokens):
        return hf.generate(prompt, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False)

    def hsd_prefill():                                   # the prompt through a fresh cache, the last row's logits
        return ours.logits(ours.hidden_states(ids, models.Cache(ours, prompt_len))[:, -1:])

    timed = {"hf decode": [], "hsd decode": [], "hf prefill": [], "hsd prefill": [], "spec": []}
    with torch.inference_mode():
        hf_generate(2), hsd.generate(ours, prompt[0], 2, draft="none")                       # warm up
        for _ in range(repeats):
            # transformers: generating new_tokens tokens minus generating 1 = new_tokens - 1 decoding steps
            hf_steps = seconds(lambda: hf_generate(new_tokens)) - seconds(lambda: hf_generate(1))
            timed["hf decode"].append((new_tokens - 1) / hf_steps)
            plain = hsd.generate(ours, prompt[0], new_tokens, draft="none")[1]
            timed["hsd decode"].append(new_tokens / plain["decode_s"])
            timed["hf prefill"].append(seconds(lambda: hf(ids, logits_to_keep=1)))
            timed["hsd prefill"].append(seconds(hsd_prefill))
            timed["spec"].append(hsd.generate(ours, prompt[0], new_tokens, draft=draft, k=k)[1])
        # the state bookkeeping of one round, timed alone: snapshot + restore, and accept + commit after a verify pass
        cache = models.Cache(ours, prompt_len + k + 2)
        hsd.prefill(ours, cache, ids[0, :-1].tolist())
        snap = hsd.snapshot(cache)
        t_snap = seconds(lambda: [hsd.restore(cache, hsd.snapshot(cache)) for _ in range(1000)]) / 1000
        t_commit = []
        for _ in range(20):
            logits, recorded = hsd.verify(ours, cache, 1, [2] * k)
            def accept_and_commit():
                hsd.commit(cache, snap.length, hsd.accept([2] * k, logits)[0] + 1, recorded)
            t_commit.append(seconds(accept_and_commit))
            hsd.restore(cache, snap)
        hf = cache = None                                             # memory for the measurements below
        ks = (2, 4, 8)
        step_ops, verify_ops = ops_per_pass(ours, ks)
        skips = drafts.paper_skips(ours.config)
        costs = cost_model.measure_costs(ours, skips, context, cost_repeats, max(ks), passes=hsd.PASSES)
        bandwidth = memory_bandwidth()
    med = {key: statistics.median(x) for key, x in timed.items() if key != "spec"}
    round_s = statistics.median(s["decode_s"] / s["rounds"] for s in timed["spec"])
    weight_bytes = weight_bytes_per_token(ours)
    print(f"{name}, random weights, fp32, {machine_words(machine)}, {repeats} alternating runs, medians")
    for line in warning_lines(machine):
        print(line)
    print(f"decode  {new_tokens} tokens: hsd {med['hsd decode']:.2f} tok/s, transformers {med['hf decode']:.2f} tok/s "
          f"-> {med['hsd decode'] / med['hf decode']:.2f}x   (runs: hsd {[round(x, 2) for x in timed['hsd decode']]}, "
          f"transformers {[round(x, 2) for x in timed['hf decode']]})")
    print(f"prefill {prompt_len} tokens: hsd {med['hsd prefill']:.2f} s, transformers {med['hf prefill']:.2f} s "
          f"-> {med['hf prefill'] / med['hsd prefill']:.2f}x")
    print(f"speculative, {draft} draft, k={k}: round {round_s * 1e3:.1f} ms; snapshot+restore {t_snap * 1e6:.1f} us, "
          f"accept+commit {statistics.median(t_commit) * 1e6:.1f} us: "
          f"{(t_snap + statistics.median(t_commit)) / round_s:.2%} of a round")
    print(f"ops     decoding step {step_ops}; verify pass " + ", ".join(
        f"k={k} {ops} ({ops / step_ops:.2f}x)" for k, ops in verify_ops.items()) +
        f"; from k=2 to k=8 +{(verify_ops[8] - verify_ops[2]) / step_ops:.0%} of a step   (innermost PyTorch "
        "operations)")
    print(f"cost    at {context} tokens, medians of {cost_repeats} turns (cost_model.measure_costs): full step "
          f"{costs.step_s * 1e3:.1f} ms; c: " + ", ".join(f"{label} {costs.c[label]:.2f}" for label in skips)
          + "; v: " + ", ".join(f"k={k} {costs.v[k]:.2f}" for k in ks) + f"; r {costs.r:.2f}")
    limit = bandwidth / weight_bytes
    print(f"memory  {weight_bytes / 1e9:.2f} GB of weights read per token; memory read at {bandwidth / 1e9:.1f} GB/s "
          "(a sum "
          f"over 1 GiB) bounds decoding at {limit:.1f} tok/s: hsd decodes at {med['hsd decode'] / limit:.0%} of it, "
          f"transformers at {med['hf decode'] / limit:.0%}")


# --- Drafts side by side, end to end on the test set (the results table) ----------------------------------------
def test_prompts(name, tokenizer, prompt_tokens):
    """The test set (cost_model.split: TEST_PROMPTS paragraphs of the held-out text, spread over it and named by
    paragraph index, none of them a calibration paragraph): ({paragraph index: prompt ids}), each cut to
    prompt_tokens."""
    paragraphs = cost_model.paragraphs(cost_model.read_lines(None, name), tokenizer)
    return {i: paragraphs[i][:prompt_tokens] for i in cost_model.split(paragraphs, prompt_tokens).test}


GROUNDED_BEGINNING = (30, 40)                            # characters of the passage repeated after it: a word's end


def grounded_prompts(name, tokenizer, prompt_tokens):
    """Input-grounded prompts, one per paragraph of the test set (test_prompts'): the paragraph's first 2 x
    prompt_tokens tokens as text (the passage), a newline, then the passage's first 30-40 characters, cut at the end
    of a word: a model that copies continues the passage from there, as in summaries, answers from a document or code
    edits. {paragraph index: prompt ids}."""
    paragraphs = cost_model.paragraphs(cost_model.read_lines(None, name), tokenizer)
    low, high = GROUNDED_BEGINNING
    prompts = {}
    for i in cost_model.split(paragraphs, prompt_tokens).test:
        passage = tokenizer.decode(paragraphs[i][:2 * prompt_tokens]).strip()
        cut = passage.rfind(" ", low, high + 1)                # the last space in 30..40: the words before it
        beginning = passage[:cut if cut > 0 else high]
        prompts[i] = tokenizer.encode(passage + "\n" + beginning).ids
    return prompts


GROUNDED_WORDS = ": each a passage, a newline, then the passage's first 30-40 characters"
PROMPT_KINDS = ("plain", "grounded")                     # --prompts


def prompts_of(kind, name, tokenizer, prompt_tokens):
    """The test paragraphs' prompts of a kind (--prompts): "plain" test_prompts, "grounded" grounded_prompts."""
    return (grounded_prompts if kind == "grounded" else test_prompts)(name, tokenizer, prompt_tokens)


PAPER_KS = tuple(range(1, 9))                            # the paper's fixed k: --ks chooses among them
SAMPLED_WINDOW = 3                                       # fixed ks per paper draft at T > 0 (sampled_labels)


def parse_ks(text):
    """--ks "1,2,4,8" -> (1, 2, 4, 8): the fixed k of the paper's drafts, sorted, each once; a UsageError otherwise."""
    try:
        ks = sorted({int(k) for k in text.split(",")})
    except ValueError:
        ks = []
    if not ks or not set(ks) <= set(PAPER_KS):
        raise models.UsageError(f"--ks takes k from 1 to 8 separated by commas, e.g. --ks 1,2,4,8 (got {text!r})")
    return tuple(ks)


def plan_label(draft, k, stop):
    """A row of a paper draft's units at a k and stop: "component, k=7, stop 0.2" ("component, k=4" without one)."""
    return f"{draft}, k={k}" + (f", stop {stop:g}" if stop is not None else ", no stop" if k == "auto" else "")


def tuned_plan(found_by, draft):
    """(k, stop) the search chose for a paper draft's units (found_by.paper_drafts: the same estimate, costs and
    choice of k 1..8 or auto and stop as for its own draft), or None if the file does not say."""
    said = found_by.get("paper_drafts", {}).get(draft) if isinstance(found_by.get("paper_drafts"), dict) else None
    if not isinstance(said, dict) or not (said.get("k") == "auto" or type(said.get("k")) is int):
        return None
    stop = said.get("stop")
    return said["k"], stop if isinstance(stop, (int, float)) and not isinstance(stop, bool) else None


def draft_rows(model, files, ks=PAPER_KS):
    """(rows, skip_label, splits): rows {label: drafts.Draft}, the paper's drafts at every fixed k of ks and with
    k="auto", each draft named in files that is no file (a draft from the text: "lookup", "lookup+component") at its
    own k and with k="auto", each draft file as it says, at its best fixed k (found_by.best_fixed) and with k="auto",
    and the paper's draft for the family (drafts.paper_draft) with the freedom the search has: at the file's own k and
    stop, and at the k and stop the search chose for it (tuned_plan); skip_label {label: the label of its skip in the
    costs} (the paper draft's name, or the file's path; None for a draft from the text, whose draft step is no
    skip's); splits {path: {"file", "paper", "same_plan", "tuned"}: the labels gain_split compares (tuned None if the
    file does not say)}."""
    paper = drafts.paper_skips(model.config)
    rows = {f"{draft}, k={k}": drafts.Draft(draft, skip, k, None) for draft, skip in paper.items() for k in ks}
    rows |= {f"{draft}, k=auto": hsd.choose_draft(model, draft, "auto") for draft in paper}
    family, splits, text_rows = drafts.paper_draft(model.config), {}, []
    for name in (entry for entry in files if drafts.split_lookup(entry)[0]):        # lookup, lookup+DRAFT: by name
        rows[name] = hsd.choose_draft(model, name)
        rows[f"{name}, k=auto"] = hsd.choose_draft(model, name, "auto")
        text_rows += [name, f"{name}, k=auto"]                          # no skip of their own to time: text_draft_c
    for path in (entry for entry in files if not drafts.split_lookup(entry)[0]):
        found, notes = drafts.read_draft_file(path, model)
        for line in notes:
            print(f"hsd_bench: note: {line}", file=sys.stderr)
        found_by = drafts.read_json(path, lambda what: models.UsageError(f"{path}: {what}")).get("found_by")
        fixed = found_by.get("best_fixed") if isinstance(found_by, dict) else None
        if not (isinstance(fixed, dict) and (fixed.get("k") == "auto" or type(fixed.get("k")) is int)):
            fixed = None                                  # a file written by hand has no best fixed k
        rows[path] = found
        if fixed and (fixed["k"], fixed.get("stop")) != (found.k, found.stop):
            rows[f"{path}, k={fixed['k']}"] = found._replace(k=fixed["k"], stop=fixed.get("stop"))
        if found.k != "auto":
            rows[f"{path}, k=auto"] = found._replace(k="auto")
        plans = {"same_plan": (found.k, found.stop),
                 "tuned": tuned_plan(found_by if isinstance(found_by, dict) else {}, family)}
        splits[path] = {"file": path, "paper": family, **{key: None if plan is None else plan_label(family, *plan)
                                                         for key, plan in plans.items()}}
        for plan in plans.values():
            if plan is not None:
                rows.setdefault(plan_label(family, *plan), drafts.Draft(family, paper[family], *plan))
    skip_label = {label: next((path for path in files if label.startswith(path)), label.split(", k=")[0])
                  for label in rows} | dict.fromkeys(text_rows)
    return rows, skip_label, splits


def row_c(label, draft, skip_label, costs):
    """c of a row for the cost model (measured_row): its skip's measured c; for a draft from the text alone 0 (no
    model call drafts; the lookup's own time, which --context-sweep measures, is left out); for a cascade None (its
    rounds mix the text's, which cost no draft step, and the draft model's, with a fixed k some with a check pass: one
    c does not describe them, so its row has no cost model)."""
    if skip_label[label] is not None:
        return costs.c[skip_label[label]]
    return 0.0 if draft.skip is None else None


def measured_auto(draft, label, paper, skip_label, costs):
    """A paper draft with k="auto" pauses by the c and v measured here (as a caller passes them: hsd.generate's
    costs), not by the default rule, and so does a cascade's draft model when it is a paper draft (lookup+layerskip
    pauses its layerskip steps by layerskip's c, as the layerskip row does); a draft file's row keeps the file's
    costs, as hsd.py --draft FILE runs it."""
    timed = skip_label[label] or drafts.split_lookup(label.split(", k=")[0])[1]      # a cascade: its draft model
    if draft.k != "auto" or timed not in paper:
        return draft
    return draft._replace(costs=drafts.draft_costs(costs.c[timed], costs.v, costs.r))


def window(ks, best, width=SAMPLED_WINDOW):
    """The width consecutive ks (sorted) around best: best and its neighbours, shifted inward at either end."""
    start = min(max(ks.index(best) - 1, 0), max(len(ks) - width, 0))
    return ks[start:start + width]


def fixed_paper_labels(paper, ks):
    """The labels of the paper's drafts at each fixed k of ks, without a stop: what "the best fixed paper row" is of."""
    return {f"{draft}, k={k}" for draft in paper for k in ks}


def sampled_labels(rows, paper, ks, greedy_speedup, splits=None):
    """The labels of rows (draft_rows) run at T > 0: of each paper draft only the fixed ks of window() around its
    best greedy k (greedy_speedup: {label: measured greedy speedup}; with SAMPLED_WINDOW ks or fewer, all of them):
    the best k moves little with the temperature, and where the best at T > 0 lies at the window's edge the table says
    so (unrun_neighbours); every k=auto row, every draft file's row and every row gain_split compares (splits)."""
    keep = {label for split in (splits or {}).values() for label in split.values() if label in rows}
    for draft in paper:
        best = max(ks, key=lambda k: greedy_speedup[f"{draft}, k={k}"])
        keep |= {f"{draft}, k={k}" for k in window(ks, best)}
    fixed_paper = fixed_paper_labels(paper, ks)
    return [label for label in rows if label in keep or label not in fixed_paper]


def generations(rows, prompts, turns):
    """Generations of one temperature (rows, prompts: how many): plain decoding and every row, on every prompt, in
    every turn."""
    return (rows + 1) * prompts * turns


def drafts_side_by_side(name, files, new_tokens=64, turns=3, prompt_tokens=64, ks=PAPER_KS, out=None, seed=0,
                        prompt_kind="plain"):
    """Plain decoding against the rows of draft_rows, end to end on the test prompts, in turns in one process
    (cost_model.generations_in_turns): greedy every row, at PAPER_T the rows of sampled_labels; c and v measured at
    each temperature at the mean context of a generation. Prints on stderr an estimate of the run's duration before
    measuring (duration_line) and shows one progress bar over the whole run; with out, saves everything measured so
    far (side_by_side_json, raw runs included) after each temperature. Returns {"prompts", "ks", "ran": {T: labels},
    "costs": {T: Costs}, "rows": {(label, T): measured_row}, "best": {T: the best fixed paper row}, "runs": {T: the
    raw runs}, "paper": the paper's drafts, "prompt_kind", "machine", "warnings", "complete"}. prompt_kind: "plain"
    (test_prompts) or "grounded" (grounded_prompts), the same test paragraphs."""
    model, tokenizer = models.load(name), models.load_tokenizer(name)
    machine = cost_model.machine_state(model, "float32")       # before measuring: the load of others, not ours
    prompts = prompts_of(prompt_kind, name, tokenizer, prompt_tokens)
    context = round(statistics.mean(map(len, prompts.values()))) + new_tokens // 2
    rows, skip_label, splits = draft_rows(model, files, ks)
    paper = drafts.paper_skips(model.config)
    skips = {skip_label[label]: rows[label].skip for label in rows if skip_label[label] is not None}
    longest = max(hsd.AUTO_MAX, *(rows[label].k for label in rows if rows[label].k != "auto"))
    cost_model.warm_up(model, longest)
    sampled_rows = len(sampled_labels(rows, paper, ks, dict.fromkeys(fixed_paper_labels(paper, ks), 0.0),
                                      splits))                                # as many as it keeps, whichever k is best
    counts = {0.0: generations(len(rows), len(prompts), turns), PAPER_T: generations(sampled_rows, len(prompts), turns)}
    t0 = time.perf_counter()
    costs = cost_model.measure_costs(model, skips, context, 7 * turns, longest, 0.0, passes=hsd.PASSES)
    costs_s = time.perf_counter() - t0
    generation_s = seconds(lambda: hsd.generate(model, next(iter(prompts.values())), new_tokens, draft="none"))
    print(duration_line(counts, generation_s, costs_s, new_tokens), file=sys.stderr)
    result = {"prompts": prompts, "prompt_kind": prompt_kind, "ks": ks, "paper": list(paper), "ran": {}, "costs": {},
              "rows": {}, "best": {}, "runs": {}, "splits": splits, "gain_split": {}, "complete": False}
    with tqdm(total=sum(counts.values()), desc="generations (all rows, both temperatures)", file=sys.stderr) as bar:
        for T in counts:
            ran = result["ran"][T] = list(rows) if T == 0 else sampled_labels(
                rows, paper, ks, {label: result["rows"][label, 0.0]["speedup"] for label in rows}, splits)
            if T != 0:
                costs = cost_model.measure_costs(model, skips, context, 7 * turns, longest, T, passes=hsd.PASSES)
            result["costs"][T] = costs
            bar.set_postfix_str(f"T={T}, {len(ran) + 1} rows")
            runs = result["runs"][T] = cost_model.generations_in_turns(
                hsd.generate, model, list(prompts.values()), {label: measured_auto(rows[label], label, paper, skip_label,
                                                                                   costs) for label in ran},
                new_tokens, turns, T, seed, bar)
            for label in ran:
                c = row_c(label, rows[label], skip_label, costs)
                result["rows"][label, T] = {**cost_model.measured_row(runs[label], runs["plain"],
                                                                      None if c is None else (c, costs.v, costs.r)),
                                            "c": c}
            fixed_paper = [label for label in ran if label in fixed_paper_labels(paper, ks)]
            best = result["best"][T] = max(fixed_paper, key=lambda label: result["rows"][label, T]["speedup"])
            for label in ran:                                  # each row against the best fixed paper row
                result["rows"][label, T]["vs_best_paper"] = cost_model.speedup(runs[label], runs[best])
                result["rows"][label, T]["vs_best_paper_ci"] = cost_model.speedup_ci(runs[label], runs[best])
            result["gain_split"][T] = {path: gain_split(runs, split, ks) for path, split in splits.items()}
            result = {**result, **summary(result, machine), "complete": T == PAPER_T}
            if out:                                            # after each temperature: Ctrl-C keeps what was measured
                cost_model.write_json(out, side_by_side_json(name, result, new_tokens))
    return result


def gain_split(runs, split, ks):
    """Where a draft file's gain over the paper's draft at its best fixed k comes from, on one temperature's runs
    ({label: runs}), each a paired ratio of speedups with its 95% interval over the prompts (cost_model.speedup_ci):
    "units", the file against the paper's units at the file's own k and stop (split["same_plan"]); "k_and_stop", the
    paper's units at the k and stop the search chose for them (split["tuned"]) against the same units at their best
    fixed k of ks (the fastest on these prompts, so this ratio leans low); "total", the file against that best fixed
    row. A comparison whose rows did not run is None."""
    fixed = [f"{split['paper']}, k={k}" for k in ks if f"{split['paper']}, k={k}" in runs]
    best = max(fixed, key=lambda label: cost_model.speedup(runs[label], runs["plain"]), default=None)

    def ratio(a, b):
        if a not in runs or b not in runs:
            return None
        return {"rows": [a, b], "ratio": cost_model.speedup(runs[a], runs[b]),
                "ci": list(cost_model.speedup_ci(runs[a], runs[b]))}
    return {"best_fixed": best, "units": ratio(split["file"], split["same_plan"]),
            "k_and_stop": ratio(split["tuned"], best), "total": ratio(split["file"], best)}


def gain_lines(r):
    """The results table's last part: per draft file and temperature, its gain split into units and k and stop."""
    def words(x):
        if x is None:
            return "-"
        low, high = x["ci"]
        verdict = ("brings nothing measurable" if low <= 1 <= high else "a gain" if low > 1 else "a loss")
        return f"{x['ratio']:.3f} [{low:.3f}, {high:.3f}] ({verdict})"
    for T, per_file in r["gain_split"].items():
        for path, g in per_file.items():
            split = r["splits"][path]
            yield (f"where {path}'s gain comes from at T={T}: total, against {g['best_fixed']}: {words(g['total'])}; "
                   f"its units, against {split['same_plan']}: {words(g['units'])}; k and stop, {split['tuned']} "
                   f"against {g['best_fixed']}: {words(g['k_and_stop'])}")


def duration_line(counts, generation_s, costs_s, new_tokens):
    """The run's duration, estimated before measuring: every generation as long as a first plain one (measured,
    prefill included; a speculative row takes about as long or less when its draft pays, longer when it does not),
    plus the cost measurement at each temperature as long as the greedy one took."""
    total = sum(counts.values()) * generation_s + len(counts) * costs_s
    return (f"hsd_bench: estimate about {total / 60:.1f} min: " + " + ".join(
            f"{count} generations at T={T}" for T, count in counts.items()) + f", each about {generation_s:.2f} s (a "
            f"plain generation of {new_tokens} tokens, measured), plus {len(counts)} cost measurements of about "
            f"{costs_s:.0f} s")


def summary(result, machine):
    """The machine and its warnings for the rows measured so far."""
    spread = max((r["turn_speedups"] for r in result["rows"].values()), key=lambda x: max(x) / min(x))
    busy = cost_model.busy_warning(machine, spread)
    return {"machine": machine, "warnings": [busy] if busy else []}


def side_by_side_lines(name, r, new_tokens):
    """The results table: every speedup with its 95% interval over the test prompts; greedy rows with the loop
    measure (the share of the continuations' tokens inside a 4-gram seen before in the same continuation)."""
    kind = {"plain": "", "grounded": "input-grounded "}[r.get("prompt_kind", "plain")]
    yield (f"{name}: {len(r['prompts'])} {kind}test prompts (paragraphs {', '.join(map(str, r['prompts']))} of the "
           f"held-out text{GROUNDED_WORDS if kind else ''}), {new_tokens} new tokens; {machine_words(r['machine'])}")
    for T, costs in r["costs"].items():
        noise = "-" if costs.noise["step"] is None else f"{costs.noise['step']:.1%}"
        yield (f"T={T}: full step {costs.step_s * 1e3:.2f} ms at {costs.context} tokens (noise {noise}); ran "
               f"{ran_words(r, T)}")
        yield (f"  best fixed paper row: {r['best'][T]}, chosen as the fastest on these same prompts, so its speedup "
               "leans high and every 'vs best paper' leans low")
        if unrun_neighbours(r, T):
            yield (f"  note: its k is at the edge of the ks run at T={T}; k={','.join(map(str, unrun_neighbours(r, T)))}"
                   " did not run at this temperature and might be faster")
    yield (f"{'row':44} {'T':>4} {'speedup [95% CI]':>22} {'vs best paper [95% CI]':>23} {'alpha':>6} {'acc/rnd':>7} "
           f"{'drf/rnd':>7} {'plain':>5} {'c':>5} {'predicted':>9} {'loops':>6}")
    for (label, T), x in r["rows"].items():
        loops = f"{x['repeated_4grams']:6.1%}" if T == 0 else f"{'':6}"
        yield (f"{label[-44:]:44} {T:4.1f} {x['speedup']:7.3f}x [{x['speedup_ci'][0]:.3f}, {x['speedup_ci'][1]:.3f}] "
               f"{x['vs_best_paper']:8.3f} [{x['vs_best_paper_ci'][0]:.3f}, {x['vs_best_paper_ci'][1]:.3f}] "
               f"{x['alpha'] or 0:6.3f} {x['accepted_per_round'] or 0:7.2f} {x['drafts_per_round'] or 0:7.2f} "
               f"{x['plain_steps']:5d} {'-' if x['c'] is None else format(x['c'], '.2f'):>5} "
               f"{'-' if x['c'] is None else format(x['cost_model_on_these_rounds'], '8.3f') + 'x':>9} {loops}")
    yield from gain_lines(r)
    for line in r["warnings"]:
        yield f"warning: {line}"


def unrun_neighbours(r, T):
    """The ks of --ks next to the best fixed paper row's k at T that did not run at T (its k at the edge of the ks run
    for its draft): a faster fixed row might lie there."""
    draft, _, k = r["best"][T].partition(", k=")
    ran = [x for x in r["ks"] if f"{draft}, k={x}" in r["ran"][T]]
    i = r["ks"].index(int(k))
    near = [r["ks"][j] for j in (i - 1, i + 1) if 0 <= j < len(r["ks"])]
    return [x for x in near if x not in ran]


def ran_words(r, T):
    """What ran at temperature T, in words: which fixed k of the paper's drafts, and the other rows."""
    fixed = {}
    for label in r["ran"][T]:
        draft, _, k = label.partition(", k=")
        if draft in r["paper"] and k.isdigit() and int(k) in r["ks"]:
            fixed.setdefault(draft, []).append(k)
    how = (f"--ks {','.join(map(str, r['ks']))}" if T == 0 else
           f"of --ks {','.join(map(str, r['ks']))} the best greedy k and its neighbours")
    return ("paper drafts at k " + "; ".join(f"{draft} {','.join(ks)}" for draft, ks in fixed.items()) + f" ({how}), "
            "every k=auto row, each file's and each named draft's rows")


def side_by_side_json(name, r, new_tokens):
    """What --out saves: the table's numbers, the costs, the machine, and every raw run (per label, prompt and turn),
    so that a stranger can bootstrap them again."""
    return {"model": name, "new_tokens": new_tokens, "prompts": r.get("prompt_kind", "plain"),
            "test_paragraphs": list(r["prompts"]), "machine": r["machine"],
            "warnings": r["warnings"], "unreliable": bool(r["warnings"]), "complete": r["complete"],
            "ks": list(r["ks"]), "ran": {str(T): labels for T, labels in r["ran"].items()},
            "best_fixed_paper": {str(T): b for T, b in r["best"].items()},
            "best_fixed_paper_chosen_on": "these test prompts (the fastest fixed paper row that ran)",
            "best_fixed_paper_unrun_neighbours": {str(T): unrun_neighbours(r, T) for T in r["best"]},
            "costs": {str(T): costs._asdict() for T, costs in r["costs"].items()},
            "rows": [{"row": label, "temperature": T, **x} for (label, T), x in r["rows"].items()],
            "gain_split": {str(T): per_file for T, per_file in r["gain_split"].items()},
            "runs": {str(T): runs for T, runs in r["runs"].items()}}


# --- hsd's lookup against transformers' prompt lookup, the same toy and prompts -----------------------------------
HF_LOOKUP_TOKENS = 10           # transformers' prompt_lookup_num_tokens: the value its documentation shows
LOOKUP_LABELS = ("transformers plain", "transformers lookup", "hsd plain", "hsd lookup")


def transformers_lookup(name, prompt_kind="plain", new_tokens=64, turns=3, prompt_tokens=64, draft="lookup",
                        hf_tokens=HF_LOOKUP_TOKENS):
    """hsd's lookup (draft: "lookup" or a cascade) against transformers' prompt lookup (model.generate(...,
    prompt_lookup_num_tokens=hf_tokens), the toy's own files loaded by transformers) on the prompts of prompt_kind
    (prompts_of), in turns in one process: on each prompt, transformers' plain greedy decoding and its prompt lookup,
    hsd's plain greedy decoding and its lookup, each timed whole (transformers' generate prefills too, so hsd's runs
    count their prefill alike). Returns {"prompts", "prompt_kind", "runs": {label: [per prompt: [per turn: {new_tokens,
    decode_s, tokens}]]} for LOOKUP_LABELS, "refused": transformers' words where it refuses prompt lookup (5.23 does
    for stateful models: Falcon-H1, Qwen3.5), "machine"}."""
    import transformers as tf
    model, tokenizer = models.load(name), models.load_tokenizer(name)
    hf = tf.AutoModelForCausalLM.from_pretrained(models.TOYS[name], dtype=torch.float32).eval()
    machine = cost_model.machine_state(model, "float32")       # before measuring: the load of others, not ours
    prompts = prompts_of(prompt_kind, name, tokenizer, prompt_tokens)

    def hf_run(prompt, lookup, tokens=new_tokens):
        ids = torch.tensor([prompt])
        extra = {"prompt_lookup_num_tokens": hf_tokens} if lookup else {}
        t0 = time.perf_counter()
        out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=tokens, do_sample=False, **extra)
        made = out[0, len(prompt):].tolist()
        return {"new_tokens": len(made), "decode_s": time.perf_counter() - t0, "tokens": made}

    def hsd_run(prompt, asked, tokens=new_tokens):
        t0 = time.perf_counter()
        made, _ = hsd.generate(model, prompt, tokens, draft=asked)
        return {"new_tokens": len(made), "decode_s": time.perf_counter() - t0, "tokens": made}
    calls = {"transformers plain": lambda p: hf_run(p, False), "transformers lookup": lambda p: hf_run(p, True),
             "hsd plain": lambda p: hsd_run(p, "none"), "hsd lookup": lambda p: hsd_run(p, draft)}
    first, refused = next(iter(prompts.values())), None
    with torch.inference_mode():
        cost_model.warm_up(model, hsd.AUTO_MAX)
        hf_run(first, False, 4), hsd_run(first, "none", 4), hsd_run(first, draft, 4)                 # warm up
        try:
            hf_run(first, True, 4)
        except ValueError as e:                                # "assisted generation is not supported with ..."
            refused = str(e).strip().splitlines()[0]
            del calls["transformers lookup"]
        runs = {label: [[] for _ in prompts] for label in calls}
        with tqdm(total=turns * len(prompts) * len(calls), desc="generations", file=sys.stderr) as bar:
            for _ in range(turns):
                for i, prompt in enumerate(prompts.values()):
                    for label, call in calls.items():
                        runs[label][i].append(call(prompt))
                        bar.update(1)
    return {"prompts": list(prompts), "prompt_kind": prompt_kind, "draft": draft, "hf_tokens": hf_tokens,
            "runs": runs, "refused": refused, "machine": machine}


def lookup_comparison(r):
    """transformers_lookup's runs summed up: per label, tokens per second, on how many prompts its tokens are hsd's
    plain greedy decoding's (the first turn's) and where the first one parts; and hsd's lookup over transformers'
    (and over each plain decoding) with a 95% interval over the prompts."""
    greedy = [per_prompt[0]["tokens"] for per_prompt in r["runs"]["hsd plain"]]
    rows = {}
    for label, runs in r["runs"].items():
        made = [per_prompt[0]["tokens"] for per_prompt in runs]
        parted = [next((j for j, (a, b) in enumerate(zip(x, g)) if a != b), min(len(x), len(g)))
                  for x, g in zip(made, greedy) if x != g]
        rows[label] = {"tokens_per_s": cost_model.rate(runs), "greedy_prompts": sum(x == g for x, g in
                                                                                    zip(made, greedy)),
                       "first_parting_token": min(parted, default=None)}
    ratios = {}
    for other in ("transformers lookup", "transformers plain", "hsd plain"):
        if other in r["runs"]:
            ratios[f"hsd lookup / {other}"] = {"ratio": cost_model.speedup(r["runs"]["hsd lookup"], r["runs"][other]),
                                               "ci": cost_model.speedup_ci(r["runs"]["hsd lookup"], r["runs"][other])}
    return {"labels": rows, "ratios": ratios}


def lookup_lines(name, r, summary, new_tokens):
    turns = len(next(iter(r["runs"].values()))[0])
    kind = "input-grounded " if r["prompt_kind"] == "grounded" else ""
    yield (f"{name}: {len(r['prompts'])} {kind}test prompts, {new_tokens} new tokens, {turns} turn"
           f"{'s' * (turns != 1)}, greedy; hsd --draft {r['draft']} against transformers' prompt_lookup_num_tokens="
           f"{r['hf_tokens']}; each run timed whole (prefill included); {machine_words(r['machine'])}")
    if r["refused"]:
        yield f"transformers refused prompt lookup on this model: {r['refused']}"
    for label, x in summary["labels"].items():
        parts = "" if x["first_parting_token"] is None else f" (first parts at new token {x['first_parting_token']})"
        yield (f"{label:20} {x['tokens_per_s']:8.2f} tok/s; plain greedy decoding's tokens on {x['greedy_prompts']} "
               f"of {len(r['prompts'])} prompts{parts}")
    for what, x in summary["ratios"].items():
        yield f"{what:36} {x['ratio']:.3f}x [{x['ci'][0]:.3f}, {x['ci'][1]:.3f}]"
    yield from warning_lines(r["machine"])


# --- What each part costs (--units), and the cost against the context -----------------------------------------------
def bench_model(name):
    """A model to time: an official configuration with random weights (speed does not depend on the weight values),
    or a trained toy."""
    if name in models.OFFICIAL_CONFIGS:
        config = models.config_from_hf(models.OFFICIAL_CONFIGS[name])
        return models.init_random(models.Model(config)).eval().requires_grad_(False)
    return models.load(name)


def unit_costs(name, context=256, turns=7):
    """What leaving out each kind of part (a whole layer, or a unit) saves per decoding step on this machine
    (cost_model.part_skips, one measure_costs), and c of each paper draft with the per-token acceptance it would need
    for S > 1. Returns (the parts' Costs, {(field, layer type): saved per layer}, the paper drafts' Costs, the
    machine)."""
    model = bench_model(name)
    cost_model.warm_up(model, hsd.AUTO_MAX)
    kinds = cost_model.part_kinds(model.config)
    parts = cost_model.measure_costs(model, cost_model.part_skips(model.config), context, turns, hsd.AUTO_MAX,
                                     passes=hsd.PASSES)
    saves = {kind: (1 - parts.c[kind]) / len(layers) for kind, layers in kinds.items()}
    paper = cost_model.measure_costs(model, drafts.paper_skips(model.config), context, turns, 8, passes=hsd.PASSES)
    return parts, saves, paper, cost_model.machine_state(model, "float32")


def unit_lines(name, parts, saves, paper, machine):
    yield f"{name}: full step {parts.step_s * 1e3:.1f} ms at {parts.context} tokens; {machine_words(machine)}"
    yield "one unit left out saves: " + ", ".join(f"{field} of a {layer_type} layer {s:.1%}"
                                                  for (field, layer_type), s in saves.items())
    yield ("v (verify of d+1 tokens): " + ", ".join(f"d={d} {parts.v[d]:.2f}" for d in (1, 2, 4, 8, 16)) +
           f"; r (a round's own work) {parts.r:.2f}")
    for draft, c in paper.c.items():
        yield f"{draft:10} c {c:.2f}; per-token acceptance needed for S > 1: " + ", ".join(
            f"k={k} {'never' if p is None else f'{p:.2f}'}"
            for k, p in ((k, cost_model.break_even_acceptance(c, paper.v[k], k, paper.r)) for k in (1, 2, 4, 8)))
    yield from warning_lines(machine)


SWEEP_KS = (2, 4, 8)                                     # --context-sweep's k


def lookup_cost(model, context, step_s, repeats=7):
    """What the lookup costs a round at a context, in full steps (step_s: a plain step's seconds there), for each k of
    SWEEP_KS, as generation runs it: bringing the n-gram index up to the k + 1 tokens a round commits at most
    (hsd.index_ngrams), then the proposal (hsd.lookup with the index); the median of `repeats` over step_s. The
    tokens are random ids, among which the suffix is rarely found: every n-gram size is tried."""
    n = hsd.choose_draft(model, "lookup").lookup
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(model.config.vocab_size, (context + max(SWEEP_KS) + 1,), generator=generator)
    cost = {}
    for k in SWEEP_KS:
        tokens, index = ids[:context + k + 1].tolist(), {}
        hsd.index_ngrams(index, tokens[:context], n)                # the context indexed by the rounds before

        def round_lookup():                                         # updating an index for tokens it holds rewrites
            hsd.index_ngrams(index, tokens, n, context)             # the same entries: each repeat does the same
            hsd.lookup(tokens, n, k, index, least=hsd.LOOKUP_LEAST)
        cost[k] = statistics.median(seconds(round_lookup) for _ in range(repeats)) / step_s
    return cost


def context_sweep(name, turns=7, temperature=0.0, out=None):
    """c, v and the predicted speedup of the paper's drafts at every context of CONTEXTS the model's context allows,
    and the lookup's cost there: ({context: Costs}, {context: lookup_cost}, the machine); the speedups (sweep_rows) use
    the paper's acceptance (cost_model.PAPER) for the official models, labelled as such, and the acceptance each k
    needs to pay off for every model and draft. With out (a path), each context is saved there as it ends
    (sweep_json, "complete": false until the last), and the same command resumes from it: a context saved by a sweep
    of the same model, turns and temperature is not measured again (an official model's sweep runs half an hour and
    more on this CPU)."""
    model = bench_model(name)
    cost_model.warm_up(model, 8)
    contexts = [L for L in CONTEXTS if L + 8 + 2 <= model.config.max_position_embeddings]
    sweep, lookup = saved_contexts(out, name, turns, temperature)
    machine = cost_model.machine_state(model, "float32")
    if sweep:
        print(f"hsd_bench: resuming from {out}: contexts {', '.join(map(str, sweep))} are saved there",
              file=sys.stderr)
    for L in tqdm(contexts, desc="contexts", file=sys.stderr, initial=len(sweep)):
        if L in sweep:
            continue
        sweep[L] = cost_model.measure_costs(model, drafts.paper_skips(model.config), L, turns, 8, temperature,
                                            passes=hsd.PASSES)
        lookup[L] = lookup_cost(model, L, sweep[L].step_s, turns)
        if out:
            cost_model.write_json(out, sweep_json(name, sweep, lookup, machine, complete=False))
    return {L: sweep[L] for L in contexts}, {L: lookup[L] for L in contexts}, machine


def sweep_json(name, sweep, lookup, machine, complete=True):
    """What --context-sweep saves (--out) and prints (--json): the machine, its warnings, the rows (sweep_rows) and the
    raw costs and lookup costs per context; "complete" false while a sweep is under way (context_sweep resumes it)."""
    warned = [w[9:] for w in warning_lines(machine)]
    return {"model": name, "machine": machine, "warnings": warned, "unreliable": bool(warned), "complete": complete,
            "rows": sweep_rows(name, sweep, lookup),
            "costs": {str(L): costs._asdict() for L, costs in sweep.items()},
            "lookup_cost": {str(L): each for L, each in lookup.items()}}


def saved_contexts(out, name, turns, temperature):
    """The contexts a sweep saved in out (sweep_json) with the same model, turns and temperature: ({context: Costs},
    {context: {k: lookup cost}}); nothing if there is no such file or it is another sweep's."""
    if not out:
        return {}, {}
    try:
        with open(out, encoding="utf-8") as f:
            saved = json.load(f)
    except (OSError, ValueError):                                     # no file yet, a damaged file
        return {}, {}
    if not isinstance(saved, dict) or saved.get("model") != name:
        return {}, {}
    sweep, lookup = {}, {}
    for L, each in saved.get("costs", {}).items():
        if each.get("turns") == turns and each.get("temperature") == temperature and L in saved.get("lookup_cost", {}):
            noise = {**each["noise"], "v": {int(d): x for d, x in each["noise"].get("v", {}).items()}}   # JSON's keys
            sweep[int(L)] = cost_model.Costs(**{**each, "noise": noise})
            lookup[int(L)] = {int(k): cost for k, cost in saved["lookup_cost"][L].items()}
    return sweep, lookup


def paper_column(temperature):
    """The column of cost_model.PAPER at a temperature: "greedy" at 0, "T=0.6" at the paper's T."""
    return "greedy" if temperature == 0 else f"T={temperature:g}"


def sweep_rows(name, sweep, lookup=None):
    """Per context, draft and k in SWEEP_KS: c, v[k], the break-even acceptance, and where the paper reports an
    acceptance for this model at the costs' temperature (single round, greedy or T=0.6: alpha, so that a round keeps
    alpha k drafts), the speedup it predicts. lookup ({context: lookup_cost}): the lookup's rows too, its c the
    proposal's cost over the k drafts it proposes (a round of the lookup costs k c + v[k], as any draft's), its v the
    full model's verify pass, as every draft's."""
    paper = cost_model.PAPER.get(name, {})
    rows = []
    for L, costs in sweep.items():
        column = paper_column(costs.temperature)
        for k in SWEEP_KS if lookup else ():
            c = lookup[L][k] / k
            rows.append({"context": L, "draft": "lookup", "k": k, "c": c, "v": costs.v[k], "r": costs.r,
                         "noise_c": None,
                         "break_even_acceptance": cost_model.break_even_acceptance(c, costs.v[k], k, costs.r),
                         "paper_alpha": None, "predicted_speedup_at_paper_alpha": None})
        for draft, c in costs.c.items():
            for k in SWEEP_KS:
                alpha = paper.get(draft, {}).get(column, {}).get(k, (None,))[0]
                rows.append({"context": L, "draft": draft, "k": k, "c": c, "v": costs.v[k], "r": costs.r,
                             "noise_c": costs.noise["c"][draft],
                             "break_even_acceptance": cost_model.break_even_acceptance(c, costs.v[k], k, costs.r),
                             "paper_alpha": alpha, "predicted_speedup_at_paper_alpha": None if alpha is None else
                             cost_model.predicted_speedup(1 + alpha * k, [k], c, costs.v, costs.r)})
    return rows


def sweep_lines(name, sweep, rows, machine):
    T = next(iter(sweep.values())).temperature
    yield f"{name}: c, v and the predicted speedup against the context, at T={T}; {machine_words(machine)}"
    yield (f"predicted: at the paper's single-round acceptance ({paper_column(T)}) for this model (cost_model.PAPER), "
           "where it gives one" if name in cost_model.PAPER else
           "no paper acceptance for this model: the acceptance each k needs")
    yield (f"{'context':>7} {'step ms':>8} {'draft':10} {'k':>2} {'c':>5} {'v[k]':>5} {'r':>5} {'needs':>6} "
           f"{'paper a':>8} {'predicted':>9}")
    if any(r["draft"] == "lookup" for r in rows):
        yield ("lookup: c is its time a round (the n-gram index brought up to the round's tokens, then the "
               "proposal) over the k drafts it proposes; v the full model's verify pass, as every draft's")
    for r in rows:
        needs = "never" if r["break_even_acceptance"] is None else f"{r['break_even_acceptance']:.2f}"
        predicted = "" if r["paper_alpha"] is None else f"{r['predicted_speedup_at_paper_alpha']:8.3f}x"
        paper = "" if r["paper_alpha"] is None else f"{r['paper_alpha']:.3f}"
        yield (f"{r['context']:7d} {sweep[r['context']].step_s * 1e3:8.2f} {r['draft']:10} {r['k']:2d} {r['c']:5.2f} "
               f"{r['v']:5.2f} {r['r']:5.2f} {needs:>6} {paper:>8} {predicted:>9}")
    yield from warning_lines(machine)


# --- Command line ---------------------------------------------------------------------------------------------------
# --- A busy machine: torch's threads, OpenMP's wait policy and one other busy core ----------------------------------
BUSY_SETTINGS = ("default", "passive", "1-thread")   # torch's default threads; OMP_WAIT_POLICY=PASSIVE; --threads 1
BUSY_PROMPTS = ("The function returns", "A list is a sequence of", "If the file does not exist,")


def busy_child(name, setting):
    """One measurement of --busy, in a process started with the setting's environment: plain decoding's ms per token
    (48 new tokens of each of BUSY_PROMPTS) and the README demo's ms per round (the paper's draft, k=3, 24 tokens,
    two runs), printed as one JSON line."""
    if setting == "1-thread":
        torch.set_num_threads(1)
    model, tokenizer = models.load(name), models.load_tokenizer(name)
    hsd.generate(model, tokenizer.encode(BUSY_PROMPTS[0]).ids, 8, draft="none")                 # warm-up, not timed
    plain = [hsd.generate(model, tokenizer.encode(p).ids, 48, draft="none")[1] for p in BUSY_PROMPTS]
    demo = [hsd.generate(model, tokenizer.encode(BUSY_PROMPTS[0]).ids, 24, k=3)[1] for _ in range(2)]
    print(json.dumps({"plain_ms_per_token": statistics.median(s["decode_s"] / s["new_tokens"] * 1e3 for s in plain),
                      "demo_ms_per_round": statistics.median(s["round_s"] / s["rounds"] * 1e3 for s in demo),
                      "threads": torch.get_num_threads(), "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY")}))


def busy_measurement(name, setting, busy):
    """busy_child in a fresh process (OpenMP reads its wait policy once, when torch loads), a second process spinning
    in pure Python beside it when busy: the child's numbers."""
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS")}
    if setting == "passive":
        env["OMP_WAIT_POLICY"] = "PASSIVE"
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if busy else None
    try:
        if spinner:
            time.sleep(0.5)                                           # let it take its core
        done = subprocess.run([sys.executable, os.path.abspath(__file__), name, "--busy-child", setting], env=env,
                              capture_output=True, text=True)
    finally:
        if spinner:
            spinner.kill()
            spinner.wait()
    if done.returncode != 0:
        raise models.UsageError(f"the {setting} measurement failed: {done.stderr.strip().splitlines()[-1:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def busy_study(name, repeats=4):
    """--busy: plain decoding and the README demo under each of BUSY_SETTINGS, idle and with one other core busy,
    each a fresh process, the six interleaved, `repeats` times -> {"setting/load": {quantity: (median, min, max)}}."""
    runs, plan = {}, [(s, busy) for busy in (False, True) for s in BUSY_SETTINGS]
    with tqdm(total=repeats * len(plan), desc="--busy: measurements (fresh processes)", file=sys.stderr) as bar:
        for _ in range(repeats):
            for setting, busy in plan:
                runs.setdefault(f"{setting}/{'busy' if busy else 'idle'}", []).append(
                    busy_measurement(name, setting, busy))
                bar.update(1)
    return {key: {q: (statistics.median(r[q] for r in rows), min(r[q] for r in rows), max(r[q] for r in rows))
                  for q in ("plain_ms_per_token", "demo_ms_per_round")} | {"threads": rows[0]["threads"]}
            for key, rows in runs.items()}


def busy_lines(name, study):
    yield f"{name}, fp32: median (min-max) over the repeats, each in a fresh process"
    yield f"{'configuration':18} {'threads':>7}  {'plain decoding, ms per token':>30}  {'demo, ms per round':>26}"
    for key, row in study.items():
        cells = [f"{m:.2f} ({lo:.2f}-{hi:.2f})" for m, lo, hi in (row["plain_ms_per_token"], row["demo_ms_per_round"])]
        yield f"{key:18} {row['threads']:>7}  {cells[0]:>30}  {cells[1]:>26}"


def main(argv=None):
    p = argparse.ArgumentParser(description="hsd against transformers, and the cost of speculation; with --units, what "
                                            "each unit costs; with --drafts, drafts side by side end to end on the "
                                            "test prompts; with --context-sweep, c, v and the predicted speedup "
                                            "against the context.")
    p.error = lambda message: p.exit(2, f"hsd_bench: error: {message} (see --help)\n")
    p.add_argument("--model", help=f"{', '.join([*models.OFFICIAL_CONFIGS, *models.TOYS])}: an official configuration "
                                   "(random weights), or a trained toy (--units, --drafts, --context-sweep); it may "
                                   "also come first, without --model")
    p.add_argument("name", nargs="?", metavar="MODEL", help="the model, as --model names it")
    p.add_argument("--tokens", type=int, default=32, help="new tokens of a decoding run (default: 32; --drafts: 64, "
                                                        "e.g. --tokens 48 --repeats 2 for a shorter run)")
    p.add_argument("--repeats", type=int, default=3, help="alternating runs of each side; --drafts: turns over the "
                                                          "test prompts (default: 3)")
    p.add_argument("--cost-repeats", type=int, default=11, help="turns of each kind of step for c and v (default: 11)")
    p.add_argument("--units", action="store_true", help="what leaving out each kind of unit saves, and the acceptance "
                                                       "the paper's drafts need to pay off")
    p.add_argument("--drafts", nargs="*", metavar="DRAFT", help="plain decoding, the paper's drafts and these drafts "
                   "(draft files, or drafts from the text: lookup, lookup+component, ...) end to end on the test "
                   f"prompts (a toy), greedy and at T={PAPER_T}")
    p.add_argument("--prompts", choices=PROMPT_KINDS, default="plain", help="with --drafts or --transformers-lookup: "
                   "the test paragraphs' first 64 tokens (plain), or input-grounded prompts: a passage, a newline, "
                   "then its first 30-40 characters (grounded) (default: plain)")
    p.add_argument("--transformers-lookup", nargs="?", const="lookup", metavar="DRAFT", help="on a toy: hsd's lookup "
                   "(or DRAFT, e.g. lookup+component) against transformers' prompt lookup on the test prompts, greedy: "
                   "whether the tokens are plain greedy decoding's, and tokens per second")
    p.add_argument("--ks", default=",".join(map(str, PAPER_KS)), help="with --drafts: the fixed k of the paper's "
                   "drafts, e.g. 1,2,4,8 (default: 1,...,8); greedy runs them all, T=0.6 only the best greedy k of "
                   "each draft and its neighbours (all of them if 3 or fewer)")
    p.add_argument("--context-sweep", action="store_true", help="c, v and the predicted speedup of the paper's drafts "
                                                               f"at {', '.join(map(str, CONTEXTS))} tokens (as far as "
                                                               "the model's context allows)")
    p.add_argument("--context", type=int, default=256, help="with --units: the tokens in the cache (default: 256)")
    p.add_argument("--temperature", type=float, default=0.0, help="with --context-sweep: the costs of a round sampled "
                                                                   f"at this temperature (the paper's: {PAPER_T}; "
                                                                   "default: 0, greedy)")
    p.add_argument("--busy", action="store_true", help="on a toy: plain decoding and the README demo with torch's "
                   "default threads, OMP_WAIT_POLICY=PASSIVE and 1 thread, idle and with one other core busy (fresh "
                   "processes; a few minutes)")
    p.add_argument("--busy-child", choices=BUSY_SETTINGS, help=argparse.SUPPRESS)
    p.add_argument("--threads", type=int, help="torch's threads (default: torch's choice)")
    p.add_argument("--out", help="with --drafts or --context-sweep: save the numbers, and --drafts' raw per-prompt "
                                 "runs, to this JSON file (a --context-sweep resumes from it)")
    p.add_argument("--json", action="store_true", help="with --drafts, --units or --context-sweep: the numbers as one "
                                                       "JSON line: stdout holds it alone, the table goes to stderr")
    misspelt = cli.misspelt_option(p, sys.argv[1:] if argv is None else argv)
    if misspelt:
        p.error(misspelt)
    args = p.parse_args(argv)
    if args.name and args.model and args.name != args.model:
        p.error(f"two models, {args.name} and --model {args.model}: give one")
    args.model, names = args.model or args.name, [*models.OFFICIAL_CONFIGS, *models.TOYS]
    if args.model not in names:
        close = difflib.get_close_matches(args.model or "", names, n=1)
        p.error((f"unknown model {args.model!r}: " if args.model else "give --model NAME: ")
                + (f"did you mean {close[0]}? " if close else "") + f"one of {', '.join(names)}")
    if args.threads is not None:
        if args.threads < 1:
            p.error(f"--threads must be at least 1 (got {args.threads})")
        torch.set_num_threads(args.threads)
    if min(args.tokens, args.repeats, args.cost_repeats, args.context) < 1:
        p.error("--tokens, --repeats, --cost-repeats and --context must be at least 1")
    if not 0 <= args.temperature < float("inf"):                      # NaN too
        p.error(f"--temperature must be 0 (greedy) or a finite temperature above it (got {args.temperature})")
    table = sys.stderr if args.json else sys.stdout                 # --json: stdout holds the JSON alone
    try:
        if args.ks != p.get_default("ks") and args.drafts is None:
            p.error("--ks goes with --drafts (the fixed k of the paper's drafts in the results table)")
        ks = parse_ks(args.ks)
        if args.out:
            cost_model.check_writable(args.out, "--out")
        if args.busy_child:
            busy_child(args.model, args.busy_child)
            return 0
        if not args.busy:                         # --busy studies a busy machine: it makes one of its own
            warn_if_busy()
        if args.busy:
            if args.model not in models.TOYS:
                p.error("--busy runs on a trained toy: give toy-falcon-h1, toy-qwen3.5 or toy-qwen2.5")
            study = busy_study(args.model, args.repeats if args.repeats != p.get_default("repeats") else 4)
            print(*busy_lines(args.model, study), sep="\n")
            if args.out:
                cost_model.write_json(args.out, {"model": args.model, "date": time.strftime("%Y-%m-%d"), "study": study})
            return 0
        if args.prompts != p.get_default("prompts") and args.drafts is None and not args.transformers_lookup:
            p.error("--prompts goes with --drafts or --transformers-lookup (the prompts they run)")
        if args.transformers_lookup:
            if args.model not in models.TOYS:
                p.error("--transformers-lookup runs on a trained toy (its held-out text): give toy-falcon-h1, "
                        "toy-qwen3.5 or toy-qwen2.5")
            try:
                import transformers
            except ImportError:
                p.exit(2, "hsd_bench: error: --transformers-lookup needs transformers: pip install "
                          "transformers==5.23.0\n")
            tokens = 64 if args.tokens == p.get_default("tokens") else args.tokens
            r = transformers_lookup(args.model, args.prompts, tokens, args.repeats, draft=args.transformers_lookup)
            summed = lookup_comparison(r)
            print(*lookup_lines(args.model, r, summed, tokens), sep="\n")
            saved = {"model": args.model, "new_tokens": tokens, **{key: r[key] for key in r if key != "runs"},
                     "warnings": [w[9:] for w in warning_lines(r["machine"])], **summed, "runs": r["runs"]}
            if args.out:
                cost_model.write_json(args.out, saved)
            if args.json:
                print(json.dumps({key: value for key, value in saved.items() if key != "runs"}))
            return 0
        if args.drafts is not None:
            if args.model not in models.TOYS:
                p.error("--drafts runs on a trained toy (its held-out text): give toy-falcon-h1, toy-qwen3.5 or "
                        "toy-qwen2.5")
            tokens = 64 if args.tokens == p.get_default("tokens") else args.tokens
            r = drafts_side_by_side(args.model, args.drafts, new_tokens=tokens, turns=args.repeats, ks=ks,
                                    out=args.out, prompt_kind=args.prompts)    # saves to --out after each temperature
            print(*side_by_side_lines(args.model, r, tokens), sep="\n", file=table)
            saved = side_by_side_json(args.model, r, tokens)
            if args.json:
                print(json.dumps({key: value for key, value in saved.items() if key != "runs"}))
            return 0
        if args.context_sweep:
            sweep, lookup, machine = context_sweep(args.model, args.cost_repeats, args.temperature, args.out)
            saved = sweep_json(args.model, sweep, lookup, machine)
            print(*sweep_lines(args.model, sweep, saved["rows"], machine), sep="\n", file=table)
            if args.out:
                cost_model.write_json(args.out, saved)
            if args.json:
                print(json.dumps(saved))
            return 0
        if args.units:
            parts, saves, paper, machine = unit_costs(args.model, context=args.context, turns=args.cost_repeats)
            print(*unit_lines(args.model, parts, saves, paper, machine), sep="\n", file=table)
            if args.json:
                print(json.dumps({"model": args.model, "machine": machine, "warnings": [
                                  w[9:] for w in warning_lines(machine)], "step_s": parts.step_s, "v": parts.v,
                                  "saves": {f"{u} of a {t} layer": s for (u, t), s in saves.items()},
                                  "r": parts.r, "drafts": {draft: {"c": c, "break_even": {
                                      k: cost_model.break_even_acceptance(c, paper.v[k], k, paper.r)
                                      for k in (1, 2, 4, 8)}} for draft, c in paper.c.items()}}))
            return 0
        if args.model not in models.OFFICIAL_CONFIGS:
            p.error("the comparison with transformers runs on an official configuration: "
                    + ", ".join(models.OFFICIAL_CONFIGS))
        try:
            import transformers  # noqa: F401
        except ImportError:
            p.exit(2, "hsd_bench: error: the benchmark compares with transformers: pip install transformers==5.23.0\n")
        bench(args.model, new_tokens=args.tokens, repeats=args.repeats, cost_repeats=args.cost_repeats)
    except models.UsageError as e:
        print(f"hsd_bench: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        kept = (f" ({args.out} holds each temperature measured to its end)" if args.out and args.drafts is not None
                else f" ({args.out} holds each context measured to its end: run the same command again to resume)"
                if args.out and args.context_sweep else "")
        print(f"\nhsd_bench: interrupted{kept}", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)     # output piped into `head` and the like: stop quietly
    sys.exit(main())

"""hsd_bench: hsd against transformers, and what speculation costs, on random weights of the real configurations.

  python hsd_bench.py falcon-h1-0.5b [--repeats 5]      # about 5 minutes on 2 CPU cores (RESULTS.md, "Speed")

Speed does not depend on the weight values, so random weights of an official config.json (models.OFFICIAL_CONFIGS) saved
once in the official layout, serve both sides: transformers (the official implementation; this benchmark, like the
tests, needs `pip install transformers==5.23.0`) and hsd load the same file. Runs alternate between the two and
medians are reported; every ratio printed is of numbers measured in this process. Besides tokens per second it prints
the operations of a decoding step and of verify passes (counted as the innermost PyTorch operations, roughly the
kernels a GPU would launch), c and v of the cost model, and decoding against the machine's memory-bandwidth limit.
"""
import argparse
import json
import os
import signal
import statistics
import sys
import tempfile
import time

import torch
from huggingface_hub.utils import tqdm

import cost_model
import hsd
import hsd_eval
import models



# --- Operations -------------------------------------------------------------------------------------------------
# Operations that only describe a tensor (views, reshapes, dtype no-ops, type queries): no kernel on a GPU.
DESCRIBE_ONLY = {
    "aten::view", "aten::as_strided", "aten::select", "aten::slice", "aten::expand", "aten::unsqueeze", "aten::reshape",
    "aten::split", "aten::narrow", "aten::t", "aten::transpose", "aten::permute", "aten::_unsafe_view", "aten::detach",
    "aten::lift", "aten::lift_fresh", "aten::empty", "aten::empty_strided", "aten::squeeze", "aten::alias",
    "aten::unbind", "aten::_reshape_alias", "aten::chunk", "aten::split_with_sizes", "aten::contiguous", "aten::to",
    "aten::result_type", "aten::promote_types", "aten::resolve_conj", "aten::resolve_neg", "aten::flatten",
    "aten::expand_as", "aten::view_as", "aten::_to_copy"}


def count_ops(fn):
    """The innermost PyTorch operations that fn() issues (an operation that calls others counts as its children),
    leaving out those that only describe a tensor: roughly the kernels a GPU would launch."""
    with torch.inference_mode(), torch.profiler.profile() as prof:
        fn()
    return sum(1 for e in prof.events() if not e.cpu_children and e.name not in DESCRIBE_ONLY
               and e.name.startswith(("aten::", "mkldnn::")))


def ops_per_pass(model, ks, context=64):
    """Operations of one decoding step, and of a verify pass of k+1 tokens for each k, after a prefill of context tokens
    (the counts do not depend on the context or on the weight values)."""
    cache = models.Cache(model, context + max(ks) + 2)
    hsd.prefill(model, cache, list(range(1, context + 1)))
    snap, token = hsd.snapshot(cache), torch.tensor([[1]])

    def counted(step):
        n = count_ops(step)
        hsd.restore(cache, snap)
        return n
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
    draft = "layerskip" if ours.config.family == "qwen2" else "component"
    torch.manual_seed(0)
    ids = torch.randint(0, 1000, (1, prompt_len))
    prompt = ids[:, :16]

    def hf_generate(n):
        return hf.generate(prompt, max_new_tokens=n, min_new_tokens=n, do_sample=False)

    def hsd_prefill():                                   # the prompt through a fresh cache, the last row's logits
        return ours.logits(ours.hidden_states(ids, models.Cache(ours, prompt_len))[:, -1:])

    runs = {"hf decode": [], "hsd decode": [], "hf prefill": [], "hsd prefill": [], "spec": []}
    with torch.inference_mode():
        hf_generate(2), hsd.generate(ours, prompt[0], 2, draft="none")                       # warm up
        for _ in range(repeats):
            # transformers: generate n tokens minus generate 1 token = n - 1 decoding steps
            hf_steps = seconds(lambda: hf_generate(new_tokens)) - seconds(lambda: hf_generate(1))
            runs["hf decode"].append((new_tokens - 1) / hf_steps)
            plain = hsd.generate(ours, prompt[0], new_tokens, draft="none")[1]
            runs["hsd decode"].append(new_tokens / plain["decode_s"])
            runs["hf prefill"].append(seconds(lambda: hf(ids, logits_to_keep=1)))
            runs["hsd prefill"].append(seconds(hsd_prefill))
            runs["spec"].append(hsd.generate(ours, prompt[0], new_tokens, draft=draft, k=k)[1])
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
        del hf, cache                                                 # memory for the measurements below
        ks = (2, 4, 8)
        step_ops, verify_ops = ops_per_pass(ours, ks)
        skips = hsd_eval.drafts_of(ours.config)
        times = hsd_eval.step_times(ours, skips, ks, context, repeats=cost_repeats)
        bandwidth = memory_bandwidth()
    med = {key: statistics.median(v) for key, v in runs.items() if key != "spec"}
    round_s = statistics.median(s["decode_s"] / s["rounds"] for s in runs["spec"])
    weight_bytes = weight_bytes_per_token(ours)
    print(f"{name}, random weights, fp32, CPU ({torch.get_num_threads()} threads), {repeats} alternating runs, medians")
    print(f"decode  {new_tokens} tokens: hsd {med['hsd decode']:.2f} tok/s, transformers {med['hf decode']:.2f} tok/s "
          f"-> {med['hsd decode'] / med['hf decode']:.2f}x   (runs: hsd {[round(x, 2) for x in runs['hsd decode']]}, "
          f"transformers {[round(x, 2) for x in runs['hf decode']]})")
    print(f"prefill {prompt_len} tokens: hsd {med['hsd prefill']:.2f} s, transformers {med['hf prefill']:.2f} s "
          f"-> {med['hf prefill'] / med['hsd prefill']:.2f}x")
    print(f"speculative, {draft} draft, k={k}: round {round_s * 1e3:.1f} ms; snapshot+restore {t_snap * 1e6:.1f} us, "
          f"accept+commit {statistics.median(t_commit) * 1e6:.1f} us: "
          f"{(t_snap + statistics.median(t_commit)) / round_s:.2%} of a round")
    print(f"ops     decoding step {step_ops}; verify pass " + ", ".join(
        f"k={k} {n} ({n / step_ops:.2f}x)" for k, n in verify_ops.items()) +
        f"; from k=2 to k=8 +{(verify_ops[8] - verify_ops[2]) / step_ops:.0%} of a step   (innermost PyTorch "
        "operations)")
    print(f"cost    at {context} tokens, medians of {cost_repeats} interleaved runs: full step "
          f"{times['full'] * 1e3:.1f} ms; "
          "c: " + ", ".join(f"{d} {times[d] / times['full']:.2f}" for d in skips) + "; v: " +
          ", ".join(f"k={k} {times[k] / times['full']:.2f}" for k in ks))
    limit = bandwidth / weight_bytes
    print(f"memory  {weight_bytes / 1e9:.2f} GB of weights read per token; memory read at {bandwidth / 1e9:.1f} GB/s "
          "(a sum "
          f"over 1 GiB) bounds decoding at {limit:.1f} tok/s: hsd decodes at {med['hsd decode'] / limit:.0%} of it, "
          f"transformers at {med['hf decode'] / limit:.0%}")


# --- Drafts side by side, end to end (the results table), and what each unit costs ---------------------------------
def bench_row(rates, plain_rates, runs, c, v):
    """A row of the results table: what the generations measured (hsd_search.measured_row), c, and the cost model's
    prediction from the very rounds the row ran: tokens / (sum over its rounds of d c + v[d], plus its plain steps)."""
    import hsd_search
    row = hsd_search.measured_row(rates, plain_rates, runs)
    made = sum(s["new_tokens"] for _, s in runs)
    cost = sum(len(r.drafts) * c + v[len(r.drafts)] for _, s in runs for r in s["trace"]) + row["plain_steps"]
    return {**row, "c": c, "predicted_speedup": made / cost}


def drafts_side_by_side(name, files, new_tokens=64, repeats=3, temperature=0.6, seed=0):
    """Plain decoding against the paper's drafts at every fixed k in 1..8 and with k="auto", and against each draft
    file (as the file says, at its best fixed k, and with k="auto"), end to end on the held-out prompts hsd_search
    confirms on (the last paragraphs of the model's text), in turns in one process; greedy, then at a temperature
    (the best fixed paper row, the auto rows and the files). Returns ({(label, temperature): bench_row}, costs, the
    best fixed paper row)."""
    import hsd_search
    model, tokenizer = models.load(name), models.load_tokenizer(name)
    prompts = hsd_search.calibration_texts(hsd_eval.read_lines(None, name), tokenizer, 0, 64, new_tokens, 8, 8).confirm
    context = 64 + new_tokens // 2
    costs = hsd_search.measure_costs(model, context, 7 * repeats)
    paper = hsd_eval.drafts_of(model.config)
    rows = {f"{d}, k={k}": hsd.Draft(d, skip, k, None) for d, skip in paper.items() for k in range(1, 9)}
    rows |= {f"{d}, k=auto": hsd.choose_draft(model, d, "auto") for d in paper}
    for path in files:
        drafted, _ = hsd.read_draft_file(path, model)
        with open(path, encoding="utf-8") as f:
            fixed = json.load(f).get("found_by", {}).get("best_fixed")
        rows[path] = drafted
        if fixed and (fixed["k"], fixed["stop"]) != (drafted.k, drafted.stop):
            rows[f"{path}, k={fixed['k']}"] = drafted._replace(k=fixed["k"], stop=fixed["stop"])
        if drafted.k != "auto":
            rows[f"{path}, k=auto"] = drafted._replace(k="auto")
    hsd.warm_up(model, max(hsd.AUTO_MAX, *(d.k for d in rows.values() if d.k != "auto")))
    c = {}
    for draft in rows.values():
        if repr(draft.skip) not in c:
            c[repr(draft.skip)] = hsd_search.measured_cost(model, draft.skip, context, 7 * repeats)
    results = {}
    with tqdm(total=len(prompts) * repeats, desc=f"greedy, {len(rows) + 1} rows (prompts)", file=sys.stderr) as bar:
        greedy = hsd_search.generations_in_turns(model, prompts, rows, new_tokens, repeats, progress=bar)
    for label, draft in rows.items():
        results[label, 0.0] = bench_row(greedy[label][0], greedy["plain"][0], greedy[label][1], c[repr(draft.skip)],
                                        costs.v)
    fixed_paper = [label for label in rows if label.split(", k=")[0] in paper and not label.endswith("auto")]
    best = max(fixed_paper, key=lambda label: results[label, 0.0]["speedup"])
    sampled_rows = {label: d for label, d in rows.items() if label == best or label not in fixed_paper}
    with tqdm(total=len(prompts) * repeats, desc=f"T={temperature}, {len(sampled_rows) + 1} rows (prompts)",
              file=sys.stderr) as bar:
        sampled = hsd_search.generations_in_turns(model, prompts, sampled_rows, new_tokens, repeats, temperature, seed,
                                                  bar)
    for label, draft in sampled_rows.items():
        results[label, temperature] = bench_row(sampled[label][0], sampled["plain"][0], sampled[label][1],
                                                c[repr(draft.skip)], costs.v)
    return results, costs, best


def unit_costs(name, context=256, repeats=7):
    """What leaving out each kind of unit saves per decoding step on this machine, for a model built from its official
    configuration with random weights (speed does not depend on the weight values), and the acceptance each paper
    draft would need for S > 1. Returns (costs, {draft: (c, {k: break-even acceptance})})."""
    import hsd_search
    official = models.OFFICIAL_CONFIGS
    config = models.config_from_hf(official[name]) if name in official else models.load(name).config
    model = models.init_random(models.Model(config)).eval().requires_grad_(False) if name in official \
        else models.load(name)
    hsd.warm_up(model, hsd.AUTO_MAX)
    costs = hsd_search.measure_costs(model, context, repeats)
    drafts = {}
    for draft, skip in hsd_eval.drafts_of(config).items():
        c = hsd_search.measured_cost(model, skip, context, repeats)
        drafts[draft] = (c, {k: cost_model.break_even_acceptance(c, costs.v[k], k) for k in (1, 2, 4, 8)})
    return costs, drafts


def print_side_by_side(name, results, costs, best):
    print(f"{name}, CPU ({torch.get_num_threads()} threads), fp32; full step {costs.step * 1e3:.2f} ms at "
          f"{costs.context} tokens; best fixed paper row: {best}")
    print(f"{'row':52} {'T':>4} {'speedup':>8} {'turns':>17} {'alpha':>6} {'acc/rnd':>7} {'drf/rnd':>7} {'plain':>5} "
          f"{'c':>5} {'predicted':>9}")
    for (label, T), r in results.items():
        print(f"{label[-52:]:52} {T:4.1f} {r['speedup']:7.3f}x {' '.join(f'{x:.2f}' for x in r['ratios']):>17} "
              f"{r['alpha'] or 0:6.3f} {r['accepted_per_round'] or 0:7.2f} {r['drafted_per_round'] or 0:7.2f} "
              f"{r['plain_steps']:5d} {r['c']:5.2f} {r['predicted_speedup'] or 0:8.3f}x")


def print_unit_costs(name, costs, drafts):
    print(f"{name}, random weights, CPU ({torch.get_num_threads()} threads), fp32: full step {costs.step * 1e3:.1f} ms at "
          f"{costs.context} tokens")
    print("one unit left out saves: " + ", ".join(f"{unit} of a {layer_type} layer {s:.1%}"
                                                   for (unit, layer_type), s in costs.saves.items()))
    print("v (verify of d+1 tokens): " + ", ".join(f"d={d} {costs.v[d]:.2f}" for d in (1, 2, 4, 8, 16)))
    for draft, (c, needed) in drafts.items():
        print(f"{draft:10} c {c:.2f}; per-token acceptance needed for S > 1: " + ", ".join(
            f"k={k} {'never' if p is None else f'{p:.2f}'}" for k, p in needed.items()))


def main(argv=None):
    p = argparse.ArgumentParser(description="hsd against transformers, and the cost of speculation; with --units, what "
                                            "each unit costs; with --drafts, drafts side by side end to end.")
    p.error = lambda message: p.exit(2, f"hsd_bench: error: {message} (see --help)\n")
    p.add_argument("model", choices=[*models.OFFICIAL_CONFIGS, *models.TOYS],
                   help="an official configuration (random weights), or a trained toy (--units, --drafts)")
    p.add_argument("--tokens", type=int, default=32, help="new tokens of a decoding run (default: 32)")
    p.add_argument("--repeats", type=int, default=3, help="alternating runs of each side (default: 3)")
    p.add_argument("--cost-repeats", type=int, default=11, help="runs of each kind of step for c and v (default: 11)")
    p.add_argument("--units", action="store_true", help="what leaving out each kind of unit saves, and the acceptance "
                                                       "the paper's drafts need to pay off")
    p.add_argument("--drafts", nargs="*", metavar="FILE", help="plain decoding, the paper's drafts and these draft "
                                                               "files end to end on held-out prompts (a toy)")
    p.add_argument("--context", type=int, default=256, help="with --units: the tokens in the cache (default: 256)")
    p.add_argument("--json", action="store_true", help="with --drafts or --units: the numbers as one JSON line")
    args = p.parse_args(argv)
    try:
        if args.drafts is not None:
            if args.model not in models.TOYS:
                p.error("--drafts runs on a trained toy (its held-out text): give toy-falcon-h1, toy-qwen3.5 or "
                        "toy-qwen2.5")
            results, costs, best = drafts_side_by_side(args.model, args.drafts, repeats=args.repeats)
            print_side_by_side(args.model, results, costs, best)
            if args.json:
                print(json.dumps({"model": args.model, "best_fixed_paper": best, "step_s": costs.step,
                                  "v": costs.v, "rows": [{"row": label, "temperature": T, **r}
                                                         for (label, T), r in results.items()]}))
            return 0
        if args.units:
            costs, drafts = unit_costs(args.model, context=args.context, repeats=args.cost_repeats)
            print_unit_costs(args.model, costs, drafts)
            if args.json:
                print(json.dumps({"model": args.model, "step_s": costs.step, "v": costs.v,
                                  "saves": {f"{u} of a {t} layer": s for (u, t), s in costs.saves.items()},
                                  "drafts": {d: {"c": c, "break_even": needed} for d, (c, needed) in drafts.items()}}))
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
        print("\nhsd_bench: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)     # output piped into `head` and the like: stop quietly
    sys.exit(main())

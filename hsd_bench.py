"""hsd_bench: hsd against transformers, and what speculation costs and measures; on the cost model (cost_model.py).

  python hsd_bench.py falcon-h1-0.5b [--repeats 5]      # hsd against transformers, about 5 minutes on 2 CPU cores
  python hsd_bench.py NAME --units                      # what leaving out each kind of unit saves
  python hsd_bench.py NAME --context-sweep [--out F]    # c, v and the predicted speedup at 64 ... 8,192 tokens
  python hsd_bench.py TOY --drafts FILES [--out F]      # drafts side by side on the test prompts, greedy and T=0.6

Speed does not depend on the weight values, so random weights of an official config.json (OFFICIAL_CONFIGS), saved
once in the official layout, serve both sides: transformers (the official implementation; this benchmark, like the
tests, needs `pip install transformers==5.23.0`) and hsd load the same file. Runs alternate between the two and
medians are reported; every ratio printed is of numbers measured in this process. Besides tokens per second it prints
the operations of a decoding step and of verify passes (counted as the innermost PyTorch operations, roughly the
kernels a GPU would launch), c and v of the cost model, and decoding against the machine's memory-bandwidth limit.
--drafts measures the test set of cost_model.split (never the search's calibration paragraphs), every speedup with a
95% interval over the prompts; every table is printed with the machine's state, and a busy machine is said so.
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
import models

# The official config.json files of the supported models (byte-exact copies of the Hub's files; RESULTS.md, "What the
# tests prove"). The tests build models from them too.
OFFICIAL_CONFIGS = {
    "falcon-h1-0.5b": {
        "architectures": ["FalconH1ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
        "attention_in_multiplier": 1.0, "attention_out_multiplier": 0.9375, "attn_layer_indices": None,
        "bos_token_id": 1, "embedding_multiplier": 5.656854249492381, "eos_token_id": 11, "head_dim": 64,
        "hidden_act": "silu", "hidden_size": 1024, "initializer_range": 0.02, "intermediate_size": 2048,
        "key_multiplier": 0.39062499999999994, "lm_head_multiplier": 0.0390625, "mamba_chunk_size": 128,
        "mamba_conv_bias": True, "mamba_d_conv": 4, "mamba_d_head": 64, "mamba_d_ssm": 1536, "mamba_d_state": 128,
        "mamba_expand": 2, "mamba_n_groups": 1, "mamba_n_heads": 24, "mamba_norm_before_gate": False,
        "mamba_proj_bias": False, "mamba_rms_norm": False, "mamba_use_mlp": True, "max_position_embeddings": 16384,
        "mlp_bias": False, "mlp_expansion_factor": 8, "mlp_multipliers": [0.8838834764831844, 0.5859375],
        "model_type": "falcon_h1", "num_attention_heads": 8, "num_hidden_layers": 36, "num_key_value_heads": 2,
        "num_logits_to_keep": 1, "pad_token_id": 0, "projectors_bias": False, "rms_norm_eps": 1e-05,
        "rope_scaling": None, "rope_theta": 100000000000.0, "ssm_in_multiplier": 1.25,
        "ssm_multipliers": [0.3535533905932738, 0.25, 0.3535533905932738, 0.5, 0.3535533905932738],
        "ssm_out_multiplier": 0.23570226039551587, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
        "transformers_version": "4.52.0.dev0", "use_cache": True, "vocab_size": 32784},
    "qwen3.5-0.8b": {
        "architectures": ["Qwen3_5ForConditionalGeneration"], "image_token_id": 248056, "model_type": "qwen3_5",
        "text_config": {
            "attention_bias": False, "attention_dropout": 0.0, "attn_output_gate": True, "dtype": "bfloat16",
            "eos_token_id": 248044, "full_attention_interval": 4, "head_dim": 256, "hidden_act": "silu",
            "hidden_size": 1024, "initializer_range": 0.02, "intermediate_size": 3584,
            "layer_types": (["linear_attention"] * 3 + ["full_attention"]) * 6, "linear_conv_kernel_dim": 4,
            "linear_key_head_dim": 128, "linear_num_key_heads": 16, "linear_num_value_heads": 16,
            "linear_value_head_dim": 128, "max_position_embeddings": 262144, "mlp_only_layers": [],
            "model_type": "qwen3_5_text", "mtp_num_hidden_layers": 1, "mtp_use_dedicated_embeddings": False,
            "num_attention_heads": 8, "num_hidden_layers": 24, "num_key_value_heads": 2, "rms_norm_eps": 1e-06,
            "tie_word_embeddings": True, "use_cache": True, "vocab_size": 248320, "mamba_ssm_dtype": "float32",
            "rope_parameters": {"mrope_interleaved": True, "mrope_section": [11, 11, 10], "rope_type": "default",
                                "rope_theta": 10000000, "partial_rotary_factor": 0.25}},
        "tie_word_embeddings": True, "transformers_version": "4.57.0.dev0", "video_token_id": 248057,
        "vision_config": {
            "deepstack_visual_indexes": [], "depth": 12, "hidden_act": "gelu_pytorch_tanh", "hidden_size": 768,
            "in_channels": 3, "initializer_range": 0.02, "intermediate_size": 3072, "model_type": "qwen3_5",
            "num_heads": 12, "num_position_embeddings": 2304, "out_hidden_size": 1024, "patch_size": 16,
            "spatial_merge_size": 2, "temporal_patch_size": 2},
        "vision_end_token_id": 248054, "vision_start_token_id": 248053},
    "qwen2.5-0.5b": {
        "architectures": ["Qwen2ForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 151643,
        "eos_token_id": 151643, "hidden_act": "silu", "hidden_size": 896, "initializer_range": 0.02,
        "intermediate_size": 4864, "max_position_embeddings": 32768, "max_window_layers": 24, "model_type": "qwen2",
        "num_attention_heads": 14, "num_hidden_layers": 24, "num_key_value_heads": 2, "rms_norm_eps": 1e-06,
        "rope_theta": 1000000.0, "sliding_window": 32768, "tie_word_embeddings": True, "torch_dtype": "bfloat16",
        "transformers_version": "4.40.1", "use_cache": True, "use_mrope": False, "use_sliding_window": False,
        "vocab_size": 151936},
}


PASSES = cost_model.Passes(hsd.prefill, hsd.snapshot, hsd.restore, hsd.verify)   # what the cost model times
PAPER_T = 0.6                                            # the paper's sampling temperature
CONTEXTS = (64, 128, 256, 512, 1024, 2048, 4096, 8192)   # --context-sweep, as far as each model's context allows


def paper_skips(config):
    """{draft name: models.Skip} of the paper's drafts that apply to the model (a Transformer has no component
    draft)."""
    return {d: hsd.draft_skip(config, d) for d in hsd.DRAFTS
            if d != "none" and (d != "component" or config.family != "qwen2")}


def warning_lines(state):
    """The busy machine's warning (cost_model.busy_warning, by the load average), if it is busy."""
    busy = cost_model.busy_warning(state)
    if busy:
        yield f"warning: {busy}"


def machine_words(state):
    """The machine's state in a few words, printed with every number."""
    threads = f"{state['threads']} thread" + ("s" if state["threads"] != 1 else "")
    return (f"{state['device']}, {threads} of {state['cores']} cores, OMP_WAIT_POLICY {state['omp_wait_policy']}, "
            f"load {state['load_average']:.2f}, torch {state['torch']}, commit {(state['commit'] or '?')[:12]}")


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
    """The folder of a random-weight checkpoint of OFFICIAL_CONFIGS[name], written by transformers once (in the
    temporary directory, hsd-bench-NAME) and reused."""
    cfg = OFFICIAL_CONFIGS[name]
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
        skips = paper_skips(ours.config)
        costs = cost_model.measure_costs(ours, skips, context, cost_repeats, max(ks), passes=PASSES)
        bandwidth = memory_bandwidth()
    med = {key: statistics.median(v) for key, v in runs.items() if key != "spec"}
    round_s = statistics.median(s["decode_s"] / s["rounds"] for s in runs["spec"])
    weight_bytes = weight_bytes_per_token(ours)
    print(f"{name}, random weights, fp32, {machine_words(machine)}, {repeats} alternating runs, medians")
    for line in warning_lines(machine):
        print(line)
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
    print(f"cost    at {context} tokens, medians of {cost_repeats} turns (cost_model.measure_costs): full step "
          f"{costs.step_s * 1e3:.1f} ms; c: " + ", ".join(f"{d} {costs.c[d]:.2f}" for d in skips) + "; v: " +
          ", ".join(f"k={k} {costs.v[k]:.2f}" for k in ks))
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


def draft_rows(model, files):
    """{label: hsd.Draft}: the paper's drafts at every fixed k in 1..8 and with k="auto", and each draft file as it
    says, at its best fixed k (found_by.best_fixed) and with k="auto"; and {label: the skip's label in the costs}."""
    paper = paper_skips(model.config)
    rows = {f"{d}, k={k}": hsd.Draft(d, skip, k, None) for d, skip in paper.items() for k in range(1, 9)}
    rows |= {f"{d}, k=auto": hsd.choose_draft(model, d, "auto") for d in paper}
    skip_of = {label: label.split(", k=")[0] for label in rows}
    for path in files:
        drafted, _ = hsd.read_draft_file(path, model)
        with open(path, encoding="utf-8") as f:
            fixed = json.load(f).get("found_by", {}).get("best_fixed")
        rows[path] = drafted
        if fixed and (fixed["k"], fixed["stop"]) != (drafted.k, drafted.stop):
            rows[f"{path}, k={fixed['k']}"] = drafted._replace(k=fixed["k"], stop=fixed["stop"])
        if drafted.k != "auto":
            rows[f"{path}, k=auto"] = drafted._replace(k="auto")
        skip_of |= {label: path for label in rows if label.startswith(path)}
    return rows, skip_of


def drafts_side_by_side(name, files, new_tokens=64, turns=3, prompt_tokens=64, temperatures=(0.0, PAPER_T), seed=0):
    """Plain decoding against every row of draft_rows, end to end on the test prompts, in turns in one process
    (cost_model.generations_in_turns), at each temperature; c and v measured at that temperature at the mean context
    of a generation. Returns {"prompts", "costs": {T: Costs}, "rows": {(label, T): measured_row}, "best": {T: the
    best fixed paper row}, "runs": {T: the raw runs}, "machine", "warnings"}."""
    model, tokenizer = models.load(name), models.load_tokenizer(name)
    machine = cost_model.machine_state(model, "float32")       # before measuring: the load of others, not ours
    prompts = test_prompts(name, tokenizer, prompt_tokens)
    context = prompt_tokens + new_tokens // 2
    rows, skip_of = draft_rows(model, files)
    skips = {skip_of[label]: draft.skip for label, draft in rows.items()}
    longest = max(hsd.AUTO_MAX, *(d.k for d in rows.values() if d.k != "auto"))
    hsd.warm_up(model, longest)
    result = {"prompts": prompts, "costs": {}, "rows": {}, "best": {}, "runs": {}}
    for T in temperatures:
        costs = result["costs"][T] = cost_model.measure_costs(model, skips, context, 7 * turns, longest, T,
                                                              passes=PASSES)
        with tqdm(total=len(prompts) * turns, desc=f"T={T}, {len(rows) + 1} rows (prompts x turns)",
                  file=sys.stderr) as bar:
            runs = result["runs"][T] = cost_model.generations_in_turns(hsd.generate, model, list(prompts.values()),
                                                                        rows, new_tokens, turns, T, seed, bar)
        for label in rows:
            result["rows"][label, T] = cost_model.measured_row(runs[label], runs["plain"], costs.c[skip_of[label]],
                                                               costs.v)
        fixed_paper = [label for label in rows if skip_of[label] in paper_skips(model.config)
                       and not label.endswith("auto")]
        best = result["best"][T] = max(fixed_paper, key=lambda label: result["rows"][label, T]["speedup"])
        for label in rows:                                  # each row against the best fixed paper row
            result["rows"][label, T]["vs_best_paper"] = cost_model.speedup(runs[label], runs[best])
            result["rows"][label, T]["vs_best_paper_ci"] = cost_model.speedup_ci(runs[label], runs[best])
    spread = max((r["turn_speedups"] for r in result["rows"].values()), key=lambda x: max(x) / min(x))
    busy = cost_model.busy_warning(machine, spread)
    return {**result, "machine": machine, "warnings": [busy] if busy else []}


def side_by_side_lines(name, r, new_tokens):
    """The results table: every speedup with its 95% interval over the test prompts; greedy rows with the loop
    measure (the share of the continuations' tokens inside a 4-gram seen before in the same continuation)."""
    yield (f"{name}: {len(r['prompts'])} test prompts (paragraphs {', '.join(map(str, r['prompts']))} of the held-out "
           f"text), {new_tokens} new tokens; {machine_words(r['machine'])}")
    for T, costs in r["costs"].items():
        noise = "-" if costs.noise["step"] is None else f"{costs.noise['step']:.1%}"
        yield (f"T={T}: full step {costs.step_s * 1e3:.2f} ms at {costs.context} tokens (noise {noise}); best fixed "
               f"paper row (chosen on these prompts): {r['best'][T]}")
    yield (f"{'row':44} {'T':>4} {'speedup [95% CI]':>22} {'vs best paper [95% CI]':>23} {'alpha':>6} {'acc/rnd':>7} "
           f"{'drf/rnd':>7} {'plain':>5} {'c':>5} {'predicted':>9} {'loops':>6}")
    for (label, T), x in r["rows"].items():
        loops = f"{x['repeated_4grams']:6.1%}" if T == 0 else f"{'':6}"
        yield (f"{label[-44:]:44} {T:4.1f} {x['speedup']:7.3f}x [{x['speedup_ci'][0]:.3f}, {x['speedup_ci'][1]:.3f}] "
               f"{x['vs_best_paper']:8.3f} [{x['vs_best_paper_ci'][0]:.3f}, {x['vs_best_paper_ci'][1]:.3f}] "
               f"{x['alpha'] or 0:6.3f} {x['accepted_per_round'] or 0:7.2f} {x['drafts_per_round'] or 0:7.2f} "
               f"{x['plain_steps']:5d} {r['costs'][T].c[label.split(', k=')[0]]:5.2f} "
               f"{x['predicted_speedup']:8.3f}x {loops}")
    for line in r["warnings"]:
        yield f"warning: {line}"


def side_by_side_json(name, r, new_tokens):
    """What --out saves: the table's numbers, the costs, the machine, and every raw run (per label, prompt and turn),
    so that a stranger can bootstrap them again."""
    return {"model": name, "new_tokens": new_tokens, "test_paragraphs": list(r["prompts"]), "machine": r["machine"],
            "warnings": r["warnings"], "unreliable": bool(r["warnings"]),
            "best_fixed_paper": {str(T): b for T, b in r["best"].items()},
            "costs": {str(T): c._asdict() for T, c in r["costs"].items()},
            "rows": [{"row": label, "temperature": T, **x} for (label, T), x in r["rows"].items()],
            "runs": {str(T): runs for T, runs in r["runs"].items()}}


# --- What each unit costs, and the cost against the context ---------------------------------------------------------
def bench_model(name):
    """A model to time: an official configuration with random weights (speed does not depend on the weight values),
    or a trained toy."""
    if name in OFFICIAL_CONFIGS:
        return models.init_random(models.Model(models.config_from_hf(OFFICIAL_CONFIGS[name]))).eval().requires_grad_(
            False)
    return models.load(name)


def unit_costs(name, context=256, turns=7):
    """What leaving out each kind of unit saves per decoding step on this machine (cost_model.unit_skips, one
    measure_costs), and c of each paper draft with the per-token acceptance it would need for S > 1. Returns (unit
    costs, {(unit, layer type): saved per layer}, paper draft costs)."""
    model = bench_model(name)
    hsd.warm_up(model, hsd.AUTO_MAX)
    kinds = cost_model.unit_kinds(model.config)
    units = cost_model.measure_costs(model, cost_model.unit_skips(model.config), context, turns, hsd.AUTO_MAX,
                                     passes=PASSES)
    saves = {kind: (1 - units.c[kind]) / len(layers) for kind, layers in kinds.items()}
    drafts = cost_model.measure_costs(model, paper_skips(model.config), context, turns, 8, passes=PASSES)
    return units, saves, drafts, cost_model.machine_state(model, "float32")


def unit_lines(name, units, saves, drafts, machine):
    yield f"{name}: full step {units.step_s * 1e3:.1f} ms at {units.context} tokens; {machine_words(machine)}"
    yield "one unit left out saves: " + ", ".join(f"{unit} of a {layer_type} layer {s:.1%}"
                                                  for (unit, layer_type), s in saves.items())
    yield "v (verify of d+1 tokens): " + ", ".join(f"d={d} {units.v[d]:.2f}" for d in (1, 2, 4, 8, 16))
    for draft, c in drafts.c.items():
        yield f"{draft:10} c {c:.2f}; per-token acceptance needed for S > 1: " + ", ".join(
            f"k={k} {'never' if p is None else f'{p:.2f}'}"
            for k, p in ((k, cost_model.break_even_acceptance(c, drafts.v[k], k)) for k in (1, 2, 4, 8)))
    yield from warning_lines(machine)


def context_sweep(name, turns=7, temperature=0.0):
    """c, v and the predicted speedup of the paper's drafts at every context of CONTEXTS the model's context allows:
    {context: Costs}; the speedups (sweep_rows) use the paper's acceptance (cost_model.PAPER) for the official models,
    labelled as such, and the acceptance each k needs to pay off for every model."""
    model = bench_model(name)
    hsd.warm_up(model, 8)
    contexts = [L for L in CONTEXTS if L + 8 + 2 <= model.config.max_position_embeddings]
    sweep = {}
    for L in tqdm(contexts, desc="contexts", file=sys.stderr):
        sweep[L] = cost_model.measure_costs(model, paper_skips(model.config), L, turns, 8, temperature, passes=PASSES)
    return sweep, cost_model.machine_state(model, "float32")


def paper_column(temperature):
    """The column of cost_model.PAPER at a temperature: "greedy" at 0, "T=0.6" at the paper's T."""
    return "greedy" if temperature == 0 else f"T={temperature:g}"


def sweep_rows(name, sweep):
    """Per context, draft and k in (2, 4, 8): c, v[k], the break-even acceptance, and where the paper reports an
    acceptance for this model at the costs' temperature (single round, greedy or T=0.6: alpha, so that a round keeps
    alpha k drafts), the speedup it predicts."""
    paper = cost_model.PAPER.get(name, {})
    rows = []
    for L, costs in sweep.items():
        column = paper_column(costs.temperature)
        for draft, c in costs.c.items():
            for k in (2, 4, 8):
                alpha = paper.get(draft, {}).get(column, {}).get(k, (None,))[0]
                rows.append({"context": L, "draft": draft, "k": k, "c": c, "v": costs.v[k],
                             "noise_c": costs.noise["c"][draft],
                             "break_even_acceptance": cost_model.break_even_acceptance(c, costs.v[k], k),
                             "paper_alpha": alpha, "predicted_speedup_at_paper_alpha": None if alpha is None else
                             cost_model.predicted_speedup(1 + alpha * k, [k], c, costs.v)})
    return rows


def sweep_lines(name, sweep, rows, machine):
    T = next(iter(sweep.values())).temperature
    yield f"{name}: c, v and the predicted speedup against the context, at T={T}; {machine_words(machine)}"
    yield (f"predicted: at the paper's single-round acceptance ({paper_column(T)}) for this model (cost_model.PAPER), "
           "where it gives one" if name in cost_model.PAPER else
           "no paper acceptance for this model: the acceptance each k needs")
    yield (f"{'context':>7} {'step ms':>8} {'draft':10} {'k':>2} {'c':>5} {'v[k]':>5} {'needs':>6} {'paper a':>8} "
           f"{'predicted':>9}")
    for r in rows:
        needs = "never" if r["break_even_acceptance"] is None else f"{r['break_even_acceptance']:.2f}"
        predicted = "" if r["paper_alpha"] is None else f"{r['predicted_speedup_at_paper_alpha']:8.3f}x"
        paper = "" if r["paper_alpha"] is None else f"{r['paper_alpha']:.3f}"
        yield (f"{r['context']:7d} {sweep[r['context']].step_s * 1e3:8.2f} {r['draft']:10} {r['k']:2d} {r['c']:5.2f} "
               f"{r['v']:5.2f} {needs:>6} {paper:>8} {predicted:>9}")
    yield from warning_lines(machine)


# --- Command line ---------------------------------------------------------------------------------------------------
def main(argv=None):
    p = argparse.ArgumentParser(description="hsd against transformers, and the cost of speculation; with --units, what "
                                            "each unit costs; with --drafts, drafts side by side end to end on the "
                                            "test prompts; with --context-sweep, c, v and the predicted speedup "
                                            "against the context.")
    p.error = lambda message: p.exit(2, f"hsd_bench: error: {message} (see --help)\n")
    p.add_argument("model", choices=[*OFFICIAL_CONFIGS, *models.TOYS], help="an official configuration (random "
                   "weights), or a trained toy (--units, --drafts, --context-sweep)")
    p.add_argument("--tokens", type=int, default=32, help="new tokens of a decoding run (default: 32; --drafts: 64)")
    p.add_argument("--repeats", type=int, default=3, help="alternating runs of each side; --drafts: turns over the "
                                                          "test prompts (default: 3)")
    p.add_argument("--cost-repeats", type=int, default=11, help="turns of each kind of step for c and v (default: 11)")
    p.add_argument("--units", action="store_true", help="what leaving out each kind of unit saves, and the acceptance "
                                                       "the paper's drafts need to pay off")
    p.add_argument("--drafts", nargs="*", metavar="FILE", help="plain decoding, the paper's drafts and these draft "
                                                               "files end to end on the test prompts (a toy), greedy "
                                                               f"and at T={PAPER_T}")
    p.add_argument("--context-sweep", action="store_true", help="c, v and the predicted speedup of the paper's drafts "
                                                               f"at {', '.join(map(str, CONTEXTS))} tokens (as far as "
                                                               "the model's context allows)")
    p.add_argument("--context", type=int, default=256, help="with --units: the tokens in the cache (default: 256)")
    p.add_argument("--temperature", type=float, default=0.0, help="with --context-sweep: the costs of a round sampled "
                                                                   f"at this temperature (the paper's: {PAPER_T}; "
                                                                   "default: 0, greedy)")
    p.add_argument("--threads", type=int, help="torch's threads (default: torch's choice)")
    p.add_argument("--out", help="with --drafts or --context-sweep: save the numbers, and --drafts' raw per-prompt "
                                 "runs, to this JSON file")
    p.add_argument("--json", action="store_true", help="with --drafts, --units or --context-sweep: the numbers as one "
                                                       "JSON line")
    args = p.parse_args(argv)
    if args.threads is not None:
        if args.threads < 1:
            p.error(f"--threads must be at least 1 (got {args.threads})")
        torch.set_num_threads(args.threads)
    if not 0 <= args.temperature < float("inf"):                      # NaN too
        p.error(f"--temperature must be 0 (greedy) or a finite temperature above it (got {args.temperature})")
    try:
        if args.out:
            cost_model.check_writable(args.out, "--out")
        if args.drafts is not None:
            if args.model not in models.TOYS:
                p.error("--drafts runs on a trained toy (its held-out text): give toy-falcon-h1, toy-qwen3.5 or "
                        "toy-qwen2.5")
            tokens = 64 if args.tokens == p.get_default("tokens") else args.tokens
            r = drafts_side_by_side(args.model, args.drafts, new_tokens=tokens, turns=args.repeats)
            print(*side_by_side_lines(args.model, r, tokens), sep="\n")
            saved = side_by_side_json(args.model, r, tokens)
            if args.out:
                cost_model.write_json(args.out, saved)
            if args.json:
                print(json.dumps({key: value for key, value in saved.items() if key != "runs"}))
            return 0
        if args.context_sweep:
            sweep, machine = context_sweep(args.model, args.cost_repeats, args.temperature)
            rows = sweep_rows(args.model, sweep)
            print(*sweep_lines(args.model, sweep, rows, machine), sep="\n")
            warned = [w[9:] for w in warning_lines(machine)]
            saved = {"model": args.model, "machine": machine, "warnings": warned, "unreliable": bool(warned),
                     "rows": rows,
                     "costs": {str(L): c._asdict() for L, c in sweep.items()}}
            if args.out:
                cost_model.write_json(args.out, saved)
            if args.json:
                print(json.dumps(saved))
            return 0
        if args.units:
            units, saves, drafts, machine = unit_costs(args.model, context=args.context, turns=args.cost_repeats)
            print(*unit_lines(args.model, units, saves, drafts, machine), sep="\n")
            if args.json:
                print(json.dumps({"model": args.model, "machine": machine, "warnings": [
                                  w[9:] for w in warning_lines(machine)], "step_s": units.step_s, "v": units.v,
                                  "saves": {f"{u} of a {t} layer": s for (u, t), s in saves.items()},
                                  "drafts": {d: {"c": c, "break_even": {k: cost_model.break_even_acceptance(
                                      c, drafts.v[k], k) for k in (1, 2, 4, 8)}} for d, c in drafts.c.items()}}))
            return 0
        if args.model not in OFFICIAL_CONFIGS:
            p.error("the comparison with transformers runs on an official configuration: " + ", ".join(OFFICIAL_CONFIGS))
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

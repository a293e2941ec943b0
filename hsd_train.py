"""hsd_train: the trained toy models, three architectures with one budget.

The built-in tiny-* models have random weights: they exercise the code but say nothing about hybrids. The toys are
small models of the three families trained on the same text with the same budget, so that the paper's question can
be asked in miniature: does the attention-free part of a parallel hybrid draft better than that of a sequential one?

  toy-falcon-h1   parallel hybrid: attention beside Mamba-2 in each of 8 layers, then an MLP
  toy-qwen3.5     sequential hybrid: 3 Gated DeltaNet layers, then 1 gated attention layer, twice
  toy-qwen2.5     a Transformer of 8 attention layers (the control)

One budget: hidden size 128, 8 layers, parameter counts within 1% of each other (the MLP widths differ to get there),
the same character tokenizer (models.char_tokenizer), the same text, the same number of training characters, the
same seed, initialisation rule and learning-rate schedule. Each toy trains in about 10 minutes on 2 CPU cores:

  python hsd_train.py --model toy-falcon-h1 --force    # replaces the shipped toys/toy-falcon-h1 (toys/README.md)
  python hsd_train.py --model toy-falcon-h1 --out /tmp/falcon     # or writes another folder

The text is prose from Python's documentation (toys/text: its source, licence and how it was made are in the
README); a held-out part, whole documents, is never trained on. A training run shows a progress bar with its ETA, and
Ctrl-C keeps what it computed: the same command resumes it.
"""
import argparse
import ctypes
import difflib
import hashlib
import json
import math
import os
import platform
import re
import signal
import sys
import time
import unicodedata

try:
    import torch
    import torch.nn.functional as F
    from huggingface_hub.utils import tqdm

    import cli
    import cost_model
    import drafts
    import hsd
    import models
except KeyboardInterrupt:                     # Ctrl-C while torch loads (a second or more): one line, as later on
    if __name__ != "__main__":
        raise
    print("\nhsd_train: interrupted", file=sys.stderr)
    sys.exit(130)

TEXT_DIR = os.path.join(models.TOYS_DIR, "text")
HELDOUT_WINDOWS, WINDOW = 32, 512      # the held-out loss: the first 32 windows of 512 characters of the held-out text
FIRST_WINDOWS = 4                      # the loss curve's held-out loss, and the log's quick check: the first 4 windows


# --- The three toys: their config.json, in the official layout of each family ----------------------------------
COMMON = {"vocab_size": 97, "hidden_size": 128, "num_hidden_layers": 8, "num_attention_heads": 4,
          "num_key_value_heads": 2, "head_dim": 32, "max_position_embeddings": 512, "rope_theta": 10000.0,
          "eos_token_id": 96, "bos_token_id": None, "pad_token_id": None}
TOY_CONFIGS = {
    "toy-falcon-h1": {
        **COMMON, "model_type": "falcon_h1", "architectures": ["FalconH1ForCausalLM"], "intermediate_size": 176,
        "rms_norm_eps": 1e-5, "tie_word_embeddings": False, "mamba_d_ssm": 128, "mamba_n_heads": 8,
        "mamba_d_head": 16, "mamba_d_state": 16, "mamba_n_groups": 1, "mamba_d_conv": 4, "mamba_chunk_size": 64,
        "mamba_rms_norm": False, "mamba_norm_before_gate": False, "mamba_conv_bias": True, "mamba_proj_bias": False,
        "attention_bias": False, "mlp_bias": False, "projectors_bias": False, "embedding_multiplier": 1.0,
        "lm_head_multiplier": 1.0, "key_multiplier": 1.0, "attention_in_multiplier": 1.0,
        "attention_out_multiplier": 1.0, "ssm_in_multiplier": 1.0, "ssm_out_multiplier": 1.0,
        "mlp_multipliers": [1.0, 1.0], "ssm_multipliers": [1.0, 1.0, 1.0, 1.0, 1.0]},
    "toy-qwen3.5": {
        **COMMON, "model_type": "qwen3_5_text", "architectures": ["Qwen3_5ForCausalLM"], "intermediate_size": 240,
        "rms_norm_eps": 1e-6, "tie_word_embeddings": True, "attention_bias": False, "attn_output_gate": True,
        "layer_types": ["linear_attention"] * 3 + ["full_attention"] + ["linear_attention"] * 3 + ["full_attention"],
        "linear_num_key_heads": 4, "linear_num_value_heads": 4, "linear_key_head_dim": 32,
        "linear_value_head_dim": 32, "linear_conv_kernel_dim": 4,
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.25,
                            "mrope_section": [2, 1, 1], "mrope_interleaved": True}},
    "toy-qwen2.5": {
        **COMMON, "model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"], "intermediate_size": 320,
        "rms_norm_eps": 1e-6, "tie_word_embeddings": True, "use_sliding_window": False},
}
# The schedule every toy trains with: AdamW, linear warm-up, cosine decay to a tenth; 500 steps of 8 windows of 512
# characters (2.05 million characters, about 1.2 passes over the training text).
SCHEDULE = {"steps": 500, "batch_size": 8, "length": 512, "lr": 3e-3, "warmup": 50, "final_lr": 0.1,
            "weight_decay": 0.1, "clip": 1.0, "betas": (0.9, 0.95)}


# --- The text -------------------------------------------------------------------------------------------------------
def read_text(split):
    """The training ("train") or held-out ("heldout") text: one paragraph per line."""
    path = os.path.join(TEXT_DIR, f"{split}.txt")
    try:
        with open(path, encoding="ascii") as f:
            return f.read()
    except (OSError, UnicodeDecodeError) as e:
        reason = e.strerror if isinstance(e, OSError) else "not ASCII text"
        raise models.UsageError(f"cannot read {path}: {reason} (python hsd_train.py --make-text SOURCES writes it)")


def encode(text):
    """The character tokenizer's ids of text: a 1-D LongTensor (printable ASCII is 0..94, newline 95). Line by line,
    the newlines put back between: the same ids as encoding the whole text, in half the time."""
    tokenizer = models.char_tokenizer()
    newline = tokenizer.token_to_id("\n")
    lines = tokenizer.encode_batch(text.split("\n"))
    return torch.tensor([i for line in lines for i in [*line.ids, newline]][:-1])


def heldout_windows():
    """The held-out loss's input: the first HELDOUT_WINDOWS windows of WINDOW characters of the held-out text."""
    ids = encode(read_text("heldout"))[:HELDOUT_WINDOWS * WINDOW]
    refuse_short_text("heldout", len(ids), HELDOUT_WINDOWS * WINDOW,
                      f"the held-out loss reads {HELDOUT_WINDOWS} windows of {WINDOW}")
    return ids.view(HELDOUT_WINDOWS, WINDOW)                                      # (windows, WINDOW)


def refuse_short_text(split, characters, needed, why):
    """Refuse a text shorter than needed in one line (a text made from the wrong folder, or emptied)."""
    if characters < needed:
        raise models.UsageError(f"{os.path.join(TEXT_DIR, split + '.txt')} is too short ({characters:,} characters): "
                                f"{why}, {needed:,} (python hsd_train.py --make-text SOURCES writes it)")


# --- Initial weights --------------------------------------------------------------------------------------------
@torch.no_grad()
def init_weights(model, seed):
    """GPT-2's rule for matrices (N(0, 0.02), the projections back into the residual stream scaled by
    1/sqrt(2 layers)), norms at their neutral value, Mamba-2's and Gated DeltaNet's decay rates spread over heads as
    in their papers (A in 1..16, step sizes 0.001..0.1), D = 1. Every family gets the same rule."""
    gen = torch.Generator().manual_seed(seed)
    residual = 0.02 / math.sqrt(2 * model.config.num_layers)
    for name, p in model.named_parameters():
        if name.endswith("A_log"):
            p.copy_(torch.log(1 + 15 * torch.rand(p.shape, generator=gen)))
        elif name.endswith("dt_bias"):
            dt = torch.exp(math.log(1e-3) + (math.log(0.1) - math.log(1e-3)) * torch.rand(p.shape, generator=gen))
            p.copy_(dt + torch.log(-torch.expm1(-dt)))                               # softplus(dt_bias) = dt
        elif name.endswith(".D") or (name.endswith("norm.weight") and not models.is_offset_norm(model, name)):
            p.fill_(1.0)
        elif name.endswith("norm.weight"):                                            # Qwen3.5's (1 + w) norms
            p.zero_()
        elif name.endswith(".bias") and "conv1d" not in name:
            p.zero_()
        elif "conv1d" in name:                                                        # PyTorch's own conv init
            bound = 1 / math.sqrt(p.shape[-1])
            p.copy_((2 * torch.rand(p.shape, generator=gen) - 1) * bound)
        else:
            std = residual if name.endswith(("o_proj.weight", "out_proj.weight", "down_proj.weight")) else 0.02
            p.copy_(std * torch.randn(p.shape, generator=gen))
    return model


# --- The training loop ------------------------------------------------------------------------------------------
def learning_rate(step, schedule):
    """Linear warm-up to the peak, then a cosine decay to final_lr times the peak at the last step."""
    peak, warmup, steps = schedule["lr"], schedule["warmup"], schedule["steps"]
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - 1 - warmup)
    return peak * (schedule["final_lr"] + (1 - schedule["final_lr"]) * 0.5 * (1 + math.cos(math.pi * progress)))


def random_windows(ids, count, length, generator):
    """count windows of length + 1 consecutive ids, at random places: (count, length + 1)."""
    starts = torch.randint(len(ids) - length - 1, (count,), generator=generator)
    return torch.stack([ids[s:s + length + 1] for s in starts.tolist()])


def loss_of(model, windows, skip=None):
    """Mean cross-entropy in nats of predicting windows[:, 1:] from windows[:, :-1] (the draft's, given a skip)."""
    logits = model(windows[:, :-1], skip=skip)                                   # (B, T, V)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), windows[:, 1:].reshape(-1))


@torch.inference_mode()
def heldout_bits_per_char(model, windows, skip=None, batch=8):
    """Mean bits per character over every predicted position of the held-out windows (full model, or a draft)."""
    nats = [loss_of(model, windows[i:i + batch], skip).item() for i in range(0, len(windows), batch)]
    return sum(nats) / len(nats) / math.log(2)


def parameter_groups(model, weight_decay):
    """AdamW's two groups: matrices decay, vectors (norms, biases, decay rates) do not."""
    matrices = [p for p in model.parameters() if p.dim() >= 2]
    vectors = [p for p in model.parameters() if p.dim() < 2]
    return [{"params": matrices, "weight_decay": weight_decay}, {"params": vectors, "weight_decay": 0.0}]


def train_step(model, optimizer, windows, lr, clip):
    """One AdamW step on windows (B, T+1) at learning rate lr, the gradient's norm clipped to clip: the loss (nats)."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    loss = loss_of(model, windows)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    optimizer.step()
    return loss.item()


def train(name, out, seed=0, schedule=SCHEDULE, curve_every=25):
    """Train the toy `name` from scratch (or resume the run saved in out), save it in the official layout in out, and
    return its training log. Ctrl-C finishes the step under way, saves the run in out/resume.pt and raises
    KeyboardInterrupt; the same call resumes it, and ends as a run that was never interrupted would. A text too short
    to train on, or a folder that cannot be made, is refused before anything is computed."""
    train_ids, heldout = encode(read_text("train")), heldout_windows()
    refuse_short_text("train", len(train_ids), schedule["length"] + 2,
                      f"training takes windows of {schedule['length']} characters and the one after")
    os.makedirs(out, exist_ok=True)
    config = models.config_from_hf(TOY_CONFIGS[name])
    torch.manual_seed(seed)
    model = init_weights(models.Model(config), seed).train()
    optimizer = torch.optim.AdamW(parameter_groups(model, schedule["weight_decay"]), lr=schedule["lr"],
                                  betas=schedule["betas"])
    generator = torch.Generator().manual_seed(seed)
    run = {"step": 0, "seconds": 0.0, "curve": [], "recent": []}
    resume = os.path.join(out, "resume.pt")
    if os.path.exists(resume):
        saved = torch.load(resume, weights_only=False)
        if (saved["name"], saved["seed"], saved["schedule"]) != (name, seed, schedule):
            raise models.UsageError(f"{resume} is another run: delete it, or give that run's options")
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        generator.set_state(saved["generator"])
        run = saved["run"]
    bar = tqdm(total=schedule["steps"], initial=run["step"], desc=name, unit="step")
    stop = []                                             # Ctrl-C: stop at the end of the step under way
    interrupt = signal.signal(signal.SIGINT, lambda *_: stop.append(True))
    try:
        while run["step"] < schedule["steps"] and not stop:
            t0 = time.perf_counter()
            windows = random_windows(train_ids, schedule["batch_size"], schedule["length"], generator)
            run["recent"].append(train_step(model, optimizer, windows, learning_rate(run["step"], schedule),
                                            schedule["clip"]))
            run["step"] += 1
            if run["step"] % curve_every == 0 or run["step"] == schedule["steps"]:
                mean = sum(run["recent"]) / len(run["recent"]) / math.log(2)
                run["curve"].append([run["step"], mean, heldout_bits_per_char(model, heldout[:FIRST_WINDOWS])])
                run["recent"] = []
                bar.set_postfix_str(f"train {mean:.2f} bits/char, held-out {run['curve'][-1][2]:.2f}")
            run["seconds"] += time.perf_counter() - t0
            bar.update()
    finally:
        signal.signal(signal.SIGINT, interrupt)
        bar.close()
    if stop:
        torch.save({"name": name, "seed": seed, "schedule": schedule, "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(), "generator": generator.get_state(), "run": run}, resume)
        raise KeyboardInterrupt(f"saved step {run['step']} of {schedule['steps']} in {resume}: run the same command "
                                "again to resume")
    save_checkpoint(model.eval(), TOY_CONFIGS[name], out)
    log = training_log(name, seed, schedule, run, models.load(out))       # measured on the saved (bf16) weights
    with open(os.path.join(out, "training-log.json"), "w") as f:
        json.dump(log, f, indent=1)
    if os.path.exists(resume):
        os.remove(resume)
    return log


def training_log(name, seed, schedule, run, model):
    """What a rerun needs to match, what the run took, its loss curve, the held-out loss of the saved model and of each
    of its drafts (bits per character on heldout_windows(), and on its first FIRST_WINDOWS: what a test recomputes in
    seconds), and whether it copies and loops (does_it_copy)."""
    windows = heldout_windows()
    skips = drafts.paper_skips(model.config)

    def bits_per_char(windows):
        return {"full": heldout_bits_per_char(model, windows),
                **{draft: heldout_bits_per_char(model, windows, skip) for draft, skip in skips.items()}}
    return {
        "model": name, "seed": seed, "schedule": schedule, "characters": schedule["steps"] * schedule["batch_size"]
        * schedule["length"], "parameters": sum(p.numel() for p in model.parameters()),
        "threads": torch.get_num_threads(), "torch": torch.__version__, "python": platform.python_version(),
        "machine": processor(), "date": time.strftime("%Y-%m-%d"), "seconds": round(run["seconds"], 1),
        "text_sha256": {split: hashlib.sha256(read_text(split).encode()).hexdigest() for split in ("train", "heldout")},
        "curve": {"columns": ["step", "train bits/char", f"held-out bits/char (first {FIRST_WINDOWS} windows)"],
                  "rows": run["curve"]},
        "heldout": {"windows": HELDOUT_WINDOWS, "length": WINDOW, "bits_per_char": bits_per_char(windows),
                    f"first_{FIRST_WINDOWS}_windows": bits_per_char(windows[:FIRST_WINDOWS])},    # a check in seconds
        **does_it_copy(model),
    }


def processor():
    """The processor (drafts.cpu_name) and the number of cores: the training log's "machine"."""
    return f"{drafts.cpu_name()}, {os.cpu_count()} cores"


# --- Saving in the official layout ------------------------------------------------------------------------------
def write_safetensors(tensors, path):
    """The safetensors format by hand: 8-byte header length, JSON header, raw bytes (safetensors' own writer needs
    NumPy, which hsd does not)."""
    header, blobs, offset = {"__metadata__": {"format": "pt"}}, [], 0
    for name, t in tensors.items():
        t = t.detach().cpu().contiguous()
        data = ctypes.string_at(t.data_ptr(), t.numel() * t.element_size())
        dtype = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float64: "F64"}[t.dtype]
        header[name] = {"dtype": dtype, "shape": list(t.shape), "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    head = json.dumps(header).encode()
    head += b" " * (-len(head) % 8)                                  # the data starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(len(head).to_bytes(8, "little") + head + b"".join(blobs))


def checkpoint_tensors(model):
    """The model's tensors under the checkpoint's names (models.checkpoint_name read backwards)."""
    tensors = {}
    for name, p in model.named_parameters():
        if name == "model.norm.weight" and model.config.family == "falcon_h1":
            name = "model.final_layernorm.weight"
        tensors[name] = p
    return tensors


def save_checkpoint(model, hf_config, folder, dtype=torch.bfloat16):
    """config.json, tokenizer.json (the character tokenizer) and model.safetensors (in dtype) in folder."""
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump({**hf_config, "torch_dtype": str(dtype).removeprefix("torch.")}, f, indent=1)
    models.char_tokenizer().save(os.path.join(folder, "tokenizer.json"))
    tensors = {name: p.to(dtype) for name, p in checkpoint_tensors(model).items()}
    write_safetensors(tensors, os.path.join(folder, "model.safetensors"))


# --- Are they worth looking at: words ---------------------------------------------------------------------------
PUNCTUATION = "\"'()[]{}.,;:!?`*"


def words(text):
    """The whitespace-separated words of text, without the punctuation around them (empty ones left out)."""
    return [w for w in (w.strip(PUNCTUATION) for w in text.split()) if w]


def word_rate(generated, vocabulary):
    """(share of the generated words that occur in vocabulary, number of different generated words). The last word
    is left out when the text does not end in whitespace: a continuation cut at a length can cut a word."""
    found = words(generated if generated[-1:].isspace() else generated.rsplit(None, 1)[0] if generated.split() else "")
    return (sum(w in vocabulary for w in found) / len(found) if found else 0.0), len(set(found))


def continuation(model, tokenizer, prompt, characters=300, temperature=0.0, seed=0):
    """The model's continuation of prompt, `characters` characters long (plain decoding; greedy or at a temperature)."""
    tokens, _ = hsd.generate(model, tokenizer.encode(prompt).ids, characters, draft="none", temperature=temperature,
                             seed=seed)
    return tokenizer.decode(tokens)


# --- Do they read back what they were given: copying, and loops -----------------------------------------------
LOOP_SIZE, LOOP_CHARACTERS = 16, 300     # the loop share: of 16-character strings, in 300 greedy characters


@torch.inference_mode()
def copying(model, tokenizer, prompts):
    """How far greedy decoding copies a passage it was given. prompts: (prompt, continuation) pairs of strings, the
    prompt ending where the passage begins again (cost_model.copy_prompts). matched: the characters of the
    continuation that greedy plain decoding of the prompt reproduces before its first difference (the toys' tokenizer:
    a token is a character). Greedy decoding writes the continuation's next token exactly as long as that token is the
    model's most likely one after the prompt and the continuation so far, so one forward pass over prompt +
    continuation finds the first difference: the first position whose argmax is not the continuation's token (the
    same as decoding one token at a time, but for ties of the two largest logits). model(ids (1, T)) -> logits
    (1, T, V). Returns {"share": sum(matched) / sum(remaining), "matched": [per prompt], "remaining": [per prompt,
    the continuation's length in tokens]}."""
    matched, remaining = [], []
    for prompt, rest in prompts:
        given, wanted = tokenizer.encode(prompt).ids, tokenizer.encode(rest, add_special_tokens=False).ids
        ids = torch.tensor([given + wanted])                                         # (1, T)
        predicted = model(ids)[0, len(given) - 1:-1].argmax(-1)                       # (len(wanted),)
        wrong = (predicted != torch.tensor(wanted)).nonzero()
        matched.append(wrong[0, 0].item() if len(wrong) else len(wanted))
        remaining.append(len(wanted))
    return {"share": sum(matched) / sum(remaining), "matched": matched, "remaining": remaining}


def loop_share(text, size=LOOP_SIZE):
    """The share of text's size-character strings already seen: of the len(text) - size + 1 strings text[i:i + size],
    those equal to some text[j:j + size] with j < i (an earlier start; the two may overlap). 0.0 for a text shorter
    than size. Greedy text that loops scores near 1; prose, near 0."""
    strings = [text[i:i + size] for i in range(len(text) - size + 1)]
    seen, repeated = set(), 0
    for string in strings:
        repeated += string in seen
        seen.add(string)
    return repeated / len(strings) if strings else 0.0


def does_it_copy(model):
    """Whether a model with the toys' tokenizer reads back what it was given, and whether its greedy text loops:
    {"copying": copying() on cost_model.copy_prompts of the held-out text (COPY_PASSAGES passages of COPY_LENGTH
    characters, each given again up to its first COPY_GIVEN), "loop_share": loop_share() of the LOOP_CHARACTERS
    greedy characters that continue README_PROMPT, of LOOP_SIZE-character strings}, each with how it was made."""
    tokenizer = models.char_tokenizer()
    prompts = cost_model.copy_prompts(read_text("heldout").splitlines(), cost_model.COPY_PASSAGES)
    greedy = continuation(model, tokenizer, README_PROMPT, LOOP_CHARACTERS)
    return {"copying": {"passages": len(prompts), "length": cost_model.COPY_LENGTH, "given": cost_model.COPY_GIVEN,
                        **copying(model, tokenizer, prompts)},
            "loop_share": {"share": loop_share(greedy, LOOP_SIZE), "size": LOOP_SIZE, "characters": LOOP_CHARACTERS,
                           "prompt": README_PROMPT}}


# --- The text: how toys/text was made from Python's documentation -----------------------------------------------
# Source: the reStructuredText sources of Python 3.11's documentation as Debian ships them (package python3.11-doc
# 3.11.2-6+deb12u8, /usr/share/doc/python3.11/html/_sources), under the PSF License (toys/text/LICENSE.txt).
SECTIONS = ["tutorial", "howto", "faq", "reference", "glossary.rst.txt", "library"]
TO_ASCII = {"\u2018": "'", "\u2019": "'", "\u201c": '"', "\u201d": '"', "\u2013": "-", "\u2014": "--",
            "\u2026": "...", "\u00a0": " ", "\u2022": "*", "\u00d7": "x", "\u2192": "->"}
UNDERLINE = re.compile(r"([=\-~^*#+\"'`.:_])\1{2,}")


def plain(text):
    """reStructuredText inline markup as plain ASCII text: roles, literals, links and emphasis keep their words."""
    text = re.sub(r":[\w:+.-]+:`([^`<]*?)\s*<[^`>]*>`", r"\1", text)             # :role:`title <target>`
    text = re.sub(r":[\w:+.-]+:`~([^`]*)`", lambda m: m.group(1).split(".")[-1], text)   # :role:`~a.b.c` -> c
    text = re.sub(r":[\w:+.-]+:`!?([^`]*)`", r"\1", text)                          # :role:`text`
    text = re.sub(r"`([^`<]*?)\s*<[^`>]*>`__?", r"\1", text)                       # `title <url>`_
    text = re.sub(r"``([^`]*)``", r"\1", text)
    text = re.sub(r"`([^`]*)`_?_?", r"\1", text)
    text = re.sub(r"\*\*([^*]+)\*\*", r"\1", text)
    text = re.sub(r"(?<![\w*])\*([^*\s][^*]*)\*(?![\w*])", r"\1", text)
    text = re.sub(r"\|[\w -]+\|_?|\[#\w*\]_", "", text)                             # substitutions, footnotes
    text = unicodedata.normalize("NFKD", "".join(TO_ASCII.get(ch, ch) for ch in text))
    return re.sub(r"\s+", " ", text.encode("ascii", "ignore").decode()).strip()


def prose(source):
    """The paragraphs of a reStructuredText document as plain text, one per item; headings are paragraphs of their
    own; directives, comments, literal blocks (after "::"), doctest lines and tables are left out."""
    lines, out, paragraph, skip_deeper_than, literal = source.splitlines(), [], [], None, False

    def end_paragraph():
        nonlocal paragraph, literal
        if paragraph:
            text = " ".join(paragraph)
            literal = text.endswith("::")                   # an indented literal block follows
            text = plain(re.sub(r"\s*::$", ":", text))
            if text and not UNDERLINE.fullmatch(text.replace(" ", "")):
                out.append(text)
        paragraph = []

    for i, line in enumerate(lines):
        stripped, indent = line.strip(), len(line) - len(line.lstrip())
        if skip_deeper_than is not None and (not stripped or indent > skip_deeper_than):
            continue                                        # inside a directive or a literal block
        skip_deeper_than = None
        if not stripped:
            end_paragraph()
        elif literal and not paragraph and indent > 0:
            skip_deeper_than, literal = indent - 1, False
        elif stripped.startswith(".."):
            end_paragraph()
            skip_deeper_than = indent
        elif UNDERLINE.fullmatch(stripped) or re.match(r"(>>>|\.\.\.|\+[-=]|={3,} )", stripped):
            end_paragraph()
        elif not paragraph and i + 1 < len(lines) and UNDERLINE.fullmatch(lines[i + 1].strip()):
            out.append(plain(stripped))                      # a heading
        else:
            literal = False
            paragraph.append(stripped)
    end_paragraph()
    return out


def documents_of(sources):
    """The documentation's sources under the folder sources, in the order of SECTIONS (each a folder of .txt files,
    or one file)."""
    documents = []
    for section in SECTIONS:
        path = os.path.join(sources, section)
        files = [path] if os.path.isfile(path) else sorted(
            os.path.join(folder, name) for folder, _, names in os.walk(path) for name in names if name.endswith(".txt"))
        documents += files
    return documents


def make_text(sources, folder, train_bytes=1_750_000, heldout_every=10):
    """train.txt and heldout.txt in folder (the toys': TEXT_DIR) from the documentation's sources: the documents of
    SECTIONS in order, every heldout_every-th one held out, until the training part reaches train_bytes. Sources that
    give no training or no held-out paragraph are refused, the files left as they were; each file is written whole
    beside its place, then renamed into it. Returns {split: characters written}."""
    documents = documents_of(sources)
    if not documents:
        raise models.UsageError(f"{sources} holds none of the documentation's sources (the .txt files of "
                                f"{', '.join(SECTIONS)}): give the folder _sources of Python's HTML documentation, "
                                "e.g. /usr/share/doc/python3.11/html/_sources")
    parts = {"train": [], "heldout": []}
    for i, file in enumerate(documents):
        if sum(len(p) + 1 for p in parts["train"]) >= train_bytes:
            break
        try:
            with open(file, encoding="utf-8") as f:
                parts["heldout" if i % heldout_every == heldout_every - 1 else "train"] += prose(f.read())
        except (OSError, UnicodeDecodeError) as e:
            raise models.UsageError(f"cannot read {file}: {e.strerror if isinstance(e, OSError) else 'not UTF-8'}")
    for split, paragraphs in parts.items():
        if not paragraphs:
            raise models.UsageError(f"{sources} gives no {split} text: its {len(documents)} documents hold no prose "
                                    f"for it (one document in {heldout_every} is held out)")
    texts = {split: "\n".join(paragraphs) + "\n" for split, paragraphs in parts.items()}
    os.makedirs(folder, exist_ok=True)
    partial = {split: os.path.join(folder, f".{split}.txt.partial") for split in texts}
    try:
        for split, text in texts.items():
            with open(partial[split], "w", encoding="ascii") as f:
                f.write(text)
        for split in texts:
            os.replace(partial[split], os.path.join(folder, f"{split}.txt"))
    finally:
        for path in partial.values():
            if os.path.exists(path):
                os.remove(path)
    return {split: len(text) for split, text in texts.items()}


# --- Command line -------------------------------------------------------------------------------------------------
README_PROMPT = "The function returns"      # the README's demo prompt


def lr_check(name, rates=(1.5e-3, 3e-3, 6e-3), steps=80, seed=0):
    """A short run (the schedule compressed to `steps`) at each peak learning rate: {rate: held-out bits/char}."""
    results = {}
    for rate in rates:
        schedule = {**SCHEDULE, "steps": steps, "warmup": steps // 10, "lr": rate}
        out = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"hsd-lr-check-{name}-{rate}")
        results[rate] = train(name, out, seed, schedule)["heldout"]["bits_per_char"]["full"]
    return results


def report():
    """For each toy and, for contrast, each random tiny model: held-out bits per character, the word rates of greedy
    and T=0.6 continuations of README_PROMPT, the copying probe (copying) and the loop share of the greedy continuation
    (loop_share), all measured now, not read from the training logs: {model: {...}}."""
    vocabulary = set(words(read_text("train")))
    prompts = cost_model.copy_prompts(read_text("heldout").splitlines(), cost_model.COPY_PASSAGES)
    tokenizer, rows = models.char_tokenizer(), {}
    for name in [*models.TOYS, *models.TINY]:
        model = models.load(name)
        row = rows[name] = {"bits_per_char": heldout_bits_per_char(model, heldout_windows())}
        for label, temperature in (("greedy", 0.0), ("T=0.6", 0.6)):
            text = continuation(model, tokenizer, README_PROMPT, LOOP_CHARACTERS, temperature=temperature)
            row[label] = {"text": text, **dict(zip(("word_rate", "different_words"), word_rate(text, vocabulary)))}
        row["copying"] = copying(model, tokenizer, prompts)
        row["loop_share"] = loop_share(row["greedy"]["text"], LOOP_SIZE)
    return rows


def output_folder(name, out=None, force=False):
    """The folder that training the toy `name` writes: out, else the shipped toy's own, which holds its weights and is
    replaced only when asked in words (out naming it, or force). A file where the folder should be is refused."""
    folder = out or models.TOYS[name]
    other = next((toy for toy, path in models.TOYS.items() if toy != name and os.path.exists(folder)
                  and os.path.samefile(path, folder)), None)
    if other and not force:                               # --out naming another toy's folder asks for that toy only
        raise models.UsageError(f"{os.path.relpath(folder)} holds the shipped {other}, which training {name} would "
                                "replace: --out FOLDER trains one elsewhere; --force replaces it")
    if out is None and not force and os.path.exists(os.path.join(folder, "model.safetensors")):
        shown = os.path.relpath(folder)
        raise models.UsageError(f"{shown} holds the shipped {name}, which training would replace: --out FOLDER trains "
                                f"one elsewhere; --out {shown} or --force replaces it")
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise models.UsageError(f"--out {folder} is a file, not a folder: give a folder for the checkpoint")
    return folder


def main(argv=None):
    p = argparse.ArgumentParser(description="Train hsd's toy models (toys/README.md).")
    p.error = lambda message: p.exit(2, f"hsd_train: error: {message} (see --help)\n")
    p.add_argument("--model", help=f"{', '.join(TOY_CONFIGS)}: train this toy from scratch, or resume its run "
                                   "(no default)")
    p.add_argument("--seed", type=int, default=0, help="seed of the weights and of the batches (default: 0)")
    p.add_argument("--out", metavar="FOLDER", help="folder for the checkpoint (default: toys/NAME, the shipped toy, "
                                                   "which only --out toys/NAME or --force replaces)")
    p.add_argument("--force", action="store_true", help="without --out: replace the shipped toy (default: refuse)")
    p.add_argument("--steps", type=int, default=SCHEDULE["steps"],
                   help=f"training steps (default: {SCHEDULE['steps']})")
    p.add_argument("--threads", type=int, metavar="N", help="torch's threads (default: torch's choice, "
                                                            f"{torch.get_num_threads()} here)")
    p.add_argument("--lr-check", action="store_true", help="with --model: short runs at three peak learning rates")
    p.add_argument("--report", action="store_true", help="held-out loss, word rates, copying and loop share of the "
                                                         "toys and tiny models")
    p.add_argument("--make-text", metavar="SOURCES", help="write toys/text from Python's documentation sources, e.g. "
                                                          "/usr/share/doc/python3.11/html/_sources (no default)")
    p.add_argument("--json", action="store_true", help="the result as one JSON object: stdout holds it alone, the "
                                                      "other lines go to stderr")
    misspelt = cli.misspelt_option(p, sys.argv[1:] if argv is None else argv)
    if misspelt:
        p.error(misspelt)
    args = p.parse_args(argv)
    if args.model is not None and args.model not in TOY_CONFIGS:
        close = difflib.get_close_matches(args.model, list(TOY_CONFIGS), n=1)
        p.error(f"unknown toy {args.model!r}: " + (f"did you mean {close[0]}? " if close else "")
                + f"one of {', '.join(TOY_CONFIGS)}")
    out = sys.stderr if args.json else sys.stdout                     # --json: stdout holds the JSON alone
    try:
        if args.threads is not None and args.threads < 1:
            raise models.UsageError(f"--threads must be at least 1 (got {args.threads})")
        if args.threads is not None:
            torch.set_num_threads(args.threads)
        if args.make_text:
            result = make_text(args.make_text, TEXT_DIR)
            print(f"wrote {os.path.join(TEXT_DIR, 'train.txt')} ({result['train']:,} characters) and heldout.txt "
                  f"({result['heldout']:,}) from {args.make_text}", file=out)
        elif args.report:
            result = report()
            for name, row in result.items():
                print(f"{name:15} {row['bits_per_char']:.3f} bits/char held out; words found in the training text: "
                      f"greedy {row['greedy']['word_rate']:.0%} ({row['greedy']['different_words']} different), "
                      f"T=0.6 {row['T=0.6']['word_rate']:.0%} ({row['T=0.6']['different_words']} different)", file=out)
                copied = row["copying"]
                print(f"{'':15} copies {copied['share']:.1%} of {len(copied['matched'])} held-out passages "
                      f"({sum(copied['matched'])} of {sum(copied['remaining'])} characters); "
                      f"greedy text's loop share {row['loop_share']:.2f}", file=out)
        elif args.model and args.lr_check:
            result = lr_check(args.model)
            print(", ".join(f"peak lr {rate:g}: {bits:.3f} bits/char held out" for rate, bits in result.items()),
                  file=out)
        elif args.model:
            if args.steps < 1:
                raise models.UsageError(f"--steps must be at least 1 (got {args.steps})")
            folder = output_folder(args.model, args.out, args.force)
            result = train(args.model, folder, args.seed, {**SCHEDULE, "steps": args.steps})
            print(f"{args.model}: {result['seconds'] / 60:.1f} min, held-out bits/char " + ", ".join(
                f"{label} {bits:.3f}" for label, bits in result["heldout"]["bits_per_char"].items())
                + f"; copies {result['copying']['share']:.1%} of {result['copying']['passages']} held-out passages, "
                f"greedy text's loop share {result['loop_share']['share']:.2f}; saved in {folder}", file=out)
        else:
            raise models.UsageError("give --model NAME (to train), --report or --make-text SOURCES")
    except models.UsageError as e:
        print(f"hsd_train: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:                                  # a folder that cannot be made, a full disk: one line
        print(f"hsd_train: error: cannot write {e.filename}: {e.strerror}" if e.filename else f"hsd_train: error: {e}",
              file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        print(f"\nhsd_train: interrupted{': ' + str(e) if str(e) else ''}", file=sys.stderr)
        return 130
    if args.json:
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    sys.exit(main())

"""drafts: what a draft is. A draft is data, a models.Skip (which units of which layers the full model leaves out),
or the text's own n-grams (the lookup, hsd.lookup), or both (a cascade: the lookup proposes, the Skip's draft model
drafts where the text has nothing and, with a fixed k, checks a shorter proposal and drafts on), with its k (drafts
per round, or "auto") and its stop (a confidence threshold, or None): a Draft.

  the paper's drafts   DRAFTS, draft_skip, paper_draft, paper_skips: the three fixed strategies as Skips
  the text's drafts    LOOKUP, split_lookup: "lookup" and "lookup+DRAFT" (a cascade) by name
  in words             draft_words: the line hsd.py's command line shows for a Draft
  draft files          DRAFT_FORMAT, is_draft_file, read_draft_file, draft_file, write_draft_file: a draft found by
                       measurement (hsd_search.py writes them) or written by hand (README, "Draft files"); draft_costs:
                       the costs (c, {d: v[d]}, r) a Draft carries for -k auto; predictions, prediction_at,
                       predicts_a_loss: the speedups its search predicted, read in one place
  identity             SIZES, weights_fingerprint, identity, cpu_name, device_name: what a file is checked against

hsd.py decides which draft a generation runs (choose_draft); this module only says what drafts are.
"""
import difflib
import hashlib
import json
import math
import os
import platform
from collections import namedtuple

import torch

import models

DRAFTS = ("component", "layerskip", "early-exit", "none")     # "none": plain decoding, no draft
LOOKUP = "lookup"       # the text's own n-grams as the draft; "lookup+DRAFT" (DRAFT: one of DRAFTS, a file): a cascade
Draft = namedtuple("Draft", "name skip k stop costs lookup predicted", defaults=(None, None, None))
# what a generation runs: skip None and lookup None is plain decoding (k None then); stop: a confidence threshold or
# None; costs: (c, {d: v[d]}, r) in units of a plain step, for -k auto (None: hsd's default rule); lookup: the largest
# n-gram of the lookup (hsd.lookup's n), None for none: with a skip, a cascade; predicted: a draft file's predicted
# speedups at its own k and stop, {temperature as f"{t:g}": speedup} (found_by.predicted_speedup), else None


# --- The paper's drafts: which parts of the full model the draft leaves out ----------------------------------------
def draft_skip(config, name):
    """The models.Skip of a draft strategy of the paper: "component", "layerskip" or "early-exit"."""
    n = config.num_layers
    if name == "component":
        if config.family == "falcon_h1":      # parallel hybrid: the attention branch of every layer adds nothing
            return models.Skip(attention=frozenset(range(n)))
        if config.family == "qwen3_5":        # sequential hybrid: the full-attention layers become identity
            return models.Skip(layers=frozenset(i for i, t in enumerate(config.layer_types) if t == "full_attention"))
        raise models.UsageError("a Transformer (qwen2) has no attention-free part to draft with: use --draft layerskip")
    if name == "layerskip":                   # int(0.33 n) contiguous middle layers
        start, skipped = n // 2 - int(0.33 * n) // 2, int(0.33 * n)
        return models.Skip(layers=frozenset(range(start, start + skipped)))
    if name == "early-exit":                  # the first int(0.5 n) layers, then the final norm and LM head
        return models.Skip(layers=frozenset(range(int(0.5 * n), n)))
    raise models.UsageError(f"unknown draft {name!r}: choose one of {', '.join(DRAFTS[:-1])} (or none: no draft), "
                            "or give a draft file")


def paper_draft(config):
    """The paper's draft for the model's family: component for a hybrid, layerskip for the Transformer control."""
    return "layerskip" if config.family == "qwen2" else "component"


def split_lookup(asked):
    """A draft asked for -> (whether the lookup proposes, the rest): "lookup" -> (True, "none"), "lookup+DRAFT" ->
    (True, "DRAFT"), anything else (a name, a file, a Skip, a Draft, None) -> (False, asked)."""
    if isinstance(asked, str) and (asked == LOOKUP or asked.startswith(LOOKUP + "+")):
        rest = asked[len(LOOKUP) + 1:] or "none"
        if asked != LOOKUP and (rest == "none" or split_lookup(rest)[0]):
            raise models.UsageError(f"{asked!r}: after lookup+ name a draft model (component, layerskip, early-exit "
                                    "or a draft file), or use lookup alone")
        return True, rest
    return False, asked


def draft_words(chosen, config, default, least):
    """A Draft in the command line's words: its name, why it was chosen (default: it is the paper's for the model's
    family), its k and stop, the n-grams its lookup matches (largest chosen.lookup, shortest least) and what it leaves
    out; "draft none: plain decoding" for no draft."""
    if chosen.k is None:
        return "draft none: plain decoding"
    why = f" (the paper's for {config.family})" if default else ""
    k = ("k auto" if chosen.k == "auto" else f"k={chosen.k}") + (f", stop below {chosen.stop}" if chosen.stop else "")
    sizes = f"{chosen.lookup}- to {least}" if chosen.lookup and chosen.lookup > least else chosen.lookup
    text = f"the text's {sizes}-grams" if chosen.lookup else ""
    if chosen.skip is None:
        return f"draft {chosen.name}, {k}: {text} propose"
    checked = f": {text} propose, else a draft model that skips {chosen.skip}" if text else ""
    return f"draft {chosen.name}{why}, {k}{checked or f': skips {chosen.skip}'}"


def paper_skips(config):
    """{draft name: models.Skip} of the paper's drafts that apply to the model (a Transformer has no component
    draft): what the tools measure beside a draft of their own."""
    return {name: draft_skip(config, name) for name in DRAFTS
            if name != "none" and (name != "component" or config.family != "qwen2")}


# --- What identifies a model and a machine (a draft file names those it was searched on) ---------------------------
SIZES = ("vocab_size", "hidden_size", "intermediate_size", "num_heads", "num_kv_heads", "head_dim", "mamba_n_heads",
         "mamba_d_head", "mamba_d_state", "mamba_n_groups", "linear_num_key_heads", "linear_num_value_heads",
         "linear_key_head_dim", "linear_value_head_dim")
ARCHITECTURE = ("family", "layer_types", "sizes")      # what a draft must match; the weights it only should


def weights_fingerprint(model):
    """sha256 over every parameter's name, shape and up to 4096 evenly spaced values rounded to bfloat16: the same for
    one checkpoint loaded in float32 or bfloat16, another for other weights (a retrained model); cheap at any size."""
    h = hashlib.sha256()
    for name, param in model.named_parameters():
        flat = param.detach().reshape(-1)
        sample = flat[::max(1, flat.numel() // 4096)][:4096].to("cpu", torch.bfloat16).view(torch.int16)
        h.update(f"{name} {tuple(param.shape)}\n".encode() + sample.numpy().tobytes())
    return h.hexdigest()


def identity(model):
    """What a draft file says of the model it was searched on: the architecture (family, layer types, sizes), which a
    draft must match, and the weights' fingerprint, which it should."""
    config = model.config
    return {"family": config.family, "layer_types": list(config.layer_types),
            "sizes": {s: getattr(config, s) for s in SIZES}, "weights_sha256": weights_fingerprint(model)}


def cpu_name():
    """The processor, as /proc/cpuinfo names it ("AMD EPYC ..."), else platform's word for it."""
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def device_name(device):
    """The device a draft was searched on, in words: "cuda NVIDIA H200", "cpu AMD EPYC" (costs depend on it)."""
    if device.type == "cuda":
        return f"cuda {torch.cuda.get_device_name(device)}"
    return f"cpu {cpu_name()}"


# --- Draft files: writing --------------------------------------------------------------------------------------------
DRAFT_FORMAT = "hsd-draft/1"


def draft_file(name, model_identity, skip, k, stop, found_by, lookup=None):
    """A draft file's JSON object: the model it is for (its name and identity()), the Skip, k, the stop (a confidence
    threshold or None) and found_by (how it was found; its "costs", "device" and "threads" are read back); lookup: the
    lookup's n, for a cascade (None: none)."""
    spec = {"format": DRAFT_FORMAT, "model": {"name": name, **model_identity},
            "skip": {field: sorted(getattr(skip, field)) for field in ("layers", *models.UNITS)},
            "k": k, "stop": None if stop is None else {"confidence": stop}, "found_by": found_by}
    return spec if lookup is None else {**spec, "lookup": {"n": lookup}}


def write_draft_file(path, spec):
    """Write a draft file's object as JSON, through a file beside it and a rename: an interrupted write leaves no half
    file."""
    partial = f"{path}.partial"
    with open(partial, "w", encoding="utf-8") as f:
        json.dump(spec, f, indent=1)
        f.write("\n")
    os.replace(partial, path)


# --- Draft files: reading ------------------------------------------------------------------------------------------
def is_draft_file(asked):
    """Whether a draft asked for names a draft file: a pathlib.Path, or a str that is not one of DRAFTS nor a lookup
    (split_lookup: "lookup+FILE" names one after the lookup)."""
    return isinstance(asked, os.PathLike) or (isinstance(asked, str) and asked not in DRAFTS and
                                              not split_lookup(asked)[0])


def json_words(value):
    """A JSON value as a message shows it: JSON's words (null, true, {"confidence": 0}), not Python's."""
    return json.dumps(value, ensure_ascii=False)


def read_json(path, bad):
    """The file's JSON value (a byte-order mark tolerated); bad(what) makes the error of a damaged file."""
    try:
        with open(path, encoding="utf-8-sig") as f:
            return json.load(f)
    except FileNotFoundError:
        if os.path.splitext(path)[1] or os.sep in str(path):                 # meant as a file
            raise models.UsageError(f"cannot read the draft file {path}: No such file") from None
        raise models.UsageError(f"unknown draft {str(path)!r}: choose one of {', '.join(DRAFTS)}, or give a draft file "
                                "(there is no such file)") from None
    except OSError as e:
        raise models.UsageError(f"cannot read the draft file {path}: {e.strerror}") from None
    except UnicodeDecodeError:
        raise bad("damaged: not UTF-8 text") from None
    except json.JSONDecodeError as e:
        raise bad(f"damaged: {e}") from None
    except RecursionError:
        raise bad("damaged: nested too deeply to read") from None
    except ValueError as e:                               # e.g. a number of more digits than Python reads
        raise bad(f"damaged: {str(e).split(':')[0]}") from None


def check_architecture(path, theirs, model):
    """The notes of a file's "model" block against the model: a UsageError if an architecture it names differs; a
    note if it names none (a file written by hand) or other weights."""
    if not isinstance(theirs, dict):
        theirs = {}
    mine = identity(model)
    different = [key for key in ARCHITECTURE if key in theirs and theirs[key] != mine[key]]
    if different:
        written_for = f"; it was written for {theirs['name']}" if isinstance(theirs.get("name"), str) else ""
        raise models.UsageError(f"{path} is a draft for another architecture (its {', '.join(different)} differ from "
                                f"this model's{written_for}): search one for this model with python hsd_search.py")
    missing = [key for key in ARCHITECTURE if key not in theirs]
    if missing:
        return [(f"{path} does not name the model's {', '.join(missing)}: it runs, since this model has the layers "
                 "and units it names, but was not checked against an architecture")]
    if "weights_sha256" in theirs and theirs["weights_sha256"] != mine["weights_sha256"]:
        return [(f"{path} was searched on other weights of this architecture (a retrained model?): it decodes "
                 "correctly, as any draft does, but its measured speed may not hold")]
    return []


def skip_of(path, fields, model, bad):
    """The file's "skip" object -> a models.Skip the model has; duplicates and units of whole layers fold away."""
    names = ("layers", *models.UNITS)
    if fields is None:
        raise bad('no "skip" and no "lookup": name what the draft model leaves out, the text\'s n-grams, or both')
    for name in sorted(set(fields) - set(names) if isinstance(fields, dict) else ()):    # {"attn": [3]}: a misspelling
        close = difflib.get_close_matches(name, names, n=1)
        if close:
            raise bad(f'"skip" holds lists of layer indices under {", ".join(names)}: "{name}" is none of them; did '
                      f'you mean "{close[0]}"?')
    if not isinstance(fields, dict) or set(fields) - set(names) or not all(
            isinstance(layers, list) and all(type(i) is int for i in layers) for layers in fields.values()):
        raise bad(f'"skip" holds lists of layer indices under {", ".join(names)}')
    if not any(fields.values()):
        raise models.UsageError(f"{path} skips nothing: the full model would draft for itself; name at least one "
                                "layer or unit (or use --draft none for plain decoding)")
    skip = models.Skip(**fields)
    try:
        models.check_skip(model.config, skip)
    except models.UsageError as e:
        raise models.UsageError(f"{path}: {e}") from None
    return skip


def draft_costs(c, v, r=None):
    """A draft's costs for -k auto, in units of a plain step -> (c, {d: v[d]}, r): c a draft step, v the verify
    passes, a dict {d: v[d]} (keys ints or digit strings) or a sequence whose item d is v[d] (item 0, d = 0, unused),
    r a round's own work beyond them (cost_model.round_cost). A UsageError for anything but finite numbers, positive
    but c, which may be 0 (the lookup: no draft step), and r (a measured r may fall a little below 0); r left out
    (None) too: the model has no form without it."""
    try:
        pairs = v.items() if isinstance(v, dict) else enumerate(v)
        c, v, r = float(c), {int(d): float(x) for d, x in pairs if int(d) >= 1}, float(r)
    except (TypeError, ValueError):
        v = None
    if not v or not 0 <= c < math.inf or not all(0 < x < math.inf for x in v.values()) or not math.isfinite(r):
        raise models.UsageError("costs must be (c, v, r): c a number from 0 on, v a dict {d: v[d]} or a sequence "
                                "indexed by d, of positive numbers, r a number (in units of a plain step)")
    return c, v, r


def costs_of(found_by, bad):
    """found_by's measured costs -> (c, {d: v[d]}, r), or None if the file has none. found_by["costs"] holds "c"
    (older files: found_by["c"]["measured"]), "v": {"1": v[1], ...} and "r", in units of a plain step; a file written
    before r was measured has none: r = 0 then (old_costs_note says so)."""
    costs = found_by.get("costs")
    if not isinstance(costs, dict) or "v" not in costs:
        return None
    older = found_by.get("c")
    c = costs.get("c", older.get("measured") if isinstance(older, dict) else None)
    if c is None:
        return None
    wrong = bad('"found_by": "costs" must hold "c": a positive number, "v": {"1": a positive number, ...} and "r": '
                'a number')
    if isinstance(c, bool) or not isinstance(costs["v"], dict) or isinstance(costs.get("r"), bool):
        raise wrong
    try:
        return draft_costs(c, costs["v"], costs.get("r", 0.0))
    except models.UsageError:
        raise wrong from None


def old_costs_note(path, found_by):
    """The note of a file whose costs carry no r (written before the cost model measured a round's own work), else
    None: -k auto then pauses as if a round cost only its draft steps and its verify pass."""
    costs = found_by.get("costs")
    if isinstance(costs, dict) and "v" in costs and "r" not in costs:
        return (f"{path} was searched before the cost model measured a round's own cost (r): its -k auto pauses as "
                "if r = 0, drafting where it may not pay; search again with python hsd_search.py")
    return None


def read_draft_file(path, model, temperature=None, context=None):
    """A draft file (any name, a str or a pathlib.Path) -> (Draft, notes): one-line notes of a file searched on other
    weights, another device or another number of threads, at another temperature or context than the run's (when
    given: its temperature, and its context, the prompt and half the new tokens), or that names no architecture. A
    UsageError for a file that cannot be read, is damaged or no draft file, names another architecture, skips
    nothing, or names a layer or unit the model does not have. "lookup": {"n": N} makes the text's n-grams propose: with no "skip", the lookup alone (which
    depends on no architecture: none is checked); with one, a cascade. README, "Draft files", shows the format."""
    def bad(what):
        return models.UsageError(f'{path} is not a valid draft file ({what}): README, "Draft files", shows the format')
    spec = read_json(path, bad)
    if not isinstance(spec, dict) or spec.get("format") != DRAFT_FORMAT:
        raise bad(f'no "format": "{DRAFT_FORMAT}"')
    lookup = spec.get("lookup")
    if lookup is not None and not (isinstance(lookup, dict) and set(lookup) == {"n"} and type(lookup["n"]) is int
                                   and lookup["n"] >= 1):
        raise bad(f'"lookup" must be {{"n": the largest n-gram, a number from 1 on}}, not {json_words(lookup)}')
    if lookup is not None and "skip" not in spec:                               # the lookup alone
        notes, skip = [], None
    else:
        notes = check_architecture(path, spec.get("model"), model)
        skip = skip_of(path, spec.get("skip"), model, bad)
    k, stop = spec.get("k"), spec.get("stop")
    if not (k == "auto" or (type(k) is int and k >= 1)):
        raise bad('"k" is missing' if "k" not in spec else
                  f'"k" must be a number of drafts (at least 1) or "auto", not {json_words(k)}')
    if not (stop is None or (isinstance(stop, dict) and set(stop) == {"confidence"}
                             and isinstance(stop["confidence"], (int, float)) and 0 < stop["confidence"] < 1)):
        raise bad(f'"stop" must be null or {{"confidence": a number between 0 and 1}}, not {json_words(stop)}')
    found_by = spec.get("found_by") if isinstance(spec.get("found_by"), dict) else {}
    here = device_name(model.lm_head.weight.device)
    if found_by.get("device") is not None and found_by["device"] != here:
        notes.append(f"{path} was searched on {found_by['device']}, this run is on {here}: the costs of its parts "
                     "differ, so it may not be the fastest draft here")
    threads = found_by.get("threads")
    if isinstance(threads, int) and threads != torch.get_num_threads():
        notes.append(f"{path} was searched with {threads} threads, this run uses {torch.get_num_threads()}: threads "
                     "change every cost, so it may not be the fastest draft here")
    notes += run_notes(path, found_by, temperature, context)
    notes += [note for note in [old_costs_note(path, found_by)] if note]
    lookup_n = lookup and lookup["n"]
    return Draft(str(path), skip, k, stop and stop["confidence"], costs_of(found_by, bad), lookup_n,
                 predictions(found_by)), notes


def predictions(found_by):
    """found_by["predicted_speedup"] -> {temperature as f"{t:g}": the speedup its search predicted there, at the
    file's own k and stop}, its numbers only; None if it has none."""
    predicted = found_by.get("predicted_speedup")
    predicted = ({t: x for t, x in predicted.items() if isinstance(x, (int, float)) and not isinstance(x, bool)}
                 if isinstance(predicted, dict) else None)
    return predicted or None


def prediction_at(predicted, temperature):
    """The predicted speedup at a temperature (predicted: predictions', a Draft's), or None."""
    return (predicted or {}).get(f"{temperature:g}") if temperature is not None else None


def predicts_a_loss(predicted):
    """Whether a draft file's predicted speedup at a temperature (prediction_at's, or None) is a loss: -k auto then
    starts with its longest pause (hsd.first_plan), and run_notes says so."""
    return predicted is not None and predicted < 1


def run_notes(path, found_by, temperature, context):
    """Notes of a draft file used at a temperature or a context it was not searched for (found_by["costs"]): a draft
    that pays greedy may not at T = 0.6, and costs move with the context (RESULTS.md, "Cost against context"); and of
    one whose search predicted a loss at the run's temperature (found_by["predicted_speedup"]), which -k auto then
    starts paused."""
    costs = found_by.get("costs") if isinstance(found_by.get("costs"), dict) else {}
    searched_t, searched_context, notes = costs.get("temperature"), costs.get("context"), []
    said = prediction_at(predictions(found_by), temperature)
    if isinstance(searched_t, (int, float)) and temperature is not None and not math.isclose(searched_t, temperature):
        notes.append(f"{path} was searched at temperature {searched_t:g}, this run samples at {temperature:g}" +
                     (f": its prediction here is {said:.2f}x" if said is not None else
                      ": it decodes correctly, but may not be the fastest draft here"))
    if predicts_a_loss(said):                                                              # hsd.first_plan's prior
        notes.append(f"{path}: its search predicted a loss at temperature {temperature:g} ({said:.2f}x at its own k): "
                     "with -k auto it starts with its longest pause")
    if isinstance(searched_context, int) and context and not searched_context / 2 <= context <= 2 * searched_context:
        notes.append(f"{path} was searched at a context of {searched_context} tokens, this run's is about {context}: "
                     "costs move with the context, so it may not be the fastest draft here")
    return notes

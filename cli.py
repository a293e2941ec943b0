"""The command lines' helpers, apart from generation itself: reading arguments and printing a generation.

Arguments: misspelt_option, which every tool's command line asks about an option it does not know ("did you mean
--model?"), and hsd.py's -k (k_argument) and --prompt-file (read_prompt). What hsd.generate is asked, checked so that a
user's mistake ends in one line: check_request (k, the temperature by temperature_problem, the prompt's ids and length)
and prompt_list (what a prompt may be given as). Printing, as hsd.py's command line shows a generation: token ids as
text (show), a round of --trace (trace_line) and a run of plain steps (plain_line), the lines after the output (summary)
and --check's report (check). It runs no generation of its own: check is given hsd.generate. It stands on models, drafts
and cost_model; hsd.py and the tools stand on it (no tool imports another).
"""
import argparse
import difflib
import json
import math
import sys
from statistics import median

import torch

import cost_model
import models


# --- Arguments ---------------------------------------------------------------------------------------------------
def misspelt_option(parser, argv):
    """"unknown option --modle: did you mean --model?" for the first --option of argv (a list of words) that the parser
    does not know (nor abbreviates, as argparse allows) and that is close to one it knows; None if there is none."""
    known = [option for action in parser._actions for option in action.option_strings
             if option.startswith("--") and option != "--help"]
    for word in argv:
        name = word.split("=")[0]
        if word == "--":
            return None
        close = difflib.get_close_matches(name, known, n=1, cutoff=0.75)
        if name.startswith("--") and not any(option.startswith(name) for option in known) and close:
            return f"unknown option {name}: did you mean {close[0]}?"
    return None


def k_argument(text):
    """-k: a number of drafts per round, or auto."""
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"-k takes a number of drafts or auto, not {text!r}") from None


def read_prompt(path):
    """--prompt-file: the text of a UTF-8 file (- : standard input), its last line break left out (as llama.cpp's -f);
    a UsageError if it cannot be read."""
    try:
        if path == "-":
            text = sys.stdin.read()
        else:
            with open(path, encoding="utf-8") as f:
                text = f.read()
    except OSError as e:
        raise models.UsageError(f"cannot read --prompt-file {path}: {e.strerror}") from None
    except UnicodeDecodeError:
        raise models.UsageError(f"--prompt-file {path} is not UTF-8 text") from None
    return text[:-2] if text.endswith("\r\n") else text[:-1] if text.endswith("\n") else text


# --- What generate is asked: a user's mistake ends in one line saying what to do ------------------------------
MIN_TEMPERATURE = 1e-3     # below it logits / T overflow float64 (1e-320 did): for such sharpness, sample greedy


def temperature_problem(temperature):
    """The line saying what is wrong with a temperature (0, greedy, or a finite number from MIN_TEMPERATURE on), or
    None if nothing is: the same words from hsd.py's --temperature and from generate (check_request)."""
    if temperature == 0 or MIN_TEMPERATURE <= temperature < math.inf:                 # NaN too
        return None
    return f"the temperature must be 0 (greedy) or a finite number from {MIN_TEMPERATURE} on (got {temperature})"


def check_request(config, prompt, new_tokens, k=1, temperature=0.0):
    """A UsageError for the first thing wrong with a request to generate new_tokens after the prompt (token ids),
    drafting k tokens a round (or "auto"; None: plain decoding), at a temperature; nothing if all is well."""
    if k not in (None, "auto") and k < 1:
        raise models.UsageError(f"k must be at least 1 (got {k})")
    problem = temperature_problem(temperature)
    if problem:
        raise models.UsageError(problem)
    if not prompt:
        raise models.UsageError("the prompt is empty: give at least one token")
    if not all(0 <= t < config.vocab_size for t in prompt):
        raise models.UsageError(f"token ids must lie in 0..{config.vocab_size - 1}")
    if new_tokens < 0:
        raise models.UsageError(f"the number of new tokens must be at least 0 (got {new_tokens})")
    if len(prompt) + new_tokens > config.max_position_embeddings:
        room = config.max_position_embeddings - len(prompt)
        raise models.UsageError(f"prompt + new tokens exceed the model's context of {config.max_position_embeddings}: "
                                + (f"after the prompt's {len(prompt)} tokens, at most {room} new tokens fit" if room > 0
                                   else f"the prompt alone has {len(prompt)} tokens: shorten it"))


def prompt_list(prompt_ids):
    """generate's prompt -> a list of ints: a list of ints, a 1-D integer tensor, or a (1, T) one (transformers' habit).
    A TypeError or UsageError in one sentence saying what to pass for anything else: text, a tokenizers.Encoding
    (its .ids), a batch of prompts, token ids as floats."""
    what = "pass the prompt's token ids: a list of ints, e.g. tokenizer.encode(text).ids, or a (1, T) LongTensor"
    if isinstance(prompt_ids, (str, bytes)):
        raise TypeError(f"generate takes token ids, not text: {what}")
    if hasattr(prompt_ids, "ids") and not torch.is_tensor(prompt_ids):
        raise TypeError(f"generate takes token ids, not a {type(prompt_ids).__name__}: pass its .ids")
    if torch.is_tensor(prompt_ids):
        if prompt_ids.is_floating_point() or prompt_ids.is_complex() or prompt_ids.dtype == torch.bool:
            raise TypeError(f"generate takes integer token ids, not a {prompt_ids.dtype} tensor: {what}")
        if prompt_ids.dim() == 2 and prompt_ids.shape[0] != 1:
            raise models.UsageError(f"generate decodes one prompt (batch size 1), not a batch of shape "
                                    f"{tuple(prompt_ids.shape)}: pass one row, e.g. ids[0]")
        if prompt_ids.dim() not in (1, 2):
            raise TypeError(f"generate takes a 1-D or (1, T) tensor of token ids, not one of shape "
                            f"{tuple(prompt_ids.shape)}")
        return prompt_ids.reshape(-1).tolist()
    ids = list(prompt_ids)
    if not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
        wrong = next(t for t in ids if not (isinstance(t, int) and not isinstance(t, bool)))
        raise TypeError(f"generate takes token ids (ints), not a list holding a {type(wrong).__name__}: {what}"
                        + (" (one prompt: batch size 1)" if isinstance(wrong, (list, tuple)) else ""))
    return ids


# --- What hsd.py prints of a generation --------------------------------------------------------------------------
def show(tokenizer, ids):
    """Token ids as quoted text, whitespace and control characters visible, special tokens by name."""
    return json.dumps(tokenizer.decode(ids, skip_special_tokens=False), ensure_ascii=False)


def trace_line(i, step, tokenizer, color):
    """A round: the drafts (accepted +, rejected -), the full model's next token, and what an end of text cut off."""
    paint = (lambda code, text: f"\033[{code}m{text}\033[0m") if color else (lambda code, text: text)
    accepted, drafts = step.accepted, step.drafts
    marked = [paint("32", "+" + show(tokenizer, [t])) if j < accepted else paint("31", "-" + show(tokenizer, [t]))
              for j, t in enumerate(drafts)]
    line = (f"round {i:3d}  accepted {accepted}/{len(drafts)}  {' '.join(marked)}  -> "
            f"{'bonus' if accepted == len(drafts) else 'correction'} {paint('36', show(tokenizer, [step.next_token]))}")
    text = f"  (the first {step.from_text} from the text)" if 0 < step.from_text < len(drafts) else (
        "  (all from the text)" if step.from_text else "")
    cut = (drafts[:accepted] + [step.next_token])[len(step.tokens):]       # what came after the end-of-text token
    return line + text + (f"  (not output: {show(tokenizer, cut)} came after the end of text)" if cut else "")


def plain_line(count):
    """A run of `count` plain steps between rounds (-k auto's pauses, or plain decoding), as the trace shows it."""
    return f"plain  {count:4d} step{'s' * (count != 1)}"


def summary(s, max_new_tokens, eos, tokenizer):
    """The lines after the output: why generation stopped, acceptance (rounds by drafts accepted), speed."""
    tokens = s["new_token_ids"]
    yield (f"stop    at the end-of-text token {show(tokenizer, [eos])}, after {len(tokens)} of {max_new_tokens} tokens"
           if tokens and tokens[-1] == eos else f"stop    after {len(tokens)} new tokens (--max-new-tokens)")
    if s["rounds"]:
        histogram = ", ".join(f"{a}: {count}" for a, count in enumerate(s["accepted_histogram"]) if count)
        lengths = (f", {s['drafts_per_round']:.2f} drafted per round (k auto), {s['plain_steps']} plain steps "
                   f"(drafting pays above acceptance {s['least_break_even']:.2f})" if s["k"] == "auto" else "")
        yield (f"alpha   {s['alpha']:.3f}: {s['accepted']} of {s['drafted']} drafts accepted, "
               f"{s['accepted_per_round']:.2f} per round over {s['rounds']} rounds (rounds by drafts accepted: "
               f"{histogram}){lengths}, {s['round_s'] / s['rounds'] * 1e3:.1f} ms per round")
    if s["proposed"] is not None:
        yield (f"text    {s['from_text_accepted']} of {s['from_text']} drafts from the text accepted ({s['proposed']} "
               "tokens proposed by the lookup)")
    yield (f"speed   {s['new_tokens']} tokens in {s['decode_s']:.2f} s: {s['tokens_per_s'] or 0:.2f} tokens/s "
           f"(prefill {s['prefill_s']:.2f} s)")


@torch.inference_mode()
def logit_margin(model, ids, a, b):
    """(how far the model's logit of token a lies above b's after the token ids, the std of those logits)."""
    logits = model(torch.tensor([ids], device=model.lm_head.weight.device))[0, -1].float()
    return (logits[a] - logits[b]).item(), logits.std().item()


def check(s, model, prompt, max_new_tokens, chosen, repeats, machine, generate, official=False):
    """--check: decode plainly too; say whether the tokens are the same or where they part, and, for a draft, the
    speedup: the median of `repeats` plain and speculative generations run in turns (and their range). s: the
    generation's statistics, to which it adds what it found; chosen: its Draft; generate: hsd.generate, which decodes
    both; official: the model is one of models.OFFICIAL (whose drafts are expected not to pay on a CPU: the note says
    why)."""
    greedy, _ = generate(model, prompt, max_new_tokens, draft="none")
    speculative = s["new_token_ids"]
    s["identical_to_greedy"] = greedy == speculative
    if greedy != speculative:
        i = next(i for i, (a, b) in enumerate(zip(speculative, greedy)) if a != b)       # EOS ends both alike
        margin, std = logit_margin(model, prompt + greedy[:i], greedy[i], speculative[i])
        near = abs(margin) < (0.05 if model.lm_head.weight.dtype == torch.bfloat16 else 1e-3) * std
        return (f"check   FAILED: tokens differ from greedy at new token {i}: speculative {speculative[i]}, greedy "
                f"{greedy[i]}, the full model's logit margin between them {margin:.3g} (logit std {std:.3g}): " +
                ("a near-tie, which the rounding of a verify pass and of single steps can flip" if near else
                 "not a near-tie, so not rounding: please report it"))
    if chosen.k is None:
        return "check   identical to plain greedy decoding (plain decoding: no draft, so no speedup to measure)"
    runs = cost_model.generations_in_turns(generate, model, [prompt], {"draft": chosen}, max_new_tokens, repeats)
    ratios = [cost_model.rate(runs["draft"], turn=t) / cost_model.rate(runs["plain"], turn=t) for t in range(repeats)]
    s["speedup_vs_greedy"] = speedup = median(ratios)
    busy = cost_model.busy_warning(machine, ratios)
    s["unreliable"] = busy is not None
    note = ("\n        (below 1 is expected on a CPU for the official models: RESULTS.md, \"The cost model\", says why "
            "and what changes it)" if speedup < 1 and official and model.lm_head.weight.device.type == "cpu" else "")
    return (f"check   identical to plain greedy decoding; speedup {speedup:.2f}x (median of {repeats} runs of each, in "
            f"turns; range {min(ratios):.2f}-{max(ratios):.2f}x){note}" + (f"\nhsd: warning: {busy}" if busy else ""))



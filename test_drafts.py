"""Tests for drafts.py: draft files (read, written, written by hand), the costs they carry for -k auto, and Skips as
a draft file gives them. In-process, on the tiny models: python -m pytest -q test_drafts.py."""
import json
import os
import pathlib
import subprocess
import sys

import pytest
import torch

import cost_model
import drafts
import hsd
import models

HERE = os.path.dirname(os.path.abspath(__file__))
PROMPT = models.char_tokenizer().encode("The cat sat on the mat.").ids


@pytest.fixture(scope="module")
def falcon():
    return models.load("tiny-falcon-h1")


def written(folder, spec, name="draft.json", bom=False):
    """spec (a dict, or text as it stands) written to folder/name; its path as a str."""
    path = folder / name
    text = spec if isinstance(spec, str) else json.dumps(spec)
    path.write_bytes(("\ufeff" if bom else "").encode() + text.encode())
    return str(path)


def by_hand(**changes):
    """The README's minimal draft file, with changes."""
    return {"format": "hsd-draft/1", "model": {"name": "tiny-falcon-h1"}, "skip": {"attention": [3]}, "k": 3,
            **changes}


def one_line_error(capsys, *args):
    """hsd.py's exit status and its stderr, which must be one line."""
    status = hsd.main(["--model", "tiny-falcon-h1", "--max-new-tokens", "4", *args])
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return status, err


def test_a_file_written_by_the_search_reads_back_as_written(tmp_path, falcon):
    """draft_file and write_draft_file (the search's writer) make what read_draft_file reads: the skip, k, stop, and
    found_by's costs; the write leaves no partial file."""
    skip = models.Skip(layers={2}, attention={0, 1}, mlp={5})
    found_by = {"method": "by test", "device": drafts.device_name(falcon.lm_head.weight.device),
                "threads": torch.get_num_threads(), "costs": {"c": 0.6, "v": {"1": 1.2, "2": 1.3}, "r": 0.2,
                                                               "context": 64, "temperature": 0.0}}
    spec = drafts.draft_file("tiny-falcon-h1", drafts.identity(falcon), skip, "auto", 0.3, found_by)
    path = tmp_path / "found.json"
    drafts.write_draft_file(path, spec)
    assert [p.name for p in tmp_path.iterdir()] == ["found.json"] and json.loads(path.read_text()) == spec
    chosen, notes = drafts.read_draft_file(path, falcon)
    assert (chosen.skip, chosen.k, chosen.stop, chosen.costs, notes) == (skip, "auto", 0.3,
                                                                         (0.6, {1: 1.2, 2: 1.3}, 0.2), [])


def test_auto_takes_its_costs_from_the_file_or_the_caller(tmp_path, falcon):
    """-k auto judges its rounds by the draft's c, v and r (the statistics' least_break_even from them): the file's
    found_by.costs (a file without r, written before r was measured: r = 0, with a note), else the caller's
    costs=(c, v, r) (v a dict or a sequence indexed by d), else the default rule (the share of weights read, r = 0)."""
    costs = {"c": 0.5, "v": {"1": 1.1, "2": 1.2}, "r": 0.2, "context": 64, "temperature": 0.0}
    path = written(tmp_path, by_hand(k="auto", found_by={"costs": costs}))
    with pytest.warns(UserWarning, match="not checked against an architecture"):      # no "model" block
        _, stats = hsd.generate(falcon, PROMPT, 8, draft=path, eos_token_id=-1)
    k2 = cost_model.break_even_acceptance(0.5, 1.2, 2, 0.2)           # 1 + p + p^2 = 2 * 0.5 + 1.2 + 0.2: p = 0.78,
    assert stats["least_break_even"] == pytest.approx(k2) and k2 < 0.8    # below k = 1's 1 + p = 0.5 + 1.1 + 0.2
    without_r = {key: x for key, x in costs.items() if key != "r"}
    older = written(tmp_path, by_hand(k="auto", found_by={"costs": without_r}), "older.json")
    with pytest.warns(UserWarning, match="before the cost model measured a round's own cost"):
        _, stats = hsd.generate(falcon, PROMPT, 8, draft=older, eos_token_id=-1)
    assert stats["least_break_even"] == pytest.approx(0.6)             # r = 0: 1 + p = 0.5 + 1.1
    skip = models.Skip(attention={3})
    given = hsd.generate(falcon, PROMPT, 8, draft=skip, k="auto", costs=(0.5, [1.0, 1.1, 1.2], 0.2), eos_token_id=-1)
    assert given[1]["least_break_even"] == pytest.approx(k2)           # item d of the sequence is v[d]
    default = hsd.generate(falcon, PROMPT, 8, draft=skip, k="auto", eos_token_id=-1)[1]["least_break_even"]
    assert default == pytest.approx(hsd.default_costs(falcon, skip)[0]) and 0.9 < default < 1   # one layer's attention
    assert hsd.default_costs(falcon, skip)[2] == 0.0
    for wrong in [(0.5, {1: -1}, 0.0), (0.5, {1: 1.1}), (0.5, {1: 1.1}, float("nan"))]:       # r is required
        with pytest.raises(models.UsageError, match="costs must be"):
            hsd.generate(falcon, PROMPT, 8, draft=skip, k="auto", costs=wrong)
    assert hsd.generate(falcon, PROMPT, 8, draft=skip, k=2)[1]["least_break_even"] is None


def test_a_file_written_by_hand_from_the_readme_runs_with_a_note(tmp_path, capsys, falcon):
    """Without a "model" block, or with only its name, a file is used for any model whose layers and units it names,
    with a one-line note that it was not checked against an architecture; any file name; a pathlib.Path; a BOM."""
    for spec in (by_hand(), {key: value for key, value in by_hand().items() if key != "model"}):
        for name in ("att2.txt", "ATT2.JSON"):
            path = written(tmp_path, spec, name, bom=name == "att2.txt")
            assert hsd.main(["--model", "tiny-falcon-h1", "--draft", path, "--max-new-tokens", "4"]) == 0
            out, err = capsys.readouterr()
            assert err.count("\n") == 1 and "not checked against an architecture" in err, err
            assert "k=3: skips the attention of layer 3" in out
    with pytest.warns(UserWarning, match="not checked against an architecture"):
        _, stats = hsd.generate(falcon, PROMPT, 4, draft=pathlib.Path(path), eos_token_id=-1)
    assert stats["draft"] == path and stats["k"] == 3


@pytest.mark.parametrize("spec, message", [
    (by_hand(model={"name": "toy-qwen3.5", "family": "qwen3_5"}),
     "is a draft for another architecture (its family differ from this model's; it was written for toy-qwen3.5)"),
    (by_hand(skip={}), "skips nothing: the full model would draft for itself"),
    (by_hand(skip={"layers": [], "mlp": []}), "skips nothing"),
    ({key: value for key, value in by_hand().items() if key != "k"}, '"k" is missing'),
    (by_hand(k=None), '"k" must be a number of drafts (at least 1) or "auto", not null'),
    (by_hand(stop={"confidence": 0}), 'not {"confidence": 0}'),
    ('{"k": ' + "1" * 5000 + "}", "(damaged: Exceeds the limit (4300 digits) for integer string conversion)"),
    ("[" * 100_000 + "]" * 100_000, "(damaged: nested too deeply to read)"),
    (by_hand(found_by={"costs": {"c": -1, "v": {"1": 1.1}}}), '"found_by": "costs" must hold "c": a positive number'),
    ('{"format": "hsd-dr', "(damaged: Unterminated string starting at: line 1 column 12 (char 11))"),
])
def test_a_draft_file_that_cannot_run_is_one_line(tmp_path, capsys, spec, message):
    """What is wrong, in JSON's words, never cut mid-word, never a traceback (a file nested 100,000 deep included),
    and no NAME to fill in."""
    status, err = one_line_error(capsys, "--draft", written(tmp_path, spec))
    assert status == 2 and message in err and "NAME" not in err, err


def test_units_of_a_layer_left_out_whole_and_duplicates_are_named_once(tmp_path, capsys):
    """layers [2] with attention [2, 2, 3]: the attention of layer 2 is left out with the layer; printed once."""
    skip = models.Skip(layers={2}, attention={2, 3})
    assert skip == models.Skip(layers={2}, attention={3}) and str(skip) == "layer 2; the attention of layer 3"
    path = written(tmp_path, by_hand(skip={"layers": [2, 2], "attention": [2, 2, 3]}))
    assert hsd.main(["--model", "tiny-falcon-h1", "--draft", path, "--max-new-tokens", "2"]) == 0
    assert "skips layer 2; the attention of layer 3\n" in capsys.readouterr().out


def test_a_file_searched_with_other_threads_gets_a_note(tmp_path, falcon):
    threads = torch.get_num_threads()
    path = written(tmp_path, by_hand(model={"name": "tiny-falcon-h1", **drafts.identity(falcon)},
                                     found_by={"threads": threads + 1}))
    _, notes = drafts.read_draft_file(path, falcon)
    assert notes == [(f"{path} was searched with {threads + 1} threads, this run uses {threads}: threads change every "
                      "cost, so it may not be the fastest draft here")]
    assert drafts.read_draft_file(written(tmp_path, by_hand(model={"name": "tiny-falcon-h1", **drafts.identity(
        falcon)}, found_by={"threads": threads})), falcon)[1] == []


def test_a_file_used_at_another_temperature_or_context_gets_a_note(tmp_path, falcon, capsys):
    """A draft searched greedy at a context of 96 tokens: at T = 0.6 a note gives its prediction there, at about
    300 tokens a note says costs move with the context; at its own temperature and near its context, none."""
    found_by = {"costs": {"c": 0.6, "v": {"1": 1.2}, "r": 0.2, "context": 96, "temperature": 0.0},
                "predicted_speedup": {"0": 1.2, "0.6": 1.05}}
    path = written(tmp_path, by_hand(model={"name": "tiny-falcon-h1", **drafts.identity(falcon)}, found_by=found_by))
    assert drafts.read_draft_file(path, falcon, 0.0, 120)[1] == []
    assert drafts.read_draft_file(path, falcon, 0.6, 96)[1] == [
        f"{path} was searched at temperature 0, this run samples at 0.6: its prediction here is 1.05x"]
    assert drafts.read_draft_file(path, falcon, 0.0, 300)[1] == [
        f"{path} was searched at a context of 96 tokens, this run's is about 300: costs move with the context, so it "
        "may not be the fastest draft here"]
    assert hsd.main(["--model", "tiny-falcon-h1", "--draft", path, "--temperature", "0.6", "--seed", "1",
                     "--max-new-tokens", "4"]) == 0
    assert "searched at temperature 0, this run samples at 0.6: its prediction here is 1.05x" in capsys.readouterr().err


def test_a_config_hsd_does_not_run_says_what_is_wrong(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(models.UsageError) as caught:
        models.load(str(tmp_path))
    assert str(caught.value) == (f"{tmp_path}/config.json: model_type 'llama' is not supported: hsd implements "
                                 "falcon_h1, qwen3_5 and qwen2")


# --- Draft files as the search writes them, read by generate and by hsd.py ---------------------------------------
MIXED = models.Skip(layers={2}, attention={0, 1, 3, 4, 5}, recurrent={4}, mlp={1, 5})   # of every kind, tiny Falcon-H1
PROMPT_12 = models.char_tokenizer().encode("The cat sat ").ids
NEW_TOKENS = 23


def tiny(name, dtype=torch.float64):
    return models.load(name, dtype=dtype)


def reference_greedy(name, prompt, n=NEW_TOKENS):
    """Plain greedy decoding by repeated full forwards, no cache at all."""
    model, ids = tiny(name), list(prompt)
    with torch.inference_mode():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    return ids[len(prompt):]


def run_cli(*args):
    """hsd.py as a user runs it; a busy machine's warning, which depends on whatever else runs here, left out."""
    result = subprocess.run([sys.executable, "hsd.py", *args], capture_output=True, text=True, cwd=HERE)
    result.stderr = "".join(line for line in result.stderr.splitlines(True) if "the machine is busy" not in line)
    return result


def draft_file(tmp_path, name="tiny-falcon-h1", leave_out=None, k=3, stop=None, **changes):
    """A draft file for a tiny model, as hsd_search.py writes them (its found_by left short), with changes."""
    model = tiny(name, torch.float32)
    skip = leave_out or MIXED
    spec = {"format": "hsd-draft/1", "model": drafts.identity(model),
            "skip": {f: sorted(getattr(skip, f)) for f in ("layers", *models.UNITS)}, "k": k,
            "stop": stop and {"confidence": stop}, "found_by": {"method": "by hand", "device": drafts.device_name(
                model.lm_head.weight.device), "dtype": "float32"}}
    for key, value in changes.items():
        where, _, field = key.partition("__")
        if field:
            spec[where][field] = value
        else:
            spec[where] = value
    path = tmp_path / f"draft-{len(list(tmp_path.iterdir()))}.json"
    path.write_text(json.dumps(spec))
    return str(path)


def test_a_draft_file_is_read_with_its_k_and_stop(tmp_path):
    """generate(draft=FILE) and hsd.py --draft FILE take the file's skip, k and stop rule; -k (k=) overrides k."""
    path = draft_file(tmp_path, k=4, stop=0.02)               # the random tiny model is rarely sure: a low stop
    chosen, warned = hsd.read_draft_file(path, tiny("tiny-falcon-h1", torch.float32))
    assert (chosen.skip, chosen.k, chosen.stop, warned) == (MIXED, 4, 0.02, [])
    tokens, stats = hsd.generate(tiny("tiny-falcon-h1"), PROMPT_12, NEW_TOKENS, draft=path, eos_token_id=-1)
    assert tokens == reference_greedy("tiny-falcon-h1", PROMPT_12) and (stats["k"], stats["stop"]) == (4, 0.02)
    lengths = {len(r.drafts) for r in stats["trace"]}
    assert stats["draft"] == path and max(lengths) == 4 and min(lengths) < 4           # k 4, and the stop
    assert hsd.generate(tiny("tiny-falcon-h1"), [1, 2], 4, draft=path, k="auto", eos_token_id=-1)[1]["k"] == "auto"
    result = run_cli("--model", "tiny-falcon-h1", "--draft", path, "--check", "--repeats", "1", "--max-new-tokens",
                     "12")
    assert result.returncode == 0 and result.stderr == "", result.stderr
    assert f"draft {path}, k=4, stop below 0.02: skips layer 2; the attention of" in result.stdout
    assert "identical to plain greedy decoding; speedup" in result.stdout


@pytest.mark.parametrize("change, message", [
    (dict(format="hsd-draft/0"), 'is not a valid draft file (no "format": "hsd-draft/1")'),
    (dict(model__family="qwen3_5"), "is a draft for another architecture (its family differ"),
    (dict(model__sizes={"hidden_size": 1}), "is a draft for another architecture (its sizes differ"),
    (dict(skip={"layers": [99]}), "names layer 99 (layers), which the model does not have"),
    (dict(skip={"attention": [0], "heads": [1]}), '"skip" holds lists of layer indices under layers, attention'),
    (dict(skip={"attn": [3]}), '"attn" is none of them; did you mean "attention"?'),
    (dict(k=0), '"k" must be a number of drafts (at least 1) or "auto", not 0'),
    (dict(stop={"confidence": 2}), '"stop" must be null or {"confidence": a number between 0 and 1}'),
])
def test_a_draft_file_that_does_not_fit_is_one_line(tmp_path, change, message, capsys):
    assert hsd.main(["--model", "tiny-falcon-h1", "--draft", draft_file(tmp_path, **change)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err


def test_a_damaged_or_missing_draft_file_is_one_line(tmp_path):
    damaged = tmp_path / "damaged.json"
    damaged.write_text('{"format": "hsd-dr')
    result = run_cli("--model", "tiny-falcon-h1", "--draft", str(damaged))           # as a user runs it
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert "is not a valid draft file (damaged:" in result.stderr
    with pytest.raises(models.UsageError, match="cannot read the draft file .*missing.json: No such file"):
        hsd.generate(tiny("tiny-falcon-h1"), [1, 2], 3, draft=str(tmp_path / "missing.json"))


def test_a_draft_file_for_other_weights_or_another_device_is_used_with_a_warning(tmp_path):
    """A retrained model of the same architecture, or a file searched on another machine: one line each, then the
    draft runs (every draft decodes correctly; only its speed may not hold)."""
    path = draft_file(tmp_path, model__weights_sha256="0" * 64, found_by={"device": "cuda NVIDIA H200"})
    result = run_cli("--model", "tiny-falcon-h1", "--draft", path, "--max-new-tokens", "6")
    lines = result.stderr.splitlines()
    assert result.returncode == 0 and len(lines) == 2, result.stderr
    assert "was searched on other weights of this architecture" in lines[0]
    assert "was searched on cuda NVIDIA H200, this run is on cpu" in lines[1]
    with pytest.warns(UserWarning) as caught:                       # generate: the same two lines, as warnings
        hsd.generate(tiny("tiny-falcon-h1", torch.float32), [1, 2], 3, draft=path)
    assert ["hsd: warning: " + str(w.message) for w in caught] == lines
    model = tiny("tiny-falcon-h1", torch.float32)
    assert drafts.weights_fingerprint(model) == drafts.weights_fingerprint(models.load("tiny-falcon-h1", torch.bfloat16))
    assert drafts.weights_fingerprint(model) != drafts.weights_fingerprint(models.load("tiny-qwen3.5"))


# --- The lookup in a draft file: alone, or a cascade with a skip ----------------------------------------------------
def test_a_draft_file_with_a_lookup_reads_as_the_lookup_or_a_cascade(tmp_path, falcon):
    alone = {"format": "hsd-draft/1", "lookup": {"n": 2}, "k": 5}
    chosen, notes = drafts.read_draft_file(written(tmp_path, alone), falcon)
    assert (chosen.skip, chosen.k, chosen.lookup, notes) == (None, 5, 2, [])      # no architecture to check
    chosen, _ = drafts.read_draft_file(written(tmp_path, by_hand(lookup={"n": 3})), falcon)
    assert (chosen.skip, chosen.k, chosen.lookup) == (models.Skip(attention={3}), 3, 3)


@pytest.mark.parametrize("spec, message", [
    (by_hand(lookup={"n": 0}), '"lookup" must be {"n": the largest n-gram, a number from 1 on}, not {"n": 0}'),
    (by_hand(lookup=3), 'not 3'),
    ({"format": "hsd-draft/1", "k": 3}, 'no "skip" and no "lookup"'),
])
def test_a_draft_file_with_a_wrong_lookup_is_one_line(tmp_path, capsys, spec, message):
    status, err = one_line_error(capsys, "--draft", written(tmp_path, spec))
    assert status == 2 and message in err, err


def test_the_command_line_runs_a_lookup_file_and_lookup_before_a_file(tmp_path, capsys, falcon):
    greedy = hsd.generate(falcon, PROMPT_12, 12, draft="none")[0]          # as the command line decodes: its eos too
    alone = written(tmp_path, {"format": "hsd-draft/1", "lookup": {"n": 3}, "k": 4}, "alone.json")
    cascade = written(tmp_path, by_hand(), "skip.json")
    for draft in (alone, f"lookup+{cascade}"):
        assert hsd.main(["--model", "tiny-falcon-h1", "--prompt", "The cat sat ", "--max-new-tokens", "12",
                         "--draft", draft, "--json"]) == 0
        s = json.loads(capsys.readouterr().out.splitlines()[-1])
        assert s["new_token_ids"] == greedy and s["proposed"] is not None and s["draft"] == draft
    with pytest.raises(SystemExit) as exit_status:                   # the argument's check: no model loaded
        hsd.main(["--model", "tiny-falcon-h1", "--draft", "lookup+nothing.json"])
    err = capsys.readouterr().err
    assert exit_status.value.code == 2 and "unknown draft 'nothing.json'" in err and err.count("\n") == 1

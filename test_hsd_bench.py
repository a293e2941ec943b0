"""hsd_bench.py on the cost model: the rows it measures, the context sweep's arithmetic, its command line's refusals.

Nothing here is timed: the sweep's costs are given, and the command line is refused before anything is measured."""
import json
import math
import types
import warnings

import pytest

import cost_model
import drafts
import hsd_bench
import models


def exit_status(args):
    try:
        return hsd_bench.main(args)
    except SystemExit as e:
        return e.code


def costs(c_of, v, context=256):
    """A Costs at a context: c_of {label: c}, v; made-up noise."""
    return cost_model.Costs(0.01, c_of, v, v, 0.25, context, 0.0, 7, {"step": 0.01, "c": dict.fromkeys(c_of, 0.02),
                                                                     "v": {}, "r": 0.0})


def test_the_sweep_predicts_with_the_papers_acceptance_where_it_has_one():
    """Falcon-H1-0.5B's component draft: the paper's greedy alpha at k = 2, 4, 8, so a round keeps alpha k drafts."""
    v = [1.0, 1.1, 1.2, 1.3, 1.4, 1.5, 1.6, 1.7, 1.8]
    sweep = {256: costs({"component": 0.8, "early-exit": 0.5}, v), 4096: costs({"component": 0.6, "early-exit": 0.5}, v)}
    rows = hsd_bench.sweep_rows("falcon-h1-0.5b", sweep)
    assert [(r["context"], r["draft"], r["k"]) for r in rows][:4] == [(256, "component", 2), (256, "component", 4),
                                                                   (256, "component", 8), (256, "early-exit", 2)]
    row = next(r for r in rows if (r["context"], r["draft"], r["k"]) == (4096, "component", 4))
    assert row["paper_alpha"] == 0.37 and row["v"] == 1.4
    assert math.isclose(row["predicted_speedup_at_paper_alpha"], (1 + 0.37 * 4) / (4 * 0.6 + 1.4 + 0.25))   # r once
    assert row["break_even_acceptance"] == cost_model.break_even_acceptance(0.6, 1.4, 4, 0.25)
    assert all(r["paper_alpha"] is None and r["predicted_speedup_at_paper_alpha"] is None
               for r in rows if r["draft"] == "early-exit")                    # the paper gives none for it
    assert all(r["paper_alpha"] is None for r in hsd_bench.sweep_rows("toy-falcon-h1", sweep))
    lines = list(hsd_bench.sweep_lines("falcon-h1-0.5b", sweep, rows, {
        "device": "cpu X", "threads": 1, "cores": 2, "omp_wait_policy": "default", "busy_cores": 0.02,
        "torch": "2", "commit": None}))
    assert "1 thread of 2 cores" in lines[0] and "paper's single-round acceptance (greedy)" in lines[1]
    assert not any(line.startswith("warning") for line in lines)
    sampled = {L: each._replace(temperature=0.6) for L, each in sweep.items()}
    row = next(r for r in hsd_bench.sweep_rows("falcon-h1-0.5b", sampled) if (r["context"], r["k"]) == (256, 8))
    assert row["paper_alpha"] == 0.224                                     # the paper's T=0.6 column


@pytest.fixture
def searched_file(tmp_path):
    """toy-qwen2.5's shipped draft file with a known plan (a re-search changes the shipped one's): k=2, stop 0.2, the
    best fixed k 3, and the search's choice for the paper's draft (found_by.paper_drafts) k=4, stop 0.8."""
    found = json.loads(open("toys/toy-qwen2.5/draft.json").read())
    found.update(k=2, stop={"confidence": 0.2})
    found["found_by"]["best_fixed"] = {"k": 3, "stop": None}
    found["found_by"]["paper_drafts"] = {"layerskip": {"k": 4, "stop": 0.8}}
    path = tmp_path / "draft.json"
    path.write_text(json.dumps(found))
    return str(path)


def test_the_drafts_rows_are_the_papers_at_every_k_and_each_file_as_found(searched_file):
    """The paper's drafts at every k and auto, each file as found, at its best fixed k and auto; and the paper's
    draft for the family with the freedom the search has: at the file's k and stop, and at the search's own choice
    for it (the file's found_by.paper_drafts): the rows gain_split compares."""
    model = models.load("toy-qwen2.5")
    rows, skip_label, splits = hsd_bench.draft_rows(model, [searched_file])
    paper = [label for label in rows if not label.startswith(searched_file)]
    assert paper == [f"{draft}, k={k}" for draft in ("layerskip", "early-exit") for k in range(1, 9)] + [
        "layerskip, k=auto", "early-exit, k=auto",                              # a Transformer: no component draft
        "layerskip, k=2, stop 0.2", "layerskip, k=4, stop 0.8"]                 # the file's plan; the search's for it
    assert splits == {searched_file: {
        "file": searched_file, "paper": "layerskip", "same_plan": "layerskip, k=2, stop 0.2",
        "tuned": "layerskip, k=4, stop 0.8"}}
    assert rows["layerskip, k=4, stop 0.8"] == drafts.Draft("layerskip", rows["layerskip, k=1"].skip, 4, 0.8)
    assert skip_label["layerskip, k=4, stop 0.8"] == "layerskip"
    files = [label for label in rows if label.startswith(searched_file)]
    assert files == [searched_file, f"{searched_file}, k=3", f"{searched_file}, k=auto"]   # as found, best fixed, auto
    assert all(skip_label[label] == searched_file for label in files)
    assert rows[f"{searched_file}, k=3"].k == 3 and rows[f"{searched_file}, k=3"].stop is None
    assert rows["layerskip, k=3"].k == 3 and rows["early-exit, k=auto"].k == "auto"
    assert len({rows[label].skip for label in files}) == 1


def test_the_test_prompts_are_the_splits_test_set():
    tokenizer = models.load_tokenizer("toy-falcon-h1")
    prompts = hsd_bench.test_prompts("toy-falcon-h1", tokenizer, 64)
    paragraphs = cost_model.paragraphs(cost_model.read_lines(None, "toy-falcon-h1"), tokenizer)
    assert list(prompts) == cost_model.split(paragraphs, 64).test
    assert all(ids == paragraphs[i][:64] and len(ids) == 64 for i, ids in prompts.items())


def test_ks_are_parsed_sorted_each_once_and_the_rows_follow_them():
    assert hsd_bench.parse_ks("8,2,4,2") == (2, 4, 8) and hsd_bench.parse_ks("1") == (1,)
    for bad in ("0,2", "9", "2,x", "", "2,,4"):
        with pytest.raises(models.UsageError, match="--ks takes k from 1 to 8"):
            hsd_bench.parse_ks(bad)
    rows, _, _ = hsd_bench.draft_rows(models.load("toy-qwen2.5"), [], (2, 8))
    assert list(rows) == ["layerskip, k=2", "layerskip, k=8", "early-exit, k=2", "early-exit, k=8",
                          "layerskip, k=auto", "early-exit, k=auto"]


def test_sampling_runs_the_best_greedy_k_and_its_neighbours_every_auto_row_and_each_file(searched_file):
    model = models.load("toy-qwen2.5")
    ks = (1, 2, 4, 8)
    rows, _, splits = hsd_bench.draft_rows(model, [searched_file], ks)
    paper = drafts.paper_skips(model.config)
    best = {"layerskip": 4, "early-exit": 1}                    # the greedy winners: inside and at an end of ks
    greedy = {label: 2.0 if label in {f"{draft}, k={k}" for draft, k in best.items()} else 1.0 for label in rows}
    kept = hsd_bench.sampled_labels(rows, paper, ks, greedy, splits)
    assert [label for label in kept if not label.endswith("auto") and not label.startswith(searched_file)] == [
        "layerskip, k=2", "layerskip, k=4", "layerskip, k=8", "early-exit, k=1", "early-exit, k=2", "early-exit, k=4",
        "layerskip, k=2, stop 0.2", "layerskip, k=4, stop 0.8"]                # gain_split's rows: always
    assert {"layerskip, k=auto", "early-exit, k=auto"} <= set(kept)
    assert [label for label in rows if label.startswith(searched_file)] == [x for x in kept
                                                                           if x.startswith(searched_file)]
    assert hsd_bench.window(ks, 8) == (2, 4, 8) and hsd_bench.window((2, 4), 4) == (2, 4)
    few, _, _ = hsd_bench.draft_rows(model, [], (2, 4, 8))
    assert hsd_bench.sampled_labels(few, paper, (2, 4, 8), dict.fromkeys(few, 1.0)) == list(few)   # 3 ks: all


def fake_generate(calls, interrupt_at=None):
    """hsd.generate's shape with made-up numbers: a draft of k = K saves time as K grows (k=auto as k=3)."""
    def generate(model, prompt, new_tokens, draft=None, temperature=0.0, seed=None):
        calls.append(temperature)
        if interrupt_at is not None and temperature == interrupt_at:
            raise KeyboardInterrupt
        k = 0 if draft == "none" else 3 if draft.k == "auto" else draft.k
        rounds = new_tokens // (k + 1) if k else 0
        stats = {"new_tokens": new_tokens, "decode_s": 1.0 / (1 + k), "rounds": rounds, "drafted": rounds * k,
                 "accepted": rounds * k, "plain_steps": new_tokens - rounds * (k + 1),
                 "trace": [types.SimpleNamespace(drafts=[0] * k)] * rounds}
        return list(range(new_tokens)), stats
    return generate


@pytest.fixture
def no_measuring(monkeypatch):
    """drafts_side_by_side on three prompts of toy-qwen2.5 with made-up costs and generations."""
    prompts = {5: [1, 2, 3], 9: [4, 5, 6], 13: [7, 8, 9]}
    monkeypatch.setattr(hsd_bench, "test_prompts", lambda *a: prompts)
    monkeypatch.setattr(cost_model, "warm_up", lambda *a: None)
    monkeypatch.setattr(cost_model, "measure_costs", lambda model, skips, *a, **k: costs(
        dict.fromkeys(skips, 0.5), [1.0 + 0.1 * d for d in range(17)])._replace(temperature=a[3]))
    return prompts


def test_drafts_estimates_its_generations_and_saves_each_temperature_as_it_ends(no_measuring, monkeypatch, tmp_path,
                                                                                capsys):
    calls = []
    monkeypatch.setattr(hsd_bench.hsd, "generate", fake_generate(calls))
    out = tmp_path / "r.json"
    r = hsd_bench.drafts_side_by_side("toy-qwen2.5", [], new_tokens=4, turns=2, ks=(1, 2, 4, 8), out=str(out))
    sampled = ["layerskip, k=2", "layerskip, k=4", "layerskip, k=8", "early-exit, k=2", "early-exit, k=4",
               "early-exit, k=8", "layerskip, k=auto", "early-exit, k=auto"]   # the fastest greedy k is 8
    assert r["ran"][0.0][:4] == ["layerskip, k=1", "layerskip, k=2", "layerskip, k=4", "layerskip, k=8"]
    assert r["ran"][hsd_bench.PAPER_T] == sampled and r["best"][hsd_bench.PAPER_T] == "layerskip, k=8"
    greedy, at_t = (10 + 1) * 3 * 2, (8 + 1) * 3 * 2        # (rows + plain) x prompts x turns
    assert calls.count(0.0) == greedy + 1 and calls.count(hsd_bench.PAPER_T) == at_t   # + the estimate's generation
    err = capsys.readouterr().err
    assert f"{greedy} generations at T=0.0 + {at_t} generations at T=0.6, each about" in err
    saved = json.loads(out.read_text())
    assert saved["complete"] and saved["ks"] == [1, 2, 4, 8] and saved["ran"]["0.6"] == sampled
    lines = list(hsd_bench.side_by_side_lines("toy-qwen2.5", r, 4))
    assert any("ran paper drafts at k layerskip 2,4,8; early-exit 2,4,8 (of --ks 1,2,4,8 the best greedy k and its "
               "neighbours), every k=auto row" in line for line in lines)
    assert any("chosen as the fastest on these same prompts" in line for line in lines)
    assert not any("note: its k is at the edge" in line for line in lines)      # k=8: the last of --ks
    assert hsd_bench.unrun_neighbours({**r, "best": {0.6: "early-exit, k=2"}}, 0.6) == [1]
    assert saved["best_fixed_paper_unrun_neighbours"] == {"0.0": [], "0.6": []}

    monkeypatch.setattr(hsd_bench.hsd, "generate", fake_generate([], interrupt_at=hsd_bench.PAPER_T))   # Ctrl-C
    with pytest.raises(KeyboardInterrupt):
        hsd_bench.drafts_side_by_side("toy-qwen2.5", [], new_tokens=4, turns=2, ks=(2, 4), out=str(out))
    saved = json.loads(out.read_text())
    assert not saved["complete"] and list(saved["runs"]) == ["0.0"] and saved["ks"] == [2, 4]
    assert len(saved["runs"]["0.0"]["layerskip, k=4"]) == 3 and saved["best_fixed_paper"] == {"0.0": "layerskip, k=4"}


@pytest.mark.parametrize("args, message", [
    (["toy-qwen3.5", "--units", "--threads", "0"], "--threads must be at least 1"),
    (["falcon-h1-0.5b", "--drafts"], "--drafts runs on a trained toy"),
    (["toy-qwen3.5", "--context-sweep", "--out", "."], "cannot write --out .: it is a folder"),
    (["toy-qwen3.5", "--context-sweep", "--temperature", "nan"], "--temperature must be 0 (greedy) or a finite"),
    (["toy-qwen3.5", "--units", "--cost-repeats", "0"], "--cost-repeats and --context must be at least 1"),
    (["toy-qwen3.5", "--drafts", "--repeats", "0"], "--tokens, --repeats, --cost-repeats and --context must be"),
    (["toy-qwen3.5", "--context-sweep", "--temperature", "inf"], "--temperature must be 0 (greedy) or a finite"),
    (["toy-qwen2.5", "--drafts", "--ks", "0,2"], "--ks takes k from 1 to 8 separated by commas"),
    (["toy-qwen2.5", "--drafts", "--ks", "two"], "--ks takes k from 1 to 8 separated by commas"),
    (["toy-qwen2.5", "--units", "--ks", "2,4"], "--ks goes with --drafts"),
], ids=["threads", "drafts-official", "out-folder", "temperature-nan", "cost-repeats", "repeats", "temperature-inf",
        "ks-range", "ks-word", "ks-alone"])
def test_the_command_line_refuses_in_one_line_before_measuring(args, message, capsys, monkeypatch):
    monkeypatch.setattr(hsd_bench, "bench_model", lambda *a: pytest.fail("measured before refusing"))
    monkeypatch.setattr(hsd_bench, "drafts_side_by_side", lambda *a, **k: pytest.fail("measured before refusing"))
    assert exit_status(args) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_the_model_is_given_as_in_every_tool_the_busy_machine_said_first_and_json_is_stdout_alone(monkeypatch, capsys):
    """--model NAME (or the name first, as before); a misspelt model or option: "did you mean"; a busy machine (its load
    given here) is said on stderr before anything is measured; --json: stdout holds the JSON alone."""
    monkeypatch.setattr(cost_model, "busy_cores", lambda: 1.8)
    machine = {"device": "cpu X", "threads": 2, "cores": 2, "omp_wait_policy": "default", "busy_cores": 1.8,
               "torch": "2", "commit": "abc"}
    said_first = []

    def sweep(name, repeats, temperature, out=None):
        said_first.append(capsys.readouterr().err)
        return {}, {}, machine                                               # no contexts, no lookup costs
    monkeypatch.setattr(hsd_bench, "context_sweep", sweep)
    monkeypatch.setattr(hsd_bench, "sweep_rows", lambda name, sweep, lookup: [])
    monkeypatch.setattr(hsd_bench, "sweep_lines", lambda *args: ["a line of the table"])
    for args in (["--model", "toy-qwen3.5"], ["toy-qwen3.5"]):
        assert exit_status([*args, "--context-sweep", "--json"]) == 0
        out, err = capsys.readouterr()
        assert json.loads(out)["model"] == "toy-qwen3.5" and "a line of the table" in err
        assert said_first.pop().startswith("hsd_bench: warning: the machine is busy (other processes kept 1.80 of ")
    for args, message in ((["--model", "toy-qwen35", "--units"], "unknown model 'toy-qwen35': did you mean "
                                                                  "toy-qwen3.5?"),
                          (["--modle", "toy-qwen3.5"], "unknown option --modle: did you mean --model?"),
                          (["--units"], "give --model NAME"),
                          (["toy-qwen3.5", "--model", "toy-qwen2.5"], "two models")):
        assert exit_status(args) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err


def test_a_machine_of_one_thread_is_said_in_words():
    machine = {"device": "cpu X", "threads": 1, "cores": 2, "omp_wait_policy": "PASSIVE", "busy_cores": 1.5,
               "torch": "2", "commit": "abc"}
    assert "1 thread of 2 cores, OMP_WAIT_POLICY PASSIVE" in hsd_bench.machine_words(machine)
    assert "2 threads" in hsd_bench.machine_words({**machine, "threads": 2})
    assert list(hsd_bench.warning_lines(machine)) == [f"warning: {cost_model.busy_warning(machine)}"]


def test_the_busy_study_interleaves_fresh_processes_and_summarises_each_configuration(monkeypatch, capsys):
    """--busy: every configuration (3 settings x idle / one core busy) once per repeat, in that order, each its own
    measurement; per configuration the median, min and max of each quantity; the CLI refuses an official model."""
    calls = []

    def measured(name, setting, busy):
        calls.append((setting, busy))
        return {"plain_ms_per_token": float(len(calls)), "demo_ms_per_round": 10.0 * len(calls),
                "threads": 1 if setting == "1-thread" else 2, "omp_wait_policy": None}
    monkeypatch.setattr(hsd_bench, "busy_measurement", measured)
    study = hsd_bench.busy_study("toy-falcon-h1", repeats=3)
    plan = [(s, b) for b in (False, True) for s in hsd_bench.BUSY_SETTINGS]
    assert calls == plan * 3
    assert study["passive/busy"]["plain_ms_per_token"] == (11.0, 5.0, 17.0)        # calls 5, 11, 17
    assert study["1-thread/idle"]["threads"] == 1 and list(study) == [f"{s}/{'busy' if b else 'idle'}" for s, b in plan]
    assert len(list(hsd_bench.busy_lines("toy-falcon-h1", study))) == 2 + len(plan)
    with pytest.raises(SystemExit) as e:
        hsd_bench.main(["falcon-h1-0.5b", "--busy"])
    assert e.value.code == 2 and "--busy runs on a trained toy" in capsys.readouterr().err



def test_the_paper_drafts_auto_rows_pause_by_the_costs_measured_there():
    """-k auto of a paper draft runs with the c and v the benchmark measured (what a caller passes to generate), not
    the default rule, and so does a cascade's draft model; fixed rows and a draft file's rows are run as they are."""
    model = models.load("toy-qwen2.5")
    rows, skip_of, _ = hsd_bench.draft_rows(model, ["toys/toy-qwen2.5/draft.json"], (1, 2))
    paper = drafts.paper_skips(model.config)
    costs = cost_model.Costs(0.01, {label: 0.4 for label in set(skip_of.values())}, [1.0, 1.3, 1.4], None, 0.2, 64,
                             0.0, 2, {})
    auto = hsd_bench.measured_auto(rows["layerskip, k=auto"], "layerskip, k=auto", paper, skip_of, costs)
    assert auto.costs == (0.4, {1: 1.3, 2: 1.4}, 0.2) and rows["layerskip, k=auto"].costs != auto.costs
    for label in ("layerskip, k=2", "toys/toy-qwen2.5/draft.json"):
        assert hsd_bench.measured_auto(rows[label], label, paper, skip_of, costs) is rows[label]
    with_file = "lookup+toys/toy-qwen2.5/draft.json"
    with warnings.catch_warnings():                         # the file's notes (threads): not what is tested here
        warnings.simplefilter("ignore")
        rows, skip_of, _ = hsd_bench.draft_rows(model, ["lookup+layerskip", "lookup", with_file], (1, 2))
    cascade = hsd_bench.measured_auto(rows["lookup+layerskip, k=auto"], "lookup+layerskip, k=auto", paper, skip_of,
                                      costs)                  # its draft model's steps pause as the layerskip row's
    assert cascade.costs == auto.costs and cascade.skip == rows["layerskip, k=auto"].skip and cascade.lookup
    for label in ("lookup+layerskip", "lookup, k=auto", f"{with_file}, k=auto"):   # a file's cascade: the file's costs
        assert hsd_bench.measured_auto(rows[label], label, paper, skip_of, costs) is rows[label]
    assert rows[f"{with_file}, k=auto"].costs == drafts.read_draft_file(with_file[len("lookup+"):], model)[0].costs


def test_a_draft_file_written_by_hand_runs_in_the_benchmark(tmp_path):
    """A file with a byte-order mark and a found_by of its own words (no best fixed k): read once, by drafts.py."""
    path = tmp_path / "mine.json"
    path.write_bytes("\ufeff".encode() + json.dumps({"format": "hsd-draft/1", "skip": {"attention": [3]}, "k": 3,
                                                     "found_by": "by hand"}).encode())
    rows, skip_label, splits = hsd_bench.draft_rows(models.load("toy-qwen2.5"), [str(path)], (1,))
    assert rows[str(path)].k == 3 and f"{path}, k=auto" in rows and skip_label[f"{path}, k=auto"] == str(path)
    assert splits[str(path)]["tuned"] is None and splits[str(path)]["same_plan"] == "layerskip, k=3"   # no search


def test_a_files_gain_is_split_into_its_units_and_its_k_and_stop():
    """Paired ratios over the prompts: units, the file against the paper's units at the file's k and stop; k and
    stop, the paper's units at the search's plan for them against their best fixed k; total, the file against that
    row. A ratio whose interval holds 1 is said to bring nothing measurable."""
    def runs(*seconds):                                        # per prompt, one turn of 10 tokens
        return [[{"new_tokens": 10, "decode_s": s}] for s in seconds]
    all_runs = {"plain": runs(2.0, 2.0, 2.0), "layerskip, k=1": runs(1.6, 1.6, 1.6),
                "layerskip, k=2": runs(1.8, 1.8, 1.8), "same": runs(1.1, 1.3, 1.2), "tuned": runs(1.0, 1.2, 1.1),
                "file": runs(1.0, 1.0, 1.0)}
    split = {"file": "file", "paper": "layerskip", "same_plan": "same", "tuned": "tuned"}
    g = hsd_bench.gain_split(all_runs, split, (1, 2, 4))
    assert g["best_fixed"] == "layerskip, k=1"                              # the fastest fixed row that ran
    assert g["units"]["rows"] == ["file", "same"] and g["units"]["ratio"] == pytest.approx(3.6 / 3.0)
    assert g["k_and_stop"]["ratio"] == pytest.approx(4.8 / 3.3) and g["total"]["ratio"] == pytest.approx(4.8 / 3.0)
    assert g["units"]["ci"][0] > 1                                          # every prompt faster: a gain
    r = {"gain_split": {0.0: {"f.json": g}}, "splits": {"f.json": split}}
    line = next(hsd_bench.gain_lines(r))
    assert "its units, against same: 1.200" in line and "(a gain)" in line
    same = hsd_bench.gain_split({**all_runs, "file": all_runs["same"]}, split, (1, 2))
    assert same["units"]["ratio"] == pytest.approx(1.0) and "brings nothing measurable" in next(hsd_bench.gain_lines(
        {"gain_split": {0.0: {"f.json": same}}, "splits": {"f.json": split}}))
    assert hsd_bench.gain_split(all_runs, {**split, "tuned": None}, (1, 2))["k_and_stop"] is None


def test_grounded_prompts_repeat_the_beginning_of_their_passage_after_a_newline():
    """--prompts grounded: per test paragraph, the passage, a newline, then its first 30-40 characters, ending at a
    word's end where a word ends there (else 40): a model that copies continues the passage; the same paragraphs as
    the plain prompts."""
    tokenizer = models.load_tokenizer("toy-falcon-h1")
    grounded = hsd_bench.grounded_prompts("toy-falcon-h1", tokenizer, 64)
    assert list(grounded) == list(hsd_bench.test_prompts("toy-falcon-h1", tokenizer, 64))
    for ids in grounded.values():
        passage, beginning = tokenizer.decode(ids).split("\n")
        assert 30 <= len(beginning) <= 40 and passage.startswith(beginning)
        assert passage[len(beginning)] == " " or (len(beginning) == 40 and " " not in passage[30:41])
        assert len(passage) > len(beginning) + 64                                       # room to copy 64 tokens
    assert len(ids) + 64 <= models.load("toy-falcon-h1").config.max_position_embeddings


def test_an_interrupted_sweep_resumes_from_its_file_and_measures_each_context_once(monkeypatch, tmp_path, capsys):
    """--context-sweep --out F: each context saved as it ends ("complete" false until the last); Ctrl-C after two of
    them, then the same command: only the others are measured, and the result is an uninterrupted sweep's; another
    number of turns is another sweep (all measured again). Made-up costs: nothing is timed."""
    model = models.load("toy-falcon-h1")                            # 512 tokens: contexts 64, 128, 256
    measured, stop_at = [], []

    def measure_costs(model, skips, L, turns, longest, temperature, passes):
        if L in stop_at:
            raise KeyboardInterrupt
        measured.append(L)
        return costs(dict.fromkeys(skips, 0.5 + L / 1e4), [1.0 + 0.1 * d for d in range(9)], L)._replace(turns=turns)
    monkeypatch.setattr(hsd_bench, "bench_model", lambda name: model)
    monkeypatch.setattr(cost_model, "warm_up", lambda *a: None)
    monkeypatch.setattr(cost_model, "measure_costs", measure_costs)
    monkeypatch.setattr(hsd_bench, "lookup_cost", lambda model, L, step_s, turns: {2: L / 1e5, 4: L / 1e5, 8: L / 1e5})
    whole = hsd_bench.context_sweep("toy-falcon-h1", 3)
    assert list(whole[0]) == measured == [64, 128, 256]
    out, measured[:] = tmp_path / "sweep.json", []
    stop_at.append(256)
    with pytest.raises(KeyboardInterrupt):
        hsd_bench.context_sweep("toy-falcon-h1", 3, out=str(out))
    saved = json.loads(out.read_text())
    assert saved["complete"] is False and list(saved["costs"]) == ["64", "128"] and measured == [64, 128]
    stop_at.clear()
    measured.clear()
    resumed = hsd_bench.context_sweep("toy-falcon-h1", 3, out=str(out))
    assert measured == [256] and "resuming from" in capsys.readouterr().err
    assert resumed[0] == whole[0] and resumed[1] == whole[1]
    assert hsd_bench.sweep_rows("toy-falcon-h1", resumed[0], resumed[1]) == hsd_bench.sweep_rows(
        "toy-falcon-h1", whole[0], whole[1])
    measured.clear()
    hsd_bench.context_sweep("toy-falcon-h1", 5, out=str(out))                      # other turns: another sweep
    assert measured == [64, 128, 256]


def test_the_sweep_gives_the_lookup_its_break_even_acceptance_beside_the_papers():
    """The lookup's rows: c the proposal's cost over the k drafts it proposes, v the full model's verify pass, the
    break-even acceptance by cost_model's formula; no paper acceptance for it."""
    v = [1.0, 1.1, 1.2, 1.3, 1.4, 1.5, 1.6, 1.7, 1.8]
    sweep = {256: costs({"component": 0.8}, v)}
    rows = hsd_bench.sweep_rows("falcon-h1-0.5b", sweep, {256: {2: 0.002, 4: 0.004, 8: 0.008}})
    lookup = [r for r in rows if r["draft"] == "lookup"]
    assert [r["k"] for r in lookup] == [2, 4, 8] and all(math.isclose(r["c"], 0.001) for r in lookup)
    row = lookup[1]
    assert row["v"] == 1.4 and row["r"] == 0.25 and row["paper_alpha"] is None              # r: the sweep's own
    assert row["break_even_acceptance"] == cost_model.break_even_acceptance(0.001, 1.4, 4, 0.25)
    assert [r["draft"] for r in rows].count("component") == 3                  # the paper's rows as before
    lines = list(hsd_bench.sweep_lines("falcon-h1-0.5b", sweep, rows, {
        "device": "cpu X", "threads": 1, "cores": 2, "omp_wait_policy": "default", "busy_cores": 0.02,
        "torch": "2", "commit": None}))
    assert any(line.startswith("lookup: c is its time a round") for line in lines)


def test_the_lookup_comparison_counts_greedy_prompts_and_sets_hsd_against_transformers():
    """Made-up runs: transformers' lookup parts from greedy decoding on one of two prompts, at new token 2; hsd's
    lookup twice as fast as transformers'."""
    def run(tokens, seconds):
        return {"new_tokens": len(tokens), "decode_s": seconds, "tokens": tokens}
    greedy = [[1, 2, 3, 4], [5, 6, 7, 8]]
    runs = {"transformers plain": [[run(g, 2.0)] for g in greedy],
            "transformers lookup": [[run([1, 2, 3, 4], 1.0)], [run([5, 6, 9, 9], 1.0)]],
            "hsd plain": [[run(g, 1.0)] for g in greedy], "hsd lookup": [[run(g, 0.5)] for g in greedy]}
    summary = hsd_bench.lookup_comparison({"runs": runs})
    assert summary["labels"]["transformers lookup"]["greedy_prompts"] == 1
    assert summary["labels"]["transformers lookup"]["first_parting_token"] == 2
    assert summary["labels"]["hsd lookup"] == {"tokens_per_s": 8.0, "greedy_prompts": 2, "first_parting_token": None}
    assert math.isclose(summary["ratios"]["hsd lookup / transformers lookup"]["ratio"], 2.0)
    r = {"runs": runs, "prompts": [3, 7], "prompt_kind": "grounded", "draft": "lookup", "hf_tokens": 10,
         "refused": None, "machine": {"device": "cpu X", "threads": 1, "cores": 2, "omp_wait_policy": "default",
                                      "busy_cores": 0.02, "torch": "2", "commit": None}}
    lines = list(hsd_bench.lookup_lines("toy-qwen2.5", r, summary, 4))
    assert "2 input-grounded test prompts" in lines[0]
    assert any("plain greedy decoding's tokens on 1 of 2 prompts (first parts at new token 2)" in x for x in lines)


@pytest.mark.parametrize("args, message", [
    (["toy-qwen2.5", "--units", "--prompts", "grounded"], "--prompts goes with --drafts or --transformers-lookup"),
    (["falcon-h1-0.5b", "--transformers-lookup"], "--transformers-lookup runs on a trained toy"),
    (["toy-qwen2.5", "--drafts", "--prompts", "copy"], "argument --prompts: invalid choice"),
], ids=["prompts-alone", "lookup-official", "prompts-unknown"])
def test_the_lookups_options_are_refused_in_one_line_before_measuring(args, message, capsys, monkeypatch):
    monkeypatch.setattr(hsd_bench, "transformers_lookup", lambda *a, **k: pytest.fail("measured before refusing"))
    monkeypatch.setattr(hsd_bench, "drafts_side_by_side", lambda *a, **k: pytest.fail("measured before refusing"))
    assert exit_status(args) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


@pytest.mark.parametrize("name", ["toy-qwen2.5", "toy-falcon-h1"])
def test_hsd_lookup_runs_beside_transformers_prompt_lookup(name, monkeypatch):
    """--transformers-lookup on two grounded prompts, 6 tokens, one turn: on toy-qwen2.5 transformers' prompt lookup
    runs and its tokens are greedy decoding's, as hsd's are; transformers 5.23 refuses it on the stateful hybrids,
    and the refusal is the result, hsd's runs measured all the same."""
    pytest.importorskip("transformers")
    real = hsd_bench.grounded_prompts
    monkeypatch.setattr(hsd_bench, "grounded_prompts", lambda *a: dict(list(real(*a).items())[:2]))
    r = hsd_bench.transformers_lookup(name, "grounded", new_tokens=6, turns=1)
    summary = hsd_bench.lookup_comparison(r)
    assert summary["labels"]["hsd lookup"]["greedy_prompts"] == 2
    assert summary["labels"]["transformers plain"]["greedy_prompts"] == 2            # the same model, both sides
    if name == "toy-qwen2.5":
        assert r["refused"] is None and summary["labels"]["transformers lookup"]["greedy_prompts"] == 2
    else:
        assert "not supported with stateful models" in r["refused"] and "transformers lookup" not in r["runs"]
        assert "hsd lookup / transformers lookup" not in summary["ratios"]


def test_drafts_from_the_text_are_rows_of_their_own_beside_the_papers(no_measuring, monkeypatch):
    """--drafts lookup lookup+layerskip FILE: the named drafts at their own k and with k=auto, no skip of their own to
    time; in the table the lookup's c is 0 (no model call drafts) and the cascade's none (one c does not describe its
    check pass), so it has no cost-model column; both run at T=0.6 too."""
    model = models.load("toy-qwen2.5")
    named = ["lookup", "lookup+layerskip", "toys/toy-qwen2.5/draft.json"]
    rows, skip_label, splits = hsd_bench.draft_rows(model, named, (2,))
    assert list(splits) == ["toys/toy-qwen2.5/draft.json"]             # a draft from the text has no gain to split
    named = ["lookup", "lookup, k=auto", "lookup+layerskip", "lookup+layerskip, k=auto"]
    assert [label for label in rows if label.startswith("lookup")] == named
    assert rows["lookup"] == hsd_bench.hsd.choose_draft(model, "lookup")
    assert rows["lookup, k=auto"].k == hsd_bench.hsd.AUTO_MAX                 # the lookup alone: no k to adapt
    assert all(skip_label[label] is None for label in named) and "toys/toy-qwen2.5/draft.json" in rows
    c = costs({"layerskip": 0.5}, [1.0] * 17)
    assert hsd_bench.row_c("lookup", rows["lookup"], skip_label, c) == 0.0
    assert hsd_bench.row_c("lookup+layerskip", rows["lookup+layerskip"], skip_label, c) is None
    assert hsd_bench.row_c("layerskip, k=2", rows["layerskip, k=2"], skip_label, c) == 0.5
    monkeypatch.setattr(hsd_bench.hsd, "generate", fake_generate([]))
    monkeypatch.setattr(hsd_bench, "grounded_prompts", lambda *a: no_measuring)
    r = hsd_bench.drafts_side_by_side("toy-qwen2.5", ["lookup", "lookup+layerskip"], new_tokens=4, turns=1, ks=(2,),
                                      prompt_kind="grounded")
    assert set(named) <= set(r["ran"][hsd_bench.PAPER_T]) and r["prompt_kind"] == "grounded"
    lines = list(hsd_bench.side_by_side_lines("toy-qwen2.5", r, 4))
    assert "3 input-grounded test prompts" in lines[0]
    cascade = next(line for line in lines if line.startswith("lookup+layerskip  ") and " 0.0 " in line)
    assert cascade.split()[-3:-1] == ["-", "-"]                               # c and the cost model: none
    assert hsd_bench.side_by_side_json("toy-qwen2.5", r, 4)["prompts"] == "grounded"


def test_the_lookups_cost_is_timed_as_generation_runs_it():
    """--context-sweep's lookup cost at a context: per k, the index brought up to a round's tokens and the proposal,
    over a plain step's time; positive, and on the tiny model far below a step."""
    cost = hsd_bench.lookup_cost(models.load("tiny-falcon-h1"), 64, step_s=1.0, repeats=3)
    assert list(cost) == list(hsd_bench.SWEEP_KS) and all(0 < x < 0.1 for x in cost.values())

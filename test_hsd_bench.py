"""hsd_bench.py on the cost model: the rows it measures, the context sweep's arithmetic, its command line's refusals.

Nothing here is timed: the sweep's costs are given, and the command line is refused before anything is measured."""
import math

import pytest

import cost_model
import hsd_bench
import models


def exit_status(args):
    try:
        return hsd_bench.main(args)
    except SystemExit as e:
        return e.code


def costs(c, v, context=256):
    return cost_model.Costs(0.01, c, v, v, context, 0.0, 7, {"step": 0.01, "c": {d: 0.02 for d in c}, "v": {}})


def test_the_sweep_predicts_with_the_papers_acceptance_where_it_has_one():
    """Falcon-H1-0.5B's component draft: the paper's greedy alpha at k = 2, 4, 8, so a round keeps alpha k drafts."""
    v = [1.0, 1.1, 1.2, 1.3, 1.4, 1.5, 1.6, 1.7, 1.8]
    sweep = {256: costs({"component": 0.8, "early-exit": 0.5}, v), 4096: costs({"component": 0.6, "early-exit": 0.5}, v)}
    rows = hsd_bench.sweep_rows("falcon-h1-0.5b", sweep)
    assert [(r["context"], r["draft"], r["k"]) for r in rows][:4] == [(256, "component", 2), (256, "component", 4),
                                                                   (256, "component", 8), (256, "early-exit", 2)]
    row = next(r for r in rows if (r["context"], r["draft"], r["k"]) == (4096, "component", 4))
    assert row["paper_alpha"] == 0.37 and row["v"] == 1.4
    assert math.isclose(row["predicted_speedup_at_paper_alpha"], (1 + 0.37 * 4) / (4 * 0.6 + 1.4))
    assert row["break_even_acceptance"] == cost_model.break_even_acceptance(0.6, 1.4, 4)
    assert all(r["paper_alpha"] is None and r["predicted_speedup_at_paper_alpha"] is None
               for r in rows if r["draft"] == "early-exit")                    # the paper gives none for it
    assert all(r["paper_alpha"] is None for r in hsd_bench.sweep_rows("toy-falcon-h1", sweep))
    lines = list(hsd_bench.sweep_lines("falcon-h1-0.5b", sweep, rows, {
        "device": "cpu X", "threads": 1, "cores": 2, "omp_wait_policy": "default", "load_average": 0.5,
        "torch": "2", "commit": None}))
    assert "1 thread of 2 cores" in lines[0] and "paper's single-round acceptance (greedy)" in lines[1]
    assert not any(line.startswith("warning") for line in lines)
    sampled = {L: c._replace(temperature=0.6) for L, c in sweep.items()}
    row = next(r for r in hsd_bench.sweep_rows("falcon-h1-0.5b", sampled) if (r["context"], r["k"]) == (256, 8))
    assert row["paper_alpha"] == 0.224                                     # the paper's T=0.6 column


def test_the_drafts_rows_are_the_papers_at_every_k_and_each_file_as_found():
    model = models.load("toy-qwen2.5")
    rows, skip_of = hsd_bench.draft_rows(model, ["toys/toy-qwen2.5/draft.json"])
    paper = [label for label in rows if not label.startswith("toys/")]
    assert paper == [f"{d}, k={k}" for d in ("layerskip", "early-exit") for k in range(1, 9)] + [
        "layerskip, k=auto", "early-exit, k=auto"]                              # a Transformer: no component draft
    files = [label for label in rows if label.startswith("toys/")]
    assert files[0] == "toys/toy-qwen2.5/draft.json" and all(skip_of[label] == files[0] for label in files)
    assert rows["layerskip, k=3"].k == 3 and rows["early-exit, k=auto"].k == "auto"
    assert len({rows[label].skip for label in files}) == 1


def test_the_test_prompts_are_the_splits_test_set():
    tokenizer = models.load_tokenizer("toy-falcon-h1")
    prompts = hsd_bench.test_prompts("toy-falcon-h1", tokenizer, 64)
    paragraphs = cost_model.paragraphs(cost_model.read_lines(None, "toy-falcon-h1"), tokenizer)
    assert list(prompts) == cost_model.split(paragraphs, 64).test
    assert all(ids == paragraphs[i][:64] and len(ids) == 64 for i, ids in prompts.items())


@pytest.mark.parametrize("args, message", [
    (["toy-qwen3.5", "--units", "--threads", "0"], "--threads must be at least 1"),
    (["falcon-h1-0.5b", "--drafts"], "--drafts runs on a trained toy"),
    (["toy-qwen3.5", "--context-sweep", "--out", "."], "cannot write --out .: it is a folder"),
    (["toy-qwen3.5", "--context-sweep", "--temperature", "nan"], "--temperature must be 0 (greedy) or a finite"),
    (["toy-qwen3.5", "--context-sweep", "--temperature", "inf"], "--temperature must be 0 (greedy) or a finite"),
], ids=["threads", "drafts-official", "out-folder", "temperature-nan", "temperature-inf"])
def test_the_command_line_refuses_in_one_line_before_measuring(args, message, capsys, monkeypatch):
    monkeypatch.setattr(hsd_bench, "bench_model", lambda *a: pytest.fail("measured before refusing"))
    monkeypatch.setattr(hsd_bench, "drafts_side_by_side", lambda *a, **k: pytest.fail("measured before refusing"))
    assert exit_status(args) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_a_machine_of_one_thread_is_said_in_words():
    state = {"device": "cpu X", "threads": 1, "cores": 2, "omp_wait_policy": "PASSIVE", "load_average": 1.5,
             "torch": "2", "commit": "abc"}
    assert "1 thread of 2 cores, OMP_WAIT_POLICY PASSIVE" in hsd_bench.machine_words(state)
    assert "2 threads" in hsd_bench.machine_words({**state, "threads": 2})
    assert list(hsd_bench.warning_lines(state)) == [f"warning: {cost_model.busy_warning(state)}"]

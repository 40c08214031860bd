"""Docs tables generated from run JSON (eval/doc_tables.py): summaries, the two table kinds,
rewriting a document's generated blocks, and every generated table in the docs up to date."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dynamax_jax.eval import doc_tables as D
from dynamax_jax.eval.errors import OutputError, SettingsError

ROOT = Path(__file__).resolve().parents[1]


def _run(model, task, variant, label, saved, rl, em=0.5, threshold=None, primary=None, exits=None, **metrics):
    primary = primary or ("f1" if task == "trivia_qa" else "rougeL_max")
    exits = exits or ("runs/heads" if variant == "exit" else None)
    layers = [2, 4] if variant in ("exit", "oracle") else None
    return {"spec": {"model": model, "task": task, "variant": variant, "threshold": threshold, "kind": None,
                     "mode": None, "static_layer": None, "exits": exits, "exit_layers": layers},
            "label": label, "primary": primary, "backbone": {"num_layers": 8},
            "metrics": {"consistency_rougeL": rl, "consistency_em": em, primary: 0.25, **metrics},
            "compute": {"flops_saved": saved, "avg_layers": 8 * (1 - saved), "compute": 1 - saved},
            "examples": [{"id": i, "answer": "x"} for i in range(3)]}


RUNS = [
    _run("runs/plain", "trivia_qa", "full", "full", 0.0, 100.0, 1.0),
    _run("runs/plain", "trivia_qa", "exit", "t=0.9", 0.30, 91.0, threshold=0.9),
    _run("runs/plain", "trivia_qa", "exit", "t=0.95", 0.20, 96.0, threshold=0.95),
    _run("runs/plain", "trivia_qa", "exit", "t=0.8", 0.45, 80.0, threshold=0.8),
    _run("runs/plain", "trivia_qa", "oracle", "oracle", 0.60, 100.0, 1.0),
    _run("runs/plain", "trivia_qa", "oracle", "oracle", 0.65, 100.0, 1.0, exits="runs/other"),
    _run("runs/plain", "truthful_qa", "full", "full", 0.0, 100.0, 1.0),
    _run("runs/plain", "truthful_qa", "exit", "t=0.9", 0.25, 89.0, threshold=0.9),
    _run("runs/ee", "trivia_qa", "exit", "t=0.9", 0.40, 92.5, threshold=0.9),
]


PRETRAIN = [
    {"name": "plain", "arch": "mamba2", "parameters": 10, "steps": 5, "tokens_seen": 40, "train_seconds": 12.3,
     "heldout_loss": 5.0, "heldout_loss_by_layer": [6.5, 5.51, 5.0],
     "exit_objective": {"exit_layers": [], "exit_weights": [], "drop_max": 0.0}},
    {"name": "ee", "arch": "mamba2", "parameters": 10, "steps": 5, "tokens_seen": 40, "train_seconds": 20.0,
     "heldout_loss": 4.9, "heldout_loss_by_layer": [5.2, 4.95, 4.9],
     "exit_objective": {"exit_layers": [1, 2], "exit_weights": [0.33, 0.67], "drop_max": 0.1}},
]


HEADS = {"kinds": {"mamba": {"train_seconds": 3.0, "heldout": [
    {"layer": 2, "label_rate": 0.78, "thresholds": {"0.9": {"precision": 0.987, "exit_rate": 0.489},
                                                     "0.95": {"precision": 0.9952, "exit_rate": 0.431}}},
    {"layer": 3, "label_rate": 0.876, "thresholds": {"0.9": {"precision": 0.981, "exit_rate": 0.59}}}]}}}


def test_heads_table_gives_each_exits_exit_rate_and_precision(tmp_path):
    heads = tmp_path / "heads-plain"
    heads.mkdir()
    (heads / "summary.json").write_text(json.dumps(HEADS))
    summary = D.summarize([heads])
    assert summary["heads"] == [{"name": "heads-plain", "kind": "mamba", "heldout": HEADS["kinds"]["mamba"]["heldout"]}]
    lines = D.render(summary, "heads").split("\n")
    assert lines[0] == "| heads | kind | exit | label rate | leave at 0.9 | precision at 0.9 | leave at 0.95 | precision at 0.95 |"
    assert lines[2:] == ["| heads-plain | mamba | 2 | 0.780 | 0.489 | 0.987 | 0.431 | 0.995 |",
                         "| heads-plain | mamba | 3 | 0.876 | 0.590 | 0.981 | - | - |"]
    (heads / "summary.json").write_text(json.dumps({"steps": 3}))
    with pytest.raises(OutputError, match="is neither a train.cached summary .* nor a train.ee_tune one"):
        D.summarize([heads])


def test_layer_loss_table_lists_each_models_objective_and_losses():
    lines = D.render({"runs": [], "pretrain": PRETRAIN, "heads": []}, "layer-loss").split("\n")
    assert lines[0] == "| model | exit losses at | layer dropout | training s | layer 1 | layer 2 | layer 3 |"
    assert lines[2] == "| plain | - | - | 12 | 6.500 | 5.510 | 5.000 |"
    assert lines[3] == "| ee | 1,2 | 0.1 | 20 | 5.200 | 4.950 | 4.900 |"


def _write_runs(directory: Path, runs) -> None:
    directory.mkdir(parents=True)
    for i, run in enumerate(runs):
        (directory / f"run{i}.json").write_text(json.dumps(run))


def test_summary_keeps_what_tables_need_and_counts_the_examples(tmp_path):
    _write_runs(tmp_path / "a", RUNS[:5])
    _write_runs(tmp_path / "b", RUNS[5:])
    (tmp_path / "a" / "notes.json").write_text("[1, 2]")  # not a run: ignored
    pre = tmp_path / "mamba2-ee"
    pre.mkdir()
    (pre / "pretrain_results.json").write_text(json.dumps({**PRETRAIN[1], "history": [1] * 100, "args": {}}))
    assert D.main(["--summarize", str(tmp_path / "a"), str(tmp_path / "b"), str(pre),
                   "--to", str(tmp_path / "s.json")]) == 0
    summary = json.loads((tmp_path / "s.json").read_text())
    assert summary["pretrain"] == [{"name": "mamba2-ee", **{k: PRETRAIN[1].get(k) for k in D.PRETRAIN_KEYS}}]
    assert summary["heads"] == []
    runs = summary["runs"]
    assert len(runs) == len(RUNS)
    assert all("examples" not in r and r["num_examples"] == 3 for r in runs)
    assert {r["label"] for r in runs} == {r["label"] for r in RUNS}
    (tmp_path / "empty").mkdir()
    with pytest.raises(OutputError, match="empty holds no eval.run run JSON"):
        D.summarize([tmp_path / "empty"])


def test_runs_table_puts_the_tasks_side_by_side():
    lines = D.runs_table(RUNS).split("\n")
    assert lines[0].startswith("| model | run | exits | TriviaQA: FLOPs saved | avg layers | consist. R-L | EM-cons. | f1 |")
    assert "TruthfulQA: FLOPs saved" in lines[0] and "rougeL_max" in lines[0]
    row = next(l for l in lines if l.startswith("| plain | t=0.9 |"))
    assert row == "| plain | t=0.9 | heads (2,4) | 30.0 % | 5.6 | 91 | 0.5 | 0.25 | 25.0 % | 6 | 89 | 0.5 | 0.25 |"
    ee = next(l for l in lines if l.startswith("| ee | t=0.9 |"))
    assert ee.endswith("| - | - | - | - | - |")  # no TruthfulQA run
    assert len(lines) == 2 + 7  # full, two oracles, three thresholds of plain; one of ee
    oracles = [l for l in lines if "| oracle |" in l]
    assert [l.split(" | ")[2] for l in oracles] == ["2,4", "other (2,4)"]  # same label, other exits: two rows


def test_saved_at_picks_the_exit_run_that_saves_most_at_each_consistency():
    table = D.saved_at_table(RUNS)
    assert "| plain | TriviaQA | 30.0 % (t=0.9, R-L 91) | 20.0 % (t=0.95, R-L 96) |" in table
    assert "| plain | TruthfulQA | - | - |" in table  # 89 < 90; full depth and oracles are not exit runs
    assert "| ee | TriviaQA | 40.0 % (t=0.9, R-L 92.5) | - |" in table


def test_update_rewrites_generated_blocks_and_check_reports_stale_ones(tmp_path, capsys):
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "s.json").write_text(json.dumps({"runs": RUNS, "pretrain": PRETRAIN, "heads": []}))
    doc = tmp_path / "doc.md"
    text = ("# Results\n\nBefore.\n\n<!-- generated by eval.doc_tables: runs/s.json saved-at -->\n| old |\n"
            "<!-- end of generated table -->\n\nAfter.\n")
    doc.write_text(text)
    assert D.main(["--update", str(doc), "--check"]) == 1
    assert "stale generated tables" in capsys.readouterr().out and doc.read_text() == text
    assert D.main(["--update", str(doc)]) == 0
    new = doc.read_text()
    assert "| old |" not in new and D.saved_at_table(RUNS) in new
    assert new.startswith("# Results\n\nBefore.\n") and new.endswith("<!-- end of generated table -->\n\nAfter.\n")
    assert D.main(["--update", str(doc), "--check"]) == 0

    doc.write_text("<!-- generated by eval.doc_tables: runs/s.json runs -->\n| x |\n")
    with pytest.raises(OutputError, match="has no closing line"):
        D.regenerate(doc)
    doc.write_text("<!-- generated by eval.doc_tables: runs/missing.json runs -->\n<!-- end of generated table -->\n")
    with pytest.raises(OutputError, match="no such run summary"):
        D.regenerate(doc)
    doc.write_text("<!-- generated by eval.doc_tables: runs/s.json pie -->\n<!-- end of generated table -->\n")
    with pytest.raises(SettingsError, match="unknown table kind 'pie'"):
        D.regenerate(doc)
    with pytest.raises(SettingsError, match="one of --summarize"):
        D.main([])
    with pytest.raises(SettingsError, match="--summarize needs --to"):
        D.main(["--summarize", str(tmp_path)])


def test_wall_table_compares_each_run_with_its_models_full_depth_on_the_same_task():
    runs = [_run("runs/plain", "trivia_qa", "full", "full", 0.0, 100.0),
            _run("runs/plain", "trivia_qa", "exit", "t=0.9", 0.30, 91.0, threshold=0.9),
            _run("runs/plain", "truthful_qa", "exit", "t=0.9", 0.25, 89.0, threshold=0.9)]
    for run, speed in zip(runs, (20.0, 25.0, 30.0)):
        run["compute"]["tokens_per_s"] = speed
    table = D.wall_table(runs)
    assert "| plain | TriviaQA | full | - | 0.0 % | 100 | 20.0 | 1.00x |" in table
    assert "| plain | TriviaQA | t=0.9 | heads (2,4) | 30.0 % | 91 | 25.0 | 1.25x |" in table
    assert "| plain | TruthfulQA | t=0.9 | heads (2,4) | 25.0 % | 89 | 30.0 | - |" in table  # no full run to compare


DECODE = {"date": "2026-12-07", "command": "python benchmarks/decode.py --llama-cpp", "model": "m.gguf",
          "prompt_tokens": 37, "new_tokens": 128, "threads": 2, "load_before": 0.5, "load_after": 1.25,
          "jax": "0.10.2", "torch": "2.13.0", "llama_cpp": "0.3.36", "bandwidth_gb_s": 20.0, "weight_mb": 500.0,
          "decode": [{"setting": "batch 1", "transformers": 20.0, "llama_cpp": 40.0, "dynamax_jax": 30.0,
                      "limit": 40.0},
                     {"setting": "batch 8", "transformers": 80.0, "llama_cpp": None, "dynamax_jax": 100.0,
                      "limit": 320.0}],
          "identical": {"transformers": 128, "llama_cpp": 90},
          "ttft": [{"prompt_tokens": 2048, "transformers": 5.0, "dynamax_jax": 4.0}]}


def test_decode_and_ttft_tables_render_a_benchmark_record_with_its_ratios(tmp_path):
    table = D.decode_table([DECODE])
    assert table.startswith("`python benchmarks/decode.py --llama-cpp`: 2026-12-07, jax 0.10.2, torch 2.13.0, "
                            "llama.cpp 0.3.36, 2 threads, load 0.50 before and 1.25 after.")
    assert "| batch 1 | 20.0 | 40.0 | 30.0 | **1.50x** | 0.75x | 40.0 |" in table
    assert "| batch 8 | 80.0 | - | 100.0 | **1.25x** | - | 320.0 |" in table
    assert "the first 128 of 128 identical to transformers; the first 90 of 128 identical to llama.cpp" in table
    assert "| 2,048 | 5.000 | 4.000 | 1.25x |" in D.ttft_table([DECODE])
    path = tmp_path / "decode.json"  # the file benchmarks/decode.py --json writes is a summary of its own
    path.write_text(json.dumps({"decode": [DECODE]}))
    summary = D.read_summary(path)
    assert summary["runs"] == [] and D.render(summary, "ttft") == D.ttft_table([DECODE])
    path.write_text(json.dumps({"other": []}))
    with pytest.raises(OutputError, match="is not a run summary"):
        D.read_summary(path)


def test_time_model_table_gives_each_heads_row_its_prediction():
    record = {"date": "2026-12-07", "command": "python benchmarks/early_exit.py", "load_before": 1.0,
              "load_after": 1.5, "model": "m", "exits": [2], "kind": "mamba", "new_tokens": 64, "num_layers": 8,
              "batches": [{"batch": 1, "time_model": {"fixed_ms": 0.3, "per_layer_ms": 0.06, "full_ms": 0.78,
                                                      "classifier_ms": 0.18, "num_exits": 1,
                                                      "predicted_ms": {"mamba heads, threshold 0.9": 0.756}},
                           "rows": [{"setting": "mamba heads, threshold 0.9", "avg_layers": 4.6, "ideal": 1.43,
                                     "realized": 1.13, "deepest_layers": 4.6, "ms_per_token": 0.7},
                                    {"setting": "static exit 4", "avg_layers": 4.0, "ideal": 1.6, "realized": 1.4,
                                     "deepest_layers": 4.0, "ms_per_token": 0.55}]}]}
    table = D.time_model_table([record])
    assert table.startswith("`python benchmarks/early_exit.py`: 2026-12-07, load 1.00 before and 1.50 after. m, "
                            "exits [2] (mamba).")
    assert ("| 1 | 0.300 (38%) | 0.060 | 0.180 (3.0 layers) | mamba heads, threshold 0.9 | 4.60 | 4.60 | 1.43x | "
            "1.13x | 0.756 | 0.700 |") in table
    assert "static exit 4" not in table  # static rows make the fit; they have no prediction of their own
    record["batches"][0]["time_model"] = None  # a run without static exits has no fit
    assert D.time_model_table([record]).endswith("|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|")


def test_mamba2_table_gives_each_models_speeds_ratio_and_parity():
    record = {"date": "2026-12-07", "command": "python benchmarks/mamba2_decode.py", "load_before": 0.2,
              "load_after": 1.5, "jax": "0.10.2", "torch": "2.13.0", "threads": 2, "new_tokens": 32,
              "prompt_tokens": 16, "rows": [{"model": "small", "layers": 8, "hidden_size": 256, "params_m": 7.7,
                                             "dynamax_jax": 1200.0, "scan": 300.0, "transformers": 120.0,
                                             "max_logit_diff": 2.1e-6, "same_tokens": 33, "tokens": 33}]}
    table = D.mamba2_table([record])
    assert "Float32, batch 1, prompt 16, 32 new tokens" in table
    assert "| small | 8 | 256 | 7.7 | 1200.0 | 300.0 | 120.0 | **10.00x** | 2.1e-06 | 33/33 |" in table


def test_compile_and_cpu_depth_tables_render_their_benchmarks_records(tmp_path):
    compile_record = {"date": "2026-12-07", "command": "python benchmarks/compile_time.py --json c.json",
                      "load_before": 0.4, "load_after": 0.9, "jax": "0.10.2", "chunk": 8,
                      "programs": [{"program": "SmolLM2 full depth", "lower_prefill_s": 0.5, "compile_prefill_s": 1.6,
                                    "lower_decode_s": 1.25, "compile_decode_s": 5.6}],
                      "codestral": {"layers": 64, "kind": "mamba", "exits": [38, 45], "lower_decode_s": 1.13,
                                    "lower_prefill_s": 0.85}}
    table = D.compile_table([compile_record])
    assert table.startswith("`python benchmarks/compile_time.py --json c.json`: 2026-12-07, jax 0.10.2, load 0.40 "
                            "before and 0.90 after. 8 tokens per decode call.")
    assert "| SmolLM2 full depth | 0.50 | 1.60 | 1.25 | 5.60 |" in table
    assert table.endswith("A 64-layer Codestral-Mamba-shaped decode with `mamba` exits at 38, 45 (abstract weights) "
                          "lowers in 1.13 s, its prefill in 0.85 s.")
    depth_record = {"date": "2026-12-07", "command": "python benchmarks/scale_7b.py --cpu-depth", "load_before": 1.1,
                    "load_after": 1.3, "jax": "0.10.2",
                    "settings": {"decode_steps": 4, "exit_kind": "ffn", "cache_len": 4096, "cpu_dtype": "float32"},
                    "cpu_depth": [{"model": "codestral", "layers": 64, "exits": [38, 58], "lower_s": 0.93,
                                   "compile_s": 4.21}]}
    path = tmp_path / "scale.json"  # what benchmarks/scale_7b.py --json writes
    path.write_text(json.dumps({"scale_7b": [depth_record]}))
    table = D.render(D.read_summary(path), "cpu-depth")
    assert "Batch 1, 4 tokens per call, `ffn` exits, a 4,096-slot cache, abstract float32 weights." in table
    assert table.endswith("| Codestral Mamba 7B | 64 | 38, 58 | 0.9 | 4.2 |")


def test_tpu_table_merges_scale_7b_runs_and_says_what_a_program_that_does_not_fit_asked_for(tmp_path):
    row = {"model": "mistral", "topology": "v5e", "mesh": "8x1", "program": "decode-b1", "arguments": 14.49,
           "outputs": 0.5, "temporaries": 0.04, "total": 14.53, "hbm": 16.0, "lower_s": 1.2, "compile_s": 10.4,
           "error": None, "fits": "fits"}
    oom = row | {"program": "distill", "arguments": None, "outputs": None, "temporaries": None, "total": None,
                 "lower_s": None, "compile_s": 4.1, "fits": "does not fit",
                 "error": "RESOURCE_EXHAUSTED: XLA:TPU compile permanent error. Ran out of memory in memory space "
                          "hbm. Used 17.49G of 15.75G hbm. Exceeded hbm capacity by 1.74G."}
    records = [{"date": "2026-12-07", "command": f"python benchmarks/scale_7b.py --json {name}.json",
                "load_before": 1.0, "load_after": 1.2, "jax": "0.10.2", "settings": {}, "tpu": [r]}
               for name, r in (("a", row), ("b", oom))]
    for name, record in zip("ab", records):
        (tmp_path / f"{name}.json").write_text(json.dumps({"scale_7b": [record]}))
    summary = D.summarize([tmp_path / "a.json", tmp_path / "b.json"])
    assert summary["runs"] == [] and summary["scale_7b"] == records
    table = D.render(summary, "tpu")
    assert "--json a.json`: 2026-12-07, jax 0.10.2" in table and "--json b.json`" in table
    assert "| mistral | v5e-8 | 8x1 | decode-b1 | 14.49 | 0.50 | 0.04 | 14.53 | 16 | fits | 1.2 | 10.4 |" in table
    assert table.endswith("| mistral | v5e-8 | 8x1 | distill |  |  |  |  | 16 | does not fit (needs 17.49G of 15.75G) "
                          "|  | 4.1 |")


def test_changes_table_splits_each_exit_runs_changed_generations_by_where_they_first_differ():
    spec = {"model": "m", "task": "trivia_qa", "exits": "heads/h", "exit_layers": [2], "variant": "exit",
            "threshold": 0.9}
    runs = [{"spec": spec, "label": "h-t0.9", "primary": "f1", "compute": {}, "metrics": {
                "diverged_at_exit": 0.25, "diverged_after_exit": 0.125}},
            {"spec": {**spec, "exits": None, "exit_layers": None, "variant": "static"}, "label": "static-6",
             "primary": "f1", "compute": {}, "metrics": {"diverged_at_exit": 1.0, "diverged_after_exit": 0.0}},
            {"spec": {**spec, "variant": "oracle"}, "label": "oracle-2", "primary": "f1", "compute": {},
             "metrics": {}}]
    table = D.changes_table(runs)
    assert table.split("\n")[0] == ("| model | run | exits | TriviaQA: generations changed | first change at an exit "
                                    "| after correct exits |")
    assert table.split("\n")[2:] == ["| m | h-t0.9 | h (2) | 0.375 | 0.250 | 0.125 |"]  # static and oracle left out


def test_monitor_table_gives_each_tuned_runs_agreement_before_and_after(tmp_path):
    def scores(final, exits):
        return {"final_kl": 0.0, "final_agree": final,
                "exits": [{"layer": k, "kl": 0.1, "agree": a} for k, a in exits.items()]}
    monitor = {"before": {"answers.jsonl": scores(1.0, {24: 0.652, 27: 0.75})},
               "after": {"answers.jsonl": scores(0.992, {24: 0.652, 27: 0.788})}}
    run = tmp_path / "ee-d"
    run.mkdir()
    (run / "summary.json").write_text(json.dumps({"steps": 118, "tokens_seen": 60416, "wall_seconds": 1473.7,
                                                  "tokens_per_s": 43.2, "objective": {}, "monitor": monitor,
                                                  "lora": {"rank": 8}}))
    summary = D.summarize([run])
    assert summary["tune"] == [{"name": "ee-d", "steps": 118, "tokens_seen": 60416, "wall_seconds": 1473.7,
                                "tokens_per_s": 43.2, "objective": {}, "monitor": monitor}]
    assert D.render(summary, "monitor").split("\n") == [
        "| run | source | when | last layer | exit 24 | exit 27 |", "|---|---|---|---:|---:|---:|",
        "| ee-d | answers | before | 1.000 | 0.652 | 0.750 |", "| ee-d | answers | after | 0.992 | 0.652 | 0.788 |",
        "", "ee-d: 118 steps, 60,416 tokens in 1,474 s (43.2 tokens/s)."]


def test_ssd_tpu_table_gives_each_directions_memory_and_the_forward_kernels_vmem():
    row = {"topology": "v5e", "direction": "forward", "arguments_mib": 45.0, "outputs_mib": 68.0,
           "temporaries_mib": 128.94, "total_mib": 241.94, "kernel_vmem_kib": 896, "mosaic_kernels": 1,
           "lower_s": 0.21, "compile_s": 12.93, "compile_cpu_s": 4.4}
    record = {"date": "2026-12-07", "command": "python benchmarks/ssd_tpu_compile.py", "load_before": 2.0,
              "load_after": 2.5, "jax": "0.10.2", "libtpu": "0.0.42.1", "dtype": "bfloat16",
              "shape": {"b": 1, "l": 2048}, "rows": [row, row | {"direction": "backward", "kernel_vmem_kib": None}]}
    lines = D.ssd_tpu_table([record]).split("\n")
    assert lines[0].endswith("load 2.00 before and 2.50 after. libtpu 0.0.42.1; shape b 1, l 2048; x/B/C bfloat16.")
    assert lines[4:] == ["| v5e | forward | 45.0 | 68.0 | 128.9 | 241.9 | 896 KiB | 1 | 0.2 | 12.9 / 4.4 |",
                         "| v5e | backward | 45.0 | 68.0 | 128.9 | 241.9 | n/a | 1 | 0.2 | 12.9 / 4.4 |"]


def test_grid_table_puts_each_heads_and_modes_thresholds_side_by_side():
    def run(exits, layers, mode, t, saved, consistency, task="trivia_qa"):
        return {"spec": {"model": "m", "task": task, "exits": exits, "exit_layers": layers, "mode": mode,
                         "threshold": t, "variant": "exit"}, "label": f"{mode}-t{t}", "primary": "f1",
                "compute": {"flops_saved": saved}, "metrics": {"consistency_rougeL": consistency}}
    runs = [run("h/a", [2], "skip", 0.9, 0.364, 93.04), run("h/a", [2], "skip", 0.95, 0.3, 95.0),
            run("h/b", [2, 4], "skip", 0.95, 0.337, 93.0), run("h/a", [2], "skip", 0.9, 0.356, 95.7, "truthful_qa"),
            {**run("h/a", [2], "skip", 0.9, 0.0, 100.0), "spec": {"model": "m", "task": "trivia_qa", "exits": None,
                                                                  "variant": "full"}}]
    blocks = D.grid_table(runs).split("\n\n")
    assert blocks[0] == "m, TriviaQA: FLOPs saved / consistency R-L"
    assert blocks[1].split("\n") == ["| exits | mode | t = 0.9 | t = 0.95 |", "|---|---|---:|---:|",
                                     "| a (2) | `skip` | 36.4 % / 93 | 30.0 % / 95 |",
                                     "| b (2,4) | `skip` | - | 33.7 % / 93 |"]
    assert blocks[2] == "m, TruthfulQA: FLOPs saved / consistency R-L"
    assert blocks[3].endswith("| a (2) | `skip` | 35.6 % / 95.7 |")


def test_every_generated_table_in_the_docs_is_up_to_date():
    docs = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    generated = [d for d in docs if "<!-- generated by eval.doc_tables:" in d.read_text(encoding="utf-8")]
    stale = [str(d.relative_to(ROOT)) for d in generated if D.regenerate(d) != d.read_text(encoding="utf-8")]
    assert not stale, f"run python -m eval.doc_tables --update {' '.join(stale)}"

"""eval.budget: the equal-compute interpolation, and a ``python -m eval.budget`` run on a tiny
random Llama with random calm exits that writes JSON + markdown + PNG."""

import json
import re
from pathlib import Path

import jax
import pytest

import dynamax_jax as dx
from dynamax_jax.eval import budget, report

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "eval" / "data"
NUM_LAYERS = 4  # exits at the default layers 2 and 3


# ----------------------------------------------------------------------------- interpolation

def test_interpolate_hand_checked():
    points = [(0.5, 0.4), (0.7, 0.2), (1.0, 0.0)]
    assert report.interpolate(points, 0.6) == pytest.approx(0.3)
    assert report.interpolate(points, 0.8) == pytest.approx(0.2 - 0.2 / 3)
    assert report.interpolate(points, 0.5) == pytest.approx(0.4)  # the ends are in range
    assert report.interpolate(points, 1.0) == pytest.approx(0.0)
    # order does not matter
    assert report.interpolate(points[::-1], 0.6) == pytest.approx(0.3)
    assert report.interpolate([(1.0, 0.0), (0.5, 0.4), (0.7, 0.2)], 0.85) == pytest.approx(0.1)
    # points at the same compute are averaged
    assert report.interpolate([(0.5, 0.2), (0.5, 0.4), (1.0, 0.0)], 0.75) == pytest.approx(0.15)


def test_interpolate_never_extrapolates():
    points = [(0.5, 0.4), (0.7, 0.2)]
    assert report.interpolate(points, 0.49) is None
    assert report.interpolate(points, 0.71) is None
    assert report.interpolate([], 0.6) is None
    assert report.interpolate([(0.6, 0.1)], 0.6) == pytest.approx(0.1)
    assert report.interpolate([(0.6, 0.1)], 0.61) is None


def test_compare_rows():
    def run(kind, compute, disagreement, **setting):
        return dict(kind=kind, compute=compute, avg_layers=compute * 4, token_disagreement=disagreement,
                    rouge_inconsistency=2 * disagreement, target_layers=setting.get("target"))

    runs = [run("full", 1.0, 0.0), run("threshold", 0.6, 0.5), run("threshold", 0.9, 0.2),
            run("static", 0.5, 0.8), run("static", 0.75, 0.4), run("budget", 0.8, 0.1, target=3.2),
            run("budget", 0.55, 0.3, target=2.2)]
    near, far = budget.compare(runs)
    assert near["target_layers"] == 3.2 and near["compute"] == 0.8
    assert near["token_disagreement"]["budget"] == 0.1
    assert near["token_disagreement"]["threshold"] == pytest.approx(0.5 - 0.3 * 2 / 3)
    # the static curve ends at full depth
    assert near["token_disagreement"]["static"] == pytest.approx(0.4 - 0.4 * 0.2)
    assert near["rouge_inconsistency"]["static"] == pytest.approx(2 * (0.4 - 0.4 * 0.2))
    assert far["token_disagreement"]["threshold"] is None  # below the cheapest threshold run
    assert far["token_disagreement"]["static"] == pytest.approx(0.8 - 0.4 * 0.2)


# ----------------------------------------------------------------------------- CLI

@pytest.fixture(scope="module")
def tiny(tiny_llama_dir, tmp_path_factory):
    """The 4-layer random Llama of conftest and random calm exits (at its default layers 2
    and 3) whose output weight is scaled up so that p(exit) spreads over (0, 1)."""
    config, _ = dx.load_pretrained(tiny_llama_dir)
    exit_config = dx.ExitConfig(kind="calm", threshold=0.5)
    exit_params = dx.init_exits(config, exit_config, jax.random.key(1))
    exit_params["w"] = exit_params["w"] * 40.0
    exits = tmp_path_factory.mktemp("budget") / "exits"
    dx.save_exits(exit_config, exit_params, exits)
    return tiny_llama_dir, exits


def _args(tiny, out, *extra):
    model, exits = tiny
    return ["--model", str(model), "--exits", str(exits), "--data-dir", str(DATA), "--limit", "4",
            "--max-new-tokens", "6", "--batch-size", "4", "--pad-multiple", "64", "--out", str(out), *extra]


def test_cli_writes_runs_comparison_table_and_plot(tiny, tmp_path, capsys):
    out = tmp_path / "out"
    assert budget.main(_args(tiny, out, "--thresholds", "0.3,0.7", "--targets", "2.5")) == 0
    result = json.loads((out / "budget.json").read_text())
    runs = {r["label"]: r for r in result["runs"]}
    assert set(runs) == {"full", "threshold 0.3", "threshold 0.7", "budget 2.5", "static 2", "static 3"}
    full = runs["full"]
    assert full["avg_layers"] == NUM_LAYERS and full["compute"] == pytest.approx(1.0)
    assert full["token_disagreement"] == 0.0 and full["rouge_inconsistency"] == 0.0
    for k in (2, 3):
        assert runs[f"static {k}"]["avg_layers"] == k and runs[f"static {k}"]["static_layer"] == k
    assert runs["static 2"]["compute"] < runs["static 3"]["compute"] < 1.0
    assert 2 <= runs["budget 2.5"]["avg_layers"] <= NUM_LAYERS
    for r in result["runs"]:
        assert set(r) >= {"avg_layers", "compute", "token_disagreement", "rouge_inconsistency",
                          "repetition_rate", "wall_time_s"}
        assert 0.0 <= r["token_disagreement"] <= 1.0 and 0.0 <= r["rouge_inconsistency"] <= 1.0
    [row] = result["comparison"]
    assert row["target_layers"] == 2.5 and row["compute"] == runs["budget 2.5"]["compute"]
    for measure in ("token_disagreement", "rouge_inconsistency"):
        assert set(row[measure]) == {"budget", "threshold", "static"}
        assert row[measure]["budget"] == runs["budget 2.5"][measure]
        for kind in ("threshold", "static"):
            value = row[measure][kind]
            assert value is None or 0.0 <= value <= 1.0
    assert row["token_disagreement"]["static"] is not None  # static 2 .. full depth spans it

    table = (out / "budget.md").read_text()
    assert table.startswith("# Compute budget") and "`python -m eval.budget --model" in table
    assert "| budget 2.5 |" in table and "| static 2 |" in table and "## Equal compute" in table
    assert table in capsys.readouterr().out
    assert (out / "budget.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("extra, message", [
    (["--targets", "0"], "--targets: each must be > 0"),
    (["--targets", "3", "--thresholds", "-0.1"], "--thresholds: each must be >= 0"),
    (["--targets", "3", "--batch-size", "0"], "--batch-size must be >= 1"),
    (["--targets", "3", "--data-dir", "no-such-dir"], "--data-dir no-such-dir is not a directory"),
    (["--targets", "3", "--exits", "{model}"], "is not an exit checkpoint"),
    (["--targets", "9"], r"--targets: 9 is outside \[2, 4\]"),  # checked against the model
    (["--targets", "1.5"], r"--targets: 1.5 is outside \[2, 4\]"),  # below the first exit
])
def test_bad_input_exits_with_2_naming_the_flag(tiny, tmp_path, capsys, extra, message):
    out = tmp_path / "out"
    extra = [arg.format(model=tiny[0]) for arg in extra]
    assert budget.main(_args(tiny, out, *extra)) == 2
    err = capsys.readouterr().err
    assert err.startswith("python -m eval.budget: error: ") and "--debug" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 2  # the error and the hint
    assert re.search(message, err), err
    assert not out.exists()


def test_an_earlier_run_is_replaced_only_with_overwrite(tiny, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    (out / "budget.md").write_text("a previous run")
    monkeypatch.setattr(budget, "load_backbone", lambda *a, **k: pytest.fail("the model was loaded"))
    assert budget.main(_args(tiny, out, "--targets", "3")) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"python -m eval.budget: error: --out {out} already holds budget.md of a previous run; "
                          "pass --overwrite")
    assert (out / "budget.md").read_text() == "a previous run"
    budget.check_outputs(out, overwrite=True)  # --overwrite: the run goes ahead
    assert "--overwrite" in budget.build_parser().format_help()


def test_a_second_writer_on_one_out_is_refused(tiny, tmp_path, capsys, monkeypatch):
    import os

    from dynamax_jax.io import output_lock

    out = tmp_path / "out"
    monkeypatch.setattr(budget, "load_backbone", lambda *a, **k: pytest.fail("the model was loaded"))
    with output_lock(out, command="python -m eval.budget --targets 2"):
        assert budget.main(_args(tiny, out, "--targets", "3")) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"python -m eval.budget: error: {out} is in use by PID {os.getpid()} on "), err

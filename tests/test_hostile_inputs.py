"""Hostile and malformed inputs: each must fail with a clear error naming the file, tensor or
field at fault, never load silently wrong weights.

Safetensors files are checked against the reference implementation: every file the
official ``safetensors.safe_open`` refuses, the project's reader refuses too (and a valid
file reads the same through both)."""

from __future__ import annotations

import json
import os
import re
import struct
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from safetensors import SafetensorError, safe_open

import dynamax_jax as dx
from dynamax_jax.convert import safetensors_io
from dynamax_jax.convert.errors import CheckpointError, CorruptFileError

F32_4 = np.arange(4, dtype=np.float32).tobytes()  # 16 bytes


def _file(path: Path, header, data: bytes, *, raw_header: bytes | None = None, length: int | None = None) -> Path:
    """A safetensors file with exactly this header (dict, or raw bytes) and data section; the
    8-byte length is the header's unless ``length`` is given."""
    raw = raw_header if raw_header is not None else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw) if length is None else length) + raw + data)
    return path


def _entry(dtype: str, shape, begin: int, end: int) -> dict:
    return {"dtype": dtype, "shape": shape, "data_offsets": [begin, end]}


# name -> (header, data, overrides) of a file the reference implementation refuses
HOSTILE = {
    "overlapping offsets": ({"a": _entry("F32", [4], 0, 16), "b": _entry("F32", [4], 8, 24)}, F32_4 + F32_4[:8], {}),
    "same range twice": ({"a": _entry("F32", [4], 0, 16), "b": _entry("F32", [4], 0, 16)}, F32_4, {}),
    "gap between tensors": ({"a": _entry("F32", [4], 0, 16), "b": _entry("F32", [4], 20, 36)}, F32_4 * 3, {}),
    "first tensor not at 0": ({"a": _entry("F32", [4], 4, 20)}, b"\0" * 4 + F32_4, {}),
    "end before begin": ({"a": _entry("F32", [0], 16, 0)}, F32_4, {}),
    "offsets past the end": ({"a": _entry("F32", [4], 0, 16), "b": _entry("F32", [4], 16, 32)}, F32_4, {}),
    "bytes after the last tensor": ({"a": _entry("F32", [4], 0, 16)}, F32_4 + b"\0" * 8, {}),
    "size disagrees with shape": ({"a": _entry("F32", [4], 0, 12)}, F32_4[:12], {}),
    "negative offset": ({"a": _entry("F32", [4], -16, 0)}, F32_4, {}),
    "string in shape": ({"a": _entry("F32", ["4"], 0, 16)}, F32_4, {}),
    "float in shape": ({"a": _entry("F32", [4.0], 0, 16)}, F32_4, {}),
    "negative dimension": ({"a": _entry("F32", [-4], 0, 16)}, F32_4, {}),
    "three offsets": ({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16, 16]}}, F32_4, {}),
    "unknown dtype": ({"a": _entry("F31", [4], 0, 16)}, F32_4, {}),
    "missing data_offsets": ({"a": {"dtype": "F32", "shape": [4]}}, F32_4, {}),
    "metadata value not a string": ({"__metadata__": {"format": 1}, "a": _entry("F32", [4], 0, 16)}, F32_4, {}),
    "header is a list": (None, F32_4, {"raw_header": b"[1, 2]"}),
    "header not UTF-8": (None, F32_4, {"raw_header": b'{"\xff": 1}'}),
    "header not JSON": (None, F32_4, {"raw_header": b"{not json"}),
    "header length past the end": ({"a": _entry("F32", [4], 0, 16)}, F32_4, {"length": 10_000}),
    "header length over 100 MB": ({"a": _entry("F32", [4], 0, 16)}, F32_4, {"length": 100_000_001}),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_safetensors_refused_like_the_reference(case, tmp_path):
    header, data, overrides = HOSTILE[case]
    path = _file(tmp_path / "model.safetensors", header, data, **overrides)
    with pytest.raises(SafetensorError):  # the reference implementation refuses it ...
        with safe_open(str(path), framework="numpy") as f:
            [f.get_tensor(k) for k in f.keys()]
    with pytest.raises(CorruptFileError, match=r"model\.safetensors: (corrupt safetensors header|truncated)"):
        safetensors_io.read_header(path)  # ... and so does ours, naming the file
    with pytest.raises(CorruptFileError):
        safetensors_io.CheckpointReader(tmp_path)


def test_short_file_refused_like_the_reference(tmp_path):
    path = tmp_path / "model.safetensors"
    path.write_bytes(b"\x10\0\0")
    with pytest.raises(SafetensorError):
        safe_open(str(path), framework="numpy")
    with pytest.raises(CorruptFileError, match=r"model\.safetensors: truncated"):
        safetensors_io.read_header(path)


def test_overlap_message_names_the_tensor(tmp_path):
    header, data, _ = HOSTILE["overlapping offsets"]
    path = _file(tmp_path / "model.safetensors", header, data)
    with pytest.raises(CorruptFileError, match=r"'b' has invalid data_offsets \[8, 24\]: it overlaps"):
        safetensors_io.read_header(path)


@pytest.mark.parametrize("order", ["offset order", "reversed", "with empty tensor"])
def test_valid_files_read_the_same_as_the_reference(order, tmp_path):
    b = np.arange(6, dtype=np.int64).reshape(2, 3)
    header = {"a": _entry("F32", [4], 0, 16), "b": _entry("I64", [2, 3], 16, 64)}
    if order == "reversed":
        header = dict(reversed(header.items()))
    if order == "with empty tensor":
        header["e"] = _entry("BF16", [0, 5], 64, 64)
    header["__metadata__"] = {"format": "pt"}
    path = _file(tmp_path / "model.safetensors", header, F32_4 + b.tobytes())
    with safe_open(str(path), framework="numpy") as f:
        ref = {k: f.get_tensor(k) for k in f.keys()} if order != "with empty tensor" else None
        ref_keys = set(f.keys())
    with safetensors_io.CheckpointReader(path) as reader:
        assert set(reader.names()) == ref_keys
        ours = {k: reader.read(k) for k in reader.names()}
    np.testing.assert_array_equal(ours["a"], np.arange(4, dtype=np.float32))
    np.testing.assert_array_equal(ours["b"], b)
    if ref is not None:  # (safetensors' numpy API has no bfloat16)
        for k in ref:
            np.testing.assert_array_equal(ours[k], ref[k])
            assert ours[k].dtype == ref[k].dtype


@pytest.fixture
def tiny_checkpoint(tmp_path):
    config = dx.MistralConfig.tiny(num_layers=2, model_type="llama")
    params = dx.init_params(config, jax.random.key(0))
    path = tmp_path / "model"
    dx.save_pretrained(config, params, path)
    return path


def test_integer_weight_is_refused_not_cast(tiny_checkpoint):
    file = tiny_checkpoint / "model.safetensors"
    with safetensors_io.CheckpointReader(file) as reader:
        tensors = {name: reader.read(name) for name in reader.names()}
    name = "model.layers.1.mlp.down_proj.weight"
    tensors[name] = (tensors[name] * 1000).astype(np.int32)
    safetensors_io.save_file(tensors, file, {"format": "pt"})
    with safe_open(str(file), framework="numpy") as f:  # a valid file: the reference reads it
        assert f.get_tensor(name).dtype == np.int32
    with pytest.raises(CheckpointError, match=rf"model: tensor '{name}' is stored as I32; layers/w_down"):
        dx.load_pretrained(tiny_checkpoint)


def test_float_weights_of_any_width_still_load(tiny_checkpoint):
    import ml_dtypes

    file = tiny_checkpoint / "model.safetensors"
    with safetensors_io.CheckpointReader(file) as reader:
        tensors = {name: reader.read(name) for name in reader.names()}
    _, want = dx.load_pretrained(tiny_checkpoint)
    tensors = {k: v.astype(ml_dtypes.bfloat16 if i % 2 else np.float16) for i, (k, v) in enumerate(tensors.items())}
    safetensors_io.save_file(tensors, file, {"format": "pt"})
    _, got = dx.load_pretrained(tiny_checkpoint)
    for x, y in zip(jax.tree.leaves(want), jax.tree.leaves(got)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("field, value, message", [
    ("num_hidden_layers", "four", "'num_hidden_layers' must be an integer >= 1, got 'four'"),
    ("num_hidden_layers", -1, "'num_hidden_layers' must be an integer >= 1, got -1"),
    ("num_hidden_layers", 2.5, "'num_hidden_layers' must be an integer >= 1, got 2.5"),
    ("hidden_size", True, "'hidden_size' must be an integer >= 1, got True"),
    ("rms_norm_eps", "x", "'rms_norm_eps' must be a positive number, got 'x'"),
    ("rms_norm_eps", -1e-5, "'rms_norm_eps' must be a positive number, got -1e-05"),
    ("max_position_embeddings", "4096", "'max_position_embeddings' must be an integer >= 1, got '4096'"),
])
def test_bad_config_field_is_named(tiny_checkpoint, field, value, message):
    file = tiny_checkpoint / "config.json"
    config = json.loads(file.read_text())
    config[field] = value
    file.write_text(json.dumps(config))
    with pytest.raises(dx.ConfigError, match=f"llama config field {message}"):
        dx.load_pretrained(tiny_checkpoint)


def test_bad_mamba2_config_field_is_named():
    base = dict(model_type="mamba2", vocab_size=128, hidden_size=64, num_hidden_layers=2, head_dim=16, n_groups=1)
    with pytest.raises(dx.ConfigError, match="mamba2 config field 'num_hidden_layers' must be an integer"):
        dx.Mamba2Config.from_hf_config({**base, "num_hidden_layers": "four"})
    with pytest.raises(dx.ConfigError, match="mamba2 config field 'layer_norm_epsilon' must be a positive number"):
        dx.Mamba2Config.from_hf_config({**base, "layer_norm_epsilon": "x"})
    with pytest.raises(dx.ConfigError, match="codestral params.json config field 'n_layers'"):
        dx.Mamba2Config.from_codestral_params({"dim": 64, "n_layers": -1, "vocab_size": 128})


@pytest.mark.parametrize("cls, field", [(dx.MistralConfig, "num_layers"), (dx.MistralConfig, "rms_norm_eps"),
                                        (dx.Mamba2Config, "num_layers"), (dx.Mamba2Config, "chunk_size")])
def test_config_constructor_checks_fields(cls, field):
    with pytest.raises(dx.ConfigError, match=f"{cls.__name__}.{field} must be a positive"):
        cls.tiny(**{field: -1})
    with pytest.raises(dx.ConfigError, match=f"{cls.__name__}.{field} must be a positive"):
        cls.tiny(**{field: "x"})


@pytest.fixture
def exits_dir(tmp_path):
    import os

    config = dx.MistralConfig.tiny(num_layers=4)
    exit_config = dx.ExitConfig(layers=(2, 3), kind="calm")
    params = dx.init_exits(config, exit_config, jax.random.key(0))
    old = os.umask(0o022)
    try:
        dx.save_exits(exit_config, params, tmp_path / "exits")
    finally:
        os.umask(old)
    return tmp_path / "exits"


def test_exit_files_follow_the_umask(exits_dir):
    modes = {p.name: p.stat().st_mode & 0o777 for p in exits_dir.iterdir()}
    assert modes == {"exit_config.json": 0o644, "exit_params.safetensors": 0o644}
    assert exits_dir.stat().st_mode & 0o777 == 0o755


def test_truncated_exit_params_name_the_file(exits_dir):
    import os

    file = exits_dir / "exit_params.safetensors"
    os.truncate(file, file.stat().st_size - 10)
    with pytest.raises(dx.ExitError, match=r"exits/exit_params\.safetensors: corrupt or truncated"):
        dx.load_exits(exits_dir)
    (exits_dir / "exit_config.json").write_text('{"layers": [2, 3')
    with pytest.raises(dx.ExitError, match=r"exits/exit_config\.json: not valid JSON"):
        dx.load_exits(exits_dir)


@pytest.mark.parametrize("value", ["0", "-1", "nan", "inf", "x"])
def test_convert_refuses_a_shard_size_that_is_not_positive(value, tmp_path, capsys):
    from dynamax_jax.convert.__main__ import parse_args

    with pytest.raises(SystemExit) as exit_info:
        parse_args([str(tmp_path / "src"), str(tmp_path / "dst"), "--max-shard-gb", value])
    assert exit_info.value.code == 2
    assert "--max-shard-gb" in capsys.readouterr().err
    with pytest.raises(ValueError, match="max_shard_bytes must be positive"):
        safetensors_io.write_sharded(tmp_path, {"a": ((2,), np.float32)}, lambda name: np.zeros(2, np.float32),
                                     max_shard_bytes=0)


@pytest.mark.parametrize("flag, value", [("--thresholds", ","), ("--thresholds", ""), ("--tasks", " , ")])
def test_eval_run_refuses_an_empty_list(flag, value, capsys):
    from dynamax_jax.eval.run import build_parser

    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args([flag, value])
    assert exit_info.value.code == 2
    assert f"{flag}: expected a comma-separated list" in capsys.readouterr().err


# ----------------------------------------------------------------------------- destinations


def _tree(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def test_save_exits_into_a_model_directory_deletes_nothing(tiny_checkpoint, exits_dir):
    before = _tree(tiny_checkpoint)
    exit_config, exit_params = dx.load_exits(exits_dir)
    with pytest.raises(FileExistsError, match=r"holds files this writer did not make \(config\.json, model\."):
        dx.save_exits(exit_config, exit_params, tiny_checkpoint)
    assert _tree(tiny_checkpoint) == before
    dx.save_exits(exit_config, exit_params, tiny_checkpoint, overwrite=True)  # beside the model, keeping it
    after = _tree(tiny_checkpoint)
    assert {k: after[k] for k in before} == before and set(after) - set(before) == {
        "exit_config.json", "exit_params.safetensors"}
    dx.load_pretrained(tiny_checkpoint)
    assert sorted(dx.load_exits(tiny_checkpoint)[1]) == sorted(exit_params)


def test_save_pretrained_keeps_other_files(tiny_checkpoint, tmp_path):
    config, params = dx.load_pretrained(tiny_checkpoint)
    out = tmp_path / "work"
    (out / "sub").mkdir(parents=True)
    (out / "notes.txt").write_text("mine")
    (out / "sub" / "data.csv").write_text("a,b\n")
    with pytest.raises(FileExistsError, match=r"notes\.txt, sub"):
        dx.save_pretrained(config, params, out)
    assert _tree(out) == {"notes.txt": b"mine", "sub/data.csv": b"a,b\n"}
    dx.save_pretrained(config, params, out, overwrite=True)
    assert set(_tree(out)) == {"notes.txt", "sub/data.csv", "config.json", "model.safetensors"}
    dx.save_pretrained(config, params, tiny_checkpoint)  # only its own files there: replaced, no flag needed
    assert sorted(p.name for p in tiny_checkpoint.iterdir()) == ["config.json", "model.safetensors"]
    with pytest.raises(FileExistsError, match="is not a directory"):
        dx.save_pretrained(config, params, out / "notes.txt", overwrite=True)


def test_overwrite_replaces_only_the_writers_own_files(tmp_path):
    from dynamax_jax import io

    out = tmp_path / "out"
    out.mkdir()
    for name in ("notes.txt", "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
                 "model.safetensors.index.json", "config.json"):
        (out / name).write_text("old " + name)
    owned = ("config.json", "model.safetensors", "model.safetensors.index.json", "model-*-of-*.safetensors")
    with pytest.raises(RuntimeError):  # a failed write changes nothing
        with io.atomic_directory(out, owned=owned, overwrite=True) as tmp:
            (tmp / "config.json").write_text("new")
            raise RuntimeError
    assert len(list(out.iterdir())) == 5 and (out / "config.json").read_text() == "old config.json"
    with io.atomic_directory(out, owned=owned, overwrite=True) as tmp:
        (tmp / "config.json").write_text("new")
        (tmp / "model.safetensors").write_text("new")
    # the stale shards of the previous checkpoint went with it; the notes stayed
    assert _tree(out) == {"config.json": b"new", "model.safetensors": b"new", "notes.txt": b"old notes.txt"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_convert_overwrite_keeps_foreign_files(tiny_checkpoint, tmp_path, capsys):
    from dynamax_jax.convert.__main__ import main as convert_main

    dst = tmp_path / "converted"
    dst.mkdir()
    (dst / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="already exists; pass --overwrite"):
        convert_main([str(tiny_checkpoint), str(dst), "--quiet"])
    assert convert_main([str(tiny_checkpoint), str(dst), "--quiet", "--overwrite"]) == 0
    assert set(_tree(dst)) == {"notes.txt", "config.json", "model.safetensors"}


def test_calibrate_refuses_foreign_files_before_any_work(exits_dir, capsys):
    from dynamax_jax.eval.calibrate import main as calibrate_main

    (exits_dir / "model.safetensors").write_text("not exits")
    # --model does not exist: the refusal comes before loading anything
    assert calibrate_main(["--exits", str(exits_dir), "--model", "/nonexistent", "--tasks", "trivia_qa"]) == 2
    assert "holds files this writer did not make (model.safetensors)" in capsys.readouterr().err


def _dead_pid() -> int:
    import subprocess

    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_stale_temporaries_of_a_killed_write_are_removed(tmp_path, exits_dir):
    import socket
    import subprocess

    # a write killed mid-way (os._exit skips every cleanup, as SIGKILL would)
    code = ("import os, sys; from dynamax_jax import io\n"
            "with io.atomic_directory(sys.argv[1], owned=('*',)) as tmp:\n"
            "    (tmp / 'big.bin').write_bytes(b'x' * 1000)\n"
            "    os._exit(9)\n")
    area = tmp_path / "area"
    area.mkdir()
    out = area / "exits"
    assert subprocess.run([sys.executable, "-c", code, str(out)], cwd=Path(__file__).parents[1]).returncode == 9
    [left] = [p.name for p in area.iterdir() if p.name.startswith(".exits.tmp-")]
    host, dead = socket.gethostname(), _dead_pid()
    keep = [f".exits.tmp-{os.getpid()}@{host}-live0000",  # a write in progress (this process)
            f".exits.tmp-{dead}@another-host-x1234567",  # another host's (shared file system)
            ".exits.tmp-abcdefgh",  # no writer named: cannot be proven ours
            f".other.tmp-{dead}@{host}-x1234567"]  # another destination's
    stale = [f".exits.old-{dead}@{host}-y1234567", f".exits.json.tmp-{dead}@{host}-z1234567.json"]
    for name in keep + stale:
        (area / name).mkdir()
        (area / name / "f").write_text("x")
    exit_config, exit_params = dx.load_exits(exits_dir)
    dx.save_exits(exit_config, exit_params, out)
    names = {p.name for p in area.iterdir()}
    assert left not in names and not names & set(stale[:1]) and set(keep) <= names
    from dynamax_jax import io

    io.write_text_atomic(area / "exits.json", "{}")  # a file's temporaries, likewise
    assert stale[1] not in {p.name for p in area.iterdir()}


# ----------------------------------------------------------------------------- distillation runs


def test_distill_checkpoint_faults(tmp_path, capsys):
    """A corrupt latest checkpoint falls back to the one before; a finished run's rerun keeps
    its summary; lower --steps cannot relabel heads; a moved run directory resumes."""
    import shutil

    from tests.test_distill import write_tiny_model
    from dynamax_jax.train import distill as T

    model = write_tiny_model(tmp_path / "tiny")
    out = tmp_path / "run"

    def distill(*extra, out=out):
        return T.main(["--model", str(model), "--out", str(out), "--exit-kind", "calm", "--exit-layers", "2,3",
                       "--batch-size", "2", "--seq-len", "16", "--save-every", "2", "--log-every", "1",
                       "--no-progress", *extra])

    def files(directory):
        return {name: (directory / name).read_bytes() for name in ("summary.json", "exits/exit_params.safetensors",
                                                                   "exits/exit_config.json")}

    assert distill("--steps", "6") == 0
    first = files(out)
    summary = json.loads(first["summary.json"])
    assert summary["steps"] == 6 and summary["final"]["loss"] > 0
    capsys.readouterr()

    assert distill("--steps", "6") == 0  # a finished run: nothing rewritten
    assert files(out) == first and "finished run of 6 steps; nothing to do" in capsys.readouterr().err

    with pytest.raises(SystemExit) as exit_info:  # lower --steps: the step-6 heads stay step-6 heads
        distill("--steps", "2")
    assert exit_info.value.code == 2 and "already trained to step 6, past --steps 2" in capsys.readouterr().err
    assert files(out) == first

    moved = tmp_path / "moved"
    shutil.move(out, moved)
    assert distill("--steps", "6", out=moved) == 0  # the path is no setting
    assert files(moved) == first

    (moved / "summary.json").unlink()
    shutil.rmtree(moved / "exits")
    (moved / "checkpoints" / "6" / "data" / "metadata").write_text('{"parent_window_st')  # corrupt step 6
    capsys.readouterr()
    assert distill("--steps", "6", out=moved) == 0
    err = capsys.readouterr().err
    assert "checkpoint of step 6 in" in err and "cannot be read (JSONDecodeError" in err
    assert "falling back to step 4" in err
    again = files(moved)
    assert json.loads(again["summary.json"])["resumed_from"] == 4
    # steps 5 and 6 were trained again from the step-4 state: the same heads as the first run
    assert again["exits/exit_params.safetensors"] == first["exits/exit_params.safetensors"]
    assert json.loads(again["summary.json"])["final"] == summary["final"] | {
        "tokens_per_s": json.loads(again["summary.json"])["final"]["tokens_per_s"]}


# ----------------------------------------------------------------------------- evaluation sweeps


def _fake_run(out: Path, name: str, task="trivia_qa", data="bundled:evaluation", limit=2, model="m",
              inputs=None, **spec) -> None:
    out.mkdir(parents=True, exist_ok=True)
    spec = {"task": task, "variant": "full", "model": model, "data": data, "limit": limit, "max_new_tokens": 4,
            "dtype": "float32", "chat_template": True, "exits": None, **spec}
    (out / f"{name}.json").write_text(json.dumps({"spec": spec, "metrics": {}, **({"inputs": inputs} if inputs else {})}))


def test_eval_out_dir_refuses_runs_it_could_not_tell_apart(tmp_path):
    from dynamax_jax.eval import run, tasks

    out = tmp_path / "out"
    data = {"trivia_qa": run.data_inputs(tasks.get_task("trivia_qa"), None, "evaluation", 2)}
    assert data["trivia_qa"]["sha256"] == run.fingerprint(data["trivia_qa"]["file"])
    settings = {"max_new_tokens": 4, "dtype": "float32"}

    def check(model=("m", "w1"), exits=None):
        run.check_out_dir(out, data, settings, model, exits or {})

    check()  # no --out yet
    _fake_run(out, "same", inputs={"data": data["trivia_qa"], "model": {"path": "m", "fingerprint": "w1"}})
    _fake_run(out, "other-model", model="m2")  # another backbone of the sweep
    _fake_run(out, "other-task", task="coqa", data="elsewhere:all")  # a task this sweep does not run
    check()
    for name, kw, message in [
        ("part", {"data": "bundled:calibration"}, "trivia_qa runs with data 'bundled:calibration' "
                                                  "(here 'bundled:evaluation')"),
        ("dir", {"data": "mine:all"}, "data 'mine:all'"),
        ("limit", {"limit": 50}, "limit 50 (here 2)"),
        ("tokens", {"max_new_tokens": 32}, "max_new_tokens 32 (here 4)"),
        ("content", {"inputs": {"data": {**data["trivia_qa"], "sha256": "0" * 64}}}, "another content of"),
    ]:
        _fake_run(out, name, **kw)
        with pytest.raises(ValueError, match=re.escape(message)):
            check()
        (out / f"{name}.json").unlink()
    with pytest.raises(ValueError, match="the model at m has changed"):
        check(model=("m", "w2"))
    _fake_run(out, "exits", exits="heads", inputs={"exits": {"path": "heads", "fingerprint": "e1"}})
    check(exits={"heads": "e1"})
    with pytest.raises(ValueError, match="the exit heads at heads have changed"):
        check(exits={"heads": "e2"})


def test_eval_run_refuses_to_mix_before_loading_the_model(tiny_checkpoint, tmp_path):
    from dynamax_jax.eval import run

    out = tmp_path / "out"
    _fake_run(out, "old", data="bundled:calibration", model=str(tiny_checkpoint))
    with pytest.raises(ValueError, match="trivia_qa runs with data 'bundled:calibration'"):
        run.main(["--model", str(tiny_checkpoint), "--tasks", "trivia_qa", "--limit", "2", "--out", str(out)])


def test_eval_runs_record_what_they_were_computed_on(tmp_path, exits_dir):
    import types

    from dynamax_jax.eval import run, tasks

    backbone = types.SimpleNamespace(config=dx.MistralConfig.tiny(), path="m", chat_template=True)
    args = types.SimpleNamespace(out=str(tmp_path), data_dir=None, split="evaluation", limit=2,
                                 max_new_tokens=4, dtype="float32")
    inputs = {"data": {"trivia_qa": run.data_inputs(tasks.get_task("trivia_qa"), None, "evaluation", 2)},
              "model": {"path": "m", "fingerprint": "w"}, "exits": {str(exits_dir): run.fingerprint(exits_dir)}}
    sweep = run.Sweep(args, backbone, log=lambda *a: None, inputs=inputs)
    spec = sweep.spec("trivia_qa", "exit", exits=str(exits_dir), kind="calm", mode="copy", threshold=0.5,
                      exit_layers=(2, 3))
    recorded = sweep.record(spec, {"avg_layers": 3.0, "compute": 0.9}, {}, {"f1": 0.5}, [])["inputs"]
    assert recorded["data"]["file"].endswith(".jsonl") and len(recorded["data"]["sha256"]) == 64
    assert recorded["model"] == {"path": "m", "fingerprint": "w"}
    assert recorded["exits"] == {"path": str(exits_dir), "fingerprint": run.fingerprint(exits_dir)}
    fingerprint = run.fingerprint(exits_dir)
    (exits_dir / "exit_config.json").write_text((exits_dir / "exit_config.json").read_text() + " ")
    assert run.fingerprint(exits_dir) != fingerprint


# ----------------------------------------------------------------------------- command-line errors


def test_cli_errors_print_one_line_and_exit_2(tmp_path, capsys, monkeypatch):
    from dynamax_jax.convert.__main__ import main as convert_main
    from dynamax_jax.cli import run_cli
    from dynamax_jax.eval.run import main as eval_main

    monkeypatch.delenv("DYNAMAX_DEBUG", raising=False)
    missing = str(tmp_path / "missing")
    assert run_cli(convert_main, [missing, str(tmp_path / "dst")], prog="python -m convert") == 2
    err = capsys.readouterr().err
    assert err.startswith(f"python -m convert: error: checkpoint {missing} does not exist\n")
    assert "Traceback" not in err and "--debug" in err
    assert run_cli(eval_main, ["--model", missing, "--out", str(tmp_path / "o")], prog="python -m eval.run") == 2
    assert capsys.readouterr().err.startswith(f"python -m eval.run: error: --model {missing} does not exist\n")
    with pytest.raises(FileNotFoundError):  # the traceback on demand
        run_cli(convert_main, [missing, str(tmp_path / "dst"), "--debug"])
    monkeypatch.setenv("DYNAMAX_DEBUG", "1")
    with pytest.raises(FileNotFoundError):
        run_cli(convert_main, [missing, str(tmp_path / "dst")])
    monkeypatch.delenv("DYNAMAX_DEBUG")
    with pytest.raises(ZeroDivisionError):  # a bug keeps its traceback
        run_cli(lambda argv: 1 / 0, [])


def test_cli_entry_points_use_the_guard(tmp_path):
    import subprocess

    for module in ("convert", "eval.run"):
        args = [str(tmp_path / "missing"), str(tmp_path / "dst")] if module == "convert" else [
            "--model", str(tmp_path / "missing")]
        proc = subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True,
                              cwd=Path(__file__).parents[1], env={**os.environ, "JAX_PLATFORMS": "cpu"})
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
        assert f"python -m {module}: error: " in proc.stderr and "missing" in proc.stderr


def test_data_errors_name_the_file_and_the_1_based_line(tmp_path):
    from dynamax_jax.io import DataError
    from dynamax_jax.eval import tasks

    good = json.dumps({"question": "Q?", "answer": {"value": "A", "aliases": ["A"]}})
    (tmp_path / "trivia_qa.jsonl").write_text(f"{good}\n{good}\n\n" + json.dumps({"question": "Q?"}) + "\n")
    with pytest.raises(DataError, match=r"trivia_qa\.jsonl, line 4: .*answer"):
        tasks.get_task("trivia_qa").load(str(tmp_path))
    (tmp_path / "trivia_qa.jsonl").write_bytes(good.encode() + b"\n" + good.encode().replace(b"Q?", b"Q\xff?") + b"\n")
    with pytest.raises(DataError, match=r"trivia_qa\.jsonl, line 2: not valid UTF-8 \(byte b'\\xff'"):
        tasks.get_task("trivia_qa").load(str(tmp_path))


def test_calibrate_names_its_own_data_flag(tmp_path, capsys):
    from dynamax_jax.eval.calibrate import main as calibrate_main

    assert calibrate_main(["--exits", str(tmp_path), "--data", str(tmp_path), "--tasks", "trivia_qa"]) == 2
    err = capsys.readouterr().err
    assert "data file not found" in err and "--data-dir" not in err


def test_undecodable_prompt_bytes_are_named():
    from dynamax_jax.cli import utf8_text

    prompt = b"caf\xe9 au lait".decode("utf-8", "surrogateescape")  # how Python passes such argv bytes
    with pytest.raises(ValueError, match=r"--prompt is not valid UTF-8: byte\(s\) b'\\xe9' at character 3"):
        utf8_text(prompt, "--prompt")
    assert utf8_text("café", "--prompt") == "café"


def test_distill_errors_exit_2_and_debug_shows_the_traceback(tmp_path, capsys):
    from dynamax_jax.train import distill as T

    argv = ["--model", str(tmp_path / "missing"), "--out", str(tmp_path / "run")]
    with pytest.raises(SystemExit) as exit_info:
        T.main(argv)
    assert exit_info.value.code == 2 and "does not exist" in capsys.readouterr().err
    with pytest.raises(T.DistillError, match="does not exist"):
        T.main([*argv, "--debug"])

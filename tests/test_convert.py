"""Hugging Face safetensors conversion: round trip, shards, dtypes, the CLI and every
bad-input error."""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from safetensors import safe_open

import dynamax_jax as dx
from dynamax_jax.convert import checkpoint, safetensors_io
from dynamax_jax.convert.__main__ import main as convert_main
from dynamax_jax.convert.errors import (CheckpointError, ConfigError, CorruptFileError, MissingTensorError,
                                        ShapeMismatchError, UnsupportedModelError)
from tests.conftest import build_hf_model, file_tree, hf_logits, random_tokens


REPO = Path(__file__).resolve().parents[1]


def _assert_same_params(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        assert x.dtype == y.dtype and x.shape == y.shape
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if ".tmp-" in p.name or ".old-" in p.name)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """One tiny Mistral checkpoint shared by the tests that only read it (copy before editing)."""
    model = build_hf_model("mistral", sliding_window=8)
    path = tmp_path_factory.mktemp("ckpt") / "mistral"
    model.save_pretrained(path)
    return model, path


def _copy(path: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "copy"
    shutil.copytree(path, dst)
    return dst


def test_round_trip_through_transformers(model_dir, tmp_path):
    import transformers

    hf_model, path = model_dir
    config, params = dx.load_pretrained(path)
    out = tmp_path / "saved"
    dx.save_pretrained(config, params, out)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    assert _leftovers(tmp_path) == []
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
    assert type(reloaded).__name__ == "MistralForCausalLM"
    tokens = random_tokens(config.vocab_size, 2, 12)
    np.testing.assert_array_equal(hf_logits(reloaded, tokens), hf_logits(hf_model, tokens))
    config2, params2 = dx.load_pretrained(out)
    assert config2 == config
    _assert_same_params(params, params2)
    # saving again over an existing directory replaces it atomically
    dx.save_pretrained(config, params, out)
    assert _leftovers(tmp_path) == []


def test_tied_llama_round_trip(save_hf_model, tmp_path):
    import transformers

    hf_model, path = save_hf_model("llama", tie_word_embeddings=True)
    config, params = dx.load_pretrained(path)
    assert "lm_head" not in params
    dx.save_pretrained(config, params, tmp_path / "saved")
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "saved", attn_implementation="eager").eval()
    assert reloaded.config.tie_word_embeddings
    tokens = random_tokens(config.vocab_size, 1, 10)
    np.testing.assert_array_equal(hf_logits(reloaded, tokens), hf_logits(hf_model, tokens))


def test_sharded_checkpoints_load(model_dir, tmp_path):
    import transformers

    hf_model, path = model_dir
    single_config, single = dx.load_pretrained(path)
    # transformers' own sharding
    hf_sharded = tmp_path / "hf_sharded"
    hf_model.save_pretrained(hf_sharded, max_shard_size="40KB")
    shards = sorted(p.name for p in hf_sharded.glob("*.safetensors"))
    assert len(shards) >= 3 and (hf_sharded / safetensors_io.INDEX_FILE).exists()
    config, params = dx.load_pretrained(hf_sharded)
    assert config == single_config
    _assert_same_params(params, single)
    # our sharded writer, read back by transformers and by us
    ours = tmp_path / "ours_sharded"
    checkpoint.save_hf(config, params, ours, max_shard_bytes=40_000)
    assert len(list(ours.glob("model-*-of-*.safetensors"))) >= 3
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(ours, attn_implementation="eager").eval()
    tokens = random_tokens(config.vocab_size, 1, 9)
    np.testing.assert_array_equal(hf_logits(reloaded, tokens), hf_logits(hf_model, tokens))
    _assert_same_params(dx.load_pretrained(ours)[1], single)


def test_bfloat16_checkpoint_and_dtypes(model_dir, tmp_path):
    import torch

    hf_model, path = model_dir
    bf16_dir = tmp_path / "bf16"
    build_hf_model("mistral", sliding_window=8).to(torch.bfloat16).save_pretrained(bf16_dir)
    with safetensors_io.CheckpointReader(bf16_dir) as reader:
        assert reader.info("model.norm.weight").dtype == np.dtype(ml_dtypes.bfloat16)
    torch_weights = {k: v.float().numpy() for k, v in
                     build_hf_model("mistral", sliding_window=8).to(torch.bfloat16).state_dict().items()}
    config, params32 = dx.load_pretrained(bf16_dir, dtype=jnp.float32)
    # bfloat16 -> float32 is exact, so the loaded values are torch's bit for bit
    np.testing.assert_array_equal(np.asarray(params32["layers"]["wq"][1]),
                                  torch_weights["model.layers.1.self_attn.q_proj.weight"].T.reshape(64, 4, 16))
    _, params_bf16 = dx.load_pretrained(bf16_dir, dtype=jnp.bfloat16)
    assert {leaf.dtype for leaf in jax.tree.leaves(params_bf16)} == {jnp.dtype(jnp.bfloat16)}
    _assert_same_params(jax.tree.map(lambda p: p.astype(jnp.float32), params_bf16), params32)
    # float32 checkpoint -> bfloat16 file via the CLI; transformers reads the BF16 tensors
    out = tmp_path / "cli_bf16"
    assert convert_main([str(path), str(out), "--dtype", "bfloat16", "--quiet"]) == 0
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    with safetensors_io.CheckpointReader(out) as reader:
        assert {reader.info(n).dtype for n in reader.names()} == {np.dtype(ml_dtypes.bfloat16)}


def _tiny_tokenizer(directory: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i + 3 for i in range(125)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                            eos_token="</s>").save_pretrained(directory)


def test_cli_converts_and_copies_tokenizer(model_dir, tmp_path, capsys):
    _, path = model_dir
    src = _copy(path, tmp_path)
    _tiny_tokenizer(src)
    dst = tmp_path / "converted"
    assert convert_main([str(src), str(dst), "--quiet"]) == 0
    assert "tokenizer files: " in capsys.readouterr().out
    names = {p.name for p in dst.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
            "generation_config.json"} <= names
    assert dx.load_tokenizer(dst)("w5 w7").input_ids == dx.load_tokenizer(src)("w5 w7").input_ids
    _assert_same_params(dx.load_pretrained(dst)[1], dx.load_pretrained(src)[1])
    with pytest.raises(FileExistsError, match="already exists"):
        convert_main([str(src), str(dst), "--quiet"])
    assert convert_main([str(src), str(dst), "--quiet", "--overwrite", "--no-tokenizer"]) == 0
    assert not (dst / "tokenizer.json").exists()
    assert _leftovers(tmp_path) == []


def test_cli_help_explains_each_flag(capsys):
    with pytest.raises(SystemExit) as exc:
        convert_main(["--help"])
    assert exc.value.code == 0
    text = capsys.readouterr().out
    for flag in ("SRC", "DST", "--dtype", "float32", "bfloat16", "float16", "--max-shard-gb", "--overwrite",
                 "--no-tokenizer", "--quiet", ".gguf", "consolidated.safetensors"):
        assert flag in text


# ---- bad inputs ---------------------------------------------------------------------------

def _rewrite_tensors(path: Path, edit) -> None:
    """Rewrite ``path/model.safetensors`` after ``edit(dict of numpy arrays)``."""
    file = path / "model.safetensors"
    with safetensors_io.CheckpointReader(path) as reader:
        tensors = {name: reader.read(name) for name in reader.names()}
    edit(tensors)
    safetensors_io.save_file(tensors, file, {"format": "pt"})


def test_missing_tensor_is_named(model_dir, tmp_path):
    src = _copy(model_dir[1], tmp_path)
    _rewrite_tensors(src, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(MissingTensorError, match=r"'model\.layers\.1\.mlp\.up_proj\.weight'"):
        dx.load_pretrained(src)


def test_wrong_shape_names_tensor_expected_and_found(model_dir, tmp_path):
    src = _copy(model_dir[1], tmp_path)

    def edit(tensors):
        tensors["model.layers.0.self_attn.k_proj.weight"] = np.zeros((16, 64), np.float32)

    _rewrite_tensors(src, edit)
    with pytest.raises(ShapeMismatchError) as exc:
        dx.load_pretrained(src)
    message = str(exc.value)
    assert "'model.layers.0.self_attn.k_proj.weight'" in message
    assert "expected (32, 64)" in message and "found (16, 64)" in message


def test_unknown_model_type_lists_supported(model_dir, tmp_path):
    src = _copy(model_dir[1], tmp_path)
    config = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**config, "model_type": "gpt2"}))
    with pytest.raises(UnsupportedModelError, match="'gpt2'.*supported: llama, mamba2, mistral"):
        dx.load_pretrained(src)


def test_missing_config_field_is_named(model_dir, tmp_path):
    src = _copy(model_dir[1], tmp_path)
    config = json.loads((src / "config.json").read_text())
    del config["intermediate_size"]
    (src / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match="'intermediate_size'"):
        dx.load_pretrained(src)


def test_truncated_safetensors(model_dir, tmp_path):
    src = _copy(model_dir[1], tmp_path)
    file = src / "model.safetensors"
    os.truncate(file, file.stat().st_size - 100)
    with pytest.raises(CorruptFileError, match=r"model\.safetensors: truncated"):
        dx.load_pretrained(src)
    os.truncate(file, 5)  # not even the header length
    with pytest.raises(CorruptFileError, match="truncated"):
        dx.load_pretrained(src)


def test_corrupt_header(model_dir, tmp_path):
    src = _copy(model_dir[1], tmp_path)
    file = src / "model.safetensors"
    data = bytearray(file.read_bytes())
    data[8:20] = b"#not json!#!"
    file.write_bytes(bytes(data))
    with pytest.raises(CorruptFileError, match=r"model\.safetensors: corrupt safetensors header"):
        dx.load_pretrained(src)
    data[:8] = struct.pack("<Q", 2**62)  # absurd header length
    file.write_bytes(bytes(data))
    with pytest.raises(CorruptFileError, match="corrupt safetensors header"):
        dx.load_pretrained(src)


def test_missing_shard_is_named(model_dir, tmp_path):
    dst = tmp_path / "sharded"
    model_dir[0].save_pretrained(dst, max_shard_size="40KB")
    victim = sorted(dst.glob("model-*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(CheckpointError, match=f"{victim.name}: shard file is missing"):
        dx.load_pretrained(dst)


def test_failed_convert_writes_nothing(model_dir, tmp_path):
    src = _copy(model_dir[1], tmp_path)
    os.truncate(src / "model.safetensors", (src / "model.safetensors").stat().st_size - 8)
    dst = tmp_path / "out"
    with pytest.raises(CorruptFileError):
        convert_main([str(src), str(dst), "--quiet"])
    assert not dst.exists() and _leftovers(tmp_path) == []

    # a failure while writing (params missing a tensor) leaves no output either
    config, params = dx.load_pretrained(model_dir[1])
    broken = {**params, "layers": {k: v for k, v in params["layers"].items() if k != "w_down"}}
    with pytest.raises(MissingTensorError, match="'layers/w_down'"):
        dx.save_pretrained(config, broken, dst)
    wrong = {**params, "final_norm": params["final_norm"][:10]}
    with pytest.raises(ShapeMismatchError, match=r"'final_norm'.*expected \(64,\), found \(10,\)"):
        dx.save_pretrained(config, wrong, dst)
    assert not dst.exists() and _leftovers(tmp_path) == []


def test_unsupported_paths(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        dx.load_pretrained(tmp_path / "nowhere")
    with pytest.raises(CheckpointError, match="no config.json"):
        dx.load_pretrained(tmp_path)
    (tmp_path / "weights.bin").write_bytes(b"\0" * 16)
    with pytest.raises(UnsupportedModelError, match=r"\.gguf"):
        dx.load_pretrained(tmp_path / "weights.bin")


@pytest.mark.slow
def test_convert_peak_memory_below_1_5x_params():
    """A >= 1 GB sharded checkpoint converts with peak RSS below 1.5x the param bytes."""
    result = subprocess.run([sys.executable, str(REPO / "benchmarks" / "convert_memory.py")],
                            capture_output=True, text=True, cwd=REPO, timeout=1800)
    assert result.returncode == 0, result.stderr[-3000:]
    line = [l for l in result.stdout.splitlines() if l.startswith("ratio")][-1]
    assert float(line.split()[1]) < 1.5, result.stdout


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


def test_save_pretrained_keeps_other_files(tiny_checkpoint, tmp_path):
    config, params = dx.load_pretrained(tiny_checkpoint)
    out = tmp_path / "work"
    (out / "sub").mkdir(parents=True)
    (out / "notes.txt").write_text("mine")
    (out / "sub" / "data.csv").write_text("a,b\n")
    with pytest.raises(FileExistsError, match=r"notes\.txt, sub"):
        dx.save_pretrained(config, params, out)
    assert file_tree(out) == {"notes.txt": b"mine", "sub/data.csv": b"a,b\n"}
    dx.save_pretrained(config, params, out, overwrite=True)
    assert set(file_tree(out)) == {"notes.txt", "sub/data.csv", "config.json", "model.safetensors"}
    dx.save_pretrained(config, params, tiny_checkpoint)  # only its own files there: replaced, no flag needed
    assert sorted(p.name for p in tiny_checkpoint.iterdir()) == ["config.json", "model.safetensors"]
    with pytest.raises(FileExistsError, match="is not a directory"):
        dx.save_pretrained(config, params, out / "notes.txt", overwrite=True)


def test_convert_overwrite_keeps_foreign_files(tiny_checkpoint, tmp_path, capsys):
    from dynamax_jax.convert.__main__ import main as convert_main

    dst = tmp_path / "converted"
    dst.mkdir()
    (dst / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="already exists; pass --overwrite"):
        convert_main([str(tiny_checkpoint), str(dst), "--quiet"])
    assert convert_main([str(tiny_checkpoint), str(dst), "--quiet", "--overwrite"]) == 0
    assert set(file_tree(dst)) == {"notes.txt", "config.json", "model.safetensors"}

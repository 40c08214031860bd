"""``load_pretrained(..., mesh=...)`` creates every param already sharded by the one sharding
table, with values equal to the unsharded load: tiny Mistral and Llama checkpoints written by
transformers (the Llama tied, with 3 KV heads that no model axis here divides), a tiny Mamba2
in both Hugging Face and Codestral release layouts, and a tiny GGUF with quantized tensors,
each on meshes 1x8, 2x4 and 8x1 of simulated CPU devices. A two-process run checks that each
process builds only its own devices' shards, with the same values.

The loads run in subprocesses: this pytest process may already have started jax with one
device."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import dynamax_jax as dx
from dynamax_jax import sharding as S
from dynamax_jax.convert.safetensors_io import CheckpointReader, save_file
from tests.conftest import TINY_HF, build_hf_model

ROOT = Path(__file__).resolve().parents[1]

# argv: [path, dtype] pairs. For each checkpoint: the unsharded load, then one per mesh; every
# param must carry the table's sharding and equal the unsharded value exactly, and the model
# axis must really split something (the test would pass vacuously if all were replicated).
CHECK = textwrap.dedent("""
    import sys
    import jax, jax.numpy as jnp, numpy as np
    import dynamax_jax as dx
    from dynamax_jax import sharding as S

    assert len(jax.devices()) == 8
    args = sys.argv[1:]
    for path, dtype in zip(args[::2], args[1::2]):
        dtype = getattr(jnp, dtype)
        config, reference = dx.load_pretrained(path, dtype=dtype)
        for spec in ("1x8", "2x4", "8x1"):
            mesh = S.make_mesh(spec)
            sharded_config, params = dx.load_pretrained(path, dtype=dtype, mesh=mesh)
            assert sharded_config == config
            want = S.shardings_for(mesh, S.param_specs(config), params)
            assert jax.tree.structure(params) == jax.tree.structure(reference)
            flat = jax.tree_util.tree_flatten_with_path(params)[0]
            for (key, got), ref, sharding in zip(flat, jax.tree.leaves(reference), jax.tree.leaves(want)):
                name = jax.tree_util.keystr(key)
                assert got.sharding == sharding, (path, spec, name, got.sharding, sharding)
                assert got.dtype == ref.dtype == dtype, (path, name, got.dtype)
                assert np.array_equal(np.asarray(got), np.asarray(ref)), (path, spec, name)
            split = sum(not a.sharding.is_fully_replicated for a in jax.tree.leaves(params))
            assert split > 0 or spec == "8x1", (path, spec)
            print(path, spec, "ok", split)
""")


def run_check(*pairs: tuple[Path, str]) -> str:
    env = {**S.xla_cpu_devices_flag(8), "JAX_PLATFORMS": "cpu"}
    argv = [str(x) for pair in pairs for x in pair]
    proc = subprocess.run([sys.executable, "-c", CHECK, *argv], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-5000:]
    return proc.stdout


def _codestral_copy(hf_dir: Path, path: Path) -> Path:
    """The Mamba2 checkpoint in ``hf_dir`` rewritten in the Codestral release layout."""
    config = dx.load_pretrained(hf_dir)[0]
    path.mkdir()
    with CheckpointReader(hf_dir) as reader:
        tensors = {"model." + name.replace("backbone.embeddings.", "backbone.embedding."): reader.read(name)
                   for name in reader.names()}
    save_file(tensors, path / "consolidated.safetensors")
    (path / "params.json").write_text(json.dumps(dict(
        dim=config.hidden_size, n_layers=config.num_layers, vocab_size=config.vocab_size,
        n_groups=config.n_groups, d_state=config.state_size, expand=config.expand,
        headdim=config.head_dim, d_conv=config.conv_kernel, rms_norm=True,
        tie_embeddings=config.tie_word_embeddings, model_type="mamba")))
    return path


@pytest.mark.slow
def test_transformer_checkpoints_load_sharded(tmp_path):
    mistral = tmp_path / "mistral"
    build_hf_model("mistral", seed=0).save_pretrained(mistral)
    llama = tmp_path / "llama-tied"  # 3 KV heads: replicated on every model axis here but 1
    build_hf_model("llama", seed=1, tie_word_embeddings=True, hidden_size=96, num_attention_heads=6,
                   num_key_value_heads=3).save_pretrained(llama)
    assert dx.load_pretrained(llama)[0].tie_word_embeddings
    out = run_check((mistral, "float32"), (mistral, "bfloat16"), (llama, "float32"))
    assert out.count(" ok ") == 9, out


@pytest.mark.slow
def test_mamba2_checkpoints_load_sharded(tmp_path):
    import jax

    hf_dir, plain = tmp_path / "mamba2", tmp_path / "mamba2-plain"
    for path, bias in ((hf_dir, True), (plain, False)):  # the release layout has no projection biases
        config = dx.Mamba2Config.tiny(num_layers=2, n_groups=2, use_bias=bias)
        dx.save_pretrained(config, dx.init_params(config, jax.random.key(0)), path)
    codestral = _codestral_copy(plain, tmp_path / "codestral")
    out = run_check((hf_dir, "float32"), (codestral, "bfloat16"))
    assert out.count(" ok ") == 6, out


@pytest.mark.slow
def test_quantized_gguf_loads_sharded(tmp_path):
    from tests.test_gguf import gguf_tensors_from_hf, write_gguf

    state = {k: v.detach().numpy().copy() for k, v in
             build_hf_model("llama", seed=0, tie_word_embeddings=False).state_dict().items()}
    path = tmp_path / "tiny.gguf"
    write_gguf(path, gguf_tensors_from_hf(state, TINY_HF["num_hidden_layers"]))  # Q8_0, Q4_1, F16, BF16, F32
    out = run_check((path, "float32"))
    assert out.count(" ok ") == 3, out


# Each of two processes (4 devices each, one 1x8 mesh over the 8) loads with the mesh and
# compares the shards it holds with the same blocks of its own unsharded load.
PROCESS = textwrap.dedent("""
    import sys
    import jax
    path, address, pid = sys.argv[1], sys.argv[2], int(sys.argv[3])
    jax.distributed.initialize(coordinator_address=address, num_processes=2, process_id=pid,
                               initialization_timeout=300)
    import numpy as np
    import dynamax_jax as dx
    from dynamax_jax import sharding as S

    assert jax.process_count() == 2 and len(jax.local_devices()) == 4 and len(jax.devices()) == 8
    config, reference = dx.load_pretrained(path)
    mesh = S.make_mesh("1x8")
    _, params = dx.load_pretrained(path, mesh=mesh)
    want = S.shardings_for(mesh, S.param_specs(config), params)
    shards = 0
    for got, ref, sharding in zip(jax.tree.leaves(params), jax.tree.leaves(reference), jax.tree.leaves(want)):
        assert got.sharding == sharding
        assert len(got.addressable_shards) == 4
        for shard in got.addressable_shards:
            assert shard.device.process_index == pid
            assert np.array_equal(np.asarray(shard.data), np.asarray(ref)[shard.index])
            shards += 1
    print("process", pid, "shards", shards)
""")


@pytest.mark.slow
def test_each_process_builds_only_its_own_shards(tmp_path):
    path = tmp_path / "mistral"
    build_hf_model("mistral", seed=0).save_pretrained(path)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{s.getsockname()[1]}"
    env = {**S.xla_cpu_devices_flag(4), "JAX_PLATFORMS": "cpu"}
    procs = [subprocess.Popen([sys.executable, "-c", PROCESS, str(path), address, str(p)], cwd=ROOT, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for p in range(2)]
    outputs = [proc.communicate(timeout=600)[0] for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0], "\n".join(o[-3000:] for o in outputs)
    for p, out in enumerate(outputs):
        assert f"process {p} shards" in out, out

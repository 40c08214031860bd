"""``python -m dynamax_jax`` (``dynamax_jax.cli.generate``) on the shipped small Mamba2 and its exit heads."""

import jax
import pytest

import dynamax_jax as dx
from dynamax_jax.assets import ASSET_DIR, asset_path
from dynamax_jax.cli import generate as G, run_cli


MODEL = str(asset_path("mamba2-small"))


def _fails_with(capsys, argv, message: str) -> None:
    """The command line exits 2 with ``message`` on one line, no traceback."""
    status = run_cli(G.main, argv, prog=G.PROG)
    err = capsys.readouterr().err
    assert status == 2 and message in err and "Traceback" not in err, err


def test_cli_streams_text_and_prints_savings(capsys):
    model, exits = MODEL, str(ASSET_DIR / "exits" / "mamba2-small-calm")
    assert G.main(["--model", model, "--exits", exits, "--threshold", "0", "--max-new-tokens", "6",
                   "--chunk", "3", "The function returns"]) == 0
    out = capsys.readouterr()
    assert out.out.strip()  # the generated text
    # threshold 0: every token leaves at the first exit (layer 2 of 8)
    assert "average layers 2.00 of 8" in out.err and "% of full depth" in out.err

    assert G.main(["--model", model, "--max-new-tokens", "4", "The function returns"]) == 0
    assert "average layers 8.00 of 8" in capsys.readouterr().err  # another model: full depth by default


def test_threshold_above_one_runs_no_classifier(capsys):
    """An exit that cannot fire costs nothing: the FLOPs equal full depth's, not more."""
    model, exits = MODEL, str(ASSET_DIR / "exits" / "mamba2-small-mamba")
    assert G.main(["--model", model, "--exits", exits, "--threshold", "2", "--max-new-tokens", "4",
                   "The function returns"]) == 0
    assert "average layers 8.00 of 8; FLOPs 100.0% of full depth" in capsys.readouterr().err


def test_bad_arguments_fail_before_loading(capsys):
    """Each bad flag is refused by the parser (exit 2) before any model is read."""
    for flags, message in [(["--chunk", "0"], "--chunk must be >= 1"),
                           (["--chunk", "-3"], "--chunk must be >= 1"),
                           (["--max-new-tokens", "0"], "--max-new-tokens must be >= 1"),
                           (["--top-p", "0"], "--top-p must be in"),
                           (["--model", "/nonexistent/model"], "does not exist")]:
        with pytest.raises(SystemExit) as exit_:
            G.main(flags + ["hello"])
        assert exit_.value.code == 2
        assert message in capsys.readouterr().err


def test_prompt_past_the_context_is_refused(tiny_llama_dir, capsys):
    """Prompt plus new tokens longer than max_position_embeddings (1024 here): one line, exit 2."""
    prompt = " ".join(["the river"] * 600)
    status = run_cli(G.main, ["--model", str(tiny_llama_dir), "--no-chat", "--max-new-tokens", "8", prompt],
                     prog=G.PROG)
    err = capsys.readouterr().err
    assert status == 2
    assert "more than the model's context of 1024" in err and "Traceback" not in err
    with pytest.raises(dx.GenerateError, match="more than the model's context of 1024"):
        config = dx.MistralConfig.tiny(max_position_embeddings=1024)
        dx.generate(config, dx.init_params(config, jax.random.key(0)), [[1] * 1020], max_new_tokens=8)


def test_the_command_line_leaves_the_generate_function_alone():
    import subprocess
    import sys

    import dynamax_jax.cli.generate  # noqa: F401
    assert callable(dx.generate) and dx.generate is dx.decoding.generate
    proc = subprocess.run([sys.executable, "-m", "dynamax_jax", "--help"], capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.startswith("usage: python -m dynamax_jax ")


def test_an_empty_prompt_is_refused(tiny_llama_dir, capsys):
    """``--no-chat ""`` encodes to no tokens: refused, not decoded from index -1."""
    _fails_with(capsys, ["--model", str(tiny_llama_dir), "--no-chat", "--max-new-tokens", "2", ""],
                "the prompt is empty: it encodes to no tokens")


def test_the_model_is_checked_before_its_tokenizer(tiny_llama_dir, tmp_path, capsys):
    """5 heads over 2 KV heads: the project's own check names it, before transformers' tokenizer
    loading reads the config."""
    import json
    import shutil

    model = tmp_path / "model"
    shutil.copytree(tiny_llama_dir, model)
    config = json.loads((model / "config.json").read_text())
    config.update(num_attention_heads=5, num_key_value_heads=2)
    (model / "config.json").write_text(json.dumps(config))
    _fails_with(capsys, ["--model", str(model), "--no-chat", "--max-new-tokens", "2", "hello"],
                "num_heads (5) must be a multiple of num_kv_heads (2)")


def test_non_finite_logits_fail_the_command(tiny_llama_dir, tmp_path, capsys):
    """A NaN in one weight: one line naming the problem and exit 2, not a one-token answer
    with exit 0."""
    import shutil

    from safetensors.numpy import load_file, save_file

    model = tmp_path / "model"
    shutil.copytree(tiny_llama_dir, model)
    weights = load_file(model / "model.safetensors")
    name = next(k for k in weights if k.endswith("layers.1.mlp.down_proj.weight"))
    weights[name][0, 0] = float("nan")
    save_file(weights, model / "model.safetensors")
    _fails_with(capsys, ["--model", str(model), "--no-chat", "--max-new-tokens", "3", "the river"],
                "were not finite (NaN or infinity)")

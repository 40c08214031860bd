"""Exit-head distillation: labels against a hand computation, one sharded step on 8
simulated devices against 1 device, SIGKILL + restart ends where an uninterrupted run
ends, and bad settings fail before any work. Tiny random models only, no network."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dynamax_jax import exits as ex
from dynamax_jax import sharding as S
from dynamax_jax.config import MistralConfig
from dynamax_jax.models import mistral
from dynamax_jax.train import distill as T
from dynamax_jax.train import objective as O

ROOT = Path(__file__).resolve().parents[1]
EOT = "<|endoftext|>"


def write_tiny_model(directory: Path, seed: int = 0) -> Path:
    """A 4-layer random Llama checkpoint (weights drawn with ``seed``) with a byte-level BPE
    tokenizer (id 0 = EOT)."""
    import dynamax_jax as dx
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=[EOT], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(["the quick brown fox jumps over the lazy dog"] * 4, trainer=trainer)
    config = MistralConfig.tiny(vocab_size=tokenizer.get_vocab_size(), model_type="llama",
                                bos_token_id=0, eos_token_id=0)
    dx.save_pretrained(config, dx.init_params(config, jax.random.key(seed)), directory, overwrite=True)
    tokenizer.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": EOT, "bos_token": EOT}))
    return directory


def hold_when_locked(process, directory: Path, timeout: float = 120.0) -> None:
    """Wait until ``process`` holds the output lock of ``directory``, then stop it (SIGSTOP),
    so that a second writer meets the lock whatever the machine's speed."""
    import signal
    import time

    lock = directory / ".dynamax.lock"
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert process.poll() is None, process.communicate()[1]
        try:
            if json.loads(lock.read_text())["pid"] == process.pid:
                process.send_signal(signal.SIGSTOP)
                return
        except (OSError, ValueError, KeyError):
            pass
        time.sleep(0.05)
    raise AssertionError(f"{process.pid} never locked {directory}")


def assert_second_writer_refused(first_argv: list[str], out: Path, second, command: str) -> None:
    """Start the command line ``first_argv`` writing into ``out``, stop it once it holds the
    lock, and check that ``second()`` is refused naming the first's PID and ``command``."""
    from dynamax_jax.io import OutputLockedError

    first = subprocess.Popen(first_argv, cwd=ROOT, env={**os.environ, "JAX_PLATFORMS": "cpu"},
                             stderr=subprocess.PIPE, text=True)
    try:
        hold_when_locked(first, out)
        with pytest.raises(OutputLockedError, match=rf"in use by PID {first.pid} on .*{command}"):
            second()
    finally:
        first.kill()
        first.communicate()


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    return write_tiny_model(tmp_path_factory.mktemp("model") / "tiny")


# ----------------------------------------------------------------------------- labels


def _rms(x, scale, eps):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * scale


@pytest.mark.parametrize("topk", [1, 3])
def test_labels_equal_a_hand_computation(topk):
    config = MistralConfig.tiny(num_layers=4)
    params = mistral.init_params(config, jax.random.key(3))
    tokens = jax.random.randint(jax.random.key(4), (2, 9), 0, config.vocab_size)
    layers = (1, 2, 3)
    exit_hidden, labels = jax.jit(lambda p, t: O.backbone_pass(config, p, t, layers, topk))(params, tokens)
    logits, hidden = jax.jit(lambda p, t: mistral.forward(config, p, t, return_hidden=True))(params, tokens)

    hidden, final = np.asarray(hidden, np.float64), np.asarray(logits, np.float64)
    norm = np.asarray(params["final_norm"], np.float64)
    w = np.asarray(params["lm_head"], np.float64)
    expected = np.zeros(labels.shape, bool)
    for e, layer in enumerate(layers):
        for b in range(tokens.shape[0]):
            for t in range(tokens.shape[1]):
                exit_token = int(np.argmax(_rms(hidden[layer - 1, b, t], norm, config.rms_norm_eps) @ w))
                final_top = np.argsort(-final[b, t])[:topk]
                expected[e, b, t] = exit_token in final_top
    np.testing.assert_array_equal(np.asarray(labels), expected)
    np.testing.assert_array_equal(np.asarray(exit_hidden), hidden[np.array(layers) - 1].astype(np.float32))
    assert 0 < expected.mean() < 1, "a degenerate example proves nothing"


def test_last_layer_always_agrees_and_topk_only_adds_positives():
    config = MistralConfig.tiny(num_layers=3)
    params = mistral.init_params(config, jax.random.key(5))
    tokens = jax.random.randint(jax.random.key(6), (2, 8), 0, config.vocab_size)
    # "exit" after the last layer predicts the final token itself: always positive
    labels_of = jax.jit(lambda layers, k: O.backbone_pass(config, params, tokens, layers, k)[1],
                        static_argnums=(0, 1))
    labels = labels_of((2, 3), 1)
    assert bool(jnp.all(labels[1]))
    l1, l5 = labels_of((1, 2), 1), labels_of((1, 2), 5)
    assert bool(jnp.all(l5 | ~l1)) and int(l5.sum()) >= int(l1.sum())


def test_balanced_loss_gives_each_class_half_the_weight():
    logits2 = jnp.array([[[[2.0, -1.0], [0.5, 0.5], [-1.0, 3.0], [0.0, 1.0]]]])  # [E=1, B=1, T=4, 2]
    labels = jnp.array([[[False, False, False, True]]])
    mask = jnp.ones((1, 4))
    ce = -jax.nn.log_softmax(logits2, axis=-1)
    neg = float(jnp.mean(ce[0, 0, :3, 0]))
    pos = float(ce[0, 0, 3, 1])
    loss, per_exit = O.exit_loss(logits2, labels, mask, jnp.ones((1,)), balanced=True)
    np.testing.assert_allclose(float(loss), 0.5 * neg + 0.5 * pos, rtol=1e-6)
    plain, _ = O.exit_loss(logits2, labels, mask, jnp.ones((1,)), balanced=False)
    np.testing.assert_allclose(float(plain), (3 * neg + pos) / 4, rtol=1e-6)
    np.testing.assert_allclose(T.exit_weight_vector("position", (18, 21, 24, 27)),
                               np.array([18, 21, 24, 27]) / 90, rtol=1e-6)


# ----------------------------------------------------------------------------- sharded step


@pytest.mark.slow
def test_one_step_on_8_devices_equals_one_device():
    """Same loss, gradients and updated params on meshes 8x1 and 4x2 as on 1x1. (Adam divides
    by |g|: a gradient entry near its eps of 1e-8 turns reduction-order noise of ~1e-9 into
    param noise of up to ~lr/100, hence one step at the default lr, not many at a large one.)"""
    code = textwrap.dedent("""
        import jax, jax.numpy as jnp, numpy as np
        from dynamax_jax import exits as ex, sharding as S
        from dynamax_jax.config import MistralConfig
        from dynamax_jax.models import mistral
        from dynamax_jax.train import distill as T

        assert len(jax.devices()) == 8
        config = MistralConfig.tiny()
        params = mistral.init_params(config, jax.random.key(0))
        tokens = jax.random.randint(jax.random.key(1), (8, 16), 0, config.vocab_size)
        mask = jnp.ones((8, 16), jnp.float32)
        maxdiff = lambda a, b: max(float(np.max(np.abs(x - y))) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
        for kind in ("mamba",):  # the stateful kind; calm/ffn are per-token maps of the same sharded inputs
            # with an affine adapter: its KL joins the loss and adapter_w is split over "model"
            settings = T.DistillSettings(exit_kind=kind, exit_layers=(2, 3), steps=10, topk=2, warmup_steps=0,
                                         adapter="affine")
            ec = ex.ExitConfig(layers=(2, 3), kind=kind, mamba_head_dim=16, adapter="affine").resolve(config)
            tx = T.make_optimizer(settings)
            init = ex.init_exits(config, ec, jax.random.key(2))
            init["adapter_w"] = 0.05 * jax.random.normal(jax.random.key(3), init["adapter_w"].shape)
            init = jax.device_get(init)  # host copy: the step donates
            results = {}
            for spec in ("1x1", "8x1", "4x2"):
                mesh = S.make_mesh(spec)
                step = T.jit_train_step(mesh, config, ec, settings, tx, params, init, tx.init(init))
                with jax.set_mesh(mesh):
                    exit_params, opt_state, metrics = step.fn(
                        jax.device_put(params, step.backbone), jax.device_put(init, step.exits),
                        jax.device_put(tx.init(init), step.opt_state), S.global_batch(mesh, tokens),
                        S.global_batch(mesh, mask))
                assert len(exit_params["norm"].sharding.device_set) == mesh.size
                grads = jax.tree.map(lambda m: m / 0.1, opt_state[1][0].mu)  # Adam's first moment, b1 = 0.9
                results[spec] = jax.device_get((metrics["loss"], exit_params, grads))
            ref_loss, ref_params, ref_grads = results["1x1"]
            assert maxdiff(ref_params, init) > 5e-4  # the step did move the params
            for spec in ("8x1", "4x2"):
                loss, p, g = results[spec]
                errs = (abs(float(loss) - float(ref_loss)), maxdiff(p, ref_params), maxdiff(g, ref_grads))
                print(kind, spec, *errs)
                assert errs[0] <= 1e-5 and errs[1] <= 1e-5 and errs[2] <= 1e-6, errs
    """)
    env = S.xla_cpu_devices_flag(8)
    env["JAX_PLATFORMS"] = "cpu"
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count("\n") == 2, proc.stdout


# ----------------------------------------------------------------------------- CLI


def cli(model: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "dynamax_jax.train.distill", "--model", str(model), "--out", str(out),
            "--exit-kind", "mamba", "--exit-layers", "2,3", "--batch-size", "2", "--seq-len", "16",
            "--lr", "3e-3", "--no-progress", *extra]


def read_exits(out: Path):
    config, params = ex.load_exits(out / "exits")
    return config, {k: np.asarray(v) for k, v in params.items()}


@pytest.mark.slow
def test_sigkill_then_restart_ends_like_an_uninterrupted_run(tiny_model, tmp_path):
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    flags = ("--steps", "60", "--save-every", "10", "--log-every", "1")
    whole = tmp_path / "whole"
    subprocess.run(cli(tiny_model, whole, *flags), cwd=ROOT, env=env, check=True, capture_output=True)

    killed = tmp_path / "killed"
    proc = subprocess.Popen(cli(tiny_model, killed, *flags), cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    metrics = killed / T.METRICS_FILE
    deadline = time.time() + 600
    step = 0
    while time.time() < deadline and proc.poll() is None:
        lines = metrics.read_text().splitlines() if metrics.exists() else []
        step = json.loads(lines[-1])["step"] if lines and lines[-1].endswith("}") else 0
        if step >= 25:
            break
        time.sleep(0.02)
    assert proc.poll() is None, "the run finished before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert 25 <= step < 60 and not (killed / "exits").exists()
    saved = sorted(int(p.name) for p in (killed / "checkpoints").iterdir() if p.name.isdigit())
    assert saved and saved[-1] < 60

    done = subprocess.run(cli(tiny_model, killed, *flags), cwd=ROOT, env=env, check=True,
                          capture_output=True, text=True)
    summary = json.loads((killed / "summary.json").read_text())
    assert summary["resumed_from"] == saved[-1] and summary["resumed_from"] >= 20, done.stdout
    (_, a), (_, b) = read_exits(whole), read_exits(killed)
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)
    steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines()]
    assert steps == list(range(1, 61)), "metrics of the killed run were not trimmed to its checkpoint"


@pytest.mark.slow
def test_cli_runs_and_writes_a_loadable_exit_checkpoint(tiny_model, tmp_path):
    out = tmp_path / "run"
    proc = subprocess.run(cli(tiny_model, out, "--steps", "3", "--log-every", "1", "--exit-kind", "calm",
                              "--topk", "2"),
                          cwd=ROOT, env={**os.environ, "JAX_PLATFORMS": "cpu"}, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    exit_config, params = read_exits(out)
    assert exit_config.kind == "calm" and exit_config.layers == (2, 3)
    assert params["w"].shape == (2, 64, 2)
    rows = [json.loads(line) for line in (out / T.METRICS_FILE).read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    for key in ("precision", "recall", "positive_rate"):
        assert all(0.0 <= e[key] <= 1.0 for r in rows for e in r["exits"])
    assert 2.0 <= rows[-1]["oracle_layers"] <= 4.0
    config = json.loads((out / T.CONFIG_FILE).read_text())
    assert config["topk"] == 2 and config["exit_layers"] == [2, 3]


@pytest.mark.parametrize("extra, message", [
    (("--mesh", "64x1"), r"mesh 64x1 needs 64 devices"),
    (("--exit-layers", "2,4"), r"exit layers \[4\] out of range for a 4-layer model"),
    (("--exit-layers", "3,2"), r"strictly increasing"),
    (("--data", "MISSING"), r"does not exist"),
    (("--data", "BINARY"), r"cannot read data file .*binary.txt"),
    (("--data", "EMPTY"), r"corpus .*empty.jsonl.* is empty"),
    (("--batch-size", "3", "--mesh", "1x1", "--topk", "0"), r"--topk must be >= 1"),
    (("--exit-weights", "1,2,3"), r"--exit-weights has 3 values for 2 exits"),
    (("--lr", "-1"), r"--lr must be a positive number"),
])
def test_bad_settings_fail_before_any_work(tiny_model, tmp_path, capsys, extra, message):
    (tmp_path / "binary.txt").write_bytes(b"\xff\xfe\x81 bytes")
    (tmp_path / "empty.jsonl").write_text('{"text": ""}\n{"text": "  "}\n')
    names = {"MISSING": str(tmp_path / "nope.jsonl"), "BINARY": str(tmp_path / "binary.txt"),
             "EMPTY": str(tmp_path / "empty.jsonl")}
    extra = [names.get(x, x) for x in extra]
    out = tmp_path / "run"
    argv = cli(tiny_model, out, "--steps", "2", *extra)[3:]
    with pytest.raises(SystemExit) as info:
        T.main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert re.search(message, err), err
    assert not (out / "checkpoints").exists()


def test_restart_with_other_settings_is_refused(tiny_model, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    old = T.DistillSettings(model=str(tiny_model), out=str(out), exit_kind="ffn")
    (out / T.CONFIG_FILE).write_text(json.dumps(old.to_json()))
    with pytest.raises(SystemExit):
        T.main(cli(tiny_model, out, "--steps", "2")[3:])
    assert "exit_kind: 'ffn' -> 'mamba'" in capsys.readouterr().err


def test_a_settings_file_without_a_setting_is_refused_naming_it(tmp_path):
    """No file is read as though it was written before a field existed: a setting the run's
    distill_config.json lacks is a changed setting."""
    old = T.DistillSettings(out=str(tmp_path)).to_json()
    del old["adapter"]
    (tmp_path / T.CONFIG_FILE).write_text(json.dumps(old))
    with pytest.raises(T.DistillError, match=r"adapter: '\(not recorded\)' -> 'none'.*--restart"):
        T._check_restart(tmp_path, T.DistillSettings(out=str(tmp_path)))
    T._check_restart(tmp_path, T.DistillSettings(out=str(tmp_path), restart=True))  # starting over: no check
    (tmp_path / T.CONFIG_FILE).write_text("[1]")
    with pytest.raises(T.DistillError, match=rf"{T.CONFIG_FILE}: expected a JSON object"):
        T._check_restart(tmp_path, T.DistillSettings(out=str(tmp_path)))


@pytest.mark.slow
def test_resume_after_the_backbone_changed_is_refused_naming_it(tmp_path, capsys):
    model = write_tiny_model(tmp_path / "tiny")
    out = tmp_path / "run"
    argv = cli(model, out, "--steps", "4", "--save-every", "2")[3:]
    assert T.main(argv + ["--steps", "2"]) == 0  # stopped half way: a checkpoint at step 2
    summary = json.loads((out / T.SUMMARY_FILE).read_text())
    assert summary["seed"] == 0
    recorded = json.loads((out / T.CONFIG_FILE).read_text())["model_fingerprint"]
    config, _ = ex.load_exits(out / "exits")
    assert config.trained_on.fingerprint == recorded and config.trained_on.family == "transformer"
    write_tiny_model(tmp_path / "tiny", seed=1)  # new weights under the same name
    capsys.readouterr()
    with pytest.raises(SystemExit) as info:
        T.main(argv)
    err = capsys.readouterr().err
    assert info.value.code == 2 and f"the model's files (fingerprint {recorded[:12]} -> " in err, err
    assert "--restart" in err
    assert T.main(argv + ["--restart"]) == 0
    summary = json.loads((out / T.SUMMARY_FILE).read_text())
    assert summary["resumed_from"] == 0 and summary["steps"] == 4
    assert json.loads((out / T.CONFIG_FILE).read_text())["model_fingerprint"] != recorded


@pytest.mark.slow
def test_a_second_run_in_one_folder_is_refused_with_the_first_pid(tiny_model, tmp_path):
    out = tmp_path / "run"
    assert_second_writer_refused(cli(tiny_model, out, "--steps", "50", "--seed", "0"), out,
                                 lambda: T.main(cli(tiny_model, out, "--steps", "50", "--seed", "1")[3:]),
                                 "train.distill")


def test_a_distributed_start_without_the_others_gives_up_after_the_timeout(tmp_path):
    """Process 0 of 2 with no process 1: one line saying what it waits for, then after
    --distributed-timeout one error line and exit status 2 (not jax's SIGABRT)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    started = time.time()
    proc = subprocess.run([sys.executable, "-m", "dynamax_jax.train.distill", "--distributed", "--num-processes", "2",
                           "--process-id", "0", "--coordinator-address", f"127.0.0.1:{port}",
                           "--distributed-timeout", "2", "--out", str(tmp_path / "run")], cwd=ROOT,
                          env={**os.environ, "JAX_PLATFORMS": "cpu"}, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert lines[0] == (f"python -m train.distill: process 0 of 2 waits up to 2 s for the others at coordinator "
                        f"127.0.0.1:{port} (--distributed-timeout)"), proc.stderr
    assert lines[-1].startswith("python -m train.distill: error: the other processes did not join process 0 of 2")
    assert "Check failure" not in proc.stderr and time.time() - started < 60


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


def test_distill_errors_exit_2_and_debug_shows_the_traceback(tmp_path, capsys):
    from dynamax_jax.train import distill as T

    argv = ["--model", str(tmp_path / "missing"), "--out", str(tmp_path / "run")]
    with pytest.raises(SystemExit) as exit_info:
        T.main(argv)
    assert exit_info.value.code == 2 and "does not exist" in capsys.readouterr().err
    with pytest.raises(T.DistillError, match="does not exist"):
        T.main([*argv, "--debug"])

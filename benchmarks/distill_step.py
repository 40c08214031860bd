"""Train-step throughput of exit-head distillation at several meshes, and the share of the
step spent in the frozen backbone, from one run.

    python benchmarks/distill_step.py                       # SmolLM2-135M-Instruct (GGUF)
    python benchmarks/distill_step.py --model random        # small random Llama, quick
    python benchmarks/distill_step.py --meshes 1x1,8x1,4x2 --exit-kind ffn

On a CPU the script simulates 8 devices (XLA_FLAGS=--xla_force_host_platform_device_count=8,
set before jax starts); 1x1 then runs on one of them. Simulated devices share the same
cores, so 8x1 on a CPU measures the sharding overhead, not a speed-up.

Backbone share = time of the jitted backbone pass alone (forward with hidden states + the
exit labels, same shardings) / time of the whole train step.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

if "jax" not in sys.modules:  # must precede jax's start
    os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import jax  # noqa: E402
import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from dynamax_jax import exits as ex  # noqa: E402
from dynamax_jax import sharding as S  # noqa: E402
from dynamax_jax.config import MistralConfig  # noqa: E402
from dynamax_jax.default_model import smollm2_gguf_path  # noqa: E402
from dynamax_jax.train import distill as T  # noqa: E402
from dynamax_jax.train import objective as O  # noqa: E402


def load_model(name: str | None):
    if name == "random":
        config = MistralConfig.tiny(vocab_size=8192, hidden_size=256, intermediate_size=768, num_layers=8,
                                    num_heads=4, num_kv_heads=2, head_dim=64, model_type="llama")
        from dynamax_jax.api import init_params
        return "random 8-layer Llama (d 256, V 8192)", config, init_params(config, jax.random.key(0))
    from dynamax_jax.api import load_pretrained
    path = name or str(smollm2_gguf_path())
    config, params = load_pretrained(path)
    return os.path.basename(path), config, params


def timed(fn, repeats: int) -> float:
    """Median seconds of ``fn()`` (blocked until ready) after one warm-up call (compile)."""
    jax.block_until_ready(fn())
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="checkpoint path, 'random', or default SmolLM2")
    p.add_argument("--exit-kind", default="mamba", choices=ex.KINDS)
    p.add_argument("--adapter", default="none", choices=ex.ADAPTERS,
                   help="train per-exit adapters too (their KL runs the LM head's backward at every exit)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--meshes", default="1x1,8x1")
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)

    name, config, params = load_model(args.model)
    settings = T.DistillSettings(exit_kind=args.exit_kind, batch_size=args.batch_size, seq_len=args.seq_len,
                                 steps=1000, warmup_steps=0, adapter=args.adapter)
    ec = settings.exit_config().resolve(config)
    tx = T.make_optimizer(settings)
    init = jax.device_get(ex.init_exits(config, ec, jax.random.key(0)))
    tokens = np.asarray(jax.random.randint(jax.random.key(1), (args.batch_size, args.seq_len), 0, config.vocab_size))
    mask = np.ones(tokens.shape, np.float32)
    n_tokens = args.batch_size * args.seq_len
    print(f"model: {name}; exits {ec.kind} (adapter {ec.adapter}) at {ec.layers} of {config.num_layers} layers; batch "
          f"{args.batch_size} x {args.seq_len}; {len(jax.devices())} {jax.devices()[0].platform} devices")
    rows = {}
    for spec in args.meshes.split(","):
        mesh = S.make_mesh(spec)
        step = T.jit_train_step(mesh, config, ec, settings, tx, params, init, tx.init(init))
        backbone = jax.jit(lambda bp, t: O.backbone_pass(config, bp, t, ec.layers, settings.topk),
                           in_shardings=(step.backbone, step.batch))
        with jax.set_mesh(mesh):
            bp = jax.device_put(params, step.backbone)
            t, m = S.global_batch(mesh, tokens), S.global_batch(mesh, mask)
            state = [jax.device_put(init, step.exits), jax.device_put(tx.init(init), step.opt_state)]

            def one_step():
                state[0], state[1], metrics = step.fn(bp, state[0], state[1], t, m)
                return metrics["loss"]

            step_s = timed(one_step, args.repeats)
            backbone_s = timed(lambda: backbone(bp, t), args.repeats)
        rows[spec] = (step_s, backbone_s)
        print(f"mesh {spec}: step {step_s * 1e3:.1f} ms, {n_tokens / step_s:,.0f} tokens/s; "
              f"backbone {backbone_s * 1e3:.1f} ms = {backbone_s / step_s:.0%} of the step")
    specs = list(rows)
    for spec in specs[1:]:
        print(f"tokens/s ratio {spec} / {specs[0]}: {rows[specs[0]][0] / rows[spec][0]:.2f}x")


if __name__ == "__main__":
    main()

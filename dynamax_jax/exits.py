"""Early-exit classifiers (calm, ffn, mamba, hybrid), training-free confidence measures, and
saving/loading exit heads.

Shape legend: E exits, B batch, T tokens, D hidden (the backbone's), F classifier FFN width
(4 D), I classifier Mamba inner width, C its conv channels (I + 2 N), J its heads, P its head
dim, N its state size, W its conv kernel, V vocabulary.

An exit sits *after* a decoder layer: ``ExitConfig(layers=(18, 21, 24, 27))`` reads the
hidden state after the 18th, 21st, ... layer (1-based counts of layers run, the convention
of ``hidden_states[18]`` in transformers). A classifier maps that hidden state to 2 logits
``(continue, exit)``; the token leaves when ``softmax(logits)[1] >= threshold``. The token
predicted at an exit comes from the backbone's own final norm and LM head, applied to the
exit hidden state after the exit's *adapter* when the checkpoint has one (see below).

Classifier params are plain dicts stacked on a leading ``[E]`` axis (the layout of files and
training; the decode engine splits them into one dict per exit, ``decoding.per_exit``):

    calm:  norm [E, D]  w [E, D, 2]  b [E, 2]
    ffn:   norm [E, D]  w_in [E, D, F]  b_in [E, F]  w_out [E, F, 2]  b_out [E, 2]
    mamba: norm [E, D]  in_proj [E, D, 2I + 2N + J]  conv_w [E, W, C]  conv_b [E, C]
           dt_bias [E, J]  A_log [E, J]  D [E, J]  gate_norm [E, I]  out_proj [E, I, 2]
           out_bias [E, 2]
    hybrid: the mamba tensors without out_bias, out_proj [E, I, D]; then the ffn tensors
           prefixed ``ffn_``: ffn_norm [E, D]  ffn_w_in [E, D, F]  ffn_b_in [E, F]
           ffn_w_out [E, F, 2]  ffn_b_out [E, 2]

Adapters ("tuned lens", optional, ``ExitConfig.adapter``) map an exit's hidden state before
the shared final norm and head, so that the token predicted at the exit agrees more often
with the final layer's. They are residual, so that zero weights are the identity (the plain
logit lens) and weight decay pulls towards it:

    affine:  h + h W + b            adapter_w [E, D, D]  adapter_b [E, D]
    lowrank: h + (h U) V + b        adapter_down [E, D, R]  adapter_up [E, R, D]  adapter_b [E, D]

They only change the *prediction* at an exit: the classifiers, the K/V copied or propagated
into skipped layers and the Mamba states all use the unadapted hidden state.

Every classifier starts with an RMSNorm of the hidden state: the residual stream grows
with depth, and a per-exit norm keeps one initialisation and learning rate good for all.

The ``mamba`` classifier is a single Mamba2 mixer (one group) on the normed exit hidden
state, computed by the backbone's own mixer code (``dynamax_jax.models.mamba2.mixer``: the
one-token recurrence when decoding, the chunked SSD scan over sequences); its output
projection gives the 2 logits (plus a bias: the classes are unbalanced). It carries a recurrent state ``(conv [E, B, W-1, C], ssm [E, B, J, P, N])`` across
tokens. **State at exits a token never reached:** every exit's state advances once per
token. When a token leaves at exit ``e``, the classifiers of the later exits are stepped on
the *exit hidden state* (the hidden state the token left with). Why: the classifiers are
trained on full sequences where every token advances every exit's state; leaving the later
states untouched would make their convolution window and decay span tokens that are not
adjacent, a pattern never seen in training. Under "copy" the skipped layers behave like the
identity, so the exit hidden state *is* the best available estimate of the later layers'
hidden state. The cost (one classifier step per later exit) is counted in the FLOPs
(``dynamax_jax.flops``).

The ``hybrid`` classifier is the ``mamba`` classifier's mixer followed by the ``ffn``
classifier (the paper's proposed check: Mamba for the state, an FFN for the decision). Its
mixer projects back to D (``out_proj [I, D]``) and adds to the exit hidden state, a pre-norm
residual Mamba2 block like the backbone's: the FFN reads the token's own hidden state plus
what the mixer carries from earlier tokens, and with the small initial ``out_proj`` the hybrid
starts as the ``ffn`` classifier on the hidden state. D (not the inner width I) is what feeds
the FFN, so its ``ffn_norm`` and ``ffn_w_in`` have the ``ffn`` kind's shapes. It carries the
``mamba`` kind's state, stepped the same way at exits a token never reached.
"""

from __future__ import annotations

import dataclasses
import json
import math
import warnings
from pathlib import Path
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from dynamax_jax.io import atomic_directory, read_json_object
from dynamax_jax.models import BACKBONES, skipped_layer_modes
from dynamax_jax.models.layers import rms_norm
from dynamax_jax.errors import ExitError, OtherWeightsWarning  # noqa: F401  (importable from here too)

Params = dict[str, Any]

KINDS = ("calm", "ffn", "mamba", "hybrid")
STATEFUL_KINDS = ("mamba", "hybrid")  # kinds with a Mamba2 mixer and its recurrent state
HYBRID_FFN = "ffn_"  # prefix of the ffn classifier's tensors inside a hybrid's params
CONFIDENCES = ("classifier", "softmax", "margin", "saturation")
ADAPTERS = ("none", "affine", "lowrank")
FILL_SHIFT = "fill_shift"  # [E, L, D]: exit e's estimate of layer l's input is h_e + fill_shift[e, l]
_EPS = 1e-5
CONFIG_FILE = "exit_config.json"
PARAMS_FILE = "exit_params.safetensors"
EXIT_FILES = (CONFIG_FILE, PARAMS_FILE)  # what save_exits writes


@dataclasses.dataclass(frozen=True)
class TrainedOn:
    """The model exit heads were trained on, recorded in their checkpoint.

    The architecture (``family``, ``num_layers``, ``hidden_size``, ``vocab_size``) must match
    the model the heads run on: heads of a Mamba2 model mean nothing on a Llama of the same
    hidden size, although every tensor shape fits, so ``check_exits`` refuses them.
    ``fingerprint`` (``dynamax_jax.io.fingerprint`` of the model's files) names the weights;
    ``check_trained_on`` only warns when it differs, because heads are legitimately tried on a
    fine-tune of their model, and a model file over 64 MiB is fingerprinted with its
    modification time, so a fresh copy of the same weights has another fingerprint."""

    family: str
    num_layers: int
    hidden_size: int
    vocab_size: int
    fingerprint: str | None = None

    @classmethod
    def of(cls, config, fingerprint: str | None = None) -> "TrainedOn":
        return cls(config.family, int(config.num_layers), int(config.hidden_size), int(config.vocab_size), fingerprint)

    def architecture(self) -> tuple:
        return self.family, self.num_layers, self.hidden_size, self.vocab_size

    def describe(self) -> str:
        return (f"a {self.family} model of {self.num_layers} layers, hidden size {self.hidden_size} and "
                f"vocabulary {self.vocab_size}")

    @classmethod
    def from_json(cls, d) -> "TrainedOn":
        names = [f.name for f in dataclasses.fields(cls)]
        if not isinstance(d, dict) or set(d) - set(names) or set(names[:4]) - set(d):
            raise ExitError(f"trained_on must be an object with the fields {', '.join(names)}, got {d!r}")
        for name in names[1:4]:
            if not isinstance(d[name], int) or isinstance(d[name], bool):
                raise ExitError(f"trained_on.{name} must be an integer, got {d[name]!r}")
        return cls(**d)


@dataclasses.dataclass(frozen=True)
class ExitConfig:
    """Where the exits sit, what decides, and what happens to the layers a token skips.

    layers: increasing 1-based layer counts, each in ``[1, L-1]``; ``None`` places
        ``num_exits`` exits evenly over the latter half of the model (``resolve``), e.g.
        18, 21, 24, 27 of 30.
    kind: classifier architecture, one of ``calm`` (one linear layer), ``ffn`` (FFN with
        ``ffn_expand`` x expansion, 4 as in the paper, then 2 outputs), ``mamba`` (one Mamba2 mixer
        with 2 outputs; carries state across tokens) or ``hybrid`` (the ``mamba`` mixer as a
        residual block, then the ``ffn`` classifier; carries the same state).
    threshold: exit when the confidence reaches it. One float, or one per exit. Must be
        >= 0 and not NaN; above 1 means never exit (every confidence measure is <= 1).
    mode: what the layers a token skipped store at its position. Transformers: ``copy``
        (DYNAMAX: the exit layer's K/V copied into the skipped layers) or ``propagate``
        (CALM: the skipped layers' K/V projected from the exit hidden state). Mamba2:
        ``skip`` (skipped layers' states unchanged) or ``propagate`` (their state update run
        on the exit hidden state). Both: ``shift`` (``propagate`` from the exit hidden state
        plus the average update of the layers in between, ``fill_shift`` in the exit params,
        measured by ``train.cached``) and ``recompute`` (a diagnostic: the skipped layers still
        run, so the cache is full depth's and only the early token differs; it saves nothing).
        ``None``: the backbone's first mode, ``copy`` / ``skip``, the cheap DYNAMAX defaults.
        Each backbone lists its own (``dynamax_jax.models.skipped_layer_modes``).
    confidence: ``classifier`` (the trained head's p(exit)) or a training-free measure:
        ``softmax`` (max probability of the exit's LM-head distribution), ``margin`` (top-1
        minus top-2 probability) or ``saturation`` (cosine similarity of the exit hidden
        state with the previous exit's, or with the layer input at the first exit). The
        first two run the LM head at every exit reached, which costs about a fifth of
        SmolLM2 each time.
    adapter: per-exit map applied before the shared final norm and head at an exit:
        ``none`` (the plain logit lens), ``affine`` (tuned lens, full D x D) or ``lowrank``
        (rank ``adapter_rank``).
    ffn_expand: width of the ``ffn`` (and ``hybrid``) classifier's hidden layer in units of D.
    mamba_*: size of the ``mamba`` (and ``hybrid``) classifier's mixer (inner width ``expand * D``; head dim
        ``None`` = the largest of 64, 32, 16, ... dividing it).
    trained_on: the model the heads were trained on (``TrainedOn``; ``None``: not recorded).
        ``check_exits`` refuses heads of another architecture.
    """

    layers: tuple[int, ...] | None = None
    kind: str = "mamba"
    threshold: float | tuple[float, ...] = 0.9
    mode: str | None = None
    confidence: str = "classifier"
    num_exits: int = 4
    mamba_expand: int = 1
    mamba_state_size: int = 16
    mamba_head_dim: int | None = None
    mamba_conv_kernel: int = 4
    adapter: str = "none"
    adapter_rank: int = 64
    ffn_expand: int = 4
    trained_on: TrainedOn | None = None

    def __post_init__(self):
        if self.layers is not None:
            layers = tuple(self.layers)
            if not layers:
                raise ExitError("exit layers must not be empty (use exit_config=None for full depth)")
            if not all(isinstance(l, (int, np.integer)) and not isinstance(l, bool) for l in layers):
                raise ExitError(f"exit layers must be integers, got {layers!r}")
            layers = tuple(int(l) for l in layers)
            if any(b <= a for a, b in zip(layers, layers[1:])):
                raise ExitError(f"exit layers must be strictly increasing, got {layers}")
            if layers[0] < 1:
                raise ExitError(f"exit layers are 1-based counts of layers run; got {layers[0]} in {layers}")
            object.__setattr__(self, "layers", layers)
            object.__setattr__(self, "num_exits", len(layers))
        if self.kind not in KINDS:
            raise ExitError(f"unknown exit classifier kind {self.kind!r}; supported: {', '.join(KINDS)}")
        if self.confidence not in CONFIDENCES:
            raise ExitError(f"unknown confidence {self.confidence!r}; supported: {', '.join(CONFIDENCES)}")
        if self.mode is not None and self.mode not in skipped_layer_modes():
            per_family = "; ".join(f"{family}: {'|'.join(skipped_layer_modes(family))}" for family in BACKBONES)
            raise ExitError(f"unknown mode {self.mode!r}; supported: {per_family}")
        if not isinstance(self.num_exits, (int, np.integer)) or isinstance(self.num_exits, bool) or self.num_exits < 1:
            raise ExitError(f"num_exits must be >= 1 (an integer), got {self.num_exits!r}")
        thr = self.threshold
        try:
            if isinstance(thr, (list, tuple, np.ndarray)):
                thr = tuple(_number(t) for t in thr)
                if len(thr) != self.num_exits:
                    raise ExitError(f"got {len(thr)} per-exit thresholds for {self.num_exits} exits")
            else:
                thr = _number(thr)
        except (TypeError, ValueError) as err:
            if isinstance(err, ExitError):
                raise
            raise ExitError(f"threshold must be a number or a list of numbers, got {self.threshold!r}") from None
        for t in (thr if isinstance(thr, tuple) else (thr,)):
            if math.isnan(t) or t < 0:
                raise ExitError(f"threshold must be a number >= 0 (above 1 means never exit), got {t}")
        object.__setattr__(self, "threshold", thr)
        if self.adapter not in ADAPTERS:
            raise ExitError(f"unknown adapter {self.adapter!r}; supported: {', '.join(ADAPTERS)}")
        for name in ("mamba_expand", "mamba_state_size", "mamba_head_dim", "mamba_conv_kernel",
                     "adapter_rank", "ffn_expand"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1):
                raise ExitError(f"{name} must be >= 1 (an integer), got {value!r}")
        for name in ("kind", "confidence"):
            if not isinstance(getattr(self, name), str):
                raise ExitError(f"{name} must be a string, got {getattr(self, name)!r}")
        if self.trained_on is not None and not isinstance(self.trained_on, TrainedOn):
            raise ExitError(f"trained_on must be a TrainedOn, got {self.trained_on!r}")

    # -- resolution against a model --------------------------------------------------------
    def resolve(self, config) -> "ExitConfig":
        """A copy with concrete ``layers`` and ``mode`` for the model ``config``; checks that
        the layers exist and the mode fits the backbone."""
        n_layers = config.num_layers
        layers = self.layers if self.layers is not None else default_exit_layers(n_layers, self.num_exits)
        if not layers:
            raise ExitError(f"a {n_layers}-layer model has no room for exits (need at least 2 layers)")
        bad = [l for l in layers if not 1 <= l <= n_layers - 1]
        if bad:
            raise ExitError(f"exit layers {bad} out of range for a {n_layers}-layer model: each must be "
                            f"in [1, {n_layers - 1}] (an exit after layer {n_layers} is the full model)")
        family = config.family
        modes = skipped_layer_modes(family)
        mode = self.mode if self.mode is not None else modes[0]
        if mode not in modes:
            raise ExitError(f"mode {mode!r} is not available for a {family} backbone; supported: {', '.join(modes)}")
        if self.kind in STATEFUL_KINDS and self.mamba_head_dim and (self.mamba_expand * config.hidden_size) % self.mamba_head_dim:
            raise ExitError(f"{self.kind} classifier: inner width {self.mamba_expand * config.hidden_size} is not a "
                            f"multiple of mamba_head_dim {self.mamba_head_dim}")
        if self.adapter == "lowrank" and self.adapter_rank >= config.hidden_size:
            raise ExitError(f"adapter_rank {self.adapter_rank} is not below the hidden size {config.hidden_size}: "
                            "use adapter='affine'")
        return dataclasses.replace(self, layers=tuple(layers), mode=mode, num_exits=len(layers))

    def thresholds(self) -> tuple[float, ...]:
        """One threshold per exit."""
        t = self.threshold
        return t if isinstance(t, tuple) else (t,) * self.num_exits

    @property
    def needs_params(self) -> bool:
        return self.confidence == "classifier" or self.has_adapter or self.mode == "shift"

    @property
    def has_adapter(self) -> bool:
        return self.adapter != "none"

    @property
    def stateful(self) -> bool:
        """Whether the classifier carries recurrent state across tokens."""
        return self.confidence == "classifier" and self.kind in STATEFUL_KINDS

    def to_json(self) -> dict:
        d = dataclasses.asdict(self)
        if not self.has_adapter:  # checkpoints without adapters keep the original format
            del d["adapter"], d["adapter_rank"]
        d["layers"] = list(self.layers) if self.layers is not None else None
        d["threshold"] = list(self.threshold) if isinstance(self.threshold, tuple) else self.threshold
        if self.trained_on is None:  # heads saved without their model keep the format of the fields above
            del d["trained_on"]
        return d

    @classmethod
    def from_json(cls, d: dict) -> "ExitConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ExitError(f"exit config has unknown fields {sorted(unknown)}")
        d = dict(d)
        if d.get("layers") is not None:
            if not isinstance(d["layers"], list):
                raise ExitError(f"layers must be a list of integers, got {d['layers']!r}")
            d["layers"] = tuple(d["layers"])
        if d.get("trained_on") is not None:
            d["trained_on"] = TrainedOn.from_json(d["trained_on"])
        if isinstance(d.get("threshold"), list):
            d["threshold"] = tuple(d["threshold"])
        return cls(**d)


def _number(value) -> float:
    """``float(value)`` for a real number (not a string or a bool): a JSON file's ``"0.9"``
    is refused rather than read."""
    if isinstance(value, (str, bool)) or value is None:
        raise TypeError(value)
    return float(value)


def check_trained_on(exit_config: ExitConfig, config, fingerprint: str | None = None, where: str = "exit heads") -> None:
    """Refuse (``ExitError``) heads trained on a model of another architecture than
    ``config``'s; warn (``OtherWeightsWarning``) when ``fingerprint`` (the model's
    ``io.fingerprint``) is given and differs from the one the heads recorded. Heads that
    record no model pass."""
    trained = exit_config.trained_on
    if trained is None:
        return
    here = TrainedOn.of(config, fingerprint)
    if trained.architecture() != here.architecture():
        raise ExitError(f"{where} were trained on {trained.describe()}; this model is {here.describe()}. "
                        "Train heads for this model (python -m train.cached or python -m train.distill)")
    if fingerprint is not None and trained.fingerprint is not None and trained.fingerprint != fingerprint:
        warnings.warn(f"{where} were trained on a model with other weights (fingerprint {trained.fingerprint[:12]}, "
                      f"this model's {fingerprint[:12]}) of the same architecture; their decisions may not "
                      "transfer", OtherWeightsWarning, stacklevel=2)


def default_exit_layers(num_layers: int, num_exits: int = 4) -> tuple[int, ...]:
    """``num_exits`` layers spread evenly over the latter half: 30 layers -> (18, 21, 24, 27).
    Duplicates (small models) are dropped; every exit is in ``[1, L-1]``."""
    half = num_layers / 2
    raw = [int(round(half + (num_layers - half) * (i + 1) / (num_exits + 1))) for i in range(num_exits)]
    return tuple(sorted({min(max(l, 1), num_layers - 1) for l in raw if num_layers > 1}))


# --------------------------------------------------------------------------------------------
# Classifier math (pure functions on one exit's params; training vmaps them over the exits)
# --------------------------------------------------------------------------------------------

def _mamba_dims(exit_config: ExitConfig, hidden: int) -> tuple[int, int, int, int, int]:
    inner = exit_config.mamba_expand * hidden
    n = exit_config.mamba_state_size
    head_dim = exit_config.mamba_head_dim or next(p for p in (64, 32, 16, 8, 4, 2, 1) if inner % p == 0)
    return inner, n, inner // head_dim, head_dim, inner + 2 * n


def _mm(x: jax.Array, w: jax.Array) -> jax.Array:
    """``x @ w`` in the weight dtype with a float32 result."""
    return jnp.matmul(x.astype(w.dtype), w, preferred_element_type=jnp.float32)


def calm_logits(p: Params, x: jax.Array) -> jax.Array:
    """``x [..., D] -> [..., 2]`` float32: one linear layer on the normed hidden state."""
    return _mm(rms_norm(x, p["norm"], _EPS), p["w"]) + p["b"].astype(jnp.float32)


def ffn_logits(p: Params, x: jax.Array) -> jax.Array:
    """``x [..., D] -> [..., 2]`` float32: ``D -> F`` (GELU) ``-> 2``."""
    y = jax.nn.gelu(_mm(rms_norm(x, p["norm"], _EPS), p["w_in"]) + p["b_in"].astype(jnp.float32))  # [..., F]
    return _mm(y, p["w_out"]) + p["b_out"].astype(jnp.float32)


def adapt(exit_config: ExitConfig, p: Params, h: jax.Array) -> jax.Array:
    """One exit's adapter on ``h [..., D]`` (same shape and dtype); the identity without one.
    Its output goes to the backbone's final norm and LM head."""
    if not exit_config.has_adapter:
        return h
    if exit_config.adapter == "affine":
        delta = _mm(h, p["adapter_w"])
    else:
        delta = _mm(_mm(h, p["adapter_down"]), p["adapter_up"])
    return (h.astype(jnp.float32) + delta + p["adapter_b"].astype(jnp.float32)).astype(h.dtype)


def adapter_params(p: Params) -> Params:
    """The adapter tensors of an exit param dict (``adapter_*``)."""
    return {k: v for k, v in p.items() if k.startswith("adapter_")}


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class MambaExitState:
    """Recurrent state of ``mamba`` classifiers: ``conv [E, B, W-1, C]``, ``ssm [E, B, J, P, N]``
    (both float32). Callers slice one exit's ``[B, ...]`` state."""

    conv: jax.Array
    ssm: jax.Array


def mamba_config(exit_config: ExitConfig, hidden: int):
    """The ``Mamba2Config`` of a ``mamba`` classifier's mixer (one group; the backbone's mixer
    code is reused: ``dynamax_jax.models.mamba2.mixer``)."""
    from dynamax_jax.config import Mamba2Config

    _, n, _, head_dim, _ = _mamba_dims(exit_config, hidden)
    return Mamba2Config(vocab_size=1, hidden_size=hidden, num_layers=1, state_size=n,
                        expand=exit_config.mamba_expand, head_dim=head_dim, n_groups=1,
                        conv_kernel=exit_config.mamba_conv_kernel, chunk_size=64, rms_norm_eps=_EPS)


def mamba_mix(exit_config: ExitConfig, p: Params, x: jax.Array, state: MambaExitState,
              lengths: jax.Array | None = None):
    """One exit's Mamba2 mixer on ``x [B, T, D]`` after the exit's RMSNorm, continuing from
    ``state`` (leaves ``[B, ...]``) -> ``(out [B, T, O] float32, state)``, O the width of ``out_proj`` (2 for
    ``mamba``, D for ``hybrid``). T == 1 is the one-token recurrence; with ``lengths [B]``
    padded positions leave the state untouched."""
    from dynamax_jax.models.mamba2 import mixer

    u = rms_norm(x, p["norm"], _EPS).astype(p["in_proj"].dtype)
    out, conv, ssm = mixer(mamba_config(exit_config, x.shape[-1]), p, u, state.conv, state.ssm, lengths)
    return out.astype(jnp.float32), MambaExitState(conv=conv, ssm=ssm)


def mamba_logits(exit_config: ExitConfig, p: Params, x: jax.Array, state: MambaExitState,
                 lengths: jax.Array | None = None):
    """The ``mamba`` classifier over ``x [B, T, D]``: its mixer's 2 outputs plus ``out_bias``
    -> ``(logits [B, T, 2] float32, state)`` (``mamba_mix`` for ``state`` and ``lengths``)."""
    out, state = mamba_mix(exit_config, p, x, state, lengths)
    return out + p["out_bias"].astype(jnp.float32), state


def hybrid_ffn_params(p: Params) -> Params:
    """The ``ffn`` classifier inside a ``hybrid`` exit's params (its ``ffn_`` tensors, unprefixed)."""
    return {k[len(HYBRID_FFN):]: v for k, v in p.items() if k.startswith(HYBRID_FFN)}


def hybrid_logits(exit_config: ExitConfig, p: Params, x: jax.Array, state: MambaExitState,
                  lengths: jax.Array | None = None):
    """The ``hybrid`` classifier over ``x [B, T, D]``: ``ffn_logits`` of ``x + mamba_mix(x)``
    (the mixer as a residual block, output width D) -> ``(logits [B, T, 2] float32, state)``."""
    out, state = mamba_mix(exit_config, p, x, state, lengths)
    return ffn_logits(hybrid_ffn_params(p), x.astype(jnp.float32) + out), state


_STATEFUL_LOGITS = {"mamba": mamba_logits, "hybrid": hybrid_logits}


def mamba_step(exit_config: ExitConfig, p: Params, x: jax.Array, state: MambaExitState):
    """One token through one exit's stateful classifier (``mamba`` or ``hybrid``): ``x [B, D]``,
    ``state`` with leaves ``[B, ...]`` -> ``(logits [B, 2] float32, state)``."""
    logits, state = _STATEFUL_LOGITS[exit_config.kind](exit_config, p, x[:, None], state)
    return logits[:, 0], state


def classifier_step(exit_config: ExitConfig, p: Params, x: jax.Array, state):
    """One exit's classifier on one token: ``x [B, D]`` -> ``(logits [B, 2] float32, state)``.
    ``state`` is that exit's ``MambaExitState`` slice for ``mamba`` and ``hybrid``, else ``None``."""
    if exit_config.kind == "calm":
        return calm_logits(p, x), state
    if exit_config.kind == "ffn":
        return ffn_logits(p, x), state
    return mamba_step(exit_config, p, x, state)


def init_exit_state(config, exit_config: ExitConfig, batch: int) -> MambaExitState | None:
    """Zero classifier state for ``batch`` rows (``None`` for stateless classifiers)."""
    if not exit_config.stateful:
        return None
    ec = exit_config.resolve(config)
    _, n, heads, head_dim, conv_dim = _mamba_dims(ec, config.hidden_size)
    e = ec.num_exits
    return MambaExitState(conv=jnp.zeros((e, batch, ec.mamba_conv_kernel - 1, conv_dim), jnp.float32),
                          ssm=jnp.zeros((e, batch, heads, head_dim, n), jnp.float32))


def classifier_sequence(exit_config: ExitConfig, p: Params, hidden: jax.Array, state=None,
                        lengths: jax.Array | None = None):
    """One exit's classifier over a sequence (training, prefill): ``hidden [B, T, D]`` ->
    ``(logits [B, T, 2] float32, final state)``. With ``lengths [B]`` a stateful classifier's
    (``mamba``, ``hybrid``) state stops advancing after each row's last real token
    (right-padded batches); its mixer runs the chunked SSD scan for T > 1."""
    if exit_config.kind not in STATEFUL_KINDS:
        return classifier_step(exit_config, p, hidden, None)[0], state
    return _STATEFUL_LOGITS[exit_config.kind](exit_config, p, hidden, state, lengths)


def exit_logits(config, exit_config: ExitConfig, exit_params: Params, hidden: jax.Array,
                lengths: jax.Array | None = None) -> jax.Array:
    """All exits on full sequences (distillation): ``hidden [E, B, T, D]`` (the hidden states at
    the exit layers) -> ``[E, B, T, 2]`` float32 logits (continue, exit), from zero state."""
    ec = exit_config.resolve(config)
    state = init_exit_state(config, ec, hidden.shape[1])

    def one(p, h, st):
        return classifier_sequence(ec, p, h, st, lengths)[0]

    if state is None:
        return jax.vmap(lambda p, h: one(p, h, None))(exit_params, hidden)
    return jax.vmap(one)(exit_params, hidden, state)


# --------------------------------------------------------------------------------------------
# Confidence measures: each returns [B] float32 in [0, 1] (compared with the threshold)
# --------------------------------------------------------------------------------------------

def classifier_confidence(logits2: jax.Array) -> jax.Array:
    """p(exit) from the classifier's ``(continue, exit)`` logits ``[..., 2]``."""
    return jax.nn.softmax(logits2.astype(jnp.float32), axis=-1)[..., 1]


def softmax_confidence(logits: jax.Array) -> jax.Array:
    """Max probability of the LM-head distribution ``logits [..., V]``."""
    return jnp.max(jax.nn.softmax(logits.astype(jnp.float32), axis=-1), axis=-1)


def margin_confidence(logits: jax.Array) -> jax.Array:
    """Top-1 minus top-2 probability of ``logits [..., V]``."""
    top2 = jax.lax.top_k(jax.nn.softmax(logits.astype(jnp.float32), axis=-1), 2)[0]
    return top2[..., 0] - top2[..., 1]


def saturation_confidence(hidden: jax.Array, previous: jax.Array) -> jax.Array:
    """Cosine similarity of ``hidden [..., D]`` with ``previous [..., D]`` (hidden-state
    saturation: the representation stopped changing)."""
    h, g = hidden.astype(jnp.float32), previous.astype(jnp.float32)
    num = jnp.sum(h * g, axis=-1)
    return num / jnp.maximum(jnp.linalg.norm(h, axis=-1) * jnp.linalg.norm(g, axis=-1), 1e-12)


# --------------------------------------------------------------------------------------------
# Parameters: init, checks, save/load
# --------------------------------------------------------------------------------------------

def _adapter_shapes(config, exit_config: ExitConfig) -> dict[str, tuple[int, ...]]:
    d, r = config.hidden_size, exit_config.adapter_rank
    if exit_config.adapter == "affine":
        return {"adapter_w": (d, d), "adapter_b": (d,)}
    if exit_config.adapter == "lowrank":
        return {"adapter_down": (d, r), "adapter_up": (r, d), "adapter_b": (d,)}
    return {}


def _classifier_shapes(exit_config: ExitConfig, d: int) -> dict[str, tuple[int, ...]]:
    """Per-exit shapes of the classifier of ``exit_config.kind`` on hidden size ``d``; a
    ``hybrid``'s are the ``mamba`` mixer's (output width D, no ``out_bias``) and the ``ffn``
    classifier's, prefixed."""
    kind = exit_config.kind
    if kind == "calm":
        return {"norm": (d,), "w": (d, 2), "b": (2,)}
    if kind == "ffn":
        f = exit_config.ffn_expand * d
        return {"norm": (d,), "w_in": (d, f), "b_in": (f,), "w_out": (f, 2), "b_out": (2,)}
    if kind == "hybrid":
        mixer = _classifier_shapes(dataclasses.replace(exit_config, kind="mamba"), d)
        ffn = _classifier_shapes(dataclasses.replace(exit_config, kind="ffn"), d)
        del mixer["out_bias"]
        return {**mixer, "out_proj": (mixer["out_proj"][0], d), **{HYBRID_FFN + k: v for k, v in ffn.items()}}
    inner, n, heads, _, conv_dim = _mamba_dims(exit_config, d)
    return {"norm": (d,), "in_proj": (d, 2 * inner + 2 * n + heads),
            "conv_w": (exit_config.mamba_conv_kernel, conv_dim), "conv_b": (conv_dim,),
            "dt_bias": (heads,), "A_log": (heads,), "D": (heads,), "gate_norm": (inner,),
            "out_proj": (inner, 2), "out_bias": (2,)}


def _param_shapes(config, exit_config: ExitConfig) -> dict[str, tuple[int, ...]]:
    """Per-exit shapes (without the leading ``[E]``): the classifier's, then the adapter's
    (and ``fill_shift`` under mode ``shift``)."""
    adapter = _adapter_shapes(config, exit_config)
    if exit_config.mode == "shift":
        adapter[FILL_SHIFT] = (config.num_layers, config.hidden_size)
    return {**_classifier_shapes(exit_config, config.hidden_size), **adapter}


def init_exits(config, exit_config: ExitConfig, key: jax.Array, dtype=jnp.float32) -> Params:
    """Random exit-classifier params stacked ``[E, ...]`` (normal std 0.02 for matrices, norms
    at one, zero biases; the Mamba mixer's ``A`` in [1, 16] and ``dt`` in [1e-3, 1e-1] as in
    Mamba2; adapters start as the identity: ``adapter_w``, ``adapter_up`` and ``adapter_b``
    zero). A ``hybrid``'s ``ffn_`` tensors start as the ``ffn`` kind's."""
    ec = exit_config.resolve(config)
    e = ec.num_exits
    shapes = _param_shapes(config, ec)
    keys = dict(zip(sorted(shapes), jax.random.split(key, len(shapes))))
    out = {}
    for name, shape in shapes.items():
        full = (e,) + shape
        k = keys[name]
        base = name.removeprefix(HYBRID_FFN)  # a hybrid's ffn tensors start as the ffn kind's
        if base in ("norm", "gate_norm", "D"):
            v = jnp.ones(full, jnp.float32)
        elif base in ("b", "b_in", "b_out", "conv_b", "out_bias", "adapter_b", "adapter_w", "adapter_up", FILL_SHIFT):
            v = jnp.zeros(full, jnp.float32)
        elif base == "A_log":
            v = jnp.log(jax.random.uniform(k, full, jnp.float32, 1.0, 16.0))
        elif base == "dt_bias":
            dt = jnp.exp(jax.random.uniform(k, full, jnp.float32, math.log(1e-3), math.log(1e-1)))
            v = dt + jnp.log(-jnp.expm1(-dt))  # inverse softplus
        elif base == "conv_w":
            bound = 1.0 / math.sqrt(shape[0])
            v = jax.random.uniform(k, full, jnp.float32, -bound, bound)
        else:
            v = 0.02 * jax.random.normal(k, full, jnp.float32)
        out[name] = v.astype(dtype)
    return out


def check_exits(config, exit_config: ExitConfig, exit_params: Params | None) -> ExitConfig:
    """Resolve ``exit_config`` against the model and check that ``exit_params`` fit it;
    returns the resolved config. Raises ``ExitError`` naming the offending tensor, or the
    architecture the heads were trained on when it is not ``config``'s (``check_trained_on``)."""
    check_trained_on(exit_config, config)
    ec = exit_config.resolve(config)
    if not ec.needs_params:
        return ec
    if exit_params is None:
        need = ("confidence='classifier'" if ec.confidence == "classifier" else
                f"adapter={ec.adapter!r}" if ec.has_adapter else "mode='shift'")
        raise ExitError(f"{need} needs exit_params (from init_exits or load_exits) for kind={ec.kind!r}")
    shapes = _param_shapes(config, ec)
    if FILL_SHIFT in exit_params:  # optional under other modes (the same heads run every mode)
        shapes.setdefault(FILL_SHIFT, (config.num_layers, config.hidden_size))
    missing = sorted(set(shapes) - set(exit_params))
    if missing:
        hint = (f" (mode 'shift' needs the {FILL_SHIFT} that train.cached measures: add it with "
                "exits.with_fill_shift)" if missing == [FILL_SHIFT] else "")
        raise ExitError(f"exit_params for kind={ec.kind!r} are missing tensors {missing} "
                        f"(found {sorted(exit_params)}){hint}")
    extra = sorted(set(exit_params) - set(shapes))
    if extra:
        raise ExitError(f"exit_params have tensors {extra} that a kind={ec.kind!r} classifier does not use")
    for name, shape in shapes.items():
        expected = (ec.num_exits,) + shape
        found = tuple(exit_params[name].shape)
        if found != expected:
            raise ExitError(
                f"exit_params['{name}'] has shape {found}, expected {expected} for {ec.num_exits} exits at "
                f"layers {ec.layers} on a model with hidden size {config.hidden_size} "
                "(were these exit heads trained for another model?)")
    return ec


def write_exits(exit_config: ExitConfig, exit_params: Params | None, directory) -> None:
    """Write ``exit_config.json`` and ``exit_params.safetensors`` into the existing
    ``directory`` (not atomic; ``save_exits`` wraps it)."""
    from safetensors.numpy import save

    directory = Path(directory)
    (directory / CONFIG_FILE).write_text(json.dumps(exit_config.to_json(), indent=2) + "\n")
    if exit_params is not None:
        arrays = {k: np.asarray(v) for k, v in exit_params.items()}
        dtypes = {k: str(a.dtype) for k, a in arrays.items()}
        # safetensors' numpy API has no bfloat16: store its bits, restore from the dtype map
        arrays = {k: (a.view(np.uint16) if a.dtype == jnp.bfloat16 else a) for k, a in arrays.items()}
        # (safetensors' save_file creates the file with mode 0600 whatever the umask)
        (directory / PARAMS_FILE).write_bytes(save(arrays, metadata={"dtypes": json.dumps(dtypes)}))


def save_exits(exit_config: ExitConfig, exit_params: Params | None, path, overwrite: bool = False) -> None:
    """Save to directory ``path``: ``exit_config.json`` and ``exit_params.safetensors``
    (tensors named as in the param dict, dtype kept). Written atomically. An existing
    ``path`` holding only those files is replaced; one holding anything else (e.g. a model)
    is refused unless ``overwrite``, which replaces the two files and keeps the rest. A
    ``path`` that is a symbolic link is written through: the heads land in its target, where
    ``load_exits(path)`` reads them, and the link stays."""
    path = Path(path)
    if path.is_symlink():
        path = path.resolve()
    with atomic_directory(path, owned=EXIT_FILES, overwrite=overwrite) as tmp:
        write_exits(exit_config, exit_params, tmp)


def load_exits(path) -> tuple[ExitConfig, Params | None]:
    """Load ``(exit_config, exit_params)`` saved by ``save_exits`` (params ``None`` for a
    training-free confidence saved without params)."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    cfg_file = path / CONFIG_FILE
    if not cfg_file.is_file():
        raise ExitError(f"{path} is not an exit checkpoint: {CONFIG_FILE} not found")
    settings = read_json_object(cfg_file, ExitError, "a JSON object of exit settings")
    try:
        exit_config = ExitConfig.from_json(settings)
    except (ExitError, TypeError) as err:
        raise ExitError(f"{cfg_file}: {err}") from None
    params_file = path / PARAMS_FILE
    if not params_file.is_file():
        if exit_config.needs_params:
            raise ExitError(f"{path}: {PARAMS_FILE} not found (needed for confidence='classifier')")
        return exit_config, None
    params = {}
    try:
        with safe_open(str(params_file), framework="numpy") as f:
            dtypes = json.loads((f.metadata() or {}).get("dtypes", "{}"))
            for k in f.keys():
                a = f.get_tensor(k)
                if dtypes.get(k) == "bfloat16":
                    a = a.view(jnp.bfloat16)
                params[k] = jnp.asarray(a)
    except (SafetensorError, json.JSONDecodeError) as err:
        raise ExitError(f"{params_file}: corrupt or truncated safetensors file ({err})") from None
    return exit_config, params


def with_fill_shift(config, exit_config: ExitConfig, exit_params: Params, layer_means) -> Params:
    """``exit_params`` with ``fill_shift [E, L, D]`` for mode ``shift``, from ``layer_means
    [L, D]`` (or ``[E, L, D]``, one set per exit): the average output of each layer
    (``hidden[l]``, after layer ``l + 1``) over the tokens that leave at the exit. Exit ``e``
    after layer ``k`` estimates the input of a skipped layer ``j >= k`` (0-based ``j``: the
    output of layer ``j``) as ``h_e + means[j - 1] - means[k - 1]``, the exit state moved by
    the average update of the layers in between (the least-squares offset between the two);
    rows for layers before the exit are zero. Kept in the dtype of the other params."""
    ec = exit_config.resolve(config)
    means = np.asarray(layer_means, np.float64)
    shape = (config.num_layers, config.hidden_size)
    if means.shape not in (shape, (ec.num_exits,) + shape):
        raise ExitError(f"layer_means has shape {means.shape}, expected {shape} or {(ec.num_exits,) + shape} "
                        "(the mean output of each layer, shared or per exit)")
    means = np.broadcast_to(means, (ec.num_exits,) + shape)
    shift = np.zeros((ec.num_exits,) + shape, np.float64)
    for e, k in enumerate(ec.layers):
        shift[e, k:] = means[e, k - 1:-1] - means[e, k - 1]
    dtype = next(iter(exit_params.values())).dtype if exit_params else jnp.float32
    return {**exit_params, FILL_SHIFT: jnp.asarray(shift, dtype)}


def select_exits(exit_config: ExitConfig, exit_params: Params | None, layers) -> tuple[ExitConfig, Params | None]:
    """Keep only the exits at ``layers`` (some of ``exit_config.layers``, which must be set).
    Every exit's classifier, adapter and fill shift are its own (params ``[E, ...]``), so the
    kept exits decide as they did in the whole set; per-exit thresholds are kept with them."""
    if exit_config.layers is None:
        raise ExitError("select_exits needs an exit_config with explicit layers")
    layers = tuple(int(l) for l in layers)
    missing = sorted(set(layers) - set(exit_config.layers))
    if not layers or missing or len(set(layers)) != len(layers):
        raise ExitError(f"layers {list(layers)} must be distinct exits of {list(exit_config.layers)}"
                        + (f" (not exits: {missing})" if missing else ""))
    keep = np.array(sorted(exit_config.layers.index(l) for l in layers))
    threshold = exit_config.threshold
    if isinstance(threshold, tuple):
        threshold = tuple(threshold[i] for i in keep)
    config = dataclasses.replace(exit_config, layers=tuple(exit_config.layers[i] for i in keep),
                                 num_exits=len(keep), threshold=threshold)
    params = None if exit_params is None else {k: v[keep] for k, v in exit_params.items()}
    return config, params


def num_classifier_params(config, exit_config: ExitConfig) -> int:
    """Parameters of all exit classifiers and their adapters."""
    ec = exit_config.resolve(config)
    return ec.num_exits * sum(int(np.prod(s)) for s in _param_shapes(config, ec).values())


def affine_to_lowrank(exit_config: ExitConfig, exit_params: Params, rank: int) -> tuple[ExitConfig, Params]:
    """Compress affine adapters to rank ``rank`` by truncated SVD of each exit's ``adapter_w``
    (the best rank-``rank`` approximation in Frobenius norm): ``adapter_down = U_r S_r``,
    ``adapter_up = V_r^T``; ``adapter_b`` and the classifier are kept. Returns the
    ``lowrank`` config and params (the dtype of ``adapter_w``)."""
    if exit_config.adapter != "affine":
        raise ExitError(f"affine_to_lowrank needs affine adapters, got adapter={exit_config.adapter!r}")
    w = np.asarray(exit_params["adapter_w"], np.float32)  # [E, D, D]
    if not 1 <= rank < w.shape[-1]:
        raise ExitError(f"rank must be in [1, {w.shape[-1] - 1}], got {rank}")
    u, sv, vt = np.linalg.svd(w)
    dtype = exit_params["adapter_w"].dtype
    params = {k: v for k, v in exit_params.items() if k != "adapter_w"}
    params["adapter_down"] = jnp.asarray(u[..., :rank] * sv[:, None, :rank], dtype)
    params["adapter_up"] = jnp.asarray(vt[:, :rank], dtype)
    return dataclasses.replace(exit_config, adapter="lowrank", adapter_rank=rank), params


__all__: Sequence[str] = (
    "ExitConfig", "ExitError", "MambaExitState", "OtherWeightsWarning", "TrainedOn", "check_trained_on", "adapt", "adapter_params", "affine_to_lowrank", "init_exits", "save_exits", "load_exits",
    "write_exits", "EXIT_FILES",
    "check_exits", "classifier_step", "classifier_sequence", "exit_logits", "init_exit_state",
    "classifier_confidence", "softmax_confidence", "margin_confidence", "saturation_confidence",
    "default_exit_layers", "num_classifier_params", "with_fill_shift", "FILL_SHIFT",
)

"""``fastalign plan``: per-device memory of an RL training step, by part, with and without fastalign.

A transparent analytic model (formulas and their derivation: docs/plan.md). Two layers:

* :func:`step_memory`: what one step adds on top of weights and gradients on one device (the bytes
  the step benchmark measures, :mod:`fastalign.bench.suites.step`): the policy's saved activations
  (per layer and per token, from what the Hugging Face Qwen2 / Llama / Mistral / Gemma-2 forward
  saves, with or without activation checkpointing), the logits part (the tutorial's materializing
  path: the ``[N, V]`` logits, their fp32 copy, log-softmax and its gradients; fastalign: its tile
  buffers and the head's gradients), the value model's activations (PPO), and the step's peak as the
  largest of its phases (no-grad log-probs before the forward; the head window; the backbone's
  backward).
* :func:`plan`: the whole device: weights, gradients, optimizer states (and master weights) under
  DDP / ZeRO-2 / ZeRO-3 (FSDP2) over ``world`` devices, the head vocabulary-parallel over ``tp`` of
  them, the reference and value models, plus :func:`step_memory`; the largest micro-batch that fits
  a device, and the fewest devices for a global batch.

Everything is in bytes; nothing here allocates a tensor.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace

import torch

from fastalign._validation import check_choice
from fastalign.models import ModelShape

_OP = "fastalign.plan"
ALGOS = ("grpo", "dpo", "ppo")
PATHS = ("materializing", "fastalign")
PRECISIONS = ("bf16-mixed", "bf16", "fp32")
OPTIMIZERS = ("adamw", "adamw8bit", "sgd")
SHARDINGS = ("ddp", "zero2", "zero3", "fsdp2")
GIB = 2**30

# bytes per parameter: (weights, gradients, master weights kept by the optimizer)
_PRECISION_BYTES = {"bf16-mixed": (2, 2, 4), "bf16": (2, 2, 0), "fp32": (4, 4, 0)}
# optimizer-state bytes per parameter: AdamW's fp32 m and v; bitsandbytes' 8-bit AdamW (two uint8
# states + one fp32 absmax per 2048-element block for each); SGD without momentum
_OPTIMIZER_BYTES = {"adamw": 8.0, "adamw8bit": 2.0 + 8.0 / 2048, "sgd": 0.0}


def _int(x, name: str, lo: int = 1) -> int:
    if isinstance(x, bool) or not isinstance(x, int):
        raise TypeError(f"{_OP}: {name} must be an int, got {type(x).__name__}")
    if x < lo:
        raise ValueError(f"{_OP}: {name} must be >= {lo}, got {x}")
    return x


def _itemsize(dtype) -> int:
    if isinstance(dtype, str):
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32, "fp64": torch.float64}.get(
            dtype, dtype
        )
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"{_OP}: dtype must be a floating torch.dtype or 'bf16' / 'fp32', got {dtype!r}")
    return dtype.itemsize


def _backend(device: str) -> str:
    """The epilogue backend fastalign's dispatch rule picks (``select_impl("auto")``)."""
    from fastalign._dispatch import select_impl

    return select_impl("auto", torch.device(device), op=_OP)


# ---- activations ---------------------------------------------------------------------------------


def layer_activation_bytes(m: ModelShape, b: int) -> int:
    """Bytes per token one decoder layer saves for backward (no checkpointing), flash / SDPA attention.

    Per RMSNorm (``x.float()``, ``x * rsqrt(var)``, ``weight * y.to(dtype)``): the fp32 input
    (the layer input itself when it is fp32), the normalized ``y`` and the output: ``4 + 2b`` per
    element of D. Attention: rotated q and k, v, the attention output (and an fp32 log-sum-exp per
    head). MLP: gate, act(gate), up, act * up: ``4 b I``. Gemma-2's extra post-norms add two norms."""
    norms = m.norms_per_layer * (4 + 2 * b) * m.hidden
    attn = b * (2 * m.q_dim + 2 * m.kv_dim) + 4 * m.heads
    return norms + attn + 4 * b * m.intermediate


def activation_bytes(m: ModelShape, seqs: int, seq_len: int, b: int, checkpointing: bool) -> int:
    """What one backbone forward with autograd leaves alive for ``seqs`` sequences of ``seq_len``:
    per layer the full set (:func:`layer_activation_bytes`), or with checkpointing only each layer's
    input (``b D`` per token); the final norm (``(4 + 2b) D``: its output is the head's input); the
    rotary cos / sin (``2 L head_dim b``, shared by the batch)."""
    N = seqs * seq_len
    per_layer = b * m.hidden if checkpointing else layer_activation_bytes(m, b)
    return N * (m.layers * per_layer + (4 + 2 * b) * m.hidden) + 2 * seq_len * m.head_dim * b


def layer_backward_bytes(m: ModelShape, N: int, b: int) -> int:
    """Transient of one layer's backward beyond its saved activations: two ``[N, I]`` gradients."""
    return 2 * b * N * m.intermediate


# ---- the logits part -----------------------------------------------------------------------------


def _tutorial_head(m: ModelShape, N: int, rows: int, b: int, entropy: bool) -> dict:
    """The tutorial's ``token_log_probs``: ``model(ids).logits`` ([N, V] in the model dtype, kept until
    the function returns), ``.float()`` (an fp32 copy unless already fp32), ``log_softmax`` (fp32,
    saved), ``gather``; with the entropy ``exp`` (saved) and ``exp * logp``. Backward: gather's
    ``new_zeros`` + ``scatter_add`` (two fp32 ``[rows, V]``), then the log-softmax gradient; with the
    entropy three more fp32 products.

    Returns the forward peak (``fwd``), what the forward leaves saved (``saved``), the extra peak of
    the backward over ``saved`` (``bwd``), and a no-grad call's peak (``nograd``)."""
    V = m.vocab
    copy = 4 if b < 4 else 0
    logits = b * N * V
    if entropy:
        fwd = logits + max(copy + 4, 12) * rows * V
        saved = 8 * rows * V
        bwd = 12 * rows * V
    else:
        fwd = logits + (copy + 4) * rows * V
        saved = 4 * rows * V
        bwd = 8 * rows * V
    nograd = logits + (copy + 4) * rows * V + b * N * m.hidden
    return {"fwd": fwd, "saved": saved, "bwd": bwd, "nograd": nograd}


def _fastalign_head(m: ModelShape, N: int, rows: int, b: int, device: str, *, one_pass: bool, entropy: bool) -> dict:
    """fastalign's LM-head engine (fastalign/ops/lm_head.py) on ``rows`` rows of ``N`` tokens.

    Forward tiles: one-pass (the fused GRPO / PPO-policy losses) ``[R, V]`` with ``R =
    tuning.fused_loss_rows``; two-pass (``linear_logprobs``) ``[R, C]`` from
    ``tuning.linear_logprobs_chunking``. Each tile is fp32; its dZ has the GEMM dtype (a second buffer
    unless that is fp32). The one-pass form computes dH ``[rows, D]`` and dW ``[V, D]`` in the forward
    and holds them to the backward; the two-pass backward allocates dW, dH and an fp32 ``[R, D]`` dH
    block (when the hidden states are not fp32). The torch epilogues (CPU) add tile-sized temporaries
    (``x - m``; with the entropy ``exp`` and a bool mask); the CPU has no bf16 GEMM into fp32, so bf16
    operands are copied to fp32 there (a whole ``[V, D]`` in one pass, one chunk in two)."""
    from fastalign.kernels import tuning

    V, D = m.vocab, m.hidden
    torch_path = _backend(device) == "torch"
    cpu_low = device != "cuda" and b < 4
    gd = 4 if cpu_low else b  # GEMM operand bytes
    if one_pass:
        R, C = tuning.fused_loss_rows(device, V, rows), V
    else:
        R, C = tuning.linear_logprobs_chunking(device, V, rows)
    RC = R * C
    tile = 4 * RC + (0 if gd == 4 else gd * RC)
    soft = 4 * RC if m.softcap else 0
    fold = (4 * RC + (5 * RC if entropy else 0) + soft) if torch_path else 0
    dlog = ((5 * RC if entropy else 0) + soft) if torch_path else 0
    h_copy = 4 * rows * D if cpu_low else 0
    dw = b * V * D  # the weight's dtype (the models here keep weights in the compute dtype)
    dh = b * rows * D
    if one_pass:
        w_copy = 4 * V * D if cpu_low else 0
        mm_tmp = 4 * V * D if cpu_low else 0  # fp32 dW product before its bf16 accumulate (CPU)
        fwd = dw + dh + w_copy + h_copy + tile + max(fold, dlog, mm_tmp)
        saved = dw + dh
        bwd = dw + dh  # [V, D] and [rows, D] temporaries while the scaled gradients are handed to autograd
        return {"fwd": fwd, "saved": saved, "bwd": bwd, "nograd": fwd}
    chunk_copy = 4 * C * D if cpu_low else 0
    fwd = h_copy + tile + chunk_copy + fold
    dh_block = 4 * R * D if b < 4 else 0
    mm_tmp = 4 * C * D if cpu_low else 0
    bwd = dw + dh + dh_block + h_copy + tile + chunk_copy + max(dlog, mm_tmp)
    nograd = fwd + b * N * D  # the no-grad caller's hidden states are alive too
    return {"fwd": fwd, "saved": 0, "bwd": bwd, "nograd": nograd}


def _nograd_backbone(m: ModelShape, N: int, L: int, b: int) -> int:
    """Peak of a backbone forward without autograd: one layer's MLP (``act(gate)``, ``up`` and their
    product, ``3 b I`` per token) over the residual stream and norm temporaries (``8 b D``)."""
    return N * (3 * b * m.intermediate + 8 * b * m.hidden) + 2 * L * m.head_dim * b


def _nograd_logprobs(path: str, m: ModelShape, N: int, rows: int, L: int, b: int, device: str) -> int:
    """Peak of a no-grad log-prob pass (old / reference log-probs): the larger of the backbone's
    forward and the head on its final hidden states."""
    if path == "materializing":
        head = _tutorial_head(m, N, rows, b, False)["nograd"]
    else:
        head = _fastalign_head(m, N, rows, b, device, one_pass=False, entropy=False)["nograd"]
    return max(head, _nograd_backbone(m, N, L, b))


def step_memory(
    model,
    *,
    algo: str,
    path: str,
    batch: int,
    seq_len: int,
    dtype=torch.bfloat16,
    checkpointing: bool = True,
    device: str = "cuda",
    tp: int = 1,
) -> dict:
    """What one step of ``algo`` on ``path`` adds on one device on top of weights and gradients.

    ``batch`` sequences (DPO: pairs) of ``seq_len`` tokens; ``tp``: fastalign's head vocabulary-
    parallel over that many ranks (``[N, V / tp]`` tiles; the materializing path's Hugging Face
    tensor-parallel head gathers the whole ``[N, V]`` logits, ``colwise_gather_output``). Returns
    bytes: ``activations`` (the policy's), ``value_activations`` (PPO's value model), ``logits`` (the
    head window's peak over the activations: the logits part), ``before_forward`` (what the step
    holds when the policy forward starts), ``phases`` (the peak of each phase) and ``peak`` (their
    maximum). The phases follow the code of :mod:`fastalign.reference` (docs/plan.md)."""
    m = model if isinstance(model, ModelShape) else ModelShape.from_config(model)
    check_choice(algo, "algo", _OP, ALGOS)
    check_choice(path, "path", _OP, PATHS)
    S, L, tp = _int(batch, "batch"), _int(seq_len, "seq_len", 2), _int(tp, "tp")
    b = _itemsize(dtype)
    ck = bool(checkpointing)
    fa = path == "fastalign"
    h = replace(m, vocab=math.ceil(m.vocab / tp)) if fa else m  # the head as one rank sees it
    N, rows = S * L, S * (L - 1)
    value_act = 0
    if algo == "dpo":
        # the tutorial runs chosen and rejected through the policy one after the other (two graphs
        # alive at once); fastalign concatenates them into one forward of 2B sequences
        act = activation_bytes(m, 2 * S, L, b, ck) if fa else 2 * activation_bytes(m, S, L, b, ck)
        before = 8 * 2 * N if fa else 0  # the reference's per-token log-probs (fastalign keeps them)
        if fa:  # reference log-probs first, then the policy's two-pass linear_logprobs
            first = _nograd_logprobs(path, h, 2 * N, 2 * rows, L, b, device)
            head = _fastalign_head(h, 2 * N, 2 * rows, b, device, one_pass=False, entropy=False)
            window = max(head["fwd"], head["bwd"] + b * 2 * N * m.hidden)
        else:  # chosen, rejected, then the reference on both while both policy graphs live
            first = 0
            head = _tutorial_head(h, N, rows, b, False)
            ref = _nograd_logprobs(path, h, N, rows, L, b, device)
            window = max(head["saved"] + head["fwd"], 2 * head["saved"] + ref, 2 * head["saved"] + head["bwd"])
        dh = b * 2 * N * m.hidden
        # the tutorial's two graphs run their backbone backward together: two layers recomputed at
        # once, as in one graph of 2B sequences
        n_bwd = 2 * N
        if not fa:
            # every parameter is used by both graphs, so autograd buffers the first graph's gradient of
            # each (a whole gradient copy, b per parameter) until the second graph's backward adds its
            # own: the second head's backward runs on top of it
            second_half = act // 2 + head["saved"] + head["bwd"] + b * m.params + b * N * m.hidden
    elif algo == "grpo":
        act = activation_bytes(m, S, L, b, ck)
        before = 8 * N  # old (and fastalign's reference) log-probs, advantages
        first = _nograd_logprobs(path, h, N, rows, L, b, device)  # the old log-probs
        if fa:  # on_fastalign.grpo_loss: the reference's log-probs before the policy forward
            head = _fastalign_head(h, N, rows, b, device, one_pass=True, entropy=False)
            window = max(head["fwd"], head["saved"] + head["bwd"] + b * N * m.hidden)
        else:  # tutorial.grpo_loss: the reference's log-probs while the policy's graph lives
            head = _tutorial_head(h, N, rows, b, False)
            window = max(head["fwd"], head["saved"] + first, head["saved"] + head["bwd"])
        dh = b * N * m.hidden
        n_bwd = N
    else:  # ppo: old / reference log-probs and values (no grad), then policy and value with grad
        act = activation_bytes(m, S, L, b, ck)
        value_act = act  # the value model is the policy's backbone with a [1, D] head
        before = 36 * N  # old / reference log-probs, values, rewards, advantages, returns, masks (fp32)
        first = _nograd_logprobs(path, h, N, rows, L, b, device)
        if fa:  # hidden_logprobs(return_entropy=True): linear_logprobs' two passes
            head = _fastalign_head(h, N, rows, b, device, one_pass=False, entropy=True)
            saved, head_bwd = 0, head["bwd"] + b * N * m.hidden
        else:
            head = _tutorial_head(h, N, rows, b, True)
            saved, head_bwd = head["saved"], head["saved"] + head["bwd"]
        # the value model's forward runs after the policy's head, its backward before the head's
        value_bwd = value_act + b * N * m.hidden + (_recompute(m, S, L, b) if ck else layer_backward_bytes(m, N, b))
        window = max(head["fwd"], saved + value_act, saved + value_bwd, head_bwd)
        dh = b * N * m.hidden
        n_bwd = N
    tied_dw = b * h.vocab * m.hidden if m.tied else 0
    second_half = second_half if algo == "dpo" and not fa else 0
    phases = {
        "before": before + first,
        "window": before + act + window,
        "backward": before + _backward_peak(m, act, n_bwd, b, ck, dh) + tied_dw,
        # the embedding's backward ends the step: its [V, D] gradient and the zeroed [V, D] it is
        # built in, with a tied head's dW still buffered for the same parameter
        "embedding_backward": before + 2 * b * h.vocab * m.hidden + tied_dw,
        "second_graph_backward": before + second_half,  # the tutorial's DPO (two policy graphs)
    }
    return {
        "activations": act,
        "value_activations": value_act,
        "logits": window,
        "before_forward": before,
        "phases": phases,
        "peak": max(phases.values()),
    }


def _recompute(m: ModelShape, S: int, L: int, b: int) -> int:
    """Checkpointed backward of one layer: its full activations and its backward transient."""
    N = S * L
    return N * layer_activation_bytes(m, b) + layer_backward_bytes(m, N, b)


def _backward_peak(m: ModelShape, act: int, N: int, b: int, ck: bool, dh: int) -> int:
    """The backbone backward's peak: at its first (the last) layer, every saved activation but the
    final norm's (its backward ran) still alive, the incoming dH, the layer's backward transient, and
    with checkpointing the layer recomputed (its input, already counted, is reused when fp32)."""
    live = act - N * (4 + 2 * b) * m.hidden + dh + layer_backward_bytes(m, N, b)
    if ck:
        live += N * layer_activation_bytes(m, b) - (N * b * m.hidden if b == 4 else 0)
    return live


# ---- the whole device ----------------------------------------------------------------------------


@dataclass
class PlanParts:
    """Per-device bytes by part, for one path."""

    weights: float  # the policy's
    gradients: float
    optimizer: float  # optimizer states (+ fp32 master weights for bf16-mixed)
    sharding_buffers: float  # ZeRO-3 / FSDP2: unsharded layers in flight
    reference: float  # the frozen reference model's weights
    value: float  # PPO: the value model's weights, gradients, optimizer states
    activations: float  # policy (+ value) saved activations
    logits: float  # the logits / log-prob part
    step_peak: float  # the step's peak over weights and gradients (its largest phase)
    total: float

    def gib(self) -> dict:
        return {k: v / GIB for k, v in asdict(self).items()}


@dataclass
class Plan:
    """The answer of :func:`plan` (bytes; :meth:`PlanParts.gib` for GiB)."""

    model: str
    params: int
    algo: str
    seq_len: int
    tokens: int  # per micro-batch per device (DPO: chosen + rejected)
    precision: str
    optimizer: str
    checkpointing: bool
    world: int
    sharding: str
    tp: int
    device_memory_gib: float
    reserve_gib: float
    global_batch: int | None
    parts: dict = field(default_factory=dict)  # path -> PlanParts
    max_tokens: dict = field(default_factory=dict)  # path -> the largest micro-batch that fits (tokens)
    min_devices: dict = field(default_factory=dict)  # path -> the fewest devices for global_batch

    def fits(self, path: str) -> bool:
        return self.parts[path].total <= (self.device_memory_gib - self.reserve_gib) * GIB

    def to_dict(self) -> dict:
        d = asdict(self)
        d["parts_gib"] = {k: p.gib() for k, p in self.parts.items()}
        d["fits"] = {k: self.fits(k) for k in self.parts}
        d["prediction"] = "analytic model (docs/plan.md), not a measurement"
        return d


@dataclass(frozen=True)
class _Setup:
    algo: str
    seq_len: int
    dtype: torch.dtype
    checkpointing: bool
    precision: str
    optimizer: str
    sharding: str
    tp: int
    device: str


def _model_state(trained: int, vocab: int, s: _Setup, world: int, layer: int, trained_model: bool) -> dict:
    """Weights, gradients, optimizer states and ZeRO-3 buffers of one model on one device:
    ``trained`` parameters outside the vocabulary-parallel head and ``vocab`` inside it (split over
    tp); ZeRO-2 shards gradients and optimizer states over the data-parallel ranks, ZeRO-3 / FSDP2
    the weights too, and holds two unsharded layers (the one computed, the prefetched next) and one
    layer's unsharded gradients before their reduce-scatter."""
    wb, gb, mb = _PRECISION_BYTES[s.precision]
    ob = _OPTIMIZER_BYTES[s.optimizer] + mb
    dp = world // s.tp
    z3 = s.sharding in ("zero3", "fsdp2")
    per_rank = trained + vocab / s.tp
    out = {"weights": per_rank * wb / (dp if z3 else 1), "gradients": 0.0, "optimizer": 0.0, "buffers": 0.0}
    if z3 and dp > 1:
        out["buffers"] = 2 * layer * wb + (layer * gb if trained_model else 0)
    if trained_model:
        shard = dp if s.sharding != "ddp" else 1
        out["gradients"] = per_rank * gb / shard
        out["optimizer"] = per_rank * ob / shard
    return out


def _parts(m: ModelShape, s: _Setup, path: str, seqs: int, world: int) -> PlanParts:
    sm = step_memory(
        m, algo=s.algo, path=path, batch=seqs, seq_len=s.seq_len, dtype=s.dtype,
        checkpointing=s.checkpointing, device=s.device, tp=s.tp,
    )  # fmt: skip
    # the head (the embedding too when tied) is vocabulary-parallel over tp ranks
    vocab = m.embedding_params if m.tied else m.head_params
    rest = m.params - vocab
    pol = _model_state(rest, vocab, s, world, m.layer_params, True)
    ref = _model_state(rest, vocab, s, world, m.layer_params, False)
    value = 0.0
    if s.algo == "ppo":  # the policy's backbone and a [1, D] head
        body = m.backbone_params - m.embedding_params + m.hidden
        v = _model_state(body, m.embedding_params, s, world, m.layer_params, True)
        value = v["weights"] + v["gradients"] + v["optimizer"] + v["buffers"]
    static = pol["weights"] + pol["gradients"] + pol["optimizer"] + pol["buffers"] + ref["weights"] + ref["buffers"]
    static += value
    return PlanParts(
        weights=pol["weights"],
        gradients=pol["gradients"],
        optimizer=pol["optimizer"],
        sharding_buffers=pol["buffers"] + ref["buffers"],
        reference=ref["weights"],
        value=value,
        activations=sm["activations"] + sm["value_activations"],
        logits=sm["logits"],
        step_peak=sm["peak"],
        total=static + sm["peak"],
    )


def largest_fitting(fits, hi: int) -> int:
    """The largest n in [0, hi] with fits(n), for fits monotone (doubling, then bisection)."""
    if not fits(1):
        return 0
    lo, n = 1, 2
    while n <= hi and fits(n):
        lo, n = n, 2 * n
    hi = min(n, hi + 1)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


def plan(
    model,
    *,
    algo: str = "grpo",
    seq_len: int = 4096,
    tokens: int | None = None,
    precision: str = "bf16-mixed",
    optimizer: str = "adamw",
    checkpointing: bool = True,
    world: int = 1,
    sharding: str = "zero3",
    tp: int = 1,
    device_memory_gib: float = 80.0,
    reserve_gib: float = 2.0,
    global_batch: int | None = None,
    max_devices: int = 1024,
    device: str = "cuda",
) -> Plan:
    """The per-device plan of one RL step for ``model`` (a shipped name, a config path, a dict or a
    :class:`ModelShape`), with and without fastalign.

    ``tokens``: per micro-batch per device, whole sequences of ``seq_len`` (DPO: chosen + rejected;
    default 4 sequences / pairs). ``world`` devices, ``sharding`` of weights / gradients / optimizer
    states over the ``world / tp`` data-parallel ranks, ``tp`` the vocabulary-parallel degree of the
    head. ``reserve_gib`` of each device is kept for the CUDA context and allocator fragmentation.
    ``global_batch``: tokens per optimizer step, one micro-batch per data-parallel rank (no gradient
    accumulation), for :attr:`Plan.min_devices` (searched up to ``max_devices``)."""
    m = model if isinstance(model, ModelShape) else ModelShape.from_config(model)
    check_choice(algo, "algo", _OP, ALGOS)
    check_choice(precision, "precision", _OP, PRECISIONS)
    check_choice(optimizer, "optimizer", _OP, OPTIMIZERS)
    check_choice(sharding, "sharding", _OP, SHARDINGS)
    check_choice(device, "device", _OP, ("cuda", "cpu"))
    L = _int(seq_len, "seq_len", 2)
    per_seq = (2 if algo == "dpo" else 1) * L
    T = 4 * per_seq if tokens is None else _int(tokens, "tokens")
    if T % per_seq:
        unit = "pairs of seq_len (2 * seq_len)" if algo == "dpo" else "sequences of seq_len"
        raise ValueError(f"{_OP}: tokens must be a multiple of {per_seq} (whole {unit}), got {T}")
    W, tp = _int(world, "world"), _int(tp, "tp")
    if W % tp:
        raise ValueError(f"{_OP}: world must be a multiple of tp = {tp}, got {W}")
    for name, v, lo in (("device_memory_gib", device_memory_gib, 0), ("reserve_gib", reserve_gib, -1)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > lo:
            raise ValueError(f"{_OP}: {name} must be a number > {max(lo, 0)}, got {v!r}")
    if global_batch is not None:
        _int(global_batch, "global_batch")
    s = _Setup(algo, L, torch.float32 if precision == "fp32" else torch.bfloat16, bool(checkpointing), precision,
               optimizer, sharding, tp, device)  # fmt: skip
    out = Plan(
        model=m.name, params=m.params, algo=algo, seq_len=L, tokens=T, precision=precision, optimizer=optimizer,
        checkpointing=bool(checkpointing), world=W, sharding=sharding, tp=tp,
        device_memory_gib=float(device_memory_gib), reserve_gib=float(reserve_gib), global_batch=global_batch,
    )  # fmt: skip
    budget = (device_memory_gib - reserve_gib) * GIB
    for path in PATHS:
        out.parts[path] = _parts(m, s, path, T // per_seq, W)
        out.max_tokens[path] = per_seq * largest_fitting(
            lambda n, p=path: _parts(m, s, p, n, W).total <= budget, 1 << 16
        )
        if global_batch:
            out.min_devices[path] = _min_devices(m, s, path, per_seq, budget, global_batch, max_devices)
    return out


def _min_devices(m: ModelShape, s: _Setup, path: str, per_seq: int, budget: float, global_batch: int, limit: int):
    """The fewest devices (a multiple of tp) whose data-parallel ranks hold ``global_batch`` tokens,
    one micro-batch each (the largest that fits at that world size); None up to ``limit``."""
    for w in range(s.tp, limit + 1, s.tp):
        per_rank = per_seq * largest_fitting(lambda n, w=w: _parts(m, s, path, n, w).total <= budget, 1 << 16)
        if per_rank and (w // s.tp) * per_rank >= global_batch:
            return w
    return None


# ---- presentation ---------------------------------------------------------------------------------

_ROWS = (
    ("weights", "policy weights"),
    ("gradients", "policy gradients"),
    ("optimizer", "optimizer states (+ fp32 master weights)"),
    ("sharding_buffers", "ZeRO-3 / FSDP2 unsharded layers"),
    ("reference", "reference model"),
    ("value", "value model (weights, gradients, optimizer)"),
    ("activations", "activations (policy + value)"),
    ("logits", "logits / log-prob part"),
    ("step_peak", "step peak over weights + gradients"),
    ("total", "total per device"),
)


def table(p: Plan) -> str:
    """The plan as a terminal table (GiB per device)."""
    a, f = p.parts["materializing"], p.parts["fastalign"]
    lines = [
        f"fastalign plan: {p.model} ({p.params / 1e9:.2f}B parameters), {p.algo.upper()}, seq_len {p.seq_len}, "
        f"{p.tokens} tokens per micro-batch per device",
        f"{p.precision}, {p.optimizer}, activation checkpointing {'on' if p.checkpointing else 'off'}, "
        f"{p.sharding} over {p.world} device(s), head tp {p.tp}; {p.device_memory_gib:g} GiB devices, "
        f"{p.reserve_gib:g} GiB kept back",
        "",
        f"{'GiB per device':46s} {'materializing':>14s} {'fastalign':>10s}",
    ]
    for key, label in _ROWS:
        lines.append(f"{label:46s} {getattr(a, key) / GIB:14.2f} {getattr(f, key) / GIB:10.2f}")
    fits = {k: "yes" if p.fits(k) else "NO" for k in PATHS}
    lines.append(f"{'fits':46s} {fits['materializing']:>14s} {fits['fastalign']:>10s}")
    mt = p.max_tokens
    lines.append(f"{'largest micro-batch (tokens per device)':46s} {mt['materializing']:14d} {mt['fastalign']:10d}")
    if p.global_batch:
        md = {k: "-" if v is None else str(v) for k, v in p.min_devices.items()}
        label = f"fewest devices for {p.global_batch} tokens/step"
        lines.append(f"{label:46s} {md['materializing']:>14s} {md['fastalign']:>10s}")
    lines.append("(a prediction of the analytic model in docs/plan.md, not a measurement)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """``fastalign plan`` (``fastalign plan --help``)."""
    import argparse
    import json

    from fastalign.models import shipped_models

    ap = argparse.ArgumentParser(
        prog="fastalign plan",
        description="Per-device memory of one RL training step by part, with and without fastalign "
        "(a prediction of the analytic model in docs/plan.md).",
    )
    names = ", ".join(shipped_models())
    ap.add_argument("--model", required=True, help=f"a shipped config ({names}) or a config.json path")
    ap.add_argument("--algo", default="grpo", choices=ALGOS, type=str.lower)
    ap.add_argument("--seq-len", type=int, default=4096, help="tokens per sequence (prompt + completion)")
    ap.add_argument("--tokens", type=int, default=None, help="tokens per micro-batch per device (default: 4 sequences)")
    ap.add_argument("--precision", default="bf16-mixed", choices=PRECISIONS)
    ap.add_argument("--optimizer", default="adamw", choices=OPTIMIZERS)
    ap.add_argument("--no-checkpointing", action="store_true", help="activation checkpointing off")
    ap.add_argument("--world", type=int, default=1, help="devices")
    ap.add_argument("--sharding", default="zero3", choices=SHARDINGS, help="over the world / tp data-parallel ranks")
    ap.add_argument("--tp", type=int, default=1, help="vocabulary-parallel degree of the head")
    ap.add_argument("--device-memory", type=float, default=80.0, help="GiB per device (default 80)")
    ap.add_argument("--reserve", type=float, default=2.0, help="GiB kept back per device (context, fragmentation)")
    ap.add_argument("--global-batch", type=int, default=None, help="tokens per optimizer step: the fewest devices")
    ap.add_argument("--json", action="store_true", help="JSON instead of the table")
    args = ap.parse_args(argv)
    try:
        p = plan(
            args.model, algo=args.algo, seq_len=args.seq_len, tokens=args.tokens, precision=args.precision,
            optimizer=args.optimizer, checkpointing=not args.no_checkpointing, world=args.world,
            sharding=args.sharding, tp=args.tp, device_memory_gib=args.device_memory, reserve_gib=args.reserve,
            global_batch=args.global_batch,
        )  # fmt: skip
    except (ValueError, TypeError) as exc:
        ap.error(str(exc))
    print(json.dumps(p.to_dict(), indent=1) if args.json else table(p))
    return 0

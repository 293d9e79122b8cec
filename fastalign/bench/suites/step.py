"""Whole training steps on a Hugging Face model built from a config: the tutorial's materializing path
against the same steps on fastalign, same micro-batch, same activation checkpointing.

* GRPO: the old log-probs (a no-grad policy forward), then :func:`fastalign.reference.tutorial.grpo_loss`
  (reference-model log-probs, policy forward, loss) and its backward; fastalign:
  :func:`fastalign.reference.on_fastalign.grpo_loss` with the old log-probs from
  :func:`fastalign.integrations.transformers.causal_lm_logprobs`.
* DPO: ``dpo_loss`` of either module (reference log-probs of chosen and rejected, policy forward) and
  its backward; a micro-batch of B pairs is 2 B sequences.
* PPO with a value model (:class:`fastalign.models.ValueModel`): old and reference log-probs and the
  old values (no grad), KL-shaped rewards, GAE (the tutorial's loop / :func:`fastalign.gae`), then
  ``ppo_step`` (policy, value and entropy terms) and its backward.

Weights are built from a config (:mod:`fastalign.models`): on CUDA the shipped configs in bf16; on
the CPU a small Qwen2 config (``CPU_MODEL``) in fp32. Gradients are allocated before the step (as in
any step after the first) and accumulated in place, so peak memory is what the step adds on top of
weights and gradients; optimizer states are the planner's (:mod:`fastalign.plan`), never allocated.
Attention: flash-attn's kernels where installed on CUDA (``flash_attention_2``; the micro-batches here
have no padding, so padding-free packing has nothing to remove), SDPA otherwise; the row says which.

Beyond the harness's time and peak (``cases``), :func:`report` (called by ``fastalign bench`` and the
GPU window) writes the step table: tokens/s, the peak, the planner's prediction of the peak and of its
activation and logits terms next to what one instrumented step measures, and on CUDA the largest
micro-batch each path fits (:func:`max_tokens`: doubling, then bisection up to the out-of-memory point).
"""

from __future__ import annotations

import contextlib
import gc
import importlib.util
import json
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

from fastalign.bench.core import BenchCase, BenchResult, dtype_name, no_sync_mode
from fastalign.utils.memory import AllocationTracker

OPT_IN = True  # `fastalign bench` runs this suite only when named: `--suite step` (about 2 minutes on a CPU)
ALGOS = ("grpo", "dpo", "ppo")
PATHS = ("materializing", "fastalign")

# A small Qwen2 (the Qwen2.5 architecture: q/k/v biases, GQA, SwiGLU) for CPU runs and tests
CPU_MODEL = {
    "model_type": "qwen2",
    "hidden_size": 128,
    "intermediate_size": 704,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 16384,
    "tie_word_embeddings": False,
    "hidden_act": "silu",
    "max_position_embeddings": 4096,
    "rope_theta": 1000000.0,
    "rms_norm_eps": 1e-06,
    "initializer_range": 0.02,
}


@dataclass(frozen=True)
class StepShape:
    """One micro-batch: ``batch`` sequences (DPO: pairs) of ``seq_len`` tokens of ``model``."""

    name: str
    model: Any  # a shipped name, a config.json path or a config dict
    batch: int
    seq_len: int
    dtype: torch.dtype = torch.bfloat16
    checkpointing: bool = True
    attn: str = "sdpa"

    def tokens(self, algo: str) -> int:
        """Tokens per micro-batch (DPO: chosen and rejected)."""
        return (2 if algo == "dpo" else 1) * self.batch * self.seq_len

    def label(self, algo: str) -> str:
        ckpt = "ckpt" if self.checkpointing else "no-ckpt"
        return (
            f"{self.name}:B={self.batch},L={self.seq_len},tokens={self.tokens(algo)},"
            f"{dtype_name(self.dtype)},{ckpt},{self.attn}"
        )


CUDA_SHAPES = [
    StepShape("qwen2.5-0.5b", "qwen2.5-0.5b", 8, 1024),
    StepShape("qwen2.5-1.5b", "qwen2.5-1.5b", 8, 1024),
    StepShape("qwen2.5-7b", "qwen2.5-7b", 4, 1024),
]
CPU_SHAPES = [StepShape("qwen2-cpu", CPU_MODEL, 4, 128, torch.float32)]
QUICK_SHAPES = [
    StepShape("qwen2-quick", {**CPU_MODEL, "num_hidden_layers": 2, "vocab_size": 4096}, 2, 64, torch.float32)
]


def attention_for(device: torch.device) -> str:
    """``flash_attention_2`` on CUDA where flash-attn is installed, else ``sdpa``."""
    if device.type == "cuda" and importlib.util.find_spec("flash_attn") is not None:
        from transformers.utils import is_flash_attn_2_available

        if is_flash_attn_2_available():
            return "flash_attention_2"
    return "sdpa"


# ---- models and batches -------------------------------------------------------------------------


def make_models(algo: str, shape: StepShape, device: torch.device, *, seed: int = 0) -> dict:
    """policy (trained, gradients allocated), ref (frozen), and for PPO value (trained)."""
    from fastalign.models import build_causal_lm, build_value_model

    kw = dict(device=device, dtype=shape.dtype, attn_implementation=shape.attn)
    models = {"policy": build_causal_lm(shape.model, seed=seed, **kw)}
    models["ref"] = build_causal_lm(shape.model, seed=seed + 1, **kw).eval().requires_grad_(False)
    if algo == "ppo":
        models["value"] = build_value_model(shape.model, seed=seed + 2, **kw)
    for key in ("policy", "value"):
        if key in models:
            m = models[key].train()
            if shape.checkpointing:
                target = m.backbone if key == "value" else m
                target.activation_checkpointing_enable()
            for p in m.parameters():
                p.grad = torch.zeros_like(p)
    return models


def make_batch(algo: str, shape: StepShape, vocab: int, device: torch.device, *, seed: int = 0) -> dict:
    """Random tokens; the first quarter of each sequence is prompt (mask 0, position 0 included)."""
    gen = torch.Generator().manual_seed(seed)
    B, L = shape.batch, shape.seq_len
    prompt = max(1, L // 4)
    mask = (torch.arange(L) >= prompt).expand(B, L).to(torch.int64)
    ids = lambda: torch.randint(0, vocab, (B, L), generator=gen)  # noqa: E731
    if algo == "dpo":
        chosen, rejected = ids(), ids()
        rejected[:, :prompt] = chosen[:, :prompt]
        out = {"chosen_ids": chosen, "rejected_ids": rejected, "chosen_mask": mask, "rejected_mask": mask.clone()}
    else:
        out = {"input_ids": ids(), "action_mask": mask}
        out["rewards"] = torch.randn(B, generator=gen)
        if algo == "grpo":
            out["group_id"] = torch.arange(B) // max(1, min(4, B // 2))
    return {k: v.to(device) for k, v in out.items()}


# ---- the steps ----------------------------------------------------------------------------------


def _token_logprobs(path: str, model, ids: torch.Tensor) -> torch.Tensor:
    """``[B, L]`` log-probs of each path, 0 at position 0 (the tutorial's convention)."""
    if path == "materializing":
        from fastalign.reference.tutorial import token_log_probs

        return token_log_probs(model, ids)
    from fastalign.integrations.transformers import causal_lm_logprobs

    return F.pad(causal_lm_logprobs(model, ids), (1, 0))


def _module(path: str):
    from fastalign.reference import on_fastalign, tutorial

    return tutorial if path == "materializing" else on_fastalign


def _check(algo: str, path: str) -> None:
    if algo not in ALGOS:
        raise ValueError(f"fastalign.bench.suites.step: algo must be one of {ALGOS}, got {algo!r}")
    if path not in PATHS:
        raise ValueError(f"fastalign.bench.suites.step: path must be one of {PATHS}, got {path!r}")


def step_loss(algo: str, path: str, models: dict, batch: dict, *, kl_coef: float = 0.05) -> torch.Tensor:
    """The step's loss (its graph alive; the caller runs ``backward``): see the module doc."""
    _check(algo, path)
    mod = _module(path)
    policy, ref = models["policy"], models["ref"]
    if algo == "dpo":
        return mod.dpo_loss(policy, ref, batch)[0]
    ids, mask = batch["input_ids"], batch["action_mask"]
    with torch.no_grad():
        old = _token_logprobs(path, policy, ids)
    if algo == "grpo":
        return mod.grpo_loss(policy, ref, {**batch, "old_log_probs": old})[0]
    value = models["value"]
    with torch.no_grad():
        ref_lp = _token_logprobs(path, ref, ids)
        values = value(ids).to(old.dtype)
        m = mask.to(old.dtype)
        rewards = -kl_coef * (old - ref_lp) * m
        rewards[:, -1] += batch["rewards"].to(old.dtype)
        v_ext = F.pad(values * m, (0, 1))
        adv, ret = mod.compute_gae(rewards, v_ext, torch.zeros_like(rewards))
    step = {**batch, "old_log_probs": old, "advantages": adv * m, "returns": ret}
    return mod.ppo_step(policy, value, step)[0]


def run_step(algo: str, path: str, models: dict, batch: dict) -> torch.Tensor:
    """One step: loss and backward (gradients accumulate into the allocated ``.grad``)."""
    loss = step_loss(algo, path, models, batch)
    loss.backward()
    return loss.detach()


def trained_params(models: dict) -> list[tuple[str, torch.nn.Parameter]]:
    """(name, parameter) of the trained models (policy, then value), in a fixed order."""
    out = []
    for key in ("policy", "value"):
        if key in models:
            out += [(f"{key}.{n}", p) for n, p in models[key].named_parameters() if p.requires_grad]
    return out


# ---- phases of one step: activations and the logits part, measured ---------------------------------


class _PhaseTracker(AllocationTracker):
    """:class:`AllocationTracker` that also keeps the peak since the last ``reset_phase``."""

    def __init__(self) -> None:
        super().__init__()
        self.phase_peak = 0

    def reset_phase(self) -> None:
        self.phase_peak = self.live_bytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = super().__torch_dispatch__(func, types, args, kwargs)
        self.phase_peak = max(self.phase_peak, self.live_bytes)
        return out


class _Memory:
    """Live bytes now / peak since the last mark: the CUDA allocator, else a :class:`_PhaseTracker`."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.device = device

    def __enter__(self):
        gc.collect()
        if self.cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
        else:
            self.tracker = _PhaseTracker().__enter__()
            self.base = 0
        return self

    def __exit__(self, *exc):
        if not self.cuda:
            self.tracker.__exit__(*exc)

    def live(self) -> int:
        return (torch.cuda.memory_allocated(self.device) if self.cuda else self.tracker.live_bytes) - self.base

    def phase_peak(self) -> int:
        """Peak since the last ``reset``; on CUDA the allocator's counter (no device sync needed)."""
        peak = torch.cuda.max_memory_allocated(self.device) if self.cuda else self.tracker.phase_peak
        return peak - self.base

    def reset(self) -> None:
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self.tracker.reset_phase()


def _backbone(model):
    from fastalign.integrations.transformers import backbone_of

    return model.backbone if hasattr(model, "backbone") else backbone_of(model)


def measure_terms(algo: str, path: str, models: dict, batch: dict, device: torch.device) -> dict:
    """One step, instrumented: bytes on top of what existed before it (weights, gradients, batch).

    ``activations``: what the policy backbone's forwards with autograd leave alive (live at each
    forward's end minus live at its start, summed); ``value_activations`` the same for the value model;
    ``logits``: the peak from the end of the last policy forward to the start of the policy backbone's
    backward (the head, the loss, any log-probs computed meanwhile, the head's backward up to dH),
    minus the activations and what was live before the first policy forward; ``peak``: the step's."""
    marks: dict = {"act": 0, "value_act": 0, "first": None, "window": 0, "peak": 0}
    mem = _Memory(device)
    hooks = []

    def new_phase() -> int:
        """The peak of the phase that ends here (kept for the step's peak); a new phase starts."""
        peak = mem.phase_peak()
        marks["peak"] = max(marks["peak"], peak)
        mem.reset()
        return peak

    def watch(module, key):
        def pre(mod, args, kwargs):
            if torch.is_grad_enabled():
                marks["start"] = mem.live()
                if key == "act" and marks["first"] is None:
                    marks["first"] = marks["start"]

        def post(mod, args, kwargs, out):
            if not torch.is_grad_enabled():
                return
            marks[key] += mem.live() - marks["start"]
            if key != "act":
                return
            new_phase()  # the head's window starts here
            h = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]

            def at_backward(grad):
                if "bwd" not in marks:
                    marks["bwd"] = True
                    marks["window"] = new_phase()  # the backbone's backward starts here
                return grad

            h.register_hook(at_backward)

        hooks.append(module.register_forward_pre_hook(pre, with_kwargs=True))
        hooks.append(module.register_forward_hook(post, with_kwargs=True))

    watch(_backbone(models["policy"]), "act")
    if "value" in models:
        watch(_backbone(models["value"]), "value_act")
    mode = no_sync_mode() if path == "fastalign" else contextlib.nullcontext()
    try:
        with mem, mode:
            run_step(algo, path, models, batch)
            if mem.cuda:
                torch.cuda.synchronize(device)
            backward = new_phase()
            peak = mem.tracker.peak_bytes if not mem.cuda else marks["peak"]
    finally:
        for h in hooks:
            h.remove()
    first = marks["first"] or 0
    return {
        "activations": marks["act"],
        "value_activations": marks["value_act"],
        "logits": marks["window"] - first - marks["act"],
        "before_forward": first,
        "window": marks["window"],
        "backward": backward,
        "peak": peak,
    }


# ---- harness cases ------------------------------------------------------------------------------


def prepare(algo: str, path: str, shape: StepShape, device: torch.device) -> tuple[dict, dict, Callable[[], Any]]:
    """(models, batch, the step as a callable) for one case."""
    from fastalign.models import load_config

    models = make_models(algo, shape, device)
    batch = make_batch(algo, shape, int(load_config(shape.model)["vocab_size"]), device)
    return models, batch, lambda: run_step(algo, path, models, batch)


def cases_for(device: torch.device, shapes: list[StepShape], algos=ALGOS) -> list[BenchCase]:
    out = []
    for shape in shapes:
        for algo in algos:
            for path in PATHS:

                def make(algo=algo, path=path, shape=shape):
                    return prepare(algo, path, shape, device)[2]

                kind = "baseline" if path == "materializing" else "fastalign"
                impl = (
                    "tutorial"
                    if path == "materializing"
                    else f"fastalign[{'triton' if device.type == 'cuda' else 'torch'}]"
                )
                out.append(BenchCase("step", algo, shape.label(algo), impl, kind, make))
    return out


def default_shapes(device: torch.device, quick: bool) -> list[StepShape]:
    """CUDA: the shipped configs in bf16 (quick: the small Qwen2 in bf16); CPU: the small Qwen2 in fp32."""
    if device.type == "cuda":
        shapes = [replace(s, dtype=torch.bfloat16) for s in QUICK_SHAPES] if quick else CUDA_SHAPES
        return [replace(s, attn=attention_for(device)) for s in shapes]
    return QUICK_SHAPES if quick else CPU_SHAPES


def cases(device: torch.device, quick: bool = False) -> list[BenchCase]:
    return cases_for(device, default_shapes(device, quick))


def shape_of_label(label: str, shapes: list[StepShape], algo: str) -> StepShape | None:
    return next((s for s in shapes if s.label(algo) == label), None)


# ---- the largest micro-batch (CUDA) --------------------------------------------------------------


def _fits(algo: str, path: str, shape: StepShape, models: dict, device: torch.device) -> bool:
    """One step at ``shape``'s micro-batch on the models already built; False on out-of-memory."""
    from fastalign.models import load_config

    batch = None
    try:
        batch = make_batch(algo, shape, int(load_config(shape.model)["vocab_size"]), device)
        run_step(algo, path, models, batch)
        torch.cuda.synchronize(device)
        return True
    except torch.OutOfMemoryError:
        return False
    finally:
        del batch
        gc.collect()
        torch.cuda.empty_cache()


def bracket_search(fits: Callable[[int], bool], start: int, *, tol: float = 0.0, deadline: float | None = None) -> dict:
    """The largest ``n >= 1`` with ``fits(n)`` (``fits`` monotone): probes ``start`` (a prediction),
    then moves away from it in steps that double (1/16 of ``start`` first), then bisects until the
    bracket is within ``tol`` (relative) or ``deadline`` passes. Returns ``{"fits": the largest n
    that fit (0: none), "fails": the smallest that did not (None: none did), "probes": [(n, fit)],
    "complete": whether the bracket closed}``."""
    lo, hi, probes = 0, None, []
    step = max(1, start // 16)
    n = max(1, start)

    def probe(k: int) -> bool:
        ok = fits(k)
        probes.append((k, ok))
        return ok

    def late() -> bool:
        return deadline is not None and time.monotonic() > deadline

    if probe(n):
        lo = n
        while hi is None and not late():
            n = lo + step
            if probe(n):
                lo, step = n, 2 * step
            else:
                hi = n
    else:
        hi = n
        while lo == 0 and hi > 1 and not late():
            n = max(1, hi - step)
            if probe(n):
                lo = n
            else:
                hi, step = n, 2 * step
    while hi is not None and hi - lo > max(1, tol * lo) and lo > 0 and not late():
        mid = (lo + hi) // 2
        if probe(mid):
            lo = mid
        else:
            hi = mid
    complete = hi is not None and (lo > 0 or hi == 1) and hi - lo <= max(1, tol * lo)
    return {"fits": lo, "fails": hi, "probes": probes, "complete": complete}


def max_tokens(
    algo: str,
    path: str,
    shape: StepShape,
    device: torch.device,
    *,
    deadline: float | None = None,
    tol: float = 1 / 32,
    reserve_gib: float = 0.0,
) -> dict:
    """The largest micro-batch (tokens in sequences of ``shape.seq_len``) one step of ``path`` runs on
    this GPU without running out of memory: :func:`bracket_search` from the planner's prediction for
    the memory left once the models and their gradients exist. Tokens in the result; ``predicted``:
    the planner's largest micro-batch for that memory."""
    if device.type != "cuda":
        raise ValueError(f"max_tokens: needs a CUDA device (out-of-memory is the criterion), got {device}")
    from fastalign.plan import largest_fitting, step_memory

    models = make_models(algo, shape, device)
    try:
        torch.cuda.synchronize(device)
        free = torch.cuda.get_device_properties(device).total_memory - torch.cuda.memory_allocated(device)
        free -= int(reserve_gib * 2**30)

        def predicted_fits(n: int) -> bool:
            sm = step_memory(
                shape.model, algo=algo, path=path, batch=n, seq_len=shape.seq_len, dtype=shape.dtype,
                checkpointing=shape.checkpointing, device="cuda",
            )  # fmt: skip
            return sm["peak"] <= free

        guess = largest_fitting(predicted_fits, 1 << 16)
        found = bracket_search(
            lambda n: _fits(algo, path, replace(shape, batch=n), models, device),
            max(1, guess),
            tol=tol,
            deadline=deadline,
        )
    finally:
        models.clear()
        gc.collect()
        torch.cuda.empty_cache()
    per = shape.tokens(algo) // shape.batch
    return {
        "fits": found["fits"] * per,
        "fails": None if found["fails"] is None else found["fails"] * per,
        "complete": found["complete"],
        "predicted": guess * per,
        "probes": [(n * per, ok) for n, ok in found["probes"]],
    }


# ---- the step table -----------------------------------------------------------------------------


def predict(algo: str, path: str, shape: StepShape, device: torch.device) -> dict:
    """The planner's prediction (:func:`fastalign.plan.step_memory`) for one case, in bytes."""
    from fastalign.plan import step_memory

    return step_memory(
        shape.model,
        algo=algo,
        path=path,
        batch=shape.batch,
        seq_len=shape.seq_len,
        dtype=shape.dtype,
        checkpointing=shape.checkpointing,
        device=device.type,
    )


def _err(pred: float, meas: float) -> float | None:
    return None if not meas else (pred - meas) / meas


def step_rows(
    results: list[BenchResult],
    device: torch.device,
    shapes: list[StepShape],
    *,
    instrument: bool = True,
    search: bool | None = None,
    deadline: float | None = None,
) -> list[dict]:
    """One row per timed step case: tokens/s, peak, the planner against one instrumented step, and
    on CUDA (``search``) the largest micro-batch each path fits."""
    search = device.type == "cuda" if search is None else search
    rows = []
    for r in results:
        if r.suite != "step" or r.kind == "peer":
            continue
        shape = shape_of_label(r.shape, shapes, r.op)
        if shape is None:
            continue
        path = "materializing" if r.kind == "baseline" else "fastalign"
        tokens = shape.tokens(r.op)
        row = {
            "algo": r.op,
            "model": shape.name,
            "path": path,
            "shape": r.shape,
            "attn": shape.attn,
            "tokens": tokens,
            "ms": r.median_ms,
            "tokens_per_s": None if not r.median_ms else tokens / (r.median_ms * 1e-3),
            "peak_mib": r.peak_mb,
            "error": r.error,
        }
        if r.error is None and instrument and (deadline is None or time.monotonic() < deadline):
            try:
                models, batch, _ = prepare(r.op, path, shape, device)
                meas = measure_terms(r.op, path, models, batch, device)
                del models, batch
                pred = predict(r.op, path, shape, device)
                row["measured"] = meas
                row["predicted"] = {k: pred[k] for k in ("activations", "logits", "peak")}
                row["planner_error"] = {k: _err(pred[k], meas[k]) for k in ("activations", "logits", "peak")}
            except Exception as exc:  # reported in the row, the table goes on
                row["instrument_error"] = f"{type(exc).__name__}: {str(exc)[:200]}"
            finally:
                gc.collect()
                if device.type == "cuda":
                    torch.cuda.empty_cache()
        if search and r.error is None:
            if deadline is not None and time.monotonic() > deadline:
                row["max_tokens"] = {"fits": None, "fails": None, "complete": False, "note": "out of time"}
            else:
                try:
                    row["max_tokens"] = max_tokens(r.op, path, shape, device, deadline=deadline)
                except Exception as exc:  # reported in the row, the table goes on
                    row["search_error"] = f"{type(exc).__name__}: {str(exc)[:200]}"
        rows.append(row)
    return rows


def _mib(x) -> str:
    return "-" if x is None else f"{x / 2**20:.1f}"


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:+.1f}%"


def markdown(rows: list[dict]) -> str:
    head = (
        "| algo | model | path | attn | tokens | ms | tokens/s | peak MiB | activations MiB (planner) | "
        "logits MiB (planner) | planner peak error | max tokens per device (planner) |\n"
        "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"
    )
    lines = [head]
    for r in rows:
        if r.get("error"):
            lines.append(
                f"| {r['algo']} | {r['model']} | {r['path']} | {r['attn']} | {r['tokens']} | error: {r['error']} ||||||"
            )
            continue
        m, p, e = r.get("measured", {}), r.get("predicted", {}), r.get("planner_error", {})
        mt = r.get("max_tokens")
        if mt is None:
            mts = "- (CUDA only)"
        elif mt.get("fits") is None:
            mts = mt.get("note", "-")
        else:
            bracket = f"fits {mt['fits']}" + ("" if mt["fails"] is None else f", fails {mt['fails']}")
            mts = bracket + ("" if mt["complete"] else " (search cut short)") + f"; planner {mt.get('predicted')}"
        tps = "-" if r["tokens_per_s"] is None else f"{r['tokens_per_s']:.0f}"
        ms = "-" if r["ms"] is None else f"{r['ms']:.1f}"
        peak = "-" if r["peak_mib"] is None else f"{r['peak_mib']:.1f}"
        act = f"{_mib(m.get('activations'))} ({_mib(p.get('activations'))}, {_pct(e.get('activations'))})"
        logits = f"{_mib(m.get('logits'))} ({_mib(p.get('logits'))}, {_pct(e.get('logits'))})"
        lines.append(
            f"| {r['algo']} | {r['model']} | {r['path']} | {r['attn']} | {r['tokens']} | {ms} | {tps} | {peak} | "
            f"{act} | {logits} | {_pct(e.get('peak'))} | {mts} |"
        )
    return "\n".join(lines)


def report(
    results: list[BenchResult],
    device: torch.device,
    info: dict,
    out_dir: Path | None,
    *,
    tag: str | None = None,
    quick: bool = False,
    shapes: list[StepShape] | None = None,
    deadline: float | None = None,
) -> list[dict]:
    """The step table for the step rows of ``results``: printed, and written to ``<tag>-step.{json,md}``."""
    from fastalign.bench.report import device_tag, machine_line

    rows = step_rows(results, device, shapes or default_shapes(device, quick), deadline=deadline)
    if not rows:
        return rows
    md = markdown(rows)
    print(md)
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        stem = f"{tag or device_tag(info)}-step"
        (out_dir / f"{stem}.json").write_text(json.dumps({"machine": info, "rows": rows}, indent=1, default=str))
        (out_dir / f"{stem}.md").write_text(
            f"# fastalign step suite: {stem}\n\nMachine: {machine_line(info)}\n\n"
            "Whole training steps (fastalign.bench.suites.step): peak is what the step adds on top of "
            "weights and gradients (allocated before it); activations / logits: one instrumented step "
            "(the planner's prediction and its error in brackets); max tokens: the largest micro-batch "
            "that ran (CUDA: doubling then bisection up to out-of-memory).\n\n" + md + "\n"
        )
    return rows

"""``gae`` (generalized advantage estimation with masks and dones) and ``masked_whiten``.

gae: input checks -> :mod:`fastalign.kernels.gae` (one launch, scan over time) or the torch path below
(a blocked reverse scan: no Python loop over tokens), chosen by :func:`fastalign._dispatch.select_impl`.
gae is not differentiable (advantages and returns are targets); masked_whiten is plain torch ops,
differentiable w.r.t. its input.
"""

from __future__ import annotations

import torch

from fastalign._dispatch import Impl, select_impl
from fastalign._validation import check_float, check_mask, check_number, check_same_device
from fastalign.kernels.dtypes import acc_dtype
from fastalign.ops._library import Op
from fastalign.ops._tokens import as_rows, check_token_mask, mask_u8

_OP = "gae"

# Torch path: the time axis is solved in blocks of this many steps (a doubling scan inside a block,
# then a doubling scan over the blocks' carries): O(log T) vectorized steps, fp32-accurate.
TORCH_GAE_BLOCK = 64


# ---- torch path ---------------------------------------------------------------------------------


def _reverse_scan_doubling(c: torch.Tensor, d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Along the last dim: maps composed right-to-left, ``(C_j, D_j)`` with ``X_j = D_j + C_j X_end``
    solving ``X_j = d_j + c_j X_{j+1}`` (Hillis-Steele doubling, ping-ponging two buffer pairs: the
    inputs are overwritten)."""
    n = c.shape[-1]
    c2, d2 = torch.empty_like(c), torch.empty_like(d)
    s = 1
    while s < n:
        torch.addcmul(d[..., : n - s], c[..., : n - s], d[..., s:], out=d2[..., : n - s])
        torch.mul(c[..., : n - s], c[..., s:], out=c2[..., : n - s])
        d2[..., n - s :] = d[..., n - s :]  # already complete: carried over
        c2[..., n - s :] = c[..., n - s :]
        c, d, c2, d2 = c2, d2, c, d
        s *= 2
    return c, d


def reverse_linear_scan(c: torch.Tensor, d: torch.Tensor, block: int = TORCH_GAE_BLOCK) -> torch.Tensor:
    """``X_t = d_t + c_t X_{t+1}`` over the last dim of ``[B, T]`` tensors, ``X_T = 0`` (c, d are overwritten)."""
    B, T = c.shape
    nb = -(-T // block)
    pad = nb * block - T
    if pad:  # identity maps past the end
        c = torch.cat([c, c.new_ones(B, pad)], 1)
        d = torch.cat([d, d.new_zeros(B, pad)], 1)
    c3, d3 = _reverse_scan_doubling(c.reshape(B, nb, block), d.reshape(B, nb, block))
    # carry into block k = X at the first step of block k + 1
    _, db = _reverse_scan_doubling(c3[:, :, 0].clone(), d3[:, :, 0].clone())  # (it reuses its inputs)
    carry = torch.cat([db[:, 1:], db.new_zeros(B, 1)], 1)
    x = torch.addcmul(d3, c3, carry[:, :, None])
    x = x.view(B, nb * block)
    return x[:, :T].contiguous() if pad else x


def gae_fwd_torch(rewards, values, mask, dones, next_values, gamma, lam, acc, *, has_mask=True, has_dones=True):
    B, T = rewards.shape
    if B * T == 0:
        return rewards.new_zeros((B, T), dtype=acc), rewards.new_zeros((B, T), dtype=acc)
    r = rewards.to(acc)
    v = values.to(acc)
    nv0 = next_values.to(acc)[:, None]
    if has_mask:
        valid = mask != 0
        pos = torch.arange(T, device=r.device)
        idx = torch.where(valid, pos, T)
        # index of the next valid step strictly after t (T when none)
        suffix_min = torch.flip(torch.cummin(torch.flip(idx, [1]), dim=1).values, [1])
        nxt = torch.cat([suffix_min[:, 1:], suffix_min.new_full((B, 1), T)], 1)
        nv = torch.where(nxt < T, v.gather(1, nxt.clamp(max=T - 1)), nv0)
    else:  # every step valid: the next value is simply V_{t+1}
        nv = torch.cat([v[:, 1:], nv0.expand(B, 1)], 1)
    if has_dones:
        not_done = (dones == 0).to(acc)
        delta = torch.addcmul(r - v, nv, not_done, value=gamma)
        c = not_done * (gamma * lam)
    else:
        delta = torch.add(r - v, nv, alpha=gamma)
        c = torch.full_like(delta, gamma * lam)
    if not has_mask:
        a = reverse_linear_scan(c, delta)
        return a, a + v
    c = torch.where(valid, c, 1.0)
    d = torch.where(valid, delta, 0.0)
    a = reverse_linear_scan(c, d)
    return torch.where(valid, a, 0.0), torch.where(valid, a + v, 0.0)


# ---- the registered op (fastalign::gae_fwd; not differentiable) ----------------------------------


def _gae_fwd_impl(
    rewards: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    dones: torch.Tensor,
    next_values: torch.Tensor,
    gamma: float,
    lam: float,
    backend: str,
    has_mask: bool,
    has_dones: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(advantages, returns)`` ``[B, T]`` in the accumulation dtype, from ``[B, T]`` rows."""
    acc = acc_dtype(rewards.dtype, values.dtype)
    if backend == "triton":
        from fastalign.kernels.gae import gae_fwd

        return gae_fwd(rewards, values, mask, dones, next_values, gamma, lam, acc)
    return gae_fwd_torch(
        rewards, values, mask, dones, next_values, gamma, lam, acc, has_mask=has_mask, has_dones=has_dones
    )


def _gae_fwd_fake(rewards, values, mask, dones, next_values, gamma, lam, backend, has_mask, has_dones):
    acc = acc_dtype(rewards.dtype, values.dtype)
    return rewards.new_empty(rewards.shape, dtype=acc), rewards.new_empty(rewards.shape, dtype=acc)


gae_fwd_op = Op("gae_fwd", _gae_fwd_impl, _gae_fwd_fake)


# ---- public functions ---------------------------------------------------------------------------


def gae(
    rewards: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    gamma: float = 1.0,
    lam: float = 0.95,
    dones: torch.Tensor | None = None,
    next_values: torch.Tensor | None = None,
    impl: Impl = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalized advantage estimation per row, with a token mask and episode ends.

    Reverse recurrence per row from ``nv = next_values`` (default 0), ``A = 0``: at a valid step
    (``mask`` 1) ``delta = r_t + gamma nv (1 - done_t) - V_t``, ``A = delta + gamma lam (1 - done_t) A``,
    ``nv = V_t``; a masked step carries ``nv`` and ``A`` unchanged and outputs 0 (so the "next value"
    of a step is the value of the next *valid* step: verl's mask-skip over multi-turn observation tokens).
    Equals the tutorial's ``compute_gae`` with ``values = V[:, :T]``, ``next_values = V[:, T]``, and verl's
    ``compute_gae_advantage_return`` (before whitening) at valid steps.

    Args:
        rewards: ``[..., T]`` float per-token rewards.
        values: ``[..., T]`` float value estimates ``V(s_t)``.
        mask: ``[..., T]`` bool or 0/1 numeric, or None (all valid).
        gamma: discount in ``[0, 1]``.
        lam: GAE lambda in ``[0, 1]``.
        dones: ``[..., T]`` bool or 0/1 numeric, or None: 1 where the episode ends at step t (no
            bootstrap from the next value, no carry of A across it). Ignored at masked steps.
        next_values: ``[...]`` or ``[..., 1]`` float, or None (0): the bootstrap value past the last step.
        impl: ``"auto" | "triton" | "torch"`` (Triton: one launch; torch: blocked scan, no Python
            loop over tokens).

    Returns:
        ``(advantages, returns)``, each ``[..., T]`` fp32 (fp64 for fp64 inputs); ``returns = A + V``
        at valid steps; both 0 at masked steps. Not differentiable.

    Example:
        >>> import torch, fastalign
        >>> adv, ret = fastalign.gae(torch.tensor([[0.0, 0.0, 1.0]]), torch.zeros(1, 3), gamma=1.0, lam=0.5)
        >>> adv.tolist()  # 1, then halved at each step back
        [[0.25, 0.5, 1.0]]
        >>> adv, ret = fastalign.gae(torch.tensor([[0.0, 1.0, 0.0]]), torch.full((1, 3), 0.5),
        ...                          torch.tensor([[1, 1, 0]]), gamma=1.0, lam=1.0)
        >>> adv.tolist(), ret.tolist()  # the masked last step: 0, and no bootstrap through it
        ([[0.5, 0.5, 0.0]], [[1.0, 1.0, 0.0]])
    """
    check_float(rewards, "rewards", _OP)
    check_float(values, "values", _OP)
    if rewards.dim() < 1:
        raise ValueError(f"{_OP}: rewards must have at least 1 dim [..., T], got a 0-dim tensor")
    shape = tuple(rewards.shape)
    if tuple(values.shape) != shape:
        raise ValueError(
            f"{_OP}: values must have the shape of rewards {shape}, got {tuple(values.shape)} "
            f"(pass values[:, :T] and next_values=values[:, T] for [B, T+1] values)"
        )
    if mask is not None:
        check_token_mask(mask, shape, "mask", _OP)
    if dones is not None:
        check_token_mask(dones, shape, "dones", _OP)
    lead = shape[:-1]
    if next_values is not None:
        check_float(next_values, "next_values", _OP)
        if tuple(next_values.shape) not in (lead, lead + (1,)):
            raise ValueError(
                f"{_OP}: next_values must have shape {lead} or {lead + (1,)}, got {tuple(next_values.shape)}"
            )
    gamma = check_number(gamma, "gamma", _OP, lo=0, hi=1)
    lam = check_number(lam, "lam", _OP, lo=0, hi=1)
    device = check_same_device(_OP, rewards=rewards, values=values, mask=mask, dones=dones, next_values=next_values)
    backend = select_impl(impl, device, op=_OP)
    acc = acc_dtype(rewards.dtype, values.dtype)

    r2, v2 = as_rows(rewards.detach()), as_rows(values.detach())
    B, T = r2.shape
    one_byte = torch.ones(1, 1, dtype=torch.uint8, device=device)
    m2 = one_byte.expand(B, T) if mask is None else as_rows(mask_u8(mask))
    d2 = (one_byte * 0).expand(B, T) if dones is None else as_rows(mask_u8(dones))
    if next_values is None:
        nv = torch.zeros(1, dtype=acc, device=device).expand(B)
    else:
        nv = next_values.detach().reshape(B).to(acc)
    with torch.no_grad():
        adv, ret = gae_fwd_op(r2, v2, m2, d2, nv, gamma, lam, backend, mask is not None, dones is not None)
    return adv.view(shape), ret.view(shape)


def masked_whiten(
    x: torch.Tensor, mask: torch.Tensor, *, unbiased: bool = True, eps: float = 1e-8, shift_mean: bool = True
) -> torch.Tensor:
    """``(x - mean_m) * rsqrt(var_m + eps)`` with the mean / variance over the elements where ``mask`` is 1.

    As TRL's and verl's ``masked_whiten``: the formula is applied to *every* element (multiply by the
    mask afterwards if masked positions must be 0); ``shift_mean=False`` adds ``mean_m`` back;
    ``unbiased`` applies the Bessel factor ``n / (n - 1)``. Unlike them it never raises for ``n <= 1``
    (that check would need a host sync): with ``n = 0`` the mean is 0, with ``n <= 1`` no Bessel factor.
    Torch ops on every device (two reductions and one elementwise pass); differentiable w.r.t. ``x``.

    Args:
        x: ``[...]`` float tensor.
        mask: ``[...]`` bool or 0/1 numeric, same shape.
        unbiased: Bessel-corrected variance (TRL / verl default).
        eps: ``>= 0``, added to the variance.
        shift_mean: False keeps the mean (whitens the scale only).

    Returns:
        ``[...]`` fp32 (fp64 for fp64 ``x``).

    Example:
        >>> import torch, fastalign
        >>> x, mask = torch.tensor([1.0, 2.0, 3.0, 100.0]), torch.tensor([1, 1, 1, 0])
        >>> [round(v, 4) for v in fastalign.masked_whiten(x, mask).tolist()]  # mean 2, Bessel var 1
        [-1.0, 0.0, 1.0, 98.0]
        >>> [round(v, 4) for v in fastalign.masked_whiten(x, mask, shift_mean=False).tolist()]
        [1.0, 2.0, 3.0, 100.0]
    """
    op = "masked_whiten"
    check_float(x, "x", op)
    check_mask(mask, "mask", op)
    if tuple(mask.shape) != tuple(x.shape):
        raise ValueError(f"{op}: mask must have the shape of x {tuple(x.shape)}, got {tuple(mask.shape)}")
    eps = check_number(eps, "eps", op, lo=0)
    check_same_device(op, x=x, mask=mask)
    acc = acc_dtype(x.dtype)
    xf = x.to(acc)
    m = mask != 0
    n = m.sum().to(acc)
    mean = torch.where(m, xf, 0.0).sum() / n.clamp(min=1.0)
    centered = xf - mean
    var = torch.where(m, centered * centered, 0.0).sum() / n.clamp(min=1.0)
    if unbiased:
        var = var * torch.where(n > 1, n / (n - 1.0).clamp(min=1.0), 1.0)
    out = centered * torch.rsqrt(var + eps)
    return out + mean if not shift_mean else out

"""The online-logsumexp helpers every vocabulary kernel reuses.

State per row, over the columns seen so far (x already transformed: softcapped, scaled by
1 / temperature, fp32 or fp64):
  m: running max;  s = sum exp(x - m);  t = sum exp(x - m) * (x - m)   (only for entropy);
  q = sum exp(2 (x - m))   (only for log sum_v p_v^2: a second online logsumexp, of 2x).
Then lse = m + log(s), entropy = log(s) - t / s (= lse - E_p[x]) and
log sum_v p_v^2 = logsumexp(2x) - 2 lse = log(q) - 2 log(s); t is kept relative to m so the entropy
does not lose digits to cancellation when logits sit far from zero.
Masked lanes must hold -inf. A row with no unmasked lane keeps s = 0 and the caller masks it.
"""

import triton
import triton.language as tl


@triton.jit
def stable_tanh(u):
    """tanh from exp of a non-positive argument: no overflow, exact sign (the softcap's c * tanh(z / c))."""
    e = tl.exp(-2.0 * tl.abs(u))
    th = (1.0 - e) / (1.0 + e)
    return tl.where(u < 0, -th, th)


@triton.jit
def online_lse_update_sq(m, s, t, q, x, TRACK_ENTROPY: tl.constexpr, TRACK_SQ: tl.constexpr):
    """Fold a [R, C] block ``x`` into the running (m, s, t, q) of shape [R]; reduction over axis 1.
    ``q`` (sum exp(2 (x - m))) is rescaled by alpha^2 when the max moves."""
    m_new = tl.maximum(m, tl.max(x, axis=1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # all -inf so far: avoid inf - inf
    alpha = tl.exp(m - m_safe)
    xs = x - m_safe[:, None]
    e = tl.exp(xs)
    s_new = s * alpha + tl.sum(e, axis=1)
    if TRACK_ENTROPY:
        shift = tl.where(s > 0, (m_safe - m) * s, 0.0)
        t = alpha * (t - shift) + tl.sum(tl.where(e > 0, e * xs, 0.0), axis=1)
    if TRACK_SQ:
        q = q * (alpha * alpha) + tl.sum(e * e, axis=1)
    return m_new, s_new, t, q


@triton.jit
def online_lse_update(m, s, t, x, TRACK_ENTROPY: tl.constexpr):
    """Fold a [R, C] block ``x`` into the running (m, s, t) of shape [R]; reduction over axis 1."""
    m_new, s_new, t, _ = online_lse_update_sq(m, s, t, s, x, TRACK_ENTROPY, False)
    return m_new, s_new, t


@triton.jit
def online_lse_finalize(m, s, t):
    """(lse, entropy) from the running state; rows with s == 0 give lse = -inf (mask them)."""
    log_s = tl.log(s)
    lse = m + log_s
    entropy = log_s - t / s
    return lse, entropy

"""group_advantages against fp64 references from the formulas, the tutorial, TRL and verl."""

import pytest
import torch
from formulas import group_advantages_fp64 as ref_group_adv

import fastalign
from fastalign import group_advantages
from fastalign.reference.tutorial_ops import tutorial_group_advantages

IMPLS = ["torch", "triton", "triton-tiny"]


@pytest.fixture
def run(monkeypatch):
    """group_advantages with impl "triton-tiny" = the Triton kernels with tiny tiles: 4-position blocks
    (8-lane windows: most groups take the long-run walk) and batch-std chunks of several 8-lane blocks."""
    from fastalign.kernels import tuning

    def call(*args, impl, **kwargs):
        if impl == "triton-tiny":
            monkeypatch.setattr(tuning, "GROUP_ADV_CONFIGS", (tuning.RowConfig(4, 1),))
            monkeypatch.setattr(tuning, "GROUP_ADV_BATCH_CONFIG", tuning.RowConfig(8, 1))
            monkeypatch.setattr(tuning, "GROUP_ADV_BATCH_PARTS", 4)
            impl = "triton"
        return group_advantages(*args, impl=impl, **kwargs)

    return call


def _data(n_groups=7, seed=0, nan=False, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    sizes = torch.randint(1, 9, (n_groups,), generator=g)
    sizes[0] = 1  # a singleton
    raw_ids = torch.randint(-(10**12), 10**12, (n_groups,), generator=g)  # arbitrary int64 values
    ids = torch.repeat_interleave(raw_ids, sizes)
    perm = torch.randperm(ids.numel(), generator=g)
    ids = ids[perm]
    r = torch.randn(ids.numel(), generator=g, dtype=torch.float64)
    if nan:
        r[torch.rand(ids.numel(), generator=g) < 0.2] = float("nan")
    return r.to(dtype), ids


OPTS = [
    dict(),
    dict(baseline="loo"),
    dict(scale="batch"),
    dict(scale="none"),
    dict(unbiased=True, eps=1e-4),
    dict(baseline="loo", scale="batch", unbiased=True),
    dict(singleton="raw", unbiased=True, eps=1e-6),
    dict(singleton="raw", scale="none"),
]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("opts", OPTS)
@pytest.mark.parametrize("nan", [False, True])
def test_matches_reference_with_ids(run, impl, opts, nan):
    r, ids = _data(n_groups=23, seed=1, nan=nan)  # ~100 samples: crosses the kernel's block
    out = run(r, ids, impl=impl, **opts)
    assert out.dtype == torch.float32 and out.shape == r.shape
    torch.testing.assert_close(out.double(), ref_group_adv(r, ids, **opts), rtol=1e-5, atol=1e-5)
    assert (out[torch.isnan(r)] == 0).all()


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("opts", OPTS[:5])
@pytest.mark.parametrize("group_size", [1, 4, 24])
def test_group_size_path(run, impl, opts, group_size):
    g = torch.Generator().manual_seed(group_size)
    r = torch.randn(group_size * 6, generator=g)
    r[3] = float("nan")
    out = run(r, group_size=group_size, impl=impl, **opts)
    ids = torch.arange(r.numel()) // group_size
    torch.testing.assert_close(out.double(), ref_group_adv(r, ids, **opts), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out, run(r, ids, impl=impl, **opts), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("impl", IMPLS)
def test_equals_tutorial_scatter_formula(run, impl):
    g = torch.Generator().manual_seed(3)
    sizes = torch.randint(1, 8, (12,), generator=g)
    gid = torch.repeat_interleave(torch.arange(12), sizes)[torch.randperm(int(sizes.sum()), generator=g)]
    r = torch.randn(gid.numel(), generator=g)
    torch.testing.assert_close(run(r, gid, impl=impl), tutorial_group_advantages(r, gid), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("impl", IMPLS)
def test_trl_formula(run, impl):
    """TRL: (r - nanmean_g) / (nanstd_g (Bessel) + 1e-4), contiguous groups of num_generations."""
    G = 8
    g = torch.Generator().manual_seed(4)
    r = torch.randn(5 * G, generator=g)
    r[[2, 17, 18]] = float("nan")
    grouped = r.view(-1, G)
    mean = torch.nanmean(grouped, dim=1, keepdim=True)
    count = (~torch.isnan(grouped)).sum(1, keepdim=True)
    var = torch.nanmean((grouped - mean) ** 2, dim=1, keepdim=True) * count / (count - 1)
    expect = ((grouped - mean) / (var.sqrt() + 1e-4)).view(-1)
    out = run(r, group_size=G, unbiased=True, eps=1e-4, impl=impl)
    ok = ~torch.isnan(r)
    torch.testing.assert_close(out[ok], expect[ok], rtol=1e-5, atol=1e-5)
    assert (out[~ok] == 0).all()


def verl_grpo_loop(scores, index, epsilon=1e-6, norm_adv_by_std_in_grpo=True):
    """verl compute_grpo_outcome_advantage (loop form): singleton -> mean 0, std 1; torch.std (Bessel)."""
    groups = {}
    for i in range(len(index)):
        groups.setdefault(index[i], []).append(scores[i])
    mean, std = {}, {}
    for k, v in groups.items():
        if len(v) == 1:
            mean[k], std[k] = torch.tensor(0.0), torch.tensor(1.0)
        else:
            t = torch.stack(v)
            mean[k], std[k] = t.mean(), t.std()
    out = scores.clone()
    for i in range(len(index)):
        k = index[i]
        out[i] = (scores[i] - mean[k]) / (std[k] + epsilon) if norm_adv_by_std_in_grpo else scores[i] - mean[k]
    return out


def verl_grpo_vectorized(scores, g, epsilon=1e-6, norm_adv_by_std_in_grpo=True):
    """verl's vectorized GRPO: index_add stats, std = sqrt(max(var_bessel, eps)), singleton mean 0 / std 1."""
    G = int(g.max()) + 1
    cnt = torch.zeros(G).index_add_(0, g, torch.ones_like(scores))
    s1 = torch.zeros(G).index_add_(0, g, scores)
    s2 = torch.zeros(G).index_add_(0, g, scores * scores)
    mean = s1 / cnt.clamp_min(1.0)
    var = (s2 - s1 * s1 / cnt.clamp_min(1.0)) / (cnt - 1.0).clamp_min(1.0)
    std = torch.sqrt(torch.clamp(var, min=epsilon))
    single = cnt <= 1
    mean[single], std[single] = 0.0, 1.0
    if norm_adv_by_std_in_grpo:
        return (scores - mean[g]) / (std[g] + epsilon)
    return scores - mean[g]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("norm", [True, False])
def test_verl_grpo(run, impl, norm):
    g = torch.Generator().manual_seed(5)
    sizes = torch.tensor([1, 5, 3, 1, 8, 2])
    index = torch.repeat_interleave(torch.arange(6), sizes)[torch.randperm(20, generator=g)]
    scores = torch.randn(20, generator=g)  # group variances well above verl's 1e-6 floor
    opts = dict(unbiased=True, eps=1e-6, singleton="raw", scale="group" if norm else "none")
    out = run(scores, index, impl=impl, **opts)
    torch.testing.assert_close(out, verl_grpo_loop(scores, index.tolist(), 1e-6, norm), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out, verl_grpo_vectorized(scores, index, 1e-6, norm), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("impl", IMPLS)
def test_constant_groups_all_nan_and_fp64(run, impl):
    r = torch.tensor([1.0, 1.0, 1.0, float("nan"), float("nan"), 2.0, 5.0], dtype=torch.float64)
    ids = torch.tensor([0, 0, 0, 1, 1, 2, 2])
    out = run(r, ids, impl=impl)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, ref_group_adv(r, ids), rtol=1e-12, atol=1e-12)
    assert (out[:5] == 0).all()


@pytest.mark.parametrize("impl", IMPLS)
def test_empty_and_no_grad(run, impl):
    assert run(torch.zeros(0), torch.zeros(0, dtype=torch.long), impl=impl).shape == (0,)
    r = torch.randn(6, requires_grad=True)
    assert not run(r, group_size=3, impl=impl).requires_grad


def test_bad_input():
    r = torch.randn(6)
    ids = torch.arange(6) // 2
    with pytest.raises(ValueError, match="group_ids must have shape"):
        group_advantages(r, ids[:5])
    with pytest.raises(TypeError, match="integer"):
        group_advantages(r, ids.float())
    with pytest.raises(TypeError, match="floating"):
        group_advantages(r.long(), ids)
    with pytest.raises(ValueError, match="exactly one"):
        group_advantages(r)
    with pytest.raises(ValueError, match="exactly one"):
        group_advantages(r, ids, group_size=2)
    with pytest.raises(ValueError, match="multiple of group_size"):
        group_advantages(r, group_size=4)
    with pytest.raises(ValueError, match="eps"):
        group_advantages(r, ids, eps=-1e-8)
    with pytest.raises(ValueError, match="baseline"):
        group_advantages(r, ids, baseline="median")
    with pytest.raises(ValueError, match="scale"):
        group_advantages(r, ids, scale="global")
    with pytest.raises(ValueError, match="1-D"):
        group_advantages(r.view(2, 3), group_size=3)


def test_exported():
    assert fastalign.group_advantages is group_advantages


@pytest.mark.parametrize("impl", IMPLS)
def test_groups_larger_than_a_block(run, impl):
    g = torch.Generator().manual_seed(8)
    ids = torch.cat([torch.full((150,), 7), torch.full((70,), -3), torch.arange(100, 105)])
    ids = ids[torch.randperm(ids.numel(), generator=g)]
    r = torch.randn(ids.numel(), generator=g)
    for opts in (dict(), dict(baseline="loo", unbiased=True)):
        out = run(r, ids, impl=impl, **opts)
        torch.testing.assert_close(out.double(), ref_group_adv(r, ids, **opts), rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("n_groups", [100, 5000])  # N ~ 450 (2 programs) and ~22500 (88)
@pytest.mark.parametrize(
    "opts", [dict(), dict(baseline="loo", scale="batch", unbiased=True), dict(singleton="raw", unbiased=True, eps=1e-6)]
)
def test_cuda_matches_torch_path(n_groups, opts):
    r, ids = _data(n_groups=n_groups, seed=2, nan=True)
    out = group_advantages(r.cuda(), ids.cuda(), **opts)
    expect = group_advantages(r.double(), ids, impl="torch", **opts)
    torch.testing.assert_close(out.cpu().double(), expect, rtol=1e-5, atol=1e-5)
    out = group_advantages(r[: 16 * (r.numel() // 16)].cuda(), group_size=16, **opts)
    expect = group_advantages(r[: 16 * (r.numel() // 16)].double(), group_size=16, impl="torch", **opts)
    torch.testing.assert_close(out.cpu().double(), expect, rtol=1e-5, atol=1e-5)


# ---- run order (the Triton kernel's windows) and the torch path's relabelling ---------------------
# The default Triton block is 256 positions (512-lane windows): a group is walked as a long run when
# it does not end in its owner's window. "triton-tiny" (4 / 8) gets small data: the interpreter runs
# its many programs one by one.


def _shuffled_groups(sizes, seed, nan=0.0, ids=None):
    """fp64 rewards (a share NaN) and shuffled ids for groups of the given sizes (ids 0.. unless given)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.arange(len(sizes)) if ids is None else torch.as_tensor(ids)
    gid = torch.repeat_interleave(ids, torch.as_tensor(sizes))
    gid = gid[torch.randperm(gid.numel(), generator=g)]
    r = torch.randn(gid.numel(), generator=g, dtype=torch.float64)
    r[torch.rand(gid.numel(), generator=g) < nan] = float("nan")
    return r, gid


def _check(out, r, ids, tol=1e-10, **opts):
    torch.testing.assert_close(out.double(), ref_group_adv(r, ids, **opts), rtol=tol, atol=tol)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize(
    "opts", [dict(), dict(baseline="loo", scale="batch", unbiased=True, singleton="raw"), dict(scale="none", eps=0.0)]
)
def test_runs_longer_than_the_window(run, impl, opts):
    """Ids 0 and 1 sorted first: the group of 400 starts at position 200 and ends past its owner's
    window (the tiny tiles: 20 and 40); pairs and singletons after; some NaN."""
    big, small = ([200, 400], [20, 40]) if impl != "triton-tiny" else ([20, 40], [3, 1])
    r, ids = _shuffled_groups(big + [2] * small[0] + [1] * small[1], seed=11, nan=0.05)
    out = run(r.float(), ids, impl=impl, **opts)
    _check(out, r.float(), ids, tol=1e-5, **opts)
    assert (out[torch.isnan(r)] == 0).all()


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("opts", [dict(), dict(baseline="loo"), dict(singleton="raw", scale="batch")])
def test_one_group_and_all_singletons(run, impl, opts):
    n = 520 if impl != "triton-tiny" else 40
    r, ids = _shuffled_groups([n], seed=12, ids=[-5])  # one group, past any window
    _check(run(r, ids, impl=impl, **opts), r, ids, **opts)
    r, ids = _shuffled_groups([1] * (n // 2), seed=13)
    out = run(r, ids, impl=impl, **opts)
    _check(out, r, ids, **opts)
    if opts.get("singleton") != "raw":
        assert (out == 0).all()


@pytest.mark.parametrize(
    "impl,n",
    [(impl, n) for impl in IMPLS[:2] for n in (1, 255, 256, 257, 511, 512, 513)]
    + [("triton-tiny", n) for n in (1, 2, 7, 8, 9, 17)],
)
def test_sizes_around_the_block(run, impl, n):
    """N at and past a block and a window, groups of 1..20, some NaN."""
    g = torch.Generator().manual_seed(n)
    sizes = torch.randint(1, 21, (n,), generator=g)
    sizes = sizes[: int((sizes.cumsum(0) < n).sum()) + 1]
    sizes[-1] -= int(sizes.sum()) - n
    r, ids = _shuffled_groups(sizes.tolist(), seed=n, nan=0.1)
    opts = dict(singleton="raw", unbiased=True)
    out = run(r, ids, impl=impl, **opts)
    assert out.shape == (n,) and out.dtype == torch.float64
    _check(out, r, ids, **opts)


@pytest.mark.parametrize("impl", IMPLS)
def test_extreme_and_narrow_ids(run, impl):
    """int64 ids at both ends of the range (sorted / relabelled by torch.unique), int32 and uint8 ids."""
    big = [-(2**63), -(2**62) + 5, -1, 0, 2**62, 2**63 - 1]
    r, ids = _shuffled_groups([3, 1, 4, 2, 5, 3], seed=14, ids=big)
    _check(run(r, ids, impl=impl), r, ids)
    r, ids = _shuffled_groups([3, 1, 4, 2, 5, 3], seed=15, ids=[7, 0, 200, 3, 9, 100])
    for dtype in (torch.int32, torch.uint8):
        _check(run(r, ids.to(dtype), impl=impl), r, ids)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("opts", OPTS)
def test_mostly_nan(run, impl, opts):
    """Half the rewards NaN: groups left with one valid member or none, a larger group with NaNs."""
    r, ids = _shuffled_groups([1, 2, 3, 4, 40, 2, 1, 30], seed=16, nan=0.5)
    out = run(r, ids, impl=impl, **opts)
    _check(out, r, ids, **opts)
    assert (out[torch.isnan(r)] == 0).all()


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("opts", [dict(), dict(baseline="loo", scale="batch", unbiased=True)])
def test_contiguous_groups_longer_than_the_window(run, impl, opts):
    size = 520 if impl != "triton-tiny" else 10
    g = torch.Generator().manual_seed(17)
    r = torch.randn(2 * size, generator=g, dtype=torch.float64)
    r[torch.rand(2 * size, generator=g) < 0.1] = float("nan")
    out = run(r, group_size=size, impl=impl, **opts)
    _check(out, r, torch.arange(2 * size) // size, **opts)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("group_size", [1, 5])
@pytest.mark.parametrize(
    "opts", [dict(), dict(baseline="loo", scale="batch", unbiased=True), dict(singleton="raw", scale="none")]
)
def test_group_size_without_nan(run, impl, group_size, opts):
    """No NaN: the torch path keeps to the [G, size] view (no labels)."""
    r = torch.randn(6 * group_size, generator=torch.Generator().manual_seed(group_size), dtype=torch.float64)
    _check(run(r, group_size=group_size, impl=impl, **opts), r, torch.arange(r.numel()) // group_size, **opts)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("opts", [dict(), dict(scale="batch"), dict(baseline="loo", unbiased=True)])
def test_bitwise_deterministic(run, impl, opts):
    sizes = [400] + [16] * 10 + [1] * 9 if impl != "triton-tiny" else [30] + [6] * 5 + [1] * 3
    r, ids = _shuffled_groups(sizes, seed=18, nan=0.02)
    r = r.float()
    a, b = run(r, ids, impl=impl, **opts), run(r.clone(), ids.clone(), impl=impl, **opts)
    assert torch.equal(a.view(torch.int32), b.view(torch.int32))


@pytest.mark.parametrize("baseline", ["mean", "loo"])
@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_triton_equals_torch_path(baseline, scale):
    """fp64, groups of 1..30 with some NaN, both singleton rules and stds: the two backends agree."""
    sizes = torch.randint(1, 31, (16,), generator=torch.Generator().manual_seed(19)).tolist()
    r, ids = _shuffled_groups(sizes, seed=19, nan=0.05)
    for unbiased, singleton in ((False, "zero"), (True, "raw")):
        opts = dict(baseline=baseline, scale=scale, unbiased=unbiased, singleton=singleton, eps=1e-6)
        torch.testing.assert_close(
            group_advantages(r, ids, impl="triton", **opts),
            group_advantages(r, ids, impl="torch", **opts),
            rtol=1e-12,
            atol=1e-12,
        )

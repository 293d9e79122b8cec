"""fastalign's ``torch.library`` registrations: :class:`Op`, one custom op ``fastalign::<name>`` with
its fake (meta) function and, for the differentiable ones, its autograd formula.

Every op's forward (and backward, where it has one) is such an op: ``fastalign::logprobs_fwd`` /
``fastalign::logprobs_bwd``, ``fastalign::kl_fwd`` / ``kl_bwd``, ``surrogate_fwd`` / ``surrogate_bwd``,
``gae_fwd``, ``group_advantages_fwd``, ``linear_logprobs_fwd`` / ``linear_logprobs_bwd`` and the fused
losses' ``fused_token_loss_fwd`` (docs/contract.md, "torch.compile and CUDA graphs"). The public
functions check their inputs and resolve every setting (``fastalign.get_config()``, the backend)
in Python, then call the op with tensors, numbers, bools and strings only; everything
data-dependent (row compaction, tile walks, Triton launches) runs inside the op's body, which
``torch.compile`` treats as opaque: its fake function gives the output shapes from the input
shapes alone, so a compiled graph has no data-dependent shapes and no graph break.

Dispatch cost: calling a ``torch.library`` op goes through the dispatcher and the generated autograd
wrapper (tens of microseconds per call on a CPU). Outside tracing, :meth:`Op.__call__` therefore runs
the same Python body through a plain ``torch.autograd.Function`` (the same ``setup_context`` and
``backward``), and the registered op only while ``torch.compile`` / ``torch.export`` traces, or for
fake / subclass tensors (``make_fx``, ``FakeTensorMode``, AOTAutograd's backward trace): same code,
same values, no eager overhead. ``Op.op`` is the ``torch.ops.fastalign.<name>.default`` overload
(``torch.library.opcheck`` runs on it in the tests).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch

NAMESPACE = "fastalign"
_PLAIN = (torch.Tensor, torch.nn.Parameter)


def tracing(args) -> bool:
    """True when a call must go through the registered op: under ``torch.compile`` / ``torch.export``,
    in a ``FakeTensorMode``, or with tensor subclasses (fake / functional tensors of a trace)."""
    if torch.compiler.is_compiling():
        return True
    if torch._C._get_dispatch_mode(torch._C._TorchDispatchModeKey.FAKE) is not None:
        return True
    return any(isinstance(a, torch.Tensor) and type(a) not in _PLAIN for a in args)


class Op:
    """``fastalign::<name>``: ``impl`` (annotated: the schema is inferred from it) registered with
    ``torch.library.custom_op``, ``fake`` as its fake function and, when given, ``backward`` /
    ``setup_context`` as its autograd formula (``torch.library.register_autograd``'s signatures).

    ``op(*args)`` calls it (positional arguments, in ``impl``'s order): the registered op while
    tracing (:func:`tracing`), else ``impl`` itself through an equivalent ``autograd.Function``."""

    def __init__(
        self,
        name: str,
        impl: Callable,
        fake: Callable,
        *,
        backward: Callable | None = None,
        setup_context: Callable | None = None,
    ):
        self.name = name
        self.impl = impl
        self.custom = torch.library.custom_op(f"{NAMESPACE}::{name}", mutates_args=())(impl)
        self.custom.register_fake(fake)
        self.eager = None
        if backward is not None:
            self.custom.register_autograd(backward, setup_context=setup_context)
            self.eager = _eager_function(name, impl, backward, setup_context)
        self.op = getattr(getattr(torch.ops, NAMESPACE), name).default

    def __call__(self, *args):
        if tracing(args):
            return self.op(*args)
        if self.eager is not None and torch.is_grad_enabled() and _any_requires_grad(args):
            return self.eager.apply(*args)
        return self.impl(*args)


@contextlib.contextmanager
def autograd_inside():
    """Grad mode and the autograd dispatch keys back on inside an op's body: a registered op's body runs
    below autograd (its keys excluded), so a body that differentiates something of its own (the fused
    losses' per-token loss gradient) re-enables them; outside a registered op only grad mode changes."""
    keys = torch._C.DispatchKey
    with contextlib.ExitStack() as stack:
        for k in (keys.AutogradFunctionality, keys.AutogradOther, keys.ADInplaceOrView):
            stack.enter_context(torch._C._SetExcludeDispatchKeyGuard(k, False))
        stack.enter_context(torch.enable_grad())
        yield


def _any_requires_grad(args) -> bool:
    return any(isinstance(a, torch.Tensor) and a.requires_grad for a in args)


def _eager_function(name: str, impl: Callable, backward: Callable, setup_context: Callable | None):
    """The eager twin of a registered op: an ``autograd.Function`` with the same body, context and formula."""

    def forward(ctx, *args):
        out = impl(*args)
        if setup_context is not None:
            setup_context(ctx, args, out)
        return out

    def bwd(ctx, *grads):
        return backward(ctx, *grads)

    cls_name = "".join(p.capitalize() for p in name.split("_")) + "Function"
    return type(cls_name, (torch.autograd.Function,), {"forward": staticmethod(forward), "backward": staticmethod(bwd)})

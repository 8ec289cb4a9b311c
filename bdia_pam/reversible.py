"""ReversibleStack: BDIA forward, bit-exact inverse and a backward pass that recomputes.

Given residual branches h_0 .. h_{K-1} (each ``nn.Module`` maps x to h_k(x), the branch,
not x + h(x)), the stack computes on the 2^-l grid (:mod:`bdia_pam.quant`, X = x 2^l):

    x_0 = Q_l[input]
    x_1 = x_0 + Q_l[h_0(x_0)]
    x_{k+1} = Q_l[g_k (x_{k-1} + s_{k-1} 2^-l)] + Q_l[(1 - g_k) x_k + (1 + g_k) h_k(x_k)]

for k = 1 .. K-1, with g_k = +-0.5 per sample and s_{k-1} the parity bit of X_{k-1}. The
first term is an exact integer shift (X_{k-1} + s_{k-1} is even); the second is rounded
once, half to even, from its exact real value (:func:`bdia_pam.quant.bdia_combine`). So

    X_{k-1} = (X_{k+1} - Q_l[(1 - g_k) x_k + (1 + g_k) h_k(x_k)]) / g_k - s_{k-1}

recovers every activation from (x_K, x_{K-1}), the side bits and gamma, provided each
h_k(x_k) is recomputed bit for bit. Training therefore keeps only those (a
:class:`ForwardRecord`) and recomputes the rest during the backward pass. Eval mode uses
E[g] = 0: x_{k+1} = x_k + Q_l[h_k(x_k)].

Autograd sees one node per block (:class:`_BlockNode`, block parameters as its inputs):
the forward runs without a graph, and the backward of node k re-runs h_k(x_k) with grad
enabled, takes its VJP with :func:`torch.autograd.grad`, recovers x_{k-1} and returns the
block's parameter gradients, which the engine accumulates into ``.grad`` as usual. Live
memory during training is therefore a few activations plus one block's graph,
independent of depth, plus the record (side bits: 1/32 of a float activation per block).

Gradients use the straight-through rule for every rounding (dQ(u)/du = 1):
dx_{k+1}/dx_{k-1} = g_k, dx_{k+1}/dx_k = (1 - g_k) + (1 + g_k) dh_k/dx_k. Scaling by 0.5
is an exponent decrement (exact), by 1.5 is one correctly rounded float32 result; no float
multiply or divide is issued by the stack's own code (blocks run whatever they run).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch import nn

from pam._internal import without_layers

from . import quant
from .quant import GridRangeError

#: dtype of the grid state kept by the reversible path (|X| < 2^24 fits; half of int64)
_GRID = torch.int32

__all__ = ["ReversibleStack", "ForwardRecord", "NonDeterministicBlockError", "GridRangeError"]


class NonDeterministicBlockError(RuntimeError):
    """Recomputing a block during the backward pass (or inverse) did not reproduce its bits."""


@dataclass
class ForwardRecord:
    """Everything needed to invert a BDIA forward pass, and nothing else.

    x_last, x_prev: x_K and x_{K-1} (float32, exactly on the 2^-l grid; x_prev is x_0 when
    K = 1). side_bits: uint8 (K-1, ceil(numel/8)), row k-1 holds s_{k-1} (parity of
    X_{k-1}) packed 8 per byte. gamma_bits: uint8 (K-1, ceil(batch/8)), bit set where
    gamma = +0.5. checksums: int64 (K+1,), :func:`bdia_pam.quant.checksum` of X_0 .. X_K.
    rng_states: per block, the (CPU, CUDA-or-None) RNG states captured just before the
    block ran, or None when RNG preservation was off. frac_bits: the grid. autocast: the
    autocast state of the forward (:func:`_autocast_state`), replayed when blocks are re-run.
    """
    x_last: Optional[torch.Tensor]
    x_prev: torch.Tensor
    side_bits: torch.Tensor
    gamma_bits: torch.Tensor
    checksums: torch.Tensor
    rng_states: Optional[list]
    frac_bits: int
    autocast: Optional[tuple] = None

    @property
    def num_blocks(self) -> int:
        return self.checksums.numel() - 1

    @property
    def gamma(self) -> torch.Tensor:
        """Unpacked gamma, float32 (batch, K-1) of +-0.5."""
        batch = self.x_prev.shape[0]
        rows = [quant.unpack_bits(row, batch) for row in self.gamma_bits]
        if not rows:
            return torch.zeros(batch, 0, device=self.x_prev.device)
        bits = torch.stack(rows, dim=1)
        half = torch.full(bits.shape, 0.5, device=bits.device)
        return torch.where(bits.bool(), half, -half)

    def side_bit_tensor(self, k: int) -> torch.Tensor:
        """s_k (parity of X_k) as an int64 tensor shaped like x, for k = 0 .. K-2."""
        return quant.unpack_bits(self.side_bits[k], self.x_prev.numel()).view(self.x_prev.shape)


def _autocast_state(device) -> tuple:
    """((device_type, enabled, dtype), ...) for the CPU and ``device``'s type, the cache flag,
    and the spec of the active ``pam.arithmetic`` context (None outside one)."""
    import pam.mode
    types = ["cpu"] + ([device.type] if device.type != "cpu" else [])
    arith = pam.mode.active()
    return (tuple((t, torch.is_autocast_enabled(t), torch.get_autocast_dtype(t)) for t in types),
            torch.is_autocast_cache_enabled(), None if arith is None else arith.spec)


class _Replay:
    """Context for re-running a block exactly as in the forward pass, without side effects.

    Re-enters the forward's autocast state (enabled or not, per device type) and its
    ``pam.arithmetic`` context (so a block's ops compute the same bits), and lets the block
    run on copies of its buffers, put back afterwards, so modules that update buffers in
    training (BatchNorm running statistics) count each batch once: in the forward, not again in
    the backward recompute or :meth:`ReversibleStack.inverse`. (Copies are swapped in rather
    than the originals restored in place, which would bump their autograd version.)"""

    def __init__(self, block: nn.Module, autocast):
        self.block, self.autocast = block, autocast

    def __enter__(self):
        from contextlib import ExitStack
        self.stack = ExitStack()
        if self.autocast is not None:
            per_type, cache, arith = self.autocast
            for t, enabled, dtype in per_type:
                self.stack.enter_context(torch.autocast(t, dtype=dtype, enabled=enabled, cache_enabled=cache))
            if arith is not None:
                import pam
                self.stack.enter_context(pam.arithmetic(**arith))
        self.swapped = []
        for m in self.block.modules():
            for name, b in list(m._buffers.items()):
                if b is not None:
                    self.swapped.append((m, name, b))
                    m._buffers[name] = b.clone()
        return self

    def __exit__(self, *exc):
        for m, name, b in self.swapped:
            m._buffers[name] = b
        self.swapped = []
        self.stack.close()
        return False


def _foreign_leaves(h: torch.Tensor, own) -> list:
    """Leaf tensors requiring grad that ``h``'s graph reaches other than those in ``own``.

    These are tensors a block reads from outside (a closed-over parameter of another module,
    a conditioning tensor, or the leaves behind a non-leaf one). Found by walking the graph
    from ``h`` (stopping at leaves)."""
    own_ids = {id(t) for t in own}
    found, seen, todo = [], set(), [h.grad_fn]
    while todo:
        node = todo.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        var = getattr(node, "variable", None)
        if var is not None:  # AccumulateGrad: a leaf
            if id(var) not in own_ids and all(v is not var for v in found):
                found.append(var)
            continue
        todo.extend(fn for fn, _ in node.next_functions)
    return found


@without_layers
def _gamma_pos_rows(gamma_bits: torch.Tensor, batch: int, ndim: int):
    """Per block k >= 1, a bool tensor (batch, 1, ..., 1) that is True where gamma = +0.5."""
    shape = (batch,) + (1,) * (ndim - 1)
    return [quant.unpack_bits(row, batch).bool().view(shape) for row in gamma_bits]


@without_layers
def _half(a: torch.Tensor) -> torch.Tensor:
    return quant.ldexp_exact(a, -1)


@without_layers
def _one_and_half(a: torch.Tensor) -> torch.Tensor:
    """float32(1.5 a), correctly rounded (= a * 1.5 in float32), without a float multiply."""
    a64 = a.to(torch.float64)
    return (a64 + quant._ldexp64(a64, -1)).to(a.dtype)


@without_layers
def _bdia_grads(a: torch.Tensor, gp: torch.Tensor):
    """(g a, (1 - g) a, (1 + g) a) for g = +0.5 where gp else -0.5."""
    h, oh = _half(a), _one_and_half(a)
    return torch.where(gp, h, -h), torch.where(gp, h, oh), torch.where(gp, oh, h)


# --- straight-through autograd steps (stored-activation reference and eval mode) ---------

class _QuantizeSTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, frac_bits, what):
        ctx.dtype = x.dtype
        return quant.from_grid(quant.to_grid(x, frac_bits, what), frac_bits)

    @staticmethod
    def backward(ctx, g):
        return g.to(ctx.dtype), None, None


class _ResidualSTE(torch.autograd.Function):
    """x + Q_l[h] on the grid; gradient 1 to both."""

    @staticmethod
    def forward(ctx, x, h, frac_bits, what):
        X = quant.to_grid(x, frac_bits, what)
        return quant.from_grid(quant.residual_step(X, h, frac_bits, what), frac_bits)

    @staticmethod
    def backward(ctx, a):
        return a, a, None, None


class _BDIAStepSTE(torch.autograd.Function):
    """Q_l[g (x_prev + s 2^-l)] + Q_l[(1 - g) x + (1 + g) h] with straight-through gradients."""

    @staticmethod
    def forward(ctx, x_prev, x, h, gp, frac_bits, what):
        Xp = quant.to_grid(x_prev, frac_bits, what)
        X = quant.to_grid(x, frac_bits, what)
        out = quant.gamma_term(Xp, quant.parity(Xp), gp) + quant.bdia_combine(X, h, gp, frac_bits, what)
        quant.check_grid(out, frac_bits, what)
        ctx.save_for_backward(gp)
        return quant.from_grid(out, frac_bits)

    @staticmethod
    def backward(ctx, a):
        (gp,) = ctx.saved_tensors
        ga, ma, pa = _bdia_grads(a, gp)
        return ga, ma, pa, None, None, None


# --- the reversible autograd graph: one node per block ------------------------------------

class _BlockNode(torch.autograd.Function):
    """Autograd node of block k in a reversible forward: ``(walk, k, carrier, *params_k)``.

    The whole BDIA forward has already run (no graph, only the :class:`ForwardRecord`);
    these nodes only chain the blocks for autograd. Node K-1 outputs x_K; the others output
    an empty "carrier" tensor feeding node k+1 (node 0 takes x0 itself). The backward of
    node k performs step k of the reverse walk (recover x_{k-1}, re-run h_k(x_k), VJP) and
    returns the gradients of block k's parameters, so the autograd engine accumulates them
    into ``.grad`` block by block (the standard pattern: parameters are inputs of the
    Function), and they are never all held at once."""

    @staticmethod
    def forward(ctx, walk, k, carrier, *params):
        ctx.walk, ctx.k = walk, k
        ctx.carrier_dtype = carrier.dtype
        if k == walk.num_blocks - 1:
            y = walk.take_output()
            ctx.save_for_backward(y)
            return y
        return torch.empty(0, device=carrier.device)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        walk, k = ctx.walk, ctx.k
        if k == walk.num_blocks - 1:
            (y,) = ctx.saved_tensors
            walk.start(y, grad_out)
        a0, param_grads = walk.step(k)
        if k == 0:
            carrier_grad = a0.to(ctx.carrier_dtype)
        else:
            carrier_grad = torch.zeros(0, dtype=ctx.carrier_dtype, device=grad_out.device)
        return (None, None, carrier_grad, *param_grads)


class ReversibleStack(nn.Module):
    """A stack of residual branches run as a BDIA exact bit-level reversible network.

    Args:
        blocks: non-empty sequence of ``nn.Module``; block k computes the residual branch
            h_k(x) (same shape as x, float32), not x + h_k(x).
        frac_bits: l, the grid 2^-l (int, 1..20; the paper uses 9). Activations must stay
            below 2^(24 - l) in magnitude (32768 at l = 9); beyond that a
            :class:`GridRangeError` names the block.
        reversible: True (default) recomputes activations in the backward pass; False keeps
            ordinary autograd with stored activations (same forward bits, same straight-
            through gradients up to float summation order): the reference for debugging.
        generator / seed: source of the training-mode gammas (at most one). Without either,
            gamma is drawn from torch's global RNG.
        preserve_rng_state: capture the RNG state before each block and restore it when
            the block is recomputed, so dropout replays (about 5 KB per block on CPU that
            drew random numbers since the previous block; blocks that draw nothing share).
        check_determinism: verify every recovered activation against the forward
            checksums and raise :class:`NonDeterministicBlockError` naming the block.

    Train mode: gamma = +-0.5 per sample (dim 0 of x) per block k >= 1, or pass ``gamma=``
    (shape (batch, K-1)). Eval mode: gamma = 0, x_{k+1} = x_k + Q_l[h_k(x_k)].

    Blocks are re-run (backward, :meth:`inverse`) as in the forward: under the forward's
    autocast state, and on copies of their buffers, so BatchNorm-like running statistics are
    updated once per forward. A block may read tensors from outside that require grad (a
    closed-over parameter of another module, a conditioning tensor): they get the stored-mode
    gradient, accumulated into ``.grad`` during the recompute; for one computed outside the
    stack (non-leaf), the graph behind it is walked once per block that reads it and retained
    until the tensor is freed. In train mode with grad enabled the output always takes part in
    autograd (such tensors are only seen when blocks re-run).

    Why gradients equal the stored-activation ones only up to rounding: both compute the
    same straight-through chain rule from bit-identical activations and block VJPs, but the
    three contributions to dL/dx_k (from x_{k+1} directly, through h_k, and from x_{k+2})
    are summed in a fixed order here and in autograd's engine order in the reference;
    float32 addition is not associative, so the results can differ in the last bits
    (relative differences around 1e-7 per step).
    """

    def __init__(self, blocks: Sequence[nn.Module], frac_bits: int = 9, reversible: bool = True,
                 generator: Optional[torch.Generator] = None, seed: Optional[int] = None,
                 preserve_rng_state: bool = True, check_determinism: bool = True):
        super().__init__()
        if isinstance(blocks, nn.Module) and not isinstance(blocks, (nn.ModuleList, nn.Sequential)):
            raise TypeError("blocks must be a sequence of nn.Module (e.g. a list), got a single "
                            f"{type(blocks).__name__}")
        blocks = list(blocks)
        if not blocks:
            raise ValueError("blocks must contain at least one nn.Module, got an empty sequence")
        for k, b in enumerate(blocks):
            if not isinstance(b, nn.Module):
                raise TypeError(f"blocks[{k}] must be an nn.Module, got {type(b).__name__}")
        self.blocks = nn.ModuleList(blocks)
        self.frac_bits = quant.check_frac_bits(frac_bits)
        self.reversible = bool(reversible)
        if generator is not None and seed is not None:
            raise ValueError("pass at most one of generator= and seed=")
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
        if seed is not None:
            if isinstance(seed, bool) or not isinstance(seed, int):
                raise TypeError(f"seed must be an int, got {seed!r}")
            generator = torch.Generator().manual_seed(seed)
        self.generator = generator
        self.preserve_rng_state = bool(preserve_rng_state)
        self.check_determinism = bool(check_determinism)

    def extra_repr(self) -> str:
        return f"frac_bits={self.frac_bits}, reversible={self.reversible}"

    # -- argument handling -----------------------------------------------------------------
    def _check_input(self, x0):
        if not isinstance(x0, torch.Tensor):
            raise TypeError(f"x0 must be a torch.Tensor, got {type(x0).__name__}")
        if not x0.is_floating_point():
            raise TypeError(f"x0 must be a floating-point tensor, got dtype {x0.dtype}")
        if x0.dim() < 1 or x0.shape[0] == 0:
            raise ValueError(f"x0 must have a non-empty batch dimension 0, got shape {tuple(x0.shape)}")

    def sample_gamma(self, batch: int, device=None) -> torch.Tensor:
        """Draw gamma (batch, K-1), each +-0.5 with probability 1/2 (from ``generator``)."""
        bits = torch.randint(0, 2, (batch, len(self.blocks) - 1), generator=self.generator)
        half = torch.full(bits.shape, 0.5)
        return torch.where(bits.bool(), half, -half).to(device)

    def _gamma_bits(self, gamma, x0) -> torch.Tensor:
        K, batch = len(self.blocks), x0.shape[0]
        if not isinstance(gamma, torch.Tensor):
            raise TypeError(f"gamma must be a torch.Tensor of shape (batch, len(blocks) - 1) = "
                            f"({batch}, {K - 1}), got {type(gamma).__name__}")
        if tuple(gamma.shape) != (batch, K - 1):
            raise ValueError(f"gamma must have shape (batch, len(blocks) - 1) = ({batch}, {K - 1}), "
                             f"got {tuple(gamma.shape)}")
        if not gamma.is_floating_point():
            raise TypeError(f"gamma must be a float tensor of +-0.5, got dtype {gamma.dtype}")
        pos, neg = gamma == 0.5, gamma == -0.5
        if not bool((pos | neg).all()):
            bad = gamma[~(pos | neg)]
            raise ValueError(f"gamma values must be +0.5 or -0.5, got e.g. {float(bad[0])!r}")
        pos = pos.to(x0.device)
        if K == 1:
            return torch.zeros(0, 1, dtype=torch.uint8, device=x0.device)
        return torch.stack([quant.pack_bits(pos[:, k]) for k in range(K - 1)])

    def _check_branch(self, k, h, x):
        if not isinstance(h, torch.Tensor):
            raise TypeError(f"block {k} must return a tensor, got {type(h).__name__}")
        if h.shape != x.shape:
            raise ValueError(f"block {k} returned shape {tuple(h.shape)}; the residual branch "
                             f"must keep the input shape {tuple(x.shape)}")
        if h.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise TypeError(f"block {k} returned dtype {h.dtype}; expected float32")

    # -- RNG ---------------------------------------------------------------------------------
    def _capture_rng(self, device, previous=None):
        """(CPU state, CUDA state or None) now; reuses ``previous`` if nothing drew from
        the RNG since, so a stack without dropout keeps one ~5 KB state, not one per block."""
        if not self.preserve_rng_state:
            return None
        cpu = torch.get_rng_state()
        cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
        if previous is not None and torch.equal(previous[0], cpu) and (
                cuda is None or torch.equal(previous[1], cuda)):
            return previous
        return (cpu, cuda)

    def _call_block(self, k, x, rng_state, device):
        block = self.blocks[k]
        if rng_state is None:
            h = block(x)
        else:
            devices = [device] if device.type == "cuda" else []
            with torch.random.fork_rng(devices=devices):
                torch.set_rng_state(rng_state[0])
                if rng_state[1] is not None:
                    torch.cuda.set_rng_state(rng_state[1], device)
                h = block(x)
        self._check_branch(k, h, x)
        return h

    def _replay_block(self, k, x, rng_state, device, autocast):
        """Re-run block k as in the forward (RNG, autocast) leaving its buffers as they were."""
        with _Replay(self.blocks[k], autocast):
            return self._call_block(k, x, rng_state, device)

    # -- forward -----------------------------------------------------------------------------
    def forward(self, x0: torch.Tensor, gamma: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Train mode: the BDIA forward (gamma drawn unless given); eval mode: gamma = 0."""
        self._check_input(x0)
        if not self.training:
            if gamma is not None:
                raise ValueError("gamma is only used in train mode; eval mode uses gamma = 0")
            return self._eval_forward(x0)
        if gamma is None:
            gamma = self.sample_gamma(x0.shape[0], x0.device)
        gamma_bits = self._gamma_bits(gamma, x0)
        if not self.reversible:
            return self._stored_forward(x0, gamma_bits)
        block_params = [[p for p in b.parameters() if p.requires_grad] for b in self.blocks]
        with torch.no_grad():
            record = self._run_forward(x0, gamma_bits)
        if not torch.is_grad_enabled():
            return record.x_last
        walk = _ReverseWalk(self, record, block_params)
        # blocks may read outside tensors that require grad (seen only when re-run): the
        # output takes part in autograd whenever grad mode is on
        carrier = x0 if x0.requires_grad else x0.detach().requires_grad_(True)
        for k in range(len(self.blocks)):
            carrier = _BlockNode.apply(walk, k, carrier, *block_params[k])
        return carrier

    def _eval_forward(self, x0):
        l = self.frac_bits
        if not torch.is_grad_enabled():
            X = quant.to_grid(x0, l, "input x0")
            for k in range(len(self.blocks)):
                h = self._call_block(k, quant.from_grid(X, l), None, x0.device)
                X = quant.residual_step(X, h, l, self._what(k))
            return quant.from_grid(X, l)
        x = _QuantizeSTE.apply(x0, l, "input x0")
        for k in range(len(self.blocks)):
            h = self._call_block(k, x, None, x0.device)
            x = _ResidualSTE.apply(x, h, l, self._what(k))
        return x

    def _stored_forward(self, x0, gamma_bits):
        """Reference: plain autograd through the same quantized forward (activations stored)."""
        l, K = self.frac_bits, len(self.blocks)
        gps = _gamma_pos_rows(gamma_bits, x0.shape[0], x0.dim())
        x = _QuantizeSTE.apply(x0, l, "input x0")
        h = self._call_block(0, x, None, x0.device)
        x_prev, x = x, _ResidualSTE.apply(x, h, l, self._what(0))
        for k in range(1, K):
            h = self._call_block(k, x, None, x0.device)
            x_prev, x = x, _BDIAStepSTE.apply(x_prev, x, h, gps[k - 1], l, self._what(k))
        return x

    def _what(self, k):
        return (f"activation x_{k + 1} (output of block {k}, limit |x| < "
                f"{quant.grid_limit(self.frac_bits):g})")

    @torch.no_grad()
    def forward_record(self, x0: torch.Tensor, gamma: Optional[torch.Tensor] = None) -> ForwardRecord:
        """Run the BDIA forward (no autograd) and return its :class:`ForwardRecord`.

        ``gamma``: (batch, K-1) of +-0.5; drawn like in train mode when omitted. The blocks
        run in whatever mode (train/eval) they are in; :meth:`inverse` must see the same."""
        self._check_input(x0)
        if gamma is None:
            gamma = self.sample_gamma(x0.shape[0], x0.device)
        return self._run_forward(x0, self._gamma_bits(gamma, x0))

    def _run_forward(self, x0, gamma_bits) -> ForwardRecord:
        l, K, device = self.frac_bits, len(self.blocks), x0.device
        autocast = _autocast_state(device)
        gps = _gamma_pos_rows(gamma_bits, x0.shape[0], x0.dim())
        X = quant.to_grid(x0, l, "input x0", _GRID)
        nbytes = (X.numel() + 7) // 8
        side = torch.empty((K - 1, nbytes), dtype=torch.uint8, device=device)
        sums = [quant.checksum(X)]
        rng = [] if self.preserve_rng_state else None
        state = self._capture_rng(device)
        if rng is not None:
            rng.append(state)
        h = self._call_block(0, quant.from_grid(X, l), None, device)
        X_prev, X = X, quant.residual_step(X, h, l, self._what(0))
        del h
        sums.append(quant.checksum(X))
        for k in range(1, K):
            state = self._capture_rng(device, state)
            if rng is not None:
                rng.append(state)
            h = self._call_block(k, quant.from_grid(X, l), None, device)
            gp = gps[k - 1]
            s = quant.parity(X_prev)
            side[k - 1] = quant.pack_bits(s)
            X_new = quant.gamma_term(X_prev, s, gp) + quant.bdia_combine(X, h, gp, l, self._what(k))
            del h, s
            quant.check_grid(X_new, l, self._what(k))
            X_prev, X = X, X_new
            sums.append(quant.checksum(X))
        return ForwardRecord(x_last=quant.from_grid(X, l), x_prev=quant.from_grid(X_prev, l),
                             side_bits=side, gamma_bits=gamma_bits,
                             checksums=torch.tensor(sums, dtype=torch.int64), rng_states=rng,
                             frac_bits=l, autocast=autocast)

    # -- inverse and backward ------------------------------------------------------------------
    def _not_deterministic(self, k, which, detail=""):
        return NonDeterministicBlockError(
            f"block {k} is not deterministic: recomputed activations differ from the forward "
            f"pass (recovered x_{which} does not match its forward checksum{detail}). Every "
            f"block must reproduce its output bit for bit: use deterministic kernels, draw "
            f"randomness only from torch's global RNG (replayed when preserve_rng_state=True), "
            f"and do not change parameters between forward and backward.")

    def _check_record(self, record):
        if not isinstance(record, ForwardRecord):
            raise TypeError(f"record must be a ForwardRecord, got {type(record).__name__}")
        K = len(self.blocks)
        if record.num_blocks != K:
            raise ValueError(f"record was made by a stack of {record.num_blocks} blocks, "
                             f"this one has {K}")
        if record.frac_bits != self.frac_bits:
            raise ValueError(f"record uses frac_bits={record.frac_bits}, this stack "
                             f"frac_bits={self.frac_bits}")

    @torch.no_grad()
    def inverse(self, record: ForwardRecord, check: bool = True) -> torch.Tensor:
        """Recover Q_l[x0] (float32, bit for bit) from a :class:`ForwardRecord`.

        Re-runs blocks K-1 .. 1 (block 0 is not needed). With ``check`` every recovered x_k
        is compared with the forward checksum; a mismatch raises
        :class:`NonDeterministicBlockError` naming the block whose recomputation (or the
        record, if it was altered) is at fault. ``check=False`` returns whatever the
        arithmetic gives (e.g. to see the effect of a flipped side bit)."""
        self._check_record(record)
        if record.x_last is None:
            raise ValueError("record.x_last is missing")
        l, K = self.frac_bits, len(self.blocks)
        device = record.x_prev.device
        gps = _gamma_pos_rows(record.gamma_bits, record.x_prev.shape[0], record.x_prev.dim())
        X_next = quant.to_grid(record.x_last, l, "record.x_last", _GRID)
        X_cur = quant.to_grid(record.x_prev, l, "record.x_prev", _GRID)
        for k in range(K - 1, 0, -1):
            rng = record.rng_states[k] if record.rng_states is not None else None
            h = self._replay_block(k, quant.from_grid(X_cur, l), rng, device, record.autocast)
            X_rec = self._recover(k, X_next, X_cur, h, gps[k - 1], record)
            del h
            if check and quant.checksum(X_rec) != int(record.checksums[k - 1]):
                raise self._not_deterministic(k, k - 1, " or the record was modified")
            X_next, X_cur = X_cur, X_rec
        return quant.from_grid(X_cur, l)

    def _recover(self, k, X_next, X_cur, h, gp, record):
        """X_{k-1} from X_{k+1} (overwritten: its buffer is reused) and X_k, h_k(x_k)."""
        l = self.frac_bits
        R = quant.bdia_combine(X_cur, h.detach(), gp, l, self._what(k))
        X_rec = X_next.sub_(R)
        del R
        side = quant.unpack_bits(record.side_bits[k - 1], X_rec.numel(), X_rec.dtype)
        quant.gamma_term_inverse_(X_rec, side.view(X_rec.shape), gp)
        if bool((X_rec.abs() >= quant.MANTISSA_LIMIT).any()):
            raise self._not_deterministic(k, k - 1, "; it left the grid range")
        return X_rec

class _ReverseWalk:
    """State of one reversible backward pass, advanced block by block by :class:`_BlockNode`.

    Holds the record, the two current grid activations (X_{k+1}, X_k) and the two pending
    gradients (dL/dx_{k+1} complete, dL/dx_k partial). Steps run in the order K-1 .. 0;
    each is ordered for a small peak: the block's VJP first (its graph is the largest live
    object), then the grid inversion and checksum, then the gamma terms."""

    def __init__(self, stack, record, block_params):
        self.stack, self.record, self.block_params = stack, record, block_params
        self.num_blocks = len(stack.blocks)
        self.next_k = None

    def take_output(self):
        y = self.record.x_last
        self.record.x_last = None  # the node saves it (avoids a reference cycle)
        return y

    def start(self, y, grad_y):
        if self.record is None or self.next_k is not None:
            raise RuntimeError("backward through a ReversibleStack output ran twice; the "
                               "reversible backward consumes its record (retain_graph is "
                               "not supported: use reversible=False)")
        st, rec = self.stack, self.record
        l = st.frac_bits
        self.gps = _gamma_pos_rows(rec.gamma_bits, y.shape[0], y.dim())
        self.X_next = quant.to_grid(y, l, "x_K", _GRID)
        self.X_cur = quant.to_grid(rec.x_prev, l, "x_{K-1}", _GRID)
        rec.x_prev = None  # X_cur holds it now
        self.a_next = grad_y.to(torch.float32)
        self.a_cur = None  # dL/dx_{K-1} so far: x_{K-1} is not an output
        self.device = y.device
        self.next_k = self.num_blocks - 1

    def _vjp(self, k, x, h, v):
        """(dL/dx, dL/dparams of block k) for cotangent ``v`` of h_k(x).

        Tensors the block reads from outside that require grad (see :func:`_foreign_leaves`)
        get their contribution accumulated into ``.grad`` here, as stored-mode autograd would
        (through the graph behind a non-leaf one too, which is therefore retained)."""
        params = self.block_params[k]
        if not h.requires_grad:
            return None, [None] * len(params)
        v = v.to(h.dtype)
        foreign = _foreign_leaves(h, [x] + params)
        out = torch.autograd.grad(h, [x] + params, v, allow_unused=True, retain_graph=bool(foreign))
        if foreign:
            try:
                torch.autograd.backward(h, v, inputs=foreign, retain_graph=True)
            except RuntimeError as e:
                raise RuntimeError(
                    f"block {k} of a ReversibleStack reads a tensor computed outside the stack that "
                    f"requires grad, and its graph was already freed by the outer backward ({e}). "
                    "Compute it inside the block, or use reversible=False") from None
        return out[0], list(out[1:])

    def step(self, k):
        """Process block k; returns (dL/dx_0 or None, gradients of block k's parameters)."""
        if k != self.next_k:
            raise RuntimeError(f"reversible backward visited block {k}, expected block "
                               f"{self.next_k}")
        st, rec = self.stack, self.record
        l = st.frac_bits
        rng = rec.rng_states[k] if rec.rng_states is not None else None
        x = quant.from_grid(self.X_cur, l).requires_grad_(True)
        with torch.enable_grad():
            h = st._replay_block(k, x, rng, self.device, rec.autocast)
        if k == 0:
            # x_1 = x_0 + Q_l[h_0(x_0)]; the recomputation is checked against x_1
            gx, pgrads = self._vjp(0, x, h, self.a_next)
            if st.check_determinism and not torch.equal(
                    quant.residual_step(self.X_cur, h.detach(), l, st._what(0)), self.X_next):
                raise st._not_deterministic(0, 1, "; x_0 + Q[h_0(x_0)] != x_1")
            a0 = self.a_next if self.a_cur is None else self.a_cur.add_(self.a_next)
            if gx is not None:
                a0 = a0 + gx
            self.record = None
            self.next_k = -1
            return a0, pgrads
        gp = self.gps[k - 1]
        pa = _scale(self.a_next, gp, plus=True)           # (1 + g_k) dL/dx_{k+1}
        gx, pgrads = self._vjp(k, x, h, pa)
        del x, pa
        X_rec = st._recover(k, self.X_next, self.X_cur, h, gp, rec)
        del h
        if st.check_determinism and quant.checksum(X_rec) != int(rec.checksums[k - 1]):
            raise st._not_deterministic(k, k - 1)
        a_k = _scale(self.a_next, gp, plus=False)          # (1 - g_k) dL/dx_{k+1}
        if self.a_cur is not None:
            a_k.add_(self.a_cur)
        if gx is not None:
            a_k.add_(gx)
        del gx
        self.a_cur = _signed_half(self.a_next, gp)         # g_k dL/dx_{k+1}, for x_{k-1}
        self.a_next = a_k
        self.X_next, self.X_cur = self.X_cur, X_rec
        self.next_k = k - 1
        return None, pgrads


@without_layers
def _signed_half(a, gp):
    """g a for g = +-0.5 (exact)."""
    h = _half(a)
    return torch.where(gp, h, -h)


@without_layers
def _scale(a, gp, plus):
    """(1 + g) a if plus else (1 - g) a, for g = +0.5 where gp else -0.5."""
    h, oh = _half(a), _one_and_half(a)
    return torch.where(gp, oh, h) if plus else torch.where(gp, h, oh)

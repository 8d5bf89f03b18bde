"""The `torch` backend: Mamba2's chunked "state space duality" (SSD) scan and a causal conv, in plain PyTorch.

The sequence is cut into c chunks of Q steps. Within a chunk the scan is a masked matrix product — C·Bᵀ times the
decay between steps, applied to u = dt·x — as batched matmuls instead of Q sequential steps. Across chunks only the
(headdim × dstate) state per head is carried, in a short loop over chunks. Heads sharing B and C (one group) are
folded into one matmul for the state and state-to-output products.

Decays are powers of 2 of differences of cumulative sums of dt·A·log2(e) ≤ 0, masked before exponentiating, so no
large positive exponent is ever taken. (exp2, not exp: torch's CPU exp goes through MKL VML, which slows down
sharply on the large negative arguments — underflow, denormals — that long fast-decaying chunks produce.)

Forward and backward are written by hand (`ChunkedScan`): the forward saves only its inputs, the cumulative decays
and the chunk-boundary states, and reuses buffers in place; the backward recomputes the (Q × Q) decay matrices.
That keeps training memory near the size of the inputs and avoids most of the allocations — on CPU each fresh large
tensor costs page faults comparable to the arithmetic done on it.

Shapes in this file: b batch, c chunks, Q chunk length, h heads, p headdim, g groups, r = h/g heads per group,
n dstate. Chunked tensors: x, u, y (b, c, Q, h, p); dt, cs (b, c, Q, h); B, C (b, c, Q, g, n);
states (b, c, h, p, n).
"""
import math

import torch
import torch.nn.functional as F

from .scan_reference import discretize_dt, gate

# True while torch.export traces (torch >= 2.5 says so; older versions do not export this model).
_is_exporting = getattr(torch.compiler, "is_exporting", lambda: False)
LOG2E = math.log2(math.e)
LN2 = math.log(2.0)


def ssd_scan(x, dt, A, B, C, chunk_size, D=None, z=None, dt_bias=None, initial_states=None,
             dt_softplus=False, return_final_states=False):
    """Same contract as mamba_ssm's `mamba_chunk_scan_combined` (see `bsmamba2.ops`)."""
    batch, seqlen, nheads, headdim = x.shape
    dtype = torch.promote_types(x.dtype, torch.float32)
    # Equal chunks no longer than chunk_size: 801 steps at 128 become 7 chunks of 115, not 7 of 128.
    n_chunks = max(1, math.ceil(seqlen / chunk_size))
    Q = max(1, math.ceil(seqlen / n_chunks))
    pad = n_chunks * Q - seqlen
    dt = discretize_dt(dt, dt_bias, dt_softplus)
    x_c, dt_c, B_c, C_c = (_pad_time(t.to(dtype), pad).unflatten(1, (n_chunks, Q)) for t in (x, dt, B, C))
    outputs = ChunkedScan.apply(x_c, dt_c, A.to(dtype), B_c, C_c, None if D is None else D.to(dtype),
                                None if initial_states is None else initial_states.to(dtype), return_final_states)
    y, final_states = outputs if return_final_states else (outputs, None)
    y = gate(y.view(batch, n_chunks * Q, nheads, headdim)[:, :seqlen], z).to(x.dtype)
    return (y, final_states) if return_final_states else y


def _pad_time(t: torch.Tensor, pad: int) -> torch.Tensor:
    """Zero-pad dim 1 (time) at the end; zero dt makes padded steps identities that add nothing."""
    if pad == 0:
        return t
    return F.pad(t, (0, 0) * (t.dim() - 2) + (0, pad))


class ChunkedScan(torch.autograd.Function):
    """y = SSD scan of chunked inputs (+ D·x); optionally the final state. See the module docstring for shapes.

    Autocast is switched off inside: the scan computes in the inputs' float32 (or float64) — bf16 matmuls would
    lose the states' precision, and on CPUs without bf16 units they are far slower.
    """

    @staticmethod
    def forward(ctx, *inputs):
        with torch.autocast(inputs[0].device.type, enabled=False):
            return ChunkedScan._forward(ctx, *inputs)

    @staticmethod
    def backward(ctx, *output_grads):
        with torch.autocast(ctx.device_type, enabled=False):
            return ChunkedScan._backward(ctx, *output_grads)

    @staticmethod
    def _forward(ctx, x, dt, A, B, C, D, initial_states, return_final_states):
        b, c, Q, h, p = x.shape
        cs = torch.cumsum(dt * (A * LOG2E), dim=2)                    # log2 of the decay since chunk start

        # 1. Within chunks: y_t = Σ_{s≤t} (C_t·B_s) 2^(cs_t − cs_s) u_s, one (Q × Q) @ (Q × p) product per head.
        u = x * dt.unsqueeze(-1)
        y_diag = (_scores(cs, B, C) @ _head_major(u)).transpose(2, 3)
        if D is None:
            y = y_diag.contiguous()
        else:
            y = torch.mul(x, D if D.dim() == 2 else D.unsqueeze(-1)).add_(y_diag)
        del y_diag

        # 2. Chunk by chunk: the output from the state the chunk starts with (none for chunk 0 without an initial
        #    state), then the state at its end, 2^ce·H + Σ_s u_s 2^(ce − cs_s) ⊗ B_s — only where something reads it.
        #    Per-chunk matmuls read their operands in place (a batched one would copy the strided slices).
        n_states = c if return_final_states else c - 1
        u_to_end = u[:, :n_states].mul_(_to_chunk_end(cs[:, :n_states]).unsqueeze(-1))
        chunk_decay = torch.exp2(cs[:, :, -1])                        # (b, c, h)
        state = initial_states
        states = []
        exporting = _is_exporting()
        for k in range(c):
            if state is not None and not exporting:
                y[:, k].addcmul_(_state_output(C[:, k], state), torch.exp2(cs[:, k]).unsqueeze(-1))
            if k < n_states:
                local = _chunk_state(u_to_end[:, k], B[:, k])
                state = local if state is None else local.addcmul_(state, chunk_decay[:, k, :, None, None])
                states.append(state)
        if exporting:
            y = _plus_entering_state_outputs(y, C, cs, [initial_states, *states][:c])

        ctx.save_for_backward(x, dt, A, B, C, D, initial_states, cs, *states)
        ctx.device_type = x.device.type
        if return_final_states:
            return y, states[-1].clone()
        return y

    @staticmethod
    def _backward(ctx, dy, dfinal=None):
        x, dt, A, B, C, D, initial_states, cs, *states = ctx.saved_tensors
        b, c, Q, h, p = x.shape
        g = B.shape[3]
        dy = dy.contiguous()
        dB, dC = torch.zeros_like(B), torch.zeros_like(C)

        # 1. Within chunks, recomputing the decay matrices: y = scores @ u, scores = CB ∘ decay (per head).
        u = x * dt.unsqueeze(-1)
        dy_heads = _head_major(dy)
        decay = _decay_matrix(cs)
        CB = _group_products(C, B)
        scores = (decay.view(b, c, g, h // g, Q, Q) * CB.unsqueeze(3)).view(decay.shape)
        d_scores = dy_heads @ _head_major(u).transpose(-1, -2)                             # (b, c, h, Q, Q)
        du = (scores.transpose(-1, -2) @ dy_heads).transpose(2, 3).contiguous()            # (b, c, Q, h, p)
        del dy_heads
        dCB = decay.mul_(d_scores).view(b, c, g, h // g, Q, Q).sum(3)                      # (b, c, g, Q, Q)
        d_log_decay = scores.mul_(d_scores)                                                # ∂/∂(cs_t − cs_s) / ln 2
        del decay, scores, d_scores
        dcs = LN2 * (d_log_decay.sum(-1) - d_log_decay.sum(-2)).transpose(2, 3)          # (b, c, Q, h)
        del d_log_decay
        dC += (dCB @ B.transpose(2, 3)).transpose(2, 3)
        dB += (dCB.transpose(-1, -2) @ C.transpose(2, 3)).transpose(2, 3)

        # 2. Back through the chunks: d_state is the gradient reaching the state entering chunk k+1 (= H_k).
        n_states = len(states)
        to_end = _to_chunk_end(cs[:, :n_states]).unsqueeze(-1)
        u_to_end = u[:, :n_states] * to_end
        chunk_decay = torch.exp2(cs[:, :, -1])
        d_state = dfinal if n_states == c else None
        for k in reversed(range(c)):
            entering = states[k - 1] if k >= 1 else initial_states
            d_entering = None
            if k < n_states and d_state is not None:                  # H_k = 2^ce_k·E_k + Σ_s u_to_end_s ⊗ B_s
                du_to_end = _state_output(B[:, k], d_state)
                d_log_to_end = LN2 * (du_to_end * u_to_end[:, k]).sum(-1)                   # (b, Q, h)
                dcs[:, k] -= d_log_to_end
                dcs[:, k, -1] += d_log_to_end.sum(1)
                du[:, k].addcmul_(du_to_end, to_end[:, k])
                dB[:, k] += _group_outer(u_to_end[:, k], d_state, g)
                if entering is not None:
                    dcs[:, k, -1] += LN2 * chunk_decay[:, k] * (entering * d_state).sum((-1, -2))
                    d_entering = d_state * chunk_decay[:, k, :, None, None]
            if entering is not None:                                  # y_t += 2^cs_t · E_k C_t
                dy_scaled = dy[:, k] * torch.exp2(cs[:, k]).unsqueeze(-1)                   # (b, Q, h, p)
                dC[:, k] += _group_outer(dy_scaled, entering, g)
                d_from_output = _chunk_state(dy_scaled, C[:, k])
                d_entering = d_from_output if d_entering is None else d_entering + d_from_output
                dcs[:, k] += LN2 * (dy_scaled * _state_output(C[:, k], entering)).sum(-1)
            d_state = d_entering
        d_initial = d_state if initial_states is not None else None

        # u = dt·x, cs = cumsum(dt·A·log2 e), skip D·x.
        d_step = dcs.flip(2).cumsum(2).flip(2) * LOG2E                 # ∂/∂(dt·A) at each step
        dA = (d_step * dt).sum((0, 1, 2))
        ddt = (du * x).sum(-1).addcmul_(d_step, A)
        dx = du.mul_(dt.unsqueeze(-1))
        dD = None
        if D is not None:
            dD = (dy * x).sum((0, 1, 2)) if D.dim() == 2 else (dy * x).sum((0, 1, 2, 4))
            dx.addcmul_(dy, D if D.dim() == 2 else D.unsqueeze(-1))
        return dx, ddt, dA, dB, dC, dD, d_initial, None


def _plus_entering_state_outputs(y: torch.Tensor, C: torch.Tensor, cs: torch.Tensor, entering: list) -> torch.Tensor:
    """y plus each chunk's output from the state it starts with (`entering`, one per chunk, None for none) in one
    batched product: the sum that the forward's loop adds in place, for torch.export, where each in-place update
    of a slice of y becomes a scatter into all of y (a graph, and an export time, that grow with c²)."""
    first = 1 if entering[0] is None else 0
    if first == len(entering):
        return y
    states = torch.stack(entering[first:], dim=1)                                      # (b, c', h, p, n)
    out = _state_output(C[:, first:].flatten(0, 1), states.flatten(0, 1)).unflatten(0, states.shape[:2])
    return torch.cat([y[:, :first], y[:, first:] + out * torch.exp2(cs[:, first:]).unsqueeze(-1)], dim=1)


def _decay_matrix(cs: torch.Tensor) -> torch.Tensor:
    """(b, c, h, Q, Q): 2^(cs_t − cs_s) for s ≤ t, 0 above the diagonal. The differences above the diagonal
    (positive) are zeroed before exponentiating, and the results there zeroed after (tril_ is much faster than a
    broadcast masked_fill on CPU)."""
    cs = cs.transpose(2, 3).contiguous()
    return (cs.unsqueeze(-1) - cs.unsqueeze(-2)).tril_().exp2_().tril_()


def _group_products(C: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """C_t·B_s for every pair of steps in a chunk, once per group: (b, c, g, Q, Q)."""
    return C.transpose(2, 3) @ B.permute(0, 1, 3, 4, 2)


def _scores(cs: torch.Tensor, B: torch.Tensor, C: torch.Tensor) -> torch.Tensor:
    """(C_t·B_s)·2^(cs_t − cs_s), per head: (b, c, h, Q, Q)."""
    scores = _decay_matrix(cs)
    b, c, h, Q, _ = scores.shape
    g = B.shape[3]
    scores.view(b, c, g, h // g, Q, Q).mul_(_group_products(C, B).unsqueeze(3))
    return scores


def _to_chunk_end(cs: torch.Tensor) -> torch.Tensor:
    """2^(cs_end − cs_s): the decay from each step to its chunk's end, (b, c, Q, h)."""
    return torch.exp2(cs[:, :, -1:] - cs)


def _head_major(t: torch.Tensor) -> torch.Tensor:
    """(b, c, Q, h, p) → contiguous (b, c, h, Q, p), the layout of per-head matmuls."""
    return t.transpose(2, 3).contiguous()


def _chunk_state(u: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """Σ_s u_s ⊗ B_s over one chunk, heads of a group in one matmul: (b, Q, h, p), (b, Q, g, n) → (b, h, p, n)."""
    b, Q, h, p = u.shape
    g, n = B.shape[2], B.shape[3]
    return (u.reshape(b, Q, g, h // g * p).permute(0, 2, 3, 1) @ B.transpose(1, 2)).view(b, h, p, n)


def _state_output(C: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
    """state·C_t for every step of one chunk: (b, Q, g, n), (b, h, p, n) → (b, Q, h, p)."""
    b, Q, g, n = C.shape
    h, p = state.shape[1], state.shape[2]
    out = C.transpose(1, 2) @ state.reshape(b, g, h // g * p, n).transpose(-1, -2)     # (b, g, Q, r·p)
    return out.transpose(1, 2).reshape(b, Q, h, p)


def _group_outer(u: torch.Tensor, state: torch.Tensor, g: int) -> torch.Tensor:
    """Σ over each group's heads and channels of u_t·state: (b, Q, h, p), (b, h, p, n) → (b, Q, g, n)."""
    b, Q, h, p = u.shape
    n = state.shape[-1]
    out = u.reshape(b, Q, g, h // g * p).transpose(1, 2) @ state.reshape(b, g, h // g * p, n)   # (b, g, Q, n)
    return out.transpose(1, 2)


def causal_conv1d_torch(x, weight, bias=None, activation=None):
    """Depthwise causal conv (then silu if asked) as one grouped 2-D conv (1 × width kernels) in channels-last
    layout over the input padded with width − 1 zeros in front; returns a (batch, dim, seqlen) view of a
    channel-last tensor. Under autograd, `CausalConv` with its own backward."""
    silu = activation in ("silu", "swish")
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias)):
        return CausalConv.apply(x, weight, bias, silu)
    y = _depthwise(_pad_seq(x, weight.shape[1] - 1, 0), weight.to(x.dtype), None if bias is None else bias.to(x.dtype))
    return F.silu(y, inplace=True) if silu else y


class CausalConv(torch.autograd.Function):
    """causal_conv1d_torch under autograd. torch's own backward of the depthwise conv (oneDNN's) takes several
    times the forward's time on a CPU, most of it for the weight gradient; here the input gradient is the same
    conv run backwards in time (the flipped kernel over the gradient padded at the end), the weight gradient one
    product of the gradient and the shifted input per tap, summed."""

    @staticmethod
    def forward(ctx, x, weight, bias, silu):
        width = weight.shape[1]
        pre = _depthwise(_pad_seq(x, width - 1, 0), weight.to(x.dtype), None if bias is None else bias.to(x.dtype))
        ctx.save_for_backward(x, weight, pre if silu else None)
        ctx.has_bias = bias is not None
        return F.silu(pre) if silu else pre

    @staticmethod
    def backward(ctx, dy):
        x, weight, pre = ctx.saved_tensors
        width, seqlen = weight.shape[1], x.shape[2]
        if pre is not None:
            dy = torch.ops.aten.silu_backward(dy, pre)
        dx = dweight = dbias = None
        if ctx.needs_input_grad[0]:
            dx = _depthwise(_pad_seq(dy, 0, width - 1), weight.flip(1).to(dy.dtype), None)
        if ctx.needs_input_grad[1]:
            padded = _pad_seq(x, width - 1, 0)
            dweight = torch.stack([(dy * padded[..., k:k + seqlen]).sum((0, 2)) for k in range(width)], 1)
            dweight = dweight.to(weight.dtype)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            dbias = dy.sum((0, 2)).to(weight.dtype)
        return dx, dweight, dbias, None


def _pad_seq(x: torch.Tensor, before: int, after: int) -> torch.Tensor:
    """(batch, dim, L) with zeros before and after along L, as a view of a channel-last tensor."""
    return F.pad(x.transpose(1, 2), (0, 0, before, after)).transpose(1, 2)


def _depthwise(x: torch.Tensor, weight: torch.Tensor, bias) -> torch.Tensor:
    """Valid (unpadded) depthwise conv of (batch, dim, L) with weight (dim, width): (batch, dim, L − width + 1),
    a view of a channel-last tensor (oneDNN's depthwise kernel wants channels-last)."""
    image = x.unsqueeze(2)                                                      # (batch, dim, 1, ·), channels-last
    return F.conv2d(image, weight[:, None, None, :], bias, groups=x.shape[1])[:, :, 0]

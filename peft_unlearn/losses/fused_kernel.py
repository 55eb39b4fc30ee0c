"""The autograd kernel of the fused linear + loss path: per-token statistics of ``softmax(h W^T)`` in row chunks.

`peft_unlearn.losses.fused` is the public entry point; this module holds the `torch.autograd.Function` that turns
hidden states ``h [n, d]`` and an output projection ``W [V, d]`` (optional bias, optional soft-capping
``c * tanh(z / c)``) into three per-token statistics without ever holding more than one chunk of logits:

* ``log p(y)``, the log-probability of the target token,
* ``p(k)``, the probability of the runner-up ``k = argmax_{v != y} p_v`` (for the inverted hinge loss),
* ``log p(k)``, its log-probability (``log p(y) - log p(k) = z_y - z_k``, the logit margin of the quantization
  defence, exact even where ``p(k)`` underflows),
* ``KL(p_ref || p)``, with the reference distribution recomputed chunk by chunk from reference hidden states.

Any loss that is a function of these vectors (NLL, gradient ascent, IHL, NPO/SimNPO sequence log-probs, KL) gets
its exact gradient through ordinary autograd on ``[n]`` vectors, plus this function's backward. With upstream
gradients ``a`` (of ``log p(y)``), ``b`` (of ``p(k)``), ``g`` (of ``log p(k)``) and ``c`` (of the KL), the
gradient w.r.t. the (capped) logits ``z`` of a row is

    dz = a (e_y - p) + (b p_k + g) (e_k - p) + c (p - p_ref),

then multiplied by ``1 - tanh(z_raw / cap)^2`` under soft-capping, and ``dh = dz W``, ``dW = dz^T h``.

When the output projection is frozen (LoRA, the usual case), ``dh`` is a linear combination of four
``[n, d]`` quantities that the forward computes chunk by chunk (``(p * s') W``, ``(p_ref * s') W``, ``W[y]``,
``W[k]``, with ``s'`` the soft-capping slope), so the backward recomputes nothing. When ``W`` (or the bias)
needs a gradient (full fine-tuning, a tied and trained embedding, ``modules_to_save``) the backward recomputes each
chunk of logits instead.

Examples:
    >>> import torch
    >>> h, w = torch.randn(3, 4, dtype=torch.float64), torch.randn(5, 4, dtype=torch.float64)
    >>> y = torch.tensor([0, 1, 2])
    >>> logp, p_k, log_p_k, kl = FusedLinearStatsFunction.apply(
    ...     h, w, None, y, None, None, None, None, None, 2, True, False
    ... )
    >>> torch.allclose(logp, torch.log_softmax(h @ w.T, -1).gather(1, y[:, None]).squeeze(1))
    True
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["DEFAULT_CHUNK_ELEMENTS", "FusedLinearStatsFunction", "default_chunk_rows"]

# Logits held at once by default: 2**24 elements (64 MiB in fp32), i.e. 64 rows at a 262,144-token vocabulary. The
# chunk's temporaries (logits, probabilities, their product with the slope) are a few times this.
DEFAULT_CHUNK_ELEMENTS = 1 << 24


def default_chunk_rows(vocab_size: int) -> int:
    """Rows per chunk so that one chunk of logits has about `DEFAULT_CHUNK_ELEMENTS` elements (at least 1).

    Examples:
        >>> default_chunk_rows(262_144)
        64
    """
    return max(1, DEFAULT_CHUNK_ELEMENTS // max(int(vocab_size), 1))


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _matmul_dtype(hidden: Tensor, weight: Tensor) -> torch.dtype:
    """The dtype `lm_head(hidden)` computes in: the autocast dtype under autocast, else the promoted dtype."""
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return torch.promote_types(hidden.dtype, weight.dtype)


def _chunk_logits(
    h: Tensor, weight: Tensor, bias: Tensor | None, softcap: float | None, cdtype: torch.dtype
) -> tuple[Tensor, Tensor | None]:
    """Logits of one chunk in `cdtype` (after soft-capping) and the soft-capping slope `1 - tanh^2` (or None).

    ``h`` and ``weight`` are already in the matmul dtype, so the product is rounded as `lm_head` rounds it.
    """
    z = h @ weight.T
    if bias is not None:
        z = z + bias
    z = z.to(cdtype)
    if softcap is None:
        return z, None
    t = torch.tanh(z / softcap)
    slope = 1.0 - t * t
    return t.mul_(softcap), slope


class FusedLinearStatsFunction(torch.autograd.Function):
    """``(log p(y), p(k), log p(k), KL(p_ref || p))`` per row of ``softmax(softcap(h W^T + b))``, chunked over rows.

    Inputs of `apply` (positional): ``hidden [n, d]``, ``weight [V, d]``, ``bias [V]`` or None, ``targets [n]``
    (valid token ids), ``ref_hidden [n, d]`` or None, ``ref_weight``, ``ref_bias``, ``softcap``, ``ref_softcap``
    (floats or None), ``chunk_rows`` (int), ``runner_up`` (bool: compute ``p(k)``), ``needs_grad`` (bool: prepare
    the backward). The reference inputs never receive a gradient. Outputs ``[n]`` in the compute dtype (fp32 for
    half-precision inputs); ``p(k)`` and ``log p(k)`` are zeros without ``runner_up`` and the KL zeros without
    ``ref_hidden``.

    Ties of the runner-up go to the lowest column. Double backward is not supported.
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx,
        hidden: Tensor,
        weight: Tensor,
        bias: Tensor | None,
        targets: Tensor,
        ref_hidden: Tensor | None,
        ref_weight: Tensor | None,
        ref_bias: Tensor | None,
        softcap: float | None,
        ref_softcap: float | None,
        chunk_rows: int,
        runner_up: bool,
        needs_grad: bool,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        n_rows = hidden.shape[0]
        mdtype = _matmul_dtype(hidden, weight)
        cdtype = _compute_dtype(mdtype)
        device = hidden.device
        has_ref = ref_hidden is not None
        # the recompute backward is needed when the projection itself is trained
        train_head = needs_grad and (weight.requires_grad or (bias is not None and bias.requires_grad))
        precompute = needs_grad and not train_head
        w = weight.to(mdtype)
        b = None if bias is None else bias.to(mdtype)
        if has_ref:
            ref_mdtype = _matmul_dtype(ref_hidden, ref_weight)
            rw = ref_weight.detach().to(ref_mdtype)
            rb = None if ref_bias is None else ref_bias.detach().to(ref_mdtype)
        logp = torch.zeros(n_rows, dtype=cdtype, device=device)
        p_k = torch.zeros(n_rows, dtype=cdtype, device=device)
        log_p_k = torch.zeros(n_rows, dtype=cdtype, device=device)
        kl = torch.zeros(n_rows, dtype=cdtype, device=device)
        lse = torch.zeros(n_rows, dtype=cdtype, device=device)
        runner = torch.zeros(n_rows, dtype=torch.long, device=device)
        if precompute:
            pw = torch.zeros(n_rows, hidden.shape[1], dtype=cdtype, device=device)
            ref_pw = torch.zeros_like(pw) if has_ref else None
            slope_y = torch.ones(n_rows, dtype=cdtype, device=device)
            slope_k = torch.ones(n_rows, dtype=cdtype, device=device)
        with torch.no_grad():
            for start in range(0, n_rows, chunk_rows):
                stop = min(start + chunk_rows, n_rows)
                y = targets[start:stop].unsqueeze(1)
                z, slope = _chunk_logits(hidden[start:stop].to(mdtype), w, b, softcap, cdtype)
                chunk_lse = torch.logsumexp(z, dim=-1)
                z_y = z.gather(1, y).squeeze(1)
                lse[start:stop] = chunk_lse
                logp[start:stop] = z_y - chunk_lse
                if runner_up:
                    z.scatter_(1, y, float("-inf"))
                    z_k, k = z.max(dim=-1)
                    z.scatter_(1, y, z_y.unsqueeze(1))
                    runner[start:stop] = k
                    log_p_k[start:stop] = z_k - chunk_lse
                    p_k[start:stop] = log_p_k[start:stop].exp()
                log_p = z.sub_(chunk_lse.unsqueeze(1))  # z is now log p
                if has_ref:
                    zr, _ = _chunk_logits(ref_hidden[start:stop].detach().to(ref_mdtype), rw, rb, ref_softcap, cdtype)
                    log_p_ref = torch.log_softmax(zr, dim=-1)
                    p_ref = log_p_ref.exp()
                    kl[start:stop] = (p_ref * (log_p_ref - log_p)).sum(dim=-1)
                if precompute:
                    p = log_p.exp_()
                    if slope is not None:
                        p.mul_(slope)
                        slope_y[start:stop] = slope.gather(1, y).squeeze(1)
                        slope_k[start:stop] = slope.gather(1, runner[start:stop].unsqueeze(1)).squeeze(1)
                    pw[start:stop] = (p.to(mdtype) @ w).to(cdtype)
                    if has_ref:
                        if slope is not None:
                            p_ref.mul_(slope)
                        ref_pw[start:stop] = (p_ref.to(mdtype) @ w).to(cdtype)
        ctx.mark_non_differentiable(runner)
        ctx.has_ref, ctx.precompute, ctx.train_head = has_ref, precompute, train_head
        ctx.softcap, ctx.ref_softcap, ctx.chunk_rows = softcap, ref_softcap, chunk_rows
        ctx.mdtype, ctx.cdtype, ctx.hidden_dtype = mdtype, cdtype, hidden.dtype
        if precompute:
            ctx.save_for_backward(weight, targets, runner, p_k, pw, ref_pw, slope_y, slope_k)
        elif train_head:
            ctx.save_for_backward(hidden, weight, bias, targets, runner, p_k, lse, ref_hidden, ref_weight, ref_bias)
        return logp, p_k, log_p_k, kl

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_logp: Tensor, grad_pk: Tensor, grad_log_pk: Tensor, grad_kl: Tensor):  # type: ignore[override]
        nones = (None,) * 9
        if not (ctx.precompute or ctx.train_head):
            return (None, None, None, *nones)
        cdtype = ctx.cdtype
        a = grad_logp.to(cdtype)
        bk = grad_pk.to(cdtype)
        c = grad_kl.to(cdtype)
        if ctx.precompute:
            weight, targets, runner, p_k, pw, ref_pw, slope_y, slope_k = ctx.saved_tensors
            coef_k = bk * p_k + grad_log_pk.to(cdtype)
            total = a + coef_k - (c if ctx.has_ref else 0.0)
            grad_h = pw * (-total).unsqueeze(1)
            grad_h += weight[targets].to(cdtype) * (a * slope_y).unsqueeze(1)
            grad_h += weight[runner].to(cdtype) * (coef_k * slope_k).unsqueeze(1)
            if ctx.has_ref:
                grad_h -= ref_pw * c.unsqueeze(1)
            return (grad_h.to(ctx.hidden_dtype), None, None, *nones)
        hidden, weight, bias, targets, runner, p_k, lse, ref_hidden, ref_weight, ref_bias = ctx.saved_tensors
        mdtype = ctx.mdtype
        w = weight.to(mdtype)
        b = None if bias is None else bias.to(mdtype)
        if ctx.has_ref:
            ref_mdtype = _matmul_dtype(ref_hidden, ref_weight)
            rw = ref_weight.to(ref_mdtype)
            rb = None if ref_bias is None else ref_bias.to(ref_mdtype)
        acc_dtype = _compute_dtype(weight.dtype)
        grad_h = torch.empty(hidden.shape, dtype=cdtype, device=hidden.device) if ctx.needs_input_grad[0] else None
        grad_w = torch.zeros(weight.shape, dtype=acc_dtype, device=weight.device) if ctx.needs_input_grad[1] else None
        grad_b = None
        if bias is not None and ctx.needs_input_grad[2]:
            grad_b = torch.zeros(bias.shape, dtype=acc_dtype, device=bias.device)
        coef_k = bk * p_k + grad_log_pk.to(cdtype)
        total = a + coef_k - (c if ctx.has_ref else 0.0)
        for start in range(0, hidden.shape[0], ctx.chunk_rows):
            stop = min(start + ctx.chunk_rows, hidden.shape[0])
            h = hidden[start:stop].to(mdtype)
            z, slope = _chunk_logits(h, w, b, ctx.softcap, cdtype)
            dz = z.sub_(lse[start:stop].unsqueeze(1)).exp_().mul_(-total[start:stop].unsqueeze(1))
            dz.scatter_add_(1, targets[start:stop].unsqueeze(1), a[start:stop].unsqueeze(1))
            dz.scatter_add_(1, runner[start:stop].unsqueeze(1), coef_k[start:stop].unsqueeze(1))
            if ctx.has_ref:
                zr, _ = _chunk_logits(ref_hidden[start:stop].to(ref_mdtype), rw, rb, ctx.ref_softcap, cdtype)
                dz.sub_(torch.softmax(zr, dim=-1).mul_(c[start:stop].unsqueeze(1)))
            if slope is not None:
                dz.mul_(slope)
            dz_m = dz.to(mdtype)
            if grad_h is not None:
                grad_h[start:stop] = (dz_m @ w).to(cdtype)
            if grad_w is not None:
                grad_w += (dz_m.T @ h).to(acc_dtype)
            if grad_b is not None:
                grad_b += dz.sum(dim=0).to(acc_dtype)
        grad_w = None if grad_w is None else grad_w.to(weight.dtype)
        grad_b = None if grad_b is None else grad_b.to(bias.dtype)
        grad_h = None if grad_h is None else grad_h.to(hidden.dtype)
        return (grad_h, grad_w, grad_b, *nones)

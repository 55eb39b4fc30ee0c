"""The autograd kernel of the Inverted Hinge Loss: a chunked forward and an in-place backward over one buffer.

`peft_unlearn.losses.inverted_hinge_loss` is the public entry point; this module holds its memory-lean
implementation (one `[N, V]` buffer of the logits' dtype, fp32 scratch of bounded size) and the two-level
runner-up search it uses.

Examples:
    >>> import torch
    >>> z = torch.tensor([[0.0, 3.0, 1.0, 2.0]])
    >>> int(_runner_up(z, _block_max(z, 2), torch.tensor([1]), 2)[0])  # largest entry other than column 1
    3
"""

from __future__ import annotations

import torch
from torch import Tensor

# Number of logits processed at once by the chunked IHL kernels (rows are grouped up to this many elements, at
# least one row per chunk). On CPU a chunk that stays in cache makes the successive elementwise passes nearly free;
# on GPU bigger chunks keep the number of kernel launches low. The fp32 scratch buffer has this many elements.
_CHUNK_ELEMENTS = {"cpu": 1 << 20}
_DEFAULT_CHUNK_ELEMENTS = 1 << 25
# Block width of the two-level runner-up search (block maxima with a vectorised ``amax``, then ``argmax`` over the
# block maxima and inside one block): much cheaper than ``topk`` / ``argmax`` over the whole vocabulary.
_RUNNER_UP_BLOCK = 1024


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _row_chunks(mask: Tensor, n_cols: int) -> list[tuple[int, int]]:
    """Contiguous row ranges ``[start, stop)`` covering the True rows of ``mask``, each at most one chunk long."""
    rows = max(1, _CHUNK_ELEMENTS.get(mask.device.type, _DEFAULT_CHUNK_ELEMENTS) // max(n_cols, 1))
    flags = mask.to("cpu", torch.int8).tolist()  # one host sync per forward
    chunks: list[tuple[int, int]] = []
    start = None
    for i, flag in enumerate([*flags, 0]):
        if flag and start is None:
            start = i
        elif not flag and start is not None:
            chunks.extend((s, min(s + rows, i)) for s in range(start, i, rows))
            start = None
    return chunks


def _block_max(z: Tensor, block: int) -> Tensor:
    """Maxima ``[R, ceil(V / block)]`` of consecutive column blocks of ``z [R, V]`` (the last may be shorter)."""
    n_rows, n_cols = z.shape
    n_full = n_cols // block
    main = n_full * block
    block_max = z[:, :main].view(n_rows, n_full, block).amax(dim=-1)
    if main < n_cols:
        block_max = torch.cat([block_max, z[:, main:].amax(dim=-1, keepdim=True)], dim=1)
    return block_max


def _runner_up(z: Tensor, block_max: Tensor, y: Tensor, block: int) -> Tensor:
    """Index of the largest entry of each row of ``z [R, V]`` other than column ``y [R]``.

    Second level of the two-level search started by `_block_max`: the maximum of the block holding ``y``
    is recomputed without ``y``, then ``argmax`` over the block maxima and inside the winning block. Only
    ``[R, V / block]`` and ``[R, block]`` temporaries. Ties go to the lowest block, then the lowest column of that
    block. ``block_max`` is modified in place.
    """
    n_cols = z.shape[1]
    offsets = torch.arange(block, device=z.device)
    y = y.unsqueeze(1)

    def block_values(block_index: Tensor) -> tuple[Tensor, Tensor]:
        # columns of the given block per row (clamped duplicates of the last column in a short last block do not
        # change a max), with column y excluded
        cols = (block_index.unsqueeze(1) * block + offsets).clamp_max(n_cols - 1)
        values = z.gather(1, cols).masked_fill(cols == y, float("-inf"))
        return cols, values

    y_block = y // block
    _, values = block_values(y_block.squeeze(1))
    block_max.scatter_(1, y_block, values.amax(dim=-1, keepdim=True).to(block_max.dtype))
    cols, values = block_values(block_max.argmax(dim=-1))
    return cols.gather(1, values.argmax(dim=-1, keepdim=True)).squeeze(1)


def _zero_uncovered_rows(buf: Tensor, chunks: list[tuple[int, int]]) -> None:
    """Zero the rows of ``buf`` outside the (sorted, disjoint) chunks, with slices (a boolean row mask would expand
    to a full ``[N, V]`` masked fill)."""
    previous_stop = 0
    for start, stop in [*chunks, (buf.shape[0], buf.shape[0])]:
        if start > previous_stop:
            buf[previous_stop:start].zero_()
        previous_stop = stop


class InvertedHingeFunction(torch.autograd.Function):
    """Per-token IHL on 2-D logits ``[N, V]`` whose gradient lives in a single ``[N, V]`` buffer.

    Forward, chunk by chunk over the supervised rows: block maxima (for the row maximum ``m`` and the runner-up
    search of `_runner_up`), then ``e = exp(z - m)`` (fp32 arithmetic) and its row sum ``S``. When a gradient
    is needed, ``e`` is written into a buffer of the logits' dtype that is saved for backward (the logits are not);
    otherwise into a small scratch buffer. With ``p = e / S``, backward turns the buffer *in place* into the
    gradient ``p_j (p_k - p_y)`` (one multiply by ``g (p_k - p_y) / S`` per row) and overwrites columns ``y``
    and ``k``:

        dIHL/dz_y = p_y (1 - p_y) + p_y p_k,   dIHL/dz_k = -p_k (1 + p_y - p_k),   dIHL/dz_j = p_j (p_k - p_y).

    Backward through the same graph twice (``retain_graph=True``) is refused by autograd's saved-tensor version
    check, because the first backward consumed the buffer.
    """

    @staticmethod
    def forward(ctx, logits: Tensor, targets: Tensor, mask: Tensor, needs_grad: bool) -> Tensor:  # type: ignore[override]
        n_rows, n_cols = logits.shape
        device = logits.device
        cdtype = _compute_dtype(logits.dtype)
        low_precision = logits.dtype != cdtype
        chunks = _row_chunks(mask, n_cols)
        safe_targets = torch.where(mask, targets, torch.zeros_like(targets))
        block = max(1, min(_RUNNER_UP_BLOCK, n_cols))
        lse = torch.zeros(n_rows, dtype=cdtype, device=device)
        inv_sum = torch.zeros(n_rows, dtype=cdtype, device=device)
        block_max = torch.zeros(n_rows, -(-n_cols // block), dtype=logits.dtype, device=device)
        buf = None
        if needs_grad:
            buf = torch.empty(n_rows, n_cols, dtype=logits.dtype, device=device)
            _zero_uncovered_rows(buf, chunks)
        scratch = None
        if chunks and (low_precision or buf is None):
            max_rows = max(stop - start for start, stop in chunks)
            scratch = torch.empty(max_rows, n_cols, dtype=cdtype, device=device)
        for start, stop in chunks:
            z = logits[start:stop]
            block_max[start:stop] = _block_max(z, block)
            row_max = block_max[start:stop].amax(dim=-1, keepdim=True).to(cdtype)
            tmp = scratch[: stop - start] if scratch is not None else buf[start:stop]
            if low_precision:  # upcast bf16/fp16 rows into the fp32 scratch (faster than a mixed-dtype sub)
                tmp.copy_(z)
                tmp.sub_(row_max)
            else:
                torch.sub(z, row_max, out=tmp)
            tmp.exp_()
            row_sum = tmp.sum(dim=-1)
            if buf is not None and scratch is not None:
                buf[start:stop].copy_(tmp)
            inv_sum[start:stop] = row_sum.reciprocal()
            lse[start:stop] = row_sum.log_().add_(row_max.squeeze(1))
        runner_up = _runner_up(logits, block_max, safe_targets, block)
        z_y = logits.gather(1, safe_targets.unsqueeze(1)).squeeze(1).to(cdtype)
        z_k = logits.gather(1, runner_up.unsqueeze(1)).squeeze(1).to(cdtype)
        p_y = torch.exp(z_y - lse)
        p_k = torch.exp(z_k - lse)
        per_token = torch.where(mask, 1.0 + (p_y - p_k), torch.zeros_like(p_y))
        if buf is not None:
            ctx.save_for_backward(buf, safe_targets, runner_up, mask, inv_sum, p_y, p_k)
        ctx.chunks = chunks
        return per_token

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output: Tensor):  # type: ignore[override]
        if not ctx.needs_input_grad[0]:
            return None, None, None, None
        grad, targets, runner_up, mask, inv_sum, p_y, p_k = ctx.saved_tensors
        n_rows, n_cols = grad.shape
        g = torch.where(mask, grad_output.to(p_y.dtype), torch.zeros_like(p_y))
        factor = (g * (p_k - p_y) * inv_sum).unsqueeze(1)  # buffer holds exp(z - m); p = buffer / S
        if grad.dtype == factor.dtype or grad.device.type != "cpu":
            # one pass; on GPU a bf16 *= fp32 multiply computes in fp32 and rounds once
            for start, stop in ctx.chunks:
                grad[start:stop].mul_(factor[start:stop])
        else:  # CPU half precision: mixed-dtype in-place ops are slow there, go through an fp32 scratch
            max_rows = max((stop - start for start, stop in ctx.chunks), default=0)
            scratch = torch.empty(max_rows, n_cols, dtype=factor.dtype, device=grad.device)
            for start, stop in ctx.chunks:
                tmp = scratch[: stop - start]
                tmp.copy_(grad[start:stop])
                tmp.mul_(factor[start:stop])
                grad[start:stop].copy_(tmp)
        # overwrite columns y and k through flat indices (scatter_ along dim 1 is very slow for bf16 on CPU);
        # y != k in every row, and the unsupervised rows receive zeros
        row_offsets = torch.arange(n_rows, device=grad.device) * n_cols
        flat = grad.view(-1)
        flat.index_put_((row_offsets + targets,), (g * p_y * (1.0 - p_y + p_k)).to(grad.dtype))
        flat.index_put_((row_offsets + runner_up,), (-g * p_k * (1.0 + p_y - p_k)).to(grad.dtype))
        return grad, None, None, None

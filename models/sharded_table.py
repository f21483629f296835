"""The row-sharded item-ID table (`ShardedEmbedding`, train.shard_item_table): the ID embedding
split by rows across data-parallel workers, so each holds 1/world of the table, its gradient and
its optimizer state. Needs torch.distributed only, no Ray, DeepSpeed or MLflow.
"""

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F


class ShardedEmbedding(nn.Module):
    """An embedding table split by rows across the ranks of the default process group, as
    TorchRec's row-wise sharding: rank r holds rows [bounds[r], bounds[r + 1]), so in training
    each worker holds 1/world of the table, its gradient and its optimizer state, and no step
    gathers the whole (full_weight does, for checkpoints and evaluation). A lookup sends every
    rank's asked rows to every rank (all-gather), each rank looks up the rows it holds, and an
    all-to-all returns each rank its vectors; the backward pass returns the gradients the same
    way, summed at the rows' owners. Every rank must call forward
    together (as data-parallel training steps do).

    The rows are not an nn.Parameter: the data-parallel engine (DeepSpeed) would average their
    gradient over the ranks and partition them as if every rank held the same table. They step
    in their own AdamW (a fused optimizer, as TorchRec's), `step`, with the gradient averaged
    over the ranks as the engine averages every other one and clipped by its own norm. The
    module's state dict leaves the rows out; `full_weight` gathers the whole table."""

    def __init__(self, table: torch.Tensor, padding_idx: int | None, adamw: dict, grad_clip: float,
                 device: torch.device | str):
        """table (rows, d): the whole table's weights, the same on every rank; adamw: AdamW's
        arguments (lr, betas, weight_decay); grad_clip: the gradient's largest norm (0: none);
        device: where this rank's rows live (module.to does not move them: they are not a
        parameter)."""
        super().__init__()
        world, rank = dist.get_world_size(), dist.get_rank()
        self.bounds = [len(table) * r // world for r in range(world + 1)]
        self.start, self.padding_idx, self.dim = self.bounds[rank], padding_idx, table.shape[1]
        self.rows = table[self.start:self.bounds[rank + 1]].detach().to(device, copy=True).requires_grad_()
        self.grad_clip = grad_clip
        # Fused: one pass over the rows; the default steps through temporaries as large as the rows
        # (a 2M x 64 table's step on 2 workers peaked 240 MB higher).
        self.optimizer = torch.optim.AdamW([self.rows], fused=True, **adamw)

    def forward(self, rows: torch.Tensor) -> torch.Tensor:
        world = dist.get_world_size()
        width = int(max(_all_gather_padded(torch.tensor([len(rows)], device=rows.device), 1)))
        # (world, width): every rank's asked rows, in this rank's numbering
        local = torch.stack(_all_gather_padded(rows, width)) - self.start
        held = (local >= 0) & (local < len(self.rows))
        vectors = self.rows[local.clamp(0, max(len(self.rows) - 1, 0))] if len(self.rows) else \
            self.rows.new_zeros(*local.shape, self.dim)
        vectors = vectors * held.unsqueeze(-1)
        if self.padding_idx is not None:  # as nn.Embedding: the padding row is read but never trained
            padding = (local == self.padding_idx - self.start).unsqueeze(-1)
            vectors = torch.where(padding, vectors.detach(), vectors)
        received = _AllToAll.apply(vectors.reshape(world * width, self.dim)).reshape(world, width, self.dim)
        return received.sum(0)[:len(rows)]  # each row came from its one owner, zeros from the others

    @torch.no_grad()
    def step(self, lr: float):
        """Steps this rank's rows at `lr` with what backward passes have summed into their gradient
        since the last step, and clears it. Every rank must call it together."""
        if self.rows.grad is None:
            self.rows.grad = torch.zeros_like(self.rows)
        grad = self.rows.grad.div_(dist.get_world_size())  # the mean over ranks, as the engine's gradients
        if self.grad_clip:
            norm = torch.linalg.vector_norm(grad) ** 2  # not grad.pow(2).sum(): no gradient-sized copy
            dist.all_reduce(norm)
            grad.mul_(min(1.0, self.grad_clip / (norm.sqrt().item() + 1e-6)))
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.step()
        self.rows.grad = None

    @torch.no_grad()
    def full_weight(self) -> torch.Tensor:
        """The whole table (rows, d), on every rank; every rank must call it."""
        size = max(b - a for a, b in zip(self.bounds[:-1], self.bounds[1:]))
        parts = _all_gather_padded(self.rows.detach(), size)
        return torch.cat([part[:b - a] for part, a, b in zip(parts, self.bounds[:-1], self.bounds[1:])])

    def shard_state(self) -> dict[str, torch.Tensor]:
        """This rank's rows and their AdamW state (step, exp_avg, exp_avg_sq: tensors, as the fused
        AdamW keeps them), for its checkpoint."""
        return {"rows": self.rows.detach(), **self.optimizer.state.get(self.rows, {})}

    @torch.no_grad()
    def load_shard_state(self, state: dict[str, torch.Tensor]):
        """Restores what shard_state saved on this rank (the same world size)."""
        self.rows.copy_(state["rows"])
        moments = {k: v.to(self.rows.device) for k, v in state.items() if k != "rows"}  # fused: step too
        if moments:
            self.optimizer.state[self.rows] = moments


def _all_gather_padded(tensor: torch.Tensor, width: int) -> list[torch.Tensor]:
    """Every rank's `tensor`, each padded with zeros to `width` rows (all_gather needs equal shapes)."""
    parts = [tensor.new_zeros(width, *tensor.shape[1:]) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, F.pad(tensor, (0, 0) * (tensor.dim() - 1) + (0, width - len(tensor))))
    return parts


class _AllToAll(torch.autograd.Function):
    """all_to_all_single over the default group, equal splits, with its gradient (the reverse
    exchange). torch.distributed.nn's version is deprecated."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        out = torch.empty_like(tensor)
        dist.all_to_all_single(out, tensor.contiguous())
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        out = torch.empty_like(grad)
        dist.all_to_all_single(out, grad.contiguous())
        return out

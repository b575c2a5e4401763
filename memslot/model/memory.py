"""ProductKeyMemory: the Memory+ layer of "Memory Layers at Scale" (Berges et al., 2024).

    q      = W_q x                               per head, split in two halves    (N, H, k_dim)
    q1, q2 = rmsnorm(q1), rmsnorm(q2)            qk-norm (keys normalised too)     (N, H, k_dim/2)
    s, i   = product-key top-k over n_keys**2    scores and slot indices           (N, H, k)
    w      = softmax(s) in fp32                  one distribution per head         (N, H, k)
    m      = sum_{h,j} w[h,j] * V[i[h,j]]        one bag of H*k rows per token     (N, Dv)
    y      = W_out( silu(W_gate x) * m )         gated output                      (N, D)

The value table V is shared by every memory layer of a model and is passed in at call time;
keys, query and gate/output projections belong to the layer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from memslot import kernels
from memslot.kernels.reference import rms_normalise
from memslot.model.config import MemoryConfig

# one stream a GPU for the gate projection beside the lookup (``gate_beside_lookup``)
_SIDE_STREAMS: dict[torch.device, torch.cuda.Stream] = {}


@dataclass
class Lookup:
    """What one memory layer read: slots (B, T, H, k) int64 and their weights (B, T, H, k) fp32."""

    layer: int
    slots: torch.Tensor
    weights: torch.Tensor


@dataclass
class PatchedValues:
    """A value table with the rows of ``slots`` (sorted, unique) replaced by ``rows``.

    The editor optimises a few rows of a large table: reading through this object gives the
    same bags as ``table.index_put((slots,), rows)`` while copying and differentiating nothing
    of the table's size. Each bag is the table's bag plus a correction from the replaced rows,
    and gradients reach ``rows`` (and the lookup weights, as through a patched copy), never the
    table.
    """

    table: torch.Tensor  # (n_slots, Dv), not differentiated
    slots: torch.Tensor  # (M,) int64, sorted, unique
    rows: torch.Tensor  # (M, Dv)

    def bag(self, slots: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        base = kernels.embedding_bag(self.table.detach(), slots, weights, False)
        at = torch.searchsorted(self.slots, slots).clamp_max(len(self.slots) - 1)
        hit = self.slots[at] == slots
        delta = self.rows.float() - self.table[self.slots].detach().float()
        correction = kernels.embedding_bag(delta, torch.where(hit, at, 0), weights * hit, False)
        return base + correction


class ProductKeyMemory(nn.Module):
    # On a GPU with no gradient to record (serving, editing), the gate projection, which needs
    # only x, runs on a stream of its own beside the lookup, filling the multiprocessors the
    # top-k's last programs leave idle; the output is the same bit for bit.
    gate_beside_lookup = True

    def __init__(self, d_model: int, value_dim: int, cfg: MemoryConfig, layer_index: int):
        super().__init__()
        self.cfg = cfg
        self.layer_index = layer_index
        half = cfg.k_dim // 2
        self.query = nn.Linear(d_model, cfg.heads * cfg.k_dim, bias=False)
        # (H, 2, n_keys, k_dim/2): two sets of sub-keys per head
        self.keys = nn.Parameter(torch.randn(cfg.heads, 2, cfg.n_keys, half) / half**0.5)
        self.query_norm_weight = nn.Parameter(torch.ones(2, half)) if cfg.qk_norm else None
        self.gate = nn.Linear(d_model, value_dim, bias=False)
        self.out = nn.Linear(value_dim, d_model, bias=False)
        # the sub-keys rms-normalised, for calls no gradient can reach them from (the model is
        # frozen while it serves and edits): ((address, version, dtype, device), the keys they
        # came from (held, so that no other tensor takes the address), (k1, k2))
        self._normed_keys: tuple | None = None

    def normalised_keys(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Both sets of sub-keys (H, n_keys, k_dim/2), rms-normalised under qk-norm.

        Where a gradient could reach the keys they are normalised on every call; otherwise once
        per version of the key parameter (an in-place update, a load or a move starts a new one)
        and reused: the same values, without the normalisation's kernels on every lookup.
        """
        keys = self.keys
        if not self.cfg.qk_norm:
            return keys[:, 0], keys[:, 1]
        if torch.is_grad_enabled() and keys.requires_grad:
            return rms_normalise(keys[:, 0]), rms_normalise(keys[:, 1])
        stamp = (keys.data_ptr(), keys._version, keys.dtype, keys.device)
        if self._normed_keys is None or self._normed_keys[0] != stamp:
            # ordinary tensors even under inference_mode, so later calls can use them anywhere
            with torch.inference_mode(False), torch.no_grad():
                normed = (rms_normalise(keys[:, 0]), rms_normalise(keys[:, 1]))
                self._normed_keys = (stamp, keys.detach(), normed)
        return self._normed_keys[2]

    def lookup(self, x: torch.Tensor, topk: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Slots and softmax weights read for each token: ((N, H, k) int64, (N, H, k) fp32).

        ``topk`` overrides the configured k (the editor reads wider than the model serves).
        """
        cfg = self.cfg
        topk = topk or cfg.topk
        q = self.query(x).reshape(-1, cfg.heads, cfg.k_dim)  # (N, H, k_dim)
        keys1, keys2 = self.normalised_keys()  # (H, n_keys, k_dim/2) each
        # softmax weights (fp32, as the paper prescribes) and slots (N, H, k) of q's halves, each
        # rms-normalised by query_norm_weight first (on CUDA by one pass that writes the halves
        # heads-first for the top-k kernel, whose last kernel turns the scores into weights)
        norm_weight = self.query_norm_weight
        weights, slots = kernels.query_topk(q, keys1, keys2, topk, norm_weight, softmax=True)
        return slots, weights

    def _lookup_and_gate(self, x: torch.Tensor, topk: int | None):
        """``lookup``, with W_gate x computed on a side stream beside it (queued after the
        lookup's kernels, so that its programs take the multiprocessors the top-k leaves)."""
        main = torch.cuda.current_stream(x.device)
        side = _SIDE_STREAMS.get(x.device)
        if side is None:
            side = _SIDE_STREAMS.setdefault(x.device, torch.cuda.Stream(x.device))
        side.wait_stream(main)  # x is ready
        slots, weights = self.lookup(x, topk)
        with torch.cuda.stream(side):
            gate = self.gate(x)
        main.wait_stream(side)
        gate.record_stream(main)  # made on the side stream, read on the main one
        return slots, weights, gate

    def read(
        self,
        x: torch.Tensor,
        values: torch.Tensor | PatchedValues,
        slots: torch.Tensor,
        weights: torch.Tensor,
        sparse_grad: bool = False,
        gate: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The layer's output (..., D) for inputs x (..., D) that read ``slots`` with
        ``weights`` (N, H, k), N being x's positions: W_out(silu(W_gate x) * bag). ``gate``:
        W_gate x, where the caller has it already."""
        if gate is None:
            gate = self.gate(x)
        gate = gate.reshape(slots.shape[0], -1)  # (N, Dv)
        if isinstance(values, PatchedValues):
            bag = values.bag(slots.flatten(1), weights.flatten(1)).to(x.dtype)  # (N, Dv)
            memory = F.silu(gate) * bag
        else:  # silu(gate) * bag, summed and gated in fp32 and rounded once by the kernel
            memory = kernels.embedding_bag(
                values, slots.flatten(1), weights.flatten(1), sparse_grad, x.dtype, gate
            )
        return self.out(memory).view(*x.shape[:-1], -1)

    def forward(
        self,
        x: torch.Tensor,
        values: torch.Tensor | PatchedValues,
        sparse_grad: bool = False,
        topk: int | None = None,
    ) -> tuple[torch.Tensor, Lookup]:
        B, T, _ = x.shape
        gate = None
        if self.gate_beside_lookup and x.is_cuda and not torch.is_grad_enabled():
            slots, weights, gate = self._lookup_and_gate(x, topk)
        else:
            slots, weights = self.lookup(x, topk)  # (N, H, k)
        y = self.read(x, values, slots, weights, sparse_grad, gate)  # (B, T, D)
        hk = slots.shape[1:]
        return y, Lookup(self.layer_index, slots.view(B, T, *hk), weights.view(B, T, *hk))

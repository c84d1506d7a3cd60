"""The CRATE language models (crate-lm/crate-lm ``crate_overcomplete.py``): ``CRATELM`` (causal, next token) and
``CRATEMLM`` (the same encoder without the causal mask, masked-token objective).

Each layer: ``z_half = z + MSSA(LN₁(z))`` (causal for the LM), ``z_next = a₂·Dᵀ`` with the overcomplete ISTA code of
LN₂(z_half) on ONE shared dictionary (no residual). GPT-2 skeleton: learned positions, final LayerNorm, unembedding
tied to the token embedding, GPT-2 init.

Layout: the family's (``transformer.layers.{i}.{0,1}.{norm,fn}``, plus ``wte``, ``wpe``, ``ln_f``, ``lm_head``);
``from_upstream_state_dict`` / ``to_upstream_state_dict`` convert to and from crate-lm's GPT-2 keys.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn

from crate_kernels.models.common import GradCheckpointing, KeyLayout, Transformer
from crate_kernels.modules import MSSA, OvercompleteISTA

UPSTREAM_KEYS = KeyLayout(
    [
        ("wte.", "transformer.wte."),
        ("wpe.", "transformer.wpe."),
        ("ln_f.", "transformer.ln_f."),
        ("transformer.layers.{i}.0.norm.", "transformer.h.{i}.prenorm_1."),
        ("transformer.layers.{i}.0.fn.qkv.", "transformer.h.{i}.attn.c_attn."),
        ("transformer.layers.{i}.0.fn.to_out.0.", "transformer.h.{i}.attn.c_proj."),
        ("transformer.layers.{i}.1.norm.", "transformer.h.{i}.prenorm_2."),
        ("transformer.layers.{i}.1.fn.", "transformer.h.{i}.ista."),
    ]
)
from_upstream_state_dict = UPSTREAM_KEYS.to_ours  # crate-lm keys (transformer.h.{i}.attn.c_attn.*) → ours
to_upstream_state_dict = UPSTREAM_KEYS.to_upstream


class _CRATETextModel(GradCheckpointing, nn.Module):
    """Token and position embeddings → CRATE layers → final LayerNorm → tied unembedding.

    Args:
        vocab_size: V. block_size: the longest sequence (learned positions).
        dim: D. depth: layers. heads: H. dim_head: P; D // H when None (crate-lm's only choice).
        dropout: on the embeddings, the attention probabilities and the attention output (training only).
        ista: η. lambd: λ. overcomplete_ratio: rows of the shared dictionary ``weight`` per D.
    """

    is_causal: bool

    def __init__(
        self,
        *,
        vocab_size: int,
        block_size: int,
        dim: int,
        depth: int,
        heads: int,
        dim_head: int | None = None,
        dropout: float = 0.0,
        ista: float = 0.1,
        lambd: float = 0.1,
        overcomplete_ratio: int = 4,
    ):
        super().__init__()
        if dim_head is None:
            if dim % heads:
                raise ValueError(f"dim ({dim}) must be divisible by heads ({heads}) when dim_head is None")
            dim_head = dim // heads
        self.vocab_size, self.block_size = vocab_size, block_size
        self.wte = nn.Embedding(vocab_size, dim)
        self.wpe = nn.Embedding(block_size, dim)
        self.drop = nn.Dropout(dropout)
        self.transformer = Transformer(
            dim,
            depth,
            lambda: (
                MSSA(dim, heads, dim_head, dropout, is_causal=self.is_causal, project_out=True),
                OvercompleteISTA(dim, overcomplete_ratio, step_size=ista, lambd=lambd, shared=True),
            ),
        )
        self.ln_f = nn.LayerNorm(dim)
        self.lm_head = nn.Linear(dim, vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight  # tied, as upstream
        self._init_weights(depth)

    def _init_weights(self, depth: int) -> None:
        """crate-lm's GPT-2 init: N(0, 0.02) embeddings and projections, zero biases, output projections scaled by
        1/√(2·depth); the ISTA dictionaries keep their kaiming init."""
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=0.02)
            if isinstance(module, nn.Linear) and module.bias is not None:
                nn.init.zeros_(module.bias)
        for attn, _ in self.transformer.layers:
            nn.init.normal_(attn.fn.to_out[0].weight, std=0.02 / math.sqrt(2 * depth))

    def forward_features(self, idx: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        """idx (B, T) integer tokens → hidden states after the final LayerNorm (B, T, D).

        attn_mask: as ``crate_kernels.mssa`` (e.g. a (B, T) bool key-padding mask, True = attend).
        """
        if idx.dim() != 2 or idx.dtype.is_floating_point or idx.dtype.is_complex or idx.dtype == torch.bool:
            raise TypeError(f"idx must be a (B, T) integer tensor of token ids, got {idx.dtype} {tuple(idx.shape)}")
        length = idx.shape[1]
        if length > self.block_size:
            raise ValueError(f"sequence length {length} exceeds block_size {self.block_size}")
        pos = torch.arange(length, device=idx.device)
        x = self.drop(self.wte(idx) + self.wpe(pos))
        return self.ln_f(self.transformer(x, attn_mask=attn_mask))

    def forward(self, idx: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        """idx (B, T) → logits (B, T, vocab_size)."""
        return self.lm_head(self.forward_features(idx, attn_mask))

    def no_weight_decay(self) -> set[str]:
        """None beyond the 1-D parameters: crate-lm decays every matrix, embeddings included."""
        return set()


class CRATELM(_CRATETextModel):
    """Causal CRATE language model (crate-lm). ``forward(idx)`` → next-token logits (B, T, vocab_size)."""

    is_causal = True

    @torch.no_grad()
    def generate(
        self, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None
    ) -> torch.Tensor:
        """Sample ``max_new_tokens`` tokens after ``idx`` (B, T) → (B, T + max_new_tokens).

        The context is cropped to the last ``block_size`` tokens; logits are divided by ``temperature`` and, with
        ``top_k``, restricted to the k most likely tokens. Call ``eval()`` first to switch dropout off.
        """
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        if top_k is not None and top_k < 1:
            raise ValueError(f"top_k must be a positive int or None, got {top_k}")
        for _ in range(max_new_tokens):
            context = idx[:, -self.block_size :]
            logits = self.lm_head(self.forward_features(context)[:, -1]) / temperature
            if top_k is not None:
                kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, [-1]]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            next_token = torch.multinomial(F.softmax(logits, dim=-1), num_samples=1)
            idx = torch.cat((idx, next_token), dim=1)
        return idx


class CRATEMLM(_CRATETextModel):
    """Masked-token CRATE model: the CRATELM encoder without the causal mask; the head is the same tied
    unembedding after the final LayerNorm. The last id of the vocabulary is the mask token."""

    is_causal = False

    @property
    def mask_token_id(self) -> int:
        return self.vocab_size - 1

    def mask_tokens(
        self, idx: torch.Tensor, mask_prob: float = 0.15, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """BERT's corruption: pick each token with probability ``mask_prob``; of those, 80 % become the mask token,
        10 % a random token, 10 % stay.

        Returns:
            inputs (B, T) for ``forward``; labels (B, T): the original token where picked, −100 elsewhere
            (``F.cross_entropy``'s default ``ignore_index``).
        """
        if not 0 < mask_prob <= 1:
            raise ValueError(f"mask_prob must lie in (0, 1], got {mask_prob}")
        draw = torch.rand(idx.shape, generator=generator, device=idx.device)
        picked = draw < mask_prob
        labels = idx.masked_fill(~picked, -100)
        # split the picked ones by a second uniform draw: [0, .8) mask, [.8, .9) random, [.9, 1) keep
        split = torch.rand(idx.shape, generator=generator, device=idx.device)
        random_ids = torch.randint(self.vocab_size - 1, idx.shape, generator=generator, device=idx.device)
        inputs = torch.where(picked & (split < 0.8), self.mask_token_id, idx)
        inputs = torch.where(picked & (split >= 0.8) & (split < 0.9), random_ids, inputs)
        return inputs, labels

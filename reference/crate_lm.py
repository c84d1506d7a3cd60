"""The CRATE language model (upstream crate-lm/crate-lm ``crate_overcomplete.py``): nanoGPT's skeleton with CRATE
layers.

Facts transcribed from upstream: GPT-2 layout and keys (``transformer.wte``, ``transformer.wpe``,
``transformer.h.{i}.{prenorm_1, attn.c_attn, attn.c_proj, prenorm_2, ista}``, ``transformer.ln_f``, ``lm_head``);
causal MSSA with ONE projection ``c_attn`` (D → D, no bias) used as query, key and value through SDPA, output
projection ``c_proj`` with bias; the ISTA block stores ``weight`` of shape (4D, D) = Dᵀ and runs two ISTA steps from
zero on the overcomplete dictionary, synthesising with the same dictionary, with NO residual; LayerNorm eps 1e-5;
learned positions; ``lm_head`` tied to ``wte``; GPT-2 init (normal 0.02, ``c_proj`` scaled by 1/√(2·n_layer)).
Left out: the interpretability hooks (``enhanced_feature_id``, ``y_hook``), the optimizer and MFU helpers, prints.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn import init


class LayerNorm(nn.Module):
    """LayerNorm with an optional bias (eps 1e-5)."""

    def __init__(self, ndim: int, bias: bool = True):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(ndim))
        self.bias = nn.Parameter(torch.zeros(ndim)) if bias else None

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(input, self.weight.shape, self.weight, self.bias, 1e-5)


@dataclass
class CRATEConfig:
    block_size: int = 1024
    vocab_size: int = 50304
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = True


class CausalSelfAttention(nn.Module):
    """Causal MSSA: ``c_attn`` gives w = q = k = v per head; ``c_proj`` projects the merged heads back."""

    def __init__(self, config: CRATEConfig):
        super().__init__()
        if config.n_embd % config.n_head:
            raise ValueError("n_embd must be divisible by n_head")
        self.c_attn = nn.Linear(config.n_embd, config.n_embd, bias=False)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=True)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.n_head = config.n_head
        self.n_embd = config.n_embd
        self.dropout = config.dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.size()
        qkv = self.c_attn(x).view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        y = F.scaled_dot_product_attention(
            qkv, qkv, qkv, attn_mask=None, dropout_p=self.dropout if self.training else 0, is_causal=True
        )
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    """The ISTA block: ``weight`` (4D, D) = Dᵀ; two steps from zero, then ``a₂ Dᵀ`` (no residual)."""

    def __init__(self, config: CRATEConfig):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(4 * config.n_embd, config.n_embd))
        with torch.no_grad():
            init.kaiming_uniform_(self.weight)
        self.relu = nn.ReLU()
        self.step_size = 0.1
        self.lambd = 0.1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z_init = F.relu(self.step_size * F.linear(x, self.weight) - self.step_size * self.lambd)  # a₁ = relu(ηxD − ηλ)
        x1 = F.linear(z_init, self.weight.t())  # a₁ Dᵀ
        grad_1 = F.linear(x1, self.weight)  # a₁ Dᵀ D
        grad_2 = F.linear(x, self.weight)  # x D
        grad_update = self.step_size * (grad_2 - grad_1) - self.step_size * self.lambd
        output_sparse_code = self.relu(z_init + grad_update)
        return F.linear(output_sparse_code, self.weight.t())  # a₂ Dᵀ


class Block(nn.Module):
    def __init__(self, config: CRATEConfig):
        super().__init__()
        self.prenorm_1 = LayerNorm(config.n_embd)
        self.attn = CausalSelfAttention(config)
        self.prenorm_2 = LayerNorm(config.n_embd)
        self.ista = MLP(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.prenorm_1(x))
        return self.ista(self.prenorm_2(x))


class CRATE(nn.Module):
    """Upstream's ``CRATE`` language model (the class nanoGPT calls GPT)."""

    def __init__(self, config: CRATEConfig):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(config.vocab_size, config.n_embd),
                wpe=nn.Embedding(config.block_size, config.n_embd),
                drop=nn.Dropout(config.dropout),
                h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
                ln_f=LayerNorm(config.n_embd, bias=True),
            )
        )
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight  # weight tying
        self.apply(self._init_weights)
        for pn, p in self.named_parameters():
            if pn.endswith("c_proj.weight"):
                torch.nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None):
        """idx (B, T) → (logits, loss): logits (B, T, V) with targets, else (B, 1, V) for the last position."""
        t = idx.size(1)
        if t > self.config.block_size:
            raise ValueError(f"Cannot forward sequence of length {t}, block size is only {self.config.block_size}")
        pos = torch.arange(0, t, dtype=torch.long, device=idx.device).unsqueeze(0)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))
        for block in self.transformer.h:
            x = block(x)
        x = self.transformer.ln_f(x)
        if targets is not None:
            logits = self.lm_head(x)
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1), ignore_index=-1)
            return logits, loss
        return self.lm_head(x[:, [-1], :]), None


# crate-lm's ``from_pretrained`` sizes (vocab 50257, block 1024 there); 'crate' is the GPT-2-small-sized model.
SIZES = {
    "crate-1l": dict(n_layer=1, n_head=1, n_embd=768),
    "crate": dict(n_layer=12, n_head=12, n_embd=768),
    "crate-medium": dict(n_layer=24, n_head=16, n_embd=1024),
    "crate-large": dict(n_layer=36, n_head=20, n_embd=1280),
    "crate-xl": dict(n_layer=48, n_head=25, n_embd=1600),
}

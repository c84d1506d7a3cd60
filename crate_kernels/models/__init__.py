"""The CRATE model family and its registry (names and presets below; DESIGN.md §1.4)."""

from crate_kernels.models.crate import CRATE
from crate_kernels.models.crate_alpha import CRATEAlpha
from crate_kernels.models.crate_lm import CRATELM, CRATEMLM
from crate_kernels.models.crate_mae import CRATEMAE
from crate_kernels.models.registry import create_model, list_models, model_config, register_model

# Vanilla CRATE: image 224, dim_head = dim // heads (upstream's presets; small has P = 48).
_CRATE_SIZES = {"tiny": (384, 12, 6), "small": (576, 12, 12), "base": (768, 12, 12), "large": (1024, 24, 16)}
for _size, (_dim, _depth, _heads) in _CRATE_SIZES.items():
    for _patch in (16, 8):
        register_model(
            f"crate_{_size}_patch{_patch}_224",
            CRATE,
            image_size=224,
            patch_size=_patch,
            num_classes=1000,
            dim=_dim,
            depth=_depth,
            heads=_heads,
            dim_head=_dim // _heads,
        )

# CRATE-α: the same widths (upstream's variant table); B/16 and L/14 are its released checkpoints.
for _size, _patch in (("small", 16), ("base", 16), ("large", 14)):
    _dim, _depth, _heads = _CRATE_SIZES[_size]
    register_model(
        f"crate_alpha_{_size}_patch{_patch}_224",
        CRATEAlpha,
        image_size=224,
        patch_size=_patch,
        num_classes=1000,
        dim=_dim,
        depth=_depth,
        heads=_heads,
        dim_head=_dim // _heads,
    )

# CRATE-MAE: upstream's mae_crate_{tiny,small,base,large}; the decoder mirrors the encoder.
for _size in ("tiny", "small", "base", "large"):
    _dim, _depth, _heads = _CRATE_SIZES[_size]
    register_model(
        f"crate_mae_{_size}_patch16_224",
        CRATEMAE,
        image_size=224,
        patch_size=16,
        dim=_dim,
        depth=_depth,
        heads=_heads,
        dim_head=_dim // _heads,
    )

# CRATE language models. base: crate-lm's "crate" (GPT-2-small sized, nanoGPT's padded GPT-2 vocabulary); small is
# ours (crate-lm ships no smaller multi-layer size).
_LM_SIZES = {"small": (384, 6, 6), "base": (768, 12, 12)}
for _size, (_dim, _depth, _heads) in _LM_SIZES.items():
    for _kind, _cls in (("lm", CRATELM), ("mlm", CRATEMLM)):
        register_model(
            f"crate_{_kind}_{_size}", _cls, vocab_size=50304, block_size=1024, dim=_dim, depth=_depth, heads=_heads
        )

# Demo size: scikit-learn digits (8×8, one channel, ten classes); tests and the training default use it.
_DEMO_IMAGES = {"image_size": 8, "patch_size": 2, "channels": 1, "num_classes": 10}
_DEMO_WIDTH = {"dim": 64, "depth": 4, "heads": 4, "dim_head": 16}
register_model("crate_demo", CRATE, **_DEMO_IMAGES, **_DEMO_WIDTH)
register_model("crate_alpha_demo", CRATEAlpha, **_DEMO_IMAGES, **_DEMO_WIDTH)
_DEMO_TEXT = {"vocab_size": 128, "block_size": 64, "dim": 64, "depth": 4, "heads": 4}
register_model("crate_lm_demo", CRATELM, **_DEMO_TEXT)
register_model("crate_mlm_demo", CRATEMLM, **_DEMO_TEXT)
# The MAE objective does not use a classifier: its demo has none (num_classes=10 adds one for fine-tuning).
register_model("crate_mae_demo", CRATEMAE, **{**_DEMO_IMAGES, "num_classes": 0}, **_DEMO_WIDTH)

__all__ = [
    "CRATE",
    "CRATELM",
    "CRATEMAE",
    "CRATEMLM",
    "CRATEAlpha",
    "create_model",
    "list_models",
    "model_config",
    "register_model",
]

"""CRATELM / CRATEMLM against reference.crate_lm (upstream crate-lm): logits and every gradient, state_dict both ways
through the layout conversion, causality, generation, BERT-style masking."""

import pytest
import torch

import crate_kernels
from crate_kernels import create_model
from crate_kernels.models import CRATELM, CRATEMLM
from crate_kernels.models.crate_lm import from_upstream_state_dict, to_upstream_state_dict
from reference.crate_lm import CRATE, SIZES, CRATEConfig
from tests.models.helpers import assert_all_close, assert_exactly_close, outputs_and_grads, randomized
from tests.utils import seeded

BACKENDS = ["torch", "triton"]
TINY = {"vocab_size": 50, "block_size": 16, "dim": 32, "depth": 2}


def _pair(heads=2, cls=CRATELM):
    ref = CRATE(CRATEConfig(block_size=16, vocab_size=50, n_layer=2, n_head=heads, n_embd=32))
    ref.load_state_dict(randomized(ref))
    ours = cls(**TINY, heads=heads)
    ours.load_state_dict(from_upstream_state_dict(ref.state_dict()))
    return ours, ref


def _full_logits(ref):
    """Upstream returns every position's logits when given targets (else only the last one)."""
    return lambda idx: ref(idx, targets=idx)[0]


def _ours_name(upstream_name: str) -> str:
    return next(iter(from_upstream_state_dict({upstream_name: None})))


def _tokens(batch=2, length=11, vocab=50, seed=0):
    return torch.randint(vocab, (batch, length), generator=seeded(seed))


@pytest.mark.parametrize("heads", [2, 1], ids=["2heads", "1head"])
def test_crate_lm_matches_reference_fp64(heads):
    crate_kernels.set_backend("torch")
    ours, ref = _pair(heads)
    ours.double(), ref.double()
    idx = _tokens()
    expected = outputs_and_grads(_full_logits(ref), idx, params_of=ref, rename=_ours_name)
    assert_exactly_close(outputs_and_grads(ours, idx), expected, atol=1e-10)


@pytest.mark.parametrize("backend", BACKENDS)
def test_crate_lm_forward_backward_matches_reference(backend):
    crate_kernels.set_backend(backend)
    ours, ref = _pair()
    idx = _tokens()
    low = outputs_and_grads(_full_logits(ref), idx, params_of=ref, rename=_ours_name) if backend != "torch" else None
    actual = outputs_and_grads(ours, idx)
    ref.double()
    expected = outputs_and_grads(_full_logits(ref), idx, params_of=ref, rename=_ours_name)
    assert_all_close(actual, expected, low)


@pytest.mark.parametrize("backend", BACKENDS)
def test_crate_mlm_forward_backward(backend):
    """The MLM encoder is the LM's without the causal mask: with an explicit causal mask it equals the LM (fp64,
    PyTorch path)."""
    lm, _ = _pair()
    mlm = CRATEMLM(**TINY, heads=2)
    mlm.load_state_dict(lm.state_dict())
    idx = _tokens()
    crate_kernels.set_backend("torch")
    expected = outputs_and_grads(lm.double(), idx)
    crate_kernels.set_backend(backend)
    causal = torch.ones(11, 11, dtype=torch.bool).tril()
    assert_all_close(outputs_and_grads(mlm, idx, attn_mask=causal), expected)
    assert mlm.mask_token_id == 49 and not mlm.transformer.layers[0][0].fn.is_causal


def test_crate_lm_state_dict_round_trips_with_reference():
    ours, ref = _pair()
    assert list(to_upstream_state_dict(ours.state_dict())) == list(ref.state_dict())
    back = CRATE(CRATEConfig(block_size=16, vocab_size=50, n_layer=2, n_head=2, n_embd=32))
    back.load_state_dict(to_upstream_state_dict(ours.state_dict()))  # strict
    for key, value in ref.state_dict().items():
        assert torch.equal(back.state_dict()[key], value), key
    assert ours.lm_head.weight is ours.wte.weight
    ista = ours.transformer.layers[0][1].fn
    assert ista.shared and ista.weight.shape == (128, 32)


def test_crate_lm_base_preset_matches_upstream():
    with torch.device("meta"):
        ref = CRATE(CRATEConfig(**SIZES["crate"]))
        ours = create_model("crate_lm_base")
    shapes = {k: v.shape for k, v in to_upstream_state_dict(ours.state_dict()).items()}
    assert shapes == {k: v.shape for k, v in ref.state_dict().items()}
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in ref.parameters())


def test_crate_lm_init_follows_upstream():
    torch.manual_seed(0)
    model = create_model("crate_lm_demo", depth=8)
    attn = model.transformer.layers[0][0].fn
    assert abs(model.wpe.weight.std().item() - 0.02) < 2e-3 and attn.to_out[0].bias.abs().max() == 0
    assert abs(attn.to_out[0].weight.std().item() - 0.02 / 4) < 1e-3  # 0.02 / √(2·depth)
    assert model.transformer.layers[0][1].fn.weight.abs().max() <= (6 / 64) ** 0.5  # kaiming, fan_in = D


def test_causality():
    crate_kernels.set_backend("torch")
    lm, mlm = create_model("crate_lm_demo", depth=2), create_model("crate_mlm_demo", depth=2)
    idx = _tokens(vocab=128)
    changed = idx.clone()
    changed[:, 7] = (idx[:, 7] + 1) % 128
    for model, leaks in ((lm, False), (mlm, True)):
        before, after = model(idx), model(changed)
        assert not torch.equal(before[:, 7:], after[:, 7:])  # the changed token matters from its position on
        assert torch.equal(before[:, :7], after[:, :7]) != leaks  # and before it only without the causal mask


def test_key_padding_mask_hides_padded_tokens():
    crate_kernels.set_backend("torch")
    mlm = create_model("crate_mlm_demo", depth=2)
    idx = _tokens(vocab=128)
    keep = torch.ones(2, 11, dtype=torch.bool)
    keep[:, 8:] = False
    other = idx.clone()
    other[:, 8:] = 0
    torch.testing.assert_close(mlm(idx, attn_mask=keep)[:, :8], mlm(other, attn_mask=keep)[:, :8])


def test_generate():
    crate_kernels.set_backend("torch")
    model = create_model("crate_lm_demo", depth=2, block_size=8).eval()
    idx = _tokens(vocab=128, length=6)
    out = model.generate(idx, max_new_tokens=5)  # runs past block_size: the context is cropped
    assert out.shape == (2, 11) and torch.equal(out[:, :6], idx)
    greedy = model.generate(idx, max_new_tokens=1, top_k=1)
    torch.testing.assert_close(greedy[:, -1], model(idx)[:, -1].argmax(-1))
    torch.manual_seed(3)
    first = model.generate(idx, 4, temperature=0.7, top_k=5)
    torch.manual_seed(3)
    assert torch.equal(first, model.generate(idx, 4, temperature=0.7, top_k=5))
    with pytest.raises(ValueError, match="temperature"):
        model.generate(idx, 1, temperature=0)
    with pytest.raises(ValueError, match="top_k"):
        model.generate(idx, 1, top_k=0)


def test_mlm_mask_tokens_follows_bert():
    mlm = create_model("crate_mlm_demo", depth=1)
    idx = torch.randint(127, (40, 500), generator=seeded(0))
    inputs, labels = mlm.mask_tokens(idx, generator=seeded(1))
    picked = labels != -100
    assert torch.equal(labels[picked], idx[picked]) and torch.equal(inputs[~picked], idx[~picked])
    assert abs(picked.float().mean().item() - 0.15) < 0.01
    masked = inputs[picked] == mlm.mask_token_id
    unchanged = inputs[picked] == idx[picked]
    assert abs(masked.float().mean().item() - 0.8) < 0.02 and abs(unchanged.float().mean().item() - 0.1) < 0.02
    assert (inputs[~picked] != mlm.mask_token_id).all()
    with pytest.raises(ValueError, match="mask_prob"):
        mlm.mask_tokens(idx, mask_prob=0)


def test_lm_grad_checkpointing_gives_the_same_gradients():
    crate_kernels.set_backend("torch")
    ours, _ = _pair()
    ours.double()
    idx = _tokens()
    plain = outputs_and_grads(ours, idx)
    ours.set_grad_checkpointing()
    assert_exactly_close(outputs_and_grads(ours, idx), plain, atol=1e-12)
    assert ours.no_weight_decay() == set()


def test_lm_rejects_bad_inputs():
    model = create_model("crate_lm_demo", depth=1)
    with pytest.raises(TypeError, match="integer tensor"):
        model(torch.rand(2, 5))
    with pytest.raises(ValueError, match="exceeds block_size 64"):
        model(torch.zeros(1, 65, dtype=torch.long))
    with pytest.raises(ValueError, match="divisible by heads"):
        CRATELM(**TINY, heads=3)


def test_crate_lm_compiles_fullgraph():
    crate_kernels.set_backend("torch")
    model = create_model("crate_lm_demo", depth=1)
    idx = _tokens(vocab=128)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")  # see test_classifier_compiles_fullgraph
    torch.testing.assert_close(compiled(idx), model(idx))
    compiled(idx).sum().backward()
    assert all(p.grad is not None for p in model.parameters())

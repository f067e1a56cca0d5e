"""Training loops: locked masks (and the revival bug without them), resume, determinism, evaluation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fpe_cli import train as train_mod
from fpe_cli.data import from_arrays, load_dataset
from fpe_cli.errors import FPEError, VerificationError
from fpe_cli.model import MLP, Layer
from fpe_cli.train import (assert_masks_hold, build_module, enforce_masks, evaluate, finetune, init_mlp, make_optimizer,
                           train_dense, TrainConfig, zero_masked_state)


def blobs(n=96, d=6, classes=3, seed=0, multilabel=False):
    """A small learnable task: class = arg-max of a fixed random projection."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n + n // 2, d, generator=gen)
    proj = torch.randn(d, classes, generator=gen)
    y = (x @ proj > 0).float() if multilabel else (x @ proj).argmax(dim=1)
    arrays = {"x_train": x[:n].numpy(), "y_train": y[:n].numpy(), "x_test": x[n:].numpy(), "y_test": y[n:].numpy()}
    return from_arrays("blobs", arrays)


def masked_mlp(widths=(6, 8, 3), density=0.5, seed=0, dtype=torch.float32) -> MLP:
    """A dense-initialised MLP whose weights carry random masks, with NON-zero values off the mask
    (the module must zero them), like an expanded model read from a dense-layout file."""
    mlp = init_mlp(list(widths), seed=seed)
    gen = torch.Generator().manual_seed(seed + 100)
    for layer in mlp.layers:
        layer.mask = torch.rand(layer.weight.shape, generator=gen) < density
        layer.mask[:, 0] = True  # no row without weights
        layer.weight = layer.weight.to(dtype)
        layer.bias = layer.bias.to(dtype)
    return mlp


def off_mask_nonzero(mlp: MLP) -> int:
    return sum(int(((l.weight != 0) & ~l.mask).sum()) for l in mlp.layers if l.mask is not None)


def same_weights(a: MLP, b: MLP) -> bool:
    return all(torch.equal(x.weight, y.weight) and torch.equal(x.bias, y.bias) for x, y in zip(a.layers, b.layers))


OPTIMIZERS = {
    "adam": dict(optimizer="adam", lr=1e-2),
    "adamw+wd": dict(optimizer="adamw", lr=1e-2, weight_decay=0.1),
    "sgd+momentum+wd": dict(optimizer="sgd", lr=0.1, momentum=0.9, weight_decay=0.05),
}


# ---------------------------------------------------------------- masks stay locked


@pytest.mark.parametrize("opt", sorted(OPTIMIZERS))
def test_masked_weights_stay_exactly_zero(opt):
    ds, mlp = blobs(), masked_mlp()
    tuned, metrics = finetune(mlp, ds, epochs=6, batch_size=16, seed=0, **OPTIMIZERS[opt])
    assert off_mask_nonzero(tuned) == 0
    for before, after in zip(mlp.layers, tuned.layers):
        assert torch.equal(before.mask, after.mask)
        assert not torch.equal(before.weight[before.mask], after.weight[after.mask])  # it did train
    assert metrics["test"]["accuracy"] > metrics["before"]["accuracy"]


@pytest.mark.parametrize("opt", sorted(OPTIMIZERS))
def test_without_locking_masked_weights_revive(monkeypatch, opt):
    """The same run with the three locks switched off revives pruned weights, and the final check
    catches it (exit code 3): the test above can fail."""
    monkeypatch.setattr(train_mod, "lock_gradients", lambda module: [])
    monkeypatch.setattr(train_mod, "enforce_masks", lambda module: None)
    monkeypatch.setattr(train_mod, "zero_masked_state", lambda optimizer, module: None)
    with pytest.raises(VerificationError) as err:
        finetune(masked_mlp(), blobs(), epochs=2, batch_size=16, seed=0, **OPTIMIZERS[opt])
    assert err.value.exit_code == 3
    assert "off the mask are not zero" in str(err.value)


def test_optimizer_state_is_zeroed_off_mask():
    """Momentum carried in from elsewhere (e.g. before a mask was applied) must not move a pruned weight."""
    mlp = masked_mlp()
    module = build_module(mlp)
    opt = make_optimizer(module, TrainConfig(optimizer="sgd", lr=0.1, momentum=0.9))
    for w in module.weights:
        opt.state[w]["momentum_buffer"] = torch.ones_like(w)  # poisoned state everywhere
    zero_masked_state(opt, module)
    for w, m in zip(module.weights, module.masks()):
        assert torch.all(opt.state[w]["momentum_buffer"][~m] == 0)
        assert torch.all(opt.state[w]["momentum_buffer"][m] == 1)
    module(torch.randn(4, 6)).sum().backward()
    opt.step()
    enforce_masks(module)
    assert all(torch.all(w[~m] == 0) for w, m in zip(module.weights, module.masks()))


def test_gradient_hook_masks_gradients():
    module = build_module(masked_mlp())
    module(torch.randn(5, 6)).pow(2).sum().backward()
    for w, m in zip(module.weights, module.masks()):
        assert torch.all(w.grad[~m] == 0) and torch.any(w.grad[m] != 0)


def test_assert_masks_hold_names_the_layer():
    mlp = masked_mlp()
    assert_masks_hold(train_mod.build_module(mlp).to_mlp(mlp))
    with pytest.raises(VerificationError, match=r"0.weight: \d+ weight\(s\) off the mask are not zero"):
        assert_masks_hold(mlp)  # its off-mask values were never zeroed


@settings(max_examples=8)
@given(density=st.floats(0.1, 0.9), opt=st.sampled_from(sorted(OPTIMIZERS)), seed=st.integers(0, 50),
       dtype=st.sampled_from([torch.float32, torch.bfloat16]))
def test_locked_masks_property(density, opt, seed, dtype):
    mlp = masked_mlp(density=density, seed=seed, dtype=dtype)
    tuned, _ = finetune(mlp, blobs(n=32, seed=seed), epochs=2, batch_size=8, seed=seed, **OPTIMIZERS[opt])
    assert off_mask_nonzero(tuned) == 0
    assert all(l.weight.dtype == dtype for l in tuned.layers)


def test_dense_model_without_masks_trains_everything():
    mlp = init_mlp([6, 8, 3], seed=1)
    tuned, _ = finetune(mlp, blobs(), epochs=2, batch_size=16)
    assert all(l.mask is None for l in tuned.layers)
    assert not same_weights(mlp, tuned)


# ---------------------------------------------------------------- determinism and resume


def test_same_seed_same_weights_other_seed_differs():
    ds = blobs()
    a, _ = train_dense(ds, [8], epochs=3, batch_size=16, seed=4)
    b, _ = train_dense(ds, [8], epochs=3, batch_size=16, seed=4)
    c, _ = train_dense(ds, [8], epochs=3, batch_size=16, seed=5)
    assert same_weights(a, b) and not same_weights(a, c)
    assert [l.weight_key for l in a.layers] == ["0.weight", "2.weight"]


class Interrupt(Exception):
    pass


def stop_after(epoch: int):
    def callback(event):
        if event["epoch"] == epoch:
            raise Interrupt

    return callback


@pytest.mark.parametrize("opt", sorted(OPTIMIZERS))
def test_resume_equals_uninterrupted(tmp_path, opt):
    ds, mlp = blobs(), masked_mlp()
    kwargs = dict(epochs=5, batch_size=16, seed=3, checkpoint_every=2, **OPTIMIZERS[opt])
    full, full_metrics = finetune(mlp, ds, **kwargs)
    state = tmp_path / "run.resume.safetensors"
    with pytest.raises(Interrupt):
        finetune(mlp, ds, state_path=state, callback=stop_after(4), **kwargs)  # the state of epoch 2 is on disk
    resumed, metrics = finetune(mlp, ds, state_path=state, resume=True, **kwargs)
    assert metrics["resumed_at_epoch"] == 2
    assert same_weights(full, resumed)
    assert metrics["test"] == full_metrics["test"]


def test_train_dense_resume_equals_uninterrupted(tmp_path):
    ds = blobs(multilabel=True)
    kwargs = dict(epochs=4, batch_size=16, seed=1, checkpoint_every=1)
    full, _ = train_dense(ds, [8, 5], **kwargs)
    state = tmp_path / "s.safetensors"
    with pytest.raises(Interrupt):
        train_dense(ds, [8, 5], state_path=state, callback=stop_after(2), **kwargs)
    resumed, metrics = train_dense(ds, [8, 5], state_path=state, resume=True, **kwargs)
    assert metrics["resumed_at_epoch"] == 1 and same_weights(full, resumed)


def test_resume_refuses_another_run_and_a_missing_state(tmp_path):
    ds, mlp = blobs(), masked_mlp()
    state = tmp_path / "s.safetensors"
    finetune(mlp, ds, epochs=2, batch_size=16, checkpoint_every=1, state_path=state)
    with pytest.raises(FPEError, match=r"belongs to another run \(lr 0.001 -> 0.5\)"):
        finetune(mlp, ds, epochs=2, batch_size=16, lr=0.5, checkpoint_every=1, state_path=state, resume=True)
    with pytest.raises(FPEError, match=r"another run \(the data\)"):
        finetune(mlp, blobs(seed=9), epochs=2, batch_size=16, checkpoint_every=1, state_path=state, resume=True)
    with pytest.raises(FPEError, match="no resume state"):
        finetune(mlp, ds, epochs=2, state_path=tmp_path / "none.safetensors", resume=True)


def test_resume_state_is_plain_safetensors(tmp_path):
    from safetensors.numpy import load_file

    state = tmp_path / "s.safetensors"
    finetune(masked_mlp(), blobs(), epochs=1, batch_size=16, checkpoint_every=1, state_path=state)
    tensors = load_file(str(state))
    assert tensors["rng.shuffle"].dtype == np.uint8 and tensors["rng.torch"].dtype == np.uint8
    assert {"optim.0.exp_avg", "optim.0.exp_avg_sq", "optim.0.step", "model.weights.0"} <= set(tensors)


# ---------------------------------------------------------------- evaluation with known answers


def hand_model() -> MLP:
    """2 -> 2 -> 2 with identity activation: logits = [x0 - x1, x1 - x0] + [0, 0.5]."""
    w1 = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    w2 = torch.tensor([[1.0, -1.0], [-1.0, 1.0]])
    return MLP([Layer("a.weight", w1, "a.bias", torch.zeros(2)),
                Layer("b.weight", w2, "b.bias", torch.tensor([0.0, 0.5]))], "identity")


def test_evaluate_single_label_known_answer():
    x = np.array([[2, 0], [0, 2], [1, 1], [3, 0]], np.float32)  # logits: [2,-1.5], [-2,2.5], [0,0.5], [3,-2.5]
    y = np.array([0, 1, 0, 1])  # right, right, wrong, wrong -> accuracy 1/2
    ds = from_arrays("hand", {"x_train": x, "y_train": y, "x_test": x, "y_test": y})
    logits = [[2, -1.5], [-2, 2.5], [0, 0.5], [3, -2.5]]
    expected_loss = sum(math.log(math.exp(a) + math.exp(b)) - (a, b)[t] for (a, b), t in zip(logits, y)) / 4
    out = evaluate(hand_model(), ds)
    assert out["accuracy"] == 0.5 and out["samples"] == 4
    assert out["loss"] == pytest.approx(expected_loss, rel=1e-6)


def test_evaluate_multilabel_known_answer():
    x = np.array([[2, 0], [0, 2], [1, 1]], np.float32)  # logits [2,-1.5] [-2,2.5] [0,0.5]: predicted [1,0] [0,1] [0,1]
    y = np.array([[1, 0], [0, 0], [1, 1]], np.float32)  # exact: yes, no, no; label 0: 3/3... see below
    ds = from_arrays("hand", {"x_train": x, "y_train": y, "x_test": x, "y_test": y})
    out = evaluate(hand_model(), ds)
    assert out["exact_match"] == out["accuracy"] == pytest.approx(1 / 3)
    # label 0: predicted 1,0,0 vs 1,0,1 -> 2/3; label 1: predicted 0,1,1 vs 0,0,1 -> 2/3
    assert out["per_label_accuracy"] == pytest.approx([2 / 3, 2 / 3])
    logits = [[2, -1.5], [-2, 2.5], [0, 0.5]]
    bce = [math.log1p(math.exp(-z)) if t else math.log1p(math.exp(z)) for row, trow in zip(logits, y) for z, t in zip(row, trow)]
    assert out["loss"] == pytest.approx(sum(bce) / 6, rel=1e-6)


def test_training_learns_real_tasks():
    digits = load_dataset("digits")
    _, metrics = train_dense(digits, [32], epochs=8, lr=3e-3, batch_size=64, seed=0)
    assert metrics["test"]["accuracy"] > 0.9
    dnf = load_dataset("dnf:vars=12,clauses=3,k=2,train=600,test=300,outputs=clauses")
    _, metrics = train_dense(dnf, [16], epochs=30, lr=1e-2, batch_size=32, seed=0)
    assert metrics["test"]["exact_match"] > 0.85


def test_bad_settings_and_mismatched_data():
    ds = blobs()
    with pytest.raises(FPEError, match="optimizer must be one of adam, adamw, sgd"):
        train_dense(ds, [4], optimizer="lion", epochs=1)
    with pytest.raises(FPEError, match="learning rate must be a positive number"):
        train_dense(ds, [4], lr=-1, epochs=1)
    with pytest.raises(FPEError, match="x_train has 6 features"):
        finetune(init_mlp([5, 4, 3]), ds, epochs=1)

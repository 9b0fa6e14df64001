"""The adversarial trainers under nnU-Net's network wrappers: torch.compile and (CUDA) AMP.

The issue requires of every adversarial trainer: "CUDA AMP safe (input gradients in fp32 or
scaled), torch.compile safe (attack on the unwrapped module; no recompiles per step)". There
is no GPU here, so each property is checked on the CPU in the form that carries over:

* ``test_compiled_training_steps_do_not_recompile``: nnU-Net's own compile path
  (``nnUNetTrainer.initialize`` wraps the network, ``_build_loss`` the Dice loss, when
  ``_do_i_compile()``; nnU-Net refuses that on the CPU, so it is forced here and
  ``torch.compile`` gets a counting eager backend: Dynamo tracing, no C++ compiler). A few
  ``train_step`` calls must give finite losses, call the compiled wrapper exactly once per
  step (the training forward) and never while the attack is crafted (the attack runs on the
  unwrapped module), and compile nothing after the first step (no recompiles per step: a
  recompile per step would make compiled training far slower than eager training). PGD-AT,
  VAFT (clean + adversarial batch, frequency term) and dual norm (whose training forward
  routes batch segments through module attributes, which Dynamo guards on).
* ``test_attack_under_outer_autocast_is_fp32``: the attack's forward/backward passes, whose
  input gradients decide the perturbation, must be fp32 whatever autocast the caller runs
  in (fp16/bf16 gradients of a Dice+CE loss underflow or flip the sign steps). Checked with
  an enclosing ``torch.autocast("cpu", dtype=torch.bfloat16)`` (the CPU analogue of nnU-Net's
  CUDA autocast): the network outputs seen during crafting are fp32 and the seeded example
  equals the one crafted without autocast.
* ``test_attack_leaves_parameter_gradients_under_compiled_wrapper``: crafting alone (no
  step) on a compiled trainer leaves every parameter's ``.grad`` as it was (None after
  ``zero_grad(set_to_none=True)``, or unchanged values) and does not call the wrapper:
  otherwise the next optimiser step would mix attack gradients into the weight update.
"""
import functools

import numpy as np
import pytest
import torch
from in_process_trainer import make_trainer
from torch._dynamo.eval_frame import OptimizedModule
from torch._dynamo.testing import CompileCounterWithBackend
from trainer_batch import make_batch

from nnunet_adv.network import unwrap_network
from nnunet_adv.trainers import (
    nnUNetTrainerDualNorm_TestShort,
    nnUNetTrainerPGDAT_TestShort,
    nnUNetTrainerVAFT_TestShort,
)

TRAINERS = {"PGDAT": nnUNetTrainerPGDAT_TestShort, "VAFT": nnUNetTrainerVAFT_TestShort}
# + dual norm: its training forward routes batch segments through module attributes (guarded by Dynamo)
COMPILE_TRAINERS = {**TRAINERS, "DualNorm": nnUNetTrainerDualNorm_TestShort}


@pytest.fixture
def fresh_dynamo():
    """Dynamo's caches and counters are global: start and end every test with none."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _compiled_trainer(cls, tree, monkeypatch):
    """A 3D, deep-supervision trainer wrapped exactly as nnU-Net does with nnUNet_compile on
    (network and loss.dc compiled in ``initialize``), through a counting eager backend."""
    trainer = make_trainer(cls, tree, "3d_fullres", True, monkeypatch, initialize=False)
    counter = CompileCounterWithBackend("eager")
    with monkeypatch.context() as m:
        m.setattr(trainer, "_do_i_compile", lambda: True)
        m.setattr(torch, "compile", functools.partial(torch.compile, backend=counter))
        trainer.initialize()
    assert isinstance(trainer.network, OptimizedModule)  # the mimic is nnU-Net's real path
    assert isinstance(trainer.loss.loss.dc, OptimizedModule)
    _seed_attack(trainer)
    return trainer, counter


def _seed_attack(trainer):
    """A deterministic attack (private generator): crafting twice gives the same example."""
    trainer.attack_kwargs = {**trainer.attack_kwargs, "seed": 0}


def _count_wrapper_calls(trainer):
    """Batch sizes of the calls of the compiled wrapper (its own hooks run eagerly)."""
    calls = []
    trainer.network.register_forward_pre_hook(lambda module, args: calls.append(args[0].shape[0]))
    return calls


@pytest.mark.parametrize("name", list(COMPILE_TRAINERS))
def test_compiled_training_steps_do_not_recompile(nnunet_tree, monkeypatch, one_thread, fresh_dynamo, name):
    trainer, counter = _compiled_trainer(COMPILE_TRAINERS[name], nnunet_tree, monkeypatch)
    batch = make_batch(trainer)
    wrapper_calls = _count_wrapper_calls(trainer)

    crafted = []  # wrapper calls made while crafting, per step
    craft = trainer.craft_adversarial

    def spy(data, target, *args, **kwargs):
        before = len(wrapper_calls)
        x_adv = craft(data, target, *args, **kwargs)
        crafted.append(len(wrapper_calls) - before)
        assert not torch.equal(x_adv, data)  # the attack ran
        return x_adv

    monkeypatch.setattr(trainer, "craft_adversarial", spy)
    trainer.network.train()
    frames = []
    for _ in range(3):
        out = trainer.train_step(batch)
        assert np.isfinite(out["loss"]), out
        frames.append(counter.frame_count)

    assert crafted == [0, 0, 0], "the attack went through the compiled wrapper"
    # one training forward per step, of the batch the recipe trains on (VAFT: clean + adv)
    train_batch = batch["data"].shape[0] * (2 if trainer.clean_loss_weight > 0 else 1)
    assert wrapper_calls == [train_batch] * 3
    assert frames[0] > 0, "nothing was compiled: the compiled path was not exercised"
    assert frames[1:] == [frames[0]] * 2, f"recompiled after the first step (graphs compiled: {frames})"


def _outputs(output):
    """The tensors of a network output (deep-supervision list or one tensor)."""
    return output if isinstance(output, (list, tuple)) else [output]


@pytest.mark.parametrize("name", list(TRAINERS))
def test_attack_under_outer_autocast_is_fp32(nnunet_tree, monkeypatch, one_thread, name):
    trainer = make_trainer(TRAINERS[name], nnunet_tree, "3d_fullres", True, monkeypatch)
    _seed_attack(trainer)
    batch = make_batch(trainer)
    x, target = batch["data"], batch["target"]
    net = unwrap_network(trainer.network)
    dtypes = []
    net.register_forward_hook(lambda module, args, output: dtypes.extend(o.dtype for o in _outputs(output)))

    reference = trainer.craft_adversarial(x, target)
    assert dtypes and set(dtypes) == {torch.float32}
    dtypes.clear()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.is_autocast_enabled("cpu")  # the enclosing context is live on this device
        x_adv = trainer.craft_adversarial(x, target)
    assert dtypes, "the attack made no forward pass"
    assert set(dtypes) == {torch.float32}, f"attack forward passes ran in {sorted(set(map(str, dtypes)))}"
    assert x_adv.dtype == torch.float32
    assert not torch.equal(reference, x)
    difference = (x_adv - reference).abs().max().item()
    assert difference <= 1e-6, f"the example crafted under autocast differs by up to {difference:.3g}"


@pytest.mark.parametrize("name", list(COMPILE_TRAINERS))
def test_attack_leaves_parameter_gradients_under_compiled_wrapper(nnunet_tree, monkeypatch, one_thread,
                                                                   fresh_dynamo, name):
    trainer, _ = _compiled_trainer(COMPILE_TRAINERS[name], nnunet_tree, monkeypatch)
    batch = make_batch(trainer)
    x, target = batch["data"], batch["target"]
    wrapper_calls = _count_wrapper_calls(trainer)
    params = dict(trainer.network.named_parameters())  # shared with the unwrapped module
    assert params and len(params) == len(list(unwrap_network(trainer.network).parameters()))
    trainer.network.train()

    # after nnU-Net's zero_grad(set_to_none=True): still None
    trainer.optimizer.zero_grad(set_to_none=True)
    x_adv = trainer.craft_adversarial(x, target)
    assert not torch.equal(x_adv, x)
    assert [n for n, p in params.items() if p.grad is not None] == []

    # with gradients present (e.g. accumulated): bit-for-bit unchanged
    for i, p in enumerate(params.values()):
        p.grad = torch.full_like(p, float(i % 7 + 1))
    sentinels = {n: p.grad.clone() for n, p in params.items()}
    trainer.craft_adversarial(x, target)
    assert [n for n, p in params.items() if not torch.equal(p.grad, sentinels[n])] == []

    assert wrapper_calls == [], "the attack went through the compiled wrapper"
    assert trainer.network.training and unwrap_network(trainer.network).training  # mode restored

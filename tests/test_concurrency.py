"""Several threads on one model: calls serialize, give the maps of sequential calls, and leave the
model exactly as they found it (training flags, requires_grad, hooks, .grad, buffers)."""

from __future__ import annotations

import queue
import threading
import warnings
from typing import cast

import pytest
import torch
from torch import nn

import medcam3d
from medcam3d.errors import ConcurrentUseWarning
from medcam3d.hooks import model_lock
from medcam3d.metrics import completeness, deletion_curve

THREADS = 4
CALLS = 3


class BatchNormNet(nn.Module):
    """Conv → BN → ReLU → Conv → BN → ReLU → Dropout → GAP → Linear, with non-trivial BN statistics."""

    def __init__(self, dropout: float = 0.5) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv1 = nn.Conv3d(1, 6, 3, padding=1)
        self.bn1 = nn.BatchNorm3d(6)
        self.conv2 = nn.Conv3d(6, 8, 3, stride=2, padding=1)
        self.bn2 = nn.BatchNorm3d(8)
        self.drop = nn.Dropout(dropout)
        self.head = nn.Linear(8, 3)
        with torch.no_grad():  # a few train-mode passes: running statistics away from 0 and 1
            for _ in range(3):
                self(torch.randn(4, 1, 10, 10, 10) * 2 + 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = self.drop(torch.relu(self.bn2(self.conv2(x))))
        return self.head(x.mean(dim=(2, 3, 4)))


def user_state(model: nn.Module) -> nn.Module:
    """Train mode with one module frozen in eval, a frozen parameter and a parameter with a .grad."""
    model.train()
    model.bn1.eval()
    model.conv1.bias.requires_grad_(False)
    model.head.weight.grad = torch.full_like(model.head.weight, 0.25)
    return model


def snapshot(model: nn.Module) -> dict:
    return {
        "training": {name: m.training for name, m in model.named_modules()},
        "requires_grad": {name: p.requires_grad for name, p in model.named_parameters()},
        "hooks": {name: (len(m._forward_hooks), len(m._forward_pre_hooks), len(m._backward_hooks))
                  for name, m in model.named_modules()},
        "grads": {name: (p.grad, None if p.grad is None else p.grad.clone()) for name, p in model.named_parameters()},
        "buffers": {name: (b, b.clone()) for name, b in model.named_buffers()},
    }


def assert_same_state(model: nn.Module, before: dict) -> None:
    after = snapshot(model)
    assert after["training"] == before["training"]
    assert after["requires_grad"] == before["requires_grad"]
    assert after["hooks"] == before["hooks"]
    for name, (grad, values) in before["grads"].items():
        now = dict(model.named_parameters())[name].grad
        assert now is grad, name  # the same .grad object (or still None)
        if grad is not None:
            assert torch.equal(now, values), name
    for name, (buffer, values) in before["buffers"].items():
        now = dict(model.named_buffers())[name]
        assert now is buffer and torch.equal(now, values), name  # bitwise, in the same tensor


def run_threads(work, count: int = THREADS) -> list:
    """Run ``work(i)`` in ``count`` threads started together; re-raise the first error."""
    barrier = threading.Barrier(count)
    results: list = [None] * count
    errors: list = []

    def target(i: int) -> None:
        try:
            barrier.wait()
            results[i] = work(i)
        except BaseException as error:  # noqa: BLE001 - reported to the main thread
            errors.append(error)

    threads = [threading.Thread(target=target, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert not any(thread.is_alive() for thread in threads), "a thread hung"
    if errors:
        raise errors[0]
    return results


def inputs(count: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return [torch.randn(2, 1, 10, 12, 8, generator=generator) for _ in range(count)]


def test_threads_on_one_train_mode_model_match_sequential_calls_and_restore_everything():
    model = user_state(BatchNormNet())
    before = snapshot(model)
    explainers = [medcam3d.Explainer(model, "hirescam"), medcam3d.Explainer(model, "gradcam", layer="bn2")]
    xs = inputs(THREADS)
    expected = [[explainers[(i + c) % 2](xs[i], "all").maps for c in range(CALLS)] for i in range(THREADS)]
    assert_same_state(model, before)

    def work(i: int) -> list[torch.Tensor]:
        return [explainers[(i + c) % 2](xs[i], "all").maps for c in range(CALLS)]

    for got, want in zip(run_threads(work), expected):
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=0, atol=0)  # eval mode: deterministic, bitwise
    assert_same_state(model, before)
    assert model.training and not model.bn1.training  # the user's mixed flags, not all-eval


def test_threads_with_metrics_on_one_model_restore_everything():
    model = user_state(BatchNormNet())
    before = snapshot(model)
    xs = inputs(THREADS)
    heat = torch.rand(5, 6, 4, generator=torch.Generator().manual_seed(2))

    def work(i: int) -> object:
        if i % 4 == 0:
            return medcam3d.Explainer(model)(xs[i], "all").maps
        if i % 4 == 1:
            return deletion_curve(model, xs[i][:1], heat, 1, steps=4, baseline="zero").scores
        if i % 4 == 2:
            return completeness(model, xs[i], target="all").max_abs_error
        return medcam3d.list_layers(model, (1, 10, 12, 8))[-1].name

    sequential = [work(i) for i in range(THREADS)]
    assert_same_state(model, before)
    for got, want in zip(run_threads(work), sequential):
        if isinstance(want, torch.Tensor):
            torch.testing.assert_close(got, want, rtol=0, atol=0)
        elif isinstance(want, str):
            assert got == want
        else:
            assert got == pytest.approx(want)
    assert_same_state(model, before)


def test_a_wrapper_and_the_network_inside_it_exclude_each_other():
    inner = user_state(BatchNormNet())
    wrapper = nn.Sequential(inner)
    before = snapshot(inner)
    x = inputs(1)[0]
    explainers = [medcam3d.Explainer(wrapper, layer="0.bn2"), medcam3d.Explainer(inner, layer="bn2")]
    expected = explainers[0](x, 1).maps
    results = run_threads(lambda i: [explainers[i % 2](x, 1).maps for _ in range(CALLS)])
    for maps in results:
        for m in maps:
            torch.testing.assert_close(m, expected, rtol=0, atol=0)
    assert_same_state(inner, before)


def test_a_held_model_blocks_other_calls_until_released():
    model = user_state(BatchNormNet())
    explainer = medcam3d.Explainer(nn.Sequential(model), layer="0.bn2")  # shares every module of `model`
    done = threading.Event()
    thread = threading.Thread(target=lambda: (explainer(inputs(1)[0], 0), done.set()))
    with model_lock(model):
        thread.start()
        assert not done.wait(timeout=0.5)  # waits for the lock
        with model_lock(model):  # re-entrant in the holding thread
            pass
    assert done.wait(timeout=60)
    thread.join()


# ---------------------------------------------------------------------------- eval_mode=False
def test_train_mode_explanations_leave_batchnorm_statistics_bitwise_unchanged():
    model = user_state(BatchNormNet(dropout=0.0))
    before = snapshot(model)
    x = inputs(1)[0]
    explainer = medcam3d.Explainer(model, eval_mode=False)
    first = explainer(x, "all").maps
    results = run_threads(lambda i: explainer(x, "all").maps)
    assert_same_state(model, before)
    for maps in results:  # train-mode BatchNorm normalizes by the batch: the same maps every time
        torch.testing.assert_close(maps, first, rtol=0, atol=0)
    # in train mode the maps really differ from eval mode's (running statistics unused)
    assert not torch.allclose(first, medcam3d.Explainer(model)(x, "all").maps)


def test_batchnorm_statistics_are_updated_only_when_asked():
    model = user_state(BatchNormNet(dropout=0.0))
    mean, count = model.bn2.running_mean.clone(), int(model.bn2.num_batches_tracked)
    medcam3d.Explainer(model, eval_mode=False, update_batchnorm_stats=True)(inputs(1)[0], 0)
    assert int(model.bn2.num_batches_tracked) == count + 1
    assert not torch.equal(model.bn2.running_mean, mean)
    assert not model.bn1.training and model.bn2.training  # flags still restored


# ---------------------------------------------------------------------------- issue 25 item 7
class ModeProbe(nn.Module):
    """Doubles its input in train mode, passes it in eval mode: a deterministic train/eval difference."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * 2.0 if self.training else x


class Gate(nn.Module):
    """Pauses the explaining thread at the start of each of its forward passes (hooks in place, flags as
    medcam3d set them) until another thread has made a round of calls; other threads pass straight through."""

    def __init__(self) -> None:
        super().__init__()
        self.explaining: int | None = None
        self.paused: queue.Queue = queue.Queue()
        self.resume: queue.Queue = queue.Queue()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if threading.get_ident() == self.explaining:
            self.paused.put(x.device.type)
            self.resume.get(timeout=60)
        return x


def gated_net(mode: str = "train", probe: nn.Module | None = None) -> nn.Sequential:
    torch.manual_seed(0)
    model = nn.Sequential(
        Gate(), nn.Conv3d(1, 4, 3, padding=1), probe or ModeProbe(), nn.ReLU(), nn.Conv3d(4, 6, 3, stride=2, padding=1),
        nn.ReLU(), nn.AdaptiveAvgPool3d(1), nn.Flatten(), nn.Linear(6, 3),
    )
    return model.train(mode == "train")


@pytest.mark.parametrize("layer, mode", [("4", "train"), ("auto", "train"), ("auto", "eval")])
def test_another_thread_calling_the_model_during_an_explanation_is_untouched(layer, mode):
    """Issue 25 item 7: while medcam3d explains, another thread calls the same train-mode model, 6 times
    inside each of medcam3d's forward passes (the layer choice, the explanation, the receptive-field
    probe: hooks in place). Every call succeeds with the train-mode output (none is recorded by
    medcam3d's hooks, none runs in eval mode) and the explanation equals the one made alone. An eval-mode
    model is used as it is (only the target layer is copied): the layer probe's hooks sit on its modules."""
    x, other = inputs(2)
    alone = gated_net(mode)
    reference = medcam3d.Explainer(alone, layer=layer)(x, "all").maps
    with torch.no_grad():
        expected = alone(other)
    model = gated_net(mode)  # fresh: nothing cached for it
    gate = cast(Gate, model[0])
    before = snapshot(model)
    errors: list[BaseException] = []
    outputs: list[torch.Tensor] = []
    pauses: list[str] = []

    def user_thread() -> None:
        while True:
            device = gate.paused.get(timeout=60)
            if device is None:
                return
            pauses.append(device)
            for _ in range(6):
                try:
                    with torch.no_grad():
                        outputs.append(model(other))
                except Exception as error:  # noqa: BLE001 - counted below
                    errors.append(error)
            gate.resume.put(None)

    thread = threading.Thread(target=user_thread)
    gate.explaining = threading.get_ident()
    thread.start()
    try:
        maps = medcam3d.Explainer(model, layer=layer)(x, "all").maps
    finally:
        gate.explaining = None
        gate.paused.put(None)
        thread.join(timeout=60)
    assert len(pauses) >= (3 if layer == "auto" else 2), pauses  # every forward pass medcam3d made
    assert errors == []
    assert len(outputs) == 6 * len(pauses) >= 12
    for output in outputs:  # the other thread ran in its own mode (train: not medcam3d's eval mode)
        torch.testing.assert_close(output, expected, rtol=0, atol=0)
    torch.testing.assert_close(maps, reference, rtol=0, atol=0)
    assert_same_state(model, before)


def test_a_module_that_cannot_be_copied_warns_the_other_thread():
    """A TorchScript submodule cannot be run through a copy: it is put in eval mode in place for the
    explanation, and a call from another thread that reaches it meanwhile gets a ConcurrentUseWarning."""
    model = gated_net("train", probe=torch.jit.script(ModeProbe()))
    gate = cast(Gate, model[0])
    x, other = inputs(2)
    outputs: list[torch.Tensor] = []

    def user_thread() -> None:
        while gate.paused.get(timeout=60) is not None:
            with torch.no_grad():
                outputs.append(model(other))
            gate.resume.put(None)

    thread = threading.Thread(target=user_thread)
    gate.explaining = threading.get_ident()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        thread.start()
        try:
            medcam3d.Explainer(model, layer="4", placement="align_corners")(x, "all")
        finally:
            gate.explaining = None
            gate.paused.put(None)
            thread.join(timeout=60)
        assert outputs
        with torch.no_grad():
            model(other)  # after the explanation: no warning
    concurrent = [w for w in caught if issubclass(w.category, ConcurrentUseWarning)]
    assert len(concurrent) == len(outputs)
    assert "RecursiveScriptModule" in str(concurrent[0].message) and "eval mode" in str(concurrent[0].message)
    assert model[2].training  # restored

"""Shape, routing, bias-freeness, BN settings and parameter counts of the model zoo."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lance_cl.models import AlexNet5, MobileNetV2Blocks, SmallCNN


def _seed() -> None:
    torch.manual_seed(0)


def _alexnet_param_count(n_tasks: int, n_classes: list[int], in_channels: int = 3) -> int:
    # weights only (no biases) + BN affine (2 per channel)
    convs = 64 * in_channels * 4 * 4 + 128 * 64 * 3 * 3 + 256 * 128 * 2 * 2
    bns = 2 * (64 + 128 + 256 + 2048 + 2048)
    fcs = 1024 * 2048 + 2048 * 2048
    heads = sum(2048 * c for c in n_classes)
    assert len(n_classes) == n_tasks
    return convs + bns + fcs + heads


def test_alexnet_param_count_by_formula() -> None:
    m = AlexNet5(n_tasks=10, n_classes=10)
    assert sum(p.numel() for p in m.parameters()) == _alexnet_param_count(10, [10] * 10)
    m2 = AlexNet5(n_tasks=3, n_classes=[2, 5, 7], in_channels=1)
    assert sum(p.numel() for p in m2.parameters()) == _alexnet_param_count(3, [2, 5, 7], in_channels=1)
    assert m.flat_features == 256 * 2 * 2 == 1024
    assert m.fc1.in_features == 1024


def test_alexnet_no_biases_and_bn_without_running_stats() -> None:
    m = AlexNet5(n_tasks=4)
    weighted = [mod for mod in m.modules() if isinstance(mod, (nn.Conv2d, nn.Linear))]
    assert len(weighted) == 3 + 2 + 4
    assert all(mod.bias is None for mod in weighted)
    bns = [mod for mod in m.modules() if isinstance(mod, nn.modules.batchnorm._BatchNorm)]
    assert len(bns) == 5
    assert all(not bn.track_running_stats and bn.running_mean is None for bn in bns)
    assert isinstance(m.heads, nn.ModuleList) and len(m.heads) == 4
    drops = [mod.p for mod in m.modules() if isinstance(mod, nn.Dropout)]
    assert drops == [0.2, 0.2, 0.5, 0.5, 0.5]
    assert not any(isinstance(mod, nn.Dropout) for mod in AlexNet5(dropout=False).modules())


def test_alexnet_shapes_per_head() -> None:
    _seed()
    m = AlexNet5(n_tasks=3, n_classes=[10, 4, 7]).eval()
    x = torch.randn(5, 3, 32, 32)
    assert m.features(x).shape == (5, 2048)
    for t, c in enumerate([10, 4, 7]):
        assert m(x, t).shape == (5, c)
        assert m(x, torch.tensor(t)).shape == (5, c)
    with pytest.raises(IndexError):
        m(x, 3)


@pytest.mark.parametrize(
    "make, x",
    [
        (lambda: AlexNet5(n_tasks=3, n_classes=[10, 4, 10]), torch.randn(8, 3, 32, 32)),
        (lambda: SmallCNN(1, [2, 3, 2], 3, 28), torch.randn(8, 1, 28, 28)),
        (lambda: SmallCNN(1, 2, 3, 8), torch.randn(8, 1, 8, 8)),
    ],
)
def test_per_sample_task_routing(make, x) -> None:  # type: ignore[no-untyped-def]
    _seed()
    m = make().eval()  # eval: dropout off; BN still uses batch statistics (no running stats)
    labels = torch.tensor([0, 1, 2, 1, 0, 2, 2, 1])
    with torch.no_grad():
        out = m(x, labels)
        feats = m.features(x)  # same batch, so same BN statistics
        width = max(m.n_classes)
        assert out.shape == (8, width)
        for i, t in enumerate(labels.tolist()):
            c = m.n_classes[t]
            # independent truth: the head's weight applied to this sample's features
            expected = feats[i] @ m.heads[t].weight.T
            torch.testing.assert_close(out[i, :c], expected, rtol=1e-5, atol=1e-5)
            # and equal to routing the whole batch through that one head
            torch.testing.assert_close(out[i, :c], m(x, t)[i], rtol=1e-5, atol=1e-5)
            if c < width:
                assert torch.all(out[i, c:] == m.pad_value)
                assert out[i].argmax() < c


def test_routing_gradients_reach_only_used_heads() -> None:
    _seed()
    m = SmallCNN(1, 2, 3, 8)
    x = torch.randn(6, 1, 8, 8)
    m(x, torch.tensor([0, 0, 2, 2, 0, 2])).sum().backward()
    assert m.heads[0].weight.grad is not None and m.heads[0].weight.grad.abs().sum() > 0
    assert m.heads[2].weight.grad is not None and m.heads[2].weight.grad.abs().sum() > 0
    assert m.heads[1].weight.grad is None


def test_small_cnn_geometry_and_bias_free() -> None:
    m8 = SmallCNN(in_channels=1, n_classes=2, n_tasks=5, input_size=8)
    m28 = SmallCNN(in_channels=1, n_classes=2, n_tasks=5, input_size=28)
    assert m8.flat_features == 32 * 2 * 2
    assert m28.flat_features == 32 * 7 * 7
    for m in (m8, m28):
        assert all(
            mod.bias is None for mod in m.modules() if isinstance(mod, (nn.Conv2d, nn.Linear))
        )
    assert m28(torch.randn(3, 1, 28, 28), 4).shape == (3, 2)


def test_mobilenet_depthwise_and_multiplier() -> None:
    m = MobileNetV2Blocks(in_channels=3, n_classes=10)
    convs = [mod for mod in m.modules() if isinstance(mod, nn.Conv2d)]
    depthwise = [c for c in convs if c.groups > 1]
    assert depthwise, "no grouped conv found"
    # every grouped conv is depthwise: one group per input channel
    assert all(c.groups == c.in_channels for c in depthwise)
    assert any(c.out_channels == c.in_channels for c in depthwise)
    assert any(c.out_channels == 2 * c.in_channels for c in depthwise)  # channel multiplier 2
    stem = convs[0]
    assert stem.kernel_size == (3, 3) and stem.stride == (2, 2)
    assert any(isinstance(mod, nn.ReLU6) for mod in m.modules())
    assert any(getattr(b, "use_residual", False) for b in m.blocks)
    x = torch.randn(4, 3, 32, 32)
    assert m(x).shape == (4, 10)


def test_mobilenet_residual_is_identity_plus_branch() -> None:
    _seed()
    m = MobileNetV2Blocks().eval()
    block = next(b for b in m.blocks if b.use_residual)
    cin = block.project[0].out_channels
    x = torch.randn(2, cin, 8, 8)
    with torch.no_grad():
        branch = block.project(block.depthwise(block.expand(x)))
        torch.testing.assert_close(block(x), x + branch)

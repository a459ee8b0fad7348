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


# --- reduced ResNet-18 and the Avalanche MultiTaskModule contract ------------------------------

from types import SimpleNamespace  # noqa: E402

from avalanche.models import MultiTaskModule, avalanche_forward  # noqa: E402
from avalanche.models.dynamic_modules import avalanche_model_adaptation  # noqa: E402

from lance_cl.models import ReducedResNet18  # noqa: E402


def _resnet_param_count(nf: int, in_channels: int, feat: int, heads: list[int]) -> int:
    """Weights + BN affine of the reduced ResNet-18, written out block by block."""
    total = 9 * in_channels * nf + 2 * nf  # stem conv + BN
    cin = nf
    for width, stride in [(nf, 1), (2 * nf, 2), (4 * nf, 2), (8 * nf, 2)]:
        for b in range(2):
            c_in = cin if b == 0 else width
            total += 9 * c_in * width + 2 * width  # conv1 + bn1
            total += 9 * width * width + 2 * width  # conv2 + bn2
            if b == 0 and (stride != 1 or c_in != width):
                total += c_in * width + 2 * width  # 1x1 shortcut + BN
        cin = width
    return total + sum(feat * c for c in heads)


def test_resnet_feature_sizes_by_hand() -> None:
    # 32x32, stem stride 1: 32 -> 32 (layer1) -> 16 -> 8 -> 4, avg-pool 2 -> 2x2, 160 * 4 = 640
    m32 = ReducedResNet18(n_tasks=5, n_classes=10)
    assert m32.final_size == 4 and m32.flat_features == 640
    # 84x84, stem stride 2: (84+2-3)//2+1 = 42 -> 42 -> 21 -> 11 -> 6, pool -> 3x3, 160 * 9 = 1440
    m84 = ReducedResNet18(n_tasks=20, n_classes=5, stem_stride=2, input_size=84)
    assert m84.final_size == 6 and m84.flat_features == 1440
    _seed()
    with torch.no_grad():
        assert m32.eval().features(torch.randn(2, 3, 32, 32)).shape == (2, 640)
        assert m84.eval().features(torch.randn(2, 3, 84, 84)).shape == (2, 1440)
        assert m84(torch.randn(2, 3, 84, 84), 19).shape == (2, 5)
    assert [h.in_features for h in m84.heads] == [1440] * 20


def test_resnet_structure_no_biases_param_count() -> None:
    m = ReducedResNet18(n_tasks=5, n_classes=10)
    convs = [mod for mod in m.modules() if isinstance(mod, nn.Conv2d)]
    # stem + 8 blocks x 2 convs + 3 shortcuts (stages 2-4 change shape; stage 1 keeps 20 -> 20)
    assert len(convs) == 1 + 16 + 3
    widths = [c.out_channels for c in convs if c.kernel_size == (3, 3)][1::2]
    assert widths == [20, 20, 40, 40, 80, 80, 160, 160]
    assert sorted(c.out_channels for c in convs if c.kernel_size == (1, 1)) == [40, 80, 160]
    assert all(mod.bias is None for mod in m.modules() if isinstance(mod, (nn.Conv2d, nn.Linear)))
    bns = [mod for mod in m.modules() if isinstance(mod, nn.BatchNorm2d)]
    assert len(bns) == 20 and all(not bn.track_running_stats for bn in bns)
    assert sum(p.numel() for p in m.parameters()) == _resnet_param_count(20, 3, 640, [10] * 5)
    m1 = ReducedResNet18(n_tasks=2, n_classes=[3, 4], in_channels=1, stem_stride=2, input_size=84)
    assert sum(p.numel() for p in m1.parameters()) == _resnet_param_count(20, 1, 1440, [3, 4])


def test_resnet_per_sample_routing_equals_per_head() -> None:
    _seed()
    m = ReducedResNet18(n_tasks=3, n_classes=[10, 4, 7]).eval()
    x = torch.randn(6, 3, 32, 32)
    labels = torch.tensor([2, 0, 1, 1, 2, 0])
    with torch.no_grad():
        out = m(x, labels)
        feats = m.features(x)
        assert out.shape == (6, 10)
        for i, t in enumerate(labels.tolist()):
            c = m.n_classes[t]
            torch.testing.assert_close(out[i, :c], feats[i] @ m.heads[t].weight.T, rtol=1e-5, atol=1e-5)
            assert torch.all(out[i, c:] == m.pad_value)


def test_multihead_is_avalanche_multitask_module_and_avalanche_forward_routes() -> None:
    _seed()
    m = SmallCNN(1, [2, 3, 2], 3, 8).eval()
    assert isinstance(m, MultiTaskModule)
    x = torch.randn(5, 1, 8, 8)
    labels = torch.tensor([1, 0, 2, 2, 1])
    with torch.no_grad():
        feats = m.features(x)
        routed = avalanche_forward(m, x, labels)
        for i, t in enumerate(labels.tolist()):
            c = m.n_classes[t]
            torch.testing.assert_close(routed[i, :c], feats[i] @ m.heads[t].weight.T, rtol=1e-5, atol=1e-5)
        # one task for the whole batch: int, one-element tensor, keyword spellings
        expected = feats @ m.heads[1].weight.T
        for out in (
            avalanche_forward(m, x, 1),
            avalanche_forward(m, x, torch.tensor([1])),
            m(x, task_labels=1),
            m(x, task_label=torch.tensor(1)),
            m.forward_single_task(x, 1),
            avalanche_forward(m, x, torch.full((5,), 1)),
        ):
            assert out.shape == (5, 3)
            torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
        every = m(x, None)
        assert sorted(every) == [0, 1, 2]
        torch.testing.assert_close(every[1], feats @ m.heads[1].weight.T, rtol=1e-5, atol=1e-5)


def test_adaptation_changes_nothing() -> None:
    m = SmallCNN(1, 2, 5, 8)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    exp = SimpleNamespace(classes_in_this_experience=[0, 1, 7], task_labels=[9], task_label=9)
    m.adaptation(exp)
    avalanche_model_adaptation(m, exp)
    assert len(m.heads) == 5 and m.n_classes == [2] * 5
    after = m.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)

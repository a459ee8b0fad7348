"""Compaction in the strategy recipes: names, defaults, exactness, and what a run reports."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from lance_cl.layers.compact import CompactModule
from lance_cl.models import SmallCNN


def _model() -> nn.Module:
    torch.manual_seed(0)
    return SmallCNN(1, 2, 2, 8, widths=(4, 8), hidden=16, dropout=0.2)


def _compacted(model: nn.Module) -> bool:
    return any(isinstance(m, CompactModule) for m in model.modules())


def test_strategy_names_choose_compaction():
    from lance_cl.strategies import parse_strategy, with_compaction

    assert parse_strategy("lance")[1] is True and parse_strategy("lance_paper")[1] is True
    assert parse_strategy("gpm")[1] is False and parse_strategy("gpm+compact")[1] is True
    assert parse_strategy("lance+plain") == (parse_strategy("lance")[0], False)
    assert with_compaction("gpm") == "gpm+compact" and with_compaction("lance") == "lance"
    with pytest.raises(ValueError, match="unknown strategy 'foo'.*lance"):
        parse_strategy("foo")


@pytest.mark.parametrize("name,compacted", [("lance", True), ("lance+plain", False), ("gpm", False),
                                            ("gpm+compact", True), ("naive+compact", True)])
def test_build_strategy_compacts_as_named(name, compacted):
    from lance_cl.strategies import build_strategy

    strategy = build_strategy(name, _model(), {"lr": 0.1})
    assert _compacted(strategy.model) is compacted
    if compacted:
        assert strategy.model.recomputed_segments == {"stem"}
        assert strategy.model.segment_tail == "keep"          # the recipes' default


def test_a_benchmark_default_sets_what_the_recomputed_stem_keeps():
    from lance_cl.strategies import build_strategy

    model = build_strategy("lance", _model(), {"lr": 0.1, "compact_segment_tail": "recompute"}).model
    assert model.segment_tail == "recompute"


def test_compacted_recipe_model_has_the_plain_gradients():
    from lance_cl.strategies import build_strategy

    plain = _model().double().eval()          # eval: no dropout, so both draw nothing random
    plain.bn1.train(), plain.bn2.train(), plain.bn3.train()
    model = build_strategy("naive+compact", copy.deepcopy(plain), {"lr": 0.1}).model
    x = torch.randn(6, 1, 8, 8, dtype=torch.float64)
    t = torch.zeros(6, dtype=torch.long)
    for m in (model, plain):
        m(x, t).square().sum().backward()
    for p, q in zip(model.parameters(), plain.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-10, atol=1e-12)
    assert model.state_dict().keys() == plain.state_dict().keys()


def test_unknown_strategy_fails_before_anything_trains(tmp_path, capsys):
    from lance_cl.cli import main

    assert main(["run", "--strategies", "lance,foo", "--out", str(tmp_path), "--quick",
                 "--no-progress"]) == 2
    assert "unknown strategy 'foo'" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_embedded_default_shows_lance_memory_below_gpm(tmp_path):
    """The first thing a newcomer runs (split_digits) shows the product's point: LANCE-CL's whole
    training step saves much less than GPM's, and the compacted GPM shows how much of that is
    compaction (exact) rather than the low-rank cores."""
    from lance_cl.cl.runner import run_experiment

    kw = dict(out_dir=tmp_path, epochs=1, quick=True, progress=False)
    mem = {s: run_experiment("split_digits", s, 0, **kw)["memory"] for s in ("lance", "gpm", "gpm+compact")}
    assert mem["lance"]["activation_total_bytes"] < 0.6 * mem["gpm"]["activation_total_bytes"]
    assert mem["lance"]["activation_layers_bytes"] < mem["gpm+compact"]["activation_layers_bytes"]
    assert mem["gpm+compact"]["activation_total_bytes"] < mem["gpm"]["activation_total_bytes"]
    # the stem is recomputed from the input batch, so conv1 no longer saves its input itself
    assert mem["gpm+compact"]["activation_layers_bytes"] <= mem["gpm"]["activation_layers_bytes"]

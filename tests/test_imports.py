"""What importing costs: the core API and `lance-cl bench --help` load no Avalanche; building a
multi-task model does, and the model is then an Avalanche MultiTaskModule."""

from __future__ import annotations

import copy
import io
import json
import pickle
import subprocess
import sys

import pytest
import torch

from lance_cl.models import SmallCNN


def _avalanche_modules_after(code: str) -> list[str]:
    """Run ``code`` in a fresh interpreter; the Avalanche modules it left in sys.modules."""
    probe = code + "\nimport json, sys\nprint(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] == 'avalanche')))\n"
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def _loaded_after(code: str, *packages: str) -> dict[str, bool]:
    """Run ``code`` in a fresh interpreter; for each of ``packages``, whether it was imported."""
    probe = code + f"\nimport json, sys\nprint(json.dumps({{p: p in sys.modules for p in {list(packages)!r}}}))\n"
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_the_run_and_report_commands_driver_modules_load_no_torch() -> None:
    # what a sweep's driver imports: the package, the parser of ``run`` / ``report``, the report
    # and the run files (a JSON round trip included); torch is for the runs, on the workers
    code = ("import lance_cl, lance_cl.cli, lance_cl.cl.report, lance_cl.cl.sweep, lance_cl.units\n"
            "from lance_cl.cl.run_files import json_safe, read_result, write_json_atomic\n"
            "for command in ('run', 'report'):\n"
            "    lance_cl.cli.build_parser(command).parse_args([command] + (['x'] if command == 'report' else []))\n"
            "import pathlib, tempfile\n"
            "path = pathlib.Path(tempfile.mkdtemp()) / 'r.json'\n"
            "write_json_atomic(path, {'a': [1.5, float('nan')], 'v': lance_cl.__version__})\n"
            "assert json_safe(read_result(path)) == {'a': [1.5, None], 'v': '0.1.0'}\n"
            "assert lance_cl.format_bytes(1536) == '1.50 KiB'")
    assert _loaded_after(code, "torch", "avalanche") == {"torch": False, "avalanche": False}
    # the package's names load their modules on first use
    assert _loaded_after("import lance_cl\nlance_cl.compress", "torch", "avalanche") == {
        "torch": True, "avalanche": False}


def test_the_package_lists_and_loads_every_public_name() -> None:
    import lance_cl

    for name in lance_cl.__all__:
        assert name in dir(lance_cl)
        assert getattr(lance_cl, name) is not None
    assert lance_cl.compress is __import__("lance_cl.wrap", fromlist=["compress"]).compress
    assert set(lance_cl._EXPORTS) == set(lance_cl.__all__) - {"__version__"}   # no name unlisted
    with pytest.raises(AttributeError, match="no attribute 'no_such_name'"):
        lance_cl.no_such_name


def test_bench_help_loads_no_avalanche() -> None:
    code = ("import contextlib, io\nfrom lance_cl.cli import main\n"
            "with contextlib.redirect_stdout(io.StringIO()) as out:\n"
            "    try:\n        main(['bench', '--help'])\n    except SystemExit as e:\n        assert e.code == 0\n"
            "assert 'usage: lance-cl bench' in out.getvalue()")
    assert _avalanche_modules_after(code) == []


def test_compress_loads_no_avalanche() -> None:
    code = ("import torch, lance_cl\n"
            "model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.Flatten(),\n"
            "                            torch.nn.Linear(4 * 6 * 6, 2))\n"
            "x = torch.randn(2, 3, 8, 8)\n"
            "lance_cl.compress(model, 'lance', example_inputs=x, eps=0.9)\n"
            "lance_cl.calibrate(model, [x], progress=False)\n"
            "model(x).sum().backward()\n"
            "assert model[0].weight.grad is not None")
    assert _avalanche_modules_after(code) == []


def test_importing_the_model_zoo_and_the_cl_commands_loads_no_avalanche_building_a_model_does() -> None:
    imports = "import lance_cl.cl, lance_cl.cl.commands, lance_cl.cl.metrics\nfrom lance_cl.models import SmallCNN"
    assert _avalanche_modules_after(imports) == []
    assert "avalanche.models" in _avalanche_modules_after(imports + "\nSmallCNN(n_tasks=2)")


def test_a_built_model_is_a_multi_task_module_that_pickles() -> None:
    from avalanche.models import MultiTaskModule, avalanche_forward

    torch.manual_seed(0)
    model = SmallCNN(in_channels=1, n_classes=[2, 3], n_tasks=2, input_size=8, widths=(4, 8), hidden=16)
    assert isinstance(model, MultiTaskModule) and isinstance(model, SmallCNN)
    assert type(model).__name__ == "SmallCNN" and type(model).__module__ == SmallCNN.__module__
    x, t = torch.randn(3, 1, 8, 8), torch.tensor([0, 1, 1])
    model.eval()
    expected = model(x, t)
    assert expected.shape == (3, 3)
    torch.testing.assert_close(avalanche_forward(model, x, t), expected, rtol=0, atol=0)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    for other in (pickle.loads(pickle.dumps(model)), copy.deepcopy(model),
                  torch.load(buffer, weights_only=False)):
        assert type(other) is type(model)
        torch.testing.assert_close(other(x, t), expected, rtol=0, atol=0)

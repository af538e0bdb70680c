"""docs/adding_a_method.md's example method (the folder docs/examples/dense_delta/), end to end:
its op and its Triton implementation against float64 autograd, then transform -> one training
step (rosafx.fit) -> merge -> save/load against a float64 model with W + scale·D; its PEFT
mapping (none: a clear error); that the folder plus one registry line is all a method needs
(its files import nothing else, and a fresh interpreter runs it with only that line added);
and every code block of the doc is quoted verbatim from the example's files, so the
walk-through cannot drift from code that runs."""
import ast
import importlib.util
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import rosafx
from rosafx.errors import RosafxError
from rosafx.methods import REGISTRY

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "docs/examples/dense_delta"
DOC = ROOT / "docs/adding_a_method.md"
# what the example folder may import besides itself: rosafx as shipped, torch, triton, stdlib
ALLOWED_IMPORTS = ("rosafx", "torch", "triton", "__future__", "dataclasses", "typing")

# A fresh interpreter: the example folder, copied elsewhere under another name, plus the
# registry line (the one line a method adds to rosafx/methods/__init__.py) is all it takes.
FRESH_RUN = """
import importlib.util, sys, tempfile, torch
import rosafx
from rosafx.errors import RosafxError
from rosafx.methods import REGISTRY

spec = importlib.util.spec_from_file_location("my_method", sys.argv[1] + "/__init__.py",
                                              submodule_search_locations=[sys.argv[1]])
my_method = importlib.util.module_from_spec(spec)
sys.modules["my_method"] = my_method
spec.loader.exec_module(my_method)
REGISTRY[my_method.DenseDelta.id] = my_method.DenseDelta()       # the registry line

torch.manual_seed(0)
model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4)).eval()
x = torch.randn(6, 8)
adapted = rosafx.transform(model, {"0": {"method": "dense-delta", "scale": 0.5}}, example_inputs=(x,))
rosafx.fit(adapted, [(x, torch.randn(6, 4))], lambda m, b: (m(b[0]) - b[1]).pow(2).mean(), steps=1,
           progress=False)
trained = adapted(x)
assert not torch.allclose(trained, model(x), atol=1e-4)
assert torch.allclose(rosafx.merge(adapted)(x), trained, atol=1e-5)
with tempfile.TemporaryDirectory() as tmp:
    rosafx.save(adapted, tmp + "/adapter")
    assert torch.allclose(rosafx.load(model, tmp + "/adapter", example_inputs=(x,))(x), trained, atol=1e-6)
    try:
        rosafx.save(adapted, tmp + "/peft", format="peft")
        raise SystemExit("format='peft' saved a method without a PEFT mapping")
    except RosafxError as error:
        assert "Save it with format='rosafx'" in str(error), error
lowered = rosafx.lower(adapted, "triton")
assert "dense_delta_linear_triton" in lowered.code
assert torch.allclose(lowered(x), trained, atol=1e-5)
from rosafx.cli.main import main
try:
    main(["methods"])
except SystemExit as exit:
    assert exit.code in (0, None)
print("ran")
"""


def _load_example():
    spec = importlib.util.spec_from_file_location("dense_delta_example", EXAMPLE / "__init__.py",
                                                  submodule_search_locations=[str(EXAMPLE)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module          # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


example = _load_example()


@pytest.fixture
def registered(monkeypatch):
    """The doc's registry line, for this test only."""
    monkeypatch.setitem(REGISTRY, "dense-delta", example.DenseDelta())


def test_op_forward_and_gradients_match_float64():
    g = torch.Generator().manual_seed(0)
    x, W, b, D = (torch.randn(*s, generator=g, requires_grad=True) for s in ((2, 3, 7), (5, 7), (5,), (5, 7)))
    y = torch.ops.rosafx.dense_delta_linear.default(x, W, b, D, 0.3)
    dy = torch.randn(y.shape, generator=g)
    grads = torch.autograd.grad(y, [x, W, b, D], dy)
    x64, W64, b64, D64 = (t.detach().double().requires_grad_() for t in (x, W, b, D))
    y64 = F.linear(x64, W64 + 0.3 * D64, b64)
    grads64 = torch.autograd.grad(y64, [x64, W64, b64, D64], dy.double())
    assert torch.allclose(y.double(), y64, atol=1e-5)
    for got, want in zip(grads, grads64):
        assert torch.allclose(got.double(), want, atol=1e-5)


def test_transform_train_merge_save_load(registered, tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4)).eval()
    x, target = torch.randn(6, 8), torch.randn(6, 4)
    adapted = rosafx.transform(model, {"0": {"method": "dense-delta", "scale": 0.5}}, example_inputs=(x,))
    assert [n for n, p in adapted.named_parameters() if p.requires_grad] == ["rosafx_adapters.0.delta"]
    assert torch.equal(adapted(x), model(x))                     # D = 0: unchanged at init

    loss_fn = lambda m, batch: (m(batch[0]) - batch[1]).pow(2).mean()  # noqa: E731
    rosafx.fit(adapted, [(x, target)], loss_fn, steps=1, schedule="constant", progress=False,
               optimizer=lambda params: torch.optim.SGD(params, lr=0.1))

    # float64 reference of the same step: D -= lr·∂L/∂D with y = relu(x·(W0 + s·D)ᵀ + b0)·W2ᵀ + b2
    W0, b0, W2, b2 = (t.detach().double() for t in (model[0].weight, model[0].bias, model[2].weight, model[2].bias))
    D = torch.zeros(8, 8, dtype=torch.float64, requires_grad=True)
    loss = (F.linear(torch.relu(F.linear(x.double(), W0 + 0.5 * D, b0)), W2, b2) - target.double()).pow(2).mean()
    (dD,) = torch.autograd.grad(loss, [D])
    want = F.linear(torch.relu(F.linear(x.double(), W0 + 0.5 * (-0.1 * dD), b0)), W2, b2)
    trained = adapted(x)
    assert torch.allclose(trained.double(), want, atol=1e-5)
    assert not torch.allclose(trained, model(x), atol=1e-4)      # the step did something

    merged = rosafx.merge(adapted)
    assert not any("delta" in n for n, _ in merged.named_parameters())
    assert torch.allclose(merged(x), trained, atol=1e-5)
    rosafx.save(adapted, tmp_path / "adapter")
    loaded = rosafx.load(model, tmp_path / "adapter", example_inputs=(x,))
    assert torch.allclose(loaded(x), trained, atol=1e-6)


def test_config_validation_is_the_methods(registered):
    model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    with pytest.raises(RosafxError, match="scale must be non-zero"):
        rosafx.transform(model, {"0": {"method": "dense-delta", "scale": 0}}, example_inputs=(torch.randn(2, 4),))


def test_the_triton_implementation_matches_float64(registered):
    """``lower`` finds the kernel module the op names (``op_spec(kernels=...)``); under
    TRITON_INTERPRET=1 on a CPU."""
    pytest.importorskip("triton")
    model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    adapted = rosafx.transform(model, {"0": {"method": "dense-delta"}}, example_inputs=(torch.randn(2, 4),))
    assert "dense_delta_linear_triton" in rosafx.lower(adapted, "triton").code
    g = torch.Generator().manual_seed(1)
    x, W, b, D = (torch.randn(*s, generator=g, requires_grad=True) for s in ((3, 9), (41, 9), (41,), (41, 9)))
    y = torch.ops.rosafx.dense_delta_linear_triton.default(x, W, b, D, -0.7)
    dy = torch.randn(y.shape, generator=g)
    grads = torch.autograd.grad(y, [x, W, b, D], dy)
    x64, W64, b64, D64 = (t.detach().double().requires_grad_() for t in (x, W, b, D))
    y64 = F.linear(x64, W64 - 0.7 * D64, b64)
    assert torch.allclose(y.double(), y64, atol=1e-5)
    for got, want in zip(grads, torch.autograd.grad(y64, [x64, W64, b64, D64], dy.double())):
        assert torch.allclose(got.double(), want, atol=1e-5)


def test_no_peft_mapping_is_a_clear_error(registered, tmp_path):
    model = torch.nn.Sequential(torch.nn.Linear(4, 4))
    adapted = rosafx.transform(model, {"0": {"method": "dense-delta"}}, example_inputs=(torch.randn(2, 4),))
    with pytest.raises(RosafxError, match=r"uses \['dense-delta'\]. Save it with format='rosafx'"):
        rosafx.save(adapted, tmp_path / "peft", format="peft")


def test_the_folder_imports_only_rosafx_and_itself():
    for path in EXAMPLE.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level:
                continue                                     # the folder's own files
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module] if isinstance(node, ast.ImportFrom) else []
            for name in names:
                assert name.split(".")[0] in ALLOWED_IMPORTS, f"{path.name} imports {name}"


@pytest.mark.slow   # a fresh interpreter: imports, a capture, a step, Triton in the interpreter
def test_the_folder_and_one_registry_line_are_all_a_method_needs(tmp_path):
    copy = tmp_path / "elsewhere"
    copy.mkdir()
    for path in EXAMPLE.glob("*.py"):
        (copy / path.name).write_text(path.read_text())
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(FRESH_RUN), str(copy)], cwd=tmp_path,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "dense-delta" in result.stdout and result.stdout.rstrip().endswith("ran")


def test_every_code_block_of_the_doc_is_quoted_from_the_example():
    """Python blocks are slices of the example's files; ``text`` blocks (the registry line, the
    commands) are not code of the example."""
    sources = {path.name: path.read_text() for path in EXAMPLE.glob("*.py")}
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)
    assert len(blocks) >= 6
    for block in blocks:
        assert any(block in source for source in sources.values()), f"doc block not in {EXAMPLE.name}/:\n{block}"

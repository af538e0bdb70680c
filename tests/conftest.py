"""Test-wide setup. Triton runs on a CPU-only machine only in interpreter mode, and the
variable must be set before any kernel is defined, so it is set here, first."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("PYTHONSAFEPATH", "1")  # subprocesses started in the checkout: kernels/ must not shadow HF's `kernels`


# ---------------------------------------------------------------- fault-matrix fixtures (tests/test_faults*.py)
import pytest  # noqa: E402


@pytest.fixture(scope="session")
def fault_models(tmp_path_factory):
    """One tiny model in every form the fault rows need, built once: an HF directory, a
    .pt2 of a plain module, and an adapter directory (rosafx adapt output) on that .pt2."""
    import torch

    from models import functional_linear, tiny_bert
    from rosafx.cli.main import main
    root = tmp_path_factory.mktemp("fault_models")
    tiny_bert()[0].save_pretrained(root / "bert")
    model, example = functional_linear()
    torch.export.save(torch.export.export(model, example), root / "f.pt2")
    try:
        main(["adapt", str(root / "f.pt2"), "--method", "lora", "--target", "proj", "--rank", "2",
              "-o", str(root / "adapter")])
    except SystemExit as exc:
        assert exc.code in (0, None)
    return {"hf": root / "bert", "pt2": root / "f.pt2", "adapter": root / "adapter", "example": example}


# ---------------------------------------------------------------- tiers: `make test-fast` runs what is not slow
# Files whose tests took over ~25 s together in one `make test` run (2 cores, 2026-12-03, under load):
# marked slow, so `make test-fast` (-m "not slow") stays under 2 minutes. `make test` runs everything.
SLOW_FILES = {
    "test_compiled_step.py", "test_lora_ga.py", "test_lora_invariants.py", "test_partial.py", "test_fit.py",
    "test_grad_checkpoint.py", "test_vera.py", "test_moe_experts.py", "test_architectures.py", "test_cli.py",
    "test_faults_runs.py", "test_rosa_robust.py", "test_train_cli.py", "test_rosa.py", "test_distributed.py",
    "test_hf_trainer.py", "test_faults_inputs.py", "test_fsdp.py", "test_gpu_training.py", "test_packing.py",
    "test_causal_lm_cli.py", "test_decoder_export.py", "test_quantize.py", "test_quantize_cli.py",
    "test_onnx_weights.py",
}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.path.name in SLOW_FILES:
            item.add_marker(pytest.mark.slow)

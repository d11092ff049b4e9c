"""Shared pytest fixtures."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DIR = REPO_ROOT.parent / "shared"

# Tests over ~5 s (on a 2-core CPU) are marked `slow`: `python -m pytest -m "not slow"` is the
# quick run, and CI's `python -m pytest -q` runs them all. Most carry @pytest.mark.slow where they
# are defined; these are marked here: the tests of modules that start the app in a subprocess
# server, the tests that use a module fixture taking a minute, and single tests by name.
SLOW_MODULES = {
    "test_app_server.py",  # every test talks to `python app.py` in a subprocess
    "test_app_default_model.py",  # the same, with the default model
}
SLOW_FIXTURES = {
    "test_export.py": {"bundle"},  # exports and verifies ONNX and TorchScript (about a minute)
}
SLOW_TESTS = {
    "test_app_units.py": {"test_a_presets_measured_steering_is_stated_only_when_recorded",
                          "test_a_failed_export_names_the_problem_and_leaves_no_zip",
                          "test_lean_imports_skip_gradios_stub_writer_and_unused_optional_packages"},
    "test_export.py": {"test_gpt2_with_layer_norm_euclidean_mean_via_the_python_api"},
    "test_hub.py": {"test_from_pretrained_reads_the_offline_hub_cache"},
    "test_llama2c.py": {"test_tokenizer_matches_llama2c_encode_on_real_stories",
                        "test_validation_loss_is_near_llama2c_report"},
    "test_original.py": {"test_a_per_site_model_exports_and_its_bundle_matches",
                         "test_a_base_named_inside_a_hub_repo_passes_the_apps_checks",
                         "test_source_and_base_from_the_offline_hub_cache"},
}


def pytest_collection_modifyitems(config, items):
    for item in items:
        module = item.path.name
        name = getattr(item, "originalname", item.name)
        if (module in SLOW_MODULES or name in SLOW_TESTS.get(module, ())
                or SLOW_FIXTURES.get(module, set()) & set(getattr(item, "fixturenames", ()))):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """The read-only ``../shared`` folder beside the checkout; skips the test when it is absent."""
    if not (SHARED_DIR / "README.md").is_file():
        pytest.skip(f"needs ../shared (looked in {SHARED_DIR}), which a fresh clone does not have")
    return SHARED_DIR

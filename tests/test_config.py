"""Invalid settings stop start-up with one clear line naming the variable."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from app.config import Settings, SettingsError, load_settings
from tests.conftest import REPO_ROOT


@pytest.mark.parametrize(
    ("variable", "value", "expected"),
    [
        ("DEVICE", "gpu", "DEVICE='gpu' is invalid: allowed: 'cpu', 'cuda' or 'auto'"),
        ("API_PORT", "70000", "API_PORT='70000' is invalid"),
        ("TEMPERATURE", "-1", "TEMPERATURE='-1' is invalid"),
        ("USE_LORA_DEFAULT", "maybe", "USE_LORA_DEFAULT='maybe' is invalid"),
        ("OLLAMA_BASE_URL", "localhost:11434", "OLLAMA_BASE_URL='localhost:11434' is invalid"),
    ],
)
def test_invalid_variable_is_named(monkeypatch: pytest.MonkeyPatch, variable: str, value: str, expected: str) -> None:
    monkeypatch.setenv(variable, value)
    with pytest.raises(SettingsError) as caught:
        load_settings(_env_file=None)
    assert expected in str(caught.value)
    assert len(str(caught.value).splitlines()) == 1


def test_defaults_match_the_documented_table() -> None:
    settings = load_settings(_env_file=None)
    assert settings.device == "cpu"
    assert (settings.max_new_tokens, settings.temperature, settings.top_p) == (512, 0.7, 0.9)
    assert (settings.api_host, settings.api_port) == ("127.0.0.1", 8001)
    assert settings.ollama_base_url == "http://localhost:11434" and settings.ollama_model == "qwen3:4b"
    assert settings.retrieval_top_k == 4 and settings.use_lora_default is True


def test_every_setting_is_in_the_env_template() -> None:
    from app.config import Settings

    template = (REPO_ROOT / ".env.lora").read_text(encoding="utf-8")
    missing = [name.upper() for name in Settings.model_fields if f"{name.upper()}=" not in template]
    assert missing == []


def test_launcher_refuses_bad_values_with_one_line_per_variable() -> None:
    env = {**os.environ, "DEVICE": "gpu", "API_PORT": "70000", "TEMPERATURE": "-1"}
    result = subprocess.run(
        [sys.executable, "start_lora_rag.py", "--config-check"],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 1  # --config-check's failures exit 1
    assert "Traceback" not in result.stderr
    for variable in ("DEVICE", "API_PORT", "TEMPERATURE"):
        assert sum(line.startswith(f"{variable}=") for line in result.stderr.splitlines()) == 1


def test_the_app_imports_no_model_library_until_a_model_loads() -> None:
    # The routers and services import torch, transformers, peft and faiss lazily: the app starts on the Ollama
    # backend without them, and `--config-check` answers in a second.
    code = ("import sys, app.main; "
            "print(sorted(m for m in ('torch', 'transformers', 'peft', 'faiss') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_remote_base_url_may_not_carry_credentials() -> None:
    with pytest.raises(SettingsError, match="REMOTE_BASE_URL.*REMOTE_API_KEY"):
        load_settings(_env_file=None, remote_base_url="http://user:sk-secret@gpu-host:8000/v1")
    assert load_settings(_env_file=None, remote_base_url="http://gpu-host:8000/v1/").remote_base_url.endswith("/v1")


def test_the_design_cards_settings_are_honoured_or_refused_never_ignored() -> None:
    def settings(**values: object) -> Settings:
        return load_settings(_env_file=None, **values)

    assert settings(batch_size=4).max_batch_size == 4  # BATCH_SIZE is MAX_BATCH_SIZE
    assert settings(batch_size=4, max_batch_size=4).max_batch_size == 4
    refusals = {
        "BATCH_SIZE=4 and MAX_BATCH_SIZE=8 disagree": {"batch_size": 4, "max_batch_size": 8},
        "BATCH_SIZE='many' is invalid": {"batch_size": "many"},
        "ENABLE_FP16='maybe' is invalid": {"enable_fp16": "maybe"},
        "CUDA_MEMORY_FRACTION=1.5 is invalid": {"cuda_memory_fraction": 1.5},
        "CUDA_MEMORY_FRACTION=0 is invalid": {"cuda_memory_fraction": 0},
        "PRELOAD_MODELS='sometimes' is invalid": {"preload_models": "sometimes"},
        "ENABLE_FP16=true asks for float16 but TORCH_DTYPE=bfloat16": {"enable_fp16": True,
                                                                        "torch_dtype": "bfloat16"},
    }
    for message, values in refusals.items():
        with pytest.raises(SettingsError) as refused:
            settings(**values)
        assert message in str(refused.value), (message, str(refused.value))

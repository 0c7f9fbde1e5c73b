"""`start_lora_rag.py` as a user runs it: a real process, real port, real HTTP."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from app.llm.model_source import resolve_base_model
from tests.conftest import CORPUS, REPO_ROOT, closed_port
from tests.ollama_wire_server import OllamaWireServer
from tests.test_adapters import _save_lora


def _env(tmp_path: Path, **variables: str) -> dict[str, str]:
    return {
        **os.environ,
        "VECTOR_STORE_PATH": str(tmp_path / "store"),
        "SAMPLE_CORPUS_PATH": str(CORPUS),
        "LORA_MODEL_PATH": str(tmp_path / "no-adapter"),
        "MAX_NEW_TOKENS": "16",
        "OLLAMA_BASE_URL": f"http://127.0.0.1:{closed_port()}",
        **variables,
    }


def _config_check(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "start_lora_rag.py", "--config-check", *args],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300,
    )


def test_config_check_reports_each_part_and_exit_status_follows_the_active_backend(tmp_path: Path) -> None:
    env = _env(tmp_path)
    lora = _config_check(env)
    assert lora.returncode == 0, lora.stdout + lora.stderr
    lines = lora.stdout.splitlines()
    parts = ("base model", "numeric path", "LoRA adapter", "vector store", "retrieval", "embedding model", "Ollama")
    for name in parts:
        assert any(name in line for line in lines), name
    assert any(line.startswith("[FAIL] Ollama") and "ollama serve" in line for line in lines)
    ollama_down = _config_check(env, "--use-lora", "false")
    assert ollama_down.returncode == 1 and "cannot serve" in ollama_down.stdout
    with OllamaWireServer(models=["qwen3:4b"]) as ollama:
        ollama_up = _config_check({**env, "OLLAMA_BASE_URL": ollama.base_url}, "--use-lora", "false")
    assert ollama_up.returncode == 0 and "[OK  ] Ollama" in ollama_up.stdout


def test_config_check_follows_default_backend_remote(tmp_path: Path) -> None:
    down = f"http://127.0.0.1:{closed_port()}/v1"
    unset = _config_check(_env(tmp_path, DEFAULT_BACKEND="remote"))
    unreachable = _config_check(_env(tmp_path, DEFAULT_BACKEND="remote", REMOTE_BASE_URL=down))
    flag_wins = _config_check(_env(tmp_path, DEFAULT_BACKEND="remote", REMOTE_BASE_URL=down), "--use-lora", "true")
    assert unset.returncode == 1 and "[FAIL] default backend: DEFAULT_BACKEND='remote'" in unset.stdout
    assert "set REMOTE_BASE_URL" in unset.stdout and "remote engine" not in unset.stdout  # not configured: not checked
    assert unreachable.returncode == 1 and "[FAIL] remote engine" in unreachable.stdout
    assert "active backend (remote): cannot serve" in unreachable.stdout
    assert flag_wins.returncode == 0 and "active backend (lora): can serve" in flag_wins.stdout


def test_bad_use_lora_value_is_a_usage_error(tmp_path: Path) -> None:
    result = _config_check(_env(tmp_path), "--use-lora", "maybe")
    assert result.returncode == 2 and "expected true or false" in result.stderr


@pytest.mark.parametrize(("variable", "value"), [("RETRIEVAL_MODE", "fancy"), ("HYBRID_FUSION", "average"),
                                               ("VECTOR_STORE_BACKEND", "elastic")])
def test_an_unknown_retrieval_name_stops_the_launcher_in_one_line(tmp_path: Path, variable: str, value: str) -> None:
    result = subprocess.run([sys.executable, "start_lora_rag.py"], cwd=REPO_ROOT, capture_output=True, text=True,
                            env=_env(tmp_path, **{variable: value}), timeout=300)
    assert result.returncode != 0 and f"{variable}='{value}' is unknown" in result.stderr
    assert "Traceback" not in result.stdout + result.stderr and not (tmp_path / "store").exists()


@pytest.mark.parametrize(("item", "message"), [
    ("x=/missing", "'/missing' is not a folder"),
    ("bad.name={folder}", "adapter name 'bad.name' is invalid"),
    ("={folder}", "adapter name '' is invalid"),
])
def test_a_bad_adapters_item_is_a_usage_error(tmp_path: Path, item: str, message: str) -> None:
    result = _config_check(_env(tmp_path), "--adapters", item.format(folder=tmp_path))
    assert result.returncode == 2 and message in result.stderr.splitlines()[-1], result.stderr
    assert "Traceback" not in result.stderr


@contextmanager
def _launched(env: dict[str, str], *args: str) -> Iterator[str]:
    """`start_lora_rag.py --port <free> *args` running until ready; yields its URL, stops it with Ctrl-C after."""
    port = closed_port()
    with _serving([sys.executable, "start_lora_rag.py", "--port", str(port), *args], port, env) as url:
        yield url


@contextmanager
def _serving(command: list[str], port: int, env: dict[str, str], log_path: Path | None = None) -> Iterator[str]:
    """`command`, run from the repository root, serving on `port` until ready; yields its URL, stops it with
    Ctrl-C after (and expects a clean exit). Its output goes to `log_path` (a file, not a pipe that could fill)."""
    with tempfile.TemporaryDirectory() as scratch:
        log = log_path or Path(scratch) / "server.log"
        with log.open("w") as output:
            process = subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=output, stderr=subprocess.STDOUT)
        try:
            url = f"http://127.0.0.1:{port}"
            deadline = time.monotonic() + 300
            while True:
                assert process.poll() is None, log.read_text()[-5000:]
                try:
                    if httpx.get(f"{url}/health/ready", timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                assert time.monotonic() < deadline, "the service did not become ready"
                time.sleep(0.5)
            yield url
        finally:
            process.send_signal(signal.SIGINT)
            process.wait(timeout=60)
    assert process.returncode == 0


@pytest.mark.slow
def test_service_starts_builds_its_store_and_answers(tmp_path: Path) -> None:
    with _launched(_env(tmp_path)) as url:
        answer = httpx.post(f"{url}/ask", json={"query": "Which cables are used for brakes?"}, timeout=120)
        assert answer.status_code == 200
        assert answer.json()["answer"].strip()
        assert answer.json()["source_documents"][0]["metadata"]["source"] == "corpus/bicycles.txt"
        assert (tmp_path / "store" / "CURRENT").is_file()


@pytest.mark.slow
def test_adapters_flag_serves_a_bare_folder_by_its_name_beside_lora_adapters(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(resolve_base_model("embedded:SmolLM2-135M-Instruct", None))
    adapter = _save_lora(base, tmp_path / "my-style", seed=3)
    env = _env(tmp_path, LORA_ADAPTERS_DIR=str(tmp_path / "no-adapters"), LORA_ADAPTERS=f"from-env={adapter}")
    with _launched(env, "--adapters", str(adapter), f"renamed={adapter}") as url:
        models = httpx.get(f"{url}/v1/models", timeout=10).json()["data"]
    assert {"my-style", "renamed", "from-env"} <= {model["id"] for model in models}


@pytest.mark.slow
def test_the_design_cards_start_up_commands_serve_as_the_launcher_does(tmp_path: Path) -> None:
    """Design card 003, methods 2 and 3, as written (host and port aside): `uvicorn app.lora_main:app` builds the
    store and answers on the LoRA model; `python -m app.lora_main` serves on API_PORT; `uvicorn app.main:app`
    (the "original RAG API") starts on the Ollama backend."""
    with OllamaWireServer(models=["qwen3:4b"]) as ollama:
        env = _env(tmp_path, OLLAMA_BASE_URL=ollama.base_url)
        port = closed_port()
        design = [sys.executable, "-m", "uvicorn", "app.lora_main:app", "--host", "127.0.0.1", "--port", str(port)]
        with _serving(design, port, env) as url:
            answer = httpx.post(f"{url}/ask", json={"query": "Which cables are used for brakes?"}, timeout=120)
            info = httpx.get(f"{url}/model_info", timeout=30).json()
        assert answer.status_code == 200 and answer.json()["model_used"] == "base"  # no adapter: the base model
        assert answer.json()["source_documents"][0]["metadata"]["source"] == "corpus/bicycles.txt"
        assert info["using_lora"] is True and (tmp_path / "store" / "CURRENT").is_file()

        port = closed_port()
        module = {**env, "API_PORT": str(port), "USE_LORA_DEFAULT": "false"}
        with _serving([sys.executable, "-m", "app.lora_main"], port, module) as url:
            assert httpx.get(f"{url}/model_info", timeout=30).json()["using_lora"] is False

        port = closed_port()
        original = [sys.executable, "-m", "uvicorn", "app.main:app", "--host", "127.0.0.1", "--port", str(port)]
        with _serving(original, port, env) as url:
            answer = httpx.post(f"{url}/ask", json={"query": "Which cables are used for brakes?"}, timeout=120)
        assert answer.status_code == 200 and answer.json()["model_used"] == "ollama"


def _refusals(url: str) -> dict[str, httpx.Response]:
    """Each kind of run-time change of what is served, tried once."""
    adapter = {"lora_name": "late", "lora_path": "late"}
    return {
        "switch_model": httpx.post(f"{url}/switch_model", json={"backend": "ollama"}, timeout=30),
        "admin load": httpx.post(f"{url}/admin/load-lora-adapter", json=adapter, timeout=30),
        "vllm load": httpx.post(f"{url}/v1/load_lora_adapter", json=adapter, timeout=30),
        "classifier load": httpx.post(f"{url}/api/v1/inference/models/load", json={"model_dir": "x"}, timeout=30),
        "upload": httpx.post(f"{url}/documents", files={"file": ("late.md", b"Late news.")}, timeout=30),
        "rollback": httpx.post(f"{url}/admin/vector-store/rollback", json={"version": "v000001"}, timeout=30),
    }


@pytest.mark.slow
def test_several_workers_serve_and_refuse_run_time_changes_that_would_reach_one_of_them(tmp_path: Path) -> None:
    """`start_lora_rag.py --workers 2` and the design card's `uvicorn app.lora_main:app --workers 2`: two processes
    answer on one port, each with its own model; a change of what is served is a 409 saying why, never a change
    in one worker only."""
    env, log = _env(tmp_path), tmp_path / "server.log"
    port = closed_port()
    with _serving([sys.executable, "start_lora_rag.py", "--port", str(port), "--workers", "2"], port, env, log) as url:
        answers = [httpx.post(f"{url}/ask", json={"query": "Which cables are used for brakes?"}, timeout=120)
                   for _ in range(3)]
        refused = _refusals(url)
        info = httpx.get(f"{url}/model_info", timeout=30)
    assert all(answer.status_code == 200 and answer.json()["answer"].strip() for answer in answers)
    assert info.status_code == 200 and info.json()["active_backend"] == "lora"
    for what, response in refused.items():
        assert response.status_code == 409, (what, response.text)
        body = response.json()
        error = body.get("error")
        code, message = (error["code"], error["message"]) if isinstance(error, dict) else (error, body["message"])
        assert code == "several_workers" and "worker processes" in message, (what, body)
    assert len(set(re.findall(r"Started server process \[(\d+)\]", log.read_text()))) == 2

    port = closed_port()
    design = [sys.executable, "-m", "uvicorn", "app.lora_main:app", "--port", str(port), "--workers", "2"]
    with _serving(design, port, env) as url:
        assert httpx.post(f"{url}/switch_model", json={"backend": "ollama"}, timeout=30).status_code == 409


def test_config_check_fails_naming_unknown_names_a_missing_default_adapter_and_bad_values(tmp_path: Path) -> None:
    """A typo is never silently ignored: a `.env` entry lora-rag does not know, a near miss of one of its names in
    the environment, DEFAULT_ADAPTER naming no adapter, an out-of-range value: exit 1, each named. ENABLE_FP16 on
    a CPU passes, saying it does not apply there."""

    def config_check(folder: Path, dotenv: str, **variables: str) -> subprocess.CompletedProcess[str]:
        folder.mkdir()
        (folder / ".env").write_text(dotenv, encoding="utf-8")
        return subprocess.run([sys.executable, str(REPO_ROOT / "start_lora_rag.py"), "--config-check"],
                              cwd=folder, env=_env(tmp_path, **variables), capture_output=True, text=True, timeout=300)

    fine = config_check(tmp_path / "fine", "MAX_NEW_TOKENS=16\n", ENABLE_FP16="true")
    assert fine.returncode == 0, fine.stdout + fine.stderr
    assert "[OK  ] settings" in fine.stdout and "ENABLE_FP16 applies on CUDA only" in fine.stdout

    typos = config_check(tmp_path / "typos", "BATCH_SIZ=4\n", DEFUALT_ADAPTER="sql", DEFAULT_ADAPTER="sqll")
    assert typos.returncode == 1, typos.stdout + typos.stderr
    assert "BATCH_SIZ is not a lora-rag setting; did you mean BATCH_SIZE?" in typos.stdout
    assert "DEFUALT_ADAPTER is not a lora-rag setting; did you mean DEFAULT_ADAPTER?" in typos.stdout
    assert "[FAIL] default adapter: DEFAULT_ADAPTER=sqll names no adapter found at start" in typos.stdout

    out_of_range = config_check(tmp_path / "range", "", CUDA_MEMORY_FRACTION="2")
    assert out_of_range.returncode == 1 and "CUDA_MEMORY_FRACTION=" in out_of_range.stderr
    assert "Traceback" not in out_of_range.stderr

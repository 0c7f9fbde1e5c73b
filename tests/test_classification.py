"""The classification service (/api/v1/inference) on the real SmolLM2 model, over a real uvicorn server.

The classifier is written here in the seed layout with plain PEFT + torch (a LoRA with random B, a head built so
that two clearly different texts get different labels), and every prediction is compared with a reference
computed by plain transformers + PEFT: AutoModelForSequenceClassification (the same base weights, its `score` set
to the head) with the same LoRA loaded by PEFT.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import pickle
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch

from app.llm.adapters.manager import CLASSIFIER_PREFIX
from app.llm.backends.hf import HFLoraBackend
from app.llm.manager import LORA
from app.llm.model_source import resolve_base_model
from app.main import create_app
from tests.conftest import make_settings, running_server

pytestmark = pytest.mark.slow

USER_KEY, ADMIN_KEY = "user-key-cls", "admin-key-cls"
USER, ADMIN = {"Authorization": f"Bearer {USER_KEY}"}, {"Authorization": f"Bearer {ADMIN_KEY}"}
TEXTS = ["The invoice for March is attached; please pay by Friday.", "我们的熊猫宝宝今天第一次爬树了！"]
LABELS = ["billing", "animals", "other"]
MAX_TEXTS = 64
BASE = "/api/v1/inference"


@dataclass(frozen=True)
class Parts:
    """A classifier as plain PEFT + torch make it, and the reference probabilities for TEXTS."""

    lora: Path
    weight: torch.Tensor
    bias: torch.Tensor
    reference: torch.Tensor  # [len(TEXTS), len(LABELS)]


def _reference_probabilities(base: str, lora: Path, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """AutoModelForSequenceClassification (score = the head's weight) with the LoRA, one text at a time."""
    from peft import LoraConfig, PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base)
    model = AutoModelForSequenceClassification.from_pretrained(base, num_labels=len(LABELS), dtype=torch.float32)
    with torch.no_grad():
        model.score.weight.copy_(weight)
    config = LoraConfig.from_pretrained(str(lora))
    config.task_type = None  # PEFT's plain wrapper: the LoRA layers on the classification model, nothing else
    model = PeftModel.from_pretrained(model, str(lora), config=config).eval()
    rows = []
    with torch.inference_mode():
        for text in TEXTS:
            ids = tokenizer(text, return_tensors="pt")["input_ids"]
            rows.append((model.get_base_model()(input_ids=ids).logits[0] + bias).softmax(-1))
    return torch.stack(rows)


@pytest.fixture(scope="module")
def base_model() -> str:
    return resolve_base_model("embedded:SmolLM2-135M-Instruct", None)


@pytest.fixture(scope="module")
def parts(base_model: str, tmp_path_factory: pytest.TempPathFactory) -> Parts:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = tmp_path_factory.mktemp("parts")
    tokenizer = AutoTokenizer.from_pretrained(base_model)
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(base_model, dtype=torch.float32),
        LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"),
    )
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.05)
        hidden = []
        for text in TEXTS:
            ids = tokenizer(text, return_tensors="pt")["input_ids"]
            hidden.append(model.get_base_model().model(input_ids=ids).last_hidden_state[0, -1])
    lora = folder / "lora"
    model.save_pretrained(lora, safe_serialization=True)
    # Row 0 points from the second text's features to the first's, row 1 the other way, both centred between
    # them (logit margins of 2 either way); row 2 is a weak random third label.
    difference, centre = hidden[0] - hidden[1], (hidden[0] + hidden[1]) / 2
    direction = difference * 2 / difference.norm() ** 2
    weight = torch.stack([direction, -direction, torch.randn(direction.shape, generator=generator) * 1e-3])
    bias = -(weight @ centre) * torch.tensor([1.0, 1.0, 0.0])
    reference = _reference_probabilities(base_model, lora, weight, bias)
    assert reference.argmax(-1).tolist() == [0, 1]  # the texts map to different labels
    assert 0.05 < float(reference[0, 0]) < 0.999  # probabilities not saturated: a real comparison
    return Parts(lora, weight, bias, reference)


def write_classifier(
    root: Path, name: str, parts: Parts, *, head: str = "pt", prefix: str = "score.", labels: str = "list",
    stem: str = "local-fc52a1", weight: torch.Tensor | None = None, label_names: list[str] | None = None,
) -> Path:
    """A classifier folder in the seed layout: <stem>.lora/, <stem>.head.pt (or .safetensors), labels."""
    from safetensors.torch import save_file

    folder = root / name
    folder.mkdir(parents=True)
    shutil.copytree(parts.lora, folder / f"{stem}.lora")
    w = parts.weight if weight is None else weight
    state = {f"{prefix}weight": w.clone(), f"{prefix}bias": parts.bias[: w.shape[0]].clone()}
    if head == "pt":
        torch.save(state, folder / f"{stem}.head.pt")
    else:
        save_file(state, str(folder / f"{stem}.head.safetensors"))
    names = label_names or LABELS
    forms: dict[str, object] = {"list": list(names), "label2idx": {n: i for i, n in enumerate(names)},
                                "idx2label": {i: n for i, n in reversed(list(enumerate(names)))}}
    if labels == "json":
        (folder / f"{stem}.labels.json").write_text(json.dumps({str(i): n for i, n in enumerate(names)}))
    else:
        (folder / f"{stem}.head.pt.pkl").write_bytes(pickle.dumps(forms[labels]))
    return folder


@dataclass
class Served:
    url: str
    app: Any
    root: Path
    adapters_dir: Path

    @property
    def backend(self) -> HFLoraBackend:
        backend = self.app.state.rag_service.models.loaded(LORA)
        assert isinstance(backend, HFLoraBackend)
        return backend

    def classifier_adapters(self) -> list[str]:
        model = self.backend.adapters.model
        return [name for name in getattr(model, "peft_config", {}) if name.startswith(CLASSIFIER_PREFIX)]


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, corpus_store: Path) -> Iterator[Served]:
    folder = tmp_path_factory.mktemp("served")
    root, adapters = folder / "classifiers", folder / "adapters"
    root.mkdir()
    adapters.mkdir()
    settings = make_settings(folder, vector_store_path=corpus_store, classifier_models_path=root,
                             lora_adapters_dir=adapters, numeric_path="float32", max_predict_texts=MAX_TEXTS,
                             api_keys=USER_KEY, admin_api_keys=ADMIN_KEY, max_new_tokens=24)
    app = create_app(settings)
    with running_server(app) as url:
        yield Served(url, app, root, adapters)


def _post(served: Served, path: str, body: dict[str, Any], headers: dict[str, str] = ADMIN) -> httpx.Response:
    return httpx.post(f"{served.url}{BASE}{path}", json=body, headers=headers, timeout=120)


def _load(served: Served, name: str, **extra: Any) -> httpx.Response:
    return _post(served, "/models/load", {"model_dir": name, **extra})


def _unload(served: Served, name: str) -> httpx.Response:
    return _post(served, "/models/unload", {"model_id": name})


def _predict(served: Served, name: str, texts: list[Any] = TEXTS, **extra: Any) -> httpx.Response:
    return _post(served, "/predict", {"model_id": name, "texts": texts, **extra}, USER)


@pytest.mark.parametrize(
    ("head", "prefix", "labels"),
    [("pt", "score.", "list"), ("safetensors", "classifier.", "label2idx"), ("pt", "", "idx2label"),
     ("safetensors", "score.", "json")],
)
@pytest.mark.numerics
def test_classifier_predicts_the_reference_with_each_format(
    served: Served, parts: Parts, head: str, prefix: str, labels: str
) -> None:
    name = f"clf-{head}-{labels}"
    write_classifier(served.root, name, parts, head=head, prefix=prefix, labels=labels)
    loaded = _load(served, name)
    assert loaded.status_code == 200, loaded.text
    assert loaded.json()["model_id"] == name and loaded.json()["status"] == "loaded"
    response = _predict(served, name, top_n=2)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model_id"] == name and body["labels"] == ["billing", "animals"]
    for row, text_reference in enumerate(parts.reference.tolist()):
        probabilities = body["label_probabilities"][row]
        assert list(probabilities) == LABELS
        assert [probabilities[label] for label in LABELS] == pytest.approx(text_reference, abs=1e-4)
        assert sum(probabilities.values()) == pytest.approx(1.0, abs=1e-5)
        top = body["top_n"][row]
        assert len(top) == 2 and top[0][0] == body["labels"][row] and top[0][1] >= top[1][1]
    assert _unload(served, name).json()["status"] == "unloaded"
    assert served.classifier_adapters() == []


def test_list_query_status_idempotent_load_unload(served: Served, parts: Parts) -> None:
    write_classifier(served.root, "alpha", parts)
    write_classifier(served.root, "beta.v2", parts, stem="other")
    (served.root / "not-a-classifier").mkdir()
    assert _load(served, "alpha").status_code == 200
    again = _load(served, "alpha", max_length=64)
    assert again.status_code == 200 and again.json()["status"] == "loaded"
    assert len(served.classifier_adapters()) == 1  # loading what is loaded attaches nothing more
    listing = httpx.get(f"{served.url}{BASE}/models", headers=USER, timeout=30).json()
    entries = {entry["model_id"]: entry for entry in listing["models"]}
    assert {"alpha", "beta.v2"} <= set(entries) and "not-a-classifier" not in entries
    assert entries["alpha"]["status"] == "loaded" and entries["alpha"]["gpu_id"] is None  # CPU
    assert entries["alpha"]["uptime_seconds"] >= 0
    assert entries["beta.v2"] == {"model_id": "beta.v2", "status": "unloaded", "gpu_id": None, "uptime_seconds": None}
    assert listing["total"] == len(listing["models"]) and listing["loaded_count"] == 1
    queried = _post(served, "/models/query", {"model_ids": ["beta.v2", "missing", "alpha"]}, USER).json()
    assert [entry["model_id"] for entry in queried["models"]] == ["beta.v2", "alpha"]
    assert queried["total"] == 2 and queried["loaded_count"] == 1
    empty = _post(served, "/models/query", {"model_ids": []}, USER)
    assert empty.status_code == 422 and empty.json()["error"] == "invalid_request"
    status = httpx.get(f"{served.url}{BASE}/status", headers=USER, timeout=30).json()
    assert status["service_status"] == "running" and status["total_workers"] == 1
    assert status["loaded_models_count"] == 1 and status["pending_requests"] == 0
    worker = status["workers"][0]
    assert worker["worker_id"] == "cpu-0" and worker["device"] == "cpu"
    assert worker["total_memory_mb"] > worker["free_memory_mb"] > 0
    assert worker["used_memory_mb"] == pytest.approx(worker["total_memory_mb"] - worker["free_memory_mb"], abs=0.2)
    assert 0 < worker["memory_usage_percent"] < 100 and worker["process_rss_mb"] > 100  # the model is in it
    assert _unload(served, "alpha").status_code == 200
    gone = _predict(served, "alpha")
    assert gone.status_code == 404 and gone.json()["error"] == "model_not_loaded"
    assert _unload(served, "alpha").json()["error"] == "model_not_loaded"
    assert served.classifier_adapters() == []


def test_prediction_validation_is_422_invalid_request(served: Served, parts: Parts) -> None:
    write_classifier(served.root, "valid", parts)
    assert _load(served, "valid").status_code == 200
    cases: list[dict[str, Any]] = [{"texts": []}, {"texts": ["x"] * (MAX_TEXTS + 1)}, {"texts": ["ok", 3]},
                                   {"texts": TEXTS, "top_n": 0}, {"texts": "not a list"}, {"texts": [""]}]
    for case in cases:
        response = _post(served, "/predict", {"model_id": "valid", **case}, USER)
        assert response.status_code == 422, case
        body = response.json()
        assert body["error"] == "invalid_request" and body["message"], case
    everything = _predict(served, "valid", top_n=50).json()
    assert [len(top) for top in everything["top_n"]] == [3, 3]
    unknown = _predict(served, "never-loaded")
    assert unknown.status_code == 404 and unknown.json()["error"] == "model_not_loaded"
    assert _unload(served, "valid").status_code == 200


def test_mismatches_are_refused_before_anything_is_attached(served: Served, parts: Parts, tmp_path: Path) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    write_classifier(served.root, "narrow-head", parts, weight=torch.ones(3, 64))
    write_classifier(served.root, "two-labels", parts, label_names=["a", "b"])
    foreign = write_classifier(served.root, "foreign", parts)
    tiny = LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, vocab_size=49152))
    from peft import LoraConfig, get_peft_model

    shutil.rmtree(foreign / "local-fc52a1.lora")
    get_peft_model(tiny, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"])).save_pretrained(
        foreign / "local-fc52a1.lora")
    expected = {"narrow-head": (422, "local-fc52a1.head.pt", "hidden size is 576"),
                "two-labels": (422, "local-fc52a1.head.pt.pkl", "2 labels"),
                "foreign": (400, "local-fc52a1.lora", "does not fit the base model")}
    for name, (status, file, reason) in expected.items():
        response = _load(served, name)
        assert response.status_code == status, (name, response.text)
        assert file in response.json()["message"] and reason in response.json()["message"], name
        assert served.classifier_adapters() == [], name
    seq_cls = write_classifier(served.root, "lm-head-saved", parts)
    config_path = seq_cls / "local-fc52a1.lora" / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config.update(task_type="SEQ_CLS", modules_to_save=["lm_head"])
    config_path.write_text(json.dumps(config))
    refused = _load(served, "lm-head-saved")
    assert refused.status_code == 400 and "modules_to_save" in refused.json()["message"]
    config.update(modules_to_save=["score"])  # a SEQ_CLS output naming its head: accepted, the head file wins
    config_path.write_text(json.dumps(config))
    assert _load(served, "lm-head-saved").status_code == 200
    assert _predict(served, "lm-head-saved").json()["labels"] == ["billing", "animals"]
    assert _unload(served, "lm-head-saved").status_code == 200
    listing = httpx.get(f"{served.url}/admin/adapters", headers=ADMIN, timeout=30).json()
    assert listing["adapters"] == []  # a classifier is never a generation adapter


def test_code_carrying_pickle_is_refused_and_never_runs(served: Served, parts: Parts, tmp_path: Path) -> None:
    marker = tmp_path / "created-by-the-pickle"

    class CreatesFile:
        def __reduce__(self) -> tuple[object, tuple[str, str]]:
            return open, (str(marker), "w")

    folder = write_classifier(served.root, "evil", parts)
    (folder / "local-fc52a1.head.pt.pkl").write_bytes(pickle.dumps(["billing", "animals", CreatesFile()]))
    response = _load(served, "evil")
    assert response.status_code == 400 and response.json()["error"] == "invalid_classifier"
    assert "local-fc52a1.head.pt.pkl" in response.json()["message"]
    assert not marker.exists()
    assert served.classifier_adapters() == []


def test_paths_outside_the_classifier_root_are_refused(served: Served, parts: Parts, tmp_path: Path) -> None:
    outside = write_classifier(tmp_path, "outside", parts)
    os.symlink(outside, served.root / "linked-out")
    for model_dir in ("../outside", "/etc", "linked-out", "a/../b", "..", "%2e%2e"):
        response = _load(served, model_dir)
        assert response.status_code == 400, (model_dir, response.text)
        assert response.json()["error"] == "invalid_classifier"
    missing = _load(served, "no-such-folder")
    assert missing.status_code == 404 and missing.json()["error"] == "model_not_found"
    assert served.classifier_adapters() == []


def test_roles_follow_the_service_keys(served: Served, parts: Parts) -> None:
    write_classifier(served.root, "roles", parts)
    as_user = _post(served, "/models/load", {"model_dir": "roles"}, USER)
    assert as_user.status_code == 403 and as_user.json()["error"] == "forbidden"
    anonymous = httpx.get(f"{served.url}{BASE}/models", timeout=30)
    assert anonymous.status_code == 401 and anonymous.json()["error"] == "unauthorized"
    assert _load(served, "roles").status_code == 200
    assert _predict(served, "roles").status_code == 200
    assert _post(served, "/models/unload", {"model_id": "roles"}, USER).status_code == 403
    assert _unload(served, "roles").status_code == 200


def _ask(served: Served, **adapter: Any) -> str:
    response = httpx.post(f"{served.url}/ask", json={"query": "How many kilograms does a blue basket hold?",
                                                      **adapter}, headers=USER, timeout=120)
    assert response.status_code == 200, response.text
    return str(response.json()["answer"])


async def _asks_during_predictions(served: Served, model_id: str) -> tuple[str, str, list[list[str]]]:
    predicted: list[list[str]] = []
    async with httpx.AsyncClient(base_url=served.url, timeout=180, headers=USER) as client:
        done = asyncio.Event()

        async def predict_loop() -> None:
            while not done.is_set():
                response = await client.post(f"{BASE}/predict", json={"model_id": model_id, "texts": TEXTS})
                predicted.append(response.json()["labels"])

        async def ask(**adapter: Any) -> str:
            response = await client.post("/ask", json={"query": "How many kilograms does a blue basket hold?",
                                                       **adapter})
            return str(response.json()["answer"])

        loop = asyncio.create_task(predict_loop())
        await asyncio.sleep(0.2)
        base = await ask(adapter="__base__")
        adapted = await ask(adapter="gen")
        done.set()
        await loop
    return base, adapted, predicted


@pytest.mark.numerics
def test_generation_is_unchanged_around_classifier_use(served: Served, parts: Parts, base_model: str) -> None:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base_before = _ask(served)
    assert not hasattr(served.backend.adapters.model, "peft_config")  # no adapter at all yet
    generation = get_peft_model(AutoModelForCausalLM.from_pretrained(base_model),
                                LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "o_proj"]))
    with torch.no_grad():
        for name, parameter in generation.named_parameters():
            if "lora_B" in name:
                # Strong enough that greedy decoding leaves the base answer on every CPU's numerics (0.1 did
                # not on one CI machine).
                parameter.copy_(torch.randn(parameter.shape, generator=torch.Generator().manual_seed(3)) * 0.25)
    generation.save_pretrained(served.adapters_dir / "gen")
    loaded = httpx.post(f"{served.url}/admin/load-lora-adapter", headers=ADMIN, timeout=120,
                        json={"lora_name": "gen", "lora_path": "gen"})
    assert loaded.status_code == 200, loaded.text
    adapted_before = _ask(served, adapter="gen")
    assert adapted_before != base_before
    write_classifier(served.root, "around", parts)
    assert _load(served, "around").status_code == 200
    assert _ask(served, adapter="__base__") == base_before and _ask(served, adapter="gen") == adapted_before
    assert _predict(served, "around").json()["labels"] == ["billing", "animals"]
    assert _ask(served, adapter="__base__") == base_before and _ask(served, adapter="gen") == adapted_before
    # Predictions back to back while both answers decode: they run between decode steps, each followed by the
    # batch's own arrangement again (the base model plain, or gen folded in), and change nothing in the answers.
    base_during, adapted_during, predicted = asyncio.run(_asks_during_predictions(served, "around"))
    assert (base_during, adapted_during) == (base_before, adapted_before)
    assert predicted and all(labels == ["billing", "animals"] for labels in predicted)
    assert _unload(served, "around").status_code == 200
    assert _ask(served, adapter="__base__") == base_before and _ask(served, adapter="gen") == adapted_before
    assert httpx.post(f"{served.url}/admin/unload-lora-adapter", headers=ADMIN, timeout=60,
                      json={"lora_name": "gen"}).status_code == 200
    # The classifier as the only PEFT adapter: attached on the plain model, removed with the LoRA layers.
    assert _load(served, "around").status_code == 200
    assert _predict(served, "around").json()["labels"] == ["billing", "animals"]
    assert _unload(served, "around").status_code == 200
    assert not hasattr(served.backend.adapters.model, "peft_config")
    assert _ask(served) == base_before


def test_queued_prediction_completes_across_an_unload(served: Served, parts: Parts) -> None:
    write_classifier(served.root, "inflight", parts)
    assert _load(served, "inflight").status_code == 200
    texts = [TEXTS[n % 2] for n in range(MAX_TEXTS)]

    async def scenario() -> tuple[httpx.Response, httpx.Response, list[int]]:
        async with httpx.AsyncClient(base_url=served.url, timeout=180) as client:
            # A generation first, so the prediction waits in the engine's queue behind it.
            ask = asyncio.create_task(client.post("/ask", json={"query": "Tell me about apple harvests."},
                                                  headers=USER))
            await asyncio.sleep(0.3)
            predict = asyncio.create_task(client.post(f"{BASE}/predict", headers=USER, json={
                "model_id": "inflight", "texts": texts, "batch_size": 4}))
            pending: list[int] = []
            for _ in range(200):
                await asyncio.sleep(0.02)
                status = (await client.get(f"{BASE}/status", headers=USER)).json()
                pending.append(status["pending_requests"])
                if status["pending_requests"]:
                    break
            unload = await client.post(f"{BASE}/models/unload", headers=ADMIN, json={"model_id": "inflight"})
            await ask
            return await predict, unload, pending

    predicted, unloaded, pending = asyncio.run(scenario())
    assert pending[-1] >= 1  # the prediction was queued when the unload came
    assert predicted.status_code == 200, predicted.text
    assert predicted.json()["labels"] == ["billing", "animals"] * (MAX_TEXTS // 2)
    assert unloaded.status_code == 200 and unloaded.json()["status"] == "unloaded"
    after = _predict(served, "inflight")
    assert after.status_code == 404 and after.json()["error"] == "model_not_loaded"
    assert served.classifier_adapters() == []


def test_ollama_only_answers_503(tmp_path: Path, corpus_store: Path) -> None:
    app = create_app(make_settings(tmp_path, vector_store_path=corpus_store, use_lora_default=False))
    with running_server(app) as url:
        response = httpx.get(f"{url}{BASE}/models", timeout=30)
        status = httpx.get(f"{url}{BASE}/status", timeout=30)
    assert response.status_code == 503 and "lora backend" in response.json()["message"]
    assert status.status_code == 200 and status.json()["service_status"] == "error"


def test_a_large_prediction_shares_the_engine_and_stops_when_its_client_leaves(served: Served, parts: Parts) -> None:
    """A prediction far larger than one turn (64 texts of 256 tokens at batch_size 64) runs in turns of at most
    PREDICTION_TURN_TOKENS: an answer asked after it started is done before it. And when its client hangs up, the
    rest of it is dropped: a small prediction sent then answers long before the whole one could have."""
    write_classifier(served.root, "bulk", parts)
    assert _load(served, "bulk", max_length=256).status_code == 200
    long_text = " ".join([TEXTS[0]] * 40)  # over 256 tokens: cut to 256
    bulk = {"model_id": "bulk", "texts": [long_text] * MAX_TEXTS, "batch_size": MAX_TEXTS}

    async def until_pending(client: httpx.AsyncClient) -> None:
        for _ in range(500):
            if (await client.get(f"{BASE}/status", headers=USER)).json()["pending_requests"]:
                return
            await asyncio.sleep(0.02)
        raise AssertionError("the prediction never showed as pending")

    async def shared() -> tuple[float, float, float, httpx.Response]:
        async with httpx.AsyncClient(base_url=served.url, timeout=300) as client:
            started = time.monotonic()
            predict = asyncio.create_task(client.post(f"{BASE}/predict", headers=USER, json=bulk))
            await until_pending(client)
            await asyncio.sleep(0.5)
            answer = await client.post("/v1/chat/completions", headers=USER, json={
                "model": "SmolLM2-135M-Instruct", "messages": [{"role": "user", "content": "Name a fruit."}],
                "max_tokens": 8})
            assert answer.status_code == 200, answer.text
            answered = time.monotonic()
            predicted = await predict
            return started, answered, time.monotonic(), predicted

    started, answered, finished, predicted = asyncio.run(shared())
    labels = predicted.json()["labels"]
    assert predicted.status_code == 200 and len(labels) == MAX_TEXTS and len(set(labels)) == 1  # one text, 64 times
    whole = finished - started
    assert answered - started < whole / 2, whole  # before, the answer waited for the one forward of all 64 rows

    async def abandoned() -> float:
        async with httpx.AsyncClient(base_url=served.url, timeout=300) as client:
            predict = asyncio.create_task(client.post(f"{BASE}/predict", headers=USER, json=bulk))
            await until_pending(client)
            await asyncio.sleep(0.5)
            predict.cancel()  # the client hangs up
            with contextlib.suppress(asyncio.CancelledError):
                await predict
            left = time.monotonic()
            small = await client.post(f"{BASE}/predict", headers=USER, json={"model_id": "bulk", "texts": TEXTS})
            assert small.status_code == 200 and small.json()["labels"] == ["billing", "animals"]
            return time.monotonic() - left

    assert asyncio.run(abandoned()) < whole / 2, whole
    assert _unload(served, "bulk").status_code == 200

"""Classifier files without the model: label forms, head state_dicts, the no-globals unpickler, folder containment."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import pytest
import torch

from app.classification.heads import check_fits, labels_from, read_head, read_labels, safe_unpickle
from app.classification.service import check_classifier_config, find_classifier_files, is_loadable
from app.errors import ClassifierError, ClassifierMismatchError, ClassifierNotFoundError
from app.llm.adapters.inspect import AdapterInfo


class _CreatesFile:
    """Unpickled by a plain unpickler, this calls open(path, "w"): the file appears."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[object, tuple[str, str]]:
        return open, (str(self.path), "w")


def _evil_labels(marker: Path) -> bytes:
    return pickle.dumps(["negative", "positive", _CreatesFile(marker)])


@pytest.mark.parametrize(
    "value",
    [["neg", "pos", "neu"], ("neg", "pos", "neu"), {"neg": 0, "pos": 1, "neu": 2}, {2: "neu", 0: "neg", 1: "pos"},
     {"0": "neg", "1": "pos", "2": "neu"}, {"id2label": {"0": "neg", "1": "pos", "2": "neu"}},
     {"labels": ["neg", "pos", "neu"]}, {"id2label": {0: "neg", 1: "pos", 2: "neu"}, "label2id": {"neg": 0}}],
)
def test_every_label_form_gives_the_labels_in_index_order(value: object) -> None:
    assert labels_from(value, "x.labels.json") == ["neg", "pos", "neu"]


@pytest.mark.parametrize(
    ("value", "message"),
    [([], "1 to"), (["a", "a"], "not distinct"), ({"a": 0, "b": 2}, "exactly 0..1"), ({"a": "b"}, "label: index"),
     ([None], "non-empty string"), ("abc", "must hold a list"), ({"a": True}, "label: index")],
)
def test_bad_label_mappings_are_refused_naming_the_file(value: object, message: str) -> None:
    with pytest.raises(ClassifierError, match=message) as caught:
        labels_from(value, "m.head.pt.pkl")
    assert "m.head.pt.pkl" in caught.value.message


@pytest.mark.parametrize(
    ("file", "content", "message"),
    [("m.labels.json", '{"a": ' + "9" * 6000 + "}", "not valid JSON"),  # past Python's integer digit limit
     ("m.labels.json", "[" * 200_000 + "]" * 200_000, "not valid JSON"),  # nested past the stack
     ("m.labels.json", '["\\ud800", "b"]', "not valid Unicode"),  # a lone surrogate, as JSON may escape it
     ("m.head.pt.pkl", pickle.dumps({"a": 10**6000, "b": 1}), "label: index"),
     ("m.head.pt.pkl", pickle.dumps({10**6000: "a"}), "label: index")],
)
def test_crafted_label_files_are_refused_naming_the_file(
    tmp_path: Path, file: str, content: str | bytes, message: str
) -> None:
    path = tmp_path / file
    path.write_bytes(content.encode() if isinstance(content, str) else content)
    with pytest.raises(ClassifierError, match=message) as caught:
        read_labels(path)
    assert file in caught.value.message


def test_plain_pickle_of_labels_is_read(tmp_path: Path) -> None:
    path = tmp_path / "m.head.pt.pkl"
    path.write_bytes(pickle.dumps({"neg": 0, "pos": 1}))
    assert read_labels(path) == ["neg", "pos"]
    (tmp_path / "m.labels.json").write_text(json.dumps(["a", "b"]))
    assert read_labels(tmp_path / "m.labels.json") == ["a", "b"]


def test_code_carrying_pickle_is_refused_and_never_runs(tmp_path: Path) -> None:
    control = tmp_path / "control-created"
    pickle.loads(_evil_labels(control))  # a plain unpickler runs it: the payload is real
    assert control.exists()
    marker = tmp_path / "must-not-exist"
    path = tmp_path / "evil.head.pt.pkl"
    path.write_bytes(_evil_labels(marker))
    with pytest.raises(ClassifierError, match="evil.head.pt.pkl") as caught:
        read_labels(path)
    assert "io.open" in caught.value.message and caught.value.status_code == 400
    assert not marker.exists()
    for protocol in range(pickle.HIGHEST_PROTOCOL + 1):  # every opcode family that reaches a global
        with pytest.raises(pickle.UnpicklingError):
            safe_unpickle(pickle.dumps(_CreatesFile(marker), protocol=protocol))
    assert not marker.exists()


def test_damaged_pickle_is_a_400_not_a_crash(tmp_path: Path) -> None:
    path = tmp_path / "m.head.pt.pkl"
    path.write_bytes(b"\x80\x04not a pickle")
    with pytest.raises(ClassifierError, match="m.head.pt.pkl"):
        read_labels(path)


@pytest.mark.parametrize("prefix", ["", "score.", "classifier.", "head.linear."])
@pytest.mark.parametrize("fmt", ["pt", "safetensors"])
def test_head_with_one_key_prefix_in_either_format(tmp_path: Path, prefix: str, fmt: str) -> None:
    from safetensors.torch import save_file

    weight, bias = torch.randn(3, 8), torch.randn(3)
    state = {f"{prefix}weight": weight, f"{prefix}bias": bias}
    path = tmp_path / f"m.head.{fmt}"
    if fmt == "pt":
        torch.save(state, path)
    else:
        save_file(state, str(path))
    head = read_head(path)
    assert head.rows == 3 and head.width == 8
    assert torch.equal(head.weight, weight) and torch.equal(head.bias, bias)


def test_head_without_bias_gets_zeros(tmp_path: Path) -> None:
    torch.save({"score.weight": torch.ones(2, 4)}, tmp_path / "m.head.pt")
    assert torch.equal(read_head(tmp_path / "m.head.pt").bias, torch.zeros(2))


@pytest.mark.parametrize(
    ("state", "message"),
    [({"score.weight": torch.ones(2, 4), "other.bias": torch.ones(2)}, "one Linear"),
     ({"a.weight": torch.ones(2, 4), "b.weight": torch.ones(2, 4)}, "exactly one"),
     ({"weight": torch.ones(4)}, "2-D"),
     ({"weight": torch.ones(2, 4, dtype=torch.int64)}, "floating-point"),
     ({"weight": torch.ones(2, 4), "bias": torch.ones(3)}, "3 entries"),
     ({"weight": torch.full((2, 4), float("nan"))}, "NaN"),
     ({"weight": torch.full((2, 4), 1e37)}, "overflow float32"),  # finite, but no input would give a probability
     ([torch.ones(2, 4)], "state_dict")],
)
def test_bad_heads_are_refused_naming_the_file(tmp_path: Path, state: object, message: str) -> None:
    torch.save(state, tmp_path / "m.head.pt")
    with pytest.raises(ClassifierError, match=message) as caught:
        read_head(tmp_path / "m.head.pt")
    assert "m.head.pt" in caught.value.message


class _Module(torch.nn.Linear):
    pass


def test_head_pickled_as_an_object_is_refused_by_weights_only(tmp_path: Path) -> None:
    torch.save(_Module(4, 2), tmp_path / "m.head.pt")  # a whole module: loading it would import this class
    with pytest.raises(ClassifierError, match=r"m\.head\.pt cannot be read"):
        read_head(tmp_path / "m.head.pt")


def test_head_and_labels_must_fit_the_model_and_each_other(tmp_path: Path) -> None:
    torch.save({"weight": torch.ones(2, 4)}, tmp_path / "m.head.pt")
    head = read_head(tmp_path / "m.head.pt")
    check_fits(head, ["a", "b"], 4, "m.labels.json")
    with pytest.raises(ClassifierMismatchError, match="hidden size is 576") as caught:
        check_fits(head, ["a", "b"], 576, "m.labels.json")
    assert caught.value.status_code == 422
    with pytest.raises(ClassifierMismatchError, match="3 labels but the head in m.head.pt has 2 rows"):
        check_fits(head, ["a", "b", "c"], 4, "m.labels.json")


def _folder(root: Path, name: str = "clf", stem: str = "local-fc52") -> Path:
    folder = root / name
    (folder / f"{stem}.lora").mkdir(parents=True)
    (folder / f"{stem}.lora" / "adapter_config.json").write_text("{}")
    (folder / f"{stem}.lora" / "adapter_model.safetensors").write_bytes(b"")
    torch.save({"weight": torch.ones(2, 4)}, folder / f"{stem}.head.pt")
    (folder / f"{stem}.head.pt.pkl").write_bytes(pickle.dumps(["a", "b"]))
    return folder


def test_files_are_found_from_the_one_lora_folder(tmp_path: Path) -> None:
    folder = _folder(tmp_path)
    files = find_classifier_files(tmp_path, "clf")
    assert files.lora.name == "local-fc52.lora" and files.head.name == "local-fc52.head.pt"
    assert files.labels.name == "local-fc52.head.pt.pkl" and files.model_id == "clf"
    (folder / "local-fc52.labels.json").write_text('["a", "b"]')  # JSON is preferred when both are there
    assert find_classifier_files(tmp_path, "clf").labels.name == "local-fc52.labels.json"
    (folder / "second.lora").mkdir()
    with pytest.raises(ClassifierError, match="exactly one"):
        find_classifier_files(tmp_path, "clf")
    assert not is_loadable(tmp_path, "clf")


@pytest.mark.parametrize("name", ["../clf", "..", "/etc", "a/b", "clf/../clf", "", ".hidden", "x\x00"])
def test_model_dir_must_be_a_plain_folder_name(tmp_path: Path, name: str) -> None:
    _folder(tmp_path / "root")
    with pytest.raises(ClassifierError, match="not a folder name"):
        find_classifier_files(tmp_path / "root", name)


def test_symlinks_out_of_the_root_are_refused(tmp_path: Path) -> None:
    root = tmp_path / "root"
    outside = _folder(tmp_path / "outside")
    root.mkdir()
    os.symlink(outside, root / "linked")
    with pytest.raises(ClassifierError, match="outside CLASSIFIER_MODELS_PATH"):
        find_classifier_files(root, "linked")
    inside = _folder(root, "clf")
    (inside / "local-fc52.head.pt").unlink()
    os.symlink(outside / "local-fc52.head.pt", inside / "local-fc52.head.pt")
    with pytest.raises(ClassifierError, match="links outside"):
        find_classifier_files(root, "clf")
    with pytest.raises(ClassifierNotFoundError):
        find_classifier_files(root, "missing")


def _info(tmp_path: Path, **config: object) -> AdapterInfo:
    folder = tmp_path / "m.lora"
    folder.mkdir(exist_ok=True)
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", **config}))
    return AdapterInfo(folder, None, 8, 16.0, [], 0, False)


def test_classifier_config_allows_seq_cls_and_the_head_only(tmp_path: Path) -> None:
    check_classifier_config(_info(tmp_path, task_type="SEQ_CLS", modules_to_save=["score", "classifier"]))
    check_classifier_config(_info(tmp_path, task_type="CAUSAL_LM", modules_to_save=None))
    check_classifier_config(_info(tmp_path, task_type="FEATURE_EXTRACTION"))  # what scripts/finetune_lora.py writes
    with pytest.raises(ClassifierError, match="modules_to_save"):
        check_classifier_config(_info(tmp_path, modules_to_save=["lm_head"]))
    with pytest.raises(ClassifierError, match="task_type"):
        check_classifier_config(_info(tmp_path, task_type="SEQ_2_SEQ_LM"))

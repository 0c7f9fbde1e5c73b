"""The typed adapter choice a request carries to the engine, and the job module that needs no torch."""

from __future__ import annotations

import subprocess
import sys

from app.llm.engine.jobs import BASE_MODEL, AdapterChoice
from tests.conftest import REPO_ROOT


def test_a_choice_says_what_it_is_without_being_parsed_back() -> None:
    mix = AdapterChoice((("sql", 0.7), ("code", 0.3)))
    assert (BASE_MODEL.is_base, BASE_MODEL.key, BASE_MODEL.names) == (True, "__base__", ())
    assert (AdapterChoice.single("sql").key, AdapterChoice.single("sql").is_mix) == ("sql", False)
    assert mix.is_mix and mix.names == ("sql", "code") and mix.weights == (0.7, 0.3)
    assert mix.key == "code*0.3+sql*0.7"  # names sorted: the same mix however it was written
    assert AdapterChoice((("code", 0.3), ("sql", 0.7))).peft_name == mix.peft_name
    assert mix.peft_name.startswith("mix_") and "." not in mix.peft_name  # PEFT names become module keys
    assert AdapterChoice((("sql", 0.5),)).is_mix  # one adapter at another weight is a mix of one


def test_the_job_module_imports_no_torch() -> None:
    script = "import sys, app.llm.engine.jobs; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", script], cwd=REPO_ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"

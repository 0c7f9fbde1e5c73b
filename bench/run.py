"""Benchmarks of lora-rag: one command, a markdown table on stdout, JSON in bench/results/.

    python bench/run.py                 # every section (about 10 minutes on 2 cores), -> bench/results/latest.json
    python bench/run.py --quick         # tiny sizes, a smoke run (-> bench/results/quick.json)
    python bench/run.py --only 3,7      # some sections
    python bench/run.py --update-doc    # also write the table into docs/performance.md

Sections: 1 adapter change vs reload, 2 LoRA decode overhead, 3 many clients on many adapters (live server),
4 decode vs llama.cpp (when installed: bash bench/setup_peer.sh), 5 retrieval latency, 6 ingestion throughput,
7 /ask end to end streamed, with the server's peak RSS (live server), 8 numeric paths (dtype per CPU level),
9 retrieval quality (recall@1/@4, MRR per RETRIEVAL_MODE, English and Chinese, bench/data),
10 classification (predict p50 for 16 short texts; /ask decode alone and while predictions run),
11 a Qwen2.5-1.5B-shaped model (random weights) beside SmolLM2: bare vs served decode, prefill, bandwidth ceiling,
12 the engine: a stream's gaps while a prompt prefills per PREFILL_CHUNK_TOKENS, what the prefix cache saves, 1 to 16
clients on the Qwen2.5-1.5B-shaped model, 13 structured output (compiling a schema; constrained vs free decode).
Absolute times on a shared machine are noisy: compare the ratios, which are measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import (  # noqa: E402
    backend_bench,
    classification_bench,
    engine_bench,
    numerics_bench,
    qwen_shaped_bench,
    retrieval_bench,
    retrieval_quality,
    serving_bench,
    structured_bench,
)
from bench.common import (  # noqa: E402
    REPO_ROOT,
    RESULTS_DIR,
    Context,
    Row,
    SectionResult,
    as_json,
    machine,
    markdown_table,
)

SECTIONS: dict[int, tuple[str, Callable[[Context], SectionResult]]] = {
    1: ("adapter change vs reload", backend_bench.adapter_change),
    2: ("LoRA decode overhead", backend_bench.lora_overhead),
    3: ("many clients, many adapters (live server)", serving_bench.many_adapters),
    4: ("decode vs llama.cpp", backend_bench.llamacpp),
    5: ("retrieval latency", retrieval_bench.retrieval),
    6: ("ingestion throughput", retrieval_bench.ingestion),
    7: ("/ask end to end (live server)", serving_bench.ask_end_to_end),
    8: ("numeric paths", numerics_bench.numeric_paths),
    9: ("retrieval quality", retrieval_quality.retrieval_quality),
    10: ("classification beside generation", classification_bench.classification),
    11: ("a Qwen2.5-1.5B-shaped model", qwen_shaped_bench.qwen_shaped),
    12: ("continuous batching, chunked prefill, prefix cache", engine_bench.engine),
    13: ("structured output", structured_bench.structured),
}
# In-process sections first, the live server's last, so the server never competes with them for the cores; 12 after
# 11, which builds the Qwen2.5-1.5B-shaped model both use.
RUN_ORDER = (8, 5, 6, 9, 1, 2, 10, 11, 12, 13, 4, 3, 7)
DOC = REPO_ROOT / "docs" / "performance.md"
DOC_BEGIN, DOC_END = "<!-- bench:begin -->", "<!-- bench:end -->"


def _sections(text: str) -> list[int]:
    numbers = [int(part) for part in text.split(",") if part.strip()]
    unknown = [number for number in numbers if number not in SECTIONS]
    if unknown:
        raise argparse.ArgumentTypeError(f"no section {unknown}; sections are {sorted(SECTIONS)}")
    return numbers


def machine_line(facts: dict[str, object]) -> str:
    candidates = ", ".join(facts["auto_candidates"])  # type: ignore[arg-type]
    return (f"{facts['cpu']} ({facts['cpu_capability']}; NUMERIC_PATH=auto measures {candidates}), "
            f"{facts['cores_usable']} cores usable, {facts['memory_gb']} GB RAM, "
            f"{facts['os']}, Python {facts['python']}, torch {facts['torch']} ({facts['torch_threads']} threads)")


def update_doc(command: str, when: str, facts: dict[str, object], load_end: float, table: str) -> None:
    text = DOC.read_text(encoding="utf-8")
    if DOC_BEGIN not in text or DOC_END not in text:
        raise SystemExit(f"{DOC} has no {DOC_BEGIN} ... {DOC_END} block to replace")
    block = (f"{DOC_BEGIN}\nCommand: `{command}`, {when}.\n\nMachine: {machine_line(facts)}; load average "
             f"{facts['load_average_1min']} at the start, {load_end:.2f} at the end.\n\n{table}\n{DOC_END}")
    head, rest = text.split(DOC_BEGIN, 1)
    DOC.write_text(head + block + rest.split(DOC_END, 1)[1], encoding="utf-8")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny sizes: checks every section works (a minute or two)")
    parser.add_argument("--only", type=_sections, default=list(SECTIONS), metavar="N,N",
                        help="sections to run, e.g. 3,7 (default: all)")
    parser.add_argument("--out", type=Path,
                        help="JSON file (default: bench/results/latest.json, quick.json with --quick)")
    parser.add_argument("--update-doc", action="store_true", help=f"write the table into {DOC.relative_to(REPO_ROOT)}")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so the live server is stopped on SIGTERM too

    command = "python bench/run.py " + " ".join(sys.argv[1:])
    when = datetime.now(UTC).isoformat(timespec="seconds")
    facts = machine()
    print(f"machine: {machine_line(facts)}; load average {facts['load_average_1min']}", flush=True)
    results: list[SectionResult] = []
    failed: dict[int, str] = {}
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="lora-rag-bench-") as scratch:
        context = Context(quick=args.quick, scratch=Path(scratch))
        with context.stack:
            for number in (n for n in RUN_ORDER if n in args.only):
                title, section = SECTIONS[number]
                print(f"==> {number}. {title}", flush=True)
                section_started = time.perf_counter()
                try:
                    result = section(context)
                except Exception as error:  # one broken section must not cost the others
                    traceback.print_exc()
                    failed[number] = f"{type(error).__name__}: {error}"
                    result = SectionResult(number, title, {"error": failed[number]},
                                           [Row(str(number), title, "FAILED", verdict="NOT met",
                                                note=failed[number].splitlines()[0][:200])])
                result.seconds = time.perf_counter() - section_started
                print(f"    {result.seconds:.0f} s", flush=True)
                results.append(result)
    results.sort(key=lambda result: result.number)
    load_end = machine()["load_average_1min"]
    table = markdown_table([row for result in results for row in result.rows])
    print(f"\n{table}\n")
    payload = {"command": command, "quick": args.quick, "started_at": when, "machine": facts,
               "load_average_end": load_end, "total_seconds": round(time.perf_counter() - started, 1),
               "sections": {str(result.number): as_json(result) for result in results}, "failed": failed}
    out = args.out or RESULTS_DIR / ("quick.json" if args.quick else "latest.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(payload, indent=2), encoding="utf-8")
    print(f"written: {out} ({payload['total_seconds']:.0f} s in all)")
    if args.update_doc:
        update_doc(command, when, facts, float(load_end), table)
        print(f"written: {DOC}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())

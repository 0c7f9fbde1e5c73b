"""CONTEXT_TOKEN_BUDGET: the retrieved passages are fitted to a budget in the answering model's tokens, best first,
the first that does not fit cut at a sentence end; the prompt shrinks accordingly (/ask's usage.prompt_tokens)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from app.llm.base import estimate_tokens
from app.main import create_app
from app.rag.chunking import split_sentences
from app.rag.prompts import fit_to_budget
from app.rag.vector_store import SearchHit, StoredChunk
from tests.conftest import make_settings, running_server

TEA = "茶园位于山坡上。春茶品质最好！游客可以在周三参观。"
BIKES = "A repair costs ten euros. It takes an hour. Bring the bike before noon."


def _hits(*texts: str) -> list[SearchHit]:
    return [SearchHit(number, StoredChunk(text, {"source": f"{number}.md"}), 1.0 - number / 10, "relative")
            for number, text in enumerate(texts)]


def _texts(hits: list[SearchHit]) -> list[str]:
    return [hit.chunk.text for hit in hits]


def test_passages_are_kept_best_first_and_the_first_that_does_not_fit_is_cut_at_a_sentence_end() -> None:
    hits = _hits(TEA, BIKES, "Never reached.")
    # Counted in characters here: TEA is 25, and the budget leaves 30 for the rest.
    assert _texts(fit_to_budget(hits, 55, len)) == [TEA, "A repair costs ten euros."]
    assert _texts(fit_to_budget(hits, 12, len)) == ["茶园位于山坡上。"]  # cut after its first sentence (8)
    assert fit_to_budget(hits, 5, len) == []  # not even the best passage's first sentence fits
    assert fit_to_budget(hits, 0, len) == hits  # 0: no limit
    cut = fit_to_budget(hits, 12, len)[0]
    assert (cut.chunk_id, cut.chunk.metadata, cut.score) == (0, {"source": "0.md"}, 1.0)  # still the same passage


def test_the_estimate_counts_a_cjk_character_as_a_token_and_four_others_as_one() -> None:
    assert estimate_tokens("茶园！") == 3 and estimate_tokens("abcdefgh") == 2 and estimate_tokens("茶 tea") == 2


@pytest.fixture(scope="module")
def urls(tmp_path_factory: pytest.TempPathFactory, corpus_store: Path) -> Iterator[dict[int, str]]:
    """Two servers on the fixture corpus: no budget, and a budget of 40 tokens."""
    def server(budget: int):  # type: ignore[no-untyped-def]
        settings = make_settings(tmp_path_factory.mktemp(f"budget-{budget}"), vector_store_path=corpus_store,
                                 context_token_budget=budget, max_new_tokens=2)
        return running_server(create_app(settings))

    with server(0) as unlimited, server(40) as limited:
        yield {0: unlimited, 40: limited}


@pytest.mark.slow
def test_a_chinese_question_gets_a_prompt_within_the_budget_in_the_models_own_tokens(urls: dict[int, str]) -> None:
    from transformers import AutoTokenizer

    from app.llm.model_source import resolve_base_model

    tokenizer = AutoTokenizer.from_pretrained(resolve_base_model("embedded:SmolLM2-135M-Instruct", None))
    question = {"query": "茶园的参观费用是多少？"}
    whole = httpx.post(f"{urls[0]}/ask", json=question, timeout=120).json()
    fitted = httpx.post(f"{urls[40]}/ask", json=question, timeout=120).json()
    passages = [source["content"] for source in fitted["source_documents"]]
    assert passages and sum(len(tokenizer(text, add_special_tokens=False)["input_ids"]) for text in passages) <= 40
    assert fitted["source_documents"][0]["metadata"]["source"] == "corpus/zh/茶园.md"
    best = whole["source_documents"][0]["content"]
    sentence_ends = [best[: offset + len(sentence)] for offset, sentence in split_sentences(best)]
    assert passages[0] in sentence_ends and passages[0] != best  # the best passage, cut after a sentence (or line)
    assert fitted["usage"]["prompt_tokens"] < whole["usage"]["prompt_tokens"]

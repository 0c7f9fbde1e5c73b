"""Reading a cited answer back (app/rag/citations.py), whole or cut by the budget; and the page showing citations."""

from __future__ import annotations

import json

from app.rag.citations import Citation, citation_constraint, read_cited
from app.rag.vector_store import SearchHit, StoredChunk

PASSAGE = "Blue baskets hold eighteen kilograms. Apples are stored at four degrees."
HITS = [SearchHit(0, StoredChunk(PASSAGE, {"source": "orchards.md"}), 1.0, "relative")]
REPLY = json.dumps({"citations": [{"source_index": 1, "quote": "Blue baskets hold eighteen kilograms."}],
                    "answer": "Eighteen kilograms."})
CITED = (Citation(1, "Blue baskets hold eighteen kilograms."),)


def test_a_whole_reply_gives_its_answer_and_citations() -> None:
    assert read_cited(REPLY, HITS) == ("Eighteen kilograms.", CITED)


def test_a_reply_cut_in_its_answer_keeps_its_citations_and_one_cut_in_a_quote_keeps_none_of_that_quote() -> None:
    assert read_cited(REPLY[: REPLY.index("kilograms.\"}") - 5], HITS) == ("", ())  # inside the quote: dropped
    in_answer = REPLY[: REPLY.rindex("kilograms")]
    assert read_cited(in_answer, HITS) == ("Eighteen ", CITED)
    assert read_cited('{"citations": [{"source_index": 1, "quote": "Made up."}], "answer": "x"}', HITS) == ("x", ())
    assert read_cited('{"citations": [{"source_index": 7, "quote": "Apples are stored at four degrees."}]}',
                      HITS) == ("", ())  # no such passage


def test_the_schema_offers_each_passages_own_sentences_only() -> None:
    schema = citation_constraint(HITS).schema_object
    (choice,) = schema["properties"]["citations"]["items"]["anyOf"]
    assert choice["properties"]["quote"]["enum"] == ["Blue baskets hold eighteen kilograms.",
                                                     "Apples are stored at four degrees."]
    assert list(schema["properties"]) == ["citations", "answer"]  # the evidence first, then the answer

from __future__ import annotations

from app.rag.chunking import chunk_text, split_sentences


def test_chinese_punctuation_ends_sentences() -> None:
    text = "第一句话。第二句话！第三句？第四句；最后一句"
    assert [s for _, s in split_sentences(text)] == ["第一句话。", "第二句话！", "第三句？", "第四句；", "最后一句"]


def test_english_sentences_and_offsets() -> None:
    text = "Hello world. Is it? Yes!\nNext line"
    pieces = split_sentences(text)
    assert [s for _, s in pieces] == ["Hello world.", "Is it?", "Yes!", "Next line"]
    assert all(text[offset : offset + len(s)] == s for offset, s in pieces)


def test_chunks_respect_size_keep_sentences_whole_and_overlap() -> None:
    text = " ".join(f"Sentence number {i} is here." for i in range(40))
    chunks = chunk_text(text, chunk_size=120, overlap=40)
    assert len(chunks) > 5
    assert all(len(c.text) <= 120 for c in chunks)
    assert all(c.text.endswith(".") for c in chunks)
    for previous, current in zip(chunks, chunks[1:], strict=False):
        assert current.text.split(". ")[0] + "." in previous.text  # the tail sentence repeats
    assert [c.index for c in chunks] == list(range(len(chunks)))


def test_cjk_without_punctuation_is_cut_by_length_and_joined_without_spaces() -> None:
    chunks = chunk_text("茶" * 250, chunk_size=100, overlap=0)
    assert [len(c.text) for c in chunks] == [100, 100, 50]
    mixed = chunk_text("茶园很好。游客很多。", chunk_size=100, overlap=0)
    assert mixed[0].text == "茶园很好。游客很多。"


def test_line_breaks_survive_inside_chunks() -> None:
    chunks = chunk_text("# Title\nFirst line.\nSecond line.", chunk_size=200, overlap=0)
    assert chunks[0].text == "# Title\nFirst line.\nSecond line."

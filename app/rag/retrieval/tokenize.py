"""Words for the lexical index, from Chinese and Latin script alike (and text that mixes them).

Chinese has no spaces between words, so runs of CJK characters are segmented with jieba in search mode, which
also yields the shorter words inside a long one (中华人民共和国 -> 中华, 华人, 人民, 共和, 共和国, ...): a question
that says 共和国 still meets a text that says 中华人民共和国. Latin-script text is lower-cased and split into words
(letters and digits, an inner apostrophe or hyphen kept out). Stop words of both languages are dropped: they
match nearly every chunk, add nothing to a BM25 ranking and lengthen the posting lists a search reads.
"""

from __future__ import annotations

import re
import threading
import unicodedata
from typing import Any

from bm25s.stopwords import STOPWORDS_CHINESE, STOPWORDS_EN

#: stored in each lexical index: a store tokenised by another version of this module is rebuilt, not misread
TOKENIZER_NAME = "jieba-search+latin-words/1"

# Han ideographs (with extensions A and the compatibility block) as one run; everything else is split into words.
_HAN_RUN = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]+")
_WORD = re.compile(r"[^\W_]+", re.UNICODE)
_STOPWORDS = frozenset(STOPWORDS_EN) | frozenset(STOPWORDS_CHINESE)

_jieba_lock = threading.Lock()
_jieba: Any = None


def _segmenter() -> Any:
    """jieba's tokenizer, initialised once from the dictionary inside the package.

    `jieba.initialize` would read a marshal cache from the system temp folder (which anyone may write) and try
    to write one there; building the prefix dictionary ourselves reads only the packaged dict.txt (about a
    second, once per process) and writes nothing."""
    global _jieba
    with _jieba_lock:
        if _jieba is None:
            import jieba

            _jieba = _from_packaged_dictionary(jieba.Tokenizer())
        return _jieba


def prepare_shared_jieba() -> None:
    """Initialise jieba's module-level tokenizer from the packaged dictionary as `_segmenter` does, for code
    that segments with it (Milvus Lite's analyser calls `jieba.cut_for_search`), so it never reads the temp
    folder's cache either."""
    import jieba

    with _jieba_lock:
        if not jieba.dt.initialized:
            _from_packaged_dictionary(jieba.dt)


def _from_packaged_dictionary(segmenter: Any) -> Any:
    with segmenter.lock:
        segmenter.FREQ, segmenter.total = segmenter.gen_pfdict(segmenter.get_dict_file())
        segmenter.initialized = True
    return segmenter


def tokenize(text: str) -> list[str]:
    """The index terms of `text`, in order, stop words left out."""
    text = unicodedata.normalize("NFKC", text)  # full-width Ｌａｔｉｎ and digits as their ASCII forms
    tokens: list[str] = []
    position = 0
    for run in _HAN_RUN.finditer(text):
        tokens.extend(_latin_words(text[position : run.start()]))
        tokens.extend(word for word in _segmenter().cut_for_search(run.group(), HMM=True) if word not in _STOPWORDS)
        position = run.end()
    tokens.extend(_latin_words(text[position:]))
    return tokens


def _latin_words(text: str) -> list[str]:
    return [word for word in _WORD.findall(text.lower()) if word not in _STOPWORDS]

"""Fuzzing the front end: whatever the text, ``attndsl.compile`` either returns a Program or raises
an AttnError (LANGUAGE.md section 7) — never another exception, never a hang. What compiles also
prints, re-compiles and evaluates without any other exception.
"""

from __future__ import annotations

import re

import pytest
from conftest import PRELUDE, example_files
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import attndsl

INLINE = [
    "pattern longformer(w = 256, g = 16):\n    mask = band(w) or globals(g)\n",
    "pattern alibi(max_bias = 8.0):\n    let slope = 2.0 ** (-max_bias * float(h + 1) / float(heads))\n"
    "    mask = causal\n    score = score - slope * float(q - k)\n",
    "pattern packed(doc: int[]):\n    mask = causal and doc[q] == doc[k]\n",
    "def near(w, d = 1) = 0 <= q - k < w * d\n# comment\npattern p(w: int, f = -0.5, b = true):\n"
    "    let x = (near(w)\n        or k % 7 == 3)\n    mask = x and b if f < 0.0 else not x\n"
    "    score = 30.0 * tanh(score / 30.0) + (f if h > 0 else -inf)\n",
    "pattern s(c: float[][][], t: float[][]):\n    mask = route(c) or topk_blocks(2, 64, causal = false)"
    " or topp_blocks(0.9, 32) or random_blocks(1, 16, seed = 3)\n    score = score + t[h, k]\n",
]


def _sources() -> list[str]:
    texts = [p.read_text(encoding="utf-8") for p in example_files()]
    texts.append(PRELUDE.read_text(encoding="utf-8") + "\npattern p:\n    mask = fixed(8, 2)\n")
    return texts + INLINE


SOURCES = _sources()
TOKEN = re.compile(r"[A-Za-z_][A-Za-z0-9_]*|[0-9]+(?:\.[0-9]*)?(?:[eE][+-]?[0-9]+)?"
                   r"|\*\*|//|[<>=!]=|\n[ \t]*|\S")
VOCAB = ["def", "pattern", "let", "mask", "score", "if", "else", "and", "or", "not", "true", "false",
         "inf", "q", "k", "h", "q_len", "kv_len", "heads", "kv_heads", "(", ")", "[", "]", ",", ":", "=",
         "+", "-", "*", "/", "//", "%", "**", "<", "<=", ">", ">=", "==", "!=", "\n", "\n    ", "\n        ",
         "#", "0", "1", "-1", "2.5", "1e-3", "99999999999999999999", "int[]", "float[][][]", "abs",
         "min", "max", "clamp", "float", "exp", "topk_blocks", "route", "random_blocks", "causal",
         "sliding", "\t", " ", "$", "@", "\x00", "é", "\r\n", "'", '"']

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)


def check_compile(text: str) -> None:
    """compile may only raise AttnError; what compiles must print, re-compile and evaluate."""
    try:
        prog = attndsl.compile(text, filename="<fuzz>")
    except attndsl.AttnError as err:
        assert err.line >= 0 and err.column >= 0
        str(err)                      # rendering never fails
        for e in err.all_errors():
            assert isinstance(e, attndsl.AttnError)
        return
    for pat in prog:
        printed = str(pat)
        try:
            again = attndsl.compile(printed, filename="<printed>")[pat.name]
        except attndsl.AttnError:
            raise AssertionError(f"the printed form does not compile:\n{printed}") from None
        assert again.ir == pat.ir, printed
        if pat.tensor_params or pat.uses_selectors():
            continue
        try:
            m = pat.dense_mask(6, 9, heads=2, kv_heads=1)
            assert m.shape == (2, 6, 9)
        except attndsl.AttnError:       # e.g. a required parameter is not bound
            pass


def _mutate_chars(text: str, ops) -> str:
    for kind, pos, arg in ops:
        i = pos % (len(text) + 1)
        if kind == 0:                                   # delete a run
            text = text[:i] + text[i + arg % 5 + 1:]
        elif kind == 1:                                 # insert a character
            text = text[:i] + chr(arg % 128 if arg % 7 else 0xe9 + arg % 50) + text[i:]
        elif kind == 2:                                 # duplicate a run
            text = text[:i] + text[i:i + arg % 9 + 1] + text[i:]
        elif kind == 3 and len(text) > 1:               # swap two characters
            j = arg % len(text)
            i = min(i, len(text) - 1)
            chars = list(text)
            chars[i], chars[j] = chars[j], chars[i]
            text = "".join(chars)
        else:                                           # truncate
            text = text[:i]
    return text


def _mutate_tokens(text: str, ops) -> str:
    toks = TOKEN.findall(text)
    for kind, pos, arg in ops:
        if not toks:
            toks = [VOCAB[arg % len(VOCAB)]]
            continue
        i = pos % len(toks)
        if kind == 0:
            del toks[i]
        elif kind == 1:
            toks.insert(i, VOCAB[arg % len(VOCAB)])
        elif kind == 2:
            toks.insert(i, toks[i])
        elif kind == 3:
            j = arg % len(toks)
            toks[i], toks[j] = toks[j], toks[i]
        elif kind == 4:
            toks[i] = VOCAB[arg % len(VOCAB)]
        else:
            toks = toks[:i]
    out = ""
    for t in toks:                       # re-join with single spaces, keeping newlines as they are
        out += t if t.startswith("\n") or not out or out.endswith("\n") or out[-1] in " \t" else " " + t
    return out


OPS = st.lists(st.tuples(st.integers(0, 5), st.integers(0, 10 ** 6), st.integers(0, 10 ** 6)),
               min_size=1, max_size=6)


def test_sources_compile():
    assert len(SOURCES) >= len(INLINE) + 1
    for text in SOURCES:
        try:
            attndsl.compile(text)
        except attndsl.AttnError:
            pass                          # a broken example is test_examples' concern
    for text in INLINE:
        attndsl.compile(text)


@FUZZ
@given(st.binary(max_size=400))
def test_random_bytes_replace(data):
    check_compile(data.decode("utf-8", errors="replace"))


@FUZZ
@given(st.binary(max_size=400))
def test_random_bytes_latin1(data):
    check_compile(data.decode("latin-1"))


@FUZZ
@given(st.text(alphabet=st.sampled_from(list("qkh()[]=:,+-*/%<>!#.\n\t 0123456789e_abcdfilmnoprstuvw")),
               max_size=200))
def test_random_text_from_the_language_alphabet(text):
    check_compile(text)


@settings(max_examples=400, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(st.sampled_from(range(len(SOURCES))), OPS)
def test_character_mutations_of_sources(index, ops):
    check_compile(_mutate_chars(SOURCES[index], ops))


@settings(max_examples=400, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(st.sampled_from(range(len(SOURCES))), OPS)
def test_token_mutations_of_sources(index, ops):
    check_compile(_mutate_tokens(SOURCES[index], ops))


@settings(max_examples=100, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(st.lists(st.sampled_from(VOCAB), max_size=60))
def test_token_soup(tokens):
    check_compile(" ".join(tokens))


@pytest.mark.parametrize("index", range(len(SOURCES)))
def test_every_prefix_of_every_source(index):
    text = SOURCES[index]
    step = max(1, len(text) // 150)
    for n in range(0, len(text) + 1, step):
        check_compile(text[:n])


def test_no_code_of_the_files_choosing_runs(tmp_path):
    marker = tmp_path / "pwned"
    payloads = [
        f'pattern p:\n    mask = __import__("os").system("touch {marker}") == 0\n',
        f"pattern p:\n    mask = exec('open(r\"{marker}\", \"w\")')\n",
        "pattern __class__:\n    mask = __builtins__ and __import__ and eval and exec\n",
        f"def os = true\npattern p(system = 1):\n    mask = os\n# open('{marker}', 'w')\n",
        f"pattern p:\n    mask = true\n    score = score  # {{__import__('os').system('touch {marker}')}}\n",
    ]
    for text in payloads:
        try:
            prog = attndsl.compile(text)
            for pat in prog:
                str(pat)
                pat.dense_mask(2, 2)
        except attndsl.AttnError:
            pass
    assert not marker.exists()

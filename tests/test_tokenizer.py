import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dsv32.data.corpus import stdlib_documents
from dsv32.tokenizer import (
    ASSISTANT, BOS, DSML, EOS, SPECIAL_TOKENS, THINK_END, THINK_START, USER, Tokenizer, byte_level_bpe, clean_text, train_tokenizer,
)

MULTILINGUAL = [
    "中文的句子，还有标点。日本語のテキストも。한국어 문장입니다.",
    "مرحبا بالعالم، هذا نص عربي.",
    "emoji 😀👍🏽👨‍👩‍👧 and flags 🇫🇷",
    "combining: e\u0301 a\u0308 n\u0303; Ω≈ç√∫",
]


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    texts = [d.text for d in stdlib_documents("train", limit=30)] + MULTILINGUAL * 5
    return train_tokenizer(texts, 1024, show_progress=False)


def test_special_tokens_are_single_ids_in_deepseek_order(tok):
    assert tok.bos_id == 0 and tok.eos_id == 1 and tok.pad_id == tok.eos_id
    for i, token in enumerate(SPECIAL_TOKENS):
        assert tok.special_ids[token] == i
        assert tok.encode(token, allow_special=True) == [i]
        assert tok.decode([i]) == token


def test_plain_text_never_produces_control_tokens(tok):
    text = f"user wrote {BOS}{USER}hi{THINK_START}x{THINK_END}<{DSML}invoke>{EOS}"
    plain = tok.encode(text)
    assert not set(plain) & set(tok.special_ids.values())
    assert tok.decode(plain) == text
    allowed = tok.encode(text, allow_special=True)
    assert [i for i in allowed if i in tok.special_ids.values()] == [0, 2, 4, 5, 6, 1]
    assert tok.decode(allowed) == text


def test_digits_are_split_one_by_one(tok):
    ids = tok.encode("x = 1234567890")
    digit_tokens = [tok.decode([i]) for i in ids if tok.decode([i]).strip().isdigit()]
    assert digit_tokens == list("1234567890")


def test_indentation_and_code_survive_round_trip(tok):
    code = "class A:\n    def f(self, x):\n\treturn {'k': [1, 2]}  # comment\r\n\n\n"
    assert tok.decode(tok.encode(code)) == code


@pytest.mark.parametrize("text", MULTILINGUAL + ["\x00\x01\x7f\u200b\ufeff", "", " ", "\n\n\t "])
def test_round_trip_examples(tok, text):
    assert tok.decode(tok.encode(text)) == text


@settings(max_examples=300, deadline=None)
@given(st.text())
def test_round_trip_arbitrary_unicode(tok, text):
    assert tok.decode(tok.encode(text)) == text


SURROGATES = st.sampled_from(["\ud800", "\udbff", "\udc00", "\udfff", "\ud83d", "\ude00"])


@settings(max_examples=200, deadline=None)
@given(st.lists(st.one_of(st.characters(), SURROGATES)).map("".join))
def test_surrogates_are_handled_without_crashing(tok, text):
    # Lone surrogates cannot be UTF-8: they come back as U+FFFD; a high+low pair becomes its character.
    assert tok.decode(tok.encode(text)) == clean_text(text)
    assert tok.decode(tok.encode_batch([text])[0]) == clean_text(text)


def test_clean_text_joins_pairs_and_replaces_lone_surrogates():
    assert clean_text("a\ud83d\ude00b") == "a😀b"
    assert clean_text("x\udc80y\ud800") == "x\ufffdy\ufffd"
    assert clean_text("plain") == "plain"


def test_encode_batch_matches_encode(tok):
    texts = MULTILINGUAL + ["def f(): pass", f"{USER}x"]
    assert tok.encode_batch(texts) == [tok.encode(t) for t in texts]
    assert tok.encode_batch(texts, allow_special=True) == [tok.encode(t, allow_special=True) for t in texts]


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet=st.sampled_from(list("ab 😀中é\u0301\n🇫🇷👍🏽"))))
def test_incremental_detokenizer_never_emits_half_a_character(tok, text):
    ids = tok.encode(text)
    stream = tok.detokenizer()
    pieces = [stream.push(i) for i in ids] + [stream.flush()]
    assert "".join(pieces) == text == tok.decode(ids)
    assert all("\ufffd" not in p for p in pieces)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 1023), max_size=30))
def test_incremental_detokenizer_agrees_with_decode_on_any_ids(tok, ids):
    stream = tok.detokenizer()
    assert "".join(stream.push(i) for i in ids) + stream.flush() == tok.decode(ids)


def test_ids_beyond_the_vocabulary_decode_to_nothing(tok):
    """A model's vocabulary is often padded past its tokenizer's; an untrained model samples those ids."""
    beyond = tok.vocab_size + 5
    ids = tok.encode("ab") + [beyond] + tok.encode("cd")
    stream = tok.detokenizer()
    assert "".join(stream.push(i) for i in ids) + stream.flush() == tok.decode(ids) == "abcd"
    assert tok.token_bytes(beyond) == b"" and tok.token_bytes(-1) == b""


def test_incremental_detokenizer_can_skip_special_tokens(tok):
    ids = tok.encode(f"{BOS}hi{EOS}", allow_special=True)
    stream = tok.detokenizer(skip_special=True)
    assert stream.push(ids) + stream.flush() == "hi"


def test_save_load_and_transformers_give_identical_ids(tok, tmp_path):
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    tok.save(tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert config["bos_token"] == BOS and config["eos_token"] == EOS
    again = Tokenizer.load(tmp_path)
    assert again.fingerprint == tok.fingerprint and again.special_ids == tok.special_ids
    texts = MULTILINGUAL + ["def f(x):\n    return x * 42\n", f"{BOS}{USER}hello{ASSISTANT}{THINK_END}ok{EOS}"]
    for hf in (PreTrainedTokenizerFast.from_pretrained(tmp_path), AutoTokenizer.from_pretrained(tmp_path)):
        assert hf.bos_token_id == tok.bos_id and hf.eos_token_id == tok.eos_id
        for text in texts:
            ids = tok.encode(text, allow_special=True)
            assert hf.encode(text, add_special_tokens=False) == ids
            assert hf.decode(ids) == tok.decode(ids)



def test_foreign_tokenizer_json_loads_through_the_same_code(tmp_path):
    """A DeepSeek-style tokenizer.json: extra special tokens, <think> as a non-special added token,
    and a post-processor that adds BOS. Plain text must still not produce control tokens, and
    `encode` must not add BOS."""
    from tokenizers import AddedToken, processors, trainers

    backend, _ = byte_level_bpe()
    specials = [AddedToken(t, special=True, normalized=False) for t in (BOS, EOS, "<｜fim▁hole｜>", USER, ASSISTANT)]
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials, show_progress=False)
    backend.train_from_iterator(["hello world think"] * 20, trainer=trainer)
    backend.add_tokens([AddedToken(THINK_START, special=False, normalized=False), AddedToken(THINK_END, special=False, normalized=False)])
    backend.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", special_tokens=[(BOS, 0)])
    backend.save(str(tmp_path / "tokenizer.json"))

    foreign = Tokenizer.load(tmp_path / "tokenizer.json")
    assert foreign.bos_id == 0 and foreign.eos_id == 1
    assert {THINK_START, THINK_END, "<｜fim▁hole｜>"} <= set(foreign.special_ids)
    assert DSML not in foreign.special_ids  # this vocabulary has no DSML token: it stays text
    think = foreign.special_ids[THINK_START]
    assert think not in foreign.encode("<think>hello")
    assert foreign.encode("<think>hello", allow_special=True)[0] == think
    assert foreign.encode("hello")[0] != foreign.bos_id


def test_training_is_deterministic():
    texts = [d.text for d in stdlib_documents("train", limit=5)]
    a = train_tokenizer(texts, 400, show_progress=False)
    b = train_tokenizer(texts, 400, show_progress=False)
    assert a.fingerprint == b.fingerprint


def test_bad_inputs_fail_clearly(tmp_path):
    with pytest.raises(FileNotFoundError, match="no tokenizer.json"):
        Tokenizer.load(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(ValueError, match="not a valid tokenizer.json"):
        Tokenizer.load(tmp_path)
    with pytest.raises(ValueError, match="vocab size must be at least"):
        train_tokenizer(["abc"], 100, show_progress=False)
    with pytest.raises(ValueError, match="empty corpus"):
        train_tokenizer([], 1000, show_progress=False)


def test_cli_trains_a_tokenizer(tmp_path, capsys):
    from dsv32.cli import main

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i, doc in enumerate(stdlib_documents("train", limit=8)):
        (corpus / f"doc{i}.py").write_text(doc.text)
    out = tmp_path / "tok"
    assert main(["tokenizer", "train", "--corpus", str(corpus), "--vocab-size", "300", "--out", str(out), "--no-progress"]) == 0
    assert "300 ids" in capsys.readouterr().out
    assert Tokenizer.load(out).vocab_size == 300


def test_cli_reports_a_missing_corpus_in_one_line(tmp_path, capsys):
    from dsv32.cli import main

    code = main(["tokenizer", "train", "--corpus", str(tmp_path / "nope"), "--out", str(tmp_path / "t")])
    err = capsys.readouterr().err
    assert code == 1 and len(err.strip().splitlines()) == 1 and "does not exist" in err

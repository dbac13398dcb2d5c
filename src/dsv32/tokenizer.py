"""Byte-level BPE tokenizer (trained and run by HF `tokenizers`) with DeepSeek's special tokens.

The on-disk format is the standard `tokenizer.json` + `tokenizer_config.json` pair, so
`transformers.PreTrainedTokenizerFast` loads what we save with the same ids, and a real DeepSeek
`tokenizer.json` loads through `Tokenizer.load` just like ours.

Control tokens (BOS, EOS, role markers, `<think>`, `｜DSML｜`, ...) are only ever produced when the
caller asks for them (`allow_special=True`, or the chat encoder's markup). Plain text that merely
*contains* a string like `<｜User｜>` encodes to ordinary byte-level pieces: otherwise a user could
forge a turn boundary by typing it.
"""
from __future__ import annotations

import codecs
import hashlib
import json
import re
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, trainers
from tokenizers import Tokenizer as _Backend

BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"
USER = "<｜User｜>"
ASSISTANT = "<｜Assistant｜>"
THINK_START = "<think>"
THINK_END = "</think>"
DSML = "｜DSML｜"
# Order fixes the ids of a tokenizer we train: BOS=0 and EOS=1 as in DeepSeek's vocabulary.
SPECIAL_TOKENS: tuple[str, ...] = (BOS, EOS, USER, ASSISTANT, THINK_START, THINK_END, DSML)

# Pre-tokenizer: split text into pieces BPE may not merge across. Contractions; a word with at most
# one leading non-letter (" foo", "(x", "_name"); every digit on its own (see README: numbers then
# always tokenize the same way, digit by digit, which is what arithmetic needs); runs of punctuation
# with their trailing newlines; newline runs; indentation kept as whitespace runs so code's leading
# spaces become a few reusable tokens.
PRETOKENIZE_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)"
    r"|[^\r\n\p{L}\p{N}]?\p{L}+"
    r"|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+"
    r"|\s+(?!\S)"
    r"|\s+"
)

TOKENIZER_FILE = "tokenizer.json"
CONFIG_FILE = "tokenizer_config.json"
_SURROGATE = re.compile("[\ud800-\udfff]")


def clean_text(text: str) -> str:
    """Make `text` encodable as UTF-8: join surrogate pairs, replace lone surrogates with U+FFFD.

    Python strings may hold surrogate code points (e.g. from JSON `"\\ud83d\\ude00"` pieces or
    `surrogateescape` file reads); the Rust tokenizer only accepts valid Unicode.
    """
    if not _SURROGATE.search(text):
        return text
    return text.encode("utf-16-le", "surrogatepass").decode("utf-16-le", "replace")


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte <-> printable character table used by the ByteLevel pre-tokenizer/decoder."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


_UNICODE_TO_BYTE = {c: b for b, c in _bytes_to_unicode().items()}


class Tokenizer:
    """A loaded tokenizer: ids <-> text, special-token ids, fingerprint, streaming detokenizer."""

    def __init__(self, backend: _Backend):
        self.backend = backend
        spec = json.loads(backend.to_str())
        added = spec.get("added_tokens") or []
        # Control tokens: every added token flagged special, plus DeepSeek's chat strings wherever the
        # vocabulary has them (some releases mark e.g. <think> as a non-special added token).
        control = {t["content"] for t in added if t.get("special")}
        control |= {t["content"] for t in added if t["content"] in SPECIAL_TOKENS}
        self.special_ids: dict[str, int] = {t["content"]: t["id"] for t in added if t["content"] in control}
        # Same model without the control tokens: plain text can then never produce them.
        spec["added_tokens"] = [t for t in added if t["content"] not in control]
        self._plain = _Backend.from_str(json.dumps(spec))
        self._byte_level = (spec.get("decoder") or {}).get("type") == "ByteLevel"
        self._token_bytes: list[bytes] | None = None
        self._fingerprint: str | None = None

    # ----- construction / persistence -----
    @classmethod
    def load(cls, path: str | Path) -> "Tokenizer":
        """Load from a directory holding `tokenizer.json`, or from the file itself."""
        path = Path(path)
        file = path / TOKENIZER_FILE if path.is_dir() else path
        if not file.is_file():
            raise FileNotFoundError(f"no {TOKENIZER_FILE} at {path}")
        try:
            backend = _Backend.from_file(str(file))
        except Exception as exc:  # the Rust error text is long; keep the line short and named
            raise ValueError(f"{file}: not a valid tokenizer.json ({str(exc).splitlines()[0]})") from None
        return cls(backend)

    def save(self, directory: str | Path, model_max_length: int = 163840) -> Path:
        """Write `tokenizer.json` and a `tokenizer_config.json` that transformers understands."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.backend.save(str(directory / TOKENIZER_FILE))
        config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": BOS if BOS in self.special_ids else None,
            "eos_token": EOS if EOS in self.special_ids else None,
            "pad_token": EOS if EOS in self.special_ids else None,
            # The chat encoder writes BOS itself; the tokenizer must not add another.
            "add_bos_token": False,
            "add_eos_token": False,
            "clean_up_tokenization_spaces": False,
            "model_max_length": model_max_length,
        }
        (directory / CONFIG_FILE).write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        return directory

    # ----- ids -----
    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    @property
    def bos_id(self) -> int:
        return self._special(BOS)

    @property
    def eos_id(self) -> int:
        return self._special(EOS)

    @property
    def pad_id(self) -> int:
        return self.eos_id  # DeepSeek pads with EOS

    def _special(self, token: str) -> int:
        if token not in self.special_ids:
            raise ValueError(f"this tokenizer has no {token} token")
        return self.special_ids[token]

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self.backend.id_to_token(token_id)

    @property
    def fingerprint(self) -> str:
        """sha256 of the canonical JSON: equal fingerprints mean identical ids for every text."""
        if self._fingerprint is None:
            canonical = json.dumps(json.loads(self.backend.to_str()), sort_keys=True, ensure_ascii=False)
            self._fingerprint = hashlib.sha256(canonical.encode("utf-8")).hexdigest()
        return self._fingerprint

    # ----- encode / decode -----
    def encode(self, text: str, allow_special: bool = False) -> list[int]:
        """Token ids of `text`; special-token strings in it become control tokens only if allowed."""
        backend = self.backend if allow_special else self._plain
        return backend.encode(clean_text(text), add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str], allow_special: bool = False) -> list[list[int]]:
        """Like `encode` for many texts at once (runs in parallel inside `tokenizers`)."""
        backend = self.backend if allow_special else self._plain
        # encode_batch_fast skips character offsets, which we never use (about 1.5x faster)
        encode = getattr(backend, "encode_batch_fast", backend.encode_batch)
        encodings = encode([clean_text(t) for t in texts], add_special_tokens=False)
        return [e.ids for e in encodings]

    def decode(self, ids: Iterable[int], skip_special: bool = False) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special)

    def token_bytes(self, token_id: int) -> bytes:
        """The exact bytes a token stands for (special tokens: their UTF-8 text).

        An id beyond the tokenizer's vocabulary (a model's embedding is often padded past it, and an
        untrained model samples anything) stands for nothing, as in `decode`."""
        table = self._bytes_table()
        return table[token_id] if 0 <= token_id < len(table) else b""

    def _bytes_table(self) -> list[bytes]:
        if self._token_bytes is None:
            if not self._byte_level:
                raise ValueError("token_bytes needs a byte-level tokenizer")
            added = {t.content for t in self.backend.get_added_tokens_decoder().values()}
            table = []
            for i in range(self.vocab_size):
                piece = self.backend.id_to_token(i) or ""
                if piece in added or not all(c in _UNICODE_TO_BYTE for c in piece):
                    table.append(piece.encode("utf-8"))  # added tokens (and odd entries) decode as their text
                else:
                    table.append(bytes(_UNICODE_TO_BYTE[c] for c in piece))
            self._token_bytes = table
        return self._token_bytes

    def detokenizer(self, skip_special: bool = False) -> "IncrementalDetokenizer":
        return IncrementalDetokenizer(self, skip_special=skip_special)


class IncrementalDetokenizer:
    """Turns a stream of token ids into text pieces that never end inside a UTF-8 character.

    Byte-level tokens can split a character (an emoji is 4 bytes, often 2-3 tokens); bytes are held
    back until the character is complete. Concatenating every `push` and the final `flush` equals
    `tokenizer.decode(all_ids)`.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special: bool = False):
        self.tokenizer = tokenizer
        self._skip = {i for i in tokenizer.special_ids.values()} if skip_special else set()
        self._bytewise = tokenizer._byte_level
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        # Fallback for non-byte-level tokenizers: re-decode the ids since the last clean boundary.
        self._pending: list[int] = []

    def push(self, ids: int | Iterable[int]) -> str:
        ids = [ids] if isinstance(ids, int) else [i for i in ids]
        ids = [i for i in ids if i not in self._skip]
        if self._bytewise:
            table = self.tokenizer._bytes_table()
            n = len(table)
            return self._utf8.decode(b"".join(table[i] for i in ids if 0 <= i < n))  # unknown ids: nothing
        self._pending.extend(ids)
        text = self.tokenizer.decode(self._pending)
        if text.endswith("\ufffd"):
            return ""  # an incomplete character: wait for the next token
        self._pending.clear()
        return text

    def flush(self) -> str:
        """Whatever is still held back (an unfinished character becomes U+FFFD)."""
        if self._bytewise:
            return self._utf8.decode(b"", final=True)
        text = self.tokenizer.decode(self._pending)
        self._pending.clear()
        return text


def byte_level_bpe(special_tokens: Sequence[str] = SPECIAL_TOKENS) -> tuple[_Backend, list[AddedToken]]:
    """An untrained byte-level BPE with our pre-tokenizer, and the special tokens to train with."""
    backend = _Backend(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    backend.decoder = decoders.ByteLevel()
    specials = [AddedToken(t, special=True, normalized=False) for t in special_tokens]
    return backend, specials


def train_tokenizer(
    texts: Iterable[str],
    vocab_size: int,
    *,
    min_frequency: int = 2,
    length: int | None = None,
    show_progress: bool = True,
) -> Tokenizer:
    """Train a byte-level BPE of `vocab_size` ids (special tokens included) on `texts`.

    `length` (the number of texts, if known) sizes the progress bar.
    """
    n_special = len(SPECIAL_TOKENS)
    if vocab_size < 256 + n_special:
        raise ValueError(f"vocab size must be at least {256 + n_special} (256 bytes + {n_special} special tokens), got {vocab_size}")
    backend, specials = byte_level_bpe()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    seen = [0]

    def counted(source: Iterable[str]) -> Iterator[str]:
        for text in source:
            seen[0] += 1
            yield clean_text(text)

    stream: Iterable[str] = counted(texts)
    if show_progress:
        from tqdm import tqdm

        stream = tqdm(stream, total=length, desc="tokenizer: reading", unit="doc")
    backend.train_from_iterator(stream, trainer=trainer, length=length)
    if seen[0] == 0:
        raise ValueError("cannot train a tokenizer on an empty corpus")
    return Tokenizer(backend)

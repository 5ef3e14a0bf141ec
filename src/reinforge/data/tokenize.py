"""Canonical records → token ids: chat templates, prompt/completion split, length handling.

Conversational records (message lists) are rendered with the chat template: the prompt with
`add_generation_prompt=True`, each full sequence as prompt + response messages; the completion is
what the full sequence adds after the prompt. Text records are used as they are, except that the
tokenizer's EOS is appended to a response that does not already end with it (TRL does the same).

Both are found in token space as the common prefix of the tokenised prompt and the tokenised full
sequence (as TRL 1.16 does). When the two disagree before the end of the prompt (the template
renders the prompt differently, or tokens merge across the boundary, e.g. "hel" + "lo" → "hello")
the completion starts where they diverge; such rows are counted in `TokenizeStats.boundary_merges`.

BOS: rendered chat templates are tokenised with `add_special_tokens=False` (the template writes
its own BOS if it has one). Text records get the tokenizer's BOS when the tokenizer adds one by
default and the text does not already start with it. A sequence that would start with two BOS
tokens keeps one (counted in `double_bos_removed`), so there is never a double BOS.

Texts are tokenised in batches (fast tokenizers run them in parallel).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from reinforge.data.errors import RowError

Strategy = Literal["truncate", "drop", "raise"]
Mode = Literal["keep_start", "keep_end"]
BATCH = 1024
PERCENTILES = (50, 90, 95, 99)


class RecordError(RowError):
    """A RowError for record `index` of the list being tokenised."""

    def __init__(self, index: int, field: str, problem: str):
        super().__init__(field, problem)
        self.index = index


@dataclass
class TokenizeStats:
    """Counts reported after preparation; nothing is dropped or truncated without being counted.

    rows_in: rows read from the sources; records: canonical records the formats made of them (KTO
    unpairing makes two of a row); duplicates: records removed by `dataset_exact_deduplication`;
    rows_out: records kept. Invariant: rows_out = records - duplicates - dropped_too_long -
    dropped_no_completion. `notes` counts what formats report (e.g. ignored later turns);
    `lengths[name]` holds the token length of each kept row's prompt/chosen/rejected/completion.
    """

    rows_in: int = 0
    records: int = 0
    duplicates: int = 0
    rows_out: int = 0
    truncated: int = 0
    dropped_too_long: int = 0
    dropped_no_completion: int = 0
    boundary_merges: int = 0
    eos_appended: int = 0
    double_bos_removed: int = 0
    prompts_over_max_length: int = 0
    notes: dict[str, int] = field(default_factory=dict)
    lengths: dict[str, list[int]] = field(default_factory=dict)

    COUNTS = ("rows_in", "records", "duplicates", "rows_out", "truncated", "dropped_too_long", "dropped_no_completion",
              "boundary_merges", "eos_appended", "double_bos_removed", "prompts_over_max_length")

    def add_length(self, name: str, n: int) -> None:
        self.lengths.setdefault(name, []).append(n)

    def note(self, text: str, n: int = 1) -> None:
        self.notes[text] = self.notes.get(text, 0) + n

    def merge(self, other: "TokenizeStats") -> None:
        for key in self.COUNTS:
            setattr(self, key, getattr(self, key) + getattr(other, key))
        for key, n in other.notes.items():
            self.note(key, n)
        for key, values in other.lengths.items():
            self.lengths.setdefault(key, []).extend(values)

    @property
    def dropped(self) -> int:
        """Rows removed for any reason (duplicates, too long, no room for a completion)."""
        return self.duplicates + self.dropped_too_long + self.dropped_no_completion

    def percentiles(self) -> dict[str, dict[str, float]]:
        """Per field: min, p50, p90, p95, p99, max and mean token length (nearest-rank percentiles)."""
        out = {}
        for name, values in self.lengths.items():
            if not values:
                continue
            s = sorted(values)
            row: dict[str, float] = {"min": s[0]}
            for p in PERCENTILES:
                row[f"p{p}"] = s[min(len(s) - 1, max(0, -(-p * len(s) // 100) - 1))]
            row["max"] = s[-1]
            row["mean"] = sum(s) / len(s)
            out[name] = row
        return out

    def to_dict(self) -> dict[str, Any]:
        """Counts, notes and length percentiles (no per-row lengths), for reports and cache metadata."""
        return {**{k: getattr(self, k) for k in self.COUNTS}, "notes": dict(self.notes), "lengths": self.percentiles()}


def render(tokenizer, messages: list[dict[str, str]], add_generation_prompt: bool, **kwargs: Any) -> str:
    """The chat-template rendering of `messages` as text (the tokenizer's template, or `chat_template=` in kwargs)."""
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt, **kwargs)


def common_prefix_length(a: list[int], b: list[int]) -> int:
    """Length of the longest common prefix of two id lists."""
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def adds_bos(tokenizer) -> bool:
    """Whether `tokenizer(text)` prepends its BOS token by default."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return False
    with_special = tokenizer("a")["input_ids"]
    without = tokenizer("a", add_special_tokens=False)["input_ids"]
    return len(with_special) > len(without) and with_special[0] == bos


class Encoder:
    """Batched tokenisation with reinforge's BOS rule (see the module docstring)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.bos = tokenizer.bos_token_id
        self.add_bos = adds_bos(tokenizer)
        self.double_bos_removed = 0

    def encode(self, texts: list[str], templated: list[bool]) -> list[list[int]]:
        """Token ids of each text; `templated[i]`: rendered by a chat template (no BOS added)."""
        out: list[list[int]] = []
        for start in range(0, len(texts), BATCH):
            chunk = texts[start:start + BATCH]
            out.extend(self.tokenizer(chunk, add_special_tokens=False)["input_ids"] if chunk else [])
        for i, ids in enumerate(out):
            if not templated[i] and self.add_bos and (not ids or ids[0] != self.bos):
                ids.insert(0, self.bos)
            if self.bos is not None and len(ids) >= 2 and ids[0] == ids[1] == self.bos:
                del ids[0]
                self.double_bos_removed += 1
        return out


def split_prompt_completions(tokenizer, prompt: Any, completions: list[Any],
                             chat_kwargs: dict[str, Any] | None = None) -> tuple[list[int], list[list[int]], bool]:
    """Tokenise a prompt and its completions so that `prompt_ids + completion_ids[i]` is the full sequence.

    Args:
        prompt: message list (conversational) or text.
        completions: message lists (assistant continuation) or texts, matching `prompt`'s kind; texts
            are used as given (no EOS is appended here).
    Returns:
        (prompt_ids, [completion_ids...], merged) where `merged` says the prompt alone tokenised
        differently from its prefix inside a full sequence (boundary merge).
    """
    enc = Encoder(tokenizer)
    texts, templated = _texts(tokenizer, prompt, completions, chat_kwargs or {})
    ids = enc.encode(texts, [templated] * len(texts))
    return _split(ids[0], ids[1:])


def _texts(tokenizer, prompt: Any, completions: list[Any], chat_kwargs: dict[str, Any]) -> tuple[list[str], bool]:
    if isinstance(prompt, list):
        return ([render(tokenizer, prompt, True, **chat_kwargs)]
                + [render(tokenizer, prompt + c, False, **chat_kwargs) for c in completions]), True
    return [prompt] + [prompt + c for c in completions], False


def _split(prompt_ids: list[int], fulls: list[list[int]]) -> tuple[list[int], list[list[int]], bool]:
    n = min(common_prefix_length(prompt_ids, f) for f in fulls)
    return prompt_ids[:n], [f[n:] for f in fulls], n < len(prompt_ids)


def fit_length(prompt_ids: list[int], completions: list[list[int]], max_len: int, strategy: Strategy,
               mode: Mode) -> tuple[list[int], list[list[int]], str]:
    """Make every `prompt + completion` at most `max_len` tokens.

    keep_start: the prompt is kept, completions are cut at the end (the row is dropped when the prompt
    alone fills max_len). keep_end: the prompt loses tokens from its start (the completions' ends are
    kept; a completion alone longer than max_len is cut at its start). TRL's keep_end slices each
    sequence independently; reinforge keeps one prompt shared by chosen and rejected instead.
    Returns (prompt_ids, completions, status) with status "ok", "truncated", "dropped_too_long" or
    "dropped_no_completion". Raises RowError with strategy "raise".
    """
    longest = len(prompt_ids) + max(len(c) for c in completions)
    if longest <= max_len:
        return prompt_ids, completions, "ok"
    if strategy == "raise":
        raise RowError("sequence", f"{longest} tokens > sequence_len {max_len} (excess_length_strategy: raise)")
    if strategy == "drop":
        return prompt_ids, completions, "dropped_too_long"
    if mode == "keep_start":
        if len(prompt_ids) >= max_len:
            return prompt_ids, completions, "dropped_no_completion"
        room = max_len - len(prompt_ids)
        return prompt_ids, [c[:room] for c in completions], "truncated"
    longest_completion = max(len(c) for c in completions)
    if longest_completion >= max_len:
        return [], [c[-max_len:] for c in completions], "truncated"
    keep = max_len - longest_completion
    return prompt_ids[len(prompt_ids) - keep:], completions, "truncated"


def tokenize_records(records: list[dict[str, Any]], kind: str, tokenizer, max_len: int, strategy: Strategy, mode: Mode,
                     stats: TokenizeStats, chat_kwargs: dict[str, Any] | None = None,
                     max_prompt_length: int | None = None) -> list[dict[str, Any] | None]:
    """Tokenise canonical records in batches; one entry per record, None where the row was dropped.

    paired → prompt_ids, chosen_ids, rejected_ids; unpaired → prompt_ids, completion_ids, label;
    prompt → prompt_ids (the chat template with the generation prompt; not truncated here: prompts
    longer than `max_prompt_length` are counted in `stats.prompts_over_max_length`).
    `chat_kwargs` go to `apply_chat_template` (e.g. `chat_template=` for a per-dataset template).

    Raises:
        RecordError: naming the record index and field (a chat template that fails, an empty
            completion, a row over `max_len` with strategy "raise").
    """
    chat_kwargs = chat_kwargs or {}
    names = {"paired": ["chosen", "rejected"], "unpaired": ["completion"], "prompt": []}[kind]
    eos = tokenizer.eos_token
    texts: list[str] = []
    templated: list[bool] = []
    spans: list[tuple[int, int]] = []
    for i, rec in enumerate(records):
        prompt = rec["prompt"]
        comps = [rec[n] for n in names]
        if isinstance(prompt, str) and eos:
            fixed = [c if c.endswith(eos) else c + eos for c in comps]
            stats.eos_appended += int(fixed != comps)
            comps = fixed
        try:
            t, is_chat = _texts(tokenizer, prompt, comps, chat_kwargs)
        except Exception as exc:  # jinja errors (e.g. "System role not supported"), missing template
            raise RecordError(i, "prompt", f"the chat template failed: {type(exc).__name__}: {exc}") from None
        spans.append((len(texts), len(t)))
        texts.extend(t)
        templated.extend([is_chat] * len(t))
    enc = Encoder(tokenizer)
    ids = enc.encode(texts, templated)
    stats.double_bos_removed += enc.double_bos_removed

    out: list[dict[str, Any] | None] = []
    for i, (rec, (start, n)) in enumerate(zip(records, spans)):
        if kind == "prompt":
            prompt_ids = ids[start]
            stats.rows_out += 1
            stats.add_length("prompt", len(prompt_ids))
            stats.prompts_over_max_length += int(bool(max_prompt_length) and len(prompt_ids) > max_prompt_length)
            out.append({"prompt_ids": prompt_ids})
            continue
        prompt_ids, comps, merged = _split(ids[start], ids[start + 1:start + n])
        stats.boundary_merges += int(merged)
        for name, c in zip(names, comps):
            if not c:
                raise RecordError(i, name, "the completion is empty after tokenisation")
        try:
            prompt_ids, comps, status = fit_length(prompt_ids, comps, max_len, strategy, mode)
        except RowError as exc:
            raise RecordError(i, exc.field, exc.problem) from None
        if status.startswith("dropped"):
            setattr(stats, status, getattr(stats, status) + 1)
            out.append(None)
            continue
        stats.truncated += status == "truncated"
        stats.rows_out += 1
        row: dict[str, Any] = {"prompt_ids": prompt_ids}
        stats.add_length("prompt", len(prompt_ids))
        for name, c in zip(names, comps):
            row[f"{name}_ids"] = c
            stats.add_length(name, len(c))
        stats.add_length("total", len(prompt_ids) + max(len(c) for c in comps))
        if kind == "unpaired":
            row["label"] = bool(rec["label"])
        out.append(row)
    return out


def tokenize_record(record: dict[str, Any], kind: str, tokenizer, max_len: int, strategy: Strategy, mode: Mode,
                    stats: TokenizeStats, chat_kwargs: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """One canonical record → token ids (None when the row is dropped; `stats` counts why).

    Same rules as `tokenize_records` (which preparation uses for speed).
    Raises RowError (see `tokenize_records`).
    """
    return tokenize_records([record], kind, tokenizer, max_len, strategy, mode, stats, chat_kwargs)[0]

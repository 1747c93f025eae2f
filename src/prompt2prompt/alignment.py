"""Token alignment: words to token positions, and the source-to-edit token mappers of Prompt-to-Prompt.

Pure functions over a tokenizer; nothing here knows about diffusion. For CLIP, positions count the BOS token
as 0, so the first word's tokens start at 1, and every tensor spans the text encoder's 77 positions. T5 has
no BOS: its first piece is position 0, and its EOS and padding belong to no word.

A model whose text is several parts (SD3: 77 CLIP tokens, then the T5 tokens) has a joint text: `join`
puts each part at its offset, a word's positions are its tokens in every part, and `text_mappers` builds
the block-diagonal mappers, each part mapped by its own tokenizer's sequence.
"""

import re
from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch

from .limits import quoted

MAX_TOKENS = 77

WordRef = str | int


@dataclass(frozen=True)
class Tokenized:
    """A prompt's words, its unpadded token ids (BOS..EOS) and the token positions of each word."""

    prompt: str
    words: list[str]
    ids: list[int]
    word_tokens: list[list[int]]
    length: int = MAX_TOKENS  # the text encoder's sequence length (every tensor over tokens spans it)
    parts: tuple["TextPart", ...] = ()  # a joint text's parts (empty: the text is this one tokenization)
    # Masked padding: positions >= true_length are padding the pipeline masks (no row gives them probability);
    # None: the padding, if any, is attended like any token (CLIP, SD3's and Flux's T5).
    true_length: int | None = None
    # Attended padding before the text (a tokenizer that pads on the left, FLUX.2 dev's): positions 0..lead-1 are
    # padding of no word, and the text (`ids`) fills positions lead..length-1; `word_tokens` are absolute positions.
    lead: int = 0

    @property
    def blocks(self) -> tuple["TextPart", ...]:
        """The parts of the text, each with its offset: a single tokenization is one part at offset 0."""
        return self.parts or (TextPart(self, 0),)


@dataclass(frozen=True)
class TextPart:
    """One tokenizer's part of a joint text, starting at `offset` and `tokenized.length` long."""

    tokenized: Tokenized
    offset: int


def join(parts: Sequence[Tokenized]) -> Tokenized:
    """The joint text of one prompt's tokenizations, laid end to end (SD3: CLIP's 77, then T5's).

    A word's positions are its tokens in every part, shifted by the part's offset.
    """
    first = parts[0]
    if any(p.words != first.words for p in parts):
        raise ValueError(f"the parts of a joint text must split {first.prompt!r} into the same words")
    placed, offset = [], 0
    word_tokens: list[list[int]] = [[] for _ in first.words]
    for part in parts:
        placed.append(TextPart(part, offset))
        for w, positions in enumerate(part.word_tokens):
            word_tokens[w].extend(offset + p for p in positions)
        offset += part.length
    ids = [i for part in parts for i in part.ids]
    return Tokenized(first.prompt, list(first.words), ids, word_tokens, length=offset, parts=tuple(placed))


def word_spans(prompt: str) -> list[tuple[int, int]]:
    """The character span `(start, end)` of each word of `prompt`: words are separated by runs of whitespace.

    Two spaces in a row make no empty word, and tabs and newlines separate words as spaces do.

    >>> word_spans(" a  cat\\tnaps ")
    [(1, 2), (4, 7), (8, 12)]
    """
    return [match.span() for match in re.finditer(r"\S+", prompt)]


def tokenize(tokenizer, prompt: str, max_length: int = MAX_TOKENS, *, what: str = "(BOS and EOS included)") -> Tokenized:
    """Split `prompt` into words (on runs of whitespace) and find each word's token positions from the offsets.

    `max_length` is the text encoder's sequence length: a longer prompt is refused, never cut.

    >>> t = tokenize(clip_tokenizer(), "a lasagne with croutons")  # doctest: +SKIP
    >>> t.word_tokens  # doctest: +SKIP
    [[1], [2, 3], [4], [5, 6, 7]]
    """
    if not isinstance(prompt, str):
        raise TypeError(f"a prompt is a string, not {type(prompt).__name__}")
    try:
        prompt.encode("utf-8")
    except UnicodeEncodeError as error:  # lone surrogates: bytes of a command line or a file that are not UTF-8
        raise ValueError(f"the prompt {prompt[:60]!r} holds a character that is not text (at {error.start}): bytes "
                         "that are not UTF-8?") from None
    try:
        # verbose=False: a prompt over the length is refused below, in one line, without the tokenizer's warning
        enc = tokenizer(prompt, add_special_tokens=True, return_offsets_mapping=True, truncation=False, verbose=False)
    except NotImplementedError as error:  # transformers 4's slow (Python) tokenizers
        raise TypeError(
            f"{type(tokenizer).__name__} gives no character offsets, which word alignment needs; "
            f"use transformers >= 5.17, whose tokenizers give them"
        ) from error
    ids, offsets = list(enc["input_ids"]), list(enc["offset_mapping"])
    if len(ids) > max_length:
        raise ValueError(
            f"the prompt {quoted(prompt)} is {len(ids)} tokens long, more than the text encoder's {max_length} "
            f"{what}; shorten it"
        )
    spans = word_spans(prompt)
    words = [prompt[start:end] for start, end in spans]
    word_tokens: list[list[int]] = [[] for _ in words]
    for pos, (a, b) in enumerate(offsets):
        if b <= a:  # special tokens carry an empty span
            continue
        for w, (ws, we) in enumerate(spans):
            if ws <= a and b <= we:
                word_tokens[w].append(pos)
                break
    return Tokenized(prompt, words, ids, word_tokens, length=max_length)


def tokenize_templated(tokenizer, prompt: str, template: str, drop: int, max_length: int | None = None, *,
                       what: str = "", padded: bool = True) -> Tokenized:
    """A prompt read through a chat template (`template.format(prompt)`), of which the pipeline keeps the tokens
    from `drop` on (Qwen-Image's `prompt_template_encode_start_idx`), and masks the padding after them.

    Positions count from the first kept token; a word's tokens are found by character offsets inside the templated
    string, never by assuming the prompt starts at the first kept position: the template's kept tokens (its suffix,
    and its prefix's tail where the prefix takes more than `drop` tokens) belong to no word, like EOS. A prompt
    whose characters fall in the dropped tokens (a prefix of fewer than `drop` tokens) is refused. `true_length` is
    the number of kept tokens; `length` the padded length the run uses: `max_length` (also the bound), or the
    true length when None or when not `padded` (`max_length` then only bounds it).

    >>> t = tokenize_templated(tok, "a red cat", "<s>user: {}</s>", drop=2)  # doctest: +SKIP
    """
    if not isinstance(prompt, str):
        raise TypeError(f"a prompt is a string, not {type(prompt).__name__}")
    if "{}" not in template:
        raise ValueError(f"a chat template holds '{{}}' where the prompt goes, not {template!r}")
    start = template.index("{}")
    text = template[:start] + prompt + template[start + 2:]
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, truncation=False, verbose=False)
    all_offsets = list(enc["offset_mapping"])
    dropped = all_offsets[:drop]
    if len(dropped) < drop or any(b > start for a, b in dropped if b > a):
        raise ValueError(f"the model's text encoder drops the first {drop} tokens of its template, which take part "
                         f"of the prompt {quoted(prompt)} with them (this tokenizer reads the template's opening in "
                         "fewer tokens); the prompt cannot be read whole")
    ids, offsets = list(enc["input_ids"])[drop:], all_offsets[drop:]
    if max_length is not None and len(ids) > max_length:
        detail = f" {what}" if what else ""
        raise ValueError(f"the prompt {quoted(prompt)} is {len(ids)} tokens long in its template, more than the "
                         f"model's {max_length}{detail}; shorten it")
    spans = [(a + start, b + start) for a, b in word_spans(prompt)]
    words = [text[a:b] for a, b in spans]
    word_tokens: list[list[int]] = [[] for _ in words]
    for pos, (a, b) in enumerate(offsets):
        for w, (ws, we) in enumerate(spans):
            if b > a and ws <= a and b <= we:
                word_tokens[w].append(pos)
                break
    length = len(ids) if max_length is None or not padded else max_length
    return Tokenized(prompt, words, ids, word_tokens, length=length, true_length=len(ids))


def _strip(word: str) -> str:
    return word.strip(".,;:!?'\"()[]{}").lower()


def find_words(tokenized: Tokenized, word: WordRef) -> list[int]:
    """Indices of the words that `word` names: a position, or every occurrence of a text.

    Text matches exactly first; failing that, case-insensitively with surrounding punctuation stripped.
    """
    words = tokenized.words
    if isinstance(word, bool) or not isinstance(word, (str, int)):
        raise TypeError(f"a word is named by its text or its position, not {word!r}")
    if isinstance(word, int):
        if not -len(words) <= word < len(words):
            raise ValueError(f"word position {word} is outside the prompt {tokenized.prompt!r}, which has {len(words)} words")
        return [word % len(words)]
    found = [i for i, w in enumerate(words) if w == word]
    if not found:
        found = [i for i, w in enumerate(words) if _strip(w) == _strip(word) and _strip(word)]
    if not found:
        raise ValueError(f"the word {word!r} is not in the prompt {tokenized.prompt!r}; its words are {words}")
    return found


def word_token_positions(tokenized: Tokenized, words: WordRef | Sequence[WordRef]) -> list[int]:
    """Token positions of the named words; a string with spaces names each of its words.

    >>> word_token_positions(tokenize(clip_tokenizer(), "a cat riding a bicycle"), "a")  # doctest: +SKIP
    [1, 4]
    """
    positions: list[int] = []
    for ref in _word_refs(words):
        for w in find_words(tokenized, ref):
            positions.extend(p for p in tokenized.word_tokens[w] if p not in positions)
    return sorted(positions)


def check_words(prompt: str, words: WordRef | Sequence[WordRef]) -> None:
    """Raise the ValueError that `word_token_positions` raises for words missing from `prompt`, without a tokenizer.

    Words are those of `word_spans`, as in `tokenize`, so this needs no model.

    >>> check_words("a cat riding a bicycle", ["cat", "riding a", 4])
    >>> check_words("a cat riding a bicycle", "dog")
    Traceback (most recent call last):
    ...
    ValueError: the word 'dog' is not in the prompt 'a cat riding a bicycle'; its words are ['a', 'cat', 'riding', 'a', 'bicycle']
    """
    prompt_words = [prompt[start:end] for start, end in word_spans(prompt)]
    words_only = Tokenized(prompt, prompt_words, ids=[], word_tokens=[])  # all that find_words reads
    for ref in _word_refs(words):
        find_words(words_only, ref)


def _word_refs(words: WordRef | Sequence[WordRef]) -> list[WordRef]:
    """One reference per word: a string with spaces names each of its words."""
    refs: list[WordRef] = []
    for ref in [words] if isinstance(words, (str, int)) else list(words):
        if isinstance(ref, str) and not ref.split():
            raise ValueError(f"a word to look up must hold some text, not {ref!r}")
        refs.extend(ref.split() if isinstance(ref, str) else [ref])
    return refs


def replacement_mapper(source: Tokenized, edit: Tokenized, max_length: int = MAX_TOKENS) -> torch.Tensor:
    """The (77, 77) matrix M with M[k, j] = how much edit token j takes from source token k, for a word swap.

    Differing words with equal token counts map one to one; otherwise every edit token of the word takes
    1/len(edit tokens) from every source token of the word. Everything else maps along the walk.
    """
    if len(source.words) != len(edit.words):
        raise ValueError(
            f"replace needs prompts with the same number of words, but the source {source.prompt!r} has "
            f"{len(source.words)} and the edit {edit.prompt!r} has {len(edit.words)}; use mode='refine' to add words"
        )
    # A changed word with no tokens (characters the tokenizer drops) has nothing to map and would stall the walk.
    changed = [w for w, (a, b) in enumerate(zip(source.words, edit.words)) if a != b and source.word_tokens[w]]
    src_spans = [source.word_tokens[w] for w in changed]
    edit_spans = [edit.word_tokens[w] for w in changed]
    mapper = torch.zeros(max_length, max_length)
    src_owner, edit_owner = _owners(source, max_length), _owners(edit, max_length)
    i = j = cur = 0
    while i < max_length and j < max_length:
        if cur < len(changed) and src_spans[cur][0] == i:
            s, e = src_spans[cur], edit_spans[cur]
            if e[0] != j:
                _unpaired(source, edit, src_owner, i)
            if len(s) == len(e):
                mapper[s, e] = 1.0
            else:
                for t in e:
                    mapper[s, t] = 1.0 / len(e)
            cur += 1
            i += len(s)
            j += len(e)
        else:
            if (src_owner[i] < 0) != (edit_owner[j] < 0):  # a token of no word (whitespace) against a word's
                _unpaired(source, edit, src_owner, i)
            mapper[i, j] = 1.0
            i += 1
            j += 1
    empty = mapper.sum(0) == 0
    mapper[empty.nonzero().flatten(), empty.nonzero().flatten()] = 1.0
    return mapper


def _owners(t: Tokenized, length: int) -> list[int]:
    """The word of each position of `t` (-1: a token of no word: BOS, EOS, padding, a template's, whitespace)."""
    owner = [-1] * length
    for w, positions in enumerate(t.word_tokens):
        for p in positions:
            if p < length:
                owner[p] = w
    return owner


def _unpaired(source: Tokenized, edit: Tokenized, src_owner: list[int], i: int) -> None:
    """Refuse a word swap whose tokens of no word do not pair up (a double space in one prompt), naming the place."""
    before = [w for w in src_owner[:i] if w >= 0]
    where = f"after {source.words[before[-1]]!r}" if before else "before the first word"
    raise ValueError(f"the source {quoted(source.prompt)} and the edit {quoted(edit.prompt)} do not line up {where}: "
                     "one has a token of no word there (extra whitespace?) that the other has not; write both "
                     "with single spaces between words")


def needleman_wunsch(x: Sequence[int], y: Sequence[int]) -> list[int]:
    """Globally align y to x (gap 0, match +1, mismatch -1); return for each y element its x index or -1.

    Cells take max(left, up, diagonal) with ties broken in that order; the path is traced back from
    the bottom-right corner.

    >>> needleman_wunsch([1, 5, 9], [1, 5, 7, 9])
    [0, 1, -1, 2]
    """
    gap, match, mismatch = 0, 1, -1
    n, m = len(x), len(y)
    score = [[0] * (m + 1) for _ in range(n + 1)]
    # 1: left (consumes y), 2: up (consumes x), 3: diagonal, 4: origin
    trace = [[0] * (m + 1) for _ in range(n + 1)]
    for jj in range(1, m + 1):
        score[0][jj], trace[0][jj] = jj * gap, 1
    for ii in range(1, n + 1):
        score[ii][0], trace[ii][0] = ii * gap, 2
    trace[0][0] = 4
    for ii in range(1, n + 1):
        for jj in range(1, m + 1):
            left = score[ii][jj - 1] + gap
            up = score[ii - 1][jj] + gap
            diag = score[ii - 1][jj - 1] + (match if x[ii - 1] == y[jj - 1] else mismatch)
            best = max(left, up, diag)
            score[ii][jj] = best
            trace[ii][jj] = 1 if best == left else 2 if best == up else 3
    mapping = [-1] * m
    ii, jj = n, m
    while ii > 0 or jj > 0:
        step = trace[ii][jj]
        if step == 3:
            ii, jj = ii - 1, jj - 1
            mapping[jj] = ii
        elif step == 1:
            jj -= 1
        elif step == 2:
            ii -= 1
        else:
            break
    return mapping


def refinement_mapper(source: Tokenized, edit: Tokenized, max_length: int = MAX_TOKENS) -> tuple[torch.Tensor, torch.Tensor]:
    """The refinement mapper m (77,) and alpha (77,): edit token j takes source token m[j] where alpha[j] is 1.

    Inserted edit tokens get alpha 0 (they keep their own attention); padding after the edit's EOS maps
    to the source's padding.
    """
    n_x, n_y = len(source.ids), len(edit.ids)
    aligned = needleman_wunsch(source.ids, edit.ids)
    mapper = torch.zeros(max_length, dtype=torch.long)
    alpha = torch.ones(max_length)
    for j, k in enumerate(aligned):
        mapper[j] = max(k, 0)
        alpha[j] = float(k >= 0)
    for j in range(n_y, max_length):
        mapper[j] = min(n_x + (j - n_y), max_length - 1)
    return mapper, alpha


def text_mappers(source: Tokenized, edit: Tokenized, mode: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The (L, L) mapper M, the refinement index m (L,) and alpha (L,) of one edit over the whole text.

    `mode` is "replace" or "refine". Each part of a joint text is mapped by its own sequence and placed on
    the diagonal; for refine, M is the one-hot of m (M[k, j] = 1 where m[j] = k).
    """
    length = source.length
    if edit.length != length or len(edit.blocks) != len(source.blocks):
        raise ValueError("the source and the edit must be tokenized for the same text encoder")
    mapper = torch.zeros(length, length)
    index = torch.arange(length)
    alpha = torch.ones(length)
    for s_part, e_part in zip(source.blocks, edit.blocks):
        o, n = s_part.offset, s_part.tokenized.length
        # A left-padded text is mapped as the rules are stated, from its first token with its padding after it, then
        # put back in place: the text maps by the walk or the alignment, and padding to padding at the same position.
        s_lead, e_lead = s_part.tokenized.lead, e_part.tokenized.lead
        s_text, e_text = _text_first(s_part.tokenized), _text_first(e_part.tokenized)
        if mode == "replace":
            m = replacement_mapper(s_text, e_text, n)
            mapper[o : o + n, o : o + n] = m.roll((s_lead, e_lead), dims=(0, 1))
        else:
            m, a = refinement_mapper(s_text, e_text, n)
            index[o : o + n], alpha[o : o + n] = ((m + s_lead) % n).roll(e_lead) + o, a.roll(e_lead)
    if mode != "replace":
        mapper = torch.nn.functional.one_hot(index, length).T.float()
    if any(part.tokenized.true_length is not None for t in (source, edit) for part in t.blocks):
        mapper, alpha = masked_padding(mapper, alpha, source, edit)
    return mapper, index, alpha


def padded_left(t: Tokenized) -> Tokenized:
    """`t`, a text from position 0 padded after its end, padded before its start instead (a tokenizer that pads on the
    left): it ends at the last position, and its words' positions move with it."""
    return _with_lead(t, t.length - len(t.ids))


def _text_first(t: Tokenized) -> Tokenized:
    """`t` with its text from position 0 and its leading padding after it (itself when it has none)."""
    return _with_lead(t, 0)


def _with_lead(t: Tokenized, lead: int) -> Tokenized:
    if lead == t.lead:
        return t
    return replace(t, word_tokens=[[p - t.lead + lead for p in positions] for positions in t.word_tokens], lead=lead)


def masked_padding(mapper: torch.Tensor, alpha: torch.Tensor, source: Tokenized, edit: Tokenized):
    """The contract's masked-padding rule on (L, L) mapper M and (L,) alpha: M[k, j] = 0 where source position k or
    edit position j is masked padding, and alpha[j] = 0 on the edit's masked positions (its map there is its own
    attention, which the mask makes zero). A joint text's parts are masked each at its own true length."""
    def masked(t: Tokenized) -> torch.Tensor:
        out = torch.zeros(t.length, dtype=torch.bool)
        for part in t.blocks:
            n = part.tokenized.true_length
            if n is not None:
                out[part.offset + n : part.offset + part.tokenized.length] = True
        return out

    masked_s, masked_e = masked(source), masked(edit)
    mapper = mapper.clone()
    mapper[masked_s] = 0
    mapper[:, masked_e] = 0
    alpha = torch.where(masked_e, torch.zeros_like(alpha), alpha)
    return mapper, alpha

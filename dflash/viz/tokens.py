"""A token-by-token view of a speculative run: which tokens each verify step accepted.

The engine emits the first token from the prefill pass, then per verify step its accepted
drafts and one more token from the target (the bonus, or the correction after a rejected
draft) — ``acceptance_lengths`` counts both (docs/design.md §7). The last step may be cut by
EOS or the token budget, and then emits fewer tokens (possibly without its bonus).

``split_steps`` rebuilds those steps from a result's tokens and acceptance lengths;
``render_terminal`` colours them for a terminal (``dflash-generate --show-steps``),
``render_plain`` marks them with brackets for files, pipes and ``NO_COLOR`` (``wants_color``
decides which), and ``render_html`` shows them in a notebook. ``parse_terminal`` reads the
terminal rendering back into the same steps and token ids: every token is its own coloured
span, and a token whose text is ambiguous in the vocabulary (two ids decode alike, or it decodes
to nothing) is written as ``⟦id⟧``, so the round trip is exact for any tokenizer.
"""

from __future__ import annotations

import dataclasses
import html
import os
import re
from collections.abc import Sequence
from typing import Any, TextIO

from dflash.viz.errors import VizError

FIRST, DRAFT, BONUS = "first", "draft", "bonus"
# SGR codes: the prefill token dim, accepted drafts green, the target's own token bold yellow.
SGR = {FIRST: "2", DRAFT: "32", BONUS: "1;33"}
KIND_OF_SGR = {v: k for k, v in SGR.items()}
RESET = "\x1b[0m"
_SPAN = re.compile(r"\x1b\[([0-9;]+)m(.*?)\x1b\[0m", re.DOTALL)
_ID = re.compile(r"⟦(\d+)⟧")
LEGEND = "(dim: first token, from the prefill | green: accepted drafts | bold yellow: the target's token)"
# Without colour, each token of the target's own (the prefill's first included) is bracketed; the text
# between brackets is accepted drafts, so every step ends at a closing bracket (a cut last step aside).
OPEN, CLOSE = "⟨", "⟩"
PLAIN_LEGEND = (f"({OPEN}…{CLOSE}: the target's token, the first from the prefill | between them: "
                "accepted drafts)")
_PLAIN_STEP = re.compile(f"([^{OPEN}{CLOSE}]*){OPEN}([^{OPEN}{CLOSE}]*){CLOSE}")
COLOR_MODES = ("auto", "always", "never")


@dataclasses.dataclass(frozen=True)
class Step:
    """What one pass emitted: ``drafts`` accepted, then the target's ``bonus`` (None when EOS or
    the budget cut the step before it). Step 0 is the prefill: one bonus, no drafts."""

    drafts: tuple[int, ...]
    bonus: int | None

    @property
    def tokens(self) -> tuple[int, ...]:
        return self.drafts + (() if self.bonus is None else (self.bonus,))


def split_steps(tokens: Sequence[int], acceptance_lengths: Sequence[int]) -> list[Step]:
    """One row's generated ``tokens`` -> ``[prefill step, verify steps...]``."""
    tokens = [int(t) for t in tokens]
    if not tokens:
        return []
    steps, pos = [Step((), tokens[0])], 1
    for i, a in enumerate(acceptance_lengths):
        if a < 1:
            raise VizError(f"acceptance length {a} at step {i}: every verify step accepts at least 1")
        if pos >= len(tokens):
            raise VizError(f"{len(acceptance_lengths)} verify steps but only {len(tokens)} tokens: step {i} "
                           "emitted nothing")
        emitted = tokens[pos:pos + a]
        if len(emitted) == a:  # a whole step: a - 1 drafts and the target's token
            steps.append(Step(tuple(emitted[:-1]), emitted[-1]))
        elif i == len(acceptance_lengths) - 1:  # cut by EOS or the budget: drafts only
            steps.append(Step(tuple(emitted), None))
        else:
            raise VizError(f"step {i} accepted {a} tokens but only {len(emitted)} remain, and it is not "
                           "the last")
        pos += len(emitted)
    if pos != len(tokens):
        raise VizError(f"the steps account for {pos} of {len(tokens)} tokens")
    return steps


def kinds(steps: Sequence[Step]) -> list[tuple[str, int]]:
    """``(kind, token id)`` for every emitted token, in order."""
    out = []
    for i, s in enumerate(steps):
        out += [(DRAFT, t) for t in s.drafts]
        if s.bonus is not None:
            out.append((FIRST if i == 0 else BONUS, s.bonus))
    return out


class TokenTexts:
    """Token id -> display text, and back. Ambiguous texts (shared by several ids, empty, or
    holding the view's own markers) are shown as ``⟦id⟧``."""

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer
        size = len(tokenizer)
        texts = [tokenizer.decode([i], skip_special_tokens=False, clean_up_tokenization_spaces=False)
                 for i in range(size)]
        seen: dict[str, list[int]] = {}
        for i, t in enumerate(texts):
            seen.setdefault(t, []).append(i)
        self._text = [t if len(seen[t]) == 1 and self._plain(t) else f"⟦{i}⟧" for i, t in enumerate(texts)]
        self._id = {t: i for i, t in enumerate(self._text)}

    @staticmethod
    def _plain(text: str) -> bool:
        return (bool(text) and not any(mark in text for mark in ("\x1b", "⟦", OPEN, CLOSE))
                and not _ID.search(text))

    def text(self, token: int) -> str:
        if not 0 <= token < len(self._text):
            raise VizError(f"token id {token} is outside the vocabulary (size {len(self._text)})")
        return self._text[token]

    def id(self, text: str) -> int:
        found = self._id.get(text)
        if found is None:
            raise VizError(f"{text!r} is not the text of any token")
        return found


def render_terminal(steps: Sequence[Step], texts: TokenTexts) -> str:
    """Each emitted token in its own ANSI-coloured span (see ``SGR``)."""
    return "".join(f"\x1b[{SGR[kind]}m{texts.text(t)}{RESET}" for kind, t in kinds(steps))


def render_plain(steps: Sequence[Step], texts: TokenTexts) -> str:
    """The steps without colour: the target's tokens in ``⟨⟩``, accepted drafts between them."""
    return "".join(texts.text(t) if kind == DRAFT else f"{OPEN}{texts.text(t)}{CLOSE}"
                   for kind, t in kinds(steps))


def parse_plain(rendered: str) -> list[tuple[str, str | None]]:
    """``render_plain``'s output -> ``(drafts text, target token text or None)`` per step (the
    prefill first); token boundaries inside a run of drafts are not recoverable without colour."""
    steps: list[tuple[str, str | None]] = []
    end = 0
    for match in _PLAIN_STEP.finditer(rendered):
        if match.start() != end:
            raise VizError(f"unbalanced {OPEN}{CLOSE} at character {end} of the token view")
        steps.append((match.group(1), match.group(2)))
        end = match.end()
    rest = rendered[end:]
    if OPEN in rest or CLOSE in rest:
        raise VizError(f"unbalanced {OPEN}{CLOSE} at character {end} of the token view")
    if rest:  # a last step cut before its bonus
        steps.append((rest, None))
    return steps


def wants_color(mode: str = "auto", stream: TextIO | None = None,
                environ: dict[str, str] | None = None) -> bool:
    """Whether to write ANSI colours: ``always`` / ``never`` as told; ``auto`` colours only a
    terminal, and a non-empty ``NO_COLOR`` (no-color.org) or ``FORCE_COLOR`` overrides that."""
    if mode not in COLOR_MODES:
        raise VizError(f"colour mode {mode!r}: expected one of {', '.join(COLOR_MODES)}")
    if mode != "auto":
        return mode == "always"
    env = os.environ if environ is None else environ
    if env.get("NO_COLOR"):
        return False
    if env.get("FORCE_COLOR"):
        return True
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())


def parse_terminal(rendered: str, texts: TokenTexts) -> list[Step]:
    """``render_terminal``'s output (text outside the spans, e.g. the prompt, is ignored) -> steps."""
    steps: list[Step] = []
    drafts: list[int] = []
    for code, text in _SPAN.findall(rendered):
        kind = KIND_OF_SGR.get(code)
        if kind is None:
            raise VizError(f"unknown colour code {code!r} in the token view")
        token = texts.id(text)
        if kind == DRAFT:
            drafts.append(token)
        elif kind == FIRST and (steps or drafts):
            raise VizError("the prefill token can only come first")
        else:
            steps.append(Step(tuple(drafts), token))
            drafts = []
    if drafts:  # a last step cut before its bonus
        steps.append(Step(tuple(drafts), None))
    return steps


HTML_STYLE = {FIRST: "background:#e0e0e0", DRAFT: "background:#c8f0c8",
              BONUS: "background:#ffd98a;font-weight:bold"}


def render_html(steps: Sequence[Step], texts: TokenTexts, prompt: str = "") -> str:
    """An HTML block: the prompt in grey, then each token as a span coloured by kind, with its
    step and id in the tooltip (``data-id`` / ``data-step`` attributes)."""
    spans = []
    for step_no, s in enumerate(steps):
        for j, t in enumerate(s.tokens):
            is_bonus = s.bonus is not None and j == len(s.drafts)
            kind = (FIRST if step_no == 0 else BONUS) if is_bonus else DRAFT
            spans.append(f'<span data-id="{t}" data-step="{step_no}" data-kind="{kind}" '
                         f'title="step {step_no}, {kind}, id {t}" style="{HTML_STYLE[kind]}">'
                         f"{html.escape(texts.text(t))}</span>")
    legend = ('<div style="font-family:sans-serif;font-size:small">'
              + " ".join(f'<span style="{HTML_STYLE[k]}">{name}</span>' for k, name in
                         ((FIRST, "first token (prefill)"), (DRAFT, "accepted draft"),
                          (BONUS, "target's token (bonus / correction)")))
              + f" — {len(steps) - 1} verify steps</div>")
    body = f'<span style="color:#888">{html.escape(prompt)}</span>' + "".join(spans)
    return f'{legend}<pre style="white-space:pre-wrap;line-height:1.5">{body}</pre>'


class TokenView:
    """A notebook object: ``TokenView(tokenizer, tokens, acceptance_lengths, prompt)`` shows itself
    as HTML in Jupyter and as the terminal rendering in ``str()``."""

    def __init__(self, tokenizer: Any, tokens: Sequence[int], acceptance_lengths: Sequence[int],
                 prompt: str = "", texts: TokenTexts | None = None):
        self.texts = texts or TokenTexts(tokenizer)
        self.steps = split_steps(tokens, acceptance_lengths)
        self.prompt = prompt

    def _repr_html_(self) -> str:
        return render_html(self.steps, self.texts, self.prompt)

    def __str__(self) -> str:
        return self.prompt + render_terminal(self.steps, self.texts)


def show_steps(tokenizer: Any, prompt: str, tokens: Sequence[int], acceptance_lengths: Sequence[int],
               color: bool = True) -> str:
    """``dflash-generate --show-steps``: the prompt, the generation (coloured, or bracketed for a
    file or pipe) and a summary line."""
    steps = split_steps(tokens, acceptance_lengths)
    render, legend = (render_terminal, LEGEND) if color else (render_plain, PLAIN_LEGEND)
    return (prompt + render(steps, TokenTexts(tokenizer))
            + f"\n\n{len(steps) - 1} verify steps, {len(tokens)} tokens {legend}")

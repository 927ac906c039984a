"""containerd's filter language, as used by ``List`` (and ``Walk`` in containerd).

A *filter* is one or more *selectors* joined by ``,``; all of them must match (AND)::

    filter    := selector ("," selector)*
    selector  := fieldpath [operator value]
    fieldpath := field ("." field)*
    field     := [-_A-Za-z0-9]+ | dquoted
    operator  := "==" | "!=" | "~="
    value     := dquoted | bare | altquoted        (altquoted only after "~=")
    bare      := a run of printable characters other than "," and whitespace,
                 not starting with ".", a quote character or an operator character
    dquoted   := '"' Go string body '"'            (\\a \\b \\f \\n \\r \\t \\v \\\\ \\" \\xHH
                                                    \\ooo \\uHHHH \\UHHHHHHHH)
    altquoted := "/" body "/" | "|" body "|"       (the escape for the delimiter is
                                                    \\/ resp. \\|)

A selector without an operator tests that the field is *present*. ``==`` matches a present
field with exactly that value; ``!=`` matches when the field's value (``""`` when absent)
differs; ``~=`` matches when the regular expression is found anywhere in the value
(``re.search``; Python ``re`` syntax). Several filter strings, as in
``ListSnapshotsRequest.filters``, are OR-ed by :func:`parse_all`.

Whitespace may separate any two tokens (containerd is stricter: it rejects whitespace
before ``,`` and ``.``); apart from the divergences below, everything containerd accepts
is accepted with the same meaning.

``|`` is *not* an OR operator: no containerd version (1.x filters/, 2.x pkg/filters) has
one. In containerd ``|`` is an alternative quote delimiter for regular expressions
(``name~=|a/b|``), and ``name==a|b`` is the bare value ``a|b``; both hold here. OR is
expressed only by passing several filter strings.

Divergences from containerd, on purpose:

* patterns are Python ``re`` syntax, not Go RE2 (the common subset is the same; RE2-only
  forms such as ``\\z`` differ), and one that does not compile is rejected when the
  filter is parsed (containerd logs it and matches nothing);
* ``\\u``/``\\U`` escapes naming a surrogate are rejected (Go substitutes U+FFFD).

Every malformed input raises :class:`FilterSyntaxError` (an
:class:`~snapshotter.errdefs.InvalidArgument`) whose message names the filter, the
position and what was expected there. This module is pure: no I/O and no state of its
own (compiling a regular expression briefly silences the warnings machinery).
"""

from __future__ import annotations

import abc
import enum
import re
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

from snapshotter.errdefs import InvalidArgument

__all__ = [
    "ALWAYS",
    "Adaptor",
    "AllOf",
    "AnyOf",
    "Filter",
    "FilterSyntaxError",
    "Operator",
    "Selector",
    "parse",
    "parse_all",
    "snapshot_adaptor",
]

Adaptor = Callable[[Sequence[str]], tuple[str, bool]]
"""Looks up a field path on one object: returns ``(value, present)``.

An adaptor never raises for an unknown path; it answers ``("", False)``.
"""

SNAPSHOT_KINDS = ("active", "view", "committed")


class FilterSyntaxError(InvalidArgument):
    """A filter string is malformed.

    Attributes: ``filter`` (the whole input), ``position`` (index of the offending
    character, ``len(filter)`` for end of input) and ``reason`` (what was expected).
    """

    def __init__(self, filter_str: str, position: int, reason: str) -> None:
        if position < len(filter_str):
            found = repr(filter_str[position])
            where = (
                f"{filter_str[:position]} >|{filter_str[position]}|< {filter_str[position + 1 :]}"
            )
        else:
            found = "end of input"
            where = f"{filter_str} >|<"
        super().__init__(
            f"invalid filter {filter_str!r}: at position {position}: {reason}, "
            f"found {found}: [{where}]"
        )
        self.filter = filter_str
        self.position = position
        self.reason = reason


class Operator(enum.Enum):
    """How a selector compares the field's value."""

    PRESENT = "?"
    EQUAL = "=="
    NOT_EQUAL = "!="
    MATCHES = "~="


class Filter(abc.ABC):
    """A parsed filter: a predicate over objects seen through an :data:`Adaptor`."""

    @abc.abstractmethod
    def match(self, adaptor: Adaptor) -> bool:
        """True when the object behind ``adaptor`` satisfies the filter. Never raises
        (unless the adaptor does)."""


class _Always(Filter):
    """Matches everything: the empty filter and the empty list of filters."""

    def match(self, adaptor: Adaptor) -> bool:
        return True

    def __repr__(self) -> str:
        return "ALWAYS"


ALWAYS: Filter = _Always()


@dataclass(frozen=True)
class Selector(Filter):
    """One ``fieldpath[operator value]`` term. ``pattern`` is set for ``~=`` only."""

    fieldpath: tuple[str, ...]
    operator: Operator
    value: str = ""
    pattern: re.Pattern[str] | None = None

    def match(self, adaptor: Adaptor) -> bool:
        value, present = adaptor(self.fieldpath)
        if self.operator is Operator.PRESENT:
            return present
        if self.operator is Operator.EQUAL:
            return present and value == self.value
        if self.operator is Operator.NOT_EQUAL:
            return value != self.value
        # MATCHES: like containerd, tested against the value even when absent ("").
        assert self.pattern is not None
        return self.pattern.search(value) is not None


@dataclass(frozen=True)
class AllOf(Filter):
    """Conjunction: the selectors of one filter string."""

    filters: tuple[Filter, ...]

    def match(self, adaptor: Adaptor) -> bool:
        return all(f.match(adaptor) for f in self.filters)


@dataclass(frozen=True)
class AnyOf(Filter):
    """Disjunction: several filter strings (``ListSnapshotsRequest.filters``)."""

    filters: tuple[Filter, ...]

    def match(self, adaptor: Adaptor) -> bool:
        return any(f.match(adaptor) for f in self.filters)


def parse(filter_str: str) -> Filter:
    """Parse one filter string. ``""`` matches everything.

    Raises :class:`FilterSyntaxError` (an ``InvalidArgument``) for malformed input,
    including a ``~=`` pattern that Python's ``re`` cannot compile.
    """
    if filter_str == "":
        return ALWAYS
    for pos, ch in enumerate(filter_str):
        # Go's scanner rejects NUL and invalid UTF-8 anywhere, quoted or not; a lone
        # surrogate is how invalid UTF-8 shows up in a Python str.
        if ch == "\x00" or "\ud800" <= ch <= "\udfff":
            raise FilterSyntaxError(
                filter_str, pos, "expected text without NUL characters or lone surrogates"
            )
    return _Parser(filter_str).parse()


def parse_all(filter_strs: Iterable[str]) -> Filter:
    """Parse several filter strings and OR them; no strings at all matches everything.

    Raises :class:`FilterSyntaxError` for the first malformed string, and ``TypeError``
    when handed a single ``str`` (which would otherwise be iterated per character).
    """
    if isinstance(filter_strs, str):
        raise TypeError("parse_all takes an iterable of filter strings, not a str")
    parsed = tuple(parse(s) for s in filter_strs)
    if not parsed:
        return ALWAYS
    if len(parsed) == 1:
        return parsed[0]
    return AnyOf(parsed)


def snapshot_adaptor(name: str, parent: str, kind: str, labels: Mapping[str, str]) -> Adaptor:
    """The fields of a snapshot, as containerd's ``adaptSnapshot`` exposes them.

    ``kind`` is ``active``, ``view`` or ``committed`` (always present); ``name`` is always
    present; ``parent`` is always present, empty for a base snapshot (containerd looks up
    the remote snapshot of a first layer with ``parent==""``); ``labels.<k>`` looks up the
    key made by joining the rest of the path with ``.`` (so ``labels.a.b`` and
    ``labels."a.b"`` name the same label). Any other path is absent.

    Raises ``ValueError`` for an unknown ``kind`` (a programming error, not user input).
    """
    if kind not in SNAPSHOT_KINDS:
        raise ValueError(f"unknown snapshot kind {kind!r}; expected one of {SNAPSHOT_KINDS}")

    def adapt(fieldpath: Sequence[str]) -> tuple[str, bool]:
        if not fieldpath:
            return "", False
        head = fieldpath[0]
        if head == "kind":
            return kind, True
        if head == "name":
            return name, True
        if head == "parent":
            return parent, True
        if head == "labels":
            if not labels:
                return "", False
            key = ".".join(fieldpath[1:])
            if key in labels:
                return labels[key], True
            return "", False
        return "", False

    return adapt


# --- the parser -----------------------------------------------------------------------------

_FIELD_RE = re.compile(r"[-_A-Za-z0-9]+")
_OPERATOR_CHARS = "=!~"
_SIMPLE_ESCAPES = {
    "a": "\a",
    "b": "\b",
    "f": "\f",
    "n": "\n",
    "r": "\r",
    "t": "\t",
    "v": "\v",
    "\\": "\\",
}
_OPERATORS = {op.value: op for op in Operator if op is not Operator.PRESENT}


def _is_value_char(ch: str) -> bool:
    return ch != "," and not ch.isspace() and ch.isprintable()


class _Parser:
    """Recursive descent over one filter string; ``pos`` is the cursor."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.pos = 0

    def error(self, reason: str, pos: int | None = None) -> FilterSyntaxError:
        return FilterSyntaxError(self.text, self.pos if pos is None else pos, reason)

    def peek(self) -> str:
        """The next character after whitespace ("" at end of input); moves past the
        whitespace only."""
        while self.pos < len(self.text) and self.text[self.pos].isspace():
            self.pos += 1
        return self.text[self.pos] if self.pos < len(self.text) else ""

    def parse(self) -> Filter:
        selectors = [self.selector()]
        while True:
            ch = self.peek()
            if ch == "":
                return AllOf(tuple(selectors))
            if ch != ",":
                raise self.error('expected "," or end of input')
            self.pos += 1
            selectors.append(self.selector())

    def selector(self) -> Selector:
        fieldpath = self.fieldpath()
        if self.peek() in ("", ","):
            return Selector(fieldpath, Operator.PRESENT)
        op = self.operator()
        self.peek()
        value_pos = self.pos
        value = self.value(op)
        if op is not Operator.MATCHES:
            return Selector(fieldpath, op, value)
        try:
            # Patterns re accepts with a FutureWarning ("possible nested set") are valid
            # today; the warning must not turn into an error under -W error.
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                pattern = re.compile(value)
        except re.error as exc:
            raise self.error(f"expected a valid regular expression ({exc})", value_pos) from None
        return Selector(fieldpath, op, value, pattern)

    def fieldpath(self) -> tuple[str, ...]:
        fields = [self.field()]
        while self.peek() == ".":
            self.pos += 1
            fields.append(self.field())
        return tuple(fields)

    def field(self) -> str:
        ch = self.peek()
        if ch == '"':
            return self.quoted('"')
        match = _FIELD_RE.match(self.text, self.pos)
        if match is None:
            if ch in ("/", "|"):
                raise self.error(
                    'expected a field name or a "quoted" field; "/" and "|" '
                    "quote only regular expressions"
                )
            raise self.error('expected a field name ([-_A-Za-z0-9]+) or a "quoted" field')
        self.pos = match.end()
        return match.group()

    def operator(self) -> Operator:
        start = self.pos
        end = start
        while end < len(self.text) and self.text[end] in _OPERATOR_CHARS:
            end += 1
        if end == start:
            raise self.error('expected an operator ("==", "!=" or "~="), "," or end of input')
        op = _OPERATORS.get(self.text[start:end])
        if op is None:
            raise self.error(
                f'expected "==", "!=" or "~=" (unsupported operator {self.text[start:end]!r})'
            )
        self.pos = end
        return op

    def value(self, op: Operator) -> str:
        ch = self.text[self.pos] if self.pos < len(self.text) else ""
        if ch == '"':
            return self.quoted('"')
        if ch in ("/", "|"):
            if op is not Operator.MATCHES:
                raise self.error(
                    f'expected a value or a "quoted" value; {ch!r} quotes only '
                    'regular expressions (after "~=")'
                )
            return self.quoted(ch)
        start = self.pos
        if ch == "" or ch == "." or not _is_value_char(ch):
            raise self.error("expected a value or a quoted value")
        end = start
        while end < len(self.text) and _is_value_char(self.text[end]):
            end += 1
        self.pos = end
        return self.text[start:end]

    def quoted(self, quote: str) -> str:
        """Decode a quoted string starting at ``pos`` (on the opening quote)."""
        start = self.pos
        out = bytearray()
        i = start + 1
        text = self.text
        while True:
            if i >= len(text) or text[i] == "\n":
                raise self.error(
                    f"expected a closing {quote} (quoted string not terminated)", start
                )
            ch = text[i]
            if ch == quote:
                self.pos = i + 1
                return out.decode("utf-8", errors="surrogateescape")
            if ch != "\\":
                out += ch.encode()
                i += 1
                continue
            i = self.escape(i, quote, out)

    def escape(self, i: int, quote: str, out: bytearray) -> int:
        """Decode the escape sequence at ``text[i] == "\\"`` into ``out``; return the index
        after it."""
        text = self.text
        code = text[i + 1] if i + 1 < len(text) else ""
        if code in _SIMPLE_ESCAPES:
            out += _SIMPLE_ESCAPES[code].encode()
            return i + 2
        if code == quote:
            out += quote.encode()
            return i + 2
        if code in ("x", "u", "U"):
            width = {"x": 2, "u": 4, "U": 8}[code]
            digits = text[i + 2 : i + 2 + width]
            if len(digits) != width or any(d not in "0123456789abcdefABCDEF" for d in digits):
                raise self.error(f"expected {width} hex digits after \\{code}", i)
            number = int(digits, 16)
            if code == "x":
                out.append(number)
            elif number > 0x10FFFF or 0xD800 <= number <= 0xDFFF:
                raise self.error(f"expected a valid Unicode code point, not \\{code}{digits}", i)
            else:
                out += chr(number).encode()
            return i + 2 + width
        if code and code in "01234567":
            digits = text[i + 1 : i + 4]
            if len(digits) != 3 or any(d not in "01234567" for d in digits):
                raise self.error("expected 3 octal digits in an octal escape", i)
            number = int(digits, 8)
            if number > 0xFF:
                raise self.error(f"expected an octal escape of at most \\377, not \\{digits}", i)
            out.append(number)
            return i + 4
        raise self.error(
            "expected a valid escape sequence "
            f"(\\a \\b \\f \\n \\r \\t \\v \\\\ \\{quote} \\x \\u \\U or octal)",
            i,
        )

"""Unit tests for snapshotter.snapshot.filters: containerd's filter grammar and adaptSnapshot."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import pytest
from hypothesis import given
from hypothesis import strategies as st

from snapshotter.errdefs import InvalidArgument
from snapshotter.snapshot import filters
from snapshotter.snapshot.filters import (
    ALWAYS,
    AllOf,
    AnyOf,
    FilterSyntaxError,
    Operator,
    Selector,
    parse,
    parse_all,
    snapshot_adaptor,
)

# --- a corpus in the style of containerd's filter tests -------------------------------------


def _adaptor(
    name: str, other: str = "", labels: Mapping[str, str] | None = None
) -> filters.Adaptor:
    labels = labels or {}

    def adapt(fieldpath: Sequence[str]) -> tuple[str, bool]:
        if fieldpath[0] == "name":
            return name, name != ""
        if fieldpath[0] == "other":
            return other, other != ""
        if fieldpath[0] == "labels":
            key = ".".join(fieldpath[1:])
            return labels.get(key, ""), key in labels
        return "", False

    return adapt


CORPUS: list[tuple[str, filters.Adaptor]] = [
    ("foo-true", _adaptor("foo", labels={"foo": "true"})),
    ("bar-plain", _adaptor("bar")),
    ("foo-complex", _adaptor("foo", labels={"foo": "present", "more complex label": "present"})),
    ("bar-true", _adaptor("bar", labels={"bar": "true"})),
    ("fooer-quote", _adaptor("fooer", labels={'more complex label with \\ and "': "present"})),
    ("fooer-post", _adaptor("fooer", labels={'more complex label with \\ and ".post': "present"})),
    ("baz", _adaptor("baz", other="too complex, yo")),
    ("bazo", _adaptor("bazo", other="abc")),
    ("compound", _adaptor("compound", labels={"foo": "omg_asdf.asdf-qwer"})),
]
ALL_IDS = [ident for ident, _ in CORPUS]


def _matching(filter_str: str) -> list[str]:
    parsed = parse(filter_str)
    return [ident for ident, adapt in CORPUS if parsed.match(adapt)]


@pytest.mark.parametrize(
    ("filter_str", "expected"),
    [
        ("", ALL_IDS),
        ("name", ALL_IDS),
        ("labels.foo", ["foo-true", "foo-complex", "compound"]),
        ("labels.foo,name", ["foo-true", "foo-complex", "compound"]),
        ("labels.foo==true", ["foo-true"]),
        ("labels.foo==omg_asdf.asdf-qwer", ["compound"]),
        ("name==bar", ["bar-plain", "bar-true"]),
        ("name!=bar", [i for i in ALL_IDS if not i.startswith("bar")]),
        ("name==bar,labels.bar", ["bar-true"]),
        ('other=="too complex, yo"', ["baz"]),
        ("other~=[abc]+,name!=foo", ["baz", "bazo"]),
        ("other~=/[abc]+/,name!=foo", ["baz", "bazo"]),
        ("other~=/[abc]{1,2}/,name!=foo", ["baz", "bazo"]),
        ("other~=|[abc]{1,2}|,name!=foo", ["baz", "bazo"]),
        ('other~=/[abc]{0,1}"\\//,name!=foo', []),
        ("name==bar,labels.bar==true", ["bar-true"]),
        ("name==bar,labels.bar==wrong", []),
        ('name==foo,labels."more complex label"', ["foo-complex"]),
        ('labels."more complex label with \\\\ and \\""==present', ["fooer-quote"]),
        ('labels."more complex label with \\\\ and \\"".post==present', ["fooer-post"]),
        # whitespace between tokens is allowed
        ('  name == "bar" ,  labels . bar  ', ["bar-true"]),
        # regular expressions search anywhere, anchors work
        ("name~=oo", ["foo-true", "foo-complex", "fooer-quote", "fooer-post"]),
        ("name~=^ba", ["bar-plain", "bar-true", "baz", "bazo"]),
        ('name~="^foo$"', ["foo-true", "foo-complex"]),
    ],
)
def test_corpus(filter_str: str, expected: list[str]) -> None:
    assert _matching(filter_str) == expected


# --- the filter containerd sends in the remote-snapshot flow ------------------------------

REMOTE_FILTER = 'labels."containerd.io/snapshot.ref"==sha256:abc,parent=="default/3/sha256:def"'


def test_remote_snapshot_filter_structure() -> None:
    assert parse(REMOTE_FILTER) == AllOf(
        (
            Selector(("labels", "containerd.io/snapshot.ref"), Operator.EQUAL, "sha256:abc"),
            Selector(("parent",), Operator.EQUAL, "default/3/sha256:def"),
        )
    )


@pytest.mark.parametrize(
    ("parent", "labels", "expected"),
    [
        ("default/3/sha256:def", {"containerd.io/snapshot.ref": "sha256:abc"}, True),
        ("default/4/sha256:def", {"containerd.io/snapshot.ref": "sha256:abc"}, False),
        ("", {"containerd.io/snapshot.ref": "sha256:abc"}, False),
        ("default/3/sha256:def", {"containerd.io/snapshot.ref": "sha256:abcd"}, False),
        ("default/3/sha256:def", {}, False),
        ("default/3/sha256:def", {"containerd.io/snapshot/remote": "remote snapshot"}, False),
    ],
)
def test_remote_snapshot_filter_matches(
    parent: str, labels: dict[str, str], expected: bool
) -> None:
    adapt = snapshot_adaptor("sha256:abc", parent, "committed", labels)
    assert parse(REMOTE_FILTER).match(adapt) is expected


def test_unquoted_parent_with_slashes_and_colons() -> None:
    parsed = parse("parent==default/3/sha256:def,name==default/12/extract-1-AbCd")
    adapt = snapshot_adaptor("default/12/extract-1-AbCd", "default/3/sha256:def", "active", {})
    assert parsed.match(adapt)


# --- values -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("filter_str", "value"),
    [
        ('name=="a b"', "a b"),
        ('name=="extract-123-AbCd sha256:abc"', "extract-123-AbCd sha256:abc"),
        ('name=="a,b"', "a,b"),
        ('name==""', ""),
        ('name=="tab\\there"', "tab\there"),
        ('name=="\\a\\b\\f\\n\\r\\t\\v\\\\\\""', '\a\b\f\n\r\t\v\\"'),
        ('name=="\\x41\\101\\u00e9\\U0001F600"', "AAé\U0001f600"),
        ('name=="é"', "é"),
        ("name==a|b", "a|b"),
        ("name==a/b", "a/b"),
        ("name==a.b", "a.b"),
        ("name==a=b", "a=b"),
        ('name==a"b', 'a"b'),
        ("name==ünï", "ünï"),
        ("name~=/a\\/b/", "a/b"),
        ("name~=|a\\|b|", "a|b"),
    ],
)
def test_value_decoding(filter_str: str, value: str) -> None:
    parsed = parse(filter_str)
    assert isinstance(parsed, AllOf)
    (selector,) = parsed.filters
    assert isinstance(selector, Selector)
    assert selector.value == value


def test_hex_escape_makes_raw_byte_that_never_matches_text() -> None:
    parsed = parse('name=="\\xff"')
    assert not parsed.match(snapshot_adaptor("\xff", "", "active", {}))
    assert not parsed.match(snapshot_adaptor("ÿ", "", "active", {}))


def test_quoted_field_with_spaces_and_dots() -> None:
    parsed = parse('labels."a b.c"==x')
    assert parsed == AllOf((Selector(("labels", "a b.c"), Operator.EQUAL, "x"),))


# --- operators ------------------------------------------------------------------------------


def test_not_equal_matches_absent_field() -> None:
    adapt = snapshot_adaptor("n", "", "active", {})
    assert parse("parent!=p").match(adapt)
    assert not parse('parent!=""').match(adapt)
    assert parse('parent!=""').match(snapshot_adaptor("n", "p", "active", {}))


def test_equal_requires_presence() -> None:
    adapt = snapshot_adaptor("n", "", "active", {})
    assert not parse('labels.x==""').match(adapt)
    assert parse('labels.x==""').match(snapshot_adaptor("n", "", "active", {"x": ""}))


def test_remote_lookup_of_a_first_layer_matches_empty_parent() -> None:
    # containerd 1.6 metadata.createSnapshot looks a first-layer remote snapshot up so.
    labels = {"containerd.io/snapshot.ref": "sha256:abc"}
    flt = parse('labels."containerd.io/snapshot.ref"==sha256:abc,parent==""')
    assert flt.match(snapshot_adaptor("sha256:abc", "", "committed", labels))
    assert not flt.match(snapshot_adaptor("sha256:abc", "p", "committed", labels))


def test_regex_is_tested_against_absent_value() -> None:
    adapt = snapshot_adaptor("n", "", "active", {"other": "1"})
    assert parse('labels.missing~="^$"').match(adapt)
    assert not parse('labels.missing~="."').match(adapt)


def test_presence() -> None:
    adapt = snapshot_adaptor("n", "", "view", {"a.b": "", "c": "1"})
    assert parse("labels.a.b").match(adapt)
    assert parse('labels."a.b"').match(adapt)
    assert parse("labels.c,name,kind").match(adapt)
    assert not parse("labels.d").match(adapt)
    assert parse("parent").match(adapt)  # containerd: parent is always present
    assert not parse("bogus").match(adapt)


# --- OR -----------------------------------------------------------------------------------


def test_parse_all_ors_filters() -> None:
    parsed = parse_all(["name==p", "name==a-np-wl", "kind==view,labels.l==3"])
    assert isinstance(parsed, AnyOf)
    names = {
        "p": ("committed", {}),
        "a-np-wl": ("active", {"l": "2"}),
        "v-wl": ("view", {"l": "3"}),
        "v": ("view", {}),
        "a": ("active", {"l": "3"}),
    }
    matched = {
        name
        for name, (kind, labels) in names.items()
        if parsed.match(snapshot_adaptor(name, "", kind, labels))
    }
    assert matched == {"p", "a-np-wl", "v-wl"}


def test_parse_all_empty_matches_everything() -> None:
    assert parse_all([]) is ALWAYS
    assert parse_all(iter(())) is ALWAYS
    assert parse_all(["", "name==x"]).match(snapshot_adaptor("y", "", "active", {}))


def test_parse_all_single_filter_is_not_wrapped() -> None:
    assert parse_all(["name==x"]) == parse("name==x")


def test_parse_all_rejects_a_bare_string() -> None:
    with pytest.raises(TypeError):
        parse_all("name==x")


def test_parse_all_reports_the_bad_filter() -> None:
    with pytest.raises(FilterSyntaxError) as info:
        parse_all(["name==x", "name=="])
    assert info.value.filter == "name=="
    assert isinstance(info.value, InvalidArgument)


def test_pipe_is_not_or() -> None:
    parsed = parse("name==a|name==b")
    assert not parsed.match(snapshot_adaptor("a", "", "active", {}))
    assert parsed.match(snapshot_adaptor("a|name==b", "", "active", {}))


# --- errors -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("filter_str", "position", "expected_words"),
    [
        ("name==", 6, "expected a value"),
        ("name==foo,", 10, "expected a field"),
        ("labels.", 7, "expected a field"),
        (" ", 1, "expected a field"),
        (",", 0, "expected a field"),
        ("name=foo", 4, "unsupported operator '='"),
        ("name===foo", 4, "unsupported operator '==='"),
        ("name<foo", 4, "expected an operator"),
        ("name foo", 5, "expected an operator"),
        ("image~=,id?=?fbaq", 7, "expected a value"),
        ("labels.ns/key==value", 9, "expected an operator"),
        ("labels.key==/value", 12, "quotes only regular expressions"),
        ("labels.|foo|==x", 7, "quote only regular expressions"),
        ('labels.?"x".post==present', 7, "expected a field"),
        ("labels..foo", 7, "expected a field"),
        ("name==.foo", 6, "expected a value"),
        ('name=="abc', 6, 'expected a closing "'),
        ('name=="ab\nc"', 6, 'expected a closing "'),
        ("name~=/abc", 6, "expected a closing /"),
        ('name=="\\q"', 7, "expected a valid escape sequence"),
        ('name=="\\/"', 7, "expected a valid escape sequence"),
        ('name~=/\\"/', 7, "expected a valid escape sequence"),
        ('name=="\\x4"', 7, "expected 2 hex digits"),
        ('name=="\\u12"', 7, "expected 4 hex digits"),
        ('name=="\\uD800"', 7, "expected a valid Unicode code point"),
        ('name=="\\U00110000"', 7, "expected a valid Unicode code point"),
        ('name=="\\400"', 7, "at most \\377"),
        ('name=="\\19"', 7, "expected 3 octal digits"),
        ('name=="\\', 7, "expected a valid escape sequence"),
        ("name~=(", 6, "expected a valid regular expression"),
        ("name~=/[/", 6, "expected a valid regular expression"),
        # a bare value ends at ",": containerd reads "2}" as the next selector
        ("other~=[abc]{1,2}", 16, "expected an operator"),
        ("name~=.*", 6, "expected a value"),
        ("name==a b", 8, 'expected "," or end of input'),
        ('name=="a"b', 9, 'expected "," or end of input'),
        ("name==\x01", 6, "expected a value"),
        ("name==a\x00", 7, "without NUL"),
        ("name==\ud800", 6, "lone surrogates"),
    ],
)
def test_malformed(filter_str: str, position: int, expected_words: str) -> None:
    with pytest.raises(FilterSyntaxError) as info:
        parse(filter_str)
    err = info.value
    assert isinstance(err, InvalidArgument)
    assert err.position == position, str(err)
    assert expected_words in str(err)
    assert f"at position {position}" in str(err)
    assert repr(filter_str) in str(err)


def test_error_message_points_at_the_character() -> None:
    with pytest.raises(FilterSyntaxError) as info:
        parse("name=foo")
    assert "[name >|=|< foo]" in str(info.value)
    with pytest.raises(FilterSyntaxError) as info:
        parse("name==")
    assert "found end of input" in str(info.value)


def test_regex_with_future_warning_still_parses() -> None:
    # "[[" makes re emit a FutureWarning (possible nested set); pytest turns warnings
    # into errors, so this also checks the parser silences it.
    parsed = parse("name~=[[a]")
    assert parsed.match(snapshot_adaptor("[", "", "active", {}))


# --- snapshot_adaptor ---------------------------------------------------------------------


def test_snapshot_adaptor_fields() -> None:
    adapt = snapshot_adaptor("n", "p", "view", {"a.b": "1", "c": "2"})
    assert adapt(["kind"]) == ("view", True)
    assert adapt(["kind", "extra"]) == ("view", True)
    assert adapt(["name"]) == ("n", True)
    assert adapt(["parent"]) == ("p", True)
    assert adapt(["labels", "a", "b"]) == ("1", True)
    assert adapt(["labels", "a.b"]) == ("1", True)
    assert adapt(["labels", "c"]) == ("2", True)
    assert adapt(["labels", "d"]) == ("", False)
    assert adapt(["labels"]) == ("", False)
    assert adapt(["created"]) == ("", False)
    assert adapt([]) == ("", False)


def test_snapshot_adaptor_empty_parent_and_empty_name() -> None:
    adapt = snapshot_adaptor("", "", "committed", {})
    assert adapt(["parent"]) == ("", True)
    assert adapt(["name"]) == ("", True)
    assert adapt(["labels", ""]) == ("", False)


@pytest.mark.parametrize("kind", ["active", "view", "committed"])
def test_kind_filters(kind: str) -> None:
    adapt = snapshot_adaptor("n", "", kind, {})
    for other in ("active", "view", "committed"):
        assert parse(f"kind=={other}").match(adapt) is (other == kind)


@pytest.mark.parametrize("kind", ["", "ACTIVE", "unknown", "Committed"])
def test_snapshot_adaptor_rejects_unknown_kind(kind: str) -> None:
    with pytest.raises(ValueError, match="unknown snapshot kind"):
        snapshot_adaptor("n", "", kind, {})


# --- properties ---------------------------------------------------------------------------


@given(st.text())
def test_any_text_parses_or_raises_invalid_argument(text: str) -> None:
    try:
        parsed = parse(text)
    except InvalidArgument as exc:
        assert isinstance(exc, FilterSyntaxError)
        assert 0 <= exc.position <= len(text)
        return
    parsed.match(snapshot_adaptor("n", "p", "active", {"k": "v"}))


_GRAMMAR_ALPHABET = st.sampled_from(list('ab.,=!~"/|\\ \tlabels-_0x\n'))


@given(st.text(_GRAMMAR_ALPHABET, max_size=40))
def test_grammar_heavy_text_parses_or_raises_invalid_argument(text: str) -> None:
    try:
        parsed = parse(text)
    except FilterSyntaxError as exc:
        assert 0 <= exc.position <= len(text)
        return
    parsed.match(snapshot_adaptor("n", "", "view", {}))


def _go_quote(text: str) -> str:
    """Quote like Go's strconv.Quote for the characters our strategies produce."""
    out = ['"']
    for ch in text:
        if ch in ('"', "\\"):
            out.append("\\" + ch)
        elif ch.isprintable():
            out.append(ch)
        elif ord(ch) <= 0xFFFF:
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(f"\\U{ord(ch):08x}")
    out.append('"')
    return "".join(out)


_label_text = st.text(st.characters(exclude_categories=["Cs"], exclude_characters="\x00"))


@given(_label_text, _label_text, st.dictionaries(_label_text, _label_text, max_size=4))
def test_quoted_label_equality_matches_exactly(
    key: str, value: str, labels: dict[str, str]
) -> None:
    parsed = parse(f"labels.{_go_quote(key)}=={_go_quote(value)}")
    adapt = snapshot_adaptor("n", "", "committed", labels)
    assert parsed.match(adapt) is (labels.get(key) == value)
    labels = {**labels, key: value}
    assert parsed.match(snapshot_adaptor("n", "", "committed", labels))


@given(st.lists(st.tuples(_label_text, _label_text), min_size=1, max_size=5))
def test_parse_all_is_or_of_parse(pairs: list[tuple[str, str]]) -> None:
    strs = [f"labels.{_go_quote(k)}=={_go_quote(v)}" for k, v in pairs]
    combined = parse_all(strs)
    for k, v in pairs:
        adapt = snapshot_adaptor("n", "", "view", {k: v})
        assert combined.match(adapt) is any(parse(s).match(adapt) for s in strs)
        assert combined.match(adapt)

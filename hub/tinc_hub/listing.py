"""The CLI's listings (``tinc-hub nodes``, ``token list``, ``hubs``, ``expose list``): JSON with
one row per line, or a table of aligned columns; and the rows of ``tinc-hub nodes``.

Built for fleet size: ``nodes --json`` with 50,000 nodes has to stay well under a second
including Python's start. So the rows come from the registry as plain tuples of the shown
columns (RegistryView.listed_nodes), the derived fields skip the work a never-seen node does not
need, timestamps are formatted once per distinct second, and the JSON is encoded by one call of
the C encoder. ``nodes --json`` skips the rows altogether: node_json_listing writes each row's
line straight from the registry's tuple (its strings through the C encoder's own string
function). The output is byte for byte what encoding each row alone writes
(tests/test_listing.py keeps the straightforward version to compare with).
"""

import json
from json.encoder import encode_basestring_ascii
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

from .liveness import Seen, seen_status, up_since
from .registry_contract import iso_utc

ROW_BOUNDARY = "}, {"  # between two rows of json.dumps(rows), never inside a flat row's encoding


def json_listing(rows: List[Dict[str, Any]]) -> str:
    """``rows`` (flat dicts) as a JSON list with one row per line ("[]" when empty)."""
    if not rows:
        return "[]\n"
    text = json.dumps(rows)
    # "}, {" never overlaps itself, so count() is exact: n-1 occurrences means every one is a
    # boundary between rows, none inside a string value (or a nested value)
    if text.count(ROW_BOUNDARY) == len(rows) - 1:
        return "[\n" + text[1:-1].replace(ROW_BOUNDARY, "},\n{") + "\n]\n"
    encode = json.JSONEncoder().encode  # a value holds "}, {": row by row (the C encoder too)
    return "[\n" + ",\n".join(encode(row) for row in rows) + "\n]\n"


def table_listing(header: Sequence[str], cells: Iterable[Sequence[str]]) -> str:
    """A header line and a line per row, columns aligned (two spaces apart, no trailing blanks)."""
    table = [tuple(header)]
    table.extend(tuple(row) for row in cells)
    widths = [max(map(len, column)) for column in zip(*table)]
    line = "  ".join(f"{{:<{width}}}" for width in widths)
    return "\n".join([line.format(*row).rstrip() for row in table]) + "\n"


def _iso_once_per_second(quote: Callable[[str], str] = str) -> Callable[[int], str]:
    """``quote(iso_utc())`` remembering its answers (a registry's rows share few distinct
    seconds); ``quote``: none, or the JSON encoder's string function."""
    known: Dict[int, str] = {}

    def iso(timestamp: int) -> str:
        text = known.get(timestamp)
        if text is None:
            text = known[timestamp] = quote(iso_utc(timestamp))  # type: ignore[arg-type]
        return text
    return iso


def expiry_of(duration: Optional[int], last_seen_at: Optional[int], online: bool,
              started: Optional[float], now: int) -> Optional[str]:
    """The EPHEMERAL column of a node with ``ephemeral_seconds`` = ``duration``: None (not
    ephemeral), "online", "paused" (this hub's tincd is down: it removes nothing), or the ISO
    time of the removal (ephemeral.expiry of a NodeRow)."""
    if duration is None:
        return None
    if online:
        return "online"
    if started is None:
        return "paused"
    last = last_seen_at if last_seen_at is not None else now
    return iso_utc(int(max(last, started, 0)) + duration)


def _with_liveness(listed: Iterable[tuple], seen: Dict[str, Seen], hub_running: bool,
                   started: Optional[float], now: int) -> Iterator[Tuple[tuple, bool, Optional[int], bool]]:
    """Each row of RegistryView.listed_nodes() with its node's liveness: online, the second it
    was last seen (None: never), and whether it is up since this hub's tincd started (asked for
    ephemeral nodes only: expiry_of's ``online``)."""
    since = None if started is None else int(started)
    get = seen.get
    for row in listed:
        record = get(row[0])
        if record is None:
            yield row, False, None, False
            continue
        online, seen_at = seen_status(record, hub_running and row[3] is None, now)
        yield row, online, seen_at, row[4] is not None and since is not None and up_since(record, since)


def node_rows(listed: Iterable[tuple], seen: Dict[str, Seen], hub_running: bool,
              started: Optional[float], now: int) -> List[Dict[str, Any]]:
    """The rows of ``tinc-hub nodes`` from RegistryView.listed_nodes(), the liveness records
    (liveness.read_liveness), whether the hub's tincd runs and since when
    (liveness.tincd_started). Online and last seen: liveness.seen_status (node_status without
    its dict per row); expires: :func:`expiry_of` with liveness.up_since (online_names without
    its set of every record); tests/test_listing.py compares with the per-row code."""
    iso = _iso_once_per_second()
    rows = []
    append = rows.append
    for (name, address, enrolled_at, revoked_at, duration, last_seen_at), online, seen_at, up in \
            _with_liveness(listed, seen, hub_running, started, now):
        append({"name": name, "address": address, "enrolled_at": iso(enrolled_at),
                "revoked": revoked_at is not None,
                "revoked_at": None if revoked_at is None else iso(revoked_at),
                "online": online, "last_seen": None if seen_at is None else iso(seen_at),
                "ephemeral": duration,
                "expires": None if duration is None else expiry_of(duration, last_seen_at, up, started, now)})
    return rows


class _NotPlain(Exception):
    """A registry value of a type node_json_listing does not write itself."""


def node_json_listing(listed: Iterable[tuple], seen: Dict[str, Seen], hub_running: bool,
                      started: Optional[float], now: int) -> str:
    """``json_listing(node_rows(listed, seen, hub_running, started, now))`` without the rows: one
    formatted line per node, strings quoted by the encoder's own function (json.dumps's default
    ensure_ascii), the ISO times quoted once per distinct second. A value of any other type than
    the registry's (a string that is no str, a duration that is no int: only a hand-edited
    SQLite file has one) goes through the rows and the encoder instead."""
    listed = listed if isinstance(listed, list) else list(listed)
    try:
        return _node_json_lines(listed, seen, hub_running, started, now)
    except (_NotPlain, TypeError):  # the rows path raises a TypeError of its own again
        return json_listing(node_rows(listed, seen, hub_running, started, now))


def _node_json_lines(listed: List[tuple], seen: Dict[str, Seen], hub_running: bool,
                     started: Optional[float], now: int) -> str:
    if not listed:
        return "[]\n"
    quote = encode_basestring_ascii  # raises TypeError for anything but a str
    iso = _iso_once_per_second(quote)  # the quoted ISO time
    lines = []
    append = lines.append
    for (name, address, enrolled_at, revoked_at, duration, last_seen_at), online, seen_at, up in \
            _with_liveness(listed, seen, hub_running, started, now):
        if duration is None:
            ephemeral = expires = "null"
        elif type(duration) is int:
            ephemeral = repr(duration)
            expires = quote(expiry_of(duration, last_seen_at, up, started, now))
        else:
            raise _NotPlain(duration)
        append(f'{{"name": {quote(name)}, "address": {quote(address)}, "enrolled_at": {iso(enrolled_at)},'
               f' "revoked": {"false" if revoked_at is None else "true"},'
               f' "revoked_at": {"null" if revoked_at is None else iso(revoked_at)},'
               f' "online": {"true" if online is True else "false" if online is False else _not_plain(online)},'
               f' "last_seen": {"null" if seen_at is None else iso(seen_at)}, "ephemeral": {ephemeral},'
               f' "expires": {expires}}}')
    return "[\n" + ",\n".join(lines) + "\n]\n"


def _not_plain(value: Any) -> str:
    raise _NotPlain(value)

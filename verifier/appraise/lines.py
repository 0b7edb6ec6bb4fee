"""Where each key of a TOML file is, so a policy error can say file:line.

`tomllib` (the parser we trust for values and syntax) keeps no positions, so
this module scans the same source text once more and records the line of
every `[table]`, `[[array.of.tables]]` and `key = value` it sees, under the
path tomllib's result will have (`("firmware", "allowed", 0, "sha384")`).
It never decides what a value is; it only answers "which line holds this
path?", falling back to the closest enclosing path it knows (a value inside
an inline table or a multi-line array reports its key's line).

The scanner follows the TOML 1.0 lexical rules it needs: basic/literal
strings with escapes, multi-line strings, comments, bracket nesting. A file
tomllib rejects never reaches the index (its own error has a line number).
"""
from __future__ import annotations

import re
from collections.abc import Iterator

Path = tuple[str | int, ...]

_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")


def _split_key(text: str) -> tuple[list[str], int] | None:
    """Parse a (dotted, possibly quoted) key at the start of `text`; (parts, end offset)."""
    parts: list[str] = []
    i, n = 0, len(text)
    while True:
        while i < n and text[i] in " \t":
            i += 1
        if i >= n:
            return None
        if text[i] in "\"'":
            quote = text[i]
            j = i + 1
            buf: list[str] = []
            while j < n and text[j] != quote:
                if quote == '"' and text[j] == "\\" and j + 1 < n:
                    buf.append(text[j:j + 2])
                    j += 2
                    continue
                buf.append(text[j])
                j += 1
            if j >= n:
                return None
            raw = "".join(buf)
            if quote == '"':
                try:
                    raw = raw.encode("latin-1", "backslashreplace").decode("unicode_escape")
                except UnicodeDecodeError:
                    pass
            parts.append(raw)
            i = j + 1
        else:
            m = _BARE_KEY.match(text, i)
            if not m:
                return None
            parts.append(m.group(0))
            i = m.end()
        while i < n and text[i] in " \t":
            i += 1
        if i < n and text[i] == ".":
            i += 1
            continue
        return parts, i


class _Scanner:
    """Tracks strings, comments and bracket depth across lines."""

    def __init__(self) -> None:
        self.in_ml: str | None = None   # '"""' or "'''" while inside a multi-line string
        self.depth = 0                  # [ ] and { } nesting of the current value

    def feed(self, text: str) -> None:
        i, n = 0, len(text)
        while i < n:
            if self.in_ml:
                end = text.find(self.in_ml, i)
                if self.in_ml == '"""':
                    # skip escaped quotes inside basic multi-line strings
                    while end > 0 and text[end - 1] == "\\" and not _even_backslashes(text, end - 1):
                        end = text.find(self.in_ml, end + 1)
                if end < 0:
                    return
                i = end + 3
                self.in_ml = None
                continue
            c = text[i]
            if c == "#":
                return
            if text.startswith('"""', i) or text.startswith("'''", i):
                self.in_ml = text[i:i + 3]
                i += 3
                continue
            if c in "\"'":
                j = i + 1
                while j < n and text[j] != c:
                    j += 2 if (c == '"' and text[j] == "\\") else 1
                i = j + 1
                continue
            if c in "[{":
                self.depth += 1
            elif c in "]}":
                self.depth = max(0, self.depth - 1)
            i += 1

    @property
    def idle(self) -> bool:
        return self.in_ml is None and self.depth == 0


def _even_backslashes(text: str, last: int) -> bool:
    count = 0
    while last >= 0 and text[last] == "\\":
        count += 1
        last -= 1
    return count % 2 == 0


class LineIndex:
    """path -> 1-based line number, built from TOML source text."""

    def __init__(self, source: str) -> None:
        self._lines: dict[Path, int] = {}
        self._build(source)

    def _build(self, source: str) -> None:
        arrays: dict[Path, int] = {}      # array-of-tables path -> number of elements seen
        current: Path = ()
        scan = _Scanner()
        # TOML lines end at LF (or CRLF) only; str.splitlines would also split at U+2028 etc.,
        # which TOML allows inside strings, and shift every later line number.
        for lineno, line in enumerate(source.split("\n"), start=1):
            line = line.removesuffix("\r")
            if not scan.idle:
                scan.feed(line)
                continue
            stripped = line.strip()
            if not stripped or stripped.startswith("#"):
                continue
            if stripped.startswith("[["):
                parsed = _split_key(stripped[2:])
                if parsed:
                    path = self._resolve(parsed[0][:-1], arrays) + (parsed[0][-1],)
                    arrays[path] = arrays.get(path, 0) + 1
                    current = path + (arrays[path] - 1,)
                    self._lines.setdefault(path, lineno)
                    self._lines[current] = lineno
                continue
            if stripped.startswith("["):
                parsed = _split_key(stripped[1:])
                if parsed:
                    current = self._resolve(parsed[0], arrays)
                    self._lines.setdefault(current, lineno)
                continue
            parsed = _split_key(line)
            if parsed and parsed[1] < len(line) and line[parsed[1]] == "=":
                path = current + tuple(parsed[0])
                self._lines.setdefault(path, lineno)
                scan.feed(line[parsed[1] + 1:])
            else:
                scan.feed(line)

    @staticmethod
    def _resolve(parts: list[str], arrays: dict[Path, int]) -> Path:
        """A header's key parts -> tomllib path, stepping into the last element of arrays of tables."""
        path: Path = ()
        for part in parts:
            path = path + (part,)
            if path in arrays:
                path = path + (arrays[path] - 1,)
        return path

    def line(self, path: Path) -> int | None:
        """Line of `path`, or of its closest enclosing path that has one."""
        p = tuple(path)
        while p:
            if p in self._lines:
                return self._lines[p]
            p = p[:-1]
        return None

    def paths(self) -> Iterator[Path]:
        return iter(self._lines)

"""The policy engine: one set of rules that bake, boot check, realtime guard and rescans share.

A policy is data (TOML, never evaluated). Everything under the measured roots is *immutable*
unless a rule says otherwise; rules are tried in file order and the first whose pattern matches
a path decides it. ``docs/policy.md`` is the reference; the glob language is:

- patterns are absolute paths as seen inside the image (``/etc/passwd``);
- ``*`` matches any run of characters within one path segment (dot files included),
  ``?`` one character, ``[abc]`` / ``[!abc]`` one character of a class;
- ``**`` as a whole segment matches zero or more segments: ``/var/log/**`` matches everything
  below ``/var/log`` but not ``/var/log`` itself, ``/home/**/.ssh`` matches ``/home/.ssh`` and
  ``/home/a/b/.ssh``;
- a pattern without wildcards matches exactly that path.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Final

from agent.errors import PolicyError
from agent.wire import canonical, display_path, sha256_hex

KINDS: Final = ("immutable", "critical", "mutable", "first_boot", "growth_only")
ATTRIBUTES: Final = frozenset(
    {
        "type",
        "mode",
        "uid",
        "gid",
        "size",
        "content",
        "target",
        "xattrs",
        "hardlinks",
        "device",
        "mtime",
    }
)
DEFAULT_ATTRIBUTES: Final = ATTRIBUTES - {"mtime"}
DEFAULT_EXCLUDES: Final = ("/proc", "/sys", "/dev", "/run")
VIRTUAL_FSTYPES: Final = (
    "proc",
    "sysfs",
    "devtmpfs",
    "devpts",
    "tmpfs",
    "cgroup",
    "cgroup2",
    "securityfs",
    "debugfs",
    "tracefs",
    "pstore",
    "bpf",
    "mqueue",
    "hugetlbfs",
    "configfs",
    "fusectl",
    "binfmt_misc",
    "autofs",
    "efivarfs",
    "overlay-state",
)
SEVERITY_OF_KIND: Final = {
    "immutable": "warning",
    "critical": "critical",
    "mutable": "info",
    "first_boot": "warning",
    "growth_only": "warning",
}
SEVERITIES: Final = ("info", "warning", "critical")
SSH_LOGIN_MODES: Final = ("taint", "alert", "allow")
PACKAGE_MODES: Final = ("drift", "alert", "allow")
CHANGES: Final = ("added", "removed", "modified")
GLOB_CHARS: Final = frozenset("*?[")


@dataclass(frozen=True, slots=True)
class Rule:
    name: str
    kind: str
    patterns: tuple[str, ...]
    attributes: frozenset[str]
    severity: str
    reason: str


@dataclass(frozen=True, slots=True)
class Decision:
    """Which rule decides a path, and why."""

    path: str
    kind: str
    attributes: frozenset[str]
    severity: str
    rule: str  # the rule's name, "default" when none matched, "exclude" when excluded
    pattern: str | None
    reason: str
    excluded: bool = False


@dataclass(frozen=True, slots=True)
class Verdict:
    drift: bool
    severity: str
    reason: str


@dataclass(frozen=True, slots=True)
class Sample:
    path: str
    expect: str
    rule: str | None


def under(path: str, roots: Iterable[str]) -> bool:
    """True when ``path`` is one of ``roots`` or lies below one."""
    return any(root in ("/", path) or path.startswith(root + "/") for root in roots)


@dataclass(frozen=True)
class Policy:
    name: str
    source: str
    roots: tuple[str, ...]
    excludes: tuple[str, ...]
    exclude_fstypes: tuple[str, ...]
    one_filesystem: bool
    max_file_size_bytes: int
    ssh_login: str
    package_change: str
    rules: tuple[Rule, ...]
    samples: tuple[Sample, ...] = ()
    digest: str = ""
    _rule_re: re.Pattern[str] | None = field(default=None, repr=False, compare=False)
    _exclude_re: re.Pattern[str] | None = field(default=None, repr=False, compare=False)

    def covers(self, path: str) -> bool:
        """True when ``path`` lies under one of the policy's roots (excluded or not)."""
        return under(path, self.roots)

    def excluded(self, path: str) -> bool:
        """True when ``path`` (or a directory above it) is excluded from measurement."""
        return self._exclude_re is not None and self._exclude_re.match(path) is not None

    def decide(self, path: str) -> Decision:
        if self.excluded(path):
            pattern = next(p for p in self.excludes if _compile(p, subtree=True).match(path))
            return Decision(
                path,
                "excluded",
                frozenset(),
                "info",
                "exclude",
                pattern,
                f"excluded by {pattern!r}: not measured",
                excluded=True,
            )
        matched = self.match(path)
        if matched is None:
            return Decision(
                path,
                "immutable",
                DEFAULT_ATTRIBUTES,
                SEVERITY_OF_KIND["immutable"],
                "default",
                None,
                "no rule matches: immutable by default (default-deny)",
            )
        rule, pattern = matched
        why = f"rule {rule.name!r} ({rule.kind}) matches {pattern!r}"
        if rule.reason:
            why += f": {rule.reason}"
        return Decision(path, rule.kind, rule.attributes, rule.severity, rule.name, pattern, why)

    def match(self, path: str) -> tuple[Rule, str] | None:
        """The first rule matching ``path`` and the pattern that matched (exclusion aside)."""
        found = self._rule_re.fullmatch(path) if self._rule_re is not None else None
        if found is None or found.lastgroup is None:
            return None
        rule_index, pattern_index = (int(x) for x in found.lastgroup[1:].split("_"))
        rule = self.rules[rule_index]
        return rule, rule.patterns[pattern_index]

    def wants_content(self, path: str) -> bool:
        """Whether a file's content digest matters at ``path`` (the walk's hot path: no
        Decision is built)."""
        matched = self.match(path)
        if matched is None:
            return True
        rule = matched[0]
        return "content" in rule.attributes or rule.kind == "growth_only"

    def excluding(self, paths: Iterable[str]) -> Policy:
        """This policy with ``paths`` (literal absolute paths, and all below them) excluded
        too: the agent's own files inside the root. The digest stays the baked policy's."""
        added = tuple(p.rstrip("/") or "/" for p in paths if not self.excluded(p))
        for path in added:
            if not path.startswith("/") or GLOB_CHARS.intersection(path):
                raise PolicyError(f"cannot exclude {path!r}: not an absolute path free of *?[")
        if not added:
            return self
        excludes = (*self.excludes, *added)
        return replace(self, excludes=excludes, _exclude_re=_combine_excludes(excludes))

    def explain(self, path: str) -> str:
        """A human explanation: the deciding rule, plus later rules it shadows."""
        decision = self.decide(path)
        lines = [f"{display_path(path)}: {decision.kind} ({decision.severity})"]
        lines.append(f"  decided by: {decision.reason}")
        if not decision.excluded:
            attrs = ", ".join(sorted(decision.attributes)) or "none"
            lines.append(f"  attributes that matter: {attrs}")
            shadowed = [
                f"{rule.name!r} ({rule.kind}) via {pattern!r}"
                for rule in self.rules
                if rule.name != decision.rule
                for pattern in rule.patterns
                if _compile(pattern).fullmatch(path)
            ]
            for item in shadowed:
                lines.append(f"  also matches, but comes later: {item}")
        return "\n".join(lines)

    def verdict(
        self,
        decision: Decision,
        change: str,
        fields: Iterable[str] = (),
        *,
        first_boot: bool = False,
        grew_only: bool = False,
    ) -> Verdict:
        """Judge a change to a path. ``fields`` are the attributes that differ.

        ``grew_only`` says a modified file only had bytes appended (its old content is an
        exact prefix of the new); only growth-only rules care.
        """
        kind = decision.kind
        if kind == "excluded":
            return Verdict(False, "info", decision.reason)
        if kind == "mutable":
            return Verdict(False, "info", f"mutable path ({decision.rule})")
        if change == "modified":
            relevant = set(fields) & decision.attributes
            if not relevant:
                return Verdict(False, "info", "only attributes the rule ignores changed")
        if kind == "first_boot":
            if first_boot:
                return Verdict(False, "info", f"allowed on first boot ({decision.rule})")
            return Verdict(True, decision.severity, "first-boot path changed after first boot")
        if kind == "growth_only":
            if change == "modified" and grew_only and set(fields) <= {"size", "content", "mtime"}:
                return Verdict(False, "info", f"log grew by appending ({decision.rule})")
            return Verdict(True, decision.severity, "growth-only path changed other than by growth")
        return Verdict(True, decision.severity, f"{kind} path {change} ({decision.rule})")


# --- loading ---------------------------------------------------------------------------------

_POLICY_KEYS: Final = frozenset(
    {
        "name",
        "description",
        "roots",
        "exclude",
        "exclude_fstypes",
        "one_filesystem",
        "max_file_size_bytes",
        "ssh_login",
        "package_change",
    }
)
_RULE_KEYS: Final = frozenset({"name", "kind", "paths", "attributes", "severity", "reason"})
_SAMPLE_KEYS: Final = frozenset({"path", "expect", "rule"})
_TOP_KEYS: Final = frozenset({"policy", "rule", "sample"})


def load_policy(path: Path) -> Policy:
    """Load and fully validate a policy file; errors name the file, key and value."""
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise PolicyError(f"cannot read policy: {exc.strerror}", path=path) from exc
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise PolicyError(f"not valid TOML: {exc}", path=path) from exc
    return parse_policy(data, source=str(path))


def parse_policy(data: Mapping[str, Any], *, source: str) -> Policy:
    where = Path(source).name
    _no_unknown(data, _TOP_KEYS, where, "")
    head = data.get("policy")
    if not isinstance(head, dict):
        raise PolicyError(f"{where}: missing [policy] table")
    _no_unknown(head, _POLICY_KEYS, where, "[policy] ")
    name = _str(head, "name", where, "[policy] ", default=Path(source).stem)
    roots = tuple(_abs_list(head, "roots", where, "[policy] ", default=["/"]))
    excludes = tuple(_abs_list(head, "exclude", where, "[policy] ", default=DEFAULT_EXCLUDES))
    fstypes = tuple(_str_list(head, "exclude_fstypes", where, "[policy] ", default=VIRTUAL_FSTYPES))
    one_fs = head.get("one_filesystem", False)
    if not isinstance(one_fs, bool):
        raise PolicyError(f"{where}: [policy] one_filesystem = {one_fs!r} is not true or false")
    cap = head.get("max_file_size_bytes", 0)
    if isinstance(cap, bool) or not isinstance(cap, int) or cap < 0:
        raise PolicyError(
            f"{where}: [policy] max_file_size_bytes = {cap!r} is not a whole number >= 0"
        )
    ssh_login = _choice(head, "ssh_login", SSH_LOGIN_MODES, where, "[policy] ", "taint")
    package_change = _choice(head, "package_change", PACKAGE_MODES, where, "[policy] ", "drift")

    raw_rules = data.get("rule", [])
    if not isinstance(raw_rules, list):
        raise PolicyError(f"{where}: 'rule' must be an array of tables ([[rule]])")
    rules: list[Rule] = []
    seen: set[str] = set()
    for index, raw in enumerate(raw_rules):
        ctx = f"[[rule]] #{index + 1} "
        if not isinstance(raw, dict):
            raise PolicyError(f"{where}: {ctx}is not a table")
        _no_unknown(raw, _RULE_KEYS, where, ctx)
        rule_name = _str(raw, "name", where, ctx)
        ctx = f"[[rule]] {rule_name!r} "
        if rule_name in seen or rule_name in ("default", "exclude"):
            raise PolicyError(f"{where}: {ctx}name is already used or reserved")
        seen.add(rule_name)
        kind = _choice(raw, "kind", KINDS, where, ctx, None)
        patterns = tuple(_abs_list(raw, "paths", where, ctx, default=None))
        if not patterns:
            raise PolicyError(f"{where}: {ctx}paths is empty")
        for pattern in patterns:
            _check_pattern(pattern, where, ctx)
        default_attrs = frozenset() if kind == "mutable" else DEFAULT_ATTRIBUTES
        attrs = raw.get("attributes")
        if attrs is None:
            attributes = default_attrs
        else:
            attributes = frozenset(_str_list(raw, "attributes", where, ctx, default=None))
            bad = attributes - ATTRIBUTES
            if bad:
                raise PolicyError(
                    f"{where}: {ctx}attributes has unknown {sorted(bad)}; "
                    f"known: {sorted(ATTRIBUTES)}"
                )
        severity = _choice(raw, "severity", SEVERITIES, where, ctx, SEVERITY_OF_KIND[kind])
        reason = _str(raw, "reason", where, ctx, default="")
        rules.append(Rule(rule_name, kind, patterns, attributes, severity, reason))

    raw_samples = data.get("sample", [])
    if not isinstance(raw_samples, list):
        raise PolicyError(f"{where}: 'sample' must be an array of tables ([[sample]])")
    samples: list[Sample] = []
    for index, raw in enumerate(raw_samples):
        ctx = f"[[sample]] #{index + 1} "
        if not isinstance(raw, dict):
            raise PolicyError(f"{where}: {ctx}is not a table")
        _no_unknown(raw, _SAMPLE_KEYS, where, ctx)
        sample_path = _str(raw, "path", where, ctx)
        if not sample_path.startswith("/"):
            raise PolicyError(f"{where}: {ctx}path = {sample_path!r} is not absolute")
        expect = _choice(raw, "expect", (*KINDS, "excluded"), where, ctx, None)
        sample_rule = raw.get("rule")
        if sample_rule is not None and not isinstance(sample_rule, str):
            raise PolicyError(f"{where}: {ctx}rule = {sample_rule!r} is not a string")
        samples.append(Sample(sample_path, expect, sample_rule))

    digest_input = {k: v for k, v in data.items() if k != "sample"}
    return Policy(
        name=name,
        source=source,
        roots=roots,
        excludes=excludes,
        exclude_fstypes=fstypes,
        one_filesystem=one_fs,
        max_file_size_bytes=cap,
        ssh_login=ssh_login,
        package_change=package_change,
        rules=tuple(rules),
        samples=tuple(samples),
        digest="sha256:" + sha256_hex(canonical(digest_input)),
        _rule_re=_combine(rules),
        _exclude_re=_combine_excludes(excludes),
    )


def check_samples(policy: Policy) -> list[str]:
    """Run a policy's sample cases; return one message per case that fails."""
    failures = []
    for sample in policy.samples:
        decision = policy.decide(sample.path)
        if decision.kind != sample.expect:
            failures.append(
                f"{sample.path}: expected {sample.expect}, got {decision.kind} ({decision.reason})"
            )
        elif sample.rule is not None and decision.rule != sample.rule:
            failures.append(
                f"{sample.path}: expected rule {sample.rule!r}, decided by {decision.rule!r}"
            )
    return failures


# --- glob compilation ------------------------------------------------------------------------


def _segment_regex(segment: str) -> str:
    out = []
    i = 0
    while i < len(segment):
        char = segment[i]
        if char == "*":
            out.append("[^/]*")
        elif char == "?":
            out.append("[^/]")
        elif char == "[":
            end = segment.find("]", i + 2 if segment[i + 1 : i + 2] in ("!", "]") else i + 1)
            if end == -1:
                out.append(re.escape(char))
            else:
                body = segment[i + 1 : end]
                if body.startswith("!"):
                    body = "^" + body[1:]
                out.append("(?!/)[" + body.replace("\\", "\\\\") + "]")
                i = end
        else:
            out.append(re.escape(char))
        i += 1
    return "".join(out)


def _glob_regex(pattern: str) -> str:
    segments = pattern.strip("/").split("/") if pattern != "/" else []
    out = ""
    for index, segment in enumerate(segments):
        last = index == len(segments) - 1
        if segment == "**":
            # zero or more whole segments; at the end, one or more (below, not the dir itself)
            out += "/.+" if last else "(?:/[^/]+)*"
        else:
            out += "/" + _segment_regex(segment)
    return out or "/"


def _compile(pattern: str, *, subtree: bool = False) -> re.Pattern[str]:
    suffix = "(?:/.*)?" if subtree and pattern != "/" else ""
    return re.compile(_glob_regex(pattern) + suffix + r"\Z", re.DOTALL)


def _combine(rules: Iterable[Rule]) -> re.Pattern[str] | None:
    parts = [
        f"(?P<r{ri}_{pi}>{_glob_regex(pattern)})"
        for ri, rule in enumerate(rules)
        for pi, pattern in enumerate(rule.patterns)
    ]
    return re.compile("(?:" + "|".join(parts) + r")\Z", re.DOTALL) if parts else None


def _combine_excludes(patterns: Iterable[str]) -> re.Pattern[str] | None:
    parts = [_glob_regex(p) + ("(?:/.*)?" if p != "/" else ".*") for p in patterns]
    return re.compile("(?:" + "|".join(parts) + r")\Z", re.DOTALL) if parts else None


def _check_pattern(pattern: str, where: str, ctx: str) -> None:
    for segment in pattern.strip("/").split("/"):
        if "**" in segment and segment != "**":
            raise PolicyError(
                f"{where}: {ctx}paths has {pattern!r}: '**' must be a whole path segment"
            )
    try:
        _compile(pattern)
    except re.error as exc:
        raise PolicyError(f"{where}: {ctx}paths has {pattern!r}: {exc}") from exc


# --- validation helpers ----------------------------------------------------------------------


def _no_unknown(table: Mapping[str, Any], known: frozenset[str], where: str, ctx: str) -> None:
    unknown = set(table) - known
    if unknown:
        raise PolicyError(f"{where}: {ctx}unknown key(s) {sorted(unknown)}; known: {sorted(known)}")


def _str(
    table: Mapping[str, Any], key: str, where: str, ctx: str, *, default: str | None = None
) -> str:
    value = table.get(key, default)
    if value is None:
        raise PolicyError(f"{where}: {ctx}missing {key!r}")
    if not isinstance(value, str) or (not value and default is None):
        raise PolicyError(f"{where}: {ctx}{key} = {value!r} is not a non-empty string")
    return value


def _str_list(
    table: Mapping[str, Any], key: str, where: str, ctx: str, *, default: Iterable[str] | None
) -> list[str]:
    value = table.get(key)
    if value is None:
        if default is None:
            raise PolicyError(f"{where}: {ctx}missing {key!r}")
        return list(default)
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise PolicyError(f"{where}: {ctx}{key} = {value!r} is not a list of strings")
    return value


def _abs_list(
    table: Mapping[str, Any], key: str, where: str, ctx: str, *, default: Iterable[str] | None
) -> list[str]:
    values = _str_list(table, key, where, ctx, default=default)
    for value in values:
        if not value.startswith("/") or "\x00" in value:
            raise PolicyError(f"{where}: {ctx}{key} has {value!r}: paths must be absolute")
    return [v.rstrip("/") or "/" for v in values]


def _choice(
    table: Mapping[str, Any],
    key: str,
    choices: Iterable[str],
    where: str,
    ctx: str,
    default: str | None,
) -> str:
    value = table.get(key, default)
    options = tuple(choices)
    if value is None:
        raise PolicyError(f"{where}: {ctx}missing {key!r}; one of {list(options)}")
    if value not in options:
        raise PolicyError(f"{where}: {ctx}{key} = {value!r} is not one of {list(options)}")
    return str(value)

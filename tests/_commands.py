"""The shell commands written in the README, the docs and the examples: found, classified and shortened for a test."""

from __future__ import annotations

import re
import shlex


def blocks(text: str, language: str) -> list[str]:
    """The fenced code blocks of ``language`` in a Markdown ``text``."""
    return re.findall(rf"^```{language}\n(.*?)^```", text, flags=re.S | re.M)


def commands(text: str) -> list[list[str]]:
    """Every command of every shell block once, as argument lists (``a && b`` is two commands, comments dropped)."""
    out: list[list[str]] = []
    for block in blocks(text, "bash"):
        for line in block.splitlines():
            words = shlex.split(line, comments=True)
            while words:
                cut = words.index("&&") if "&&" in words else len(words)
                if words[:cut] not in out:
                    out.append(words[:cut])
                words = words[cut + 1 :]
    return out


def shorten_sweep(arg: str) -> tuple[str, int]:
    """``key=a,b,c`` -> ``(key=a,b, 2)``, ``key=range(...)`` -> its first two values; other arguments unchanged
    with 1 (Hydra's own override parser reads them)."""
    if arg.startswith("-") or "=" not in arg:
        return arg, 1
    from hydra.core.override_parser.overrides_parser import OverridesParser

    (override,) = OverridesParser.create().parse_overrides([arg])
    if not override.is_sweep_override():
        return arg, 1
    values = list(override.sweep_string_iterator())[:2]
    return f"{override.get_key_element()}={','.join(values)}", len(values)

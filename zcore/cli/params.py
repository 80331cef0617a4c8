"""Parsers for option values the command groups share: sizes, NAME=VALUE pairs and
checkpoint selectors.  Each raises `click.BadParameter` with the form it expects."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

import click

if TYPE_CHECKING:
    from zcore.journal import Journal
    from zcore.records import Checkpoint

_SIZE_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_size(text: str) -> int:
    """"4G", "512M", "1048576" -> bytes (binary units)."""
    raw = text.strip().upper().removesuffix("B").removesuffix("I")
    unit = raw[-1:] if raw[-1:] in _SIZE_UNITS else ""
    try:
        value = float(raw[: len(raw) - len(unit)])
    except ValueError:
        raise click.BadParameter(f"{text!r} is not a size (like 4G, 512M or 1048576)") from None
    return int(value * _SIZE_UNITS[unit])


def name_value(option: str, text: str) -> tuple[str, str]:
    """"NAME=VALUE" -> (NAME, VALUE), both non-empty."""
    name, sep, value = text.partition("=")
    if not sep or not name or not value:
        raise click.BadParameter(f"{option} takes NAME=VALUE, not {text!r}")
    return name, value


def checkpoint_of(journal: Journal, text: str) -> Checkpoint:
    """A checkpoint from "latest", "tag:TEXT" (newest whose tag contains TEXT) or an id.
    Not found: `CheckpointNotFoundError` naming the newest few checkpoints there are."""
    from zcore.errors import CheckpointNotFoundError

    check_checkpoint_text("--view/--scratch", text)
    try:
        if text in ("", "latest"):
            return journal.latest_checkpoint()
        if text.startswith("tag:"):
            found = journal.checkpoints(tag=text[4:])
            if not found:
                raise CheckpointNotFoundError(f"no checkpoint tagged like {text[4:]!r}")
            return found[-1]
        return journal.checkpoint_by_id(int(text))
    except CheckpointNotFoundError as exc:
        hint = checkpoints_hint(journal)
        message = str(exc) if hint in str(exc) else f"{exc}\n{hint}"
        raise CheckpointNotFoundError(message) from None


def check_checkpoint_text(option: str, text: str) -> None:
    """Refuse a checkpoint selector of the wrong form before anything is opened."""
    if text not in ("", "latest") and not text.startswith("tag:") and not text.isdigit():
        raise click.BadParameter(f"{option}: checkpoint {text!r}: give an id, 'latest' or "
                                 "'tag:TEXT'")


HINT_NEWEST = 5


def checkpoint_line(ckpt: Checkpoint) -> str:
    """One checkpoint as people read it: id, local time, kind, consistency, tag."""
    import time

    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ckpt.time))
    flags = f"{ckpt.kind}{'' if ckpt.consistent else ', not consistent'}"
    tag = f"  {ckpt.tag!r}" if ckpt.tag else ""
    return f"{ckpt.id:>12}  {when}  {flags}{tag}"


def checkpoints_hint(journal: Journal) -> str:
    """What a journal holds, for an error message: its newest checkpoints and how to list
    them all."""
    held = journal.checkpoints()
    if not held:
        return f"journal {journal.path} holds no checkpoint yet"
    newest = held[-HINT_NEWEST:]
    lines = [f"journal {journal.path} holds {len(held)} checkpoint(s); the newest:"]
    lines += ["  " + checkpoint_line(c) for c in reversed(newest)]
    if len(held) > len(newest):
        lines.append(f"list them all with: zcore nbd checkpoints --journal {journal.path}")
    return "\n".join(lines)


F = TypeVar("F", bound=Callable[..., Any])
_COUNT = click.IntRange(min=0)


def gfs_options(*, last: bool = True) -> Callable[[F], F]:
    """The GFS retention counts a prune or a backup schedule takes (--daily, --weekly,
    --monthly, --yearly and, for a prune, --last), never negative."""
    options = [
        click.option("--daily", type=_COUNT, default=7, show_default=True,
                     help="keep the newest backup of each of the last N days"),
        click.option("--weekly", type=_COUNT, default=4, show_default=True,
                     help="keep the newest backup of each of the last N ISO weeks"),
        click.option("--monthly", type=_COUNT, default=12, show_default=True,
                     help="keep the newest backup of each of the last N months"),
        click.option("--yearly", type=_COUNT, default=0, show_default=True,
                     help="keep the newest backup of each of the last N years"),
    ]
    if last:
        options.append(click.option("--last", type=_COUNT, default=1, show_default=True,
                                    help="also keep the newest N backups of each VPG"))

    def decorate(fn: F) -> F:
        for option in reversed(options):
            fn = option(fn)
        return fn
    return decorate

"""The `zcore` command line: the demo, and the tools that sit on top of the library.

One module per command group, so a command is one room: `demo_cmd` (`zcore demo`),
`nbd_cmd` (`zcore nbd ...`), `journal_cmd` (`zcore journal check`), `site_cmd`
(`zcore site init|serve`) with `site_client_cmd` (`site status|pair|pairing-token`),
`vm_cmd`, `vpg_cmd`, `checkpoint_cmd`, `test_cmd` (failover tests), `failover_cmd`,
`move_cmd` (move, reverse, failback) and `activity_cmd` (events, alerts, tasks): clients of
the site's REST API through `client`, printing through `output`; option parsers shared
between groups live in `params`.
A new group is a `*_cmd.py` module whose click command or group is added to `main` here.
The console script `zcore` is `zcore.cli:main`; `python -m zcore.cli` runs the same.
"""

from __future__ import annotations

import click

from zcore.cli.activity_cmd import alerts, events, tasks
from zcore.cli.backup_cmd import backup
from zcore.cli.checkpoint_cmd import checkpoint
from zcore.cli.demo_cmd import demo
from zcore.cli.failover_cmd import failover
from zcore.cli.journal_cmd import journal
from zcore.cli.move_cmd import failback, move, reverse
from zcore.cli.nbd_cmd import nbd
from zcore.cli.site_client_cmd import add_client_commands
from zcore.cli.site_cmd import site
from zcore.cli.test_cmd import test
from zcore.cli.vm_cmd import vm
from zcore.cli.vpg_cmd import vpg


@click.group()
@click.version_option(package_name="zcore")
def main() -> None:
    """zcore: continuous data protection for virtual disks."""


main.add_command(demo)
main.add_command(journal)
main.add_command(nbd)
add_client_commands(site)  # site status|pair|pairing-token, beside site init|serve
for _group in (site, vm, vpg, checkpoint, test, failover, move, reverse, failback, events,
               alerts, tasks, backup):
    main.add_command(_group)

__all__ = ["main"]

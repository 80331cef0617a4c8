"""The `zcore` command line: the demo, and the tools that sit on top of the library.

One module per command group, so a command is one room: `demo_cmd` (`zcore demo`),
`nbd_cmd` (`zcore nbd ...`), `journal_cmd` (`zcore journal check`); option parsers
shared between groups live in `params`.
A new group is a `*_cmd.py` module whose click command or group is added to `main` here.
The console script `zcore` is `zcore.cli:main`; `python -m zcore.cli` runs the same.
"""

from __future__ import annotations

import click

from zcore.cli.activity_cmd import alerts, events, tasks
from zcore.cli.checkpoint_cmd import checkpoint
from zcore.cli.demo_cmd import demo
from zcore.cli.journal_cmd import journal
from zcore.cli.nbd_cmd import nbd
from zcore.cli.site_client_cmd import add_client_commands, site
from zcore.cli.vm_cmd import vm
from zcore.cli.vpg_cmd import vpg


@click.group()
@click.version_option(package_name="zcore")
def main() -> None:
    """zcore: continuous data protection for virtual disks."""


main.add_command(demo)
main.add_command(journal)
main.add_command(nbd)
# the REST API clients of `zcore site`; once zcore.cli.site_cmd's `site` group (init, serve)
# is registered, add them to that group instead: add_client_commands(site_cmd.site)
add_client_commands(site)
for _group in (site, vm, vpg, checkpoint, events, alerts, tasks):
    main.add_command(_group)

__all__ = ["main"]

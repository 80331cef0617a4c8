"""The browser UI of a site service: static pages served at `/` beside the REST API, and
the login, session and CSRF layer that lets those pages call the API.

Sits outermost around zcore.site.api.app's application (zcore.site.api.app installs
`UiGate`) and adds no logic of its own: the pages under `static/` are plain HTML, CSS and
JavaScript modules that call /api/v1 and show what it answers, refusals included.
"""

from zcore.site.ui.gate import CSRF_HEADER, UiGate
from zcore.site.ui.sessions import Session, SessionStore

__all__ = ["CSRF_HEADER", "Session", "SessionStore", "UiGate"]

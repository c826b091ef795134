"""Interactive explorer apps (installed as attnscope.apps)."""

"""EraseAnything-style concept erasure built on attnscope capture hooks (installed as attnscope.erase)."""

"""The files `asobi new DIR` writes: a ready game folder (shipped as package data)."""

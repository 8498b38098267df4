"""Benchmarks for asobi: capacity, hot reload under load, and a side-by-side peer (Colyseus)."""

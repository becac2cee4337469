"""Benchmarks for sessionkit; runtime code never imports anything from here."""

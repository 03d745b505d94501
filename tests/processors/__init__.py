"""Tests of the processors package (media in)."""

"""Tests of volcnn.explain."""

"""Thin KFP v2 components: each translates KFP artifacts/parameters into one `visrec` library call."""

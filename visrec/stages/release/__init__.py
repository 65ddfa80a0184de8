"""Stage 6: releases and the Vertex AI model/endpoint lifecycle they are deployed to.

`release` (the value: one verified release directory, opened and checked), `registry`
(CURRENT, history, canary marker, audit trail, fallback, predecessor/successor), `deploy`
(assemble, verify, publish: `deploy_release`), `promote` (approve, promote a canary,
auto-promote, roll back), `vertex` (the Vertex AI model versions and endpoint).
"""

"""Stage 6: releases (the value, the registry with CURRENT and history, verification,
promotion) and the Vertex AI model/endpoint lifecycle they are deployed to.
"""

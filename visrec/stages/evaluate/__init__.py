"""Stage 5: offline evaluation from impression-and-tap logs, the release gate (may this
candidate ship?) and the HTML report.
"""

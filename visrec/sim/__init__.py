"""The synthetic marketplace (`visrec demo-data`) and the offline study (`visrec study`): not
production code, they exercise it.

May import everything but `visrec.cli`.
"""

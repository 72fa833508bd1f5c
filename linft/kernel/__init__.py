"""The kernel run, one stage per module (``run.py`` wires them):

batches -> capture -> engine (J blocks) -> store -> gram (tiles -> K) -> checkpoint.
"""

"""Test stand-in for the ``indextts`` package (IndexTTS2's weights cannot be downloaded here).

Put ``tests/standin`` on PYTHONPATH and ``from indextts.infer_v2 import IndexTTS2`` resolves to a
class with the real signatures that records every call instead of running a model.
"""

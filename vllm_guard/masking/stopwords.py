"""Stopwords per language that a NER pipeline can be configured for.

Kept apart from ``ner.py`` (which loads Presidio) so that ``MaskingConfig`` can check
``ner_languages`` without loading the detector engine (``vllm-guard serve`` validates the
config in the parent process).
"""

from __future__ import annotations

# the commonest short words of each language a pipeline can be configured for
_EN = ("the a an and or of to in on at for with from by is are was be it this that you we he "
       "she they please will can")
_FR = ("le la les un une des du de et ou à au aux pour avec par sur dans est sont été ce cette "
       "vous nous il elle ils merci veuillez")
STOPWORDS = {"en": frozenset(_EN.split(" ")), "fr": frozenset(_FR.split(" "))}

"""Detection: text -> sensitive spans. Checksum recognizers, the name gazetteer and its
recognizer, Chinese names, spaCy NER, known places, context rules, and the composite engine
(:func:`vllm_guard.masking.detection.detector.build_detector`). Shared types are in
:mod:`vllm_guard.masking.types`; nothing here imports the request path."""

"""arq workers: the slow work (Instagram previews, LLM persona replies).

The daemon's route loop asks each feature's trigger about every inbound event
(``triggers.py``) and enqueues arq jobs; ``talkbridge worker`` runs them
(``settings.py``), and a job posts its answer into the room as an ordinary
delivery on the bus (``results.py``), so ordering, retries, exactly-once and
dead letters are the core's. One module per feature: ``instagram.py``,
``llm.py``; ``registry.py`` lists them.
"""

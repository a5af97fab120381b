"""LR range tests: the finder (:mod:`.finder`), its suggestion rules (:mod:`.suggestions`), the
results it returns (:mod:`.results`), and jobs beside a live run or on a built-in task
(:mod:`.job`)."""

"""Evaluation: benchmarks scored as their authors score them (no torch in the metric modules).

:mod:`~llava_uhd.eval.vqa` (VQAv2, TextVQA, VizWiz), :mod:`~llava_uhd.eval.metrics` (ANLS, ChartQA
relaxed accuracy, GQA, exact match, multiple choice), :mod:`~llava_uhd.eval.yesno` (POPE, MME),
:mod:`~llava_uhd.eval.scoring` (whole files of predictions against ground truth),
:mod:`~llava_uhd.eval.synthdoc` (the synthdoc benchmark of the bundled model).
"""

"""An OpenAI-compatible HTTP server for a saved model: dynamic batching, an image-feature cache, limits,
metrics and a web page (``llava-uhd serve``; docs/serving.md).

Modules, each one job: :mod:`~llava_uhd.serve.schema` (the request format), :mod:`~llava_uhd.serve.limits`
(limits and OpenAI errors), :mod:`~llava_uhd.serve.image_urls` (image URLs to bytes),
:mod:`~llava_uhd.serve.engine` (requests to model calls), :mod:`~llava_uhd.serve.batcher` (the queue and
the batches), :mod:`~llava_uhd.serve.metrics`, :mod:`~llava_uhd.serve.page` and :mod:`~llava_uhd.serve.app`
(the routes). Nothing here imports the training data or training code.
"""
